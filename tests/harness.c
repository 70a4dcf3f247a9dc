/* Test harness: plugin instances with separately allocated buffers (so ASan sees overruns of any
 * one of them), random data, comparisons, finite-difference gradient checks, files and processes. */
#include "harness.h"

#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../core/arena.h"
#include "../core/host.h"
#include "../core/ops.h"
#include "../core/rng.h"
#include "../core/util.h"

m1c_registry *th_registry(void) {
    /* Criterion runs every test in its own process: one registry per test process. */
    static m1c_registry reg;
    static int ready;
    if (!ready) {
        m1c_registry_init(&reg);
        m1c_registry_add_dir(&reg, M1C_TEST_PLUGIN_DIR);
        ready = 1;
    }
    return &reg;
}

m1c_plugin *th_plugin(const char *name, int kind) {
    m1c_err e = {{0}};
    m1c_plugin *p = NULL;
    if (m1c_registry_load(th_registry(), name, NULL, kind, &p, &e) != M1C_OK)
        cr_assert_fail("loading plugin '%s': %s", name, e.msg);
    return p;
}

m1c_settings *th_settings(const char *body, m1c_config **cfg) {
    m1c_err e = {{0}};
    if (m1c_config_parse(cfg, body, "test.cfg", NULL, NULL, 0, &e) != M1C_OK)
        cr_assert_fail("parsing settings '%s': %s", body, e.msg);
    return m1c_config_root(*cfg);
}

int th_try_create(const char *plugin, int kind, const char *body, const m1c_layer_info *info, m1c_plugin **pp) {
    m1c_plugin *p = th_plugin(plugin, kind);
    const m1c_layer_ops *ops = kind == M1C_KIND_ATTENTION ? &M1C_ATTENTION(p)->ops : &M1C_MOE(p)->ops;
    m1c_config *cfg = NULL;
    m1c_settings *s = th_settings(body, &cfg);
    void *self = NULL;
    p->error[0] = '\0';
    const int rc = ops->create(&p->host, s, info, &self);
    if (rc == M1C_OK) ops->destroy(self);
    m1c_config_free(cfg);
    if (pp) *pp = p;
    return rc;
}

/* Zeroed buffers for specs on dev (dtype: the spec's, or `force` when >= 0). On a GPU they lie in one
 * allocation in declaration order, each at a 256-byte boundary, as the core's arenas place a layer's
 * tensors (plugins may merge products over adjacent parameters), unless `apart`: then each has its own
 * (the plugins' fallbacks); free_tensors frees the block, or each. */
static m1c_tensor *alloc_tensors_on(int dev, const m1c_buf_spec *spec, int n, int force, int apart) {
    m1c_tensor *t = calloc((size_t)n + 1, sizeof *t); /* t[n].data: the shared block on a GPU, if any */
    size_t at[n ? n : 1], total = 0;
    for (int i = 0; i < n; i++) {
        t[i].dtype = force >= 0 ? force : spec[i].dtype;
        t[i].device = dev;
        t[i].ndim = spec[i].ndim;
        memcpy(t[i].shape, spec[i].shape, sizeof t[i].shape);
        t[i].name = spec[i].name;
        size_t bytes = (size_t)(m1c_numel(&t[i]) ? m1c_numel(&t[i]) : 1) * m1c_dtype_size(t[i].dtype);
        if (dev == M1C_DEVICE_CPU || apart) {
            t[i].data = dev == M1C_DEVICE_CPU ? calloc(1, bytes) : m1c_dev_alloc(dev, bytes);
            cr_assert_not_null(t[i].data);
            if (dev != M1C_DEVICE_CPU) m1c_dev_memset0(dev, t[i].data, bytes);
        }
        at[i] = total, total += (bytes + 255) / 256 * 256;
    }
    if (dev != M1C_DEVICE_CPU && !apart && n > 0) {
        char *block = m1c_dev_alloc(dev, total);
        cr_assert_not_null(block);
        m1c_dev_memset0(dev, block, total);
        for (int i = 0; i < n; i++) t[i].data = block + at[i];
        t[n].data = block;
    }
    return t;
}

static m1c_tensor *alloc_tensors(const m1c_buf_spec *spec, int n) {
    return alloc_tensors_on(M1C_DEVICE_CPU, spec, n, -1, 0);
}

