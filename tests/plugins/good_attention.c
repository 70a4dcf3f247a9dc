/* Test plugin: the smallest valid attention plugin (forward is the identity, no parameters). The
 * loader tests load it by name, by path and next to its broken siblings. */
#include <stdlib.h>
#include <string.h>
#include "m1c/plugin.h"

typedef struct {
    int H;
} ident;

static int ident_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    if (s && h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    ident *a = calloc(1, sizeof *a);
    if (!a) return h->error(h, "out of memory");
    a->H = info->hidden;
    *self = a;
    return M1C_OK;
}

static void ident_destroy(void *self) { free(self); }

static int ident_none(void *self, m1c_buf_spec *specs, int max) { return 0; }

static int ident_bufs(void *self, int B, int T, m1c_buf_spec *specs, int max) { return 0; }

static int ident_forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    ident *a = self;
    memcpy(out, in, (size_t)B * T * a->H * sizeof *out);
    return M1C_OK;
}

static int ident_backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in,
                          int B, int T) {
    ident *a = self;
    for (size_t i = 0; i < (size_t)B * T * a->H; i++) din[i] += dout[i];
    return M1C_OK;
}

static int ident_state(void *self, int batch, int64_t max_len, m1c_buf_spec *specs, int max) { return 0; }

static int ident_step(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B,
                      int T, int64_t pos) {
    return ident_forward(self, b, out, in, B, T);
}

static double ident_flops(void *self, int64_t ctx) { return 0.0; }

static const m1c_attention_vtable vt = {
    .size = sizeof(m1c_attention_vtable),
    .ops = {ident_create, ident_destroy, ident_none, ident_bufs, ident_bufs, ident_forward, ident_backward},
    .state = ident_state,
    .step = ident_step,
    .flops = ident_flops,
};

M1C_PLUGIN(ATTENTION, attention, vt, "good_attention", "1.2.3", "identity token mixer (loader test)", "MIT")
