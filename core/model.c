/* Model assembly on the CPU: parameters, activations and the forward/backward of the whole stack. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host.h"
#include "ops.h"
#include "rng.h"
#include "timer.h"
#ifdef M1C_HAVE_CUDA
#include "cuda/ops.h"
#endif

/* ---- building ---------------------------------------------------------------------------- */

static int add_param(m1c_model *m, const char *name, int ndim, const int64_t *shape, int init, int no_decay,
                     float std) {
    int k = m1c_arena_add(&m->params, name, M1C_F32, ndim, shape);
    m->grad_written = m1c_xrealloc(m->grad_written, (size_t)(k + 1) * sizeof *m->grad_written);
    m->grad_written[k] = 0;
    m->no_decay = m1c_xrealloc(m->no_decay, (size_t)(k + 1) * sizeof *m->no_decay);
    m->init = m1c_xrealloc(m->init, (size_t)(k + 1) * sizeof *m->init);
    m->init_std = m1c_xrealloc(m->init_std, (size_t)(k + 1) * sizeof *m->init_std);
    m->no_decay[k] = no_decay, m->init[k] = init, m->init_std[k] = std;
    return k;
}

static int create_slot(m1c_inst *s, m1c_plugin *p, const m1c_settings *set, const m1c_layer_info *info,
                       m1c_model *m, int l, m1c_err *e) {
    s->plugin = p;
    s->ops = p->desc->kind == M1C_KIND_ATTENTION ? &M1C_ATTENTION(p)->ops : &M1C_MOE(p)->ops;
    if (s->ops->create(&p->host, set, info, &s->self) != M1C_OK) return m1c_plugin_fail(p, e, "create");
    int n = s->ops->params(s->self, NULL, 0);
    m1c_buf_spec *spec = m1c_xcalloc((size_t)(n > 0 ? n : 1), sizeof *spec);
    if (n < 0 || s->ops->params(s->self, spec, n) != n) {
        free(spec);
        return m1c_plugin_fail(p, e, "params");
    }
    s->p0 = m->params.n;
    s->np = n;
    s->proj = -1;
    for (int i = 0; i < n; i++) {
        const char *bad = NULL;
        if (spec[i].dtype != M1C_F32) bad = "parameters must be f32 (master weights)";
        const int proj = p->desc->abi_minor >= 4 && spec[i].in_proj == 1;
        if (proj && s->proj >= 0) bad = "in_proj is declared by a second parameter (one at most)";
        if (proj && (spec[i].ndim != 2 || spec[i].shape[1] != m->H || spec[i].shape[0] < 1 ||
                     spec[i].shape[0] > M1C_IN_PROJ_MAX))
            bad = "in_proj needs a (P, hidden) matrix with 1 <= P <= 32 (M1C_IN_PROJ_MAX)";
        if (bad) {
            m1c_fail(e, "plugin '%s': parameter '%s': %s", p->desc->name, spec[i].name, bad);
            free(spec);
            return M1C_ERR;
        }
        if (proj) s->proj = m->params.n;
        char *name = m1c_xasprintf("model.layers.%d.%s", l, spec[i].name);
        const int k = add_param(m, name, spec[i].ndim, spec[i].shape, spec[i].init, spec[i].no_decay, spec[i].std);
        m->grad_written[k] = p->desc->abi_minor >= 3 && spec[i].grad_written == 1;
        free(name);
    }
    free(spec);
    return M1C_OK;
}

static int add_norm(m1c_model *m, int l, const char *what) {
    int64_t H = m->H;
    char *name = m1c_xasprintf("model.layers.%d.%s.weight", l, what);
    int k = add_param(m, name, 1, &H, M1C_INIT_ONES, 1, 0);
    free(name);
    return k;
}

int m1c_model_build(m1c_model *m, const m1c_model_def *def, m1c_err *e) {
    memset(m, 0, sizeof *m);
    m->V = def->vocab, m->H = def->hidden, m->L = def->layers;
    m->eps = def->norm_eps, m->tied = def->tie_embeddings, m->device = def->device;
    m->head_precision = def->head_precision;
    m->compute_dtype = def->compute_dtype;
    if (m->compute_dtype != M1C_F32 && m->device == M1C_DEVICE_CPU)
        return m1c_fail(e, "mixed precision (bf16) needs a CUDA device: the CPU computes in fp32");
    /* the norms write the layers' bf16 inputs in their own pass: no conversion pass in the layers */
    m->lp_inputs = m->device == M1C_DEVICE_CUDA && m->compute_dtype == M1C_BF16;
    m1c_arena_init(&m->params_lp, def->device);
    m1c_arena_init(&m->params, def->device);
    m->layer = m1c_xcalloc((size_t)m->L, sizeof *m->layer);
    int64_t H = m->H, V = m->V;

    m->embed = add_param(m, "model.embed_tokens.weight", 2, (int64_t[]){V, H}, M1C_INIT_NORMAL, 0, def->init_std);
    for (int l = 0; l < m->L; l++) {
        const m1c_layer_def *ld = &def->layer[l];
        m1c_layer *ly = &m->layer[l];
        m1c_layer_info info = {sizeof info, l, m->L, m->H, m->device, m->compute_dtype, 0, m->lp_inputs, 0, {0}};
        ly->norm_in = add_norm(m, l, "input_layernorm");
        if (create_slot(&ly->attn, ld->attn, ld->attn_settings, &info, m, l, e)) goto fail;
        ly->norm_post = add_norm(m, l, "post_attention_layernorm");
        if (create_slot(&ly->ffn, ld->ffn, ld->ffn_settings, &info, m, l, e)) goto fail;
        ly->alpha_attn = ld->alpha_attn, ly->beta_attn = ld->beta_attn;
        ly->alpha_ffn = ld->alpha_ffn, ly->beta_ffn = ld->beta_ffn;
    }
    m->norm = add_param(m, "model.norm.weight", 1, &H, M1C_INIT_ONES, 1, 0);
    m->head = m->tied ? m->embed
                      : add_param(m, "lm_head.weight", 2, (int64_t[]){V, H}, M1C_INIT_NORMAL, 0, def->init_std);
    /* the untied head's gradient is one product, which writes it whole when handed over unset (tied, the
     * embedding's backward adds to it) */
    if (!m->tied) m->grad_written[m->head] = 1;
    if (m1c_arena_alloc(&m->params, e)) goto fail;
    if (m->compute_dtype == M1C_BF16) {
        for (int i = 0; i < m->params.n; i++)
            m1c_arena_add(&m->params_lp, m->params.t[i].name, M1C_BF16, m->params.t[i].ndim, m->params.t[i].shape);
        if (m1c_arena_alloc(&m->params_lp, e)) goto fail;
    }
    m1c_model_init_params(m, 0);
    return M1C_OK;
fail:
    m1c_model_free(m);
    return M1C_ERR;
}

