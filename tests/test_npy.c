/* Tests of core/npy.c: files laid out byte for byte as NumPy writes them (bytes copied from np.save's
 * output), writer output identical to NumPy's, round trips, and every refusal. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../core/npy.h"
#include "harness.h"

/* Each test's scratch folder (th_tmpdir): made by the suite's init, removed by its fini. */
static void setup(void) { th_tmpdir_init("npy"); }

TestSuite(npy, .init = setup, .fini = th_tmpdir_fini);

/* Build the bytes of a .npy file: prefix (magic, version, header length field, given literally as in
 * NumPy's output), the dict, spaces up to header_end - 1, '\n', then the data. Returns the size. */
static size_t npy_bytes(uint8_t *out, const char *prefix, size_t prefix_len, const char *dict, size_t header_end,
                        const void *data, size_t n) {
    size_t dl = strlen(dict);
    cr_assert(prefix_len + dl + 1 <= header_end);
    memcpy(out, prefix, prefix_len);
    memcpy(out + prefix_len, dict, dl);
    memset(out + prefix_len + dl, ' ', header_end - 1 - prefix_len - dl);
    out[header_end - 1] = '\n';
    memcpy(out + header_end, data, n);
    return header_end + n;
}

/* Write a file laid out as NumPy does, header ending at byte 128 (as in every np.save output here). */
static const char *put_npy(const char *name, const char *prefix, size_t prefix_len, const char *dict,
                           const void *data, size_t n) {
    uint8_t buf[1024];
    size_t len = npy_bytes(buf, prefix, prefix_len, dict, 128, data, n);
    const char *p = th_tmp(name);
    th_write_file(p, buf, len);
    return p;
}

#define V1 "\x93NUMPY\x01\x00v\x00" /* version 1.0, header length 118 (0x76, 'v'): data at byte 128 */
#define V2 "\x93NUMPY\x02\x00t\x00\x00\x00" /* version 2.0, header length 116: data at byte 128 */
#define V3 "\x93NUMPY\x03\x00t\x00\x00\x00"

/* np.arange(6, dtype='<f4').reshape(2, 3) * 0.5 - 1 */
static const uint8_t f4_2x3[24] = {0, 0, 0x80, 0xbf, 0, 0, 0, 0xbf, 0, 0, 0, 0, 0, 0, 0, 0x3f, 0, 0, 0x80, 0x3f, 0, 0, 0xc0, 0x3f};
#define F4_2X3_DICT "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"

static void expect_refusal(const char *path, const char *what) {
    m1c_npy a;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(path, &a, &e), M1C_ERR, "%s was accepted (expected: %s)", path, what);
    cr_expect(strstr(e.msg, what), "message '%s' does not mention '%s'", e.msg, what);
    cr_expect(strstr(e.msg, path), "message '%s' does not name the file", e.msg);
    cr_expect_null(strchr(e.msg, '\n'), "message is not one line");
    cr_expect_null(a.data);
}

Test(npy, reads_numpy_f4) {
    const char *p = put_npy("a.npy", V1, 10, F4_2X3_DICT, f4_2x3, sizeof f4_2x3);
    m1c_npy a;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_F32);
    cr_assert_eq(a.ndim, 2);
    cr_assert_eq(a.shape[0], 2);
    cr_assert_eq(a.shape[1], 3);
    cr_assert_eq(a.numel, 6);
    const float want[6] = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
    for (int i = 0; i < 6; i++) /* exact: the bytes are these values, no arithmetic involved */
        cr_assert_eq(((float *)a.data)[i], want[i], "element %d", i);
    m1c_npy_free(&a);
    m1c_npy_free(&a); /* freeing twice is safe */
}

