/* q4 matrices in int8 arithmetic: the opt-in load(dtype="q4", arithmetic="int8").
 *
 * A q4 weight is w = q d_g + m_g (q in 0..15; d_g, m_g its group's scale and minimum, see
 * _q4.h). Its float32 loops dequantise every weight, two or three vector instructions per
 * eight weights, which on a Zen 4 keeps one token's product below the memory's pace. Here
 * each token's input is rounded to int8 with one scale (s = max|x| / 127, a = round(x 127 / max|x|),
 * as _int8.h does it), and a row's product becomes, per group g of 64 columns,
 *     sum_j w[j] x[j] ~ d_g (s I_g + 7.5 E_g) + m_g X_g,
 *     I_g = sum_j q[j] a[j] (exact, integers),  E_g = sum_j (x[j] - s a[j]),  X_g = sum_j x[j],
 * where 7.5 E_g stands for sum_j q[j] e[j] (7.5 the middle of the codes; as _int8.h's
 * 127.5). vpdpbusd multiplies 64 nibbles (unpacked with a mask and a shift) by 64 bytes of
 * a at once, so a row needs a handful of instructions per 128 weights, every token too.
 *
 * The result, the same bits at every level, thread count and batch composition (a token's
 * result depends only on its row and input; one token goes this way as well, so a sequence
 * decoded alone and in a batch agree):
 *   - lane L of 16 takes group 2P + L / 8, word L % 8 (see _q4.h's packing), at pair step
 *     P = 0, 1, ...: acc_L = fma((float)I, d, acc_L), I that word's eight products (exact);
 *   - lane l of 16 takes groups g = l, l + 16, ...: c_l = fma(d_g, 7.5 E_g, c_l), then
 *     c_l = fma(m_g, X_g, c_l);
 *   - y = fma(T(acc), s, T(c)), T the fixed tree rwkvx_tree16 (_simd.h).
 * Each token's input is prepared once per product (rwkvx_q4i8_prepare): a rearranged so
 * that byte 4k + b of a group's low-nibble half meets column 16b + k and of its high half
 * column 16b + 8 + k, two groups' halves side by side for one 512-bit step, then 7.5 E_g,
 * X_g and s.
 */
#ifndef RWKVX_Q4INT8_H
#define RWKVX_Q4INT8_H

#include "_q4.h"
#include "_int8.h"

/* Groups of d, m worked out per pass of a block (a multiple of 16, see the c lanes). */
#define RWKVX_Q4I8_PASS 32
/* Tokens per pass of the VNNI loop (an accumulator pair each). */
#define RWKVX_Q4I8_TILE 8
#ifndef RWKVX_Q4I8_AHEAD
#define RWKVX_Q4I8_AHEAD 8
#endif

static inline ptrdiff_t rwkvx_q4i8_groups(ptrdiff_t n) { return (n + 63) / 64; }
static inline ptrdiff_t rwkvx_q4i8_pairs(ptrdiff_t n) { return (rwkvx_q4i8_groups(n) + 1) / 2; }

/* Bytes of one token's prepared input: the rearranged a (128 per pair of groups), 7.5 E
 * and X (floats, padded to whole 16-lane steps), s, then a in column order (scratch for
 * its rounding); whole cache lines. */
static inline ptrdiff_t rwkvx_q4i8_ce(ptrdiff_t n) { return 128 * rwkvx_q4i8_pairs(n); }
static inline ptrdiff_t rwkvx_q4i8_lanes(ptrdiff_t n) { return (rwkvx_q4i8_groups(n) + 15) / 16 * 16; }
static inline ptrdiff_t rwkvx_q4i8_x(ptrdiff_t n) { return rwkvx_q4i8_ce(n) + 4 * rwkvx_q4i8_lanes(n); }
static inline ptrdiff_t rwkvx_q4i8_s(ptrdiff_t n) { return rwkvx_q4i8_x(n) + 4 * rwkvx_q4i8_lanes(n); }
static inline ptrdiff_t rwkvx_q4i8_stride(ptrdiff_t n) { return (rwkvx_q4i8_s(n) + 64 + n + 63) / 64 * 64; }

