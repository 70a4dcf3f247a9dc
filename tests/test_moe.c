/* Tests of the MoE-slot plugins: topk (routing, renormalisation, capacity, jitter and the aux loss checked
 * by hand and against a naive double-precision reference; finite-difference gradients; aux_scale), dense,
 * and their shared SwiGLU rows. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
/* The SwiGLU rows built as the plugins build them (-fno-trapping-math, set only on the plugins): then
 * GCC vectorises them with moe_exp's clamps as selects, the form the plugins run, instead of
 * branching. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "../plugins/moe/swiglu.h"
#pragma GCC pop_options
#else
#include "../plugins/moe/swiglu.h"
#endif

/* ---- helpers ---------------------------------------------------------------------------------- */

#define PARAM(l, name) ((float *)th_find_buf((l)->params, (l)->pspec, (l)->np, (name))->data)
#define GRAD(l, name) ((float *)th_find_buf((l)->grads, (l)->pspec, (l)->np, (name))->data)
#define ACT(l, name) (th_find_buf((l)->acts, (l)->aspec, (l)->na, (name))->data)

static int64_t numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static m1c_moe_stats stats_of(th_layer *l) {
    m1c_moe_stats st;
    cr_assert_eq(M1C_MOE(l->plugin)->stats(l->self, &l->bufs, &st), M1C_OK, "stats: %s", l->plugin->error);
    return st;
}

static void forward_mode(th_layer *l, float *out, const float *in, int training) {
    l->bufs.training = training;
    th_forward(l, out, in);
    l->bufs.training = 1;
}

static double silu_d(double g) { return g / (1.0 + exp(-g)); }

/* Try to create a plugin instance from settings text; returns the create status (the instance, if
 * any, is destroyed) and leaves the plugin's error message in p->error. */
static int try_create(const char *plugin, const char *body, int hidden) {
    const m1c_layer_info info = {sizeof info, 0, 1, hidden, M1C_DEVICE_CPU, 0, 1, 0, 0, {0}};
    return th_try_create(plugin, M1C_KIND_MOE, body, &info, NULL);
}

/* ---- naive double-precision reference of the topk forward -------------------------------------- */

typedef struct ref_moe {
    int H, E, k, F, normalize;
    double cf, aux_coef;
    /* results, for N tokens */
    double *out;     /* (N, H) */
    int *idx;        /* (N, k) */
    double *w;       /* (N, k) */
    int *kept;       /* (N, k) */
    double aux;
    long dropped;
    double *load;    /* (E) */
    double min_gap;  /* smallest logit gap between the k-th and (k+1)-th expert over tokens */
} ref_moe;

/* noise: (N, H) multiplicative router-input noise, or NULL. */
static void ref_forward(ref_moe *r, int N, const float *x, const float *noise, const float *Wr, const float *Wgu,
                        const float *Wd) {
    const int H = r->H, E = r->E, k = r->k, F = r->F;
    r->out = calloc((size_t)N * H, sizeof(double));
    r->idx = calloc((size_t)N * k, sizeof(int));
    r->w = calloc((size_t)N * k, sizeof(double));
    r->kept = calloc((size_t)N * k, sizeof(int));
    r->load = calloc((size_t)E, sizeof(double));
    double *P = calloc((size_t)E, sizeof(double)), *logit = calloc((size_t)E, sizeof(double));
    double *p = calloc((size_t)E, sizeof(double)), *g = calloc((size_t)F, sizeof(double));
    long *routed = calloc((size_t)E, sizeof(long)), *used = calloc((size_t)E, sizeof(long));
    int *taken = calloc((size_t)E, sizeof(int));
    const double cap = r->cf > 0 ? ceil(r->cf * N * k / E) : 1e300;
    r->min_gap = INFINITY;
    r->dropped = 0;
    for (int n = 0; n < N; n++) {
        const float *xn = x + (int64_t)n * H;
        double mx = -INFINITY, Z = 0;
        for (int e = 0; e < E; e++) {
            logit[e] = 0;
            for (int i = 0; i < H; i++) logit[e] += (double)xn[i] * (noise ? noise[(int64_t)n * H + i] : 1.0) * Wr[e * H + i];
            mx = fmax(mx, logit[e]);
        }
        for (int e = 0; e < E; e++) Z += p[e] = exp(logit[e] - mx);
        for (int e = 0; e < E; e++) P[e] += (p[e] /= Z) / N;
        /* selection by (probability desc, index asc) */
        for (int e = 0; e < E; e++) taken[e] = 0;
        double S = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
            taken[best] = 1;
            r->idx[n * k + j] = best;
            S += p[best];
        }
        if (k < E) {
            double next = -INFINITY;
            for (int e = 0; e < E; e++)
                if (!taken[e]) next = fmax(next, logit[e]);
            r->min_gap = fmin(r->min_gap, logit[r->idx[n * k + k - 1]] - next);
        }
        for (int j = 0; j < k; j++) {
            int e = r->idx[n * k + j];
            double wj = r->normalize ? p[e] / S : p[e];
            r->w[n * k + j] = wj;
            routed[e]++;
            if (used[e] >= cap) {
                r->dropped++;
                continue;
            }
            used[e]++;
            r->kept[n * k + j] = 1;
            /* expert e on the un-jittered input */
            for (int f = 0; f < F; f++) {
                double gg = 0, uu = 0;
                for (int i = 0; i < H; i++) {
                    gg += (double)Wgu[((int64_t)e * 2 * F + f) * H + i] * xn[i];
                    uu += (double)Wgu[((int64_t)e * 2 * F + F + f) * H + i] * xn[i];
                }
                g[f] = silu_d(gg) * uu;
            }
            for (int i = 0; i < H; i++) {
                double y = 0;
                for (int f = 0; f < F; f++) y += (double)Wd[((int64_t)e * H + i) * F + f] * g[f];
                r->out[(int64_t)n * H + i] += wj * y;
            }
        }
    }
    r->aux = 0;
    for (int e = 0; e < E; e++) {
        r->load[e] = (double)routed[e] / ((double)N * k);
        r->aux += r->load[e] * P[e];
    }
    r->aux *= r->aux_coef * E;
    free(P), free(logit), free(p), free(g), free(routed), free(used), free(taken);
}

static void ref_free(ref_moe *r) { free(r->out), free(r->idx), free(r->w), free(r->kept), free(r->load); }

