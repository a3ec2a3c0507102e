/* Kernels for q4 weights (see Q4Matrix in rwkvx/quant.py for the format).
 *
 * Each weight is dequantised in registers, w = q * d + m, and multiplied in float32. The
 * product q * d is exact (at most 23 significant bits), so a fused multiply-add and a
 * multiply then an add give the same w: the float32 value dequantize() returns. The loops
 * then sum w * x in exactly the order of the float32 loops of _simd.h (one 8-lane
 * accumulator per row over steps of eight columns, the same reductions, the same scalar
 * tail), so a q4 product is bit-identical to the float32 product of the dequantised matrix
 * at the same SIMD level, and its matrix-matrix product (rows widened to float32, then the
 * float32 product) to its matrix-vector product.
 *
 * Packing: a row's group of 64 columns is 32 bytes, read as eight little-endian 32-bit
 * words; bits 4p .. 4p + 3 of word k hold column 8p + k. One 256-bit load holds the group,
 * and a shift by 4p puts step p's eight columns in the low bits of the eight lanes: no
 * byte shuffles, which the lookup below needs for itself.
 */
#ifndef RWKVX_Q4_H
#define RWKVX_Q4_H

#include "_simd.h"

#define RWKVX_Q4_GROUP 64

/* A q4 matrix from row 0: packed nibbles q (n_rows, 32 n_groups), group scales sd and
 * minima sm (n_rows, n_groups), float16 row scales D and M (n_rows,). */
typedef struct {
    const uint8_t *q;
    const uint8_t *sd;
    const int8_t *sm;
    const uint16_t *D, *M;
    ptrdiff_t n_cols, n_groups;
} rwkvx_q4;

/* Row i's group g: d = sd D and m = sm M (both exact in float32). */
static inline float rwkvx_q4_scale(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g)
{
    return (float)m->sd[i * m->n_groups + g] * rwkvx_f16_to_f32(m->D[i]);
}

static inline float rwkvx_q4_min(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g)
{
    return (float)m->sm[i * m->n_groups + g] * rwkvx_f16_to_f32(m->M[i]);
}

/* The nibble of column j in row i. */
static inline unsigned rwkvx_q4_nibble(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t j)
{
    const ptrdiff_t g = j / RWKVX_Q4_GROUP, p = j % RWKVX_Q4_GROUP / 8, k = j % 8;
    const uint8_t b = m->q[i * 32 * m->n_groups + 32 * g + 4 * k + p / 2];
    return p % 2 ? b >> 4 : b & 15;
}

/* The float32 weight (i, j), exactly as every loop computes it. */
static inline float rwkvx_q4_value(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t j)
{
    return (float)rwkvx_q4_nibble(m, i, j) * rwkvx_q4_scale(m, i, j / RWKVX_Q4_GROUP) +
           rwkvx_q4_min(m, i, j / RWKVX_Q4_GROUP);
}

/* ---- portable ---------------------------------------------------------------------- */

/* Weights j .. j + 7 of row i (j a multiple of eight), as rwkvx_q4_value gives them. */
static inline void rwkvx_q4_step8_portable(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t j, float *w)
{
    const ptrdiff_t g = j / RWKVX_Q4_GROUP, p = j % RWKVX_Q4_GROUP / 8;
    const float d = rwkvx_q4_scale(m, i, g), mn = rwkvx_q4_min(m, i, g);
    const uint8_t *b = m->q + i * 32 * m->n_groups + 32 * g + p / 2;
    const int shift = p % 2 ? 4 : 0;
    for (int k = 0; k < 8; k++)
        w[k] = (float)((b[4 * k] >> shift) & 15) * d + mn;
}

/* rwkvx_dot_f32_portable of row i's weights and x. */
static inline float rwkvx_dot_q4_portable(const rwkvx_q4 *m, ptrdiff_t i, const float *x)
{
    const ptrdiff_t n = m->n_cols;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, w[8];
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) {
        rwkvx_q4_step8_portable(m, i, j, w);
        for (int k = 0; k < 8; k++)
            acc[k] += w[k] * x[j + k];
    }
    float total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++)
        total += rwkvx_q4_value(m, i, j) * x[j];
    return total;
}

