/* CUDA versions of the core's own layers (core/ops.h): embedding, RMSNorm, the LM head with
 * log-softmax, residual arithmetic and reductions. Memory-bound work is shaped for DRAM bandwidth:
 * one warp per row for RMSNorm, one block per row for the head's log-softmax, 16-byte accesses where
 * the widths and pointers allow (a scalar path otherwise); the head's products go through cuBLAS at the
 * precision the config asks for, except a bf16 training forward on Hopper, whose product carries the
 * log-softmax's first half in its epilogue (head_wg.cuh). */
#include <cub/cub.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <m1c/cuda/pdl.cuh>
#include <m1c/cuda/rows.cuh>
#include <m1c/cuda/sums.cuh>
#include <m1c/plugin.h> /* m1c_out_rows */
#include <type_traits>

#include "backend.h"
#include "ops.h"
extern "C" {
#include "../ops.h" /* the layout of the head's q (m1c_head_q_scale_at) */
}
#include "reduce.cuh"
#include "head_wg.cuh"

/* Failures are kept for the model to report (backend.h), not fatal here. */
static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) m1c_cuda_fail(what, cudaGetErrorString(e));
}

static void check_launch(const char *what) { check(cudaGetLastError(), what); }

/* Every kernel, copy and product of the core goes to the core's stream (backend.h). */
static cudaStream_t cs(void) { return (cudaStream_t)m1c_cuda_stream(); }

/* A small result to the host, after the stream's work before it. */
static cudaError_t to_host(void *dst, const void *src, size_t bytes) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cs());
    return e != cudaSuccess ? e : cudaStreamSynchronize(cs());
}

static int grid_for(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    return (int)(g > 65535 * 8 ? 65535 * 8 : (g < 1 ? 1 : g));
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Device scratch kept for the next call, per host thread and slot: the head, the RMSNorm backward and
 * the embedding backward run at every step with the same sizes, so nothing is allocated after the first
 * step. Growing frees the old buffer (cudaFree waits for the device, so no queued kernel still uses it).
 * A slot's user may overwrite it at its next call: the core's stream orders those uses. */
enum {
    SLOT_A16,       /* head: bf16 A operand (h in the forward, dlogits in the backward) */
    SLOT_B16,       /* head: bf16 B operand (W, then h, or dlogp h, in the backward) */
    SLOT_Z,         /* head backward from q: q W (f32), before its rows are scaled into dh */
    SLOT_AH,        /* head: TF32 high part and remainder of A */
    SLOT_AL,
    SLOT_BH,        /* head: TF32 high part and remainder of B */
    SLOT_BL,
    SLOT_HEAD_PART, /* head on Hopper: per row and column tile the max and sum of exponentials, then scales */
    SLOT_RMS_PART,  /* RMSNorm backward: the weight gradient's row-chunk partial sums */
    SLOT_EMBED_IDX, /* embedding backward: keys, positions, runs */
    SLOT_EMBED_TMP, /* embedding backward: CUB's temporary storage */
    SLOT_SUMSQ,     /* m1c_cuda_sumsq's per-block partial sums */
    SLOT_NONFINITE, /* m1c_cuda_count_nonfinite's counter */
    NSLOTS
};

static void *cached(int slot, int64_t n, size_t size, const char *what) {
    static thread_local void *buf[NSLOTS];
    static thread_local int64_t cap[NSLOTS];
    if (n < 1) n = 1;
    if (n * (int64_t)size > cap[slot]) {
        cudaFree(buf[slot]);
        buf[slot] = NULL, cap[slot] = 0;
        if (cudaMalloc(&buf[slot], (size_t)n * size) != cudaSuccess) {
            (void)cudaGetLastError();
            m1c_cuda_fail(what, "out of GPU memory for its scratch");
            buf[slot] = NULL;
            return NULL; /* the caller skips its work */
        }
        cap[slot] = n * (int64_t)size;
    }
    return buf[slot];
}

/* Elements c .. c + W - 1 of p (W = 4: one 16-byte access, p 16-byte aligned and c % 4 == 0; W = 1:
 * scalar). The 16-byte accesses index a float4 array: written as a float4 store at (float *) row + c,
 * nvcc 13 emitted four scalar stores in the head's kernels (seen in the PTX). */
template <int W> __device__ static inline void ld(float *a, const float *p, int64_t c) {
    if constexpr (W == 4) {
        const float4 v = reinterpret_cast<const float4 *>(p)[c >> 2];
        a[0] = v.x, a[1] = v.y, a[2] = v.z, a[3] = v.w;
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) a[k] = p[c + k];
    }
}

template <int W> __device__ static inline void st(float *p, int64_t c, const float *a) {
    if constexpr (W == 4) {
        reinterpret_cast<float4 *>(p)[c >> 2] = make_float4(a[0], a[1], a[2], a[3]);
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) p[c + k] = a[k];
    }
}

/* The same rounded to bf16 (nearest even); W = 4: one 8-byte access, p 8-byte aligned. */
template <int W> __device__ static inline void st_bf16(__nv_bfloat16 *p, int64_t c, const float *a) {
    if constexpr (W == 4) {
        uint32_t u[4];
#pragma unroll
        for (int k = 0; k < 4; k++) u[k] = __bfloat16_as_ushort(__float2bfloat16_rn(a[k]));
        reinterpret_cast<uint2 *>(p)[c >> 2] = make_uint2(u[0] | u[1] << 16, u[2] | u[3] << 16); /* little-endian */
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) p[c + k] = __float2bfloat16_rn(a[k]);
    }
}

/* x = hi + lo with hi exact in TF32 (10-bit mantissa, rounded to nearest) and lo the f32 remainder. */
__device__ static inline void tf32_split(float x, float &hi, float &lo) {
    const uint32_t r = (__float_as_uint(x) + 0x1000u) & 0xffffe000u; /* 10 mantissa bits, ties away from 0 */
    float h = __uint_as_float(r);
    if (!isfinite(h)) h = x; /* NaN, Inf, or rounding up past FLT_MAX: no remainder */
    hi = h;
    lo = isfinite(h) ? x - h : 0.0f;
}

/* ---- embedding ---- */

__global__ static void embed_fwd(float *out, const int32_t *ids, const float *wte, int64_t N, int H) {
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *row = wte + (int64_t)ids[i] * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) out[i * H + c] = row[c];
    }
}

/* The embedding gradient in a fixed order (no float atomics: the same ids and dout give the same bits):
 * the token positions sorted by id (a stable radix sort keeps positions ascending within an id), then
 * one block per run of equal ids adds its rows in that order. */
__global__ static void embed_keys(int32_t *key, int32_t *pos, const int32_t *ids, int64_t N) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x)
        key[i] = ids[i], pos[i] = (int32_t)i;
}

/* Block b < *nruns: the run of sorted entries [start[b], start[b] + len[b]) shares the id key[start[b]]. */
__global__ static void embed_bwd(float *dwte, const float *dout, const int32_t *key, const int32_t *pos,
                                 const int32_t *start, const int32_t *len, const int32_t *nruns, int H) {
    for (int b = blockIdx.x; b < *nruns; b += gridDim.x) {
        const int32_t s0 = start[b], n = len[b];
        float *row = dwte + (int64_t)key[s0] * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float acc = 0.0f;
            for (int32_t j = 0; j < n; j++) acc += dout[(int64_t)pos[s0 + j] * H + c];
            row[c] += acc;
        }
    }
}

extern "C" void m1c_cuda_embed_forward(float *out, const int32_t *ids, const float *wte, int64_t N, int H) {
    if (N <= 0) return;
    embed_fwd<<<grid_for(N, 1), 256, 0, cs()>>>(out, ids, wte, N, H);
    check_launch("embed_forward");
}

/* The sort of the embedding backward, queued on stream st: the work array (SLOT_EMBED_IDX: keys,
 * positions in and sorted, run starts, lengths, unique ids, run count), NULL on failure (kept). */
static int32_t *embed_sort(cudaStream_t st, const int32_t *ids, int n) {
    int32_t *w = (int32_t *)cached(SLOT_EMBED_IDX, 7 * (int64_t)n + 1, sizeof(int32_t), "embedding backward");
    if (!w) return NULL;
    int32_t *key = w, *pos = w + n, *skey = w + 2 * (int64_t)n, *spos = w + 3 * (int64_t)n, *start = w + 4 * (int64_t)n;
    int32_t *len = w + 5 * (int64_t)n, *uniq = w + 6 * (int64_t)n, *nruns = w + 7 * (int64_t)n;
    embed_keys<<<grid_for(n, 256), 256, 0, st>>>(key, pos, ids, n);
    check_launch("embed_backward (keys)");
    size_t t1 = 0, t2 = 0, t3 = 0;
    check(cub::DeviceRadixSort::SortPairs(NULL, t1, key, skey, pos, spos, n, 0, 32, st), "cub sort (size)");
    check(cub::DeviceRunLengthEncode::Encode(NULL, t2, skey, uniq, len, nruns, n, st), "cub encode (size)");
    check(cub::DeviceScan::ExclusiveSum(NULL, t3, len, start, n, st), "cub scan (size)");
    const size_t tb = t1 > t2 ? (t1 > t3 ? t1 : t3) : (t2 > t3 ? t2 : t3);
    void *tmp = cached(SLOT_EMBED_TMP, (int64_t)tb, 1, "embedding backward");
    if (!tmp) return NULL;
    check(cub::DeviceRadixSort::SortPairs(tmp, t1, key, skey, pos, spos, n, 0, 32, st), "cub sort");
    check(cub::DeviceRunLengthEncode::Encode(tmp, t2, skey, uniq, len, nruns, n, st), "cub encode");
    check(cub::DeviceScan::ExclusiveSum(tmp, t3, len, start, n, st), "cub scan");
    return w;
}

