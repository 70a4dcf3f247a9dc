/* Sampling through the decoder on the CPU: m1c_sample_rows is m1c_sample row after row with one rng,
 * m1c_decoder_feed_sample gives the tokens of m1c_decoder_feed followed by m1c_sample, and `m1c
 * generate` (ids and prompt) gives the tokens of that loop in-process for the same checkpoint and seed.
 * Everything here runs the same CPU code on the same numbers (one thread), so tokens and probabilities
 * must agree exactly. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/checkpoint.h"
#include "../core/datamix.h"
#include "../core/model.h"
#include "../core/npy.h"
#include "../core/rng.h"
#include "../core/sample.h"
#include "../core/session.h"
#include "harness.h"

#define CPU M1C_DEVICE_CPU

static void setup(void) {
    th_tmpdir_init("sample");
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
}

TestSuite(sample, .init = setup, .fini = th_tmpdir_fini);

/* greedy; temperature; top-k; top-p; both */
static const m1c_sampler samplers[] = {
    {1, 1.0f, 0, 1.0f}, {0, 0.9f, 0, 1.0f}, {0, 0.7f, 20, 1.0f}, {0, 1.0f, 0, 0.8f}, {0, 1.3f, 40, 0.9f}};
#define NS (int)(sizeof samplers / sizeof samplers[0])

/* A tiny hybrid on synth-math; init_std 0.2 makes the next-token distributions far from uniform, so
 * top-k and top-p cut something. One thread: the same numbers in every process. */
static const char cfg_text[] =
    "model = { hidden = 32; layers = 2; init_std = 0.2; pattern = [\"lin\", \"soft\"];\n"
    "  types = { lin = { attention = { plugin = \"lightning\"; heads = 2; head_dim = 16; block_size = 16; }; };\n"
    "            soft = { attention = { plugin = \"softmax\"; heads = 2; kv_heads = 1; head_dim = 16; }; }; };\n"
    "  ffn = { plugin = \"topk\"; ffn_dim = 32; }; };\n"
    "run = { threads = 1;\n"
    "  stages = ( { name = \"pretrain\"; data = { plugin = \"synth-math\"; max_digits = 2; max_ops = 1; };\n"
    "               steps = 1; batch = 2; seq_len = 32; } ); };\n";

static void open_model(m1c_session *s) {
    m1c_err e = {{0}};
    cr_assert_eq(m1c_session_open_text(s, cfg_text, "test_sample.cfg", ".", NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_session_build_model(s, 11, &e), M1C_OK, "%s", e.msg);
}

/* The reference decoding loop (generate's before sampling moved into the decoder): feed the prompt in
 * chunks, then per step m1c_sample on each row in order with one rng, feeding the sampled tokens back.
 * seq (B, T + n) gets prompt and continuation; prob (n, B) unless NULL. */
static void reference(m1c_model *m, const m1c_sampler *s, const int32_t *prompt, int B, int T, int chunk, int n,
                      uint64_t seed, int32_t *seq, float *prob) {
    const int V = m->V, W = T + n;
    m1c_decoder d;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_decoder_init(&d, m, B, W, chunk, &e), M1C_OK, "%s", e.msg);
    float *logits = malloc((size_t)B * V * sizeof *logits), *work = malloc((size_t)V * 2 * sizeof *work);
    int32_t *iwork = malloc((size_t)V * sizeof *iwork), *ids = malloc((size_t)B * chunk * sizeof *ids);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 0);
    for (int b = 0; b < B; b++) memcpy(seq + (int64_t)b * W, prompt + (int64_t)b * T, (size_t)T * sizeof *seq);
    for (int t0 = 0; t0 < T; t0 += chunk) {
        const int k = T - t0 < chunk ? T - t0 : chunk;
        for (int b = 0; b < B; b++) memcpy(ids + b * k, prompt + (int64_t)b * T + t0, (size_t)k * sizeof *ids);
        cr_assert_eq(m1c_decoder_feed(m, &d, ids, k, logits, &e), M1C_OK, "%s", e.msg);
    }
    for (int t = 0; t < n; t++) {
        for (int b = 0; b < B; b++) {
            ids[b] = m1c_sample(s, logits + (int64_t)b * V, V, &rng, work, iwork, prob ? &prob[t * B + b] : NULL);
            seq[(int64_t)b * W + T + t] = ids[b];
        }
        if (t + 1 < n) cr_assert_eq(m1c_decoder_feed(m, &d, ids, 1, logits, &e), M1C_OK, "%s", e.msg);
    }
    m1c_decoder_free(&d, m);
    free(logits), free(work), free(iwork), free(ids);
}

