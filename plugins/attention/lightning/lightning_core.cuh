/* The fused lightning-attention core on tensor cores (mma.sync, sm_80 and later; on sm_90 the output pass
 * on warpgroup MMA where the build targets sm_90a), shared by the plugin (lightning.cu), the stand-alone
 * benchmark (bench/bench_lightning.cu) and the kernel test (tests/lightning_core_glue.cu).
 *
 * One operation gives the forward and all three backward products. For sequences x, y, z of T rows of
 * HD bf16 values (one (batch, head) each) and the head's decay slope s:
 *
 *   out_i = sum_{j <= i} exp(-s (i - j)) (x_i . y_j) z_j           (time order)
 *   out_i = sum_{j >= i} exp(-s (j - i)) (x_i . y_j) z_j           (reversed)
 *
 *   forward   O  = core(Q, K, V)
 *   backward  dQ = core(dO, V, K),  dK = core_rev(V, dO, Q),  dV = core_rev(K, Q, dO)
 *
 * (the last two are the forward's sums read with time running backwards). Rows are taken in blocks of
 * LC_C = 64: within a block the masked product x y^T, scaled by the decay, multiplies z on tensor cores;
 * across blocks the state M = sum_j exp(-s (end - j)) y_j z_j^T (HD x NS, f32 in registers) carries the
 * past, and x M, scaled by exp(-s (i + 1)), adds it. The internal block size does not change the result
 * beyond rounding (the chunked form is exact), so it need not match the layer's configured block size.
 *
 * Parallelism: one CTA per (sequence, NS = 64 columns of z, segment of the sequence). Short sequences
 * need one segment; long ones (few sequences) are cut into segments whose starting states come from a
 * state-only pass (each segment's own contribution) and a scan over segments, so a 1M-token sequence
 * spreads over the whole GPU. bf16 operands, f32 accumulation and state; the masked scores, the decayed
 * y and the state are rounded to bf16 as operands of the second products. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <m1c/cuda/mma.cuh>
#include <m1c/cuda/wgmma.cuh>

enum { LC_C = 64, LC_NS = 64, LC_THREADS = 128, LC_PAD = 8 };

typedef struct lc_problem {
    const __nv_bfloat16 *x, *y, *z; /* [BH][T][HD] row-major; sequence bh starts at bh * sbh */
    void *out;                      /* same layout, f32 (out_f32) or bf16 */
    int out_f32;
    int64_t sbh;                    /* elements from one sequence to the next (T * HD, or more if padded) */
    int BH, nh, T, hd;              /* sequences (batch x heads), heads (for the slope), rows, head size */
    const float *slope;             /* device [nh]: decay per row of head bh % nh */
    int reverse;                    /* sums over j >= i */
    const float *init;              /* device [BH][hd][hd] f32 state carried in, or NULL (time order only) */
    float *final_state;             /* device [BH][hd][hd] f32 state after the last row, or NULL */
    float *ws;                      /* device workspace of lc_workspace_floats() floats (NULL if that is 0) */
    int64_t ws_floats;              /* its size, checked */
    int slots;                      /* output-pass CTAs resident on the whole device (lc_slots(hd), once) */
    int kernel;                     /* output pass: LC_AUTO (0, asks the device each call), LC_MMA, or LC_WGMMA
                                     * (only where wg_available: the caller checks, once) */
    int seg_blocks;                 /* shortest output segment in 64-row blocks (0: LC_SEG_BLOCKS; see lc_plan_for) */
} lc_problem;

/* The output pass's kernels: mma.sync (sm_80 and later) or wgmma (sm_90a builds on sm_90 devices);
 * LC_AUTO takes wgmma where it can. */
enum { LC_AUTO = 0, LC_MMA = 1, LC_WGMMA = 2 };

/* ---- the kernel ------------------------------------------------------------------------------------- */

/* Shared memory of one CTA: double-buffered row blocks of x, y (all HD columns) and z (this CTA's NS),
 * the bf16 state operand, and the decay powers exp(-s k), k = 0..C. Rows padded by LC_PAD elements so
 * ldmatrix's eight row addresses fall in distinct banks. */
/* Mode: LC_OUT computes out over the CTA's rows (its segment's starting state read from m0 when not
 * NULL); LC_STATE only sums its segment's own state into its slot of mout (no x, no out). */
enum { LC_OUT = 0, LC_STATE = 1 };

template <int HD, int MODE> struct lc_smem_layout {
    __nv_bfloat16 x[2][MODE == LC_OUT ? LC_C : 1][HD + LC_PAD], y[2][LC_C][HD + LC_PAD], z[2][LC_C][(MODE == LC_OUT ? LC_NS : HD) + LC_PAD];
    __nv_bfloat16 m[MODE == LC_OUT ? HD : 1][(MODE == LC_OUT ? LC_NS : HD) + LC_PAD];
    float pw[LC_C + 1];
};

/* Where a pass reads its starting states and writes its own: m0 (LC_OUT; NULL: zero) holds m0_n states
 * per sequence, [BH][m0_n][HD][HD], segment k starting from state k * m0_k (m0_n == 0: one carried state
 * per sequence, [BH][HD][HD]); mout (LC_STATE) holds mout_n per sequence. Segments are seg_rows long. */
