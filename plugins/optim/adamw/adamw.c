/* AdamW optimizer plugin: bias-corrected Adam moments with decoupled weight decay, the same arithmetic
 * as torch.optim.AdamW (single-tensor path), on CPU f32 tensors with OpenMP over elements, or on CUDA
 * tensors through adamw.cu (same formula, fused multi-tensor kernel). */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include "m1c/plugin.h"

typedef struct adamw {
    const m1c_host *h;
    double beta1, beta2; /* double: torch rounds 1 - beta (not beta) to f32, and 1 - 0.999f != 0.001f */
    float eps;          /* M1 uses 1e-15: its gradients span 1e-18..1e-5, so 1e-8 would swamp them */
    double weight_decay; /* decoupled: p *= 1 - lr*wd before the Adam update */
} adamw;

/* State per parameter, in this order: parameter i's are a->state[i * ADAMW_N_STATE + k]. */
static const char *const adamw_state_names[] = {"exp_avg", "exp_avg_sq"};
#define ADAMW_N_STATE 2

/* Below this many elements the OpenMP fork costs more than the loop. */
#define ADAMW_PAR_MIN 16384

static int adamw_create(const m1c_host *h, const m1c_settings *s, void **self) {
    double b1, b2, eps, wd;
    *self = NULL;
    if (h->get_float(h, s, "beta1", 0.9, 0.0, 1.0, &b1) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "beta2", 0.999, 0.0, 1.0, &b2) != M1C_OK) return M1C_ERR;
    /* lo > 0: eps = 0 turns a zero gradient into 0/0. 1e-30 is still a normal f32. */
    if (h->get_float(h, s, "eps", 1e-8, 1e-30, 1.0, &eps) != M1C_OK) return M1C_ERR;
    if (h->get_float(h, s, "weight_decay", 0.0, 0.0, 1.0, &wd) != M1C_OK) return M1C_ERR;
    if (h->settings_done(h, s) != M1C_OK) return M1C_ERR;
    /* The getters' ranges are closed; beta = 1 would make the bias correction 1 - beta^t zero. */
    if (b1 >= 1.0)
        return h->settings_error(h, s, "beta1", "must be < 1, got %g (bias correction 1 - beta1^t = 0)",
                                 b1);
    if (b2 >= 1.0)
        return h->settings_error(h, s, "beta2", "must be < 1, got %g (bias correction 1 - beta2^t = 0)",
                                 b2);

    adamw *a = calloc(1, sizeof *a);
    if (!a) return h->error(h, "out of memory creating the optimizer");
    a->h = h;
    a->beta1 = b1;
    a->beta2 = b2;
    a->eps = (float)eps;
    a->weight_decay = wd;
    *self = a;
    return M1C_OK;
}

static void adamw_destroy(void *self) { free(self); }

static int adamw_state(void *self, const char **names, int max) {
    (void)self;
    for (int i = 0; names && i < ADAMW_N_STATE && i < max; i++) names[i] = adamw_state_names[i];
    return ADAMW_N_STATE;
}

static const char *tname(const m1c_tensor *t) { return t->name ? t->name : "(unnamed)"; }

/* Every tensor must be an f32 tensor (bf16 for the low-precision copies) of the parameter's size on the
 * step's device: checked for all of them before any is touched, so a refused step leaves parameters and
 * state as they were. */
static int check_tensor(const m1c_host *h, const m1c_tensor *t, const char *what, int i, int64_t n, int device,
                        int dtype) {
    if (t->device != device)
        return h->error(h, "%s of parameter %d (%s) is on device %d, the optimizer step on device %d (%s)", what, i,
                        tname(t), (int)t->device, device, device == M1C_DEVICE_CUDA ? "CUDA" : "CPU");
    if (t->dtype != dtype)
        return h->error(h, "%s of parameter %d (%s) has dtype %d: adamw needs %s", what, i, tname(t),
                        (int)t->dtype, dtype == M1C_BF16 ? "bf16" : "f32");
    if (!t->data && n > 0) return h->error(h, "%s of parameter %d (%s) has no data", what, i, tname(t));
    if (m1c_tensor_numel(t) != n)
        return h->error(h, "%s of parameter %d (%s) has %lld elements, the parameter %lld", what, i, tname(t),
                        (long long)m1c_tensor_numel(t), (long long)n);
    return M1C_OK;
}

#ifdef M1C_HAVE_CUDA
/* adamw.cu: the same update on CUDA tensors, in fused multi-tensor launches on a->stream. */
int adamw_cuda_step(const m1c_optim_step *a, int n_state, float keep_decay, float step_size, float bc2_sqrt,
                    float b2, float eps, float w1, float w2, char *err, size_t err_len);
#endif

