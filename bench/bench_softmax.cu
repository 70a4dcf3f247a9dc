/* The softmax-attention tensor-core kernels alone (softmax_tc.cuh, what the plugin runs for BF16 compute at
 * head_dim 64 and 128): causal forward, and forward + backward, at a fixed number of tokens per batch over
 * sequence lengths, in tokens per second, as one table, to set beside torch's SDPA (bench/sdpa_reference.py).
 * Layouts and dtypes are the plugin's: q (B, T, heads*hd), k and v (B, T, kv_heads*hd) in bf16, normal
 * values; the forward writes att (B, T, heads*hd) bf16 and lse (B, heads, T) f32; the backward takes dO in
 * f32 (the layer's datt, q's layout) and is D = rowsum(dO * att), then dk and dv, then dq (all f32, written).
 *
 *   m1c_bench_softmax [--heads 16] [--kv-heads 16] [--head-dim 128] [--tokens 65536] [--T 2048,4096,8192]
 *                     [--iters 10] [--kernel auto|mma|wgmma]   (the backward's: wgmma where built and run on sm_90)
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/attention/softmax/softmax_tc.cuh"

#define BENCH_NAME "m1c_bench_softmax"
#include "bench_cuda.cuh"

/* Normal values, as torch.randn gives the reference its inputs. */
template <typename TO>
__global__ static void k_fill(TO *p, int64_t n, uint64_t seed) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        st(p + i, bench_normal(i, seed));
    }
}

/* Adds to *bad the number of non-finite values of p[0..n): a wrong launch shows as NaN or garbage. */
template <typename TA>
__global__ static void k_nonfinite(const TA *p, int64_t n, unsigned long long *bad) {
    unsigned long long c = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        c += !isfinite(ld(p + i));
    if (c) atomicAdd(bad, c);
}

typedef struct bufs {
    __nv_bfloat16 *q, *k, *v, *att;
    float *lse, *dO, *D, *dq, *dk, *dv;
    __nv_bfloat16 *dO_lp;
    unsigned long long *bad; /* device counter of k_nonfinite */
    int wg;                  /* the backward on warpgroup MMA (tc_attend_bwd's wg) */
} bufs;

typedef struct shape {
    int B, T, nh, kvh, hd;
} shape;

static void fwd(const bufs *b, const shape *p) {
    const int kd = p->kvh * p->hd;
    CK(tc_attend_fwd(0, b->q, b->k, b->v, (int64_t)p->T * kd, p->hd, kd, b->att, b->lse, p->B, p->T, p->nh,
                     p->nh / p->kvh, p->hd, 0, b->wg));
}

static void bwd(const bufs *b, const shape *p) {
    const char *what = "";
    const cudaError_t e = tc_attend_bwd(0, b->q, b->k, b->v, b->att, b->dO, b->dO_lp, b->lse, b->D, b->dq, b->dk,
                                        b->dv, p->B, p->T, p->nh, p->kvh, p->hd, b->wg, &what);
    if (e != cudaSuccess) {
        fprintf(stderr, "m1c_bench_softmax: %s: %s\n", what, cudaGetErrorString(e));
        exit(1);
    }
}

/* Median over iters of the time (ms) of the forward (with_bwd = 0) or forward + backward (with_bwd = 1). */
static float time_attention(const bufs *b, const shape *p, int with_bwd, int iters) {
    return bench_median_ms(iters, [&] {
        fwd(b, p);
        if (with_bwd) bwd(b, p);
    });
}

