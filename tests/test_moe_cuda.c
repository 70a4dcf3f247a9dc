/* The MoE-slot plugins (topk, dense) on CUDA against their CPU reference, for compute dtypes F32 and
 * BF16 and every BF16 expert-GEMM path of topk (expert_gemm = "auto" / "cublas" / "grouped"): routing
 * (identical), forward, every gradient, statistics; jitter on the GPU; repeatability. Skipped where the
 * build has no CUDA or the machine has no GPU (but the settings test, which needs neither). */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/arena.h"
#include "../core/host.h"
#include "harness.h"

static void need_gpu(void) {
    if (!m1c_dev_available(M1C_DEVICE_CUDA)) cr_skip_test("no CUDA device in this build or on this machine");
}

static int find(const m1c_buf_spec *s, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(s[i].name, name) == 0) return i;
    cr_assert_fail("no buffer named '%s'", name);
    return -1;
}

/* A host copy of an activation (any dtype, any device): malloc'd bytes. */
static void *act_host(th_layer *l, const char *name) {
    const m1c_tensor *t = &l->acts[find(l->aspec, l->na, name)];
    size_t bytes = (size_t)m1c_numel(t) * m1c_dtype_size(t->dtype);
    void *p = malloc(bytes ? bytes : 1);
    m1c_dev_copy(M1C_DEVICE_CPU, p, l->device, t->data, bytes);
    return p;
}

static m1c_moe_stats stats_of(th_layer *l) {
    m1c_moe_stats st;
    cr_assert_eq(M1C_MOE(l->plugin)->stats(l->self, &l->bufs, &st), M1C_OK, "stats: %s", l->plugin->error);
    return st;
}

/* Expect |gpu - cpu| <= tol * (max|cpu| + |cpu|) elementwise: relative to the tensor's scale, so that
 * elements near zero (sums with cancellation) are judged against the size of what was summed. */
static void expect_close(const char *what, const float *gpu, const float *cpu, int64_t n, double tol) {
    double scale = th_max_abs(cpu, n);
    double err = th_rel_err(gpu, cpu, n, tol * scale + 1e-30, tol);
    cr_expect(err <= 1.0, "%s: GPU differs from CPU by %g x the tolerance %g (scale %g)", what, err, tol, scale);
}

/* Smallest log-probability gap between consecutive experts among the top k+1 of any token: routing
 * (choice and order of the k experts) cannot differ between two computations whose logits differ by
 * less than half of it. The GPU's f32 logits differ from the CPU's by ~1e-6 (summation order), so the
 * tests ask for a gap of 1e-4. */
static double order_margin(const float *p, int N, int E, int k) {
    double m = INFINITY;
    int *used = calloc((size_t)E, sizeof(int));
    for (int n = 0; n < N; n++) {
        memset(used, 0, (size_t)E * sizeof(int));
        double prev = -1;
        for (int j = 0; j <= k && j < E; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!used[e] && (best < 0 || p[n * E + e] > p[n * E + best])) best = e;
            used[best] = 1;
            if (prev > 0) m = fmin(m, log(prev / p[n * E + best]));
            prev = p[n * E + best];
        }
    }
    free(used);
    return m;
}

/* Tolerances (relative to each tensor's largest magnitude, see expect_close):
 * F32: the same operations as the CPU in another summation order (cuBLAS vs OpenBLAS, GPU expf vs
 *   glibc's): ~1e-6 per GEMM; 2e-5 for outputs (three chained GEMMs and the softmax), 5e-5 for
 *   gradients (two more GEMMs each, and sums over all tokens).
 * BF16: bf16 has 8 significand bits: one rounding to nearest is off by at most 2^-8 ~ 3.9e-3 of the
 *   value (~1.6e-3 rms for values spread over a binade). Rounded to bf16 are every expert GEMM operand
 *   (the input rows, the weights, the stored SwiGLU activation, in backward the d rows and d gate/up)
 *   and the GEMM outputs read by elementwise kernels (gate/up; the expert outputs Y, read by the combine
 *   and by the d weights dout . Y; d act, read by the SwiGLU backward; the d x rows, which the
 *   un-permute sums per token into din; topk.cu's header says why).
 *   Roundings a result carries (each a relative error of its factor; they add along a product):
 *   out: x, Wgu, gate/up, act, Wd, Y = 6; dWd: d rows + act's 4 = 5; din's router term and dWr, through
 *   the d weights dout . Y: Y's 6; dWgu: d rows, Wd, d act, the gate/up that the SwiGLU backward reads
 *   (with its x and Wgu: 3), d gate/up, and x = 8; din's d x row terms: the same 8 with Wgu for x, plus
 *   the d x row's own rounding before the un-permute adds a token's k rows (in f32) = 9. Even if all add
 *   up, errors stay below 6 x 3.9e-3 = 2.3e-2 (outputs) and 9 x 3.9e-3 = 3.5e-2 (gradients) of the
 *   tensor's scale; independent ones give ~sqrt(9) x 1.6e-3 ~ 5e-3. Sums over 2..1100 terms (din's k
 *   rows and router term, the GEMMs' reductions) of random sign do not make that grow relative to the
 *   sum's scale (the errors add like the terms). Hence 3e-2 for outputs and 5e-2 for gradients (room
 *   for the SwiGLU derivatives' factors ~1..2 on the gate side); making Y, d act and the d x rows bf16
 *   added one rounding to the chains through them, which stay within these (the worst-case bound 3.5e-2
 *   is still 1.4x below 5e-2, the typical ~5e-3 10x below). A wrong index or a missing term is off by
 *   O(1).
 * The router, its softmax and the aux loss are f32 from f32 inputs in both dtypes: 1e-5. */
#define TOL_ROUTER 1e-5
static double tol_out(int cdt) { return cdt == M1C_BF16 ? 3e-2 : 2e-5; }
static double tol_grad(int cdt) { return cdt == M1C_BF16 ? 5e-2 : 5e-5; }

/* ---- topk: settings ------------------------------------------------------------------------------- */

/* Create a topk instance from settings text on a device; returns the status (the instance, if any, is
 * destroyed) and leaves the plugin's error message in p->error. Needs no GPU: create touches none. */
static int try_create(const char *body, int device) {
    const m1c_layer_info info = {sizeof info, 0, 1, 16, device, device == M1C_DEVICE_CUDA ? M1C_BF16 : M1C_F32, 1, 0, 0, {0}};
    return th_try_create("topk", M1C_KIND_MOE, body, &info, NULL);
}

