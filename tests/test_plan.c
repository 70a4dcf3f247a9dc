/* `m1c plan` arithmetic: m1c_plan_compute on tests/data/model/plan.cfg and configs/minimax-m1.cfg against
 * parameter, FLOP and memory formulas written out by hand from MODEL.md and docs/plan.md, M1's published
 * sizes, and `m1c plan --json` against m1c_plan_compute. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "harness.h"
#include "../core/model.h"
#include "../core/plan.h"
#include "../core/session.h"

#define CFG M1C_SOURCE_DIR "/tests/data/model/plan.cfg"

/* plan.cfg's sizes. */
enum {
    V = 259, H = 16, L = 3,
    LIN_NH = 2, LIN_HD = 8, LIN_BS = 64,  /* two lightning layers (0 and 2) */
    SM_NH = 4, SM_KVH = 2, SM_HD = 4,     /* one softmax layer */
    E = 4, K = 2, F = 32,                 /* topk */
    BATCH = 3, SEQ = 40,
};

/* Per-layer parameter counts from MODEL.md. */
static const int64_t lin_params = 3 * LIN_NH * LIN_HD * H /* qkv_proj */ + LIN_NH * LIN_HD * H /* output_gate */ +
                                  LIN_NH * LIN_HD /* norm */ + H * LIN_NH * LIN_HD /* out_proj */;
static const int64_t sm_params = SM_NH * SM_HD * H /* q */ + 2 * SM_KVH * SM_HD * H /* k, v */ +
                                 H * SM_NH * SM_HD /* o */;
static const int64_t moe_total = E * H /* router */ + E * (2 * F * H + H * F) /* gate_up, down */;
static const int64_t moe_active = E * H + K * 3 * F * H; /* the router sees every expert; k experts run */
static const int64_t norms = 2 * H;                      /* input and post-attention RMSNorm */

static void open_session(m1c_session *s, const char *const *ov, int n) {
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_session_open(s, CFG, ov, n, &e), M1C_OK, "%s", e.msg);
}

/* Forward FLOPs per token by hand (2 per multiply-add), as each plugin documents what it counts. */
static double lin_flops(int64_t ctx) {
    /* projections qkv, gate, out: 2*H*(3D + D + D); per head intra-block Q K^T and S V over the block
     * (the block is min(ctx, block_size)) and Q KV plus the state update (4 hd^2). */
    double D = LIN_NH * LIN_HD, blk = ctx < LIN_BS ? (double)ctx : LIN_BS;
    return 2.0 * H * 5.0 * D + LIN_NH * (4.0 * blk * LIN_HD + 4.0 * LIN_HD * LIN_HD);
}
static double sm_flops(int64_t ctx) {
    /* q, k, v, o projections (2 * their parameters), then q.k and p.v over ctx keys for every query head. */
    return 2.0 * (double)sm_params + 4.0 * SM_NH * SM_HD * (double)ctx;
}
/* topk counts 2 flops per active matmul parameter (router over all E, gate/up/down of k experts) plus,
 * per chosen expert, 4F for SwiGLU (silu and the product) and 2H for the weighted combine. */
static const double moe_flops = 2.0 * moe_active + K * (4.0 * F + 2.0 * H);

