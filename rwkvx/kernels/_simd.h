/* Inner loops of the matrix products, with a run-time choice of instruction set.
 *
 * Decoding one token reads every weight once, so these loops must keep up with memory
 * bandwidth. GCC does not vectorise a plain float reduction without -ffast-math (it may
 * not reassociate the sum), and a portable build cannot assume AVX2. So each loop exists
 * as a portable version with eight independent accumulators and an AVX2+FMA version, and
 * the matrix-matrix loop also as AVX-512 (with the AVX2 summation order), compiled
 * through function attributes and picked once at import by rwkvx_detect_simd().
 * No -march flag is needed and the same build runs on any x86-64 or other CPU.
 *
 * Weights come in four storage types, all computed in float32:
 *   f32, bf16 (the top 16 bits of a float32), f16 (IEEE half), u8 (see _matvec.pyx).
 * One macro template generates the loops of every type, so a bf16 matrix and the float32
 * matrix holding the same values are summed in exactly the same order: their results are
 * bit-identical. Every row is reduced by the same code whatever the thread count.
 */
#ifndef RWKVX_SIMD_H
#define RWKVX_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define RWKVX_HAVE_X86_DISPATCH 1
#include <immintrin.h>
#else
#define RWKVX_HAVE_X86_DISPATCH 0
#endif

/* 0: portable loops, 1: AVX2 + FMA (+ F16C), 2: as 1 with AVX-512F matrix-matrix
 * products. Set by rwkvx_detect_simd() at import (see RWKVX_DEFAULT_LEVEL). */
static int rwkvx_simd_level = 0;

/* Whether the CPU has AVX-512VL: the loops built for 256-bit registers with AVX-512's 32 of
 * them (RWKVX_AVX512VL) need it beyond level 2's AVX-512F. Set by rwkvx_detect_simd(). */
static int rwkvx_have_vl = 0;

/* The fixed sum of sixteen lanes of the opt-in arithmetics' accumulators (_bf16dot.h,
 * _q4int8.h): lanes k and k + 8, then k and k + 4, then (0 + 2) + (1 + 3). */