/* One token's input x (n floats) prepared in out (rwkvx_q4i8_stride(n) bytes). */
static inline void rwkvx_q4i8_prepare(const float *x, ptrdiff_t n, uint8_t *out)
{
    const ptrdiff_t G = rwkvx_q4i8_groups(n), lanes = rwkvx_q4i8_lanes(n);
    int8_t *A = (int8_t *)out, *a = (int8_t *)out + rwkvx_q4i8_s(n) + 64;
    float *CE = (float *)(out + rwkvx_q4i8_ce(n)), *X = (float *)(out + rwkvx_q4i8_x(n));
    float s;
    rwkvx_i8_quantize(x, n, a, &s);
    memcpy(out + rwkvx_q4i8_s(n), &s, sizeof s);
    memset(A, 0, (size_t)rwkvx_q4i8_ce(n));
    for (ptrdiff_t g = 0; g < lanes; g++) {
        double e = 0.0, sum = 0.0;
        for (ptrdiff_t c = 0; c < 64 && g < G && 64 * g + c < n; c++) {
            const ptrdiff_t j = 64 * g + c, p = c / 8, k = c % 8;
            A[128 * (g / 2) + 64 * (p % 2) + 32 * (g % 2) + 4 * k + p / 2] = a[j];
            sum += x[j];
            e += (double)x[j] - (double)s * a[j];
        }
        CE[g] = (float)(7.5 * e);
        X[g] = (float)sum;
    }
}

/* Row i's d_g, m_g for groups g0 .. g0 + RWKVX_Q4I8_PASS - 1 (zeros past the last). */
static inline void rwkvx_q4i8_params(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g0, float *d, float *mn)
{
    for (ptrdiff_t k = 0; k < RWKVX_Q4I8_PASS; k++) {
        const int in = g0 + k < m->n_groups;
        d[k] = in ? rwkvx_q4_scale(m, i, g0 + k) : 0.0f;
        mn[k] = in ? rwkvx_q4_min(m, i, g0 + k) : 0.0f;
    }
}


/* ---- plain C ------------------------------------------------------------------------ */

/* Row i against one prepared token P. */
static inline float rwkvx_q4i8_dot(const rwkvx_q4 *m, ptrdiff_t i, const uint8_t *P, ptrdiff_t n)
{
    const ptrdiff_t G = rwkvx_q4i8_groups(n), pairs = rwkvx_q4i8_pairs(n);
    const uint8_t *q = m->q + i * 32 * m->n_groups;
    const int8_t *A = (const int8_t *)P;
    const float *CE = (const float *)(P + rwkvx_q4i8_ce(n)), *X = (const float *)(P + rwkvx_q4i8_x(n));
    float acc[16] = {0}, c[16] = {0}, d[RWKVX_Q4I8_PASS], mn[RWKVX_Q4I8_PASS], s;
    memcpy(&s, P + rwkvx_q4i8_s(n), sizeof s);
    for (ptrdiff_t g0 = 0; g0 < 2 * pairs; g0 += RWKVX_Q4I8_PASS) {
        rwkvx_q4i8_params(m, i, g0, d, mn);
        for (ptrdiff_t g = g0; g < g0 + RWKVX_Q4I8_PASS && g < 2 * pairs; g++) {
            for (int k = 0; k < 8; k++) {
                int32_t I = 0;
                for (int b = 0; b < 4 && g < G; b++) {
                    const uint8_t byte = q[32 * g + 4 * k + b];
                    const int8_t *Ag = A + 128 * (g / 2) + 32 * (g % 2) + 4 * k + b;
                    I += (int32_t)(byte & 15) * Ag[0] + (int32_t)(byte >> 4) * Ag[64];
                }
                acc[8 * (g % 2) + k] = fmaf((float)I, d[g - g0], acc[8 * (g % 2) + k]);
            }
        }
        for (ptrdiff_t g = g0; g < g0 + RWKVX_Q4I8_PASS && g < rwkvx_q4i8_lanes(n); g++) {
            c[g % 16] = fmaf(d[g - g0], CE[g], c[g % 16]);
            c[g % 16] = fmaf(mn[g - g0], X[g], c[g % 16]);
        }
    }
    return fmaf(rwkvx_tree16(acc), s, rwkvx_tree16(c));
}

