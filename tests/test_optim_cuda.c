/* The AdamW plugin on a CUDA device against the same plugin on the CPU: several steps over tensors of
 * odd sizes (and more tensors than one kernel launch takes), weight decay and no_decay, the bf16
 * parameter copies written by the kernel, and refusals. Skipped where there is no GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "harness.h"

/* The CPU reference of bf16 rounding (round to nearest even), written out here rather than taken from
 * the code under test; params are finite in these tests, so NaN needs no case. */
static uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Max over elements of |a - b| / (atol + rtol |b|); <= 1 means within tolerance. Counts exact matches. */
static double rel_err(const float *a, const float *b, int64_t n, double atol, double rtol, int64_t *differ) {
    double w = 0;
    for (int64_t j = 0; j < n; j++) {
        if (memcmp(&a[j], &b[j], 4) != 0) (*differ)++;
        double r = fabs((double)a[j] - (double)b[j]) / (atol + rtol * fabs((double)b[j]));
        w = r != r ? INFINITY : fmax(w, r);
    }
    return w;
}

/* One AdamW instance runs `steps` steps on the CPU tensors and on copies of them on the GPU, with the
 * same gradients each step; then parameters and both moments are compared, and the bf16 copies against
 * the rounding of the GPU's parameters. */
static void run_gpu_vs_cpu(const char *settings, int nt, const int64_t *sizes, const int32_t *no_decay, int steps) {
    m1c_plugin *p = th_plugin("adamw", M1C_KIND_OPTIMIZER);
    const m1c_optimizer_vtable *vt = M1C_OPTIMIZER(p);
    m1c_config *cfg;
    void *self = NULL;
    p->error[0] = '\0';
    cr_assert_eq(vt->create(&p->host, th_settings(settings, &cfg), &self), M1C_OK, "create: %s", p->error);

    m1c_tensor *cp = calloc((size_t)nt, sizeof *cp), *cg = calloc((size_t)nt, sizeof *cg);
    m1c_tensor *cs = calloc((size_t)nt * 2, sizeof *cs);
    m1c_tensor *gp = calloc((size_t)nt, sizeof *gp), *gg = calloc((size_t)nt, sizeof *gg);
    m1c_tensor *gs = calloc((size_t)nt * 2, sizeof *gs), *glp = calloc((size_t)nt, sizeof *glp);
    cr_assert(cp && cg && cs && gp && gg && gs && glp);
    for (int i = 0; i < nt; i++) {
        const int64_t n = sizes[i];
        float *x = th_randn(n, 100 + (uint64_t)i, 1.0f);
        /* Moments start non-zero (as after earlier steps) so that their update is tested from step 1;
         * exp_avg_sq must stay >= 0. */
        float *m = th_randn(n, 200 + (uint64_t)i, 0.1f), *v = th_randn(n, 300 + (uint64_t)i, 0.1f);
        for (int64_t j = 0; j < n; j++) v[j] = v[j] * v[j];
        cp[i] = th_vec(x, n, M1C_F32, M1C_DEVICE_CPU, "p");
        cg[i] = th_vec(th_zeros(n), n, M1C_F32, M1C_DEVICE_CPU, "g");
        cs[2 * i] = th_vec(m, n, M1C_F32, M1C_DEVICE_CPU, "exp_avg");
        cs[2 * i + 1] = th_vec(v, n, M1C_F32, M1C_DEVICE_CPU, "exp_avg_sq");
        gp[i] = th_vec(th_to_dev(M1C_DEVICE_CUDA, x, n), n, M1C_F32, M1C_DEVICE_CUDA, "p");
        gg[i] = th_vec(m1c_dev_alloc(M1C_DEVICE_CUDA, (size_t)n * 4), n, M1C_F32, M1C_DEVICE_CUDA, "g");
        gs[2 * i] = th_vec(th_to_dev(M1C_DEVICE_CUDA, m, n), n, M1C_F32, M1C_DEVICE_CUDA, "exp_avg");
        gs[2 * i + 1] = th_vec(th_to_dev(M1C_DEVICE_CUDA, v, n), n, M1C_F32, M1C_DEVICE_CUDA, "exp_avg_sq");
        glp[i] = th_vec(m1c_dev_alloc(M1C_DEVICE_CUDA, (size_t)n * 2), n, M1C_BF16, M1C_DEVICE_CUDA, "p.bf16");
        m1c_dev_memset0(M1C_DEVICE_CUDA, glp[i].data, (size_t)n * 2);
    }

    for (int step = 1; step <= steps; step++) {
        const float lr = 1e-2f * (1.0f + 0.25f * (float)step); /* changes every step, as a schedule would */
        for (int i = 0; i < nt; i++) {
            /* Gradients of mixed scales, zeros included (v then decays, m shrinks). */
            float *g = th_randn(sizes[i], 1000 * (uint64_t)step + (uint64_t)i, step == 2 ? 1e-3f : 1.0f);
            if (sizes[i] > 3) g[3] = 0.0f;
            memcpy(cg[i].data, g, (size_t)sizes[i] * 4);
            m1c_dev_copy(M1C_DEVICE_CUDA, gg[i].data, M1C_DEVICE_CPU, g, (size_t)sizes[i] * 4);
            free(g);
        }
        m1c_optim_step a = {.step = step, .lr = lr, .n = nt, .device = M1C_DEVICE_CPU, .params = cp,
                            .grads = cg, .state = cs, .no_decay = no_decay};
        cr_assert_eq(vt->step(self, &a), M1C_OK, "CPU step %d: %s", step, p->error);
        /* Step 1 without bf16 copies (the NULL path); the later steps must refresh them all. */
        m1c_optim_step d = {.step = step, .lr = lr, .n = nt, .device = M1C_DEVICE_CUDA, .params = gp,
                            .grads = gg, .state = gs, .no_decay = no_decay, .params_lp = step == 1 ? NULL : glp};
        cr_assert_eq(vt->step(self, &d), M1C_OK, "CUDA step %d: %s", step, p->error);
    }

    for (int i = 0; i < nt; i++) {
        const int64_t n = sizes[i];
        float *pp = th_to_host(M1C_DEVICE_CUDA, gp[i].data, n);
        float *mm = th_to_host(M1C_DEVICE_CUDA, gs[2 * i].data, n);
        float *vv = th_to_host(M1C_DEVICE_CUDA, gs[2 * i + 1].data, n);
        uint16_t *lp = malloc((size_t)n * 2);
        m1c_dev_copy(M1C_DEVICE_CPU, lp, M1C_DEVICE_CUDA, glp[i].data, (size_t)n * 2);
        int64_t dp = 0, dm = 0, dv = 0, dlp = 0;
        /* Same f32 formula with the same scalars (bias corrections computed once on the host in double):
         * the kernel rounds every operation separately (no FMA contraction) and CUDA's sqrt and division
         * are IEEE-rounded, so the bits should agree; 1e-6 relative allows a last-bit difference per
         * operation over the few steps and is still 1000x below the weight decay lr*wd ~ 1e-3 or a
         * wrong bias correction. atol 1e-9: an f32 ulp of an update of size lr ~ 1e-2. */
        double ep = rel_err(pp, cp[i].data, n, 1e-9, 1e-6, &dp);
        /* exp_avg crosses zero: measured against the gradient scale (1) with the same 1e-6. */
        double em = rel_err(mm, cs[2 * i].data, n, 1e-6, 0.0, &dm);
        /* exp_avg_sq is positive: relative 1e-6; atol 1e-30 only guards a zero. */
        double ev = rel_err(vv, cs[2 * i + 1].data, n, 1e-30, 1e-6, &dv);
        for (int64_t j = 0; j < n; j++) dlp += lp[j] != bf16_rne(pp[j]);
        cr_log_info("tensor %d (%lld): elements not bit-equal: p %lld, m %lld, v %lld", i, (long long)n,
                    (long long)dp, (long long)dm, (long long)dv);
        cr_expect_leq(ep, 1.0, "tensor %d (%lld elements): params differ from the CPU's (%g of tolerance)", i,
                      (long long)n, ep);
        cr_expect_leq(em, 1.0, "tensor %d: exp_avg differs from the CPU's (%g of tolerance)", i, em);
        cr_expect_leq(ev, 1.0, "tensor %d: exp_avg_sq differs from the CPU's (%g of tolerance)", i, ev);
        /* The kernel rounds the very f32 value it stores: exact. */
        cr_expect_eq(dlp, 0, "tensor %d: %lld bf16 copies are not the rounding of the updated params", i,
                     (long long)dlp);
        free(pp), free(mm), free(vv), free(lp);
    }

    for (int i = 0; i < nt; i++) {
        free(cp[i].data), free(cg[i].data), free(cs[2 * i].data), free(cs[2 * i + 1].data);
        th_dev_free(M1C_DEVICE_CUDA, gp[i].data), th_dev_free(M1C_DEVICE_CUDA, gg[i].data);
        th_dev_free(M1C_DEVICE_CUDA, gs[2 * i].data), th_dev_free(M1C_DEVICE_CUDA, gs[2 * i + 1].data);
        th_dev_free(M1C_DEVICE_CUDA, glp[i].data);
    }
    free(cp), free(cg), free(cs), free(gp), free(gg), free(gs), free(glp);
    vt->destroy(self);
    m1c_config_free(cfg);
}

