/* Tests of the softmax attention plugin: forward against a naive double-precision reference (explicit
 * RoPE, GQA head mapping, causal softmax), finite-difference gradients, KV-cache decoding against the
 * full forward, and refusal of bad settings. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "harness.h"

/* The shape of one configuration (harness.h, shared with the GPU tests); th_softmax_settings spells it. */
typedef th_softmax_cfg cfg;

static const float *param(th_layer *l, const char *name) {
    return th_find_buf(l->params, l->pspec, l->np, name)->data;
}

/* rotate_half RoPE on one head vector x[hd] at position pos, written out from the definition. */
static void ref_rope(double *x, const cfg *c, int pos) {
    const int half = c->rd / 2;
    for (int i = 0; i < half; i++) {
        const double inv_freq = pow(c->theta, -2.0 * i / c->rd), ang = pos * inv_freq;
        const double x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos(ang) - x2 * sin(ang);
        x[i + half] = x2 * cos(ang) + x1 * sin(ang);
    }
}

/* out (B, T, H) = causal GQA softmax attention of in, in double, with HF Linear weights [out, in]. */
static void ref_forward(const cfg *c, th_layer *l, const float *in, int B, int T, double *out) {
    const int H = c->H, nh = c->nh, kvh = c->kvh, hd = c->hd, qd = nh * hd, kd = kvh * hd;
    const float *Wq = param(l, "self_attn.q_proj.weight"), *Wk = param(l, "self_attn.k_proj.weight");
    const float *Wv = param(l, "self_attn.v_proj.weight"), *Wo = param(l, "self_attn.o_proj.weight");
    double *q = calloc((size_t)B * T * qd, sizeof(double)), *k = calloc((size_t)B * T * kd, sizeof(double));
    double *v = calloc((size_t)B * T * kd, sizeof(double)), *o = calloc((size_t)qd, sizeof(double));
    double *p = calloc((size_t)T, sizeof(double));
    for (int r = 0; r < B * T; r++) {
        const float *x = in + (size_t)r * H;
        for (int j = 0; j < qd; j++)
            for (int i = 0; i < H; i++) q[(size_t)r * qd + j] += (double)Wq[j * H + i] * x[i];
        for (int j = 0; j < kd; j++)
            for (int i = 0; i < H; i++) {
                k[(size_t)r * kd + j] += (double)Wk[j * H + i] * x[i];
                v[(size_t)r * kd + j] += (double)Wv[j * H + i] * x[i];
            }
        const int pos = r % T;
        for (int hh = 0; hh < nh; hh++) ref_rope(q + (size_t)r * qd + hh * hd, c, pos);
        for (int g = 0; g < kvh; g++) ref_rope(k + (size_t)r * kd + g * hd, c, pos);
    }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            for (int hh = 0; hh < nh; hh++) {
                const int g = hh / (nh / kvh); /* GQA: consecutive query heads share a KV head */
                const double *qi = q + ((size_t)b * T + t) * qd + hh * hd;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    const double *kj = k + ((size_t)b * T + j) * kd + g * hd;
                    double s = 0;
                    for (int d = 0; d < hd; d++) s += qi[d] * kj[d];
                    p[j] = s / sqrt((double)hd);
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= t; j++) sum += (p[j] = exp(p[j] - mx));
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++) acc += p[j] * v[((size_t)b * T + j) * kd + g * hd + d];
                    o[hh * hd + d] = acc / sum;
                }
            }
            double *y = out + ((size_t)b * T + t) * H;
            for (int i = 0; i < H; i++) {
                y[i] = 0;
                for (int j = 0; j < qd; j++) y[i] += (double)Wo[i * qd + j] * o[j];
            }
        }
    free(q), free(k), free(v), free(o), free(p);
}

