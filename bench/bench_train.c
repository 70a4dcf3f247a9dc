/* Training-step benchmark: tokens/s of forward + backward + AdamW on random tokens, for the fixed
 * reference shapes of the issue tracker and for any config given on the command line (its model and
 * first stage's B x T).
 *
 *   m1c_bench_train [--steps N] [--threads N] [CONFIG ...]      CPU: the CPU reference shape and
 *                                                                configs/tiny.cfg (no CONFIG)
 *   m1c_bench_train --device cuda [--precision bf16|fp32] [--head fp32|tf32|bf16] [--sequential-optimizer]
 *                   [CONFIG ...]                                 GPU: the ~220M GPU reference shape; the
 *                                                                optimizer overlaps the backward as in
 *                                                                m1c train without clipping, unless
 *                                                                --sequential-optimizer
 * The table gives the mean of the timed steps (after two warm-up steps, from an idle device to an idle
 * device); a line per shape below it their spread: the periods between the ends of consecutive forwards
 * (min, median, max). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "../core/plan.h"
#include "../core/rng.h"
#include "../core/session.h"
#include "../core/timer.h"
#include "../core/train.h"

#define BENCH_NAME "m1c_bench_train"
#include "bench_flags.h"

/* The fixed shape: vocabulary 256, H 256, 8 layers (7 lightning : 1 softmax), lightning 8 x 32 with
 * block 64, softmax 8 query + 4 KV heads x 32, 4 experts top-2 with F 512, B 8, T 256. */
static const char reference_cfg[] =
    "model = { vocab_size = 256; hidden = 256; layers = 8;\n"
    "  pattern = [\"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"sm\"];\n"
    "  types = { lin = { attention = { plugin = \"lightning\"; heads = 8; head_dim = 32; block_size = 64; }; };\n"
    "            sm = { attention = { plugin = \"softmax\"; heads = 8; kv_heads = 4; head_dim = 32; }; }; };\n"
    "  ffn = { plugin = \"topk\"; experts = 4; top_k = 2; ffn_dim = 512; }; };\n"
    "run = { stages = ( { name = \"bench\"; data = { plugin = \"synth-math\"; }; objective = { plugin = \"xent\"; };\n"
    "  optimizer = { plugin = \"adamw\"; }; steps = 10; batch = 8; seq_len = 256; } ); };\n";

/* The GPU reference: H 768, 8 layers 7:1, 12 heads x 64 (softmax: 4 KV heads), 8 experts top-2 with
 * F 1024, vocabulary 32000, B 8, T 2048 (~220M parameters). */
static const char gpu_reference_cfg[] =
    "model = { vocab_size = 32000; hidden = 768; layers = 8;\n"
    "  pattern = [\"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"sm\"];\n"
    "  types = { lin = { attention = { plugin = \"lightning\"; heads = 12; head_dim = 64; block_size = 256; }; };\n"
    "            sm = { attention = { plugin = \"softmax\"; heads = 12; kv_heads = 4; head_dim = 64; }; }; };\n"
    "  ffn = { plugin = \"topk\"; experts = 8; top_k = 2; ffn_dim = 1024; }; };\n"
    "run = { stages = ( { name = \"bench\"; data = { plugin = \"synth-math\"; }; objective = { plugin = \"xent\"; };\n"
    "  optimizer = { plugin = \"adamw\"; }; steps = 10; batch = 8; seq_len = 2048; } ); };\n";

typedef struct bench_opts {
    int steps, device, precision, head, profile;
    int sequential; /* the optimizer after the backward, not overlapped with it */
} bench_opts;

