/* The schema of the core's keys (model, run, stages) read through the strict getters, and the check
 * that creates one instance of every plugin slot so plugins validate their own keys. */
#include "spec.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"

static const char *const stage_kinds[] = {"pretrain", "sft", "rl", NULL};
static const char *const decays[] = {"cosine", "constant", "linear", NULL};
static const char *const precisions[] = {"fp32", "tf32", "bf16", "tf32x3", NULL};
static const char *const devices[] = {"cpu", "cuda", NULL};
static const char *const precisions_run[] = {"fp32", "bf16", NULL};

const char *m1c_stage_kind_name(int kind) { return kind >= 0 && kind < 3 ? stage_kinds[kind] : "?"; }
const char *m1c_decay_name(int decay) { return decay >= 0 && decay < 3 ? decays[decay] : "?"; }
const char *m1c_head_precision_name(int p) { return p >= 0 && p < 4 ? precisions[p] : "?"; }

static int choice_index(const char *const *choices, const char *v) {
    for (int i = 0; choices[i]; i++)
        if (!strcmp(choices[i], v)) return i;
    return -1;
}

/* A getter call that returns M1C_ERR from the enclosing function on failure. */
#define TRY(x)                                                                                                    \
    do {                                                                                                          \
        if ((x) != M1C_OK) return M1C_ERR;                                                                        \
    } while (0)

static int get_int(m1c_settings *s, const char *key, int64_t def, int64_t lo, int64_t hi, int *out, m1c_err *e) {
    int64_t v;
    TRY(m1c_cfg_int(s, key, M1C_OPTIONAL, def, lo, hi, &v, e));
    *out = (int)v;
    return M1C_OK;
}

static int get_choice(m1c_settings *s, const char *key, const char *def, const char *const *choices, int *out,
                      m1c_err *e) {
    const char *v;
    TRY(m1c_cfg_string(s, key, M1C_OPTIONAL, def, choices, &v, e));
    *out = choice_index(choices, v);
    return M1C_OK;
}

/* A plugin slot `key` of parent: a group whose `plugin` names the plugin (def: the plugin when the
 * key is absent; NULL: the group and its `plugin` are required). */
static int read_slot(m1c_settings *parent, const char *key, const char *def, m1c_slot *slot, m1c_err *e) {
    m1c_settings *g = m1c_cfg_group(parent, key, def ? M1C_OPTIONAL : M1C_REQUIRED, e);
    if (!g) return M1C_ERR;
    TRY(m1c_cfg_string(g, "plugin", def ? M1C_OPTIONAL : M1C_REQUIRED, def, NULL, &slot->plugin, e));
    if (!slot->plugin[0]) return m1c_cfg_fail(g, "plugin", -1, e, "empty plugin name");
    slot->settings = g;
    return M1C_OK;
}

/* ---- model ---------------------------------------------------------------------------------- */

static int read_type(m1c_layer_type_spec *t, m1c_settings *types, const char *name, m1c_err *e) {
    t->name = name;
    t->first_layer = -1;
    t->settings = m1c_cfg_group(types, name, M1C_REQUIRED, e);
    if (!t->settings) return M1C_ERR;
    TRY(read_slot(t->settings, "attention", NULL, &t->attention, e));
    TRY(m1c_cfg_float(t->settings, "alpha", M1C_OPTIONAL, 1.0, 0.0, 1e6, &t->alpha, e));
    TRY(m1c_cfg_float(t->settings, "beta", M1C_OPTIONAL, 1.0, 0.0, 1e6, &t->beta, e));
    return m1c_cfg_done(t->settings, e);
}