static inline void rwkvx_widen_q4_portable(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n_rows,
                                           float *out)
{
    const ptrdiff_t n = m->n_cols;
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        ptrdiff_t j = 0;
        for (; j + 8 <= n; j += 8)
            rwkvx_q4_step8_portable(m, i + r, j, out + r * n + j);
        for (; j < n; j++)
            out[r * n + j] = rwkvx_q4_value(m, i + r, j);
    }
}

/* ---- AVX2 + FMA -------------------------------------------------------------------- */

#if RWKVX_HAVE_X86_DISPATCH

RWKVX_AVX2 static inline __m256i rwkvx_q4_group(const uint8_t *p)
{
    return _mm256_loadu_si256((const __m256i *)p);
}

/* Step p's eight weights of a group's words: q * d + m. */
RWKVX_AVX2 static inline __m256 rwkvx_q4_step_avx2(__m256i words, int p, __m256 d, __m256 mn)
{
    __m256i q = _mm256_and_si256(_mm256_srlv_epi32(words, _mm256_set1_epi32(4 * p)), _mm256_set1_epi32(15));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, mn);
}

/* The row scales of rows i .. i + 3 (F16C). */
RWKVX_AVX2 static inline __m128 rwkvx_q4_rows4(const uint16_t *h)
{
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)h));
}

/* Groups per pass of a four-row product: their scales and minima, as floats, are worked
 * out for the four rows together first (eight groups to a vector), so that the loop over
 * columns only broadcasts them. */
#define RWKVX_Q4_PASS 32

/* d = sd D and m = sm M of groups g0 .. g0 + count - 1 of rows i .. i + 3 into gd[r][g - g0],
 * gm[r][g - g0]: the same products as rwkvx_q4_scale/min. */
RWKVX_AVX2 static inline void rwkvx_q4_params4(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g0,
                                               ptrdiff_t count, const float *D, const float *M,
                                               float gd[4][RWKVX_Q4_PASS],
                                               float gm[4][RWKVX_Q4_PASS])
{
    const ptrdiff_t ng = m->n_groups;
    for (int r = 0; r < 4; r++) {
        const uint8_t *sd = m->sd + (i + r) * ng + g0;
        const int8_t *sm = m->sm + (i + r) * ng + g0;
        ptrdiff_t g = 0;
        for (; g + 8 <= count; g += 8) {
            __m256 d = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sd + g))));
            __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sm + g))));
            _mm256_storeu_ps(gd[r] + g, _mm256_mul_ps(d, _mm256_set1_ps(D[r])));
            _mm256_storeu_ps(gm[r] + g, _mm256_mul_ps(mn, _mm256_set1_ps(M[r])));
        }
        for (; g < count; g++) {
            gd[r][g] = (float)sd[g] * D[r];
            gm[r][g] = (float)sm[g] * M[r];
        }
    }
}

/* The loops of a four-row product, shared by the AVX2 and AVX-512 versions. Per group:
 * PARAMS(k) sets that group's constants from gd/gm[.][k], STEP(p, j) adds columns
 * j .. j + 7 (step p of the group) of the four rows. The next four rows' nibbles
 * (contiguous) are prefetched at the pace these are read, two lines per group. */
#define RWKVX_Q4_DOT4_LOOPS(PARAMS, STEP)                                                    \
    const ptrdiff_t used_groups = (8 * n8 + RWKVX_Q4_GROUP - 1) / RWKVX_Q4_GROUP;            \
    float gd[4][RWKVX_Q4_PASS], gm[4][RWKVX_Q4_PASS];                                        \
    for (ptrdiff_t g0 = 0; g0 < used_groups; g0 += RWKVX_Q4_PASS) {                          \
        const ptrdiff_t g1 = g0 + RWKVX_Q4_PASS < used_groups ? g0 + RWKVX_Q4_PASS : used_groups; \
        rwkvx_q4_params4(m, i, g0, g1 - g0, D, M, gd, gm);                                   \
        for (ptrdiff_t g = g0; g < g1; g++) {                                                \
            PARAMS(g - g0);                                                                  \
            if (prefetch) {                                                                  \
                _mm_prefetch(ahead + 128 * g, _MM_HINT_T0);                                  \
                _mm_prefetch(ahead + 128 * g + 64, _MM_HINT_T0);                             \
            }                                                                                \
            const __m256i w0 = rwkvx_q4_group(q + 32 * g);                                   \
            const __m256i w1 = rwkvx_q4_group(q + stride + 32 * g);                          \
            const __m256i w2 = rwkvx_q4_group(q + 2 * stride + 32 * g);                      \
            const __m256i w3 = rwkvx_q4_group(q + 3 * stride + 32 * g);                      \
            const ptrdiff_t j = RWKVX_Q4_GROUP * g;                                          \
            if (g < whole_groups) {                                                          \
                STEP(0, j); STEP(1, j + 8); STEP(2, j + 16); STEP(3, j + 24);                \
                STEP(4, j + 32); STEP(5, j + 40); STEP(6, j + 48); STEP(7, j + 56);          \
            } else {                                                                         \
                for (int p = 0; j + 8 * p < 8 * n8; p++)                                     \
                    STEP(p, j + 8 * p);                                                      \
            }                                                                                \
        }                                                                                    \
    }

