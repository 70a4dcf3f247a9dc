/* safetensors reader (memory-mapped, validated as strictly as the reference implementation), atomic
 * writer, and sharded Hugging Face checkpoints seen as one set of tensors. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host (the format is little-endian)"
#endif

static const struct {
    const char *name;
    size_t size;
} st_dtypes[M1C_ST_N_DTYPES] = {
    [M1C_ST_BOOL] = {"BOOL", 1},       [M1C_ST_U8] = {"U8", 1},
    [M1C_ST_I8] = {"I8", 1},           [M1C_ST_F8_E5M2] = {"F8_E5M2", 1},
    [M1C_ST_F8_E4M3] = {"F8_E4M3", 1}, [M1C_ST_F8_E8M0] = {"F8_E8M0", 1},
    [M1C_ST_I16] = {"I16", 2},         [M1C_ST_U16] = {"U16", 2},
    [M1C_ST_F16] = {"F16", 2},         [M1C_ST_BF16] = {"BF16", 2},
    [M1C_ST_I32] = {"I32", 4},         [M1C_ST_U32] = {"U32", 4},
    [M1C_ST_F32] = {"F32", 4},         [M1C_ST_I64] = {"I64", 8},
    [M1C_ST_U64] = {"U64", 8},         [M1C_ST_F64] = {"F64", 8},
    [M1C_ST_C64] = {"C64", 8},
};

const char *m1c_st_dtype_name(int d) { return d >= 0 && d < M1C_ST_N_DTYPES ? st_dtypes[d].name : "?"; }
size_t m1c_st_dtype_size(int d) { return d >= 0 && d < M1C_ST_N_DTYPES ? st_dtypes[d].size : 0; }

int m1c_st_from_dtype(int dtype) {
    switch (dtype) {
    case M1C_F32: return M1C_ST_F32;
    case M1C_BF16: return M1C_ST_BF16;
    case M1C_I32: return M1C_ST_I32;
    default: return -1;
    }
}

static int st_dtype_parse(const char *s) {
    for (int d = 0; d < M1C_ST_N_DTYPES; d++)
        if (strcmp(s, st_dtypes[d].name) == 0) return d;
    return -1;
}

/* ---- scalar conversions ---- */

static float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t m1c_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep it quiet */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

float m1c_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

float m1c_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* ---- reading ---- */

static int cmp_by_name(const void *a, const void *b) {
    const m1c_st_tensor *x = *(const m1c_st_tensor *const *)a, *y = *(const m1c_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_by_offset(const void *a, const void *b) {
    const m1c_st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name); /* names are unique: a total order, so qsort's result is fixed */
}

void m1c_st_close(m1c_st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_key[i]);
        free(f->meta_value[i]);
    }
    free(f->t);
    free(f->by_name);
    free(f->meta_key);
    free(f->meta_value);
    if (f->map) munmap(f->map, f->map_bytes);
    free(f->path);
    memset(f, 0, sizeof *f);
}

