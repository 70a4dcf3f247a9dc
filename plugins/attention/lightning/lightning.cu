/* lightning on CUDA: the same layer as lightning.c (MODEL.md "Lightning attention") with every buffer on
 * the GPU. Two paths (setting `kernel`):
 *   fused (BF16 at head_dim 64 and 128, the default there): the attention is lightning_core.cuh's fused
 *     kernels (forward O = core(Q, K, V); backward dQ, dK, dV as three more passes, written in bf16 for
 *     SiLU's backward); the qkv and gate projections are one GEMM each way ([pre | g] in rows of 4D:
 *     ld_pre); training keeps SiLU(q, k, v) head-major, O, the bf16 input (unless the core keeps it:
 *     lp_inputs) and the gated output for backward, and the norm's weight gradient is summed in its backward kernel (fixed order);
 *   blocked (F32, other head sizes, or asked for): the chunked form, per-block products as
 *     strided-batched cuBLAS GEMMs over every (sequence, head, block) at once (bf16 tensor cores with f32
 *     accumulation for BF16, plain FP32 for F32), a prefix scan over blocks for the f32 KV state, fused
 *     element-wise kernels between.
 * A forward with training = 0 works in scratch on either path: every activation is backward_only. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <m1c/cuda/pdl.cuh>
#include <m1c/cuda/sums.cuh>

#include <m1c/cuda/vec.cuh>
#include "lightning_core.cuh"
#include "m1c/plugin.h"

/* Shared with lightning.c, which declares an identical struct: keep the two in step. */
typedef struct lightning_cuda_cfg {
    const m1c_host *h;
    int H, nh, hd, D, bs;
    float eps;
    int bf16;        /* compute dtype M1C_BF16 */
    const float *pw; /* device [nh][bs + 1]: pw[h][k] = exp(-s_h k), the CPU's table copied */
    int fused;       /* the fused kernels of lightning_core.cuh (bf16, hd 64 or 128), else block GEMMs */
    const float *slope; /* device [nh]: s_h */
    int slots;          /* fused: the output pass's resident CTAs on the device (lc_slots) */
    int core_kernel;    /* fused: the output pass's kernel on the device (lc_problem.kernel), chosen once */
    int lp_inputs;      /* bf16: the core hands in_lp and dout_lp (m1c_layer_info.lp_inputs), so training keeps
                         * no bf16 copy of in (A_XLP holds one element) */
} lightning_cuda_cfg;

/* Indices of lightning.c's declarations (params and acts are the same lists on both devices; the last
 * three acts hold one element except with the fused kernels, which keep the gate's pre-activation in
 * qkv_pre and declare gate_pre as one element: ld_pre). */
enum { P_QKV, P_GATE, P_NORM, P_OUT };
enum { A_QKV, A_GATE, A_O, A_RSTD, A_KV, A_QKVH, A_XLP, A_Y };
/* Scratch on CUDA (A: the compute dtype, f32 or bf16): qkv pre-activations (inference) / d qkv pre
 * (backward), on the fused path with the gate's beside them (ld_pre); y / d gate pre (backward, blocked);
 * dy of the norm in f32 (backward; the gate pre-activation as A when not training, blocked); bf16 copies
 * of the layer input or dout (BF16 only); seven head-major (B*nh, Tp, hd) arrays of A (Tp: T rounded up
 * to whole blocks, zero padded): forward Q K V, Q decayed from its block's start, K decayed to its block's
 * end; backward Q K V, K and V decayed to the block's end, dO and dO decayed from the block's start; three
 * head-major f32 arrays: O (forward), dQ dK dV (backward); per-block score matrices S and P as A; per-block
 * hd x hd f32 states: local KV (forward) or d KV (backward), the states at block starts when not training;
 * bf16 copies of the block-start states and of d KV (BF16 only); per-chunk partial sums of the norm
 * weight's gradient. */
enum {
    X_QKV, X_Y, X_DO, X_LP,
    X_HA0, X_HA1, X_HA2, X_HA3, X_HA4, X_HA5, X_HA6,
    X_HF0, X_HF1, X_HF2,
    X_S, X_P, X_KV, X_KVS, X_KVLP, X_GLP, X_DWP, X_WS, N_X
};
/* The fused kernels (bf16, Tp = T: no padding) use of the attention arrays only X_HA0..2 and X_HA5, as
 * bf16: Q K V and O when not training (training keeps them in the activations), dQ dK dV and dO in
 * backward; and the segment-state workspace X_WS (long sequences, lightning_core.cuh). */
/* Token chunks of the norm weight's gradient: partial sums per chunk, then added in chunk order. NDW for
 * the separate pass (k_norm_dw); the fused path's norm backward sums in up to NG_CHUNKS chunks. */
enum { NDW = 64 };

typedef __nv_bfloat16 bf16;

/* ---- element access in either dtype, single or 8 at a time --------------------------------------- */

__device__ static inline float ld(const float *p, int64_t i) { return p[i]; }
__device__ static inline float ld(const bf16 *p, int64_t i) { return __bfloat162float(p[i]); }

/* V consecutive values (vec_ld, vec_st: m1c/cuda/vec.cuh); V == 8 needs p 16-byte aligned for bf16,
 * 32 for f32: every caller's offsets are multiples of 8 elements of 64-byte aligned buffers when it picks
 * V = 8. */

/* v as stored in A (rounded to bf16 and back for bf16). */
__device__ static inline float rnd(float v, const float *) { return v; }
__device__ static inline float rnd(float v, const bf16 *) { return __bfloat162float(__float2bfloat16(v)); }

/* sigmoid through e = exp(-|x|) <= 1: no overflow, full relative accuracy for x < 0 (as on the CPU). The
 * fast exponential and division (ex2.approx, a reciprocal: ~2e-7 relative each below |x| ~ 10, ~1e-6 at 30,
 * before any bf16 rounding of 2^-9) instead of expf and IEEE division, ~20 instructions fewer: the SiLU
 * and norm-gate passes call it once or twice an element, and the norm-gate backward was bound by issue. */
__device__ static inline float sigm(float x) {
    const float e = __expf(-fabsf(x)), s = __fdividef(1.0f, 1.0f + e);
    return x >= 0.0f ? s : e * s;
}

#define GRID_STRIDE(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static const int THREADS = 256;

static int grid_for(int64_t n) {
    int64_t g = (n + THREADS - 1) / THREADS;
    return (int)(g > (1 << 20) ? (1 << 20) : (g < 1 ? 1 : g));
}

