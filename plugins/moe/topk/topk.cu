/* topk on CUDA: the same math as topk.c (read its header comment), for compute dtypes F32 and BF16.
 *
 * Forward: (jitter) -> router GEMM in f32 from the f32 input (BF16 too: routing equals the CPU's) ->
 * softmax + top-k + renormalisation, one thread per token -> capacity and a stable counting sort by
 * expert (one block per expert ranks its assignments in token order, so the same assignments are
 * dropped as on the CPU; a one-thread scan gives the offsets; a scatter places the rows) -> aux loss
 * (one block, double) -> gather rows (cast to the compute dtype) -> per-expert GEMMs through
 * h->gemm_ex (the expert offsets are copied to the host once per call) -> SwiGLU -> down GEMM into f32
 * rows -> combine: each token gathers its k expert rows (no atomics, fixed order).
 * Backward mirrors topk.c: per-token router kernel (d weights, renormalisation, aux loss, softmax) and
 * weighted d rows -> per-expert GEMMs -> SwiGLU backward -> un-permute per token -> router GEMMs.
 *
 * Jitter: the noise is U(1-j, 1+j) from a counter-based hash of (noise_seed, element index), not the
 * CPU's xoshiro stream: the same noise_seed gives the same noise on the GPU every time, but not the
 * CPU's noise. Evaluation (training = 0) never applies it. */
#include <math.h>
#include <stdint.h>

#include "../moe_cuda.cuh"
#include "../topk_cuda.cuh"

/* ---- CUDA kernels ------------------------------------------------------------------------------ */

static __device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* noise = U(1-j, 1+j) per element; xr = in * noise. */
__global__ void jitter_kernel(float *noise, float *xr, const float *in, int64_t n, uint64_t seed, float j) {
    MOE_GRID_LOOP(i, n) {
        const uint64_t r = splitmix64(seed ^ splitmix64((uint64_t)i));
        const float u = (float)(r >> 40) * (1.0f / 16777216.0f); /* 24 bits: [0, 1) */
        const float z = 1.0f + j * (2.0f * u - 1.0f);
        noise[i] = z;
        xr[i] = in[i] * z;
    }
}

/* xr = in * noise (backward recomputes the router input instead of keeping it). */
__global__ void mul_kernel(float *xr, const float *in, const float *noise, int64_t n) {
    MOE_GRID_LOOP(i, n) xr[i] = in[i] * noise[i];
}

/* din += t * noise. */
__global__ void add_mul_kernel(float *din, const float *t, const float *noise, int64_t n) {
    MOE_GRID_LOOP(i, n) din[i] += t[i] * noise[i];
}

/* Per token (one thread): softmax of the logits in probs (in place), top-k (ties: the lower index wins,
 * as on the CPU), combine weights. */
__global__ void router_kernel(float *probs, int32_t *idx, float *w, int N, int E, int k, int normalize) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float *p = probs + (int64_t)n * E;
    float mx = p[0];
    for (int e = 1; e < E; e++) mx = p[e] > mx ? p[e] : mx;
    double sum = 0.0;
    for (int e = 0; e < E; e++) {
        p[e] = expf(p[e] - mx);
        sum += p[e];
    }
    const float inv = (float)(1.0 / sum);
    for (int e = 0; e < E; e++) p[e] *= inv;
    /* The j-th pick is the best expert below the (j-1)-th in the order (p descending, index ascending). */
    int32_t *id = idx + (int64_t)n * k;
    double ssel = 0.0;
    int prev = -1;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (prev >= 0 && !(p[e] < p[prev] || (p[e] == p[prev] && e > prev))) continue; /* not below prev */
            if (best < 0 || p[e] > p[best]) best = e;
        }
        best = best < 0 ? 0 : best; /* NaN logits only: keep the indices in range */
        id[j] = best;
        ssel += p[best];
        prev = best;
    }
    for (int j = 0; j < k; j++) w[(int64_t)n * k + j] = normalize ? (float)(p[id[j]] / ssel) : p[id[j]];
}

/* One block per expert e (blockDim = MOE_THREADS): walks the N*k assignments in token order and gives
 * each of e's its rank among them; rank < cap keeps it (pos = rank, made global by scatter_kernel),
 * else pos = -1. routed[e] = all of e's assignments, kept[e] = those kept. */
