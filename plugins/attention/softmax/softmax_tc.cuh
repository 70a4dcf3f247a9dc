/* The softmax-attention kernels on tensor cores (BF16 compute, head_dim 64 or 128: forward, and backward's
 * D = rowsum(dO * O), dk dv, dq) with their host launchers, shared by the plugin (softmax.cu) and the
 * stand-alone benchmark (bench/bench_softmax.cu). Layouts are the plugin's: q, att (B, T, nh*hd) and k, v
 * (B, T, kvh*hd) in bf16, lse and D (B, nh, T) f32, dO, dq, dk, dv f32 in the q / k layouts. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <math.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

/* ---- device helpers ------------------------------------------------------------------------ */

__device__ __forceinline__ float ld(const float *p) { return *p; }
__device__ __forceinline__ float ld(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float *p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16 *p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* D[b, h, t] = sum_d dO * O over one head's row (backward's softmax correction); one warp per row. */
template <typename TA>
/* round_dO: the tensor-core backward multiplies bf16-rounded dO into dP = dO V^T; D = rowsum(dO * O)
 * must use the same rounded dO, or dS = P (dP - D) keeps a rounding residue where the true value is 0
 * (e.g. a single key: P = 1, O = V, dS = 0 exactly). */
__global__ static void rowdot_kernel(float *D, const float *dO, const TA *O, int B, int T, int nh, int hd,
                                     int round_dO) {
    const int64_t rows = (int64_t)B * T * nh;
    const int lane = threadIdx.x % 32;
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; r < rows;
         r += (int64_t)gridDim.x * blockDim.x / 32) {
        const int64_t bt = r / nh, hh = r % nh, b = bt / T, t = bt % T; /* r indexes (b, t, h) rows */
        const float *x = dO + r * hd;
        const TA *y = O + r * hd;
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32)
            s += (round_dO ? __bfloat162float(__float2bfloat16_rn(x[d])) : x[d]) * ld(y + d);
        s = warp_sum(s);
        if (lane == 0) D[(b * nh + hh) * T + t] = s;
    }
}

/* ---- tensor-core attention (BF16 compute, head_dim 64 or 128) ------------------------------ */

/* WMMA 16x16x16 bf16 fragments with f32 accumulators. Tiles of TC_TB query rows and TC_TB keys;
 * each of the 4 warps owns 16 rows of the block's tile. The accumulator's element layout is
 * opaque, so each warp probes it once: it loads a 16x16 matrix holding r*16+c and reads which
 * (row, col) each of its elements holds. Elementwise work on scores (masking, exp, dS) then runs
 * in registers; only the forward's row max/sum go through shared memory. P and dS are rounded to
 * bf16 before their GEMMs (as flash attention does). */
#define TC_TB 64
#define TC_THREADS 128
#define TC_WARPS (TC_THREADS / 32)
#define TC_SLD 68 /* f32 score rows: a multiple of 4 (WMMA), 4 banks of skew per row */
#define TC_PLD 72 /* bf16 P / dS rows: a multiple of 8 (WMMA), 16 bytes of skew per row */
static_assert(TC_TB == 16 * TC_WARPS, "a warp owns 16 rows of a tile");

namespace tcw = nvcuda::wmma;
typedef tcw::fragment<tcw::matrix_a, 16, 16, 16, bf16, tcw::row_major> FragA;
typedef tcw::fragment<tcw::matrix_b, 16, 16, 16, bf16, tcw::col_major> FragBt; /* B = X^T, X row-major */
typedef tcw::fragment<tcw::matrix_b, 16, 16, 16, bf16, tcw::row_major> FragB;
typedef tcw::fragment<tcw::accumulator, 16, 16, 16, float> FragC;
#define TC_NE FragC::num_elements

/* Row stride (elements) of a bf16 tile of hd columns: 16 bytes of skew so that the 8-row
 * fragment loads hit distinct banks. */
__host__ __device__ constexpr int tc_ld(int hd) { return hd + 8; }