static void check_plan(const m1c_plan *p, int tied, int64_t ctx) {
    cr_expect_eq(p->context, ctx);
    cr_expect_eq(p->batch, BATCH);
    cr_expect_eq(p->seq_len, SEQ);
    cr_assert_eq(p->n_types, 2);
    const m1c_plan_type *lin = &p->types[0], *sm = &p->types[1];
    cr_assert_str_eq(lin->name, "lin");
    cr_assert_str_eq(sm->name, "soft");
    cr_expect_str_eq(lin->attention_plugin, "lightning");
    cr_expect_str_eq(sm->attention_plugin, "softmax");
    cr_expect_str_eq(p->ffn_plugin, "topk");
    cr_expect_eq(lin->layers, 2);
    cr_expect_eq(sm->layers, 1);
    cr_expect_eq(lin->attn_params, lin_params, "lightning: %lld, by hand %lld", (long long)lin->attn_params,
                 (long long)lin_params);
    cr_expect_eq(sm->attn_params, sm_params, "softmax: %lld, by hand %lld", (long long)sm->attn_params,
                 (long long)sm_params);
    cr_expect_eq(lin->norm_params, norms);
    cr_expect_eq(sm->norm_params, norms);
    cr_expect_eq(p->ffn_params, moe_total, "moe total %lld, by hand %lld", (long long)p->ffn_params,
                 (long long)moe_total);
    cr_expect_eq(p->ffn_active, moe_active, "moe active %lld, by hand %lld", (long long)p->ffn_active,
                 (long long)moe_active);
    cr_expect_eq(p->embed_params, (int64_t)V * H);
    cr_expect_eq(p->head_params, tied ? 0 : (int64_t)V * H);
    cr_expect_eq(p->final_norm_params, H);

    int64_t nonembed = 2 * (lin_params + norms + moe_total) + (sm_params + norms + moe_total) + H;
    int64_t active_nonembed = 2 * (lin_params + norms + moe_active) + (sm_params + norms + moe_active) + H;
    int64_t emb = (int64_t)V * H * (tied ? 1 : 2);
    cr_expect_eq(p->total_nonembed, nonembed, "%lld vs %lld", (long long)p->total_nonembed, (long long)nonembed);
    cr_expect_eq(p->active_nonembed, active_nonembed, "%lld vs %lld", (long long)p->active_nonembed,
                 (long long)active_nonembed);
    cr_expect_eq(p->total_params, nonembed + emb, "%lld vs %lld", (long long)p->total_params,
                 (long long)(nonembed + emb));
    cr_expect_eq(p->active_params, active_nonembed + emb);

    /* FLOPs: every term is an exact small integer in double, so equality is exact. */
    cr_expect_eq(p->ffn_flops, moe_flops, "ffn flops %.17g, by hand %.17g", p->ffn_flops, moe_flops);
    cr_expect_eq(lin->attn_flops, lin_flops(ctx), "lightning flops %.17g vs %.17g", lin->attn_flops, lin_flops(ctx));
    cr_expect_eq(sm->attn_flops, sm_flops(ctx), "softmax flops %.17g vs %.17g", sm->attn_flops, sm_flops(ctx));
    double fwd = 2.0 * (lin_flops(ctx) + moe_flops) + (sm_flops(ctx) + moe_flops) + 2.0 * H * V /* LM head */;
    cr_expect_eq(p->flops_forward, fwd, "forward %.17g, by hand %.17g", p->flops_forward, fwd);
    cr_expect_eq(p->flops_train, 3.0 * p->flops_forward, "backward = 2 x forward");

    /* Memory (defaults: one device, fp32): f32 parameters and gradients, AdamW's two moments per
     * parameter, no master copy. */
    cr_expect_eq(p->tp * p->pp * p->ep * p->dp * p->gpus, 1);
    cr_expect_eq(p->mem_params, 4.0 * (double)(nonembed + emb));
    cr_expect_eq(p->mem_grads, p->mem_params);
    cr_expect_eq(p->mem_master, 0.0);
    cr_expect_eq(p->optimizer_states, 2);
    cr_expect_eq(p->mem_optimizer, 2.0 * p->mem_params);
    cr_expect_gt(p->mem_activations, 4.0 * BATCH * SEQ * V, "activations hold at least the logits");
    cr_expect_eq(p->mem_total, p->mem_params + p->mem_grads + p->mem_master + p->mem_optimizer + p->mem_activations);
}

Test(plan, counts_untied) {
    m1c_session s;
    open_session(&s, NULL, 0);
    m1c_plan p;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_plan_compute(&s, 0, &p, &e), M1C_OK, "%s", e.msg);
    check_plan(&p, 0, SEQ); /* context 0: the first stage's seq_len */
    m1c_plan_free(&p);
    m1c_session_close(&s);
}

Test(plan, counts_tied_long_context) {
    const char *ov[] = {"model.tie_embeddings=true"};
    m1c_session s;
    open_session(&s, ov, 1);
    m1c_plan p;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_plan_compute(&s, 1000, &p, &e), M1C_OK, "%s", e.msg);
    check_plan(&p, 1, 1000); /* past the lightning block: its per-token cost stops growing */
    m1c_plan_free(&p);
    m1c_session_close(&s);
}

