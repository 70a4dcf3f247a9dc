/* The CUDA device services against the CPU: allocation, copies, cuBLAS GEMM (every transpose
 * combination, batched) and gemm_ex through cuBLASLt and its algorithm cache (dtypes, transposes, beta,
 * batches, ragged sizes, alignment, cache reuse). Skipped where the build has no CUDA or no GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/cuda/backend.h"
#include "../core/host.h"
#include "../core/safetensors.h"
#include "harness.h"

/* Backend functions the tests call directly, where the build has them (weak: a CPU build links without
 * the symbols, and skips these tests anyway). */
#pragma weak m1c_cuda_fail

Test(cuda_backend, copy_round_trip) {
    th_need_gpu();
    int64_t n = 100003; /* not a multiple of any transfer granularity */
    float *x = th_randn(n, 1, 1.0f), *y = th_zeros(n);
    float *d = m1c_dev_alloc(M1C_DEVICE_CUDA, (size_t)n * 4);
    cr_assert_not_null(d);
    m1c_dev_copy(M1C_DEVICE_CUDA, d, M1C_DEVICE_CPU, x, (size_t)n * 4);
    m1c_dev_copy(M1C_DEVICE_CPU, y, M1C_DEVICE_CUDA, d, (size_t)n * 4);
    cr_assert_eq(th_max_abs_diff(x, y, n), 0.0, "a copy must be exact");
    m1c_dev_memset0(M1C_DEVICE_CUDA, d, (size_t)n * 4);
    m1c_dev_copy(M1C_DEVICE_CPU, y, M1C_DEVICE_CUDA, d, (size_t)n * 4);
    cr_assert_eq(th_max_abs(y, n), 0.0);
    m1c_dev_free(M1C_DEVICE_CUDA, d);
    free(x), free(y);
}

/* A CUDA failure does not end the process: the first one is kept with what failed, later ones are
 * dropped, and m1c_dev_take_error hands it over once. Clearing an address that is no allocation
 * (cudaErrorInvalidValue, which leaves the device usable) is a real failure of the runtime. */
Test(cuda_backend, failures_are_kept_not_fatal) {
    th_need_gpu();
    char msg[256];
    while (m1c_dev_take_error(M1C_DEVICE_CUDA, msg, sizeof msg)) {} /* nothing left from other work */
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CUDA, msg, sizeof msg), 0);
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CPU, msg, sizeof msg), 0, "the CPU keeps no failures");
    float *d = m1c_dev_alloc(M1C_DEVICE_CUDA, 64);
    cr_assert_not_null(d);
    m1c_dev_memset0(M1C_DEVICE_CUDA, (void *)(uintptr_t)8, 64); /* not a device pointer */
    m1c_cuda_fail("second failure", "dropped");
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CUDA, msg, sizeof msg), 1, "the failed copy was not kept");
    cr_assert(strstr(msg, "cudaMemset") != NULL, "the first failure names the call: %s", msg);
    cr_assert(strstr(msg, "dropped") == NULL, "a later failure replaced the first: %s", msg);
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CUDA, msg, sizeof msg), 0, "taken once");
    /* the device still works */
    float x[16] = {1, 2, 3}, y[16] = {0};
    m1c_dev_copy(M1C_DEVICE_CUDA, d, M1C_DEVICE_CPU, x, sizeof x);
    m1c_dev_copy(M1C_DEVICE_CPU, y, M1C_DEVICE_CUDA, d, sizeof y);
    cr_assert_eq(memcmp(x, y, sizeof x), 0);
    cr_assert_eq(m1c_dev_take_error(M1C_DEVICE_CUDA, msg, sizeof msg), 0, "%s", msg);
    m1c_dev_free(M1C_DEVICE_CUDA, d);
}

static float *to_gpu(const float *x, int64_t n) {
    float *d = m1c_dev_alloc(M1C_DEVICE_CUDA, (size_t)n * 4);
    m1c_dev_copy(M1C_DEVICE_CUDA, d, M1C_DEVICE_CPU, x, (size_t)n * 4);
    return d;
}

