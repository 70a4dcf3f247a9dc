/* m1c_layer_info.lp_inputs (ABI 1.2): a layer handed the core's bf16 copies of its input and output
 * gradient (bufs.in_lp, dout_lp) computes exactly what it computes when it rounds them itself. For each
 * layer plugin with a BF16 CUDA path (lightning fused and blocked, softmax, topk): one instance made with
 * lp_inputs, one without, the same parameters and inputs; forward then backward; every output, input
 * gradient and parameter gradient must be bit-identical, since both round with nearest-even. Then the
 * copies must be what the layer reads: other values in in_lp (and in dout_lp for an attention layer)
 * must change its output (input gradient). */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "../core/ops.h"
#include "harness.h"

#define GPU M1C_DEVICE_CUDA

static int64_t numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Values of a and b (n floats on the GPU) that differ bitwise; and whether a has a nonzero value. */
static int64_t differing(const float *dev_a, const float *dev_b, int64_t n, int64_t *first, int *nonzero) {
    float *a = th_to_host(GPU, dev_a, n), *b = th_to_host(GPU, dev_b, n);
    int64_t bad = 0;
    *first = -1, *nonzero = 0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&a[i], &b[i], 4) != 0 && bad++ == 0) *first = i;
        *nonzero |= a[i] != 0.0f;
    }
    free(a), free(b);
    return bad;
}

static void expect_same(const float *dev_a, const float *dev_b, int64_t n, const char *what, const char *plugin) {
    int64_t first;
    int nonzero;
    const int64_t bad = differing(dev_a, dev_b, n, &first, &nonzero);
    cr_expect_eq(bad, 0, "%s: %s differs in %lld of %lld values (first at %lld)", plugin, what, (long long)bad,
                 (long long)n, (long long)first);
    cr_expect(nonzero, "%s: %s is all zero (nothing was computed)", plugin, what);
}

static void expect_changed(const float *dev_a, const float *dev_b, int64_t n, const char *what, const char *plugin) {
    int64_t first;
    int nonzero;
    cr_expect_gt(differing(dev_a, dev_b, n, &first, &nonzero), 0, "%s: %s does not read the core's bf16 copy",
                 plugin, what);
}

static void check(const char *plugin, const char *settings, int attention, int H, int B, int T, uint64_t seed) {
    th_need_gpu();
    th_layer *own = th_layer_new_dev(plugin, settings, 0, 1, H, B, T, seed, 0.3f, GPU, M1C_BF16);
    th_layer *lp = th_layer_new_lp(plugin, settings, 0, 1, H, B, T, seed, 0.3f);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *z = th_zeros(n);
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n);
    float *out1 = th_to_dev(GPU, z, n), *out2 = th_to_dev(GPU, z, n);
    float *din1 = th_to_dev(GPU, z, n), *din2 = th_to_dev(GPU, z, n);
    uint16_t *x_lp = m1c_dev_alloc(GPU, (size_t)n * 2), *dout_lp = m1c_dev_alloc(GPU, (size_t)n * 2);
    m1c_to_bf16(GPU, x_lp, gx, n);
    m1c_to_bf16(GPU, dout_lp, gdout, n);
    lp->bufs.in_lp = x_lp;
    lp->bufs.dout_lp = attention ? dout_lp : NULL; /* the core hands dout_lp to attention layers only */

    th_forward(own, out1, gx);
    th_forward(lp, out2, gx);
    expect_same(out1, out2, n, "forward output", plugin);
    th_backward(own, din1, gdout, gx);
    th_backward(lp, din2, gdout, gx);
    expect_same(din1, din2, n, "input gradient", plugin);
    for (int i = 0; i < own->np; i++)
        expect_same(own->grads[i].data, lp->grads[i].data, numel(&own->grads[i]), own->pspec[i].name, plugin);

    /* other copies: dout's values as the input, x's as the output gradient */
    lp->bufs.in_lp = dout_lp;
    th_forward(lp, out2, gx);
    expect_changed(out1, out2, n, "forward output", plugin);
    if (attention) {
        lp->bufs.in_lp = x_lp, lp->bufs.dout_lp = x_lp;
        th_forward(lp, out2, gx);
        m1c_dev_memset0(GPU, din2, (size_t)n * 4);
        m1c_dev_memset0(GPU, din1, (size_t)n * 4);
        th_backward(own, din1, gdout, gx);
        th_backward(lp, din2, gdout, gx);
        expect_changed(din1, din2, n, "input gradient", plugin);
    }
    char err[256];
    cr_expect_not(m1c_dev_take_error(GPU, err, sizeof err), "%s: %s", plugin, err);

    m1c_dev_free(GPU, x_lp), m1c_dev_free(GPU, dout_lp);
    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, out1), th_dev_free(GPU, out2);
    th_dev_free(GPU, din1), th_dev_free(GPU, din2);
    free(x), free(dout), free(z);
    th_layer_free(own), th_layer_free(lp);
}

/* T not a multiple of the block size; H not the attention width. */
Test(lp_inputs, lightning_fused) {
    check("lightning", "heads = 2; head_dim = 64; block_size = 64; decay = \"m1c\";", 1, 96, 2, 100, 11);
}
Test(lp_inputs, lightning_blocked) {
    check("lightning", "heads = 2; head_dim = 16; block_size = 16; decay = \"m1c\"; kernel = \"blocked\";", 1, 48, 2,
          37, 12);
}
Test(lp_inputs, softmax) { check("softmax", "heads = 4; kv_heads = 2; head_dim = 64;", 1, 128, 2, 77, 13); }
Test(lp_inputs, topk) { check("topk", "experts = 4; top_k = 2; ffn_dim = 24; aux_coef = 0.01;", 0, 64, 2, 45, 14); }