/* Work a training forward queued for its backward (the embedding's sort, the head's q W), per host
 * thread: for which input (key, rows), whether still unclaimed, and the event after it where it ran on
 * another stream. */
typedef struct queued_ahead {
    const void *key;
    int64_t N;
    cudaEvent_t done;
    int valid;
} queued_ahead;
enum { AHEAD_EMBED, AHEAD_HEAD, N_AHEAD };

static queued_ahead *ahead(int which) {
    static thread_local queued_ahead a[N_AHEAD];
    return &a[which];
}

/* Whether the work queued ahead is for (key, N); either way it is claimed. */
static bool ahead_claim(queued_ahead *a, const void *key, int64_t N) {
    const bool ok = a->valid && a->key == key && a->N == N;
    a->valid = 0;
    return ok;
}

extern "C" void m1c_cuda_embed_prepare(const int32_t *ids, int64_t N) {
    queued_ahead *a = ahead(AHEAD_EMBED);
    a->valid = 0;
    cudaStream_t bg = (cudaStream_t)m1c_cuda_background_stream();
    if (N <= 0 || N > INT32_MAX || !bg) return; /* the backward sorts for itself */
    if (!a->done && cudaEventCreateWithFlags(&a->done, cudaEventDisableTiming) != cudaSuccess) {
        a->done = NULL;
        (void)cudaGetLastError(); /* not an error: the backward sorts for itself */
        return;
    }
    m1c_cuda_order(bg, cs()); /* after the ids were written */
    if (!embed_sort(bg, ids, (int)N)) return;
    check(cudaEventRecord(a->done, bg), "cudaEventRecord (embedding sort)");
    a->key = ids, a->N = N, a->valid = 1;
}

extern "C" void m1c_cuda_embed_backward(float *dwte, const float *dout, const int32_t *ids, int64_t N, int H) {
    if (N <= 0) return;
    if (N > INT32_MAX) {
        m1c_cuda_fail("embedding backward", "more than 2^31 tokens in one batch exceed its 32-bit sort");
        return;
    }
    const int n = (int)N;
    queued_ahead *a = ahead(AHEAD_EMBED);
    int32_t *w;
    if (ahead_claim(a, ids, N)) { /* sorted beside the forward */
        check(cudaStreamWaitEvent(cs(), a->done, 0), "cudaStreamWaitEvent (embedding sort)");
        w = (int32_t *)cached(SLOT_EMBED_IDX, 7 * (int64_t)n + 1, sizeof(int32_t), "embedding backward");
    } else {
        w = embed_sort(cs(), ids, n);
    }
    if (!w) return;
    const int32_t *skey = w + 2 * (int64_t)n, *spos = w + 3 * (int64_t)n, *start = w + 4 * (int64_t)n;
    const int32_t *len = w + 5 * (int64_t)n, *nruns = w + 7 * (int64_t)n;
    embed_bwd<<<grid_for(N, 1), 256, 0, cs()>>>(dwte, dout, skey, spos, start, len, nruns, H);
    check_launch("embed_backward");
}

/* ---- RMSNorm ---- */

/* The row-wise RMSNorm kernels give each row one warp (ROWS rows per block of 256 threads): C = 768 is
 * 6 16-byte loads per lane, and the row's second pass finds it in L1/L2. W = 4 when C % 4 == 0 and every
 * pointer is 16-byte aligned (then so is every row), else 1. The row kernels here load U chunks of W
 * before using any, so that enough loads are in flight to keep DRAM busy. */
enum { ROWS = 8, U = 4 };

static int rows_grid(int64_t N) { return grid_for(N, ROWS); }

/* The chunk loop of the row kernels: chunks of W columns from first on, step apart (a warp's lanes or a
 * block's threads interleaved), U of them loaded (load(u, c)) before any is used (use(u, c)). Every kernel
 * takes a row's chunks in this order, so that their sums give the same bits. */
template <int W, typename Load, typename Use>
__device__ static inline void row_chunks(int first, int step, int C, Load load, Use use) {
    for (int c0 = first; c0 < C; c0 += U * step) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + u * step < C) load(u, c0 + u * step);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c0 + u * step < C) use(u, c0 + u * step);
    }
}

/* The second pass's expression, out = x r w, shared by every forward kernel (the same bits). */
template <int W> __device__ static inline void rms_scale(float (&a)[W], float r, const float (&b)[W]) {
#pragma unroll
    for (int k = 0; k < W; k++) a[k] = a[k] * r * b[k];
}

/* The row's second pass, shared by the forward kernels: from the lane's partial sum of squares ss, the
 * row's r = 1 / rms (the butterfly leaves it on every lane; lane 0 stores it), then out = x r w, and its
 * bf16 rounding into out_lp unless that is NULL. */
template <int W>
__device__ static inline void rms_finish(float *out, __nv_bfloat16 *out_lp, float *rstd, const float *x, const float *w,
                                         float ss, int C, float eps) {
    const int lane = threadIdx.x % 32, step = 32 * W;
    ss = m1c_warp_sum(ss);
    const float r = rsqrtf(ss / (float)C + eps);
    if (lane == 0) *rstd = r;
    float a[U][W], b[U][W];
    row_chunks<W>(
        lane * W, step, C, [&](int u, int c) { ld<W>(a[u], x, c), ld<W>(b[u], w, c); },
        [&](int u, int c) {
            rms_scale<W>(a[u], r, b[u]);
            st<W>(out, c, a[u]);
            if (out_lp) st_bf16<W>(out_lp, c, a[u]);
        });
}

template <int W>
__global__ static void rmsnorm_fwd(float *out, __nv_bfloat16 *out_lp, float *rstd, const float *in, const float *w,
                                   int64_t N, int C, float eps) {
    pdl_start();
    const int lane = threadIdx.x % 32, step = 32 * W;
    for (int64_t i = (int64_t)blockIdx.x * ROWS + threadIdx.x / 32; i < N; i += (int64_t)gridDim.x * ROWS) {
        const float *x = in + i * C;
        float *y = out + i * C, ss = 0;
        float a[U][W];
        row_chunks<W>(
            lane * W, step, C, [&](int u, int c) { ld<W>(a[u], x, c); },
            [&](int u, int) {
#pragma unroll
                for (int k = 0; k < W; k++) ss += a[u][k] * a[u][k];
            });
        rms_finish<W>(y, out_lp ? out_lp + i * C : NULL, rstd + i, x, w, ss, C, eps);
    }
}

/* The backward's row reduction, shared by its kernels: sum_c g w x over the warp's row (lanes, chunks,
 * order and butterfly fixed, so every kernel gets the same bits), on every lane. */
template <int W> __device__ static inline float rms_bwd_dot(const float *x, const float *g, const float *w, int C) {
    const int lane = threadIdx.x % 32, step = 32 * W;
    float dot = 0, xa[U][W], ga[U][W], wa[U][W];
    row_chunks<W>(
        lane * W, step, C, [&](int u, int c) { ld<W>(xa[u], x, c), ld<W>(ga[u], g, c), ld<W>(wa[u], w, c); },
        [&](int u, int) {
#pragma unroll
            for (int k = 0; k < W; k++) dot += ga[u][k] * wa[u][k] * xa[u][k];
        });
    dot = m1c_warp_sum(dot);
    return dot;
}

/* din += r (g w) - x r^3 mean(g w x) per row. */
template <int W>
__global__ static void rmsnorm_bwd_in(float *din, const float *dout, const float *in, const float *w,
                                      const float *rstd, int64_t N, int C) {
    const int lane = threadIdx.x % 32, step = 32 * W;
    for (int64_t i = (int64_t)blockIdx.x * ROWS + threadIdx.x / 32; i < N; i += (int64_t)gridDim.x * ROWS) {
        const float *x = in + i * C, *g = dout + i * C;
        float *dx = din + i * C;
        const float dot = rms_bwd_dot<W>(x, g, w, C);
        const float r = rstd[i], kk = r * r * r * dot / (float)C;
        float xa[U][W], ga[U][W], wa[U][W], da[U][W];
        row_chunks<W>(
            lane * W, step, C,
            [&](int u, int c) { ld<W>(xa[u], x, c), ld<W>(ga[u], g, c), ld<W>(wa[u], w, c), ld<W>(da[u], dx, c); },
            [&](int u, int c) {
#pragma unroll
                for (int k = 0; k < W; k++) da[u][k] += r * ga[u][k] * wa[u][k] - kk * xa[u][k];
                st<W>(dx, c, da[u]);
            });
    }
}

/* dw[c] += sum_i g x r over rows, in a fixed order: block (x, y) sums 32 columns over row chunk y (8 rows
 * of threads, then those 8 partial sums in order) into part[y][c]; rmsnorm_bwd_w_sum adds the chunks in
 * order. No float atomics: the same inputs give the same bits. */
