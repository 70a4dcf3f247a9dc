/* Plugin loader and registry: search order, dlopen, the descriptor checks and every refusal message
 * (see loader.h). Each refusal undoes everything (dlclose, free) so that a failed load leaves no trace. */
#include "loader.h"
#include "host.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef M1C_PLUGIN_INSTALL_DIR
#define M1C_PLUGIN_INSTALL_DIR "/usr/local/lib/m1c/plugins"
#endif

/* ABI 1.2 filled reserved space of these two structs (lp_inputs, in_lp, dout_lp): their sizes, and so
 * every member's offset, were those of ABI 1.0 (LP64). ABI 1.4 appended in_proj and out_rows to
 * m1c_layer_bufs, which only the core makes: a plugin of an older minor never reads past dout_lp.
 * m1c_buf_spec's in_proj (ABI 1.4) took its reserved word, which older plugins left zero. */
_Static_assert(sizeof(void *) != 8 || sizeof(m1c_layer_info) == 80, "m1c_layer_info changed size");
_Static_assert(sizeof(void *) != 8 || sizeof(m1c_layer_bufs) == 96, "m1c_layer_bufs changed size");
_Static_assert(sizeof(void *) != 8 || sizeof(m1c_buf_spec) == 72, "m1c_buf_spec changed size");
_Static_assert(offsetof(m1c_layer_bufs, in_lp) == offsetof(m1c_layer_bufs, stream) + sizeof(void *),
               "in_lp must take the first reserved pointer");

/* Bytes up to and including `member`: the size a struct had in the ABI whose last member that was.
 * The minimum sizes below name the last member of ABI 1.0, so they stay right as structs grow. */
#define END_OF(type, member) (offsetof(type, member) + sizeof(((type *)0)->member))
#define MIN_DESC_SIZE END_OF(m1c_plugin_desc, reserved)
/* A descriptor bigger than this is garbage, not a newer ABI (which is refused by version anyway). */
#define MAX_STRUCT_SIZE 65536u

static const char *const kind_names[] = {NULL, "attention", "moe", "optimizer", "objective", "data"};
static const char *const kind_dirs[] = {NULL, "attention", "moe", "optim", "optim", "data"};
#define N_KINDS 5

const char *m1c_kind_name(int kind) { return (kind >= 1 && kind <= N_KINDS) ? kind_names[kind] : "unknown"; }

const char *m1c_kind_dir(int kind) { return (kind >= 1 && kind <= N_KINDS) ? kind_dirs[kind] : "unknown"; }

int m1c_kind_from_name(const char *name) {
    if (!name) return 0;
    for (int k = 1; k <= N_KINDS; k++)
        if (strcmp(name, kind_names[k]) == 0) return k;
    return 0;
}

/* The vtable size of ABI 1.0 for each kind: a plugin built against 1.0 has at least this much. */
static size_t min_vtable_size(int kind) {
    switch (kind) {
    case M1C_KIND_ATTENTION: return END_OF(m1c_attention_vtable, reserved);
    case M1C_KIND_MOE: return END_OF(m1c_moe_vtable, reserved);
    case M1C_KIND_OPTIMIZER: return END_OF(m1c_optimizer_vtable, reserved);
    case M1C_KIND_OBJECTIVE: return END_OF(m1c_objective_vtable, reserved);
    case M1C_KIND_DATA: return END_OF(m1c_data_vtable, reserved);
    default: return 0;
    }
}

// ----------------------------------------------------------------------------
// directories

static void push_dir(m1c_registry *r, const char *dir) {
    for (int i = 0; i < r->n_dirs; i++)
        if (strcmp(r->dirs[i], dir) == 0) return;
    r->dirs = m1c_xrealloc(r->dirs, (size_t)(r->n_dirs + 1) * sizeof *r->dirs);
    r->dirs[r->n_dirs++] = m1c_xstrdup(dir);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A built-in directory, canonicalised so that <exe>/../lib/m1c/plugins and the install folder, which
 * are usually the same place, are searched once. Missing folders are left out. */
static void push_builtin(m1c_registry *r, const char *dir) {
    char real[PATH_MAX];
    if (!is_dir(dir) || !realpath(dir, real)) return;
    push_dir(r, real);
}

void m1c_registry_init(m1c_registry *r) {
    memset(r, 0, sizeof *r);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *dir = m1c_dirname(exe);
        char *build = m1c_path_join(dir, "plugins");
        char *inst = m1c_path_join(dir, "../lib/m1c/plugins");
        push_builtin(r, build);
        push_builtin(r, inst);
        free(build);
        free(inst);
        free(dir);
    }
    push_builtin(r, M1C_PLUGIN_INSTALL_DIR);
}