#if RWKVX_HAVE_X86_DISPATCH

#define RWKVX_Q4I8_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define RWKVX_Q4I8_AVX2 __attribute__((target("avx2,fma,f16c")))

/* ---- AVX-512 VNNI --------------------------------------------------------------------- */

/* rwkvx_q4i8_params for the pass's first `count` groups (a multiple of 16), sixteen a
 * step: the same products (F16C converts a float16 exactly, as rwkvx_f16_to_f32). */
RWKVX_Q4I8_VNNI static inline void rwkvx_q4i8_params_avx512(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g0,
                                                          ptrdiff_t count, float *d, float *mn)
{
    const __m512 D = _mm512_set1_ps(_cvtsh_ss(m->D[i])), M = _mm512_set1_ps(_cvtsh_ss(m->M[i]));
    const uint8_t *sd = m->sd + i * m->n_groups;
    const int8_t *sm = m->sm + i * m->n_groups;
    for (ptrdiff_t k = 0; k < count; k += 16) {
        const ptrdiff_t left = m->n_groups - g0 - k;
        const __mmask16 in = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        const __m128i vd = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8((__mmask64)in, sd + g0 + k));
        const __m128i vm = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8((__mmask64)in, sm + g0 + k));
        _mm512_storeu_ps(d + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(vd)), D));
        _mm512_storeu_ps(mn + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(vm)), M));
    }
}

/* rwkvx_tree16 of one register. */
RWKVX_Q4I8_VNNI static inline float rwkvx_q4i8_tree512(__m512 v)
{
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, 1)));
}

/* Row i against T (a constant) prepared tokens P + t ldp: y[t ldy]. The row is read in
 * order, and `ahead` (the same bytes RWKVX_Q4I8_AHEAD rows on, or these again) fetched at
 * the same pace: a block of rows goes row after row, one stream for the prefetcher (four
 * rows side by side are four streams of a few lines each, too short for it to follow).
 * One token (decoding) fetches into L2 only, as dot4 does (_simd.h): RWKV-4 0.4B decoded
 * 10.3 -> 9.4 ms/token and RWKV-7 1.5B 42.1 -> 36.1 (Zen 4, interleaved in one process);
 * prompts and batches did not change measurably and keep L1. */
RWKVX_Q4I8_VNNI static inline __attribute__((always_inline)) void
rwkvx_q4i8_row_vnni(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n, const uint8_t *P, ptrdiff_t ldp,
                    const int T, const char *ahead, float *y, ptrdiff_t ldy)
{
    const ptrdiff_t pairs = rwkvx_q4i8_pairs(n), G = rwkvx_q4i8_groups(n), lanes = rwkvx_q4i8_lanes(n);
    const uint8_t *q = m->q + i * 32 * m->n_groups;
    const __m512i nibble = _mm512_set1_epi8(15);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    float d[RWKVX_Q4I8_PASS], mn[RWKVX_Q4I8_PASS];
    __m512 acc[RWKVX_Q4I8_TILE], c[RWKVX_Q4I8_TILE];
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
        acc[t] = c[t] = _mm512_setzero_ps();
    for (ptrdiff_t g0 = 0; g0 < 2 * pairs; g0 += RWKVX_Q4I8_PASS) {
        rwkvx_q4i8_params_avx512(m, i, g0, lanes - g0 < RWKVX_Q4I8_PASS ? lanes - g0 : RWKVX_Q4I8_PASS, d, mn);
        const ptrdiff_t g1 = g0 + RWKVX_Q4I8_PASS < 2 * pairs ? g0 + RWKVX_Q4I8_PASS : 2 * pairs;
        /* pairs of groups whose second group exists, then (G odd) the last group alone */
        const ptrdiff_t whole = g1 < G / 2 * 2 ? g1 : G / 2 * 2;
#define RWKVX_Q4I8_PAIR(LOAD)                                                                      \
        do {                                                                                       \
            if (T == 1)                                                                            \
                _mm_prefetch(ahead + 32 * g, _MM_HINT_T1);                                         \
            else                                                                                   \
                _mm_prefetch(ahead + 32 * g, _MM_HINT_T0);                                         \
            const __m512i v = LOAD(q + 32 * g);                                                    \
            const __m512i lo = _mm512_and_si512(v, nibble);                                        \
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);                  \
            const __m512 dv = _mm512_permutexvar_ps(                                               \
                halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(d + g - g0))))); \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                                  \
                const int8_t *A = (const int8_t *)(P + t * ldp) + 64 * g;                          \
                const __m512i I = _mm512_dpbusd_epi32(                                             \
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(A)),        \
                    hi, _mm512_loadu_si512(A + 64));                                               \
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I), dv, acc[t]);                       \
            }                                                                                      \
        } while (0)
