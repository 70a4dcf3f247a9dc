/* CUDA device services for the core: allocation (cudaMalloc, never managed memory), copies, f32 GEMM
 * through cuBLAS and mixed-precision GEMM through cuBLASLt with a per-thread algorithm cache. Row-major
 * products are computed as the column-major product of the transposes: C^T = op(B)^T op(A)^T, so A and
 * B swap places and no data moves. */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

/* The calling thread's first pending failure (backend.h). Per host thread, like the cuBLAS handles. */
typedef struct cuda_failure {
    int pending;
    char msg[256];
} cuda_failure;

static cuda_failure *failure(void) {
    static thread_local cuda_failure f;
    return &f;
}

extern "C" void m1c_cuda_fail(const char *what, const char *detail) {
    cuda_failure *f = failure();
    if (f->pending) return;
    f->pending = 1;
    snprintf(f->msg, sizeof f->msg, "%s: %s", what, detail);
}

extern "C" int m1c_cuda_take_error(char *buf, size_t n) {
    cuda_failure *f = failure();
    if (!f->pending) return 0;
    if (n) snprintf(buf, n, "%s", f->msg);
    f->pending = 0;
    return 1;
}

static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) m1c_cuda_fail(what, cudaGetErrorString(e));
}

/* A new stream of the device's highest priority (high) or its lowest; NULL (the legacy stream, where
 * every call fails as before) where none can be made. */
static cudaStream_t new_stream(unsigned flags, int high) {
    int least = 0, greatest = 0;
    cudaStream_t s = NULL;
    if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess ||
        cudaStreamCreateWithPriority(&s, flags, high ? greatest : least) != cudaSuccess) {
        (void)cudaGetLastError();
        s = NULL;
    }
    return s;
}

/* The core's stream (backend.h), per host thread: blocking (work left on the legacy default stream still
 * orders with it) and of the device's highest priority, so that work a caller puts on a low-priority
 * stream beside it (the optimizer during the backward) takes only what it leaves free. */
extern "C" void *m1c_cuda_stream(void) {
    static thread_local cudaStream_t s;
    static thread_local int made;
    if (!made) made = 1, s = new_stream(cudaStreamDefault, 1);
    return (void *)s;
}

static cudaStream_t main_stream(void) { return (cudaStream_t)m1c_cuda_stream(); }

extern "C" void *m1c_cuda_background_stream(void) {
    static thread_local cudaStream_t s;
    static thread_local int made;
    if (!made) made = 1, s = new_stream(cudaStreamNonBlocking, 0);
    return (void *)s;
}

/* One event serves every call: cudaStreamWaitEvent takes the event's state when it is called, so the
 * event can be recorded again at once. */
extern "C" void m1c_cuda_order(void *waiter, void *waitee) {
    static thread_local cudaEvent_t ev;
    if (!ev && cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess) {
        ev = NULL;
        (void)cudaGetLastError(); /* not an error of the next launch's */
        check(cudaDeviceSynchronize(), "cudaEventCreate (stream order)"); /* no event: order by waiting */
        return;
    }
    check(cudaEventRecord(ev, (cudaStream_t)waitee), "cudaEventRecord (stream order)");
    check(cudaStreamWaitEvent((cudaStream_t)waiter, ev, 0), "cudaStreamWaitEvent (stream order)");
}

/* One cuBLAS handle per host thread (cuBLAS handles are not meant to be shared across threads), on the
 * core's stream; NULL (and a failure kept) if it cannot be made: cuBLAS then refuses every call. */
static cublasHandle_t blas_handle(void) {
    static thread_local cublasHandle_t h;
    if (!h) {
        if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
            h = NULL;
            m1c_cuda_fail("cublasCreate", "failed (no device, or out of memory)");
        } else {
            cublasSetStream(h, main_stream());
        }
    }
    return h;
}

extern "C" int m1c_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}

