/* `m1c plan`: parameter counts per component, FLOPs per token at a context length and a memory
 * estimate, computed from plugin declarations without allocating the model. */
#ifndef M1C_PLAN_H
#define M1C_PLAN_H

#include "session.h"

typedef struct m1c_plan_type {
    const char *name;   /* layer type */
    const char *attention_plugin;
    int layers;         /* how many layers of the stack have this type */
    int64_t attn_params;            /* per layer */
    int64_t norm_params;            /* per layer: input + post-attention norms */
    double attn_flops;              /* per layer, forward, per token at the plan's context */
} m1c_plan_type;

typedef struct m1c_plan {
    int64_t context;                /* the position FLOPs are counted at */
    int n_types;
    m1c_plan_type *types;
    const char *ffn_plugin;
    int64_t ffn_params, ffn_active; /* per layer */
    double ffn_flops;               /* per layer, forward, per token */
    int64_t embed_params, head_params, final_norm_params;
    int64_t total_params, active_params;       /* everything */
    int64_t total_nonembed, active_nonembed;   /* without embedding and LM head (as M1 counts 45.9B) */
    double flops_forward;           /* per token at `context`, all layers + head */
    double flops_train;             /* 3x forward (backward = 2x forward) */
    /* Training memory (bytes) for the first stage's batch x seq_len, f32 everywhere on the CPU. */
    int batch, seq_len, optimizer_states;
    double mem_params, mem_grads, mem_optimizer, mem_activations, mem_total;
} m1c_plan;

/* context <= 0: the first stage's seq_len. */
int m1c_plan_compute(m1c_session *s, int64_t context, m1c_plan *p, m1c_err *e);
void m1c_plan_free(m1c_plan *p);

#endif
