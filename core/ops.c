/* The core's own layers: the CPU reference here, and dispatch to core/cuda/ops.cu for CUDA pointers. */
#include "ops.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "host.h"
#include "m1c/plugin.h"
#include "safetensors.h" /* m1c_bf16_to_f32, m1c_f32_to_bf16 */
#ifdef M1C_HAVE_CUDA
#include "cuda/ops.h"
/* Run `call` and return when the pointers live on the GPU. */
#define ON_GPU(dev, call)                                                                                           \
    do {                                                                                                            \
        if ((dev) == M1C_DEVICE_CUDA) {                                                                             \
            call;                                                                                                   \
            return;                                                                                                 \
        }                                                                                                           \
    } while (0)
#define ON_GPU_RET(dev, call)                                                                                       \
    do {                                                                                                            \
        if ((dev) == M1C_DEVICE_CUDA) return call;                                                                  \
    } while (0)
#else
#define ON_GPU(dev, call) (void)(dev)
#define ON_GPU_RET(dev, call) (void)(dev)
#endif

void m1c_embed_prepare(int dev, const int32_t *ids, int64_t N) {
    ON_GPU(dev, m1c_cuda_embed_prepare(ids, N));
    (void)ids, (void)N;
}

void m1c_embed_forward(int dev, float *out, const int32_t *ids, const float *wte, int64_t N, int H) {
    ON_GPU(dev, m1c_cuda_embed_forward(out, ids, wte, N, H));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) memcpy(out + i * H, wte + (int64_t)ids[i] * H, (size_t)H * sizeof(float));
}

void m1c_embed_backward(int dev, float *dwte, const float *dout, const int32_t *ids, int64_t N, int H) {
    ON_GPU(dev, m1c_cuda_embed_backward(dwte, dout, ids, N, H));
    /* Rows of one token collide: split the work over columns instead of rows. */
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int c0 = (int)((int64_t)H * t / nt), c1 = (int)((int64_t)H * (t + 1) / nt);
        for (int64_t i = 0; i < N; i++) {
            float *d = dwte + (int64_t)ids[i] * H;
            const float *g = dout + i * H;
            for (int c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}

/* One row of the RMSNorm forward, shared by m1c_rmsnorm_forward and m1c_residual_rmsnorm so that both
 * give the same bits. */
static void rmsnorm_row(float *y, float *rstd, const float *x, const float *w, int C, float eps) {
    float ss = 0;
    for (int c = 0; c < C; c++) ss += x[c] * x[c];
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    *rstd = r;
    for (int c = 0; c < C; c++) y[c] = x[c] * r * w[c];
}

void m1c_rmsnorm_forward(int dev, float *out, float *rstd, const float *in, const float *w, int64_t N, int C,
                         float eps, uint16_t *out_lp) {
    ON_GPU(dev, m1c_cuda_rmsnorm_forward(out, rstd, in, w, N, C, eps, out_lp));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) rmsnorm_row(out + i * C, &rstd[i], in + i * C, w, C, eps);
    if (out_lp) m1c_to_bf16(dev, out_lp, out, N * C);
}

/* Row i of a layer's output handed over as weighted rows (m1c_out_rows), into x: fused multiply-adds from
 * 0, as the GPU's m1c_rows_sum (idx and weight NULL: row i's own k rows, weights 1). */
static void out_rows_row(float *x, const m1c_out_rows *yr, int64_t i, int C) {
    for (int c = 0; c < C; c++) x[c] = 0;
    for (int j = 0; j < yr->k; j++) {
        const int32_t r = yr->idx ? yr->idx[i * yr->k + j] : (int32_t)(i * yr->k + j);
        if (r < 0) continue;
        const float wj = yr->weight ? yr->weight[i * yr->k + j] : 1.0f;
        if (yr->dtype == M1C_BF16) {
            const uint16_t *row = (const uint16_t *)yr->rows + (int64_t)r * C;
            for (int c = 0; c < C; c++) x[c] = fmaf(wj, m1c_bf16_to_f32(row[c]), x[c]);
        } else {
            const float *row = (const float *)yr->rows + (int64_t)r * C;
            for (int c = 0; c < C; c++) x[c] = fmaf(wj, row[c], x[c]);
        }
    }
}

void m1c_residual_rmsnorm_ex(int dev, float *y, const float *h, float a, float b, const m1c_out_rows *yr,
                             float *out, float *rstd, const float *w, int64_t N, int C, float eps, uint16_t *out_lp,
                             const float *pw, int P, float *proj) {
    if (yr && !yr->rows) yr = NULL;
    ON_GPU(dev, m1c_cuda_residual_rmsnorm(y, h, a, b, yr, out, rstd, w, N, C, eps, out_lp, pw, P, proj));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        float *x = y + i * C, *o = out + i * C;
        const float *hr = h + i * C;
        if (yr) out_rows_row(x, yr, i, C);
        for (int c = 0; c < C; c++) x[c] = a * hr[c] + b * x[c]; /* m1c_residual's expression */
        rmsnorm_row(o, &rstd[i], x, w, C, eps);
        for (int p = 0; p < P; p++) {
            float s = 0;
            for (int c = 0; c < C; c++) s += o[c] * pw[(int64_t)p * C + c];
            proj[i * P + p] = s;
        }
    }
    if (out_lp) m1c_to_bf16(dev, out_lp, out, N * C);
}