static float *to_float(const double *x, int64_t n) {
    float *y = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) y[i] = (float)x[i];
    return y;
}

/* ---- topk: a small case worked out by hand ------------------------------------------------------ */

/* H = 2, E = 3, k = 2, F = 1, three tokens. Router rows: e0 = (1, 0), e1 = (0, 1), e2 = (-1, -1).
 * Tokens: x0 = (1, 0) -> logits (1, 0, -1): experts 0, 1
 *         x1 = (0, 2) -> logits (0, 2, -2): experts 1, 0
 *         x2 = (-1,-1)-> logits (-1, -1, 2): expert 2, then the exact tie 0/1 goes to the lower index 0 */
static const float hand_x[6] = {1, 0, 0, 2, -1, -1};
static const float hand_wr[6] = {1, 0, 0, 1, -1, -1};
static const float hand_wgu[12] = {1, 0.5f, 0.5f, -1, /* e0: gate, up */ -0.5f, 1, 1, 1, /* e1 */ 0.25f, 0.25f, -1, 2};
static const float hand_wd[6] = {1, -1, /* e0 */ 0.5f, 2, /* e1 */ -2, 1 /* e2 */};
static const int hand_idx[6] = {0, 1, 1, 0, 2, 0};

static th_layer *hand_layer(const char *extra) {
    char body[256];
    snprintf(body, sizeof body, "experts = 3; top_k = 2; ffn_dim = 1; aux_coef = 0.01; %s", extra);
    th_layer *l = th_layer_new("topk", body, 0, 1, 2, 1, 3, 1, 0.1f);
    memcpy(PARAM(l, "mlp.gate.weight"), hand_wr, sizeof hand_wr);
    memcpy(PARAM(l, "mlp.experts.gate_up_proj"), hand_wgu, sizeof hand_wgu);
    memcpy(PARAM(l, "mlp.experts.down_proj"), hand_wd, sizeof hand_wd);
    return l;
}

/* y_e(x) = down_e * silu(gate_e . x) * (up_e . x), F = 1, in double. */
static void hand_expert(int e, const float *x, double y[2]) {
    const float *gw = hand_wgu + e * 4, *uw = gw + 2;
    double a = silu_d((double)gw[0] * x[0] + (double)gw[1] * x[1]) * ((double)uw[0] * x[0] + (double)uw[1] * x[1]);
    y[0] = hand_wd[e * 2] * a;
    y[1] = hand_wd[e * 2 + 1] * a;
}

/* Softmax of the hand logits, in double. */
static void hand_probs(double p[3][3]) {
    const double lg[3][3] = {{1, 0, -1}, {0, 2, -2}, {-1, -1, 2}};
    for (int n = 0; n < 3; n++) {
        double Z = exp(lg[n][0]) + exp(lg[n][1]) + exp(lg[n][2]);
        for (int e = 0; e < 3; e++) p[n][e] = exp(lg[n][e]) / Z;
    }
}

Test(topk, hand_routing_weights_output_aux) {
    th_layer *l = hand_layer("");
    float out[6];
    th_forward(l, out, hand_x);
    const int32_t *idx = ACT(l, "moe.topk_idx");
    const float *w = ACT(l, "moe.topk_w");
    for (int i = 0; i < 6; i++) cr_expect_eq(idx[i], hand_idx[i], "slot %d: expert %d, expected %d", i, idx[i], hand_idx[i]);

    /* Renormalised weights: p_a / (p_a + p_b) = 1 / (1 + exp(l_b - l_a)). */
    const double e = exp(1.0);
    const double wexp[6] = {e / (e + 1), 1 / (e + 1), e * e / (e * e + 1), 1 / (e * e + 1), e * e * e / (e * e * e + 1),
                            1 / (e * e * e + 1)};
    for (int i = 0; i < 6; i++) /* 1e-6: FP32 softmax and division, a few ulps of numbers below 1 */
        cr_expect(fabs(w[i] - wexp[i]) < 1e-6, "weight %d: %.8f, expected %.8f", i, w[i], wexp[i]);

    /* Output: sum over the two chosen experts of w * y_e(x). */
    for (int n = 0; n < 3; n++) {
        double ref[2] = {0, 0}, y[2];
        for (int j = 0; j < 2; j++) {
            hand_expert(hand_idx[n * 2 + j], hand_x + n * 2, y);
            ref[0] += wexp[n * 2 + j] * y[0];
            ref[1] += wexp[n * 2 + j] * y[1];
        }
        for (int i = 0; i < 2; i++) /* 1e-5 abs on O(1) values: FP32 arithmetic, a few ulps per step */
            cr_expect(fabs(out[n * 2 + i] - ref[i]) < 1e-5, "out[%d][%d] = %.7f, expected %.7f", n, i, out[n * 2 + i], ref[i]);
    }

    /* Aux loss: f = (3, 2, 1) / 6 assignments (expert 0 is chosen by all three tokens, 1 by two, 2 by
     * one); P_e = mean probability; aux = 0.01 * 3 * sum f P. */
    double p[3][3];
    hand_probs(p);
    const double f[3] = {3.0 / 6, 2.0 / 6, 1.0 / 6};
    double aux = 0;
    for (int k = 0; k < 3; k++) aux += f[k] * (p[0][k] + p[1][k] + p[2][k]) / 3;
    aux *= 0.01 * 3;
    m1c_moe_stats st = stats_of(l);
    cr_expect(fabs(st.aux_loss - aux) < 1e-6 * aux, "aux %.9g, expected %.9g", st.aux_loss, aux); /* FP32 storage: 6e-8 rel */
    cr_expect_eq(st.assignments, 6);
    cr_expect_eq(st.dropped, 0);
    cr_expect_eq(st.n_experts, 3);
    cr_assert_not_null(st.expert_load);
    for (int k = 0; k < 3; k++) /* exact fractions rounded to FP32 */
        cr_expect(fabs(st.expert_load[k] - f[k]) < 1e-7, "load[%d] = %g, expected %g", k, st.expert_load[k], f[k]);
    th_layer_free(l);
}

/* The hand case under capacity. cf = 0.5: capacity ceil(0.5 * 3 * 2 / 3) = 1 per expert. In token
 * order: x0 keeps e0 and e1; x1 wants e1, e0: both full, both dropped; x2 keeps e2, drops e0: 3 dropped.
 * cf = 1: capacity 2: x0 and x1 keep everything (e0 and e1 each reach 2), x2 keeps e2 and drops e0. */