/* expert_gemm takes "auto", "cublas" and "grouped" (the CPU reads and ignores it, so one config serves
 * both devices); anything else is refused with a message naming the key. */
Test(topk_settings, expert_gemm) {
    m1c_plugin *p = th_plugin("topk", M1C_KIND_MOE);
    cr_expect_eq(try_create("expert_gemm = \"auto\";", M1C_DEVICE_CPU), M1C_OK, "auto refused: %s", p->error);
    cr_expect_eq(try_create("expert_gemm = \"cublas\";", M1C_DEVICE_CPU), M1C_OK, "cublas refused: %s", p->error);
    cr_expect_eq(try_create("expert_gemm = \"grouped\";", M1C_DEVICE_CPU), M1C_OK, "grouped refused: %s", p->error);
    cr_expect_eq(try_create("expert_gemm = \"fast\";", M1C_DEVICE_CPU), M1C_ERR);
    cr_expect(strstr(p->error, "expert_gemm") != NULL, "message should name expert_gemm: %s", p->error);
    cr_expect(strchr(p->error, '\n') == NULL, "one line: %s", p->error);
    cr_expect_eq(try_create("expert_gemm = 1;", M1C_DEVICE_CPU), M1C_ERR);
    cr_expect(strstr(p->error, "expert_gemm") != NULL, "message should name expert_gemm: %s", p->error);
}

/* The CUDA path's per-expert tables stop at 512 experts: more is refused at creation, naming the key. */
Test(topk_settings, cuda_expert_limit) {
    need_gpu(); /* a build without CUDA refuses the device itself */
    m1c_plugin *p = th_plugin("topk", M1C_KIND_MOE);
    cr_expect_eq(try_create("experts = 512; top_k = 2;", M1C_DEVICE_CUDA), M1C_OK, "512 refused: %s", p->error);
    cr_expect_eq(try_create("experts = 513; top_k = 2;", M1C_DEVICE_CUDA), M1C_ERR);
    cr_expect(strstr(p->error, "experts") != NULL, "message should name experts: %s", p->error);
}

/* ---- topk: GPU vs CPU ----------------------------------------------------------------------------- */

/* A comparison case: settings, experts E, top_k k, batch B x T, hidden H, seed; drops: the case must drop
 * assignments; skew: feature 0 of every token is 4 and the router's column 0 favours expert 0 (+1) and
 * shuns expert 1 (-10, a logit 40 below: it gets no token), so expert loads are uneven and one expert is
 * empty. */
typedef struct topk_case {
    const char *settings;
    int E, k, B, T, H;
    uint64_t seed;
    int drops, skew;
} topk_case;

/* The expert GEMMs (setting expert_gemm): the default (auto), or as named. F32 runs per expert whatever
 * the setting. */
enum { GEMM_DEFAULT, GEMM_CUBLAS, GEMM_GROUPED };
static th_text with_gemm(const char *settings, int gemm) {
    th_text t;
    const char *add = gemm == GEMM_GROUPED  ? " expert_gemm = \"grouped\";"
                      : gemm == GEMM_CUBLAS ? " expert_gemm = \"cublas\";"
                                            : "";
    int n = snprintf(t.s, sizeof t.s, "%s%s", settings, add);
    cr_assert(n > 0 && (size_t)n < sizeof t.s, "settings too long");
    return t;
}

static void compare_topk(const topk_case *tc, int cdt, int gemm) {
    need_gpu();
    const int E = tc->E, k = tc->k, B = tc->B, T = tc->T, H = tc->H, skew = tc->skew;
    const uint64_t seed = tc->seed;
    const int N = B * T;
    const int64_t NH = (int64_t)N * H;
    const th_text set = with_gemm(tc->settings, gemm);
    th_layer *c = th_layer_new("topk", set.s, 0, 1, H, B, T, seed, 0.3f);
    th_layer *g = th_layer_new_dev("topk", set.s, 0, 1, H, B, T, seed, 0.3f, M1C_DEVICE_CUDA, cdt);
    c->bufs.aux_scale = g->bufs.aux_scale = 0.7f; /* the aux gradient must carry this weight */
    if (skew) { /* the router (f32 on both devices) is parameter 0 */
        float *wr = c->params[0].data;
        for (int e = 0; e < E; e++) wr[(int64_t)e * H] = e == 0 ? 1.0f : e == 1 ? -10.0f : 0.0f;
        m1c_dev_copy(M1C_DEVICE_CUDA, g->params[0].data, M1C_DEVICE_CPU, wr, (size_t)E * H * sizeof(float));
    }

    /* Forward on the CPU; an input whose routing has no near-tie (GPU logits differ by ~1e-6). */
    float *x = NULL, *oc = th_zeros(NH);
    double margin = 0;
    for (int s = 0; s < 20 && margin <= 1e-4; s++) {
        free(x);
        x = th_randn(NH, seed * 100 + (uint64_t)s, 1.0f);
        if (skew)
            for (int n = 0; n < N; n++) x[(int64_t)n * H] = 4.0f;
        th_forward(c, oc, x);
        margin = order_margin(c->acts[find(c->aspec, c->na, "moe.probs")].data, N, E, k);
    }
    cr_assert(margin > 1e-4, "routing near-tie (log gap %g): pick another seed", margin);

    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, oc, NH);
    th_forward(g, od, xd);
    float *og = th_to_host(M1C_DEVICE_CUDA, od, NH);

    /* Routing: the same experts in the same order, the same kept rows (same permuted positions). */
    int32_t *idc = c->acts[find(c->aspec, c->na, "moe.topk_idx")].data, *idg = act_host(g, "moe.topk_idx");
    int32_t *pc = c->acts[find(c->aspec, c->na, "moe.pos")].data, *pg = act_host(g, "moe.pos");
    cr_expect(memcmp(idc, idg, sizeof(int32_t) * N * k) == 0, "GPU routing differs from the CPU's");
    cr_expect(memcmp(pc, pg, sizeof(int32_t) * N * k) == 0, "GPU row positions (capacity, sort) differ");
    float *prg = act_host(g, "moe.probs"), *wg = act_host(g, "moe.topk_w");
    expect_close("probs", prg, c->acts[find(c->aspec, c->na, "moe.probs")].data, (int64_t)N * E, TOL_ROUTER);
    expect_close("weights", wg, c->acts[find(c->aspec, c->na, "moe.topk_w")].data, (int64_t)N * k, TOL_ROUTER);
    expect_close("out", og, oc, NH, tol_out(cdt));

    /* Statistics. */
    m1c_moe_stats sc = stats_of(c), sg = stats_of(g);
    cr_expect(fabs(sg.aux_loss - sc.aux_loss) <= TOL_ROUTER * fabs(sc.aux_loss) + 1e-12, "aux %.9g vs CPU %.9g",
              sg.aux_loss, sc.aux_loss);
    cr_expect_eq(sg.dropped, sc.dropped, "dropped %lld vs CPU %lld", (long long)sg.dropped, (long long)sc.dropped);
    cr_expect_eq(sg.assignments, sc.assignments);
    cr_expect_eq(sg.n_experts, E);
    cr_assert_not_null(sg.expert_load);
    /* The same integer counts divided the same way: equal floats. */
    for (int e = 0; e < E; e++)
        cr_expect_eq(sg.expert_load[e], sc.expert_load[e], "expert_load[%d] %g vs CPU %g", e, sg.expert_load[e],
                     sc.expert_load[e]);
    if (tc->drops) cr_assert_gt(sc.dropped, 0, "this case is meant to drop assignments");
    if (skew) {
        cr_assert_eq(sc.expert_load[1], 0.0f, "this case is meant to leave expert 1 without tokens");
        cr_assert_gt(sc.expert_load[0], 1.5f / E, "this case is meant to load expert 0 unevenly");
    }

    /* Backward from zeroed gradients (accumulation is tested separately). */
    float *dout = th_randn(NH, seed + 7, 1.0f), *dinc = th_zeros(NH);
    float *doutd = th_to_dev(M1C_DEVICE_CUDA, dout, NH), *dind = th_to_dev(M1C_DEVICE_CUDA, dinc, NH);
    th_backward(c, dinc, dout, x);
    th_backward(g, dind, doutd, xd);
    float *ding = th_to_host(M1C_DEVICE_CUDA, dind, NH);
    expect_close("din", ding, dinc, NH, tol_grad(cdt));
    for (int p = 0; p < c->np; p++) {
        int64_t n = m1c_numel(&c->grads[p]);
        float *gg = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, n);
        expect_close(c->pspec[p].name, gg, c->grads[p].data, n, tol_grad(cdt));
        free(gg);
    }

    free(x), free(oc), free(og), free(idg), free(pg), free(prg), free(wg), free(dout), free(dinc), free(ding);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od), th_dev_free(M1C_DEVICE_CUDA, doutd);
    th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(c);
    th_layer_free(g);
}