/* The plan's parameter count is the built model's: every tensor the model allocates is counted once. */
Test(plan, matches_built_model) {
    for (int tied = 0; tied < 2; tied++) {
        const char *ov[] = {tied ? "model.tie_embeddings=true" : "model.tie_embeddings=false"};
        m1c_session s;
        open_session(&s, ov, 1);
        m1c_plan p;
        m1c_err e = {{0}};
        cr_assert_eq(m1c_plan_compute(&s, 0, &p, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(m1c_session_build_model(&s, 1, &e), M1C_OK, "%s", e.msg);
        cr_expect_eq(m1c_model_param_count(&s.model), p.total_params, "tied %d: model %lld, plan %lld", tied,
                     (long long)m1c_model_param_count(&s.model), (long long)p.total_params);
        /* The parameter arena pads each tensor to 64 bytes: at most 63 bytes more per tensor. */
        cr_expect(s.model.params.bytes >= p.mem_params &&
                      s.model.params.bytes <= p.mem_params + 63.0 * s.model.params.n,
                  "arena %zu bytes, plan %.0f", s.model.params.bytes, p.mem_params);
        /* Activations: the plan adds the plugins' scratch to what the run's arena holds (the core's
         * tensors and every plugin's declared activations, padded as above). */
        m1c_run r;
        cr_assert_eq(m1c_run_init(&r, &s.model, BATCH, SEQ, 1, &e), M1C_OK, "%s", e.msg);
        cr_expect(p.mem_activations >= (double)r.acts.bytes - 63.0 * r.acts.n, "plan %.0f, run arena %zu",
                  p.mem_activations, r.acts.bytes);
        m1c_run_free(&r, &s.model);
        m1c_plan_free(&p);
        m1c_session_close(&s);
    }
}

/* ---- the command -------------------------------------------------------------------------------- */

/* The number after "key": at its n-th occurrence (n from 0) in JSON text; asserts it is there. */
static double json_num(const char *text, const char *key, int n) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *s = text;
    for (int i = 0; i <= n; i++) {
        s = strstr(s, pat);
        cr_assert_not_null(s, "key %s (occurrence %d) not in the output:\n%s", key, n, text);
        s += strlen(pat);
    }
    double v;
    cr_assert_eq(sscanf(s, " %lf", &v), 1, "key %s: no number", key);
    return v;
}

/* Run `m1c plan --json ARGS CONFIG`; its stdout and stderr, and (if secs) its wall time. */
static char *run_json(const char *config, const char *args, double *secs) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH='%s' '%s/m1c' plan --json %s '%s' 2>&1", M1C_TEST_PLUGIN_DIR,
             M1C_BINARY_DIR, args, config);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int st;
    char *buf = th_shell(cmd, &st);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (secs) *secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    cr_assert_eq(st, 0, "%s exited with %d:\n%s", cmd, st, buf);
    return buf;
}

static char *run_plan_json(const char *args) { return run_json(CFG, args, NULL); }

