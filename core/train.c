/* The stage runner: data -> model -> objective -> backward -> clip -> optimizer, step after step. */
#include "train.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "datamix.h"
#include "host.h"
#include "log.h"
#include "metrics.h"
#include "ops.h"
#include "plan.h"
#include "timer.h"

double m1c_schedule_lr(const m1c_schedule_spec *sc, int64_t step, int64_t steps) {
    if (sc->warmup > 0 && step <= sc->warmup) return sc->lr * (double)step / (double)sc->warmup;
    double p = steps > sc->warmup ? (double)(step - sc->warmup) / (double)(steps - sc->warmup) : 1.0;
    if (p > 1) p = 1;
    switch (sc->decay) {
    case M1C_DECAY_CONSTANT: return sc->lr;
    case M1C_DECAY_LINEAR: return sc->lr + (sc->min_lr - sc->lr) * p;
    default: return sc->min_lr + (sc->lr - sc->min_lr) * 0.5 * (1.0 + cos(M_PI * p));
    }
}

static uint64_t mix64(uint64_t a, uint64_t b) {
    uint64_t z = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ---- the optimizer step overlapped with the backward (train.h) ---- */

static int overlap_ready(void *ctx, int first, int end) {
    m1c_overlap *o = ctx;
    const int dev = o->m->device;
    void *bg = m1c_dev_background_stream(dev);
    m1c_dev_order(dev, bg, m1c_dev_stream(dev)); /* after the backward that finished these gradients */
    m1c_optim_step os = o->os;
    os.n = end - first;
    os.params = o->os.params + first, os.grads = o->os.grads + first;
    os.state = o->os.state + (size_t)first * (size_t)o->n_state, os.no_decay = o->os.no_decay + first;
    os.params_lp = o->os.params_lp ? o->os.params_lp + first : NULL;
    os.stream = bg, os.flags |= M1C_OPTIM_BACKGROUND;
    if (M1C_OPTIMIZER(o->plugin)->step(o->opt, &os) == M1C_OK) return M1C_OK;
    m1c_err e;
    m1c_plugin_fail(o->plugin, &e, "step");
    snprintf(o->run->grads_err, sizeof o->run->grads_err, "%s", e.msg);
    return M1C_ERR;
}

void m1c_zero_grads(m1c_model *m, int overlap) {
    const int dev = m->device;
    if (!overlap || !m->grads.base) {
        m1c_model_zero_grads(m, m1c_dev_stream(dev));
        return;
    }
    void *bg = m1c_dev_background_stream(dev);
    m1c_dev_order(dev, bg, m1c_dev_stream(dev)); /* after the last step's reads of the gradients */
    m1c_model_zero_grads(m, bg);
}

int m1c_backward_overlapped(m1c_overlap *o, m1c_run *r, m1c_err *e) {
    const int dev = o->m->device;
    void *cs = m1c_dev_stream(dev), *bg = m1c_dev_background_stream(dev);
    m1c_dev_order(dev, cs, bg); /* after the gradients' zeroing (m1c_zero_grads) */
    o->run = r;
    r->grads_ready = overlap_ready;
    r->grads_ctx = o;
    const int rc = m1c_model_backward(o->m, r, e);
    m1c_dev_order(dev, cs, bg); /* the next work on the core's stream sees the stepped parameters */
    r->grads_ready = NULL;
    r->grads_ctx = NULL;
    return rc;
}

int m1c_overlap_possible(const m1c_model *m, const m1c_plugin *opt, double clip) {
    return m->device == M1C_DEVICE_CUDA && !(clip > 0) && opt->desc->abi_major == M1C_ABI_MAJOR &&
           opt->desc->abi_minor >= 1;
}

m1c_optim_step m1c_optim_step_of(m1c_model *m, m1c_tensor *state, int64_t step, float lr) {
    const m1c_optim_step os = {.step = step, .lr = lr, .n = m->params.n, .device = m->device,
                               .params = m->params.t, .grads = m->grads.t, .state = state,
                               .no_decay = m->no_decay, .params_lp = m->params_lp.base ? m->params_lp.t : NULL,
                               .stream = m1c_dev_stream(m->device)};
    return os;
}


/* Everything a stage holds while it runs. */
typedef struct stage_ctx {
    const m1c_stage_spec *st;
    m1c_datamix data;
    m1c_plugin *obj_p, *opt_p;
    void *obj, *opt;
    m1c_arena opt_state;
    int n_state;
    m1c_run run;
    int32_t *tokens;
    float *mask;
} stage_ctx;

static int stage_open(stage_ctx *c, m1c_session *s, const m1c_stage_spec *st, m1c_err *e) {
    memset(c, 0, sizeof *c);
    c->st = st;
    m1c_model *m = &s->model;
    const char *base = m1c_config_dir(s->cfg);
    if (m1c_datamix_open(&c->data, s, st, e) ||
        m1c_registry_load(&s->reg, st->objective.plugin, base, M1C_KIND_OBJECTIVE, &c->obj_p, e) ||
        m1c_registry_load(&s->reg, st->optimizer.plugin, base, M1C_KIND_OPTIMIZER, &c->opt_p, e))
        return M1C_ERR;
    if (M1C_OBJECTIVE(c->obj_p)->create(&c->obj_p->host, st->objective.settings, &c->obj))
        return m1c_plugin_fail(c->obj_p, e, "create");
    const m1c_optimizer_vtable *ov = M1C_OPTIMIZER(c->opt_p);
    if (ov->create(&c->opt_p->host, st->optimizer.settings, &c->opt)) return m1c_plugin_fail(c->opt_p, e, "create");
    const char *names[16];
    c->n_state = ov->state(c->opt, names, 16);
    if (c->n_state < 0 || c->n_state > 16) return m1c_plugin_fail(c->opt_p, e, "state");
    m1c_arena_init(&c->opt_state, m->device);
    for (int i = 0; i < m->params.n; i++)
        for (int j = 0; j < c->n_state; j++) {
            char *name = m1c_xasprintf("%s.%s", m->params.t[i].name, names[j]);
            m1c_arena_add(&c->opt_state, name, M1C_F32, m->params.t[i].ndim, m->params.t[i].shape);
            free(name);
        }
    if (m1c_arena_alloc(&c->opt_state, e)) return M1C_ERR;
    if (m1c_run_init(&c->run, m, st->batch, st->seq_len, 1, e)) return M1C_ERR;
    c->tokens = m1c_xmalloc((size_t)st->batch * (st->seq_len + 1) * sizeof *c->tokens);
    c->mask = m1c_xmalloc((size_t)st->batch * st->seq_len * sizeof *c->mask);
    return M1C_OK;
}

static void stage_close(stage_ctx *c, m1c_model *m) {
    m1c_datamix_close(&c->data);
    if (c->obj) M1C_OBJECTIVE(c->obj_p)->destroy(c->obj);
    if (c->opt) M1C_OPTIMIZER(c->opt_p)->destroy(c->opt);
    m1c_arena_free(&c->opt_state);
    if (c->run.attn) m1c_run_free(&c->run, m);
    free(c->tokens);
    free(c->mask);
    memset(c, 0, sizeof *c);
}

static int next_batch(stage_ctx *c, int split, m1c_err *e) {
    return m1c_datamix_next(&c->data, split, c->st->batch, c->st->seq_len, c->tokens, c->mask, e);
}

/* Mean negative log-likelihood over the masked tokens of `batches` validation batches. */
static int evaluate(stage_ctx *c, m1c_model *m, int batches, double *val_loss, m1c_err *e) {
    m1c_run_set_training(&c->run, m, 0);
    double nll = 0, count = 0;
    int64_t N = (int64_t)c->st->batch * c->st->seq_len;
    int rc = M1C_OK;
    for (int i = 0; i < batches && !rc; i++) {
        if ((rc = next_batch(c, M1C_SPLIT_VALID, e)) || (rc = m1c_model_forward(m, &c->run, c->tokens, e))) break;
        for (int64_t j = 0; j < N; j++) nll -= (double)c->mask[j] * c->run.logp_host[j], count += c->mask[j];
    }
    (void)m1c_run_set_training(&c->run, m, 1); /* made for training: cannot fail */
    *val_loss = count > 0 ? nll / count : NAN;
    return rc;
}

/* Unigram entropy (nats/token) of the training targets over a few batches of a fresh data instance:
 * the loss of a model that ignores context; training must go clearly below it. */
static double unigram_entropy(stage_ctx *c, m1c_session *s, int batches) {
    m1c_datamix d;
    m1c_err e;
    double h = NAN;
    if (m1c_datamix_open(&d, s, c->st, &e) == M1C_OK) {
        int V = s->model.V, T = c->st->seq_len;
        double *cnt = m1c_xcalloc((size_t)V, sizeof *cnt), total = 0;
        int64_t N = (int64_t)c->st->batch * T;
        for (int i = 0; i < batches; i++) {
            if (m1c_datamix_next(&d, M1C_SPLIT_TRAIN, c->st->batch, T, c->tokens, c->mask, &e)) break;
            for (int64_t j = 0; j < N; j++) {
                int32_t tg = c->tokens[(j / T) * (T + 1) + j % T + 1];
                if (c->mask[j] > 0 && tg >= 0 && tg < V) cnt[tg] += 1, total += 1;
            }
        }
        h = 0;
        for (int v = 0; v < V; v++)
            if (cnt[v] > 0) h -= cnt[v] / total * log(cnt[v] / total);
        if (total <= 0) h = NAN;
        free(cnt);
    }
    m1c_datamix_close(&d);
    return h;
}

/* A failure the GPU kept during this step (host.h: m1c_dev_take_error), as the step's error. */
static int device_failed(const m1c_model *m, const m1c_stage_spec *st, int64_t step, m1c_err *e) {
    char msg[256];
    if (!m1c_dev_take_error(m->device, msg, sizeof msg)) return M1C_OK;
    return m1c_fail(e, "stage '%s' step %lld: the GPU failed: %s", st->name, (long long)step, msg);
}

static void fmt_duration(char *buf, size_t n, double s) {
    if (!isfinite(s) || s < 0) snprintf(buf, n, "?");
    else if (s < 60) snprintf(buf, n, "%.0fs", s);
    else if (s < 3600) snprintf(buf, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, n, "%dh%02dm", (int)s / 3600, (int)s % 3600 / 60);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Keep only the newest `keep` checkpoints of a stage: every "step-N" folder counts, also those off the
 * `every` grid (the stage's last step, a --max-steps stop); "step-N.tmp.PID" folders are not ones. The
 * one just written (`current`) stays even if an abandoned longer run left newer ones. */
static void prune(const char *out_dir, const char *stage, int keep, int64_t current) {
    char *sd = m1c_xasprintf("%s/%s", out_dir, stage);
    DIR *d = opendir(sd);
    int64_t *steps = NULL;
    int n = 0, cap = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        long long k;
        int len = 0;
        if (sscanf(de->d_name, "step-%lld%n", &k, &len) != 1 || de->d_name[len] || k == current) continue;
        if (n == cap) steps = m1c_xrealloc(steps, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *steps);
        steps[n++] = k;
    }
    if (d) closedir(d);
    keep--; /* `current` is one of them */
    if (n > keep) qsort(steps, (size_t)n, sizeof *steps, cmp_i64);
    for (int i = 0; i < n - keep; i++) {
        char *od = m1c_xasprintf("%s/step-%06lld", sd, (long long)steps[i]);
        m1c_remove_tree(od);
        free(od);
    }
    free(steps);
    free(sd);
}

static int save(stage_ctx *c, m1c_session *s, int stage_idx, int64_t step, double loss, char *out_path, m1c_err *e) {
    int64_t n = 0;
    void *pos = m1c_datamix_save(&c->data, &n, e);
    if (!pos) return M1C_ERR;
    char *dir = m1c_xasprintf("%s/%s/step-%06lld", s->spec.run.out_dir, c->st->name, (long long)step);
    m1c_ckpt_state cs = {stage_idx, c->st->name, step, s->spec.run.seed, pos, n, loss};
    int rc = m1c_ckpt_save(dir, &s->model, &c->opt_state, &cs, s->cfg, e);
    if (!rc) {
        snprintf(out_path, 1024, "%s", dir);
        M1C_INFO("checkpoint: %s", dir);
        if (c->st->checkpoint_keep > 0) prune(s->spec.run.out_dir, c->st->name, c->st->checkpoint_keep, step);
    }
    free(dir);
    free(pos);
    return rc;
}

static int run_stage(m1c_session *s, int idx, const m1c_ckpt_info *resume, const char *resume_dir,
                     const m1c_train_opts *o, int64_t *done_total, m1c_metrics *met, m1c_train_result *res,
                     m1c_err *e) {
    const m1c_stage_spec *st = &s->spec.run.stages[idx];
    m1c_model *m = &s->model;
    if (st->kind == M1C_STAGE_RL)
        return m1c_fail(e, "%s: stage '%s': RL stages are not supported by this build yet", m1c_config_file(s->cfg),
                        st->name);
    if (st->device != m->device)
        return m1c_fail(e, "%s: stage '%s': device '%s' differs from run.device: the model lives on one device",
                        m1c_config_file(s->cfg), st->name, st->device == M1C_DEVICE_CPU ? "cpu" : "cuda");
    stage_ctx c;
    int rc = stage_open(&c, s, st, e);
    int64_t start = 0;
    if (!rc && resume) {
        start = resume->step;
        rc = m1c_ckpt_load_optimizer(resume_dir, &c.opt_state, e);
        m1c_err le;
        if (!rc && m1c_datamix_load(&c.data, resume->data_position, resume->data_position_len, &le))
            rc = m1c_fail(e, "%s/trainer.json: data_position: %s", resume_dir, le.msg);
        if (!rc) M1C_INFO("resuming stage '%s' after step %lld from %s", st->name, (long long)start, resume_dir);
    }
    if (rc) {
        stage_close(&c, m);
        return rc;
    }
    int64_t N = (int64_t)st->batch * st->seq_len;
    if (!resume) {
        res->unigram_entropy = unigram_entropy(&c, s, 16);
        M1C_INFO("stage '%s' (%s): %lld steps of %d x %d tokens; unigram entropy of the data %.3f nats/token",
                 st->name, m1c_stage_kind_name(st->kind), (long long)st->steps, st->batch, st->seq_len,
                 res->unigram_entropy);
        static const char *const k[] = {"unigram_entropy"};
        m1c_metrics_write(met, st->name, 0, k, &res->unigram_entropy, 1);
    }
    /* Model FLOPs utilisation: training FLOPs per token (m1c plan's count, attention at the mean position
     * T/2) times tokens/s over the device's dense peak for the compute dtype. */
    double flops_tok = 0, peak = s->spec.run.peak_tflops * 1e12;
    char devname[128];
    double known = m1c_dev_peak_flops(m->device, m->compute_dtype, devname, sizeof devname);
    if (peak <= 0) peak = known;
    {
        m1c_plan p;
        m1c_err pe;
        if (m1c_plan_compute(s, st->seq_len / 2 > 0 ? st->seq_len / 2 : 1, &p, &pe) == M1C_OK) flops_tok = p.flops_train;
        m1c_plan_free(&p);
    }
    const m1c_optimizer_vtable *ov = M1C_OPTIMIZER(c.opt_p);
    const m1c_objective_vtable *obv = M1C_OBJECTIVE(c.obj_p);
    double t_stage = m1c_now(), tok_s = 0;
    int64_t done_here = 0;
    int64_t last_saved = resume ? start : -1;
    double loss = NAN;
    for (int64_t step = start + 1; step <= st->steps; step++) {
        double t0 = m1c_now();
        float lr = (float)m1c_schedule_lr(&st->schedule, step, st->steps);
        /* Without clipping on a GPU, the optimizer steps each layer during the backward (train.h). */
        const int overlap = m1c_overlap_possible(m, c.opt_p, st->schedule.clip);
        m1c_zero_grads(m, overlap);
        if ((rc = next_batch(&c, M1C_SPLIT_TRAIN, e))) break;
        c.run.noise_seed = mix64(st->seed, (uint64_t)step);
        if ((rc = m1c_model_forward(m, &c.run, c.tokens, e))) break;
        const m1c_optim_step os = m1c_optim_step_of(m, c.opt_state.t, step, lr);
        m1c_objective_batch ob = {st->batch, st->seq_len, 1, 0, c.run.logp_host, NULL, NULL, c.mask, NULL, {0}};
        const char *mnames[16];
        double mvals[16], obj_loss = 0;
        int nm = obv->loss(c.obj, &ob, &obj_loss, c.run.dlogp_host, mnames, mvals, 16);
        if (nm < 0) {
            rc = m1c_plugin_fail(c.obj_p, e, "loss");
            break;
        }
        m1c_overlap ovl = {m, c.opt_p, c.opt, c.n_state, os, NULL};
        if ((rc = overlap ? m1c_backward_overlapped(&ovl, &c.run, e) : m1c_model_backward(m, &c.run, e))) break;
        double gnorm = sqrt(m1c_sumsq(m->device, m->grads.base, (int64_t)(m->grads.bytes / sizeof(float))));
        loss = obj_loss + c.run.aux_loss;
        if ((rc = device_failed(m, st, step, e))) break; /* before reading a norm the GPU may not have made */
        if (!isfinite(loss) || !isfinite(gnorm)) {
            /* Overlapped, the parameters have taken the step already: look at the gradients first. */
            const int k = overlap ? 1 : 0;
            const char *bad = m1c_model_first_nonfinite(m, k), *bad2 = bad ? NULL : m1c_model_first_nonfinite(m, !k);
            static const char *const what[2] = {"parameter with NaN/Inf", "gradient with NaN/Inf"};
            rc = m1c_fail(e, "stage '%s' step %lld: loss %g, gradient norm %g: not finite; first %s: %s (lower the "
                             "learning rate?)",
                          st->name, (long long)step, loss, gnorm, what[bad ? k : !k],
                          bad ? bad : bad2 ? bad2 : "none (the activations overflowed)");
            break;
        }
        if (st->schedule.clip > 0 && gnorm > st->schedule.clip)
            m1c_scale(m->device, m->grads.base, (int64_t)(m->grads.bytes / sizeof(float)), (float)(st->schedule.clip / gnorm));
        if (!overlap && ov->step(c.opt, &os)) {
            rc = m1c_plugin_fail(c.opt_p, e, "step");
            break;
        }
        if ((rc = device_failed(m, st, step, e))) break;
        double dt = m1c_now() - t0;
        done_here++;
        res->overlapped += overlap;
        tok_s = (double)N * (double)done_here / (m1c_now() - t_stage);
        if (st->metrics_every > 0 && (step % st->metrics_every == 0 || step == st->steps)) {
            double mfu = peak > 0 ? flops_tok * (double)N / dt / peak : NAN;
            const char *keys[24] = {"loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_s", "mfu"};
            double vals[24] = {loss, obj_loss, c.run.aux_loss, lr, gnorm, (double)N / dt, dt, mfu};
            int n = 8;
            for (int i = 0; i < nm && n < 24; i++) keys[n] = mnames[i], vals[n++] = mvals[i];
            m1c_metrics_write(met, st->name, step, keys, vals, n);
            if (!o->quiet) {
                char eta[32];
                fmt_duration(eta, sizeof eta, (double)(st->steps - step) * (double)N / tok_s);
                char mfu_s[32] = "";
                if (peak > 0) snprintf(mfu_s, sizeof mfu_s, " | MFU %.1f%%", 100.0 * flops_tok * tok_s / peak);
                fprintf(stderr, "%s step %lld/%lld | loss %.4f | aux %.4f | lr %.2e | gnorm %.3f | %.0f tok/s%s | ETA %s\n",
                        st->name, (long long)step, (long long)st->steps, obj_loss, c.run.aux_loss, lr, gnorm, tok_s,
                        mfu_s, eta);
            }
        }
        if (st->eval_every > 0 && (step % st->eval_every == 0 || step == st->steps)) {
            double vl;
            if ((rc = evaluate(&c, m, st->eval_batches, &vl, e))) break;
            res->last_val_loss = vl;
            static const char *const k[] = {"val_loss", "val_ppl"};
            double v[] = {vl, exp(vl)};
            m1c_metrics_write(met, st->name, step, k, v, 2);
            if (!o->quiet) fprintf(stderr, "%s step %lld | validation loss %.4f | perplexity %.3f\n", st->name,
                                   (long long)step, vl, exp(vl));
        }
        int stop_now = o->max_steps > 0 && ++*done_total >= o->max_steps;
        if ((st->checkpoint_every > 0 && step % st->checkpoint_every == 0) || step == st->steps || stop_now) {
            if ((rc = save(&c, s, idx, step, loss, res->last_checkpoint, e))) break;
            last_saved = step;
        }
        res->steps = step;
        if (stop_now) {
            res->last_loss = loss;
            res->tokens_per_s = tok_s;
            stage_close(&c, m);
            return 1; /* stopped early on request */
        }
    }
    (void)last_saved;
    res->last_loss = loss;
    res->tokens_per_s = tok_s;
    stage_close(&c, m);
    return rc;
}

int m1c_train(m1c_session *s, const m1c_train_opts *o, m1c_train_result *res, m1c_err *e) {
    memset(res, 0, sizeof *res);
    res->last_val_loss = NAN;
    m1c_ckpt_info info = {0};
    int first = 0;
    if (s->spec.run.n_stages == 0)
        return m1c_fail(e, "%s: run.stages is empty: nothing to train", m1c_config_file(s->cfg));
    if (o->resume && o->init) return m1c_fail(e, "--resume and --init exclude each other");
    if (o->resume) {
        if (m1c_ckpt_read_info(o->resume, &info, e)) return M1C_ERR;
        if (info.stage >= s->spec.run.n_stages || strcmp(info.stage_name, s->spec.run.stages[info.stage].name)) {
            m1c_fail(e, "%s/trainer.json: stage '%s' (index %d) is not in %s", o->resume, info.stage_name, info.stage,
                     m1c_config_file(s->cfg));
            m1c_ckpt_info_free(&info);
            return M1C_ERR;
        }
        first = info.stage;
    }
    if (m1c_session_build_model(s, s->spec.run.seed, e) || m1c_model_alloc_grads(&s->model, e)) {
        m1c_ckpt_info_free(&info);
        return M1C_ERR;
    }
    if ((o->resume || o->init) && m1c_ckpt_load_params(o->resume ? o->resume : o->init, &s->model, e)) {
        m1c_ckpt_info_free(&info);
        return M1C_ERR;
    }
    M1C_INFO("model: %lld parameters, %d layers, hidden %d, vocabulary %d", (long long)m1c_model_param_count(&s->model),
             s->model.L, s->model.H, s->model.V);
    m1c_metrics met;
    char *mpath = m1c_xasprintf("%s/metrics.jsonl", s->spec.run.out_dir);
    int rc = m1c_metrics_open(&met, mpath, e);
    free(mpath);
    int64_t done_total = 0;
    for (int i = first; i < s->spec.run.n_stages && !rc; i++) {
        int r = run_stage(s, i, o->resume && i == first ? &info : NULL, o->resume, o, &done_total, &met, res, e);
        if (r == 1) break; /* --max-steps reached */
        rc = r;
    }
    m1c_metrics_close(&met);
    m1c_ckpt_info_free(&info);
    return rc;
}