enum { RMS_CHUNKS = 128 };
__global__ static void rmsnorm_bwd_w(float *part, const float *dout, const float *in, const float *rstd, int64_t N,
                                     int C) {
    __shared__ float sh[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int64_t per = (N + gridDim.y - 1) / gridDim.y, i0 = blockIdx.y * per, i1 = i0 + per < N ? i0 + per : N;
    float s = 0;
    if (c < C)
        for (int64_t i = i0 + threadIdx.y; i < i1; i += 8) s += dout[i * C + c] * in[i * C + c] * rstd[i];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0;
        for (int k = 0; k < 8; k++) t += sh[k][threadIdx.x];
        part[(int64_t)blockIdx.y * C + c] = t;
    }
}

__global__ static void rmsnorm_bwd_w_sum(float *dw, const float *part, int chunks, int C) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
        float t = 0;
        for (int k = 0; k < chunks; k++) t += part[(int64_t)k * C + c];
        dw[c] += t;
    }
}

/* dw += sum over rows of g x r through rmsnorm_bwd_w's row-chunk partial sums. */
static void rmsnorm_dw(float *dw, const float *dout, const float *in, const float *rstd, int64_t N, int C) {
    const int chunks = N < RMS_CHUNKS * 8 ? (int)((N + 7) / 8) : RMS_CHUNKS;
    float *part = (float *)cached(SLOT_RMS_PART, (int64_t)chunks * C, sizeof(float), "RMSNorm backward");
    if (!part) return;
    rmsnorm_bwd_w<<<dim3((C + 31) / 32, chunks), dim3(32, 8), 0, cs()>>>(part, dout, in, rstd, N, C);
    check_launch("rmsnorm_backward (weight)");
    rmsnorm_bwd_w_sum<<<grid_for(C, 256), 256, 0, cs()>>>(dw, part, chunks, C);
    check_launch("rmsnorm_backward (weight sum)");
}

extern "C" void m1c_cuda_rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int64_t N, int C,
                                         float eps, void *out_lp) {
    if (N <= 0) return;
    __nv_bfloat16 *lp = (__nv_bfloat16 *)out_lp;
    if (C % 4 == 0 && aligned16(out) && aligned16(in) && aligned16(w) && ((uintptr_t)lp & 7u) == 0)
        check(pdl_launch(rmsnorm_fwd<4>, rows_grid(N), 32 * ROWS, 0, cs(), out, lp, rstd, in, w, N, C, eps),
              "rmsnorm_forward");
    else
        check(pdl_launch(rmsnorm_fwd<1>, rows_grid(N), 32 * ROWS, 0, cs(), out, lp, rstd, in, w, N, C, eps),
              "rmsnorm_forward");
}

extern "C" void m1c_cuda_rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                                          const float *rstd, int64_t N, int C) {
    if (N <= 0) return;
    if (C % 4 == 0 && aligned16(din) && aligned16(dout) && aligned16(in) && aligned16(w))
        rmsnorm_bwd_in<4><<<rows_grid(N), 32 * ROWS, 0, cs()>>>(din, dout, in, w, rstd, N, C);
    else
        rmsnorm_bwd_in<1><<<rows_grid(N), 32 * ROWS, 0, cs()>>>(din, dout, in, w, rstd, N, C);
    check_launch("rmsnorm_backward (input)");
    rmsnorm_dw(dw, dout, in, rstd, N, C);
}

/* ---- fused residual + RMSNorm, RMSNorm backward + gradient split ---- */

/* y = a h + b y (residual_k's expression), then rmsnorm_fwd of the new y into out and rstd. The first
 * pass reads h and the old y, stores the new y and sums its squares with rmsnorm_fwd's lanes, chunks,
 * order and butterfly, so the results are the two kernels'; the second pass finds the row in L1/L2. One
 * pass over h and y from DRAM instead of residual_k's and then rmsnorm_fwd's. */
/* Where the residual's y term comes from: y's old values (TY void), or a layer's output handed over as
 * weighted rows of TY (float or bf16; plugin.h: m1c_out_rows), summed by m1c_rows_sum (m1c/cuda/rows.cuh)
 * as the layer would have. */
template <typename TY> struct y_rows {
    const TY *rows;
    const int32_t *idx;
    const float *weight;
    int k;
};

/* A layer's output handed over as its own rows (m1c_out_rows' identity): the sum m1c_rows_sum makes of one
 * term of weight 1, fmaf(1, y, 0) (y, with -0 as +0). */
template <int W, typename TY> __device__ static inline void rows_identity(float (&o)[W], const TY *row) {
    vec_ld<W>(o, row);
#pragma unroll
    for (int v = 0; v < W; v++) o[v] = __fmaf_rn(1.0f, o[v], 0.0f);
}

/* The residual's pass over row i, shared by the fused kernels: x = a h + b x in place (m1c_residual's
 * expression; x's old value from yr where it gives rows), each lane's chunks in row_chunks' order;
 * returns the lane's sum of squares of the new x. */
template <int W, typename TY>
__device__ static inline float residual_row(float *x, const float *hr, float a, float b, int C, const y_rows<TY> &yr,
                                            int64_t i) {
    const int lane = threadIdx.x % 32, step = 32 * W;
    float ss = 0, xa[U][W], ha[U][W];
    row_chunks<W>(
        lane * W, step, C,
        [&](int u, int c) {
            ld<W>(ha[u], hr, c);
            if constexpr (std::is_void<TY>::value)
                ld<W>(xa[u], x, c);
            else if (!yr.idx) /* the identity (k = 1): row i, as m1c_rows_sum's fmaf(1, y, 0) */
                rows_identity<W>(xa[u], yr.rows + i * C + c);
            else
                m1c_rows_sum<W>(xa[u], yr.rows, yr.idx + i * yr.k, yr.weight + i * yr.k, yr.k, C, c);
        },
        [&](int u, int c) {
#pragma unroll
            for (int k = 0; k < W; k++) xa[u][k] = a * ha[u][k] + b * xa[u][k];
            st<W>(x, c, xa[u]);
#pragma unroll
            for (int k = 0; k < W; k++) ss += xa[u][k] * xa[u][k];
        });
    return ss;
}

template <int W, typename TY>
__global__ static void residual_rmsnorm_fwd(float *y, const float *h, float a, float b, const y_rows<TY> yr, float *out,
                                            __nv_bfloat16 *out_lp, float *rstd, const float *w, int64_t N, int C,
                                            float eps) {
    pdl_start();
    for (int64_t i = (int64_t)blockIdx.x * ROWS + threadIdx.x / 32; i < N; i += (int64_t)gridDim.x * ROWS) {
        const float ss = residual_row<W>(y + i * C, h + i * C, a, b, C, yr, i);
        rms_finish<W>(out + i * C, out_lp ? out_lp + i * C : NULL, rstd + i, y + i * C, w, ss, C, eps);
    }
}

/* residual_rmsnorm_fwd with each row's P <= NP products with pw's rows (P, C) (a layer's in_proj) into
 * proj, with its lanes, chunks and expressions (so y, out, rstd and out_lp have its bits): out's values
 * times pw's, per lane in chunk order, then the warp's transposing sum (m1c_warp_xpose_sum). The loads of
 * pw (P a chunk of a row: 24 KB a row at P 8, C 768, from L1) make it ~20 us slower than the plain kernel's
 * ~77 (H100, N 16384, ncu), against ~44 us for reading the row again in a kernel of the layer's. Two rows a
 * warp, which halves those loads, took 105 us (118 registers: a quarter of the warps resident); fewer
 * registers spilled (110-220 us). */
template <int W, int NP, typename TY>
__global__ static void residual_rmsnorm_proj_fwd(float *y, const float *h, float a, float b, const y_rows<TY> yr,
                                                 float *out, __nv_bfloat16 *out_lp, float *rstd, const float *w,
                                                 int64_t N, int C, float eps, const float *pw, int P, float *proj) {
    pdl_start();
    const int lane = threadIdx.x % 32, step = 32 * W;
    for (int64_t i = (int64_t)blockIdx.x * ROWS + threadIdx.x / 32; i < N; i += (int64_t)gridDim.x * ROWS) {
        float *x = y + i * C, *o = out + i * C;
        const float ss = m1c_warp_sum(residual_row<W>(x, h + i * C, a, b, C, yr, i));
        const float r = rsqrtf(ss / (float)C + eps);
        if (lane == 0) rstd[i] = r;
        float xa[U][W], wa[U][W], pa[NP] = {};
        row_chunks<W>(
            lane * W, step, C, [&](int u, int c) { ld<W>(xa[u], x, c), ld<W>(wa[u], w, c); },
            [&](int u, int c) {
                rms_scale<W>(xa[u], r, wa[u]);
                st<W>(o, c, xa[u]);
                if (out_lp) st_bf16<W>(out_lp + i * C, c, xa[u]);
#pragma unroll
                for (int p = 0; p < NP; p++) {
                    if (p >= P) break;
                    float q[W];
                    ld<W>(q, pw + (int64_t)p * C, c);
#pragma unroll
                    for (int k = 0; k < W; k++) pa[p] += xa[u][k] * q[k];
                }
            });
        const float t = m1c_warp_xpose_sum<NP>(pa); /* lane l: product l NP / 32 */
        const int g = 32 / NP, p = lane / g;
        if (lane % g == 0 && p < P) proj[i * P + p] = t;
    }
}