Test(npy, reads_numpy_i8_and_narrows) {
    /* np.array([[1, -2], [3, 2**40]], dtype='<i8') */
    const uint8_t big[32] = {1, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                             3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0};
    const char *dict = "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }";
    const char *p = put_npy("big.npy", V1, 10, dict, big, sizeof big);
    m1c_npy a;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_I64);
    const int64_t want[4] = {1, -2, 3, (int64_t)1 << 40};
    for (int i = 0; i < 4; i++) cr_assert_eq(((int64_t *)a.data)[i], want[i]);
    cr_assert_eq(m1c_npy_to_i32(&a, p, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "does not fit"), "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_I64, "a refused narrowing leaves the array as it was");
    cr_assert_eq(((int64_t *)a.data)[3], want[3]);
    m1c_npy_free(&a);

    const uint8_t small[32] = {1, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                               0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0xff, 0xff, 0xff};
    p = put_npy("small.npy", V1, 10, dict, small, sizeof small);
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_npy_to_i32(&a, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_I32);
    const int32_t w32[4] = {1, -2, INT32_MAX, INT32_MIN};
    for (int i = 0; i < 4; i++) cr_assert_eq(((int32_t *)a.data)[i], w32[i]);
    m1c_npy_free(&a);
}

Test(npy, reads_version2_f8_as_f32) {
    /* numpy.lib.format.write_array(f, np.array([0.1, -2.5, 1e40]), version=(2, 0)) */
    const uint8_t d[24] = {0x9a, 0x99, 0x99, 0x99, 0x99, 0x99, 0xb9, 0x3f, 0, 0, 0, 0, 0, 0, 0x04, 0xc0,
                           0xa5, 0x5c, 0xc3, 0xf1, 0x29, 0x63, 0x3d, 0x48};
    const char *p = put_npy("f8.npy", V2, 12, "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", d, sizeof d);
    m1c_npy a;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_F32);
    cr_assert_eq(a.ndim, 1);
    cr_assert_eq(a.shape[0], 3);
    const float *x = a.data;
    /* exact: narrowing rounds to the nearest float, which is what the C conversion of 0.1 gives */
    cr_assert_eq(x[0], (float)0.1);
    cr_assert_eq(x[1], -2.5f);
    cr_assert(isinf(x[2]) && x[2] > 0, "1e40 overflows f32 to +inf, got %g", x[2]);
    m1c_npy_free(&a);
}

Test(npy, reads_version3_scalar_and_python2_longs) {
    const uint8_t seven[4] = {7, 0, 0, 0};
    const char *p = put_npy("s.npy", V3, 12, "{'descr': '<i4', 'fortran_order': False, 'shape': (), }", seven, 4);
    m1c_npy a;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_I32);
    cr_assert_eq(a.ndim, 0);
    cr_assert_eq(a.numel, 1);
    cr_assert_eq(((int32_t *)a.data)[0], 7);
    m1c_npy_free(&a);

    /* Python 2 NumPy wrote longs ("3L") and any key order; double quotes are valid Python too */
    p = put_npy("py2.npy", V1, 10, "{\"shape\": (2L, 3L), 'fortran_order': False, 'descr': '<f4'}", f4_2x3,
                sizeof f4_2x3);
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.shape[0], 2);
    cr_assert_eq(a.shape[1], 3);
    cr_assert_eq(((float *)a.data)[5], 1.5f); /* exact: a copied value */
    m1c_npy_free(&a);
}

