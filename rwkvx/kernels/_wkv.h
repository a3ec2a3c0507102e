/* One token's step of the WKV recurrences for one head, as portable C and as AVX2 and
 * AVX-512 versions picked by the caller (the level of _matvec's rwkvx_detect_simd).
 *
 * Every version gives the same bits. RWKV-7's two dot products per state row are summed in
 * 16 lanes (lane l takes the columns j with j % 16 == l, in order) and the lanes are added
 * in one fixed tree; the AVX2 version holds the 16 lanes in two registers, AVX-512 in one,
 * the portable one in an array. RWKV-5/6's step has no sums across columns, so its vector
 * versions are the same loop compiled for wider registers. No FMA anywhere: the portable
 * build may not have it, and a fused multiply-add rounds differently.
 */
#ifndef RWKVX_WKV_H
#define RWKVX_WKV_H

#include <stddef.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define RWKVX_WKV_X86 1
#include <immintrin.h>
#else
#define RWKVX_WKV_X86 0
#endif

/* ---- RWKV-7 -------------------------------------------------------------------------- */

static inline float rwkvx_tree16(const float *a)
{
    float r8[8], r4[4];
    for (int l = 0; l < 8; l++)
        r8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++)
        r4[l] = r8[l] + r8[l + 4];
    return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

/* For the N rows i of a head's state (values x keys, row-major), with src the state before
 * the token (may be s itself):
 *   s[i, j] = src[i, j] w[j] - (src[i, :] . kk) b[j] + v[i] k[j];   y[i] = s[i, :] . r */
static void rwkvx_wkv7_token_portable(ptrdiff_t N, const float *src, float *s, const float *r, const float *w,
                                      const float *k, const float *v, const float *kk, const float *b, float *y)
{
    for (ptrdiff_t i = 0; i < N; i++) {
        const float *si_src = src + i * N;
        float *si = s + i * N;
        float acc[16] = {0};
        ptrdiff_t j = 0;
        for (; j + 16 <= N; j += 16)
            for (int l = 0; l < 16; l++)
                acc[l] = acc[l] + si_src[j + l] * kk[j + l];
        for (int l = 0; j + l < N; l++)
            acc[l] = acc[l] + si_src[j + l] * kk[j + l];
        const float sa = rwkvx_tree16(acc), vi = v[i];
        float out[16] = {0};
        for (j = 0; j + 16 <= N; j += 16)
            for (int l = 0; l < 16; l++) {
                const float x = si_src[j + l] * w[j + l] - sa * b[j + l] + vi * k[j + l];
                si[j + l] = x;
                out[l] = out[l] + x * r[j + l];
            }
        for (int l = 0; j + l < N; l++) {
            const float x = si_src[j + l] * w[j + l] - sa * b[j + l] + vi * k[j + l];
            si[j + l] = x;
            out[l] = out[l] + x * r[j + l];
        }
        y[i] = rwkvx_tree16(out);
    }
}

#if RWKVX_WKV_X86
/* (r4[0] + r4[2]) + (r4[1] + r4[3]), as rwkvx_tree16 ends */
__attribute__((target("avx2"))) static inline float rwkvx_tree4_sse(__m128 r4)
{
    const __m128 t = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2"))) static inline float rwkvx_tree16_avx2(__m256 lo, __m256 hi)
{
    const __m256 r8 = _mm256_add_ps(lo, hi);
    return rwkvx_tree4_sse(_mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1)));
}

/* N a multiple of 16 */
__attribute__((target("avx2"))) static void rwkvx_wkv7_token_avx2(ptrdiff_t N, const float *src, float *s,
                                                                  const float *r, const float *w, const float *k,
                                                                  const float *v, const float *kk, const float *b,
                                                                  float *y)
{
    for (ptrdiff_t i = 0; i < N; i++) {
        const float *si_src = src + i * N;
        float *si = s + i * N;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < N; j += 16) {
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(si_src + j), _mm256_loadu_ps(kk + j)));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(si_src + j + 8), _mm256_loadu_ps(kk + j + 8)));
        }
        const __m256 sa = _mm256_set1_ps(rwkvx_tree16_avx2(lo, hi)), vi = _mm256_set1_ps(v[i]);
        lo = _mm256_setzero_ps();
        hi = _mm256_setzero_ps();
        for (ptrdiff_t j = 0; j < N; j += 8) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(si_src + j), _mm256_loadu_ps(w + j));
            x = _mm256_sub_ps(x, _mm256_mul_ps(sa, _mm256_loadu_ps(b + j)));
            x = _mm256_add_ps(x, _mm256_mul_ps(vi, _mm256_loadu_ps(k + j)));
            _mm256_storeu_ps(si + j, x);
            if ((j & 8) == 0)
                lo = _mm256_add_ps(lo, _mm256_mul_ps(x, _mm256_loadu_ps(r + j)));
            else
                hi = _mm256_add_ps(hi, _mm256_mul_ps(x, _mm256_loadu_ps(r + j)));
        }
        y[i] = rwkvx_tree16_avx2(lo, hi);
    }
}

__attribute__((target("avx512f,avx2"))) static inline float rwkvx_tree16_avx512(__m512 acc)
{
    const __m256 lo = _mm512_castps512_ps256(acc);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    return rwkvx_tree16_avx2(lo, hi);
}

