/* Loader tests: search order, loading by name and by path, and every refusal (one deliberately broken
 * plugin per refusal in tests/plugins/), each message naming the file and the reason. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"
#include "../core/loader.h"

#define BAD M1C_TEST_BAD_PLUGIN_DIR

// ----------------------------------------------------------------------------
// helpers: temporary folders holding copies of the test plugins

static char *tmpdir_new(void) { return th_mkdtemp("/tmp", "m1c_test_loader"); }

static void copy_file(const char *from, const char *to) {
    FILE *in = fopen(from, "rb");
    cr_assert(in != NULL, "cannot open %s", from);
    FILE *out = fopen(to, "wb");
    cr_assert(out != NULL, "cannot create %s", to);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) cr_assert_eq(fwrite(buf, 1, n, out), n);
    fclose(in);
    fclose(out);
}

/* Copy tests-build/plugins/<plugin>.so to <dir>/<sub>/<as>.so (sub may be NULL). */
static void place(const char *dir, const char *sub, const char *plugin, const char *as) {
    char from[PATH_MAX], to[PATH_MAX];
    snprintf(from, sizeof from, "%s/%s.so", BAD, plugin);
    if (sub) {
        snprintf(to, sizeof to, "%s/%s", dir, sub);
        mkdir(to, 0755);
        snprintf(to, sizeof to, "%s/%s/%s.so", dir, sub, as);
    } else {
        snprintf(to, sizeof to, "%s/%s.so", dir, as);
    }
    copy_file(from, to);
}

/* A registry with no built-in directories: what a test sees does not depend on an installed m1c. */
static void bare_registry(m1c_registry *r) { memset(r, 0, sizeof *r); }

/* Expect a refusal whose one-line message contains the file and the reason; the registry is unchanged. */
static void expect_refusal(m1c_registry *r, const char *what, const char *base, int kind, const char *file_part,
                           const char *reason) {
    int n0 = r->n;
    m1c_plugin *p = (m1c_plugin *)0x1;
    m1c_err e = {{0}};
    int rc = m1c_registry_load(r, what, base, kind, &p, &e);
    cr_assert_eq(rc, M1C_ERR, "%s should be refused", what);
    cr_assert_null(p, "out must be NULL on refusal");
    cr_assert_eq(r->n, n0, "a refused plugin must not stay in the registry");
    cr_assert(strstr(e.msg, file_part) != NULL, "message should name '%s': %s", file_part, e.msg);
    cr_assert(strstr(e.msg, reason) != NULL, "message should say '%s': %s", reason, e.msg);
    cr_assert(strchr(e.msg, '\n') == NULL, "message must be one line: %s", e.msg);
}

static m1c_plugin *expect_load(m1c_registry *r, const char *what, const char *base, int kind) {
    m1c_plugin *p = NULL;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_registry_load(r, what, base, kind, &p, &e), M1C_OK, "%s: %s", what, e.msg);
    cr_assert_not_null(p);
    return p;
}

// ----------------------------------------------------------------------------
// successful loads

Test(loader, by_path_relative_to_base_dir) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *p = expect_load(&r, "good_attention.so", BAD, M1C_KIND_ATTENTION);
    cr_assert_str_eq(p->desc->name, "good_attention");
    cr_assert_str_eq(p->desc->version, "1.2.3");
    cr_assert_eq(p->desc->kind, M1C_KIND_ATTENTION);
    cr_assert_eq(p->vtable, p->desc->vtable);
    cr_assert(strstr(p->path, BAD) == p->path, "path %s should be under the base dir", p->path);
    cr_assert_eq(p->host.core, (void *)p, "the plugin's host table must point at its own m1c_plugin");

    /* Its forward through the vtable: the identity, so an exact copy (tolerance 0: memcpy). */
    const m1c_attention_vtable *vt = M1C_ATTENTION(p);
    m1c_layer_info info = {.size = sizeof info, .layer_index = 0, .n_layers = 1, .hidden = 4};
    void *self = NULL;
    cr_assert_eq(vt->ops.create(&p->host, NULL, &info, &self), M1C_OK);
    float in[2 * 3 * 4], out[2 * 3 * 4];
    for (int i = 0; i < 24; i++) in[i] = (float)i - 7.5f;
    m1c_layer_bufs b = {0};
    cr_assert_eq(vt->ops.forward(self, &b, out, in, 2, 3), M1C_OK);
    cr_assert_eq(memcmp(in, out, sizeof in), 0);
    vt->ops.destroy(self);
    m1c_registry_free(&r);
}