/* TC_TB rows of hd bf16 from src (row stride in elements), rows >= n zero; 16-byte vectors. */
template <int HD>
__device__ __forceinline__ void tc_load_rows(bf16 *dst, const bf16 *src, int64_t stride, int n) {
    constexpr int V = HD / 8, LD = tc_ld(HD);
    for (int e = threadIdx.x; e < TC_TB * V; e += TC_THREADS) {
        const int r = e / V, c = (e % V) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r < n) x = *reinterpret_cast<const uint4 *>(src + r * stride + c);
        *reinterpret_cast<uint4 *>(dst + r * LD + c) = x;
    }
}

/* The same from f32 rows, rounded to bf16. */
template <int HD>
__device__ __forceinline__ void tc_load_rows(bf16 *dst, const float *src, int64_t stride, int n) {
    constexpr int V = HD / 8, LD = tc_ld(HD);
    for (int e = threadIdx.x; e < TC_TB * V; e += TC_THREADS) {
        const int r = e / V, c = (e % V) * 8;
        float4 x0 = make_float4(0.f, 0.f, 0.f, 0.f), x1 = x0;
        if (r < n) {
            const float4 *p = reinterpret_cast<const float4 *>(src + r * stride + c);
            x0 = p[0], x1 = p[1];
        }
        __nv_bfloat162 y[4] = {__floats2bfloat162_rn(x0.x, x0.y), __floats2bfloat162_rn(x0.z, x0.w),
                               __floats2bfloat162_rn(x1.x, x1.y), __floats2bfloat162_rn(x1.z, x1.w)};
        *reinterpret_cast<uint4 *>(dst + r * LD + c) = *reinterpret_cast<const uint4 *>(y);
    }
}

/* Which (row*16 + col) each accumulator element of this lane holds (probe: 256 floats r*16+c,
 * filled by the block before a __syncthreads). */
__device__ __forceinline__ void tc_probe(int pos[TC_NE], const float *probe) {
    FragC t;
    tcw::load_matrix_sync(t, probe, 16, tcw::mem_row_major);
#pragma unroll
    for (int e = 0; e < TC_NE; e++) pos[e] = (int)t.x[e];
}

/* Write a warp's 16x16 accumulator (times mul) to rows row0.. (< nrows valid) of a global array
 * (row stride ld) through the warp's 1 KB staging area. */
template <typename TO>
__device__ __forceinline__ void tc_store_tile(TO *dst, int64_t ld, int nrows, const FragC &f, float *stage,
                                              float mul) {
    const int lane = threadIdx.x % 32;
    __syncwarp();
    tcw::store_matrix_sync(stage, f, 16, tcw::mem_row_major);
    __syncwarp();
#pragma unroll
    for (int t = 0; t < 8; t++) {
        const int e = lane + 32 * t, r = e >> 4, c = e & 15;
        if (r < nrows) st(dst + r * ld + c, stage[e] * mul);
    }
    __syncwarp();
}

static inline size_t tc_fwd_smem(int hd) {
    return (size_t)3 * TC_TB * tc_ld(hd) * sizeof(bf16) + (size_t)TC_WARPS * 16 * TC_SLD * sizeof(float) +
           (size_t)TC_WARPS * 16 * TC_PLD * sizeof(bf16) + 256 * sizeof(float) + 2 * TC_TB * sizeof(float);
}

/* Forward, block (query tile, head y, sequence z), query tiles in reverse so that the long causal
 * rows start first. Same contract as attn_fwd_kernel (kb, vb, strides, pos0, lse may be NULL).
 * Per key tile a warp computes its S = Q K^T (16 x 64) on tensor cores, stores it to shared
 * memory, two lanes per row do the masked online softmax in log2 units (P as bf16, per-row rescale
 * c), and O (registers) is rescaled and accumulates P V. */
