/* Causal softmax attention on tensor cores in the FlashAttention-2 form, with mma.sync fragments held in
 * registers (m1c/cuda/mma.cuh): the forward (online softmax, O and the log-sum-exp), and the backward
 * as two kernels, dK dV (one CTA per key tile, looping over the query tiles that see it, for every query
 * head of its KV group) and dQ (one CTA per query tile, looping over its visible key tiles). Scores,
 * probabilities and their gradients never leave registers; P and dS are rounded to bf16 as the operands
 * of the second products (as FlashAttention does). bf16 operands, f32 accumulation; head_dim 64 or 128;
 * four warps, each owning 16 rows of its CTA's 64-row tile. Contracts as the launchers in softmax_tc.cuh. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <m1c/cuda/mma.cuh>

enum { FA_T = 64, FA_QB = 32, FA_THREADS = 128, FA_PAD = 8 };

template <int HD> using fa_tile = __nv_bfloat16[FA_T][HD + FA_PAD];

/* ROWS rows of HD bf16 at src (row stride ld elements) into dst by cp.async, from the block's FA_THREADS
 * threads (every kernel here has that many): thread t copies chunk t % C of rows t / C + RS i, its
 * addresses stepped by constants (index arithmetic over blockDim.x cost about as many instructions per
 * step as the products; a fully unrolled loop, registers the kernels lack); rows >= n zero. */
template <int HD, int ROWS>
__device__ static inline void fa_load(__nv_bfloat16 (*dst)[HD + FA_PAD], const __nv_bfloat16 *src, int64_t ld, int n) {
    constexpr int C = HD / 8, RS = FA_THREADS / C;
    static_assert(FA_THREADS % C == 0 && (ROWS * C) % FA_THREADS == 0, "whole rows per pass of the threads");
    const int r0 = (int)threadIdx.x / C, c = ((int)threadIdx.x % C) * 8;
    const __nv_bfloat16 *s = src + (int64_t)r0 * ld + c;
    const int64_t step = (int64_t)RS * ld;
#pragma unroll 1
    for (int r = r0; r < ROWS; r += RS, s += step) {
        const bool ok = r < n;
        mma_cp16(&dst[r][c], ok ? s : src, ok);
    }
}

/* Before the backward kernels, fa_pl<HD>() lanes per (b, t, h) row (HD / 4 up to 32; 16 at HD 64, so a
 * warp takes two rows where it took one with half its lanes idle): dO rounded to bf16 (the operand the
 * kernels read, by cp.async like the rest) and D = rowsum(dO * O) from that rounded dO: dP = dO V^T uses the
 * rounded dO, and D must too, or dS = P (dP - D) keeps a rounding residue where the true value is 0 (a
 * single key: P = 1, O = V, dS = 0 exactly). The sum's order is the one-row-a-warp order's (its idle lanes
 * added zeros): the same bits. Grid-stride over groups of rows. */
template <int HD> constexpr int fa_pl() { return HD / 4 < 32 ? HD / 4 : 32; }

template <int HD>
__global__ static void fa_prep_kernel(__nv_bfloat16 *dO_lp, float *D, const float *dO, const __nv_bfloat16 *O, int T,
                                      int nh, int64_t rows) {
    constexpr int PL = fa_pl<HD>(), RPW = 32 / PL; /* lanes a row, rows a warp */
    static_assert(HD % 4 == 0 && 32 % PL == 0, "whole rows of 4-value chunks per lane group");
    const int lane = threadIdx.x % 32, sl = lane % PL;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    for (int64_t r0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32 * RPW; r0 < rows; r0 += warps * RPW) {
        const int64_t r = r0 + lane / PL;
        float sum = 0.0f;
        if (r < rows) {
#pragma unroll
            for (int c = 4 * sl; c < HD; c += 4 * PL) { /* 4 values per lane: 16-byte loads of dO */
                const float4 d = *reinterpret_cast<const float4 *>(dO + r * HD + c);
                const uint2 u = make_uint2(mma_pack(d.x, d.y), mma_pack(d.z, d.w));
                *reinterpret_cast<uint2 *>(dO_lp + r * HD + c) = u;
                const uint2 ov = *reinterpret_cast<const uint2 *>(O + r * HD + c);
                const float2 d0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
                const float2 d1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
                const float2 o0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&ov.x));
                const float2 o1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&ov.y));
                sum += d0.x * o0.x + d0.y * o0.y + d1.x * o1.x + d1.y * o1.y;
            }
        }
