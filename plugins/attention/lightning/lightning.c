/* lightning: MiniMax lightning attention on the CPU (MODEL.md "Lightning attention"): causal linear
 * attention with a per-head exponential decay, computed block-wise with an fp32 KV state, plus its exact
 * backward and constant-memory prefill/decoding. Parameters use the Hugging Face names and layouts.
 * Device CUDA dispatches to lightning.cu (same parameters, activations and state). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "m1c/plugin.h"

/* Decay-rate formulas (MODEL.md): m1c's s_h = base^(h+1) * (1 - l/(L-1) + 1e-5), HF's factor
 * 1 - l/(L-1+1e-5) + 1e-5; base = 2^(-8/nh) in both. */
enum { DECAY_M1C, DECAY_HF };
static const char *const decay_choices[] = {"m1c", "hf", NULL};
/* CUDA kernels: "fused" (lightning_core.cuh: bf16, head_dim 64 or 128), "blocked" (per-block GEMMs through
 * cuBLAS, any shape and dtype), "auto" (fused where it applies). The CPU ignores the setting. */
static const char *const kernel_choices[] = {"auto", "fused", "blocked", NULL};

typedef struct lightning {
    const m1c_host *h;
    int H;       /* model width in and out */
    int nh, hd;  /* heads, head dim */
    int D;       /* nh * hd: attention width (need not equal H) */
    int bs;      /* block size */
    float eps;   /* RMSNorm eps */
    int decay;   /* DECAY_* */
    float *pw;   /* [nh][bs + 1]: pw[h][k] = exp(-s_h k), every decay power a block needs */
    int device;  /* m1c_device of every buffer */
    int bf16;    /* CUDA with compute dtype M1C_BF16: bf16 GEMM operands and saved activations */
    float *pw_dev; /* CUDA: pw copied to the device */
    float *slope_dev; /* CUDA: the slopes s_h, for the fused kernels */
    int fused;     /* CUDA: the fused tensor-core kernels (lightning_core.cuh), else block GEMMs */
    int slots;     /* CUDA, fused: the kernels' resident blocks on the device (how long sequences are cut) */
    int core_kernel; /* CUDA, fused: the output pass's kernel for this device (lightning_cuda_core_kernel) */
    int lp_inputs;   /* CUDA, bf16: the core hands bf16 copies of in and dout (m1c_layer_info.lp_inputs) */
} lightning;

#ifdef M1C_HAVE_CUDA
/* The CUDA implementation (lightning.cu), which declares the identical struct: keep the two in step. */
typedef struct lightning_cuda_cfg {
    const m1c_host *h;
    int H, nh, hd, D, bs;
    float eps;
    int bf16;
    const float *pw;
    int fused;
    const float *slope;
    int slots;
    int core_kernel;
    int lp_inputs;
} lightning_cuda_cfg;
int lightning_cuda_slots(int hd);
int lightning_cuda_core_kernel(void);
int lightning_cuda_upload(const m1c_host *h, const float *pw, size_t n, float **dev);
void lightning_cuda_release(float *dev);
int lightning_cuda_scratch(const lightning_cuda_cfg *c, int B, int T, m1c_buf_spec *specs, int max);
int lightning_cuda_run(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *out, const float *in, int B,
                       int T, float *state, int fresh);
int lightning_cuda_backward(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *din, const float *dout,
                            const float *in, int B, int T);

static lightning_cuda_cfg cuda_cfg(const lightning *L) {
    lightning_cuda_cfg c = {L->h,      L->H,         L->nh,    L->hd,        L->D,    L->bs,
                            L->eps,    L->bf16,      L->pw_dev, L->fused,    L->slope_dev, L->slots,
                            L->core_kernel, L->lp_inputs};
    return c;
}
#endif

enum { P_QKV, P_GATE, P_NORM, P_OUT, N_PARAMS };
/* Activations kept for backward: qkv and gate pre-activations, attention output before the norm, the
 * norm's 1/rms per token, and the KV state at the start of every block (so backward never replays the
 * recurrence). The fused CUDA kernels keep instead of the states what their backward would otherwise
 * recompute or convert again: SiLU(q, k, v) head-major, the bf16 copy of the layer input and the out_proj
 * input y (one element each elsewhere). */
enum { A_QKV, A_GATE, A_O, A_RSTD, A_KV, A_QKVH, A_XLP, A_Y, N_ACTS };
/* Scratch: SiLU(qkv) (forward) / d qkv pre-activation (backward); the out_proj input y (forward) /
 * dy then d gate pre-activation (backward); d attention output; per-thread block work areas. */
enum { S_QKV, S_Y, S_DO, S_WORK, N_SCRATCH };

/* ---- small helpers ----------------------------------------------------------------------------- */

static int n_threads(const lightning *L) {
    int t = L->h->cpu_threads ? L->h->cpu_threads(L->h) : 0;
#ifdef _OPENMP
    if (t <= 0) t = omp_get_max_threads();
#endif
    return t > 0 ? t : 1;
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* exp(x) for x <= 0, for the element-wise passes (SiLU, gates): Cephes' expf (range reduction by ln 2
 * in two parts, a degree-7 polynomial, 2^n put into the exponent bits), about 1 ulp. Plain arithmetic,
 * so the loops that call it vectorise (libm's expf is a call per element: a fifth of the layer's time).
 * Clamped at -80, not at the edge of the float range, because the compiler evaluates the clamped case
 * for every lane and results near 1e-38 would be denormals, which stall the vector units. */
static inline float exp_neg(float x) {
    x = x < -80.0f ? -80.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t)((uint32_t)((int32_t)n + 127) << 23); /* 2^n, n in [-115, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* sigmoid through e = exp(-|x|) <= 1: no overflow, and e/(1+e) for x < 0 keeps full relative accuracy. */
