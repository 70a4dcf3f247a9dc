/* Model arithmetic from plugin declarations: counts, FLOPs and memory without allocating weights. */
#include "plan.h"

#include <stdlib.h>
#include <string.h>

static int64_t spec_numel(const m1c_buf_spec *s, int n, int64_t *bytes) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        int64_t k = 1;
        for (int d = 0; d < s[i].ndim; d++) k *= s[i].shape[d];
        total += k;
        if (bytes) *bytes += k * (s[i].dtype == M1C_BF16 ? 2 : 4);
    }
    return total;
}

typedef int (*declare_fn)(void *self, int B, int T, m1c_buf_spec *specs, int max);

/* Elements declared by a buffer function (params: B and T ignored). */
static int64_t declared(void *self, declare_fn fn, int B, int T, int64_t *bytes) {
    int n = fn(self, B, T, NULL, 0);
    if (n <= 0) return n < 0 ? -1 : 0;
    m1c_buf_spec *s = m1c_xcalloc((size_t)n, sizeof *s);
    int64_t k = fn(self, B, T, s, n) == n ? spec_numel(s, n, bytes) : -1;
    free(s);
    return k;
}

/* Elements of the parameters an instance declares. */
static int64_t param_count(const m1c_layer_ops *ops, void *self) {
    int n = ops->params(self, NULL, 0);
    if (n <= 0) return n < 0 ? -1 : 0;
    m1c_buf_spec *s = m1c_xcalloc((size_t)n, sizeof *s);
    int64_t k = ops->params(self, s, n) == n ? spec_numel(s, n, NULL) : -1;
    free(s);
    return k;
}

