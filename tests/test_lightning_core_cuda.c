/* The fused lightning-attention core (plugins/attention/lightning/lightning_core.cuh) on the GPU against a
 * double-precision CPU evaluation of its defining sums: both directions, head sizes 64 and 128, lengths that
 * are and are not whole 64-row blocks, one segment or many (forced), states carried in and out, and the
 * refusal of a state with the reversed sums. Skipped where the build has no CUDA or the machine no GPU. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#ifdef M1C_TEST_LCORE
/* tests/lightning_core_glue.cu (the comments there say what each argument is) */
int lct_available(void);
int lct_kernels(void);
int lct_plan(int BH, int T, int hd, int sms_override, int *kf, int *nfine, int *seg_rows);
int lct_run(int BH, int nh, int T, int hd, const float *x, const float *y, const float *z, const float *slope,
            int reverse, const float *init, float *out, float *final_state, int sms_override, int kernel, float *xr,
            float *yr, float *zr, char *err, size_t errlen);
#else
/* Built without CUDA: every test skips before reaching these; they keep the file compiling. */
static int lct_available(void) { return 0; }
static int lct_kernels(void) { return 0; }
static int lct_plan(int BH, int T, int hd, int sms_override, int *kf, int *nfine, int *seg_rows) {
    if (kf) *kf = 0;
    if (nfine) *nfine = 0;
    if (seg_rows) *seg_rows = 0;
    return 0;
}
static int lct_run(int BH, int nh, int T, int hd, const float *x, const float *y, const float *z, const float *slope,
                   int reverse, const float *init, float *out, float *final_state, int sms_override, int kernel,
                   float *xr, float *yr, float *zr, char *err, size_t errlen) {
    snprintf(err, errlen, "built without CUDA");
    return 1;
}
#endif

static void need_core(void) {
    th_need_gpu();
#ifndef M1C_TEST_LCORE
    cr_skip_test("built without CUDA: no lightning core glue");
#endif
    if (!lct_available()) cr_skip_test("no CUDA device for the lightning core");
}

/* sms_override of lct_run: the device's multiprocessors (as the plugin runs), none (one segment whatever
 * the length), or so many that lc_segments cuts every long sequence into several segments. */
enum { SMS_DEVICE = 0, ONE_SEGMENT = -1, MANY_SEGMENTS = 100000 };

/* Error of out per element, in units of the sum of the absolute values of its terms (A below): the
 * kernel's inputs are the bf16 values the reference uses too, so its only errors are roundings of
 * intermediate bf16 operands, each at most u = 2^-8 = 3.9e-3 relative (8 significant bits): the masked,
 * decayed score once (x y^T inside a block), or y times its decay and then the block-start state (the
 * carried past), i.e. at most 2u = 7.8e-3 of A where every rounding goes the same way (f32 accumulation
 * adds ~1e-6). (The wgmma kernel rounds the decay factor to bf16 before multiplying y by it in bf16: two
 * roundings to nearest, each at most 2^-9, so still at most u for y times its decay.) 1.5e-2 is twice that worst case; typical errors are ~1e-3 as roundings average out. An
 * indexing error (a wrong row, column, block or segment start, a missed block) changes whole terms, O(1)
 * of A: with the long-memory slopes one 64-row block is >= 6% of a 1000-row sum. The same tolerance
 * bounds max |out - ref| / max |ref|, the error relative to the output's scale (~1e-3 in practice; A
 * exceeds |ref| where dot products cancel, so this one rests on roundings averaging out). */
#define TOL_OUT 1.5e-2
/* The final state is f32; its only rounding is y times its decay to bf16 (at most u per term, with the
 * wgmma kernel's bf16 decay factor too): 8e-3 = 2u. */
#define TOL_STATE 8e-3

typedef struct lcase {
    int BH, nh, T, hd;
    int reverse;     /* the sums over j >= i */
    int init, fin;   /* carry a state in / out (time order only) */
    const float *slope; /* [nh] */
    uint64_t seed;
} lcase;