/* rmsnorm_bwd_in's two passes (the same dot product, lanes, order and butterfly) with dx kept in
 * registers: the second pass writes dh = a dx and tmp = b dx (where tmp is not NULL). Each lane reads its elements of a row
 * before it writes them, and no other lane touches them, so dout may be dh.
 *
 * The weight gradient (DW) in the same pass, in a fixed order: block y takes the rows of chunk y,
 * [y per, (y + 1) per), its warp k rows i0 + k, i0 + k + ROWS, ...; each lane adds g x r of its own
 * columns into its warp's row of the shared (ROWS, C) array acc, which no other lane touches; at the end
 * the block adds each column's ROWS sums in order into part[y], and m1c_colsum_add (m1c/cuda/sums.cuh)
 * adds the chunks in order. No float atomics: the same inputs give the same bits. */
enum { FUSED_ROWS = 32, FUSED_CHUNKS = 512 }; /* rows per chunk (4 per warp), most chunks */

template <int W, bool DW>
__global__ static void __launch_bounds__(32 * ROWS, 2) /* <= 128 registers, 2 blocks per SM (W = 4 spills a little) */
    rmsnorm_bwd_axpby(float *dh, float *tmp, __nv_bfloat16 *tmp_lp, float *part, const float *dout, const float *in,
                      const float *w, const float *rstd, float a, float b, int64_t N, int C, int64_t per) {
    pdl_start();
    extern __shared__ float4 acc_base[]; /* DW: (ROWS, C); float4 for 16-byte alignment */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, step = 32 * W;
    float *acc = reinterpret_cast<float *>(acc_base) + (int64_t)warp * C;
    if constexpr (DW) {
        const float z[W] = {};
        for (int c = lane * W; c < C; c += step) st<W>(acc, c, z);
    }
    const int64_t i0 = blockIdx.x * per, i1 = i0 + per < N ? i0 + per : N;
    for (int64_t i = i0 + warp; i < i1; i += ROWS) {
        const float *x = in + i * C, *g = dout + i * C;
        float *yh = dh + i * C;
        const float dot = rms_bwd_dot<W>(x, g, w, C);
        const float r = rstd[i], kk = r * r * r * dot / (float)C;
        float xa[U][W], ga[U][W], wa[U][W];
        row_chunks<W>(
            lane * W, step, C, [&](int u, int c) { ld<W>(xa[u], x, c), ld<W>(ga[u], g, c), ld<W>(wa[u], w, c); },
            [&](int u, int c) {
                float da[W], ta[W];
#pragma unroll
                for (int k = 0; k < W; k++) {
                    const float d = r * ga[u][k] * wa[u][k] - kk * xa[u][k];
                    da[k] = a * d, ta[k] = b * d;
                }
                st<W>(yh, c, da);
                if (tmp) st<W>(tmp + i * C, c, ta);
                if (tmp_lp) st_bf16<W>(tmp_lp + i * C, c, ta);
                if constexpr (DW) {
                    float sa[W];
                    ld<W>(sa, acc, c);
#pragma unroll
                    for (int k = 0; k < W; k++) sa[k] += ga[u][k] * xa[u][k] * r;
                    st<W>(acc, c, sa);
                }
            });
    }
    if constexpr (DW) {
        __syncthreads();
        const float *sh = reinterpret_cast<const float *>(acc_base);
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float t = 0;
#pragma unroll
            for (int k = 0; k < ROWS; k++) t += sh[(int64_t)k * C + c];
            part[(int64_t)blockIdx.x * C + c] = t;
        }
    }
}

/* rmsnorm_bwd_axpby<4, true> for rows of C = 128 NC columns (NC <= 7; 8 spills): each lane's NC chunks of
 * a row, and of w, stay in registers from one load, so the second pass reads nothing, and the weight
 * gradient's per-warp sums are registers instead of a shared array (at C = 768: 1.20 -> 1.05 ms a step on
 * an H200, 1.68 -> 1.46 on an H100, whose rmsnorm_bwd_axpby spilled). Every sum has rmsnorm_bwd_axpby's
 * order: the same rows per warp, chunks and butterfly, the per-warp sums added in warp order. The same
 * bits. */
template <int NC>
__global__ static void __launch_bounds__(32 * ROWS, 2)
    rmsnorm_bwd_axpby_regs(float *dh, float *tmp, __nv_bfloat16 *tmp_lp, float *part, const float *dout,
                           const float *in, const float *w, const float *rstd, float a, float b, int64_t N, int64_t per) {
    pdl_start();
    constexpr int C = 128 * NC;
    __shared__ float4 sh_base[ROWS * C / 4]; /* the warps' weight-gradient sums, (ROWS, C) */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float wa[NC][4], acc[NC][4];
#pragma unroll
    for (int j = 0; j < NC; j++) {
        ld<4>(wa[j], w, lane * 4 + j * 128);
#pragma unroll
        for (int k = 0; k < 4; k++) acc[j][k] = 0.0f;
    }
    const int64_t i0 = blockIdx.x * per, i1 = i0 + per < N ? i0 + per : N;
    for (int64_t i = i0 + warp; i < i1; i += ROWS) {
        const float *x = in + i * C, *g = dout + i * C;
        float xa[NC][4], ga[NC][4], dot = 0.0f;
        const float r = rstd[i];
#pragma unroll
        for (int j = 0; j < NC; j++) ld<4>(xa[j], x, lane * 4 + j * 128), ld<4>(ga[j], g, lane * 4 + j * 128);
#pragma unroll
        for (int j = 0; j < NC; j++)
#pragma unroll
            for (int k = 0; k < 4; k++) dot += ga[j][k] * wa[j][k] * xa[j][k];
        dot = m1c_warp_sum(dot);
        const float kk = r * r * r * dot / (float)C;
#pragma unroll
        for (int j = 0; j < NC; j++) {
            const int c = lane * 4 + j * 128;
            float da[4], ta[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float d = r * ga[j][k] * wa[j][k] - kk * xa[j][k];
                da[k] = a * d, ta[k] = b * d;
                acc[j][k] += ga[j][k] * xa[j][k] * r;
            }
            st<4>(dh + i * C, c, da);
            if (tmp) st<4>(tmp + i * C, c, ta);
            if (tmp_lp) st_bf16<4>(tmp_lp + i * C, c, ta);
        }
    }
    float *sh = reinterpret_cast<float *>(sh_base);
#pragma unroll
    for (int j = 0; j < NC; j++) st<4>(sh + warp * C, lane * 4 + j * 128, acc[j]);
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float t = 0;
#pragma unroll
        for (int k = 0; k < ROWS; k++) t += sh[k * C + c];
        part[(int64_t)blockIdx.x * C + c] = t;
    }
}

/* residual_rmsnorm_fwd, or with P products a row residual_rmsnorm_proj_fwd (8 or 32 accumulators a lane). */
template <int W, typename TY>
static void launch_residual_rmsnorm(float *y, const float *h, float a, float b, const y_rows<TY> &yr, float *out,
                                    __nv_bfloat16 *lp, float *rstd, const float *w, int64_t N, int C, float eps,
                                    const float *pw, int P, float *proj) {
    if (P <= 0)
        check(pdl_launch(residual_rmsnorm_fwd<W, TY>, rows_grid(N), 32 * ROWS, 0, cs(), y, h, a, b, yr, out, lp, rstd,
                         w, N, C, eps),
              "residual_rmsnorm");
    else
        check(pdl_launch(P <= 8 ? residual_rmsnorm_proj_fwd<W, 8, TY> : residual_rmsnorm_proj_fwd<W, 32, TY>,
                         rows_grid(N), 32 * ROWS, 0, cs(), y, h, a, b, yr, out, lp, rstd, w, N, C, eps, pw, P, proj),
              "residual_rmsnorm (projection)");
}

template <int W>
static void launch_residual_rmsnorm_w(float *y, const float *h, float a, float b, const m1c_out_rows *yr, float *out,
                                      __nv_bfloat16 *lp, float *rstd, const float *w, int64_t N, int C, float eps,
                                      const float *pw, int P, float *proj) {
    if (!yr)
        launch_residual_rmsnorm<W>(y, h, a, b, y_rows<void>{}, out, lp, rstd, w, N, C, eps, pw, P, proj);
    else if (yr->dtype == M1C_BF16)
        launch_residual_rmsnorm<W>(y, h, a, b,
                                   y_rows<__nv_bfloat16>{(const __nv_bfloat16 *)yr->rows, yr->idx, yr->weight, yr->k},
                                   out, lp, rstd, w, N, C, eps, pw, P, proj);
    else
        launch_residual_rmsnorm<W>(y, h, a, b, y_rows<float>{(const float *)yr->rows, yr->idx, yr->weight, yr->k}, out,
                                   lp, rstd, w, N, C, eps, pw, P, proj);
}