void m1c_model_init_params(m1c_model *m, uint64_t seed) {
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < m->params.n; i++) {
        m1c_tensor *t = &m->params.t[i];
        int64_t n = m1c_numel(t);
        /* Drawn on the host (the same numbers on every device), then copied. */
        float *x = m->device == M1C_DEVICE_CPU ? t->data : m1c_xmalloc((size_t)(n ? n : 1) * sizeof *x);
        m1c_rng rng;
        m1c_rng_seed(&rng, seed, (uint64_t)i);
        for (int64_t j = 0; j < n; j++) {
            switch (m->init[i]) {
            case M1C_INIT_ZEROS: x[j] = 0; break;
            case M1C_INIT_ONES: x[j] = 1; break;
            case M1C_INIT_CONST: x[j] = m->init_std[i]; break;
            default: x[j] = m->init_std[i] * m1c_rng_normal(&rng); break;
            }
        }
        if (m->device != M1C_DEVICE_CPU) {
            m1c_dev_copy(m->device, t->data, M1C_DEVICE_CPU, x, (size_t)n * sizeof *x);
            free(x);
        }
    }
    m1c_model_sync_lp(m);
}

void m1c_model_sync_lp(m1c_model *m) {
    for (int i = 0; i < m->params_lp.n; i++)
        m1c_to_bf16(m->device, m->params_lp.t[i].data, m->params.t[i].data, m1c_numel(&m->params.t[i]));
}

const char *m1c_model_first_nonfinite(m1c_model *m, int grads) {
    m1c_arena *a = grads ? &m->grads : &m->params;
    for (int i = 0; a->base && i < a->n; i++)
        if (m1c_count_nonfinite(m->device, a->t[i].data, m1c_numel(&a->t[i]))) return a->t[i].name;
    return NULL;
}

int m1c_model_alloc_grads(m1c_model *m, m1c_err *e) { return m1c_arena_like(&m->grads, &m->params, m->device, "", e); }

int64_t m1c_model_param_count(const m1c_model *m) {
    int64_t n = 0;
    for (int i = 0; i < m->params.n; i++) n += m1c_numel(&m->params.t[i]);
    return n;
}

static void destroy_slot(m1c_inst *s) {
    if (s->self) s->ops->destroy(s->self);
    s->self = NULL;
}

void m1c_model_free(m1c_model *m) {
    for (int l = 0; m->layer && l < m->L; l++) {
        destroy_slot(&m->layer[l].attn);
        destroy_slot(&m->layer[l].ffn);
    }
    free(m->layer);
    m1c_arena_free(&m->params);
    m1c_arena_free(&m->grads);
    m1c_arena_free(&m->params_lp);
    free(m->no_decay);
    free(m->grad_written);
    free(m->init);
    free(m->init_std);
    memset(m, 0, sizeof *m);
}

/* ---- run buffers ------------------------------------------------------------------------- */

typedef int (*declare_fn)(void *self, int B, int T, m1c_buf_spec *specs, int max);

static m1c_buf_spec *declare(m1c_inst *s, declare_fn fn, int B, int T, int *n, m1c_err *e) {
    *n = fn(s->self, B, T, NULL, 0);
    m1c_buf_spec *spec = m1c_xcalloc((size_t)(*n > 0 ? *n : 1), sizeof *spec);
    if (*n < 0 || fn(s->self, B, T, spec, *n) != *n) {
        free(spec);
        m1c_plugin_fail(s->plugin, e, "declaring buffers");
        return NULL;
    }
    return spec;
}

/* Declare a slot's activations in the run arena (index + 1 kept in sb->acts[i].data until the
 * arena exists) and lay its scratch out from offset 0 of the shared scratch buffer. */
static int plan_slot(m1c_run *r, m1c_inst *s, m1c_inst_bufs *sb, int l, size_t *scratch_max, m1c_err *e) {
    m1c_buf_spec *a = declare(s, s->ops->acts, r->B, r->T, &sb->na, e);
    if (!a) return M1C_ERR;
    sb->acts = m1c_xcalloc((size_t)sb->na + 1, sizeof *sb->acts);
    for (int i = 0; i < sb->na; i++) {
        m1c_tensor *t = &sb->acts[i];
        if (!r->training && a[i].backward_only) { /* an inference run never calls backward: no memory */
            t->dtype = a[i].dtype, t->device = r->acts.device, t->ndim = a[i].ndim, t->data = NULL;
            memcpy(t->shape, a[i].shape, sizeof t->shape);
            continue;
        }
        char *name = m1c_xasprintf("layers.%d.%s.%s", l, s->plugin->desc->name, a[i].name);
        t->data = (void *)(intptr_t)(m1c_arena_add(&r->acts, name, a[i].dtype, a[i].ndim, a[i].shape) + 1);
        free(name);
    }
    free(a);
    m1c_buf_spec *sc = declare(s, s->ops->scratch, r->B, r->T, &sb->ns, e);
    if (!sc) return M1C_ERR;
    sb->scratch = m1c_xcalloc((size_t)sb->ns + 1, sizeof *sb->scratch);
    size_t off = 0;
    for (int i = 0; i < sb->ns; i++) {
        m1c_tensor *t = &sb->scratch[i];
        t->dtype = sc[i].dtype, t->device = r->acts.device, t->ndim = sc[i].ndim;
        memcpy(t->shape, sc[i].shape, sizeof t->shape);
        t->name = NULL;
        t->data = (void *)off; /* an offset until the buffer exists */
        off += ((size_t)m1c_numel(t) * m1c_dtype_size(t->dtype) + 255) / 256 * 256;
    }
    free(sc);
    if (off > *scratch_max) *scratch_max = off;
    return M1C_OK;
}