void m1c_residual_rmsnorm(int dev, float *y, const float *h, float a, float b, float *out, float *rstd,
                          const float *w, int64_t N, int C, float eps, uint16_t *out_lp) {
    m1c_residual_rmsnorm_ex(dev, y, h, a, b, NULL, out, rstd, w, N, C, eps, out_lp, NULL, 0, NULL);
}

/* y = x r w, r = (mean(x^2) + eps)^-1/2: dx = r (g w) - x r^3 mean(g w x), dw = sum g x r. The row's
 * k = r^3 mean(g w x). */
static float rmsnorm_bwd_k(const float *g, const float *x, const float *w, float r, int C) {
    float dot = 0;
    for (int c = 0; c < C; c++) dot += g[c] * w[c] * x[c];
    return r * r * r * dot / (float)C;
}

/* dw += sum over rows of g x r: per-thread over columns to avoid races. */
static void rmsnorm_bwd_w(float *dw, const float *dout, const float *in, const float *rstd, int64_t N, int C) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        float s = 0;
        for (int64_t i = 0; i < N; i++) s += dout[i * C + c] * in[i * C + c] * rstd[i];
        dw[c] += s;
    }
}

void m1c_rmsnorm_backward(int dev, float *din, float *dw, const float *dout, const float *in, const float *w,
                          const float *rstd, int64_t N, int C) {
    ON_GPU(dev, m1c_cuda_rmsnorm_backward(din, dw, dout, in, w, rstd, N, C));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *x = in + i * C, *g = dout + i * C;
        float *dx = din + i * C;
        float r = rstd[i], k = rmsnorm_bwd_k(g, x, w, r, C);
        for (int c = 0; c < C; c++) dx[c] += r * g[c] * w[c] - k * x[c];
    }
    rmsnorm_bwd_w(dw, dout, in, rstd, N, C);
}

void m1c_rmsnorm_backward_axpby(int dev, float *dh, float *tmp, float *dw, const float *dout, const float *in,
                                const float *w, const float *rstd, float a, float b, int64_t N, int C,
                                uint16_t *tmp_lp) {
    ON_GPU(dev, m1c_cuda_rmsnorm_backward_axpby(dh, tmp, dw, dout, in, w, rstd, a, b, N, C, tmp_lp));
    rmsnorm_bwd_w(dw, dout, in, rstd, N, C); /* first: dout may be dh, overwritten below */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *x = in + i * C, *g = dout + i * C;
        float *y = dh + i * C;
        float r = rstd[i], k = rmsnorm_bwd_k(g, x, w, r, C);
        /* element c of g is read before element c of y (maybe the same) is written */
        for (int c = 0; c < C; c++) {
            float d = r * g[c] * w[c] - k * x[c];
            y[c] = a * d;
            if (tmp) tmp[i * C + c] = b * d;
            if (tmp_lp) tmp_lp[i * C + c] = m1c_f32_to_bf16(b * d);
        }
    }
}

