/* The core's own layers and vector operations (core/ops.h) on a CUDA device against the CPU reference:
 * fresh random inputs of sizes that no block or tile divides, the same inputs on both sides, widths
 * that take the kernels' 16-byte path (multiples of 4) and their scalar path (the others, and arrays
 * placed one float past an aligned start). Skipped where the build has no CUDA or the machine has no
 * GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "m1c/plugin.h"
#include "../core/ops.h"
#include "../core/rng.h"
#include "harness.h"
#ifdef M1C_TEST_CUDA_OPS
#include "../core/cuda/ops.h"
#endif

#define GPU M1C_DEVICE_CUDA
#define CPU M1C_DEVICE_CPU

/* Row counts that are not multiples of 8 (the RMSNorm kernels' rows per block), 32, 128 or 256 (1
 * included); widths of both kinds: 1 and 33 take the scalar path, 256 and 1100 (= 4 * 275) the 16-byte
 * one, with a last group of loads that is partly past the row. */
static const int64_t Ns[] = {1, 37, 1003};
static const int Cs[] = {1, 33, 256, 1100};
#define NN (int)(sizeof Ns / sizeof Ns[0])
#define NC (int)(sizeof Cs / sizeof Cs[0])

static void *up_bytes(const void *x, size_t bytes) {
    void *d = m1c_dev_alloc(GPU, bytes ? bytes : 1);
    cr_assert_not_null(d);
    m1c_dev_copy(GPU, d, CPU, x, bytes);
    return d;
}

static float *up(const float *x, int64_t n) { return th_to_dev(GPU, x, n); }
static float *down(const float *d, int64_t n) { return th_to_host(GPU, d, n); }

/* A norm's bf16 copy lp of its f32 output f (both on the GPU) must be f rounded as m1c_to_bf16 rounds it,
 * bit for bit: the layers take it in place of their own rounding (m1c_layer_bufs.in_lp). */
static void expect_lp(const uint16_t *lp, const float *f, int64_t n, const char *what) {
    uint16_t *d_ref = m1c_dev_alloc(GPU, (size_t)n * 2), *got = malloc((size_t)n * 2), *ref = malloc((size_t)n * 2);
    cr_assert(d_ref && got && ref);
    m1c_to_bf16(GPU, d_ref, f, n);
    m1c_dev_copy(CPU, got, GPU, lp, (size_t)n * 2);
    m1c_dev_copy(CPU, ref, GPU, d_ref, (size_t)n * 2);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += got[i] != ref[i];
    cr_expect_eq(bad, 0, "%s: the bf16 copy differs from the rounded output in %lld of %lld values", what,
                 (long long)bad, (long long)n);
    m1c_dev_free(GPU, d_ref), free(got), free(ref);
}
static void gfree(void *d) { th_dev_free(GPU, d); }

/* x on the GPU `shift` floats past the start of a fresh allocation: shift 1 leaves it 4 bytes past a
 * 16-byte boundary, which sends the kernels to their scalar path. Freed with gfree_at. */
static float *up_at(const float *x, int64_t n, int shift) {
    float *d = m1c_dev_alloc(GPU, (size_t)(n + shift) * 4);
    cr_assert_not_null(d);
    m1c_dev_copy(GPU, d + shift, CPU, x, (size_t)n * 4);
    return d + shift;
}
static void gfree_at(float *d, int shift) { th_dev_free(GPU, d - shift); }

static float *copy_of(const float *x, int64_t n) {
    float *y = malloc((size_t)(n ? n : 1) * 4);
    memcpy(y, x, (size_t)n * 4);
    return y;
}

/* max |gpu - cpu| / max |cpu| (absolute where the reference is all zero); NaN anywhere gives Inf. */
static double rel_max(const float *gpu, const float *cpu, int64_t n) {
    double d = th_max_abs_diff(gpu, cpu, n), m = th_max_abs(cpu, n);
    return m > 0 ? d / m : d;
}

/* Token ids in [0, V) with many repeats (half of them from 5 ids), V - 1 and 0 present; every
 * `unscored`-th entry -1 when unscored > 0 (targets not scored). */
static int32_t *make_ids(int64_t N, int V, uint64_t seed, int unscored) {
    int32_t *ids = malloc((size_t)N * sizeof *ids);
    m1c_rng r;
    m1c_rng_seed(&r, seed, 3);
    for (int64_t i = 0; i < N; i++) ids[i] = (int32_t)(m1c_rng_u64(&r) % (uint64_t)(i % 2 ? V : 5));
    ids[N - 1] = V - 1;
    if (N > 2) ids[N / 2] = ids[0];
    if (unscored > 0)
        for (int64_t i = 1; i < N; i += unscored) ids[i] = -1;
    return ids;
}

/* ---- embedding ---- */

Test(cuda_ops, embed_forward_backward) {
    th_need_gpu();
    const int V = 259;
    for (int a = 0; a < NN; a++)
        for (int b = 0; b < NC; b++) {
            const int64_t N = Ns[a];
            const int H = Cs[b];
            int32_t *ids = make_ids(N, V, 10 + (uint64_t)(a * NC + b), 0);
            float *wte = th_randn((int64_t)V * H, 1, 1.0f), *out = th_zeros(N * H);
            int32_t *d_ids = up_bytes(ids, (size_t)N * 4);
            float *d_wte = up(wte, (int64_t)V * H), *d_out = up(out, N * H);
            m1c_embed_forward(CPU, out, ids, wte, N, H);
            m1c_embed_forward(GPU, d_out, d_ids, d_wte, N, H);
            float *g_out = down(d_out, N * H);
            /* A gather: exact. */
            cr_expect_eq(th_max_abs_diff(g_out, out, N * H), 0.0, "embed forward N=%lld H=%d", (long long)N, H);

            /* Backward accumulates into a non-zero dwte. */
            float *dout = th_randn(N * H, 2, 1.0f), *dwte = th_randn((int64_t)V * H, 3, 1.0f);
            float *d_dout = up(dout, N * H), *d_dwte = up(dwte, (int64_t)V * H);
            m1c_embed_backward(CPU, dwte, dout, ids, N, H);
            m1c_embed_backward(GPU, d_dwte, d_dout, d_ids, N, H);
            float *g_dwte = down(d_dwte, (int64_t)V * H);
            /* Repeated ids are summed in token order into a partial sum that is added once (the CPU adds each
             * row into dwte): up to ~N/10 f32 additions per element, each rounding by <= 6e-8 of the
             * running sum, stays below 1e-5 of the largest element. */
            double e = rel_max(g_dwte, dwte, (int64_t)V * H);
            cr_expect_leq(e, 1e-5, "embed backward N=%lld H=%d: error %g of max", (long long)N, H, e);

            free(ids), free(wte), free(out), free(g_out), free(dout), free(dwte), free(g_dwte);
            gfree(d_ids), gfree(d_wte), gfree(d_out), gfree(d_dout), gfree(d_dwte);
        }
}

/* RMSNorm weights near 1 (1 + N(0, 0.2^2)), as a trained layer's. */
static float *norm_weights(int C, uint64_t seed) {
    float *w = th_randn(C, seed, 0.2f);
    for (int c = 0; c < C; c++) w[c] += 1.0f;
    return w;
}

/* ---- RMSNorm ---- */

Test(cuda_ops, rmsnorm_forward_backward) {
    th_need_gpu();
    const float eps = 1e-5f;
    /* shift 1: every array one float past alignment (the scalar path for every C) */
    for (int shift = 0; shift < 2; shift++)
        for (int a = 0; a < NN; a++)
            for (int b = 0; b < NC; b++) {
                const int64_t N = Ns[a];
                const int C = Cs[b];
                const uint64_t s = 100 + (uint64_t)(a * NC + b) * 10;
                float *in = th_randn(N * C, s, 1.0f), *w = norm_weights(C, s + 1);
                float *out = th_zeros(N * C), *rstd = th_zeros(N);
                float *d_in = up_at(in, N * C, shift), *d_w = up_at(w, C, shift), *d_out = up_at(out, N * C, shift);
                float *d_rstd = up(rstd, N);
                m1c_rmsnorm_forward(CPU, out, rstd, in, w, N, C, eps, NULL);
                uint16_t *d_lp = m1c_dev_alloc(GPU, (size_t)(N * C) * 2);
                m1c_rmsnorm_forward(GPU, d_out, d_rstd, d_in, d_w, N, C, eps, d_lp);
                expect_lp(d_lp, d_out, N * C, "RMSNorm forward");
                m1c_dev_free(GPU, d_lp);
                float *g_out = down(d_out, N * C), *g_rstd = down(d_rstd, N);
                /* Sums of C <= 1100 squares in another order (relative ~1e-6) and rsqrtf (<= 2 ulp,
                 * 2.4e-7): 1e-5 of the largest element. */
                double eo = rel_max(g_out, out, N * C), er = rel_max(g_rstd, rstd, N);
                cr_expect_leq(eo, 1e-5, "rmsnorm forward N=%lld C=%d shift %d: out error %g", (long long)N, C, shift,
                              eo);
                cr_expect_leq(er, 1e-5, "rmsnorm forward N=%lld C=%d shift %d: rstd error %g", (long long)N, C, shift,
                              er);

                /* Backward from the same inputs on both sides (the CPU's rstd); din and dw accumulate. */
                float *dout = th_randn(N * C, s + 2, 1.0f), *din = th_randn(N * C, s + 3, 1.0f);
                float *dw = th_randn(C, s + 4, 1.0f);
                float *d_dout = up_at(dout, N * C, shift), *d_din = up_at(din, N * C, shift), *d_dw = up(dw, C);
                m1c_dev_copy(GPU, d_rstd, CPU, rstd, (size_t)N * 4);
                m1c_rmsnorm_backward(CPU, din, dw, dout, in, w, rstd, N, C);
                m1c_rmsnorm_backward(GPU, d_din, d_dw, d_dout, d_in, d_w, d_rstd, N, C);
                float *g_din = down(d_din, N * C), *g_dw = down(d_dw, C);
                /* din: a dot product of C terms in another order and the GPU's fused multiply-adds; the
                 * two terms r g w and k x cancel partly for C = 1 but are at most ~r ~ 1/sqrt(eps) times
                 * |g w|, so one rounding of them stays below 1e-5 of the largest element. dw: sums of N
                 * terms over rows in another order (row chunks, 8 interleaved partial sums each). */
                double ei = rel_max(g_din, din, N * C), ew = rel_max(g_dw, dw, C);
                cr_expect_leq(ei, 1e-5, "rmsnorm backward N=%lld C=%d shift %d: din error %g", (long long)N, C, shift,
                              ei);
                cr_expect_leq(ew, 1e-5, "rmsnorm backward N=%lld C=%d shift %d: dw error %g", (long long)N, C, shift,
                              ew);

                free(in), free(w), free(out), free(rstd), free(g_out), free(g_rstd);
                free(dout), free(din), free(dw), free(g_din), free(g_dw);
                gfree_at(d_in, shift), gfree_at(d_w, shift), gfree_at(d_out, shift), gfree(d_rstd);
                gfree_at(d_dout, shift), gfree_at(d_din, shift), gfree(d_dw);
            }
}

