/* Causal softmax attention on warpgroup MMA (wgmma, sm_90a; m1c/cuda/wgmma.cuh): the same three kernels
 * as softmax_fa.cuh's, the forward (one CTA per query tile) and the backward's dK dV (one CTA per key
 * tile) and dQ (one CTA per query tile), the same arithmetic (P and dS rounded to bf16 as operands of the
 * second products; f32 accumulation), with
 * one warpgroup per CTA, 64-row tiles of every operand in shared memory in the 128-byte swizzle, and the
 * scores and their gradients in the products' accumulator registers. Warp w of the group owns rows 16 w
 * .. 16 w + 15 of its CTA's tile, thread values at rows g, g + 8 (g = lane / 4) and, for accumulator
 * element 4 t + e, column 8 t + 2 (lane % 4) + e % 2. Contracts as the launchers in softmax_tc.cuh.
 *
 * Every product is m64n64k16: S = A B^T over head_dim takes both tiles K-major (rows of 64 by head_dim),
 * the second products (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K) take the 64 x 16 bf16 fragments
 * of P or dS from registers and the other tile MN-major, one 64-column panel of head_dim at a time. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <m1c/cuda/mma.cuh>
#include <m1c/cuda/wgmma.cuh>

enum { FW_T = 64 }; /* rows of every tile: keys of dK dV's CTA and query step, queries of dQ's CTA and key step */

template <int HD> struct fw_dkv_smem {
    __nv_bfloat16 k[FW_T * HD], v[FW_T * HD];
    __nv_bfloat16 q[2][FW_T * HD], dO[2][FW_T * HD];
    float lse2[2][FW_T], D[2][FW_T];
};

template <int HD> struct fw_dq_smem {
    __nv_bfloat16 q[FW_T * HD], dO[FW_T * HD];
    __nv_bfloat16 k[2][FW_T * HD], v[2][FW_T * HD];
    float lse2[FW_T], D[FW_T];
};

/* 2^x by the multi-function unit, subnormal results flushed to 0 (a probability under 2^-126). */
__device__ static inline float fw_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* acc (64 x 64) = A B^T over HD: A and B swizzled tiles of 64 rows by HD at shared addresses a, b. */
template <int HD> __device__ static inline void fw_abt(float (&acc)[32], uint32_t a, uint32_t b) {
    const uint64_t da = wg_kdesc(a), db = wg_kdesc(b);
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) wg_64x64_ss<0, 0>(acc, da + wg_kstep(ks, FW_T), db + wg_kstep(ks, FW_T), ks > 0);
}

/* acc[p] (64 x 64, columns 64 p ..) += F B with F the 64 x 64 bf16 fragments f[4][4] (from registers) and
 * B the swizzled tile of 64 rows by HD at shared address b. */
template <int HD> __device__ static inline void fw_fb(float (&acc)[HD / 64][32], const uint32_t (&f)[4][4], uint32_t b) {
#pragma unroll
    for (int pn = 0; pn < HD / 64; pn++) {
        const uint64_t db = wg_mndesc(b + pn * FW_T * 128);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wg_64x64_rs<1>(acc[pn], f[kk], db + kk * (2048 >> 4), 1);
    }
}

/* Commits the products issued since the last commit, waits for them, and pins the accumulators acc[P]
 * below the wait (wg_hold). */
template <int P> __device__ static inline void fw_wait(float (&acc)[P][32]) {
    wg_commit();
    wg_wait<0>();
#pragma unroll
    for (int pn = 0; pn < P; pn++) wg_hold(acc[pn]);
}

template <int HD> struct fw_fwd_smem {
    __nv_bfloat16 q[FW_T * HD], k[2][FW_T * HD], v[2][FW_T * HD];
};

/* The forward, as softmax_fa.cuh's fa_fwd_kernel (same arguments and contract) with 64-query tiles: CTA
 * (query tile, head, sequence), the last tiles first; per key tile S = Q K^T, the online softmax in
 * registers (each row's four lanes combine their maxima and sums by shuffles), O += P V. */