/* Parse one header entry into t (name already set). */
static int parse_entry(m1c_st_tensor *t, json_t *v, const char *path, uint64_t data_len, m1c_err *e) {
    const char *nm = t->name;
    if (!json_is_object(v)) return m1c_fail(e, "%s: tensor '%s': header entry is not a JSON object", path, nm);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!jd) return m1c_fail(e, "%s: tensor '%s': missing 'dtype'", path, nm);
    if (!js) return m1c_fail(e, "%s: tensor '%s': missing 'shape'", path, nm);
    if (!jo) return m1c_fail(e, "%s: tensor '%s': missing 'data_offsets'", path, nm);
    if (!json_is_string(jd)) return m1c_fail(e, "%s: tensor '%s': 'dtype' is not a string", path, nm);
    t->dtype = st_dtype_parse(json_string_value(jd));
    if (t->dtype < 0)
        return m1c_fail(e, "%s: tensor '%s': unknown or unsupported dtype '%s'", path, nm, json_string_value(jd));
    if (!json_is_array(js)) return m1c_fail(e, "%s: tensor '%s': 'shape' is not an array", path, nm);
    size_t nd = json_array_size(js);
    if (nd > M1C_ST_MAX_DIMS)
        return m1c_fail(e, "%s: tensor '%s': shape has %zu dimensions, at most %d supported", path, nm, nd,
                        M1C_ST_MAX_DIMS);
    t->ndim = (int32_t)nd;
    int64_t numel = 1;
    int overflow = 0;
    for (size_t k = 0; k < nd; k++) {
        json_t *x = json_array_get(js, k);
        if (!json_is_integer(x)) return m1c_fail(e, "%s: tensor '%s': shape[%zu] is not an integer", path, nm, k);
        json_int_t d = json_integer_value(x);
        if (d < 0) return m1c_fail(e, "%s: tensor '%s': shape[%zu] = %lld is negative", path, nm, k, (long long)d);
        t->shape[k] = (int64_t)d;
        if (!overflow && __builtin_mul_overflow(numel, (int64_t)d, &numel)) overflow = 1;
    }
    /* A zero dimension makes the tensor empty whatever the others are; otherwise overflow is fatal. */
    for (size_t k = 0; k < nd; k++)
        if (t->shape[k] == 0) overflow = 0, numel = 0;
    uint64_t nbytes = 0;
    if (overflow || __builtin_mul_overflow((uint64_t)numel, (uint64_t)st_dtypes[t->dtype].size, &nbytes))
        return m1c_fail(e, "%s: tensor '%s': shape overflows the element count", path, nm);
    t->numel = numel;
    t->nbytes = nbytes;
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)))
        return m1c_fail(e, "%s: tensor '%s': 'data_offsets' is not an array of two integers", path, nm);
    json_int_t b = json_integer_value(json_array_get(jo, 0)), en = json_integer_value(json_array_get(jo, 1));
    if (b < 0 || en < b)
        return m1c_fail(e, "%s: tensor '%s': invalid data_offsets [%lld, %lld]", path, nm, (long long)b, (long long)en);
    if ((uint64_t)en > data_len)
        return m1c_fail(e, "%s: tensor '%s': data_offsets [%lld, %lld] lie outside the data area of %llu bytes "
                        "(truncated file?)", path, nm, (long long)b, (long long)en, (unsigned long long)data_len);
    if ((uint64_t)(en - b) != nbytes)
        return m1c_fail(e, "%s: tensor '%s': size mismatch: %s shape of %lld elements needs %llu bytes, "
                        "data_offsets [%lld, %lld] hold %lld", path, nm, st_dtypes[t->dtype].name,
                        (long long)numel, (unsigned long long)nbytes, (long long)b, (long long)en,
                        (long long)(en - b));
    t->offset = (uint64_t)b;
    return M1C_OK;
}

static int parse_metadata(m1c_st_file *f, json_t *v, m1c_err *e) {
    if (!json_is_object(v)) return m1c_fail(e, "%s: '__metadata__' is not a JSON object", f->path);
    size_t n = json_object_size(v);
    f->meta_key = m1c_xcalloc(n, sizeof(char *));
    f->meta_value = m1c_xcalloc(n, sizeof(char *));
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        if (!json_is_string(x)) return m1c_fail(e, "%s: metadata '%s' is not a string", f->path, k);
        f->meta_key[f->n_meta] = m1c_xstrdup(k);
        f->meta_value[f->n_meta] = m1c_xstrdup(json_string_value(x));
        f->n_meta++;
    }
    return M1C_OK;
}

