/* hello_attention: a third-party m1c attention plugin, built out of tree against the installed header.
 * A "shift" token mixer: each token sees only the one before it, out_t = W x_{t-1} (x_{-1} = 0). */
#include <stdlib.h>
#include <string.h>

#include <m1c/plugin.h>

typedef struct hello {
    const m1c_host *h; /* the host table lives as long as the plugin is loaded */
    int H;             /* hidden size */
    int device;
    float init_std;
} hello;

static m1c_buf_spec spec2(const char *name, int64_t a, int64_t b) {
    m1c_buf_spec s;
    memset(&s, 0, sizeof s);
    s.name = name;
    s.dtype = M1C_F32;
    s.ndim = 2;
    s.shape[0] = a;
    s.shape[1] = b;
    return s;
}

// ----------------------------------------------------------------------------
// creation and buffers

static int hello_create(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self) {
    /* The rows of the first token are zeroed with memset, which needs host memory. */
    if (info->device != M1C_DEVICE_CPU) return h->error(h, "hello_attention: only the CPU device is supported");
    if (info->hidden < 1) return h->error(h, "hello_attention: hidden size %d must be positive", info->hidden);
    double std;
    if (h->get_float(h, s, "init_std", 0.02, 0.0, 10.0, &std) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR; /* refuses keys we did not read (typos) */
    hello *a = calloc(1, sizeof *a);
    if (!a) return h->error(h, "hello_attention: out of memory");
    a->h = h;
    a->H = info->hidden;
    a->device = info->device;
    a->init_std = (float)std;
    *self = a;
    return M1C_OK;
}

static void hello_destroy(void *self) { free(self); }

/* One parameter, W: (H, H), under its Hugging Face name (the core prefixes "model.layers.<l>."). */
static int hello_params(void *self, m1c_buf_spec *specs, int max) {
    hello *a = self;
    if (!specs) return 1;
    if (max < 1) return a->h->error(a->h, "hello_attention: room for %d parameter specs, 1 needed", max);
    specs[0] = spec2("self_attn.shift_proj.weight", a->H, a->H);
    specs[0].init = M1C_INIT_NORMAL;
    specs[0].std = a->init_std;
    return 1;
}

/* backward needs only `in`, which the core hands it again: nothing kept, no scratch. */
static int hello_none(void *self, int B, int T, m1c_buf_spec *specs, int max) { return 0; }

// ----------------------------------------------------------------------------
// forward and backward

/* out: (B, T, H); out[b, t] = W in[b, t-1] for t >= 1, out[b, 0] = 0. One batched GEMM: the rows
 * 0..T-2 of each sequence times W^T land in rows 1..T-1. */
static int hello_forward(void *self, const m1c_layer_bufs *bf, float *out, const float *in, int B, int T) {
    hello *a = self;
    const int H = a->H;
    const float *W = bf->params[0].data; /* (H, H) */
    for (int b = 0; b < B; b++) memset(out + (int64_t)b * T * H, 0, (size_t)H * sizeof *out);
    if (T > 1)
        a->h->gemm_batched(a->h, a->device, 0, 1, T - 1, H, H, 1.0f, in, H, (int64_t)T * H, W, H, 0, 0.0f,
                           out + H, H, (int64_t)T * H, B);
    return M1C_OK;
}

/* dW += sum_{b, t>=1} dout[b, t]^T in[b, t-1];  din[b, t-1] += dout[b, t] W (both accumulate). */
static int hello_backward(void *self, const m1c_layer_bufs *bf, float *din, const float *dout, const float *in,
                          int B, int T) {
    hello *a = self;
    const int H = a->H;
    const float *W = bf->params[0].data;
    if (T < 2) return M1C_OK; /* no token has a predecessor: nothing flows */
    if (bf->grads) {
        float *dW = bf->grads[0].data;
        for (int b = 0; b < B; b++)
            a->h->gemm(a->h, a->device, 1, 0, H, H, T - 1, 1.0f, dout + (int64_t)b * T * H + H, H,
                       in + (int64_t)b * T * H, H, 1.0f, dW, H);
    }
    if (din)
        a->h->gemm_batched(a->h, a->device, 0, 0, T - 1, H, H, 1.0f, dout + H, H, (int64_t)T * H, W, H, 0, 1.0f,
                           din, H, (int64_t)T * H, B);
    return M1C_OK;
}

// ----------------------------------------------------------------------------
// incremental decoding: the state is the last token seen, per sequence

static int hello_state(void *self, int batch, int64_t max_len, m1c_buf_spec *specs, int max) {
    hello *a = self;
    (void)max_len; /* one token of history, whatever the length */
    if (!specs) return 1;
    if (max < 1) return a->h->error(a->h, "hello_attention: room for %d state specs, 1 needed", max);
    specs[0] = spec2("self_attn.shift_state", batch, a->H); /* (batch, H) */
    return 1;
}

/* T new tokens after `pos` already seen (pos == 0: a fresh sequence, the previous token is zero). */
static int hello_step(void *self, const m1c_layer_bufs *bf, m1c_tensor *state, float *out, const float *in, int B,
                      int T, int64_t pos) {
    hello *a = self;
    const int H = a->H;
    const float *W = bf->params[0].data;
    if (!state || !state[0].data) return a->h->error(a->h, "hello_attention: step needs its state buffer");
    if (state[0].shape[0] < B) return a->h->error(a->h, "hello_attention: state for %lld sequences, batch is %d",
                                                  (long long)state[0].shape[0], B);
    float *last = state[0].data; /* (B, H) */
    if (pos == 0) memset(last, 0, (size_t)B * H * sizeof *last);
    /* out[b, 0] = W last[b], for every b at once: (B, H) x W^T. */
    a->h->gemm(a->h, a->device, 0, 1, B, H, H, 1.0f, last, H, W, H, 0.0f, out, T * H);
    if (T > 1)
        a->h->gemm_batched(a->h, a->device, 0, 1, T - 1, H, H, 1.0f, in, H, (int64_t)T * H, W, H, 0, 0.0f,
                           out + H, H, (int64_t)T * H, B);
    for (int b = 0; b < B; b++)
        memcpy(last + (int64_t)b * H, in + ((int64_t)b * T + T - 1) * H, (size_t)H * sizeof *last);
    return M1C_OK;
}

/* One H x H matrix-vector product per token, whatever the context. */
static double hello_flops(void *self, int64_t ctx) {
    hello *a = self;
    (void)ctx;
    return 2.0 * a->H * a->H;
}

static const m1c_attention_vtable hello_vtable = {
    .size = sizeof(m1c_attention_vtable),
    .ops = {
        .create = hello_create,
        .destroy = hello_destroy,
        .params = hello_params,
        .acts = hello_none,
        .scratch = hello_none,
        .forward = hello_forward,
        .backward = hello_backward,
    },
    .state = hello_state,
    .step = hello_step,
    .flops = hello_flops,
};

M1C_PLUGIN(ATTENTION, attention, hello_vtable, "hello_attention", "0.1.0",
           "shift mixer: out_t = W x_{t-1} (out-of-tree example)", "MIT")