Test(topk, hand_capacity) {
    const double e = exp(1.0);
    const double wexp[6] = {e / (e + 1), 1 / (e + 1), e * e / (e * e + 1), 1 / (e * e + 1), e * e * e / (e * e * e + 1),
                            1 / (e * e * e + 1)};
    const struct {
        const char *cf;
        long dropped;
        int kept[6];
    } cases[2] = {{"capacity_factor = 0.5;", 3, {1, 1, 0, 0, 1, 0}}, {"capacity_factor = 1.0;", 1, {1, 1, 1, 1, 1, 0}}};
    for (int c = 0; c < 2; c++) {
        th_layer *l = hand_layer(cases[c].cf);
        float out[6];
        th_forward(l, out, hand_x);
        m1c_moe_stats st = stats_of(l);
        cr_expect_eq(st.dropped, cases[c].dropped, "%s: dropped %ld, expected %ld", cases[c].cf, (long)st.dropped,
                     cases[c].dropped);
        cr_expect_eq(st.assignments, 6);
        for (int n = 0; n < 3; n++) {
            /* Dropped assignments contribute nothing and the kept weights stay as they were. */
            double ref[2] = {0, 0}, y[2];
            for (int j = 0; j < 2; j++) {
                if (!cases[c].kept[n * 2 + j]) continue;
                hand_expert(hand_idx[n * 2 + j], hand_x + n * 2, y);
                ref[0] += wexp[n * 2 + j] * y[0];
                ref[1] += wexp[n * 2 + j] * y[1];
            }
            for (int i = 0; i < 2; i++) /* 1e-5 abs: FP32 arithmetic on O(1) values */
                cr_expect(fabs(out[n * 2 + i] - ref[i]) < 1e-5, "%s: out[%d][%d] = %.7f, expected %.7f", cases[c].cf, n, i,
                          out[n * 2 + i], ref[i]);
        }
        th_layer_free(l);
    }
}

/* ---- topk against the naive reference on random data ------------------------------------------ */

static void check_against_ref(const char *settings, int E, int k, int normalize, double cf, double aux_coef,
                              uint64_t seed) {
    const int B = 2, T = 8, H = 16, F = 12, N = B * T;
    th_layer *l = th_layer_new("topk", settings, 0, 1, H, B, T, seed, 0.5f);
    float *x = th_randn((int64_t)N * H, seed + 100, 1.0f), *out = th_zeros((int64_t)N * H);
    th_forward(l, out, x);
    ref_moe r = {H, E, k, F, normalize, cf, aux_coef, 0, 0, 0, 0, 0, 0, 0, 0};
    ref_forward(&r, N, x, NULL, PARAM(l, "mlp.gate.weight"), PARAM(l, "mlp.experts.gate_up_proj"),
                PARAM(l, "mlp.experts.down_proj"));
    /* A logit gap above 1e-4 cannot be reordered by FP32 rounding (~1e-6 here): the selection must match. */
    cr_assert(k == E || r.min_gap > 1e-4, "%s: seed gives a near-tie (gap %g); pick another", settings, r.min_gap);
    const int32_t *idx = ACT(l, "moe.topk_idx");
    const float *w = ACT(l, "moe.topk_w");
    for (int i = 0; i < N * k; i++) {
        cr_assert_eq(idx[i], r.idx[i], "%s: slot %d: expert %d, reference %d", settings, i, idx[i], r.idx[i]);
        /* 1e-6 rel: FP32 softmax and renormalisation of probabilities */
        cr_expect(fabs(w[i] - r.w[i]) < 1e-6 * fabs(r.w[i]) + 1e-7, "%s: weight %d: %g vs %g", settings, i, w[i], r.w[i]);
    }
    float *ref = to_float(r.out, (int64_t)N * H);
    /* atol 1e-5, rtol 1e-4: FP32 GEMMs over H = 16 and F = 12 terms on O(1..10) values err by ~1e-6
     * relative; a wrong expert, weight or drop changes outputs by O(1). */
    double err = th_rel_err(out, ref, (int64_t)N * H, 1e-5, 1e-4);
    cr_expect(err <= 1.0, "%s: output differs from the reference (rel err %g)", settings, err);
    m1c_moe_stats st = stats_of(l);
    cr_expect_eq(st.dropped, r.dropped, "%s: dropped %ld, reference %ld", settings, (long)st.dropped, r.dropped);
    cr_expect_eq(st.assignments, (int64_t)N * k);
    /* 1e-5 rel: FP32 probabilities summed over 16 tokens */
    cr_expect(fabs(st.aux_loss - r.aux) <= 1e-5 * r.aux + 1e-12, "%s: aux %g, reference %g", settings, st.aux_loss, r.aux);
    for (int e = 0; e < E; e++) /* exact fractions rounded to FP32 */
        cr_expect(fabs(st.expert_load[e] - r.load[e]) < 1e-7, "%s: load[%d] %g vs %g", settings, e, st.expert_load[e],
                  r.load[e]);
    ref_free(&r);
    free(x), free(out), free(ref);
    th_layer_free(l);
}

Test(topk, reference_top2_normalized) {
    check_against_ref("experts = 5; top_k = 2; ffn_dim = 12; aux_coef = 0.01;", 5, 2, 1, 0, 0.01, 11);
}
Test(topk, reference_top3_unnormalized) {
    check_against_ref("experts = 5; top_k = 3; ffn_dim = 12; normalize = false;", 5, 3, 0, 0, 0.001, 12);
}
Test(topk, reference_top1) { check_against_ref("experts = 5; top_k = 1; ffn_dim = 12;", 5, 1, 1, 0, 0.001, 13); }
Test(topk, reference_all_experts) { check_against_ref("experts = 3; top_k = 3; ffn_dim = 12;", 3, 3, 1, 0, 0.001, 14); }

/* Capacity on random data: the reference simulates the token-order dropping independently. */
Test(topk, reference_capacity) {
    const double cfs[3] = {0.3, 0.6, 1.1};
    for (int i = 0; i < 3; i++) {
        char body[128];
        snprintf(body, sizeof body, "experts = 5; top_k = 2; ffn_dim = 12; capacity_factor = %.1f;", cfs[i]);
        check_against_ref(body, 5, 2, 1, cfs[i], 0.001, 15);
    }
}