static inline float rwkvx_tree16(const float *l)
{
    float h[8];
    for (int k = 0; k < 8; k++)
        h[k] = l[k] + l[k + 8];
    for (int k = 0; k < 4; k++)
        h[k] = h[k] + h[k + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
}

/* ---- scalar conversions ------------------------------------------------------------ */

static inline float rwkvx_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float rwkvx_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {                    /* inf or nan */
        bits = sign | 0x7f800000 | (mant << 13);
    } else if (exp != 0) {                /* normal */
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {               /* zero */
        bits = sign;
    } else {                              /* subnormal: renormalise */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define RWKVX_SCALAR_f32(p, j) ((p)[j])
#define RWKVX_SCALAR_bf16(p, j) rwkvx_bf16_to_f32((p)[j])
#define RWKVX_SCALAR_f16(p, j) rwkvx_f16_to_f32((p)[j])
#define RWKVX_SCALAR_u8(p, j) ((float)(p)[j])

/* Floats from one packed pair of tokens to the next (see rwkvx_pack_pair): one cache line
 * more than the values, so that the pairs a tile reads at once do not all fall in one L1
 * set, as a stride of a multiple of 4 KiB would put them. Measured on the 430M shape,
 * 256-token float32 prompt, medians of four interleaved runs: 301 tokens/s with the extra
 * line, 293 without -- a small gain, near the machine's run-to-run noise. */
static inline ptrdiff_t rwkvx_pack_stride(ptrdiff_t n) { return (n / 8) * 16 + 16; }

/* Stored weights to widen to float32 while a matrix-matrix product runs (see
 * rwkvx_gemm4_f32): the next block of rows, so that reading it from memory overlaps the
 * arithmetic on this block instead of stalling before the next. kind: RWKVX_WIDEN_*. */
enum { RWKVX_WIDEN_BF16 = 1, RWKVX_WIDEN_F16 = 2, RWKVX_WIDEN_U8 = 3 };
typedef struct {
    int kind;
    const void *src;
    float *dst;
    ptrdiff_t count;
} rwkvx_widen_job;

/* A uint8 product's per-token sums over its input (see _prepare_u8 in _matvec.pyx). */
typedef struct {
    float half_xr, x, mx;
    float scale;    /* int8 arithmetic (_int8.h): the input rounded to int8 is xr / scale */
} rwkvx_u8_sums;

/* What turns a uint8 matrix's raw dot products q . xr into its product, for rows from the
 * first one a kernel is given: y = ry (q . xr + half_xr) + my x + mx. */
typedef struct {
    const float *ry, *my;          /* per row */
    const rwkvx_u8_sums *sums;     /* per token */
} rwkvx_u8_affine;

/* y[0 .. count-1] (rows from the affine's first) for one token's sums. Every path finishes
 * uint8 products with these operations in this order, so their results are bit-identical;
 * rwkvx_gemm4_stored_pairs_avx512 repeats them on four rows at once in SSE registers (keep
 * the two in step). */
static inline void rwkvx_u8_finish(float *y, const float *ry, const float *my,
                                   const rwkvx_u8_sums *s, ptrdiff_t count)
{
    for (ptrdiff_t r = 0; r < count; r++)
        y[r] = ry[r] * (y[r] + s->half_xr) + my[r] * s->x + s->mx;
}

/* ---- portable loops ---------------------------------------------------------------- */

#define RWKVX_PORTABLE_DOT(TYPE, CTYPE)                                                     \
    static inline float rwkvx_dot_##TYPE##_portable(const CTYPE *w, const float *x,         \
                                                     ptrdiff_t n)                            \
    {                                                                                        \
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                             \
        ptrdiff_t j = 0;                                                                     \
        for (; j + 8 <= n; j += 8)                                                           \
            for (int k = 0; k < 8; k++)                                                      \
                acc[k] += RWKVX_SCALAR_##TYPE(w, j + k) * x[j + k];                          \
        float total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) +                              \
                      ((acc[2] + acc[6]) + (acc[3] + acc[7]));                               \
        for (; j < n; j++)                                                                   \
            total += RWKVX_SCALAR_##TYPE(w, j) * x[j];                                       \
        return total;                                                                        \
    }

RWKVX_PORTABLE_DOT(f32, float)
RWKVX_PORTABLE_DOT(bf16, uint16_t)
RWKVX_PORTABLE_DOT(f16, uint16_t)
RWKVX_PORTABLE_DOT(u8, uint8_t)

/* The input side of a uint8 product (see _prepare_u8 in _matvec.pyx): xr = rx * x, and
 * the sums of xr, of x and of mx * x in double, returned in sums[0..2]. Eight partial
 * sums each, reduced as rwkvx_sum8d does, so the AVX2 version's results are the same. */
static inline double rwkvx_sum8d(const double *a)
{
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* Columns from .. n - 1 (past the last whole step of eight), added to sums in order. */
static inline void rwkvx_prepare_u8_rest(const float *rx, const float *mx, const float *x,
                                         float *xr, ptrdiff_t from, ptrdiff_t n, double *sums)
{
    for (ptrdiff_t j = from; j < n; j++) {
        xr[j] = rx[j] * x[j];
        sums[0] += xr[j];
        sums[1] += x[j];
        sums[2] += (double)mx[j] * x[j];
    }
}

static inline void rwkvx_prepare_u8_portable(const float *rx, const float *mx, const float *x,
                                             float *xr, ptrdiff_t n, double *sums)
{
    double s_xr[8] = {0}, s_x[8] = {0}, s_mx[8] = {0};
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) {
            xr[j + k] = rx[j + k] * x[j + k];
            s_xr[k] += xr[j + k];
            s_x[k] += x[j + k];
            s_mx[k] += (double)mx[j + k] * x[j + k];
        }
    sums[0] = rwkvx_sum8d(s_xr);
    sums[1] = rwkvx_sum8d(s_x);
    sums[2] = rwkvx_sum8d(s_mx);
    rwkvx_prepare_u8_rest(rx, mx, x, xr, j, n, sums);
}

/* ---- AVX2 + FMA loops --------------------------------------------------------------- */

#if RWKVX_HAVE_X86_DISPATCH
#define RWKVX_AVX2 __attribute__((target("avx2,fma,f16c")))

/* Eight weights widened to float32 in registers: the weights are never stored as floats. */
RWKVX_AVX2 static inline __m256 rwkvx_load8_f32(const float *p) { return _mm256_loadu_ps(p); }

RWKVX_AVX2 static inline __m256 rwkvx_load8_bf16(const uint16_t *p)
{
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

RWKVX_AVX2 static inline __m256 rwkvx_load8_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

RWKVX_AVX2 static inline __m256 rwkvx_load8_u8(const uint8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

RWKVX_AVX2 static inline float rwkvx_hsum256(__m256 v)
{
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The four horizontal sums of a, b, c, d in one register. */
RWKVX_AVX2 static inline __m128 rwkvx_hsum4x256(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* Blocks of four rows this large or larger are prefetched into L2, not L1: the next block
 * arriving in L1 while this one streams through it (with x beside them) evicted lines still
 * to be read. Measured on Zen 4, 2 threads, matrix-vector products from memory, interleaved
 * (GB/s, L1 -> L2 hint): bfloat16 1024 x 1024 13.9 -> 25.4, 1024 x 4096 20.0 -> 31.9,
 * 2048 x 8192 23.1 -> 36.4; float32 4096 x 1024 18.6 -> 30.0; uint8 1024 x 4096 24.5 -> 34.0.
 * uint8 blocks of 4 KB (1024 columns) stay faster with L1 (34.8 against 21.0). */
#define RWKVX_DOT4_L2_BLOCK 8192

/* dot1: one row, for the last rows of a matrix that do not fill a block of four.
 * dot4: four consecutive rows (stride apart) at once: each x load serves four rows, four
 * independent streams keep more memory requests in flight, and one transposing reduction
 * finishes all four sums. The hardware prefetcher falls behind on four interleaved
 * streams, so the next block of four rows (contiguous) is prefetched at the pace this one
 * is consumed, one cache line per 64 bytes read. Measured on the 169M shape, 2 threads:
 * uint8 reads 8 -> 25 GB/s.
 * dot4x: dot4's loop for T tokens at once (dot4 is T = 1), each token's sums dot4's (the
 * same lanes, order, tail and reduction), the rows read and widened once for all T: for a
 * few tokens (batched decoding of a few sequences, a prompt's last rows) the matrix-matrix
 * tiles, which widen every block of rows into memory and read it back, cost more than the
 * multiply-adds (measured: README, Speed). out[t ldo + r] for token t (X + t ldx) and row
 * r; T a constant at every call. The AVX-512 level compiles the same loop with 32 vector
 * registers, which hold four tokens' sixteen accumulators; AVX2's sixteen hold two
 * tokens'. */
#define RWKVX_DOT4X_BODY(TYPE, CTYPE)                                                         \
    const CTYPE *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;         \
    const char *ahead = (const char *)(w + 4 * stride);                                        \
    const ptrdiff_t step_bytes = 4 * 8 * (ptrdiff_t)sizeof(CTYPE);                             \
    const int l2 = 4 * n * (ptrdiff_t)sizeof(CTYPE) >= RWKVX_DOT4_L2_BLOCK;                    \
    __m256 a[4][4];                                                                            \
    for (int t = 0; t < T; t++)                                                                \
        for (int r = 0; r < 4; r++)                                                            \
            a[t][r] = _mm256_setzero_ps();                                                     \
    ptrdiff_t j = 0;                                                                           \
    for (; j + 8 <= n; j += 8) {                                                               \
        const char *pf = ahead + (j / 8) * step_bytes;                                         \
        for (ptrdiff_t b = 0; prefetch && b < step_bytes; b += 64) {                           \
            if (l2) _mm_prefetch(pf + b, _MM_HINT_T1);                                         \
            else _mm_prefetch(pf + b, _MM_HINT_T0);                                            \
        }                                                                                      \
        const __m256 v0 = rwkvx_load8_##TYPE(w0 + j), v1 = rwkvx_load8_##TYPE(w1 + j);         \
        const __m256 v2 = rwkvx_load8_##TYPE(w2 + j), v3 = rwkvx_load8_##TYPE(w3 + j);         \
        for (int t = 0; t < T; t++) {                                                          \
            const __m256 xv = _mm256_loadu_ps(X + t * ldx + j);                                \
            a[t][0] = _mm256_fmadd_ps(v0, xv, a[t][0]);                                        \
            a[t][1] = _mm256_fmadd_ps(v1, xv, a[t][1]);                                        \
            a[t][2] = _mm256_fmadd_ps(v2, xv, a[t][2]);                                        \
            a[t][3] = _mm256_fmadd_ps(v3, xv, a[t][3]);                                        \
        }                                                                                      \
    }                                                                                          \
    for (int t = 0; t < T; t++) {                                                              \
        float *o = out + t * ldo;                                                              \
        const float *x = X + t * ldx;                                                          \
        _mm_storeu_ps(o, rwkvx_hsum4x256(a[t][0], a[t][1], a[t][2], a[t][3]));                 \
        for (ptrdiff_t k = j; k < n; k++) {                                                    \
            o[0] += RWKVX_SCALAR_##TYPE(w0, k) * x[k];                                         \
            o[1] += RWKVX_SCALAR_##TYPE(w1, k) * x[k];                                         \
            o[2] += RWKVX_SCALAR_##TYPE(w2, k) * x[k];                                         \
            o[3] += RWKVX_SCALAR_##TYPE(w3, k) * x[k];                                         \
        }                                                                                      \
    }

#define RWKVX_AVX512VL __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))

/* dot4x's loop for T tokens (a constant), compiled for the target ATTR */
#define RWKVX_DOT4X_T(TYPE, CTYPE, SUFFIX, ATTR)                                              \
    ATTR static inline __attribute__((always_inline)) void                                    \
    rwkvx_dot4x_##TYPE##_##SUFFIX##_t(const CTYPE *w, ptrdiff_t stride, const float *X,       \
                                      ptrdiff_t ldx, const int T, ptrdiff_t n, float *out,    \
                                      ptrdiff_t ldo, int prefetch)                            \
    {                                                                                          \
        RWKVX_DOT4X_BODY(TYPE, CTYPE)                                                         \
    }

#define RWKVX_DOT4X(TYPE, CTYPE)                                                              \
    RWKVX_DOT4X_T(TYPE, CTYPE, avx2, RWKVX_AVX2)                                              \
    RWKVX_DOT4X_T(TYPE, CTYPE, vl, RWKVX_AVX512VL)                                            \
    /* T tokens, two at a time (AVX2's registers) */                                         \
    RWKVX_AVX2 static void rwkvx_dot4x_##TYPE##_avx2(const CTYPE *w, ptrdiff_t stride,         \
                                                     const float *X, ptrdiff_t ldx, int T,    \
                                                     ptrdiff_t n, float *out, ptrdiff_t ldo)  \
    {                                                                                          \
        for (int t = 0; t < T; t += 2) {                                                       \
            if (T - t >= 2)                                                                    \
                rwkvx_dot4x_##TYPE##_avx2_t(w, stride, X + t * ldx, ldx, 2, n, out + t * ldo,  \
                                            ldo, t == 0);                                      \
            else                                                                               \
                rwkvx_dot4x_##TYPE##_avx2_t(w, stride, X + t * ldx, ldx, 1, n, out + t * ldo,  \
                                            ldo, t == 0);                                      \
        }                                                                                      \
    }                                                                                          \
    /* T (1 to RWKVX_FEW_TOKENS = 4) tokens at once */                                        \
    RWKVX_AVX512VL static void rwkvx_dot4x_##TYPE##_vl(const CTYPE *w, ptrdiff_t stride,        \
                                                      const float *X, ptrdiff_t ldx, int T,   \
                                                      ptrdiff_t n, float *out, ptrdiff_t ldo) \
    {                                                                                          \
        switch (T) {                                                                           \
        case 1: rwkvx_dot4x_##TYPE##_vl_t(w, stride, X, ldx, 1, n, out, ldo, 1); return;       \
        case 2: rwkvx_dot4x_##TYPE##_vl_t(w, stride, X, ldx, 2, n, out, ldo, 1); return;       \
        case 3: rwkvx_dot4x_##TYPE##_vl_t(w, stride, X, ldx, 3, n, out, ldo, 1); return;       \
        case 4: rwkvx_dot4x_##TYPE##_vl_t(w, stride, X, ldx, 4, n, out, ldo, 1); return;       \
        }                                                                                      \
    }

