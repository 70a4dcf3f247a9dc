/* The LM head's training forward at bf16 on Hopper (sm_90a), without f32 logits in memory. Included by
 * ops.cu, which chooses it (m1c_cuda_head_forward with q at precision 2) and falls back to cuBLAS and
 * logsoftmax_rows_q elsewhere.
 *
 * Two launches instead of a GEMM writing the f32 logits z (N x V, 2.1 GB at the training shape) and a pass
 * reading them back:
 *   hw_kernel: z = h W^T tile by tile (m1c/cuda/wg_tile.cuh: 128 x 256 tiles, TMA ring, m64n256k16), and
 *     in the epilogue, per row and column tile c, the tile's max m_c and sum s_c of exp(z - m_c); the
 *     exponentials e = exp(z - m_c), in (0, 1], go to q as bf16 (stmatrix staging and bulk tensor stores,
 *     as the expert products do).
 *   hw_stats: per row lse = M + log sum_c s_c exp(m_c - M) (M = max_c m_c); the target's logit zt, a dot
 *     product of the same bf16 rows of h and W summed in f32; logp = zt - lse. (Picking zt out of the
 *     accumulators in the epilogue, 64 compares a row, made the kernel spill its registers.)
 *   hw_scale: q in place, q = onehot - e exp(m_c - lse), the target's entry 1 - exp(zt - lse) from zt; a
 *     pass with nothing but its stream of loads and stores (one pass that also made the statistics, with
 *     the block's reductions between its rows, ran 0.566 ms against ~0.5 at this pass's 2 GB).
 * Memory: 1 GB of e written and 1 GB read and rewritten, against 2.1 GB written, 2.1 GB read and 1 GB
 * written before. Precision: e is rounded to bf16 (relative 2^-9) before the scale, so q's entries carry
 * two bf16 roundings instead of one, except the target's (its 1 - p would lose everything to e's rounding
 * where p is near 1: computed from zt in f32 instead); lse and logp come from f32 products and f32 sums,
 * as before.
 *
 * The schedule: tiles in groups of HW_GM row tiles, row tiles fastest within a group, so the ~132 tiles
 * running at once span ~8 row tiles and ~16 column tiles (2 MB of h and 6 MB of W, both from L2), where a
 * plain row-major order would pull all of W (49 MB at V 32000) through L2 for every row tile.
 *
 * Sizes: H and V multiples of 8 (16-byte row strides for the maps), N below 2^31 - 128 (int row indices);
 * hw_forward refuses others. */
#pragma once

#include <math.h>
#include <m1c/cuda/wg_tile.cuh>

enum { HW_GM = 8 }; /* row tiles a group of the schedule */
enum { HW_FU = 8 }; /* hw_scale: 16-byte chunks a thread has in flight */

struct hw_params {
    CUtensorMap a, w, e;  /* h (N, H) and W (V, H) in boxes of 64 x 128; e = q (N, V) in boxes of 64 x 64 */
    float2 *part;         /* (N, nb): row i's (m_c, s_c) for column tile c */
    int N, V, nk, nm, nb; /* rows, columns, K steps, row and column tiles */
};

/* Tile t's first row m0 and column tile c (the grouped order above); false past the last. */
static __device__ inline bool hw_tile(const hw_params &P, int t, int &m0, int &c) {
    if (t >= P.nm * P.nb) return false;
    const int per = HW_GM * P.nb, g = t / per, r = t - g * per;
    const int gm = P.nm - g * HW_GM < HW_GM ? P.nm - g * HW_GM : HW_GM;
    m0 = (g * HW_GM + r % gm) * WT_BM, c = r / gm;
    return true;
}

static __device__ inline float hw_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Warpgroup w's epilogue of tile (m0, c): the accumulators' rows (layout of wgmma.cuh: row 16 warp +
 * lane / 4 + 8 h, columns 8 t + 2 (lane % 4) + {0, 1}, four threads a row) become exp(z - m_c), their max
 * and sum go to part; then wt_store_tile (wg_tile.cuh). In a last, partial column tile the
 * columns past V are set to -inf first (exp: 0), so the loops below compare nothing. */
