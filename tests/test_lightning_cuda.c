/* The lightning plugin on CUDA against its CPU reference: forward, backward (input and every parameter
 * gradient) for both compute dtypes over sequence lengths, block sizes and head sizes; backward after an
 * inference forward at another (B, T) in between, from buffers filled with NaN; repeatable backward; prefill
 * plus decoding on the GPU against the GPU's full forward; a build or machine without a GPU refusing device
 * CUDA. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/arena.h"
#include "../core/host.h"
#include "harness.h"

#define GPU M1C_DEVICE_CUDA

static int64_t numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static void settings(char *cfg, size_t n, int nh, int hd, int bs) {
    snprintf(cfg, n, "heads = %d; head_dim = %d; block_size = %d; decay = \"m1c\";", nh, hd, bs);
}

/* max|a - ref| / max|ref|: the error relative to the tensor's scale, which is what a rounding error
 * budget bounds (element-wise relative errors blow up where the reference happens to cross zero). */
static double scaled_err(const float *a, const float *ref, int64_t n) {
    const double m = th_max_abs(ref, n);
    return th_max_abs_diff(a, ref, n) / (m > 0 ? m : 1.0);
}

typedef struct tols {
    double out, din, grad;
} tols;

/* One configuration: the same layer (same seed: same parameters) on the CPU and the GPU, the same
 * inputs; forward, then backward into din and gradients that start non-zero on both (they accumulate).
 * apart: the GPU layer's parameters each in an allocation of its own (the fused path's separate qkv and
 * gate products), else side by side as in the core's arenas (one product for both). */
static void compare_at(int nh, int hd, int bs, int B, int T, int cdt, tols tol, uint64_t seed, int apart) {
    char cfg[160];
    settings(cfg, sizeof cfg, nh, hd, bs);
    const int H = 48; /* differs from nh*hd: the attention width is its own */
    th_layer *cpu = th_layer_new("lightning", cfg, 2, 5, H, B, T, seed, 0.3f);
    th_layer *gpu = apart ? th_layer_new_apart("lightning", cfg, 2, 5, H, B, T, seed, 0.3f, GPU, cdt)
                          : th_layer_new_dev("lightning", cfg, 2, 5, H, B, T, seed, 0.3f, GPU, cdt);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *din0 = th_randn(n, seed + 3, 1.0f);
    float *out = th_zeros(n), *din = malloc((size_t)n * 4);
    memcpy(din, din0, (size_t)n * 4);
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n), *gdin = th_to_dev(GPU, din0, n);
    float *gout = th_to_dev(GPU, out, n);

    th_forward(cpu, out, x);
    th_backward(cpu, din, dout, x);
    th_forward(gpu, gout, gx);
    th_backward(gpu, gdin, gdout, gx);

    float *o2 = th_to_host(GPU, gout, n), *d2 = th_to_host(GPU, gdin, n);
    const char *dt = cdt == M1C_BF16 ? "bf16" : "f32";
    double e = scaled_err(o2, out, n);
    cr_log_info("%s nh=%d hd=%d bs=%d B=%d T=%d: out %.3g", dt, nh, hd, bs, B, T, e);
    cr_expect_leq(e, tol.out, "%s nh=%d hd=%d bs=%d T=%d: output error %.3g", dt, nh, hd, bs, T, e);
    /* din started as din0 on both: compare the accumulated part, so the check is not diluted by din0 */
    for (int64_t i = 0; i < n; i++) din[i] -= din0[i], d2[i] -= din0[i];
    e = scaled_err(d2, din, n);
    cr_expect_leq(e, tol.din, "%s nh=%d hd=%d bs=%d T=%d: din error %.3g", dt, nh, hd, bs, T, e);
    for (int p = 0; p < cpu->np; p++) {
        const int64_t np = numel(&cpu->grads[p]);
        float *g2 = th_to_host(GPU, gpu->grads[p].data, np);
        e = scaled_err(g2, cpu->grads[p].data, np);
        cr_expect_gt(th_max_abs(cpu->grads[p].data, np), 0.0, "%s: reference gradient is zero", cpu->pspec[p].name);
        cr_expect_leq(e, tol.grad, "%s nh=%d hd=%d bs=%d T=%d: %s gradient error %.3g", dt, nh, hd, bs, T,
                      cpu->pspec[p].name, e);
        free(g2);
    }
    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, gdin), th_dev_free(GPU, gout);
    free(x), free(dout), free(din0), free(out), free(din), free(o2), free(d2);
    th_layer_free(cpu);
    th_layer_free(gpu);
}

