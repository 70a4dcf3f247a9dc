/* Token sampling: the distribution is softmax(logits / temperature), cut to the top_k most likely
 * tokens and then to the smallest set whose probability reaches top_p, renormalised. */
#include "sample.h"

#include <math.h>
#include <stdlib.h>

#include "rng.h"

static int by_prob_desc(const void *a, const void *b, void *p) {
    const float *pr = p;
    float x = pr[*(const int32_t *)a], y = pr[*(const int32_t *)b];
    return x < y ? 1 : x > y ? -1 : (*(const int32_t *)a - *(const int32_t *)b);
}

int32_t m1c_sample(const m1c_sampler *s, const float *logits, int V, m1c_rng *rng, float *work, int32_t *iwork,
                   float *prob) {
    int32_t best = 0;
    for (int v = 1; v < V; v++)
        if (logits[v] > logits[best]) best = v;
    if (s->greedy || s->temperature <= 0) {
        if (prob) *prob = 1.0f;
        return best;
    }
    float *p = work;
    double sum = 0;
    for (int v = 0; v < V; v++) sum += p[v] = expf((logits[v] - logits[best]) / s->temperature);
    for (int v = 0; v < V; v++) p[v] = (float)(p[v] / sum), iwork[v] = v;
    int n = V;
    if ((s->top_k > 0 && s->top_k < V) || s->top_p < 1.0f) {
        qsort_r(iwork, (size_t)V, sizeof *iwork, by_prob_desc, p);
        if (s->top_k > 0 && s->top_k < n) n = s->top_k;
        if (s->top_p < 1.0f) {
            double c = 0;
            for (int i = 0; i < n; i++)
                if ((c += p[iwork[i]]) >= s->top_p) {
                    n = i + 1;
                    break;
                }
        }
    }
    double mass = 0;
    for (int i = 0; i < n; i++) mass += p[iwork[i]];
    double u = (double)m1c_rng_uniform(rng) * mass, c = 0;
    for (int i = 0; i < n; i++) {
        c += p[iwork[i]];
        if (u < c || i == n - 1) {
            if (prob) *prob = (float)(p[iwork[i]] / mass);
            return iwork[i];
        }
    }
    return best;
}
