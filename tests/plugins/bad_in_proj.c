/* Test plugin: a MoE-kind plugin whose parameters declare in_proj (ABI 1.4) the wrong way, chosen by its
 * setting `bad`: 1 = a (4, hidden + 1) matrix, 2 = two parameters with in_proj, 3 = 33 rows (more than
 * M1C_IN_PROJ_MAX). The model build must refuse each, naming the plugin and the parameter
 * (tests/test_model.c). Nothing is ever computed: forward and backward fail. */
#include <stdlib.h>

#include "m1c/plugin.h"

typedef struct {
    const m1c_host *h;
    int bad;
    int64_t H;
} bad_in_proj;

static int create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    int64_t bad = 1;
    if (h->get_int(h, s, "bad", 1, 1, 3, &bad) != M1C_OK) return M1C_ERR;
    bad_in_proj *m = calloc(1, sizeof *m);
    if (!m) return h->error(h, "out of memory");
    m->h = h, m->bad = (int)bad, m->H = info->hidden;
    *self = m;
    return M1C_OK;
}

static void destroy(void *self) { free(self); }

static int params(void *self, m1c_buf_spec *specs, int max) {
    const bad_in_proj *m = self;
    m1c_buf_spec s[2] = {m1c_make_spec("mlp.gate.weight", M1C_F32, 2, 4, m->H, 0, 0),
                         m1c_make_spec("mlp.other.weight", M1C_F32, 2, 4, m->H, 0, 0)};
    s[0].in_proj = 1;
    if (m->bad == 1) s[0].shape[1] = m->H + 1;
    if (m->bad == 2) s[1].in_proj = 1;
    if (m->bad == 3) s[0].shape[0] = M1C_IN_PROJ_MAX + 1;
    const int n = 2;
    if (!specs) return n;
    if (max < n) return m->h->error(m->h, "room for %d specs, need %d", max, n);
    for (int i = 0; i < n; i++) specs[i] = s[i];
    return n;
}

static int none(void *self, int B, int T, m1c_buf_spec *specs, int max) {
    (void)self, (void)B, (void)T, (void)specs, (void)max;
    return 0;
}

static int forward(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T) {
    (void)b, (void)out, (void)in, (void)B, (void)T;
    const bad_in_proj *m = self;
    return m->h->error(m->h, "never run");
}

static int backward(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in, int B,
                    int T) {
    (void)b, (void)din, (void)dout, (void)in, (void)B, (void)T;
    const bad_in_proj *m = self;
    return m->h->error(m->h, "never run");
}

static const m1c_moe_vtable vt = {
    .size = sizeof(m1c_moe_vtable),
    .ops = {create, destroy, params, none, none, forward, backward},
};

M1C_PLUGIN(MOE, moe, vt, "bad_in_proj", "0.0.1", "moe plugin declaring in_proj wrongly (model test)", "MIT")