/* The layer stack from `pattern` (repeated to L layers) or `stack` (exactly L entries). */
static int read_stack(m1c_model_spec *m, m1c_settings *s, m1c_err *e) {
    int has_p = m1c_cfg_has(s, "pattern"), has_s = m1c_cfg_has(s, "stack");
    if (has_p == has_s)
        return m1c_cfg_fail(s, has_p ? "stack" : NULL, -1, e,
                            has_p ? "give either pattern or stack, not both"
                                  : "give the layer types: pattern = [...] (repeated to `layers`) or stack = [...] "
                                    "(one type per layer)");
    const char *key = has_p ? "pattern" : "stack";
    int n = m1c_cfg_len(s, key);
    if (n <= 0) return m1c_cfg_fail(s, key, -1, e, "empty list");
    if (has_s && n != m->n_layers)
        return m1c_cfg_fail(s, key, -1, e, "%d types for %d layers (model.layers): give exactly one per layer", n,
                            m->n_layers);
    if (has_p && n > m->n_layers)
        return m1c_cfg_fail(s, key, -1, e, "the pattern (%d types) is longer than the stack (%d layers)", n,
                            m->n_layers);
    const char **names = m1c_xcalloc((size_t)m->n_types + 1, sizeof *names);
    for (int i = 0; i < m->n_types; i++) names[i] = m->types[i].name;
    int *idx = m1c_xcalloc((size_t)n, sizeof *idx);
    int rc = M1C_OK;
    for (int i = 0; i < n && rc == M1C_OK; i++) {
        const char *v;
        rc = m1c_cfg_list_string_choice(s, key, i, names, &v, e);
        if (rc == M1C_OK) idx[i] = choice_index(names, v);
    }
    if (rc == M1C_OK) {
        m->layer_type = m1c_xcalloc((size_t)m->n_layers, sizeof *m->layer_type);
        for (int l = 0; l < m->n_layers; l++) {
            m1c_layer_type_spec *t = &m->types[m->layer_type[l] = idx[l % n]];
            if (!t->n_used++) t->first_layer = l;
        }
        /* An unused type is a warning, not an error: ablations switch the pattern with -s and keep
         * the other definitions. */
        for (int i = 0; i < m->n_types; i++)
            if (!m->types[i].n_used) {
                char loc[512];
                m1c_cfg_where(m->types[i].settings, NULL, loc, sizeof loc);
                M1C_WARN("%s: %s: type not used by the stack", loc, m1c_cfg_path(m->types[i].settings));
            }
    }
    free(idx);
    free(names);
    return rc;
}

int m1c_model_spec_read(m1c_model_spec *m, m1c_settings *s, m1c_err *e) {
    memset(m, 0, sizeof *m);
    m->settings = s;
    TRY(m1c_cfg_int(s, "vocab_size", M1C_OPTIONAL, 0, 0, 1 << 24, &m->vocab_size, e));
    TRY(get_int(s, "hidden", 256, 1, 1 << 16, &m->hidden, e));
    TRY(get_int(s, "layers", 8, 1, 4096, &m->n_layers, e));
    TRY(m1c_cfg_float(s, "norm_eps", M1C_OPTIONAL, 1e-5, 1e-12, 1.0, &m->norm_eps, e));
    TRY(m1c_cfg_float(s, "init_std", M1C_OPTIONAL, 0.02, 0.0, 10.0, &m->init_std, e));
    TRY(m1c_cfg_bool(s, "tie_embeddings", M1C_OPTIONAL, 0, &m->tie_embeddings, e));
    TRY(get_choice(s, "head_precision", "fp32", precisions, &m->head_precision, e));

    m1c_settings *types = m1c_cfg_group(s, "types", M1C_REQUIRED, e);
    if (!types) return M1C_ERR;
    m->n_types = m1c_cfg_n_keys(types);
    if (m->n_types == 0) return m1c_cfg_fail(types, NULL, -1, e, "define at least one layer type");
    m->types = m1c_xcalloc((size_t)m->n_types, sizeof *m->types);
    for (int i = 0; i < m->n_types; i++) TRY(read_type(&m->types[i], types, m1c_cfg_key(types, i), e));
    TRY(read_stack(m, s, e));

    TRY(read_slot(s, "ffn", NULL, &m->ffn, e));
    TRY(m1c_cfg_float(s, "ffn_alpha", M1C_OPTIONAL, 1.0, 0.0, 1e6, &m->ffn_alpha, e));
    TRY(m1c_cfg_float(s, "ffn_beta", M1C_OPTIONAL, 1.0, 0.0, 1e6, &m->ffn_beta, e));
    return m1c_cfg_done(s, e);
}

void m1c_model_spec_free(m1c_model_spec *m) {
    free(m->types);
    free(m->layer_type);
    memset(m, 0, sizeof *m);
}

