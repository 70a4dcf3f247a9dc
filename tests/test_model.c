/* Whole-model tests (core/model.c with the lightning, softmax, topk and dense plugins): finite-difference
 * gradients of every parameter tensor, incremental decoding against the full forward, the DeepNorm
 * residual by hand, determinism and the out-of-vocabulary error. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "../core/model.h"
#include "../core/rng.h"
#include "../core/session.h"

#define VOCAB 259 /* synth-math's vocabulary: the stage's data gives the model its vocab_size */

/* ---- sessions and models ----------------------------------------------------------------------- */

typedef struct cfg_opts {
    int hidden;
    const char *pattern; /* libconfig list body, e.g. "\"lin\", \"soft\"" */
    int layers;
    int block_size;      /* lightning */
    double lin_alpha, lin_beta, soft_alpha, soft_beta, ffn_alpha, ffn_beta;
    const char *ffn;     /* the ffn group's body */
    int tied;
    double norm_eps;
    int T;
    int threads; /* run.threads; 0 (unset) means 1: these models are too small to gain from threads */
} cfg_opts;

static char *cfg_text(const cfg_opts *o) {
    /* Only the types the stack uses (an unused one is a warning). */
    char *lin = strstr(o->pattern, "\"lin\"")
                    ? m1c_xasprintf("    lin  = { alpha = %.17g; beta = %.17g;\n"
                                    "             attention = { plugin = \"lightning\"; heads = 2; head_dim = 4;\n"
                                    "                           block_size = %d; }; };\n",
                                    o->lin_alpha, o->lin_beta, o->block_size)
                    : m1c_xstrdup("");
    char *soft = strstr(o->pattern, "\"soft\"")
                     ? m1c_xasprintf("    soft = { alpha = %.17g; beta = %.17g;\n"
                                     "             attention = { plugin = \"softmax\"; heads = 4; kv_heads = 2; head_dim = 4;\n"
                                     "                           rotary_dim = 2; rope_theta = 100.0; }; };\n",
                                     o->soft_alpha, o->soft_beta)
                     : m1c_xstrdup("");
    char *text = m1c_xasprintf(
        "model = {\n"
        "  hidden = %d; layers = %d; tie_embeddings = %s; norm_eps = %.17g;\n"
        "  pattern = [%s];\n"
        "  types = {\n%s%s  };\n"
        "  ffn = { %s };\n"
        "  ffn_alpha = %.17g; ffn_beta = %.17g;\n"
        "};\n"
        "run = { threads = %d;\n"
        "        stages = ( { data = { plugin = \"synth-math\"; }; steps = 1; batch = 2; seq_len = %d; } ); };\n",
        o->hidden, o->layers, o->tied ? "true" : "false", o->norm_eps, o->pattern, lin, soft, o->ffn, o->ffn_alpha,
        o->ffn_beta, o->threads > 0 ? o->threads : 1, o->T);
    free(lin), free(soft);
    return text;
}

/* A session with its model built from `seed`; plugins from the build tree. */
static void open_model(m1c_session *s, const cfg_opts *o, uint64_t seed) {
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
    char *text = cfg_text(o);
    m1c_err e = {{0}};
    int rc = m1c_session_open_text(s, text, "test_model.cfg", M1C_SOURCE_DIR "/tests/data/model", NULL, 0, &e);
    free(text);
    cr_assert_eq(rc, M1C_OK, "open: %s", e.msg);
    cr_assert_eq(s->spec.model.vocab_size, VOCAB, "vocab_size from synth-math");
    cr_assert_eq(m1c_session_build_model(s, seed, &e), M1C_OK, "build: %s", e.msg);
}

/* Replace the plugins' tiny default initialisation (std 0.02, norms at 1) with O(1) signals, so that
 * every path of the network carries gradient well above float noise: N(0, 1/fan_in) for matrices
 * (fan_in = last dim) and 1 + N(0, 0.2^2) for norm weights. */
static void scramble(m1c_model *m, uint64_t seed) {
    for (int i = 0; i < m->params.n; i++) {
        m1c_tensor *t = &m->params.t[i];
        float *x = t->data;
        int64_t n = m1c_numel(t);
        m1c_rng r;
        m1c_rng_seed(&r, seed, (uint64_t)i);
        float std = 1.0f / sqrtf((float)t->shape[t->ndim - 1]);
        for (int64_t j = 0; j < n; j++)
            x[j] = m->init[i] == M1C_INIT_ONES ? 1.0f + 0.2f * m1c_rng_normal(&r) : std * m1c_rng_normal(&r);
    }
}

static int32_t *rand_tokens(int B, int T, uint64_t seed) {
    int32_t *tok = malloc(sizeof *tok * (size_t)B * (T + 1));
    m1c_rng r;
    m1c_rng_seed(&r, seed, 0);
    for (int i = 0; i < B * (T + 1); i++) tok[i] = (int32_t)(m1c_rng_u64(&r) % VOCAB);
    return tok;
}

static void forward(m1c_model *m, m1c_run *r, const int32_t *tok) {
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_forward(m, r, tok, &e), M1C_OK, "forward: %s", e.msg);
}

/* ---- finite differences of the whole model ------------------------------------------------------ */