template <int HD>
__global__ static void __launch_bounds__(TC_THREADS)
    tc_fwd_kernel(const bf16 *q, const bf16 *kb, const bf16 *vb, int64_t kb_stride, int64_t kg_stride, int ks,
                  bf16 *att, float *lse, int T, int nh, int rep, int64_t pos0, float scale_log2) {
    constexpr int LD = tc_ld(HD), NF = HD / 16;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16 *Qs = (bf16 *)tc_smem, *Ks = Qs + TC_TB * LD, *Vs = Ks + TC_TB * LD;
    float *Sall = (float *)(Vs + TC_TB * LD);
    bf16 *Pall = (bf16 *)(Sall + TC_WARPS * 16 * TC_SLD);
    float *probe = (float *)(Pall + TC_WARPS * 16 * TC_PLD), *crow = probe + 256, *lrow = crow + TC_TB;
    const int tid = threadIdx.x, lane = tid % 32, w = tid / 32;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * TC_TB, hh = blockIdx.y, b = blockIdx.z, g = hh / rep;
    const int nq = min(TC_TB, T - i0), qs = nh * HD;
    const bf16 *qb = q + ((int64_t)b * T + i0) * qs + (int64_t)hh * HD;
    const bf16 *kh = kb + b * kb_stride + g * kg_stride, *vh = vb + b * kb_stride + g * kg_stride;
    float *Sw = Sall + w * 16 * TC_SLD, *cw = crow + w * 16, *lw = lrow + w * 16;
    bf16 *Pw = Pall + w * 16 * TC_PLD;

    tc_load_rows<HD>(Qs, qb, qs, nq);
    for (int e = tid; e < 256; e += TC_THREADS) probe[e] = (float)e;
    __syncthreads();
    int pos[TC_NE];
    tc_probe(pos, probe);
    FragA fq[NF];
    FragC fo[NF];
#pragma unroll
    for (int n = 0; n < NF; n++) {
        tcw::load_matrix_sync(fq[n], Qs + w * 16 * LD + n * 16, LD);
        tcw::fill_fragment(fo[n], 0.0f);
    }

    const int r = lane >> 1, hf = lane & 1; /* lanes 2r, 2r+1 own row r of the warp's 16 */
    const bool rvalid = w * 16 + r < nq;
    const int64_t qpos = pos0 + i0 + w * 16 + r;
    const int64_t wlast = pos0 + i0 + w * 16 + 15; /* the warp's last query position */
    const int64_t kend = pos0 + i0 + nq;           /* keys 0..kend-1 are visible to some row */
    float m = -INFINITY, l = 0.0f;                 /* row max (log2 units) and sum */
    for (int64_t k0 = 0; k0 < kend; k0 += TC_TB) {
        const int nk = (int)min((int64_t)TC_TB, kend - k0);
        __syncthreads(); /* the previous tile's Ks, Vs are consumed */
        tc_load_rows<HD>(Ks, kh + k0 * ks, ks, nk);
        tc_load_rows<HD>(Vs, vh + k0 * ks, ks, nk);
        __syncthreads();
        if (k0 > wlast) continue; /* warp-uniform: no row of this warp sees the tile */
        FragC fs[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            tcw::fill_fragment(fs[j], 0.0f);
#pragma unroll
            for (int d = 0; d < NF; d++) {
                FragBt kf;
                tcw::load_matrix_sync(kf, Ks + j * 16 * LD + d * 16, LD);
                tcw::mma_sync(fs[j], fq[d], kf, fs[j]);
            }
            tcw::store_matrix_sync(Sw + j * 16, fs[j], TC_SLD, tcw::mem_row_major);
        }
        __syncwarp();
        float s[32], mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 32; jj++) {
            const int col = 2 * jj + hf;
            const bool valid = rvalid && col < nk && k0 + col <= qpos;
            s[jj] = valid ? Sw[r * TC_SLD + col] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, s[jj]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float mnew = fmaxf(m, mx);
        float sum = 0.0f;
#pragma unroll
        for (int jj = 0; jj < 32; jj++) {
            /* a valid s is finite and <= mnew: no inf - inf */
            const float p = s[jj] == -INFINITY ? 0.0f : exp2f(s[jj] - mnew);
            Pw[r * TC_PLD + 2 * jj + hf] = __float2bfloat16(p);
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        const float c = m == -INFINITY ? 0.0f : exp2f(m - mnew);
        l = l * c + sum;
        m = mnew;
        if (hf == 0) cw[r] = c;
        __syncwarp();
#pragma unroll
        for (int n = 0; n < NF; n++)
#pragma unroll
            for (int e = 0; e < TC_NE; e++) fo[n].x[e] *= cw[pos[e] >> 4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            FragA pf;
            tcw::load_matrix_sync(pf, Pw + kk * 16, TC_PLD);
#pragma unroll
            for (int n = 0; n < NF; n++) {
                FragB vf;
                tcw::load_matrix_sync(vf, Vs + kk * 16 * LD + n * 16, LD);
                tcw::mma_sync(fo[n], pf, vf, fo[n]);
            }
        }
        __syncwarp(); /* Sw, Pw, cw are rewritten by the next tile */
    }
    if (hf == 0) lw[r] = l;
    __syncwarp();
    bf16 *ob = att + ((int64_t)b * T + i0 + w * 16) * qs + (int64_t)hh * HD;
    const int nrows = nq - w * 16;
#pragma unroll
    for (int n = 0; n < NF; n++) {
#pragma unroll
        for (int e = 0; e < TC_NE; e++) {
            const float lv = lw[pos[e] >> 4];
            fo[n].x[e] = lv > 0.0f ? fo[n].x[e] / lv : 0.0f; /* rows past T have l = 0 */
        }
        if (nrows > 0) tc_store_tile(ob + n * 16, qs, nrows, fo[n], Sw, 1.0f);
    }
    if (lse && hf == 0 && rvalid)
        lse[((int64_t)b * nh + hh) * T + i0 + w * 16 + r] = (m + log2f(l)) * 0.69314718055994531f;
}

/* Backward: four bf16 tiles (K, V, Q, dO) and per warp ntiles 16-row bf16 tiles (P^T and dS^T for
 * dk/dv, dS for dq), the probe, lse and D. */
static inline size_t tc_bwd_smem(int hd, int ntiles) {
    return (size_t)4 * TC_TB * tc_ld(hd) * sizeof(bf16) + (size_t)ntiles * TC_WARPS * 16 * TC_PLD * sizeof(bf16) +
           256 * sizeof(float) + 2 * TC_TB * sizeof(float);
}

/* Loads a query tile for backward: q rows, dO rows (f32 -> bf16), lse in log2 units and D. */
template <int HD>
__device__ __forceinline__ void tc_load_q_tile(bf16 *Qs, bf16 *dOs, float *lq, float *Dq, const bf16 *q,
                                               const float *dO, const float *lse, const float *D, int64_t b, int hh,
                                               int nh, int T, int i0, int nq) {
    const int qs = nh * HD;
    const int64_t qrow0 = (b * T + i0) * qs + (int64_t)hh * HD;
    tc_load_rows<HD>(Qs, q + qrow0, qs, nq);
    tc_load_rows<HD>(dOs, dO + qrow0, qs, nq);
    for (int i = threadIdx.x; i < TC_TB; i += TC_THREADS) {
        const int64_t li = (b * nh + hh) * T + i0 + i;
        lq[i] = i < nq ? lse[li] * 1.44269504088896341f : 0.0f;
        Dq[i] = i < nq ? D[li] : 0.0f;
    }
}

/* dk, dv of key tile x of KV head y, sequence z (FlashAttention-2 order), summed over the group's
 * query heads and the query tiles at or after the key tile. A warp owns 16 keys: S^T = K Q^T and
 * dP^T = V dO^T (16 x 16 per step) on tensor cores, P^T and dS^T = P^T (dP^T - D) elementwise in
 * registers, then dV += P^T dO and dK += dS^T Q from bf16 copies in shared memory. Written. */
template <int HD>
__global__ static void __launch_bounds__(TC_THREADS)
    tc_bwd_kv_kernel(const bf16 *q, const bf16 *k, const bf16 *v, const float *dO, const float *lse, const float *D,
                     float *dk, float *dv, int T, int nh, int kvh, float scale, float scale_log2) {
    constexpr int LD = tc_ld(HD), NF = HD / 16;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16 *Ks = (bf16 *)tc_smem, *Vs = Ks + TC_TB * LD, *Qs = Vs + TC_TB * LD, *dOs = Qs + TC_TB * LD;
    bf16 *Pall = dOs + TC_TB * LD, *dSall = Pall + TC_WARPS * 16 * TC_PLD;
    float *probe = (float *)(dSall + TC_WARPS * 16 * TC_PLD), *lq = probe + 256, *Dq = lq + TC_TB;
    const int tid = threadIdx.x, w = tid / 32;
    const int k0 = blockIdx.x * TC_TB, g = blockIdx.y, b = blockIdx.z, rep = nh / kvh;
    const int nk = min(TC_TB, T - k0), kd = kvh * HD;
    const int kw0 = k0 + w * 16; /* the warp's first key */
    bf16 *Pw = Pall + w * 16 * TC_PLD, *dSw = dSall + w * 16 * TC_PLD;
    const int64_t krow0 = ((int64_t)b * T + k0) * kd + (int64_t)g * HD;
    tc_load_rows<HD>(Ks, k + krow0, kd, nk);
    tc_load_rows<HD>(Vs, v + krow0, kd, nk);
    for (int e = tid; e < 256; e += TC_THREADS) probe[e] = (float)e;
    __syncthreads();
    int pos[TC_NE];
    tc_probe(pos, probe);
    FragC fdk[NF], fdv[NF];
#pragma unroll
    for (int n = 0; n < NF; n++) tcw::fill_fragment(fdk[n], 0.0f), tcw::fill_fragment(fdv[n], 0.0f);

    for (int r = 0; r < rep; r++) {
        const int hh = g * rep + r;
        for (int i0 = k0; i0 < T; i0 += TC_TB) { /* earlier queries cannot see these keys */
            const int nq = min(TC_TB, T - i0);
            __syncthreads(); /* the previous tile's Qs, dOs, lq, Dq are consumed */
            tc_load_q_tile<HD>(Qs, dOs, lq, Dq, q, dO, lse, D, b, hh, nh, T, i0, nq);
            __syncthreads();
            if (kw0 > i0 + nq - 1) continue; /* warp-uniform: every query of the tile precedes the warp's keys */
#pragma unroll 1
            for (int n = 0; n < 4; n++) { /* queries n*16.. of the tile */
                FragC fs, fp;
                tcw::fill_fragment(fs, 0.0f);
                tcw::fill_fragment(fp, 0.0f);
#pragma unroll
                for (int d = 0; d < NF; d++) {
                    FragA ka, va;
                    FragBt qt, ot;
                    tcw::load_matrix_sync(ka, Ks + w * 16 * LD + d * 16, LD);
                    tcw::load_matrix_sync(qt, Qs + n * 16 * LD + d * 16, LD);
                    tcw::mma_sync(fs, ka, qt, fs);
                    tcw::load_matrix_sync(va, Vs + w * 16 * LD + d * 16, LD);
                    tcw::load_matrix_sync(ot, dOs + n * 16 * LD + d * 16, LD);
                    tcw::mma_sync(fp, va, ot, fp);
                }
#pragma unroll
                for (int e = 0; e < TC_NE; e++) {
                    const int jr = pos[e] >> 4, ic = pos[e] & 15, qi = n * 16 + ic;
                    /* key kw0 + jr sees query i0 + qi if it is not later; qi < nq keeps both < T */
                    const bool valid = qi < nq && kw0 + jr <= i0 + qi;
                    const float p = valid ? exp2f(fs.x[e] * scale_log2 - lq[qi]) : 0.0f;
                    const float ds = p * (fp.x[e] - Dq[qi]);
                    Pw[jr * TC_PLD + qi] = __float2bfloat16(p);
                    dSw[jr * TC_PLD + qi] = __float2bfloat16(ds);
                }
            }
            __syncwarp();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                FragA pa, sa;
                tcw::load_matrix_sync(pa, Pw + kk * 16, TC_PLD);
                tcw::load_matrix_sync(sa, dSw + kk * 16, TC_PLD);
#pragma unroll
                for (int n = 0; n < NF; n++) {
                    FragB ob, qb;
                    tcw::load_matrix_sync(ob, dOs + kk * 16 * LD + n * 16, LD);
                    tcw::mma_sync(fdv[n], pa, ob, fdv[n]);
                    tcw::load_matrix_sync(qb, Qs + kk * 16 * LD + n * 16, LD);
                    tcw::mma_sync(fdk[n], sa, qb, fdk[n]);
                }
            }
            __syncwarp(); /* Pw, dSw are rewritten by the next tile */
        }
    }
    const int nrows = nk - w * 16;
    if (nrows <= 0) return; /* no __syncthreads follows */
    float *stage = (float *)Pw; /* 1 KB of the warp's 2.3 KB */
    const int64_t out0 = krow0 + (int64_t)w * 16 * kd;
#pragma unroll
    for (int n = 0; n < NF; n++) {
        tc_store_tile(dk + out0 + n * 16, kd, nrows, fdk[n], stage, scale);
        tc_store_tile(dv + out0 + n * 16, kd, nrows, fdv[n], stage, 1.0f);
    }
}