void m1c_head_forward(int dev, int precision, float *logits, float *lse, float *logp, void *q, const float *h,
                      const float *W, const void *W_lp, const int32_t *targets, int64_t N, int H, int V) {
    ON_GPU(dev, m1c_cuda_head_forward(precision, logits, lse, logp, q, h, W, W_lp, targets, N, H, V));
    (void)precision, (void)q, (void)W_lp; /* the CPU computes the head in fp32 whatever the setting */
    m1c_gemm(M1C_DEVICE_CPU, 0, 1, (int)N, V, H, 1.0f, h, H, W, H, 0.0f, logits, V);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *z = logits + i * V;
        float m = -INFINITY;
        for (int v = 0; v < V; v++) m = fmaxf(m, z[v]);
        double s = 0;
        for (int v = 0; v < V; v++) s += exp((double)(z[v] - m));
        lse[i] = m + (float)log(s);
        if (logp) logp[i] = targets[i] >= 0 ? z[targets[i]] - lse[i] : 0.0f;
    }
}

void m1c_head_prepare(int dev, int precision, const void *q, const float *W, const void *W_lp, int64_t N, int H,
                      int V) {
    ON_GPU(dev, m1c_cuda_head_prepare(precision, q, W, W_lp, N, H, V));
    (void)precision, (void)q, (void)W, (void)W_lp, (void)N, (void)H, (void)V;
}

void m1c_head_backward(int dev, int precision, float *dh, float *dW, int unset, float *logits, const float *lse,
                       const void *q, const float *dlogp, const float *h, const float *W, const void *W_lp,
                       const int32_t *targets, int64_t N, int H, int V) {
    ON_GPU(dev, m1c_cuda_head_backward(precision, dh, dW, unset, logits, lse, q, dlogp, h, W, W_lp, targets, N, H, V));
    (void)precision, (void)q, (void)W_lp;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        float *z = logits + i * V, g = dlogp[i];
        if (targets[i] < 0) g = 0;
        for (int v = 0; v < V; v++) z[v] = -g * expf(z[v] - lse[i]);
        if (targets[i] >= 0) z[targets[i]] += g;
    }
    if (unset & M1C_HEAD_DH_UNSET) memset(dh, 0, (size_t)N * H * sizeof *dh);
    m1c_gemm(M1C_DEVICE_CPU, 0, 0, (int)N, H, V, 1.0f, logits, V, W, H, 1.0f, dh, H);
    if (unset & M1C_HEAD_DW_UNSET) memset(dW, 0, (size_t)V * H * sizeof *dW);
    m1c_gemm(M1C_DEVICE_CPU, 1, 0, V, H, (int)N, 1.0f, logits, V, h, H, 1.0f, dW, H);
}

double m1c_sumsq(int dev, const float *x, int64_t n) {
    ON_GPU_RET(dev, m1c_cuda_sumsq(x, n));
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

void m1c_scale(int dev, float *x, int64_t n, float s) {
    ON_GPU(dev, m1c_cuda_scale(x, n, s));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

void m1c_residual(int dev, float *y, const float *h, float a, float b, int64_t n) {
    ON_GPU(dev, m1c_cuda_residual(y, h, a, b, n));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = a * h[i] + b * y[i];
}

void m1c_axpby(int dev, float *y, float *z, const float *x, float a, float b, int64_t n) {
    ON_GPU(dev, m1c_cuda_axpby(y, z, x, a, b, n));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = a * x[i], z[i] = b * x[i];
}

int64_t m1c_count_nonfinite(int dev, const float *x, int64_t n) {
    ON_GPU_RET(dev, m1c_cuda_count_nonfinite(x, n));
    int64_t k = 0;
#pragma omp parallel for reduction(+ : k) schedule(static)
    for (int64_t i = 0; i < n; i++) k += !isfinite(x[i]);
    return k;
}

void m1c_to_bf16(int dev, uint16_t *dst, const float *src, int64_t n) {
    ON_GPU(dev, m1c_cuda_to_bf16(dst, src, n));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        dst[i] = m1c_f32_to_bf16(src[i]);
    }
}
