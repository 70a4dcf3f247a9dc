/* The stage runner: runs the stages of a session's run (pre-training and SFT today), with progress,
 * metrics, validation, checkpoints and exact resume. */
#ifndef M1C_TRAIN_H
#define M1C_TRAIN_H

#include "session.h"

typedef struct m1c_train_opts {
    const char *resume; /* a checkpoint directory to continue from, or NULL */
    const char *init;   /* a checkpoint whose parameters start the run (fine-tuning), or NULL */
    int quiet;          /* no progress lines */
    int64_t max_steps;  /* stop after this many steps in this invocation (0 = no limit): tests resume */
} m1c_train_opts;

/* Summary of what ran, for callers (ablate, tests). */
typedef struct m1c_train_result {
    double last_loss, last_val_loss, unigram_entropy;
    int64_t steps;
    double tokens_per_s;
    char last_checkpoint[1024];
} m1c_train_result;

int m1c_train(m1c_session *s, const m1c_train_opts *o, m1c_train_result *res, m1c_err *e);

/* Learning rate at optimizer step `step` (1-based) of a stage. */
double m1c_schedule_lr(const m1c_schedule_spec *sc, int64_t step, int64_t steps);

#endif
