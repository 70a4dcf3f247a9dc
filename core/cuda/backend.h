/* The CUDA side of the device services (core/cuda/backend.cu), called from host.c when the build has
 * CUDA. Plain C declarations so the C core can call them. */
#ifndef M1C_CUDA_BACKEND_H
#define M1C_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "m1c/plugin.h" /* m1c_gemm_desc */

#ifdef __cplusplus
extern "C" {
#endif

/* CUDA failures (a runtime or cuBLAS error, out of device memory) do not end the process: the first one
 * on the calling host thread is kept, with what failed, and later calls go on (their own failures are
 * dropped; a failed allocation leaves its user's work undone). The model checks after each forward,
 * backward and decoding call (m1c_dev_check in host.h) and fails with that message. */
void m1c_cuda_fail(const char *what, const char *detail);
/* 1 and the kept message in buf (then cleared) if a failure is pending, else 0. */
int m1c_cuda_take_error(char *buf, size_t n);

/* The core's stream: every kernel, copy and product of the core runs there, and the model hands it to
 * the plugins (m1c_layer_bufs.stream), so one step's work is ordered on it. Per host thread, made on
 * first use; NULL (the legacy default stream) where no device can make it. */
void *m1c_cuda_stream(void);
/* A stream of the device's lowest priority that does not wait for the legacy default stream (per host
 * thread, made on first use; NULL where it cannot be made): for work that may fill what the core's stream
 * leaves free (the optimizer beside the backward). */
void *m1c_cuda_background_stream(void);
/* Work queued on `waiter` after this call waits for the work queued on `waitee` before it. */
void m1c_cuda_order(void *waiter, void *waitee);

int m1c_cuda_device_count(void);
/* The current device's multiprocessors; 0 if they cannot be read. */
int m1c_cuda_sm_count(void);
/* The current device's name ("NVIDIA H100 80GB HBM3", ...); "" if none. */
void m1c_cuda_device_name(char *buf, int n);
void *m1c_cuda_alloc(size_t bytes);
void m1c_cuda_free(void *p);
void m1c_cuda_sync(void);
void m1c_cuda_memset0(void *p, size_t bytes); /* on the core's stream */
void m1c_cuda_memset0_on(void *stream, void *p, size_t bytes);
/* kind: 0 host->device, 1 device->host, 2 device->device */
void m1c_cuda_copy(void *dst, const void *src, size_t bytes, int kind);
/* Page-locked host memory (staging that copies read without the host waiting); NULL if none is had. */
void *m1c_cuda_host_alloc(size_t bytes);
void m1c_cuda_host_free(void *p);
/* A copy (kind as m1c_cuda_copy: 0 host->device, 1 device->host) queued on the core's stream and not
 * waited for: a host src must stay as it is, and a host dst is not written yet, until m1c_cuda_copy_wait
 * returns (pageable host memory makes the copy synchronous instead). */
void m1c_cuda_copy_async(void *dst, const void *src, size_t bytes, int kind);
/* Wait until the calling thread's asynchronous copies so far are done. */
void m1c_cuda_copy_wait(void);
void m1c_cuda_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                   int64_t stride_a, const float *B, int ldb, int64_t stride_b, float beta, float *C, int ldc,
                   int64_t stride_c, int batch);

/* Mixed precision: dtypes are m1c_dtype values (M1C_F32 0, M1C_BF16 1); f32 accumulation. */
void m1c_cuda_gemm_ex(void *stream, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                      int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype, int ldb, int64_t stride_b,
                      float beta, void *C, int c_dtype, int ldc, int64_t stride_c, int batch);

/* Independent products at once (m1c_host.gemm_group): each on one of up to 4 streams of the calling
 * thread, with a workspace each, after the work queued on `stream` and before what is queued on it
 * next. Each product's algorithm is chosen for half the GPU, so it may differ from m1c_cuda_gemm_ex's
 * for the same product: the results then differ in f32 rounding (summation order); the same sequence of
 * calls gives the same bits. */
void m1c_cuda_gemm_group(void *stream, const m1c_gemm_desc *g, int n);

/* The calling thread's m1c_cuda_gemm_ex counts since its first call: calls, cuBLASLt heuristic queries
 * (cache misses and retries), retries (a cached algorithm refused a problem of its bucket) and calls
 * handed to cublasGemmStridedBatchedEx (K = 0, or no cuBLASLt algorithm). For tests and benchmarks. */
typedef struct m1c_cuda_gemm_stats {
    long long calls, heuristics, retries, fallbacks;
} m1c_cuda_gemm_stats;
void m1c_cuda_gemm_ex_stats(m1c_cuda_gemm_stats *out);

#ifdef __cplusplus
}
#endif
#endif
