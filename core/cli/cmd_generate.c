/* m1c generate: continue a text prompt (printing tokens as they come) or token ids from a .npy file
 * (writing the ids), with the model of an m1c checkpoint or of a Hugging Face checkpoint. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../checkpoint.h"
#include "../datamix.h"
#include "../hf.h"
#include "../npy.h"
#include "../rng.h"
#include "../sample.h"
#include "../session.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c generate (--checkpoint DIR | --hf HF_DIR) (--prompt TEXT | --input IDS.npy --output OUT.npy)\n"
    "                    [options]\n\n"
    "Continues TEXT with the model, printing tokens as they are sampled (the tokenizer is the first stage's\n"
    "data plugin), or continues each row of IDS.npy (int32 or int64 [B, T]) by exactly --max-new tokens and\n"
    "writes the rows, prompt included, to OUT.npy (int32 [B, T + N]; no tokenizer needed, no stop at\n"
    "end-of-text). The prompt is prefilled in one pass (KV cache for softmax layers, the recurrent state for\n"
    "lightning layers), then each new token costs one decoding step.\n\n"
    "  --checkpoint DIR   an m1c checkpoint\n"
    "  --hf HF_DIR        a Hugging Face MiniMax checkpoint, translated as import-hf does (docs/hf.md);\n"
    "                     with --greedy the tokens are transformers' generate(do_sample=False)\n"
    "  --max-new N        tokens to generate (default 200); stops early at end-of-text\n"
    "  --greedy           always the most likely token\n"
    "  --temperature T    sampling temperature (default 1.0)\n"
    "  --top-k K          sample among the K most likely tokens (default 0: all)\n"
    "  --top-p P          nucleus sampling: the smallest set with probability >= P (default 1.0: all)\n"
    "  --seed N           sampling seed (default 0)\n"
    "  -s key.path=value  override a setting of the checkpoint's configuration\n";

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    double v = strtod(s, &end);
    if (*end || end == s || v < lo || v > hi)
        return m1c_cli_error("generate: %s: expected a number in [%g, %g], got '%s'", opt, lo, hi, s);
    *out = v;
    return 0;
}

static int generate(m1c_session *s, const char *prompt, int max_new, const m1c_sampler *sm, uint64_t seed,
                    m1c_err *e) {
    m1c_model *m = &s->model;
    m1c_datamix mix;
    if (m1c_datamix_open(&mix, s, &s->spec.run.stages[0], e)) {
        m1c_datamix_close(&mix);
        return M1C_ERR;
    }
    const m1c_data_vtable *dv = M1C_DATAMIX_TOKENIZER(&mix);
    void *data = mix.self[0];
    int32_t bos = mix.bos, eos = mix.eos;
    int64_t len = (int64_t)strlen(prompt);
    int64_t n = dv->encode(data, prompt, len, NULL, 0);
    int32_t *ids = m1c_xmalloc((size_t)(n + 2) * sizeof *ids);
    int64_t k = 0;
    if (bos >= 0) ids[k++] = bos;
    k += dv->encode(data, prompt, len, ids + k, n);
    if (k < 1) {
        free(ids);
        m1c_datamix_close(&mix);
        return m1c_fail(e, "generate: the prompt is empty and the tokenizer has no beginning-of-text token");
    }
    int chunk = k < 512 ? (int)k : 512;
    m1c_decoder d;
    int rc = m1c_decoder_init(&d, m, 1, k + max_new, chunk, e);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 0);
    fputs(prompt, stdout);
    /* The prompt's last chunk also samples the first new token; the logits never leave the device. */
    int32_t id = -1;
    for (int64_t i = 0; i < k && !rc; i += chunk) {
        int T = (int)(k - i < chunk ? k - i : chunk);
        rc = i + T == k && max_new > 0 ? m1c_decoder_feed_sample(m, &d, ids + i, T, sm, &rng, &id, NULL, e)
                                       : m1c_decoder_feed(m, &d, ids + i, T, NULL, e);
    }
    for (int t = 0; t < max_new && !rc; t++) {
        if (id == eos) break;
        char text[16];
        int64_t w = dv->decode(data, &id, 1, text, sizeof text - 1);
        if (w > 0) fwrite(text, 1, (size_t)w, stdout);
        fflush(stdout);
        if (t + 1 < max_new) rc = m1c_decoder_feed_sample(m, &d, &id, 1, sm, &rng, &id, NULL, e);
    }
    fputc('\n', stdout);
    m1c_decoder_free(&d, m);
    free(ids);
    m1c_datamix_close(&mix);
    return rc;
}

