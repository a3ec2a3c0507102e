/* Products with the small float32 matrices of RWKV-6/7's low-rank paths (decay, in-context
 * rate, gate, value residual): out[t, i] = sum_j x[t, j] wt[j, i], the matrix stored
 * transposed, wt (n_in, n_out).
 *
 * One side of these matrices is 32-128 long, which suits the row-dot kernels of _simd.h
 * badly: a dot of 64 floats ends in a horizontal sum as long as itself, and a product of a
 * chunk's tokens with a 1024 x 64 matrix took 2.4x the time per weight of the big ones
 * (0.4B shape, 128 tokens). Here each output is one lane of a register summing its n_in
 * terms in order of j, each with one fused multiply-add: no horizontal sums, and every
 * lane computes the same operations whatever the vector width. A fused multiply-add is
 * rounded once, exactly as fmaf() is, so the scalar loop (fmaf), AVX2 and AVX-512 give the
 * same bits, one token or many. (Mul then add, as the first version did, took 1.2-1.3x the
 * time of a 128-token product: the low-rank products are compute-bound in prompts.)
 */
#ifndef RWKVX_LOWRANK_H
#define RWKVX_LOWRANK_H

#include <math.h>
#include <stddef.h>

/* outputs per block: eight AVX-512 registers (four runs of four AVX2 ones) of independent
 * sums. A block reads this many floats of every row of a wider matrix: 512 bytes a row
 * took a 2048 x 96 product, 8 tokens, from 12.2 to 15.0 GB/s and one token from 24 to 30
 * against 256 (Zen 4, 2 threads, from memory). */
#define RWKVX_LOWRANK_BLOCK 128

