/* GPU tests of the softmax attention plugin: the CUDA path against the CPU reference with the same
 * parameters (forward, input gradient and every parameter gradient, f32 and bf16 compute), inference
 * without kept activations, KV-cache decoding against the GPU's own full forward, and refusals.
 * Skipped where the build has no CUDA or the machine has no GPU. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "harness.h"

#define DEV M1C_DEVICE_CUDA
/* Weights N(0, 0.1^2) at H = 40..64: q, k of std ~0.8, scores of std ~0.6: a softmax that is neither
 * uniform nor one-hot, so every term of the backward matters, and bf16 score errors stay small. */
#define PSTD 0.1f

/* The shape of one configuration (harness.h, shared with the CPU tests); th_softmax_settings spells it. */
typedef th_softmax_cfg cfg;

static const cfg gqa_partial = {64, 4, 2, 32, 16, 10000.0, NULL}; /* GQA 2:1, half the dims rotate */
static const cfg mqa_full = {64, 8, 1, 64, 64, 1e6, NULL};        /* one KV head for 8, full rotary (HF) */
static const cfg mha_partial = {48, 2, 2, 64, 32, 1e7, NULL};     /* MHA */
static const cfg minimax_head = {64, 2, 1, 128, 64, 1e7, NULL};   /* M1's head: 128 dims, 64 rotate */
static const cfg odd_head = {40, 3, 1, 40, 24, 500.0, NULL};      /* hd not a multiple of the warp: edge lanes */

static const int Ts[] = {1, 5, 33, 130, 300}; /* 1, inside a tile, across tiles, tile remainders */

/* Tolerances, as a fraction of the reference's largest magnitude. */
typedef struct tol {
    double out, din, dw;
} tol;

/* f32 on both sides: the difference is summation order (cuBLAS vs OpenBLAS blocking, key tiles of 32 vs
 * the CPU's, expf vs the CPU's polynomial exp with < 1e-7 relative error) over sums of <= 600 terms:
 * ~1e-6 of the scale expected. 1e-4 leaves a wide margin; a wrong mask, RoPE pairing, head mapping or
 * missing softmax term is off by O(1). */
static const tol tol_f32 = {1e-4, 1e-4, 1e-4};
/* bf16 compute: the input, weights, q/k/v/att, dout and dq/dk/dv are rounded to bf16 (8-bit mantissa,
 * 2^-9 = 2e-3 relative per rounding) before f32-accumulated GEMMs; an output goes through ~4 such
 * roundings (x and W, q and k through the scores, att and Wo): ~6e-3 relative per element, so 2e-2 of
 * the scale. The input gradient adds dout's and dq/dk/dv's roundings and the dS = P (dP - D)
 * cancellation (D from the rounded att, dP from the rounded v): 3e-2. Weight gradients sum those
 * errors over up to B*T = 600 rows of products of two rounded operands: 5e-2. A real bug is O(1). */
static const tol tol_bf16 = {2e-2, 3e-2, 5e-2};

/* max |got - ref| / max(max |ref|, floor): the error as a fraction of the reference's scale. */
static double rel_to_scale(const float *got, const float *ref, int64_t n, double floor) {
    double scale = th_max_abs(ref, n);
    if (scale < floor) scale = floor;
    cr_assert_gt(scale, 0.0, "reference is all zero: the comparison would prove nothing");
    return th_max_abs_diff(got, ref, n) / scale;
}

static void check(const char *what, const cfg *c, int B, int T, int dt, const float *got, const float *ref,
                  int64_t n, double floor, double tolerance) {
    double e = rel_to_scale(got, ref, n, floor);
    const char *k = c->kernel ? c->kernel : "auto";
    cr_log_info("%s hd=%d nh=%d kvh=%d B=%d T=%d %s kernel %s: max |diff| / scale %.3g", what, c->hd, c->nh, c->kvh,
                B, T, dt == M1C_BF16 ? "bf16" : "f32", k, e);
    cr_assert_leq(e, tolerance,
                  "%s (H=%d nh=%d kvh=%d hd=%d rd=%d B=%d T=%d, %s, kernel %s): GPU differs from CPU by %.3g of the "
                  "scale (tolerance %.3g)",
                  what, c->H, c->nh, c->kvh, c->hd, c->rd, B, T, dt == M1C_BF16 ? "bf16" : "f32", k, e, tolerance);
}

