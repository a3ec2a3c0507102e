/* Integer products of uint8 matrices: the opt-in int8 arithmetic (load(arithmetic="int8")).
 *
 * A uint8 product needs the raw dot products q[i] . xr of the rows of q with xr = rx * x
 * (see _prepare_u8 in _matvec.pyx). With int8 arithmetic each token's xr is first rounded
 * to int8 with one scale per token,
 *     s = max_j |xr[j]| / 127,    a[j] = round_half_even(xr[j] * (127 / max_j |xr[j]|)),
 * so that |a[j]| <= 127 and xr ~ s a, and the dot product is taken exactly in integers:
 *     q[i] . xr ~ s (q[i] . a).
 * Each term q[i, j] a[j] is at most 255 * 127 in magnitude, so RWKVX_I8_CHUNK = 65536
 * columns sum exactly in int32 (255 * 127 * 65536 < 2^31); wider rows add such chunks in
 * int64. vpdpbusd (u8 x s8, four products into each 32-bit lane) does not saturate; its
 * sibling vpdpbusds would, and is not used.
 *
 * An integer sum is the same in any order. So the result does not depend on the thread
 * count, on the SIMD level, or on which tokens are computed together: every path below
 * gives the same bits by construction, not by keeping summation orders in step. The sum
 * becomes a float once, (float)sum * s (each rounded to nearest even), and is finished as
 * a float32 uint8 product is: rwkvx_u8_finish's operations in its order (rwkvx_i8_finish1;
 * rwkvx_i8_finish4 repeats them on four rows at once in SSE registers). The sums per token
 * (scale, and half_xr with a correction for the rounding) come from _prepare in
 * _matvec.pyx, which also keeps one-token products on the float32 path.
 *
 * Levels: AVX-512 VNNI (with AVX-512BW's masked byte loads for the last columns) at SIMD
 * level 2 where the CPU has it; else at level 1 AVX-VNNI's 256-bit vpdpbusd where the CPU
 * has it, or AVX2's vpmaddwd on bytes widened to 16 bits; else plain C loops (GCC
 * vectorises an integer sum, which it may reorder).
 */
#ifndef RWKVX_INT8_H
#define RWKVX_INT8_H

#include <float.h>
#include <math.h>

#include "_simd.h"

/* AVX-VNNI's loops: x86, and a compiler that knows the instruction set (GCC 11, clang
 * 12); elsewhere level 1 keeps AVX2's. */
#ifndef RWKVX_HAVE_AVXVNNI
#if !RWKVX_HAVE_X86_DISPATCH
#define RWKVX_HAVE_AVXVNNI 0
#elif defined(__apple_build_version__)
#define RWKVX_HAVE_AVXVNNI (__clang_major__ >= 14)
#elif defined(__clang__)
#define RWKVX_HAVE_AVXVNNI (__clang_major__ >= 12)
#else
#define RWKVX_HAVE_AVXVNNI (__GNUC__ >= 11)
#endif
#endif
#if RWKVX_HAVE_AVXVNNI
#include <cpuid.h>
#endif

/* Columns summed in int32 before a row's partial sums are added in int64. */
#define RWKVX_I8_CHUNK 65536

/* Tokens per pass of the VNNI tile: 4 rows x 4 tokens = 16 accumulators. Measured with
 * 2 threads on a Zen 4 (4096 x 1024 uint8, 128 tokens, matrix in cache): 4 tokens 1.4 ms,
 * 5 tokens 2.0, 6 tokens 2.8 (24 accumulators, the rows and an input need 29 of the 32
 * registers, and GCC's code for them is slower). */
#define RWKVX_I8_TILE 4

/* Bytes from one token's int8 inputs to the next in a matrix-matrix product: whole
 * cache lines. */
static inline ptrdiff_t rwkvx_i8_stride(ptrdiff_t n) { return (n + 63) / 64 * 64; }