/* Sum over a block of `v` (blockDim.x a multiple of 32); every thread gets the result. */
__device__ static float block_sum(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads(); /* the previous call's readers are done with `shared` */
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ---- kernels ----------------------------------------------------------------------------------------- */

/* Row position within the block structure: t in [0, Tp) -> row i of block blk holding m real rows. */
struct rowpos {
    int i, m;
};
__device__ static inline rowpos row_of(int t, int T, int eb) {
    const int blk = t / eb;
    rowpos r;
    r.i = t - blk * eb;
    r.m = T - blk * eb < eb ? T - blk * eb : eb;
    return r;
}

/* Division by a divisor fixed for a launch, as a multiply and a shift (Granlund and Montgomery): for
 * 1 <= d < 2^31, s = 31 + ceil(log2 d) and m = ceil(2^s / d) < 2^32, n / d = (n m) >> s for every n < 2^31
 * (n m / 2^s exceeds n / d by less than n / 2^s < 2^-ceil(log2 d) <= 1 / d, too little to reach the next
 * integer). A few integer instructions where a 64-bit division is a subroutine of a hundred and a 32-bit
 * one still costs three conversions and a reciprocal. */
typedef struct fastdiv {
    uint32_t m, s;
} fastdiv;

/* The constants for d (unused, zero, for d >= 2^31: the kernels divide in 64 bits then). */
static fastdiv fastdiv_of(int64_t d) {
    fastdiv f = {0, 0};
    if (d < 1 || d > INT32_MAX) return f;
    uint32_t l = 0;
    while (((int64_t)1 << l) < d) l++;
    f.s = 31 + l;
    f.m = (uint32_t)((((uint64_t)1 << f.s) + (uint64_t)d - 1) / (uint64_t)d);
    return f;
}

__device__ static inline uint32_t fastdiv_q(uint32_t n, fastdiv f) { return (uint32_t)(((uint64_t)n * f.m) >> f.s); }

/* Where column c of a token's row lies in a head-major (B*nh, T, hd) array, from its head 0 element (fhd
 * divides by hd). */
__device__ static inline int64_t hm_off(int c, int hd, fastdiv fhd, int T) {
    const int h = (int)fastdiv_q((uint32_t)c, fhd);
    return (int64_t)h * T * hd + (c - h * hd);
}

/* x / d for x >= 0: through f where every index of the launch is below 2^31 (SMALL), else in 64 bits. */
template <bool SMALL> __device__ static inline int64_t divq(int64_t x, int64_t d, fastdiv f) {
    if constexpr (SMALL) return fastdiv_q((uint32_t)x, f);
    else return x / d;
}

/* Q, K, V (B*nh, Tp, hd) = SiLU of the head's [q|k|v] columns of pre (N rows of ld: 3D, or 4D with the gate
 * pre-activation beside them on the fused path), rows t >= T zero; and, where
 * not NULL, the decayed copies used by the state products: Qd = Q * exp(-s (i+1)) (from the block's start
 * to the token), Kd, Vd = K, V * exp(-s (m-1-i)) (from the token to the block's end). Each copy is rounded
 * once from the f32 value. V columns per thread (hd % V == 0); n = elements / V; fhd, fTp, fnh divide by
 * hd, Tp and nh (fastdiv). */
template <typename A, int VW, bool SMALL>
__global__ static void k_gather_qkv(A *Q, A *K, A *Vv, A *Qd, A *Kd, A *Vd, const A *pre, int64_t ld, int T, int Tp,
                                    int nh, int hd, int eb, const float *pw, int bs, int64_t n, fastdiv fhd,
                                    fastdiv fTp, fastdiv fnh) {
    pdl_start();
    GRID_STRIDE(iv, n) {
        const int64_t i = iv * VW;
        const int64_t r = divq<SMALL>(i, hd, fhd);
        const int c = (int)(i - r * hd);
        const int64_t bh = divq<SMALL>(r, Tp, fTp);
        const int t = (int)(r - bh * Tp);
        const int64_t b = divq<SMALL>(bh, nh, fnh);
        const int h = (int)(bh - b * nh);
        float q[VW], k[VW], v[VW];
        if (t < T) {
            const int64_t base = (b * T + t) * ld + (int64_t)h * 3 * hd + c;
            vec_ld<VW>(q, pre + base), vec_ld<VW>(k, pre + base + hd), vec_ld<VW>(v, pre + base + 2 * hd);
#pragma unroll
            for (int j = 0; j < VW; j++) q[j] *= sigm(q[j]), k[j] *= sigm(k[j]), v[j] *= sigm(v[j]);
        } else {
#pragma unroll
            for (int j = 0; j < VW; j++) q[j] = k[j] = v[j] = 0.0f;
        }
        vec_st<VW>(Q + i, q), vec_st<VW>(K + i, k), vec_st<VW>(Vv + i, v);
        if (!Qd && !Kd && !Vd) continue; /* the fused path: no decayed copies, no block position */
        const rowpos rp = row_of(t, T, eb);
        const float *p = pw + (int64_t)h * (bs + 1);
        if (Qd) {
            const float f = p[rp.i + 1];
#pragma unroll
            for (int j = 0; j < VW; j++) q[j] *= f;
            vec_st<VW>(Qd + i, q);
        }
        const float fe = rp.i < rp.m ? p[rp.m - 1 - rp.i] : 0.0f; /* padding rows are zero already */
        if (Kd) {
#pragma unroll
            for (int j = 0; j < VW; j++) k[j] *= fe;
            vec_st<VW>(Kd + i, k);
        }
        if (Vd) {
#pragma unroll
            for (int j = 0; j < VW; j++) v[j] *= fe;
            vec_st<VW>(Vd + i, v);
        }
    }
}

/* d pre = d{q,k,v} * SiLU'(pre), SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))): the first 3D columns of
 * rows of ld (3D, or 4D beside the gate's on the fused path) of both; d{q,k,v} head-major, f32 (block
 * GEMMs) or bf16 (fused kernels). V columns per thread (hd % V == 0); n = N * 3D / V; fd3, fT, f3hd, fhd
 * divide by 3D, T, 3 hd and hd (fastdiv). */
template <typename A, int VW, typename DT, bool SMALL>
__global__ static void k_silu_backward(A *dpre, const A *pre, int64_t ld, const DT *dQ, const DT *dK, const DT *dV,
                                       int T, int Tp, int nh, int hd, int64_t n, fastdiv fd3, fastdiv fT, fastdiv f3hd,
                                       fastdiv fhd) {
    pdl_start();
    const int64_t D3 = 3 * (int64_t)nh * hd, hd3 = 3 * (int64_t)hd;
    GRID_STRIDE(iv, n) {
        const int64_t i = iv * VW;
        const int64_t row = divq<SMALL>(i, D3, fd3), col = i - row * D3;
        const int64_t b = divq<SMALL>(row, T, fT), t = row - b * T;
        const int64_t h = divq<SMALL>(col, hd3, f3hd), ch = col - h * hd3;
        const int64_t p = divq<SMALL>(ch, hd, fhd), c = ch - p * hd;
        const DT *src = p == 0 ? dQ : (p == 1 ? dK : dV);
        const int64_t at = row * ld + col;
        float d[VW], z[VW];
        vec_ld<VW>(d, src + ((b * nh + h) * Tp + t) * hd + c);
        vec_ld<VW>(z, pre + at);
#pragma unroll
        for (int j = 0; j < VW; j++) {
            const float s = sigm(z[j]);
            d[j] = d[j] * s * (1.0f + z[j] * (1.0f - s));
        }
        vec_st<VW>(dpre + at, d);
    }
}

/* S and P (if not NULL) (Z, eb, eb) *= the intra-block decay mask: exp(-s (i-j)) for j <= i, 0 above the
 * diagonal. V columns per thread (eb % V == 0); groups wholly above the diagonal are zeroed unread. */
template <typename A, int VW>
__global__ static void k_decay_mask(A *S, A *P, int eb, int nb, int nh, const float *pw, int bs, int64_t n) {
    GRID_STRIDE(iv, n) {
        const int64_t idx = iv * VW;
        const int j0 = (int)(idx % eb), i = (int)((idx / eb) % eb);
        const int64_t z = idx / ((int64_t)eb * eb);
        const int h = (int)((z / nb) % nh);
        const float *p = pw + (int64_t)h * (bs + 1);
        float f[VW], v[VW];
#pragma unroll
        for (int j = 0; j < VW; j++) f[j] = j0 + j <= i ? p[i - j0 - j] : 0.0f;
        if (j0 > i) {
            vec_st<VW>(S + idx, f);
            if (P) vec_st<VW>(P + idx, f);
            continue;
        }
        vec_ld<VW>(v, S + idx);
#pragma unroll
        for (int j = 0; j < VW; j++) v[j] *= f[j];
        vec_st<VW>(S + idx, v);
        if (P) {
            vec_ld<VW>(v, P + idx);
#pragma unroll
            for (int j = 0; j < VW; j++) v[j] *= f[j];
            vec_st<VW>(P + idx, v);
        }
    }
}

/* The state at every block start, one thread per (sequence, head, state element): KV_0 = the carried
 * state (or 0), KV_{n+1} = exp(-s m_n) KV_n + local_n. kvs receives KV_n (and lp, if not NULL, its bf16
 * copy for the tensor-core product); state (if not NULL) the state after the last block. */
__global__ static void k_scan_forward(float *kvs, bf16 *lp, const float *local, float *state, int fresh, int nb,
                                      int eb, int T, int nh, int hd2, const float *pw, int bs, int64_t n) {
    GRID_STRIDE(idx, n) {
        const int64_t bh = idx / hd2, e = idx % hd2;
        const float *p = pw + (bh % nh) * (bs + 1);
        float acc = state && !fresh ? state[idx] : 0.0f;
        for (int blk = 0; blk < nb; blk++) {
            const int64_t at = (bh * nb + blk) * hd2 + e;
            const int m = T - blk * eb < eb ? T - blk * eb : eb;
            kvs[at] = acc;
            if (lp) lp[at] = __float2bfloat16(acc);
            acc = p[m] * acc + local[at];
        }
        if (state) state[idx] = acc;
    }
}

/* In place, blocks in reverse: G_n (d loss / d state at the end of block n) from the local terms
 * Ghat_n = Q_n^T (dO_n * exp(-s (i+1))): G_{nb-1} = 0, G_{n-1} = Ghat_n + exp(-s eb) G_n (every block but
 * the last is full); lp (if not NULL) receives a bf16 copy of G. */
__global__ static void k_scan_backward(float *G, bf16 *lp, int nb, int eb, int nh, int hd2, const float *pw, int bs,
                                       int64_t n) {
    GRID_STRIDE(idx, n) {
        const int64_t bh = idx / hd2, e = idx % hd2;
        const float decay = pw[(bh % nh) * (bs + 1) + eb];
        float acc = 0.0f;
        for (int blk = nb - 1; blk >= 0; blk--) {
            const int64_t at = (bh * nb + blk) * hd2 + e;
            const float g = G[at];
            G[at] = acc;
            if (lp) lp[at] = __float2bfloat16(acc);
            acc = g + decay * acc;
        }
    }
}

/* Forward norm and gate straight from the head-major attention output O (B*nh, Tp, hd) (f32, or bf16 from
 * the fused kernels: rounding it there is the rounding to A done here), one block per
 * token: o = O rounded to A (stored when o is not NULL: the activation backward reads), rstd from the
 * rounded o (stored when rstd_out is not NULL), y = o * rstd * w * sigmoid(g), g in rows of ldg (D, or 4D
 * on the fused path). V columns per thread. For head sizes not a multiple of 8 and rows too wide for
 * k_norm_gate_heads_rows. */
template <typename A, int VW, typename OT>
__global__ static void k_norm_gate_heads(A *y, A *o, const OT *O, const A *g, int64_t ldg, const float *w,
                                         float *rstd_out, int N, int T, int Tp, int nh, int hd, float eps) {
    pdl_start();
    __shared__ float sh[32];
    const int D = nh * hd;
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const int64_t b = row / T, t = row % T;
        float ss = 0.0f;
        for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
            float v[VW];
            vec_ld<VW>(v, O + ((b * nh + c / hd) * Tp + t) * hd + c % hd);
#pragma unroll
            for (int j = 0; j < VW; j++) v[j] = rnd(v[j], y), ss += v[j] * v[j];
            if (o) vec_st<VW>(o + row * D + c, v);
        }
        ss = block_sum(ss, sh);
        const float rs = 1.0f / sqrtf(ss / (float)D + eps);
        if (rstd_out && threadIdx.x == 0) rstd_out[row] = rs;
        for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
            float v[VW], gv[VW], wv[VW];
            vec_ld<VW>(v, O + ((b * nh + c / hd) * Tp + t) * hd + c % hd); /* again: just read, from L2 */
            vec_ld<VW>(gv, g + row * ldg + c), vec_ld<VW>(wv, w + c);
#pragma unroll
            for (int j = 0; j < VW; j++) v[j] = rnd(v[j], y) * rs * wv[j] * sigm(gv[j]);
            vec_st<VW>(y + row * D + c, v);
        }
    }
}

/* 8 values as A stores them: bf16 stay packed, in half the registers of floats, until used. */
template <typename A> struct pack8 {
    float v[8];
};
template <> struct pack8<bf16> {
    uint4 u;
};
__device__ static inline void pack(pack8<float> &p, const float *v) {
#pragma unroll
    for (int j = 0; j < 8; j++) p.v[j] = v[j];
}
/* rounds to nearest even (exact for values that are bf16 already) */
__device__ static inline void pack(pack8<bf16> &p, const float *v) {
    p.u = make_uint4(vec_bf16x2(v[0], v[1]), vec_bf16x2(v[2], v[3]), vec_bf16x2(v[4], v[5]), vec_bf16x2(v[6], v[7]));
}
__device__ static inline void unpack(float *v, const pack8<float> &p) {
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = p.v[j];
}
__device__ static inline void unpack(float *v, const pack8<bf16> &p) {
    vec_unbf16x2(v, p.u.x), vec_unbf16x2(v + 2, p.u.y), vec_unbf16x2(v + 4, p.u.z), vec_unbf16x2(v + 6, p.u.w);
}
__device__ static inline void load(pack8<float> &p, const float *a) { vec_ld<8>(p.v, a); }
__device__ static inline void load(pack8<bf16> &p, const bf16 *a) { p.u = *reinterpret_cast<const uint4 *>(a); }

/* The same for rows of at most U * 256 columns and hd % 8 == 0 (16-byte aligned rows), one warp per row,
 * NH_ROWS rows per block: each lane takes up to U chunks of 8 columns 256 apart, all loaded before any is
 * used (the whole row in flight at once) and kept in registers as A (o rounded, g) until y; the sum of
 * squares over the lane's chunks in order, then a butterfly over the lanes (fixed: the same bits every
 * run). fhd divides by hd. U = 3 takes D = 768 in 64 registers (4 blocks an SM); U = 4 up to D = 1024. */
enum { NH_ROWS = 8 };

template <typename A, typename OT, int U>
__global__ static void __launch_bounds__(32 * NH_ROWS, sizeof(A) == 2 && U == 3 ? 4 : 1)
    k_norm_gate_heads_rows(A *y, A *o, const OT *O, const A *g, int64_t ldg, const float *w, float *rstd_out, int N,
                           int T, int Tp, int nh, int hd, fastdiv fhd, float eps) {
    pdl_start();
    constexpr int STEP = 32 * 8;
    const int D = nh * hd, lane = threadIdx.x % 32;
    const int64_t hs = (int64_t)Tp * hd; /* from one head's row of O to the next head's */
    for (int64_t row = (int64_t)blockIdx.x * NH_ROWS + threadIdx.x / 32; row < N; row += (int64_t)gridDim.x * NH_ROWS) {
        const int b = (int)((uint32_t)row / (uint32_t)T), t = (int)row - b * T; /* row < N <= INT32_MAX */
        const OT *Or = O + ((int64_t)b * nh * Tp + t) * hd;
        const int64_t base = row * D;
        const A *gr = g + row * ldg;
        pack8<A> op[U], gp[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = lane * 8 + u * STEP;
            if (c < D) {
                float v[8];
                const int h = (int)fastdiv_q((uint32_t)c, fhd);
                vec_ld<8>(v, Or + h * hs + (c - h * hd)), load(gp[u], gr + c);
                pack(op[u], v); /* o: O rounded to A */
            }
        }
        float ss = 0.0f;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = lane * 8 + u * STEP;
            if (c < D) {
                float v[8];
                unpack(v, op[u]);
#pragma unroll
                for (int j = 0; j < 8; j++) ss += v[j] * v[j];
                if (o) vec_st<8>(o + base + c, v);
            }
        }
        ss = m1c_warp_sum(ss);
        const float rs = 1.0f / sqrtf(ss / (float)D + eps);
        if (rstd_out && lane == 0) rstd_out[row] = rs;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = lane * 8 + u * STEP;
            if (c < D) {
                float v[8], gv[8], wv[8];
                unpack(v, op[u]), unpack(gv, gp[u]), vec_ld<8>(wv, w + c);
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = v[j] * rs * wv[j] * sigm(gv[j]);
                vec_st<8>(y + base + c, v);
            }
        }
    }
}