#define RWKVX_Q4I8_HALF(p) _mm512_maskz_loadu_epi8((__mmask64)0xffffffffu, (p))
        ptrdiff_t g = g0;
        for (; g < whole; g += 2)
            RWKVX_Q4I8_PAIR(_mm512_loadu_si512);
        if (g < g1)
            RWKVX_Q4I8_PAIR(RWKVX_Q4I8_HALF);
#undef RWKVX_Q4I8_HALF
#undef RWKVX_Q4I8_PAIR
        for (ptrdiff_t l = g0; l < g0 + RWKVX_Q4I8_PASS && l < lanes; l += 16) {
            const __m512 dl = _mm512_loadu_ps(d + l - g0), ml = _mm512_loadu_ps(mn + l - g0);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                c[t] = _mm512_fmadd_ps(dl, _mm512_loadu_ps((const float *)(P + t * ldp + rwkvx_q4i8_ce(n)) + l), c[t]);
                c[t] = _mm512_fmadd_ps(ml, _mm512_loadu_ps((const float *)(P + t * ldp + rwkvx_q4i8_x(n)) + l), c[t]);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        float s;
        memcpy(&s, P + t * ldp + rwkvx_q4i8_s(n), sizeof s);
        y[t * ldy] = fmaf(rwkvx_q4i8_tree512(acc[t]), s, rwkvx_q4i8_tree512(c[t]));
    }
}

/* Four rows against every token, RWKVX_Q4I8_TILE tokens a pass (each pass reads the four
 * rows, from cache after the first). prefetch: whether rows i + RWKVX_Q4I8_AHEAD .. + 3
 * exist. */
RWKVX_Q4I8_VNNI static void rwkvx_q4i8_block4_vnni(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n, const uint8_t *P,
                                             ptrdiff_t ldp, ptrdiff_t n_tok, float *Y, ptrdiff_t ldy,
                                             int prefetch)
{
    const ptrdiff_t stride = 32 * m->n_groups;
    for (ptrdiff_t t = 0; t < n_tok; t += RWKVX_Q4I8_TILE) {
        const ptrdiff_t T = n_tok - t < RWKVX_Q4I8_TILE ? n_tok - t : RWKVX_Q4I8_TILE;
        const uint8_t *Pt = P + t * ldp;
        for (int r = 0; r < 4; r++) {
            const char *ahead = (const char *)m->q + (prefetch && t == 0 ? i + RWKVX_Q4I8_AHEAD + r : i + r) * stride;
            float *y = Y + t * ldy + r;
            switch (T) {
            case 1: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 1, ahead, y, ldy); break;
            case 2: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 2, ahead, y, ldy); break;
            case 3: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 3, ahead, y, ldy); break;
            case 4: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 4, ahead, y, ldy); break;
            case 5: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 5, ahead, y, ldy); break;
            case 6: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 6, ahead, y, ldy); break;
            case 7: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 7, ahead, y, ldy); break;
            default: rwkvx_q4i8_row_vnni(m, i + r, n, Pt, ldp, 8, ahead, y, ldy); break;
            }
        }
    }
}

