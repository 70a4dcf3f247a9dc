/* The lightning-attention core alone (lightning_core.cuh, the kernels the plugin runs in bf16): forward
 * plus backward at a fixed number of tokens per batch over sequence lengths, and forward alone at long
 * lengths, in tokens per second, as one table. Inputs are SiLU of normal values in bf16, head-major
 * [batch * heads][T][head_dim]; as in the plugin, O is written in bf16 and dQ, dK, dV in f32. Backward is
 * dQ, dK and dV (three core passes, see lightning_core.cuh), given dO.
 *
 *   m1c_bench_lightning [--heads 16] [--head-dim 128] [--tokens 65536] [--T 2048,8192,32768,65536]
 *                       [--fwd-T 262144,1048576] [--iters 10] [--slots N] [--kernel auto|mma|wgmma]
 *
 * --slots overrides the resident output-pass CTAs the planner assumes (lc_slots, from the device): a
 * small value (e.g. 1) forces one segment per sequence, to compare the segmented plan with the plain one.
 * --kernel picks the output pass (lc_problem.kernel; auto: wgmma on sm_90 where built for sm_90a).
 * M1C_BENCH_BREAKDOWN=1 adds the segmented forwards' passes one by one (state, scan, output).
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/attention/lightning/lightning_core.cuh"

#define BENCH_NAME "m1c_bench_lightning"
#include "bench_cuda.cuh"

/* SiLU of normal values, so inputs look like the layer's. */
__global__ static void k_fill(__nv_bfloat16 *p, int64_t n, uint64_t seed) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float z = bench_normal(i, seed);
        p[i] = __float2bfloat16(z / (1.0f + expf(-z)));
    }
}

typedef struct bufs {
    __nv_bfloat16 *q, *k, *v, *dO;
    float *o, *dq, *dk, *dv, *ws, *slope;
    int64_t ws_floats;
    int kernel; /* the output pass's (lc_problem.kernel) */
} bufs;

/* Median over iters of the time (ms) of the forward (bwd = 0) or forward + backward (bwd = 1). */
static float time_core(const bufs *b, int BH, int nh, int T, int hd, int slots, int bwd, int iters) {
    lc_problem p;
    memset(&p, 0, sizeof p);
    p.out_f32 = 1, p.sbh = (int64_t)T * hd, p.BH = BH, p.nh = nh, p.T = T, p.hd = hd, p.slope = b->slope;
    p.ws = b->ws, p.ws_floats = b->ws_floats, p.slots = slots, p.kernel = b->kernel;
    return bench_median_ms(iters, [&] {
        p.x = b->q, p.y = b->k, p.z = b->v, p.out = b->o, p.out_f32 = 0, p.reverse = 0;
        CK(lc_run(&p, 0));
        p.out_f32 = 1;
        if (bwd) {
            p.x = b->dO, p.y = b->v, p.z = b->k, p.out = b->dq, p.reverse = 0;
            CK(lc_run(&p, 0));
            p.x = b->v, p.y = b->dO, p.z = b->q, p.out = b->dk, p.reverse = 1;
            CK(lc_run(&p, 0));
            p.x = b->k, p.y = b->q, p.z = b->dO, p.out = b->dv, p.reverse = 1;
            CK(lc_run(&p, 0));
        }
    });
}

