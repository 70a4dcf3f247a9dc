/* Model assembly: embedding, the layer stack of attention and feed-forward plugins with DeepNorm
 * post-norm residuals, final RMSNorm and the FP32 LM head; forward, backward and incremental
 * decoding over arenas the core owns.
 *
 * Layer l (MODEL.md):  h1 = RMSNorm_in(x);  x1 = alpha_attn h1 + beta_attn attn(h1)
 *                      h2 = RMSNorm_post(x1); x2 = alpha_ffn h2 + beta_ffn ffn(h2)
 */
#ifndef M1C_MODEL_H
#define M1C_MODEL_H

#include "arena.h"
#include "loader.h"
#include "sample.h"

/* What to build: sizes and, per layer, the plugins with their settings groups. */
typedef struct m1c_layer_def {
    const char *type;              /* layer type name from the config, e.g. "lightning" */
    m1c_plugin *attn, *ffn;        /* loaded plugins of kind attention and moe */
    const m1c_settings *attn_settings, *ffn_settings;
    float alpha_attn, beta_attn, alpha_ffn, beta_ffn;
} m1c_layer_def;

typedef struct m1c_model_def {
    int vocab, hidden, layers;
    float norm_eps, init_std;
    int tie_embeddings;
    int device;
    int head_precision;   /* m1c_head_precision (spec.h): the LM head GEMM's arithmetic on a GPU */
    int compute_dtype;    /* M1C_F32, or M1C_BF16 (mixed precision: bf16 copies of the parameters) */
    m1c_layer_def *layer; /* [layers] */
} m1c_model_def;

/* One plugin instance in the model and where its parameters sit in the parameter arena. */
typedef struct m1c_inst {
    m1c_plugin *plugin;
    const m1c_layer_ops *ops;
    void *self;
    int p0, np; /* params.t[p0 .. p0+np) */
    int proj;   /* the parameter (index into params) the instance declared in_proj (ABI 1.4), or -1 */
} m1c_inst;

typedef struct m1c_layer {
    m1c_inst attn, ffn;
    float alpha_attn, beta_attn, alpha_ffn, beta_ffn;
    int norm_in, norm_post; /* parameter indices */
} m1c_layer;

typedef struct m1c_model {
    int V, H, L;
    float eps;
    int tied, device, head_precision, compute_dtype;
    int lp_inputs; /* the runs made for training hand the layers bf16 copies of in and dout (CUDA, BF16) */
    m1c_layer *layer;  /* [L] */
    int embed, norm, head; /* parameter indices (head == embed when tied) */
    m1c_arena params;  /* HF names: model.embed_tokens.weight, model.layers.N...., lm_head.weight */
    m1c_arena grads;   /* same layout; allocated by m1c_model_alloc_grads */
    m1c_arena params_lp; /* compute_dtype BF16: bf16 copies of params, same layout; else empty */
    int32_t *no_decay; /* [params.n] */
    int32_t *grad_written; /* [params.n] the plugin writes the gradient whole when handed it unset
                            * (m1c_buf_spec.grad_written): m1c_model_zero_grads skips it */
    int32_t *init;     /* [params.n] m1c_init of each parameter */
    float *init_std;   /* [params.n] */
} m1c_model;

/* Buffers of one plugin instance for one (B, T) shape. */
typedef struct m1c_inst_bufs {
    m1c_layer_bufs bufs;
    m1c_tensor *acts, *scratch; /* owned arrays of views */
    int na, ns;
    float *proj; /* (N, P): the input's product with the instance's in_proj parameter, which the norm that
                  * writes the input makes (== bufs.in_proj); NULL where no such norm does */
    m1c_out_rows rows; /* where the forward may hand its output over as rows (bufs.out_rows, on the GPU) */
} m1c_inst_bufs;

/* Everything a forward/backward of shape (B, T) needs. */
typedef struct m1c_run {
    int B, T, training;
    int for_training;    /* made with training = 1: every activation allocated (m1c_run_set_training) */
    uint64_t noise_seed; /* set per step by the trainer */
    m1c_arena acts;      /* core and plugin activations */
    void *scratch;       /* one buffer shared by all instances' scratch */
    m1c_inst_bufs *attn, *ffn; /* [L] */
    float **x;           /* [L+1] residual stream at each layer input (N, H); x[L] feeds the final norm */
    float **h1, **rstd1, **x1, **h2, **rstd2; /* [L] */
    float *hf, *rstdf;   /* final norm out (N, H), (N) */
    float *logits, *lse, *logp, *dlogp; /* (N, V), (N), (N), (N) */
    void *head_q;        /* the head's q and row scales for the backward (m1c_head_forward; core/ops.h), in
                          * training runs on a GPU at head precision 2; else NULL */
    int head_q_valid;    /* the last forward wrote head_q (a training forward) */
    float *tmp, *dx, *dh; /* (N, H) work buffers */
    int32_t *ids, *targets; /* (N), on the model's device */
    int32_t *ids_host, *targets_host; /* staging on the host (== ids, targets on the CPU) */
    float *logp_host, *dlogp_host;    /* (N) host views of logp (filled by forward) and dlogp (read by
                                       * backward): what objectives see; == logp, dlogp on the CPU */
    void *host_block;                 /* the four staging arrays above in one allocation (CUDA) */
    uint16_t **h1_lp, **h2_lp;        /* (L) bf16 copies of h1, h2 (model lp_inputs, runs made for training) */
    uint16_t *dout_lp;                /* bf16 copy of an attention sublayer's d output in backward */
    int host_pinned;                  /* host_block is page-locked: the uploads do not wait */
    double aux_loss;     /* sum over layers of the last forward */
    /* Called by m1c_model_backward as soon as the gradients of params.t[first .. end) are complete
     * (queued on the device; each parameter once per backward, the last layers first), or NULL: for an
     * optimizer step overlapped with the rest of the backward (m1c_overlap, train.h). A failure (M1C_ERR)
     * fails the backward with the message left in grads_err. */
    int (*grads_ready)(void *ctx, int first, int end);
    void *grads_ctx;
    char grads_err[1024];
    /* Profiling (profile = 1): seconds per component ("core", "head", and each plugin's name) in forward
     * and backward, accumulated over calls; every component is synchronised, so it slows the run. */
    int profile, prof_n;
    const char *prof_name[12];
    double prof_fwd[12], prof_bwd[12], prof_t;
} m1c_run;