struct lc_pass {
    const float *m0;
    int m0_n, m0_k;
    float *mout;
    int mout_n, seg_rows;
    int nseg; /* segments per sequence in the grid */
};

/* One CTA per (column slice, segment, sequence), slices fastest (the two slices of a segment read the same
 * x and y rows, close together in time: from L2 for the second); the segment of a CTA covers rows
 * [seg * seg_rows, ...) in the order of the sums (reversed rows when reverse). */
template <int HD, int MODE>
__global__ void __launch_bounds__(LC_THREADS) lc_kernel(lc_problem p, lc_pass ps) {
    extern __shared__ __align__(16) unsigned char lc_raw[];
    lc_smem_layout<HD, MODE> &sm = *reinterpret_cast<lc_smem_layout<HD, MODE> *>(lc_raw);
    const int seg_rows = ps.seg_rows;
    constexpr int NS = MODE == LC_OUT ? LC_NS : HD; /* columns of z per CTA (all for the state pass) */
    constexpr int NSL = HD / NS; /* column slices of z */
    constexpr int MT = HD / 64;     /* 16-row tiles of the state per warp */
    constexpr int XR = (HD + LC_PAD) * 2, ZR = (NS + LC_PAD) * 2; /* row strides in bytes: x, y; z, state */
    const int slice = (int)(blockIdx.x % NSL), seg = (int)(blockIdx.x / NSL % ps.nseg), bh = (int)(blockIdx.x / NSL / ps.nseg);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int T = p.T;
    const int r_begin = seg * seg_rows;
    if (r_begin >= T) return;
    const int r_end = min(T, r_begin + seg_rows);
    const int nblk = (r_end - r_begin + LC_C - 1) / LC_C;
    const float s = p.slope[bh % p.nh];
    for (int k = threadIdx.x; k <= LC_C; k += LC_THREADS) sm.pw[k] = expf(-s * (float)k);

    const __nv_bfloat16 *X = p.x + (int64_t)bh * p.sbh, *Y = p.y + (int64_t)bh * p.sbh, *Z = p.z + (int64_t)bh * p.sbh;
    const int zc = slice * NS;
    /* rows in sum order r -> stored row */
    auto row_of = [&](int r) { return p.reverse ? T - 1 - r : r; };

    auto load = [&](int blk, int buf) {
        const int r0 = r_begin + blk * LC_C;
        constexpr int XC = HD / 8; /* 16-byte chunks per row */
        for (int i = threadIdx.x; i < LC_C * XC; i += LC_THREADS) {
            const int r = i / XC, c = (i % XC) * 8;
            const bool ok = r0 + r < r_end;
            const int64_t at = (int64_t)row_of(ok ? r0 + r : r_begin) * HD + c;
            if (MODE == LC_OUT) mma_cp16(&sm.x[buf][r][c], X + at, ok);
            mma_cp16(&sm.y[buf][r][c], Y + at, ok);
        }
        constexpr int ZC = NS / 8;
        for (int i = threadIdx.x; i < LC_C * ZC; i += LC_THREADS) {
            const int r = i / ZC, c = (i % ZC) * 8;
            const bool ok = r0 + r < r_end;
            mma_cp16(&sm.z[buf][r][c], Z + (int64_t)row_of(ok ? r0 + r : r_begin) * HD + zc + c, ok);
        }
        mma_commit();
    };

    /* The state: warp w holds rows [w HD/4, (w+1) HD/4) as MT 16-row tiles x 8 column tiles of 8. */
    float st[MT][NS / 8][4];
    const int nseg = (T + seg_rows - 1) / seg_rows;
    const bool have_m0 = MODE == LC_OUT && ps.m0 != nullptr;
    const int64_t hd2 = (int64_t)HD * HD;
    const float *m0p = have_m0 ? ps.m0 + (ps.m0_n ? ((int64_t)bh * ps.m0_n + (int64_t)seg * ps.m0_k) * hd2 : bh * hd2)
                               : nullptr;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = warp * (HD / 4) + mt * 16 + g + (e >= 2 ? 8 : 0), col = zc + nt * 8 + 2 * t4 + (e & 1);
                st[mt][nt][e] = have_m0 ? m0p[(int64_t)row * HD + col] : 0.0f;
            }
    bool have_state = have_m0;
    if (have_state) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NS / 8; nt++) {
                const int row = warp * (HD / 4) + mt * 16 + g, col = nt * 8 + 2 * t4;
                *reinterpret_cast<uint32_t *>(&sm.m[row][col]) = mma_pack(st[mt][nt][0], st[mt][nt][1]);
                *reinterpret_cast<uint32_t *>(&sm.m[row + 8][col]) = mma_pack(st[mt][nt][2], st[mt][nt][3]);
            }
    }

    load(0, 0);
    for (int blk = 0; blk < nblk; blk++) {
        const int buf = blk & 1;
        const int r0 = r_begin + blk * LC_C, m = min(LC_C, r_end - r0);
        mma_wait<0>();
        __syncthreads(); /* block blk landed for all; the previous block's state operand is written and
                            every read of the other buffer is done */
        if (blk + 1 < nblk) load(blk + 1, buf ^ 1);
        /* this lane's ldmatrix addresses (m1c/cuda/mma.cuh): x as A rows, y as B rows or (transposed)
         * as A, z and the state as B with the transposing load */
        const uint32_t ys_cr = mma_smem(&sm.y[buf][0][0]) + mma_lane_cr(lane, XR);
        const uint32_t zs = mma_smem(&sm.z[buf][0][0]) + mma_lane_rc(lane, ZR);

        if (MODE == LC_OUT) {
            /* scores: warp w's 16 rows against the block's rows 0..16w+15 (causal in sum order) */
            const int i0 = warp * 16;
            const uint32_t xs = mma_smem(&sm.x[buf][i0][0]) + mma_lane_rc(lane, XR);
            const uint32_t ms = mma_smem(&sm.m[0][0]) + mma_lane_rc(lane, ZR);
            float sc[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) {
                uint32_t a[4];
                mma_ldsm4(a, xs + ks * 32);
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    if (np > warp) break;
                    uint32_t b[4];
                    mma_ldsm4(b, ys_cr + np * 16 * XR + ks * 32);
                    mma_16816(sc[2 * np], a, b[0], b[1]);
                    mma_16816(sc[2 * np + 1], a, b[2], b[3]);
                }
            }
            /* decay mask: exp(-s (i - j)) for j <= i, else 0 */
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = i0 + g + (e >= 2 ? 8 : 0), j = nt * 8 + 2 * t4 + (e & 1);
                    sc[nt][e] = j <= i ? sc[nt][e] * sm.pw[i - j] : 0.0f;
                }
            /* out = exp(-s (i+1)) x M + scores z */
            float o[NS / 8][4];