/* The passes of one segmented forward, timed one by one (ms, median): state-only, scan, output. */
static void breakdown(const bufs *b, int BH, int nh, int T, int hd, int slots, int iters) {
    lc_problem p;
    memset(&p, 0, sizeof p);
    p.x = b->q, p.y = b->k, p.z = b->v, p.out = b->o, p.out_f32 = 0, p.sbh = (int64_t)T * hd, p.BH = BH, p.nh = nh;
    p.T = T, p.hd = hd, p.slope = b->slope, p.ws = b->ws, p.ws_floats = b->ws_floats, p.slots = slots;
    p.kernel = b->kernel != LC_AUTO ? b->kernel : wg_available() ? LC_WGMMA : LC_MMA; /* lc_launch takes no LC_AUTO */
    const lc_plan pl = lc_plan_for(BH, T, hd, p.slots);
    if (pl.nseg < 2 || hd != 128) return;
    cudaEvent_t ev[4];
    for (int i = 0; i < 4; i++) CK(cudaEventCreate(&ev[i]));
    float t[3][64];
    const int n = iters < 64 ? iters : 64;
    for (int it = 0; it < n; it++) {
        const int starts = (pl.nseg - 1) * pl.kf + 1;
        lc_pass st = {nullptr, 0, 0, b->ws, pl.nfine, pl.fine_rows, starts - 1};
        CK(cudaEventRecord(ev[0]));
        CK((lc_launch<128, LC_STATE>(&p, 0, st)));
        CK(cudaEventRecord(ev[1]));
        const int64_t ne = (int64_t)BH * hd * hd;
        lc_scan<<<(int)((ne + 255) / 256), 256>>>(b->ws, nullptr, starts, pl.nfine, pl.fine_rows, nh, hd, b->slope, ne);
        CK(cudaEventRecord(ev[2]));
        lc_pass ps = {b->ws, pl.nfine, pl.kf, nullptr, 0, pl.seg_rows, pl.nseg};
        CK((lc_launch<128, LC_OUT>(&p, 0, ps)));
        CK(cudaEventRecord(ev[3]));
        CK(cudaEventSynchronize(ev[3]));
        for (int k = 0; k < 3; k++) CK(cudaEventElapsedTime(&t[k][it], ev[k], ev[k + 1]));
    }
    for (int k = 0; k < 3; k++) qsort(t[k], (size_t)n, sizeof(float), cmp_float);
    printf("  T %d: %d segments of %d rows, state pass over %d of %d rows: state %.3f ms, scan %.3f ms, output %.3f ms\n",
           T, pl.nseg, pl.seg_rows, pl.nfine, pl.fine_rows, t[0][n / 2], t[1][n / 2], t[2][n / 2]);
    for (int i = 0; i < 4; i++) CK(cudaEventDestroy(ev[i]));
}