/* y = o * rstd * w * sigmoid(g) per token from the stored o and rstd (backward's recompute), one block per
 * token. V columns per thread. */
template <typename A, int VW>
__global__ static void k_norm_gate(A *y, const A *o, const A *g, const float *w, const float *rstd, int N, int D) {
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const float rs = rstd[row];
        for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
            float v[VW], gv[VW], wv[VW];
            vec_ld<VW>(v, o + row * D + c), vec_ld<VW>(gv, g + row * D + c), vec_ld<VW>(wv, w + c);
#pragma unroll
            for (int j = 0; j < VW; j++) v[j] = v[j] * rs * wv[j] * sigm(gv[j]);
            vec_st<VW>(y + row * D + c, v);
        }
    }
}

/* Partial sums for dw[c] = sum over tokens of dy * o * rstd * sigmoid(g): block (x, k) sums 32 columns over
 * token chunk k (8 rows of threads, combined in a fixed order) into part[k][c]. o is (N, D), or head-major
 * (B*nh, T, hd) when HM (the fused path's attn_out); g in rows of ldg (D, or 4D on the fused path). */
template <typename A, bool HM>
__global__ static void k_norm_dw(float *part, const float *dy, const A *o, const A *g, int64_t ldg, const float *rstd,
                                 int N, int D, int T, int nh, int hd) {
    __shared__ float sh[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int64_t per = ((int64_t)N + gridDim.y - 1) / gridDim.y, t0 = blockIdx.y * per;
    const int64_t t1 = t0 + per < N ? t0 + per : N;
    float acc = 0.0f;
    if (c < D)
        for (int64_t t = t0 + threadIdx.y; t < t1; t += 8) {
            const int64_t i = t * D + c;
            const int64_t io = HM ? ((t / T * nh + c / hd) * T + t % T) * hd + c % hd : i;
            acc += dy[i] * ld(o, io) * rstd[t] * sigm(ld(g, t * ldg + c));
        }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < D) {
        float s = 0.0f;
        for (int k = 0; k < 8; k++) s += sh[k][threadIdx.x];
        part[(int64_t)blockIdx.y * D + c] = s;
    }
}

/* dw[c] += the chunks' partial sums in chunk order (results repeat). */
__global__ static void k_norm_dw_sum(float *dw, const float *part, int chunks, int D) {
    GRID_STRIDE(c, D) {
        float s = 0.0f;
        for (int k = 0; k < chunks; k++) s += part[(int64_t)k * D + c];
        dw[c] += s;
    }
}

/* Norm and gate backward, one block per row of the head-major layout (B*Tp rows; padding rows t >= T get
 * zeros), n = o rstd, sg = sigmoid(g): d o = rstd (dy w sg - n mean(dy w sg n)) into the head-major dO and
 * dO * exp(-s (i+1)) into dOd (both A), d gate pre = dy n w sg (1 - sg) into dg (N, D). V columns per
 * thread (hd % V == 0). */
template <typename A, int VW>
__global__ static void k_norm_gate_backward(A *dO, A *dOd, A *dg, const float *dy, const A *o, const A *g,
                                            const float *w, const float *rstd, int B, int T, int Tp, int nh, int hd,
                                            int eb, const float *pw, int bs) {
    __shared__ float sh[32];
    const int D = nh * hd;
    const int64_t rows = (int64_t)B * Tp;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t b = r / Tp;
        const int t = (int)(r % Tp);
        if (t >= T) { /* the whole block takes this branch: no barrier is skipped by some threads only */
            float z[VW];
#pragma unroll
            for (int j = 0; j < VW; j++) z[j] = 0.0f;
            for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
                const int64_t at = ((b * nh + c / hd) * Tp + t) * hd + c % hd;
                vec_st<VW>(dO + at, z);
                if (dOd) vec_st<VW>(dOd + at, z);
            }
            continue;
        }
        const int64_t row = b * T + t, base = row * D;
        const float rs = rstd[row];
        float acc = 0.0f;
        for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
            float d[VW], ov[VW], gv[VW], wv[VW];
            vec_ld<VW>(d, dy + base + c), vec_ld<VW>(ov, o + base + c), vec_ld<VW>(gv, g + base + c), vec_ld<VW>(wv, w + c);
#pragma unroll
            for (int j = 0; j < VW; j++) acc += d[j] * wv[j] * sigm(gv[j]) * ov[j];
        }
        const float mean = block_sum(acc, sh) * rs / (float)D;
        const rowpos rp = row_of(t, T, eb);
        for (int c = threadIdx.x * VW; c < D; c += blockDim.x * VW) {
            float d[VW], ov[VW], gv[VW], wv[VW], dov[VW], dgv[VW];
            vec_ld<VW>(d, dy + base + c), vec_ld<VW>(ov, o + base + c), vec_ld<VW>(gv, g + base + c), vec_ld<VW>(wv, w + c);
            const int h = c / hd;
            const float f = pw[(int64_t)h * (bs + 1) + rp.i + 1];
#pragma unroll
            for (int j = 0; j < VW; j++) {
                const float nc = ov[j] * rs, s = sigm(gv[j]);
                dov[j] = rs * (d[j] * wv[j] * s - nc * mean);
                dgv[j] = d[j] * nc * wv[j] * s * (1.0f - s);
            }
            const int64_t at = ((b * nh + h) * Tp + t) * hd + c % hd;
            vec_st<VW>(dO + at, dov);
            if (dOd) {
#pragma unroll
                for (int j = 0; j < VW; j++) dov[j] *= f;
                vec_st<VW>(dOd + at, dov);
            }
            vec_st<VW>(dg + base + c, dgv);
        }
    }
}

/* ---- the fused path's norm and gate backward, with the weight gradient in the same pass ------------ */

/* One warp per token row, 8 columns per lane at a time; up to NG_MAXW warps per block; at most NG_CHUNKS
 * blocks (row chunks) of at least 4 rows per warp (with 4 blocks of 8 warps resident per SM, 512 chunks
 * are one wave on 128 or more SMs). Shared memory for the weight-gradient sums: warps * D floats within the
 * 48 KiB any block may use without opting in. */
enum { NG_MAXW = 8, NG_CHUNKS = 512, NG_SHMEM = 48 * 1024 };

/* The second pass over a row of the norm and gate backward (k_norm_gate_backward_rows and _regs): from
 * the row's dy (D floats), O (head-major: the token's head 0 element), g, rstd rs and mean, its dO (at the
 * same head-major place) and dg, and with DW the products that sum into the weight gradient added into acc
 * (the warp's D floats of shared memory). */
template <bool DW>
__device__ static inline void norm_gate_bwd_row(bf16 *dO, bf16 *dg, float *acc, const float *dy, const bf16 *O,
                                                const bf16 *g, const float *w, float rs, float mean, int D, int T,
                                                int hd, fastdiv fhd, int lane) {
    constexpr int STEP = 32 * 8;
#pragma unroll 1
    for (int c = lane * 8; c < D; c += STEP) { /* again: just read, from L1 */
        float d[8], wv[8];
        const int64_t at = hm_off(c, hd, fhd, T);
        const uint4 ou = *reinterpret_cast<const uint4 *>(O + at);
        const uint4 gu = *reinterpret_cast<const uint4 *>(g + c);
        vec_ld<8>(d, dy + c), vec_ld<8>(wv, w + c);
        const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ou);
        const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(&gu);
        uint4 dou, dgu;
        __nv_bfloat162 *do2 = reinterpret_cast<__nv_bfloat162 *>(&dou), *dg2 = reinterpret_cast<__nv_bfloat162 *>(&dgu);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 of = __bfloat1622float2(o2[k]), gf = __bfloat1622float2(g2[k]);
            float ra[2], rb[2], sa[2];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = 2 * k + e;
                const float ov = e ? of.y : of.x, nc = ov * rs, sg = sigm(e ? gf.y : gf.x);
                ra[e] = rs * (d[j] * wv[j] * sg - nc * mean);
                rb[e] = d[j] * nc * wv[j] * sg * (1.0f - sg);
                sa[e] = d[j] * ov * rs * sg;
            }
            do2[k] = __floats2bfloat162_rn(ra[0], ra[1]);
            dg2[k] = __floats2bfloat162_rn(rb[0], rb[1]);
            if constexpr (DW) {
                float2 *a2 = reinterpret_cast<float2 *>(acc + c) + k;
                const float2 old = *a2;
                *a2 = make_float2(old.x + sa[0], old.y + sa[1]);
            }
        }
        *reinterpret_cast<uint4 *>(dO + at) = dou;
        *reinterpret_cast<uint4 *>(dg + c) = dgu;
    }
}

/* Block sums of the warps' weight-gradient sums (D floats each in shared memory) into part's row. */
__device__ static inline void ng_part_sums(float *part, const float4 *sm, int D) {
    __syncthreads();
    const float *sh = reinterpret_cast<const float *>(sm);
    const int warps = blockDim.x / 32;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float sum = 0.0f;
        for (int k = 0; k < warps; k++) sum += sh[(int64_t)k * D + c];
        part[(int64_t)blockIdx.x * D + c] = sum;
    }
}

/* Norm and gate backward for the fused path (bf16, hd % 8 == 0, head-major O of (B*nh, T, hd)), the same
 * formulas as k_norm_gate_backward: n = o rstd, sg = sigmoid(g), d o = rstd (dy w sg - n mean(dy w sg n))
 * into the head-major dO, d gate pre = dy n w sg (1 - sg) into dg; g and dg in rows of ldg (4D: beside the
 * qkv pre-activation and its gradient), dy in rows of D. Block x takes the rows of chunk
 * x, [x per, (x + 1) per), its warp k the rows i0 + k, i0 + k + warps, ...
 * DW: also dw = sum over rows of dy o rstd sg (k_norm_dw's terms) in a fixed order: each lane adds its own
 * columns into its warp's row of the shared (warps, D) array, which no other lane touches; at the end the
 * block adds the warps' rows in order into part[x], and m1c_colsum_add (m1c/cuda/sums.cuh) adds the chunks
 * in order. No float atomics: the same inputs give the same bits. o and g stay packed bf16 in registers,
 * the outputs are packed as they are made (the roundings of vec_st) and the sums updated two at a time, so
 * that 4 blocks fit an SM without spilling. */
