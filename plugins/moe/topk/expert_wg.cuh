/* topk's expert products on Hopper (sm_90a), fed by the tensor memory accelerator and run on warpgroup
 * MMA: one persistent launch per forward product for all experts, and one per pair of backward products.
 * Included by topk.cu (and bench/bench_experts.cu, tests/expert_wg_glue.cu).
 *
 * The products (row-major; the rows of expert e are [off[e], off[e+1]); W_e is expert e's weight):
 *   forward, xw_forward:   C[r, n] = sum_k A[r, k] W_e[n, k]     x Wgu^T (gate/up), act Wd^T (down)
 *   backward, xw_backward, two products in one launch:
 *     rows:     C[r, n] = sum_k A[r, k] W_e[k, n]             dY Wd (d act), dGU Wgu (d x rows)
 *     weights:  G_e[m, n] += sum_{r of e} A[r, m] B[r, n]     dY^T act (dWd), dGU^T x (dWgu), f32
 * with f32 accumulation; row products rounded to bf16 once: what cuBLAS's GemmEx computes per expert, up
 * to the order of the f32 sums. The forward reads the offsets on the device only, so nothing waits for
 * the host; the backward's weight products need the row counts on the host (one tensor map per expert,
 * whose rows end where the expert's do, so the copies fill zeros past them), which the forward's copy
 * has brought by then.
 *
 * Geometry: the tiles of m1c/cuda/wg_tile.cuh (128 x 256, K steps of 64 through a ring of WT_ST stages, a
 * copying warpgroup and two computing ones): K-major boxes (A rows of 64 K; W_e rows for the forward) or
 * MN-major panels of 64 columns (W_e of the backward's row products; A and B of its weight products, whose
 * K runs down the rows). Blocks are persistent, one per SM. The forward takes tiles blockIdx.x, + gridDim.x, ...: tile t is
 * row tile t / nb (row tiles numbered expert after expert) and column tile t % nb, so blocks running
 * together share their A rows (the weights, 3-13 MB, stay in L2). The backward's tiles differ in length
 * (a weight tile runs over an expert's ~4096 rows, a row tile over K = H or 2F), so its copier takes the
 * next tile from a counter in global memory, the long weight tiles first, and tells the computing
 * warpgroups which through shared memory; the last block to finish resets the counter. Rows past an
 * expert's end are read by row products (the next expert's rows, or zeros past the buffer) and never
 * written: a product row depends on its A row alone.
 *
 * Epilogue. A warpgroup whose 64 rows of a row product all belong to the tile's expert rounds them into
 * its staging panels in shared memory (stmatrix, the 128-byte swizzle) and one of its threads hands them
 * to bulk tensor stores, which write them to global memory while the warpgroup goes on with its next
 * tile: the tensor cores idle only while the panels are written. (Stored from the registers instead, 4-byte
 * pieces of 8 rows a warp instruction, the forward's products ran at 460 TFLOP/s against 690-720 without
 * any stores: docs/perf.md.) A warpgroup whose rows cross the expert's end stores from its registers, row
 * by row. The weight products stage their f32 sums the same way, in two halves, and bulk reductions add
 * them into G_e at L2 (one tile per element: a fixed order, the same bits every run), or bulk stores write
 * them where the core handed G over unset (M1C_TENSOR_UNSET: no zeroing pass before, no reads of G).
 *
 * Sizes: N, K and the weight products' M and N multiples of 8 (16-byte row strides for the maps and
 * pairs of columns for the register stores); xw_forward and xw_backward refuse others. */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

#include <m1c/cuda/wg_tile.cuh>
#include "../moe_cuda.cuh"

/* The most experts xw_backward takes (one pair of tensor maps each in its parameters). */
enum { XW_MAX_E = 32 };

/* A row product: C (rows, N; row stride ldc) from the rows of every expert. */
typedef struct xw_rows {
    __nv_bfloat16 *C;
    const int32_t *off; /* (E + 1) expert row offsets, on the device */
    int64_t ldc;
    int E, N, nk; /* experts, columns, K steps */
} xw_rows;

/* The forward's parameters (tensor shapes outermost first, boxes innermost first): A (rows, K) in boxes of
 * 64 x 128, W (E, N, K) in boxes of 64 x 128 x 1, C (rows, N) in boxes of 64 x 64. With glu = F (> 0, a
 * multiple of 128) the product is gate/up (N = 2F, gate columns [0, F), up [F, 2F)), column tile c holds
 * gate columns 128 c .. and the up columns F + 128 c .. beside them, and the epilogue also writes the
 * SwiGLU act = silu(g) u (rows, F; row stride ld_act) through the map act, in boxes of 64 x 64. */