extern "C" void m1c_cuda_residual_rmsnorm(float *y, const float *h, float a, float b, const m1c_out_rows *yr,
                                          float *out, float *rstd, const float *w, int64_t N, int C, float eps,
                                          void *out_lp, const float *pw, int P, float *proj) {
    if (N <= 0) return;
    if (P > 32) {
        m1c_cuda_fail("residual_rmsnorm", "more than 32 products a row");
        return;
    }
    if (yr && yr->dtype != M1C_F32 && yr->dtype != M1C_BF16) {
        m1c_cuda_fail("residual_rmsnorm", "a layer's output rows neither f32 nor bf16");
        return;
    }
    if (yr && (yr->k < 1 || !yr->idx != !yr->weight || (!yr->idx && yr->k != 1))) {
        m1c_cuda_fail("residual_rmsnorm", "a layer's output rows with k < 1, or idx and weight not both given, "
                                          "or the identity (both NULL) with k other than 1");
        return;
    }
    __nv_bfloat16 *lp = (__nv_bfloat16 *)out_lp;
    /* 16-byte f32 accesses; the rows' 4-element loads: 16 bytes (f32) or 8 (bf16) */
    const size_t ra = yr ? (yr->dtype == M1C_BF16 ? 8 : 16) : 16;
    if (C % 4 == 0 && aligned16(y) && aligned16(h) && aligned16(out) && aligned16(w) && ((uintptr_t)lp & 7u) == 0 &&
        (P <= 0 || aligned16(pw)) && (!yr || (uintptr_t)yr->rows % ra == 0))
        launch_residual_rmsnorm_w<4>(y, h, a, b, yr, out, lp, rstd, w, N, C, eps, pw, P, proj);
    else
        launch_residual_rmsnorm_w<1>(y, h, a, b, yr, out, lp, rstd, w, N, C, eps, pw, P, proj);
}

template <bool DW>
static void launch_bwd_axpby(int vec, int chunks, size_t shmem, float *dh, float *tmp, __nv_bfloat16 *tmp_lp,
                             float *part, const float *dout, const float *in, const float *w, const float *rstd,
                             float a, float b, int64_t N, int C, int64_t per) {
    check(pdl_launch(vec ? rmsnorm_bwd_axpby<4, DW> : rmsnorm_bwd_axpby<1, DW>, chunks, 32 * ROWS, shmem, cs(), dh, tmp,
                     tmp_lp, part, dout, in, w, rstd, a, b, N, C, per),
          "rmsnorm_backward_axpby");
}

/* rmsnorm_bwd_axpby_regs for NC = nc (1 <= nc <= NC). */
template <int NC>
static void launch_bwd_regs(int nc, int chunks, float *dh, float *tmp, __nv_bfloat16 *tmp_lp, float *part,
                            const float *dout, const float *in, const float *w, const float *rstd, float a, float b,
                            int64_t N, int64_t per) {
    if (nc == NC)
        check(pdl_launch(rmsnorm_bwd_axpby_regs<NC>, chunks, 32 * ROWS, 0, cs(), dh, tmp, tmp_lp, part, dout, in, w,
                         rstd, a, b, N, per),
              "rmsnorm_backward_axpby");
    else if constexpr (NC > 1)
        launch_bwd_regs<NC - 1>(nc, chunks, dh, tmp, tmp_lp, part, dout, in, w, rstd, a, b, N, per);
}

/* The weight gradient's partial sums take ROWS * C floats of shared memory per block: up to the 48 KiB
 * every block may have without opting in (C <= 1536); wider rows take rmsnorm_dw's separate pass, run
 * first because dout may be dh. */
extern "C" void m1c_cuda_rmsnorm_backward_axpby(float *dh, float *tmp, float *dw, const float *dout, const float *in,
                                                const float *w, const float *rstd, float a, float b, int64_t N, int C,
                                                void *tmp_lp) {
    if (N <= 0) return;
    __nv_bfloat16 *lp = (__nv_bfloat16 *)tmp_lp;
    const int vec = C % 4 == 0 && aligned16(dh) && aligned16(tmp) && aligned16(dout) && aligned16(in) && aligned16(w) &&
                    ((uintptr_t)lp & 7u) == 0;
    const int64_t want = (N + FUSED_ROWS - 1) / FUSED_ROWS;
    const int chunks = (int)(want < (int64_t)FUSED_CHUNKS ? want : (int64_t)FUSED_CHUNKS);
    const int64_t per = (N + chunks - 1) / chunks;
    const size_t shmem = (size_t)ROWS * C * sizeof(float);
    if (shmem > 48 * 1024) {
        rmsnorm_dw(dw, dout, in, rstd, N, C);
        launch_bwd_axpby<false>(vec, chunks, 0, dh, tmp, lp, NULL, dout, in, w, rstd, a, b, N, C, per);
        return;
    }
    float *part = (float *)cached(SLOT_RMS_PART, (int64_t)chunks * C, sizeof(float), "RMSNorm backward");
    if (!part) return;
    if (vec && C % 128 == 0 && C <= 7 * 128) {
        launch_bwd_regs<7>(C / 128, chunks, dh, tmp, lp, part, dout, in, w, rstd, a, b, N, per);
    } else {
        launch_bwd_axpby<true>(vec, chunks, shmem, dh, tmp, lp, part, dout, in, w, rstd, a, b, N, C, per);
    }
    check(m1c_colsum_add_launch(dw, part, chunks, C, cs()), "rmsnorm_backward_axpby (weight sum)");
}

/* ---- the LM head ---- */

static cublasHandle_t head_handle(void) {
    static thread_local cublasHandle_t h;
    if (!h && cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        h = NULL;
        m1c_cuda_fail("cublasCreate (LM head)", "failed (no device, or out of memory)");
    }
    if (h) cublasSetStream(h, cs());
    return h;
}

/* The elementwise kernels take vec = 1 when their pointers allow 16-byte accesses (8-byte for bf16):
 * then n / 4 groups of 4, and the last n % 4 elements one at a time. */
static int64_t vec_items(int64_t n, int vec) { return vec ? n / 4 : n; }

/* Their loop: with vec, groups of 4 from a grid stride (f4(i) takes elements i .. i + 3), then the last
 * n % 4 one at a time (f1(i)); without, every element one at a time. */
template <typename F4, typename F1> __device__ static inline void elementwise(int64_t n, int vec, F4 f4, F1 f1) {
    const int64_t t0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, step = (int64_t)gridDim.x * blockDim.x;
    int64_t i0 = 0;
    if (vec) {
        for (int64_t j = t0; j < n / 4; j += step) f4(4 * j);
        i0 = n / 4 * 4;
    }
    for (int64_t i = i0 + t0; i < n; i += step) f1(i);
}

__global__ static void f32_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n, int vec) {
    elementwise(
        n, vec,
        [&](int64_t i) {
            float a[4];
            ld<4>(a, src, i);
            st_bf16<4>(dst, i, a);
        },
        [&](int64_t i) { dst[i] = __float2bfloat16_rn(src[i]); });
}

__global__ static void split_tf32(float *hi, float *lo, const float *x, int64_t n, int vec) {
    elementwise(
        n, vec,
        [&](int64_t i) {
            float a[4], h[4], l[4];
            ld<4>(a, x, i);
#pragma unroll
            for (int k = 0; k < 4; k++) tf32_split(a[k], h[k], l[k]);
            st<4>(hi, i, h), st<4>(lo, i, l);
        },
        [&](int64_t i) { tf32_split(x[i], hi[i], lo[i]); });
}

static void to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n) {
    const int vec = aligned16(src) && ((uintptr_t)dst & 7u) == 0;
    f32_to_bf16<<<grid_for(vec_items(n, vec), 256), 256, 0, cs()>>>(dst, src, n, vec);
    check_launch("bf16 conversion");
}

/* A GEMM operand in the form the head's precision multiplies (0 fp32, 1 tf32, 2 bf16 operands,
 * 3 tf32x3): x f32 for 0 and 1, bf16 for 2, the TF32 high part for 3 with lo its remainder. */
struct head_op {
    const void *x;
    const float *lo;
};

/* n f32 values as the operand of `precision`, converted into the cached slots s16 (bf16) or sh and sl. */
static head_op head_operand(int precision, const float *x, int64_t n, int s16, int sh, int sl) {
    if (precision == 2) {
        __nv_bfloat16 *d = (__nv_bfloat16 *)cached(s16, n, 2, "LM head");
        if (d) to_bf16(d, x, n);
        return {d, NULL};
    }
    if (precision == 3) {
        float *h = (float *)cached(sh, n, 4, "LM head"), *l = (float *)cached(sl, n, 4, "LM head");
        if (!h || !l) return {NULL, NULL};
        const int vec = aligned16(x); /* cudaMalloc'd hi and lo are aligned */
        split_tf32<<<grid_for(vec_items(n, vec), 256), 256, 0, cs()>>>(h, l, x, n, vec);
        check_launch("head tf32 split");
        return {h, l};
    }
    return {x, NULL};
}