static inline float sigmoidf(float x) {
    const float e = exp_neg(-fabsf(x)), s = 1.0f / (1.0f + e);
    return x >= 0.0f ? s : e * s;
}

/* The element-wise row loops are compiled for AVX-512 and AVX2 too and picked at load time (the
 * build targets baseline x86-64, whose 4-wide SSE makes them a fifth of the layer's time). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROW_KERNEL
#endif

static void mm(const lightning *L, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc) {
    L->h->gemm(L->h, M1C_DEVICE_CPU, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static m1c_buf_spec spec(const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    return m1c_make_spec(name, M1C_F32, ndim, d0, d1, d2, d3);
}

static int put_specs(const lightning *L, const m1c_buf_spec *s, int n, m1c_buf_spec *out, int max) {
    return m1c_put_specs(L->h, "lightning", s, n, out, max);
}

/* The effective block (blocks never exceed the sequence) and the per-thread work area for it:
 * S and P (eb x eb); Q, K, V, their sigmoids, dQ, dK, dV and a temporary (eb x hd each); G and KV
 * (hd x hd); at least 2*D for the norm backward's per-thread partial sums. A multiple of 64 bytes, so
 * that threads' areas in an aligned buffer share no cache line. */
enum { W_S, W_P, N_WSQ };
enum { W_Q, W_K, W_V, W_SQ, W_SK, W_SV, W_DQ, W_DK, W_DV, W_TMP, N_WBLK };
static int eff_block(const lightning *L, int T) { return T < L->bs ? (T > 0 ? T : 1) : L->bs; }
/* Whether a call has enough work to be worth waking the OpenMP team: below a few microseconds of
 * arithmetic (single-head decoding, tiny tests) a fork/join costs more than it saves. */
static int parallel_worth(const lightning *L, int64_t N, int T) {
    return (double)N * L->D * (eff_block(L, T) + L->hd) > 2.5e4;
}

static int64_t work_per_thread(const lightning *L, int T) {
    int64_t eb = eff_block(L, T), hd = L->hd;
    int64_t n = N_WSQ * eb * eb + N_WBLK * eb * hd + 2 * hd * hd;
    if (n < 2 * (int64_t)L->D) n = 2 * (int64_t)L->D;
    return (n + 15) / 16 * 16;
}

/* ---- create / destroy / declarations ------------------------------------------------------------ */

static void lightning_destroy(void *self) {
    lightning *L = self;
    if (!L) return;
    if (L->pw) L->h->free(L->h, M1C_DEVICE_CPU, L->pw);
#ifdef M1C_HAVE_CUDA
    lightning_cuda_release(L->pw_dev);
    lightning_cuda_release(L->slope_dev);
#endif
    free(L);
}

static int lightning_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    int64_t nh, hd, bs;
    double eps;
    const char *decay, *kernel;
    *self = NULL;
#ifdef M1C_HAVE_CUDA
    if (info->device != M1C_DEVICE_CPU && info->device != M1C_DEVICE_CUDA)
        return h->error(h, "lightning: unknown device %d (CPU or CUDA)", info->device);
    if (info->device == M1C_DEVICE_CUDA && info->compute_dtype != M1C_F32 && info->compute_dtype != M1C_BF16)
        return h->error(h, "lightning: compute dtype %d is not F32 or BF16 on CUDA", info->compute_dtype);
#else
    if (info->device != M1C_DEVICE_CPU)
        return h->error(h, "lightning: only the CPU device is supported by this build (built without CUDA; device %d)",
                        info->device);
#endif
    if (info->hidden <= 0) return h->error(h, "lightning: hidden size %d must be positive", info->hidden);
    if (info->n_layers < 1 || info->layer_index < 0 || info->layer_index >= info->n_layers)
        return h->error(h, "lightning: layer index %d outside [0, %d)", info->layer_index, info->n_layers);
    /* Defaults: 128-wide heads (M1) covering the model width. */
    int64_t def_hd = info->hidden < 128 ? info->hidden : 128;
    if (h->get_int(h, s, "head_dim", def_hd, 1, 4096, &hd) != M1C_OK) return M1C_ERR;
    int64_t def_nh = info->hidden / hd > 0 ? info->hidden / hd : 1;
    if (h->get_int(h, s, "heads", def_nh, 1, 4096, &nh) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "block_size", 256, 1, 4096, &bs) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "norm_eps", 1e-6, 1e-12, 1.0, &eps) != M1C_OK) return M1C_ERR;
    if (h->get_string(h, s, "decay", "m1c", decay_choices, &decay) != M1C_OK) return M1C_ERR;
    if (h->get_string(h, s, "kernel", "auto", kernel_choices, &kernel) != M1C_OK) return M1C_ERR;
    const int fusable = info->device == M1C_DEVICE_CUDA && info->compute_dtype == M1C_BF16 && (hd == 64 || hd == 128);
    if (!strcmp(kernel, "fused") && info->device == M1C_DEVICE_CUDA && !fusable)
        return h->settings_error(h, s, "kernel",
                                 "the fused kernel needs precision bf16 and head_dim 64 or 128 (head_dim is %lld); "
                                 "use \"auto\" or \"blocked\"",
                                 (long long)hd);
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    if (nh * hd > (1 << 20))
        return h->error(h, "lightning: heads * head_dim = %lld exceeds %d", (long long)(nh * hd), 1 << 20);

    lightning *L = calloc(1, sizeof(*L));
    if (!L) return h->error(h, "lightning: out of memory");
    L->h = h;
    L->H = info->hidden;
    L->nh = (int)nh;
    L->hd = (int)hd;
    L->D = (int)(nh * hd);
    L->bs = (int)bs;
    L->eps = (float)eps;
    L->decay = strcmp(decay, "hf") == 0 ? DECAY_HF : DECAY_M1C;
    L->pw = h->alloc(h, M1C_DEVICE_CPU, (size_t)nh * (size_t)(bs + 1) * sizeof(float));
    if (!L->pw) {
        lightning_destroy(L);
        return h->error(h, "lightning: out of memory for the decay tables");
    }
    /* Decay rates, in double: s_h = base^(h+1) * factor(l, L). L == 1 has no depth term. */
    const double l = info->layer_index, nl = info->n_layers;
    double factor = L->decay == DECAY_HF ? 1.0 - l / (nl - 1.0 + 1e-5) + 1e-5
                                         : 1.0 - (nl > 1 ? l / (nl - 1.0) : 0.0) + 1e-5;
    float slopes[4096];
    for (int i = 0; i < L->nh; i++) {
        const double slope = exp2(-8.0 * (i + 1) / L->nh) * factor; /* base^(h+1) = 2^(-8 (h+1) / nh) */
        slopes[i] = (float)slope;
        for (int k = 0; k <= L->bs; k++) L->pw[(size_t)i * (L->bs + 1) + k] = (float)exp(-slope * k);
    }
    (void)slopes; /* read by the CUDA upload only */
    L->device = info->device;