RWKVX_DOT4X(f32, float)
RWKVX_DOT4X(bf16, uint16_t)
RWKVX_DOT4X(f16, uint16_t)
RWKVX_DOT4X(u8, uint8_t)

#define RWKVX_AVX2_DOTS(TYPE, CTYPE)                                                          \
    RWKVX_AVX2 static float rwkvx_dot_##TYPE##_avx2(const CTYPE *w, const float *x, ptrdiff_t n) \
    {                                                                                          \
        __m256 acc = _mm256_setzero_ps();                                                      \
        ptrdiff_t j = 0;                                                                       \
        for (; j + 8 <= n; j += 8)                                                             \
            acc = _mm256_fmadd_ps(rwkvx_load8_##TYPE(w + j), _mm256_loadu_ps(x + j), acc);     \
        float total = rwkvx_hsum256(acc);                                                      \
        for (; j < n; j++)                                                                     \
            total += RWKVX_SCALAR_##TYPE(w, j) * x[j];                                         \
        return total;                                                                          \
    }                                                                                          \
    RWKVX_AVX2 static inline void rwkvx_dot4_##TYPE##_avx2_pf(const CTYPE *w, ptrdiff_t stride, \
                                                              const float *x, ptrdiff_t n,    \
                                                              float *out4, int prefetch)      \
    {                                                                                          \
        rwkvx_dot4x_##TYPE##_avx2_t(w, stride, x, 0, 1, n, out4, 0, prefetch);                 \
    }                                                                                          \
    RWKVX_AVX2 static void rwkvx_dot4_##TYPE##_avx2(const CTYPE *w, ptrdiff_t stride,          \
                                                    const float *x, ptrdiff_t n, float *out4)  \
    {                                                                                          \
        rwkvx_dot4_##TYPE##_avx2_pf(w, stride, x, n, out4, 1);                                 \
    }

RWKVX_AVX2_DOTS(f32, float)
RWKVX_AVX2_DOTS(bf16, uint16_t)
RWKVX_AVX2_DOTS(f16, uint16_t)
RWKVX_AVX2_DOTS(u8, uint8_t)


/* Widen n stored weights to float32 (exact for every type), for the matrix-matrix path. */
#define RWKVX_AVX2_WIDEN(TYPE, CTYPE)                                                         \
    RWKVX_AVX2 static void rwkvx_widen_##TYPE##_avx2(const CTYPE *p, float *out, ptrdiff_t n)  \
    {                                                                                          \
        ptrdiff_t j = 0;                                                                       \
        for (; j + 8 <= n; j += 8)                                                             \
            _mm256_storeu_ps(out + j, rwkvx_load8_##TYPE(p + j));                              \
        for (; j < n; j++)                                                                     \
            out[j] = RWKVX_SCALAR_##TYPE(p, j);                                                \
    }

RWKVX_AVX2_WIDEN(bf16, uint16_t)
RWKVX_AVX2_WIDEN(f16, uint16_t)
RWKVX_AVX2_WIDEN(u8, uint8_t)

/* rwkvx_prepare_u8_portable in registers: lanes 0-3 of the partial sums in one register of
 * doubles, lanes 4-7 in another. A single chain of scalar double adds made this loop 3% of
 * an 8-sequence uint8 batch step. */
RWKVX_AVX2 static void rwkvx_prepare_u8_avx2(const float *rx, const float *mx, const float *x,
                                            float *xr, ptrdiff_t n, double *sums)
{
    __m256d xr_lo = _mm256_setzero_pd(), xr_hi = _mm256_setzero_pd();
    __m256d x_lo = _mm256_setzero_pd(), x_hi = _mm256_setzero_pd();
    __m256d mx_lo = _mm256_setzero_pd(), mx_hi = _mm256_setzero_pd();
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 xv = _mm256_loadu_ps(x + j), mv = _mm256_loadu_ps(mx + j);
        __m256 r = _mm256_mul_ps(_mm256_loadu_ps(rx + j), xv);
        _mm256_storeu_ps(xr + j, r);
        __m256d xl = _mm256_cvtps_pd(_mm256_castps256_ps128(xv));
        __m256d xh = _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1));
        xr_lo = _mm256_add_pd(xr_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(r)));
        xr_hi = _mm256_add_pd(xr_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)));
        x_lo = _mm256_add_pd(x_lo, xl);
        x_hi = _mm256_add_pd(x_hi, xh);
        mx_lo = _mm256_add_pd(mx_lo, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(mv)), xl));
        mx_hi = _mm256_add_pd(mx_hi, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(mv, 1)), xh));
    }
    double a[8];
    _mm256_storeu_pd(a, xr_lo);
    _mm256_storeu_pd(a + 4, xr_hi);
    sums[0] = rwkvx_sum8d(a);
    _mm256_storeu_pd(a, x_lo);
    _mm256_storeu_pd(a + 4, x_hi);
    sums[1] = rwkvx_sum8d(a);
    _mm256_storeu_pd(a, mx_lo);
    _mm256_storeu_pd(a + 4, mx_hi);
    sums[2] = rwkvx_sum8d(a);
    rwkvx_prepare_u8_rest(rx, mx, x, xr, j, n, sums);
}

/* Y[t, r] = dot(w + r * ldw, X + t * ldx) for four rows r and n_tok tokens t: the
 * matrix-matrix product of sequence mode and batched decoding. Three tokens at a time
 * keep twelve accumulators in registers, so each weight vector loaded serves three
 * tokens. Every (t, r) pair is summed exactly as rwkvx_dot4_f32_avx2 sums row r against
 * one vector -- one accumulator over steps of 8, the same four-way reduction, the same
 * scalar tail -- so a token's result does not depend on the tokens processed with it. */
