/* CUDA versions of the core's own layers (core/ops.h): embedding, RMSNorm, the LM head with
 * log-softmax, residual arithmetic and reductions. Correct and simple first: one block per row for
 * the row-wise operations, grid-stride loops for the elementwise ones; the head's products go through
 * cuBLAS at the precision the config asks for. */
#include <cub/cub.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"
#include "ops.h"
#include "reduce.cuh"

static void check_launch(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "m1c: CUDA kernel %s: %s\n", what, cudaGetErrorString(e));
        abort();
    }
}

static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "m1c: CUDA error in %s: %s\n", what, cudaGetErrorString(e));
        abort();
    }
}

static int grid_for(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    return (int)(g > 65535 * 8 ? 65535 * 8 : (g < 1 ? 1 : g));
}

/* ---- embedding ---- */

__global__ static void embed_fwd(float *out, const int32_t *ids, const float *wte, int64_t N, int H) {
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *row = wte + (int64_t)ids[i] * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) out[i * H + c] = row[c];
    }
}

/* The embedding gradient in a fixed order (no float atomics: the same ids and dout give the same bits):
 * the token positions sorted by id (a stable radix sort keeps positions ascending within an id), then
 * one block per run of equal ids adds its rows in that order. */
__global__ static void embed_keys(int32_t *key, int32_t *pos, const int32_t *ids, int64_t N) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x)
        key[i] = ids[i], pos[i] = (int32_t)i;
}

/* Block b < *nruns: the run of sorted entries [start[b], start[b] + len[b]) shares the id key[start[b]]. */
__global__ static void embed_bwd(float *dwte, const float *dout, const int32_t *key, const int32_t *pos,
                                 const int32_t *start, const int32_t *len, const int32_t *nruns, int H) {
    for (int b = blockIdx.x; b < *nruns; b += gridDim.x) {
        const int32_t s0 = start[b], n = len[b];
        float *row = dwte + (int64_t)key[s0] * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float acc = 0.0f;
            for (int32_t j = 0; j < n; j++) acc += dout[(int64_t)pos[s0 + j] * H + c];
            row[c] += acc;
        }
    }
}

extern "C" void m1c_cuda_embed_forward(float *out, const int32_t *ids, const float *wte, int64_t N, int H) {
    if (N <= 0) return;
    embed_fwd<<<grid_for(N, 1), 256>>>(out, ids, wte, N, H);
    check_launch("embed_forward");
}

extern "C" void m1c_cuda_embed_backward(float *dwte, const float *dout, const int32_t *ids, int64_t N, int H) {
    if (N <= 0) return;
    if (N > INT32_MAX) {
        fprintf(stderr, "m1c: embedding backward over %lld tokens exceeds the 32-bit sort\n", (long long)N);
        abort();
    }
    const int n = (int)N;
    /* work: keys, positions (in and sorted), run starts, lengths, unique ids, run count; then CUB's */
    int32_t *w = NULL;
    check(cudaMallocAsync((void **)&w, (size_t)(7 * (int64_t)n + 1) * sizeof(int32_t), 0), "cudaMallocAsync");
    int32_t *key = w, *pos = w + n, *skey = w + 2 * (int64_t)n, *spos = w + 3 * (int64_t)n, *start = w + 4 * (int64_t)n;
    int32_t *len = w + 5 * (int64_t)n, *uniq = w + 6 * (int64_t)n, *nruns = w + 7 * (int64_t)n;
    embed_keys<<<grid_for(N, 256), 256>>>(key, pos, ids, N);
    check_launch("embed_backward (keys)");
    size_t t1 = 0, t2 = 0, t3 = 0;
    check(cub::DeviceRadixSort::SortPairs(NULL, t1, key, skey, pos, spos, n), "cub sort (size)");
    check(cub::DeviceRunLengthEncode::Encode(NULL, t2, skey, uniq, len, nruns, n), "cub encode (size)");
    check(cub::DeviceScan::ExclusiveSum(NULL, t3, len, start, n), "cub scan (size)");
    const size_t tb = t1 > t2 ? (t1 > t3 ? t1 : t3) : (t2 > t3 ? t2 : t3);
    void *tmp = NULL;
    check(cudaMallocAsync(&tmp, tb ? tb : 1, 0), "cudaMallocAsync");
    check(cub::DeviceRadixSort::SortPairs(tmp, t1, key, skey, pos, spos, n), "cub sort");
    check(cub::DeviceRunLengthEncode::Encode(tmp, t2, skey, uniq, len, nruns, n), "cub encode");
    check(cub::DeviceScan::ExclusiveSum(tmp, t3, len, start, n), "cub scan");
    embed_bwd<<<grid_for(N, 1) < 65535 * 8 ? grid_for(N, 1) : 65535 * 8, 256>>>(dwte, dout, skey, spos, start, len,
                                                                               nruns, H);
    check_launch("embed_backward");
    check(cudaFreeAsync(tmp, 0), "cudaFreeAsync");
    check(cudaFreeAsync(w, 0), "cudaFreeAsync");
}

