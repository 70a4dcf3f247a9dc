/* Tests of the objective plugins (xent, cispo, grpo, dapo): dlogp against central differences of each
 * plugin's own loss, hand-computed values on tiny batches, and settings and batch refusals. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "harness.h"

/* Tolerances are stated beside each comparison. Exact comparisons (==) are kept for counts, fractions of
 * a few tokens (k/4, k/2) and values that are zero by construction (dropped or masked tokens, clipped
 * PPO branches): all exact in binary floating point, so any difference is a bug. */

#define MAXM 32

typedef struct obj {
    m1c_plugin *p;
    const m1c_objective_vtable *vt;
    void *self;
    m1c_config *cfg;
    /* metrics of the last call */
    const char *names[MAXM];
    double values[MAXM];
    int n_metrics;
} obj;

static int obj_create(obj *o, const char *name, const char *settings) {
    memset(o, 0, sizeof *o);
    o->p = th_plugin(name, M1C_KIND_OBJECTIVE);
    o->vt = M1C_OBJECTIVE(o->p);
    o->p->error[0] = '\0';
    m1c_settings *s = th_settings(settings, &o->cfg);
    return o->vt->create(&o->p->host, s, &o->self);
}

static void obj_new(obj *o, const char *name, const char *settings) {
    cr_assert_eq(obj_create(o, name, settings), M1C_OK, "%s { %s }: %s", name, settings, o->p->error);
}

static void obj_free(obj *o) {
    if (o->self) o->vt->destroy(o->self);
    m1c_config_free(o->cfg);
}

/* dlogp is first filled with NaN: every entry must be written, not accumulated. */
static double obj_loss(obj *o, const m1c_objective_batch *b, float *dlogp) {
    double loss = NAN;
    for (int64_t i = 0; i < (int64_t)b->B * b->T; i++) dlogp[i] = NAN;
    o->n_metrics = o->vt->loss(o->self, b, &loss, dlogp, o->names, o->values, MAXM);
    cr_assert_geq(o->n_metrics, 0, "loss failed: %s", o->p->error);
    for (int64_t i = 0; i < (int64_t)b->B * b->T; i++)
        cr_assert(isfinite(dlogp[i]), "dlogp[%lld] not written", (long long)i);
    cr_assert(isfinite(loss));
    return loss;
}

static double metric(const obj *o, const char *name) {
    for (int i = 0; i < o->n_metrics; i++)
        if (strcmp(o->names[i], name) == 0) return o->values[i];
    cr_assert_fail("metric %s missing", name);
    return NAN;
}

/* |a - b| <= atol + rtol |b| */
#define EXPECT_NEAR(a, b, atol, rtol, ...)                                                               \
    cr_expect(fabs((double)(a) - (double)(b)) <= (atol) + (rtol) * fabs((double)(b)), __VA_ARGS__)

/* ---- a random-looking batch whose ratios stay away from every clip boundary --------------------------- */

/* log(r) values: at least 0.03 from log(0.8) = -0.223, log(1.2) = 0.182 and log(1.28) = 0.247, so a
 * finite-difference step of 2^-10 never crosses a kink of min/clip. */
static const float log_ratios[] = {-0.5f, -0.1f, 0.05f, 0.15f, 0.4f, 0.3f, -0.3f, 0.0f, 0.1f, -0.05f, 0.6f};
#define N_LR (int)(sizeof log_ratios / sizeof log_ratios[0])

typedef struct batch {
    int B, T, G;
    float *logp, *old_logp, *ref_logp, *mask, *reward;
} batch;

/* Multiples of 2^-12 with |x| < 4 (logp in [-3, -0.6], old/ref within 0.6 of it): x +- 2^-10 is again
 * such a multiple, hence exact in f32 (ulp <= 2^-22 below 4). */
static float q12(double x) { return (float)(nearbyint(x * 4096.0) / 4096.0); }

static void batch_init(batch *b, int B, int T, int G, const float *reward) {
    b->B = B, b->T = T, b->G = G;
    const int N = B * T;
    b->logp = malloc(sizeof(float) * N);
    b->old_logp = malloc(sizeof(float) * N);
    b->ref_logp = malloc(sizeof(float) * N);
    b->mask = malloc(sizeof(float) * N);
    b->reward = malloc(sizeof(float) * B);
    for (int i = 0; i < N; i++) {
        const double u = fmod(0.6180339887 * (i + 1), 1.0);
        b->logp[i] = q12(-0.6 - 2.4 * u);
        b->old_logp[i] = q12((double)b->logp[i] - log_ratios[(i * 7) % N_LR]);
        b->ref_logp[i] = q12(b->logp[i] + 0.5 * (fmod(0.7548776662 * (i + 1), 1.0) - 0.5));
    }
    for (int s = 0; s < B; s++)
        for (int t = 0; t < T; t++) b->mask[s * T + t] = t >= s % 3; /* a prompt of 0..2 tokens masked out */
    for (int s = 0; s < B; s++) b->reward[s] = reward[s];
}