extern "C" int m1c_cuda_sm_count(void) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        n < 1) {
        (void)cudaGetLastError(); /* unknown: not an error of the next launch's */
        return 0;
    }
    return n;
}

extern "C" void m1c_cuda_device_name(char *buf, int n) {
    cudaDeviceProp p;
    int dev = 0;
    buf[0] = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&p, dev) == cudaSuccess)
        snprintf(buf, (size_t)n, "%s", p.name);
}

extern "C" void *m1c_cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) return NULL;
    return p;
}

extern "C" void m1c_cuda_sync(void) { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

extern "C" void m1c_cuda_free(void *p) {
    if (p) check(cudaFree(p), "cudaFree");
}

extern "C" void m1c_cuda_memset0(void *p, size_t bytes) { m1c_cuda_memset0_on(main_stream(), p, bytes); }

extern "C" void m1c_cuda_memset0_on(void *stream, void *p, size_t bytes) {
    check(cudaMemsetAsync(p, 0, bytes, (cudaStream_t)stream), "cudaMemset");
}

/* Synchronous for the caller: queued on the core's stream, then waited for. */
extern "C" void m1c_cuda_copy(void *dst, const void *src, size_t bytes, int kind) {
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice};
    check(cudaMemcpyAsync(dst, src, bytes, kinds[kind], main_stream()), "cudaMemcpy");
    check(cudaStreamSynchronize(main_stream()), "cudaMemcpy");
}

extern "C" void *m1c_cuda_host_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault) != cudaSuccess) {
        (void)cudaGetLastError(); /* the caller falls back to pageable memory: not a failure */
        return NULL;
    }
    return p;
}

extern "C" void m1c_cuda_host_free(void *p) {
    if (p) check(cudaFreeHost(p), "cudaFreeHost");
}

/* The event after the calling thread's last asynchronous copy; NULL until the first (or if none could be
 * made: then every copy is waited for at once). */
static cudaEvent_t *copy_event(void) {
    static thread_local cudaEvent_t ev;
    return &ev;
}

extern "C" void m1c_cuda_copy_async(void *dst, const void *src, size_t bytes, int kind) {
    cudaEvent_t *ev = copy_event();
    check(cudaMemcpyAsync(dst, src, bytes, kind ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, main_stream()),
          "cudaMemcpyAsync");
    if (!*ev && cudaEventCreateWithFlags(ev, cudaEventDisableTiming) != cudaSuccess) {
        *ev = NULL;
        (void)cudaGetLastError(); /* not an error of the next launch's */
    }
    if (*ev) check(cudaEventRecord(*ev, main_stream()), "cudaEventRecord (copy)");
    else check(cudaStreamSynchronize(main_stream()), "cudaMemcpy");
}

extern "C" void m1c_cuda_copy_wait(void) {
    const cudaEvent_t ev = *copy_event();
    if (ev) check(cudaEventSynchronize(ev), "cudaEventSynchronize (copy)");
}

extern "C" void m1c_cuda_gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                              int64_t stride_a, const float *B, int ldb, int64_t stride_b, float beta, float *C,
                              int ldc, int64_t stride_c, int batch) {
    cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st = cublasSgemmStridedBatched(blas_handle(), tb, ta, N, M, K, &alpha, B, ldb, stride_b, A, lda,
                                                  stride_a, &beta, C, ldc, stride_c, batch);
    if (st != CUBLAS_STATUS_SUCCESS) m1c_cuda_fail("cublasSgemmStridedBatched", cublasGetStatusString(st));
}

/* ---- mixed-precision GEMM ----
 * cublasGemmEx runs cuBLAS's algorithm heuristic again for every new (M, N, K) (~170 us of host time),
 * and the MoE's per-expert row counts are new every step. So gemm_ex calls cuBLASLt with an algorithm
 * chosen once per bucket of similar problems and kept in a small per-thread table. */

