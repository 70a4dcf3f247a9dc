/* Model arithmetic from plugin declarations: counts, FLOPs against context and memory per GPU, without
 * allocating weights (plugin instances are created only to ask for their declarations). docs/plan.md
 * describes what is counted and what is not. */
#include "plan.h"

#include <stdlib.h>
#include <string.h>

const int64_t m1c_plan_default_contexts[] = {1024, 8192, 65536, 131072, 1048576};
const int m1c_plan_n_default_contexts = (int)(sizeof m1c_plan_default_contexts / sizeof m1c_plan_default_contexts[0]);

static const char *const precision_names[] = {"fp32", "bf16-mixed"};

const char *m1c_precision_name(int precision) {
    return precision >= 0 && precision < 2 ? precision_names[precision] : "?";
}

int m1c_precision_parse(const char *name, int *precision) {
    for (int i = 0; i < 2; i++)
        if (!strcmp(name, precision_names[i])) return *precision = i, M1C_OK;
    return M1C_ERR;
}

/* Elements of n specs, and their bytes with f32 buffers at f32_bytes each (bf16 2, i32 4). */
static int64_t spec_numel(const m1c_buf_spec *s, int n, int f32_bytes, double *bytes) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        int64_t k = 1;
        for (int d = 0; d < s[i].ndim; d++) k *= s[i].shape[d];
        total += k;
        int b = s[i].dtype == M1C_BF16 ? 2 : s[i].dtype == M1C_I32 ? 4 : f32_bytes;
        if (bytes) *bytes += (double)k * b;
    }
    return total;
}

typedef int (*declare_fn)(void *self, int B, int T, m1c_buf_spec *specs, int max);

/* Bytes of the buffers a declaration function asks for (B x T tokens); -1 if the plugin fails. */
static double declared_bytes(void *self, declare_fn fn, int B, int T, int f32_bytes) {
    int n = fn(self, B, T, NULL, 0);
    if (n <= 0) return n < 0 ? -1 : 0;
    m1c_buf_spec *s = m1c_xcalloc((size_t)n, sizeof *s);
    double bytes = 0;
    if (fn(self, B, T, s, n) == n) spec_numel(s, n, f32_bytes, &bytes);
    else bytes = -1;
    free(s);
    return bytes;
}

/* Parameter elements an instance declares; with `experts`, also those of its 3-D tensors (a mixture's
 * stacked experts, experts first as in HF's layout) and their leading dimension. -1 on failure. */
static int64_t param_count(const m1c_layer_ops *ops, void *self, int64_t *experts, int *n_experts) {
    int n = ops->params(self, NULL, 0);
    if (n <= 0) return n < 0 ? -1 : 0;
    m1c_buf_spec *s = m1c_xcalloc((size_t)n, sizeof *s);
    int64_t k = ops->params(self, s, n) == n ? spec_numel(s, n, 4, NULL) : -1;
    for (int i = 0; k >= 0 && experts && i < n; i++) {
        if (s[i].ndim != 3) continue;
        *experts += spec_numel(&s[i], 1, 4, NULL);
        if (!*n_experts || s[i].shape[0] > *n_experts) *n_experts = (int)s[i].shape[0];
    }
    free(s);
    return k;
}

/* Mean of f(t) over positions t = 1..T (the prefill cost per token of a T-token sequence). Exact for the
 * first MEAN_EXACT positions; beyond them the positions are cut into MEAN_CHUNKS runs, each summed as
 * its length times the mean of its end values: exact wherever f is linear in t, as attention costs are
 * past a block size or two. */