#ifdef M1C_HAVE_CUDA
    if (L->device == M1C_DEVICE_CUDA) {
        /* the same decay powers as the CPU, so both devices mask with identical factors */
        L->bf16 = info->compute_dtype == M1C_BF16;
        L->fused = fusable && strcmp(kernel, "blocked") != 0;
        L->slots = L->fused ? lightning_cuda_slots(L->hd) : 0;
        L->core_kernel = L->fused ? lightning_cuda_core_kernel() : 0;
        L->lp_inputs = L->bf16 && info->lp_inputs;
        if (lightning_cuda_upload(h, L->pw, (size_t)nh * (size_t)(bs + 1), &L->pw_dev) != M1C_OK ||
            lightning_cuda_upload(h, slopes, (size_t)nh, &L->slope_dev) != M1C_OK) {
            lightning_destroy(L);
            return M1C_ERR;
        }
    }
#endif
    *self = L;
    return M1C_OK;
}

static int lightning_params(void *self, m1c_buf_spec *specs, int max) {
    lightning *L = self;
    m1c_buf_spec s[N_PARAMS] = {
        spec("self_attn.qkv_proj.weight", 2, 3 * (int64_t)L->D, L->H, 0, 0), /* (3*nh*hd, H), per head [q|k|v] */
        spec("self_attn.output_gate.weight", 2, L->D, L->H, 0, 0),         /* (nh*hd, H) */
        spec("self_attn.norm.weight", 1, L->D, 0, 0, 0),                   /* (nh*hd) */
        spec("self_attn.out_proj.weight", 2, L->H, L->D, 0, 0),            /* (H, nh*hd) */
    };
    s[P_NORM].init = M1C_INIT_ONES;
    s[P_NORM].no_decay = 1;
    s[P_NORM].std = 0.0f;
    /* each of these gradients is one product: beta 0 when handed over unset (m1c_grad_beta) */
    s[P_QKV].grad_written = s[P_GATE].grad_written = s[P_OUT].grad_written = 1;
    return put_specs(L, s, N_PARAMS, specs, max);
}

static int n_blocks(const lightning *L, int T) { return (T + L->bs - 1) / L->bs; }

static int lightning_acts(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    lightning *L = self;
    const int64_t N = (int64_t)B * T, hd = L->hd;
    m1c_buf_spec s[N_ACTS] = {
        spec("self_attn.qkv_pre", 2, N, 3 * (int64_t)L->D, 0, 0),                 /* (B*T, 3*nh*hd) */
        spec("self_attn.gate_pre", 2, N, L->D, 0, 0),                             /* (B*T, nh*hd) */
        spec("self_attn.attn_out", 2, N, L->D, 0, 0),                             /* (B*T, nh*hd) */
        spec("self_attn.rstd", 1, N, 0, 0, 0),                                    /* (B*T) */
        spec("self_attn.kv_blocks", 4, B, L->nh, n_blocks(L, T), hd * hd),        /* (B, nh, blocks, hd*hd) */
        spec("self_attn.qkv_heads", 1, 1, 0, 0, 0),                               /* fused only, below */
        spec("self_attn.in_bf16", 1, 1, 0, 0, 0),
        spec("self_attn.out_proj_in", 1, 1, 0, 0, 0),
    };
    if (L->fused) {
        /* The fused CUDA kernels recompute the states in backward: no per-block states to keep. They keep
         * attn_out head-major as the core wrote it, SiLU(q, k, v) head-major (3, B*nh, T, hd) for the
         * backward's products, and the bf16 layer input (unless the core keeps it: lp_inputs) and y for
         * the weight-gradient GEMMs (each 2 bytes an element: 3 N D + N H + N D more, no pass over pre, o, g
         * or the input to redo them). */
        s[A_KV] = spec("self_attn.kv_blocks", 4, 1, 1, 1, 1);
        /* qkv_pre holds both projections' outputs side by side, [qkv | gate] (B*T, 4*nh*hd), so that each
         * projection is one GEMM forward and backward (lightning.cu, ld_pre); gate_pre is unused. */
        s[A_QKV] = spec("self_attn.qkv_pre", 2, N, 4 * (int64_t)L->D, 0, 0);
        s[A_GATE] = spec("self_attn.gate_pre", 1, 1, 0, 0, 0);
        s[A_O] = spec("self_attn.attn_out", 3, (int64_t)B * L->nh, T, hd, 0);   /* (B*nh, T, hd) */
        s[A_QKVH] = spec("self_attn.qkv_heads", 4, 3, (int64_t)B * L->nh, T, hd); /* (3, B*nh, T, hd) */
        if (!L->lp_inputs) s[A_XLP] = spec("self_attn.in_bf16", 2, N, L->H, 0, 0); /* (B*T, H); else the core's */
        s[A_Y] = spec("self_attn.out_proj_in", 2, N, L->D, 0, 0);                /* (B*T, nh*hd) */
        s[A_QKVH].dtype = s[A_XLP].dtype = s[A_Y].dtype = M1C_BF16;
    }
    if (L->bf16) s[A_QKV].dtype = s[A_GATE].dtype = s[A_O].dtype = M1C_BF16; /* rstd and states stay f32 */
    /* Every one is for backward: a forward with training = 0 works in scratch (both devices), so runs made
     * for inference (decoding, prefill) do not allocate them. */
    for (int i = 0; i < N_ACTS; i++) s[i].backward_only = 1;
    return put_specs(L, s, N_ACTS, specs, max);
}