/* Sizes around the kernel's 2048-element chunk and 256-thread block, and one of several chunks. */
#define NT 6
static const int64_t odd_sizes[NT] = {1, 7, 1000, 4097, 2048, 70001};
static const int32_t odd_no_decay[NT] = {0, 1, 0, 1, 0, 0};

Test(adamw_cuda, matches_cpu_defaults) {
    th_need_gpu();
    run_gpu_vs_cpu("", NT, odd_sizes, odd_no_decay, 4);
}

Test(adamw_cuda, matches_cpu_weight_decay_no_decay) {
    th_need_gpu();
    run_gpu_vs_cpu("beta1 = 0.8; beta2 = 0.95; eps = 1e-6; weight_decay = 0.1;", NT, odd_sizes, odd_no_decay, 4);
}

/* M1's eps 1e-15. */
Test(adamw_cuda, matches_cpu_tiny_eps) {
    th_need_gpu();
    run_gpu_vs_cpu("beta2 = 0.95; eps = 1e-15; weight_decay = 0.01;", NT, odd_sizes, odd_no_decay, 3);
}

/* More tensors than one launch's table holds (64), a zero-sized one among them: several launches. */
Test(adamw_cuda, matches_cpu_many_tensors) {
    th_need_gpu();
    enum { MANY = 150 };
    int64_t sizes[MANY];
    int32_t nd[MANY];
    for (int i = 0; i < MANY; i++) sizes[i] = 1 + (i * 7919) % 3001, nd[i] = i % 3 == 0;
    sizes[70] = 0;
    run_gpu_vs_cpu("weight_decay = 0.1;", MANY, sizes, nd, 2);
}