static int st_parse(m1c_st_file *f, const uint8_t *hdr, size_t hlen, const uint8_t *data, uint64_t data_len,
                    m1c_err *e) {
    json_error_t je;
    json_t *root = json_loadb((const char *)hdr, hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return m1c_fail(e, "%s: header is not valid JSON: %s (at byte %d of the header)", f->path, je.text,
                        je.position);
    int rc = M1C_OK;
    if (!json_is_object(root)) {
        rc = m1c_fail(e, "%s: header is not a JSON object", f->path);
        goto done;
    }
    size_t cap = json_object_size(root);
    f->t = m1c_xcalloc(cap, sizeof *f->t);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) { /* at most once: JSON_REJECT_DUPLICATES */
            if ((rc = parse_metadata(f, v, e))) goto done;
            continue;
        }
        m1c_st_tensor *t = &f->t[f->n++];
        t->name = m1c_xstrdup(key);
        if ((rc = parse_entry(t, v, f->path, data_len, e))) goto done;
    }
    /* File order is data order (JSON key order carries no meaning in the format). Sorted, each tensor
     * must start exactly where the previous one ends, as the reference implementation requires. */
    qsort(f->t, (size_t)f->n, sizeof *f->t, cmp_by_offset);
    uint64_t end = 0;
    for (int i = 0; i < f->n; i++) {
        m1c_st_tensor *t = &f->t[i];
        if (t->offset < end) {
            rc = m1c_fail(e, "%s: tensors '%s' and '%s' overlap in the data area (bytes %llu..%llu)", f->path,
                          f->t[i - 1].name, t->name, (unsigned long long)t->offset, (unsigned long long)end);
            goto done;
        }
        if (t->offset > end) {
            rc = m1c_fail(e, "%s: data not fully covered: bytes %llu..%llu before tensor '%s' belong to no tensor",
                          f->path, (unsigned long long)end, (unsigned long long)t->offset, t->name);
            goto done;
        }
        end = t->offset + t->nbytes;
        t->data = data + t->offset;
    }
    if (end != data_len) {
        rc = m1c_fail(e, "%s: data not fully covered: the last %llu bytes of the data area belong to no tensor",
                      f->path, (unsigned long long)(data_len - end));
        goto done;
    }
    f->by_name = m1c_xcalloc((size_t)f->n, sizeof *f->by_name);
    for (int i = 0; i < f->n; i++) f->by_name[i] = &f->t[i];
    qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_by_name);
done:
    json_decref(root);
    return rc;
}

int m1c_st_open(m1c_st_file *f, const char *path, m1c_err *e) {
    memset(f, 0, sizeof *f);
    f->path = m1c_xstrdup(path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        m1c_fail(e, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        m1c_fail(e, "%s: not a regular file", path);
        goto fail;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < 8) {
        close(fd);
        m1c_fail(e, "%s: not a safetensors file: %llu bytes, shorter than the 8-byte header length", path,
                 (unsigned long long)size);
        goto fail;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        m1c_fail(e, "%s: cannot map: %s", path, strerror(errno));
        goto fail;
    }
    f->map = map;
    f->map_bytes = (size_t)size;
    const uint8_t *p = map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > M1C_ST_MAX_HEADER) {
        m1c_fail(e, "%s: header length %llu is larger than the 100 MB limit (not a safetensors file?)", path,
                 (unsigned long long)hlen);
        goto fail;
    }
    if (hlen > size - 8) {
        m1c_fail(e, "%s: header length %llu is larger than the file (%llu bytes): truncated?", path,
                 (unsigned long long)hlen, (unsigned long long)size);
        goto fail;
    }
    if (st_parse(f, p + 8, (size_t)hlen, p + 8 + hlen, size - 8 - hlen, e)) goto fail;
    return M1C_OK;
fail:
    m1c_st_close(f);
    return M1C_ERR;
}

int m1c_st_count(const m1c_st_file *f) { return f->n; }

const m1c_st_tensor *m1c_st_at(const m1c_st_file *f, int i) { return i >= 0 && i < f->n ? &f->t[i] : NULL; }

const m1c_st_tensor *m1c_st_find(const m1c_st_file *f, const char *name) {
    if (f->n == 0) return NULL;
    m1c_st_tensor key = {.name = name};
    const m1c_st_tensor *kp = &key;
    const m1c_st_tensor **hit = bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_by_name);
    return hit ? *hit : NULL;
}

const char *m1c_st_meta(const m1c_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_key[i], key) == 0) return f->meta_value[i];
    return NULL;
}

/* Element i of a tensor as f32 (F32/BF16/F16/F64 only), read through memcpy: data may be unaligned. */
static float elem_f32(const m1c_st_tensor *t, int64_t i) {
    const uint8_t *p = (const uint8_t *)t->data + (size_t)i * st_dtypes[t->dtype].size;
    uint16_t h;
    float x;
    double d;
    switch (t->dtype) {
    case M1C_ST_F32: memcpy(&x, p, 4); return x;
    case M1C_ST_BF16: memcpy(&h, p, 2); return m1c_bf16_to_f32(h);
    case M1C_ST_F16: memcpy(&h, p, 2); return m1c_f16_to_f32(h);
    default: memcpy(&d, p, 8); return (float)d; /* M1C_ST_F64 */
    }
}