/* 1 if the CPU has AVX-512 VNNI and BW (set by rwkvx_i8_detect). */
static int rwkvx_i8_has_vnni = 0;
/* Which 256-bit vpdpbusd level 1's loops use: 0 none (AVX2's vpmaddwd), 1 AVX-VNNI's, 2
 * the EVEX twin (see "256-bit VNNI" below). rwkvx_i8_detect sets 1 where the CPU has
 * AVX-VNNI; 2 only by request (tests). */
static int rwkvx_i8_vnni256 = 0;
/* The loops the last int8 block ran (tests): 0 plain C, 1 AVX2, 2 AVX-512 VNNI, 3 AVX-VNNI,
 * 4 AVX-VNNI's EVEX twin. */
static int rwkvx_i8_last_loops = -1;

/* Written only when it changes: every thread's every block of rows notes its loops, and
 * storing each time would bounce one shared line between the cores. (Measured: within
 * noise either way, RWKV-4 0.4B q4 decoding 8.6 against 8.7 ms/token in alternating
 * processes; the read costs nothing measurable either.) */
static inline void rwkvx_i8_note_loops(int loops)
{
    if (rwkvx_i8_last_loops != loops)
        rwkvx_i8_last_loops = loops;
}

static inline void rwkvx_i8_detect(void)
{
#if RWKVX_HAVE_X86_DISPATCH
    __builtin_cpu_init();
    rwkvx_i8_has_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vnni");
#if RWKVX_HAVE_AVXVNNI
    /* CPUID leaf 7, subleaf 1, EAX bit 4 (compilers' __builtin_cpu_supports learnt the name
     * later than the instructions); AVX's OS support is level 1's own condition */
    unsigned a = 0, b = 0, c = 0, d = 0;
    rwkvx_i8_vnni256 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1) ? 1 : 0;
#endif
#endif
}

/* ---- rounding the input ------------------------------------------------------------ */

/* 127 / max|xr| for a token whose largest |xr| has the float bits amax_bits (sign
 * cleared), and its scale s in *scale: 0 and 0 when every value rounds to zero (all zero,
 * or so small that 127 / max is not finite); 0 and NaN when xr holds a NaN or an infinity,
 * so that the product is NaN, as the float32 product would be NaN or infinite. */
static inline float rwkvx_i8_inverse(uint32_t amax_bits, float *scale)
{
    if (amax_bits >= 0x7f800000u) {
        *scale = NAN;
        return 0.0f;
    }
    float amax;
    memcpy(&amax, &amax_bits, sizeof amax);
    const float inv = 127.0f / amax;
    if (!(inv <= FLT_MAX)) {
        *scale = 0.0f;
        return 0.0f;
    }
    *scale = amax / 127.0f;
    return inv;
}

static inline uint32_t rwkvx_abs_bits(float v)
{
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b & 0x7fffffffu;
}

/* The largest |xr[j]| as float bits: an integer maximum of the magnitudes' bits, which
 * is exact in any order and puts NaN above infinity above every finite value. */
#define RWKVX_I8_AMAX_BODY                                                                   \
    uint32_t m = 0;                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) {                                                      \
        uint32_t b = rwkvx_abs_bits(xr[j]);                                                  \
        m = b > m ? b : m;                                                                   \
    }                                                                                        \
    return m;

/* a[j] = round(xr[j] * inv) (nearest, ties to even: lrintf in the default rounding mode)
 * in [-127, 127]; returns the sum of the a[j]. a may be xr's own bytes: each a[j] is
 * written after xr[j] is read, and never over an xr[k] with k > j. */
#define RWKVX_I8_ROUND_BODY                                                                  \
    int32_t total = 0;                                                                       \
    for (ptrdiff_t j = 0; j < n; j++) {                                                      \
        int32_t v = (int32_t)lrintf(xr[j] * inv);                                            \
        v = v > 127 ? 127 : v < -127 ? -127 : v;                                             \
        a[j] = (int8_t)v;                                                                    \
        total += v;                                                                          \
    }                                                                                        \
    return total;

static uint32_t rwkvx_i8_amax_portable(const float *xr, ptrdiff_t n) { RWKVX_I8_AMAX_BODY }

static int32_t rwkvx_i8_round_portable(const float *xr, ptrdiff_t n, float inv, int8_t *a)
{
    RWKVX_I8_ROUND_BODY
}

