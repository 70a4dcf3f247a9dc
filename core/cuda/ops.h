/* CUDA implementations of core/ops.h (core/cuda/ops.cu), same semantics, pointers on the device,
 * launched on the core's stream (backend.h m1c_cuda_stream). Plain C declarations. */
#ifndef M1C_CUDA_OPS_H
#define M1C_CUDA_OPS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void m1c_cuda_embed_forward(float *out, const int32_t *ids, const float *wte, int64_t N, int H);
void m1c_cuda_embed_backward(float *dwte, const float *dout, const int32_t *ids, int64_t N, int H);
void m1c_cuda_embed_prepare(const int32_t *ids, int64_t N);
void m1c_cuda_rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int64_t N, int C, float eps,
                              void *out_lp);
void m1c_cuda_rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                               const float *rstd, int64_t N, int C);
struct m1c_out_rows;
void m1c_cuda_residual_rmsnorm(float *y, const float *h, float a, float b, const struct m1c_out_rows *yr, float *out,
                               float *rstd, const float *w, int64_t N, int C, float eps, void *out_lp, const float *pw,
                               int P, float *proj);
void m1c_cuda_rmsnorm_backward_axpby(float *dh, float *tmp, float *dw, const float *dout, const float *in,
                                     const float *w, const float *rstd, float a, float b, int64_t N, int C,
                                     void *tmp_lp);
void m1c_cuda_head_forward(int precision, float *logits, float *lse, float *logp, void *q, const float *h,
                           const float *W, const void *W_lp, const int32_t *targets, int64_t N, int H, int V);
/* Which forward m1c_cuda_head_forward runs from q at precision 2 (a training forward) for hidden H and
 * vocabulary V: 1 the Hopper kernels of head_wg.cuh (the logits are not written), given q, h's bf16 copy and
 * W's 16-byte aligned (cudaMalloc'd buffers are) and N < 2^31 - 128, else cuBLAS; 0 cuBLAS and the
 * log-softmax pass (H or V not a multiple of 8); -1 none of this build's code runs them on this device (no
 * sm_90a code, or compute capability other than 9.0); -2 the driver cannot encode tensor maps. */
int m1c_cuda_head_path(int H, int V);
void m1c_cuda_head_prepare(int precision, const void *q, const float *W, const void *W_lp, int64_t N, int H,
                           int V);
void m1c_cuda_head_backward(int precision, float *dh, float *dW, int unset, float *logits, const float *lse,
                            const void *q, const float *dlogp, const float *h, const float *W, const void *W_lp,
                            const int32_t *targets, int64_t N, int H, int V);
void m1c_cuda_residual(float *y, const float *h, float a, float b, int64_t n);
void m1c_cuda_axpby(float *y, float *z, const float *x, float a, float b, int64_t n);
double m1c_cuda_sumsq(const float *x, int64_t n);
void m1c_cuda_scale(float *x, int64_t n, float s);
int64_t m1c_cuda_count_nonfinite(const float *x, int64_t n);
void m1c_cuda_to_bf16(uint16_t *dst, const float *src, int64_t n);

/* Batched sampling (core/cuda/sample.cu): one token from each row of logits (B, V) with m1c_sample's
 * semantics (core/sample.h); greedy = argmax (the sampler's greedy flag or temperature <= 0), else u (B)
 * holds each row's uniform in [0, 1). work (B, V) receives the probabilities; out (B) the ids; prob (B,
 * may be NULL) each id's probability under the sampling distribution. All pointers on the device;
 * asynchronous on the core's stream. */
void m1c_cuda_sample(const float *logits, float *work, int B, int V, int greedy, float temperature, int top_k,
                     float top_p, const float *u, int32_t *out, float *prob);

#ifdef __cplusplus
}
#endif
#endif
