/* Arenas: one allocation holding many named tensors (parameters, gradients, optimizer state,
 * activations). Tensors are declared first, then allocated together (64-byte aligned, zeroed). */
#ifndef M1C_ARENA_H
#define M1C_ARENA_H

#include "util.h"

typedef struct m1c_arena {
    int device;
    m1c_tensor *t; /* [n] */
    int n, cap;
    size_t *offset; /* [n] byte offset of each tensor in base */
    size_t bytes;   /* total */
    void *base;     /* NULL until allocated */
} m1c_arena;

size_t m1c_dtype_size(int dtype);
int64_t m1c_numel(const m1c_tensor *t);
const char *m1c_dtype_name(int dtype); /* "F32", "BF16", "I32" (safetensors spelling) */

void m1c_arena_init(m1c_arena *a, int device);
/* Declare a tensor; returns its index. The name is copied. */
int m1c_arena_add(m1c_arena *a, const char *name, int dtype, int ndim, const int64_t *shape);
/* Allocate all declared tensors at once and point each m1c_tensor at its place. */
int m1c_arena_alloc(m1c_arena *a, m1c_err *e);
/* A second arena with the same names and shapes (gradients of parameters, optimizer state). */
int m1c_arena_like(m1c_arena *dst, const m1c_arena *src, int device, const char *suffix, m1c_err *e);
m1c_tensor *m1c_arena_find(m1c_arena *a, const char *name);
void m1c_arena_zero(m1c_arena *a);
void m1c_arena_free(m1c_arena *a);

#endif