static int32_t *random_ids(int n, int V, uint64_t seed) {
    int32_t *x = malloc((size_t)n * sizeof *x);
    m1c_rng r;
    m1c_rng_seed(&r, seed, 3);
    for (int i = 0; i < n; i++) x[i] = (int32_t)(m1c_rng_u64(&r) % (uint64_t)V);
    return x;
}

Test(sample, rows_are_m1c_sample_in_row_order) {
    enum { B = 5, V = 300 };
    float *z = th_randn(B * V, 4, 2.0f);
    float *work = malloc(m1c_sample_rows_work(CPU, B, V)), *w2 = malloc(2 * V * sizeof *w2);
    int32_t *iw2 = malloc(V * sizeof *iw2);
    for (int j = 0; j < NS; j++) {
        m1c_rng r1, r2;
        m1c_rng_seed(&r1, 8, 0), m1c_rng_seed(&r2, 8, 0);
        int32_t got[B], want[B];
        float pgot[B], pwant[B];
        m1c_err e = {{0}};
        cr_assert_eq(m1c_sample_rows(CPU, &samplers[j], z, B, V, &r1, work, got, pgot, &e), M1C_OK, "%s", e.msg);
        for (int b = 0; b < B; b++) want[b] = m1c_sample(&samplers[j], z + b * V, V, &r2, w2, iw2, &pwant[b]);
        for (int b = 0; b < B; b++) {
            cr_expect_eq(got[b], want[b], "sampler %d row %d", j, b);
            cr_expect_eq(pgot[b], pwant[b], "sampler %d row %d: the same code gives the same probability", j, b);
        }
        cr_expect_eq(m1c_rng_u64(&r1), m1c_rng_u64(&r2), "sampler %d: as many uniforms drawn", j);
    }
    free(z), free(work), free(w2), free(iw2);
}

