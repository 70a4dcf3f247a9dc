/* What the core's norms hand a layer beside its input.
 *
 * m1c_layer_info.lp_inputs (ABI 1.2): a layer handed the core's bf16 copies of its input and output
 * gradient (bufs.in_lp, dout_lp) computes exactly what it computes when it rounds them itself. For each
 * layer plugin with a BF16 CUDA path (lightning fused and blocked, softmax, topk): one instance made with
 * lp_inputs, one without, the same parameters and inputs; forward then backward; every output, input
 * gradient and parameter gradient must be bit-identical, since both round with nearest-even. Then the
 * copies must be what the layer reads: other values in in_lp (and in dout_lp for an attention layer)
 * must change its output (input gradient).
 *
 * m1c_layer_bufs.in_proj (ABI 1.4): topk declares its router's weight in_proj and, handed the logits,
 * routes from them instead of making them (check_in_proj). m1c_layer_bufs.out_rows (ABI 1.4): topk hands
 * its output over as rows, which the core's norm sums where it reads them (check_out_rows); lightning and
 * softmax their output projection's bf16 product (ABI 1.5, check_out_rows_identity). */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "../core/ops.h"
#include "harness.h"

#define GPU M1C_DEVICE_CUDA

static int64_t numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Values of a and b (n floats on the GPU) that differ bitwise; and whether a has a nonzero value. */
static int64_t differing(const float *dev_a, const float *dev_b, int64_t n, int64_t *first, int *nonzero) {
    float *a = th_to_host(GPU, dev_a, n), *b = th_to_host(GPU, dev_b, n);
    int64_t bad = 0;
    *first = -1, *nonzero = 0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&a[i], &b[i], 4) != 0 && bad++ == 0) *first = i;
        *nonzero |= a[i] != 0.0f;
    }
    free(a), free(b);
    return bad;
}

static void expect_same(const float *dev_a, const float *dev_b, int64_t n, const char *what, const char *plugin) {
    int64_t first;
    int nonzero;
    const int64_t bad = differing(dev_a, dev_b, n, &first, &nonzero);
    cr_expect_eq(bad, 0, "%s: %s differs in %lld of %lld values (first at %lld)", plugin, what, (long long)bad,
                 (long long)n, (long long)first);
    cr_expect(nonzero, "%s: %s is all zero (nothing was computed)", plugin, what);
}

static void expect_changed(const float *dev_a, const float *dev_b, int64_t n, const char *what, const char *plugin) {
    int64_t first;
    int nonzero;
    cr_expect_gt(differing(dev_a, dev_b, n, &first, &nonzero), 0, "%s: %s does not read the core's bf16 copy",
                 plugin, what);
}

static void check(const char *plugin, const char *settings, int attention, int H, int B, int T, uint64_t seed) {
    th_need_gpu();
    th_layer *own = th_layer_new_dev(plugin, settings, 0, 1, H, B, T, seed, 0.3f, GPU, M1C_BF16);
    th_layer *lp = th_layer_new_lp(plugin, settings, 0, 1, H, B, T, seed, 0.3f);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *z = th_zeros(n);
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n);
    float *out1 = th_to_dev(GPU, z, n), *out2 = th_to_dev(GPU, z, n);
    float *din1 = th_to_dev(GPU, z, n), *din2 = th_to_dev(GPU, z, n);
    uint16_t *x_lp = m1c_dev_alloc(GPU, (size_t)n * 2), *dout_lp = m1c_dev_alloc(GPU, (size_t)n * 2);
    m1c_to_bf16(GPU, x_lp, gx, n);
    m1c_to_bf16(GPU, dout_lp, gdout, n);
    lp->bufs.in_lp = x_lp;
    lp->bufs.dout_lp = attention ? dout_lp : NULL; /* the core hands dout_lp to attention layers only */

    th_forward(own, out1, gx);
    th_forward(lp, out2, gx);
    expect_same(out1, out2, n, "forward output", plugin);
    th_backward(own, din1, gdout, gx);
    th_backward(lp, din2, gdout, gx);
    expect_same(din1, din2, n, "input gradient", plugin);
    for (int i = 0; i < own->np; i++)
        expect_same(own->grads[i].data, lp->grads[i].data, numel(&own->grads[i]), own->pspec[i].name, plugin);

    /* other copies: dout's values as the input, x's as the output gradient */
    lp->bufs.in_lp = dout_lp;
    th_forward(lp, out2, gx);
    expect_changed(out1, out2, n, "forward output", plugin);
    if (attention) {
        lp->bufs.in_lp = x_lp, lp->bufs.dout_lp = x_lp;
        th_forward(lp, out2, gx);
        m1c_dev_memset0(GPU, din2, (size_t)n * 4);
        m1c_dev_memset0(GPU, din1, (size_t)n * 4);
        th_backward(own, din1, gdout, gx);
        th_backward(lp, din2, gdout, gx);
        expect_changed(din1, din2, n, "input gradient", plugin);
    }
    char err[256];
    cr_expect_not(m1c_dev_take_error(GPU, err, sizeof err), "%s: %s", plugin, err);

    m1c_dev_free(GPU, x_lp), m1c_dev_free(GPU, dout_lp);
    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, out1), th_dev_free(GPU, out2);
    th_dev_free(GPU, din1), th_dev_free(GPU, din2);
    free(x), free(dout), free(z);
    th_layer_free(own), th_layer_free(lp);
}

