/* Hugging Face parity and interchange: m1c against fixtures made by transformers
 * (tools/hf_reference.py -> tests/fixtures/<name>/: logits, greedy tokens, loss and gradients), the
 * import -> export round trip (same bytes), the CLI's --hf modes, and the refusals of what m1c cannot
 * reproduce. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/checkpoint.h"
#include "../core/hf.h"
#include "../core/host.h"
#include "../core/model.h"
#include "../core/npy.h"
#include "../core/safetensors.h"
#include "../core/session.h"
#include "harness.h"

#define FIXTURES M1C_SOURCE_DIR "/tests/fixtures/"

/* ---- helpers ---------------------------------------------------------------------------------- */

/* Each test's scratch folder (th_tmpdir): made by the suite's init, removed by its fini. */
static void setup(void) {
    th_tmpdir_init("hf");
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
}

TestSuite(hf, .init = setup, .fini = th_tmpdir_fini);

/* The fixture folder of `name`, or a skipped test when tools/hf_reference.py has not been run. */
static char *fixture(const char *name) {
    static const char *const files[] = {"config.json", "model.safetensors", "input_ids.npy", "logits.npy",
                                        "greedy.npy",  "labels.npy",        "loss.json",     "grads.safetensors",
                                        NULL};
    char *dir = m1c_xasprintf(FIXTURES "%s", name);
    for (int i = 0; files[i]; i++) {
        char *p = m1c_path_join(dir, files[i]);
        int ok = m1c_file_exists(p);
        free(p);
        if (!ok) {
            free(dir);
            cr_skip_test("fixtures missing: run tools/hf_reference.py (tests/fixtures/%s/%s)", name, files[i]);
        }
    }
    return dir;
}

static m1c_npy read_npy(const char *dir, const char *file) {
    char *p = m1c_path_join(dir, file);
    m1c_npy a = {0};
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(p, &a, &e), M1C_OK, "%s", e.msg);
    free(p);
    return a;
}

/* Token ids of an .npy file as int32 [B, T]. */
static int32_t *read_ids(const char *dir, const char *file, int *B, int *T) {
    m1c_npy a = read_npy(dir, file);
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_to_i32(&a, file, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.ndim, 2);
    *B = (int)a.shape[0], *T = (int)a.shape[1];
    int32_t *ids = m1c_xmalloc((size_t)a.numel * sizeof *ids);
    memcpy(ids, a.data, (size_t)a.numel * sizeof *ids);
    m1c_npy_free(&a);
    return ids;
}

static void open_hf_on(m1c_session *s, const char *dir, int device) {
    m1c_err e = {{0}};
    const char *gpu[] = {"run.device=\"cuda\""};
    int rc = m1c_hf_open(s, dir, device == M1C_DEVICE_CUDA ? gpu : NULL, device == M1C_DEVICE_CUDA, &e);
    cr_assert_eq(rc, M1C_OK, "%s", e.msg);
}

static void open_hf(m1c_session *s, const char *dir) { open_hf_on(s, dir, M1C_DEVICE_CPU); }

/* Logits (B*T, V) of a full forward over ids (B, T). */
static float *forward_logits(m1c_model *m, const int32_t *ids, int B, int T) {
    int32_t *tokens = m1c_xmalloc((size_t)B * (T + 1) * sizeof *tokens);
    for (int b = 0; b < B; b++) {
        memcpy(tokens + (int64_t)b * (T + 1), ids + (int64_t)b * T, (size_t)T * sizeof *tokens);
        tokens[(int64_t)b * (T + 1) + T] = -1;
    }
    m1c_run r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_run_init(&r, m, B, T, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_model_forward(m, &r, tokens, &e), M1C_OK, "%s", e.msg);
    float *out = m1c_xmalloc((size_t)B * T * m->V * sizeof *out);
    m1c_dev_copy(M1C_DEVICE_CPU, out, m->device, r.logits, (size_t)B * T * m->V * sizeof *out);
    m1c_run_free(&r, m);
    free(tokens);
    return out;
}

/* Greedy continuation by n tokens through the incremental decoder: (B, T + n). */
static int32_t *greedy(m1c_model *m, const int32_t *ids, int B, int T, int n) {
    m1c_decoder d;
    m1c_err e = {{0}};
    const int W = T + n, V = m->V;
    cr_assert_eq(m1c_decoder_init(&d, m, B, W, T, &e), M1C_OK, "%s", e.msg);
    float *logits = m1c_xmalloc((size_t)B * V * sizeof *logits);
    int32_t *seq = m1c_xmalloc((size_t)B * W * sizeof *seq), *next = m1c_xmalloc((size_t)B * sizeof *next);
    for (int b = 0; b < B; b++) memcpy(seq + (int64_t)b * W, ids + (int64_t)b * T, (size_t)T * sizeof *seq);
    cr_assert_eq(m1c_decoder_feed(m, &d, ids, T, logits, &e), M1C_OK, "%s", e.msg);
    for (int t = 0; t < n; t++) {
        for (int b = 0; b < B; b++) {
            const float *z = logits + (int64_t)b * V;
            int best = 0;
            for (int v = 1; v < V; v++)
                if (z[v] > z[best]) best = v; /* first maximum, as torch.argmax */
            seq[(int64_t)b * W + T + t] = next[b] = best;
        }
        if (t + 1 < n) cr_assert_eq(m1c_decoder_feed(m, &d, next, 1, logits, &e), M1C_OK, "%s", e.msg);
    }
    m1c_decoder_free(&d, m);
    free(logits);
    free(next);
    return seq;
}