/* One token's four sums a0 .. a3 into out4, as rwkvx_dot4_f32_avx2 finishes them: the
 * four-way reduction, the scalar tail. */
#define RWKVX_Q4_DOT4_END(a0, a1, a2, a3, x, out4)                                           \
    do {                                                                                     \
        _mm_storeu_ps(out4, rwkvx_hsum4x256(a0, a1, a2, a3));                                \
        for (ptrdiff_t j = 8 * n8; j < n; j++)                                               \
            for (int r = 0; r < 4; r++)                                                      \
                (out4)[r] += rwkvx_q4_value(m, i + r, j) * (x)[j];                           \
    } while (0)

#define RWKVX_Q4_DOT4_SETUP                                                                  \
    const ptrdiff_t n = m->n_cols, n8 = n / 8, stride = 32 * m->n_groups;                    \
    const ptrdiff_t whole_groups = 8 * n8 / RWKVX_Q4_GROUP;                                  \
    const uint8_t *q = m->q + i * stride;                                                    \
    const char *ahead = (const char *)(q + 4 * stride);                                      \
    float D[4], M[4];                                                                        \
    _mm_storeu_ps(D, rwkvx_q4_rows4(m->D + i));                                              \
    _mm_storeu_ps(M, rwkvx_q4_rows4(m->M + i))


/* Rows i .. i + 3 against x, as rwkvx_dot4_f32_avx2 sums them: one accumulator per row in
 * column order, the four-way reduction, the scalar tail. */
RWKVX_AVX2 static void rwkvx_dot4_q4_avx2(const rwkvx_q4 *m, ptrdiff_t i, const float *x,
                                         float *out4, int prefetch)
{
    RWKVX_Q4_DOT4_SETUP;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 d0, d1, d2, d3, m0, m1, m2, m3;
#define RWKVX_Q4_PARAMS(k)                                       \
    d0 = _mm256_broadcast_ss(gd[0] + (k));                       \
    d1 = _mm256_broadcast_ss(gd[1] + (k));                       \
    d2 = _mm256_broadcast_ss(gd[2] + (k));                       \
    d3 = _mm256_broadcast_ss(gd[3] + (k));                       \
    m0 = _mm256_broadcast_ss(gm[0] + (k));                       \
    m1 = _mm256_broadcast_ss(gm[1] + (k));                       \
    m2 = _mm256_broadcast_ss(gm[2] + (k));                       \
    m3 = _mm256_broadcast_ss(gm[3] + (k))
#define RWKVX_Q4_STEP(p, j)                                                        \
    do {                                                                           \
        const __m256 xv = _mm256_loadu_ps(x + (j));                                \
        a0 = _mm256_fmadd_ps(rwkvx_q4_step_avx2(w0, p, d0, m0), xv, a0);           \
        a1 = _mm256_fmadd_ps(rwkvx_q4_step_avx2(w1, p, d1, m1), xv, a1);           \
        a2 = _mm256_fmadd_ps(rwkvx_q4_step_avx2(w2, p, d2, m2), xv, a2);           \
        a3 = _mm256_fmadd_ps(rwkvx_q4_step_avx2(w3, p, d3, m3), xv, a3);           \
    } while (0)
    RWKVX_Q4_DOT4_LOOPS(RWKVX_Q4_PARAMS, RWKVX_Q4_STEP)
    RWKVX_Q4_DOT4_END(a0, a1, a2, a3, x, out4);
#undef RWKVX_Q4_STEP
#undef RWKVX_Q4_PARAMS
}