Test(loader, by_absolute_path_without_base_dir) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *p = expect_load(&r, BAD "/good_attention.so", NULL, 0);
    cr_assert_str_eq(p->desc->name, "good_attention");
    m1c_registry_free(&r);
}

Test(loader, by_name_in_base_dir_flat_and_kind_folder) {
    m1c_registry r;
    bare_registry(&r);
    /* flat: <base>/<name>.so */
    m1c_plugin *p = expect_load(&r, "good_attention", BAD, M1C_KIND_ATTENTION);
    cr_assert_str_eq(p->desc->name, "good_attention");
    m1c_registry_free(&r);

    /* kind folder: <base>/attention/<name>.so */
    char *d = tmpdir_new();
    place(d, "attention", "good_attention", "good_attention");
    bare_registry(&r);
    p = expect_load(&r, "good_attention", d, M1C_KIND_ATTENTION);
    cr_assert(strstr(p->path, "/attention/good_attention.so") != NULL, "found %s", p->path);
    m1c_registry_free(&r);
    th_rm_rf(d);
    free(d);
}

Test(loader, by_name_in_added_dir) {
    char *d = tmpdir_new();
    place(d, "attention", "good_attention", "good_attention");
    m1c_registry r;
    bare_registry(&r);
    m1c_registry_add_dir(&r, d);
    m1c_plugin *p = expect_load(&r, "good_attention", NULL, M1C_KIND_ATTENTION);
    cr_assert(strstr(p->path, d) == p->path, "found %s", p->path);
    /* Built-in directories are searched only in kind folders: a flat file there is not found. */
    place(d, NULL, "good_moe", "flat_moe");
    expect_refusal(&r, "flat_moe", NULL, 0, "flat_moe", "not found");
    m1c_registry_free(&r);
    th_rm_rf(d);
    free(d);
}

Test(loader, by_name_in_plugin_path_env) {
    setenv("M1C_PLUGIN_PATH", "/nonexistent/m1c:" BAD, 1);
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *p = expect_load(&r, "good_attention", NULL, M1C_KIND_ATTENTION);
    cr_assert(strstr(p->path, BAD) == p->path, "found %s", p->path);
    m1c_registry_free(&r);
}

Test(loader, search_order) {
    /* The impostor (version 9.9.9) sits in base_dir, the real one (1.2.3) in M1C_PLUGIN_PATH and a third
     * copy in a built-in directory: base_dir wins, then M1C_PLUGIN_PATH, then the built-ins. */
    char *base = tmpdir_new(), *builtin = tmpdir_new();
    place(base, NULL, "dup_name", "good_attention");
    place(builtin, "attention", "good_attention", "good_attention");
    setenv("M1C_PLUGIN_PATH", BAD, 1);

    m1c_registry r;
    bare_registry(&r);
    m1c_registry_add_dir(&r, builtin);
    m1c_plugin *p = expect_load(&r, "good_attention", base, M1C_KIND_ATTENTION);
    cr_assert_str_eq(p->desc->version, "9.9.9", "base_dir must shadow M1C_PLUGIN_PATH (got %s)", p->path);
    m1c_registry_free(&r);

    bare_registry(&r);
    m1c_registry_add_dir(&r, builtin);
    p = expect_load(&r, "good_attention", NULL, M1C_KIND_ATTENTION);
    cr_assert(strstr(p->path, BAD) == p->path, "M1C_PLUGIN_PATH must shadow the built-ins (got %s)", p->path);
    m1c_registry_free(&r);

    unsetenv("M1C_PLUGIN_PATH");
    bare_registry(&r);
    m1c_registry_add_dir(&r, builtin);
    p = expect_load(&r, "good_attention", NULL, M1C_KIND_ATTENTION);
    cr_assert(strstr(p->path, builtin) == p->path, "the built-in directory is the last resort (got %s)", p->path);
    m1c_registry_free(&r);
    th_rm_rf(base);
    th_rm_rf(builtin);
    free(base);
    free(builtin);
}