/* The objective-like scalar L = -sum_i w_i logp_i + aux (aux: the MoE load-balancing loss, which the
 * plugins' backward includes with weight 1), in double. logp_i is recomputed in double from the model's
 * float logits: the float logp is rounded to a step of ~5e-7 (an ulp of |logp| ~ 5.5), which divided by
 * the finite-difference step would be most of the noise; the two are the same function (checked). */
static double loss(m1c_model *m, m1c_run *r, const int32_t *tok, const float *w) {
    forward(m, r, tok);
    double L = r->aux_loss;
    for (int64_t i = 0; i < (int64_t)r->B * r->T; i++) {
        const float *z = r->logits + i * m->V;
        double mx = -INFINITY, se = 0;
        for (int v = 0; v < m->V; v++) mx = fmax(mx, z[v]);
        for (int v = 0; v < m->V; v++) se += exp(z[v] - mx);
        double logp = z[r->targets[i]] - mx - log(se);
        /* float logsumexp of 259 terms against double: a few ulps of |logp| <= ~10 */
        cr_assert_leq(fabs(logp - r->logp[i]), 1e-5, "row %lld: logp %.9g, from logits %.9g", (long long)i,
                      r->logp[i], logp);
        L -= (double)w[i] * logp;
    }
    return L;
}

/* Every layer's chosen experts (the topk plugin's "moe.topk_idx" activation), to detect a routing flip
 * under a perturbation: the loss is not differentiable across one. Returns the number of ints written. */
static int routing(m1c_model *m, m1c_run *r, int32_t *out) {
    int n = 0;
    for (int l = 0; l < m->L; l++)
        for (int j = 0; j < r->ffn[l].na; j++) {
            const m1c_tensor *t = &r->ffn[l].acts[j];
            if (!t->name || !strstr(t->name, "moe.topk_idx")) continue;
            /* (N, k) rows, best first: the order inside a row does not change the output (a sum), so
             * compare the sets (sorted rows). */
            const int32_t *idx = t->data;
            int64_t rows = t->shape[0], k = t->shape[1];
            for (int64_t i = 0; i < rows; i++) {
                int32_t *o = out + n + i * k;
                memcpy(o, idx + i * k, (size_t)k * sizeof *o);
                for (int64_t a = 1; a < k; a++) /* insertion sort of k ints */
                    for (int64_t b = a; b > 0 && o[b - 1] > o[b]; b--) {
                        int32_t tmp = o[b];
                        o[b] = o[b - 1], o[b - 1] = tmp;
                    }
            }
            n += (int)(rows * k);
        }
    return n;
}

typedef struct fd_result {
    double worst_rel;   /* max |a - n| / max(|a| + |n|, 1e-3) */
    double worst_ratio; /* max |a - n| / (FD_ATOL + FD_RTOL |n|): <= 1 passes */
    char where_rel[200], where_ratio[200];
    int checked, flips, tensors;
} fd_result;

/* Tolerances of the five-point differences (h = 1e-2, 5e-3, 2.5e-3, the best one counts) on the float
 * forward with O(1) weights:
 * - FD_ATOL: rounding. The loss carries the forward's float rounding, ~1e-7 of |L| (~7e-7 absolute),
 *   which the stencil divides by h (sum of |c_q| / 12h = 1.5/h): about 1e-4 at h = 1e-2, seen as an
 *   erratic jump of the numeric value with h on coordinates whose gradient is ~1e-3.
 * - FD_RTOL: truncation, O(h^4 f^(5)): 5% at h = 1e-2 on the most curved coordinate seen (a lightning
 *   qkv weight of the dense-tied model, whose attention is cubic in it), under 1% at 5e-3.
 * Over 20 seeds of both models the worst |a - n| / (ATOL + RTOL |n|) was 0.48; an error in a gradient
 * (a missing term, factor or sign) shows at the largest-gradient coordinates as 1 to 100. */
#define FD_ATOL 2e-4
#define FD_RTOL 2e-2

static void fd_record(fd_result *res, const char *name, int64_t j, double ana, double num) {
    double rel = fabs(ana - num) / fmax(fabs(ana) + fabs(num), 1e-3);
    double ratio = fabs(ana - num) / (FD_ATOL + FD_RTOL * fabs(num));
    if (rel > res->worst_rel) {
        res->worst_rel = rel;
        snprintf(res->where_rel, sizeof res->where_rel, "%s[%lld]: analytic %.6g, numeric %.6g", name, (long long)j,
                 ana, num);
    }
    if (ratio > res->worst_ratio) {
        res->worst_ratio = ratio;
        snprintf(res->where_ratio, sizeof res->where_ratio, "%s[%lld]: analytic %.6g, numeric %.6g", name,
                 (long long)j, ana, num);
    }
    res->checked++;
}

/* Compare d L / d param with finite differences at, in every parameter tensor, its two largest-gradient
 * coordinates (the best signal to noise: a wrong term in a tensor shows there) and `samples` random
 * ones. Random embedding coordinates come from the rows of tokens the batch uses; with an untied head
 * the other rows must have an exactly zero gradient (checked). Coordinates whose perturbation changes
 * any token's set of chosen experts are skipped: the loss has a kink there. */