#define MEAN_EXACT 1024
#define MEAN_CHUNKS 1024
static double mean_flops(double (*f)(void *, int64_t), void *self, int64_t T) {
    double sum = 0;
    const int64_t exact = T < MEAN_EXACT ? T : MEAN_EXACT, rest = T - exact;
    for (int64_t t = 1; t <= exact; t++) sum += f(self, t);
    for (int64_t c = 0; rest > 0 && c < MEAN_CHUNKS; c++) {
        int64_t u = exact + 1 + rest * c / MEAN_CHUNKS, v = exact + rest * (c + 1) / MEAN_CHUNKS;
        if (v >= u) sum += (double)(v - u + 1) * 0.5 * (f(self, u) + f(self, v));
    }
    return sum / (double)T;
}

/* What one layer holds, for the memory per stage. */
typedef struct layer_cost {
    int64_t attn, ffn_experts, ffn_other; /* parameter elements */
    double acts, scratch;                 /* bytes of the plugins' activations (kept) and largest scratch */
} layer_cost;

typedef struct type_flops {
    double *at, *avg; /* [n_ctx]: attention FLOPs per token at ctx, mean over a ctx-token sequence */
} type_flops;

static int layer_info_create(m1c_plugin *pl, const m1c_layer_ops *ops, m1c_settings *settings, int l, int L, int H,
                             void **self, m1c_err *e) {
    m1c_layer_info info = {sizeof info, l, L, H, M1C_DEVICE_CPU, 0, 0, 0, 0, {0}};
    pl->error[0] = 0;
    if (ops->create(&pl->host, settings, &info, self)) return m1c_plugin_fail(pl, e, "create");
    return M1C_OK;
}

/* Per type: one instance (at the type's first layer, or layer 0 if no layer uses it) for the per-layer
 * parameter count, the FLOPs at the plan's context and at every context of the list. */
static int plan_types(m1c_session *s, m1c_plan *p, type_flops *tf, m1c_err *e) {
    const m1c_model_spec *ms = &s->spec.model;
    const char *base = m1c_config_dir(s->cfg);
    for (int t = 0; t < ms->n_types; t++) {
        const m1c_layer_type_spec *ty = &ms->types[t];
        m1c_plan_type *pt = &p->types[t];
        m1c_plugin *ap = NULL;
        void *a = NULL;
        if (m1c_registry_load(&s->reg, ty->attention.plugin, base, M1C_KIND_ATTENTION, &ap, e)) return M1C_ERR;
        const m1c_attention_vtable *av = M1C_ATTENTION(ap);
        if (layer_info_create(ap, &av->ops, ty->attention.settings, ty->first_layer < 0 ? 0 : ty->first_layer,
                              ms->n_layers, ms->hidden, &a, e))
            return M1C_ERR;
        pt->attention_plugin = ap->desc->name;
        pt->attn_params = param_count(&av->ops, a, NULL, NULL);
        pt->norm_params = 2 * (int64_t)ms->hidden;
        pt->attn_flops = av->flops ? av->flops(a, p->context) : 0;
        for (int c = 0; c < p->n_ctx; c++) {
            tf[t].at[c] = av->flops ? av->flops(a, p->ctx[c].ctx) : 0;
            tf[t].avg[c] = av->flops ? mean_flops(av->flops, a, p->ctx[c].ctx) : 0;
        }
        av->ops.destroy(a);
        if (pt->attn_params < 0) return m1c_fail(e, "plugin '%s': params declaration failed", ap->desc->name);
    }
    return M1C_OK;
}

/* The layer type compared against: the named one, or the one whose attention FLOPs grow most over the
 * context list (softmax attention, in a hybrid). */
static int pick_baseline(const m1c_plan *p, const type_flops *tf, const char *name, m1c_err *e) {
    if (name) {
        for (int t = 0; t < p->n_types; t++)
            if (!strcmp(p->types[t].name, name)) return t;
        return m1c_fail(e, "--baseline-type: the config has no layer type '%s'", name), -1;
    }
    int best = 0;
    double best_growth = 0;
    for (int t = 0; t < p->n_types; t++) {
        double growth = tf[t].at[p->n_ctx - 1] - tf[t].at[0];
        if (t == 0 || growth > best_growth) best = t, best_growth = growth;
    }
    return best;
}

