/* m1c plan CONFIG: parameters, FLOPs per token and memory, as a table or JSON. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plan.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c plan CONFIG [-s key.path=value ...] [--context N] [--json]\n\n"
    "Counts parameters per component (total, and active per token for mixtures of experts), forward and\n"
    "training FLOPs per token at a context length, and the training memory for the first stage's batch,\n"
    "from the plugins' declarations: nothing model-sized is allocated.\n\n"
    "  --context N   count attention FLOPs for a token at position N (default: the first stage's seq_len)\n"
    "  --json        machine-readable output\n";

static void human(char *buf, size_t n, double x) {
    static const char *const unit[] = {"", "K", "M", "B", "T"};
    int u = 0;
    while (x >= 1000 && u < 4) x /= 1000, u++;
    snprintf(buf, n, u ? "%.2f%s" : "%.0f%s", x, unit[u]);
}

static void bytes(char *buf, size_t n, double x) {
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (x >= 1024 && u < 4) x /= 1024, u++;
    snprintf(buf, n, "%.1f %s", x, unit[u]);
}

static void print_table(const m1c_plan *p, const char *config) {
    char a[32], b[32];
    printf("plan of %s\n\n%-52s %14s %14s\n", config, "component", "parameters", "active/token");
    human(a, sizeof a, (double)p->embed_params);
    printf("%-52s %14s %14s\n", "embedding", a, a);
    for (int t = 0; t < p->n_types; t++) {
        const m1c_plan_type *pt = &p->types[t];
        if (!pt->layers) continue;
        char label[96];
        snprintf(label, sizeof label, "%s layers (x%d): attention [%s]", pt->name, pt->layers, pt->attention_plugin);
        human(a, sizeof a, (double)pt->attn_params * pt->layers);
        printf("%-52s %14s %14s\n", label, a, a);
        snprintf(label, sizeof label, "%s layers (x%d): ffn [%s]", pt->name, pt->layers, p->ffn_plugin);
        human(a, sizeof a, (double)p->ffn_params * pt->layers);
        human(b, sizeof b, (double)p->ffn_active * pt->layers);
        printf("%-52s %14s %14s\n", label, a, b);
        snprintf(label, sizeof label, "%s layers (x%d): norms", pt->name, pt->layers);
        human(a, sizeof a, (double)pt->norm_params * pt->layers);
        printf("%-52s %14s %14s\n", label, a, a);
    }
    human(a, sizeof a, (double)p->final_norm_params);
    printf("%-52s %14s %14s\n", "final norm", a, a);
    human(a, sizeof a, (double)p->head_params);
    printf("%-52s %14s %14s\n", "lm_head", a, a);
    human(a, sizeof a, (double)p->total_params);
    human(b, sizeof b, (double)p->active_params);
    printf("%-52s %14s %14s\n", "total", a, b);
    human(a, sizeof a, (double)p->total_nonembed);
    human(b, sizeof b, (double)p->active_nonembed);
    printf("%-52s %14s %14s\n\n", "without embedding and lm_head", a, b);
    human(a, sizeof a, p->flops_forward);
    human(b, sizeof b, p->flops_train);
    printf("FLOPs per token at context %lld: forward %s, training %s (3x forward)\n", (long long)p->context, a, b);
    printf("training memory for batch %d x %d tokens (f32):\n", p->batch, p->seq_len);
    bytes(a, sizeof a, p->mem_params);
    printf("  parameters %s, ", a);
    bytes(a, sizeof a, p->mem_grads);
    printf("gradients %s, ", a);
    bytes(a, sizeof a, p->mem_optimizer);
    printf("optimizer state %s (%d per parameter), ", a, p->optimizer_states);
    bytes(a, sizeof a, p->mem_activations);
    printf("activations %s\n", a);
    bytes(a, sizeof a, p->mem_total);
    printf("  total %s\n", a);
}

static void print_json(const m1c_plan *p, const char *config) {
    json_t *o = json_object(), *types = json_array();
    json_object_set_new(o, "config", json_string(config));
    json_object_set_new(o, "context", json_integer(p->context));
    json_object_set_new(o, "total_params", json_integer(p->total_nonembed));
    json_object_set_new(o, "active_params", json_integer(p->active_nonembed));
    json_object_set_new(o, "total_params_with_embeddings", json_integer(p->total_params));
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
    json_object_set_new(f, "flops_per_token_per_layer", json_real(p->ffn_flops));
    json_object_set_new(o, "ffn", f);
    json_object_set_new(o, "flops_per_token_forward", json_real(p->flops_forward));
    json_object_set_new(o, "flops_per_token_train", json_real(p->flops_train));
    json_t *m = json_object();
    json_object_set_new(m, "batch", json_integer(p->batch));
    json_object_set_new(m, "seq_len", json_integer(p->seq_len));
    json_object_set_new(m, "parameters", json_real(p->mem_params));
    json_object_set_new(m, "gradients", json_real(p->mem_grads));
    json_object_set_new(m, "optimizer", json_real(p->mem_optimizer));
    json_object_set_new(m, "activations", json_real(p->mem_activations));
    json_object_set_new(m, "total", json_real(p->mem_total));
    json_object_set_new(o, "memory_bytes", m);
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    puts(s);
    free(s);
    json_decref(o);
}

int m1c_cmd_plan(int argc, char **argv) {
    const char *config = NULL;
    m1c_overrides ov = {0};
    int json = 0;
    long long context = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if (!strcmp(argv[i], "--context") && i + 1 < argc) {
            char *end;
            context = strtoll(argv[++i], &end, 10);
            if (*end || context <= 0) {
                m1c_overrides_free(&ov);
                return m1c_cli_error("plan: --context: expected a positive integer, got '%s'", argv[i]);
            }
        } else if (argv[i][0] == '-' || config) {
            m1c_overrides_free(&ov);
            return m1c_cli_error("plan: unexpected argument '%s' (see m1c plan --help)", argv[i]);
        } else {
            config = argv[i];
        }
    }
    if (!config) {
        m1c_overrides_free(&ov);
        return m1c_cli_error("plan: missing CONFIG (see m1c plan --help)");
    }
    m1c_session s;
    m1c_err e = {{0}};
    m1c_plan p = {0};
    int rc = m1c_session_open(&s, config, ov.items, ov.n, &e);
    if (!rc) rc = m1c_plan_compute(&s, context, &p, &e);
    if (!rc) json ? print_json(&p, config) : print_table(&p, config);
    m1c_plan_free(&p);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    return rc ? m1c_cli_error("%s", e.msg) : 0;
}
