/* topk: the top-k routed mixture-of-experts feed-forward of MiniMax-M1 (MODEL.md "MoE feed-forward"),
 * CPU reference: FP32 softmax router, renormalised top-k, SwiGLU experts, Switch load-balancing loss.
 *
 * Forward for N = B*T tokens x (N, H):
 *   xr = x * noise                    noise ~ U(1-j, 1+j) per element, training only (router input only)
 *   p  = softmax(xr Wr^T)             FP32 over all E experts
 *   top-k of p (ties: the lower expert index wins); w = p_sel / sum(p_sel) if normalize, else p_sel
 *   capacity (capacity_factor cf > 0): each expert keeps at most ceil(cf * N * k / E) assignments, taken in
 *     token order; an over-capacity assignment is dropped: the token gets nothing from that expert and its
 *     remaining weights are NOT renormalised (the dropped weight is simply lost, as in Switch/GShard)
 *   out[n] = sum_{kept j} w[n,j] * Down_e(silu(Gate_e x_n) * Up_e x_n),  e = expert of slot j
 *   aux = aux_coef * E * sum_e f_e P_e,  f_e = share of the N*k routed assignments (before capacity
 *     dropping) that went to e (a constant: no gradient), P_e = mean router probability of e
 * Backward is exact (through the renormalisation, the softmax, the aux loss and the jitter); the aux loss
 * enters the objective with weight bufs->aux_scale (stats().aux_loss is aux itself, before that weight).
 *
 * Tokens are permuted by expert (a stable counting sort, so rows stay in token order inside an expert),
 * gathered, and each expert runs two big GEMMs through h->gemm; elementwise work uses OpenMP. Forward
 * keeps the gathered rows and the SwiGLU activation, so backward neither gathers nor recomputes: the
 * GEMMs are separated by three elementwise passes in backward and three in forward.
 * Device CUDA (built with CUDA): the same math in topk.cu; this file declares its buffers (expert rows,
 * the expert outputs, GEMM operands and the d SwiGLU output in the compute dtype: topk.cu's header says
 * which are bf16 in BF16 and why) and hands it the pointers. The setting expert_gemm picks how CUDA
 * runs the BF16 expert GEMMs:
 *   "cublas": one cuBLASLt product per expert, all of a step in one h->gemm_group call that runs them
 *     concurrently. It needs the expert offsets on the host: one asynchronous copy per forward, waited
 *     for after the gather is queued, reused by its backward.
 *   "auto" (default): on an sm_90a device topk's Hopper kernels: one launch per forward product for all
 *     experts, reading the offsets on the device (the forward never waits for the host), and one per
 *     pair of backward products (a row product with a weight gradient), which uses the offsets the
 *     forward copied meanwhile; "cublas" elsewhere (and past 32 experts for the backward).
 *   "grouped": one portable tensor-core kernel per product reading the offsets on the device, forward
 *     and backward: no host wait, but slower GEMMs than cuBLAS on large experts.
 * F32 always uses the per-expert calls; the CPU ignores the setting. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "m1c/plugin.h"
#include "../swiglu.h"
#include "../topk_route.h"
#include "../topk_cuda.cuh" /* the A_STATS / A_COUNTS layouts, and the CUDA entry points */

/* expert_gemm: the CUDA path's BF16 expert GEMMs (see the file header). */
static const char *const expert_gemm_choices[] = {"auto", "cublas", "grouped", NULL};

typedef struct topk {
    const m1c_host *h;
    int H, E, k, F;
    double aux_coef, jitter, capacity_factor;
    int normalize;
    int grouped;               /* expert_gemm = "grouped" */
    void *xw_enc;              /* CUDA, "auto" on sm_90a: the Hopper kernels' map encoder, else NULL */
    int xw_grid;               /* CUDA, with xw_enc: their persistent grid */
    int *xw_ctr;               /* CUDA, with xw_enc: their tile counter (device) */
    int device, cdt;           /* m1c_device; compute dtype (CUDA only: the CPU is f32 throughout) */
    int32_t *h_off, *h_cnt;    /* CUDA: host copies of the offsets (E+1) and counts (2+2E), pinned */
    void *copied;              /* CUDA: the stream and events of their copy (topk_cuda_host_tables) */
    m1c_gemm_desc *queue;      /* CUDA: 2E expert products for one gemm_group call */
    const void *h_src;         /* CUDA: the device offsets they were copied from (topk_cuda_args.h_src) */
    float *h_st;               /* CUDA: host copy of the stats (ST_F+2E), pinned, for stats() */
} topk;