static void batch_free(batch *b) {
    free(b->logp), free(b->old_logp), free(b->ref_logp), free(b->mask), free(b->reward);
}

static m1c_objective_batch view(const batch *b, int with_old, int with_ref) {
    m1c_objective_batch v;
    memset(&v, 0, sizeof v);
    v.B = b->B, v.T = b->T, v.group = b->G;
    v.logp = b->logp;
    v.old_logp = with_old ? b->old_logp : NULL;
    v.ref_logp = with_ref ? b->ref_logp : NULL;
    v.mask = b->mask;
    v.reward = b->reward;
    return v;
}

/* Central differences of the plugin's loss in each logp. shift_old: move old_logp with logp, which keeps
 * r (and so CISPO's stop-gradient weight sg(r^)) fixed and differentiates only the log pi factor.
 * on_policy: the analytic dlogp comes from old_logp = NULL (r = exp(logp - sg(logp)) = 1, whose value no
 * longer depends on logp), the differences from old_logp = a frozen copy of logp: both are the same
 * gradient at r = 1. The step 2^-10 is exact on batch_init's values, so (x+h) - (old+h) == x - old. */
static void fd_check(obj *o, batch *b, int with_old, int with_ref, int shift_old, int on_policy) {
    const int N = b->B * b->T;
    float *dlogp = malloc(sizeof(float) * N), *tmp = malloc(sizeof(float) * N), *saved = NULL;
    m1c_objective_batch v = view(b, with_old && !on_policy, with_ref);
    obj_loss(o, &v, dlogp);
    if (on_policy) {
        saved = malloc(sizeof(float) * N);
        memcpy(saved, b->old_logp, sizeof(float) * N);
        memcpy(b->old_logp, b->logp, sizeof(float) * N);
        v = view(b, 1, with_ref);
    }
    const float h = 1.0f / 1024.0f;
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        const float x = b->logp[i], xo = b->old_logp[i];
        b->logp[i] = x + h;
        if (shift_old) b->old_logp[i] = xo + h;
        const double lp = obj_loss(o, &v, tmp);
        b->logp[i] = x - h;
        if (shift_old) b->old_logp[i] = xo - h;
        const double lm = obj_loss(o, &v, tmp);
        b->logp[i] = x, b->old_logp[i] = xo;
        const double fd = (lp - lm) / (2.0 * h);
        /* dlogp is f32 (6e-8 relative); the central difference's truncation error h^2/6 |L'''| is below
         * 2e-7 relative for these exp(logp - old) terms and the double-evaluated loss adds ~1e-16/h;
         * rtol 1e-5 and atol 1e-9 leave a wide margin yet catch any wrong factor or sign. */
        const double err = fabs(dlogp[i] - fd) / (1e-9 + 1e-5 * fabs(fd));
        if (err > worst) worst = err;
        cr_expect_leq(err, 1.0, "%s: dlogp[%d] = %.9g, finite difference %.9g", o->p->desc->name, i, dlogp[i],
                      fd);
    }
    cr_log_info("%s: worst fd error %.3g of tolerance", o->p->desc->name, worst);
    if (saved) memcpy(b->old_logp, saved, sizeof(float) * N);
    free(dlogp), free(tmp), free(saved);
}

/* ---- xent ----------------------------------------------------------------------------------------- */

Test(xent, hand_values) {
    obj o;
    obj_new(&o, "xent", "");
    float logp[4] = {-1, -2, -3, -4}, mask[4] = {1, 1, 0, 1}, d[4];
    m1c_objective_batch b = {.B = 2, .T = 2, .logp = logp, .mask = mask};
    const double L = obj_loss(&o, &b, d);
    /* (1 + 2 + 4) / 3 tokens; the f32 inputs are exact, so only double rounding: 1e-12. */
    EXPECT_NEAR(L, 7.0 / 3.0, 1e-12, 0, "loss %.17g", L);
    const float want[4] = {-1.0f / 3, -1.0f / 3, 0.0f, -1.0f / 3};
    /* f32 rounding of 1/3 */
    for (int i = 0; i < 4; i++) EXPECT_NEAR(d[i], want[i], 0, 1e-7, "dlogp[%d] = %g", i, d[i]);
    cr_expect_eq(metric(&o, "tokens"), 3.0);

    /* No counted token: loss 0 and dlogp 0, not 0/0. */
    float zero[4] = {0, 0, 0, 0};
    b.mask = zero;
    cr_expect_eq(obj_loss(&o, &b, d), 0.0);
    for (int i = 0; i < 4; i++) cr_expect_eq(d[i], 0.0f);

    /* The metrics array may be too small: the plugin writes only what fits. */
    double loss;
    cr_expect_eq(o.vt->loss(o.self, &b, &loss, d, o.names, o.values, 0), 0);
    obj_free(&o);
}