static void write_text(const char *path, const char *text) { th_write_file(path, text, strlen(text)); }

static int same_bytes(const char *a, const char *b) {
    long na, nb;
    char *x = th_slurp(a, &na), *y = th_slurp(b, &nb);
    int same = na == nb && !memcmp(x, y, (size_t)na);
    free(x);
    free(y);
    return same;
}

/* JSON values equal as transformers reads them: numbers by value (1 == 1.0), containers entry by entry. */
static int json_same(const json_t *a, const json_t *b, char *where, size_t n) {
    if (json_is_number(a) && json_is_number(b)) return json_number_value(a) == json_number_value(b);
    if (json_is_object(a) && json_is_object(b)) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)a, k, v) if (!json_same(v, json_object_get(b, k), where, n)) {
            snprintf(where, n, "%s", k);
            return 0;
        }
        json_object_foreach((json_t *)b, k, v) if (!json_object_get(a, k)) {
            snprintf(where, n, "%s", k);
            return 0;
        }
        return 1;
    }
    if (json_is_array(a) && json_is_array(b)) {
        if (json_array_size(a) != json_array_size(b)) return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!json_same(json_array_get(a, i), json_array_get(b, i), where, n)) return 0;
        return 1;
    }
    return a && b && json_equal((json_t *)a, (json_t *)b);
}

static void assert_same_json(const char *a, const char *b) {
    json_error_t je;
    json_t *x = json_load_file(a, 0, &je), *y = json_load_file(b, 0, &je);
    cr_assert(x && y, "cannot read %s or %s", a, b);
    char where[256] = "?";
    cr_assert(json_same(x, y, where, sizeof where), "%s and %s differ at key '%s'", a, b, where);
    json_decref(x);
    json_decref(y);
}

/* ---- parity with transformers ------------------------------------------------------------------- */

static void check_logits_on(const char *name, int device) {
    char *dir = fixture(name);
    int B, T;
    int32_t *ids = read_ids(dir, "input_ids.npy", &B, &T);
    m1c_npy ref = read_npy(dir, "logits.npy");
    m1c_session s;
    open_hf_on(&s, dir, device);
    const int V = s.model.V;
    cr_assert(ref.ndim == 3 && ref.shape[0] == B && ref.shape[1] == T && ref.shape[2] == V);
    float *got = forward_logits(&s.model, ids, B, T);
    double worst = 0, big = 0;
    for (int64_t i = 0; i < ref.numel; i++) {
        worst = fmax(worst, fabs(got[i] - ((float *)ref.data)[i]));
        big = fmax(big, fabs(((float *)ref.data)[i]));
    }
    cr_log_info("%s: logits max abs error %.3g (largest logit %.3g)", name, worst, big);
    /* 1e-4 absolute in FP32 (the parity target): both sides compute in FP32 and differ only in
     * summation order and exp/sigmoid rounding, ~1e-6 relative per op through 16 layers (seen: 1e-5
     * on logits of size ~4, 5e-5 on logits of size ~22). */
    cr_assert_leq(worst, 1e-4, "%s: logits differ from transformers' by %.3g", name, worst);
    free(got);
    free(ids);
    m1c_npy_free(&ref);
    m1c_session_close(&s);
    free(dir);
}

static void check_logits(const char *name) { check_logits_on(name, M1C_DEVICE_CPU); }

Test(hf, logits_match_transformers_fused_experts) { check_logits("minimax_fused"); }
Test(hf, logits_match_transformers_per_expert_tied) { check_logits("minimax_w123"); }

static void check_greedy_on(const char *name, int device) {
    char *dir = fixture(name);
    int B, T, Bg, W;
    int32_t *ids = read_ids(dir, "input_ids.npy", &B, &T);
    int32_t *ref = read_ids(dir, "greedy.npy", &Bg, &W);
    cr_assert(Bg == B && W > T);
    m1c_session s;
    open_hf_on(&s, dir, device);
    int32_t *got = greedy(&s.model, ids, B, T, W - T);
    /* exact: the fixture's inputs were chosen so that every greedy step's top-2 logit gap is >= 2e-3,
     * twenty times the logit tolerance, so no rounding difference can flip a token */
    for (int64_t i = 0; i < (int64_t)B * W; i++)
        cr_assert_eq(got[i], ref[i], "%s: token %lld of row %lld: m1c %d, transformers %d", name,
                     (long long)(i % W), (long long)(i / W), got[i], ref[i]);
    free(got);
    free(ref);
    free(ids);
    m1c_session_close(&s);
    free(dir);
}

static void check_greedy(const char *name) { check_greedy_on(name, M1C_DEVICE_CPU); }

Test(hf, greedy_tokens_match_transformers_fused_experts) { check_greedy("minimax_fused"); }
Test(hf, greedy_tokens_match_transformers_per_expert_tied) { check_greedy("minimax_w123"); }