template <bool DW>
__global__ static void __launch_bounds__(32 * NG_MAXW, 4)
    k_norm_gate_backward_rows(bf16 *dO, bf16 *dg, float *part, const float *dy, const bf16 *O, const bf16 *g,
                              int64_t ldg, const float *w, const float *rstd, int N, int T, int nh, int hd, fastdiv fhd,
                              int64_t per) {
    pdl_start();
    extern __shared__ float4 ng_acc[]; /* DW: (warps, D); float4 for 16-byte alignment */
    const int D = nh * hd, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    constexpr int STEP = 32 * 8;
    float *acc = reinterpret_cast<float *>(ng_acc) + (int64_t)warp * D;
    if constexpr (DW) {
        const float z[8] = {};
        for (int c = lane * 8; c < D; c += STEP) vec_st<8>(acc + c, z);
    }
    const int64_t i0 = blockIdx.x * per, i1 = i0 + per < N ? i0 + per : N;
    for (int64_t row = i0 + warp; row < i1; row += warps) { /* uniform in the warp: the shuffle sees all lanes */
        const int64_t base = row * D, gbase = row * ldg;
        const int64_t ot = ((row / T) * nh * T + row % T) * hd; /* head-major: head h's columns at ot + h T hd */
        const float rs = rstd[row];
        float dot = 0.0f;
#pragma unroll 1
        for (int c = lane * 8; c < D; c += STEP) {
            float d[8], wv[8];
            const uint4 ou = *reinterpret_cast<const uint4 *>(O + ot + hm_off(c, hd, fhd, T));
            const uint4 gu = *reinterpret_cast<const uint4 *>(g + gbase + c);
            vec_ld<8>(d, dy + base + c), vec_ld<8>(wv, w + c);
            const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ou);
            const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(&gu);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 of = __bfloat1622float2(o2[k]), gf = __bfloat1622float2(g2[k]);
                dot += d[2 * k] * wv[2 * k] * sigm(gf.x) * of.x;
                dot += d[2 * k + 1] * wv[2 * k + 1] * sigm(gf.y) * of.y;
            }
        }
        const float mean = m1c_warp_sum(dot) * rs / (float)D;
        norm_gate_bwd_row<DW>(dO + ot, dg + gbase, acc, dy + base, O + ot, g + gbase, w, rs, mean, D, T, hd, fhd, lane);
    }
    if constexpr (DW) ng_part_sums(part, ng_acc, D);
}

/* k_norm_gate_backward_rows<true> where D = 256 NC (NC <= 4): the first pass issues a lane's NC chunks of
 * dy, O and g at once (the loop above has one chunk's loads in flight a warp, a latency-bound pass); the
 * second reads them again, from L1 or L2, as above. The same operations in the same order: the same bits.
 * (Keeping the chunks in registers for the second pass spilled: the compiler keeps the sigmoids too.) */
template <int NC>
__global__ static void __launch_bounds__(32 * NG_MAXW, NC == 1 ? 4 : NC == 2 ? 3 : 2)
    k_norm_gate_backward_regs(bf16 *dO, bf16 *dg, float *part, const float *dy, const bf16 *O, const bf16 *g,
                              int64_t ldg, const float *w, const float *rstd, int N, int T, int nh, int hd, fastdiv fhd,
                              int64_t per) {
    pdl_start();
    extern __shared__ float4 ng_acc[]; /* (warps, D); float4 for 16-byte alignment */
    constexpr int D = 256 * NC, STEP = 32 * 8;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float *acc = reinterpret_cast<float *>(ng_acc) + (int64_t)warp * D;
    {
        const float z[8] = {};
#pragma unroll
        for (int j = 0; j < NC; j++) vec_st<8>(acc + lane * 8 + STEP * j, z);
    }
    const int64_t i0 = blockIdx.x * per, i1 = i0 + per < N ? i0 + per : N;
    for (int64_t row = i0 + warp; row < i1; row += warps) { /* uniform in the warp: the shuffle sees all lanes */
        const int64_t base = row * D, gbase = row * ldg;
        const int64_t ot = ((row / T) * nh * T + row % T) * hd; /* head-major: head h's columns at ot + h T hd */
        uint4 ou[NC], gu[NC];
        float d[NC][8];
#pragma unroll
        for (int j = 0; j < NC; j++) {
            const int c = lane * 8 + STEP * j;
            ou[j] = *reinterpret_cast<const uint4 *>(O + ot + hm_off(c, hd, fhd, T));
            gu[j] = *reinterpret_cast<const uint4 *>(g + gbase + c);
            vec_ld<8>(d[j], dy + base + c);
        }
        const float rs = rstd[row];
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < NC; j++) {
            float wv[8];
            vec_ld<8>(wv, w + lane * 8 + STEP * j);
            const uint4 oj = ou[j], gj = gu[j];
            const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&oj);
            const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(&gj);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 of = __bfloat1622float2(o2[k]), gf = __bfloat1622float2(g2[k]);
                dot += d[j][2 * k] * wv[2 * k] * sigm(gf.x) * of.x;
                dot += d[j][2 * k + 1] * wv[2 * k + 1] * sigm(gf.y) * of.y;
            }
        }
        const float mean = m1c_warp_sum(dot) * rs / (float)D;
        norm_gate_bwd_row<true>(dO + ot, dg + gbase, acc, dy + base, O + ot, g + gbase, w, rs, mean, D, T, hd, fhd,
                                lane);
    }
    ng_part_sums(part, ng_acc, D);
}

/* ---- host side ---------------------------------------------------------------------------------------- */

typedef struct dims {
    int B, T, N, eb, nb, Tp;
    int64_t Z;   /* B * nh * nb: blocks of all heads, the batch of the per-block GEMMs */
    int64_t nhx; /* B * nh * Tp * hd: elements of a head-major array */
    int vh;      /* columns per thread in the head-major kernels: 8 when hd allows, else 1 */
    int vs;      /* columns per thread in the mask kernel: 8 when eb allows, else 1 */
} dims;

static dims dims_of(const lightning_cuda_cfg *c, int B, int T) {
    dims d;
    d.B = B, d.T = T, d.N = B * T;
    d.eb = T < c->bs ? T : c->bs;
    d.nb = (T + c->bs - 1) / c->bs;
    d.Tp = c->fused ? T : d.nb * d.eb; /* the fused kernels take any T: no padding */
    d.Z = (int64_t)B * c->nh * d.nb;
    d.nhx = (int64_t)B * c->nh * d.Tp * c->hd;
    d.vh = c->hd % 8 == 0 ? 8 : 1;
    d.vs = d.eb % 8 == 0 ? 8 : 1;
    return d;
}

/* The fused kernels' segment-state workspace (floats, at least 1 so the buffer always exists). */
static int64_t ws_floats(const lightning_cuda_cfg *c, int B, int T) {
    const int64_t n = c->fused ? lc_workspace_floats(B * c->nh, T, c->hd, c->slots) : 0;
    return n > 0 ? n : 1;
}

/* Row strides of the input projections' outputs, pre = x Wqkv^T and g = x Wg^T, and of their gradients.
 * The fused path keeps them side by side, [pre | g] in rows of 4D (the activation qkv_pre holds both,
 * gate_pre one element; [d pre | d g] likewise in scratch), so that where Wg follows Wqkv in the core's
 * arenas, [Wqkv; Wg] is one (4D, H) matrix and each projection one GEMM instead of two (input_projections,
 * input_projections_backward). The blocked path keeps pre (N, 3D) and g (N, D) apart. */
static int ld_pre(const lightning_cuda_cfg *c) { return (c->fused ? 4 : 3) * c->D; }
static int ld_gate(const lightning_cuda_cfg *c) { return c->fused ? 4 * c->D : c->D; }

static int launched(const lightning_cuda_cfg *c, const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return c->h->error(c->h, "lightning: CUDA kernel %s failed: %s", what, cudaGetErrorString(e));
    return M1C_OK;
}

static int check_size(const lightning_cuda_cfg *c, const m1c_tensor *t, int64_t need, int dtype, const char *what) {
    if (!t->data || m1c_tensor_numel(t) < need)
        return c->h->error(c->h, "lightning: buffer %s holds %lld values, %lld needed (declared for a smaller batch?)",
                           t->name ? t->name : what, (long long)m1c_tensor_numel(t), (long long)need);
    if (t->dtype != dtype)
        return c->h->error(c->h, "lightning: buffer %s has dtype %d, %d expected", t->name ? t->name : what,
                           (int)t->dtype, dtype);
    return M1C_OK;
}

/* The 8-wide kernels assume 16-byte aligned base addresses (the arena and cudaMalloc give 64 and 256). */
static int check_aligned(const lightning_cuda_cfg *c, const void *p, const char *what) {
    if (((uintptr_t)p & 15u) != 0)
        return c->h->error(c->h, "lightning: buffer %s is not 16-byte aligned", what);
    return M1C_OK;
}

/* Row-major GEMM through the host (cuBLAS), f32 accumulation. */
static int gemm(const lightning_cuda_cfg *c, void *stream, int ta, int tb, int M, int N, int K, float alpha,
                const void *A, int adt, int lda, int64_t sa, const void *B, int bdt, int ldb, int64_t sb, float beta,
                void *C, int cdt, int ldc, int64_t sc, int64_t batch) {
    if (batch > INT32_MAX) return c->h->error(c->h, "lightning: %lld blocks exceed one GEMM batch", (long long)batch);
    return c->h->gemm_ex(c->h, M1C_DEVICE_CUDA, stream, ta, tb, M, N, K, alpha, A, adt, lda, sa, B, bdt, ldb, sb,
                         beta, C, cdt, ldc, sc, (int)batch);
}

#define F32 M1C_F32

/* The m1c dtype of A. */
template <typename A> static int dtype_of();
template <> int dtype_of<float>() { return M1C_F32; }
template <> int dtype_of<bf16>() { return M1C_BF16; }

static int to_bf16(const lightning_cuda_cfg *c, cudaStream_t s, bf16 *dst, const float *src, int64_t n) {
    if (n <= 0) return M1C_OK;
    vec_to_bf16(dst, src, n, s);
    return launched(c, "to_bf16");
}

/* Threads for a one-block-per-row kernel over D columns, VW at a time: a multiple of 32, at most 256. */
static int row_threads(int D, int vw) {
    int t = (D / vw + 31) / 32 * 32;
    return t < 32 ? 32 : (t > 256 ? 256 : t);
}

static int row_grid(int64_t rows) { return (int)(rows > (1 << 20) ? (1 << 20) : (rows < 1 ? 1 : rows)); }

/* The index arithmetic of k_gather_qkv and k_silu_backward: 32-bit multiply-shift divisions where every
 * element index of the launch (n groups of VW) is below 2^31, as in every realistic shape. */
static bool small_index(int64_t n, int vw) { return n * vw <= INT32_MAX; }

template <typename A, int VW>
static void gather_qkv_v(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, A *Q, A *K, A *V, A *Qd, A *Kd,
                         A *Vd, const A *pre, int64_t ld) {
    const int64_t n = d->nhx / VW;
    const fastdiv fhd = fastdiv_of(c->hd), fTp = fastdiv_of(d->Tp), fnh = fastdiv_of(c->nh);
    if (small_index(n, VW))
        (void)pdl_launch(k_gather_qkv<A, VW, true>, grid_for(n), THREADS, 0, s, Q, K, V, Qd, Kd, Vd, pre, ld, d->T,
                         d->Tp, c->nh, c->hd, d->eb, c->pw, c->bs, n, fhd, fTp, fnh);
    else
        (void)pdl_launch(k_gather_qkv<A, VW, false>, grid_for(n), THREADS, 0, s, Q, K, V, Qd, Kd, Vd, pre, ld, d->T,
                         d->Tp, c->nh, c->hd, d->eb, c->pw, c->bs, n, fhd, fTp, fnh);
}

/* pre in rows of ld_pre(c). */
template <typename A>
static int gather_qkv(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, A *Q, A *K, A *V, A *Qd, A *Kd,
                      A *Vd, const A *pre) {
    if (d->vh == 8) gather_qkv_v<A, 8>(c, s, d, Q, K, V, Qd, Kd, Vd, pre, ld_pre(c));
    else gather_qkv_v<A, 1>(c, s, d, Q, K, V, Qd, Kd, Vd, pre, ld_pre(c));
    return launched(c, "gather_qkv");
}