Test(xent, finite_differences) {
    obj o;
    obj_new(&o, "xent", "");
    const float r[6] = {0};
    batch b;
    batch_init(&b, 6, 5, 1, r);
    fd_check(&o, &b, 0, 0, 0, 0);
    batch_free(&b);
    obj_free(&o);
}

/* ---- the tiny RL batch used by the hand checks ---------------------------------------------------- */

/* B = 2 responses of one prompt (G = 2), T = 2, rewards {1, 0}: mean 0.5, population std 0.5, so
 * A = +-0.5 / (0.5 + 1e-6) = +-(1 - 2e-6). log-ratios: sequence 0 {0, 0.5}, sequence 1 {-0.5, 0}. */
static const float tiny_logp[4] = {-1.0f, -2.0f, -1.5f, -0.5f};
static const float tiny_dlr[4] = {0.0f, 0.5f, -0.5f, 0.0f};
static const float tiny_reward[2] = {1.0f, 0.0f};
static const float ones4[4] = {1, 1, 1, 1};

typedef struct tiny {
    float logp[4], old_logp[4], mask[4], reward[2];
    m1c_objective_batch b;
} tiny;

static void tiny_init(tiny *t) {
    for (int i = 0; i < 4; i++) {
        t->logp[i] = tiny_logp[i];
        t->old_logp[i] = tiny_logp[i] - tiny_dlr[i];
        t->mask[i] = ones4[i];
    }
    t->reward[0] = tiny_reward[0], t->reward[1] = tiny_reward[1];
    memset(&t->b, 0, sizeof t->b);
    t->b.B = 2, t->b.T = 2, t->b.group = 2;
    t->b.logp = t->logp, t->b.old_logp = t->old_logp, t->b.mask = t->mask, t->b.reward = t->reward;
}

/* The ratios the plugin sees: exp of the f32 difference (not of 0.5 exactly; the difference is exact
 * here, since -2 - -2.5 and -1.5 - -1 are representable). */
static double tiny_r(const tiny *t, int i) { return exp((double)t->logp[i] - t->old_logp[i]); }

static const double A1 = 0.5 / (0.5 + 1e-6); /* adv_eps 1e-6 */

/* ---- cispo ---------------------------------------------------------------------------------------- */

Test(cispo, hand_values_keep_gradient_on_clipped_tokens) {
    obj o;
    obj_new(&o, "cispo", ""); /* eps_low 1e9 (no lower bound), eps_high 0.28 */
    tiny t;
    tiny_init(&t);
    float d[4];
    const double L = obj_loss(&o, &t.b, d);
    /* r = {1, e^0.5 = 1.649 -> clipped to 1.28, e^-0.5 = 0.607 (no lower bound), 1}; A = {+A1, -A1}. */
    const double rc[4] = {1.0, 1.28, tiny_r(&t, 2), 1.0};
    const double A[4] = {A1, A1, -A1, -A1};
    double J = 0.0;
    for (int i = 0; i < 4; i++) {
        J += rc[i] * A[i] * tiny_logp[i] / 4.0;
        /* f32 dlogp: 1e-7 relative covers its rounding */
        EXPECT_NEAR(d[i], -rc[i] * A[i] / 4.0, 1e-9, 1e-7, "dlogp[%d] = %.9g", i, d[i]);
    }
    cr_expect(fabs(d[1]) > 0.3, "the clipped token lost its gradient"); /* 1.28 * A1 / 4 = 0.32 */
    EXPECT_NEAR(L, -J, 1e-12, 1e-12, "loss %.17g, want %.17g", L, -J); /* both double */
    EXPECT_NEAR(metric(&o, "adv_abs"), 1.0, 3e-6, 0, "A = +-1 up to adv_eps / std = 2e-6");
    EXPECT_NEAR(metric(&o, "adv_mean"), 0.0, 1e-12, 0, "advantages of a group sum to 0");
    cr_expect_eq(metric(&o, "clip_frac"), 0.25); /* one of four tokens: exact in double */
    const double rmean = (2.0 + tiny_r(&t, 1) + tiny_r(&t, 2)) / 4.0;
    EXPECT_NEAR(metric(&o, "ratio_mean"), rmean, 1e-12, 1e-12, "ratio_mean"); /* double throughout */
    cr_expect_eq(metric(&o, "reward_mean"), 0.5);
    obj_free(&o);
}