static int lightning_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    lightning *L = self;
#ifdef M1C_HAVE_CUDA
    if (L->device == M1C_DEVICE_CUDA) {
        const lightning_cuda_cfg c = cuda_cfg(L);
        return lightning_cuda_scratch(&c, B, T, specs, max);
    }
#endif
    const int64_t N = (int64_t)B * T;
    m1c_buf_spec s[N_SCRATCH] = {
        spec("self_attn.qkv", 2, N, 3 * (int64_t)L->D, 0, 0),                       /* (B*T, 3*nh*hd) */
        spec("self_attn.y", 2, N, L->D, 0, 0),                                      /* (B*T, nh*hd) */
        spec("self_attn.d_attn_out", 2, N, L->D, 0, 0),                             /* (B*T, nh*hd) */
        spec("self_attn.work", 2, n_threads(L), work_per_thread(L, T), 0, 0),       /* (threads, per thread) */
    };
    return put_specs(L, s, N_SCRATCH, specs, max);
}

static int lightning_state(void *self, int batch, int64_t max_len, m1c_buf_spec *specs, int max) {
    lightning *L = self;
    (void)max_len; /* the state does not grow with the sequence */
    m1c_buf_spec s[1] = {spec("self_attn.kv_state", 4, batch, L->nh, L->hd, L->hd)}; /* (B, nh, hd, hd) */
    return put_specs(L, s, 1, specs, max);
}

/* ---- the block-wise attention ------------------------------------------------------------------- */

/* x = SiLU(z) = z sigmoid(z), keeping sigmoid(z) in sg for the derivative. */
ROW_KERNEL static void silu_row(float *restrict x, float *restrict sg, const float *restrict z, int n) {
    for (int c = 0; c < n; c++) {
        const float s = sigmoidf(z[c]);
        sg[c] = s;
        x[c] = z[c] * s;
    }
}

/* x = SiLU(z), in place when x == z. */
ROW_KERNEL static void silu_inplace_row(float *x, const float *z, int n) {
    for (int c = 0; c < n; c++) x[c] = z[c] * sigmoidf(z[c]);
}

/* s = sigmoid(z). */
ROW_KERNEL static void sigmoid_row(float *restrict s, const float *restrict z, int n) {
    for (int c = 0; c < n; c++) s[c] = sigmoidf(z[c]);
}

/* y = o * rs * w * sigmoid(g): RMSNorm (rs = 1/rms) times the output gate; o may alias y. */
ROW_KERNEL static void norm_gate_row(float *y, const float *o, const float *restrict g, const float *restrict w,
                                     float rs, int n) {
    for (int c = 0; c < n; c++) y[c] = o[c] * rs * w[c] * sigmoidf(g[c]);
}

/* dz = dx * SiLU'(z) = dx sigmoid(z) (1 + z (1 - sigmoid(z))). */
ROW_KERNEL static void silu_backward_row(float *restrict dz, const float *restrict dx, const float *restrict sg,
                              const float *restrict z, int n) {
    for (int c = 0; c < n; c++) dz[c] = dx[c] * sg[c] * (1.0f + z[c] * (1.0f - sg[c]));
}

/* S[i][j] *= exp(-s (i-j)) for j <= i, 0 above the diagonal: the intra-block decay mask D. */
ROW_KERNEL static void decay_mask(float *S, int m, const float *pw) {
    for (int i = 0; i < m; i++) {
        float *r = S + (int64_t)i * m;
        for (int j = 0; j <= i; j++) r[j] *= pw[i - j];
        for (int j = i + 1; j < m; j++) r[j] = 0.0f;
    }
}

/* dst[i][:] = src[i][:] * scale[i]: row scalings are how the decay factorises outside the mask. */
ROW_KERNEL static void scale_rows(float *dst, int ldd, const float *src, int lds, int m, int n, const float *scale,
                                  int step) {
    for (int i = 0; i < m; i++) {
        const float f = scale[(int64_t)i * step];
        const float *a = src + (int64_t)i * lds;
        float *d = dst + (int64_t)i * ldd;
        for (int c = 0; c < n; c++) d[c] = a[c] * f;
    }
}

/* One token: o = lambda q KV + (q . k) v, then (if update) KV = lambda KV + k^T v, lambda = exp(-s).
 * acc: hd floats of work. */
ROW_KERNEL static void token_step(int hd, float lambda, const float *restrict q, const float *restrict k,
                       const float *restrict v, float *restrict o, float *restrict kv, int kv_zero, int update,
                       float *restrict acc) {
    float qk = 0.0f;
    for (int c = 0; c < hd; c++) qk += q[c] * k[c];
    for (int c = 0; c < hd; c++) acc[c] = qk * v[c];
    if (!kv_zero)
        for (int a = 0; a < hd; a++) {
            const float qa = lambda * q[a], *r = kv + (int64_t)a * hd;
            for (int c = 0; c < hd; c++) acc[c] += qa * r[c];
        }
    for (int c = 0; c < hd; c++) o[c] = acc[c];
    if (!update) return;
    for (int a = 0; a < hd; a++) {
        float *r = kv + (int64_t)a * hd;
        const float ka = k[a];
        if (kv_zero)
            for (int c = 0; c < hd; c++) r[c] = ka * v[c];
        else
            for (int c = 0; c < hd; c++) r[c] = lambda * r[c] + ka * v[c];
    }
}

