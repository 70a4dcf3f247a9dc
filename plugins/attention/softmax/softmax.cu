/* Softmax attention plugin, CUDA path: the same layer as softmax.c (causal GQA, partial rotate_half
 * RoPE, KV cache) on one GPU, f32 or bf16 compute. Projections go through cuBLAS (h->gemm_ex);
 * attention is a flash-style kernel: on tensor cores (mma.sync in the FlashAttention-2 form,
 * softmax_fa.cuh; on warpgroup MMA where built for sm_90a, softmax_wg.cuh) for BF16 at
 * head_dim 64 and 128 (the setting "kernel"), on CUDA cores otherwise (f32: the exact reference). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <m1c/cuda/vec.cuh>
#include "m1c/plugin.h"
#include "softmax_tc.cuh" /* bf16, ld/st/warp helpers, rowdot_kernel, the tensor-core kernels */

/* Tiles: a block holds BQ query rows and walks key tiles of BK; BK is one key per lane so that the
 * row-wise online softmax is one warp per row. */
#define BQ 32
#define BK 32
#define NTHREADS 256
#define NWARPS (NTHREADS / 32)
#define CUDA_MAX_HEAD_DIM 256 /* the backward kernel's shared tiles (~206 KB at 256) must fit */
static_assert(BK == 32, "the row softmax maps one key to one lane");

/* Must match softmax.c's enums. */
enum { P_Q, P_K, P_V, P_O, N_PARAMS };
enum { A_Q, A_K, A_V, A_ATT, A_LSE, N_ACTS };
enum { ST_K, ST_V, N_STATE };
/* Scratch of the CUDA path: f32 q, k, v (projections, then dq, dk, dv), datt (also the f32 att of a
 * forward without acts), per-row lse or backward's D = rowsum(dO * O), the RoPE cos/sin table, and
 * bf16 staging (BF16 compute): the layer input or dout, and q, k, v, att (or dq, dk, dv). */
enum { CS_Q, CS_K, CS_V, CS_DATT, CS_LSE, CS_ROPE, CS_XLP, CS_LP, N_CS };

typedef struct sm_cuda {
    const m1c_host *h;
    int H, nh, kvh, hd, rd, rep, dt; /* dt: compute dtype */
    int tc;                          /* BF16 attention on tensor cores (head_dim 64 or 128) */
    int wg;                          /* tc on warpgroup MMA (softmax_wg.cuh) */
    double theta;
} sm_cuda;

/* ---- device helpers ------------------------------------------------------------------------ */

/* (ld, st, warp_max, warp_sum are in softmax_tc.cuh, with the tensor-core kernels that use them.) */

static int grid_for(int64_t n) {
    int64_t g = (n + NTHREADS - 1) / NTHREADS;
    return (int)(g > 65535 * 8 ? 65535 * 8 : (g < 1 ? 1 : g));
}

/* ---- elementwise kernels ------------------------------------------------------------------- */

/* cos/sin of RoPE for T positions pos0 + t: cs[t*rd + i] = cos, cs[t*rd + half + i] = sin, angles in
 * double exactly as the CPU computes them (a float angle loses the phase at long context). */
__global__ static void rope_table_kernel(float *cs, int T, int half, int rd, double theta, int64_t pos0) {
    const int64_t n = (int64_t)T * half;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int t = (int)(e / half), i = (int)(e % half);
        const double ang = (double)(pos0 + t) * pow(theta, -2.0 * i / rd);
        cs[(int64_t)t * rd + i] = (float)cos(ang);
        cs[(int64_t)t * rd + half + i] = (float)sin(ang);
    }
}

/* rotate_half RoPE of rows (B*T rows of nheads heads of hd): dst = R(src) (inverse: R^T, backward),
 * dst may equal src. One thread per slot of a (row, head): slot s < half rotates the pair (s, s + half),
 * a later slot copies dimension s + half (past the rotary part), so no thread idles; I is uint32_t where
 * the slots fit, whose divisions are far cheaper than 64-bit ones. */
template <typename TO, typename I>
__global__ static void rope_kernel(TO *dst, const float *src, I row_heads, int T, int nheads, int hd, int half,
                                   const float *cs, int rd, int inverse) {
    const int W = hd - half; /* slots per (row, head) */
    const I n = row_heads * (I)W;
    for (I j = blockIdx.x * (I)blockDim.x + threadIdx.x; j < n; j += (I)gridDim.x * blockDim.x) {
        const I rh = j / (I)W;
        const int sl = (int)(j - rh * (I)W), t = (int)((rh / (I)nheads) % (I)T);
        const int64_t e = (int64_t)rh * hd + sl;
        if (sl < half) {
            const float c = cs[(int64_t)t * rd + sl], s0 = cs[(int64_t)t * rd + half + sl];
            const float s = inverse ? -s0 : s0;
            const float u = src[e], w = src[e + half];
            st(dst + e, u * c - w * s);
            st(dst + e + half, w * c + u * s);
        } else if (dst != (const void *)src) {
            st(dst + e + half, src[e + half]);
        }
    }
}

/* Append T new tokens' k, v ((B, T, kvh*hd), f32) to the cache (B, kvh, max_len, hd) at positions
 * pos + t, in the cache's dtype (f32, or bf16 for BF16 compute: the rounding the forward applies). */
template <typename TC>
__global__ static void kv_append_kernel(TC *kc, TC *vc, const float *k, const float *v, int B, int T, int kvh,
                                        int hd, int64_t max_len, int64_t pos, int64_t cache_b_stride) {
    const int64_t n = (int64_t)B * T * kvh * hd;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int d = (int)(e % hd), g = (int)((e / hd) % kvh);
        const int64_t r = e / ((int64_t)hd * kvh), b = r / T, t = r % T;
        const int64_t dst = b * cache_b_stride + ((int64_t)g * max_len + pos + t) * hd + d;
        st(kc + dst, k[e]);
        st(vc + dst, v[e]);
    }
}
/* ---- attention forward --------------------------------------------------------------------- */

static size_t fwd_smem(int hd) {
    return sizeof(float) * ((size_t)3 * BQ * (hd + 1) + (size_t)BQ * hd + (size_t)BQ * (BK + 1) + 3 * BQ);
}

