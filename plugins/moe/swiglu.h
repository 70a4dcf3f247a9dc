/* SwiGLU rows shared by the MoE-slot plugins (topk, dense): an exp that the compiler vectorises
 * (glibc's expf is scalar without -ffast-math), and the forward and backward of one row. The loops
 * vectorise when built with -fno-trapping-math (the plugins' CMakeLists set it): the clamps then
 * become selects. */
#ifndef M1C_MOE_SWIGLU_H
#define M1C_MOE_SWIGLU_H

#include <stdint.h>
#include <string.h>

/* exp(x) within ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, times 2^n
 * built in the exponent bits). x is clamped to [-87, 88] so that 2^n stays a normal float: exp(-87)
 * = 1.6e-38 instead of a denormal or 0, exp(88) = 1.7e38 instead of inf. All the integer work is
 * unsigned, so even a NaN input is defined behaviour (it gives NaN back). */
static inline float moe_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer n */
    const float n = t - 12582912.0f;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);                  /* the low mantissa bits of t hold n + 2^22 */
    const uint32_t sb = (tb - 0x4B400000u + 127u) << 23; /* 2^n */
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

/* a = silu(g) * u over one row of F. */
static inline void swiglu_row(float *restrict a, const float *restrict g, const float *restrict u, int F) {
#pragma omp simd
    for (int f = 0; f < F; f++) a[f] = g[f] / (1.0f + moe_exp(-g[f])) * u[f];
}

/* Backward of one row, in place: du holds dA on entry and d u on return; dg gets d g.
 * a = g s u with s = sigmoid(g): da/du = g s, da/dg = u s (1 + g (1 - s)). */
static inline void swiglu_back_row(float *restrict dg, float *du, const float *restrict g, const float *restrict u,
                                   int F) {
#pragma omp simd
    for (int f = 0; f < F; f++) {
        const float da = du[f], s = 1.0f / (1.0f + moe_exp(-g[f]));
        du[f] = da * g[f] * s;
        dg[f] = da * u[f] * s * (1.0f + g[f] * (1.0f - s));
    }
}

#endif