/* T not a multiple of the block size; H not the attention width. */
Test(lp_inputs, lightning_fused) {
    check("lightning", "heads = 2; head_dim = 64; block_size = 64; decay = \"m1c\";", 1, 96, 2, 100, 11);
}
Test(lp_inputs, lightning_blocked) {
    check("lightning", "heads = 2; head_dim = 16; block_size = 16; decay = \"m1c\"; kernel = \"blocked\";", 1, 48, 2,
          37, 12);
}
Test(lp_inputs, softmax) { check("softmax", "heads = 4; kv_heads = 2; head_dim = 64;", 1, 128, 2, 77, 13); }
Test(lp_inputs, topk) { check("topk", "experts = 4; top_k = 2; ffn_dim = 24; aux_coef = 0.01;", 0, 64, 2, 45, 14); }

/* max |a - b| / max |b| over n floats on the GPU. */
static double rel_diff(const float *dev_a, const float *dev_b, int64_t n) {
    float *a = th_to_host(GPU, dev_a, n), *b = th_to_host(GPU, dev_b, n);
    double d = 0, m = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e; /* NaN sticks */
        if (fabs((double)b[i]) > m) m = fabs((double)b[i]);
    }
    free(a), free(b);
    return m > 0 ? d / m : d;
}

/* topk handed in_proj = in Wr^T, summed here in double (its own product's values up to the f32 sums'
 * order): output, input gradient and every parameter gradient match those of the same instance making
 * its logits itself, within tol; handed other logits (negated), its output changes: it routes from them.
 * tol: F32 1e-5 (the softmax and combine weights move by a few ulps; the routing is the same); BF16 1e-2
 * (such a move can flip the bf16 rounding of a weighted d row, 2^-8 of that element, which the expert
 * products carry into din and the gradients). */
