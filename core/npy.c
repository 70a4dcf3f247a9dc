/* NumPy .npy reader and writers. The header is a Python dict literal; we parse just the subset NumPy
 * writes ({'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }) with either quote style. */
#include "npy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c assumes a little-endian host"
#endif

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAX_HEADER 10000 /* NumPy's own default limit (max_header_size) */
#define NPY_ALIGN 64         /* NumPy pads the header so that data starts on this boundary */
#define NPY_GROWTH_DIGITS 21 /* NumPy leaves room for the first axis to grow to this many digits */

/* ---- the header dict ---- */

typedef struct hdr_parser {
    const char *p, *end;
} hdr_parser;

static void skip_ws(hdr_parser *h) {
    while (h->p < h->end && (*h->p == ' ' || *h->p == '\t' || *h->p == '\n' || *h->p == '\r')) h->p++;
}

static int eat(hdr_parser *h, char c) {
    skip_ws(h);
    if (h->p < h->end && *h->p == c) {
        h->p++;
        return 1;
    }
    return 0;
}

/* A quoted string (no escapes: none occur in keys or dtype strings) into buf. */
static int parse_str(hdr_parser *h, char *buf, size_t cap) {
    skip_ws(h);
    if (h->p >= h->end || (*h->p != '\'' && *h->p != '"')) return 0;
    char q = *h->p++;
    size_t n = 0;
    while (h->p < h->end && *h->p != q) {
        if (*h->p == '\\' || n + 1 >= cap) return 0;
        buf[n++] = *h->p++;
    }
    if (h->p >= h->end) return 0;
    h->p++;
    buf[n] = 0;
    return 1;
}

static int parse_word(hdr_parser *h, const char *w) {
    skip_ws(h);
    size_t n = strlen(w);
    if ((size_t)(h->end - h->p) < n || memcmp(h->p, w, n) != 0) return 0;
    h->p += n;
    return 1;
}

/* A tuple of non-negative integers: "()", "(5,)", "(2, 3)" ("3L" from Python 2 files accepted). */
static int parse_shape(hdr_parser *h, m1c_npy *a, const char *path, m1c_err *e) {
    if (!eat(h, '(')) return m1c_fail(e, "%s: npy header: 'shape' is not a tuple", path);
    int n = 0, trailing_comma = 0;
    for (;;) {
        if (eat(h, ')')) break;
        skip_ws(h);
        if (h->p >= h->end || *h->p < '0' || *h->p > '9')
            return m1c_fail(e, "%s: npy header: 'shape' holds something other than non-negative integers", path);
        int64_t v = 0;
        while (h->p < h->end && *h->p >= '0' && *h->p <= '9') {
            if (v > (INT64_MAX - 9) / 10) return m1c_fail(e, "%s: npy header: a dimension overflows", path);
            v = v * 10 + (*h->p++ - '0');
        }
        if (h->p < h->end && *h->p == 'L') h->p++;
        if (n == M1C_NPY_MAX_DIMS)
            return m1c_fail(e, "%s: npy array has more than %d dimensions", path, M1C_NPY_MAX_DIMS);
        a->shape[n++] = v;
        trailing_comma = eat(h, ',');
        if (!trailing_comma) {
            if (!eat(h, ')')) return m1c_fail(e, "%s: npy header: 'shape' tuple is malformed", path);
            break;
        }
    }
    if (n == 1 && !trailing_comma) return m1c_fail(e, "%s: npy header: 'shape' (n) is not a tuple", path);
    a->ndim = n;
    return M1C_OK;
}

