/* CUDA helpers shared by the MoE-slot plugins' .cu files (topk, dense): error checks that report
 * through h->error, f32/bf16 element and vector access, grid sizing, and the SwiGLU forward/backward
 * kernels (16-byte accesses where the sizes and the alignment allow, element by element otherwise). */
#ifndef M1C_MOE_CUDA_CUH
#define M1C_MOE_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "m1c/plugin.h"

/* Return M1C_ERR through h->error when a CUDA call fails (one line, naming the call). */
#define MOE_CUDA_CHECK(h, call)                                                                             \
    do {                                                                                                    \
        cudaError_t moe_e_ = (call);                                                                        \
        if (moe_e_ != cudaSuccess)                                                                          \
            return (h)->error((h), "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(moe_e_)); \
    } while (0)
/* After every launch: a bad configuration shows up here, a fault at the next synchronising call. */
#define MOE_LAUNCH_CHECK(h, what)                                                                           \
    do {                                                                                                    \
        cudaError_t moe_e_ = cudaGetLastError();                                                            \
        if (moe_e_ != cudaSuccess)                                                                          \
            return (h)->error((h), "%s:%d: launch of %s: %s", __FILE__, __LINE__, what,                     \
                              cudaGetErrorString(moe_e_));                                                  \
    } while (0)

/* Element access: f32 or bf16 storage, f32 arithmetic (bf16 stores round to nearest even). */
static __device__ __forceinline__ float moe_ld(const float *p, int64_t i) { return p[i]; }
static __device__ __forceinline__ float moe_ld(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }
static __device__ __forceinline__ void moe_st(float *p, int64_t i, float v) { p[i] = v; }
static __device__ __forceinline__ void moe_st(__nv_bfloat16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

/* Vector access: V consecutive elements at p as floats, in accesses of up to 16 bytes (f32: float4 when
 * V % 4 == 0; bf16: 16 bytes when V % 8 == 0, 8 when V % 4 == 0), element by element for other V. The
 * caller guarantees the alignment of the wide accesses. bf16 is the upper half of an f32, so a load is a
 * shift; stores round to nearest even exactly as moe_st does. */
static __device__ __forceinline__ uint32_t moe_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
static __device__ __forceinline__ void moe_unbf16x2(float *v, uint32_t w) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
}
template <int V>
static __device__ __forceinline__ void moe_ldv(float *v, const float *p) {
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
template <int V>
static __device__ __forceinline__ void moe_ldv(float *v, const __nv_bfloat16 *p) {
    if constexpr (V % 8 == 0) {
        #pragma unroll
        for (int q = 0; q < V / 8; q++) {
            const uint4 t = reinterpret_cast<const uint4 *>(p)[q];
            moe_unbf16x2(v + 8 * q, t.x), moe_unbf16x2(v + 8 * q + 2, t.y);
            moe_unbf16x2(v + 8 * q + 4, t.z), moe_unbf16x2(v + 8 * q + 6, t.w);
        }
    } else if constexpr (V % 4 == 0) {
        #pragma unroll
        for (int q = 0; q < V / 4; q++) {
            const uint2 t = reinterpret_cast<const uint2 *>(p)[q];
            moe_unbf16x2(v + 4 * q, t.x), moe_unbf16x2(v + 4 * q + 2, t.y);
        }
    } else {
        #pragma unroll
        for (int t = 0; t < V; t++) v[t] = __bfloat162float(p[t]);
    }
}
template <int V>
static __device__ __forceinline__ void moe_stv(float *p, const float *v) {
    if constexpr (V % 4 == 0) {
        #pragma unroll
        for (int q = 0; q < V / 4; q++)
            reinterpret_cast<float4 *>(p)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    } else {
        #pragma unroll
        for (int t = 0; t < V; t++) p[t] = v[t];
    }
}
template <int V>
static __device__ __forceinline__ void moe_stv(__nv_bfloat16 *p, const float *v) {
    if constexpr (V % 8 == 0) {
        #pragma unroll
        for (int q = 0; q < V / 8; q++)
            reinterpret_cast<uint4 *>(p)[q] =
                make_uint4(moe_bf16x2(v[8 * q], v[8 * q + 1]), moe_bf16x2(v[8 * q + 2], v[8 * q + 3]),
                           moe_bf16x2(v[8 * q + 4], v[8 * q + 5]), moe_bf16x2(v[8 * q + 6], v[8 * q + 7]));
    } else if constexpr (V % 4 == 0) {
        #pragma unroll
        for (int q = 0; q < V / 4; q++)
            reinterpret_cast<uint2 *>(p)[q] = make_uint2(moe_bf16x2(v[4 * q], v[4 * q + 1]),
                                                         moe_bf16x2(v[4 * q + 2], v[4 * q + 3]));
    } else {
        #pragma unroll
        for (int t = 0; t < V; t++) p[t] = __float2bfloat16_rn(v[t]);
    }
}
/* The elements of one 16-byte access of T; whether p allows such accesses (host and device). */
template <typename T>
struct moe_vec16 {
    static constexpr int V = 16 / (int)sizeof(T);
};
static __host__ __device__ __forceinline__ bool moe_al16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Blocks for a grid-stride loop over n elements (n > 0). */
enum { MOE_THREADS = 256 };
static inline unsigned moe_blocks(int64_t n) {
    int64_t b = (n + MOE_THREADS - 1) / MOE_THREADS;
    return (unsigned)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}
#define MOE_GRID_LOOP(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* The row of flat index i over rows of nv items: 32-bit division where i fits (64-bit division is a
 * long subroutine), which is every size in practice. */
static __device__ __forceinline__ int64_t moe_row(int64_t i, int nv) {
    return i <= (int64_t)UINT32_MAX ? (int64_t)((uint32_t)i / (uint32_t)nv) : i / nv;
}

/* dst = src (f32 -> T), n elements. */
template <typename T>
__global__ void moe_cast_kernel(T *dst, const float *src, int64_t n) {
    MOE_GRID_LOOP(i, n) moe_st(dst, i, src[i]);
}

/* ---- SwiGLU ------------------------------------------------------------------------------------- */

/* act = silu(g) * u row by row; gu: (rows, 2F) with the gate in columns [0, F), up in [F, 2F). V
 * columns per step (F % V == 0). */
template <typename T, int V>
static __device__ __forceinline__ void moe_swiglu_fwd_rows(T *act, const T *gu, int64_t rows, int F) {
    const int nv = F / V;
    MOE_GRID_LOOP(i, rows * nv) {
        const int64_t r = moe_row(i, nv);
        const int c = (int)(i - r * nv) * V;
        float g[V], u[V], o[V];
        moe_ldv<V>(g, gu + r * 2 * F + c);
        moe_ldv<V>(u, gu + r * 2 * F + F + c);
        #pragma unroll
        for (int t = 0; t < V; t++) {
            const float s = 1.0f / (1.0f + expf(-g[t]));
            o[t] = g[t] * s * u[t];
        }
        moe_stv<V>(act + r * F + c, o);
    }
}
/* Backward: dact (rows, F) in (f32, or bf16: topk's BF16 path; f32 arithmetic either way), dgu (rows,
 * 2F) written (gate half, up half). a = g s u with s = sigmoid(g): da/du = g s, da/dg = u s (1 + g (1 - s)). */
template <typename T, typename TD, int V>
static __device__ __forceinline__ void moe_swiglu_bwd_rows(T *dgu, const TD *dact, const T *gu, int64_t rows,
                                                           int F) {
    const int nv = F / V;
    MOE_GRID_LOOP(i, rows * nv) {
        const int64_t r = moe_row(i, nv);
        const int c = (int)(i - r * nv) * V;
        float g[V], u[V], da[V], dg[V], du[V];
        moe_ldv<V>(g, gu + r * 2 * F + c);
        moe_ldv<V>(u, gu + r * 2 * F + F + c);
        moe_ldv<V>(da, dact + r * F + c);
        #pragma unroll
        for (int t = 0; t < V; t++) {
            const float s = 1.0f / (1.0f + expf(-g[t]));
            du[t] = da[t] * g[t] * s;
            dg[t] = da[t] * u[t] * s * (1.0f + g[t] * (1.0f - s));
        }
        moe_stv<V>(dgu + r * 2 * F + F + c, du);
        moe_stv<V>(dgu + r * 2 * F + c, dg);
    }
}
/* 16-byte steps where F and the pointers allow (a uniform branch: every thread takes the same one). */
template <typename T>
static __device__ __forceinline__ void moe_swiglu_fwd_any(T *act, const T *gu, int64_t rows, int F) {
    constexpr int V = moe_vec16<T>::V;
    if (F % V == 0 && moe_al16(act) && moe_al16(gu)) moe_swiglu_fwd_rows<T, V>(act, gu, rows, F);
    else moe_swiglu_fwd_rows<T, 1>(act, gu, rows, F);
}
/* (V steps of T; a f32 dact with bf16 T reads 32 bytes per step, a bf16 dact with f32 T 8 bytes: both
 * aligned where dact is 16-byte aligned and F % V == 0.) */
template <typename T, typename TD>
static __device__ __forceinline__ void moe_swiglu_bwd_any(T *dgu, const TD *dact, const T *gu, int64_t rows, int F) {
    constexpr int V = moe_vec16<T>::V;
    if (F % V == 0 && moe_al16(dgu) && moe_al16(dact) && moe_al16(gu))
        moe_swiglu_bwd_rows<T, TD, V>(dgu, dact, gu, rows, F);
    else moe_swiglu_bwd_rows<T, TD, 1>(dgu, dact, gu, rows, F);
}

/* The kernels, for `rows` rows known on the host, or (the _dev forms) *rows read on the device: topk's
 * kept row count, which its grouped path never copies to the host (launched for the most rows there
 * can be; the surplus threads find nothing to do). Any grid: the loops stride over it. */
template <typename T>
__global__ void moe_swiglu_fwd_kernel(T *act, const T *gu, int64_t rows, int F) {
    moe_swiglu_fwd_any<T>(act, gu, rows, F);
}
template <typename T>
__global__ void moe_swiglu_fwd_dev_kernel(T *act, const T *gu, const int32_t *rows, int F) {
    moe_swiglu_fwd_any<T>(act, gu, (int64_t)*rows, F);
}
/* The backward kernels take dact as f32 or bf16 (TD, deduced from the argument). */
template <typename T, typename TD>
__global__ void moe_swiglu_bwd_kernel(T *dgu, const TD *dact, const T *gu, int64_t rows, int F) {
    moe_swiglu_bwd_any<T, TD>(dgu, dact, gu, rows, F);
}
template <typename T, typename TD>
__global__ void moe_swiglu_bwd_dev_kernel(T *dgu, const TD *dact, const T *gu, const int32_t *rows, int F) {
    moe_swiglu_bwd_any<T, TD>(dgu, dact, gu, (int64_t)*rows, F);
}
/* Blocks for the SwiGLU kernels over `rows` rows of F: one thread per 16-byte step where F allows. */
template <typename T>
static inline unsigned moe_swiglu_blocks(int64_t rows, int F) {
    constexpr int V = moe_vec16<T>::V;
    return moe_blocks(rows * (F % V == 0 ? F / V : F));
}

#endif
