/* topk's forward expert products on Hopper (sm_90a): one persistent kernel per product for all experts,
 * fed by the tensor memory accelerator and run on warpgroup MMA. Included by topk.cu (and
 * bench/bench_experts.cu).
 *
 * The product (row-major; rows r of expert e are [off[e], off[e+1]), read on the device, so nothing waits
 * for the host; W_e is expert e's weight, N x K):
 *   C[r, n] = sum_k A[r, k] W_e[n, k]    x Wgu^T (gate/up: N = 2F, K = H), act Wd^T (down: N = H, K = F)
 * with f32 accumulation, C rounded to bf16 once: what cuBLAS's GemmEx computes per expert, up to the order
 * of the f32 sums.
 *
 * Geometry. An output tile is 128 rows x 256 columns; its K steps of 64 pass through a ring of XW_ST
 * stages in shared memory, each an A box (128 x 64) and two W boxes (128 x 64), in the 128-byte swizzle
 * that wgmma reads (../../common/wgmma.cuh). The block is three warpgroups: the first issues the copies
 * (one thread), the other two each multiply 64 of the tile's rows by all 256 columns (m64n256k16, 128 f32
 * accumulators a thread) and write their rows. Blocks are persistent, one per SM, taking tiles
 * blockIdx.x, + gridDim.x, ...; tile t is row tile t / nb (row tiles numbered expert after expert) and
 * column tile t % nb, so blocks running together share their A rows (and the weights, 3-13 MB, stay in
 * L2). Rows past an expert's end are read (the next expert's rows, or zeros past the buffer) and never
 * written: a product row depends on its A row alone.
 *
 * Epilogue. A warpgroup whose 64 rows all belong to the tile's expert rounds them into its staging panels
 * in shared memory (stmatrix, the 128-byte swizzle) and one of its threads hands them to bulk tensor
 * stores, which write them to global memory while the warpgroup goes on with its next tile: the tensor
 * cores idle only while the panels are written. (Stored from the registers instead, 4-byte pieces of 8
 * rows a warp instruction, the products ran at 460 TFLOP/s against 690-720 without any stores: the
 * stores took a third of the time, docs/perf.md.) A warpgroup whose rows cross the expert's end stores
 * from its registers, row by row. */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "../../common/tma.cuh"
#include "../moe_cuda.cuh"

enum { XW_BM = 128, XW_BN = 256, XW_BK = 64, XW_ST = 3, XW_THREADS = 384 };
/* A staging panel: 64 rows x 64 bf16 columns (8 KiB), the box of the bulk stores. */
enum { XW_PANEL = 64 * 64 * 2 };

/* Dynamic shared memory (1024-byte aligned: the swizzle's period); 208 KiB. */
struct xw_smem {
    unsigned char a[XW_ST][XW_BM * XW_BK * 2]; /* 16 KiB a stage */
    unsigned char b[XW_ST][XW_BN * XW_BK * 2]; /* 32 KiB a stage */
    unsigned char c[2][4 * XW_PANEL];          /* each computing warpgroup's staging: 64 rows x 256 columns */
    uint64_t full[XW_ST];                      /* the stage's copies have landed */
    uint64_t empty[XW_ST];                     /* both computing warpgroups are done with the stage */
};

/* The kernel's arguments besides the tensor maps. */
typedef struct xw_args {
    __nv_bfloat16 *C;   /* (rows, N), row stride ldc */
    const int32_t *off; /* (E + 1) expert row offsets, on the device */
    int64_t ldc;
    int E, N, nk; /* experts, columns, K steps */
} xw_args;

/* Tile t's expert e, first row m0, the expert's end m_end and its column tile c (of nb); false past the
 * last. */
static __device__ inline bool xw_tile(const int32_t *off, int E, int nb, int t, int &e, int &m0, int &m_end, int &c) {
    int mt = t / nb;
    c = t - mt * nb;
    for (e = 0; e < E; e++) {
        const int r0 = off[e], r1 = off[e + 1], n = (r1 - r0 + XW_BM - 1) / XW_BM;
        if (mt < n) {
            m0 = r0 + mt * XW_BM, m_end = r1;
            return true;
        }
        mt -= n;
    }
    return false;
}

static __device__ inline uint32_t xw_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* The epilogue from the registers, for rows that cross the expert's end: one computing warpgroup's 64
 * rows from r0 (those below m_end), in the accumulator layout of wgmma.cuh (d[4 t + e]: row 16 warp +
 * lane / 4 + 8 (e / 2), column 8 t + 2 (lane % 4) + e % 2). */