struct xw_fwd_params {
    CUtensorMap a, w, c, act;
    xw_rows r;
    __nv_bfloat16 *act_p;
    int64_t ld_act;
    int glu;
};
/* The backward's: the row product's A and C as the forward's, W (E, K, N) in panels of 64 x 64 x 1; for the
 * weight product G (E, M, N) f32, and per expert with rows (the j-th: expert ge[j], nk[j] K steps) its rows
 * of A (M columns) and of B (N columns) in panels of 64 x 64. ctr: the tile counter (2 ints, zero). About 9
 * KiB of kernel parameters: CUDA 12.1's large parameters (up to 32764 bytes). */
struct xw_bwd_params {
    CUtensorMap a, w, c, g; /* g: G as (N, M, E) f32 in boxes of 32 x 64 */
    CUtensorMap ga[XW_MAX_E], gb[XW_MAX_E];
    xw_rows r;
    int *ctr;
    int M, N, ge[XW_MAX_E], nk[XW_MAX_E];
    int tiles_g, tiles; /* weight tiles (first), all tiles */
    int g_store;        /* 1: G holds no values yet (M1C_TENSOR_UNSET): its tiles are stored, not added */
};
static_assert(sizeof(xw_bwd_params) <= 32764, "kernel parameters past CUDA's limit");

/* Row tile t's expert e, first row m0, the expert's end m_end and its column tile c (of nb); false past the
 * last. */
static __device__ inline bool xw_tile(const int32_t *off, int E, int nb, int t, int &e, int &m0, int &m_end, int &c) {
    int mt = t / nb;
    c = t - mt * nb;
    for (e = 0; e < E; e++) {
        const int r0 = off[e], r1 = off[e + 1], n = (r1 - r0 + WT_BM - 1) / WT_BM;
        if (mt < n) {
            m0 = r0 + mt * WT_BM, m_end = r1;
            return true;
        }
        mt -= n;
    }
    return false;
}
/* The backward's tile t (< tiles): weight tile (j, m0, n0) of the j-th expert with rows, or row tile as
 * xw_tile (j = -1); false where the device's offsets have no such row tile (they would disagree with the
 * host's that counted the tiles): the copier then stops there. */
struct xw_btile {
    int j, e, m0, m_end, c;
};
static __device__ inline bool xw_bwd_tile(const xw_bwd_params &P, int t, xw_btile &b) {
    b = xw_btile{-1, 0, 0, 0, 0};
    if (t < P.tiles_g) {
        const int nm = (P.M + WT_BM - 1) / WT_BM, nn = (P.N + WT_BN - 1) / WT_BN, per = nm * nn;
        b.j = t / per, t -= b.j * per;
        b.e = P.ge[b.j], b.m0 = t / nn * WT_BM, b.m_end = P.M, b.c = t % nn;
        return true;
    }
    return xw_tile(P.r.off, P.r.E, (P.r.N + WT_BN - 1) / WT_BN, t - P.tiles_g, b.e, b.m0, b.m_end, b.c);
}

/* A weight tile's epilogue for warpgroup w: G_e rows r0 .. r0 + 63, columns c 256 .. (those inside G) +=
 * the accumulators, by bulk reductions (f32 additions done at L2, one per element) from the staging, in
 * two halves of 128 columns: four panels of 64 rows x 32 floats in the 128-byte swizzle (16-byte chunk
 * (col % 32) / 4 of row r at chunk ^ r % 8). The warpgroup goes on while L2 adds. */
