/* m1c logits (--checkpoint DIR | --hf HF_DIR) --input IDS.npy --output LOGITS.npy: the model's logits
 * for token ids (an m1c checkpoint, or a Hugging Face MiniMax checkpoint read directly). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../checkpoint.h"
#include "../hf.h"
#include "../host.h"
#include "../npy.h"
#include "../session.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c logits (--checkpoint DIR | --hf HF_DIR) --input IDS.npy --output LOGITS.npy [-s key=value ...]\n\n"
    "Reads token ids, an int32 or int64 NumPy array [B, T], runs the model over them (one full forward,\n"
    "FP32 head) and writes the logits as a float32 NumPy array [B, T, V].\n\n"
    "  --checkpoint DIR   an m1c checkpoint (model.safetensors, m1c.cfg)\n"
    "  --hf HF_DIR        a Hugging Face MiniMax checkpoint (config.json, model*.safetensors), translated as\n"
    "                     import-hf does (docs/hf.md); its logits match transformers' to ~1e-5\n"
    "  -s key.path=value  override a setting of the model's configuration\n";

static int logits(m1c_session *s, const char *in, const char *out, m1c_err *e) {
    m1c_npy a = {0};
    if (m1c_npy_read(in, &a, e) || m1c_npy_to_i32(&a, in, e)) {
        m1c_npy_free(&a);
        return M1C_ERR;
    }
    int rc = M1C_OK;
    if (a.ndim != 2 || a.shape[0] < 1 || a.shape[1] < 1) {
        rc = m1c_fail(e, "%s: expected token ids of shape [B, T], got %d dimensions", in, a.ndim);
        m1c_npy_free(&a);
        return rc;
    }
    int B = (int)a.shape[0], T = (int)a.shape[1], V = s->model.V;
    const int32_t *ids = a.data;
    int32_t *tokens = m1c_xmalloc((size_t)B * (T + 1) * sizeof *tokens);
    for (int b = 0; b < B; b++) {
        memcpy(tokens + (int64_t)b * (T + 1), ids + (int64_t)b * T, (size_t)T * sizeof *tokens);
        tokens[(int64_t)b * (T + 1) + T] = -1; /* no target after the last position */
    }
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (ids[i] < 0 || ids[i] >= V) {
            rc = m1c_fail(e, "%s: token id %d at flat index %lld is outside the vocabulary [0, %d)", in, ids[i],
                          (long long)i, V);
            break;
        }
    m1c_run r;
    if (!rc) rc = m1c_run_init(&r, &s->model, B, T, 0, e);
    if (!rc) {
        /* The targets are the next ids (the last one unscored): logits do not depend on them. */
        rc = m1c_model_forward(&s->model, &r, tokens, e);
        int64_t shape[3] = {B, T, V};
        float *host = r.logits;
        if (!rc && s->model.device != M1C_DEVICE_CPU) {
            host = m1c_xmalloc((size_t)B * T * V * sizeof *host);
            m1c_dev_copy(M1C_DEVICE_CPU, host, s->model.device, r.logits, (size_t)B * T * V * sizeof *host);
        }
        if (!rc) rc = m1c_npy_write_f32(out, host, 3, shape, e);
        if (host != r.logits) free(host);
        m1c_run_free(&r, &s->model);
    }
    free(tokens);
    m1c_npy_free(&a);
    return rc;
}

int m1c_cmd_logits(int argc, char **argv) {
    const char *ckpt = NULL, *hf = NULL, *in = NULL, *out = NULL;
    m1c_overrides ov = {0};
    int rc = 0;
    for (int i = 1; i < argc && !rc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (i + 1 >= argc) {
            rc = m1c_cli_error("logits: unexpected argument '%s' (see m1c logits --help)", argv[i]);
        } else if (!strcmp(argv[i], "--checkpoint")) {
            ckpt = argv[++i];
        } else if (!strcmp(argv[i], "--input")) {
            in = argv[++i];
        } else if (!strcmp(argv[i], "--output")) {
            out = argv[++i];
        } else if (!strcmp(argv[i], "-s")) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strcmp(argv[i], "--hf")) {
            hf = argv[++i];
        } else {
            rc = m1c_cli_error("logits: unexpected argument '%s' (see m1c logits --help)", argv[i]);
        }
    }
    if (!rc && (!ckpt == !hf || !in || !out))
        rc = m1c_cli_error("logits: one of --checkpoint and --hf, and --input and --output are required (see m1c "
                           "logits --help)");
    if (rc) {
        m1c_overrides_free(&ov);
        return rc;
    }
    m1c_err e = {{0}};
    m1c_session s;
    rc = hf ? m1c_hf_open(&s, hf, ov.items, ov.n, &e) : m1c_session_open_checkpoint(&s, ckpt, ov.items, ov.n, &e);
    if (!rc) rc = logits(&s, in, out, &e);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    return rc ? m1c_cli_error("%s", e.msg) : 0;
}
