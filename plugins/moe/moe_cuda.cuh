/* CUDA helpers shared by the MoE-slot plugins' .cu files (topk, dense): error checks that report
 * through h->error, f32/bf16 element access, grid sizing, and the SwiGLU forward/backward kernels. */
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

/* Blocks for a grid-stride loop over n elements (n > 0). */
enum { MOE_THREADS = 256 };
static inline unsigned moe_blocks(int64_t n) {
    int64_t b = (n + MOE_THREADS - 1) / MOE_THREADS;
    return (unsigned)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}
#define MOE_GRID_LOOP(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* dst = src (f32 -> T), n elements. */
template <typename T>
__global__ void moe_cast_kernel(T *dst, const float *src, int64_t n) {
    MOE_GRID_LOOP(i, n) moe_st(dst, i, src[i]);
}

/* act = silu(g) * u row by row; gu: (rows, 2F) with the gate in columns [0, F), up in [F, 2F). */
template <typename T>
__global__ void moe_swiglu_fwd_kernel(T *act, const T *gu, int64_t rows, int F) {
    MOE_GRID_LOOP(i, rows * F) {
        const int64_t r = i / F, f = i % F;
        const float g = moe_ld(gu, r * 2 * F + f), u = moe_ld(gu, r * 2 * F + F + f);
        const float s = 1.0f / (1.0f + expf(-g));
        moe_st(act, i, g * s * u);
    }
}

/* Backward of the SwiGLU: dact (rows, F) f32 in, dgu (rows, 2F) written (gate half, up half).
 * a = g s u with s = sigmoid(g): da/du = g s, da/dg = u s (1 + g (1 - s)). */
template <typename T>
__global__ void moe_swiglu_bwd_kernel(T *dgu, const float *dact, const T *gu, int64_t rows, int F) {
    MOE_GRID_LOOP(i, rows * F) {
        const int64_t r = i / F, f = i % F;
        const float g = moe_ld(gu, r * 2 * F + f), u = moe_ld(gu, r * 2 * F + F + f);
        const float s = 1.0f / (1.0f + expf(-g)), da = dact[i];
        moe_st(dgu, r * 2 * F + F + f, da * g * s);
        moe_st(dgu, r * 2 * F + f, da * u * s * (1.0f + g * (1.0f - s)));
    }
}

#endif
