/* The softmax-attention kernels on tensor cores (BF16 compute, head_dim 64 or 128: forward, and backward's
 * D = rowsum(dO * O), dk dv, dq; the kernels are in softmax_fa.cuh) with their host launchers, shared by the
 * plugin (softmax.cu) and the stand-alone benchmark (bench/bench_softmax.cu). Layouts are the plugin's: q, att (B, T, nh*hd) and k, v
 * (B, T, kvh*hd) in bf16, lse and D (B, nh, T) f32, dO, dq, dk, dv f32 in the q / k layouts. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
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

/* D[b, h, t] = sum_d dO * O over one head's row (backward's softmax correction) for the CUDA-core
 * kernels; one warp per row. (The tensor-core backward computes D in fa_prep_kernel.) */
template <typename TA>
__global__ static void rowdot_kernel(float *D, const float *dO, const TA *O, int B, int T, int nh, int hd) {
    const int64_t rows = (int64_t)B * T * nh;
    const int lane = threadIdx.x % 32;
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; r < rows;
         r += (int64_t)gridDim.x * blockDim.x / 32) {
        const int64_t bt = r / nh, hh = r % nh, b = bt / T, t = bt % T; /* r indexes (b, t, h) rows */
        const float *x = dO + r * hd;
        const TA *y = O + r * hd;
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32)
            s += x[d] * ld(y + d);
        s = warp_sum(s);
        if (lane == 0) D[(b * nh + hh) * T + t] = s;
    }
}

/* ---- host launchers (attend_tc / attend_bwd_tc in softmax.cu, and bench/bench_softmax.cu) ---------- */

#include "softmax_fa.cuh"
#include "softmax_wg.cuh"

#define ROWDOT_THREADS 256 /* rowdot_kernel's block: 8 rows, one warp each */

/* The largest dynamic shared memory of the tensor-core kernels of head_dim hd (64 or 128). */
static inline size_t tc_smem_max(int hd) {
    const size_t f = hd == 64 ? sizeof(fa_fwd_smem<64>) : sizeof(fa_fwd_smem<128>);
    const size_t kv = hd == 64 ? sizeof(fa_dkv_smem<64>) : sizeof(fa_dkv_smem<128>);
    const size_t q = hd == 64 ? sizeof(fa_dq_smem<64>) : sizeof(fa_dq_smem<128>);
    const size_t wkv = hd == 64 ? wg_smem_bytes<fw_dkv_smem<64>>() : wg_smem_bytes<fw_dkv_smem<128>>();
    const size_t wf = hd == 64 ? wg_smem_bytes<fw_fwd_smem<64>>() : wg_smem_bytes<fw_fwd_smem<128>>();
    const size_t wq = hd == 64 ? wg_smem_bytes<fw_dq_smem<64>>() : wg_smem_bytes<fw_dq_smem<128>>();
    size_t m = f > kv ? f : kv;
    m = m > q ? m : q;
    if (wg_available()) {
        m = m > wkv ? m : wkv;
        m = m > wq ? m : wq;
        m = m > wf ? m : wf;
    }
    return m;
}

/* kernel's dynamic shared memory allowed up to n bytes, *bytes = n (the size refused, if it is). */
template <typename K> static inline cudaError_t tc_allow(K kernel, size_t n, size_t *bytes) {
    *bytes = n;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)n);
}

template <int HD> static inline cudaError_t tc_raise_smem_hd(size_t *bytes) {
    cudaError_t e;
    if ((e = tc_allow(fa_fwd_kernel<HD>, sizeof(fa_fwd_smem<HD>), bytes)) != cudaSuccess ||
        (e = tc_allow(fa_bwd_kv_kernel<HD>, sizeof(fa_dkv_smem<HD>), bytes)) != cudaSuccess ||
        (e = tc_allow(fa_bwd_q_kernel<HD>, sizeof(fa_dq_smem<HD>), bytes)) != cudaSuccess || !wg_available())
        return e;
    if ((e = tc_allow(fw_fwd_kernel<HD>, wg_smem_bytes<fw_fwd_smem<HD>>(), bytes)) != cudaSuccess ||
        (e = tc_allow(fw_bwd_kv_kernel<HD>, wg_smem_bytes<fw_dkv_smem<HD>>(), bytes)) != cudaSuccess)
        return e;
    return tc_allow(fw_bwd_q_kernel<HD>, wg_smem_bytes<fw_dq_smem<HD>>(), bytes);
}