__global__ void rank_kernel(int32_t *pos, int32_t *routed, int32_t *kept, const int32_t *idx, int64_t Nk,
                            int64_t cap) {
    __shared__ int warp_tot[MOE_THREADS / 32];
    __shared__ int64_t base_sh;
    const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (threadIdx.x == 0) base_sh = 0;
    __syncthreads();
    for (int64_t a0 = 0; a0 < Nk; a0 += MOE_THREADS) {
        const int64_t a = a0 + threadIdx.x;
        const int flag = a < Nk && idx[a] == e;
        const unsigned mask = __ballot_sync(0xffffffffu, flag);
        const int in_warp = __popc(mask & ((1u << lane) - 1u));
        if (lane == 0) warp_tot[warp] = __popc(mask);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < MOE_THREADS / 32; w++) {
            before += w < warp ? warp_tot[w] : 0;
            total += warp_tot[w];
        }
        const int64_t base = base_sh;
        if (flag) {
            const int64_t rank = base + before + in_warp;
            pos[a] = rank < cap ? (int32_t)rank : -1;
        }
        __syncthreads(); /* everyone has read warp_tot and base_sh */
        if (threadIdx.x == 0) base_sh = base + total;
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        routed[e] = (int32_t)base_sh;
        kept[e] = (int32_t)(base_sh < cap ? base_sh : cap);
    }
}

/* One thread: offsets from the kept counts, and the dropped / assignment counts. */
__global__ void offsets_kernel(int32_t *off, int32_t *cnt, int E, int64_t Nk) {
    const int32_t *routed = cnt + C_ROUTED, *kept = cnt + C_ROUTED + E;
    int64_t dropped = 0;
    off[0] = 0;
    for (int e = 0; e < E; e++) {
        off[e + 1] = off[e] + kept[e];
        dropped += routed[e] - kept[e];
    }
    cnt[C_DROPPED] = (int32_t)dropped;
    cnt[C_ASSIGN] = (int32_t)Nk;
}

/* Kept assignments: global row = expert offset + rank; the row's token. */
__global__ void scatter_kernel(int32_t *pos, int32_t *rowtok, const int32_t *idx, const int32_t *off, int64_t Nk,
                               int k) {
    MOE_GRID_LOOP(a, Nk) {
        if (pos[a] < 0) continue;
        const int32_t r = off[idx[a]] + pos[a];
        pos[a] = r;
        rowtok[r] = (int32_t)(a / k);
    }
}