static int is_float_dtype(int d) { return d == M1C_ST_F32 || d == M1C_ST_BF16 || d == M1C_ST_F16 || d == M1C_ST_F64; }

int m1c_st_tensor_f32(const m1c_st_tensor *t, const char *path, float *dst, int64_t n, m1c_err *e) {
    if (!is_float_dtype(t->dtype))
        return m1c_fail(e, "%s: tensor '%s' has dtype %s, which cannot be read as f32", path, t->name,
                        st_dtypes[t->dtype].name);
    if (t->numel != n)
        return m1c_fail(e, "%s: tensor '%s' has %lld elements, expected %lld", path, t->name, (long long)t->numel,
                        (long long)n);
    if (t->dtype == M1C_ST_F32) {
        if (n) memcpy(dst, t->data, (size_t)n * 4);
        return M1C_OK;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = elem_f32(t, i);
    return M1C_OK;
}

int m1c_st_read_f32(const m1c_st_file *f, const char *name, float *dst, int64_t n, m1c_err *e) {
    const m1c_st_tensor *t = m1c_st_find(f, name);
    if (!t) return m1c_fail(e, "%s: no tensor '%s'", f->path, name);
    return m1c_st_tensor_f32(t, f->path, dst, n, e);
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

int m1c_st_load(const m1c_st_tensor *src, const char *path, m1c_tensor *dst, m1c_err *e) {
    const char *nm = src->name;
    if (dst->device != M1C_DEVICE_CPU)
        return m1c_fail(e, "%s: tensor '%s': destination is not in CPU memory", path, nm);
    int same = src->ndim == dst->ndim;
    for (int k = 0; same && k < src->ndim; k++) same = src->shape[k] == dst->shape[k];
    if (!same) {
        char a[160], b[160];
        shape_str(a, sizeof a, src->ndim, src->shape);
        shape_str(b, sizeof b, dst->ndim, dst->shape);
        return m1c_fail(e, "%s: tensor '%s' has shape %s, expected %s", path, nm, a, b);
    }
    int64_t n = src->numel;
    if (dst->dtype == M1C_F32) return m1c_st_tensor_f32(src, path, dst->data, n, e);
    if (dst->dtype == M1C_BF16 && is_float_dtype(src->dtype)) {
        uint16_t *o = dst->data;
        if (src->dtype == M1C_ST_BF16) {
            if (n) memcpy(o, src->data, (size_t)n * 2);
        } else {
            for (int64_t i = 0; i < n; i++) o[i] = m1c_f32_to_bf16(elem_f32(src, i));
        }
        return M1C_OK;
    }
    if (dst->dtype == M1C_I32 && src->dtype == M1C_ST_I32) {
        if (n) memcpy(dst->data, src->data, (size_t)n * 4);
        return M1C_OK;
    }
    if (dst->dtype == M1C_I32 && src->dtype == M1C_ST_I64) {
        int32_t *o = dst->data;
        for (int64_t i = 0; i < n; i++) {
            int64_t v;
            memcpy(&v, (const uint8_t *)src->data + 8 * i, 8);
            if (v < INT32_MIN || v > INT32_MAX)
                return m1c_fail(e, "%s: tensor '%s': element %lld = %lld does not fit in I32", path, nm,
                                (long long)i, (long long)v);
            o[i] = (int32_t)v;
        }
        return M1C_OK;
    }
    return m1c_fail(e, "%s: tensor '%s' has dtype %s, which cannot be loaded as %s", path, nm,
                    st_dtypes[src->dtype].name,
                    m1c_st_from_dtype(dst->dtype) >= 0 ? st_dtypes[m1c_st_from_dtype(dst->dtype)].name : "?");
}

/* ---- writing ---- */


/* Data of tensor t stored as st dtype `out`, in chunks through a small buffer when converting. */
static void write_tensor_data(m1c_afile *f, const m1c_tensor *t, int out, int64_t numel) {
    int in = m1c_st_from_dtype(t->dtype);
    if (in == out) {
        m1c_afile_write(f, t->data, (size_t)numel * st_dtypes[in].size);
        return;
    }
    enum { CHUNK = 8192 };
    union {
        uint16_t h[CHUNK];
        float f[CHUNK];
    } buf;
    for (int64_t i0 = 0; i0 < numel; i0 += CHUNK) {
        int64_t m = numel - i0 < CHUNK ? numel - i0 : CHUNK;
        if (out == M1C_ST_BF16) { /* from F32 */
            const float *x = (const float *)t->data + i0;
            for (int64_t i = 0; i < m; i++) buf.h[i] = m1c_f32_to_bf16(x[i]);
            m1c_afile_write(f, buf.h, (size_t)m * 2);
        } else { /* F32 from BF16 */
            const uint16_t *x = (const uint16_t *)t->data + i0;
            for (int64_t i = 0; i < m; i++) buf.f[i] = m1c_bf16_to_f32(x[i]);
            m1c_afile_write(f, buf.f, (size_t)m * 4);
        }
    }
}

/* The header JSON, or NULL after m1c_fail. Also fills out[] (st dtypes) and numel[]. */
static char *build_header(const char *path, const m1c_tensor *ts, const int *out_dtypes, int n,
                          const char *const *mk, const char *const *mv, int n_meta, int *out, int64_t *numel,
                          m1c_err *e) {
    json_t *root = json_object();
    char *s = NULL;
    if (n_meta > 0) {
        json_t *meta = json_object();
        json_object_set_new(root, "__metadata__", meta);
        for (int i = 0; i < n_meta; i++) {
            if (!mk[i] || !mv[i]) {
                m1c_fail(e, "%s: metadata entry %d is NULL", path, i);
                goto done;
            }
            if (json_object_get(meta, mk[i])) {
                m1c_fail(e, "%s: duplicate metadata key '%s'", path, mk[i]);
                goto done;
            }
            json_t *str = json_string(mv[i]);
            if (!str || json_object_set_new(meta, mk[i], str)) {
                m1c_fail(e, "%s: metadata '%s' is not valid UTF-8", path, mk[i]);
                goto done;
            }
        }
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const m1c_tensor *t = &ts[i];
        const char *nm = t->name ? t->name : "(null)";
        if (!t->name || !t->name[0] || strcmp(t->name, "__metadata__") == 0) {
            m1c_fail(e, "%s: tensor %d has an invalid name '%s'", path, i, nm);
            goto done;
        }
        if (json_object_get(root, t->name)) {
            m1c_fail(e, "%s: duplicate tensor name '%s'", path, nm);
            goto done;
        }
        int in = m1c_st_from_dtype(t->dtype);
        out[i] = out_dtypes ? m1c_st_from_dtype(out_dtypes[i]) : in;
        if (t->device != M1C_DEVICE_CPU || in < 0 || out[i] < 0 || t->ndim < 0 || t->ndim > M1C_MAX_DIMS) {
            m1c_fail(e, "%s: tensor '%s': not a CPU tensor of dtype F32/BF16/I32 with at most %d dimensions", path,
                     nm, M1C_MAX_DIMS);
            goto done;
        }
        if (in != out[i] && !((in == M1C_ST_F32 && out[i] == M1C_ST_BF16) || (in == M1C_ST_BF16 && out[i] == M1C_ST_F32))) {
            m1c_fail(e, "%s: tensor '%s': cannot store %s as %s", path, nm, st_dtypes[in].name, st_dtypes[out[i]].name);
            goto done;
        }
        json_t *shape = json_array();
        int64_t ne = 1;
        for (int k = 0; k < t->ndim; k++) {
            if (t->shape[k] < 0 || __builtin_mul_overflow(ne, t->shape[k], &ne)) {
                json_decref(shape);
                m1c_fail(e, "%s: tensor '%s': invalid shape", path, nm);
                goto done;
            }
            json_array_append_new(shape, json_integer(t->shape[k]));
        }
        if (ne > 0 && !t->data) {
            json_decref(shape);
            m1c_fail(e, "%s: tensor '%s': data is NULL", path, nm);
            goto done;
        }
        numel[i] = ne;
        uint64_t nb = (uint64_t)ne * st_dtypes[out[i]].size;
        json_t *ent = json_object();
        json_object_set_new(ent, "dtype", json_string(st_dtypes[out[i]].name));
        json_object_set_new(ent, "shape", shape);
        json_object_set_new(ent, "data_offsets", json_pack("[II]", (json_int_t)off, (json_int_t)(off + nb)));
        if (json_object_set_new(root, t->name, ent)) {
            m1c_fail(e, "%s: tensor name '%s' is not valid UTF-8", path, nm);
            goto done;
        }
        off += nb;
    }
    s = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!s) m1c_fail(e, "%s: cannot encode the header", path);
done:
    json_decref(root);
    return s;
}

int m1c_st_write_as(const char *path, const m1c_tensor *tensors, const int *out_dtypes, int n,
                    const char *const *meta_keys, const char *const *meta_values, int n_meta, m1c_err *e) {
    if (n < 0 || n_meta < 0) return m1c_fail(e, "%s: negative tensor or metadata count", path);
    int *out = m1c_xcalloc((size_t)n, sizeof *out);
    int64_t *numel = m1c_xcalloc((size_t)n, sizeof *numel);
    int rc = M1C_ERR;
    char *hdr = build_header(path, tensors, out_dtypes, n, meta_keys, meta_values, n_meta, out, numel, e);
    if (!hdr) goto done;
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    hdr = m1c_xrealloc(hdr, padded + 1);
    memset(hdr + hl, ' ', padded - hl);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));

    m1c_afile f;
    if (m1c_afile_open(&f, path, e)) goto done;
    m1c_afile_write(&f, len8, 8);
    m1c_afile_write(&f, hdr, padded);
    for (int i = 0; i < n; i++) write_tensor_data(&f, &tensors[i], out[i], numel[i]);
    rc = m1c_afile_commit(&f, e);
