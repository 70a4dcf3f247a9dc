/* topk on CUDA: the same math as topk.c (read its header comment), for compute dtypes F32 and BF16.
 *
 * Forward: (jitter) -> router logits in f32 from the f32 input (BF16 too: routing equals the CPU's; a
 * kernel of its own, router_logits_kernel: only E columns; or, in the model, made by the core's norm in
 * the pass that writes the input: plugin ABI 1.4's in_proj) -> softmax + top-k + renormalisation, a lane
 * per token (at the end of the logits kernel, or route_count_kernel) -> capacity and a stable counting
 * sort by expert (chunked ranks in token order, so the same assignments are dropped as on the CPU;
 * offsets; a scatter places the rows) -> aux loss (partial sums in double, one block for the total) ->
 * gather rows (cast to the compute dtype) -> gate/up GEMMs -> SwiGLU -> down GEMMs into rows Y of the
 * compute dtype -> combine: each token gathers its k expert rows (no atomics, fixed order), or, in the
 * model, the rows handed over to the core's norm, which sums them where it reads the output (ABI 1.4's
 * out_rows, the same m1c_rows_sum).
 * Backward mirrors topk.c: router backward, one warp per token (d weights, renormalisation, aux loss,
 * softmax) with the weighted d rows -> dWd, d act GEMMs -> SwiGLU backward -> dWgu, d x rows GEMMs ->
 * un-permute per token, fused with the router's input gradient (dlogits Wr) -> dWr from per-chunk
 * partial sums added in a fixed order. Every reduction has a fixed order: results repeat bit for bit.
 *
 * Dtypes. F32: everything f32. BF16: bf16 storage, f32 accumulation in every GEMM and f32 arithmetic in
 * every elementwise kernel (bf16 is loaded, widened, computed on, and rounded to nearest even once when
 * stored). bf16 are
 *   - the GEMM operands: the gathered rows xs, the weights (params_lp), the SwiGLU activation act, the
 *     d rows dy_lp, d gate/up dgu;
 *   - the GEMM outputs that only an elementwise kernel reads: gate/up GU (the SwiGLU), the expert
 *     outputs Y (down, act Wd^T: read by combine and by the router backward's d weights dout . Y),
 *     d act (dY Wd: read by the SwiGLU backward) and the d x rows (dGU Wgu: read by the un-permute,
 *     which adds each token's k rows into din). Why: cuBLAS runs these products with f32 outputs well
 *     below the speed of the same shapes with bf16 outputs (H200, N*k 32768, H 768, F 1024: down 360
 *     and d act 330 against 440-570 TFLOP/s), and the kernels that read them are bound by DRAM, which
 *     now moves half the bytes. The price is one bf16 rounding (relative 2^-8 at most) of each Y, d act
 *     and d x row element, after the roundings of the operands that made it; the d x rows are rounded
 *     before the un-permute sums a token's k expert rows (in f32, slot order), so each term of din's
 *     sum carries it. The d x rows go into dy_lp, the bf16 d rows, dead once dWd and d act read them.
 * f32 stay: the layer's input and output, the router (logits, softmax, top-k, its products, d weights
 * and d logits), the aux loss, the sums into din, and the weight gradients (accumulated into f32 with
 * beta = 1). drow (f32, N*k*H) holds the d rows and then the d x rows in F32 only; in BF16 it is just
 * scratch for the forward's aux partial sums and the backward's dWr chunk partials. The grouped kernel
 * writes the same dtypes as cuBLAS (its f32 accumulators rounded to nearest even).
 *
 * Expert GEMMs, chosen by the setting expert_gemm (topk.c):
 *   "auto" (default): on an sm_90a device the Hopper kernels of expert_wg.cuh for BF16 (the forward's two
 *     products reading the offsets on the device; the backward's two launches, each a row product with a
 *     weight gradient, on the offsets the forward copied meanwhile); "cublas" elsewhere.
 *   "cublas" (F32 always): one cuBLASLt product per expert with rows, all of a step handed to
 *     the core at once (h->gemm_group), which runs them concurrently. The expert offsets and counts are
 *     copied to (pinned) host memory once per forward; the host waits for that copy after queueing the
 *     aux loss and the gather, so the GPU still has work while it wakes. The backward of the same run
 *     reuses the copy (another run's forward in between makes it copy again).
 *   "grouped" (BF16 only): one tensor-core kernel per product for all experts (grouped_gemm_kernel),
 *     reading the offsets on the device: forward and backward never wait for the host, but the kernel
 *     reaches about half of cuBLAS's throughput on large experts.
 * All share every other kernel: the elementwise ones read the kept row count on the device.
 *
 * Jitter: the noise is U(1-j, 1+j) from a counter-based hash of (noise_seed, element index), not the
 * CPU's xoshiro stream: the same noise_seed gives the same noise on the GPU every time, but not the
 * CPU's noise. Evaluation (training = 0) never applies it. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../moe_cuda.cuh"
#include "../topk_cuda.cuh"
#include "../topk_route.h"
#include "expert_wg.cuh"
#include <m1c/cuda/mma.cuh>
#include <m1c/cuda/pdl.cuh>
#include <m1c/cuda/rows.cuh>
#include <m1c/cuda/sums.cuh>

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

/* One token's routing (the softmax of its logits z into p, which may be z; top-k; combine weights) by the
 * CPU reference's own code (../topk_route.h). Where E <= 8 on a copy of the row in registers, E a constant
 * of the instance so that its loops unroll (the global row read and written once; a copy indexed at run
 * time lived in local memory: route_kernel took 8.6 us, H100). */
template <int E>
static __device__ inline void route_token_regs(const float *z, float *p, int32_t *id, float *w, int k, int normalize) {
    float pl[E];
#pragma unroll
    for (int e = 0; e < E; e++) pl[e] = z[e];
    topk_route_token(pl, id, w, E, k, normalize);
#pragma unroll
    for (int e = 0; e < E; e++) p[e] = pl[e];
}
static __device__ inline void route_token(const float *z, float *p, int32_t *id, float *w, int E, int k,
                                          int normalize) {
    switch (E) {
    case 1: route_token_regs<1>(z, p, id, w, k, normalize); return;
    case 2: route_token_regs<2>(z, p, id, w, k, normalize); return;
    case 3: route_token_regs<3>(z, p, id, w, k, normalize); return;
    case 4: route_token_regs<4>(z, p, id, w, k, normalize); return;
    case 5: route_token_regs<5>(z, p, id, w, k, normalize); return;
    case 6: route_token_regs<6>(z, p, id, w, k, normalize); return;
    case 7: route_token_regs<7>(z, p, id, w, k, normalize); return;
    case 8: route_token_regs<8>(z, p, id, w, k, normalize); return;
    default:
        if (z != p)
            for (int e = 0; e < E; e++) p[e] = z[e];
        topk_route_token(p, id, w, E, k, normalize);
    }
}

/* The aux loss's inputs (aux_kernel's, or rank_scan_kernel's where it computes the loss too); st NULL: none. */
struct aux_args {
    float *st;
    const double *part;
    const float *probs;
    int nb, N, k, jit;
    double coef;
};

/* aux_kernel's work, for a block of whole warps; cnt's routed counts written before it runs. */
static __device__ void aux_body(const aux_args &x, const int32_t *cnt, int E) {
    __shared__ double fp[TOPK_CUDA_MAX_E]; /* f_e P_e, summed in expert order at the end */
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int e = warp; e < E; e += nw) { /* a warp per expert (a block-wide sum per expert took 11 us) */
        double s = 0.0;
        if (x.part)
            for (int b = lane; b < x.nb; b += 32) s += x.part[(int64_t)b * E + e];
        else /* no room for the partial sums (a handful of tokens): sum the probabilities here */
            for (int n = lane; n < x.N; n += 32) s += x.probs[(int64_t)n * E + e];
        const double P = m1c_warp_sum(s) / x.N;
        const double f = (double)cnt[C_ROUTED + e] / ((double)x.N * x.k);
        if (lane == 0) {
            x.st[ST_F + e] = (float)f;
            x.st[ST_F + E + e] = (float)P;
            fp[e] = f * P;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double aux = 0.0;
        for (int e = 0; e < E; e++) aux += fp[e];
        aux *= x.coef * E;
        x.st[ST_AUX] = (float)aux;
        x.st[ST_AUX_LO] = (float)(aux - (double)x.st[ST_AUX]);
        x.st[ST_N] = (float)x.N;
        x.st[ST_JIT] = (float)x.jit;
    }
}