/* The two weight gradients that sum over tokens do so in a fixed order on the GPU: the same inputs give
 * the same bits on every run (what a resumed run's equality with an uninterrupted one needs). */
Test(cuda_ops, token_sums_repeat_bit_for_bit) {
    th_need_gpu();
    const int64_t N = 4099;
    const int H = 300, V = 259;
    int32_t *ids = make_ids(N, V, 77, 0);
    float *dout = th_randn(N * H, 78, 1.0f), *in = th_randn(N * H, 79, 1.0f), *w = th_randn(H, 80, 1.0f);
    float *rstd = th_randn(N, 81, 0.5f);
    int32_t *d_ids = up_bytes(ids, (size_t)N * 4);
    float *d_dout = up(dout, N * H), *d_in = up(in, N * H), *d_w = up(w, H), *d_rstd = up(rstd, N);
    float *res[2][2];
    for (int run = 0; run < 2; run++) {
        float *z = th_zeros(N * H); /* N > V: zeros for every buffer */
        float *d_dwte = up(z, (int64_t)V * H), *d_dw = up(z, H), *d_din = up(z, N * H);
        m1c_embed_backward(GPU, d_dwte, d_dout, d_ids, N, H);
        m1c_rmsnorm_backward(GPU, d_din, d_dw, d_dout, d_in, d_w, d_rstd, N, H);
        res[run][0] = down(d_dwte, (int64_t)V * H), res[run][1] = down(d_dw, H);
        free(z), gfree(d_dwte), gfree(d_dw), gfree(d_din);
    }
    /* exact: the same operations in the same order */
    cr_expect_eq(memcmp(res[0][0], res[1][0], (size_t)V * H * 4), 0, "embedding gradient differs between runs");
    cr_expect_eq(memcmp(res[0][1], res[1][1], (size_t)H * 4), 0, "RMSNorm weight gradient differs between runs");
    cr_expect_gt(th_max_abs(res[0][0], (int64_t)V * H), 0.0, "embedding gradient is zero");
    for (int r = 0; r < 2; r++) free(res[r][0]), free(res[r][1]);
    free(ids), free(dout), free(in), free(w), free(rstd);
    gfree(d_ids), gfree(d_dout), gfree(d_in), gfree(d_w), gfree(d_rstd);
}

/* ---- fused residual + RMSNorm, RMSNorm backward + gradient split ---- */

/* Shapes of the fused ops: row counts that the kernels' 8 rows per block and the backward's 32-row
 * chunks do not divide, and 16411 > 512 chunks of 32 rows, where the chunk count is capped (33 rows
 * each, the last chunks empty); widths 33 (the scalar path), 768 (the model's) and 256 and 1100 (the
 * 16-byte path, 1100 with a partial last group of loads), 1700 and 1701 wider than the fused weight
 * gradient's shared memory holds (C > 1536: its separate pass, 16-byte and scalar). Every case also
 * runs one float past alignment (the scalar path for every width). */
typedef struct fused_case {
    int64_t N;
    int C;
} fused_case;
static const fused_case fused_cases[] = {{1, 33}, {37, 768}, {1003, 768}, {1003, 33}, {37, 1100},
                                         {37, 1700}, {37, 1701}, {16411, 256}};
#define NFC (int)(sizeof fused_cases / sizeof fused_cases[0])
static const float FA = 1.7f, FB = 0.37f; /* DeepNorm-like, not powers of two: every product rounds */

static float *nans(int64_t n) {
    float *y = malloc((size_t)(n ? n : 1) * 4);
    for (int64_t i = 0; i < n; i++) y[i] = NAN;
    return y;
}

Test(cuda_ops, residual_rmsnorm_fused) {
    th_need_gpu();
    const float eps = 1e-5f;
    int exact = 1;
    for (int shift = 0; shift < 2; shift++)
        for (int ci = 0; ci < NFC; ci++) {
            const fused_case fc = fused_cases[ci];
            const uint64_t s = 2000 + (uint64_t)ci * 10;
            const int64_t N = fc.N, n = N * fc.C;
            const int C = fc.C;
            float *y0 = th_randn(n, s, 1.0f), *h = th_randn(n, s + 1, 1.0f), *w = norm_weights(C, s + 2);
            float *nan_n = nans(n), *nan_r = nans(N);
            /* the CPU's fused op (equal to its separate ops: test_ops_fused) */
            float *y = copy_of(y0, n), *out = nans(n), *rstd = nans(N);
            m1c_residual_rmsnorm(CPU, y, h, FA, FB, out, rstd, w, N, C, eps, NULL);
            /* the GPU's fused op, and its separate ops on the same inputs */
            float *d_h = up_at(h, n, shift), *d_w = up_at(w, C, shift);
            float *d_y = up_at(y0, n, shift), *d_out = up_at(nan_n, n, shift), *d_rstd = up(nan_r, N);
            float *d_y2 = up_at(y0, n, shift), *d_out2 = up_at(nan_n, n, shift), *d_rstd2 = up(nan_r, N);
            uint16_t *d_lp = m1c_dev_alloc(GPU, (size_t)n * 2);
            m1c_residual_rmsnorm(GPU, d_y, d_h, FA, FB, d_out, d_rstd, d_w, N, C, eps, d_lp);
            expect_lp(d_lp, d_out, n, "residual + RMSNorm");
            m1c_dev_free(GPU, d_lp);
            m1c_residual(GPU, d_y2, d_h, FA, FB, n);
            m1c_rmsnorm_forward(GPU, d_out2, d_rstd2, d_y2, d_w, N, C, eps, NULL);
            float *gy = down(d_y, n), *gout = down(d_out, n), *grstd = down(d_rstd, N);
            float *gy2 = down(d_y2, n), *gout2 = down(d_out2, n), *grstd2 = down(d_rstd2, N);
            /* Against the CPU: y as in the residual test (the GPU may fuse one product into the addition,
             * <= 6e-8 of a term): 1e-6 of the largest element; out and rstd as in the RMSNorm test (sums
             * of C squares in another order, rsqrtf): 1e-5. */
            double ey = rel_max(gy, y, n), eo = rel_max(gout, out, n), er = rel_max(grstd, rstd, N);
            cr_expect_leq(ey, 1e-6, "N=%lld C=%d shift %d: y vs CPU %g", (long long)N, C, shift, ey);
            cr_expect_leq(eo, 1e-5, "N=%lld C=%d shift %d: out vs CPU %g", (long long)N, C, shift, eo);
            cr_expect_leq(er, 1e-5, "N=%lld C=%d shift %d: rstd vs CPU %g", (long long)N, C, shift, er);
            /* Against the separate GPU ops: the same expressions, lanes and summation order, so expected
             * bit for bit; allowed: nvcc contracting a h + b y into a fused multiply-add otherwise in the
             * two kernels (one rounding of a term, 6e-8 of the largest element, then the same through the
             * norm): 1e-6. */
            double fy = rel_max(gy, gy2, n), fo = rel_max(gout, gout2, n), fr = rel_max(grstd, grstd2, N);
            cr_expect_leq(fy, 1e-6, "N=%lld C=%d shift %d: y vs separate %g", (long long)N, C, shift, fy);
            cr_expect_leq(fo, 1e-6, "N=%lld C=%d shift %d: out vs separate %g", (long long)N, C, shift, fo);
            cr_expect_leq(fr, 1e-6, "N=%lld C=%d shift %d: rstd vs separate %g", (long long)N, C, shift, fr);
            exact &= fy == 0 && fo == 0 && fr == 0;

            free(y0), free(h), free(w), free(nan_n), free(nan_r), free(y), free(out), free(rstd);
            free(gy), free(gout), free(grstd), free(gy2), free(gout2), free(grstd2);
            gfree_at(d_h, shift), gfree_at(d_w, shift), gfree_at(d_y, shift), gfree_at(d_out, shift), gfree(d_rstd);
            gfree_at(d_y2, shift), gfree_at(d_out2, shift), gfree(d_rstd2);
        }
    cr_log_info("fused residual + RMSNorm %s the separate GPU ops bit for bit", exact ? "equals" : "does NOT equal");
}

/* The largest error of proj (N, P) against out pw^T summed in double, each element's error over the sum
 * of its terms' magnitudes (the scale an f32 sum's rounding grows with). */
static double proj_err(const float *proj, const float *out, const float *pw, int64_t N, int C, int P) {
    double e = 0;
    for (int64_t i = 0; i < N; i++)
        for (int p = 0; p < P; p++) {
            double ref = 0, mag = 0;
            for (int c = 0; c < C; c++) {
                const double t = (double)out[i * C + c] * pw[(int64_t)p * C + c];
                ref += t, mag += fabs(t);
            }
            const double d = fabs(proj[i * P + p] - ref) / (mag > 0 ? mag : 1);
            if (!(d <= e)) e = d; /* NaN sticks */
        }
    return e;
}

