/* Softmax attention plugin: causal grouped-query attention with partial "rotate_half" RoPE, no biases,
 * HF parameter names, flash-attention-style forward/backward (no T x T matrix is kept) and a KV cache
 * for incremental decoding. The math is MODEL.md "Softmax attention". This file is the CPU reference;
 * device CUDA dispatches to softmax.cu. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "m1c/plugin.h"

/* Tiles of the blocked attention: a thread works on BQ query rows against bk keys at a time, bk chosen
 * per instance so that a tile GEMM (BQ x bk x head_dim) does at most TILE_MACS multiply-adds (bk 128 at
 * head_dim 32). The score tile stays in L2, and should the core fall back to OpenBLAS's pthreads build,
 * that build runs a GEMM this small on the calling thread: a larger one called from our OpenMP threads
 * contends for OpenBLAS's own pool (measured 5-10x slower with 2 threads). The OpenMP build runs
 * every GEMM called inside a parallel region on the calling thread. */
#define BQ 64
#define TILE_MACS (1 << 18)
#define BK_MIN 16
#define BK_MAX 256
#define MAX_HEAD_DIM 1024                  /* bounds the per-row cos/sin tables on the stack */
/* Below about this many flops (or floats touched) a loop runs on one thread: waking the team costs
 * more than it saves, and much more on a loaded machine. */
#define PAR_MIN_WORK 65536

enum { P_Q, P_K, P_V, P_O, N_PARAMS };
enum { A_Q, A_K, A_V, A_ATT, A_LSE, N_ACTS };
enum { S_DQ, S_DK, S_DV, S_DATT, S_LSE, S_TILE, N_SCRATCH };
enum { ST_K, ST_V, N_STATE };

/* The setting "kernel": the CUDA path's attention kernels (sm_cuda_create's kernel). */
enum { SM_KERNEL_AUTO, SM_KERNEL_WGMMA, SM_KERNEL_MMA, SM_KERNEL_CUDA_CORES };

#ifdef M1C_HAVE_CUDA
/* The CUDA path (softmax.cu): an instance of its own, with its own acts and scratch layout. */
int sm_cuda_create(const m1c_host *h, int H, int nh, int kvh, int hd, int rd, double theta, int dtype, int kernel,
                   void **out);
int sm_cuda_wgmma_available(void);
void sm_cuda_destroy(void *self);
int sm_cuda_acts(void *self, int B, int T, m1c_buf_spec *specs, int max);
int sm_cuda_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max);
int sm_cuda_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T);
int sm_cuda_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in, int B,
                     int T);
int sm_cuda_step(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B, int T,
                 int64_t pos);
#endif

typedef struct softmax {
    const m1c_host *h;
    void *cuda;   /* the CUDA instance (device CUDA), else NULL */
    int H;        /* model width */
    int nh, kvh;  /* query heads, key/value heads (kvh divides nh) */
    int hd, rd;   /* head dim, rotated dims (even, <= hd) */
    int rep;      /* nh / kvh: query heads per KV head */
    int bk;       /* keys per tile */
    int64_t tile; /* floats of one thread's tile: forward S, m, l; backward P, dP, D */
    double theta; /* RoPE base */
    int cache_dt; /* KV cache dtype: bf16 for BF16 compute on CUDA (tensor-core step), else f32 */
    double inv_freq[MAX_HEAD_DIM / 2]; /* theta^(-2i/rd), i < rd/2 */
} softmax;

/* ---- small helpers ------------------------------------------------------------------------- */

static int threads(const softmax *a) {
    int n = a->h->cpu_threads(a->h);
    return n > 0 ? n : omp_get_max_threads();
}

static m1c_buf_spec spec(const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    return m1c_make_spec(name, M1C_F32, ndim, d0, d1, d2, d3);
}

/* exp(x) for the x <= ~0 of softmax (scores minus their row maximum or logsumexp), written so that the
 * compiler vectorises it (libm's expf is a scalar call and would cost as much as the GEMMs): Cephes'
 * expf, 2^n * p(r) with |r| <= ln2/2, relative error < 1e-7 on [-87, 0]. Below -87 (where 2^n would
 * leave the normal range) the result is masked to 0 with integer ops rather than a branch: a branch
 * here stops GCC from vectorising (the FP ops "could trap"). x must stay below 88. */
static inline float exp_fast(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    uint32_t ti, yi;
    memcpy(&ti, &t, 4);
    memcpy(&yi, &y, 4);
    yi += (ti - 0x4B400000u) << 23;      /* the low bits of t hold n: add it to the exponent */
    yi &= -(uint32_t)(x >= -87.0f);      /* 0 below -87 (and for NaN) */
    memcpy(&y, &yi, 4);
    return y;
}