static void compare(int nh, int hd, int bs, int B, int T, int cdt, tols tol, uint64_t seed) {
    compare_at(nh, hd, bs, B, T, cdt, tol, seed, 0);
}

static void sweep(int cdt, tols tol) {
    static const int Ts[] = {1, 7, 64, 100, 300}, bss[] = {16, 64, 256};
    uint64_t seed = 100;
    /* every length against every block size (incl. block > T, partial last blocks), head_dim 32 */
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 3; j++) compare(3, 32, bss[j], 2, Ts[i], cdt, tol, seed++);
    /* wider heads: 64 and 128, full and partial blocks */
    static const int hds[] = {64, 128};
    for (int k = 0; k < 2; k++) {
        compare(2, hds[k], 64, 2, 100, cdt, tol, seed++);
        compare(2, hds[k], 16, 1, 300, cdt, tol, seed++);
        compare(2, hds[k], 256, 2, 7, cdt, tol, seed++);
    }
}

Test(lightning_cuda, matches_cpu_f32) {
    th_need_gpu();
    /* Both sides in f32 (cuBLAS in plain FP32 mode, no TF32); only summation orders differ (cuBLAS vs
     * OpenBLAS, tree vs sequential norms, the chunked state scan vs the CPU's running state, expf vs the
     * CPU's polynomial). Each rounds ~6e-8 relative per operation over sums of at most a few hundred
     * terms: ~1e-6 of the largest value; weight gradients sum B*T = 600 tokens with cancellation, so the
     * brief's 1e-4 of max|ref| leaves a margin without hiding an indexing error (those are O(1)). */
    sweep(M1C_F32, (tols){1e-4, 1e-4, 1e-4});
}

Test(lightning_cuda, matches_cpu_bf16) {
    th_need_gpu();
    /* BF16: x, the weights, the pre-activations, o, y (and dout, d pre, d gate in backward) are rounded to
     * bf16 (8 mantissa bits: 2^-9 ~ 2e-3 relative each), and so are the operands of the per-block tensor-core
     * products: SiLU(q, k, v) and their decayed copies, the scores S (twice: the GEMM's result, then the
     * masked value), the bf16 copy of the block-start state (and in backward dO, P and d state). That makes
     * about ten roundings in series instead of six, each with random sign, then sums over hd, the block,
     * H or D with f32 accumulation: ~sqrt(10/6) times the former few 1e-3, ~1.5e-2 at the worst element of
     * thousands. Outputs 3e-2 of max|ref|; din 4e-2 (one more rounding chain: dout, d pre); weight
     * gradients sum products of two rounded operands over B*T tokens, with cancellation making the sum
     * smaller than its terms: 6e-2. An indexing or formula error is O(1). */
    sweep(M1C_BF16, (tols){3e-2, 4e-2, 6e-2});
}

/* hd 64 and 128 with bf16 take the fused kernels; their norm backward sums the weight gradient in shared
 * memory with up to 8 warps of D floats each (48 KiB): fewer warps above D = 1536, a separate pass above
 * D = 12288. Both beyond the sweep's widths. */
Test(lightning_cuda, fused_wide_heads) {
    th_need_gpu();
    /* the sweep's bf16 tolerances, for the same reasons (the norm's sums grow from D = 256 to 12800 terms,
     * but relative to their scale, with f32 accumulation) */
    const tols tol = {3e-2, 4e-2, 6e-2};
    compare(16, 64, 64, 2, 70, M1C_BF16, tol, 302);  /* D = 1024: the forward norm's 4 chunks a lane */
    compare(25, 64, 64, 2, 70, M1C_BF16, tol, 300);  /* D = 1600: 7 warps */
    compare(100, 128, 64, 1, 70, M1C_BF16, tol, 301); /* D = 12800: the separate weight-gradient pass */
}

/* The fused path with its weights and gradients apart (a core whose arenas did not place them side by
 * side): the separate qkv and gate products, on the same joined layout of pre and gate; the sweep's bf16
 * tolerances. */
Test(lightning_cuda, fused_weights_apart) {
    th_need_gpu();
    const tols tol = {3e-2, 4e-2, 6e-2};
    compare_at(2, 64, 64, 2, 100, M1C_BF16, tol, 310, 1);
    compare_at(3, 128, 64, 1, 77, M1C_BF16, tol, 311, 1);
}

/* ---- buffers between calls -------------------------------------------------------------------------- */

/* Every activation and scratch byte 0xff: NaN in f32 and bf16, so that reading a value no call wrote
 * shows up in the results. */
