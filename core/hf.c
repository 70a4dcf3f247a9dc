/* Hugging Face interoperability: transformers' MiniMax config.json <-> m1c configuration, and the
 * weights in either expert layout <-> m1c's parameters (which already carry transformers 5.x names). */
#include "hf.h"
#include "host.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "log.h"
#include "metrics.h"
#include "safetensors.h"

/* The model as transformers describes it: what import reads from config.json and export writes. */
typedef struct hf_cfg {
    int own;                 /* MiniMax's own dialect (attn_type_list, layernorm_*), else transformers' */
    int64_t V, H, L, F;      /* vocabulary, hidden, layers, expert intermediate size */
    int64_t nh, kvh, hd;     /* attention heads (lightning and softmax share them), KV heads, head dim */
    int64_t rotary;          /* rotated dims of the softmax layers' heads */
    int64_t E, k, block;     /* experts, top-k, lightning block size */
    double eps, init_std, theta, jitter, aux;
    int tied;
    int decay_hf;            /* lightning decay factor: transformers' 1 - l/(L-1+1e-5) + 1e-5, else MiniMax's */
    double a_lin, b_lin, a_full, b_full, a_mlp, b_mlp;
    int *is_linear;          /* [L] 1: lightning (linear_attention), 0: softmax (full_attention) */
} hf_cfg;

/* The lightning layers' output norm: transformers' MiniMaxRMSNorm default (and MiniMax's). */
#define HF_LIGHTNING_NORM_EPS 1e-6
/* transformers' MiniMaxConfig default rope_theta (its `default_theta`). */
#define HF_DEFAULT_THETA 1e6

/* Tensors of transformers checkpoints that are derived from the configuration (persistent buffers of
 * MiniMaxLightningAttention, older rotary caches): skipped on import, recomputed by transformers. */
static const char *const derived_suffixes[] = {".self_attn.slope_rate", ".self_attn.query_decay",
                                               ".self_attn.key_decay", ".self_attn.diagonal_decay",
                                               ".rotary_emb.inv_freq", NULL};

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

/* ---- JSON reading with one-line errors naming config.json and the key -------------------------- */

typedef struct jctx {
    const char *path; /* config.json, as given */
    json_t *o;
} jctx;

/* A short rendering of a value for messages. */
static void describe(const json_t *v, char *buf, size_t n) {
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    snprintf(buf, n, "%.60s%s", s ? s : "?", s && strlen(s) > 60 ? "..." : "");
    free(s);
}

static int jfail(const jctx *c, const char *key, m1c_err *e, const char *fmt, ...) M1C_PRINTF(4, 5);
static int jfail(const jctx *c, const char *key, m1c_err *e, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return m1c_fail(e, "%s: %s: %s", c->path, key, msg);
}

static json_t *jget(const jctx *c, const char *key) {
    json_t *v = json_object_get(c->o, key);
    return v && !json_is_null(v) ? v : NULL;
}

/* An integer key; absent or null: def when has_def, else an error. */
static int j_int(const jctx *c, const char *key, int has_def, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                 m1c_err *e) {
    json_t *v = jget(c, key);
    if (!v) {
        if (!has_def) return jfail(c, key, e, "required key is missing");
        *out = def;
        return M1C_OK;
    }
    int64_t x;
    if (json_is_integer(v)) {
        x = (int64_t)json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) && fabs(json_real_value(v)) < 9e15) {
        x = (int64_t)json_real_value(v);
    } else {
        char d[96];
        describe(v, d, sizeof d);
        return jfail(c, key, e, "expected an integer, got %s", d);
    }
    if (x < lo || x > hi)
        return jfail(c, key, e, "%lld is outside [%lld, %lld], what m1c supports", (long long)x, (long long)lo,
                     (long long)hi);
    *out = x;
    return M1C_OK;
}

static int j_num(const jctx *c, const char *key, double def, double lo, double hi, double *out, m1c_err *e) {
    json_t *v = jget(c, key);
    if (!v) {
        *out = def;
        return M1C_OK;
    }
    if (!json_is_number(v)) {
        char d[96];
        describe(v, d, sizeof d);
        return jfail(c, key, e, "expected a number, got %s", d);
    }
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return jfail(c, key, e, "%g is outside [%g, %g], what m1c supports", x, lo, hi);
    *out = x;
    return M1C_OK;
}

static int j_bool(const jctx *c, const char *key, int def, int *out, m1c_err *e) {
    json_t *v = jget(c, key);
    if (!v) {
        *out = def;
        return M1C_OK;
    }
    if (!json_is_boolean(v)) {
        char d[96];
        describe(v, d, sizeof d);
        return jfail(c, key, e, "expected true or false, got %s", d);
    }
    *out = json_is_true(v);
    return M1C_OK;
}

static int j_str(const jctx *c, const char *key, const char *def, const char **out, m1c_err *e) {
    json_t *v = jget(c, key);
    if (!v) {
        if (!def) return jfail(c, key, e, "required key is missing");
        *out = def;
        return M1C_OK;
    }
    if (!json_is_string(v)) {
        char d[96];
        describe(v, d, sizeof d);
        return jfail(c, key, e, "expected a string, got %s", d);
    }
    *out = json_string_value(v);
    return M1C_OK;
}

/* A value that must be absent, null, 0 or false (a feature m1c does not have). */
static int j_absent(const jctx *c, const char *key, const char *why, m1c_err *e) {
    json_t *v = jget(c, key);
    if (!v || (json_is_number(v) && json_number_value(v) == 0) || json_is_false(v)) return M1C_OK;
    char d[96];
    describe(v, d, sizeof d);
    return jfail(c, key, e, "%s is not supported: %s", d, why);
}

/* ---- config.json -> hf_cfg ---------------------------------------------------------------------- */

#define TRY(x)                                                                                                    \
    do {                                                                                                          \
        if ((x) != M1C_OK) return M1C_ERR;                                                                        \
    } while (0)

