/* The install and the out-of-tree example together: `cmake --install` this build tree into a temporary
 * prefix, build examples/hello-attention against it (find_package and the pkg-config one-liner), load
 * the result by path through the registry and check its math against a direct loop. */
#include <criterion/criterion.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"
#include "../core/loader.h"

static int have(const char *tool) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", tool);
    return system(cmd) == 0;
}

/* Run a shell command with its output in <tmp>/log; on failure the log is shown. */
static void sh(const char *tmp, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sh(const char *tmp, const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    cr_assert(n > 0 && n < (int)sizeof cmd - 64);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " >%s/log 2>&1", tmp);
    if (system(cmd) != 0) {
        char log[PATH_MAX], buf[4096] = "";
        snprintf(log, sizeof log, "%s/log", tmp);
        FILE *f = fopen(log, "r");
        if (f) {
            /* The last part of the log: where the error is. */
            fseek(f, 0, SEEK_END);
            long sz = ftell(f);
            fseek(f, sz > 3000 ? sz - 3000 : 0, SEEK_SET);
            size_t got = fread(buf, 1, sizeof buf - 1, f);
            buf[got] = 0;
            fclose(f);
        }
        cr_assert_fail("command failed: %s\n%s", cmd, buf);
    }
}

static char *read_output(const char *cmd) {
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p, "%s", cmd);
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    pclose(p);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = 0;
    return buf;
}

/* Direct loops: out[b,t] = W in[b,t-1] (0 for t = 0), and the gradients of L = sum(out * dout). */
static void ref_forward(double *out, const float *in, const float *W, int B, int T, int H) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < H; i++) {
                double s = 0;
                for (int j = 0; t > 0 && j < H; j++) s += (double)W[i * H + j] * in[((b * T) + t - 1) * H + j];
                out[(b * T + t) * H + i] = s;
            }
}

static void ref_backward(double *din, double *dW, const float *dout, const float *in, const float *W, int B, int T,
                         int H) {
    for (int b = 0; b < B; b++)
        for (int t = 1; t < T; t++)
            for (int i = 0; i < H; i++)
                for (int j = 0; j < H; j++) {
                    dW[i * H + j] += (double)dout[(b * T + t) * H + i] * in[(b * T + t - 1) * H + j];
                    din[(b * T + t - 1) * H + j] += (double)dout[(b * T + t) * H + i] * W[i * H + j];
                }
}