/* A CUDA step with a tensor on the wrong device or of the wrong dtype is refused before anything is
 * written. */
Test(adamw_cuda, refuses_mixed_devices_and_dtypes) {
    th_need_gpu();
    m1c_plugin *p = th_plugin("adamw", M1C_KIND_OPTIMIZER);
    const m1c_optimizer_vtable *vt = M1C_OPTIMIZER(p);
    m1c_config *cfg;
    void *self = NULL;
    cr_assert_eq(vt->create(&p->host, th_settings("", &cfg), &self), M1C_OK, "create: %s", p->error);
    const int64_t n = 5;
    float ones[5] = {1, 1, 1, 1, 1}, host_v[5] = {0};
    float *dp = th_to_dev(M1C_DEVICE_CUDA, ones, n), *dg = th_to_dev(M1C_DEVICE_CUDA, ones, n);
    float *dm = th_to_dev(M1C_DEVICE_CUDA, host_v, n);
    void *dlp = m1c_dev_alloc(M1C_DEVICE_CUDA, (size_t)n * 4);
    m1c_tensor tp = th_vec(dp, n, M1C_F32, M1C_DEVICE_CUDA, "p"), tg = th_vec(dg, n, M1C_F32, M1C_DEVICE_CUDA, "g");
    m1c_tensor ts[2] = {th_vec(dm, n, M1C_F32, M1C_DEVICE_CUDA, "m"), th_vec(host_v, n, M1C_F32, M1C_DEVICE_CPU, "v")};
    m1c_optim_step a = {.step = 1, .lr = 1e-3f, .n = 1, .device = M1C_DEVICE_CUDA, .params = &tp, .grads = &tg,
                        .state = ts};
    p->error[0] = '\0';
    cr_expect_eq(vt->step(self, &a), M1C_ERR);
    cr_expect(strstr(p->error, "exp_avg_sq") != NULL, "error does not name the state: %s", p->error);

    ts[1] = th_vec(dm, n, M1C_F32, M1C_DEVICE_CUDA, "v"); /* fine now; the bf16 copy is f32: refused */
    m1c_tensor tlp = th_vec(dlp, n, M1C_F32, M1C_DEVICE_CUDA, "p.bf16");
    a.params_lp = &tlp;
    p->error[0] = '\0';
    cr_expect_eq(vt->step(self, &a), M1C_ERR);
    cr_expect(strstr(p->error, "bf16") != NULL, "error: %s", p->error);

    float *back = th_to_host(M1C_DEVICE_CUDA, dp, n);
    for (int j = 0; j < n; j++) cr_expect_eq(back[j], 1.0f, "a refused step changed parameter %d", j);
    free(back);
    th_dev_free(M1C_DEVICE_CUDA, dp), th_dev_free(M1C_DEVICE_CUDA, dg), th_dev_free(M1C_DEVICE_CUDA, dm);
    th_dev_free(M1C_DEVICE_CUDA, dlp);
    vt->destroy(self);
    m1c_config_free(cfg);
}