/* MiniMax's slopes for nh = 2: 2^(-8 (h + 1) / nh) = 2^-4, 2^-8 (memories of ~16 and ~256 rows). */
static const float minimax2[2] = {0.0625f, 0.00390625f};
/* Little decay: memories of ~1000 rows and of the whole sequence (MODEL.md's layer factor takes the last
 * layer's slopes down to ~1e-5), so the state carried across blocks and segments is most of every sum. */
static const float tiny2[2] = {1e-3f, 1e-5f};
/* Steep decay: one row more or less of decay changes a term by 40% (6% for 2^-4), so an exponent off by
 * one anywhere (mask, state decay, carried-state factor, segment scan) is far outside the tolerance, and
 * rows just after a block or segment start lean on the carried state's last rows. */
static const float steep2[2] = {0.5f, 0.0625f};

/* SiLU of N(0,1) values, like the layer's q, k, v (mostly positive: sums do not cancel out). */
static float *silu_randn(int64_t n, uint64_t seed) {
    float *v = th_randn(n, seed, 1.0f);
    for (int64_t i = 0; i < n; i++) v[i] = v[i] / (1.0f + expf(-v[i]));
    return v;
}

static double *dbl(const float *a, int64_t n) {
    double *d = malloc((size_t)n * sizeof *d);
    for (int64_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}

/* The defining sums in double, on the bf16-rounded inputs; rows in sum order r (stored row r, or T-1-r
 * reversed), so that both directions are the same loop:
 *   ref_i = sum_{q <= r} exp(-s (r - q)) (x_i . y_j) z_j  [+ exp(-s (i + 1)) x_i M0]
 * with i, j the stored rows of r, q; A_i the same sum over absolute values of every product (the scale of
 * the rounding errors). Final state M = exp(-s T) M0 + sum_j exp(-s (T-1-j)) y_j z_j^T, rows = y's dims,
 * columns = z's dims; mscale its absolute-value sum. */
static void reference(const lcase *c, const float *xf, const float *yf, const float *zf, const float *init,
                      double *ref, double *scale, double *mref, double *mscale) {
    const int T = c->T, hd = c->hd;
    const int64_t n = (int64_t)c->BH * T * hd;
    double *x = dbl(xf, n), *y = dbl(yf, n), *z = dbl(zf, n), *xa = dbl(xf, n), *ya = dbl(yf, n), *za = dbl(zf, n);
    for (int64_t e = 0; e < n; e++) xa[e] = fabs(xa[e]), ya[e] = fabs(ya[e]), za[e] = fabs(za[e]);
    double *pw = malloc((size_t)(T + 2) * sizeof *pw), *acc = malloc((size_t)hd * sizeof *acc),
           *aacc = malloc((size_t)hd * sizeof *aacc);
    cr_assert(!(c->reverse && (init || mref)), "reference: no state with the reversed sums");
    for (int bh = 0; bh < c->BH; bh++) {
        const double s = c->slope[bh % c->nh];
        for (int k = 0; k <= T + 1; k++) pw[k] = exp(-s * k);
        const int64_t o = (int64_t)bh * T * hd;
        const float *M0 = init ? init + (int64_t)bh * hd * hd : NULL;
        for (int r = 0; r < T; r++) {
            const int64_t i = o + (int64_t)(c->reverse ? T - 1 - r : r) * hd; /* row i's first element */
            for (int col = 0; col < hd; col++) acc[col] = aacc[col] = 0.0;
            for (int q = 0; q <= r; q++) {
                const int64_t j = o + (int64_t)(c->reverse ? T - 1 - q : q) * hd;
                /* four partial sums each: independent chains run ~4x faster (hd is a multiple of 4) */
                double d4[4] = {0.0, 0.0, 0.0, 0.0}, a4[4] = {0.0, 0.0, 0.0, 0.0};
                for (int k = 0; k < hd; k += 4)
                    for (int u = 0; u < 4; u++) d4[u] += x[i + k + u] * y[j + k + u], a4[u] += xa[i + k + u] * ya[j + k + u];
                const double d = (d4[0] + d4[1] + d4[2] + d4[3]) * pw[r - q];
                const double da = (a4[0] + a4[1] + a4[2] + a4[3]) * pw[r - q];
                for (int col = 0; col < hd; col++) acc[col] += d * z[j + col], aacc[col] += da * za[j + col];
            }
            if (M0) /* time order: the stored row is r */
                for (int k = 0; k < hd; k++) {
                    const double f = pw[r + 1] * x[i + k];
                    for (int col = 0; col < hd; col++) {
                        const double m = M0[(int64_t)k * hd + col];
                        acc[col] += f * m, aacc[col] += fabs(f) * fabs(m);
                    }
                }
            for (int col = 0; col < hd; col++) ref[i + col] = acc[col], scale[i + col] = aacc[col];
        }
        if (mref) {
            double *M = mref + (int64_t)bh * hd * hd, *Ma = mscale + (int64_t)bh * hd * hd;
            for (int64_t e = 0; e < (int64_t)hd * hd; e++) {
                M[e] = M0 ? pw[T] * M0[e] : 0.0;
                Ma[e] = fabs(M[e]);
            }
            for (int t = 0; t < T; t++) {
                const int64_t j = o + (int64_t)t * hd;
                for (int k = 0; k < hd; k++) {
                    const double wy = pw[T - 1 - t] * y[j + k], wya = pw[T - 1 - t] * ya[j + k];
                    for (int col = 0; col < hd; col++)
                        M[(int64_t)k * hd + col] += wy * z[j + col], Ma[(int64_t)k * hd + col] += wya * za[j + col];
                }
            }
        }
    }
    free(x), free(y), free(z), free(xa), free(ya), free(za), free(pw), free(acc), free(aacc);
}

typedef struct errs {
    double elem;   /* max |a - ref| / scale per element */
    double glob;   /* max |a - ref| / max |ref| */
    int64_t worst; /* the element of elem's maximum */
} errs;

/* A non-finite a (an element the kernel never wrote stays NaN, see the glue) counts as infinite error. */
static errs compare(const float *a, const double *ref, const double *scale, int64_t n) {
    errs e = {0.0, 0.0, 0};
    double maxref = 0.0, maxdiff = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = isfinite(a[i]) ? fabs((double)a[i] - ref[i]) : INFINITY;
        const double rel = scale[i] > 0.0 ? d / scale[i] : (d > 0.0 ? INFINITY : 0.0);
        if (rel > e.elem) e.elem = rel, e.worst = i;
        if (d > maxdiff) maxdiff = d;
        if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
    }
    e.glob = maxref > 0.0 ? maxdiff / maxref : maxdiff;
    return e;
}