/* Each case on F32, and on BF16 through each expert_gemm: the default ("auto": the Hopper kernels on an
 * sm_90a device where the sizes allow, per-expert cuBLAS otherwise), "cublas" and "grouped" (Criterion
 * runs each test in its own process). */
#define TOPK_TESTS(name, ...)                                                                            \
    static const topk_case name##_case = {__VA_ARGS__};                                                  \
    Test(topk_cuda, name##_f32) { compare_topk(&name##_case, M1C_F32, GEMM_DEFAULT); }                  \
    Test(topk_cuda, name##_bf16) { compare_topk(&name##_case, M1C_BF16, GEMM_DEFAULT); }                \
    Test(topk_cuda, name##_bf16_cublas) { compare_topk(&name##_case, M1C_BF16, GEMM_CUBLAS); }          \
    Test(topk_cuda, name##_bf16_grouped) { compare_topk(&name##_case, M1C_BF16, GEMM_GROUPED); }

#define TOP2 "experts = 4; top_k = 2; ffn_dim = 24; aux_coef = 0.01;"
#define TOP3 "experts = 5; top_k = 3; ffn_dim = 20; normalize = false; aux_coef = 0.01;"
/* capacity ceil(0.5 * 32 * 2 / 4) = 8 per expert for 64 assignments: at least 32 dropped */
#define CAPACITY "experts = 4; top_k = 2; ffn_dim = 16; capacity_factor = 0.5; aux_coef = 0.01;"
#define ODD "experts = 6; top_k = 2; ffn_dim = 40; aux_coef = 0.01;"
/* more experts than a warp and than FUSE_ROUTER_MAX_E on the CPU; many ranking blocks; two dWr chunks */
#define MANY "experts = 40; top_k = 4; ffn_dim = 8; aux_coef = 0.01; capacity_factor = 1.0;"

TOPK_TESTS(top2_of_4, TOP2, 4, 2, 2, 8, 32, 11, 0, 0)
TOPK_TESTS(top3_of_5_unnormalized, TOP3, 5, 3, 2, 8, 24, 12, 0, 0)
TOPK_TESTS(capacity_drops, CAPACITY, 4, 2, 4, 8, 16, 13, 1, 0)
TOPK_TESTS(odd_batch_3x37, ODD, 6, 2, 3, 37, 40, 14, 0, 0)
TOPK_TESTS(many_experts, MANY, 40, 4, 3, 37, 16, 15, 0, 0)
/* Uneven loads, an expert without tokens, and sizes that span several grouped-GEMM tiles (128 rows and
 * columns, K steps of 32) with partial edge tiles: 400 tokens, H 136, 2F 400. */
TOPK_TESTS(uneven_empty_expert, "experts = 4; top_k = 2; ffn_dim = 200; aux_coef = 0.01;", 4, 2, 4, 100, 136, 16, 0, 1)
/* 5000 tokens, top-2 of 8 with capacity: 10000 assignments over several ranking chunks (1024 each, the
 * last one partial), several aux partial-sum blocks (256 tokens each, the last one partial) and 79 dWr
 * chunks (64 tokens each), with drops (capacity ceil(0.9 * 10000 / 8) = 1125 per expert: at least
 * 10000 - 8 * 1125 = 1000 dropped). */
#define LARGE_CAP "experts = 8; top_k = 2; ffn_dim = 8; capacity_factor = 0.9; aux_coef = 0.01;"
TOPK_TESTS(large_capacity, LARGE_CAP, 8, 2, 2, 2500, 16, 17, 1, 0)
/* Sizes where no 16-byte access applies (H 30 and F 21: not multiples of 4), so every kernel takes its
 * element-by-element form, and the grouped GEMM its element loads. */
TOPK_TESTS(ragged_h30_f21, "experts = 6; top_k = 2; ffn_dim = 21; aux_coef = 0.01;", 6, 2, 3, 37, 30, 18, 0, 0)
/* H 36 and F 20: multiples of 4, not of 8: f32 rows take 16-byte accesses, bf16 rows (8 per 16 bytes)
 * do not (the gather into bf16, the BF16 SwiGLU and its backward with the bf16 d act, the grouped
 * GEMM's bf16 d act and d x row stores); the bf16 d rows take 8-byte stores, the bf16 expert outputs
 * 8-byte loads (combine, router backward), the bf16 d x rows 8-byte loads (un-permute). */
TOPK_TESTS(h36_f20, "experts = 5; top_k = 2; ffn_dim = 20; aux_coef = 0.01;", 5, 2, 2, 50, 36, 19, 0, 0)
/* H 1100: rows wider than one block of the dWr and un-permute kernels (256 threads x 4 columns), so
 * they run in two column blocks; the logits kernel's lanes stride 9 times over the row. */
TOPK_TESTS(wide_h1100, "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.01;", 4, 2, 2, 8, 1100, 20, 0, 0)
/* 300 experts (above a block of threads, not a multiple of the router kernels' 8-expert groups, near the
 * CUDA limit of 512): 1000 tokens give 2000 / 300 = 6 dWr chunks of partial sums (the scratch holds no
 * more), each of 167 tokens. */
TOPK_TESTS(experts_300, "experts = 300; top_k = 2; ffn_dim = 8; aux_coef = 0.01;", 300, 2, 4, 250, 20, 21, 0, 0)

/* Sizes that span several tiles of the Hopper products ("auto" on an sm_90a device, expert_wg.cuh;
 * per-expert cuBLAS elsewhere): uneven loads and an empty expert (row tiles of 128 ending inside an
 * expert, one expert with none; weight gradients over 64-row steps ending inside an expert), H 264
 * (down's and the d x rows' columns in a full and a partial tile of 256, K steps of 64 with a partial
 * last one), F 384 (gate/up's 768 columns in three tiles, d act's 384 in two). */
TOPK_TESTS(wg_uneven_empty_expert, "experts = 4; top_k = 2; ffn_dim = 384; aux_coef = 0.01;", 4, 2, 4, 100, 264, 23,
           0, 1)
/* ... with drops (capacity ceil(0.5 * 64 / 8) = 4: the kept rows end well before the buffer's), 8 experts
 * of a few rows each, H 72, F 128. */
TOPK_TESTS(wg_capacity_drops, "experts = 8; top_k = 2; ffn_dim = 128; capacity_factor = 0.5; aux_coef = 0.01;", 8,
           2, 4, 8, 72, 24, 1, 0)

/* F32 with "grouped" (which F32 ignores: per-expert calls). */
Test(topk_cuda, capacity_drops_f32_grouped_ignored) { compare_topk(&capacity_drops_case, M1C_F32, GEMM_GROUPED); }

/* The ranking at a size no routing comparison with the CPU can reach (300000 assignments: near-ties are
 * certain there): the GPU's own routing (idx) walked serially in token order on the host must give the
 * GPU's positions, row tokens, offsets and counts exactly; this spans more than 256 chunks, so the
 * per-expert scan over chunks runs in several tiles with a carry. The aux loss from the GPU's own
 * probabilities (double on the host) checks the multi-block partial sums. */
Test(topk_cuda, ranking_matches_serial_walk_large) {
    need_gpu();
    const int B = 3, T = 50000, H = 8, E = 8, k = 2, N = B * T;
    const int64_t NH = (int64_t)N * H, Nk = (int64_t)N * k;
    const double cf = 0.9, coef = 0.01;
    th_layer *g = th_layer_new_dev("topk", "experts = 8; top_k = 2; ffn_dim = 4; capacity_factor = 0.9; aux_coef = 0.01;",
                                   0, 1, H, B, T, 71, 0.3f, M1C_DEVICE_CUDA, M1C_BF16);
    float *x = th_randn(NH, 72, 1.0f), *z = th_zeros(NH);
    /* Skew: the router's column 0 favours expert 0 (+1) and feature 0 is 4 in the first half of the tokens,
     * so expert 0 gets nearly all of them (> 75000 assignments, capacity 33750): drops are certain. */
    for (int64_t n = 0; n < N / 2; n++) x[n * H] = 4.0f;
    float *wr = th_to_host(M1C_DEVICE_CUDA, g->params[0].data, (int64_t)E * H);
    for (int e = 0; e < E; e++) wr[(int64_t)e * H] = e == 0 ? 1.0f : 0.0f;
    m1c_dev_copy(M1C_DEVICE_CUDA, g->params[0].data, M1C_DEVICE_CPU, wr, (size_t)E * H * sizeof(float));
    free(wr);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    th_forward(g, od, xd);
    int32_t *idx = act_host(g, "moe.topk_idx"), *pos = act_host(g, "moe.pos"), *rowtok = act_host(g, "moe.row_token");
    int32_t *off = act_host(g, "moe.offsets");
    float *probs = act_host(g, "moe.probs");
    m1c_moe_stats st = stats_of(g);

    const int64_t cap = (int64_t)ceil(cf * N * k / E);
    int64_t routed[8] = {0}, kept[8], ref_off[9], dropped = 0;
    for (int64_t a = 0; a < Nk; a++) {
        cr_assert(idx[a] >= 0 && idx[a] < E, "idx[%lld] = %d", (long long)a, idx[a]);
        routed[idx[a]]++;
    }
    ref_off[0] = 0;
    for (int e = 0; e < E; e++) {
        kept[e] = routed[e] < cap ? routed[e] : cap;
        ref_off[e + 1] = ref_off[e] + kept[e];
        dropped += routed[e] - kept[e];
        cr_expect_eq(off[e + 1], ref_off[e + 1], "offsets[%d] %d vs %lld", e + 1, off[e + 1], (long long)ref_off[e + 1]);
        /* the same integer count divided the same way: equal floats */
        cr_expect_eq(st.expert_load[e], (float)((double)routed[e] / (double)Nk), "expert_load[%d]", e);
    }
    cr_assert_gt(dropped, 0, "this case is meant to drop assignments");
    cr_expect_eq(st.dropped, dropped, "dropped %lld vs %lld", (long long)st.dropped, (long long)dropped);
    cr_expect_eq(st.assignments, Nk);
    int64_t seen[8] = {0}, bad_pos = 0, bad_tok = 0;
    for (int64_t a = 0; a < Nk; a++) {
        const int e = idx[a];
        const int64_t rank = seen[e]++, want = rank < cap ? ref_off[e] + rank : -1;
        bad_pos += pos[a] != want;
        if (want >= 0) bad_tok += rowtok[want] != a / k;
    }
    cr_expect_eq(bad_pos, 0, "%lld of %lld positions differ from the serial walk", (long long)bad_pos, (long long)Nk);
    cr_expect_eq(bad_tok, 0, "%lld row tokens differ from the serial walk", (long long)bad_tok);

    double aux = 0;
    for (int e = 0; e < E; e++) {
        double P = 0;
        for (int64_t n = 0; n < N; n++) P += probs[n * E + e];
        aux += ((double)routed[e] / (double)Nk) * (P / N);
    }
    aux *= coef * E;
    /* 1e-9: both sums are in double (the GPU's in another order, ~1e-16 relative per term over 150000
     * terms) and the GPU hands the aux loss over as float hi + lo (~1e-14); a lost block is off by >1e-5. */
    cr_expect(fabs(st.aux_loss - aux) <= 1e-9 * fabs(aux), "aux %.15g vs %.15g from the GPU's probabilities",
              st.aux_loss, aux);
    free(x), free(z), free(idx), free(pos), free(rowtok), free(off), free(probs);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od);
    th_layer_free(g);
}

/* The router's probabilities over many blocks of the logits kernel (40002 tokens of H 256: 2501 blocks of 16
 * tokens, the last one partial) against the softmax of double logits from the same f32 input and router
 * weights. 2e-6: the GPU's f32 logits (|x| ~ 1, |Wr| ~ 0.3, 256 terms: sums ~5 carrying ~256 roundings of
 * ~3e-7 relative, so ~1e-6 absolute at worst) move each probability by at most that much; a token that
 * got another token's logits is off by ~0.1. */
Test(topk_cuda, router_probs_match_double_reference_long) {
    need_gpu();
    const int B = 2, T = 20001, H = 256, E = 8, N = B * T;
    const int64_t NH = (int64_t)N * H;
    th_layer *g = th_layer_new_dev("topk", "experts = 8; top_k = 2; ffn_dim = 8; aux_coef = 0.01;", 0, 1, H, B, T, 81,
                                   0.3f, M1C_DEVICE_CUDA, M1C_BF16);
    float *x = th_randn(NH, 82, 1.0f), *z = th_zeros(NH);
    float *wr = th_to_host(M1C_DEVICE_CUDA, g->params[0].data, (int64_t)E * H);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    th_forward(g, od, xd);
    float *probs = act_host(g, "moe.probs");
    double worst = 0;
    int64_t worst_n = 0;
    for (int64_t n = 0; n < N; n++) {
        double lg[8], mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            double acc = 0;
            for (int c = 0; c < H; c++) acc += (double)x[n * H + c] * wr[(int64_t)e * H + c];
            lg[e] = acc, mx = fmax(mx, acc);
        }
        for (int e = 0; e < E; e++) sum += exp(lg[e] - mx);
        for (int e = 0; e < E; e++) {
            const double d = fabs(probs[n * E + e] - exp(lg[e] - mx) / sum);
            if (!(d <= worst)) worst = d, worst_n = n;
        }
    }
    cr_expect(worst <= 2e-6, "router probabilities: largest difference %g (token %lld of %d)", worst,
              (long long)worst_n, N);
    free(x), free(z), free(wr), free(probs);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od);
    th_layer_free(g);
}

/* Gradients accumulate (+=): a second backward doubles din and every parameter gradient. 200 tokens
 * with jitter: dWr goes through 4 chunks of partial sums (64 tokens each) and their ordered sum, din
 * through the un-permute with the router's term times the noise. */
static void backward_accumulates(int cdt, int gemm) {
    need_gpu();
    const int B = 2, T = 100, H = 16, N = B * T;
    const int64_t NH = (int64_t)N * H;
    const th_text set = with_gemm(CAPACITY " jitter = 0.2;", gemm);
    th_layer *g = th_layer_new_dev("topk", set.s, 0, 1, H, B, T, 21, 0.3f, M1C_DEVICE_CUDA, cdt);
    float *x = th_randn(NH, 22, 1.0f), *dout = th_randn(NH, 23, 1.0f), *z = th_zeros(NH);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    float *doutd = th_to_dev(M1C_DEVICE_CUDA, dout, NH), *dind = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    th_forward(g, od, xd);
    th_backward(g, dind, doutd, xd);
    float *d1 = th_to_host(M1C_DEVICE_CUDA, dind, NH);
    float *g1[3];
    for (int p = 0; p < g->np; p++) g1[p] = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, m1c_numel(&g->grads[p]));
    th_backward(g, dind, doutd, xd);
    float *d2 = th_to_host(M1C_DEVICE_CUDA, dind, NH);
    for (int64_t i = 0; i < NH; i++) d1[i] *= 2.0f;
    /* 1e-6: the second pass recomputes the same values (deterministic kernels and cuBLAS); din's sum
     * is re-associated across the two calls, one rounding. */
    expect_close("din after two backwards", d2, d1, NH, 1e-6);
    for (int p = 0; p < g->np; p++) {
        int64_t n = m1c_numel(&g->grads[p]);
        float *g2 = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, n);
        for (int64_t i = 0; i < n; i++) g1[p][i] *= 2.0f;
        expect_close(g->pspec[p].name, g2, g1[p], n, 1e-6);
        cr_expect_gt(th_max_abs(g1[p], n), 0.0, "%s: no gradient at all", g->pspec[p].name);
        free(g2), free(g1[p]);
    }
    free(x), free(dout), free(z), free(d1), free(d2);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od), th_dev_free(M1C_DEVICE_CUDA, doutd);
    th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(g);
}
Test(topk_cuda, backward_accumulates_f32) { backward_accumulates(M1C_F32, GEMM_DEFAULT); }
Test(topk_cuda, backward_accumulates_bf16) { backward_accumulates(M1C_BF16, GEMM_DEFAULT); }
Test(topk_cuda, backward_accumulates_bf16_grouped) { backward_accumulates(M1C_BF16, GEMM_GROUPED); }

