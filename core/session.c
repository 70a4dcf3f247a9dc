/* Sessions: config -> spec -> plugins -> model, shared by train, generate, plan and logits. */
#include "session.h"

#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "host.h"

static int finish_open(m1c_session *s, m1c_err *e) {
    if (m1c_spec_read(&s->spec, s->cfg, e)) return M1C_ERR;
    s->have_spec = 1;
    m1c_registry_init(&s->reg);
    if (m1c_spec_check_plugins(&s->spec, &s->reg, e)) return M1C_ERR;
    m1c_set_threads(s->spec.run.threads);
    return M1C_OK;
}

int m1c_session_open(m1c_session *s, const char *config_path, const char *const *overrides, int n_overrides,
                     m1c_err *e) {
    memset(s, 0, sizeof *s);
    if (m1c_config_load(&s->cfg, config_path, overrides, n_overrides, e)) return M1C_ERR;
    return finish_open(s, e);
}

int m1c_session_open_text(m1c_session *s, const char *text, const char *name, const char *dir,
                          const char *const *overrides, int n_overrides, m1c_err *e) {
    memset(s, 0, sizeof *s);
    if (m1c_config_parse(&s->cfg, text, name, dir, overrides, n_overrides, e)) return M1C_ERR;
    return finish_open(s, e);
}

int m1c_session_build_model(m1c_session *s, uint64_t seed, m1c_err *e) {
    const m1c_model_spec *ms = &s->spec.model;
    const char *base = m1c_config_dir(s->cfg);
    m1c_plugin *ffn = NULL;
    if (m1c_registry_load(&s->reg, ms->ffn.plugin, base, M1C_KIND_MOE, &ffn, e)) return M1C_ERR;
    s->layer_defs = m1c_xcalloc((size_t)ms->n_layers, sizeof *s->layer_defs);
    for (int l = 0; l < ms->n_layers; l++) {
        const m1c_layer_type_spec *ty = &ms->types[ms->layer_type[l]];
        m1c_layer_def *d = &s->layer_defs[l];
        d->type = ty->name;
        if (m1c_registry_load(&s->reg, ty->attention.plugin, base, M1C_KIND_ATTENTION, &d->attn, e)) return M1C_ERR;
        d->attn_settings = ty->attention.settings;
        d->ffn = ffn;
        d->ffn_settings = ms->ffn.settings;
        d->alpha_attn = (float)ty->alpha, d->beta_attn = (float)ty->beta;
        d->alpha_ffn = (float)ms->ffn_alpha, d->beta_ffn = (float)ms->ffn_beta;
    }
    m1c_model_def def = {.vocab = (int)ms->vocab_size, .hidden = ms->hidden, .layers = ms->n_layers,
                         .norm_eps = (float)ms->norm_eps, .init_std = (float)ms->init_std,
                         .tie_embeddings = ms->tie_embeddings, .device = s->spec.run.device,
                         .head_precision = ms->head_precision,
                         .compute_dtype = s->spec.run.precision ? M1C_BF16 : M1C_F32, .layer = s->layer_defs};
    if (m1c_model_build(&s->model, &def, e)) return M1C_ERR;
    s->have_model = 1;
    m1c_model_init_params(&s->model, seed);
    return M1C_OK;
}

void m1c_session_close(m1c_session *s) {
    if (s->have_model) m1c_model_free(&s->model);
    free(s->layer_defs);
    if (s->have_spec) {
        m1c_spec_free(&s->spec);
        m1c_registry_free(&s->reg);
    }
    if (s->cfg) m1c_config_free(s->cfg);
    memset(s, 0, sizeof *s);
}

int m1c_session_open_checkpoint(m1c_session *s, const char *dir, const char *const *overrides, int n_overrides,
                                m1c_err *e) {
    memset(s, 0, sizeof *s);
    char *text = m1c_ckpt_config_text(dir, e);
    if (!text) return M1C_ERR;
    char *name = m1c_path_join(dir, "m1c.cfg");
    int rc = m1c_session_open_text(s, text, name, dir, overrides, n_overrides, e);
    free(name);
    free(text);
    if (!rc) rc = m1c_session_build_model(s, 0, e);
    if (!rc) rc = m1c_ckpt_load_params(dir, &s->model, e);
    return rc;
}