/* m1c_dtype: 0 = f32, 1 = bf16. */
static const cudaDataType_t gemm_types[] = {CUDA_R_32F, CUDA_R_16BF};

/* The previous implementation, kept for what cuBLASLt is not asked to do (K = 0: C = beta C) or has no
 * algorithm for. */
static void gemm_ex_cublas(cudaStream_t stream, void *ws, size_t ws_bytes, const m1c_gemm_desc *g) {
    cublasHandle_t h = blas_handle();
    cublasSetStream(h, stream); /* which also drops any workspace set before */
    if (ws) cublasSetWorkspace(h, ws, ws_bytes);
    cublasOperation_t ta = g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st = cublasGemmStridedBatchedEx(
        h, tb, ta, g->N, g->M, g->K, &g->alpha, g->B, gemm_types[g->b_dtype], g->ldb, g->stride_b, g->A,
        gemm_types[g->a_dtype], g->lda, g->stride_a, &g->beta, g->C, gemm_types[g->c_dtype], g->ldc, g->stride_c,
        g->batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasSetStream(h, main_stream()); /* back to the handle's own stream, without the workspace */
    if (st != CUBLAS_STATUS_SUCCESS) m1c_cuda_fail("cublasGemmStridedBatchedEx", cublasGetStatusString(st));
}

static void lt_check(cublasStatus_t st, const char *what) {
    if (st != CUBLAS_STATUS_SUCCESS) m1c_cuda_fail(what, cublasLtGetStatusString(st));
}

/* 128 entries: the MoE's six expert products fall into ~4-7 buckets each (below), 8 layers share
 * them, and the attention and router products add a few fixed shapes, so a training step fits with room
 * to spare; replacement is round-robin. */
enum { LT_SLOTS = 128 };
/* Scratch for cuBLASLt's split-K and stream-K algorithms: the heuristic only offers algorithms that fit
 * MAX_WORKSPACE_BYTES, and 32 MiB leaves it every algorithm for these sizes at a cost that does not
 * matter beside the activations. */
static const uint64_t LT_WORKSPACE = (uint64_t)32 << 20;

typedef struct lt_key {
    uint64_t mn; /* bucket(M) << 32 | bucket(N) */
    uint64_t kf; /* bucket(K) << 32 | flags (transposes, dtypes, beta == 0, batch > 1, alignments) */
} lt_key;

typedef struct lt_entry {
    lt_key key;
    cublasLtMatmulAlgo_t algo;
    int legacy; /* cuBLASLt found no algorithm: this kind of call goes to cublasGemmStridedBatchedEx */
} lt_entry;

/* gemm_group's streams: at most LT_SIDE products run at once, each stream with its own workspace (a
 * split-K product of one would otherwise race with another's). With each product chosen for half the GPU,
 * 4 streams were as fast as 8 or a little faster, 2 slower (docs/perf.md, ninth version). */
enum { LT_SIDE = 4 };

typedef struct lt_side {
    cudaStream_t st; /* non-blocking, the highest priority (the core's stream's: the products are on its
                      * path, not beside it): ordered against the caller's stream by events only */
    cudaEvent_t done;
    void *ws;
} lt_side;

typedef struct lt_state {
    cublasLtHandle_t h;
    /* gemm_ex's workspace, for every call of the thread whatever its stream: safe because those calls
     * are ordered on one stream (plugins pass their layer's stream, NULL or not). gemm_group's products
     * run on the side streams with theirs. */
    void *ws;
    lt_side side[LT_SIDE];
    int n_side;       /* side streams made so far */
    int refused;      /* the GPU refused a side stream: groups make do with n_side, no retry */
    cudaEvent_t fork; /* recorded on the caller's stream before a group */
    int sms;          /* the device's multiprocessors (0: unknown) */
    int n, next;      /* filled entries; the next one to replace */
    m1c_cuda_gemm_stats stats;
    lt_entry e[LT_SLOTS];
} lt_state;

/* The calling thread's handle, workspace and cache (cuBLASLt handles are not meant to be shared across
 * threads; this one lives, like the cuBLAS handle, until the process ends); NULL until its first call. */
static lt_state **lt_slot(void) {
    static thread_local lt_state *s;
    return &s;
}

static lt_state *lt_get(void) {
    lt_state **slot = lt_slot();
    if (*slot) return *slot;
    lt_state *s = (lt_state *)calloc(1, sizeof(lt_state));
    if (!s) { /* host memory: as m1c_xmalloc */
        fprintf(stderr, "m1c: out of memory for the cuBLASLt state\n");
        abort();
    }
    lt_check(cublasLtCreate(&s->h), "cublasLtCreate");
    s->sms = m1c_cuda_sm_count();
    check(cudaMalloc(&s->ws, LT_WORKSPACE), "cudaMalloc (cuBLASLt workspace)");
    return *slot = s;
}

/* M, N and K round up to a quarter octave: 1, 2, 4, 8, then steps of a quarter of the power of two below
 * (9..10, ..., 4097..5120, 5121..6144, ...), so a bucket spans at most 25% of its size. The heuristic's
 * choice (tile shape, waves, split-K) moves on that logarithmic scale, so one algorithm serves the whole
 * bucket near its best, while the MoE's per-expert counts, spread about +-50% around the mean, fall
 * into a handful of buckets per product. Powers of two would lump 2x-different sizes together; fixed
 * multiples of 256 would make ~16 buckets per product out of that spread and overflow the table. */
static uint32_t lt_bucket(int x) {
    if (x <= 8) {
        uint32_t p = 1;
        while ((int)p < x) p <<= 1;
        return p;
    }
    uint32_t hp = 1; /* the highest power of two <= x - 1 */
    while (hp <= (uint32_t)(x - 1) / 2) hp <<= 1;
    const uint32_t step = hp / 4;
    return ((uint32_t)x + step - 1) / step * step;
}

/* The alignment (bytes, a power of two up to 256, cuBLASLt's default assumption) that every matrix of
 * an operand starts at: that of the pointer, of a row step (ld) and, batched, of a matrix step. */
static uint32_t lt_align(const void *p, int64_t ld, int64_t stride, int batch, int elem) {
    uint64_t v = (uint64_t)(uintptr_t)p | (uint64_t)ld * (uint64_t)elem | 256u;
    if (batch > 1) v |= (uint64_t)stride * (uint64_t)elem;
    return (uint32_t)(v & (~v + 1)); /* lowest set bit */
}

/* Descriptors of one call, initialised in place (cublasLt*Init: no allocation, nothing to destroy). a
 * and b are cuBLASLt's A and B, i.e. our B and A (the swap above). */
typedef struct lt_problem {
    cublasLtMatmulDescOpaque_t op;
    cublasLtMatrixLayoutOpaque_t a, b, c;
} lt_problem;

static void lt_layout(cublasLtMatrixLayoutOpaque_t *l, int dtype, int rows, int cols, int ld, int64_t stride,
                      int batch) {
    lt_check(cublasLtMatrixLayoutInit(l, gemm_types[dtype], (uint64_t)rows, (uint64_t)cols, ld),
             "cublasLtMatrixLayoutInit");
    if (batch > 1) {
        const int32_t count = batch;
        lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count),
                 "cublasLtMatrixLayoutSetAttribute (BATCH_COUNT)");
        lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                  sizeof stride),
                 "cublasLtMatrixLayoutSetAttribute (STRIDED_BATCH_OFFSET)");
    }
}