#pragma unroll
            for (int nt = 0; nt < NS / 8; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
            if (have_state) {
#pragma unroll
                for (int ks = 0; ks < HD / 16; ks++) {
                    uint32_t a[4];
                    mma_ldsm4(a, xs + ks * 32);
#pragma unroll
                    for (int np = 0; np < NS / 16; np++) {
                        uint32_t b[4];
                        mma_ldsm4t(b, ms + ks * 16 * ZR + np * 32);
                        mma_16816(o[2 * np], a, b[0], b[1]);
                        mma_16816(o[2 * np + 1], a, b[2], b[3]);
                    }
                }
                const float f0 = sm.pw[i0 + g + 1], f1 = sm.pw[i0 + g + 9];
#pragma unroll
                for (int nt = 0; nt < NS / 8; nt++) o[nt][0] *= f0, o[nt][1] *= f0, o[nt][2] *= f1, o[nt][3] *= f1;
            }
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                if (kk > warp) break;
                uint32_t a[4];
                mma_c2a(a, sc[2 * kk], sc[2 * kk + 1]);
#pragma unroll
                for (int np = 0; np < NS / 16; np++) {
                    uint32_t b[4];
                    mma_ldsm4t(b, zs + kk * 16 * ZR + np * 32);
                    mma_16816(o[2 * np], a, b[0], b[1]);
                    mma_16816(o[2 * np + 1], a, b[2], b[3]);
                }
            }
            /* store the warp's rows */
#pragma unroll
            for (int h2 = 0; h2 < 2; h2++) {
                const int i = i0 + g + h2 * 8;
                if (i < m) {
                    const int64_t at = (int64_t)bh * p.sbh + (int64_t)row_of(r0 + i) * HD + zc + 2 * t4;
#pragma unroll
                    for (int nt = 0; nt < NS / 8; nt++) {
                        if (p.out_f32)
                            *reinterpret_cast<float2 *>((float *)p.out + at + nt * 8) =
                                make_float2(o[nt][2 * h2], o[nt][2 * h2 + 1]);
                        else
                            *reinterpret_cast<uint32_t *>((__nv_bfloat16 *)p.out + at + nt * 8) =
                                mma_pack(o[nt][2 * h2], o[nt][2 * h2 + 1]);
                    }
                }
            }
        }
        const bool last = blk + 1 == nblk;
        /* The state after this block is needed for the next block, and after the last one only for the
         * segment's own sum (LC_STATE) or the carried-out state. */
        if (last && !(MODE == LC_STATE || (p.final_state && seg + 1 == nseg))) break;
        __syncthreads(); /* every warp is done reading the state operand */
        /* M = exp(-s m) M + (y * exp(-s (m-1-j)))^T z */
        if (have_state) {
            const float d = sm.pw[m];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NS / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[mt][nt][e] *= d;
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const int j0 = kk * 16 + 2 * t4;
            const float d0 = j0 < m ? sm.pw[m - 1 - j0] : 0.0f, d1 = j0 + 1 < m ? sm.pw[m - 2 - j0] : 0.0f;
            const float d8 = j0 + 8 < m ? sm.pw[m - 9 - j0] : 0.0f, d9 = j0 + 9 < m ? sm.pw[m - 10 - j0] : 0.0f;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                uint32_t a[4];
                const int hrow = warp * (HD / 4) + mt * 16;
                mma_ldsm4t(a, ys_cr + kk * 16 * XR + hrow * 2);
                a[0] = mma_scale2(a[0], d0, d1), a[1] = mma_scale2(a[1], d0, d1);
                a[2] = mma_scale2(a[2], d8, d9), a[3] = mma_scale2(a[3], d8, d9);
#pragma unroll
                for (int np = 0; np < NS / 16; np++) {
                    uint32_t b[4];
                    mma_ldsm4t(b, zs + kk * 16 * ZR + np * 32);
                    mma_16816(st[mt][2 * np], a, b[0], b[1]);
                    mma_16816(st[mt][2 * np + 1], a, b[2], b[3]);
                }
            }
        }
        have_state = true;
        if (!last && MODE == LC_OUT) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NS / 8; nt++) {
                    const int row = warp * (HD / 4) + mt * 16 + g, col = nt * 8 + 2 * t4;
                    *reinterpret_cast<uint32_t *>(&sm.m[row][col]) = mma_pack(st[mt][nt][0], st[mt][nt][1]);
                    *reinterpret_cast<uint32_t *>(&sm.m[row + 8][col]) = mma_pack(st[mt][nt][2], st[mt][nt][3]);
                }
        }
        if (last) {
            float *dst = MODE == LC_STATE ? ps.mout + ((int64_t)bh * ps.mout_n + seg) * hd2
                                          : p.final_state + (int64_t)bh * HD * HD;
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NS / 8; nt++) {
                    const int row = warp * (HD / 4) + mt * 16 + g, col = zc + nt * 8 + 2 * t4;
                    *reinterpret_cast<float2 *>(dst + (int64_t)row * HD + col) = make_float2(st[mt][nt][0], st[mt][nt][1]);
                    *reinterpret_cast<float2 *>(dst + (int64_t)(row + 8) * HD + col) =
                        make_float2(st[mt][nt][2], st[mt][nt][3]);
                }
        }
    }
}