/* Sum of v over the block (blockDim a power of two <= MOE_THREADS), returned to every thread. */
static __device__ double block_sum(double v, double *sh) {
    __syncthreads(); /* sh may still be read from a previous call */
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

/* One block: f_e, P_e (mean probability, double) and aux = coef * E * sum f_e P_e into the stats. */
__global__ void aux_kernel(float *st, const int32_t *cnt, const float *probs, int N, int E, int k, double coef,
                           int jit) {
    __shared__ double sh[MOE_THREADS];
    double aux = 0.0;
    for (int e = 0; e < E; e++) {
        double s = 0.0;
        for (int n = threadIdx.x; n < N; n += blockDim.x) s += probs[(int64_t)n * E + e];
        const double P = block_sum(s, sh) / N;
        const double f = (double)cnt[C_ROUTED + e] / ((double)N * k);
        if (threadIdx.x == 0) {
            st[ST_F + e] = (float)f;
            st[ST_F + E + e] = (float)P;
        }
        aux += f * P;
    }
    if (threadIdx.x == 0) {
        aux *= coef * E;
        st[ST_AUX] = (float)aux;
        st[ST_AUX_LO] = (float)(aux - (double)st[ST_AUX]);
        st[ST_N] = (float)N;
        st[ST_JIT] = (float)jit;
    }
}

/* xs[r] = in[rowtok[r]] for the R kept rows, cast to T. */
template <typename T>
__global__ void gather_kernel(T *xs, const float *in, const int32_t *rowtok, int64_t R, int H) {
    MOE_GRID_LOOP(i, R * H) {
        const int64_t r = i / H, c = i % H;
        moe_st(xs, i, in[(int64_t)rowtok[r] * H + c]);
    }
}

/* out[n] = sum over kept slots j (in order) of w[n,j] * Y[pos[n,j]]. */
__global__ void combine_kernel(float *out, const float *Y, const float *w, const int32_t *pos, int N, int H, int k) {
    MOE_GRID_LOOP(i, (int64_t)N * H) {
        const int64_t n = i / H, c = i % H;
        float o = 0.0f;
        for (int j = 0; j < k; j++) {
            const int32_t r = pos[n * k + j];
            if (r >= 0) o += w[n * k + j] * Y[(int64_t)r * H + c];
        }
        out[i] = o;
    }
}

/* Backward, one block per token: the weighted output gradient of each kept row (drow = w * dout, and
 * its T copy when dy_lp is set), d weights (dout . y), then d probs (renormalisation and aux loss) and
 * d logits through the softmax, into dlog (the token's row doubles as the d probs workspace). */
template <typename T>
__global__ void router_bwd_kernel(float *dlog, float *dw, float *drow, T *dy_lp, const float *dout, const float *Y,
                                  const float *probs, const int32_t *idx, const float *w, const int32_t *pos,
                                  const float *st, double aux_g, int H, int E, int k, int normalize) {
    __shared__ double sh[MOE_THREADS];
    const int64_t n = blockIdx.x;
    const float *p = probs + n * E, *g = dout + n * H, *wn = w + n * k;
    const int32_t *id = idx + n * k, *ps = pos + n * k;
    float *dp = dlog + n * E, *dwn = dw + n * k;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dp[e] = (float)(aux_g * st[ST_F + e]);
    double sdw = 0.0; /* meaningful in thread 0 */
    for (int j = 0; j < k; j++) {
        double d = 0.0;
        if (ps[j] >= 0) {
            const float *y = Y + (int64_t)ps[j] * H;
            float *dr = drow + (int64_t)ps[j] * H;
            for (int c = threadIdx.x; c < H; c += blockDim.x) {
                d += (double)g[c] * y[c];
                dr[c] = wn[j] * g[c];
                if (dy_lp) moe_st(dy_lp, (int64_t)ps[j] * H + c, wn[j] * g[c]);
            }
            d = block_sum(d, sh);
        }
        if (threadIdx.x == 0) {
            dwn[j] = (float)d;
            sdw += d * wn[j];
        }
    }
    __syncthreads(); /* dp's aux part is written */
    if (threadIdx.x == 0) {
        double ssel = 0.0;
        for (int j = 0; j < k; j++) ssel += p[id[j]];
        for (int j = 0; j < k; j++) dp[id[j]] += normalize ? (float)(((double)dwn[j] - sdw) / ssel) : dwn[j];
    }
    __syncthreads();
    double s = 0.0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) s += (double)p[e] * dp[e];
    s = block_sum(s, sh);
    for (int e = threadIdx.x; e < E; e += blockDim.x) dp[e] = p[e] * (float)(dp[e] - s);
}

/* din[n] += the d x rows of the token's kept slots, in slot order. */
__global__ void unpermute_kernel(float *din, const float *drow, const int32_t *pos, int N, int H, int k) {
    MOE_GRID_LOOP(i, (int64_t)N * H) {
        const int64_t n = i / H, c = i % H;
        float acc = din[i];
        for (int j = 0; j < k; j++) {
            const int32_t r = pos[n * k + j];
            if (r >= 0) acc += drow[(int64_t)r * H + c];
        }
        din[i] = acc;
    }
}

/* ---- kernel launchers -------------------------------------------------------------------------- */

/* gemm_ex for one expert's rows; nothing to do for an expert without rows. */
#define GEMM(...)                                                    \
    do {                                                             \
        if (h->gemm_ex(h, M1C_DEVICE_CUDA, a->stream, __VA_ARGS__) != M1C_OK) return M1C_ERR; \
    } while (0)