static void bind_slot(m1c_run *r, m1c_model *m, m1c_inst *s, m1c_inst_bufs *sb) {
    for (int i = 0; i < sb->na; i++)
        if (sb->acts[i].data) sb->acts[i] = r->acts.t[(intptr_t)sb->acts[i].data - 1];
    for (int i = 0; i < sb->ns; i++) sb->scratch[i].data = (char *)r->scratch + (size_t)sb->scratch[i].data;
    sb->bufs.params = &m->params.t[s->p0];
    sb->bufs.grads = m->grads.base ? &m->grads.t[s->p0] : NULL;
    sb->bufs.acts = sb->acts;
    sb->bufs.scratch = sb->scratch;
    sb->bufs.training = r->training;
    sb->bufs.aux_scale = 1.0f;
    sb->bufs.params_lp = m->params_lp.base ? &m->params_lp.t[s->p0] : NULL;
}

static float *act(m1c_run *r, int idx) { return r->acts.t[idx].data; }

int m1c_run_set_training(m1c_run *r, m1c_model *m, int training) {
    if (training && !r->for_training) return M1C_ERR;
    r->training = training;
    for (int l = 0; l < m->L; l++) r->attn[l].bufs.training = r->ffn[l].bufs.training = training;
    return M1C_OK;
}