__global__ void aux_kernel(const aux_args x, const int32_t *cnt, int E) {
    pdl_start();
    aux_body(x, cnt, E);
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
    pdl_start();
    extern __shared__ int rk_hist[]; /* [E] */
    for (int e = threadIdx.x; e < E; e += RK_THREADS) rk_hist[e] = 0;
    __syncthreads();
    const int64_t a0 = (int64_t)blockIdx.x * RK_CHUNK;
    for (int i = threadIdx.x; i < RK_CHUNK; i += RK_THREADS)
        if (a0 + i < Nk) atomicAdd(&rk_hist[idx[a0 + i]], 1); /* counts: the order does not matter */
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += RK_THREADS) tab[(int64_t)blockIdx.x * E + e] = rk_hist[e];
}

/* One block, a warp per expert (experts warp, warp + RK_WARPS, ...): tab[c][e] becomes the number of e's
 * assignments in chunks before c (a warp scan of 32 chunks at a time, with a carry; no block barriers in
 * the loop: the block-wide scan of every expert in turn took 7 us at the training shape on an H100);
 * then the counts and offsets. */
__global__ void __launch_bounds__(RK_THREADS) rank_scan_kernel(int32_t *tab, int32_t *off, int32_t *cnt, int64_t nch,
                                                                int E, int64_t Nk, int64_t cap, const aux_args x) {
    pdl_start();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int32_t *routed = cnt + C_ROUTED, *kept = cnt + C_ROUTED + E;
    for (int e = warp; e < E; e += RK_WARPS) {
        int carry = 0;
        for (int64_t c0 = 0; c0 < nch; c0 += 32) {
            const int64_t c = c0 + lane;
            const int v = c < nch ? tab[c * E + e] : 0;
            int x = v; /* inclusive scan over the warp */
            #pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, x, d);
                if (lane >= d) x += y;
            }
            if (c < nch) tab[c * E + e] = carry + x - v;
            carry += __shfl_sync(0xffffffffu, x, 31);
        }
        if (lane == 0) {
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
    if (x.st) /* the aux loss too, where its partial sums are made (route_count_kernel): one launch fewer */
        aux_body(x, cnt, E);
}

/* Per chunk: each assignment's rank in token order among its expert's; kept ones get their global row
 * (pos = off[e] + rank) and the row its token; dropped ones pos = -1. */
__global__ void __launch_bounds__(RK_THREADS) rank_scatter_kernel(int32_t *pos, int32_t *rowtok, const int32_t *idx,
                                                                   const int32_t *tab, const int32_t *off, int64_t Nk,
                                                                   int k, int E, int64_t cap) {
    pdl_start();
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

/* Aux loss in two passes (deterministic: fixed summation order, no atomics).
 * aux_part_kernel: block b sums probs[n, e] (double) over its tokens [b * AUX_ROWS, (b + 1) * AUX_ROWS)
 *   into part[b][e]: per thread one token, warp shuffles, then the warps in order (route_count_kernel
 *   does the same over its blocks where it routes).
 * aux_kernel (above: aux_body, one block, a warp per expert): P_e = sum over blocks / N, f_e from the
 *   routed counts, aux = coef E sum f_e P_e; rank_scan_kernel runs it at its end where route_count_kernel
 *   made the partial sums.
 *   Without partial sums (part NULL) it sums probs itself: for calls of so few tokens that the scratch
 *   holding the partial sums is too small. */
enum { AUX_ROWS = 256 };

/* part[blockIdx.x][e] = the sum over the block's tokens (token n for this thread, none past N) of probs[n,
 * e], in double: each warp's butterfly into sh[warp][e], a barrier, then the warps in order. sh: blockDim.x
 * / 32 x E doubles of shared memory. For aux_part_kernel and route_count_kernel. */
static __device__ void aux_block_sums(double *part, double *sh, const float *probs, int64_t n, int N, int E) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int e = 0; e < E; e++) {
        double v = n < N ? (double)probs[n * E + e] : 0.0;
        #pragma unroll
        for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
        if (lane == 0) sh[warp * E + e] = v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double s = 0.0;
        for (int w = 0; w < nw; w++) s += sh[w * E + e];
        part[(int64_t)blockIdx.x * E + e] = s;
    }
}

__global__ void __launch_bounds__(AUX_ROWS) aux_part_kernel(double *part, const float *probs, int N, int E) {
    pdl_start();
    extern __shared__ double aux_sh[]; /* [AUX_ROWS / 32][E] */
    aux_block_sums(part, aux_sh, probs, (int64_t)blockIdx.x * AUX_ROWS + threadIdx.x, N, E);
}

/* The routing from logits the core made (in_proj) with rank_count_kernel's and aux_part_kernel's passes
 * over its results in the same launch: a block takes the RK_CHUNK / k tokens of one chunk of assignments,
 * a thread per token (route_token), then writes the chunk's counts per expert (tab[b][e], as
 * rank_count_kernel) and, with part, its tokens' sums of the probabilities per expert in double (part[b][e]:
 * warp butterflies, then the warps in order, as aux_part_kernel over its own blocks). Three launches in a
 * row of ~5 us each, most of it their latency, become one. */
__global__ void route_count_kernel(float *probs, const float *z, int N, int E, int32_t *idx, float *w, int k,
                                   int normalize, int32_t *tab, double *part) {
    pdl_start();
    extern __shared__ double rc_sh[]; /* [warps][E] partial sums, then [E] counts */
    int *hist = reinterpret_cast<int *>(rc_sh + blockDim.x / 32 * E);
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) route_token(z + n * E, probs + n * E, idx + n * k, w + n * k, E, k, normalize);
    __syncthreads(); /* hist zeroed */
    if (n < N)
        for (int j = 0; j < k; j++) atomicAdd(&hist[idx[n * k + j]], 1); /* counts: the order does not matter */
    if (part)
        aux_block_sums(part, rc_sh, probs, n, N, E); /* its barrier also ends the counting */
    else
        __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) tab[(int64_t)blockIdx.x * E + e] = hist[e];
}

/* ---- router products (f32, E columns) ------------------------------------------------------------
 * cuBLAS runs these thin products (N x H times H x E, E x N times N x H) as slow SIMT kernels; these do
 * them at about the speed of reading x once. Fixed summation orders, no atomics. */

/* logits[n, e] = sum_c x[n, c] Wr[e, c], then (idx not NULL) each token routed (route_token) by a lane of
 * the warp that made its logits: the softmax in place of the logits, idx and w (N, k); a separate kernel
 * for the routing cost ~20 us a layer on an H100, most of it the launch and its wait. A warp takes LG_TOK
 * tokens and LG_EXP experts at a time (one Wr load serves LG_TOK tokens), its lanes V columns each; the 32
 * per-lane sums are reduced so that lane l holds (token l / LG_EXP, expert l % LG_EXP). Each warp has one
 * round of x loads in flight at a time, so what keeps DRAM busy is the number of warps: LG_MIN_BLOCKS per
 * multiprocessor caps the registers at 64, so that the whole grid of the training shape (16384 tokens: 1024
 * blocks) is resident at once (at 80 registers only 6 blocks fit: 792 on 132 multiprocessors, then a thin
 * second wave of 232). */
enum { LG_TOK = 4, LG_EXP = 8, LG_WARPS = 4, LG_MIN_BLOCKS = 8 };
template <int V>
__global__ void __launch_bounds__(LG_WARPS * 32, LG_MIN_BLOCKS)
    router_logits_kernel(float *logits, const float *x, const float *Wr, int N, int H, int E, int32_t *idx, float *w,
                         int k, int normalize) {
    pdl_start();
    static_assert(LG_TOK * LG_EXP == 32, "one reduced value per lane");
    const int lane = threadIdx.x % 32;
    const int64_t n0 = ((int64_t)blockIdx.x * LG_WARPS + threadIdx.x / 32) * LG_TOK;
    if (n0 >= N) return; /* the whole warp */
    for (int e0 = 0; e0 < E; e0 += LG_EXP) {
        float acc[32]; /* [token][expert] */
        #pragma unroll
        for (int i = 0; i < 32; i++) acc[i] = 0.0f;
        for (int c = lane * V; c < H; c += 32 * V) {
            float xv[LG_TOK][V];
            #pragma unroll
            for (int t = 0; t < LG_TOK; t++) {
                if (n0 + t < N) vec_ld<V>(xv[t], x + (n0 + t) * H + c);
                else
                    #pragma unroll
                    for (int v = 0; v < V; v++) xv[t][v] = 0.0f;
            }
            #pragma unroll
            for (int e = 0; e < LG_EXP; e++) {
                if (e0 + e >= E) break;
                float w[V];
                vec_ld<V>(w, Wr + (int64_t)(e0 + e) * H + c);
                #pragma unroll
                for (int t = 0; t < LG_TOK; t++)
                    #pragma unroll
                    for (int v = 0; v < V; v++) acc[t * LG_EXP + e] += xv[t][v] * w[v];
            }
        }
        const float sum = m1c_warp_xpose_sum<32>(acc); /* lane l: acc[l] summed (m1c/cuda/sums.cuh) */
        const int t = lane / LG_EXP, e = e0 + lane % LG_EXP;
        if (n0 + t < N && e < E) logits[(n0 + t) * E + e] = sum;
    }
    if (!idx) return;
    __syncwarp(); /* the other lanes' logits written before lane t reads its token's row */
    const int64_t n = n0 + lane;
    if (lane < LG_TOK && n < N) route_token(logits + n * E, logits + n * E, idx + n * k, w + n * k, E, k, normalize);
}

