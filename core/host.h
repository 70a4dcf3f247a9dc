/* The host-API table the core hands each plugin, and the device services behind it. */
#ifndef M1C_HOST_H
#define M1C_HOST_H

#include "m1c/plugin.h"

/* Fill h with the core's functions; `core` is the plugin's m1c_plugin (for its name and error slot). */
void m1c_host_fill(m1c_host *h, void *core);

/* Number of CPU threads the core uses (OpenMP/OpenBLAS); 0 means all cores. */
void m1c_set_threads(int n);
int m1c_get_threads(void);

/* Device services (also used by the core directly). */
void *m1c_dev_alloc(int device, size_t bytes);
void m1c_dev_free(int device, void *p);
/* The stream the core's work on a device runs on (core/cuda/backend.h), handed to plugins in their
 * buffers; NULL on the CPU. */
void *m1c_dev_stream(int device);
/* A low-priority stream for work beside the core's (backend.h); NULL on the CPU. */
void *m1c_dev_background_stream(int device);
/* Work queued on stream `waiter` after the call waits for what was queued on `waitee` before it (a no-op
 * on the CPU, where everything runs in call order). */
void m1c_dev_order(int device, void *waiter, void *waitee);
void m1c_dev_memset0(int device, void *p, size_t bytes);
/* The same queued on a given stream (CUDA; the CPU ignores it). */
void m1c_dev_memset0_on(int device, void *stream, void *p, size_t bytes);
/* Wait for all work queued on a device (timing). */
void m1c_dev_sync(int device);
/* Copies between any two devices (CPU <-> CUDA, CUDA <-> CUDA, CPU <-> CPU); synchronous. */
void m1c_dev_copy(int dst_device, void *dst, int src_device, const void *src, size_t bytes);
/* Host memory for staging a device's copies, zeroed: page-locked for CUDA where it can be had (so that
 * m1c_dev_copy_async does not wait), else from the heap; *pinned says which, for m1c_dev_host_free. */
void *m1c_dev_host_alloc(int device, size_t bytes, int *pinned);
void m1c_dev_host_free(void *p, int pinned);
/* A copy between the host and `device` that the host does not wait for (a plain copy on the CPU): a host
 * source must stay as it is, and a host destination is not written yet, until m1c_dev_copy_wait
 * returns. dst_device / src_device as m1c_dev_copy; one of them is the CPU. */
void m1c_dev_copy_async(int dst_device, void *dst, int src_device, const void *src, size_t bytes);
void m1c_dev_copy_wait(int device);
/* A failure the device kept since the last call (CUDA runtime or cuBLAS errors, out of device memory:
 * device work does not stop the process, see core/cuda/backend.h): 1 and its message in buf, then
 * cleared; 0 if none (always 0 on the CPU). */
int m1c_dev_take_error(int device, char *buf, size_t n);
/* Whether a device is usable in this build and on this machine. */
int m1c_dev_available(int device);
/* The dense peak of a device in FLOP/s for the compute dtype (bf16 tensor cores, or fp32), from its
 * name for the cards m1c knows (H100, H200); 0 if unknown. name gets the device's name. */
double m1c_dev_peak_flops(int device, int compute_dtype, char *name, int n);
/* Mixed-precision GEMM (see m1c_host.gemm_ex); returns M1C_ERR for dtypes the device cannot do. */
int m1c_gemm_ex(int device, void *stream, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype, int ldb, int64_t stride_b,
                float beta, void *C, int c_dtype, int ldc, int64_t stride_c, int batch);
/* Independent products (see m1c_host.gemm_group); M1C_ERR and *bad = the first product whose dtypes the
 * device cannot combine, before any runs. */
int m1c_gemm_group(int device, void *stream, const m1c_gemm_desc *g, int n, int *bad);
void m1c_gemm(int device, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);
void m1c_gemm_batched(int device, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, int64_t stride_a, const float *B, int ldb, int64_t stride_b, float beta, float *C,
                      int ldc, int64_t stride_c, int batch);

#endif