static void check_json(const char *js, const m1c_plan *p) {
    /* Integers print exactly; reals print with 17 significant digits (jansson's default), which
     * round-trips a double: equality is exact. */
    cr_expect_eq(json_num(js, "context", 0), (double)p->context);
    /* MiniMax's convention: the total counts everything, the active count leaves out embedding and head. */
    cr_expect_eq(json_num(js, "total_params", 0), (double)p->total_params, "JSON total_params is with embeddings");
    cr_expect_eq(json_num(js, "active_params", 0), (double)p->active_nonembed, "JSON active_params is without");
    cr_expect_eq(json_num(js, "total_params_without_embeddings", 0), (double)p->total_nonembed);
    cr_expect_eq(json_num(js, "active_params_with_embeddings", 0), (double)p->active_params);
    cr_expect_eq(json_num(js, "embedding_params", 0), (double)p->embed_params);
    cr_expect_eq(json_num(js, "lm_head_params", 0), (double)p->head_params);
    cr_expect_eq(json_num(js, "final_norm_params", 0), (double)p->final_norm_params);
    for (int t = 0; t < p->n_types; t++) {
        cr_expect_eq(json_num(js, "layers", t), (double)p->types[t].layers);
        cr_expect_eq(json_num(js, "attention_params_per_layer", t), (double)p->types[t].attn_params);
        cr_expect_eq(json_num(js, "norm_params_per_layer", t), (double)p->types[t].norm_params);
        cr_expect_eq(json_num(js, "attention_flops_per_token_per_layer", t), p->types[t].attn_flops);
    }
    cr_expect_eq(json_num(js, "params_per_layer", 0), (double)p->ffn_params);
    cr_expect_eq(json_num(js, "active_params_per_layer", 0), (double)p->ffn_active);
    cr_expect_eq(json_num(js, "flops_per_token_per_layer", 0), p->ffn_flops);
    cr_expect_eq(json_num(js, "flops_per_token_forward", 0), p->flops_forward);
    cr_expect_eq(json_num(js, "flops_per_token_train", 0), p->flops_train);
    /* FLOPs against context: every array element (exact, as above). */
    json_error_t jerr;
    json_t *root = json_loads(js, 0, &jerr);
    cr_assert_not_null(root, "not JSON: %s", jerr.text);
    json_t *fc = json_object_get(root, "flops_vs_context");
    cr_assert_not_null(fc, "no flops_vs_context");
    cr_expect_str_eq(json_string_value(json_object_get(fc, "baseline_type")), p->baseline_type);
    static const char *const cols[] = {"contexts", "hybrid", "all_softmax", "ratio", "hybrid_prefill_mean",
                                       "all_softmax_prefill_mean", "ratio_prefill_mean"};
    for (int k = 0; k < 7; k++) {
        json_t *a = json_object_get(fc, cols[k]);
        cr_assert_eq(json_array_size(a), (size_t)p->n_ctx, "%s: %zu entries, %d contexts", cols[k], json_array_size(a),
                     p->n_ctx);
        for (int c = 0; c < p->n_ctx; c++) {
            const m1c_plan_ctx *x = &p->ctx[c];
            double want[] = {(double)x->ctx, x->hybrid, x->all_baseline, x->all_baseline / x->hybrid, x->hybrid_avg,
                             x->baseline_avg, x->baseline_avg / x->hybrid_avg};
            cr_expect_eq(json_number_value(json_array_get(a, (size_t)c)), want[k], "%s[%d]", cols[k], c);
        }
    }
    json_decref(root);
    cr_expect_eq(json_num(js, "tp", 0), (double)p->tp);
    cr_expect_eq(json_num(js, "pp", 0), (double)p->pp);
    cr_expect_eq(json_num(js, "ep", 0), (double)p->ep);
    cr_expect_eq(json_num(js, "dp", 0), (double)p->dp);
    cr_expect_eq(json_num(js, "zero", 0), (double)p->zero);
    cr_expect_eq(json_num(js, "gpus", 0), (double)p->gpus);
    cr_expect_eq(json_num(js, "param_bytes", 0), (double)p->param_bytes);
    cr_expect_eq(json_num(js, "act_bytes", 0), (double)p->act_bytes);
    cr_expect_eq(json_num(js, "micro_batch", 0), (double)p->batch);
    cr_expect_eq(json_num(js, "seq_len", 0), (double)p->seq_len);
    cr_expect_eq(json_num(js, "stage", 0), (double)p->worst_stage);
    cr_expect_eq(json_num(js, "parameters", 0), p->mem_params);
    cr_expect_eq(json_num(js, "gradients", 0), p->mem_grads);
    cr_expect_eq(json_num(js, "master_weights", 0), p->mem_master);
    cr_expect_eq(json_num(js, "optimizer", 0), p->mem_optimizer);
    cr_expect_eq(json_num(js, "activations", 0), p->mem_activations);
    cr_expect_eq(json_num(js, "total", 0), p->mem_total);
    /* Each stage's entry (occurrence s + 1 of the keys the summary also has). */
    for (int st = 0; st < p->pp; st++) {
        cr_expect_eq(json_num(js, "first_layer", st), (double)p->stages[st].first_layer);
        cr_expect_eq(json_num(js, "weights", st), p->stages[st].params);
        cr_expect_eq(json_num(js, "total", st + 1), p->stages[st].mem_total);
    }
}

Test(plan, json_command_matches_compute, .timeout = 60) {
    m1c_session s;
    m1c_plan p;
    m1c_err e = {{0}};
    open_session(&s, NULL, 0);
    cr_assert_eq(m1c_plan_compute(&s, 0, &p, &e), M1C_OK, "%s", e.msg);
    char *js = run_plan_json("");
    check_json(js, &p);
    free(js);
    m1c_plan_free(&p);
    m1c_session_close(&s);

    const char *ov[] = {"model.tie_embeddings=true"};
    open_session(&s, ov, 1);
    cr_assert_eq(m1c_plan_compute(&s, 777, &p, &e), M1C_OK, "%s", e.msg);
    js = run_plan_json("-s model.tie_embeddings=true --context 777");
    check_json(js, &p);
    cr_expect_eq(json_num(js, "lm_head_params", 0), 0.0);
    free(js);
    m1c_plan_free(&p);
    m1c_session_close(&s);
}

/* The layout options reach m1c_plan_compute_opts unchanged (pp 3 over 3 layers: a stage per layer). */
Test(plan, json_command_layout_options, .timeout = 60) {
    m1c_session s;
    m1c_plan p;
    m1c_err e = {{0}};
    open_session(&s, NULL, 0);
    const int64_t ctxs[] = {5, 64, 300};
    m1c_plan_opts o = {.contexts = ctxs, .n_contexts = 3, .baseline_type = "lin", .tp = 2, .pp = 3, .ep = 2,
                       .dp = 4, .zero = 1, .precision = M1C_PREC_BF16_MIXED, .grad_bytes = 4, .micro_batch = 2,
                       .seq_len = 17};
    cr_assert_eq(m1c_plan_compute_opts(&s, &o, &p, &e), M1C_OK, "%s", e.msg);
    char *js = run_plan_json("--contexts 5,64,300 --baseline-type lin --tp 2 --pp 3 --ep 2 --dp 4 --zero 1 "
                             "--precision bf16-mixed --grad-bytes 4 --micro-batch 2 --seq-len 17");
    check_json(js, &p);
    cr_expect_eq(p.gpus, 2 * 3 * 4);
    cr_expect_eq(p.grad_bytes, 4);
    cr_expect_eq(p.param_bytes, 2);
    free(js);
    m1c_plan_free(&p);
    m1c_session_close(&s);
}