int m1c_run_init(m1c_run *r, m1c_model *m, int B, int T, int training, m1c_err *e) {
    memset(r, 0, sizeof *r);
    r->B = B, r->T = T, r->training = training, r->for_training = training != 0;
    m1c_arena_init(&r->acts, m->device);
    int64_t N = (int64_t)B * T, H = m->H, V = m->V, L = m->L;
    int64_t nh[] = {N, H}, n1[] = {N}, nv[] = {N, V};
    int ix[L + 1], ih1[L], ir1[L], ix1[L], ih2[L], ir2[L];
    char name[64];
    for (int l = 0; l <= L; l++) {
        snprintf(name, sizeof name, "x.%d", l);
        ix[l] = m1c_arena_add(&r->acts, name, M1C_F32, 2, nh);
    }
    for (int l = 0; l < L; l++) {
        snprintf(name, sizeof name, "h1.%d", l);
        ih1[l] = m1c_arena_add(&r->acts, name, M1C_F32, 2, nh);
        snprintf(name, sizeof name, "rstd1.%d", l);
        ir1[l] = m1c_arena_add(&r->acts, name, M1C_F32, 1, n1);
        snprintf(name, sizeof name, "x1.%d", l);
        ix1[l] = m1c_arena_add(&r->acts, name, M1C_F32, 2, nh);
        snprintf(name, sizeof name, "h2.%d", l);
        ih2[l] = m1c_arena_add(&r->acts, name, M1C_F32, 2, nh);
        snprintf(name, sizeof name, "rstd2.%d", l);
        ir2[l] = m1c_arena_add(&r->acts, name, M1C_F32, 1, n1);
    }
    int ihf = m1c_arena_add(&r->acts, "hf", M1C_F32, 2, nh), irf = m1c_arena_add(&r->acts, "rstdf", M1C_F32, 1, n1);
    int ilg = m1c_arena_add(&r->acts, "logits", M1C_F32, 2, nv), ilse = m1c_arena_add(&r->acts, "lse", M1C_F32, 1, n1);
    int ilp = m1c_arena_add(&r->acts, "logp", M1C_F32, 1, n1), idl = m1c_arena_add(&r->acts, "dlogp", M1C_F32, 1, n1);
    int itmp = m1c_arena_add(&r->acts, "tmp", M1C_F32, 2, nh), idx = m1c_arena_add(&r->acts, "dx", M1C_F32, 2, nh);
    int idh = m1c_arena_add(&r->acts, "dh", M1C_F32, 2, nh);
    const int with_q = r->for_training && m->device == M1C_DEVICE_CUDA && m->head_precision == 2;
    int64_t nq[] = {m1c_head_q_bytes(N, (int)V) / 2}; /* q, then its row scales (core/ops.h) */
    int iq = with_q ? m1c_arena_add(&r->acts, "head_q", M1C_BF16, 1, nq) : -1;
    int iid = m1c_arena_add(&r->acts, "ids", M1C_I32, 1, n1), itg = m1c_arena_add(&r->acts, "targets", M1C_I32, 1, n1);
    const int with_lp = m->lp_inputs && r->for_training;
    int ilp1[L], ilp2[L], idlp = with_lp ? m1c_arena_add(&r->acts, "dout_lp", M1C_BF16, 2, nh) : -1;
    for (int l = 0; l < L && with_lp; l++) {
        snprintf(name, sizeof name, "h1_lp.%d", l);
        ilp1[l] = m1c_arena_add(&r->acts, name, M1C_BF16, 2, nh);
        snprintf(name, sizeof name, "h2_lp.%d", l);
        ilp2[l] = m1c_arena_add(&r->acts, name, M1C_BF16, 2, nh);
    }

    /* A layer's in_proj (ABI 1.4), on the GPU: the residual norm that writes its input gives the product
     * too. Not for the first layer's attention, whose input the embedding's norm writes, nor on the CPU. */
    int iproj[2 * L];
    for (int j = 0; j < 2 * L; j++) {
        const m1c_inst *s = j % 2 ? &m->layer[j / 2].ffn : &m->layer[j / 2].attn;
        iproj[j] = -1;
        if (s->proj < 0 || m->device != M1C_DEVICE_CUDA || j == 0) continue;
        int64_t np[] = {N, m->params.t[s->proj].shape[0]};
        snprintf(name, sizeof name, "layers.%d.%s.in_proj", j / 2, s->plugin->desc->name);
        iproj[j] = m1c_arena_add(&r->acts, name, M1C_F32, 2, np);
    }

    r->attn = m1c_xcalloc((size_t)L, sizeof *r->attn);
    r->ffn = m1c_xcalloc((size_t)L, sizeof *r->ffn);
    size_t scratch = 0;
    for (int l = 0; l < L; l++) {
        if (plan_slot(r, &m->layer[l].attn, &r->attn[l], l, &scratch, e)) return M1C_ERR;
        if (plan_slot(r, &m->layer[l].ffn, &r->ffn[l], l, &scratch, e)) return M1C_ERR;
    }
    if (m1c_arena_alloc(&r->acts, e)) return M1C_ERR;
    r->scratch = m1c_dev_alloc(m->device, scratch ? scratch : 256);
    if (!r->scratch) return m1c_fail(e, "cannot allocate %.1f MiB of scratch", (double)scratch / 1048576.0);
    for (int l = 0; l < L; l++) {
        bind_slot(r, m, &m->layer[l].attn, &r->attn[l]);
        bind_slot(r, m, &m->layer[l].ffn, &r->ffn[l]);
        m1c_inst_bufs *sb[2] = {&r->attn[l], &r->ffn[l]};
        for (int j = 0; j < 2; j++) {
            const int i = iproj[2 * l + j];
            sb[j]->proj = i >= 0 ? r->acts.t[i].data : NULL;
            sb[j]->bufs.in_proj = sb[j]->proj;
            /* every output of a layer goes to a residual norm of the core's, which takes it as rows (ABI 1.4) */
            sb[j]->bufs.out_rows = m->device == M1C_DEVICE_CUDA ? &sb[j]->rows : NULL;
        }
    }
    if (with_lp) {
        r->h1_lp = m1c_xcalloc((size_t)L * 2, sizeof *r->h1_lp);
        r->h2_lp = r->h1_lp + L;
        r->dout_lp = r->acts.t[idlp].data;
        for (int l = 0; l < L; l++) {
            r->h1_lp[l] = r->acts.t[ilp1[l]].data, r->h2_lp[l] = r->acts.t[ilp2[l]].data;
            r->attn[l].bufs.in_lp = r->h1_lp[l], r->ffn[l].bufs.in_lp = r->h2_lp[l];
            r->attn[l].bufs.dout_lp = r->dout_lp; /* the MoE's router needs dout in f32 */
        }
    }
    r->x = m1c_xcalloc((size_t)L + 1, sizeof *r->x);
    r->h1 = m1c_xcalloc((size_t)L * 5, sizeof *r->h1);
    r->rstd1 = r->h1 + L, r->x1 = r->h1 + 2 * L, r->h2 = r->h1 + 3 * L, r->rstd2 = r->h1 + 4 * L;
    for (int l = 0; l <= L; l++) r->x[l] = act(r, ix[l]);
    for (int l = 0; l < L; l++) {
        r->h1[l] = act(r, ih1[l]), r->rstd1[l] = act(r, ir1[l]), r->x1[l] = act(r, ix1[l]);
        r->h2[l] = act(r, ih2[l]), r->rstd2[l] = act(r, ir2[l]);
    }
    r->hf = act(r, ihf), r->rstdf = act(r, irf), r->logits = act(r, ilg), r->lse = act(r, ilse);
    r->logp = act(r, ilp), r->dlogp = act(r, idl), r->tmp = act(r, itmp), r->dx = act(r, idx), r->dh = act(r, idh);
    r->head_q = iq >= 0 ? r->acts.t[iq].data : NULL;
    r->ids = r->acts.t[iid].data, r->targets = r->acts.t[itg].data;
    if (m->device == M1C_DEVICE_CPU) {
        r->ids_host = r->ids, r->targets_host = r->targets, r->logp_host = r->logp, r->dlogp_host = r->dlogp;
    } else {
        /* Page-locked where it can be: the uploads of ids, targets and dlogp then queue without a wait,
         * so the host runs ahead of the device from one step into the next. */
        char *p = r->host_block = m1c_dev_host_alloc(m->device, (size_t)N * 16, &r->host_pinned);
        r->ids_host = (int32_t *)p, r->targets_host = (int32_t *)(p + N * 4);
        r->logp_host = (float *)(p + N * 8), r->dlogp_host = (float *)(p + N * 12);
    }
    return M1C_OK;
}

void m1c_run_free(m1c_run *r, m1c_model *m) {
    if (r->host_block) m1c_dev_host_free(r->host_block, r->host_pinned);
    for (int l = 0; r->attn && l < m->L; l++) {
        free(r->attn[l].acts), free(r->attn[l].scratch);
        free(r->ffn[l].acts), free(r->ffn[l].scratch);
    }
    free(r->attn);
    free(r->ffn);
    free(r->x);
    free(r->h1);
    free(r->h1_lp);
    m1c_dev_free(r->acts.device, r->scratch);
    m1c_arena_free(&r->acts);
    memset(r, 0, sizeof *r);
}

/* ---- forward / backward ------------------------------------------------------------------ */

static float *P(m1c_model *m, int i) { return m->params.t[i].data; }
/* The plugins launch on the calling thread's core stream (one per host thread: the core's own work of
 * this call goes there too). */
static void bind_stream(m1c_model *m, m1c_run *r) {
    void *s = m1c_dev_stream(m->device);
    for (int l = 0; l < m->L; l++) r->attn[l].bufs.stream = r->ffn[l].bufs.stream = s;
}