void m1c_registry_add_dir(m1c_registry *r, const char *dir) {
    if (dir && dir[0]) push_dir(r, dir);
}

static void plugin_close(m1c_plugin *p) {
    if (!p) return;
    if (p->handle) dlclose(p->handle);
    free(p->path);
    free(p);
}

void m1c_registry_free(m1c_registry *r) {
    for (int i = r->n - 1; i >= 0; i--) plugin_close(r->plugins[i]);
    free(r->plugins);
    for (int i = 0; i < r->n_dirs; i++) free(r->dirs[i]);
    free(r->dirs);
    memset(r, 0, sizeof *r);
}

// ----------------------------------------------------------------------------
// finding the file

static int is_path(const char *s) {
    size_t n = strlen(s);
    return strchr(s, '/') != NULL || (n >= 3 && strcmp(s + n - 3, ".so") == 0);
}

/* Try <dir>/<name>.so (when flat) and <dir>/<kind dir>/<name>.so (every kind's folder when kind is 0).
 * Returns the path found (allocated) or NULL. */
static char *try_dir(const char *dir, const char *name, int kind, int flat) {
    if (flat) {
        char *p = m1c_xasprintf("%s/%s.so", dir, name);
        if (m1c_file_exists(p)) return p;
        free(p);
    }
    for (int k = 1; k <= N_KINDS; k++) {
        if (kind && k != kind) continue;
        if (k > 1 && strcmp(kind_dirs[k], kind_dirs[k - 1]) == 0 && !kind) continue; /* optim twice */
        char *p = m1c_xasprintf("%s/%s/%s.so", dir, kind_dirs[k], name);
        if (m1c_file_exists(p)) return p;
        free(p);
    }
    return NULL;
}

/* The M1C_PLUGIN_PATH directories in order (a copy the caller frees, split in place). */
static int env_dirs(char **buf, const char ***dirs) {
    const char *env = getenv("M1C_PLUGIN_PATH");
    *buf = NULL;
    *dirs = NULL;
    if (!env || !env[0]) return 0;
    *buf = m1c_xstrdup(env);
    int n = 0;
    *dirs = m1c_xmalloc((strlen(env) + 1) * sizeof **dirs);
    for (char *s = *buf, *tok; (tok = strsep(&s, ":")) != NULL;)
        if (tok[0]) (*dirs)[n++] = tok;
    return n;
}

/* Appends "dir, " to a bounded list of searched places for the not-found message. */
static void note_dir(char *buf, size_t cap, const char *dir) {
    size_t n = strlen(buf);
    if (n + 1 < cap) snprintf(buf + n, cap - n, "%s%s", n ? ", " : "", dir);
}

static char *find_by_name(const m1c_registry *r, const char *name, const char *base_dir, int kind, m1c_err *e) {
    char searched[640] = "";
    if (base_dir) {
        char *p = try_dir(base_dir, name, kind, 1);
        if (p) return p;
        note_dir(searched, sizeof searched, base_dir);
    }
    char *buf;
    const char **dirs;
    int nd = env_dirs(&buf, &dirs);
    for (int i = 0; i < nd; i++) {
        char *p = try_dir(dirs[i], name, kind, 1);
        if (p) {
            free(buf);
            free(dirs);
            return p;
        }
        note_dir(searched, sizeof searched, dirs[i]);
    }
    free(buf);
    free(dirs);
    for (int i = 0; i < r->n_dirs; i++) {
        char *p = try_dir(r->dirs[i], name, kind, 0);
        if (p) return p;
        note_dir(searched, sizeof searched, r->dirs[i]);
    }
    /* One line: the name, the file forms tried and where. */
    if (kind)
        m1c_fail(e, "plugin '%s' (%s) not found: no %s.so or %s/%s.so in %s", name, m1c_kind_name(kind), name,
                 m1c_kind_dir(kind), name, searched[0] ? searched : "any search directory");
    else
        m1c_fail(e, "plugin '%s' not found: no %s.so or <kind>/%s.so in %s", name, name, name,
                 searched[0] ? searched : "any search directory");
    return NULL;
}

static int same_file(const char *a, const struct stat *sb) {
    struct stat sa;
    return stat(a, &sa) == 0 && sa.st_dev == sb->st_dev && sa.st_ino == sb->st_ino;
}