/* ---- exact dot products, plain C ------------------------------------------------------ */

/* sum_j q[j] a[j] over n <= RWKVX_I8_CHUNK columns, exact in int32. */
#define RWKVX_I8_DOT_BODY                                                                    \
    int32_t acc = 0;                                                                         \
    for (ptrdiff_t j = 0; j < n; j++)                                                        \
        acc += (int32_t)q[j] * (int32_t)a[j];                                                \
    return acc;

static int32_t rwkvx_i8_dot_portable(const uint8_t *q, const int8_t *a, ptrdiff_t n)
{
    RWKVX_I8_DOT_BODY
}

#if RWKVX_HAVE_X86_DISPATCH
/* The same loops compiled for AVX2: the same integers, computed eight lanes at a time. */
#define RWKVX_I8_AVX2 __attribute__((target("avx2")))

RWKVX_I8_AVX2 static uint32_t rwkvx_i8_amax_avx2(const float *xr, ptrdiff_t n) { RWKVX_I8_AMAX_BODY }

RWKVX_I8_AVX2 static int32_t rwkvx_i8_round_avx2(const float *xr, ptrdiff_t n, float inv, int8_t *a)
{
    RWKVX_I8_ROUND_BODY
}

RWKVX_I8_AVX2 static int32_t rwkvx_i8_dot_avx2(const uint8_t *q, const int8_t *a, ptrdiff_t n)
{
    RWKVX_I8_DOT_BODY
}

/* rwkvx_i8_finish1 on four rows of one token: ry (s sum + half_xr) + my x + mx, the same
 * operations in the same order, in SSE registers. */
RWKVX_I8_AVX2 static inline __m128 rwkvx_i8_finish4(__m128i sum4, __m128 ry, __m128 my,
                                                    const rwkvx_u8_sums *u)
{
    __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(sum4), _mm_set1_ps(u->scale));
    y = _mm_mul_ps(ry, _mm_add_ps(y, _mm_set1_ps(u->half_xr)));
    y = _mm_add_ps(y, _mm_mul_ps(my, _mm_set1_ps(u->x)));
    return _mm_add_ps(y, _mm_set1_ps(u->mx));
}

/* Tokens per pass of the AVX2 tile: 4 rows x 2 tokens = 8 accumulators, with the rows'
 * weights and an input, in 13 of the 16 registers. */
#define RWKVX_I8_TILE_AVX2 2