/* rotate_half RoPE of one row of nheads head vectors: dim i pairs with i + rd/2 (i < rd/2); dims >= rd
 * pass through. */
static void rope_row(float *row, int nheads, int hd, int half, const float *c, const float *s) {
    for (int hh = 0; hh < nheads; hh++) {
        float *x1 = row + hh * hd, *x2 = x1 + half;
        for (int i = 0; i < half; i++) {
            float u = x1[i], w = x2[i];
            x1[i] = u * c[i] - w * s[i];
            x2[i] = w * c[i] + u * s[i];
        }
    }
}

/* RoPE on q (B, T, nh*hd) and k (B, T, kvh*hd), token t at position pos0 + t, angle pos * inv_freq[i].
 * inverse = 1 applies the transpose rotation (the backward pass, on dq and dk). cos/sin are computed
 * once per position for every sequence and head, in double: pos * inv_freq reaches 1e6 rad at long
 * context, where a float angle would lose the phase. */
static void rope(const softmax *a, float *q, float *k, int B, int T, int64_t pos0, int inverse, int nt) {
    const int half = a->rd / 2, hd = a->hd, qd = a->nh * hd, kd = a->kvh * hd;
    if (half == 0) return;
#pragma omp parallel for schedule(static) num_threads(nt) if ((int64_t)B * T * (qd + kd) > PAR_MIN_WORK)
    for (int t = 0; t < T; t++) {
        float c[MAX_HEAD_DIM / 2], s[MAX_HEAD_DIM / 2];
        const double pos = (double)(pos0 + t);
        for (int i = 0; i < half; i++) {
            double ang = pos * a->inv_freq[i];
            c[i] = (float)cos(ang);
            s[i] = inverse ? -(float)sin(ang) : (float)sin(ang);
        }
        for (int b = 0; b < B; b++) {
            rope_row(q + ((int64_t)b * T + t) * qd, a->nh, hd, half, c, s);
            rope_row(k + ((int64_t)b * T + t) * kd, a->kvh, hd, half, c, s);
        }
    }
}

/* ---- the blocked attention kernels --------------------------------------------------------- */

/* Causal attention of one (sequence, query head) for nq query rows at absolute positions p0 + i:
 * row i attends to keys 0..p0+i. q/o rows have stride qs/os, k/v rows stride ks. Online softmax over
 * key tiles of bk (flash attention): o accumulates unnormalised, rescaled when a row's maximum grows.
 * lse (may be NULL) receives each row's logsumexp of scaled scores, for the backward pass. */
static void attend_rows(const softmax *a, const float *q, int qs, const float *k, const float *v, int ks,
                        float *o, int os, float *lse, int nq, int64_t p0, float scale, float *tile) {
    const m1c_host *h = a->h;
    const int hd = a->hd;
    float *S = tile, *m = tile + BQ * a->bk, *l = m + BQ;
    const int64_t kend = p0 + nq;
    for (int64_t k0 = 0; k0 < kend; k0 += a->bk) {
        const int nk = (int)(kend - k0 < a->bk ? kend - k0 : a->bk);
        h->gemm(h, M1C_DEVICE_CPU, 0, 1, nq, nk, hd, scale, q, qs, k + k0 * ks, ks, 0.0f, S, a->bk);
        for (int i = 0; i < nq; i++) {
            float *Si = S + i * a->bk;
            int64_t lim64 = p0 + i - k0 + 1; /* keys of this tile row i may see */
            int lim = (int)(lim64 < 0 ? 0 : (lim64 > nk ? nk : lim64));
            for (int j = lim; j < nk; j++) Si[j] = 0.0f;
            if (lim == 0) continue; /* only when bk < BQ: a later tile entirely in row i's future */
            float mx = Si[0];
#pragma omp simd reduction(max : mx)
            for (int j = 1; j < lim; j++) mx = Si[j] > mx ? Si[j] : mx;
            float mnew = (k0 == 0 || mx > m[i]) ? mx : m[i];
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < lim; j++) {
                float p = exp_fast(Si[j] - mnew);
                Si[j] = p;
                sum += p;
            }
            if (k0 == 0) {
                l[i] = sum;
            } else {
                float c = exp_fast(m[i] - mnew);
                l[i] = l[i] * c + sum;
                if (c != 1.0f)
                    for (int d = 0; d < hd; d++) o[(int64_t)i * os + d] *= c;
            }
            m[i] = mnew;
        }
        h->gemm(h, M1C_DEVICE_CPU, 0, 0, nq, hd, nk, 1.0f, S, a->bk, v + k0 * ks, ks, k0 == 0 ? 0.0f : 1.0f, o,
                os);
    }
    for (int i = 0; i < nq; i++) {
        float inv = 1.0f / l[i];
        for (int d = 0; d < hd; d++) o[(int64_t)i * os + d] *= inv;
        if (lse) lse[i] = m[i] + logf(l[i]);
    }
}