/* Checks the file before dlopen: dlopen's own messages for a text file are cryptic. */
static int check_elf(const char *path, m1c_err *e) {
    struct stat st;
    if (stat(path, &st) != 0) return m1c_fail(e, "%s: plugin file not found (%s)", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return m1c_fail(e, "%s: not a shared object (not a regular file)", path);
    FILE *f = fopen(path, "rb");
    if (!f) return m1c_fail(e, "%s: cannot read plugin file (%s)", path, strerror(errno));
    unsigned char magic[4] = {0};
    size_t n = fread(magic, 1, 4, f);
    fclose(f);
    if (n != 4 || memcmp(magic, "\x7f" "ELF", 4) != 0)
        return m1c_fail(e, "%s: not a shared object (no ELF header)", path);
    return M1C_OK;
}

// ----------------------------------------------------------------------------
// opening and checking

/* dlerror() messages usually start with the path again; keep them but on one line. */
static void one_line(char *s) {
    for (; *s; s++)
        if (*s == '\n' || *s == '\r') *s = ' ';
}

static int check_desc(const m1c_registry *r, m1c_plugin *p, int kind, m1c_err *e) {
    const m1c_plugin_desc *d = p->desc;
    const char *f = p->path;
    /* abi_major/minor are read before anything else: a descriptor of another major may differ in
     * every later field. */
    if (d->abi_major != M1C_ABI_MAJOR)
        return m1c_fail(e, "%s: built for plugin ABI %u.%u, this core has ABI %d.%d (major versions differ: rebuild the plugin)",
                        f, d->abi_major, d->abi_minor, M1C_ABI_MAJOR, M1C_ABI_MINOR);
    if (d->abi_minor > M1C_ABI_MINOR)
        return m1c_fail(e, "%s: built for plugin ABI %u.%u, newer than this core's ABI %d.%d (update m1c)", f,
                        d->abi_major, d->abi_minor, M1C_ABI_MAJOR, M1C_ABI_MINOR);
    if (d->size < MIN_DESC_SIZE || d->size > MAX_STRUCT_SIZE)
        return m1c_fail(e, "%s: descriptor size %u is not valid for ABI %u.%u (expected at least %zu)", f, d->size,
                        d->abi_major, d->abi_minor, (size_t)MIN_DESC_SIZE);
    if (d->kind < 1 || d->kind > N_KINDS) return m1c_fail(e, "%s: unknown plugin kind %d", f, (int)d->kind);
    if (!d->name || !d->name[0]) return m1c_fail(e, "%s: the descriptor has no name", f);
    if (!d->vtable) return m1c_fail(e, "%s: plugin '%s' has no vtable (NULL)", f, d->name);
    size_t min = min_vtable_size(d->kind);
    if (d->vtable_size < min || d->vtable_size > MAX_STRUCT_SIZE)
        return m1c_fail(e, "%s: plugin '%s': %s vtable size %u is not valid (expected at least %zu)", f, d->name,
                        m1c_kind_name(d->kind), d->vtable_size, min);
    for (int i = 0; i < r->n; i++)
        if (strcmp(r->plugins[i]->desc->name, d->name) == 0)
            return m1c_fail(e, "%s: a plugin named '%s' is already loaded from %s", f, d->name, r->plugins[i]->path);
    if (kind && d->kind != kind)
        return m1c_fail(e, "%s: is a '%s' plugin, the slot needs '%s'", f, m1c_kind_name(d->kind),
                        m1c_kind_name(kind));
    return M1C_OK;
}

static int open_plugin(m1c_registry *r, const char *path, int kind, m1c_plugin **out, m1c_err *e) {
    if (check_elf(path, e)) return M1C_ERR;
    m1c_plugin *p = m1c_xcalloc(1, sizeof *p);
    p->path = m1c_xstrdup(path);
    dlerror();
    p->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!p->handle) {
        const char *de = dlerror();
        char msg[700];
        snprintf(msg, sizeof msg, "%s", de ? de : "unknown error");
        one_line(msg);
        m1c_fail(e, "%s: cannot be opened: %s", path, msg);
        plugin_close(p);
        return M1C_ERR;
    }
    dlerror();
    void *sym = dlsym(p->handle, M1C_PLUGIN_ENTRY_SYMBOL);
    if (!sym) {
        m1c_fail(e, "%s: no entry point '%s' (not an m1c plugin, or built without M1C_PLUGIN)", path,
                 M1C_PLUGIN_ENTRY_SYMBOL);
        plugin_close(p);
        return M1C_ERR;
    }
    m1c_plugin_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* object pointer to function pointer, without the ISO warning */
    m1c_host_fill(&p->host, p);
    p->desc = entry(&p->host);
    if (!p->desc) {
        m1c_fail(e, "%s: the entry point refused to load: %s", path,
                 p->error[0] ? p->error : "(no message given)");
        plugin_close(p);
        return M1C_ERR;
    }
    if (check_desc(r, p, kind, e)) {
        plugin_close(p);
        return M1C_ERR;
    }
    p->vtable = p->desc->vtable;
    p->error[0] = 0;
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 8;
        r->plugins = m1c_xrealloc(r->plugins, (size_t)r->cap * sizeof *r->plugins);
    }
    r->plugins[r->n++] = p;
    *out = p;
    return M1C_OK;
}