/* ---- AVX2 and AVX-VNNI -------------------------------------------------------------------
 * vpmaddubsw multiplies a nibble by a byte of a and adds pairs in 16 bits (at most
 * 2 x 15 x 127, no saturation), the low and high nibbles' pairs add (at most 7620), and
 * vpmaddwd by ones adds those pairs in 32 bits: the same eight products per word as the
 * VNNI loop. Where the CPU has AVX-VNNI, two 256-bit vpdpbusd give the same words. The
 * even groups are lanes 0-7, the odd ones lanes 8-15. */

#define RWKVX_Q4I8_AVX2_TILE 4

/* rwkvx_q4i8_params, eight groups a step where all eight exist (the same products). */
RWKVX_Q4I8_AVX2 static inline void rwkvx_q4i8_params_avx2(const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t g0,
                                                        float *d, float *mn)
{
    const float D = _cvtsh_ss(m->D[i]), M = _cvtsh_ss(m->M[i]);
    const uint8_t *sd = m->sd + i * m->n_groups;
    const int8_t *sm = m->sm + i * m->n_groups;
    ptrdiff_t k = 0;
    for (; k + 8 <= RWKVX_Q4I8_PASS && g0 + k + 8 <= m->n_groups; k += 8) {
        const __m256 vd = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sd + g0 + k))));
        const __m256 vm = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sm + g0 + k))));
        _mm256_storeu_ps(d + k, _mm256_mul_ps(vd, _mm256_set1_ps(D)));
        _mm256_storeu_ps(mn + k, _mm256_mul_ps(vm, _mm256_set1_ps(M)));
    }
    for (; k < RWKVX_Q4I8_PASS; k++) {
        const int in = g0 + k < m->n_groups;
        d[k] = in ? (float)sd[g0 + k] * D : 0.0f;
        mn[k] = in ? (float)sm[g0 + k] * M : 0.0f;
    }
}

/* One group's eight words of products with a token's bytes A (against the low nibbles)
 * and A + 64 (the high ones): eight exact sums in 32-bit lanes. AVX2's way takes four
 * instructions; AVX-VNNI's vpdpbusd (see _int8.h) two. */
#define RWKVX_Q4I8_WORDS_AVX2(lo, hi, A)                                                         \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(A))),  \
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)((A) + 64)))), \
                      _mm256_set1_epi16(1))
#define RWKVX_Q4I8_WORDS_DPBUSD(DPBUSD, lo, hi, A)                                               \
    DPBUSD(DPBUSD(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)(A))), hi,    \
           _mm256_loadu_si256((const __m256i *)((A) + 64)))
#define RWKVX_Q4I8_WORDS_VNNI256(lo, hi, A) RWKVX_Q4I8_WORDS_DPBUSD(RWKVX_DPBUSD_VNNI256, lo, hi, A)

/* Group g's eight words against T tokens into the accumulators of its parity (half). */
#define RWKVX_Q4I8_GROUP256(WORDS, g, half)                                                      \
    do {                                                                                         \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * (g)));                   \
        const __m256i lo = _mm256_and_si256(v, nibble);                                          \
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);                    \
        const __m256 dg = _mm256_set1_ps(d[(g) - g0]);                                           \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                    \
            const int8_t *A = (const int8_t *)(P + t * ldp) + 128 * ((g) / 2) + 32 * (half);     \
            const __m256i I = WORDS(lo, hi, A);                                                  \
            acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), dg, acc[t][half]);             \
        }                                                                                        \
    } while (0)

/* Row i against T (a constant, at most RWKVX_Q4I8_AVX2_TILE) prepared tokens P + t ldp:
 * y[t ldy], with WORDS for the integer products. Each group's nibbles are unpacked once
 * for all T tokens; the c lanes wait in memory between passes (the registers hold the
 * tokens' accumulators). A missing odd group would add fma(0, 0, acc), which changes
 * nothing. */