/* Memory of one GPU of every pipeline stage; see docs/plan.md for the model. */
static void plan_memory(const m1c_session *s, m1c_plan *p, const layer_cost *lc, double kept_extra_last,
                        double core_layer, double core_stage, double work) {
    const m1c_model_spec *ms = &s->spec.model;
    const int L = ms->n_layers;
    const double tp = p->tp, ep = p->ep, dp = p->dp, VH = (double)ms->vocab_size * ms->hidden;
    p->stages = m1c_xcalloc((size_t)p->pp, sizeof *p->stages);
    for (int st = 0; st < p->pp; st++) {
        m1c_plan_stage *g = &p->stages[st];
        const int l0 = (int)((int64_t)st * L / p->pp), l1 = (int)((int64_t)(st + 1) * L / p->pp);
        const int first = st == 0, last = st == p->pp - 1;
        g->stage = st, g->first_layer = l0, g->n_layers = l1 - l0, g->in_flight = p->pp - st;
        double acts = core_stage, scratch = 0;
        for (int l = l0; l < l1; l++) {
            g->w_attention += (double)lc[l].attn / tp;
            g->w_experts += (double)lc[l].ffn_experts / (ep * tp);
            g->w_replicated += (double)lc[l].ffn_other + 2.0 * ms->hidden;
            acts += lc[l].acts / tp + core_layer;
            if (lc[l].scratch / tp > scratch) scratch = lc[l].scratch / tp;
        }
        if (last) g->w_replicated += ms->hidden, acts += kept_extra_last;
        if (first) g->w_embedding = VH / tp;
        /* A tied head is the embedding itself on one stage; across stages the last keeps a copy. */
        if (last && (!ms->tie_embeddings || p->pp > 1)) g->w_head = VH / tp;
        g->params = g->w_attention + g->w_experts + g->w_replicated + g->w_embedding + g->w_head;
        g->mem_params = g->params * p->param_bytes;
        g->mem_grads = g->params * p->grad_bytes;
        /* ZeRO-1: master weights and optimizer state split over the ranks that hold the same
         * parameters: dp for the dense ones, dp / ep for the experts. */
        double opt = p->zero ? (g->params - g->w_experts) / dp + g->w_experts / (dp / ep) : g->params;
        g->mem_master = opt * p->master_bytes;
        g->mem_optimizer = opt * p->optimizer_states * p->state_bytes;
        g->mem_activations = g->in_flight * acts + work + scratch;
        g->mem_total = g->mem_params + g->mem_grads + g->mem_master + g->mem_optimizer + g->mem_activations;
        if (g->mem_total > p->stages[p->worst_stage].mem_total) p->worst_stage = st;
    }
    const m1c_plan_stage *w = &p->stages[p->worst_stage];
    p->mem_params = w->mem_params, p->mem_grads = w->mem_grads, p->mem_master = w->mem_master;
    p->mem_optimizer = w->mem_optimizer, p->mem_activations = w->mem_activations, p->mem_total = w->mem_total;
}