/* Parameter i's bf16 copy (mixed precision), or NULL. */
static const void *PLP(m1c_model *m, int i) { return m->params_lp.base ? m->params_lp.t[i].data : NULL; }
static float *G(m1c_model *m, int i) { return m->grads.t[i].data; }

/* The failure the device kept during this call (host.h), as its error; M1C_OK if none. Device work
 * queued before a failure may have run on bad data: the caller stops. */
static int dev_check(const m1c_model *m, const char *what, m1c_err *e) {
    char msg[256];
    if (m1c_dev_take_error(m->device, msg, sizeof msg)) return m1c_fail(e, "%s on the GPU failed: %s", what, msg);
    return M1C_OK;
}

static uint64_t mix(uint64_t a, uint64_t b) {
    uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ull + (a << 6) + (a >> 2));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    return z ^ (z >> 31);
}

/* Profiling: start a segment, then charge its time to a component. */
static void prof_start(m1c_model *m, m1c_run *r) {
    if (!r->profile) return;
    m1c_dev_sync(m->device);
    r->prof_t = m1c_now();
}

static void prof_add(m1c_model *m, m1c_run *r, const char *name, int backward) {
    if (!r->profile) return;
    m1c_dev_sync(m->device);
    double t = m1c_now();
    int i = 0;
    while (i < r->prof_n && strcmp(r->prof_name[i], name)) i++;
    if (i == r->prof_n && r->prof_n < 12) r->prof_name[r->prof_n++] = name;
    if (i < 12) *(backward ? &r->prof_bwd[i] : &r->prof_fwd[i]) += t - r->prof_t;
    r->prof_t = t;
}

/* Whether an attention plugin's backward reads dout_lp alone where given (ABI 1.5). */
static int attn_dout_lp_only(const m1c_plugin *p) {
    return p->desc->abi_minor >= 5 && (M1C_ATTENTION(p)->flags & M1C_ATTENTION_DOUT_LP_ONLY) != 0;
}

typedef int (*mix_fn)(m1c_model *m, m1c_run *r, int l, int B, int T, float *out, const float *in, void *ud);

/* The residual and norm after the forward of a layer (its buffers from: y is its output, or the rows it
 * handed over) that write the input of instance s (its buffers sb; NULL after the last layer): with s's
 * in_proj product where the run has a buffer for it. */
static void residual_norm_into(m1c_model *m, const m1c_inst_bufs *from, const m1c_inst *s, const m1c_inst_bufs *sb,
                               float *y, const float *h, float a, float b, float *out, float *rstd, int norm,
                               int64_t N, uint16_t *out_lp) {
    const int np = sb && sb->proj ? (int)m->params.t[s->proj].shape[0] : 0;
    m1c_residual_rmsnorm_ex(m->device, y, h, a, b, from->rows.rows ? &from->rows : NULL, out, rstd, P(m, norm), N,
                            (int)m->H, m->eps, out_lp, np ? P(m, s->proj) : NULL, np, np ? sb->proj : NULL);
}

/* The layer loop shared by training forward and incremental decoding: `attn` runs the mixer. Each
 * residual is fused with the norm that reads its result (the layer's post-attention norm; the next
 * layer's input norm, or after the last layer the final norm): the same values as the two ops in turn.
 * Only the first norm, of the embedding, runs alone. */
static int forward_layers(m1c_model *m, m1c_run *r, int B, int T, mix_fn attn, void *ud, m1c_err *e) {
    int64_t N = (int64_t)B * T, H = m->H;
    bind_stream(m, r);
    if (m->L > 0)
        m1c_rmsnorm_forward(m->device, r->h1[0], r->rstd1[0], r->x[0], P(m, m->layer[0].norm_in), N, (int)H, m->eps,
                            r->h1_lp ? r->h1_lp[0] : NULL);
    else
        m1c_rmsnorm_forward(m->device, r->hf, r->rstdf, r->x[0], P(m, m->norm), N, (int)H, m->eps, NULL);
    prof_add(m, r, "core", 0);
    for (int l = 0; l < m->L; l++) {
        m1c_layer *ly = &m->layer[l];
        const int last = l == m->L - 1;
        r->attn[l].bufs.noise_seed = mix(r->noise_seed, 2 * (uint64_t)l);
        r->attn[l].rows.rows = r->ffn[l].rows.rows = NULL; /* filled by a forward that hands its rows over */
        if (attn(m, r, l, B, T, r->x1[l], r->h1[l], ud)) return m1c_plugin_fail(ly->attn.plugin, e, "forward");
        prof_add(m, r, ly->attn.plugin->desc->name, 0);
        residual_norm_into(m, &r->attn[l], &ly->ffn, &r->ffn[l], r->x1[l], r->h1[l], ly->alpha_attn, ly->beta_attn,
                           r->h2[l], r->rstd2[l], ly->norm_post, N, r->h2_lp ? r->h2_lp[l] : NULL);
        prof_add(m, r, "core", 0);
        r->ffn[l].bufs.noise_seed = mix(r->noise_seed, 2 * (uint64_t)l + 1);
        if (ly->ffn.ops->forward(ly->ffn.self, &r->ffn[l].bufs, r->x[l + 1], r->h2[l], B, T))
            return m1c_plugin_fail(ly->ffn.plugin, e, "forward");
        prof_add(m, r, ly->ffn.plugin->desc->name, 0);
        residual_norm_into(m, &r->ffn[l], last ? NULL : &m->layer[l + 1].attn, last ? NULL : &r->attn[l + 1],
                           r->x[l + 1], r->h2[l], ly->alpha_ffn, ly->beta_ffn, last ? r->hf : r->h1[l + 1],
                           last ? r->rstdf : r->rstd1[l + 1], last ? m->norm : m->layer[l + 1].norm_in, N,
                           r->h1_lp && !last ? r->h1_lp[l + 1] : NULL);
        prof_add(m, r, "core", 0);
    }
    return M1C_OK;
}