Test(cispo, eps_low_and_token_mask) {
    obj o;
    tiny t;
    float d[4];
    tiny_init(&t);
    /* A lower bound: r = 0.607 is clipped to 0.8 but keeps its gradient. */
    obj_new(&o, "cispo", "eps_low = 0.2; eps_high = 0.2;");
    obj_loss(&o, &t.b, d);
    EXPECT_NEAR(d[1], -1.2 * A1 / 4.0, 1e-9, 1e-7, "dlogp[1] = %.9g", d[1]); /* f32 rounding */
    EXPECT_NEAR(d[2], 0.8 * A1 / 4.0, 1e-9, 1e-7, "dlogp[2] = %.9g", d[2]);
    cr_expect_eq(metric(&o, "clip_frac"), 0.5);
    obj_free(&o);

    /* The unified form's trust-region mask: token 1 (A > 0, r > 1.2) and token 2 (A < 0, r < 0.8) drop
     * out; the normaliser is still all 4 tokens. */
    obj_new(&o, "cispo", "eps_low = 0.2; eps_high = 0.2; token_mask = true;");
    const double L = obj_loss(&o, &t.b, d);
    cr_expect_eq(d[1], 0.0f);
    cr_expect_eq(d[2], 0.0f);
    EXPECT_NEAR(d[0], -A1 / 4.0, 1e-9, 1e-7, "dlogp[0] = %.9g", d[0]);
    EXPECT_NEAR(d[3], A1 / 4.0, 1e-9, 1e-7, "dlogp[3] = %.9g", d[3]);
    const double J = (A1 * tiny_logp[0] - A1 * tiny_logp[3]) / 4.0;
    EXPECT_NEAR(L, -J, 1e-12, 1e-12, "loss %.17g, want %.17g", L, -J);
    cr_expect_eq(metric(&o, "token_mask_frac"), 0.5);
    obj_free(&o);

    /* On-policy (old_logp NULL): r = 1, the loss is REINFORCE with group-normalised advantages. */
    obj_new(&o, "cispo", "");
    t.b.old_logp = NULL;
    obj_loss(&o, &t.b, d);
    const double A[4] = {A1, A1, -A1, -A1};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(d[i], -A[i] / 4.0, 1e-9, 1e-7, "dlogp[%d] = %.9g", i, d[i]);
    cr_expect_eq(metric(&o, "clip_frac"), 0.0);
    obj_free(&o);
}

Test(cispo, std_normalize_off_and_equal_rewards) {
    obj o;
    tiny t;
    float d[4];
    tiny_init(&t);
    obj_new(&o, "cispo", "std_normalize = false;");
    t.b.old_logp = NULL;
    obj_loss(&o, &t.b, d);
    /* A = R - mean = +-0.5 */
    EXPECT_NEAR(d[0], -0.5 / 4.0, 0, 1e-7, "dlogp[0] = %.9g", d[0]);
    EXPECT_NEAR(d[3], 0.5 / 4.0, 0, 1e-7, "dlogp[3] = %.9g", d[3]);
    obj_free(&o);

    /* Equal rewards: no signal, A = 0 everywhere (even with adv_eps = 0: no 0/0). */
    obj_new(&o, "cispo", "adv_eps = 0.0;");
    t.reward[1] = 1.0f;
    const double L = obj_loss(&o, &t.b, d);
    for (int i = 0; i < 4; i++) cr_expect_eq(d[i], 0.0f);
    cr_expect_eq(L, 0.0);
    obj_free(&o);
}

Test(cispo, finite_differences) {
    obj o;
    obj_new(&o, "cispo", "eps_high = 0.2;");
    const float r[6] = {1, 0, 0.5f, 0, 0, 1};
    batch b;
    batch_init(&b, 6, 5, 3, r);
    fd_check(&o, &b, 1, 0, 1, 0); /* r held fixed: d/dlogp of sg(r^) A logp */
    fd_check(&o, &b, 0, 0, 0, 0); /* old_logp NULL: r = 1, the loss is linear in logp */
    batch_free(&b);
    obj_free(&o);

    obj_new(&o, "cispo", "eps_low = 0.2; eps_high = 0.2; token_mask = true;");
    batch_init(&b, 6, 5, 3, r);
    fd_check(&o, &b, 1, 0, 1, 0);
    batch_free(&b);
    obj_free(&o);
}

/* ---- grpo ----------------------------------------------------------------------------------------- */