/* The glue's rounded inputs are bf16 values (low 16 bits zero) within 2^-8 relative of the f32 ones
 * (round to nearest with 8 significant bits), so the reference sees what the kernel read. */
static void check_rounded(const float *a, const float *r, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &r[i], sizeof u);
        cr_assert((u & 0xffffu) == 0 && fabs((double)r[i] - a[i]) <= ldexp(fabs(a[i]), -8),
                  "%s[%lld] = %.9g rounded to %.9g: not bf16 round-to-nearest", what, (long long)i, a[i], r[i]);
    }
}

/* One case: random inputs, the reference on their bf16 roundings (from the first run), then lc_run once per
 * output-pass kernel (lct_kernels) and entry of modes (sms_override), each compared with the reference. */
static void check(const lcase *c, const int *modes, int nmodes) {
    const int64_t n = (int64_t)c->BH * c->T * c->hd, n2 = (int64_t)c->BH * c->hd * c->hd;
    float *x = silu_randn(n, c->seed), *y = silu_randn(n, c->seed + 1), *z = silu_randn(n, c->seed + 2);
    /* a state like the sum of ~100 rows (|y_j z_j^T| ~ 0.16 on average here), so that its term matters */
    float *init = c->init ? th_randn(n2, c->seed + 3, 16.0f) : NULL;
    float *xr = malloc((size_t)n * sizeof *xr), *yr = malloc((size_t)n * sizeof *yr), *zr = malloc((size_t)n * sizeof *zr);
    float *out = malloc((size_t)n * sizeof *out), *fin = c->fin ? malloc((size_t)n2 * sizeof *fin) : NULL;
    double *ref = malloc((size_t)n * sizeof *ref), *scale = malloc((size_t)n * sizeof *scale);
    double *mref = c->fin ? malloc((size_t)n2 * sizeof *mref) : NULL, *mscale = c->fin ? malloc((size_t)n2 * sizeof *mscale) : NULL;
    const int nk = lct_kernels();
    for (int km = 0; km < nk * nmodes; km++) {
        const int k = km / nmodes, m = km % nmodes, first = km == 0;
        char tag[260], err[512];
        int kf = 0, nfine = 0, seg_rows = 0;
        const int nseg = lct_plan(c->BH, c->T, c->hd, modes[m], &kf, &nfine, &seg_rows);
        snprintf(tag, sizeof tag,
                 "%s: hd %d T %d BH %d nh %d slopes %g,%g %s%s%s sms_override %d (%d segments of %d rows, %d state "
                 "segments)",
                 k ? "wgmma" : "mma.sync", c->hd, c->T, c->BH, c->nh, c->slope[0], c->nh > 1 ? c->slope[1] : c->slope[0],
                 c->reverse ? "reversed" : "time order", c->init ? " +init" : "", c->fin ? " +final" : "", modes[m],
                 nseg, seg_rows, nseg > 1 ? nfine : 0);
        /* the cut the case means to exercise */
        if (modes[m] == ONE_SEGMENT) cr_assert_eq(nseg, 1, "%s: expected one segment", tag);
        if (modes[m] == MANY_SEGMENTS && c->T >= 8 * 64) cr_assert_gt(nseg, 1, "%s: expected several segments", tag);

        const int rc = lct_run(c->BH, c->nh, c->T, c->hd, x, y, z, c->slope, c->reverse, init, out, fin, modes[m], k,
                               first ? xr : NULL, first ? yr : NULL, first ? zr : NULL, err, sizeof err);
        cr_assert_eq(rc, 0, "%s: lct_run: %s", tag, err);
        if (first) {
            check_rounded(x, xr, n, "x"), check_rounded(y, yr, n, "y"), check_rounded(z, zr, n, "z");
            reference(c, xr, yr, zr, init, ref, scale, mref, mscale);
        }
        const errs e = compare(out, ref, scale, n);
        const int64_t row = e.worst / c->hd;
        cr_log_info("%s: out error %.3g of |terms|, %.3g of max|ref|", tag, e.elem, e.glob);
        cr_assert(e.elem <= TOL_OUT && e.glob <= TOL_OUT,
                  "%s: out error %.3g of |terms| (tolerance %g) at bh %lld row %lld col %lld: %.7g vs %.7g (|terms| "
                  "%.4g); %.3g of max|ref|",
                  tag, e.elem, TOL_OUT, (long long)(row / c->T), (long long)(row % c->T), (long long)(e.worst % c->hd),
                  out[e.worst], ref[e.worst], scale[e.worst], e.glob);
        if (fin) {
            const errs f = compare(fin, mref, mscale, n2);
            cr_log_info("%s: final state error %.3g of |terms|, %.3g of max|ref|", tag, f.elem, f.glob);
            cr_assert(f.elem <= TOL_STATE && f.glob <= TOL_STATE,
                      "%s: final state error %.3g of |terms| (tolerance %g) at [%lld][%lld][%lld]: %.7g vs %.7g; %.3g "
                      "of max|ref|",
                      tag, f.elem, TOL_STATE, (long long)(f.worst / ((int64_t)c->hd * c->hd)),
                      (long long)(f.worst / c->hd % c->hd), (long long)(f.worst % c->hd), fin[f.worst], mref[f.worst],
                      f.glob);
        }
    }
    free(x), free(y), free(z), free(init), free(xr), free(yr), free(zr), free(out), free(fin);
    free(ref), free(scale), free(mref), free(mscale);
}