static float *dev_to_host(const void *p, int64_t n) { return th_to_host(DEV, (const float *)p, n); }

/* Forward and backward on the GPU and on the CPU from the same parameters and inputs. din and the
 * parameter gradients start from the same random values on both sides (backward must add, not
 * write); the comparison is of what backward added. */
static void check_vs_cpu(const cfg *c, int B, int T, int dt, uint64_t seed) {
    const th_text st = th_softmax_settings(c);
    const tol *tl = dt == M1C_BF16 ? &tol_bf16 : &tol_f32;
    th_layer *cpu = th_layer_new("softmax", st.s, 0, 1, c->H, B, T, seed, PSTD);
    th_layer *gpu = th_layer_new_dev("softmax", st.s, 0, 1, c->H, B, T, seed, PSTD, DEV, dt);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *din0 = th_randn(n, seed + 3, 1.0f);
    float *out = th_zeros(n), *din = malloc((size_t)n * sizeof(float));
    memcpy(din, din0, (size_t)n * sizeof(float));
    float *in_d = th_to_dev(DEV, in, n), *dout_d = th_to_dev(DEV, dout, n), *din_d = th_to_dev(DEV, din0, n);
    float *out_d = th_to_dev(DEV, out, n);

    th_forward(cpu, out, in);
    th_forward(gpu, out_d, in_d);
    float *out_g = th_to_host(DEV, out_d, n);
    check("out", c, B, T, dt, out_g, out, n, 0.0, tl->out);

    float **g0 = calloc((size_t)cpu->np, sizeof *g0);
    for (int p = 0; p < cpu->np; p++) {
        const int64_t m = cpu->grads[p].shape[0] * cpu->grads[p].shape[1];
        g0[p] = th_randn(m, seed + 10 + (uint64_t)p, 1.0f);
        memcpy(cpu->grads[p].data, g0[p], (size_t)m * sizeof(float));
        m1c_dev_copy(DEV, gpu->grads[p].data, M1C_DEVICE_CPU, g0[p], (size_t)m * sizeof(float));
    }
    th_backward(cpu, din, dout, in);
    th_backward(gpu, din_d, dout_d, in_d);
    float *din_g = th_to_host(DEV, din_d, n);
    for (int64_t i = 0; i < n; i++) din[i] -= din0[i], din_g[i] -= din0[i];
    check("din", c, B, T, dt, din_g, din, n, 0.0, tl->din);

    /* With T = 1 each query sees one key: dq = dk = 0 exactly, and the reference dWq, dWk are rounding
     * noise. Each parameter's scale is therefore at least 1e-2 of the layer's largest gradient. */
    double gmax = 0.0;
    float **gc = calloc((size_t)cpu->np, sizeof *gc), **gg = calloc((size_t)cpu->np, sizeof *gg);
    for (int p = 0; p < cpu->np; p++) {
        const int64_t m = cpu->grads[p].shape[0] * cpu->grads[p].shape[1];
        gc[p] = cpu->grads[p].data;
        gg[p] = dev_to_host(gpu->grads[p].data, m);
        for (int64_t i = 0; i < m; i++) gc[p][i] -= g0[p][i], gg[p][i] -= g0[p][i];
        double s = th_max_abs(gc[p], m);
        gmax = s > gmax ? s : gmax;
    }
    for (int p = 0; p < cpu->np; p++) {
        const int64_t m = cpu->grads[p].shape[0] * cpu->grads[p].shape[1];
        check(cpu->pspec[p].name, c, B, T, dt, gg[p], gc[p], m, 1e-2 * gmax, tl->dw);
        free(gg[p]), free(g0[p]);
    }
    free(gc), free(gg), free(g0);
    th_dev_free(DEV, in_d), th_dev_free(DEV, dout_d), th_dev_free(DEV, din_d), th_dev_free(DEV, out_d);
    free(in), free(dout), free(din0), free(out), free(din), free(out_g), free(din_g);
    th_layer_free(cpu);
    th_layer_free(gpu);
}