static int attn_forward(m1c_model *m, m1c_run *r, int l, int B, int T, float *out, const float *in, void *ud) {
    (void)ud;
    m1c_inst *s = &m->layer[l].attn;
    return s->ops->forward(s->self, &r->attn[l].bufs, out, in, B, T);
}

static double sum_aux(m1c_model *m, m1c_run *r) {
    double aux = 0;
    for (int l = 0; l < m->L; l++) {
        m1c_moe_stats st = {0};
        if (m1c_model_moe_stats(m, r, l, &st) == M1C_OK) aux += st.aux_loss;
    }
    return aux;
}

int m1c_model_forward(m1c_model *m, m1c_run *r, const int32_t *tokens, m1c_err *e) {
    int B = r->B, T = r->T;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t id = tokens[(int64_t)b * (T + 1) + t], tg = tokens[(int64_t)b * (T + 1) + t + 1];
            if (id < 0 || id >= m->V || tg >= m->V)
                return m1c_fail(e, "token id %d out of range for vocabulary %d", id < 0 || id >= m->V ? id : tg, m->V);
            r->ids_host[(int64_t)b * T + t] = id;
            r->targets_host[(int64_t)b * T + t] = tg;
        }
    int64_t N = (int64_t)B * T;
    prof_start(m, r);
    if (m->device != M1C_DEVICE_CPU) {
        /* not waited for: m1c_dev_copy_wait after the copy of logp below waits for them too */
        m1c_dev_copy_async(m->device, r->ids, M1C_DEVICE_CPU, r->ids_host, (size_t)N * sizeof *r->ids);
        m1c_dev_copy_async(m->device, r->targets, M1C_DEVICE_CPU, r->targets_host, (size_t)N * sizeof *r->targets);
    }
    m1c_embed_forward(m->device, r->x[0], r->ids, P(m, m->embed), N, m->H);
    if (r->training) m1c_embed_prepare(m->device, r->ids, N); /* the backward's sort, beside the forward */
    prof_add(m, r, "core", 0);
    if (forward_layers(m, r, B, T, attn_forward, NULL, e)) {
        m1c_dev_copy_wait(m->device); /* the caller may rewrite the staging now */
        return M1C_ERR;
    }
    r->head_q_valid = r->training && r->head_q;
    m1c_head_forward(m->device, m->head_precision, r->logits, r->lse, r->logp, r->head_q_valid ? r->head_q : NULL,
                     r->hf, P(m, m->head), PLP(m, m->head), r->targets, N, m->H, m->V);
    if (m->device != M1C_DEVICE_CPU) {
        /* the backward's first product runs while the host waits for logp and works out dlogp from it */
        m1c_dev_copy_async(M1C_DEVICE_CPU, r->logp_host, m->device, r->logp, (size_t)N * 4);
        if (r->head_q_valid)
            m1c_head_prepare(m->device, m->head_precision, r->head_q, P(m, m->head), PLP(m, m->head), N, m->H, m->V);
        m1c_dev_copy_wait(m->device);
    }
    prof_add(m, r, "head", 0);
    r->aux_loss = sum_aux(m, r);
    return dev_check(m, "forward", e);
}

static int grads_ready(m1c_run *r, int first, int end, m1c_err *e) {
    if (!r->grads_ready || first >= end) return M1C_OK;
    r->grads_err[0] = 0;
    if (r->grads_ready(r->grads_ctx, first, end) == M1C_OK) return M1C_OK;
    return m1c_fail(e, "%s", r->grads_err[0] ? r->grads_err : "the step of the finished gradients failed");
}

static int backward_queue(m1c_model *m, m1c_run *r, m1c_err *e) {
    int B = r->B, T = r->T, H = m->H;
    int64_t N = (int64_t)B * T;
    if (!m->grads.base) return m1c_fail(e, "backward without gradient buffers");
    bind_stream(m, r);
    float *dx = r->dx, *dh = r->dh, *tmp = r->tmp;
    prof_start(m, r);
    /* not waited for until the backward is queued: dlogp_host may change once backward returns */
    if (m->device != M1C_DEVICE_CPU) m1c_dev_copy_async(m->device, r->dlogp, M1C_DEVICE_CPU, r->dlogp_host, (size_t)N * 4);
    /* dh: written by the head's backward (no zeroing pass), then added to */
    const int unset = M1C_HEAD_DH_UNSET | ((m->grads.t[m->head].flags & M1C_TENSOR_UNSET) ? M1C_HEAD_DW_UNSET : 0);
    m1c_head_backward(m->device, m->head_precision, dh, G(m, m->head), unset, r->logits, r->lse,
                      r->head_q_valid ? r->head_q : NULL, r->dlogp, r->hf, P(m, m->head), PLP(m, m->head), r->targets,
                      N, H, m->V);
    prof_add(m, r, "head", 1);
    /* Parameter order (m1c_model_build): embedding, then per layer its input norm, attention, post norm
     * and FFN, then the final norm and the head. A layer's input norm is finished by the next lower
     * layer's first norm backward, so each range below ends with the next layer's input norm. */
    if (!m->tied && grads_ready(r, m->head, m->head + 1, e)) return M1C_ERR;
    /* dh holds the gradient of the output of a norm: first the final one's, then each layer's input
     * norm's (nw, nx, nr: its weight, input and rstd). Every norm but the first (of the embedding) feeds
     * a residual, whose gradient split is fused with the norm's backward: no dx, memset or axpby pass. */
    int nw = m->norm;
    const float *nx = r->x[m->L], *nr = r->rstdf;
    for (int l = m->L - 1; l >= 0; l--) {
        m1c_layer *ly = &m->layer[l];
        /* x2 = a h2 + b ffn(h2): dh2 = a dx2 + ffn'(b dx2), dx2 from the norm above */
        m1c_rmsnorm_backward_axpby(m->device, dh, tmp, G(m, nw), dh, nx, P(m, nw), nr, ly->alpha_ffn, ly->beta_ffn, N,
                                   H, NULL);
        prof_add(m, r, "core", 1);
        if (ly->ffn.ops->backward(ly->ffn.self, &r->ffn[l].bufs, dh, tmp, r->h2[l], B, T))
            return m1c_plugin_fail(ly->ffn.plugin, e, "backward");
        prof_add(m, r, ly->ffn.plugin->desc->name, 1);
        /* an attention layer that reads dout_lp alone (M1C_ATTENTION_DOUT_LP_ONLY) gets no f32 dout */
        float *ad = r->dout_lp && attn_dout_lp_only(ly->attn.plugin) ? NULL : tmp;
        m1c_rmsnorm_backward_axpby(m->device, dh, ad, G(m, ly->norm_post), dh, r->x1[l], P(m, ly->norm_post),
                                   r->rstd2[l], ly->alpha_attn, ly->beta_attn, N, H, r->dout_lp);
        prof_add(m, r, "core", 1);
        if (ly->attn.ops->backward(ly->attn.self, &r->attn[l].bufs, dh, ad, r->h1[l], B, T))
            return m1c_plugin_fail(ly->attn.plugin, e, "backward");
        prof_add(m, r, ly->attn.plugin->desc->name, 1);
        /* this layer but its input norm, and the norm above it (the final norm above the last layer). Not the
         * FFN's part apart, as soon as its backward is done: stepped beside the attention's backward, it
         * slowed it (lightning's first kernel waited 0.18 ms for SMs held by AdamW's blocks, H100 trace) */
        if (grads_ready(r, ly->norm_in + 1, (l + 1 < m->L ? m->layer[l + 1].norm_in : m->norm) + 1, e))
            return M1C_ERR;
        nw = ly->norm_in, nx = r->x[l], nr = r->rstd1[l];
    }
    /* the first norm's input gradient goes to the embedding: dx = d (and no second output), in the fused
     * pass that also sums the weight gradient */
    m1c_rmsnorm_backward_axpby(m->device, dx, NULL, G(m, nw), dh, nx, P(m, nw), nr, 1.0f, 0.0f, N, H, NULL);
    m1c_embed_backward(m->device, G(m, m->embed), dx, r->ids, N, H);
    prof_add(m, r, "core", 1);
    if (grads_ready(r, 0, m->L > 0 ? m->layer[0].norm_in + 1 : m->norm + 1, e)) return M1C_ERR;
    return dev_check(m, "backward", e);
}