/* dq of query tile x (reverse order: long rows first), head y, sequence z: dQ = scale sum dS K
 * over the key tiles up to the diagonal. A warp owns 16 queries; S, dP, dS as in the dk/dv kernel,
 * dS (bf16) through shared memory into dQ += dS K. Written (B, T, nh*hd). */
template <int HD>
__global__ static void __launch_bounds__(TC_THREADS)
    tc_bwd_q_kernel(const bf16 *q, const bf16 *k, const bf16 *v, const float *dO, const float *lse, const float *D,
                    float *dq, int T, int nh, int kvh, float scale, float scale_log2) {
    constexpr int LD = tc_ld(HD), NF = HD / 16;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16 *Qs = (bf16 *)tc_smem, *dOs = Qs + TC_TB * LD, *Ks = dOs + TC_TB * LD, *Vs = Ks + TC_TB * LD;
    bf16 *dSall = Vs + TC_TB * LD;
    float *probe = (float *)(dSall + TC_WARPS * 16 * TC_PLD), *lq = probe + 256, *Dq = lq + TC_TB;
    const int tid = threadIdx.x, w = tid / 32;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * TC_TB, hh = blockIdx.y, b = blockIdx.z, g = hh / (nh / kvh);
    const int nq = min(TC_TB, T - i0), qs = nh * HD, kd = kvh * HD;
    const int qw0 = w * 16; /* the warp's first query within the tile */
    bf16 *dSw = dSall + w * 16 * TC_PLD;
    tc_load_q_tile<HD>(Qs, dOs, lq, Dq, q, dO, lse, D, b, hh, nh, T, i0, nq);
    for (int e = tid; e < 256; e += TC_THREADS) probe[e] = (float)e;
    __syncthreads();
    int pos[TC_NE];
    tc_probe(pos, probe);
    FragC fdq[NF];
#pragma unroll
    for (int n = 0; n < NF; n++) tcw::fill_fragment(fdq[n], 0.0f);
    const int kend = i0 + nq;
    for (int k0 = 0; k0 < kend; k0 += TC_TB) {
        const int nk = min(TC_TB, kend - k0);
        const int64_t krow0 = ((int64_t)b * T + k0) * kd + (int64_t)g * HD;
        __syncthreads(); /* the previous tile's Ks, Vs are consumed */
        tc_load_rows<HD>(Ks, k + krow0, kd, nk);
        tc_load_rows<HD>(Vs, v + krow0, kd, nk);
        __syncthreads();
        if (k0 > i0 + qw0 + 15) continue; /* warp-uniform: no query of this warp sees the tile */
#pragma unroll
        for (int n = 0; n < 4; n++) { /* keys n*16.. of the tile */
            FragC fs, fp;
            tcw::fill_fragment(fs, 0.0f);
            tcw::fill_fragment(fp, 0.0f);
#pragma unroll
            for (int d = 0; d < NF; d++) {
                FragA qa, oa; /* reloaded rather than kept: registers hold dQ */
                FragBt kt, vt;
                tcw::load_matrix_sync(qa, Qs + qw0 * LD + d * 16, LD);
                tcw::load_matrix_sync(kt, Ks + n * 16 * LD + d * 16, LD);
                tcw::mma_sync(fs, qa, kt, fs);
                tcw::load_matrix_sync(oa, dOs + qw0 * LD + d * 16, LD);
                tcw::load_matrix_sync(vt, Vs + n * 16 * LD + d * 16, LD);
                tcw::mma_sync(fp, oa, vt, fp);
            }
#pragma unroll
            for (int e = 0; e < TC_NE; e++) {
                const int ir = pos[e] >> 4, jc = pos[e] & 15, qi = qw0 + ir, kj = n * 16 + jc;
                /* qi < nq keeps the query, and the key not after it, < T */
                const bool valid = qi < nq && k0 + kj <= i0 + qi;
                const float p = valid ? exp2f(fs.x[e] * scale_log2 - lq[qi]) : 0.0f;
                dSw[ir * TC_PLD + kj] = __float2bfloat16(p * (fp.x[e] - Dq[qi]));
            }
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            FragA sa;
            tcw::load_matrix_sync(sa, dSw + kk * 16, TC_PLD);
#pragma unroll
            for (int n = 0; n < NF; n++) {
                FragB kf;
                tcw::load_matrix_sync(kf, Ks + kk * 16 * LD + n * 16, LD);
                tcw::mma_sync(fdq[n], sa, kf, fdq[n]);
            }
        }
        __syncwarp(); /* dSw is rewritten by the next tile */
    }
    const int nrows = nq - qw0;
    if (nrows <= 0) return; /* no __syncthreads follows */
    float *stage = (float *)dSw;
    float *out = dq + ((int64_t)b * T + i0 + qw0) * qs + (int64_t)hh * HD;
#pragma unroll
    for (int n = 0; n < NF; n++) tc_store_tile(out + n * 16, qs, nrows, fdq[n], stage, scale);
}