static void check_all_T(const cfg *c, int dt, uint64_t seed) {
    for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++) {
        const int T = Ts[i], B = T >= 300 ? 1 : 2;
        check_vs_cpu(c, B, T, dt, seed + 100 * i);
    }
}

Test(softmax_cuda, f32_gqa_partial_rotary) { th_need_gpu(), check_all_T(&gqa_partial, M1C_F32, 1000); }
Test(softmax_cuda, f32_mqa_full_rotary) { th_need_gpu(), check_all_T(&mqa_full, M1C_F32, 2000); }
Test(softmax_cuda, f32_mha) { th_need_gpu(), check_all_T(&mha_partial, M1C_F32, 3000); }
Test(softmax_cuda, f32_head_dim_128) { th_need_gpu(), check_all_T(&minimax_head, M1C_F32, 4000); }
Test(softmax_cuda, f32_odd_head_dim) { th_need_gpu(), check_all_T(&odd_head, M1C_F32, 5000); }
Test(softmax_cuda, bf16_gqa_partial_rotary) { th_need_gpu(), check_all_T(&gqa_partial, M1C_BF16, 6000); }
Test(softmax_cuda, bf16_mqa_full_rotary) { th_need_gpu(), check_all_T(&mqa_full, M1C_BF16, 7000); }
Test(softmax_cuda, bf16_mha) { th_need_gpu(), check_all_T(&mha_partial, M1C_BF16, 8000); }
Test(softmax_cuda, bf16_head_dim_128) { th_need_gpu(), check_all_T(&minimax_head, M1C_BF16, 9000); }
Test(softmax_cuda, bf16_odd_head_dim) { th_need_gpu(), check_all_T(&odd_head, M1C_BF16, 9500); }

/* BF16 at head_dim 64 and 128 runs the tensor-core kernels (tiles of 64 queries and 64 keys): T
 * just under, at and over one tile, two tiles plus a remainder, and several tiles with a partial
 * last one, under MHA, GQA 2:1 and MQA, with each backward the build and GPU have (kernel = "mma",
 * and "wgmma" on sm_90a builds on sm_90). P and dS are rounded to bf16 before their GEMMs, one more
 * rounding (2^-9 relative per term, summed over <= 300 keys with random signs for dS) than the
 * tolerances above already allow for: they stand. */
static const cfg gqa_hd64 = {64, 4, 2, 64, 32, 10000.0, NULL};

/* 1 where the softmax plugin accepts kernel = "wgmma" on the GPU (its message otherwise in the log). */
static int wgmma_runs(void) {
    const m1c_layer_info info = {sizeof info, 0, 1, 64, M1C_DEVICE_CUDA, M1C_BF16, 1, 0, 0, {0}};
    m1c_plugin *p = NULL;
    const int ok = th_try_create("softmax", M1C_KIND_ATTENTION, "heads = 1; head_dim = 64; kernel = \"wgmma\";", &info,
                                 &p) == M1C_OK;
    if (!ok) cr_log_info("kernel = \"wgmma\" not run: %s", p->error);
    return ok;
}

/* The tensor-core kernels refused where they cannot run, the message naming the key. */
Test(softmax_cuda, kernel_setting_refused) {
    th_need_gpu();
    const m1c_layer_info f32 = {sizeof f32, 0, 1, 64, M1C_DEVICE_CUDA, M1C_F32, 1, 0, 0, {0}};
    const m1c_layer_info bf16 = {sizeof bf16, 0, 1, 64, M1C_DEVICE_CUDA, M1C_BF16, 1, 0, 0, {0}};
    m1c_plugin *p = NULL;
    cr_assert_eq(th_try_create("softmax", M1C_KIND_ATTENTION, "heads = 1; head_dim = 64; kernel = \"mma\";", &f32, &p),
                 M1C_ERR, "kernel = \"mma\" at f32 was accepted");
    th_assert_has(p->error, "kernel");
    cr_assert_eq(th_try_create("softmax", M1C_KIND_ATTENTION, "heads = 1; head_dim = 32; kernel = \"wgmma\";", &bf16,
                               &p),
                 M1C_ERR, "kernel = \"wgmma\" at head_dim 32 was accepted");
    th_assert_has(p->error, "head_dim");
    cr_assert_eq(th_try_create("softmax", M1C_KIND_ATTENTION, "heads = 1; head_dim = 64; kernel = \"cuda_cores\";",
                               &bf16, &p),
                 M1C_OK, "%s", p->error);
}

