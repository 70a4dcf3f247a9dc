/* C glue for tests/test_expert_wg_cuda.c: runs topk's Hopper expert products (plugins/moe/topk/expert_wg.cuh)
 * on host arrays of bf16 bits, so that a C test can compare them with a CPU reference. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "expert_wg.cuh"
#include "expert_wg_glue.h"

int xwt_expected(void) { return wg_available(); }

int xwt_available(void) { return wg_available() && tma_encoder() != NULL; }

/* Device copies of the host arrays (NULL host: no copy), freed together. */
typedef struct dev_bufs {
    void *p[8];
    int n;
} dev_bufs;
static cudaError_t up(dev_bufs *b, void **d, const void *h, size_t bytes) {
    cudaError_t e = cudaMalloc(d, bytes);
    if (e == cudaSuccess) b->p[b->n++] = *d;
    if (e == cudaSuccess && h) e = cudaMemcpy(*d, h, bytes, cudaMemcpyHostToDevice);
    return e;
}
static void free_all(dev_bufs *b) {
    for (int i = 0; i < b->n; i++) cudaFree(b->p[i]);
}

int xwt_forward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
                int ldc, int blocks, char *err, size_t errlen) {
    return xwt_forward_glu(E, off, rows, N, K, A, W, C, ldc, NULL, blocks, err, errlen);
}

int xwt_forward_glu(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                    uint16_t *C, int ldc, uint16_t *act, int blocks, char *err, size_t errlen) {
    dev_bufs b = {{0}, 0};
    void *dA, *dW, *dC, *doff, *dact = NULL;
    int grid = 0, rc = 1;
    const tma_encode_fn enc = tma_encoder();
    cudaError_t e = enc ? xw_setup(&grid) : cudaErrorNotSupported;
    if (blocks > 0) grid = blocks;
    if (e == cudaSuccess) e = up(&b, &dA, A, (size_t)rows * K * 2);
    if (e == cudaSuccess) e = up(&b, &dW, W, (size_t)E * N * K * 2);
    if (e == cudaSuccess) e = up(&b, &dC, C, (size_t)rows * ldc * 2);
    if (e == cudaSuccess) e = up(&b, &doff, off, (size_t)(E + 1) * sizeof(int32_t));
    if (e == cudaSuccess && act) e = up(&b, &dact, act, (size_t)rows * (N / 2) * 2);
    if (e == cudaSuccess) {
        const xw_rows r = {(__nv_bfloat16 *)dC, (const int32_t *)doff, ldc, E, N, 0};
        if (xw_forward(enc, grid, 0, r, (const __nv_bfloat16 *)dA, K, rows, (const __nv_bfloat16 *)dW, K,
                       (__nv_bfloat16 *)dact, N / 2)) {
            snprintf(err, errlen, "cuTensorMapEncodeTiled refused an operand");
            free_all(&b);
            return 1;
        }
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(C, dC, (size_t)rows * ldc * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess && act) e = cudaMemcpy(act, dact, (size_t)rows * (N / 2) * 2, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) snprintf(err, errlen, "%s", cudaGetErrorString(e));
    else rc = 0;
    free_all(&b);
    return rc;
}

int xwt_backward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
                 int ldc, int M, int Ng, const uint16_t *Ag, const uint16_t *Bg, float *G, int reps, int blocks,
                 int unset, char *err, size_t errlen) {
    dev_bufs b = {{0}, 0};
    void *dA, *dW, *dC, *doff, *dAg, *dBg, *dG, *ctr;
    int grid = 0, rc = 1;
    const tma_encode_fn enc = tma_encoder();
    const size_t gbytes = (size_t)E * M * Ng * sizeof(float);
    cudaError_t e = enc ? xw_setup(&grid) : cudaErrorNotSupported;
    if (blocks > 0) grid = blocks;
    if (e == cudaSuccess) e = up(&b, &dA, A, (size_t)rows * K * 2);
    if (e == cudaSuccess) e = up(&b, &dW, W, (size_t)E * K * N * 2);
    if (e == cudaSuccess) e = up(&b, &dC, C, (size_t)rows * ldc * 2);
    if (e == cudaSuccess) e = up(&b, &doff, off, (size_t)(E + 1) * sizeof(int32_t));
    if (e == cudaSuccess) e = up(&b, &dAg, Ag, (size_t)rows * M * 2);
    if (e == cudaSuccess) e = up(&b, &dBg, Bg, (size_t)rows * Ng * 2);
    if (e == cudaSuccess) e = up(&b, &dG, G, gbytes);
    if (e == cudaSuccess) e = up(&b, &ctr, NULL, 2 * sizeof(int));
    if (e == cudaSuccess) e = cudaMemset(ctr, 0, 2 * sizeof(int));
    for (int i = 0; i < reps && e == cudaSuccess; i++) {
        const xw_rows r = {(__nv_bfloat16 *)dC, (const int32_t *)doff, ldc, E, N, 0};
        if (xw_backward(enc, grid, 0, (int *)ctr, off, r, (const __nv_bfloat16 *)dA, K, rows,
                        (const __nv_bfloat16 *)dW, (float *)dG, (const __nv_bfloat16 *)dAg, M,
                        (const __nv_bfloat16 *)dBg, Ng, unset != 0)) {
            snprintf(err, errlen, "cuTensorMapEncodeTiled refused an operand (or too many experts)");
            free_all(&b);
            return 1;
        }
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(C, dC, (size_t)rows * ldc * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) e = cudaMemcpy(G, dG, gbytes, cudaMemcpyDeviceToHost);
    int left[2] = {1, 1};
    if (e == cudaSuccess) e = cudaMemcpy(left, ctr, sizeof left, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) snprintf(err, errlen, "%s", cudaGetErrorString(e));
    else if (left[0] || left[1]) snprintf(err, errlen, "the tile counter was left at %d, %d", left[0], left[1]);
    else rc = 0;
    free_all(&b);
    return rc;
}
