/* AdamW on a CUDA device: the CPU plugin's arithmetic (adamw.c) in one fused multi-tensor launch per step
 * (up to ADAMW_TPL tensors) that also writes the bf16 parameter copies. adamw.c validates the tensors and
 * computes the scalars. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "m1c/plugin.h"

/* The step is bound by memory traffic (~30 bytes per parameter), so the kernel is built to keep many
 * bytes in flight: each thread loads ADAMW_UNROLL float4s of each of p, g, m and v before computing,
 * and a grid sized to fill the GPU walks the tiles of all tensors of the launch. */
#define ADAMW_THREADS 256
#define ADAMW_UNROLL 2
/* Elements per tile: every thread takes ADAMW_UNROLL groups of 4. */
#define ADAMW_TILE (ADAMW_THREADS * 4 * ADAMW_UNROLL)

/* Tensors per launch: the table travels as a kernel argument (no device memory, no copy, no sync).
 * Since CUDA 12.1 kernel arguments may take 32764 bytes (Volta and later, driver r530+): 480 entries
 * of 64 bytes cover the models m1c builds (a few hundred tensors) in one launch; the limit was 4 KiB
 * before. Beyond that, one launch per ADAMW_TPL tensors. */
#if CUDART_VERSION >= 12010
#define ADAMW_TPL 480
#define ADAMW_PARAM_MAX 32764
#else
#define ADAMW_TPL 48
#define ADAMW_PARAM_MAX 4096
#endif

typedef struct adamw_entry {
    float *p;
    const float *g;
    float *m, *v;
    __nv_bfloat16 *lp; /* or NULL */
    int64_t n;
    int64_t tile0; /* first tile of this tensor in the launch */
    float keep;    /* 1 - lr*wd, or 1 */
    int vec;       /* p, g, m, v 16-byte and lp 8-byte aligned: full tiles take the float4 path */
} adamw_entry;

typedef struct adamw_table {
    int n;
    int64_t tiles; /* over all entries */
    float step_size, bc2_sqrt, b2, eps, w1, w2;
    adamw_entry t[ADAMW_TPL];
} adamw_table;

static_assert(sizeof(adamw_table) <= ADAMW_PARAM_MAX, "the adamw table must fit the kernel argument limit");

/* The CPU's formula with every operation rounded on its own (__fmul_rn, __fadd_rn, __fdiv_rn and
 * __fsqrt_rn are never contracted into FMAs), so a GPU step gives the same bits as a CPU step. Both
 * paths of the kernel go through this one function, so they cannot drift apart. */
__device__ __forceinline__ static void adamw_elem(float &p, float g, float &m, float &v, float keep,
                                                  const adamw_table &tab) {
    float pj = __fmul_rn(p, keep);                                       /* decay first */
    const float mj = __fadd_rn(m, __fmul_rn(tab.w1, __fsub_rn(g, m))); /* lerp */
    const float vj = __fadd_rn(__fmul_rn(v, tab.b2), __fmul_rn(__fmul_rn(tab.w2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), tab.bc2_sqrt), tab.eps);
    pj = __fsub_rn(pj, __fmul_rn(tab.step_size, __fdiv_rn(mj, denom)));
    p = pj;
    m = mj;
    v = vj;
}

__device__ __forceinline__ static unsigned bf16_bits(float x) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(x));
}

/* Tiles are numbered over the tensors of the table in order (each tensor's last tile may be partial);
 * block b takes tiles b, b + gridDim.x, ... A full tile of an aligned tensor is done with 16-byte
 * loads and stores (8 for the bf16 copy), all loads issued before any arithmetic; a partial tile (the
 * tail of a tensor, or a tensor smaller than a tile) or a misaligned tensor element by element. Every
 * element is read and written once by one thread, so the result does not depend on the grid. The
 * data are touched once per step (6.7 GB for 222M parameters, far more than L2): streaming accesses. */
__global__ static void __launch_bounds__(ADAMW_THREADS) adamw_k(const __grid_constant__ adamw_table tab) {
    int ti = 0; /* this block's tiles ascend: the tensor index only moves forward */
    for (int64_t tile = blockIdx.x; tile < tab.tiles; tile += gridDim.x) {
        while (ti + 1 < tab.n && tab.t[ti + 1].tile0 <= tile) ti++;
        const adamw_entry &e = tab.t[ti];
        const int64_t j0 = (tile - e.tile0) * ADAMW_TILE;
        if (e.vec && j0 + ADAMW_TILE <= e.n) {
            const int64_t q0 = j0 / 4 + threadIdx.x; /* float4 index of this thread's first group */
            float4 p[ADAMW_UNROLL], g[ADAMW_UNROLL], m[ADAMW_UNROLL], v[ADAMW_UNROLL];
#pragma unroll
            for (int u = 0; u < ADAMW_UNROLL; u++) {
                const int64_t q = q0 + u * ADAMW_THREADS;
                p[u] = __ldcs((const float4 *)e.p + q);
                g[u] = __ldcs((const float4 *)e.g + q);
                m[u] = __ldcs((const float4 *)e.m + q);
                v[u] = __ldcs((const float4 *)e.v + q);
            }
#pragma unroll
            for (int u = 0; u < ADAMW_UNROLL; u++) {
                adamw_elem(p[u].x, g[u].x, m[u].x, v[u].x, e.keep, tab);
                adamw_elem(p[u].y, g[u].y, m[u].y, v[u].y, e.keep, tab);
                adamw_elem(p[u].z, g[u].z, m[u].z, v[u].z, e.keep, tab);
                adamw_elem(p[u].w, g[u].w, m[u].w, v[u].w, e.keep, tab);
                const int64_t q = q0 + u * ADAMW_THREADS;
                __stcs((float4 *)e.p + q, p[u]);
                __stcs((float4 *)e.m + q, m[u]);
                __stcs((float4 *)e.v + q, v[u]);
                if (e.lp) {
                    /* Little-endian: the element at the lower address in the low half. */
                    const uint2 b = make_uint2(bf16_bits(p[u].x) | bf16_bits(p[u].y) << 16,
                                               bf16_bits(p[u].z) | bf16_bits(p[u].w) << 16);
                    __stcs((uint2 *)e.lp + q, b);
                }
            }
        } else {
            const int64_t j1 = j0 + ADAMW_TILE < e.n ? j0 + ADAMW_TILE : e.n;
            for (int64_t j = j0 + threadIdx.x; j < j1; j += ADAMW_THREADS) {
                float pj = e.p[j], mj = e.m[j], vj = e.v[j];
                adamw_elem(pj, e.g[j], mj, vj, e.keep, tab);
                e.m[j] = mj;
                e.v[j] = vj;
                e.p[j] = pj;
                if (e.lp) e.lp[j] = __float2bfloat16_rn(pj);
            }
        }
    }
}