/* ---- host launchers (attend_tc / attend_bwd_tc in softmax.cu, and bench/bench_softmax.cu) ---------- */

#define ROWDOT_THREADS 256 /* rowdot_kernel's block: 8 rows, one warp each */

/* Allows the tensor-core kernels of head_dim hd (64 or 128) their dynamic shared memory (above the
 * default 48 KB); once per device before they launch. On failure *bytes is the size refused. */
static inline cudaError_t tc_raise_smem(int hd, size_t *bytes) {
    const cudaFuncAttribute at = cudaFuncAttributeMaxDynamicSharedMemorySize;
    *bytes = 0;
    if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
    const size_t fs = tc_fwd_smem(hd), kvs = tc_bwd_smem(hd, 2), qs = tc_bwd_smem(hd, 1);
    cudaError_t e;
    *bytes = fs;
    e = hd == 64 ? cudaFuncSetAttribute(tc_fwd_kernel<64>, at, (int)fs)
                 : cudaFuncSetAttribute(tc_fwd_kernel<128>, at, (int)fs);
    if (e != cudaSuccess) return e;
    *bytes = kvs;
    e = hd == 64 ? cudaFuncSetAttribute(tc_bwd_kv_kernel<64>, at, (int)kvs)
                 : cudaFuncSetAttribute(tc_bwd_kv_kernel<128>, at, (int)kvs);
    if (e != cudaSuccess) return e;
    *bytes = qs;
    return hd == 64 ? cudaFuncSetAttribute(tc_bwd_q_kernel<64>, at, (int)qs)
                    : cudaFuncSetAttribute(tc_bwd_q_kernel<128>, at, (int)qs);
}