/* The routing alone, a thread per token, from logits z the core made (m1c_layer_bufs.in_proj): probs, idx
 * and w as router_logits_kernel leaves them. */
__global__ void route_kernel(float *probs, const float *z, int N, int E, int32_t *idx, float *w, int k, int normalize) {
    pdl_start();
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) route_token(z + n * E, probs + n * E, idx + n * k, w + n * k, E, k, normalize);
}

/* dWr partial sums: out[ch, e, c] = sum over chunk ch's tokens n (in order) of dlog[n, e] * xr[n, c],
 * xr = x * noise when the forward was jittered (noise set and the stats say so), else x; with
 * accumulate (a single chunk), dWr += that directly. Grid: (column blocks, chunks, groups of DW_EXP
 * experts); the chunk's dlog columns pass through shared memory DW_ROWS tokens at a time. */
enum { DW_ROWS = 32, DW_EXP = 8, DW_CHUNK = 64 };
template <int V>
__global__ void router_dw_kernel(float *out, int accumulate, const float *dlog, const float *x, const float *noise,
                                 const float *st, int N, int H, int E, int rows_per_chunk) {
    pdl_start();
    __shared__ __align__(16) float dl[DW_ROWS][DW_EXP];
    const int jit = noise && st[ST_JIT] != 0.0f;
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * V, e0 = blockIdx.z * DW_EXP;
    const int64_t nb = (int64_t)blockIdx.y * rows_per_chunk, ne = min((int64_t)N, nb + rows_per_chunk);
    float acc[DW_EXP][V];
    #pragma unroll
    for (int e = 0; e < DW_EXP; e++)
        #pragma unroll
        for (int v = 0; v < V; v++) acc[e][v] = 0.0f;
    for (int64_t t0 = nb; t0 < ne; t0 += DW_ROWS) {
        const int nt = (int)min((int64_t)DW_ROWS, ne - t0);
        __syncthreads(); /* the previous tile is read */
        for (int i = threadIdx.x; i < DW_ROWS * DW_EXP; i += blockDim.x) {
            const int t = i / DW_EXP, e = i % DW_EXP;
            dl[t][e] = t < nt && e0 + e < E ? dlog[(t0 + t) * E + e0 + e] : 0.0f;
        }
        __syncthreads();
        if (c < H)
            #pragma unroll 8 /* eight rows' loads in flight (two blocks an SM: ~48 KB of x in flight) */
            for (int t = 0; t < nt; t++) {
                float xv[V];
                vec_ld<V>(xv, x + (t0 + t) * H + c);
                if (jit) {
                    float z[V];
                    vec_ld<V>(z, noise + (t0 + t) * H + c);
                    #pragma unroll
                    for (int v = 0; v < V; v++) xv[v] *= z[v];
                }
                #pragma unroll
                for (int e = 0; e < DW_EXP; e++)
                    #pragma unroll
                    for (int v = 0; v < V; v++) acc[e][v] += dl[t][e] * xv[v];
            }
    }
    if (c >= H) return;
    for (int e = 0; e < DW_EXP && e0 + e < E; e++) {
        float *o = out + ((int64_t)blockIdx.y * E + e0 + e) * H + c;
        if (accumulate) {
            float p[V];
            vec_ld<V>(p, o);
            #pragma unroll
            for (int v = 0; v < V; v++) acc[e][v] += p[v];
        }
        vec_st<V>(o, acc[e]);
    }
}

/* ---- elementwise kernels ---------------------------------------------------------------------------
 * Flat grid-stride loops over V-element steps of rows (16-byte accesses where the row length and the
 * pointers allow, V = 1 otherwise), so that every thread has work whatever the row length. The kept
 * row count R = off[E] is read on the device (the grouped path never has it on the host). */

/* xs[r] = in[rowtok[r]] for the R kept rows, cast to T (in: f32, or the core's bf16 copy of it). */
template <typename T, typename S, int V>
__global__ void gather_kernel(T *xs, const S *in, const int32_t *rowtok, const int32_t *R, int H) {
    pdl_start();
    const int nv = H / V;
    MOE_GRID_LOOP(i, (int64_t)*R * nv) {
        const int64_t r = moe_row(i, nv);
        const int c = (int)(i - r * nv) * V;
        float v[V];
        vec_ld<V>(v, in + (int64_t)rowtok[r] * H + c);
        vec_st<V>(xs + r * H + c, v);
    }
}

/* out[n] = sum over kept slots j (in order) of w[n,j] * Y[pos[n,j]] (Y f32 or bf16, f32 sums): the sum of
 * m1c_out_rows (m1c/cuda/rows.cuh), which the core's norm computes instead where topk hands it the rows. */
template <typename TY, int V>
__global__ void combine_kernel(float *out, const TY *Y, const float *w, const int32_t *pos, int N, int H, int k) {
    pdl_start();
    const int nv = H / V;
    MOE_GRID_LOOP(i, (int64_t)N * nv) {
        const int64_t n = moe_row(i, nv);
        const int c = (int)(i - n * nv) * V;
        float o[V];
        m1c_rows_sum<V>(o, Y, pos + n * k, w + n * k, k, H, c);
        vec_st<V>(out + n * H + c, o);
    }
}

/* Backward, one warp per token (warp shuffles, no block barriers): the weighted output gradient of each
 * kept row, w * dout, the operand of the d expert GEMMs: into dy_lp (T) where set (BF16: the GEMMs read
 * only the bf16 rows, so no f32 copy is written), else into drow (F32); d weights (dout . y with y
 * in T, the products summed in double), then d probs (renormalisation and aux loss) and d logits through
 * the softmax, into dlog (the token's row doubles as the d probs workspace where E or k exceed 32).
 * The row pass takes RB_SLOTS slots at once, so that one load of a dout chunk serves them all, and
 * RB_UNROLL chunks of V columns per lane per step, every load of a step issued before the first use:
 * 2 x (16 + 2 x 8) = 64 bytes in flight per lane (V = 4, bf16 Y, k = 2). Each lane sums its columns in
 * ascending order whatever RB_SLOTS and RB_UNROLL are, so they do not change the d weights' bits.
 * Where E and k are at most 32 the token's probabilities, experts and aux terms are loaded into lanes
 * before the row pass, which hides their latency, and the softmax backward runs in registers. */
