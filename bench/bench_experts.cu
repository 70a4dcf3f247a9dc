/* The MoE's expert products in topk's Hopper kernels (plugins/moe/topk/expert_wg.cuh, expert_gemm = "auto"
 * on an sm_90a device), one table: per launch the median time over the repetitions and its TFLOP/s,
 * beside cuBLAS running the same expert products one after another (cublasGemmEx, bf16 operands, f32
 * accumulation; m1c_bench_gemm has the core's concurrent per-expert path, topk's "cublas"). The forward's
 * two products; the backward's two launches, each a row product and a weight gradient (f32, added into),
 * whose times include the host's encoding of a tensor map per expert and operand before each launch, as
 * in topk.
 *
 *   m1c_bench_experts [--rows 32768] [--experts 8] [--hidden 768] [--ffn 1024] [--reps 20] [--uneven]
 *
 * Rows split evenly over the experts, or (--uneven) with expert e's share proportional to 1 + e % 3. */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/moe/topk/expert_wg.cuh"

#define BENCH_NAME "m1c_bench_experts"
#include "bench_cuda.cuh"

typedef __nv_bfloat16 bf;

__global__ static void k_fill(bf *p, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16_rn(scale * bench_normal(i, seed));
}
static bf *alloc_fill(int64_t n, uint64_t seed, float scale) {
    bf *p = NULL;
    CK(cudaMalloc((void **)&p, (size_t)n * sizeof(bf)));
    k_fill<<<1024, 256>>>(p, n, seed, scale);
    CK(cudaGetLastError());
    return p;
}