/* One row of the table: B sequences of T, forward + backward (bwd) or forward, timed and printed. */
static void row(const bufs *b, int B, int nh, int T, int hd, int slots, int bwd, int iters) {
    const float ms = time_core(b, B * nh, nh, T, hd, slots, bwd, iters);
    printf("%-10s %8d %6d %6d %12.3f %14.2f\n", bwd ? "fwd+bwd" : "fwd", T, B, lc_segments(B * nh, T, hd, slots), ms,
           (double)B * T / (ms * 1e-3) / 1e6);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int nh = 16, hd = 128, iters = 10, slots_arg = 0, choice = 0;
    int64_t tokens = 65536;
    int Ts[16] = {2048, 8192, 32768, 65536}, nT = 4, Fs[16] = {262144, 1048576}, nF = 2;
    static const char *const kernels[] = {"auto", "mma", "wgmma", NULL};
    const bench_flag flags[] = {bf_int("--heads", &nh, 1, 65535),         bf_int("--head-dim", &hd, 1, 1024),
                                bf_i64("--tokens", &tokens, 1, 1LL << 40), bf_int("--iters", &iters, 1, 100000),
                                bf_int("--slots", &slots_arg, 0, 1 << 20), bf_choice("--kernel", &choice, kernels),
                                bf_list("--T", Ts, &nT, 16),               bf_list("--fwd-T", Fs, &nF, 16)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0],
                    "usage: m1c_bench_lightning [--heads N] [--head-dim 64|128] [--tokens N] [--T a,b,..] "
                    "[--fwd-T a,b,..] [--iters N] [--slots N] [--kernel auto|mma|wgmma]", NULL, NULL, 0))
        return 1;
    const int kernel = choice == 1 ? LC_MMA : choice == 2 ? LC_WGMMA : LC_AUTO;
    if (!lc_supported(hd)) {
        fprintf(stderr, "m1c_bench_lightning: head-dim %d: 64 or 128\n", hd);
        return 1;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        fprintf(stderr, "m1c_bench_lightning: no CUDA device\n");
        return 1;
    }
    if (kernel == LC_WGMMA && !wg_available()) {
        fprintf(stderr, "m1c_bench_lightning: --kernel wgmma needs a build for sm_90a and a GPU of compute capability 9.0\n");
        return 1;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    /* buffers sized for the largest case */
    int64_t rows = tokens;
    for (int i = 0; i < nF; i++) rows = Fs[i] > rows ? Fs[i] : rows;
    const int dev_slots = lc_slots(hd); /* the output pass's resident CTAs; also sets the kernels up */
    const int slots = slots_arg > 0 ? slots_arg : dev_slots;
    int64_t ws = 1;
    for (int i = 0; i < nT; i++) {
        const int B = (int)(tokens / Ts[i] > 0 ? tokens / Ts[i] : 1);
        const int64_t w = lc_workspace_floats(B * nh, Ts[i], hd, slots);
        ws = w > ws ? w : ws;
    }
    for (int i = 0; i < nF; i++) {
        const int64_t w = lc_workspace_floats(nh, Fs[i], hd, slots);
        ws = w > ws ? w : ws;
    }
    const int64_t n = rows * nh * hd, nfwd = rows * nh * hd;
    bufs b;
    CK(cudaMalloc((void **)&b.q, (size_t)n * 2));
    CK(cudaMalloc((void **)&b.k, (size_t)n * 2));
    CK(cudaMalloc((void **)&b.v, (size_t)n * 2));
    CK(cudaMalloc((void **)&b.dO, (size_t)tokens * nh * hd * 2));
    CK(cudaMalloc((void **)&b.o, (size_t)nfwd * 4));
    CK(cudaMalloc((void **)&b.dq, (size_t)tokens * nh * hd * 4));
    CK(cudaMalloc((void **)&b.dk, (size_t)tokens * nh * hd * 4));
    CK(cudaMalloc((void **)&b.dv, (size_t)tokens * nh * hd * 4));
    CK(cudaMalloc((void **)&b.ws, (size_t)ws * 4));
    b.ws_floats = ws, b.kernel = kernel;
    CK(cudaMalloc((void **)&b.slope, (size_t)nh * 4));
    float *sl = (float *)malloc((size_t)nh * 4);
    for (int h = 0; h < nh; h++) sl[h] = (float)exp2(-8.0 * (h + 1) / nh); /* MiniMax's slopes, first layer */
    CK(cudaMemcpy(b.slope, sl, (size_t)nh * 4, cudaMemcpyHostToDevice));
    free(sl);
    k_fill<<<1024, 256>>>(b.q, n, 1), k_fill<<<1024, 256>>>(b.k, n, 2), k_fill<<<1024, 256>>>(b.v, n, 3);
    k_fill<<<1024, 256>>>(b.dO, tokens * nh * hd, 4);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());

    printf("lightning core, %s (%d SMs), bf16 in, O bf16, dQ dK dV f32, %d heads x %d, median of %d\n", prop.name,
           prop.multiProcessorCount, nh, hd, iters);
    printf("%-10s %8s %6s %6s %12s %14s\n", "pass", "T", "batch", "segs", "ms", "M tokens/s");
    for (int bwd = 1; bwd >= 0; bwd--) /* forward + backward, then forward alone, at tokens per batch */
        for (int i = 0; i < nT; i++)
            row(&b, (int)(tokens / Ts[i] > 0 ? tokens / Ts[i] : 1), nh, Ts[i], hd, slots, bwd, iters);
    for (int i = 0; i < nF; i++) row(&b, 1, nh, Fs[i], hd, slots, 0, iters); /* forward of one long sequence */
    if (getenv("M1C_BENCH_BREAKDOWN")) {
        for (int i = 0; i < nT; i++)
            breakdown(&b, (int)(tokens / Ts[i] > 0 ? tokens / Ts[i] : 1) * nh, nh, Ts[i], hd, slots, iters);
        for (int i = 0; i < nF; i++) breakdown(&b, nh, nh, Fs[i], hd, slots, iters);
    }
    cudaFree(b.q), cudaFree(b.k), cudaFree(b.v), cudaFree(b.dO), cudaFree(b.o), cudaFree(b.dq), cudaFree(b.dk);
    cudaFree(b.dv), cudaFree(b.ws), cudaFree(b.slope);
    return 0;
}