/* The per-expert path copies the expert offsets and counts to the host in its forward and the backward
 * of the same run reuses them (no second wait). A forward of another run in between (other activation
 * buffers, other tokens, so other offsets) must not leak into that backward: din and the gradients equal
 * those of the backward right after its own forward. A backward for fewer tokens than its forward is
 * refused. */
Test(topk_cuda, backward_uses_its_own_forward_offsets) {
    need_gpu();
    const int B = 2, T = 100, H = 16, N = B * T;
    const int64_t NH = (int64_t)N * H;
    th_layer *g = th_layer_new_dev("topk", CAPACITY, 0, 1, H, B, T, 31, 0.3f, M1C_DEVICE_CUDA, M1C_BF16);
    float *x = th_randn(NH, 32, 1.0f), *x2 = th_randn(NH, 33, 1.0f), *dout = th_randn(NH, 34, 1.0f);
    float *z = th_zeros(NH);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *x2d = th_to_dev(M1C_DEVICE_CUDA, x2, NH);
    float *od = th_to_dev(M1C_DEVICE_CUDA, z, NH), *doutd = th_to_dev(M1C_DEVICE_CUDA, dout, NH);
    float *dind = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    /* the reference: forward, then backward */
    th_forward(g, od, xd);
    th_backward(g, dind, doutd, xd);
    float *ref[4];
    ref[0] = th_to_host(M1C_DEVICE_CUDA, dind, NH);
    for (int p = 0; p < 3; p++) ref[1 + p] = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, m1c_numel(&g->grads[p]));
    /* again, with another run's forward (its own activations) between the forward and the backward */
    m1c_tensor *acts = g->bufs.acts, *other = calloc((size_t)g->na, sizeof *other);
    for (int i = 0; i < g->na; i++) {
        other[i] = acts[i];
        const size_t bytes = (size_t)m1c_numel(&acts[i]) * m1c_dtype_size(acts[i].dtype);
        other[i].data = m1c_dev_alloc(M1C_DEVICE_CUDA, bytes ? bytes : 1);
        cr_assert_not_null(other[i].data);
    }
    th_layer_zero_grads(g);
    m1c_dev_copy(M1C_DEVICE_CUDA, dind, M1C_DEVICE_CPU, z, (size_t)NH * sizeof(float));
    th_forward(g, od, xd);
    g->bufs.acts = other;
    th_forward(g, od, x2d);
    g->bufs.acts = acts;
    th_backward(g, dind, doutd, xd);
    float *got = th_to_host(M1C_DEVICE_CUDA, dind, NH);
    cr_expect(memcmp(got, ref[0], (size_t)NH * sizeof(float)) == 0, "din took the other run's offsets");
    free(got);
    for (int p = 0; p < 3; p++) {
        const int64_t n = m1c_numel(&g->grads[p]);
        float *gp = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, n);
        cr_expect(memcmp(gp, ref[1 + p], (size_t)n * sizeof(float)) == 0, "%s took the other run's offsets",
                  g->pspec[p].name);
        free(gp), free(ref[1 + p]);
    }
    /* fewer tokens than the forward: refused, naming both counts */
    th_forward(g, od, xd);
    cr_assert_eq(g->ops->backward(g->self, &g->bufs, dind, doutd, xd, 1, T), M1C_ERR);
    cr_expect(strstr(g->plugin->error, "backward for 100 tokens after a forward of 200") != NULL, "%s",
              g->plugin->error);
    for (int i = 0; i < g->na; i++) m1c_dev_free(M1C_DEVICE_CUDA, other[i].data);
    free(other), free(ref[0]), free(x), free(x2), free(dout), free(z);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, x2d), th_dev_free(M1C_DEVICE_CUDA, od);
    th_dev_free(M1C_DEVICE_CUDA, doutd), th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(g);
}