/* With cf = 0.3 (capacity ceil(0.3 * 32 / 5) = 2 of 32 assignments over 5 experts) some must drop:
 * at most 5 * 2 = 10 can be kept. */
Test(topk, capacity_drops_at_least_the_excess) {
    th_layer *l = th_layer_new("topk", "experts = 5; top_k = 2; ffn_dim = 12; capacity_factor = 0.3;", 0, 1, 16, 2, 8,
                               15, 0.5f);
    float *x = th_randn(2 * 8 * 16, 115, 1.0f), *out = th_zeros(2 * 8 * 16);
    th_forward(l, out, x);
    cr_expect_geq(stats_of(l).dropped, 32 - 10);
    free(x), free(out);
    th_layer_free(l);
}

/* ---- jitter ----------------------------------------------------------------------------------- */

Test(topk, jitter_off_in_eval_and_reproducible) {
    const int B = 2, T = 8, H = 16, N = B * T;
    th_layer *lj = th_layer_new("topk", "experts = 5; top_k = 2; ffn_dim = 12; jitter = 0.3;", 0, 1, H, B, T, 21, 0.5f);
    th_layer *l0 = th_layer_new("topk", "experts = 5; top_k = 2; ffn_dim = 12;", 0, 1, H, B, T, 21, 0.5f);
    float *x = th_randn((int64_t)N * H, 121, 1.0f);
    float *o0 = th_zeros((int64_t)N * H), *o1 = th_zeros((int64_t)N * H), *o2 = th_zeros((int64_t)N * H);

    /* Evaluation: jitter is skipped, so exactly the same operations run as without it (bitwise equal). */
    forward_mode(l0, o0, x, 0);
    forward_mode(lj, o1, x, 0);
    cr_expect(memcmp(o0, o1, sizeof(float) * N * H) == 0, "jitter changed an evaluation forward");

    /* Training: same noise_seed, same result (bitwise); the noise lies in [1 - j, 1 + j] and the output
     * matches the reference fed with that noise on the router input only. */
    forward_mode(lj, o1, x, 1);
    float *noise = malloc(sizeof(float) * N * H);
    memcpy(noise, ACT(lj, "moe.jitter"), sizeof(float) * N * H);
    forward_mode(lj, o2, x, 1);
    cr_expect(memcmp(o1, o2, sizeof(float) * N * H) == 0, "jitter not reproducible for one noise_seed");
    cr_expect(memcmp(noise, ACT(lj, "moe.jitter"), sizeof(float) * N * H) == 0);
    double lo = 2, hi = 0;
    for (int i = 0; i < N * H; i++) lo = fmin(lo, noise[i]), hi = fmax(hi, noise[i]);
    cr_expect(lo >= 0.7f && hi <= 1.3f, "noise range [%g, %g] outside [0.7, 1.3]", lo, hi);
    cr_expect(hi - lo > 0.5, "noise range [%g, %g] too narrow for U(0.7, 1.3) over 256 draws", lo, hi);

    ref_moe r = {H, 5, 2, 12, 1, 0, 0.001, 0, 0, 0, 0, 0, 0, 0, 0};
    ref_forward(&r, N, x, noise, PARAM(lj, "mlp.gate.weight"), PARAM(lj, "mlp.experts.gate_up_proj"),
                PARAM(lj, "mlp.experts.down_proj"));
    cr_assert(r.min_gap > 1e-4, "near-tie (gap %g): pick another seed", r.min_gap);
    float *ref = to_float(r.out, (int64_t)N * H);
    /* atol 1e-5, rtol 1e-4: FP32 GEMMs over 16 and 12 terms (see check_against_ref) */
    double err = th_rel_err(o1, ref, (int64_t)N * H, 1e-5, 1e-4);
    cr_expect(err <= 1.0, "jittered output differs from the reference (rel err %g)", err);

    /* Another noise_seed draws other noise. */
    lj->bufs.noise_seed ^= 0x1234;
    forward_mode(lj, o2, x, 1);
    cr_expect(memcmp(noise, ACT(lj, "moe.jitter"), sizeof(float) * N * H) != 0, "noise ignores noise_seed");
    ref_free(&r);
    free(x), free(o0), free(o1), free(o2), free(noise), free(ref);
    th_layer_free(lj);
    th_layer_free(l0);
}

/* ---- gradients -------------------------------------------------------------------------------- */

/* Smallest logit gap between the k-th and the (k+1)-th expert over the tokens of the last forward
 * (from the plugin's probabilities: log(p_a / p_b) = l_a - l_b). */
static double routing_margin(th_layer *l, int N, int E, int k) {
    const float *p = ACT(l, "moe.probs");
    const int32_t *idx = ACT(l, "moe.topk_idx");
    double m = INFINITY;
    for (int n = 0; n < N && k < E; n++) {
        double pk = p[n * E + idx[n * k + k - 1]], next = 0;
        for (int e = 0; e < E; e++) {
            int chosen = 0;
            for (int j = 0; j < k; j++) chosen |= idx[n * k + j] == e;
            if (!chosen) next = fmax(next, p[n * E + e]);
        }
        m = fmin(m, log(pk / next));
    }
    return m;
}

/* th_fd_check_layer's loss is sum(out * w) without the aux loss: aux_coef = 0 here, and the aux
 * gradient is checked separately below. Jitter on: the check runs in training mode with a fixed
 * noise_seed, so the function is deterministic and its gradient passes through the noise. */
Test(topk, fd_gradients) {
    const int B = 2, T = 3, H = 8, E = 4, k = 2, N = B * T;
    const float eps = 1e-2f;
    th_layer *l = th_layer_new("topk", "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.0; jitter = 0.1;", 0, 1, H,
                               B, T, 31, 0.3f);
    float *x = NULL, *out = th_zeros((int64_t)N * H);
    /* No routing flip under any single perturbation: a perturbation of eps moves a logit by at most
     * eps * (1 + jitter) * max(|x|, |Wr|), a gap by at most twice that. Take the first input (of a
     * fixed sequence of seeds) whose smallest top-k gap is above that bound. */
    double margin = 0, bound = 0;
    for (int s = 0; s < 50 && margin <= bound; s++) {
        free(x);
        x = th_randn((int64_t)N * H, 131 + s, 1.0f);
        th_forward(l, out, x);
        bound = 2 * eps * 1.1 * fmax(th_max_abs(x, (int64_t)N * H), th_max_abs(PARAM(l, "mlp.gate.weight"), E * H));
        margin = routing_margin(l, N, E, k);
    }
    cr_assert(margin > bound, "routing margin %g <= %g: a perturbation could flip the top-k", margin, bound);
    double worst = th_fd_check_layer(l, x, eps, 24, 7);
    /* 2e-2: central differences with eps = 1e-2 on a FP32 forward: O(eps^2) truncation plus ~1e-6/eps
     * rounding, relative to max(1e-3, |a| + |n|); a wrong term is off by O(1). */
    cr_expect(worst < 2e-2, "topk FD relative error %g", worst);
    free(x), free(out);
    th_layer_free(l);
}

