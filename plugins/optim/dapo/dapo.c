/* DAPO objective, a CISPO baseline: PPO-clip with clip-higher (eps_low 0.2, eps_high 0.28), a token-level
 * mean over the whole batch, dynamic sampling (groups with all-equal rewards drop out) and a soft
 * overlong penalty added to the reward. */
#include <math.h>
#include <stdlib.h>
#include "m1c/plugin.h"
#include "../common/rl.h"

typedef struct dapo {
    const m1c_host *h;
    double eps_low, eps_high; /* clip(r, 1 - eps_low, 1 + eps_high) */
    double adv_eps;           /* A = (R - mean) / (std + adv_eps) */
    int std_normalize;
    int dynamic_sampling; /* drop groups whose (raw) rewards are all equal */
    int64_t max_len;      /* overlong penalty: 0 = off */
    int64_t cache_len;    /* the soft window (max_len - cache_len, max_len] */
} dapo;

static int dapo_create(const m1c_host *h, const m1c_settings *s, void **self) {
    double el, eh, ae;
    int sn, ds;
    int64_t ml, cl;
    *self = NULL;
    if (h->get_float(h, s, "eps_low", 0.2, 0.0, 1e9, &el) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "eps_high", 0.28, 0.0, 1e9, &eh) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "adv_eps", 1e-6, 0.0, 1.0, &ae) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "std_normalize", 1, &sn) != M1C_OK) return M1C_ERR;
    if (h->get_bool(h, s, "dynamic_sampling", 1, &ds) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "max_len", 0, 0, INT64_C(1) << 40, &ml) != M1C_OK) return M1C_ERR;
    if (h->get_int(h, s, "cache_len", 0, 0, INT64_C(1) << 40, &cl) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    /* Relations between keys, which the getters' ranges cannot express. */
    if (cl > 0 && ml == 0)
        return h->settings_error(h, s, "cache_len", "%lld needs max_len > 0 (the window ends at max_len)",
                                 (long long)cl);
    if (cl > ml)
        return h->settings_error(h, s, "cache_len", "%lld exceeds max_len = %lld", (long long)cl,
                                 (long long)ml);
    dapo *o = calloc(1, sizeof *o);
    if (!o) return h->error(h, "out of memory creating the objective");
    o->h = h;
    o->eps_low = el;
    o->eps_high = eh;
    o->adv_eps = ae;
    o->std_normalize = sn;
    o->dynamic_sampling = ds;
    o->max_len = ml;
    o->cache_len = cl;
    *self = o;
    return M1C_OK;
}

static void dapo_destroy(void *self) { free(self); }

static double seq_len(const m1c_objective_batch *b, int s) {
    double len = 0.0;
    for (int t = 0; t < b->T; t++) len += b->mask ? b->mask[(int64_t)s * b->T + t] : 1.0;
    return len;
}

/* DAPO's soft overlong punishment: 0 up to max_len - cache_len, then falling linearly to -1 at max_len,
 * -1 beyond. */
static double overlong_penalty(const dapo *o, double len) {
    if (o->max_len == 0) return 0.0;
    const double L = (double)o->max_len, C = (double)o->cache_len;
    if (len <= L - C) return 0.0;
    if (len <= L) return (L - C - len) / C; /* C > 0 here: len > L - C and len <= L */
    return -1.0;
}

/* Dynamic sampling filters on the raw reward (the verifier's accuracy, as DAPO's recipe does), before
 * the length penalty: a group all right or all wrong teaches nothing whatever its lengths. */
static int group_kept(const dapo *o, const float *reward, int g, int G) {
    if (!o->dynamic_sampling) return 1;
    for (int i = 1; i < G; i++)
        if (reward[g * G + i] != reward[g * G]) return 1;
    return 0;
}

/* loss = -1/K * sum over kept tokens mask * min(r A, clip(r, 1-eps_low, 1+eps_high) A), K = sum of the
 * mask over kept groups; A from the penalised rewards, normalised within the group.
 * d/d logp = A r on the unclipped branch, 0 on the clipped one; tokens of dropped groups get 0. */
