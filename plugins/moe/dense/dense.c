/* dense: a plain SwiGLU feed-forward in the MoE slot, out = Down(silu(Gate x) * (Up x)), for ablations
 * against the routed topk plugin (same parameter layout as one HF MLP: mlp.{gate,up,down}_proj). CPU here;
 * device CUDA (built with CUDA) in dense.cu, with the buffers declared here in the compute dtype. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "m1c/plugin.h"
#include "../swiglu.h"
#include "../dense_cuda.cuh"

typedef struct dense {
    const m1c_host *h;
    int H, F;
    int device, cdt; /* m1c_device; compute dtype (CUDA only: the CPU is f32 throughout) */
} dense;

enum { P_GATE, P_UP, P_DOWN, N_PARAMS };
/* (N, 2F) gate pre-activations in columns [0, F), up in [F, 2F); (N, F) SwiGLU activation, kept so
 * that backward does not recompute it. */
enum { A_GU, A_ACT, N_ACTS };
enum { S_DGU, N_SCRATCH }; /* (N, 2F) d gate/up; d act first goes in the up half */
/* CUDA adds: (N, F) f32 d act; BF16 also (N, H) bf16 copies of the input and of dout (GEMM operands). */
enum { S_DACT = N_SCRATCH, S_XLP, S_DOLP, N_SCRATCH_CUDA };

/* Threads for elementwise work over `work` floats: one below a size where waking a team costs more
 * than it saves (tiny batches, finite-difference tests on a busy machine). */
static int n_threads(const dense *m, int64_t work) {
    if (work < (1 << 15)) return 1;
    int t = m->h->cpu_threads ? m->h->cpu_threads(m->h) : 0;
#ifdef _OPENMP
    if (t <= 0) t = omp_get_max_threads();
#endif
    return t > 0 ? t : 1;
}

static int dense_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    int64_t F;
#ifdef M1C_HAVE_CUDA
    if (info->device != M1C_DEVICE_CPU && info->device != M1C_DEVICE_CUDA)
        return h->error(h, "dense: device %d is not supported (CPU or CUDA)", info->device);
    if (info->device == M1C_DEVICE_CUDA && info->compute_dtype != M1C_F32 && info->compute_dtype != M1C_BF16)
        return h->error(h, "dense: compute dtype %d is not supported on CUDA (F32 or BF16)", info->compute_dtype);
#else
    if (info->device != M1C_DEVICE_CPU)
        return h->error(h, "dense: only the CPU device is supported by this build (built without CUDA)");
#endif
    if (info->hidden <= 0) return h->error(h, "dense: hidden size %d must be positive", info->hidden);
    if (h->get_int(h, s, "ffn_dim", 4 * (int64_t)info->hidden, 1, 1 << 20, &F) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    dense *m = calloc(1, sizeof(*m));
    if (!m) return h->error(h, "dense: out of memory");
    m->h = h;
    m->H = info->hidden;
    m->F = (int)F;
    m->device = info->device;
    m->cdt = info->device == M1C_DEVICE_CUDA ? info->compute_dtype : M1C_F32;
    *self = m;
    return M1C_OK;
}

static void dense_destroy(void *self) { free(self); }

/* f32 by default: callers set another dtype for CUDA buffers */
static m1c_buf_spec spec(const char *name, int64_t d0, int64_t d1) { return m1c_make_spec(name, M1C_F32, 2, d0, d1, 0, 0); }

static int put_specs(const dense *m, const m1c_buf_spec *s, int n, m1c_buf_spec *out, int max) {
    return m1c_put_specs(m->h, "dense", s, n, out, max);
}

static int dense_params(void *self, m1c_buf_spec *specs, int max) {
    dense *m = self;
    m1c_buf_spec s[N_PARAMS] = {
        spec("mlp.gate_proj.weight", m->F, m->H), /* (F, H) */
        spec("mlp.up_proj.weight", m->F, m->H),   /* (F, H) */
        spec("mlp.down_proj.weight", m->H, m->F), /* (H, F) */
    };
    return put_specs(m, s, N_PARAMS, specs, max);
}