static void free_tensors(m1c_tensor *t, int n) {
    if (t && n > 0 && t[n].data) { /* one block on a GPU */
        m1c_dev_free(t[0].device, t[n].data);
        n = 0;
    }
    for (int i = 0; t && i < n; i++) {
        if (t[i].device == M1C_DEVICE_CPU) free(t[i].data);
        else m1c_dev_free(t[i].device, t[i].data); /* its own allocation */
    }
    free(t);
}

float *th_to_dev(int dev, const float *host, int64_t n) {
    float *d = dev == M1C_DEVICE_CPU ? malloc((size_t)(n ? n : 1) * 4) : m1c_dev_alloc(dev, (size_t)(n ? n : 1) * 4);
    cr_assert_not_null(d);
    m1c_dev_copy(dev, d, M1C_DEVICE_CPU, host, (size_t)n * 4);
    return d;
}

float *th_to_host(int dev, const float *ptr, int64_t n) {
    float *h = malloc((size_t)(n ? n : 1) * 4);
    m1c_dev_copy(M1C_DEVICE_CPU, h, dev, ptr, (size_t)n * 4);
    return h;
}

void th_dev_free(int dev, void *p) {
    if (dev == M1C_DEVICE_CPU) free(p);
    else m1c_dev_free(dev, p);
}

typedef int (*declare_fn)(void *self, int B, int T, m1c_buf_spec *specs, int max);

static m1c_buf_spec *declare(void *self, declare_fn fn, int B, int T, int *n) {
    *n = fn(self, B, T, NULL, 0);
    cr_assert_geq(*n, 0, "buffer declaration failed");
    m1c_buf_spec *s = calloc((size_t)(*n ? *n : 1), sizeof *s);
    cr_assert_eq(fn(self, B, T, s, *n), *n, "buffer declaration count changed between calls");
    return s;
}

th_layer *th_layer_new(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                       int B, int T, uint64_t seed, float param_std) {
    return th_layer_new_dev(plugin, settings, layer_index, n_layers, hidden, B, T, seed, param_std, M1C_DEVICE_CPU,
                            M1C_F32);
}

void th_layer_copy_params(th_layer *dst, const th_layer *src) {
    cr_assert_eq(dst->np, src->np);
    for (int i = 0; i < dst->np; i++) {
        int64_t n = m1c_numel(&dst->params[i]);
        cr_assert_eq(n, m1c_numel(&src->params[i]));
        m1c_dev_copy(dst->device, dst->params[i].data, src->device, src->params[i].data, (size_t)n * 4);
        if (dst->params_lp) m1c_to_bf16(dst->device, dst->params_lp[i].data, dst->params[i].data, n);
    }
}

/* The rest of a layer whose params and grads exist: activations and scratch on its device, the
 * buffer table (params_lp is NULL unless BF16 made it). */
static th_layer *layer_finish(th_layer *l, uint64_t seed) {
    l->aspec = declare(l->self, l->ops->acts, l->B, l->T, &l->na);
    l->sspec = declare(l->self, l->ops->scratch, l->B, l->T, &l->ns);
    l->acts = alloc_tensors_on(l->device, l->aspec, l->na, -1, 0);
    l->scratch = alloc_tensors_on(l->device, l->sspec, l->ns, -1, 0);
    l->bufs.params = l->params;
    l->bufs.grads = l->grads;
    l->bufs.acts = l->acts;
    l->bufs.scratch = l->scratch;
    l->bufs.params_lp = l->params_lp;
    l->bufs.training = 1;
    l->bufs.aux_scale = 1.0f;
    l->bufs.noise_seed = seed ^ 0x5eedull;
    return l;
}