/* L = sum(out * w) + aux_scale * aux (the aux loss as stats() reports it, weighted as the core adds it to
 * the objective). */
static double loss_with_aux(th_layer *l, float *out, const float *x, const float *w, int64_t n) {
    th_forward(l, out, x);
    double s = (double)l->bufs.aux_scale * stats_of(l).aux_loss;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * w[i];
    return s;
}

/* Own FD loop including the aux loss, with capacity dropping and unnormalised or normalised weights.
 * wscale = 0 makes L = aux_scale * aux alone, isolating the aux gradient. Perturbations that change the
 * routing (selection or drops) are detected and skipped; most must be usable. */
static void fd_with_aux(const char *settings, float wscale, float aux_scale, uint64_t seed, int want_drops) {
    const int B = 2, T = 4, H = 8, E = 4, k = 2, N = B * T;
    const int64_t n = (int64_t)N * H;
    const float eps = 1e-2f;
    th_layer *l = th_layer_new("topk", settings, 0, 1, H, B, T, seed, 0.3f);
    l->bufs.aux_scale = aux_scale;
    float *x = th_randn(n, seed + 100, 1.0f), *out = th_zeros(n), *din = th_zeros(n);
    float *w = th_randn(n, seed + 200, 1.0f);
    for (int64_t i = 0; i < n; i++) w[i] *= wscale;
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    if (want_drops) cr_assert_gt(stats_of(l).dropped, 0, "%s: no assignment dropped; pick another seed", settings);
    th_backward(l, din, w, x);
    int32_t idx0[64], pos0[64];
    memcpy(idx0, ACT(l, "moe.topk_idx"), sizeof(int32_t) * N * k);
    memcpy(pos0, ACT(l, "moe.pos"), sizeof(int32_t) * N * k);

    struct {
        float *x, *g;
        int64_t n;
        const char *name;
    } t[4] = {{x, din, n, "input"},
              {PARAM(l, "mlp.gate.weight"), GRAD(l, "mlp.gate.weight"), E * H, "router"},
              {PARAM(l, "mlp.experts.gate_up_proj"), GRAD(l, "mlp.experts.gate_up_proj"), (int64_t)E * 2 * 8 * H, "gate_up"},
              {PARAM(l, "mlp.experts.down_proj"), GRAD(l, "mlp.experts.down_proj"), (int64_t)E * H * 8, "down"}};
    int checked = 0, skipped = 0;
    double worst = 0, gmax = 0;
    for (int ti = 0; ti < 4; ti++) {
        if (wscale == 0 && ti >= 2) break; /* the aux loss does not depend on the experts */
        /* every coordinate of the input and router (48 and 32), every 7th of the experts */
        int stride = ti < 2 ? 1 : 7;
        for (int64_t i = 0; i < t[ti].n; i += stride) {
            float v = t[ti].x[i];
            t[ti].x[i] = v + eps;
            double lp = loss_with_aux(l, out, x, w, n);
            int same = !memcmp(idx0, ACT(l, "moe.topk_idx"), sizeof(int32_t) * N * k) &&
                       !memcmp(pos0, ACT(l, "moe.pos"), sizeof(int32_t) * N * k);
            t[ti].x[i] = v - eps;
            double lm = loss_with_aux(l, out, x, w, n);
            same &= !memcmp(idx0, ACT(l, "moe.topk_idx"), sizeof(int32_t) * N * k) &&
                    !memcmp(pos0, ACT(l, "moe.pos"), sizeof(int32_t) * N * k);
            t[ti].x[i] = v;
            if (!same) {
                skipped++;
                continue;
            }
            double num = (lp - lm) / (2.0 * eps), a = t[ti].g[i];
            double r = fabs(a - num) / fmax(wscale == 0 ? 1e-4 : 1e-3, fabs(a) + fabs(num));
            if (r > worst) cr_log_info("%s: %s[%ld]: analytic %.6g numeric %.6g", settings, t[ti].name, (long)i, a, num);
            worst = fmax(worst, r);
            gmax = fmax(gmax, fabs(a));
            checked++;
        }
    }
    cr_assert_gt(checked, 9 * skipped, "%s: %d of %d perturbations changed the routing", settings, skipped,
                 checked + skipped);
    /* The check is not vacuous: gradients of the order of the loss terms exist. */
    cr_expect_gt(gmax, wscale == 0 ? 1e-4 : 1e-2, "%s: largest gradient %g", settings, gmax);
    /* 2e-2 as in fd_gradients; for the aux-only loss (L ~ 0.5, gradients ~1e-2) the floor is 1e-4:
     * the aux loss comes in double, FP32 rounding of the probabilities ~1e-8 / eps = 1e-6 absolute. */
    cr_expect(worst < 2e-2, "%s: FD relative error %g", settings, worst);
    free(x), free(out), free(din), free(w);
    th_layer_free(l);
}

Test(topk, fd_with_aux_and_capacity) {
    fd_with_aux("experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5; capacity_factor = 0.75;", 1.0f, 1.0f, 41, 1);
}
Test(topk, fd_unnormalized) {
    fd_with_aux("experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5; normalize = false;", 1.0f, 1.0f, 42, 0);
}
Test(topk, fd_aux_only) {
    fd_with_aux("experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5; jitter = 0.2;", 0.0f, 1.0f, 43, 0);
}
/* aux_scale weights the aux gradient: twice the aux loss alone, and half of it beside the output term. */
Test(topk, fd_aux_scaled) {
    fd_with_aux("experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5; jitter = 0.2;", 0.0f, 2.0f, 43, 0);
    fd_with_aux("experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5;", 1.0f, 0.5f, 44, 0);
}

/* Gradients (all parameters and din) of one forward + backward of a fresh layer at the given
 * aux_scale, L = sum(out * dout) + aux_scale * aux; g[0..3] malloc'd, g[3] = din. */