static fd_result fd_check(const cfg_opts *o, int B, int T, int samples, uint64_t seed) {
    m1c_session s;
    open_model(&s, o, 7);
    m1c_model *m = &s.model;
    scramble(m, seed);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_alloc_grads(m, &e), M1C_OK, "%s", e.msg);
    m1c_run r;
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);

    int32_t *tok = rand_tokens(B, T, seed + 1);
    int N = B * T;
    float *w = malloc(sizeof *w * (size_t)N);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed + 2, 0);
    for (int i = 0; i < N; i++) w[i] = 2.0f * m1c_rng_uniform(&rng) - 1.0f; /* signed, like advantages */

    /* analytic gradients */
    loss(m, &r, tok, w);
    int32_t *route0 = malloc(sizeof(int32_t) * (size_t)N * 64), *route1 = malloc(sizeof(int32_t) * (size_t)N * 64);
    int nroute = routing(m, &r, route0);
    m1c_arena_zero(&m->grads);
    for (int i = 0; i < N; i++) r.dlogp[i] = -w[i];
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "backward: %s", e.msg);

    fd_result res = {0};
    if (!m->tied) {
        char used[VOCAB] = {0};
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) used[tok[b * (T + 1) + t]] = 1;
        const float *g = m->grads.t[m->embed].data;
        for (int v = 0; v < VOCAB; v++)
            for (int c = 0; c < m->H && !used[v]; c++)
                cr_assert_eq(g[(int64_t)v * m->H + c], 0.0f, "embedding row %d (unused) has gradient", v);
    }
    for (int i = 0; i < m->params.n; i++) {
        m1c_tensor *t = &m->params.t[i];
        float *x = t->data;
        const float *g = m->grads.t[i].data;
        int64_t n = m1c_numel(t), top[2] = {0, n > 1 ? 1 : 0};
        for (int64_t j = 0; j < n; j++) {
            if (fabsf(g[j]) > fabsf(g[top[0]])) top[1] = top[0], top[0] = j;
            else if (j != top[0] && fabsf(g[j]) > fabsf(g[top[1]])) top[1] = j;
        }
        cr_assert_gt(fabsf(g[top[0]]), 10 * FD_ATOL, "%s: largest gradient %g is within the noise", t->name,
                     g[top[0]]);
        res.tensors++;
        for (int sdone = 0, tries = 0; sdone < samples + 2 && tries < 8 * (samples + 2); tries++) {
            int64_t j = (int64_t)(m1c_rng_u64(&rng) % (uint64_t)n);
            if (tries < 2) {
                j = top[tries];
            } else if (i == m->embed && !m->tied) { /* a row the batch uses */
                int b = (int)(m1c_rng_u64(&rng) % (uint64_t)B), tt = (int)(m1c_rng_u64(&rng) % (uint64_t)T);
                j = (int64_t)tok[b * (T + 1) + tt] * m->H + (int64_t)(m1c_rng_u64(&rng) % (uint64_t)m->H);
            }
            /* Five-point central difference, (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / 12h, at three step
             * sizes; the one closest to the analytic value counts. Truncation error (O(h^4)) falls with h
             * and rounding error (~1.5 dL / h) grows: a wrong gradient is wrong at every h, while a right
             * one has some h where both errors are small, on flat and on strongly curved coordinates. A
             * step whose perturbations change the routing is not used. */
            const float x0 = x[j];
            const double c[4] = {-1.0, 8.0, -8.0, 1.0}, hs[4] = {2.0, 1.0, -1.0, -2.0};
            const float steps[3] = {1e-2f, 5e-3f, 2.5e-3f};
            double num = NAN;
            int usable = 0;
            for (int k = 0; k < 3; k++) {
                double d = 0;
                int flip = 0;
                for (int q = 0; q < 4; q++) {
                    x[j] = x0 + (float)(hs[q] * steps[k]);
                    d += c[q] * loss(m, &r, tok, w);
                    flip |= routing(m, &r, route1) != nroute || memcmp(route0, route1, sizeof(int32_t) * nroute);
                }
                d /= 12.0 * steps[k];
                if (flip) continue;
                if (!usable++ || fabs(d - g[j]) < fabs(num - g[j])) num = d;
            }
            x[j] = x0;
            if (!usable) {
                res.flips++;
                continue;
            }
            fd_record(&res, t->name, j, g[j], num);
            sdone++;
        }
    }
    cr_log_info("fd: %d coordinates in %d tensors, %d skipped for routing flips", res.checked, res.tensors, res.flips);
    cr_log_info("fd: worst relative error %.3g at %s", res.worst_rel, res.where_rel);
    cr_log_info("fd: worst |a-n| / (%g + %g |n|) = %.3g at %s", FD_ATOL, FD_RTOL, res.worst_ratio, res.where_ratio);
    free(route0), free(route1), free(w), free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
    return res;
}

static const cfg_opts hybrid_moe = {
    .hidden = 12, .layers = 4, .pattern = "\"lin\", \"soft\", \"lin\", \"soft\"", .block_size = 3,
    .lin_alpha = 1.7, .lin_beta = 0.6, .soft_alpha = 1.3, .soft_beta = 0.8, .ffn_alpha = 1.5, .ffn_beta = 0.7,
    .ffn = "plugin = \"topk\"; experts = 3; top_k = 2; ffn_dim = 8; jitter = 0.0; aux_coef = 0.05;",
    .tied = 0, .norm_eps = 1e-5, .T = 7,
};

