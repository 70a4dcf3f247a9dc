/* The host-API table handed to plugins, and the device services behind it: CPU (OpenBLAS + OpenMP)
 * and, in CUDA builds, core/cuda/backend.cu. */
#include "host.h"

#include <cblas.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "config.h"
#include "loader.h"
#include "log.h"
#include "rng.h"
#include "timer.h"
#ifdef M1C_HAVE_CUDA
#include "cuda/backend.h"
#endif

/* OpenBLAS's own setter (not in cblas.h everywhere). */
void openblas_set_num_threads(int num_threads);

static int cpu_threads = 0; /* 0: all cores; part of the core's process-wide settings */

void m1c_set_threads(int n) {
    cpu_threads = n > 0 ? n : 0;
    int t = m1c_get_threads();
    omp_set_num_threads(t);
    openblas_set_num_threads(t);
}

int m1c_get_threads(void) { return cpu_threads > 0 ? cpu_threads : omp_get_num_procs(); }

/* ---- device services ---- */

int m1c_dev_available(int device) {
    if (device == M1C_DEVICE_CPU) return 1;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) return m1c_cuda_device_count() > 0;
#endif
    return 0;
}

double m1c_dev_peak_flops(int device, int compute_dtype, char *name, int n) {
    name[0] = 0;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        m1c_cuda_device_name(name, n);
        /* Datasheet dense peaks of the SXM cards: bf16 989.4 TFLOP/s, fp32 66.9 TFLOP/s (H100 and H200). */
        if (strstr(name, "H100") || strstr(name, "H200")) return compute_dtype == M1C_BF16 ? 989.4e12 : 66.9e12;
        return 0;
    }
#endif
    (void)device, (void)compute_dtype;
    snprintf(name, (size_t)n, "CPU");
    return 0;
}

void *m1c_dev_alloc(int device, size_t bytes) {
    if (device == M1C_DEVICE_CPU) {
        void *p = NULL;
        /* 64-byte alignment: whole cache lines, and AVX-512 loads if the BLAS uses them. */
        if (posix_memalign(&p, 64, bytes ? (bytes + 63) / 64 * 64 : 64)) return NULL;
        return p;
    }
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) return m1c_cuda_alloc(bytes);
#endif
    return NULL;
}

void m1c_dev_free(int device, void *p) {
    if (!p) return;
    if (device == M1C_DEVICE_CPU) free(p);
#ifdef M1C_HAVE_CUDA
    else if (device == M1C_DEVICE_CUDA) m1c_cuda_free(p);
#endif
}

int m1c_dev_take_error(int device, char *buf, size_t n) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) return m1c_cuda_take_error(buf, n);
#endif
    (void)device, (void)buf, (void)n;
    return 0;
}

void m1c_dev_sync(int device) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) m1c_cuda_sync();
#endif
    (void)device;
}

void *m1c_dev_stream(int device) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) return m1c_cuda_stream();
#endif
    (void)device;
    return NULL;
}

void *m1c_dev_background_stream(int device) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) return m1c_cuda_background_stream();
#endif
    (void)device;
    return NULL;
}

void m1c_dev_order(int device, void *waiter, void *waitee) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) m1c_cuda_order(waiter, waitee);
#endif
    (void)device, (void)waiter, (void)waitee;
}

void m1c_dev_memset0(int device, void *p, size_t bytes) { m1c_dev_memset0_on(device, m1c_dev_stream(device), p, bytes); }

void m1c_dev_memset0_on(int device, void *stream, void *p, size_t bytes) {
    if (device == M1C_DEVICE_CPU) memset(p, 0, bytes);
#ifdef M1C_HAVE_CUDA
    else if (device == M1C_DEVICE_CUDA) m1c_cuda_memset0_on(stream, p, bytes);
#endif
    (void)stream;
}

void *m1c_dev_host_alloc(int device, size_t bytes, int *pinned) {
    *pinned = 0;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        void *p = m1c_cuda_host_alloc(bytes);
        if (p) {
            memset(p, 0, bytes);
            *pinned = 1;
            return p;
        }
    }
#endif
    (void)device;
    return m1c_xcalloc(1, bytes ? bytes : 1);
}