/* The four sums of a, b, c, d's eight lanes in one register. */
RWKVX_I8_AVX2 static inline __m128i rwkvx_i8_hsum4_avx2(__m256i a, __m256i b, __m256i c, __m256i d)
{
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* The end of a pass of the 256-bit loops over tokens x0 and x1 (x1 == x0 if T is 1): the
 * lanes c[k] summed, columns `done` .. n - 1 added in scalar code, and the four rows'
 * products of each token finished into Y[k ldy]. */
RWKVX_I8_AVX2 static inline __attribute__((always_inline)) void
rwkvx_i8_pass_avx2(__m256i c[2][4], int T, const uint8_t *q, ptrdiff_t n, ptrdiff_t done,
                   const int8_t *x0, const int8_t *x1, __m128 vry, __m128 vmy,
                   const rwkvx_u8_sums *sums, float *Y, ptrdiff_t ldy)
{
    for (int k = 0; k < T; k++) {
        const int8_t *x = k ? x1 : x0;
        __m128i s4 = rwkvx_i8_hsum4_avx2(c[k][0], c[k][1], c[k][2], c[k][3]);
        if (done < n) {
            int32_t rest[4];
            _mm_storeu_si128((__m128i *)rest, s4);
            for (int r = 0; r < 4; r++)
                for (ptrdiff_t j = done; j < n; j++)
                    rest[r] += (int32_t)q[r * n + j] * (int32_t)x[j];
            s4 = _mm_loadu_si128((const __m128i *)rest);
        }
        _mm_storeu_ps(Y + k * ldy, rwkvx_i8_finish4(s4, vry, vmy, sums + k));
    }
}

/* rwkvx_i8_block4_vnni without VNNI: sixteen columns a step, widened to 16 bits (u8 and
 * s8 both fit int16) and multiplied in pairs into 32-bit lanes by vpmaddwd, which is exact
 * (2 x 255 x 127 < 2^15 x 2); the last columns in scalar code. GCC's own vectorisation of
 * rwkvx_i8_dot_avx2 took 2.5x as long as the float32 product (4096 x 1024, 8 and 128
 * tokens, 2 threads). n <= RWKVX_I8_CHUNK. */
RWKVX_I8_AVX2 static void rwkvx_i8_block4_avx2(const uint8_t *q, ptrdiff_t n, const int8_t *A,
                                              ptrdiff_t lda, ptrdiff_t n_tok, const float *ry,
                                              const float *my, const rwkvx_u8_sums *sums, float *Y,
                                              ptrdiff_t ldy)
{
    const __m128 vry = _mm_loadu_ps(ry), vmy = _mm_loadu_ps(my);
    const ptrdiff_t n16 = n / 16 * 16;
    for (ptrdiff_t t = 0; t < n_tok; t += RWKVX_I8_TILE_AVX2) {
        const int T = n_tok - t < RWKVX_I8_TILE_AVX2 ? (int)(n_tok - t) : RWKVX_I8_TILE_AVX2;
        const int8_t *x0 = A + t * lda, *x1 = T > 1 ? x0 + lda : x0;
        __m256i c[2][4];
        for (int k = 0; k < 8; k++)
            c[k / 4][k % 4] = _mm256_setzero_si256();
        for (ptrdiff_t j = 0; j < n16; j += 16) {
            __m256i w[4];
            for (int r = 0; r < 4; r++)
                w[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + r * n + j)));
            const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x0 + j)));
            const __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x1 + j)));
            for (int r = 0; r < 4; r++) {
                c[0][r] = _mm256_add_epi32(c[0][r], _mm256_madd_epi16(w[r], a0));
                c[1][r] = _mm256_add_epi32(c[1][r], _mm256_madd_epi16(w[r], a1));
            }
        }
        rwkvx_i8_pass_avx2(c, T, q, n, n16, x0, x1, vry, vmy, sums + t, Y + t * ldy, ldy);
    }
}

/* ---- 256-bit VNNI (AVX-VNNI) ---------------------------------------------------------
 * Intel's client cores since Alder Lake (and its E-core Xeons) have vpdpbusd on 256-bit
 * registers without AVX-512: AVX-VNNI, the VEX form of the instruction. Level 1 uses it
 * where the CPU has it: 32 columns of four rows against a byte of two tokens each step,
 * one instruction per row and token where AVX2 needs two widenings, a vpmaddwd and an add
 * per 16 columns. The sums are exact, so the bits are the AVX2 loop's. Each loop is
 * compiled twice from one body: for AVX-VNNI, and for AVX-512 VNNI + VL, whose EVEX form
 * of the instruction computes the same; that twin lets the tests run the loop on CPUs with
 * AVX-512 but not AVX-VNNI (set_int8_vnni256 in _matvec.pyx). */

#define RWKVX_VNNI256 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define RWKVX_DPBUSD_VNNI256(c, w, x) _mm256_dpbusd_epi32(c, w, x)
#if RWKVX_HAVE_AVXVNNI
#define RWKVX_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define RWKVX_DPBUSD_AVXVNNI(c, w, x) _mm256_dpbusd_avx_epi32(c, w, x)
#endif

/* rwkvx_i8_block4_avx2 with DPBUSD(c, w, x) (c + the four-byte sums of w x per 32-bit
 * lane) on 32 columns a step. */