/* ---- the output pass on wgmma (sm_90a) ---------------------------------------------------------------- */

/* The same output pass as lc_kernel<HD, LC_OUT> (one CTA per (column slice, segment, sequence), 64-row
 * blocks, the state carried in f32 registers), with one warpgroup per CTA and every product on warpgroup
 * MMA (m1c/cuda/wgmma.cuh):
 *
 *   S = x y^T and O = x M (x, y and M, the bf16 copy of the state, from shared memory); then
 *   O = exp(-s (i+1)) O + mask(S) z (the masked scores from registers) and
 *   M' = exp(-s m) M + (y decayed)^T z (y^T by ldmatrix into registers, times its decay factors rounded
 *   to bf16: one bf16x2 multiply per pair, where lc_kernel multiplies in f32; both round the product).
 *
 * Shared memory holds every tile in the 128-byte swizzle (wg_sw_off): x and y are K-major for S and x M
 * (head_dim contiguous), z and M MN-major (their columns contiguous). The same pass without
 * swizzling (core matrices of 8 contiguous 16-byte rows) ran 1.35x slower than the mma.sync kernel
 * (docs/perf.md). */
template <int HD> struct lcw_smem_layout {
    __nv_bfloat16 x[2][LC_C * HD], y[2][LC_C * HD]; /* [64 rows][HD], HD / 64 panels */
    __nv_bfloat16 z[2][LC_C * LC_NS];                /* [64 rows][NS] */
    __nv_bfloat16 m[HD * LC_NS];                     /* [HD][NS] */
    float pw[LC_C + 1];
};

template <int HD>
__global__ void __launch_bounds__(128, 2) lcw_kernel(lc_problem p, lc_pass ps) {
#if WG_DEVICE
    extern __shared__ __align__(16) unsigned char lc_raw[];
    lcw_smem_layout<HD> &sm = wg_smem<lcw_smem_layout<HD>>(lc_raw);
    constexpr int NS = LC_NS, NSL = HD / NS, MH = HD / 64; /* MH 64-row tiles of the state */
    const int slice = (int)(blockIdx.x % NSL), seg = (int)(blockIdx.x / NSL % ps.nseg), bh = (int)(blockIdx.x / NSL / ps.nseg);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int T = p.T, seg_rows = ps.seg_rows;
    const int r_begin = seg * seg_rows;
    if (r_begin >= T) return;
    const int r_end = min(T, r_begin + seg_rows);
    const int nblk = (r_end - r_begin + LC_C - 1) / LC_C;
    const float s = p.slope[bh % p.nh];
    for (int k = threadIdx.x; k <= LC_C; k += 128) sm.pw[k] = expf(-s * (float)k);

    const __nv_bfloat16 *X = p.x + (int64_t)bh * p.sbh, *Y = p.y + (int64_t)bh * p.sbh, *Z = p.z + (int64_t)bh * p.sbh;
    const int zc = slice * NS;
    auto row_of = [&](int r) { return p.reverse ? T - 1 - r : r; };

    /* this thread's 16-byte chunks: rows lr + 16 i (i < 4), chunk lc of every 64-column panel */
    const int lr = threadIdx.x / 8, lc = threadIdx.x % 8;
    auto load = [&](int blk, int buf) {
        const int r0 = r_begin + blk * LC_C;
        unsigned char *xs = reinterpret_cast<unsigned char *>(sm.x[buf]), *ys = reinterpret_cast<unsigned char *>(sm.y[buf]);
        unsigned char *zs = reinterpret_cast<unsigned char *>(sm.z[buf]);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = lr + 16 * i;
            const bool ok = r0 + r < r_end;
            const int64_t at = (int64_t)row_of(ok ? r0 + r : r_begin) * HD + lc * 8;
            const uint32_t off = wg_sw_off(r, lc * 8, LC_C);
#pragma unroll
            for (int pn = 0; pn < HD / 64; pn++) {
                mma_cp16(xs + pn * LC_C * 128 + off, X + at + pn * 64, ok);
                mma_cp16(ys + pn * LC_C * 128 + off, Y + at + pn * 64, ok);
            }
            mma_cp16(zs + off, Z + at + zc, ok);
        }
        mma_commit();
    };

    /* The state, HD x NS: tile h holds rows 64 h .. 64 h + 63, this thread's values at row 64 h + 16 warp +
     * g + 8 (e / 2), column 8 t + 2 t4 + e % 2 for st[h][4 t + e]. */
    float st[MH][32];
    const int nseg = (T + seg_rows - 1) / seg_rows;
    const bool have_m0 = ps.m0 != nullptr;
    const int64_t hd2 = (int64_t)HD * HD;
    const float *m0p = have_m0 ? ps.m0 + (ps.m0_n ? ((int64_t)bh * ps.m0_n + (int64_t)seg * ps.m0_k) * hd2 : bh * hd2) : nullptr;