/* Repeatable bit for bit: two forward + backward passes from zeroed gradients give the same output,
 * din and parameter gradients. The BF16 grouped path runs only this plugin's kernels (no cuBLAS, whose
 * reproducibility is its own affair), every one with a fixed reduction order and no float atomics; 5000
 * tokens with jitter and drops span many ranking, aux and dWr chunks. */
Test(topk_cuda, repeatable_bf16_grouped) {
    need_gpu();
    const int B = 2, T = 2500, H = 16, N = B * T;
    const int64_t NH = (int64_t)N * H;
    const th_text set = with_gemm(LARGE_CAP " jitter = 0.1;", GEMM_GROUPED);
    th_layer *g = th_layer_new_dev("topk", set.s, 0, 1, H, B, T, 81, 0.3f, M1C_DEVICE_CUDA, M1C_BF16);
    float *x = th_randn(NH, 82, 1.0f), *dout = th_randn(NH, 83, 1.0f), *z = th_zeros(NH);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    float *doutd = th_to_dev(M1C_DEVICE_CUDA, dout, NH), *dind = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    float *res[2][5]; /* out, din, the three gradients */
    for (int run = 0; run < 2; run++) {
        th_layer_zero_grads(g);
        m1c_dev_copy(M1C_DEVICE_CUDA, dind, M1C_DEVICE_CPU, z, (size_t)NH * sizeof(float));
        th_forward(g, od, xd);
        th_backward(g, dind, doutd, xd);
        res[run][0] = th_to_host(M1C_DEVICE_CUDA, od, NH);
        res[run][1] = th_to_host(M1C_DEVICE_CUDA, dind, NH);
        for (int p = 0; p < 3; p++)
            res[run][2 + p] = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, m1c_numel(&g->grads[p]));
    }
    cr_assert_eq(g->np, 3);
    cr_expect_gt(stats_of(g).dropped, 0, "this case is meant to drop assignments");
    const char *what[5] = {"out", "din", g->pspec[0].name, g->pspec[1].name, g->pspec[2].name};
    for (int i = 0; i < 5; i++) {
        const int64_t n = i < 2 ? NH : m1c_numel(&g->grads[i - 2]);
        cr_expect(memcmp(res[0][i], res[1][i], (size_t)n * sizeof(float)) == 0, "%s differs between two runs", what[i]);
        cr_expect_gt(th_max_abs(res[0][i], n), 0.0, "%s: all zero", what[i]);
        free(res[0][i]), free(res[1][i]);
    }
    free(x), free(dout), free(z);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od), th_dev_free(M1C_DEVICE_CUDA, doutd);
    th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(g);
}