int m1c_plan_compute(m1c_session *s, int64_t context, m1c_plan *p, m1c_err *e) {
    memset(p, 0, sizeof *p);
    const m1c_model_spec *ms = &s->spec.model;
    const m1c_run_spec *rs = &s->spec.run;
    int64_t V = ms->vocab_size, H = ms->hidden, L = ms->n_layers;
    const char *base = m1c_config_dir(s->cfg);
    p->batch = rs->n_stages ? rs->stages[0].batch : 1;
    p->seq_len = rs->n_stages ? rs->stages[0].seq_len : 1;
    p->context = context > 0 ? context : p->seq_len;
    int B = p->batch, T = p->seq_len;
    int64_t N = (int64_t)B * T;
    double act_bytes = 0, scratch_max = 0;

    m1c_plugin *ffn = NULL;
    if (m1c_registry_load(&s->reg, ms->ffn.plugin, base, M1C_KIND_MOE, &ffn, e)) return M1C_ERR;
    p->ffn_plugin = ffn->desc->name;
    p->n_types = ms->n_types;
    p->types = m1c_xcalloc((size_t)ms->n_types, sizeof *p->types);
    for (int t = 0; t < ms->n_types; t++) p->types[t].name = ms->types[t].name;

    for (int l = 0; l < L; l++) {
        const m1c_layer_type_spec *ty = &ms->types[ms->layer_type[l]];
        m1c_plan_type *pt = &p->types[ms->layer_type[l]];
        m1c_plugin *ap = NULL;
        if (m1c_registry_load(&s->reg, ty->attention.plugin, base, M1C_KIND_ATTENTION, &ap, e)) return M1C_ERR;
        m1c_layer_info info = {sizeof info, l, (int)L, (int)H, M1C_DEVICE_CPU, 0, 0, {0}};
        const m1c_attention_vtable *av = M1C_ATTENTION(ap);
        const m1c_moe_vtable *fv = M1C_MOE(ffn);
        void *a = NULL, *f = NULL;
        if (av->ops.create(&ap->host, ty->attention.settings, &info, &a)) return m1c_plugin_fail(ap, e, "create");
        if (fv->ops.create(&ffn->host, ms->ffn.settings, &info, &f)) {
            av->ops.destroy(a);
            return m1c_plugin_fail(ffn, e, "create");
        }
        int64_t ap_n = param_count(&av->ops, a);
        int64_t abytes = 0, fbytes = 0, sa = 0, sf = 0;
        declared(a, av->ops.acts, B, T, &abytes);
        declared(f, fv->ops.acts, B, T, &fbytes);
        declared(a, av->ops.scratch, B, T, &sa);
        declared(f, fv->ops.scratch, B, T, &sf);
        act_bytes += (double)abytes + (double)fbytes;
        if ((double)sa > scratch_max) scratch_max = (double)sa;
        if ((double)sf > scratch_max) scratch_max = (double)sf;
        pt->attention_plugin = ap->desc->name;
        pt->layers++;
        pt->attn_params = ap_n;
        pt->norm_params = 2 * H;
        pt->attn_flops = av->flops ? av->flops(a, p->context) : 0;
        int64_t tot = 0, act = 0;
        double ff = 0;
        if (fv->count && fv->count(f, &tot, &act, &ff) == M1C_OK) {
            p->ffn_params = tot, p->ffn_active = act, p->ffn_flops = ff;
        } else {
            p->ffn_params = p->ffn_active = param_count(&fv->ops, f);
            p->ffn_flops = 2.0 * (double)p->ffn_active;
        }
        av->ops.destroy(a);
        fv->ops.destroy(f);
        if (ap_n < 0) return m1c_fail(e, "plugin '%s': params declaration failed", ap->desc->name);
    }
    p->embed_params = V * H;
    p->head_params = ms->tie_embeddings ? 0 : V * H;
    p->final_norm_params = H;
    int64_t layers_total = 0, layers_active = 0;
    double flops = 0;
    for (int t = 0; t < p->n_types; t++) {
        m1c_plan_type *pt = &p->types[t];
        layers_total += pt->layers * (pt->attn_params + pt->norm_params + p->ffn_params);
        layers_active += pt->layers * (pt->attn_params + pt->norm_params + p->ffn_active);
        flops += pt->layers * (pt->attn_flops + p->ffn_flops);
    }
    p->total_nonembed = layers_total + p->final_norm_params;
    p->active_nonembed = layers_active + p->final_norm_params;
    p->total_params = p->total_nonembed + p->embed_params + p->head_params;
    p->active_params = p->active_nonembed + p->embed_params + p->head_params;
    p->flops_forward = flops + 2.0 * (double)H * (double)V; /* LM head; the embedding is a lookup */
    p->flops_train = 3.0 * p->flops_forward;

    /* Memory (f32): parameters, gradients, optimizer state (from the first stage's optimizer),
     * activations (the core's per-layer tensors and the plugins' declarations), scratch. */
    p->mem_params = 4.0 * (double)p->total_params;
    p->mem_grads = p->mem_params;
    if (rs->n_stages) {
        m1c_plugin *op = NULL;
        void *o = NULL;
        const char *names[16];
        if (m1c_registry_load(&s->reg, rs->stages[0].optimizer.plugin, base, M1C_KIND_OPTIMIZER, &op, e))
            return M1C_ERR;
        if (M1C_OPTIMIZER(op)->create(&op->host, rs->stages[0].optimizer.settings, &o))
            return m1c_plugin_fail(op, e, "create");
        p->optimizer_states = M1C_OPTIMIZER(op)->state(o, names, 16);
        M1C_OPTIMIZER(op)->destroy(o);
    }
    p->mem_optimizer = p->optimizer_states * p->mem_params;
    double core_acts = 4.0 * ((double)(L + 1) * N * H + (double)L * (3.0 * N * H + 2.0 * N) + (double)N * H +
                              (double)N * V + 6.0 * N + 3.0 * N * H);
    p->mem_activations = act_bytes + core_acts + scratch_max;
    p->mem_total = p->mem_params + p->mem_grads + p->mem_optimizer + p->mem_activations;
    return M1C_OK;
}

void m1c_plan_free(m1c_plan *p) {
    free(p->types);
    memset(p, 0, sizeof *p);
}