static int dapo_loss(void *self, const m1c_objective_batch *b, double *loss, float *dlogp, const char **names,
                     double *values, int max_metrics) {
    const dapo *o = self;
    const m1c_host *h = o->h;
    const int B = b->B, T = b->T, G = b->group;
    if (rl_check_batch(h, b, "dapo") != M1C_OK) return M1C_ERR;
    const int n_groups = B / G;
    const double lo = 1.0 - o->eps_low, hi = 1.0 + o->eps_high;
    /* penalty[s] shapes the reward the advantages see; adv[s] follows it in the same allocation. */
    double *penalty = malloc(sizeof(double) * 2 * (size_t)(B > 0 ? B : 1));
    if (!penalty) return h->error(h, "dapo: out of memory for %d rewards", B);
    double *adv = penalty + (B > 0 ? B : 1);

    double K = 0.0, rew = 0.0, pen = 0.0, n_pen = 0.0;
    int kept = 0;
    for (int s = 0; s < B; s++) {
        const double len = seq_len(b, s);
        const double p = overlong_penalty(o, len);
        penalty[s] = p;
        rew += b->reward[s];
        pen += p;
        n_pen += p != 0.0;
    }
    for (int g = 0; g < n_groups; g++)
        if (group_kept(o, b->reward, g, G)) {
            kept++;
            for (int s = g * G; s < (g + 1) * G; s++) K += seq_len(b, s);
        }
    const double scale = K > 0.0 ? 1.0 / K : 0.0;
    rl_advantages(b->reward, penalty, B, G, o->std_normalize, o->adv_eps, adv);

    double L = 0.0, clipped = 0.0, rsum = 0.0, asum = 0.0, aabs = 0.0;
    for (int g = 0; g < n_groups; g++) {
        const int keep = group_kept(o, b->reward, g, G);
        for (int s = g * G; s < (g + 1) * G; s++) {
            const double A = adv[s];
            if (keep) {
                asum += A;
                aabs += fabs(A);
            }
            for (int t = 0; t < T; t++) {
                const int64_t i = (int64_t)s * T + t;
                if (!keep) {
                    dlogp[i] = 0.0f;
                    continue;
                }
                const double m = b->mask ? b->mask[i] : 1.0;
                const double r = b->old_logp ? exp((double)b->logp[i] - b->old_logp[i]) : 1.0;
                const double rc = r < lo ? lo : (r > hi ? hi : r);
                const int take_clip = rc * A < r * A; /* the min picks the constant clipped branch */
                L += m * (take_clip ? rc * A : r * A);
                dlogp[i] = (float)(-m * (take_clip ? 0.0 : r * A) * scale);
                clipped += m * take_clip;
                rsum += m * r;
            }
        }
    }
    free(penalty);
    *loss = -L * scale;

    int n = 0;
    n = rl_metric(names, values, max_metrics, n, "groups_kept", kept);
    n = rl_metric(names, values, max_metrics, n, "groups", n_groups);
    n = rl_metric(names, values, max_metrics, n, "clip_frac", clipped * scale);
    n = rl_metric(names, values, max_metrics, n, "ratio_mean", K > 0.0 ? rsum * scale : 1.0);
    n = rl_metric(names, values, max_metrics, n, "adv_mean", kept ? asum / ((double)kept * G) : 0.0);
    n = rl_metric(names, values, max_metrics, n, "adv_abs", kept ? aabs / ((double)kept * G) : 0.0);
    n = rl_metric(names, values, max_metrics, n, "reward_mean", B > 0 ? rew / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "overlong_frac", B > 0 ? n_pen / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "overlong_penalty_mean", B > 0 ? pen / B : 0.0);
    n = rl_metric(names, values, max_metrics, n, "tokens", K);
    return n;
}

static const m1c_objective_vtable dapo_vtable = {
    .size = sizeof(m1c_objective_vtable),
    .create = dapo_create,
    .destroy = dapo_destroy,
    .loss = dapo_loss,
};

M1C_PLUGIN(OBJECTIVE, objective, dapo_vtable, "dapo", "0.1.0",
           "DAPO: clip-higher PPO, token-level mean, dynamic sampling, soft overlong penalty", "MIT")
