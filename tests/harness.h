/* Test harness shared by the Criterion tests: plugin instances with their buffers, random inputs,
 * comparisons and finite-difference gradient checks. */
#ifndef M1C_TEST_HARNESS_H
#define M1C_TEST_HARNESS_H

#include <stdint.h>
#include "m1c/plugin.h"
#include "../core/loader.h"
#include "../core/config.h"

/* The registry of a test: searches the build tree's plugins (M1C_TEST_PLUGIN_DIR). */
m1c_registry *th_registry(void);

/* Load a plugin by name from the build tree; asserts it loads. */
m1c_plugin *th_plugin(const char *name, int kind);

/* Settings from libconfig text of one group's body, e.g. "heads = 2; head_dim = 8;". Free the
 * config with m1c_config_free(*cfg) when done. */
m1c_settings *th_settings(const char *body, m1c_config **cfg);

/* A layer plugin instance (attention or MoE) with every buffer it declares for (B, T):
 * params initialised from the plugin's specs with the given seed (M1C_INIT_NORMAL uses
 * max(spec std, param_std) so that tests exercise non-trivial weights), grads/acts/scratch zeroed. */
typedef struct th_layer {
    int device, compute_dtype;
    m1c_tensor *params_lp; /* BF16 compute: bf16 copies of params on the device */
    m1c_plugin *plugin;
    const m1c_layer_ops *ops;
    void *self;
    m1c_config *cfg;
    int B, T, H;
    int np, na, ns;
    m1c_buf_spec *pspec, *aspec, *sspec;
    m1c_tensor *params, *grads, *acts, *scratch;
    m1c_layer_bufs bufs;
} th_layer;

th_layer *th_layer_new(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                       int B, int T, uint64_t seed, float param_std);
/* The same instance on a device (M1C_DEVICE_CUDA) with a compute dtype (M1C_F32 or M1C_BF16): every
 * buffer is device memory, the parameters equal th_layer_new's for the same seed, and with M1C_BF16
 * bufs.params_lp holds their bf16 copies. th_forward/th_backward take device pointers for it. */
th_layer *th_layer_new_dev(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                           int B, int T, uint64_t seed, float param_std, int device, int compute_dtype);
/* Copy a layer's parameters (f32) from one instance to another of the same plugin and settings, on any
 * devices (refreshing the bf16 copies of a BF16 destination). */
void th_layer_copy_params(th_layer *dst, const th_layer *src);
/* Copy a tensor-sized array between host and device: th_to_dev allocates on dev, th_to_host mallocs. */
float *th_to_dev(int dev, const float *host, int64_t n);
float *th_to_host(int dev, const float *ptr, int64_t n);
void th_dev_free(int dev, void *p);
void th_layer_free(th_layer *l);
void th_layer_zero_grads(th_layer *l);
/* Run forward with training = 1; asserts M1C_OK. */
void th_forward(th_layer *l, float *out, const float *in);
/* Backward; din and grads accumulate. */
void th_backward(th_layer *l, float *din, const float *dout, const float *in);

/* Decoding state buffers for the attention plugin: declared by vtable->state for (batch, max_len). */
typedef struct th_state {
    int n;
    m1c_buf_spec *spec;
    m1c_tensor *t;
} th_state;
th_state *th_state_new(th_layer *l, int batch, int64_t max_len);
void th_state_free(th_state *s);

/* Helpers. */
float *th_randn(int64_t n, uint64_t seed, float std); /* malloc'd */
float *th_zeros(int64_t n);
double th_max_abs_diff(const float *a, const float *b, int64_t n);
double th_max_abs(const float *a, int64_t n);
/* Max over i of |a-b| / (atol + rtol*|b|): <= 1 means within tolerance. */
double th_rel_err(const float *a, const float *b, int64_t n, double atol, double rtol);

/* Finite-difference check of a layer's gradients on the scalar loss L = sum(out * w) for a fixed
 * random w: compares analytic d(in) and d(param) with central differences in double-evaluated
 * perturbations of step eps at `samples` random coordinates of each tensor. Returns the worst
 * relative error |a - n| / max(1e-3, |a| + |n|) and prints the offender via cr_log_info. */
double th_fd_check_layer(th_layer *l, const float *in, float eps, int samples, uint64_t seed);

#endif