/* Parameters, in declaration order (HF 5.x names and layouts). */
enum { P_ROUTER, P_GATE_UP, P_DOWN, N_PARAMS };
/* Activations kept for backward; A_NOISE only when jitter > 0. */
enum { A_PROBS, A_IDX, A_W, A_POS, A_ROWTOK, A_OFF, A_COUNTS, A_STATS, A_XS, A_GU, A_ACT, A_Y, A_NOISE };
/* Per-call scratch; S_XR only when jitter > 0 (CPU), always on CUDA, which adds S_DACT and, for BF16,
 * S_DY_LP (then the bf16 d rows and d x rows; S_DY is only scratch for partial sums: topk.cu). */
enum { S_DGU, S_DY, S_DLOG, S_DW, S_XR, S_DACT, S_DY_LP };
/* Up to this many experts backward adds the router's input gradient (dlogits @ Wr, E terms per
 * element) inside the un-permute pass; beyond it a GEMM does it better. */
enum { FUSE_ROUTER_MAX_E = 32 };

/* Threads for elementwise work over `work` floats: one below a size where waking a team costs more
 * than it saves (tiny batches, finite-difference tests on a busy machine). */
static int n_threads(const topk *m, int64_t work) {
    if (work < (1 << 15)) return 1;
    int t = m->h->cpu_threads ? m->h->cpu_threads(m->h) : 0;
#ifdef _OPENMP
    if (t <= 0) t = omp_get_max_threads();
#endif
    return t > 0 ? t : 1;
}

/* ---- creation and declarations ---------------------------------------------------------------- */

static void topk_destroy(void *self);

static int topk_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    int64_t E, k, F;
    double aux, jit, cf;
    int norm;
    const char *gemm;
#ifdef M1C_HAVE_CUDA
    if (info->device != M1C_DEVICE_CPU && info->device != M1C_DEVICE_CUDA)
        return h->error(h, "topk: device %d is not supported (CPU or CUDA)", info->device);
    if (info->device == M1C_DEVICE_CUDA && info->compute_dtype != M1C_F32 && info->compute_dtype != M1C_BF16)
        return h->error(h, "topk: compute dtype %d is not supported on CUDA (F32 or BF16)", info->compute_dtype);
#else
    if (info->device != M1C_DEVICE_CPU)
        return h->error(h, "topk: only the CPU device is supported by this build (built without CUDA)");
#endif
    if (h->get_int(h, s, "experts", 8, 1, 4096, &E) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "top_k", 2, 1, 4096, &k) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "ffn_dim", 4 * (int64_t)info->hidden, 1, 1 << 20, &F) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "aux_coef", 0.001, 0.0, 1e6, &aux) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "jitter", 0.0, 0.0, 1.0, &jit) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "capacity_factor", 0.0, 0.0, 1e6, &cf) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "normalize", 1, &norm) != M1C_OK) return M1C_ERR;
    /* "auto", "cublas" or "grouped" (the file header says what each runs). Read on every device so that
     * one config serves the CPU and CUDA; F32 and the CPU ignore it. */
    if (h->get_string(h, s, "expert_gemm", "auto", expert_gemm_choices, &gemm) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    if (k > E) return h->error(h, "top_k: %lld is larger than experts = %lld", (long long)k, (long long)E);
    if (info->device == M1C_DEVICE_CUDA && E > TOPK_CUDA_MAX_E)
        return h->settings_error(h, s, "experts", "%lld experts: the CUDA path takes at most %d", (long long)E,
                                 (int)TOPK_CUDA_MAX_E);
    if (info->hidden <= 0) return h->error(h, "topk: hidden size %d must be positive", info->hidden);
    topk *m = calloc(1, sizeof(*m));
    if (!m) return h->error(h, "topk: out of memory");
    m->h = h;
    m->H = info->hidden;
    m->E = (int)E;
    m->k = (int)k;
    m->F = (int)F;
    m->aux_coef = aux;
    m->jitter = jit;
    m->capacity_factor = cf;
    m->normalize = norm;
    m->grouped = strcmp(gemm, "grouped") == 0;
    m->device = info->device;
    m->cdt = info->device == M1C_DEVICE_CUDA ? info->compute_dtype : M1C_F32;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) {
        m->queue = calloc(2 * (size_t)E, sizeof *m->queue);
        int rc = m->queue ? M1C_OK : h->error(h, "topk: out of memory");
        if (!rc) rc = topk_cuda_host_tables(h, (int)E, &m->h_off, &m->copied);
        if (!rc) m->h_cnt = m->h_off + E + 1, m->h_st = (float *)(void *)(m->h_cnt + 2 + 2 * E);
        if (!rc && m->grouped && m->cdt == M1C_BF16) rc = topk_cuda_setup_grouped(h);
        if (!rc && strcmp(gemm, "auto") == 0 && m->cdt == M1C_BF16)
            rc = topk_cuda_setup_xw(h, &m->xw_enc, &m->xw_grid, &m->xw_ctr);
        if (rc) {
            topk_destroy(m);
            return M1C_ERR;
        }
    }