/* Row-major C (M x N) = op(A) op(B) + beta C at the head's precision, A and B already in its form. */
static void head_gemm(int precision, int ta, int tb, int M, int N, int K, head_op A, int lda, head_op B, int ldb,
                      float beta, float *C, int ldc) {
    cublasHandle_t h = head_handle();
    if (!h || !A.x || !B.x) return; /* a failure is already kept (no handle, no scratch for an operand) */
    const float one = 1.0f;
    cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    if (precision == 3) {
        /* the small terms first, then the large one, so the f32 accumulation loses the least */
        const void *pa[3] = {A.lo, A.x, A.x}, *pb[3] = {B.x, B.lo, B.x};
        for (int t = 0; t < 3 && st == CUBLAS_STATUS_SUCCESS; t++) {
            const float bt = t == 0 ? beta : 1.0f;
            st = cublasGemmEx(h, ob, oa, N, M, K, &one, pb[t], CUDA_R_32F, ldb, pa[t], CUDA_R_32F, lda, &bt, C,
                              CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT);
        }
    } else if (precision == 2) {
        st = cublasGemmEx(h, ob, oa, N, M, K, &one, B.x, CUDA_R_16BF, ldb, A.x, CUDA_R_16BF, lda, &beta, C, CUDA_R_32F,
                          ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    } else {
        cublasComputeType_t ct = precision == 1 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        st = cublasGemmEx(h, ob, oa, N, M, K, &one, B.x, CUDA_R_32F, ldb, A.x, CUDA_R_32F, lda, &beta, C, CUDA_R_32F,
                          ldc, ct, CUBLAS_GEMM_DEFAULT);
    }
    if (st != CUBLAS_STATUS_SUCCESS) m1c_cuda_fail("cublasGemmEx (LM head)", cublasGetStatusString(st));
}

/* lse and logp of each row in one pass over the logits (one block per row): each thread keeps a
 * running max m and sum s of exp(z - m) over its elements (rescaling s when m grows), then the block
 * merges them: M = max m, lse = M + log(sum s exp(m - M)). W = 4 when V % 4 == 0 and the logits are
 * 16-byte aligned, else 1; U chunks of W are loaded before any is used, as in the RMSNorm kernels.
 * With Q (training at the bf16 precision), a second pass over the row, which its block has just read
 * (launched with few enough blocks that their rows stay in L2), writes q = onehot - softmax in bf16: the
 * backward's dlogits up to the factor dlogp of each row (0 for an unscored row). */
template <int W, bool Q>
__global__ static void __launch_bounds__(1024) logsoftmax_rows(float *lse, float *logp, __nv_bfloat16 *q, float *qs,
                                                               const float *logits, const int32_t *targets, int64_t N,
                                                               int V) {
    __shared__ float sh[32];
    const int step = blockDim.x * W;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *z = logits + i * (int64_t)V;
        float m = -INFINITY, s = 0, a[U][W];
        row_chunks<W>(
            threadIdx.x * W, step, V, [&](int u, int v) { ld<W>(a[u], z, v); },
            [&](int u, int) {
                float mx = a[u][0];
#pragma unroll
                for (int k = 1; k < W; k++) mx = fmaxf(mx, a[u][k]);
                if (mx > m) { /* from m = -Inf: s is 0 and stays 0 */
                    s *= expf(m - mx);
                    m = mx;
                }
#pragma unroll
                for (int k = 0; k < W; k++) s += expf(a[u][k] - m); /* a NaN makes s NaN, as in two passes */
            });
        const float M = block_reduce(m, sh, -INFINITY, red_fmax());
        s = s == 0.0f ? 0.0f : s * expf(m - M); /* a thread without elements (m = -Inf) adds 0 */
        s = block_reduce(s, sh, 0.0f, red_add());
        const float l = M + logf(s); /* the same bits in every thread (block_reduce) */
        if (threadIdx.x == 0) {
            lse[i] = l;
            if (logp) logp[i] = targets[i] >= 0 ? z[targets[i]] - l : 0.0f;
            if constexpr (Q) qs[i] = 1.0f; /* q is onehot - softmax itself */
        }
        if constexpr (Q) {
            const int32_t t = targets[i];
            const float on = t >= 0 ? 1.0f : 0.0f; /* an unscored row: q = 0 */
            __nv_bfloat16 *qr = q + i * (int64_t)V;
            row_chunks<W>(
                threadIdx.x * W, step, V, [&](int u, int v) { ld<W>(a[u], z, v); },
                [&](int u, int v) {
#pragma unroll
                    for (int k = 0; k < W; k++) a[u][k] = on * ((v + k == t ? 1.0f : 0.0f) - expf(a[u][k] - l));
                    st_bf16<W>(qr, v, a[u]);
                });
        }
    }
}

/* The training forward's logsoftmax_rows<4, true> where a row fits in the block's registers (V <= 32768,
 * V % 4 == 0, logits 16-byte and q 8-byte aligned; sm_90), reading each row from DRAM once: thread t
 * holds columns 4 (1024 k + t) .. + 3 (k < 8) of the row, while a bulk copy (TMA) brings the block's next
 * row into shared memory. Its reads stay in flight while the block reduces the row and writes q, where
 * logsoftmax_rows leaves the SM without DRAM reads then and reads each row twice (the second from L2).
 * Two passes over the registers: M = the row's max, then s = sum exp(z - M) kept as e = exp(z - M), so
 * q = onehot - e / s takes no second exp (expf's ex2 issues at 1/8 of the FMA rate); lse
 * differs from logsoftmax_rows' in the last bits (no running rescale), q by an ulp of f32 before bf16. */
enum { LSM_T = 1024, LSM_K = 8 }; /* threads, 16-byte chunks per thread: V up to 4 * 1024 * 8 */

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ static inline uint32_t lsm_smem(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* One thread: the V floats at src into dst (16 KB per copy), completing bar's current phase. */
__device__ static inline void lsm_fetch(float4 *dst, const float *src, int V, uint64_t *bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(lsm_smem(bar)), "r"(V * 4) : "memory");
    for (int c = 0; c < V; c += 4 * LSM_T) {
        const int n = V - c < 4 * LSM_T ? V - c : 4 * LSM_T;
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         lsm_smem(dst + c / 4)),
                     "l"(src + c), "r"(n * 4), "r"(lsm_smem(bar))
                     : "memory");
    }
}

__device__ static inline void lsm_wait(uint64_t *bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done)
                     : "r"(lsm_smem(bar)), "r"(parity)
                     : "memory");
}
#endif

__global__ static void __launch_bounds__(LSM_T) logsoftmax_rows_q(float *lse, float *logp, __nv_bfloat16 *q,
                                                                  float *qs, const float *logits,
                                                                  const int32_t *targets, int64_t N, int V) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ float4 row[]; /* V floats: the row being read */
    __shared__ float sh[32];
    __shared__ uint64_t bar;
    const int tid = threadIdx.x;
    if (tid == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n fence.mbarrier_init.release.cluster;" ::"r"(
                         lsm_smem(&bar))
                     : "memory");
        if (blockIdx.x < N) lsm_fetch(row, logits + blockIdx.x * (int64_t)V, V, &bar);
    }
    __syncthreads();
    uint32_t parity = 0;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x, parity ^= 1) {
        const int32_t t = targets[i]; /* before the wait: in flight with the row */
        lsm_wait(&bar, parity);
        float a[LSM_K][4], m = -INFINITY;
#pragma unroll
        for (int k = 0; k < LSM_K; k++)
            if (4 * (k * LSM_T + tid) < V) {
                const float4 v = row[k * LSM_T + tid];
                a[k][0] = v.x, a[k][1] = v.y, a[k][2] = v.z, a[k][3] = v.w;
                m = fmaxf(m, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
            }
        const float zt = tid == 0 && t >= 0 && t < V ? reinterpret_cast<const float *>(row)[t] : 0.0f;
        const float M = block_reduce(m, sh, -INFINITY, red_fmax());
        /* every thread has read the row (block_reduce's barriers): the next one may overwrite it, once the
         * reads are ordered before the bulk copy's writes (another proxy) */
        if (tid == 0 && i + gridDim.x < N) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            lsm_fetch(row, logits + (i + gridDim.x) * (int64_t)V, V, &bar);
        }
        float s = 0;
#pragma unroll
        for (int k = 0; k < LSM_K; k++)
            if (4 * (k * LSM_T + tid) < V) {
#pragma unroll
                for (int j = 0; j < 4; j++) s += a[k][j] = expf(a[k][j] - M); /* a NaN makes s NaN */
            }
        s = block_reduce(s, sh, 0.0f, red_add());
        const float l = M + logf(s), r = 1.0f / s; /* the same bits in every thread (block_reduce) */
        if (tid == 0) {
            lse[i] = l, qs[i] = 1.0f; /* q is onehot - softmax itself */
            if (logp) logp[i] = t >= 0 ? zt - l : 0.0f;
        }
        const float on = t >= 0 ? 1.0f : 0.0f; /* an unscored row: q = 0 */
        __nv_bfloat16 *qr = q + i * (int64_t)V;
#pragma unroll
        for (int k = 0; k < LSM_K; k++) {
            const int c = 4 * (k * LSM_T + tid);
            if (c < V) {
#pragma unroll
                for (int j = 0; j < 4; j++) a[k][j] = on * ((c + j == t ? 1.0f : 0.0f) - a[k][j] * r);
                st_bf16<4>(qr, c, a[k]);
            }
        }
    }
#endif
}

/* Whether logsoftmax_rows_q takes rows of V columns (V % 4 == 0) here: compiled for sm_90 (its bulk
 * copies; otherwise its body is empty) and allowed V floats of shared memory. */
static bool lsm_q_fits(int V) {
    static thread_local int known_v = -1; /* the answer for known_v, kept: two driver calls a step otherwise */
    static thread_local bool fits;
    if (V == known_v) return fits;
    cudaFuncAttributes fa;
    fits = V >= 4 && V <= 4 * LSM_T * LSM_K && cudaFuncGetAttributes(&fa, logsoftmax_rows_q) == cudaSuccess &&
           fa.ptxVersion >= 90 &&
           cudaFuncSetAttribute(logsoftmax_rows_q, cudaFuncAttributeMaxDynamicSharedMemorySize, V * 4) == cudaSuccess;
    if (!fits) (void)cudaGetLastError();
    known_v = V;
    return fits;
}

