/* Products with the small float32 matrices of RWKV-6/7's low-rank paths (decay, in-context
 * rate, gate, value residual): out[t, i] = sum_j x[t, j] wt[j, i], the matrix stored
 * transposed, wt (n_in, n_out).
 *
 * One side of these matrices is 32-128 long, which suits the row-dot kernels of _simd.h
 * badly: a dot of 64 floats ends in a horizontal sum as long as itself, and a product of a
 * chunk's tokens with a 1024 x 64 matrix took 2.4x the time per weight of the big ones
 * (0.4B shape, 128 tokens). Here each output is one lane of a register summing its n_in
 * terms in order of j, as mul then add (the build forbids contraction into FMAs): no
 * horizontal sums, and every lane computes the same operations whatever the vector width,
 * so the scalar loop, AVX2 and AVX-512 give the same bits, one token or many.
 */
#ifndef RWKVX_LOWRANK_H
#define RWKVX_LOWRANK_H

#include <stddef.h>

/* outputs per block: four AVX-512 registers (eight AVX2) of independent sums */
#define RWKVX_LOWRANK_BLOCK 64

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
            acc[i] = acc[i] + xj * w[i];
    }
    for (ptrdiff_t i = 0; i < width; i++)
        out[i] = acc[i];
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define RWKVX_LOWRANK_X86 1

/* The same sums in registers, for one or two tokens (two: twice the independent chains
 * per weight loaded). W_REGS vectors of LANES outputs, the last one masked to `width`. */
#define RWKVX_LOWRANK_SIMD(NAME, ATTR, VEC, LANES, ZERO, SET1, ADD, MUL, LOAD, STORE, MASK_T, MASK_OF)  \
    ATTR static void NAME(ptrdiff_t n_in, ptrdiff_t width, const float *x0, const float *x1,             \
                          const float *wt, ptrdiff_t ldw, float *out0, float *out1)                      \
    {                                                                                                    \
        VEC a0[4], a1[4];                                                                                \
        const int regs = (int)((width + LANES - 1) / LANES);                                             \
        const MASK_T last = MASK_OF(width - (ptrdiff_t)LANES * (regs - 1));                              \
        for (int r = 0; r < 4; r++)                                                                      \
            a0[r] = a1[r] = ZERO();                                                                      \
        if (regs == 4 && x1) {                                                                           \
            for (ptrdiff_t j = 0; j < n_in; j++) {                                                       \
                const float *w = wt + j * ldw;                                                           \
                const VEC b0 = SET1(x0[j]), b1 = SET1(x1[j]);                                            \
                for (int r = 0; r < 4; r++) {                                                            \
                    const VEC wv = r == 3 ? LOAD(last, w + LANES * r) : LOAD(MASK_OF(LANES), w + LANES * r); \
                    a0[r] = ADD(a0[r], MUL(b0, wv));                                                     \
                    a1[r] = ADD(a1[r], MUL(b1, wv));                                                     \
                }                                                                                        \
            }                                                                                            \
        } else {                                                                                         \
            for (ptrdiff_t j = 0; j < n_in; j++) {                                                       \
                const float *w = wt + j * ldw;                                                           \
                const VEC b0 = SET1(x0[j]), b1 = SET1(x1 ? x1[j] : 0.0f);                                \
                for (int r = 0; r < regs; r++) {                                                         \
                    const VEC wv = LOAD(r == regs - 1 ? last : MASK_OF(LANES), w + LANES * r);           \
                    a0[r] = ADD(a0[r], MUL(b0, wv));                                                     \
                    if (x1)                                                                              \
                        a1[r] = ADD(a1[r], MUL(b1, wv));                                                 \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < regs; r++) {                                                                 \
            STORE(r == regs - 1 ? last : MASK_OF(LANES), out0 + LANES * r, a0[r]);                       \
            if (x1)                                                                                      \
                STORE(r == regs - 1 ? last : MASK_OF(LANES), out1 + LANES * r, a1[r]);                   \
        }                                                                                                \
    }

#define RWKVX_LR512_MASK(n) ((__mmask16)((1u << (n)) - 1u))
#define RWKVX_LR512_LOAD(m, p) _mm512_maskz_loadu_ps((m), (p))
#define RWKVX_LR512_STORE(m, p, v) _mm512_mask_storeu_ps((p), (m), (v))
RWKVX_LOWRANK_SIMD(rwkvx_lowrank_avx512, __attribute__((target("avx512f,avx2"))), __m512, 16, _mm512_setzero_ps,
                   _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps, RWKVX_LR512_LOAD, RWKVX_LR512_STORE, __mmask16,
                   RWKVX_LR512_MASK)

/* 64 outputs of two tokens, the common case, with the eight sums in named registers (the
 * general loop above keeps them in arrays, which GCC stores to the stack every step) */
__attribute__((target("avx512f,avx2"))) static void rwkvx_lowrank_avx512_64x2(ptrdiff_t n_in, const float *x0,
                                                                              const float *x1, const float *wt,
                                                                              ptrdiff_t ldw, float *out0,
                                                                              float *out1)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (ptrdiff_t j = 0; j < n_in; j++) {
        const float *w = wt + j * ldw;
        const __m512 s = _mm512_set1_ps(x0[j]), u = _mm512_set1_ps(x1[j]);
        const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
        const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
        a0 = _mm512_add_ps(a0, _mm512_mul_ps(s, w0));
        a1 = _mm512_add_ps(a1, _mm512_mul_ps(s, w1));
        a2 = _mm512_add_ps(a2, _mm512_mul_ps(s, w2));
        a3 = _mm512_add_ps(a3, _mm512_mul_ps(s, w3));
        b0 = _mm512_add_ps(b0, _mm512_mul_ps(u, w0));
        b1 = _mm512_add_ps(b1, _mm512_mul_ps(u, w1));
        b2 = _mm512_add_ps(b2, _mm512_mul_ps(u, w2));
        b3 = _mm512_add_ps(b3, _mm512_mul_ps(u, w3));
    }
    _mm512_storeu_ps(out0, a0);
    _mm512_storeu_ps(out0 + 16, a1);
    _mm512_storeu_ps(out0 + 32, a2);
    _mm512_storeu_ps(out0 + 48, a3);
    _mm512_storeu_ps(out1, b0);
    _mm512_storeu_ps(out1 + 16, b1);
    _mm512_storeu_ps(out1 + 32, b2);
    _mm512_storeu_ps(out1 + 48, b3);
}

/* AVX2 masks are vectors: lane i on if i < n */
__attribute__((target("avx2"))) static inline __m256i rwkvx_lr256_mask(ptrdiff_t n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define RWKVX_LR256_LOAD(m, p) _mm256_maskload_ps((p), (m))
#define RWKVX_LR256_STORE(m, p, v) _mm256_maskstore_ps((p), (m), (v))
RWKVX_LOWRANK_SIMD(rwkvx_lowrank_avx2_32, __attribute__((target("avx2"))), __m256, 8, _mm256_setzero_ps,
                   _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps, RWKVX_LR256_LOAD, RWKVX_LR256_STORE, __m256i,
                   rwkvx_lr256_mask)

/* AVX2 has 16 vector registers: a block of 64 outputs goes as two of 32 */
__attribute__((target("avx2"))) static void rwkvx_lowrank_avx2(ptrdiff_t n_in, ptrdiff_t width, const float *x0,
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
    if (level >= 2 && width == 64 && x1)
        return rwkvx_lowrank_avx512_64x2(n_in, x0, x1, wt, ldw, out0, out1);
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
