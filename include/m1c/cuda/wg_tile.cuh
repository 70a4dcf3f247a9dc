/* Persistent GEMM tiles on Hopper (sm_90a) for the core's and the plugins' kernels: the shared-memory ring
 * that the tensor memory accelerator fills (tma.cuh) and two warpgroups multiply from (wgmma.cuh), and the
 * epilogue pieces around it. Used by the core's LM head (core/cuda/head_wg.cuh) and topk's expert products
 * (plugins/moe/topk/expert_wg.cuh); installed with the other headers of m1c/cuda for plugins built out of
 * tree.
 *
 * Geometry. An output tile is WT_BM x WT_BN = 128 x 256; its K steps of 64 pass through a ring of WT_ST
 * stages, each 16 KiB of A and 32 KiB of B in the 128-byte swizzle that wgmma reads: K-major boxes (rows
 * of 64 K) or MN-major panels of 64 columns. A block is three warpgroups (WT_THREADS): the first issues the
 * copies (one thread; wt_start sends its other threads away), the other two each multiply 64 of the tile's
 * rows by all 256 columns (m64n256k16, 128 f32 accumulators a thread) and write them. A kernel supplies
 * the schedule (which tiles, which boxes) and the epilogue; wt_stage and a bulk tensor store per 64 x 64
 * panel write bf16 rows while the warpgroup goes on with its next tile. */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "tma.cuh"

enum { WT_BM = 128, WT_BN = 256, WT_BK = 64, WT_ST = 3, WT_THREADS = 384 };
/* A 64 x 64 bf16 panel (8 KiB): the box of the MN-major copies and of the bulk stores. */
enum { WT_PANEL = 64 * 64 * 2 };

/* Dynamic shared memory (1024-byte aligned: the swizzle's period); 208 KiB. */
struct wt_smem {
    unsigned char a[WT_ST][2 * WT_PANEL]; /* 16 KiB a stage */
    unsigned char b[WT_ST][4 * WT_PANEL]; /* 32 KiB a stage */
    unsigned char c[2][4 * WT_PANEL];     /* each computing warpgroup's staging: 64 rows x 256 columns */
    uint64_t full[WT_ST];                 /* the stage's copies have landed */
    uint64_t empty[WT_ST];                /* both computing warpgroups are done with the stage */
    int tile[WT_ST + 1];                  /* dynamic schedules: the tiles the copier took, in order (-1: end) */
};

static __device__ inline uint32_t wt_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* One computing warpgroup (w) over nk K steps of a tile from the ring (step `it` on): the products into d,
 * each stage given back once read. TA / TB: A / B K-major (0) or MN-major panels (1). `waited`: the first
 * step's stage is already known full. */
template <int TA, int TB>
static __device__ inline void wt_mainloop(wt_smem &sm, float (&d)[128], uint32_t &it, int nk, int w, bool waited) {
    const bool lead = threadIdx.x % 128 == 0;
    for (int kb = 0; kb < nk; kb++, it++) {
        const int s = (int)(it % WT_ST);
        if (kb > 0 || !waited) tma_wait(mma_smem(&sm.full[s]), (it / WT_ST) & 1);
        /* this warpgroup's 64 rows of A: rows 64 w on (K-major) or panel w (MN-major), 8 KiB on either way */
        const uint32_t a = mma_smem(sm.a[s]) + w * WT_PANEL, b = mma_smem(sm.b[s]);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < WT_BK / 16; kk++) {
            const uint64_t da = TA ? wg_desc(a + kk * 16 * 128, WT_PANEL, 1024) : wg_kdesc(a + kk * 32);
            const uint64_t db = TB ? wg_desc(b + kk * 16 * 128, WT_PANEL, 1024) : wg_kdesc(b + kk * 32);
            wg_64x256_ss<TA, TB>(d, da, db, kb > 0 || kk > 0);
        }
        wg_commit();
        wg_wait<1>(); /* the step before is done: its stage goes back to the copier */
        if (kb > 0 && lead) tma_arrive(mma_smem(&sm.empty[(it - 1) % WT_ST]));
    }
    wg_wait<0>();
    if (lead) tma_arrive(mma_smem(&sm.empty[(it - 1) % WT_ST]));
    wg_hold(d);
}

/* The accumulators' rows r0 + i (i < 64, those below m_end) and columns c0 + j (below N), in the layout of
 * wgmma.cuh (d[4 t + e]: row 16 warp + lane / 4 + 8 (e / 2), column 8 t + 2 (lane % 4) + e % 2), to f(row,
 * col, v0, v1) pair by pair. */
