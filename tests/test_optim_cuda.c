/* The AdamW plugin on a CUDA device against the same plugin on the CPU, bit for bit: several steps over
 * tensors of odd sizes (tails not a multiple of 4, partial and whole kernel tiles), tensors whose
 * arrays are not 16-byte aligned, more tensors than one kernel launch takes, more tiles than the grid
 * has blocks, weight decay and no_decay, the bf16 parameter copies written by the kernel, and
 * refusals. Skipped where there is no GPU. */
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

/* Elements of a and b whose bits differ; the largest |a - b| / |b| among them in *worst (for the log). */
static int64_t bits_differ(const float *a, const float *b, int64_t n, double *worst) {
    int64_t d = 0;
    for (int64_t j = 0; j < n; j++)
        if (memcmp(&a[j], &b[j], 4) != 0) {
            d++;
            double r = fabs((double)a[j] - (double)b[j]) / fabs((double)b[j]);
            *worst = r != r ? INFINITY : fmax(*worst, r);
        }
    return d;
}

/* Which arrays of a tensor a test places one element past an aligned address (bits of shift[i]). */
enum { SH_P = 1, SH_G = 2, SH_M = 4, SH_V = 8, SH_LP = 16 };

/* A device copy of n elements of esz bytes (zeros when host is NULL), one element past the start of
 * its allocation when shifted (cudaMalloc gives 256-byte aligned memory, so that is then 4 or 2 bytes
 * off a 16-byte boundary). *base gets the allocation to free. */
static void *dev_array(const void *host, int64_t n, size_t esz, int shifted, void **base) {
    *base = m1c_dev_alloc(M1C_DEVICE_CUDA, ((size_t)n + 1) * esz);
    cr_assert(*base, "device allocation of %lld elements", (long long)n);
    char *d = (char *)*base + (shifted ? esz : 0);
    if (n > 0) {
        if (host) m1c_dev_copy(M1C_DEVICE_CUDA, d, M1C_DEVICE_CPU, host, (size_t)n * esz);
        else m1c_dev_memset0(M1C_DEVICE_CUDA, d, (size_t)n * esz);
    }
    return d;
}

/* One AdamW instance runs `steps` steps on the CPU tensors and on copies of them on the GPU, with the
 * same gradients each step; then parameters and both moments are compared, and the bf16 copies against
 * the rounding of the GPU's parameters. shift (or NULL): SH_* bits per tensor. */
