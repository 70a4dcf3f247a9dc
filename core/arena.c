/* Arenas: named tensors declared first, then backed by one device allocation. */
#include "arena.h"

#include <stdlib.h>
#include <string.h>

#include "host.h"

size_t m1c_dtype_size(int dtype) { return dtype == M1C_BF16 ? 2 : 4; }

const char *m1c_dtype_name(int dtype) {
    switch (dtype) {
    case M1C_F32: return "F32";
    case M1C_BF16: return "BF16";
    case M1C_I32: return "I32";
    default: return "?";
    }
}

int64_t m1c_numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

void m1c_arena_init(m1c_arena *a, int device) {
    memset(a, 0, sizeof *a);
    a->device = device;
}

int m1c_arena_add(m1c_arena *a, const char *name, int dtype, int ndim, const int64_t *shape) {
    if (a->n == a->cap) {
        a->cap = a->cap ? 2 * a->cap : 16;
        a->t = m1c_xrealloc(a->t, (size_t)a->cap * sizeof *a->t);
        a->offset = m1c_xrealloc(a->offset, (size_t)a->cap * sizeof *a->offset);
    }
    m1c_tensor *t = &a->t[a->n];
    memset(t, 0, sizeof *t);
    t->dtype = dtype;
    t->device = a->device;
    t->ndim = ndim;
    for (int i = 0; i < ndim && i < M1C_MAX_DIMS; i++) t->shape[i] = shape[i];
    t->name = m1c_xstrdup(name);
    /* Every tensor starts on a 256-byte boundary: cache lines on the CPU, full transactions on GPUs. */
    a->offset[a->n] = (a->bytes + 255) / 256 * 256;
    a->bytes = a->offset[a->n] + (size_t)m1c_numel(t) * m1c_dtype_size(dtype);
    return a->n++;
}

int m1c_arena_alloc(m1c_arena *a, m1c_err *e) {
    if (a->base) return m1c_fail(e, "arena allocated twice");
    a->base = m1c_dev_alloc(a->device, a->bytes ? a->bytes : 1);
    if (!a->base)
        return m1c_fail(e, "cannot allocate %.1f MiB on the %s", (double)a->bytes / 1048576.0,
                        a->device == M1C_DEVICE_CPU ? "CPU" : "GPU");
    m1c_dev_memset0(a->device, a->base, a->bytes);
    for (int i = 0; i < a->n; i++) a->t[i].data = (char *)a->base + a->offset[i];
    return M1C_OK;
}

int m1c_arena_like(m1c_arena *dst, const m1c_arena *src, int device, const char *suffix, m1c_err *e) {
    m1c_arena_init(dst, device);
    for (int i = 0; i < src->n; i++) {
        char *name = m1c_xasprintf("%s%s", src->t[i].name, suffix ? suffix : "");
        m1c_arena_add(dst, name, src->t[i].dtype, src->t[i].ndim, src->t[i].shape);
        free(name);
    }
    return m1c_arena_alloc(dst, e);
}

m1c_tensor *m1c_arena_find(m1c_arena *a, const char *name) {
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->t[i].name, name)) return &a->t[i];
    return NULL;
}

void m1c_arena_zero(m1c_arena *a) {
    if (a->base) m1c_dev_memset0(a->device, a->base, a->bytes);
}

void m1c_arena_free(m1c_arena *a) {
    for (int i = 0; i < a->n; i++) free((void *)a->t[i].name);
    m1c_dev_free(a->device, a->base);
    free(a->t);
    free(a->offset);
    memset(a, 0, sizeof *a);
}