void m1c_dev_host_free(void *p, int pinned) {
#ifdef M1C_HAVE_CUDA
    if (pinned) {
        m1c_cuda_host_free(p);
        return;
    }
#endif
    (void)pinned;
    free(p);
}

void m1c_dev_copy_async(int dst_device, void *dst, int src_device, const void *src, size_t bytes) {
#ifdef M1C_HAVE_CUDA
    if (dst_device == M1C_DEVICE_CUDA || src_device == M1C_DEVICE_CUDA) {
        m1c_cuda_copy_async(dst, src, bytes, dst_device == M1C_DEVICE_CPU);
        return;
    }
#endif
    (void)dst_device, (void)src_device;
    memmove(dst, src, bytes);
}

void m1c_dev_copy_wait(int device) {
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) m1c_cuda_copy_wait();
#endif
    (void)device;
}

void m1c_dev_copy(int dst_device, void *dst, int src_device, const void *src, size_t bytes) {
    if (dst_device == M1C_DEVICE_CPU && src_device == M1C_DEVICE_CPU) {
        memmove(dst, src, bytes);
        return;
    }
#ifdef M1C_HAVE_CUDA
    int kind = src_device == M1C_DEVICE_CPU ? 0 : dst_device == M1C_DEVICE_CPU ? 1 : 2;
    m1c_cuda_copy(dst, src, bytes, kind);
#else
    (void)dst_device;
    (void)src_device;
#endif
}

void m1c_gemm(int device, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        m1c_cuda_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
        return;
    }
#endif
    (void)device;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                alpha, A, lda, B, ldb, beta, C, ldc);
}

void m1c_gemm_batched(int device, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                      int lda, int64_t stride_a, const float *B, int ldb, int64_t stride_b, float beta, float *C,
                      int ldc, int64_t stride_c, int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        m1c_cuda_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c,
                      batch);
        return;
    }
#endif
    /* Small products in a batch: one per OpenMP thread (OpenBLAS's OpenMP build runs a call made
     * inside a parallel region on that thread alone; its pthreads build does so only up to
     * M*N*K = 2^18 and contends beyond); large ones: one at a time, each using all BLAS threads. */
    double work = (double)M * N * K;
    if (batch > 1 && work < 4e6 && !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
        for (int i = 0; i < batch; i++)
            m1c_gemm(device, trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta,
                     C + i * stride_c, ldc);
    } else {
        for (int i = 0; i < batch; i++)
            m1c_gemm(device, trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta,
                     C + i * stride_c, ldc);
    }
}

/* Whether the device multiplies these dtypes: f32 or bf16 anywhere on the GPU, f32 only on the CPU. */
static int gemm_dtypes_ok(int device, int a_dtype, int b_dtype, int c_dtype) {
    if (device == M1C_DEVICE_CPU) return a_dtype == M1C_F32 && b_dtype == M1C_F32 && c_dtype == M1C_F32;
    return (a_dtype == M1C_F32 || a_dtype == M1C_BF16) && (b_dtype == M1C_F32 || b_dtype == M1C_BF16) &&
           (c_dtype == M1C_F32 || c_dtype == M1C_BF16);
}

int m1c_gemm_ex(int device, void *stream, int trans_a, int trans_b, int M, int N, int K, float alpha, const void *A,
                int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype, int ldb, int64_t stride_b,
                float beta, void *C, int c_dtype, int ldc, int64_t stride_c, int batch) {
    if (!gemm_dtypes_ok(device, a_dtype, b_dtype, c_dtype)) return M1C_ERR;
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        if (M > 0 && N > 0 && batch > 0)
            m1c_cuda_gemm_ex(stream, trans_a, trans_b, M, N, K, alpha, A, a_dtype, lda, stride_a, B, b_dtype, ldb,
                             stride_b, beta, C, c_dtype, ldc, stride_c, batch);
        return M1C_OK;
    }
#endif
    (void)stream;
    if (device != M1C_DEVICE_CPU) return M1C_ERR;
    m1c_gemm_batched(device, trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,
                     stride_c, batch);
    return M1C_OK;
}