#pragma unroll
    for (int h = 0; h < MH; h++)
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const int row = 64 * h + 16 * warp + g + (i % 4 >= 2 ? 8 : 0), col = zc + i / 4 * 8 + 2 * t4 + (i & 1);
            st[h][i] = have_m0 ? m0p[(int64_t)row * HD + col] : 0.0f;
        }
    const uint32_t m_s = mma_smem(sm.m);
    /* The state's bf16 copy (the B operand of x M), by stmatrix: 8 x 8 matrix q = lane / 8 of the 16 x 16
     * tile at columns 16 k is rows 8 (q % 2) .., columns 16 k + 8 (q / 2) .. of the warp's rows, this lane
     * giving the address of its row lane % 8: chunk 2 k + q / 2 of that row, at ((2 k + q / 2) ^ lane % 8)
     * 16 = m_chunk ^ 32 k. */
    const uint32_t m_row = m_s + (uint32_t)(16 * warp + 8 * (lane / 8 % 2) + lane % 8) * 128;
    const uint32_t m_chunk = (uint32_t)((lane / 16) ^ (lane % 8)) * 16;
    auto put_state = [&]() {
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int k = 0; k < NS / 16; k++)
                wg_stsm4(m_row + h * 64 * 128 + (m_chunk ^ (32 * k)), mma_pack(st[h][8 * k], st[h][8 * k + 1]),
                         mma_pack(st[h][8 * k + 2], st[h][8 * k + 3]), mma_pack(st[h][8 * k + 4], st[h][8 * k + 5]),
                         mma_pack(st[h][8 * k + 6], st[h][8 * k + 7]));
        wg_fence_smem();
    };
    put_state(); /* (a zero state until there is one) */

    /* the y^T fragment of state tile h, k-step kk: matrix q = lane / 8 is rows (j) 16 kk + 8 (q / 2) ..,
     * columns (state rows) 64 h + 16 warp + 8 (q % 2) .. of y; this lane's row address, less 16 kk rows and
     * panel h */
    const uint32_t y_lane = (uint32_t)(8 * (lane / 16) + lane % 8) * 128 + (uint32_t)((2 * warp + lane / 8 % 2) ^ (lane % 8)) * 16;
    load(0, 0);
    for (int blk = 0; blk < nblk; blk++) {
        const int buf = blk & 1;
        const int r0 = r_begin + blk * LC_C, m = min(LC_C, r_end - r0);
        mma_wait<0>();
        wg_fence_smem();
        __syncthreads(); /* block blk landed for all (and the state's copy is written); every read of the other
                            buffer is done */
        if (blk + 1 < nblk) load(blk + 1, buf ^ 1);
        const uint32_t x_s = mma_smem(sm.x[buf]), y_s = mma_smem(sm.y[buf]), z_s = mma_smem(sm.z[buf]);
        const uint64_t xd = wg_kdesc(x_s), yd = wg_kdesc(y_s), zd = wg_mndesc(z_s), md = wg_mndesc(m_s);

        /* the state decays by exp(-s m) (before the products: registers that a product accumulates into are
         * not written while any is in flight) */
        {
            const float d = sm.pw[m];
#pragma unroll
            for (int h = 0; h < MH; h++) {
#pragma unroll
                for (int i = 0; i < 32; i++) st[h][i] *= d;
                wg_hold(st[h]);
            }
        }
        /* S = x y^T and O = x M */
        float sc[32], o[32];
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
            wg_64x64_ss<0, 0>(sc, xd + wg_kstep(ks, LC_C), yd + wg_kstep(ks, LC_C), ks > 0);
        }
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++)
            wg_64x64_ss<0, 1>(o, xd + wg_kstep(ks, LC_C), md + ks * (2048 >> 4), ks > 0);
        wg_commit();

        /* while they run: the A operand of the state's update (written before the update's wg_fence, so that
         * the products run without serialising). The state is updated after the last block too, where it
         * may not be needed: skipping it there, under a condition, would serialise every product. */
        uint32_t ya[MH][4][4];
        {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const int j0 = kk * 16 + 2 * t4;
                /* y_j exp(-s (m-1-j)), 0 past the block's end; factors rounded to bf16 */
                const uint32_t d01 = mma_pack(j0 < m ? sm.pw[m - 1 - j0] : 0.0f, j0 + 1 < m ? sm.pw[m - 2 - j0] : 0.0f);
                const uint32_t d89 = mma_pack(j0 + 8 < m ? sm.pw[m - 9 - j0] : 0.0f, j0 + 9 < m ? sm.pw[m - 10 - j0] : 0.0f);
#pragma unroll
                for (int h = 0; h < MH; h++) {
                    uint32_t *a = ya[h][kk];
                    mma_ldsm4t(a, y_s + h * LC_C * 128 + kk * 16 * 128 + y_lane);
                    a[0] = wg_hmul2(a[0], d01), a[1] = wg_hmul2(a[1], d01);
                    a[2] = wg_hmul2(a[2], d89), a[3] = wg_hmul2(a[3], d89);
                }
            }
        }
        wg_wait<0>();
        wg_hold(sc);
        wg_hold(o);
        /* decay mask exp(-s (i - j)) for j <= i, else 0; the state's term scaled by exp(-s (i + 1)) */
        const int i0 = 16 * warp + g;
        {
            const float f0 = sm.pw[i0 + 1], f1 = sm.pw[i0 + 9];
#pragma unroll
            for (int t = 0; t < 8; t++) o[4 * t] *= f0, o[4 * t + 1] *= f0, o[4 * t + 2] *= f1, o[4 * t + 3] *= f1;
        }
        uint32_t pa[4][4];
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = i0 + (e >= 2 ? 8 : 0), j = 8 * t + 2 * t4 + (e & 1);
                sc[4 * t + e] = j <= i ? sc[4 * t + e] * sm.pw[i - j] : 0.0f;
            }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) mma_c2a(pa[kk], &sc[8 * kk], &sc[8 * kk + 4]);

        /* O += mask(S) z;  M = exp(-s m) M + (y * exp(-s (m-1-j)))^T z */
        wg_hold(o);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wg_hold(pa[kk]);
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wg_hold(ya[h][kk]);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wg_64x64_rs<1>(o, pa[kk], zd + kk * (2048 >> 4), 1);
#pragma unroll
        for (int h = 0; h < MH; h++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wg_64x64_rs<1>(st[h], ya[h][kk], zd + kk * (2048 >> 4), 1);
        wg_commit();
        wg_wait<0>();
        wg_hold(o);
#pragma unroll
        for (int h = 0; h < MH; h++) wg_hold(st[h]);

        /* store the rows */
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            const int i = i0 + h2 * 8;
            if (i < m) {
                const int64_t at = (int64_t)bh * p.sbh + (int64_t)row_of(r0 + i) * HD + zc + 2 * t4;
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    if (p.out_f32)
                        *reinterpret_cast<float2 *>((float *)p.out + at + t * 8) = make_float2(o[4 * t + 2 * h2], o[4 * t + 2 * h2 + 1]);
                    else
                        *reinterpret_cast<uint32_t *>((__nv_bfloat16 *)p.out + at + t * 8) = mma_pack(o[4 * t + 2 * h2], o[4 * t + 2 * h2 + 1]);
                }
            }
        }
        if (blk + 1 == nblk) {
            if (!p.final_state || seg + 1 != nseg) break;
            float *dst = p.final_state + (int64_t)bh * HD * HD;
#pragma unroll
            for (int h = 0; h < MH; h++)
#pragma unroll
                for (int t = 0; t < NS / 8; t++) {
                    const int row = 64 * h + 16 * warp + g, col = zc + 8 * t + 2 * t4;
                    *reinterpret_cast<float2 *>(dst + (int64_t)row * HD + col) = make_float2(st[h][4 * t], st[h][4 * t + 1]);
                    *reinterpret_cast<float2 *>(dst + (int64_t)(row + 8) * HD + col) = make_float2(st[h][4 * t + 2], st[h][4 * t + 3]);
                }
            break;
        }
        __syncthreads(); /* every product reading the state's copy is done */
        put_state();
    }