#endif
    *self = m;
    return M1C_OK;
}

static void topk_destroy(void *self) {
    topk *m = self;
    if (!m) return;
#ifdef M1C_HAVE_CUDA
    if (m->h_off) topk_cuda_host_tables_free(m->h_off, m->copied);
    if (m->xw_ctr) topk_cuda_free_xw(m->xw_ctr);
#endif
    free(m->queue);
    free(m);
}

static m1c_buf_spec spec(const char *name, int dtype, int ndim, int64_t d0, int64_t d1, int64_t d2) {
    return m1c_make_spec(name, dtype, ndim, d0, d1, d2, 0);
}

static int put_specs(const topk *m, const m1c_buf_spec *s, int n, m1c_buf_spec *out, int max) {
    return m1c_put_specs(m->h, "topk", s, n, out, max);
}

static int topk_params(void *self, m1c_buf_spec *specs, int max) {
    topk *m = self;
    m1c_buf_spec s[N_PARAMS] = {
        spec("mlp.gate.weight", M1C_F32, 2, m->E, m->H, 0),                     /* (E, H) router */
        spec("mlp.experts.gate_up_proj", M1C_F32, 3, m->E, 2 * (int64_t)m->F, m->H), /* (E, 2F, H) */
        spec("mlp.experts.down_proj", M1C_F32, 3, m->E, m->H, m->F),            /* (E, H, F) */
    };
    /* The experts' gradients honour M1C_TENSOR_UNSET: the Hopper kernels store their tiles, every other
     * path zeroes the gradient first (topk_backward, topk.cu's backward). */
    s[P_GATE_UP].grad_written = s[P_DOWN].grad_written = 1;
    /* The router's logits from the core's norm where it makes them (ABI 1.4: the CUDA path uses them;
     * with jitter the router reads a noisy copy of the input instead). */
    s[P_ROUTER].in_proj = m->jitter == 0;
    return put_specs(m, s, N_PARAMS, specs, max);
}

static int topk_acts(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    topk *m = self;
    int64_t N = (int64_t)B * T, Nk = N * m->k;
    m1c_buf_spec s[] = {
        spec("moe.probs", M1C_F32, 2, N, m->E, 0),          /* (N, E) router softmax */
        spec("moe.topk_idx", M1C_I32, 2, N, m->k, 0),       /* (N, k) chosen experts, best first */
        spec("moe.topk_w", M1C_F32, 2, N, m->k, 0),         /* (N, k) combine weights */
        spec("moe.pos", M1C_I32, 2, N, m->k, 0),            /* (N, k) permuted row, -1 if dropped */
        spec("moe.row_token", M1C_I32, 1, Nk, 0, 0),        /* (N*k) token of each permuted row */
        spec("moe.offsets", M1C_I32, 1, m->E + 1, 0, 0),    /* (E+1) first permuted row per expert */
        spec("moe.counts", M1C_I32, 1, 2 + 2 * (int64_t)m->E, 0, 0), /* see C_* */
        spec("moe.stats", M1C_F32, 1, ST_F + 2 * (int64_t)m->E, 0, 0),  /* see ST_* */
        spec("moe.x_perm", m->cdt, 2, Nk, m->H, 0),         /* (N*k, H) inputs gathered by expert */
        spec("moe.gate_up", m->cdt, 2, Nk, 2 * (int64_t)m->F, 0), /* (N*k, 2F) expert pre-activations */
        spec("moe.act", m->cdt, 2, Nk, m->F, 0),            /* (N*k, F) silu(gate) * up */
        spec("moe.expert_out", m->cdt, 2, Nk, m->H, 0),     /* (N*k, H) expert outputs, unweighted */
        spec("moe.jitter", M1C_F32, 2, N, m->H, 0),         /* (N, H) router input noise */
    };
    return put_specs(m, s, m->jitter > 0 ? A_NOISE + 1 : A_NOISE, specs, max);
}