RWKVX_AVX2 static void rwkvx_gemm4_f32_avx2(const float *w, ptrdiff_t ldw, const float *X,
                                           ptrdiff_t ldx, ptrdiff_t n_tok, ptrdiff_t n,
                                           float *Y, ptrdiff_t ldy)
{
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    ptrdiff_t t = 0;
    for (; t + 3 <= n_tok; t += 3) {
        const float *x0 = X + t * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx;
        __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c02 = _mm256_setzero_ps(),
               c03 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(),
               c12 = _mm256_setzero_ps(), c13 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(),
               c21 = _mm256_setzero_ps(), c22 = _mm256_setzero_ps(), c23 = _mm256_setzero_ps();
        ptrdiff_t j = 0;
        for (; j + 8 <= n; j += 8) {
            __m256 a = _mm256_loadu_ps(x0 + j), b = _mm256_loadu_ps(x1 + j), c = _mm256_loadu_ps(x2 + j);
            __m256 v = _mm256_loadu_ps(w0 + j);
            c00 = _mm256_fmadd_ps(v, a, c00);
            c10 = _mm256_fmadd_ps(v, b, c10);
            c20 = _mm256_fmadd_ps(v, c, c20);
            v = _mm256_loadu_ps(w1 + j);
            c01 = _mm256_fmadd_ps(v, a, c01);
            c11 = _mm256_fmadd_ps(v, b, c11);
            c21 = _mm256_fmadd_ps(v, c, c21);
            v = _mm256_loadu_ps(w2 + j);
            c02 = _mm256_fmadd_ps(v, a, c02);
            c12 = _mm256_fmadd_ps(v, b, c12);
            c22 = _mm256_fmadd_ps(v, c, c22);
            v = _mm256_loadu_ps(w3 + j);
            c03 = _mm256_fmadd_ps(v, a, c03);
            c13 = _mm256_fmadd_ps(v, b, c13);
            c23 = _mm256_fmadd_ps(v, c, c23);
        }
        float *y0 = Y + t * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy;
        _mm_storeu_ps(y0, rwkvx_hsum4x256(c00, c01, c02, c03));
        _mm_storeu_ps(y1, rwkvx_hsum4x256(c10, c11, c12, c13));
        _mm_storeu_ps(y2, rwkvx_hsum4x256(c20, c21, c22, c23));
        for (; j < n; j++) {
            y0[0] += w0[j] * x0[j]; y0[1] += w1[j] * x0[j]; y0[2] += w2[j] * x0[j]; y0[3] += w3[j] * x0[j];
            y1[0] += w0[j] * x1[j]; y1[1] += w1[j] * x1[j]; y1[2] += w2[j] * x1[j]; y1[3] += w3[j] * x1[j];
            y2[0] += w0[j] * x2[j]; y2[1] += w1[j] * x2[j]; y2[2] += w2[j] * x2[j]; y2[3] += w3[j] * x2[j];
        }
    }
    /* the last tokens: dot4 without its prefetch, since w may be a thread's buffer of
     * widened rows and what lies past it is another thread's, being written (fetching it
     * made the lines bounce between cores and halved 8-token bf16/u8 products) */
    for (; t < n_tok; t++)
        rwkvx_dot4_f32_avx2_pf(w, ldw, X + t * ldx, n, Y + t * ldy, 0);
}

/* ---- AVX-512 loops ------------------------------------------------------------------
 * Matrix-matrix products only. Matrix-vector products stay AVX2 at every level: measured
 * on a 2-core Xeon (430M model, 2 threads), 16-lane loops made bfloat16 decode slower,
 * 37.9 against 29.7 ms/token, and so did 16-element steps in AVX2 (the prefetch stops
 * keeping up). So the AVX-512 product keeps the AVX2 summation order exactly -- eight
 * lanes per (row, token), steps of eight, the same reduction and tail -- and gets its
 * width from pairs of tokens instead: one 16-lane register holds the eight lanes of token
 * t in its low half and those of token t + 1 in its high half. The chunk's inputs are
 * first packed in that layout (rwkvx_pack_pair); each weight vector is broadcast to both
 * halves. Results are bit-identical to the AVX2 loops, at twice their arithmetic rate. */
#define RWKVX_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

RWKVX_AVX512 static inline __m512 rwkvx_load16_bf16(const uint16_t *p)
{
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

RWKVX_AVX512 static inline __m512 rwkvx_load16_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

RWKVX_AVX512 static inline __m512 rwkvx_load16_u8(const uint8_t *p)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* Values j .. j + 15 of stored weights of a widening kind (a constant at every call). */
RWKVX_AVX512 static inline __attribute__((always_inline)) __m512
rwkvx_load16_kind(const int kind, const void *src, ptrdiff_t j)
{
    if (kind == RWKVX_WIDEN_U8)
        return rwkvx_load16_u8((const uint8_t *)src + j);
    if (kind == RWKVX_WIDEN_BF16)
        return rwkvx_load16_bf16((const uint16_t *)src + j);
    return rwkvx_load16_f16((const uint16_t *)src + j);
}

/* Value j of stored weights of a widening kind, as float32 (exact). */
static inline float rwkvx_scalar_kind(const int kind, const void *src, ptrdiff_t j)
{
    return kind == RWKVX_WIDEN_U8 ? RWKVX_SCALAR_u8((const uint8_t *)src, j)
         : kind == RWKVX_WIDEN_BF16 ? RWKVX_SCALAR_bf16((const uint16_t *)src, j)
                                    : RWKVX_SCALAR_f16((const uint16_t *)src, j);
}

/* Values src[off .. off + count - 1] of a widening kind (a constant at every call),
 * widened to float32 in dst: the AVX-512 widening loop, for whole jobs and for the stored
 * tile's spans alike. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_widen_span_avx512(const int kind, const void *src, ptrdiff_t off, float *dst,
                        ptrdiff_t count)
{
    ptrdiff_t j = 0;
    for (; j + 16 <= count; j += 16)
        _mm512_storeu_ps(dst + j, rwkvx_load16_kind(kind, src, off + j));
    for (; j < count; j++)
        dst[j] = rwkvx_scalar_kind(kind, src, off + j);
}

#define RWKVX_AVX512_WIDEN(TYPE, CTYPE, KIND)                                                 \
    RWKVX_AVX512 static void rwkvx_widen_##TYPE##_avx512(const CTYPE *p, float *out,           \
                                                         ptrdiff_t n)                          \
    {                                                                                          \
        rwkvx_widen_span_avx512(KIND, p, 0, out, n);                                           \
    }

RWKVX_AVX512_WIDEN(bf16, uint16_t, RWKVX_WIDEN_BF16)
RWKVX_AVX512_WIDEN(f16, uint16_t, RWKVX_WIDEN_F16)
RWKVX_AVX512_WIDEN(u8, uint8_t, RWKVX_WIDEN_U8)

/* Values off .. off + 31 of a widening job of the given kind, prefetching a kilobyte ahead
 * (the loads come a few at a time between multiply-adds, too sparse for the hardware
 * prefetcher). kind is a constant at every call, so no test of it is left in the loop. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_widen32_avx512(const int kind, const void *src, float *dst, ptrdiff_t off)
{
    const ptrdiff_t size = kind == RWKVX_WIDEN_U8 ? 1 : 2;
    /* a line of stored bytes per 64: every step for 16-bit kinds, every other for uint8 */
    if ((off * size) % 64 == 0)
        _mm_prefetch((const char *)src + off * size + 1024, _MM_HINT_T0);
    _mm512_storeu_ps(dst + off, rwkvx_load16_kind(kind, src, off));
    _mm512_storeu_ps(dst + off + 16, rwkvx_load16_kind(kind, src, off + 16));
}