static __device__ inline void hw_epilogue(wt_smem &sm, const hw_params &P, float (&d)[128], int m0, int c, int w) {
    const float L2E = 1.4426950408889634f;
    const int lt = threadIdx.x % 128, q = lt % 4, lim = P.V - c * WT_BN - 2 * q; /* columns 8 t + e < lim exist */
    if (lim < WT_BN - 6) /* some of this thread's columns 8 t + {0, 1} (t < 32) are past V */
#pragma unroll
        for (int t = 0; t < 32; t++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (8 * t + e % 2 >= lim) d[4 * t + e] = -INFINITY;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = m0 + 64 * w + 16 * (lt / 32) + lt % 32 / 4 + 8 * h;
        float m = -INFINITY;
#pragma unroll
        for (int t = 0; t < 32; t++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float z = d[4 * t + 2 * h + e];
                m = fmaxf(m, z);
            }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float ml = m * L2E;
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < 32; t++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float &z = d[4 * t + 2 * h + e];
                z = hw_exp2(fmaf(z, L2E, -ml)); /* exp2(-inf) = 0 */
                s += z;
            }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (row < P.N && q == 0) P.part[(int64_t)row * P.nb + c] = make_float2(m, s);
    }
    wt_store_tile(sm, w, &P.e, d, c * WT_BN, P.V, m0 + 64 * w); /* rows past N: dropped by the stores */
}

__global__ static void __launch_bounds__(WT_THREADS, 1) hw_kernel(const __grid_constant__ hw_params P) {
#if WG_DEVICE
    extern __shared__ unsigned char wt_raw[];
    wt_smem &sm = wg_smem<wt_smem>(wt_raw);
    const int role = wt_start(sm);
    if (role < 0) return;
    int m0, c;
    uint32_t it = 0;
    if (role == 0) { /* the copies: 128 rows of h, 256 of W per K step */
        for (int t = blockIdx.x; hw_tile(P, t, m0, c); t += gridDim.x)
            for (int kb = 0; kb < P.nk; kb++, it++) {
                const int s = (int)(it % WT_ST);
                const uint32_t full = mma_smem(&sm.full[s]), b = mma_smem(sm.b[s]);
                tma_wait(mma_smem(&sm.empty[s]), ((it / WT_ST) & 1) ^ 1);
                tma_expect(full, (WT_BM + WT_BN) * WT_BK * 2);
                tma_load_2d(mma_smem(sm.a[s]), &P.a, full, kb * WT_BK, m0);
                tma_load_2d(b, &P.w, full, kb * WT_BK, c * WT_BN);
                tma_load_2d(b + 2 * WT_PANEL, &P.w, full, kb * WT_BK, c * WT_BN + WT_BN / 2);
            }
        return;
    }
    const int w = threadIdx.x / 128 - 1, lt = threadIdx.x % 128;
    float d[128] = {};
    for (int t = blockIdx.x; hw_tile(P, t, m0, c); t += gridDim.x) {
        wt_mainloop<0, 0>(sm, d, it, P.nk, w, false);
        hw_epilogue(sm, P, d, m0, c, w);
    }
    if (lt == 0) tma_store_drain(); /* the block's shared memory outlives its stores */
#endif
}

/* Row i's statistics, one warp a row: lse, logp, the target's q (pt, N floats) and each column tile's scale
 * -exp(m_c - lse) (0 on unscored rows) in place of m_c in part. H even. */
__global__ static void __launch_bounds__(256) hw_stats(float *lse, float *logp, float *pt, float2 *part,
                                                       const __nv_bfloat16 *h16, const __nv_bfloat16 *W16,
                                                       const int32_t *targets, int64_t N, int H, int V, int nb) {
    const int lane = threadIdx.x % 32;
    for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < N;
         i += (int64_t)gridDim.x * (blockDim.x / 32)) {
        float2 *p = part + i * nb;
        const int32_t t = targets[i];
        float m = -INFINITY, z = 0.0f;
        for (int c = lane; c < nb; c += 32) m = fmaxf(m, p[c].x);
        if (t >= 0 && t < V) { /* an unscored row (t < 0) or a target past V: zt = 0, as logsoftmax_rows_q */
            const __nv_bfloat162 *hr = reinterpret_cast<const __nv_bfloat162 *>(h16 + i * H),
                                 *wr = reinterpret_cast<const __nv_bfloat162 *>(W16 + (int64_t)t * H);
            for (int k = lane; k < H / 2; k += 32) {
                const float2 a = __bfloat1622float2(hr[k]), b = __bfloat1622float2(wr[k]);
                z = fmaf(a.x, b.x, fmaf(a.y, b.y, z));
            }
        }
        for (int o = 16; o > 0; o >>= 1) { /* xor butterflies: every lane gets the same bits */
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            z += __shfl_xor_sync(0xffffffffu, z, o);
        }
        float s = 0.0f;
        for (int c = lane; c < nb; c += 32) s += p[c].y * expf(p[c].x - m);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float l = m + logf(s), on = t >= 0 ? 1.0f : 0.0f;
        for (int c = lane; c < nb; c += 32) p[c].x = -on * expf(p[c].x - l);
        if (lane == 0) {
            lse[i] = l, pt[i] = on * (1.0f - expf(z - l)); /* the target's q; an unscored row's q is 0 */
            if (logp) logp[i] = t >= 0 ? z - l : 0.0f;
        }
    }
}

