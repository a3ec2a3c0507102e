/* Products of bfloat16 matrices in bfloat16 arithmetic: the opt-in
 * load(dtype="bfloat16", arithmetic="bfloat16").
 *
 * A product of two or more tokens rounds each token's input to bfloat16 (to nearest, ties
 * to even) and sums the products of the stored bfloat16 weights with it by the rules of
 * AVX512-BF16's vdpbf16ps, which does 32 multiply-adds an instruction where the float32
 * products do 16 (an FMA on a Zen 4 takes as long as a vdpbf16ps). The product of two
 * bfloat16 values is exact in float32, so the only rounding added to the float32 path's
 * is the input's (relative 2^-9 at most).
 *
 * The rules, as Intel's manual defines the instruction: lane k (of 16) of a row's
 * accumulator takes columns 32 s + 2k and 32 s + 2k + 1 of step s,
 *     acc = ftz(fma(w[2k + 1], x[2k + 1], acc)),  acc = ftz(fma(w[2k], x[2k], acc)),
 * with denormal inputs read as zero and tiny results flushed to zero of their sign (tiny in
 * IEEE 754's sense "after rounding", see rwkvx_bd_fma). A Zen 4's vdpbf16ps gives exactly
 * these bits (checked on 3.2 million random lanes with exponents from 2^-130 to 2^10, and
 * 6.4 million with results within a few units of FLT_MIN). The sixteen lanes are then
 * added in a fixed tree (rwkvx_tree16, _simd.h). So a token's result depends only on its
 * row and input: not on the thread count, on which tokens share a tile, or on the
 * instruction set. Where the CPU has AVX512-BF16 the tile below uses the instruction
 * (after rwkvx_bd_detect has checked at import that it follows these rules: a CPU whose
 * instruction disagreed would run the AVX2 loop instead); elsewhere the same rules run on
 * AVX2's FMA (the same bits, about 1.5 times the float32 path's time: for machines that
 * must agree with one that has it), or as plain C. A row's last step reads zeros past its
 * end (the input is padded with zeros to whole steps, the weights are loaded under a mask).
 * Which NaN a NaN result is (sign, payload) is not part of the rules.
 */
#ifndef RWKVX_BF16DOT_H
#define RWKVX_BF16DOT_H

#include <float.h>
#include <math.h>

#include "_simd.h"

/* Tokens per pass of the tile: 4 rows x 4 tokens = 16 accumulators (as _int8.h's). */
#define RWKVX_BD_TILE 4

/* bfloat16 values from one token's rounded input to the next: whole steps of 32. */
static inline ptrdiff_t rwkvx_bd_stride(ptrdiff_t n) { return (n + 31) / 32 * 32; }

/* 1 if the CPU has AVX512-BF16 (and F, BW, VL) following the rules (set by rwkvx_bd_detect). */
static int rwkvx_bd_has_bf16 = 0;

/* 2: the tile uses vdpbf16ps (SIMD level 2 on a CPU with AVX512-BF16); 1: AVX2's FMA
 * (SIMD level 1 or 2); 0: plain C. All give the same bits. */
static inline int rwkvx_bd_level(void)
{
    if (rwkvx_simd_level >= 2 && rwkvx_bd_has_bf16)
        return 2;
    return rwkvx_simd_level >= 1 ? 1 : 0;
}

/* ---- rounding the input ------------------------------------------------------------ */