/* One row, as rwkvx_dot_f32_avx2 sums it. */
RWKVX_AVX2 static float rwkvx_dot_q4_avx2(const rwkvx_q4 *m, ptrdiff_t i, const float *x)
{
    const ptrdiff_t n = m->n_cols, n8 = n / 8;
    const uint8_t *q = m->q + i * 32 * m->n_groups;
    __m256 acc = _mm256_setzero_ps(), d = acc, mn = acc;
    __m256i words = _mm256_setzero_si256();
    for (ptrdiff_t j = 0; j < 8 * n8; j += 8) {
        if (j % RWKVX_Q4_GROUP == 0) {
            d = _mm256_set1_ps(rwkvx_q4_scale(m, i, j / RWKVX_Q4_GROUP));
            mn = _mm256_set1_ps(rwkvx_q4_min(m, i, j / RWKVX_Q4_GROUP));
            words = rwkvx_q4_group(q + j / 2);
        }
        acc = _mm256_fmadd_ps(rwkvx_q4_step_avx2(words, j % RWKVX_Q4_GROUP / 8, d, mn),
                              _mm256_loadu_ps(x + j), acc);
    }
    float total = rwkvx_hsum256(acc);
    for (ptrdiff_t j = 8 * n8; j < n; j++)
        total += rwkvx_q4_value(m, i, j) * x[j];
    return total;
}

/* Rows i .. i + n_rows - 1 as float32 into out (row stride n_cols). */
RWKVX_AVX2 static void rwkvx_widen_q4_avx2(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n_rows,
                                          float *out)
{
    const ptrdiff_t n = m->n_cols, n8 = n / 8;
    for (ptrdiff_t r = 0; r < n_rows; r++) {
        const uint8_t *q = m->q + (i + r) * 32 * m->n_groups;
        float *o = out + r * n;
        __m256 d = _mm256_setzero_ps(), mn = d;
        __m256i words = _mm256_setzero_si256();
        for (ptrdiff_t j = 0; j < 8 * n8; j += 8) {
            if (j % RWKVX_Q4_GROUP == 0) {
                d = _mm256_set1_ps(rwkvx_q4_scale(m, i + r, j / RWKVX_Q4_GROUP));
                mn = _mm256_set1_ps(rwkvx_q4_min(m, i + r, j / RWKVX_Q4_GROUP));
                words = rwkvx_q4_group(q + j / 2);
            }
            _mm256_storeu_ps(o + j, rwkvx_q4_step_avx2(words, j % RWKVX_Q4_GROUP / 8, d, mn));
        }
        for (ptrdiff_t j = 8 * n8; j < n; j++)
            o[j] = rwkvx_q4_value(m, i + r, j);
    }
}

/* ---- AVX-512 (F + VL, 256-bit registers) ------------------------------------------
 * The dequantisation as a table lookup: a group's sixteen possible weights fma(k, d, m),
 * k = 0..15, sit in two registers, and one two-register permute (vpermt2ps, which reads
 * only the low four bits of each index, so no mask) turns eight nibbles into eight weights
 * -- the values the AVX2 loop computes with a mask, a conversion and a multiply-add, so
 * the results are the same bits, with one multiply-add per eight weights instead of two.
 * Still 256-bit registers, as the other matrix-vector loops (see _simd.h). Measured on a
 * 256 x 1024 matrix in cache, one thread of a Zen 4 at 2.6 GHz: AVX2 loop 12.6 Gweights/s,
 * this one 19.7 (uint8's loop 21.6); the permute and the shift share two pipes there, so
 * about eight weights a cycle is this loop's ceiling. */

/* A group's tables of rows 0 .. 3 (l0/h0 .. l3/h3: entries 0-7 and 8-15). */
#define RWKVX_Q4_TABLE(r, lo, hi, k)                                                         \
    do {                                                                                     \
        const __m256 d_ = _mm256_broadcast_ss(gd[r] + (k));                                  \
        const __m256 m_ = _mm256_broadcast_ss(gm[r] + (k));                                  \
        lo = _mm256_fmadd_ps(k_lo, d_, m_);                                                  \
        hi = _mm256_fmadd_ps(k_hi, d_, m_);                                                  \
    } while (0)
#define RWKVX_Q4_TABLES(g)                 \
    RWKVX_Q4_TABLE(0, l0, h0, g);          \
    RWKVX_Q4_TABLE(1, l1, h1, g);          \
    RWKVX_Q4_TABLE(2, l2, h2, g);          \
    RWKVX_Q4_TABLE(3, l3, h3, g)
