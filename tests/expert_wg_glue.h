/* The C API of tests/expert_wg_glue.cu, which runs topk's Hopper expert products (plugins/moe/topk/
 * expert_wg.cuh) on host arrays of bf16 bits for tests/test_expert_wg_cuda.c. */
#ifndef M1C_EXPERT_WG_GLUE_H
#define M1C_EXPERT_WG_GLUE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 where this build has the kernels (an sm_90a target) and the current device runs them (compute
 * capability 9.0); the test requires them there, so that it cannot skip on a Hopper GPU. */
int xwt_expected(void);
/* 1 where the kernels can run now (xwt_expected and the driver's tensor-map encoder found). */
int xwt_available(void);
/* The forward: C (rows x ldc, bf16 bits, read and written back whole) = A W_e^T over the expert row ranges
 * off[0..E] (host), A (rows x K), W (E x N x K), all bf16 bits, on `grid` blocks (0: one per SM, as topk
 * runs it; fewer make each block take several tiles). 0 on success, else 1 with err set. */
int xwt_forward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
                int ldc, int grid, char *err, size_t errlen);
/* The same with the SwiGLU (N = 2F, F a multiple of 128): act (rows x F, bf16 bits, read and written back
 * whole) = silu(gate) up of C's rounded columns. */
int xwt_forward_glu(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W,
                    uint16_t *C, int ldc, uint16_t *act, int grid, char *err, size_t errlen);
/* The backward's pair, `reps` times on the same buffers and tile counter: C (rows x ldc, as above) = A W_e
 * with A (rows x K), W (E x K x N); G (E x M x Ng f32, read and written back) += Ag_e^T Bg_e over each
 * expert's rows (unset: G = that, G handed over as M1C_TENSOR_UNSET), Ag (rows x M), Bg (rows x Ng); `grid`
 * blocks as above. 0 on success (the counter left at zero), else 1 with err set. */
int xwt_backward(int E, const int32_t *off, int rows, int N, int K, const uint16_t *A, const uint16_t *W, uint16_t *C,
                 int ldc, int M, int Ng, const uint16_t *Ag, const uint16_t *Bg, float *G, int reps, int grid, int unset,
                 char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