/* The residual norm with a projection (a layer's in_proj, ABI 1.4): y, out, rstd and out_lp bit for bit
 * those of the plain op (the products only read registers), and proj = out pw^T for P rows, each of the
 * kernel's accumulator sizes (P <= 8: 8; up to 32), on both paths (16-byte and, one float past alignment,
 * scalar), C not a multiple of the 128 columns a warp takes per step. Tolerances, relative to the sum of
 * the terms' magnitudes: the GPU sums ~C/32 terms a lane and then 5 butterfly levels in f32, (C/32 + 5)
 * 2^-24 <= 4e-6 at C = 1701: 1e-5; the CPU sums C terms in a row, (C - 1) 2^-24 ~ 1e-4 at worst: 2e-4. */
Test(cuda_ops, residual_rmsnorm_projection) {
    th_need_gpu();
    const float eps = 1e-5f;
    static const struct {
        int64_t N;
        int C, P;
    } cases[] = {{37, 768, 8}, {1003, 768, 1}, {37, 1701, 5}, {1003, 256, 9}, {64, 768, 32}, {3, 33, 32}};
    for (int shift = 0; shift < 2; shift++)
        for (int ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
            const int64_t N = cases[ci].N, n = N * cases[ci].C;
            const int C = cases[ci].C, P = cases[ci].P;
            const uint64_t s = 2500 + (uint64_t)ci * 10;
            float *y0 = th_randn(n, s, 1.0f), *h = th_randn(n, s + 1, 1.0f), *w = norm_weights(C, s + 2);
            float *pw = th_randn((int64_t)P * C, s + 3, 0.05f), *nan_n = nans(n), *nan_r = nans(N);
            float *nan_p = nans(N * P);
            float *d_h = up_at(h, n, shift), *d_w = up_at(w, C, shift), *d_pw = up_at(pw, (int64_t)P * C, shift);
            float *d_y = up_at(y0, n, shift), *d_out = up_at(nan_n, n, shift), *d_rstd = up(nan_r, N);
            float *d_y2 = up_at(y0, n, shift), *d_out2 = up_at(nan_n, n, shift), *d_rstd2 = up(nan_r, N);
            float *d_proj = up(nan_p, N * P);
            uint16_t *d_lp = m1c_dev_alloc(GPU, (size_t)n * 2), *d_lp2 = m1c_dev_alloc(GPU, (size_t)n * 2);
            m1c_residual_rmsnorm_ex(GPU, d_y, d_h, FA, FB, NULL, d_out, d_rstd, d_w, N, C, eps, d_lp, d_pw, P, d_proj);
            m1c_residual_rmsnorm(GPU, d_y2, d_h, FA, FB, d_out2, d_rstd2, d_w, N, C, eps, d_lp2);
            float *gy = down(d_y, n), *gout = down(d_out, n), *grstd = down(d_rstd, N), *gproj = down(d_proj, N * P);
            float *gy2 = down(d_y2, n), *gout2 = down(d_out2, n), *grstd2 = down(d_rstd2, N);
            uint16_t *lp = malloc((size_t)n * 2), *lp2 = malloc((size_t)n * 2);
            m1c_dev_copy(CPU, lp, GPU, d_lp, (size_t)n * 2);
            m1c_dev_copy(CPU, lp2, GPU, d_lp2, (size_t)n * 2);
            cr_expect(!memcmp(gy, gy2, (size_t)n * 4) && !memcmp(gout, gout2, (size_t)n * 4) &&
                          !memcmp(grstd, grstd2, (size_t)N * 4) && !memcmp(lp, lp2, (size_t)n * 2),
                      "N=%lld C=%d P=%d shift %d: the projection changed y, out, rstd or out_lp", (long long)N, C, P,
                      shift);
            const double eg = proj_err(gproj, gout, pw, N, C, P);
            cr_expect_leq(eg, 1e-5, "N=%lld C=%d P=%d shift %d: GPU proj vs double %g", (long long)N, C, P, shift, eg);
            /* the CPU's op, its own out as the reference's input */
            float *y = copy_of(y0, n), *out = nans(n), *rstd = nans(N), *proj = nans(N * P);
            m1c_residual_rmsnorm_ex(CPU, y, h, FA, FB, NULL, out, rstd, w, N, C, eps, NULL, pw, P, proj);
            const double ec = proj_err(proj, out, pw, N, C, P);
            cr_expect_leq(ec, 2e-4, "N=%lld C=%d P=%d: CPU proj vs double %g", (long long)N, C, P, ec);

            free(y0), free(h), free(w), free(pw), free(nan_n), free(nan_r), free(nan_p), free(lp), free(lp2);
            free(gy), free(gout), free(grstd), free(gproj), free(gy2), free(gout2), free(grstd2);
            free(y), free(out), free(rstd), free(proj);
            gfree_at(d_h, shift), gfree_at(d_w, shift), gfree_at(d_pw, shift), gfree_at(d_y, shift);
            gfree_at(d_out, shift), gfree(d_rstd), gfree_at(d_y2, shift), gfree_at(d_out2, shift), gfree(d_rstd2);
            gfree(d_proj), m1c_dev_free(GPU, d_lp), m1c_dev_free(GPU, d_lp2);
        }
}

/* The residual norm taking a layer's output as weighted rows (m1c_out_rows, ABI 1.4): the same y, out,
 * rstd and out_lp as the plain op given y = the rows' sum, made here by the same fused multiply-adds in the
 * same order (C's fmaf rounds once, as the GPU's), so expected bit for bit; allowed: 1e-6, nvcc
 * contracting a h + b y differently in the two kernels (as in residual_rmsnorm_fused). bf16 and f32 rows,
 * dropped slots (idx -1), the 16-byte and scalar paths (C = 33), with a projection too; and the identity
 * of ABI 1.5 (idx and weight NULL, k = 1: the rows are the output, a projection's bf16 product), whose sum
 * is fmaf(1, row, 0). The CPU's op with rows against its plain op: bit for bit (the same loop). */
Test(cuda_ops, residual_rmsnorm_rows) {
    th_need_gpu();
    const float eps = 1e-5f;
    static const struct {
        int64_t N;
        int C, k, bf16, P, id;
    } cases[] = {{37, 768, 2, 1, 0, 0},   {1003, 768, 2, 0, 0, 0}, {37, 33, 3, 1, 0, 0}, {64, 256, 2, 1, 8, 0},
                 {1003, 768, 1, 1, 0, 1}, {37, 33, 1, 1, 0, 1},    {64, 256, 1, 0, 8, 1}};
    int exact = 1;
    for (int ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
        const int64_t N = cases[ci].N, n = N * cases[ci].C, R = N * cases[ci].k, Nk = N * cases[ci].k;
        const int C = cases[ci].C, k = cases[ci].k, P = cases[ci].P, bf = cases[ci].bf16, id = cases[ci].id;
        const uint64_t s = 2700 + (uint64_t)ci * 10;
        float *rows = th_randn(R * C, s, 1.0f), *wt = th_randn(Nk, s + 1, 0.5f), *h = th_randn(n, s + 2, 1.0f);
        float *w = norm_weights(C, s + 3), *pw = th_randn((int64_t)(P ? P : 1) * C, s + 4, 0.05f);
        uint16_t *rows16 = malloc((size_t)(R * C) * 2);
        int32_t *idx = malloc((size_t)Nk * 4);
        for (int64_t i = 0; i < Nk; i++) /* some dropped; the identity's: row i itself, weight 1 */
            idx[i] = id ? (int32_t)i : i % 7 == 3 ? -1 : (int32_t)((i * 7919) % R);
        if (id)
            for (int64_t i = 0; i < Nk; i++) wt[i] = 1.0f;
        for (int64_t i = 0; i < R * C; i++) { /* bf16 rows: the values rounded, as the GPU reads them */
            uint32_t u;
            memcpy(&u, &rows[i], 4);
            u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
            rows16[i] = (uint16_t)(u >> 16);
            if (bf) memcpy(&rows[i], &u, 4);
        }
        float *ysum = calloc((size_t)n, 4); /* the rows' sum: fused multiply-adds from 0, slots in order */
        for (int64_t i = 0; i < N; i++)
            for (int j = 0; j < k; j++) {
                const int32_t r = idx[i * k + j];
                if (r < 0) continue;
                for (int c = 0; c < C; c++)
                    ysum[i * C + c] = fmaf(wt[i * k + j], rows[(int64_t)r * C + c], ysum[i * C + c]);
            }
        void *d_rows = bf ? (void *)m1c_dev_alloc(GPU, (size_t)(R * C) * 2) : (void *)up(rows, R * C);
        if (bf) m1c_dev_copy(GPU, d_rows, CPU, rows16, (size_t)(R * C) * 2);
        int32_t *d_idx = m1c_dev_alloc(GPU, (size_t)Nk * 4);
        m1c_dev_copy(GPU, d_idx, CPU, idx, (size_t)Nk * 4);
        float *d_wt = up(wt, Nk), *d_h = up(h, n), *d_w = up(w, C), *d_pw = up(pw, (int64_t)(P ? P : 1) * C);
        float *nan_n = nans(n), *nan_r = nans(N), *nan_p = nans(N * (P ? P : 1));
        float *d_y = up(nan_n, n), *d_out = up(nan_n, n), *d_rstd = up(nan_r, N), *d_proj = up(nan_p, N * (P ? P : 1));
        float *d_y2 = up(ysum, n), *d_out2 = up(nan_n, n), *d_rstd2 = up(nan_r, N), *d_proj2 = up(nan_p, N * (P ? P : 1));
        uint16_t *d_lp = m1c_dev_alloc(GPU, (size_t)n * 2), *d_lp2 = m1c_dev_alloc(GPU, (size_t)n * 2);
        const m1c_out_rows yr = {d_rows, id ? NULL : d_idx, id ? NULL : d_wt, bf ? M1C_BF16 : M1C_F32, k, {0, 0}};
        m1c_residual_rmsnorm_ex(GPU, d_y, d_h, FA, FB, &yr, d_out, d_rstd, d_w, N, C, eps, d_lp, d_pw, P, d_proj);
        m1c_residual_rmsnorm_ex(GPU, d_y2, d_h, FA, FB, NULL, d_out2, d_rstd2, d_w, N, C, eps, d_lp2, d_pw, P, d_proj2);
        float *g[4] = {down(d_y, n), down(d_out, n), down(d_rstd, N), down(d_proj, N * (P ? P : 1))};
        float *g2[4] = {down(d_y2, n), down(d_out2, n), down(d_rstd2, N), down(d_proj2, N * (P ? P : 1))};
        const int64_t len[4] = {n, n, N, P ? N * P : 0};
        static const char *const what[4] = {"y", "out", "rstd", "proj"};
        for (int t = 0; t < 4; t++) {
            const double e = len[t] ? rel_max(g[t], g2[t], len[t]) : 0;
            cr_expect_leq(e, 1e-6, "N=%lld C=%d k=%d bf16 %d P=%d identity %d: %s with rows vs plain %g", (long long)N,
                          C, k, bf, P, id, what[t], e);
            exact &= len[t] == 0 || !memcmp(g[t], g2[t], (size_t)len[t] * 4);
        }
        /* the CPU's op with rows (host pointers) against its plain op on the same sum */
        const m1c_out_rows hr = {bf ? (void *)rows16 : (void *)rows, id ? NULL : idx, id ? NULL : wt,
                                 bf ? M1C_BF16 : M1C_F32, k, {0, 0}};
        float *y = nans(n), *out = nans(n), *rstd = nans(N), *y2 = copy_of(ysum, n), *out2 = nans(n), *rstd2 = nans(N);
        m1c_residual_rmsnorm_ex(CPU, y, h, FA, FB, &hr, out, rstd, w, N, C, eps, NULL, NULL, 0, NULL);
        m1c_residual_rmsnorm(CPU, y2, h, FA, FB, out2, rstd2, w, N, C, eps, NULL);
        cr_expect(!memcmp(y, y2, (size_t)n * 4) && !memcmp(out, out2, (size_t)n * 4) && !memcmp(rstd, rstd2, (size_t)N * 4),
                  "N=%lld C=%d: the CPU's op with rows differs from its plain op", (long long)N, C);

        for (int t = 0; t < 4; t++) free(g[t]), free(g2[t]);
        free(rows), free(wt), free(h), free(w), free(pw), free(rows16), free(idx), free(ysum), free(nan_n), free(nan_r);
        free(nan_p), free(y), free(out), free(rstd), free(y2), free(out2), free(rstd2);
        gfree(d_rows), gfree(d_idx), gfree(d_wt), gfree(d_h), gfree(d_w), gfree(d_pw), gfree(d_y), gfree(d_out);
        gfree(d_rstd), gfree(d_proj), gfree(d_y2), gfree(d_out2), gfree(d_rstd2), gfree(d_proj2), gfree(d_lp), gfree(d_lp2);
    }
    cr_log_info("residual norm with rows %s the plain op on their sum bit for bit", exact ? "equals" : "does NOT equal");
}