int m1c_model_backward(m1c_model *m, m1c_run *r, m1c_err *e) {
    const int rc = backward_queue(m, r, e);
    m1c_dev_copy_wait(m->device); /* the caller may rewrite dlogp_host now */
    for (int i = 0; i < m->grads.n; i++) m->grads.t[i].flags &= ~M1C_TENSOR_UNSET; /* written (or failed) */
    return rc;
}

void m1c_model_zero_grads(m1c_model *m, void *stream) {
    m1c_arena *g = &m->grads;
    if (!g->base) return;
    /* one memset per run of tensors that need zeros, padding between them included */
    for (int i = 0; i < g->n;) {
        if (m->grad_written[i]) {
            g->t[i].flags |= M1C_TENSOR_UNSET;
            i++;
            continue;
        }
        int j = i;
        while (j < g->n && !m->grad_written[j]) j++;
        const size_t end = j < g->n ? g->offset[j] : g->bytes;
        m1c_dev_memset0_on(m->device, stream, (char *)g->base + g->offset[i], end - g->offset[i]);
        i = j;
    }
}

int m1c_model_moe_stats(m1c_model *m, m1c_run *r, int l, m1c_moe_stats *out) {
    m1c_inst *s = &m->layer[l].ffn;
    const m1c_moe_vtable *vt = M1C_MOE(s->plugin);
    if (!vt->stats) return M1C_ERR;
    return vt->stats(s->self, &r->ffn[l].bufs, out);
}

/* ---- incremental decoding ------------------------------------------------------------------ */

int m1c_decoder_init(m1c_decoder *d, m1c_model *m, int batch, int64_t max_len, int chunk, m1c_err *e) {
    memset(d, 0, sizeof *d);
    d->batch = batch, d->chunk = chunk, d->max_len = max_len;
    m1c_arena_init(&d->state, m->device);
    d->layer_state = m1c_xcalloc((size_t)m->L, sizeof *d->layer_state);
    int *first = m1c_xcalloc((size_t)m->L + 1, sizeof *first);
    for (int l = 0; l < m->L; l++) {
        m1c_inst *s = &m->layer[l].attn;
        const m1c_attention_vtable *vt = M1C_ATTENTION(s->plugin);
        int n = vt->state(s->self, batch, max_len, NULL, 0);
        m1c_buf_spec *spec = m1c_xcalloc((size_t)(n > 0 ? n : 1), sizeof *spec);
        if (n < 0 || vt->state(s->self, batch, max_len, spec, n) != n) {
            free(spec);
            free(first);
            return m1c_plugin_fail(s->plugin, e, "declaring decoding state");
        }
        first[l] = d->state.n;
        for (int i = 0; i < n; i++) {
            char *name = m1c_xasprintf("layers.%d.%s", l, spec[i].name);
            m1c_arena_add(&d->state, name, spec[i].dtype, spec[i].ndim, spec[i].shape);
            free(name);
        }
        free(spec);
    }
    first[m->L] = d->state.n;
    int rc = m1c_arena_alloc(&d->state, e);
    for (int l = 0; l < m->L && rc == M1C_OK; l++) d->layer_state[l] = &d->state.t[first[l]];
    free(first);
    if (rc) return rc;
    return m1c_run_init(&d->run, m, batch, chunk, 0, e);
}

void m1c_decoder_free(m1c_decoder *d, m1c_model *m) {
    m1c_dev_free(m->device, d->sample_work);
    m1c_run_free(&d->run, m);
    m1c_arena_free(&d->state);
    free(d->layer_state);
    memset(d, 0, sizeof *d);
}