#pragma unroll
        for (int off = PL / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (sl == 0 && r < rows) {
            const int64_t bt = r / nh, hh = r % nh; /* rows are (b, t, h) */
            D[((bt / T) * nh + hh) * T + bt % T] = sum;
        }
    }
}

/* Row stride in bytes of a [rows][HD + FA_PAD] bf16 tile. */
template <int HD> __device__ constexpr int fa_rs() { return (HD + FA_PAD) * 2; }

/* acc (M tiles of 16 x 8*NT: the warp's rows r0.. against rows 0..8*NT-1 of B) += A B^T with A rows r0..
 * of the tile at shared address a and B rows of the tile at b, both [rows][HD]: the Q K^T shape. Every
 * B fragment feeds the M tiles. */
template <int HD, int NT, int M>
__device__ static inline void fa_abt(float acc[M][NT][4], uint32_t a, int r0, uint32_t b) {
    const int lane = threadIdx.x % 32;
    a += mma_lane_rc(lane, fa_rs<HD>()) + r0 * fa_rs<HD>(), b += mma_lane_cr(lane, fa_rs<HD>());
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
        uint32_t af[M][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++) mma_ldsm4(af[mt], a + mt * 16 * fa_rs<HD>() + ks * 32);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t bf[4];
            mma_ldsm4(bf, b + np * 16 * fa_rs<HD>() + ks * 32);
#pragma unroll
            for (int mt = 0; mt < M; mt++) {
                mma_16816(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                mma_16816(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
            }
        }
    }
}

/* The same for one tile: acc (16 x 8*NT). */
template <int HD, int NT>
__device__ static inline void fa_abt(float acc[NT][4], uint32_t a, int r0, uint32_t b) {
    fa_abt<HD, NT, 1>(reinterpret_cast<float(*)[NT][4]>(acc), a, r0, b);
}

/* The same with A given as the warp's fragments af[HD / 16][4] (held in registers). */
template <int HD, int NT>
__device__ static inline void fa_abt_reg(float acc[NT][4], const uint32_t af[HD / 16][4], uint32_t b) {
    b += mma_lane_cr(threadIdx.x % 32, fa_rs<HD>());
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++)
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t bf[4];
            mma_ldsm4(bf, b + np * 16 * fa_rs<HD>() + ks * 32);
            mma_16816(acc[2 * np], af[ks], bf[0], bf[1]);
            mma_16816(acc[2 * np + 1], af[ks], bf[2], bf[3]);
        }
}

/* acc (M tiles of 16 x HD) += P B with P the warp's M tiles of 16 x 16*KS values as C fragments
 * p[M][2*KS][4] (rounded to bf16 here) and B rows 0..16*KS-1 of the tile at shared address b, [rows][HD]:
 * the P V shape. Every B fragment feeds the M tiles. */
