/* Tests of the optimizer plugins: AdamW against a double-precision reference of torch.optim.AdamW's
 * formulas (textbook form with m-hat and v-hat), weight decay and no_decay, eps 1e-15, refusals. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "harness.h"

typedef struct opt {
    m1c_plugin *p;
    const m1c_optimizer_vtable *vt;
    void *self;
    m1c_config *cfg;
} opt;

/* Create an adamw instance from a settings body; returns create's status (the error is in o->p->error). */
static int opt_create(opt *o, const char *settings) {
    memset(o, 0, sizeof *o);
    o->p = th_plugin("adamw", M1C_KIND_OPTIMIZER);
    o->vt = M1C_OPTIMIZER(o->p);
    o->p->error[0] = '\0';
    m1c_settings *s = th_settings(settings, &o->cfg);
    return o->vt->create(&o->p->host, s, &o->self);
}

static void opt_free(opt *o) {
    if (o->self) o->vt->destroy(o->self);
    m1c_config_free(o->cfg);
}

/* A host f32 vector. */
static m1c_tensor vec(float *data, int64_t n, const char *name) {
    return th_vec(data, n, M1C_F32, M1C_DEVICE_CPU, name);
}

/* torch.optim.AdamW, written from its documentation in double: decoupled decay, moments, bias-corrected
 * m-hat and v-hat. */
static void ref_adamw_step(double *p, double *m, double *v, const float *g, int64_t n, int64_t step,
                           double lr, double b1, double b2, double eps, double wd) {
    const double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
    for (int64_t j = 0; j < n; j++) {
        p[j] -= lr * wd * p[j];
        m[j] = b1 * m[j] + (1.0 - b1) * g[j];
        v[j] = b2 * v[j] + (1.0 - b2) * (double)g[j] * g[j];
        const double mhat = m[j] / bc1, vhat = v[j] / bc2;
        p[j] -= lr * mhat / (sqrt(vhat) + eps);
    }
}

/* Three tensors: a small decayed one, a small no_decay one, and one big enough (40000 > the plugin's
 * 16384-element threshold) to run the OpenMP path. */
#define NT 3
static const int64_t sizes[NT] = {15, 7, 40000};
static const int32_t no_decay[NT] = {0, 1, 0};

