/* Vector access for the core's and the plugins' element-wise kernels: V consecutive values at p as
 * floats, in accesses of up to 16 bytes (f32: float4 when V % 4 == 0; bf16: 16 bytes when V % 8 == 0, 8
 * when V % 4 == 0), one element at a time for other V. The caller guarantees the alignment of the wide
 * accesses. A bf16 is the upper half of an f32, so loads are exact; stores round to nearest even, as
 * __float2bfloat16_rn. Installed with the other headers of m1c/cuda. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

static __device__ __forceinline__ uint32_t vec_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
static __device__ __forceinline__ void vec_unbf16x2(float *v, uint32_t w) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
}

template <int V> static __device__ __forceinline__ void vec_ld(float *v, const float *p) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; q++) {
            const float4 t = reinterpret_cast<const float4 *>(p)[q];
            v[4 * q] = t.x, v[4 * q + 1] = t.y, v[4 * q + 2] = t.z, v[4 * q + 3] = t.w;
        }
    } else {
#pragma unroll
        for (int t = 0; t < V; t++) v[t] = p[t];
    }
}
template <int V> static __device__ __forceinline__ void vec_ld(float *v, const __nv_bfloat16 *p) {
    if constexpr (V % 8 == 0) {
#pragma unroll
        for (int q = 0; q < V / 8; q++) {
            const uint4 t = reinterpret_cast<const uint4 *>(p)[q];
            vec_unbf16x2(v + 8 * q, t.x), vec_unbf16x2(v + 8 * q + 2, t.y);
            vec_unbf16x2(v + 8 * q + 4, t.z), vec_unbf16x2(v + 8 * q + 6, t.w);
        }
    } else if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; q++) {
            const uint2 t = reinterpret_cast<const uint2 *>(p)[q];
            vec_unbf16x2(v + 4 * q, t.x), vec_unbf16x2(v + 4 * q + 2, t.y);
        }
    } else {
#pragma unroll
        for (int t = 0; t < V; t++) v[t] = __bfloat162float(p[t]);
    }
}
template <int V> static __device__ __forceinline__ void vec_st(float *p, const float *v) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; q++)
            reinterpret_cast<float4 *>(p)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    } else {
#pragma unroll
        for (int t = 0; t < V; t++) p[t] = v[t];
    }
}
template <int V> static __device__ __forceinline__ void vec_st(__nv_bfloat16 *p, const float *v) {
    if constexpr (V % 8 == 0) {
#pragma unroll
        for (int q = 0; q < V / 8; q++)
            reinterpret_cast<uint4 *>(p)[q] =
                make_uint4(vec_bf16x2(v[8 * q], v[8 * q + 1]), vec_bf16x2(v[8 * q + 2], v[8 * q + 3]),
                           vec_bf16x2(v[8 * q + 4], v[8 * q + 5]), vec_bf16x2(v[8 * q + 6], v[8 * q + 7]));
    } else if constexpr (V % 4 == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; q++)
            reinterpret_cast<uint2 *>(p)[q] =
                make_uint2(vec_bf16x2(v[4 * q], v[4 * q + 1]), vec_bf16x2(v[4 * q + 2], v[4 * q + 3]));
    } else {
#pragma unroll
        for (int t = 0; t < V; t++) p[t] = __float2bfloat16_rn(v[t]);
    }
}

/* dst = bf16(src), V values a thread (n groups of V; with V = 8 both pointers 16-byte aligned). */
template <int V> __global__ static void vec_to_bf16_kernel(__nv_bfloat16 *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v[V];
        vec_ld<V>(v, src + V * i);
        vec_st<V>(dst + V * i, v);
    }
}
/* dst[0 .. n) = bf16(src[0 .. n)) on stream s, rounding to nearest even: 8 values a thread where both
 * pointers are 16-byte aligned, the rest one at a time (the same roundings either way). Only launches:
 * the caller checks cudaGetLastError. */
static inline void vec_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n, cudaStream_t s) {
    const int threads = 256;
    auto blocks = [](int64_t items) {
        const int64_t b = (items + threads - 1) / threads;
        return (unsigned)(b < 65536 ? b : 65536);
    };
    const int64_t n8 = ((uintptr_t)dst | (uintptr_t)src) % 16 == 0 ? n / 8 : 0;
    if (n8 > 0) vec_to_bf16_kernel<8><<<blocks(n8), threads, 0, s>>>(dst, src, n8);
    if (n > 8 * n8) vec_to_bf16_kernel<1><<<blocks(n - 8 * n8), threads, 0, s>>>(dst + 8 * n8, src + 8 * n8, n - 8 * n8);
}
