/* A session: a loaded configuration, its validated spec, the plugin registry and (optionally) the
 * model built from it. Every command that reads a config starts here. */
#ifndef M1C_SESSION_H
#define M1C_SESSION_H

#include "config.h"
#include "loader.h"
#include "model.h"
#include "spec.h"

typedef struct m1c_session {
    m1c_config *cfg;
    m1c_spec spec;
    int have_spec;
    m1c_registry reg;
    m1c_model model;
    int have_model;
    m1c_layer_def *layer_defs; /* [L] kept for the model's lifetime */
} m1c_session;

/* Load CONFIG with overrides, read and validate the spec and every plugin slot. */
int m1c_session_open(m1c_session *s, const char *config_path, const char *const *overrides, int n_overrides,
                     m1c_err *e);
/* The same from a config given as text (checkpoints carry theirs); name stands for the file. */
int m1c_session_open_text(m1c_session *s, const char *text, const char *name, const char *dir,
                          const char *const *overrides, int n_overrides, m1c_err *e);
/* A checkpoint's configuration (DIR/m1c.cfg) and its model with the saved parameters. */
int m1c_session_open_checkpoint(m1c_session *s, const char *dir, const char *const *overrides, int n_overrides,
                                m1c_err *e);
/* Build the model (parameters allocated and initialised from `seed`). */
int m1c_session_build_model(m1c_session *s, uint64_t seed, m1c_err *e);
void m1c_session_close(m1c_session *s);

#endif
