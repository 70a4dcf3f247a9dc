/* GRPO objective, the PPO-clip baseline CISPO is compared against: min(r A, clip(r, 1-eps, 1+eps) A) per
 * token, averaged over each sequence's tokens then over sequences, with an optional k3 KL penalty. */
#include <math.h>
#include <stdlib.h>
#include "m1c/plugin.h"
#include "../common/rl.h"

typedef struct grpo {
    const m1c_host *h;
    double eps;     /* PPO clip range */
    double kl_coef; /* weight of the k3 KL estimate to ref_logp; 0: no KL term */
    double adv_eps; /* A = (R - mean) / (std + adv_eps) */
    int std_normalize;
} grpo;

static int grpo_create(const m1c_host *h, const m1c_settings *s, void **self) {
    double eps, kl, ae;
    int sn;
    *self = NULL;
    if (h->get_float(h, s, "eps", 0.2, 0.0, 1e9, &eps) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "kl_coef", 0.0, 0.0, 1e6, &kl) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "adv_eps", 1e-6, 0.0, 1.0, &ae) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "std_normalize", 1, &sn) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    grpo *o = calloc(1, sizeof *o);
    if (!o) return h->error(h, "out of memory creating the objective");
    o->h = h;
    o->eps = eps;
    o->kl_coef = kl;
    o->adv_eps = ae;
    o->std_normalize = sn;
    *self = o;
    return M1C_OK;
}

static void grpo_destroy(void *self) { free(self); }

/* Per token: surr = min(r A, clip(r) A), kl = exp(ref - logp) - (ref - logp) - 1 (k3, >= 0).
 * loss = -1/n_seq * sum_i 1/|o_i| * sum_t mask * (surr - kl_coef * kl), over sequences with tokens.
 * d surr/d logp = A r on the unclipped branch, 0 where the clipped (constant) branch is the min;
 * d kl/d logp = 1 - exp(ref - logp). Without old_logp, r = exp(logp - sg(logp)) = 1 (on-policy). */
static int grpo_loss(void *self, const m1c_objective_batch *b, double *loss, float *dlogp, const char **names,
                     double *values, int max_metrics) {
    const grpo *o = self;
    const m1c_host *h = o->h;
    const int B = b->B, T = b->T, G = b->group;
    if (rl_check_batch(h, b, "grpo") != M1C_OK) return M1C_ERR;
    if (o->kl_coef > 0.0 && !b->ref_logp)
        return h->error(h, "grpo: setting kl_coef = %g needs reference log-probabilities (ref_logp is NULL)",
                        o->kl_coef);
    double *adv = malloc(sizeof(double) * (size_t)(B > 0 ? B : 1));
    if (!adv) return h->error(h, "grpo: out of memory for %d advantages", B);
    rl_advantages(b->reward, NULL, B, G, o->std_normalize, o->adv_eps, adv);
    const double lo = 1.0 - o->eps, hi = 1.0 + o->eps;

    int n_seq = 0;
    for (int s = 0; s < B; s++) {
        double ms = 0.0;
        for (int t = 0; t < T; t++) ms += b->mask ? b->mask[(int64_t)s * T + t] : 1.0;
        n_seq += ms > 0.0;
    }

    double L = 0.0, clipped = 0.0, rsum = 0.0, klsum = 0.0, msum = 0.0, asum = 0.0, aabs = 0.0, rew = 0.0;
    for (int s = 0; s < B; s++) {
        const double A = adv[s];
        asum += A;
        aabs += fabs(A);
        rew += b->reward[s];
        double ms = 0.0;
        for (int t = 0; t < T; t++) ms += b->mask ? b->mask[(int64_t)s * T + t] : 1.0;
        /* Each sequence weighs 1/n_seq, shared by its tokens. */
        const double wseq = ms > 0.0 ? 1.0 / (ms * n_seq) : 0.0;
        for (int t = 0; t < T; t++) {
            const int64_t i = (int64_t)s * T + t;
            const double m = b->mask ? b->mask[i] : 1.0;
            const double r = b->old_logp ? exp((double)b->logp[i] - b->old_logp[i]) : 1.0;
            const double rc = r < lo ? lo : (r > hi ? hi : r);
            const int take_clip = rc * A < r * A; /* the min picks the constant clipped branch */
            const double surr = take_clip ? rc * A : r * A;
            const double dsurr = take_clip ? 0.0 : r * A;
            double kl = 0.0, dkl = 0.0;
            if (b->ref_logp) {
                const double d = (double)b->ref_logp[i] - b->logp[i];
                kl = exp(d) - d - 1.0;
                dkl = 1.0 - exp(d);
            }
            L += wseq * m * (surr - o->kl_coef * kl);
            dlogp[i] = (float)(-wseq * m * (dsurr - o->kl_coef * dkl));
            clipped += m * take_clip;
            rsum += m * r;
            klsum += m * kl;
            msum += m;
        }
    }
    free(adv);
    *loss = -L;

    const double tok = msum > 0.0 ? 1.0 / msum : 0.0;
    int n = 0;
    n = rl_metric(names, values, max_metrics, n, "clip_frac", clipped * tok);
    n = rl_metric(names, values, max_metrics, n, "ratio_mean", msum > 0.0 ? rsum * tok : 1.0);
    n = rl_metric(names, values, max_metrics, n, "kl", klsum * tok);
    n = rl_metric(names, values, max_metrics, n, "adv_mean", B > 0 ? asum / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "adv_abs", B > 0 ? aabs / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "reward_mean", B > 0 ? rew / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "tokens", msum);
    return n;
}

static const m1c_objective_vtable grpo_vtable = {
    .size = sizeof(m1c_objective_vtable),
    .create = grpo_create,
    .destroy = grpo_destroy,
    .loss = grpo_loss,
};

M1C_PLUGIN(OBJECTIVE, objective, grpo_vtable, "grpo", "0.1.0",
           "GRPO: PPO-clip with group-normalised advantages, per-sequence mean, optional k3 KL", "MIT")
