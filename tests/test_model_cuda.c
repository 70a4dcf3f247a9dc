/* The whole model on a CUDA device against the CPU reference: the same configuration and seed give
 * the same parameters; logp and every parameter gradient must agree, in fp32 and in mixed precision
 * (bf16). Then a short training run on the GPU must learn. Skipped without a GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "../core/checkpoint.h"
#include "../core/host.h"
#include "../core/model.h"
#include "../core/rng.h"
#include "../core/train.h"

/* The GPU check, and the build tree's plugins for the sessions these tests open. */
static void need_gpu(void) {
    th_need_gpu();
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
}

/* A hybrid of every plugin kind: lightning with a block that does not divide T, softmax with GQA and
 * partial RoPE, top-2 of 4 experts; DeepNorm factors away from 1. */
static char *config(const char *device, const char *precision, const char *head, int T, int steps) {
    return m1c_xasprintf(
        "model = { hidden = 64; layers = 4; head_precision = \"%s\"; pattern = [\"lin\", \"lin\", \"soft\", \"lin\"];\n"
        "  types = { lin = { alpha = 1.3; beta = 0.9; attention = { plugin = \"lightning\"; heads = 2; head_dim = 32;\n"
        "                    block_size = 32; }; };\n"
        "            soft = { alpha = 1.2; beta = 0.8; attention = { plugin = \"softmax\"; heads = 4; kv_heads = 2;\n"
        "                     head_dim = 32; rotary_dim = 16; }; }; };\n"
        "  ffn = { plugin = \"topk\"; experts = 4; top_k = 2; ffn_dim = 128; }; ffn_alpha = 1.1; };\n"
        "run = { device = \"%s\"; precision = \"%s\"; threads = 2;\n"
        "  stages = ( { data = { plugin = \"synth-math\"; }; steps = %d; batch = 4; seq_len = %d;\n"
        "               schedule = { lr = 3e-3; warmup = 5; }; eval = { every = %d; batches = 4; };\n"
        "               metrics = { every = 10; }; } ); };\n",
        head, device, precision, steps, T, steps);
}

typedef struct side {
    m1c_session s;
    m1c_run r;
} side;

static void open_side(side *x, const char *device, const char *precision, const char *head, int T) {
    char *text = config(device, precision, head, T, 1);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_session_open_text(&x->s, text, "gpu-test.cfg", ".", NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_session_build_model(&x->s, 7, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_model_alloc_grads(&x->s.model, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_run_init(&x->r, &x->s.model, 4, T, 1, &e), M1C_OK, "%s", e.msg);
    free(text);
}

static void close_side(side *x) {
    m1c_run_free(&x->r, &x->s.model);
    m1c_session_close(&x->s);
}

/* max |a - b| / max |b| */
static double rel_to_max(const float *a, const float *b, int64_t n) {
    double d = 0, m = 1e-30;
    for (int64_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i])), m = fmax(m, fabs((double)b[i]));
    return d / m;
}