template <typename T>
static int forward_impl(const topk_cuda_args *a, float *out, const float *in) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F, cdt = a->cdt;
    const int64_t Nk = (int64_t)N * k;
    const int jit = a->jitter > 0 && a->training;

    const float *xr = in;
    if (jit) {
        jitter_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(a->noise, a->xr, in, (int64_t)N * H,
                                                                          a->noise_seed, (float)a->jitter);
        MOE_LAUNCH_CHECK(h, "jitter_kernel");
        xr = a->xr;
    }
    /* Router logits in f32 (both compute dtypes), then softmax / top-k. */
    GEMM(0, 1, N, E, H, 1.0f, xr, M1C_F32, H, 0, a->Wr, M1C_F32, H, 0, 0.0f, a->probs, M1C_F32, E, 0, 1);
    router_kernel<<<(N + 127) / 128, 128, 0, s>>>(a->probs, a->idx, a->w, N, E, k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_kernel");

    /* Capacity and the counting sort. */
    rank_kernel<<<E, MOE_THREADS, 0, s>>>(a->pos, a->cnt + C_ROUTED, a->cnt + C_ROUTED + E, a->idx, Nk, a->cap);
    MOE_LAUNCH_CHECK(h, "rank_kernel");
    offsets_kernel<<<1, 1, 0, s>>>(a->off, a->cnt, E, Nk);
    MOE_LAUNCH_CHECK(h, "offsets_kernel");
    scatter_kernel<<<moe_blocks(Nk), MOE_THREADS, 0, s>>>(a->pos, a->rowtok, a->idx, a->off, Nk, k);
    MOE_LAUNCH_CHECK(h, "scatter_kernel");
    aux_kernel<<<1, MOE_THREADS, 0, s>>>(a->st, a->cnt, a->probs, N, E, k, a->aux_coef, jit);
    MOE_LAUNCH_CHECK(h, "aux_kernel");
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_off, a->off, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    const int32_t *off = a->h_off;
    const int64_t R = off[E];

    /* Experts. */
    T *xs = (T *)a->xs, *GU = (T *)a->gu, *act = (T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    if (R > 0) {
        gather_kernel<T><<<moe_blocks(R * H), MOE_THREADS, 0, s>>>(xs, in, a->rowtok, R, H);
        MOE_LAUNCH_CHECK(h, "gather_kernel");
    }
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(0, 1, ne, 2 * F, H, 1.0f, xs + (int64_t)o * H, cdt, H, 0, Wgu + (int64_t)e * 2 * F * H, cdt, H, 0, 0.0f,
             GU + (int64_t)o * 2 * F, cdt, 2 * F, 0, 1);
    }
    if (R > 0) {
        moe_swiglu_fwd_kernel<T><<<moe_blocks(R * F), MOE_THREADS, 0, s>>>(act, GU, R, F);
        MOE_LAUNCH_CHECK(h, "moe_swiglu_fwd_kernel");
    }
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(0, 1, ne, H, F, 1.0f, act + (int64_t)o * F, cdt, F, 0, Wd + (int64_t)e * H * F, cdt, F, 0, 0.0f,
             a->Y + (int64_t)o * H, M1C_F32, H, 0, 1);
    }
    combine_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(out, a->Y, a->w, a->pos, N, H, k);
    MOE_LAUNCH_CHECK(h, "combine_kernel");
    return M1C_OK;
}