Test(grpo, hand_values_zero_gradient_on_clipped_tokens) {
    obj o;
    obj_new(&o, "grpo", ""); /* eps 0.2 */
    tiny t;
    tiny_init(&t);
    float d[4];
    const double L = obj_loss(&o, &t.b, d);
    /* Token 1: A > 0, r = 1.649 > 1.2, min picks 1.2 A (constant): gradient 0.
     * Token 2: A < 0, r = 0.607 < 0.8, min picks 0.8 A (constant): gradient 0.
     * Tokens 0, 3: r = 1, gradient A r / (2 tokens * 2 sequences). */
    cr_expect_eq(d[1], 0.0f);
    cr_expect_eq(d[2], 0.0f);
    EXPECT_NEAR(d[0], -A1 / 4.0, 1e-9, 1e-7, "dlogp[0] = %.9g", d[0]); /* f32 rounding */
    EXPECT_NEAR(d[3], A1 / 4.0, 1e-9, 1e-7, "dlogp[3] = %.9g", d[3]);
    const double want = -(A1 * 1.0 + 1.2 * A1 - 0.8 * A1 - A1 * 1.0) / 4.0;
    /* double throughout; 1.2 and 0.8 come from 1 +- 0.2 in double */
    EXPECT_NEAR(L, want, 1e-12, 1e-9, "loss %.17g, want %.17g", L, want);
    cr_expect_eq(metric(&o, "clip_frac"), 0.5);
    cr_expect_eq(metric(&o, "kl"), 0.0);
    obj_free(&o);
}

Test(grpo, per_sequence_mean_vs_dapo_token_mean) {
    /* Sequence 0 has 1 token, sequence 1 has 3; r = 1. GRPO: each sequence weighs 1/2, shared by its
     * tokens. DAPO (token-level): each token weighs 1/4. */
    float logp[8] = {-1, -1, -1, -1, -1, -1, -1, -1}, mask[8] = {0, 0, 0, 1, 0, 1, 1, 1}, reward[2] = {1, 0};
    float d[8];
    m1c_objective_batch b = {.B = 2, .T = 4, .group = 2, .logp = logp, .mask = mask, .reward = reward};
    obj o;
    obj_new(&o, "grpo", "");
    obj_loss(&o, &b, d);
    EXPECT_NEAR(d[3], -A1 / 2.0, 0, 1e-7, "grpo dlogp[3] = %.9g", d[3]); /* f32 rounding */
    EXPECT_NEAR(d[5], A1 / 6.0, 0, 1e-7, "grpo dlogp[5] = %.9g", d[5]);
    cr_expect_eq(d[0], 0.0f);
    obj_free(&o);

    obj_new(&o, "dapo", "");
    obj_loss(&o, &b, d);
    EXPECT_NEAR(d[3], -A1 / 4.0, 0, 1e-7, "dapo dlogp[3] = %.9g", d[3]);
    EXPECT_NEAR(d[5], A1 / 4.0, 0, 1e-7, "dapo dlogp[5] = %.9g", d[5]);
    cr_expect_eq(d[0], 0.0f);
    obj_free(&o);
}

Test(grpo, kl_term) {
    obj o;
    float d[1];
    float logp[1] = {-1.0f}, ref[1] = {-1.5f}, mask[1] = {1}, reward[1] = {1};
    m1c_objective_batch b = {.B = 1, .T = 1, .group = 1, .logp = logp, .ref_logp = ref, .mask = mask,
                             .reward = reward};
    obj_new(&o, "grpo", "kl_coef = 0.1;");
    const double L = obj_loss(&o, &b, d);
    /* G = 1: A = 0, so only the KL term: k3 = e^-0.5 + 0.5 - 1, d k3/d logp = 1 - e^-0.5. */
    const double k3 = exp(-0.5) + 0.5 - 1.0;
    EXPECT_NEAR(L, 0.1 * k3, 1e-12, 1e-12, "loss %.17g", L); /* double throughout */
    EXPECT_NEAR(d[0], 0.1 * (1.0 - exp(-0.5)), 0, 1e-7, "dlogp %.9g", d[0]); /* f32 rounding */
    EXPECT_NEAR(metric(&o, "kl"), k3, 1e-12, 1e-12, "kl");

    /* kl_coef > 0 without reference log-probabilities is refused at loss time. */
    b.ref_logp = NULL;
    double loss;
    o.p->error[0] = '\0';
    cr_expect_eq(o.vt->loss(o.self, &b, &loss, d, o.names, o.values, MAXM), M1C_ERR);
    cr_expect(strstr(o.p->error, "ref_logp") != NULL, "error: %s", o.p->error);
    obj_free(&o);
}