Test(model, fd_gradients_hybrid_topk, .timeout = 120) {
    fd_result r = fd_check(&hybrid_moe, 2, 7, 6, 11);
    cr_expect_geq(r.checked, r.tensors * 8 * 3 / 4, "too many coordinates skipped (%d flips)", r.flips);
    cr_expect_leq(r.worst_ratio, 1.0, "worst |a-n| / tolerance %.3g at %s", r.worst_ratio, r.where_ratio);
}

Test(model, fd_gradients_dense_tied, .timeout = 120) {
    cfg_opts o = hybrid_moe;
    o.layers = 3;
    o.pattern = "\"soft\", \"lin\", \"lin\"";
    o.hidden = 16;
    o.lin_alpha = 1.3, o.lin_beta = 0.8, o.soft_alpha = 1.7, o.soft_beta = 0.6, o.ffn_alpha = 0.9, o.ffn_beta = 1.4;
    o.ffn = "plugin = \"dense\"; ffn_dim = 12;";
    o.tied = 1;
    o.T = 5;
    fd_result r = fd_check(&o, 2, 5, 6, 23);
    cr_expect_eq(r.flips, 0, "a dense FFN has no routing");
    cr_expect_leq(r.worst_ratio, 1.0, "worst |a-n| / tolerance %.3g at %s", r.worst_ratio, r.where_ratio);
}

/* ---- incremental decoding == full forward ------------------------------------------------------- */

/* Feed the prompt in pieces of `chunk` (the last piece may be shorter), then compare the logits each
 * feed returns with the full forward's row of the same position. Returns the worst |difference|. */
static double decode_vs_forward(m1c_model *m, const float *full, const int32_t *tok, int B, int T, int chunk) {
    m1c_decoder d;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_decoder_init(&d, m, B, T, chunk, &e), M1C_OK, "decoder: %s", e.msg);
    float *out = malloc(sizeof *out * (size_t)B * VOCAB);
    int32_t *ids = malloc(sizeof *ids * (size_t)B * chunk);
    double worst = 0;
    for (int t0 = 0; t0 < T; t0 += chunk) {
        int n = T - t0 < chunk ? T - t0 : chunk;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) ids[b * n + t] = tok[b * (T + 1) + t0 + t];
        cr_assert_eq(m1c_decoder_feed(m, &d, ids, n, out, &e), M1C_OK, "feed: %s", e.msg);
        int p = t0 + n - 1;
        for (int b = 0; b < B; b++)
            for (int v = 0; v < VOCAB; v++) {
                double diff = fabs((double)out[b * VOCAB + v] - full[((int64_t)b * T + p) * VOCAB + v]);
                if (diff > worst) worst = diff;
            }
    }
    cr_assert_eq(d.pos, T);
    free(ids), free(out);
    m1c_decoder_free(&d, m);
    return worst;
}

/* hybrid_moe with another stack: lightning blocks of 4, sequences of T. */
static cfg_opts hybrid_stack(int layers, const char *pattern, int T) {
    cfg_opts o = hybrid_moe;
    o.layers = layers, o.pattern = pattern, o.block_size = 4, o.T = T, o.threads = 2;
    return o;
}

/* open_model, then O(1) weights (scramble). */
static m1c_model *open_scrambled(m1c_session *s, const cfg_opts *o, uint64_t seed, uint64_t scramble_seed) {
    open_model(s, o, seed);
    scramble(&s->model, scramble_seed);
    return &s->model;
}

Test(model, decoding_matches_forward, .timeout = 60) {
    const cfg_opts o = hybrid_stack(3, "\"lin\", \"soft\", \"lin\"", 11); /* T = 11: blocks of 4, 4, 3 */
    const int B = 2, T = 11;
    m1c_session s;
    m1c_model *m = open_scrambled(&s, &o, 3, 5);
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 0, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 9);
    forward(m, &r, tok);
    float *full = malloc(sizeof *full * (size_t)B * T * VOCAB);
    memcpy(full, r.logits, sizeof *full * (size_t)B * T * VOCAB);
    double scale = th_max_abs(full, (int64_t)B * T * VOCAB);
    cr_assert_gt(scale, 0.5, "logits of O(1) expected, max |logit| %g", scale);
    const int chunks[] = {1, 3, T};
    for (int c = 0; c < 3; c++) {
        double worst = decode_vs_forward(m, full, tok, B, T, chunks[c]);
        cr_log_info("decoding in chunks of %d: worst |logit difference| %.3g (max |logit| %.3g)", chunks[c], worst,
                    scale);
        /* The same math summed in another order (recurrent state vs blocks, KV cache vs full scores, other
         * GEMM shapes): float rounding of ~1e-6 relative through 3 layers and the head. */
        cr_expect_leq(worst, 1e-4 * scale, "chunk %d: logits differ by %g", chunks[c], worst);
    }
    free(full), free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

/* A run made for inference leaves the activations a plugin declares backward_only unallocated (the
 * lightning layers': their forward works in scratch when not training), and the forward gives the same
 * logits as in a training run; the softmax and MoE activations stay. */