/* Block (query tile x, head y, sequence z): rows i0..i0+nq-1 of q (B, T, nh*hd) at positions
 * pos0 + i attend causally to keys 0..pos0+i of KV head g = h / rep, found at
 * kb + b*kb_stride + g*kg_stride with row stride ks. Online softmax over key tiles; O accumulates
 * unnormalised in shared memory and is rescaled when a row's maximum grows. lse may be NULL. */
template <typename TQ, typename TKV, typename TO>
__global__ static void __launch_bounds__(NTHREADS)
    attn_fwd_kernel(const TQ *q, const TKV *kb, const TKV *vb, int64_t kb_stride, int64_t kg_stride, int ks, TO *att,
                    float *lse, int T, int nh, int rep, int hd, int64_t pos0, float scale) {
    extern __shared__ float smem[];
    const int hdp = hd + 1, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    float *Qs = smem, *Ks = Qs + BQ * hdp, *Vs = Ks + BK * hdp, *Os = Vs + BK * hdp;
    float *S = Os + BQ * hd, *mrow = S + BQ * (BK + 1), *lrow = mrow + BQ, *crow = lrow + BQ;
    const int i0 = blockIdx.x * BQ, hh = blockIdx.y, b = blockIdx.z, g = hh / rep;
    const int nq = min(BQ, T - i0), qs = nh * hd;
    const TQ *qb = q + ((int64_t)b * T + i0) * qs + (int64_t)hh * hd;
    const TKV *kh = kb + b * kb_stride + g * kg_stride, *vh = vb + b * kb_stride + g * kg_stride;

    for (int e = tid; e < BQ * hd; e += NTHREADS) {
        const int i = e / hd, d = e % hd;
        Qs[i * hdp + d] = i < nq ? ld(qb + (int64_t)i * qs + d) : 0.0f;
        Os[e] = 0.0f;
    }
    for (int i = tid; i < BQ; i += NTHREADS) mrow[i] = -INFINITY, lrow[i] = 0.0f;
    __syncthreads();

    const int64_t kend = pos0 + i0 + nq; /* keys 0..kend-1 are visible to some row of the block */
    for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int nk = (int)min((int64_t)BK, kend - k0);
        for (int e = tid; e < BK * hd; e += NTHREADS) {
            const int j = e / hd, d = e % hd;
            const bool ok = j < nk;
            Ks[j * hdp + d] = ok ? ld(kh + (k0 + j) * ks + d) : 0.0f;
            Vs[j * hdp + d] = ok ? ld(vh + (k0 + j) * ks + d) : 0.0f;
        }
        __syncthreads();
        for (int e = tid; e < BQ * BK; e += NTHREADS) {
            const int i = e / BK, j = e % BK;
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s += Qs[i * hdp + d] * Ks[j * hdp + d];
            S[i * (BK + 1) + j] = s * scale;
        }
        __syncthreads();
        for (int i = warp; i < BQ; i += NWARPS) {
            const int64_t qpos = pos0 + i0 + i;
            const bool valid = i < nq && lane < nk && k0 + lane <= qpos;
            const float s = valid ? S[i * (BK + 1) + lane] : -INFINITY;
            const float mold = mrow[i];
            const float mnew = fmaxf(mold, warp_max(s));
            /* valid implies mnew >= s > -inf: no inf - inf */
            const float p = valid ? expf(s - mnew) : 0.0f;
            const float sum = warp_sum(p);
            S[i * (BK + 1) + lane] = p;
            if (lane == 0) {
                const float c = mold == -INFINITY ? 0.0f : expf(mold - mnew);
                crow[i] = c;
                lrow[i] = lrow[i] * c + sum;
                mrow[i] = mnew;
            }
        }
        __syncthreads();
        for (int e = tid; e < BQ * hd; e += NTHREADS) {
            const int i = e / hd, d = e % hd;
            float acc = Os[e] * crow[i];
            for (int j = 0; j < nk; j++) acc += S[i * (BK + 1) + j] * Vs[j * hdp + d];
            Os[e] = acc;
        }
        __syncthreads();
    }
    TO *ob = att + ((int64_t)b * T + i0) * qs + (int64_t)hh * hd;
    for (int e = tid; e < nq * hd; e += NTHREADS) {
        const int i = e / hd, d = e % hd;
        st(ob + (int64_t)i * qs + d, Os[e] / lrow[i]);
    }
    if (lse)
        for (int i = tid; i < nq; i += NTHREADS) lse[((int64_t)b * nh + hh) * T + i0 + i] = mrow[i] + logf(lrow[i]);
}

/* ---- attention backward -------------------------------------------------------------------- */

/* Recompute one tile's P and dS = P * (dP - D) (scores from q, k and the saved lse), masked. */
__device__ __forceinline__ void bwd_tile_scores(const float *Qs, const float *dOs, const float *Ks, const float *Vs,
                                                const float *lq, const float *Dq, float *P, float *dS, int hd,
                                                int nq, int nk, int i0, int k0, float scale) {
    const int hdp = hd + 1;
    for (int e = threadIdx.x; e < BQ * BK; e += NTHREADS) {
        const int i = e / BK, j = e % BK;
        float p = 0.0f, ds = 0.0f;
        if (i < nq && j < nk && k0 + j <= i0 + i) {
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hd; d++) {
                s += Qs[i * hdp + d] * Ks[j * hdp + d];
                dp += dOs[i * hdp + d] * Vs[j * hdp + d];
            }
            p = expf(s * scale - lq[i]);
            ds = p * (dp - Dq[i]);
        }
        if (P) P[i * (BK + 1) + j] = p;
        dS[i * (BK + 1) + j] = ds;
    }
}

/* Load nq rows (zero-padded to BQ) of a (B, T, nh*hd) head slice into a [BQ][hd+1] tile. */
template <typename TA>
__device__ __forceinline__ void load_rows(float *dst, const TA *src, int64_t stride, int n, int hd) {
    for (int e = threadIdx.x; e < BQ * hd; e += NTHREADS) {
        const int i = e / hd, d = e % hd;
        dst[i * (hd + 1) + d] = i < n ? ld(src + i * stride + d) : 0.0f;
    }
}

static size_t bwd_kv_smem(int hd) {
    return sizeof(float) * ((size_t)4 * BQ * (hd + 1) + (size_t)2 * BK * hd + (size_t)2 * BQ * (BK + 1) + 2 * BQ);
}