static int topk_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    topk *m = self;
    int64_t N = (int64_t)B * T, Nk = N * m->k;
    m1c_buf_spec s[] = {
        spec("moe.d_gate_up", m->cdt, 2, Nk, 2 * (int64_t)m->F, 0), /* (N*k, 2F); CPU: d act first goes in the up half */
        spec("moe.d_rows", M1C_F32, 2, Nk, m->H, 0),           /* (N*k, H) d expert out, then d x rows */
        spec("moe.d_logits", M1C_F32, 2, N, m->E, 0),          /* (N, E) */
        spec("moe.d_w", M1C_F32, 2, N, m->k, 0),               /* (N, k) d combine weights */
        spec("moe.x_router", M1C_F32, 2, N, m->H, 0),          /* (N, H) jittered router input */
        spec("moe.d_act", m->cdt, 2, Nk, m->F, 0),             /* CUDA: (N*k, F) d SwiGLU output */
        spec("moe.d_rows_lp", M1C_BF16, 2, Nk, m->H, 0),       /* CUDA BF16: (N*k, H) d expert out, d x rows */
    };
    if (m->device == M1C_DEVICE_CUDA) return put_specs(m, s, m->cdt == M1C_BF16 ? S_DY_LP + 1 : S_DACT + 1, specs, max);
    return put_specs(m, s, m->jitter > 0 ? S_XR + 1 : S_XR, specs, max);
}

/* The buffers are those declared for at least N tokens. */
static int check_bufs(const topk *m, const m1c_layer_bufs *b, int64_t N, int need_grads) {
    const m1c_host *h = m->h;
    if (!b || !b->params || !b->acts || !b->scratch)
        return h->error(h, "topk: parameters, activations and scratch buffers are all required");
    if (need_grads && !b->grads) return h->error(h, "topk: backward needs gradient buffers");
    if (b->acts[A_PROBS].shape[0] < N || b->scratch[S_DY].shape[0] < N * m->k)
        return h->error(h, "topk: %lld tokens but the buffers were declared for %lld", (long long)N,
                        (long long)b->acts[A_PROBS].shape[0]);
    return M1C_OK;
}

#ifdef M1C_HAVE_CUDA
/* The CUDA call's arguments: sizes, settings and this call's buffers (grads only for backward). */
static int cuda_args(topk *m, const m1c_layer_bufs *b, int N, int backward, topk_cuda_args *a) {
    const m1c_host *h = m->h;
    if (m->cdt == M1C_BF16 && !b->params_lp) return h->error(h, "topk: compute dtype BF16 needs params_lp");
    const m1c_tensor *P = m->cdt == M1C_BF16 ? b->params_lp : b->params;
    memset(a, 0, sizeof(*a));
    a->h = h;
    a->stream = b->stream;
    a->N = N, a->H = m->H, a->E = m->E, a->k = m->k, a->F = m->F, a->cdt = m->cdt;
    a->normalize = m->normalize, a->training = b->training, a->grouped = m->grouped;
    a->xw_enc = m->xw_enc, a->xw_grid = m->xw_grid, a->xw_ctr = m->xw_ctr;
    a->cap = m->capacity_factor > 0 ? (int64_t)ceil(m->capacity_factor * N * m->k / m->E) : INT64_MAX;
    a->aux_coef = m->aux_coef, a->jitter = m->jitter, a->aux_scale = b->aux_scale, a->noise_seed = b->noise_seed;
    a->Wr = b->params[P_ROUTER].data; /* f32 always: the router stays FP32 */
    a->Wgu = P[P_GATE_UP].data;
    a->Wd = P[P_DOWN].data;
    if (backward) {
        a->dWr = b->grads[P_ROUTER].data, a->dWgu = b->grads[P_GATE_UP].data, a->dWd = b->grads[P_DOWN].data;
        a->dWgu_unset = (b->grads[P_GATE_UP].flags & M1C_TENSOR_UNSET) != 0;
        a->dWd_unset = (b->grads[P_DOWN].flags & M1C_TENSOR_UNSET) != 0;
    }
    a->probs = b->acts[A_PROBS].data, a->idx = b->acts[A_IDX].data, a->w = b->acts[A_W].data;
    a->pos = b->acts[A_POS].data, a->rowtok = b->acts[A_ROWTOK].data, a->off = b->acts[A_OFF].data;
    a->cnt = b->acts[A_COUNTS].data, a->st = b->acts[A_STATS].data;
    a->xs = b->acts[A_XS].data, a->gu = b->acts[A_GU].data, a->act = b->acts[A_ACT].data, a->Y = b->acts[A_Y].data;
    a->noise = m->jitter > 0 ? b->acts[A_NOISE].data : NULL;
    a->in_lp = b->in_lp;
    a->in_proj = b->in_proj;
    a->out_rows = backward ? NULL : b->out_rows;
    a->dgu = b->scratch[S_DGU].data, a->drow = b->scratch[S_DY].data, a->dlog = b->scratch[S_DLOG].data;
    a->dw = b->scratch[S_DW].data, a->xr = b->scratch[S_XR].data, a->dact = b->scratch[S_DACT].data;
    a->dy_lp = m->cdt == M1C_BF16 ? b->scratch[S_DY_LP].data : NULL;
    a->h_off = m->h_off, a->h_cnt = m->h_cnt, a->h_st = m->h_st, a->h_src = &m->h_src, a->copied = m->copied;
    a->queue = m->queue;
    return M1C_OK;
}
#endif

