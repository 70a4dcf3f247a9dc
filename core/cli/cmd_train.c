/* m1c train CONFIG: run the stages of a config. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../train.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c train CONFIG [-s key.path=value ...] [--resume DIR | --init DIR] [--max-steps N] [--quiet]\n\n"
    "Runs the stages listed in run.stages of CONFIG, in order (pre-training and SFT today).\n"
    "Prints a progress line (step, loss, lr, gradient norm, tokens/s, ETA), writes metrics as JSON Lines to\n"
    "<run.out_dir>/metrics.jsonl and checkpoints to <run.out_dir>/<stage>/step-NNNNNN/ (safetensors with\n"
    "Hugging Face parameter names, trainer.json, m1c.cfg).\n\n"
    "  -s key.path=value   override a setting (repeatable), e.g. -s run.stages.[0].steps=100\n"
    "  --resume DIR        continue from a checkpoint: the continuation repeats the uninterrupted run\n"
    "  --init DIR          start from the parameters of a checkpoint (an imported Hugging Face model, a\n"
    "                      pre-training run): fresh optimizer, data and step count, e.g. for SFT\n"
    "  --max-steps N       stop (with a checkpoint) after N steps of this invocation\n"
    "  --quiet             no progress lines\n";

int m1c_cmd_train(int argc, char **argv) {
    const char *config = NULL;
    m1c_overrides ov = {0};
    m1c_train_opts o = {0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strcmp(argv[i], "--resume") && i + 1 < argc) {
            o.resume = argv[++i];
        } else if (!strcmp(argv[i], "--init") && i + 1 < argc) {
            o.init = argv[++i];
        } else if (!strcmp(argv[i], "--max-steps") && i + 1 < argc) {
            char *end;
            o.max_steps = strtoll(argv[++i], &end, 10);
            if (*end || o.max_steps <= 0) {
                m1c_overrides_free(&ov);
                return m1c_cli_error("train: --max-steps: expected a positive integer, got '%s'", argv[i]);
            }
        } else if (!strcmp(argv[i], "--quiet")) {
            o.quiet = 1;
        } else if (argv[i][0] == '-' || config) {
            m1c_overrides_free(&ov);
            return m1c_cli_error("train: unexpected argument '%s' (see m1c train --help)", argv[i]);
        } else {
            config = argv[i];
        }
    }
    if (!config) {
        m1c_overrides_free(&ov);
        return m1c_cli_error("train: missing CONFIG (see m1c train --help)");
    }
    m1c_session s;
    m1c_err e = {{0}};
    m1c_train_result res;
    int rc = m1c_session_open(&s, config, ov.items, ov.n, &e);
    if (!rc) rc = m1c_train(&s, &o, &res, &e);
    m1c_session_close(&s);
    m1c_overrides_free(&ov);
    if (rc) return m1c_cli_error("%s", e.msg);
    fprintf(stderr, "done: %lld steps, loss %.4f, validation loss %.4f, %.0f tokens/s; checkpoint %s\n",
            (long long)res.steps, res.last_loss, res.last_val_loss, res.tokens_per_s, res.last_checkpoint);
    return 0;
}
