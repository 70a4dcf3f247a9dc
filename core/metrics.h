/* Metrics as JSON Lines: one object per line (per step, per evaluation), flushed as written, so a
 * running job can be plotted with any JSON-aware tool. */
#ifndef M1C_METRICS_H
#define M1C_METRICS_H

#include <stdio.h>
#include "util.h"

typedef struct m1c_metrics {
    FILE *f;
    char *path;
} m1c_metrics;

/* Append to path (created with its directory if missing). */
int m1c_metrics_open(m1c_metrics *m, const char *path, m1c_err *e);
void m1c_metrics_close(m1c_metrics *m);
/* Write one record: n (key, value) pairs of numbers, plus the stage name and the step. */
void m1c_metrics_write(m1c_metrics *m, const char *stage, int64_t step, const char *const *keys, const double *values,
                       int n);

/* mkdir -p */
int m1c_mkdirs(const char *path, m1c_err *e);

#endif