/* One (sequence, head) over T tokens. q/k/v: rows of stride ldq; o: rows of stride ldo. kv: (hd, hd)
 * state, read unless kv_zero, and left holding the final state when keep_final. kvs: if not NULL,
 * receives the state at the start of each block. S, tmp: work areas (eb x eb, eb x hd). */
static void head_forward(const lightning *L, const float *pw, const float *q, const float *k, const float *v,
                         int ldq, float *o, int ldo, float *kv, int kv_zero, int keep_final, float *kvs, float *S,
                         float *tmp, int T) {
    const int hd = L->hd, bs = L->bs;
    for (int t0 = 0, n = 0; t0 < T; t0 += bs, n++) {
        const int m = T - t0 < bs ? T - t0 : bs, last = t0 + m >= T;
        const float *qb = q + (int64_t)t0 * ldq, *kb = k + (int64_t)t0 * ldq, *vb = v + (int64_t)t0 * ldq;
        float *ob = o + (int64_t)t0 * ldo;
        if (kvs) {
            float *dst = kvs + (int64_t)n * hd * hd;
            if (kv_zero) memset(dst, 0, (size_t)hd * hd * sizeof(float));
            else memcpy(dst, kv, (size_t)hd * hd * sizeof(float));
        }
        if (m == 1) { /* decoding (or blocks of one): a vector-matrix product, not worth BLAS calls */
            token_step(hd, pw[1], qb, kb, vb, ob, kv, kv_zero, !last || keep_final, tmp);
            kv_zero = kv_zero && last && !keep_final;
            continue;
        }
        /* inter = (Q * exp(-s i)) KV, i = 1..m */
        float beta = 0.0f;
        if (!kv_zero) {
            mm(L, 0, 0, m, hd, hd, 1.0f, qb, ldq, kv, hd, 0.0f, ob, ldo);
            scale_rows(ob, ldo, ob, ldo, m, hd, pw + 1, 1);
            beta = 1.0f;
        }
        /* intra = ((Q K^T) * D) V */
        mm(L, 0, 1, m, m, hd, 1.0f, qb, ldq, kb, ldq, 0.0f, S, m);
        decay_mask(S, m, pw);
        mm(L, 0, 0, m, hd, m, 1.0f, S, m, vb, ldq, beta, ob, ldo);
        /* KV = exp(-s m) KV + (K * exp(-s (m-i)))^T V */
        if (!last || keep_final) {
            scale_rows(tmp, hd, kb, ldq, m, hd, pw + m - 1, -1);
            mm(L, 1, 0, hd, hd, m, 1.0f, tmp, hd, vb, ldq, kv_zero ? 0.0f : pw[m], kv, hd);
            kv_zero = 0;
        }
    }
}

/* Every (sequence, head), shared among the threads of the enclosing parallel region (serially outside
 * one). qkv = SiLU(pre) is applied to each head's own columns first (pre may alias qkv); o: (B, T, D).
 * state: (B, nh, hd, hd) carried in and out (reset first when fresh), or NULL for a forward from an
 * empty state. */
static void attention_forward(const lightning *L, const float *pre, float *qkv, float *o, float *kvs, float *state,
                              int fresh, float *w, int B, int T) {
    const int nh = L->nh, hd = L->hd, D = L->D, eb = eff_block(L, T), nb = n_blocks(L, T);
    float *S = w + (int64_t)W_S * eb * eb, *blk = w + (int64_t)N_WSQ * eb * eb;
    float *tmp = blk + (int64_t)W_TMP * eb * hd, *kvw = blk + (int64_t)N_WBLK * eb * hd;
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * nh; bh++) {
        const int b = bh / nh, hh = bh % nh;
        const int64_t off = (int64_t)b * T * 3 * D + (int64_t)hh * 3 * hd;
        for (int t = 0; t < T; t++) {
            const float *z = pre + off + (int64_t)t * 3 * D;
            float *x = qkv + off + (int64_t)t * 3 * D;
            silu_inplace_row(x, z, 3 * hd);
        }
        float *kv = state ? state + (int64_t)bh * hd * hd : kvw;
        if (state && fresh) memset(kv, 0, (size_t)hd * hd * sizeof(float));
        const float *q = qkv + off;
        head_forward(L, L->pw + (int64_t)hh * (L->bs + 1), q, q + hd, q + 2 * hd, 3 * D,
                     o + (int64_t)b * T * D + (int64_t)hh * hd, D, kv, state ? fresh : 1, state != NULL,
                     kvs ? kvs + (int64_t)bh * nb * hd * hd : NULL, S, tmp, T);
    }
}

/* Backward of one (sequence, head), blocks in reverse. pre: the head's q pre-activation columns of
 * qkv_pre (k at +hd, v at +2hd), rows of stride ld; dO: rows of stride ldo; kvs: states at block
 * starts from forward; dpre: d qkv pre-activation, written (same layout as pre). G carries
 * d loss / d KV at the end of the current block backwards in time. */