/* ---- RMSNorm ---- */

__global__ static void rmsnorm_fwd(float *out, float *rstd, const float *in, const float *w, int64_t N, int C,
                                   float eps) {
    __shared__ float sh[32];
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *x = in + i * C;
        float ss = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) ss += x[c] * x[c];
        ss = block_reduce(ss, sh, 0.0f, red_add());
        float r = rsqrtf(ss / (float)C + eps);
        if (threadIdx.x == 0) rstd[i] = r;
        for (int c = threadIdx.x; c < C; c += blockDim.x) out[i * C + c] = x[c] * r * w[c];
    }
}

/* din += r (g w) - x r^3 mean(g w x) per row. */
__global__ static void rmsnorm_bwd_in(float *din, const float *dout, const float *in, const float *w,
                                      const float *rstd, int64_t N, int C) {
    __shared__ float sh[32];
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *x = in + i * C, *g = dout + i * C;
        float dot = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) dot += g[c] * w[c] * x[c];
        dot = block_reduce(dot, sh, 0.0f, red_add());
        float r = rstd[i], k = r * r * r * dot / (float)C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) din[i * C + c] += r * g[c] * w[c] - k * x[c];
    }
}

/* dw[c] += sum_i g x r over rows, in a fixed order: block (x, y) sums 32 columns over row chunk y (8 rows
 * of threads, then those 8 partial sums in order) into part[y][c]; rmsnorm_bwd_w_sum adds the chunks in
 * order. No float atomics: the same inputs give the same bits. */
enum { RMS_CHUNKS = 128 };
__global__ static void rmsnorm_bwd_w(float *part, const float *dout, const float *in, const float *rstd, int64_t N,
                                     int C) {
    __shared__ float sh[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int64_t per = (N + gridDim.y - 1) / gridDim.y, i0 = blockIdx.y * per, i1 = i0 + per < N ? i0 + per : N;
    float s = 0;
    if (c < C)
        for (int64_t i = i0 + threadIdx.y; i < i1; i += 8) s += dout[i * C + c] * in[i * C + c] * rstd[i];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0;
        for (int k = 0; k < 8; k++) t += sh[k][threadIdx.x];
        part[(int64_t)blockIdx.y * C + c] = t;
    }
}

__global__ static void rmsnorm_bwd_w_sum(float *dw, const float *part, int chunks, int C) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
        float t = 0;
        for (int k = 0; k < chunks; k++) t += part[(int64_t)k * C + c];
        dw[c] += t;
    }
}

extern "C" void m1c_cuda_rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int64_t N, int C,
                                         float eps) {
    if (N <= 0) return;
    rmsnorm_fwd<<<grid_for(N, 1), 256>>>(out, rstd, in, w, N, C, eps);
    check_launch("rmsnorm_forward");
}

extern "C" void m1c_cuda_rmsnorm_backward(float *din, float *dw, const float *dout, const float *in, const float *w,
                                          const float *rstd, int64_t N, int C) {
    if (N <= 0) return;
    rmsnorm_bwd_in<<<grid_for(N, 1), 256>>>(din, dout, in, w, rstd, N, C);
    check_launch("rmsnorm_backward (input)");
    const int chunks = N < RMS_CHUNKS * 8 ? (int)((N + 7) / 8) : RMS_CHUNKS;
    float *part = NULL;
    check(cudaMallocAsync((void **)&part, (size_t)chunks * C * sizeof(float), 0), "cudaMallocAsync");
    rmsnorm_bwd_w<<<dim3((C + 31) / 32, chunks), dim3(32, 8)>>>(part, dout, in, rstd, N, C);
    check_launch("rmsnorm_backward (weight)");
    rmsnorm_bwd_w_sum<<<grid_for(C, 256), 256>>>(dw, part, chunks, C);
    check_launch("rmsnorm_backward (weight sum)");
    check(cudaFreeAsync(part, 0), "cudaFreeAsync");
}

/* ---- the LM head ---- */

static cublasHandle_t head_handle(void) {
    static thread_local cublasHandle_t h;
    if (!h && cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c: cublasCreate failed\n");
        abort();
    }
    return h;
}

__global__ static void f32_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