static void check_in_proj(int dtype, double tol, uint64_t seed) {
    th_need_gpu();
    const int H = 64, B = 2, T = 45, E = 4;
    th_layer *l = th_layer_new_dev("topk", "experts = 4; top_k = 2; ffn_dim = 24; aux_coef = 0.01;", 0, 1, H, B, T,
                                   seed, 0.3f, GPU, dtype);
    cr_assert(l->pspec[0].in_proj == 1 && l->params[0].shape[0] == E, "topk does not declare its router in_proj");
    const int64_t N = (int64_t)B * T, n = N * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *z = th_zeros(n);
    float *wr = th_to_host(GPU, l->params[0].data, (int64_t)E * H), *lg = malloc((size_t)N * E * 4);
    float *neg = malloc((size_t)N * E * 4);
    for (int64_t i = 0; i < N; i++)
        for (int e = 0; e < E; e++) {
            double t = 0;
            for (int c = 0; c < H; c++) t += (double)x[i * H + c] * wr[(int64_t)e * H + c];
            lg[i * E + e] = (float)t, neg[i * E + e] = (float)-t;
        }
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n), *glg = th_to_dev(GPU, lg, N * E);
    float *gneg = th_to_dev(GPU, neg, N * E);
    float *out1 = th_to_dev(GPU, z, n), *out2 = th_to_dev(GPU, z, n), *din1 = th_to_dev(GPU, z, n);
    float *din2 = th_to_dev(GPU, z, n);
    float **g1 = calloc((size_t)l->np, sizeof *g1);

    th_forward(l, out1, gx);
    th_backward(l, din1, gdout, gx);
    for (int i = 0; i < l->np; i++) g1[i] = th_to_host(GPU, l->grads[i].data, numel(&l->grads[i]));
    th_layer_zero_grads(l);
    l->bufs.in_proj = glg;
    th_forward(l, out2, gx);
    th_backward(l, din2, gdout, gx);
    const double eo = rel_diff(out2, out1, n), ed = rel_diff(din2, din1, n);
    cr_expect_leq(eo, tol, "dtype %d: output with in_proj vs without: %g", dtype, eo);
    cr_expect_leq(ed, tol, "dtype %d: input gradient with in_proj vs without: %g", dtype, ed);
    for (int i = 0; i < l->np; i++) {
        const int64_t m = numel(&l->grads[i]);
        float *ref = th_to_dev(GPU, g1[i], m);
        const double eg = rel_diff(l->grads[i].data, ref, m);
        cr_expect_leq(eg, tol, "dtype %d: %s with in_proj vs without: %g", dtype, l->pspec[i].name, eg);
        th_dev_free(GPU, ref);
        free(g1[i]);
    }
    l->bufs.in_proj = gneg;
    th_forward(l, out2, gx);
    cr_expect_gt(rel_diff(out2, out1, n), 0.1, "dtype %d: the output does not follow in_proj", dtype);
    char err[256];
    cr_expect_not(m1c_dev_take_error(GPU, err, sizeof err), "%s", err);

    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, glg), th_dev_free(GPU, gneg);
    th_dev_free(GPU, out1), th_dev_free(GPU, out2), th_dev_free(GPU, din1), th_dev_free(GPU, din2);
    free(x), free(dout), free(z), free(wr), free(lg), free(neg), free(g1);
    th_layer_free(l);
}

Test(in_proj, topk_f32) { check_in_proj(M1C_F32, 1e-5, 21); }
Test(in_proj, topk_bf16) { check_in_proj(M1C_BF16, 1e-2, 22); }

/* topk handing its output over as rows (bufs.out_rows): the core's residual norm on them gives what it gives
 * on the output topk writes otherwise. Its combine and the norm's sum are the same m1c_rows_sum, so the sums
 * are equal bit for bit; allowed: 1e-6, nvcc contracting the residual a h + b y differently in the two
 * kernels (cuda_ops.residual_rmsnorm_rows). */
static void check_out_rows(int dtype, uint64_t seed) {
    th_need_gpu();
    const int H = 64, B = 2, T = 45;
    const float eps = 1e-5f, A = 1.7f, Bc = 0.37f;
    th_layer *l = th_layer_new_dev("topk", "experts = 4; top_k = 2; ffn_dim = 24; aux_coef = 0.01;", 0, 1, H, B, T,
                                   seed, 0.3f, GPU, dtype);
    const int64_t N = (int64_t)B * T, n = N * H;
    float *x = th_randn(n, seed + 1, 1.0f), *z = th_zeros(n), *ones = malloc((size_t)H * 4);
    for (int c = 0; c < H; c++) ones[c] = 1.0f + 0.01f * (float)c;
    float *gx = th_to_dev(GPU, x, n), *gw = th_to_dev(GPU, ones, H), *out1 = th_to_dev(GPU, z, n);
    float *y2 = th_to_dev(GPU, z, n), *o1 = th_to_dev(GPU, z, n), *o2 = th_to_dev(GPU, z, n);
    float *r1 = th_to_dev(GPU, z, N), *r2 = th_to_dev(GPU, z, N);

    th_forward(l, out1, gx);
    m1c_out_rows rows = {0};
    l->bufs.out_rows = &rows;
    th_forward(l, y2, gx);
    cr_assert(rows.rows && rows.idx && rows.weight && rows.k == 2, "dtype %d: topk did not hand its rows over", dtype);
    m1c_residual_rmsnorm_ex(GPU, out1, gx, A, Bc, NULL, o1, r1, gw, N, H, eps, NULL, NULL, 0, NULL);
    m1c_residual_rmsnorm_ex(GPU, y2, gx, A, Bc, &rows, o2, r2, gw, N, H, eps, NULL, NULL, 0, NULL);
    const double ey = rel_diff(y2, out1, n), eo = rel_diff(o2, o1, n), er = rel_diff(r2, r1, N);
    cr_expect_leq(ey, 1e-6, "dtype %d: residual with rows vs written output %g", dtype, ey);
    cr_expect_leq(eo, 1e-6, "dtype %d: norm with rows vs written output %g", dtype, eo);
    cr_expect_leq(er, 1e-6, "dtype %d: rstd with rows vs written output %g", dtype, er);
    char err[256];
    cr_expect_not(m1c_dev_take_error(GPU, err, sizeof err), "%s", err);

    th_dev_free(GPU, gx), th_dev_free(GPU, gw), th_dev_free(GPU, out1), th_dev_free(GPU, y2);
    th_dev_free(GPU, o1), th_dev_free(GPU, o2), th_dev_free(GPU, r1), th_dev_free(GPU, r2);
    free(x), free(z), free(ones);
    th_layer_free(l);
}