done:
    free(hdr);
    free(out);
    free(numel);
    return rc;
}

int m1c_st_write(const char *path, const m1c_tensor *tensors, int n, const char *const *meta_keys,
                 const char *const *meta_values, int n_meta, m1c_err *e) {
    return m1c_st_write_as(path, tensors, NULL, n, meta_keys, meta_values, n_meta, e);
}

/* ---- sets of files ---- */

void m1c_st_set_close(m1c_st_set *s) {
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) m1c_st_close(&s->files[i]);
    free(s->files);
    free(s->t);
    free(s->file_of);
    free(s->by_name);
    free(s->path);
    memset(s, 0, sizeof *s);
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* A shard name from an index: relative, no "..", so an index cannot point outside its folder. */
static int shard_name_ok(const char *f) {
    if (!f[0] || f[0] == '/') return 0;
    for (const char *p = f; *p;) {
        const char *q = strchr(p, '/');
        size_t len = q ? (size_t)(q - p) : strlen(p);
        if (len == 2 && p[0] == '.' && p[1] == '.') return 0;
        p += len + (q ? 1 : 0);
    }
    return 1;
}

/* A name and its index in s->t: qsort has no context argument, so the sort key carries the name. */
typedef struct set_key {
    const char *name;
    int idx;
} set_key;

