/* `m1c plan`: parameter counts per component, FLOPs per token against context length (the hybrid and
 * the same model with softmax attention everywhere) and memory per GPU for a parallel layout, computed
 * from plugin declarations without allocating the model. docs/plan.md explains every number. */
#ifndef M1C_PLAN_H
#define M1C_PLAN_H

#include "session.h"

typedef enum m1c_precision {
    M1C_PREC_FP32 = 0,       /* 4-byte parameters, gradients, optimizer state and activations */
    M1C_PREC_BF16_MIXED = 1, /* bf16 parameters, gradients and activations, fp32 master weights and
                              * optimizer state (how M1 trains) */
} m1c_precision;

/* What to count. Zero-initialised options mean: context and micro-batch from the first stage, the
 * default context list, one GPU, fp32. */
typedef struct m1c_plan_opts {
    int64_t context;          /* position the main FLOPs figure is at; <= 0: the first stage's seq_len */
    const int64_t *contexts;  /* FLOPs-against-context list; NULL: m1c_plan_default_contexts */
    int n_contexts;
    const char *baseline_type; /* layer type put at every layer for the comparison; NULL: the type whose
                                * attention FLOPs grow most over the context list */
    int tp, pp, ep, dp;       /* tensor, pipeline, expert, data parallel; <= 0: 1 (dp: ep) */
    int zero;                 /* 1: ZeRO-1, optimizer state and master weights sharded over dp */
    int precision;            /* m1c_precision */
    int param_bytes, grad_bytes, act_bytes; /* <= 0: from the precision */
    int micro_batch, seq_len; /* per GPU; <= 0: the first stage's batch and seq_len */
} m1c_plan_opts;

extern const int64_t m1c_plan_default_contexts[];
extern const int m1c_plan_n_default_contexts;
const char *m1c_precision_name(int precision);
int m1c_precision_parse(const char *name, int *precision); /* M1C_ERR if unknown */

typedef struct m1c_plan_type {
    const char *name;   /* layer type */
    const char *attention_plugin;
    int layers;         /* how many layers of the stack have this type */
    int64_t attn_params;            /* per layer */
    int64_t norm_params;            /* per layer: input + post-attention norms */
    double attn_flops;              /* per layer, forward, per token at the plan's context */
} m1c_plan_type;

/* Forward FLOPs per token at one context length. */
typedef struct m1c_plan_ctx {
    int64_t ctx;
    double hybrid, all_baseline;     /* the token that attends to ctx keys (position ctx - 1) */
    double hybrid_avg, baseline_avg; /* mean over the positions of a ctx-token sequence: prefill per token */
} m1c_plan_ctx;

/* Memory of one GPU of pipeline stage `stage` (every GPU of a stage holds the same amount). */
typedef struct m1c_plan_stage {
    int stage, first_layer, n_layers;
    int in_flight;      /* micro-batches whose activations the 1F1B schedule keeps here: pp - stage */
    /* Parameters (elements) held: attention (split over tp), expert tensors (over ep x tp), replicated
     * (layer norms, router and other non-expert FFN tensors, the final norm), embedding / LM head rows
     * (vocabulary split over tp; first / last stage). */
    double w_attention, w_experts, w_replicated, w_embedding, w_head;
    double params;      /* their sum */
    double mem_params, mem_grads, mem_master, mem_optimizer, mem_activations, mem_total; /* bytes */
} m1c_plan_stage;

typedef struct m1c_plan {
    int64_t context;                /* the position FLOPs are counted at */
    int n_types;
    m1c_plan_type *types;
    const char *ffn_plugin;
    int64_t ffn_params, ffn_active; /* per layer */
    int64_t ffn_expert_params;      /* per layer: the FFN's expert tensors (3-D, experts first) */
    int n_experts;                  /* their leading dimension; 0: the FFN declares none */
    double ffn_flops;               /* per layer, forward, per token */
    int64_t embed_params, head_params, final_norm_params;
    int64_t total_params, active_params;       /* everything */
    int64_t total_nonembed, active_nonembed;   /* without embedding and LM head (as M1 counts 45.9B) */
    double flops_forward;           /* per token at `context`, all layers + head */
    double flops_train;             /* 3x forward (backward = 2x forward) */
    /* FLOPs against context: the model as configured, and with every layer's mixer replaced by the
     * baseline type's (the all-softmax model). */
    const char *baseline_type, *baseline_plugin;
    int n_ctx;
    m1c_plan_ctx *ctx;
    /* Memory per GPU for the layout below (defaults: one CPU-like fp32 device, batch x seq_len of the
     * first stage, which is what the CPU build allocates). The mem_* fields are the stage with the
     * largest total. */
    int tp, pp, ep, dp, zero, gpus, precision;
    int param_bytes, grad_bytes, master_bytes, state_bytes, act_bytes;
    int batch, seq_len, optimizer_states;
    int worst_stage;
    m1c_plan_stage *stages;         /* [pp] */
    double mem_params, mem_grads, mem_master, mem_optimizer, mem_activations, mem_total;
} m1c_plan;

/* context <= 0: the first stage's seq_len; everything else at its default. */
int m1c_plan_compute(m1c_session *s, int64_t context, m1c_plan *p, m1c_err *e);
/* o may be NULL (all defaults). */
int m1c_plan_compute_opts(m1c_session *s, const m1c_plan_opts *o, m1c_plan *p, m1c_err *e);
void m1c_plan_free(m1c_plan *p);

#endif