static void grads_at_scale(const char *settings, float aux_scale, float *g[4]) {
    const int B = 2, T = 4, H = 8, N = B * T;
    th_layer *l = th_layer_new("topk", settings, 0, 1, H, B, T, 45, 0.3f);
    float *x = th_randn((int64_t)N * H, 145, 1.0f), *out = th_zeros((int64_t)N * H);
    float *dout = th_randn((int64_t)N * H, 146, 1.0f);
    g[3] = th_zeros((int64_t)N * H);
    l->bufs.aux_scale = aux_scale;
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    th_backward(l, g[3], dout, x);
    for (int p = 0; p < 3; p++) {
        int64_t np = numel(&l->grads[p]);
        g[p] = malloc(sizeof(float) * np);
        memcpy(g[p], l->grads[p].data, sizeof(float) * np);
    }
    free(x), free(out), free(dout);
    th_layer_free(l);
}

/* aux_scale = 0 removes exactly the aux gradient: the same gradients, bit for bit, as a layer without
 * the aux loss (aux_coef = 0); and the aux part is linear in aux_scale: g(2) - g(0) = 2 (g(1) - g(0)). */
Test(topk, aux_scale_zero_and_linear) {
    const char *with = "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.5;";
    const char *without = "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.0;";
    const char *names[4] = {"router", "gate_up", "down", "din"};
    const int64_t sizes[4] = {4 * 8, 4 * 16 * 8, 4 * 8 * 8, 2 * 4 * 8};
    float *g0[4], *gn[4], *g1[4], *g2[4];
    grads_at_scale(with, 0.0f, g0);
    grads_at_scale(without, 1.0f, gn);
    grads_at_scale(with, 1.0f, g1);
    grads_at_scale(with, 2.0f, g2);
    double aux_max = 0;
    for (int p = 0; p < 4; p++) {
        cr_expect(memcmp(g0[p], gn[p], sizeof(float) * sizes[p]) == 0, "%s: aux_scale 0 differs from no aux loss",
                  names[p]);
        double m = 0;
        for (int64_t i = 0; i < sizes[p]; i++) {
            m = fmax(m, fabs((double)g1[p][i]) + fabs((double)g0[p][i]));
            aux_max = fmax(aux_max, fabs((double)g1[p][i] - g0[p][i]));
        }
        for (int64_t i = 0; i < sizes[p]; i++) {
            double d2 = (double)g2[p][i] - g0[p][i], d1 = (double)g1[p][i] - g0[p][i];
            /* 1e-6 of the largest gradient: each of g0, g1, g2 is a FP32 sum whose rounding (~1e-7
             * relative) the differences expose; a wrong scaling is off by the whole aux part */
            cr_expect(fabs(d2 - 2 * d1) <= 1e-6 * m, "%s[%ld]: g(2)-g(0) = %g, 2 (g(1)-g(0)) = %g", names[p], (long)i,
                      d2, 2 * d1);
        }
    }
    /* The aux part is not negligible, so the checks above can fail: aux_coef 0.5 gives router-side
     * gradients of ~1e-2 (see fd_aux_only). */
    cr_expect_gt(aux_max, 1e-3, "aux gradient part %g", aux_max);
    for (int p = 0; p < 4; p++) free(g0[p]), free(gn[p]), free(g1[p]), free(g2[p]);
}

/* Gradients accumulate: a second backward adds the same amount again. */
Test(topk, backward_accumulates) {
    const int B = 2, T = 4, H = 8, N = B * T;
    th_layer *l = th_layer_new("topk", "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.1;", 0, 1, H, B, T, 51, 0.3f);
    float *x = th_randn((int64_t)N * H, 151, 1.0f), *out = th_zeros((int64_t)N * H);
    float *dout = th_randn((int64_t)N * H, 152, 1.0f), *d1 = th_zeros((int64_t)N * H), *d2 = th_zeros((int64_t)N * H);
    th_layer_zero_grads(l);
    th_forward(l, out, x);
    th_backward(l, d1, dout, x);
    float *g1[3];
    for (int p = 0; p < 3; p++) {
        int64_t np = numel(&l->grads[p]);
        g1[p] = malloc(sizeof(float) * np);
        memcpy(g1[p], l->grads[p].data, sizeof(float) * np);
        for (int64_t i = 0; i < np; i++) g1[p][i] *= 2;
    }
    memcpy(d2, d1, sizeof(float) * N * H);
    th_backward(l, d2, dout, x);
    for (int i = 0; i < N * H; i++) d1[i] *= 2;
    /* 1e-5 rel (atol 1e-7): BLAS may fold the accumulation (beta = 1) into its blocked sums, so the
     * second pass can round differently from 2x the first */
    cr_expect(th_rel_err(d2, d1, (int64_t)N * H, 1e-7, 1e-5) <= 1.0, "din did not accumulate");
    for (int p = 0; p < 3; p++) {
        cr_expect(th_rel_err(l->grads[p].data, g1[p], numel(&l->grads[p]), 1e-7, 1e-5) <= 1.0, "%s did not accumulate",
                  l->pspec[p].name);
        free(g1[p]);
    }
    free(x), free(out), free(dout), free(d1), free(d2);
    th_layer_free(l);
}

/* ---- settings, stats and counts --------------------------------------------------------------- */

Test(topk, settings_refused) {
    m1c_plugin *p = th_plugin("topk", M1C_KIND_MOE);
    cr_expect_eq(try_create("topk", "experts = 3; top_k = 4;", 8), M1C_ERR);
    cr_expect(strstr(p->error, "top_k") != NULL, "message should name top_k: %s", p->error);
    cr_expect_eq(try_create("topk", "experts = 4; top_k = 2; capacity_facter = 1.0;", 8), M1C_ERR);
    cr_expect(strstr(p->error, "capacity_facter") != NULL, "message should name the typo: %s", p->error);
    cr_expect_eq(try_create("topk", "experts = 4; jitter = 1.5;", 8), M1C_ERR);
    cr_expect(strstr(p->error, "jitter") != NULL, "message should name jitter: %s", p->error);
    cr_expect_eq(try_create("topk", "experts = 0;", 8), M1C_ERR);
    cr_expect_eq(try_create("topk", "experts = 4; top_k = 4; ffn_dim = 8; normalize = false; jitter = 0.1;", 8), M1C_OK,
                 "valid settings refused: %s", p->error);
    cr_expect_eq(try_create("dense", "ffn_dim = 8; experts = 4;", 8), M1C_ERR);
    cr_expect(strstr(th_plugin("dense", M1C_KIND_MOE)->error, "experts") != NULL);
}