/* ---- run ------------------------------------------------------------------------------------ */

/* `data`: one slot group, or a list of slot groups each with a `weight` (read here, by the core). */
static int read_data(m1c_stage_spec *st, m1c_settings *s, m1c_err *e) {
    int n = m1c_cfg_len(s, "data");
    if (n <= 0) {
        st->n_data = 1;
        st->data = m1c_xcalloc(1, sizeof *st->data);
        st->data_weight = m1c_xcalloc(1, sizeof *st->data_weight);
        st->data_weight[0] = 1.0;
        return read_slot(s, "data", NULL, &st->data[0], e);
    }
    st->n_data = n;
    st->data = m1c_xcalloc((size_t)n, sizeof *st->data);
    st->data_weight = m1c_xcalloc((size_t)n, sizeof *st->data_weight);
    double total = 0;
    for (int i = 0; i < n; i++) {
        m1c_settings *g = m1c_cfg_elem(s, "data", i);
        if (!g) return m1c_cfg_fail(s, "data", i, e, "expected a data source group { plugin = ...; weight = ...; }");
        TRY(m1c_cfg_string(g, "plugin", M1C_REQUIRED, NULL, NULL, &st->data[i].plugin, e));
        if (!st->data[i].plugin[0]) return m1c_cfg_fail(g, "plugin", -1, e, "empty plugin name");
        TRY(m1c_cfg_float(g, "weight", M1C_OPTIONAL, 1.0, 0.0, 1e9, &st->data_weight[i], e));
        st->data[i].settings = g;
        total += st->data_weight[i];
    }
    if (total <= 0) return m1c_cfg_fail(s, "data", -1, e, "the weights of the data sources sum to 0");
    return M1C_OK;
}

static int read_stage(m1c_stage_spec *st, m1c_settings *s, const m1c_run_spec *r, m1c_err *e) {
    st->settings = s;
    TRY(get_choice(s, "kind", "pretrain", stage_kinds, &st->kind, e));
    TRY(m1c_cfg_string(s, "name", M1C_OPTIONAL, stage_kinds[st->kind], NULL, &st->name, e));
    if (!st->name[0]) return m1c_cfg_fail(s, "name", -1, e, "empty stage name");
    TRY(m1c_cfg_int(s, "steps", M1C_REQUIRED, 0, 1, INT64_C(1) << 40, &st->steps, e));
    TRY(get_int(s, "batch", 8, 1, 1 << 20, &st->batch, e));
    TRY(get_int(s, "seq_len", 256, 1, 1 << 24, &st->seq_len, e));
    int64_t seed;
    TRY(m1c_cfg_int(s, "seed", M1C_OPTIONAL, (int64_t)r->seed, 0, INT64_MAX, &seed, e));
    st->seed = (uint64_t)seed;
    TRY(get_choice(s, "device", devices[r->device], devices, &st->device, e));

    TRY(read_data(st, s, e));
    TRY(read_slot(s, "objective", st->kind == M1C_STAGE_RL ? "cispo" : "xent", &st->objective, e));
    TRY(read_slot(s, "optimizer", "adamw", &st->optimizer, e));

    m1c_settings *g = m1c_cfg_group(s, "schedule", M1C_OPTIONAL, e);
    if (!g) return M1C_ERR;
    m1c_schedule_spec *sc = &st->schedule;
    TRY(m1c_cfg_float(g, "lr", M1C_OPTIONAL, 1e-3, 0.0, 10.0, &sc->lr, e));
    TRY(m1c_cfg_float(g, "min_lr", M1C_OPTIONAL, 0.1 * sc->lr, 0.0, sc->lr, &sc->min_lr, e));
    /* not capped at steps: `-s run.stages.0.steps=5` on a config with warmup = 50 stays valid (the
     * rate then never reaches its peak) */
    TRY(m1c_cfg_int(g, "warmup", M1C_OPTIONAL, 0, 0, INT64_C(1) << 40, &sc->warmup, e));
    TRY(get_choice(g, "decay", "cosine", decays, &sc->decay, e));
    TRY(m1c_cfg_float(g, "clip", M1C_OPTIONAL, 1.0, 0.0, 1e9, &sc->clip, e));
    TRY(m1c_cfg_done(g, e));

    if (!(g = m1c_cfg_group(s, "eval", M1C_OPTIONAL, e))) return M1C_ERR;
    TRY(m1c_cfg_int(g, "every", M1C_OPTIONAL, 100, 0, INT64_C(1) << 40, &st->eval_every, e));
    TRY(get_int(g, "batches", 8, 1, 1 << 20, &st->eval_batches, e));
    TRY(m1c_cfg_done(g, e));

    if (!(g = m1c_cfg_group(s, "checkpoint", M1C_OPTIONAL, e))) return M1C_ERR;
    TRY(m1c_cfg_int(g, "every", M1C_OPTIONAL, 0, 0, INT64_C(1) << 40, &st->checkpoint_every, e));
    TRY(get_int(g, "keep", 2, 0, 1 << 20, &st->checkpoint_keep, e));
    TRY(m1c_cfg_done(g, e));

    if (!(g = m1c_cfg_group(s, "metrics", M1C_OPTIONAL, e))) return M1C_ERR;
    TRY(m1c_cfg_int(g, "every", M1C_OPTIONAL, 1, 1, INT64_C(1) << 40, &st->metrics_every, e));
    TRY(m1c_cfg_done(g, e));

    if (st->kind == M1C_STAGE_RL) { /* the group exists only for RL: elsewhere it is an unknown key */
        if (!(g = m1c_cfg_group(s, "rollout", M1C_OPTIONAL, e))) return M1C_ERR;
        TRY(get_int(g, "group", 8, 1, 4096, &st->rollout_group, e));
        TRY(m1c_cfg_float(g, "temperature", M1C_OPTIONAL, 1.0, 1e-3, 100.0, &st->rollout_temperature, e));
        TRY(m1c_cfg_done(g, e));
        if (st->batch % st->rollout_group)
            return m1c_cfg_fail(s, "batch", -1, e, "%d sequences is not a whole number of groups of %d (rollout.group)",
                                st->batch, st->rollout_group);
    }
    return m1c_cfg_done(s, e);
}