enum { RB_WARPS = 4, RB_SLOTS = 2, RB_UNROLL = 2 };
template <typename T, int V>
__global__ void __launch_bounds__(RB_WARPS * 32)
    router_bwd_kernel(float *dlog, float *dw, float *drow, T *dy_lp, const float *dout, const T *Y,
                      const float *probs, const int32_t *idx, const float *w, const int32_t *pos, const float *st,
                      double aux_g, int N, int H, int E, int k, int normalize) {
    pdl_start();
    const int lane = threadIdx.x % 32;
    const int64_t n = (int64_t)blockIdx.x * RB_WARPS + threadIdx.x / 32;
    if (n >= N) return; /* the whole warp */
    const float *p = probs + n * E, *g = dout + n * H, *wn = w + n * k;
    const int32_t *id = idx + n * k, *ps = pos + n * k;
    float *dp = dlog + n * E, *dwn = dw + n * k;
    const bool regs = E <= 32 && k <= 32; /* the same in every lane */
    float p_l = 0.0f, dp_l = 0.0f, dw_l = 0.0f; /* regs: p[lane], dp[lane]; the d weight of slot lane */
    int32_t id_l = 0;                           /* regs: id[lane] */
    if (regs) {
        if (lane < E) p_l = p[lane], dp_l = (float)(aux_g * st[ST_F + lane]);
        if (lane < k) id_l = id[lane];
    } else {
        for (int e = lane; e < E; e += 32) dp[e] = (float)(aux_g * st[ST_F + e]);
    }
    double sdw = 0.0; /* the same in every lane */
    for (int j0 = 0; j0 < k; j0 += RB_SLOTS) {
        int32_t r[RB_SLOTS];
        float wj[RB_SLOTS];
        double d[RB_SLOTS];
        #pragma unroll
        for (int q = 0; q < RB_SLOTS; q++) {
            r[q] = j0 + q < k ? ps[j0 + q] : -1;
            wj[q] = j0 + q < k ? wn[j0 + q] : 0.0f;
            d[q] = 0.0;
        }
        for (int c0 = lane * V; c0 < H; c0 += 32 * V * RB_UNROLL) {
            float gv[RB_UNROLL][V], yv[RB_SLOTS][RB_UNROLL][V];
            #pragma unroll
            for (int u = 0; u < RB_UNROLL; u++) {
                const int c = c0 + u * 32 * V;
                if (c >= H) break;
                vec_ld<V>(gv[u], g + c);
                #pragma unroll
                for (int q = 0; q < RB_SLOTS; q++)
                    if (r[q] >= 0) vec_ld<V>(yv[q][u], Y + (int64_t)r[q] * H + c);
            }
            #pragma unroll
            for (int q = 0; q < RB_SLOTS; q++) {
                if (r[q] < 0) continue;
                #pragma unroll
                for (int u = 0; u < RB_UNROLL; u++) {
                    const int c = c0 + u * 32 * V;
                    if (c >= H) break;
                    float o[V];
                    #pragma unroll
                    for (int v = 0; v < V; v++) {
                        d[q] += (double)gv[u][v] * yv[q][u][v];
                        o[v] = wj[q] * gv[u][v];
                    }
                    if (dy_lp) vec_st<V>(dy_lp + (int64_t)r[q] * H + c, o);
                    else vec_st<V>(drow + (int64_t)r[q] * H + c, o);
                }
            }
        }
        #pragma unroll
        for (int q = 0; q < RB_SLOTS; q++) {
            const int j = j0 + q;
            if (j >= k) break;
            if (r[q] >= 0) d[q] = m1c_warp_sum(d[q]);
            if (lane == 0) dwn[j] = (float)d[q];
            if (lane == j) dw_l = (float)d[q];
            sdw += d[q] * wj[q];
        }
    }
    if (regs) {
        /* The same operations as the loop below: ssel in slot order; each slot's term, formed in its
         * own lane, added in slot order in its expert's lane. */
        double ssel = 0.0;
        for (int j = 0; j < k; j++) ssel += __shfl_sync(0xffffffffu, p_l, __shfl_sync(0xffffffffu, id_l, j));
        const float t = normalize ? (float)(((double)dw_l - sdw) / ssel) : dw_l; /* used from lanes < k */
        for (int j = 0; j < k; j++) {
            const int e = __shfl_sync(0xffffffffu, id_l, j);
            const float tj = __shfl_sync(0xffffffffu, t, j);
            if (lane == e) dp_l += tj;
        }
        double s = 0.0;
        if (lane < E) s += (double)p_l * dp_l;
        s = m1c_warp_sum(s);
        if (lane < E) dp[lane] = p_l * (float)(dp_l - s);
        return;
    }
    __syncwarp(); /* dp's aux part and dwn are written */
    if (lane == 0) {
        double ssel = 0.0;
        for (int j = 0; j < k; j++) ssel += p[id[j]];
        for (int j = 0; j < k; j++) dp[id[j]] += normalize ? (float)(((double)dwn[j] - sdw) / ssel) : dwn[j];
    }
    __syncwarp();
    double s = 0.0;
    for (int e = lane; e < E; e += 32) s += (double)p[e] * dp[e];
    s = m1c_warp_sum(s);
    for (int e = lane; e < E; e += 32) dp[e] = p[e] * (float)(dp[e] - s);
}

/* din[n] += (the d x rows of the token's kept slots, in slot order) + (dlog[n] Wr, in expert order,
 * times the noise when the forward was jittered): the un-permute and the router's input gradient in one
 * pass over din. The d x rows dx are TD (f32, or bf16 in BF16), widened and summed in f32. A block
 * takes UR_TOK tokens at a time, their dlog rows in shared memory ([UR_TOK][E], dynamic), so that one
 * load of Wr serves UR_TOK tokens; threads V columns each, blockIdx.y the column blocks. */