/* The best algorithm for this exact problem under these alignments (cuBLASLt's A = our B); 0 when
 * cuBLASLt has none. */
static int lt_heuristic(lt_state *s, lt_problem *p, int c_dtype, uint32_t align_a, uint32_t align_b,
                        uint32_t align_c, cublasLtMatmulAlgo_t *algo) {
    cublasLtMatmulPreferenceOpaque_t pref;
    lt_check(cublasLtMatmulPreferenceInit(&pref), "cublasLtMatmulPreferenceInit");
    lt_check(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &LT_WORKSPACE,
                                                  sizeof LT_WORKSPACE),
             "cublasLtMatmulPreferenceSetAttribute (MAX_WORKSPACE_BYTES)");
    const struct {
        cublasLtMatmulPreferenceAttributes_t attr;
        uint32_t bytes;
    } al[] = {{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b},
              {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a},
              {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
              {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
    for (int i = 0; i < 4; i++)
        lt_check(cublasLtMatmulPreferenceSetAttribute(&pref, al[i].attr, &al[i].bytes, sizeof al[i].bytes),
                 "cublasLtMatmulPreferenceSetAttribute (MIN_ALIGNMENT)");
    if (c_dtype != 0) {
        /* bf16 C: split-K partials are reduced in f32 (or not split), never rounded to bf16 in between: a
         * bf16 reduction (seen on an H200 at N 8, K 3001) rounds each partial once more. */
        const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
        lt_check(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                      sizeof mask),
                 "cublasLtMatmulPreferenceSetAttribute (REDUCTION_SCHEME_MASK)");
    }
    cublasLtMatmulHeuristicResult_t r;
    memset(&r, 0, sizeof r);
    int found = 0;
    s->stats.heuristics++;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(s->h, &p->op, &p->a, &p->b, &p->c, &p->c, &pref, 1, &r, &found);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED) return 0;
    lt_check(st, "cublasLtMatmulAlgoGetHeuristic");
    if (found < 1 || r.state != CUBLAS_STATUS_SUCCESS) return 0;
    *algo = r.algo;
    return 1;
}