/* "runs/<config file name without .cfg>" */
static char *default_out_dir(const m1c_config *c) {
    const char *f = m1c_config_file(c), *slash = strrchr(f, '/');
    char *stem = m1c_xstrdup(slash ? slash + 1 : f);
    char *dot = strrchr(stem, '.');
    if (dot && dot != stem) *dot = 0;
    char *out = m1c_xasprintf("runs/%s", stem[0] && stem[0] != '<' ? stem : "default");
    free(stem);
    return out;
}

int m1c_run_spec_read(m1c_run_spec *r, m1c_settings *s, m1c_err *e) {
    memset(r, 0, sizeof *r);
    r->settings = s;
    int64_t seed;
    TRY(m1c_cfg_int(s, "seed", M1C_OPTIONAL, 1234, 0, INT64_MAX, &seed, e));
    r->seed = (uint64_t)seed;
    TRY(get_choice(s, "device", "cpu", devices, &r->device, e));
    TRY(get_int(s, "threads", 0, 0, 4096, &r->threads, e));
    TRY(get_choice(s, "precision", "fp32", precisions_run, &r->precision, e));
    if (r->precision != 0 && r->device == M1C_DEVICE_CPU)
        return m1c_cfg_fail(s, "precision", -1, e, "\"bf16\" needs device = \"cuda\": the CPU computes in fp32");
    TRY(m1c_cfg_float(s, "peak_tflops", M1C_OPTIONAL, 0.0, 0.0, 1e6, &r->peak_tflops, e));
    char *def_out = default_out_dir(m1c_cfg_config(s));
    int rc = m1c_cfg_string(s, "out_dir", M1C_OPTIONAL, def_out, NULL, &r->out_dir, e);
    free(def_out);
    TRY(rc);
    if (!r->out_dir[0]) return m1c_cfg_fail(s, "out_dir", -1, e, "empty path");

    int n = m1c_cfg_len(s, "stages");
    if (n < 0) return m1c_cfg_fail(s, "stages", -1, e, "required key is missing (a list of stages: ( { ... }, ... ))");
    /* stages = (): an inference-only configuration (import-hf writes one for a Hugging Face model);
     * the commands that need a stage (train, ablate, generate --prompt) refuse it. */
    r->n_stages = n;
    r->stages = m1c_xcalloc((size_t)(n > 0 ? n : 1), sizeof *r->stages);
    for (int i = 0; i < n; i++) {
        m1c_settings *g = m1c_cfg_elem(s, "stages", i);
        if (!g) return m1c_cfg_fail(s, "stages", i, e, "expected a stage group { ... }");
        TRY(read_stage(&r->stages[i], g, r, e));
        for (int j = 0; j < i; j++)
            if (!strcmp(r->stages[j].name, r->stages[i].name))
                return m1c_cfg_fail(g, "name", -1, e, "stage name \"%s\" is also the name of stage %d",
                                    r->stages[i].name, j);
    }
    return m1c_cfg_done(s, e);
}

