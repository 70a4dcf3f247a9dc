/* The core's own layers (CPU reference): token embedding, RMSNorm, the LM head with log-softmax.
 * llm.c conventions: outputs first, gradients accumulate (+=), dimensions last. N = B*T rows. */
#ifndef M1C_OPS_H
#define M1C_OPS_H

#include <stdint.h>

/* out (N, H) = wte[ids] */
void m1c_embed_forward(float *out, const int32_t *ids, const float *wte, int64_t N, int H);
/* dwte (V, H) += scatter of dout */
void m1c_embed_backward(float *dwte, const float *dout, const int32_t *ids, int64_t N, int H);

/* out (N, C) = in / rms(in) * w; rstd (N) saved for backward. */
void m1c_rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int64_t N, int C, float eps);
/* din += ..., dw += ... */
void m1c_rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                          const float *rstd, int64_t N, int C);

/* The LM head in FP32: logits (N, V) = h (N, H) W^T, W (V, H); lse (N) = logsumexp of each row;
 * logp (N) = log-probability of targets (a negative target gives logp 0: not scored). */
void m1c_head_forward(float *logits, float *lse, float *logp, const float *h, const float *W,
                      const int32_t *targets, int64_t N, int H, int V);
/* From dlogp (N): dlogits = dlogp * (onehot - softmax) (in place of logits), then dh += dlogits W,
 * dW += dlogits^T h. */
void m1c_head_backward(float *dh, float *dW, float *logits, const float *lse, const float *dlogp, const float *h,
                       const float *W, const int32_t *targets, int64_t N, int H, int V);

/* Sum of squares of n floats, in double (gradient norms). */
double m1c_sumsq(const float *x, int64_t n);
void m1c_scale(float *x, int64_t n, float s);

#endif
