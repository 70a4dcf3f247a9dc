/* topk on CUDA: the same math as topk.c (read its header comment), for compute dtypes F32 and BF16.
 *
 * Forward: (jitter) -> router GEMM in f32 from the f32 input (BF16 too: routing equals the CPU's) ->
 * softmax + top-k + renormalisation, one thread per token -> capacity and a stable counting sort by
 * expert (one block per expert ranks its assignments in token order, so the same assignments are
 * dropped as on the CPU; a one-thread scan gives the offsets; a scatter places the rows) -> aux loss
 * (one block, double) -> gather rows (cast to the compute dtype) -> per-expert GEMMs through
 * h->gemm_ex (the expert offsets are copied to the host once per call) -> SwiGLU -> down GEMM into f32
 * rows -> combine: each token gathers its k expert rows (no atomics, fixed order).
 * Backward mirrors topk.c: per-token router kernel (d weights, renormalisation, aux loss, softmax) and
 * weighted d rows -> per-expert GEMMs -> SwiGLU backward -> un-permute per token -> router GEMMs.
 *
 * BF16 (unless M1C_MOE_GEMM=cublas): the expert GEMMs are one grouped tensor-core kernel per product
 * that reads the expert offsets on the device (grouped_gemm_kernel), and the elementwise kernels read
 * the kept row count there too: forward and backward never wait for the host. F32 keeps the
 * per-expert cuBLAS calls (f32 GEMMs without tensor cores, exact to ~1e-6), with one host copy of the
 * offsets per call.
 *
 * Jitter: the noise is U(1-j, 1+j) from a counter-based hash of (noise_seed, element index), not the
 * CPU's xoshiro stream: the same noise_seed gives the same noise on the GPU every time, but not the
 * CPU's noise. Evaluation (training = 0) never applies it. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/mma.cuh"
#include "../moe_cuda.cuh"
#include "../topk_route.h"
#include "../topk_cuda.cuh"

/* ---- CUDA kernels ------------------------------------------------------------------------------ */

static __device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* noise = U(1-j, 1+j) per element; xr = in * noise. */
__global__ void jitter_kernel(float *noise, float *xr, const float *in, int64_t n, uint64_t seed, float j) {
    MOE_GRID_LOOP(i, n) {
        const uint64_t r = splitmix64(seed ^ splitmix64((uint64_t)i));
        const float u = (float)(r >> 40) * (1.0f / 16777216.0f); /* 24 bits: [0, 1) */
        const float z = 1.0f + j * (2.0f * u - 1.0f);
        noise[i] = z;
        xr[i] = in[i] * z;
    }
}

/* xr = in * noise (backward recomputes the router input instead of keeping it). */
__global__ void mul_kernel(float *xr, const float *in, const float *noise, int64_t n) {
    MOE_GRID_LOOP(i, n) xr[i] = in[i] * noise[i];
}

/* din += t * noise. */
__global__ void add_mul_kernel(float *din, const float *t, const float *noise, int64_t n) {
    MOE_GRID_LOOP(i, n) din[i] += t[i] * noise[i];
}

/* Per token (one thread): softmax of the logits in probs (in place), top-k, combine weights, by the
 * CPU reference's own code (../topk_route.h). */
__global__ void router_kernel(float *probs, int32_t *idx, float *w, int N, int E, int k, int normalize) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    topk_route_token(probs + (int64_t)n * E, idx + (int64_t)n * k, w + (int64_t)n * k, E, k, normalize);
}

/* Capacity and the stable counting sort, in three passes over chunks of RK_CHUNK assignments (token
 * order = assignment order a = n * k + j):
 *   rank_count_kernel: per chunk, how many of its assignments go to each expert -> tab[chunk][e];
 *   rank_scan_kernel (one block): per expert, the exclusive scan of tab over the chunks (the rank of the
 *     chunk's first assignment to e), routed / kept counts, offsets, dropped and assignment counts;
 *   rank_scatter_kernel: per chunk, in RK_CHUNK / RK_THREADS rounds of one assignment per thread, the
 *     rank among e's assignments = chunk base + earlier warps of the round (a per-warp count table) +
 *     earlier lanes of the warp (__match_any_sync); rank < cap keeps it: pos = off[e] + rank, rowtok.
 * The same ranks as a serial walk in token order, so the same assignments are dropped as on the CPU;
 * O(N*k / threads) steps instead of one block per expert walking all N*k. */
enum { RK_THREADS = 256, RK_CHUNK = 1024, RK_WARPS = RK_THREADS / 32 };

__global__ void __launch_bounds__(RK_THREADS) rank_count_kernel(int32_t *tab, const int32_t *idx, int64_t Nk, int E) {
    extern __shared__ int rk_hist[]; /* [E] */
    for (int e = threadIdx.x; e < E; e += RK_THREADS) rk_hist[e] = 0;
    __syncthreads();
    const int64_t a0 = (int64_t)blockIdx.x * RK_CHUNK;
    for (int i = threadIdx.x; i < RK_CHUNK; i += RK_THREADS)
        if (a0 + i < Nk) atomicAdd(&rk_hist[idx[a0 + i]], 1); /* counts: the order does not matter */
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += RK_THREADS) tab[(int64_t)blockIdx.x * E + e] = rk_hist[e];
}

/* Exclusive scan of v over the block (RK_THREADS threads); *total (shared) gets the sum. */
static __device__ int block_excl_scan(int v, int *warp_sh, int *total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int x = v;
    #pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    __syncthreads(); /* warp_sh / total may still be read from a previous call */
    if (lane == 31) warp_sh[warp] = x;
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < RK_WARPS; w++) {
        before += w < warp ? warp_sh[w] : 0;
        sum += warp_sh[w];
    }
    if (threadIdx.x == 0) *total = sum;
    __syncthreads();
    return before + x - v;
}

