/* topk's Hopper expert products (plugins/moe/topk/expert_wg.cuh, run by expert_gemm = "auto" on sm_90a)
 * against double-precision CPU products on the same bf16 inputs, the forward's (A W_e^T) and the
 * backward's pair (A W_e, and the weight gradients G_e += A_e^T B_e over each expert's rows): uneven
 * experts with row ranges that start and end inside 128-row tiles and 64-row K steps, an empty expert, a
 * single-row expert, columns that end inside a 256-column tile and inside a 64-column panel, K that ends
 * inside a 64-wide step, rows and columns the products must not write, a second backward launch on the
 * same tile counter, and the forward's gate/up product with the SwiGLU in its epilogue. Skipped where the build has no CUDA or the machine no GPU; on a compute
 * capability 9.0 device of an sm_90a build the kernels must be there. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#ifdef M1C_TEST_XW
#include "expert_wg_glue.h"
#else
/* Built without CUDA: every test skips before reaching these; they keep the file compiling. */
static int xwt_expected(void) { return 0; }
static int xwt_available(void) { return 0; }
static int xwt_forward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                       uint16_t *C, int ldc, int grid, char *err, size_t errlen) {
    (void)E, (void)off, (void)rows, (void)N, (void)K, (void)A, (void)W, (void)C, (void)ldc, (void)grid;
    snprintf(err, errlen, "built without CUDA");
    return 1;
}
static int xwt_forward_glu(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                           uint16_t *C, int ldc, uint16_t *act, int grid, char *err, size_t errlen) {
    (void)act;
    return xwt_forward(E, off, rows, N, K, A, W, C, ldc, grid, err, errlen);
}
static int xwt_backward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                        uint16_t *C, int ldc, int M, int Ng, const uint16_t *Ag, const uint16_t *Bg, float *G, int reps,
                        int grid, int unset, char *err, size_t errlen) {
    (void)E, (void)off, (void)rows, (void)N, (void)K, (void)A, (void)W, (void)C, (void)ldc, (void)M, (void)Ng;
    (void)Ag, (void)Bg, (void)G, (void)reps, (void)grid, (void)unset;
    snprintf(err, errlen, "built without CUDA");
    return 1;
}
#endif

static void need_xw(void) {
    th_need_gpu();
#ifndef M1C_TEST_XW
    cr_skip_test("built without CUDA: no expert product glue");
#endif
    if (!xwt_expected()) cr_skip_test("no sm_90a kernel for this device (or build)");
    cr_assert(xwt_available(), "an sm_90a build on a compute capability 9.0 device, but no tensor-map encoder");
}

/* bf16 bits of f (round to nearest even; the inputs are finite) and back. */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static double from_bf16(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A bit pattern the products never write (a NaN): rows past the last expert and columns past N keep it. */
#define SENTINEL 0x7FC1u

/* n random bf16 values (normal, times scale). */
static uint16_t *rand_bf16(int64_t n, uint64_t seed, float scale) {
    float *f = th_randn(n, seed, scale);
    uint16_t *b = malloc((size_t)(n > 0 ? n : 1) * 2);
    cr_assert(b);
    for (int64_t i = 0; i < n; i++) b[i] = to_bf16(f[i]);
    free(f);
    return b;
}

/* A row product's terms A[r, k] W_e(n, k), W_e(n, k) at W[e se + n sn + k sk]: the forward's W_e is N x K
 * (sn K, sk 1), the backward's K x N (sn 1, sk N). */
typedef struct row_ctx {
    const uint16_t *A, *W;
    int K;
    int64_t se, sn, sk;
} row_ctx;
static double row_sum(const row_ctx *c, int r, int e, int n, double *S) {
    double sum = 0, s = 0;
    for (int k = 0; k < c->K; k++) {
        const double t = from_bf16(c->A[(int64_t)r * c->K + k]) * from_bf16(c->W[e * c->se + n * c->sn + k * c->sk]);
        sum += t, s += fabs(t);
    }
    *S = s;
    return sum;
}

/* row_sum for every kept row (off[E] of them) and column: want and its terms' absolute sum S, row-major,
 * computed once for the runs on every grid. */
static void row_refs(const row_ctx *c, const int32_t *off, int E, int N, double **want, double **S) {
    const int64_t n = (int64_t)off[E] * N;
    *want = malloc((size_t)(n > 0 ? n : 1) * sizeof(double)), *S = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    cr_assert(*want && *S);
    for (int e = 0; e < E; e++)
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int j = 0; j < N; j++) (*want)[(int64_t)r * N + j] = row_sum(c, r, e, j, &(*S)[(int64_t)r * N + j]);
}