/* d pre = d{q,k,v} SiLU'(pre) (k_silu_backward) from the head-major d{q,k,v} of (B*nh, Tp, hd), VW columns
 * per thread; d pre and pre in rows of ld_pre(c). */
template <typename A, int VW, typename DT>
static int silu_backward(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, A *dpre, const A *pre,
                         const DT *dQ, const DT *dK, const DT *dV) {
    const int64_t n = (int64_t)d->N * 3 * c->D / VW;
    const fastdiv fd3 = fastdiv_of(3 * (int64_t)c->D), fT = fastdiv_of(d->T), f3hd = fastdiv_of(3 * (int64_t)c->hd);
    const fastdiv fhd = fastdiv_of(c->hd);
    const int64_t ld = ld_pre(c);
    if (small_index(n, VW))
        (void)pdl_launch(k_silu_backward<A, VW, DT, true>, grid_for(n), THREADS, 0, s, dpre, pre, ld, dQ, dK, dV, d->T,
                         d->Tp, c->nh, c->hd, n, fd3, fT, f3hd, fhd);
    else
        (void)pdl_launch(k_silu_backward<A, VW, DT, false>, grid_for(n), THREADS, 0, s, dpre, pre, ld, dQ, dK, dV, d->T,
                         d->Tp, c->nh, c->hd, n, fd3, fT, f3hd, fhd);
    return launched(c, "silu_backward");
}

/* y = RMSNorm(O) w sigmoid(g) (o and rstd kept where not NULL) from the head-major O of (B*nh, Tp, hd), g in
 * rows of ld_gate(c): a warp per row where the row fits its registers and 8 columns at a time stay within a
 * head, else a block per row (wide rows: enough threads for one row). */
template <typename A, typename OT>
static int norm_gate_heads(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, A *y, A *o, const OT *O,
                           const A *g, const float *w, float *rstd) {
    const int rg = row_grid(((int64_t)d->N + NH_ROWS - 1) / NH_ROWS);
    const int64_t lg = ld_gate(c);
    if (d->vh == 8 && c->D <= 3 * 256)
        (void)pdl_launch(k_norm_gate_heads_rows<A, OT, 3>, rg, 32 * NH_ROWS, 0, s, y, o, O, g, lg, w, rstd, d->N, d->T,
                         d->Tp, c->nh, c->hd, fastdiv_of(c->hd), c->eps);
    else if (d->vh == 8 && c->D <= 4 * 256)
        (void)pdl_launch(k_norm_gate_heads_rows<A, OT, 4>, rg, 32 * NH_ROWS, 0, s, y, o, O, g, lg, w, rstd, d->N, d->T,
                         d->Tp, c->nh, c->hd, fastdiv_of(c->hd), c->eps);
    else if (d->vh == 8)
        (void)pdl_launch(k_norm_gate_heads<A, 8, OT>, row_grid(d->N), row_threads(c->D, 8), 0, s, y, o, O, g, lg, w,
                         rstd, d->N, d->T, d->Tp, c->nh, c->hd, c->eps);
    else
        (void)pdl_launch(k_norm_gate_heads<A, 1, OT>, row_grid(d->N), row_threads(c->D, 1), 0, s, y, o, O, g, lg, w,
                         rstd, d->N, d->T, d->Tp, c->nh, c->hd, c->eps);
    return launched(c, "norm_gate_heads");
}

template <typename A>
static int decay_mask(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, A *S, A *P) {
    const int64_t n = d->Z * d->eb * d->eb / d->vs;
    if (d->vs == 8)
        k_decay_mask<A, 8><<<grid_for(n), THREADS, 0, s>>>(S, P, d->eb, d->nb, c->nh, c->pw, c->bs, n);
    else
        k_decay_mask<A, 1><<<grid_for(n), THREADS, 0, s>>>(S, P, d->eb, d->nb, c->nh, c->pw, c->bs, n);
    return launched(c, "decay_mask");
}

static float *fx(const m1c_layer_bufs *b, int i) { return (float *)b->scratch[i].data; }
template <typename A> static A *ax(const m1c_layer_bufs *b, int i) { return (A *)b->scratch[i].data; }

/* ---- the fused path ---------------------------------------------------------------------------------- */

static int core(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, const dims *d, const bf16 *x, const bf16 *y,
                const bf16 *z, void *out, int out_f32, int reverse, const float *init, float *final_state,
                const char *what) {
    lc_problem p = {};
    p.x = x, p.y = y, p.z = z, p.out = out, p.out_f32 = out_f32;
    p.sbh = (int64_t)d->Tp * c->hd;
    p.BH = d->B * c->nh, p.nh = c->nh, p.T = d->T, p.hd = c->hd;
    p.slope = c->slope, p.reverse = reverse, p.init = init, p.final_state = final_state;
    p.slots = c->slots, p.kernel = c->core_kernel;
    p.ws_floats = lc_workspace_floats(p.BH, p.T, p.hd, p.slots);
    p.ws = p.ws_floats > 0 ? fx(b, X_WS) : NULL;
    if (p.ws && m1c_tensor_numel(&b->scratch[X_WS]) < p.ws_floats)
        return c->h->error(c->h, "lightning: segment-state buffer holds %lld values, %lld needed",
                           (long long)m1c_tensor_numel(&b->scratch[X_WS]), (long long)p.ws_floats);
    const cudaError_t e = lc_run(&p, (cudaStream_t)b->stream);
    if (e != cudaSuccess) return c->h->error(c->h, "lightning: fused kernel (%s) failed: %s", what, cudaGetErrorString(e));
    return M1C_OK;
}

/* ---- the block-GEMM path ---------------------------------------------------------------------------- */

/* Attention forward from pre (N, 3D) to the head-major f32 O (returned through *Oout): kvs receives the
 * state at every block start; state (B, nh, hd, hd), if not NULL, is carried in (unless fresh) and out. */
template <typename A>
static int attention_forward(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, const dims *d, const A *pre,
                             float *kvs, float *state, int fresh, const void **Oout) {
    cudaStream_t s = (cudaStream_t)b->stream;
    const int hd = c->hd, eb = d->eb, hd2 = hd * hd, adt = dtype_of<A>();
    const int64_t sx = (int64_t)eb * hd, ss = (int64_t)eb * eb, skv = hd2, Z = d->Z;
    A *Q = ax<A>(b, X_HA0), *K = ax<A>(b, X_HA1), *V = ax<A>(b, X_HA2), *Qd = ax<A>(b, X_HA3), *Kd = ax<A>(b, X_HA4);
    A *S = ax<A>(b, X_S);
    float *O = fx(b, X_HF0), *KVl = fx(b, X_KV);
    bf16 *kvlp = c->bf16 ? ax<bf16>(b, X_KVLP) : NULL;
    const void *KVop = c->bf16 ? (const void *)kvlp : (const void *)kvs; /* the state as a GEMM operand */
    if (gather_qkv<A>(c, s, d, Q, K, V, Qd, Kd, (A *)NULL, pre)) return M1C_ERR;
    /* S = (Q K^T) * D */
    if (gemm(c, s, 0, 1, eb, eb, hd, 1.0f, Q, adt, hd, sx, K, adt, hd, sx, 0.0f, S, adt, eb, ss, Z) ||
        decay_mask<A>(c, s, d, S, (A *)NULL))
        return M1C_ERR;
    /* local_n = (K * exp(-s (m-1-i)))^T V */
    if (gemm(c, s, 1, 0, hd, hd, eb, 1.0f, Kd, adt, hd, sx, V, adt, hd, sx, 0.0f, KVl, F32, hd, skv, Z)) return M1C_ERR;
    const int64_t ns = (int64_t)d->B * c->nh * hd2;
    k_scan_forward<<<grid_for(ns), THREADS, 0, s>>>(kvs, kvlp, KVl, state, fresh, d->nb, eb, d->T, c->nh, hd2, c->pw,
                                                    c->bs, ns);
    if (launched(c, "scan_forward")) return M1C_ERR;
    /* O = (Q * exp(-s (i+1))) KV_n + S V */
    if (gemm(c, s, 0, 0, eb, hd, hd, 1.0f, Qd, adt, hd, sx, KVop, adt, hd, skv, 0.0f, O, F32, hd, sx, Z) ||
        gemm(c, s, 0, 0, eb, hd, eb, 1.0f, S, adt, eb, ss, V, adt, hd, sx, 1.0f, O, F32, hd, sx, Z))
        return M1C_ERR;
    *Oout = O;
    return M1C_OK;
}

/* Attention backward: from the head-major dO and dOd (dO * exp(-s (i+1))) already in X_HA5 and X_HA6, pre
 * and the block-start states kvs, write d pre (N, 3D). */
template <typename A>
static int attention_backward(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, const dims *d, const A *pre,
                              const float *kvs, A *dpre) {
    cudaStream_t s = (cudaStream_t)b->stream;
    const int hd = c->hd, eb = d->eb, hd2 = hd * hd, adt = dtype_of<A>();
    const int64_t sx = (int64_t)eb * hd, ss = (int64_t)eb * eb, skv = hd2, Z = d->Z;
    A *Q = ax<A>(b, X_HA0), *K = ax<A>(b, X_HA1), *V = ax<A>(b, X_HA2), *Kd = ax<A>(b, X_HA3), *Vd = ax<A>(b, X_HA4);
    A *dO = ax<A>(b, X_HA5), *dOd = ax<A>(b, X_HA6), *S = ax<A>(b, X_S), *P = ax<A>(b, X_P);
    float *dQ = fx(b, X_HF0), *dK = fx(b, X_HF1), *dV = fx(b, X_HF2), *G = fx(b, X_KV);
    bf16 *kvlp = c->bf16 ? ax<bf16>(b, X_KVLP) : NULL, *glp = c->bf16 ? ax<bf16>(b, X_GLP) : NULL;
    const void *KVop = c->bf16 ? (const void *)kvlp : (const void *)kvs, *Gop = c->bf16 ? (const void *)glp : (const void *)G;
    if (c->bf16 && to_bf16(c, s, kvlp, kvs, Z * hd2)) return M1C_ERR;
    if (gather_qkv<A>(c, s, d, Q, K, V, (A *)NULL, Kd, Vd, pre)) return M1C_ERR;
    /* S = (Q K^T) * D, P = (dO V^T) * D */
    if (gemm(c, s, 0, 1, eb, eb, hd, 1.0f, Q, adt, hd, sx, K, adt, hd, sx, 0.0f, S, adt, eb, ss, Z) ||
        gemm(c, s, 0, 1, eb, eb, hd, 1.0f, dO, adt, hd, sx, V, adt, hd, sx, 0.0f, P, adt, eb, ss, Z) ||
        decay_mask<A>(c, s, d, S, P))
        return M1C_ERR;
    /* dQ = (dO * exp(-s (i+1))) KV_n^T + P K;  dK = P^T Q;  dV = S^T dO */
    if (gemm(c, s, 0, 1, eb, hd, hd, 1.0f, dOd, adt, hd, sx, KVop, adt, hd, skv, 0.0f, dQ, F32, hd, sx, Z) ||
        gemm(c, s, 0, 0, eb, hd, eb, 1.0f, P, adt, eb, ss, K, adt, hd, sx, 1.0f, dQ, F32, hd, sx, Z) ||
        gemm(c, s, 1, 0, eb, hd, eb, 1.0f, P, adt, eb, ss, Q, adt, hd, sx, 0.0f, dK, F32, hd, sx, Z) ||
        gemm(c, s, 1, 0, eb, hd, eb, 1.0f, S, adt, eb, ss, dO, adt, hd, sx, 0.0f, dV, F32, hd, sx, Z))
        return M1C_ERR;
    /* Ghat_n = Q^T (dO * exp(-s (i+1))), then the reverse scan to G_n */
    if (gemm(c, s, 1, 0, hd, hd, eb, 1.0f, Q, adt, hd, sx, dOd, adt, hd, sx, 0.0f, G, F32, hd, skv, Z)) return M1C_ERR;
    const int64_t ns = (int64_t)d->B * c->nh * hd2;
    k_scan_backward<<<grid_for(ns), THREADS, 0, s>>>(G, glp, d->nb, eb, c->nh, hd2, c->pw, c->bs, ns);
    if (launched(c, "scan_backward")) return M1C_ERR;
    /* through the state at the block's end: dV += (K * exp(-s (m-1-i))) G, dK += (V * exp(-s (m-1-i))) G^T */
    if (gemm(c, s, 0, 0, eb, hd, hd, 1.0f, Kd, adt, hd, sx, Gop, adt, hd, skv, 1.0f, dV, F32, hd, sx, Z) ||
        gemm(c, s, 0, 1, eb, hd, hd, 1.0f, Vd, adt, hd, sx, Gop, adt, hd, skv, 1.0f, dK, F32, hd, sx, Z))
        return M1C_ERR;
    return d->vh == 8 ? silu_backward<A, 8, float>(c, s, d, dpre, pre, dQ, dK, dV)
                      : silu_backward<A, 1, float>(c, s, d, dpre, pre, dQ, dK, dV);
}