/* One block: tab[c][e] becomes the number of e's assignments in chunks before c; counts and offsets. */
__global__ void __launch_bounds__(RK_THREADS) rank_scan_kernel(int32_t *tab, int32_t *off, int32_t *cnt, int64_t nch,
                                                                int E, int64_t Nk, int64_t cap) {
    __shared__ int warp_sh[RK_WARPS];
    __shared__ int total;
    int32_t *routed = cnt + C_ROUTED, *kept = cnt + C_ROUTED + E;
    for (int e = 0; e < E; e++) {
        int carry = 0;
        for (int64_t c0 = 0; c0 < nch; c0 += RK_THREADS) {
            const int64_t c = c0 + threadIdx.x;
            const int v = c < nch ? tab[c * E + e] : 0;
            const int ex = block_excl_scan(v, warp_sh, &total);
            if (c < nch) tab[c * E + e] = carry + ex;
            carry += total;
        }
        if (threadIdx.x == 0) {
            routed[e] = carry;
            kept[e] = (int32_t)(carry < cap ? carry : cap);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t dropped = 0;
        off[0] = 0;
        for (int e = 0; e < E; e++) {
            off[e + 1] = off[e] + kept[e];
            dropped += routed[e] - kept[e];
        }
        cnt[C_DROPPED] = (int32_t)dropped;
        cnt[C_ASSIGN] = (int32_t)Nk;
    }
}

/* Per chunk: each assignment's rank in token order among its expert's; kept ones get their global row
 * (pos = off[e] + rank) and the row its token; dropped ones pos = -1. */
__global__ void __launch_bounds__(RK_THREADS) rank_scatter_kernel(int32_t *pos, int32_t *rowtok, const int32_t *idx,
                                                                   const int32_t *tab, const int32_t *off, int64_t Nk,
                                                                   int k, int E, int64_t cap) {
    extern __shared__ int rk_sh[];
    int *base = rk_sh;      /* [E]: rank of the next assignment to e */
    int *wcnt = rk_sh + E;  /* [RK_WARPS][E]: this round's assignments to e per warp */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned lt = (1u << lane) - 1u;
    for (int e = threadIdx.x; e < E; e += RK_THREADS) base[e] = tab[(int64_t)blockIdx.x * E + e];
    for (int i = threadIdx.x; i < RK_WARPS * E; i += RK_THREADS) wcnt[i] = 0;
    __syncthreads(); /* base set, wcnt cleared */
    for (int r0 = 0; r0 < RK_CHUNK; r0 += RK_THREADS) {
        const int64_t a = (int64_t)blockIdx.x * RK_CHUNK + r0 + threadIdx.x;
        const int valid = a < Nk, e = valid ? idx[a] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        if (valid && (same & lt) == 0) wcnt[warp * E + e] = __popc(same); /* the lowest lane of its group */
        __syncthreads(); /* wcnt written */
        if (valid) {
            int before = 0;
            for (int w = 0; w < warp; w++) before += wcnt[w * E + e];
            const int64_t rank = (int64_t)base[e] + before + __popc(same & lt);
            if (rank < cap) {
                const int32_t row = off[e] + (int32_t)rank;
                pos[a] = row;
                rowtok[row] = (int32_t)(a / k);
            } else {
                pos[a] = -1;
            }
        }
        __syncthreads(); /* every rank has read base and wcnt */
        for (int e2 = threadIdx.x; e2 < E; e2 += RK_THREADS) { /* one thread per expert: advance, clear */
            int t = 0;
            for (int w = 0; w < RK_WARPS; w++) {
                t += wcnt[w * E + e2];
                wcnt[w * E + e2] = 0;
            }
            base[e2] += t;
        }
        __syncthreads(); /* base advanced and wcnt cleared before the next round */
    }
}

/* Sum of v over the block (blockDim a power of two <= MOE_THREADS), returned to every thread. */
static __device__ double block_sum(double v, double *sh) {
    __syncthreads(); /* sh may still be read from a previous call */
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

/* Aux loss in two passes (deterministic: fixed summation order, no atomics).
 * aux_part_kernel: block b sums probs[n, e] (double) over its tokens [b * AUX_ROWS, (b + 1) * AUX_ROWS)
 *   into part[b][e]: per thread one token, warp shuffles, then the warps in order.
 * aux_kernel (one block): P_e = sum over blocks / N, f_e from the routed counts, aux = coef E sum f_e P_e.
 *   Without partial sums (part NULL) it sums probs itself: for calls of so few tokens that the scratch
 *   holding the partial sums is too small. */
enum { AUX_ROWS = 256 };

__global__ void __launch_bounds__(AUX_ROWS) aux_part_kernel(double *part, const float *probs, int N, int E) {
    extern __shared__ double aux_sh[]; /* [AUX_ROWS / 32][E] */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t n = (int64_t)blockIdx.x * AUX_ROWS + threadIdx.x;
    for (int e = 0; e < E; e++) {
        double v = n < N ? (double)probs[n * E + e] : 0.0;
        #pragma unroll
        for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
        if (lane == 0) aux_sh[warp * E + e] = v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += AUX_ROWS) {
        double s = 0.0;
        for (int w = 0; w < AUX_ROWS / 32; w++) s += aux_sh[w * E + e];
        part[(int64_t)blockIdx.x * E + e] = s;
    }
}

__global__ void aux_kernel(float *st, const int32_t *cnt, const double *part, int nb, const float *probs, int N, int E,
                           int k, double coef, int jit) {
    __shared__ double sh[MOE_THREADS];
    double aux = 0.0;
    for (int e = 0; e < E; e++) {
        double s = 0.0;
        if (part)
            for (int b = threadIdx.x; b < nb; b += blockDim.x) s += part[(int64_t)b * E + e];
        else /* no room for the partial sums (a handful of tokens): sum the probabilities here */
            for (int n = threadIdx.x; n < N; n += blockDim.x) s += probs[(int64_t)n * E + e];
        const double P = block_sum(s, sh) / N;
        const double f = (double)cnt[C_ROUTED + e] / ((double)N * k);
        if (threadIdx.x == 0) {
            st[ST_F + e] = (float)f;
            st[ST_F + E + e] = (float)P;
        }
        aux += f * P;
    }
    if (threadIdx.x == 0) {
        aux *= coef * E;
        st[ST_AUX] = (float)aux;
        st[ST_AUX_LO] = (float)(aux - (double)st[ST_AUX]);
        st[ST_N] = (float)N;
        st[ST_JIT] = (float)jit;
    }
}

/* xs[r] = in[rowtok[r]] for the R kept rows, cast to T. */
template <typename T>
__global__ void gather_kernel(T *xs, const float *in, const int32_t *rowtok, int64_t R, int H) {
    MOE_GRID_LOOP(i, R * H) {
        const int64_t r = i / H, c = i % H;
        moe_st(xs, i, in[(int64_t)rowtok[r] * H + c]);
    }
}

/* Row kernels: blocks stride over rows, threads over a row's columns (no 64-bit division per element). */
#define MOE_ROW_LOOP(r, rows) for (int64_t r = blockIdx.x; r < (rows); r += gridDim.x)
static inline unsigned moe_row_blocks(int64_t rows) { return (unsigned)(rows < 32768 ? (rows > 0 ? rows : 1) : 32768); }

/* out[n] = sum over kept slots j (in order) of w[n,j] * Y[pos[n,j]]. */
__global__ void combine_kernel(float *out, const float *Y, const float *w, const int32_t *pos, int N, int H, int k) {
    MOE_ROW_LOOP(n, N) {
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float o = 0.0f;
            for (int j = 0; j < k; j++) {
                const int32_t r = pos[n * k + j];
                if (r >= 0) o += w[n * k + j] * Y[(int64_t)r * H + c];
            }
            out[n * H + c] = o;
        }
    }
}

/* Backward, one block per token: the weighted output gradient of each kept row (drow = w * dout, and
 * its T copy when dy_lp is set), d weights (dout . y), then d probs (renormalisation and aux loss) and
 * d logits through the softmax, into dlog (the token's row doubles as the d probs workspace). */
template <typename T>
__global__ void router_bwd_kernel(float *dlog, float *dw, float *drow, T *dy_lp, const float *dout, const float *Y,
                                  const float *probs, const int32_t *idx, const float *w, const int32_t *pos,
                                  const float *st, double aux_g, int H, int E, int k, int normalize) {
    __shared__ double sh[MOE_THREADS];
    const int64_t n = blockIdx.x;
    const float *p = probs + n * E, *g = dout + n * H, *wn = w + n * k;
    const int32_t *id = idx + n * k, *ps = pos + n * k;
    float *dp = dlog + n * E, *dwn = dw + n * k;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dp[e] = (float)(aux_g * st[ST_F + e]);
    double sdw = 0.0; /* meaningful in thread 0 */
    for (int j = 0; j < k; j++) {
        double d = 0.0;
        if (ps[j] >= 0) {
            const float *y = Y + (int64_t)ps[j] * H;
            float *dr = drow + (int64_t)ps[j] * H;
            for (int c = threadIdx.x; c < H; c += blockDim.x) {
                d += (double)g[c] * y[c];
                dr[c] = wn[j] * g[c];
                if (dy_lp) moe_st(dy_lp, (int64_t)ps[j] * H + c, wn[j] * g[c]);
            }
            d = block_sum(d, sh);
        }
        if (threadIdx.x == 0) {
            dwn[j] = (float)d;
            sdw += d * wn[j];
        }
    }
    __syncthreads(); /* dp's aux part is written */
    if (threadIdx.x == 0) {
        double ssel = 0.0;
        for (int j = 0; j < k; j++) ssel += p[id[j]];
        for (int j = 0; j < k; j++) dp[id[j]] += normalize ? (float)(((double)dwn[j] - sdw) / ssel) : dwn[j];
    }
    __syncthreads();
    double s = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) s += (double)p[e] * dp[e];
    s = block_sum(s, sh);
    for (int e = threadIdx.x; e < E; e += blockDim.x) dp[e] = p[e] * (float)(dp[e] - s);
}