/* Allows the tensor-core kernels of head_dim hd (64 or 128) their dynamic shared memory (above the
 * default 48 KB); once per device before they launch. On failure *bytes is the size refused. */
static inline cudaError_t tc_raise_smem(int hd, size_t *bytes) {
    *bytes = 0;
    if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
    return hd == 64 ? tc_raise_smem_hd<64>(bytes) : tc_raise_smem_hd<128>(bytes);
}

/* D (B, nh, T) = rowsum(dO * O) over the B*T*nh rows of hd (see rowdot_kernel). B, T, nh >= 1. */
template <typename TA>
static cudaError_t rowdot_launch(cudaStream_t s, float *D, const float *dO, const TA *O, int B, int T, int nh, int hd) {
    const int64_t rows = (int64_t)B * T * nh, g = (rows * 32 + ROWDOT_THREADS - 1) / ROWDOT_THREADS;
    rowdot_kernel<TA><<<(int)(g > 65535 * 8 ? 65535 * 8 : g), ROWDOT_THREADS, 0, s>>>(D, dO, O, B, T, nh, hd);
    return cudaGetLastError();
}

/* The tensor-core forward: att (B, T, nh*hd) bf16 and lse (B, nh, T) f32 (lse may be NULL) for queries
 * q (B, T, nh*hd) at positions pos0 + i, attending causally to the keys and values of KV head g = h / rep
 * at kb + b*kb_stride + g*kg_stride, row stride ks: the layer's k, v (B, T, kvh*hd) are kb_stride =
 * T*kvh*hd, kg_stride = hd, ks = kvh*hd (a KV cache (B, kvh, max_len, hd): kvh*max_len*hd, max_len*hd,
 * hd). Needs hd 64 or 128, 16-byte aligned operands, strides that are multiples of 8, tc_raise_smem.
 * wg: on warpgroup MMA (softmax_wg.cuh; only where wg_available). */
static inline cudaError_t tc_attend_fwd(cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v,
                                        int64_t kb_stride, int64_t kg_stride, int ks, bf16 *att, float *lse, int B,
                                        int T, int nh, int rep, int hd, int64_t pos0, int wg) {
    if (B <= 0 || T <= 0) return cudaSuccess;
    if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    if (wg) {
        const dim3 grid((T + FW_T - 1) / FW_T, nh, B);
        if (hd == 64)
            fw_fwd_kernel<64><<<grid, 128, wg_smem_bytes<fw_fwd_smem<64>>(), s>>>(q, k, v, kb_stride, kg_stride, ks, att,
                                                                                 lse, T, nh, rep, pos0, scale_log2);
        else
            fw_fwd_kernel<128><<<grid, 128, wg_smem_bytes<fw_fwd_smem<128>>(), s>>>(
                q, k, v, kb_stride, kg_stride, ks, att, lse, T, nh, rep, pos0, scale_log2);
        return cudaGetLastError();
    }
    const int tq = hd == 64 ? fa_tq<64>() : fa_tq<128>();
    const dim3 grid((T + tq - 1) / tq, nh, B);
    if (hd == 64)
        fa_fwd_kernel<64><<<grid, 32 * FA_FW, sizeof(fa_fwd_smem<64>), s>>>(q, k, v, kb_stride, kg_stride, ks, att, lse,
                                                                             T, nh, rep, pos0, scale_log2);
    else
        fa_fwd_kernel<128><<<grid, 32 * FA_FW, sizeof(fa_fwd_smem<128>), s>>>(q, k, v, kb_stride, kg_stride, ks, att,
                                                                               lse, T, nh, rep, pos0, scale_log2);
    return cudaGetLastError();
}

/* The tensor-core backward of the layer's causal attention (pos0 = 0): D = rowsum(dO * att) (dO rounded
 * to bf16 as the kernels read it), then dk, dv (B, T, kvh*hd) and dq (B, T, nh*hd) in f32, written (not
 * accumulated). q, att (B, T, nh*hd) and k, v (B, T, kvh*hd) bf16 and lse (B, nh, T) from the forward,
 * dO (B, T, nh*hd) f32, dO_lp (B, T, nh*hd) bf16 and D (B, nh, T) f32 scratch. Needs what tc_attend_fwd
 * needs (dO and dO_lp 16-byte aligned too) and nh a multiple of kvh. wg: dk dv and dq on warpgroup MMA
 * (softmax_wg.cuh; only where wg_available). On failure *what names the launch that failed. */