/* Warps per block of k_norm_gate_backward_rows with the weight gradient (DW): its sums take warps * D
 * floats of shared memory; 0 when not even one warp's fits (D > 12288: the separate k_norm_dw pass). */
static int ng_warps(int D) {
    const int w = NG_SHMEM / (4 * D);
    return w > NG_MAXW ? NG_MAXW : w;
}

/* Row chunks of the norm weight's partial sums: the fused path's merged pass (up to NG_CHUNKS), else
 * k_norm_dw's NDW. */
static int64_t dw_chunks(const lightning_cuda_cfg *c) { return c->fused && ng_warps(c->D) > 0 ? (int64_t)NG_CHUNKS : (int64_t)NDW; }

/* The scratch sizes for (B, T), checked on every call (B*T may be smaller than declared). */
static int check_scratch(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, const dims *d, int adt) {
    const int64_t N = d->N, D = c->D, hd = c->hd, lp = c->bf16 && !c->fused ? d->Z * hd * hd : 1;
    const int fz = c->fused;
    static const char *const names[N_X] = {"qkv",      "y",        "d_attn_out", "x_lp",     "heads_a0", "heads_a1",
                                           "heads_a2", "heads_a3", "heads_a4",   "heads_a5", "heads_a6", "heads_f0",
                                           "heads_f1", "heads_f2", "scores",     "d_scores", "kv_local", "kv_starts",
                                           "kv_lp",    "dkv_lp",   "norm_dw",    "seg_states"};
    int64_t need[N_X];
    int dt[N_X];
    need[X_QKV] = N * ld_pre(c), dt[X_QKV] = adt;
    need[X_Y] = N * D, dt[X_Y] = adt;
    need[X_DO] = N * D, dt[X_DO] = M1C_F32;
    need[X_LP] = c->bf16 ? N * c->H : 1, dt[X_LP] = M1C_BF16;
    for (int i = X_HA0; i <= X_HA6; i++) need[i] = fz && (i == X_HA3 || i == X_HA4 || i == X_HA6) ? 1 : d->nhx, dt[i] = adt;
    for (int i = X_HF0; i <= X_HF2; i++) need[i] = fz ? 1 : d->nhx, dt[i] = M1C_F32;
    need[X_S] = need[X_P] = fz ? 1 : d->Z * d->eb * d->eb, dt[X_S] = dt[X_P] = adt;
    need[X_KV] = need[X_KVS] = fz ? 1 : d->Z * hd * hd, dt[X_KV] = dt[X_KVS] = M1C_F32;
    need[X_WS] = ws_floats(c, d->B, d->T), dt[X_WS] = M1C_F32;
    need[X_KVLP] = need[X_GLP] = lp, dt[X_KVLP] = dt[X_GLP] = M1C_BF16;
    need[X_DWP] = dw_chunks(c) * D, dt[X_DWP] = M1C_F32;
    for (int i = 0; i < N_X; i++)
        if (check_size(c, &b->scratch[i], need[i], dt[i], names[i]) ||
            check_aligned(c, b->scratch[i].data, names[i]))
            return M1C_ERR;
    return M1C_OK;
}

static int check_acts(const lightning_cuda_cfg *c, const m1c_tensor *a, const dims *d, int adt) {
    const int64_t N = d->N, D = c->D, kv = c->fused ? 1 : d->Z * c->hd * c->hd;
    if (check_size(c, &a[A_QKV], N * ld_pre(c), adt, "qkv_pre") ||
        check_size(c, &a[A_GATE], c->fused ? 1 : N * D, adt, "gate_pre") ||
        check_size(c, &a[A_O], N * D, adt, "attn_out") || check_size(c, &a[A_RSTD], N, M1C_F32, "rstd") ||
        check_size(c, &a[A_KV], kv, M1C_F32, "kv_blocks"))
        return M1C_ERR;
    for (int i = A_QKV; i <= A_O; i++)
        if (check_aligned(c, a[i].data, a[i].name ? a[i].name : "activation")) return M1C_ERR;
    if (!c->fused) return M1C_OK;
    /* the fused path's own (its attn_out is O head-major, (B*nh, T, hd): the N * D values checked above) */
    if (check_size(c, &a[A_QKVH], 3 * d->nhx, M1C_BF16, "qkv_heads") ||
        check_size(c, &a[A_XLP], c->lp_inputs ? 1 : N * c->H, M1C_BF16, "in_bf16") ||
        check_size(c, &a[A_Y], N * D, M1C_BF16, "out_proj_in"))
        return M1C_ERR;
    for (int i = A_QKVH; i <= A_Y; i++)
        if (check_aligned(c, a[i].data, a[i].name ? a[i].name : "activation")) return M1C_ERR;
    return M1C_OK;
}

static int check_params(const lightning_cuda_cfg *c, const m1c_layer_bufs *b) {
    if (!b || !b->params || !b->scratch) return c->h->error(c->h, "lightning: parameter and scratch buffers are required");
    if (c->bf16 && !b->params_lp)
        return c->h->error(c->h, "lightning: compute dtype BF16 needs the bf16 parameter copies (params_lp)");
    return check_aligned(c, b->params[P_NORM].data, "self_attn.norm.weight");
}

/* Weight operand for the projections: the bf16 copy for BF16 compute, else the f32 parameter. */
static const void *weight(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, int i) {
    return c->bf16 ? b->params_lp[i].data : b->params[i].data;
}

/* Whether [Wqkv; Wg] (the weight operands) and [dWqkv; dWg] are each one (4D, H) matrix: the core's arenas
 * hold a layer's tensors in declaration order, each 256-byte aligned, so Wg follows Wqkv at once unless
 * padding (bf16 with H odd) or separate allocations (the test harness) part them. */
static int weights_joined(const lightning_cuda_cfg *c, const m1c_layer_bufs *b) {
    const size_t es = c->bf16 ? sizeof(bf16) : sizeof(float);
    return (const char *)weight(c, b, P_GATE) == (const char *)weight(c, b, P_QKV) + 3 * (size_t)c->D * c->H * es;
}
static int grads_joined(const lightning_cuda_cfg *c, const m1c_layer_bufs *b) {
    return (const float *)b->grads[P_GATE].data == (const float *)b->grads[P_QKV].data + 3 * (size_t)c->D * c->H;
}

/* The input projections: pre = x Wqkv^T, g = x Wg^T, in rows of ld_pre and ld_gate; x, pre and g in the
 * compute dtype adt. One GEMM (N = 4D) on the fused path (g = pre + 3D) where [Wqkv; Wg] is one matrix. */
static int input_projections(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, cudaStream_t s, int N, int adt,
                             const void *x, void *pre, void *g) {
    const int H = c->H, D = c->D, lp = ld_pre(c), lg = ld_gate(c);
    if (c->fused && weights_joined(c, b))
        return gemm(c, s, 0, 1, N, 4 * D, H, 1.0f, x, adt, H, 0, weight(c, b, P_QKV), adt, H, 0, 0.0f, pre, adt, lp, 0,
                    1);
    if (gemm(c, s, 0, 1, N, 3 * D, H, 1.0f, x, adt, H, 0, weight(c, b, P_QKV), adt, H, 0, 0.0f, pre, adt, lp, 0, 1) ||
        gemm(c, s, 0, 1, N, D, H, 1.0f, x, adt, H, 0, weight(c, b, P_GATE), adt, H, 0, 0.0f, g, adt, lg, 0, 1))
        return M1C_ERR;
    return M1C_OK;
}

/* Their backward: dWqkv += dpre^T x, dWg += dgate^T x, and din (if not NULL) += dpre Wqkv + dgate Wg; dpre
 * and dgate in rows of ld_pre and ld_gate, dpre, dgate and x in the compute dtype adt. On the fused path
 * (dgate = dpre + 3D) one GEMM each where the gradients (M = 4D) or the weights (K = 4D) are joined. */
static int input_projections_backward(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, cudaStream_t s, int N,
                                      int adt, const void *dpre, const void *dgate, const void *x, float *dWqkv,
                                      float *dWg, float *din) {
    const int H = c->H, D = c->D, lp = ld_pre(c), lg = ld_gate(c);
    const float bq = m1c_grad_beta(&b->grads[P_QKV]), bg = m1c_grad_beta(&b->grads[P_GATE]);
    if (c->fused && grads_joined(c, b) && bq == bg) {
        if (gemm(c, s, 1, 0, 4 * D, H, N, 1.0f, dpre, adt, lp, 0, x, adt, H, 0, bq, dWqkv, M1C_F32, H, 0, 1))
            return M1C_ERR;
    } else if (gemm(c, s, 1, 0, 3 * D, H, N, 1.0f, dpre, adt, lp, 0, x, adt, H, 0, bq, dWqkv, M1C_F32, H, 0, 1) ||
               gemm(c, s, 1, 0, D, H, N, 1.0f, dgate, adt, lg, 0, x, adt, H, 0, bg, dWg, M1C_F32, H, 0, 1))
        return M1C_ERR;
    if (!din) return M1C_OK;
    if (c->fused && weights_joined(c, b))
        return gemm(c, s, 0, 0, N, H, 4 * D, 1.0f, dpre, adt, lp, 0, weight(c, b, P_QKV), adt, H, 0, 1.0f, din, M1C_F32,
                    H, 0, 1);
    if (gemm(c, s, 0, 0, N, H, 3 * D, 1.0f, dpre, adt, lp, 0, weight(c, b, P_QKV), adt, H, 0, 1.0f, din, M1C_F32, H, 0,
             1) ||
        gemm(c, s, 0, 0, N, H, D, 1.0f, dgate, adt, lg, 0, weight(c, b, P_GATE), adt, H, 0, 1.0f, din, M1C_F32, H, 0,
             1))
        return M1C_ERR;
    return M1C_OK;
}


