/* The interface between dense.c (settings, buffer declarations, the CPU reference) and dense.cu (the
 * CUDA forward and backward): C-compatible, included by both. */
#ifndef M1C_MOE_DENSE_CUDA_CUH
#define M1C_MOE_DENSE_CUDA_CUH

#include "m1c/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One call's sizes and device pointers. cdt (M1C_F32 or M1C_BF16) is the dtype of Wg/Wu/Wd (params or
 * params_lp), of the saved gu/act and of the GEMM operands x_lp, dout_lp, dgu. */
typedef struct dense_cuda_args {
    const m1c_host *h;
    void *stream; /* cudaStream_t */
    int N, H, F, cdt;
    const void *Wg, *Wu, *Wd;   /* (F, H), (F, H), (H, F) in cdt */
    float *dWg, *dWu, *dWd;     /* f32 gradients (backward) */
    void *gu, *act;             /* acts: (N, 2F) gate | up, (N, F) in cdt */
    void *dgu;                  /* scratch: (N, 2F) cdt */
    float *dact;                /* scratch: (N, F) f32 */
    void *x_lp, *dout_lp;       /* scratch: (N, H) cdt copies of in and dout (BF16 only; NULL for F32) */
} dense_cuda_args;

int dense_cuda_forward(const dense_cuda_args *a, float *out, const float *in);
int dense_cuda_backward(const dense_cuda_args *a, float *din, const float *dout, const float *in);

#ifdef __cplusplus
}
#endif
#endif
