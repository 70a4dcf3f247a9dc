/* The MoE's per-expert GEMMs as the topk plugin runs them (expert_gemm = "cublas", the default, BF16), in
 * one table: the products one m1c_cuda_gemm_ex call after another (cuBLASLt with the per-thread algorithm
 * cache) beside the same calls handed over at once to m1c_cuda_gemm_group, one group per product (the
 * experts' products run concurrently on the core's streams); then the total of topk's own calls, whose
 * backward puts two independent products in each group. ms per product per layer (all experts, event
 * time, so host-bound gaps count), TFLOP/s and host microseconds per expert.
 *
 * The products at the GPU reference shape: `rows` routed rows over E experts with uneven counts drawn
 * anew for every layer of every step, H, F; outputs in bf16 but for the weight gradients:
 *   gate_up NT [ne x 2F x H]   down NT [ne x H x F]   dWd TN f32 beta 1 [H x F x ne]
 *   dact NN [ne x F x H]       dWgu TN f32 beta 1 [2F x H x ne]   drows NN [ne x H x 2F]
 *
 *   m1c_bench_gemm [--rows 32768] [--experts 8] [--hidden 768] [--ffn 1024] [--layers 8] [--steps 10]
 *                  [--path all|one|group|topk]
 */
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
    bf *xs, *Wgu, *gu, *act, *Wd, *dy, *dgu, *Y, *dact, *drow; /* (R, H) (E, 2F, H) (R, 2F) (R, F) (E, H, F) (R, H)
                                                                 * (R, 2F) (R, H) (R, F) (R, H) */
    float *dWd, *dWgu;                                         /* (E, H, F) (E, 2F, H) */
} bufs;

static const char *const prod_name[NPROD] = {"gate_up", "down", "dWd", "dact", "dWgu", "drows"};

static m1c_gemm_desc desc(int ta, int tb, int M, int N, int K, const bf *A, int lda, const bf *B, int ldb, float beta,
                          void *C, int ct, int ldc) {
    const m1c_gemm_desc d = {ta, tb, M, N, K, 1.0f, beta, A, B, C, BF16, BF16, ct, lda, ldb, ldc, 1, 0, 0, 0, {0, 0}};
    return d;
}

/* Product p for expert e, whose ne rows start at row o (the plugin's calls). */
static m1c_gemm_desc expert_call(int p, const bufs *b, int e, int o, int ne, int H, int F) {
    const int64_t oo = o, ee = e, F2 = 2 * F;
    switch (p) {
    case 0: /* GU_e = X_e Wgu_e^T */
        return desc(0, 1, ne, 2 * F, H, b->xs + oo * H, H, b->Wgu + ee * F2 * H, H, 0.0f, b->gu + oo * F2, BF16, 2 * F);
    case 1: /* Y_e = act_e Wd_e^T */
        return desc(0, 1, ne, H, F, b->act + oo * F, F, b->Wd + ee * H * F, F, 0.0f, b->Y + oo * H, BF16, H);
    case 2: /* dWd_e += dY_e^T act_e */
        return desc(1, 0, H, F, ne, b->dy + oo * H, H, b->act + oo * F, F, 1.0f, b->dWd + ee * H * F, F32, F);
    case 3: /* d act_e = dY_e Wd_e */
        return desc(0, 0, ne, F, H, b->dy + oo * H, H, b->Wd + ee * H * F, F, 0.0f, b->dact + oo * F, BF16, F);
    case 4: /* dWgu_e += dGU_e^T X_e */
        return desc(1, 0, 2 * F, H, ne, b->dgu + oo * F2, 2 * F, b->xs + oo * H, H, 1.0f, b->dWgu + ee * F2 * H, F32,
                    H);
    default: /* d rows_e = dGU_e Wgu_e */
        return desc(0, 0, ne, H, 2 * F, b->dgu + oo * F2, 2 * F, b->Wgu + ee * F2 * H, H, 0.0f, b->drow + oo * H,
                    BF16, H);
    }
}

/* The E products of p (and of p2 >= 0 with them): path 0 one gemm_ex after another, otherwise one
 * gemm_group. */