int m1c_registry_load(m1c_registry *r, const char *name_or_path, const char *base_dir, int kind,
                      m1c_plugin **out, m1c_err *e) {
    *out = NULL;
    if (!name_or_path || !name_or_path[0]) return m1c_fail(e, "empty plugin name");
    char *path;
    if (is_path(name_or_path)) {
        path = base_dir ? m1c_path_join(base_dir, name_or_path) : m1c_xstrdup(name_or_path);
        if (access(path, F_OK) != 0) {
            m1c_fail(e, "%s: plugin file not found", path);
            free(path);
            return M1C_ERR;
        }
    } else {
        path = find_by_name(r, name_or_path, base_dir, kind, e);
        if (!path) return M1C_ERR;
    }
    /* The same file again (by any spelling): hand back the loaded plugin. */
    struct stat st;
    if (stat(path, &st) == 0) {
        for (int i = 0; i < r->n; i++) {
            m1c_plugin *p = r->plugins[i];
            if (!same_file(p->path, &st)) continue;
            free(path);
            if (kind && p->desc->kind != kind)
                return m1c_fail(e, "%s: is a '%s' plugin, the slot needs '%s'", p->path,
                                m1c_kind_name(p->desc->kind), m1c_kind_name(kind));
            *out = p;
            return M1C_OK;
        }
    }
    int rc = open_plugin(r, path, kind, out, e);
    free(path);
    return rc;
}

// ----------------------------------------------------------------------------
// discovery (m1c plugins)

static int so_filter(const struct dirent *d) {
    size_t n = strlen(d->d_name);
    return d->d_name[0] != '.' && n > 3 && strcmp(d->d_name + n - 3, ".so") == 0;
}

/* Load every *.so of one folder, in name order so that the listing is stable. */
static void discover_in(m1c_registry *r, const char *dir, m1c_bad_plugin_fn bad, void *ud) {
    struct dirent **list = NULL;
    int n = scandir(dir, &list, so_filter, alphasort);
    if (n < 0) return;
    for (int i = 0; i < n; i++) {
        char *path = m1c_path_join(dir, list[i]->d_name);
        m1c_plugin *p;
        m1c_err e;
        if (m1c_file_exists(path) && m1c_registry_load(r, path, NULL, 0, &p, &e) != M1C_OK && bad)
            bad(ud, path, e.msg);
        free(path);
        free(list[i]);
    }
    free(list);
}

static void discover_dir(m1c_registry *r, const char *dir, int flat, m1c_bad_plugin_fn bad, void *ud) {
    if (flat) discover_in(r, dir, bad, ud);
    for (int k = 1; k <= N_KINDS; k++) {
        if (k > 1 && strcmp(kind_dirs[k], kind_dirs[k - 1]) == 0) continue;
        char *sub = m1c_path_join(dir, kind_dirs[k]);
        discover_in(r, sub, bad, ud);
        free(sub);
    }
}

int m1c_registry_discover(m1c_registry *r, const char *base_dir, m1c_bad_plugin_fn bad, void *ud) {
    if (base_dir) discover_dir(r, base_dir, 1, bad, ud);
    char *buf;
    const char **dirs;
    int nd = env_dirs(&buf, &dirs);
    for (int i = 0; i < nd; i++) discover_dir(r, dirs[i], 1, bad, ud);
    free(buf);
    free(dirs);
    for (int i = 0; i < r->n_dirs; i++) discover_dir(r, r->dirs[i], 0, bad, ud);
    return M1C_OK;
}

int m1c_plugin_fail(m1c_plugin *p, m1c_err *e, const char *what) {
    const char *name = (p->desc && p->desc->name) ? p->desc->name : "?";
    if (p->error[0])
        m1c_fail(e, "plugin '%s' (%s): %s%s%s", name, p->path, what ? what : "", what ? ": " : "", p->error);
    else
        m1c_fail(e, "plugin '%s' (%s): %s failed", name, p->path, what ? what : "call");
    p->error[0] = 0;
    return M1C_ERR;
}
