/* Tests of the lightning attention plugin: block-wise forward against a naive O(T^2) double-precision
 * reference of the whole layer, finite-difference gradients, blocked backward against one block, prefill
 * plus decoding against the full forward, the decay rates read back from the state, and settings refusals. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

#define GRAD(l, name) ((float *)th_find_buf((l)->grads, (l)->pspec, (l)->np, (name))->data)

static const char *const PARAM_NAMES[4] = {"self_attn.qkv_proj.weight", "self_attn.output_gate.weight",
                                           "self_attn.norm.weight", "self_attn.out_proj.weight"};

static int64_t numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static double silu_d(double z) { return z / (1.0 + exp(-z)); }
static double sigmoid_d(double z) { return 1.0 / (1.0 + exp(-z)); }

/* MODEL.md's decay rate, written out here independently of the plugin: base = 2^(-8/nh),
 * s_h = base^(h+1) * (1 - l/(L-1) + 1e-5) ("m1c", L == 1: no depth term) or with HF's factor
 * 1 - l/(L-1+1e-5) + 1e-5. */
static double slope_ref(int nh, int h, int l, int L, int hf) {
    double base = pow(2.0, -8.0 / nh);
    double f = hf ? 1.0 - (double)l / (L - 1 + 1e-5) + 1e-5 : 1.0 - (L > 1 ? (double)l / (L - 1) : 0.0) + 1e-5;
    return pow(base, h + 1) * f;
}

static const m1c_attention_vtable *vt_of(th_layer *l) { return M1C_ATTENTION(l->plugin); }

static th_layer *new_layer(int nh, int hd, int bs, const char *decay, int l, int L, int H, int B, int T,
                           uint64_t seed) {
    char cfg[256];
    snprintf(cfg, sizeof cfg, "heads = %d; head_dim = %d; block_size = %d; decay = \"%s\";", nh, hd, bs, decay);
    /* param_std 0.3 (not the 0.02 init): pre-activations of order 1, so SiLU, the sigmoid gate and the
     * norm all work away from their linear regimes. */
    return th_layer_new("lightning", cfg, l, L, H, B, T, seed, 0.3f);
}

/* The whole layer, naively and in double: qkv = SiLU(x Wqkv^T) with per-head [q|k|v] columns,
 * o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j, y = RMSNorm(o) * w * sigmoid(x Wg^T), out = y Wo^T.
 * p[0..3]: Wqkv (3D, H), Wg (D, H), w (D), Wo (H, D). */
static void ref_layer_d(double *out, const double *x, double *const p[4], int B, int T, int H, int nh, int hd,
                        const double *slope, double eps) {
    const int D = nh * hd;
    const double *Wqkv = p[0], *Wg = p[1], *wn = p[2], *Wo = p[3];
    double *qkv = calloc((size_t)T * 3 * D, sizeof(double)), *o = calloc((size_t)T * D, sizeof(double));
    double *y = calloc((size_t)D, sizeof(double));
    for (int b = 0; b < B; b++) {
        const double *xb = x + (size_t)b * T * H;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < 3 * D; r++) {
                double z = 0;
                for (int c = 0; c < H; c++) z += xb[t * H + c] * Wqkv[r * H + c];
                qkv[t * 3 * D + r] = silu_d(z);
            }
        for (int h = 0; h < nh; h++)
            for (int t = 0; t < T; t++) {
                const double *q = qkv + t * 3 * D + h * 3 * hd;
                double *ot = o + t * D + h * hd;
                for (int c = 0; c < hd; c++) ot[c] = 0;
                for (int j = 0; j <= t; j++) {
                    const double *k = qkv + j * 3 * D + h * 3 * hd + hd, *v = k + hd;
                    double qk = 0;
                    for (int c = 0; c < hd; c++) qk += q[c] * k[c];
                    double w = exp(-slope[h] * (t - j)) * qk;
                    for (int c = 0; c < hd; c++) ot[c] += w * v[c];
                }
            }
        for (int t = 0; t < T; t++) {
            double ss = 0;
            for (int c = 0; c < D; c++) ss += o[t * D + c] * o[t * D + c];
            double rs = 1.0 / sqrt(ss / D + eps);
            for (int c = 0; c < D; c++) {
                double g = 0;
                for (int i = 0; i < H; i++) g += xb[t * H + i] * Wg[c * H + i];
                y[c] = o[t * D + c] * rs * wn[c] * sigmoid_d(g);
            }
            for (int i = 0; i < H; i++) {
                double s = 0;
                for (int c = 0; c < D; c++) s += y[c] * Wo[i * D + c];
                out[((size_t)b * T + t) * H + i] = s;
            }
        }
    }
    free(qkv);
    free(o);
    free(y);
}