static __device__ inline void xw_store_rows(const xw_args &p, const float (&d)[128], int r0, int m_end, int c) {
    const int lt = threadIdx.x % 128, q = lt % 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = r0 + 16 * (lt / 32) + lt % 32 / 4 + 8 * h;
        if (row >= m_end) continue;
        __nv_bfloat16 *out = p.C + (int64_t)row * p.ldc;
#pragma unroll
        for (int t = 0; t < 32; t++) {
            const int col = c * XW_BN + 8 * t + 2 * q;
            if (col < p.N) *(uint32_t *)(out + col) = xw_pack(d[4 * t + 2 * h], d[4 * t + 2 * h + 1]);
        }
    }
}

/* The warpgroup's 64 x 256 accumulators, rounded, into its four staging panels (64 rows x 64 columns
 * each, the 128-byte swizzle): stmatrix x4 writes column groups t and t + 1 of a warp's 16 rows, lanes
 * 8 j .. 8 j + 7 addressing the rows of its matrix j (rows 0-7 / 8-15 of group t, then of group t + 1). */
static __device__ inline void xw_stage(uint32_t st, const float (&d)[128]) {
    const int lt = threadIdx.x % 128, lane = lt % 32, j = lane / 8;
    const int r = 16 * (lt / 32) + (j % 2) * 8 + lane % 8;
#pragma unroll
    for (int t = 0; t < 32; t += 2) {
        const int col = 8 * t + 8 * (j / 2);
        wg_stsm4(st + (col / 64) * XW_PANEL + r * 128 + (((col % 64) / 8) ^ (r % 8)) * 16,
                 xw_pack(d[4 * t], d[4 * t + 1]), xw_pack(d[4 * t + 2], d[4 * t + 3]),
                 xw_pack(d[4 * t + 4], d[4 * t + 5]), xw_pack(d[4 * t + 6], d[4 * t + 7]));
    }
}

/* The kernel: see the header. tA: A (rows, K) in boxes of 64 x 128; tW: W as (K, N, E) in boxes of 64 x
 * 128; tC: C (rows, N) in boxes of 64 x 64. */
__global__ void __launch_bounds__(XW_THREADS, 1)
    xw_kernel(const __grid_constant__ CUtensorMap tA, const __grid_constant__ CUtensorMap tW,
              const __grid_constant__ CUtensorMap tC, const xw_args p) {
#if WG_DEVICE
    extern __shared__ unsigned char xw_raw[];
    xw_smem &sm = wg_smem<xw_smem>(xw_raw);
    const int wg = threadIdx.x / 128, nb = (p.N + XW_BN - 1) / XW_BN;
    if (threadIdx.x == 0) {
        for (int s = 0; s < XW_ST; s++) tma_bar_init(mma_smem(&sm.full[s]), 1), tma_bar_init(mma_smem(&sm.empty[s]), 2);
        tma_bar_init_fence();
    }
    __syncthreads();

    int e, m0, m_end, c;
    if (wg == 0) { /* the copies, from one thread */
        wg_regs_release<40>();
        if (threadIdx.x != 0) return;
        uint32_t it = 0;
        for (int t = blockIdx.x; xw_tile(p.off, p.E, nb, t, e, m0, m_end, c); t += gridDim.x)
            for (int kb = 0; kb < p.nk; kb++, it++) {
                const int s = (int)(it % XW_ST);
                const uint32_t full = mma_smem(&sm.full[s]), b = mma_smem(sm.b[s]);
                tma_wait(mma_smem(&sm.empty[s]), ((it / XW_ST) & 1) ^ 1);
                tma_expect(full, (XW_BM + XW_BN) * XW_BK * 2);
                tma_load_2d(mma_smem(sm.a[s]), &tA, full, kb * XW_BK, m0);
                tma_load_3d(b, &tW, full, kb * XW_BK, c * XW_BN, e);
                tma_load_3d(b + XW_BN / 2 * XW_BK * 2, &tW, full, kb * XW_BK, c * XW_BN + XW_BN / 2, e);
            }
        return;
    }

    wg_regs_claim<232>();
    const int w = wg - 1, lt = threadIdx.x % 128; /* rows 64 w .. 64 w + 63 of each tile */
    const uint32_t st = mma_smem(sm.c[w]);
    uint32_t it = 0;
    float d[128] = {}; /* (written by the first product of each tile; initialised for the compiler) */
    for (int t = blockIdx.x; xw_tile(p.off, p.E, nb, t, e, m0, m_end, c); t += gridDim.x) {
        for (int kb = 0; kb < p.nk; kb++, it++) {
            const int s = (int)(it % XW_ST);
            tma_wait(mma_smem(&sm.full[s]), (it / XW_ST) & 1);
            const uint32_t a = mma_smem(sm.a[s]) + w * 64 * 128, b = mma_smem(sm.b[s]);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < XW_BK / 16; kk++)
                wg_64x256_ss<0>(d, wg_kdesc(a + kk * 32), wg_kdesc(b + kk * 32), kb > 0 || kk > 0);
            wg_commit();
            wg_wait<1>(); /* the step before is done: its stage goes back to the copier */
            if (kb > 0 && lt == 0) tma_arrive(mma_smem(&sm.empty[(it - 1) % XW_ST]));
        }
        wg_wait<0>();
        if (lt == 0) tma_arrive(mma_smem(&sm.empty[(it - 1) % XW_ST]));
        wg_hold(d);
        const int r0 = m0 + 64 * w;
        if (r0 + 64 > m_end) {
            xw_store_rows(p, d, r0, m_end, c);
            continue;
        }
        if (lt == 0) tma_store_wait_read<0>(); /* the staging is free once the last stores have read it */
        tma_bar_sync(1 + w, 128);
        xw_stage(st, d);
        wg_fence_smem(); /* the panels, to the bulk stores (one thread issues them) */
        tma_bar_sync(1 + w, 128);
        if (lt == 0) {
            for (int pn = 0; pn < 4 && c * XW_BN + 64 * pn < p.N; pn++)
                tma_store_2d(&tC, st + pn * XW_PANEL, c * XW_BN + 64 * pn, r0);
            tma_store_commit();
        }
    }
    if (lt == 0) tma_store_drain(); /* the block's shared memory outlives its stores */