/* The four rows' sums for token h (0 or 1) of a pair: the eight lanes of that half of each
 * accumulator, reduced as the AVX2 loops reduce them. */
RWKVX_AVX512 static inline __attribute__((always_inline)) __m128
rwkvx_pair_sums4_avx512(const __m512 c[4], int h)
{
    __m256 s[4];
    for (int r = 0; r < 4; r++)
        s[r] = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c[r]), 1))
                 : _mm512_castps512_ps256(c[r]);
    return rwkvx_hsum4x256(s[0], s[1], s[2], s[3]);
}

/* One step of eight columns: rows w + r * ldw (eight floats each, broadcast to both halves)
 * times NP packed pairs P + a * ldp, added to the accumulators c[a][r]. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_tile_step_avx512(const float *w, ptrdiff_t ldw, const float *P, ptrdiff_t ldp, const int NP,
                       __m512 c[6][4])
{
    __m512 v[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
        v[r] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)(w + r * ldw))));
#pragma GCC unroll 6
    for (int a = 0; a < NP; a++) {
        __m512 xv = _mm512_loadu_ps(P + a * ldp);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            c[a][r] = _mm512_fmadd_ps(v[r], xv, c[a][r]);
    }
}

/* Four rows against NP packed pairs of tokens (tokens t0 .. t0 + 2 NP - 1, those below
 * n_tok written): 4 x NP accumulators, 24 of the 32 registers at NP = 6. NP and kind are
 * constants at every call, so the loops unroll and the accumulators stay in registers.
 * kind (0 for none): job's kind, whose values this tile widens from the start; returns
 * how many. */
RWKVX_AVX512 static inline __attribute__((always_inline)) ptrdiff_t
rwkvx_gemm4_pairs_avx512(const float *w, ptrdiff_t ldw, const float *P, ptrdiff_t ldp,
                         const int NP, const float *X, ptrdiff_t ldx, ptrdiff_t t0,
                         ptrdiff_t n_tok, ptrdiff_t n, float *Y, ptrdiff_t ldy,
                         const int kind, const rwkvx_widen_job *job)
{
    const ptrdiff_t n8 = n / 8;
    /* the job's values are widened 32 per step: four rows of n take n / 8 steps */
    const ptrdiff_t job_steps = kind ? (job->count / 32 < n8 ? job->count / 32 : n8) : 0;
    const void *src = kind ? job->src : NULL;
    float *dst = kind ? job->dst : NULL;
    __m512 c[6][4];
#pragma GCC unroll 24
    for (int k = 0; k < NP * 4; k++)
        c[k / 4][k % 4] = _mm512_setzero_ps();
    for (ptrdiff_t b = 0; b < n8; b++) {
        if (kind && b < job_steps)
            rwkvx_widen32_avx512(kind, src, dst, 32 * b);
        rwkvx_tile_step_avx512(w + 8 * b, ldw, P + 16 * b, ldp, NP, c);
    }
#pragma GCC unroll 6
    for (int a = 0; a < NP; a++) {
        for (int h = 0; h < 2; h++) {
            ptrdiff_t t = t0 + 2 * a + h;
            if (t >= n_tok)
                break;
            const float *x = X + t * ldx;
            float *y = Y + t * ldy;
            _mm_storeu_ps(y, rwkvx_pair_sums4_avx512(c[a], h));
            for (ptrdiff_t k = 8 * n8; k < n; k++) {
                y[0] += w[k] * x[k];
                y[1] += w[ldw + k] * x[k];
                y[2] += w[2 * ldw + k] * x[k];
                y[3] += w[3 * ldw + k] * x[k];
            }
        }
    }
    return 32 * job_steps;
}

/* TILE(NP), a statement that returns, with NP the constant np (1 to 6): the tiles' pair
 * count must be a constant for their loops to unroll and accumulators to stay in registers. */
#define RWKVX_FOR_PAIRS(np, TILE) \
    switch (np) {                 \
    case 6: TILE(6);              \
    case 5: TILE(5);              \
    case 4: TILE(4);              \
    case 3: TILE(3);              \
    case 2: TILE(2);              \
    default: TILE(1);             \
    }

/* One tile of np pairs (1 to 6) from pair a, widening job if kind is not 0; returns how many
 * of its values it widened. */
RWKVX_AVX512 static inline __attribute__((always_inline)) ptrdiff_t
rwkvx_gemm4_tile_avx512(const float *w, ptrdiff_t ldw, const float *X, ptrdiff_t ldx,
                        const float *P, ptrdiff_t a, ptrdiff_t np, ptrdiff_t n_tok, ptrdiff_t n,
                        float *Y, ptrdiff_t ldy, const int kind, const rwkvx_widen_job *job)
{
    const ptrdiff_t ldp = rwkvx_pack_stride(n);
    const float *p = P + a * ldp;
#define RWKVX_TILE(NP) \
    return rwkvx_gemm4_pairs_avx512(w, ldw, p, ldp, NP, X, ldx, 2 * a, n_tok, n, Y, ldy, kind, job)
    RWKVX_FOR_PAIRS(np, RWKVX_TILE);
#undef RWKVX_TILE
}

/* The tiles from pair a on, none of them widening. */
RWKVX_AVX512 static void rwkvx_gemm4_tiles_avx512(const float *w, ptrdiff_t ldw, const float *X,
                                                 ptrdiff_t ldx, const float *P, ptrdiff_t a,
                                                 ptrdiff_t n_tok, ptrdiff_t n, float *Y,
                                                 ptrdiff_t ldy)
{
    const ptrdiff_t n_pairs = (n_tok + 1) / 2;
    for (; a < n_pairs; a += 6)
        rwkvx_gemm4_tile_avx512(w, ldw, X, ldx, P, a, n_pairs - a < 6 ? n_pairs - a : 6, n_tok,
                                n, Y, ldy, 0, NULL);
}

/* The first tile (up to six pairs) widens job, of kind `kind`, then the other tiles follow.
 * One copy per kind: measured on 8-token uint8 products of 4096 x 1024 (2 threads), one
 * loop testing the job's kind at every step took 0.41 ms, a loop made for uint8 0.32. */
RWKVX_AVX512 static inline __attribute__((always_inline)) ptrdiff_t
rwkvx_gemm4_widening_avx512(const float *w, ptrdiff_t ldw, const float *X, ptrdiff_t ldx,
                            const float *P, ptrdiff_t n_tok, ptrdiff_t n, float *Y, ptrdiff_t ldy,
                            const int kind, const rwkvx_widen_job *job)
{
    const ptrdiff_t n_pairs = (n_tok + 1) / 2, first = n_pairs < 6 ? n_pairs : 6;
    ptrdiff_t widened = rwkvx_gemm4_tile_avx512(w, ldw, X, ldx, P, 0, first, n_tok, n, Y, ldy,
                                                kind, job);
    if (first < n_pairs)
        rwkvx_gemm4_tiles_avx512(w, ldw, X, ldx, P, first, n_tok, n, Y, ldy);
    return widened;
}