static void run_adamw_vs_ref(const char *settings, double b1, double b2, double eps, double wd, float gscale,
                             int steps) {
    opt o;
    cr_assert_eq(opt_create(&o, settings), M1C_OK, "create: %s", o.p->error);
    const char *names[4];
    cr_assert_eq(o.vt->state(o.self, names, 4), 2);
    cr_assert_str_eq(names[0], "exp_avg");
    cr_assert_str_eq(names[1], "exp_avg_sq");

    m1c_tensor params[NT], grads[NT], state[NT * 2];
    float *pf[NT], *gf[NT], *mf[NT], *vf[NT];
    double *pd[NT], *md[NT], *vd[NT];
    for (int i = 0; i < NT; i++) {
        const int64_t n = sizes[i];
        pf[i] = th_randn(n, 100 + i, 1.0f);
        gf[i] = th_zeros(n);
        mf[i] = th_zeros(n);
        vf[i] = th_zeros(n);
        pd[i] = calloc((size_t)n, sizeof(double));
        md[i] = calloc((size_t)n, sizeof(double));
        vd[i] = calloc((size_t)n, sizeof(double));
        for (int64_t j = 0; j < n; j++) pd[i][j] = pf[i][j];
        params[i] = vec(pf[i], n, "p");
        grads[i] = vec(gf[i], n, "g");
        state[2 * i] = vec(mf[i], n, "exp_avg");
        state[2 * i + 1] = vec(vf[i], n, "exp_avg_sq");
    }
    for (int step = 1; step <= steps; step++) {
        const float lr = 1e-2f * (1.0f + 0.25f * step); /* changes every step, as a schedule would */
        for (int i = 0; i < NT; i++) {
            float *g = th_randn(sizes[i], 1000 * step + i, gscale);
            memcpy(gf[i], g, sizeof(float) * (size_t)sizes[i]);
            free(g);
            const double wdi = no_decay[i] ? 0.0 : wd;
            ref_adamw_step(pd[i], md[i], vd[i], gf[i], sizes[i], step, lr, b1, b2, eps, wdi);
        }
        m1c_optim_step a = {.step = step, .lr = lr, .n = NT, .device = M1C_DEVICE_CPU, .params = params,
                            .grads = grads, .state = state, .no_decay = no_decay};
        cr_assert_eq(o.vt->step(o.self, &a), M1C_OK, "step %d: %s", step, o.p->error);
    }
    for (int i = 0; i < NT; i++) {
        double wp = 0.0, wm = 0.0, wv = 0.0;
        for (int64_t j = 0; j < sizes[i]; j++) {
            wp = fmax(wp, fabs(pf[i][j] - pd[i][j]));
            /* exp_avg crosses zero, so it is measured against the gradient scale, not itself. */
            wm = fmax(wm, fabs(mf[i][j] - md[i][j]) / gscale);
            wv = fmax(wv, fabs(vf[i][j] - vd[i][j]) / (fabs(vd[i][j]) + 1e-30));
        }
        /* Parameters are O(1): f32 ulp 1.2e-7, about 4 roundings of p per step plus the rounded update
         * (relative 1e-6 of lr ~ 2e-2) over <= 5 steps gives ~3e-6; 1e-5 keeps margin and is still 100x
         * below the smallest effect a bug would have (weight decay lr*wd*|p| ~ 1e-3). */
        cr_log_info("tensor %d: max |dp| %.3g, exp_avg %.3g, exp_avg_sq %.3g", i, wp, wm, wv);
        cr_expect_leq(wp, 1e-5, "tensor %d: params differ from the reference by %g", i, wp);
        /* exp_avg is O(gscale): two f32 roundings per step (6e-8 each, relative to values <= ~4 gscale),
         * summed over <= 5 steps stays below 5e-6 gscale; 1e-5 keeps margin. A wrong beta1 (even
         * 1 - 0.9f vs 0.1f) shows at 1e-7 relative, so this does not test that; params do. */
        cr_expect_leq(wm, 1e-5, "tensor %d: exp_avg error %g of the gradient scale", i, wm);
        /* exp_avg_sq is a sum of positive terms: relative error ~ 2 roundings per step, 6e-8 each, over
         * <= 5 steps ~ 6e-7; 2e-6 would fail for 1 - beta2 rounded as 1 - 0.999f (1.3e-5 off). */
        cr_expect_leq(wv, 2e-6, "tensor %d: exp_avg_sq relative error %g", i, wv);
    }
    for (int i = 0; i < NT; i++) {
        free(pf[i]), free(gf[i]), free(mf[i]), free(vf[i]);
        free(pd[i]), free(md[i]), free(vd[i]);
    }
    opt_free(&o);
}

Test(adamw, matches_reference_defaults) { run_adamw_vs_ref("", 0.9, 0.999, 1e-8, 0.0, 1.0f, 5); }

Test(adamw, matches_reference_weight_decay_no_decay) {
    run_adamw_vs_ref("beta1 = 0.8; beta2 = 0.95; eps = 1e-6; weight_decay = 0.1;", 0.8, 0.95, 1e-6, 0.1, 1.0f,
                     5);
}

/* M1's setting: eps 1e-15 with gradients of order 1e-12 (M1 reports 1e-18..1e-5). */
Test(adamw, tiny_eps_with_tiny_gradients) {
    run_adamw_vs_ref("beta1 = 0.9; beta2 = 0.95; eps = 1e-15;", 0.9, 0.95, 1e-15, 0.0, 1e-12f, 3);

    /* At step 1 m-hat = g and v-hat = g^2, so the update is lr * g / (|g| + eps): with eps 1e-15 every
     * element moves by ~lr. Had eps been clamped to 1e-8 it would move by ~1e-4 lr. */
    opt o;
    cr_assert_eq(opt_create(&o, "beta2 = 0.95; eps = 1e-15;"), M1C_OK, "create: %s", o.p->error);
    float p[4] = {1, 1, 1, 1}, g[4] = {1e-12f, -3e-12f, 5e-13f, 0.0f}, m[4] = {0}, v[4] = {0};
    m1c_tensor tp = vec(p, 4, "p"), tg = vec(g, 4, "g"), ts[2] = {vec(m, 4, "m"), vec(v, 4, "v")};
    m1c_optim_step a = {.step = 1, .lr = 1e-3f, .n = 1, .params = &tp, .grads = &tg, .state = ts};
    cr_assert_eq(o.vt->step(o.self, &a), M1C_OK, "%s", o.p->error);
    /* Expected lr * g / (|g| + 1e-15) from the formula in double; 1e-6 covers f32 rounding of p near 1
     * (ulp 1.2e-7) and of the update, and is 1000x below the ~1e-3 miss of a clamped eps. */
    const double gs[3] = {1e-12, -3e-12, 5e-13};
    for (int j = 0; j < 3; j++) {
        const double want = 1.0 - 1e-3 * gs[j] / (fabs(gs[j]) + 1e-15);
        cr_expect(fabs(p[j] - want) <= 1e-6, "p[%d] = %.9g, want %.9g", j, p[j], want);
    }
    /* A zero gradient (and zero moments) must give 0 / (0 + eps) = 0, not NaN. */
    cr_expect_eq(p[3], 1.0f, "p[3] = %.9g", p[3]);
    opt_free(&o);
}

