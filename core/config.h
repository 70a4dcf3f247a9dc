/* Strict configuration on top of libconfig.
 *
 * A config file (libconfig syntax, `@include "x.cfg"` resolved relative to the main
 * file's directory, for nested includes too: libconfig 1.5's rule) is
 * read whole, `-s key.path=value` overrides are applied, and then every part of the program reads
 * its keys through the typed getters below. Each getter checks type and range, fills in the default
 * where the key is absent (so `m1c config show` prints the resolved configuration) and marks the key
 * as read; m1c_cfg_done() then refuses any key of a group that nobody read (a typo). Every error
 * names file:line and the full key path, e.g.
 *     configs/tiny.cfg:12: model.hidden: expected an integer in [1, 65536], got 0
 * Plugins reach the same getters through the host table (m1c_host.get_int, ...).
 */
#ifndef M1C_CONFIG_H
#define M1C_CONFIG_H

#include <stdio.h>
#include "util.h"

typedef struct m1c_config m1c_config;
/* m1c_settings (declared in m1c/plugin.h) is one group of a loaded config. */

/* Load a file and apply overrides ("a.b.c=value"; value parsed as libconfig would: 3, 3.0, true,
 * "text" or bare text for strings, [..] lists). An override may name a key that is absent: it is
 * created (the reader then validates it like any other key). */
int m1c_config_load(m1c_config **out, const char *path, const char *const *overrides, int n_overrides,
                    m1c_err *e);
/* The same from text (tests, embedded defaults); `name` stands for the file name in messages and
 * `dir` for the directory @include and relative paths resolve against (NULL: "."). */
int m1c_config_parse(m1c_config **out, const char *text, const char *name, const char *dir,
                     const char *const *overrides, int n_overrides, m1c_err *e);
void m1c_config_free(m1c_config *c);

const char *m1c_config_file(const m1c_config *c); /* as given */
const char *m1c_config_dir(const m1c_config *c);  /* directory of the file */
m1c_settings *m1c_config_root(m1c_config *c);

/* Write the configuration as it now stands (defaults filled in by the readers so far). */
int m1c_config_write(m1c_config *c, FILE *f);

/* ---- groups and lists ---- */
/* The group `key` of s. Absent: NULL with an error if required, else an empty group is created. */
m1c_settings *m1c_cfg_group(m1c_settings *s, const char *key, int required, m1c_err *e);
/* A list (or array) `key`: its length, -1 if absent. Elements that are groups: m1c_cfg_elem. */
int m1c_cfg_len(m1c_settings *s, const char *key);
m1c_settings *m1c_cfg_elem(m1c_settings *s, const char *key, int i);
int m1c_cfg_has(m1c_settings *s, const char *key);
/* The keys of group s in file order (for groups whose keys are names, e.g. model.types): count and
 * the i-th key. Listing does not mark them read. */
int m1c_cfg_n_keys(const m1c_settings *s);
const char *m1c_cfg_key(const m1c_settings *s, int i);
const char *m1c_cfg_path(const m1c_settings *s); /* full key path, e.g. "run.stages.[0].optimizer" */
const char *m1c_cfg_file(const m1c_settings *s); /* file the group was read from */
int m1c_cfg_line(const m1c_settings *s);         /* its line, 0 if created */

/* ---- typed getters; required: a missing key is an error instead of taking def ---- */
#define M1C_REQUIRED 1
#define M1C_OPTIONAL 0
int m1c_cfg_int(m1c_settings *s, const char *key, int req, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                m1c_err *e);
int m1c_cfg_float(m1c_settings *s, const char *key, int req, double def, double lo, double hi, double *out,
                  m1c_err *e);
int m1c_cfg_bool(m1c_settings *s, const char *key, int req, int def, int *out, m1c_err *e);
/* choices: NULL-terminated allowed values, or NULL. The string lives as long as the config. */
int m1c_cfg_string(m1c_settings *s, const char *key, int req, const char *def, const char *const *choices,
                   const char **out, m1c_err *e);
/* Element i of a list/array of strings (or of scalars: ints for m1c_cfg_list_int). */
int m1c_cfg_list_string(m1c_settings *s, const char *key, int i, const char **out, m1c_err *e);
int m1c_cfg_list_int(m1c_settings *s, const char *key, int i, int64_t *out, m1c_err *e);
int m1c_cfg_list_float(m1c_settings *s, const char *key, int i, double *out, m1c_err *e); /* ints accepted */
/* Element i of a list of numbers (ints are fine). */
int m1c_cfg_list_float(m1c_settings *s, const char *key, int i, double *out, m1c_err *e);
/* Element i of a list of strings, checked against choices (NULL-terminated). */
int m1c_cfg_list_string_choice(m1c_settings *s, const char *key, int i, const char *const *choices,
                               const char **out, m1c_err *e);
/* A value that is not a list counts as a list of one: m1c_cfg_len gives 1 and element 0 is the value
 * itself (`files = "a.txt"` reads like `files = ["a.txt"]`). */

/* Mark a key as read without reading it (a group's `plugin` key is read by the core, the rest by
 * the plugin). */
void m1c_cfg_touch(m1c_settings *s, const char *key);
/* Refuse keys of s (not of its subgroups) that were never read: "file:line: path.key: unknown key". */
int m1c_cfg_done(m1c_settings *s, m1c_err *e);
/* m1c_cfg_done for s and, recursively, every group under it. */
int m1c_cfg_done_all(m1c_settings *s, m1c_err *e);

/* ---- errors and locations for code that validates beyond the getters ---- */
/* Format "file:line: path.key: <message>" into e and return M1C_ERR. key NULL: about s itself;
 * idx >= 0: about element idx of the list key ("path.key.[idx]", that element's line). The location
 * is "override 'k=v'" where an override set the value. */
int m1c_cfg_fail(m1c_settings *s, const char *key, int idx, m1c_err *e, const char *fmt, ...) M1C_PRINTF(5, 6);
/* The location alone ("file:line" or "override '...'") of key in s (or of s, key NULL). */
void m1c_cfg_where(const m1c_settings *s, const char *key, char *buf, size_t n);
/* The last error a getter or m1c_cfg_fail reported (""  if none): lets a caller tell a plugin's
 * settings error (already "file:line: key: ...") from the plugin's own messages. */
const char *m1c_config_last_error(const m1c_config *c);
/* The config a group belongs to. */
m1c_config *m1c_cfg_config(const m1c_settings *s);

#endif