template <int HD>
__global__ static void __launch_bounds__(128, 2)
    fw_fwd_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *kb, const __nv_bfloat16 *vb, int64_t kb_stride,
                  int64_t kg_stride, int ks, __nv_bfloat16 *att, float *lse, int T, int nh, int rep, int64_t pos0,
                  float scale_log2) {
#if WG_DEVICE
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fw_fwd_smem<HD> &sm = wg_smem<fw_fwd_smem<HD>>(fa_raw);
    constexpr int P = HD / 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FW_T, hh = blockIdx.y, b = blockIdx.z;
    const int nq = min((int)FW_T, T - i0), qs = nh * HD;
    const __nv_bfloat16 *kh = kb + b * kb_stride + (hh / rep) * kg_stride, *vh = vb + b * kb_stride + (hh / rep) * kg_stride;
    const int64_t kend = pos0 + i0 + nq; /* keys 0..kend-1 are seen by some row */
    const int ntiles = (int)((kend + FW_T - 1) / FW_T);
    const int64_t row = pos0 + i0 + warp * 16 + g; /* the thread's first row's position (second: + 8) */

    wg_load_tile<FW_T, HD, 128>(sm.q, q + ((int64_t)b * T + i0) * qs + (int64_t)hh * HD, qs, nq);
    wg_load_tile<FW_T, HD, 128>(sm.k[0], kh, ks, (int)min((int64_t)FW_T, kend));
    wg_load_tile<FW_T, HD, 128>(sm.v[0], vh, ks, (int)min((int64_t)FW_T, kend));
    mma_commit();
    float o[P][32], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int pn = 0; pn < P; pn++)
#pragma unroll
        for (int i = 0; i < 32; i++) o[pn][i] = 0.0f;
    const uint32_t q_s = mma_smem(sm.q);
    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = kt & 1;
        const int64_t k0 = (int64_t)kt * FW_T;
        mma_wait<0>();
        wg_fence_smem();
        __syncthreads(); /* tile kt (and, first time, q) landed; the other buffers are free */
        float s[32];
        wg_fence();
        fw_abt<HD>(s, q_s, mma_smem(sm.k[buf]));
        wg_commit();
        if (kt + 1 < ntiles) { /* into buffers whose products are done */
            const int64_t k1 = k0 + FW_T;
            wg_load_tile<FW_T, HD, 128>(sm.k[buf ^ 1], kh + k1 * ks, ks, (int)min((int64_t)FW_T, kend - k1));
            wg_load_tile<FW_T, HD, 128>(sm.v[buf ^ 1], vh + k1 * ks, ks, (int)min((int64_t)FW_T, kend - k1));
            mma_commit();
        }
        wg_wait<0>();
        wg_hold(s);
        /* scale to log2 units; mask keys after the row or past kend on the diagonal and last tiles */
        float mx[2] = {m[0], m[1]};
        const bool edge = k0 + FW_T - 1 > pos0 + i0 || k0 + FW_T > kend;
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t col = k0 + 8 * t + 2 * t4 + (e & 1);
                float v = s[4 * t + e] * scale_log2;
                if (edge && (col > row + 8 * (e >> 1) || col >= kend)) v = -INFINITY;
                s[4 * t + e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float c[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            c[r] = fw_exp2(m[r] - mx[r]); /* m = -inf on the first tile: 0 (every row sees key 0 there) */
            m[r] = mx[r];
            l[r] *= c[r];
        }
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const float p = fw_exp2(s[i] - m[(i % 4) >> 1]); /* masked: -inf -> 0 */
            s[i] = p;
            l[(i % 4) >> 1] += p;
        }
        uint32_t pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            mma_c2a(pa[kk], &s[8 * kk], &s[8 * kk + 4]);
            wg_hold(pa[kk]);
        }