/* q in place from e: each entry times its row's and column tile's scale, the target's entry pt (hw_stats);
 * rows by blocks, HW_FU 16-byte chunks a thread in flight. V % 8 == 0, q 16-byte aligned. */
__global__ static void __launch_bounds__(256) hw_scale(__nv_bfloat16 *q, const float2 *part, const float *pt,
                                                       const int32_t *targets, int64_t N, int V, int nb) {
    const int n8 = V / 8;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float2 *sc = part + i * nb;
        const int32_t t = targets[i];
        const float p = pt[i];
        uint4 *row = reinterpret_cast<uint4 *>(q + i * (int64_t)V);
        for (int j0 = threadIdx.x; j0 < n8; j0 += HW_FU * blockDim.x) {
            uint4 v[HW_FU]; /* HW_FU chunks in flight before any is written */
#pragma unroll
            for (int u = 0; u < HW_FU; u++)
                if (j0 + u * (int)blockDim.x < n8) v[u] = row[j0 + u * blockDim.x];
#pragma unroll
            for (int u = 0; u < HW_FU; u++) {
                const int j = j0 + u * blockDim.x;
                if (j >= n8) break;
                const float f = sc[j / (WT_BN / 8)].x;
                uint32_t *w = reinterpret_cast<uint32_t *>(&v[u]);
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    float2 x = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&w[k]));
                    x.x = 8 * j + 2 * k == t ? p : x.x * f;
                    x.y = 8 * j + 2 * k + 1 == t ? p : x.y * f;
                    w[k] = wt_pack(x.x, x.y);
                }
                row[j] = v[u];
            }
        }
    }
}

/* ---- host ---- */

static inline int hw_map(tma_encode_fn enc, CUtensorMap *m, const void *base, int64_t rows, int64_t cols,
                         uint32_t box_r, uint32_t box_c) {
    return wt_map2(enc, m, base, rows, cols, cols, box_r, box_c);
}

/* Column tiles of a row (part's row length). */
static inline int hw_col_tiles(int V) { return (V + WT_BN - 1) / WT_BN; }

/* Scratch floats hw_forward needs for N rows of V columns. */
static inline int64_t hw_scratch_floats(int64_t N, int V) { return N * (2 * (int64_t)hw_col_tiles(V) + 1); }

/* Queues the three launches on s: h16 (N, H) and W16 (V, H) bf16, q (N, V) bf16 written, lse, logp (may be
 * NULL) written, scratch (hw_scratch_floats, 8-byte aligned); grid: blocks of hw_kernel (one per SM), fin:
 * of the passes. 0, or -1 where the sizes or pointers do not fit or a map cannot be made (nothing queued).
 * hw_kernel's shared memory must have been allowed (hw_allow). */
static inline int hw_forward(tma_encode_fn enc, int grid, int fin, cudaStream_t s, float *lse, float *logp, void *q,
                             const void *h16, const void *W16, const int32_t *targets, float *scratch, int64_t N, int H,
                             int V) {
    if (N <= 0 || N >= (1ll << 31) - WT_BM || H % 8 || V % 8 || !q || !h16 || !W16 ||
        ((uintptr_t)q | (uintptr_t)h16 | (uintptr_t)W16) & 15)
        return -1;
    hw_params P;
    if (hw_map(enc, &P.a, h16, N, H, WT_BM, WT_BK) || hw_map(enc, &P.w, W16, V, H, WT_BN / 2, WT_BK) ||
        hw_map(enc, &P.e, q, N, V, 64, 64))
        return -1;
    float2 *part = reinterpret_cast<float2 *>(scratch);
    float *pt = scratch + 2 * N * hw_col_tiles(V);
    P.part = part;
    P.N = (int)N, P.V = V, P.nk = (H + WT_BK - 1) / WT_BK;
    P.nm = (int)((N + WT_BM - 1) / WT_BM), P.nb = hw_col_tiles(V);
    const int64_t tiles = (int64_t)P.nm * P.nb;
    hw_kernel<<<(int)(tiles < grid ? tiles : grid), WT_THREADS, wg_smem_bytes<wt_smem>(), s>>>(P);
    const int rows = (int)(N < fin ? N : fin);
    hw_stats<<<(rows + 7) / 8, 256, 0, s>>>(lse, logp, pt, part, (const __nv_bfloat16 *)h16,
                                            (const __nv_bfloat16 *)W16, targets, N, H, V, P.nb);
    hw_scale<<<rows, 256, 0, s>>>((__nv_bfloat16 *)q, part, pt, targets, N, V, P.nb);
    return 0;
}

/* Once per device: hw_kernel's dynamic shared memory. */
static inline cudaError_t hw_allow(void) {
    return cudaFuncSetAttribute(hw_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<wt_smem>());
}