#define RWKVX_I8_BLOCK4_256_BODY(DPBUSD)                                                     \
    const __m128 vry = _mm_loadu_ps(ry), vmy = _mm_loadu_ps(my);                             \
    const ptrdiff_t n32 = n / 32 * 32;                                                       \
    for (ptrdiff_t t = 0; t < n_tok; t += RWKVX_I8_TILE_AVX2) {                               \
        const int T = n_tok - t < RWKVX_I8_TILE_AVX2 ? (int)(n_tok - t) : RWKVX_I8_TILE_AVX2;  \
        const int8_t *x0 = A + t * lda, *x1 = T > 1 ? x0 + lda : x0;                         \
        __m256i c[2][4];                                                                     \
        for (int k = 0; k < 8; k++)                                                          \
            c[k / 4][k % 4] = _mm256_setzero_si256();                                        \
        for (ptrdiff_t j = 0; j < n32; j += 32) {                                            \
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(x0 + j));                \
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(x1 + j));                \
            for (int r = 0; r < 4; r++) {                                                    \
                const __m256i w = _mm256_loadu_si256((const __m256i *)(q + r * n + j));      \
                c[0][r] = DPBUSD(c[0][r], w, a0);                                            \
                c[1][r] = DPBUSD(c[1][r], w, a1);                                            \
            }                                                                                \
        }                                                                                    \
        rwkvx_i8_pass_avx2(c, T, q, n, n32, x0, x1, vry, vmy, sums + t, Y + t * ldy, ldy);   \
    }

#if RWKVX_HAVE_AVXVNNI
RWKVX_AVXVNNI static void rwkvx_i8_block4_avxvnni(const uint8_t *q, ptrdiff_t n, const int8_t *A,
                                                 ptrdiff_t lda, ptrdiff_t n_tok, const float *ry,
                                                 const float *my, const rwkvx_u8_sums *sums,
                                                 float *Y, ptrdiff_t ldy)
{
    RWKVX_I8_BLOCK4_256_BODY(RWKVX_DPBUSD_AVXVNNI)
}
#endif

RWKVX_VNNI256 static void rwkvx_i8_block4_vnni256(const uint8_t *q, ptrdiff_t n, const int8_t *A,
                                                 ptrdiff_t lda, ptrdiff_t n_tok, const float *ry,
                                                 const float *my, const rwkvx_u8_sums *sums,
                                                 float *Y, ptrdiff_t ldy)
{
    RWKVX_I8_BLOCK4_256_BODY(RWKVX_DPBUSD_VNNI256)
}

/* ---- AVX-512 VNNI ------------------------------------------------------------------- */

#define RWKVX_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2")))

/* Bytes j .. n - 1 (fewer than 64) of a row, zeros after: the last step's columns. */
RWKVX_VNNI static inline __m512i rwkvx_i8_tail64(const void *p, ptrdiff_t count)
{
    return _mm512_maskz_loadu_epi8((__mmask64)((1ULL << count) - 1), p);
}

RWKVX_VNNI static uint32_t rwkvx_i8_amax_vnni(const float *xr, ptrdiff_t n)
{
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    __m512i m = _mm512_setzero_si512();
    ptrdiff_t j = 0;
    for (; j + 16 <= n; j += 16)
        m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(xr + j), magnitude));
    if (j < n)
        m = _mm512_max_epu32(m, _mm512_and_si512(
                                    _mm512_maskz_loadu_epi32((__mmask16)((1u << (n - j)) - 1), xr + j),
                                    magnitude));
    return _mm512_reduce_max_epu32(m);
}

/* As rwkvx_i8_round_portable: vcvtps2dq rounds to nearest even, like lrintf. */
RWKVX_VNNI static int32_t rwkvx_i8_round_vnni(const float *xr, ptrdiff_t n, float inv, int8_t *a)
{
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    __m512i total = _mm512_setzero_si512();
    ptrdiff_t j = 0;
    for (; j < n; j += 16) {
        const __mmask16 mask = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + j), vinv),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        total = _mm512_add_epi32(total, v);
        _mm512_mask_cvtepi32_storeu_epi8(a + j, mask, v);
    }
    return _mm512_reduce_add_epi32(total);
}

RWKVX_VNNI static int32_t rwkvx_i8_dot_vnni(const uint8_t *q, const int8_t *a, ptrdiff_t n)
{
    __m512i acc = _mm512_setzero_si512();
    ptrdiff_t j = 0;
    for (; j + 64 <= n; j += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(q + j), _mm512_loadu_si512(a + j));
    if (j < n)
        acc = _mm512_dpbusd_epi32(acc, rwkvx_i8_tail64(q + j, n - j), rwkvx_i8_tail64(a + j, n - j));
    return _mm512_reduce_add_epi32(acc);
}