static int read_layer_types(hf_cfg *h, const jctx *c, m1c_err *e) {
    h->is_linear = m1c_xcalloc((size_t)h->L, sizeof *h->is_linear);
    const char *key = h->own ? "attn_type_list" : "layer_types";
    json_t *v = jget(c, key);
    if (!v) {
        if (h->own) return jfail(c, key, e, "required key is missing (0: lightning, 1: softmax, one per layer)");
        /* transformers' MiniMaxConfig default: full attention at even indices, linear at odd ones */
        for (int64_t l = 0; l < h->L; l++) h->is_linear[l] = (l + 1) % 2 == 0;
        return M1C_OK;
    }
    if (!json_is_array(v)) return jfail(c, key, e, "expected a list with one entry per layer");
    if ((int64_t)json_array_size(v) != h->L)
        return jfail(c, key, e, "%zu entries for %lld layers (num_hidden_layers)", json_array_size(v), (long long)h->L);
    for (int64_t l = 0; l < h->L; l++) {
        json_t *x = json_array_get(v, (size_t)l);
        char k[64], d[96];
        snprintf(k, sizeof k, "%s[%lld]", key, (long long)l);
        describe(x, d, sizeof d);
        if (h->own) {
            if (!json_is_integer(x) || (json_integer_value(x) != 0 && json_integer_value(x) != 1))
                return jfail(c, k, e, "unknown attention type %s (0: lightning, 1: softmax)", d);
            h->is_linear[l] = json_integer_value(x) == 0;
        } else {
            const char *s = json_is_string(x) ? json_string_value(x) : NULL;
            if (s && !strcmp(s, "linear_attention")) h->is_linear[l] = 1;
            else if (s && !strcmp(s, "full_attention")) h->is_linear[l] = 0;
            else
                return jfail(c, k, e, "unknown layer type %s (m1c has \"linear_attention\" and \"full_attention\")", d);
        }
    }
    return M1C_OK;
}

/* RoPE of the softmax layers. transformers' MiniMax computes its default RoPE over the whole head
 * dim and ignores a partial_rotary_factor, so a factor other than 1 would mean different things to
 * its author and to transformers: refused. MiniMax's dialect has rotary_dim. */
static int read_rope(hf_cfg *h, const jctx *c, m1c_err *e) {
    h->theta = HF_DEFAULT_THETA;
    h->rotary = h->hd;
    if (h->own) {
        TRY(j_absent(c, "rope_scaling", "m1c has plain RoPE only", e));
        TRY(j_num(c, "rope_theta", HF_DEFAULT_THETA, 1.0, 1e12, &h->theta, e));
        TRY(j_int(c, "rotary_dim", 1, h->hd, 0, h->hd, &h->rotary, e));
        if (h->rotary % 2) return jfail(c, "rotary_dim", e, "%lld is odd (rotate_half pairs dims)", (long long)h->rotary);
        return M1C_OK;
    }
    double prf = 1;
    TRY(j_num(c, "partial_rotary_factor", 1.0, 0.0, 1.0, &prf, e));
    if (prf != 1.0)
        return jfail(c, "partial_rotary_factor", e,
                     "%g is not supported: transformers' MiniMax rotates the whole head dim whatever it says", prf);
    json_t *rp = jget(c, "rope_parameters");
    if (!rp) {
        TRY(j_absent(c, "rope_scaling", "m1c has plain RoPE only (rope_type \"default\")", e));
        return j_num(c, "rope_theta", HF_DEFAULT_THETA, 1.0, 1e12, &h->theta, e);
    }
    if (!json_is_object(rp)) return jfail(c, "rope_parameters", e, "expected an object");
    jctx rc = {c->path, rp};
    char key[64];
    const char *k;
    json_t *x;
    json_object_foreach(rp, k, x) {
        snprintf(key, sizeof key, "rope_parameters.%s", k);
        if (json_is_object(x)) return jfail(c, key, e, "RoPE parameters per layer type are not supported");
        if (!strcmp(k, "rope_type") || !strcmp(k, "rope_theta")) continue;
        if (!strcmp(k, "partial_rotary_factor")) {
            if (json_is_number(x) && json_number_value(x) == 1.0) continue;
            char d[96];
            describe(x, d, sizeof d);
            return jfail(c, key, e, "%s is not supported: transformers' MiniMax rotates the whole head dim whatever it says",
                         d);
        }
        return jfail(c, key, e, "not supported: m1c has plain RoPE (rope_type \"default\" and rope_theta only)");
    }
    const char *type = "default";
    if (j_str(&rc, "rope_type", "default", &type, e)) return jfail(c, "rope_parameters.rope_type", e, "expected a string");
    if (strcmp(type, "default"))
        return jfail(c, "rope_parameters.rope_type", e, "\"%s\" is not supported: m1c has plain RoPE (\"default\")", type);
    if (j_num(&rc, "rope_theta", HF_DEFAULT_THETA, 1.0, 1e12, &h->theta, e))
        return jfail(c, "rope_parameters.rope_theta", e, "expected a number in [1, 1e12]");
    return M1C_OK;
}