static __device__ inline void xw_add_tile(wt_smem &sm, const CUtensorMap *tg, const float (&d)[128], int e, int r0, int c,
                                          int N, int w, bool store) {
    const int lt = threadIdx.x % 128, q = lt % 4;
    const uint32_t st = mma_smem(sm.c[w]);
#pragma unroll
    for (int half = 0; half < 2; half++) {
        if (c * WT_BN + 128 * half >= N) break;
        if (lt == 0) tma_store_wait_read<0>();
        tma_bar_sync(1 + w, 128);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = 16 * (lt / 32) + lt % 32 / 4 + 8 * h;
#pragma unroll
            for (int t = 0; t < 16; t++) {
                const int lc = 8 * t + 2 * q, i = 4 * (16 * half + t) + 2 * h; /* column within the half */
                const uint32_t a = st + (lc / 32) * WT_PANEL + r * 128 + (((lc % 32) / 4) ^ (r % 8)) * 16 + (q % 2) * 8;
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(a), "f"(d[i]), "f"(d[i + 1]) : "memory");
            }
        }
        wg_fence_smem();
        tma_bar_sync(1 + w, 128);
        if (lt == 0) {
            for (int p = 0; p < 4 && c * WT_BN + 128 * half + 32 * p < N; p++)
                if (store)
                    tma_store_3d(tg, st + p * WT_PANEL, c * WT_BN + 128 * half + 32 * p, r0, e);
                else
                    tma_add_3d(tg, st + p * WT_PANEL, c * WT_BN + 128 * half + 32 * p, r0, e);
            tma_store_commit();
        }
    }
}

/* A row product's epilogue for warpgroup w (rows m0 + 64 w ..) of column tile c: bulk stores from the
 * staging where all 64 rows are the expert's, else from the registers. */
static __device__ inline void xw_store_rows(wt_smem &sm, const CUtensorMap *tc, const xw_rows &r, const float (&d)[128],
                                            int m0, int m_end, int c, int w) {
    const int r0 = m0 + 64 * w;
    if (r0 + 64 > m_end) {
        wt_pairs(d, r0, m_end, c * WT_BN, r.N, [&](int row, int col, float v0, float v1) {
            *(uint32_t *)(r.C + (int64_t)row * r.ldc + col) = wt_pack(v0, v1);
        });
        return;
    }
    wt_store_tile(sm, w, tc, d, c * WT_BN, r.N, r0);
}

/* The SwiGLU forward's epilogue for warpgroup w (rows m0 + 64 w ..) of column tile c: the gate and up
 * accumulators (column groups t < 16 and t + 16 of the layout of wgmma.cuh) are rounded to bf16 and stored
 * as GU's columns 128 c .. and F + 128 c ..; act = silu(g) u from those rounded values (MUFU's exp and
 * division: moe_swiglu_fwd_rows's IEEE ones cost the tensor cores more than its pass) goes in place of the
 * gate's accumulators, and from there to act.
 * The staging carries GU, then act once the bulk stores have read GU; a warpgroup whose rows cross the
 * expert's end stores both from its registers. */
static __device__ inline void xw_store_glu(wt_smem &sm, const xw_fwd_params &P, float (&d)[128], int m0, int m_end,
                                           int c, int w) {
    const int r0 = m0 + 64 * w, lt = threadIdx.x % 128, F = P.glu;
    const bool staged = r0 + 64 <= m_end;
    if (staged) {
        const uint32_t st = wt_stage_for_store(sm, w, d);
        if (lt == 0) { /* the gate's panels in a group of their own, read first: act goes there */
#pragma unroll
            for (int pn = 0; pn < 4; pn++) {
                tma_store_2d(&P.c, st + pn * WT_PANEL, (pn < 2 ? 0 : F) + 128 * c + 64 * (pn % 2), r0);
                if (pn == 1 || pn == 3) tma_store_commit();
            }
        }
    } else {
        wt_pairs(d, r0, m_end, 0, WT_BN, [&](int row, int col, float v0, float v1) {
            const int gc = (col < 128 ? 0 : F - 128) + 128 * c + col;
            *(uint32_t *)(P.r.C + (int64_t)row * P.r.ldc + gc) = wt_pack(v0, v1);
        });
    }
#pragma unroll
    for (int t = 0; t < 16; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float g = __bfloat162float(__float2bfloat16_rn(d[4 * t + e]));
            const float u = __bfloat162float(__float2bfloat16_rn(d[4 * (t + 16) + e]));
            d[4 * t + e] = __fdividef(g, 1.0f + __expf(-g)) * u; /* the approximate exp and division */
        }
    if (staged) {
        const uint32_t st = wt_stage_for_store<16, 1>(sm, w, d); /* once the gate's stores have read theirs */
        if (lt == 0) {
            tma_store_2d(&P.act, st, 128 * c, r0);
            tma_store_2d(&P.act, st + WT_PANEL, 128 * c + 64, r0);
            tma_store_commit();
        }
    } else {
        wt_pairs(d, r0, m_end, 0, 128, [&](int row, int col, float v0, float v1) {
            *(uint32_t *)(P.act_p + (int64_t)row * P.ld_act + 128 * c + col) = wt_pack(v0, v1);
        });
    }
}

