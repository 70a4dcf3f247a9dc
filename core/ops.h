/* The core's own layers and vector operations, on the CPU (reference) or a CUDA device: token
 * embedding, RMSNorm, the LM head with log-softmax, residual arithmetic, reductions. llm.c
 * conventions: outputs first, gradients accumulate (+=), dimensions last. N = B*T rows. Every
 * pointer lives on `dev`; calls on a CUDA device are asynchronous on the core's stream
 * (m1c_dev_stream) except those that return a value. */
#ifndef M1C_OPS_H
#define M1C_OPS_H

#include <stdint.h>

/* out (N, H) = wte[ids] */
void m1c_embed_forward(int dev, float *out, const int32_t *ids, const float *wte, int64_t N, int H);
/* dwte (V, H) += scatter of dout */
void m1c_embed_backward(int dev, float *dwte, const float *dout, const int32_t *ids, int64_t N, int H);
/* A training forward's hint: the next m1c_embed_backward will take these ids (unchanged). On a GPU their
 * sort (its order of summation) is queued now on the background stream, off the backward's path; a no-op
 * on the CPU. */
void m1c_embed_prepare(int dev, const int32_t *ids, int64_t N);

/* out (N, C) = in / rms(in) * w; rstd (N) saved for backward. out_lp: NULL, or (N, C) that receives out
 * rounded to bf16 (nearest even, as m1c_to_bf16) in the same pass: the next layer's bf16 input. */
void m1c_rmsnorm_forward(int dev, float *out, float *rstd, const float *in, const float *w, int64_t N, int C,
                         float eps, uint16_t *out_lp);
/* din += ..., dw += ... */
void m1c_rmsnorm_backward(int dev, float *din, float *dw, const float *dout, const float *in, const float *w,
                          const float *rstd, int64_t N, int C);

/* The LM head: logits (N, V) = h (N, H) W^T, W (V, H); lse (N) = logsumexp of each row; logp (N) =
 * log-probability of targets (a negative target gives logp 0: not scored). precision is the config's
 * model.head_precision (0 fp32, as M1; 1 tf32; 2 bf16 operands with f32 accumulation; 3 tf32x3: each
 * operand split into a TF32 high part and a TF32 remainder, three tensor-core products summed in f32,
 * ~1e-6 relative like fp32 at tensor-core speed): the GEMM's arithmetic on a GPU; the CPU always
 * computes in fp32. lse and logp are always fp32. */
/* q: NULL, or a buffer of m1c_head_q_bytes(N, V) for a training forward at precision 2 on a GPU, which
 * then also writes there q (N, V) bf16 and from byte m1c_head_q_scale_at(N, V) on each row's scale qs (N
 * floats), with q qs = onehot - softmax (0 on unscored rows): the backward's dlogits up to each row's dlogp,
 * so that the backward needs no pass over the logits. (On Hopper q holds exponentials shifted per row and
 * qs brings them to the softmax: core/cuda/head_wg.cuh; elsewhere qs is 1.) With q the logits are
 * unspecified afterwards (on Hopper the forward never makes them). Ignored elsewhere (the CPU, other
 * precisions). W_lp: NULL, or W's bf16 copy (the model's params_lp), which precision 2 on a GPU then uses
 * instead of converting W. */
static inline int64_t m1c_head_q_scale_at(int64_t N, int V) { return (N * V * 2 + 15) / 16 * 16; }
static inline int64_t m1c_head_q_bytes(int64_t N, int V) { return m1c_head_q_scale_at(N, V) + N * 4; }
void m1c_head_forward(int dev, int precision, float *logits, float *lse, float *logp, void *q, const float *h,
                      const float *W, const void *W_lp, const int32_t *targets, int64_t N, int H, int V);
/* From dlogp (N): dlogits = dlogp * (onehot - softmax), then dh += dlogits W, dW += dlogits^T h; `unset`
 * (M1C_HEAD_*_UNSET) turns either into = with the old contents unread (dW: a gradient handed over
 * M1C_TENSOR_UNSET; dh: the backward's first gradient, with no zeroing pass before). The
 * dlogits are left in place of logits, except on a CUDA device at precisions 2 and 3, where they go
 * straight into the products' bf16 or TF32-split operands: there logits' contents are unspecified
 * afterwards. With the forward's q (precision 2, GPU) the logits are not read: dh += dlogp qs (q W) and
 * dW += q^T (dlogp qs h), dlogp qs h rounded to bf16 once. */