/* Lengths: one row, part of a block, exactly one block, one past it, several blocks with a partial last
 * one, and 1000 rows (16 blocks, the last partial; several segments where the mode asks for them). Three
 * sequences over two heads (two for 1000 rows, to bound the reference's time): the slope is head bh % nh's,
 * and bh = 2 reuses head 0's. Every length runs as one segment, as the plugin would on this device, and
 * cut into as many segments as lc_segments allows. */
static void sweep(int hd, int reverse) {
    static const int Ts[] = {1, 5, 64, 65, 200, 1000};
    static const int modes[] = {ONE_SEGMENT, SMS_DEVICE, MANY_SEGMENTS};
    for (size_t t = 0; t < sizeof Ts / sizeof Ts[0]; t++) {
        const lcase c = {Ts[t] < 1000 ? 3 : 2, 2, Ts[t], hd, reverse, 0, 0, minimax2,
                         100u + 7u * (uint64_t)t + (uint64_t)hd + 1000u * (uint64_t)reverse};
        check(&c, modes, 3);
    }
}

Test(lightning_core, time_order_hd64) {
    need_core();
    sweep(64, 0);
}
Test(lightning_core, time_order_hd128) {
    need_core();
    sweep(128, 0);
}
Test(lightning_core, reversed_hd64) {
    need_core();
    sweep(64, 1);
}
Test(lightning_core, reversed_hd128) {
    need_core();
    sweep(128, 1);
}

