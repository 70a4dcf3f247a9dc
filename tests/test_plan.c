/* `m1c plan` arithmetic: m1c_plan_compute on tests/data/model/plan.cfg against parameter, FLOP and memory
 * formulas written out by hand from MODEL.md, and `m1c plan --json` against m1c_plan_compute. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

    /* Memory: f32 parameters and gradients, AdamW's two moments per parameter. */
    cr_expect_eq(p->mem_params, 4.0 * (double)(nonembed + emb));
    cr_expect_eq(p->mem_grads, p->mem_params);
    cr_expect_eq(p->optimizer_states, 2);
    cr_expect_eq(p->mem_optimizer, 2.0 * p->mem_params);
    cr_expect_gt(p->mem_activations, 4.0 * BATCH * SEQ * V, "activations hold at least the logits");
    cr_expect_eq(p->mem_total, p->mem_params + p->mem_grads + p->mem_optimizer + p->mem_activations);
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

static char *run_plan_json(const char *args) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH='%s' '%s/m1c' plan --json %s '%s' 2>&1", M1C_TEST_PLUGIN_DIR,
             M1C_BINARY_DIR, args, CFG);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f, "%s", cmd);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (size_t k; (k = fread(buf + n, 1, cap - 1 - n, f)) > 0;) n += k;
    buf[n] = 0;
    int st = pclose(f);
    cr_assert_eq(st, 0, "%s exited with %d:\n%s", cmd, st, buf);
    return buf;
}

static void check_json(const char *js, const m1c_plan *p) {
    /* Integers print exactly; reals print with 17 significant digits (jansson's default), which
     * round-trips a double: equality is exact. */
    cr_expect_eq(json_num(js, "context", 0), (double)p->context);
    cr_expect_eq(json_num(js, "total_params", 0), (double)p->total_nonembed, "JSON total_params is without embeddings");
    cr_expect_eq(json_num(js, "active_params", 0), (double)p->active_nonembed);
    cr_expect_eq(json_num(js, "total_params_with_embeddings", 0), (double)p->total_params);
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
    cr_expect_eq(json_num(js, "batch", 0), (double)p->batch);
    cr_expect_eq(json_num(js, "seq_len", 0), (double)p->seq_len);
    cr_expect_eq(json_num(js, "parameters", 0), p->mem_params);
    cr_expect_eq(json_num(js, "gradients", 0), p->mem_grads);
    cr_expect_eq(json_num(js, "optimizer", 0), p->mem_optimizer);
    cr_expect_eq(json_num(js, "activations", 0), p->mem_activations);
    cr_expect_eq(json_num(js, "total", 0), p->mem_total);
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