/* A training forward's hint, after m1c_head_forward wrote q: the next m1c_head_backward will take this q
 * and W. On a GPU at precision 2 the backward's product q W, which needs no dlogp, is queued now, so the
 * device runs it while the host waits for logp and works out dlogp; a no-op elsewhere. */
void m1c_head_prepare(int dev, int precision, const void *q, const float *W, const void *W_lp, int64_t N, int H,
                      int V);
#define M1C_HEAD_DW_UNSET 1
#define M1C_HEAD_DH_UNSET 2
void m1c_head_backward(int dev, int precision, float *dh, float *dW, int unset, float *logits, const float *lse,
                       const void *q, const float *dlogp, const float *h, const float *W, const void *W_lp,
                       const int32_t *targets, int64_t N, int H, int V);

/* y = a * h + b * y (the DeepNorm residual, in place over the sublayer output y). */
void m1c_residual(int dev, float *y, const float *h, float a, float b, int64_t n);
/* y = a * x and z = b * x (splitting a residual gradient). */
void m1c_axpby(int dev, float *y, float *z, const float *x, float a, float b, int64_t n);

/* Fused forms of the model's pairs of passes over (N, C) arrays, one pass per row instead of two or
 * three calls: the same operations in the same order per element as the separate calls.
 *
 * The residual then the RMSNorm that reads it: y = a * h + b * y in place (m1c_residual over N * C),
 * then out = y / rms(y) * w and rstd from the new y (m1c_rmsnorm_forward). The same values as those
 * two calls (bit for bit on the CPU). y, h, out, rstd and w must not overlap. out_lp: as for
 * m1c_rmsnorm_forward. */
void m1c_residual_rmsnorm(int dev, float *y, const float *h, float a, float b, float *out, float *rstd,
                          const float *w, int64_t N, int C, float eps, uint16_t *out_lp);
/* The same with the two hand-overs of plugin.h's ABI 1.4:
 *   yr: NULL, or with yr->rows set y's old values are not read but the weighted rows' sum that yr
 *     describes (m1c_out_rows: a layer's output, summed as the layer would have); y is written as ever;
 *   P > 0: also proj (N, P) = out pw^T for a (P, C) f32 matrix pw, P <= 32 (a layer's in_proj), from out's
 *     f32 values as they are stored, sums in f32 (on the GPU in an order of the kernel's, from registers:
 *     out is not read back). P = 0: pw and proj unused. */
struct m1c_out_rows;
void m1c_residual_rmsnorm_ex(int dev, float *y, const float *h, float a, float b, const struct m1c_out_rows *yr,
                             float *out, float *rstd, const float *w, int64_t N, int C, float eps, uint16_t *out_lp,
                             const float *pw, int P, float *proj);
/* The RMSNorm backward then the split of the gradient it gives: with dx the input gradient that
 * m1c_rmsnorm_backward adds into a zeroed array, dh = a * dx and tmp = b * dx (overwritten, as
 * m1c_axpby), dw += the weight gradient; dx is never stored. Aliasing: dout may be the very same array
 * as dh (the model passes dh for both; every row and the weight gradient are read from dout before
 * that row is written); no other overlap: dh and tmp are distinct, and neither overlaps in, w, rstd or
 * dw. On the CPU dh and tmp equal those of memset0 + m1c_rmsnorm_backward + m1c_axpby up to the sign
 * of zeros and dw bit for bit; on a GPU within f32 rounding (dw's sums over rows run in another
 * fixed order, deterministic: the same inputs give the same bits). tmp_lp: NULL, or (N, C) that
 * receives tmp rounded to bf16 (the sublayer's bf16 output gradient). tmp NULL: tmp is not written
 * (tmp_lp still is). */
void m1c_rmsnorm_backward_axpby(int dev, float *dh, float *tmp, float *dw, const float *dout, const float *in,
                                const float *w, const float *rstd, float a, float b, int64_t N, int C,
                                uint16_t *tmp_lp);
/* Sum of squares in double (gradient norms); synchronous. */
double m1c_sumsq(int dev, const float *x, int64_t n);
void m1c_scale(int dev, float *x, int64_t n, float s);
/* Elements that are NaN or +-Inf; synchronous. */
int64_t m1c_count_nonfinite(int dev, const float *x, int64_t n);
/* bf16 (round to nearest even) copies of f32 values: the low-precision parameter copies. */
void m1c_to_bf16(int dev, uint16_t *dst, const float *src, int64_t n);

#endif