/* din[n] += the d x rows of the token's kept slots, in slot order. */
__global__ void unpermute_kernel(float *din, const float *drow, const int32_t *pos, int N, int H, int k) {
    MOE_ROW_LOOP(n, N) {
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float acc = din[n * H + c];
            for (int j = 0; j < k; j++) {
                const int32_t r = pos[n * k + j];
                if (r >= 0) acc += drow[(int64_t)r * H + c];
            }
            din[n * H + c] = acc;
        }
    }
}

/* The kept row count R = off[E] lives on the device in the grouped path: these kernels are launched
 * for the most rows there can be (N*k) and read R themselves. */
template <typename T>
__global__ void gather_dev_kernel(T *xs, const float *in, const int32_t *rowtok, const int32_t *R, int H) {
    const int64_t rows = *R;
    MOE_ROW_LOOP(r, rows) {
        const float *src = in + (int64_t)rowtok[r] * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) moe_st(xs, r * H + c, src[c]);
    }
}

template <typename T>
__global__ void swiglu_fwd_dev_kernel(T *act, const T *gu, const int32_t *R, int F) {
    const int64_t rows = *R;
    MOE_ROW_LOOP(r, rows) {
        for (int f = threadIdx.x; f < F; f += blockDim.x) {
            const float g = moe_ld(gu, r * 2 * F + f), u = moe_ld(gu, r * 2 * F + F + f);
            const float s = 1.0f / (1.0f + expf(-g));
            moe_st(act, r * F + f, g * s * u);
        }
    }
}

/* As moe_swiglu_bwd_kernel (moe_cuda.cuh), for the device-side row count. */
template <typename T>
__global__ void swiglu_bwd_dev_kernel(T *dgu, const float *dact, const T *gu, const int32_t *R, int F) {
    const int64_t rows = *R;
    MOE_ROW_LOOP(r, rows) {
        for (int f = threadIdx.x; f < F; f += blockDim.x) {
            const float g = moe_ld(gu, r * 2 * F + f), u = moe_ld(gu, r * 2 * F + F + f);
            const float s = 1.0f / (1.0f + expf(-g)), da = dact[r * F + f];
            moe_st(dgu, r * 2 * F + F + f, da * g * s);
            moe_st(dgu, r * 2 * F + f, da * u * s * (1.0f + g * (1.0f - s)));
        }
    }
}

/* Router input for dWr without asking the host whether the forward was jittered: xr = in * noise when
 * it was (the stats say so), else in. */
__global__ void router_in_kernel(float *xr, const float *in, const float *noise, const float *st, int64_t n) {
    const int jit = st[ST_JIT] != 0.0f;
    MOE_GRID_LOOP(i, n) xr[i] = jit ? in[i] * noise[i] : in[i];
}

/* din += t * noise when the forward was jittered, else din += t. */
__global__ void add_router_kernel(float *din, const float *t, const float *noise, const float *st, int64_t n) {
    const int jit = st[ST_JIT] != 0.0f;
    MOE_GRID_LOOP(i, n) din[i] += jit ? t[i] * noise[i] : t[i];
}

/* ---- grouped expert GEMM (BF16) ----------------------------------------------------------------- */

/* One launch covers every expert, reading the expert row offsets on the device: no host copy, no
 * synchronisation, one shape for all calls. bf16 operands on tensor cores (mma.sync m16n8k16 fed by
 * ldmatrix), f32 accumulation, as cuBLAS's GemmEx with CUBLAS_COMPUTE_32F. Block tile GG_BM x GG_BN, K
 * step GG_BK, 8 warps in 2 x 4, each 64 x 32 (4 x 4 tiles of 16 x 8). Tiles are staged in shared memory
 * as they lie in global memory (row-major, rows padded by 16 bytes so that ldmatrix's row addresses hit
 * distinct banks); ldmatrix's transposing form gives the transposes. The staging is a GG_STAGES-deep ring filled
 * by cp.async (16-byte copies that zero-fill past the matrix edge), so the loads of the next tiles are
 * in flight while the tensor cores work on this one; where 16-byte copies are not possible (a leading
 * dimension not a multiple of 8 elements, say) ordinary element loads fill the same ring. Any M, N, K.
 * Modes (row-major, r over one expert's rows [off[e], off[e+1]), W_e = W + e * sw):
 *   GG_NT: C[r, n] = beta C + sum_k A[r, k] W_e[n, k]      (forward: x W^T)
 *   GG_NN: C[r, n] = beta C + sum_k A[r, k] W_e[k, n]      (backward: d rows W)
 *   GG_TN: C_e[m, n] = beta C_e + sum_r A[r, m] B[r, n]    (backward: weight gradients) */
enum { GG_NT, GG_NN, GG_TN };
enum { GG_BM = 128, GG_BN = 128, GG_BK = 32, GG_THREADS = 256, GG_PAD = 8, GG_STAGES = 4 };

/* Shared-memory geometry of one mode: A tile [BM][BK] (NT, NN) or [BK][BM] (TN); B tile [BN][BK] (NT)
 * or [BK][BN] (NN, TN); LD* are the padded row strides in elements. */
template <int MODE>
struct gg_geom {
    static constexpr int LDA = MODE == GG_TN ? GG_BM + GG_PAD : GG_BK + GG_PAD;
    static constexpr int LDB = MODE == GG_NT ? GG_BK + GG_PAD : GG_BN + GG_PAD;
    static constexpr int A_EL = MODE == GG_TN ? GG_BK * LDA : GG_BM * LDA;
    static constexpr int B_EL = MODE == GG_NT ? GG_BN * LDB : GG_BK * LDB;
    static constexpr int STAGE_EL = A_EL + B_EL;
    static constexpr size_t SMEM = (size_t)GG_STAGES * STAGE_EL * sizeof(__nv_bfloat16);
};

/* 16-byte global -> shared copy that reads `bytes` (0..16) and zero-fills the rest (cp.async.cg: L2
 * only, the tiles are streamed). Before sm_80, a plain load and store. */
static __device__ __forceinline__ void gg_cp16(__nv_bfloat16 *d, const __nv_bfloat16 *g, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned sa = (unsigned)__cvta_generic_to_shared(d);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(bytes) : "memory");
#else
    uint4 v = make_uint4(0, 0, 0, 0);
    if (bytes == 16) {
        v = *(const uint4 *)g;
    } else {
        for (int t = 0; t < bytes / 2; t++) ((__nv_bfloat16 *)&v)[t] = g[t];
    }
    *(uint4 *)d = v;