/* Attention for every (sequence, query head, query tile): q (B, T, nh*hd) at positions pos + t, keys
 * and values of sequence b, KV head g at kbase + b*kb_stride + g*kg_stride with row stride ks (the
 * (B, T, kvh*hd) activations, or the (B, kvh, max_len, hd) cache); att (B, T, nh*hd); lse (B, nh, T)
 * or NULL. Heavy (late) query tiles go first so that the dynamic schedule ends evenly. */
static void attend_all(const softmax *a, const float *q, const float *kbase, const float *vbase,
                       int64_t kb_stride, int64_t kg_stride, int ks, float *att, float *lse, int B, int T,
                       int64_t pos, float *tiles, int nt) {
    const int nh = a->nh, hd = a->hd, qs = nh * hd, nqb = (T + BQ - 1) / BQ;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t ntask = (int64_t)B * nh * nqb;
    const double work = 4.0 * B * nh * T * ((double)pos + T) * hd;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (work > PAR_MIN_WORK)
    for (int64_t task = 0; task < ntask; task++) {
        float *tile = tiles + (int64_t)omp_get_thread_num() * a->tile;
        const int qb = nqb - 1 - (int)(task % nqb);
        const int hh = (int)((task / nqb) % nh), b = (int)(task / nqb / nh), g = hh / a->rep;
        const int i0 = qb * BQ, nq = T - i0 < BQ ? T - i0 : BQ;
        const int64_t r0 = (int64_t)b * T + i0;
        const float *k = kbase + b * kb_stride + g * kg_stride, *v = vbase + b * kb_stride + g * kg_stride;
        attend_rows(a, q + r0 * qs + hh * hd, qs, k, v, ks, att + r0 * qs + hh * hd, qs,
                    lse ? lse + ((int64_t)b * nh + hh) * T + i0 : NULL, nq, pos + i0, scale, tile);
    }
}

/* Backward of one (sequence, query head) over all T rows (positions 0..T-1), recomputing the scores
 * tile by tile from q, k and the saved logsumexp: dq is written, dk/dv (this head's own (T, hd)
 * slices, stride qs) accumulate. */
static void attend_backward_head(const softmax *a, const float *q, const float *k, const float *v, int ks,
                                 const float *o, const float *dO, const float *lse, float *dq, float *dk,
                                 float *dv, int T, float *tile) {
    const m1c_host *h = a->h;
    const int hd = a->hd, qs = a->nh * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *P = tile, *dP = tile + BQ * a->bk, *D = dP + BQ * a->bk;
    for (int t = 0; t < T; t++) {
        memset(dk + (int64_t)t * qs, 0, sizeof(float) * hd);
        memset(dv + (int64_t)t * qs, 0, sizeof(float) * hd);
    }
    for (int i0 = 0; i0 < T; i0 += BQ) {
        const int nq = T - i0 < BQ ? T - i0 : BQ;
        const float *qi = q + (int64_t)i0 * qs, *oi = o + (int64_t)i0 * qs, *dOi = dO + (int64_t)i0 * qs;
        float *dqi = dq + (int64_t)i0 * qs;
        for (int i = 0; i < nq; i++) { /* D_i = sum_d dO_id O_id = sum_j P_ij dP_ij */
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += dOi[(int64_t)i * qs + d] * oi[(int64_t)i * qs + d];
            D[i] = s;
        }
        const int kend = i0 + nq;
        for (int k0 = 0; k0 < kend; k0 += a->bk) {
            const int nk = kend - k0 < a->bk ? kend - k0 : a->bk;
            const float *kj = k + (int64_t)k0 * ks, *vj = v + (int64_t)k0 * ks;
            h->gemm(h, M1C_DEVICE_CPU, 0, 1, nq, nk, hd, scale, qi, qs, kj, ks, 0.0f, P, a->bk);
            h->gemm(h, M1C_DEVICE_CPU, 0, 1, nq, nk, hd, 1.0f, dOi, qs, vj, ks, 0.0f, dP, a->bk);
            for (int i = 0; i < nq; i++) {
                float *Pi = P + i * a->bk, *dPi = dP + i * a->bk;
                int lim = i0 + i - k0 + 1;
                lim = lim < 0 ? 0 : (lim > nk ? nk : lim);
                const float li = lse[i0 + i], Di = D[i];
#pragma omp simd
                for (int j = 0; j < lim; j++) Pi[j] = exp_fast(Pi[j] - li);
#pragma omp simd
                for (int j = 0; j < lim; j++) dPi[j] = Pi[j] * (dPi[j] - Di); /* dS = P * (dP - D) */
                for (int j = lim; j < nk; j++) Pi[j] = dPi[j] = 0.0f;
            }
            /* dq += scale dS k;  dk += scale dS^T q;  dv += P^T dO */
            h->gemm(h, M1C_DEVICE_CPU, 0, 0, nq, hd, nk, scale, dP, a->bk, kj, ks, k0 == 0 ? 0.0f : 1.0f, dqi, qs);
            h->gemm(h, M1C_DEVICE_CPU, 1, 0, nk, hd, nq, scale, dP, a->bk, qi, qs, 1.0f, dk + (int64_t)k0 * qs,
                    qs);
            h->gemm(h, M1C_DEVICE_CPU, 1, 0, nk, hd, nq, 1.0f, P, a->bk, dOi, qs, 1.0f, dv + (int64_t)k0 * qs,
                    qs);
        }
    }
}