void m1c_run_spec_free(m1c_run_spec *r) {
    for (int i = 0; r->stages && i < r->n_stages; i++) {
        free(r->stages[i].data);
        free(r->stages[i].data_weight);
    }
    free(r->stages);
    memset(r, 0, sizeof *r);
}

int m1c_spec_read(m1c_spec *spec, m1c_config *c, m1c_err *e) {
    memset(spec, 0, sizeof *spec);
    spec->config = c;
    m1c_settings *root = m1c_config_root(c);
    m1c_settings *model = m1c_cfg_group(root, "model", M1C_REQUIRED, e);
    if (!model || m1c_model_spec_read(&spec->model, model, e)) goto fail;
    m1c_settings *run = m1c_cfg_group(root, "run", M1C_REQUIRED, e);
    if (!run || m1c_run_spec_read(&spec->run, run, e)) goto fail;
    if (m1c_cfg_done(root, e)) goto fail;
    return M1C_OK;
fail:
    m1c_spec_free(spec);
    return M1C_ERR;
}

void m1c_spec_free(m1c_spec *spec) {
    m1c_model_spec_free(&spec->model);
    m1c_run_spec_free(&spec->run);
}

/* ---- plugin validation ---------------------------------------------------------------------- */

/* The error of a failed create: a settings error already reads "file:line: key: ..." and stays as
 * it is; the plugin's own messages get the slot's location and the plugin's name in front. */
static int create_failed(m1c_plugin *p, m1c_slot *slot, m1c_err *e) {
    const char *last = m1c_config_last_error(m1c_cfg_config(slot->settings));
    if (p->error[0] && !strcmp(p->error, last)) {
        m1c_fail(e, "%s", p->error);
        p->error[0] = 0;
        return M1C_ERR;
    }
    m1c_err pe;
    m1c_plugin_fail(p, &pe, "create");
    return m1c_cfg_fail(slot->settings, NULL, -1, e, "%s", pe.msg);
}

static int load_slot(m1c_registry *reg, const m1c_config *c, m1c_slot *slot, int kind, m1c_plugin **p,
                     m1c_err *e) {
    m1c_err le;
    if (m1c_registry_load(reg, slot->plugin, m1c_config_dir(c), kind, p, &le))
        return m1c_cfg_fail(slot->settings, "plugin", -1, e, "%s", le.msg);
    return M1C_OK;
}

/* After a successful create, keys the plugin never read are typos even if it forgot settings_done. */
static int slot_done(m1c_slot *slot, m1c_err *e) {
    m1c_cfg_touch(slot->settings, "plugin");
    return m1c_cfg_done_all(slot->settings, e);
}

static int check_layer(m1c_registry *reg, m1c_spec *spec, m1c_slot *slot, int kind, int layer, m1c_err *e) {
    m1c_plugin *p;
    TRY(load_slot(reg, spec->config, slot, kind, &p, e));
    const m1c_layer_ops *ops = kind == M1C_KIND_ATTENTION ? &M1C_ATTENTION(p)->ops : &M1C_MOE(p)->ops;
    m1c_layer_info info = {0};
    info.size = sizeof info;
    info.layer_index = layer;
    info.n_layers = spec->model.n_layers;
    info.hidden = spec->model.hidden;
    info.device = M1C_DEVICE_CPU; /* validation only: no device memory needed */
    info.seed = spec->run.seed;
    void *self = NULL;
    p->error[0] = 0;
    if (ops->create(&p->host, slot->settings, &info, &self)) return create_failed(p, slot, e);
    ops->destroy(self);
    return slot_done(slot, e);
}