#endif
}

/* In place over segments, one thread per (sequence, state element): seg[k] holds segment k's own state
 * (k < nseg - 1) and receives the state at its start: S_0 = init (or 0), S_{k+1} = exp(-s L_k) S_k +
 * own_k, with L_k = seg_rows for every segment but the last. */
__global__ static void lc_scan(float *seg, const float *init, int nseg, int stride, int seg_rows, int nh, int hd,
                               const float *slope, int64_t n) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t hd2 = (int64_t)hd * hd, bh = idx / hd2, e = idx % hd2;
        const float d = expf(-slope[bh % nh] * (float)seg_rows);
        float acc = init ? init[idx] : 0.0f;
        float *at = seg + bh * stride * hd2 + e; /* [BH][stride][hd][hd], the first nseg used */
        /* eight segments' loads in flight at a time: the chain is latency-bound otherwise */
        for (int k0 = 0; k0 < nseg; k0 += 8) {
            float own[8];
#pragma unroll
            for (int j = 0; j < 8; j++) own[j] = k0 + j + 1 < nseg ? at[(int64_t)(k0 + j) * hd2] : 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (k0 + j < nseg) at[(int64_t)(k0 + j) * hd2] = acc, acc = d * acc + own[j];
        }
    }
}

/* ---- host side -------------------------------------------------------------------------------------- */