Test(model, inference_run_skips_backward_only_activations, .timeout = 60) {
    const cfg_opts o = hybrid_stack(2, "\"lin\", \"soft\"", 9);
    const int B = 2, T = 9;
    m1c_session s;
    m1c_model *m = open_scrambled(&s, &o, 4, 6);
    m1c_run tr, inf;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&tr, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_run_init(&inf, m, B, T, 0, &e), M1C_OK, "%s", e.msg);
    size_t lin_bytes = 0;
    for (int i = 0; i < tr.attn[0].na; i++) {
        const m1c_tensor *t = &tr.attn[0].bufs.acts[i], *u = &inf.attn[0].bufs.acts[i];
        cr_assert_not_null(t->data, "a training run allocates every activation");
        cr_assert_null(u->data, "lightning activation %d allocated in an inference run", i);
        cr_assert_eq(m1c_tensor_numel(u), m1c_tensor_numel(t), "its shape is still declared");
        lin_bytes += (size_t)m1c_tensor_numel(t) * m1c_dtype_size(t->dtype);
    }
    for (int i = 0; i < inf.attn[1].na; i++) cr_assert_not_null(inf.attn[1].bufs.acts[i].data, "softmax keeps its own");
    for (int i = 0; i < inf.ffn[0].na; i++) cr_assert_not_null(inf.ffn[0].bufs.acts[i].data, "the MoE keeps its own");
    cr_assert_gt(lin_bytes, 0);
    cr_assert_leq(inf.acts.bytes + lin_bytes, tr.acts.bytes, "the inference run is not smaller by the lightning "
                                                             "activations: %zu + %zu > %zu",
                  (size_t)inf.acts.bytes, lin_bytes, (size_t)tr.acts.bytes);
    cr_assert_eq(m1c_run_set_training(&inf, m, 1), M1C_ERR, "an inference run cannot switch to training");
    int32_t *tok = rand_tokens(B, T, 10);
    cr_assert_eq(m1c_run_set_training(&tr, m, 0), M1C_OK);
    forward(m, &tr, tok);
    forward(m, &inf, tok);
    const int64_t n = (int64_t)B * T * VOCAB;
    /* the same kernels on the same values, in scratch instead of kept buffers: the same bits */
    cr_assert(memcmp(tr.logits, inf.logits, (size_t)n * sizeof(float)) == 0, "logits differ");
    free(tok);
    m1c_run_free(&tr, m);
    m1c_run_free(&inf, m);
    m1c_session_close(&s);
}

/* A prefill in chunks of 3 then tokens one at a time on the same decoder: the state carried across
 * feeds of different lengths. */
Test(model, decoding_prefill_then_steps, .timeout = 60) {
    cfg_opts o = hybrid_moe;
    o.layers = 3;
    o.pattern = "\"soft\", \"lin\", \"lin\"";
    o.block_size = 2;
    o.T = 9;
    const int B = 2, T = 9, P = 5;
    m1c_session s;
    open_model(&s, &o, 4);
    m1c_model *m = &s.model;
    scramble(m, 6);
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 0, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 10);
    forward(m, &r, tok);
    m1c_decoder d;
    cr_assert_eq(m1c_decoder_init(&d, m, B, T, 3, &e), M1C_OK, "%s", e.msg);
    float out[2 * VOCAB];
    int32_t ids[2 * 3];
    double worst = 0, scale = th_max_abs(r.logits, (int64_t)B * T * VOCAB);
    for (int t0 = 0; t0 < T;) {
        int n = t0 < P ? (P - t0 < 3 ? P - t0 : 3) : 1; /* 3, 2, then 1s */
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) ids[b * n + t] = tok[b * (T + 1) + t0 + t];
        cr_assert_eq(m1c_decoder_feed(m, &d, ids, n, out, &e), M1C_OK, "feed: %s", e.msg);
        t0 += n;
        for (int b = 0; b < B; b++)
            for (int v = 0; v < VOCAB; v++)
                worst = fmax(worst, fabs((double)out[b * VOCAB + v] - r.logits[((int64_t)b * T + t0 - 1) * VOCAB + v]));
    }
    /* As in decoding_matches_forward: float rounding in another summation order. */
    cr_expect_leq(worst, 1e-4 * scale, "logits differ by %g (max |logit| %g)", worst, scale);
    /* Past max_len: refused. */
    cr_expect_eq(m1c_decoder_feed(m, &d, ids, 1, out, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "exceeds") != NULL, "message: %s", e.msg);
    /* After a reset the same prompt gives the same first logits (bitwise: same calls, same order). */
    m1c_decoder_reset(&d);
    float again[2 * VOCAB];
    for (int b = 0; b < B; b++) ids[b] = tok[b * (T + 1)];
    cr_assert_eq(m1c_decoder_feed(m, &d, ids, 1, again, &e), M1C_OK, "%s", e.msg);
    for (int b = 0; b < B; b++)
        for (int v = 0; v < VOCAB; v++) cr_expect_leq(fabs((double)again[b * VOCAB + v] - r.logits[(int64_t)b * T * VOCAB + v]), 1e-4 * scale);
    m1c_decoder_free(&d, m);
    free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

/* ---- DeepNorm by hand --------------------------------------------------------------------------- */

/* y = x / sqrt(mean(x^2) + eps) * w, in double. */
static void rmsnorm_d(double *y, const double *x, const float *w, int H, double eps) {
    double ss = 0;
    for (int c = 0; c < H; c++) ss += x[c] * x[c];
    double r = 1.0 / sqrt(ss / H + eps);
    for (int c = 0; c < H; c++) y[c] = x[c] * r * w[c];
}