template <typename T>
static int backward_impl(const topk_cuda_args *a, float *din, const float *dout, const float *in) {
    const m1c_host *h = a->h;
    cudaStream_t s = (cudaStream_t)a->stream;
    const int N = a->N, H = a->H, E = a->E, k = a->k, F = a->F, cdt = a->cdt;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_cnt, a->cnt, (size_t)(2 + 2 * E) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(a->h_off, a->off, (size_t)(E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    float jit_f = 0.0f;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(&jit_f, a->st + ST_JIT, sizeof(float), cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    if (a->h_cnt[C_ASSIGN] != (int64_t)N * k)
        return h->error(h, "topk: backward for %d tokens after a forward of %d", N, (int)(a->h_cnt[C_ASSIGN] / k));
    const int jit = jit_f != 0.0f;
    if (jit && !a->noise) return h->error(h, "topk: backward after a jittered forward without the jitter buffer");
    const int32_t *off = a->h_off;
    const int64_t R = off[E];
    T *dy_lp = (T *)a->dy_lp;
    if (cdt == M1C_BF16 && !dy_lp) return h->error(h, "topk: BF16 backward needs the bf16 d rows buffer");
    const T *xs = (const T *)a->xs, *GU = (const T *)a->gu, *act = (const T *)a->act;
    const T *Wgu = (const T *)a->Wgu, *Wd = (const T *)a->Wd;
    T *dgu = (T *)a->dgu;
    /* The d rows as GEMM operand: drow itself in F32, its bf16 copy in BF16. */
    const T *dy = dy_lp ? dy_lp : (const T *)(const void *)a->drow;

    const double aux_g = a->aux_scale * a->aux_coef * E / N;
    router_bwd_kernel<T><<<N, 128, 0, s>>>(a->dlog, a->dw, a->drow, dy_lp, dout, a->Y, a->probs, a->idx, a->w, a->pos,
                                           a->st, aux_g, H, E, k, a->normalize);
    MOE_LAUNCH_CHECK(h, "router_bwd_kernel");

    /* dWd += dY^T A; d act = dY Wd. */
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(1, 0, H, F, ne, 1.0f, dy + (int64_t)o * H, cdt, H, 0, act + (int64_t)o * F, cdt, F, 0, 1.0f,
             a->dWd + (int64_t)e * H * F, M1C_F32, F, 0, 1);
        GEMM(0, 0, ne, F, H, 1.0f, dy + (int64_t)o * H, cdt, H, 0, Wd + (int64_t)e * H * F, cdt, F, 0, 0.0f,
             a->dact + (int64_t)o * F, M1C_F32, F, 0, 1);
    }
    if (R > 0) {
        moe_swiglu_bwd_kernel<T><<<moe_blocks(R * F), MOE_THREADS, 0, s>>>(dgu, a->dact, GU, R, F);
        MOE_LAUNCH_CHECK(h, "moe_swiglu_bwd_kernel");
    }
    /* dWgu += dGU^T X; d x rows = dGU Wgu (into drow: its dY is no longer needed). */
    for (int e = 0; e < E; e++) {
        const int o = off[e], ne = off[e + 1] - off[e];
        if (ne == 0) continue;
        GEMM(1, 0, 2 * F, H, ne, 1.0f, dgu + (int64_t)o * 2 * F, cdt, 2 * F, 0, xs + (int64_t)o * H, cdt, H, 0, 1.0f,
             a->dWgu + (int64_t)e * 2 * F * H, M1C_F32, H, 0, 1);
        GEMM(0, 0, ne, H, 2 * F, 1.0f, dgu + (int64_t)o * 2 * F, cdt, 2 * F, 0, Wgu + (int64_t)e * 2 * F * H, cdt, H, 0,
             0.0f, a->drow + (int64_t)o * H, M1C_F32, H, 0, 1);
    }
    unpermute_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(din, a->drow, a->pos, N, H, k);
    MOE_LAUNCH_CHECK(h, "unpermute_kernel");

    /* Router (f32): dWr += dlogits^T (router input); din += (dlogits Wr) (times the noise with jitter). */
    if (jit) {
        mul_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(a->xr, in, a->noise, (int64_t)N * H);
        MOE_LAUNCH_CHECK(h, "mul_kernel");
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, a->xr, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 0.0f, a->xr, M1C_F32, H, 0, 1);
        add_mul_kernel<<<moe_blocks((int64_t)N * H), MOE_THREADS, 0, s>>>(din, a->xr, a->noise, (int64_t)N * H);
        MOE_LAUNCH_CHECK(h, "add_mul_kernel");
    } else {
        GEMM(1, 0, E, H, N, 1.0f, a->dlog, M1C_F32, E, 0, in, M1C_F32, H, 0, 1.0f, a->dWr, M1C_F32, H, 0, 1);
        GEMM(0, 0, N, H, E, 1.0f, a->dlog, M1C_F32, E, 0, a->Wr, M1C_F32, H, 0, 1.0f, din, M1C_F32, H, 0, 1);
    }
    return M1C_OK;
}

extern "C" int topk_cuda_forward(const topk_cuda_args *a, float *out, const float *in) {
    if (a->N <= 0) return M1C_OK;
    return a->cdt == M1C_BF16 ? forward_impl<__nv_bfloat16>(a, out, in) : forward_impl<float>(a, out, in);
}

extern "C" int topk_cuda_backward(const topk_cuda_args *a, float *din, const float *dout, const float *in) {
    if (a->N <= 0) return M1C_OK;
    return a->cdt == M1C_BF16 ? backward_impl<__nv_bfloat16>(a, din, dout, in) : backward_impl<float>(a, din, dout, in);
}

extern "C" int topk_cuda_to_host(const m1c_host *h, void *stream, void *dst, const void *src, size_t bytes) {
    cudaStream_t s = (cudaStream_t)stream;
    MOE_CUDA_CHECK(h, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    MOE_CUDA_CHECK(h, cudaStreamSynchronize(s));
    return M1C_OK;
}
