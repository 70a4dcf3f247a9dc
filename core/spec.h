/* The schema of the core's own keys: the model (`model = {...}`) and the run (`run = {...}`, its
 * stages), read through the strict getters of config.h. docs/config.md describes the format.
 *
 * Groups with a `plugin` key are plugin slots: the core reads only `plugin`; the other keys belong to
 * the plugin, which validates them when an instance is created (m1c_spec_check_plugins does that for
 * every slot, so plugin defaults fill in and plugin typos are refused before anything runs).
 */
#ifndef M1C_SPEC_H
#define M1C_SPEC_H

#include "config.h"
#include "loader.h"

/* A plugin slot. */
typedef struct m1c_slot {
    const char *plugin;     /* name ("lightning") or path ("./my.so"), as written */
    m1c_settings *settings; /* the slot's group: the plugin reads every key but `plugin` */
} m1c_slot;

typedef enum m1c_head_precision {
    M1C_HEAD_FP32 = 0, /* M1: the LM head in full FP32 */
    M1C_HEAD_TF32 = 1,
    M1C_HEAD_BF16 = 2,
    M1C_HEAD_TF32X3 = 3, /* fp32 from three TF32 tensor-core products (hi*hi + hi*lo + lo*hi): ~1e-6 */
} m1c_head_precision;

/* A layer type: one token mixer with its DeepNorm factors (model.types.<name>). */
typedef struct m1c_layer_type_spec {
    const char *name;       /* the key under model.types */
    m1c_slot attention;     /* the token mixer (kind attention) */
    double alpha, beta;     /* x = alpha * h + beta * f(h) for this sublayer */
    int n_used;             /* layers of the stack with this type (0: unused, a warning) */
    int first_layer;        /* first layer index with this type, -1 if unused */
    m1c_settings *settings; /* model.types.<name> */
} m1c_layer_type_spec;

typedef struct m1c_model_spec {
    int64_t vocab_size;     /* V; 0 in the file = from the first stage's data tokenizer, resolved by
                             * m1c_spec_check_plugins (until then 0) */
    int hidden;             /* H, model width */
    int n_layers;           /* L */
    double norm_eps;        /* RMSNorm epsilon of the layer and final norms */
    double init_std;        /* std of N(0, std^2) for the embedding and LM head */
    int tie_embeddings;     /* 1: lm_head shares the embedding matrix (V, H) */
    int head_precision;     /* m1c_head_precision of the LM head GEMM */
    int n_types;
    m1c_layer_type_spec *types; /* [n_types], in file order */
    int *layer_type;            /* [L] index into types of each layer */
    m1c_slot ffn;               /* every layer's feed-forward (kind moe) */
    double ffn_alpha, ffn_beta; /* DeepNorm factors of the MLP sublayer */
    m1c_settings *settings;     /* the `model` group */
} m1c_model_spec;

typedef enum m1c_stage_kind { M1C_STAGE_PRETRAIN = 0, M1C_STAGE_SFT = 1, M1C_STAGE_RL = 2 } m1c_stage_kind;
typedef enum m1c_decay { M1C_DECAY_COSINE = 0, M1C_DECAY_CONSTANT = 1, M1C_DECAY_LINEAR = 2 } m1c_decay;

/* Learning-rate schedule: linear warmup 0 -> lr over `warmup` steps, then decay to min_lr at the
 * stage's last step. */
typedef struct m1c_schedule_spec {
    double lr, min_lr;
    int64_t warmup; /* steps */
    int decay;      /* m1c_decay */
    double clip;    /* global gradient-norm clip; 0 = off */
} m1c_schedule_spec;

typedef struct m1c_stage_spec {
    const char *name; /* unique among stages; checkpoints and metrics carry it */
    int kind;         /* m1c_stage_kind */
    /* Data: one plugin slot, or a mixture of several (`data = ( { plugin = ...; weight = w; ... }, ... )`):
     * each row of a batch is drawn from source i with probability weight_i / sum(weights). */
    int n_data;
    m1c_slot *data;      /* [n_data] */
    double *data_weight; /* [n_data] */
    m1c_slot objective, optimizer;
    m1c_schedule_spec schedule;
    int64_t steps;   /* optimizer steps in this stage */
    int batch;       /* B: sequences per step (RL: prompts x group) */
    int seq_len;     /* T: tokens per sequence (RL: the generation budget, max generated tokens) */
    int64_t eval_every;       /* steps between evaluations; 0 = never */
    int eval_batches;         /* validation batches per evaluation */
    int64_t checkpoint_every; /* steps between checkpoints; 0 = only at the end of the stage */
    int checkpoint_keep;      /* newest checkpoints kept; 0 = all */
    int64_t metrics_every;    /* steps between metrics lines */
    /* RL only (`rollout` group): responses drawn per prompt (G) and the sampling temperature. */
    int rollout_group;
    double rollout_temperature;
    uint64_t seed;          /* default: run.seed */
    int device;             /* m1c_device; default: run.device */
    m1c_settings *settings; /* run.stages.[i] */
} m1c_stage_spec;

typedef struct m1c_run_spec {
    uint64_t seed;
    int device;          /* m1c_device */
    int threads;         /* CPU threads; 0 = all cores */
    int precision;       /* 0 "fp32"; 1 "bf16": mixed precision on CUDA (bf16 GEMM operands and saved
                          * activations, f32 master weights, norms, softmax statistics and LM head) */
    double peak_tflops;  /* the device's peak for MFU; 0 = known cards' bf16 (or fp32) dense peak */
    const char *out_dir; /* relative to the working directory, as written */
    int n_stages;
    m1c_stage_spec *stages; /* [n_stages] */
    m1c_settings *settings; /* the `run` group */
} m1c_run_spec;

typedef struct m1c_spec {
    m1c_model_spec model;
    m1c_run_spec run;
    m1c_config *config; /* not owned */
} m1c_spec;

/* Read `model` and `run` from the root of c and refuse unknown keys everywhere but inside plugin
 * slots (and refuse unknown top-level keys too: commands with a section of their own read or touch
 * it before calling this). The spec points into c: free c after the spec. */
int m1c_spec_read(m1c_spec *spec, m1c_config *c, m1c_err *e);
/* The parts alone (`m1c plan` needs only the model). */
int m1c_model_spec_read(m1c_model_spec *m, m1c_settings *model, m1c_err *e);
int m1c_run_spec_read(m1c_run_spec *r, m1c_settings *run, m1c_err *e);
void m1c_model_spec_free(m1c_model_spec *m);
void m1c_run_spec_free(m1c_run_spec *r);
void m1c_spec_free(m1c_spec *spec);

/* Validate every plugin slot: load the plugin for the slot's kind (base_dir: the config's folder),
 * create one instance from the slot's group (layers: for the first layer of that type; data: rank 0
 * of 1 with the stage seed) and destroy it, so the plugin's defaults fill in and its unknown keys are
 * refused. Resolves model.vocab_size 0 from the first stage's data and checks that every stage's data
 * has the model's vocabulary size. */
int m1c_spec_check_plugins(m1c_spec *spec, m1c_registry *reg, m1c_err *e);

/* Names, for messages and `m1c plan`. */
const char *m1c_stage_kind_name(int kind);
const char *m1c_decay_name(int decay);
const char *m1c_head_precision_name(int p);

#endif