/* dk, dv of key tile x of KV head y, sequence z, summed over the rep query heads of the group and
 * every query that sees the tile: dV = sum P^T dO, dK = scale sum dS^T Q. One block owns its rows of
 * dk, dv (B, T, kvh*hd): written, no atomics. */
template <typename TA>
__global__ static void __launch_bounds__(NTHREADS)
    attn_bwd_kv_kernel(const TA *q, const TA *k, const TA *v, const float *dO, const float *lse, const float *D,
                       float *dk, float *dv, int T, int nh, int kvh, int hd, float scale) {
    extern __shared__ float smem[];
    const int hdp = hd + 1, tid = threadIdx.x;
    float *Ks = smem, *Vs = Ks + BK * hdp, *Qs = Vs + BK * hdp, *dOs = Qs + BQ * hdp;
    float *dKs = dOs + BQ * hdp, *dVs = dKs + BK * hd, *P = dVs + BK * hd, *dS = P + BQ * (BK + 1);
    float *lq = dS + BQ * (BK + 1), *Dq = lq + BQ;
    const int k0 = blockIdx.x * BK, g = blockIdx.y, b = blockIdx.z, rep = nh / kvh;
    const int nk = min(BK, T - k0), qs = nh * hd, kd = kvh * hd;
    const int64_t krow0 = ((int64_t)b * T + k0) * kd + (int64_t)g * hd;
    load_rows(Ks, k + krow0, kd, nk, hd);
    load_rows(Vs, v + krow0, kd, nk, hd);
    for (int e = tid; e < BK * hd; e += NTHREADS) dKs[e] = dVs[e] = 0.0f;
    for (int r = 0; r < rep; r++) {
        const int hh = g * rep + r;
        for (int i0 = k0; i0 < T; i0 += BQ) { /* earlier queries cannot see these keys */
            const int nq = min(BQ, T - i0);
            __syncthreads(); /* the previous tile's Qs, dOs, P, dS are consumed */
            const int64_t qrow0 = ((int64_t)b * T + i0) * qs + (int64_t)hh * hd;
            load_rows(Qs, q + qrow0, qs, nq, hd);
            load_rows(dOs, dO + qrow0, qs, nq, hd);
            for (int i = tid; i < BQ; i += NTHREADS) {
                const int64_t li = ((int64_t)b * nh + hh) * T + i0 + i;
                lq[i] = i < nq ? lse[li] : 0.0f;
                Dq[i] = i < nq ? D[li] : 0.0f;
            }
            __syncthreads();
            bwd_tile_scores(Qs, dOs, Ks, Vs, lq, Dq, P, dS, hd, nq, nk, i0, k0, scale);
            __syncthreads();
            for (int e = tid; e < BK * hd; e += NTHREADS) {
                const int j = e / hd, d = e % hd;
                float av = 0.0f, ak = 0.0f;
                for (int i = 0; i < nq; i++) {
                    av += P[i * (BK + 1) + j] * dOs[i * hdp + d];
                    ak += dS[i * (BK + 1) + j] * Qs[i * hdp + d];
                }
                dVs[e] += av;
                dKs[e] += ak * scale;
            }
        }
    }
    __syncthreads();
    for (int e = tid; e < nk * hd; e += NTHREADS) {
        const int j = e / hd, d = e % hd;
        dk[krow0 + (int64_t)j * kd + d] = dKs[e];
        dv[krow0 + (int64_t)j * kd + d] = dVs[e];
    }
}

static size_t bwd_q_smem(int hd) {
    return sizeof(float) * ((size_t)4 * BQ * (hd + 1) + (size_t)BQ * hd + (size_t)BQ * (BK + 1) + 2 * BQ);
}

/* dq of query tile x, head y, sequence z: dQ = scale sum_j dS K over the key tiles up to the diagonal.
 * Written (B, T, nh*hd). */
template <typename TA>
__global__ static void __launch_bounds__(NTHREADS)
    attn_bwd_q_kernel(const TA *q, const TA *k, const TA *v, const float *dO, const float *lse, const float *D,
                      float *dq, int T, int nh, int kvh, int hd, float scale) {
    extern __shared__ float smem[];
    const int hdp = hd + 1, tid = threadIdx.x;
    float *Qs = smem, *dOs = Qs + BQ * hdp, *Ks = dOs + BQ * hdp, *Vs = Ks + BK * hdp, *dQs = Vs + BK * hdp;
    float *dS = dQs + BQ * hd, *lq = dS + BQ * (BK + 1), *Dq = lq + BQ;
    const int i0 = blockIdx.x * BQ, hh = blockIdx.y, b = blockIdx.z, g = hh / (nh / kvh);
    const int nq = min(BQ, T - i0), qs = nh * hd, kd = kvh * hd;
    const int64_t qrow0 = ((int64_t)b * T + i0) * qs + (int64_t)hh * hd;
    load_rows(Qs, q + qrow0, qs, nq, hd);
    load_rows(dOs, dO + qrow0, qs, nq, hd);
    for (int e = tid; e < BQ * hd; e += NTHREADS) dQs[e] = 0.0f;
    for (int i = tid; i < BQ; i += NTHREADS) {
        const int64_t li = ((int64_t)b * nh + hh) * T + i0 + i;
        lq[i] = i < nq ? lse[li] : 0.0f;
        Dq[i] = i < nq ? D[li] : 0.0f;
    }
    const int kend = i0 + nq;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        const int nk = min(BK, kend - k0);
        __syncthreads(); /* the previous tile's Ks, Vs, dS are consumed (first pass: Qs, lq loaded) */
        const int64_t krow0 = ((int64_t)b * T + k0) * kd + (int64_t)g * hd;
        load_rows(Ks, k + krow0, kd, nk, hd);
        load_rows(Vs, v + krow0, kd, nk, hd);
        __syncthreads();
        bwd_tile_scores(Qs, dOs, Ks, Vs, lq, Dq, NULL, dS, hd, nq, nk, i0, k0, scale);
        __syncthreads();
        for (int e = tid; e < BQ * hd; e += NTHREADS) {
            const int i = e / hd, d = e % hd;
            float acc = 0.0f;
            for (int j = 0; j < nk; j++) acc += dS[i * (BK + 1) + j] * Ks[j * hdp + d];
            dQs[e] += acc;
        }
    }
    __syncthreads();
    for (int e = tid; e < nq * hd; e += NTHREADS) {
        const int i = e / hd, d = e % hd;
        dq[qrow0 + (int64_t)i * qs + d] = dQs[e] * scale;
    }
}