enum { UR_TOK = 4 };
template <typename TD, int V>
__global__ void unpermute_router_kernel(float *din, const TD *dx, const int32_t *pos, const float *dlog,
                                        const float *Wr, const float *noise, const float *st, int N, int H, int E,
                                        int k) {
    pdl_start();
    extern __shared__ float ur_dl[]; /* [UR_TOK][E] */
    const int jit = noise && st[ST_JIT] != 0.0f;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    for (int64_t n0 = (int64_t)blockIdx.x * UR_TOK; n0 < N; n0 += (int64_t)gridDim.x * UR_TOK) {
        const int nt = (int)min((int64_t)UR_TOK, N - n0);
        __syncthreads(); /* the previous tokens' rows are read */
        for (int i = threadIdx.x; i < nt * E; i += blockDim.x) ur_dl[i] = dlog[n0 * E + i];
        __syncthreads();
        if (c >= H) continue;
        float acc[UR_TOK][V];
        #pragma unroll
        for (int t = 0; t < UR_TOK; t++)
            #pragma unroll
            for (int v = 0; v < V; v++) acc[t][v] = 0.0f;
        for (int e = 0; e < E; e++) {
            float wr[V];
            vec_ld<V>(wr, Wr + (int64_t)e * H + c);
            #pragma unroll
            for (int t = 0; t < UR_TOK; t++) {
                const float d = t < nt ? ur_dl[t * E + e] : 0.0f;
                #pragma unroll
                for (int v = 0; v < V; v++) acc[t][v] += d * wr[v];
            }
        }
        #pragma unroll
        for (int t = 0; t < UR_TOK; t++) {
            if (t >= nt) break;
            const int64_t n = n0 + t;
            float o[V];
            vec_ld<V>(o, din + n * H + c);
            for (int j = 0; j < k; j++) {
                const int32_t r = pos[n * k + j];
                if (r < 0) continue;
                float d[V];
                vec_ld<V>(d, dx + (int64_t)r * H + c);
                #pragma unroll
                for (int v = 0; v < V; v++) o[v] += d[v];
            }
            if (jit) {
                float z[V];
                vec_ld<V>(z, noise + n * H + c);
                #pragma unroll
                for (int v = 0; v < V; v++) o[v] += acc[t][v] * z[v];
            } else {
                #pragma unroll
                for (int v = 0; v < V; v++) o[v] += acc[t][v];
            }
            vec_st<V>(din + n * H + c, o);
        }
    }
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
    /* this lane's ldmatrix row offsets (bytes) in the A and B tiles (m1c/cuda/mma.cuh) */
    const uint32_t a_lane = MODE == GG_TN ? mma_lane_cr(lane, G::LDA * 2) : mma_lane_rc(lane, G::LDA * 2);
    const uint32_t b_lane = MODE == GG_NT ? mma_lane_cr(lane, G::LDB * 2) : mma_lane_rc(lane, G::LDB * 2);

    /* The warp's 64 x 32 of C as 4 x 4 mma.sync tiles of 16 x 8 (m1c/cuda/mma.cuh for the layouts). */
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

/* The BF16 expert GEMMs in the grouped kernel (setting expert_gemm = "grouped"); F32 always per expert. */
static bool use_grouped(const topk_cuda_args *a) { return a->grouped && a->cdt == M1C_BF16; }
/* The expert products in the Hopper kernels (expert_wg.cuh): expert_gemm = "auto" with BF16 on an sm_90a
 * device (a->xw_enc set) and sizes and buffers they take. The forward never waits for the host; the
 * backward uses the offsets the forward copied meanwhile (its weight products need the row counts on the
 * host), and with more than XW_MAX_E experts runs per expert in cuBLAS instead. */
static bool use_xw(const topk_cuda_args *a) {
    const void *ops[] = {a->xs, a->gu, a->act, a->Y, a->Wgu, a->Wd, a->dgu, a->dact, a->dy_lp, a->dWgu, a->dWd};
    return a->cdt == M1C_BF16 && a->xw_enc && xw_fits(a->H, a->F, ops, 11);
}
/* C = A W_e^T in the Hopper forward kernel (see xw_forward), with act: and its SwiGLU (C gate/up); its
 * failure reported. */
static int xw_product(const topk_cuda_args *a, void *C, int N, const void *A, int64_t lda, const void *W, int K,
                      void *act = NULL) {
    const m1c_host *h = a->h;
    const xw_rows r = {(__nv_bfloat16 *)C, a->off, N, a->E, N, 0};
    if (xw_forward((tma_encode_fn)a->xw_enc, a->xw_grid, (cudaStream_t)a->stream, r, (const __nv_bfloat16 *)A, lda,
                   (int64_t)a->N * a->k, (const __nv_bfloat16 *)W, K, (__nv_bfloat16 *)act, N / 2))
        return h->error(h, "topk: cuTensorMapEncodeTiled refused an expert operand (%d x %d, K %d)", a->N * a->k, N, K);
    MOE_LAUNCH_CHECK(h, "xw_fwd_kernel");
    return M1C_OK;
}
/* The backward's pair in the Hopper kernel (see xw_backward): C = A W_e (N columns, K = A's) and the
 * weight gradient G_e += Ag_e^T Bg_e (M x Ng), its failure reported. */
static int xw_pair(const topk_cuda_args *a, void *C, int N, const void *A, int K, const void *W, float *G,
                   const void *Ag, int M, const void *Bg, int Ng, bool g_unset) {
    const m1c_host *h = a->h;
    const xw_rows r = {(__nv_bfloat16 *)C, a->off, N, a->E, N, 0};
    if (xw_backward((tma_encode_fn)a->xw_enc, a->xw_grid, (cudaStream_t)a->stream, a->xw_ctr, a->h_off, r,
                    (const __nv_bfloat16 *)A, K, (int64_t)a->N * a->k, (const __nv_bfloat16 *)W, G,
                    (const __nv_bfloat16 *)Ag, M, (const __nv_bfloat16 *)Bg, Ng, g_unset))
        return h->error(h, "topk: cuTensorMapEncodeTiled refused an expert operand (%d x %d, K %d)", a->N * a->k, N, K);
    MOE_LAUNCH_CHECK(h, "xw_bwd_kernel");
    return M1C_OK;
}

/* Per-expert products (expert_gemm = "cublas") queued for one gemm_group call: each alone fills the GPU
 * poorly (~350 TFLOP/s for the narrower ones on an H200), together they run concurrently, and the
 * backward queues two independent products per call (dWd with d act, dWgu with the d x rows) so that the
 * weight gradients' few output tiles share the GPU with a wide product. */
typedef struct expert_queue {
    m1c_gemm_desc *g; /* a->queue: room for 2E */
    int n;
} expert_queue;

/* One expert product: in the grouped kernel now (grouped), or queued as one product per expert with
 * rows (offsets on the host in a->h_off), with the grouped kernel's arguments (see grouped_gemm_kernel):
 * NT and NN run over expert rows of A and C (B_e = B + e * sb), TN over expert rows of A and B (C_e = C +
 * e * sc). */
template <int MODE, typename TC, typename T>
static int expert_gemm(const topk_cuda_args *a, expert_queue *q, TC *C, int64_t ldc, int64_t sc, const T *A,
                       int64_t lda, const T *B, int64_t ldb, int64_t sb, int Mc, int Nc, int K, float beta) {
    const m1c_host *h = a->h;
    if (!q) {
        if constexpr (sizeof(T) == 2)
            return grouped_gemm<MODE, TC>(h, (cudaStream_t)a->stream, C, ldc, sc, A, lda, B, ldb, sb, a->off, a->E,
                                          (int64_t)a->N * a->k, Mc, Nc, K, beta);
        return h->error(h, "topk: the grouped expert GEMM takes bf16 operands only");
    }
    const int cdt = a->cdt, ct = sizeof(TC) == 2 ? M1C_BF16 : M1C_F32;
    const int32_t *off = a->h_off;
    for (int e = 0; e < a->E; e++) {
        const int64_t o = off[e];
        const int ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        q->g[q->n++] = (m1c_gemm_desc){.trans_a = MODE == GG_TN, .trans_b = MODE == GG_NT,
                                       .M = MODE == GG_TN ? Mc : ne, .N = Nc, .K = MODE == GG_TN ? ne : K,
                                       .alpha = 1.0f, .beta = beta, .A = A + o * lda,
                                       .B = MODE == GG_TN ? B + o * ldb : B + e * sb,
                                       .C = MODE == GG_TN ? (void *)(C + e * sc) : (void *)(C + o * ldc),
                                       .a_dtype = cdt, .b_dtype = cdt, .c_dtype = ct, .lda = (int)lda,
                                       .ldb = (int)ldb, .ldc = (int)ldc, .batch = 1, .stride_a = 0, .stride_b = 0,
                                       .stride_c = 0, .reserved = {0, 0}};
    }
    return M1C_OK;
}

/* Runs the queued products (none in the grouped kernel's case). */
static int run_queue(const topk_cuda_args *a, expert_queue *q) {
    if (!q || !q->n) return M1C_OK;
    const int n = q->n;
    q->n = 0;
    return a->h->gemm_group(a->h, M1C_DEVICE_CUDA, a->stream, q->g, n);
}

/* Threads for V-column steps over a row of H: whole warps, at most 256; blocks across the row. */
static unsigned row_threads(int H, int V) {
    const int nv = (H + V - 1) / V, t = (nv + 31) / 32 * 32;
    return (unsigned)(t < 256 ? t : 256);
}

/* logits (N, E) = x (N, H) Wr^T, then the routing: a->probs, a->idx and a->w (router_logits_kernel); or,
 * given those logits z (the core's in_proj, for an unjittered input), the routing alone. */
static int router_logits(const topk_cuda_args *a, cudaStream_t s, float *logits, const float *x, const float *z) {
    const m1c_host *h = a->h;
    if (z) {
        /* blocks of 64 threads: 256 blocks at the training shape, on every multiprocessor (a token's routing
         * is a few hundred dependent instructions; 256-thread blocks left half of them idle) */
        (void)pdl_launch(route_kernel, (unsigned)((a->N + 63) / 64), 64, 0, s, logits, z, a->N, a->E, a->idx, a->w,
                         a->k, a->normalize);
        MOE_LAUNCH_CHECK(h, "route_kernel");
        return M1C_OK;
    }
    const unsigned blocks = (unsigned)((a->N + LG_TOK * LG_WARPS - 1) / (LG_TOK * LG_WARPS));
    if (a->H % 4 == 0 && moe_al16(x) && moe_al16(a->Wr))
        (void)pdl_launch(router_logits_kernel<4>, blocks, LG_WARPS * 32, 0, s, logits, x, a->Wr, a->N, a->H, a->E,
                         a->idx, a->w, a->k, a->normalize);
    else
        (void)pdl_launch(router_logits_kernel<1>, blocks, LG_WARPS * 32, 0, s, logits, x, a->Wr, a->N, a->H, a->E,
                         a->idx, a->w, a->k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_logits_kernel");
    return M1C_OK;
}

/* dWr (E, H) += dlog^T xr, xr the router input (in, times the noise when the forward was jittered).
 * Chunks of DW_CHUNK tokens give their partial sums in drow (F32: free once the un-permute has read the
 * d x rows there; BF16 keeps those in dy_lp; N*k*H floats hold N*k/E chunks, so the chunks grow where
 * E > DW_CHUNK * k), which m1c_colsum_add adds in order; a single chunk adds to dWr directly. */
static int router_dwr(const topk_cuda_args *a, cudaStream_t s, const float *in) {
    const m1c_host *h = a->h;
    const int N = a->N, H = a->H, E = a->E;
    int64_t nch = (N + DW_CHUNK - 1) / DW_CHUNK;
    const int64_t room = (int64_t)N * a->k / E;
    if (nch > room) nch = room;
    if (nch > 65535) nch = 65535; /* grid.y */
    if (nch < 1) nch = 1;
    const int rpc = (int)((N + nch - 1) / nch);
    nch = (N + rpc - 1) / rpc; /* the chunks that have tokens */
    float *out = nch > 1 ? a->drow : a->dWr;
    const bool vec =
        H % 4 == 0 && moe_al16(in) && moe_al16(out) && moe_al16(a->dWr) && (!a->noise || moe_al16(a->noise));
    const int V = vec ? 4 : 1;
    const unsigned threads = row_threads(H, V), nv = (unsigned)((H + V - 1) / V);
    const dim3 grid((nv + threads - 1) / threads, (unsigned)nch, (unsigned)((E + DW_EXP - 1) / DW_EXP));
    if (vec)
        (void)pdl_launch(router_dw_kernel<4>, grid, threads, 0, s, out, nch == 1, a->dlog, in, a->noise, a->st, N, H, E,
                         rpc);
    else
        (void)pdl_launch(router_dw_kernel<1>, grid, threads, 0, s, out, nch == 1, a->dlog, in, a->noise, a->st, N, H, E,
                         rpc);
    MOE_LAUNCH_CHECK(h, "router_dw_kernel");
    if (nch > 1) {
        (void)m1c_colsum_add_launch(a->dWr, a->drow, (int)nch, E * H, s); /* m1c/cuda/sums.cuh */
        MOE_LAUNCH_CHECK(h, "m1c_colsum_add (dWr)");
    }
    return M1C_OK;
}

/* xs = the kept rows of in, for at most `rows` rows (the kernel reads their number on the device); from
 * the core's bf16 copy of in where given and T is bf16 (the same roundings, half the bytes read). */
template <typename T>
static int gather(const topk_cuda_args *a, cudaStream_t s, T *xs, const float *in, int64_t rows) {
    constexpr int V = moe_vec16<T>::V;
    const int32_t *R = a->off + a->E;
    const __nv_bfloat16 *lp = sizeof(T) == 2 ? (const __nv_bfloat16 *)a->in_lp : NULL;
    if (lp && a->H % 8 == 0 && moe_al16(xs) && moe_al16(lp))
        (void)pdl_launch(gather_kernel<T, __nv_bfloat16, 8>, moe_blocks(rows * (a->H / 8)), MOE_THREADS, 0, s, xs, lp,
                         a->rowtok, R, a->H);
    else if (a->H % V == 0 && moe_al16(xs) && moe_al16(in))
        (void)pdl_launch(gather_kernel<T, float, V>, moe_blocks(rows * (a->H / V)), MOE_THREADS, 0, s, xs, in,
                         a->rowtok, R, a->H);
    else
        (void)pdl_launch(gather_kernel<T, float, 1>, moe_blocks(rows * a->H), MOE_THREADS, 0, s, xs, in, a->rowtok, R,
                         a->H);
    MOE_LAUNCH_CHECK(a->h, "gather_kernel");
    return M1C_OK;
}

/* out = the weighted sum of each token's expert rows Y (in T). V columns per step (combine() picks 8 for
 * bf16 Y, 4 for f32: 16-byte loads of Y, 16-byte f32 stores). */
template <typename T>
static int combine(const topk_cuda_args *a, cudaStream_t s, float *out) {
    const int64_t NH = (int64_t)a->N * a->H;
    const T *Y = (const T *)a->Y;
    /* bf16 Y: 8 columns per thread (16-byte loads of Y), twice the bytes in flight per index load */
    if (sizeof(T) == 2 && a->H % 8 == 0 && moe_al16(out) && moe_al16(Y))
        (void)pdl_launch(combine_kernel<T, 8>, moe_blocks(NH / 8), MOE_THREADS, 0, s, out, Y, a->w, a->pos, a->N, a->H,
                         a->k);
    else if (a->H % 4 == 0 && moe_al16(out) && moe_al16(Y))
        (void)pdl_launch(combine_kernel<T, 4>, moe_blocks(NH / 4), MOE_THREADS, 0, s, out, Y, a->w, a->pos, a->N, a->H,
                         a->k);
    else
        (void)pdl_launch(combine_kernel<T, 1>, moe_blocks(NH), MOE_THREADS, 0, s, out, Y, a->w, a->pos, a->N, a->H,
                         a->k);
    MOE_LAUNCH_CHECK(a->h, "combine_kernel");
    return M1C_OK;
}

template <typename T>
static int router_bwd(const topk_cuda_args *a, cudaStream_t s, T *dy_lp, const float *dout) {
    const double aux_g = a->aux_scale * a->aux_coef * a->E / a->N; /* d (scale aux) / d p[n,e] = that * f_e */
    const unsigned blocks = (unsigned)((a->N + RB_WARPS - 1) / RB_WARPS);
    const T *Y = (const T *)a->Y;
    const bool vec = a->H % 4 == 0 && moe_al16(dout) && moe_al16(Y) && moe_al16(a->drow) &&
                     (!dy_lp || ((uintptr_t)dy_lp & 7u) == 0); /* 4 bf16: 8-byte accesses */
    if (vec)
        (void)pdl_launch(router_bwd_kernel<T, 4>, blocks, RB_WARPS * 32, 0, s, a->dlog, a->dw, a->drow, dy_lp, dout, Y,
                         a->probs, a->idx, a->w, a->pos, a->st, aux_g, a->N, a->H, a->E, a->k, a->normalize);
    else
        (void)pdl_launch(router_bwd_kernel<T, 1>, blocks, RB_WARPS * 32, 0, s, a->dlog, a->dw, a->drow, dy_lp, dout, Y,
                         a->probs, a->idx, a->w, a->pos, a->st, aux_g, a->N, a->H, a->E, a->k, a->normalize);
    MOE_LAUNCH_CHECK(a->h, "router_bwd_kernel");
    return M1C_OK;
}

/* dx: the d x rows (N*k, H) in T. 4 columns per step: 16-byte f32 accesses; dx's loads are 16 bytes
 * (f32) or 8 (bf16). */
template <typename T>
static int unpermute_router(const topk_cuda_args *a, cudaStream_t s, float *din, const T *dx) {
    const int H = a->H;
    const bool vec = H % 4 == 0 && moe_al16(din) && (uintptr_t)dx % (4 * sizeof(T)) == 0 && moe_al16(a->Wr) &&
                     (!a->noise || moe_al16(a->noise));
    const int V = vec ? 4 : 1;
    const unsigned threads = row_threads(H, V), nv = (unsigned)((H + V - 1) / V);
    const int64_t tiles = (a->N + UR_TOK - 1) / UR_TOK;
    const dim3 grid((unsigned)(tiles < 32768 ? tiles : 32768), (nv + threads - 1) / threads);
    const size_t smem = (size_t)UR_TOK * a->E * sizeof(float);
    if (vec)
        (void)pdl_launch(unpermute_router_kernel<T, 4>, grid, threads, smem, s, din, dx, a->pos, a->dlog, a->Wr,
                         a->noise, a->st, a->N, H, a->E, a->k);
    else
        (void)pdl_launch(unpermute_router_kernel<T, 1>, grid, threads, smem, s, din, dx, a->pos, a->dlog, a->Wr,
                         a->noise, a->st, a->N, H, a->E, a->k);
    MOE_LAUNCH_CHECK(a->h, "unpermute_router_kernel");
    return M1C_OK;
}

/* ---- forward and backward ----------------------------------------------------------------------- */

#define CALL(x)                               \
    do {                                      \
        if ((x) != M1C_OK) return M1C_ERR;    \
    } while (0)

/* The forward's copy of its tables to the host runs on a stream of the layer's own (side), after the
 * event ready that the forward records once the tables are made; done marks its end. On the forward's
 * stream a copy sits between two kernels with a few microseconds of idle GPU on either side (two per
 * layer and step); beside it, the next kernel follows the last directly. */
typedef struct topk_copy {
    cudaEvent_t ready, done;
    cudaStream_t side;
} topk_copy;

/* The offsets and counts (and with stats the stats) to their pinned host copies, queued on s. */
static int tables_to_host(const topk_cuda_args *a, cudaStream_t s, bool stats) {
    const m1c_host *h = a->h;
    const size_t E = (size_t)a->E;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_off, a->off, (E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_cnt, a->cnt, (2 + 2 * E) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    if (stats)
        MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_st, a->st, (ST_F + 2 * E) * sizeof(float), cudaMemcpyDeviceToHost, s));
    return M1C_OK;
}

template <typename T>
static int forward_impl(const topk_cuda_args *a, float *out, const float *in, moe_prof *pf) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F;
    const int64_t Nk = (int64_t)N * k;
    const int jit = a->jitter > 0 && a->training;
    const bool grouped = use_grouped(a), xw = use_xw(a);
    topk_copy *cp = (topk_copy *)a->copied;
    if (k > RK_CHUNK) return h->error(h, "topk: top_k %d above %d is not supported on CUDA", k, (int)RK_CHUNK);
    if (E > TOPK_CUDA_MAX_E)
        return h->error(h, "topk: experts %d above %d are not supported on CUDA", E, (int)TOPK_CUDA_MAX_E);

    /* the tables below are rewritten: after the last forward's copy of them (long done) */
    MOE_CUDA_CHECK(h, cudaStreamWaitEvent(s, cp->done, 0));
    const float *xr = in;
    if (jit) {
        jitter_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(a->noise, a->xr, in, (int64_t)N * H,
                                                                          a->noise_seed, (float)a->jitter);
        MOE_LAUNCH_CHECK(h, "jitter_kernel");
        xr = a->xr;
        prof_mark(pf, "jitter");
    }
    /* Capacity and the counting sort: the per-chunk count table lives in dlog (backward scratch, free
     * during forward): nch * E <= N * E int32 since RK_CHUNK >= k. The aux loss: per-block partial sums
     * in drow (backward scratch, N*k*H floats), 8-byte aligned, where they fit (always but for a handful
     * of tokens). */
    const int64_t nch = (Nk + RK_CHUNK - 1) / RK_CHUNK;
    int32_t *tab = (int32_t *)(void *)a->dlog;
    const float *z = jit ? NULL : a->in_proj; /* the router's logits from the core's norm (ABI 1.4) */
    const bool fused = z && RK_CHUNK % k == 0;
    const int nb = fused ? (int)nch : (N + AUX_ROWS - 1) / AUX_ROWS;
    double *part = (double *)(((uintptr_t)a->drow + 7) & ~(uintptr_t)7);
    if ((size_t)nb * E * sizeof(double) + 8 > (size_t)Nk * H * sizeof(float)) part = NULL;
    if (fused) { /* routing, counts and the aux partial sums in one launch */
        const int threads = RK_CHUNK / k, nw = (threads + 31) / 32;
        (void)pdl_launch(route_count_kernel, (unsigned)nch, threads, (size_t)nw * E * sizeof(double) + E * sizeof(int),
                         s, a->probs, z, N, E, a->idx, a->w, k, a->normalize, tab, part);
        MOE_LAUNCH_CHECK(h, "route_count_kernel");
        prof_mark(pf, "router");
    } else {
        /* Router logits in f32 (both compute dtypes), then softmax / top-k in the same kernel (or from z) */
        CALL(router_logits(a, s, a->probs, xr, z));
        prof_mark(pf, "router");
        (void)pdl_launch(rank_count_kernel, (unsigned)nch, RK_THREADS, (size_t)E * sizeof(int), s, tab, a->idx, Nk,
                         E);
        MOE_LAUNCH_CHECK(h, "rank_count_kernel");
    }
    const aux_args ax = {a->st, part, a->probs, nb, N, k, jit, a->aux_coef};
    (void)pdl_launch(rank_scan_kernel, 1, RK_THREADS, 0, s, tab, a->off, a->cnt, nch, E, Nk, a->cap,
                     fused ? ax : aux_args{});
    MOE_LAUNCH_CHECK(h, "rank_scan_kernel");
    (void)pdl_launch(rank_scatter_kernel, (unsigned)nch, RK_THREADS, (size_t)(1 + RK_WARPS) * E * sizeof(int), s,
                     a->pos, a->rowtok, a->idx, tab, a->off, Nk, k, E, a->cap);
    MOE_LAUNCH_CHECK(h, "rank_scatter_kernel");
    prof_mark(pf, "rank");
    *a->h_src = NULL;
    if (!fused) {
        if (part) {
            (void)pdl_launch(aux_part_kernel, (unsigned)nb, AUX_ROWS, (size_t)(AUX_ROWS / 32) * E * sizeof(double), s,
                             part, a->probs, N, E);
            MOE_LAUNCH_CHECK(h, "aux_part_kernel");
        }
        (void)pdl_launch(aux_kernel, 1, MOE_THREADS, 0, s, ax, a->cnt, E);
        MOE_LAUNCH_CHECK(h, "aux_kernel");
    }
    prof_mark(pf, "aux");
    /* To pinned host memory on the layer's copy stream (topk_copy), without waiting: the offsets (the
     * per-expert products need them), the counts (this run's backward checks them) and the stats (stats()
     * reads them, the aux loss of every forward). The host waits for the copies only after queueing the
     * gather, so the GPU still has that to run while the host wakes and queues the expert products. */
    MOE_CUDA_CHECK(h, cudaEventRecord(cp->ready, s));
    MOE_CUDA_CHECK(h, cudaStreamWaitEvent(cp->side, cp->ready, 0));
    CALL(tables_to_host(a, cp->side, true));
    MOE_CUDA_CHECK(h, cudaEventRecord(cp->done, cp->side));

    /* Experts. The elementwise kernels read the kept row count on the device; their grids cover the
     * most rows there can be (the host's count once it has one). */
    T *xs = (T *)a->xs, *GU = (T *)a->gu, *act = (T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    const int32_t *R = a->off + E;
    CALL(gather<T>(a, s, xs, in, Nk));
    prof_mark(pf, "gather");
    if (xw) {
        *a->h_src = a->off; /* the backward waits for the copy, long done by then */
    } else if (!grouped) {
        MOE_CUDA_CHECK(h, cudaEventSynchronize(cp->done));
        *a->h_src = a->off;
        prof_mark(pf, "offsets_to_host");
    }
    const int64_t rows = grouped || xw ? Nk : a->h_off[E];
    expert_queue queue = {a->queue, 0}, *q = grouped ? NULL : &queue;
    /* The Hopper kernel makes act in the product's epilogue where F is a multiple of 128 (xw_forward). */
    const bool glu = xw && F % 128 == 0;
    if (xw) {
        CALL(xw_product(a, GU, 2 * F, xs, H, Wgu, H, glu ? act : NULL));
    } else {
        CALL(expert_gemm<GG_NT>(a, q, GU, 2 * F, 0, xs, H, Wgu, H, (int64_t)2 * F * H, 0, 2 * F, H, 0.0f));
        CALL(run_queue(a, q));
    }
    prof_mark(pf, "gemm_gate_up");
    if (!glu) {
        (void)pdl_launch(moe_swiglu_fwd_dev_kernel<T>, moe_swiglu_blocks<T>(rows, F), MOE_THREADS, 0, s, act, GU, R, F);
        MOE_LAUNCH_CHECK(h, "moe_swiglu_fwd_dev_kernel");
    }
    prof_mark(pf, "swiglu");
    /* Y in T (bf16 in BF16: see the header). */
    if (xw) {
        CALL(xw_product(a, a->Y, H, act, F, Wd, F));
    } else {
        CALL(expert_gemm<GG_NT>(a, q, (T *)a->Y, H, 0, (const T *)act, F, Wd, F, (int64_t)H * F, 0, H, F, 0.0f));
        CALL(run_queue(a, q));
    }
    prof_mark(pf, "gemm_down");
    if (a->out_rows) { /* the core's norm sums the rows where it reads them (ABI 1.4): no pass over out */
        m1c_out_rows *o = a->out_rows;
        o->rows = a->Y, o->idx = a->pos, o->weight = a->w, o->dtype = a->cdt, o->k = k;
        return M1C_OK;
    }
    CALL(combine<T>(a, s, out));
    prof_mark(pf, "combine");
    return M1C_OK;
}

template <typename T>
static int backward_impl(const topk_cuda_args *a, float *din, const float *dout, const float *in, moe_prof *pf) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F;
    const bool grouped = use_grouped(a), xw = use_xw(a);
    int64_t rows = (int64_t)N * k;
    if (!grouped) { /* per-expert calls: the offsets on the host, and the checks they allow */
        if (*a->h_src == a->off) { /* copied by this run's forward, which may not have waited ("auto") */
            MOE_CUDA_CHECK(h, cudaEventSynchronize(((topk_copy *)a->copied)->done));
        } else { /* not copied by this run's forward (or another run's since): copy now */
            MOE_CUDA_CHECK(h, cudaStreamWaitEvent(s, ((topk_copy *)a->copied)->done, 0)); /* that run's copy */
            CALL(tables_to_host(a, s, false));
            float jit_f = 0.0f;
            MOE_CUDA_CHECK(h, cudaMemcpyAsync(&jit_f, a->st + ST_JIT, sizeof(float), cudaMemcpyDeviceToHost, s));
            MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
            *a->h_src = a->off;
            prof_mark(pf, "counts_to_host");
            if (jit_f != 0.0f && !a->noise)
                return h->error(h, "topk: backward after a jittered forward without the jitter buffer");
        }
        if (a->h_cnt[C_ASSIGN] != (int64_t)N * k)
            return h->error(h, "topk: backward for %d tokens after a forward of %d", N, (int)(a->h_cnt[C_ASSIGN] / k));
        rows = a->h_off[E];
    }
    T *dy_lp = (T *)a->dy_lp;
    if (a->cdt == M1C_BF16 && !dy_lp) return h->error(h, "topk: BF16 backward needs the bf16 d rows buffer");
    const T *xs = (const T *)a->xs, *GU = (const T *)a->gu, *act = (const T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    T *dgu = (T *)a->dgu, *dact = (T *)a->dact; /* d act in T (bf16 in BF16: see the header) */
    /* The d rows as GEMM operand, and later the d x rows in the same buffer (the d rows are dead once
     * dWd and d act, earlier on the stream, have read them): drow itself in F32, dy_lp in BF16. */
    T *dx = dy_lp ? dy_lp : (T *)(void *)a->drow;
    const T *dy = dx;

    CALL(router_bwd<T>(a, s, dy_lp, dout));
    prof_mark(pf, "router_bwd");
    /* The Hopper kernels run each pair below in one launch (up to XW_MAX_E experts); they write a gradient
     * handed over unset, the other paths add to it once it is zeroed. */
    const bool pair = xw && E <= XW_MAX_E;
    if (!pair && a->dWd_unset) MOE_CUDA_CHECK(h, cudaMemsetAsync(a->dWd, 0, (size_t)E * H * F * sizeof(float), s));
    if (!pair && a->dWgu_unset)
        MOE_CUDA_CHECK(h, cudaMemsetAsync(a->dWgu, 0, (size_t)E * 2 * F * H * sizeof(float), s));
    /* dWd_e += dY_e^T A_e; d act = dY Wd_e (one group: both only read dY). */
    expert_queue queue = {a->queue, 0}, *q = grouped ? NULL : &queue;
    if (pair) {
        CALL(xw_pair(a, dact, F, dy, H, Wd, a->dWd, dy, H, act, F, a->dWd_unset));
    } else {
        CALL(expert_gemm<GG_TN>(a, q, a->dWd, F, (int64_t)H * F, dy, H, act, F, 0, H, F, 0, 1.0f));
        CALL(expert_gemm<GG_NN>(a, q, dact, F, 0, dy, H, Wd, F, (int64_t)H * F, 0, F, H, 0.0f));
        CALL(run_queue(a, q));
    }
    prof_mark(pf, "gemm_dWd_dact");
    (void)pdl_launch(moe_swiglu_bwd_dev_kernel<T, T>, moe_swiglu_blocks<T>(rows, F), MOE_THREADS, 0, s, dgu, dact, GU,
                     a->off + E, F);
    MOE_LAUNCH_CHECK(h, "moe_swiglu_bwd_dev_kernel");
    prof_mark(pf, "swiglu_bwd");
    /* dWgu_e += dGU_e^T X_e; d x rows = dGU Wgu_e in T (one group: both read dGU; the d x rows go into dx,
     * whose dY the group before has read). */
    if (pair) {
        CALL(xw_pair(a, dx, H, dgu, 2 * F, Wgu, a->dWgu, dgu, 2 * F, xs, H, a->dWgu_unset));
    } else {
        CALL(expert_gemm<GG_TN>(a, q, a->dWgu, H, (int64_t)2 * F * H, (const T *)dgu, 2 * F, xs, H, 0, 2 * F, H, 0,
                                1.0f));
        CALL(expert_gemm<GG_NN>(a, q, dx, H, 0, (const T *)dgu, 2 * F, Wgu, H, (int64_t)2 * F * H, 0, H, 2 * F, 0.0f));
        CALL(run_queue(a, q));
    }
    prof_mark(pf, "gemm_dWgu_drows");
    /* din += the token's d x rows + (dlogits Wr) (times the noise with jitter); then dWr, whose partial
     * sums take drow (in F32 the d x rows there are read by then). */
    CALL(unpermute_router<T>(a, s, din, dx));
    prof_mark(pf, "unpermute_router");
    CALL(router_dwr(a, s, in));
    prof_mark(pf, "router_dWr");
    return M1C_OK;
}

template <int MODE, typename TC> static cudaError_t gg_allow_smem() {
    return cudaFuncSetAttribute(grouped_gemm_kernel<MODE, TC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)gg_geom<MODE>::SMEM);
}