template <typename A>
static int run_t(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *out, const float *in, int B, int T,
                 float *state, int fresh) {
    const int adt = dtype_of<A>(), H = c->H, D = c->D;
    const dims d = dims_of(c, B, T);
    const int N = d.N;
    const int train = !state && b->training && b->acts;
    cudaStream_t s = (cudaStream_t)b->stream;
    if (check_scratch(c, b, &d, adt) || (train && check_acts(c, b->acts, &d, adt))) return M1C_ERR;
    const void *x = in;
    if (c->bf16 && !(x = b->in_lp)) {
        if (to_bf16(c, s, (bf16 *)b->scratch[X_LP].data, in, (int64_t)N * H)) return M1C_ERR;
        x = b->scratch[X_LP].data;
    }
    /* Without activations to keep: pre-activations in scratch, the gate's in the (f32-sized) d_attn_out
     * buffer as the compute dtype, and o not stored. */
    A *pre = (A *)(train ? b->acts[A_QKV].data : b->scratch[X_QKV].data);
    A *g = (A *)(train ? b->acts[A_GATE].data : b->scratch[X_DO].data);
    A *y = (A *)b->scratch[X_Y].data;
    A *o = train ? (A *)b->acts[A_O].data : NULL;
    float *rstd = train ? (float *)b->acts[A_RSTD].data : NULL;
    float *kvs = train ? (float *)b->acts[A_KV].data : fx(b, X_KVS);
    if (input_projections(c, b, s, N, adt, x, pre, g)) return M1C_ERR;
    const void *O = NULL;
    if (attention_forward<A>(c, b, &d, pre, kvs, state, fresh, &O)) return M1C_ERR;
    if (norm_gate_heads<A, float>(c, s, &d, y, o, (const float *)O, g, (const float *)b->params[P_NORM].data, rstd))
        return M1C_ERR;
    return gemm(c, s, 0, 1, N, H, D, 1.0f, y, adt, D, 0, weight(c, b, P_OUT), adt, D, 0, 0.0f, out, M1C_F32, H, 0, 1);
}

template <typename A>
static int backward_t(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *din, const float *dout,
                      const float *in, int B, int T) {
    const int adt = dtype_of<A>(), H = c->H, D = c->D;
    const dims d = dims_of(c, B, T);
    const int N = d.N;
    cudaStream_t s = (cudaStream_t)b->stream;
    if (!b->acts || !b->grads) return c->h->error(c->h, "lightning: backward needs activations and gradients");
    if (check_scratch(c, b, &d, adt) || check_acts(c, b->acts, &d, adt)) return M1C_ERR;
    const A *pre = (const A *)b->acts[A_QKV].data, *g = (const A *)b->acts[A_GATE].data;
    const A *o = (const A *)b->acts[A_O].data;
    const float *rstd = (const float *)b->acts[A_RSTD].data, *kvs = (const float *)b->acts[A_KV].data;
    const float *wn = (const float *)b->params[P_NORM].data;
    float *dWqkv = (float *)b->grads[P_QKV].data, *dWg = (float *)b->grads[P_GATE].data;
    float *dwn = (float *)b->grads[P_NORM].data, *dWo = (float *)b->grads[P_OUT].data;
    A *dpre = (A *)b->scratch[X_QKV].data, *y = (A *)b->scratch[X_Y].data;
    float *dy = fx(b, X_DO);
    bf16 *lp = (bf16 *)b->scratch[X_LP].data;
    const int nt = row_threads(D, d.vh);

    /* out_proj: dWo += dout^T y (y recomputed), dy = dout Wo */
    if (d.vh == 8)
        k_norm_gate<A, 8><<<row_grid(N), nt, 0, s>>>(y, o, g, wn, rstd, N, D);
    else
        k_norm_gate<A, 1><<<row_grid(N), nt, 0, s>>>(y, o, g, wn, rstd, N, D);
    if (launched(c, "norm_gate")) return M1C_ERR;
    const void *dout_op = dout;
    if (c->bf16 && !(dout_op = b->dout_lp)) {
        if (to_bf16(c, s, lp, dout, (int64_t)N * H)) return M1C_ERR;
        dout_op = lp;
    }
    if (gemm(c, s, 1, 0, H, D, N, 1.0f, dout_op, adt, H, 0, y, adt, D, 0, m1c_grad_beta(&b->grads[P_OUT]), dWo,
             M1C_F32, D, 0, 1) ||
        gemm(c, s, 0, 0, N, D, H, 1.0f, dout_op, adt, H, 0, weight(c, b, P_OUT), adt, D, 0, 0.0f, dy, M1C_F32, D, 0, 1))
        return M1C_ERR;
    /* norm and gate: dw from per-chunk partial sums, then d attention output (head-major, plain and decayed)
     * and d gate pre into y */
    float *part = fx(b, X_DWP);
    k_norm_dw<A, false><<<dim3((D + 31) / 32, NDW), dim3(32, 8), 0, s>>>(part, dy, o, g, D, rstd, N, D, T, c->nh,
                                                                         c->hd);
    if (launched(c, "norm_dw")) return M1C_ERR;
    k_norm_dw_sum<<<grid_for(D), THREADS, 0, s>>>(dwn, part, NDW, D);
    if (launched(c, "norm_dw_sum")) return M1C_ERR;
    A *dO = ax<A>(b, X_HA5), *dOd = ax<A>(b, X_HA6);
    const int64_t rows = (int64_t)B * d.Tp;
    if (d.vh == 8)
        k_norm_gate_backward<A, 8><<<row_grid(rows), nt, 0, s>>>(dO, dOd, y, dy, o, g, wn, rstd, B, T, d.Tp, c->nh,
                                                                  c->hd, d.eb, c->pw, c->bs);
    else
        k_norm_gate_backward<A, 1><<<row_grid(rows), nt, 0, s>>>(dO, dOd, y, dy, o, g, wn, rstd, B, T, d.Tp, c->nh,
                                                                  c->hd, d.eb, c->pw, c->bs);
    if (launched(c, "norm_gate_backward")) return M1C_ERR;
    if (attention_backward<A>(c, b, &d, pre, kvs, dpre)) return M1C_ERR;

    /* projections: dW += d pre^T x, din += d pre W */
    const void *x = in;
    if (c->bf16 && !(x = b->in_lp)) {
        if (to_bf16(c, s, lp, in, (int64_t)N * H)) return M1C_ERR;
        x = lp;
    }
    return input_projections_backward(c, b, s, N, adt, dpre, y, x, dWqkv, dWg, din);
}

/* ---- the fused path: forward and backward ------------------------------------------------------------ */

/* Forward (state == NULL: from an empty state, keeping activations when training) or step with the fused
 * kernels (bf16, hd 64 or 128): x = bf16(in); [pre | g] = x [Wqkv; Wg]^T; Q, K, V = SiLU(pre) head-major;
 * O = core(Q, K, V); y = RMSNorm(O) w sigmoid(g); out = y Wo^T. Training writes x, [pre | g], Q K V, O,
 * rstd and y straight into the activations (backward redoes none of them); otherwise all but the state live
 * in scratch. */
static int run_fused(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *out, const float *in, int B, int T,
                     float *state, int fresh) {
    const int H = c->H, D = c->D, adt = M1C_BF16;
    const dims d = dims_of(c, B, T);
    const int N = d.N;
    const int train = !state && b->training && b->acts;
    cudaStream_t s = (cudaStream_t)b->stream;
    if (check_scratch(c, b, &d, adt) || (train && check_acts(c, b->acts, &d, adt))) return M1C_ERR;
    const m1c_tensor *a = b->acts;
    /* x: the core's bf16 input where it keeps one for backward (lp_inputs) or none is needed, else rounded
     * here (into the activation when training) */
    const bf16 *x = (const bf16 *)(c->lp_inputs || !train ? b->in_lp : NULL);
    if (!x && train && c->lp_inputs)
        return c->h->error(c->h, "lightning: a training forward without the core's bf16 input (lp_inputs)");
    bf16 *xc = (bf16 *)(train && !c->lp_inputs ? a[A_XLP].data : b->scratch[X_LP].data);
    if (!x && to_bf16(c, s, xc, in, (int64_t)N * H)) return M1C_ERR;
    if (!x) x = xc;
    bf16 *pre = (bf16 *)(train ? a[A_QKV].data : b->scratch[X_QKV].data), *g = pre + 3 * D; /* rows of 4D */
    bf16 *y = (bf16 *)(train ? a[A_Y].data : b->scratch[X_Y].data);
    bf16 *O = (bf16 *)(train ? a[A_O].data : b->scratch[X_HA5].data);
    bf16 *Q = train ? (bf16 *)a[A_QKVH].data : ax<bf16>(b, X_HA0);
    bf16 *K = train ? Q + d.nhx : ax<bf16>(b, X_HA1), *V = train ? Q + 2 * d.nhx : ax<bf16>(b, X_HA2);
    float *rstd = train ? (float *)a[A_RSTD].data : NULL;
    if (input_projections(c, b, s, N, adt, x, pre, g) ||
        gather_qkv<bf16>(c, s, &d, Q, K, V, (bf16 *)NULL, (bf16 *)NULL, (bf16 *)NULL, pre) ||
        core(c, b, &d, Q, K, V, O, 0, 0, state && !fresh ? state : NULL, state, "forward"))
        return M1C_ERR;
    /* O is bf16 already, so it is the activation o itself (the norm's rounding to A changes nothing) */
    if (norm_gate_heads<bf16, bf16>(c, s, &d, y, (bf16 *)NULL, O, g, (const float *)b->params[P_NORM].data, rstd))
        return M1C_ERR;
    if (!b->out_rows)
        return gemm(c, s, 0, 1, N, H, D, 1.0f, y, adt, D, 0, weight(c, b, P_OUT), adt, D, 0, 0.0f, out, M1C_F32, H, 0, 1);
    /* the core reads the output as rows (m1c_layer_bufs.out_rows, the identity of ABI 1.5): bf16 rows in x_lp
     * (read by the projections above), half the bytes of out for the GEMM to write and the core's norm to read */
    bf16 *rows = ax<bf16>(b, X_LP);
    if (gemm(c, s, 0, 1, N, H, D, 1.0f, y, adt, D, 0, weight(c, b, P_OUT), adt, D, 0, 0.0f, rows, M1C_BF16, H, 0, 1))
        return M1C_ERR;
    m1c_out_rows_own(b->out_rows, rows, M1C_BF16);
    return M1C_OK;
}

/* The norm and gate backward from dy (N, D) f32: dO head-major and d gate pre dg (g and dg in rows of
 * ld_gate), and dw += its sum over tokens, in one pass where the sums fit in shared memory, else with
 * k_norm_dw's separate pass. */