Test(softmax_cuda, bf16_tensor_core_tile_edges) {
    th_need_gpu();
    static const int edge_T[] = {63, 64, 65, 130, 300};
    static const char *const kernels[] = {"mma", "wgmma"};
    const cfg *cs[] = {&gqa_hd64, &mha_partial, &mqa_full, &minimax_head};
    const int nk = wgmma_runs() ? 2 : 1;
    for (int k = 0; k < nk; k++)
        for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++)
            for (size_t i = 0; i < sizeof edge_T / sizeof edge_T[0]; i++) {
                const int T = edge_T[i], B = T >= 130 ? 1 : 2;
                cfg ck = *cs[c];
                ck.kernel = kernels[k];
                check_vs_cpu(&ck, B, T, M1C_BF16, 9700 + 100 * c + i);
            }
}

/* Scores of std ~6 (weights std 0.3): a peaked softmax, so a missing max-subtraction or a wrong
 * online rescale overflows or shows; f32 only (bf16 score errors of ~|s| * 4e-3 would need a looser
 * bound that proves less). */
Test(softmax_cuda, f32_sharp_scores) {
    th_need_gpu();
    const cfg *c = &gqa_partial;
    const int B = 1, T = 130;
    const th_text st = th_softmax_settings(c);
    th_layer *cpu = th_layer_new("softmax", st.s, 0, 1, c->H, B, T, 77, 0.3f);
    th_layer *gpu = th_layer_new_dev("softmax", st.s, 0, 1, c->H, B, T, 77, 0.3f, DEV, M1C_F32);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, 78, 1.0f), *out = th_zeros(n), *in_d = th_to_dev(DEV, in, n);
    float *out_d = th_to_dev(DEV, out, n);
    th_forward(cpu, out, in);
    th_forward(gpu, out_d, in_d);
    float *out_g = th_to_host(DEV, out_d, n);
    /* Scores ~30 in magnitude: an f32 rounding of a score moves its probability by ~30 * 6e-8; the
     * same 1e-4 of the scale as above still leaves > 10x margin. */
    check("out (sharp)", c, B, T, M1C_F32, out_g, out, n, 0.0, 1e-4);
    th_dev_free(DEV, in_d), th_dev_free(DEV, out_d);
    free(in), free(out), free(out_g);
    th_layer_free(cpu);
    th_layer_free(gpu);
}

/* Inference without kept activations (acts NULL) computes the same output through scratch. */
static void check_no_acts(const cfg *c, int dt) {
    const int B = 2, T = 45;
    const th_text st = th_softmax_settings(c);
    th_layer *gpu = th_layer_new_dev("softmax", st.s, 0, 1, c->H, B, T, 31, PSTD, DEV, dt);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, 32, 1.0f), *zero = th_zeros(n);
    float *in_d = th_to_dev(DEV, in, n), *a_d = th_to_dev(DEV, zero, n), *b_d = th_to_dev(DEV, zero, n);
    th_forward(gpu, a_d, in_d);
    m1c_tensor *acts = gpu->bufs.acts;
    gpu->bufs.acts = NULL;
    gpu->bufs.training = 0;
    th_forward(gpu, b_d, in_d);
    gpu->bufs.acts = acts;
    float *a = th_to_host(DEV, a_d, n), *b = th_to_host(DEV, b_d, n);
    /* The same kernels on the same values; only cuBLAS's kernel choice may differ with the buffers'
     * alignment (summation order): f32 1e-5 of the scale; bf16 outputs of att may then round to the
     * neighbouring bf16 value (4e-3 relative): 1e-2. */
    check("out without acts", c, B, T, dt, b, a, n, 0.0, dt == M1C_BF16 ? 1e-2 : 1e-5);
    th_dev_free(DEV, in_d), th_dev_free(DEV, a_d), th_dev_free(DEV, b_d);
    free(in), free(zero), free(a), free(b);
    th_layer_free(gpu);
}