/* Prompt of 7 in chunks of 4 (the first chunk without logits), then 8 tokens per row. */
Test(sample, decoder_feed_sample_matches_feed_then_sample) {
    m1c_session s;
    open_model(&s);
    m1c_model *m = &s.model;
    enum { B = 3, T = 7, CHUNK = 4, N = 8, W = T + N };
    int32_t *prompt = random_ids(B * T, m->V, 1);
    for (int j = 0; j < NS; j++) {
        int32_t want[B * W], got[B * W], ids[B * CHUNK], next[B];
        float pwant[N * B], pgot[N * B];
        reference(m, &samplers[j], prompt, B, T, CHUNK, N, 100 + (uint64_t)j, want, pwant);

        m1c_decoder d;
        m1c_err e = {{0}};
        cr_assert_eq(m1c_decoder_init(&d, m, B, W, CHUNK, &e), M1C_OK, "%s", e.msg);
        m1c_rng rng;
        m1c_rng_seed(&rng, 100 + (uint64_t)j, 0);
        for (int b = 0; b < B; b++) memcpy(got + b * W, prompt + b * T, T * sizeof *got);
        for (int b = 0; b < B; b++) memcpy(ids + b * CHUNK, prompt + b * T, CHUNK * sizeof *ids);
        cr_assert_eq(m1c_decoder_feed(m, &d, ids, CHUNK, NULL, &e), M1C_OK, "%s", e.msg);
        for (int b = 0; b < B; b++) memcpy(ids + b * (T - CHUNK), prompt + b * T + CHUNK, (T - CHUNK) * sizeof *ids);
        cr_assert_eq(m1c_decoder_feed_sample(m, &d, ids, T - CHUNK, &samplers[j], &rng, next, pgot, &e), M1C_OK, "%s",
                     e.msg);
        for (int t = 0; t < N; t++) {
            for (int b = 0; b < B; b++) got[b * W + T + t] = next[b];
            /* next is both the input and the output */
            if (t + 1 < N)
                cr_assert_eq(m1c_decoder_feed_sample(m, &d, next, 1, &samplers[j], &rng, next, pgot + (t + 1) * B, &e),
                             M1C_OK, "%s", e.msg);
        }
        cr_expect_eq(d.pos, T + N - 1);
        m1c_decoder_free(&d, m);
        for (int i = 0; i < B * W; i++)
            cr_expect_eq(got[i], want[i], "sampler %d: row %d position %d: %d, reference %d", j, i / W, i % W, got[i],
                         want[i]);
        for (int i = 0; i < N * B; i++) cr_expect_eq(pgot[i], pwant[i], "sampler %d: probability %d", j, i);
        /* not a constant: a sampler that ignored its input would also "agree" with itself */
        int varied = 0;
        for (int i = 1; i < N; i++) varied |= want[T + i] != want[T];
        if (!samplers[j].greedy) cr_expect(varied, "sampler %d: 8 equal tokens in a row", j);
    }
    free(prompt);
    m1c_session_close(&s);
}

/* The model above saved as a checkpoint in the scratch folder, and *s reopened from it (what the CLI
 * loads); returns the checkpoint's folder. */
static char *open_saved_model(m1c_session *s) {
    open_model(s);
    char *dir = th_tmpdir_path("ck");
    m1c_ckpt_state st = {0};
    st.stage_name = "pretrain";
    m1c_err e = {{0}};
    cr_assert_eq(m1c_ckpt_save(dir, &s->model, NULL, &st, s->cfg, &e), M1C_OK, "%s", e.msg);
    m1c_session_close(s);
    cr_assert_eq(m1c_session_open_checkpoint(s, dir, NULL, 0, &e), M1C_OK, "%s", e.msg);
    return dir;
}

/* `m1c generate --input` writes the reference loop's tokens; prompts of 600 tokens take two chunks. */
Test(sample, cli_generate_ids_matches_reference) {
    m1c_session s;
    char *ck = open_saved_model(&s);
    m1c_err e = {{0}};
    const int B = 3, Ts[] = {9, 600}, N = 6;
    static const char *const opts[][6] = {{"--greedy", NULL},
                                          {"--temperature", "0.9", NULL},
                                          {"--temperature", "0.7", "--top-k", "20", NULL},
                                          {"--top-p", "0.8", NULL},
                                          {"--temperature", "1.3", "--top-k", "40", "--top-p", "0.9"}};
    char *in = th_tmpdir_path("ids.npy"), *out = th_tmpdir_path("out.npy");
    for (int i = 0; i < 2; i++) {
        const int T = Ts[i], W = T + N;
        int32_t *prompt = random_ids(B * T, s.model.V, 20 + (uint64_t)i);
        cr_assert_eq(m1c_npy_write_i32(in, prompt, 2, (int64_t[]){B, T}, &e), M1C_OK, "%s", e.msg);
        for (int j = 0; j < NS; j++) {
            const char *args[20] = {"generate", "--checkpoint", ck, "--input", in, "--output", out, "--max-new", "6",
                                    "--seed", "7"};
            int a = 11;
            for (int k = 0; k < 6 && opts[j][k]; k++) args[a++] = opts[j][k];
            args[a] = NULL;
            char *err = NULL;
            cr_assert_eq(th_run_m1c(args, NULL, &err), 0, "m1c generate: %s", err);
            free(err);
            int32_t *want = malloc((size_t)B * W * sizeof *want);
            reference(&s.model, &samplers[j], prompt, B, T, T < 512 ? T : 512, N, 7, want, NULL);
            m1c_npy got;
            cr_assert_eq(m1c_npy_read(out, &got, &e), M1C_OK, "%s", e.msg);
            cr_assert_eq(got.ndim, 2);
            cr_assert_eq(got.shape[0], B);
            cr_assert_eq(got.shape[1], W);
            const int32_t *g = got.data;
            for (int k = 0; k < B * W; k++)
                cr_expect_eq(g[k], want[k], "T=%d sampler %d: row %d position %d: m1c %d, reference %d", T, j, k / W,
                             k % W, g[k], want[k]);
            m1c_npy_free(&got);
            free(want);
        }
        free(prompt);
    }
    m1c_session_close(&s);
    free(in), free(out), free(ck);
}