static double *to_double(const float *a, int64_t n) {
    double *d = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}

/* The layer's parameters (by name) and x, as doubles; free with free_doubles. */
static void layer_doubles(th_layer *l, const float *x, double **xd, double *p[4], int64_t np[4]) {
    *xd = to_double(x, (int64_t)l->B * l->T * l->H);
    for (int i = 0; i < 4; i++) {
        m1c_tensor *t = th_find_buf(l->params, l->pspec, l->np, PARAM_NAMES[i]);
        np[i] = numel(t);
        p[i] = to_double(t->data, np[i]);
    }
}
static void free_doubles(double *xd, double *p[4]) {
    free(xd);
    for (int i = 0; i < 4; i++) free(p[i]);
}

static void ref_layer(double *out, th_layer *l, const float *x, int nh, int hd, const double *slope, double eps) {
    double *xd, *p[4];
    int64_t np[4];
    layer_doubles(l, x, &xd, p, np);
    ref_layer_d(out, xd, p, l->B, l->T, l->H, nh, hd, slope, eps);
    free_doubles(xd, p);
}

/* Max |a - ref| / max |ref|. */
static double err_vs_ref(const float *a, const double *ref, int64_t n) {
    double m = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (d != d) return INFINITY;
        m = fmax(m, d);
        r = fmax(r, fabs(ref[i]));
    }
    return m / fmax(r, 1e-30);
}

/* One forward of a fresh layer against the naive reference; returns the normalised error. */
static double check_forward(int nh, int hd, int bs, const char *decay, int l, int L, int H, int B, int T,
                            uint64_t seed) {
    th_layer *ly = new_layer(nh, hd, bs, decay, l, L, H, B, T, seed);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, seed + 1, 1.0f), *out = th_zeros(n);
    double *ref = calloc((size_t)n, sizeof(double)), slope[16];
    for (int h = 0; h < nh; h++) slope[h] = slope_ref(nh, h, l, L, strcmp(decay, "hf") == 0);
    th_forward(ly, out, x);
    ref_layer(ref, ly, x, nh, hd, slope, 1e-6);
    double e = err_vs_ref(out, ref, n);
    cr_log_info("forward nh=%d hd=%d bs=%d T=%d %s l=%d/%d: rel err %.3g", nh, hd, bs, T, decay, l, L, e);
    free(x);
    free(out);
    free(ref);
    th_layer_free(ly);
    return e;
}

/* Tolerance of the fp32 plugin against the double reference, relative to the largest output: the
 * plugin rounds every product and sum to fp32 (unit roundoff 6e-8) over sums of at most ~130 tokens
 * and 48 channels, and the RMSNorm rescales, so ~1e-6 is expected (observed <= 8e-7); 5e-6 leaves
 * margin, while a wrong decay power, mask offset or column layout gives 1e-2 or more. */
#define FWD_TOL 5e-6

/* ---- forward against the naive reference -------------------------------------------------------- */