extern "C" void m1c_cuda_gemm_ex_stats(m1c_cuda_gemm_stats *out) {
    const lt_state *s = *lt_slot();
    const m1c_cuda_gemm_stats none = {0, 0, 0, 0};
    *out = s ? s->stats : none;
}

/* One product on stream st with workspace ws (LT_WORKSPACE bytes); sm_target > 0: the multiprocessors it
 * may count on, the others busy with products beside it (cuBLASLt's SM_COUNT_TARGET). */
static void lt_gemm(lt_state *s, cudaStream_t st, void *ws, const m1c_gemm_desc *g, int sm_target) {
    const int trans_a = g->trans_a, trans_b = g->trans_b, M = g->M, N = g->N, K = g->K, batch = g->batch;
    const int a_dtype = g->a_dtype, b_dtype = g->b_dtype, c_dtype = g->c_dtype, lda = g->lda, ldb = g->ldb,
              ldc = g->ldc;
    const int64_t stride_a = g->stride_a, stride_b = g->stride_b, stride_c = g->stride_c;
    const float alpha = g->alpha, beta = g->beta;
    const void *A = g->A, *B = g->B;
    void *C = g->C;
    s->stats.calls++;
    if (K <= 0) { /* cuBLASLt takes no empty inner dimension; cuBLAS scales C by beta */
        s->stats.fallbacks++;
        gemm_ex_cublas(st, ws, LT_WORKSPACE, g);
        return;
    }
    static const int elem[] = {4, 2};
    const uint32_t al_a = lt_align(A, lda, stride_a, batch, elem[a_dtype]);
    const uint32_t al_b = lt_align(B, ldb, stride_b, batch, elem[b_dtype]);
    const uint32_t al_c = lt_align(C, ldc, stride_c, batch, elem[c_dtype]);
    const uint32_t flags = (uint32_t)(trans_a != 0) | (uint32_t)(trans_b != 0) << 1 | (uint32_t)a_dtype << 2 |
                           (uint32_t)b_dtype << 3 | (uint32_t)c_dtype << 4 | (uint32_t)(beta == 0.0f) << 5 |
                           (uint32_t)(batch > 1) << 6 | (uint32_t)__builtin_ctz(al_a) << 8 |
                           (uint32_t)__builtin_ctz(al_b) << 12 | (uint32_t)__builtin_ctz(al_c) << 16 |
                           (uint32_t)(sm_target & 0xff) << 20;
    const lt_key key = {(uint64_t)lt_bucket(M) << 32 | lt_bucket(N), (uint64_t)lt_bucket(K) << 32 | flags};

    lt_problem p;
    lt_check(cublasLtMatmulDescInit(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescInit");
    const int32_t op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(&p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a),
             "cublasLtMatmulDescSetAttribute (TRANSA)");
    lt_check(cublasLtMatmulDescSetAttribute(&p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b),
             "cublasLtMatmulDescSetAttribute (TRANSB)");
    if (sm_target > 0) {
        const int32_t t = sm_target;
        lt_check(cublasLtMatmulDescSetAttribute(&p.op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &t, sizeof t),
                 "cublasLtMatmulDescSetAttribute (SM_COUNT_TARGET)");
    }
    /* Column-major C^T (N x M) = op(B)^T (N x K) op(A)^T (K x M); the layouts describe the stored matrices. */
    lt_layout(&p.a, b_dtype, trans_b ? K : N, trans_b ? N : K, ldb, stride_b, batch);
    lt_layout(&p.b, a_dtype, trans_a ? M : K, trans_a ? K : M, lda, stride_a, batch);
    lt_layout(&p.c, c_dtype, N, M, ldc, stride_c, batch);

    lt_entry *e = NULL;
    for (int i = 0; i < s->n && !e; i++)
        if (s->e[i].key.mn == key.mn && s->e[i].key.kf == key.kf) e = &s->e[i];
    int fresh = 0;
    /* A miss asks the heuristic about this exact problem, not the bucket's corner: its leading dimensions
     * and strides are real (a corner shape would need invented ones of the same alignment), and the
     * answer surely runs this call. Later problems of the bucket reuse it, so which algorithm a bucket
     * gets, and thus the summation order, depends on the first problem seen: the same for every run of a
     * program that calls in the same order. */
    if (!e) {
        e = &s->e[s->next];
        s->next = (s->next + 1) % LT_SLOTS;
        if (s->n < LT_SLOTS) s->n++;
        e->key = key;
        e->legacy = !lt_heuristic(s, &p, c_dtype, al_a, al_b, al_c, &e->algo);
        fresh = 1;
    }
    int lt = !e->legacy;
    if (lt) {
        cublasStatus_t r = cublasLtMatmul(s->h, &p.op, &alpha, B, &p.a, A, &p.b, &beta, C, &p.c, C, &p.c, &e->algo, ws,
                                          LT_WORKSPACE, st);
        if (!fresh && (r == CUBLAS_STATUS_NOT_SUPPORTED || r == CUBLAS_STATUS_INVALID_VALUE)) {
            /* The algorithm chosen for another problem of the bucket does not take this one: choose for
             * this one and keep that choice for the bucket (if cuBLASLt has none, cuBLAS takes this call
             * and the bucket keeps its algorithm). */
            s->stats.retries++;
            cublasLtMatmulAlgo_t algo;
            lt = lt_heuristic(s, &p, c_dtype, al_a, al_b, al_c, &algo);
            if (lt) {
                e->algo = algo;
                r = cublasLtMatmul(s->h, &p.op, &alpha, B, &p.a, A, &p.b, &beta, C, &p.c, C, &p.c, &e->algo, ws,
                                   LT_WORKSPACE, st);
            }
        }
        if (lt) {
            lt_check(r, "cublasLtMatmul");
            return;
        }
    }
    s->stats.fallbacks++;
    gemm_ex_cublas(st, ws, LT_WORKSPACE, g);
}

extern "C" void m1c_cuda_gemm_ex(void *stream, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                                 int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype, int ldb,
                                 int64_t stride_b, float beta, void *C, int c_dtype, int ldc, int64_t stride_c,
                                 int batch) {
    const m1c_gemm_desc g = {trans_a, trans_b, M, N, K, alpha, beta, A, B, C, a_dtype, b_dtype, c_dtype,
                             lda, ldb, ldc, batch, stride_a, stride_b, stride_c, {0, 0}};
    lt_state *s = lt_get();
    lt_gemm(s, (cudaStream_t)stream, s->ws, &g, 0);
}

/* Make side streams (with workspaces) up to n; how many there are (fewer if the GPU refused). */
static int lt_sides(lt_state *s, int n) {
    if (!s->fork && cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming) != cudaSuccess) {
        s->fork = NULL;
        s->refused = 1;
    }
    while (s->fork && !s->refused && s->n_side < n) {
        lt_side *d = &s->side[s->n_side];
        d->st = new_stream(cudaStreamNonBlocking, 1);
        if (!d->st || cudaEventCreateWithFlags(&d->done, cudaEventDisableTiming) != cudaSuccess) {
            if (d->st) cudaStreamDestroy(d->st);
            s->refused = 1;
        } else if (cudaMalloc(&d->ws, LT_WORKSPACE) != cudaSuccess) {
            cudaEventDestroy(d->done);
            cudaStreamDestroy(d->st);
            s->refused = 1;
        } else {
            s->n_side++;
        }
    }
    (void)cudaGetLastError(); /* a refusal above is not an error: the groups run on fewer streams */
    return s->n_side < n ? s->n_side : n;
}