static const cfg_opts one_soft = {
    .hidden = 8, .layers = 1, .pattern = "\"soft\"", .block_size = 4,
    .lin_alpha = 1.0, .lin_beta = 1.0, .soft_alpha = 2.0, .soft_beta = 0.0, .ffn_alpha = 2.0, .ffn_beta = 0.0,
    .ffn = "plugin = \"topk\"; experts = 3; top_k = 2; ffn_dim = 8;",
    .tied = 0, .norm_eps = 0.05, .T = 4,
};

/* alpha = 2, beta = 0 removes both sublayers: x1 = 2 RMSNorm_in(x0), x2 = 2 RMSNorm_post(x1), then the
 * final norm and the head. norm_eps = 0.05 (not the default) so that a wrong eps would show. */
Test(model, deepnorm_closed_form) {
    const int B = 2, T = 4, H = 8;
    m1c_session s;
    open_model(&s, &one_soft, 1);
    m1c_model *m = &s.model;
    scramble(m, 2);
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 3);
    forward(m, &r, tok);
    const float *E = m->params.t[m->embed].data, *Wh = m->params.t[m->head].data;
    const float *win = m->params.t[m->layer[0].norm_in].data, *wpost = m->params.t[m->layer[0].norm_post].data;
    const float *wf = m->params.t[m->norm].data;
    double x0[8], x1[8], x2[8], hf[8], logit[VOCAB], worst_logit = 0, worst_logp = 0, worst_x = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int id = tok[b * (T + 1) + t], tg = tok[b * (T + 1) + t + 1];
            int64_t row = (int64_t)b * T + t;
            for (int c = 0; c < H; c++) x0[c] = E[(int64_t)id * H + c];
            rmsnorm_d(x1, x0, win, H, 0.05);
            for (int c = 0; c < H; c++) x1[c] *= 2.0;
            rmsnorm_d(x2, x1, wpost, H, 0.05);
            for (int c = 0; c < H; c++) x2[c] *= 2.0;
            rmsnorm_d(hf, x2, wf, H, 0.05);
            double mx = -INFINITY, se = 0;
            for (int v = 0; v < VOCAB; v++) {
                logit[v] = 0;
                for (int c = 0; c < H; c++) logit[v] += hf[c] * Wh[(int64_t)v * H + c];
                mx = fmax(mx, logit[v]);
            }
            for (int v = 0; v < VOCAB; v++) se += exp(logit[v] - mx);
            double logp = logit[tg] - mx - log(se);
            for (int c = 0; c < H; c++) {
                worst_x = fmax(worst_x, fabs(r.x1[0][row * H + c] - x1[c]));
                worst_x = fmax(worst_x, fabs(r.x[1][row * H + c] - x2[c]));
            }
            for (int v = 0; v < VOCAB; v++) worst_logit = fmax(worst_logit, fabs(r.logits[row * VOCAB + v] - logit[v]));
            worst_logp = fmax(worst_logp, fabs(r.logp[row] - logp));
        }
    cr_log_info("deepnorm closed form: worst |dx| %.3g, |dlogit| %.3g, |dlogp| %.3g", worst_x, worst_logit, worst_logp);
    /* Float vs double of a few O(1) dot products of length 8: ~1e-6; 1e-5 absolute leaves room, while a
     * wrong alpha (x 2), a skipped norm or another eps (0.05 vs 1e-5 moves values by ~1e-2) are far above. */
    cr_expect_leq(worst_x, 1e-5);
    cr_expect_leq(worst_logit, 1e-5);
    cr_expect_leq(worst_logp, 2e-5); /* plus the logsumexp over 259 terms */
    free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

/* beta scales the sublayer: with the same parameters (same seed), x1 - alpha h1 = beta f(h1) is linear
 * in beta (h1 does not depend on it), and likewise x2 - alpha_ffn h2 in ffn_beta. */