int main(int argc, char **argv) {
    int R = 32768, E = 8, H = 768, F = 1024, reps = 20, uneven = 0;
    const char *usage = "usage: m1c_bench_experts [--rows N] [--experts 1..32] [--hidden N] [--ffn N] [--reps N] "
                        "[--uneven]   (rows >= experts; hidden and ffn multiples of 8)";
    const bench_flag flags[] = {bf_int("--rows", &R, 1, 1 << 24),      bf_int("--experts", &E, 1, XW_MAX_E),
                                bf_int("--hidden", &H, 8, 1 << 16),    bf_int("--ffn", &F, 8, 1 << 16),
                                bf_int("--reps", &reps, 1, 100000), bf_switch("--uneven", &uneven)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0], usage, NULL, NULL, 0)) return 1;
    if (R < E || H % 8 || F % 8) {
        fprintf(stderr, "m1c_bench_experts: need rows >= experts and hidden, ffn multiples of 8\n%s\n", usage);
        return 1;
    }
    tma_encode_fn enc = wg_available() ? tma_encoder() : NULL;
    int grid = 0;
    if (!enc || xw_setup(&grid) != cudaSuccess) {
        fprintf(stderr, "m1c_bench_experts: needs an sm_90a build on a compute capability 9.0 device\n");
        return 1;
    }
    int off[65], wsum = 0;
    for (int e = 0; e < E; e++) wsum += uneven ? 1 + e % 3 : 1;
    off[0] = 0;
    for (int e = 0, acc = 0; e < E; e++) acc += uneven ? 1 + e % 3 : 1, off[e + 1] = (int)((int64_t)R * acc / wsum);
    int32_t *doff = NULL;
    CK(cudaMalloc((void **)&doff, sizeof(off)));
    CK(cudaMemcpy(doff, off, sizeof(off), cudaMemcpyHostToDevice));

    const int64_t F2 = 2 * (int64_t)F;
    bf *xs = alloc_fill((int64_t)R * H, 1, 1.0f), *Wgu = alloc_fill(E * F2 * H, 2, 0.03f);
    bf *Wd = alloc_fill((int64_t)E * H * F, 3, 0.03f), *gu = alloc_fill(R * F2, 4, 0.0f);
    bf *act = alloc_fill((int64_t)R * F, 5, 1.0f), *Y = alloc_fill((int64_t)R * H, 6, 0.0f);
    bf *dy = alloc_fill((int64_t)R * H, 7, 1.0f), *dact = alloc_fill((int64_t)R * F, 8, 0.0f);
    bf *dgu = alloc_fill(R * F2, 9, 1.0f), *dx = alloc_fill((int64_t)R * H, 10, 0.0f);
    float *dWd = NULL, *dWgu = NULL;
    int *ctr = NULL;
    CK(cudaMalloc((void **)&dWd, (size_t)E * H * F * sizeof(float)));
    CK(cudaMalloc((void **)&dWgu, (size_t)E * F2 * H * sizeof(float)));
    CK(cudaMalloc((void **)&ctr, 2 * sizeof(int)));
    CK(cudaMemset(dWd, 0, (size_t)E * H * F * sizeof(float)));
    CK(cudaMemset(dWgu, 0, (size_t)E * F2 * H * sizeof(float)));
    CK(cudaMemset(ctr, 0, 2 * sizeof(int)));
    CK(cudaDeviceSynchronize());
    cublasHandle_t cb;
    if (cublasCreate(&cb) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c_bench_experts: cublasCreate failed\n");
        return 1;
    }
    /* cuBLAS, column-major. Row-major C (ne x N) = A (ne x K) op(W_e) is C^T = op(W_e)^T A^T (nt: W_e is N x
     * K); G_e (M x Ng) += A_e^T B_e is G_e^T = B_e^T A_e. */
    auto cublas_rows = [&](int nt, const bf *A, int K, const bf *W, bf *C, int N) {
        const float one = 1.0f, zero = 0.0f;
        for (int e = 0; e < E; e++) {
            const int ne = off[e + 1] - off[e];
            if (ne)
                cublasGemmEx(cb, nt ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, ne, K, &one, W + (int64_t)e * N * K,
                             CUDA_R_16BF, nt ? K : N, A + (int64_t)off[e] * K, CUDA_R_16BF, K, &zero,
                             C + (int64_t)off[e] * N, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        }
    };
    auto cublas_grads = [&](const bf *A, int M, const bf *B, int Ng, float *G) {
        const float one = 1.0f;
        for (int e = 0; e < E; e++) {
            const int ne = off[e + 1] - off[e];
            if (ne)
                cublasGemmEx(cb, CUBLAS_OP_N, CUBLAS_OP_T, Ng, M, ne, &one, B + (int64_t)off[e] * Ng, CUDA_R_16BF, Ng,
                             A + (int64_t)off[e] * M, CUDA_R_16BF, M, &one, G + (int64_t)e * M * Ng, CUDA_R_32F, Ng,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        }
    };
    int fail = 0;
    auto fwd = [&](bf *C, int N, const bf *A, const bf *W, int K, bf *glu_act = NULL) {
        const xw_rows r = {C, doff, N, E, N, 0};
        fail |= xw_forward(enc, grid, 0, r, A, K, R, W, K, glu_act, N / 2);
    };
    auto swiglu_pass = [&] { moe_swiglu_fwd_kernel<bf><<<moe_swiglu_blocks<bf>(R, F), MOE_THREADS>>>(act, gu, R, F); };
    auto bwd = [&](bf *C, int N, const bf *A, int K, const bf *W, float *G, const bf *Ag, int M, const bf *Bg, int Ng) {
        const xw_rows r = {C, doff, N, E, N, 0};
        fail |= xw_backward(enc, grid, 0, ctr, off, r, A, K, R, W, G, Ag, M, Bg, Ng);
    };
    const double g_gu = 2.0 * R * F2 * H * 1e-9, g_down = 2.0 * R * H * F * 1e-9;
    struct row {
        const char *name;
        double gflop;
        float ms_wg, ms_cublas;
    } rows[5] = {{"gate_up", g_gu, 0, 0}, {"down", g_down, 0, 0}, {"dact + dWd", 2 * g_down, 0, 0},
                 {"drows + dWgu", 2 * g_gu, 0, 0}, {"gate_up+swiglu", g_gu, 0, 0}};
    rows[0].ms_wg = bench_median_ms(reps, [&] { fwd(gu, (int)F2, xs, Wgu, H); });
    rows[0].ms_cublas = bench_median_ms(reps, [&] { cublas_rows(1, xs, H, Wgu, gu, (int)F2); });
    rows[1].ms_wg = bench_median_ms(reps, [&] { fwd(Y, H, act, Wd, F); });
    rows[1].ms_cublas = bench_median_ms(reps, [&] { cublas_rows(1, act, F, Wd, Y, H); });
    rows[2].ms_wg = bench_median_ms(reps, [&] { bwd(dact, F, dy, H, Wd, dWd, dy, H, act, F); });
    rows[2].ms_cublas = bench_median_ms(reps, [&] {
        cublas_rows(0, dy, H, Wd, dact, F);
        cublas_grads(dy, H, act, F, dWd);
    });
    rows[3].ms_wg = bench_median_ms(reps, [&] { bwd(dx, H, dgu, (int)F2, Wgu, dWgu, dgu, (int)F2, xs, H); });
    rows[3].ms_cublas = bench_median_ms(reps, [&] {
        cublas_rows(0, dgu, (int)F2, Wgu, dx, H);
        cublas_grads(dgu, (int)F2, xs, H, dWgu);
    });
    /* topk's forward on Hopper: gate/up with the SwiGLU in its epilogue, against cuBLAS and the SwiGLU pass
     * (and, printed below, the Hopper product and the pass) */
    const bool glu = F % 128 == 0; /* xw_forward's condition for the fused SwiGLU */
    if (glu) {
        rows[4].ms_wg = bench_median_ms(reps, [&] { fwd(gu, (int)F2, xs, Wgu, H, act); });
        rows[4].ms_cublas = bench_median_ms(reps, [&] {
            cublas_rows(1, xs, H, Wgu, gu, (int)F2);
            swiglu_pass();
        });
    }
    const float ms_pass = glu ? bench_median_ms(reps, [&] { swiglu_pass(); }) : 0.0f;
    CK(cudaGetLastError()); /* a launch that failed would have timed as fast as nothing */
    if (fail) {
        fprintf(stderr, "m1c_bench_experts: cuTensorMapEncodeTiled refused an operand\n");
        return 1;
    }

    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s: %d rows over %d experts (%s), H %d, F %d, grid %d blocks, median of %d\n", prop.name, R, E,
           uneven ? "uneven" : "even", H, F, grid, reps);
    printf("%-14s %10s %10s %12s %10s\n", "launch", "ms", "TFLOP/s", "cuBLAS ms", "TFLOP/s");
    for (int i = 0; i < (glu ? 5 : 4); i++)
        printf("%-14s %10.4f %10.1f %12.4f %10.1f\n", rows[i].name, rows[i].ms_wg, rows[i].gflop / rows[i].ms_wg,
               rows[i].ms_cublas, rows[i].gflop / rows[i].ms_cublas);
    if (glu)
        printf("(gate_up+swiglu: the SwiGLU in the product's epilogue; cuBLAS's column adds the SwiGLU pass, %.4f "
               "ms,\n which the Hopper gate_up alone would take too: %.4f ms)\n",
               ms_pass, rows[0].ms_wg + ms_pass);
    else
        printf("(F %d is not a multiple of 128: no fused gate_up+swiglu)\n", F);
    cublasDestroy(cb);
    return 0;
}