/* D (B, nh, T) = rowsum(dO * O) over the B*T*nh rows of hd, dO rounded to bf16 first if round_dO (the
 * tensor-core backward's operand, see rowdot_kernel). B, T, nh >= 1. */
template <typename TA>
static cudaError_t rowdot_launch(cudaStream_t s, float *D, const float *dO, const TA *O, int B, int T, int nh, int hd,
                                 int round_dO) {
    const int64_t rows = (int64_t)B * T * nh, g = (rows * 32 + ROWDOT_THREADS - 1) / ROWDOT_THREADS;
    rowdot_kernel<TA><<<(int)(g > 65535 * 8 ? 65535 * 8 : g), ROWDOT_THREADS, 0, s>>>(D, dO, O, B, T, nh, hd,
                                                                                      round_dO);
    return cudaGetLastError();
}

/* The tensor-core forward: att (B, T, nh*hd) bf16 and lse (B, nh, T) f32 (lse may be NULL) for queries
 * q (B, T, nh*hd) at positions pos0 + i, attending causally to the keys and values of KV head g = h / rep
 * at kb + b*kb_stride + g*kg_stride, row stride ks: the layer's k, v (B, T, kvh*hd) are kb_stride =
 * T*kvh*hd, kg_stride = hd, ks = kvh*hd (a KV cache (B, kvh, max_len, hd): kvh*max_len*hd, max_len*hd,
 * hd). Needs hd 64 or 128, 16-byte aligned operands, strides that are multiples of 8, tc_raise_smem. */