/* Bad option values are refused with a one-line message naming the option. */
Test(plan, bad_options, .timeout = 60) {
    static const char *const cases[][2] = {
        {"--tp 0", "--tp"},          {"--contexts 8,x", "--contexts"}, {"--zero 2", "--zero"},
        {"--precision fp8", "--precision"}, {"--ep 3 --dp 3", "--ep 3 must divide the 4 experts"},
        {"--ep 2 --dp 3", "--ep 2 must divide --dp 3"}, {"--pp 4", "--pp 4"},
        {"--baseline-type nope", "no layer type 'nope'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH='%s' '%s/m1c' plan %s '%s' 2>&1", M1C_TEST_PLUGIN_DIR,
                 M1C_BINARY_DIR, cases[i][0], CFG);
        FILE *f = popen(cmd, "r");
        cr_assert_not_null(f);
        char buf[4096];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        int st = pclose(f);
        cr_expect_neq(st, 0, "%s: accepted", cases[i][0]);
        cr_expect_not_null(strstr(buf, cases[i][1]), "%s: message does not name '%s':\n%s", cases[i][0], cases[i][1],
                           buf);
    }
}

/* ---- MiniMax-M1 at full size ------------------------------------------------------------------- */

#define M1_CFG M1C_SOURCE_DIR "/configs/minimax-m1.cfg"

/* M1's sizes (MODEL.md "Sizes to reproduce"), as 64-bit integers: products pass 2^31. */
static const int64_t M1_H = 6144, M1_L = 80, M1_V = 200064, M1_NH = 64, M1_HD = 128, M1_KVH = 8, M1_E = 32,
                     M1_K = 2, M1_F = 9216, M1_BS = 256, M1_SOFT = 10; /* softmax at l % 8 == 7: 10 of 80 */

/* Per layer, from MODEL.md: lightning qkv (3D x H), output gate (D x H), norm (D), out (H x D) with
 * D = 64 x 128 = 8192; softmax q and o (D x H each), k and v (8 x 128 x H each); the MoE router (E x H)
 * and E experts of gate, up and down (3 F H); two RMSNorms (H each). */
#define M1_D (M1_NH * M1_HD)
#define M1_LIN (5 * M1_D * M1_H + M1_D)
#define M1_SM (2 * M1_D * M1_H + 2 * M1_KVH * M1_HD * M1_H)
#define M1_MOE_TOTAL (M1_E * M1_H + M1_E * 3 * M1_F * M1_H)
#define M1_MOE_ACTIVE (M1_E * M1_H + M1_K * 3 * M1_F * M1_H)

static void open_m1(m1c_session *s) {
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_session_open(s, M1_CFG, NULL, 0, &e), M1C_OK, "%s", e.msg);
}

static void plan_m1(m1c_plan *p, const m1c_plan_opts *o) {
    m1c_session s;
    open_m1(&s);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_plan_compute_opts(&s, o, p, &e), M1C_OK, "%s", e.msg);
    m1c_session_close(&s); /* the plan's names point into the spec: compare numbers only after this */
}

static double rel(double x, double ref) { return fabs(x - ref) / fabs(ref); }