/* max |dw - ref| / max |ref| with ref = dw0 + sum over rows of g x r in double: the GPU's and the CPU's
 * f32 sums over rows are each measured against it. */
static double dw_err(const float *dw, const float *dw0, const float *dout, const float *in, const float *rstd,
                     int64_t N, int C) {
    double *ref = calloc((size_t)C, sizeof *ref), e = 0, m = 0;
    for (int64_t i = 0; i < N; i++)
        for (int c = 0; c < C; c++) ref[c] += (double)dout[i * C + c] * in[i * C + c] * rstd[i];
    for (int c = 0; c < C; c++) {
        ref[c] += dw0[c];
        e = fmax(e, fabs(dw[c] - ref[c])), m = fmax(m, fabs(ref[c]));
        if (dw[c] != dw[c]) e = INFINITY;
    }
    free(ref);
    return m > 0 ? e / m : e;
}

Test(cuda_ops, rmsnorm_backward_axpby_fused) {
    th_need_gpu();
    int exact = 1;
    for (int alias = 0; alias < 2; alias++)
        for (int shift = 0; shift < 2; shift++)
            for (int ci = 0; ci < NFC; ci++) {
                const int64_t N = fused_cases[ci].N, n = N * fused_cases[ci].C;
                const int C = fused_cases[ci].C;
                const uint64_t s = 3000 + (uint64_t)ci * 10;
                float *in = th_randn(n, s, 1.0f), *w = norm_weights(C, s + 1), *dout = th_randn(n, s + 2, 1.0f);
                float *dw0 = th_randn(C, s + 3, 1.0f); /* dw accumulates */
                float *rstd = th_zeros(N), *tmp0 = th_zeros(n), *nan_n = nans(n), *zero_n = th_zeros(n);
                m1c_rmsnorm_forward(CPU, tmp0, rstd, in, w, N, C, 1e-5f, NULL);
                /* the CPU's fused op (equal to its separate ops: test_ops_fused) */
                float *dh = alias ? copy_of(dout, n) : nans(n), *tmp = nans(n), *dw = copy_of(dw0, C);
                m1c_rmsnorm_backward_axpby(CPU, dh, tmp, dw, alias ? dh : dout, in, w, rstd, FA, FB, N, C, NULL);
                /* the GPU's fused op (alias: dout is dh), and its separate ops: zeroed dx, backward, axpby */
                float *d_in = up_at(in, n, shift), *d_w = up_at(w, C, shift), *d_dout = up_at(dout, n, shift);
                float *d_rstd = up(rstd, N), *d_dw = up(dw0, C), *d_dw2 = up(dw0, C);
                float *d_dh = up_at(alias ? dout : nan_n, n, shift), *d_tmp = up_at(nan_n, n, shift);
                float *d_dx = up_at(zero_n, n, shift), *d_dh2 = up_at(nan_n, n, shift);
                float *d_tmp2 = up_at(nan_n, n, shift);
                uint16_t *d_lp = m1c_dev_alloc(GPU, (size_t)n * 2);
                m1c_rmsnorm_backward_axpby(GPU, d_dh, d_tmp, d_dw, alias ? d_dh : d_dout, d_in, d_w, d_rstd, FA, FB, N,
                                           C, d_lp);
                expect_lp(d_lp, d_tmp, n, "RMSNorm backward + axpby");
                /* without tmp (an attention layer that reads only its bf16 copy, ABI 1.5): the same dh, dw and
                 * bf16 copy, bit for bit (the same kernel, its stores of tmp skipped) */
                float *d_dh3 = up_at(alias ? dout : nan_n, n, shift), *d_dw3 = up(dw0, C);
                uint16_t *d_lp3 = m1c_dev_alloc(GPU, (size_t)n * 2);
                m1c_rmsnorm_backward_axpby(GPU, d_dh3, NULL, d_dw3, alias ? d_dh3 : d_dout, d_in, d_w, d_rstd, FA, FB,
                                           N, C, d_lp3);
                uint16_t *lp = malloc((size_t)n * 2), *lp3 = malloc((size_t)n * 2);
                m1c_dev_copy(CPU, lp, GPU, d_lp, (size_t)n * 2);
                m1c_dev_copy(CPU, lp3, GPU, d_lp3, (size_t)n * 2);
                float *gdh3 = down(d_dh3, n), *gdw3 = down(d_dw3, C), *gdh1 = down(d_dh, n), *gdw1 = down(d_dw, C);
                cr_expect(!memcmp(gdh3, gdh1, (size_t)n * 4) && !memcmp(gdw3, gdw1, (size_t)C * 4) &&
                              !memcmp(lp3, lp, (size_t)n * 2),
                          "N=%lld C=%d shift %d alias %d: without tmp, dh, dw or the bf16 copy differ", (long long)N,
                          C, shift, alias);
                free(lp), free(lp3), free(gdh3), free(gdw3), free(gdh1), free(gdw1);
                gfree_at(d_dh3, shift), gfree(d_dw3), m1c_dev_free(GPU, d_lp3), m1c_dev_free(GPU, d_lp);
                m1c_rmsnorm_backward(GPU, d_dx, d_dw2, d_dout, d_in, d_w, d_rstd, N, C);
                m1c_axpby(GPU, d_dh2, d_tmp2, d_dx, FA, FB, n);
                float *gdh = down(d_dh, n), *gtmp = down(d_tmp, n), *gdw = down(d_dw, C);
                float *gdh2 = down(d_dh2, n), *gtmp2 = down(d_tmp2, n), *gdw2 = down(d_dw2, C);
                /* dh and tmp against the CPU, as din in the RMSNorm test (a dot product of C terms in another
                 * order and the GPU's fused multiply-adds, then one exact scaling by a or b): 1e-5 of the
                 * largest element. */
                double eh = rel_max(gdh, dh, n), et = rel_max(gtmp, tmp, n);
                cr_expect_leq(eh, 1e-5, "N=%lld C=%d shift %d alias %d: dh vs CPU %g", (long long)N, C, shift, alias,
                              eh);
                cr_expect_leq(et, 1e-5, "N=%lld C=%d shift %d alias %d: tmp vs CPU %g", (long long)N, C, shift,
                              alias, et);
                /* dw: sums of N f32 terms over rows (in row chunks on the GPU, in row order on the CPU)
                 * against the double sum: a random walk of N roundings of <= 6e-8 of the partial sums,
                 * ~sqrt(16411) * 6e-8 = 8e-6 for the CPU's single running sum at the largest N: 3e-5. The
                 * fused and the separate GPU sums are measured the same way (they run in different orders). */
                double ew = dw_err(gdw, dw0, dout, in, rstd, N, C), ew2 = dw_err(gdw2, dw0, dout, in, rstd, N, C),
                       ewc = dw_err(dw, dw0, dout, in, rstd, N, C);
                cr_expect_leq(ew, 3e-5, "N=%lld C=%d shift %d alias %d: fused GPU dw %g", (long long)N, C, shift,
                              alias, ew);
                cr_expect_leq(ew2, 3e-5, "N=%lld C=%d shift %d alias %d: separate GPU dw %g", (long long)N, C, shift,
                              alias, ew2);
                cr_expect_leq(ewc, 3e-5, "N=%lld C=%d shift %d alias %d: CPU dw %g", (long long)N, C, shift, alias,
                              ewc);
                /* dh and tmp against the separate GPU ops: the same expressions, lanes and order (dx = 0 + v
                 * there), expected bit for bit; allowed: nvcc contracting r g w - k x otherwise in the two
                 * kernels (one rounding of a term of size <= r |g w| ~ the largest element for C > 1): 1e-6. */
                double fh = rel_max(gdh, gdh2, n), ft = rel_max(gtmp, gtmp2, n);
                cr_expect_leq(fh, 1e-6, "N=%lld C=%d shift %d alias %d: dh vs separate %g", (long long)N, C, shift,
                              alias, fh);
                cr_expect_leq(ft, 1e-6, "N=%lld C=%d shift %d alias %d: tmp vs separate %g", (long long)N, C, shift,
                              alias, ft);
                exact &= fh == 0 && ft == 0;

                free(in), free(w), free(dout), free(dw0), free(rstd), free(tmp0), free(nan_n), free(zero_n);
                free(dh), free(tmp), free(dw), free(gdh), free(gtmp), free(gdw), free(gdh2), free(gtmp2), free(gdw2);
                gfree_at(d_in, shift), gfree_at(d_w, shift), gfree_at(d_dout, shift), gfree(d_rstd), gfree(d_dw);
                gfree(d_dw2), gfree_at(d_dh, shift), gfree_at(d_tmp, shift), gfree_at(d_dx, shift);
                gfree_at(d_dh2, shift), gfree_at(d_tmp2, shift);
            }
    cr_log_info("fused RMSNorm backward + axpby %s the separate GPU ops' dh and tmp bit for bit",
                exact ? "equals" : "does NOT equal");
}