void m1c_decoder_reset(m1c_decoder *d) {
    m1c_arena_zero(&d->state);
    d->pos = 0;
}

static int attn_step(m1c_model *m, m1c_run *r, int l, int B, int T, float *out, const float *in, void *ud) {
    m1c_decoder *d = ud;
    m1c_inst *s = &m->layer[l].attn;
    return M1C_ATTENTION(s->plugin)->step(s->self, &r->attn[l].bufs, d->layer_state[l], out, in, B, T, d->pos);
}

/* The forward of T new tokens per sequence shared by feed and feed_sample; with head, the logits of
 * each sequence's last position go to rows 0..batch-1 of run.logits (on the model's device). */
static int decoder_forward(m1c_model *m, m1c_decoder *d, const int32_t *ids, int T, int head, m1c_err *e) {
    if (T < 1 || T > d->chunk) return m1c_fail(e, "decoder: %d tokens at once, at most %d", T, d->chunk);
    if (d->pos + T > d->max_len) return m1c_fail(e, "decoder: length %lld exceeds %lld", (long long)(d->pos + T), (long long)d->max_len);
    m1c_run *r = &d->run;
    int B = d->batch, H = m->H;
    int64_t N = (int64_t)B * T;
    prof_start(m, r);
    for (int64_t i = 0; i < N; i++) {
        if (ids[i] < 0 || ids[i] >= m->V) return m1c_fail(e, "token id %d out of range for vocabulary %d", ids[i], m->V);
        r->ids_host[i] = ids[i];
    }
    if (m->device != M1C_DEVICE_CPU) m1c_dev_copy(m->device, r->ids, M1C_DEVICE_CPU, r->ids_host, (size_t)N * 4);
    m1c_embed_forward(m->device, r->x[0], r->ids, P(m, m->embed), N, H);
    if (forward_layers(m, r, B, T, attn_step, d, e)) return M1C_ERR;
    d->pos += T;
    /* Logits of the last position of each sequence only: row b of the logits buffer. */
    for (int b = 0; head && b < B; b++)
        m1c_gemm(m->device, 0, 1, 1, m->V, H, 1.0f, r->hf + ((int64_t)b * T + T - 1) * H, H, P(m, m->head), H,
                 0.0f, r->logits + (int64_t)b * m->V, m->V);
    return dev_check(m, "decoding", e);
}

int m1c_decoder_feed(m1c_model *m, m1c_decoder *d, const int32_t *ids, int T, float *out, m1c_err *e) {
    if (decoder_forward(m, d, ids, T, out != NULL, e)) return M1C_ERR;
    if (out) m1c_dev_copy(M1C_DEVICE_CPU, out, m->device, d->run.logits, (size_t)d->batch * m->V * sizeof *out);
    return dev_check(m, "decoding", e);
}

int m1c_decoder_feed_sample(m1c_model *m, m1c_decoder *d, const int32_t *ids, int T, const m1c_sampler *s,
                            m1c_rng *rng, int32_t *next, float *prob, m1c_err *e) {
    if (!d->sample_work) {
        size_t bytes = m1c_sample_rows_work(m->device, d->batch, m->V);
        d->sample_work = m1c_dev_alloc(m->device, bytes);
        if (!d->sample_work)
            return m1c_fail(e, "decoder: cannot allocate %.1f MiB for sampling", (double)bytes / 1048576.0);
    }
    if (decoder_forward(m, d, ids, T, 1, e)) return M1C_ERR;
    return m1c_sample_rows(m->device, s, d->run.logits, d->batch, m->V, rng, d->sample_work, next, prob, e);
}

/* ---- sampling B rows ------------------------------------------------------------------------ */

/* CPU: m1c_sample's scratch (2V floats, V ints). CUDA: probabilities (B, V), then uniforms, ids and
 * probabilities of the chosen tokens (B each). */
size_t m1c_sample_rows_work(int dev, int B, int V) {
    return dev == M1C_DEVICE_CPU ? (size_t)V * 3 * 4 : ((size_t)B * V + (size_t)B * 3) * 4;
}

int m1c_sample_rows(int dev, const m1c_sampler *s, const float *logits, int B, int V, m1c_rng *rng, void *work,
                    int32_t *next, float *prob, m1c_err *e) {
    if (dev == M1C_DEVICE_CPU) {
        float *w = work;
        for (int b = 0; b < B; b++)
            next[b] = m1c_sample(s, logits + (int64_t)b * V, V, rng, w, (int32_t *)(w + 2 * (size_t)V),
                                 prob ? &prob[b] : NULL);
        return M1C_OK;
    }
#ifdef M1C_HAVE_CUDA
    if (dev == M1C_DEVICE_CUDA) {
        /* The uniforms m1c_sample would draw, in the same order: one per row unless greedy. */
        const int greedy = s->greedy || s->temperature <= 0;
        float *u = m1c_xmalloc((size_t)B * sizeof *u);
        for (int b = 0; b < B; b++) u[b] = greedy ? 0.0f : m1c_rng_uniform(rng);
        float *p = work, *du = p + (size_t)B * V, *dprob = du + B;
        int32_t *dids = (int32_t *)(dprob + B);
        m1c_dev_copy(dev, du, M1C_DEVICE_CPU, u, (size_t)B * sizeof *u);
        m1c_cuda_sample(logits, p, B, V, greedy, s->temperature, s->top_k, s->top_p, du, dids, dprob);
        m1c_dev_copy(M1C_DEVICE_CPU, next, dev, dids, (size_t)B * sizeof *next);
        if (prob) m1c_dev_copy(M1C_DEVICE_CPU, prob, dev, dprob, (size_t)B * sizeof *prob);
        free(u);
        char msg[256];
        if (m1c_dev_take_error(dev, msg, sizeof msg)) return m1c_fail(e, "sampling on the GPU failed: %s", msg);
        return M1C_OK;
    }
#endif
    return m1c_fail(e, "sampling: device %d is not available in this build", dev);
}