static th_layer *layer_new(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                           int B, int T, uint64_t seed, float param_std, int device, int compute_dtype, int lp_inputs,
                           int apart) {
    if (device != M1C_DEVICE_CPU) {
        /* Same parameters as the CPU instance of this seed: draw them there, then copy. */
        th_layer *ref = th_layer_new_dev(plugin, settings, layer_index, n_layers, hidden, B, T, seed, param_std,
                                         M1C_DEVICE_CPU, M1C_F32);
        th_layer *l = calloc(1, sizeof *l);
        l->device = device, l->compute_dtype = compute_dtype;
        l->plugin = ref->plugin;
        l->ops = ref->ops;
        l->B = B, l->T = T, l->H = hidden;
        m1c_settings *s = th_settings(settings, &l->cfg);
        m1c_layer_info info = {sizeof info, layer_index, n_layers, hidden, device, compute_dtype, seed, lp_inputs, 0, {0}};
        if (l->ops->create(&l->plugin->host, s, &info, &l->self) != M1C_OK)
            cr_assert_fail("creating '%s' on device %d: %s", plugin, device, l->plugin->error);
        l->np = ref->np;
        l->pspec = calloc((size_t)(l->np ? l->np : 1), sizeof *l->pspec);
        memcpy(l->pspec, ref->pspec, (size_t)l->np * sizeof *l->pspec);
        l->params = alloc_tensors_on(device, l->pspec, l->np, -1, apart);
        l->grads = alloc_tensors_on(device, l->pspec, l->np, -1, apart);
        if (compute_dtype == M1C_BF16) l->params_lp = alloc_tensors_on(device, l->pspec, l->np, M1C_BF16, apart);
        th_layer_copy_params(l, ref);
        th_layer_free(ref);
        return layer_finish(l, seed);
    }
    th_layer *l = calloc(1, sizeof *l);
    l->device = device, l->compute_dtype = compute_dtype;
    l->plugin = th_plugin(plugin, 0);
    int kind = l->plugin->desc->kind;
    cr_assert(kind == M1C_KIND_ATTENTION || kind == M1C_KIND_MOE, "'%s' is not a layer plugin", plugin);
    l->ops = kind == M1C_KIND_ATTENTION ? &M1C_ATTENTION(l->plugin)->ops : &M1C_MOE(l->plugin)->ops;
    l->B = B, l->T = T, l->H = hidden;

    m1c_settings *s = th_settings(settings, &l->cfg);
    m1c_layer_info info = {sizeof info, layer_index, n_layers, hidden, M1C_DEVICE_CPU, 0, seed, 0, 0, {0}};
    if (l->ops->create(&l->plugin->host, s, &info, &l->self) != M1C_OK)
        cr_assert_fail("creating '%s': %s", plugin, l->plugin->error);

    l->np = l->ops->params(l->self, NULL, 0);
    cr_assert_geq(l->np, 0);
    l->pspec = calloc((size_t)(l->np ? l->np : 1), sizeof *l->pspec);
    cr_assert_eq(l->ops->params(l->self, l->pspec, l->np), l->np);
    l->params = alloc_tensors(l->pspec, l->np);
    l->grads = alloc_tensors(l->pspec, l->np);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 1);
    for (int i = 0; i < l->np; i++) {
        float *p = l->params[i].data;
        int64_t n = m1c_numel(&l->params[i]);
        const m1c_buf_spec *sp = &l->pspec[i];
        for (int64_t j = 0; j < n; j++) {
            switch (sp->init) {
            case M1C_INIT_ZEROS: p[j] = 0; break;
            /* Norm gains are randomised around 1 so that tests see their effect. */
            case M1C_INIT_ONES: p[j] = 1.0f + param_std * m1c_rng_normal(&rng); break;
            case M1C_INIT_CONST: p[j] = sp->std; break;
            default: p[j] = fmaxf(sp->std, param_std) * m1c_rng_normal(&rng); break;
            }
        }
    }
    return layer_finish(l, seed);
}

th_layer *th_layer_new_dev(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                           int B, int T, uint64_t seed, float param_std, int device, int compute_dtype) {
    return layer_new(plugin, settings, layer_index, n_layers, hidden, B, T, seed, param_std, device, compute_dtype, 0,
                     0);
}

th_layer *th_layer_new_apart(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                             int B, int T, uint64_t seed, float param_std, int device, int compute_dtype) {
    return layer_new(plugin, settings, layer_index, n_layers, hidden, B, T, seed, param_std, device, compute_dtype, 0,
                     1);
}

th_layer *th_layer_new_lp(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                          int B, int T, uint64_t seed, float param_std) {
    return layer_new(plugin, settings, layer_index, n_layers, hidden, B, T, seed, param_std, M1C_DEVICE_CUDA,
                     M1C_BF16, 1, 0);
}

void th_layer_free(th_layer *l) {
    if (!l) return;
    l->ops->destroy(l->self);
    free_tensors(l->params, l->np);
    free_tensors(l->grads, l->np);
    free_tensors(l->acts, l->na);
    free_tensors(l->scratch, l->ns);
    free_tensors(l->params_lp, l->np);
    free(l->pspec);
    free(l->aspec);
    free(l->sspec);
    m1c_config_free(l->cfg);
    free(l);
}

void th_layer_zero_grads(th_layer *l) {
    for (int i = 0; i < l->np; i++) m1c_dev_memset0(l->device, l->grads[i].data, (size_t)m1c_numel(&l->grads[i]) * 4);
}

