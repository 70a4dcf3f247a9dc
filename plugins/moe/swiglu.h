/* SwiGLU rows shared by the MoE-slot plugins (topk, dense): an exp that the compiler vectorises
 * (glibc's expf is scalar without -ffast-math), and the forward and backward of one row. The loops
 * vectorise when built with -fno-trapping-math (the plugins' CMakeLists set it): the clamps then
 * become selects. */
#ifndef M1C_MOE_SWIGLU_H
#define M1C_MOE_SWIGLU_H

#include <stdint.h>
#include <string.h>

/* exp(x) within ~2 ulp for -87 <= x <= 88.3 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-7
 * polynomial, times 2^n built in the exponent bits), saturated beyond: +0 below about -87.7, +inf
 * above about 88.4 (a little early: exp is finite up to 88.72); NaN stays NaN. Safe for every input
 * by construction, whatever the caller clamps: x is clamped to +-1000 so that the rounding trick
 * stays exact (it needs |x log2 e| < 2^22) and |r| <= ln2/2, and the exponent n of 2^n is clamped
 * as an int32 to [-127, 128], whose bit patterns are +0 and +inf: it can never carry into the sign
 * bit (unclamped, exp(90.5) would build 2^131 as -2.4e-38). */
static inline float moe_exp(float x) {
    x = x < -1000.0f ? -1000.0f : x;
    x = x > 1000.0f ? 1000.0f : x;
    const float t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer n */
    const float n = t - 12582912.0f;
    int32_t ni;
    memcpy(&ni, &t, sizeof ni);
    ni -= 0x4B400000; /* t = 2^23 + (2^22 + n) exactly: its bits are 0x4B400000 + n */
    ni = ni < -127 ? -127 : ni;
    ni = ni > 128 ? 128 : ni;
    const uint32_t sb = (uint32_t)(ni + 127) << 23; /* 2^n, or +0 (n = -127) or +inf (n = 128) */
    float s;
    memcpy(&s, &sb, sizeof s);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 in two parts: r exact */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * r * r + r + 1.0f) * s; /* the factor is in [0.7, 1.42]: never turns inf into NaN */
}

/* sigmoid(g) = 1 / (1 + exp(-g)), in [0, 1] for every g: exactly 0 below g = -88.4 (moe_exp saturates
 * to +inf) and exactly 1 above about 17. No clamp on g, on purpose. moe_exp's saturation already keeps
 * far-out lanes free of denormals (which cost ~100 cycles a product: an earlier clamp near the float
 * range, with an exp that did not saturate, made the clamped branch a denormal sigmoid, evaluated in
 * every vector lane, and was measured 2.6x slower); only gates with 87 < |g| < 88.4 meet them. And a
 * clamp here on top of moe_exp's costs 15% of the row loops (measured: the compiler splits the loop
 * body per clamp branch and blends the results). */
static inline float moe_sigmoid(float g) { return 1.0f / (1.0f + moe_exp(-g)); }

/* The row loops are built twice on x86-64 with GCC, for x86-64-v3 (AVX2) and for the baseline (SSE2),
 * and the loader picks one per machine (ifunc): 8 lanes instead of 4 nearly halve their time. The
 * results are the same bits either way (elementwise, no FMA contraction under -std=c11). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MOE_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MOE_ROW_CLONES
#endif
#ifdef _OPENMP
#define MOE_SIMD _Pragma("omp simd")
#else
#define MOE_SIMD
#endif

/* a = silu(g) * u over one row of F. */
MOE_ROW_CLONES static void swiglu_row(float *restrict a, const float *restrict g, const float *restrict u, int F) {
MOE_SIMD
    for (int f = 0; f < F; f++) a[f] = g[f] * moe_sigmoid(g[f]) * u[f];
}

/* Backward of one row, in place: du holds dA on entry and d u on return; dg gets d g.
 * a = g s u with s = sigmoid(g): da/du = g s, da/dg = u s (1 + g (1 - s)). */
MOE_ROW_CLONES static void swiglu_back_row(float *restrict dg, float *du, const float *restrict g,
                                           const float *restrict u, int F) {
MOE_SIMD
    for (int f = 0; f < F; f++) {
        const float da = du[f], s = moe_sigmoid(g[f]);
        du[f] = da * g[f] * s;
        dg[f] = da * u[f] * s * (1.0f + g[f] * (1.0f - s));
    }
}

#endif