Test(loader, same_file_twice_returns_the_loaded_one) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *a = expect_load(&r, "good_attention", BAD, M1C_KIND_ATTENTION);
    m1c_plugin *b = expect_load(&r, BAD "/./good_attention.so", NULL, 0);
    m1c_plugin *c = expect_load(&r, "good_attention.so", BAD, M1C_KIND_ATTENTION);
    cr_assert_eq(a, b);
    cr_assert_eq(a, c);
    cr_assert_eq(r.n, 1);
    /* The same file offered to a slot of another kind is still refused. */
    expect_refusal(&r, "good_attention", BAD, M1C_KIND_MOE, "good_attention.so",
                   "is a 'attention' plugin, the slot needs 'moe'");
    m1c_registry_free(&r);
}

Test(loader, any_kind_slot_accepts_every_kind) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *p = expect_load(&r, "wrong_kind.so", BAD, 0);
    cr_assert_eq(p->desc->kind, M1C_KIND_MOE);
    m1c_registry_free(&r);
}

Test(loader, builtin_dirs_next_to_the_executable) {
    /* This test runs from <build>/tests/, so <exe>/plugins is the broken-plugin folder. */
    m1c_registry r;
    m1c_registry_init(&r);
    char want[PATH_MAX];
    cr_assert_not_null(realpath(BAD, want));
    int found = 0;
    for (int i = 0; i < r.n_dirs; i++) found |= strcmp(r.dirs[i], want) == 0;
    cr_assert(found, "m1c_registry_init should add %s (the executable's plugins folder)", want);
    m1c_registry_add_dir(&r, "/some/where");
    cr_assert_str_eq(r.dirs[r.n_dirs - 1], "/some/where", "added directories come after the built-ins");
    m1c_registry_free(&r);
}

Test(loader, plugin_fail_quotes_the_plugin_error) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *p = expect_load(&r, "good_attention", BAD, M1C_KIND_ATTENTION);
    cr_assert_eq(p->host.error(&p->host, "bad head count %d", 3), M1C_ERR);
    m1c_err e;
    cr_assert_eq(m1c_plugin_fail(p, &e, "create"), M1C_ERR);
    cr_assert(strstr(e.msg, "good_attention") && strstr(e.msg, "create") && strstr(e.msg, "bad head count 3"),
              "%s", e.msg);
    cr_assert(strstr(e.msg, p->path) != NULL, "%s", e.msg);
    m1c_registry_free(&r);
}

Test(loader, kind_names) {
    for (int k = M1C_KIND_ATTENTION; k <= M1C_KIND_DATA; k++)
        cr_assert_eq(m1c_kind_from_name(m1c_kind_name(k)), k);
    cr_assert_eq(m1c_kind_from_name("nonsense"), 0);
    cr_assert_str_eq(m1c_kind_dir(M1C_KIND_OPTIMIZER), "optim");
    cr_assert_str_eq(m1c_kind_dir(M1C_KIND_ATTENTION), "attention");
}

// ----------------------------------------------------------------------------
// refusals

Test(loader_refuses, not_found) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "no_such_plugin", BAD, M1C_KIND_ATTENTION, "no_such_plugin", "not found");
    expect_refusal(&r, "./no_such_file.so", BAD, 0, "no_such_file.so", "not found");
    m1c_registry_free(&r);
}

Test(loader_refuses, not_a_shared_object) {
    char *d = tmpdir_new();
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/not_elf.so", d);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("this is text, not a library\n", f);
    fclose(f);
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, path, NULL, M1C_KIND_ATTENTION, "not_elf.so", "not a shared object");
    /* A directory named like a plugin is not one either. */
    snprintf(path, sizeof path, "%s/dir.so", d);
    mkdir(path, 0755);
    expect_refusal(&r, path, NULL, 0, "dir.so", "not a shared object");
    m1c_registry_free(&r);
    th_rm_rf(d);
    free(d);
}

Test(loader_refuses, no_entry_point) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "no_entry.so", BAD, 0, "no_entry.so", "no entry point 'm1c_plugin_entry'");
    m1c_registry_free(&r);
}

Test(loader_refuses, abi_major) {
    m1c_registry r;
    bare_registry(&r);
    char plugin_v[32], core_v[32];
    snprintf(plugin_v, sizeof plugin_v, "ABI %d.0", M1C_ABI_MAJOR + 1);
    snprintf(core_v, sizeof core_v, "ABI %d.%d", M1C_ABI_MAJOR, M1C_ABI_MINOR);
    expect_refusal(&r, "abi_major.so", BAD, M1C_KIND_ATTENTION, "abi_major.so", plugin_v);
    expect_refusal(&r, "abi_major.so", BAD, M1C_KIND_ATTENTION, "abi_major.so", core_v);
    expect_refusal(&r, "abi_major.so", BAD, M1C_KIND_ATTENTION, "abi_major.so", "major versions differ");
    m1c_registry_free(&r);
}