Test(topk, count) {
    th_layer *l = th_layer_new("topk", "experts = 4; top_k = 2; ffn_dim = 16;", 0, 1, 8, 1, 2, 1, 0.1f);
    int64_t total = 0, active = 0;
    double flops = 0;
    cr_assert_eq(M1C_MOE(l->plugin)->count(l->self, &total, &active, &flops), M1C_OK);
    /* router 4*8 = 32; each expert 3 * 16 * 8 = 384 */
    cr_expect_eq(total, 32 + 4 * 384);
    cr_expect_eq(active, 32 + 2 * 384);
    /* 2 FLOPs per multiply-add over router and two experts' GEMMs: 2*32 + 2*2*384 = 1600; the SwiGLU
     * and combine add a little (< 20% at this tiny size) */
    cr_expect(flops >= 1600 && flops < 1.2 * 1600, "flops per token %g", flops);
    int64_t params = 0;
    for (int i = 0; i < l->np; i++) params += numel(&l->params[i]);
    cr_expect_eq(params, total, "declared parameters %ld vs count %ld", (long)params, (long)total);
    th_layer_free(l);
}

/* ---- dense -------------------------------------------------------------------------------------- */

/* The dense forward in double from the plugin's own weights. */
static float *dense_ref(th_layer *l, const float *x, int N, int H, int F) {
    const float *Wg = PARAM(l, "mlp.gate_proj.weight"), *Wu = PARAM(l, "mlp.up_proj.weight");
    const float *Wd = PARAM(l, "mlp.down_proj.weight");
    double *ref = calloc((size_t)N * H, sizeof(double)), *a = calloc((size_t)F, sizeof(double));
    for (int n = 0; n < N; n++) {
        for (int f = 0; f < F; f++) {
            double g = 0, u = 0;
            for (int i = 0; i < H; i++) g += (double)Wg[f * H + i] * x[n * H + i], u += (double)Wu[f * H + i] * x[n * H + i];
            a[f] = silu_d(g) * u;
        }
        for (int i = 0; i < H; i++)
            for (int f = 0; f < F; f++) ref[n * H + i] += Wd[i * F + f] * a[f];
    }
    float *r = to_float(ref, (int64_t)N * H);
    free(ref), free(a);
    return r;
}

Test(dense, reference_forward_and_stats) {
    const int B = 2, T = 5, H = 16, F = 24, N = B * T;
    th_layer *l = th_layer_new("dense", "ffn_dim = 24;", 0, 1, H, B, T, 61, 0.3f);
    float *x = th_randn((int64_t)N * H, 161, 1.0f), *out = th_zeros((int64_t)N * H);
    th_forward(l, out, x);
    float *reff = dense_ref(l, x, N, H, F);
    /* atol 1e-5, rtol 1e-4: FP32 GEMMs over 16 and 24 terms (~1e-6 relative) */
    cr_expect(th_rel_err(out, reff, (int64_t)N * H, 1e-5, 1e-4) <= 1.0, "dense output differs from the reference");
    m1c_moe_stats st = stats_of(l);
    cr_expect_eq(st.aux_loss, 0.0);
    cr_expect_eq(st.dropped, 0);
    cr_expect_eq(st.n_experts, 0);
    cr_expect_null(st.expert_load);
    int64_t total = 0, active = 0;
    double flops = 0;
    cr_assert_eq(M1C_MOE(l->plugin)->count(l->self, &total, &active, &flops), M1C_OK);
    cr_expect_eq(total, 3 * 24 * 16);
    cr_expect_eq(active, 3 * 24 * 16);
    cr_expect(flops >= 2.0 * 3 * 24 * 16 && flops < 1.1 * 2.0 * 3 * 24 * 16, "flops per token %g", flops);
    free(x), free(out), free(reff);
    th_layer_free(l);
}

/* Inputs 100x larger: gate pre-activations reach |g| ~ 300, far beyond exp's float range (|g| > 88)
 * on both sides, where exp saturates (+0, +inf) and the output must still be silu(g) * u: g u for
 * large g, 0 for very negative g. */
Test(dense, extreme_gates) {
    const int B = 2, T = 5, H = 16, F = 24, N = B * T;
    th_layer *l = th_layer_new("dense", "ffn_dim = 24;", 0, 1, H, B, T, 62, 0.3f);
    float *x = th_randn((int64_t)N * H, 162, 100.0f), *out = th_zeros((int64_t)N * H);
    th_forward(l, out, x);
    const float *gu = ACT(l, "mlp.gate_up");
    double gmin = 0, gmax = 0;
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) gmin = fmin(gmin, gu[n * 2 * F + f]), gmax = fmax(gmax, gu[n * 2 * F + f]);
    cr_assert(gmin < -100 && gmax > 100, "gates span [%g, %g]: the saturated ranges are not reached", gmin, gmax);
    float *reff = dense_ref(l, x, N, H, F);
    /* rtol 1e-4 as above; atol 1e-2 on outputs of ~1e4 (sums of products of 100x inputs) */
    cr_expect(th_rel_err(out, reff, (int64_t)N * H, 1e-2, 1e-4) <= 1.0, "dense output differs from the reference");
    free(x), free(out), free(reff);
    th_layer_free(l);
}

/* moe_exp against double exp: accurate over its range, and saturated (+0 below, +inf above, never a
 * negative or NaN value) for every finite input however far out. */