/* ---- topk: jitter on the GPU ---------------------------------------------------------------------- */

/* Evaluation ignores the jitter: GPU (jitter set, training 0) equals the CPU (training 0). */
Test(topk_cuda, jitter_off_in_eval) {
    need_gpu();
    const char *set = "experts = 5; top_k = 2; ffn_dim = 12; jitter = 0.3;";
    const int B = 2, T = 8, H = 16, N = B * T;
    const int64_t NH = (int64_t)N * H;
    th_layer *c = th_layer_new("topk", set, 0, 1, H, B, T, 31, 0.3f);
    th_layer *g = th_layer_new_dev("topk", set, 0, 1, H, B, T, 31, 0.3f, M1C_DEVICE_CUDA, M1C_F32);
    c->bufs.training = g->bufs.training = 0;
    float *x = th_randn(NH, 32, 1.0f), *oc = th_zeros(NH);
    th_forward(c, oc, x);
    cr_assert(order_margin(c->acts[find(c->aspec, c->na, "moe.probs")].data, N, 5, 2) > 1e-4, "near-tie: reseed");
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, oc, NH);
    th_forward(g, od, xd);
    float *og = th_to_host(M1C_DEVICE_CUDA, od, NH);
    expect_close("eval out with jitter set", og, oc, NH, tol_out(M1C_F32));
    free(x), free(oc), free(og);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od);
    th_layer_free(c);
    th_layer_free(g);
}