Test(adamw, refuses_cuda_and_bad_tensors) {
    opt o;
    cr_assert_eq(opt_create(&o, ""), M1C_OK, "create: %s", o.p->error);
    float p[2] = {1, 2}, g[2] = {1, 1}, m[2] = {0}, v[2] = {0};
    m1c_tensor tp = vec(p, 2, "p"), tg = vec(g, 2, "g"), ts[2] = {vec(m, 2, "m"), vec(v, 2, "v")};
    m1c_optim_step a = {.step = 1, .lr = 1e-3f, .n = 1, .device = M1C_DEVICE_CUDA, .params = &tp,
                        .grads = &tg, .state = ts};
    cr_expect_eq(o.vt->step(o.self, &a), M1C_ERR);
    cr_expect(strstr(o.p->error, "CUDA") != NULL, "error: %s", o.p->error);

    a.device = M1C_DEVICE_CPU;
    ts[1].shape[0] = 1; /* state of the wrong size: refused before anything is written */
    o.p->error[0] = '\0';
    cr_expect_eq(o.vt->step(o.self, &a), M1C_ERR);
    cr_expect(strstr(o.p->error, "exp_avg_sq") != NULL, "error: %s", o.p->error);
    cr_expect(p[0] == 1.0f && p[1] == 2.0f && m[0] == 0.0f, "a refused step changed the parameters");

    ts[1].shape[0] = 2;
    a.step = 0; /* steps are 1-based: step 0 would divide by 1 - beta^0 = 0 */
    cr_expect_eq(o.vt->step(o.self, &a), M1C_ERR);
    opt_free(&o);
}

static void expect_refused(const char *settings, const char *key) {
    opt o;
    cr_expect_eq(opt_create(&o, settings), M1C_ERR, "'%s' was accepted", settings);
    cr_expect(strstr(o.p->error, key) != NULL, "'%s': error does not name %s: %s", settings, key, o.p->error);
    cr_log_info("refused: %s", o.p->error);
    opt_free(&o);
}

Test(adamw, settings_validation) {
    expect_refused("beta_1 = 0.9;", "beta_1"); /* typo: unknown key */
    expect_refused("beta1 = 1.5;", "beta1");
    expect_refused("beta2 = -0.1;", "beta2");
    expect_refused("beta2 = 1.0;", "beta2"); /* 1 - beta2^t = 0 */
    expect_refused("eps = 0.0;", "eps");
    expect_refused("weight_decay = -0.01;", "weight_decay");

    opt o;
    cr_expect_eq(opt_create(&o, "beta1 = 0.9; beta2 = 0.95; eps = 1e-15; weight_decay = 0.1;"), M1C_OK, "%s",
                 o.p->error);
    opt_free(&o);
}

/* beta = 1 passes the getter's closed range [0, 1] and is refused afterwards through settings_error: the
 * message must still point at the file, the line of the offending key and the key itself. The keys sit
 * on different lines so that a wrong line number (the group's, or the other key's) shows. */
static void expect_refused_at(const char *settings, const char *where, const char *key) {
    opt o;
    cr_expect_eq(opt_create(&o, settings), M1C_ERR, "'%s' was accepted", settings);
    cr_expect(strstr(o.p->error, where) != NULL, "'%s': error does not start at %s: %s", settings, where,
              o.p->error);
    cr_expect(strstr(o.p->error, key) != NULL, "'%s': error does not name %s: %s", settings, key, o.p->error);
    cr_log_info("refused: %s", o.p->error);
    opt_free(&o);
}

Test(adamw, beta_one_error_names_line_and_key) {
    expect_refused_at("beta1 = 0.9;\nbeta2 = 1.0;\n", "test.cfg:2: beta2: must be < 1, got 1",
                      "1 - beta2^t");
    expect_refused_at("eps = 1e-8;\n\nbeta1 = 1.0;\nbeta2 = 0.95;\n",
                      "test.cfg:3: beta1: must be < 1, got 1", "1 - beta1^t");
}