/* The forward: see the header. */
__global__ static void __launch_bounds__(WT_THREADS, 1) xw_fwd_kernel(const __grid_constant__ xw_fwd_params P) {
#if WG_DEVICE
    extern __shared__ unsigned char wt_raw[];
    wt_smem &sm = wg_smem<wt_smem>(wt_raw);
    const int role = wt_start(sm), nb = P.glu ? P.glu / 128 : (P.r.N + WT_BN - 1) / WT_BN;
    if (role < 0) return;
    int e, m0, m_end, c;
    uint32_t it = 0;
    if (role == 0) { /* the copies */
        for (int t = blockIdx.x; xw_tile(P.r.off, P.r.E, nb, t, e, m0, m_end, c); t += gridDim.x)
            for (int kb = 0; kb < P.r.nk; kb++, it++) {
                const int s = (int)(it % WT_ST);
                const uint32_t full = mma_smem(&sm.full[s]), b = mma_smem(sm.b[s]);
                tma_wait(mma_smem(&sm.empty[s]), ((it / WT_ST) & 1) ^ 1);
                tma_expect(full, (WT_BM + WT_BN) * WT_BK * 2);
                tma_load_2d(mma_smem(sm.a[s]), &P.a, full, kb * WT_BK, m0);
                /* W_e's rows for the tile's columns: 256 c .. + 255, or gate 128 c .. and up F + 128 c .. */
                const int n0 = P.glu ? 128 * c : c * WT_BN, n1 = P.glu ? P.glu + 128 * c : c * WT_BN + WT_BN / 2;
                tma_load_3d(b, &P.w, full, kb * WT_BK, n0, e);
                tma_load_3d(b + 2 * WT_PANEL, &P.w, full, kb * WT_BK, n1, e);
            }
        return;
    }
    const int w = threadIdx.x / 128 - 1; /* rows 64 w .. 64 w + 63 of each tile */
    float d[128] = {}; /* (written by the first product of each tile; initialised for the compiler) */
    for (int t = blockIdx.x; xw_tile(P.r.off, P.r.E, nb, t, e, m0, m_end, c); t += gridDim.x) {
        wt_mainloop<0, 0>(sm, d, it, P.r.nk, w, false);
        if (P.glu)
            xw_store_glu(sm, P, d, m0, m_end, c, w);
        else
            xw_store_rows(sm, &P.c, P.r, d, m0, m_end, c, w);
    }
    if (threadIdx.x % 128 == 0) tma_store_drain(); /* the block's shared memory outlives its stores */
#endif
}