Test(model, deepnorm_beta_linear) {
    const int B = 2, T = 4, H = 8, N = B * T;
    const double betas[3][2] = {{0.5, 0.5}, {1.0, 0.5}, {0.5, 1.0}}; /* (attention, ffn) */
    float *x1[3], *x2[3], *h1[3], *h2[3];
    int32_t *tok = rand_tokens(B, T, 3);
    for (int k = 0; k < 3; k++) {
        cfg_opts o = one_soft;
        o.soft_alpha = 1.3, o.ffn_alpha = 0.7;
        o.soft_beta = betas[k][0], o.ffn_beta = betas[k][1];
        m1c_session s;
        open_model(&s, &o, 1);
        scramble(&s.model, 2);
        m1c_run r;
        m1c_err e = {{0}};
        cr_assert_eq(m1c_run_init(&r, &s.model, B, T, 1, &e), M1C_OK, "%s", e.msg);
        forward(&s.model, &r, tok);
        size_t bytes = sizeof(float) * (size_t)N * H;
        x1[k] = malloc(bytes), x2[k] = malloc(bytes), h1[k] = malloc(bytes), h2[k] = malloc(bytes);
        memcpy(x1[k], r.x1[0], bytes), memcpy(x2[k], r.x[1], bytes);
        memcpy(h1[k], r.h1[0], bytes), memcpy(h2[k], r.h2[0], bytes);
        m1c_run_free(&r, &s.model);
        m1c_session_close(&s);
    }
    double worst_a = 0, worst_f = 0, fa = 0, ff = 0;
    for (int i = 0; i < N * H; i++) {
        double f05 = (x1[0][i] - 1.3 * h1[0][i]) / 0.5, f10 = (x1[1][i] - 1.3 * h1[1][i]) / 1.0;
        worst_a = fmax(worst_a, fabs(f05 - f10));
        fa = fmax(fa, fabs(f10));
        double g05 = (x2[0][i] - 0.7 * h2[0][i]) / 0.5, g10 = (x2[2][i] - 0.7 * h2[2][i]) / 1.0;
        worst_f = fmax(worst_f, fabs(g05 - g10));
        ff = fmax(ff, fabs(g10));
        cr_assert_eq(h1[0][i], h1[1][i], "h1 does not depend on beta");
        cr_assert_eq(h2[0][i], h2[2][i], "h2 does not depend on ffn_beta");
    }
    /* The sublayer outputs must be non-trivial for the check to mean anything. */
    cr_assert_gt(fa, 1e-2, "attention output %g", fa);
    cr_assert_gt(ff, 1e-2, "ffn output %g", ff);
    /* One float rounding of alpha h + beta f (~1e-7 of |x| ~ 3), amplified by 1/beta = 2: 1e-5. */
    cr_expect_leq(worst_a, 1e-5, "attention: beta not applied linearly (%g)", worst_a);
    cr_expect_leq(worst_f, 1e-5, "ffn: beta not applied linearly (%g)", worst_f);
    for (int k = 0; k < 3; k++) free(x1[k]), free(x2[k]), free(h1[k]), free(h2[k]);
    free(tok);
}

/* ---- determinism -------------------------------------------------------------------------------- */

/* m1c_model_zero_grads hands topk's expert gradients over unset (m1c_buf_spec.grad_written, ABI 1.3) and
 * zeroes the rest: the backward then gives the same bits as from gradients all zeroed, though the unset
 * ones held NaN before; and the next backward, without the marks, adds (the same bits as a second backward
 * after m1c_arena_zero's). */
Test(model, unset_gradients_are_written_whole) {
    const int B = 2, T = 7, N = B * T;
    m1c_session s;
    open_model(&s, &hybrid_moe, 5);
    m1c_model *m = &s.model;
    scramble(m, 8);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_alloc_grads(m, &e), M1C_OK, "%s", e.msg);
    m1c_run r;
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 4);
    float w[14];
    for (int i = 0; i < N; i++) w[i] = 1.0f - 0.1f * (float)i;
    /* declared by topk (its experts), lightning and softmax (their projections), and the core's untied head */
    static const char *const products[] = {"experts.gate_up_proj", "experts.down_proj", "qkv_proj.weight",
                                           "output_gate.weight", "out_proj.weight", "q_proj.weight", "k_proj.weight",
                                           "v_proj.weight", "o_proj.weight", "lm_head.weight"};
    int written = 0;
    for (int i = 0; i < m->params.n; i++) {
        int want = 0;
        for (size_t k = 0; k < sizeof products / sizeof products[0]; k++) want |= strstr(m->params.t[i].name, products[k]) != NULL;
        cr_expect_eq(m->grad_written[i], want, "%s: grad_written %d", m->params.t[i].name, m->grad_written[i]);
        written += m->grad_written[i];
    }
    cr_assert_gt(written, 2 * m->L, "experts, projections and the head are grad_written");
    const size_t bytes = m->grads.bytes;
    void *want = malloc(bytes), *twice = malloc(bytes);
    cr_assert(want && twice);
    loss(m, &r, tok, w);
    m1c_arena_zero(&m->grads);
    for (int i = 0; i < N; i++) r.dlogp[i] = -w[i];
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "%s", e.msg);
    memcpy(want, m->grads.base, bytes);
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "%s", e.msg); /* adds: twice the gradient */
    memcpy(twice, m->grads.base, bytes);

    loss(m, &r, tok, w); /* a fresh forward: the CPU head's backward leaves its dlogits in the logits */
    for (int i = 0; i < N; i++) r.dlogp[i] = -w[i];
    memset(m->grads.base, 0xFF, bytes); /* NaN everywhere: the unset ones must be written whole */
    m1c_model_zero_grads(m, NULL);
    for (int i = 0; i < m->params.n; i++)
        cr_expect_eq((m->grads.t[i].flags & M1C_TENSOR_UNSET) != 0, m->grad_written[i] != 0, "%s: mark",
                     m->grads.t[i].name);
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "%s", e.msg);
    for (int i = 0; i < m->params.n; i++) { /* tensor by tensor: the padding between them is nobody's */
        const m1c_tensor *t = &m->grads.t[i];
        cr_expect(memcmp((char *)want + m->grads.offset[i], t->data, (size_t)m1c_numel(t) * 4) == 0,
                  "%s differs from its value after m1c_arena_zero", t->name);
        cr_expect_eq(t->flags, 0u, "%s: mark left", t->name);
    }
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "%s", e.msg);
    for (int i = 0; i < m->params.n; i++) {
        const m1c_tensor *t = &m->grads.t[i];
        cr_expect(memcmp((char *)twice + m->grads.offset[i], t->data, (size_t)m1c_numel(t) * 4) == 0,
                  "%s: the second backward did not add as after m1c_arena_zero", t->name);
    }
    free(want), free(twice), free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