/* out[i] = sum_j x[j] wt[j, i] for i < width (<= RWKVX_LOWRANK_BLOCK); ldw: wt's row length */
static void rwkvx_lowrank_block_portable(ptrdiff_t n_in, ptrdiff_t width, const float *x, const float *wt,
                                         ptrdiff_t ldw, float *out)
{
    float acc[RWKVX_LOWRANK_BLOCK];
    for (ptrdiff_t i = 0; i < width; i++)
        acc[i] = 0.0f;
    for (ptrdiff_t j = 0; j < n_in; j++) {
        const float xj = x[j];
        const float *w = wt + j * ldw;
        for (ptrdiff_t i = 0; i < width; i++)
            acc[i] = fmaf(xj, w[i], acc[i]);
    }
    for (ptrdiff_t i = 0; i < width; i++)
        out[i] = acc[i];
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define RWKVX_LOWRANK_X86 1

/* The same sums in registers for one or two tokens (two: twice the independent chains per
 * weight loaded): four vectors of outputs (AVX2; AVX-512 below has eight), masked to
 * `width` (masked-off lanes load nothing and sum zeros). The sums live in named variables: kept in arrays, GCC stores them to the
 * stack every step, which made a one-token product run at a third of memory speed. */
/* A block of a wider matrix reads a stretch of every row: a stride the hardware does not
 * prefetch (1024 x 160 from L3: 6 GB/s on one thread). Fetch the block's row eight ahead. */
#define RWKVX_LR_AHEAD_ROWS 8
#define RWKVX_LR_AHEAD(w, ldw)                                                                       \
    do {                                                                                             \
        const char *ahead_ = (const char *)((w) + RWKVX_LR_AHEAD_ROWS * (ldw));                      \
        _mm_prefetch(ahead_, _MM_HINT_T0);                                                           \
        _mm_prefetch(ahead_ + 64, _MM_HINT_T0);                                                      \
        _mm_prefetch(ahead_ + 128, _MM_HINT_T0);                                                     \
        _mm_prefetch(ahead_ + 192, _MM_HINT_T0);                                                     \
    } while (0)
#define RWKVX_LOWRANK_SIMD(NAME, ATTR, VEC, LANES, ZERO, SET1, FMA, LOAD, STORE, MASK_T, MASK_OF)    \
    ATTR static void NAME(ptrdiff_t n_in, ptrdiff_t width, const float *x0, const float *x1,               \
                          const float *wt, ptrdiff_t ldw, float *out0, float *out1)                        \
    {                                                                                                      \
        const MASK_T m0 = MASK_OF(width), m1 = MASK_OF(width - LANES);                                     \
        const MASK_T m2 = MASK_OF(width - 2 * LANES), m3 = MASK_OF(width - 3 * LANES);                     \
        VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;                    \
        if (x1) {                                                                                          \
            for (ptrdiff_t j = 0; j < n_in; j++) {                                                         \
                const float *w = wt + j * ldw;                                                             \
                RWKVX_LR_AHEAD(w, ldw);                                                                    \
                const VEC b = SET1(x0[j]), u = SET1(x1[j]);                                                \
                const VEC w0 = LOAD(m0, w), w1 = LOAD(m1, w + LANES);                                      \
                const VEC w2 = LOAD(m2, w + 2 * LANES), w3 = LOAD(m3, w + 3 * LANES);                      \
                a0 = FMA(b, w0, a0); a1 = FMA(b, w1, a1);                                        \
                a2 = FMA(b, w2, a2); a3 = FMA(b, w3, a3);                                        \
                c0 = FMA(u, w0, c0); c1 = FMA(u, w1, c1);                                        \
                c2 = FMA(u, w2, c2); c3 = FMA(u, w3, c3);                                        \
            }                                                                                              \
            STORE(m0, out1, c0); STORE(m1, out1 + LANES, c1);                                              \
            STORE(m2, out1 + 2 * LANES, c2); STORE(m3, out1 + 3 * LANES, c3);                              \
        } else {                                                                                           \
            for (ptrdiff_t j = 0; j < n_in; j++) {                                                         \
                const float *w = wt + j * ldw;                                                             \
                RWKVX_LR_AHEAD(w, ldw);                                                                    \
                const VEC b = SET1(x0[j]);                                                                 \
                a0 = FMA(b, LOAD(m0, w), a0); a1 = FMA(b, LOAD(m1, w + LANES), a1);              \
                a2 = FMA(b, LOAD(m2, w + 2 * LANES), a2); a3 = FMA(b, LOAD(m3, w + 3 * LANES), a3); \
            }                                                                                              \
        }                                                                                                  \
        STORE(m0, out0, a0); STORE(m1, out0 + LANES, a1);                                                  \
        STORE(m2, out0 + 2 * LANES, a2); STORE(m3, out0 + 3 * LANES, a3);                                  \
    }

/* lane i on if i < n (n may be negative or above the width) */
#define RWKVX_LR512_MASK(n) ((__mmask16)((n) >= 16 ? 0xFFFFu : (n) <= 0 ? 0u : (1u << (n)) - 1u))
#define RWKVX_LR512_LOAD(m, p) _mm512_maskz_loadu_ps((m), (p))
#define RWKVX_LR512_FMA8(B, ACC)                                                                  \
    do {                                                                                          \
        ACC##0 = _mm512_fmadd_ps(B, w0, ACC##0); ACC##1 = _mm512_fmadd_ps(B, w1, ACC##1);         \
        ACC##2 = _mm512_fmadd_ps(B, w2, ACC##2); ACC##3 = _mm512_fmadd_ps(B, w3, ACC##3);         \
        ACC##4 = _mm512_fmadd_ps(B, w4, ACC##4); ACC##5 = _mm512_fmadd_ps(B, w5, ACC##5);         \
        ACC##6 = _mm512_fmadd_ps(B, w6, ACC##6); ACC##7 = _mm512_fmadd_ps(B, w7, ACC##7);         \
    } while (0)
/* The block's eight vectors of sums for one token or two, as the AVX2 loop's four (same
 * operations per lane, so the same bits). */
__attribute__((target("avx512f,avx2"))) static void rwkvx_lowrank_avx512(ptrdiff_t n_in, ptrdiff_t width,
                                                                        const float *x0, const float *x1,
                                                                        const float *wt, ptrdiff_t ldw,
                                                                        float *out0, float *out1)
{
    __mmask16 m[8];
    for (int v = 0; v < 8; v++)
        m[v] = RWKVX_LR512_MASK(width - 16 * v);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, c6 = a0, c7 = a0;
    for (ptrdiff_t j = 0; j < n_in; j++) {
        const float *w = wt + j * ldw;
        const char *ahead = (const char *)(w + RWKVX_LR_AHEAD_ROWS * ldw);
        for (int l = 0; l < 8; l++)
            _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
        const __m512 w0 = RWKVX_LR512_LOAD(m[0], w), w1 = RWKVX_LR512_LOAD(m[1], w + 16);
        const __m512 w2 = RWKVX_LR512_LOAD(m[2], w + 32), w3 = RWKVX_LR512_LOAD(m[3], w + 48);
        const __m512 w4 = RWKVX_LR512_LOAD(m[4], w + 64), w5 = RWKVX_LR512_LOAD(m[5], w + 80);
        const __m512 w6 = RWKVX_LR512_LOAD(m[6], w + 96), w7 = RWKVX_LR512_LOAD(m[7], w + 112);
        const __m512 b = _mm512_set1_ps(x0[j]);
        RWKVX_LR512_FMA8(b, a);
        if (x1) {
            const __m512 u = _mm512_set1_ps(x1[j]);
            RWKVX_LR512_FMA8(u, c);
        }
    }
    const __m512 a[8] = {a0, a1, a2, a3, a4, a5, a6, a7}, c[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int v = 0; v < 8; v++) {
        _mm512_mask_storeu_ps(out0 + 16 * v, m[v], a[v]);
        if (x1)
            _mm512_mask_storeu_ps(out1 + 16 * v, m[v], c[v]);
    }
}

/* AVX2 masks are vectors: lane i on if i < n */
__attribute__((target("avx2,fma"))) static inline __m256i rwkvx_lr256_mask(ptrdiff_t n)
{
    const int k = n < 0 ? 0 : n > 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define RWKVX_LR256_LOAD(m, p) _mm256_maskload_ps((p), (m))
#define RWKVX_LR256_STORE(m, p, v) _mm256_maskstore_ps((p), (m), (v))
RWKVX_LOWRANK_SIMD(rwkvx_lowrank_avx2_32, __attribute__((target("avx2,fma"))), __m256, 8, _mm256_setzero_ps,
                   _mm256_set1_ps, _mm256_fmadd_ps, RWKVX_LR256_LOAD, RWKVX_LR256_STORE, __m256i,
                   rwkvx_lr256_mask)

/* AVX2 has 16 vector registers: a block goes as runs of 32 outputs */
__attribute__((target("avx2,fma"))) static void rwkvx_lowrank_avx2(ptrdiff_t n_in, ptrdiff_t width, const float *x0,
                                                               const float *x1, const float *wt, ptrdiff_t ldw,
                                                               float *out0, float *out1)
{
    for (ptrdiff_t i = 0; i < width; i += 32)
        rwkvx_lowrank_avx2_32(n_in, width - i < 32 ? width - i : 32, x0, x1, wt + i, ldw, out0 + i,
                              out1 ? out1 + i : NULL);
}
#else
#define RWKVX_LOWRANK_X86 0
#endif

/* Outputs i0 .. i0 + width (<= RWKVX_LOWRANK_BLOCK) of one token, or of two (x1, out1 not
 * NULL); wt points at column i0; level as _matvec's simd level. */
static inline void rwkvx_lowrank_block(int level, ptrdiff_t n_in, ptrdiff_t width, const float *x0,
                                       const float *x1, const float *wt, ptrdiff_t ldw, float *out0,
                                       float *out1)
{
#if RWKVX_LOWRANK_X86
    if (level >= 2)
        return rwkvx_lowrank_avx512(n_in, width, x0, x1, wt, ldw, out0, out1);
    if (level >= 1)
        return rwkvx_lowrank_avx2(n_in, width, x0, x1, wt, ldw, out0, out1);
#endif
    rwkvx_lowrank_block_portable(n_in, width, x0, wt, ldw, out0);
    if (x1)
        rwkvx_lowrank_block_portable(n_in, width, x1, wt, ldw, out1);
}

#endif /* RWKVX_LOWRANK_H */