static int plan_layout(m1c_session *s, const m1c_plan_opts *o, m1c_plan *p, m1c_err *e) {
    const m1c_run_spec *rs = &s->spec.run;
    p->tp = o->tp > 0 ? o->tp : 1;
    p->pp = o->pp > 0 ? o->pp : 1;
    p->ep = o->ep > 0 ? o->ep : 1;
    p->dp = o->dp > 0 ? o->dp : p->ep;
    p->zero = o->zero ? 1 : 0;
    p->gpus = p->tp * p->pp * p->dp;
    p->precision = o->precision;
    if (p->precision != M1C_PREC_FP32 && p->precision != M1C_PREC_BF16_MIXED)
        return m1c_fail(e, "--precision: unknown precision %d", p->precision);
    const int bf16 = p->precision == M1C_PREC_BF16_MIXED;
    p->param_bytes = o->param_bytes > 0 ? o->param_bytes : bf16 ? 2 : 4;
    p->grad_bytes = o->grad_bytes > 0 ? o->grad_bytes : bf16 ? 2 : 4;
    p->act_bytes = o->act_bytes > 0 ? o->act_bytes : bf16 ? 2 : 4;
    p->master_bytes = bf16 ? 4 : 0;
    p->state_bytes = 4;
    p->batch = o->micro_batch > 0 ? o->micro_batch : rs->n_stages ? rs->stages[0].batch : 1;
    p->seq_len = o->seq_len > 0 ? o->seq_len : rs->n_stages ? rs->stages[0].seq_len : 1;
    if (p->dp % p->ep)
        return m1c_fail(e, "--ep %d must divide --dp %d: experts are spread over the data-parallel ranks", p->ep,
                        p->dp);
    if (p->pp > s->spec.model.n_layers)
        return m1c_fail(e, "--pp %d: more pipeline stages than the model's %d layers", p->pp, s->spec.model.n_layers);
    if ((double)p->tp * p->pp * p->dp > 1e9) return m1c_fail(e, "the layout has more than 1e9 GPUs");
    return M1C_OK;
}

int m1c_plan_compute(m1c_session *s, int64_t context, m1c_plan *p, m1c_err *e) {
    m1c_plan_opts o = {0};
    o.context = context;
    return m1c_plan_compute_opts(s, &o, p, e);
}