Test(model, deterministic_forward_and_init) {
    const int B = 2, T = 7;
    cfg_opts o = hybrid_moe;
    o.threads = 2; /* the OpenMP paths too */
    m1c_session s;
    open_model(&s, &o, 5);
    m1c_model *m = &s.model;
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 4);
    float lp[14];
    scramble(m, 8);
    forward(m, &r, tok);
    memcpy(lp, r.logp, sizeof lp);
    forward(m, &r, tok);
    cr_expect(memcmp(lp, r.logp, sizeof lp) == 0, "two forwards of one batch differ");

    /* init_params: the same seed gives the same bytes, another seed other NORMAL tensors. */
    size_t bytes = m->params.bytes;
    void *a = malloc(bytes);
    m1c_model_init_params(m, 42);
    memcpy(a, m->params.base, bytes);
    scramble(m, 9);
    m1c_model_init_params(m, 42);
    cr_expect(memcmp(a, m->params.base, bytes) == 0, "init with one seed twice differs");
    m1c_model_init_params(m, 43);
    for (int i = 0; i < m->params.n; i++) {
        const m1c_tensor *t = &m->params.t[i];
        size_t nb = (size_t)m1c_numel(t) * sizeof(float);
        int same = memcmp((char *)a + m->params.offset[i], t->data, nb) == 0;
        if (m->init[i] == M1C_INIT_NORMAL)
            cr_expect(!same, "%s: seeds 42 and 43 give the same values", t->name);
        else
            cr_expect(same, "%s: a constant initialisation depends on the seed", t->name);
    }
    /* And the session's own seed: a model built with seed 5 equals init_params(5). */
    m1c_model_init_params(m, 5);
    memcpy(a, m->params.base, bytes);
    m1c_session s2;
    open_model(&s2, &o, 5);
    cr_assert_eq(s2.model.params.bytes, bytes);
    cr_expect(memcmp(a, s2.model.params.base, bytes) == 0, "build_model(seed 5) != init_params(5)");
    m1c_session_close(&s2);
    free(a), free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

/* ---- errors ------------------------------------------------------------------------------------- */

Test(model, token_out_of_vocabulary) {
    const int B = 2, T = 4;
    cfg_opts o = one_soft;
    m1c_session s;
    open_model(&s, &o, 1);
    m1c_model *m = &s.model;
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    int32_t *tok = rand_tokens(B, T, 3);
    tok[T + 1 + 2] = VOCAB + 17; /* an input of row 1 */
    cr_expect_eq(m1c_model_forward(m, &r, tok, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "276") != NULL, "message names the id: %s", e.msg);
    tok[T + 1 + 2] = 5;
    tok[T] = VOCAB; /* the last target of row 0 */
    memset(e.msg, 0, sizeof e.msg);
    cr_expect_eq(m1c_model_forward(m, &r, tok, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "259") != NULL, "message names the id: %s", e.msg);
    tok[T] = -3; /* a negative input id too */
    tok[0] = -3;
    cr_expect_eq(m1c_model_forward(m, &r, tok, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "-3") != NULL, "message names the id: %s", e.msg);
    tok[0] = 1, tok[T] = 2;
    forward(m, &r, tok); /* and a valid batch still runs */

    m1c_decoder d;
    cr_assert_eq(m1c_decoder_init(&d, m, 1, 4, 2, &e), M1C_OK, "%s", e.msg);
    int32_t ids[2] = {3, 300};
    float out[VOCAB];
    cr_expect_eq(m1c_decoder_feed(m, &d, ids, 2, out, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "300") != NULL, "message names the id: %s", e.msg);
    m1c_decoder_free(&d, m);
    free(tok);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
}

/* A plugin's in_proj (ABI 1.4) declared on a parameter of the wrong shape, on two parameters, or with more
 * rows than M1C_IN_PROJ_MAX: the build refuses it in one line naming the plugin, the parameter and the
 * rule (tests/plugins/bad_in_proj.c). */
Test(model, bad_in_proj_refused) {
    static const char *const want[] = {"in_proj needs a (P, hidden) matrix", "in_proj is declared by a second",
                                       "in_proj needs a (P, hidden) matrix"};
    static const char *const param[] = {"mlp.gate.weight", "mlp.other.weight", "mlp.gate.weight"};
    for (int bad = 1; bad <= 3; bad++) {
        char ffn[256];
        snprintf(ffn, sizeof ffn, "plugin = \"%s/bad_in_proj.so\"; bad = %d;", M1C_TEST_BAD_PLUGIN_DIR, bad);
        cfg_opts o = hybrid_moe;
        o.ffn = ffn;
        setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
        char *text = cfg_text(&o);
        m1c_session s;
        m1c_err e = {{0}};
        cr_assert_eq(m1c_session_open_text(&s, text, "test_model.cfg", M1C_SOURCE_DIR "/tests/data/model", NULL, 0, &e),
                     M1C_OK, "open: %s", e.msg);
        free(text);
        cr_expect_eq(m1c_session_build_model(&s, 1, &e), M1C_ERR, "bad = %d: built", bad);
        cr_expect(strstr(e.msg, "bad_in_proj") && strstr(e.msg, param[bad - 1]) && strstr(e.msg, want[bad - 1]),
                  "bad = %d: %s", bad, e.msg);
        m1c_session_close(&s);
    }
}