static void poison(th_layer *l) {
    m1c_tensor *sets[2] = {l->acts, l->scratch};
    const int counts[2] = {l->na, l->ns};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < counts[k]; i++) {
            const size_t bytes = (size_t)m1c_numel(&sets[k][i]) * m1c_dtype_size(sets[k][i].dtype);
            unsigned char *h = malloc(bytes ? bytes : 1);
            memset(h, 0xff, bytes);
            m1c_dev_copy(GPU, sets[k][i].data, M1C_DEVICE_CPU, h, bytes);
            free(h);
        }
}

static void forward_at(th_layer *l, float *out, const float *in, int B, int T) {
    if (l->ops->forward(l->self, &l->bufs, out, in, B, T) != M1C_OK) cr_assert_fail("forward: %s", l->plugin->error);
}

/* Training forward at (B, T); then, before its backward, an inference forward without activations (acts
 * NULL) at a smaller (B2, T2) that reuses the scratch; the backward must still match the CPU's (it may read
 * only what the activations kept), and the inference output the CPU's forward of the same input. All
 * buffers start as NaN. */
static void interleaved(int nh, int hd, int bs, int cdt, tols tol, uint64_t seed) {
    const int B = 2, T = 100, B2 = 1, T2 = 37, H = 48;
    char cfg[160];
    settings(cfg, sizeof cfg, nh, hd, bs);
    th_layer *cpu = th_layer_new("lightning", cfg, 2, 5, H, B, T, seed, 0.3f);
    th_layer *gpu = th_layer_new_dev("lightning", cfg, 2, 5, H, B, T, seed, 0.3f, GPU, cdt);
    poison(gpu);
    const int64_t n = (int64_t)B * T * H, n2 = (int64_t)B2 * T2 * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *x2 = th_randn(n2, seed + 3, 1.0f);
    float *out = th_zeros(n), *din = th_zeros(n), *out2 = th_zeros(n2);
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n), *gdin = th_to_dev(GPU, din, n);
    float *gout = th_to_dev(GPU, out, n), *gx2 = th_to_dev(GPU, x2, n2), *gout2 = th_to_dev(GPU, out2, n2);

    th_forward(cpu, out, x);
    th_backward(cpu, din, dout, x);
    forward_at(cpu, out2, x2, B2, T2); /* after the CPU's backward: it overwrites the CPU's activations */

    th_forward(gpu, gout, gx);
    m1c_tensor *acts = gpu->bufs.acts;
    gpu->bufs.acts = NULL, gpu->bufs.training = 0;
    forward_at(gpu, gout2, gx2, B2, T2);
    gpu->bufs.acts = acts, gpu->bufs.training = 1;
    th_backward(gpu, gdin, gdout, gx);

    const char *dt = cdt == M1C_BF16 ? "bf16" : "f32";
    float *o1 = th_to_host(GPU, gout, n), *o2 = th_to_host(GPU, gout2, n2), *d1 = th_to_host(GPU, gdin, n);
    double e = scaled_err(o1, out, n);
    cr_expect_leq(e, tol.out, "%s hd=%d: output error %.3g", dt, hd, e);
    e = scaled_err(o2, out2, n2);
    cr_log_info("%s hd=%d: inference output %.3g", dt, hd, e);
    cr_expect_leq(e, tol.out, "%s hd=%d: inference output (no acts, B=%d T=%d) error %.3g", dt, hd, B2, T2, e);
    e = scaled_err(d1, din, n);
    cr_expect_leq(e, tol.din, "%s hd=%d: din after the inference call: error %.3g", dt, hd, e);
    for (int p = 0; p < cpu->np; p++) {
        const int64_t np = numel(&cpu->grads[p]);
        float *g2 = th_to_host(GPU, gpu->grads[p].data, np);
        e = scaled_err(g2, cpu->grads[p].data, np);
        cr_expect_leq(e, tol.grad, "%s hd=%d: %s gradient after the inference call: error %.3g", dt, hd,
                      cpu->pspec[p].name, e);
        free(g2);
    }
    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, gdin), th_dev_free(GPU, gout);
    th_dev_free(GPU, gx2), th_dev_free(GPU, gout2);
    free(x), free(dout), free(x2), free(out), free(din), free(out2), free(o1), free(o2), free(d1);
    th_layer_free(cpu);
    th_layer_free(gpu);
}