template <int HD, int KS, int M>
__device__ static inline void fa_pb(float acc[M][HD / 8][4], const float p[M][2 * KS][4], uint32_t b) {
    b += mma_lane_rc(threadIdx.x % 32, fa_rs<HD>());
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        uint32_t af[M][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++) mma_c2a(af[mt], p[mt][2 * kk], p[mt][2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < HD / 16; np++) {
            uint32_t bf[4];
            mma_ldsm4t(bf, b + kk * 16 * fa_rs<HD>() + np * 32);
#pragma unroll
            for (int mt = 0; mt < M; mt++) {
                mma_16816(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                mma_16816(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
            }
        }
    }
}

/* The same for one tile: acc (16 x HD), p[2*KS][4]. */
template <int HD, int KS>
__device__ static inline void fa_pb(float acc[HD / 8][4], const float p[2 * KS][4], uint32_t b) {
    fa_pb<HD, KS, 1>(reinterpret_cast<float(*)[HD / 8][4]>(acc), reinterpret_cast<const float(*)[2 * KS][4]>(p), b);
}

/* The query tiles of the forward and of dQ: FA_FW warps of fa_fm 16-row tiles each. Two at head_dim 128
 * (every K and V fragment then feeds two products: fewer shared-memory loads per product); one at 64,
 * where the registers that saves keep twice the blocks resident (a long prefill's forward needs them
 * more: 2 against 4 blocks per SM). */
enum { FA_FW = 4 };
template <int HD> __host__ __device__ constexpr int fa_fm() { return HD == 128 ? 2 : 1; }
template <int HD> __host__ __device__ constexpr int fa_tq() { return 16 * fa_fm<HD>() * FA_FW; }

template <int HD> struct fa_fwd_smem {
    __nv_bfloat16 q[fa_tq<HD>()][HD + FA_PAD];
    fa_tile<HD> k[2], v[2];
};

/* Forward, CTA (query tile of fa_tq rows, head, sequence), query tiles in reverse so that the long rows
 * start first. Queries at positions pos0 + i; keys and values of KV head hh / rep at kb + b*kb_stride + g*kg_stride, row
 * stride ks; att (B, T, nh*HD) bf16; lse (B, nh, T) natural-log units, or NULL. Warp w owns rows
 * 16 fa_fm w .. + 16 fa_fm - 1; per key tile: S = Q K^T, the online softmax in registers, O += P V. */
template <int HD>
__global__ static void __launch_bounds__(32 * FA_FW)
    fa_fwd_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *kb, const __nv_bfloat16 *vb, int64_t kb_stride,
                  int64_t kg_stride, int ks, __nv_bfloat16 *att, float *lse, int T, int nh, int rep, int64_t pos0,
                  float scale_log2) {
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fa_fwd_smem<HD> &sm = *reinterpret_cast<fa_fwd_smem<HD> *>(fa_raw);
    constexpr int M = fa_fm<HD>(), TQ = fa_tq<HD>(), RS = fa_rs<HD>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * TQ, hh = blockIdx.y, b = blockIdx.z;
    const int nq = min(TQ, T - i0), qs = nh * HD;
    const __nv_bfloat16 *kh = kb + b * kb_stride + (hh / rep) * kg_stride, *vh = vb + b * kb_stride + (hh / rep) * kg_stride;
    const int64_t kend = pos0 + i0 + nq; /* keys 0..kend-1 are seen by some row */
    const int ntiles = (int)((kend + FA_T - 1) / FA_T);
    const int r0 = warp * 16 * M;                       /* the warp's first row in the tile */
    const int64_t wfirst = pos0 + i0 + r0, wlast = wfirst + 16 * M - 1;

    fa_load<HD, TQ>(sm.q, q + ((int64_t)b * T + i0) * qs + (int64_t)hh * HD, qs, nq);
    fa_load<HD, FA_T>(sm.k[0], kh, ks, (int)min((int64_t)FA_T, kend));
    fa_load<HD, FA_T>(sm.v[0], vh, ks, (int)min((int64_t)FA_T, kend));
    mma_commit();

    /* per 16-row tile mt: rows g and g + 8 of the thread (index 2 mt + h) */
    float o[M][HD / 8][4], m[2 * M], l[2 * M];
#pragma unroll
    for (int mt = 0; mt < M; mt++) {
        m[2 * mt] = m[2 * mt + 1] = -INFINITY, l[2 * mt] = l[2 * mt + 1] = 0.0f;
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.0f;
    }
    /* With one tile per warp the query fragments fit in registers for the whole key loop (a long prefill
     * runs thousands of key tiles); with two they are reloaded per key tile. */
    constexpr bool QREG = M == 1;
    uint32_t qf[QREG ? HD / 16 : 1][4];
    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = kt & 1;
        const int64_t k0 = (int64_t)kt * FA_T;
        mma_wait<0>();
        __syncthreads(); /* tile kt landed; every warp is done with the other buffer */
        if (QREG && kt == 0)
#pragma unroll
            for (int kk = 0; kk < (QREG ? HD / 16 : 0); kk++)
                mma_ldsm4(qf[kk], mma_smem(&sm.q[r0][0]) + mma_lane_rc(lane, RS) + kk * 32);
        if (kt + 1 < ntiles) {
            const int64_t k1 = k0 + FA_T;
            fa_load<HD, FA_T>(sm.k[buf ^ 1], kh + k1 * ks, ks, (int)min((int64_t)FA_T, kend - k1));
            fa_load<HD, FA_T>(sm.v[buf ^ 1], vh + k1 * ks, ks, (int)min((int64_t)FA_T, kend - k1));
            mma_commit();
        }
        if (k0 > wlast) continue; /* warp-uniform: no row of this warp sees the tile */
        float s[M][8][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
        if constexpr (QREG) /* S = Q K^T */
            fa_abt_reg<HD, 8>(s[0], qf, mma_smem(sm.k[buf]));
        else
            fa_abt<HD, 8, M>(s, mma_smem(sm.q), r0, mma_smem(sm.k[buf]));
        /* scale to log2 units; mask keys after the row or past kend on the diagonal and last tiles */
        float mx[2 * M];
#pragma unroll
        for (int r = 0; r < 2 * M; r++) mx[r] = m[r];
        if (k0 + FA_T - 1 > wfirst || k0 + FA_T > kend) {
            const int64_t dr = pos0 + i0 + r0 + g - k0; /* row g of the warp's first tile, in tile coordinates */
            const int rr = (int)(dr < 2 * FA_T ? dr : 2 * FA_T), kl = (int)min((int64_t)FA_T, kend - k0);
#pragma unroll
            for (int mt = 0; mt < M; mt++)
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = nt * 8 + 2 * t4 + (e & 1), row = rr + mt * 16 + (e >= 2 ? 8 : 0);
                        const float v = col > row || col >= kl ? -INFINITY : s[mt][nt][e] * scale_log2;
                        s[mt][nt][e] = v;
                        mx[2 * mt + (e >> 1)] = fmaxf(mx[2 * mt + (e >> 1)], v);
                    }
        } else {
#pragma unroll
            for (int mt = 0; mt < M; mt++)
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        s[mt][nt][e] *= scale_log2;
                        mx[2 * mt + (e >> 1)] = fmaxf(mx[2 * mt + (e >> 1)], s[mt][nt][e]);
                    }
        }
        float c[2 * M];
#pragma unroll
        for (int r = 0; r < 2 * M; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            /* every row sees key 0 in tile 0 (which every warp takes), so mx is finite from then on */
            c[r] = exp2f(m[r] - mx[r]); /* m = -inf on the first tile: 0 */
            m[r] = mx[r];
            l[r] *= c[r];
        }
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = 2 * mt + (e >> 1);
                    const float p = exp2f(s[mt][nt][e] - m[r]); /* masked: -inf -> 0 */
                    s[mt][nt][e] = p;
                    l[r] += p;
                }
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++)
                o[mt][nt][0] *= c[2 * mt], o[mt][nt][1] *= c[2 * mt], o[mt][nt][2] *= c[2 * mt + 1],
                    o[mt][nt][3] *= c[2 * mt + 1];
        fa_pb<HD, 4, M>(o, s, mma_smem(sm.v[buf])); /* O += P V */
    }