/* ---- host side ----------------------------------------------------------------------------- */

/* M1C_ERR with a message naming the kernel if e (a launch's status) is an error. */
static int cuda_failed(const sm_cuda *a, cudaError_t e, const char *what) {
    if (e != cudaSuccess) return a->h->error(a->h, "CUDA kernel %s: %s", what, cudaGetErrorString(e));
    return M1C_OK;
}

static int launched(const sm_cuda *a, const char *what) { return cuda_failed(a, cudaGetLastError(), what); }

template <typename K>
static int raise_smem(const sm_cuda *a, K kernel, size_t bytes) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess)
        return a->h->error(a->h, "cudaFuncSetAttribute (%zu bytes of shared memory): %s", bytes, cudaGetErrorString(e));
    return M1C_OK;
}

/* The setting "kernel" (softmax.c). */
enum { SM_KERNEL_AUTO, SM_KERNEL_WGMMA, SM_KERNEL_MMA, SM_KERNEL_CUDA_CORES };

extern "C" int sm_cuda_wgmma_available(void) { return wg_available(); }

extern "C" int sm_cuda_create(const m1c_host *h, int H, int nh, int kvh, int hd, int rd, double theta, int dtype,
                              int kernel, void **out) {
    *out = NULL;
    if (dtype != M1C_F32 && dtype != M1C_BF16)
        return h->error(h, "compute_dtype %d: the CUDA softmax supports f32 (0) and bf16 (1)", dtype);
    if (hd > CUDA_MAX_HEAD_DIM)
        return h->error(h, "head_dim = %d: the CUDA softmax supports head_dim <= %d", hd, CUDA_MAX_HEAD_DIM);
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return h->error(h, "no usable CUDA device: %s", cudaGetErrorString(e));
    size_t need = fwd_smem(hd);
    if (bwd_kv_smem(hd) > need) need = bwd_kv_smem(hd);
    if (bwd_q_smem(hd) > need) need = bwd_q_smem(hd);
    if (need > (size_t)optin)
        return h->error(h, "head_dim = %d needs %zu bytes of shared memory per block, the GPU allows %d", hd, need,
                        optin);
    sm_cuda *a = (sm_cuda *)calloc(1, sizeof(*a));
    if (!a) return h->error(h, "out of memory");
    a->h = h, a->H = H, a->nh = nh, a->kvh = kvh, a->hd = hd, a->rd = rd, a->rep = nh / kvh, a->dt = dtype;
    a->theta = theta;
    /* Tensor cores for BF16 at head_dim 64 and 128 unless kernel = "cuda_cores" (checked in softmax.c) */
    a->tc = dtype == M1C_BF16 && (hd == 64 || hd == 128) && kernel != SM_KERNEL_CUDA_CORES;
    a->wg = a->tc && (kernel == SM_KERNEL_WGMMA || (kernel == SM_KERNEL_AUTO && wg_available()));
    if (a->tc) {
        size_t bytes = 0;
        if (tc_smem_max(hd) > (size_t)optin) a->tc = a->wg = 0; /* cannot happen on sm_80+: keep the old path */
        else if ((e = tc_raise_smem(hd, &bytes)) != cudaSuccess) {
            h->error(h, "cudaFuncSetAttribute (%zu bytes of shared memory): %s", bytes, cudaGetErrorString(e));
            free(a);
            return M1C_ERR;
        }
    }
    if (raise_smem(a, attn_fwd_kernel<float, float, float>, fwd_smem(hd)) ||
        raise_smem(a, attn_fwd_kernel<bf16, bf16, bf16>, fwd_smem(hd)) ||
        raise_smem(a, attn_bwd_kv_kernel<float>, bwd_kv_smem(hd)) ||
        raise_smem(a, attn_bwd_kv_kernel<bf16>, bwd_kv_smem(hd)) ||
        raise_smem(a, attn_bwd_q_kernel<float>, bwd_q_smem(hd)) ||
        raise_smem(a, attn_bwd_q_kernel<bf16>, bwd_q_smem(hd))) {
        free(a);
        return M1C_ERR;
    }
    *out = a;
    return M1C_OK;
}

extern "C" void sm_cuda_destroy(void *self) { free(self); }

/* Saved for backward: roped q, k, v and att in the compute dtype, lse in f32. */
extern "C" int sm_cuda_acts(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    sm_cuda *a = (sm_cuda *)self;
    const int64_t qd = (int64_t)a->nh * a->hd, kd = (int64_t)a->kvh * a->hd;
    const m1c_buf_spec s[N_ACTS] = {
        m1c_make_spec("self_attn.q", a->dt, 3, B, T, qd, 0),         /* A_Q */
        m1c_make_spec("self_attn.k", a->dt, 3, B, T, kd, 0),         /* A_K */
        m1c_make_spec("self_attn.v", a->dt, 3, B, T, kd, 0),         /* A_V */
        m1c_make_spec("self_attn.att", a->dt, 3, B, T, qd, 0),       /* A_ATT */
        m1c_make_spec("self_attn.lse", M1C_F32, 3, B, a->nh, T, 0),  /* A_LSE */
    };
    return m1c_put_specs(a->h, "softmax acts", s, N_ACTS, specs, max);
}

extern "C" int sm_cuda_scratch(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    sm_cuda *a = (sm_cuda *)self;
    const int64_t qd = (int64_t)a->nh * a->hd, kd = (int64_t)a->kvh * a->hd, BT = (int64_t)B * T;
    const int lp = a->dt == M1C_BF16; /* the bf16 staging exists only for BF16 compute */
    const m1c_buf_spec s[N_CS] = {
        m1c_make_spec("self_attn.dq", M1C_F32, 3, B, T, qd, 0),                                     /* CS_Q */
        m1c_make_spec("self_attn.dk", M1C_F32, 3, B, T, kd, 0),                                     /* CS_K */
        m1c_make_spec("self_attn.dv", M1C_F32, 3, B, T, kd, 0),                                     /* CS_V */
        m1c_make_spec("self_attn.datt", M1C_F32, 3, B, T, qd, 0),                                   /* CS_DATT */
        m1c_make_spec("self_attn.scratch_lse", M1C_F32, 3, B, a->nh, T, 0),                         /* CS_LSE */
        m1c_make_spec("self_attn.rope", M1C_F32, 2, T, a->rd > 0 ? a->rd : 1, 0, 0),                /* CS_ROPE */
        m1c_make_spec("self_attn.x_bf16", M1C_BF16, 2, lp ? BT : 1, lp ? a->H : 1, 0, 0),           /* CS_XLP */
        m1c_make_spec("self_attn.qkv_bf16", M1C_BF16, 2, lp ? BT : 1, lp ? 2 * qd + 2 * kd : 1, 0, 0), /* CS_LP */
    };
    return m1c_put_specs(a->h, "softmax scratch", s, N_CS, specs, max);
}