Test(npy, writer_matches_numpy_bytes) {
    uint8_t want[1024], got[1024];
    m1c_err e = {{0}};

    const float v[6] = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
    const int64_t s23[2] = {2, 3};
    const char *p = th_tmp("w.npy");
    cr_assert_eq(m1c_npy_write_f32(p, v, 2, s23, &e), M1C_OK, "%s", e.msg);
    size_t nw = npy_bytes(want, V1, 10, F4_2X3_DICT, 128, f4_2x3, sizeof f4_2x3);
    size_t ng = th_read_into(p, got, sizeof got);
    cr_assert_eq(ng, nw);
    cr_assert_eq(memcmp(got, want, nw), 0, "bytes differ from np.save's");

    /* np.save(f, np.arange(5, dtype='<i4')): 1-d shapes are written "(5,)" */
    const int32_t iv[5] = {0, 1, 2, 3, 4};
    const uint8_t ib[20] = {0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0};
    const int64_t s5[1] = {5};
    p = th_tmp("i.npy");
    cr_assert_eq(m1c_npy_write_i32(p, iv, 1, s5, &e), M1C_OK, "%s", e.msg);
    nw = npy_bytes(want, V1, 10, "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }", 128, ib, 20);
    ng = th_read_into(p, got, sizeof got);
    cr_assert_eq(ng, nw);
    cr_assert_eq(memcmp(got, want, nw), 0, "bytes differ from np.save's");

    /* np.save(f, np.float32(3.5)): a scalar, "()" and no growth padding */
    const float sc = 3.5f;
    const uint8_t sb[4] = {0, 0, 0x60, 0x40};
    p = th_tmp("sc.npy");
    cr_assert_eq(m1c_npy_write_f32(p, &sc, 0, NULL, &e), M1C_OK, "%s", e.msg);
    nw = npy_bytes(want, V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 128, sb, 4);
    ng = th_read_into(p, got, sizeof got);
    cr_assert_eq(ng, nw);
    cr_assert_eq(memcmp(got, want, nw), 0, "bytes differ from np.save's");
}