/* The same parity on a GPU in fp32 (same tolerance and reasoning: fp32 on both sides, summation order
 * only). Skipped without a GPU. */
Test(hf, gpu_logits_match_transformers) {
    th_need_gpu();
    check_logits_on("minimax_fused", M1C_DEVICE_CUDA);
    check_logits_on("minimax_w123", M1C_DEVICE_CUDA);
}
Test(hf, gpu_greedy_tokens_match_transformers) {
    th_need_gpu();
    check_greedy_on("minimax_fused", M1C_DEVICE_CUDA);
    check_greedy_on("minimax_w123", M1C_DEVICE_CUDA);
}

/* transformers' loss of model(input_ids, labels=labels): mean cross-entropy of logits[:, t] against
 * labels[:, t+1] over labels != -100. m1c scores position t against its target, so the targets are
 * set to the shifted labels before the log-probabilities are taken and back-propagated. */
static void check_loss_and_grads(const char *name) {
    char *dir = fixture(name);
    int B, T, Bl, Tl;
    int32_t *ids = read_ids(dir, "input_ids.npy", &B, &T);
    int32_t *labels = read_ids(dir, "labels.npy", &Bl, &Tl);
    cr_assert(Bl == B && Tl == T);
    m1c_session s;
    open_hf(&s, dir);
    m1c_model *m = &s.model;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_model_alloc_grads(m, &e), M1C_OK, "%s", e.msg);
    m1c_arena_zero(&m->grads);
    m1c_run r;
    cr_assert_eq(m1c_run_init(&r, m, B, T, 1, &e), M1C_OK, "%s", e.msg);
    int32_t *tokens = m1c_xmalloc((size_t)B * (T + 1) * sizeof *tokens);
    for (int b = 0; b < B; b++) {
        memcpy(tokens + (int64_t)b * (T + 1), ids + (int64_t)b * T, (size_t)T * sizeof *tokens);
        tokens[(int64_t)b * (T + 1) + T] = -1;
    }
    cr_assert_eq(m1c_model_forward(m, &r, tokens, &e), M1C_OK, "%s", e.msg);
    const int V = m->V;
    int count = 0;
    double loss = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int64_t i = (int64_t)b * T + t;
            int32_t y = t + 1 < T ? labels[(int64_t)b * T + t + 1] : -100;
            r.targets[i] = y >= 0 ? y : -1;
            r.logp[i] = y >= 0 ? r.logits[i * V + y] - r.lse[i] : 0.0f;
            if (y >= 0) count++, loss -= r.logp[i];
        }
    loss /= count;
    for (int64_t i = 0; i < (int64_t)B * T; i++) r.dlogp[i] = r.targets[i] >= 0 ? -1.0f / count : 0.0f;
    cr_assert_eq(m1c_model_backward(m, &r, &e), M1C_OK, "%s", e.msg);

    char *lp = m1c_path_join(dir, "loss.json");
    json_error_t je;
    json_t *lj = json_load_file(lp, 0, &je);
    cr_assert_not_null(lj, "%s: %s", lp, je.text);
    double ref_loss = json_number_value(json_object_get(lj, "loss"));
    cr_assert_eq(json_integer_value(json_object_get(lj, "tokens")), count, "scored positions differ");
    cr_log_info("%s: loss m1c %.9g transformers %.9g", name, loss, ref_loss);
    /* 1e-6 relative: a mean of log-probabilities whose logits agree to ~1e-5 relative (above), with
     * errors of both signs that mostly cancel in the mean (seen: 4e-8 and 8e-8 relative) */
    cr_assert_leq(fabs(loss - ref_loss), 1e-6 * fabs(ref_loss), "%s: loss %.9g vs %.9g", name, loss, ref_loss);

    char *gp = m1c_path_join(dir, "grads.safetensors");
    m1c_st_file gf;
    cr_assert_eq(m1c_st_open(&gf, gp, &e), M1C_OK, "%s", e.msg);
    cr_assert_gt(m1c_st_count(&gf), 5);
    for (int k = 0; k < m1c_st_count(&gf); k++) {
        const m1c_st_tensor *t = m1c_st_at(&gf, k);
        m1c_tensor *g = m1c_arena_find(&m->grads, t->name);
        cr_assert_not_null(g, "%s: no m1c gradient named %s", name, t->name);
        cr_assert_eq(m1c_numel(g), t->numel, "%s: %s has another size", name, t->name);
        float *ref = m1c_xmalloc((size_t)t->numel * sizeof *ref);
        cr_assert_eq(m1c_st_tensor_f32(t, gp, ref, t->numel, &e), M1C_OK, "%s", e.msg);
        const float *x = g->data;
        double worst = 0, big = 0;
        for (int64_t i = 0; i < t->numel; i++) {
            worst = fmax(worst, fabs(x[i] - ref[i]));
            big = fmax(big, fabs(ref[i]));
        }
        cr_log_info("%s: %s: max abs error %.3g of max |g| %.3g", name, t->name, worst, big);
        /* 2e-4 of the tensor's largest entry: backward through 16 layers in FP32 on both sides, where
         * small entries are differences of larger terms, so the error is measured against the largest
         * (seen: at most 1.5e-5 of it; a 1e-4 change of one DeepNorm alpha moves the logits by 6e-4) */
        cr_assert_leq(worst, 2e-4 * big, "%s: gradient of %s differs by %.3g (max |g| %.3g)", name, t->name, worst,
                      big);
        cr_assert_gt(big, 0.0, "%s: gradient of %s is zero in the fixture", name, t->name);
        free(ref);
    }
    m1c_st_close(&gf);
    json_decref(lj);
    free(lp);
    free(gp);
    free(tokens);
    free(labels);
    free(ids);
    m1c_run_free(&r, m);
    m1c_session_close(&s);
    free(dir);
}