Test(lightning, forward_matches_naive_reference) {
    const int Ts[] = {1, 7, 64, 100, 130};
    int k = 0;
    for (int ti = 0; ti < 5; ti++) {
        const int T = Ts[ti];
        const int bss[] = {1, 16, 64, T + 5}; /* the last one exceeds T: one partial block */
        for (int bi = 0; bi < 4; bi++, k++) {
            const int nh = 1 + k % 3; /* 1, 2 and 3 heads (3: base^(h+1) with nh not a power of two) */
            double e = check_forward(nh, 8, bss[bi], "m1c", 1, 4, 16, 2, T, 100 + k);
            cr_expect_leq(e, FWD_TOL, "T=%d block=%d heads=%d: rel err %.3g", T, bss[bi], nh, e);
        }
    }
}

Test(lightning, forward_decay_variants_and_widths) {
    /* HF's decay factor; the last layer (factor ~1e-5: almost no decay); a single-layer model (L == 1
     * guard); heads*head_dim != H and wider heads. */
    double e;
    e = check_forward(2, 8, 16, "hf", 2, 5, 16, 2, 40, 7);
    cr_expect_leq(e, FWD_TOL, "hf decay: rel err %.3g", e);
    e = check_forward(2, 8, 16, "m1c", 3, 4, 16, 2, 40, 8);
    cr_expect_leq(e, FWD_TOL, "last layer: rel err %.3g", e);
    e = check_forward(4, 4, 8, "m1c", 0, 1, 16, 2, 30, 9);
    cr_expect_leq(e, FWD_TOL, "L == 1: rel err %.3g", e);
    e = check_forward(3, 16, 16, "m1c", 0, 2, 20, 1, 50, 10);
    cr_expect_leq(e, FWD_TOL, "nh*hd=48 != H=20: rel err %.3g", e);
}

Test(lightning, eval_forward_equals_training_forward) {
    /* Without training the plugin keeps nothing and reuses scratch in place: same arithmetic, so the
     * outputs agree to the last bit up to BLAS summation order; 1e-6 relative. */
    th_layer *l = new_layer(2, 8, 5, "m1c", 1, 3, 16, 2, 23, 11);
    const int64_t n = (int64_t)l->B * l->T * l->H;
    float *x = th_randn(n, 12, 1.0f), *a = th_zeros(n), *b = th_zeros(n);
    th_forward(l, a, x);
    l->bufs.training = 0;
    th_forward(l, b, x);
    l->bufs.training = 1;
    double e = th_max_abs_diff(a, b, n) / th_max_abs(a, n);
    cr_log_info("eval vs training forward: %.3g", e);
    cr_expect_leq(e, 1e-6, "eval vs training forward: %.3g", e);
    free(x);
    free(a);
    free(b);
    th_layer_free(l);
}

/* ---- gradients ---------------------------------------------------------------------------------- */

Test(lightning, finite_difference_gradients) {
    /* The harness's check on the plugin itself. T = 10 with blocks of 3 (3, 3, 3, 1): the state
     * recurrence forward and backward and a partial last block are all exercised. The forward is fp32:
     * the loss carries ~1e-6 of rounding, i.e. ~1e-4 of noise on a derivative taken with eps = 5e-3,
     * while some gradient entries are only ~3e-4 (the harness's relative floor is 1e-3), and the
     * curvature of RMSNorm adds O(eps^2). Observed worst over 8 seeds: 0.04; a missing or wrong term
     * gives O(1). The strict check is gradients_match_double_reference below. */
    th_layer *l = new_layer(2, 4, 3, "m1c", 1, 3, 8, 2, 10, 21);
    float *x = th_randn((int64_t)l->B * l->T * l->H, 22, 1.0f);
    double worst = th_fd_check_layer(l, x, 5e-3f, 24, 23);
    cr_expect_leq(worst, 0.1, "worst finite-difference relative error %.3g", worst);
    free(x);
    th_layer_free(l);
}

/* L = sum(out * w) of the double reference. */
static double ref_loss(const double *x, double *const p[4], const float *w, int B, int T, int H, int nh, int hd,
                       const double *slope, double *buf) {
    ref_layer_d(buf, x, p, B, T, H, nh, hd, slope, 1e-6);
    double s = 0;
    for (int64_t i = 0; i < (int64_t)B * T * H; i++) s += buf[i] * w[i];
    return s;
}