#endif
}
static __device__ __forceinline__ void gg_commit(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
/* Wait until at most N of this thread's copy groups are still pending. */
template <int N>
static __device__ __forceinline__ void gg_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* sm[r][c] = g[(r0 + r) * ldg + c0 + c] for r0 + r < r_end and c0 + c < c_end, else 0 (ROWS x COLS,
 * shared row stride LD). vec: 16-byte copies allowed (ldg % 8 == 0, g 16-byte aligned, c0 % 8 == 0):
 * asynchronous, complete after gg_wait; otherwise element by element, complete at once. */
template <int ROWS, int COLS, int LD>
static __device__ __forceinline__ void gg_load(__nv_bfloat16 *sm, const __nv_bfloat16 *g, int64_t ldg, int64_t r0,
                                               int64_t r_end, int64_t c0, int64_t c_end, bool vec) {
    constexpr int CH = COLS / 8;
    static_assert((ROWS * CH) % GG_THREADS == 0, "tile chunks divide among the threads");
    #pragma unroll
    for (int it = 0; it < ROWS * CH / GG_THREADS; it++) {
        const int i = threadIdx.x + it * GG_THREADS;
        const int r = i / CH, c = (i % CH) * 8;
        __nv_bfloat16 *d = sm + r * LD + c;
        const int64_t gr = r0 + r, gc = c0 + c;
        if (vec) {
            const int64_t left = gr < r_end ? c_end - gc : 0;
            const int bytes = left >= 8 ? 16 : left > 0 ? (int)left * 2 : 0;
            gg_cp16(d, bytes > 0 ? g + gr * ldg + gc : g, bytes); /* no bytes read: any valid address */
        } else {
            for (int t = 0; t < 8; t++)
                d[t] = gr < r_end && gc + t < c_end ? g[gr * ldg + gc + t] : __float2bfloat16_rn(0.0f);
        }
    }
}

/* The 16-byte copies of one thread for one operand tile, set up once per block: the tile is ROWS x COLS
 * of a row-major matrix whose K index runs along the columns (KCOL) or the rows; per copy the source at
 * the first K step, the shared offset in bytes, its position along K within the tile and the bytes the
 * other dimension allows (16, fewer at a ragged edge, 0 outside). A K step then costs one add per copy. */
template <int ROWS, int COLS, int LD, bool KCOL>
struct gg_copies {
    static constexpr int N = ROWS * (COLS / 8) / GG_THREADS;
    const __nv_bfloat16 *src[N];
    uint32_t dst[N];
    int kpos[N], bytes[N];
    int64_t kstep;                 /* elements from one K step to the next */
    const __nv_bfloat16 *base;     /* a valid address for copies that read nothing */

    /* g: the matrix; rows from r0 (< r_end valid), columns from c0 (< c_end valid), at K = k_begin. */
    __device__ void init(const __nv_bfloat16 *g, int64_t ldg, int64_t r0, int64_t r_end, int64_t c0, int64_t c_end,
                         uint32_t smem) {
        constexpr int CH = COLS / 8;
        kstep = KCOL ? GG_BK : GG_BK * ldg;
        base = g;
        #pragma unroll
        for (int it = 0; it < N; it++) {
            const int i = threadIdx.x + it * GG_THREADS, r = i / CH, c = (i % CH) * 8;
            const int64_t gr = r0 + r, gc = c0 + c;
            dst[it] = smem + (uint32_t)(r * LD + c) * 2;
            kpos[it] = KCOL ? c : r;
            /* the non-K dimension's bound; the K bound is checked per step */
            const int64_t left = KCOL ? (gr < r_end ? 8 : 0) : (c_end - gc);
            bytes[it] = left >= 8 ? 16 : left > 0 ? (int)left * 2 : 0;
            src[it] = bytes[it] > 0 ? g + gr * ldg + gc : g;
        }
    }
    /* K step kt (K from k0 = k_begin + kt * BK, valid below k_end) into the stage at byte offset so. */
    __device__ __forceinline__ void load(int kt, int64_t k0, int64_t k_end, uint32_t so) const {
        #pragma unroll
        for (int it = 0; it < N; it++) {
            const int64_t kleft = k_end - k0 - kpos[it];
            int b = bytes[it];
            if (KCOL) b = kleft >= 8 ? b : (kleft > 0 && b ? (int)kleft * 2 : 0);
            else b = kleft > 0 ? b : 0;
            const __nv_bfloat16 *g = b ? src[it] + kt * kstep : base;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst[it] + so), "l"(g), "r"(b)
                         : "memory");
        }
    }
};

/* One K step's tiles (k0 .. k0 + BK) into a stage. */
template <int MODE>
static __device__ __forceinline__ void gg_load_stage(__nv_bfloat16 *st, const __nv_bfloat16 *A, int64_t lda,
                                                     const __nv_bfloat16 *B, int64_t ldb, int64_t m0, int64_t m_end,
                                                     int64_t n0, int64_t Nc, int64_t k0, int64_t k_end, bool vec) {
    typedef gg_geom<MODE> G;
    __nv_bfloat16 *As = st, *Bs = st + G::A_EL;
    if (MODE == GG_NT) {
        gg_load<GG_BM, GG_BK, G::LDA>(As, A, lda, m0, m_end, k0, k_end, vec);
        gg_load<GG_BN, GG_BK, G::LDB>(Bs, B, ldb, n0, Nc, k0, k_end, vec);
    } else if (MODE == GG_NN) {
        gg_load<GG_BM, GG_BK, G::LDA>(As, A, lda, m0, m_end, k0, k_end, vec);
        gg_load<GG_BK, GG_BN, G::LDB>(Bs, B, ldb, k0, k_end, n0, Nc, vec);
    } else {
        gg_load<GG_BK, GG_BM, G::LDA>(As, A, lda, k0, k_end, m0, m_end, vec);
        gg_load<GG_BK, GG_BN, G::LDB>(Bs, B, ldb, k0, k_end, n0, Nc, vec);
    }
}

/* Two consecutive outputs of one row (n_ok of them in bounds): beta, the output dtype; one paired
 * access where allowed (cvec: ldc even, C aligned). */
static __device__ __forceinline__ void gg_store2(float *C, int64_t i, int n_ok, float v0, float v1, float beta,
                                                 bool cvec) {
    if (cvec && n_ok == 2) {
        float2 o = make_float2(v0, v1);
        if (beta != 0.0f) {
            const float2 c = *(const float2 *)(C + i);
            o.x += beta * c.x, o.y += beta * c.y;
        }
        *(float2 *)(C + i) = o;
        return;
    }
    C[i] = beta != 0.0f ? v0 + beta * C[i] : v0;
    if (n_ok == 2) C[i + 1] = beta != 0.0f ? v1 + beta * C[i + 1] : v1;
}
static __device__ __forceinline__ void gg_store2(__nv_bfloat16 *C, int64_t i, int n_ok, float v0, float v1, float beta,
                                                 bool cvec) {
    if (beta != 0.0f) {
        v0 += beta * __bfloat162float(C[i]);
        if (n_ok == 2) v1 += beta * __bfloat162float(C[i + 1]);
    }
    if (cvec && n_ok == 2) {
        *(__nv_bfloat162 *)(C + i) = __floats2bfloat162_rn(v0, v1);
        return;
    }
    C[i] = __float2bfloat16_rn(v0);
    if (n_ok == 2) C[i + 1] = __float2bfloat16_rn(v1);
}

/* vec: 16-byte operand copies allowed (see gg_load); cvec: 16-byte output accesses allowed (ldc and sc
 * multiples of 8 elements, C 16-byte aligned). Dynamic shared memory: gg_geom<MODE>::SMEM bytes. */