#define RWKVX_Q4_TABLE_REGS                                                                  \
    const __m256 k_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);                              \
    const __m256 k_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);                        \
    __m256 l0, l1, l2, l3, h0, h1, h2, h3
/* Step p's eight weights of row r (words w, tables l, h). */
#define RWKVX_Q4_LOOK(l, w, h, p) _mm256_permutex2var_ps(l, _mm256_srli_epi32(w, 4 * (p)), h)

/* Rows i .. i + 3 against T (1 to 4, a constant at every call) tokens X + t ldx at once,
 * into out + t ldo, each token summed as rwkvx_dot4_f32_avx2 sums it: each weight is looked
 * up once for all of them (decoding q4 is bound by that lookup, so a second sequence in a
 * batch cost nearly a second token's time). One token (T = 1) is decoding's product. */
RWKVX_AVX512VL static inline __attribute__((always_inline)) void
rwkvx_dot4x_q4_avx512_t(const rwkvx_q4 *m, ptrdiff_t i, const float *X, ptrdiff_t ldx, const int T,
                        float *out, ptrdiff_t ldo, int prefetch)
{
    RWKVX_Q4_DOT4_SETUP;
    RWKVX_Q4_TABLE_REGS;
    __m256 a[4][4];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < 4; r++)
            a[t][r] = _mm256_setzero_ps();
#define RWKVX_Q4_LOOKUP_T(p, j)                                                              \
    do {                                                                                     \
        const __m256 v0 = RWKVX_Q4_LOOK(l0, w0, h0, p), v1 = RWKVX_Q4_LOOK(l1, w1, h1, p);   \
        const __m256 v2 = RWKVX_Q4_LOOK(l2, w2, h2, p), v3 = RWKVX_Q4_LOOK(l3, w3, h3, p);   \
        for (int t = 0; t < T; t++) {                                                        \
            const __m256 xv = _mm256_loadu_ps(X + t * ldx + (j));                            \
            a[t][0] = _mm256_fmadd_ps(v0, xv, a[t][0]);                                      \
            a[t][1] = _mm256_fmadd_ps(v1, xv, a[t][1]);                                      \
            a[t][2] = _mm256_fmadd_ps(v2, xv, a[t][2]);                                      \
            a[t][3] = _mm256_fmadd_ps(v3, xv, a[t][3]);                                      \
        }                                                                                    \
    } while (0)
    RWKVX_Q4_DOT4_LOOPS(RWKVX_Q4_TABLES, RWKVX_Q4_LOOKUP_T)
#undef RWKVX_Q4_LOOKUP_T
    for (int t = 0; t < T; t++) {
        RWKVX_Q4_DOT4_END(a[t][0], a[t][1], a[t][2], a[t][3], X + t * ldx, out + t * ldo);
    }
}

RWKVX_AVX512VL static void rwkvx_dot4x_q4_avx512(const rwkvx_q4 *m, ptrdiff_t i, const float *X,
                                                ptrdiff_t ldx, int T, float *out, ptrdiff_t ldo,
                                                int prefetch)
{
    switch (T) {
    case 1: rwkvx_dot4x_q4_avx512_t(m, i, X, ldx, 1, out, ldo, prefetch); return;
    case 2: rwkvx_dot4x_q4_avx512_t(m, i, X, ldx, 2, out, ldo, prefetch); return;
    case 3: rwkvx_dot4x_q4_avx512_t(m, i, X, ldx, 3, out, ldo, prefetch); return;
    case 4: rwkvx_dot4x_q4_avx512_t(m, i, X, ldx, 4, out, ldo, prefetch); return;
    }
}

RWKVX_AVX512VL static void rwkvx_dot4_q4_avx512(const rwkvx_q4 *m, ptrdiff_t i, const float *x,
                                               float *out4, int prefetch)
{
    rwkvx_dot4x_q4_avx512_t(m, i, x, 0, 1, out4, 0, prefetch);
}
#undef RWKVX_Q4_LOOK
#undef RWKVX_Q4_TABLE_REGS
#undef RWKVX_Q4_TABLES
#undef RWKVX_Q4_TABLE

