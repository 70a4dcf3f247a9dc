/* The LM head's training forward at bf16 on Hopper (sm_90a), without f32 logits in memory. Included by
 * ops.cu, which chooses it (m1c_cuda_head_forward with q at precision 2) and falls back to cuBLAS and
 * logsoftmax_rows_q elsewhere.
 *
 * What it leaves (core/ops.h): q (N, V) bf16 and each row's scale qs, q qs = onehot - softmax. Row i's q
 * holds e = exp(z - c_i), with c_i a shift of the row's own (below), except the target's entry; its scale is
 * qs_i = -exp(c_i - lse_i), so that q qs = -p where p is the softmax. The backward takes qs into the
 * row factors it already applies (dlogp), and the forward has no pass that rescales q.
 *
 * Three launches instead of a GEMM writing the f32 logits z (N x V, 2.1 GB at the training shape) and a
 * pass reading them back:
 *   hw_kernel over column tile 0: z = h W^T for the first 256 columns (m1c/cuda/wg_tile.cuh: 128 x 256 tiles,
 *     TMA ring, m64n256k16); each row's max there is its shift c_i (kept in `shift`); e = exp(z - c_i) goes
 *     to q as bf16 (stmatrix staging and bulk tensor stores, as the expert products do), and the tile's
 *     (c_i, sum of e) to part.
 *   hw_kernel over the other column tiles: the same with c_i read back, where the tile's max m_c stays
 *     within HW_T of c_i (e <= exp(HW_T)); a tile whose max lies further up is written with its own shift
 *     m_c (e <= 1), recorded in part as (m_c, sum of e).
 *   hw_stats, a warp per row: lse = M + log sum_c s_c exp(m_c - M) (M = max_c m_c); the target's logit zt,
 *     a dot product of the same bf16 rows of h and W summed in f32; logp = zt - lse; qs_i; and q's target
 *     entry (1 - exp(zt - lse)) / qs_i, from zt in f32 (1 - p from the rounded e would lose everything where
 *     p is near 1). A row with a tile of its own shift (M > c_i: its largest logit more than HW_T above
 *     those of column tile 0) is first brought to c_i = M in place, each tile times exp(m_c - M): rare, and
 *     no slower than the pass it replaces.
 * Memory: 1 GB of e written, against 2.1 GB written, 2.1 GB read and 1 GB written by cuBLAS and the pass,
 * or the 1 GB read and rewritten by the rescaling pass the kernel needed when each tile had its own shift.
 * Precision: q's entries are e rounded once to bf16 (relative 2^-9); lse and logp come from f32 products and
 * f32 sums. Range: e <= exp(HW_T), so qs_i >= exp(-HW_T - log V), ~1e-22 at V = 32000, which keeps dlogp qs
 * and its products with h and Z far above f32's and bf16's smallest normal numbers.
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
/* How far (in nats) a tile's largest logit may lie above its row's shift c_i before the tile takes its own */
#define HW_T 40.0f

struct hw_params {
    CUtensorMap a, w, e;  /* h (N, H) and W (V, H) in boxes of 64 x 128; e = q (N, V) in boxes of 64 x 64 */
    float2 *part;         /* (N, nb): row i's (m_c, s_c) for column tile c: its shift and sum of e */
    float *shift;         /* (N): c_i, written by the launch over column tile 0, read by the other */
    int N, V, nk, nm, nb; /* rows, columns, K steps, row and column tiles */
    int c0, c1;           /* this launch's column tiles: c0 .. c1 - 1 */
};

/* Tile t's first row m0 and column tile c (the grouped order above); false past the last. */
static __device__ inline bool hw_tile(const hw_params &P, int t, int &m0, int &c) {
    const int nc = P.c1 - P.c0;
    if (t >= P.nm * nc) return false;
    const int per = HW_GM * nc, g = t / per, r = t - g * per;
    const int gm = P.nm - g * HW_GM < HW_GM ? P.nm - g * HW_GM : HW_GM;
    m0 = (g * HW_GM + r % gm) * WT_BM, c = P.c0 + r / gm;
    return true;
}

