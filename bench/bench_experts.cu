/* The MoE forward's expert products in topk's Hopper kernel (plugins/moe/topk/expert_wg.cuh, expert_gemm =
 * "auto" on an sm_90a device), one table: per product the median time over the repetitions and its
 * TFLOP/s, beside cuBLAS running the same expert products one after another (cublasGemmEx, bf16 in and
 * out, f32 accumulation; m1c_bench_gemm has the core's concurrent per-expert path, topk's "cublas").
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
    int R = 32768, E = 8, H = 768, F = 1024, reps = 20, uneven = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        const int more = i + 1 < argc;
        if (!strcmp(argv[i], "--rows") && more) R = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--experts") && more) E = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hidden") && more) H = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ffn") && more) F = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && more) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--uneven")) uneven = 1;
        else bad = 1;
    }
    if (bad || E < 1 || E > 64 || R < E || H < 8 || H % 8 || F < 8 || F % 8 || reps < 1) {
        fprintf(stderr, "usage: m1c_bench_experts [--rows N] [--experts 1..64] [--hidden N] [--ffn N] [--reps N] "
                        "[--uneven]   (hidden and ffn multiples of 8)\n");
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
    CK(cudaDeviceSynchronize());
    cublasHandle_t cb;
    if (cublasCreate(&cb) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c_bench_experts: cublasCreate failed\n");
        return 1;
    }
    /* cuBLAS, column-major: row-major C (ne x N) = A (ne x K) W_e^T is C^T = W_e A^T. */
    auto cublas_products = [&](const bf *A, int lda, const bf *W, int64_t sw, bf *C, int N, int K) {
        const float one = 1.0f, zero = 0.0f;
        for (int e = 0; e < E; e++) {
            const int ne = off[e + 1] - off[e];
            if (!ne) continue;
            cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, N, ne, K, &one, W + e * sw, CUDA_R_16BF, K,
                         A + (int64_t)off[e] * lda, CUDA_R_16BF, lda, &zero, C + (int64_t)off[e] * N, CUDA_R_16BF, N,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        }
    };
    int fail = 0;
    auto xw = [&](bf *C, int N, const bf *A, int lda, const bf *W, int K) {
        const xw_args p = {C, doff, N, E, N, 0};
        fail |= xw_gemm(enc, grid, 0, p, A, lda, R, W, K, (int64_t)N * K, K);
    };
    struct row {
        const char *name;
        double gflop;
        float ms_wg, ms_cublas;
    } rows[2] = {{"gate_up", 2.0 * R * F2 * H * 1e-9, 0, 0}, {"down", 2.0 * R * H * F * 1e-9, 0, 0}};
    rows[0].ms_wg = bench_median_ms(reps, [&] { xw(gu, (int)F2, xs, H, Wgu, H); });
    rows[0].ms_cublas = bench_median_ms(reps, [&] { cublas_products(xs, H, Wgu, F2 * H, gu, (int)F2, H); });
    rows[1].ms_wg = bench_median_ms(reps, [&] { xw(Y, H, act, F, Wd, F); });
    rows[1].ms_cublas = bench_median_ms(reps, [&] { cublas_products(act, F, Wd, (int64_t)H * F, Y, H, F); });
    if (fail) {
        fprintf(stderr, "m1c_bench_experts: cuTensorMapEncodeTiled refused an operand\n");
        return 1;
    }

    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s: %d rows over %d experts (%s), H %d, F %d, grid %d blocks, median of %d\n", prop.name, R, E,
           uneven ? "uneven" : "even", H, F, grid, reps);
    printf("%-10s %10s %10s %12s %10s\n", "product", "ms", "TFLOP/s", "cuBLAS ms", "TFLOP/s");
    for (int i = 0; i < 2; i++)
        printf("%-10s %10.4f %10.1f %12.4f %10.1f\n", rows[i].name, rows[i].ms_wg, rows[i].gflop / rows[i].ms_wg,
               rows[i].ms_cublas, rows[i].gflop / rows[i].ms_cublas);
    cublasDestroy(cb);
    return 0;
}