/* Returns how many of job's values it widened (from the start). */
RWKVX_AVX512 static ptrdiff_t rwkvx_gemm4_f32_avx512(const float *w, ptrdiff_t ldw, const float *X,
                                                    ptrdiff_t ldx, const float *P, ptrdiff_t n_tok,
                                                    ptrdiff_t n, float *Y, ptrdiff_t ldy,
                                                    const rwkvx_widen_job *job)
{
#define RWKVX_WIDENING(KIND) \
    rwkvx_gemm4_widening_avx512(w, ldw, X, ldx, P, n_tok, n, Y, ldy, KIND, job)
    switch (job ? job->kind : 0) {
    case RWKVX_WIDEN_BF16: return RWKVX_WIDENING(RWKVX_WIDEN_BF16);
    case RWKVX_WIDEN_F16: return RWKVX_WIDENING(RWKVX_WIDEN_F16);
    case RWKVX_WIDEN_U8: return RWKVX_WIDENING(RWKVX_WIDEN_U8);
    default:
        rwkvx_gemm4_tiles_avx512(w, ldw, X, ldx, P, 0, n_tok, n, Y, ldy);
        return 0;
    }
#undef RWKVX_WIDENING
}

/* Columns per step of rwkvx_gemm4_stored_avx512's widening. */
#define RWKVX_SPAN 64

/* How far ahead rwkvx_gemm4_stored_pairs_avx512 prefetches rows of at least
 * RWKVX_ROW_PREFETCH_BYTES: the same columns RWKVX_PREFETCH_SPANS spans on, in each of the
 * four rows. */
#define RWKVX_ROW_PREFETCH_BYTES 2048
#define RWKVX_PREFETCH_SPANS 8

/* For the stored tile at column col of the block at src (four rows of n, n8 whole steps of
 * eight): the lines RWKVX_PREFETCH_SPANS spans ahead in each row, those of the next block
 * (next, or NULL) once past this block's end. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_prefetch_rows_ahead(const char *src, const char *next, ptrdiff_t n, ptrdiff_t n8,
                          ptrdiff_t col, const ptrdiff_t size)
{
    ptrdiff_t ahead = col + RWKVX_PREFETCH_SPANS * RWKVX_SPAN;
    const char *base = src;
    if (ahead >= 8 * n8) {
        ahead -= 8 * n8;
        base = next;
    }
    if (base == NULL || ahead >= 8 * n8)
        return;
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 2
        for (ptrdiff_t line = 0; line < RWKVX_SPAN * size; line += 64)
            _mm_prefetch(base + (r * n + ahead) * size + line, _MM_HINT_T0);
}

/* As rwkvx_gemm4_pairs_avx512, for four rows of stored weights (kind, row stride n) against
 * NP pairs of tokens, all the tile there is, finishing them as uint8 products if u8 is not
 * NULL (as rwkvx_u8_finish would): the rows are widened RWKVX_SPAN columns at a
 * time into 1 KiB on the stack just before their multiply-adds, while lines ahead are
 * prefetched. Widening the whole next block into a 16 KiB buffer instead kept it, the block
 * being multiplied and the packed inputs (32 KiB at 8 tokens of 1024) in use at once, more
 * than L1's 48 KiB: in a C harness, 8-token uint8 products of 4096 x 1024, 2 threads,
 * streaming, took 0.360-0.367 ms that way and 0.336-0.338 this way (1024 x 4096:
 * 0.412-0.414 and 0.384-0.399).
 * What to prefetch: rows shorter than RWKVX_ROW_PREFETCH_BYTES, the next block (next, or
 * NULL) in as many equal consecutive parts as this block has spans; longer rows, each row
 * RWKVX_PREFETCH_SPANS spans ahead. Measured in that harness (medians of two runs of
 * seven; linear / rows ahead): uint8 4096 x 1024 0.33 / 0.36 ms, 3072 x 768 0.18 / 0.18,
 * 1024 x 4096 0.36 / 0.31, 768 x 3072 0.20 / 0.19; bfloat16 3072 x 768 0.26 / 0.29,
 * 4096 x 1024 0.50 / 0.48, 1024 x 4096 0.52 / 0.37, 768 x 3072 0.30 / 0.21. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_gemm4_stored_pairs_avx512(const int kind, const void *src, const void *next,
                                const float *P, ptrdiff_t ldp, const int NP, const float *X,
                                ptrdiff_t ldx, ptrdiff_t n_tok, ptrdiff_t n, float *Y,
                                ptrdiff_t ldy, const rwkvx_u8_affine *u8)
{
    const ptrdiff_t n8 = n / 8, size = kind == RWKVX_WIDEN_U8 ? 1 : 2;
    const int by_row = n * size >= RWKVX_ROW_PREFETCH_BYTES;
    float wb[4][RWKVX_SPAN] __attribute__((aligned(64)));
    __m512 c[6][4];
#pragma GCC unroll 24
    for (int k = 0; k < NP * 4; k++)
        c[k / 4][k % 4] = _mm512_setzero_ps();
    for (ptrdiff_t b0 = 0; b0 < n8; b0 += RWKVX_SPAN / 8) {
        const ptrdiff_t steps = n8 - b0 < RWKVX_SPAN / 8 ? n8 - b0 : RWKVX_SPAN / 8;
        /* the next block's bytes in as many equal parts as this block has spans */
        const char *pf = next && !by_row ? (const char *)next + 4 * 8 * b0 * size : NULL;
        if (by_row)
            rwkvx_prefetch_rows_ahead((const char *)src, (const char *)next, n, n8, 8 * b0, size);
        if (steps == RWKVX_SPAN / 8) {
            /* whole spans, the usual case, with constant counts so the loops unroll */
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                rwkvx_widen_span_avx512(kind, src, r * n + 8 * b0, wb[r], RWKVX_SPAN);
            if (pf)
#pragma GCC unroll 8
                for (int line = 0; line < 4 * RWKVX_SPAN * size; line += 64)
                    _mm_prefetch(pf + line, _MM_HINT_T0);
        } else {
            for (int r = 0; r < 4; r++)
                rwkvx_widen_span_avx512(kind, src, r * n + 8 * b0, wb[r], 8 * steps);
            if (pf)
                for (ptrdiff_t line = 0; line < 4 * 8 * steps * size; line += 64)
                    _mm_prefetch(pf + line, _MM_HINT_T0);
        }
        for (ptrdiff_t s = 0; s < steps; s++) {
            rwkvx_tile_step_avx512(wb[0] + 8 * s, RWKVX_SPAN, P + 16 * (b0 + s), ldp, NP, c);
        }
    }
    /* uint8: finished here (rwkvx_u8_finish's operations in its order, four rows at once)
     * unless a tail of columns is still to be added. Finishing the stored sums row by row
     * afterwards took 3.8% of a 430M 8-sequence uint8 step (perf, one thread); alternating
     * runs on 2 threads, step medians 35.1 -> 34.3 ms. */
    const int finish = u8 != NULL && 8 * n8 == n;
    const __m128 ry = finish ? _mm_loadu_ps(u8->ry) : _mm_setzero_ps();
    const __m128 my = finish ? _mm_loadu_ps(u8->my) : _mm_setzero_ps();