/* The four sums of a, b, c, d's sixteen lanes in one register (exact: integers). */
RWKVX_VNNI static inline __m128i rwkvx_i8_hsum4(__m512i a, __m512i b, __m512i c, __m512i d)
{
#define RWKVX_HALVES(v) _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(RWKVX_HALVES(a), RWKVX_HALVES(b)),
                                     _mm256_hadd_epi32(RWKVX_HALVES(c), RWKVX_HALVES(d)));
#undef RWKVX_HALVES
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* Rows q .. q + 3n against T (a constant) tokens A + t lda: sums[t] holds the four rows'
 * exact sums for token t. n <= RWKVX_I8_CHUNK. next, if not NULL: `share` bytes from there
 * (this pass's part of the next block of rows) are fetched into cache at the pace the
 * columns are read. */
RWKVX_VNNI static inline __attribute__((always_inline)) void
rwkvx_i8_tile4_vnni(const uint8_t *q, ptrdiff_t n, const int8_t *A, ptrdiff_t lda, const int T,
                    const uint8_t *next, ptrdiff_t share, const int l2, __m128i *sums)
{
    const uint8_t *q0 = q, *q1 = q + n, *q2 = q + 2 * n, *q3 = q + 3 * n;
    __m512i c[RWKVX_I8_TILE][4];
#pragma GCC unroll 16
    for (int k = 0; k < 4 * T; k++)
        c[k / 4][k % 4] = _mm512_setzero_si512();
    ptrdiff_t j = 0;
    for (; j + 64 <= n; j += 64) {
        if (next)
            for (ptrdiff_t b = share * j / n / 64 * 64; b < share * (j + 64) / n; b += 64) {
                if (l2) _mm_prefetch((const char *)next + b, _MM_HINT_T1);
                else _mm_prefetch((const char *)next + b, _MM_HINT_T0);
            }
        const __m512i w0 = _mm512_loadu_si512(q0 + j), w1 = _mm512_loadu_si512(q1 + j);
        const __m512i w2 = _mm512_loadu_si512(q2 + j), w3 = _mm512_loadu_si512(q3 + j);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m512i x = _mm512_loadu_si512(A + t * lda + j);
            c[t][0] = _mm512_dpbusd_epi32(c[t][0], w0, x);
            c[t][1] = _mm512_dpbusd_epi32(c[t][1], w1, x);
            c[t][2] = _mm512_dpbusd_epi32(c[t][2], w2, x);
            c[t][3] = _mm512_dpbusd_epi32(c[t][3], w3, x);
        }
    }
    if (j < n) {
        const ptrdiff_t count = n - j;
        const __m512i w0 = rwkvx_i8_tail64(q0 + j, count), w1 = rwkvx_i8_tail64(q1 + j, count);
        const __m512i w2 = rwkvx_i8_tail64(q2 + j, count), w3 = rwkvx_i8_tail64(q3 + j, count);
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m512i x = rwkvx_i8_tail64(A + t * lda + j, count);
            c[t][0] = _mm512_dpbusd_epi32(c[t][0], w0, x);
            c[t][1] = _mm512_dpbusd_epi32(c[t][1], w1, x);
            c[t][2] = _mm512_dpbusd_epi32(c[t][2], w2, x);
            c[t][3] = _mm512_dpbusd_epi32(c[t][3], w3, x);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        sums[t] = rwkvx_i8_hsum4(c[t][0], c[t][1], c[t][2], c[t][3]);
}

/* Four rows against every token, finished: Y[t ldy + r] for r < 4 (see rwkvx_i8_block).
 * Tokens go in passes of at most RWKVX_I8_TILE, of even sizes (7 tokens: 4 + 3); later
 * passes find the rows in cache. Each pass fetches an equal part of the next block, so
 * that memory keeps streaming while the later passes compute. Measured on a busy Zen 4,
 * one thread, four 50276 x 1024 matrices (out of cache), best of 8 rounds in 4 runs:
 * 8 tokens 2.9-4.1 ms per matrix against 3.2-4.4 with the first pass fetching it all; 1
 * token (one pass either way, the same lines, a loop instead of four unrolled prefetches)
 * 2.8-3.8 against 4.1-4.4. */
RWKVX_VNNI static void rwkvx_i8_block4_vnni(const uint8_t *q, ptrdiff_t n, const int8_t *A,
                                           ptrdiff_t lda, ptrdiff_t n_tok, const float *ry,
                                           const float *my, const rwkvx_u8_sums *sums, float *Y,
                                           ptrdiff_t ldy, const uint8_t *next)
{
    const __m128 vry = _mm_loadu_ps(ry), vmy = _mm_loadu_ps(my);
    __m128i s[RWKVX_I8_TILE];
    const ptrdiff_t all = (n_tok + RWKVX_I8_TILE - 1) / RWKVX_I8_TILE;
    /* a product of one or two passes (up to 8 tokens) streams the matrix once, bound by
     * memory: the next block goes to L2 as in dot4 (_simd.h), which took batched steps of
     * 2-8 sequences 9-13% faster (RWKV-4 0.4B, int8 arithmetic, interleaved in one
     * process; 1.5B: 2 sequences 76.2 -> 49.4 ms); more passes reuse each block from L1 */
    const int l2 = all <= 2 && 4 * n >= RWKVX_DOT4_L2_BLOCK;
    ptrdiff_t t = 0, pass = 0;
    while (t < n_tok) {
        const ptrdiff_t passes = all - pass;
        const int T = (int)((n_tok - t + passes - 1) / passes);
        const int8_t *X = A + t * lda;
        const ptrdiff_t from = 4 * n * pass / all, share = 4 * n * (pass + 1) / all - from;
        const uint8_t *ahead = next ? next + from : NULL;
        switch (T) {
        case 1: rwkvx_i8_tile4_vnni(q, n, X, lda, 1, ahead, share, l2, s); break;
        case 2: rwkvx_i8_tile4_vnni(q, n, X, lda, 2, ahead, share, l2, s); break;
        case 3: rwkvx_i8_tile4_vnni(q, n, X, lda, 3, ahead, share, l2, s); break;
        default: rwkvx_i8_tile4_vnni(q, n, X, lda, 4, ahead, share, l2, s); break;
        }
        for (int k = 0; k < T; k++)
            _mm_storeu_ps(Y + (t + k) * ldy, rwkvx_i8_finish4(s[k], vry, vmy, sums + t + k));
        pass++;
        t += T;
    }
}
#endif /* RWKVX_HAVE_X86_DISPATCH */

/* ---- dispatch ------------------------------------------------------------------------ */

/* 2: AVX-512 VNNI; 1: the C loops for AVX2; 0: the C loops for the baseline. */
static inline int rwkvx_i8_level(void)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (rwkvx_simd_level >= 2 && rwkvx_i8_has_vnni)
        return 2;
    return rwkvx_simd_level >= 1 ? 1 : 0;
#else
    return 0;
#endif
}