static int dense_acts(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    dense *m = self;
    m1c_buf_spec s[N_ACTS] = {spec("mlp.gate_up", (int64_t)B * T, 2 * (int64_t)m->F),
                              spec("mlp.act", (int64_t)B * T, m->F)};
    s[A_GU].dtype = s[A_ACT].dtype = m->cdt;
    return put_specs(m, s, N_ACTS, specs, max);
}

static int dense_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    dense *m = self;
    m1c_buf_spec s[N_SCRATCH_CUDA] = {spec("mlp.d_gate_up", (int64_t)B * T, 2 * (int64_t)m->F),
                                      spec("mlp.d_act", (int64_t)B * T, m->F),
                                      spec("mlp.x_lp", (int64_t)B * T, m->H),
                                      spec("mlp.d_out_lp", (int64_t)B * T, m->H)};
    if (m->device != M1C_DEVICE_CUDA) return put_specs(m, s, N_SCRATCH, specs, max);
    s[S_DGU].dtype = s[S_XLP].dtype = s[S_DOLP].dtype = m->cdt;
    return put_specs(m, s, m->cdt == M1C_BF16 ? N_SCRATCH_CUDA : S_DACT + 1, specs, max);
}

static int check_bufs(const dense *m, const m1c_layer_bufs *b, int64_t N, int need_grads) {
    const m1c_host *h = m->h;
    if (!b || !b->params || !b->acts || !b->scratch)
        return h->error(h, "dense: parameters, activations and scratch buffers are all required");
    if (need_grads && !b->grads) return h->error(h, "dense: backward needs gradient buffers");
    if (b->acts[A_GU].shape[0] < N || b->scratch[S_DGU].shape[0] < N)
        return h->error(h, "dense: %lld tokens but the buffers were declared for %lld", (long long)N,
                        (long long)b->acts[A_GU].shape[0]);
    return M1C_OK;
}

#ifdef M1C_HAVE_CUDA
/* The CUDA call's arguments: sizes and this call's buffers (grads only for backward). */
static int cuda_args(const dense *m, const m1c_layer_bufs *b, int N, int backward, dense_cuda_args *a) {
    const m1c_host *h = m->h;
    if (m->cdt == M1C_BF16 && !b->params_lp) return h->error(h, "dense: compute dtype BF16 needs params_lp");
    const m1c_tensor *P = m->cdt == M1C_BF16 ? b->params_lp : b->params;
    memset(a, 0, sizeof(*a));
    a->h = h;
    a->stream = b->stream;
    a->N = N, a->H = m->H, a->F = m->F, a->cdt = m->cdt;
    a->Wg = P[P_GATE].data, a->Wu = P[P_UP].data, a->Wd = P[P_DOWN].data;
    if (backward) a->dWg = b->grads[P_GATE].data, a->dWu = b->grads[P_UP].data, a->dWd = b->grads[P_DOWN].data;
    a->gu = b->acts[A_GU].data, a->act = b->acts[A_ACT].data;
    a->dgu = b->scratch[S_DGU].data, a->dact = b->scratch[S_DACT].data;
    if (m->cdt == M1C_BF16) a->x_lp = b->scratch[S_XLP].data, a->dout_lp = b->scratch[S_DOLP].data;
    return M1C_OK;
}
#endif

static int dense_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    dense *m = self;
    const m1c_host *h = m->h;
    const int H = m->H, F = m->F, N = B * T;
    if (check_bufs(m, b, N, 0) != M1C_OK) return M1C_ERR;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) {
        dense_cuda_args a;
        if (cuda_args(m, b, N, 0, &a) != M1C_OK) return M1C_ERR;
        return dense_cuda_forward(&a, out, in);
    }