#pragma unroll
    for (int r = 0; r < 2 * M; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int mt = 0; mt < M; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = r0 + mt * 16 + g + 8 * h, r = 2 * mt + h;
            if (i >= nq) continue;
            const float inv = 1.0f / l[r];
            __nv_bfloat16 *dst = att + ((int64_t)b * T + i0 + i) * qs + (int64_t)hh * HD + 2 * t4;
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++)
                *reinterpret_cast<uint32_t *>(dst + nt * 8) = mma_pack(o[mt][nt][2 * h] * inv, o[mt][nt][2 * h + 1] * inv);
            if (lse && t4 == 0) lse[((int64_t)b * nh + hh) * T + i0 + i] = (m[r] + log2f(l[r])) * 0.69314718055994531f;
        }
}

/* dQ's key tiles: FA_QK rows. */
enum { FA_QK = 32 };

template <int HD> struct fa_dq_smem {
    __nv_bfloat16 q[fa_tq<HD>()][HD + FA_PAD], dO[fa_tq<HD>()][HD + FA_PAD];
    __nv_bfloat16 k[2][FA_QK][HD + FA_PAD], v[2][FA_QK][HD + FA_PAD];
    float lse2[fa_tq<HD>()], D[fa_tq<HD>()];
};

/* dq (B, T, nh*HD) f32, written: CTA (query tile of fa_tq rows, head, sequence) of the layer's causal
 * attention (pos0 = 0), keys and values (B, T, kvh*HD). S = Q K^T, P = exp(S scale - lse), dP = dO V^T,
 * dS = P (dP - D), dQ = scale dS K, over the key tiles up to the query tile's last row. Warp w owns fa_fm
 * 16-row tiles (as the forward), so every K and V fragment feeds that many products. */