int m1c_plan_compute_opts(m1c_session *s, const m1c_plan_opts *opts, m1c_plan *p, m1c_err *e) {
    static const m1c_plan_opts defaults;
    const m1c_plan_opts *o = opts ? opts : &defaults;
    memset(p, 0, sizeof *p);
    const m1c_model_spec *ms = &s->spec.model;
    const m1c_run_spec *rs = &s->spec.run;
    const int64_t V = ms->vocab_size, H = ms->hidden, L = ms->n_layers;
    const char *base = m1c_config_dir(s->cfg);
    if (plan_layout(s, o, p, e)) return M1C_ERR;
    const int first_seq = rs->n_stages ? rs->stages[0].seq_len : 1;
    p->context = o->context > 0 ? o->context : first_seq;
    const int64_t *ctxs = o->contexts ? o->contexts : m1c_plan_default_contexts;
    p->n_ctx = o->contexts ? o->n_contexts : m1c_plan_n_default_contexts;
    if (p->n_ctx < 1) return m1c_fail(e, "--contexts: the list is empty");
    p->ctx = m1c_xcalloc((size_t)p->n_ctx, sizeof *p->ctx);
    for (int c = 0; c < p->n_ctx; c++) {
        if (ctxs[c] < 1) return m1c_fail(e, "--contexts: %lld is not a positive length", (long long)ctxs[c]);
        p->ctx[c].ctx = ctxs[c];
    }
    p->n_types = ms->n_types;
    p->types = m1c_xcalloc((size_t)ms->n_types, sizeof *p->types);
    for (int t = 0; t < ms->n_types; t++) p->types[t].name = ms->types[t].name;

    /* Attention per type: parameters and FLOPs. */
    type_flops *tf = m1c_xcalloc((size_t)ms->n_types, sizeof *tf);
    double *tfbuf = m1c_xcalloc((size_t)ms->n_types * 2 * (size_t)p->n_ctx, sizeof *tfbuf);
    for (int t = 0; t < ms->n_types; t++) tf[t].at = tfbuf + 2 * t * p->n_ctx, tf[t].avg = tf[t].at + p->n_ctx;
    layer_cost *lc = m1c_xcalloc((size_t)L, sizeof *lc);
    int rc = plan_types(s, p, tf, e);

    /* Every layer: parameters (split as memory needs them), activations and scratch at the micro-batch. */
    m1c_plugin *ffn = NULL;
    if (!rc) rc = m1c_registry_load(&s->reg, ms->ffn.plugin, base, M1C_KIND_MOE, &ffn, e);
    const int B = p->batch, T = p->seq_len;
    for (int l = 0; !rc && l < L; l++) {
        const m1c_layer_type_spec *ty = &ms->types[ms->layer_type[l]];
        m1c_plan_type *pt = &p->types[ms->layer_type[l]];
        m1c_plugin *ap = NULL;
        if ((rc = m1c_registry_load(&s->reg, ty->attention.plugin, base, M1C_KIND_ATTENTION, &ap, e))) break;
        const m1c_attention_vtable *av = M1C_ATTENTION(ap);
        const m1c_moe_vtable *fv = M1C_MOE(ffn);
        void *a = NULL, *f = NULL;
        if ((rc = layer_info_create(ap, &av->ops, ty->attention.settings, l, (int)L, (int)H, &a, e))) break;
        if ((rc = layer_info_create(ffn, &fv->ops, ms->ffn.settings, l, (int)L, (int)H, &f, e))) {
            av->ops.destroy(a);
            break;
        }
        pt->layers++;
        int64_t experts = 0;
        int n_experts = 0;
        lc[l].attn = param_count(&av->ops, a, NULL, NULL);
        int64_t ffn_declared = param_count(&fv->ops, f, &experts, &n_experts);
        lc[l].ffn_experts = experts, lc[l].ffn_other = ffn_declared - experts;
        p->ffn_expert_params = experts, p->n_experts = n_experts;
        double b[4] = {declared_bytes(a, av->ops.acts, B, T, p->act_bytes),
                       declared_bytes(f, fv->ops.acts, B, T, p->act_bytes),
                       declared_bytes(a, av->ops.scratch, B, T, p->act_bytes),
                       declared_bytes(f, fv->ops.scratch, B, T, p->act_bytes)};
        lc[l].acts = b[0] + b[1];
        lc[l].scratch = b[2] > b[3] ? b[2] : b[3];
        int64_t tot = 0, act = 0;
        double ff = 0;
        if (fv->count && fv->count(f, &tot, &act, &ff) == M1C_OK) {
            p->ffn_params = tot, p->ffn_active = act, p->ffn_flops = ff;
        } else {
            p->ffn_params = p->ffn_active = ffn_declared;
            p->ffn_flops = 2.0 * (double)p->ffn_active;
        }
        av->ops.destroy(a);
        fv->ops.destroy(f);
        if (lc[l].attn < 0 || ffn_declared < 0)
            rc = m1c_fail(e, "layer %d: plugin '%s': params declaration failed", l,
                          lc[l].attn < 0 ? ap->desc->name : ffn->desc->name);
        else if (b[0] < 0 || b[1] < 0 || b[2] < 0 || b[3] < 0)
            rc = m1c_fail(e, "layer %d: plugin '%s' or '%s': buffer declaration failed", l, ap->desc->name,
                          ffn->desc->name);
    }
    if (!rc) p->ffn_plugin = ffn->desc->name;
    if (!rc && p->ep > 1 && !p->n_experts)
        rc = m1c_fail(e, "--ep %d: the FFN plugin '%s' declares no expert tensors to spread", p->ep, p->ffn_plugin);
    if (!rc && p->n_experts && p->n_experts % p->ep)
        rc = m1c_fail(e, "--ep %d must divide the %d experts of plugin '%s'", p->ep, p->n_experts, p->ffn_plugin);

    int baseline = rc ? -1 : pick_baseline(p, tf, o->baseline_type, e);
    if (baseline < 0) rc = M1C_ERR;
    if (!rc) {
        p->embed_params = V * H;
        p->head_params = ms->tie_embeddings ? 0 : V * H;
        p->final_norm_params = H;
        int64_t layers_total = 0, layers_active = 0;
        double flops = 0;
        const double fixed = (double)L * p->ffn_flops + 2.0 * (double)H * (double)V; /* the embedding is a lookup */
        for (int t = 0; t < p->n_types; t++) {
            m1c_plan_type *pt = &p->types[t];
            layers_total += pt->layers * (pt->attn_params + pt->norm_params + p->ffn_params);
            layers_active += pt->layers * (pt->attn_params + pt->norm_params + p->ffn_active);
            flops += pt->layers * pt->attn_flops;
        }
        p->total_nonembed = layers_total + p->final_norm_params;
        p->active_nonembed = layers_active + p->final_norm_params;
        p->total_params = p->total_nonembed + p->embed_params + p->head_params;
        p->active_params = p->active_nonembed + p->embed_params + p->head_params;
        p->flops_forward = flops + fixed;
        p->flops_train = 3.0 * p->flops_forward;

        p->baseline_type = p->types[baseline].name;
        p->baseline_plugin = p->types[baseline].attention_plugin;
        for (int c = 0; c < p->n_ctx; c++) {
            m1c_plan_ctx *x = &p->ctx[c];
            x->hybrid = x->hybrid_avg = fixed;
            for (int t = 0; t < p->n_types; t++)
                x->hybrid += p->types[t].layers * tf[t].at[c], x->hybrid_avg += p->types[t].layers * tf[t].avg[c];
            x->all_baseline = fixed + (double)L * tf[baseline].at[c];
            x->baseline_avg = fixed + (double)L * tf[baseline].avg[c];
        }
    }

    /* Optimizer state per parameter, from the first stage's optimizer. */
    if (!rc && rs->n_stages) {
        m1c_plugin *op = NULL;
        void *ob = NULL;
        const char *names[16];
        rc = m1c_registry_load(&s->reg, rs->stages[0].optimizer.plugin, base, M1C_KIND_OPTIMIZER, &op, e);
        if (!rc && M1C_OPTIMIZER(op)->create(&op->host, rs->stages[0].optimizer.settings, &ob))
            rc = m1c_plugin_fail(op, e, "create");
        if (!rc) {
            p->optimizer_states = M1C_OPTIMIZER(op)->state(ob, names, 16);
            M1C_OPTIMIZER(op)->destroy(ob);
        }
    }

    /* The core's own tensors (core/model.c m1c_run_init), at the activation width: per layer the input,
     * two norm outputs, the mid-layer stream and two 1/rms rows (bf16 mixed: and the two norm outputs'
     * bf16 copies the layers take as inputs); per stage its output stream; per GPU the work rows tmp, dx,
     * dh (bf16 mixed: and dout's bf16 copy) and the token ids and targets (i32); on the last stage the
     * final norm, its 1/rms, lse, log p, d log p and the logits (f32 at every head precision, split over
     * tp by vocabulary; the bf16 head adds its bf16 onehot - softmax for the backward). */
    if (!rc) {
        const double N = (double)B * T, ab = p->act_bytes;
        const double lp = p->precision == M1C_PREC_BF16_MIXED ? 2.0 : 0.0; /* bytes of a bf16 copy */
        const double logit_bytes = 4.0 + (ms->head_precision == M1C_HEAD_BF16 ? 2.0 : 0.0);
        const double core_layer = ab * (4.0 * N * H + 2.0 * N) + lp * 2.0 * N * H, core_stage = ab * N * H;
        const double last = ab * (N * H + 4.0 * N) + logit_bytes * N * (double)V / p->tp;
        const double work = ab * 3.0 * N * H + lp * N * H + 4.0 * 2.0 * N;
        plan_memory(s, p, lc, last, core_layer, core_stage, work);
    }
    free(lc);
    free(tfbuf);
    free(tf);
    return rc ? M1C_ERR : M1C_OK;
}

void m1c_plan_free(m1c_plan *p) {
    free(p->types);
    free(p->ctx);
    free(p->stages);
    memset(p, 0, sizeof *p);
}