extern "C" int topk_cuda_setup_grouped(const m1c_host *h) {
    typedef __nv_bfloat16 bf;
    /* The instantiations grouped_gemm launches: NT bf16 (gate/up, down), NN bf16 (d act, d x rows), TN f32
     * (weight gradients). */
    cudaError_t e = gg_allow_smem<GG_NT, bf>();
    if (e == cudaSuccess) e = gg_allow_smem<GG_NN, bf>();
    if (e == cudaSuccess) e = gg_allow_smem<GG_TN, float>();
    if (e != cudaSuccess) return h->error(h, "topk: cudaFuncSetAttribute (grouped GEMM): %s", cudaGetErrorString(e));
    return M1C_OK;
}

extern "C" int topk_cuda_setup_xw(const m1c_host *h, void **xw_enc, int *xw_grid, int **xw_ctr) {
    *xw_enc = NULL, *xw_grid = 0, *xw_ctr = NULL;
    const tma_encode_fn enc = wg_available() ? tma_encoder() : NULL;
    if (!enc || xw_setup(xw_grid) != cudaSuccess) {
        (void)cudaGetLastError(); /* no Hopper kernels here: cuBLAS runs the products */
        return M1C_OK;
    }
    MOE_CUDA_CHECK(h, cudaMalloc((void **)xw_ctr, 2 * sizeof(int)));
    MOE_CUDA_CHECK(h, cudaMemset(*xw_ctr, 0, 2 * sizeof(int)));
    *xw_enc = reinterpret_cast<void *>(enc);
    return M1C_OK;
}