template <int HD>
__global__ static void __launch_bounds__(32 * FA_FW)
    fa_bwd_q_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dO,
                    const float *lse, const float *D, float *dq, int T, int nh, int kvh, float scale, float scale_log2) {
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fa_dq_smem<HD> &sm = *reinterpret_cast<fa_dq_smem<HD> *>(fa_raw);
    constexpr int M = fa_fm<HD>(), TQ = fa_tq<HD>(), RS = fa_rs<HD>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * TQ, hh = blockIdx.y, b = blockIdx.z, grp = hh / (nh / kvh);
    const int nq = min(TQ, T - i0), qs = nh * HD, kd = kvh * HD;
    const int kend = i0 + nq, ntiles = (kend + FA_QK - 1) / FA_QK;
    const int r0 = warp * 16 * M, wfirst = i0 + r0, wlast = wfirst + 16 * M - 1;
    const __nv_bfloat16 *kh = k + (int64_t)b * T * kd + (int64_t)grp * HD, *vh = v + (int64_t)b * T * kd + (int64_t)grp * HD;
    const int64_t qrow = ((int64_t)b * T + i0) * qs + (int64_t)hh * HD;

    fa_load<HD, TQ>(sm.q, q + qrow, qs, nq);
    fa_load<HD, TQ>(sm.dO, dO + qrow, qs, nq);
    fa_load<HD, FA_QK>(sm.k[0], kh, kd, min((int)FA_QK, kend));
    fa_load<HD, FA_QK>(sm.v[0], vh, kd, min((int)FA_QK, kend));
    mma_commit();
    for (int i = threadIdx.x; i < TQ; i += blockDim.x) {
        const int64_t li = ((int64_t)b * nh + hh) * T + i0 + i;
        sm.lse2[i] = i < nq ? lse[li] * 1.44269504088896341f : 0.0f;
        sm.D[i] = i < nq ? D[li] : 0.0f;
    }
    float dqa[M][HD / 8][4];
#pragma unroll
    for (int mt = 0; mt < M; mt++)
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) dqa[mt][nt][0] = dqa[mt][nt][1] = dqa[mt][nt][2] = dqa[mt][nt][3] = 0.0f;
    float lr[2 * M], Dr[2 * M];
    const uint32_t qa = mma_smem(&sm.q[r0][0]) + mma_lane_rc(lane, RS), oa = mma_smem(&sm.dO[r0][0]) + mma_lane_rc(lane, RS);
    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = kt & 1, k0 = kt * FA_QK;
        mma_wait<0>();
        __syncthreads();
        if (kt == 0)
