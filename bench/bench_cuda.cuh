/* What the CUDA kernel benchmarks (bench_experts.cu, bench_gemm.cu, bench_lightning.cu, bench_softmax.cu)
 * share: a CUDA-call check that exits with the program's name, normal random inputs from a counter hash,
 * the median time of a piece of GPU work, and (bench_flags.h, which every benchmark uses) their command-line
 * flags. The includer defines BENCH_NAME first. */
#pragma once

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_flags.h"

#define CK(call)                                                                                                   \
    do {                                                                                                           \
        cudaError_t e_ = (call);                                                                                   \
        if (e_ != cudaSuccess) {                                                                                   \
            fprintf(stderr, "%s: %s: %s\n", BENCH_NAME, #call, cudaGetErrorString(e_));                            \
            exit(1);                                                                                               \
        }                                                                                                          \
    } while (0)

/* The i-th normal value of stream `seed`: a counter hash and Box-Muller. */
__device__ static inline float bench_normal(int64_t i, uint64_t seed) {
    uint64_t h = (uint64_t)i * 0x9E3779B97F4A7C15ull + seed;
    h ^= h >> 33, h *= 0xff51afd7ed558ccdull, h ^= h >> 33, h *= 0xc4ceb9fe1a85ec53ull, h ^= h >> 33;
    const float u1 = ((h >> 40) + 1) * (1.0f / 16777217.0f), u2 = ((h >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

static inline int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median over iters of the GPU time (ms, events on the default stream) of run(), after two warm-up runs. */
template <typename F> static float bench_median_ms(int iters, F run) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *ms = (float *)malloc(sizeof(float) * (size_t)(iters > 0 ? iters : 1));
    if (!ms) {
        fprintf(stderr, "%s: out of memory\n", BENCH_NAME);
        exit(1);
    }
    for (int it = -2; it < iters; it++) {
        CK(cudaEventRecord(e0));
        run();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        if (it >= 0) CK(cudaEventElapsedTime(&ms[it], e0, e1));
    }
    qsort(ms, (size_t)iters, sizeof(float), cmp_float);
    const float med = ms[iters / 2];
    free(ms);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return med;
}