/* Forward vs the reference; param_std sets how sharp the softmax gets. */
static void check_forward(const cfg *c, int B, int T, float param_std, uint64_t seed) {
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, B, T, seed, param_std);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, seed + 1, 1.0f), *out = th_zeros(n), *ref = th_zeros(n);
    double *refd = calloc((size_t)n, sizeof(double));
    th_forward(l, out, in);
    ref_forward(c, l, in, B, T, refd);
    for (int64_t i = 0; i < n; i++) ref[i] = (float)refd[i];
    const double scale = th_max_abs(ref, n);
    cr_assert_gt(scale, 1e-3, "reference output is ~0: the test would prove nothing");
    /* f32 vs f64: each output is a few dot products of length <= max(H, nh*hd, T) (<= 300) of O(1..30)
     * terms, plus exp of scores up to ~30 in magnitude (an f32 rounding of a score is a relative error of
     * ~30 * 6e-8 = 2e-6 on its probability). Observed worst ~1e-6 of the output scale; 2e-5 of the
     * scale absolute plus 1e-4 relative leaves 10x margin while a wrong RoPE pairing, head mapping or
     * mask is off by O(scale). */
    double err = th_rel_err(out, ref, n, 2e-5 * scale, 1e-4);
    cr_log_info("forward T=%d: max |diff| %.3g of scale %.3g", T, th_max_abs_diff(out, ref, n), scale);
    cr_assert_leq(err, 1.0, "H=%d nh=%d kvh=%d hd=%d rd=%d B=%d T=%d: forward differs from the reference "
                            "(max |diff| %.3g, scale %.3g)",
                  c->H, c->nh, c->kvh, c->hd, c->rd, B, T, th_max_abs_diff(out, ref, n), scale);
    free(in), free(out), free(ref), free(refd);
    th_layer_free(l);
}

static const cfg gqa_partial = {16, 4, 2, 8, 4, 10000.0, NULL}; /* rotary_dim < head_dim, like MiniMax */
static const cfg mha_full = {12, 2, 2, 6, 6, 1e6, NULL};         /* HF: full rotary, theta 1e6 */
static const cfg mqa_odd = {10, 3, 1, 10, 8, 500.0, NULL};       /* one KV head, odd head count */
/* MiniMax-M1's head: 128 dims of which 64 rotate, theta 1e7. A head this wide makes the plugin's key
 * tiles (sized to keep tile GEMMs small) narrower than its query tiles. */
static const cfg wide_head = {8, 2, 1, 128, 64, 1e7, NULL};

Test(softmax, forward_matches_reference_gqa_partial_rotary) {
    check_forward(&gqa_partial, 2, 1, 0.3f, 10);
    check_forward(&gqa_partial, 2, 5, 0.3f, 11);
    check_forward(&gqa_partial, 2, 33, 0.3f, 12);
}

Test(softmax, forward_matches_reference_mha_full_rotary) {
    check_forward(&mha_full, 2, 1, 0.3f, 20);
    check_forward(&mha_full, 2, 5, 0.3f, 21);
    check_forward(&mha_full, 2, 33, 0.3f, 22);
}

Test(softmax, forward_matches_reference_mqa) { check_forward(&mqa_odd, 3, 17, 0.3f, 30); }

/* T = 300 spans several query tiles and more than one key tile (online-softmax rescaling); std 1.0
 * makes scores of magnitude ~30, so a missing max-subtraction or a wrong rescale shows. */
Test(softmax, forward_matches_reference_long_and_sharp) {
    check_forward(&gqa_partial, 1, 300, 0.3f, 40);
    check_forward(&gqa_partial, 1, 70, 1.0f, 41);
}

Test(softmax, forward_matches_reference_wide_head) { check_forward(&wide_head, 2, 70, 0.3f, 50); }

/* ---- gradients ---- */

static void check_gradients(const cfg *c, int B, int T, int samples, double tol, uint64_t seed) {
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, B, T, seed, 0.3f);
    float *in = th_randn((int64_t)B * T * c->H, seed + 1, 1.0f);
    double worst = th_fd_check_layer(l, in, 1e-2f, samples, seed + 2);
    cr_log_info("fd T=%d: worst %.3g", T, worst);
    cr_assert_leq(worst, tol, "H=%d nh=%d kvh=%d hd=%d rd=%d B=%d T=%d: worst fd relative error %.3g", c->H,
                  c->nh, c->kvh, c->hd, c->rd, B, T, worst);
    free(in);
    th_layer_free(l);
}

/* Central differences (eps 1e-2) of a loss summed in double over f32 outputs: truncation error
 * ~eps^2 * f''' ~ 1e-4 relative; the f32 rounding of the outputs puts ~1e-7 * sqrt(n) * |out| / eps
 * ~ 2e-5..2e-4 absolute noise on each numeric derivative. The harness divides by max(1e-3, |a|+|n|),
 * so gradients near 1e-2 see up to ~1e-2 of noise. Observed worst: ~1.5e-3 for the small configs, up
 * to 1.3e-2 for the wide head (256 attention channels: outputs ~4x larger, gradients ~1e-2). Limits
 * 1e-2 and 4e-2; a missing RoPE transpose, group reduction, mask or softmax term is off by O(1). */