Test(lightning_cuda, backward_after_inference_call) {
    th_need_gpu();
    /* the sweep's tolerances for each dtype (the same computations); a value read from the other call's
     * buffers, or a NaN never overwritten, is O(1) or NaN (which fails every comparison) */
    const tols f32 = {1e-4, 1e-4, 1e-4}, bf16 = {3e-2, 4e-2, 6e-2};
    interleaved(3, 32, 16, M1C_F32, f32, 400);  /* block GEMMs, f32 */
    interleaved(3, 32, 16, M1C_BF16, bf16, 401); /* block GEMMs, bf16 (head_dim 32 is not fused) */
    interleaved(2, 64, 64, M1C_BF16, bf16, 402); /* fused */
    interleaved(2, 128, 256, M1C_BF16, bf16, 403); /* fused, block larger than T */
}

/* Backward twice from the same forward, gradients zeroed between: the same bits (fixed summation orders,
 * no float atomics in the norm weight's gradient or anywhere else). */
static void repeatable(int nh, int hd, int cdt, uint64_t seed) {
    const int B = 2, T = 100, H = 48;
    char cfg[160];
    settings(cfg, sizeof cfg, nh, hd, 64);
    th_layer *gpu = th_layer_new_dev("lightning", cfg, 2, 5, H, B, T, seed, 0.3f, GPU, cdt);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, seed + 1, 1.0f), *dout = th_randn(n, seed + 2, 1.0f), *zero = th_zeros(n);
    float *gx = th_to_dev(GPU, x, n), *gdout = th_to_dev(GPU, dout, n), *gout = th_to_dev(GPU, zero, n);
    float *gdin = th_to_dev(GPU, zero, n);
    th_forward(gpu, gout, gx);
    float *first[8] = {0}, *din1 = NULL;
    cr_assert_leq(gpu->np, 8);
    for (int r = 0; r < 2; r++) {
        th_layer_zero_grads(gpu);
        m1c_dev_memset0(GPU, gdin, (size_t)n * 4);
        th_backward(gpu, gdin, gdout, gx);
        float *d = th_to_host(GPU, gdin, n);
        if (r == 0) din1 = d;
        else {
            cr_expect_eq(memcmp(d, din1, (size_t)n * 4), 0, "hd=%d: din differs between two backward calls", hd);
            free(d);
        }
        for (int p = 0; p < gpu->np; p++) {
            const int64_t np = numel(&gpu->grads[p]);
            float *g = th_to_host(GPU, gpu->grads[p].data, np);
            if (r == 0) first[p] = g;
            else {
                cr_expect_eq(memcmp(g, first[p], (size_t)np * 4), 0, "hd=%d: %s gradient differs between two calls",
                             hd, gpu->pspec[p].name);
                free(g);
            }
        }
    }
    for (int p = 0; p < gpu->np; p++) free(first[p]);
    th_dev_free(GPU, gx), th_dev_free(GPU, gdout), th_dev_free(GPU, gout), th_dev_free(GPU, gdin);
    free(x), free(dout), free(zero), free(din1);
    th_layer_free(gpu);
}

Test(lightning_cuda, backward_repeats_bitwise) {
    th_need_gpu();
    repeatable(2, 64, M1C_BF16, 500);  /* fused */
    repeatable(3, 32, M1C_F32, 501);   /* block GEMMs */
}

/* ---- incremental inference on the GPU ------------------------------------------------------------- */

static void do_step(th_layer *l, th_state *s, float *out, const float *in, int B, int T, int64_t pos) {
    if (M1C_ATTENTION(l->plugin)->step(l->self, &l->bufs, s->t, out, in, B, T, pos) != M1C_OK)
        cr_assert_fail("step: %s", l->plugin->error);
}

/* Rows [t0, t0+n) of every sequence of x (B, T, H) on the host, packed into (B, n, H) on the GPU. */
static float *chunk_to_dev(const float *x, int B, int T, int H, int t0, int n) {
    float *c = malloc((size_t)B * n * H * 4);
    for (int b = 0; b < B; b++) memcpy(c + (size_t)b * n * H, x + ((size_t)b * T + t0) * H, (size_t)n * H * 4);
    float *d = th_to_dev(GPU, c, (int64_t)B * n * H);
    free(c);
    return d;
}

/* The GPU output (B, n, H) back into rows [t0, t0+n) of dst (B, T, H). */
static void chunk_from_dev(float *dst, const float *dev, int B, int T, int H, int t0, int n) {
    float *c = th_to_host(GPU, dev, (int64_t)B * n * H);
    for (int b = 0; b < B; b++) memcpy(dst + ((size_t)b * T + t0) * H, c + (size_t)b * n * H, (size_t)n * H * 4);
    free(c);
}

static void run_chunk(th_layer *l, th_state *s, float *stepped, const float *x, int B, int T, int H, int t0, int n) {
    float *in = chunk_to_dev(x, B, T, H, t0, n), *out = th_to_dev(GPU, stepped, (int64_t)B * n * H);
    do_step(l, s, out, in, B, n, t0);
    chunk_from_dev(stepped, out, B, T, H, t0, n);
    th_dev_free(GPU, in), th_dev_free(GPU, out);
}

