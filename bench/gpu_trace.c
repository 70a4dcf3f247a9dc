/* A GPU timeline of any CUDA program, for finding where the GPU waits: every kernel, copy and memset
 * with its start and end on the GPU clock, and every CUDA runtime call with its span on the host, from
 * CUPTI's activity records. Loaded by the CUDA driver (its injection hook), so the program needs no
 * change; the records go to a CSV file when the program exits:
 *
 *   CUDA_INJECTION64_PATH=build/libm1c_gpu_trace.so M1C_TRACE=trace.csv ./build/m1c_bench_train --device cuda
 *   python3 bench/trace_report.py trace.csv            (gaps, busy time, top kernels of one step)
 *
 * CSV columns: kind (kernel, memcpy, memset, runtime), start_ns, end_ns, stream (0 for runtime calls),
 * name. Timestamps share CUPTI's clock, so host calls and GPU work line up.
 *
 * The record table is this library's own process-wide state: the driver calls InitializeInjection once,
 * CUPTI hands completed buffers over on its own thread (hence the mutex), and the table is written out
 * at exit. */
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BUF_BYTES = 8 << 20, ALIGN = 8 };

typedef struct rec {
    uint64_t start, end;
    uint32_t stream;
    char kind; /* 'k' kernel, 'c' memcpy, 's' memset, 'r' runtime call */
    const char *name; /* kernel names live as long as the context; runtime names are CUPTI's constants */
} rec;

static struct {
    pthread_mutex_t lock;
    rec *r;
    size_t n, cap;
    uint64_t dropped;
} g = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0, 0};

static void add(char kind, uint64_t start, uint64_t end, uint32_t stream, const char *name) {
    if (g.n == g.cap) {
        const size_t cap = g.cap ? 2 * g.cap : 1 << 16;
        rec *r = realloc(g.r, cap * sizeof *r);
        if (!r) {
            g.dropped++;
            return;
        }
        g.r = r, g.cap = cap;
    }
    g.r[g.n++] = (rec){start, end, stream, kind, name};
}

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records) {
    *buf = aligned_alloc(ALIGN, BUF_BYTES);
    *size = *buf ? BUF_BYTES : 0;
    *max_records = 0;
}

static const char *runtime_name(uint32_t cbid) {
    const char *name = NULL;
    if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, cbid, &name) != CUPTI_SUCCESS || !name) return "runtime?";
    return name;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *a = NULL;
    pthread_mutex_lock(&g.lock);
    while (cuptiActivityGetNextRecord(buf, valid, &a) == CUPTI_SUCCESS) {
        switch (a->kind) {
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        case CUPTI_ACTIVITY_KIND_KERNEL: {
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)a;
            add('k', k->start, k->end, k->streamId, k->name);
        } break;
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)a;
            add('c', m->start, m->end, m->streamId, "memcpy");
        } break;
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)a;
            add('s', m->start, m->end, m->streamId, "memset");
        } break;
        case CUPTI_ACTIVITY_KIND_RUNTIME: {
            const CUpti_ActivityAPI *r = (const CUpti_ActivityAPI *)a;
            add('r', r->start, r->end, 0, runtime_name(r->cbid));
        } break;
        default: break;
        }
    }
    pthread_mutex_unlock(&g.lock);
    free(buf);
}

static int cmp_start(const void *x, const void *y) {
    const rec *a = x, *b = y;
    return (a->start > b->start) - (a->start < b->start);
}

static void write_out(void) {
    cuptiActivityFlushAll(1);
    const char *path = getenv("M1C_TRACE");
    if (!path || !*path) path = "gpu_trace.csv";
    pthread_mutex_lock(&g.lock);
    qsort(g.r, g.n, sizeof *g.r, cmp_start);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "m1c_gpu_trace: cannot write %s\n", path);
    } else {
        static const char *const kinds[] = {['k'] = "kernel", ['c'] = "memcpy", ['s'] = "memset", ['r'] = "runtime"};
        fprintf(f, "kind,start_ns,end_ns,stream,name\n");
        for (size_t i = 0; i < g.n; i++)
            fprintf(f, "%s,%llu,%llu,%u,\"%s\"\n", kinds[(int)g.r[i].kind], (unsigned long long)g.r[i].start,
                    (unsigned long long)g.r[i].end, g.r[i].stream, g.r[i].name ? g.r[i].name : "?");
        fclose(f);
        fprintf(stderr, "m1c_gpu_trace: %zu records in %s%s\n", g.n, path, g.dropped ? " (some dropped)" : "");
    }
    pthread_mutex_unlock(&g.lock);
}

/* The CUDA driver's hook: called once when CUDA_INJECTION64_PATH names this library. */
int InitializeInjection(void);
int InitializeInjection(void) {
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
        fprintf(stderr, "m1c_gpu_trace: CUPTI refused the activity callbacks\n");
        return 0;
    }
    const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                        CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_RUNTIME};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (cuptiActivityEnable(kinds[i]) != CUPTI_SUCCESS)
            fprintf(stderr, "m1c_gpu_trace: CUPTI activity kind %d not available\n", (int)kinds[i]);
    atexit(write_out);
    return 1;
}