/* Training: the noise lies in [1-j, 1+j], repeats for one noise_seed, changes with it, and the router
 * probabilities are softmax((x * noise) Wr^T) (computed here in double). */
Test(topk_cuda, jitter_noise_and_router) {
    need_gpu();
    const int B = 2, T = 8, H = 16, N = B * T, E = 5;
    const int64_t NH = (int64_t)N * H;
    th_layer *g = th_layer_new_dev("topk", "experts = 5; top_k = 2; ffn_dim = 12; jitter = 0.3;", 0, 1, H, B, T, 41,
                                   0.3f, M1C_DEVICE_CUDA, M1C_F32);
    float *x = th_randn(NH, 42, 1.0f), *z = th_zeros(NH);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    th_forward(g, od, xd);
    float *o1 = th_to_host(M1C_DEVICE_CUDA, od, NH), *noise = act_host(g, "moe.jitter"), *p = act_host(g, "moe.probs");
    th_forward(g, od, xd);
    float *o2 = th_to_host(M1C_DEVICE_CUDA, od, NH), *noise2 = act_host(g, "moe.jitter");
    cr_expect(memcmp(o1, o2, sizeof(float) * NH) == 0, "jitter not reproducible for one noise_seed");
    cr_expect(memcmp(noise, noise2, sizeof(float) * NH) == 0);
    double lo = 2, hi = 0;
    for (int64_t i = 0; i < NH; i++) lo = fmin(lo, noise[i]), hi = fmax(hi, noise[i]);
    cr_expect(lo >= 0.7f && hi <= 1.3f, "noise range [%g, %g] outside [0.7, 1.3]", lo, hi);
    cr_expect(hi - lo > 0.5, "noise range [%g, %g] too narrow for U(0.7, 1.3) over 256 draws", lo, hi);

    float *Wr = th_to_host(M1C_DEVICE_CUDA, g->params[0].data, (int64_t)E * H);
    float *ref = malloc(sizeof(float) * N * E);
    for (int n = 0; n < N; n++) {
        double l[5], mx = -INFINITY, s = 0;
        for (int e = 0; e < E; e++) {
            l[e] = 0;
            for (int i = 0; i < H; i++) l[e] += (double)x[n * H + i] * noise[n * H + i] * Wr[e * H + i];
            mx = fmax(mx, l[e]);
        }
        for (int e = 0; e < E; e++) s += exp(l[e] - mx);
        for (int e = 0; e < E; e++) ref[n * E + e] = (float)(exp(l[e] - mx) / s);
    }
    /* 1e-5: an f32 GEMM over 16 terms and an f32 softmax against double */
    expect_close("jittered probs", p, ref, (int64_t)N * E, 1e-5);

    g->bufs.noise_seed ^= 0x1234;
    th_forward(g, od, xd);
    float *noise3 = act_host(g, "moe.jitter");
    cr_expect(memcmp(noise, noise3, sizeof(float) * NH) != 0, "noise ignores noise_seed");
    free(x), free(z), free(o1), free(o2), free(noise), free(noise2), free(noise3), free(p), free(Wr), free(ref);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od);
    th_layer_free(g);
}

/* L = sum(out * w) + aux_scale * aux on the GPU, in double on the host. */
static double gpu_loss(th_layer *g, const float *x, const float *w, int64_t n) {
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, n), *od = th_to_dev(M1C_DEVICE_CUDA, w, n);
    th_forward(g, od, xd);
    float *o = th_to_host(M1C_DEVICE_CUDA, od, n);
    double s = (double)g->bufs.aux_scale * stats_of(g).aux_loss;
    for (int64_t i = 0; i < n; i++) s += (double)o[i] * w[i];
    free(o);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od);
    return s;
}

static void dev_set(float *base, int64_t i, float v) { m1c_dev_copy(M1C_DEVICE_CUDA, base + i, M1C_DEVICE_CPU, &v, 4); }

/* With jitter the GPU's noise is not the CPU's, so its gradient is checked by central differences (the
 * forward is deterministic for a fixed noise_seed): input and every parameter, aux loss included. */
