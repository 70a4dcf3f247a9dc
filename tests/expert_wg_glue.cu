/* C glue for tests/test_expert_wg_cuda.c: runs topk's Hopper expert product (plugins/moe/topk/expert_wg.cuh)
 * on host arrays of bf16 bits, so that a C test can compare it with a CPU reference. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "expert_wg.cuh"

extern "C" {
/* 1 where this build has the kernel (an sm_90a target) and the current device runs it (compute capability
 * 9.0); the test requires it there, so that it cannot skip on a Hopper GPU. */
int xwt_expected(void);
/* 1 where the kernel can run now (xwt_expected and the driver's tensor-map encoder found). */
int xwt_available(void);
/* C (rows x ldc, bf16 bits, read and written back whole) = A W_e^T over the expert row ranges off[0..E]
 * (host), A (rows x K, bf16 bits, row stride K), W (E x N x K bf16 bits). 0 on success, else 1 with err set. */
int xwt_run(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
            int ldc, char *err, size_t errlen);
}

int xwt_expected(void) { return wg_available(); }

int xwt_available(void) { return wg_available() && tma_encoder() != NULL; }

int xwt_run(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
            int ldc, char *err, size_t errlen) {
    const size_t na = (size_t)rows * K, nw = (size_t)E * N * K, nc = (size_t)rows * ldc;
    __nv_bfloat16 *dA = NULL, *dW = NULL, *dC = NULL;
    int32_t *doff = NULL;
    int grid = 0, rc = 1;
    const tma_encode_fn enc = tma_encoder();
    cudaError_t e = enc ? xw_setup(&grid) : cudaErrorNotSupported;
    if (e == cudaSuccess) e = cudaMalloc((void **)&dA, na * 2);
    if (e == cudaSuccess) e = cudaMalloc((void **)&dW, nw * 2);
    if (e == cudaSuccess) e = cudaMalloc((void **)&dC, nc * 2);
    if (e == cudaSuccess) e = cudaMalloc((void **)&doff, (size_t)(E + 1) * sizeof(int32_t));
    if (e == cudaSuccess) e = cudaMemcpy(dA, A, na * 2, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(dW, W, nw * 2, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(dC, C, nc * 2, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(doff, off, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyHostToDevice);
    if (e == cudaSuccess) {
        const xw_args p = {dC, doff, ldc, E, N, 0};
        if (xw_gemm(enc, grid, 0, p, dA, K, rows, dW, K, (int64_t)N * K, K)) {
            snprintf(err, errlen, "cuTensorMapEncodeTiled refused an operand");
            goto done;
        }
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(C, dC, nc * 2, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) snprintf(err, errlen, "%s", cudaGetErrorString(e));
    else rc = 0;
done:
    cudaFree(dA), cudaFree(dW), cudaFree(dC), cudaFree(doff);
    return rc;
}