/* Both fused ops give the same bits on every run (dw's sums over rows in a fixed order), with dout ==
 * dh as in the model, for the fused weight gradient (C = 300, 768) and its separate pass (C = 1700). */
Test(cuda_ops, fused_ops_repeat_bit_for_bit) {
    th_need_gpu();
    const int64_t N = 4099;
    static const int widths[] = {300, 768, 1700};
    for (int k = 0; k < 3; k++) {
        const int C = widths[k];
        const int64_t n = N * C;
        float *y0 = th_randn(n, 600 + (uint64_t)k, 1.0f), *h = th_randn(n, 610 + (uint64_t)k, 1.0f);
        float *w = th_randn(C, 620 + (uint64_t)k, 0.2f), *g = th_randn(n, 630 + (uint64_t)k, 1.0f);
        for (int c = 0; c < C; c++) w[c] += 1.0f;
        float *z = th_zeros(n), *d_h = up(h, n), *d_w = up(w, C);
        float *res[2][6];
        for (int run = 0; run < 2; run++) {
            float *d_y = up(y0, n), *d_out = up(z, n), *d_rstd = up(z, N), *d_dh = up(g, n), *d_tmp = up(z, n);
            float *d_dw = up(z, C);
            m1c_residual_rmsnorm(GPU, d_y, d_h, FA, FB, d_out, d_rstd, d_w, N, C, 1e-5f, NULL);
            m1c_rmsnorm_backward_axpby(GPU, d_dh, d_tmp, d_dw, d_dh, d_y, d_w, d_rstd, FA, FB, N, C, NULL);
            res[run][0] = down(d_y, n), res[run][1] = down(d_out, n), res[run][2] = down(d_rstd, N);
            res[run][3] = down(d_dh, n), res[run][4] = down(d_tmp, n), res[run][5] = down(d_dw, C);
            gfree(d_y), gfree(d_out), gfree(d_rstd), gfree(d_dh), gfree(d_tmp), gfree(d_dw);
        }
        const char *what[6] = {"y", "out", "rstd", "dh", "tmp", "dw"};
        const int64_t len[6] = {n, n, N, n, n, C};
        for (int j = 0; j < 6; j++) {
            /* exact: the same operations in the same order */
            cr_expect_eq(memcmp(res[0][j], res[1][j], (size_t)len[j] * 4), 0, "C=%d: %s differs between runs", C,
                         what[j]);
            cr_expect_gt(th_max_abs(res[0][j], len[j]), 0.0, "C=%d: %s is zero", C, what[j]);
            free(res[0][j]), free(res[1][j]);
        }
        free(y0), free(h), free(w), free(g), free(z), gfree(d_h), gfree(d_w);
    }
}

/* ---- the LM head ---- */

/* Tolerances relative to the largest element, per head precision:
 * 0 fp32: products and sums in f32 in another order (cuBLAS tiles, float log-sum-exp on the GPU vs
 *   double on the CPU): ~1e-6, 1e-5 with margin;
 * 1 tf32: operands cut to a 10-bit mantissa (2^-11 ~ 4.9e-4 each when rounded, 2^-10 if the hardware
 *   truncates, so up to ~2e-3 for a single product as with H = 1): 3e-3 of the largest element;
 * 2 bf16: operands rounded to an 8-bit mantissa (2^-9 ~ 2e-3 each, ~4e-3 per product): 1e-2;
 * 3 tf32x3: hi*hi + hi*lo + lo*hi leaves out lo*lo (2^-22 relative) and rounds each lo to TF32
 *   (2^-11 of 2^-11): ~5e-7 per product, but dh = dlogits W sums V terms of both signs that cancel
 *   (each dlogits row sums to 0), so the error relative to the largest dh grows like sqrt(V): measured
 *   2.4e-5 at V = 5000, H = 1100 on an H200 (fp32: under 1e-5): 1e-4. */
static const double head_tol[4] = {1e-5, 3e-3, 1e-2, 1e-4};

/* x rounded to bf16 (to nearest even; x finite) and back to float. */
static float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* Rows of z (N, V) whose largest logit past the first 256 columns lies more than 40 (HW_T in
 * core/cuda/head_wg.cuh) above the first 256's: those the Hopper forward brings to one shift afterwards. */
static int64_t rows_past_first_tile(const float *z, int64_t N, int V) {
    int64_t n = 0;
    for (int64_t i = 0; i < N; i++) {
        float m0 = -INFINITY, m1 = -INFINITY;
        for (int v = 0; v < V; v++) {
            if (v < 256) m0 = fmaxf(m0, z[i * V + v]);
            else m1 = fmaxf(m1, z[i * V + v]);
        }
        n += m1 > m0 + 40.0f;
    }
    return n;
}

typedef struct head_case {
    int64_t N;
    int H, V;
    int spike; /* W's row V - 3 times 30, h and W rounded to bf16 (below) */
} head_case;

/* Every N, H and V of the lists appears; the largest case is the model's shape at a small scale. V = 259
 * takes the log-softmax kernels' scalar path, V = 5000 (a multiple of 4) their 16-byte path, except in
 * the odd-numbered cases, whose logits start one float past alignment (check_head). The last three have H
 * and V multiples of 8, which the training forward from q takes through the Hopper kernels on sm_90a
 * (head_hopper): rows, columns and K steps past their tiles (128 x 256, K 64), and the training shape's H
 * and V. The last case (spike) has one column's logits ~30 times the others' (W's row V - 3 scaled), so
 * that in ~8% of the rows that column lies more than HW_T = 40 above the max of the first 256: rows whose
 * tiles do not all share the first tile's shift in the Hopper forward (core/cuda/head_wg.cuh). Its h and W
 * are rounded to bf16 first, so that every precision's products start from the CPU's values exactly (bf16
 * values are exact in TF32): a bf16 rounding of logits of ~100 would otherwise miss the reference's
 * probabilities by several percent. */
static const head_case head_cases[] = {
    {1, 1, 259, 0},       {37, 33, 5000, 0},     {1003, 256, 259, 0}, {1, 1100, 5000, 0},
    {37, 256, 259, 0},    {1003, 1, 5000, 0},    {1003, 1100, 5000, 0}, {1003, 256, 5000, 0},
    {300, 72, 1000, 0},   {130, 768, 32000, 0},  {1003, 256, 5000, 1},
};

/* Whether m1c_head_forward from q at precision 2 takes the Hopper kernels here (core/cuda/head_wg.cuh) for
 * H and V (with operands as aligned as these tests' cudaMalloc'd ones); in an sm_90a build on a compute
 * capability 9.0 device it must, for multiples of 8. The callers check that it did: those kernels leave
 * the logits untouched, where the cuBLAS path writes them. */
static int head_hopper(int H, int V) {
#ifdef M1C_TEST_CUDA_OPS
    const int path = m1c_cuda_head_path(H, V);
#ifdef M1C_SM90A
    cr_assert_neq(path, -2, "an sm_90a build on a compute capability 9.0 device, but no tensor-map encoder");
    if (path >= 0)
        cr_assert_eq(path, H % 8 == 0 && V % 8 == 0, "H=%d V=%d: the Hopper head %s", H, V,
                     path ? "taken for sizes it cannot take" : "not taken");
#endif
    return path == 1;
#else
    (void)H, (void)V;
    return 0;
#endif
}