Test(loader_refuses, abi_minor_newer) {
    m1c_registry r;
    bare_registry(&r);
    char plugin_v[32], core_v[32];
    snprintf(plugin_v, sizeof plugin_v, "ABI %d.%d", M1C_ABI_MAJOR, M1C_ABI_MINOR + 1);
    snprintf(core_v, sizeof core_v, "ABI %d.%d", M1C_ABI_MAJOR, M1C_ABI_MINOR);
    expect_refusal(&r, "abi_minor.so", BAD, M1C_KIND_ATTENTION, "abi_minor.so", plugin_v);
    expect_refusal(&r, "abi_minor.so", BAD, M1C_KIND_ATTENTION, "abi_minor.so", core_v);
    expect_refusal(&r, "abi_minor.so", BAD, M1C_KIND_ATTENTION, "abi_minor.so", "newer than this core");
    m1c_registry_free(&r);
}

Test(loader_refuses, wrong_kind_for_the_slot) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "wrong_kind.so", BAD, M1C_KIND_ATTENTION, "wrong_kind.so",
                   "is a 'moe' plugin, the slot needs 'attention'");
    m1c_registry_free(&r);
}

Test(loader_refuses, duplicate_name_from_another_file) {
    m1c_registry r;
    bare_registry(&r);
    m1c_plugin *good = expect_load(&r, "good_attention", BAD, M1C_KIND_ATTENTION);
    expect_refusal(&r, "dup_name.so", BAD, M1C_KIND_ATTENTION, "dup_name.so",
                   "a plugin named 'good_attention' is already loaded from");
    expect_refusal(&r, "dup_name.so", BAD, M1C_KIND_ATTENTION, "dup_name.so", good->path);
    m1c_registry_free(&r);
}

Test(loader_refuses, entry_point_fails) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "entry_fails.so", BAD, 0, "entry_fails.so", "needs feature warp-drive which this core lacks");
    expect_refusal(&r, "entry_fails.so", BAD, 0, "entry_fails.so", "refused to load");
    m1c_registry_free(&r);
}

Test(loader_refuses, null_vtable) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "null_vtable.so", BAD, 0, "null_vtable.so", "has no vtable");
    m1c_registry_free(&r);
}

Test(loader_refuses, vtable_smaller_than_abi_1_0) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "small_vtable.so", BAD, 0, "small_vtable.so", "attention vtable size 8 is not valid");
    m1c_registry_free(&r);
}

Test(loader_refuses, unknown_kind) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "bad_kind.so", BAD, 0, "bad_kind.so", "unknown plugin kind 99");
    m1c_registry_free(&r);
}

Test(loader_refuses, empty_name) {
    m1c_registry r;
    bare_registry(&r);
    expect_refusal(&r, "no_name.so", BAD, 0, "no_name.so", "has no name");
    m1c_registry_free(&r);
}

Test(loader_refuses, then_still_loads_good_ones) {
    m1c_registry r;
    bare_registry(&r);
    const char *bad[] = {"no_entry.so", "abi_major.so", "abi_minor.so", "entry_fails.so", "null_vtable.so"};
    for (int i = 0; i < 5; i++) {
        m1c_plugin *p;
        m1c_err e;
        cr_assert_eq(m1c_registry_load(&r, bad[i], BAD, 0, &p, &e), M1C_ERR, "%s", bad[i]);
    }
    m1c_plugin *p = expect_load(&r, "good_attention", BAD, M1C_KIND_ATTENTION);
    cr_assert_eq(r.n, 1);
    cr_assert_eq(r.plugins[0], p);
    m1c_registry_free(&r);
}

// ----------------------------------------------------------------------------
// discovery

typedef struct {
    int n;
    char paths[32][PATH_MAX];
    char msgs[32][1024];
} bad_list;

static void collect_bad(void *ud, const char *path, const char *msg) {
    bad_list *b = ud;
    if (b->n < 32) {
        snprintf(b->paths[b->n], PATH_MAX, "%s", path);
        snprintf(b->msgs[b->n], 1024, "%s", msg);
    }
    b->n++;
}

