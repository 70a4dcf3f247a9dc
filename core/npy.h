/* NumPy .npy files (reference logits, token arrays, test fixtures): a strict reader and atomic writers.
 * Little-endian, C order, at most M1C_NPY_MAX_DIMS dimensions. */
#ifndef M1C_NPY_H
#define M1C_NPY_H

#include <stdint.h>
#include "util.h"

#define M1C_NPY_MAX_DIMS 4

typedef enum m1c_npy_dtype {
    M1C_NPY_F32 = 0, /* '<f4', and '<f8' narrowed to f32 (rounded to nearest) on reading */
    M1C_NPY_I32 = 1, /* '<i4' */
    M1C_NPY_I64 = 2, /* '<i8' (NumPy's default integer); m1c_npy_to_i32 narrows it */
} m1c_npy_dtype;

typedef struct m1c_npy {
    int32_t dtype; /* m1c_npy_dtype */
    int32_t ndim;  /* 0 for a scalar */
    int64_t shape[M1C_NPY_MAX_DIMS];
    int64_t numel;
    void *data; /* [numel], malloc'ed; m1c_npy_free releases it */
} m1c_npy;

/* Read a version 1.0, 2.0 or 3.0 file. Refuses (one line naming the file) a bad magic or header,
 * another dtype or byte order, fortran_order True, more than 4 dimensions, and data that is not
 * exactly shape x item size long. On failure *a is zeroed. */
int m1c_npy_read(const char *path, m1c_npy *a, m1c_err *e);
void m1c_npy_free(m1c_npy *a); /* safe on a zeroed or freed struct */

/* Narrow an I64 array to I32 in place (refused, unchanged, if a value does not fit); I32: no-op. */
int m1c_npy_to_i32(m1c_npy *a, const char *path, m1c_err *e);

/* Write byte-for-byte as np.save does (version 1.0 header padded to 64 bytes; 4 dimensions always fit
 * it), atomically: "<path>.tmp.<pid>", fsync, rename. ndim 0..4. */
int m1c_npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, m1c_err *e);
int m1c_npy_write_i32(const char *path, const int32_t *data, int ndim, const int64_t *shape, m1c_err *e);

#endif