/* A row product's output C (rows x ldc) against row_refs' want and S, for the kept rows' N columns;
 * everything else must still be SENTINEL. The kernels multiply the same bf16 values exactly and add in f32
 * (relative error ~K 2^-24 of S, under 1e-4 S here), then round once to bf16 (2^-9 of |want| at most):
 * |C - want| <= 2^-8 |want| + 1e-4 S holds with a factor 2 to spare; a wrong row, expert, column or K step
 * changes whole terms, O(S). */
static void expect_rows(const uint16_t *C, const int32_t *off, int E, int rows, int N, int ldc, const double *want,
                        const double *S) {
    int64_t bad = 0, touched = 0;
    for (int e = 0; e < E; e++)
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int n = 0; n < N; n++) {
                const double w = want[(int64_t)r * N + n], s = S[(int64_t)r * N + n];
                const uint16_t got = C[(int64_t)r * ldc + n];
                const double d = fabs(from_bf16(got) - w);
                if ((got == SENTINEL || !(d <= ldexp(fabs(w), -8) + 1e-4 * s)) && bad++ < 5)
                    cr_log_error("row %d (expert %d) column %d: %g, expected %g", r, e, n, from_bf16(got), w);
            }
    for (int r = 0; r < rows; r++)
        for (int n = r < off[E] ? N : 0; n < ldc; n++) touched += C[(int64_t)r * ldc + n] != SENTINEL;
    cr_expect_eq(bad, 0, "%lld of the kept rows' elements wrong", (long long)bad);
    cr_expect_eq(touched, 0, "%lld elements written outside the kept rows' N columns", (long long)touched);
}

/* Each case runs on one block per SM (as topk does: most blocks take one tile or none at these sizes), on
 * one block (every tile through the same ring, tile-id slots and staging, one after another) and on three
 * (blocks taking several tiles side by side). */
enum { N_GRIDS = 3 };
static const int grids[N_GRIDS] = {0, 1, 3};
static const char *const grid_name[N_GRIDS] = {"one block per SM", "one block", "three blocks"};

static void offsets(int E, const int *cnt, int32_t *off) {
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + cnt[e];
}

/* The forward: C = A W_e^T, N columns of ldc, K, with `tail` rows past the kept ones. */
static void check_forward(int E, const int *cnt, int tail, int N, int K, int ldc, uint64_t seed) {
    need_xw();
    int32_t off[65];
    offsets(E, cnt, off);
    const int rows = off[E] + tail;
    uint16_t *A = rand_bf16((int64_t)rows * K, seed, 1.0f), *W = rand_bf16((int64_t)E * N * K, seed + 1, 0.1f);
    uint16_t *C = malloc((size_t)rows * ldc * 2);
    cr_assert(C);
    const row_ctx ctx = {A, W, K, (int64_t)N * K, K, 1};
    double *want, *S;
    row_refs(&ctx, off, E, N, &want, &S);
    for (int g = 0; g < N_GRIDS; g++) {
        for (int64_t i = 0; i < (int64_t)rows * ldc; i++) C[i] = SENTINEL;
        char err[256] = "";
        cr_assert_eq(xwt_forward(E, off, rows, N, K, A, W, C, ldc, grids[g], err, sizeof err), 0, "forward: %s", err);
        cr_log_info("forward on %s", grid_name[g]);
        expect_rows(C, off, E, rows, N, ldc, want, S);
    }
    free(A), free(W), free(C), free(want), free(S);
}

/* The backward's pair, launched twice: C = A W_e (N columns of ldc, K) and G_e += Ag_e^T Bg_e (M x Ng, from
 * random values, so twice the product is added). G's reference is in double over the same bf16 values;
 * the kernel adds in f32 over an expert's rows (< 2e-4 S for the at most 420 rows here, S the absolute
 * sum of the terms) and into G twice: |G - ref| <= 2e-4 S + 2^-22 (|G0| + |ref|). */