static int read_hf(hf_cfg *h, const jctx *c, m1c_err *e) {
    memset(h, 0, sizeof *h);
    const char *mt = "";
    TRY(j_str(c, "model_type", NULL, &mt, e));
    if (!strcmp(mt, "minimax")) h->own = 0;
    else if (!strcmp(mt, "minimax_m1") || !strcmp(mt, "minimax_text_01")) h->own = 1;
    else
        return jfail(c, "model_type", e,
                     "\"%s\" is not a MiniMax model (m1c reads \"minimax\", transformers', and MiniMax's own "
                     "\"minimax_m1\" and \"minimax_text_01\")",
                     mt);
    TRY(j_int(c, "vocab_size", 0, 0, 1, 1 << 24, &h->V, e));
    TRY(j_int(c, "hidden_size", 0, 0, 1, 1 << 16, &h->H, e));
    TRY(j_int(c, "num_hidden_layers", 0, 0, 1, 4096, &h->L, e));
    TRY(j_int(c, "intermediate_size", 0, 0, 1, 1 << 20, &h->F, e));
    TRY(j_int(c, "num_attention_heads", 0, 0, 1, 4096, &h->nh, e));
    TRY(j_int(c, "num_key_value_heads", 1, h->nh, 1, h->nh, &h->kvh, e));
    if (h->nh % h->kvh)
        return jfail(c, "num_key_value_heads", e, "%lld does not divide num_attention_heads = %lld", (long long)h->kvh,
                     (long long)h->nh);
    if (h->H / h->nh < 1 && !jget(c, "head_dim"))
        return jfail(c, "head_dim", e, "required: hidden_size / num_attention_heads is 0");
    TRY(j_int(c, "head_dim", 1, h->H / h->nh, 1, 1024, &h->hd, e));
    TRY(j_int(c, "num_local_experts", 1, 8, 1, 4096, &h->E, e));
    TRY(j_int(c, "num_experts_per_tok", 1, 2, 1, h->E, &h->k, e));
    TRY(j_int(c, "block_size", 1, 256, 1, 4096, &h->block, e));
    TRY(j_num(c, "rms_norm_eps", 1e-5, 1e-12, 1.0, &h->eps, e));
    TRY(j_num(c, "initializer_range", 0.02, 0.0, 10.0, &h->init_std, e));
    TRY(j_bool(c, "tie_word_embeddings", 0, &h->tied, e));
    TRY(j_num(c, "router_jitter_noise", 0.0, 0.0, 1.0, &h->jitter, e));
    int aux_on = 0;
    double aux = 0;
    TRY(j_bool(c, "output_router_logits", 0, &aux_on, e));
    TRY(j_num(c, "router_aux_loss_coef", 0.001, 0.0, 1e6, &aux, e));
    /* transformers adds the load-balancing loss only with output_router_logits (docs/hf.md: its form) */
    h->aux = aux_on ? aux : 0.0;

    const char *act = "silu";
    TRY(j_str(c, "hidden_act", "silu", &act, e));
    if (strcmp(act, "silu"))
        return jfail(c, "hidden_act", e, "\"%s\" is not supported: m1c's lightning q/k/v and experts use SiLU", act);
    TRY(j_absent(c, "sliding_window", "m1c's softmax attention is full causal attention", e));
    TRY(j_absent(c, "attention_bias", "m1c's projections have no biases", e));
    TRY(j_absent(c, "mlp_bias", "m1c's projections have no biases", e));
    static const char *const shared[] = {"shared_intermediate_size", "shared_expert_intermediate_size",
                                         "n_shared_experts", "num_shared_experts", NULL};
    for (int i = 0; shared[i]; i++) TRY(j_absent(c, shared[i], "a shared expert (m1c's MoE has routed experts only)", e));
    double drop = 0;
    TRY(j_num(c, "attention_dropout", 0.0, 0.0, 1.0, &drop, e));
    if (drop > 0)
        M1C_WARN("%s: attention_dropout %g: m1c has no attention dropout (training only; inference is unaffected)",
                 c->path, drop);

    TRY(read_layer_types(h, c, e));
    TRY(read_rope(h, c, e));
    if (h->own) {
        int postnorm = 0;
        TRY(j_bool(c, "postnorm", 0, &postnorm, e));
        if (!postnorm)
            return jfail(c, "postnorm", e,
                         "false is not supported: m1c takes the residual after the norm (postnorm = true, as MiniMax-M1)");
        TRY(j_num(c, "layernorm_linear_attention_alpha", 1, 0, 1e6, &h->a_lin, e));
        TRY(j_num(c, "layernorm_linear_attention_beta", 1, 0, 1e6, &h->b_lin, e));
        TRY(j_num(c, "layernorm_full_attention_alpha", 1, 0, 1e6, &h->a_full, e));
        TRY(j_num(c, "layernorm_full_attention_beta", 1, 0, 1e6, &h->b_full, e));
        TRY(j_num(c, "layernorm_mlp_alpha", 1, 0, 1e6, &h->a_mlp, e));
        TRY(j_num(c, "layernorm_mlp_beta", 1, 0, 1e6, &h->b_mlp, e));
        /* MiniMax's code builds the slopes with the ALiBi rule, base^(h+1) only for a power of two */
        if (h->nh & (h->nh - 1))
            return jfail(c, "num_attention_heads", e,
                         "%lld is not a power of two: MiniMax's lightning decay slopes (the ALiBi rule) then differ "
                         "from m1c's base^(h+1)",
                         (long long)h->nh);
        h->decay_hf = 0;
    } else {
        TRY(j_num(c, "linear_attn_alpha_factor", 1, 0, 1e6, &h->a_lin, e));
        TRY(j_num(c, "linear_attn_beta_factor", 1, 0, 1e6, &h->b_lin, e));
        TRY(j_num(c, "full_attn_alpha_factor", 1, 0, 1e6, &h->a_full, e));
        TRY(j_num(c, "full_attn_beta_factor", 1, 0, 1e6, &h->b_full, e));
        TRY(j_num(c, "mlp_alpha_factor", 1, 0, 1e6, &h->a_mlp, e));
        TRY(j_num(c, "mlp_beta_factor", 1, 0, 1e6, &h->b_mlp, e));
        h->decay_hf = 1;
    }
    return M1C_OK;
}

static json_t *load_json(const char *path, m1c_err *e) {
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je); /* a repeated key: the last one counts, as in Python's json */
    if (!o) {
        if (!m1c_file_exists(path)) m1c_fail(e, "%s: cannot open: %s", path, strerror(ENOENT));
        else m1c_fail(e, "%s:%d: %s", path, je.line, je.text);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        m1c_fail(e, "%s: expected a JSON object", path);
        return NULL;
    }
    return o;
}

/* ---- hf_cfg -> m1c configuration text ------------------------------------------------------------ */

/* v as libconfig reads a float back exactly: whole numbers as "10000.0", others as the shortest %g
 * that reads back to v (always with a '.' or an exponent). */
static void fmt_double(char *buf, size_t n, double v) {
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, n, "%.1f", v);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, n, "%.*g", p, v);
        if (strtod(buf, NULL) == v) break;
    }
    if (!strpbrk(buf, ".eEn") && strlen(buf) + 3 <= n) strcat(buf, ".0");
}

