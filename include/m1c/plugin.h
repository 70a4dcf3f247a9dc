/* m1c plugin ABI: the one header a plugin author needs.
 *
 * A plugin is a shared object exporting one function, M1C_PLUGIN_ENTRY_SYMBOL. The core calls it with
 * a host-API table (the plugin's whole view of the core: logging, errors, settings, memory, GEMM, RNG,
 * time) and receives a descriptor naming the plugin's kind and its kind's vtable. A plugin links
 * against nothing of the core.
 *
 * Compatibility rules (SQLite/GStreamer style): every struct here only grows at its end and carries
 * its size; a plugin built against ABI major.minor loads in a core of the same major and a minor at
 * least as new. Any change of layout or enum order bumps M1C_ABI_MAJOR.
 *
 * Conventions (llm.c style): forward(out, in..., B, T); backward(din..., dout, ...) where gradients
 * (parameter gradients and input gradients alike) ACCUMULATE with += (but for a parameter gradient the
 * core hands over unset: M1C_TENSOR_UNSET, since ABI 1.3); dimensions last. All pointers
 * handed to a vtable function live on the device named in the instance's m1c_layer_info.
 */
#ifndef M1C_PLUGIN_H
#define M1C_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define M1C_ABI_MAJOR 1
#define M1C_ABI_MINOR 5

#if defined(__GNUC__)
#define M1C_EXPORT __attribute__((visibility("default")))
#define M1C_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define M1C_EXPORT
#define M1C_PRINTF(f, a)
#endif

/* ---- basic types --------------------------------------------------------------------------- */

enum { M1C_OK = 0, M1C_ERR = -1 };

typedef enum m1c_kind {
    M1C_KIND_ATTENTION = 1, /* token mixer: softmax, lightning, ... */
    M1C_KIND_MOE = 2,       /* feed-forward: top-k MoE, dense FFN, ... */
    M1C_KIND_OPTIMIZER = 3, /* AdamW, ... */
    M1C_KIND_OBJECTIVE = 4, /* cross-entropy, CISPO, GRPO, ... */
    M1C_KIND_DATA = 5,      /* text corpora, generated tasks, ... */
} m1c_kind;

typedef enum m1c_dtype { M1C_F32 = 0, M1C_BF16 = 1, M1C_I32 = 2 } m1c_dtype;
typedef enum m1c_device { M1C_DEVICE_CPU = 0, M1C_DEVICE_CUDA = 1 } m1c_device;
typedef enum m1c_log_level { M1C_LOG_ERROR = 0, M1C_LOG_WARN = 1, M1C_LOG_INFO = 2, M1C_LOG_DEBUG = 3 } m1c_log_level;

#define M1C_MAX_DIMS 4

/* A view of memory the core owns. */
typedef struct m1c_tensor {
    void *data;
    int32_t dtype;  /* m1c_dtype */
    int32_t device; /* m1c_device */
    int32_t ndim;
    uint32_t flags; /* since ABI 1.3: M1C_TENSOR_* (0 before) */
    int64_t shape[M1C_MAX_DIMS];
    const char *name; /* full name, e.g. "model.layers.3.self_attn.qkv_proj.weight" */
} m1c_tensor;

/* m1c_tensor.flags of a parameter gradient handed to a backward (m1c_layer_bufs.grads): the gradient holds
 * no values yet this step, because the plugin declared it m1c_buf_spec.grad_written and the core skipped
 * zeroing it: the backward writes every element (as if it had been zero and the backward added to it).
 * Without the flag the backward adds (+=), as always. */
#define M1C_TENSOR_UNSET 1u

/* How the core initialises a parameter the plugin declares. */
typedef enum m1c_init {
    M1C_INIT_NORMAL = 0, /* N(0, std^2) */
    M1C_INIT_ZEROS = 1,
    M1C_INIT_ONES = 2,
    M1C_INIT_CONST = 3, /* every element = std */
} m1c_init;