Test(cuda_backend, gemm_matches_cpu) {
    th_need_gpu();
    const int M = 37, N = 53, K = 71, batch = 3; /* odd sizes: no tile divides them */
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int lda = ta ? M : K, ldb = tb ? K : N;
            int64_t sa = (int64_t)M * K, sb = (int64_t)K * N, sc = (int64_t)M * N;
            float *A = th_randn(sa * batch, 10 + ta, 1), *B = th_randn(sb * batch, 20 + tb, 1);
            float *C = th_randn(sc * batch, 30, 1), *ref = malloc((size_t)(sc * batch) * 4);
            for (int64_t i = 0; i < sc * batch; i++) ref[i] = C[i];
            m1c_gemm_batched(M1C_DEVICE_CPU, ta, tb, M, N, K, 0.5f, A, lda, sa, B, ldb, sb, 0.25f, ref, N, sc, batch);
            float *dA = to_gpu(A, sa * batch), *dB = to_gpu(B, sb * batch), *dC = to_gpu(C, sc * batch);
            m1c_gemm_batched(M1C_DEVICE_CUDA, ta, tb, M, N, K, 0.5f, dA, lda, sa, dB, ldb, sb, 0.25f, dC, N, sc, batch);
            m1c_dev_copy(M1C_DEVICE_CPU, C, M1C_DEVICE_CUDA, dC, (size_t)(sc * batch) * 4);
            /* cuBLAS may use TF32 only when asked; in its default FP32 mode the difference is summation
             * order alone: K = 71 products of N(0,1) values, so ~1e-5 absolute is generous. */
            cr_assert_leq(th_max_abs_diff(C, ref, sc * batch), 1e-4, "ta=%d tb=%d", ta, tb);
            m1c_dev_free(M1C_DEVICE_CUDA, dA), m1c_dev_free(M1C_DEVICE_CUDA, dB), m1c_dev_free(M1C_DEVICE_CUDA, dC);
            free(A), free(B), free(C), free(ref);
        }
}

/* ---- gemm_ex: cuBLASLt with the per-thread algorithm cache, against a double-precision reference ---- */

#define GPU M1C_DEVICE_CUDA
#define F32 M1C_F32
#define BF16 M1C_BF16
#define U32 (1.0 / 16777216.0) /* f32 unit roundoff, 2^-24 */
#define UBF (1.0 / 256.0)      /* bf16 unit roundoff, 2^-8 (8 significant bits) */

/* The backend's counters, where the build has them (weak: a CPU build links without the symbol, and
 * skips these tests anyway). */
#pragma weak m1c_cuda_gemm_ex_stats

/* Operand values: one pool of uniform [-1, 1) values, their bf16 roundings, and device copies (f32 of
 * the values, bf16 of the roundings); every case reads A and B at offsets into it. */
typedef struct pool {
    int64_t n;
    float *f, *r;    /* host: the values; the same rounded to bf16 */
    void *d32, *d16; /* device: f as f32, r as bf16 */
} pool;

/* B's region starts here (a multiple of 128 elements: 256-byte aligned in either dtype); A's at 0. */
#define B_BASE 1013632

static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static pool pool_new(int64_t n, uint64_t seed) {
    pool p = {n, malloc((size_t)n * 4), malloc((size_t)n * 4), NULL, NULL};
    uint16_t *h16 = malloc((size_t)n * 2);
    cr_assert(p.f && p.r && h16);
    for (int64_t i = 0; i < n; i++) {
        p.f[i] = (float)((double)(mix64(seed * 0x100000000ull + (uint64_t)i) >> 40) * (2.0 / 16777216.0) - 1.0);
        h16[i] = m1c_f32_to_bf16(p.f[i]);
        p.r[i] = m1c_bf16_to_f32(h16[i]);
    }
    p.d32 = m1c_dev_alloc(GPU, (size_t)n * 4);
    p.d16 = m1c_dev_alloc(GPU, (size_t)n * 2);
    cr_assert(p.d32 && p.d16);
    m1c_dev_copy(GPU, p.d32, M1C_DEVICE_CPU, p.f, (size_t)n * 4);
    m1c_dev_copy(GPU, p.d16, M1C_DEVICE_CPU, h16, (size_t)n * 2);
    free(h16);
    return p;
}