static int cmp_set_key(const void *a, const void *b) {
    const set_key *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    return c ? c : (x->idx > y->idx) - (x->idx < y->idx);
}

/* After files are open: flatten, index by name, refuse names in two files. */
static int set_index(m1c_st_set *s, m1c_err *e) {
    for (int i = 0; i < s->n_files; i++) s->n += s->files[i].n;
    s->t = m1c_xcalloc((size_t)s->n, sizeof *s->t);
    s->file_of = m1c_xcalloc((size_t)s->n, sizeof *s->file_of);
    s->by_name = m1c_xcalloc((size_t)s->n, sizeof *s->by_name);
    set_key *keys = m1c_xcalloc((size_t)s->n, sizeof *keys);
    int k = 0;
    for (int i = 0; i < s->n_files; i++)
        for (int j = 0; j < s->files[i].n; j++, k++) {
            s->t[k] = &s->files[i].t[j];
            s->file_of[k] = i;
            keys[k] = (set_key){s->t[k]->name, k};
        }
    qsort(keys, (size_t)s->n, sizeof *keys, cmp_set_key);
    int rc = M1C_OK;
    for (int i = 0; i < s->n; i++) {
        s->by_name[i] = keys[i].idx;
        if (i > 0 && strcmp(keys[i].name, keys[i - 1].name) == 0) {
            rc = m1c_fail(e, "%s: tensor '%s' is in both %s and %s", s->path, keys[i].name,
                          s->files[s->file_of[keys[i - 1].idx]].path, s->files[s->file_of[keys[i].idx]].path);
            break;
        }
    }
    free(keys);
    return rc;
}