Test(plan, m1_published_sizes) {
    m1c_plan p;
    plan_m1(&p, NULL);
    const int64_t lin = M1_L - M1_SOFT;
    const int64_t nonembed = lin * M1_LIN + M1_SOFT * M1_SM + M1_L * (M1_MOE_TOTAL + 2 * M1_H) + M1_H;
    const int64_t active = lin * M1_LIN + M1_SOFT * M1_SM + M1_L * (M1_MOE_ACTIVE + 2 * M1_H) + M1_H;
    const int64_t emb = 2 * M1_V * M1_H; /* untied embedding and LM head */
    cr_expect_eq(p.total_nonembed, nonembed, "plan %lld, by hand %lld", (long long)p.total_nonembed, (long long)nonembed);
    cr_expect_eq(p.active_nonembed, active, "plan %lld, by hand %lld", (long long)p.active_nonembed, (long long)active);
    cr_expect_eq(p.total_params, nonembed + emb);
    cr_expect_eq(p.active_params, active + emb);
    /* The published figures are 456B and 45.9B (three significant digits); the issue asks for 0.5%.
     * The total matches WITH the embedding and LM head (456.09B; without: 453.63B, 0.52% off) and the
     * active count WITHOUT them (45.94B; MODEL.md: "with them, about 48.4B"). */
    cr_expect_lt(rel((double)p.total_params, 456e9), 0.005, "total %lld vs 456B", (long long)p.total_params);
    cr_expect_lt(rel((double)p.active_nonembed, 45.9e9), 0.005, "active %lld vs 45.9B", (long long)p.active_nonembed);
    cr_expect_lt(rel((double)p.active_params, 48.4e9), 0.005, "active with embeddings %lld vs 48.4B",
                 (long long)p.active_params);
    cr_expect_lt(rel((double)p.total_params, 456e9), rel((double)p.total_nonembed, 456e9),
                 "456B counts the embedding and head: with them is the closer count");
    cr_expect_gt(rel((double)p.active_params, 45.9e9), 0.05, "45.9B does not count the embedding and head");
    cr_expect_eq(p.n_experts, M1_E);
    cr_expect_eq(p.ffn_expert_params, M1_E * 3 * M1_F * M1_H);
    cr_expect_eq(p.types[0].layers, (int)lin);
    cr_expect_eq(p.types[1].layers, (int)M1_SOFT);
    m1c_plan_free(&p);
}

/* Forward FLOPs per token by hand for M1, as the plugins document them (2 per multiply-add). */
static double m1_lin_flops(int64_t ctx) {
    double blk = ctx < M1_BS ? (double)ctx : (double)M1_BS;
    return 2.0 * M1_H * 5.0 * M1_D + M1_NH * (4.0 * blk * M1_HD + 4.0 * M1_HD * M1_HD);
}
static double m1_sm_flops(int64_t ctx) { return 2.0 * (double)M1_SM + 4.0 * M1_D * (double)ctx; }
/* Means over positions 1..T in closed form: the softmax cost is linear in position (mean at (T+1)/2);
 * lightning's grows with min(t, block) (sum of min(t, B) = B(B+1)/2 + (T-B) B past the block). */
static double m1_lin_mean(int64_t T) {
    double S = T <= M1_BS ? 0.5 * (double)T * (T + 1) : 0.5 * M1_BS * (M1_BS + 1) + (double)(T - M1_BS) * M1_BS;
    return 2.0 * M1_H * 5.0 * M1_D + M1_NH * (4.0 * M1_HD * S / (double)T + 4.0 * M1_HD * M1_HD);
}
static double m1_sm_mean(int64_t T) { return 2.0 * (double)M1_SM + 4.0 * M1_D * 0.5 * (double)(T + 1); }
static const double m1_fixed = M1_L * (2.0 * M1_H * M1_E + M1_K * (6.0 * M1_H * M1_F + 4.0 * M1_F + 2.0 * M1_H)) +
                               2.0 * M1_H * M1_V; /* every layer's MoE, and the LM head */