static inline cudaError_t tc_attend_fwd(cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v,
                                        int64_t kb_stride, int64_t kg_stride, int ks, bf16 *att, float *lse, int B,
                                        int T, int nh, int rep, int hd, int64_t pos0) {
    if (B <= 0 || T <= 0) return cudaSuccess;
    if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
    const dim3 grid((T + TC_TB - 1) / TC_TB, nh, B);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    const size_t sm = tc_fwd_smem(hd);
    if (hd == 64)
        tc_fwd_kernel<64><<<grid, TC_THREADS, sm, s>>>(q, k, v, kb_stride, kg_stride, ks, att, lse, T, nh, rep, pos0,
                                                       scale_log2);
    else
        tc_fwd_kernel<128><<<grid, TC_THREADS, sm, s>>>(q, k, v, kb_stride, kg_stride, ks, att, lse, T, nh, rep, pos0,
                                                        scale_log2);
    return cudaGetLastError();
}

/* The tensor-core backward of the layer's causal attention (pos0 = 0): D = rowsum(dO * att) (dO rounded
 * to bf16 as the kernels read it), then dk, dv (B, T, kvh*hd) and dq (B, T, nh*hd) in f32, written (not
 * accumulated). q, att (B, T, nh*hd) and k, v (B, T, kvh*hd) bf16 and lse (B, nh, T) from the forward,
 * dO (B, T, nh*hd) f32, D (B, nh, T) f32 scratch. Needs what tc_attend_fwd needs (dO 16-byte aligned
 * too) and nh a multiple of kvh. On failure *what names the launch that failed. */