Test(swiglu, exp_range_and_saturation) {
    for (int i = 0; i <= 200000; i++) {
        const float x = -87.0f + (float)i * (175.3f / 200000); /* -87 .. 88.3, the accurate range */
        const double e = moe_exp(x), ref = exp((double)x);
        /* 2 ulp = 2^-22 relative: Cephes expf's polynomial is within 1 ulp (0.99 ulp measured over every
         * float of this range) and the scaling by 2^n is exact */
        cr_expect(fabs(e - ref) <= 0x1p-22 * ref, "exp(%.9g) = %.9g vs %.9g", x, e, ref);
    }
    const float far[] = {-FLT_MAX, -1e30f, -1e6f, -1e4f, -1000.5f, -1000, -200, -104, -100, -89, -88.5f, -88,
                         -87.7f, -87.5f, 88.35f, 88.4f, 88.5f, 88.72f, 88.73f, 89, 100, 1000, 1e4f, 1e6f, 1e30f,
                         FLT_MAX};
    for (size_t i = 0; i < sizeof far / sizeof far[0]; i++) {
        const float x = far[i], e = moe_exp(x);
        cr_expect(!signbit(e) && !isnan(e), "exp(%g) = %g", x, e);
        if (x < 0) /* flushed to +0 or a denormal: off by less than the smallest normal float */
            cr_expect(fabs(e - exp((double)x)) <= FLT_MIN, "exp(%g) = %g", x, e);
        else if (x >= 88.73f) /* e^88.73 > FLT_MAX */
            cr_expect(isinf(e), "exp(%g) = %g, not +inf", x, e);
        else /* 88.3 .. 88.72: +inf a little early (2^128 from n = 128), or within 2 ulp as above */
            cr_expect(isinf(e) || fabs(e - exp((double)x)) <= 0x1p-22 * exp((double)x), "exp(%g) = %g", x, e);
    }
    cr_expect(isnan(moe_exp(NAN)), "exp(NaN) is not NaN");
}

/* The shared SwiGLU rows against double precision over gates from -1e4 to 1e4 (the polynomial exp and
 * both of its saturations), plus the edges of exp's float range: sigmoid in [0, 1], everything finite. */
Test(swiglu, rows_against_double) {
    static const float edge[] = {0, -40, 40, -87, 87, -87.5f, 87.5f, -88, 88, -88.4f, 88.4f, -88.5f, 88.5f,
                                 -88.8f, 88.8f, -89, 89, -90.5f, 90.5f, -100, 100, -1e3f, 1e3f, -1e4f, 1e4f};
    enum { NS = 203, NE = sizeof edge / sizeof edge[0], F = NS + NE };
    float g[F], u[F], a[F], dg[F], du[F], da[F];
    for (int f = 0; f < F; f++) {
        double t = (f - NS / 2) / (double)(NS / 2); /* -1 .. 1 */
        g[f] = f < NS ? (float)(t * t * t * 1e4 + t * 3) : edge[f - NS]; /* dense near 0, reaching +-1e4 */
        u[f] = (float)(0.5 + 0.25 * cos(f));
        da[f] = du[f] = (float)(1.0 - 0.3 * sin(f)); /* d act on entry */
    }
    swiglu_row(a, g, u, F);
    swiglu_back_row(dg, du, g, u, F);
    for (int f = 0; f < F; f++) {
        const float sg = moe_sigmoid(g[f]);
        cr_expect(sg >= 0 && sg <= 1, "sigmoid(%g) = %g", g[f], sg);
        cr_expect(isfinite(a[f]) && isfinite(du[f]) && isfinite(dg[f]), "g %g: %g %g %g", g[f], a[f], du[f], dg[f]);
        double s = 1.0 / (1.0 + exp(-(double)g[f]));
        double ra = (double)g[f] * s * u[f], rdu = (double)da[f] * g[f] * s,
               rdg = (double)da[f] * u[f] * s * (1.0 + g[f] * (1.0 - s));
        /* 1e-6 rel: an exp within 2 ulp and four more roundings; 1e-33 abs: below g = -87.3 the sigmoid
         * is a denormal or 0 instead of e^g < 1.2e-38, which leaves at most (1 + |g|) 1.2e-38 < 1.1e-36 */
        cr_expect(fabs(a[f] - ra) <= 1e-6 * fabs(ra) + 1e-33, "act: g %g: %g vs %g", g[f], a[f], ra);
        cr_expect(fabs(du[f] - rdu) <= 1e-6 * fabs(rdu) + 1e-33, "d up: g %g: %g vs %g", g[f], du[f], rdu);
        /* 1 + g (1 - s) cancels near g = -1.28: 1e-6 of the terms' size (1 + |g| s (1 - s)) instead */
        double scale = fabs((double)da[f] * u[f] * s) * (1.0 + fabs(g[f]) * (1.0 - s));
        cr_expect(fabs(dg[f] - rdg) <= 1e-6 * scale + 1e-33, "d gate: g %g: %g vs %g", g[f], dg[f], rdg);
    }
}

Test(dense, fd_gradients) {
    th_layer *l = th_layer_new("dense", "ffn_dim = 12;", 0, 1, 8, 2, 3, 71, 0.3f);
    float *x = th_randn(2 * 3 * 8, 171, 1.0f);
    double worst = th_fd_check_layer(l, x, 1e-2f, 24, 9);
    /* 2e-2: see topk fd_gradients (eps = 1e-2, FP32 forward) */
    cr_expect(worst < 2e-2, "dense FD relative error %g", worst);
    free(x);
    th_layer_free(l);
}

/* A one-expert top-1 MoE is the dense FFN with the same weights (w = 1 after renormalisation). */
Test(dense, equals_one_expert_topk) {
    const int B = 2, T = 4, H = 8, F = 12, N = B * T;
    th_layer *d = th_layer_new("dense", "ffn_dim = 12;", 0, 1, H, B, T, 81, 0.3f);
    th_layer *m = th_layer_new("topk", "experts = 1; top_k = 1; ffn_dim = 12;", 0, 1, H, B, T, 82, 0.3f);
    float *gu = PARAM(m, "mlp.experts.gate_up_proj");
    memcpy(gu, PARAM(d, "mlp.gate_proj.weight"), sizeof(float) * F * H);
    memcpy(gu + F * H, PARAM(d, "mlp.up_proj.weight"), sizeof(float) * F * H);
    memcpy(PARAM(m, "mlp.experts.down_proj"), PARAM(d, "mlp.down_proj.weight"), sizeof(float) * H * F);
    float *x = th_randn((int64_t)N * H, 181, 1.0f), *o1 = th_zeros((int64_t)N * H), *o2 = th_zeros((int64_t)N * H);
    th_forward(d, o1, x);
    th_forward(m, o2, x);
    /* 1e-6 rel, 1e-7 abs: the same GEMMs on the same rows; only the final multiply by w = 1.0f differs */
    cr_expect(th_rel_err(o2, o1, (int64_t)N * H, 1e-7, 1e-6) <= 1.0, "topk(E=1,k=1) differs from dense");
    free(x), free(o1), free(o2);
    th_layer_free(d);
    th_layer_free(m);
}