static void run_product(int path, int p, int p2, const bufs *b, const int *off, int E, int H, int F) {
    m1c_gemm_desc g[128];
    int n = 0;
    for (int q = p; q >= 0; q = q == p ? p2 : -1)
        for (int e = 0; e < E; e++)
            if (off[e + 1] > off[e]) g[n++] = expert_call(q, b, e, off[e], off[e + 1] - off[e], H, F);
    if (path > 0) {
        m1c_cuda_gemm_group(NULL, g, n);
        return;
    }
    for (int i = 0; i < n; i++)
        m1c_cuda_gemm_ex(NULL, g[i].trans_a, g[i].trans_b, g[i].M, g[i].N, g[i].K, 1.0f, g[i].A, BF16, g[i].lda, 0,
                         g[i].B, BF16, g[i].ldb, 0, g[i].beta, g[i].C, g[i].c_dtype, g[i].ldc, 0, 1);
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
static result run_path(int path, const bufs *b, int R, int E, int H, int F, int layers, int steps, uint64_t seed) {
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
                /* path 2 (topk's calls): dWd with d act and dWgu with the d x rows, one group each */
                if (path < 2 || p < 2 || p % 2 == 0) run_product(path, p, path == 2 && p >= 2 ? p + 1 : -1, b, off, E, H, F);
                host[p] = now_s() - t0;
                CK(cudaEventRecord(ev[p + 1]));
            }
            CK(cudaEventSynchronize(ev[NPROD]));
            CK(cudaGetLastError());
            char err[256];
            if (m1c_cuda_take_error(err, sizeof err)) {
                fprintf(stderr, "m1c_bench_gemm: %s\n", err);
                exit(1);
            }
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

/* The products' outputs (bf16 ones as raw bits), for comparing the two paths. */
static void outputs(const bufs *b, int64_t R, int64_t E, int64_t H, int64_t F, unsigned char *dst) {
    const struct {
        const void *p;
        size_t n;
    } o[] = {{b->gu, (size_t)(R * 2 * F * 2)}, {b->Y, (size_t)(R * H * 2)}, {b->dWd, (size_t)(E * H * F * 4)},
             {b->dact, (size_t)(R * F * 2)}, {b->dWgu, (size_t)(E * 2 * F * H * 4)}, {b->drow, (size_t)(R * H * 2)}};
    for (int i = 0; i < NPROD; i++) {
        CK(cudaMemcpy(dst, o[i].p, o[i].n, cudaMemcpyDeviceToHost));
        dst += o[i].n;
    }
}

int main(int argc, char **argv) {
    int R = 32768, E = 8, H = 768, F = 1024, layers = 8, steps = 10, path = 0;
    static const char *const paths[] = {"all", "one", "group", "topk", NULL};
    const bench_flag flags[] = {bf_int("--rows", &R, 1, 1 << 24),        bf_int("--experts", &E, 1, 64),
                                bf_int("--hidden", &H, 1, 1 << 16),      bf_int("--ffn", &F, 1, 1 << 16),
                                bf_int("--layers", &layers, 1, 1000),    bf_int("--steps", &steps, 1, 100000),
                                bf_choice("--path", &path, paths)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0],
                    "usage: m1c_bench_gemm [--rows N] [--experts 1..64] [--hidden N] [--ffn N] [--layers N] "
                    "[--steps N] [--path all|one|group|topk]   (rows >= 3 x experts)", NULL, NULL, 0))
        return 1;
    const int do_path[3] = {path == 0 || path == 1, path == 0 || path == 2, path == 0 || path == 3};
    if (R < 3 * E) {
        fprintf(stderr, "m1c_bench_gemm: need rows >= 3 x experts\n");
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
    b.dgu = alloc_fill<bf>(2 * RF, 7, 1.0f), b.Y = alloc_fill<bf>(RH, 8, 1.0f), b.dact = alloc_fill<bf>(RF, 10, 1.0f);
    b.drow = alloc_fill<bf>(RH, 12, 1.0f);
    b.dWd = alloc_fill<float>(W, 9, 0.0f), b.dWgu = alloc_fill<float>(2 * W, 11, 0.0f);
    CK(cudaDeviceSynchronize());

    printf("m1c_bench_gemm: %s; MoE expert products, %d rows over %d experts (new uneven counts every layer), "
           "H %d, F %d; %d layers x %d steps (+%d warm-up)\n",
           prop.name, R, E, H, F, layers, steps, WARMUP);
    /* The same counts for both paths (seed 1), one at a time first; the cache's entries are shared. */
    result r[3];
    m1c_cuda_gemm_stats s0 = {0, 0, 0, 0}, s1 = {0, 0, 0, 0};
    run_path(0, &b, R, E, H, F, 1, 1, 99); /* the first call's handle and workspace */
    run_path(1, &b, R, E, H, F, 1, 1, 99); /* the group's streams */
    m1c_cuda_gemm_ex_stats(&s0);
    for (int q = 0; q < 3; q++)
        if (do_path[q]) r[q] = run_path(q, &b, R, E, H, F, layers, steps, 1);
    m1c_cuda_gemm_ex_stats(&s1);

    static const char *const shape_fmt[NPROD] = {"ne x %d x %d", "ne x %d x %d", "%d x %d x ne",
                                                 "ne x %d x %d", "%d x %d x ne", "ne x %d x %d"};
    const int dims[NPROD][2] = {{2 * F, H}, {H, F}, {H, F}, {F, H}, {2 * F, H}, {H, 2 * F}};
    static const char *const ops[NPROD] = {"NT", "NT", "TN", "NN", "TN", "NN"};
    static const char *const dts[NPROD] = {"bf16", "bf16", "f32 b1", "bf16", "f32 b1", "bf16"};
    printf("%-8s %-2s %-16s %-7s | %-36s | %-36s\n", "", "", "", "", "one gemm_ex after another",
           "gemm_group (concurrent)");
    printf("%-8s %-2s %-16s %-7s | %10s %10s %14s | %10s %10s %14s\n", "product", "op", "M x N x K", "C",
           "ms/layer", "TFLOP/s", "host us/call", "ms/layer", "TFLOP/s", "host us/call");
    double tot[2] = {0, 0};
    for (int p = 0; p < NPROD; p++) {
        char shape[48];
        snprintf(shape, sizeof shape, shape_fmt[p], dims[p][0], dims[p][1]);
        const double flop = 2.0 * R * dims[p][0] * dims[p][1]; /* per layer: the experts' rows sum to R */
        printf("%-8s %-2s %-16s %-7s", prod_name[p], ops[p], shape, dts[p]);
        for (int q = 0; q < 2; q++) {
            if (do_path[q])
                printf(" | %10.3f %10.1f %14.1f", r[q].ms[p], flop / (r[q].ms[p] * 1e-3) / 1e12, r[q].host_us[p]),
                    tot[q] += r[q].ms[p];
            else
                printf(" | %10s %10s %14s", "-", "-", "-");
        }
        printf("\n");
    }
    const double flop_layer = 2.0 * R * ((double)2 * F * H * 3 + (double)H * F * 3);
    printf("%-36s", "all six");
    for (int q = 0; q < 2; q++)
        if (do_path[q]) printf(" | %10.3f %10.1f %14s", tot[q], flop_layer / (tot[q] * 1e-3) / 1e12, "");
        else printf(" | %10s %10s %14s", "-", "-", "");
    printf("\n%-36s", "per step (all layers), ms");
    for (int q = 0; q < 2; q++)
        if (do_path[q]) printf(" | %10.2f %10s %14s", tot[q] * layers, "", "");
        else printf(" | %10s %10s %14s", "-", "", "");
    if (do_path[2]) {
        double t = 0;
        for (int p = 0; p < NPROD; p++) t += r[2].ms[p];
        printf("\ntopk's calls (gate_up | down | dWd + dact | dWgu + drows, one gemm_group each): %.3f ms per layer, "
               "%.1f TFLOP/s, %.2f ms per step", t, flop_layer / (t * 1e-3) / 1e12, t * layers);
    }
    printf("\nm1c_cuda_gemm_ex over the timed steps: %lld calls, %lld heuristic queries (%lld retries of a refused "
           "cached algorithm), %lld handed to cuBLAS\n",
           s1.calls - s0.calls, s1.heuristics - s0.heuristics, s1.retries - s0.retries, s1.fallbacks - s0.fallbacks);

    /* Both paths must compute the same products: one draw of counts through each, from the same starting
     * weight gradients. A group chooses each product's algorithm for half the GPU, so it may sum in
     * another order than gemm_ex (f32 rounding: 1e-5 of the largest output for f32, one bf16 rounding for
     * bf16 outputs); run twice it must give the same bits. */
    int rc = 0;
    if (do_path[0] && do_path[1]) { /* one call at a time, then one group per product twice */
        const size_t n = (size_t)(RF * 4 + RH * 4 + RF * 2) + (size_t)W * 12;
        unsigned char *out[3] = {(unsigned char *)malloc(n), (unsigned char *)malloc(n), (unsigned char *)malloc(n)};
        float *w0 = (float *)malloc((size_t)W * 12);
        if (!out[0] || !out[1] || !out[2] || !w0) {
            fprintf(stderr, "m1c_bench_gemm: out of memory\n");
            return 1;
        }
        CK(cudaMemcpy(w0, b.dWd, (size_t)W * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(w0 + W, b.dWgu, (size_t)W * 8, cudaMemcpyDeviceToHost));
        uint64_t rng = 7;
        int off[65];
        draw_counts(&rng, R, E, off);
        for (int v = 0; v < 3; v++) {
            CK(cudaMemcpy(b.dWd, w0, (size_t)W * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(b.dWgu, w0 + W, (size_t)W * 8, cudaMemcpyHostToDevice));
            for (int p = 0; p < NPROD; p++) run_product(v ? 1 : 0, p, -1, &b, off, E, H, F);
            CK(cudaDeviceSynchronize());
            outputs(&b, R, E, H, F, out[v]);
        }
        const int again = memcmp(out[1], out[2], n) != 0;
        /* per product, in outputs()'s order: max |group - gemm_ex| / max |gemm_ex| */
        const int64_t len[] = {R * 2 * F, R * H, E * H * F, R * F, E * 2 * F * H, R * H};
        const int f32[] = {0, 0, 1, 0, 1, 0};
        double worst = 0;
        size_t at = 0;
        for (int p = 0; p < NPROD; p++) {
            double diff = 0, big = 0;
            for (int64_t i = 0; i < len[p]; i++) {
                double x, y;
                if (f32[p]) {
                    float a, c;
                    memcpy(&a, out[1] + at + 4 * i, 4), memcpy(&c, out[0] + at + 4 * i, 4);
                    x = a, y = c;
                } else {
                    uint16_t a, c;
                    memcpy(&a, out[1] + at + 2 * i, 2), memcpy(&c, out[0] + at + 2 * i, 2);
                    uint32_t ua = (uint32_t)a << 16, uc = (uint32_t)c << 16;
                    float fa, fc;
                    memcpy(&fa, &ua, 4), memcpy(&fc, &uc, 4);
                    x = fa, y = fc;
                }
                diff = fmax(diff, fabs(x - y)), big = fmax(big, fabs(y));
            }
            const double rel = big > 0 ? diff / big : diff, tol = f32[p] ? 1e-5 : 1.0 / 128;
            if (rel > tol) rc = 1;
            worst = fmax(worst, rel / tol);
            at += (size_t)len[p] * (f32[p] ? 4 : 2);
        }
        rc |= again;
        printf("check: the six products through both paths: %s (largest difference %.2f of its tolerance); the "
               "group run twice: %s\n",
               rc && !again ? "DIFFER" : "within f32 summation order", worst, again ? "DIFFERENT bits" : "the same bits");
        free(out[0]), free(out[1]), free(out[2]), free(w0);
    }
    bf *lp[] = {b.xs, b.Wgu, b.gu, b.act, b.Wd, b.dy, b.dgu, b.Y, b.dact, b.drow};
    for (int i = 0; i < 10; i++) CK(cudaFree(lp[i]));
    CK(cudaFree(b.dWd));
    CK(cudaFree(b.dWgu));
    return rc;
}