/* A buffer a plugin asks the core for: a parameter (its HF name suffix, shape, initialisation) or an
 * activation/state/scratch buffer (name, shape). */
typedef struct m1c_buf_spec {
    const char *name; /* parameters: HF suffix under the layer, e.g. "self_attn.qkv_proj.weight" */
    int32_t dtype;    /* m1c_dtype */
    int32_t ndim;
    int64_t shape[M1C_MAX_DIMS];
    int32_t init;      /* parameters only: m1c_init */
    int32_t no_decay;  /* parameters only: 1 = exclude from weight decay (norm gains, biases) */
    float std;         /* parameters only: see m1c_init */
    int32_t backward_only; /* activations only: 1 = read by backward alone, never by a forward with
                            * training = 0; a run made for inference then leaves it unallocated (its
                            * tensor's data NULL), which the forward must not touch. 0 (default): always. */
    int32_t grad_written; /* parameters only, since ABI 1.3: 1 = the backward honours M1C_TENSOR_UNSET on
                           * this parameter's gradient, so the core need not zero it before a step (one
                           * pass over it fewer: a plugin whose products write each element once can store
                           * instead of adding). 0 (default): the core zeroes it. */
    int32_t in_proj; /* parameters only, since ABI 1.4: 1 = this parameter is a (P, H) f32 matrix W, P <=
                      * M1C_IN_PROJ_MAX, and the forward would like in W^T (B, T, P) from the core, which
                      * can compute it in the pass of its norm that writes `in` (the row is in registers
                      * there: no read of `in` for it), handed over as m1c_layer_bufs.in_proj. At most one
                      * parameter of an instance. 0 (default): none. */
} m1c_buf_spec;

/* The most rows P of a parameter declared m1c_buf_spec.in_proj. */
#define M1C_IN_PROJ_MAX 32

/* Opaque handles owned by the core. */
typedef struct m1c_settings m1c_settings; /* a plugin's settings group in the config */

/* Deterministic RNG state (xoshiro256**); plugins draw through the host functions. */
typedef struct m1c_rng {
    uint64_t s[4];
} m1c_rng;

/* ---- the host-API table -------------------------------------------------------------------- */

/* One product of m1c_host.gemm_group: gemm_ex's arguments. Passed in arrays, so it cannot grow at its
 * end: later members take the reserved room, which callers zero (designated initializers do). */
typedef struct m1c_gemm_desc {
    int trans_a, trans_b, M, N, K;
    float alpha, beta;
    const void *A, *B;
    void *C;
    int a_dtype, b_dtype, c_dtype, lda, ldb, ldc, batch;
    int64_t stride_a, stride_b, stride_c;
    int64_t reserved[2];
} m1c_gemm_desc;

typedef struct m1c_host m1c_host;
struct m1c_host {
    uint32_t abi_major, abi_minor; /* of the core */
    uint32_t size;                 /* sizeof(m1c_host) in the core: members past it are absent */
    uint32_t reserved0;
    void *core; /* the core's context for this plugin; plugins never look inside */

    /* Logging. Messages are prefixed with the plugin's name. */
    void (*log)(const m1c_host *h, int level, const char *fmt, ...) M1C_PRINTF(3, 4);
    /* Record an error message for the core to report (it names the plugin and its file); returns
     * M1C_ERR so that `return h->error(h, "...")` reads naturally. */
    int (*error)(const m1c_host *h, const char *fmt, ...) M1C_PRINTF(2, 3);

