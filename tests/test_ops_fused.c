/* The fused core ops of core/ops.h on the CPU against the separate ops they replace in the model loop:
 * m1c_residual_rmsnorm = m1c_residual + m1c_rmsnorm_forward, m1c_rmsnorm_backward_axpby = a zeroed dx +
 * m1c_rmsnorm_backward + m1c_axpby, with dout apart from dh and dout == dh (as the model calls it). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "../core/ops.h"
#include "harness.h"

#define CPU M1C_DEVICE_CPU

/* Row counts 1 and odd ones; widths 1, odd, and the reference model's 768. */
static const int64_t Ns[] = {1, 37, 300};
static const int Cs[] = {1, 33, 768};
#define NN (int)(sizeof Ns / sizeof Ns[0])
#define NC (int)(sizeof Cs / sizeof Cs[0])

/* DeepNorm-like scales that are not powers of two, so every product rounds. */
static const float A = 1.7f, Bc = 0.37f;

static float *copy_of(const float *x, int64_t n) {
    float *y = malloc((size_t)(n ? n : 1) * 4);
    memcpy(y, x, (size_t)n * 4);
    return y;
}

/* n NaNs: an output the op fails to write shows up in every comparison. */
static float *nans(int64_t n) {
    float *y = malloc((size_t)(n ? n : 1) * 4);
    for (int64_t i = 0; i < n; i++) y[i] = NAN;
    return y;
}

/* RMSNorm weights around 1, as after training. */
static float *norm_weight(int C, uint64_t seed) {
    float *w = th_randn(C, seed, 0.2f);
    for (int c = 0; c < C; c++) w[c] += 1.0f;
    return w;
}

Test(ops_fused, residual_rmsnorm_equals_residual_then_rmsnorm) {
    const float eps = 1e-5f;
    for (int a = 0; a < NN; a++)
        for (int b = 0; b < NC; b++) {
            const int64_t N = Ns[a], NC_ = N * Cs[b];
            const int C = Cs[b];
            const uint64_t s = 10 + (uint64_t)(a * NC + b) * 10;
            float *y0 = th_randn(NC_, s, 1.0f), *h = th_randn(NC_, s + 1, 1.0f), *w = norm_weight(C, s + 2);

            float *ys = copy_of(y0, NC_), *outs = nans(NC_), *rstds = nans(N);
            m1c_residual(CPU, ys, h, A, Bc, NC_);
            m1c_rmsnorm_forward(CPU, outs, rstds, ys, w, N, C, eps, NULL);

            float *yf = copy_of(y0, NC_), *outf = nans(NC_), *rstdf = nans(N);
            m1c_residual_rmsnorm(CPU, yf, h, A, Bc, outf, rstdf, w, N, C, eps, NULL);

            /* exact: the same expressions, per element and per row sum, in the same order */
            cr_expect_eq(th_max_abs_diff(yf, ys, NC_), 0.0, "N=%lld C=%d: residual y differs", (long long)N, C);
            cr_expect_eq(th_max_abs_diff(outf, outs, NC_), 0.0, "N=%lld C=%d: normalised out differs", (long long)N,
                         C);
            cr_expect_eq(th_max_abs_diff(rstdf, rstds, N), 0.0, "N=%lld C=%d: rstd differs", (long long)N, C);
            /* and the residual did happen (y changed), so the comparison above is not of two no-ops */
            cr_expect_gt(th_max_abs_diff(yf, y0, NC_), 1e-3, "N=%lld C=%d: y unchanged", (long long)N, C);

            free(y0), free(h), free(w), free(ys), free(outs), free(rstds), free(yf), free(outf), free(rstdf);
        }
}