Test(plan, m1_flops_against_context) {
    m1c_session s;
    m1c_plan p;
    m1c_err e = {{0}};
    open_m1(&s);
    cr_assert_eq(m1c_plan_compute_opts(&s, NULL, &p, &e), M1C_OK, "%s", e.msg); /* contexts 1K, 8K, 64K, 128K, 1M */
    cr_expect_str_eq(p.baseline_plugin, "softmax", "the default baseline is the type whose cost grows with context");
    /* The config's layout: softmax exactly at l % 8 == 7, DeepNorm alpha (2 L)^(1/4) everywhere (the
     * config writes it to 17 digits: equal to the double pow() gives, within one rounding). */
    const m1c_model_spec *ms = &s.spec.model;
    for (int l = 0; l < ms->n_layers; l++)
        cr_expect_str_eq(ms->types[ms->layer_type[l]].attention.plugin, l % 8 == 7 ? "softmax" : "lightning", "layer %d",
                         l);
    const double alpha = pow(2.0 * M1_L, 0.25);
    for (int t = 0; t < ms->n_types; t++) cr_expect_lt(rel(ms->types[t].alpha, alpha), 1e-15);
    cr_expect_lt(rel(ms->ffn_alpha, alpha), 1e-15);
    m1c_session_close(&s); /* the names point into the session; numbers only below */
    cr_assert_eq(p.n_ctx, 5);
    const int64_t want_ctx[] = {1024, 8192, 65536, 131072, 1048576};
    const int64_t lin = M1_L - M1_SOFT;
    for (int c = 0; c < 5; c++) {
        const m1c_plan_ctx *x = &p.ctx[c];
        const int64_t T = want_ctx[c];
        cr_assert_eq(x->ctx, T);
        /* At one position every term is an integer below 2^53: exact in any order. */
        double hyb = m1_fixed + lin * m1_lin_flops(T) + M1_SOFT * m1_sm_flops(T);
        double all = m1_fixed + M1_L * m1_sm_flops(T);
        cr_expect_eq(x->hybrid, hyb, "ctx %lld: hybrid %.17g, by hand %.17g", (long long)T, x->hybrid, hyb);
        cr_expect_eq(x->all_baseline, all, "ctx %lld: all-softmax %.17g, by hand %.17g", (long long)T,
                     x->all_baseline, all);
        /* Prefill means: the plan sums about 3000 terms (exactly for the first 1024 positions, by linear
         * runs after), so rounding leaves ~1e-13 relative; 1e-11 allows that with room. */
        double hyb_m = m1_fixed + lin * m1_lin_mean(T) + M1_SOFT * m1_sm_mean(T);
        double all_m = m1_fixed + M1_L * m1_sm_mean(T);
        cr_expect_lt(rel(x->hybrid_avg, hyb_m), 1e-11, "ctx %lld: mean %.17g, by hand %.17g", (long long)T,
                     x->hybrid_avg, hyb_m);
        cr_expect_lt(rel(x->baseline_avg, all_m), 1e-11, "ctx %lld: mean %.17g, by hand %.17g", (long long)T,
                     x->baseline_avg, all_m);
    }
    /* The report's point: from 8K to 1M tokens the hybrid's cost per token grows about 4.5x, the
     * all-softmax model's about 29x. Require the hybrid to grow at most a fifth as much. */
    double g_h = p.ctx[4].hybrid / p.ctx[1].hybrid, g_s = p.ctx[4].all_baseline / p.ctx[1].all_baseline;
    cr_expect_lt(5.0 * g_h, g_s, "growth 8K -> 1M: hybrid %.2fx, all-softmax %.2fx", g_h, g_s);
    double m_h = p.ctx[4].hybrid_avg / p.ctx[1].hybrid_avg, m_s = p.ctx[4].baseline_avg / p.ctx[1].baseline_avg;
    cr_expect_lt(5.0 * m_h, m_s, "prefill growth 8K -> 1M: hybrid %.2fx, all-softmax %.2fx", m_h, m_s);
    /* And the main figure is the hybrid at the stage's seq_len (8192). */
    cr_expect_eq(p.context, 8192);
    cr_expect_eq(p.flops_forward, p.ctx[1].hybrid);
    m1c_plan_free(&p);
}

/* Weights per GPU by hand (docs/plan.md): attention split over tp, experts over ep x tp, norms and the
 * router replicated, embedding (first stage) and head (last stage) split over tp by vocabulary. */