Test(hf, loss_and_gradients_match_transformers_fused_experts) { check_loss_and_grads("minimax_fused"); }
Test(hf, loss_and_gradients_match_transformers_per_expert_tied) { check_loss_and_grads("minimax_w123"); }

/* ---- import -> export ---------------------------------------------------------------------------- */

static void check_round_trip(const char *name, int layout) {
    char *dir = fixture(name);
    char *ck = th_tmpdir_path("ckpt"), *ex = th_tmpdir_path("export"), *ck2 = th_tmpdir_path("ckpt2");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_hf_import(dir, ck, &e), M1C_OK, "%s", e.msg);
    m1c_hf_export_opts o = {layout, M1C_F32};
    cr_assert_eq(m1c_hf_export(ck, ex, NULL, 0, &o, &e), M1C_OK, "%s", e.msg);
    char *a = m1c_path_join(dir, "model.safetensors"), *b = m1c_path_join(ex, "model.safetensors");
    cr_assert(same_bytes(a, b), "%s: exported model.safetensors differs from the original", name);
    char *ca = m1c_path_join(dir, "config.json"), *cb = m1c_path_join(ex, "config.json");
    assert_same_json(ca, cb);
    /* and once more through m1c: the same m1c checkpoint */
    cr_assert_eq(m1c_hf_import(ex, ck2, &e), M1C_OK, "%s", e.msg);
    char *m1 = m1c_path_join(ck, "model.safetensors"), *m2 = m1c_path_join(ck2, "model.safetensors");
    cr_assert(same_bytes(m1, m2), "%s: re-imported parameters differ", name);
    free(m1), free(m2), free(ca), free(cb), free(a), free(b);
    free(ck), free(ex), free(ck2), free(dir);
}

Test(hf, import_export_round_trip_fused_same_bytes) { check_round_trip("minimax_fused", M1C_HF_FUSED); }
Test(hf, import_export_round_trip_per_expert_same_bytes) { check_round_trip("minimax_w123", M1C_HF_PER_EXPERT); }

/* ---- the command line --------------------------------------------------------------------------- */