static void head_backward(const lightning *L, const float *pw, const float *pre, int ld, const float *dO, int ldo,
                          const float *kvs, float *dpre, float *w, int T) {
    const int hd = L->hd, bs = L->bs, eb = eff_block(L, T), nb = n_blocks(L, T);
    float *S = w + (int64_t)W_S * eb * eb, *P = w + (int64_t)W_P * eb * eb;
    float *blk[N_WBLK];
    for (int i = 0; i < N_WBLK; i++) blk[i] = w + (int64_t)N_WSQ * eb * eb + (int64_t)i * eb * hd;
    float *G = w + (int64_t)N_WSQ * eb * eb + (int64_t)N_WBLK * eb * hd;
    float *Q = blk[W_Q], *K = blk[W_K], *V = blk[W_V], *dQ = blk[W_DQ], *dK = blk[W_DK], *dV = blk[W_DV];
    float *tmp = blk[W_TMP];
    int g_zero = 1;
    for (int n = nb - 1; n >= 0; n--) {
        const int t0 = n * bs, m = T - t0 < bs ? T - t0 : bs;
        const float *dOb = dO + (int64_t)t0 * ldo;
        /* q, k, v = SiLU(pre), contiguous, keeping the sigmoids for SiLU's derivative */
        for (int i = 0; i < m; i++) {
            const float *z = pre + (int64_t)(t0 + i) * ld;
            for (int p = 0; p < 3; p++) {
                silu_row(blk[W_Q + p] + (int64_t)i * hd, blk[W_SQ + p] + (int64_t)i * hd, z + p * hd, hd);
            }
        }
        /* S = (Q K^T) * D, P = (dO V^T) * D */
        mm(L, 0, 1, m, m, hd, 1.0f, Q, hd, K, hd, 0.0f, S, m);
        decay_mask(S, m, pw);
        mm(L, 0, 1, m, m, hd, 1.0f, dOb, ldo, V, hd, 0.0f, P, m);
        decay_mask(P, m, pw);
        /* intra: dK = P^T Q, dV = S^T dO, dQ = P K */
        mm(L, 1, 0, m, hd, m, 1.0f, P, m, Q, hd, 0.0f, dK, hd);
        mm(L, 1, 0, m, hd, m, 1.0f, S, m, dOb, ldo, 0.0f, dV, hd);
        mm(L, 0, 0, m, hd, m, 1.0f, P, m, K, hd, 0.0f, dQ, hd);
        /* through the state at the block's end: dK += (V G^T) * exp(-s (m-i)), dV += (K G) * exp(-s (m-i)) */
        if (!g_zero) {
            scale_rows(tmp, hd, V, hd, m, hd, pw + m - 1, -1);
            mm(L, 0, 1, m, hd, hd, 1.0f, tmp, hd, G, hd, 1.0f, dK, hd);
            scale_rows(tmp, hd, K, hd, m, hd, pw + m - 1, -1);
            mm(L, 0, 0, m, hd, hd, 1.0f, tmp, hd, G, hd, 1.0f, dV, hd);
        }
        /* through the state at the block's start (zero for block 0): dQ += (dO * exp(-s i)) KV^T, and
         * G <- exp(-s m) G + Q^T (dO * exp(-s i)) for the previous block */
        if (n > 0) {
            const float *kv = kvs + (int64_t)n * hd * hd;
            scale_rows(tmp, hd, dOb, ldo, m, hd, pw + 1, 1);
            mm(L, 0, 1, m, hd, hd, 1.0f, tmp, hd, kv, hd, 1.0f, dQ, hd);
            mm(L, 1, 0, hd, hd, m, 1.0f, Q, hd, tmp, hd, g_zero ? 0.0f : pw[m], G, hd);
            g_zero = 0;
        }
        /* through SiLU: d pre = d x * sigmoid(z) (1 + z (1 - sigmoid(z))) */
        for (int i = 0; i < m; i++) {
            const float *z = pre + (int64_t)(t0 + i) * ld;
            float *dz = dpre + (int64_t)(t0 + i) * ld;
            for (int p = 0; p < 3; p++) {
                silu_backward_row(dz + p * hd, blk[W_DQ + p] + (int64_t)i * hd, blk[W_SQ + p] + (int64_t)i * hd,
                                  z + p * hd, hd);
            }
        }
    }
}

/* ---- norm and gate ------------------------------------------------------------------------------ */

/* One token of the norm/gate backward (see lightning_backward); restrict lets the loop vectorise. */
ROW_KERNEL static void norm_gate_backward_row(float *restrict dwp, float *restrict dot, float *restrict dyt,
                                   const float *restrict ot, const float *restrict sgr, const float *restrict wn,
                                   float rs, float mean, int D) {
    for (int c = 0; c < D; c++) {
        const float nc = ot[c] * rs, s = sgr[c], d = dyt[c];
        dwp[c] += d * nc * s;
        dot[c] = rs * (d * wn[c] * s - nc * mean);
        dyt[c] = d * nc * wn[c] * s * (1.0f - s); /* d gate pre-activation, over dy */
    }
}

/* y = RMSNorm(o) * weight * sigmoid(g) per token; rstd[t] = 1/rms: computed (rstd_out) or reused
 * (rstd_in). Tokens shared among the threads of the enclosing parallel region. */
static void norm_gate_forward(const lightning *L, float *y, const float *o, const float *g, const float *wn,
                              float *rstd_out, const float *rstd_in, int N) {
    const int D = L->D;
    const float eps = L->eps;
#pragma omp for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *ot = o + (int64_t)t * D, *gt = g + (int64_t)t * D;
        float *yt = y + (int64_t)t * D;
        float rs;
        if (rstd_in) {
            rs = rstd_in[t];
        } else {
            float ss = 0.0f;
            for (int c = 0; c < D; c++) ss += ot[c] * ot[c];
            rs = 1.0f / sqrtf(ss / (float)D + eps);
            if (rstd_out) rstd_out[t] = rs;
        }
        norm_gate_row(yt, ot, gt, wn, rs, D);
    }
}

/* ---- forward, step, backward -------------------------------------------------------------------- */

static int check_size(const lightning *L, const m1c_tensor *t, int64_t need, const char *what) {
    if (!t->data || m1c_tensor_numel(t) < need)
        return L->h->error(L->h, "lightning: buffer %s holds %lld values, %lld needed (declared for a smaller batch?)",
                           t->name ? t->name : what, (long long)m1c_tensor_numel(t), (long long)need);
    return M1C_OK;
}