/* Launch the filled part of the table on a grid that fills the device (fewer blocks than tiles for
 * any sizeable model); returns cudaSuccess or the CUDA error. */
static cudaError_t flush(adamw_table *tab, int grid_max, cudaStream_t stream) {
    if (tab->n == 0 || tab->tiles == 0) return cudaSuccess;
    const int grid = tab->tiles < grid_max ? (int)tab->tiles : grid_max;
    adamw_k<<<grid, ADAMW_THREADS, 0, stream>>>(*tab);
    return cudaGetLastError();
}

static int aligned(const void *p, uintptr_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* Declared in adamw.c, which has checked every tensor (CUDA, f32 or bf16 for params_lp, sizes) and
 * computed the scalars exactly as its CPU path does. keep_decay is 1 - lr*wd rounded to f32 (1 without
 * weight decay), applied to tensors without no_decay. Launches on a->stream; asynchronous. Returns 0,
 * or -1 with a message in err. */
extern "C" int adamw_cuda_step(const m1c_optim_step *a, int n_state, float keep_decay, float step_size,
                               float bc2_sqrt, float b2, float eps, float w1, float w2, char *err, size_t err_len) {
    /* The grid: as many blocks as the device keeps resident at once. The runtime caches both answers,
     * so asking every step costs no device round trip and follows a change of current device. */
    int dev = 0, sms = 0, per_sm = 0;
    cudaError_t ce = cudaGetDevice(&dev);
    if (ce == cudaSuccess) ce = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (ce == cudaSuccess) ce = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adamw_k, ADAMW_THREADS, 0);
    if (ce != cudaSuccess) {
        snprintf(err, err_len, "adamw: querying the CUDA device for the grid size: %s", cudaGetErrorString(ce));
        return -1;
    }
    /* In the background one block per tile (about 60 KB of traffic, a few microseconds): the GPU places
     * them wherever the work beside them leaves room, and none holds a multiprocessor for long. */
    const int grid_max = a->flags & M1C_OPTIM_BACKGROUND ? 1 << 30 : (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);

    adamw_table tab;
    tab.n = 0;
    tab.tiles = 0;
    tab.step_size = step_size;
    tab.bc2_sqrt = bc2_sqrt;
    tab.b2 = b2;
    tab.eps = eps;
    tab.w1 = w1;
    tab.w2 = w2;
    cudaStream_t stream = (cudaStream_t)a->stream;
    for (int i = 0; i < a->n; i++) {
        const int64_t n = m1c_tensor_numel(&a->params[i]);
        if (n <= 0) continue;
        if (tab.n == ADAMW_TPL) {
            ce = flush(&tab, grid_max, stream);
            if (ce != cudaSuccess) {
                snprintf(err, err_len, "adamw CUDA kernel launch: %s", cudaGetErrorString(ce));
                return -1;
            }
            tab.n = 0, tab.tiles = 0;
        }
        adamw_entry *t = &tab.t[tab.n++];
        t->p = (float *)a->params[i].data;
        t->g = (const float *)a->grads[i].data;
        t->m = (float *)a->state[i * n_state + 0].data;
        t->v = (float *)a->state[i * n_state + 1].data;
        t->lp = a->params_lp ? (__nv_bfloat16 *)a->params_lp[i].data : NULL;
        t->n = n;
        t->tile0 = tab.tiles;
        t->keep = a->no_decay && a->no_decay[i] ? 1.0f : keep_decay;
        /* The core's arenas place every tensor 256-byte aligned; a caller's views may not be. */
        t->vec = aligned(t->p, 16) && aligned(t->g, 16) && aligned(t->m, 16) && aligned(t->v, 16) &&
                 (!t->lp || aligned(t->lp, 8));
        tab.tiles += (n + ADAMW_TILE - 1) / ADAMW_TILE;
    }
    ce = flush(&tab, grid_max, stream);
    if (ce != cudaSuccess) {
        snprintf(err, err_len, "adamw CUDA kernel launch: %s", cudaGetErrorString(ce));
        return -1;
    }
    return 0;
}
