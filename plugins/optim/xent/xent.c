/* Cross-entropy objective for pre-training and SFT: the mean negative log-likelihood of the target
 * tokens the mask selects (SFT masks the prompt out, so only response tokens count). */
#include <stddef.h>
#include "m1c/plugin.h"

/* No settings and no state: self is a non-NULL token so callers can tell "created" from "failed". */
static const int xent_self;

static int xent_create(const m1c_host *h, const m1c_settings *s, void **self) {
    *self = NULL;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    *self = (void *)&xent_self;
    return M1C_OK;
}

static void xent_destroy(void *self) { (void)self; }

/* loss = -sum(mask * logp) / sum(mask); dlogp = -mask / sum(mask). A NULL mask counts every token.
 * No counted token: loss 0 and dlogp 0 (nothing to learn from, and no 0/0). */
static int xent_loss(void *self, const m1c_objective_batch *b, double *loss, float *dlogp, const char **names,
                     double *values, int max_metrics) {
    (void)self;
    const int64_t N = (int64_t)b->B * b->T;
    double msum = 0.0, lsum = 0.0;
    for (int64_t i = 0; i < N; i++) {
        const double m = b->mask ? b->mask[i] : 1.0;
        msum += m;
        lsum += m * b->logp[i];
    }
    const double scale = msum > 0.0 ? 1.0 / msum : 0.0;
    *loss = -lsum * scale;
    for (int64_t i = 0; i < N; i++) dlogp[i] = (float)(-(b->mask ? b->mask[i] : 1.0) * scale);
    int n = 0;
    if (n < max_metrics) {
        names[n] = "tokens";
        values[n++] = msum;
    }
    return n;
}

static const m1c_objective_vtable xent_vtable = {
    .size = sizeof(m1c_objective_vtable),
    .create = xent_create,
    .destroy = xent_destroy,
    .loss = xent_loss,
};

M1C_PLUGIN(OBJECTIVE, objective, xent_vtable, "xent", "0.1.0",
           "cross-entropy on the masked target tokens (pre-training, SFT)", "MIT")
