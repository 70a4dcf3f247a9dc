/* Sampling a token from logits: greedy, temperature, top-k, top-p (nucleus). */
#ifndef M1C_SAMPLE_H
#define M1C_SAMPLE_H

#include "m1c/plugin.h"

typedef struct m1c_sampler {
    int greedy;
    float temperature; /* > 0 */
    int top_k;         /* 0: off */
    float top_p;       /* 1: off */
} m1c_sampler;

/* logits (V) are left unchanged; work (2V floats + V ints) is caller-provided scratch. Returns the id
 * and, if prob != NULL, its probability under the sampling distribution. */
int32_t m1c_sample(const m1c_sampler *s, const float *logits, int V, m1c_rng *rng, float *work, int32_t *iwork,
                   float *prob);

#endif