/* float32 to bfloat16, to nearest with ties to even; a NaN stays a (quiet) NaN. */
static inline uint16_t rwkvx_bd_round1(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One token's input x (n floats) as bfloat16 in out, zeros up to rwkvx_bd_stride(n). */
static inline void rwkvx_bd_round(const float *x, ptrdiff_t n, uint16_t *out)
{
    ptrdiff_t j = 0;
    for (; j < n; j++)
        out[j] = rwkvx_bd_round1(x[j]);
    for (; j < rwkvx_bd_stride(n); j++)
        out[j] = 0;
}

/* ---- the rules in C ------------------------------------------------------------------ */

/* A bfloat16 value as the instruction reads it: denormals as zero (keeping the sign). */
static inline float rwkvx_bd_in(uint16_t h)
{
    return (h & 0x7f80u) ? rwkvx_bf16_to_f32(h) : rwkvx_bf16_to_f32(h & 0x8000u);
}

/* fma(a, b, c) as the instruction computes it: the float32 result, or zero of its sign if
 * the exact result is tiny. x86 calls a result tiny if, rounded to float32's 24 bits as if
 * the exponent had no lower limit, it is below FLT_MIN: 2^-126 - 2^-150 is tiny (flushed)
 * though float32 rounds it up to FLT_MIN, 2^-126 - 2^-152 is not. a and b come from
 * bfloat16, so a b is exact in double, and p + c = s + e exactly (Knuth's two-sum); scaled
 * by 2^64 (exact), s rounds to 24 bits in float32's normal range, and e breaks a tie. */
static inline float rwkvx_bd_fma(float a, float b, float c)
{
    const float r = fmaf(a, b, c);
    const float mag = fabsf(r);
    if (mag > 2 * FLT_MIN || r == 0.0f)
        return r;
    if (mag < FLT_MIN / 2)
        return copysignf(0.0f, r);
    const double p = (double)a * b, s = p + c, v = s - p, e = (p - (s - v)) + (c - v);
    const double S = ldexp(s, 64), E = ldexp(e, 64);
    float f = (float)S;
    if (E != 0.0 && (double)f != S) {
        /* S halfway between f and its neighbour g: the exact value S + E is on E's side */
        const float g = nextafterf(f, S > (double)f ? INFINITY : -INFINITY);
        if (((double)f + (double)g) / 2 == S)
            f = E > 0 ? fmaxf(f, g) : fminf(f, g);
    }
    return fabsf(f) < 0x1p-62f ? copysignf(0.0f, r) : r;
}


/* Row w (n bfloat16) against one token's rounded input x (padded, see rwkvx_bd_round). */
static inline float rwkvx_bd_dot(const uint16_t *w, const uint16_t *x, ptrdiff_t n)
{
    float acc[16] = {0};
    for (ptrdiff_t j = 0; j < n; j += 32)
        for (int k = 0; k < 16; k++) {
            const ptrdiff_t c = j + 2 * k;
            const float w0 = c < n ? rwkvx_bd_in(w[c]) : 0.0f;
            const float w1 = c + 1 < n ? rwkvx_bd_in(w[c + 1]) : 0.0f;
            acc[k] = rwkvx_bd_fma(w1, rwkvx_bd_in(x[c + 1]), acc[k]);
            acc[k] = rwkvx_bd_fma(w0, rwkvx_bd_in(x[c]), acc[k]);
        }
    return rwkvx_tree16(acc);
}

#if RWKVX_HAVE_X86_DISPATCH

/* ---- AVX2: the rules with FMA ---------------------------------------------------------
 * A lane's pair of columns is one 32-bit word of the row (and of the input): masking the
 * low half leaves column 2k + 1 as a float32, shifting left by 16 makes column 2k one, and
 * two fused multiply-adds follow the rules, with MXCSR's denormals-are-zero and
 * flush-to-zero set for them (x86's FMA calls a result tiny as the instruction does: the
 * same bits on the 6.4 million lanes near FLT_MIN). The sixteen lanes are two 8-lane
 * registers; their tree runs with the caller's MXCSR, as the instruction's does. About 1.5x
 * the float32 product's time, against a hundred times for the plain C. */

#define RWKVX_BD_DAZ_FTZ 0x8040u
/* MXCSR's rounding control: cleared, to nearest even as the instruction always rounds */
#define RWKVX_BD_ROUNDING 0x6000u

RWKVX_AVX2 static inline void rwkvx_bd_step_avx2(__m256i w, __m256i x, __m256 *acc)
{
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    *acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high)),
                           _mm256_castsi256_ps(_mm256_and_si256(x, high)), *acc);
    *acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), *acc);
}

