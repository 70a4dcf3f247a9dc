/* The MoE's per-expert GEMMs through m1c_cuda_gemm_ex (core/cuda/backend.cu: cuBLASLt with a per-thread
 * algorithm cache), beside the same calls through cublasGemmStridedBatchedEx (the backend before it, whose
 * heuristic runs again for every new M, N, K), in one table: ms per product per layer (all experts, event
 * time, so host-bound gaps count), TFLOP/s and host microseconds per call.
 *
 * The products are the topk plugin's per-expert calls (expert_gemm = "cublas", the default) at the GPU reference shape:
 * `rows` routed rows over E experts with uneven counts drawn anew for every layer of every step, H, F:
 *   gate_up NT bf16->bf16 [ne x 2F x H]   down NT bf16->f32 [ne x H x F]
 *   dWd TN bf16->f32 beta 1 [H x F x ne]  dact NN bf16->f32 [ne x F x H]
 *   dWgu TN bf16->f32 beta 1 [2F x H x ne]  drows NN bf16->f32 [ne x H x 2F]
 *
 *   m1c_bench_gemm [--rows 32768] [--experts 8] [--hidden 768] [--ffn 1024] [--layers 8] [--steps 10]
 *                  [--path both|lt|cublas]
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/cuda/backend.h"

#define BENCH_NAME "m1c_bench_gemm"
#include "bench_cuda.cuh"

typedef __nv_bfloat16 bf;
enum { F32 = 0, BF16 = 1, NPROD = 6, WARMUP = 2 }; /* F32, BF16: m1c_dtype values */

template <typename T>
__global__ static void k_fill(T *p, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = (T)(scale * bench_normal(i, seed));
}

template <typename T>
static T *alloc_fill(int64_t n, uint64_t seed, float scale) {
    T *p = NULL;
    CK(cudaMalloc((void **)&p, (size_t)n * sizeof(T)));
    k_fill<T><<<1024, 256>>>(p, n, seed, scale);
    CK(cudaGetLastError());
    return p;
}

typedef struct bufs {
    bf *xs, *Wgu, *gu, *act, *Wd, *dy, *dgu; /* (R, H) (E, 2F, H) (R, 2F) (R, F) (E, H, F) (R, H) (R, 2F) */
    float *Y, *dWd, *dact, *dWgu, *drow;    /* (R, H) (E, H, F) (R, F) (E, 2F, H) (R, H) */
} bufs;

/* One gemm_ex call: C = op(A) op(B) + beta C, row-major, alpha 1, batch 1. */
typedef struct call {
    int ta, tb, M, N, K;
    const void *A;
    int at, lda;
    const void *B;
    int bt, ldb;
    float beta;
    void *C;
    int ct, ldc;
} call;

static const char *const prod_name[NPROD] = {"gate_up", "down", "dWd", "dact", "dWgu", "drows"};

/* Product p for expert e, whose ne rows start at row o (the plugin's calls). */
static call expert_call(int p, const bufs *b, int e, int o, int ne, int H, int F) {
    const int64_t oo = o, ee = e, F2 = 2 * F;
    call c;
    switch (p) {
    case 0: { /* GU_e = X_e Wgu_e^T */
        const call v = {0, 1, ne, 2 * F, H, b->xs + oo * H, BF16, H, b->Wgu + ee * F2 * H, BF16, H, 0.0f,
                        b->gu + oo * F2, BF16, 2 * F};
        c = v;
    } break;
    case 1: { /* Y_e = act_e Wd_e^T */
        const call v = {0, 1, ne, H, F, b->act + oo * F, BF16, F, b->Wd + ee * H * F, BF16, F, 0.0f, b->Y + oo * H,
                        F32, H};
        c = v;
    } break;
    case 2: { /* dWd_e += dY_e^T act_e */
        const call v = {1, 0, H, F, ne, b->dy + oo * H, BF16, H, b->act + oo * F, BF16, F, 1.0f, b->dWd + ee * H * F,
                        F32, F};
        c = v;
    } break;
    case 3: { /* d act_e = dY_e Wd_e */
        const call v = {0, 0, ne, F, H, b->dy + oo * H, BF16, H, b->Wd + ee * H * F, BF16, F, 0.0f, b->dact + oo * F,
                        F32, F};
        c = v;
    } break;
    case 4: { /* dWgu_e += dGU_e^T X_e */
        const call v = {1, 0, 2 * F, H, ne, b->dgu + oo * F2, BF16, 2 * F, b->xs + oo * H, BF16, H, 1.0f,
                        b->dWgu + ee * F2 * H, F32, H};
        c = v;
    } break;
    default: { /* d rows_e = dGU_e Wgu_e */
        const call v = {0, 0, ne, H, 2 * F, b->dgu + oo * F2, BF16, 2 * F, b->Wgu + ee * F2 * H, BF16, H, 0.0f,
                        b->drow + oo * H, F32, H};
        c = v;
    } break;
    }
    return c;
}

