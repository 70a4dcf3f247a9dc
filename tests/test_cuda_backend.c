/* The CUDA device services against the CPU: allocation, copies and cuBLAS GEMM (every transpose
 * combination, batched). Skipped where the build has no CUDA or the machine has no GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#include "../core/host.h"
#include "harness.h"

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