#pragma unroll
            for (int r = 0; r < 2 * M; r++) lr[r] = sm.lse2[r0 + (r / 2) * 16 + g + 8 * (r % 2)], Dr[r] = sm.D[r0 + (r / 2) * 16 + g + 8 * (r % 2)];
        if (kt + 1 < ntiles) {
            const int k1 = k0 + FA_QK;
            fa_load<HD, FA_QK>(sm.k[buf ^ 1], kh + (int64_t)k1 * kd, kd, min((int)FA_QK, kend - k1));
            fa_load<HD, FA_QK>(sm.v[buf ^ 1], vh + (int64_t)k1 * kd, kd, min((int)FA_QK, kend - k1));
            mma_commit();
        }
        if (k0 > wlast) continue;
        float s[M][FA_QK / 8][4], dp[M][FA_QK / 8][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int nt = 0; nt < FA_QK / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[mt][nt][e] = dp[mt][nt][e] = 0.0f;
        { /* S = Q K^T and dP = dO V^T in one pass over k (two fa_abt calls spill more registers) */
            const uint32_t kb_ = mma_smem(sm.k[buf]) + mma_lane_cr(lane, RS), vb_ = mma_smem(sm.v[buf]) + mma_lane_cr(lane, RS);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                uint32_t af[M][4], of[M][4];
#pragma unroll
                for (int mt = 0; mt < M; mt++)
                    mma_ldsm4(af[mt], qa + mt * 16 * RS + kk * 32), mma_ldsm4(of[mt], oa + mt * 16 * RS + kk * 32);
#pragma unroll
                for (int np = 0; np < FA_QK / 16; np++) {
                    uint32_t bk[4], bv[4];
                    mma_ldsm4(bk, kb_ + np * 16 * RS + kk * 32);
                    mma_ldsm4(bv, vb_ + np * 16 * RS + kk * 32);
#pragma unroll
                    for (int mt = 0; mt < M; mt++) {
                        mma_16816(s[mt][2 * np], af[mt], bk[0], bk[1]);
                        mma_16816(s[mt][2 * np + 1], af[mt], bk[2], bk[3]);
                        mma_16816(dp[mt][2 * np], of[mt], bv[0], bv[1]);
                        mma_16816(dp[mt][2 * np + 1], of[mt], bv[2], bv[3]);
                    }
                }
            }
        }
        const bool edge = k0 + FA_QK - 1 > wfirst;
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int nt = 0; nt < FA_QK / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int col = k0 + nt * 8 + 2 * t4 + (e & 1), row = wfirst + mt * 16 + g + (e >= 2 ? 8 : 0);
                    const int r = 2 * mt + (e >> 1);
                    const float p = edge && col > row ? 0.0f : exp2f(s[mt][nt][e] * scale_log2 - lr[r]);
                    s[mt][nt][e] = p * (dp[mt][nt][e] - Dr[r]); /* dS */
                }
        fa_pb<HD, FA_QK / 16, M>(dqa, s, mma_smem(sm.k[buf])); /* dQ += dS K */
    }
#pragma unroll
    for (int mt = 0; mt < M; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = r0 + mt * 16 + g + 8 * h;
            if (i >= nq) continue;
            float *dst = dq + ((int64_t)b * T + i0 + i) * qs + (int64_t)hh * HD + 2 * t4;
#pragma unroll
            for (int nt = 0; nt < HD / 8; nt++)
                *reinterpret_cast<float2 *>(dst + nt * 8) =
                    make_float2(dqa[mt][nt][2 * h] * scale, dqa[mt][nt][2 * h + 1] * scale);
        }
}

/* dK dV's query steps: FA_QS rows loaded per barrier, taken FA_QB at a time (the registers hold the
 * scores of FA_QB queries). */
enum { FA_QS = 2 * FA_QB };

template <int HD> struct fa_dkv_smem {
    fa_tile<HD> k, v;
    __nv_bfloat16 q[2][FA_QS][HD + FA_PAD], dO[2][FA_QS][HD + FA_PAD];
    float lse2[2][FA_QS], D[2][FA_QS];
};

/* dk, dv (B, T, kvh*HD) f32, written: CTA (key tile, KV head, sequence), summing over the group's query
 * heads and the query tiles (FA_QS rows) at or after the key tile. The warp's 16 keys: S^T = K Q^T,
 * dP^T = V dO^T, P^T, dS^T = P^T (dP^T - D) in registers, dV += P^T dO, dK += scale dS^T Q. */
