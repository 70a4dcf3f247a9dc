/* The interface between topk.c (settings, buffer declarations, the CPU reference) and topk.cu (the CUDA
 * forward, backward and statistics): C-compatible, included by both. */
#ifndef M1C_MOE_TOPK_CUDA_CUH
#define M1C_MOE_TOPK_CUDA_CUH

#include <stdint.h>

#include "m1c/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A_STATS layout (f32): aux loss as hi + lo (double precision in two floats, so that finite
 * differences of the aux loss stay meaningful), N of the forward, jitter applied (0/1), f[E], P[E]. */
enum { ST_AUX, ST_AUX_LO, ST_N, ST_JIT, ST_F };
/* A_COUNTS layout (i32): dropped, assignments (N*k), routed per expert [E], then [E] scratch per
 * expert (the CPU's sort cursor; the GPU's kept count). */
enum { C_DROPPED, C_ASSIGN, C_ROUTED };
/* The most experts the CUDA path takes: its per-expert shared-memory tables (ranking, aux partial sums,
 * the router's input gradient) fit the default 48 KiB up to here. */
enum { TOPK_CUDA_MAX_E = 512 };

/* One call's sizes, settings and device pointers, gathered by topk.c from the layer buffers. cdt is
 * the compute dtype (M1C_F32 or M1C_BF16): the dtype of the expert weights Wgu/Wd handed here (params
 * or params_lp), of the saved expert activations xs, gu, act, Y, of the GEMM operands dgu, dy_lp and of
 * the GEMM outputs dact and d x rows (topk.cu's header says why Y, dact and the d x rows follow it). */
typedef struct topk_cuda_args {
    const m1c_host *h;
    void *stream; /* cudaStream_t */
    int N, H, E, k, F, cdt, normalize, training;
    int grouped;  /* expert_gemm = "grouped": BF16 expert GEMMs in the grouped kernel (F32 ignores it) */
    void *xw_enc; /* expert_gemm = "auto" on an sm_90a device: the TMA map encoder of the Hopper kernels
                   * (expert_wg.cuh), else NULL */
    int xw_grid;  /* with xw_enc: the persistent grid of the Hopper kernels (blocks) */
    int *xw_ctr;  /* with xw_enc: their tile counter (2 ints of device memory, zero between launches) */
    int64_t cap; /* per-expert capacity, INT64_MAX for none */
    double aux_coef, jitter, aux_scale;
    uint64_t noise_seed;
    const float *Wr;        /* (E, H) router, f32 always */
    const void *Wgu, *Wd;   /* (E, 2F, H), (E, H, F) in cdt */
    float *dWr, *dWgu, *dWd; /* f32 gradients (backward) */
    int dWgu_unset, dWd_unset; /* backward: that gradient holds no values yet (M1C_TENSOR_UNSET): write it */
    /* acts */
    float *probs;  /* (N, E) */
    int32_t *idx;  /* (N, k) */
    float *w;      /* (N, k) */
    int32_t *pos;  /* (N, k) */
    int32_t *rowtok; /* (N*k) */
    int32_t *off;  /* (E+1) */
    int32_t *cnt;  /* (2+2E) */
    float *st;     /* (ST_F+2E) */
    void *xs, *gu, *act; /* (N*k, H), (N*k, 2F), (N*k, F) in cdt */
    void *Y;       /* (N*k, H) expert outputs, unweighted, in cdt */
    float *noise;  /* (N, H) or NULL without jitter */
    const void *in_lp; /* (N, H) bf16: the core's copy of the input (m1c_layer_bufs.in_lp), or NULL */
    const float *in_proj; /* forward: (N, E) in Wr^T from the core's norm (m1c_layer_bufs.in_proj), or NULL */
    m1c_out_rows *out_rows; /* forward: where to hand the output as rows (m1c_layer_bufs.out_rows), or NULL */
    /* scratch */
    void *dgu;     /* (N*k, 2F) cdt */
    float *drow;   /* (N*k, H) f32 scratch: the forward's aux partial sums (doubles); in backward, F32's d
                    * expert out, then d x rows; then the router's dWr partial sums */
    float *dlog;   /* (N, E) */
    float *dw;     /* (N, k) */
    float *xr;     /* (N, H) router input (jittered), forward only */
    void *dact;    /* (N*k, F) d SwiGLU output, in cdt */
    void *dy_lp;   /* (N*k, H) cdt (BF16 only; NULL for F32): d expert out, then d x rows */
    int32_t *h_off; /* host (E+1), pinned (topk_cuda_host_tables): offsets copied from the device */
    int32_t *h_cnt; /* host (2+2E), pinned */
    float *h_st;    /* host (ST_F+2E), pinned: the stats of the last forward */
    void *copied;   /* the forward's copies of the offsets, counts and stats: their stream and events (topk.cu) */
    m1c_gemm_desc *queue; /* host (2E): the per-expert products of one gemm_group call */
    const void **h_src; /* the device offsets h_off and h_cnt were copied from (this layer's forward), or
                         * NULL: the backward of the same run reuses them instead of waiting for a copy */
} topk_cuda_args;

/* Once per layer at creation, for expert_gemm = "grouped": lets the grouped GEMM kernels use their
 * dynamic shared memory (above 48 KB needs the opt-in), so that launches need no attribute call. */
int topk_cuda_setup_grouped(const m1c_host *h);
/* Once per layer at creation, for expert_gemm = "auto": on an sm_90a device the map encoder, the grid and
 * the tile counter (device memory: topk_cuda_free_xw) of the Hopper kernels (expert_wg.cuh) into *xw_enc,
 * *xw_grid and *xw_ctr; elsewhere NULL, 0 and NULL. M1C_ERR with the error set. */
int topk_cuda_setup_xw(const m1c_host *h, void **xw_enc, int *xw_grid, int **xw_ctr);
void topk_cuda_free_xw(int *xw_ctr);
/* Once per layer at creation: pinned host memory for the offsets, counts and stats ((E+1) + (2+2E)
 * int32, then ST_F+2E floats; pinned, so that their copy runs while the GPU goes on) and the stream and
 * events of the copy. M1C_ERR with the error set. */
int topk_cuda_host_tables(const m1c_host *h, int E, int32_t **tables, void **copied);
void topk_cuda_host_tables_free(int32_t *tables, void *copied);
int topk_cuda_forward(const topk_cuda_args *a, float *out, const float *in);
int topk_cuda_backward(const topk_cuda_args *a, float *din, const float *dout, const float *in);
/* Waits for the last forward's copies to the host (stats). */
int topk_cuda_wait(const m1c_host *h, void *copied);

#ifdef __cplusplus
}
#endif
#endif