/* Four rows against each token in turn (see rwkvx_bd_block). */
RWKVX_AVX2 static void rwkvx_bd_block4_avx2(const uint16_t *w, ptrdiff_t n, const uint16_t *X, ptrdiff_t ldx,
                                           ptrdiff_t n_tok, float *Y, ptrdiff_t ldy)
{
    const ptrdiff_t whole = n / 32 * 32;
    uint16_t tail[4][32] __attribute__((aligned(32)));
    memset(tail, 0, sizeof tail);
    for (int r = 0; r < 4; r++)
        memcpy(tail[r], w + r * n + whole, (size_t)(n - whole) * sizeof(uint16_t));
    const unsigned csr = _mm_getcsr();
    for (ptrdiff_t t = 0; t < n_tok; t++) {
        const uint16_t *x = X + t * ldx;
        __m256 a[4][2];
        for (int r = 0; r < 4; r++)
            a[r][0] = a[r][1] = _mm256_setzero_ps();
        _mm_setcsr((csr & ~RWKVX_BD_ROUNDING) | RWKVX_BD_DAZ_FTZ);
        for (ptrdiff_t j = 0; j < whole; j += 32) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + j));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + j + 16));
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                rwkvx_bd_step_avx2(_mm256_loadu_si256((const __m256i *)(w + r * n + j)), x0, &a[r][0]);
                rwkvx_bd_step_avx2(_mm256_loadu_si256((const __m256i *)(w + r * n + j + 16)), x1, &a[r][1]);
            }
        }
        if (whole < n) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + whole));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + whole + 16));
            for (int r = 0; r < 4; r++) {
                rwkvx_bd_step_avx2(_mm256_load_si256((const __m256i *)tail[r]), x0, &a[r][0]);
                rwkvx_bd_step_avx2(_mm256_load_si256((const __m256i *)(tail[r] + 16)), x1, &a[r][1]);
            }
        }
        _mm_setcsr(csr);
        for (int r = 0; r < 4; r++) {
            float l[16];
            _mm256_storeu_ps(l, a[r][0]);
            _mm256_storeu_ps(l + 8, a[r][1]);
            Y[t * ldy + r] = rwkvx_tree16(l);
        }
    }
}

/* ---- AVX512-BF16 ----------------------------------------------------------------------- */

#define RWKVX_BD __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

/* Columns j .. n - 1 (fewer than 32) of a row, zeros after. */
RWKVX_BD static inline __m512bh rwkvx_bd_tail(const uint16_t *p, ptrdiff_t count)
{
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << count) - 1), p);
}

RWKVX_BD static inline __m512bh rwkvx_bd_load(const uint16_t *p)
{
    return (__m512bh)_mm512_loadu_si512(p);
}

/* rwkvx_tree16 of four rows' accumulators, one row a lane. */
RWKVX_BD static inline __m128 rwkvx_bd_reduce4(__m512 a, __m512 b, __m512 c, __m512 d)
{
#define RWKVX_QUARTERS(v)                                                              \
    ({                                                                                 \
        const __m256 h_ = _mm256_add_ps(_mm512_castps512_ps256(v),                     \
                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); \
        _mm_add_ps(_mm256_castps256_ps128(h_), _mm256_extractf128_ps(h_, 1));          \
    })
    __m128 r0 = RWKVX_QUARTERS(a), r1 = RWKVX_QUARTERS(b), r2 = RWKVX_QUARTERS(c), r3 = RWKVX_QUARTERS(d);
#undef RWKVX_QUARTERS
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    return _mm_add_ps(_mm_add_ps(r0, r2), _mm_add_ps(r1, r3));
}

/* One step of 32 columns of four rows (a0 .. a3) against T tokens' inputs X + t ldx. */
RWKVX_BD static inline __attribute__((always_inline)) void
rwkvx_bd_step4(__m512 c[][4], const int T, __m512bh a0, __m512bh a1, __m512bh a2, __m512bh a3,
               const uint16_t *X, ptrdiff_t ldx)
{
#pragma GCC unroll 4
    for (int t = 0; t < T; t++) {
        const __m512bh x = rwkvx_bd_load(X + t * ldx);
        c[t][0] = _mm512_dpbf16_ps(c[t][0], a0, x);
        c[t][1] = _mm512_dpbf16_ps(c[t][1], a1, x);
        c[t][2] = _mm512_dpbf16_ps(c[t][2], a2, x);
        c[t][3] = _mm512_dpbf16_ps(c[t][3], a3, x);
    }
}