template <int HD>
__global__ static void __launch_bounds__(FA_THREADS)
    fa_bwd_kv_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dO,
                     const float *lse, const float *D, float *dk, float *dv, int T, int nh, int kvh, float scale,
                     float scale_log2) {
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fa_dkv_smem<HD> &sm = *reinterpret_cast<fa_dkv_smem<HD> *>(fa_raw);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int k0 = blockIdx.x * FA_T, grp = blockIdx.y, b = blockIdx.z, rep = nh / kvh;
    const int nk = min(FA_T, T - k0), kd = kvh * HD, qs = nh * HD;
    const int kpos = k0 + warp * 16 + g; /* the thread's first key (second: +8) */
    const int wfirst = k0 + warp * 16;
    const int64_t krow = ((int64_t)b * T + k0) * kd + (int64_t)grp * HD;
    fa_load<HD, FA_T>(sm.k, k + krow, kd, nk);
    fa_load<HD, FA_T>(sm.v, v + krow, kd, nk);
    const int qt0 = k0 / FA_QS, nqt = (T + FA_QS - 1) / FA_QS - qt0; /* query tiles per head */
    const int steps = rep * nqt;
    /* a step's query rows, dO rows (cp.async), lse and D (plain loads: visible after the next barrier) */
    auto qload = [&](int step, int buf) {
        const int hq = grp * rep + step / nqt, qi0 = (qt0 + step % nqt) * FA_QS, nq = min((int)FA_QS, T - qi0);
        const int64_t row = ((int64_t)b * T + qi0) * qs + (int64_t)hq * HD;
        fa_load<HD, FA_QS>(sm.q[buf], q + row, qs, nq);
        fa_load<HD, FA_QS>(sm.dO[buf], dO + row, qs, nq);
        mma_commit();
        for (int i = threadIdx.x; i < FA_QS; i += FA_THREADS) {
            const int64_t li = ((int64_t)b * nh + hq) * T + qi0 + i;
            sm.lse2[buf][i] = i < nq ? lse[li] * 1.44269504088896341f : 0.0f;
            sm.D[buf][i] = i < nq ? D[li] : 0.0f;
        }
    };
    qload(0, 0);
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int nt = 0; nt < HD / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[nt][e] = dva[nt][e] = 0.0f;
    for (int step = 0; step < steps; step++) {
        const int buf = step & 1, qi0 = (qt0 + step % nqt) * FA_QS;
        const int nq = min((int)FA_QS, T - qi0);
        mma_wait<0>();
        __syncthreads(); /* this step's rows (and, first time, k v) ready; the other buffers are free */
        if (step + 1 < steps) qload(step + 1, buf ^ 1);
#pragma unroll 1
        for (int h0 = 0; h0 < FA_QS; h0 += FA_QB) {
            if (qi0 + h0 + FA_QB - 1 < wfirst || h0 >= nq) continue; /* all before the warp's keys, or past T */
            float st[FA_QB / 8][4], dpt[FA_QB / 8][4];
#pragma unroll
            for (int nt = 0; nt < FA_QB / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.0f;
            const uint32_t qb = mma_smem(&sm.q[buf][h0][0]), ob = mma_smem(&sm.dO[buf][h0][0]);
            fa_abt<HD, FA_QB / 8>(st, mma_smem(sm.k), warp * 16, qb);
            fa_abt<HD, FA_QB / 8>(dpt, mma_smem(sm.v), warp * 16, ob);
#pragma unroll
            for (int nt = 0; nt < FA_QB / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = h0 + nt * 8 + 2 * t4 + (e & 1), key = kpos + (e >= 2 ? 8 : 0);
                    const bool ok = qc < nq && qi0 + qc >= key;
                    const float p = ok ? exp2f(st[nt][e] * scale_log2 - sm.lse2[buf][qc]) : 0.0f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - sm.D[buf][qc]);
                }
            fa_pb<HD, FA_QB / 16>(dva, st, ob);
            fa_pb<HD, FA_QB / 16>(dka, dpt, qb);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = warp * 16 + g + 8 * r;
        if (i >= nk) continue;
        const int64_t at = krow + (int64_t)i * kd + 2 * t4;
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt++) {
            *reinterpret_cast<float2 *>(dk + at + nt * 8) = make_float2(dka[nt][2 * r] * scale, dka[nt][2 * r + 1] * scale);
            *reinterpret_cast<float2 *>(dv + at + nt * 8) = make_float2(dva[nt][2 * r], dva[nt][2 * r + 1]);
        }
    }
}