Test(softmax, gradients_gqa_partial_rotary) { check_gradients(&gqa_partial, 2, 9, 24, 1e-2, 100); }
Test(softmax, gradients_mha_full_rotary) { check_gradients(&mha_full, 2, 5, 24, 1e-2, 110); }
Test(softmax, gradients_mqa) { check_gradients(&mqa_odd, 1, 7, 24, 1e-2, 120); }
/* Several query tiles and two key tiles in backward's recomputation. */
Test(softmax, gradients_long) { check_gradients(&gqa_partial, 1, 300, 12, 1e-2, 130); }
/* Key tiles narrower than query tiles. */
Test(softmax, gradients_wide_head) { check_gradients(&wide_head, 1, 40, 12, 4e-2, 140); }

/* Gradients accumulate (+=): two backward calls give twice one call, for din and every parameter. And
 * with grads NULL (input gradient only) din is the same. */
Test(softmax, backward_accumulates) {
    const cfg *c = &gqa_partial;
    const int B = 2, T = 9;
    const int64_t n = (int64_t)B * T * c->H;
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, B, T, 7, 0.3f);
    float *in = th_randn(n, 8, 1.0f), *dout = th_randn(n, 9, 1.0f), *out = th_zeros(n);
    float *din1 = th_zeros(n), *din2 = th_zeros(n), *din0 = th_zeros(n);
    th_forward(l, out, in);
    th_layer_zero_grads(l);
    th_backward(l, din1, dout, in);
    float **g1 = calloc((size_t)l->np, sizeof *g1);
    for (int p = 0; p < l->np; p++) {
        int64_t m = l->grads[p].shape[0] * l->grads[p].shape[1];
        g1[p] = malloc((size_t)m * sizeof(float));
        memcpy(g1[p], l->grads[p].data, (size_t)m * sizeof(float));
        cr_assert_gt(th_max_abs(g1[p], m), 0.0, "%s: gradient is all zero", l->pspec[p].name);
    }
    memcpy(din2, din1, (size_t)n * sizeof(float));
    th_backward(l, din2, dout, in);
    for (int64_t i = 0; i < n; i++) din1[i] *= 2.0f;
    /* The second call repeats the first's arithmetic exactly, but din receives three GEMM terms (from q,
     * k and v) onto a non-zero start, so its partial sums round differently: a few f32 ulps of the
     * largest term, far below 1e-5 of the scale. A plugin that overwrites instead of adding is off by
     * 50%. Parameter gradients get one GEMM term each: 0 + g then g + g, exact, same bound. */
    const double scale = th_max_abs(din1, n);
    cr_assert_leq(th_rel_err(din2, din1, n, 1e-5 * scale, 1e-5), 1.0, "din does not accumulate");
    for (int p = 0; p < l->np; p++) {
        int64_t m = l->grads[p].shape[0] * l->grads[p].shape[1];
        for (int64_t i = 0; i < m; i++) g1[p][i] *= 2.0f;
        cr_assert_leq(th_rel_err(l->grads[p].data, g1[p], m, 1e-5 * th_max_abs(g1[p], m), 1e-5),
                      1.0, "%s does not accumulate", l->pspec[p].name);
        free(g1[p]);
    }
    free(g1);
    l->bufs.grads = NULL;
    th_backward(l, din0, dout, in);
    for (int64_t i = 0; i < n; i++) din1[i] *= 0.5f; /* exact: back to the first call's din */
    /* identical arithmetic to the first call (parameter gradients are separate GEMMs): exact */
    cr_assert_leq(th_max_abs_diff(din0, din1, n), 0.0, "din differs when parameter gradients are skipped");
    l->bufs.grads = l->grads;
    free(in), free(dout), free(out), free(din0), free(din1), free(din2);
    th_layer_free(l);
}

/* Inference without kept activations (acts NULL) computes the same output from scratch buffers. */
Test(softmax, forward_without_acts) {
    const cfg *c = &gqa_partial;
    const int B = 2, T = 40;
    const int64_t n = (int64_t)B * T * c->H;
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, B, T, 3, 0.3f);
    float *in = th_randn(n, 4, 1.0f), *out1 = th_zeros(n), *out2 = th_zeros(n);
    th_forward(l, out1, in);
    cr_assert_gt(th_max_abs(out1, n), 1e-3);
    l->bufs.acts = NULL;
    th_forward(l, out2, in);
    l->bufs.acts = l->acts;
    /* The same arithmetic on other buffers of the same shapes: equal, up to a BLAS that might pick its
     * kernel by pointer alignment (ulps). A wrong buffer mapping is off by O(scale). */
    cr_assert_leq(th_max_abs_diff(out1, out2, n), 1e-6 * th_max_abs(out1, n), "forward without acts differs");
    free(in), free(out1), free(out2);
    th_layer_free(l);
}