static void pool_free(pool *p) {
    m1c_dev_free(GPU, p->d32), m1c_dev_free(GPU, p->d16);
    free(p->f), free(p->r);
}

typedef struct gcase {
    int ta, tb, M, N, K, batch;
    int ab, c; /* dtype of A and B; of C */
    float alpha, beta;
    /* 1: pointers 1-3 elements past 256-byte alignment, leading dimensions and batch strides padded by
     * odd counts (no 16-byte alignment anywhere); 0: 256-byte aligned pointers, natural leading
     * dimensions, strides rounded up to 128 elements. */
    int odd;
} gcase;

/* One stored matrix (rows x cols, row-major, ld >= cols) batch times, from element off of its buffer. */
typedef struct geom {
    int rows, cols, ld;
    int64_t stride, off, extent; /* stride 0 for one matrix, as the plugins pass it */
} geom;

static geom geom_of(int rows, int cols, int batch, int odd, int64_t base, int lead) {
    geom g = {rows, cols, (cols > 0 ? cols : 1) + (odd ? 1 : 0), 0, base + (odd ? lead : 0), 0};
    const int64_t mat = (int64_t)rows * g.ld;
    if (batch > 1) g.stride = odd ? mat + 3 : (mat + 127) / 128 * 128;
    g.extent = g.off + (batch - 1) * g.stride + mat;
    return g;
}

static double cval(const void *buf, int dtype, int64_t i) {
    return dtype == F32 ? ((const float *)buf)[i] : m1c_bf16_to_f32(((const uint16_t *)buf)[i]);
}

static const char *dt_name(int d) { return d == F32 ? "f32" : "bf16"; }

/* Runs one gemm_ex and checks it: every output element written (beta 0 starts from NaN, which cuBLAS
 * must not read), the verified rows (all, or a sample of big products) against the reference, and every
 * element of C's buffer outside the product (offset, ld and stride padding, a tail) unchanged bit for
 * bit. */