extern "C" void topk_cuda_free_xw(int *xw_ctr) { cudaFree(xw_ctr); }

extern "C" int topk_cuda_forward(const topk_cuda_args *a, float *out, const float *in) {
    if (a->N <= 0) return M1C_OK;
    moe_prof pf;
    prof_init(&pf, (cudaStream_t)a->stream);
    const int rc = a->cdt == M1C_BF16 ? forward_impl<__nv_bfloat16>(a, out, in, &pf)
                                      : forward_impl<float>(a, out, in, &pf);
    prof_end(&pf, "fwd", a);
    return rc;
}

extern "C" int topk_cuda_backward(const topk_cuda_args *a, float *din, const float *dout, const float *in) {
    if (a->N <= 0) return M1C_OK;
    moe_prof pf;
    prof_init(&pf, (cudaStream_t)a->stream);
    const int rc = a->cdt == M1C_BF16 ? backward_impl<__nv_bfloat16>(a, din, dout, in, &pf)
                                      : backward_impl<float>(a, din, dout, in, &pf);
    prof_end(&pf, "bwd", a);
    return rc;
}

extern "C" void topk_cuda_host_tables_free(int32_t *tables, void *copied) {
    topk_copy *c = (topk_copy *)copied;
    if (c) {
        if (c->ready)
            cudaEventDestroy(c->ready);
        if (c->done)
            cudaEventDestroy(c->done);
        if (c->side)
            cudaStreamDestroy(c->side);
        free(c);
    }
    cudaFreeHost(tables);
}

extern "C" int topk_cuda_host_tables(const m1c_host *h, int E, int32_t **tables, void **copied) {
    *tables = NULL, *copied = NULL;
    const size_t bytes = (size_t)(3 + 3 * E) * sizeof(int32_t) + (size_t)(ST_F + 2 * E) * sizeof(float);
    MOE_CUDA_CHECK(h, cudaHostAlloc((void **)tables, bytes, cudaHostAllocDefault));
    memset(*tables, 0, bytes);
    topk_copy *c = (topk_copy *)calloc(1, sizeof *c);
    cudaError_t e = c ? cudaEventCreateWithFlags(&c->ready, cudaEventDisableTiming) : cudaErrorMemoryAllocation;
    if (e == cudaSuccess)
        e = cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        topk_cuda_host_tables_free(*tables, c);
        *tables = NULL;
        return h->error(h, "topk: the copy's events and stream: %s", cudaGetErrorString(e));
    }
    *copied = c;
    return M1C_OK;
}

extern "C" int topk_cuda_wait(const m1c_host *h, void *copied) {
    MOE_CUDA_CHECK(h, cudaEventSynchronize(((topk_copy *)copied)->done));
    return M1C_OK;
}