Test(lightning, gradients_match_double_reference) {
    /* Every coordinate of d input and of every parameter gradient against central differences of the
     * double-precision reference layer (step 1e-5: truncation ~1e-10 and rounding ~1e-11, far below the
     * fp32 gradient's own error). Blocks of 16 over T = 40 (16, 16, 8); large enough that the plugin runs
     * its OpenMP path (per-thread partial sums of the norm gain's gradient included). Error relative to
     * the largest entry of each tensor: the fp32 backward rounds sums of at most a few hundred terms
     * (observed <= 5e-7); tolerance 1e-5. */
    const int nh = 2, hd = 8, H = 8, B = 2, T = 40;
    const int64_t n = (int64_t)B * T * H;
    th_layer *l = new_layer(nh, hd, 16, "m1c", 1, 3, H, B, T, 81);
    float *x = th_randn(n, 82, 1.0f), *w = th_randn(n, 83, 1.0f), *out = th_zeros(n), *din = th_zeros(n);
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    th_backward(l, din, w, x);
    double slope[2] = {slope_ref(nh, 0, 1, 3, 0), slope_ref(nh, 1, 1, 3, 0)};
    double *xd, *p[4], *buf = calloc((size_t)n, sizeof(double));
    int64_t np[4];
    layer_doubles(l, x, &xd, p, np);
    const double h = 1e-5;
    for (int ti = -1; ti < 4; ti++) {
        double *vals = ti < 0 ? xd : p[ti];
        const float *an = ti < 0 ? din : GRAD(l, PARAM_NAMES[ti]);
        const int64_t cnt = ti < 0 ? n : np[ti];
        const char *name = ti < 0 ? "input" : PARAM_NAMES[ti];
        double gmax = th_max_abs(an, cnt), worst = 0;
        int64_t wi = 0;
        for (int64_t i = 0; i < cnt; i++) {
            const double v0 = vals[i];
            vals[i] = v0 + h;
            double lp = ref_loss(xd, p, w, B, T, H, nh, hd, slope, buf);
            vals[i] = v0 - h;
            double lm = ref_loss(xd, p, w, B, T, H, nh, hd, slope, buf);
            vals[i] = v0;
            double e = fabs(an[i] - (lp - lm) / (2 * h)) / gmax;
            if (e > worst) worst = e, wi = i;
        }
        cr_log_info("d %s: worst %.3g at %ld (max |g| %.3g)", name, worst, (long)wi, gmax);
        cr_expect_leq(worst, 1e-5, "d %s[%ld]: error %.3g of the largest entry", name, (long)wi, worst);
    }
    free_doubles(xd, p);
    free(buf);
    free(x);
    free(w);
    free(out);
    free(din);
    th_layer_free(l);
}

/* Every gradient (input and parameters) after one backward of `l` with weights dout. */
static float **all_grads(th_layer *l, const float *x, const float *dout, float **din) {
    const int64_t n = (int64_t)l->B * l->T * l->H;
    float *out = th_zeros(n);
    *din = th_zeros(n);
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    th_backward(l, *din, dout, x);
    float **g = calloc(4, sizeof(float *));
    for (int p = 0; p < 4; p++) {
        m1c_tensor *t = th_find_buf(l->grads, l->pspec, l->np, PARAM_NAMES[p]);
        g[p] = malloc((size_t)numel(t) * sizeof(float));
        memcpy(g[p], t->data, (size_t)numel(t) * sizeof(float));
    }
    free(out);
    return g;
}