static void run_case(const pool *P, const gcase *g) {
    char what[160];
    snprintf(what, sizeof what, "%s x %s -> %s ta=%d tb=%d M=%d N=%d K=%d batch=%d alpha=%g beta=%g odd=%d",
             dt_name(g->ab), dt_name(g->ab), dt_name(g->c), g->ta, g->tb, g->M, g->N, g->K, g->batch,
             (double)g->alpha, (double)g->beta, g->odd);
    const int M = g->M, N = g->N, K = g->K;
    const geom A = geom_of(g->ta ? K : M, g->ta ? M : K, g->batch, g->odd, 0, 1);
    const geom B = geom_of(g->tb ? N : K, g->tb ? K : N, g->batch, g->odd, B_BASE, 3);
    const geom C = geom_of(M, N, g->batch, g->odd, 0, 1);
    cr_assert(A.extent <= P->n && B.extent <= P->n, "pool too small for %s", what);
    const float *ha = g->ab == BF16 ? P->r : P->f, *hb = ha;
    const int es = g->ab == BF16 ? 2 : 4, ces = g->c == BF16 ? 2 : 4;
    const char *dbase = g->ab == BF16 ? (const char *)P->d16 : (const char *)P->d32;

    const int64_t nc = C.extent + 5; /* a tail past the last matrix catches overruns */
    unsigned char *c0 = malloc((size_t)nc * ces), *c1 = malloc((size_t)nc * ces);
    cr_assert(c0 && c1);
    for (int64_t i = 0; i < nc; i++) {
        const float v = g->beta != 0.0f ? P->f[(i * 7 + 12345) % P->n] : NAN;
        if (g->c == F32)
            memcpy(c0 + i * 4, &v, 4);
        else {
            const uint16_t h16 = m1c_f32_to_bf16(v);
            memcpy(c0 + i * 2, &h16, 2);
        }
    }
    char *dC = m1c_dev_alloc(GPU, (size_t)nc * ces);
    cr_assert_not_null(dC);
    m1c_dev_copy(GPU, dC, M1C_DEVICE_CPU, c0, (size_t)nc * ces);
    cr_assert_eq(m1c_gemm_ex(GPU, NULL, g->ta, g->tb, M, N, K, g->alpha, dbase + A.off * es, g->ab, A.ld, A.stride,
                             dbase + B.off * es, g->ab, B.ld, B.stride, g->beta, dC + C.off * ces, g->c, C.ld,
                             C.stride, g->batch),
                 M1C_OK, "%s", what);
    m1c_dev_copy(M1C_DEVICE_CPU, c1, GPU, dC, (size_t)nc * ces);
    m1c_dev_free(GPU, dC);

    const int64_t cstride = g->batch > 1 ? C.stride : (int64_t)M * C.ld;
    for (int64_t i = 0; i < nc; i++) {
        const int64_t rel = i - C.off, b = rel / cstride, r = rel % cstride;
        const int out = rel >= 0 && b < g->batch && r / C.ld < M && r % C.ld < N;
        if (out)
            cr_assert(isfinite(cval(c1, g->c, i)), "%s: C[%lld] not written (or not finite)", what, (long long)i);
        else
            cr_assert(memcmp(c0 + i * ces, c1 + i * ces, (size_t)ces) == 0,
                      "%s: C[%lld] outside the product changed", what, (long long)i);
    }

    /* Rows to verify: all of them while the reference stays cheap, else the edges, the middle and five
     * pseudo-random rows (each with every column). */
    const int64_t work = (int64_t)M * N * (K > 0 ? K : 1) * g->batch;
    int *rows = malloc(sizeof(int) * (size_t)(M > 10 ? M : 10)), nr = 0;
    if (work <= (1 << 22))
        for (int i = 0; i < M; i++) rows[nr++] = i;
    else {
        const int fixed[] = {0, 1, M / 2, M - 2, M - 1};
        for (int i = 0; i < 5; i++) rows[nr++] = fixed[i];
        for (int i = 0; i < 5; i++) rows[nr++] = (int)(mix64((uint64_t)(M * 31 + N * 7 + K + i)) % (uint64_t)M);
    }
    double *arow = malloc(sizeof(double) * (size_t)(K > 0 ? K : 1)), *acc = malloc(sizeof(double) * (size_t)N),
           *sc = malloc(sizeof(double) * (size_t)N);
    double worst = 0;
    int wb = 0, wi = 0, wj = 0;
    for (int b = 0; b < g->batch; b++)
        for (int t = 0; t < nr; t++) {
            const int i = rows[t];
            const float *pa = ha + A.off + b * A.stride, *pb = hb + B.off + b * B.stride;
            for (int k = 0; k < K; k++) arow[k] = pa[g->ta ? (int64_t)k * A.ld + i : (int64_t)i * A.ld + k];
            for (int j = 0; j < N; j++) acc[j] = sc[j] = 0;
            if (g->tb)
                for (int j = 0; j < N; j++)
                    for (int k = 0; k < K; k++) {
                        const double v = arow[k] * pb[(int64_t)j * B.ld + k];
                        acc[j] += v, sc[j] += fabs(v);
                    }
            else
                for (int k = 0; k < K; k++)
                    for (int j = 0; j < N; j++) {
                        const double v = arow[k] * pb[(int64_t)k * B.ld + j];
                        acc[j] += v, sc[j] += fabs(v);
                    }
            for (int j = 0; j < N; j++) {
                const int64_t ci = C.off + b * cstride + (int64_t)i * C.ld + j;
                const double c0v = g->beta != 0.0f ? g->beta * cval(c0, g->c, ci) : 0.0;
                const double ref = g->alpha * acc[j] + c0v, scale = fabs((double)g->alpha) * sc[j] + fabs(c0v);
                /* f32 C: the operands are exact (bf16 ones are compared from their roundings, and their
                 * products are exact in f32); f32 products of f32 operands, the f32 accumulation in any
                 * order (split-K included) and the beta term err by a few units of 2^-24 of the sum of
                 * |terms|. 64 units is ample for that and far below any indexing, transpose, stride or
                 * beta mistake (off by O(scale)); TF32 (10-bit inputs) would exceed it at small K.
                 * bf16 C: that, plus rounding the result to 8 significant bits, which alone reaches up to
                 * 2^-8 |ref| (so ratios near 1 are normal there; truncation, 2^-7, would fail). With
                 * beta != 0, cuBLASLt rounds alpha A B to bf16 before adding beta C and rounding again
                 * (measured on an H200: up to 1.9 times the single-rounding bound, even at M 1, K 768):
                 * allow that rounding too, 2^-8 of |alpha A B| + |beta C| with a factor 2 of margin; still
                 * at most 1/64 of the scale, against O(scale) for a real mistake. */
                const double extra = g->beta != 0.0f ? 2 * UBF * (fabs(g->alpha * acc[j]) + fabs(c0v)) : 0.0;
                const double tol = g->c == F32 ? 64 * U32 * scale : UBF * fabs(ref) + extra + 128 * U32 * scale;
                const double err = fabs(cval(c1, g->c, ci) - ref) / (tol > 0 ? tol : 1e-30);
                if (worst == worst && !(err <= worst)) worst = err, wb = b, wi = i, wj = j; /* NaN stays */
            }
        }
    cr_assert(worst <= 1.0, "%s: C[%d][%d][%d] off by %g tolerances", what, wb, wi, wj, worst);
    free(rows), free(arow), free(acc), free(sc), free(c0), free(c1);
}