/* ---- incremental decoding ---- */

/* Rows [t0, t0+len) of each sequence of x (B, T, H) into a (B, len, H) block. */
static void slice_rows(float *dst, const float *x, int B, int T, int H, int t0, int len) {
    for (int b = 0; b < B; b++)
        memcpy(dst + (size_t)b * len * H, x + ((size_t)b * T + t0) * H, (size_t)len * H * sizeof(float));
}

/* Feed the sequence in chunks (chunks[0] is the prefill, then the rest) through step and compare each
 * chunk's output with the full forward's rows. */
static void check_step(const cfg *c, int B, int T, const int *chunks, int n_chunks, uint64_t seed) {
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, B, T, seed, 0.3f);
    const m1c_attention_vtable *vt = M1C_ATTENTION(l->plugin);
    const int64_t n = (int64_t)B * T * c->H;
    float *in = th_randn(n, seed + 1, 1.0f), *full = th_zeros(n);
    float *cin = th_zeros(n), *cout = th_zeros(n), *want = th_zeros(n);
    th_forward(l, full, in);
    const double scale = th_max_abs(full, n);
    th_state *st = th_state_new(l, B, T + 3); /* a cache a little longer than used */
    int pos = 0;
    for (int ci = 0; ci < n_chunks; ci++) {
        const int len = chunks[ci];
        slice_rows(cin, in, B, T, c->H, pos, len);
        slice_rows(want, full, B, T, c->H, pos, len);
        if (vt->step(l->self, &l->bufs, st->t, cout, cin, B, len, pos) != M1C_OK)
            cr_assert_fail("step at pos %d: %s", pos, l->plugin->error);
        /* Same math as forward, but the GEMMs see other shapes (other blocking and summation order)
         * and the key tiles start at other rows: f32 reassociation, ~1e-7 relative per dot product of
         * <= 300 terms. 1e-5 of the scale absolute plus 1e-4 relative; a stale or misplaced cache
         * entry or a wrong position is off by O(scale). */
        const int64_t m = (int64_t)B * len * c->H;
        double err = th_rel_err(cout, want, m, 1e-5 * scale, 1e-4);
        if (ci == 0 || ci == n_chunks - 1)
            cr_log_info("step pos %d: max |diff| %.3g of scale %.3g", pos, th_max_abs_diff(cout, want, m), scale);
        cr_assert_leq(err, 1.0, "step (pos %d, T %d) differs from forward: max |diff| %.3g", pos, len,
                      th_max_abs_diff(cout, want, m));
        pos += len;
    }
    cr_assert_eq(pos, T);
    th_state_free(st);
    free(in), free(full), free(cin), free(cout), free(want);
    th_layer_free(l);
}

Test(softmax, step_prefill_then_decode_matches_forward) {
    int chunks[1 + 24];
    chunks[0] = 9; /* prefill */
    for (int i = 1; i <= 24; i++) chunks[i] = 1;
    check_step(&gqa_partial, 2, 33, chunks, 25, 200);
    check_step(&mha_full, 2, 33, chunks, 25, 201);
}

/* Longer than one key tile, with a chunked prefill and multi-token steps. */
Test(softmax, step_long_chunked_matches_forward) {
    const int chunks[] = {200, 70, 1, 1, 5, 1, 22};
    check_step(&gqa_partial, 1, 300, chunks, 7, 210);
}

Test(softmax, step_refuses_overflowing_cache) {
    const cfg *c = &gqa_partial;
    th_layer *l = th_layer_new("softmax", th_softmax_settings(c).s, 0, 1, c->H, 1, 4, 5, 0.3f);
    const m1c_attention_vtable *vt = M1C_ATTENTION(l->plugin);
    th_state *st = th_state_new(l, 1, 6);
    float *in = th_randn(4 * c->H, 6, 1.0f), *out = th_zeros(4 * c->H);
    cr_assert_eq(vt->step(l->self, &l->bufs, st->t, out, in, 1, 4, 0), M1C_OK, "%s", l->plugin->error);
    cr_assert_eq(vt->step(l->self, &l->bufs, st->t, out, in, 1, 4, 4), M1C_ERR, "positions 4..7 in a cache of 6");
    cr_assert(strstr(l->plugin->error, "KV cache"), "message: %s", l->plugin->error);
    th_state_free(st);
    free(in), free(out);
    th_layer_free(l);
}