/* ---- the layer ----------------------------------------------------------------------------- */

static int sm_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    *self = NULL;
#ifdef M1C_HAVE_CUDA
    if (info->device != M1C_DEVICE_CPU && info->device != M1C_DEVICE_CUDA)
        return h->error(h, "device %d: softmax runs on the CPU (0) or CUDA (1)", info->device);
#else
    if (info->device != M1C_DEVICE_CPU)
        return h->error(h, "device %d: this build of softmax has no CUDA code (rebuild with CUDA) and runs on the "
                           "CPU only", info->device);
#endif
    int64_t heads, kv_heads, head_dim, rotary_dim;
    double theta;
    if (h->get_int(h, s, "heads", 8, 1, 4096, &heads) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "kv_heads", heads, 1, heads, &kv_heads) != M1C_OK) return M1C_ERR;
    int64_t hd_def = info->hidden / heads > 0 ? info->hidden / heads : 1;
    if (hd_def > MAX_HEAD_DIM) hd_def = MAX_HEAD_DIM;
    if (h->get_int(h, s, "head_dim", hd_def, 1, MAX_HEAD_DIM, &head_dim) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "rotary_dim", head_dim, 0, head_dim, &rotary_dim) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "rope_theta", 1e6, 1.0, 1e12, &theta) != M1C_OK) return M1C_ERR;
    /* The CUDA path's attention kernels (no effect on the CPU): "auto" puts BF16 at head_dim 64 and 128 on
     * tensor cores, on warpgroup MMA where the build and the GPU have it (sm_90a, compute capability 9.0),
     * else on mma.sync; "wgmma" and "mma" ask for one of those, "cuda_cores" for the CUDA-core kernels of
     * every precision. */
    static const char *const kernel_choices[] = {"auto", "wgmma", "mma", "cuda_cores", NULL};
    const char *kernel;
    if (h->get_string(h, s, "kernel", "auto", kernel_choices, &kernel) != M1C_OK) return M1C_ERR;
    const int kern = !strcmp(kernel, "wgmma") ? SM_KERNEL_WGMMA
                     : !strcmp(kernel, "mma") ? SM_KERNEL_MMA
                     : !strcmp(kernel, "cuda_cores") ? SM_KERNEL_CUDA_CORES
                                                     : SM_KERNEL_AUTO;
    if ((kern == SM_KERNEL_WGMMA || kern == SM_KERNEL_MMA) && info->device == M1C_DEVICE_CUDA &&
        (info->compute_dtype != M1C_BF16 || (head_dim != 64 && head_dim != 128)))
        return h->settings_error(h, s, "kernel",
                                 "\"%s\" runs on tensor cores, which need precision bf16 and head_dim 64 or 128 "
                                 "(head_dim is %lld); use \"auto\" or \"cuda_cores\"",
                                 kernel, (long long)head_dim);