static char *config_text(const hf_cfg *h, const char *source) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    char a[40], b[40];
    int n_lin = 0;
    for (int64_t l = 0; l < h->L; l++) n_lin += h->is_linear[l];
    fprintf(f, "# Translated from %s by m1c (docs/hf.md): the model only, no training stages.\n", source);
    fprintf(f, "model = {\n  vocab_size = %lld;\n  hidden = %lld;\n  layers = %lld;\n", (long long)h->V,
            (long long)h->H, (long long)h->L);
    fmt_double(a, sizeof a, h->eps);
    fmt_double(b, sizeof b, h->init_std);
    fprintf(f, "  norm_eps = %s;\n  init_std = %s;\n  tie_embeddings = %s;\n  head_precision = \"fp32\";\n", a, b,
            h->tied ? "true" : "false");
    fprintf(f, "  types = {\n");
    if (n_lin > 0) {
        fmt_double(a, sizeof a, HF_LIGHTNING_NORM_EPS);
        fprintf(f,
                "    lightning = {\n      attention = { plugin = \"lightning\"; heads = %lld; head_dim = %lld; "
                "block_size = %lld; norm_eps = %s; decay = \"%s\"; };\n",
                (long long)h->nh, (long long)h->hd, (long long)h->block, a, h->decay_hf ? "hf" : "m1c");
        fmt_double(a, sizeof a, h->a_lin);
        fmt_double(b, sizeof b, h->b_lin);
        fprintf(f, "      alpha = %s;\n      beta = %s;\n    };\n", a, b);
    }
    if (n_lin < h->L) {
        fmt_double(a, sizeof a, h->theta);
        fprintf(f,
                "    softmax = {\n      attention = { plugin = \"softmax\"; heads = %lld; kv_heads = %lld; "
                "head_dim = %lld; rotary_dim = %lld; rope_theta = %s; };\n",
                (long long)h->nh, (long long)h->kvh, (long long)h->hd, (long long)h->rotary, a);
        fmt_double(a, sizeof a, h->a_full);
        fmt_double(b, sizeof b, h->b_full);
        fprintf(f, "      alpha = %s;\n      beta = %s;\n    };\n", a, b);
    }
    fprintf(f, "  };\n  stack = [");
    for (int64_t l = 0; l < h->L; l++)
        fprintf(f, "%s%s\"%s\"", l ? "," : "", l % 8 ? " " : "\n    ", h->is_linear[l] ? "lightning" : "softmax");
    fprintf(f, "\n  ];\n");
    fmt_double(a, sizeof a, h->aux);
    fmt_double(b, sizeof b, h->jitter);
    fprintf(f,
            "  ffn = { plugin = \"topk\"; experts = %lld; top_k = %lld; ffn_dim = %lld; aux_coef = %s; jitter = %s; "
            "capacity_factor = 0.0; normalize = true; };\n",
            (long long)h->E, (long long)h->k, (long long)h->F, a, b);
    fmt_double(a, sizeof a, h->a_mlp);
    fmt_double(b, sizeof b, h->b_mlp);
    fprintf(f, "  ffn_alpha = %s;\n  ffn_beta = %s;\n};\n", a, b);
    fprintf(f, "run = {\n  out_dir = \"runs/imported\";\n  stages = ();\n};\n");
    fclose(f);
    return text;
}

char *m1c_hf_config_text(const char *hf_dir, m1c_err *e) {
    char *path = m1c_path_join(hf_dir, "config.json");
    json_t *o = load_json(path, e);
    char *text = NULL;
    if (o) {
        jctx c = {path, o};
        hf_cfg h;
        if (read_hf(&h, &c, e) == M1C_OK) text = config_text(&h, path);
        free(h.is_linear);
        json_decref(o);
    }
    free(path);
    return text;
}

/* ---- weights ----------------------------------------------------------------------------------- */

/* Index of a tensor of the set by name (the set's by_name order is strcmp's), -1 if absent. */
static int set_index(const m1c_st_set *s, const char *name) {
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, k = s->by_name[mid];
        int c = strcmp(name, s->t[k]->name);
        if (c == 0) return k;
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return -1;
}

static const char *set_file(const m1c_st_set *s, int k) { return s->files[s->file_of[k]].path; }

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++) o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* Read tensor `name` (of shape d0 x d1) into dst, converting to f32. */
static int read_part(const m1c_st_set *s, char *used, const char *name, int64_t d0, int64_t d1, float *dst,
                     m1c_err *e) {
    int k = set_index(s, name);
    if (k < 0) return m1c_fail(e, "%s: tensor '%s' missing", s->path, name);
    const m1c_st_tensor *t = s->t[k];
    if (t->ndim != 2 || t->shape[0] != d0 || t->shape[1] != d1) {
        char got[96];
        shape_str(got, sizeof got, t->ndim, t->shape);
        return m1c_fail(e, "%s: tensor '%s' has shape %s, the config needs [%lld, %lld]", set_file(s, k), name, got,
                        (long long)d0, (long long)d1);
    }
    used[k] = 1;
    return m1c_st_tensor_f32(t, set_file(s, k), dst, d0 * d1, e);
}

/* One parameter of m1c (a transformers 5.x name): found under its own name, or (the MoE) assembled
 * from MiniMax's per-expert tensors. */