template <int MODE, typename TC>
__global__ void __launch_bounds__(GG_THREADS, 2)
    grouped_gemm_kernel(TC *C, int64_t ldc, int64_t sc, const __nv_bfloat16 *A, int64_t lda,
                        const __nv_bfloat16 *B, int64_t ldb, int64_t sb, const int32_t *off, int E, int Mc, int Nc,
                        int K, float beta, int vec, int cvec) {
    typedef gg_geom<MODE> G;
    extern __shared__ __align__(128) unsigned char gg_smem[];
    __nv_bfloat16 *ring = (__nv_bfloat16 *)gg_smem;

    /* This block's expert and output tile. */
    int e = 0;
    /* NT, NN: column tiles fastest (blockIdx.x), so the blocks that run together share their A rows, read
     * from DRAM once and from L2 by the others; TN: grid (M tiles, N tiles, expert) */
    int64_t m0, n0 = (int64_t)(MODE == GG_TN ? blockIdx.y : blockIdx.x) * GG_BN, m_end, row0 = 0, row_end = 0;
    if (MODE == GG_TN) {
        e = blockIdx.z;
        m0 = (int64_t)blockIdx.x * GG_BM;
        m_end = Mc;
        row0 = off[e];
        row_end = off[e + 1];
        if (row0 == row_end && beta == 1.0f) return; /* C_e += 0 */
    } else {
        /* Row tiles are numbered expert after expert: find the one with blockIdx.y. */
        int64_t t = blockIdx.y;
        for (e = 0; e < E; e++) {
            const int64_t ne = off[e + 1] - off[e], nt = (ne + GG_BM - 1) / GG_BM;
            if (t < nt) break;
            t -= nt;
        }
        if (e == E) return; /* past the last tile */
        m0 = off[e] + t * GG_BM;
        m_end = off[e + 1];
        B += (int64_t)e * sb;
    }
    if (n0 >= Nc) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / 4, wn = warp % 4;
    /* this lane's ldmatrix row offsets (bytes) in the A and B tiles (../../common/mma.cuh) */
    const uint32_t a_lane = MODE == GG_TN ? mma_lane_cr(lane, G::LDA * 2) : mma_lane_rc(lane, G::LDA * 2);
    const uint32_t b_lane = MODE == GG_NT ? mma_lane_cr(lane, G::LDB * 2) : mma_lane_rc(lane, G::LDB * 2);

    /* The warp's 64 x 32 of C as 4 x 4 mma.sync tiles of 16 x 8 (../../common/mma.cuh for the layouts). */
    float acc[4][4][4];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

    const int64_t k_begin = MODE == GG_TN ? row0 : 0, k_end = MODE == GG_TN ? row_end : K;
    const int nk = (int)((k_end - k_begin + GG_BK - 1) / GG_BK);
    /* The vector path's copies (A: [BM][BK] with K along columns, or [BK][BM] for TN; B: [BN][BK] for NT,
     * else [BK][BN]), set up once. */
    const uint32_t ring_s = mma_smem(ring);
    gg_copies<MODE == GG_TN ? GG_BK : GG_BM, MODE == GG_TN ? GG_BM : GG_BK, G::LDA, MODE != GG_TN> ca;
    gg_copies<MODE == GG_NT ? GG_BN : GG_BK, MODE == GG_NT ? GG_BK : GG_BN, G::LDB, MODE == GG_NT> cb;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (vec) {
        if (MODE == GG_TN) ca.init(A, lda, k_begin, k_end, m0, m_end, ring_s);
        else ca.init(A, lda, m0, m_end, k_begin, k_end, ring_s);
        if (MODE == GG_NT) cb.init(B, ldb, n0, Nc, k_begin, k_end, ring_s + G::A_EL * 2);
        else cb.init(B, ldb, k_begin, k_end, n0, Nc, ring_s + G::A_EL * 2);
    }
    const bool fast = vec != 0;
#else
    const bool fast = false;
#endif
    auto stage = [&](int p) { /* K step p into its stage of the ring */
        if (fast) {
            const uint32_t so = (uint32_t)((p % GG_STAGES) * G::STAGE_EL * 2);
            ca.load(p, k_begin + (int64_t)p * GG_BK, k_end, so);
            cb.load(p, k_begin + (int64_t)p * GG_BK, k_end, so);
        } else {
            gg_load_stage<MODE>(ring + (p % GG_STAGES) * G::STAGE_EL, A, lda, B, ldb, m0, m_end, n0, Nc,
                                k_begin + (int64_t)p * GG_BK, k_end, vec);
        }
    };
    /* Prologue: the first STAGES - 1 K steps in flight (one commit group each, empty past the end, so
     * that the group count below stays exact). */
    #pragma unroll
    for (int p = 0; p < GG_STAGES - 1; p++) {
        if (p < nk) stage(p);
        gg_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        gg_wait<GG_STAGES - 2>(); /* this thread's copies for step kt have landed */
        __syncthreads();          /* ... everyone's, and everyone is done with step kt - 1's stage */
        {
            const int p = kt + GG_STAGES - 1; /* refill the stage step kt - 1 used */
            if (p < nk) stage(p);
            gg_commit();
        }
        const uint32_t As = ring_s + (uint32_t)((kt % GG_STAGES) * G::STAGE_EL * 2) + a_lane,
                       Bs = ring_s + (uint32_t)((kt % GG_STAGES) * G::STAGE_EL * 2 + G::A_EL * 2) + b_lane;
        #pragma unroll
        for (int kk = 0; kk < GG_BK; kk += 16) {
            /* A fragments: rows m, columns k; stored [m][k] (NT, NN), or [k][m] (TN: transposed loads) */
            uint32_t fa[4][4], fb[2][4];
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const int mr = wm * 64 + i * 16;
                if (MODE == GG_TN) mma_ldsm4t(fa[i], As + (kk * G::LDA + mr) * 2);
                else mma_ldsm4(fa[i], As + (mr * G::LDA + kk) * 2);
            }
            /* B fragments of two 8-column tiles each: stored [n][k] (NT), or [k][n] (NN, TN: transposed) */
            #pragma unroll
            for (int j = 0; j < 2; j++) {
                const int nc = wn * 32 + j * 16;
                if (MODE == GG_NT) mma_ldsm4(fb[j], Bs + (nc * G::LDB + kk) * 2);
                else mma_ldsm4t(fb[j], Bs + (kk * G::LDB + nc) * 2);
            }
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 2; j++) {
                    mma_16816(acc[i][2 * j], fa[i], fb[j][0], fb[j][1]);
                    mma_16816(acc[i][2 * j + 1], fa[i], fb[j][2], fb[j][3]);
                }
        }
    }
    gg_wait<0>(); /* only empty groups can be left */

    /* Epilogue from the registers: each lane holds rows g and g + 8, columns 2t and 2t + 1 of every tile;
     * bounds, beta and the output dtype per pair. */
    TC *Cb = MODE == GG_TN ? C + (int64_t)e * sc : C;
    const int g = lane / 4, t4 = lane % 4;
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t gm = m0 + wm * 64 + i * 16 + g + 8 * h;
            if (gm >= m_end) continue;
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                const int64_t gn = n0 + wn * 32 + j * 8 + 2 * t4;
                if (gn < Nc) gg_store2(Cb, gm * ldc + gn, Nc - gn < 2 ? 1 : 2, acc[i][j][2 * h], acc[i][j][2 * h + 1],
                                       beta, cvec != 0);
            }
        }
}

/* ---- kernel launchers -------------------------------------------------------------------------- */

/* The grouped GEMM (see grouped_gemm_kernel) for rows up to Nk in all; Mc is C's row count in GG_TN
 * (the weight-gradient rows), unused otherwise. */