static void compare(const char *precision, const char *head, double tol_logp, double tol_grad) {
    need_gpu();
    const int T = 70, B = 4;
    side cpu, gpu;
    open_side(&cpu, "cpu", "fp32", "fp32", T);
    open_side(&gpu, "cuda", precision, head, T);
    int32_t tokens[4 * 71];
    m1c_rng g;
    m1c_rng_seed(&g, 3, 0);
    for (int i = 0; i < B * (T + 1); i++) tokens[i] = (int32_t)(m1c_rng_u64(&g) % 259);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_forward(&cpu.s.model, &cpu.r, tokens, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_model_forward(&gpu.s.model, &gpu.r, tokens, &e), M1C_OK, "%s", e.msg);
    double d = 0;
    for (int i = 0; i < B * T; i++) d = fmax(d, fabs((double)gpu.r.logp_host[i] - cpu.r.logp_host[i]));
    cr_assert_leq(d, tol_logp, "%s: logp differs by %g", precision, d);
    cr_assert_leq(fabs(gpu.r.aux_loss - cpu.r.aux_loss), 1e-3 * fmax(1e-6, fabs(cpu.r.aux_loss)) + tol_logp * 1e-2);

    float *w = th_randn(B * T, 11, 1.0f);
    for (int i = 0; i < B * T; i++) cpu.r.dlogp_host[i] = gpu.r.dlogp_host[i] = -w[i] / (float)(B * T);
    cr_assert_eq(m1c_model_backward(&cpu.s.model, &cpu.r, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_model_backward(&gpu.s.model, &gpu.r, &e), M1C_OK, "%s", e.msg);
    m1c_model *mc = &cpu.s.model, *mg = &gpu.s.model;
    for (int i = 0; i < mc->grads.n; i++) {
        int64_t n = m1c_numel(&mc->grads.t[i]);
        float *h = th_to_host(M1C_DEVICE_CUDA, mg->grads.t[i].data, n);
        double r = rel_to_max(h, mc->grads.t[i].data, n);
        cr_expect_leq(r, tol_grad, "%s: gradient %s differs: %g of its largest entry", precision, mc->grads.t[i].name,
                      r);
        free(h);
    }
    free(w);
    close_side(&cpu);
    close_side(&gpu);
}

/* fp32 on both: the same arithmetic up to summation order (cuBLAS vs OpenBLAS tiling, atomics in the
 * embedding and norm-weight gradients) through 4 layers: ~1e-6 relative per operation, far under
 * 1e-4 of the largest gradient; logp (values ~ -5.5) within 1e-4. */
/* A failure the device kept during a forward (here a real one: clearing an address that is no
 * allocation, which leaves the device usable) fails that forward with a message naming it, instead of
 * ending the process; the next forward runs. */
Test(model_cuda, device_failure_fails_the_call) {
    need_gpu();
    const int T = 16, B = 4;
    side g;
    open_side(&g, "cuda", "bf16", "fp32", T);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B * (T + 1));
    m1c_rng rng;
    m1c_rng_seed(&rng, 5, 0);
    for (int i = 0; i < B * (T + 1); i++) tok[i] = (int32_t)(m1c_rng_u64(&rng) % (uint64_t)g.s.model.V);
    m1c_err e = {{0}};
    m1c_dev_memset0(M1C_DEVICE_CUDA, (void *)(uintptr_t)8, 64);
    cr_assert_eq(m1c_model_forward(&g.s.model, &g.r, tok, &e), M1C_ERR, "a kept device failure must fail the call");
    cr_assert(strstr(e.msg, "forward on the GPU failed") && strstr(e.msg, "cudaMemset"), "message: %s", e.msg);
    memset(&e, 0, sizeof e);
    cr_assert_eq(m1c_model_forward(&g.s.model, &g.r, tok, &e), M1C_OK, "%s", e.msg);
    free(tok);
    close_side(&g);
}

Test(model_cuda, fp32_matches_cpu) { compare("fp32", "fp32", 1e-4, 1e-4); }

/* bf16: GEMM operands and saved activations rounded to 8 mantissa bits (relative 2^-9 = 2e-3 each),
 * accumulated in f32, across 4 layers and the head's inputs: logp within 5e-2 (absolute, values ~5.5:
 * ~1%), gradients within 5e-2 of each tensor's largest entry. */
Test(model_cuda, bf16_close_to_cpu) { compare("bf16", "fp32", 5e-2, 5e-2); }

/* The same with the head in bf16 too (its operands rounded like the layers'; in a training run its
 * backward starts from the forward's onehot - softmax in bf16, core/ops.h): the same tolerances. */
Test(model_cuda, bf16_head_close_to_cpu) { compare("bf16", "bf16", 5e-2, 5e-2); }

/* 60 steps of synth-math on the GPU in mixed precision (LM head `head`; clip 0 with no_clip): the
 * validation loss must end well under the data's unigram entropy (as the CPU test of the same sizes
 * does). res says how the steps ran. */