int m1c_gemm_group(int device, void *stream, const m1c_gemm_desc *g, int n, int *bad) {
    for (int i = 0; i < n; i++)
        if (!gemm_dtypes_ok(device, g[i].a_dtype, g[i].b_dtype, g[i].c_dtype)) {
            *bad = i;
            return M1C_ERR;
        }
#ifdef M1C_HAVE_CUDA
    if (device == M1C_DEVICE_CUDA) {
        m1c_cuda_gemm_group(stream, g, n);
        return M1C_OK;
    }
#endif
    for (int i = 0; i < n; i++)
        if (m1c_gemm_ex(device, stream, g[i].trans_a, g[i].trans_b, g[i].M, g[i].N, g[i].K, g[i].alpha, g[i].A,
                        g[i].a_dtype, g[i].lda, g[i].stride_a, g[i].B, g[i].b_dtype, g[i].ldb, g[i].stride_b,
                        g[i].beta, g[i].C, g[i].c_dtype, g[i].ldc, g[i].stride_c, g[i].batch)) {
            *bad = i;
            return M1C_ERR;
        }
    return M1C_OK;
}

/* ---- the host table ---- */

static m1c_plugin *plugin_of(const m1c_host *h) { return (m1c_plugin *)h->core; }

static const char *plugin_name(const m1c_host *h) {
    m1c_plugin *p = plugin_of(h);
    return p && p->desc && p->desc->name ? p->desc->name : "plugin";
}

static void h_log(const m1c_host *h, int level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    m1c_logv(level, plugin_name(h), fmt, ap);
    va_end(ap);
}

static int h_error(const m1c_host *h, const char *fmt, ...) {
    m1c_plugin *p = plugin_of(h);
    if (p) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->error, sizeof p->error, fmt, ap);
        va_end(ap);
    }
    return M1C_ERR;
}

/* A settings error already names file:line and key: store it as the plugin's error verbatim. */
static int settings_error(const m1c_host *h, const m1c_err *e) { return h_error(h, "%s", e->msg); }

#define S(s) ((m1c_settings *)(s))