#ifdef M1C_HAVE_CUDA
    if (kern == SM_KERNEL_WGMMA && info->device == M1C_DEVICE_CUDA && !sm_cuda_wgmma_available())
        return h->settings_error(h, s, "kernel",
                                 "\"wgmma\" needs a build for sm_90a and a GPU of compute capability 9.0 "
                                 "(H100, H200); use \"auto\" or \"mma\"");
#endif
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    if (heads % kv_heads != 0)
        return h->settings_error(h, s, "kv_heads", "%lld must divide heads = %lld", (long long)kv_heads,
                                 (long long)heads);
    if (rotary_dim % 2 != 0)
        return h->settings_error(h, s, "rotary_dim", "%lld must be even (rotate_half pairs dim i with i + %lld)",
                                 (long long)rotary_dim, (long long)rotary_dim / 2);
    softmax *a = calloc(1, sizeof(*a));
    if (!a) return h->error(h, "out of memory");
    a->h = h;
    a->H = info->hidden;
    a->nh = (int)heads;
    a->kvh = (int)kv_heads;
    a->hd = (int)head_dim;
    a->rd = (int)rotary_dim;
    a->rep = a->nh / a->kvh;
    a->theta = theta;
    a->bk = TILE_MACS / (BQ * a->hd) / BK_MIN * BK_MIN;
    a->bk = a->bk < BK_MIN ? BK_MIN : (a->bk > BK_MAX ? BK_MAX : a->bk);
    a->tile = 2 * (int64_t)BQ * a->bk + 2 * BQ;
    for (int i = 0; i < a->rd / 2; i++) a->inv_freq[i] = pow(theta, -2.0 * i / a->rd);
    a->cache_dt = info->device == M1C_DEVICE_CUDA && info->compute_dtype == M1C_BF16 ? M1C_BF16 : M1C_F32;
#ifdef M1C_HAVE_CUDA
    if (info->device == M1C_DEVICE_CUDA &&
        sm_cuda_create(h, a->H, a->nh, a->kvh, a->hd, a->rd, theta, info->compute_dtype, kern, &a->cuda) != M1C_OK) {
        free(a);
        return M1C_ERR;
    }
#endif
    *self = a;
    return M1C_OK;
}

static void sm_destroy(void *self) {
#ifdef M1C_HAVE_CUDA
    softmax *a = self;
    if (a && a->cuda) sm_cuda_destroy(a->cuda);
#endif
    free(self);
}

static int sm_params(void *self, m1c_buf_spec *specs, int max) {
    softmax *a = self;
    const int64_t H = a->H, qd = (int64_t)a->nh * a->hd, kd = (int64_t)a->kvh * a->hd;
    /* HF Linear layout [out, in]: y = x W^T; initialised N(0, 0.02^2) */
    m1c_buf_spec s[N_PARAMS] = {
        spec("self_attn.q_proj.weight", 2, qd, H, 0, 0), /* P_Q */
        spec("self_attn.k_proj.weight", 2, kd, H, 0, 0), /* P_K */
        spec("self_attn.v_proj.weight", 2, kd, H, 0, 0), /* P_V */
        spec("self_attn.o_proj.weight", 2, H, qd, 0, 0), /* P_O */
    };
    /* each gradient is one product on the GPU: beta 0 when handed over unset (m1c_grad_beta) */
    for (int i = 0; i < N_PARAMS; i++) s[i].grad_written = 1;
    return m1c_put_specs(a->h, "softmax params", s, N_PARAMS, specs, max);
}

/* Kept for backward: roped q and k, v, the attention output before o_proj and the per-row logsumexp.
 * No T x T probabilities: backward recomputes them tile by tile. */
static int sm_acts(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    softmax *a = self;
#ifdef M1C_HAVE_CUDA
    if (a->cuda) return sm_cuda_acts(a->cuda, B, T, specs, max);
#endif
    const int64_t qd = (int64_t)a->nh * a->hd, kd = (int64_t)a->kvh * a->hd;
    const m1c_buf_spec s[N_ACTS] = {
        spec("self_attn.q", 3, B, T, qd, 0),          /* A_Q */
        spec("self_attn.k", 3, B, T, kd, 0),          /* A_K */
        spec("self_attn.v", 3, B, T, kd, 0),          /* A_V */
        spec("self_attn.att", 3, B, T, qd, 0),        /* A_ATT */
        spec("self_attn.lse", 3, B, a->nh, T, 0),     /* A_LSE */
    };
    return m1c_put_specs(a->h, "softmax acts", s, N_ACTS, specs, max);
}

