/* SwiGLU rows shared by the MoE-slot plugins (topk, dense): an exp that the compiler vectorises
 * (glibc's expf is scalar without -ffast-math), and the forward and backward of one row. The loops
 * vectorise when built with -fno-trapping-math (the plugins' CMakeLists set it): the clamps then
 * become selects. */
#ifndef M1C_MOE_SWIGLU_H
#define M1C_MOE_SWIGLU_H

#include <stdint.h>
#include <string.h>

/* exp(x) within ~2 ulp for |x| <= 87 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial,
 * times 2^n built in the exponent bits). No range check: callers clamp. */
static inline float moe_exp(float x) {
    const float t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer n */
    const float n = t - 12582912.0f;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);                          /* the low mantissa bits of t hold n + 2^22 */
    const uint32_t sb = (tb - 0x4B400000u + 127u) << 23; /* 2^n; unsigned, so defined for any x */
    float s;
    memcpy(&s, &sb, sizeof s);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f; /* ln2 in two parts: r exact */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * r * r + r + 1.0f) * s;
}

/* sigmoid(g) = 1 / (1 + exp(-g)), with g clamped to [-40, 40]: beyond it FP32 sigmoid is 1 or below
 * 4.3e-18, which times any O(1) value is nothing. Why so tight: the compiler evaluates the clamped
 * branch in every vector lane, and a clamp near the float range (exp(88)) would make that branch's
 * sigmoid a denormal, whose products with ordinary g cost ~100 cycles each (measured: 2.6x slower). */
static inline float moe_sigmoid(float g) {
    g = g < -40.0f ? -40.0f : g;
    g = g > 40.0f ? 40.0f : g;
    return 1.0f / (1.0f + moe_exp(-g));
}

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