static int norm_backward_fused(const lightning_cuda_cfg *c, cudaStream_t s, const dims *d, bf16 *dO, bf16 *dg,
                               float *part, float *dw, const float *dy, const bf16 *O, const bf16 *g, const float *w,
                               const float *rstd) {
    const int D = c->D, N = d->N, W = ng_warps(D), warps = W > 0 ? W : NG_MAXW;
    const int64_t want = ((int64_t)N + 4 * warps - 1) / (4 * warps); /* at least 4 rows per warp */
    const int chunks = (int)(want < NG_CHUNKS ? want : (int64_t)NG_CHUNKS);
    const int64_t per = ((int64_t)N + chunks - 1) / chunks;
    const fastdiv fhd = fastdiv_of(c->hd);
    const int64_t lg = ld_gate(c);
    if (W > 0) {
        /* the row's chunks issued at once where D = 256 NC, NC <= 4 */
        decltype(&k_norm_gate_backward_rows<true>) k = k_norm_gate_backward_rows<true>;
        switch (D % 256 ? 0 : D / 256) {
        case 1: k = k_norm_gate_backward_regs<1>; break;
        case 2: k = k_norm_gate_backward_regs<2>; break;
        case 3: k = k_norm_gate_backward_regs<3>; break;
        case 4: k = k_norm_gate_backward_regs<4>; break;
        default: break;
        }
        (void)pdl_launch(k, chunks, 32 * W, (size_t)W * D * sizeof(float), s, dO, dg, part, dy, O, g, lg, w, rstd, N,
                         d->T, c->nh, c->hd, fhd, per);
        if (launched(c, "norm_gate_backward_rows")) return M1C_ERR;
        (void)m1c_colsum_add_launch(dw, part, chunks, D, s);
        return launched(c, "colsum_add");
    }
    k_norm_dw<bf16, true><<<dim3((D + 31) / 32, NDW), dim3(32, 8), 0, s>>>(part, dy, O, g, lg, rstd, N, D, d->T,
                                                                           c->nh, c->hd);
    if (launched(c, "norm_dw")) return M1C_ERR;
    k_norm_dw_sum<<<grid_for(D), THREADS, 0, s>>>(dw, part, NDW, D);
    if (launched(c, "norm_dw_sum")) return M1C_ERR;
    (void)pdl_launch(k_norm_gate_backward_rows<false>, chunks, 32 * NG_MAXW, 0, s, dO, dg, (float *)NULL, dy, O, g, lg,
                     w, rstd, N, d->T, c->nh, c->hd, fhd, per);
    return launched(c, "norm_gate_backward_rows");
}

/* Backward with the fused kernels, from the forward's activations (in is not read: its bf16 copy was
 * kept, by the layer or with lp_inputs by the core): dWo += dout^T y, dy = dout Wo; the norm and gate backward (dO, d gate pre, dw); dQ = core(dO, V, K),
 * dK = core_rev(V, dO, Q), dV = core_rev(K, Q, dO) as bf16; d pre = d{q,k,v} SiLU'(pre); with [d pre | d g]
 * in rows of 4D, d[Wqkv; Wg] += [d pre | d g]^T x, din += [d pre | d g] [Wqkv; Wg]. */
static int backward_fused(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *din, const float *dout, int B,
                          int T) {
    const int H = c->H, D = c->D, adt = M1C_BF16;
    const dims d = dims_of(c, B, T);
    const int N = d.N;
    cudaStream_t s = (cudaStream_t)b->stream;
    if (!b->acts || !b->grads) return c->h->error(c->h, "lightning: backward needs activations and gradients");
    if (check_scratch(c, b, &d, adt) || check_acts(c, b->acts, &d, adt)) return M1C_ERR;
    const m1c_tensor *a = b->acts;
    const bf16 *x = (const bf16 *)(c->lp_inputs ? b->in_lp : a[A_XLP].data), *pre = (const bf16 *)a[A_QKV].data;
    if (!x) return c->h->error(c->h, "lightning: a backward without the core's bf16 input (lp_inputs)");
    const bf16 *g = pre + 3 * D, *O = (const bf16 *)a[A_O].data, *y = (const bf16 *)a[A_Y].data;
    const bf16 *Q = (const bf16 *)a[A_QKVH].data, *K = Q + d.nhx, *V = Q + 2 * d.nhx;
    const float *rstd = (const float *)a[A_RSTD].data, *wn = (const float *)b->params[P_NORM].data;
    float *dWqkv = (float *)b->grads[P_QKV].data, *dWg = (float *)b->grads[P_GATE].data;
    float *dwn = (float *)b->grads[P_NORM].data, *dWo = (float *)b->grads[P_OUT].data;
    bf16 *dpre = ax<bf16>(b, X_QKV), *dg = dpre + 3 * D, *lp = ax<bf16>(b, X_LP), *dO = ax<bf16>(b, X_HA5);
    bf16 *dQ = ax<bf16>(b, X_HA0), *dK = ax<bf16>(b, X_HA1), *dV = ax<bf16>(b, X_HA2);
    float *dy = fx(b, X_DO);

    /* out_proj, from the core's bf16 dout where given */
    const bf16 *dl = (const bf16 *)b->dout_lp;
    if (!dl && to_bf16(c, s, lp, dout, (int64_t)N * H)) return M1C_ERR;
    if (!dl) dl = lp;
    if (gemm(c, s, 1, 0, H, D, N, 1.0f, dl, adt, H, 0, y, adt, D, 0, m1c_grad_beta(&b->grads[P_OUT]), dWo, M1C_F32,
             D, 0, 1) ||
        gemm(c, s, 0, 0, N, D, H, 1.0f, dl, adt, H, 0, weight(c, b, P_OUT), adt, D, 0, 0.0f, dy, M1C_F32, D, 0, 1))
        return M1C_ERR;
    /* norm and gate, then attention (bf16 d{q,k,v}: SiLU's backward rounds its product to bf16 anyway) */
    if (norm_backward_fused(c, s, &d, dO, dg, fx(b, X_DWP), dwn, dy, O, g, wn, rstd) ||
        core(c, b, &d, dO, V, K, dQ, 0, 0, NULL, NULL, "dq") || core(c, b, &d, V, dO, Q, dK, 0, 1, NULL, NULL, "dk") ||
        core(c, b, &d, K, Q, dO, dV, 0, 1, NULL, NULL, "dv"))
        return M1C_ERR;
    if (silu_backward<bf16, 8, bf16>(c, s, &d, dpre, pre, dQ, dK, dV)) /* hd is 64 or 128: 8 columns a thread */
        return M1C_ERR;
    /* projections */
    return input_projections_backward(c, b, s, N, adt, dpre, dg, x, dWqkv, dWg, din);
}

/* ---- entry points for lightning.c -------------------------------------------------------------------- */

extern "C" int lightning_cuda_upload(const m1c_host *h, const float *pw, size_t n, float **dev) {
    *dev = NULL;
    cudaError_t e = cudaMalloc((void **)dev, n * sizeof(float));
    if (e != cudaSuccess) {
        *dev = NULL;
        return h->error(h, "lightning: CUDA allocation of the decay table failed: %s", cudaGetErrorString(e));
    }
    e = cudaMemcpy(*dev, pw, n * sizeof(float), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        cudaFree(*dev);
        *dev = NULL;
        return h->error(h, "lightning: copying the decay table to the GPU failed: %s", cudaGetErrorString(e));
    }
    return M1C_OK;
}

extern "C" int lightning_cuda_slots(int hd) { return lc_supported(hd) ? lc_slots(hd) : 0; }

/* The output pass's kernel on the current device: once per layer, so that lc_run need not ask. */
extern "C" int lightning_cuda_core_kernel(void) { return wg_available() ? LC_WGMMA : LC_MMA; }

extern "C" void lightning_cuda_release(float *dev) {
    if (dev) cudaFree(dev);
}

static m1c_buf_spec xspec(const char *name, int dtype, int ndim, int64_t d0, int64_t d1, int64_t d2) {
    return m1c_make_spec(name, dtype, ndim, d0, d1, d2, 0);
}

extern "C" int lightning_cuda_scratch(const lightning_cuda_cfg *c, int B, int T, m1c_buf_spec *specs, int max) {
    const dims d = dims_of(c, B, T < 1 ? 1 : T);
    const int64_t N = (int64_t)B * T, D = c->D, hd = c->hd, BH = (int64_t)B * c->nh;
    const int adt = c->bf16 ? M1C_BF16 : M1C_F32;
    const int64_t lp = c->bf16 && !c->fused ? d.Z : 1, lpd = c->bf16 && !c->fused ? hd : 1; /* BF16, blocked only */
    const int64_t big = c->fused ? 1 : BH, ebf = c->fused ? 1 : d.eb, Zb = c->fused ? 1 : d.Z; /* unused when fused */
    m1c_buf_spec s[N_X] = {
        xspec("self_attn.qkv", adt, 2, N, ld_pre(c), 0),                       /* (B*T, 3*nh*hd), fused 4*nh*hd */
        xspec("self_attn.y", adt, 2, N, D, 0),                                 /* (B*T, nh*hd) */
        xspec("self_attn.d_attn_out", M1C_F32, 2, N, D, 0),                    /* (B*T, nh*hd) */
        xspec("self_attn.x_lp", M1C_BF16, 2, c->bf16 ? N : 1, c->bf16 ? c->H : 1, 0), /* (B*T, H) */
        xspec("self_attn.heads_a0", adt, 3, BH, d.Tp, hd),                     /* (B*nh, Tp, hd) */
        xspec("self_attn.heads_a1", adt, 3, BH, d.Tp, hd),
        xspec("self_attn.heads_a2", adt, 3, BH, d.Tp, hd),
        xspec("self_attn.heads_a3", adt, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd),
        xspec("self_attn.heads_a4", adt, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd),
        xspec("self_attn.heads_a5", adt, 3, BH, d.Tp, hd),
        xspec("self_attn.heads_a6", adt, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd),
        xspec("self_attn.heads_f0", M1C_F32, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd), /* (B*nh, Tp, hd) */
        xspec("self_attn.heads_f1", M1C_F32, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd),
        xspec("self_attn.heads_f2", M1C_F32, 3, big, c->fused ? 1 : d.Tp, c->fused ? 1 : hd),
        xspec("self_attn.scores", adt, 3, Zb, ebf, ebf),                       /* (blocks, eb, eb) */
        xspec("self_attn.d_scores", adt, 3, Zb, ebf, ebf),
        xspec("self_attn.kv_local", M1C_F32, 3, Zb, c->fused ? 1 : hd, c->fused ? 1 : hd), /* (blocks, hd, hd) */
        xspec("self_attn.kv_starts", M1C_F32, 3, Zb, c->fused ? 1 : hd, c->fused ? 1 : hd),
        xspec("self_attn.kv_lp", M1C_BF16, 3, lp, lpd, lpd),                   /* (blocks, hd, hd) */
        xspec("self_attn.dkv_lp", M1C_BF16, 3, lp, lpd, lpd),
        xspec("self_attn.norm_dw", M1C_F32, 2, dw_chunks(c), D, 0),            /* (chunks, nh*hd) */
        xspec("self_attn.seg_states", M1C_F32, 1, ws_floats(c, B, T < 1 ? 1 : T), 0, 0), /* fused, long T */
    };
    return m1c_put_specs(c->h, "lightning", s, N_X, specs, max);
}

extern "C" int lightning_cuda_run(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *out, const float *in,
                                  int B, int T, float *state, int fresh) {
    if (check_params(c, b)) return M1C_ERR;
    if (B < 1 || T < 1) return c->h->error(c->h, "lightning: empty batch (B=%d, T=%d)", B, T);
    if (c->fused) return run_fused(c, b, out, in, B, T, state, fresh); /* bf16 only */
    return c->bf16 ? run_t<bf16>(c, b, out, in, B, T, state, fresh) : run_t<float>(c, b, out, in, B, T, state, fresh);
}

extern "C" int lightning_cuda_backward(const lightning_cuda_cfg *c, const m1c_layer_bufs *b, float *din,
                                       const float *dout, const float *in, int B, int T) {
    if (check_params(c, b)) return M1C_ERR;
    if (B < 1 || T < 1) return c->h->error(c->h, "lightning: empty batch (B=%d, T=%d)", B, T);
    if (c->fused) return backward_fused(c, b, din, dout, B, T); /* bf16 only */
    return c->bf16 ? backward_t<bf16>(c, b, din, dout, in, B, T) : backward_t<float>(c, b, din, dout, in, B, T);
}