/* Rows w .. w + 3n against T (a constant) tokens X + t ldx: sums[t] holds the four rows'
 * results for token t. next, if not NULL: `share` bytes from there (this pass's part of
 * the next block of rows) are fetched into cache at the pace the columns are read. */
RWKVX_BD static inline __attribute__((always_inline)) void
rwkvx_bd_tile4(const uint16_t *w, ptrdiff_t n, const uint16_t *X, ptrdiff_t ldx, const int T,
               const char *next, ptrdiff_t share, const int l2, __m128 *sums)
{
    const uint16_t *w0 = w, *w1 = w + n, *w2 = w + 2 * n, *w3 = w + 3 * n;
    __m512 c[RWKVX_BD_TILE][4];
#pragma GCC unroll 16
    for (int k = 0; k < 4 * T; k++)
        c[k / 4][k % 4] = _mm512_setzero_ps();
    ptrdiff_t j = 0;
    for (; j + 32 <= n; j += 32) {
        if (next)
            for (ptrdiff_t b = share * j / n / 64 * 64; b < share * (j + 32) / n; b += 64) {
                if (l2) _mm_prefetch(next + b, _MM_HINT_T1);
                else _mm_prefetch(next + b, _MM_HINT_T0);
            }
        rwkvx_bd_step4(c, T, rwkvx_bd_load(w0 + j), rwkvx_bd_load(w1 + j), rwkvx_bd_load(w2 + j),
                       rwkvx_bd_load(w3 + j), X + j, ldx);
    }
    if (j < n)
        rwkvx_bd_step4(c, T, rwkvx_bd_tail(w0 + j, n - j), rwkvx_bd_tail(w1 + j, n - j),
                       rwkvx_bd_tail(w2 + j, n - j), rwkvx_bd_tail(w3 + j, n - j), X + j, ldx);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
        sums[t] = rwkvx_bd_reduce4(c[t][0], c[t][1], c[t][2], c[t][3]);
}

/* Four rows against every token: Y[t ldy + r] for r < 4. Tokens go in passes of at most
 * RWKVX_BD_TILE, of near-equal sizes; later passes find the rows in cache, and each pass fetches
 * an equal part of the next block, so that memory keeps streaming (as _int8.h's tile). */
RWKVX_BD static void rwkvx_bd_block4(const uint16_t *w, ptrdiff_t n, const uint16_t *X, ptrdiff_t ldx,
                                     ptrdiff_t n_tok, float *Y, ptrdiff_t ldy, const uint16_t *next)
{
    __m128 s[RWKVX_BD_TILE];
    const ptrdiff_t all = (n_tok + RWKVX_BD_TILE - 1) / RWKVX_BD_TILE;
    /* up to 8 tokens: the next block to L2, as _int8.h's tile (RWKV-7 0.4B, 2 sequences
     * 48.5 -> 35.2 ms a step, 8 sequences 63.6 -> 54.6) */
    const int l2 = all <= 2 && 8 * n >= RWKVX_DOT4_L2_BLOCK;
    ptrdiff_t t = 0, pass = 0;
    while (t < n_tok) {
        const ptrdiff_t passes = all - pass;
        const int T = (int)((n_tok - t + passes - 1) / passes);
        const uint16_t *Xt = X + t * ldx;
        const ptrdiff_t from = 8 * n * pass / all, share = 8 * n * (pass + 1) / all - from;
        const char *ahead = next ? (const char *)next + from : NULL;
        switch (T) {
        case 1: rwkvx_bd_tile4(w, n, Xt, ldx, 1, ahead, share, l2, s); break;
        case 2: rwkvx_bd_tile4(w, n, Xt, ldx, 2, ahead, share, l2, s); break;
        case 3: rwkvx_bd_tile4(w, n, Xt, ldx, 3, ahead, share, l2, s); break;
        default: rwkvx_bd_tile4(w, n, Xt, ldx, 4, ahead, share, l2, s); break;
        }
        for (int k = 0; k < T; k++)
            _mm_storeu_ps(Y + (t + k) * ldy, s[k]);
        pass++;
        t += T;
    }
}
/* Whether this CPU's vdpbf16ps follows the rules: four rows of 64 columns against two
 * tokens, with the two results of rwkvx_bd_fma's comment at FLT_MIN's boundary and
 * pseudo-random values of exponents from 2^-70 to 2^10 (denormal products included),
 * through the instruction and through the plain C. */
