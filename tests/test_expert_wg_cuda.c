/* topk's Hopper expert product (plugins/moe/topk/expert_wg.cuh, run by expert_gemm = "auto" on sm_90a)
 * against a double-precision CPU product on the same bf16 inputs: uneven experts with row ranges that
 * start and end inside 128-row tiles, an empty expert, a single-row expert, columns that end inside a
 * 256-column tile and inside a 64-column store panel, K that ends inside a 64-wide step, and rows and
 * columns the product must not write. Skipped where the build has no CUDA or the machine no GPU; on a
 * compute capability 9.0 device of an sm_90a build the kernel must be there. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#ifdef M1C_TEST_XW
/* tests/expert_wg_glue.cu */
int xwt_expected(void);
int xwt_available(void);
int xwt_run(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
            int ldc, char *err, size_t errlen);
#else
/* Built without CUDA: every test skips before reaching these; they keep the file compiling. */
static int xwt_expected(void) { return 0; }
static int xwt_available(void) { return 0; }
static int xwt_run(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                   uint16_t *C, int ldc, char *err, size_t errlen) {
    (void)E, (void)off, (void)rows, (void)N, (void)K, (void)A, (void)W, (void)C, (void)ldc;
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

/* A bit pattern the product never writes (a NaN): rows past the last expert and columns past N keep it. */
#define SENTINEL 0x7FC1u

/* Each element of C against sum_k A[r, k] W_e[n, k] in double (S its sum of |terms|): the kernel multiplies
 * the same bf16 values exactly and adds in f32 (relative error ~K 2^-24 of S, under 1e-4 S here), then
 * rounds once to bf16 (2^-9 of |ref| at most). |C - ref| <= 2^-8 |ref| + 1e-4 S holds with a factor 2 to
 * spare; a wrong row, expert, column or K step changes whole terms, O(S). */
static void check_case(int E, const int *cnt, int tail, int N, int K, int ldc, uint64_t seed) {
    need_xw();
    int32_t off[65];
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + cnt[e];
    const int rows = off[E] + tail; /* the buffer's rows past the kept ones: never written */
    const int64_t na = (int64_t)rows * K, nw = (int64_t)E * N * K, nc = (int64_t)rows * ldc;
    float *af = th_randn(na, seed, 1.0f), *wf = th_randn(nw, seed + 1, 0.1f);
    uint16_t *A = malloc((size_t)na * 2), *W = malloc((size_t)nw * 2), *C = malloc((size_t)nc * 2);
    cr_assert(A && W && C);
    for (int64_t i = 0; i < na; i++) A[i] = to_bf16(af[i]);
    for (int64_t i = 0; i < nw; i++) W[i] = to_bf16(wf[i]);
    for (int64_t i = 0; i < nc; i++) C[i] = SENTINEL;
    char err[256] = "";
    cr_assert_eq(xwt_run(E, off, rows, N, K, A, W, C, ldc, err, sizeof err), 0, "expert product: %s", err);

    int64_t bad = 0;
    double worst = 0;
    for (int e = 0; e < E; e++)
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int n = 0; n < N; n++) {
                double ref = 0, s = 0;
                for (int k = 0; k < K; k++) {
                    const double t = from_bf16(A[(int64_t)r * K + k]) * from_bf16(W[((int64_t)e * N + n) * K + k]);
                    ref += t, s += fabs(t);
                }
                const uint16_t got = C[(int64_t)r * ldc + n];
                const double d = fabs(from_bf16(got) - ref), tol = ldexp(fabs(ref), -8) + 1e-4 * s;
                if (got == SENTINEL || !(d <= tol)) {
                    if (bad++ < 5)
                        cr_log_error("row %d (expert %d) column %d: %g, expected %g", r, e, n, from_bf16(got), ref);
                } else if (s > 0 && d / s > worst) {
                    worst = d / s;
                }
            }
    cr_expect_eq(bad, 0, "%lld of the kept rows' elements wrong (worst passing error %g of the terms' scale)",
                 (long long)bad, worst);
    int64_t touched = 0;
    for (int r = 0; r < rows; r++)
        for (int n = r < off[E] ? N : 0; n < ldc; n++) touched += C[(int64_t)r * ldc + n] != SENTINEL;
    cr_expect_eq(touched, 0, "%lld elements written outside the kept rows' N columns", (long long)touched);
    free(af), free(wf), free(A), free(W), free(C);
}

/* Uneven experts (tiles of 128 rows ending inside an expert, an expert that starts mid-tile), an empty one
 * and one of a single row; N 200 ends inside the first 256-column tile and inside a 64-column panel; K
 * 136 ends inside the third 64-wide step; 37 rows past the kept ones and 8 columns past N stay untouched. */
Test(expert_wg_cuda, uneven_experts_partial_tiles) {
    const int cnt[5] = {300, 0, 129, 1, 77};
    check_case(5, cnt, 37, 200, 136, 208, 31);
}

/* The MoE reference's proportions on fewer rows: N 768 (three full column tiles), K 1024 (16 steps),
 * experts of whole and partial row tiles, C exactly N wide. */
Test(expert_wg_cuda, reference_widths) {
    const int cnt[4] = {256, 200, 384, 65};
    check_case(4, cnt, 0, 768, 1024, 768, 32);
}

/* Two column tiles, the second holding one panel of 64 and part of the next (N 328), K 64 (one step);
 * every expert shorter than a tile, so each warpgroup stores from its registers or has nothing to store. */
Test(expert_wg_cuda, short_experts_two_column_tiles) {
    const int cnt[6] = {63, 64, 65, 1, 0, 127};
    check_case(6, cnt, 5, 328, 64, 328, 33);
}