/* Work area for T: threads to use and floats per thread, checked against the declared scratch. */
static int work_area(const lightning *L, const m1c_tensor *w, int T, int64_t *per, int *nt) {
    if (w->ndim != 2 || w->shape[0] < 1) return L->h->error(L->h, "lightning: scratch work buffer has a bad shape");
    *per = w->shape[1];
    *nt = (int)w->shape[0];
    if (*per < work_per_thread(L, T))
        return L->h->error(L->h, "lightning: scratch work buffer declared for a shorter sequence than T=%d", T);
    return M1C_OK;
}

static int check_common(const lightning *L, const m1c_layer_bufs *b, int B, int T) {
    if (!b || !b->params || !b->scratch)
        return L->h->error(L->h, "lightning: parameter and scratch buffers are required");
    if (B < 1 || T < 1) return L->h->error(L->h, "lightning: empty batch (B=%d, T=%d)", B, T);
    const int64_t N = (int64_t)B * T;
    if (check_size(L, &b->scratch[S_QKV], N * 3 * L->D, "qkv") || check_size(L, &b->scratch[S_Y], N * L->D, "y"))
        return M1C_ERR;
    return M1C_OK;
}

static int check_acts(const lightning *L, const m1c_tensor *a, int B, int T) {
    const int64_t N = (int64_t)B * T, D = L->D;
    if (check_size(L, &a[A_QKV], N * 3 * D, "qkv_pre") || check_size(L, &a[A_GATE], N * D, "gate_pre") ||
        check_size(L, &a[A_O], N * D, "attn_out") || check_size(L, &a[A_RSTD], N, "rstd") ||
        check_size(L, &a[A_KV], (int64_t)B * L->nh * n_blocks(L, T) * L->hd * L->hd, "kv_blocks"))
        return M1C_ERR;
    return M1C_OK;
}

/* forward (state == NULL: from an empty state, keeping activations when training) or step. */
static int run(lightning *L, const m1c_layer_bufs *b, float *out, const float *in, int B, int T, float *state,
               int fresh) {
    const int H = L->H, D = L->D, N = B * T;
#ifdef M1C_HAVE_CUDA
    if (L->device == M1C_DEVICE_CUDA) {
        const lightning_cuda_cfg c = cuda_cfg(L);
        return lightning_cuda_run(&c, b, out, in, B, T, state, fresh);
    }
#endif
    const int train = !state && b->training && b->acts;
    int64_t per;
    int nt;
    if (check_common(L, b, B, T) || work_area(L, &b->scratch[S_WORK], T, &per, &nt)) return M1C_ERR;
    if (!train && check_size(L, &b->scratch[S_DO], (int64_t)N * D, "d_attn_out")) return M1C_ERR;
    if (train && check_acts(L, b->acts, B, T)) return M1C_ERR;
    const float *Wqkv = b->params[P_QKV].data, *Wg = b->params[P_GATE].data, *wn = b->params[P_NORM].data;
    const float *Wo = b->params[P_OUT].data;
    float *qkv = b->scratch[S_QKV].data, *y = b->scratch[S_Y].data, *work = b->scratch[S_WORK].data;
    /* Without activations to keep, pre-activations live in scratch and are overwritten in place. */
    float *pre = train ? b->acts[A_QKV].data : qkv;
    float *o = train ? b->acts[A_O].data : y;
    float *g = train ? b->acts[A_GATE].data : b->scratch[S_DO].data;
    float *rstd = train ? b->acts[A_RSTD].data : NULL;
    float *kvs = train ? b->acts[A_KV].data : NULL;

    /* The two input projections back to back, then one parallel region for everything between them
     * and out_proj: BLAS's threads and OpenMP's take turns on the cores as rarely as possible. */
    mm(L, 0, 1, N, 3 * D, H, 1.0f, in, H, Wqkv, H, 0.0f, pre, 3 * D); /* qkv pre-activation x Wqkv^T */
    mm(L, 0, 1, N, D, H, 1.0f, in, H, Wg, H, 0.0f, g, D);             /* gate pre-activation x Wgate^T */
#pragma omp parallel num_threads(nt) if (parallel_worth(L, N, T))
    {
        attention_forward(L, pre, qkv, o, kvs, state, fresh, work + (int64_t)thread_id() * per, B, T);
        norm_gate_forward(L, y, o, g, wn, rstd, NULL, N); /* after the barrier ending the heads' loop */
    }
    mm(L, 0, 1, N, H, D, 1.0f, y, D, Wo, D, 0.0f, out, H);
    return M1C_OK;
}

static int lightning_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    return run(self, b, out, in, B, T, NULL, 1);
}

/* pos == 0 starts a new sequence: the state is reset. The decay depends only on distances, so the
 * absolute position is otherwise not needed. */
static int lightning_step(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B,
                          int T, int64_t pos) {
    lightning *L = self;
    if (!state || !state[0].data) return L->h->error(L->h, "lightning: step needs the state buffer");
    if (pos < 0) return L->h->error(L->h, "lightning: step at negative position %lld", (long long)pos);
    const m1c_tensor *s = &state[0];
    if (s->ndim != 4 || s->shape[0] < B || s->shape[1] != L->nh || s->shape[2] != L->hd || s->shape[3] != L->hd)
        return L->h->error(L->h, "lightning: state buffer is not (>=%d, %d, %d, %d)", B, L->nh, L->hd, L->hd);
    return run(L, b, out, in, B, T, s->data, pos == 0);
}

