/* Checkpoints: a directory holding
 *   model.safetensors      parameters, Hugging Face MiniMax names (model.layers.N.self_attn....)
 *   optimizer.safetensors  optimizer state, "<parameter>.<state>" (absent for inference-only saves)
 *   trainer.json           the sidecar: format version, stage, step, seed, data position, metrics
 *   m1c.cfg                the resolved configuration the model was built from
 * Written into "<dir>.tmp.<pid>" and renamed into place, so a crash never leaves a half checkpoint. */
#ifndef M1C_CHECKPOINT_H
#define M1C_CHECKPOINT_H

#include "config.h"
#include "model.h"

typedef struct m1c_ckpt_state {
    int stage;          /* index into run.stages */
    const char *stage_name;
    int64_t step;       /* optimizer steps done in that stage */
    uint64_t seed;
    const void *data_position; /* the data plugin's saved position */
    int64_t data_position_len;
    double last_loss;
} m1c_ckpt_state;

/* Save params (and optimizer state, if opt != NULL) with the sidecar and config into dir. */
int m1c_ckpt_save(const char *dir, m1c_model *m, const m1c_arena *opt, const m1c_ckpt_state *st, m1c_config *cfg,
                  m1c_err *e);
/* Load parameters (every one must be present with its shape) from dir/model.safetensors. */
int m1c_ckpt_load_params(const char *dir, m1c_model *m, m1c_err *e);
/* Load optimizer state from dir/optimizer.safetensors into opt (names and shapes must match). */
int m1c_ckpt_load_optimizer(const char *dir, m1c_arena *opt, m1c_err *e);

/* The sidecar, read back: stage, step, seed, data position (malloc'd; free with free()). */
typedef struct m1c_ckpt_info {
    int stage;
    char *stage_name;
    int64_t step;
    uint64_t seed;
    void *data_position;
    int64_t data_position_len;
} m1c_ckpt_info;
int m1c_ckpt_read_info(const char *dir, m1c_ckpt_info *info, m1c_err *e);
void m1c_ckpt_info_free(m1c_ckpt_info *info);
/* Remove a file or a directory with everything in it (rm -r); 0 on success. */
int m1c_remove_tree(const char *path);
/* dir/m1c.cfg as a string (malloc'd). */
char *m1c_ckpt_config_text(const char *dir, m1c_err *e);

#endif