Test(out_rows, topk_f32) { check_out_rows(M1C_F32, 31); }
Test(out_rows, topk_bf16) { check_out_rows(M1C_BF16, 32); }

/* An attention layer handing its output projection's product over as bf16 rows (the identity of ABI 1.5:
 * idx and weight NULL, k = 1) at BF16, and writing out at F32. The rows against the f32 output it writes
 * otherwise: one rounding to bf16 (2^-9 of the element) beside cuBLAS's sums for a bf16 and an f32 output,
 * which may run in other orders (~1e-6 relative): 2^-8 of each element plus 1e-5 of the largest. The
 * core's norm on rows: cuda_ops.residual_rmsnorm_rows. */
static void check_out_rows_identity(const char *plugin, const char *settings, int H, int B, int T, uint64_t seed) {
    th_need_gpu();
    const int64_t N = (int64_t)B * T, n = N * H;
    float *x = th_randn(n, seed + 1, 1.0f), *z = th_zeros(n);
    for (int dtype = M1C_F32; dtype <= M1C_BF16; dtype++) {
        th_layer *l = th_layer_new_dev(plugin, settings, 0, 1, H, B, T, seed, 0.3f, GPU, dtype);
        float *gx = th_to_dev(GPU, x, n), *out1 = th_to_dev(GPU, z, n), *out2 = th_to_dev(GPU, z, n);
        th_forward(l, out1, gx);
        m1c_out_rows rows = {0};
        l->bufs.out_rows = &rows;
        th_forward(l, out2, gx);
        if (dtype == M1C_F32) {
            cr_expect(!rows.rows, "%s: rows handed over at F32", plugin);
            expect_same(out2, out1, n, "F32 output with out_rows offered", plugin);
        } else {
            cr_assert(rows.rows && !rows.idx && !rows.weight && rows.k == 1 && rows.dtype == M1C_BF16,
                      "%s: no identity rows in bf16 handed over", plugin);
            uint16_t *r = malloc((size_t)n * 2);
            m1c_dev_copy(M1C_DEVICE_CPU, r, GPU, rows.rows, (size_t)n * 2);
            float *o = th_to_host(GPU, out1, n);
            double m = 0, bad = 0;
            for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(o[i]));
            for (int64_t i = 0; i < n; i++) {
                const uint32_t u = (uint32_t)r[i] << 16;
                float v;
                memcpy(&v, &u, 4);
                const double e = fabs((double)v - o[i]), lim = ldexp(fabs(o[i]), -8) + 1e-5 * m;
                if (!(e <= lim)) bad++;
            }
            cr_expect(m > 0 && bad == 0, "%s: %g of %lld rows' values off the f32 output by more than bf16 rounding",
                      plugin, bad, (long long)n);
            free(r), free(o);
        }
        char err[256];
        cr_expect_not(m1c_dev_take_error(GPU, err, sizeof err), "%s: %s", plugin, err);
        th_dev_free(GPU, gx), th_dev_free(GPU, out1), th_dev_free(GPU, out2);
        th_layer_free(l);
    }
    free(x), free(z);
}

Test(out_rows, lightning) {
    check_out_rows_identity("lightning", "heads = 2; head_dim = 64; block_size = 64; decay = \"m1c\";", 96, 2, 100, 41);
}
Test(out_rows, softmax) { check_out_rows_identity("softmax", "heads = 4; kv_heads = 2; head_dim = 64;", 128, 2, 77, 42); }