static inline uint32_t rwkvx_i8_amax(const float *xr, ptrdiff_t n)
{
#if RWKVX_HAVE_X86_DISPATCH
    const int level = rwkvx_i8_level();
    if (level == 2)
        return rwkvx_i8_amax_vnni(xr, n);
    if (level == 1)
        return rwkvx_i8_amax_avx2(xr, n);
#endif
    return rwkvx_i8_amax_portable(xr, n);
}

static inline int32_t rwkvx_i8_round(const float *xr, ptrdiff_t n, float inv, int8_t *a)
{
#if RWKVX_HAVE_X86_DISPATCH
    const int level = rwkvx_i8_level();
    if (level == 2)
        return rwkvx_i8_round_vnni(xr, n, inv, a);
    if (level == 1)
        return rwkvx_i8_round_avx2(xr, n, inv, a);
#endif
    return rwkvx_i8_round_portable(xr, n, inv, a);
}

/* One token's xr (n floats) rounded to int8 in a (may be xr's own bytes, see
 * RWKVX_I8_ROUND_BODY); its scale in *scale; returns the sum of the a[j]. */
static inline int32_t rwkvx_i8_quantize(const float *xr, ptrdiff_t n, int8_t *a, float *scale)
{
    const float inv = rwkvx_i8_inverse(rwkvx_i8_amax(xr, n), scale);
    if (inv == 0.0f) {
        memset(a, 0, (size_t)n);
        return 0;
    }
    return rwkvx_i8_round(xr, n, inv, a);
}

