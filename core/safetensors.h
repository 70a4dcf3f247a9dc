/* safetensors files: a strict reader (checkpoints, Hugging Face weights, sharded or not) and an atomic
 * writer. Format: 8-byte little-endian header length N, N bytes of JSON, then the data area. */
#ifndef M1C_SAFETENSORS_H
#define M1C_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include "util.h"

/* Every dtype of the format whose elements are whole bytes (sub-byte F4/F6 files are refused). */
typedef enum m1c_st_dtype {
    M1C_ST_BOOL, M1C_ST_U8, M1C_ST_I8, M1C_ST_F8_E5M2, M1C_ST_F8_E4M3, M1C_ST_F8_E8M0,
    M1C_ST_I16, M1C_ST_U16, M1C_ST_F16, M1C_ST_BF16,
    M1C_ST_I32, M1C_ST_U32, M1C_ST_F32,
    M1C_ST_I64, M1C_ST_U64, M1C_ST_F64, M1C_ST_C64,
    M1C_ST_N_DTYPES
} m1c_st_dtype;

#define M1C_ST_MAX_DIMS 8
#define M1C_ST_MAX_HEADER 100000000 /* bytes: the reference implementation's limit */

const char *m1c_st_dtype_name(int st_dtype); /* "F32", ...; "?" when out of range */
size_t m1c_st_dtype_size(int st_dtype);      /* bytes per element; 0 when out of range */
int m1c_st_from_dtype(int dtype);            /* m1c_dtype -> m1c_st_dtype, -1 if none */

/* One tensor of an open file. */
typedef struct m1c_st_tensor {
    const char *name;
    int32_t dtype; /* m1c_st_dtype */
    int32_t ndim;  /* 0 for a scalar */
    int64_t shape[M1C_ST_MAX_DIMS];
    int64_t numel;
    uint64_t offset; /* of the data from the start of the data area */
    uint64_t nbytes;
    /* Into the mapped file. Aligned in files whose header length and earlier tensors keep it so (as
     * m1c's and Hugging Face's writers do), but not guaranteed: read it through memcpy or the
     * functions below. */
    const void *data;
} m1c_st_tensor;

/* An open file (read-only memory map). Fields are read-only for callers. */
typedef struct m1c_st_file {
    char *path;
    int n;
    m1c_st_tensor *t;             /* [n] in file order: by data offset */
    const m1c_st_tensor **by_name; /* [n] sorted by name, for lookup */
    int n_meta;
    char **meta_key, **meta_value; /* [n_meta], in header order */
    void *map;
    size_t map_bytes;
} m1c_st_file;

/* Map and validate a file; on failure *f is left closed and the one-line message names the file and
 * the problem (truncation, bad JSON, unknown dtype, sizes, offsets outside the data area, overlapping
 * tensors, bytes of the data area that no tensor covers, ...). */
int m1c_st_open(m1c_st_file *f, const char *path, m1c_err *e);
void m1c_st_close(m1c_st_file *f); /* safe on a zeroed or closed struct */

int m1c_st_count(const m1c_st_file *f);
const m1c_st_tensor *m1c_st_at(const m1c_st_file *f, int i); /* i-th in file order */
const m1c_st_tensor *m1c_st_find(const m1c_st_file *f, const char *name); /* NULL if absent */
const char *m1c_st_meta(const m1c_st_file *f, const char *key);            /* NULL if absent */

/* Convert a tensor's data (F32, BF16, F16 or F64) to f32 into dst[0..n); n must equal its element
 * count. path only names the file in messages. */
int m1c_st_tensor_f32(const m1c_st_tensor *t, const char *path, float *dst, int64_t n, m1c_err *e);
int m1c_st_read_f32(const m1c_st_file *f, const char *name, float *dst, int64_t n, m1c_err *e);

/* Copy a tensor into a CPU m1c_tensor of exactly the same shape, converting to dst->dtype:
 * F32 <- F32/BF16/F16/F64; BF16 <- BF16, or F32/F16/F64 rounded to nearest even; I32 <- I32, or I64
 * when every value fits. */
int m1c_st_load(const m1c_st_tensor *src, const char *path, m1c_tensor *dst, m1c_err *e);

/* Write CPU tensors (F32, BF16, I32; key = tensor name) in the given order with string metadata,
 * header padded with spaces to a multiple of 8. Atomic: written to "<path>.tmp.<pid>", fsync'ed and
 * renamed over path, so a failure never leaves a partial file at path. */
int m1c_st_write(const char *path, const m1c_tensor *tensors, int n, const char *const *meta_keys,
                 const char *const *meta_values, int n_meta, m1c_err *e);
/* The same, storing tensor i as out_dtypes[i] (an m1c_dtype; NULL = its own): F32 -> BF16 rounds to
 * nearest even (for exports), BF16 -> F32 is exact; other changes are refused. */
int m1c_st_write_as(const char *path, const m1c_tensor *tensors, const int *out_dtypes, int n,
                    const char *const *meta_keys, const char *const *meta_values, int n_meta, m1c_err *e);

/* ---- several files seen as one: sharded Hugging Face checkpoints ---- */

typedef struct m1c_st_set {
    char *path;
    int n_files;
    m1c_st_file *files; /* [n_files] */
    int n;
    const m1c_st_tensor **t; /* [n] every tensor of every file, file after file */
    int *file_of;            /* [n] index into files of t[i] */
    int *by_name;            /* [n] indices into t sorted by name */
} m1c_st_set;

/* path: a "*.safetensors.index.json" ({"weight_map": {name: file}}, files relative to its folder), a
 * single .safetensors file, or a folder holding "model.safetensors.index.json" or "model.safetensors".
 * Every tensor the weight map names must be in the file it names; a name in two files is refused. */
int m1c_st_set_open(m1c_st_set *s, const char *path, m1c_err *e);
void m1c_st_set_close(m1c_st_set *s); /* safe on a zeroed or closed struct */
int m1c_st_set_count(const m1c_st_set *s);
/* i-th tensor (file after file); *file (if not NULL) gets the path of its file. */
const m1c_st_tensor *m1c_st_set_at(const m1c_st_set *s, int i, const char **file);
const m1c_st_tensor *m1c_st_set_find(const m1c_st_set *s, const char *name, const char **file);
int m1c_st_set_read_f32(const m1c_st_set *s, const char *name, float *dst, int64_t n, m1c_err *e);

/* f32 <-> bf16 (round to nearest even; NaN stays NaN) and f16 -> f32, shared with other core code. */
uint16_t m1c_f32_to_bf16(float x);
float m1c_bf16_to_f32(uint16_t h);
float m1c_f16_to_f32(uint16_t h);

#endif