static void check_backward(int E, const int *cnt, int tail, int N, int K, int ldc, int M, int Ng, uint64_t seed) {
    need_xw();
    int32_t off[65];
    offsets(E, cnt, off);
    const int rows = off[E] + tail;
    uint16_t *A = rand_bf16((int64_t)rows * K, seed, 1.0f), *W = rand_bf16((int64_t)E * K * N, seed + 1, 0.1f);
    uint16_t *Ag = rand_bf16((int64_t)rows * M, seed + 2, 1.0f), *Bg = rand_bf16((int64_t)rows * Ng, seed + 3, 1.0f);
    const int64_t ng = (int64_t)E * M * Ng;
    float *G0 = th_randn(ng, seed + 4, 1.0f), *G = malloc((size_t)ng * sizeof(float));
    double *sum = malloc((size_t)ng * sizeof(double)), *abs_sum = malloc((size_t)ng * sizeof(double));
    uint16_t *C = malloc((size_t)rows * ldc * 2);
    cr_assert(C && G && sum && abs_sum);
    for (int e = 0; e < E; e++)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < Ng; n++) {
                double t_sum = 0, t_abs = 0;
                for (int r = off[e]; r < off[e + 1]; r++) {
                    const double t = from_bf16(Ag[(int64_t)r * M + m]) * from_bf16(Bg[(int64_t)r * Ng + n]);
                    t_sum += t, t_abs += fabs(t);
                }
                const int64_t i = ((int64_t)e * M + m) * Ng + n;
                sum[i] = t_sum, abs_sum[i] = t_abs;
            }
    const row_ctx ctx = {A, W, K, (int64_t)K * N, 1, N};
    double *want, *S;
    row_refs(&ctx, off, E, N, &want, &S);
    for (int g = 0; g < N_GRIDS; g++) {
        memcpy(G, G0, (size_t)ng * sizeof(float));
        for (int64_t i = 0; i < (int64_t)rows * ldc; i++) C[i] = SENTINEL;
        char err[256] = "";
        cr_assert_eq(xwt_backward(E, off, rows, N, K, A, W, C, ldc, M, Ng, Ag, Bg, G, 2, grids[g], 0, err, sizeof err),
                     0, "backward on %s: %s", grid_name[g], err);
        cr_log_info("backward on %s", grid_name[g]);
        expect_rows(C, off, E, rows, N, ldc, want, S);
        int64_t bad = 0;
        for (int64_t i = 0; i < ng; i++) {
            const double gw = G0[i] + 2 * sum[i], d = fabs(G[i] - gw);
            if (!(d <= 2e-4 * 2 * abs_sum[i] + ldexp(fabs(G0[i]) + fabs(gw), -22)))
                if (bad++ < 5) cr_log_error("G[%lld]: %.9g, expected %.9g", (long long)i, G[i], gw);
        }
        cr_expect_eq(bad, 0, "%lld weight-gradient elements wrong on %s", (long long)bad, grid_name[g]);
        /* G handed over unset (M1C_TENSOR_UNSET): NaN before, the product itself after, every element written
         * (an empty expert's zeroed), whatever the second launch found there; the same tolerance, once. */
        for (int64_t i = 0; i < ng; i++) G[i] = NAN;
        cr_assert_eq(xwt_backward(E, off, rows, N, K, A, W, C, ldc, M, Ng, Ag, Bg, G, 2, grids[g], 1, err, sizeof err),
                     0, "backward (unset G) on %s: %s", grid_name[g], err);
        bad = 0;
        for (int64_t i = 0; i < ng; i++)
            if (!(fabs(G[i] - sum[i]) <= 2e-4 * abs_sum[i] + ldexp(fabs(sum[i]), -22)) && bad++ < 5)
                cr_log_error("G[%lld] (unset): %.9g, expected %.9g", (long long)i, G[i], sum[i]);
        cr_expect_eq(bad, 0, "%lld weight-gradient elements wrong on %s with G unset", (long long)bad, grid_name[g]);
    }
    free(A), free(W), free(Ag), free(Bg), free(G0), free(G), free(C), free(sum), free(abs_sum), free(want), free(S);
}

/* Uneven experts (tiles of 128 rows ending inside an expert, an expert that starts mid-tile), an empty one
 * and one of a single row; N 200 ends inside the first 256-column tile and inside a 64-column panel; K
 * 136 ends inside the third 64-wide step; 37 rows past the kept ones and 8 columns past N stay untouched. */
Test(expert_wg_cuda, forward_uneven_experts_partial_tiles) {
    const int cnt[5] = {300, 0, 129, 1, 77};
    check_forward(5, cnt, 37, 200, 136, 208, 31);
}

/* The MoE reference's proportions on fewer rows: N 768 (three full column tiles), K 1024 (16 steps),
 * experts of whole and partial row tiles, C exactly N wide. */
Test(expert_wg_cuda, forward_reference_widths) {
    const int cnt[4] = {256, 200, 384, 65};
    check_forward(4, cnt, 0, 768, 1024, 768, 32);
}

/* Two column tiles, the second holding one panel of 64 and part of the next (N 328), K 64 (one step);
 * every expert shorter than a tile: warpgroups with 64 rows of one expert (the 64-, 65- and 127-row ones)
 * store by bulk copies, the others from their registers or not at all. */
Test(expert_wg_cuda, forward_short_experts_two_column_tiles) {
    const int cnt[6] = {63, 64, 65, 1, 0, 127};
    check_forward(6, cnt, 5, 328, 64, 328, 33);
}