#pragma GCC unroll 6
    for (int a = 0; a < NP; a++) {
        for (int h = 0; h < 2; h++) {
            ptrdiff_t t = 2 * a + h;
            if (t >= n_tok)
                break;
            const float *x = X + t * ldx;
            float *y = Y + t * ldy;
            __m128 sums = rwkvx_pair_sums4_avx512(c[a], h);
            if (finish) {
                const rwkvx_u8_sums *s = u8->sums + t;
                sums = _mm_mul_ps(ry, _mm_add_ps(sums, _mm_set1_ps(s->half_xr)));
                sums = _mm_add_ps(sums, _mm_mul_ps(my, _mm_set1_ps(s->x)));
                sums = _mm_add_ps(sums, _mm_set1_ps(s->mx));
            }
            _mm_storeu_ps(y, sums);
            for (ptrdiff_t k = 8 * n8; k < n; k++) {
                for (int r = 0; r < 4; r++)
                    y[r] += rwkvx_scalar_kind(kind, src, r * n + k) * x[k];
            }
            if (u8 != NULL && !finish)
                rwkvx_u8_finish(y, u8->ry, u8->my, u8->sums + t, 4);
        }
    }
}

/* The tile of np (1 to 6) pairs for rwkvx_gemm4_stored. */
RWKVX_AVX512 static inline __attribute__((always_inline)) void
rwkvx_gemm4_stored_kind_avx512(const int kind, const void *src, const void *next, const float *X,
                               const float *P, ptrdiff_t np, ptrdiff_t n_tok, ptrdiff_t n,
                               float *Y, ptrdiff_t ldy, const rwkvx_u8_affine *u8)
{
    const ptrdiff_t ldp = rwkvx_pack_stride(n);
#define RWKVX_TILE(NP) \
    rwkvx_gemm4_stored_pairs_avx512(kind, src, next, P, ldp, NP, X, n, n_tok, n, Y, ldy, u8); return
    RWKVX_FOR_PAIRS(np, RWKVX_TILE);
#undef RWKVX_TILE
}

RWKVX_AVX512 static void rwkvx_gemm4_stored_avx512(int kind, const void *src, const void *next,
                                                  const float *X, const float *P, ptrdiff_t n_tok,
                                                  ptrdiff_t n, float *Y, ptrdiff_t ldy,
                                                  const rwkvx_u8_affine *u8)
{
    const ptrdiff_t np = (n_tok + 1) / 2;
    switch (kind) {
    case RWKVX_WIDEN_U8:
        rwkvx_gemm4_stored_kind_avx512(RWKVX_WIDEN_U8, src, next, X, P, np, n_tok, n, Y, ldy, u8);
        return;
    case RWKVX_WIDEN_BF16:
        rwkvx_gemm4_stored_kind_avx512(RWKVX_WIDEN_BF16, src, next, X, P, np, n_tok, n, Y, ldy,
                                       NULL);
        return;
    default:
        rwkvx_gemm4_stored_kind_avx512(RWKVX_WIDEN_F16, src, next, X, P, np, n_tok, n, Y, ldy,
                                       NULL);
    }
}
#endif /* RWKVX_HAVE_X86_DISPATCH */

/* ---- dispatch ----------------------------------------------------------------------- */

/* The level used unless RWKVX_SIMD asks otherwise: the best the CPU has (all levels from
 * AVX2 up give bit-identical results). */
#define RWKVX_DEFAULT_LEVEL 2

/* The best level this CPU supports. */
static int rwkvx_best_simd(void)
{
    int level = 0;
#if RWKVX_HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
        level = 1;
        if (__builtin_cpu_supports("avx512f"))
            level = 2;
    }
#endif
    return level;
}

/* Chooses the level at import: RWKVX_SIMD=0|1|2 if set (capped at what the CPU has),
 * else the default; makes it current and returns it. */
static int rwkvx_detect_simd(void)
{
    int best = rwkvx_best_simd();
    int level = best < RWKVX_DEFAULT_LEVEL ? best : RWKVX_DEFAULT_LEVEL;
    const char *env = getenv("RWKVX_SIMD");
    if (env != NULL && env[0] >= '0' && env[0] <= '9')
        level = env[0] - '0' < best ? env[0] - '0' : best;
    rwkvx_simd_level = level;
#if RWKVX_HAVE_X86_DISPATCH
    rwkvx_have_vl = __builtin_cpu_supports("avx512vl");
#endif
    return level;
}

#if RWKVX_HAVE_X86_DISPATCH
#define RWKVX_DISPATCH_DOTS(TYPE, CTYPE)                                                      \
    static inline float rwkvx_dot_##TYPE(const CTYPE *w, const float *x, ptrdiff_t n)         \
    {                                                                                          \
        if (rwkvx_simd_level)                                                                  \
            return rwkvx_dot_##TYPE##_avx2(w, x, n);                                           \
        return rwkvx_dot_##TYPE##_portable(w, x, n);                                           \
    }                                                                                          \
    static inline void rwkvx_dot4_##TYPE(const CTYPE *w, ptrdiff_t stride, const float *x,    \
                                         ptrdiff_t n, float *out4)                             \
    {                                                                                          \
        if (rwkvx_simd_level) {                                                                \
            rwkvx_dot4_##TYPE##_avx2(w, stride, x, n, out4);                                   \
            return;                                                                            \
        }                                                                                      \
        for (int r = 0; r < 4; r++)                                                            \
            out4[r] = rwkvx_dot_##TYPE##_portable(w + r * stride, x, n);                       \
    }
#else
#define RWKVX_DISPATCH_DOTS(TYPE, CTYPE)                                                      \
    static inline float rwkvx_dot_##TYPE(const CTYPE *w, const float *x, ptrdiff_t n)         \
    {                                                                                          \
        return rwkvx_dot_##TYPE##_portable(w, x, n);                                           \
    }                                                                                          \
    static inline void rwkvx_dot4_##TYPE(const CTYPE *w, ptrdiff_t stride, const float *x,    \
                                         ptrdiff_t n, float *out4)                             \
    {                                                                                          \
        for (int r = 0; r < 4; r++)                                                            \
            out4[r] = rwkvx_dot_##TYPE##_portable(w + r * stride, x, n);                       \
    }
#endif

RWKVX_DISPATCH_DOTS(f32, float)
RWKVX_DISPATCH_DOTS(bf16, uint16_t)
RWKVX_DISPATCH_DOTS(f16, uint16_t)
RWKVX_DISPATCH_DOTS(u8, uint8_t)

/* Up to RWKVX_FEW_TOKENS tokens: rwkvx_dot4 of each (the same bits at every level). */
#define RWKVX_FEW_TOKENS 4
#if RWKVX_HAVE_X86_DISPATCH
#define RWKVX_DISPATCH_DOT4X(TYPE, CTYPE)                                                     \
    static inline void rwkvx_dot4x_##TYPE(const CTYPE *w, ptrdiff_t stride, const float *X,   \
                                          ptrdiff_t ldx, int T, ptrdiff_t n, float *out,      \
                                          ptrdiff_t ldo)                                      \
    {                                                                                          \
        if (rwkvx_simd_level >= 2 && rwkvx_have_vl) {                                          \
            rwkvx_dot4x_##TYPE##_vl(w, stride, X, ldx, T, n, out, ldo);                        \
            return;                                                                            \
        }                                                                                      \
        if (rwkvx_simd_level) {                                                                \
            rwkvx_dot4x_##TYPE##_avx2(w, stride, X, ldx, T, n, out, ldo);                      \
            return;                                                                            \
        }                                                                                      \
        for (int t = 0; t < T; t++)                                                            \
            for (int r = 0; r < 4; r++)                                                        \
                out[t * ldo + r] = rwkvx_dot_##TYPE##_portable(w + r * stride, X + t * ldx, n); \
    }