/* `m1c generate --prompt` prints the prompt and the decoded tokens of the reference loop (one row, the
 * tokenizer's encoding after its beginning-of-text token), stopping at end-of-text. */
Test(sample, cli_generate_prompt_matches_reference) {
    m1c_session s;
    char *ck = open_saved_model(&s);
    m1c_err e = {{0}};
    m1c_datamix mix;
    cr_assert_eq(m1c_datamix_open(&mix, &s, &s.spec.run.stages[0], &e), M1C_OK, "%s", e.msg);
    const m1c_data_vtable *dv = M1C_DATAMIX_TOKENIZER(&mix);
    const char *prompt = "Q: 12+7=?";
    int64_t len = (int64_t)strlen(prompt), n = dv->encode(mix.self[0], prompt, len, NULL, 0);
    int32_t *ids = malloc((size_t)(n + 1) * sizeof *ids);
    int T = 0;
    if (mix.bos >= 0) ids[T++] = mix.bos;
    T += (int)dv->encode(mix.self[0], prompt, len, ids + T, n);
    enum { N = 30 };
    for (int j = 0; j < NS; j++) {
        const uint64_t seed = 3 + (uint64_t)j;
        char seed_s[16];
        snprintf(seed_s, sizeof seed_s, "%llu", (unsigned long long)seed);
        const char *args[20] = {"generate", "--checkpoint", ck,  "--prompt", prompt,
                                "--max-new", "30",          "--seed", seed_s};
        int a = 9;
        char t_s[32], k_s[32], p_s[32];
        const m1c_sampler *sm = &samplers[j];
        snprintf(t_s, sizeof t_s, "%.9g", (double)sm->temperature);
        snprintf(k_s, sizeof k_s, "%d", sm->top_k);
        snprintf(p_s, sizeof p_s, "%.9g", (double)sm->top_p);
        if (sm->greedy) args[a++] = "--greedy";
        args[a++] = "--temperature", args[a++] = t_s, args[a++] = "--top-k", args[a++] = k_s;
        args[a++] = "--top-p", args[a++] = p_s, args[a] = NULL;
        char *out = NULL, *err = NULL;
        cr_assert_eq(th_run_m1c(args, &out, &err), 0, "m1c generate: %s", err);

        int32_t *seq = malloc((size_t)(T + N) * sizeof *seq);
        reference(&s.model, sm, ids, 1, T, T, N, seed, seq, NULL);
        char *want = malloc(strlen(prompt) + (size_t)N * 16 + 2);
        size_t w = strlen(prompt);
        memcpy(want, prompt, w);
        for (int t = 0; t < N && seq[T + t] != mix.eos; t++) {
            char text[16];
            int64_t k = dv->decode(mix.self[0], &seq[T + t], 1, text, sizeof text - 1);
            if (k > 0) memcpy(want + w, text, (size_t)k), w += (size_t)k;
        }
        want[w++] = '\n', want[w] = 0;
        cr_expect_str_eq(out, want, "sampler %d: m1c generate printed something else than the reference", j);
        free(out), free(err), free(seq), free(want);
    }
    free(ids);
    m1c_datamix_close(&mix);
    m1c_session_close(&s);
    free(ck);
}