static int check_scratch(const sm_cuda *a, const m1c_layer_bufs *b, int B, int T) {
    const int64_t BT = (int64_t)B * T, qd = (int64_t)a->nh * a->hd, kd = (int64_t)a->kvh * a->hd;
    const int lp = a->dt == M1C_BF16;
    const int64_t need[N_CS] = {BT * qd, BT * kd, BT * kd, BT * qd, BT * a->nh, (int64_t)T * a->rd,
                                lp ? BT * a->H : 0, lp ? BT * (2 * qd + 2 * kd) : 0};
    const int want_dt[N_CS] = {M1C_F32, M1C_F32, M1C_F32, M1C_F32, M1C_F32, M1C_F32, M1C_BF16, M1C_BF16};
    for (int i = 0; i < N_CS; i++)
        if (m1c_tensor_numel(&b->scratch[i]) < need[i] || (need[i] > 0 && b->scratch[i].dtype != want_dt[i]))
            return a->h->error(a->h, "scratch buffer %d holds %lld elements of dtype %d, (B=%d, T=%d) needs %lld", i,
                               (long long)m1c_tensor_numel(&b->scratch[i]), b->scratch[i].dtype, B, T, (long long)need[i]);
    if (B > 65535 || a->nh > 65535)
        return a->h->error(a->h, "B = %d or heads = %d exceeds the CUDA grid limit 65535", B, a->nh);
    return M1C_OK;
}

static int to_bf16(const sm_cuda *a, cudaStream_t s, bf16 *dst, const float *src, int64_t n) {
    if (n <= 0) return M1C_OK;
    vec_to_bf16(dst, src, n, s);
    return launched(a, "to_bf16");
}

static int rope_table(const sm_cuda *a, cudaStream_t s, float *cs, int T, int64_t pos0) {
    const int half = a->rd / 2;
    if (half == 0 || T <= 0) return M1C_OK;
    rope_table_kernel<<<grid_for((int64_t)T * half), NTHREADS, 0, s>>>(cs, T, half, a->rd, a->theta, pos0);
    return launched(a, "rope_table");
}

template <typename TO>
static int rope_apply(const sm_cuda *a, cudaStream_t s, TO *dst, const float *src, int B, int T, int nheads,
                      const float *cs, int inverse) {
    const int64_t n = (int64_t)B * T * nheads * a->hd;
    if (n <= 0 || (a->rd == 0 && (const void *)dst == (const void *)src)) return M1C_OK; /* identity */
    const int half = a->rd / 2, rd = a->rd > 0 ? a->rd : 1;
    const int64_t rh = (int64_t)B * T * nheads, slots = rh * (a->hd - half);
    if (slots < ((int64_t)1 << 31)) /* j + the grid stride stays below 2^32 */
        rope_kernel<TO, uint32_t><<<grid_for(slots), NTHREADS, 0, s>>>(dst, src, (uint32_t)rh, T, nheads, a->hd, half,
                                                                       cs, rd, inverse);
    else
        rope_kernel<TO, int64_t><<<grid_for(slots), NTHREADS, 0, s>>>(dst, src, rh, T, nheads, a->hd, half, cs, rd,
                                                                      inverse);
    return launched(a, "rope");
}

