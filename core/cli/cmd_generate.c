/* m1c generate --checkpoint DIR --prompt TEXT: sample a continuation, printing tokens as they come. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../checkpoint.h"
#include "../datamix.h"
#include "../rng.h"
#include "../sample.h"
#include "../session.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c generate --checkpoint DIR --prompt TEXT [options]\n\n"
    "Continues TEXT with the model of a checkpoint, printing tokens as they are sampled. The prompt is\n"
    "prefilled in one pass (KV cache for softmax layers, the recurrent state for lightning layers), then\n"
    "each new token costs one decoding step.\n\n"
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
    int chunk = k < 512 ? (int)k : 512;
    m1c_decoder d;
    int rc = m1c_decoder_init(&d, m, 1, k + max_new, chunk, e);
    float *logits = m1c_xmalloc((size_t)m->V * 3 * sizeof *logits);
    int32_t *iwork = m1c_xmalloc((size_t)m->V * sizeof *iwork);
    m1c_rng rng;
    m1c_rng_seed(&rng, seed, 0);
    fputs(prompt, stdout);
    for (int64_t i = 0; i < k && !rc; i += chunk) {
        int T = (int)(k - i < chunk ? k - i : chunk);
        rc = m1c_decoder_feed(m, &d, ids + i, T, logits, e);
    }
    for (int t = 0; t < max_new && !rc; t++) {
        int32_t id = m1c_sample(sm, logits, m->V, &rng, logits + m->V, iwork, NULL);
        if (id == eos) break;
        char text[16];
        int64_t w = dv->decode(data, &id, 1, text, sizeof text - 1);
        if (w > 0) fwrite(text, 1, (size_t)w, stdout);
        fflush(stdout);
        rc = m1c_decoder_feed(m, &d, &id, 1, logits, e);
    }
    fputc('\n', stdout);
    m1c_decoder_free(&d, m);
    free(logits);
    free(iwork);
    free(ids);
    m1c_datamix_close(&mix);
    return rc;
}

int m1c_cmd_generate(int argc, char **argv) {
    const char *ckpt = NULL, *prompt = NULL;
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
        } else if (!strcmp(a, "--prompt")) {
            prompt = argv[++i];
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
    if (!ckpt || !prompt) {
        m1c_overrides_free(&ov);
        return m1c_cli_error("generate: --checkpoint and --prompt are required (see m1c generate --help)");
    }
    m1c_err e = {{0}};
    m1c_session s;
    int rc = m1c_session_open_checkpoint(&s, ckpt, ov.items, ov.n, &e);
    if (!rc && s.spec.run.n_stages < 1) rc = m1c_fail(&e, "%s: the configuration has no stage (no tokenizer)", ckpt);
    if (!rc) rc = generate(&s, prompt, (int)max_new, &sm, (uint64_t)seed, &e);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    return rc ? m1c_cli_error("%s", e.msg) : 0;
}