Test(lightning, blocked_backward_equals_single_block) {
    /* The same layer (same seed: same weights) with blocks of 4 and 1 against one block holding the
     * whole sequence: every coordinate of every gradient must agree, which the sampled finite
     * differences cannot promise. fp32 with different summation orders: 1e-5 of the largest entry
     * (observed <= 5e-7). */
    const int T = 37, B = 2, H = 12;
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, 31, 1.0f), *dout = th_randn(n, 32, 1.0f);
    th_layer *ref = new_layer(3, 4, 64, "m1c", 0, 2, H, B, T, 33);
    float *dref;
    float **gref = all_grads(ref, x, dout, &dref);
    const int bss[] = {4, 1};
    for (int bi = 0; bi < 2; bi++) {
        th_layer *l = new_layer(3, 4, bss[bi], "m1c", 0, 2, H, B, T, 33);
        float *din;
        float **g = all_grads(l, x, dout, &din);
        double e = th_max_abs_diff(din, dref, n) / th_max_abs(dref, n);
        cr_log_info("block %d: d input differs by %.3g", bss[bi], e);
        cr_expect_leq(e, 1e-5, "block %d: d input differs by %.3g", bss[bi], e);
        for (int p = 0; p < 4; p++) {
            int64_t np = numel(th_find_buf(l->grads, l->pspec, l->np, PARAM_NAMES[p]));
            e = th_max_abs_diff(g[p], gref[p], np) / th_max_abs(gref[p], np);
            cr_log_info("block %d: d %s differs by %.3g", bss[bi], PARAM_NAMES[p], e);
            cr_expect_leq(e, 1e-5, "block %d: d %s differs by %.3g", bss[bi], PARAM_NAMES[p], e);
            free(g[p]);
        }
        free(g);
        free(din);
        th_layer_free(l);
    }
    for (int p = 0; p < 4; p++) free(gref[p]);
    free(gref);
    free(dref);
    free(x);
    free(dout);
    th_layer_free(ref);
}

Test(lightning, gradients_accumulate) {
    /* Two backwards without zeroing give twice one backward (din and every parameter gradient): the
     * ABI's += convention. Doubling is exact in fp32 only up to the summation order of the += of BLAS
     * (beta = 1): 1e-6 relative. */
    th_layer *l = new_layer(2, 4, 4, "m1c", 0, 2, 8, 2, 9, 41);
    const int64_t n = (int64_t)l->B * l->T * l->H;
    float *x = th_randn(n, 42, 1.0f), *dout = th_randn(n, 43, 1.0f), *out = th_zeros(n);
    float *din1 = th_zeros(n), *din2 = th_zeros(n);
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    th_backward(l, din1, dout, x);
    float *g1[4];
    for (int p = 0; p < 4; p++) {
        m1c_tensor *t = th_find_buf(l->grads, l->pspec, l->np, PARAM_NAMES[p]);
        g1[p] = malloc((size_t)numel(t) * sizeof(float));
        memcpy(g1[p], t->data, (size_t)numel(t) * sizeof(float));
    }
    th_backward(l, din2, dout, x);
    th_backward(l, din2, dout, x);
    for (int64_t i = 0; i < n; i++) din1[i] *= 2.0f;
    cr_expect_leq(th_max_abs_diff(din2, din1, n), 1e-6 * th_max_abs(din1, n), "din does not accumulate");
    for (int p = 0; p < 4; p++) {
        m1c_tensor *t = th_find_buf(l->grads, l->pspec, l->np, PARAM_NAMES[p]);
        int64_t np = numel(t);
        /* grads now hold one backward's gradient three times: 1 + 2 backwards */
        for (int64_t i = 0; i < np; i++) g1[p][i] *= 3.0f;
        cr_expect_leq(th_max_abs_diff(t->data, g1[p], np), 1e-6 * th_max_abs(g1[p], np), "%s does not accumulate",
                      PARAM_NAMES[p]);
        free(g1[p]);
    }
    free(x);
    free(dout);
    free(out);
    free(din1);
    free(din2);
    th_layer_free(l);
}

/* ---- incremental inference ------------------------------------------------------------------------ */