template <typename TQ, typename TKV, typename TO>
static int attend(const sm_cuda *a, cudaStream_t s, const TQ *q, const TKV *kb, const TKV *vb, int64_t kb_stride,
                  int64_t kg_stride, int ks, TO *att, float *lse, int B, int T, int64_t pos0) {
    if (B <= 0 || T <= 0) return M1C_OK;
    dim3 grid((T + BQ - 1) / BQ, a->nh, B);
    const float scale = 1.0f / sqrtf((float)a->hd);
    attn_fwd_kernel<TQ, TKV, TO><<<grid, NTHREADS, fwd_smem(a->hd), s>>>(q, kb, vb, kb_stride, kg_stride, ks, att, lse,
                                                                        T, a->nh, a->rep, a->hd, pos0, scale);
    return launched(a, "attention forward");
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* The tensor-core forward when it applies (a->tc and 16-byte aligned operands for its vector
 * loads); *done = 0 leaves the work to attend(). Keys as attend(): kb + b*kb_stride + g*kg_stride,
 * row stride ks (the layer's k (B, T, kd), or the KV cache (B, kvh, max_len, hd)); queries at
 * positions pos0 + i. The strides must keep rows 16-byte aligned (multiples of 8 elements). */
static int attend_tc(const sm_cuda *a, cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v,
                     int64_t kb_stride, int64_t kg_stride, int ks, bf16 *att, float *lse, int B, int T, int64_t pos0,
                     int *done) {
    *done = 0;
    if (!a->tc || !aligned16(q) || !aligned16(k) || !aligned16(v) || kb_stride % 8 ||
        kg_stride % 8 || ks % 8)
        return M1C_OK;
    *done = 1;
    const cudaError_t e = tc_attend_fwd(s, q, k, v, kb_stride, kg_stride, ks, att, lse, B, T, a->nh, a->rep, a->hd,
                                        pos0, a->wg);
    return cuda_failed(a, e, "attention forward (tensor cores)");
}

/* The tensor-core backward's D, dk, dv and dq when it applies; *done as above. */
/* Whether the BF16 backward runs on tensor cores (head_dim 64/128 and 16-byte aligned operands). */
static int tc_eligible(const sm_cuda *a, const void *q, const void *k, const void *v, const void *dO) {
    return a->tc && aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dO);
}

static int attend_bwd_tc(const sm_cuda *a, cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v,
                         const bf16 *att, const float *dO, bf16 *dO_lp, const float *lse, float *D, float *dq,
                         float *dk, float *dv, int B, int T, int *done) {
    *done = 0;
    if (!tc_eligible(a, q, k, v, dO) || !aligned16(dO_lp)) return M1C_OK;
    *done = 1;
    const char *what = "";
    const cudaError_t e =
        tc_attend_bwd(s, q, k, v, att, dO, dO_lp, lse, D, dq, dk, dv, B, T, a->nh, a->kvh, a->hd, a->wg, &what);
    return cuda_failed(a, e, what);
}

/* C (f32 or bf16) = op(A) op(B) with the layer's compute dtype for A and B. */
static int gemm(const sm_cuda *a, cudaStream_t s, int ta, int tb, int M, int N, int K, const void *A, int lda,
                const void *Bm, int ldb, float beta, void *C, int c_dtype, int ldc) {
    return a->h->gemm_ex(a->h, M1C_DEVICE_CUDA, s, ta, tb, M, N, K, 1.0f, A, a->dt, lda, 0, Bm, a->dt, ldb, 0, beta, C,
                         c_dtype, ldc, 0, 1);
}

/* Weights in the compute dtype: the f32 params, or their bf16 copies. */
static int weights(const sm_cuda *a, const m1c_layer_bufs *b, const void *W[N_PARAMS]) {
    const m1c_tensor *src = b->params;
    if (a->dt == M1C_BF16) {
        if (!b->params_lp) return a->h->error(a->h, "compute_dtype bf16 needs the bf16 parameter copies (params_lp)");
        src = b->params_lp;
    }
    for (int i = 0; i < N_PARAMS; i++) W[i] = src[i].data;
    return M1C_OK;
}

/* q, k, v (f32, B*T rows) = x W^T for x the layer input in the compute dtype; q, k roped (positions pos +
 * t) into qo, ko: in place (f32), or straight into bf16 copies (the rotation in f32, then the one
 * rounding that a separate conversion would make). */
template <typename TO>
static int project_qkv(const sm_cuda *a, const m1c_layer_bufs *b, cudaStream_t s, const void *x, const void *W[],
                       float *q, float *k, float *v, TO *qo, TO *ko, int B, int T, int64_t pos) {
    const int H = a->H, qd = a->nh * a->hd, kd = a->kvh * a->hd, M = B * T;
    float *cs = (float *)b->scratch[CS_ROPE].data;
    if (gemm(a, s, 0, 1, M, qd, H, x, H, W[P_Q], H, 0.0f, q, M1C_F32, qd) ||
        gemm(a, s, 0, 1, M, kd, H, x, H, W[P_K], H, 0.0f, k, M1C_F32, kd) ||
        gemm(a, s, 0, 1, M, kd, H, x, H, W[P_V], H, 0.0f, v, M1C_F32, kd) || rope_table(a, s, cs, T, pos) ||
        rope_apply(a, s, qo, q, B, T, a->nh, cs, 0) || rope_apply(a, s, ko, k, B, T, a->kvh, cs, 0))
        return M1C_ERR;
    return M1C_OK;
}

/* The layer input (or dout) in the compute dtype: in itself, the core's bf16 copy given (m1c_layer_bufs
 * in_lp, dout_lp), or a bf16 copy in scratch. */
static int input_lp(const sm_cuda *a, const m1c_layer_bufs *b, cudaStream_t s, const float *in, const void *given,
                    int64_t n, const void **x) {
    *x = in;
    if (a->dt != M1C_BF16) return M1C_OK;
    if (given) {
        *x = given;
        return M1C_OK;
    }
    bf16 *xl = (bf16 *)b->scratch[CS_XLP].data;
    *x = xl;
    return to_bf16(a, s, xl, in, n);
}

/* out = att Wo^T. At BF16 where the core offers to read the output as rows (m1c_layer_bufs.out_rows, the
 * identity of ABI 1.5), the product goes to the bf16 staging of the input instead (read by the projections
 * before), in half the bytes of out for the GEMM to write and for the core's norm to read. */
static int out_projection(const sm_cuda *a, const m1c_layer_bufs *b, cudaStream_t s, int64_t BT, const void *att,
                          const void *Wo, float *out) {
    const int qd = a->nh * a->hd, H = a->H;
    if (a->dt != M1C_BF16 || !b->out_rows) return gemm(a, s, 0, 1, (int)BT, H, qd, att, qd, Wo, qd, 0.0f, out, M1C_F32, H);
    bf16 *rows = (bf16 *)b->scratch[CS_XLP].data;
    if (gemm(a, s, 0, 1, (int)BT, H, qd, att, qd, Wo, qd, 0.0f, rows, M1C_BF16, H)) return M1C_ERR;
    m1c_out_rows_own(b->out_rows, rows, M1C_BF16);
    return M1C_OK;
}

extern "C" int sm_cuda_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    sm_cuda *a = (sm_cuda *)self;
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    cudaStream_t s = (cudaStream_t)b->stream;
    const int qd = a->nh * a->hd, kd = a->kvh * a->hd, H = a->H;
    const int64_t BT = (int64_t)B * T;
    const void *W[N_PARAMS], *x;
    if (weights(a, b, W) || input_lp(a, b, s, in, b->in_lp, BT * H, &x)) return M1C_ERR;
    float *lse = b->acts ? (float *)b->acts[A_LSE].data : (float *)b->scratch[CS_LSE].data;
    void *att;
    if (a->dt == M1C_F32) {
        /* f32: project straight into the kept activations (or scratch) and rope in place */
        float *q, *k, *v;
        if (b->acts) {
            q = (float *)b->acts[A_Q].data, k = (float *)b->acts[A_K].data, v = (float *)b->acts[A_V].data;
            att = b->acts[A_ATT].data;
        } else {
            q = (float *)b->scratch[CS_Q].data, k = (float *)b->scratch[CS_K].data, v = (float *)b->scratch[CS_V].data;
            att = b->scratch[CS_DATT].data;
        }
        if (project_qkv(a, b, s, x, W, q, k, v, q, k, B, T, 0) ||
            attend(a, s, q, k, v, (int64_t)T * kd, a->hd, kd, (float *)att, lse, B, T, 0))
            return M1C_ERR;
    } else {
        /* bf16: project to f32 scratch, rope from there into the kept bf16 copies */
        float *qf = (float *)b->scratch[CS_Q].data, *kf = (float *)b->scratch[CS_K].data;
        float *vf = (float *)b->scratch[CS_V].data;
        bf16 *q, *k, *v;
        if (b->acts) {
            q = (bf16 *)b->acts[A_Q].data, k = (bf16 *)b->acts[A_K].data, v = (bf16 *)b->acts[A_V].data;
            att = b->acts[A_ATT].data;
        } else {
            q = (bf16 *)b->scratch[CS_LP].data, k = q + BT * qd, v = k + BT * kd;
            att = v + BT * kd;
        }
        int done = 0;
        if (project_qkv(a, b, s, x, W, qf, kf, vf, q, k, B, T, 0) || to_bf16(a, s, v, vf, BT * kd) ||
            attend_tc(a, s, q, k, v, (int64_t)T * kd, a->hd, kd, (bf16 *)att, lse, B, T, 0, &done) ||
            (!done && attend(a, s, q, k, v, (int64_t)T * kd, a->hd, kd, (bf16 *)att, lse, B, T, 0)))
            return M1C_ERR;
    }
    return out_projection(a, b, s, BT, att, W[P_O], out);
}

