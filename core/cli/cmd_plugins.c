/* `m1c plugins`: list every plugin the loader can find (kind, name, version, path, description);
 * files that fail to load are listed as warnings on stderr with the loader's reason. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../loader.h"
#include "../util.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c plugins [--config CONFIG] [--json]\n"
    "\n"
    "Lists the plugins found (by kind, then name) in the search folders, first match of a name wins:\n"
    "the config's folder (with --config), each folder of M1C_PLUGIN_PATH, then the built-in folders\n"
    "(<exe>/plugins, <prefix>/lib/m1c/plugins). Files that fail to load, or whose name a plugin found\n"
    "earlier already has, are reported on stderr with the reason; the exit status is still 0.\n"
    "\n"
    "  --config CONFIG  also search the folder of CONFIG (where a config's own plugins live)\n"
    "  --json           print a JSON object {\"plugins\": [...], \"broken\": [...]} instead of a table\n";

typedef struct broken {
    json_t *list; /* [{path, error}] when --json */
    int n;
} broken;

static void on_bad(void *ud, const char *path, const char *msg) {
    broken *b = ud;
    b->n++;
    fprintf(stderr, "m1c: warning: %s\n", msg);
    if (b->list) json_array_append_new(b->list, json_pack("{s:s, s:s}", "path", path, "error", msg));
}

static const char *or_dash(const char *s) { return (s && s[0]) ? s : "-"; }

/* Table order: by kind, then name. */
static int by_kind_name(const void *a, const void *b) {
    const m1c_plugin *p = *(m1c_plugin *const *)a, *q = *(m1c_plugin *const *)b;
    if (p->desc->kind != q->desc->kind) return p->desc->kind < q->desc->kind ? -1 : 1;
    return strcmp(p->desc->name, q->desc->name);
}

static int field_width(m1c_plugin **ps, int n, int col, int min) {
    int w = min;
    for (int i = 0; i < n; i++) {
        const m1c_plugin_desc *d = ps[i]->desc;
        const char *s = col == 0 ? m1c_kind_name(d->kind) : col == 1 ? d->name : col == 2 ? or_dash(d->version) : ps[i]->path;
        int len = (int)strlen(s);
        if (len > w) w = len;
    }
    return w;
}

int m1c_cmd_plugins(int argc, char **argv) {
    const char *config = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c")) {
            if (++i >= argc) return m1c_cli_error("plugins: --config needs a file");
            config = argv[i];
        } else if (!strncmp(argv[i], "--config=", 9)) {
            config = argv[i] + 9;
        } else {
            return m1c_cli_error("plugins: unknown argument '%s' (see m1c plugins --help)", argv[i]);
        }
    }
    if (config && !m1c_file_exists(config)) return m1c_cli_error("%s: config file not found", config);

    char *base_dir = config ? m1c_dirname(config) : NULL;
    m1c_registry r;
    m1c_registry_init(&r);
    broken b = {json ? json_array() : NULL, 0};
    m1c_registry_discover(&r, base_dir, on_bad, &b);

    m1c_plugin **ps = m1c_xmalloc((size_t)(r.n ? r.n : 1) * sizeof *ps);
    memcpy(ps, r.plugins, (size_t)r.n * sizeof *ps);
    qsort(ps, (size_t)r.n, sizeof *ps, by_kind_name);

    if (json) {
        json_t *list = json_array();
        for (int i = 0; i < r.n; i++) {
            const m1c_plugin_desc *d = ps[i]->desc;
            char abi[32];
            snprintf(abi, sizeof abi, "%u.%u", d->abi_major, d->abi_minor);
            json_array_append_new(list, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "kind",
                                                  m1c_kind_name(d->kind), "name", d->name, "version",
                                                  d->version ? d->version : "", "path", ps[i]->path, "description",
                                                  d->description ? d->description : "", "license",
                                                  d->license ? d->license : "", "abi", abi));
        }
        json_t *root = json_pack("{s:o, s:o}", "plugins", list, "broken", b.list);
        json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        fputc('\n', stdout);
        json_decref(root);
    } else if (r.n == 0) {
        printf("no plugins found (searched%s M1C_PLUGIN_PATH and %d built-in folder%s)\n",
               base_dir ? " the config's folder," : "", r.n_dirs, r.n_dirs == 1 ? "" : "s");
    } else {
        int wk = field_width(ps, r.n, 0, 4), wn = field_width(ps, r.n, 1, 4), wv = field_width(ps, r.n, 2, 7),
            wp = field_width(ps, r.n, 3, 4);
        printf("%-*s  %-*s  %-*s  %-*s  %s\n", wk, "KIND", wn, "NAME", wv, "VERSION", wp, "PATH", "DESCRIPTION");
        for (int i = 0; i < r.n; i++) {
            const m1c_plugin_desc *d = ps[i]->desc;
            printf("%-*s  %-*s  %-*s  %-*s  %s\n", wk, m1c_kind_name(d->kind), wn, d->name, wv, or_dash(d->version),
                   wp, ps[i]->path, or_dash(d->description));
        }
    }
    if (b.n && !json) fprintf(stderr, "m1c: %d plugin file%s could not be loaded (see the warnings above)\n", b.n,
                              b.n == 1 ? "" : "s");
    free(ps);
    free(base_dir);
    m1c_registry_free(&r);
    return 0;
}