RWKVX_BD static int rwkvx_bd_selfcheck(void)
{
    enum { N = 64 };
    uint16_t W[4 * N], X[2 * N];
    uint32_t seed = 12345u;
    for (int k = 0; k < 4 * N + 2 * N; k++) {
        seed = seed * 1664525u + 1013904223u;
        const float v = ldexpf(1.0f + (float)(seed >> 9 & 0x7f) / 128.0f, (int)(seed >> 16 & 0x7f) % 81 - 70);
        const uint16_t h = rwkvx_bd_round1(seed & 0x80000000u ? -v : v);
        if (k < 4 * N)
            W[k] = h;
        else
            X[k - 4 * N] = h;
    }
    const float first[2][2] = {{-0x1p-75f, 0x1p-63f}, {-0x1p-76f, 0x1p-63f}};
    for (int t = 0; t < 2; t++) {
        W[t * N] = rwkvx_bd_round1(first[t][0]);
        W[t * N + 1] = rwkvx_bd_round1(first[t][1]);
        X[t * N] = rwkvx_bd_round1(-first[t][0]);
        X[t * N + 1] = rwkvx_bd_round1(first[t][1]);
    }
    float Y[2 * 4];
    rwkvx_bd_block4(W, N, X, N, 2, Y, 4, NULL);
    for (int t = 0; t < 2; t++)
        for (int r = 0; r < 4; r++) {
            const float want = rwkvx_bd_dot(W + r * N, X + t * N, N);
            if (memcmp(&want, &Y[t * 4 + r], sizeof want) != 0)
                return 0;
        }
    return 1;
}
#endif /* RWKVX_HAVE_X86_DISPATCH */

/* ---- dispatch ------------------------------------------------------------------------ */

static inline void rwkvx_bd_detect(void)
{
#if RWKVX_HAVE_X86_DISPATCH
    __builtin_cpu_init();
    rwkvx_bd_has_bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    /* the rules are checked bit for bit on a Zen 4; another CPU's instruction must show
     * that it follows them too before it is used */
    if (rwkvx_bd_has_bf16 && !rwkvx_bd_selfcheck())
        rwkvx_bd_has_bf16 = 0;
#endif
}

/* Rows w .. w + (n_r - 1) n (n_r from 1 to 4, row stride n) against n_tok tokens of
 * rounded inputs X + t ldx (rwkvx_bd_round): Y[t ldy + r] for r < n_r. next: the next
 * block of four rows, to prefetch, or NULL. */
static inline void rwkvx_bd_block(const uint16_t *w, ptrdiff_t n, int n_r, const uint16_t *X,
                                  ptrdiff_t ldx, ptrdiff_t n_tok, float *Y, ptrdiff_t ldy,
                                  const uint16_t *next)
{
#if RWKVX_HAVE_X86_DISPATCH
    if (n_r == 4 && rwkvx_bd_level() == 2) {
        rwkvx_bd_block4(w, n, X, ldx, n_tok, Y, ldy, next);
        return;
    }
    if (n_r == 4 && rwkvx_bd_level() == 1) {
        rwkvx_bd_block4_avx2(w, n, X, ldx, n_tok, Y, ldy);
        return;
    }
#endif
    (void)next;
    for (ptrdiff_t t = 0; t < n_tok; t++)
        for (int r = 0; r < n_r; r++)
            Y[t * ldy + r] = rwkvx_bd_dot(w + r * n, X + t * ldx, n);
}

#endif /* RWKVX_BF16DOT_H */