#endif
    const float *Wg = b->params[P_GATE].data, *Wu = b->params[P_UP].data, *Wd = b->params[P_DOWN].data;
    float *GU = b->acts[A_GU].data, *act = b->acts[A_ACT].data;
    const int nt = n_threads(m, (int64_t)N * F);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, N, F, H, 1.0f, in, H, Wg, H, 0.0f, GU, 2 * F);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, N, F, H, 1.0f, in, H, Wu, H, 0.0f, GU + F, 2 * F);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++)
        swiglu_row(act + (int64_t)n * F, GU + (int64_t)n * 2 * F, GU + (int64_t)n * 2 * F + F, F);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, N, H, F, 1.0f, act, F, Wd, F, 0.0f, out, H);
    return M1C_OK;
}

static int dense_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in, int B,
                          int T) {
    dense *m = self;
    const m1c_host *h = m->h;
    const int H = m->H, F = m->F, N = B * T, nt = n_threads(m, (int64_t)N * F);
    if (check_bufs(m, b, N, 1) != M1C_OK) return M1C_ERR;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) {
        dense_cuda_args a;
        if (cuda_args(m, b, N, 1, &a) != M1C_OK) return M1C_ERR;
        return dense_cuda_backward(&a, din, dout, in);
    }
#endif
    const float *Wg = b->params[P_GATE].data, *Wu = b->params[P_UP].data, *Wd = b->params[P_DOWN].data;
    float *dWg = b->grads[P_GATE].data, *dWu = b->grads[P_UP].data, *dWd = b->grads[P_DOWN].data;
    const float *GU = b->acts[A_GU].data, *act = b->acts[A_ACT].data;
    float *dgu = b->scratch[S_DGU].data;
    h->gemm(h, M1C_DEVICE_CPU, 1, 0, H, F, N, 1.0f, dout, H, act, F, 1.0f, dWd, F);         /* dWd += dout^T A */
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, N, F, H, 1.0f, dout, H, Wd, F, 0.0f, dgu + F, 2 * F); /* dA = dout Wd */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *g = GU + (int64_t)n * 2 * F;
        float *dg = dgu + (int64_t)n * 2 * F;
        swiglu_back_row(dg, dg + F, g, g + F, F);
    }
    h->gemm(h, M1C_DEVICE_CPU, 1, 0, F, H, N, 1.0f, dgu, 2 * F, in, H, 1.0f, dWg, H);
    h->gemm(h, M1C_DEVICE_CPU, 1, 0, F, H, N, 1.0f, dgu + F, 2 * F, in, H, 1.0f, dWu, H);
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, N, H, F, 1.0f, dgu, 2 * F, Wg, H, 1.0f, din, H);
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, N, H, F, 1.0f, dgu + F, 2 * F, Wu, H, 1.0f, din, H);
    return M1C_OK;
}

static int dense_stats(void *self, const m1c_layer_bufs *b, m1c_moe_stats *out) {
    (void)self;
    (void)b;
    memset(out, 0, sizeof(*out)); /* no router: no aux loss, no assignments, no experts */
    return M1C_OK;
}

static int dense_count(void *self, int64_t *total_params, int64_t *active_params, double *flops_per_token) {
    dense *m = self;
    const int64_t H = m->H, F = m->F;
    if (total_params) *total_params = 3 * F * H;
    if (active_params) *active_params = 3 * F * H;
    if (flops_per_token) *flops_per_token = 6.0 * H * F + 4.0 * F; /* three GEMMs, then SwiGLU */
    return M1C_OK;
}

static const m1c_moe_vtable dense_vtable = {
    .size = sizeof(m1c_moe_vtable),
    .ops = {dense_create, dense_destroy, dense_params, dense_acts, dense_scratch, dense_forward, dense_backward},
    .stats = dense_stats,
    .count = dense_count,
};

M1C_PLUGIN(MOE, moe, dense_vtable, "dense", "0.1.0", "dense SwiGLU feed-forward in the MoE slot (CPU, CUDA)", "MIT")