#else
#define RWKVX_DISPATCH_DOT4X(TYPE, CTYPE)                                                     \
    static inline void rwkvx_dot4x_##TYPE(const CTYPE *w, ptrdiff_t stride, const float *X,   \
                                          ptrdiff_t ldx, int T, ptrdiff_t n, float *out,      \
                                          ptrdiff_t ldo)                                      \
    {                                                                                          \
        for (int t = 0; t < T; t++)                                                            \
            for (int r = 0; r < 4; r++)                                                        \
                out[t * ldo + r] = rwkvx_dot_##TYPE##_portable(w + r * stride, X + t * ldx, n); \
    }
#endif

RWKVX_DISPATCH_DOT4X(f32, float)
RWKVX_DISPATCH_DOT4X(bf16, uint16_t)
RWKVX_DISPATCH_DOT4X(f16, uint16_t)
RWKVX_DISPATCH_DOT4X(u8, uint8_t)

static inline void rwkvx_prepare_u8(const float *rx, const float *mx, const float *x, float *xr,
                                    ptrdiff_t n, double *sums)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level) {
        rwkvx_prepare_u8_avx2(rx, mx, x, xr, n, sums);
        return;
    }
#endif
    rwkvx_prepare_u8_portable(rx, mx, x, xr, n, sums);
}

/* Matrix-matrix building blocks: widen a row of stored weights to float32 (exact), and
 * four rows against n_tok tokens (see rwkvx_gemm4_f32_avx2). */
#if RWKVX_HAVE_X86_DISPATCH
#define RWKVX_WIDEN_AVX2(TYPE, p, out, n)              \
    if (rwkvx_simd_level >= 2) {                       \
        rwkvx_widen_##TYPE##_avx512(p, out, n);        \
        return;                                        \
    }                                                  \
    if (rwkvx_simd_level) {                            \
        rwkvx_widen_##TYPE##_avx2(p, out, n);          \
        return;                                        \
    }
#else
#define RWKVX_WIDEN_AVX2(TYPE, p, out, n)
#endif

#define RWKVX_WIDEN(TYPE, CTYPE)                                                       \
    static inline void rwkvx_widen_##TYPE(const CTYPE *p, float *out, ptrdiff_t n)     \
    {                                                                                   \
        RWKVX_WIDEN_AVX2(TYPE, p, out, n)                                               \
        for (ptrdiff_t j = 0; j < n; j++)                                               \
            out[j] = RWKVX_SCALAR_##TYPE(p, j);                                         \
    }

RWKVX_WIDEN(bf16, uint16_t)
RWKVX_WIDEN(f16, uint16_t)
RWKVX_WIDEN(u8, uint8_t)

/* Pair p of the rows of X (tokens 2p and 2p + 1) in the layout of the AVX-512 product:
 * for each block of eight columns, token 2p's eight values then token 2p + 1's (zeros
 * past the last token). Columns past the last whole block are not packed. */
static inline void rwkvx_pack_pair(const float *X, ptrdiff_t ldx, ptrdiff_t n_tok, ptrdiff_t p,
                                   ptrdiff_t n, float *P)
{
    const ptrdiff_t n8 = n / 8;
    const float *x0 = X + 2 * p * ldx, *x1 = x0 + ldx;
    float *out = P + p * rwkvx_pack_stride(n);
    for (ptrdiff_t b = 0; b < n8; b++) {
        memcpy(out + 16 * b, x0 + 8 * b, 8 * sizeof(float));
        if (2 * p + 1 < n_tok)
            memcpy(out + 16 * b + 8, x1 + 8 * b, 8 * sizeof(float));
        else
            memset(out + 16 * b + 8, 0, 8 * sizeof(float));
    }
}

/* A widening job's values from `from` on. */
static inline void rwkvx_widen_rest(const rwkvx_widen_job *job, ptrdiff_t from)
{
    if (job->kind == RWKVX_WIDEN_BF16)
        rwkvx_widen_bf16((const uint16_t *)job->src + from, job->dst + from, job->count - from);
    else if (job->kind == RWKVX_WIDEN_F16)
        rwkvx_widen_f16((const uint16_t *)job->src + from, job->dst + from, job->count - from);
    else
        rwkvx_widen_u8((const uint8_t *)job->src + from, job->dst + from, job->count - from);
}

/* Rows w .. w + 3 ldw against the n_tok rows of X. P: X packed by rwkvx_pack_pair, read
 * only at level 2. job, if not NULL, is also done: at level 2 interleaved with the
 * arithmetic, else after it. u8, if not NULL, finishes the rows as uint8 products
 * (rwkvx_u8_finish). Measured on the 430M shape, 2
 * threads, 8-token bfloat16 products: widening each block before multiplying it 0.49-0.52
 * ms per 4096 x 1024 matrix, widening the next one in between the multiply-adds 0.41-0.43
 * (float32 0.37). */
static inline void rwkvx_gemm4_f32(const float *w, ptrdiff_t ldw, const float *X, ptrdiff_t ldx,
                                   const float *P, ptrdiff_t n_tok, ptrdiff_t n, float *Y,
                                   ptrdiff_t ldy, const rwkvx_widen_job *job,
                                   const rwkvx_u8_affine *u8)
{
    ptrdiff_t widened = 0;
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2) {
        widened = rwkvx_gemm4_f32_avx512(w, ldw, X, ldx, P, n_tok, n, Y, ldy, job);
    } else if (rwkvx_simd_level) {
        rwkvx_gemm4_f32_avx2(w, ldw, X, ldx, n_tok, n, Y, ldy);
    } else
#endif
    {
        (void)P;
        for (ptrdiff_t t = 0; t < n_tok; t++)
            for (int r = 0; r < 4; r++)
                Y[t * ldy + r] = rwkvx_dot_f32_portable(w + r * ldw, X + t * ldx, n);
    }
    if (u8)
        for (ptrdiff_t t = 0; t < n_tok; t++)
            rwkvx_u8_finish(Y + t * ldy, u8->ry, u8->my, u8->sums + t, 4);
    if (job)
        rwkvx_widen_rest(job, widened);
}

/* Tokens up to which rwkvx_gemm4_stored takes a product (six pairs: one tile). */
#define RWKVX_STORED_MAX_TOKENS 12

/* Four rows of stored weights (kind RWKVX_WIDEN_*, row stride n) against n_tok rows of X
 * (row stride n), packed in P, widening as it goes (rwkvx_gemm4_stored_pairs_avx512); next:
 * the next block's weights to prefetch, or NULL; u8, if not NULL, finishes the rows as
 * uint8 products, as rwkvx_gemm4_f32 does. Only at level 2 and for up to
 * RWKVX_STORED_MAX_TOKENS tokens: returns 0, doing nothing, otherwise. Results are
 * bit-identical to widening the rows and calling rwkvx_gemm4_f32. */
static inline int rwkvx_gemm4_stored(int kind, const void *src, const void *next, const float *X,
                                     const float *P, ptrdiff_t n_tok, ptrdiff_t n, float *Y,
                                     ptrdiff_t ldy, const rwkvx_u8_affine *u8)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2 && n_tok <= RWKVX_STORED_MAX_TOKENS) {
        rwkvx_gemm4_stored_avx512(kind, src, next, X, P, n_tok, n, Y, ldy, u8);
        return 1;
    }
#endif
    (void)kind, (void)src, (void)next, (void)X, (void)P, (void)n_tok, (void)n, (void)Y;
    (void)ldy, (void)u8;
    return 0;
}

#endif /* RWKVX_SIMD_H */