/* The backward's kernels one by one (ms, median over iters; head_dim 128): D and bf16 dO, dk dv, dq. */
static void breakdown(const bufs *b, const shape *p, int iters) {
    if (p->hd != 128) return;
    cudaEvent_t ev[4];
    for (int i = 0; i < 4; i++) CK(cudaEventCreate(&ev[i]));
    float t[3][64];
    const int n = iters < 64 ? iters : 64;
    const float scale = 1.0f / sqrtf(128.0f), scale_log2 = 1.4426950408889634f * scale;
    const int64_t rows = (int64_t)p->B * p->T * p->nh;
    const dim3 gkv((p->T + FA_T - 1) / FA_T, p->kvh, p->B), gq((p->T + fa_tq<128>() - 1) / fa_tq<128>(), p->nh, p->B);
    const dim3 wkv((p->T + FW_T - 1) / FW_T, p->kvh, p->B), wq((p->T + FW_T - 1) / FW_T, p->nh, p->B);
    fwd(b, p);
    for (int it = 0; it < n; it++) {
        CK(cudaEventRecord(ev[0]));
        fa_prep_kernel<128><<<(int)((rows * 32 + 255) / 256), 256>>>(b->dO_lp, b->D, b->dO, b->att, p->T, p->nh, rows);
        CK(cudaEventRecord(ev[1]));
        if (b->wg)
            fw_bwd_kv_kernel<128><<<wkv, 128, wg_smem_bytes<fw_dkv_smem<128>>()>>>(
                b->q, b->k, b->v, b->dO_lp, b->lse, b->D, b->dk, b->dv, p->T, p->nh, p->kvh, scale, scale_log2);
        else
            fa_bwd_kv_kernel<128><<<gkv, FA_THREADS, sizeof(fa_dkv_smem<128>)>>>(
                b->q, b->k, b->v, b->dO_lp, b->lse, b->D, b->dk, b->dv, p->T, p->nh, p->kvh, scale, scale_log2);
        CK(cudaEventRecord(ev[2]));
        if (b->wg)
            fw_bwd_q_kernel<128><<<wq, 128, wg_smem_bytes<fw_dq_smem<128>>()>>>(b->q, b->k, b->v, b->dO_lp, b->lse, b->D,
                                                                               b->dq, p->T, p->nh, p->kvh, scale, scale_log2);
        else
            fa_bwd_q_kernel<128><<<gq, 32 * FA_FW, sizeof(fa_dq_smem<128>)>>>(b->q, b->k, b->v, b->dO_lp, b->lse, b->D,
                                                                             b->dq, p->T, p->nh, p->kvh, scale, scale_log2);
        CK(cudaEventRecord(ev[3]));
        CK(cudaGetLastError());
        CK(cudaEventSynchronize(ev[3]));
        for (int k = 0; k < 3; k++) CK(cudaEventElapsedTime(&t[k][it], ev[k], ev[k + 1]));
    }
    for (int k = 0; k < 3; k++) qsort(t[k], (size_t)n, sizeof(float), cmp_float);
    printf("  T %d backward: D and bf16 dO %.3f ms, dk dv %.3f ms, dq %.3f ms\n", p->T, t[0][n / 2], t[1][n / 2],
           t[2][n / 2]);
    for (int i = 0; i < 4; i++) CK(cudaEventDestroy(ev[i]));
}

/* Non-finite values among the outputs of the last run (att and lse; dq, dk, dv after a backward). */
static unsigned long long nonfinite(const bufs *b, const shape *p, int with_bwd) {
    const int64_t BT = (int64_t)p->B * p->T, nq = BT * p->nh * p->hd, nk = BT * p->kvh * p->hd;
    unsigned long long bad = 0;
    CK(cudaMemset(b->bad, 0, sizeof bad));
    k_nonfinite<<<1024, 256>>>(b->att, nq, b->bad), k_nonfinite<<<1024, 256>>>(b->lse, BT * p->nh, b->bad);
    if (with_bwd) {
        k_nonfinite<<<1024, 256>>>(b->dq, nq, b->bad), k_nonfinite<<<1024, 256>>>(b->dk, nk, b->bad);
        k_nonfinite<<<1024, 256>>>(b->dv, nk, b->bad);
    }
    CK(cudaGetLastError());
    CK(cudaMemcpy(&bad, b->bad, sizeof bad, cudaMemcpyDeviceToHost));
    return bad;
}

/* Times one case and prints its row; exits 1 if an output is not finite. */
static void run_case(const bufs *b, const shape *p, int with_bwd, int iters) {
    const float ms = time_attention(b, p, with_bwd, iters);
    const unsigned long long bad = nonfinite(b, p, with_bwd);
    printf("%-10s %8d %6d %12.3f %14.2f\n", with_bwd ? "fwd+bwd" : "fwd", p->T, p->B, ms,
           (double)p->B * p->T / (ms * 1e-3) / 1e6);
    fflush(stdout);
    if (bad) {
        fprintf(stderr, "m1c_bench_softmax: %s at T %d: %llu non-finite output values\n", with_bwd ? "fwd+bwd" : "fwd",
                p->T, bad);
        exit(1);
    }
}