static __device__ inline float hw_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Warpgroup w's epilogue of tile (m0, c): the accumulators' rows (layout of wgmma.cuh: row 16 warp +
 * lane / 4 + 8 h, columns 8 t + 2 (lane % 4) + {0, 1}, four threads a row) become exp(z - shift), the
 * shift and the sum go to part; then wt_store_tile (wg_tile.cuh). The shift: in column tile 0 the tile's
 * max, which becomes the row's c_i; elsewhere c_i, or the tile's max m where m > c_i + HW_T. In a last,
 * partial column tile the columns past V are set to -inf first (exp: 0), so the loops below compare
 * nothing. */
static __device__ inline void hw_epilogue(wt_smem &sm, const hw_params &P, float (&d)[128], int m0, int c, int w) {
    const float L2E = 1.4426950408889634f;
    const int lt = threadIdx.x % 128, q = lt % 4, lim = P.V - c * WT_BN - 2 * q; /* columns 8 t + e < lim exist */
    const int r0 = m0 + 64 * w + 16 * (lt / 32) + lt % 32 / 4;
    float ci[2] = {0.0f, 0.0f}; /* the rows' shifts, loaded before the reductions that wait on nothing else */
    if (c > 0)
#pragma unroll
        for (int h = 0; h < 2; h++) ci[h] = r0 + 8 * h < P.N ? P.shift[r0 + 8 * h] : 0.0f;
    if (lim < WT_BN - 6) /* some of this thread's columns 8 t + {0, 1} (t < 32) are past V */
#pragma unroll
        for (int t = 0; t < 32; t++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (8 * t + e % 2 >= lim) d[4 * t + e] = -INFINITY;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = r0 + 8 * h;
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
        const float sh = c == 0 || m > ci[h] + HW_T ? m : ci[h], ml = sh * L2E;
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
        if (row < P.N && q == 0) {
            P.part[(int64_t)row * P.nb + c] = make_float2(sh, s);
            if (c == 0) P.shift[row] = sh;
        }
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

/* Row i's statistics, one warp a row: lse, logp, qs and q's target entry; a row with tiles of their own
 * shift first brought to its largest (see the top). H and V multiples of 8, h16, W16 and q 16-byte
 * aligned. */
__global__ static void __launch_bounds__(256) hw_stats(float *lse, float *logp, float *qs, __nv_bfloat16 *q,
                                                       const float2 *part, const float *shift,
                                                       const __nv_bfloat16 *h16, const __nv_bfloat16 *W16,
                                                       const int32_t *targets, int64_t N, int H, int V, int nb) {
    const int lane = threadIdx.x % 32;
    for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < N;
         i += (int64_t)gridDim.x * (blockDim.x / 32)) {
        const float2 *p = part + i * nb;
        const int32_t t = targets[i];
        float m = -INFINITY, z = 0.0f, c = shift[i];
        for (int k = lane; k < nb; k += 32) m = fmaxf(m, p[k].x);
        if (t >= 0 && t < V) { /* an unscored row (t < 0) or a target past V: zt = 0, as logsoftmax_rows_q */
            const __nv_bfloat16 *hr = h16 + i * H, *wr = W16 + (int64_t)t * H;
#pragma unroll 4
            for (int k = 8 * lane; k < H; k += 256) { /* 16-byte loads: H % 8 == 0, rows 16-byte aligned */
                const uint4 hu = *reinterpret_cast<const uint4 *>(hr + k), wu = *reinterpret_cast<const uint4 *>(wr + k);
                const __nv_bfloat162 *h2 = reinterpret_cast<const __nv_bfloat162 *>(&hu),
                                     *w2 = reinterpret_cast<const __nv_bfloat162 *>(&wu);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 a = __bfloat1622float2(h2[e]), b = __bfloat1622float2(w2[e]);
                    z = fmaf(a.x, b.x, fmaf(a.y, b.y, z));
                }
            }
        }
        for (int o = 16; o > 0; o >>= 1) { /* xor butterflies: every lane gets the same bits */
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            z += __shfl_xor_sync(0xffffffffu, z, o);
        }
        float s = 0.0f;
        for (int k = lane; k < nb; k += 32) s += p[k].y * expf(p[k].x - m);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float l = m + logf(s);
        uint4 *row = reinterpret_cast<uint4 *>(q + i * (int64_t)V);
        if (m > c) { /* tiles of their own shift: every tile to shift m (factor 1 leaves the bits) */
            for (int j = lane; j < V / 8; j += 32) {
                const float f = expf(p[j / (WT_BN / 8)].x - m);
                uint4 v = row[j];
                uint32_t *u = reinterpret_cast<uint32_t *>(&v);
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float2 x = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&u[k]));
                    u[k] = wt_pack(x.x * f, x.y * f);
                }
                row[j] = v;
            }
            c = m;
            __syncwarp(); /* the target's entry below is written after the rescaled one */
        }
        if (lane == 0) {
            const float on = t >= 0 ? 1.0f : 0.0f; /* an unscored row: qs = 0 */
            lse[i] = l, qs[i] = -on * expf(c - l);
            if (logp) logp[i] = t >= 0 ? z - l : 0.0f;
            if (t >= 0 && t < V) q[i * V + t] = __float2bfloat16_rn(-(1.0f - expf(z - l)) * expf(l - c));
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

/* Scratch floats hw_forward needs for N rows of V columns: part, then shift. */
static inline int64_t hw_scratch_floats(int64_t N, int V) { return N * (2 * (int64_t)hw_col_tiles(V) + 1); }

/* Queues the three launches on s: h16 (N, H) and W16 (V, H) bf16, q (N, V) bf16 and qs (N) written, lse,
 * logp (may be NULL) written, scratch (hw_scratch_floats, 8-byte aligned); grid: blocks of hw_kernel (one
 * per SM). 0, or -1 where the sizes or pointers do not fit or a map cannot be made (nothing queued).
 * hw_kernel's shared memory must have been allowed (hw_allow). */
static inline int hw_forward(tma_encode_fn enc, int grid, cudaStream_t s, float *lse, float *logp, void *q,
                             float *qs, const void *h16, const void *W16, const int32_t *targets, float *scratch,
                             int64_t N, int H, int V) {
    if (N <= 0 || N >= (1ll << 31) - WT_BM || H % 8 || V % 8 || !q || !qs || !h16 || !W16 ||
        ((uintptr_t)q | (uintptr_t)h16 | (uintptr_t)W16) & 15)
        return -1;
    hw_params P;
    if (hw_map(enc, &P.a, h16, N, H, WT_BM, WT_BK) || hw_map(enc, &P.w, W16, V, H, WT_BN / 2, WT_BK) ||
        hw_map(enc, &P.e, q, N, V, 64, 64))
        return -1;
    P.part = reinterpret_cast<float2 *>(scratch);
    P.shift = scratch + 2 * N * hw_col_tiles(V);
    P.N = (int)N, P.V = V, P.nk = (H + WT_BK - 1) / WT_BK;
    P.nm = (int)((N + WT_BM - 1) / WT_BM), P.nb = hw_col_tiles(V);
    for (int pass = 0; pass < 2 && pass < P.nb; pass++) { /* column tile 0 (the shifts), then the others */
        P.c0 = pass, P.c1 = pass ? P.nb : 1;
        const int64_t tiles = (int64_t)P.nm * (P.c1 - P.c0);
        hw_kernel<<<(int)(tiles < grid ? tiles : grid), WT_THREADS, wg_smem_bytes<wt_smem>(), s>>>(P);
    }
    /* a warp per row, all rows at once: a grid of 8 warps per SM left each warp ~16 rows, one after another
     * (85 us at the training shape on an H100, a latency-bound 23% of DRAM; now 33 us, 59%) */
    const int64_t sb = (N + 7) / 8;
    hw_stats<<<(unsigned)(sb < 65535 ? sb : 65535), 256, 0, s>>>(lse, logp, qs, (__nv_bfloat16 *)q, P.part, P.shift,
                                                               (const __nv_bfloat16 *)h16, (const __nv_bfloat16 *)W16,
                                                               targets, N, H, V, P.nb);
    return 0;
}

/* Once per device: hw_kernel's dynamic shared memory. */
static inline cudaError_t hw_allow(void) {
    return cudaFuncSetAttribute(hw_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<wt_smem>());
}