static void check_head(const head_case *hc, int ci) {
    const int64_t N = hc->N, NV = hc->N * hc->V, NH = hc->N * hc->H, VH = (int64_t)hc->V * hc->H;
    const int H = hc->H, V = hc->V, shift = ci % 2;
    const uint64_t s = 1000 + (uint64_t)ci * 10;
    /* Logits of order 1, as in a trained model: W ~ N(0, 1/H). */
    float *h = th_randn(NH, s, 1.0f), *W = th_randn(VH, s + 1, 1.0f / sqrtf((float)H));
    if (hc->spike) {
        for (int k = 0; k < H; k++) W[(int64_t)(V - 3) * H + k] *= 30.0f;
        for (int64_t i = 0; i < NH; i++) h[i] = bf16_round(h[i]);
        for (int64_t i = 0; i < VH; i++) W[i] = bf16_round(W[i]);
    }
    int32_t *targets = make_ids(N, V, s + 2, 5); /* every 5th unscored (-1) */
    float *logits = th_zeros(NV), *lse = th_zeros(N), *logp = th_zeros(N);
    m1c_head_forward(CPU, 0, logits, lse, logp, NULL, h, W, NULL, targets, N, H, V);
    if (hc->spike) { /* the case covers both kinds of rows */
        const int64_t past = rows_past_first_tile(logits, N, V);
        cr_assert(past > 0 && past < N, "spike case: %lld of %lld rows past the first tile's shift", (long long)past,
                  (long long)N);
    }

    float *dlogp = th_randn(N, s + 3, 1.0f);
    /* dh and dW accumulate: start from values of the gradients' own size (~0.01..1), so that a GEMM
     * that overwrote instead of adding would be far outside every tolerance. */
    float *dh0 = th_randn(NH, s + 4, 0.01f), *dW0 = th_randn(VH, s + 5, 0.01f);
    float *dh = copy_of(dh0, NH), *dW = copy_of(dW0, VH), *dlogits = copy_of(logits, NV);
    m1c_head_backward(CPU, 0, dh, dW, 0, dlogits, lse, NULL, dlogp, h, W, NULL, targets, N, H, V);
    /* dW and dh handed over unset (M1C_HEAD_DW_UNSET: a gradient M1C_TENSOR_UNSET; M1C_HEAD_DH_UNSET: the
     * model's first gradient): written whole, their NaNs never read */
    const int both = M1C_HEAD_DW_UNSET | M1C_HEAD_DH_UNSET;
    float *dWu = nans(VH), *dhu = nans(NH), *dlu = copy_of(logits, NV);
    m1c_head_backward(CPU, 0, dhu, dWu, both, dlu, lse, NULL, dlogp, h, W, NULL, targets, N, H, V);
    /* against the accumulated ones less their start: the same products, added to 0 instead of to dW0 and
     * dh0 (~0.01), whose roundings (~1e-9) the differences carry */
    int64_t bad = 0, badh = 0;
    for (int64_t i = 0; i < VH; i++) bad += !(fabsf(dWu[i] - (dW[i] - dW0[i])) <= 1e-6f + 1e-5f * fabsf(dWu[i]));
    for (int64_t i = 0; i < NH; i++) badh += !(fabsf(dhu[i] - (dh[i] - dh0[i])) <= 1e-6f + 1e-5f * fabsf(dhu[i]));
    cr_assert_eq(bad, 0, "CPU head backward, dW unset: %lld elements differ from the accumulated ones", (long long)bad);
    cr_assert_eq(badh, 0, "CPU head backward, dh unset: %lld elements differ from the accumulated ones",
                 (long long)badh);

    float *d_h = up(h, NH), *d_W = up(W, VH), *d_dlogp = up(dlogp, N);
    int32_t *d_t = up_bytes(targets, (size_t)N * 4);
    /* Run 4 is precision 2 as a mixed-precision model trains it (core/ops.h): W's bf16 copy given, and
     * the backward from the training forward's q, not from the logits, within bf16's tolerance. */
    void *d_q = m1c_dev_alloc(GPU, (size_t)m1c_head_q_bytes(N, V)), *d_Wlp = m1c_dev_alloc(GPU, (size_t)VH * 2);
    cr_assert(d_q && d_Wlp);
    m1c_to_bf16(GPU, d_Wlp, d_W, VH); /* W's bf16 copy, as the model keeps it, for the run from q */
    const int hopper = head_hopper(H, V);
    for (int run = 0; run < 5; run++) {
        const int prec = run == 4 ? 2 : run;
        void *q = run == 4 ? d_q : NULL, *Wlp = run == 4 ? d_Wlp : NULL;
        const double tol = head_tol[prec];
        float *d_logits = up_at(dlogits, NV, shift), *d_lse = up(dh0, N), *d_logp = up(dh0, N); /* garbage first */
        m1c_head_forward(GPU, prec, d_logits, d_lse, d_logp, q, d_h, d_W, Wlp, d_t, N, H, V);
        float *g_logits = down(d_logits, NV), *g_lse = down(d_lse, N), *g_logp = down(d_logp, N);
        /* lse and logp are differences and log-sum-exps of logits: their errors are those of the logits
         * (a log-prob near 0 can carry the error of logits of size ~10), so they are measured against
         * the size of the terms they are made of, max |logits| + max |lse|. */
        const double scale = th_max_abs(logits, NV) + th_max_abs(lse, N);
        double el = -1, es = th_max_abs_diff(g_lse, lse, N) / scale, ep = th_max_abs_diff(g_logp, logp, N) / scale;
        if (!q) { /* a forward with q leaves the logits unspecified (core/ops.h) */
            el = rel_max(g_logits, logits, NV);
            cr_expect_leq(el, tol, "head forward N=%lld H=%d V=%d precision %d: logits error %g", (long long)N, H,
                          V, prec, el);
        } else if (hopper) { /* the Hopper kernels never write them: a fallback to cuBLAS would */
            cr_expect_eq(memcmp(g_logits, dlogits, (size_t)NV * 4), 0,
                         "head forward N=%lld H=%d V=%d from q: the logits were written (not the Hopper kernels)",
                         (long long)N, H, V);
        }
        cr_expect_leq(es, tol, "head forward N=%lld H=%d V=%d precision %d: lse error %g", (long long)N, H, V,
                      prec, es);
        cr_expect_leq(ep, tol, "head forward N=%lld H=%d V=%d precision %d: logp error %g", (long long)N, H, V,
                      prec, ep);
        for (int64_t i = 0; i < N; i++)
            if (targets[i] < 0) cr_expect_eq(g_logp[i], 0.0f, "unscored row %lld: logp %g", (long long)i, g_logp[i]);

        /* Backward from the CPU's logits and lse on both sides, so that it is tested alone (with q: from the
         * GPU forward's q, which holds everything the backward reads of the forward). */
        /* runs 1 and 4 (a cuBLAS product, and the one from q) take dW and dh unset: NaNs, written whole */
        const int unset = run == 1 || run == 4 ? both : 0;
        float *d_dh = up(dh0, NH), *d_dW = up(dW0, VH);
        if (unset) {
            float *n = nans(VH), *nh = nans(NH);
            m1c_dev_copy(GPU, d_dW, CPU, n, (size_t)VH * 4);
            m1c_dev_copy(GPU, d_dh, CPU, nh, (size_t)NH * 4);
            free(n), free(nh);
        }
        m1c_dev_copy(GPU, d_logits, CPU, logits, (size_t)NV * 4);
        m1c_dev_copy(GPU, d_lse, CPU, lse, (size_t)N * 4);
        m1c_head_backward(GPU, prec, d_dh, d_dW, unset, d_logits, d_lse, q, d_dlogp, d_h, d_W, Wlp, d_t, N, H, V);
        float *g_dh = down(d_dh, NH), *g_dW = down(d_dW, VH);
        double ed = -1, eh = rel_max(g_dh, unset ? dhu : dh, NH), ew = rel_max(g_dW, unset ? dWu : dW, VH);
        cr_expect_leq(eh, tol, "head backward N=%lld H=%d V=%d precision %d: dh error %g", (long long)N, H, V, prec,
                      eh);
        cr_expect_leq(ew, tol, "head backward N=%lld H=%d V=%d precision %d: dW error %g", (long long)N, H, V, prec,
                      ew);
        /* Unscored rows have no gradient: their rows of dh keep their starting values exactly (the
         * products add only zeros to them), at every precision; handed over unset, they are zero (as the
         * CPU's, which zeroes dh first). */
        for (int64_t i = 0; i < N; i++)
            if (targets[i] < 0)
                cr_expect_eq(th_max_abs_diff(g_dh + i * H, (unset ? dhu : dh0) + i * H, H), 0.0,
                             "unscored row %lld changed dh (unset %d)", (long long)i, unset);
        /* Precisions 0 and 1 leave the f32 dlogits in place of the logits; 2 and 3 write them only into
         * the products' bf16 or TF32-split operands (core/ops.h), checked through dh and dW above. */
        if (run <= 1) {
            float *g_dlogits = down(d_logits, NV);
            /* dlogits is f32 elementwise (expf on both sides): fp32's tolerance. */
            ed = rel_max(g_dlogits, dlogits, NV);
            cr_expect_leq(ed, head_tol[0], "head backward N=%lld H=%d V=%d precision %d: dlogits error %g",
                          (long long)N, H, V, prec, ed);
            for (int64_t i = 0; i < N; i++)
                if (targets[i] < 0)
                    cr_expect_eq(th_max_abs(g_dlogits + i * V, V), 0.0, "unscored row %lld has dlogits",
                                 (long long)i);
            free(g_dlogits);
        }
        cr_log_info("head N=%lld H=%d V=%d precision %d%s: logits %.2g lse %.2g logp %.2g dlogits %.2g dh %.2g dW %.2g",
                    (long long)N, H, V, prec, !q ? "" : hopper ? " from q (Hopper)" : " from q", el, es, ep, ed, eh, ew);

        free(g_logits), free(g_lse), free(g_logp), free(g_dh), free(g_dW);
        gfree_at(d_logits, shift), gfree(d_lse), gfree(d_logp), gfree(d_dh), gfree(d_dW);
    }
    free(h), free(W), free(targets), free(logits), free(lse), free(logp), free(dlogp);
    free(dh0), free(dW0), free(dh), free(dW), free(dlogits), free(dWu), free(dhu), free(dlu);
    gfree(d_h), gfree(d_W), gfree(d_dlogp), gfree(d_t), gfree(d_q), gfree(d_Wlp);
}