static void train_gpu(const char *head, int no_clip, m1c_train_result *res) {
    need_gpu();
    char dir[] = "/tmp/m1c_gpu_train_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char *text = config("cuda", "bf16", head, 64, 60);
    char *od = m1c_xasprintf("run.out_dir=\"%s\"", dir);
    const char *ov[] = {od, "run.stages.0.schedule.clip=0"};
    m1c_session s;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_session_open_text(&s, text, "gpu-train.cfg", ".", ov, no_clip ? 2 : 1, &e), M1C_OK, "%s", e.msg);
    m1c_train_opts o = {.quiet = 1};
    cr_assert_eq(m1c_train(&s, &o, res, &e), M1C_OK, "%s", e.msg);
    m1c_session_close(&s);
    cr_assert(isfinite(res->last_val_loss) && res->last_val_loss < res->unigram_entropy - 0.5,
              "validation loss %g vs unigram entropy %g", res->last_val_loss, res->unigram_entropy);
    m1c_remove_tree(dir);
    free(od), free(text);
}

/* Training on the GPU learns; with clipping (the default) the optimizer runs after each backward. */
Test(model_cuda, bf16_training_learns) {
    m1c_train_result res;
    train_gpu("fp32", 0, &res);
    cr_expect_eq(res.overlapped, 0, "clipping keeps the optimizer after the backward");
}

/* Incremental decoding on the GPU (chunked prefill, then single tokens) gives the logits of the full
 * forward at every fed position: lightning's recurrent state and softmax's KV cache on the device. fp32:
 * the two paths order their sums differently (block products vs. state updates), ~1e-6 relative per
 * operation through 4 layers; 1e-4 of the largest logit. */
Test(model_cuda, decoding_matches_forward) {
    need_gpu();
    const int T = 70, B = 4, V = 259;
    side gpu;
    open_side(&gpu, "cuda", "fp32", "fp32", T);
    m1c_model *m = &gpu.s.model;
    int32_t tokens[4 * 71];
    m1c_rng g;
    m1c_rng_seed(&g, 5, 0);
    for (int i = 0; i < B * (T + 1); i++) tokens[i] = (int32_t)(m1c_rng_u64(&g) % (uint64_t)V);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_forward(m, &gpu.r, tokens, &e), M1C_OK, "%s", e.msg);
    float *full = th_to_host(M1C_DEVICE_CUDA, gpu.r.logits, (int64_t)B * T * V);
    double big = th_max_abs(full, (int64_t)B * T * V);

    m1c_decoder d;
    cr_assert_eq(m1c_decoder_init(&d, m, B, T, 16, &e), M1C_OK, "%s", e.msg);
    int32_t chunk[4 * 16];
    float *out = th_zeros((int64_t)B * V);
    /* chunks of 16, 16, 5, then single tokens */
    int pos = 0, sizes[] = {16, 16, 5};
    for (int c = 0; pos < T; c++) {
        int n = c < 3 ? sizes[c] : 1;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) chunk[b * n + t] = tokens[b * (T + 1) + pos + t];
        cr_assert_eq(m1c_decoder_feed(m, &d, chunk, n, out, &e), M1C_OK, "%s", e.msg);
        pos += n;
        for (int b = 0; b < B; b++) {
            double diff = th_max_abs_diff(out + (int64_t)b * V, full + ((int64_t)b * T + pos - 1) * V, V);
            cr_assert_leq(diff, 1e-4 * big, "row %d position %d: decoding differs by %g (largest logit %g)", b,
                          pos - 1, diff, big);
        }
    }
    m1c_decoder_free(&d, m);
    free(out), free(full);
    close_side(&gpu);
}

/* The optimizer overlapped with the backward (train.h: each layer stepped on the background stream once
 * its gradients are complete) changes no bit: three steps each way from the same start leave the same
 * parameters and bf16 copies. The overlapped steps take their gradients from m1c_zero_grads, which hands
 * topk's expert gradients over unset (its Hopper kernels store them instead of adding: ABI 1.3) after they
 * were filled with NaN: the bits must still agree with the steps from gradients all zeroed. */
