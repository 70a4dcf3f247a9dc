/* Hugging Face interoperability: MiniMax checkpoints in transformers' layout (config.json with
 * model.safetensors or shards) read into m1c models, and m1c models written back in that layout.
 * docs/hf.md lists the mapping of every setting and what is refused.
 *
 * Two config dialects are read: transformers' own ("model_type": "minimax": layer_types, *_factor,
 * rope_parameters) and MiniMax's released one ("minimax_m1" / "minimax_text_01": attn_type_list,
 * layernorm_*_alpha/beta, rotary_dim). Two weight layouts are read, whatever the dialect: transformers
 * 5.x's fused experts (mlp.gate.weight, mlp.experts.gate_up_proj [E, 2F, H] gate rows first,
 * mlp.experts.down_proj [E, H, F]) and MiniMax's per-expert tensors (block_sparse_moe.gate.weight,
 * block_sparse_moe.experts.N.w1/w3 [F, H] gate/up, w2 [H, F] down). Exports write transformers 5.x's
 * dialect. Every refusal is one line naming config.json (or the weights file) and the key. */
#ifndef M1C_HF_H
#define M1C_HF_H

#include "session.h"

typedef enum m1c_hf_layout {
    M1C_HF_FUSED = 0,      /* transformers 5.x: mlp.experts.gate_up_proj / down_proj */
    M1C_HF_PER_EXPERT = 1, /* MiniMax's own and transformers 4.x: block_sparse_moe.experts.N.w1/w2/w3 */
} m1c_hf_layout;

typedef struct m1c_hf_export_opts {
    int layout; /* m1c_hf_layout */
    int dtype;  /* M1C_F32 or M1C_BF16 (rounded to nearest even) */
} m1c_hf_export_opts;

/* HF_DIR/config.json as m1c configuration text: the model, and a run with no stages (an
 * inference-only configuration: commands that train refuse it). malloc'd; NULL after m1c_fail. */
char *m1c_hf_config_text(const char *hf_dir, m1c_err *e);

/* Load HF_DIR's weights into m, a model built from HF_DIR's translated configuration. Every parameter
 * of m must be found with its shape; every tensor of the files must be used (derived buffers such as
 * self_attn.slope_rate aside), so a checkpoint with parts m1c would ignore is refused. */
int m1c_hf_load_weights(const char *hf_dir, m1c_model *m, m1c_err *e);

/* A session whose model is the HF checkpoint (configuration translated, overrides applied, weights
 * loaded). Close it with m1c_session_close, also after a failure. */
int m1c_hf_open(m1c_session *s, const char *hf_dir, const char *const *overrides, int n_overrides, m1c_err *e);

/* import-hf: an m1c checkpoint in out_dir (model.safetensors, m1c.cfg, trainer.json) plus
 * hf_config.json, a copy of the original config.json that export keeps keys from. */
int m1c_hf_import(const char *hf_dir, const char *out_dir, m1c_err *e);

/* export-hf: config.json and model.safetensors (tensors in name order, as the safetensors library
 * writes them) of a session's model into out_dir. orig_config (may be NULL or absent) is a
 * transformers config.json whose keys m1c does not model are kept, and whose values are kept where
 * they mean what m1c's do (so that import -> export gives back the same file). Refuses models that
 * transformers cannot compute exactly, naming the setting. */
int m1c_hf_export_session(m1c_session *s, const char *orig_config, const char *out_dir,
                          const m1c_hf_export_opts *o, m1c_err *e);
/* The same from a checkpoint directory (its hf_config.json, if any, as orig_config). */
int m1c_hf_export(const char *ckpt_dir, const char *out_dir, const char *const *overrides, int n_overrides,
                  const m1c_hf_export_opts *o, m1c_err *e);

#endif
