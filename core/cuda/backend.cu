/* CUDA device services for the core: allocation (cudaMalloc, never managed memory), copies and f32
 * GEMM through cuBLAS. Row-major products are computed as the column-major product of the
 * transposes: C^T = op(B)^T op(A)^T, so A and B swap places and no data moves. */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"

static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "m1c: CUDA error in %s: %s\n", what, cudaGetErrorString(e));
        abort();
    }
}

/* One cuBLAS handle per host thread (cuBLAS handles are not meant to be shared across threads). */
static cublasHandle_t blas_handle(void) {
    static thread_local cublasHandle_t h;
    if (!h && cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c: cublasCreate failed\n");
        abort();
    }
    return h;
}

extern "C" int m1c_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}

extern "C" void m1c_cuda_device_name(char *buf, int n) {
    cudaDeviceProp p;
    int dev = 0;
    buf[0] = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&p, dev) == cudaSuccess)
        snprintf(buf, (size_t)n, "%s", p.name);
}

extern "C" void *m1c_cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) return NULL;
    return p;
}

extern "C" void m1c_cuda_sync(void) { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

extern "C" void m1c_cuda_free(void *p) {
    if (p) check(cudaFree(p), "cudaFree");
}

extern "C" void m1c_cuda_memset0(void *p, size_t bytes) { check(cudaMemset(p, 0, bytes), "cudaMemset"); }

extern "C" void m1c_cuda_copy(void *dst, const void *src, size_t bytes, int kind) {
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    check(cudaMemcpy(dst, src, bytes, kinds[kind]), "cudaMemcpy");
}

extern "C" void m1c_cuda_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                              int64_t stride_a, const float *B, int ldb, int64_t stride_b, float beta, float *C,
                              int ldc, int64_t stride_c, int batch) {
    cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st = cublasSgemmStridedBatched(blas_handle(), tb, ta, N, M, K, &alpha, B, ldb, stride_b, A, lda,
                                                  stride_a, &beta, C, ldc, stride_c, batch);
    if (st != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c: cublasSgemmStridedBatched failed (%d)\n", (int)st);
        abort();
    }
}

extern "C" void m1c_cuda_gemm_ex(void *stream, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                                 int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype, int ldb,
                                 int64_t stride_b, float beta, void *C, int c_dtype, int ldc, int64_t stride_c,
                                 int batch) {
    /* m1c_dtype: 0 = f32, 1 = bf16. */
    const cudaDataType_t types[] = {CUDA_R_32F, CUDA_R_16BF};
    cublasHandle_t h = blas_handle();
    cublasSetStream(h, (cudaStream_t)stream);
    cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    /* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands. */
    cublasStatus_t st = cublasGemmStridedBatchedEx(h, tb, ta, N, M, K, &alpha, B, types[b_dtype], ldb, stride_b, A,
                                                   types[a_dtype], lda, stride_a, &beta, C, types[c_dtype], ldc,
                                                   stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasSetStream(h, NULL);
    if (st != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c: cublasGemmStridedBatchedEx failed (%d)\n", (int)st);
        abort();
    }
}