static int check_simple(m1c_registry *reg, m1c_spec *spec, m1c_slot *slot, int kind, m1c_err *e) {
    m1c_plugin *p;
    TRY(load_slot(reg, spec->config, slot, kind, &p, e));
    void *self = NULL;
    p->error[0] = 0;
    if (kind == M1C_KIND_OPTIMIZER) {
        if (M1C_OPTIMIZER(p)->create(&p->host, slot->settings, &self)) return create_failed(p, slot, e);
        M1C_OPTIMIZER(p)->destroy(self);
    } else {
        if (M1C_OBJECTIVE(p)->create(&p->host, slot->settings, &self)) return create_failed(p, slot, e);
        M1C_OBJECTIVE(p)->destroy(self);
    }
    return slot_done(slot, e);
}

static int check_data(m1c_registry *reg, m1c_spec *spec, m1c_stage_spec *st, m1c_slot *slot, int32_t specials[4],
                      m1c_err *e) {
    m1c_plugin *p;
    TRY(load_slot(reg, spec->config, slot, M1C_KIND_DATA, &p, e));
    m1c_data_info info = {0};
    info.size = sizeof info;
    info.rank = 0;
    info.world = 1;
    info.seed = st->seed;
    info.base_dir = m1c_config_dir(spec->config);
    void *self = NULL;
    p->error[0] = 0;
    if (M1C_DATA(p)->create(&p->host, slot->settings, &info, &self)) return create_failed(p, slot, e);
    int32_t V = 0, bos, eos, pad;
    int rc = M1C_DATA(p)->vocab(self, &V, &bos, &eos, &pad);
    M1C_DATA(p)->destroy(self);
    if (rc) return create_failed(p, slot, e);
    /* The sources of a mixture share one tokenizer: same size and special tokens. */
    int32_t mine[4] = {V, bos, eos, pad};
    if (specials[0] < 0) {
        memcpy(specials, mine, sizeof mine);
    } else if (memcmp(specials, mine, sizeof mine)) {
        return m1c_cfg_fail(slot->settings, NULL, -1, e,
                            "plugin '%s': its tokenizer (%d tokens, bos %d, eos %d, pad %d) differs from the stage's "
                            "first data source (%d tokens, bos %d, eos %d, pad %d)",
                            slot->plugin, V, bos, eos, pad, specials[0], specials[1], specials[2], specials[3]);
    }
    m1c_model_spec *m = &spec->model;
    if (m->vocab_size == 0) {
        m->vocab_size = V; /* the first stage's tokenizer sizes the model */
    } else if (V > m->vocab_size) {
        return m1c_cfg_fail(slot->settings, NULL, -1, e,
                            "the tokenizer of plugin '%s' has %d tokens, more than model.vocab_size %lld",
                            slot->plugin, (int)V, (long long)m->vocab_size);
    }
    return slot_done(slot, e);
}

int m1c_spec_check_plugins(m1c_spec *spec, m1c_registry *reg, m1c_err *e) {
    m1c_model_spec *m = &spec->model;
    for (int i = 0; i < m->n_types; i++) {
        m1c_layer_type_spec *t = &m->types[i];
        TRY(check_layer(reg, spec, &t->attention, M1C_KIND_ATTENTION, t->first_layer < 0 ? 0 : t->first_layer, e));
    }
    TRY(check_layer(reg, spec, &m->ffn, M1C_KIND_MOE, 0, e));
    for (int i = 0; i < spec->run.n_stages; i++) {
        m1c_stage_spec *st = &spec->run.stages[i];
        int32_t specials[4] = {-1, -1, -1, -1};
        for (int k = 0; k < st->n_data; k++) TRY(check_data(reg, spec, st, &st->data[k], specials, e));
        TRY(check_simple(reg, spec, &st->objective, M1C_KIND_OBJECTIVE, e));
        TRY(check_simple(reg, spec, &st->optimizer, M1C_KIND_OPTIMIZER, e));
    }
    return M1C_OK;
}
