/* The layer math between the matrix products, written as loops a compiler vectorises.
 *
 * The WKV recurrence and the sigmoid gates need exponentials for every channel of every
 * token, and libm's expf is a call per value: 8-token uint8 batches on the 430M shape
 * spent 2.5 ms of a 44 ms step in the recurrence alone. rwkvx_expf uses only
 * comparisons, multiplies, adds and integer bit moves, so these loops vectorise, and
 * every path (one token or many, any vector width) gets bit-identical results: the build
 * turns off multiply-add contraction (-ffp-contract=off), so each operation rounds the
 * same way.
 */
#ifndef RWKVX_ELEMENTWISE_H
#define RWKVX_ELEMENTWISE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* always inlined, so that the AVX2 copies below get the loops compiled for AVX2 */
#if defined(__GNUC__) || defined(__clang__)
#define RWKVX_EW_INLINE static inline __attribute__((always_inline))
#else
#define RWKVX_EW_INLINE static inline
#endif
/* __restrict: spelled the same by GCC, clang and MSVC */
#define RWKVX_RESTRICT __restrict

/* e^x within 2 ulp (Cephes' expf: e^x = 2^n e^r, |r| <= ln2 / 2, a degree-6 polynomial for
 * e^r). Results below 2^-126 are flushed to 0, above the largest float infinity; NaN stays
 * NaN. */
RWKVX_EW_INLINE float rwkvx_expf(float x)
{
    const float lo = -87.3365478515625f;  /* e^lo = 2^-126 */
    const float hi = 88.72283172607422f;  /* the largest float x with e^x < FLT_MAX */
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    /* n = round(x / ln2): adding 1.5 * 2^23 leaves no fraction bits to round into */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    n = n == n ? n : 0.0f; /* NaN: y is NaN anyway; keep the conversion to int defined */
    /* r = x - n ln2, with ln2 split in two so n * 0.693359375 is exact */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    /* times 2^n as 2^(n/2) 2^(n - n/2): both normal floats for every n in -126 .. 128,
     * and multiplying by a power of two is exact */
    int32_t half = (int32_t)n / 2;
    int32_t bits_a = (half + 127) << 23, bits_b = ((int32_t)n - half + 127) << 23;
    float scale_a, scale_b;
    memcpy(&scale_a, &bits_a, sizeof scale_a);
    memcpy(&scale_b, &bits_b, sizeof scale_b);
    y = y * scale_a * scale_b;
    y = x < lo ? 0.0f : y;
    return x > hi ? INFINITY : y;
}

RWKVX_EW_INLINE float rwkvx_sigmoid(float x)
{
    return 1.0f / (1.0f + rwkvx_expf(-x));
}

/* One token's WKV for channels 0 .. n-1, updating that sequence's state aa, bb, pp:
 *   wkv = (e^pp aa + e^(u+k) v) / (e^pp bb + e^(u+k)), scaled by e^-max to stay finite,
 * then the state decays by e^w (decay = w = -exp(time_decay)) and takes in this token.
 * out = sigmoid(r) * wkv. Of e^(a - max(a, b)) and e^(b - max(a, b)) one is e^0 = 1, so
 * each pair takes one exponential, of -|a - b|. */
RWKVX_EW_INLINE void
rwkvx_wkv_loop(ptrdiff_t n, const float *RWKVX_RESTRICT k, const float *RWKVX_RESTRICT v,
               const float *RWKVX_RESTRICT r, const float *RWKVX_RESTRICT first, const float *RWKVX_RESTRICT decay,
               float *RWKVX_RESTRICT aa, float *RWKVX_RESTRICT bb, float *RWKVX_RESTRICT pp, float *RWKVX_RESTRICT out)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        float ww = first[j] + k[j];
        int state_larger = pp[j] > ww;
        float e = rwkvx_expf(state_larger ? ww - pp[j] : pp[j] - ww);
        float e1 = state_larger ? 1.0f : e, e2 = state_larger ? e : 1.0f;
        float wkv = (e1 * aa[j] + e2 * v[j]) / (e1 * bb[j] + e2);
        ww = pp[j] + decay[j];
        state_larger = ww > k[j];
        e = rwkvx_expf(state_larger ? k[j] - ww : ww - k[j]);
        e1 = state_larger ? 1.0f : e;
        e2 = state_larger ? e : 1.0f;
        aa[j] = e1 * aa[j] + e2 * v[j];
        bb[j] = e1 * bb[j] + e2;
        pp[j] = state_larger ? ww : k[j];
        out[j] = rwkvx_sigmoid(r[j]) * wkv;
    }
}