typedef struct result {
    const char *name;
    int B, T;
    int64_t params;
    double tok_s, ms, gflops, mfu;
    int np;                    /* step periods measured (timed steps - 1) */
    double pmin, pmed, pmax;   /* ms between the ends of consecutive forwards (the host waits for each) */
} result;

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int bench(const char *name, m1c_config *cfg, const bench_opts *bo, result *out, m1c_err *e) {
    int steps = bo->steps;
    m1c_session s;
    memset(&s, 0, sizeof s);
    s.cfg = cfg;
    m1c_settings *root = m1c_config_root(cfg);
    int rc = m1c_model_spec_read(&s.spec.model, m1c_cfg_group(root, "model", M1C_REQUIRED, e), e);
    if (rc) return rc;
    m1c_settings *stage = m1c_cfg_elem(m1c_cfg_group(root, "run", M1C_REQUIRED, e), "stages", 0);
    int64_t B = 8, T = 256;
    if (stage) {
        m1c_cfg_int(stage, "batch", M1C_OPTIONAL, 8, 1, 1 << 20, &B, e);
        m1c_cfg_int(stage, "seq_len", M1C_OPTIONAL, 256, 1, 1 << 24, &T, e);
    }
    if (s.spec.model.vocab_size <= 0) s.spec.model.vocab_size = 259; /* byte tokenizer + 3 specials */
    s.spec.run.device = bo->device;
    s.spec.run.precision = bo->precision;
    if (bo->head >= 0) s.spec.model.head_precision = bo->head;
    m1c_registry_init(&s.reg);
    s.have_spec = 1;
    m1c_plugin *optp = NULL;
    void *opt = NULL;
    m1c_config *empty = NULL;
    m1c_run r;
    memset(&r, 0, sizeof r);
    m1c_arena state;
    m1c_arena_init(&state, bo->device);
    int32_t *tok = NULL;
    float *mask = NULL;
    /* when each forward ended (the host waits for its log-probabilities): one step apart */
    double *fwd_end = NULL, *period = NULL;
    rc = m1c_session_build_model(&s, 1, e);
    if (!rc) rc = m1c_model_alloc_grads(&s.model, e);
    if (!rc) rc = m1c_registry_load(&s.reg, "adamw", NULL, M1C_KIND_OPTIMIZER, &optp, e);
    if (!rc) rc = m1c_config_parse(&empty, "", "adamw", NULL, NULL, 0, e);
    if (!rc && M1C_OPTIMIZER(optp)->create(&optp->host, m1c_config_root(empty), &opt))
        rc = m1c_plugin_fail(optp, e, "create");
    m1c_model *m = &s.model;
    int n_state = 0;
    if (!rc) {
        const char *names[4];
        int ns = n_state = M1C_OPTIMIZER(optp)->state(opt, names, 4);
        for (int i = 0; i < m->params.n; i++)
            for (int j = 0; j < ns; j++) m1c_arena_add(&state, names[j], M1C_F32, m->params.t[i].ndim, m->params.t[i].shape);
        rc = m1c_arena_alloc(&state, e);
    }
    if (!rc) rc = m1c_run_init(&r, m, (int)B, (int)T, 1, e);
    if (!rc) {
        tok = malloc((size_t)(B * (T + 1)) * sizeof *tok);
        mask = malloc((size_t)(B * T) * sizeof *mask);
        fwd_end = calloc((size_t)steps + 2, sizeof *fwd_end), period = calloc((size_t)steps, sizeof *period);
        if (!tok || !mask || !fwd_end || !period) rc = m1c_fail(e, "out of memory");
    }
    if (!rc) {
        m1c_rng g;
        m1c_rng_seed(&g, 42, 0);
        for (int64_t i = 0; i < B * (T + 1); i++) tok[i] = (int32_t)(m1c_rng_u64(&g) % (uint64_t)m->V);
        double t0 = 0;
        for (int it = 0; it < steps + 2 && !rc; it++) {
            if (it == 2) { /* two warm-up steps, then from an idle device: the host queues a step's backward
                            * and goes on, so without the wait the timed window also held the rest of the last
                            * warm-up step (on an H100 ~0.4 ms of a 30-step mean, ~1 ms of a 10-step one) */
                m1c_dev_sync(m->device);
                t0 = m1c_now();
            }
            /* as m1c train without clipping: on a GPU the step overlaps the backward (train.h) */
            const int overlap = !bo->sequential && m1c_overlap_possible(m, optp, 0.0);
            m1c_zero_grads(m, overlap);
            rc = m1c_model_forward(m, &r, tok, e);
            fwd_end[it] = m1c_now();
            for (int64_t i = 0; i < B * T; i++) r.dlogp_host[i] = -1.0f / (float)(B * T);
            const m1c_optim_step os = m1c_optim_step_of(m, state.t, it + 1, 1e-4f);
            m1c_overlap ovl = {m, optp, opt, n_state, os, NULL};
            if (!rc) rc = overlap ? m1c_backward_overlapped(&ovl, &r, e) : m1c_model_backward(m, &r, e);
            if (!rc && !overlap && M1C_OPTIMIZER(optp)->step(opt, &os)) rc = m1c_plugin_fail(optp, e, "step");
        }
        m1c_dev_sync(m->device);
        double dt = (m1c_now() - t0) / steps;
        /* the periods between the timed steps' forwards: their spread and median beside the mean */
        int np = 0;
        for (int it = 3; it < steps + 2 && !rc; it++) period[np++] = (fwd_end[it] - fwd_end[it - 1]) * 1e3;
        if (np > 0) qsort(period, (size_t)np, sizeof *period, cmp_double);
        if (!rc && bo->profile) {
            /* One more step with every component synchronised and timed. */
            r.profile = 1;
            double t1 = m1c_now();
            rc = m1c_model_forward(m, &r, tok, e);
            if (!rc) rc = m1c_model_backward(m, &r, e);
            m1c_dev_sync(m->device);
            double tp = m1c_now() - t1;
            printf("\nprofile of one step of %s (%.1f ms synchronised):\n%-12s %10s %10s\n", name, tp * 1e3,
                   "component", "fwd ms", "bwd ms");
            for (int i = 0; i < r.prof_n; i++)
                printf("%-12s %10.2f %10.2f\n", r.prof_name[i], r.prof_fwd[i] * 1e3, r.prof_bwd[i] * 1e3);
            r.profile = 0;
        }
        m1c_plan p;
        double flops = 0;
        /* Training FLOPs per token at the mean position of a sequence (attention grows with it). */
        if (!rc) rc = m1c_plan_compute(&s, T / 2, &p, e);
        if (!rc) flops = p.flops_train;
        m1c_plan_free(&p);
        char dev[128];
        double peak = m1c_dev_peak_flops(m->device, m->compute_dtype, dev, sizeof dev);
        *out = (result){name,
                        (int)B,
                        (int)T,
                        m1c_model_param_count(m),
                        (double)(B * T) / dt,
                        dt * 1e3,
                        flops * (double)(B * T) / dt * 1e-9,
                        peak > 0 ? flops * (double)(B * T) / dt / peak : 0,
                        np,
                        np > 0 ? period[0] : 0,
                        np > 0 ? (period[(np - 1) / 2] + period[np / 2]) / 2 : 0,
                        np > 0 ? period[np - 1] : 0};
    }
    free(tok);
    free(mask);
    free(fwd_end);
    free(period);
    if (r.attn) m1c_run_free(&r, m);
    m1c_arena_free(&state);
    if (opt) M1C_OPTIMIZER(optp)->destroy(opt);
    if (empty) m1c_config_free(empty);
    s.cfg = NULL; /* owned by the caller */
    m1c_session_close(&s);
    return rc;
}