static int adamw_step(void *self, const m1c_optim_step *a) {
    adamw *o = self;
    const m1c_host *h = o->h;
    if (a->device != M1C_DEVICE_CPU && a->device != M1C_DEVICE_CUDA)
        return h->error(h, "optimizer step on unknown device %d", (int)a->device);
#ifndef M1C_HAVE_CUDA
    if (a->device == M1C_DEVICE_CUDA)
        return h->error(h, "adamw was built without CUDA: rebuild with CUDA or run the optimizer on the CPU");
#endif
    if (a->step < 1) return h->error(h, "optimizer step %lld: steps are 1-based", (long long)a->step);
    if (!isfinite(a->lr) || a->lr < 0.0f)
        return h->error(h, "learning rate %g is not a finite value >= 0", a->lr);
    if (a->n < 0 || (a->n > 0 && (!a->params || !a->grads || !a->state)))
        return h->error(h, "optimizer step with %d tensors but missing params, grads or state", (int)a->n);
    for (int i = 0; i < a->n; i++) {
        int64_t n = m1c_tensor_numel(&a->params[i]);
        const int dev = a->device;
        if (check_tensor(h, &a->params[i], "parameter", i, n, dev, M1C_F32) != M1C_OK) return M1C_ERR;
        if (check_tensor(h, &a->grads[i], "gradient", i, n, dev, M1C_F32) != M1C_OK) return M1C_ERR;
        for (int k = 0; k < ADAMW_N_STATE; k++)
            if (check_tensor(h, &a->state[i * ADAMW_N_STATE + k], adamw_state_names[k], i, n, dev, M1C_F32) !=
                M1C_OK)
                return M1C_ERR;
        /* The CPU path leaves params_lp to the core (m1c_to_bf16); on CUDA it is written in the kernel. */
        if (dev == M1C_DEVICE_CUDA && a->params_lp &&
            check_tensor(h, &a->params_lp[i], "bf16 copy", i, n, dev, M1C_BF16) != M1C_OK)
            return M1C_ERR;
    }

    /* Scalars in double, as torch computes them in Python, then rounded once to f32. */
    const double lr = a->lr;
    const double bc1 = 1.0 - pow(o->beta1, (double)a->step);
    const double bc2 = 1.0 - pow(o->beta2, (double)a->step);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float b2 = (float)o->beta2, eps = o->eps;
    const float w1 = (float)(1.0 - o->beta1), w2 = (float)(1.0 - o->beta2);
#ifdef M1C_HAVE_CUDA
    if (a->device == M1C_DEVICE_CUDA) {
        /* keep as the CPU loop below computes it for a decayed tensor; the kernel uses 1 for no_decay. */
        const float keep_decay = o->weight_decay > 0.0 ? (float)(1.0 - lr * o->weight_decay) : 1.0f;
        char err[256];
        if (adamw_cuda_step(a, ADAMW_N_STATE, keep_decay, step_size, bc2_sqrt, b2, eps, w1, w2, err, sizeof err))
            return h->error(h, "%s", err);
        return M1C_OK;
    }
#endif
    int nt = h->cpu_threads ? h->cpu_threads(h) : 0;
    if (nt <= 0) nt = omp_get_max_threads();

    for (int i = 0; i < a->n; i++) {
        const int64_t n = m1c_tensor_numel(&a->params[i]);
        float *p = a->params[i].data;
        const float *g = a->grads[i].data;
        float *m = a->state[i * ADAMW_N_STATE + 0].data; /* exp_avg */
        float *v = a->state[i * ADAMW_N_STATE + 1].data; /* exp_avg_sq */
        const int decay = o->weight_decay > 0.0 && !(a->no_decay && a->no_decay[i]);
        const float keep = decay ? (float)(1.0 - lr * o->weight_decay) : 1.0f;
#pragma omp parallel for num_threads(nt) schedule(static) if (n >= ADAMW_PAR_MIN)
        for (int64_t j = 0; j < n; j++) {
            const float gj = g[j];
            float pj = p[j] * keep;            /* decoupled decay first: param.mul_(1 - lr*wd) */
            const float mj = m[j] + w1 * (gj - m[j]); /* exp_avg.lerp_(grad, 1 - beta1) */
            const float vj = v[j] * b2 + w2 * gj * gj; /* exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2) */
            const float denom = sqrtf(vj) / bc2_sqrt + eps;
            pj -= step_size * (mj / denom);
            m[j] = mj;
            v[j] = vj;
            p[j] = pj;
        }
    }
    return M1C_OK;
}

static const m1c_optimizer_vtable adamw_vtable = {
    .size = sizeof(m1c_optimizer_vtable),
    .create = adamw_create,
    .destroy = adamw_destroy,
    .state = adamw_state,
    .step = adamw_step,
};

M1C_PLUGIN(OPTIMIZER, optimizer, adamw_vtable, "adamw", "0.1.0",
           "AdamW (torch.optim.AdamW arithmetic, decoupled weight decay), CPU or CUDA f32", "MIT")