    /* Settings of the plugin's group. Each getter validates type and range, fills in the default
     * where the key is absent (the default shows in `m1c config show`), and on failure records an
     * error naming the config file, line and key path, returning M1C_ERR. After reading every key
     * it knows, a plugin calls settings_done: any key it did not read is refused as unknown. */
    int (*get_int)(const m1c_host *h, const m1c_settings *s, const char *key, int64_t def, int64_t lo,
                   int64_t hi, int64_t *out);
    int (*get_float)(const m1c_host *h, const m1c_settings *s, const char *key, double def, double lo,
                     double hi, double *out);
    int (*get_bool)(const m1c_host *h, const m1c_settings *s, const char *key, int def, int *out);
    /* choices: NULL-terminated list of allowed values, or NULL for any string. */
    int (*get_string)(const m1c_host *h, const m1c_settings *s, const char *key, const char *def,
                      const char *const *choices, const char **out);
    /* Strings of a list setting (e.g. file globs): count, then each. */
    int (*get_list_len)(const m1c_host *h, const m1c_settings *s, const char *key, int *out);
    int (*get_list_string)(const m1c_host *h, const m1c_settings *s, const char *key, int i, const char **out);
    int (*settings_done)(const m1c_host *h, const m1c_settings *s);
    /* Numbers of a list setting (e.g. mixture weights). */
    int (*get_list_float)(const m1c_host *h, const m1c_settings *s, const char *key, int i, double *out);
    /* A subgroup `key` (absent: an empty group, so its defaults fill in), or element i of a list of
     * groups (e.g. data sources). Subgroups are validated like the plugin's own group: the plugin
     * calls settings_done on each. */
    int (*get_group)(const m1c_host *h, const m1c_settings *s, const char *key, const m1c_settings **out);
    int (*get_list_group)(const m1c_host *h, const m1c_settings *s, const char *key, int i,
                          const m1c_settings **out);

    /* Memory on a device (for a plugin's small private tables; big buffers are declared instead). */
    void *(*alloc)(const m1c_host *h, int device, size_t bytes);
    void (*free)(const m1c_host *h, int device, void *p);