/* Per call: gradients of q, of k and v per query head (summed over each KV group afterwards) and of the
 * attention output, plus one score tile per thread. forward without acts and step reuse the first
 * five for q, k, v, att and lse of the new tokens. */
static int sm_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    softmax *a = self;
#ifdef M1C_HAVE_CUDA
    if (a->cuda) return sm_cuda_scratch(a->cuda, B, T, specs, max);
#endif
    if (!specs) return N_SCRATCH;
    const int64_t qd = (int64_t)a->nh * a->hd;
    const m1c_buf_spec s[N_SCRATCH] = {
        spec("self_attn.dq", 3, B, T, qd, 0),                  /* S_DQ */
        spec("self_attn.dk", 3, B, T, qd, 0),                  /* S_DK */
        spec("self_attn.dv", 3, B, T, qd, 0),                  /* S_DV */
        spec("self_attn.datt", 3, B, T, qd, 0),                /* S_DATT */
        spec("self_attn.scratch_lse", 3, B, a->nh, T, 0),      /* S_LSE */
        spec("self_attn.tiles", 2, threads(a), a->tile, 0, 0), /* S_TILE */
    };
    return m1c_put_specs(a->h, "softmax scratch", s, N_SCRATCH, specs, max);
}

/* Threads to use: the host's count, at most the number of score tiles declared in scratch. */
static int tile_threads(const softmax *a, const m1c_layer_bufs *b) {
    int nt = threads(a);
    int64_t tiles = b->scratch[S_TILE].shape[0];
    return nt < tiles ? nt : (int)tiles;
}

static int check_scratch(const softmax *a, const m1c_layer_bufs *b, int B, int T) {
    const int64_t need = (int64_t)B * T * a->nh * a->hd;
    for (int i = S_DQ; i <= S_DATT; i++)
        if (m1c_tensor_numel(&b->scratch[i]) < need)
            return a->h->error(a->h, "scratch buffer %d holds %lld floats, (B=%d, T=%d) needs %lld", i,
                               (long long)m1c_tensor_numel(&b->scratch[i]), B, T, (long long)need);
    if (m1c_tensor_numel(&b->scratch[S_LSE]) < (int64_t)B * a->nh * T || b->scratch[S_TILE].shape[0] < 1 ||
        b->scratch[S_TILE].shape[1] < a->tile)
        return a->h->error(a->h, "scratch too small for (B=%d, T=%d)", B, T);
    return M1C_OK;
}

/* q, k, v projections of in (B*T rows) at positions pos + t, roped. */
static void project_qkv(const softmax *a, const m1c_layer_bufs *b, const float *in, float *q, float *k,
                        float *v, int B, int T, int64_t pos, int nt) {
    const m1c_host *h = a->h;
    const int H = a->H, qd = a->nh * a->hd, kd = a->kvh * a->hd, M = B * T;
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, M, qd, H, 1.0f, in, H, b->params[P_Q].data, H, 0.0f, q, qd);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, M, kd, H, 1.0f, in, H, b->params[P_K].data, H, 0.0f, k, kd);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, M, kd, H, 1.0f, in, H, b->params[P_V].data, H, 0.0f, v, kd);
    rope(a, q, k, B, T, pos, 0, nt);
}

static int sm_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    softmax *a = self;
    const m1c_host *h = a->h;
#ifdef M1C_HAVE_CUDA
    if (a->cuda) return sm_cuda_forward(a->cuda, b, out, in, B, T);
#endif
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    const int qd = a->nh * a->hd, kd = a->kvh * a->hd, nt = tile_threads(a, b);
    float *q, *k, *v, *att, *lse;
    if (b->acts) {
        q = b->acts[A_Q].data, k = b->acts[A_K].data, v = b->acts[A_V].data;
        att = b->acts[A_ATT].data, lse = b->acts[A_LSE].data;
    } else { /* inference without kept activations */
        q = b->scratch[S_DQ].data, k = b->scratch[S_DK].data, v = b->scratch[S_DV].data;
        att = b->scratch[S_DATT].data, lse = b->scratch[S_LSE].data;
    }
    project_qkv(a, b, in, q, k, v, B, T, 0, nt);
    attend_all(a, q, k, v, (int64_t)T * kd, a->hd, kd, att, lse, B, T, 0, b->scratch[S_TILE].data, nt);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, B * T, a->H, qd, 1.0f, att, qd, b->params[P_O].data, qd, 0.0f, out, a->H);
    return M1C_OK;
}

