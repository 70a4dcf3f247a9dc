/* Plugin loader and registry: finds, opens (RTLD_NOW | RTLD_LOCAL), checks and keeps plugins.
 *
 * A plugin is named in a config either by name ("lightning") or by path ("./my_attn.so", anything
 * with a '/' or ending in ".so"). Names are searched, first match wins, in:
 *   1. the config file's directory (base_dir): <dir>/<name>.so, <dir>/<kind>/<name>.so
 *   2. each directory of M1C_PLUGIN_PATH (colon-separated): same two forms
 *   3. the registry's built-in directories: next to the executable (<exe>/plugins, the build tree)
 *      and the install's plugin folder (<prefix>/lib/m1c/plugins), each <dir>/<kind>/<name>.so
 * Refusals (one line, naming the file): not found / not a shared object; no entry point; ABI major
 * differs or minor newer than the core's; wrong kind for the slot; a second plugin of the same name
 * from another file; the entry point returned NULL (its h->error message is quoted).
 */
#ifndef M1C_LOADER_H
#define M1C_LOADER_H

#include "util.h"

typedef struct m1c_plugin {
    char *path;                 /* the file it was opened from (as resolved) */
    void *handle;               /* dlopen handle */
    const m1c_plugin_desc *desc;
    const void *vtable;         /* desc->vtable */
    m1c_host host;              /* this plugin's own copy of the host table (core = this struct) */
    char error[1024];           /* last h->error() message of the plugin */
} m1c_plugin;

typedef struct m1c_registry {
    m1c_plugin **plugins;
    int n, cap;
    char **dirs; /* built-in directories searched last (step 3) */
    int n_dirs;
} m1c_registry;

/* Sets up the built-in directories (executable-relative and the install folder). */
void m1c_registry_init(m1c_registry *r);
/* Search `dir` too, after the built-ins already there (tests point at the build tree). */
void m1c_registry_add_dir(m1c_registry *r, const char *dir);
void m1c_registry_free(m1c_registry *r); /* closes every plugin */

/* Load (or return the already loaded) plugin `name_or_path` for a slot of `kind` (0: any kind).
 * base_dir: the config file's directory, or NULL. */
int m1c_registry_load(m1c_registry *r, const char *name_or_path, const char *base_dir, int kind,
                      m1c_plugin **out, m1c_err *e);
/* Open every plugin found in the search directories (for `m1c plugins`); files that fail to load
 * are reported through `bad` (may be NULL) and skipped. */
typedef void (*m1c_bad_plugin_fn)(void *ud, const char *path, const char *msg);
int m1c_registry_discover(m1c_registry *r, const char *base_dir, m1c_bad_plugin_fn bad, void *ud);

const char *m1c_kind_name(int kind); /* "attention", "moe", "optimizer", "objective", "data" */
int m1c_kind_from_name(const char *name); /* 0 if unknown */
const char *m1c_kind_dir(int kind);  /* folder under plugins/: "attention", "moe", "optim", "optim", "data" */

/* The vtables, typed. */
#define M1C_ATTENTION(p) ((const m1c_attention_vtable *)(p)->vtable)
#define M1C_MOE(p) ((const m1c_moe_vtable *)(p)->vtable)
#define M1C_OPTIMIZER(p) ((const m1c_optimizer_vtable *)(p)->vtable)
#define M1C_OBJECTIVE(p) ((const m1c_objective_vtable *)(p)->vtable)
#define M1C_DATA(p) ((const m1c_data_vtable *)(p)->vtable)

/* If the plugin recorded an error (h->error), copy "plugin 'name' (path): msg" into e; returns M1C_ERR. */
int m1c_plugin_fail(m1c_plugin *p, m1c_err *e, const char *what);

#endif