/* Continue every row of the ids in `in` by max_new tokens; write prompt + continuation to `out`. */
static int generate_ids(m1c_session *s, const char *in, const char *out, int max_new, const m1c_sampler *sm,
                        uint64_t seed, m1c_err *e) {
    m1c_model *m = &s->model;
    m1c_npy a = {0};
    if (m1c_npy_read(in, &a, e) || m1c_npy_to_i32(&a, in, e)) {
        m1c_npy_free(&a);
        return M1C_ERR;
    }
    if (a.ndim != 2 || a.shape[0] < 1 || a.shape[1] < 1) {
        m1c_npy_free(&a);
        return m1c_fail(e, "%s: expected token ids of shape [B, T] with B, T >= 1", in);
    }
    const int B = (int)a.shape[0], T = (int)a.shape[1], V = m->V, W = T + max_new;
    const int32_t *ids = a.data;
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (ids[i] < 0 || ids[i] >= V) {
            m1c_npy_free(&a);
            return m1c_fail(e, "%s: token id %d at flat index %lld is outside the vocabulary [0, %d)", in, ids[i],
                            (long long)i, V);
        }
    int32_t *seq = m1c_xmalloc((size_t)B * W * sizeof *seq), *chunk_ids = m1c_xmalloc((size_t)B * 512 * sizeof *seq);
    for (int b = 0; b < B; b++) memcpy(seq + (int64_t)b * W, ids + (int64_t)b * T, (size_t)T * sizeof *seq);
    const int chunk = T < 512 ? T : 512;
    m1c_decoder d;
    int rc = m1c_decoder_init(&d, m, B, W, chunk, e);
    int32_t *next = m1c_xmalloc((size_t)B * sizeof *next);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 0);
    /* Prefill chunk by chunk; the last chunk also samples the first new tokens. Sampling runs on the
     * model's device, rows in order (m1c_sample_rows), so only B ids per step come back from a GPU. */
    for (int t0 = 0; t0 < T && !rc; t0 += chunk) {
        const int n = T - t0 < chunk ? T - t0 : chunk;
        for (int b = 0; b < B; b++) memcpy(chunk_ids + (int64_t)b * n, ids + (int64_t)b * T + t0, (size_t)n * sizeof *seq);
        rc = t0 + n == T && max_new > 0 ? m1c_decoder_feed_sample(m, &d, chunk_ids, n, sm, &rng, next, NULL, e)
                                        : m1c_decoder_feed(m, &d, chunk_ids, n, NULL, e);
    }
    for (int t = 0; t < max_new && !rc; t++) {
        for (int b = 0; b < B; b++) seq[(int64_t)b * W + T + t] = next[b];
        if (t + 1 < max_new) rc = m1c_decoder_feed_sample(m, &d, next, 1, sm, &rng, next, NULL, e);
    }
    int64_t shape[2] = {B, W};
    if (!rc) rc = m1c_npy_write_i32(out, seq, 2, shape, e);
    m1c_decoder_free(&d, m);
    free(next);
    free(seq);
    free(chunk_ids);
    m1c_npy_free(&a);
    return rc;
}

int m1c_cmd_generate(int argc, char **argv) {
    const char *ckpt = NULL, *hf = NULL, *prompt = NULL, *in = NULL, *out = NULL;
    m1c_overrides ov = {0};
    m1c_sampler sm = {0, 1.0f, 0, 1.0f};
    double max_new = 200, seed = 0, x = 0;
    int bad = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (!strcmp(a, "--greedy")) {
            sm.greedy = 1;
        } else if (!v) {
            bad = m1c_cli_error("generate: unexpected argument '%s' (see m1c generate --help)", a);
        } else if (!strcmp(a, "--checkpoint")) {
            ckpt = argv[++i];
        } else if (!strcmp(a, "--hf")) {
            hf = argv[++i];
        } else if (!strcmp(a, "--prompt")) {
            prompt = argv[++i];
        } else if (!strcmp(a, "--input")) {
            in = argv[++i];
        } else if (!strcmp(a, "--output")) {
            out = argv[++i];
        } else if (!strcmp(a, "-s")) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strcmp(a, "--max-new")) {
            bad = parse_num(a, argv[++i], 0, 1e7, &max_new);
        } else if (!strcmp(a, "--temperature")) {
            bad = parse_num(a, argv[++i], 1e-4, 100, &x);
            sm.temperature = (float)x;
        } else if (!strcmp(a, "--top-k")) {
            bad = parse_num(a, argv[++i], 0, 1e9, &x);
            sm.top_k = (int)x;
        } else if (!strcmp(a, "--top-p")) {
            bad = parse_num(a, argv[++i], 1e-6, 1, &x);
            sm.top_p = (float)x;
        } else if (!strcmp(a, "--seed")) {
            bad = parse_num(a, argv[++i], 0, 1e18, &seed);
        } else {
            bad = m1c_cli_error("generate: unexpected argument '%s' (see m1c generate --help)", a);
        }
    }
    if (bad) {
        m1c_overrides_free(&ov);
        return bad;
    }
    if (!ckpt == !hf || !prompt == !in || !in != !out) {
        m1c_overrides_free(&ov);
        return m1c_cli_error("generate: give one of --checkpoint and --hf, and either --prompt or --input with "
                             "--output (see m1c generate --help)");
    }
    m1c_err e = {{0}};
    m1c_session s;
    int rc = hf ? m1c_hf_open(&s, hf, ov.items, ov.n, &e) : m1c_session_open_checkpoint(&s, ckpt, ov.items, ov.n, &e);
    if (!rc && prompt && s.spec.run.n_stages < 1)
        rc = m1c_fail(&e,
                      "%s: the configuration has no training stage, so no tokenizer for --prompt (an imported "
                      "model?): give token ids with --input IDS.npy --output OUT.npy",
                      hf ? hf : ckpt);
    if (!rc) rc = prompt ? generate(&s, prompt, (int)max_new, &sm, (uint64_t)seed, &e)
                         : generate_ids(&s, in, out, (int)max_new, &sm, (uint64_t)seed, &e);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    return rc ? m1c_cli_error("%s", e.msg) : 0;
}