/* Every dtype combination the plugins use, every transpose pair, beta 0 and 1, one matrix and a batch
 * of 3 with strides, pointers off 16-byte alignment and aligned, on small ragged shapes. */
Test(cuda_backend, gemm_ex_combinations) {
    th_need_gpu();
    pool P = pool_new(B_BASE + 400000, 1);
    static const int shapes[][3] = {{1, 24, 768}, {37, 8, 5}, {37, 24, 3001}};
    static const int dts[][2] = {{BF16, BF16}, {BF16, F32}, {F32, F32}};
    for (int s = 0; s < 3; s++)
        for (int d = 0; d < 3; d++)
            for (int t = 0; t < 4; t++)
                for (int beta = 0; beta < 2; beta++)
                    for (int bt = 0; bt < 2; bt++)
                        for (int odd = 1; odd >= 0; odd--) {
                            gcase g = {t & 1,  t >> 1, shapes[s][0], shapes[s][1], shapes[s][2], bt ? 3 : 1,
                                       dts[d][0], dts[d][1], 0.75f, (float)beta, odd};
                            run_case(&P, &g);
                        }
    pool_free(&P);
}

/* The ragged sizes of the MoE and beyond (M 4093 and 4099 straddle a bucket edge), every N and K, the
 * transposes, dtypes, beta and alignment rotating over them so each shape runs in two settings. */
Test(cuda_backend, gemm_ex_ragged_large) {
    th_need_gpu();
    pool P = pool_new(12500000, 2);
    static const int Ms[] = {4093, 4099}, Ns[] = {8, 24, 2048}, Ks[] = {5, 768, 3001};
    static const int dts[][2] = {{BF16, BF16}, {BF16, F32}, {F32, F32}};
    int idx = 0;
    for (int m = 0; m < 2; m++)
        for (int n = 0; n < 3; n++)
            for (int k = 0; k < 3; k++, idx++)
                for (int v = 0; v < 2; v++) {
                    const int c = (idx + v) % 3, t = (idx + 2 * v) % 4;
                    gcase g = {t & 1,     t >> 1,    Ms[m], Ns[n], Ks[k], 1, dts[c][0], dts[c][1], 1.0f,
                               (float)((idx + v) & 1), (idx / 3 + v) & 1};
                    run_case(&P, &g);
                }
    pool_free(&P);
}