/* x = hi + lo with hi exact in TF32 (10-bit mantissa, rounded to nearest) and lo the f32 remainder. */
__global__ static void split_tf32(float *hi, float *lo, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t u = __float_as_uint(x[i]);
        uint32_t r = (u + 0x1000u) & 0xffffe000u; /* round to 10 mantissa bits (ties away from zero) */
        float h = __uint_as_float(r);
        if (!isfinite(h)) h = x[i]; /* NaN, Inf, or rounding up past FLT_MAX: no remainder */
        hi[i] = h;
        lo[i] = isfinite(h) ? x[i] - h : 0.0f;
    }
}

/* A device buffer of at least n elements of `size` bytes kept for the next call (per host thread
 * and slot): the head runs at every step with the same sizes, so nothing is allocated after the first. */
static void *cached(int slot, int64_t n, size_t size) {
    static thread_local void *buf[6];
    static thread_local int64_t cap[6];
    if (n * (int64_t)size > cap[slot]) {
        cudaFree(buf[slot]);
        if (cudaMalloc(&buf[slot], (size_t)n * size) != cudaSuccess) {
            fprintf(stderr, "m1c: out of GPU memory in the LM head\n");
            abort();
        }
        cap[slot] = n * (int64_t)size;
    }
    return buf[slot];
}

/* Row-major C (M x N) = alpha op(A) op(B) + beta C at the head's precision (0 fp32, 1 tf32, 2 bf16
 * operands, 3 tf32x3), all pointers f32; converted operands go to cached buffers. */
static void head_gemm(int precision, int ta, int tb, int M, int N, int K, const float *A, int lda, int64_t a_n,
                      const float *B, int ldb, int64_t b_n, float beta, float *C, int ldc) {
    cublasHandle_t h = head_handle();
    const float one = 1.0f;
    cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st;
    if (precision == 3) {
        float *ah = (float *)cached(2, a_n, 4), *al = (float *)cached(3, a_n, 4);
        float *bh = (float *)cached(4, b_n, 4), *bl = (float *)cached(5, b_n, 4);
        split_tf32<<<grid_for(a_n, 256), 256>>>(ah, al, A, a_n);
        split_tf32<<<grid_for(b_n, 256), 256>>>(bh, bl, B, b_n);
        check_launch("head tf32 split");
        /* the small terms first, then the large one, so the f32 accumulation loses the least */
        const float *pa[3] = {al, ah, ah}, *pb[3] = {bh, bl, bh};
        st = CUBLAS_STATUS_SUCCESS;
        for (int t = 0; t < 3 && st == CUBLAS_STATUS_SUCCESS; t++) {
            const float bt = t == 0 ? beta : 1.0f;
            st = cublasGemmEx(h, ob, oa, N, M, K, &one, pb[t], CUDA_R_32F, ldb, pa[t], CUDA_R_32F, lda, &bt, C,
                              CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT);
        }
    } else if (precision == 2) {
        __nv_bfloat16 *a16 = (__nv_bfloat16 *)cached(0, a_n, 2), *b16 = (__nv_bfloat16 *)cached(1, b_n, 2);
        f32_to_bf16<<<grid_for(a_n, 256), 256>>>(a16, A, a_n);
        f32_to_bf16<<<grid_for(b_n, 256), 256>>>(b16, B, b_n);
        check_launch("head bf16 conversion");
        st = cublasGemmEx(h, ob, oa, N, M, K, &one, b16, CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda, &beta, C, CUDA_R_32F,
                          ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    } else {
        cublasComputeType_t ct = precision == 1 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
        st = cublasGemmEx(h, ob, oa, N, M, K, &one, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F, ldc,
                          ct, CUBLAS_GEMM_DEFAULT);
    }
    if (st != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "m1c: cublasGemmEx (LM head) failed (%d)\n", (int)st);
        abort();
    }
}

__global__ static void logsoftmax_rows(float *lse, float *logp, const float *logits, const int32_t *targets,
                                       int64_t N, int V) {
    __shared__ float sh[32];
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const float *z = logits + i * (int64_t)V;
        float m = -INFINITY;
        for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, z[v]);
        m = block_reduce(m, sh, -INFINITY, red_fmax());
        float s = 0;
        for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(z[v] - m);
        s = block_reduce(s, sh, 0.0f, red_add());
        if (threadIdx.x == 0) {
            float l = m + logf(s);
            lse[i] = l;
            if (logp) logp[i] = targets[i] >= 0 ? z[targets[i]] - l : 0.0f;
        }
    }
}

/* dlogits = dlogp * (onehot - softmax), in place. */
__global__ static void logsoftmax_bwd(float *logits, const float *lse, const float *dlogp, const int32_t *targets,
                                      int64_t N, int V) {
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        float *z = logits + i * (int64_t)V;
        int32_t t = targets[i];
        float g = t >= 0 ? dlogp[i] : 0.0f, l = lse[i];
        for (int v = threadIdx.x; v < V; v += blockDim.x) z[v] = -g * expf(z[v] - l) + (v == t ? g : 0.0f);
    }
}