static inline cudaError_t tc_attend_bwd(cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *att,
                                        const float *dO, const float *lse, float *D, float *dq, float *dk, float *dv,
                                        int B, int T, int nh, int kvh, int hd, const char **what) {
    *what = "attention backward (tensor cores)";
    if (B <= 0 || T <= 0) return cudaSuccess;
    if ((hd != 64 && hd != 128) || kvh <= 0 || nh % kvh) return cudaErrorInvalidValue;
    const dim3 gkv((T + TC_TB - 1) / TC_TB, kvh, B), gq((T + TC_TB - 1) / TC_TB, nh, B);
    const float scale = 1.0f / sqrtf((float)hd), scale_log2 = 1.4426950408889634f * scale;
    const size_t kvs = tc_bwd_smem(hd, 2), qs = tc_bwd_smem(hd, 1);
    *what = "rowdot";
    cudaError_t e = rowdot_launch<bf16>(s, D, dO, att, B, T, nh, hd, 1);
    if (e != cudaSuccess) return e;
    *what = "attention backward dk dv (tensor cores)";
    if (hd == 64)
        tc_bwd_kv_kernel<64><<<gkv, TC_THREADS, kvs, s>>>(q, k, v, dO, lse, D, dk, dv, T, nh, kvh, scale, scale_log2);
    else
        tc_bwd_kv_kernel<128><<<gkv, TC_THREADS, kvs, s>>>(q, k, v, dO, lse, D, dk, dv, T, nh, kvh, scale, scale_log2);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    *what = "attention backward dq (tensor cores)";
    if (hd == 64)
        tc_bwd_q_kernel<64><<<gq, TC_THREADS, qs, s>>>(q, k, v, dO, lse, D, dq, T, nh, kvh, scale, scale_log2);
    else
        tc_bwd_q_kernel<128><<<gq, TC_THREADS, qs, s>>>(q, k, v, dO, lse, D, dq, T, nh, kvh, scale, scale_log2);
    return cudaGetLastError();
}