static m1c_cuda_gemm_stats gemm_stats(void) {
    m1c_cuda_gemm_stats s = {0, 0, 0, 0};
    if (m1c_cuda_gemm_ex_stats) m1c_cuda_gemm_ex_stats(&s);
    return s;
}

/* Runs g and returns how many heuristic queries it cost; no call may fall back to cuBLAS. */
static long long run_counted(const pool *P, const gcase *g) {
    const m1c_cuda_gemm_stats s0 = gemm_stats();
    run_case(P, g);
    const m1c_cuda_gemm_stats s1 = gemm_stats();
    cr_assert_eq(s1.fallbacks, s0.fallbacks, "a call went to cublasGemmStridedBatchedEx instead of cuBLASLt");
    cr_expect_eq(s1.retries, s0.retries, "a cached algorithm was refused for M=%d N=%d K=%d (correct, but slow)",
                 g->M, g->N, g->K);
    return s1.heuristics - s0.heuristics;
}

/* The MoE pattern: the same product with a new row count each call. The first call of a bucket asks the
 * heuristic; the next ones, with other M (or K) of that bucket, reuse its algorithm and must still be
 * right; a change of alignment, beta or dtype is another entry. */
Test(cuda_backend, gemm_ex_cache_reuse) {
    th_need_gpu();
    cr_assert_not_null(m1c_cuda_gemm_ex_stats, "a CUDA build exports m1c_cuda_gemm_ex_stats");
    pool P = pool_new(8500000, 3); /* dWgu's A: 4096 x 2048 */
    /* gate_up: NT bf16 -> bf16, [M x 2048 x 768]; 4093 makes the entry of bucket (3584, 4096]. */
    gcase g = {0, 1, 4093, 2048, 768, 1, BF16, BF16, 1.0f, 0.0f, 0};
    cr_assert_eq(run_counted(&P, &g), 1, "a new bucket asks the heuristic once");
    static const int reuse[] = {4000, 3585, 4096, 3777};
    for (int i = 0; i < 4; i++) {
        g.M = reuse[i];
        cr_expect_eq(run_counted(&P, &g), 0, "M=%d is in the bucket of 4093: no heuristic", g.M);
    }
    /* Unaligned operands must not take the aligned entry's algorithm; then aligned again hits. */
    g.M = 3900, g.odd = 1;
    cr_assert_eq(run_counted(&P, &g), 1, "unaligned pointers are another entry");
    g.M = 3700, g.odd = 0;
    cr_expect_eq(run_counted(&P, &g), 0, "the aligned entry is still there");
    g.beta = 1.0f; /* beta 1 reads C: another entry */
    cr_assert_eq(run_counted(&P, &g), 1, "beta != 0 is another entry");
    g.M = 4100; /* the next bucket, (4096, 5120] */
    cr_assert_eq(run_counted(&P, &g), 1, "M=4100 is in the next bucket");

    /* dWgu: TN bf16 -> f32 with beta 1, the row count in K: [2048 x 768 x K]. */
    gcase w = {1, 0, 2048, 768, 4093, 1, BF16, F32, 1.0f, 1.0f, 0};
    cr_assert_eq(run_counted(&P, &w), 1, "a new bucket asks the heuristic once");
    static const int reuse_k[] = {3600, 4096, 3585};
    for (int i = 0; i < 3; i++) {
        w.K = reuse_k[i];
        cr_expect_eq(run_counted(&P, &w), 0, "K=%d is in the bucket of 4093: no heuristic", w.K);
    }
    /* f32 operands, batched (the attention's shapes), then another M of its bucket. */
    gcase f = {0, 0, 37, 24, 768, 3, F32, F32, 0.5f, 1.0f, 0};
    cr_assert_eq(run_counted(&P, &f), 1, "a new bucket asks the heuristic once");
    f.M = 33;
    cr_expect_eq(run_counted(&P, &f), 0, "M=33 is in the bucket of 37 (33..40): no heuristic");
    pool_free(&P);
}

