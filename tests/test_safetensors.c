/* Tests of core/safetensors.c: a file written byte by byte here, round trips, bf16 conversion, every
 * refusal of a malformed file, atomic writes, and sharded sets with an index. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/safetensors.h"
#include "harness.h"

/* Each test's scratch folder (th_tmpdir): made by the suite's init, removed by its fini. */
static void setup(void) { th_tmpdir_init("st"); }

TestSuite(st, .init = setup, .fini = th_tmpdir_fini);

/* A safetensors file by hand: 8-byte little-endian length of the header (unpadded), header, data. */
static const char *put_st(const char *name, const char *header, const void *data, size_t n) {
    static uint8_t buf[4096];
    size_t hl = strlen(header);
    cr_assert(8 + hl + n <= sizeof buf);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (n) memcpy(buf + 8 + hl, data, n);
    const char *p = th_tmp(name);
    th_write_file(p, buf, 8 + hl + n);
    return p;
}

static void expect_refusal(const char *path, const char *what) {
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, path, &e), M1C_ERR, "%s was accepted (expected: %s)", path, what);
    cr_expect(strstr(e.msg, what), "message '%s' does not mention '%s'", e.msg, what);
    cr_expect(strstr(e.msg, path), "message '%s' does not name the file", e.msg);
    cr_expect_null(strchr(e.msg, '\n'), "message is not one line");
    cr_expect_null(f.map, "a refused file stays mapped");
    m1c_st_close(&f); /* closing a refused (zeroed) file is safe */
}

static void no_tmp_left(void) {
    DIR *d = opendir(th_tmpdir());
    struct dirent *de;
    while ((de = readdir(d))) cr_assert_null(strstr(de->d_name, ".tmp."), "left behind: %s", de->d_name);
    closedir(d);
}

/* Data of the hand-written file, little-endian bytes:
 *   a.f32  F32  [2, 3]  -1, -0.5, 0, 0.5, 1, 1.5      bytes  0..24
 *   b.bf16 BF16 [3]     1, -2, 3.140625               bytes 24..30
 *   c.f16  F16  [4]     1, -2, 65504, 2^-24           bytes 30..38
 *   d.i64  I64  []      42                            bytes 38..46  (unaligned: read through memcpy) */
static const uint8_t hand_data[46] = {
    0, 0, 0x80, 0xbf, 0, 0, 0, 0xbf, 0, 0, 0, 0, 0, 0, 0, 0x3f, 0, 0, 0x80, 0x3f, 0, 0, 0xc0, 0x3f,
    0x80, 0x3f, 0x00, 0xc0, 0x49, 0x40,
    0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00,
    42, 0, 0, 0, 0, 0, 0, 0};
/* Header keys deliberately not in data order: file order must follow the data. */
static const char *hand_header =
    "{\"__metadata__\":{\"format\":\"pt\",\"step\":\"12\"},"
    "\"b.bf16\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[24,30]},"
    "\"d.i64\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[38,46]},"
    "\"a.f32\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"c.f16\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[30,38]}}";