static void step_equals_forward(int cdt, double tol) {
    /* Prefill 37 tokens (blocks of 16: 16, 16, 5), decode one token at a time, then a chunk of 9. */
    const int B = 2, T = 60, H = 40, P = 37, nh = 2, hd = 32;
    char cfg[160];
    settings(cfg, sizeof cfg, nh, hd, 16);
    th_layer *l = th_layer_new_dev("lightning", cfg, 1, 4, H, B, T, 61, 0.3f, GPU, cdt);
    const int64_t n = (int64_t)B * T * H;
    float *x = th_randn(n, 62, 1.0f), *full = th_zeros(n), *stepped = th_zeros(n);
    float *gx = th_to_dev(GPU, x, n), *gfull = th_to_dev(GPU, full, n);
    th_forward(l, gfull, gx);
    float *f = th_to_host(GPU, gfull, n);
    memcpy(full, f, (size_t)n * 4);
    free(f);
    l->bufs.training = 0;
    th_state *s = th_state_new(l, B, T);
    cr_assert_eq(s->n, 1);
    cr_assert_eq(numel(&s->t[0]), (int64_t)B * nh * hd * hd, "state is (B, nh, hd, hd)");
    /* an unrelated sequence first: pos = 0 below must start afresh */
    float *junk = th_randn((int64_t)B * 6 * H, 63, 1.0f);
    run_chunk(l, s, stepped, junk, B, 6, H, 0, 6);
    free(junk);
    memset(stepped, 0, (size_t)n * 4);

    run_chunk(l, s, stepped, x, B, T, H, 0, P);
    int t = P;
    for (; t < T - 9; t++) run_chunk(l, s, stepped, x, B, T, H, t, 1);
    run_chunk(l, s, stepped, x, B, T, H, t, T - t);

    double e = scaled_err(stepped, full, n);
    cr_log_info("%s stepped vs full forward: %.3g", cdt == M1C_BF16 ? "bf16" : "f32", e);
    cr_expect_leq(e, tol, "stepped vs full forward: %.3g", e);
    th_state_free(s);
    th_dev_free(GPU, gx), th_dev_free(GPU, gfull);
    free(x), free(full), free(stepped);
    th_layer_free(l);
}

Test(lightning_cuda, prefill_then_decode_equals_forward_f32) {
    th_need_gpu();
    /* Different block boundaries (and GEMM shapes) change only the f32 summation order: 1e-5 of the
     * largest output, as on the CPU. */
    step_equals_forward(M1C_F32, 1e-5);
}

Test(lightning_cuda, prefill_then_decode_equals_forward_bf16) {
    th_need_gpu();
    /* The state is f32 on both paths, but its product with Q uses a bf16 copy of it, and tokens of the
     * current block go through the bf16 scores S and V instead: decoding one token at a time routes every
     * earlier token through the rounded state, the full forward routes a block's own tokens through S, so
     * the two paths round differently (2^-9 relative per operand, random signs, averaged over hd terms),
     * besides pre-activations whose differently summed f32 values round to neighbouring bf16 values
     * (2^-8 ~ 4e-3). Through o, y and out_proj: ~1e-3 typically, 2e-2 of max|out| at the worst element. */
    step_equals_forward(M1C_BF16, 2e-2);
}

/* ---- without a GPU -------------------------------------------------------------------------------- */

Test(lightning_cuda, refuses_cuda_without_gpu) {
    if (m1c_dev_available(GPU)) cr_skip_test("a CUDA device is present");
    /* Built without CUDA, create refuses the device by name; built with CUDA on a machine without a GPU,
     * uploading the decay table fails. Either way: an error, never a crash. */
    m1c_plugin *p = th_plugin("lightning", M1C_KIND_ATTENTION);
    m1c_config *cfg = NULL;
    m1c_settings *s = th_settings("heads = 2; head_dim = 8;", &cfg);
    m1c_layer_info info = {sizeof info, 0, 2, 16, GPU, M1C_F32, 1, 0, 0, {0}};
    void *self = NULL;
    p->error[0] = 0;
    cr_expect_eq(M1C_ATTENTION(p)->ops.create(&p->host, s, &info, &self), M1C_ERR);
    cr_expect_null(self);
    cr_expect_neq(p->error[0], 0, "an error message is recorded");
    cr_log_info("refusal: %s", p->error);
    m1c_config_free(cfg);
}