Test(grpo, finite_differences) {
    obj o;
    obj_new(&o, "grpo", "kl_coef = 0.05;");
    const float r[6] = {1, 0, 0.5f, 0, 0.25f, 1};
    batch b;
    batch_init(&b, 6, 5, 3, r);
    fd_check(&o, &b, 1, 1, 0, 0); /* off-policy ratios inside and outside the clip range, with KL */
    fd_check(&o, &b, 0, 1, 0, 1); /* on-policy */
    batch_free(&b);
    obj_free(&o);
}

/* ---- dapo ----------------------------------------------------------------------------------------- */

Test(dapo, clip_higher) {
    obj o;
    obj_new(&o, "dapo", ""); /* eps_low 0.2, eps_high 0.28 */
    /* log-ratios {0.2, 0.25 | -0.25, 0}: r = 1.221 (A > 0, inside 1.28: gradient r A, where GRPO's
     * 1.2 would clip), 1.284 (A > 0, above 1.28: clipped, 0), 0.779 (A < 0, below 0.8: clipped, 0), 1. */
    float logp[4] = {-1.0f, -1.0f, -1.0f, -1.0f}, old[4], mask[4] = {1, 1, 1, 1}, reward[2] = {1, 0}, d[4];
    const float dlr[4] = {0.2f, 0.25f, -0.25f, 0.0f};
    for (int i = 0; i < 4; i++) old[i] = logp[i] - dlr[i];
    m1c_objective_batch b = {.B = 2, .T = 2, .group = 2, .logp = logp, .old_logp = old, .mask = mask,
                             .reward = reward};
    const double L = obj_loss(&o, &b, d);
    const double r0 = exp((double)logp[0] - old[0]);
    EXPECT_NEAR(d[0], -r0 * A1 / 4.0, 0, 1e-7, "dlogp[0] = %.9g", d[0]); /* f32 rounding */
    cr_expect_eq(d[1], 0.0f);
    cr_expect_eq(d[2], 0.0f);
    EXPECT_NEAR(d[3], A1 / 4.0, 0, 1e-7, "dlogp[3] = %.9g", d[3]);
    const double want = -(r0 * A1 + 1.28 * A1 - 0.8 * A1 - A1) / 4.0;
    EXPECT_NEAR(L, want, 1e-12, 1e-9, "loss %.17g want %.17g", L, want); /* double throughout */
    cr_expect_eq(metric(&o, "clip_frac"), 0.5);
    obj_free(&o);
}

Test(dapo, dynamic_sampling_drops_equal_reward_groups) {
    /* Two groups of 2: rewards {1, 1} (dropped) and {1, 0}; T = 3, every token counts; r = 1. */
    float logp[12], mask[12], reward[4] = {1, 1, 1, 0}, d[12];
    for (int i = 0; i < 12; i++) logp[i] = -1.0f, mask[i] = 1.0f;
    m1c_objective_batch b = {.B = 4, .T = 3, .group = 2, .logp = logp, .mask = mask, .reward = reward};
    obj o;
    obj_new(&o, "dapo", "");
    obj_loss(&o, &b, d);
    for (int i = 0; i < 6; i++) cr_expect_eq(d[i], 0.0f, "dropped group: dlogp[%d] = %g", i, d[i]);
    /* The normaliser counts only the kept group's 6 tokens. */
    for (int i = 6; i < 9; i++) EXPECT_NEAR(d[i], -A1 / 6.0, 0, 1e-7, "dlogp[%d] = %.9g", i, d[i]);
    for (int i = 9; i < 12; i++) EXPECT_NEAR(d[i], A1 / 6.0, 0, 1e-7, "dlogp[%d] = %.9g", i, d[i]);
    cr_expect_eq(metric(&o, "groups_kept"), 1.0);
    cr_expect_eq(metric(&o, "tokens"), 6.0);
    obj_free(&o);

    /* Without dynamic sampling the equal group stays (A = 0) and the normaliser is all 12 tokens. */
    obj_new(&o, "dapo", "dynamic_sampling = false;");
    obj_loss(&o, &b, d);
    EXPECT_NEAR(d[6], -A1 / 12.0, 0, 1e-7, "dlogp[6] = %.9g", d[6]);
    cr_expect_eq(metric(&o, "groups_kept"), 2.0);
    obj_free(&o);

    /* Every group dropped: loss 0, dlogp 0. */
    reward[3] = 1.0f;
    obj_new(&o, "dapo", "");
    cr_expect_eq(obj_loss(&o, &b, d), 0.0);
    for (int i = 0; i < 12; i++) cr_expect_eq(d[i], 0.0f);
    cr_expect_eq(metric(&o, "groups_kept"), 0.0);
    obj_free(&o);
}