/* The forward with its SwiGLU (gate/up, N = 2F): C as check_forward checks it (its columns in GU's layout,
 * gate then up, whatever tiles made them), and act (rows x F) against silu(g) u in double from C's own
 * rounded g and u: the kernel computes it in f32 (MUFU's exp and division, ~1e-6 relative) and rounds once
 * to bf16 (2^-9), so |act - ref| <= 2^-8 |ref| + 1e-30; rows past the kept ones stay SENTINEL. */
static void check_forward_glu(int E, const int *cnt, int tail, int F, int K, uint64_t seed) {
    need_xw();
    int32_t off[65];
    offsets(E, cnt, off);
    const int rows = off[E] + tail, N = 2 * F;
    uint16_t *A = rand_bf16((int64_t)rows * K, seed, 1.0f), *W = rand_bf16((int64_t)E * N * K, seed + 1, 0.1f);
    uint16_t *C = malloc((size_t)rows * N * 2), *act = malloc((size_t)rows * F * 2);
    cr_assert(C && act);
    const row_ctx ctx = {A, W, K, (int64_t)N * K, K, 1};
    double *want, *S;
    row_refs(&ctx, off, E, N, &want, &S);
    for (int g = 0; g < N_GRIDS; g++) {
        for (int64_t i = 0; i < (int64_t)rows * N; i++) C[i] = SENTINEL;
        for (int64_t i = 0; i < (int64_t)rows * F; i++) act[i] = SENTINEL;
        char err[256] = "";
        cr_assert_eq(xwt_forward_glu(E, off, rows, N, K, A, W, C, N, act, grids[g], err, sizeof err), 0, "forward: %s",
                     err);
        cr_log_info("forward with SwiGLU on %s", grid_name[g]);
        expect_rows(C, off, E, rows, N, N, want, S);
        int64_t bad = 0, touched = 0;
        for (int r = 0; r < rows; r++)
            for (int f = 0; f < F; f++) {
                const uint16_t got = act[(int64_t)r * F + f];
                if (r >= off[E]) {
                    touched += got != SENTINEL;
                    continue;
                }
                const double gv = from_bf16(C[(int64_t)r * N + f]), uv = from_bf16(C[(int64_t)r * N + F + f]);
                const double ref = gv / (1.0 + exp(-gv)) * uv, d = fabs(from_bf16(got) - ref);
                if ((got == SENTINEL || !(d <= ldexp(fabs(ref), -8) + 1e-30)) && bad++ < 5)
                    cr_log_error("act row %d column %d: %g, expected %g", r, f, from_bf16(got), ref);
            }
        cr_expect_eq(bad, 0, "%lld of act's kept elements wrong", (long long)bad);
        cr_expect_eq(touched, 0, "%lld elements of act written past the kept rows", (long long)touched);
    }
    free(A), free(W), free(C), free(act), free(want), free(S);
}

/* F 384 (three gate/up column tiles, gate columns 128 c .. beside up columns 384 + 128 c ..), K 200 (the
 * last step partial); experts that end inside 64-row halves (register stores of GU and act) and on them
 * (bulk stores), an empty one, 29 rows past the kept ones. */
Test(expert_wg_cuda, forward_swiglu_uneven_experts) {
    const int cnt[6] = {300, 0, 129, 1, 64, 190};
    check_forward_glu(6, cnt, 29, 384, 200, 34);
}

/* The MoE reference's widths: F 1024, K 768. */
Test(expert_wg_cuda, forward_swiglu_reference_widths) {
    const int cnt[3] = {256, 200, 383};
    check_forward_glu(3, cnt, 0, 1024, 768, 35);
}

/* The pair: row product N 200 (inside a tile and a panel) with K 136; weight products M 200 (two 128-row
 * tiles, the second partial: 8 of one panel's 64 columns real, the rest zero-filled, and one panel all
 * zeros) by Ng 264 (a full and a partial column tile) over experts of 300 rows (five K steps, the last
 * partial), none, 129, 1 and 77. */
Test(expert_wg_cuda, backward_uneven_experts_partial_tiles) {
    const int cnt[5] = {300, 0, 129, 1, 77};
    check_backward(5, cnt, 37, 200, 136, 208, 200, 264, 41);
}

/* The pair at the MoE reference's widths on fewer rows: d act (N 1024, K 768) beside dWd (768 x 1024),
 * and the d x rows (N 768, K 2048) beside dWgu (2048 x 768) in the other call. */
Test(expert_wg_cuda, backward_reference_widths) {
    const int cnt[3] = {130, 64, 190};
    check_backward(3, cnt, 0, 1024, 768, 1024, 768, 1024, 42);
    check_backward(3, cnt, 3, 768, 2048, 768, 2048, 768, 43);
}