static int load_param(const m1c_st_set *s, char *used, m1c_tensor *p, m1c_err *e) {
    int k = set_index(s, p->name);
    if (k >= 0) {
        const m1c_st_tensor *t = s->t[k];
        int same = t->ndim == p->ndim;
        for (int i = 0; same && i < p->ndim; i++) same = t->shape[i] == p->shape[i];
        if (!same) {
            char got[96], want[96];
            shape_str(got, sizeof got, t->ndim, t->shape);
            shape_str(want, sizeof want, p->ndim, p->shape);
            return m1c_fail(e, "%s: tensor '%s' has shape %s, the config needs %s", set_file(s, k), p->name, got, want);
        }
        used[k] = 1;
        return m1c_st_load(t, set_file(s, k), p, e);
    }
    int l = -1, off = 0;
    if (sscanf(p->name, "model.layers.%d.%n", &l, &off) == 1 && off > 0) {
        const char *rest = p->name + off;
        char name[256];
        float *x = p->data;
        if (!strcmp(rest, "mlp.gate.weight") && p->ndim == 2) {
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight", l);
            if (set_index(s, name) >= 0) return read_part(s, used, name, p->shape[0], p->shape[1], x, e);
        } else if (!strcmp(rest, "mlp.experts.gate_up_proj") && p->ndim == 3) {
            const int64_t E = p->shape[0], F = p->shape[1] / 2, H = p->shape[2];
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.0.w1.weight", l);
            if (set_index(s, name) >= 0) {
                for (int64_t ex = 0; ex < E; ex++) { /* gate rows (w1) first, then up (w3) */
                    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w1.weight", l, (long long)ex);
                    TRY(read_part(s, used, name, F, H, x + ex * 2 * F * H, e));
                    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w3.weight", l, (long long)ex);
                    TRY(read_part(s, used, name, F, H, x + ex * 2 * F * H + F * H, e));
                }
                return M1C_OK;
            }
        } else if (!strcmp(rest, "mlp.experts.down_proj") && p->ndim == 3) {
            const int64_t E = p->shape[0], H = p->shape[1], F = p->shape[2];
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.0.w2.weight", l);
            if (set_index(s, name) >= 0) {
                for (int64_t ex = 0; ex < E; ex++) {
                    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w2.weight", l, (long long)ex);
                    TRY(read_part(s, used, name, H, F, x + ex * H * F, e));
                }
                return M1C_OK;
            }
        }
    }
    return m1c_fail(e, "%s: tensor '%s' missing%s", s->path, p->name,
                    strstr(p->name, ".mlp.") ? " (nor MiniMax's per-expert block_sparse_moe tensors)" : "");
}

int m1c_hf_load_weights(const char *hf_dir, m1c_model *m, m1c_err *e) {
    m1c_st_set s;
    if (m1c_st_set_open(&s, hf_dir, e)) return M1C_ERR;
    /* A model on a GPU is loaded through a host mirror of its parameters. */
    m1c_arena host, *dst = &m->params;
    if (m->device != M1C_DEVICE_CPU) {
        if (m1c_arena_like(&host, &m->params, M1C_DEVICE_CPU, "", e)) {
            m1c_st_set_close(&s);
            return M1C_ERR;
        }
        dst = &host;
    }
    char *used = m1c_xcalloc((size_t)s.n + 1, 1);
    int rc = M1C_OK;
    for (int i = 0; i < m->params.n && !rc; i++) rc = load_param(&s, used, &dst->t[i], e);
    for (int k = 0; k < s.n && !rc; k++) {
        if (used[k]) continue;
        const char *n = s.t[k]->name;
        int derived = 0;
        for (int j = 0; derived_suffixes[j]; j++) derived |= ends_with(n, derived_suffixes[j]);
        /* a tied head is the embedding: transformers ignores a stored copy too */
        if (derived || (m->tied && !strcmp(n, "lm_head.weight"))) continue;
        rc = m1c_fail(e, "%s: tensor '%s' has no place in the model that config.json describes (m1c would ignore it)",
                      set_file(&s, k), n);
    }
    free(used);
    m1c_st_set_close(&s);
    if (dst != &m->params) {
        if (!rc) m1c_dev_copy(m->device, m->params.base, M1C_DEVICE_CPU, host.base, m->params.bytes);
        m1c_arena_free(&host);
    }
    if (!rc) m1c_model_sync_lp(m);
    return rc;
}

/* ---- sessions and import --------------------------------------------------------------------------- */

int m1c_hf_open(m1c_session *s, const char *hf_dir, const char *const *overrides, int n_overrides, m1c_err *e) {
    memset(s, 0, sizeof *s);
    char *text = m1c_hf_config_text(hf_dir, e);
    if (!text) return M1C_ERR;
    char *cfg = m1c_path_join(hf_dir, "config.json");
    char *name = m1c_xasprintf("%s (translated)", cfg);
    int rc = m1c_session_open_text(s, text, name, hf_dir, overrides, n_overrides, e);
    free(name);
    free(cfg);
    free(text);
    if (!rc) rc = m1c_session_build_model(s, 0, e);
    if (!rc) rc = m1c_hf_load_weights(hf_dir, &s->model, e);
    return rc;
}

static int copy_file(const char *from, const char *to, m1c_err *e) {
    FILE *in = fopen(from, "rb");
    if (!in) return m1c_fail(e, "%s: cannot open: %s", from, strerror(errno));
    FILE *out = fopen(to, "wb");
    if (!out) {
        fclose(in);
        return m1c_fail(e, "%s: cannot write: %s", to, strerror(errno));
    }
    char buf[65536];
    size_t n;
    int ok = 1;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) ok &= fwrite(buf, 1, n, out) == n;
    ok &= !ferror(in);
    fclose(in);
    ok &= fclose(out) == 0;
    return ok ? M1C_OK : m1c_fail(e, "%s: write failed", to);
}

int m1c_hf_import(const char *hf_dir, const char *out_dir, m1c_err *e) {
    m1c_session s;
    int rc = m1c_hf_open(&s, hf_dir, NULL, 0, e);
    if (!rc) {
        m1c_ckpt_state st = {0};
        st.stage_name = "import-hf";
        rc = m1c_ckpt_save(out_dir, &s.model, NULL, &st, s.cfg, e);
    }
    if (!rc) {
        char *from = m1c_path_join(hf_dir, "config.json"), *to = m1c_path_join(out_dir, "hf_config.json");
        rc = copy_file(from, to, e);
        free(from);
        free(to);
    }
    m1c_session_close(&s);
    return rc;
}

/* ---- export: the model -> hf_cfg ------------------------------------------------------------------ */

static int slot_int(m1c_settings *s, const char *key, int64_t *out, m1c_err *e) {
    return m1c_cfg_int(s, key, M1C_REQUIRED, 0, INT64_MIN, INT64_MAX, out, e);
}

static int slot_num(m1c_settings *s, const char *key, double *out, m1c_err *e) {
    return m1c_cfg_float(s, key, M1C_REQUIRED, 0, -1e300, 1e300, out, e);
}