extern "C" int sm_cuda_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in,
                                int B, int T) {
    sm_cuda *a = (sm_cuda *)self;
    const m1c_host *h = a->h;
    if (!b->acts) return h->error(h, "backward needs the activations of forward (acts is NULL)");
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    cudaStream_t s = (cudaStream_t)b->stream;
    if (B <= 0 || T <= 0) { /* nothing to add; a gradient handed over unset still needs its zeros */
        for (int i = 0; b->grads && i < N_PARAMS; i++)
            if ((b->grads[i].flags & M1C_TENSOR_UNSET) &&
                cudaMemsetAsync(b->grads[i].data, 0, (size_t)m1c_tensor_numel(&b->grads[i]) * sizeof(float), s))
                return h->error(h, "softmax: zeroing an unset gradient failed");
        return M1C_OK;
    }
    const int H = a->H, hd = a->hd, nh = a->nh, kvh = a->kvh, qd = nh * hd, kd = kvh * hd;
    const int M = B * T, dt = a->dt;
    const int64_t BT = (int64_t)B * T;
    const float scale = 1.0f / sqrtf((float)hd);
    const void *W[N_PARAMS];
    if (weights(a, b, W)) return M1C_ERR;
    const void *q = b->acts[A_Q].data, *k = b->acts[A_K].data, *v = b->acts[A_V].data, *att = b->acts[A_ATT].data;
    const float *lse = (const float *)b->acts[A_LSE].data;
    float *dq = (float *)b->scratch[CS_Q].data, *dk = (float *)b->scratch[CS_K].data;
    float *dv = (float *)b->scratch[CS_V].data, *datt = (float *)b->scratch[CS_DATT].data;
    float *D = (float *)b->scratch[CS_LSE].data, *cs = (float *)b->scratch[CS_ROPE].data;

    /* out = att Wo^T: datt = dout Wo, dWo += dout^T att */
    const void *dx;
    if (input_lp(a, b, s, dout, b->dout_lp, BT * H, &dx) ||
        gemm(a, s, 0, 0, M, qd, H, dx, H, W[P_O], qd, 0.0f, datt, M1C_F32, qd))
        return M1C_ERR;
    if (b->grads && gemm(a, s, 1, 0, H, qd, M, dx, H, att, qd, m1c_grad_beta(&b->grads[P_O]), b->grads[P_O].data,
                         M1C_F32, qd))
        return M1C_ERR;

    /* attention: D = rowsum(datt * att), then dk, dv per key tile and dq per query tile */
    const dim3 gkv((T + BK - 1) / BK, kvh, B), gq((T + BQ - 1) / BQ, nh, B);
    int done_tc = 0; /* BF16 attention backward done on tensor cores */
    if (dt == M1C_F32) {
        if (cuda_failed(a, rowdot_launch<float>(s, D, datt, (const float *)att, B, T, nh, hd), "rowdot"))
            return M1C_ERR;
        attn_bwd_kv_kernel<float><<<gkv, NTHREADS, bwd_kv_smem(hd), s>>>(
            (const float *)q, (const float *)k, (const float *)v, datt, lse, D, dk, dv, T, nh, kvh, hd, scale);
        if (launched(a, "attention backward dk dv")) return M1C_ERR;
        attn_bwd_q_kernel<float><<<gq, NTHREADS, bwd_q_smem(hd), s>>>((const float *)q, (const float *)k,
                                                                      (const float *)v, datt, lse, D, dq, T, nh, kvh,
                                                                      hd, scale);
        if (launched(a, "attention backward dq")) return M1C_ERR;
    } else {
        /* tensor cores (dO rounded to bf16 into the bf16 staging, free until the dq dk dv copies below, and D
         * from it), else D here for the kernels below */
        if (attend_bwd_tc(a, s, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, (const bf16 *)att, datt,
                          (bf16 *)b->scratch[CS_LP].data, lse, D, dq, dk, dv, B, T, &done_tc) ||
            (!done_tc && cuda_failed(a, rowdot_launch<bf16>(s, D, datt, (const bf16 *)att, B, T, nh, hd), "rowdot")))
            return M1C_ERR;
    }
    if (dt == M1C_BF16 && !done_tc) {
        attn_bwd_kv_kernel<bf16><<<gkv, NTHREADS, bwd_kv_smem(hd), s>>>(
            (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, datt, lse, D, dk, dv, T, nh, kvh, hd, scale);
        if (launched(a, "attention backward dk dv")) return M1C_ERR;
        attn_bwd_q_kernel<bf16><<<gq, NTHREADS, bwd_q_smem(hd), s>>>((const bf16 *)q, (const bf16 *)k,
                                                                     (const bf16 *)v, datt, lse, D, dq, T, nh, kvh, hd,
                                                                     scale);
        if (launched(a, "attention backward dq")) return M1C_ERR;
    }

    /* back through RoPE, the transpose rotation (at BF16 straight into the bf16 copies the products below
     * read: the rotation in f32, then one rounding); q = x Wq^T (and k, v): dW += d^T x, din += d W, with d
     * and x in the compute dtype */
    const void *x, *gq_ = dq, *gk_ = dk, *gv_ = dv;
    if (rope_table(a, s, cs, T, 0) || input_lp(a, b, s, in, b->in_lp, BT * H, &x)) /* dout's bf16 copy is consumed: reuse */
        return M1C_ERR;
    if (dt == M1C_BF16) {
        bf16 *l = (bf16 *)b->scratch[CS_LP].data;
        if (rope_apply(a, s, l, dq, B, T, nh, cs, 1) || rope_apply(a, s, l + BT * qd, dk, B, T, kvh, cs, 1) ||
            to_bf16(a, s, l + BT * (qd + kd), dv, BT * kd))
            return M1C_ERR;
        gq_ = l, gk_ = l + BT * qd, gv_ = l + BT * (qd + kd);
    } else if (rope_apply(a, s, dq, dq, B, T, nh, cs, 1) || rope_apply(a, s, dk, dk, B, T, kvh, cs, 1)) {
        return M1C_ERR;
    }
    if (b->grads && (gemm(a, s, 1, 0, qd, H, M, gq_, qd, x, H, m1c_grad_beta(&b->grads[P_Q]), b->grads[P_Q].data,
                          M1C_F32, H) ||
                     gemm(a, s, 1, 0, kd, H, M, gk_, kd, x, H, m1c_grad_beta(&b->grads[P_K]), b->grads[P_K].data,
                          M1C_F32, H) ||
                     gemm(a, s, 1, 0, kd, H, M, gv_, kd, x, H, m1c_grad_beta(&b->grads[P_V]), b->grads[P_V].data,
                          M1C_F32, H)))
        return M1C_ERR;
    if (gemm(a, s, 0, 0, M, H, qd, gq_, qd, W[P_Q], H, 1.0f, din, M1C_F32, H) ||
        gemm(a, s, 0, 0, M, H, kd, gk_, kd, W[P_K], H, 1.0f, din, M1C_F32, H) ||
        gemm(a, s, 0, 0, M, H, kd, gv_, kd, W[P_V], H, 1.0f, din, M1C_F32, H))
        return M1C_ERR;
    return M1C_OK;
}

/* T new tokens per sequence at positions pos..pos+T-1: project (q, k, v in f32), append roped k and v
 * to the cache (B, kvh, max_len, hd), attend over cache rows 0..pos+T-1. F32: f32 cache, CUDA-core
 * kernel. BF16: bf16 cache and bf16 q, the same roundings as forward; the tensor-core forward kernel
 * (head_dim 64/128) reads the keys straight from the cache with the queries at positions pos + i,
 * for any T (decoding included); other head dims use the CUDA-core kernel on the same bf16 data. */
extern "C" int sm_cuda_step(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B,
                            int T, int64_t pos) {
    sm_cuda *a = (sm_cuda *)self;
    const m1c_host *h = a->h;
    const int hd = a->hd, qd = a->nh * hd, kd = a->kvh * hd, H = a->H;
    const m1c_tensor *kc = &state[ST_K], *vc = &state[ST_V];
    const int64_t max_len = kc->shape[2];
    const int cdt = a->dt == M1C_BF16 ? M1C_BF16 : M1C_F32; /* softmax.c's state() declares this dtype */
    if (kc->dtype != cdt || vc->dtype != cdt || kc->ndim != 4 || kc->shape[1] != a->kvh || kc->shape[3] != hd ||
        vc->shape[2] != max_len || vc->shape[0] != kc->shape[0])
        return h->error(h, "step: the KV cache is not the %s (batch, %d, max_len, %d) of state()",
                        cdt == M1C_BF16 ? "bf16" : "f32", a->kvh, hd);
    if (B > kc->shape[0])
        return h->error(h, "step: B = %d sequences but the KV cache holds %lld", B, (long long)kc->shape[0]);
    if (pos < 0 || pos + T > max_len)
        return h->error(h, "step: positions %lld..%lld exceed the KV cache length %lld", (long long)pos,
                        (long long)(pos + T - 1), (long long)max_len);
    if (check_scratch(a, b, B, T) != M1C_OK) return M1C_ERR;
    if (B <= 0 || T <= 0) return M1C_OK;
    cudaStream_t s = (cudaStream_t)b->stream;
    const int64_t BT = (int64_t)B * T;
    const void *W[N_PARAMS], *x;
    float *q = (float *)b->scratch[CS_Q].data, *k = (float *)b->scratch[CS_K].data;
    float *v = (float *)b->scratch[CS_V].data;
    const int64_t gstride = max_len * hd, bstride = (int64_t)a->kvh * gstride;
    if (weights(a, b, W) || input_lp(a, b, s, in, b->in_lp, BT * H, &x) ||
        project_qkv(a, b, s, x, W, q, k, v, q, k, B, T, pos))
        return M1C_ERR;
    const int agrid = grid_for(BT * kd);
    void *att;
    if (cdt == M1C_F32) {
        float *kcache = (float *)kc->data, *vcache = (float *)vc->data;
        kv_append_kernel<float><<<agrid, NTHREADS, 0, s>>>(kcache, vcache, k, v, B, T, a->kvh, hd, max_len, pos,
                                                           bstride);
        if (launched(a, "kv_append")) return M1C_ERR;
        att = b->scratch[CS_DATT].data;
        if (attend(a, s, (const float *)q, (const float *)kcache, (const float *)vcache, bstride, gstride, hd,
                   (float *)att, (float *)NULL, B, T, pos))
            return M1C_ERR;
    } else {
        bf16 *kcache = (bf16 *)kc->data, *vcache = (bf16 *)vc->data;
        bf16 *ql = (bf16 *)b->scratch[CS_LP].data, *al = ql + BT * qd; /* bf16 q, then att */
        kv_append_kernel<bf16><<<agrid, NTHREADS, 0, s>>>(kcache, vcache, k, v, B, T, a->kvh, hd, max_len, pos,
                                                          bstride);
        if (launched(a, "kv_append")) return M1C_ERR;
        att = al;
        int done = 0;
        if (to_bf16(a, s, ql, q, BT * qd) ||
            attend_tc(a, s, ql, kcache, vcache, bstride, gstride, hd, al, (float *)NULL, B, T, pos, &done) ||
            (!done && attend(a, s, (const bf16 *)ql, (const bf16 *)kcache, (const bf16 *)vcache, bstride, gstride, hd,
                             al, (float *)NULL, B, T, pos)))
            return M1C_ERR;
    }
    return out_projection(a, b, s, BT, att, W[P_O], out);
}