/* Sum the per-query-head gradients (B*T rows of nh*hd) over each KV group into (B*T rows of kvh*hd). */
static void reduce_groups(const softmax *a, const float *src, float *dst, int64_t rows, int nt) {
    const int hd = a->hd, rep = a->rep, qd = a->nh * hd, kd = a->kvh * hd;
#pragma omp parallel for schedule(static) num_threads(nt) if (rows * qd > PAR_MIN_WORK)
    for (int64_t r = 0; r < rows; r++) {
        for (int g = 0; g < a->kvh; g++) {
            float *d = dst + r * kd + g * hd;
            const float *s0 = src + r * qd + (int64_t)g * rep * hd;
            for (int e = 0; e < hd; e++) d[e] = s0[e];
            for (int j = 1; j < rep; j++)
                for (int e = 0; e < hd; e++) d[e] += s0[j * hd + e];
        }
    }
}

static int sm_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in,
                       int B, int T) {
    softmax *a = self;
    const m1c_host *h = a->h;
#ifdef M1C_HAVE_CUDA
    if (a->cuda) return sm_cuda_backward(a->cuda, b, din, dout, in, B, T);
#endif
    m1c_grads_zero_unset_cpu(b->grads, N_PARAMS);
    if (!b->acts) return h->error(h, "backward needs the activations of forward (acts is NULL)");
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    const int H = a->H, hd = a->hd, nh = a->nh, qd = nh * hd, kd = a->kvh * hd, M = B * T;
    const int nt = tile_threads(a, b);
    const float *q = b->acts[A_Q].data, *k = b->acts[A_K].data, *v = b->acts[A_V].data;
    const float *att = b->acts[A_ATT].data, *lse = b->acts[A_LSE].data;
    float *dq = b->scratch[S_DQ].data, *dkh = b->scratch[S_DK].data, *dvh = b->scratch[S_DV].data;
    float *datt = b->scratch[S_DATT].data, *tiles = b->scratch[S_TILE].data;
    const float *Wq = b->params[P_Q].data, *Wk = b->params[P_K].data, *Wv = b->params[P_V].data;
    const float *Wo = b->params[P_O].data;

    /* out = att Wo^T: datt = dout Wo, dWo += dout^T att */
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, M, qd, H, 1.0f, dout, H, Wo, qd, 0.0f, datt, qd);
    if (b->grads)
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, H, qd, M, 1.0f, dout, H, att, qd, 1.0f, b->grads[P_O].data, qd);

    const double work = 8.0 * B * nh * (double)T * T * hd;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (work > PAR_MIN_WORK)
    for (int task = 0; task < B * nh; task++) {
        const int bb = task / nh, hh = task % nh, g = hh / a->rep;
        const int64_t off = (int64_t)bb * T * qd + hh * hd, koff = (int64_t)bb * T * kd + g * hd;
        attend_backward_head(a, q + off, k + koff, v + koff, kd, att + off, datt + off,
                             lse + ((int64_t)bb * nh + hh) * T, dq + off, dkh + off, dvh + off, T,
                             tiles + (int64_t)omp_get_thread_num() * a->tile);
    }

    /* GQA: sum the per-query-head dk, dv over each group; datt is free now and (rep >= 2) holds both. */
    float *dk = dkh, *dv = dvh;
    if (a->rep > 1) {
        dk = datt;
        dv = datt + (int64_t)M * kd;
        reduce_groups(a, dkh, dk, M, nt);
        reduce_groups(a, dvh, dv, M, nt);
    }
    /* back through RoPE: the transpose rotation */
    rope(a, dq, dk, B, T, 0, 1, nt);

    /* q = in Wq^T (and k, v): dW += d^T in, din += d W */
    if (b->grads) {
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, qd, H, M, 1.0f, dq, qd, in, H, 1.0f, b->grads[P_Q].data, H);
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, kd, H, M, 1.0f, dk, kd, in, H, 1.0f, b->grads[P_K].data, H);
        h->gemm(h, M1C_DEVICE_CPU, 1, 0, kd, H, M, 1.0f, dv, kd, in, H, 1.0f, b->grads[P_V].data, H);
    }
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, M, H, qd, 1.0f, dq, qd, Wq, H, 1.0f, din, H);
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, M, H, kd, 1.0f, dk, kd, Wk, H, 1.0f, din, H);
    h->gemm(h, M1C_DEVICE_CPU, 0, 0, M, H, kd, 1.0f, dv, kd, Wv, H, 1.0f, din, H);
    return M1C_OK;
}

/* ---- incremental inference ----------------------------------------------------------------- */