/* A cut with several output segments, each started from kf >= 2 finer state-only segments (MANY_SEGMENTS
 * never gives that: it wants so many output segments that each is the minimum four blocks). The plan
 * depends on the device's occupancy, so search the fewest sequences (at least two, for both heads) and an
 * sms_override that give it; into *BH, returns the sms_override. */
static int fine_cut(int T, int hd, int *BH) {
    for (int bh = 2; bh <= 6; bh++)
        for (int sms = 1; sms <= 64; sms++) {
            int kf = 0;
            if (lct_plan(bh, T, hd, sms, &kf, NULL, NULL) >= 2 && kf >= 2) {
                *BH = bh;
                return sms;
            }
        }
    cr_assert_fail("T %d hd %d: no sms_override gives output segments of several state segments", T, hd);
    return 0;
}

/* Long memory across segments: 1000 rows cut every way (output segments of one or several state
 * segments, four segments of 256 rows with the last 232, one segment, the device's choice), and 577 rows
 * (two segments of 320 and 257 rows), with little decay so that a wrong segment-start state shows. */
static void segments(int reverse, int init_final) {
    const uint64_t seed = 500u + 1000u * (uint64_t)reverse + 3000u * (uint64_t)init_final;
    for (int h = 0; h < 2; h++) {
        const int hd = h ? 128 : 64;
        int BH = 2;
        const int sms = fine_cut(1000, hd, &BH);
        const int modes[4] = {sms, MANY_SEGMENTS, ONE_SEGMENT, SMS_DEVICE};
        const lcase c = {BH, 2, 1000, hd, reverse, init_final, init_final, tiny2, seed + (uint64_t)hd};
        check(&c, modes, 4);
    }
    const int modes[2] = {MANY_SEGMENTS, ONE_SEGMENT};
    const lcase c = {2, 2, 577, 64, reverse, init_final, init_final, tiny2, seed + 7u};
    cr_assert_eq(lct_plan(c.BH, c.T, c.hd, MANY_SEGMENTS, NULL, NULL, NULL), 2, "T 577 hd 64: expected two segments");
    check(&c, modes, 2);
}