/* The backward: see the header. */
__global__ static void __launch_bounds__(WT_THREADS, 1) xw_bwd_kernel(const __grid_constant__ xw_bwd_params P) {
#if WG_DEVICE
    extern __shared__ unsigned char wt_raw[];
    wt_smem &sm = wg_smem<wt_smem>(wt_raw);
    const int role = wt_start(sm);
    if (role < 0) return;
    uint32_t it = 0;
    if (role == 0) { /* the copies, tile by tile from the counter */
        for (int seq = 0;; seq++) {
            int t = atomicAdd(P.ctr, 1);
            xw_btile b;
            if (t >= P.tiles || !xw_bwd_tile(P, t, b)) t = -1;
            const int nk = t < 0 ? 0 : b.j >= 0 ? P.nk[b.j] : P.r.nk;
            for (int kb = 0; kb == 0 || kb < nk; kb++, it += t >= 0) {
                const int s = (int)(it % WT_ST);
                const uint32_t full = mma_smem(&sm.full[s]), a = mma_smem(sm.a[s]), bs = mma_smem(sm.b[s]);
                tma_wait(mma_smem(&sm.empty[s]), ((it / WT_ST) & 1) ^ 1);
                if (kb == 0) sm.tile[seq % (WT_ST + 1)] = t; /* published by the arrival below */
                if (t < 0) {
                    tma_arrive(full); /* no copies: the computing warpgroups wake, read -1 and stop */
                    break;
                }
                tma_expect(full, (WT_BM + WT_BN) * WT_BK * 2);
                if (b.j >= 0) { /* A and B rows of expert e: panels of 64 columns */
#pragma unroll
                    for (int pn = 0; pn < 2; pn++)
                        tma_load_2d(a + pn * WT_PANEL, &P.ga[b.j], full, b.m0 + 64 * pn, kb * WT_BK);
#pragma unroll
                    for (int pn = 0; pn < 4; pn++)
                        tma_load_2d(bs + pn * WT_PANEL, &P.gb[b.j], full, b.c * WT_BN + 64 * pn, kb * WT_BK);
                } else {
                    tma_load_2d(a, &P.a, full, kb * WT_BK, b.m0);
#pragma unroll
                    for (int pn = 0; pn < 4; pn++)
                        tma_load_3d(bs + pn * WT_PANEL, &P.w, full, b.c * WT_BN + 64 * pn, kb * WT_BK, b.e);
                }
            }
            if (t < 0) break;
        }
        __threadfence(); /* this block's last take before its count below */
        if (atomicAdd(P.ctr + 1, 1) == (int)gridDim.x - 1) { /* the last block out: every take is done */
            atomicExch(P.ctr, 0);
            atomicExch(P.ctr + 1, 0);
        }
        return;
    }
    const int w = threadIdx.x / 128 - 1;
    float d[128] = {};
    for (int seq = 0;; seq++) {
        tma_wait(mma_smem(&sm.full[it % WT_ST]), (it / WT_ST) & 1);
        const int t = sm.tile[seq % (WT_ST + 1)];
        xw_btile b;
        if (t < 0 || !xw_bwd_tile(P, t, b)) break; /* (the copier decoded t too: it never hands out a bad one) */
        if (b.j >= 0) {
            wt_mainloop<1, 1>(sm, d, it, P.nk[b.j], w, true);
            xw_add_tile(sm, &P.g, d, b.e, b.m0 + 64 * w, b.c, P.N, w, P.g_store);
        } else {
            wt_mainloop<0, 1>(sm, d, it, P.r.nk, w, true);
            xw_store_rows(sm, &P.c, P.r, d, b.m0, b.m_end, b.c, w);
        }
    }
    if (threadIdx.x % 128 == 0) tma_store_drain();
#endif
}

/* ---- host ---- */

/* Once: the kernels' dynamic shared memory, and the persistent grid (one block per SM) into *grid. */
static inline cudaError_t xw_setup(int *grid) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(grid, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(xw_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<wt_smem>());
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(xw_bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<wt_smem>());
    return e;
}

/* Whether the kernels take a layer of hidden H and ffn width F (row strides multiples of 16 bytes) with
 * operands at these addresses (16-byte aligned, as cudaMalloc'd buffers are). */
static inline bool xw_fits(int H, int F, const void *const *ptrs, int n) {
    if (H % 8 != 0 || F % 8 != 0) return false;
    for (int i = 0; i < n; i++)
        if (!moe_al16(ptrs[i])) return false;
    return true;
}

/* The E experts' weights W (E, R, Cc) row-major as a 3-d map, in boxes of bc x br. */
static inline int xw_map3(tma_encode_fn enc, CUtensorMap *m, const void *W, int E, int64_t R, int64_t Cc, uint32_t br,
                          uint32_t bc) {
    const uint64_t dims[3] = {(uint64_t)Cc, (uint64_t)R, (uint64_t)E}, strides[2] = {(uint64_t)Cc * 2,
                                                                                       (uint64_t)(R * Cc) * 2};
    const uint32_t box[3] = {bc, br, 1};
    return tma_map_bf16(enc, m, W, 3, dims, strides, box);
}

/* The forward: C (Nk rows, ldc) = A (Nk rows of K, lda apart) W_e^T for W (E, N, K), rows by r.off
 * (device); `grid` blocks (xw_setup). With act (gate/up, N = 2F, F a multiple of 128) also act (Nk rows of
 * F, ld_act apart) = silu(gate) up, as xw_store_glu. 0, or -1 where a map cannot be made or N, K or ld_act
 * is not a multiple of 8 (of 256 for N with act). */