static int reported(const bad_list *b, const char *file) {
    for (int i = 0; i < b->n && i < 32; i++)
        if (strstr(b->paths[i], file) && strstr(b->msgs[i], file)) return 1;
    return 0;
}

Test(loader, discover_loads_good_and_reports_broken) {
    /* The broken-plugin folder as a flat M1C_PLUGIN_PATH entry; a kind folder in base_dir. */
    char *base = tmpdir_new();
    place(base, "moe", "good_moe", "good_moe");
    setenv("M1C_PLUGIN_PATH", BAD, 1);
    m1c_registry r;
    bare_registry(&r);
    bad_list *b = calloc(1, sizeof *b);
    cr_assert_eq(m1c_registry_discover(&r, base, collect_bad, b), M1C_OK);

    /* good_moe from base_dir; wrong_kind (a valid moe) and one of dup_name/good_attention (same name,
     * first in name order wins) from the flat folder. */
    int have_moe = 0, have_wrong = 0, have_good = 0;
    for (int i = 0; i < r.n; i++) {
        const char *n = r.plugins[i]->desc->name;
        have_moe |= strcmp(n, "good_moe") == 0 && strstr(r.plugins[i]->path, base) == r.plugins[i]->path;
        have_wrong |= strcmp(n, "wrong_kind") == 0;
        have_good += strcmp(n, "good_attention") == 0;
    }
    cr_assert(have_moe && have_wrong, "discover should load the valid plugins");
    cr_assert_eq(have_good, 1, "exactly one plugin named good_attention");
    /* good_moe.so of the flat folder is a second "good_moe" (shadowed by base_dir's). */
    const char *broken[] = {"no_entry.so", "abi_major.so", "abi_minor.so", "entry_fails.so", "null_vtable.so",
                            "small_vtable.so", "bad_kind.so", "no_name.so", "good_attention.so"};
    for (size_t i = 0; i < sizeof broken / sizeof *broken; i++)
        cr_assert(reported(b, broken[i]), "%s should be reported as broken", broken[i]);
    cr_assert(reported(b, BAD "/good_moe.so"), "the shadowed good_moe should be reported");
    free(b);
    m1c_registry_free(&r);
    th_rm_rf(base);
    free(base);
}

// ----------------------------------------------------------------------------
// the `m1c plugins` command

/* A shell command's stdout; asserts it exits 0. */
static char *run(const char *cmd) {
    int st;
    char *buf = th_shell(cmd, &st);
    cr_assert_eq(st, 0, "%s exited non-zero:\n%s", cmd, buf);
    return buf;
}

Test(cli, plugins_lists_good_and_warns_about_broken) {
    /* stdout: the table; stderr (to a file): one warning per broken file. */
    char *d = tmpdir_new();
    char cmd[3 * PATH_MAX];
    snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH='%s' '%s/m1c' plugins 2>'%s/err'", BAD, M1C_BINARY_DIR, d);
    char *out = run(cmd);
    cr_assert(strstr(out, "KIND") && strstr(out, "DESCRIPTION"), "a table header:\n%s", out);
    cr_assert(strstr(out, "wrong_kind") && strstr(out, BAD "/wrong_kind.so"), "the valid plugins:\n%s", out);
    cr_assert(strstr(out, "no_entry") == NULL, "a broken plugin is not in the table:\n%s", out);
    snprintf(cmd, sizeof cmd, "cat '%s/err'", d);
    char *err = run(cmd);
    cr_assert(strstr(err, "warning: " BAD "/no_entry.so: no entry point"), "%s", err);
    cr_assert(strstr(err, "warning: " BAD "/abi_major.so: built for plugin ABI"), "%s", err);
    free(out);
    free(err);

    snprintf(cmd, sizeof cmd, "M1C_PLUGIN_PATH='%s' '%s/m1c' plugins --json 2>/dev/null", BAD, M1C_BINARY_DIR);
    out = run(cmd);
    cr_assert(strstr(out, "\"name\": \"wrong_kind\"") && strstr(out, "\"kind\": \"moe\""), "%s", out);
    cr_assert(strstr(out, "\"broken\"") && strstr(out, "null_vtable.so"), "%s", out);
    free(out);
    th_rm_rf(d);
    free(d);
}