/* Rows [t0, t0+n) of every sequence of x (B, T, H) packed into (B, n, H), or unpacked back. */
static void pack(float *dst, const float *src, int B, int T, int H, int t0, int n) {
    for (int b = 0; b < B; b++) memcpy(dst + (size_t)b * n * H, src + ((size_t)b * T + t0) * H, (size_t)n * H * 4);
}
static void unpack(float *dst, const float *src, int B, int T, int H, int t0, int n) {
    for (int b = 0; b < B; b++) memcpy(dst + ((size_t)b * T + t0) * H, src + (size_t)b * n * H, (size_t)n * H * 4);
}

static void do_step(th_layer *l, th_state *s, float *out, const float *in, int B, int T, int64_t pos) {
    if (vt_of(l)->step(l->self, &l->bufs, s->t, out, in, B, T, pos) != M1C_OK)
        cr_assert_fail("step: %s", l->plugin->error);
}

Test(lightning, prefill_then_decode_equals_forward) {
    /* Prefill 9 tokens (blocks of 4: 4, 4, 1), then decode one token at a time, then a chunk of 5:
     * the state carries everything. Different block boundaries change only fp32 summation order:
     * 1e-5 of the largest output (observed 2e-7). */
    const int B = 2, T = 23, H = 16, P = 9;
    th_layer *l = new_layer(2, 8, 4, "m1c", 2, 5, H, B, T, 51);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, 52, 1.0f), *full = th_zeros(n), *stepped = th_zeros(n);
    float *cin = th_zeros(n), *cout = th_zeros(n);
    th_forward(l, full, x);
    l->bufs.training = 0;
    th_state *s = th_state_new(l, B, T);
    cr_assert_eq(s->n, 1);
    cr_assert_eq(numel(&s->t[0]), (int64_t)B * 2 * 8 * 8, "state is (B, nh, hd, hd)");
    /* a first, unrelated sequence: pos = 0 below must start afresh */
    float *junk = th_randn((int64_t)B * 6 * H, 53, 1.0f);
    do_step(l, s, cout, junk, B, 6, 0);
    free(junk);

    pack(cin, x, B, T, H, 0, P);
    do_step(l, s, cout, cin, B, P, 0);
    unpack(stepped, cout, B, T, H, 0, P);
    int t = P;
    for (; t < T - 5; t++) {
        pack(cin, x, B, T, H, t, 1);
        do_step(l, s, cout, cin, B, 1, t);
        unpack(stepped, cout, B, T, H, t, 1);
    }
    pack(cin, x, B, T, H, t, T - t);
    do_step(l, s, cout, cin, B, T - t, t);
    unpack(stepped, cout, B, T, H, t, T - t);

    double e = th_max_abs_diff(stepped, full, n) / th_max_abs(full, n);
    cr_log_info("stepped vs full forward: %.3g", e);
    cr_expect_leq(e, 1e-5, "stepped vs full forward: %.3g", e);
    th_state_free(s);
    free(x);
    free(full);
    free(stepped);
    free(cin);
    free(cout);
    th_layer_free(l);
}

/* ---- decay rates, read back from the state ---------------------------------------------------------- */

/* After one token, KV = k^T v; after n more tokens of input 0 (SiLU(0) = 0: q = k = v = 0) in one
 * block, KV = exp(-s n) k^T v. So s = -ln(KV_after / KV_before) / n per head. */
static void measured_slopes(double *s, int nh, const char *decay, int l, int L) {
    const int hd = 2, H = 4, n = 200;
    th_layer *ly = new_layer(nh, hd, 256, decay, l, L, H, 1, n, 61); /* block 256 > n: one block */
    th_state *st = th_state_new(ly, 1, n + 1);
    float *x = th_randn(H, 62, 1.0f), *zeros = th_zeros((int64_t)n * H), *out = th_zeros((int64_t)n * H);
    float before[64];
    do_step(ly, st, out, x, 1, 1, 0);
    const float *kv = st->t[0].data;
    memcpy(before, kv, (size_t)nh * hd * hd * sizeof(float));
    do_step(ly, st, out, zeros, 1, n, 1);
    for (int h = 0; h < nh; h++) {
        int best = 0; /* the largest entry of the head's k^T v: the ratio is best resolved there */
        for (int i = 1; i < hd * hd; i++)
            if (fabsf(before[h * hd * hd + i]) > fabsf(before[h * hd * hd + best])) best = i;
        cr_assert_gt(fabsf(before[h * hd * hd + best]), 1e-3f, "head %d: k^T v too small to measure", h);
        s[h] = -log((double)kv[h * hd * hd + best] / (double)before[h * hd * hd + best]) / n;
    }
    free(x);
    free(zeros);
    free(out);
    th_state_free(st);
    th_layer_free(ly);
}

