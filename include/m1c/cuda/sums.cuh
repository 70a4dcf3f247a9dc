/* Fixed-order sums shared by the core's and the plugins' kernels: the same inputs give the same bits on
 * every run (no float atomics, a fixed butterfly and a fixed chunk order). */
#pragma once

#include <cuda_runtime.h>

#include "pdl.cuh"

/* Sum over the warp (float or double); the xor butterfly leaves the same bits on every lane. */
template <typename T> __device__ static inline T m1c_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* The transposing sum over the warp of NP values a lane (NP a power of two, at most 32): lane l ends with
 * the sum over all lanes of v[l NP / 32] (v is consumed). log2 NP exchange rounds halve the values a lane
 * holds (round r pairs lanes 16 >> r apart, each keeping one half and adding its partner's copy of it),
 * then a butterfly over the lower lane bits: 31 shuffles for 32 values instead of 32 x 5. A fixed order:
 * the same bits on every run, and on the 32 / NP lanes that share a value. */
template <int NP> __device__ static inline float m1c_warp_xpose_sum(float (&v)[NP]) {
    static_assert(NP >= 1 && NP <= 32 && (NP & (NP - 1)) == 0, "NP: a power of two up to 32");
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int h = NP / 2, b = 16; h >= 1; h /= 2, b /= 2) {
        const bool up = (lane & b) != 0;
#pragma unroll
        for (int i = 0; i < h; i++) {
            const float send = up ? v[i] : v[i + h], keep = up ? v[i + h] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, b);
        }
    }
    float s = v[0];
#pragma unroll
    for (int b = 16 / NP; b >= 1; b /= 2) s += __shfl_xor_sync(0xffffffffu, s, b);
    return s;
}

/* dw[c] += the sum over the chunks k of part[k][c] (chunks rows of C), in a fixed order: thread (x, y) of a
 * 32 x M1C_CS_Y block adds chunks y, y + M1C_CS_Y, ... of column c, then thread y = 0 adds the M1C_CS_Y sums
 * in order. The grid is small (C / 32 blocks), so each thread loads M1C_CS_BATCH chunks before adding any:
 * 512 chunks in one round of loads. Such sums often run beside the optimizer's traffic, whose queueing makes
 * each round long (0.28 -> 0.18 ms a step for the core's norms with the batching, H200). Launched by
 * m1c_colsum_add_launch (a programmatic dependent launch). */
enum { M1C_CS_Y = 32, M1C_CS_BATCH = 16 };
__global__ static void m1c_colsum_add(float *dw, const float *part, int chunks, int C) {
    pdl_start();
    __shared__ float sh[M1C_CS_Y][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0;
    if (c < C) {
        int k = threadIdx.y;
        for (; k + (M1C_CS_BATCH - 1) * M1C_CS_Y < chunks; k += M1C_CS_BATCH * M1C_CS_Y) {
            float v[M1C_CS_BATCH];
#pragma unroll
            for (int u = 0; u < M1C_CS_BATCH; u++) v[u] = part[(int64_t)(k + M1C_CS_Y * u) * C + c];
#pragma unroll
            for (int u = 0; u < M1C_CS_BATCH; u++) s += v[u];
        }
        for (; k < chunks; k += M1C_CS_Y) s += part[(int64_t)k * C + c];
    }
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0;
        for (int k = 0; k < M1C_CS_Y; k++) t += sh[k][threadIdx.x];
        dw[c] += t;
    }
}

static inline cudaError_t m1c_colsum_add_launch(float *dw, const float *part, int chunks, int C, cudaStream_t s) {
    return pdl_launch(m1c_colsum_add, (C + 31) / 32, dim3(32, M1C_CS_Y), 0, s, dw, part, chunks, C);
}
