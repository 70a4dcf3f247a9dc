/* m1c plan CONFIG: parameters, FLOPs per token against context and memory per GPU for a parallel
 * layout, as a table or JSON (docs/plan.md). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plan.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c plan CONFIG [-s key.path=value ...] [options] [--json]\n\n"
    "Counts parameters per component (total, and active per token for mixtures of experts), forward and\n"
    "training FLOPs per token against context length (the model and the same model with the baseline\n"
    "type's attention at every layer) and training memory per GPU for a parallel layout, from the plugins'\n"
    "declarations: nothing model-sized is allocated. docs/plan.md explains every number.\n\n"
    "  --context N          the main FLOPs figure for a token at position N (default: first stage's seq_len)\n"
    "  --contexts A,B,...   context lengths of the FLOPs table (default 1024,8192,65536,131072,1048576)\n"
    "  --baseline-type T    layer type put at every layer for the comparison (default: the type whose\n"
    "                       attention FLOPs grow most with context: softmax in a hybrid)\n"
    "  --tp N --pp N --ep N --dp N   tensor, pipeline, expert, data parallel (default 1; --dp: --ep);\n"
    "                       GPUs = tp x pp x dp, experts spread over ep of the dp ranks\n"
    "  --zero 0|1           1: ZeRO-1, optimizer state and master weights sharded over data parallel\n"
    "  --precision P        fp32 (default) or bf16-mixed (bf16 weights, gradients and activations, fp32\n"
    "                       master weights and optimizer state)\n"
    "  --param-bytes N --grad-bytes N --act-bytes N   override the precision's sizes\n"
    "  --micro-batch N --seq-len N   sequences and tokens per GPU (default: the first stage's)\n"
    "  --json               machine-readable output\n";

static void human(char *buf, size_t n, double x) {
    static const char *const unit[] = {"", "K", "M", "B", "T", "P"};
    int u = 0;
    while (x >= 1000 && u < 5) x /= 1000, u++;
    snprintf(buf, n, u ? "%.2f%s" : "%.0f%s", x, unit[u]);
}

static void bytes(char *buf, size_t n, double x) {
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (x >= 1024 && u < 4) x /= 1024, u++;
    snprintf(buf, n, "%.1f %s", x, unit[u]);
}

static void row(const char *label, double total, double active) {
    char a[32], b[32];
    human(a, sizeof a, total);
    human(b, sizeof b, active);
    printf("%-52s %14s %14s\n", label, a, b);
}

static void print_table(const m1c_plan *p, const char *config) {
    char a[32], b[32], c[32], d[32], f[32];
    printf("plan of %s\n\n%-52s %14s %14s\n", config, "component", "parameters", "active/token");
    row("embedding", (double)p->embed_params, (double)p->embed_params);
    for (int t = 0; t < p->n_types; t++) {
        const m1c_plan_type *pt = &p->types[t];
        if (!pt->layers) continue;
        char label[96];
        snprintf(label, sizeof label, "%s layers (x%d): attention [%s]", pt->name, pt->layers, pt->attention_plugin);
        row(label, (double)pt->attn_params * pt->layers, (double)pt->attn_params * pt->layers);
        snprintf(label, sizeof label, "%s layers (x%d): ffn [%s]", pt->name, pt->layers, p->ffn_plugin);
        row(label, (double)p->ffn_params * pt->layers, (double)p->ffn_active * pt->layers);
        snprintf(label, sizeof label, "%s layers (x%d): norms", pt->name, pt->layers);
        row(label, (double)pt->norm_params * pt->layers, (double)pt->norm_params * pt->layers);
    }
    row("final norm", (double)p->final_norm_params, (double)p->final_norm_params);
    row("lm_head", (double)p->head_params, (double)p->head_params);
    row("total", (double)p->total_params, (double)p->active_params);
    row("without embedding and lm_head", (double)p->total_nonembed, (double)p->active_nonembed);
    human(a, sizeof a, (double)p->total_params);
    human(b, sizeof b, (double)p->active_nonembed);
    printf("as MiniMax counts: %s total (with embedding and lm_head), %s active (without)\n\n", a, b);

    human(a, sizeof a, p->flops_forward);
    human(b, sizeof b, p->flops_train);
    printf("FLOPs per token at context %lld: forward %s, training %s (3x forward)\n\n", (long long)p->context, a, b);
    printf("forward FLOPs per token against context: this model, and '%s' [%s] attention at every layer\n",
           p->baseline_type, p->baseline_plugin);
    printf("%10s %12s %12s %7s   %14s %14s %7s\n", "context", "this model", "all-baseline", "ratio",
           "prefill mean", "all-baseline", "ratio");
    for (int i = 0; i < p->n_ctx; i++) {
        const m1c_plan_ctx *x = &p->ctx[i];
        human(a, sizeof a, x->hybrid);
        human(b, sizeof b, x->all_baseline);
        human(c, sizeof c, x->hybrid_avg);
        human(d, sizeof d, x->baseline_avg);
        printf("%10lld %12s %12s %7.2f   %14s %14s %7.2f\n", (long long)x->ctx, a, b, x->all_baseline / x->hybrid, c,
               d, x->baseline_avg / x->hybrid_avg);
    }

    printf("\ntraining memory per GPU: tp %d, pp %d, ep %d, dp %d (%d GPUs), ZeRO-%d, %s", p->tp, p->pp, p->ep, p->dp,
           p->gpus, p->zero, m1c_precision_name(p->precision));
    printf(" (bytes: params %d, grads %d, master %d, optimizer %d x %d, activations %d)\n", p->param_bytes,
           p->grad_bytes, p->master_bytes, p->optimizer_states, p->state_bytes, p->act_bytes);
    printf("micro-batch %d x %d tokens per GPU\n", p->batch, p->seq_len);
    printf("%6s %8s %11s %11s %11s %11s %11s %11s %11s\n", "stage", "layers", "parameters", "weights", "gradients",
           "master", "optimizer", "activations", "total");
    for (int s = 0; s < p->pp; s++) {
        const m1c_plan_stage *g = &p->stages[s];
        char lay[32];
        snprintf(lay, sizeof lay, "%d-%d", g->first_layer, g->first_layer + g->n_layers - 1);
        human(a, sizeof a, g->params);
        bytes(b, sizeof b, g->mem_params);
        bytes(c, sizeof c, g->mem_grads);
        bytes(d, sizeof d, g->mem_master);
        bytes(f, sizeof f, g->mem_optimizer);
        char act[32], tot[32];
        bytes(act, sizeof act, g->mem_activations);
        bytes(tot, sizeof tot, g->mem_total);
        printf("%6d %8s %11s %11s %11s %11s %11s %11s %11s%s\n", s, lay, a, b, c, d, f, act, tot,
               s == p->worst_stage && p->pp > 1 ? "  <- largest" : "");
    }
}

/* One column of the FLOPs-against-context table: 0 hybrid, 1 all-baseline, 2 and 3 their prefill means. */
static json_t *ctx_column(const m1c_plan *p, int which) {
    json_t *a = json_array();
    for (int i = 0; i < p->n_ctx; i++) {
        const m1c_plan_ctx *x = &p->ctx[i];
        double v = which == 0 ? x->hybrid : which == 1 ? x->all_baseline : which == 2 ? x->hybrid_avg : x->baseline_avg;
        json_array_append_new(a, json_real(v));
    }
    return a;
}