#define RWKVX_Q4I8_ROW256_BODY(WORDS)                                                            \
    const ptrdiff_t G = rwkvx_q4i8_groups(n), pairs = rwkvx_q4i8_pairs(n), lanes = rwkvx_q4i8_lanes(n); \
    const uint8_t *q = m->q + i * 32 * m->n_groups;                                              \
    const __m256i nibble = _mm256_set1_epi8(15);                                                 \
    float d[RWKVX_Q4I8_PASS], mn[RWKVX_Q4I8_PASS], c[RWKVX_Q4I8_AVX2_TILE][16] = {{0}};          \
    __m256 acc[RWKVX_Q4I8_AVX2_TILE][2];                                                         \
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)                                          \
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();                                             \
    for (ptrdiff_t g0 = 0; g0 < 2 * pairs; g0 += RWKVX_Q4I8_PASS) {                              \
        rwkvx_q4i8_params_avx2(m, i, g0, d, mn);                                                 \
        for (ptrdiff_t g = g0; g < g0 + RWKVX_Q4I8_PASS && g < G; g += 2) {                      \
            RWKVX_Q4I8_GROUP256(WORDS, g, 0);                                                    \
            if (g + 1 < G)                                                                       \
                RWKVX_Q4I8_GROUP256(WORDS, g + 1, 1);                                            \
        }                                                                                        \
        for (ptrdiff_t l = g0; l < g0 + RWKVX_Q4I8_PASS && l < lanes; l += 8) {                  \
            const __m256 dl = _mm256_loadu_ps(d + l - g0), ml = _mm256_loadu_ps(mn + l - g0);    \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                \
                float *cl = c[t] + l % 16;                                                       \
                const __m256 ce = _mm256_loadu_ps((const float *)(P + t * ldp + rwkvx_q4i8_ce(n)) + l); \
                const __m256 xs = _mm256_loadu_ps((const float *)(P + t * ldp + rwkvx_q4i8_x(n)) + l);  \
                _mm256_storeu_ps(cl, _mm256_fmadd_ps(ml, xs, _mm256_fmadd_ps(dl, ce, _mm256_loadu_ps(cl)))); \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                        \
        float la[16], s;                                                                         \
        _mm256_storeu_ps(la, acc[t][0]);                                                         \
        _mm256_storeu_ps(la + 8, acc[t][1]);                                                     \
        memcpy(&s, P + t * ldp + rwkvx_q4i8_s(n), sizeof s);                                     \
        y[t * ldy] = fmaf(rwkvx_tree16(la), s, rwkvx_tree16(c[t]));                              \
    }

/* Rows i .. i + n_r - 1 against every token, RWKVX_Q4I8_AVX2_TILE tokens a pass, by ROW. */
#define RWKVX_Q4I8_BLOCK256_BODY(ROW)                                                            \
    for (ptrdiff_t t = 0; t < n_tok; t += RWKVX_Q4I8_AVX2_TILE) {                                \
        const ptrdiff_t T = n_tok - t < RWKVX_Q4I8_AVX2_TILE ? n_tok - t : RWKVX_Q4I8_AVX2_TILE; \
        for (int r = 0; r < n_r; r++) {                                                          \
            float *y = Y + t * ldy + r;                                                          \
            switch (T) {                                                                         \
            case 1: ROW(m, i + r, n, P + t * ldp, ldp, 1, y, ldy); break;                        \
            case 2: ROW(m, i + r, n, P + t * ldp, ldp, 2, y, ldy); break;                        \
            case 3: ROW(m, i + r, n, P + t * ldp, ldp, 3, y, ldy); break;                        \
            default: ROW(m, i + r, n, P + t * ldp, ldp, 4, y, ldy); break;                       \
            }                                                                                    \
        }                                                                                        \
    }

/* The row and block functions for one target: AVX2, AVX-VNNI and its EVEX twin. */
#define RWKVX_Q4I8_256(TARGET, SUFFIX, WORDS)                                                    \
    TARGET static inline __attribute__((always_inline)) void rwkvx_q4i8_row_##SUFFIX(            \
        const rwkvx_q4 *m, ptrdiff_t i, ptrdiff_t n, const uint8_t *P, ptrdiff_t ldp, const int T, \
        float *y, ptrdiff_t ldy)                                                                 \
    {                                                                                            \
        RWKVX_Q4I8_ROW256_BODY(WORDS)                                                            \
    }                                                                                            \
    TARGET static void rwkvx_q4i8_block_##SUFFIX(const rwkvx_q4 *m, ptrdiff_t i, int n_r, ptrdiff_t n, \
                                                 const uint8_t *P, ptrdiff_t ldp, ptrdiff_t n_tok,  \
                                                 float *Y, ptrdiff_t ldy)                        \
    {                                                                                            \
        RWKVX_Q4I8_BLOCK256_BODY(rwkvx_q4i8_row_##SUFFIX)                                        \
    }

RWKVX_Q4I8_256(RWKVX_Q4I8_AVX2, avx2, RWKVX_Q4I8_WORDS_AVX2)
#if RWKVX_HAVE_AVXVNNI
#define RWKVX_Q4I8_WORDS_AVXVNNI(lo, hi, A) RWKVX_Q4I8_WORDS_DPBUSD(RWKVX_DPBUSD_AVXVNNI, lo, hi, A)
RWKVX_Q4I8_256(RWKVX_AVXVNNI, avxvnni, RWKVX_Q4I8_WORDS_AVXVNNI)
#endif
RWKVX_Q4I8_256(RWKVX_VNNI256, vnni256, RWKVX_Q4I8_WORDS_VNNI256)
#endif /* RWKVX_HAVE_X86_DISPATCH */

/* ---- dispatch ------------------------------------------------------------------------ */

/* Rows i .. i + n_r - 1 of m against n_tok prepared tokens P + t ldp (rwkvx_q4i8_prepare of
 * the same width): Y[t ldy + r] for r < n_r. prefetch: whether rows i + RWKVX_Q4I8_AHEAD .. + 3 exist,
 * to be fetched into cache while these are read. */
static inline void rwkvx_q4i8_block(const rwkvx_q4 *m, ptrdiff_t i, int n_r, const uint8_t *P, ptrdiff_t ldp,
                                    ptrdiff_t n_tok, float *Y, ptrdiff_t ldy, int prefetch)
{
    const ptrdiff_t n = m->n_cols;
#if RWKVX_HAVE_X86_DISPATCH
    const int level = rwkvx_i8_level();
    if (n_r == 4 && level == 2) {
        rwkvx_q4i8_block4_vnni(m, i, n, P, ldp, n_tok, Y, ldy, prefetch);
        rwkvx_i8_note_loops(2);
        return;
    }
    if (level >= 1) {
#if RWKVX_HAVE_AVXVNNI
        if (rwkvx_i8_vnni256 == 1)
            rwkvx_q4i8_block_avxvnni(m, i, n_r, n, P, ldp, n_tok, Y, ldy);
        else
#endif
        if (rwkvx_i8_vnni256 == 2)
            rwkvx_q4i8_block_vnni256(m, i, n_r, n, P, ldp, n_tok, Y, ldy);
        else
            rwkvx_q4i8_block_avx2(m, i, n_r, n, P, ldp, n_tok, Y, ldy);
        rwkvx_i8_note_loops(rwkvx_i8_vnni256 ? 2 + rwkvx_i8_vnni256 : 1);
        return;
    }
#endif
    (void)prefetch;
    rwkvx_i8_note_loops(0);
    for (ptrdiff_t t = 0; t < n_tok; t++)
        for (int r = 0; r < n_r; r++)
            Y[t * ldy + r] = rwkvx_q4i8_dot(m, i + r, P + t * ldp, n);
}

#endif /* RWKVX_Q4INT8_H */