void th_forward(th_layer *l, float *out, const float *in) {
    if (l->ops->forward(l->self, &l->bufs, out, in, l->B, l->T) != M1C_OK)
        cr_assert_fail("forward: %s", l->plugin->error);
}

void th_backward(th_layer *l, float *din, const float *dout, const float *in) {
    if (l->ops->backward(l->self, &l->bufs, din, dout, in, l->B, l->T) != M1C_OK)
        cr_assert_fail("backward: %s", l->plugin->error);
}

th_state *th_state_new(th_layer *l, int batch, int64_t max_len) {
    cr_assert_eq(l->plugin->desc->kind, M1C_KIND_ATTENTION);
    const m1c_attention_vtable *vt = M1C_ATTENTION(l->plugin);
    th_state *s = calloc(1, sizeof *s);
    s->n = vt->state(l->self, batch, max_len, NULL, 0);
    cr_assert_geq(s->n, 0);
    s->spec = calloc((size_t)(s->n ? s->n : 1), sizeof *s->spec);
    cr_assert_eq(vt->state(l->self, batch, max_len, s->spec, s->n), s->n);
    s->t = alloc_tensors_on(l->device, s->spec, s->n, -1, 0);
    return s;
}

void th_state_free(th_state *s) {
    if (!s) return;
    free_tensors(s->t, s->n);
    free(s->spec);
    free(s);
}

float *th_randn(int64_t n, uint64_t seed, float std) {
    float *x = malloc((size_t)(n ? n : 1) * sizeof *x);
    m1c_rng r;
    m1c_rng_seed(&r, seed, 0);
    m1c_rng_fill_normal(&r, x, n, std);
    return x;
}

float *th_zeros(int64_t n) { return calloc((size_t)(n ? n : 1), sizeof(float)); }

double th_max_abs_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

double th_max_abs(const float *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i]));
    return m;
}

double th_rel_err(const float *a, const float *b, int64_t n, double atol, double rtol) {
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double r = fabs((double)a[i] - (double)b[i]) / (atol + rtol * fabs((double)b[i]));
        if (r != r) return INFINITY;
        worst = fmax(worst, r);
    }
    return worst;
}

/* L = sum(out * w) in double, for one forward at the current parameters. */
static double fd_loss(th_layer *l, float *out, const float *in, const float *w, int64_t n) {
    th_forward(l, out, in);
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * (double)w[i];
    return s;
}

/* The central difference of L in one coordinate x[i] (of the input or of a parameter); x[i] is restored. */
static double fd_central(th_layer *l, float *out, const float *in, const float *w, int64_t n, float *x, int64_t i,
                         float eps) {
    float x0 = x[i];
    x[i] = x0 + eps;
    double lp = fd_loss(l, out, in, w, n);
    x[i] = x0 - eps;
    double lm = fd_loss(l, out, in, w, n);
    x[i] = x0;
    return (lp - lm) / (2.0 * eps);
}

static double fd_compare(const char *what, int64_t idx, double a, double num, double worst) {
    double r = fabs(a - num) / fmax(1e-3, fabs(a) + fabs(num));
    if (r > worst) cr_log_info("fd: %s[%ld]: analytic %.6g numeric %.6g (rel %.3g)", what, (long)idx, a, num, r);
    return fmax(worst, r);
}

double th_fd_check_layer(th_layer *l, const float *in_const, float eps, int samples, uint64_t seed) {
    int64_t n = (int64_t)l->B * l->T * l->H;
    float *in = malloc((size_t)n * sizeof *in);
    memcpy(in, in_const, (size_t)n * sizeof *in);
    float *out = th_zeros(n), *din = th_zeros(n);
    float *w = th_randn(n, seed ^ 0xfdull, 1.0f);

    th_layer_zero_grads(l);
    th_forward(l, out, in);
    th_backward(l, din, w, in);

    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 7);
    double worst = 0;
    for (int s = 0; s < samples; s++) {
        int64_t i = (int64_t)(m1c_rng_u64(&rng) % (uint64_t)n);
        worst = fd_compare("input", i, din[i], fd_central(l, out, in, w, n, in, i, eps), worst);
    }
    for (int p = 0; p < l->np; p++) {
        float *x = l->params[p].data, *g = l->grads[p].data;
        int64_t np = m1c_numel(&l->params[p]);
        for (int s = 0; s < samples; s++) {
            int64_t i = (int64_t)(m1c_rng_u64(&rng) % (uint64_t)np);
            worst = fd_compare(l->pspec[p].name, i, g[i], fd_central(l, out, in, w, n, x, i, eps), worst);
        }
    }
    free(in);
    free(out);
    free(din);
    free(w);
    return worst;
}

