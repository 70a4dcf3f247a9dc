/* CUDA helpers shared by the MoE-slot plugins' .cu files (topk, dense): error checks that report
 * through h->error, f32/bf16 element and vector access, grid sizing, and the SwiGLU forward/backward
 * kernels (16-byte accesses where the sizes and the alignment allow, element by element otherwise). */
#ifndef M1C_MOE_CUDA_CUH
#define M1C_MOE_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <m1c/cuda/vec.cuh>
#include "m1c/plugin.h"
#include <m1c/cuda/pdl.cuh>

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

/* Vector access (vec_ld, vec_st): m1c/cuda/vec.cuh. */

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
        vec_ld<V>(g, gu + r * 2 * F + c);
        vec_ld<V>(u, gu + r * 2 * F + F + c);
        #pragma unroll
        for (int t = 0; t < V; t++) {
            const float s = 1.0f / (1.0f + expf(-g[t]));
            o[t] = g[t] * s * u[t];
        }
        vec_st<V>(act + r * F + c, o);
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
        vec_ld<V>(g, gu + r * 2 * F + c);
        vec_ld<V>(u, gu + r * 2 * F + F + c);
        vec_ld<V>(da, dact + r * F + c);
        #pragma unroll
        for (int t = 0; t < V; t++) {
            const float s = 1.0f / (1.0f + expf(-g[t]));
            du[t] = da[t] * g[t] * s;
            dg[t] = da[t] * u[t] * s * (1.0f + g[t] * (1.0f - s));
        }
        vec_st<V>(dgu + r * 2 * F + F + c, du);
        vec_st<V>(dgu + r * 2 * F + c, dg);
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
    pdl_start();
    moe_swiglu_fwd_any<T>(act, gu, (int64_t)*rows, F);
}
/* The backward kernels take dact as f32 or bf16 (TD, deduced from the argument). */
template <typename T, typename TD>
__global__ void moe_swiglu_bwd_kernel(T *dgu, const TD *dact, const T *gu, int64_t rows, int F) {
    moe_swiglu_bwd_any<T, TD>(dgu, dact, gu, rows, F);
}
template <typename T, typename TD>
__global__ void moe_swiglu_bwd_dev_kernel(T *dgu, const TD *dact, const T *gu, const int32_t *rows, int F) {
    pdl_start();
    moe_swiglu_bwd_any<T, TD>(dgu, dact, gu, (int64_t)*rows, F);
}
/* Blocks for the SwiGLU kernels over `rows` rows of F: one thread per 16-byte step where F allows. */
template <typename T>
static inline unsigned moe_swiglu_blocks(int64_t rows, int F) {
    constexpr int V = moe_vec16<T>::V;
    return moe_blocks(rows * (F % V == 0 ? F / V : F));
}

#endif