static double max_diff(const float *a, const double *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

/* Check the plugin's math through its vtable. Tolerance 1e-5 for everything: values are O(1), each output
 * is a sum of H = 8 (forward) or (T-1)*B = 8 (dW) float products, so float rounding stays ~1e-6. */
static void check_plugin(m1c_plugin *p) {
    cr_assert_str_eq(p->desc->name, "hello_attention");
    cr_assert_eq(p->desc->kind, M1C_KIND_ATTENTION);
    const m1c_attention_vtable *vt = M1C_ATTENTION(p);
    enum { B = 2, T = 5, H = 8 };
    m1c_config *cfg;
    m1c_settings *s = th_settings("init_std = 0.5;", &cfg);
    m1c_layer_info info = {.size = sizeof info, .layer_index = 0, .n_layers = 1, .hidden = H};
    void *self = NULL;
    cr_assert_eq(vt->ops.create(&p->host, s, &info, &self), M1C_OK, "%s", p->error);

    m1c_buf_spec spec;
    cr_assert_eq(vt->ops.params(self, NULL, 0), 1);
    cr_assert_eq(vt->ops.params(self, &spec, 1), 1);
    cr_assert_str_eq(spec.name, "self_attn.shift_proj.weight");
    cr_assert(spec.ndim == 2 && spec.shape[0] == H && spec.shape[1] == H);
    cr_assert_float_eq(spec.std, 0.5f, 1e-7, "init_std from the settings"); /* exact: a float of 0.5 */

    float *W = th_randn(H * H, 1, 0.5f), *dW = th_zeros(H * H);
    float *in = th_randn(B * T * H, 2, 1.0f), *dout = th_randn(B * T * H, 3, 1.0f);
    float *out = th_zeros(B * T * H), *din = th_zeros(B * T * H);
    m1c_tensor pt = {.data = W, .dtype = M1C_F32, .ndim = 2, .shape = {H, H}, .name = spec.name};
    m1c_tensor gt = pt;
    gt.data = dW;
    m1c_layer_bufs bufs = {.params = &pt, .grads = &gt, .training = 1};

    double ref[B * T * H], rdin[B * T * H], rdW[H * H];
    cr_assert_eq(vt->ops.forward(self, &bufs, out, in, B, T), M1C_OK);
    ref_forward(ref, in, W, B, T, H);
    cr_assert_leq(max_diff(out, ref, B * T * H), 1e-5);

    /* Backward accumulates: start din and dW at 1 and expect 1 + the gradient. */
    for (int i = 0; i < B * T * H; i++) din[i] = 1, rdin[i] = 1;
    for (int i = 0; i < H * H; i++) dW[i] = 1, rdW[i] = 1;
    cr_assert_eq(vt->ops.backward(self, &bufs, din, dout, in, B, T), M1C_OK);
    ref_backward(rdin, rdW, dout, in, W, B, T, H);
    cr_assert_leq(max_diff(din, rdin, B * T * H), 1e-5);
    cr_assert_leq(max_diff(dW, rdW, H * H), 1e-5);

    /* Decoding: a prefill of 3 tokens then 2 single steps reproduce the full forward. */
    m1c_buf_spec ss;
    cr_assert_eq(vt->state(self, B, T, &ss, 1), 1);
    float *state = th_randn(ss.shape[0] * ss.shape[1], 4, 1.0f); /* garbage: pos 0 must reset it */
    m1c_tensor st = {.data = state, .dtype = M1C_F32, .ndim = 2, .shape = {ss.shape[0], ss.shape[1]}};
    float step_out[B * T * H], chunk_in[B * 3 * H], chunk_out[B * 3 * H];
    const int starts[] = {0, 3, 4}, lens[] = {3, 1, 1};
    for (int c = 0; c < 3; c++) {
        int t0 = starts[c], n = lens[c];
        for (int b = 0; b < B; b++) memcpy(chunk_in + b * n * H, in + (b * T + t0) * H, sizeof(float) * n * H);
        cr_assert_eq(vt->step(self, &bufs, &st, chunk_out, chunk_in, B, n, t0), M1C_OK);
        for (int b = 0; b < B; b++) memcpy(step_out + (b * T + t0) * H, chunk_out + b * n * H, sizeof(float) * n * H);
    }
    cr_assert_leq(max_diff(step_out, ref, B * T * H), 1e-5);
    cr_assert_float_eq(vt->flops(self, 100), 2.0 * H * H, 0); /* exact small integer */

    vt->ops.destroy(self);
    free(W), free(dW), free(in), free(dout), free(out), free(din), free(state);
    m1c_config_free(cfg);
}

Test(example, install_build_out_of_tree_and_load, .timeout = 300) {
    if (!have("cmake")) cr_skip("cmake is not on PATH");
    char *tmp = th_mkdtemp("/tmp", "m1c_test_example");

    /* 1. Install this build tree into a fresh prefix. */
    sh(tmp, "cmake --install '%s' --prefix '%s/prefix'", M1C_BINARY_DIR, tmp);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/prefix/include/m1c/plugin.h", tmp);
    cr_assert(access(path, R_OK) == 0, "the header should be installed at %s", path);

    /* 2. Configure and build the example against it (Release, out of tree). */
    sh(tmp, "cmake -S '%s/examples/hello-attention' -B '%s/build' -DCMAKE_BUILD_TYPE=Release "
            "-DCMAKE_PREFIX_PATH='%s/prefix'",
       M1C_SOURCE_DIR, tmp, tmp);
    sh(tmp, "cmake --build '%s/build'", tmp);

    /* 3. Load by path relative to a base dir, and check it through its vtable. */
    m1c_registry r;
    memset(&r, 0, sizeof r);
    char base[PATH_MAX];
    snprintf(base, sizeof base, "%s/build", tmp);
    m1c_plugin *p = NULL;
    m1c_err e;
    cr_assert_eq(m1c_registry_load(&r, "./hello_attention.so", base, M1C_KIND_ATTENTION, &p, &e), M1C_OK, "%s",
                 e.msg);
    check_plugin(p);
    m1c_registry_free(&r);

    /* The harness takes a path as well as a name: its finite-difference check of every gradient. out is
     * linear in the input and in W, so a central difference is exact for any step; a large step (1.0)
     * makes the f32 rounding of L (~1e-6 absolute) small against it: <= ~5e-7 absolute on each
     * derivative, <= 5e-4 relative even at the harness's 1e-3 floor. Hence 1e-3. */
    snprintf(path, sizeof path, "%s/build/hello_attention.so", tmp);
    th_layer *l = th_layer_new(path, "init_std = 0.5;", 0, 1, 8, 2, 5, 7, 0.5f);
    float *x = th_randn(2 * 5 * 8, 8, 1.0f);
    cr_assert_leq(th_fd_check_layer(l, x, 1.0f, 16, 9), 1e-3);
    free(x);
    th_layer_free(l);

    /* 4. Its install goes to the prefix's plugin folder, where the installed `m1c plugins` finds it next
     *    to the core's own plugins (found relative to the executable). */
    sh(tmp, "cmake --install '%s/build'", tmp);
    snprintf(path, sizeof path, "%s/prefix/lib/m1c/plugins/attention/hello_attention.so", tmp);
    cr_assert(access(path, R_OK) == 0, "the example should install into %s", path);
    char cmd[PATH_MAX + 64];
    snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH= '%s/prefix/bin/m1c' plugins 2>/dev/null", tmp);
    char *listing = read_output(cmd);
    cr_assert(strstr(listing, "hello_attention") && strstr(listing, path), "m1c plugins should list %s:\n%s", path,
              listing);

    /* 5. pkg-config: the include flags and the plugin folder, and the one-liner build. */
    if (have("pkg-config") && have("cc")) {
        snprintf(cmd, sizeof cmd, "PKG_CONFIG_PATH='%s/prefix/lib/pkgconfig' pkg-config --cflags m1c", tmp);
        char want[PATH_MAX + 8];
        snprintf(want, sizeof want, "-I%s/prefix/include", tmp);
        cr_assert_str_eq(read_output(cmd), want);
        snprintf(cmd, sizeof cmd, "PKG_CONFIG_PATH='%s/prefix/lib/pkgconfig' pkg-config --variable=plugindir m1c",
                 tmp);
        snprintf(want, sizeof want, "%s/prefix/lib/m1c/plugins", tmp);
        cr_assert_str_eq(read_output(cmd), want);
        sh(tmp,
           "PKG_CONFIG_PATH='%s/prefix/lib/pkgconfig' cc -std=c11 -O2 -shared -fPIC -fvisibility=hidden "
           "$(PKG_CONFIG_PATH='%s/prefix/lib/pkgconfig' pkg-config --cflags m1c) "
           "'%s/examples/hello-attention/hello_attention.c' -o '%s/pc_hello.so'",
           tmp, tmp, M1C_SOURCE_DIR, tmp);
        memset(&r, 0, sizeof r);
        snprintf(path, sizeof path, "%s/pc_hello.so", tmp);
        cr_assert_eq(m1c_registry_load(&r, path, NULL, M1C_KIND_ATTENTION, &p, &e), M1C_OK, "%s", e.msg);
        check_plugin(p);
        m1c_registry_free(&r);
    }
    th_rm_rf(tmp);
    free(tmp);
}