/* v (setting `key` of slot s) must equal the value *have taken from another layer type (have_set). */
static int agree_int(m1c_settings *s, const char *key, int64_t v, int64_t *have, int *have_set, const char *what,
                     m1c_err *e) {
    if (*have_set && *have != v)
        return m1c_cfg_fail(s, key, -1, e, "%lld differs from %lld elsewhere: transformers has one %s", (long long)v,
                            (long long)*have, what);
    *have = v;
    *have_set = 1;
    return M1C_OK;
}

static int agree_num(m1c_settings *s, const char *key, double v, double *have, int *have_set, const char *what,
                     m1c_err *e) {
    if (*have_set && *have != v)
        return m1c_cfg_fail(s, key, -1, e, "%g differs from %g elsewhere: transformers has one %s", v, *have, what);
    *have = v;
    *have_set = 1;
    return M1C_OK;
}

/* Only what transformers' MiniMaxForCausalLM computes exactly is exported. */
static int describe_model(m1c_session *s, hf_cfg *h, m1c_err *e) {
    const m1c_model_spec *ms = &s->spec.model;
    m1c_model *m = &s->model;
    memset(h, 0, sizeof *h);
    h->V = m->V, h->H = m->H, h->L = m->L, h->eps = ms->norm_eps, h->init_std = ms->init_std, h->tied = m->tied;
    h->theta = HF_DEFAULT_THETA, h->block = 256, h->decay_hf = 1;
    h->a_lin = h->b_lin = h->a_full = h->b_full = 1.0;
    h->is_linear = m1c_xcalloc((size_t)h->L, sizeof *h->is_linear);
    int set_nh = 0, set_hd = 0, set_kvh = 0, set_blk = 0, set_th = 0, set_al = 0, set_bl = 0, set_af = 0, set_bf = 0;
    for (int l = 0; l < m->L; l++) {
        const m1c_layer_type_spec *ty = &ms->types[ms->layer_type[l]];
        m1c_settings *a = ty->attention.settings;
        const char *pn = m->layer[l].attn.plugin->desc->name;
        int64_t nh, hd;
        TRY(slot_int(a, "heads", &nh, e));
        TRY(slot_int(a, "head_dim", &hd, e));
        TRY(agree_int(a, "heads", nh, &h->nh, &set_nh, "num_attention_heads", e));
        TRY(agree_int(a, "head_dim", hd, &h->hd, &set_hd, "head_dim", e));
        if (!strcmp(pn, "lightning")) {
            int64_t bs;
            double eps;
            const char *decay;
            h->is_linear[l] = 1;
            TRY(slot_int(a, "block_size", &bs, e));
            TRY(agree_int(a, "block_size", bs, &h->block, &set_blk, "block_size", e));
            TRY(slot_num(a, "norm_eps", &eps, e));
            if ((float)eps != (float)HF_LIGHTNING_NORM_EPS)
                return m1c_cfg_fail(a, "norm_eps", -1, e, "%g: transformers' lightning norm has eps 1e-6", eps);
            TRY(m1c_cfg_string(a, "decay", M1C_REQUIRED, NULL, NULL, &decay, e));
            /* the two factors agree for a single layer (l = 0: both 1 + 1e-5) */
            if (strcmp(decay, "hf") && m->L > 1)
                return m1c_cfg_fail(a, "decay", -1, e,
                                    "\"%s\": transformers computes the decay factor 1 - l/(L-1+1e-5) + 1e-5; set decay = "
                                    "\"hf\" (the weights stay valid up to a relative decay change of ~1e-5/L)",
                                    decay);
            TRY(agree_num(ty->settings, "alpha", ty->alpha, &h->a_lin, &set_al, "linear_attn_alpha_factor", e));
            TRY(agree_num(ty->settings, "beta", ty->beta, &h->b_lin, &set_bl, "linear_attn_beta_factor", e));
        } else if (!strcmp(pn, "softmax")) {
            int64_t kvh, rd;
            double theta;
            TRY(slot_int(a, "kv_heads", &kvh, e));
            TRY(agree_int(a, "kv_heads", kvh, &h->kvh, &set_kvh, "num_key_value_heads", e));
            TRY(slot_int(a, "rotary_dim", &rd, e));
            if (rd != hd)
                return m1c_cfg_fail(a, "rotary_dim", -1, e,
                                    "%lld of %lld dims: transformers' MiniMax rotates the whole head dim", (long long)rd,
                                    (long long)hd);
            TRY(slot_num(a, "rope_theta", &theta, e));
            TRY(agree_num(a, "rope_theta", theta, &h->theta, &set_th, "rope_theta", e));
            TRY(agree_num(ty->settings, "alpha", ty->alpha, &h->a_full, &set_af, "full_attn_alpha_factor", e));
            TRY(agree_num(ty->settings, "beta", ty->beta, &h->b_full, &set_bf, "full_attn_beta_factor", e));
        } else {
            return m1c_cfg_fail(ty->attention.settings, "plugin", -1, e,
                                "'%s': transformers' MiniMax has lightning and softmax attention only", pn);
        }
    }
    if (!set_kvh) h->kvh = h->nh;
    const char *fp = m->layer[0].ffn.plugin->desc->name;
    m1c_settings *f = ms->ffn.settings;
    if (strcmp(fp, "topk")) return m1c_cfg_fail(f, "plugin", -1, e, "'%s': transformers' MiniMax has a top-k MoE", fp);
    double cf;
    int norm;
    TRY(slot_int(f, "experts", &h->E, e));
    TRY(slot_int(f, "top_k", &h->k, e));
    TRY(slot_int(f, "ffn_dim", &h->F, e));
    TRY(slot_num(f, "aux_coef", &h->aux, e));
    TRY(slot_num(f, "jitter", &h->jitter, e));
    TRY(slot_num(f, "capacity_factor", &cf, e));
    TRY(m1c_cfg_bool(f, "normalize", M1C_REQUIRED, 1, &norm, e));
    if (cf != 0) return m1c_cfg_fail(f, "capacity_factor", -1, e, "%g: transformers' MiniMax drops no tokens", cf);
    if (!norm)
        return m1c_cfg_fail(f, "normalize", -1, e, "false: transformers' MiniMax renormalises the top-k weights");
    h->a_mlp = ms->ffn_alpha, h->b_mlp = ms->ffn_beta;
    return M1C_OK;
}