Test(plan, m1_memory_per_gpu) {
    const int64_t lin = M1_L - M1_SOFT;
    const double attn = (double)(lin * M1_LIN + M1_SOFT * M1_SM), experts = (double)(M1_L * M1_E * 3 * M1_F * M1_H);
    const double repl = (double)(M1_L * (M1_E * M1_H + 2 * M1_H) + M1_H), vh = (double)(M1_V * M1_H);
    m1c_plan p1, p2, p4;
    m1c_plan_opts o = {.precision = M1C_PREC_BF16_MIXED};
    plan_m1(&p1, &o);
    o.tp = 2;
    plan_m1(&p2, &o);
    o.tp = 4;
    plan_m1(&p4, &o);
    const m1c_plan_stage *g1 = &p1.stages[0], *g2 = &p2.stages[0], *g4 = &p4.stages[0];
    /* Sums of integers below 2^53 divided by powers of two: exact. */
    cr_expect_eq(g1->w_attention, attn);
    cr_expect_eq(g1->w_experts, experts);
    cr_expect_eq(g1->w_replicated, repl);
    cr_expect_eq(g1->w_embedding, vh);
    cr_expect_eq(g1->w_head, vh);
    cr_expect_eq(g1->params, (double)p1.total_params, "one GPU holds every parameter");
    /* Doubling tp halves the sharded layers' weights; the replicated ones stay. */
    cr_expect_eq(g2->w_attention, g1->w_attention / 2);
    cr_expect_eq(g2->w_experts, g1->w_experts / 2);
    cr_expect_eq(g4->w_attention, g2->w_attention / 2);
    cr_expect_eq(g4->w_experts, g2->w_experts / 2);
    cr_expect_eq(g2->w_embedding, vh / 2);
    cr_expect_eq(g2->w_replicated, g1->w_replicated);
    cr_expect_eq(g2->mem_params, 2.0 * (attn / 2 + experts / 2 + repl + vh), "bf16 weights: 2 bytes");
    /* bf16-mixed bytes: bf16 weights and gradients, fp32 master weights, AdamW's two fp32 moments. */
    cr_expect_eq(g1->mem_params, 2.0 * g1->params);
    cr_expect_eq(g1->mem_grads, 2.0 * g1->params);
    cr_expect_eq(g1->mem_master, 4.0 * g1->params);
    cr_expect_eq(g1->mem_optimizer, 2 * 4.0 * g1->params);
    m1c_plan_free(&p1);
    m1c_plan_free(&p2);
    m1c_plan_free(&p4);

    /* Experts over ep (inside dp = 8); ZeRO-1 splits master and moments over dp for dense weights and
     * over dp / ep for the experts. */
    m1c_plan q;
    o = (m1c_plan_opts){.precision = M1C_PREC_BF16_MIXED, .ep = 4, .dp = 8, .zero = 1};
    plan_m1(&q, &o);
    const m1c_plan_stage *g = &q.stages[0];
    cr_expect_eq(q.gpus, 8);
    cr_expect_eq(g->w_experts, experts / 4);
    cr_expect_eq(g->w_attention, attn);
    double opt = (attn + repl + 2 * vh) / 8 + experts / 4 / 2;
    cr_expect_lt(rel(g->mem_optimizer, 8.0 * opt), 1e-15, "ZeRO-1 moments %.17g, by hand %.17g", g->mem_optimizer,
                 8.0 * opt); /* one rounding in each of the divisions */
    cr_expect_lt(rel(g->mem_master, 4.0 * opt), 1e-15);
    m1c_plan_free(&q);

    /* Four pipeline stages of 20 layers: embedding on the first, head and final norm on the last, 1F1B
     * keeps pp - stage micro-batches of activations; the stages together hold every parameter once. */
    o = (m1c_plan_opts){.precision = M1C_PREC_BF16_MIXED, .pp = 4};
    plan_m1(&q, &o);
    double sum = 0;
    for (int st = 0; st < 4; st++) {
        const m1c_plan_stage *x = &q.stages[st];
        cr_expect_eq(x->first_layer, 20 * st);
        cr_expect_eq(x->n_layers, 20);
        cr_expect_eq(x->in_flight, 4 - st);
        cr_expect_eq(x->w_embedding, st == 0 ? vh : 0.0);
        cr_expect_eq(x->w_head, st == 3 ? vh : 0.0);
        sum += x->params;
    }
    cr_expect_eq(sum, (double)q.total_params);
    cr_expect_eq(q.mem_total, q.stages[q.worst_stage].mem_total);
    for (int st = 0; st < 4; st++) cr_expect_leq(q.stages[st].mem_total, q.mem_total);
    m1c_plan_free(&q);
}

/* `m1c plan configs/minimax-m1.cfg --json`: the published counts under the documented keys, and fast,
 * small and allocation-free (building M1 would need 1.8 TB of f32 weights). */
Test(plan, m1_command_is_quick, .timeout = 60) {
    double secs = 0;
    char *js = run_json(M1_CFG, "", &secs);
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    /* A Release build takes ~0.05 s (plugin loading, 80 layers' declarations); 2 s leaves room for a
     * sanitizer build on a loaded 2-core machine, and is far below any model allocation. */
    cr_expect_lt(secs, 2.0, "m1c plan took %.2f s", secs);
    /* ru_maxrss (KiB) of the largest child: m1c peaks near 6 MiB (25 MiB under ASan); one MoE layer's
     * weights alone would be 21 GB. */
    cr_expect_lt(ru.ru_maxrss, 256L * 1024, "m1c plan peaked at %ld KiB", ru.ru_maxrss);
    json_error_t jerr;
    json_t *root = json_loads(js, 0, &jerr);
    cr_assert_not_null(root, "not JSON: %s\n%s", jerr.text, js);
    double total = json_number_value(json_object_get(root, "total_params"));
    double active = json_number_value(json_object_get(root, "active_params"));
    cr_expect_lt(rel(total, 456e9), 0.005, "total_params %.0f vs 456B", total); /* the 0.5% */
    cr_expect_lt(rel(active, 45.9e9), 0.005, "active_params %.0f vs 45.9B", active);
    json_t *ratio = json_object_get(json_object_get(root, "flops_vs_context"), "ratio");
    cr_assert_eq(json_array_size(ratio), 5);
    for (size_t i = 1; i < 5; i++)
        cr_expect_gt(json_number_value(json_array_get(ratio, i)), json_number_value(json_array_get(ratio, i - 1)),
                     "the all-softmax model costs relatively more at every longer context");
    json_decref(root);
    free(js);
}