template <typename F>
static __device__ inline void wt_pairs(const float (&d)[128], int r0, int m_end, int c0, int N, F f) {
    const int lt = threadIdx.x % 128, q = lt % 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = r0 + 16 * (lt / 32) + lt % 32 / 4 + 8 * h;
        if (row >= m_end) continue;
#pragma unroll
        for (int t = 0; t < 32; t++) {
            const int col = c0 + 8 * t + 2 * q;
            if (col < N) f(row, col, d[4 * t + 2 * h], d[4 * t + 2 * h + 1]);
        }
    }
}

/* The warpgroup's 64 x 256 accumulators (or their first NT column groups of 8), rounded, into its staging
 * panels (64 rows x 64 columns each, the 128-byte swizzle): stmatrix x4 writes column groups t and t + 1
 * of a warp's 16 rows, lanes 8 j .. 8 j + 7 addressing the rows of its matrix j (rows 0-7 / 8-15 of group
 * t, then of group t + 1). */
template <int NT = 32> static __device__ inline void wt_stage(uint32_t st, const float (&d)[128]) {
    const int lt = threadIdx.x % 128, lane = lt % 32, j = lane / 8;
    const int r = 16 * (lt / 32) + (j % 2) * 8 + lane % 8;
#pragma unroll
    for (int t = 0; t < NT; t += 2) {
        const int col = 8 * t + 8 * (j / 2);
        wg_stsm4(st + (col / 64) * WT_PANEL + r * 128 + (((col % 64) / 8) ^ (r % 8)) * 16,
                 wt_pack(d[4 * t], d[4 * t + 1]), wt_pack(d[4 * t + 2], d[4 * t + 3]),
                 wt_pack(d[4 * t + 4], d[4 * t + 5]), wt_pack(d[4 * t + 6], d[4 * t + 7]));
    }
}

/* Computing warpgroup w's staging (sm.c[w]) for bulk stores: once its bulk stores but the last KEEP
 * groups have read the panels, the accumulators' first NT column groups rounded into them and ordered
 * before the stores that one thread issues next (wg_fence_smem, then the warpgroup's named barrier 1 + w).
 * Returns the staging's shared address. */
template <int NT = 32, int KEEP = 0>
static __device__ inline uint32_t wt_stage_for_store(wt_smem &sm, int w, const float (&d)[128]) {
    const uint32_t st = mma_smem(sm.c[w]);
    if (threadIdx.x % 128 == 0) tma_store_wait_read<KEEP>();
    tma_bar_sync(1 + w, 128);
    wt_stage<NT>(st, d);
    wg_fence_smem();
    tma_bar_sync(1 + w, 128);
    return st;
}

/* Warpgroup w's 64 x 256 accumulators, rounded, to rows r0 .. r0 + 63 and columns c0 .. of the 2-d bf16
 * tensor map `map` (64 x 64 boxes) by bulk stores: the panels whose columns start below N (the map drops
 * whatever lies outside the tensor); one group, committed. The warpgroup goes on while they write. */
static __device__ inline void wt_store_tile(wt_smem &sm, int w, const CUtensorMap *map, const float (&d)[128], int c0,
                                            int N, int r0) {
    const uint32_t st = wt_stage_for_store(sm, w, d);
    if (threadIdx.x % 128 == 0) {
        for (int pn = 0; pn < 4 && c0 + 64 * pn < N; pn++) tma_store_2d(map, st + pn * WT_PANEL, c0 + 64 * pn, r0);
        tma_store_commit();
    }
}

/* Barriers, then the roles: returns 0 in the copying warpgroup's thread 0, 1 in the computing ones; the
 * copying warpgroup's other threads leave. */
static __device__ inline int wt_start(wt_smem &sm) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < WT_ST; s++) tma_bar_init(mma_smem(&sm.full[s]), 1), tma_bar_init(mma_smem(&sm.empty[s]), 2);
        tma_bar_init_fence();
    }
    __syncthreads();
    return threadIdx.x >= 128 ? 1 : threadIdx.x == 0 ? 0 : -1;
}

/* A map of a row-major bf16 matrix (rows x cols, ld elements apart) in boxes of box_c x box_r. */
static inline int wt_map2(tma_encode_fn enc, CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int64_t ld,
                          uint32_t box_r, uint32_t box_c) {
    const uint64_t dims[2] = {(uint64_t)cols, (uint64_t)rows}, strides[1] = {(uint64_t)ld * 2};
    const uint32_t box[2] = {box_c, box_r};
    return tma_map_bf16(enc, m, base, 2, dims, strides, box);
}