static void print_json(const m1c_plan *p, const char *config) {
    json_t *o = json_object(), *types = json_array();
    json_object_set_new(o, "config", json_string(config));
    json_object_set_new(o, "context", json_integer(p->context));
    /* The published convention: 456B total counts everything, 45.9B active counts neither the
     * embedding nor the LM head (docs/plan.md). */
    json_object_set_new(o, "total_params", json_integer(p->total_params));
    json_object_set_new(o, "active_params", json_integer(p->active_nonembed));
    json_object_set_new(o, "total_params_without_embeddings", json_integer(p->total_nonembed));
    json_object_set_new(o, "active_params_with_embeddings", json_integer(p->active_params));
    json_object_set_new(o, "embedding_params", json_integer(p->embed_params));
    json_object_set_new(o, "lm_head_params", json_integer(p->head_params));
    json_object_set_new(o, "final_norm_params", json_integer(p->final_norm_params));
    for (int t = 0; t < p->n_types; t++) {
        const m1c_plan_type *pt = &p->types[t];
        json_t *x = json_object();
        json_object_set_new(x, "type", json_string(pt->name));
        json_object_set_new(x, "layers", json_integer(pt->layers));
        json_object_set_new(x, "attention_plugin", json_string(pt->attention_plugin ? pt->attention_plugin : ""));
        json_object_set_new(x, "attention_params_per_layer", json_integer(pt->attn_params));
        json_object_set_new(x, "norm_params_per_layer", json_integer(pt->norm_params));
        json_object_set_new(x, "attention_flops_per_token_per_layer", json_real(pt->attn_flops));
        json_array_append_new(types, x);
    }
    json_object_set_new(o, "layer_types", types);
    json_t *f = json_object();
    json_object_set_new(f, "plugin", json_string(p->ffn_plugin));
    json_object_set_new(f, "params_per_layer", json_integer(p->ffn_params));
    json_object_set_new(f, "active_params_per_layer", json_integer(p->ffn_active));
    json_object_set_new(f, "expert_params_per_layer", json_integer(p->ffn_expert_params));
    json_object_set_new(f, "experts", json_integer(p->n_experts));
    json_object_set_new(f, "flops_per_token_per_layer", json_real(p->ffn_flops));
    json_object_set_new(o, "ffn", f);
    json_object_set_new(o, "flops_per_token_forward", json_real(p->flops_forward));
    json_object_set_new(o, "flops_per_token_train", json_real(p->flops_train));

    json_t *fc = json_object(), *cs = json_array(), *ratio = json_array(), *ratio_avg = json_array();
    for (int i = 0; i < p->n_ctx; i++) {
        json_array_append_new(cs, json_integer(p->ctx[i].ctx));
        json_array_append_new(ratio, json_real(p->ctx[i].all_baseline / p->ctx[i].hybrid));
        json_array_append_new(ratio_avg, json_real(p->ctx[i].baseline_avg / p->ctx[i].hybrid_avg));
    }
    json_object_set_new(fc, "baseline_type", json_string(p->baseline_type));
    json_object_set_new(fc, "baseline_plugin", json_string(p->baseline_plugin));
    json_object_set_new(fc, "contexts", cs);
    json_object_set_new(fc, "hybrid", ctx_column(p, 0));
    json_object_set_new(fc, "all_softmax", ctx_column(p, 1));
    json_object_set_new(fc, "ratio", ratio);
    json_object_set_new(fc, "hybrid_prefill_mean", ctx_column(p, 2));
    json_object_set_new(fc, "all_softmax_prefill_mean", ctx_column(p, 3));
    json_object_set_new(fc, "ratio_prefill_mean", ratio_avg);
    json_object_set_new(o, "flops_vs_context", fc);

    json_t *m = json_object(), *lay = json_object(), *stages = json_array();
    json_object_set_new(lay, "tp", json_integer(p->tp));
    json_object_set_new(lay, "pp", json_integer(p->pp));
    json_object_set_new(lay, "ep", json_integer(p->ep));
    json_object_set_new(lay, "dp", json_integer(p->dp));
    json_object_set_new(lay, "zero", json_integer(p->zero));
    json_object_set_new(lay, "gpus", json_integer(p->gpus));
    json_object_set_new(lay, "precision", json_string(m1c_precision_name(p->precision)));
    json_object_set_new(lay, "param_bytes", json_integer(p->param_bytes));
    json_object_set_new(lay, "grad_bytes", json_integer(p->grad_bytes));
    json_object_set_new(lay, "master_bytes", json_integer(p->master_bytes));
    json_object_set_new(lay, "optimizer_states", json_integer(p->optimizer_states));
    json_object_set_new(lay, "state_bytes", json_integer(p->state_bytes));
    json_object_set_new(lay, "act_bytes", json_integer(p->act_bytes));
    json_object_set_new(m, "layout", lay);
    json_object_set_new(m, "micro_batch", json_integer(p->batch));
    json_object_set_new(m, "seq_len", json_integer(p->seq_len));
    json_object_set_new(m, "stage", json_integer(p->worst_stage));
    json_object_set_new(m, "parameters", json_real(p->mem_params));
    json_object_set_new(m, "gradients", json_real(p->mem_grads));
    json_object_set_new(m, "master_weights", json_real(p->mem_master));
    json_object_set_new(m, "optimizer", json_real(p->mem_optimizer));
    json_object_set_new(m, "activations", json_real(p->mem_activations));
    json_object_set_new(m, "total", json_real(p->mem_total));
    for (int s = 0; s < p->pp; s++) {
        const m1c_plan_stage *g = &p->stages[s];
        json_t *x = json_object();
        json_object_set_new(x, "stage", json_integer(g->stage));
        json_object_set_new(x, "first_layer", json_integer(g->first_layer));
        json_object_set_new(x, "layers", json_integer(g->n_layers));
        json_object_set_new(x, "in_flight", json_integer(g->in_flight));
        json_object_set_new(x, "weights_attention", json_real(g->w_attention));
        json_object_set_new(x, "weights_experts", json_real(g->w_experts));
        json_object_set_new(x, "weights_replicated", json_real(g->w_replicated));
        json_object_set_new(x, "weights_embedding", json_real(g->w_embedding));
        json_object_set_new(x, "weights_lm_head", json_real(g->w_head));
        json_object_set_new(x, "weights", json_real(g->params));
        json_object_set_new(x, "parameters", json_real(g->mem_params));
        json_object_set_new(x, "gradients", json_real(g->mem_grads));
        json_object_set_new(x, "master_weights", json_real(g->mem_master));
        json_object_set_new(x, "optimizer", json_real(g->mem_optimizer));
        json_object_set_new(x, "activations", json_real(g->mem_activations));
        json_object_set_new(x, "total", json_real(g->mem_total));
        json_array_append_new(stages, x);
    }
    json_object_set_new(m, "stages", stages);
    json_object_set_new(o, "memory_per_gpu_bytes", m);
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    puts(s);
    free(s);
    json_decref(o);
}