Test(st, reads_hand_written_file) {
    const char *p = put_st("hand.safetensors", hand_header, hand_data, sizeof hand_data);
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_count(&f), 4);
    const char *order[4] = {"a.f32", "b.bf16", "c.f16", "d.i64"};
    for (int i = 0; i < 4; i++) cr_assert_str_eq(m1c_st_at(&f, i)->name, order[i]);
    cr_assert_null(m1c_st_at(&f, 4));

    const m1c_st_tensor *a = m1c_st_find(&f, "a.f32");
    cr_assert_not_null(a);
    cr_assert_eq(a->dtype, M1C_ST_F32);
    cr_assert_eq(a->ndim, 2);
    cr_assert_eq(a->shape[0], 2);
    cr_assert_eq(a->shape[1], 3);
    cr_assert_eq(a->numel, 6);
    cr_assert_eq(a->nbytes, 24);
    cr_assert_eq(memcmp(a->data, hand_data, 24), 0);
    const m1c_st_tensor *d = m1c_st_find(&f, "d.i64");
    cr_assert_eq(d->dtype, M1C_ST_I64);
    cr_assert_eq(d->ndim, 0);
    cr_assert_eq(d->numel, 1);
    cr_assert_eq(d->offset, 38);
    cr_assert_null(m1c_st_find(&f, "nope"));

    cr_assert_str_eq(m1c_st_meta(&f, "format"), "pt");
    cr_assert_str_eq(m1c_st_meta(&f, "step"), "12");
    cr_assert_null(m1c_st_meta(&f, "absent"));

    /* Conversions are exact: every value is representable in its dtype and in f32. */
    float x[6];
    cr_assert_eq(m1c_st_read_f32(&f, "a.f32", x, 6, &e), M1C_OK, "%s", e.msg);
    const float wa[6] = {-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};
    for (int i = 0; i < 6; i++) cr_assert_eq(x[i], wa[i]);
    cr_assert_eq(m1c_st_read_f32(&f, "b.bf16", x, 3, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(x[0], 1.0f);
    cr_assert_eq(x[1], -2.0f);
    cr_assert_eq(x[2], 3.140625f);
    cr_assert_eq(m1c_st_read_f32(&f, "c.f16", x, 4, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(x[0], 1.0f);
    cr_assert_eq(x[1], -2.0f);
    cr_assert_eq(x[2], 65504.0f);
    cr_assert_eq(x[3], 0x1p-24f);

    cr_assert_eq(m1c_st_read_f32(&f, "a.f32", x, 5, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "has 6 elements, expected 5") && strstr(e.msg, p), "%s", e.msg);
    cr_assert_eq(m1c_st_read_f32(&f, "d.i64", x, 1, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "I64, which cannot be read as f32"), "%s", e.msg);
    cr_assert_eq(m1c_st_read_f32(&f, "zz", x, 1, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "no tensor 'zz'"), "%s", e.msg);

    /* I64 -> I32 load of the unaligned scalar */
    int32_t v = 0;
    m1c_tensor t32 = {.data = &v, .dtype = M1C_I32, .device = M1C_DEVICE_CPU, .ndim = 0, .name = "d.i64"};
    cr_assert_eq(m1c_st_load(d, f.path, &t32, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(v, 42);

    m1c_st_close(&f);
    m1c_st_close(&f); /* twice is safe */
}

Test(st, f16_special_values) {
    cr_assert(isinf(m1c_f16_to_f32(0x7c00)) && m1c_f16_to_f32(0x7c00) > 0);
    cr_assert(isnan(m1c_f16_to_f32(0x7e00)));
    cr_assert(signbit(m1c_f16_to_f32(0x8000)) && m1c_f16_to_f32(0x8000) == 0.0f);
    cr_assert_eq(m1c_f16_to_f32(0x03ff), 1023 * 0x1p-24f); /* largest subnormal, exact */
    cr_assert_eq(m1c_f16_to_f32(0x0400), 0x1p-14f);       /* smallest normal */
    cr_assert_eq(m1c_f16_to_f32(0x3555), 0x1.554p-2f);     /* 0.333251953125 */
}

/* Tensors of every dtype the writer takes, a scalar and an empty one. */
#define NT 5
static float w_f32[6] = {0.25f, -1.5f, 3.0f, 1e-30f, -7e20f, 0.1f};
static uint16_t w_bf16[5] = {0x3f80, 0xc000, 0x0001, 0x7f80, 0xffc1};
static int32_t w_i32[4] = {0, -1, INT32_MAX, INT32_MIN};
static float w_scalar = 2.5f;

static void make_tensors(m1c_tensor *t) {
    memset(t, 0, NT * sizeof *t);
    t[0] = (m1c_tensor){.data = w_f32, .dtype = M1C_F32, .ndim = 2, .shape = {2, 3}, .name = "model.w"};
    t[1] = (m1c_tensor){.data = w_bf16, .dtype = M1C_BF16, .ndim = 1, .shape = {5}, .name = "model.g"};
    t[2] = (m1c_tensor){.data = w_i32, .dtype = M1C_I32, .ndim = 1, .shape = {4}, .name = "ids"};
    t[3] = (m1c_tensor){.data = &w_scalar, .dtype = M1C_F32, .ndim = 0, .name = "scale"};
    t[4] = (m1c_tensor){.data = NULL, .dtype = M1C_F32, .ndim = 2, .shape = {0, 3}, .name = "empty"};
}

Test(st, round_trip) {
    m1c_tensor t[NT];
    make_tensors(t);
    const char *mk[2] = {"format", "step"}, *mv[2] = {"m1c", "7"};
    const char *p = th_tmp("rt.safetensors");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_write(p, t, NT, mk, mv, 2, &e), M1C_OK, "%s", e.msg);
    no_tmp_left();

    /* the layout: padded header, then exactly the data */
    static uint8_t raw[4096];
    size_t n = th_read_into(p, raw, sizeof raw);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | raw[i];
    cr_assert_eq(hl % 8, 0, "header length %llu is not a multiple of 8", (unsigned long long)hl);
    cr_assert_eq(raw[8], '{');
    size_t data_bytes = 24 + 10 + 16 + 4 + 0;
    cr_assert_eq(n, 8 + hl + data_bytes);
    size_t close_brace = 8 + hl - 1;
    while (raw[close_brace] == ' ') close_brace--;
    cr_assert_eq(raw[close_brace], '}', "header is padded with something other than spaces");

    m1c_st_file f;
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_count(&f), NT);
    const int st_dt[NT] = {M1C_ST_F32, M1C_ST_BF16, M1C_ST_I32, M1C_ST_F32, M1C_ST_F32};
    for (int i = 0; i < NT; i++) {
        const m1c_st_tensor *r = m1c_st_at(&f, i);
        cr_assert_str_eq(r->name, t[i].name, "tensors come back in the order written");
        cr_assert_eq(r->dtype, st_dt[i]);
        cr_assert_eq(r->ndim, t[i].ndim);
        for (int k = 0; k < t[i].ndim; k++) cr_assert_eq(r->shape[k], t[i].shape[k]);
        if (r->nbytes) cr_assert_eq(memcmp(r->data, t[i].data, r->nbytes), 0, "bytes of %s differ", r->name);
        cr_assert_eq(m1c_st_find(&f, t[i].name), r);
    }
    cr_assert_eq(m1c_st_at(&f, 4)->numel, 0);
    cr_assert_str_eq(m1c_st_meta(&f, "format"), "m1c");
    cr_assert_str_eq(m1c_st_meta(&f, "step"), "7");
    m1c_st_close(&f);

    /* overwriting an existing file, no metadata */
    cr_assert_eq(m1c_st_write(p, t, 2, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_count(&f), 2);
    cr_assert_eq(f.n_meta, 0);
    m1c_st_close(&f);

    /* names of 1..8 characters give headers of 8 consecutive lengths: every one padded to 8 */
    for (int len = 1; len <= 8; len++) {
        char name[9] = "abcdefgh";
        name[len] = 0;
        m1c_tensor one = t[3];
        one.name = name;
        cr_assert_eq(m1c_st_write(p, &one, 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
        n = th_read_into(p, raw, sizeof raw);
        hl = 0;
        for (int i = 7; i >= 0; i--) hl = hl << 8 | raw[i];
        cr_assert_eq(hl % 8, 0, "header length %llu is not a multiple of 8", (unsigned long long)hl);
        cr_assert_eq(n, 8 + hl + 4);
        cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
        cr_assert_str_eq(m1c_st_at(&f, 0)->name, name);
        m1c_st_close(&f);
    }

    /* zero tensors is a valid file too */
    cr_assert_eq(m1c_st_write(p, t, 0, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_count(&f), 0);
    cr_assert_null(m1c_st_find(&f, "model.w"));
    m1c_st_close(&f);
    no_tmp_left();
}

Test(st, bf16_export_and_rounding) {
    /* Values exactly representable in bf16 (8 significant bits) must survive f32 -> bf16 -> f32 exactly;
     * the others check round-to-nearest-even by hand: ulp(1) in bf16 is 2^-7. */
    enum { N = 14 };
    float in[N] = {1.5f, -0.375f, 256.0f, 0x1.fep127f, -0x1p-133f, 0.0f, -0.0f, INFINITY,
                   1.0f + 0x1p-8f,                /* halfway 1 | 1+2^-7: to even, 1 */
                   1.0f + 3 * 0x1p-8f,            /* halfway 1+2^-7 | 1+2^-6: to even, 1+2^-6 */
                   1.0f + 0x1p-8f + 0x1p-20f,     /* just above halfway: up, 1+2^-7 */
                   0x1.ffp127f,                   /* halfway largest bf16 | inf: to even, inf */
                   -0x1.9p-133f,                  /* subnormal: 1.5625 ulps of 2^-133, up to 2 */
                   NAN};
    const float want[N - 1] = {1.5f, -0.375f, 256.0f, 0x1.fep127f, -0x1p-133f, 0.0f, -0.0f, INFINITY, 1.0f,
                               1.0f + 0x1p-6f, 1.0f + 0x1p-7f, INFINITY, -0x1p-132f};
    m1c_tensor t = {.data = in, .dtype = M1C_F32, .ndim = 1, .shape = {N}, .name = "x"};
    const int as_bf16 = M1C_BF16;
    const char *p = th_tmp("bf.safetensors");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_write_as(p, &t, &as_bf16, 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    m1c_st_file f;
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    const m1c_st_tensor *r = m1c_st_find(&f, "x");
    cr_assert_eq(r->dtype, M1C_ST_BF16);
    cr_assert_eq(r->nbytes, 2 * N);
    float out[N];
    cr_assert_eq(m1c_st_read_f32(&f, "x", out, N, &e), M1C_OK, "%s", e.msg);
    for (int i = 0; i < N - 1; i++) /* exact (tolerance 0): see above */
        cr_assert(out[i] == want[i] && signbit(out[i]) == signbit(want[i]), "element %d: %a, want %a", i,
                  (double)out[i], (double)want[i]);
    cr_assert(isnan(out[N - 1]), "NaN must stay NaN");
    uint16_t first;
    memcpy(&first, r->data, 2);
    cr_assert_eq(first, 0x3fc0); /* 1.5 in bf16, written by hand */

    /* the loader rounds the same way into a BF16 tensor, and copies BF16 into F32 exactly */
    uint16_t h[N];
    m1c_tensor tb = {.data = h, .dtype = M1C_BF16, .ndim = 1, .shape = {N}, .name = "x"};
    cr_assert_eq(m1c_st_load(r, f.path, &tb, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(memcmp(h, r->data, 2 * N), 0);
    m1c_st_close(&f);

    /* BF16 written as F32: exact widening */
    m1c_tensor tw = {.data = w_bf16, .dtype = M1C_BF16, .ndim = 1, .shape = {5}, .name = "g"};
    const int as_f32 = M1C_F32;
    cr_assert_eq(m1c_st_write_as(p, &tw, &as_f32, 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_find(&f, "g")->dtype, M1C_ST_F32);
    const float wg[4] = {1.0f, -2.0f, 0x1p-133f, INFINITY};
    cr_assert_eq(m1c_st_read_f32(&f, "g", out, 5, &e), M1C_OK, "%s", e.msg);
    for (int i = 0; i < 4; i++) cr_assert_eq(out[i], wg[i]); /* exact: widening */
    cr_assert(isnan(out[4]));
    m1c_st_close(&f);

    /* I32 cannot be stored as BF16 */
    m1c_tensor ti = {.data = w_i32, .dtype = M1C_I32, .ndim = 1, .shape = {4}, .name = "ids"};
    cr_assert_eq(m1c_st_write_as(p, &ti, &as_bf16, 1, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "cannot store I32 as BF16"), "%s", e.msg);
}

Test(st, load_checks_shape) {
    m1c_tensor t[NT];
    make_tensors(t);
    const char *p = th_tmp("ld.safetensors");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_write(p, t, NT, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    m1c_st_file f;
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    float dst[6];
    m1c_tensor d = {.data = dst, .dtype = M1C_F32, .ndim = 2, .shape = {3, 2}, .name = "model.w"};
    cr_assert_eq(m1c_st_load(m1c_st_find(&f, "model.w"), f.path, &d, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "has shape [2, 3], expected [3, 2]") && strstr(e.msg, p), "%s", e.msg);
    d.shape[0] = 2, d.shape[1] = 3;
    cr_assert_eq(m1c_st_load(m1c_st_find(&f, "model.w"), f.path, &d, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(memcmp(dst, w_f32, sizeof dst), 0);
    m1c_tensor di = {.data = dst, .dtype = M1C_I32, .ndim = 2, .shape = {2, 3}, .name = "model.w"};
    cr_assert_eq(m1c_st_load(m1c_st_find(&f, "model.w"), f.path, &di, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "cannot be loaded as I32"), "%s", e.msg);
    m1c_st_close(&f);
}

Test(st, refuses_short_and_huge_headers) {
    const char *p = th_tmp("short.safetensors");
    th_write_file(p, "\x10\0\0\0\0", 5);
    expect_refusal(p, "shorter than the 8-byte header length");
    th_write_file(p, "", 0);
    expect_refusal(p, "shorter than the 8-byte header length");
    /* header length 1000 in a 20-byte file */
    th_write_file(p, "\xe8\x03\0\0\0\0\0\0{}          ", 20);
    expect_refusal(p, "larger than the file");
    /* header length 200,000,000 (0x0bebc200) */
    th_write_file(p, "\x00\xc2\xeb\x0b\0\0\0\0{}", 10);
    expect_refusal(p, "100 MB");
    /* header length 2^64 - 1: must not wrap around */
    th_write_file(p, "\xff\xff\xff\xff\xff\xff\xff\xff{}", 10);
    expect_refusal(p, "100 MB");
    expect_refusal(th_tmp("missing.safetensors"), "cannot open");
    expect_refusal(th_tmpdir(), "not a regular file");
}

Test(st, refuses_bad_json) {
    const uint8_t d[8] = {0};
    expect_refusal(put_st("j1.st", "{\"a\": ", d, 0), "not valid JSON");
    expect_refusal(put_st("j2.st", "[1, 2]", d, 0), "not a JSON object");
    expect_refusal(put_st("j3.st", "{\"a\": 3}", d, 0), "tensor 'a': header entry is not a JSON object");
    expect_refusal(put_st("j4.st",
                          "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                          "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                          d, 8),
                   "duplicate");
    expect_refusal(put_st("j5.st", "{\"__metadata__\":{\"k\":1}}", d, 0), "metadata 'k' is not a string");
    expect_refusal(put_st("j6.st", "{\"__metadata__\":[]}", d, 0), "'__metadata__' is not a JSON object");
    expect_refusal(put_st("j7.st", "{}   x", d, 0), "not valid JSON");
}

Test(st, refuses_bad_entries) {
    const uint8_t d[16] = {0};
    expect_refusal(put_st("e1.st", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4), "missing 'dtype'");
    expect_refusal(put_st("e2.st", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", d, 4), "missing 'shape'");
    expect_refusal(put_st("e3.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", d, 4), "missing 'data_offsets'");
    expect_refusal(put_st("e4.st", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4),
                   "'dtype' is not a string");
    expect_refusal(put_st("e5.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}", d, 4),
                   "'shape' is not an array");
    expect_refusal(put_st("e6.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", d, 4),
                   "shape[0] is not an integer");
    expect_refusal(put_st("e7.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", d, 4),
                   "'data_offsets' is not an array of two integers");
    expect_refusal(put_st("e8.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",\"4\"]}}", d, 4),
                   "'data_offsets' is not an array of two integers");
    expect_refusal(put_st("e9.st", "{\"a\":{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}}", d, 4),
                   "unknown or unsupported dtype 'F17'");
    expect_refusal(put_st("e10.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", d, 4),
                   "negative");
    expect_refusal(put_st("e11.st",
                          "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[0,4]}}", d, 4),
                   "overflows");
    /* fits int64 elements but not bytes: 2^62 F32 elements */
    expect_refusal(put_st("e12.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}}",
                          d, 4),
                   "overflows");
    expect_refusal(put_st("e13.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,2,1,1,1,1,1,1,1],\"data_offsets\":[0,8]}}",
                          d, 8),
                   "9 dimensions");
}

Test(st, refuses_bad_offsets) {
    const uint8_t d[16] = {0};
    expect_refusal(put_st("o1.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", d, 4),
                   "size mismatch");
    expect_refusal(put_st("o2.st", "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,4]}}", d, 4),
                   "size mismatch");
    expect_refusal(put_st("o3.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", d, 4),
                   "outside the data area");
    expect_refusal(put_st("o4.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", d, 8),
                   "invalid data_offsets");
    expect_refusal(put_st("o5.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", d, 4),
                   "invalid data_offsets");
    expect_refusal(put_st("o6.st",
                          "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                          "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                          d, 12),
                   "overlap");
    expect_refusal(put_st("o7.st",
                          "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                          "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                          d, 8),
                   "overlap");
    expect_refusal(put_st("o8.st",
                          "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                          "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                          d, 12),
                   "not fully covered");
    expect_refusal(put_st("o9.st", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", d, 8),
                   "not fully covered");
    expect_refusal(put_st("o10.st", "{}", d, 4), "not fully covered");
}

Test(st, refuses_truncated_files) {
    m1c_tensor t[NT];
    make_tensors(t);
    const char *p = th_tmp("full.safetensors");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_write(p, t, NT, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    static uint8_t raw[4096];
    size_t n = th_read_into(p, raw, sizeof raw);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | raw[i];
    const char *q = th_tmp("cut.safetensors");
    th_write_file(q, raw, 4);
    expect_refusal(q, "shorter than");
    th_write_file(q, raw, 8 + hl / 2);
    expect_refusal(q, "larger than the file");
    th_write_file(q, raw, 8 + hl); /* header intact, data gone */
    expect_refusal(q, "outside the data area");
    th_write_file(q, raw, n - 1);
    expect_refusal(q, "outside the data area");
    th_write_file(q, raw, n); /* and the whole file is fine */
    m1c_st_file f;
    cr_assert_eq(m1c_st_open(&f, q, &e), M1C_OK, "%s", e.msg);
    m1c_st_close(&f);
}

Test(st, writer_refusals_keep_old_file) {
    m1c_tensor t[NT];
    make_tensors(t);
    const char *p = th_tmp("keep.safetensors");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_write(p, t, NT, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    static uint8_t before[4096], after[4096];
    size_t nb = th_read_into(p, before, sizeof before);

    m1c_tensor bad[2] = {t[0], t[0]};
    cr_assert_eq(m1c_st_write(p, bad, 2, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "duplicate tensor name 'model.w'") && strstr(e.msg, p), "%s", e.msg);
    bad[1].name = "__metadata__";
    cr_assert_eq(m1c_st_write(p, bad, 2, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "invalid name"), "%s", e.msg);
    bad[1] = t[1];
    bad[1].device = M1C_DEVICE_CUDA;
    cr_assert_eq(m1c_st_write(p, bad, 2, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "not a CPU tensor"), "%s", e.msg);
    const char *mk[2] = {"a", "a"}, *mv[2] = {"1", "2"};
    cr_assert_eq(m1c_st_write(p, t, 1, mk, mv, 2, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "duplicate metadata key 'a'"), "%s", e.msg);

    size_t na = th_read_into(p, after, sizeof after);
    cr_assert_eq(na, nb);
    cr_assert_eq(memcmp(before, after, nb), 0, "a refused write changed the existing file");

    /* a failure after the data is written (rename onto a folder) leaves no temporary file */
    const char *dir = th_tmp("a_folder");
    cr_assert_eq(mkdir(dir, 0755), 0);
    cr_assert_eq(m1c_st_write(dir, t, NT, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, "cannot rename") && strstr(e.msg, dir), "%s", e.msg);
    no_tmp_left();
    char nodir[600];
    snprintf(nodir, sizeof nodir, "%s/no/such/x.safetensors", th_tmpdir());
    cr_assert_eq(m1c_st_write(nodir, t, NT, NULL, NULL, 0, &e), M1C_ERR);
    cr_expect(strstr(e.msg, nodir), "%s", e.msg);
}

static void put_text(const char *name, const char *text) { th_write_file(th_tmp(name), text, strlen(text)); }

Test(st, sharded_sets) {
    m1c_st_set s;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_set_open(&s, th_tmpdir(), &e), M1C_ERR, "an empty folder is not a checkpoint");
    cr_expect(strstr(e.msg, "neither"), "%s", e.msg);

    m1c_tensor t[NT];
    make_tensors(t);
    cr_assert_eq(m1c_st_write(th_tmp("s1.safetensors"), t, 2, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_write(th_tmp("s2.safetensors"), t + 2, 2, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    put_text("model.safetensors.index.json",
             "{\"metadata\": {\"total_size\": 54}, \"weight_map\": {\"model.w\": \"s1.safetensors\", "
             "\"ids\": \"s2.safetensors\", \"model.g\": \"s1.safetensors\", \"scale\": \"s2.safetensors\"}}");
    for (int via = 0; via < 2; via++) {
        const char *open_path = via ? th_tmp("model.safetensors.index.json") : th_tmpdir();
        cr_assert_eq(m1c_st_set_open(&s, open_path, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(m1c_st_set_count(&s), 4);
        cr_assert_eq(s.n_files, 2);
        const char *file = NULL;
        const m1c_st_tensor *r = m1c_st_set_find(&s, "scale", &file);
        cr_assert_not_null(r);
        cr_assert(strstr(file, "s2.safetensors"), "%s", file);
        r = m1c_st_set_find(&s, "model.g", &file);
        cr_assert(strstr(file, "s1.safetensors"), "%s", file);
        cr_assert_null(m1c_st_set_find(&s, "empty", NULL));
        float x[6];
        cr_assert_eq(m1c_st_set_read_f32(&s, "model.w", x, 6, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(memcmp(x, w_f32, sizeof x), 0);
        cr_assert_eq(m1c_st_set_read_f32(&s, "scale", x, 1, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(x[0], w_scalar); /* exact: a copy */
        cr_assert_str_eq(m1c_st_set_at(&s, 0, &file)->name, "model.w");
        cr_assert_str_eq(m1c_st_set_at(&s, 3, NULL)->name, "scale");
        cr_assert_null(m1c_st_set_at(&s, 4, NULL));
        cr_assert_eq(m1c_st_set_read_f32(&s, "nope", x, 1, &e), M1C_ERR);
        cr_expect(strstr(e.msg, "no tensor 'nope'"), "%s", e.msg);
        m1c_st_set_close(&s);
        m1c_st_set_close(&s);
    }

    /* the index lies about where a tensor is */
    put_text("wrong.index.json", "{\"weight_map\": {\"model.w\": \"s2.safetensors\", \"ids\": \"s2.safetensors\"}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("wrong.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "weight_map puts tensor 'model.w'"), "%s", e.msg);
    /* a shard that does not exist */
    put_text("gone.index.json", "{\"weight_map\": {\"model.w\": \"s3.safetensors\"}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("gone.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "s3.safetensors: cannot open"), "%s", e.msg);
    /* a shard outside the folder */
    put_text("up.index.json", "{\"weight_map\": {\"model.w\": \"../s1.safetensors\"}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("up.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "not a relative file name"), "%s", e.msg);
    put_text("nomap.index.json", "{\"metadata\": {}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("nomap.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "no 'weight_map'"), "%s", e.msg);
    /* one tensor in two shards */
    cr_assert_eq(m1c_st_write(th_tmp("s3.safetensors"), t, 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    put_text("dup.index.json", "{\"weight_map\": {\"model.w\": \"s1.safetensors\", \"x\": \"s3.safetensors\"}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("dup.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "'model.w' is in both"), "%s", e.msg);
    /* a refused shard's message names the shard */
    put_text("s4.safetensors", "junk");
    put_text("bad.index.json", "{\"weight_map\": {\"model.w\": \"s4.safetensors\"}}");
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("bad.index.json"), &e), M1C_ERR);
    cr_expect(strstr(e.msg, "s4.safetensors: not a safetensors file"), "%s", e.msg);

    /* a single file, directly */
    cr_assert_eq(m1c_st_set_open(&s, th_tmp("s2.safetensors"), &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_set_count(&s), 2);
    m1c_st_set_close(&s);
}