static inline cudaError_t tc_attend_bwd(cudaStream_t s, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *att,
                                        const float *dO, bf16 *dO_lp, const float *lse, float *D, float *dq, float *dk,
                                        float *dv, int B, int T, int nh, int kvh, int hd, int wg, const char **what) {
    *what = "attention backward (tensor cores)";
    if (B <= 0 || T <= 0) return cudaSuccess;
    if ((hd != 64 && hd != 128) || kvh <= 0 || nh % kvh) return cudaErrorInvalidValue;
    const int tq = hd == 64 ? fa_tq<64>() : fa_tq<128>();
    const dim3 gkv((T + FA_T - 1) / FA_T, kvh, B), gq((T + tq - 1) / tq, nh, B);
    const float scale = 1.0f / sqrtf((float)hd), scale_log2 = 1.4426950408889634f * scale;
    *what = "attention backward D and bf16 dO";
    /* fa_prep_kernel: blocks of 8 warps, each warp ~4 groups of rows (32 / fa_pl rows a group) */
    const int64_t rows = (int64_t)B * T * nh, rpw = 32 / (hd == 64 ? fa_pl<64>() : fa_pl<128>());
    const int64_t pg = (rows + 32 * rpw - 1) / (32 * rpw);
    const int pgrid = (int)(pg > 65535 * 8 ? 65535 * 8 : pg);
    if (hd == 64)
        fa_prep_kernel<64><<<pgrid, 256, 0, s>>>(dO_lp, D, dO, att, T, nh, rows);
    else
        fa_prep_kernel<128><<<pgrid, 256, 0, s>>>(dO_lp, D, dO, att, T, nh, rows);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (wg) {
        const dim3 g((T + FW_T - 1) / FW_T, kvh, B), gw((T + FW_T - 1) / FW_T, nh, B);
        *what = "attention backward dk dv (warpgroup MMA)";
        if (hd == 64)
            fw_bwd_kv_kernel<64><<<g, 128, wg_smem_bytes<fw_dkv_smem<64>>(), s>>>(q, k, v, dO_lp, lse, D, dk, dv, T, nh,
                                                                                 kvh, scale, scale_log2);
        else
            fw_bwd_kv_kernel<128><<<g, 128, wg_smem_bytes<fw_dkv_smem<128>>(), s>>>(q, k, v, dO_lp, lse, D, dk, dv, T,
                                                                                   nh, kvh, scale, scale_log2);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
        *what = "attention backward dq (warpgroup MMA)";
        if (hd == 64)
            fw_bwd_q_kernel<64><<<gw, 128, wg_smem_bytes<fw_dq_smem<64>>(), s>>>(q, k, v, dO_lp, lse, D, dq, T, nh, kvh,
                                                                                scale, scale_log2);
        else
            fw_bwd_q_kernel<128><<<gw, 128, wg_smem_bytes<fw_dq_smem<128>>(), s>>>(q, k, v, dO_lp, lse, D, dq, T, nh,
                                                                                  kvh, scale, scale_log2);
        return cudaGetLastError();
    }
    *what = "attention backward dk dv (tensor cores)";
    if (hd == 64)
        fa_bwd_kv_kernel<64><<<gkv, FA_THREADS, sizeof(fa_dkv_smem<64>), s>>>(q, k, v, dO_lp, lse, D, dk, dv, T, nh, kvh,
                                                                              scale, scale_log2);
    else
        fa_bwd_kv_kernel<128><<<gkv, FA_THREADS, sizeof(fa_dkv_smem<128>), s>>>(q, k, v, dO_lp, lse, D, dk, dv, T, nh,
                                                                                kvh, scale, scale_log2);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    *what = "attention backward dq (tensor cores)";
    if (hd == 64)
        fa_bwd_q_kernel<64><<<gq, 32 * FA_FW, sizeof(fa_dq_smem<64>), s>>>(q, k, v, dO_lp, lse, D, dq, T, nh, kvh, scale,
                                                                           scale_log2);
    else
        fa_bwd_q_kernel<128><<<gq, 32 * FA_FW, sizeof(fa_dq_smem<128>), s>>>(q, k, v, dO_lp, lse, D, dq, T, nh, kvh,
                                                                             scale, scale_log2);
    return cudaGetLastError();
}