/* ---- export: hf_cfg -> config.json ---------------------------------------------------------------- */

/* Equal as transformers reads them: numbers by value (1 == 1.0), containers element by element. */
static int same_value(const json_t *a, const json_t *b) {
    if (json_is_number(a) && json_is_number(b)) return json_number_value(a) == json_number_value(b);
    if (json_is_object(a) && json_is_object(b)) {
        if (json_object_size(a) != json_object_size(b)) return 0;
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)a, k, v) {
            json_t *w = json_object_get(b, k);
            if (!w || !same_value(v, w)) return 0;
        }
        return 1;
    }
    if (json_is_array(a) && json_is_array(b)) {
        if (json_array_size(a) != json_array_size(b)) return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!same_value(json_array_get(a, i), json_array_get(b, i))) return 0;
        return 1;
    }
    return json_equal((json_t *)a, (json_t *)b);
}

/* Set key to v (stolen) unless the value there already means the same. */
static void put(json_t *o, const char *key, json_t *v) {
    json_t *old = json_object_get(o, key);
    if (old && same_value(old, v)) json_decref(v);
    else json_object_set_new(o, key, v);
}

/* put, but where the model has no layer of the kind the key is about, an existing value stays. */
static void put_if(json_t *o, int relevant, const char *key, json_t *v) {
    if (relevant || !json_object_get(o, key)) put(o, key, v);
    else json_decref(v);
}

static json_t *config_json(const hf_cfg *h, json_t *orig, int dtype) {
    int has_lin = 0, has_full = 0;
    for (int64_t l = 0; l < h->L; l++) {
        if (h->is_linear[l]) has_lin = 1;
        else has_full = 1;
    }
    json_t *o;
    if (orig && json_is_string(json_object_get(orig, "model_type")) &&
        !strcmp(json_string_value(json_object_get(orig, "model_type")), "minimax")) {
        o = json_deep_copy(orig);
    } else { /* another dialect (or none): only its generic keys carry over */
        o = json_object();
        static const char *const keep[] = {"bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                                           NULL};
        for (int i = 0; orig && keep[i]; i++)
            if (json_object_get(orig, keep[i])) json_object_set(o, keep[i], json_object_get(orig, keep[i]));
    }
    if (!json_is_array(json_object_get(o, "architectures")) && !json_is_null(json_object_get(o, "architectures")))
        json_object_set_new(o, "architectures", json_pack("[s]", "MiniMaxForCausalLM"));
    put(o, "model_type", json_string("minimax"));
    put(o, "vocab_size", json_integer(h->V));
    put(o, "hidden_size", json_integer(h->H));
    put(o, "intermediate_size", json_integer(h->F));
    put(o, "num_hidden_layers", json_integer(h->L));
    put(o, "num_attention_heads", json_integer(h->nh));
    put(o, "head_dim", json_integer(h->hd));
    put(o, "hidden_act", json_string("silu"));
    put(o, "rms_norm_eps", json_real(h->eps));
    put(o, "initializer_range", json_real(h->init_std));
    put(o, "tie_word_embeddings", json_boolean(h->tied));
    put(o, "num_local_experts", json_integer(h->E));
    put(o, "num_experts_per_tok", json_integer(h->k));
    put(o, "router_jitter_noise", json_real(h->jitter));
    /* transformers adds its load-balancing loss only with output_router_logits. It is never switched
     * on here: its form differs from m1c's (docs/hf.md), and with it on, transformers 5.17's
     * generate() fails in load_balancing_loss_func. The coefficient is written for reference. */
    if (h->aux > 0) put(o, "router_aux_loss_coef", json_real(h->aux));
    else put(o, "output_router_logits", json_false());
    put_if(o, has_lin, "block_size", json_integer(h->block));
    put(o, "sliding_window", json_null());
    put_if(o, has_lin, "linear_attn_alpha_factor", json_real(h->a_lin));
    put_if(o, has_lin, "linear_attn_beta_factor", json_real(h->b_lin));
    put_if(o, has_full, "full_attn_alpha_factor", json_real(h->a_full));
    put_if(o, has_full, "full_attn_beta_factor", json_real(h->b_full));
    put_if(o, has_full, "num_key_value_heads", json_integer(h->kvh));
    put(o, "mlp_alpha_factor", json_real(h->a_mlp));
    put(o, "mlp_beta_factor", json_real(h->b_mlp));
    json_t *lt = json_array();
    for (int64_t l = 0; l < h->L; l++)
        json_array_append_new(lt, json_string(h->is_linear[l] ? "linear_attention" : "full_attention"));
    put(o, "layer_types", lt);
    json_t *rp = json_object_get(o, "rope_parameters");
    if (json_is_object(rp)) {
        put_if(rp, has_full, "rope_type", json_string("default"));
        put_if(rp, has_full, "rope_theta", json_real(h->theta));
    } else if (json_object_get(o, "rope_theta")) { /* transformers 4.x's spelling */
        put_if(o, has_full, "rope_theta", json_real(h->theta));
    } else {
        json_object_set_new(o, "rope_parameters", json_pack("{s:s,s:f}", "rope_type", "default", "rope_theta", h->theta));
    }
    /* the dtype transformers loads in by default: null means float32 */
    const char *dk = json_object_get(o, "torch_dtype") ? "torch_dtype" : "dtype";
    json_t *dv = json_object_get(o, dk);
    if (dtype == M1C_BF16) json_object_set_new(o, dk, json_string("bfloat16"));
    else if (!dv || !json_is_null(dv)) json_object_set_new(o, dk, json_string("float32"));
    return o;
}

/* ---- export: tensors ------------------------------------------------------------------------------ */

typedef struct named {
    char *name;
    m1c_tensor t;
} named;

static int by_name(const void *a, const void *b) { return strcmp(((const named *)a)->name, ((const named *)b)->name); }

static void add(named **v, int *n, int *cap, const char *name, const m1c_tensor *src, void *data, int ndim, int64_t d0,
                int64_t d1, int64_t d2) {
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 256;
        *v = m1c_xrealloc(*v, (size_t)*cap * sizeof **v);
    }
    named *x = &(*v)[(*n)++];
    x->name = m1c_xstrdup(name);
    x->t = *src;
    x->t.name = x->name;
    x->t.data = data;
    x->t.ndim = ndim;
    int64_t d[3] = {d0, d1, d2};
    for (int i = 0; i < M1C_MAX_DIMS; i++) x->t.shape[i] = i < ndim ? d[i] : 0;
}