Test(dapo, soft_overlong_penalty) {
    /* max_len 10, cache_len 4: no penalty up to 6 tokens, (6 - len) / 4 in (6, 10], -1 beyond 10.
     * Four sequences of lengths 5, 8, 10, 11 (T = 12), two groups, raw rewards all 1. */
    const int T = 12, lens[4] = {5, 8, 10, 11};
    float logp[48], mask[48], reward[4] = {1, 1, 1, 1}, d[48];
    for (int s = 0; s < 4; s++)
        for (int t = 0; t < T; t++) logp[s * T + t] = -1.0f, mask[s * T + t] = t < lens[s];
    m1c_objective_batch b = {.B = 4, .T = T, .group = 2, .logp = logp, .mask = mask, .reward = reward};
    obj o;
    /* Without std normalisation A = shaped R - group mean shows the penalty directly. Dynamic sampling is
     * off here: it looks at the raw rewards, which are all equal. */
    obj_new(&o, "dapo", "max_len = 10; cache_len = 4; std_normalize = false; dynamic_sampling = false;");
    obj_loss(&o, &b, d);
    const double pen[4] = {0.0, -0.5, -1.0, -1.0};
    const double pen_mean = (pen[0] + pen[1] + pen[2] + pen[3]) / 4;
    /* quarters and halves: exact in binary, 1e-12 only absorbs summation order */
    EXPECT_NEAR(metric(&o, "overlong_penalty_mean"), pen_mean, 1e-12, 0, "penalty");
    cr_expect_eq(metric(&o, "overlong_frac"), 0.75);
    /* Group 0: shaped {1, 0.5}, A = {+0.25, -0.25}; group 1: shaped {0, 0}, A = 0. K = 34 tokens. */
    EXPECT_NEAR(d[0], -0.25 / 34.0, 0, 1e-7, "dlogp[0] = %.9g", d[0]); /* f32 rounding */
    EXPECT_NEAR(d[T], 0.25 / 34.0, 0, 1e-7, "dlogp[T] = %.9g", d[T]);
    cr_expect_eq(d[2 * T], 0.0f);
    cr_expect_eq(d[5], 0.0f); /* past the end of sequence 0 (mask 0) */
    obj_free(&o);

    /* With dynamic sampling (the default) both groups have equal raw rewards and drop out. */
    obj_new(&o, "dapo", "max_len = 10; cache_len = 4;");
    obj_loss(&o, &b, d);
    cr_expect_eq(metric(&o, "groups_kept"), 0.0);
    obj_free(&o);
}

Test(dapo, finite_differences) {
    obj o;
    obj_new(&o, "dapo", "max_len = 4; cache_len = 2;");
    /* Three groups of 3: the last has equal rewards and is dropped. Lengths 5, 4, 3 (the masked prompt
     * of 0..2 tokens), so the overlong penalty shapes the rewards too. */
    const float r[9] = {1, 0, 0.5f, 0, 1, 1, 1, 1, 1};
    batch b;
    batch_init(&b, 9, 5, 3, r);
    fd_check(&o, &b, 1, 0, 0, 0);
    fd_check(&o, &b, 0, 0, 0, 1); /* on-policy */
    cr_expect_eq(metric(&o, "groups_kept"), 2.0); /* metrics of fd_check's last call */
    batch_free(&b);
    obj_free(&o);
}

/* ---- the shared group advantages ------------------------------------------------------------------ */

/* The three RL objectives share one advantage helper. A group of 3 (the tiny batches above all use 2, where
 * A = +-1 whatever the normalisation) with rewards {1, 0, 0.5}: mean 0.5, population std sqrt(1/6), so
 * A = {+-0.5, 0} / (sqrt(1/6) + 1e-6) = {+-1.2247, 0}; a sample std (n - 1) would give +-1. One token per
 * sequence, on-policy (r = 1): all three reduce to dlogp = -A / B (grpo: 1/B per sequence of one token;
 * cispo and dapo: 1/B per token). With B = 6 a second group with equal rewards must get A = 0 (dapo:
 * dynamic sampling off, so it stays in and the normaliser is 6). */