static int set_open_index(m1c_st_set *s, const char *index, m1c_err *e) {
    json_error_t je;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &je);
    if (!root) return m1c_fail(e, "%s: not a valid JSON index: %s (line %d)", index, je.text, je.line);
    int rc = M1C_ERR;
    char *dir = m1c_dirname(index);
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        m1c_fail(e, "%s: index has no 'weight_map' object", index);
        goto done;
    }
    /* Distinct shard names, in order of first mention. */
    size_t nw = json_object_size(wm);
    const char **names = m1c_xcalloc(nw, sizeof *names);
    int nn = 0;
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v) {
        if (!json_is_string(v) || !shard_name_ok(json_string_value(v))) {
            m1c_fail(e, "%s: weight_map entry '%s' is not a relative file name inside the index's folder", index, key);
            free(names);
            goto done;
        }
        const char *fn = json_string_value(v);
        int seen = 0;
        for (int i = 0; i < nn && !seen; i++) seen = strcmp(names[i], fn) == 0;
        if (!seen) names[nn++] = fn;
    }
    s->files = m1c_xcalloc((size_t)(nn ? nn : 1), sizeof *s->files);
    for (int i = 0; i < nn; i++) {
        char *p = m1c_path_join(dir, names[i]);
        int r = m1c_st_open(&s->files[i], p, e);
        free(p);
        if (r) {
            free(names);
            goto done;
        }
        s->n_files++;
    }
    free(names);
    if (set_index(s, e)) goto done;
    json_object_foreach(wm, key, v) {
        const char *file = NULL;
        const m1c_st_tensor *t = m1c_st_set_find(s, key, &file);
        char *want = m1c_path_join(dir, json_string_value(v));
        int ok = t && strcmp(file, want) == 0;
        if (!ok) m1c_fail(e, "%s: weight_map puts tensor '%s' in %s, which has no such tensor", index, key, want);
        free(want);
        if (!ok) goto done;
    }
    rc = M1C_OK;
done:
    free(dir);
    json_decref(root);
    return rc;
}

int m1c_st_set_open(m1c_st_set *s, const char *path, m1c_err *e) {
    memset(s, 0, sizeof *s);
    struct stat st;
    if (stat(path, &st) != 0) return m1c_fail(e, "%s: cannot open: %s", path, strerror(errno));
    char *target = NULL;
    if (S_ISDIR(st.st_mode)) {
        char *idx = m1c_path_join(path, "model.safetensors.index.json");
        char *one = m1c_path_join(path, "model.safetensors");
        if (m1c_file_exists(idx)) target = idx, free(one);
        else if (m1c_file_exists(one)) target = one, free(idx);
        else {
            free(idx);
            free(one);
            return m1c_fail(e, "%s: folder has neither model.safetensors.index.json nor model.safetensors", path);
        }
    } else {
        target = m1c_xstrdup(path);
    }
    s->path = target;
    int rc;
    if (ends_with(target, ".json")) {
        rc = set_open_index(s, target, e);
    } else {
        s->files = m1c_xcalloc(1, sizeof *s->files);
        rc = m1c_st_open(&s->files[0], target, e);
        if (rc == M1C_OK) s->n_files = 1, rc = set_index(s, e);
    }
    if (rc) m1c_st_set_close(s);
    return rc;
}

int m1c_st_set_count(const m1c_st_set *s) { return s->n; }

const m1c_st_tensor *m1c_st_set_at(const m1c_st_set *s, int i, const char **file) {
    if (i < 0 || i >= s->n) return NULL;
    if (file) *file = s->files[s->file_of[i]].path;
    return s->t[i];
}

const m1c_st_tensor *m1c_st_set_find(const m1c_st_set *s, const char *name, const char **file) {
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, k = s->by_name[mid];
        int c = strcmp(name, s->t[k]->name);
        if (c == 0) {
            if (file) *file = s->files[s->file_of[k]].path;
            return s->t[k];
        }
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

int m1c_st_set_read_f32(const m1c_st_set *s, const char *name, float *dst, int64_t n, m1c_err *e) {
    const char *file = NULL;
    const m1c_st_tensor *t = m1c_st_set_find(s, name, &file);
    if (!t) return m1c_fail(e, "%s: no tensor '%s'", s->path, name);
    return m1c_st_tensor_f32(t, file, dst, n, e);
}