static int h_get_int(const m1c_host *h, const m1c_settings *s, const char *key, int64_t def, int64_t lo, int64_t hi,
                     int64_t *out) {
    m1c_err e;
    return m1c_cfg_int(S(s), key, M1C_OPTIONAL, def, lo, hi, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_float(const m1c_host *h, const m1c_settings *s, const char *key, double def, double lo, double hi,
                       double *out) {
    m1c_err e;
    return m1c_cfg_float(S(s), key, M1C_OPTIONAL, def, lo, hi, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_bool(const m1c_host *h, const m1c_settings *s, const char *key, int def, int *out) {
    m1c_err e;
    return m1c_cfg_bool(S(s), key, M1C_OPTIONAL, def, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_string(const m1c_host *h, const m1c_settings *s, const char *key, const char *def,
                        const char *const *choices, const char **out) {
    m1c_err e;
    int req = def ? M1C_OPTIONAL : M1C_REQUIRED;
    return m1c_cfg_string(S(s), key, req, def, choices, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_list_len(const m1c_host *h, const m1c_settings *s, const char *key, int *out) {
    (void)h;
    int n = m1c_cfg_len(S(s), key);
    m1c_cfg_touch(S(s), key);
    *out = n < 0 ? 0 : n;
    return M1C_OK;
}

static int h_get_list_string(const m1c_host *h, const m1c_settings *s, const char *key, int i, const char **out) {
    m1c_err e;
    return m1c_cfg_list_string(S(s), key, i, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_list_float(const m1c_host *h, const m1c_settings *s, const char *key, int i, double *out) {
    m1c_err e;
    return m1c_cfg_list_float(S(s), key, i, out, &e) ? settings_error(h, &e) : M1C_OK;
}

static int h_get_group(const m1c_host *h, const m1c_settings *s, const char *key, const m1c_settings **out) {
    m1c_err e;
    m1c_settings *g = m1c_cfg_group(S(s), key, M1C_OPTIONAL, &e);
    if (!g) return settings_error(h, &e);
    *out = g;
    return M1C_OK;
}

static int h_get_list_group(const m1c_host *h, const m1c_settings *s, const char *key, int i,
                            const m1c_settings **out) {
    m1c_settings *g = m1c_cfg_elem(S(s), key, i);
    if (!g) return h_error(h, "%s: %s.%s[%d]: expected a group", m1c_cfg_file(s), m1c_cfg_path(s), key, i);
    *out = g;
    return M1C_OK;
}

static int h_settings_done(const m1c_host *h, const m1c_settings *s) {
    m1c_err e;
    return m1c_cfg_done(S(s), &e) ? settings_error(h, &e) : M1C_OK;
}

static void *h_alloc(const m1c_host *h, int device, size_t bytes) {
    (void)h;
    return m1c_dev_alloc(device, bytes);
}

static void h_free(const m1c_host *h, int device, void *p) {
    (void)h;
    m1c_dev_free(device, p);
}

static void h_gemm(const m1c_host *h, int device, int ta, int tb, int M, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    (void)h;
    m1c_gemm(device, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void h_gemm_batched(const m1c_host *h, int device, int ta, int tb, int M, int N, int K, float alpha,
                           const float *A, int lda, int64_t sa, const float *B, int ldb, int64_t sb, float beta,
                           float *C, int ldc, int64_t sc, int batch) {
    (void)h;
    m1c_gemm_batched(device, ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
}

static int h_gemm_ex(const m1c_host *h, int device, void *stream, int ta, int tb, int M, int N, int K, float alpha,
                     const void *A, int at, int lda, int64_t sa, const void *B, int bt, int ldb, int64_t sb,
                     float beta, void *C, int ct, int ldc, int64_t sc, int batch) {
    if (m1c_gemm_ex(device, stream, ta, tb, M, N, K, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc,
                    batch))
        return h_error(h, "gemm_ex: dtypes %s x %s -> %s are not supported on the %s", m1c_dtype_name(at),
                       m1c_dtype_name(bt), m1c_dtype_name(ct), device == M1C_DEVICE_CPU ? "CPU" : "GPU");
    return M1C_OK;
}

static int h_gemm_group(const m1c_host *h, int device, void *stream, const m1c_gemm_desc *g, int n) {
    int bad = 0;
    if (m1c_gemm_group(device, stream, g, n, &bad))
        return h_error(h, "gemm_group: product %d: dtypes %s x %s -> %s are not supported on the %s", bad,
                       m1c_dtype_name(g[bad].a_dtype), m1c_dtype_name(g[bad].b_dtype), m1c_dtype_name(g[bad].c_dtype),
                       device == M1C_DEVICE_CPU ? "CPU" : "GPU");
    return M1C_OK;
}

static int h_cpu_threads(const m1c_host *h) {
    (void)h;
    return m1c_get_threads();
}

static int h_settings_error(const m1c_host *h, const m1c_settings *s, const char *key, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    m1c_err e;
    m1c_cfg_fail(S(s), key, -1, &e, "%s", msg);
    return settings_error(h, &e);
}

void m1c_host_fill(m1c_host *h, void *core) {
    memset(h, 0, sizeof *h);
    h->abi_major = M1C_ABI_MAJOR;
    h->abi_minor = M1C_ABI_MINOR;
    h->size = sizeof *h;
    h->core = core;
    h->log = h_log;
    h->error = h_error;
    h->get_int = h_get_int;
    h->get_float = h_get_float;
    h->get_bool = h_get_bool;
    h->get_string = h_get_string;
    h->get_list_len = h_get_list_len;
    h->get_list_string = h_get_list_string;
    h->settings_done = h_settings_done;
    h->get_list_float = h_get_list_float;
    h->get_group = h_get_group;
    h->get_list_group = h_get_list_group;
    h->alloc = h_alloc;
    h->free = h_free;
    h->gemm = h_gemm;
    h->gemm_batched = h_gemm_batched;
    h->gemm_ex = h_gemm_ex;
    h->gemm_group = h_gemm_group;
    h->rng_seed = m1c_rng_seed;
    h->rng_u64 = m1c_rng_u64;
    h->rng_uniform = m1c_rng_uniform;
    h->rng_normal = m1c_rng_normal;
    h->now = m1c_now;
    h->cpu_threads = h_cpu_threads;
    h->settings_error = h_settings_error;
}