/* The decay power exp(-s n) is one fp32 value times one fp32 product: the ratio carries ~1.2e-7
 * relative error, i.e. 6e-10 absolute on s after dividing by n = 200. 2e-9 resolves the 1e-5 terms
 * of the formulas (the smallest here: 2^-8 * 1e-5 = 3.9e-8) and the m1c/HF difference (1e-8). */
#define SLOPE_TOL 2e-9

Test(lightning, decay_slopes) {
    double s[4];
    /* Hand-computed: nh = 2, l = 0, L = 3: base = 2^-4, s = [2^-4, 2^-8] * (1 + 1e-5). */
    measured_slopes(s, 2, "m1c", 0, 3);
    cr_expect_leq(fabs(s[0] - 0.0625 * 1.00001), SLOPE_TOL, "s_0 = %.12g", s[0]);
    cr_expect_leq(fabs(s[1] - 0.00390625 * 1.00001), SLOPE_TOL, "s_1 = %.12g", s[1]);
    /* l = 1 of 3: m1c factor 1 - 1/2 + 1e-5 = 0.50001; HF 1 - 1/(2 + 1e-5) + 1e-5 = 0.5000124999875. */
    measured_slopes(s, 2, "m1c", 1, 3);
    cr_expect_leq(fabs(s[0] - 0.0625 * 0.50001), SLOPE_TOL, "m1c l=1: s_0 = %.12g", s[0]);
    cr_expect_leq(fabs(s[1] - 0.00390625 * 0.50001), SLOPE_TOL, "m1c l=1: s_1 = %.12g", s[1]);
    measured_slopes(s, 2, "hf", 1, 3);
    cr_expect_leq(fabs(s[0] - 0.0625 * 0.5000124999875), SLOPE_TOL, "hf l=1: s_0 = %.12g", s[0]);
    cr_expect_leq(fabs(s[1] - 0.00390625 * 0.5000124999875), SLOPE_TOL, "hf l=1: s_1 = %.12g", s[1]);
    /* L = 1: no depth term, factor 1 + 1e-5. nh = 4: base = 2^-2, s = [2^-2, 2^-4, 2^-6, 2^-8] * 1.00001. */
    measured_slopes(s, 4, "m1c", 0, 1);
    for (int h = 0; h < 4; h++)
        cr_expect_leq(fabs(s[h] - pow(2.0, -2.0 * (h + 1)) * 1.00001), SLOPE_TOL, "L=1: s_%d = %.12g", h, s[h]);
    /* nh = 3 (not a power of two): base^(h+1) = 2^(-8(h+1)/3), not ALiBi's rule. */
    measured_slopes(s, 3, "m1c", 0, 2);
    for (int h = 0; h < 3; h++)
        cr_expect_leq(fabs(s[h] - slope_ref(3, h, 0, 2, 0)), SLOPE_TOL, "nh=3: s_%d = %.12g", h, s[h]);
}

/* ---- declarations, FLOPs, settings ------------------------------------------------------------------ */

