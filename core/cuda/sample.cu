/* Batched token sampling on the GPU with m1c_sample's semantics (core/sample.c), so that decoding copies
 * back B token ids per step instead of B x V logits. One block per row; no sort: every token gets a
 * unique 64-bit key that orders the row the way the CPU walks it, and top-k, top-p and the draw are
 * each a binary search over key values, one pass over the row per probe (O(V log V) per row). */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"
#include "ops.h"
#include "reduce.cuh"

#define SAMPLE_THREADS 512

/* Failures are kept for the caller to report (backend.h). */
static void check_launch(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) m1c_cuda_fail(what, cudaGetErrorString(e));
}

/* A float's bits as an unsigned integer of the same order (-0 taken as +0, which compares equal). */
__device__ static uint32_t ordered_bits(float x) {
    uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* The order the CPU walks a row in: by probability descending, ties by index ascending, when it sorts
 * (top-k or top-p active); by index otherwise. Probabilities are >= 0, so their bits order them; the
 * low L bits hold mask - v, so a larger key comes first and keys are unique. */
__device__ static uint64_t key_of(const float *p, int v, int L, uint64_t mask, int by_prob) {
    uint64_t k = mask - (uint64_t)v;
    return by_prob ? ((uint64_t)__float_as_uint(p[v]) << L) | k : k;
}

struct row_ctx {
    const float *p;
    int V, L, by_prob;
    uint64_t mask;
    double *shd;
    int *shi;
};

/* Probability mass and number of tokens whose key is >= t (the first tokens of the walk up to t). */
__device__ static double mass_from(const row_ctx &c, uint64_t t) {
    double s = 0;
    for (int v = threadIdx.x; v < c.V; v += blockDim.x)
        if (key_of(c.p, v, c.L, c.mask, c.by_prob) >= t) s += (double)c.p[v];
    return block_reduce(s, c.shd, 0.0, red_add());
}

__device__ static int count_from(const row_ctx &c, uint64_t t) {
    int n = 0;
    for (int v = threadIdx.x; v < c.V; v += blockDim.x) n += key_of(c.p, v, c.L, c.mask, c.by_prob) >= t;
    return block_reduce(n, c.shi, 0, red_add());
}

/* Each block samples row blockIdx.x. work (B, V) receives the probabilities p. Between two tokens'
 * keys the functions "mass/count of keys >= t" are constant, so the largest t in [lo, hi] where a
 * monotone condition on them holds is always a token's key (or lo, itself a key, when none holds). */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_k(const float *logits, float *work, int V, int L, int greedy, float temperature, int top_k,
                  float top_p, const float *u, int32_t *out, float *prob) {
    __shared__ double shd[32];
    __shared__ int shi[32];
    __shared__ unsigned long long shu[32];
    const int64_t row = blockIdx.x;
    const float *z = logits + row * V;
    float *p = work + row * V;

    /* argmax as the CPU loop finds it: the first of the largest values; a NaN never beats anything, and
     * the CPU starts from index 0, so a NaN there (or a row of NaNs) gives 0. */
    unsigned long long best = 0; /* below every real candidate: ordered_bits(-inf) > 0 */
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = z[v];
        if (isnan(x)) continue;
        unsigned long long k = ((unsigned long long)ordered_bits(x) << 32) | (0xffffffffu - (uint32_t)v);
        if (k > best) best = k;
    }
    best = block_reduce(best, shu, 0ull, red_umax());
    const int bi = best && !isnan(z[0]) ? (int)(0xffffffffu - (uint32_t)(best & 0xffffffffu)) : 0;
    if (greedy) {
        if (threadIdx.x == 0) {
            out[row] = bi;
            if (prob) prob[row] = 1.0f;
        }
        return;
    }

    /* p = softmax(z / temperature) as the CPU computes it: the exponent in float, the exponential
     * rounded to float (through double, correctly rounded but in rare double-rounding cases, as glibc's
     * expf is), the normaliser summed in double, the division in double rounded to float. */
    const float zmax = z[bi];
    double s = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float ev = (float)exp((double)((z[v] - zmax) / temperature));
        p[v] = ev;
        s += (double)ev;
    }
    s = block_reduce(s, shd, 0.0, red_add());
    for (int v = threadIdx.x; v < V; v += blockDim.x) p[v] = (float)((double)p[v] / s);
    __syncthreads(); /* every thread reads the whole row from here on */

    const int cut_k = top_k > 0 && top_k < V, cut_p = top_p < 1.0f;
    row_ctx c = {p, V, L, cut_k || cut_p, (1ull << L) - 1, shd, shi};
    unsigned long long kmin = ~0ull, kmax = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        uint64_t k = key_of(p, v, L, c.mask, c.by_prob);
        kmin = k < kmin ? k : kmin;
        kmax = k > kmax ? k : kmax;
    }
    kmin = block_reduce(kmin, shu, ~0ull, red_umin());
    kmax = block_reduce(kmax, shu, 0ull, red_umax());

    /* The walk keeps the tokens with key >= cut. top-k: the k-th key. */
    uint64_t cut = kmin;
    if (cut_k) {
        uint64_t lo = kmin, hi = kmax;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo + 1) / 2;
            if (count_from(c, mid) >= top_k) lo = mid;
            else hi = mid - 1;
        }
        cut = lo;
    }
    /* top-p: the first token at which the running mass reaches top_p (compared in double with the
     * float top_p, as the CPU does); if it never does, the cut stays. */
    if (cut_p) {
        uint64_t lo = cut, hi = kmax;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo + 1) / 2;
            if (mass_from(c, mid) >= (double)top_p) lo = mid;
            else hi = mid - 1;
        }
        cut = lo;
    }
    /* The draw: the first kept token whose running mass exceeds u * mass; the last kept one otherwise. */
    const double mass = mass_from(c, cut), target = (double)u[row] * mass;
    uint64_t lo = cut, hi = kmax;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo + 1) / 2;
        if (mass_from(c, mid) > target) lo = mid;
        else hi = mid - 1;
    }
    if (threadIdx.x == 0) {
        const int v = (int)(c.mask - (lo & c.mask));
        out[row] = v;
        if (prob) prob[row] = (float)((double)p[v] / mass);
    }
}

extern "C" void m1c_cuda_sample(const float *logits, float *work, int B, int V, int greedy, float temperature,
                                int top_k, float top_p, const float *u, int32_t *out, float *prob) {
    if (B <= 0 || V <= 0) return;
    int L = 1;
    while ((1ll << L) < (long long)V) L++; /* mask - v fits in L bits; a probability's 31 bits above */
    sample_rows_k<<<B, SAMPLE_THREADS, 0, (cudaStream_t)m1c_cuda_stream()>>>(logits, work, V, L, greedy, temperature, top_k, top_p, u, out, prob);
    check_launch("sample_rows");
}