/* path 0: m1c_cuda_gemm_ex; path 1: the previous backend's call, exactly (stream set and reset around a
 * strided-batched call of one matrix). */
static void run_call(int path, cublasHandle_t h, const call *c) {
    if (path == 0) {
        m1c_cuda_gemm_ex(NULL, c->ta, c->tb, c->M, c->N, c->K, 1.0f, c->A, c->at, c->lda, 0, c->B, c->bt, c->ldb, 0,
                         c->beta, c->C, c->ct, c->ldc, 0, 1);
        return;
    }
    static const cudaDataType_t types[] = {CUDA_R_32F, CUDA_R_16BF};
    const float alpha = 1.0f;
    cublasSetStream(h, NULL);
    const cublasStatus_t st = cublasGemmStridedBatchedEx(
        h, c->tb ? CUBLAS_OP_T : CUBLAS_OP_N, c->ta ? CUBLAS_OP_T : CUBLAS_OP_N, c->N, c->M, c->K, &alpha, c->B,
        types[c->bt], c->ldb, 0, c->A, types[c->at], c->lda, 0, &c->beta, c->C, types[c->ct], c->ldc, 0, 1,
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasSetStream(h, NULL);
    if (st != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c_bench_gemm: cublasGemmStridedBatchedEx failed (%d)\n", (int)st);
        exit(1);
    }
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Uneven expert row counts summing to R: weights uniform in [0.5, 1.5), so an expert gets between a third
 * and three times another's share. off[0..E] are the prefix sums. */
static void draw_counts(uint64_t *rng, int R, int E, int *off) {
    double w[64], sum = 0;
    for (int e = 0; e < E; e++) {
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17; /* xorshift64 */
        w[e] = 0.5 + (double)(*rng >> 11) * (1.0 / 9007199254740992.0);
        sum += w[e];
    }
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + (int)(R * w[e] / sum);
    off[E] = R; /* the rounding remainder goes to the last expert */
}

typedef struct result {
    double ms[NPROD], host_us[NPROD]; /* per layer: event ms of the product's E calls; host us per call */
} result;

/* steps (after WARMUP) of `layers` layers, each layer with new counts: the six products in order, an
 * event between products, one synchronisation per layer. Averages per layer. */
static result run_path(int path, cublasHandle_t h, const bufs *b, int R, int E, int H, int F, int layers, int steps,
                       uint64_t seed) {
    cudaEvent_t ev[NPROD + 1];
    for (int i = 0; i <= NPROD; i++) CK(cudaEventCreate(&ev[i]));
    result r;
    memset(&r, 0, sizeof r);
    uint64_t rng = seed;
    int off[65];
    for (int s = -WARMUP; s < steps; s++)
        for (int l = 0; l < layers; l++) {
            draw_counts(&rng, R, E, off);
            double host[NPROD];
            CK(cudaEventRecord(ev[0]));
            for (int p = 0; p < NPROD; p++) {
                const double t0 = now_s();
                for (int e = 0; e < E; e++) {
                    const int ne = off[e + 1] - off[e];
                    if (ne == 0) continue;
                    const call c = expert_call(p, b, e, off[e], ne, H, F);
                    run_call(path, h, &c);
                }
                host[p] = now_s() - t0;
                CK(cudaEventRecord(ev[p + 1]));
            }
            CK(cudaEventSynchronize(ev[NPROD]));
            CK(cudaGetLastError());
            if (s < 0) continue;
            for (int p = 0; p < NPROD; p++) {
                float ms = 0;
                CK(cudaEventElapsedTime(&ms, ev[p], ev[p + 1]));
                r.ms[p] += ms;
                r.host_us[p] += host[p] * 1e6 / E;
            }
        }
    for (int p = 0; p < NPROD; p++) r.ms[p] /= (double)steps * layers, r.host_us[p] /= (double)steps * layers;
    for (int i = 0; i <= NPROD; i++) CK(cudaEventDestroy(ev[i]));
    return r;
}

int main(int argc, char **argv) {
    int R = 32768, E = 8, H = 768, F = 1024, layers = 8, steps = 10, bad = 0;
    const char *path = "both";
    for (int i = 1; i < argc; i++) {
        const int more = i + 1 < argc;
        if (!strcmp(argv[i], "--rows") && more) R = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--experts") && more) E = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hidden") && more) H = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ffn") && more) F = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--layers") && more) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && more) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--path") && more) path = argv[++i];
        else bad = 1;
    }
    const int do_lt = !strcmp(path, "both") || !strcmp(path, "lt");
    const int do_cublas = !strcmp(path, "both") || !strcmp(path, "cublas");
    if (bad || (!do_lt && !do_cublas)) {
        fprintf(stderr, "usage: m1c_bench_gemm [--rows N] [--experts N] [--hidden N] [--ffn N] [--layers N] "
                        "[--steps N] [--path both|lt|cublas]\n");
        return 1;
    }
    if (E < 1 || E > 64 || R < 3 * E || H < 1 || F < 1 || layers < 1 || steps < 1) {
        fprintf(stderr, "m1c_bench_gemm: need 1 <= experts <= 64, rows >= 3 * experts, hidden, ffn, layers and "
                        "steps >= 1\n");
        return 1;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        printf("m1c_bench_gemm: no CUDA device, nothing to measure\n");
        return 0;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));

    const int64_t RH = (int64_t)R * H, RF = (int64_t)R * F, W = (int64_t)E * H * F;
    bufs b;
    /* Weights at 1/sqrt(fan-in) so the products keep unit-size values. */
    b.xs = alloc_fill<bf>(RH, 1, 1.0f), b.Wgu = alloc_fill<bf>(2 * W, 2, 1.0f / sqrtf((float)H));
    b.gu = alloc_fill<bf>(2 * RF, 3, 1.0f), b.act = alloc_fill<bf>(RF, 4, 1.0f);
    b.Wd = alloc_fill<bf>(W, 5, 1.0f / sqrtf((float)F)), b.dy = alloc_fill<bf>(RH, 6, 1.0f);
    b.dgu = alloc_fill<bf>(2 * RF, 7, 1.0f);
    b.Y = alloc_fill<float>(RH, 8, 1.0f), b.dWd = alloc_fill<float>(W, 9, 0.0f);
    b.dact = alloc_fill<float>(RF, 10, 1.0f), b.dWgu = alloc_fill<float>(2 * W, 11, 0.0f);
    b.drow = alloc_fill<float>(RH, 12, 1.0f);
    CK(cudaDeviceSynchronize());
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c_bench_gemm: cublasCreate failed\n");
        return 1;
    }

    printf("m1c_bench_gemm: %s; MoE expert products, %d rows over %d experts (new uneven counts every layer), "
           "H %d, F %d; %d layers x %d steps (+%d warm-up)\n",
           prop.name, R, E, H, F, layers, steps, WARMUP);
    /* The Lt path first; the cuBLAS path draws other counts (another seed), so that shapes cuBLAS's own
     * heuristic cache saw during the Lt run's few queries are not handed to it. */
    result lt, cb;
    m1c_cuda_gemm_stats s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    if (do_lt) {
        run_path(0, h, &b, R, E, H, F, 1, 1, 99); /* the first call's handle and workspace */
        m1c_cuda_gemm_ex_stats(&s0);
        lt = run_path(0, h, &b, R, E, H, F, layers, steps, 1);
        m1c_cuda_gemm_ex_stats(&s1);
    }
    if (do_cublas) cb = run_path(1, h, &b, R, E, H, F, layers, steps, 2);

    static const char *const shape_fmt[NPROD] = {"ne x %d x %d", "ne x %d x %d", "%d x %d x ne",
                                                 "ne x %d x %d", "%d x %d x ne", "ne x %d x %d"};
    const int dims[NPROD][2] = {{2 * F, H}, {H, F}, {H, F}, {F, H}, {2 * F, H}, {H, 2 * F}};
    static const char *const ops[NPROD] = {"NT", "NT", "TN", "NN", "TN", "NN"};
    static const char *const dts[NPROD] = {"bf16->bf16", "bf16->f32", "bf16->f32 b1", "bf16->f32", "bf16->f32 b1",
                                           "bf16->f32"};
    printf("%-8s %-2s %-16s %-13s | %-36s | %-36s\n", "", "", "", "", "m1c_cuda_gemm_ex (cuBLASLt, cached)",
           "cublasGemmStridedBatchedEx (before)");
    printf("%-8s %-2s %-16s %-13s | %10s %10s %14s | %10s %10s %14s\n", "product", "op", "M x N x K", "dtypes",
           "ms/layer", "TFLOP/s", "host us/call", "ms/layer", "TFLOP/s", "host us/call");
    double tot_lt = 0, tot_cb = 0;
    for (int p = 0; p < NPROD; p++) {
        char shape[48];
        snprintf(shape, sizeof shape, shape_fmt[p], dims[p][0], dims[p][1]);
        const double flop = 2.0 * R * dims[p][0] * dims[p][1]; /* per layer: the experts' rows sum to R */
        printf("%-8s %-2s %-16s %-13s |", prod_name[p], ops[p], shape, dts[p]);
        if (do_lt)
            printf(" %10.3f %10.1f %14.1f |", lt.ms[p], flop / (lt.ms[p] * 1e-3) / 1e12, lt.host_us[p]), tot_lt += lt.ms[p];
        else
            printf(" %10s %10s %14s |", "-", "-", "-");
        if (do_cublas)
            printf(" %10.3f %10.1f %14.1f\n", cb.ms[p], flop / (cb.ms[p] * 1e-3) / 1e12, cb.host_us[p]), tot_cb += cb.ms[p];
        else
            printf(" %10s %10s %14s\n", "-", "-", "-");
    }
    const double flop_layer = 2.0 * R * ((double)2 * F * H * 3 + (double)H * F * 3);
    printf("%-8s %-2s %-16s %-13s |", "all six", "", "", "");
    if (do_lt) printf(" %10.3f %10.1f %14s |", tot_lt, flop_layer / (tot_lt * 1e-3) / 1e12, "");
    else printf(" %10s %10s %14s |", "-", "-", "");
    if (do_cublas) printf(" %10.3f %10.1f\n", tot_cb, flop_layer / (tot_cb * 1e-3) / 1e12);
    else printf(" %10s\n", "-");
    printf("%-43s |", "per step (all layers), ms");
    if (do_lt) printf(" %10.2f %10s %14s |", tot_lt * layers, "", "");
    else printf(" %10s %10s %14s |", "-", "", "");
    if (do_cublas) printf(" %10.2f\n", tot_cb * layers);
    else printf(" %10s\n", "-");
    if (do_lt)
        printf("m1c_cuda_gemm_ex over the timed and warm-up steps: %lld calls, %lld heuristic queries (%lld retries "
               "of a refused cached algorithm), %lld handed to cuBLAS\n",
               s1.calls - s0.calls, s1.heuristics - s0.heuristics, s1.retries - s0.retries,
               s1.fallbacks - s0.fallbacks);

    /* Both paths must compute the same product: `down` (bf16 -> f32) for one draw of counts, into Y by
     * the Lt path and into drow by cuBLAS. */
    {
        uint64_t rng = 7;
        int off[65];
        draw_counts(&rng, R, E, off);
        for (int e = 0; e < E; e++) {
            call c = expert_call(1, &b, e, off[e], off[e + 1] - off[e], H, F);
            run_call(0, h, &c);
            c.C = b.drow + (int64_t)off[e] * H;
            run_call(1, h, &c);
        }
        CK(cudaDeviceSynchronize());
        float *y = (float *)malloc((size_t)RH * 4), *z = (float *)malloc((size_t)RH * 4);
        if (!y || !z) {
            fprintf(stderr, "m1c_bench_gemm: out of memory\n");
            return 1;
        }
        CK(cudaMemcpy(y, b.Y, (size_t)RH * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(z, b.drow, (size_t)RH * 4, cudaMemcpyDeviceToHost));
        double dmax = 0, vmax = 0;
        for (int64_t i = 0; i < RH; i++) {
            const double d = fabs((double)y[i] - z[i]);
            dmax = d > dmax || d != d ? d : dmax;
            vmax = fabs((double)z[i]) > vmax ? fabs((double)z[i]) : vmax;
        }
        /* Both accumulate K = F bf16 products in f32, in different orders: ~1e-6 of the largest value. */
        const int ok = dmax <= 1e-4 * vmax;
        printf("check: down through both paths, max |diff| %.3g, max |value| %.3g: %s\n", dmax, vmax,
               ok ? "ok" : "MISMATCH");
        free(y), free(z);
        if (!ok) return 1;
    }
    cublasDestroy(h);
    bf *lp[] = {b.xs, b.Wgu, b.gu, b.act, b.Wd, b.dy, b.dgu};
    float *fp[] = {b.Y, b.dWd, b.dact, b.dWgu, b.drow};
    for (int i = 0; i < 7; i++) CK(cudaFree(lp[i]));
    for (int i = 0; i < 5; i++) CK(cudaFree(fp[i]));
    return 0;
}