/* Row i's group g (64 columns) widened to float32 in out: the lookup of the loop above, in
 * 16 lanes (sixteen table entries fit one register; each half of an index register takes
 * one step's shift), two steps per permute. */
RWKVX_AVX512VL static inline __attribute__((always_inline)) void
rwkvx_q4_widen_group_avx512(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g, float d, float mn,
                            float *out)
{
    const __m512 table = _mm512_fmadd_ps(
        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_ps(d), _mm512_set1_ps(mn));
    /* steps 0 and 1 in the two halves; each later pair is 8 bits further along (one
     * constant shift vector, not four: the tile's accumulators need the registers) */
    const __m512i w = _mm512_srlv_epi32(
        _mm512_broadcast_i64x4(rwkvx_q4_group(m->q + i * 32 * m->n_groups + 32 * g)),
        _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(4), 1));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(w, table));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(w, 8), table));
    _mm512_storeu_ps(out + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(w, 16), table));
    _mm512_storeu_ps(out + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(w, 24), table));
}

/* As rwkvx_gemm4_stored_pairs_avx512 (_simd.h) for q4 rows i .. i + 3 against NP packed
 * pairs of tokens: each group of 64 columns of the four rows is widened into 1 KiB on the
 * stack just before its multiply-adds, then summed by the same tile steps, reduction and
 * scalar tail, so each token's result equals the matrix-vector product's. prefetch:
 * whether the next four rows may be fetched ahead. */
RWKVX_AVX512VL static inline __attribute__((always_inline)) void
rwkvx_gemm4_q4_pairs_avx512(const rwkvx_q4 *m, ptrdiff_t i, const float *P, ptrdiff_t ldp,
                            const int NP, const float *X, ptrdiff_t n_tok, float *Y,
                            ptrdiff_t ldy, int prefetch)
{
    const ptrdiff_t n = m->n_cols, n8 = n / 8, stride = 32 * m->n_groups;
    const ptrdiff_t used_groups = (8 * n8 + RWKVX_Q4_GROUP - 1) / RWKVX_Q4_GROUP;
    const ptrdiff_t whole_groups = 8 * n8 / RWKVX_Q4_GROUP;
    const char *ahead = (const char *)(m->q + (i + 4) * stride);
    float D[4], M[4], gd[4][RWKVX_Q4_PASS], gm[4][RWKVX_Q4_PASS];
    float wb[4][RWKVX_Q4_GROUP] __attribute__((aligned(64)));
    _mm_storeu_ps(D, rwkvx_q4_rows4(m->D + i));
    _mm_storeu_ps(M, rwkvx_q4_rows4(m->M + i));
    __m512 c[6][4];
#pragma GCC unroll 24
    for (int k = 0; k < NP * 4; k++)
        c[k / 4][k % 4] = _mm512_setzero_ps();
    for (ptrdiff_t g0 = 0; g0 < used_groups; g0 += RWKVX_Q4_PASS) {
        const ptrdiff_t g1 = g0 + RWKVX_Q4_PASS < used_groups ? g0 + RWKVX_Q4_PASS : used_groups;
        rwkvx_q4_params4(m, i, g0, g1 - g0, D, M, gd, gm);
        for (ptrdiff_t g = g0; g < g1; g++) {
            if (prefetch) {
                _mm_prefetch(ahead + 128 * g, _MM_HINT_T0);
                _mm_prefetch(ahead + 128 * g + 64, _MM_HINT_T0);
            }
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                rwkvx_q4_widen_group_avx512(m, i + r, g, gd[r][g - g0], gm[r][g - g0], wb[r]);
            const ptrdiff_t b0 = 8 * g;
            if (g < whole_groups) {
                /* the usual case, with a constant count so that the loop unrolls */
#pragma GCC unroll 8
                for (int s = 0; s < 8; s++)
                    rwkvx_tile_step_avx512(wb[0] + 8 * s, RWKVX_Q4_GROUP, P + 16 * (b0 + s), ldp, NP, c);
            } else {
                for (ptrdiff_t s = 0; s < n8 - b0; s++)
                    rwkvx_tile_step_avx512(wb[0] + 8 * s, RWKVX_Q4_GROUP, P + 16 * (b0 + s), ldp, NP, c);
            }
        }
    }
#pragma GCC unroll 6
    for (int a = 0; a < NP; a++) {
        for (int h = 0; h < 2; h++) {
            ptrdiff_t t = 2 * a + h;
            if (t >= n_tok)
                break;
            const float *x = X + t * n;
            float *y = Y + t * ldy;
            _mm_storeu_ps(y, rwkvx_pair_sums4_avx512(c[a], h));
            for (ptrdiff_t k = 8 * n8; k < n; k++)
                for (int r = 0; r < 4; r++)
                    y[r] += rwkvx_q4_value(m, i + r, k) * x[k];
        }
    }
}