/* dh (N, H) += g Z with g = dlogp qs of the row (unscored: dh unchanged), Z the head's q W; SET: dh = g Z
 * (unscored: 0), dh unread. W columns per access (4: 16-byte accesses, H % 4 == 0 and the rows aligned). */
template <int W, bool SET>
__global__ static void head_add_rows(float *dh, const float *Z, const float *dlogp, const float *qs,
                                     const int32_t *targets, int64_t N, int H) {
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        if (!SET && targets[i] < 0) continue;
        const float g = targets[i] >= 0 ? dlogp[i] * qs[i] : 0.0f;
        for (int c = threadIdx.x * W; c < H; c += blockDim.x * W) {
            float d[W], z[W];
            if (SET)
                for (int k = 0; k < W; k++) d[k] = 0.0f;
            else
                ld<W>(d, dh + i * H, c);
            ld<W>(z, Z + i * H, c);
#pragma unroll
            for (int k = 0; k < W; k++) d[k] += g * z[k];
            st<W>(dh + i * H, c, d);
        }
    }
}

/* hs (N, H) = bf16(g h) with g as above (0 unscored): the second operand of dW += q^T (g h), rounded once
 * from f32. */
template <int W>
__global__ static void head_scale_rows(__nv_bfloat16 *hs, const float *h, const float *dlogp, const float *qs,
                                       const int32_t *targets, int64_t N, int H) {
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float g = targets[i] >= 0 ? dlogp[i] * qs[i] : 0.0f;
        for (int c = threadIdx.x * W; c < H; c += blockDim.x * W) {
            float x[W];
            ld<W>(x, h + i * H, c);
#pragma unroll
            for (int k = 0; k < W; k++) x[k] *= g;
            st_bf16<W>(hs + i * H, c, x);
        }
    }
}

/* Multiprocessors of the current device (for grids of one block per SM); 132 if it cannot be read. */
static int sm_count(void) {
    const int n = m1c_cuda_sm_count();
    return n > 0 ? n : 132;
}

/* dlogits = dlogp * (onehot - softmax) from the logits, written where the head's precision P wants them:
 * P 0 (and 1) f32 in place of the logits; 2 bf16 into b16; 3 the TF32 split into hi and lo. W and U as
 * for logsoftmax_rows. */
template <int W, int P>
__global__ static void logsoftmax_bwd(float *logits, __nv_bfloat16 *b16, float *hi, float *lo, const float *lse,
                                      const float *dlogp, const int32_t *targets, int64_t N, int V) {
    const int step = blockDim.x * W;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const int64_t row = i * (int64_t)V;
        const int32_t t = targets[i];
        const float g = t >= 0 ? dlogp[i] : 0.0f, l = lse[i];
        float d[U][W];
        row_chunks<W>(
            threadIdx.x * W, step, V, [&](int u, int v) { ld<W>(d[u], logits + row, v); },
            [&](int u, int v) {
#pragma unroll
                for (int k = 0; k < W; k++) d[u][k] = -g * expf(d[u][k] - l) + (v + k == t ? g : 0.0f);
                if constexpr (P == 2) {
                    st_bf16<W>(b16 + row, v, d[u]);
                } else if constexpr (P == 3) {
                    float h[W], r[W];
#pragma unroll
                    for (int k = 0; k < W; k++) tf32_split(d[u][k], h[k], r[k]);
                    st<W>(hi + row, v, h), st<W>(lo + row, v, r);
                } else {
                    st<W>(logits + row, v, d[u]);
                }
            });
    }
}

template <int P>
static void launch_logsoftmax_bwd(int vec, float *logits, __nv_bfloat16 *b16, float *hi, float *lo, const float *lse,
                                  const float *dlogp, const int32_t *targets, int64_t N, int V) {
    if (vec)
        logsoftmax_bwd<4, P><<<grid_for(N, 1), 256, 0, cs()>>>(logits, b16, hi, lo, lse, dlogp, targets, N, V);
    else
        logsoftmax_bwd<1, P><<<grid_for(N, 1), 256, 0, cs()>>>(logits, b16, hi, lo, lse, dlogp, targets, N, V);
    check_launch("head log-softmax backward");
}

/* W as the head's B operand: its bf16 copy where the model keeps one (precision 2), else converted. */
static head_op head_weight(int precision, const float *W, const void *W_lp, int64_t n) {
    if (precision == 2 && W_lp) return {W_lp, NULL};
    return head_operand(precision, W, n, SLOT_B16, SLOT_BH, SLOT_BL);
}

/* The Hopper head (head_wg.cuh) where it runs: an sm_90a build on a compute capability 9.0 device whose
 * driver encodes tensor maps. Its state, per host thread, found once: avail (the build and device), enc
 * (NULL where it cannot run), grid (hw_kernel's blocks, one per SM). */
struct hw_state {
    int known, avail, grid;
    tma_encode_fn enc;
};
static const hw_state *hw_get(void) {
    static thread_local hw_state st;
    if (!st.known) {
        st.known = 1, st.grid = sm_count(), st.avail = wg_available();
        st.enc = st.avail ? tma_encoder() : NULL;
        if (st.enc && hw_allow() != cudaSuccess) st.enc = NULL;
        (void)cudaGetLastError();
    }
    return &st;
}

/* H and V whose maps and rows the kernels take. */
static bool hw_sizes(int H, int V) { return H % 8 == 0 && V % 8 == 0; }

extern "C" int m1c_cuda_head_path(int H, int V) {
    const hw_state *st = hw_get();
    return !st->avail ? -1 : !st->enc ? -2 : hw_sizes(H, V);
}

/* The row scales that follow q (core/ops.h: m1c_head_q_scale_at). */
static float *head_qs(const void *q, int64_t N, int V) {
    return (float *)((char *)q + m1c_head_q_scale_at(N, V));
}

/* The training forward at precision 2 through head_wg.cuh: true if queued (the logits are not written). */
static bool head_forward_wg(float *lse, float *logp, void *q, float *qs, const void *h16, const void *W16,
                            const int32_t *targets, int64_t N, int H, int V) {
    const hw_state *st = hw_get();
    if (!st->enc || !hw_sizes(H, V)) return false;
    float *scratch = (float *)cached(SLOT_HEAD_PART, hw_scratch_floats(N, V), sizeof(float), "LM head");
    if (!scratch) return true; /* the failure is kept (cached): nothing to run */
    if (hw_forward(st->enc, st->grid, cs(), lse, logp, q, qs, h16, W16, targets, scratch, N, H, V))
        return false;
    check_launch("head forward (Hopper)");
    return true;
}

extern "C" void m1c_cuda_head_forward(int precision, float *logits, float *lse, float *logp, void *q, const float *h,
                                      const float *W, const void *W_lp, const int32_t *targets, int64_t N, int H,
                                      int V) {
    if (N <= 0) return;
    const head_op A = head_operand(precision, h, N * H, SLOT_A16, SLOT_AH, SLOT_AL);
    const head_op B = head_weight(precision, W, W_lp, (int64_t)V * H);
    float *qs = q ? head_qs(q, N, V) : NULL;
    if (q && precision == 2 && head_forward_wg(lse, logp, q, qs, A.x, B.x, targets, N, H, V)) return;
    head_gemm(precision, 0, 1, (int)N, V, H, A, H, B, H, 0.0f, logits, V);
    const bool vec = V % 4 == 0 && aligned16(logits) && ((uintptr_t)q & 7u) == 0;
    __nv_bfloat16 *qb = (__nv_bfloat16 *)q;
    if (q && precision == 2) { /* one block of 1024 per SM: its ~132 rows in flight (17 MB at V 32000) stay in L2 */
        const int g = (int)(N < sm_count() ? N : sm_count());
        if (vec && lsm_q_fits(V))
            logsoftmax_rows_q<<<g, LSM_T, (size_t)V * 4, cs()>>>(lse, logp, qb, qs, logits, targets, N, V);
        else if (vec)
            logsoftmax_rows<4, true><<<g, 1024, 0, cs()>>>(lse, logp, qb, qs, logits, targets, N, V);
        else
            logsoftmax_rows<1, true><<<g, 1024, 0, cs()>>>(lse, logp, qb, qs, logits, targets, N, V);
    } else if (vec) {
        logsoftmax_rows<4, false><<<grid_for(N, 1), 256, 0, cs()>>>(lse, logp, NULL, NULL, logits, targets, N, V);
    } else {
        logsoftmax_rows<1, false><<<grid_for(N, 1), 256, 0, cs()>>>(lse, logp, NULL, NULL, logits, targets, N, V);
    }
    check_launch("head log-softmax");
}

/* Z = q W for a backward from q (precision 2): its one product that needs no dlogp. */
static float *head_z_product(int precision, const void *q, const float *W, const void *W_lp, int64_t N, int H, int V) {
    float *Z = (float *)cached(SLOT_Z, N * H, 4, "LM head");
    if (!Z) return NULL;
    const head_op Wop = head_weight(precision, W, W_lp, (int64_t)V * H);
    head_gemm(precision, 0, 0, (int)N, H, V, head_op{q, NULL}, V, Wop, H, 0.0f, Z, H);
    return Z;
}