/* ---- forward ---------------------------------------------------------------------------------- */

static int topk_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    topk *m = self;
    const m1c_host *h = m->h;
    const int H = m->H, E = m->E, k = m->k, F = m->F, N = B * T, nt = n_threads(m, (int64_t)N * k * F);
    if (check_bufs(m, b, N, 0) != M1C_OK) return M1C_ERR;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) {
        topk_cuda_args a;
        if (cuda_args(m, b, N, 0, &a) != M1C_OK) return M1C_ERR;
        return topk_cuda_forward(&a, out, in);
    }
#endif
    const float *Wr = b->params[P_ROUTER].data;   /* (E, H) */
    const float *Wgu = b->params[P_GATE_UP].data; /* (E, 2F, H) */
    const float *Wd = b->params[P_DOWN].data;     /* (E, H, F) */
    float *probs = b->acts[A_PROBS].data;         /* (N, E) */
    int32_t *idx = b->acts[A_IDX].data;           /* (N, k) */
    float *w = b->acts[A_W].data;                 /* (N, k) */
    int32_t *pos = b->acts[A_POS].data;           /* (N, k) */
    int32_t *rowtok = b->acts[A_ROWTOK].data;     /* (N*k) */
    int32_t *off = b->acts[A_OFF].data;           /* (E+1) */
    int32_t *cnt = b->acts[A_COUNTS].data;        /* (2+2E) */
    float *st = b->acts[A_STATS].data;            /* (ST_F+2E) */
    float *GU = b->acts[A_GU].data;               /* (N*k, 2F) */
    float *Y = b->acts[A_Y].data;                 /* (N*k, H) */
    float *xs = b->acts[A_XS].data;               /* (N*k, H) */
    float *act = b->acts[A_ACT].data;             /* (N*k, F) */

    /* Jitter on the router input only; each token draws from its own stream of noise_seed so the
     * noise is the same whatever the thread count. */
    const float *xr = in;
    const int jit = m->jitter > 0 && b->training;
    if (jit) {
        float *noise = b->acts[A_NOISE].data, *xj = b->scratch[S_XR].data;
        const float j = (float)m->jitter;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int n = 0; n < N; n++) {
            m1c_rng r;
            h->rng_seed(&r, b->noise_seed, (uint64_t)n);
            for (int i = 0; i < H; i++) {
                float z = 1.0f + j * (2.0f * h->rng_uniform(&r) - 1.0f);
                noise[(int64_t)n * H + i] = z;
                xj[(int64_t)n * H + i] = in[(int64_t)n * H + i] * z;
            }
        }
        xr = xj;
    }

    /* Router: logits into probs, then softmax and top-k per token in place. */
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, N, E, H, 1.0f, xr, H, Wr, H, 0.0f, probs, E);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++)
        topk_route_token(probs + (int64_t)n * E, idx + (int64_t)n * k, w + (int64_t)n * k, E, k, m->normalize);

    /* Capacity and the counting sort, in token order (sequential: O(N*k) integer work). */
    int32_t *routed = cnt + C_ROUTED, *cursor = cnt + C_ROUTED + E;
    const int64_t cap = m->capacity_factor > 0 ? (int64_t)ceil(m->capacity_factor * N * k / E) : INT64_MAX;
    int32_t dropped = 0;
    for (int e = 0; e <= E; e++) off[e] = 0;
    for (int e = 0; e < E; e++) routed[e] = 0;
    for (int64_t a = 0; a < (int64_t)N * k; a++) {
        int e = idx[a];
        routed[e]++;
        if (off[e + 1] < cap) {
            off[e + 1]++;
            pos[a] = 0;
        } else {
            pos[a] = -1;
            dropped++;
        }
    }
    for (int e = 0; e < E; e++) off[e + 1] += off[e];
    for (int e = 0; e < E; e++) cursor[e] = off[e];
    for (int64_t a = 0; a < (int64_t)N * k; a++) {
        if (pos[a] < 0) continue;
        int r = cursor[idx[a]]++;
        pos[a] = r;
        rowtok[r] = (int32_t)(a / k);
    }
    cnt[C_DROPPED] = dropped;
    cnt[C_ASSIGN] = N * k;

    /* Aux loss: f_e from the routing decisions (before dropping), P_e the mean probability. */
    double aux = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int n = 0; n < N; n++) P += probs[(int64_t)n * E + e];
        P /= N;
        double f = (double)routed[e] / ((double)N * k);
        st[ST_F + e] = (float)f;
        st[ST_F + E + e] = (float)P;
        aux += f * P;
    }
    aux *= m->aux_coef * E;
    st[ST_AUX] = (float)aux;
    st[ST_AUX_LO] = (float)(aux - (double)st[ST_AUX]);
    st[ST_N] = (float)N;
    st[ST_JIT] = (float)jit;

    /* Experts: gather rows, gate/up GEMM, SwiGLU, down GEMM. */
    const int R = off[E];
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int r = 0; r < R; r++) memcpy(xs + (int64_t)r * H, in + (int64_t)rowtok[r] * H, (size_t)H * sizeof(float));
    for (int e = 0; e < E; e++) {
        int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        h->gemm(h, M1C_DEVICE_CPU, 0, 1, ne, 2 * F, H, 1.0f, xs + (int64_t)o * H, H, Wgu + (int64_t)e * 2 * F * H, H,
                0.0f, GU + (int64_t)o * 2 * F, 2 * F);
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int r = 0; r < R; r++)
        swiglu_row(act + (int64_t)r * F, GU + (int64_t)r * 2 * F, GU + (int64_t)r * 2 * F + F, F);
    for (int e = 0; e < E; e++) {
        int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        h->gemm(h, M1C_DEVICE_CPU, 0, 1, ne, H, F, 1.0f, act + (int64_t)o * F, F, Wd + (int64_t)e * H * F, F, 0.0f,
                Y + (int64_t)o * H, H);
    }

    /* Weighted combine, per token (no races, fixed summation order). */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = out + (int64_t)n * H;
        for (int i = 0; i < H; i++) o[i] = 0.0f;
        for (int j = 0; j < k; j++) {
            int r = pos[(int64_t)n * k + j];
            if (r < 0) continue;
            const float wj = w[(int64_t)n * k + j], *y = Y + (int64_t)r * H;
            for (int i = 0; i < H; i++) o[i] += wj * y[i];
        }
    }
    return M1C_OK;
}

