/* Test harness shared by the Criterion tests: plugin instances with their buffers, random inputs,
 * comparisons, finite-difference gradient checks, and scratch folders, files and m1c processes. */
#ifndef M1C_TEST_HARNESS_H
#define M1C_TEST_HARNESS_H

#include <stddef.h>
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
/* Create an instance of a layer plugin (kind M1C_KIND_ATTENTION or M1C_KIND_MOE) from settings text and
 * info, and destroy it again: the create status, with the plugin (its error message in ->error) in *pp
 * when pp is not NULL. */
int th_try_create(const char *plugin, int kind, const char *body, const m1c_layer_info *info, m1c_plugin **pp);

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
/* The same with every parameter, gradient and bf16 copy in an allocation of its own, not side by side as
 * the core's arenas (and th_layer_new_dev) place them: the plugins' paths for parameters apart. */
th_layer *th_layer_new_apart(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                             int B, int T, uint64_t seed, float param_std, int device, int compute_dtype);
/* The same on CUDA in BF16, created with m1c_layer_info.lp_inputs = 1: the caller sets bufs.in_lp (and for
 * an attention backward bufs.dout_lp) before th_forward / th_backward, as the core does. */
th_layer *th_layer_new_lp(const char *plugin, const char *settings, int layer_index, int n_layers, int hidden,
                          int B, int T, uint64_t seed, float param_std);
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

/* The buffer named `name` among n tensors described by specs s (e.g. l->grads, l->pspec, l->np);
 * asserts there is one. */
m1c_tensor *th_find_buf(m1c_tensor *t, const m1c_buf_spec *s, int n, const char *name);
/* A 1-D tensor of n elements viewing data (not copied). */
m1c_tensor th_vec(void *data, int64_t n, int dtype, int device, const char *name);

/* Softmax attention shapes, shared by that plugin's CPU and GPU tests: hidden size H, nh query heads,
 * kvh KV heads, head_dim hd, rotary_dim rd, rope_theta; th_softmax_settings spells one as settings. */
typedef struct th_softmax_cfg {
    int H, nh, kvh, hd, rd;
    double theta;
    const char *kernel; /* the setting "kernel", or NULL for the default */
} th_softmax_cfg;
typedef struct th_text {
    char s[256];
} th_text;
th_text th_softmax_settings(const th_softmax_cfg *c);

/* Skip the calling test where the build has no CUDA or the machine no GPU. */
void th_need_gpu(void);

/* Assert that s contains sub (the message shows both). */
void th_assert_has(const char *s, const char *sub);

/* ---- files and processes ---------------------------------------------------------------------- */

/* A whole file, NUL-terminated (malloc'd); its length into *len unless NULL. Asserts it opens. */
char *th_slurp(const char *path, long *len);
/* Up to cap bytes of a file into buf; returns how many. Asserts it opens. */
size_t th_read_into(const char *path, void *buf, size_t cap);
/* Write n bytes to path (created or truncated); asserts every byte is written. */
void th_write_file(const char *path, const void *data, size_t n);

/* A fresh folder <parent>/<name>_XXXXXX (malloc'd path); asserts it is made. */
char *th_mkdtemp(const char *parent, const char *name);
/* Remove a file or a folder with all it holds, not following symbolic links; 0 when all went. */
int th_rm_rf(const char *path);

/* A suite's scratch folder /tmp/m1c_test_<tag>_XXXXXX: th_tmpdir_init from the suite's .init,
 * th_tmpdir_fini (removes it with its contents) as or from its .fini, which also runs after a failed
 * test. Criterion runs each test in its own process, so each test has its own folder; it is made at
 * the first th_tmpdir (or a path in it), so a test skipped before that leaves none behind. */
void th_tmpdir_init(const char *tag);
void th_tmpdir_fini(void);
const char *th_tmpdir(void);
/* <scratch folder>/<name>, malloc'd. */
char *th_tmpdir_path(const char *name);
/* The same path in one of 4 rotating static buffers: valid until the fourth call after. */
const char *th_tmp(const char *name);

/* Run the build tree's m1c binary with args (NULL-terminated) and wait for it; returns its exit
 * status (-1 if a signal ended it). Its stdout and stderr go into *out and *err (malloc'd, through
 * files of the scratch folder, so th_tmpdir_init must have run), or to /dev/null where NULL. */
int th_run_m1c(const char *const *args, char **out, char **err);
/* Run a shell command (popen); its whole stdout (malloc'd), its exit status (-1 for a signal) into
 * *status unless NULL. */
char *th_shell(const char *cmd, int *status);

#endif