/* N a multiple of 16 (so of 4). Four rows at a time: each row's sums are one dependent chain ending
 * in a horizontal sum, and four independent chains keep the vector units busy (the WKV of
 * a 512-token prompt on the 0.4B shape: 0.25 ms a token with one row at a time). Each row's
 * operations are those of the row-by-row loop, so the bits are the same. */
__attribute__((target("avx512f,avx2"))) static void rwkvx_wkv7_token_avx512(ptrdiff_t N, const float *src,
                                                                           float *s, const float *r,
                                                                           const float *w, const float *k,
                                                                           const float *v, const float *kk,
                                                                           const float *b, float *y)
{
    for (ptrdiff_t i = 0; i < N; i += 4) {
        __m512 acc[4], sa[4], vi[4];
        for (int q = 0; q < 4; q++)
            acc[q] = _mm512_setzero_ps();
        for (ptrdiff_t j = 0; j < N; j += 16) {
            const __m512 kkj = _mm512_loadu_ps(kk + j);
            for (int q = 0; q < 4; q++)
                acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(_mm512_loadu_ps(src + (i + q) * N + j), kkj));
        }
        for (int q = 0; q < 4; q++) {
            sa[q] = _mm512_set1_ps(rwkvx_tree16_avx512(acc[q]));
            vi[q] = _mm512_set1_ps(v[i + q]);
            acc[q] = _mm512_setzero_ps();
        }
        for (ptrdiff_t j = 0; j < N; j += 16) {
            const __m512 wj = _mm512_loadu_ps(w + j), bj = _mm512_loadu_ps(b + j);
            const __m512 kj = _mm512_loadu_ps(k + j), rj = _mm512_loadu_ps(r + j);
            for (int q = 0; q < 4; q++) {
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + (i + q) * N + j), wj);
                x = _mm512_sub_ps(x, _mm512_mul_ps(sa[q], bj));
                x = _mm512_add_ps(x, _mm512_mul_ps(vi[q], kj));
                _mm512_storeu_ps(s + (i + q) * N + j, x);
                acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(x, rj));
            }
        }
        for (int q = 0; q < 4; q++)
            y[i + q] = rwkvx_tree16_avx512(acc[q]);
    }
}
#endif

static void rwkvx_wkv7_token(int level, ptrdiff_t N, const float *src, float *s, const float *r, const float *w,
                             const float *k, const float *v, const float *kk, const float *b, float *y)
{
#if RWKVX_WKV_X86
    if (N % 16 == 0 && level >= 2)
        return rwkvx_wkv7_token_avx512(N, src, s, r, w, k, v, kk, b, y);
    if (N % 16 == 0 && level >= 1)
        return rwkvx_wkv7_token_avx2(N, src, s, r, w, k, v, kk, b, y);
#endif
    rwkvx_wkv7_token_portable(N, src, s, r, w, k, v, kk, b, y);
}

/* ---- RWKV-5.2 / 6 -------------------------------------------------------------------- */

/* For keys i and values j of a head (state keys x values, row-major), src as above:
 *   y[j] = sum_i r[i] (u[i] k[i] v[j] + src[i, j]);  s[i, j] = w[i] src[i, j] + k[i] v[j]
 * y is summed over i in order, column by column: any vector width gives the same bits. */
#define RWKVX_WKV5_TOKEN(SUFFIX, ATTR)                                                            \
    ATTR static void rwkvx_wkv5_token_##SUFFIX(ptrdiff_t N, const float *src, float *s, const float *r, \
                                               const float *k, const float *v, const float *w,     \
                                               const float *u, float *y)                           \
    {                                                                                            \
        for (ptrdiff_t j = 0; j < N; j++)                                                        \
            y[j] = 0.0f;                                                                         \
        for (ptrdiff_t i = 0; i < N; i++) {                                                      \
            const float ri = r[i], ki = k[i], wi = w[i], ui = u[i];                              \
            const float *si_src = src + i * N; /* may be si: read before written */                 \
            float *si = s + i * N;                                                               \
            for (ptrdiff_t j = 0; j < N; j++) {                                                  \
                const float kv = ki * v[j];                                                      \
                const float old = si_src[j];                                                     \
                y[j] = y[j] + ri * (ui * kv + old);                                              \
                si[j] = old * wi + kv;                                                           \
            }                                                                                    \
        }                                                                                        \
    }

RWKVX_WKV5_TOKEN(portable, )
#if RWKVX_WKV_X86
RWKVX_WKV5_TOKEN(avx2, __attribute__((target("avx2"))))
RWKVX_WKV5_TOKEN(avx512, __attribute__((target("avx512f,avx2"))))
#endif

static void rwkvx_wkv5_token(int level, ptrdiff_t N, const float *src, float *s, const float *r, const float *k,
                             const float *v, const float *w, const float *u, float *y)
{
#if RWKVX_WKV_X86
    if (level >= 2)
        return rwkvx_wkv5_token_avx512(N, src, s, r, k, v, w, u, y);
    if (level >= 1)
        return rwkvx_wkv5_token_avx2(N, src, s, r, k, v, w, u, y);
#endif
    rwkvx_wkv5_token_portable(N, src, s, r, k, v, w, u, y);
}

#endif