/* The model's parameters under transformers' names in the chosen expert layout (views, no copies). */
static named *hf_tensors(m1c_model *m, int layout, int *count) {
    named *v = NULL;
    int n = 0, cap = 0;
    for (int i = 0; i < m->params.n; i++) {
        m1c_tensor *p = &m->params.t[i];
        int l = -1, off = 0;
        const char *rest = sscanf(p->name, "model.layers.%d.%n", &l, &off) == 1 && off > 0 ? p->name + off : "";
        char name[256];
        float *x = p->data;
        if (layout == M1C_HF_PER_EXPERT && !strcmp(rest, "mlp.gate.weight")) {
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight", l);
            add(&v, &n, &cap, name, p, x, 2, p->shape[0], p->shape[1], 0);
        } else if (layout == M1C_HF_PER_EXPERT && !strcmp(rest, "mlp.experts.gate_up_proj")) {
            const int64_t E = p->shape[0], F = p->shape[1] / 2, H = p->shape[2];
            for (int64_t ex = 0; ex < E; ex++) {
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w1.weight", l, (long long)ex);
                add(&v, &n, &cap, name, p, x + ex * 2 * F * H, 2, F, H, 0);
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w3.weight", l, (long long)ex);
                add(&v, &n, &cap, name, p, x + ex * 2 * F * H + F * H, 2, F, H, 0);
            }
        } else if (layout == M1C_HF_PER_EXPERT && !strcmp(rest, "mlp.experts.down_proj")) {
            const int64_t E = p->shape[0], H = p->shape[1], F = p->shape[2];
            for (int64_t ex = 0; ex < E; ex++) {
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%lld.w2.weight", l, (long long)ex);
                add(&v, &n, &cap, name, p, x + ex * H * F, 2, H, F, 0);
            }
        } else {
            add(&v, &n, &cap, p->name, p, x, p->ndim, p->shape[0], p->shape[1], p->shape[2]);
        }
    }
    /* the safetensors library's order (by dtype, then name): one dtype here, so by name */
    qsort(v, (size_t)n, sizeof *v, by_name);
    *count = n;
    return v;
}

int m1c_hf_export_session(m1c_session *s, const char *orig_config, const char *out_dir,
                          const m1c_hf_export_opts *o, m1c_err *e) {
    m1c_hf_export_opts def = {M1C_HF_FUSED, M1C_F32};
    if (!o) o = &def;
    if (o->dtype != M1C_F32 && o->dtype != M1C_BF16) return m1c_fail(e, "export: dtype must be F32 or BF16");
    if (!s->have_model || s->model.device != M1C_DEVICE_CPU) return m1c_fail(e, "export: needs a model on the CPU");
    hf_cfg h;
    int rc = describe_model(s, &h, e);
    char *index = m1c_path_join(out_dir, "model.safetensors.index.json");
    if (!rc && m1c_file_exists(index)) /* loaders would read the stale shards, not the new file */
        rc = m1c_fail(e, "%s: a sharded checkpoint is there already: export into an empty folder", index);
    free(index);
    json_t *orig = NULL;
    if (!rc && orig_config && m1c_file_exists(orig_config) && !(orig = load_json(orig_config, e))) rc = M1C_ERR;
    if (!rc) rc = m1c_mkdirs(out_dir, e);
    if (!rc) {
        int n = 0;
        named *v = hf_tensors(&s->model, o->layout, &n);
        m1c_tensor *ts = m1c_xcalloc((size_t)n + 1, sizeof *ts);
        int *dt = m1c_xcalloc((size_t)n + 1, sizeof *dt);
        for (int i = 0; i < n; i++) ts[i] = v[i].t, dt[i] = o->dtype;
        static const char *const mk[] = {"format"}, *const mv[] = {"pt"};
        char *path = m1c_path_join(out_dir, "model.safetensors");
        rc = m1c_st_write_as(path, ts, dt, n, mk, mv, 1, e);
        free(path);
        for (int i = 0; i < n; i++) free(v[i].name);
        free(v);
        free(ts);
        free(dt);
    }
    if (!rc) {
        json_t *cj = config_json(&h, orig, o->dtype);
        /* numbers with the fewest digits that still read back exactly (0.8, not 0.80000000000000004) */
        size_t flags = JSON_INDENT(2) | JSON_SORT_KEYS;
        for (int p = 15; p <= 17; p++) {
            char *txt = json_dumps(cj, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(p));
            json_t *back = txt ? json_loads(txt, 0, NULL) : NULL;
            int exact = back && same_value(back, cj);
            json_decref(back);
            free(txt);
            if (exact) {
                flags = JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(p);
                break;
            }
        }
        char *path = m1c_path_join(out_dir, "config.json"), *tmp = m1c_xasprintf("%s.tmp", path);
        if (json_dump_file(cj, tmp, flags) || rename(tmp, path)) {
            rc = m1c_fail(e, "%s: cannot write: %s", path, strerror(errno));
            remove(tmp);
        }
        free(tmp);
        free(path);
        json_decref(cj);
    }
    json_decref(orig);
    free(h.is_linear);
    return rc;
}

int m1c_hf_export(const char *ckpt_dir, const char *out_dir, const char *const *overrides, int n_overrides,
                  const m1c_hf_export_opts *o, m1c_err *e) {
    m1c_session s;
    int rc = m1c_session_open_checkpoint(&s, ckpt_dir, overrides, n_overrides, e);
    if (!rc) {
        char *orig = m1c_path_join(ckpt_dir, "hf_config.json");
        rc = m1c_hf_export_session(&s, orig, out_dir, o, e);
        free(orig);
    }
    m1c_session_close(&s);
    return rc;
}