/* ---- backward --------------------------------------------------------------------------------- */

static int topk_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in, int B,
                         int T) {
    topk *m = self;
    const m1c_host *h = m->h;
    const int H = m->H, E = m->E, k = m->k, F = m->F, N = B * T, nt = n_threads(m, (int64_t)N * k * F);
    if (check_bufs(m, b, N, 1) != M1C_OK) return M1C_ERR;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) {
        topk_cuda_args a;
        if (cuda_args(m, b, N, 1, &a) != M1C_OK) return M1C_ERR;
        return topk_cuda_backward(&a, din, dout, in);
    }
#endif
    const float *st = b->acts[A_STATS].data;
    const int32_t *cnt = b->acts[A_COUNTS].data;
    if (cnt[C_ASSIGN] != N * k)
        return h->error(h, "topk: backward for %d tokens after a forward of %d", N, (int)(cnt[C_ASSIGN] / k));
    const float *Wr = b->params[P_ROUTER].data;   /* (E, H) */
    const float *Wgu = b->params[P_GATE_UP].data; /* (E, 2F, H) */
    const float *Wd = b->params[P_DOWN].data;     /* (E, H, F) */
    float *dWr = b->grads[P_ROUTER].data, *dWgu = b->grads[P_GATE_UP].data, *dWd = b->grads[P_DOWN].data;
    if (b->grads[P_GATE_UP].flags & M1C_TENSOR_UNSET) memset(dWgu, 0, (size_t)E * 2 * F * H * sizeof *dWgu);
    if (b->grads[P_DOWN].flags & M1C_TENSOR_UNSET) memset(dWd, 0, (size_t)E * H * F * sizeof *dWd);
    const float *probs = b->acts[A_PROBS].data;   /* (N, E) */
    const float *w = b->acts[A_W].data;           /* (N, k) */
    const int32_t *idx = b->acts[A_IDX].data;     /* (N, k) */
    const int32_t *pos = b->acts[A_POS].data;     /* (N, k) */
    const int32_t *off = b->acts[A_OFF].data;     /* (E+1) */
    const float *xs = b->acts[A_XS].data;         /* (N*k, H) */
    const float *GU = b->acts[A_GU].data;         /* (N*k, 2F) */
    const float *act = b->acts[A_ACT].data;       /* (N*k, F) */
    const float *Y = b->acts[A_Y].data;           /* (N*k, H) */
    float *dgu = b->scratch[S_DGU].data;          /* (N*k, 2F) */
    float *drow = b->scratch[S_DY].data;          /* (N*k, H) */
    float *dlog = b->scratch[S_DLOG].data;        /* (N, E) */
    float *dw_all = b->scratch[S_DW].data;        /* (N, k) */
    const int jit = st[ST_JIT] != 0.0f, fuse_router = E <= FUSE_ROUTER_MAX_E;
    const float *noise = jit ? b->acts[A_NOISE].data : NULL;
    float *xj = jit ? b->scratch[S_XR].data : NULL;

    /* Router side: d weights -> d probs (renormalisation and aux loss) -> d logits; also the weighted
     * output gradient of every kept row. */
    const double aux_g = b->aux_scale * m->aux_coef * E / N; /* d (scale aux) / d p[n,e] = that * f_e */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *p = probs + (int64_t)n * E, *g = dout + (int64_t)n * H;
        const int32_t *id = idx + (int64_t)n * k, *ps = pos + (int64_t)n * k;
        const float *wn = w + (int64_t)n * k;
        float *dp = dlog + (int64_t)n * E, *dw = dw_all + (int64_t)n * k;
        for (int e = 0; e < E; e++) dp[e] = (float)(aux_g * st[ST_F + e]);
        double ssel = 0.0, sdw = 0.0;
        for (int j = 0; j < k; j++) ssel += p[id[j]];
        for (int j = 0; j < k; j++) {
            double d = 0.0;
            if (ps[j] >= 0) {
                const float *y = Y + (int64_t)ps[j] * H;
                float *dr = drow + (int64_t)ps[j] * H;
#pragma omp simd reduction(+ : d)
                for (int i = 0; i < H; i++) d += (double)g[i] * y[i];
                for (int i = 0; i < H; i++) dr[i] = wn[j] * g[i];
            }
            dw[j] = (float)d;
            sdw += d * wn[j];
        }
        /* w_j = p_j / S: dL/dp_i = (dw_i - sum_j dw_j w_j) / S for each selected i. */
        for (int j = 0; j < k; j++) dp[id[j]] += m->normalize ? (float)((dw[j] - sdw) / ssel) : dw[j];
        double s = 0.0;
        for (int e = 0; e < E; e++) s += (double)p[e] * dp[e];
        for (int e = 0; e < E; e++) dp[e] = p[e] * (float)(dp[e] - s);
    }

    /* dWd += dY^T A; d act = dY Wd, into the up half of d gate_up (the SwiGLU backward then works in
     * place, row by row). */
    for (int e = 0; e < E; e++) {
        int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, H, F, ne, 1.0f, drow + (int64_t)o * H, H, act + (int64_t)o * F, F, 1.0f,
                dWd + (int64_t)e * H * F, F);
        h->gemm(h, M1C_DEVICE_CPU, 0, 0, ne, F, H, 1.0f, drow + (int64_t)o * H, H, Wd + (int64_t)e * H * F, F, 0.0f,
                dgu + (int64_t)o * 2 * F + F, 2 * F);
    }
    const int R = off[E];
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *g = GU + (int64_t)r * 2 * F;
        float *dg = dgu + (int64_t)r * 2 * F;
        swiglu_back_row(dg, dg + F, g, g + F, F);
    }
    /* dWgu += dGU^T X; then d x rows = dGU Wgu (into drow, whose dY is no longer needed). */
    for (int e = 0; e < E; e++) {
        int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, 2 * F, H, ne, 1.0f, dgu + (int64_t)o * 2 * F, 2 * F, xs + (int64_t)o * H, H,
                1.0f, dWgu + (int64_t)e * 2 * F * H, H);
        h->gemm(h, M1C_DEVICE_CPU, 0, 0, ne, H, 2 * F, 1.0f, dgu + (int64_t)o * 2 * F, 2 * F,
                Wgu + (int64_t)e * 2 * F * H, H, 0.0f, drow + (int64_t)o * H, H);
    }

    /* Per token (no races): sum its expert rows back (un-permute); add the gradient through the router,
     * (dlogits @ Wr) times the jitter noise when there was any (few experts: E terms per element here);
     * with jitter, also form the router input x * noise for dWr. */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = 0; n < N; n++) {
        float *dx = din + (int64_t)n * H;
        for (int j = 0; j < k; j++) {
            int r = pos[(int64_t)n * k + j];
            if (r < 0) continue;
            const float *d = drow + (int64_t)r * H;
            for (int i = 0; i < H; i++) dx[i] += d[i];
        }
        const float *dl = dlog + (int64_t)n * E;
        if (jit) {
            const float *z = noise + (int64_t)n * H, *x = in + (int64_t)n * H;
            float *xr = xj + (int64_t)n * H;
            for (int i = 0; i < H; i++) xr[i] = x[i] * z[i];
            if (fuse_router)
                for (int e = 0; e < E; e++) {
                    const float *wr = Wr + (int64_t)e * H;
                    for (int i = 0; i < H; i++) dx[i] += z[i] * (dl[e] * wr[i]);
                }
        } else if (fuse_router) {
            for (int e = 0; e < E; e++) {
                const float *wr = Wr + (int64_t)e * H;
                for (int i = 0; i < H; i++) dx[i] += dl[e] * wr[i];
            }
        }
    }
    /* Router weights: dWr += dlogits^T (router input). */
    h->gemm(h, M1C_DEVICE_CPU, 1, 0, E, H, N, 1.0f, dlog, E, jit ? xj : in, H, 1.0f, dWr, H);
    if (!fuse_router) {
        if (jit) { /* xj is free again: (dlogits @ Wr) there, then times the noise */
            h->gemm(h, M1C_DEVICE_CPU, 0, 0, N, H, E, 1.0f, dlog, E, Wr, H, 0.0f, xj, H);
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t i = 0; i < (int64_t)N * H; i++) din[i] += xj[i] * noise[i];
        } else {
            h->gemm(h, M1C_DEVICE_CPU, 0, 0, N, H, E, 1.0f, dlog, E, Wr, H, 1.0f, din, H);
        }
    }
    return M1C_OK;
}