static void run_gpu_vs_cpu(const char *settings, int nt, const int64_t *sizes, const int32_t *no_decay,
                           const int *shift, int steps) {
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
    void **base = calloc((size_t)nt * 5, sizeof *base); /* device allocations: p, g, m, v, lp per tensor */
    cr_assert(cp && cg && cs && gp && gg && gs && glp && base);
    for (int i = 0; i < nt; i++) {
        const int64_t n = sizes[i];
        const int sh = shift ? shift[i] : 0;
        float *x = th_randn(n, 100 + (uint64_t)i, 1.0f);
        /* Moments start non-zero (as after earlier steps) so that their update is tested from step 1;
         * exp_avg_sq must stay >= 0. */
        float *m = th_randn(n, 200 + (uint64_t)i, 0.1f), *v = th_randn(n, 300 + (uint64_t)i, 0.1f);
        for (int64_t j = 0; j < n; j++) v[j] = v[j] * v[j];
        cp[i] = th_vec(x, n, M1C_F32, M1C_DEVICE_CPU, "p");
        cg[i] = th_vec(th_zeros(n), n, M1C_F32, M1C_DEVICE_CPU, "g");
        cs[2 * i] = th_vec(m, n, M1C_F32, M1C_DEVICE_CPU, "exp_avg");
        cs[2 * i + 1] = th_vec(v, n, M1C_F32, M1C_DEVICE_CPU, "exp_avg_sq");
        void **b = &base[5 * i];
        gp[i] = th_vec(dev_array(x, n, 4, sh & SH_P, &b[0]), n, M1C_F32, M1C_DEVICE_CUDA, "p");
        gg[i] = th_vec(dev_array(NULL, n, 4, sh & SH_G, &b[1]), n, M1C_F32, M1C_DEVICE_CUDA, "g");
        gs[2 * i] = th_vec(dev_array(m, n, 4, sh & SH_M, &b[2]), n, M1C_F32, M1C_DEVICE_CUDA, "exp_avg");
        gs[2 * i + 1] = th_vec(dev_array(v, n, 4, sh & SH_V, &b[3]), n, M1C_F32, M1C_DEVICE_CUDA, "exp_avg_sq");
        glp[i] = th_vec(dev_array(NULL, n, 2, sh & SH_LP, &b[4]), n, M1C_BF16, M1C_DEVICE_CUDA, "p.bf16");
    }

    for (int step = 1; step <= steps; step++) {
        const float lr = 1e-2f * (1.0f + 0.25f * (float)step); /* changes every step, as a schedule would */
        for (int i = 0; i < nt; i++) {
            /* Gradients of mixed scales, zeros included (v then decays, m shrinks). */
            float *g = th_randn(sizes[i], 1000 * (uint64_t)step + (uint64_t)i, step == 2 ? 1e-3f : 1.0f);
            if (sizes[i] > 3) g[3] = 0.0f;
            if (sizes[i] > 0) {
                memcpy(cg[i].data, g, (size_t)sizes[i] * 4);
                m1c_dev_copy(M1C_DEVICE_CUDA, gg[i].data, M1C_DEVICE_CPU, g, (size_t)sizes[i] * 4);
            }
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
    /* A kernel fault (a misaligned vector access, an access out of bounds) surfaces here, not as a
     * crash: the device keeps its errors. */
    m1c_dev_sync(M1C_DEVICE_CUDA);
    char derr[256] = "";
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CUDA, derr, sizeof derr), 0, "CUDA error: %s", derr);

    int64_t all_p = 0, all_m = 0, all_v = 0;
    for (int i = 0; i < nt; i++) {
        const int64_t n = sizes[i];
        float *pp = th_to_host(M1C_DEVICE_CUDA, gp[i].data, n);
        float *mm = th_to_host(M1C_DEVICE_CUDA, gs[2 * i].data, n);
        float *vv = th_to_host(M1C_DEVICE_CUDA, gs[2 * i + 1].data, n);
        uint16_t *lp = malloc((size_t)n * 2 + 2);
        if (n > 0) m1c_dev_copy(M1C_DEVICE_CPU, lp, M1C_DEVICE_CUDA, glp[i].data, (size_t)n * 2);
        /* Tolerance 0, bit for bit: both sides evaluate the same f32 expressions in the same order with
         * each operation rounded once (the kernel through __f*_rn intrinsics, which are never contracted
         * into FMAs; the CPU loop is C11 in ISO mode, where GCC does not contract either), and f32
         * division and sqrt are correctly rounded on both. A difference here is a changed formula, a
         * missed or doubled element, or a wrong scalar. */
        double wp = 0, wm = 0, wv = 0;
        const int64_t dp = bits_differ(pp, cp[i].data, n, &wp), dm = bits_differ(mm, cs[2 * i].data, n, &wm);
        const int64_t dv = bits_differ(vv, cs[2 * i + 1].data, n, &wv);
        int64_t dlp = 0;
        for (int64_t j = 0; j < n; j++) dlp += lp[j] != bf16_rne(pp[j]);
        if (dp || dm || dv)
            cr_log_error("tensor %d (%lld elements, shift %d): not bit-equal: p %lld (worst relative %g), m %lld "
                         "(%g), v %lld (%g)",
                         i, (long long)n, shift ? shift[i] : 0, (long long)dp, wp, (long long)dm, wm, (long long)dv,
                         wv);
        all_p += dp, all_m += dm, all_v += dv;
        /* The kernel rounds the very f32 value it stores: exact. */
        cr_expect_eq(dlp, 0, "tensor %d (%lld elements): %lld bf16 copies are not the rounding of the updated params",
                     i, (long long)n, (long long)dlp);
        free(pp), free(mm), free(vv), free(lp);
    }
    cr_expect_eq(all_p, 0, "%lld parameters differ from the CPU's (per tensor above)", (long long)all_p);
    cr_expect_eq(all_m, 0, "%lld exp_avg differ from the CPU's", (long long)all_m);
    cr_expect_eq(all_v, 0, "%lld exp_avg_sq differ from the CPU's", (long long)all_v);

    for (int i = 0; i < nt; i++) {
        free(cp[i].data), free(cg[i].data), free(cs[2 * i].data), free(cs[2 * i + 1].data);
        for (int k = 0; k < 5; k++) th_dev_free(M1C_DEVICE_CUDA, base[5 * i + k]);
    }
    free(cp), free(cg), free(cs), free(gp), free(gg), free(gs), free(glp), free(base);
    vt->destroy(self);
    m1c_config_free(cfg);
}