int m1c_model_build(m1c_model *m, const m1c_model_def *def, m1c_err *e);
int m1c_model_alloc_grads(m1c_model *m, m1c_err *e);
/* Draw every parameter from its declared initialisation; tensor i uses RNG stream i, so the result
 * depends on the seed only. */
void m1c_model_init_params(m1c_model *m, uint64_t seed);
void m1c_model_free(m1c_model *m);
int64_t m1c_model_param_count(const m1c_model *m);

int m1c_run_init(m1c_run *r, m1c_model *m, int B, int T, int training, m1c_err *e);
/* Switch a run between training and evaluation (the plugins see bufs.training). A run made with training
 * = 0 lacks the activations plugins declare backward_only, so it cannot switch to training: M1C_ERR. */
int m1c_run_set_training(m1c_run *r, m1c_model *m, int training);
void m1c_run_free(m1c_run *r, m1c_model *m);

/* tokens (host): B*(T+1) ids per row as data plugins give them (T inputs, then the target of the
 * last; a negative target is not scored). Computes logp (N) of each target, also in run->logp_host. */
int m1c_model_forward(m1c_model *m, m1c_run *r, const int32_t *tokens, m1c_err *e);
/* Back-propagate run->dlogp_host (N) into m->grads (accumulating). */
int m1c_model_backward(m1c_model *m, m1c_run *r, m1c_err *e);
/* Gradients for the next backward, queued on `stream` (the device's core or background stream): zero
 * where the plugin needs zeros, else marked M1C_TENSOR_UNSET (m1c_buf_spec.grad_written) for the plugin to
 * write whole; the next m1c_model_backward clears the marks. m1c_arena_zero(&m->grads) zeroes them all. */
void m1c_model_zero_grads(m1c_model *m, void *stream);
/* Per-layer MoE statistics of the last forward (NULL-safe for dense FFNs). */
int m1c_model_moe_stats(m1c_model *m, m1c_run *r, int layer, m1c_moe_stats *out);
/* Refresh the bf16 parameter copies from the f32 parameters (after loading or initialising). */
void m1c_model_sync_lp(m1c_model *m);
/* The first parameter (or gradient, grads = 1) tensor holding a NaN or Inf, or NULL. */
const char *m1c_model_first_nonfinite(m1c_model *m, int grads);

/* Incremental inference: per-layer attention state for `batch` sequences up to max_len. */
typedef struct m1c_decoder {
    int batch, chunk;
    int64_t max_len, pos;
    m1c_arena state;
    m1c_tensor **layer_state; /* [L] views into state */
    m1c_run run;              /* shape (batch, chunk), inference */
    void *sample_work;        /* m1c_decoder_feed_sample's scratch on the model's device (made at first use) */
} m1c_decoder;

int m1c_decoder_init(m1c_decoder *d, m1c_model *m, int batch, int64_t max_len, int chunk, m1c_err *e);
void m1c_decoder_free(m1c_decoder *d, m1c_model *m);
void m1c_decoder_reset(m1c_decoder *d);
/* Feed T <= chunk new tokens per sequence (ids: batch x T); logits of the last position of each
 * sequence go to out (batch, V, host). out NULL: the forward only, no LM head (a prompt's earlier
 * chunks, whose logits nobody reads). */
int m1c_decoder_feed(m1c_model *m, m1c_decoder *d, const int32_t *ids, int T, float *out, m1c_err *e);
/* Feed as m1c_decoder_feed, then sample each sequence's next token from the logits of its last
 * position, on the model's device (m1c_sample_rows): on CUDA the logits stay there and only the batch
 * ids come back. next (batch, host) may be the same array as ids; prob (batch, host, may be NULL) gets
 * each token's probability under the sampling distribution. */
int m1c_decoder_feed_sample(m1c_model *m, m1c_decoder *d, const int32_t *ids, int T, const m1c_sampler *s,
                            m1c_rng *rng, int32_t *next, float *prob, m1c_err *e);

/* One token from each of B rows of logits (B, V) living on `dev`, as m1c_sample on row 0, 1, ... in
 * turn with the same rng: one uniform per row in row order (none when greedy), so a seed gives the
 * same tokens on every device (on CUDA up to float rounding near a boundary of the cumulative
 * distribution: core/cuda/sample.cu). work: scratch on dev of m1c_sample_rows_work(dev, B, V) bytes.
 * next and prob (B; prob may be NULL) are on the host. */
size_t m1c_sample_rows_work(int dev, int B, int V);
int m1c_sample_rows(int dev, const m1c_sampler *s, const float *logits, int B, int V, m1c_rng *rng, void *work,
                    int32_t *next, float *prob, m1c_err *e);

#endif