template <int MODE, typename TC>
static int grouped_gemm(const m1c_host *h, cudaStream_t s, TC *C, int64_t ldc, int64_t sc, const __nv_bfloat16 *A,
                        int64_t lda, const __nv_bfloat16 *B, int64_t ldb, int64_t sb, const int32_t *off, int E,
                        int64_t Nk, int Mc, int Nc, int K, float beta) {
    typedef gg_geom<MODE> G;
    const int vec = lda % 8 == 0 && ldb % 8 == 0 && sb % 8 == 0 && (uintptr_t)A % 16 == 0 && (uintptr_t)B % 16 == 0;
    const int cvec = ldc % 8 == 0 && sc % 8 == 0 && (uintptr_t)C % 16 == 0;
    dim3 grid;
    if (MODE == GG_TN)
        grid = dim3((unsigned)((Mc + GG_BM - 1) / GG_BM), (unsigned)((Nc + GG_BN - 1) / GG_BN), (unsigned)E);
    else /* at most sum_e ceil(n_e / BM) <= Nk / BM + E row tiles */
        grid = dim3((unsigned)((Nc + GG_BN - 1) / GG_BN), (unsigned)((Nk + GG_BM - 1) / GG_BM + E), 1);
    if (grid.x == 0 || grid.y == 0) return M1C_OK;
    if (grid.y > 65535 || grid.z > 65535)
        return h->error(h, "topk: %u row tiles of %d exceed the CUDA grid (at most 65535)", grid.y, (int)GG_BM);
    /* Above 48 KB of dynamic shared memory only once allowed (per device; cheap to repeat). */
    MOE_CUDA_CHECK(h, cudaFuncSetAttribute(grouped_gemm_kernel<MODE, TC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)G::SMEM));
    grouped_gemm_kernel<MODE, TC><<<grid, GG_THREADS, G::SMEM, s>>>(C, ldc, sc, A, lda, B, ldb, sb, off, E, Mc, Nc, K,
                                                                    beta, vec, cvec);
    MOE_LAUNCH_CHECK(h, "grouped_gemm_kernel");
    return M1C_OK;
}

/* Opt-in phase timer (environment M1C_MOE_PROFILE set and not "0"): events recorded on the stream
 * between phases, and at the end of the call one line per phase on stderr (milliseconds, GPU time
 * between consecutive events). The call then waits for the GPU, so only for profiling; unset, it is a
 * getenv per call and nothing on the GPU. The state lives on the caller's stack (no global state). */
enum { PROF_MAX = 24 };
typedef struct moe_prof {
    int on, n;
    cudaStream_t s;
    cudaEvent_t ev[PROF_MAX];
    const char *name[PROF_MAX];
} moe_prof;

static void prof_init(moe_prof *p, cudaStream_t s) {
    const char *v = getenv("M1C_MOE_PROFILE");
    memset(p, 0, sizeof(*p));
    p->s = s;
    if (!v || !*v || strcmp(v, "0") == 0) return;
    if (cudaEventCreate(&p->ev[0]) != cudaSuccess || cudaEventRecord(p->ev[0], s) != cudaSuccess) {
        (void)cudaGetLastError(); /* a profiler that cannot start stays off; the call goes on */
        return;
    }
    p->on = 1, p->n = 1;
}

/* The phase `name` ends here. */
static void prof_mark(moe_prof *p, const char *name) {
    if (!p->on || p->n >= PROF_MAX) return;
    if (cudaEventCreate(&p->ev[p->n]) != cudaSuccess || cudaEventRecord(p->ev[p->n], p->s) != cudaSuccess) {
        (void)cudaGetLastError();
        return;
    }
    p->name[p->n++] = name;
}

/* Print the phases of `what` (fwd / bwd) and free the events. */
static void prof_end(moe_prof *p, const char *what, const topk_cuda_args *a) {
    if (!p->on) return;
    if (cudaEventSynchronize(p->ev[p->n - 1]) == cudaSuccess) {
        float total = 0.0f;
        for (int i = 1; i < p->n; i++) {
            float ms = 0.0f;
            if (cudaEventElapsedTime(&ms, p->ev[i - 1], p->ev[i]) != cudaSuccess) ms = -1.0f;
            total += ms;
            fprintf(stderr, "m1c_moe_profile %s N=%d H=%d E=%d k=%d F=%d %-14s %8.3f ms\n", what, a->N, a->H, a->E,
                    a->k, a->F, p->name[i], ms);
        }
        fprintf(stderr, "m1c_moe_profile %s N=%d H=%d E=%d k=%d F=%d %-14s %8.3f ms\n", what, a->N, a->H, a->E, a->k,
                a->F, "total", total);
    }
    (void)cudaGetLastError();
    for (int i = 0; i < p->n; i++) cudaEventDestroy(p->ev[i]);
    p->on = 0;
}

/* BF16 experts run through the grouped GEMM (no host synchronisation) unless M1C_MOE_GEMM=cublas asks
 * for the per-expert cuBLAS calls (the F32 path, which needs the offsets on the host): for comparing the
 * two on a GPU. */
static int use_grouped(int cdt) {
    const char *v = getenv("M1C_MOE_GEMM");
    return cdt == M1C_BF16 && !(v && strcmp(v, "cublas") == 0);
}

/* gemm_ex for one expert's rows; nothing to do for an expert without rows. */
#define GEMM(...)                                                    \
    do {                                                             \
        if (h->gemm_ex(h, M1C_DEVICE_CUDA, a->stream, __VA_ARGS__) != M1C_OK) return M1C_ERR; \
    } while (0)