/* ---- declarations and settings ---- */

Test(softmax, declares_hf_parameters) {
    th_layer *l = th_layer_new("softmax", th_softmax_settings(&gqa_partial).s, 0, 1, 16, 1, 2, 1, 0.0f);
    static const char *names[] = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight"};
    static const int64_t shapes[4][2] = {{32, 16}, {16, 16}, {16, 16}, {16, 32}}; /* [out, in] */
    cr_assert_eq(l->np, 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_str_eq(l->pspec[i].name, names[i]);
        cr_assert_eq(l->pspec[i].ndim, 2);
        cr_assert_eq(l->pspec[i].shape[0], shapes[i][0], "%s", names[i]);
        cr_assert_eq(l->pspec[i].shape[1], shapes[i][1], "%s", names[i]);
        cr_assert_eq(l->pspec[i].init, M1C_INIT_NORMAL);
        cr_assert_float_eq(l->pspec[i].std, 0.02f, 1e-9);
    }
    /* flops per token at ctx keys, counted from the reference's loops: projections 2*H*(nh+2kvh)*hd,
     * o_proj 2*nh*hd*H, scores and weighted values 2*hd per key and query head each. */
    const double H = 16, nh = 4, kvh = 2, hd = 8, ctx = 1000;
    const double want = 2 * H * (nh + 2 * kvh) * hd + 2 * nh * hd * H + 2 * 2 * hd * nh * ctx;
    cr_assert_float_eq(M1C_ATTENTION(l->plugin)->flops(l->self, 1000), want, 1e-6 * want);
    th_layer_free(l);
}

/* Create from a settings body; returns create's status, the message in p->error. */
static int try_create(const char *body, int hidden, m1c_plugin **pp) {
    const m1c_layer_info info = {sizeof info, 0, 1, hidden, M1C_DEVICE_CPU, 0, 1, 0, 0, {0}};
    return th_try_create("softmax", M1C_KIND_ATTENTION, body, &info, pp);
}

static void expect_refusal(const char *body, const char *key) {
    m1c_plugin *p;
    cr_assert_eq(try_create(body, 16, &p), M1C_ERR, "'%s' was accepted", body);
    cr_assert(strstr(p->error, key), "'%s': the message does not name %s: %s", body, key, p->error);
    cr_log_info("refused: %s", p->error);
}

Test(softmax, settings_refused) {
    expect_refusal("heads = 4; kv_heads = 3; head_dim = 8;", "kv_heads");     /* 3 does not divide 4 */
    expect_refusal("heads = 4; kv_heads = 8; head_dim = 8;", "kv_heads");     /* more KV than query heads */
    expect_refusal("heads = 4; head_dim = 8; rotary_dim = 5;", "rotary_dim"); /* odd */
    expect_refusal("heads = 4; head_dim = 8; rotary_dim = 10;", "rotary_dim"); /* > head_dim */
    expect_refusal("heads = 4; head_dim = 8; rotary_dimm = 4;", "rotary_dimm"); /* unknown key */
    expect_refusal("heads = 0;", "heads");
    expect_refusal("heads = 2; rope_theta = 0.5;", "rope_theta");
    expect_refusal("heads = 2; kernel = \"fast\";", "kernel"); /* not one of the choices */
}

Test(softmax, settings_accepted_with_defaults) {
    m1c_plugin *p;
    cr_assert_eq(try_create("heads = 4; kv_heads = 2; head_dim = 8; rotary_dim = 4; rope_theta = 1e7;", 16, &p),
                 M1C_OK, "%s", p->error);
    /* the CUDA path's kernel choice has no effect on the CPU: every choice is accepted there */
    cr_assert_eq(try_create("heads = 4; head_dim = 8; kernel = \"wgmma\";", 16, &p), M1C_OK, "%s", p->error);
    /* defaults: kv_heads = heads, head_dim = hidden / heads, rotary_dim = head_dim */
    th_layer *l = th_layer_new("softmax", "heads = 4;", 0, 1, 32, 1, 2, 1, 0.0f);
    cr_assert_eq(l->pspec[0].shape[0], 32); /* q: 4 heads x 8 */
    cr_assert_eq(l->pspec[1].shape[0], 32); /* k: 4 KV heads x 8 */
    th_layer_free(l);
}