    /* Row-major f32 GEMM on a device: C = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T,
     * C is M x N, op(A) is M x K, op(B) is K x N. lda/ldb/ldc are row strides. */
    void (*gemm)(const m1c_host *h, int device, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* The same, `batch` times, advancing A, B, C by stride_a/b/c elements. */
    void (*gemm_batched)(const m1c_host *h, int device, int trans_a, int trans_b, int M, int N, int K,
                         float alpha, const float *A, int lda, int64_t stride_a, const float *B, int ldb,
                         int64_t stride_b, float beta, float *C, int ldc, int64_t stride_c, int batch);

    /* Mixed-precision GEMM: C = alpha * op(A) op(B) + beta * C, row-major like gemm, `batch` times
     * with element strides; A and B of a_dtype/b_dtype and C of c_dtype, each M1C_F32 or M1C_BF16,
     * accumulated in f32 (on the CPU all three must be M1C_F32). stream: the cudaStream_t to run on
     * (NULL: the default stream; ignored on the CPU). Returns M1C_ERR (with the plugin's error set)
     * for dtypes the device cannot combine. */
    int (*gemm_ex)(const m1c_host *h, int device, void *stream, int trans_a, int trans_b, int M, int N, int K,
                    float alpha, const void *A, int a_dtype, int lda, int64_t stride_a, const void *B, int b_dtype,
                    int ldb, int64_t stride_b, float beta, void *C, int c_dtype, int ldc, int64_t stride_c,
                    int batch);

    /* Deterministic RNG (same stream on every machine for the same seed). */
    void (*rng_seed)(m1c_rng *r, uint64_t seed, uint64_t stream);
    uint64_t (*rng_u64)(m1c_rng *r);
    float (*rng_uniform)(m1c_rng *r); /* [0, 1) */
    float (*rng_normal)(m1c_rng *r);  /* N(0, 1) */

    /* Monotonic seconds. */
    double (*now)(void);

    /* Threads the CPU backend may use (OpenMP-parallel plugins should use no more). */
    int (*cpu_threads)(const m1c_host *h);

    /* Refuse a setting for a reason the getters cannot check (a relation between keys, say): records
     * "file:line: path.key: <message>" as the plugin's error and returns M1C_ERR. */
    int (*settings_error)(const m1c_host *h, const m1c_settings *s, const char *key, const char *fmt, ...)
        M1C_PRINTF(4, 5);

    /* Since ABI 1.1. n independent gemm_ex products (none writes what another reads or writes), in
     * any order or at once, with the results of n gemm_ex calls in a row up to f32 summation order
     * (deterministic: the same sequence of calls gives the same bits): on the GPU the core runs them concurrently on streams of
     * its own, after everything queued on `stream` before the call and before everything queued on it
     * after. For many products too small to fill the GPU alone (a MoE's
     * per-expert products). Returns M1C_ERR (the plugin's error set, nothing run) for dtypes the device
     * cannot combine. */
    int (*gemm_group)(const m1c_host *h, int device, void *stream, const m1c_gemm_desc *g, int n);

    void *reserved[31];
};

/* ---- layers: what attention and MoE plugins share ------------------------------------------ */

/* Where an instance sits in the model. */
typedef struct m1c_layer_info {
    uint32_t size;
    int32_t layer_index; /* global index l, 0-based */
    int32_t n_layers;    /* L */
    int32_t hidden;      /* H: the model width in and out */
    int32_t device;      /* m1c_device */
    int32_t compute_dtype; /* M1C_F32: everything in f32 (the CPU reference); M1C_BF16: mixed precision
                            * (GEMM operands and saved activations in bf16, accumulation, norms,
                            * softmax statistics and the lightning state in f32). Layer inputs and
                            * outputs (the residual stream) are f32 either way. */
    uint64_t seed;       /* for anything the instance draws (jitter, ...) */
    int32_t lp_inputs;   /* since ABI 1.2: 1 when the core hands every forward and backward of a run made
                          * for training in_lp, and every such backward of an attention layer dout_lp
                          * (m1c_layer_bufs): the plugin need keep no bf16 copy of its input; else 0 */
    int32_t reserved0;
    int64_t reserved[5];
} m1c_layer_info;

/* Since ABI 1.4 (m1c_layer_bufs.out_rows): a forward's output given as a weighted sum of rows, which the
 * core's norm reads in its own pass instead of a written out:
 *   out[n, :] = sum over j = 0 .. k-1, in order, of weight[n k + j] * rows[idx[n k + j], :]
 * (rows of H elements, row stride H; idx < 0: no term), each term added in f32 by a fused multiply-add,
 * fmaf(weight, element, sum), the sum starting at 0: a MoE's combine of its experts' rows.
 * Since ABI 1.5, idx and weight both NULL with k = 1: the rows are the output itself, out[n, :] =
 * rows[n, :] (a projection that writes its product as bf16 rows, read by the norm in half the bytes). */
typedef struct m1c_out_rows {
    const void *rows;     /* (R, H) of dtype; NULL: the forward wrote out */
    const int32_t *idx;   /* (B T, k); NULL: see above */
    const float *weight;  /* (B T, k); NULL with idx */
    int32_t dtype;        /* M1C_F32 or M1C_BF16 */
    int32_t k;
    int64_t reserved[2];
} m1c_out_rows;

/* The buffers the core hands a layer for one call, in the order the plugin declared them. */
typedef struct m1c_layer_bufs {
    const m1c_tensor *params;
    m1c_tensor *grads; /* same order as params; NULL outside training */
    m1c_tensor *acts;  /* kept from forward to backward, declared for (B, T); in a run made for inference,
                        * those declared backward_only have data NULL */
    m1c_tensor *scratch; /* valid during one call only, shared between layers */
    int32_t training;    /* 1: keep what backward needs, apply train-time noise */
    float aux_scale;     /* weight of the plugin's own loss terms (the MoE auxiliary loss) in the
                          * objective being differentiated: backward scales their gradient by it */
    uint64_t noise_seed; /* seed for this call's train-time noise (jitter, dropout): derived by the
                          * core from the run seed, step and layer, so runs repeat and resume exactly */
    const m1c_tensor *params_lp; /* compute_dtype BF16: bf16 copies of params (same order), refreshed
                                  * by the core after every optimizer step; NULL otherwise */
    void *stream;                /* CUDA: the cudaStream_t to launch on; NULL on the CPU */
    /* Since ABI 1.2 (see m1c_layer_info.lp_inputs): NULL, or in (B, T, H) rounded to bf16 (nearest even),
     * which the core's norm wrote in the pass that made in; the same from a forward to its backward. */
    const void *in_lp;
    const void *dout_lp; /* backward of an attention layer: NULL, or dout rounded to bf16 likewise */
    /* Since ABI 1.4: NULL, or in W^T (B, T, P) f32 for the parameter W the instance declared in_proj
     * (m1c_buf_spec), written by the core's norm in the pass that wrote in (f32 products and sums, in an
     * order of the core's), unchanged until the matching backward. The core hands it where a norm of its
     * own writes the layer's input (not to the first layer's attention, nor on the CPU, nor in every
     * call): a forward given NULL computes the product itself. */
    const float *in_proj;
    /* Since ABI 1.4: NULL, or (on the GPU, where a norm of the core's reads the layer's output) a struct
     * the core cleared before this forward. The forward may fill it instead of writing out (m1c_out_rows:
     * out then holds nothing the core reads); rows, idx and weight must stay as they are until the work
     * the core queues next on the stream has run. A forward that writes out leaves it cleared. */
    m1c_out_rows *out_rows;
} m1c_layer_bufs;

/* Functions every layer plugin (attention or MoE) implements. The instance is created from its
 * settings, declares its parameters and buffers, and computes out = f(in), in/out: (B, T, H) f32. */
typedef struct m1c_layer_ops {
    int (*create)(const m1c_host *h, const m1c_settings *s, const m1c_layer_info *info, void **self);
    void (*destroy)(void *self);
    /* Declare parameters into specs[0..max); return the count (or M1C_ERR). Called with specs ==
     * NULL to ask for the count. */
    int (*params)(void *self, m1c_buf_spec *specs, int max);
    /* Declare activations kept for backward (acts) and per-call scratch for a (B, T) batch. */
    int (*acts)(void *self, int B, int T, m1c_buf_spec *specs, int max);
    int (*scratch)(void *self, int B, int T, m1c_buf_spec *specs, int max);
    /* out: (B, T, H), written. B*T may be smaller than the shape acts/scratch were declared for
     * (the last, shorter chunk of a prefill): index the buffers with the B and T of the call. */
    int (*forward)(void *self, const m1c_layer_bufs *b, float *out, const float *in, int B, int T);
    /* din (B, T, H) and parameter gradients accumulate (+=). dout is NULL only for an attention plugin
     * that set M1C_ATTENTION_DOUT_LP_ONLY, when dout_lp is given. */
    int (*backward)(void *self, const m1c_layer_bufs *b, float *din, const float *dout, const float *in,
                    int B, int T);
} m1c_layer_ops;

/* ---- attention (token mixers) --------------------------------------------------------------- */

/* m1c_attention_vtable.flags: in an instance given m1c_layer_info.lp_inputs = 1, a backward handed
 * m1c_layer_bufs.dout_lp reads it and never dout. The core then writes no f32 dout for the layer (4 bytes
 * an element fewer in the norm's backward pass) and passes dout NULL. */
#define M1C_ATTENTION_DOUT_LP_ONLY 1u

typedef struct m1c_attention_vtable {
    uint32_t size;
    uint32_t flags; /* since ABI 1.5: M1C_ATTENTION_* (0 before) */
    m1c_layer_ops ops;
    /* Incremental inference: declare state buffers for `batch` sequences of at most max_len tokens
     * (a KV cache grows with max_len; a lightning state does not). */
    int (*state)(void *self, int batch, int64_t max_len, m1c_buf_spec *specs, int max);
    /* Process T new tokens per sequence, after `pos` already in the state, and update the state:
     * T = prompt length is prefill, T = 1 is a decoding step. out: (B, T, H), written. */
    int (*step)(void *self, const m1c_layer_bufs *b, m1c_tensor *state, float *out, const float *in, int B,
                int T, int64_t pos);
    /* FLOPs of one forward per token at context length ctx (for `m1c plan`). */
    double (*flops)(void *self, int64_t ctx);
    void *reserved[8];
} m1c_attention_vtable;

/* ---- mixture of experts / feed-forward ----------------------------------------------------- */

typedef struct m1c_moe_stats {
    double aux_loss;        /* the auxiliary loss added to the objective (already times its coefficient) */
    int64_t dropped;        /* assignments dropped for capacity */
    int64_t assignments;    /* routed assignments (tokens x k) */
    float *expert_load;     /* [n_experts], fraction of assignments per expert, in host memory, valid
                             * until the next forward; may be NULL */
    int32_t n_experts;
    int32_t reserved0;
    void *reserved[4];
} m1c_moe_stats;

typedef struct m1c_moe_vtable {
    uint32_t size;
    uint32_t reserved0;
    m1c_layer_ops ops;
    /* After forward: the auxiliary loss and routing statistics of that batch. */
    int (*stats)(void *self, const m1c_layer_bufs *b, m1c_moe_stats *out);
    /* Parameters used per token (active) vs stored (for `m1c plan`), and forward FLOPs per token. */
    int (*count)(void *self, int64_t *total_params, int64_t *active_params, double *flops_per_token);
    void *reserved[8];
} m1c_moe_vtable;

/* ---- optimizers ---------------------------------------------------------------------------- */

typedef struct m1c_optim_step {
    int64_t step; /* 1-based */
    float lr;     /* after the core's schedule */
    int32_t n;    /* tensors */
    int32_t device;
    m1c_tensor *params;     /* [n] */
    const m1c_tensor *grads; /* [n], already clipped */
    m1c_tensor *state;       /* [n * n_state]: state[i * n_state + k] is state k (in the order of the
                              * plugin's state() names) of parameter i */
    const int32_t *no_decay; /* [n] */
    m1c_tensor *params_lp;   /* [n] bf16 copies to refresh from the updated params, or NULL */
    void *stream;            /* CUDA: the cudaStream_t to launch on; NULL on the CPU */
    uint32_t flags;          /* since ABI 1.1: M1C_OPTIM_* */
    uint32_t reserved0;
    void *reserved[1];
} m1c_optim_step;

/* m1c_optim_step.flags: the step runs on a low-priority stream beside other GPU work (the rest of the
 * backward, for the tensors whose gradients are complete): launch many short blocks that the GPU can
 * fit in between, not a grid that holds every multiprocessor until the step ends. */
#define M1C_OPTIM_BACKGROUND 1u

typedef struct m1c_optimizer_vtable {
    uint32_t size;
    uint32_t reserved0;
    int (*create)(const m1c_host *h, const m1c_settings *s, void **self);
    void (*destroy)(void *self);
    /* State tensors per parameter (same shape as the parameter, f32): names into names[0..max). */
    int (*state)(void *self, const char **names, int max);
    int (*step)(void *self, const m1c_optim_step *a);
    void *reserved[8];
} m1c_optimizer_vtable;

/* ---- objectives ---------------------------------------------------------------------------- */

/* Everything an objective sees of a batch of N = B*T token positions. The core computes logp, the
 * log-probability of each target token under the current model, and back-propagates dlogp. */
typedef struct m1c_objective_batch {
    int32_t B, T;
    int32_t group; /* RL: responses per prompt (G); sequences b and b' share a prompt iff b/G == b'/G */
    int32_t reserved0;
    const float *logp;     /* [B*T] */
    const float *old_logp; /* [B*T] behaviour policy (RL), or NULL */
    const float *ref_logp; /* [B*T] reference policy for a KL term, or NULL */
    const float *mask;     /* [B*T] 1 where the token counts (response tokens), 0 elsewhere */
    const float *reward;   /* [B] per sequence (RL), or NULL */
    void *reserved[4];
} m1c_objective_batch;

typedef struct m1c_objective_vtable {
    uint32_t size;
    uint32_t reserved0;
    int (*create)(const m1c_host *h, const m1c_settings *s, void **self);
    void (*destroy)(void *self);
    /* loss (minimised) and dlogp[B*T] = d loss / d logp (written). Named scalar metrics go into
     * names/values[0..max_metrics); return their count. */
    int (*loss)(void *self, const m1c_objective_batch *b, double *loss, float *dlogp, const char **names,
                double *values, int max_metrics);
    void *reserved[8];
} m1c_objective_vtable;

/* ---- data ---------------------------------------------------------------------------------- */

typedef enum m1c_split { M1C_SPLIT_TRAIN = 0, M1C_SPLIT_VALID = 1 } m1c_split;

typedef struct m1c_data_info {
    uint32_t size;
    int32_t rank, world; /* data-parallel shard of this process */
    uint64_t seed;
    const char *base_dir; /* directory of the config file: relative paths resolve against it */
    int64_t reserved[6];
} m1c_data_info;

typedef struct m1c_data_vtable {
    uint32_t size;
    uint32_t reserved0;
    int (*create)(const m1c_host *h, const m1c_settings *s, const m1c_data_info *info, void **self);
    void (*destroy)(void *self);
    /* Vocabulary size of the tokenizer (specials included) and its special ids (-1 if none). */
    int (*vocab)(void *self, int32_t *vocab_size, int32_t *bos, int32_t *eos, int32_t *pad);
    /* tokens: B*(T+1) ids, each row T inputs followed by the target of the last; mask: B*T, 1 where
     * the target at that position counts for the loss. Deterministic given seed and position. */
    int (*next_batch)(void *self, int split, int B, int T, int32_t *tokens, float *mask);
    /* The reading position, for checkpoints: save writes at most max bytes and returns the count
     * (called with buf NULL for the size); load restores it. */
    int64_t (*save_position)(void *self, void *buf, int64_t max);
    int (*load_position)(void *self, const void *buf, int64_t n);
    /* Tokenizer. encode returns the count written (or needed, if > max); decode returns the bytes
     * written, or M1C_ERR for an id outside the vocabulary. */
    int64_t (*encode)(void *self, const char *text, int64_t len, int32_t *ids, int64_t max);
    int64_t (*decode)(void *self, const int32_t *ids, int64_t n, char *text, int64_t max);
    /* (optional) RL prompts and their verifier, NULL where the source has none: prompt `index` of a
     * split (0, 1, 2, ... within that split) and the reward of a response to it. */
    int (*prompt)(void *self, int split, int64_t index, int32_t *ids, int64_t max, int64_t *len);
    int (*reward)(void *self, int split, int64_t index, const int32_t *response, int64_t len, float *reward);
    void *reserved[8];
} m1c_data_vtable;

/* ---- conveniences for plugin authors (inline: nothing to link) ------------------------------ */

/* A buffer spec (unused dimensions 0), initialised N(0, 0.02^2) when it is a parameter. */
static inline m1c_buf_spec m1c_make_spec(const char *name, int dtype, int ndim, int64_t d0, int64_t d1, int64_t d2,
                                    int64_t d3) {
    m1c_buf_spec s;
    s.name = name;
    s.dtype = dtype;
    s.ndim = ndim;
    s.shape[0] = d0, s.shape[1] = d1, s.shape[2] = d2, s.shape[3] = d3;
    s.init = M1C_INIT_NORMAL;
    s.no_decay = 0;
    s.std = 0.02f;
    s.backward_only = 0;
    s.grad_written = 0;
    s.in_proj = 0;
    return s;
}

/* Elements of a tensor: the product of its ndim dimensions (1 for ndim 0). */
static inline int64_t m1c_tensor_numel(const m1c_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* The beta of the one product that makes a parameter gradient (dW = beta dW + ...): 0 where the core
 * handed it over unset (M1C_TENSOR_UNSET, for a parameter declared grad_written), else 1. */
static inline float m1c_grad_beta(const m1c_tensor *g) { return (g->flags & M1C_TENSOR_UNSET) ? 0.0f : 1.0f; }

/* A forward handing its output over as its own rows (m1c_out_rows' identity, ABI 1.5): rows (B T, H) of
 * dtype are out itself. */
static inline void m1c_out_rows_own(m1c_out_rows *o, const void *rows, int32_t dtype) {
    o->rows = rows, o->idx = NULL, o->weight = NULL, o->dtype = dtype, o->k = 1;
}

/* For a backward in host memory that adds to its gradients: zero those of grads[0..n) handed over unset
 * (grads NULL: none). */
static inline void m1c_grads_zero_unset_cpu(m1c_tensor *grads, int n) {
    for (int i = 0; grads && i < n; i++)
        if (grads[i].flags & M1C_TENSOR_UNSET) {
            float *g = (float *)grads[i].data;
            for (int64_t j = 0, e = m1c_tensor_numel(&grads[i]); j < e; j++) g[j] = 0.0f;
        }
}

/* The declaration protocol of params/acts/scratch/state: copy n specs into out[0..max), or count them
 * when out is NULL; too little room is an error naming `who`. */
static inline int m1c_put_specs(const m1c_host *h, const char *who, const m1c_buf_spec *specs, int n,
                                m1c_buf_spec *out, int max) {
    if (!out) return n;
    if (max < n) return h->error(h, "%s: room for %d buffer specs, %d needed", who, max, n);
    for (int i = 0; i < n; i++) out[i] = specs[i];
    return n;
}

/* ---- the descriptor and the entry point ---------------------------------------------------- */

typedef struct m1c_plugin_desc {
    uint32_t abi_major, abi_minor; /* first, forever: the loader reads these before anything else */
    uint32_t size;                 /* sizeof(m1c_plugin_desc) the plugin was built with */
    int32_t kind;                  /* m1c_kind */
    const char *name;              /* unique among loaded plugins, e.g. "lightning" */
    const char *version;           /* the plugin's own version, e.g. "0.1.0" */
    const char *description;       /* one line */
    const char *license;
    const void *vtable;            /* m1c_<kind>_vtable matching kind */
    uint32_t vtable_size;          /* sizeof that vtable the plugin was built with */
    uint32_t reserved0;
    void *reserved[8];
} m1c_plugin_desc;

/* The entry point every plugin exports. Return the plugin's descriptor (static storage), or NULL
 * after h->error(...) to refuse loading. */
#define M1C_PLUGIN_ENTRY_SYMBOL "m1c_plugin_entry"
typedef const m1c_plugin_desc *(*m1c_plugin_entry_fn)(const m1c_host *h);

/* Defines the entry point returning a descriptor for KIND (ATTENTION, MOE, OPTIMIZER, OBJECTIVE,
 * DATA) with vtable VT (an object of type m1c_<kind>_vtable):
 *     M1C_PLUGIN(ATTENTION, attention, my_vtable, "myattn", "0.1.0", "what it is", "MIT")   */
#define M1C_PLUGIN(KIND, kind, VT, NAME, VERSION, DESC, LICENSE)                                           \
    M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h);                                \
    M1C_EXPORT const m1c_plugin_desc *m1c_plugin_entry(const m1c_host *h) {                               \
        static const m1c_plugin_desc desc = {M1C_ABI_MAJOR, M1C_ABI_MINOR, sizeof(m1c_plugin_desc),        \
                                             M1C_KIND_##KIND,  NAME,          VERSION,                   \
                                             DESC,             LICENSE,       &(VT),                     \
                                             sizeof(m1c_##kind##_vtable), 0, {0}};                        \
        (void)h;                                                                                          \
        return &desc;                                                                                     \
    }

#ifdef __cplusplus
}
#endif
#endif /* M1C_PLUGIN_H */