Test(hf, cli_logits_and_generate_with_hf) {
    char *dir = fixture("minimax_fused");
    char *in = m1c_path_join(dir, "input_ids.npy");
    char *lo = th_tmpdir_path("logits.npy"), *go = th_tmpdir_path("greedy.npy");
    char *err = NULL;
    const char *la[] = {"logits", "--hf", dir, "--input", in, "--output", lo, NULL};
    cr_assert_eq(th_run_m1c(la, NULL, &err), 0, "m1c logits --hf: %s", err);
    free(err);
    m1c_npy ref = read_npy(dir, "logits.npy"), got = {0};
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_read(lo, &got, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(got.numel, ref.numel);
    for (int64_t i = 0; i < ref.numel; i++) /* the same tolerance as logits_match_transformers */
        cr_assert_leq(fabs(((float *)got.data)[i] - ((float *)ref.data)[i]), 1e-4);
    const char *ga[] = {"generate", "--hf", dir, "--input", in, "--output", go, "--max-new", "6", "--greedy", NULL};
    cr_assert_eq(th_run_m1c(ga, NULL, &err), 0, "m1c generate --hf: %s", err);
    free(err);
    int B, W, Br, Wr;
    char *tmp = m1c_xstrdup(th_tmpdir());
    int32_t *g = read_ids(tmp, "greedy.npy", &B, &W), *r = read_ids(dir, "greedy.npy", &Br, &Wr);
    cr_assert(B == Br && W == Wr, "greedy.npy: [%d, %d] vs the fixture's [%d, %d]", B, W, Br, Wr);
    for (int64_t i = 0; i < (int64_t)B * W; i++) cr_assert_eq(g[i], r[i], "token %lld", (long long)i); /* exact */
    /* the import/export commands, and the inference-only checkpoint they make */
    char *ck = th_tmpdir_path("ck"), *ex = th_tmpdir_path("ex"), *lo2 = th_tmpdir_path("logits2.npy");
    const char *ia[] = {"import-hf", dir, ck, NULL};
    cr_assert_eq(th_run_m1c(ia, NULL, &err), 0, "m1c import-hf: %s", err);
    free(err);
    const char *ca[] = {"logits", "--checkpoint", ck, "--input", in, "--output", lo2, NULL};
    cr_assert_eq(th_run_m1c(ca, NULL, &err), 0, "m1c logits --checkpoint: %s", err);
    free(err);
    m1c_npy got2 = {0};
    cr_assert_eq(m1c_npy_read(lo2, &got2, &e), M1C_OK, "%s", e.msg);
    cr_assert(!memcmp(got2.data, got.data, (size_t)got.numel * 4), "--checkpoint and --hf logits differ"); /* same code */
    const char *pa[] = {"generate", "--checkpoint", ck, "--prompt", "hi", NULL};
    cr_assert_eq(th_run_m1c(pa, NULL, &err), 1);
    cr_assert(strstr(err, "no training stage") && strstr(err, "--input"), "%s", err);
    free(err);
    const char *ea[] = {"export-hf", ck, ex, "--experts", "both", NULL};
    cr_assert_eq(th_run_m1c(ea, NULL, &err), 1);
    cr_assert(strstr(err, "--experts"), "%s", err);
    free(err);
    const char *eb[] = {"export-hf", ck, ex, NULL};
    cr_assert_eq(th_run_m1c(eb, NULL, &err), 0, "m1c export-hf: %s", err);
    free(err);
    char *a = m1c_path_join(dir, "model.safetensors"), *b = m1c_path_join(ex, "model.safetensors");
    cr_assert(same_bytes(a, b));
    free(a), free(b), free(ck), free(ex), free(lo2), free(tmp);
    free(g), free(r);
    m1c_npy_free(&ref), m1c_npy_free(&got), m1c_npy_free(&got2);
    free(in), free(lo), free(go), free(dir);
}

/* ---- without fixtures: m1c's own round trips ---------------------------------------------------- */

/* A small valid transformers config; `extra` is spliced in before the closing brace (later keys
 * replace earlier ones: jansson keeps the last). */
static char *hf_dir_with(const char *name, const char *extra) {
    char *dir = th_tmpdir_path(name);
    mkdir(dir, 0755);
    char *p = m1c_path_join(dir, "config.json");
    char *text = m1c_xasprintf(
        "{\"model_type\": \"minimax\", \"vocab_size\": 40, \"hidden_size\": 16, \"intermediate_size\": 12,\n"
        " \"num_hidden_layers\": 4, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"head_dim\": 6,\n"
        " \"num_local_experts\": 3, \"num_experts_per_tok\": 2, \"block_size\": 3, \"rms_norm_eps\": 1e-5,\n"
        " \"layer_types\": [\"linear_attention\", \"full_attention\", \"linear_attention\", \"full_attention\"],\n"
        " \"linear_attn_alpha_factor\": 1.5, \"mlp_beta_factor\": 0.5,\n"
        " \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 10000.0}%s}\n",
        extra);
    write_text(p, text);
    free(text);
    free(p);
    return dir;
}

/* A random model of HF_DIR's translated config, exported there (and so importable). */
static void random_weights(const char *dir, int layout, uint64_t seed) {
    m1c_err e = {{0}};
    char *text = m1c_hf_config_text(dir, &e);
    cr_assert_not_null(text, "%s", e.msg);
    m1c_session s;
    cr_assert_eq(m1c_session_open_text(&s, text, "test", dir, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_session_build_model(&s, seed, &e), M1C_OK, "%s", e.msg);
    /* norm gains away from 1, so that a swapped or skipped norm shows */
    for (int i = 0; i < s.model.params.n; i++)
        if (s.model.params.t[i].ndim == 1) {
            float *x = s.model.params.t[i].data;
            for (int64_t j = 0; j < m1c_numel(&s.model.params.t[i]); j++) x[j] = 1.0f + 0.1f * (float)((j * 7 + i) % 5);
        }
    char *cfg = m1c_path_join(dir, "config.json");
    m1c_hf_export_opts o = {layout, M1C_F32};
    cr_assert_eq(m1c_hf_export_session(&s, cfg, dir, &o, &e), M1C_OK, "%s", e.msg);
    free(cfg);
    m1c_session_close(&s);
    free(text);
}

Test(hf, expert_layouts_load_to_the_same_model) {
    char *a = hf_dir_with("fused", ""), *b = hf_dir_with("split", "");
    random_weights(a, M1C_HF_FUSED, 7);
    random_weights(b, M1C_HF_PER_EXPERT, 7);
    char *pb = m1c_path_join(b, "model.safetensors");
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, pb, &e), M1C_OK, "%s", e.msg);
    cr_assert_not_null(m1c_st_find(&f, "model.layers.2.block_sparse_moe.experts.2.w3.weight"));
    cr_assert_null(m1c_st_find(&f, "model.layers.2.mlp.experts.gate_up_proj"));
    m1c_st_close(&f);
    m1c_session sa, sb;
    open_hf(&sa, a);
    open_hf(&sb, b);
    cr_assert_eq(sa.model.params.n, sb.model.params.n);
    for (int i = 0; i < sa.model.params.n; i++) { /* exact: the same floats, only renamed and sliced */
        m1c_tensor *x = &sa.model.params.t[i], *y = &sb.model.params.t[i];
        cr_assert(!memcmp(x->data, y->data, (size_t)m1c_numel(x) * 4), "%s differs between layouts", x->name);
    }
    int32_t ids[2 * 7] = {1, 5, 9, 3, 3, 0, 39, 2, 2, 8, 17, 30, 11, 4};
    float *la = forward_logits(&sa.model, ids, 2, 7), *lb = forward_logits(&sb.model, ids, 2, 7);
    cr_assert(!memcmp(la, lb, 2 * 7 * 40 * sizeof(float))); /* the same model, the same code: bitwise */
    /* greedy decoding (prefill then steps) agrees with the full forward's argmax at the prompt's end */
    int32_t *g = greedy(&sa.model, ids, 2, 7, 1);
    for (int b2 = 0; b2 < 2; b2++) {
        const float *z = la + ((int64_t)b2 * 7 + 6) * 40;
        int best = 0;
        for (int v = 1; v < 40; v++)
            if (z[v] > z[best]) best = v;
        cr_assert_eq(g[b2 * 8 + 7], best);
    }
    free(g), free(la), free(lb), free(pb), free(a), free(b);
    m1c_session_close(&sa);
    m1c_session_close(&sb);
}