/* Item size of the file's dtype, setting a->dtype; 0 when unsupported. */
static int parse_header(const char *hdr, size_t len, m1c_npy *a, size_t *item, const char *path, m1c_err *e) {
    hdr_parser h = {hdr, hdr + len};
    int seen_descr = 0, seen_fortran = 0, seen_shape = 0;
    if (!eat(&h, '{')) return m1c_fail(e, "%s: npy header is not a dict", path);
    for (;;) {
        if (eat(&h, '}')) break;
        char key[32], val[32];
        if (!parse_str(&h, key, sizeof key) || !eat(&h, ':'))
            return m1c_fail(e, "%s: npy header dict is malformed", path);
        if (strcmp(key, "descr") == 0 && !seen_descr) {
            seen_descr = 1;
            if (!parse_str(&h, val, sizeof val)) return m1c_fail(e, "%s: npy header: 'descr' is not a string", path);
            if (strcmp(val, "<f4") == 0) a->dtype = M1C_NPY_F32, *item = 4;
            else if (strcmp(val, "<f8") == 0) a->dtype = M1C_NPY_F32, *item = 8;
            else if (strcmp(val, "<i4") == 0) a->dtype = M1C_NPY_I32, *item = 4;
            else if (strcmp(val, "<i8") == 0) a->dtype = M1C_NPY_I64, *item = 8;
            else
                return m1c_fail(e, "%s: npy dtype '%s' is not supported (only <f4, <f8, <i4, <i8)", path, val);
        } else if (strcmp(key, "fortran_order") == 0 && !seen_fortran) {
            seen_fortran = 1;
            if (parse_word(&h, "True"))
                return m1c_fail(e, "%s: npy array is in Fortran order; only C order is supported", path);
            if (!parse_word(&h, "False"))
                return m1c_fail(e, "%s: npy header: 'fortran_order' is not True or False", path);
        } else if (strcmp(key, "shape") == 0 && !seen_shape) {
            seen_shape = 1;
            if (parse_shape(&h, a, path, e)) return M1C_ERR;
        } else {
            return m1c_fail(e, "%s: npy header has an unexpected or repeated key '%s'", path, key);
        }
        if (!eat(&h, ',')) {
            if (!eat(&h, '}')) return m1c_fail(e, "%s: npy header dict is malformed", path);
            break;
        }
    }
    skip_ws(&h);
    if (h.p != h.end) return m1c_fail(e, "%s: npy header has trailing bytes after the dict", path);
    if (!seen_descr || !seen_fortran || !seen_shape)
        return m1c_fail(e, "%s: npy header lacks '%s'", path,
                        !seen_descr ? "descr" : !seen_fortran ? "fortran_order" : "shape");
    return M1C_OK;
}

/* ---- reading ---- */

void m1c_npy_free(m1c_npy *a) {
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

static int npy_read(FILE *fp, const char *path, m1c_npy *a, m1c_err *e) {
    uint8_t pre[12];
    if (fread(pre, 1, 10, fp) != 10 || memcmp(pre, NPY_MAGIC, 6) != 0)
        return m1c_fail(e, "%s: not a .npy file (bad magic or shorter than 10 bytes)", path);
    int major = pre[6], minor = pre[7];
    size_t hlen, prefix;
    if (major == 1 && minor == 0) {
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
        prefix = 10;
    } else if ((major == 2 || major == 3) && minor == 0) {
        if (fread(pre + 10, 1, 2, fp) != 2) return m1c_fail(e, "%s: npy file truncated in its header", path);
        hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
        prefix = 12;
    } else {
        return m1c_fail(e, "%s: npy format version %d.%d is not supported (1.0, 2.0, 3.0)", path, major, minor);
    }
    if (hlen > NPY_MAX_HEADER)
        return m1c_fail(e, "%s: npy header of %zu bytes is larger than %d", path, hlen, NPY_MAX_HEADER);
    char hdr[NPY_MAX_HEADER];
    if (fread(hdr, 1, hlen, fp) != hlen) return m1c_fail(e, "%s: npy file truncated in its header", path);
    size_t item = 0;
    if (parse_header(hdr, hlen, a, &item, path, e)) return M1C_ERR;
    int64_t numel = 1;
    for (int k = 0; k < a->ndim; k++)
        if (__builtin_mul_overflow(numel, a->shape[k], &numel))
            return m1c_fail(e, "%s: npy shape overflows the element count", path);
    uint64_t nbytes;
    if (__builtin_mul_overflow((uint64_t)numel, (uint64_t)item, &nbytes) || nbytes > SIZE_MAX / 2)
        return m1c_fail(e, "%s: npy shape overflows the data size", path);
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) return m1c_fail(e, "%s: cannot stat: %s", path, strerror(errno));
    uint64_t have = (uint64_t)st.st_size - (prefix + hlen);
    if (have != nbytes)
        return m1c_fail(e, "%s: npy data size mismatch: shape and dtype need %llu bytes, the file holds %llu%s", path,
                        (unsigned long long)nbytes, (unsigned long long)have, have < nbytes ? " (truncated?)" : "");
    a->numel = numel;
    a->data = malloc(nbytes ? (size_t)nbytes : 1);
    if (!a->data) return m1c_fail(e, "%s: out of memory for %llu bytes of npy data", path, (unsigned long long)nbytes);
    if (fread(a->data, 1, (size_t)nbytes, fp) != (size_t)nbytes)
        return m1c_fail(e, "%s: cannot read npy data: %s", path, ferror(fp) ? strerror(errno) : "unexpected end");
    if (item == 8 && a->dtype == M1C_NPY_F32) { /* '<f8': narrow in place, front to back (dst trails src) */
        uint8_t *b = a->data;
        for (int64_t i = 0; i < numel; i++) {
            double d;
            memcpy(&d, b + 8 * i, 8);
            float f = (float)d;
            memcpy(b + 4 * i, &f, 4);
        }
        void *shrunk = realloc(a->data, numel ? (size_t)numel * 4 : 1);
        if (shrunk) a->data = shrunk;
    }
    return M1C_OK;
}