Test(npy, round_trips) {
    m1c_err e = {{0}};
    m1c_npy a;
    enum { N = 24 };
    float f[N];
    int32_t k[N];
    for (int i = 0; i < N; i++) f[i] = (float)i * 0.37f - 3.1f, k[i] = i * 1000003 - 7;
    const int64_t s4[4] = {1, 2, 3, 4};
    const char *p = th_tmp("f.npy");
    cr_assert_eq(m1c_npy_write_f32(p, f, 4, s4, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_F32);
    cr_assert_eq(a.ndim, 4);
    for (int d = 0; d < 4; d++) cr_assert_eq(a.shape[d], s4[d]);
    cr_assert_eq(memcmp(a.data, f, sizeof f), 0, "bytes differ after a round trip");
    m1c_npy_free(&a);

    const int64_t s2[2] = {6, 4};
    p = th_tmp("k.npy");
    cr_assert_eq(m1c_npy_write_i32(p, k, 2, s2, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_I32);
    cr_assert_eq(memcmp(a.data, k, sizeof k), 0, "bytes differ after a round trip");
    m1c_npy_free(&a);

    /* empty arrays are legal: (0, 7) */
    const int64_t s0[2] = {0, 7};
    p = th_tmp("z.npy");
    cr_assert_eq(m1c_npy_write_f32(p, NULL, 2, s0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.numel, 0);
    cr_assert_eq(a.shape[1], 7);
    m1c_npy_free(&a);

    /* overwriting is atomic and leaves no temporary file behind */
    cr_assert_eq(m1c_npy_write_i32(p, k, 2, s2, &e), M1C_OK, "%s", e.msg);
    DIR *d = opendir(th_tmpdir());
    struct dirent *de;
    while ((de = readdir(d))) cr_assert_null(strstr(de->d_name, ".tmp."), "left behind: %s", de->d_name);
    closedir(d);
}

Test(npy, refuses_fortran_order) {
    /* np.save(f, np.asfortranarray(np.arange(6, dtype='<f4').reshape(2, 3))) */
    const char *p = put_npy("fo.npy", V1, 10, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", f4_2x3,
                            sizeof f4_2x3);
    expect_refusal(p, "Fortran order");
}

Test(npy, refuses_bad_dtypes) {
    expect_refusal(put_npy("be.npy", V1, 10, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", f4_2x3, 8),
                   "'>f4' is not supported");
    expect_refusal(put_npy("c8.npy", V1, 10, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", f4_2x3, 8),
                   "'<c8' is not supported");
    expect_refusal(put_npy("u1.npy", V1, 10, "{'descr': '|u1', 'fortran_order': False, 'shape': (8,), }", f4_2x3, 8),
                   "'|u1' is not supported");
}

Test(npy, refuses_size_mismatch_and_truncation) {
    expect_refusal(put_npy("short.npy", V1, 10, F4_2X3_DICT, f4_2x3, 23), "size mismatch");
    uint8_t more[25] = {0};
    expect_refusal(put_npy("long.npy", V1, 10, F4_2X3_DICT, more, 25), "size mismatch");
    /* cut inside the header */
    uint8_t buf[256];
    npy_bytes(buf, V1, 10, F4_2X3_DICT, 128, f4_2x3, sizeof f4_2x3);
    const char *p = th_tmp("cut.npy");
    th_write_file(p, buf, 60);
    expect_refusal(p, "truncated");
    th_write_file(p, buf, 5);
    expect_refusal(p, "bad magic");
    th_write_file(p, buf, 0);
    expect_refusal(p, "bad magic");
}

Test(npy, refuses_bad_headers) {
    uint8_t b[256];
    size_t n = npy_bytes(b, V1, 10, F4_2X3_DICT, 128, f4_2x3, sizeof f4_2x3);
    const char *p = th_tmp("bad.npy");
    b[0] = 'X';
    th_write_file(p, b, n);
    expect_refusal(p, "bad magic");
    b[0] = 0x93;
    b[6] = 4;
    th_write_file(p, b, n);
    expect_refusal(p, "version 4.0");
    b[6] = 1;
    b[8] = 0xff, b[9] = 0x20; /* header length 8447: past the end of the file */
    th_write_file(p, b, n);
    expect_refusal(p, "truncated");
    b[9] = 0x7f; /* 32767: larger than NumPy's limit */
    th_write_file(p, b, n);
    expect_refusal(p, "larger than");

    expect_refusal(put_npy("5d.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2, 3, 1), }",
                           f4_2x3, 24),
                   "more than 4 dimensions");
    expect_refusal(put_npy("nokey.npy", V1, 10, "{'descr': '<f4', 'shape': (2, 3), }", f4_2x3, 24),
                   "lacks 'fortran_order'");
    expect_refusal(put_npy("extra.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",
                           f4_2x3, 24),
                   "unexpected or repeated key 'x'");
    expect_refusal(put_npy("rep.npy", V1, 10, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}",
                           f4_2x3, 24),
                   "repeated key 'descr'");
    expect_refusal(put_npy("notup.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (6), }", f4_2x3, 24),
                   "not a tuple");
    expect_refusal(put_npy("neg.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (-6,), }", f4_2x3, 24),
                   "non-negative integers");
    expect_refusal(put_npy("brace.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), ", f4_2x3, 24),
                   "malformed");
    expect_refusal(put_npy("trail.npy", V1, 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} x", f4_2x3, 24),
                   "trailing bytes");
    expect_refusal(put_npy("fo2.npy", V1, 10, "{'descr': '<f4', 'fortran_order': 0, 'shape': (6,)}", f4_2x3, 24),
                   "not True or False");
    expect_refusal(th_tmp("missing.npy"), "cannot open");
}

Test(npy, writer_refusals) {
    m1c_err e = {{0}};
    const float v[1] = {0};
    const int64_t s5[5] = {1, 1, 1, 1, 1};
    const char *p = th_tmp("w5.npy");
    cr_assert_eq(m1c_npy_write_f32(p, v, 5, s5, &e), M1C_ERR);
    cr_expect(strstr(e.msg, p) && strstr(e.msg, "dimensions"), "%s", e.msg);
    cr_assert_eq(access(p, F_OK), -1, "a refused write created the file");

    char nodir[600];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir/x.npy", th_tmpdir());
    const int64_t s1[1] = {1};
    cr_assert_eq(m1c_npy_write_f32(nodir, v, 1, s1, &e), M1C_ERR);
    cr_expect(strstr(e.msg, nodir), "%s", e.msg);
}
