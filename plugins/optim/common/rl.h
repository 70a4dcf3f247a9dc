/* What the RL objectives (cispo, grpo, dapo) share: the batch checks, GRPO-style group-normalised
 * advantages and the metric writer. Header-only (static inline), so each plugin stays one .so. */
#ifndef M1C_OPTIM_COMMON_RL_H
#define M1C_OPTIM_COMMON_RL_H

#include <math.h>
#include "m1c/plugin.h"

/* An RL batch needs per-sequence rewards and a whole number of groups of b->group responses. */
static inline int rl_check_batch(const m1c_host *h, const m1c_objective_batch *b, const char *who) {
    if (!b->reward) return h->error(h, "%s needs per-sequence rewards (batch reward is NULL)", who);
    if (b->group < 1 || b->B < 0 || b->B % b->group != 0)
        return h->error(h, "%s: batch of %d sequences is not a whole number of groups of %d", who, (int)b->B,
                        (int)b->group);
    return M1C_OK;
}

/* adv[s] for the B sequences, groups of G consecutive ones: R_s = reward[s] (+ shaping[s], e.g. DAPO's
 * overlong penalty, when not NULL), A_s = (R_s - mean) / (std + adv_eps), or R_s - mean without
 * std_normalize. mean and std are the group's population statistics (G = 2, rewards {1, 0}: std 0.5 and
 * A = +-1, as GRPO's normalisation intends). A group whose rewards are all equal has no signal: A = 0,
 * also where adv_eps = 0 would make it 0/0. */
static inline void rl_advantages(const float *reward, const double *shaping, int B, int G, int std_normalize,
                                 double adv_eps, double *adv) {
    for (int g = 0; g < B / G; g++) {
        const int s0 = g * G;
        double sum = 0.0, ss = 0.0;
        for (int s = s0; s < s0 + G; s++) sum += reward[s] + (shaping ? shaping[s] : 0.0);
        const double mean = sum / G;
        for (int s = s0; s < s0 + G; s++) {
            const double d = reward[s] + (shaping ? shaping[s] : 0.0) - mean;
            ss += d * d;
        }
        const double std = sqrt(ss / G);
        for (int s = s0; s < s0 + G; s++) {
            const double d = reward[s] + (shaping ? shaping[s] : 0.0) - mean;
            adv[s] = std == 0.0 ? 0.0 : (std_normalize ? d / (std + adv_eps) : d);
        }
    }
}

/* Append one metric if there is room; returns the new count. */
static inline int rl_metric(const char **names, double *values, int max, int n, const char *name, double v) {
    if (n >= max) return n;
    names[n] = name;
    values[n] = v;
    return n + 1;
}

#endif