static inline int lc_supported(int hd) { return hd == 64 || hd == 128; }

static inline int lc_sms(void) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 132;
    return n > 0 ? n : 132;
}

template <int HD, int MODE> static cudaError_t lc_allow_smem() {
    return cudaFuncSetAttribute(lc_kernel<HD, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)sizeof(lc_smem_layout<HD, MODE>));
}

template <int HD> static cudaError_t lcw_allow_smem() {
    return cudaFuncSetAttribute(lcw_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem_bytes<lcw_smem_layout<HD>>());
}

/* Once per device and head size before lc_run (lc_slots does it): the passes' kernels may use their
 * dynamic shared memory (above 48 KB needs this opt-in), so that launches need no attribute call. */
static inline cudaError_t lc_setup(int hd) {
    if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
    cudaError_t e = hd == 128 ? lc_allow_smem<128, LC_OUT>() : lc_allow_smem<64, LC_OUT>();
    if (e == cudaSuccess) e = hd == 128 ? lc_allow_smem<128, LC_STATE>() : lc_allow_smem<64, LC_STATE>();
    if (e == cudaSuccess && wg_available()) e = hd == 128 ? lcw_allow_smem<128>() : lcw_allow_smem<64>();
    return e;
}

/* CTAs of the output pass resident per multiprocessor (2 on sm_90 for HD 128: registers and shared
 * memory); sets the kernels up (lc_setup). */
static inline int lc_occupancy(int hd) {
    int n = 0;
    cudaError_t e = lc_setup(hd);
    if (e == cudaSuccess && wg_available())
        e = hd == 128 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lcw_kernel<128>, 128, wg_smem_bytes<lcw_smem_layout<128>>())
                      : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lcw_kernel<64>, 128, wg_smem_bytes<lcw_smem_layout<64>>());
    else if (e == cudaSuccess)
        e = hd == 128 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lc_kernel<128, LC_OUT>, LC_THREADS,
                                                                      sizeof(lc_smem_layout<128, LC_OUT>))
                      : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lc_kernel<64, LC_OUT>, LC_THREADS,
                                                                      sizeof(lc_smem_layout<64, LC_OUT>));
    return e == cudaSuccess && n > 0 ? n : 1;
}

/* How a problem is cut. The output pass runs one CTA per (sequence, column slice, segment): a sequence is
 * cut into nseg segments only when the uncut problem leaves resident slots idle, and into as many as fill
 * one wave (every CTA of a wave then takes the same time; a partial extra wave would double it), none
 * shorter than seg_blocks (0: LC_SEG_BLOCKS; at least 4). The
 * starting states come from a state-only pass over finer segments (kf per output segment, as many as its
 * waves of CTAs make fastest) and a scan over them. Deterministic in (BH, T, hd, slots). */
/* LC_FINE_COST: a state-pass segment's fixed cost in 64-row blocks; LC_SEG_BLOCKS: the shortest output
 * segment worth its state pass and scan (at 12 x 64, T 2048, B 8 on an H100 one segment of 32 blocks took
 * 0.227 ms fwd+bwd, two of 16 with their state passes 0.286) */
enum { LC_FINE_COST = 8, LC_SEG_BLOCKS = 32 };
typedef struct lc_plan {
    int nseg, seg_rows;   /* output segments */
    int kf, fine_rows, nfine; /* state-only segments: kf per output segment */
} lc_plan;

static inline lc_plan lc_plan_for(int BH, int T, int hd, int slots, int seg_blocks = 0) {
    lc_plan pl;
    const int blocks = (T + LC_C - 1) / LC_C;
    const int64_t base = (int64_t)BH * (hd / LC_NS);
    int64_t nseg = base >= slots ? 1 : slots / base;
    const int minb = seg_blocks > 4 ? seg_blocks : seg_blocks > 0 ? 4 : LC_SEG_BLOCKS;
    if (nseg > blocks / minb) nseg = blocks / minb;
    if (nseg < 2) {
        pl.nseg = 1, pl.seg_rows = blocks * LC_C, pl.kf = 1, pl.fine_rows = pl.seg_rows, pl.nfine = 1;
        return pl;
    }
    const int per = (int)((blocks + nseg - 1) / nseg); /* blocks per output segment */
    /* The state pass runs one CTA (all columns) per fine segment before the last output segment, BH (nseg - 1)
     * kf of them, in waves of about `slots`: kf minimises its estimated time, waves x (blocks per fine
     * segment + LC_FINE_COST, the fixed cost of a segment: writing its state, its step of the scan). */
    int64_t kf = 1, best = INT64_MAX;
    const int64_t D = (int64_t)BH * (nseg - 1);
    for (int64_t k = 1; k <= per / 4 && k <= 64; k++) {
        const int64_t cost = ((D * k + slots - 1) / slots) * ((per + k - 1) / k + LC_FINE_COST);
        if (cost < best) best = cost, kf = k;
    }
    const int fine = (int)((per + kf - 1) / kf);
    pl.kf = (per + fine - 1) / fine;
    pl.fine_rows = fine * LC_C;
    pl.seg_rows = pl.kf * pl.fine_rows;
    pl.nseg = (T + pl.seg_rows - 1) / pl.seg_rows;
    pl.nfine = (T + pl.fine_rows - 1) / pl.fine_rows;
    return pl;
}