extern "C" void m1c_cuda_gemm_group(void *stream, const m1c_gemm_desc *g, int n) {
    cudaStream_t st = (cudaStream_t)stream;
    lt_state *s = lt_get();
    int live = 0;
    for (int i = 0; i < n; i++) live += g[i].M > 0 && g[i].N > 0 && g[i].batch > 0;
    const int ns = live > 1 ? lt_sides(s, live < LT_SIDE ? live : LT_SIDE) : 0;
    if (ns < 2) { /* one product, or no side streams to be had: in a row on the caller's stream */
        for (int i = 0; i < n; i++)
            if (g[i].M > 0 && g[i].N > 0 && g[i].batch > 0) lt_gemm(s, st, s->ws, &g[i], 0);
        return;
    }
    check(cudaEventRecord(s->fork, st), "cudaEventRecord (gemm_group)");
    /* Each product is chosen for half the GPU (cuBLASLt's SM_COUNT_TARGET), the rest being busy with the
     * products beside it: faster than algorithms chosen for the whole GPU, or for a quarter or less of it
     * (docs/perf.md, ninth version). */
    const int target = s->sms >= 2 ? (s->sms / 2 < 255 ? s->sms / 2 : 255) : 0;
    double load[LT_SIDE] = {0};
    for (int j = 0; j < ns; j++) check(cudaStreamWaitEvent(s->side[j].st, s->fork, 0), "cudaStreamWaitEvent");
    /* Each product to the stream with the least work so far (FLOPs), in the caller's order. */
    for (int i = 0; i < n; i++) {
        if (g[i].M <= 0 || g[i].N <= 0 || g[i].batch <= 0) continue;
        int j = 0;
        for (int t = 1; t < ns; t++)
            if (load[t] < load[j]) j = t;
        load[j] += (double)g[i].M * g[i].N * (g[i].K > 0 ? g[i].K : 1) * g[i].batch;
        lt_gemm(s, s->side[j].st, s->side[j].ws, &g[i], target);
    }
    for (int j = 0; j < ns; j++) {
        check(cudaEventRecord(s->side[j].done, s->side[j].st), "cudaEventRecord (gemm_group)");
        check(cudaStreamWaitEvent(st, s->side[j].done, 0), "cudaStreamWaitEvent");
    }
}