Test(topk_cuda, jitter_fd_gradients) {
    need_gpu();
    const int B = 2, T = 3, H = 8, E = 4, k = 2, N = B * T;
    const int64_t NH = (int64_t)N * H;
    const float eps = 1e-2f;
    th_layer *g = th_layer_new_dev("topk", "experts = 4; top_k = 2; ffn_dim = 8; aux_coef = 0.05; jitter = 0.1;", 0,
                                   1, H, B, T, 51, 0.3f, M1C_DEVICE_CUDA, M1C_F32);
    g->bufs.aux_scale = 0.7f;
    float *w = th_randn(NH, 52, 1.0f), *x = NULL;
    float *Wr = th_to_host(M1C_DEVICE_CUDA, g->params[0].data, (int64_t)E * H);
    /* No routing flip under a perturbation of eps: a logit moves by at most eps * 1.1 * max(|x|, |Wr|)
     * (as in test_moe.c's fd_gradients); take the first input whose top-k gap is above twice that. */
    double margin = 0, bound = 0;
    for (int s = 0; s < 50 && margin <= bound; s++) {
        free(x);
        x = th_randn(NH, 530 + (uint64_t)s, 1.0f);
        gpu_loss(g, x, w, NH);
        float *p = act_host(g, "moe.probs");
        margin = order_margin(p, N, E, k);
        free(p);
        bound = 2 * eps * 1.1 * fmax(th_max_abs(x, NH), th_max_abs(Wr, (int64_t)E * H));
    }
    cr_assert(margin > bound, "routing margin %g <= %g: a perturbation could flip the top-k", margin, bound);

    /* Analytic gradients. */
    th_layer_zero_grads(g);
    float *z = th_zeros(NH);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    float *wd = th_to_dev(M1C_DEVICE_CUDA, w, NH), *dind = th_to_dev(M1C_DEVICE_CUDA, z, NH);
    th_forward(g, od, xd);
    th_backward(g, dind, wd, xd);
    float *din = th_to_host(M1C_DEVICE_CUDA, dind, NH);

    double worst = 0;
    for (int s = 0; s < 12; s++) {
        int64_t i = (s * 7919) % NH;
        float x0 = x[i];
        x[i] = x0 + eps;
        double lp = gpu_loss(g, x, w, NH);
        x[i] = x0 - eps;
        double lm = gpu_loss(g, x, w, NH);
        x[i] = x0;
        double num = (lp - lm) / (2.0 * eps), r = fabs(din[i] - num) / fmax(1e-3, fabs(din[i]) + fabs(num));
        if (r > worst) cr_log_info("fd input[%ld]: analytic %g numeric %g", (long)i, din[i], num);
        worst = fmax(worst, r);
    }
    for (int p = 0; p < g->np; p++) {
        int64_t n = m1c_numel(&g->params[p]);
        float *pv = th_to_host(M1C_DEVICE_CUDA, g->params[p].data, n), *gv = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, n);
        for (int s = 0; s < 12; s++) {
            int64_t i = (s * 7919 + 13) % n;
            dev_set(g->params[p].data, i, pv[i] + eps);
            double lp = gpu_loss(g, x, w, NH);
            dev_set(g->params[p].data, i, pv[i] - eps);
            double lm = gpu_loss(g, x, w, NH);
            dev_set(g->params[p].data, i, pv[i]);
            double num = (lp - lm) / (2.0 * eps), r = fabs(gv[i] - num) / fmax(1e-3, fabs(gv[i]) + fabs(num));
            if (r > worst) cr_log_info("fd %s[%ld]: analytic %g numeric %g", g->pspec[p].name, (long)i, gv[i], num);
            worst = fmax(worst, r);
        }
        free(pv), free(gv);
    }
    /* 2e-2: central differences with eps = 1e-2 on an FP32 forward: O(eps^2) truncation plus ~1e-6/eps
     * rounding, relative to max(1e-3, |a| + |n|); a wrong term is off by O(1). */
    cr_expect(worst < 2e-2, "GPU topk FD relative error %g", worst);
    free(w), free(x), free(Wr), free(z), free(din);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od), th_dev_free(M1C_DEVICE_CUDA, wd);
    th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(g);
}

/* ---- dense: GPU vs CPU ---------------------------------------------------------------------------- */

static void compare_dense(int cdt) {
    need_gpu();
    const char *set = "ffn_dim = 56;";
    const int B = 3, T = 37, H = 40;
    const int64_t NH = (int64_t)B * T * H;
    th_layer *c = th_layer_new("dense", set, 0, 1, H, B, T, 61, 0.2f);
    th_layer *g = th_layer_new_dev("dense", set, 0, 1, H, B, T, 61, 0.2f, M1C_DEVICE_CUDA, cdt);
    float *x = th_randn(NH, 62, 1.0f), *oc = th_zeros(NH), *dout = th_randn(NH, 63, 1.0f);
    /* din starts non-zero on both sides: backward must add to it */
    float *dinc = th_randn(NH, 64, 1.0f);
    float *xd = th_to_dev(M1C_DEVICE_CUDA, x, NH), *od = th_to_dev(M1C_DEVICE_CUDA, oc, NH);
    float *doutd = th_to_dev(M1C_DEVICE_CUDA, dout, NH), *dind = th_to_dev(M1C_DEVICE_CUDA, dinc, NH);
    th_forward(c, oc, x);
    th_forward(g, od, xd);
    float *og = th_to_host(M1C_DEVICE_CUDA, od, NH);
    expect_close("dense out", og, oc, NH, tol_out(cdt));
    th_backward(c, dinc, dout, x);
    th_backward(g, dind, doutd, xd);
    float *ding = th_to_host(M1C_DEVICE_CUDA, dind, NH), *din0 = th_randn(NH, 64, 1.0f);
    /* Compare what backward added (the prefill subtracted: exact to an ulp of it, ~2e-7). */
    for (int64_t i = 0; i < NH; i++) ding[i] -= din0[i], dinc[i] -= din0[i];
    expect_close("dense din", ding, dinc, NH, tol_grad(cdt));
    free(din0);
    for (int p = 0; p < c->np; p++) {
        int64_t n = m1c_numel(&c->grads[p]);
        float *gg = th_to_host(M1C_DEVICE_CUDA, g->grads[p].data, n);
        expect_close(c->pspec[p].name, gg, c->grads[p].data, n, tol_grad(cdt));
        free(gg);
    }
    m1c_moe_stats st = stats_of(g);
    cr_expect(st.aux_loss == 0.0 && st.assignments == 0 && st.expert_load == NULL);
    free(x), free(oc), free(dout), free(dinc), free(og), free(ding);
    th_dev_free(M1C_DEVICE_CUDA, xd), th_dev_free(M1C_DEVICE_CUDA, od), th_dev_free(M1C_DEVICE_CUDA, doutd);
    th_dev_free(M1C_DEVICE_CUDA, dind);
    th_layer_free(c);
    th_layer_free(g);
}

Test(dense_cuda, matches_cpu_f32) { compare_dense(M1C_F32); }
Test(dense_cuda, matches_cpu_bf16) { compare_dense(M1C_BF16); }