#endif
}

/* ---- host ---- */

/* Once: the kernel's dynamic shared memory, and the persistent grid (one block per SM) into *grid. */
static inline cudaError_t xw_setup(int *grid) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(grid, cudaDevAttrMultiProcessorCount, dev);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(xw_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<xw_smem>());
    return e;
}

/* Whether the kernel takes a layer of hidden H and ffn width F (row strides multiples of 16 bytes) with
 * operands at these addresses (16-byte aligned, as cudaMalloc'd buffers are). */
static inline bool xw_fits(int H, int F, const void *const *ptrs, int n) {
    if (H % 8 != 0 || F % 8 != 0) return false;
    for (int i = 0; i < n; i++)
        if (!moe_al16(ptrs[i])) return false;
    return true;
}

/* A map of a row-major bf16 matrix (rows x cols, ld elements apart) in boxes of box_c x box_r. */
static inline int xw_map2(tma_encode_fn enc, CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int64_t ld,
                          uint32_t box_r, uint32_t box_c) {
    const uint64_t dims[2] = {(uint64_t)cols, (uint64_t)rows}, strides[1] = {(uint64_t)ld * 2};
    const uint32_t box[2] = {box_c, box_r};
    return tma_map_bf16(enc, m, base, 2, dims, strides, box);
}

/* C = A W_e^T over Nk rows of A (lda elements apart; K columns) and the E experts' W (N rows of ldw
 * elements, experts sw apart), into p.C; `grid` blocks (xw_setup). 0, or -1 where a map cannot be made. */
static inline int xw_gemm(tma_encode_fn enc, int grid, cudaStream_t s, const xw_args &p, const __nv_bfloat16 *A,
                          int64_t lda, int64_t Nk, const __nv_bfloat16 *W, int64_t ldw, int64_t sw, int K) {
    CUtensorMap ta, tw, tc;
    const uint64_t dw[3] = {(uint64_t)K, (uint64_t)p.N, (uint64_t)p.E}, sws[2] = {(uint64_t)ldw * 2, (uint64_t)sw * 2};
    const uint32_t bw[3] = {XW_BK, XW_BN / 2, 1};
    if (xw_map2(enc, &ta, A, Nk, K, lda, XW_BM, XW_BK) || tma_map_bf16(enc, &tw, W, 3, dw, sws, bw) ||
        xw_map2(enc, &tc, p.C, Nk, p.N, p.ldc, 64, 64))
        return -1;
    xw_args q = p;
    q.nk = (K + XW_BK - 1) / XW_BK;
    const int64_t tiles = (int64_t)((p.N + XW_BN - 1) / XW_BN) * ((Nk + XW_BM - 1) / XW_BM + p.E);
    const int g = (int)(tiles < grid ? tiles : grid);
    if (g > 0) xw_kernel<<<g, XW_THREADS, wg_smem_bytes<xw_smem>(), s>>>(ta, tw, tc, q);
    return 0;
}