static inline int xw_forward(tma_encode_fn enc, int grid, cudaStream_t s, const xw_rows &r, const __nv_bfloat16 *A,
                             int64_t lda, int64_t Nk, const __nv_bfloat16 *W, int K, __nv_bfloat16 *act = NULL,
                             int64_t ld_act = 0) {
    if (r.N % 8 || K % 8) return -1;
    xw_fwd_params P;
    memset(&P, 0, sizeof P);
    if (wt_map2(enc, &P.a, A, Nk, K, lda, WT_BM, WT_BK) || xw_map3(enc, &P.w, W, r.E, r.N, K, WT_BN / 2, WT_BK) ||
        wt_map2(enc, &P.c, r.C, Nk, r.N, r.ldc, 64, 64))
        return -1;
    if (act) { /* the SwiGLU too (see xw_fwd_params) */
        P.glu = r.N / 2, P.act_p = act, P.ld_act = ld_act;
        if (r.N % 256 || ld_act % 8 || wt_map2(enc, &P.act, act, Nk, P.glu, ld_act, 64, 64)) return -1;
    }
    P.r = r;
    P.r.nk = (K + WT_BK - 1) / WT_BK;
    const int64_t tiles = (int64_t)((r.N + WT_BN - 1) / WT_BN) * ((Nk + WT_BM - 1) / WT_BM + r.E);
    const int g = (int)(tiles < grid ? tiles : grid);
    if (g > 0) xw_fwd_kernel<<<g, WT_THREADS, wg_smem_bytes<wt_smem>(), s>>>(P);
    return 0;
}

/* The backward's pair: the row product C = A W_e (W (E, K, N), r.N = N) and the weight product G_e (M x Ng,
 * f32) += Ag_e^T Bg_e over the rows of each expert (Ag: M columns, Bg: Ng), off the host's offsets h_off
 * (the same as r.off's); with g_unset, G_e = that product instead (every element written: the tiles
 * stored, an expert without rows zeroed). ctr: 2 ints of device memory, zero, left zero. 0, or -1 where a
 * map cannot be made, E > XW_MAX_E or a size is not a multiple of 8. */
static inline int xw_backward(tma_encode_fn enc, int grid, cudaStream_t s, int *ctr, const int32_t *h_off,
                              const xw_rows &r, const __nv_bfloat16 *A, int K, int64_t Nk, const __nv_bfloat16 *W,
                              float *G, const __nv_bfloat16 *Ag, int M, const __nv_bfloat16 *Bg, int Ng,
                              bool g_unset = false) {
    if (r.E > XW_MAX_E || r.N % 8 || K % 8 || M % 8 || Ng % 8) return -1;
    xw_bwd_params P;
    memset(&P, 0, sizeof P);
    const uint64_t gd[3] = {(uint64_t)Ng, (uint64_t)M, (uint64_t)r.E}, gs[2] = {(uint64_t)Ng * 4, (uint64_t)M * Ng * 4};
    const uint32_t gbox[3] = {32, 64, 1};
    if (wt_map2(enc, &P.a, A, Nk, K, K, WT_BM, WT_BK) || xw_map3(enc, &P.w, W, r.E, K, r.N, 64, 64) ||
        wt_map2(enc, &P.c, r.C, Nk, r.N, r.ldc, 64, 64) ||
        tma_map(enc, &P.g, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, G, 3, gd, gs, gbox))
        return -1;
    int ng = 0, row_tiles = 0;
    for (int e = 0; e < r.E; e++) {
        const int n = h_off[e + 1] - h_off[e];
        if (n <= 0 && g_unset && cudaMemsetAsync(G + (int64_t)e * M * Ng, 0, (size_t)M * Ng * sizeof(float), s))
            return -1;
        if (n <= 0) continue;
        row_tiles += (n + WT_BM - 1) / WT_BM;
        if (wt_map2(enc, &P.ga[ng], Ag + (int64_t)h_off[e] * M, n, M, M, 64, 64) ||
            wt_map2(enc, &P.gb[ng], Bg + (int64_t)h_off[e] * Ng, n, Ng, Ng, 64, 64))
            return -1;
        P.ge[ng] = e, P.nk[ng] = (n + WT_BK - 1) / WT_BK, ng++;
    }
    P.r = r;
    P.r.nk = (K + WT_BK - 1) / WT_BK;
    P.ctr = ctr, P.M = M, P.N = Ng, P.g_store = g_unset;
    P.tiles_g = ng * ((M + WT_BM - 1) / WT_BM) * ((Ng + WT_BN - 1) / WT_BN);
    P.tiles = P.tiles_g + row_tiles * ((r.N + WT_BN - 1) / WT_BN);
    const int g = P.tiles < grid ? P.tiles : grid;
    if (g > 0) xw_bwd_kernel<<<g, WT_THREADS, wg_smem_bytes<wt_smem>(), s>>>(P);
    return 0;
}