/* KV cache: roped keys and values of every position so far, (batch, kvh, max_len, hd) so that one
 * head's keys are contiguous rows; bf16 under BF16 compute on CUDA (what forward attends with, and
 * half the memory), f32 otherwise. */
static int sm_state(void *self, int batch, int64_t max_len, m1c_buf_spec *specs, int max) {
    softmax *a = self;
    const m1c_buf_spec s[N_STATE] = {
        m1c_make_spec("self_attn.k_cache", a->cache_dt, 4, batch, a->kvh, max_len, a->hd), /* ST_K */
        m1c_make_spec("self_attn.v_cache", a->cache_dt, 4, batch, a->kvh, max_len, a->hd), /* ST_V */
    };
    return m1c_put_specs(a->h, "softmax state", s, N_STATE, specs, max);
}

/* T new tokens per sequence at positions pos..pos+T-1: append their k, v to the cache, attend over the
 * cache. The scratch must be declared for at least (B, T). */
static int sm_step(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B,
                   int T, int64_t pos) {
    softmax *a = self;
    const m1c_host *h = a->h;
#ifdef M1C_HAVE_CUDA
    if (a->cuda) return sm_cuda_step(a->cuda, b, state, out, in, B, T, pos);
#endif
    const int hd = a->hd, qd = a->nh * hd, kd = a->kvh * hd;
    const m1c_tensor *kc = &state[ST_K];
    const int64_t max_len = kc->shape[2];
    if (B > kc->shape[0])
        return h->error(h, "step: B = %d sequences but the KV cache holds %lld", B, (long long)kc->shape[0]);
    if (pos < 0 || pos + T > max_len)
        return h->error(h, "step: positions %lld..%lld exceed the KV cache length %lld", (long long)pos,
                        (long long)(pos + T - 1), (long long)max_len);
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    const int nt = tile_threads(a, b);
    float *q = b->scratch[S_DQ].data, *k = b->scratch[S_DK].data, *v = b->scratch[S_DV].data;
    float *att = b->scratch[S_DATT].data;
    float *kcache = state[ST_K].data, *vcache = state[ST_V].data;
    project_qkv(a, b, in, q, k, v, B, T, pos, nt);
    const int64_t gstride = max_len * hd, bstride = (int64_t)a->kvh * gstride;
#pragma omp parallel for schedule(static) num_threads(nt) if ((int64_t)B * T * kd > PAR_MIN_WORK)
    for (int64_t r = 0; r < (int64_t)B * T; r++) {
        const int64_t bb = r / T, t = r % T;
        for (int g = 0; g < a->kvh; g++) {
            int64_t dst = bb * bstride + g * gstride + (pos + t) * hd;
            memcpy(kcache + dst, k + r * kd + g * hd, sizeof(float) * hd);
            memcpy(vcache + dst, v + r * kd + g * hd, sizeof(float) * hd);
        }
    }
    attend_all(a, q, kcache, vcache, bstride, gstride, hd, att, NULL, B, T, pos, b->scratch[S_TILE].data, nt);
    h->gemm(h, M1C_DEVICE_CPU, 0, 1, B * T, a->H, qd, 1.0f, att, qd, b->params[P_O].data, qd, 0.0f, out, a->H);
    return M1C_OK;
}

/* Forward FLOPs (multiply-add = 2) of the token that attends to ctx keys (itself and ctx - 1 before it,
 * i.e. the token at 0-based position ctx - 1): the four projections plus q.k and p.v over ctx keys.
 * Softmax exponentials and RoPE are not counted. The causal average over a sequence of length T is
 * flops(T/2) (up to half a key). */
static double sm_flops(void *self, int64_t ctx) {
    softmax *a = self;
    const double H = a->H, qd = (double)a->nh * a->hd, kd = (double)a->kvh * a->hd;
    return 2.0 * H * (qd + 2.0 * kd) + 2.0 * qd * H + 4.0 * qd * (double)ctx;
}

static const m1c_attention_vtable vtable = {
    sizeof(m1c_attention_vtable),
    M1C_ATTENTION_DOUT_LP_ONLY, /* lp_inputs: BF16 on CUDA, whose backward takes dout_lp alone */
    {sm_create, sm_destroy, sm_params, sm_acts, sm_scratch, sm_forward, sm_backward},
    sm_state,
    sm_step,
    sm_flops,
    {0},
};

M1C_PLUGIN(ATTENTION, attention, vtable, "softmax", "0.1.0",
           "causal GQA softmax attention with partial RoPE and a KV cache (CPU, CUDA)", "MIT")