template <typename T>
static int forward_impl(const topk_cuda_args *a, float *out, const float *in, moe_prof *pf) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F, cdt = a->cdt;
    const int64_t Nk = (int64_t)N * k;
    const int jit = a->jitter > 0 && a->training;

    const float *xr = in;
    if (jit) {
        jitter_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(a->noise, a->xr, in, (int64_t)N * H,
                                                                          a->noise_seed, (float)a->jitter);
        MOE_LAUNCH_CHECK(h, "jitter_kernel");
        xr = a->xr;
        prof_mark(pf, "jitter");
    }
    /* Router logits in f32 (both compute dtypes), then softmax / top-k. */
    GEMM(0, 1, N, E, H, 1.0f, xr, M1C_F32, H, 0, a->Wr, M1C_F32, H, 0, 0.0f, a->probs, M1C_F32, E, 0, 1);
    prof_mark(pf, "router_gemm");
    router_kernel<<<(N + 127) / 128, 128, 0, s>>>(a->probs, a->idx, a->w, N, E, k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_kernel");
    prof_mark(pf, "router");

    /* Capacity and the counting sort. The per-chunk count table lives in dlog (backward scratch, free
     * during forward): nch * E <= N * E int32 since RK_CHUNK >= k. */
    if (k > RK_CHUNK) return h->error(h, "topk: top_k %d above %d is not supported on CUDA", k, (int)RK_CHUNK);
    /* The ranking's and the aux partial sums' per-expert shared tables fit the default 48 KiB. */
    if (E > 512) return h->error(h, "topk: experts %d above 512 are not supported on CUDA", E);
    const int64_t nch = (Nk + RK_CHUNK - 1) / RK_CHUNK;
    int32_t *tab = (int32_t *)(void *)a->dlog;
    rank_count_kernel<<<(unsigned)nch, RK_THREADS, (size_t)E * sizeof(int), s>>>(tab, a->idx, Nk, E);
    MOE_LAUNCH_CHECK(h, "rank_count_kernel");
    rank_scan_kernel<<<1, RK_THREADS, 0, s>>>(tab, a->off, a->cnt, nch, E, Nk, a->cap);
    MOE_LAUNCH_CHECK(h, "rank_scan_kernel");
    rank_scatter_kernel<<<(unsigned)nch, RK_THREADS, (size_t)(1 + RK_WARPS) * E * sizeof(int), s>>>(
        a->pos, a->rowtok, a->idx, tab, a->off, Nk, k, E, a->cap);
    MOE_LAUNCH_CHECK(h, "rank_scatter_kernel");
    prof_mark(pf, "rank");
    /* Aux loss: per-block partial sums in drow (backward scratch, N*k*H floats), 8-byte aligned, where
     * they fit (always but for a handful of tokens). */
    const int nb = (N + AUX_ROWS - 1) / AUX_ROWS;
    double *part = (double *)(((uintptr_t)a->drow + 7) & ~(uintptr_t)7);
    if ((size_t)nb * E * sizeof(double) + 8 <= (size_t)Nk * H * sizeof(float)) {
        aux_part_kernel<<<(unsigned)nb, AUX_ROWS, (size_t)(AUX_ROWS / 32) * E * sizeof(double), s>>>(part, a->probs, N,
                                                                                                    E);
        MOE_LAUNCH_CHECK(h, "aux_part_kernel");
    } else {
        part = NULL;
    }
    aux_kernel<<<1, MOE_THREADS, 0, s>>>(a->st, a->cnt, part, nb, a->probs, N, E, k, a->aux_coef, jit);
    MOE_LAUNCH_CHECK(h, "aux_kernel");
    prof_mark(pf, "aux");

    T *xs = (T *)a->xs, *GU = (T *)a->gu, *act = (T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    if (use_grouped(cdt)) {
        /* Everything sized for N*k rows; the kernels read R = off[E] and the offsets on the device. */
        typedef __nv_bfloat16 bf;
        const int32_t *Rd = a->off + E;
        gather_dev_kernel<bf><<<moe_row_blocks(Nk), MOE_THREADS, 0, s>>>((bf *)xs, in, a->rowtok, Rd, H);
        MOE_LAUNCH_CHECK(h, "gather_dev_kernel");
        prof_mark(pf, "gather");
        if (grouped_gemm<GG_NT, bf>(h, s, (bf *)GU, 2 * F, 0, (const bf *)xs, H, (const bf *)Wgu, H, (int64_t)2 * F * H,
                                    a->off, E, Nk, 0, 2 * F, H, 0.0f) != M1C_OK)
            return M1C_ERR;
        prof_mark(pf, "gemm_gate_up");
        swiglu_fwd_dev_kernel<bf><<<moe_row_blocks(Nk), MOE_THREADS, 0, s>>>((bf *)act, (const bf *)GU, Rd, F);
        MOE_LAUNCH_CHECK(h, "swiglu_fwd_dev_kernel");
        prof_mark(pf, "swiglu");
        if (grouped_gemm<GG_NT, float>(h, s, a->Y, H, 0, (const bf *)act, F, (const bf *)Wd, F, (int64_t)H * F, a->off,
                                       E, Nk, 0, H, F, 0.0f) != M1C_OK)
            return M1C_ERR;
        prof_mark(pf, "gemm_down");
        combine_kernel<<<moe_row_blocks(N), MOE_THREADS, 0, s>>>(out, a->Y, a->w, a->pos, N, H, k);
        MOE_LAUNCH_CHECK(h, "combine_kernel");
        prof_mark(pf, "combine");
        return M1C_OK;
    }

    /* Per-expert cuBLAS calls: the offsets on the host. */
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_off, a->off, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    const int32_t *off = a->h_off;
    const int64_t R = off[E];
    prof_mark(pf, "offsets_to_host");

    if (R > 0) {
        gather_kernel<T><<<moe_blocks(R * H), MOE_THREADS, 0, s>>>(xs, in, a->rowtok, R, H);
        MOE_LAUNCH_CHECK(h, "gather_kernel");
    }
    prof_mark(pf, "gather");
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(0, 1, ne, 2 * F, H, 1.0f, xs + (int64_t)o * H, cdt, H, 0, Wgu + (int64_t)e * 2 * F * H, cdt, H, 0, 0.0f,
             GU + (int64_t)o * 2 * F, cdt, 2 * F, 0, 1);
    }
    prof_mark(pf, "gemm_gate_up");
    if (R > 0) {
        moe_swiglu_fwd_kernel<T><<<moe_blocks(R * F), MOE_THREADS, 0, s>>>(act, GU, R, F);
        MOE_LAUNCH_CHECK(h, "moe_swiglu_fwd_kernel");
    }
    prof_mark(pf, "swiglu");
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(0, 1, ne, H, F, 1.0f, act + (int64_t)o * F, cdt, F, 0, Wd + (int64_t)e * H * F, cdt, F, 0, 0.0f,
             a->Y + (int64_t)o * H, M1C_F32, H, 0, 1);
    }
    prof_mark(pf, "gemm_down");
    combine_kernel<<<moe_row_blocks(N), MOE_THREADS, 0, s>>>(out, a->Y, a->w, a->pos, N, H, k);
    MOE_LAUNCH_CHECK(h, "combine_kernel");
    prof_mark(pf, "combine");
    return M1C_OK;
}

/* Backward of the BF16 grouped path: the same steps as backward_impl with the grouped GEMM, and nothing
 * asked of the host (whether the forward was jittered is read on the device). */
static int backward_grouped(const topk_cuda_args *a, float *din, const float *dout, const float *in, moe_prof *pf) {
    typedef __nv_bfloat16 bf;
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F;
    const int64_t Nk = (int64_t)N * k;
    bf *dy_lp = (bf *)a->dy_lp;
    if (!dy_lp) return h->error(h, "topk: BF16 backward needs the bf16 d rows buffer");
    const bf *xs = (const bf *)a->xs, *GU = (const bf *)a->gu, *act = (const bf *)a->act;
    const bf *Wgu = (const bf *)a->Wgu, *Wd = (const bf *)a->Wd;
    bf *dgu = (bf *)a->dgu;
    const int32_t *Rd = a->off + E;

    const double aux_g = a->aux_scale * a->aux_coef * E / N;
    router_bwd_kernel<bf><<<N, 128, 0, s>>>(a->dlog, a->dw, a->drow, dy_lp, dout, a->Y, a->probs, a->idx, a->w, a->pos,
                                            a->st, aux_g, H, E, k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_bwd_kernel");
    prof_mark(pf, "router_bwd");
    /* dWd_e += dY_e^T A_e; d act = dY Wd_e. */
    if (grouped_gemm<GG_TN, float>(h, s, a->dWd, F, (int64_t)H * F, dy_lp, H, act, F, 0, a->off, E, Nk, H, F, 0,
                                   1.0f) != M1C_OK)
        return M1C_ERR;
    prof_mark(pf, "gemm_dWd");
    if (grouped_gemm<GG_NN, float>(h, s, a->dact, F, 0, dy_lp, H, Wd, F, (int64_t)H * F, a->off, E, Nk, 0, F, H,
                                   0.0f) != M1C_OK)
        return M1C_ERR;
    prof_mark(pf, "gemm_dact");
    swiglu_bwd_dev_kernel<bf><<<moe_row_blocks(Nk), MOE_THREADS, 0, s>>>(dgu, a->dact, GU, Rd, F);
    MOE_LAUNCH_CHECK(h, "swiglu_bwd_dev_kernel");
    prof_mark(pf, "swiglu_bwd");
    /* dWgu_e += dGU_e^T X_e; d x rows = dGU Wgu_e (into drow). */
    if (grouped_gemm<GG_TN, float>(h, s, a->dWgu, H, (int64_t)2 * F * H, dgu, 2 * F, xs, H, 0, a->off, E, Nk, 2 * F,
                                   H, 0, 1.0f) != M1C_OK)
        return M1C_ERR;
    prof_mark(pf, "gemm_dWgu");
    if (grouped_gemm<GG_NN, float>(h, s, a->drow, H, 0, dgu, 2 * F, Wgu, H, (int64_t)2 * F * H, a->off, E, Nk, 0, H,
                                   2 * F, 0.0f) != M1C_OK)
        return M1C_ERR;
    prof_mark(pf, "gemm_drows");
    unpermute_kernel<<<moe_row_blocks(N), MOE_THREADS, 0, s>>>(din, a->drow, a->pos, N, H, k);
    MOE_LAUNCH_CHECK(h, "unpermute_kernel");
    prof_mark(pf, "unpermute");

    /* Router (f32). */
    const int64_t NH = (int64_t)N * H;
    if (a->noise) { /* jitter configured: the forward may have applied it */
        router_in_kernel<<<moe_blocks(NH), MOE_THREADS, 0, s>>>(a->xr, in, a->noise, a->st, NH);
        MOE_LAUNCH_CHECK(h, "router_in_kernel");
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, a->xr, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_dWr");
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 0.0f, a->xr, M1C_F32, H, 0, 1);
        add_router_kernel<<<moe_blocks(NH), MOE_THREADS, 0, s>>>(din, a->xr, a->noise, a->st, NH);
        MOE_LAUNCH_CHECK(h, "add_router_kernel");
        prof_mark(pf, "router_din");
    } else {
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, in, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_dWr");
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 1.0f, din, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_din");
    }
    return M1C_OK;
}