extern "C" void m1c_cuda_head_prepare(int precision, const void *q, const float *W, const void *W_lp, int64_t N,
                                      int H, int V) {
    queued_ahead *a = ahead(AHEAD_HEAD); /* the backward's q W, into SLOT_Z on the core's stream */
    a->valid = 0;
    if (N <= 0 || !q || precision != 2 || !head_z_product(precision, q, W, W_lp, N, H, V)) return;
    a->key = q, a->N = N, a->valid = 1;
}

/* The dlogits go once into the form both products use: f32 in place of the logits at precisions 0 and
 * 1; at 2 bf16 and at 3 the TF32 split, into the cached A-operand slots, and logits is not written. */
extern "C" void m1c_cuda_head_backward(int precision, float *dh, float *dW, int unset, float *logits,
                                       const float *lse, const void *q, const float *dlogp, const float *h,
                                       const float *W, const void *W_lp, const int32_t *targets, int64_t N, int H,
                                       int V) {
    const bool dh_set = unset & M1C_HEAD_DH_UNSET;
    const float dw_beta = unset & M1C_HEAD_DW_UNSET ? 0.0f : 1.0f, dh_beta = dh_set ? 0.0f : 1.0f;
    if (N <= 0) {
        if (dw_beta == 0.0f) check(cudaMemsetAsync(dW, 0, (size_t)V * H * sizeof(float), cs()), "LM head (no rows)");
        return;
    }
    const int64_t NV = N * V;
    if (q && precision == 2) {
        /* dlogits = g q with g = dlogp qs per row: dh += g (q W), dW += q^T (g h); no pass over the logits.
         * q W may have been queued at the end of the forward (m1c_cuda_head_prepare). */
        const head_op Q = {q, NULL};
        const float *qs = head_qs(q, N, V);
        float *Z = ahead_claim(ahead(AHEAD_HEAD), q, N) ? (float *)cached(SLOT_Z, N * H, 4, "LM head")
                                                        : head_z_product(precision, q, W, W_lp, N, H, V);
        if (!Z) return;
        const bool v4 = H % 4 == 0 && aligned16(dh) && aligned16(h); /* Z and hs are cudaMalloc'd */
        const auto add = v4 ? (dh_set ? head_add_rows<4, true> : head_add_rows<4, false>)
                            : (dh_set ? head_add_rows<1, true> : head_add_rows<1, false>);
        add<<<grid_for(N, 1), 256, 0, cs()>>>(dh, Z, dlogp, qs, targets, N, H);
        check_launch("head dh rows");
        __nv_bfloat16 *hs = (__nv_bfloat16 *)cached(SLOT_B16, N * H, 2, "LM head"); /* after W's product */
        if (!hs) return;
        if (v4)
            head_scale_rows<4><<<grid_for(N, 1), 256, 0, cs()>>>(hs, h, dlogp, qs, targets, N, H);
        else
            head_scale_rows<1><<<grid_for(N, 1), 256, 0, cs()>>>(hs, h, dlogp, qs, targets, N, H);
        check_launch("head scaled rows");
        head_gemm(precision, 1, 0, V, H, (int)N, Q, V, head_op{hs, NULL}, H, dw_beta, dW, H);
        return;
    }
    const int vec = V % 4 == 0 && aligned16(logits); /* the cached slots are cudaMalloc'd: aligned */
    head_op D = {logits, NULL};
    if (precision == 2) {
        __nv_bfloat16 *b16 = (__nv_bfloat16 *)cached(SLOT_A16, NV, 2, "LM head");
        if (!b16) return;
        launch_logsoftmax_bwd<2>(vec, logits, b16, NULL, NULL, lse, dlogp, targets, N, V);
        D = {b16, NULL};
    } else if (precision == 3) {
        float *hi = (float *)cached(SLOT_AH, NV, 4, "LM head"), *lo = (float *)cached(SLOT_AL, NV, 4, "LM head");
        if (!hi || !lo) return;
        launch_logsoftmax_bwd<3>(vec, logits, NULL, hi, lo, lse, dlogp, targets, N, V);
        D = {hi, lo};
    } else {
        launch_logsoftmax_bwd<0>(vec, logits, NULL, NULL, NULL, lse, dlogp, targets, N, V);
    }
    /* dh += dlogits W, then dW += dlogits^T h; h's conversion reuses W's slots after the first product
     * (stream order). */
    const head_op Wop = head_weight(precision, W, W_lp, (int64_t)V * H);
    head_gemm(precision, 0, 0, (int)N, H, V, D, V, Wop, H, dh_beta, dh, H);
    const head_op Hop = head_operand(precision, h, N * H, SLOT_B16, SLOT_BH, SLOT_BL);
    head_gemm(precision, 1, 0, V, H, (int)N, D, V, Hop, H, dw_beta, dW, H);
}

/* ---- elementwise and reductions ---- */

__global__ static void residual_k(float *y, const float *h, float a, float b, int64_t n, int vec) {
    elementwise(
        n, vec,
        [&](int64_t i) {
            float hv[4], yv[4];
            ld<4>(hv, h, i), ld<4>(yv, y, i);
#pragma unroll
            for (int k = 0; k < 4; k++) yv[k] = a * hv[k] + b * yv[k];
            st<4>(y, i, yv);
        },
        [&](int64_t i) { y[i] = a * h[i] + b * y[i]; });
}

__global__ static void axpby_k(float *y, float *z, const float *x, float a, float b, int64_t n, int vec) {
    elementwise(
        n, vec,
        [&](int64_t i) {
            float xv[4], yv[4], zv[4];
            ld<4>(xv, x, i);
#pragma unroll
            for (int k = 0; k < 4; k++) yv[k] = a * xv[k], zv[k] = b * xv[k];
            st<4>(y, i, yv), st<4>(z, i, zv);
        },
        [&](int64_t i) {
            const float v = x[i];
            y[i] = a * v;
            z[i] = b * v;
        });
}

__global__ static void scale_k(float *x, int64_t n, float s, int vec) {
    elementwise(
        n, vec,
        [&](int64_t i) {
            float v[4];
            ld<4>(v, x, i);
#pragma unroll
            for (int k = 0; k < 4; k++) v[k] *= s;
            st<4>(x, i, v);
        },
        [&](int64_t i) { x[i] *= s; });
}

/* Per-block partial sums in double (deterministic: fixed grid, fixed order), summed on the host. */
__global__ static void sumsq_k(double *part, const float *x, int64_t n) {
    __shared__ double sh[256];
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

__global__ static void nonfinite_k(unsigned long long *count, const float *x, int64_t n) {
    unsigned long long k = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        k += !isfinite(x[i]);
    if (k) atomicAdd(count, k);
}

extern "C" void m1c_cuda_residual(float *y, const float *h, float a, float b, int64_t n) {
    if (n <= 0) return;
    const int vec = aligned16(y) && aligned16(h);
    residual_k<<<grid_for(vec_items(n, vec), 256), 256, 0, cs()>>>(y, h, a, b, n, vec);
    check_launch("residual");
}

extern "C" void m1c_cuda_axpby(float *y, float *z, const float *x, float a, float b, int64_t n) {
    if (n <= 0) return;
    const int vec = aligned16(y) && aligned16(z) && aligned16(x);
    axpby_k<<<grid_for(vec_items(n, vec), 256), 256, 0, cs()>>>(y, z, x, a, b, n, vec);
    check_launch("axpby");
}

extern "C" void m1c_cuda_scale(float *x, int64_t n, float s) {
    if (n <= 0) return;
    const int vec = aligned16(x);
    scale_k<<<grid_for(vec_items(n, vec), 256), 256, 0, cs()>>>(x, n, s, vec);
    check_launch("scale");
}

extern "C" double m1c_cuda_sumsq(const float *x, int64_t n) {
    if (n <= 0) return 0;
    enum { BLOCKS = 1024 };
    double host[BLOCKS];
    double *part = (double *)cached(SLOT_SUMSQ, BLOCKS, sizeof(double), "sum of squares");
    if (!part) return NAN;
    sumsq_k<<<BLOCKS, 256, 0, cs()>>>(part, x, n);
    check_launch("sumsq");
    if (to_host(host, part, sizeof host) != cudaSuccess) {
        check(cudaGetLastError(), "sumsq copy");
        return NAN;
    }
    double s = 0;
    for (int i = 0; i < BLOCKS; i++) s += host[i];
    return s;
}

extern "C" int64_t m1c_cuda_count_nonfinite(const float *x, int64_t n) {
    if (n <= 0) return 0;
    unsigned long long k = 0;
    unsigned long long *d = (unsigned long long *)cached(SLOT_NONFINITE, 1, sizeof k, "non-finite count");
    if (!d) return n; /* unknown: report everything non-finite rather than nothing */
    check(cudaMemsetAsync(d, 0, sizeof k, cs()), "count_nonfinite memset");
    nonfinite_k<<<grid_for(n, 256) < 1024 ? grid_for(n, 256) : 1024, 256, 0, cs()>>>(d, x, n);
    check_launch("count_nonfinite");
    if (to_host(&k, d, sizeof k) != cudaSuccess) {
        check(cudaGetLastError(), "count_nonfinite copy");
        return n;
    }
    return (int64_t)k;
}

extern "C" void m1c_cuda_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    if (n <= 0) return;
    to_bf16((__nv_bfloat16 *)dst, src, n);
}