RWKVX_AVX512VL static void rwkvx_gemm4_q4_avx512(const rwkvx_q4 *m, ptrdiff_t i, const float *X,
                                                const float *P, ptrdiff_t n_tok, float *Y,
                                                ptrdiff_t ldy, int prefetch)
{
    const ptrdiff_t ldp = rwkvx_pack_stride(m->n_cols);
#define RWKVX_TILE(NP) \
    rwkvx_gemm4_q4_pairs_avx512(m, i, P, ldp, NP, X, n_tok, Y, ldy, prefetch); return
    RWKVX_FOR_PAIRS((n_tok + 1) / 2, RWKVX_TILE);
#undef RWKVX_TILE
}
#endif /* RWKVX_HAVE_X86_DISPATCH */

/* ---- dispatch ----------------------------------------------------------------------- */

static inline float rwkvx_dot_q4(const rwkvx_q4 *m, ptrdiff_t i, const float *x)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level)
        return rwkvx_dot_q4_avx2(m, i, x);
#endif
    return rwkvx_dot_q4_portable(m, i, x);
}

/* Rows i .. i + 3; prefetch: whether the four rows after them may be fetched ahead (not
 * past the matrix's last row). */
static inline void rwkvx_dot4_q4(const rwkvx_q4 *m, ptrdiff_t i, const float *x, float *out4,
                                 int prefetch)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2 && rwkvx_have_vl) {
        rwkvx_dot4_q4_avx512(m, i, x, out4, prefetch);
        return;
    }
    if (rwkvx_simd_level) {
        rwkvx_dot4_q4_avx2(m, i, x, out4, prefetch);
        return;
    }
#endif
    (void)prefetch;
    for (int r = 0; r < 4; r++)
        out4[r] = rwkvx_dot_q4_portable(m, i + r, x);
}

/* rwkvx_dot4_q4 of T tokens (at most RWKVX_FEW_TOKENS) X + t ldx into out + t ldo. */
static inline void rwkvx_dot4x_q4(const rwkvx_q4 *m, ptrdiff_t i, const float *X, ptrdiff_t ldx,
                                  int T, float *out, ptrdiff_t ldo, int prefetch)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2 && rwkvx_have_vl) {
        rwkvx_dot4x_q4_avx512(m, i, X, ldx, T, out, ldo, prefetch);
        return;
    }
#endif
    float out4[4];
    for (int t = 0; t < T; t++) {
        rwkvx_dot4_q4(m, i, X + t * ldx, out4, prefetch);
        for (int r = 0; r < 4; r++)
            out[t * ldo + r] = out4[r];
    }
}

static inline void rwkvx_widen_q4(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n_rows, float *out)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level) {
        rwkvx_widen_q4_avx2(m, i, n_rows, out);
        return;
    }
#endif
    rwkvx_widen_q4_portable(m, i, n_rows, out);
}

/* Rows i .. i + 3 against the n_tok rows of X (row stride n_cols), packed in P, when the
 * AVX-512 tile takes the product (level 2 with AVX-512VL, at most RWKVX_STORED_MAX_TOKENS
 * tokens): returns 1, else 0 and does nothing (the caller widens the rows and calls
 * rwkvx_gemm4_f32). Bit-identical either way. */
static inline int rwkvx_gemm4_q4(const rwkvx_q4 *m, ptrdiff_t i, const float *X, const float *P,
                                 ptrdiff_t n_tok, float *Y, ptrdiff_t ldy, int prefetch)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2 && rwkvx_have_vl && n_tok <= RWKVX_STORED_MAX_TOKENS) {
        rwkvx_gemm4_q4_avx512(m, i, X, P, n_tok, Y, ldy, prefetch);
        return 1;
    }
#endif
    (void)m, (void)i, (void)X, (void)P, (void)n_tok, (void)Y, (void)ldy, (void)prefetch;
    return 0;
}

#endif /* RWKVX_Q4_H */