/* x += sigmoid(r) * y: the channel mix's gated residual. */
RWKVX_EW_INLINE void
rwkvx_add_gated_loop(ptrdiff_t n, float *RWKVX_RESTRICT x, const float *RWKVX_RESTRICT r,
                     const float *RWKVX_RESTRICT y)
{
    for (ptrdiff_t j = 0; j < n; j++)
        x[j] += rwkvx_sigmoid(r[j]) * y[j];
}

/* out = (x - mean(x)) / sqrt(var(x) + eps) * w + b. The statistics are summed in double,
 * because float32 sums of n_embd terms would lose digits the reference keeps, in eight
 * partial sums: one running sum is a chain of dependent adds (about 1.6 us per pass at
 * n = 1024), eight independent ones vectorise. */
RWKVX_EW_INLINE double rwkvx_sum8(const double *s)
{
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

RWKVX_EW_INLINE void
rwkvx_layer_norm_loop(ptrdiff_t n, const float *RWKVX_RESTRICT x, const float *RWKVX_RESTRICT w,
                      const float *RWKVX_RESTRICT b, double eps, float *RWKVX_RESTRICT out)
{
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++)
            s[k] += x[j + k];
    for (int k = 0; j + k < n; k++)
        s[k] += x[j + k];
    const double mean = rwkvx_sum8(s) / (double)n;
    for (int k = 0; k < 8; k++)
        s[k] = 0.0;
    for (j = 0; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) {
            double d = x[j + k] - mean;
            s[k] += d * d;
        }
    for (int k = 0; j + k < n; k++) {
        double d = x[j + k] - mean;
        s[k] += d * d;
    }
    const double inv = 1.0 / sqrt(rwkvx_sum8(s) / (double)n + eps);
    for (j = 0; j < n; j++)
        out[j] = (float)((x[j] - mean) * inv) * w[j] + b[j];
}

/* out = xx * mix + sx * (1 - mix): a token blended with the previous one (token shift), in
 * float32. Computed in double before, the attention's layer norm and three shifts of eight
 * rows took 25 us; now 18.5. */
RWKVX_EW_INLINE void
rwkvx_token_shift_loop(ptrdiff_t n, const float *RWKVX_RESTRICT xx, const float *RWKVX_RESTRICT sx,
                       const float *RWKVX_RESTRICT mix, float *RWKVX_RESTRICT out)
{
    for (ptrdiff_t j = 0; j < n; j++)
        out[j] = xx[j] * mix[j] + sx[j] * (1.0f - mix[j]);
}

/* x = max(x, 0)^2, without a branch: the sign of a projection is random, and a branch
 * on it (which compilers emit for x > 0 ? x : 0) was mispredicted half the time --
 * measured at 4% of an 8-sequence uint8 batch step, in that loop alone. Clearing
 * every value whose sign bit is set is integer work that vectorises. */
RWKVX_EW_INLINE void rwkvx_relu_square_loop(float *RWKVX_RESTRICT x, ptrdiff_t n)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, x + j, sizeof bits);
        bits &= ~(uint32_t)((int32_t)bits >> 31);
        float y;
        memcpy(&y, &bits, sizeof y);
        x[j] = y * y;
    }
}

/* RWKV-7's per-channel inputs to its recurrence (_wkv.pyx's v7_prepare), kk already
 * normalised per head: a = sigmoid(a0 + a_lora); w = exp(-decay_scale * sigmoid(w0 + w));
 * b = kk a; k = k (1 + (a - 1) k_a); v = v + (v_first - v) sigmoid(v0 + v_lora) unless
 * v_lora is NULL (layer 0). With libm's expf (three calls a channel) this took 12 us of a
 * token's layer on the 0.4B shape, 7% of a prompt. */
RWKVX_EW_INLINE void
rwkvx_v7_gates_loop(ptrdiff_t n, float *RWKVX_RESTRICT w, float *RWKVX_RESTRICT k, float *RWKVX_RESTRICT v,
                    const float *RWKVX_RESTRICT a_lora, const float *RWKVX_RESTRICT v_lora,
                    const float *RWKVX_RESTRICT v_first, const float *RWKVX_RESTRICT w0,
                    const float *RWKVX_RESTRICT a0, const float *RWKVX_RESTRICT v0, const float *RWKVX_RESTRICT k_a,
                    float decay_scale, const float *RWKVX_RESTRICT kk, float *RWKVX_RESTRICT b)
{
    for (ptrdiff_t j = 0; j < n; j++) {
        float a = rwkvx_sigmoid(a0[j] + a_lora[j]);
        w[j] = rwkvx_expf(-decay_scale * rwkvx_sigmoid(w0[j] + w[j]));
        b[j] = kk[j] * a;
        k[j] = k[j] * (1.0f + (a - 1.0f) * k_a[j]);
    }
    if (v_lora)
        for (ptrdiff_t j = 0; j < n; j++)
            v[j] = v[j] + (v_first[j] - v[j]) * rwkvx_sigmoid(v0[j] + v_lora[j]);
}

