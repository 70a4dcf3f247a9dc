/* Block-wide all-reductions for the core's kernels: every thread of the block gets the result. blockDim.x
 * is a multiple of 32 (at most 1024) and sh holds blockDim.x / 32 values. The xor butterfly combines the
 * same two values on both lanes of each exchange, so every thread holds a bit-identical result (and takes
 * the same branch on it); the leading barrier lets back-to-back calls share sh. */
#pragma once

#include <cuda_runtime.h>

struct red_add {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct red_fmax { /* fmaxf: a NaN loses to a number */
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct red_umax {
    __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return b > a ? b : a; }
};
struct red_umin {
    __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const { return b < a ? b : a; }
};

/* op over the block's v; identity: op's neutral value (what the missing warps contribute). */
template <typename T, typename Op> __device__ static inline T block_reduce(T v, T *sh, T identity, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