m1c_tensor *th_find_buf(m1c_tensor *t, const m1c_buf_spec *s, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(s[i].name, name) == 0) return &t[i];
    cr_assert_fail("no buffer named '%s'", name);
    return NULL;
}

m1c_tensor th_vec(void *data, int64_t n, int dtype, int device, const char *name) {
    m1c_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.ndim = 1;
    t.shape[0] = n;
    t.name = name;
    return t;
}

th_text th_softmax_settings(const th_softmax_cfg *c) {
    th_text buf;
    const int n = snprintf(buf.s, sizeof buf.s,
                           "heads = %d; kv_heads = %d; head_dim = %d; rotary_dim = %d; rope_theta = %.1f;", c->nh,
                           c->kvh, c->hd, c->rd, c->theta);
    if (c->kernel && n > 0 && (size_t)n < sizeof buf.s)
        snprintf(buf.s + n, sizeof buf.s - (size_t)n, " kernel = \"%s\";", c->kernel);
    return buf;
}

void th_need_gpu(void) {
    if (!m1c_dev_available(M1C_DEVICE_CUDA)) cr_skip_test("no CUDA device in this build or on this machine");
}

void th_assert_has(const char *s, const char *sub) {
    cr_assert(strstr(s, sub) != NULL, "expected '%s' in: %s", sub, s);
}

/* ---- files and processes ---------------------------------------------------------------------- */

char *th_slurp(const char *path, long *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    cr_assert_eq(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = 0;
    fclose(f);
    if (len) *len = n;
    return s;
}

size_t th_read_into(const char *path, void *buf, size_t cap) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    return n;
}

void th_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot write %s", path);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

char *th_mkdtemp(const char *parent, const char *name) {
    char *d = m1c_xasprintf("%s/%s_XXXXXX", parent, name);
    cr_assert_not_null(mkdtemp(d), "mkdtemp %s failed", d);
    return d;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

int th_rm_rf(const char *path) { return nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

/* The scratch folder of this test process (Criterion: one process per test): th_tmpdir_init records
 * its tag and the first th_tmpdir makes it, so that a test skipped before using it (cr_skip_test does
 * not run the suite's .fini) leaves nothing behind. */
static char scratch_tag[64], scratch[PATH_MAX];

void th_tmpdir_init(const char *tag) {
    cr_assert_lt(strlen(tag), sizeof scratch_tag);
    strcpy(scratch_tag, tag);
    scratch[0] = 0;
}

void th_tmpdir_fini(void) {
    if (scratch[0]) th_rm_rf(scratch);
    scratch[0] = scratch_tag[0] = 0;
}

const char *th_tmpdir(void) {
    if (!scratch[0]) {
        cr_assert(scratch_tag[0], "no scratch folder: the suite's .init must call th_tmpdir_init");
        char *name = m1c_xasprintf("m1c_test_%s", scratch_tag);
        char *d = th_mkdtemp("/tmp", name);
        cr_assert_lt(strlen(d), sizeof scratch);
        strcpy(scratch, d);
        free(d);
        free(name);
    }
    return scratch;
}

char *th_tmpdir_path(const char *name) { return m1c_path_join(th_tmpdir(), name); }

const char *th_tmp(const char *name) {
    static char buf[4][PATH_MAX + 256];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", th_tmpdir(), name);
    return buf[k];
}

int th_run_m1c(const char *const *args, char **out, char **err) {
    const char *argv[64];
    int n = 0;
    argv[n++] = M1C_BINARY_DIR "/m1c";
    for (int i = 0; args[i]; i++) {
        cr_assert_lt(n, 63, "too many arguments for th_run_m1c");
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    char *po = out ? th_tmpdir_path("m1c.stdout") : m1c_xstrdup("/dev/null");
    char *pe = err ? th_tmpdir_path("m1c.stderr") : m1c_xstrdup("/dev/null");
    fflush(stdout), fflush(stderr);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        int fo = open(po, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(pe, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(127);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    if (out) *out = th_slurp(po, NULL);
    if (err) *err = th_slurp(pe, NULL);
    free(po), free(pe);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

char *th_shell(const char *cmd, int *status) {
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p, "%s", cmd);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (size_t k; (k = fread(buf + n, 1, cap - 1 - n, p)) > 0;) {
        n += k;
        if (n + 1 == cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    int st = pclose(p);
    if (status) *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return buf;
}