static int lightning_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in,
                              int B, int T) {
    lightning *L = self;
#ifdef M1C_HAVE_CUDA
    if (L->device == M1C_DEVICE_CUDA) {
        const lightning_cuda_cfg c = cuda_cfg(L);
        return lightning_cuda_backward(&c, b, din, dout, in, B, T);
    }
#endif
    m1c_grads_zero_unset_cpu(b->grads, N_PARAMS);
    const int H = L->H, D = L->D, nh = L->nh, hd = L->hd, N = B * T, nb = n_blocks(L, T);
    int64_t per;
    int nt;
    if (check_common(L, b, B, T) || work_area(L, &b->scratch[S_WORK], T, &per, &nt)) return M1C_ERR;
    if (!b->acts || !b->grads) return L->h->error(L->h, "lightning: backward needs activations and gradients");
    if (check_size(L, &b->scratch[S_DO], (int64_t)N * D, "d_attn_out") || check_acts(L, b->acts, B, T))
        return M1C_ERR;
    const float *Wqkv = b->params[P_QKV].data, *Wg = b->params[P_GATE].data, *wn = b->params[P_NORM].data;
    const float *Wo = b->params[P_OUT].data;
    float *dWqkv = b->grads[P_QKV].data, *dWg = b->grads[P_GATE].data, *dwn = b->grads[P_NORM].data;
    float *dWo = b->grads[P_OUT].data;
    const float *pre = b->acts[A_QKV].data, *g = b->acts[A_GATE].data, *o = b->acts[A_O].data;
    const float *rstd = b->acts[A_RSTD].data, *kvs = b->acts[A_KV].data;
    float *dpre = b->scratch[S_QKV].data, *dy = b->scratch[S_Y].data, *dO = b->scratch[S_DO].data;
    float *work = b->scratch[S_WORK].data;

    const int par = parallel_worth(L, N, T);

    /* out_proj: dWo += dout^T y (y recomputed), dy = dout Wo */
#pragma omp parallel num_threads(nt) if (par)
    norm_gate_forward(L, dy, o, g, wn, NULL, rstd, N);
    mm(L, 1, 0, H, D, N, 1.0f, dout, H, dy, D, 1.0f, dWo, D);
    mm(L, 0, 0, N, D, H, 1.0f, dout, H, Wo, D, 0.0f, dy, D);

#pragma omp parallel num_threads(nt) if (par)
    {
        /* norm and gate, per token: n = o rstd, y = n w sig(g). dO = rstd (dn - n mean(dn n)) with
         * dn = dy w sig(g); d gate pre = dy n w sig(g)(1 - sig(g)) (written over dy); dw = sum dy n sig(g),
         * from per-thread partial sums added in thread order (so results repeat). */
        float *dwp = work + (int64_t)thread_id() * per, *sgr = dwp + D;
        const int team = team_size();
        memset(dwp, 0, (size_t)D * sizeof(float));
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++) {
            const float *ot = o + (int64_t)t * D, *gt = g + (int64_t)t * D;
            float *dyt = dy + (int64_t)t * D, *dot = dO + (int64_t)t * D;
            const float rs = rstd[t];
            sigmoid_row(sgr, gt, D);
            float acc = 0.0f;
            for (int c = 0; c < D; c++) acc += dyt[c] * wn[c] * sgr[c] * ot[c];
            norm_gate_backward_row(dwp, dot, dyt, ot, sgr, wn, rs, acc * rs / (float)D, D);
        }
#pragma omp for schedule(static)
        for (int c = 0; c < D; c++)
            for (int i = 0; i < team; i++) dwn[c] += work[(int64_t)i * per + c];
        /* attention, every (sequence, head); the work areas are free again after the barrier above */
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * nh; bh++) {
            const int bb = bh / nh, hh = bh % nh;
            const int64_t off3 = (int64_t)bb * T * 3 * D + (int64_t)hh * 3 * hd;
            head_backward(L, L->pw + (int64_t)hh * (L->bs + 1), pre + off3, 3 * D,
                          dO + (int64_t)bb * T * D + (int64_t)hh * hd, D, kvs + (int64_t)bh * nb * hd * hd,
                          dpre + off3, work + (int64_t)thread_id() * per, T);
        }
    }

    /* projections: dW += d pre^T x, din += d pre W */
    mm(L, 1, 0, 3 * D, H, N, 1.0f, dpre, 3 * D, in, H, 1.0f, dWqkv, H);
    mm(L, 1, 0, D, H, N, 1.0f, dy, D, in, H, 1.0f, dWg, H);
    if (din) {
        mm(L, 0, 0, N, H, 3 * D, 1.0f, dpre, 3 * D, Wqkv, H, 1.0f, din, H);
        mm(L, 0, 0, N, H, D, 1.0f, dy, D, Wg, H, 1.0f, din, H);
    }
    return M1C_OK;
}

/* Forward FLOPs per token: the four projections (2 per multiply-add), and per head the intra-block
 * products Q K^T and S V over the block (full blocks, as computed) plus Q KV and the state update. */
static double lightning_flops(void *self, int64_t ctx) {
    lightning *L = self;
    const double H = L->H, D = L->D, hd = L->hd;
    const double blk = ctx > 0 && ctx < L->bs ? (double)ctx : (double)L->bs;
    return 2.0 * H * (3.0 * D + D + D) + L->nh * (4.0 * blk * hd + 4.0 * hd * hd);
}

static const m1c_attention_vtable lightning_vtable = {
    .size = sizeof(m1c_attention_vtable),
    .flags = M1C_ATTENTION_DOUT_LP_ONLY, /* lp_inputs: BF16 on CUDA, whose backward takes dout_lp alone */
    .ops = {lightning_create, lightning_destroy, lightning_params, lightning_acts, lightning_scratch,
            lightning_forward, lightning_backward},
    .state = lightning_state,
    .step = lightning_step,
    .flops = lightning_flops,
};

M1C_PLUGIN(ATTENTION, attention, lightning_vtable, "lightning", "0.1.0",
           "MiniMax lightning attention: block-wise decayed linear attention with an fp32 KV state (CPU, CUDA)", "MIT")