#pragma unroll
        for (int pn = 0; pn < P; pn++) {
#pragma unroll
            for (int i = 0; i < 32; i++) o[pn][i] *= c[(i % 4) >> 1];
            wg_hold(o[pn]);
        }
        wg_fence();
        fw_fb<HD>(o, pa, mma_smem(sm.v[buf])); /* O += P V */
        fw_wait(o);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = warp * 16 + g + 8 * r;
        if (i >= nq) continue;
        const float inv = 1.0f / l[r];
        __nv_bfloat16 *dst = att + ((int64_t)b * T + i0 + i) * qs + (int64_t)hh * HD + 2 * t4;
#pragma unroll
        for (int pn = 0; pn < P; pn++)
#pragma unroll
            for (int t = 0; t < 8; t++) {
                const int e = 4 * t + 2 * r;
                *reinterpret_cast<uint32_t *>(dst + pn * 64 + 8 * t) = mma_pack(o[pn][e] * inv, o[pn][e + 1] * inv);
            }
        if (lse && t4 == 0) lse[((int64_t)b * nh + hh) * T + i0 + i] = (m[r] + log2f(l[r])) * 0.69314718055994531f;
    }
#endif
}

/* dk, dv (B, T, kvh*HD) f32, written: CTA (key tile, KV head, sequence), summing over the group's query
 * heads and the query tiles at or after the key tile. S^T = K Q^T and dP^T = V dO^T, P^T and dS^T = P^T
 * (dP^T - D) in registers, dV += P^T dO, dK += scale dS^T Q. */
template <int HD>
__global__ static void __launch_bounds__(128, 2)
    fw_bwd_kv_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dO,
                     const float *lse, const float *D, float *dk, float *dv, int T, int nh, int kvh, float scale,
                     float scale_log2) {
#if WG_DEVICE
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fw_dkv_smem<HD> &sm = wg_smem<fw_dkv_smem<HD>>(fa_raw);
    constexpr int P = HD / 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int k0 = blockIdx.x * FW_T, grp = blockIdx.y, b = blockIdx.z, rep = nh / kvh;
    const int nk = min((int)FW_T, T - k0), kd = kvh * HD, qs = nh * HD;
    const int key = k0 + warp * 16 + g; /* the thread's first key (second: + 8) */
    const int64_t krow = ((int64_t)b * T + k0) * kd + (int64_t)grp * HD;
    wg_load_tile<FW_T, HD, 128>(sm.k, k + krow, kd, nk);
    wg_load_tile<FW_T, HD, 128>(sm.v, v + krow, kd, nk);
    const int qt0 = k0 / FW_T, nqt = (T + FW_T - 1) / FW_T - qt0; /* query tiles per head */
    const int steps = rep * nqt;
    /* a step's query rows and dO rows (cp.async), lse and D (plain loads: visible after the next barrier) */
    auto qload = [&](int step, int buf) {
        const int hq = grp * rep + step / nqt, qi0 = (qt0 + step % nqt) * FW_T, nq = min((int)FW_T, T - qi0);
        const int64_t row = ((int64_t)b * T + qi0) * qs + (int64_t)hq * HD;
        wg_load_tile<FW_T, HD, 128>(sm.q[buf], q + row, qs, nq);
        wg_load_tile<FW_T, HD, 128>(sm.dO[buf], dO + row, qs, nq);
        mma_commit();
        for (int i = threadIdx.x; i < FW_T; i += 128) {
            const int64_t li = ((int64_t)b * nh + hq) * T + qi0 + i;
            sm.lse2[buf][i] = i < nq ? lse[li] * 1.44269504088896341f : 0.0f;
            sm.D[buf][i] = i < nq ? D[li] : 0.0f;
        }
    };
    qload(0, 0);
    float dka[P][32], dva[P][32];
#pragma unroll
    for (int pn = 0; pn < P; pn++)
#pragma unroll
        for (int i = 0; i < 32; i++) dka[pn][i] = dva[pn][i] = 0.0f;
    const uint32_t k_s = mma_smem(sm.k), v_s = mma_smem(sm.v);
    for (int step = 0; step < steps; step++) {
        const int buf = step & 1, qi0 = (qt0 + step % nqt) * FW_T, nq = min((int)FW_T, T - qi0);
        mma_wait<0>();
        wg_fence_smem();
        __syncthreads(); /* this step's rows (and, first time, k v) landed; the other buffers are free */
        const uint32_t q_s = mma_smem(sm.q[buf]), o_s = mma_smem(sm.dO[buf]);
        float st[32], dpt[32];
        wg_fence();
        fw_abt<HD>(st, k_s, q_s);
        fw_abt<HD>(dpt, v_s, o_s);
        wg_commit();
        if (step + 1 < steps) qload(step + 1, buf ^ 1); /* into buffers whose products are done */
        wg_wait<0>();
        wg_hold(st);
        wg_hold(dpt);
        /* P^T (0 where the query precedes the key or is past T: only in the diagonal and the last step) and
         * dS^T = P^T (dP^T - D) */
        const bool mask = qi0 < k0 + FW_T || nq < FW_T;
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int qc = 8 * t + 2 * t4 + c;
                const float l = sm.lse2[buf][qc], dd = sm.D[buf][qc];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int e = 4 * t + 2 * r + c;
                    float p = fw_exp2(st[e] * scale_log2 - l);
                    if (mask && !(qc < nq && qi0 + qc >= key + 8 * r)) p = 0.0f;
                    st[e] = p;
                    dpt[e] = p * (dpt[e] - dd);
                }
            }
        uint32_t pa[4][4], da[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            mma_c2a(pa[kk], &st[8 * kk], &st[8 * kk + 4]);
            mma_c2a(da[kk], &dpt[8 * kk], &dpt[8 * kk + 4]);
            wg_hold(pa[kk]);
            wg_hold(da[kk]);
        }
        wg_fence();
        fw_fb<HD>(dva, pa, o_s);
        fw_fb<HD>(dka, da, q_s);
        fw_wait(dka);