/* K = 0 is no product: C = beta C (handed to cuBLAS, as before cuBLASLt). */
Test(cuda_backend, gemm_ex_empty_inner) {
    th_need_gpu();
    pool P = pool_new(B_BASE + 1000, 4);
    gcase g = {0, 1, 37, 24, 0, 1, BF16, F32, 1.0f, 0.5f, 0};
    run_case(&P, &g);
    g.c = BF16, g.beta = 0.0f; /* C = 0 */
    run_case(&P, &g);
    pool_free(&P);
}

/* gemm_group against the same products one gemm_ex at a time: equal up to f32 summation order (a group
 * chooses each product's algorithm for half the GPU, which may split K otherwise: ~1e-6 of the largest
 * output for f32, one bf16 rounding for bf16 outputs), and the same bits when the group runs again. A
 * workspace shared between two streams (a split-K product's partial sums overwritten by another's) or a
 * product run before the caller's stream had written its operand (the memset queued just before) gives
 * errors of the outputs' own size.
 * The shapes are the MoE's per-expert products at a smaller width, with uneven row counts (one expert
 * empty); the weight gradients (TN, beta 1, small outputs with long K) are the ones cuBLASLt splits. */
Test(cuda_backend, gemm_group_matches_gemm_ex) {
    th_need_gpu();
    enum { E = 8, H = 256, F2 = 512 };
    static const int rows[E] = {700, 1300, 0, 257, 2049, 999, 31, 1500};
    int off[E + 1] = {0};
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + rows[e];
    const int R = off[E];
    pool P = pool_new((int64_t)R * (F2 + H) + (int64_t)E * F2 * H + 1024, 5); /* f covers the outputs' start */
    const char *x = P.d16;                                      /* (R, H) or (R, F2) rows, bf16 */
    const char *w = (const char *)P.d16 + (size_t)R * F2 * 2; /* (E, F2, H) weights, bf16 */
    /* Outputs: NT (R, F2) bf16, NN (R, H) f32, TN (E, F2, H) f32 from a nonzero start (beta 1). */
    const size_t n_nt = (size_t)R * F2 * 2, n_nn = (size_t)R * H * 4, n_tn = (size_t)E * F2 * H * 4;
    const size_t bytes = n_nt + n_nn + n_tn;
    char *out[3], *host[3];
    for (int v = 0; v < 3; v++) {
        out[v] = m1c_dev_alloc(GPU, bytes);
        host[v] = malloc(bytes);
        cr_assert(out[v] && host[v]);
        m1c_dev_copy(GPU, out[v], M1C_DEVICE_CPU, P.f, bytes); /* the same start for both */
    }
    for (int v = 0; v < 3; v++) { /* v 0 and 2: one group per kind of product; v 1: gemm_ex one by one */
        m1c_gemm_desc g[3 * E];
        int n = 0;
        char *nt = out[v], *nn = out[v] + n_nt, *tn = out[v] + n_nt + n_nn;
        for (int e = 0; e < E; e++) {
            const int o = off[e], ne = rows[e];
            g[n++] = (m1c_gemm_desc){0, 1, ne, F2, H, 1.0f, 0.0f, x + (size_t)o * H * 2, w + (size_t)e * F2 * H * 2,
                                     nt + (size_t)o * F2 * 2, BF16, BF16, BF16, H, H, F2, 1, 0, 0, 0, {0, 0}};
            g[n++] = (m1c_gemm_desc){0, 0, ne, H, F2, 1.0f, 0.0f, x + (size_t)o * F2 * 2, w + (size_t)e * F2 * H * 2,
                                     nn + (size_t)o * H * 4, BF16, BF16, F32, F2, H, H, 1, 0, 0, 0, {0, 0}};
            g[n++] = (m1c_gemm_desc){1, 0, F2, H, ne, 1.0f, 1.0f, x + (size_t)o * F2 * 2, x + (size_t)o * H * 2,
                                     tn + (size_t)e * F2 * H * 4, BF16, BF16, F32, F2, H, H, 1, 0, 0, 0, {0, 0}};
        }
        int bad = -1;
        /* Zero experts 4 and 5's rows on the core's stream, queued just before the products: a group that
         * did not wait for the caller's stream would read some of them before they are zero. */
        m1c_dev_memset0(GPU, (void *)(x + (size_t)off[4] * F2 * 2), (size_t)(off[6] - off[4]) * F2 * 2);
        void *st = m1c_dev_stream(GPU);
        if (v != 1) {
            for (int kind = 0; kind < 3; kind++) {
                m1c_gemm_desc k[E];
                for (int e = 0; e < E; e++) k[e] = g[3 * e + kind];
                cr_assert_eq(m1c_gemm_group(GPU, st, k, E, &bad), M1C_OK);
            }
        } else {
            for (int i = 0; i < n; i++) cr_assert_eq(m1c_gemm_group(GPU, st, &g[i], 1, &bad), M1C_OK);
        }
        m1c_dev_copy(M1C_DEVICE_CPU, host[v], GPU, out[v], bytes);
    }
    char err[256];
    cr_assert_not(m1c_dev_take_error(GPU, err, sizeof err), "%s", err);
    const char *name[3] = {"NT bf16 outputs", "NN f32 outputs", "TN f32 weight gradients"};
    const size_t at[4] = {0, n_nt, n_nt + n_nn, bytes};
    for (int kind = 0; kind < 3; kind++) {
        cr_expect_eq(memcmp(host[0] + at[kind], host[2] + at[kind], at[kind + 1] - at[kind]), 0,
                     "%s: gemm_group gives other bits when run again", name[kind]);
        const int dt = kind == 0 ? BF16 : F32;
        const size_t n = (at[kind + 1] - at[kind]) / (dt == F32 ? 4 : 2);
        double diff = 0, big = 0;
        for (size_t i = 0; i < n; i++) {
            const double a = cval(host[0] + at[kind], dt, (int64_t)i), b = cval(host[1] + at[kind], dt, (int64_t)i);
            diff = fmax(diff, fabs(a - b)), big = fmax(big, fabs(b));
        }
        const double tol = dt == F32 ? 1e-5 : 1.0 / 128; /* summation order; one bf16 rounding */
        cr_expect_leq(diff, tol * big, "%s: gemm_group differs from gemm_ex one at a time by %g (largest %g)",
                      name[kind], diff, big);
    }
    /* The TN outputs started from P.f: beta 1 added to it, so they changed where an expert has rows. */
    cr_expect_neq(memcmp(host[0] + n_nt + n_nn, (const char *)P.f + n_nt + n_nn, 64), 0, "the first weight gradient was not written");
    for (int v = 0; v < 3; v++) m1c_dev_free(GPU, out[v]), free(host[v]);
    pool_free(&P);
}

/* A product whose dtypes the device cannot combine refuses the whole group, naming its index. */
Test(cuda_backend, gemm_group_refuses_dtypes) {
    float a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1}, c[4] = {0}, d[4] = {0};
    m1c_gemm_desc g[2] = {{0, 0, 2, 2, 2, 1.0f, 0.0f, a, b, c, F32, F32, F32, 2, 2, 2, 1, 0, 0, 0, {0, 0}},
                          {0, 0, 2, 2, 2, 1.0f, 0.0f, a, b, d, BF16, F32, F32, 2, 2, 2, 1, 0, 0, 0, {0, 0}}};
    int bad = -1;
    cr_assert_eq(m1c_gemm_group(M1C_DEVICE_CPU, NULL, g, 2, &bad), M1C_ERR);
    cr_expect_eq(bad, 1);
    cr_expect_eq(c[0], 0.0f, "nothing runs when a product is refused");
    cr_assert_eq(m1c_gemm_group(M1C_DEVICE_CPU, NULL, g, 1, &bad), M1C_OK);
    cr_expect(c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4, "the CPU runs a group as gemm_ex calls");
}