Test(softmax_cuda, forward_without_acts) {
    th_need_gpu();
    check_no_acts(&gqa_partial, M1C_F32);
    check_no_acts(&minimax_head, M1C_BF16);
}

/* ---- KV cache ---- */

/* rows pos..pos+len-1 of each of B sequences of (B, T, H) into (B, len, H) */
static void slice_rows(float *dst, const float *src, int B, int T, int H, int pos, int len) {
    for (int b = 0; b < B; b++)
        memcpy(dst + (size_t)b * len * H, src + ((size_t)b * T + pos) * H, (size_t)len * H * sizeof(float));
}

/* Prefill then decode on the GPU against the GPU's full forward of the whole sequence. */
static void check_step(const cfg *c, int dt, int B, int T, const int *chunks, int n_chunks, uint64_t seed) {
    const th_text st = th_softmax_settings(c);
    th_layer *l = th_layer_new_dev("softmax", st.s, 0, 1, c->H, B, T, seed, PSTD, DEV, dt);
    const m1c_attention_vtable *vt = M1C_ATTENTION(l->plugin);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, seed + 1, 1.0f), *zero = th_zeros(n);
    float *cin = th_zeros(n), *want = th_zeros(n);
    float *in_d = th_to_dev(DEV, in, n), *full_d = th_to_dev(DEV, zero, n);
    th_forward(l, full_d, in_d);
    float *full = th_to_host(DEV, full_d, n);
    th_state *s = th_state_new(l, B, T + 3); /* a cache a little longer than used */
    /* BF16 keeps the cache in bf16 (what forward attends with); F32 in f32 */
    for (int i = 0; i < s->n; i++)
        cr_assert_eq(s->spec[i].dtype, dt == M1C_BF16 ? M1C_BF16 : M1C_F32, "KV cache %s has dtype %d under %s",
                     s->spec[i].name, s->spec[i].dtype, dt == M1C_BF16 ? "bf16" : "f32");
    int pos = 0;
    for (int ci = 0; ci < n_chunks; ci++) {
        const int len = chunks[ci];
        const int64_t m = (int64_t)B * len * c->H;
        slice_rows(cin, in, B, T, c->H, pos, len);
        slice_rows(want, full, B, T, c->H, pos, len);
        float *cin_d = th_to_dev(DEV, cin, m), *cout_d = th_to_dev(DEV, zero, m);
        if (vt->step(l->self, &l->bufs, s->t, cout_d, cin_d, B, len, pos) != M1C_OK)
            cr_assert_fail("step at pos %d: %s", pos, l->plugin->error);
        float *cout = th_to_host(DEV, cout_d, m);
        /* f32: the same math with GEMMs of other shapes (summation order): 1e-4 of the scale as against
         * the CPU. bf16: both round the roped q, k, v to bf16 (the step's k, v in the bf16 cache) and run
         * the same attention kernel over the same absolute key tiles, but the projections are GEMMs of
         * other shapes (B*len vs B*T rows: cuBLAS may sum in another order), so an f32 value a few ulps
         * apart can round to the neighbouring bf16 value (4e-3 relative) in q, k, v or att: the bf16
         * bound of forward, 2e-2. A stale or misplaced cache row or a wrong position is off by O(1). */
        char what[64];
        snprintf(what, sizeof what, "step pos %d len %d", pos, len);
        check(what, c, B, len, dt, cout, want, m, th_max_abs(full, n), dt == M1C_BF16 ? 2e-2 : 1e-4);
        th_dev_free(DEV, cin_d), th_dev_free(DEV, cout_d);
        free(cout);
        pos += len;
    }
    cr_assert_eq(pos, T);
    /* past the cache's end: refused, not written */
    float *cin_d = th_to_dev(DEV, cin, (int64_t)B * 4 * c->H), *cout_d = th_to_dev(DEV, zero, (int64_t)B * 4 * c->H);
    cr_assert_eq(vt->step(l->self, &l->bufs, s->t, cout_d, cin_d, B, 4, T), M1C_ERR,
                 "a step past the KV cache's end must be refused");
    cr_assert(strstr(l->plugin->error, "KV cache") != NULL, "unclear error: %s", l->plugin->error);
    th_dev_free(DEV, cin_d), th_dev_free(DEV, cout_d);
    th_state_free(s);
    th_dev_free(DEV, in_d), th_dev_free(DEV, full_d);
    free(in), free(zero), free(cin), free(want), free(full);
    th_layer_free(l);
}