/* ---- statistics and counts -------------------------------------------------------------------- */

static int topk_stats(void *self, const m1c_layer_bufs *b, m1c_moe_stats *out) {
    topk *m = self;
    if (!b || !b->acts) return m->h->error(m->h, "topk: stats needs the activation buffers of the forward");
    const int32_t *cnt = b->acts[A_COUNTS].data;
    float *st = b->acts[A_STATS].data;
#ifdef M1C_HAVE_CUDA
    if (m->device == M1C_DEVICE_CUDA) { /* the copies of this instance's last forward (the model asks right
                                         * after each): expert_load points into m->h_st */
        if (topk_cuda_wait(m->h, m->copied) != M1C_OK) return M1C_ERR;
        cnt = m->h_cnt;
        st = m->h_st;
    }
#endif
    memset(out, 0, sizeof(*out));
    out->aux_loss = (double)st[ST_AUX] + (double)st[ST_AUX_LO];
    out->dropped = cnt[C_DROPPED];
    out->assignments = cnt[C_ASSIGN];
    out->expert_load = st + ST_F; /* in the activations (CPU) or m->h_st (CUDA): valid until the next forward */
    out->n_experts = m->E;
    return M1C_OK;
}

static int topk_count(void *self, int64_t *total_params, int64_t *active_params, double *flops_per_token) {
    topk *m = self;
    const int64_t H = m->H, E = m->E, k = m->k, F = m->F;
    if (total_params) *total_params = E * H + E * 3 * F * H;
    if (active_params) *active_params = E * H + k * 3 * F * H;
    /* Router GEMM, then per chosen expert: gate/up (2*H*2F), down (2*F*H), SwiGLU and combine. */
    if (flops_per_token) *flops_per_token = 2.0 * H * E + (double)k * (6.0 * H * F + 4.0 * F + 2.0 * H);
    return M1C_OK;
}

static const m1c_moe_vtable topk_vtable = {
    .size = sizeof(m1c_moe_vtable),
    .ops = {topk_create, topk_destroy, topk_params, topk_acts, topk_scratch, topk_forward, topk_backward},
    .stats = topk_stats,
    .count = topk_count,
};

M1C_PLUGIN(MOE, moe, topk_vtable, "topk", "0.1.0", "top-k routed SwiGLU mixture of experts (CPU, CUDA)", "MIT")