Test(lightning, parameter_declarations) {
    th_layer *l = new_layer(3, 4, 8, "m1c", 0, 1, 10, 1, 4, 71);
    const int64_t shapes[4][2] = {{36, 10}, {12, 10}, {12, 0}, {10, 12}}; /* D = 3*4 = 12, H = 10 */
    cr_assert_eq(l->np, 4);
    for (int p = 0; p < 4; p++) {
        const m1c_buf_spec *s = &l->pspec[p];
        int q = 0;
        while (q < 4 && strcmp(s->name, PARAM_NAMES[q])) q++;
        cr_assert_lt(q, 4, "unexpected parameter %s", s->name);
        cr_expect_eq(s->shape[0], shapes[q][0], "%s dim 0", s->name);
        if (shapes[q][1]) cr_expect_eq(s->shape[1], shapes[q][1], "%s dim 1", s->name);
        cr_expect_eq(s->ndim, shapes[q][1] ? 2 : 1, "%s ndim", s->name);
        if (q == 2) {
            cr_expect_eq(s->init, M1C_INIT_ONES, "norm gain initialised to ones");
            cr_expect(s->no_decay, "norm gain excluded from weight decay");
        } else {
            cr_expect_eq(s->init, M1C_INIT_NORMAL, "%s init", s->name);
            cr_expect_float_eq(s->std, 0.02f, 1e-9f, "%s std", s->name);
            cr_expect(!s->no_decay, "%s decays", s->name);
        }
    }
    th_layer_free(l);
}

Test(lightning, flops_per_token) {
    /* H = 10, nh = 3, hd = 4 (D = 12), block 8. Projections: 2*10*(36 + 12 + 12) = 1200 FLOPs. Attention
     * per head and token, with blocks of b = min(8, ctx) tokens: Q K^T and S V (2*b*4 each) plus Q KV and
     * the state update (2*16 each): 3 * (16 b + 64). */
    th_layer *l = new_layer(3, 4, 8, "m1c", 0, 1, 10, 1, 4, 72);
    double f1 = vt_of(l)->flops(l->self, 1), f8 = vt_of(l)->flops(l->self, 8);
    double fbig = vt_of(l)->flops(l->self, 1000000);
    cr_expect_float_eq(f1, 1200.0 + 3 * (16.0 + 64.0), 1e-9, "ctx 1: %g", f1);
    cr_expect_float_eq(f8, 1200.0 + 3 * (128.0 + 64.0), 1e-9, "ctx 8: %g", f8);
    cr_expect_float_eq(fbig, f8, 1e-9, "constant past one block: %g", fbig);
    th_layer_free(l);
}

/* Create from settings text; the status, with the plugin's message left in p->error. */
static int try_create(const char *body, m1c_plugin **pp) {
    const m1c_layer_info info = {sizeof info, 0, 2, 16, M1C_DEVICE_CPU, 0, 1, 0, 0, {0}};
    return th_try_create("lightning", M1C_KIND_ATTENTION, body, &info, pp);
}

Test(lightning, settings_validation) {
    m1c_plugin *p;
    cr_expect_eq(try_create("heads = 2; head_dim = 8; block_size = 16; norm_eps = 1e-5; decay = \"hf\";", &p), M1C_OK,
                 "valid settings refused: %s", p->error);
    cr_expect_eq(try_create("", &p), M1C_OK, "defaults refused: %s", p->error);
    const struct {
        const char *body, *key;
    } bad[] = {
        {"heads = 2; head_dim = 8; blok_size = 16;", "blok_size"}, /* typo: unknown key */
        {"heads = 0; head_dim = 8;", "heads"},
        {"heads = 2; head_dim = 0;", "head_dim"},
        {"heads = 2; head_dim = 8; block_size = 0;", "block_size"},
        {"heads = 2; head_dim = 8; norm_eps = -1.0;", "norm_eps"},
        {"heads = 2; head_dim = 8; decay = \"alibi\";", "decay"},
        {"heads = \"two\";", "heads"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = try_create(bad[i].body, &p);
        cr_expect_eq(rc, M1C_ERR, "'%s' accepted", bad[i].body);
        cr_expect(strstr(p->error, bad[i].key) != NULL, "'%s': message does not name %s: %s", bad[i].body,
                  bad[i].key, p->error);
        cr_expect(strchr(p->error, '\n') == NULL, "message is one line: %s", p->error);
    }
}