/* sum_j q[j] a[j], exact, for any n. */
static inline int64_t rwkvx_i8_dot(const uint8_t *q, const int8_t *a, ptrdiff_t n)
{
    int64_t total = 0;
#if RWKVX_HAVE_X86_DISPATCH
    const int level = rwkvx_i8_level();
#endif
    for (ptrdiff_t j = 0; j < n; j += RWKVX_I8_CHUNK) {
        const ptrdiff_t count = n - j < RWKVX_I8_CHUNK ? n - j : RWKVX_I8_CHUNK;
#if RWKVX_HAVE_X86_DISPATCH
        if (level == 2)
            total += rwkvx_i8_dot_vnni(q + j, a + j, count);
        else if (level == 1)
            total += rwkvx_i8_dot_avx2(q + j, a + j, count);
        else
#endif
            total += rwkvx_i8_dot_portable(q + j, a + j, count);
    }
    return total;
}

/* A row's product from its exact sum: rwkvx_u8_finish's operations with raw dot product
 * (float)sum * scale. */
static inline float rwkvx_i8_finish1(int64_t sum, float ry, float my, const rwkvx_u8_sums *s)
{
    const float raw = (float)sum * s->scale;
    return ry * (raw + s->half_xr) + my * s->x + s->mx;
}

/* Rows q .. q + (n_r - 1) n (n_r from 1 to 4, row stride n) against n_tok tokens of int8
 * inputs A + t lda, finished as uint8 products: Y[t ldy + r] for r < n_r, with the rows'
 * ry, my and the tokens' sums (scale, half_xr, x, mx). next: the next block of four rows,
 * to prefetch, or NULL. */
static inline void rwkvx_i8_block(const uint8_t *q, ptrdiff_t n, int n_r, const int8_t *A,
                                  ptrdiff_t lda, ptrdiff_t n_tok, const float *ry, const float *my,
                                  const rwkvx_u8_sums *sums, float *Y, ptrdiff_t ldy,
                                  const uint8_t *next)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (n_r == 4 && n <= RWKVX_I8_CHUNK && rwkvx_i8_level() == 2) {
        rwkvx_i8_block4_vnni(q, n, A, lda, n_tok, ry, my, sums, Y, ldy, next);
        rwkvx_i8_note_loops(2);
        return;
    }
    if (n_r == 4 && n <= RWKVX_I8_CHUNK && rwkvx_i8_level() == 1) {
#if RWKVX_HAVE_AVXVNNI
        if (rwkvx_i8_vnni256 == 1)
            rwkvx_i8_block4_avxvnni(q, n, A, lda, n_tok, ry, my, sums, Y, ldy);
        else
#endif
        if (rwkvx_i8_vnni256 == 2)
            rwkvx_i8_block4_vnni256(q, n, A, lda, n_tok, ry, my, sums, Y, ldy);
        else
            rwkvx_i8_block4_avx2(q, n, A, lda, n_tok, ry, my, sums, Y, ldy);
        rwkvx_i8_note_loops(rwkvx_i8_vnni256 ? 2 + rwkvx_i8_vnni256 : 1);
        return;
    }
#endif
    (void)next;
    rwkvx_i8_note_loops(0);
    for (ptrdiff_t t = 0; t < n_tok; t++)
        for (int r = 0; r < n_r; r++)
            Y[t * ldy + r] = rwkvx_i8_finish1(rwkvx_i8_dot(q + r * n, A + t * lda, n), ry[r], my[r],
                                              sums + t);
}

#endif /* RWKVX_INT8_H */