#pragma unroll
        for (int pn = 0; pn < P; pn++) wg_hold(dva[pn]);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = warp * 16 + g + 8 * r;
        if (i >= nk) continue;
        const int64_t at = krow + (int64_t)i * kd + 2 * t4;
#pragma unroll
        for (int pn = 0; pn < P; pn++)
#pragma unroll
            for (int t = 0; t < 8; t++) {
                const int c = pn * 64 + 8 * t, e = 4 * t + 2 * r;
                *reinterpret_cast<float2 *>(dk + at + c) = make_float2(dka[pn][e] * scale, dka[pn][e + 1] * scale);
                *reinterpret_cast<float2 *>(dv + at + c) = make_float2(dva[pn][e], dva[pn][e + 1]);
            }
    }
#endif
}

/* dq (B, T, nh*HD) f32, written: CTA (query tile, head, sequence; the last tiles, which see the most keys,
 * first) of the layer's causal attention, over the key tiles up to its last row. S = Q K^T, P = exp(S
 * scale - lse), dP = dO V^T, dS = P (dP - D), dQ = scale dS K. */
template <int HD>
__global__ static void __launch_bounds__(128, 2)
    fw_bwd_q_kernel(const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v, const __nv_bfloat16 *dO,
                    const float *lse, const float *D, float *dq, int T, int nh, int kvh, float scale, float scale_log2) {
#if WG_DEVICE
    extern __shared__ __align__(16) unsigned char fa_raw[];
    fw_dq_smem<HD> &sm = wg_smem<fw_dq_smem<HD>>(fa_raw);
    constexpr int P = HD / 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FW_T, hh = blockIdx.y, b = blockIdx.z, grp = hh / (nh / kvh);
    const int nq = min((int)FW_T, T - i0), qs = nh * HD, kd = kvh * HD;
    const int kend = i0 + nq, ntiles = (kend + FW_T - 1) / FW_T;
    const int row = i0 + warp * 16 + g; /* the thread's first query (second: + 8) */
    const __nv_bfloat16 *kh = k + (int64_t)b * T * kd + (int64_t)grp * HD, *vh = v + (int64_t)b * T * kd + (int64_t)grp * HD;
    const int64_t qrow = ((int64_t)b * T + i0) * qs + (int64_t)hh * HD;

    wg_load_tile<FW_T, HD, 128>(sm.q, q + qrow, qs, nq);
    wg_load_tile<FW_T, HD, 128>(sm.dO, dO + qrow, qs, nq);
    wg_load_tile<FW_T, HD, 128>(sm.k[0], kh, kd, min((int)FW_T, kend));
    wg_load_tile<FW_T, HD, 128>(sm.v[0], vh, kd, min((int)FW_T, kend));
    mma_commit();
    for (int i = threadIdx.x; i < FW_T; i += 128) {
        const int64_t li = ((int64_t)b * nh + hh) * T + i0 + i;
        sm.lse2[i] = i < nq ? lse[li] * 1.44269504088896341f : 0.0f;
        sm.D[i] = i < nq ? D[li] : 0.0f;
    }
    float dqa[P][32];
#pragma unroll
    for (int pn = 0; pn < P; pn++)
#pragma unroll
        for (int i = 0; i < 32; i++) dqa[pn][i] = 0.0f;
    float lr[2] = {0.0f, 0.0f}, Dr[2] = {0.0f, 0.0f};
    const uint32_t q_s = mma_smem(sm.q), o_s = mma_smem(sm.dO);
    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = kt & 1, k0 = kt * FW_T;
        mma_wait<0>();
        wg_fence_smem();
        __syncthreads(); /* this key tile (and, first time, q, dO, lse, D) landed; the other buffers are free */
        if (kt == 0)
#pragma unroll
            for (int r = 0; r < 2; r++) lr[r] = sm.lse2[row - i0 + 8 * r], Dr[r] = sm.D[row - i0 + 8 * r];
        const uint32_t k_s = mma_smem(sm.k[buf]), v_s = mma_smem(sm.v[buf]);
        float s[32], dp[32];
        wg_fence();
        fw_abt<HD>(s, q_s, k_s);
        fw_abt<HD>(dp, o_s, v_s);
        wg_commit();
        if (kt + 1 < ntiles) { /* into buffers whose products are done */
            const int k1 = k0 + FW_T;
            wg_load_tile<FW_T, HD, 128>(sm.k[buf ^ 1], kh + (int64_t)k1 * kd, kd, min((int)FW_T, kend - k1));
            wg_load_tile<FW_T, HD, 128>(sm.v[buf ^ 1], vh + (int64_t)k1 * kd, kd, min((int)FW_T, kend - k1));
            mma_commit();
        }
        wg_wait<0>();
        wg_hold(s);
        wg_hold(dp);
        const bool diag = k0 + FW_T > i0; /* the tile reaches past the first query: keys after queries masked */
#pragma unroll
        for (int t = 0; t < 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = k0 + 8 * t + 2 * t4 + (e & 1), r = e >> 1;
                float p = fw_exp2(s[4 * t + e] * scale_log2 - lr[r]);
                if (diag && col > row + 8 * r) p = 0.0f;
                s[4 * t + e] = p * (dp[4 * t + e] - Dr[r]); /* dS */
            }
        uint32_t da[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            mma_c2a(da[kk], &s[8 * kk], &s[8 * kk + 4]);
            wg_hold(da[kk]);
        }
        wg_fence();
        fw_fb<HD>(dqa, da, k_s);
        fw_wait(dqa);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = warp * 16 + g + 8 * r;
        if (i >= nq) continue;
        float *dst = dq + ((int64_t)b * T + i0 + i) * qs + (int64_t)hh * HD + 2 * t4;
#pragma unroll
        for (int pn = 0; pn < P; pn++)
#pragma unroll
            for (int t = 0; t < 8; t++) {
                const int e = 4 * t + 2 * r;
                *reinterpret_cast<float2 *>(dst + pn * 64 + 8 * t) = make_float2(dqa[pn][e] * scale, dqa[pn][e + 1] * scale);
            }
    }
#endif
}