int m1c_npy_read(const char *path, m1c_npy *a, m1c_err *e) {
    memset(a, 0, sizeof *a);
    FILE *fp = fopen(path, "rb");
    if (!fp) return m1c_fail(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = fstat(fileno(fp), &st) == 0 && S_ISREG(st.st_mode) ? npy_read(fp, path, a, e)
                                                                 : m1c_fail(e, "%s: not a regular file", path);
    fclose(fp);
    if (rc) m1c_npy_free(a);
    return rc;
}

int m1c_npy_to_i32(m1c_npy *a, const char *path, m1c_err *e) {
    if (a->dtype == M1C_NPY_I32) return M1C_OK;
    if (a->dtype != M1C_NPY_I64) return m1c_fail(e, "%s: npy array is not an integer array", path);
    const int64_t *src = a->data;
    for (int64_t i = 0; i < a->numel; i++)
        if (src[i] < INT32_MIN || src[i] > INT32_MAX)
            return m1c_fail(e, "%s: npy element %lld = %lld does not fit in int32", path, (long long)i,
                            (long long)src[i]);
    uint8_t *b = a->data;
    for (int64_t i = 0; i < a->numel; i++) {
        int64_t v;
        memcpy(&v, b + 8 * i, 8);
        int32_t w = (int32_t)v;
        memcpy(b + 4 * i, &w, 4);
    }
    a->dtype = M1C_NPY_I32;
    return M1C_OK;
}

/* ---- writing ---- */


static int npy_write(const char *path, const void *data, const char *descr, size_t item, int ndim,
                     const int64_t *shape, m1c_err *e) {
    if (ndim < 0 || ndim > M1C_NPY_MAX_DIMS)
        return m1c_fail(e, "%s: npy arrays have 0 to %d dimensions, not %d", path, M1C_NPY_MAX_DIMS, ndim);
    /* The dict exactly as NumPy's _write_array_header writes it (sorted keys, repr of the tuple, room
     * for the first axis to grow), so files are byte-identical to np.save's. */
    char dict[256], tup[128];
    size_t k = (size_t)snprintf(tup, sizeof tup, "(");
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || __builtin_mul_overflow(numel, shape[i], &numel))
            return m1c_fail(e, "%s: invalid npy shape", path);
        k += (size_t)snprintf(tup + k, sizeof tup - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    snprintf(tup + k, sizeof tup - k, "%s)", ndim == 1 ? "," : "");
    if (numel > 0 && !data) return m1c_fail(e, "%s: npy data is NULL", path);
    int dl = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, tup);
    if (ndim > 0) {
        char first[32];
        int grow = NPY_GROWTH_DIGITS - snprintf(first, sizeof first, "%lld", (long long)shape[0]);
        dl += snprintf(dict + dl, sizeof dict - (size_t)dl, "%*s", grow > 0 ? grow : 0, "");
    }
    size_t hlen = (size_t)dl + 1; /* + '\n' */
    size_t pad = NPY_ALIGN - (10 + hlen) % NPY_ALIGN;
    uint8_t head[10 + 256 + NPY_ALIGN];
    memcpy(head, NPY_MAGIC, 6);
    head[6] = 1, head[7] = 0;
    head[8] = (uint8_t)((hlen + pad) & 0xff), head[9] = (uint8_t)((hlen + pad) >> 8);
    memcpy(head + 10, dict, (size_t)dl);
    memset(head + 10 + dl, ' ', pad);
    head[10 + (size_t)dl + pad] = '\n';
    size_t total = 10 + (size_t)dl + pad + 1;

    m1c_afile f;
    if (m1c_afile_open(&f, path, e)) return M1C_ERR;
    m1c_afile_write(&f, head, total);
    m1c_afile_write(&f, data, (size_t)numel * item);
    return m1c_afile_commit(&f, e);
}

int m1c_npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, m1c_err *e) {
    return npy_write(path, data, "<f4", 4, ndim, shape, e);
}

int m1c_npy_write_i32(const char *path, const int32_t *data, int ndim, const int64_t *shape, m1c_err *e) {
    return npy_write(path, data, "<i4", 4, ndim, shape, e);
}