Test(hf, sharded_checkpoints_load) {
    char *d = hf_dir_with("one", "");
    random_weights(d, M1C_HF_PER_EXPERT, 5);
    char *p = m1c_path_join(d, "model.safetensors");
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    /* the same tensors in two shards with an index, as transformers writes large checkpoints */
    const int n = m1c_st_count(&f);
    m1c_tensor *ts = m1c_xcalloc((size_t)n, sizeof *ts);
    json_t *map = json_object();
    for (int i = 0; i < n; i++) {
        const m1c_st_tensor *t = m1c_st_at(&f, i);
        ts[i].name = t->name, ts[i].dtype = M1C_F32, ts[i].device = M1C_DEVICE_CPU, ts[i].ndim = t->ndim;
        for (int k = 0; k < t->ndim; k++) ts[i].shape[k] = t->shape[k];
        ts[i].data = (void *)t->data;
        json_object_set_new(map, t->name, json_string(i < n / 2 ? "model-00001-of-00002.safetensors"
                                                                 : "model-00002-of-00002.safetensors"));
    }
    char *s2 = th_tmpdir_path("shards"), *c1 = m1c_path_join(d, "config.json"), *c2 = m1c_path_join(s2, "config.json");
    mkdir(s2, 0755);
    char *cfg = th_slurp(c1, NULL);
    write_text(c2, cfg);
    char *f1 = m1c_path_join(s2, "model-00001-of-00002.safetensors"), *f2 = m1c_path_join(s2, "model-00002-of-00002.safetensors");
    cr_assert_eq(m1c_st_write(f1, ts, n / 2, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_write(f2, ts + n / 2, n - n / 2, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    char *ix = m1c_path_join(s2, "model.safetensors.index.json");
    json_t *index = json_pack("{s:{s:i},s:o}", "metadata", "total_size", 0, "weight_map", map);
    cr_assert_eq(json_dump_file(index, ix, 0), 0);
    json_decref(index);
    m1c_session a, b;
    open_hf(&a, d);
    open_hf(&b, s2);
    for (int i = 0; i < a.model.params.n; i++) { /* exact: the same floats from other files */
        m1c_tensor *x = &a.model.params.t[i], *y = &b.model.params.t[i];
        cr_assert(!memcmp(x->data, y->data, (size_t)m1c_numel(x) * 4), "%s differs", x->name);
    }
    /* exporting over a sharded checkpoint would leave loaders reading the old shards */
    cr_assert_eq(m1c_hf_export_session(&b, c2, s2, NULL, &e), M1C_ERR);
    cr_assert(strstr(e.msg, "model.safetensors.index.json") && strstr(e.msg, "empty folder"), "%s", e.msg);
    m1c_session_close(&a);
    m1c_session_close(&b);
    m1c_st_close(&f);
    free(ix), free(f1), free(f2), free(cfg), free(c1), free(c2), free(s2), free(ts), free(p), free(d);
}

Test(hf, translation_maps_every_setting) {
    char *d = hf_dir_with("map", ", \"tie_word_embeddings\": true, \"router_jitter_noise\": 0.25,"
                                 " \"output_router_logits\": true, \"router_aux_loss_coef\": 0.02,"
                                 " \"full_attn_beta_factor\": 0.75, \"initializer_range\": 0.05");
    m1c_err e = {{0}};
    char *t = m1c_hf_config_text(d, &e);
    cr_assert_not_null(t, "%s", e.msg);
    static const char *const want[] = {
        "vocab_size = 40;", "hidden = 16;", "layers = 4;", "norm_eps = 1e-05;", "init_std = 0.05;",
        "tie_embeddings = true;", "heads = 2;", "head_dim = 6;", "block_size = 3;", "decay = \"hf\";",
        "norm_eps = 1e-06;", "kv_heads = 1;", "rotary_dim = 6;", "rope_theta = 10000.0;", "alpha = 1.5;",
        "beta = 0.75;", "experts = 3;", "top_k = 2;", "ffn_dim = 12;", "aux_coef = 0.02;", "jitter = 0.25;",
        "normalize = true;", "ffn_alpha = 1.0;", "ffn_beta = 0.5;", "\"lightning\", \"softmax\", \"lightning\", \"softmax\"",
        "stages = ();", NULL};
    for (int i = 0; want[i]; i++) cr_assert(strstr(t, want[i]), "missing '%s' in\n%s", want[i], t);
    free(t);
    /* defaults: no layer_types means transformers' alternation (full attention at even indices); the
     * aux loss is off without output_router_logits */
    char *p = m1c_path_join(d, "config.json");
    write_text(p, "{\"model_type\": \"minimax\", \"vocab_size\": 10, \"hidden_size\": 8, \"intermediate_size\": 4,"
                  " \"num_hidden_layers\": 3, \"num_attention_heads\": 2}");
    cr_assert_not_null(t = m1c_hf_config_text(d, &e), "%s", e.msg);
    cr_assert(strstr(t, "\"softmax\", \"lightning\", \"softmax\""), "%s", t);
    cr_assert(strstr(t, "aux_coef = 0.0;") && strstr(t, "head_dim = 4;") && strstr(t, "kv_heads = 2;") &&
                  strstr(t, "rope_theta = 1000000.0;") && strstr(t, "block_size = 256;"),
              "%s", t);
    free(t);
    free(p);
    free(d);
}

Test(hf, minimax_own_dialect_maps_partial_rope_and_its_decay) {
    char *d = th_tmpdir_path("own");
    mkdir(d, 0755);
    char *p = m1c_path_join(d, "config.json");
    write_text(p, "{\"model_type\": \"minimax_m1\", \"vocab_size\": 40, \"hidden_size\": 16, \"intermediate_size\": 12,"
                  " \"num_hidden_layers\": 3, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"head_dim\": 8,"
                  " \"num_local_experts\": 3, \"num_experts_per_tok\": 2, \"attn_type_list\": [0, 0, 1],"
                  " \"postnorm\": true, \"rotary_dim\": 4, \"rope_theta\": 10000000,"
                  " \"layernorm_linear_attention_alpha\": 3.5565588200778455, \"layernorm_mlp_beta\": 1.0,"
                  " \"shared_intermediate_size\": 0, \"rms_norm_eps\": 1e-05}");
    m1c_err e = {{0}};
    char *t = m1c_hf_config_text(d, &e);
    cr_assert_not_null(t, "%s", e.msg);
    static const char *const want[] = {"decay = \"m1c\";", "rotary_dim = 4;", "rope_theta = 10000000.0;",
                                       "alpha = 3.5565588200778455;", "\"lightning\", \"lightning\", \"softmax\"", NULL};
    for (int i = 0; want[i]; i++) cr_assert(strstr(t, want[i]), "missing '%s' in\n%s", want[i], t);
    /* such a model has no exact transformers form: export names the settings */
    m1c_session s;
    cr_assert_eq(m1c_session_open_text(&s, t, "own", d, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_session_build_model(&s, 1, &e), M1C_OK, "%s", e.msg);
    char *out = th_tmpdir_path("own_export");
    cr_assert_eq(m1c_hf_export_session(&s, NULL, out, NULL, &e), M1C_ERR);
    cr_assert(strstr(e.msg, "decay") && strstr(e.msg, "\"hf\""), "%s", e.msg);
    m1c_session_close(&s);
    const char *ov[] = {"model.types.lightning.attention.decay=hf"};
    cr_assert_eq(m1c_session_open_text(&s, t, "own", d, ov, 1, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_session_build_model(&s, 1, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_hf_export_session(&s, NULL, out, NULL, &e), M1C_ERR);
    cr_assert(strstr(e.msg, "rotary_dim") && strstr(e.msg, "whole head dim"), "%s", e.msg);
    m1c_session_close(&s);
    free(out), free(t), free(p), free(d);
}

/* ---- refusals ----------------------------------------------------------------------------------- */

/* config.json with `extra` must be refused with a message naming config.json and `key`. */
static void refused(const char *extra, const char *key, const char *why) {
    char *d = hf_dir_with("refuse", extra);
    m1c_err e = {{0}};
    char *t = m1c_hf_config_text(d, &e);
    cr_assert_null(t, "accepted %s", extra);
    cr_assert(strstr(e.msg, "config.json: ") && strstr(e.msg, key), "'%s' names neither config.json nor %s", e.msg, key);
    cr_assert(strstr(e.msg, why), "'%s' does not say '%s'", e.msg, why);
    m1c_remove_tree(d);
    free(d);
}

Test(hf, refuses_what_it_cannot_compute) {
    refused(", \"layer_types\": [\"linear_attention\", \"mamba\", \"linear_attention\", \"full_attention\"]",
            "layer_types[1]", "unknown layer type \"mamba\"");
    refused(", \"layer_types\": [\"linear_attention\"]", "layer_types", "1 entries for 4 layers");
    refused(", \"shared_intermediate_size\": 64", "shared_intermediate_size", "shared expert");
    refused(", \"n_shared_experts\": 1", "n_shared_experts", "shared expert");
    refused(", \"hidden_act\": \"gelu\"", "hidden_act", "SiLU");
    refused(", \"sliding_window\": 4096", "sliding_window", "not supported");
    refused(", \"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 1e6, \"factor\": 4}",
            "rope_parameters.factor", "not supported");
    refused(", \"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 1e6}", "rope_parameters.rope_type",
            "\"yarn\"");
    refused(", \"rope_parameters\": {\"rope_theta\": 1e6, \"partial_rotary_factor\": 0.5}",
            "rope_parameters.partial_rotary_factor", "whole head dim");
    refused(", \"partial_rotary_factor\": 0.5", "partial_rotary_factor", "whole head dim");
    refused(", \"model_type\": \"llama\"", "model_type", "not a MiniMax model");
    refused(", \"num_key_value_heads\": 3", "num_key_value_heads", "outside");
    refused(", \"num_attention_heads\": 4, \"num_key_value_heads\": 3", "num_key_value_heads", "does not divide");
    refused(", \"num_experts_per_tok\": 5", "num_experts_per_tok", "outside");
    refused(", \"attention_bias\": true", "attention_bias", "no biases");
    refused(", \"hidden_size\": \"big\"", "hidden_size", "expected an integer");
    refused(", \"mlp_alpha_factor\": -1", "mlp_alpha_factor", "outside");
    refused(", \"model_type\": \"minimax_m1\", \"attn_type_list\": [0, 1, 0, 1], \"postnorm\": false", "postnorm",
            "after the norm");
    refused(", \"model_type\": \"minimax_m1\", \"attn_type_list\": [0, 2, 0, 1], \"postnorm\": true",
            "attn_type_list[1]", "unknown attention type");
    refused(", \"model_type\": \"minimax_m1\", \"attn_type_list\": [0, 1, 0, 1], \"postnorm\": true, "
            "\"num_attention_heads\": 3, \"num_key_value_heads\": 1",
            "num_attention_heads", "power of two");
    /* no config.json at all */
    m1c_err e = {{0}};
    char *d = th_tmpdir_path("empty");
    mkdir(d, 0755);
    cr_assert_null(m1c_hf_config_text(d, &e));
    cr_assert(strstr(e.msg, "config.json") && strstr(e.msg, "cannot open"), "%s", e.msg);
    free(d);
}

Test(hf, refuses_weights_that_do_not_fit) {
    char *d = hf_dir_with("w", "");
    random_weights(d, M1C_HF_FUSED, 3);
    char *p = m1c_path_join(d, "model.safetensors");
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, p, &e), M1C_OK, "%s", e.msg);
    /* rewrite the file with one tensor changed each time */
    int n = m1c_st_count(&f);
    m1c_tensor *ts = m1c_xcalloc((size_t)n + 1, sizeof *ts);
    float *data = m1c_xcalloc(4096, sizeof *data);
    for (int i = 0; i < n; i++) {
        const m1c_st_tensor *t = m1c_st_at(&f, i);
        ts[i].name = t->name, ts[i].dtype = M1C_F32, ts[i].device = M1C_DEVICE_CPU, ts[i].ndim = t->ndim;
        for (int k = 0; k < t->ndim; k++) ts[i].shape[k] = t->shape[k];
        ts[i].data = (void *)t->data;
    }
    char *p2 = th_tmpdir_path("w2");
    mkdir(p2, 0755);
    char *c1 = m1c_path_join(d, "config.json"), *c2 = m1c_path_join(p2, "config.json"), *m2 = m1c_path_join(p2, "model.safetensors");
    char *cfg = th_slurp(c1, NULL);
    write_text(c2, cfg);
    /* an extra tensor (a shared expert, say) */
    ts[n] = ts[0];
    ts[n].name = "model.layers.0.mlp.shared_expert.up_proj.weight";
    ts[n].data = data, ts[n].ndim = 2, ts[n].shape[0] = 4, ts[n].shape[1] = 16;
    cr_assert_eq(m1c_st_write(m2, ts, n + 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    m1c_session s;
    cr_assert_eq(m1c_hf_open(&s, p2, NULL, 0, &e), M1C_ERR);
    m1c_session_close(&s);
    cr_assert(strstr(e.msg, "shared_expert.up_proj") && strstr(e.msg, "no place"), "%s", e.msg);
    /* a missing tensor */
    int router = -1;
    for (int i = 0; i < n; i++)
        if (!strcmp(ts[i].name, "model.layers.1.mlp.gate.weight")) router = i;
    cr_assert_geq(router, 0);
    m1c_tensor keep = ts[router];
    ts[router] = ts[n - 1];
    cr_assert_eq(m1c_st_write(m2, ts, n - 1, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_hf_open(&s, p2, NULL, 0, &e), M1C_ERR);
    m1c_session_close(&s);
    cr_assert(strstr(e.msg, "model.layers.1.mlp.gate.weight") && strstr(e.msg, "missing"), "%s", e.msg);
    /* a tensor of another shape (the config says 3 experts) */
    ts[router] = keep;
    ts[router].shape[0] = 2;
    cr_assert_eq(m1c_st_write(m2, ts, n, NULL, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_hf_open(&s, p2, NULL, 0, &e), M1C_ERR);
    m1c_session_close(&s);
    cr_assert(strstr(e.msg, "model.layers.1.mlp.gate.weight") && strstr(e.msg, "[2, 16]") && strstr(e.msg, "[3, 16]"),
              "%s", e.msg);
    m1c_st_close(&f);
    free(cfg), free(c1), free(c2), free(m2), free(p2), free(ts), free(data), free(p), free(d);
}
