/* AdamW on a CUDA device: the CPU plugin's arithmetic (adamw.c) in fused multi-tensor launches that
 * also write the bf16 parameter copies. adamw.c validates the tensors and computes the scalars. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "m1c/plugin.h"

/* Tensors per launch: the table travels as a kernel argument (no device memory, no copy, no sync),
 * and kernel arguments are limited to 4 KiB: 64 entries of 56 bytes plus the scalars fit. */
#define ADAMW_TPL 64
/* Elements per block: 256 threads, 8 elements each, so small tensors take one block and the launch
 * has enough blocks to fill the GPU for big ones. */
#define ADAMW_THREADS 256
#define ADAMW_CHUNK (ADAMW_THREADS * 8)
/* Blocks per launch are counted in int: stay well below INT_MAX. */
#define ADAMW_MAX_BLOCKS (1 << 30)

typedef struct adamw_entry {
    float *p;
    const float *g;
    float *m, *v;
    __nv_bfloat16 *lp; /* or NULL */
    int64_t n;
    int block0; /* first block of this tensor in the launch */
    float keep; /* 1 - lr*wd, or 1 */
} adamw_entry;

typedef struct adamw_table {
    adamw_entry t[ADAMW_TPL];
    int n;
    float step_size, bc2_sqrt, b2, eps, w1, w2;
} adamw_table;

/* The CPU's formula with every operation rounded on its own (__fmul_rn, __fadd_rn, __fdiv_rn and
 * __fsqrt_rn are never contracted into FMAs), so a GPU step gives the same bits as a CPU step. */
__global__ static void adamw_k(const adamw_table tab) {
    /* The tensor this block works on: the last entry whose first block is <= blockIdx.x. */
    int lo = 0, hi = tab.n - 1;
    const int b = (int)blockIdx.x;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (tab.t[mid].block0 <= b) lo = mid;
        else hi = mid - 1;
    }
    const adamw_entry e = tab.t[lo];
    const int64_t j0 = (int64_t)(b - e.block0) * ADAMW_CHUNK;
    const int64_t j1 = j0 + ADAMW_CHUNK < e.n ? j0 + ADAMW_CHUNK : e.n;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        const float gj = e.g[j], mj0 = e.m[j], vj0 = e.v[j];
        float pj = __fmul_rn(e.p[j], e.keep);                                       /* decay first */
        const float mj = __fadd_rn(mj0, __fmul_rn(tab.w1, __fsub_rn(gj, mj0)));     /* lerp */
        const float vj = __fadd_rn(__fmul_rn(vj0, tab.b2), __fmul_rn(__fmul_rn(tab.w2, gj), gj));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), tab.bc2_sqrt), tab.eps);
        pj = __fsub_rn(pj, __fmul_rn(tab.step_size, __fdiv_rn(mj, denom)));
        e.m[j] = mj;
        e.v[j] = vj;
        e.p[j] = pj;
        if (e.lp) e.lp[j] = __float2bfloat16_rn(pj);
    }
}

/* Launch the filled part of the table; returns 0 or the CUDA error. */
static cudaError_t flush(adamw_table *tab, int blocks, cudaStream_t stream) {
    if (tab->n == 0 || blocks == 0) return cudaSuccess;
    adamw_k<<<blocks, ADAMW_THREADS, 0, stream>>>(*tab);
    return cudaGetLastError();
}

/* Declared in adamw.c, which has checked every tensor (CUDA, f32 or bf16 for params_lp, sizes) and
 * computed the scalars exactly as its CPU path does. keep_decay is 1 - lr*wd rounded to f32 (1 without
 * weight decay), applied to tensors without no_decay. Launches on a->stream; asynchronous. Returns 0,
 * or -1 with a message in err. */
extern "C" int adamw_cuda_step(const m1c_optim_step *a, int n_state, float keep_decay, float step_size,
                               float bc2_sqrt, float b2, float eps, float w1, float w2, char *err, size_t err_len) {
    adamw_table tab;
    tab.n = 0;
    tab.step_size = step_size;
    tab.bc2_sqrt = bc2_sqrt;
    tab.b2 = b2;
    tab.eps = eps;
    tab.w1 = w1;
    tab.w2 = w2;
    cudaStream_t stream = (cudaStream_t)a->stream;
    int blocks = 0;
    for (int i = 0; i < a->n; i++) {
        const int64_t n = m1c_tensor_numel(&a->params[i]);
        if (n <= 0) continue;
        const int64_t nb = (n + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
        if (nb > ADAMW_MAX_BLOCKS) {
            snprintf(err, err_len, "parameter %d (%s) has %lld elements: more than the CUDA kernel handles", i,
                     a->params[i].name ? a->params[i].name : "(unnamed)", (long long)n);
            return -1;
        }
        if (tab.n == ADAMW_TPL || blocks + nb > ADAMW_MAX_BLOCKS) {
            cudaError_t e = flush(&tab, blocks, stream);
            if (e != cudaSuccess) {
                snprintf(err, err_len, "adamw CUDA kernel launch: %s", cudaGetErrorString(e));
                return -1;
            }
            tab.n = 0, blocks = 0;
        }
        adamw_entry *t = &tab.t[tab.n++];
        t->p = (float *)a->params[i].data;
        t->g = (const float *)a->grads[i].data;
        t->m = (float *)a->state[i * n_state + 0].data;
        t->v = (float *)a->state[i * n_state + 1].data;
        t->lp = a->params_lp ? (__nv_bfloat16 *)a->params_lp[i].data : NULL;
        t->n = n;
        t->block0 = blocks;
        t->keep = a->no_decay && a->no_decay[i] ? 1.0f : keep_decay;
        blocks += (int)nb;
    }
    cudaError_t e = flush(&tab, blocks, stream);
    if (e != cudaSuccess) {
        snprintf(err, err_len, "adamw CUDA kernel launch: %s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}