Test(objectives, group_advantages_population_std) {
    const char *rl[3] = {"cispo", "grpo", "dapo"};
    const char *settings[3] = {"", "", "dynamic_sampling = false;"};
    float logp[6] = {-1, -2, -0.5f, -1, -1, -1}, mask[6] = {1, 1, 1, 1, 1, 1};
    float reward[6] = {1, 0, 0.5f, 2, 2, 2};
    const double A = 0.5 / (sqrt(1.0 / 6.0) + 1e-6); /* adv_eps 1e-6 */
    const double want[3] = {-A, A, 0.0};
    for (int k = 0; k < 3; k++) {
        obj o;
        float d[6];
        obj_new(&o, rl[k], settings[k]);
        for (int B = 3; B <= 6; B += 3) {
            m1c_objective_batch b = {.B = B, .T = 1, .group = 3, .logp = logp, .mask = mask, .reward = reward};
            obj_loss(&o, &b, d);
            for (int s = 0; s < 3; s++) /* f32 dlogp: 1e-7 relative covers its rounding */
                EXPECT_NEAR(d[s], want[s] / B, 1e-9, 1e-7, "%s B=%d: dlogp[%d] = %.9g, want %.9g", rl[k], B, s,
                            d[s], want[s] / B);
            for (int s = 3; s < B; s++)
                cr_expect_eq(d[s], 0.0f, "%s: equal rewards, dlogp[%d] = %g", rl[k], s, d[s]);
            /* mean |A| over the sequences, in double throughout */
            EXPECT_NEAR(metric(&o, "adv_abs"), 2.0 * A / B, 1e-12, 1e-12, "%s B=%d: adv_abs", rl[k], B);
        }
        obj_free(&o);
    }
}

/* ---- refusals ------------------------------------------------------------------------------------- */

static void expect_refused(const char *plugin, const char *settings, const char *key) {
    obj o;
    cr_expect_eq(obj_create(&o, plugin, settings), M1C_ERR, "%s { %s } was accepted", plugin, settings);
    cr_expect(strstr(o.p->error, key) != NULL, "%s { %s }: error does not name %s: %s", plugin, settings, key,
              o.p->error);
    cr_log_info("refused: %s", o.p->error);
    obj_free(&o);
}

Test(objectives, settings_validation) {
    expect_refused("xent", "label_smoothing = 0.1;", "label_smoothing"); /* xent has no settings */
    expect_refused("cispo", "eps_hihg = 0.3;", "eps_hihg");
    expect_refused("cispo", "eps_high = -0.1;", "eps_high");
    expect_refused("grpo", "eps = -0.2;", "eps");
    expect_refused("grpo", "kl_coef = -1.0;", "kl_coef");
    expect_refused("dapo", "max_len = 4; cache_len = 5;", "cache_len");
    expect_refused("dapo", "cache_len = 5;", "cache_len");
}

/* DAPO's cache_len is refused for its relation to max_len, after the getters: the error must still
 * carry the file, the line of cache_len (not max_len's, which sits on another line) and the key. */
static void expect_refused_at(const char *plugin, const char *settings, const char *where) {
    obj o;
    cr_expect_eq(obj_create(&o, plugin, settings), M1C_ERR, "%s { %s } was accepted", plugin, settings);
    cr_expect(strstr(o.p->error, where) != NULL, "%s { %s }: error does not start at %s: %s", plugin, settings,
              where, o.p->error);
    cr_log_info("refused: %s", o.p->error);
    obj_free(&o);
}

Test(objectives, relation_errors_name_line_and_key) {
    expect_refused_at("dapo", "max_len = 4;\ncache_len = 5;\n",
                      "test.cfg:2: cache_len: 5 exceeds max_len = 4");
    expect_refused_at("dapo", "cache_len = 5;\n\nmax_len = 4;\n", "test.cfg:1: cache_len: 5 exceeds");
    expect_refused_at("dapo", "eps_low = 0.2;\n\ncache_len = 3;\n",
                      "test.cfg:3: cache_len: 3 needs max_len");
}

Test(objectives, batch_refusals) {
    const char *rl[3] = {"cispo", "grpo", "dapo"};
    float logp[6] = {-1, -1, -1, -1, -1, -1}, mask[6] = {1, 1, 1, 1, 1, 1}, reward[3] = {1, 0, 1}, d[6];
    for (int k = 0; k < 3; k++) {
        obj o;
        obj_new(&o, rl[k], "");
        double loss;
        /* 3 sequences are not whole groups of 2 */
        m1c_objective_batch b = {.B = 3, .T = 2, .group = 2, .logp = logp, .mask = mask, .reward = reward};
        cr_expect_eq(o.vt->loss(o.self, &b, &loss, d, o.names, o.values, MAXM), M1C_ERR, "%s", rl[k]);
        cr_expect(strstr(o.p->error, "group") != NULL, "%s: %s", rl[k], o.p->error);
        b.group = 1, b.reward = NULL; /* RL objectives need rewards */
        o.p->error[0] = '\0';
        cr_expect_eq(o.vt->loss(o.self, &b, &loss, d, o.names, o.values, MAXM), M1C_ERR, "%s", rl[k]);
        cr_expect(strstr(o.p->error, "reward") != NULL, "%s: %s", rl[k], o.p->error);
        obj_free(&o);
    }
}
