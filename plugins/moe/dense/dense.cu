/* dense on CUDA: out = Down(silu(Gate x) * (Up x)) as in dense.c, for compute dtypes F32 and BF16 (GEMM
 * operands and the saved gate/up and SwiGLU activations in bf16, accumulation and gradients in f32). */
#include <stdint.h>

#include "../dense_cuda.cuh"
#include "../moe_cuda.cuh"

#define GEMM(...)                                                                          \
    do {                                                                                   \
        if (h->gemm_ex(h, M1C_DEVICE_CUDA, a->stream, __VA_ARGS__) != M1C_OK) return M1C_ERR; \
    } while (0)

/* The f32 input as a GEMM operand of type T: itself for f32, a bf16 copy in `lp` for bf16. */
template <typename T>
static int as_operand(const dense_cuda_args *a, const float *x, void *lp, const T **out) {
    const m1c_host *h = a->h;
    if (sizeof(T) == sizeof(float)) {
        *out = (const T *)(const void *)x;
        return M1C_OK;
    }
    if (!lp) return h->error(h, "dense: BF16 needs the bf16 operand scratch buffers");
    const int64_t n = (int64_t)a->N * a->H;
    vec_to_bf16((__nv_bfloat16 *)lp, x, n, (cudaStream_t)a->stream);
    MOE_LAUNCH_CHECK(h, "vec_to_bf16");
    *out = (const T *)lp;
    return M1C_OK;
}

template <typename T>
static int forward_impl(const dense_cuda_args *a, float *out, const float *in) {
    const m1c_host *h = a->h;
    const int N = a->N, H = a->H, F = a->F, cdt = a->cdt;
    const T *x = NULL;
    if (as_operand<T>(a, in, a->x_lp, &x) != M1C_OK) return M1C_ERR;
    T *GU = (T *)a->gu, *act = (T *)a->act;
    GEMM(0, 1, N, F, H, 1.0f, x, cdt, H, 0, a->Wg, cdt, H, 0, 0.0f, GU, cdt, 2 * F, 0, 1);
    GEMM(0, 1, N, F, H, 1.0f, x, cdt, H, 0, a->Wu, cdt, H, 0, 0.0f, GU + F, cdt, 2 * F, 0, 1);
    moe_swiglu_fwd_kernel<T><<<moe_blocks((int64_t)N * F), MOE_THREADS, 0, (cudaStream_t)a->stream>>>(act, GU, N, F);
    MOE_LAUNCH_CHECK(h, "moe_swiglu_fwd_kernel");
    GEMM(0, 1, N, H, F, 1.0f, act, cdt, F, 0, a->Wd, cdt, F, 0, 0.0f, out, M1C_F32, H, 0, 1);
    return M1C_OK;
}

template <typename T>
static int backward_impl(const dense_cuda_args *a, float *din, const float *dout, const float *in) {
    const m1c_host *h = a->h;
    const int N = a->N, H = a->H, F = a->F, cdt = a->cdt;
    const T *x = NULL, *g = NULL;
    if (as_operand<T>(a, in, a->x_lp, &x) != M1C_OK || as_operand<T>(a, dout, a->dout_lp, &g) != M1C_OK)
        return M1C_ERR;
    const T *GU = (const T *)a->gu, *act = (const T *)a->act;
    T *dgu = (T *)a->dgu;
    GEMM(1, 0, H, F, N, 1.0f, g, cdt, H, 0, act, cdt, F, 0, 1.0f, a->dWd, M1C_F32, F, 0, 1);     /* dWd += dout^T A */
    GEMM(0, 0, N, F, H, 1.0f, g, cdt, H, 0, a->Wd, cdt, F, 0, 0.0f, a->dact, M1C_F32, F, 0, 1); /* dA = dout Wd */
    moe_swiglu_bwd_kernel<T><<<moe_blocks((int64_t)N * F), MOE_THREADS, 0, (cudaStream_t)a->stream>>>(dgu, a->dact, GU,
                                                                                                       N, F);
    MOE_LAUNCH_CHECK(h, "moe_swiglu_bwd_kernel");
    GEMM(1, 0, F, H, N, 1.0f, dgu, cdt, 2 * F, 0, x, cdt, H, 0, 1.0f, a->dWg, M1C_F32, H, 0, 1);
    GEMM(1, 0, F, H, N, 1.0f, dgu + F, cdt, 2 * F, 0, x, cdt, H, 0, 1.0f, a->dWu, M1C_F32, H, 0, 1);
    GEMM(0, 0, N, H, F, 1.0f, dgu, cdt, 2 * F, 0, a->Wg, cdt, H, 0, 1.0f, din, M1C_F32, H, 0, 1);
    GEMM(0, 0, N, H, F, 1.0f, dgu + F, cdt, 2 * F, 0, a->Wu, cdt, H, 0, 1.0f, din, M1C_F32, H, 0, 1);
    return M1C_OK;
}

extern "C" int dense_cuda_forward(const dense_cuda_args *a, float *out, const float *in) {
    if (a->N <= 0) return M1C_OK;
    return a->cdt == M1C_BF16 ? forward_impl<__nv_bfloat16>(a, out, in) : forward_impl<float>(a, out, in);
}

extern "C" int dense_cuda_backward(const dense_cuda_args *a, float *din, const float *dout, const float *in) {
    if (a->N <= 0) return M1C_OK;
    return a->cdt == M1C_BF16 ? backward_impl<__nv_bfloat16>(a, din, dout, in) : backward_impl<float>(a, din, dout, in);
}