/* One case of the backward: alias 1 passes dout as dh (the model's call). */
static void check_backward(int64_t N, int C, int alias, uint64_t s) {
    const int64_t NC_ = N * C;
    float *in = th_randn(NC_, s, 1.0f), *w = norm_weight(C, s + 1), *dout = th_randn(NC_, s + 2, 1.0f);
    float *dw0 = th_randn(C, s + 3, 1.0f); /* dw accumulates */
    float *rstd = th_zeros(N), *scratch = th_zeros(NC_);
    m1c_rmsnorm_forward(CPU, scratch, rstd, in, w, N, C, 1e-5f, NULL);

    /* today's sequence in the model: memset0(dx), rmsnorm_backward(dx += ...), axpby(dh, tmp <- dx) */
    float *dx = th_zeros(NC_), *dws = copy_of(dw0, C), *dhs = nans(NC_), *tmps = nans(NC_);
    m1c_rmsnorm_backward(CPU, dx, dws, dout, in, w, rstd, N, C);
    m1c_axpby(CPU, dhs, tmps, dx, A, Bc, NC_);

    float *dwf = copy_of(dw0, C), *tmpf = nans(NC_), *dhf = alias ? copy_of(dout, NC_) : nans(NC_);
    m1c_rmsnorm_backward_axpby(CPU, dhf, tmpf, dwf, alias ? dhf : dout, in, w, rstd, A, Bc, N, C, NULL);

    /* exact: the same expressions in the same order (dx = 0 + v there, v here: equal as numbers; only the
     * sign of a zero may differ, which == does not see); dw's sums are the same loop */
    cr_expect_eq(th_max_abs_diff(dhf, dhs, NC_), 0.0, "N=%lld C=%d alias %d: dh differs", (long long)N, C, alias);
    cr_expect_eq(th_max_abs_diff(tmpf, tmps, NC_), 0.0, "N=%lld C=%d alias %d: tmp differs", (long long)N, C, alias);
    cr_expect_eq(th_max_abs_diff(dwf, dws, C), 0.0, "N=%lld C=%d alias %d: dw differs", (long long)N, C, alias);
    /* without tmp but with its bf16 copy (what an attention layer that reads only dout_lp gets, ABI 1.5): the
     * same dh and dw, and the copy is tmp rounded to bf16, exactly */
    float *dh3 = alias ? copy_of(dout, NC_) : nans(NC_), *dw3 = copy_of(dw0, C);
    uint16_t *lp3 = malloc((size_t)NC_ * 2), *lpr = malloc((size_t)NC_ * 2);
    m1c_rmsnorm_backward_axpby(CPU, dh3, NULL, dw3, alias ? dh3 : dout, in, w, rstd, A, Bc, N, C, lp3);
    m1c_to_bf16(CPU, lpr, tmpf, NC_);
    cr_expect_eq(memcmp(dh3, dhf, (size_t)NC_ * 4), 0, "N=%lld C=%d alias %d: dh without tmp differs", (long long)N, C,
                 alias);
    cr_expect_eq(memcmp(dw3, dwf, (size_t)C * 4), 0, "N=%lld C=%d alias %d: dw without tmp differs", (long long)N, C,
                 alias);
    cr_expect_eq(memcmp(lp3, lpr, (size_t)NC_ * 2), 0, "N=%lld C=%d alias %d: the bf16 copy is not tmp rounded",
                 (long long)N, C, alias);
    free(dh3), free(dw3), free(lp3), free(lpr);
    /* the gradients are not trivially zero (C = 1 gives dx ~ 0 by construction: x / rms(x) is +-1) */
    if (C > 1) cr_expect_gt(th_max_abs(dhf, NC_), 0.01, "N=%lld C=%d alias %d: dh ~ 0", (long long)N, C, alias);
    cr_expect_gt(th_max_abs_diff(dwf, dw0, C), 1e-3, "N=%lld C=%d alias %d: dw unchanged", (long long)N, C, alias);

    free(in), free(w), free(dout), free(dw0), free(rstd), free(scratch);
    free(dx), free(dws), free(dhs), free(tmps), free(dwf), free(tmpf), free(dhf);
}

Test(ops_fused, rmsnorm_backward_axpby_equals_separate_ops) {
    for (int alias = 0; alias < 2; alias++)
        for (int a = 0; a < NN; a++)
            for (int b = 0; b < NC; b++) check_backward(Ns[a], Cs[b], alias, 500 + (uint64_t)(a * NC + b) * 10);
}

/* dout apart from dh is only read. */
Test(ops_fused, rmsnorm_backward_axpby_leaves_dout) {
    const int64_t N = 37;
    const int C = 33;
    float *in = th_randn(N * C, 1, 1.0f), *w = norm_weight(C, 2), *dout = th_randn(N * C, 3, 1.0f);
    float *keep = copy_of(dout, N * C), *rstd = th_zeros(N), *out = th_zeros(N * C), *dw = th_zeros(C);
    float *dh = th_zeros(N * C), *tmp = th_zeros(N * C);
    m1c_rmsnorm_forward(CPU, out, rstd, in, w, N, C, 1e-5f, NULL);
    m1c_rmsnorm_backward_axpby(CPU, dh, tmp, dw, dout, in, w, rstd, A, Bc, N, C, NULL);
    cr_expect_eq(memcmp(dout, keep, (size_t)N * C * 4), 0, "dout was written");
    free(in), free(w), free(dout), free(keep), free(rstd), free(out), free(dw), free(dh), free(tmp);
}