Test(cuda_ops, head_forward_backward_all_precisions) {
    th_need_gpu();
    for (int i = 0; i < (int)(sizeof head_cases / sizeof head_cases[0]); i++) check_head(&head_cases[i], i);
}

/* The head gives the same bits on every run at every precision: lse and logp come from block
 * reductions in a fixed order, dh and dW from cuBLAS (deterministic on one GPU and library version) over
 * operands converted elementwise. */
Test(cuda_ops, head_repeats_bit_for_bit) {
    th_need_gpu();
    const int64_t N = 1003;
    const int H = 256, V = 5000;
    float *h = th_randn(N * H, 90, 1.0f), *W = th_randn((int64_t)V * H, 91, 1.0f / 16), *dlogp = th_randn(N, 92, 1.0f);
    int32_t *targets = make_ids(N, V, 93, 5);
    float *d_h = up(h, N * H), *d_W = up(W, (int64_t)V * H), *d_dlogp = up(dlogp, N);
    int32_t *d_t = up_bytes(targets, (size_t)N * 4);
    float *z = th_zeros((int64_t)V * H); /* V * H > N * H: zeros for dh and dW */
    float *d_logits = m1c_dev_alloc(GPU, (size_t)N * V * 4), *d_lse = up(z, N), *d_logp = up(z, N);
    cr_assert_not_null(d_logits);
    void *d_q = m1c_dev_alloc(GPU, (size_t)m1c_head_q_bytes(N, V));
    cr_assert_not_null(d_q);
    for (int mode = 0; mode < 5; mode++) { /* precisions 0-3, then 2 with q */
        const int prec = mode == 4 ? 2 : mode;
        void *q = mode == 4 ? d_q : NULL;
        float *res[2][4];
        for (int run = 0; run < 2; run++) {
            float *d_dh = up(z, N * H), *d_dW = up(z, (int64_t)V * H);
            m1c_head_forward(GPU, prec, d_logits, d_lse, d_logp, q, d_h, d_W, NULL, d_t, N, H, V);
            res[run][0] = down(d_lse, N), res[run][1] = down(d_logp, N);
            m1c_head_backward(GPU, prec, d_dh, d_dW, 0, d_logits, d_lse, q, d_dlogp, d_h, d_W, NULL, d_t, N, H, V);
            res[run][2] = down(d_dh, N * H), res[run][3] = down(d_dW, (int64_t)V * H);
            gfree(d_dh), gfree(d_dW);
        }
        /* exact: the same operations in the same order */
        const char *what[4] = {"lse", "logp", "dh", "dW"};
        const int64_t len[4] = {N, N, N * H, (int64_t)V * H};
        for (int k = 0; k < 4; k++) {
            cr_expect_eq(memcmp(res[0][k], res[1][k], (size_t)len[k] * 4), 0,
                         "precision %d%s: %s differs between runs", prec, q ? " from q" : "", what[k]);
            cr_expect_gt(th_max_abs(res[0][k], len[k]), 0.0, "precision %d%s: %s is zero", prec, q ? " from q" : "",
                         what[k]);
            free(res[0][k]), free(res[1][k]);
        }
    }
    free(h), free(W), free(dlogp), free(targets), free(z);
    gfree(d_h), gfree(d_W), gfree(d_dlogp), gfree(d_t), gfree(d_logits), gfree(d_lse), gfree(d_logp);
    gfree(d_q);
}

/* The training forward's q itself, entry by entry: q times its row's scale qs (core/ops.h) against
 * onehot - softmax in double from the same bf16 operands. On Hopper q carries the rounding of exp(z - c)
 * to bf16 (2^-9 relative) and z - lse its f32 rounding (~6e-8 (|z| + |lse|), which 1 - p = 1 - exp(z - lse)
 * inherits absolutely); through cuBLAS q is onehot - softmax rounded once to bf16. So |error| <= 1e-2 |q| +
 * 1e-6 (|lse| + 1). Every third row's h is scaled by 10, so its largest probability is near 1 and its
 * target (that column) has a small q = 1 - p: an entry computed from the rounded exponential would miss it
 * by up to 2^-9 p, several times the tolerance. W's row 700 (the third column tile) is scaled by 60: in
 * about a third of the rows its logit lies more than HW_T = 40 above the first tile's largest, so those
 * rows are brought to one shift after the product (core/cuda/head_wg.cuh). lse and logp to 1e-5 of |lse| + 1 (f32
 * sums of f32 products). */
Test(cuda_ops, head_q_matches_bf16_reference) {
    th_need_gpu();
    const int64_t N = 300;
    const int H = 72, V = 1000;
    float *h = th_randn(N * H, 70, 1.0f), *W = th_randn((int64_t)V * H, 71, 1.0f / sqrtf((float)H));
    int32_t *targets = make_ids(N, V, 72, 7);
    for (int64_t i = 0; i < N; i += 3)
        for (int k = 0; k < H; k++) h[i * H + k] *= 10.0f;
    for (int k = 0; k < H; k++) W[700 * H + k] *= 60.0f;
    for (int64_t i = 0; i < N * H; i++) h[i] = bf16_round(h[i]);
    for (int64_t i = 0; i < (int64_t)V * H; i++) W[i] = bf16_round(W[i]);
    double *p = malloc((size_t)V * sizeof *p), *lse = malloc((size_t)N * sizeof *lse);
    cr_assert(p && lse);
    for (int64_t i = 0; i < N; i += 3) { /* the confident rows' targets: their most likely column */
        int best = 0;
        double bz = -INFINITY;
        for (int v = 0; v < V; v++) {
            double z = 0;
            for (int k = 0; k < H; k++) z += (double)h[i * H + k] * W[(int64_t)v * H + k];
            if (z > bz) bz = z, best = v;
        }
        targets[i] = best;
    }
    float *d_h = up(h, N * H), *d_W = up(W, (int64_t)V * H), *d_logits = m1c_dev_alloc(GPU, (size_t)N * V * 4);
    float *d_lse = m1c_dev_alloc(GPU, (size_t)N * 4), *d_logp = m1c_dev_alloc(GPU, (size_t)N * 4);
    int32_t *d_t = up_bytes(targets, (size_t)N * 4);
    uint16_t *d_q = m1c_dev_alloc(GPU, (size_t)m1c_head_q_bytes(N, V)), *q = malloc((size_t)N * V * 2);
    float *qs = malloc((size_t)N * sizeof *qs);
    cr_assert(d_logits && d_lse && d_logp && d_q && q && qs);
    const int hopper = head_hopper(H, V);
    m1c_dev_memset0(GPU, d_logits, (size_t)N * V * 4);
    m1c_head_forward(GPU, 2, d_logits, d_lse, d_logp, d_q, d_h, d_W, NULL, d_t, N, H, V);
    if (hopper) { /* the Hopper kernels never write the logits: a fallback to cuBLAS would */
        float *g_logits = down(d_logits, (int64_t)N * V);
        cr_expect_eq(th_max_abs(g_logits, (int64_t)N * V), 0.0, "the logits were written (not the Hopper kernels)");
        free(g_logits);
    }
    m1c_dev_copy(CPU, q, GPU, d_q, (size_t)N * V * 2);
    m1c_dev_copy(CPU, qs, GPU, (char *)d_q + m1c_head_q_scale_at(N, V), (size_t)N * sizeof *qs);
    float *g_lse = down(d_lse, N), *g_logp = down(d_logp, N);
    double worst = 0, worst_t = 0, worst_l = 0;
    int64_t bad = 0, past = 0;
    for (int64_t i = 0; i < N; i++) {
        double m = -INFINITY, m0 = -INFINITY, sum = 0;
        for (int v = 0; v < V; v++) {
            double z = 0;
            for (int k = 0; k < H; k++) z += (double)h[i * H + k] * W[(int64_t)v * H + k];
            p[v] = z, m = fmax(m, z);
            if (v == 255) m0 = m;
        }
        past += m > m0 + 40; /* a row brought to one shift afterwards (rows_past_first_tile) */
        for (int v = 0; v < V; v++) sum += exp(p[v] - m);
        lse[i] = m + log(sum);
        const int t = targets[i];
        const double lp = t >= 0 ? p[t] - lse[i] : 0;
        worst_l = fmax(worst_l, fmax(fabs(g_lse[i] - lse[i]), fabs(g_logp[i] - lp)) / (fabs(lse[i]) + 1));
        for (int v = 0; v < V; v++) {
            const double ref = t < 0 ? 0 : (v == t) - exp(p[v] - lse[i]);
            uint32_t u = (uint32_t)q[i * V + v] << 16;
            float e;
            memcpy(&e, &u, 4);
            const double g = (double)e * qs[i], err = fabs(g - ref) / (1e-2 * fabs(ref) + 1e-6 * (fabs(lse[i]) + 1));
            worst = fmax(worst, err);
            if (v == t && i % 3 == 0) worst_t = fmax(worst_t, err);
            if (err > 1 && !bad++)
                cr_expect_leq(err, 1.0, "row %lld column %d (target %d): q %g, reference %g", (long long)i, v, t, g,
                              ref);
        }
    }
    cr_expect_eq(bad, 0, "%lld entries of q outside the tolerance", (long long)bad);
    cr_expect(past > 0 && past < N, "%lld of %lld rows past the first tile's shift: the test covers one kind",
              (long long)past, (long long)N);
    cr_expect_leq(worst_l, 1e-5, "lse or logp off by %g of |lse| + 1", worst_l);
    cr_log_info("head q from %s: worst error %.3g of the tolerance (confident targets %.3g), lse/logp %.2g",
                hopper ? "the Hopper kernels" : "cuBLAS and the log-softmax", worst, worst_t, worst_l);
    free(h), free(W), free(targets), free(p), free(lse), free(q), free(qs), free(g_lse), free(g_logp);
    gfree(d_h), gfree(d_W), gfree(d_logits), gfree(d_lse), gfree(d_logp), gfree(d_t), gfree(d_q);
}