/* A positive integer option value in [1, max]; -1 if malformed. */
static long long positive(const char *s, long long max) {
    char *end;
    long long v = strtoll(s, &end, 10);
    return *s && !*end && v >= 1 && v <= max ? v : -1;
}

/* "1024,8192,..." into a new array. */
static int64_t *parse_list(const char *s, int *n) {
    int cap = 1;
    for (const char *c = s; *c; c++) cap += *c == ',';
    int64_t *v = malloc((size_t)cap * sizeof *v);
    *n = 0;
    for (const char *c = s;; c++) {
        char *end;
        long long x = strtoll(c, &end, 10);
        if (end == c || x < 1 || x > (1LL << 40) || (*end && *end != ',')) {
            free(v);
            return NULL;
        }
        v[(*n)++] = x;
        if (!*end) return v;
        c = end;
    }
}

int m1c_cmd_plan(int argc, char **argv) {
    const char *config = NULL;
    m1c_overrides ov = {0};
    m1c_plan_opts o = {0};
    int64_t *contexts = NULL;
    int json = 0, rc = 0;
    for (int i = 1; i < argc && !rc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        /* Integer options: name, destination, largest value. */
        const struct { const char *name; int *dst; long long max; } ints[] = {
            {"--tp", &o.tp, 1 << 20},          {"--pp", &o.pp, 1 << 20},
            {"--ep", &o.ep, 1 << 20},          {"--dp", &o.dp, 1 << 20},
            {"--param-bytes", &o.param_bytes, 64}, {"--grad-bytes", &o.grad_bytes, 64},
            {"--act-bytes", &o.act_bytes, 64}, {"--micro-batch", &o.micro_batch, 1 << 20},
            {"--seq-len", &o.seq_len, 1 << 30},
        };
        int matched = 0;
        for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
            if (strcmp(a, ints[k].name)) continue;
            matched = 1;
            long long x = v ? positive(v, ints[k].max) : -1;
            if (x < 0) rc = m1c_cli_error("plan: %s: expected an integer in [1, %lld], got '%s'", a, ints[k].max,
                                          v ? v : "");
            else *ints[k].dst = (int)x, i++;
        }
        if (matched) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            free(contexts);
            return 0;
        } else if (!strcmp(a, "-s") && v) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--context") && v) {
            long long x = positive(v, 1LL << 40);
            if (x < 0) rc = m1c_cli_error("plan: --context: expected a positive integer, got '%s'", v);
            o.context = x, i++;
        } else if (!strcmp(a, "--contexts") && v) {
            free(contexts);
            contexts = parse_list(v, &o.n_contexts);
            if (!contexts) rc = m1c_cli_error("plan: --contexts: expected positive integers separated by commas, got '%s'", v);
            o.contexts = contexts, i++;
        } else if (!strcmp(a, "--baseline-type") && v) {
            o.baseline_type = argv[++i];
        } else if (!strcmp(a, "--zero") && v) {
            if (strcmp(v, "0") && strcmp(v, "1")) rc = m1c_cli_error("plan: --zero: expected 0 or 1, got '%s'", v);
            o.zero = v[0] == '1', i++;
        } else if (!strcmp(a, "--precision") && v) {
            if (m1c_precision_parse(v, &o.precision))
                rc = m1c_cli_error("plan: --precision: expected fp32 or bf16-mixed, got '%s'", v);
            i++;
        } else if (a[0] == '-' || config) {
            rc = m1c_cli_error("plan: unexpected argument '%s' (see m1c plan --help)", a);
        } else {
            config = a;
        }
    }
    if (!rc && !config) rc = m1c_cli_error("plan: missing CONFIG (see m1c plan --help)");
    if (rc) {
        m1c_overrides_free(&ov);
        free(contexts);
        return rc;
    }
    m1c_session s;
    m1c_err e = {{0}};
    m1c_plan p = {0};
    rc = m1c_session_open(&s, config, ov.items, ov.n, &e);
    if (!rc) rc = m1c_plan_compute_opts(&s, &o, &p, &e);
    if (!rc) json ? print_json(&p, config) : print_table(&p, config);
    m1c_plan_free(&p);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    free(contexts);
    return rc ? m1c_cli_error("%s", e.msg) : 0;
}