int main(int argc, char **argv) {
    int nh = 16, kvh = 16, hd = 128, iters = 10, choice = 0;
    int64_t tokens = 65536;
    int Ts[16] = {2048, 4096, 8192}, nT = 3;
    static const char *const kernels[] = {"auto", "mma", "wgmma", NULL};
    const bench_flag flags[] = {bf_int("--heads", &nh, 1, 65535),         bf_int("--kv-heads", &kvh, 1, 65535),
                                bf_int("--head-dim", &hd, 1, 1024),        bf_i64("--tokens", &tokens, 1, 1LL << 40),
                                bf_int("--iters", &iters, 1, 100000),      bf_list("--T", Ts, &nT, 16),
                                bf_choice("--kernel", &choice, kernels)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0],
                    "usage: m1c_bench_softmax [--heads N] [--kv-heads N] [--head-dim 64|128] [--tokens N] "
                    "[--T a,b,..] [--iters N] [--kernel auto|mma|wgmma]", NULL, NULL, 0))
        return 1;
    const int kernel = choice - 1; /* -1 auto, 0 mma, 1 wgmma */
    if (nh % kvh || (hd != 64 && hd != 128)) {
        fprintf(stderr, "m1c_bench_softmax: need kv-heads dividing heads and head-dim 64 or 128\n");
        return 1;
    }
    int64_t rows = 1; /* B * T of the largest case: the buffers' rows */
    for (int i = 0; i < nT; i++) {
        const int64_t B = tokens / Ts[i] > 0 ? tokens / Ts[i] : 1;
        if (B > 65535) {
            fprintf(stderr, "m1c_bench_softmax: T %d gives %lld sequences, over the grid limit 65535\n", Ts[i],
                    (long long)B);
            return 1;
        }
        rows = B * Ts[i] > rows ? B * Ts[i] : rows;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "m1c_bench_softmax: no CUDA device\n");
        return 1;
    }
    if (kernel == 1 && !wg_available()) {
        fprintf(stderr, "m1c_bench_softmax: --kernel wgmma needs a build for sm_90a and a GPU of compute capability 9.0\n");
        return 1;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const size_t need = tc_smem_max(hd);
    if (need > prop.sharedMemPerBlockOptin) {
        fprintf(stderr, "m1c_bench_softmax: the kernels need %zu bytes of shared memory per block, %s allows %zu\n",
                need, prop.name, prop.sharedMemPerBlockOptin);
        return 1;
    }
    size_t bytes = 0;
    const cudaError_t e = tc_raise_smem(hd, &bytes);
    if (e != cudaSuccess) {
        fprintf(stderr, "m1c_bench_softmax: cudaFuncSetAttribute (%zu bytes of shared memory): %s\n", bytes,
                cudaGetErrorString(e));
        return 1;
    }

    const int64_t nq = rows * nh * hd, nk = rows * kvh * hd, nl = rows * nh;
    bufs b;
    b.wg = kernel < 0 ? wg_available() : kernel;
    CK(cudaMalloc((void **)&b.q, (size_t)nq * 2));
    CK(cudaMalloc((void **)&b.k, (size_t)nk * 2));
    CK(cudaMalloc((void **)&b.v, (size_t)nk * 2));
    CK(cudaMalloc((void **)&b.att, (size_t)nq * 2));
    CK(cudaMalloc((void **)&b.lse, (size_t)nl * 4));
    CK(cudaMalloc((void **)&b.dO, (size_t)nq * 4));
    CK(cudaMalloc((void **)&b.dO_lp, (size_t)nq * 2));
    CK(cudaMalloc((void **)&b.D, (size_t)nl * 4));
    CK(cudaMalloc((void **)&b.dq, (size_t)nq * 4));
    CK(cudaMalloc((void **)&b.dk, (size_t)nk * 4));
    CK(cudaMalloc((void **)&b.dv, (size_t)nk * 4));
    CK(cudaMalloc((void **)&b.bad, sizeof(unsigned long long)));
    k_fill<<<1024, 256>>>(b.q, nq, 1), k_fill<<<1024, 256>>>(b.k, nk, 2), k_fill<<<1024, 256>>>(b.v, nk, 3);
    k_fill<<<1024, 256>>>(b.dO, nq, 4);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());

    printf("softmax attention (tensor cores, %s), %s (%d SMs), causal, q k v bf16, att bf16, dO dq dk dv "
           "f32, %d query heads, %d KV heads x %d, %lld tokens per batch, median of %d\n",
           b.wg ? "wgmma" : "mma.sync", prop.name, prop.multiProcessorCount, nh, kvh, hd, (long long)tokens, iters);
    printf("%-10s %8s %6s %12s %14s\n", "pass", "T", "batch", "ms", "M tokens/s");
    for (int pass = 1; pass >= 0; pass--) /* forward + backward, then forward alone */
        for (int i = 0; i < nT; i++) {
            const shape p = {(int)(tokens / Ts[i] > 0 ? tokens / Ts[i] : 1), Ts[i], nh, kvh, hd};
            run_case(&b, &p, pass, iters);
        }
    if (getenv("M1C_BENCH_BREAKDOWN"))
        for (int i = 0; i < nT; i++) {
            const shape p = {(int)(tokens / Ts[i] > 0 ? tokens / Ts[i] : 1), Ts[i], nh, kvh, hd};
            breakdown(&b, &p, iters);
        }
    cudaFree(b.q), cudaFree(b.k), cudaFree(b.v), cudaFree(b.att), cudaFree(b.lse), cudaFree(b.dO), cudaFree(b.dO_lp);
    cudaFree(b.D);
    cudaFree(b.dq), cudaFree(b.dk), cudaFree(b.dv), cudaFree(b.bad);
    return 0;
}