/* ---- elementwise operations and reductions ---- */

static const int64_t lens[] = {1, 37, 1000, 1000003}; /* the last spans more than the reductions' grid */
#define NL (int)(sizeof lens / sizeof lens[0])

Test(cuda_ops, residual_axpby_scale) {
    th_need_gpu();
    const float a = 0.7f, b = 1.3f, s = -0.37f; /* none a power of two: every product rounds */
    /* shift 0: the 16-byte path with a scalar tail of n % 4 (all lengths but 1000 have one); shift 1:
     * every array one float past alignment, the scalar path */
    for (int shift = 0; shift < 2; shift++)
        for (int k = 0; k < NL; k++) {
            const int64_t n = lens[k];
            float *x = th_randn(n, 50 + (uint64_t)k, 1.0f), *y = th_randn(n, 60 + (uint64_t)k, 1.0f);
            float *d_x = up_at(x, n, shift), *d_y = up_at(y, n, shift);
            m1c_residual(CPU, y, x, a, b, n);
            m1c_residual(GPU, d_y, d_x, a, b, n);
            float *g_y = down(d_y, n);
            /* a h + b y: the GPU may fuse one product into the addition (one rounding fewer, <= 6e-8 of a
             * term of size <= the largest element): 1e-6 of the largest element. */
            double e = rel_max(g_y, y, n);
            cr_expect_leq(e, 1e-6, "residual n=%lld shift %d: error %g", (long long)n, shift, e);

            float *z = th_zeros(n), *d_z = up_at(z, n, shift);
            m1c_axpby(CPU, y, z, x, a, b, n);
            m1c_axpby(GPU, d_y, d_z, d_x, a, b, n);
            float *g_y2 = down(d_y, n), *g_z = down(d_z, n);
            /* One rounded product per element: exact. */
            cr_expect_eq(th_max_abs_diff(g_y2, y, n), 0.0, "axpby n=%lld shift %d: y", (long long)n, shift);
            cr_expect_eq(th_max_abs_diff(g_z, z, n), 0.0, "axpby n=%lld shift %d: z", (long long)n, shift);

            m1c_scale(CPU, x, n, s);
            m1c_scale(GPU, d_x, n, s);
            float *g_x = down(d_x, n);
            cr_expect_eq(th_max_abs_diff(g_x, x, n), 0.0, "scale n=%lld shift %d (one rounded product: exact)",
                         (long long)n, shift);

            free(x), free(y), free(z), free(g_y), free(g_y2), free(g_z), free(g_x);
            gfree_at(d_x, shift), gfree_at(d_y, shift), gfree_at(d_z, shift);
        }
}

Test(cuda_ops, sumsq) {
    th_need_gpu();
    for (int k = 0; k < NL; k++) {
        const int64_t n = lens[k];
        float *x = th_randn(n, 70 + (uint64_t)k, 3.0f);
        x[0] = 1e20f; /* squares beyond f32's range: the sum must be in double */
        float *d_x = up(x, n);
        double c = m1c_sumsq(CPU, x, n), g = m1c_sumsq(GPU, d_x, n);
        /* Squares of f32 values are exact in double; n <= 1e6 positive terms summed in another order
         * differ by <= n * 1.1e-16 ~ 1e-10 relative. */
        cr_expect_leq(fabs(g - c), 1e-9 * c, "sumsq n=%lld: GPU %.17g CPU %.17g", (long long)n, g, c);
        /* The 1e40 term alone dominates: both must have kept it. */
        cr_expect_geq(g, 1e40, "sumsq n=%lld: %g", (long long)n, g);
        x[0] = 0.5f;
        m1c_dev_copy(GPU, d_x, CPU, x, 4);
        c = m1c_sumsq(CPU, x, n), g = m1c_sumsq(GPU, d_x, n);
        cr_expect_leq(fabs(g - c), 1e-9 * c, "sumsq n=%lld: GPU %.17g CPU %.17g", (long long)n, g, c);
        free(x), gfree(d_x);
    }
}

Test(cuda_ops, count_nonfinite) {
    th_need_gpu();
    for (int k = 0; k < NL; k++) {
        const int64_t n = lens[k];
        float *x = th_randn(n, 80 + (uint64_t)k, 1.0f);
        x[0] = 3.4e38f; /* the largest finite values are finite */
        x[n / 3] = -3.4e38f;
        float *d_x = up(x, n);
        cr_expect_eq(m1c_count_nonfinite(GPU, d_x, n), 0, "n=%lld: clean input", (long long)n);
        /* Plant NaN, +Inf and -Inf at distinct places (the last element included) where n allows. */
        int64_t pos[3] = {n - 1, n / 2, 1}, planted = 0;
        const float bad[3] = {NAN, INFINITY, -INFINITY};
        for (int j = 0; j < 3; j++) {
            if (pos[j] >= n || (j > 0 && pos[j] == pos[0]) || (j > 1 && pos[j] == pos[1])) continue;
            x[pos[j]] = bad[j];
            planted++;
        }
        m1c_dev_copy(GPU, d_x, CPU, x, (size_t)n * 4);
        int64_t c = m1c_count_nonfinite(CPU, x, n), g = m1c_count_nonfinite(GPU, d_x, n);
        cr_expect_eq(c, planted, "n=%lld: CPU counts %lld of %lld", (long long)n, (long long)c, (long long)planted);
        cr_expect_eq(g, planted, "n=%lld: GPU counts %lld of %lld", (long long)n, (long long)g, (long long)planted);
        free(x), gfree(d_x);
    }
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int bf16_is_nan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

Test(cuda_ops, to_bf16) {
    th_need_gpu();
    /* Hand-picked patterns, then random bit patterns over the whole f32 range (NaNs included). */
    static const uint32_t special[] = {
        0x3f808000u, /* 1 + 2^-8: a tie between 0x3f80 and 0x3f81: to even 0x3f80 */
        0x3f818000u, /* a tie between 0x3f81 and 0x3f82: to even 0x3f82 */
        0x3f807fffu, 0x3f808001u, 0xbf808000u, 0xbf818000u, /* just below / above a tie; negative ties */
        0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, /* zeros, infinities */
        0x7f7fffffu, 0x7f7f8000u, 0xff7fffffu,             /* largest finite: rounds up to infinity */
        0x00008000u, 0x00018000u, 0x0000ffffu, 0x807fffffu, 0x00000001u, /* subnormals, ties among them */
        0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu, 0x7fffffffu, /* NaNs: quiet, negative, signalling */
    };
    const int64_t ns = (int64_t)(sizeof special / sizeof special[0]), n = ns + 1000003;
    float *x = malloc((size_t)n * 4);
    for (int64_t i = 0; i < ns; i++) x[i] = from_bits(special[i]);
    m1c_rng r;
    m1c_rng_seed(&r, 99, 0);
    for (int64_t i = ns; i < n; i++) {
        uint32_t u = (uint32_t)m1c_rng_u64(&r);
        if (i % 4 == 0) u = (u & 0xffff0000u) | 0x8000u; /* many exact ties, odd and even */
        x[i] = from_bits(u);
    }
    uint16_t *c = malloc((size_t)n * 2), *g = malloc((size_t)n * 2);
    m1c_to_bf16(CPU, c, x, n);
    /* The reference's own rounding of the ties above (worked out by hand). */
    cr_expect_eq(c[0], 0x3f80, "CPU tie: %#x", c[0]);
    cr_expect_eq(c[1], 0x3f82, "CPU tie: %#x", c[1]);
    float *d_x = up(x, n);
    uint16_t *d_g = m1c_dev_alloc(GPU, (size_t)n * 2);
    int64_t bad = 0, nan_payload = 0;
    /* Every length of the list, so that the last partial block and the 16-byte path's scalar tail are
     * exercised at each size; then (k = NL + 1) from one element past the start of both arrays, which
     * leaves them unaligned (the scalar path), and one short of the end. */
    for (int k = 0; k <= NL + 1; k++) {
        const int64_t off = k > NL, len = k < NL ? (lens[k] < n ? lens[k] : n) : n - 2 * off;
        m1c_dev_memset0(GPU, d_g, (size_t)n * 2);
        m1c_to_bf16(GPU, d_g + off, d_x + off, len);
        m1c_dev_copy(CPU, g, GPU, d_g, (size_t)n * 2);
        for (int64_t i = off; i < off + len; i++) {
            /* Exact for every number (ties to even, subnormals, overflow to infinity). A NaN must stay
             * a NaN; its sign and payload may differ (CUDA writes the canonical 0x7fff, the CPU keeps the
             * top payload bits and sets the quiet bit), which no consumer of a bf16 copy can see. */
            int ok = bf16_is_nan(c[i]) ? bf16_is_nan(g[i]) : g[i] == c[i];
            if (!ok && bad++ < 10) {
                uint32_t u;
                memcpy(&u, &x[i], 4);
                cr_log_error("to_bf16 of %#010x: GPU %#06x, CPU %#06x", (unsigned)u, g[i], c[i]);
            }
            nan_payload += bf16_is_nan(c[i]) && g[i] != c[i];
        }
        if (off + len < n) cr_expect_eq(g[off + len], 0, "to_bf16 wrote past n = %lld", (long long)len);
        if (off) cr_expect_eq(g[0], 0, "to_bf16 wrote before its start");
    }
    cr_expect_eq(bad, 0, "%lld bf16 conversions differ from the CPU's", (long long)bad);
    cr_log_info("NaNs with another bit pattern than the CPU's: %lld", (long long)nan_payload);
    free(x), free(c), free(g), gfree(d_x), gfree(d_g);
}