/* x = x sigmoid(x): RWKV-5/6's gate (SiLU), in place. */
RWKVX_EW_INLINE void rwkvx_silu_loop(float *RWKVX_RESTRICT x, ptrdiff_t n)
{
    for (ptrdiff_t j = 0; j < n; j++)
        x[j] = x[j] * rwkvx_sigmoid(x[j]);
}

/* RWKV-6's data-dependent decay factors, in place: w = exp(-exp(time_decay + w)). */
RWKVX_EW_INLINE void rwkvx_v6_decay_loop(float *RWKVX_RESTRICT w, const float *RWKVX_RESTRICT time_decay,
                                         ptrdiff_t n)
{
    for (ptrdiff_t j = 0; j < n; j++)
        w[j] = rwkvx_expf(-rwkvx_expf(time_decay[j] + w[j]));
}

/* Asks for the cache lines of x[0 .. n-1] ahead of their use: scattered spans of a few lines
 * (a sequence's state rows, one channel block wide) that the hardware prefetcher does not
 * predict. */
static inline void rwkvx_prefetch_span(const float *x, ptrdiff_t n)
{
#if defined(__GNUC__) || defined(__clang__)
    for (ptrdiff_t j = 0; j < n; j += 16)
        __builtin_prefetch(x + j);
#else
    (void)x, (void)n;
#endif
}

/* Each loop above as a function compiled twice, for the baseline (SSE2 on x86-64) and for
 * AVX2, which the CPU's features choose between at run time; the results do not depend on
 * the width. RWKVX_DISPATCHED(name, params, args) defines name(params) calling
 * name_loop(args). */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
static inline int rwkvx_elementwise_avx2(void)
{
    static int has = -1;  /* a benign race: every thread stores the same answer */
    if (has < 0)
        has = __builtin_cpu_supports("avx2") ? 1 : 0;
    return has;
}
#define RWKVX_DISPATCHED(name, params, args)                                                 \
    __attribute__((target("avx2"))) static void name##_avx2 params { name##_loop args; }     \
    static void name params                                                                  \
    {                                                                                        \
        if (rwkvx_elementwise_avx2())                                                        \
            name##_avx2 args;                                                                \
        else                                                                                 \
            name##_loop args;                                                                \
    }
#else
#define RWKVX_DISPATCHED(name, params, args) \
    static void name params { name##_loop args; }
#endif

RWKVX_DISPATCHED(rwkvx_wkv,
                 (ptrdiff_t n, const float *k, const float *v, const float *r, const float *first,
                  const float *decay, float *aa, float *bb, float *pp, float *out),
                 (n, k, v, r, first, decay, aa, bb, pp, out))
RWKVX_DISPATCHED(rwkvx_layer_norm,
                 (ptrdiff_t n, const float *x, const float *w, const float *b, double eps, float *out),
                 (n, x, w, b, eps, out))
RWKVX_DISPATCHED(rwkvx_token_shift,
                 (ptrdiff_t n, const float *xx, const float *sx, const float *mix, float *out),
                 (n, xx, sx, mix, out))
RWKVX_DISPATCHED(rwkvx_add_gated, (ptrdiff_t n, float *x, const float *r, const float *y), (n, x, r, y))
RWKVX_DISPATCHED(rwkvx_relu_square, (float *x, ptrdiff_t n), (x, n))
RWKVX_DISPATCHED(rwkvx_silu, (float *x, ptrdiff_t n), (x, n))
RWKVX_DISPATCHED(rwkvx_v6_decay, (float *w, const float *time_decay, ptrdiff_t n), (w, time_decay, n))
RWKVX_DISPATCHED(rwkvx_v7_gates,
                 (ptrdiff_t n, float *w, float *k, float *v, const float *a_lora, const float *v_lora,
                  const float *v_first, const float *w0, const float *a0, const float *v0, const float *k_a,
                  float decay_scale, const float *kk, float *b),
                 (n, w, k, v, a_lora, v_lora, v_first, w0, a0, v0, k_a, decay_scale, kk, b))

#endif /* RWKVX_ELEMENTWISE_H */
