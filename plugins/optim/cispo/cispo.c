/* CISPO objective, MiniMax-M1's RL loss: REINFORCE on log pi weighted by a clipped, stop-gradient
 * importance-sampling ratio, so that every token (clipped or not) keeps a gradient. See MODEL.md. */
#include <math.h>
#include <stdlib.h>
#include "m1c/plugin.h"
#include "../common/rl.h"

typedef struct cispo {
    const m1c_host *h;
    double eps_low;  /* r^ >= 1 - eps_low; M1 sets it large: no lower bound */
    double eps_high; /* r^ <= 1 + eps_high; the one bound M1 tunes */
    double adv_eps;  /* A = (R - mean) / (std + adv_eps) */
    int std_normalize;
    int token_mask; /* the unified form's M_it (PPO's trust region); M1 leaves it off */
} cispo;

static int cispo_create(const m1c_host *h, const m1c_settings *s, void **self) {
    double el, eh, ae;
    int sn, tm;
    *self = NULL;
    /* 1e9: r > 0 always, so 1 - 1e9 is no bound at all (M1's choice). */
    if (h->get_float(h, s, "eps_low", 1e9, 0.0, 1e9, &el) != M1C_OK) return M1C_ERR;
    /* 0.28: DAPO's clip-higher value, also Trinity-RFT's CISPO default; M1 does not publish its own. */
    if (h->get_float(h, s, "eps_high", 0.28, 0.0, 1e9, &eh) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "adv_eps", 1e-6, 0.0, 1.0, &ae) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "std_normalize", 1, &sn) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "token_mask", 0, &tm) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    cispo *c = calloc(1, sizeof *c);
    if (!c) return h->error(h, "out of memory creating the objective");
    c->h = h;
    c->eps_low = el;
    c->eps_high = eh;
    c->adv_eps = ae;
    c->std_normalize = sn;
    c->token_mask = tm;
    *self = c;
    return M1C_OK;
}

static void cispo_destroy(void *self) { free(self); }

/* J = 1/sum(mask) * sum mask * M * sg(r^) * A * logp; loss = -J; dlogp = -mask * M * r^ * A / sum(mask). */
static int cispo_loss(void *self, const m1c_objective_batch *b, double *loss, float *dlogp,
                      const char **names, double *values, int max_metrics) {
    const cispo *c = self;
    const m1c_host *h = c->h;
    const int B = b->B, T = b->T, G = b->group;
    if (rl_check_batch(h, b, "cispo") != M1C_OK) return M1C_ERR;
    double *adv = malloc(sizeof(double) * (size_t)(B > 0 ? B : 1));
    if (!adv) return h->error(h, "cispo: out of memory for %d advantages", B);
    rl_advantages(b->reward, NULL, B, G, c->std_normalize, c->adv_eps, adv);
    const int64_t N = (int64_t)B * T;
    const double lo = 1.0 - c->eps_low, hi = 1.0 + c->eps_high;

    double msum = 0.0;
    for (int64_t i = 0; i < N; i++) msum += b->mask ? b->mask[i] : 1.0;
    const double scale = msum > 0.0 ? 1.0 / msum : 0.0;

    double J = 0.0, clipped = 0.0, rsum = 0.0, masked = 0.0, asum = 0.0, aabs = 0.0, rew = 0.0;
    for (int s = 0; s < B; s++) {
        const double A = adv[s];
        asum += A;
        aabs += fabs(A);
        rew += b->reward[s];
        for (int t = 0; t < T; t++) {
            const int64_t i = (int64_t)s * T + t;
            const double m = b->mask ? b->mask[i] : 1.0;
            const double r = b->old_logp ? exp((double)b->logp[i] - b->old_logp[i]) : 1.0;
            const double rc = r < lo ? lo : (r > hi ? hi : r);
            /* The trust-region mask drops tokens whose ratio already moved past the bound in the
             * direction the advantage pushes. */
            const double M = c->token_mask && ((A > 0 && r > hi) || (A < 0 && r < lo)) ? 0.0 : 1.0;
            const double w = m * M * rc * A;
            J += w * b->logp[i];
            dlogp[i] = (float)(-w * scale);
            if (r < lo || r > hi) clipped += m;
            if (M == 0.0) masked += m;
            rsum += m * r;
        }
    }
    free(adv);
    *loss = -J * scale;

    int n = 0;
    n = rl_metric(names, values, max_metrics, n, "clip_frac", clipped * scale);
    n = rl_metric(names, values, max_metrics, n, "ratio_mean", msum > 0.0 ? rsum * scale : 1.0);
    n = rl_metric(names, values, max_metrics, n, "adv_mean", B > 0 ? asum / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "adv_abs", B > 0 ? aabs / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "reward_mean", B > 0 ? rew / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "token_mask_frac", masked * scale);
    n = rl_metric(names, values, max_metrics, n, "tokens", msum);
    return n;
}

static const m1c_objective_vtable cispo_vtable = {
    .size = sizeof(m1c_objective_vtable),
    .create = cispo_create,
    .destroy = cispo_destroy,
    .loss = cispo_loss,
};

M1C_PLUGIN(OBJECTIVE, objective, cispo_vtable, "cispo", "0.1.0",
           "CISPO (MiniMax-M1): clipped stop-gradient IS weight times advantage times log pi", "MIT")