template <typename T>
static int backward_impl(const topk_cuda_args *a, float *din, const float *dout, const float *in, moe_prof *pf) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F, cdt = a->cdt;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_cnt, a->cnt, (size_t)(2 + 2 * E) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_off, a->off, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    float jit_f = 0.0f;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(&jit_f, a->st + ST_JIT, sizeof(float), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    prof_mark(pf, "counts_to_host");
    if (a->h_cnt[C_ASSIGN] != (int64_t)N * k)
        return h->error(h, "topk: backward for %d tokens after a forward of %d", N, (int)(a->h_cnt[C_ASSIGN] / k));
    const int jit = jit_f != 0.0f;
    if (jit && !a->noise) return h->error(h, "topk: backward after a jittered forward without the jitter buffer");
    const int32_t *off = a->h_off;
    const int64_t R = off[E];
    T *dy_lp = (T *)a->dy_lp;
    if (cdt == M1C_BF16 && !dy_lp) return h->error(h, "topk: BF16 backward needs the bf16 d rows buffer");
    const T *xs = (const T *)a->xs, *GU = (const T *)a->gu, *act = (const T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    T *dgu = (T *)a->dgu;
    /* The d rows as GEMM operand: drow itself in F32, its bf16 copy in BF16. */
    const T *dy = dy_lp ? dy_lp : (const T *)(const void *)a->drow;

    const double aux_g = a->aux_scale * a->aux_coef * E / N;
    router_bwd_kernel<T><<<N, 128, 0, s>>>(a->dlog, a->dw, a->drow, dy_lp, dout, a->Y, a->probs, a->idx, a->w, a->pos,
                                           a->st, aux_g, H, E, k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_bwd_kernel");
    prof_mark(pf, "router_bwd");

    /* dWd += dY^T A; d act = dY Wd. */
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(1, 0, H, F, ne, 1.0f, dy + (int64_t)o * H, cdt, H, 0, act + (int64_t)o * F, cdt, F, 0, 1.0f,
             a->dWd + (int64_t)e * H * F, M1C_F32, F, 0, 1);
        GEMM(0, 0, ne, F, H, 1.0f, dy + (int64_t)o * H, cdt, H, 0, Wd + (int64_t)e * H * F, cdt, F, 0, 0.0f,
             a->dact + (int64_t)o * F, M1C_F32, F, 0, 1);
    }
    prof_mark(pf, "gemm_dWd_dact");
    if (R > 0) {
        moe_swiglu_bwd_kernel<T><<<moe_blocks(R * F), MOE_THREADS, 0, s>>>(dgu, a->dact, GU, R, F);
        MOE_LAUNCH_CHECK(h, "moe_swiglu_bwd_kernel");
    }
    prof_mark(pf, "swiglu_bwd");
    /* dWgu += dGU^T X; d x rows = dGU Wgu (into drow: its dY is no longer needed). */
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(1, 0, 2 * F, H, ne, 1.0f, dgu + (int64_t)o * 2 * F, cdt, 2 * F, 0, xs + (int64_t)o * H, cdt, H, 0, 1.0f,
             a->dWgu + (int64_t)e * 2 * F * H, M1C_F32, H, 0, 1);
        GEMM(0, 0, ne, H, 2 * F, 1.0f, dgu + (int64_t)o * 2 * F, cdt, 2 * F, 0, Wgu + (int64_t)e * 2 * F * H, cdt, H, 0,
             0.0f, a->drow + (int64_t)o * H, M1C_F32, H, 0, 1);
    }
    prof_mark(pf, "gemm_dWgu_drows");
    unpermute_kernel<<<moe_row_blocks(N), MOE_THREADS, 0, s>>>(din, a->drow, a->pos, N, H, k);
    MOE_LAUNCH_CHECK(h, "unpermute_kernel");
    prof_mark(pf, "unpermute");

    /* Router (f32): dWr += dlogits^T (router input); din += (dlogits Wr) (times the noise with jitter). */
    if (jit) {
        mul_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(a->xr, in, a->noise, (int64_t)N * H);
        MOE_LAUNCH_CHECK(h, "mul_kernel");
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, a->xr, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_dWr");
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 0.0f, a->xr, M1C_F32, H, 0, 1);
        add_mul_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(din, a->xr, a->noise, (int64_t)N * H);
        MOE_LAUNCH_CHECK(h, "add_mul_kernel");
        prof_mark(pf, "router_din");
    } else {
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, in, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_dWr");
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 1.0f, din, M1C_F32, H, 0, 1);
        prof_mark(pf, "router_din");
    }
    return M1C_OK;
}

extern "C" int topk_cuda_forward(const topk_cuda_args *a, float *out, const float *in) {
    if (a->N <= 0) return M1C_OK;
    moe_prof pf;
    prof_init(&pf, (cudaStream_t)a->stream);
    const int rc = a->cdt == M1C_BF16 ? forward_impl<__nv_bfloat16>(a, out, in, &pf) : forward_impl<float>(a, out, in, &pf);
    prof_end(&pf, "fwd", a);
    return rc;
}

extern "C" int topk_cuda_backward(const topk_cuda_args *a, float *din, const float *dout, const float *in) {
    if (a->N <= 0) return M1C_OK;
    moe_prof pf;
    prof_init(&pf, (cudaStream_t)a->stream);
    int rc;
    if (use_grouped(a->cdt))
        rc = backward_grouped(a, din, dout, in, &pf);
    else
        rc = a->cdt == M1C_BF16 ? backward_impl<__nv_bfloat16>(a, din, dout, in, &pf)
                                : backward_impl<float>(a, din, dout, in, &pf);
    prof_end(&pf, "bwd", a);
    return rc;
}

extern "C" int topk_cuda_to_host(const m1c_host *h, void *stream, void *dst, const void *src, size_t bytes) {
    cudaStream_t s = (cudaStream_t)stream;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    return M1C_OK;
}