/* Sizes around the kernel's tiles (2048 elements: 256 threads, two float4 each): below one, one whole,
 * whole ones plus a tail that is not a multiple of 4 (4097, 6146, 70001), whole ones only (8192). */
#define NT 8
static const int64_t odd_sizes[NT] = {1, 7, 1000, 4097, 2048, 70001, 8192, 6146};
static const int32_t odd_no_decay[NT] = {0, 1, 0, 1, 0, 0, 1, 0};

Test(adamw_cuda, matches_cpu_defaults) {
    th_need_gpu();
    run_gpu_vs_cpu("", NT, odd_sizes, odd_no_decay, NULL, 4);
}

Test(adamw_cuda, matches_cpu_weight_decay_no_decay) {
    th_need_gpu();
    run_gpu_vs_cpu("beta1 = 0.8; beta2 = 0.95; eps = 1e-6; weight_decay = 0.1;", NT, odd_sizes, odd_no_decay, NULL,
                   4);
}

/* M1's eps 1e-15. */
Test(adamw_cuda, matches_cpu_tiny_eps) {
    th_need_gpu();
    run_gpu_vs_cpu("beta2 = 0.95; eps = 1e-15; weight_decay = 0.01;", NT, odd_sizes, odd_no_decay, NULL, 3);
}

/* The core's arenas place every tensor 256-byte aligned, but the plugin takes any tensors: arrays one
 * element off a 16-byte boundary (each array alone, the bf16 copy alone, all of them) must take the
 * element-wise path, in tensors large enough to have whole tiles, beside aligned ones. */
Test(adamw_cuda, matches_cpu_misaligned) {
    th_need_gpu();
    static const int shift[NT] = {0, SH_P, SH_G | SH_LP, SH_M, 0, SH_LP, SH_V, SH_P | SH_G | SH_M | SH_V | SH_LP};
    run_gpu_vs_cpu("weight_decay = 0.1;", NT, odd_sizes, odd_no_decay, shift, 3);
}

/* More tensors than one launch's table holds (480 with CUDA >= 12.1, 48 before), zero-sized ones among
 * them (index 481 right after the 480th non-empty one fills the table; the last one): several launches. */
Test(adamw_cuda, matches_cpu_many_tensors) {
    th_need_gpu();
    enum { MANY = 1100 };
    static int64_t sizes[MANY];
    static int32_t nd[MANY];
    for (int i = 0; i < MANY; i++) sizes[i] = 1 + (i * 7919) % 3001, nd[i] = i % 3 == 0;
    sizes[70] = 0, sizes[481] = 0, sizes[MANY - 1] = 0;
    run_gpu_vs_cpu("weight_decay = 0.1;", MANY, sizes, nd, NULL, 2);
}

/* More tiles (~3600) than the grid has blocks (a few per SM: ~500 on an H100), so that blocks loop
 * over tiles and cross from one tensor to the next. */
Test(adamw_cuda, matches_cpu_more_tiles_than_blocks) {
    th_need_gpu();
    static const int64_t sizes[5] = {3000001, 5, 2048 * 1500, 1234567, 2};
    static const int32_t nd[5] = {0, 1, 0, 1, 0};
    run_gpu_vs_cpu("weight_decay = 0.1;", 5, sizes, nd, NULL, 2);
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