int main(int argc, char **argv) {
    int threads = 0, n = 0, cuda = 0, head = -1;
    bench_opts bo = {10, M1C_DEVICE_CPU, 0, -1, 0, 0};
    const char *configs[16];
    static const char *const devices[] = {"cpu", "cuda", NULL}, *const precisions[] = {"fp32", "bf16", NULL};
    static const char *const heads[] = {"fp32", "tf32", "bf16", "tf32x3", NULL}; /* the order of m1c_head_precision */
    const bench_flag flags[] = {bf_int("--steps", &bo.steps, 1, 1000000),
                                bf_int("--threads", &threads, 0, 4096),
                                bf_choice("--device", &cuda, devices),
                                bf_choice("--precision", &bo.precision, precisions),
                                bf_choice("--head", &head, heads),
                                bf_switch("--profile", &bo.profile),
                                bf_switch("--sequential-optimizer", &bo.sequential)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0],
                    "usage: m1c_bench_train [--steps N] [--threads N] [--device cpu|cuda] [--precision fp32|bf16] "
                    "[--head fp32|tf32|bf16|tf32x3] [--profile] [--sequential-optimizer] [CONFIG ...] (16 at most)",
                    configs, &n, 16))
        return 1;
    bo.device = cuda ? M1C_DEVICE_CUDA : M1C_DEVICE_CPU;
    if (head >= 0) bo.head = head;
    int steps = bo.steps;
    if (bo.device == M1C_DEVICE_CUDA && !m1c_dev_available(M1C_DEVICE_CUDA)) {
        fprintf(stderr, "m1c_bench_train: no CUDA device in this build or on this machine\n");
        return 1;
    }
    if (n == 0 && bo.device == M1C_DEVICE_CPU) configs[n++] = M1C_SOURCE_DIR "/configs/tiny.cfg";
    m1c_set_threads(threads);
    result res[17];
    int nr = 0;
    m1c_err e = {{0}};
    for (int c = -1; c < n; c++) {
        m1c_config *cfg = NULL;
        int gpu = bo.device == M1C_DEVICE_CUDA;
        int rc = c < 0 ? m1c_config_parse(&cfg, gpu ? gpu_reference_cfg : reference_cfg, "reference-shape", NULL, NULL,
                                          0, &e)
                       : m1c_config_load(&cfg, configs[c], NULL, 0, &e);
        const char *label = gpu ? "GPU reference (H768, 8L 7:1, 8E top-2, V32K)" : "reference shape (H256, 8L 7:1, 4E top-2)";
        if (!rc) rc = bench(c < 0 ? label : configs[c], cfg, &bo, &res[nr], &e);
        if (cfg) m1c_config_free(cfg);
        if (rc) {
            fprintf(stderr, "m1c_bench_train: %s\n", e.msg);
            return 1;
        }
        nr++;
    }
    char dev[128];
    m1c_dev_peak_flops(bo.device, bo.precision ? M1C_BF16 : M1C_F32, dev, sizeof dev);
    printf("\n%s training step (forward + backward + AdamW), %s, %d timed steps%s\n", dev,
           bo.precision ? "bf16 mixed precision" : "fp32", steps, bo.device == M1C_DEVICE_CPU ? "" : "");
    printf("%-44s %6s %6s %10s %10s %10s %9s %6s\n", "model", "B", "T", "params", "ms/step", "tokens/s", "GFLOP/s",
           "MFU");
    for (int i = 0; i < nr; i++)
        printf("%-44s %6d %6d %10lld %10.1f %10.0f %9.1f %5.1f%%\n", res[i].name, res[i].B, res[i].T,
               (long long)res[i].params, res[i].ms, res[i].tok_s, res[i].gflops, 100 * res[i].mfu);
    for (int i = 0; i < nr; i++)
        if (res[i].np > 0)
            printf("step periods of %s (%d, one forward's end to the next's): min %.2f, median %.2f, max %.2f ms\n",
                   res[i].name, res[i].np, res[i].pmin, res[i].pmed, res[i].pmax);
    return 0;
}