Test(lightning_core, segments_time_order) {
    need_core();
    segments(0, 0);
}
Test(lightning_core, segments_reversed) {
    need_core();
    segments(1, 0);
}
/* The scan must start from init, and the last segment write the final state. */
Test(lightning_core, segments_state_in_out) {
    need_core();
    segments(0, 1);
}

/* A state carried in (init) and out (final_state), together and each alone, in one segment: short
 * lengths where the carried-in term dominates the first rows; every slope set. */
Test(lightning_core, state_in_out) {
    need_core();
    static const int Ts[] = {1, 5, 64, 65, 200};
    static const int modes[] = {ONE_SEGMENT, SMS_DEVICE};
    static const int io[3][2] = {{1, 1}, {0, 1}, {1, 0}};
    const float *slopes[3] = {minimax2, tiny2, steep2};
    for (int h = 0; h < 2; h++)
        for (size_t t = 0; t < sizeof Ts / sizeof Ts[0]; t++)
            for (int k = 0; k < 3; k++)
                for (int sl = 0; sl < 3; sl++) {
                    const int hd = h ? 128 : 64;
                    const lcase c = {3, 2, Ts[t], hd, 0, io[k][0], io[k][1], slopes[sl],
                                     900u + 13u * (uint64_t)t + 3u * (uint64_t)k + 37u * (uint64_t)sl + (uint64_t)hd};
                    check(&c, modes, 2);
                }
}

/* Steep decay over block and segment boundaries: both directions, and time order with states in and out. */
Test(lightning_core, steep_decay) {
    need_core();
    static const int Ts[] = {65, 200, 577};
    static const int modes[] = {ONE_SEGMENT, MANY_SEGMENTS};
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 3; t++)
            for (int v = 0; v < 3; v++) {
                const int hd = h ? 128 : 64;
                const lcase c = {3, 2, Ts[t], hd, v == 1, v == 2, v == 2, steep2,
                                 2000u + 19u * (uint64_t)t + 5u * (uint64_t)v + (uint64_t)hd};
                check(&c, modes, 2);
            }
}

/* lc_run refuses a state (in or out) with the reversed sums, whose state would be another quantity; the
 * same call in time order is accepted (so the refusal is about the direction). */
Test(lightning_core, reverse_refuses_state) {
    need_core();
    enum { BH = 2, NH = 2, T = 600, HD = 64 }; /* 600 rows: two segments with MANY_SEGMENTS */
    const int64_t n = (int64_t)BH * T * HD, n2 = (int64_t)BH * HD * HD;
    float *x = silu_randn(n, 1), *y = silu_randn(n, 2), *z = silu_randn(n, 3), *init = th_randn(n2, 4, 1.0f);
    float *out = malloc((size_t)n * sizeof *out), *fin = malloc((size_t)n2 * sizeof *fin);
    char err[512];
    for (int sms = 0; sms < 2; sms++) {
        const int mode = sms ? MANY_SEGMENTS : ONE_SEGMENT;
        int rc = lct_run(BH, NH, T, HD, x, y, z, minimax2, 1, init, out, NULL, mode, 0, NULL, NULL, NULL, err, sizeof err);
        cr_assert_eq(rc, 2, "reversed with init: expected lc_run's refusal, got %d: %s", rc, err);
        th_assert_has(err, "cudaErrorInvalidValue");
        rc = lct_run(BH, NH, T, HD, x, y, z, minimax2, 1, NULL, out, fin, mode, 0, NULL, NULL, NULL, err, sizeof err);
        cr_assert_eq(rc, 2, "reversed with final_state: expected lc_run's refusal, got %d: %s", rc, err);
        th_assert_has(err, "cudaErrorInvalidValue");
        rc = lct_run(BH, NH, T, HD, x, y, z, minimax2, 0, init, out, fin, mode, 0, NULL, NULL, NULL, err, sizeof err);
        cr_assert_eq(rc, 0, "time order with init and final_state: %s", err);
    }
    free(x), free(y), free(z), free(init), free(out), free(fin);
}