Test(softmax_cuda, step_prefill_then_decode_matches_forward) {
    th_need_gpu();
    int chunks[1 + 7] = {33}; /* a prefill across two key tiles, then 7 decoding steps */
    for (int i = 1; i < 8; i++) chunks[i] = 1;
    for (int dt = M1C_F32; dt <= M1C_BF16; dt++) {
        check_step(&gqa_partial, dt, 2, 40, chunks, 8, 300 + (uint64_t)dt);
        check_step(&minimax_head, dt, 2, 40, chunks, 8, 310 + (uint64_t)dt);
        check_step(&odd_head, dt, 1, 40, chunks, 8, 320 + (uint64_t)dt);
    }
}

Test(softmax_cuda, step_chunked_prefill) {
    th_need_gpu();
    const int chunks[] = {70, 1, 64, 5, 1}; /* multi-token steps that start mid-tile */
    check_step(&mqa_full, M1C_F32, 1, 141, chunks, 5, 400);
    check_step(&mqa_full, M1C_BF16, 1, 141, chunks, 5, 401);
}

/* Chunked prefill as a long-context prefill runs it, BF16 through the tensor-core kernel on the bf16
 * cache (head_dim 64 and 128) and the CUDA-core fallback (head_dim 40), F32 unchanged: chunks of 63,
 * 1, 130, 64, 300, 1, 63 start at positions 0, 63, 64, 194, 258, 558, 559 (a tile's last row, a tile
 * boundary, and mid-tile starts, so a chunk's query tiles straddle the cache's 64-key tiles and its
 * causal diagonal falls inside a key tile). */
Test(softmax_cuda, step_chunked_prefill_long) {
    th_need_gpu();
    const int chunks[] = {63, 1, 130, 64, 300, 1, 63}; /* sum 622 */
    for (int dt = M1C_F32; dt <= M1C_BF16; dt++) {
        check_step(&gqa_hd64, dt, 2, 622, chunks, 7, 500 + (uint64_t)dt);
        check_step(&mqa_full, dt, 1, 622, chunks, 7, 510 + (uint64_t)dt);
        check_step(&minimax_head, dt, 1, 622, chunks, 7, 520 + (uint64_t)dt);
        check_step(&odd_head, dt, 1, 622, chunks, 7, 530 + (uint64_t)dt);
    }
}

/* ---- refusals ---- */

static void create_fails(const char *settings, int dt, const char *needle) {
    m1c_plugin *p = th_plugin("softmax", M1C_KIND_ATTENTION);
    m1c_config *cfgp = NULL;
    m1c_settings *s = th_settings(settings, &cfgp);
    m1c_layer_info info = {sizeof info, 0, 1, 64, DEV, dt, 1, 0, 0, {0}};
    void *self = NULL;
    cr_assert_eq(M1C_ATTENTION(p)->ops.create(&p->host, s, &info, &self), M1C_ERR, "'%s' must be refused", settings);
    cr_assert_null(self);
    cr_assert(strstr(p->error, needle) != NULL, "the error should name %s: %s", needle, p->error);
    m1c_config_free(cfgp);
}

Test(softmax_cuda, refuses_what_it_cannot_do) {
    th_need_gpu();
    create_fails("heads = 2; head_dim = 512;", M1C_F32, "head_dim");
    create_fails("heads = 2; head_dim = 32;", 7, "compute_dtype");
}
