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
    int64_t overlapped; /* steps whose optimizer step overlapped the backward (m1c_overlap) */
    char last_checkpoint[1024];
} m1c_train_result;

int m1c_train(m1c_session *s, const m1c_train_opts *o, m1c_train_result *res, m1c_err *e);

/* The optimizer's step overlapped with the backward (GPU): m1c_backward_overlapped runs
 * m1c_model_backward while stepping each layer's parameters on the device's low-priority background
 * stream as soon as their gradients are complete (m1c_run.grads_ready), then orders the core's stream
 * after those steps. The same arithmetic as one step after the backward, element for element (the
 * results are identical); but the gradients must not need the whole backward first, as clipping by
 * their global norm does. */
typedef struct m1c_overlap {
    m1c_model *m;
    m1c_plugin *plugin; /* the optimizer */
    void *opt;
    int n_state;
    m1c_optim_step os; /* the whole model's step: what each layer's step is cut from */
    m1c_run *run;      /* set by m1c_backward_overlapped (its grads_err gets a failure) */
} m1c_overlap;

int m1c_backward_overlapped(m1c_overlap *o, m1c_run *r, m1c_err *e);
/* Zeroes the gradients for the next backward (m1c_model_zero_grads: those the plugins write whole are only
 * marked): on the device's background stream where the step overlaps (the next forward, which does not
 * touch them, runs beside it; m1c_backward_overlapped orders the backward after it), else at once on the
 * core's stream. */
void m1c_zero_grads(m1c_model *m, int overlap);
/* Whether a step may overlap the backward: on a GPU, without clipping (clip <= 0), with an optimizer
 * built for ABI 1.1 or later (whose contract takes its tensors in slices: plugin.h). */
int m1c_overlap_possible(const m1c_model *m, const m1c_plugin *opt, double clip);
/* The whole model's step arguments: its tensors, the optimizer's state (n_state tensors per parameter,
 * in parameter order), the step number and learning rate; on the device's core stream. */
m1c_optim_step m1c_optim_step_of(m1c_model *m, m1c_tensor *state, int64_t step, float lr);

/* Learning rate at optimizer step `step` (1-based) of a stage. */
double m1c_schedule_lr(const m1c_schedule_spec *sc, int64_t step, int64_t steps);

#endif