Test(model_cuda, overlapped_optimizer_same_bits) {
    need_gpu();
    const int T = 70, B = 4;
    int32_t tokens[4 * 71];
    m1c_rng g;
    m1c_rng_seed(&g, 9, 0);
    for (int i = 0; i < B * (T + 1); i++) tokens[i] = (int32_t)(m1c_rng_u64(&g) % 259);
    unsigned char *bits[2][2];
    size_t bytes[2] = {0, 0};
    for (int v = 0; v < 2; v++) { /* v 0: the step after the backward; v 1: overlapped */
        side x;
        open_side(&x, "cuda", "bf16", "bf16", T);
        m1c_model *m = &x.s.model;
        m1c_err e = {{0}};
        m1c_plugin *optp = NULL;
        m1c_config *empty = NULL;
        void *opt = NULL;
        cr_assert_eq(m1c_registry_load(&x.s.reg, "adamw", NULL, M1C_KIND_OPTIMIZER, &optp, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(m1c_config_parse(&empty, "", "adamw", NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
        cr_assert_eq(M1C_OPTIMIZER(optp)->create(&optp->host, m1c_config_root(empty), &opt), M1C_OK);
        const char *names[4];
        const int ns = M1C_OPTIMIZER(optp)->state(opt, names, 4);
        m1c_arena state;
        m1c_arena_init(&state, m->device);
        for (int i = 0; i < m->params.n; i++)
            for (int j = 0; j < ns; j++)
                m1c_arena_add(&state, names[j], M1C_F32, m->params.t[i].ndim, m->params.t[i].shape);
        cr_assert_eq(m1c_arena_alloc(&state, &e), M1C_OK, "%s", e.msg);
        unsigned char *nan = malloc(m->grads.bytes);
        cr_assert_not_null(nan);
        memset(nan, 0xFF, m->grads.bytes);
        for (int step = 1; step <= 3; step++) {
            if (v) {
                m1c_dev_copy(m->device, m->grads.base, M1C_DEVICE_CPU, nan, m->grads.bytes);
                m1c_zero_grads(m, 1);
            } else {
                m1c_arena_zero(&m->grads);
            }
            cr_assert_eq(m1c_model_forward(m, &x.r, tokens, &e), M1C_OK, "%s", e.msg);
            for (int i = 0; i < B * T; i++) x.r.dlogp_host[i] = -1.0f / (float)(B * T);
            const m1c_optim_step os = m1c_optim_step_of(m, state.t, step, 3e-3f);
            m1c_overlap ovl = {m, optp, opt, ns, os, NULL};
            cr_assert_eq(v ? m1c_backward_overlapped(&ovl, &x.r, &e) : m1c_model_backward(m, &x.r, &e), M1C_OK, "%s",
                         e.msg);
            if (!v) cr_assert_eq(M1C_OPTIMIZER(optp)->step(opt, &os), M1C_OK);
        }
        free(nan);
        bytes[0] = m->params.bytes, bytes[1] = m->params_lp.bytes;
        bits[v][0] = (unsigned char *)th_to_host(M1C_DEVICE_CUDA, m->params.base, (int64_t)(bytes[0] / 4));
        bits[v][1] = (unsigned char *)th_to_host(M1C_DEVICE_CUDA, m->params_lp.base, (int64_t)(bytes[1] / 4));
        m1c_arena_free(&state);
        M1C_OPTIMIZER(optp)->destroy(opt);
        m1c_config_free(empty);
        close_side(&x);
    }
    cr_expect_eq(memcmp(bits[0][0], bits[1][0], bytes[0]), 0, "the parameters differ");
    cr_expect_eq(memcmp(bits[0][1], bits[1][1], bytes[1]), 0, "the bf16 copies differ");
    for (int v = 0; v < 2; v++) free(bits[v][0]), free(bits[v][1]);
}

/* m1c train without clipping overlaps the optimizer with the backward: it still learns. */
Test(model_cuda, bf16_training_learns_overlapped) {
    m1c_train_result res;
    train_gpu("bf16", 1, &res);
    cr_expect_eq(res.overlapped, res.steps, "every step overlapped its optimizer (%lld of %lld)",
                 (long long)res.overlapped, (long long)res.steps);
}