/* The output pass's resident CTAs on the current device: a few driver queries, so once per layer or run,
 * not per call; also sets the kernels up for lc_run (lc_setup). */
static inline int lc_slots(int hd) { return lc_occupancy(hd) * lc_sms(); }

/* Output segments per sequence for (BH, T, hd) with `slots` resident CTAs (and lc_problem.seg_blocks). */
static inline int lc_segments(int BH, int T, int hd, int slots, int seg_blocks = 0) {
    return lc_plan_for(BH, T, hd, slots, seg_blocks).nseg;
}

static inline int64_t lc_workspace_floats(int BH, int T, int hd, int slots, int seg_blocks = 0) {
    const lc_plan pl = lc_plan_for(BH, T, hd, slots, seg_blocks);
    return pl.nseg < 2 ? 0 : (int64_t)BH * pl.nfine * hd * hd;
}

/* One CTA per (slice, segment, sequence) of ps.nseg segments. */
template <int HD, int MODE> static cudaError_t lc_launch(const lc_problem *p, cudaStream_t stream, const lc_pass &ps) {
    const int64_t ctas = (int64_t)p->BH * ps.nseg * (MODE == LC_OUT ? HD / LC_NS : 1);
    if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
    /* shared memory allowed by lc_setup */
    if (MODE == LC_OUT && p->kernel == LC_WGMMA)
        lcw_kernel<HD><<<(unsigned)ctas, 128, wg_smem_bytes<lcw_smem_layout<HD>>(), stream>>>(*p, ps);
    else
        lc_kernel<HD, MODE><<<(unsigned)ctas, LC_THREADS, sizeof(lc_smem_layout<HD, MODE>), stream>>>(*p, ps);
    return cudaGetLastError();
}

template <int HD> static cudaError_t lc_run_t(const lc_problem *p, cudaStream_t stream) {
    const lc_plan pl = lc_plan_for(p->BH, p->T, HD, p->slots, p->seg_blocks);
    lc_pass ps = {nullptr, 0, 0, nullptr, 0, pl.seg_rows, 1};
    if (pl.nseg < 2) {
        ps.m0 = p->reverse ? nullptr : p->init;
        return lc_launch<HD, LC_OUT>(p, stream, ps);
    }
    if (!p->ws || p->ws_floats < (int64_t)p->BH * pl.nfine * HD * HD) return cudaErrorInvalidValue;
    /* the own states of the fine segments before the last output segment's start, the scan to the states at
     * their starts, then the outputs */
    const int starts = (pl.nseg - 1) * pl.kf + 1; /* fine-segment starts up to the last output segment's */
    lc_pass st = {nullptr, 0, 0, p->ws, pl.nfine, pl.fine_rows, starts - 1};
    cudaError_t e = lc_launch<HD, LC_STATE>(p, stream, st); /* all columns per CTA */
    if (e != cudaSuccess) return e;
    const int64_t n = (int64_t)p->BH * HD * HD;
    const int blocks = (int)((n + 255) / 256 < 65536 ? (n + 255) / 256 : 65536);
    lc_scan<<<blocks, 256, 0, stream>>>(p->ws, p->reverse ? nullptr : p->init, starts, pl.nfine, pl.fine_rows, p->nh,
                                        HD, p->slope, n);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    ps.m0 = p->ws, ps.m0_n = pl.nfine, ps.m0_k = pl.kf, ps.nseg = pl.nseg;
    return lc_launch<HD, LC_OUT>(p, stream, ps);
}

/* out for problem p on stream: cudaSuccess, or the CUDA error of the failed launch. */
static inline cudaError_t lc_run(const lc_problem *p, cudaStream_t stream) {
    if (p->reverse && (p->init || p->final_state)) return cudaErrorInvalidValue;
    if (p->kernel != LC_AUTO && p->kernel != LC_MMA && p->kernel != LC_WGMMA) return cudaErrorInvalidValue;
    lc_problem q = *p;
#ifndef M1C_SM90A
    if (q.kernel == LC_WGMMA) return cudaErrorNotSupported; /* not built */
#endif
    if (q.kernel == LC_AUTO) q.kernel = wg_available() ? LC_WGMMA : LC_MMA;
    if (q.hd == 128) return lc_run_t<128>(&q, stream);
    if (q.hd == 64) return lc_run_t<64>(&q, stream);
    return cudaErrorInvalidValue;
}