extern "C" void m1c_cuda_head_forward(int precision, float *logits, float *lse, float *logp, const float *h,
                                      const float *W, const int32_t *targets, int64_t N, int H, int V) {
    if (N <= 0) return;
    head_gemm(precision, 0, 1, (int)N, V, H, h, H, N * H, W, H, (int64_t)V * H, 0.0f, logits, V);
    logsoftmax_rows<<<grid_for(N, 1), 256>>>(lse, logp, logits, targets, N, V);
    check_launch("head log-softmax");
}

extern "C" void m1c_cuda_head_backward(int precision, float *dh, float *dW, float *logits, const float *lse,
                                       const float *dlogp, const float *h, const float *W, const int32_t *targets,
                                       int64_t N, int H, int V) {
    if (N <= 0) return;
    logsoftmax_bwd<<<grid_for(N, 1), 256>>>(logits, lse, dlogp, targets, N, V);
    check_launch("head log-softmax backward");
    head_gemm(precision, 0, 0, (int)N, H, V, logits, V, N * V, W, H, (int64_t)V * H, 1.0f, dh, H);
    head_gemm(precision, 1, 0, V, H, (int)N, logits, V, N * V, h, H, N * H, 1.0f, dW, H);
}

/* ---- elementwise and reductions ---- */

__global__ static void residual_k(float *y, const float *h, float a, float b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = a * h[i] + b * y[i];
}

__global__ static void axpby_k(float *y, float *z, const float *x, float a, float b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = a * v;
        z[i] = b * v;
    }
}

__global__ static void scale_k(float *x, int64_t n, float s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

/* Per-block partial sums in double (deterministic: fixed grid, fixed order), summed on the host. */
__global__ static void sumsq_k(double *part, const float *x, int64_t n) {
    __shared__ double sh[256];
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

__global__ static void nonfinite_k(unsigned long long *count, const float *x, int64_t n) {
    unsigned long long k = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        k += !isfinite(x[i]);
    if (k) atomicAdd(count, k);
}

extern "C" void m1c_cuda_residual(float *y, const float *h, float a, float b, int64_t n) {
    if (n <= 0) return;
    residual_k<<<grid_for(n, 256), 256>>>(y, h, a, b, n);
    check_launch("residual");
}

extern "C" void m1c_cuda_axpby(float *y, float *z, const float *x, float a, float b, int64_t n) {
    if (n <= 0) return;
    axpby_k<<<grid_for(n, 256), 256>>>(y, z, x, a, b, n);
    check_launch("axpby");
}

extern "C" void m1c_cuda_scale(float *x, int64_t n, float s) {
    if (n <= 0) return;
    scale_k<<<grid_for(n, 256), 256>>>(x, n, s);
    check_launch("scale");
}

extern "C" double m1c_cuda_sumsq(const float *x, int64_t n) {
    if (n <= 0) return 0;
    enum { BLOCKS = 1024 };
    double *part = NULL, host[BLOCKS];
    if (cudaMalloc(&part, sizeof host) != cudaSuccess) {
        fprintf(stderr, "m1c: out of GPU memory (sumsq)\n");
        abort();
    }
    sumsq_k<<<BLOCKS, 256>>>(part, x, n);
    check_launch("sumsq");
    check(cudaMemcpy(host, part, sizeof host, cudaMemcpyDeviceToHost), "sumsq copy");
    check(cudaFree(part), "sumsq free");
    double s = 0;
    for (int i = 0; i < BLOCKS; i++) s += host[i];
    return s;
}

extern "C" int64_t m1c_cuda_count_nonfinite(const float *x, int64_t n) {
    if (n <= 0) return 0;
    unsigned long long *d = NULL, k = 0;
    if (cudaMalloc(&d, sizeof k) != cudaSuccess) {
        fprintf(stderr, "m1c: out of GPU memory (nonfinite)\n");
        abort();
    }
    check(cudaMemset(d, 0, sizeof k), "count_nonfinite memset");
    nonfinite_k<<<grid_for(n, 256) < 1024 ? grid_for(n, 256) : 1024, 256>>>(d, x, n);
    check_launch("count_nonfinite");
    check(cudaMemcpy(&k, d, sizeof k, cudaMemcpyDeviceToHost), "count_nonfinite copy");
    check(cudaFree(d), "count_nonfinite free");
    return (int64_t)k;
}

extern "C" void m1c_cuda_to_bf16(uint16_t *dst, const float *src, int64_t n) {
    if (n <= 0) return;
    f32_to_bf16<<<grid_for(n, 256), 256>>>((__nv_bfloat16 *)dst, src, n);
    check_launch("to_bf16");
}
