/* m1c ablate CONFIG --grid key=v1,v2 ...: train every combination of settings, tabulate the results. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../metrics.h"
#include "../train.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c ablate CONFIG --grid key.path=v1,v2[,...] [--grid ...] [-s key=value ...] [--out DIR]\n\n"
    "Trains CONFIG once for every combination of the --grid values (their cartesian product), each run in\n"
    "<DIR>/<run name>/ (default DIR: <run.out_dir>/ablate), and prints a table of the final training loss,\n"
    "validation loss and throughput; the same rows go to <DIR>/ablate.jsonl. Plugins are settings like any\n"
    "other, and a value may be a whole group (commas inside braces, brackets or quotes do not split), so\n"
    "an ablation across plugin combinations is e.g.\n"
    "  m1c ablate configs/tiny.cfg -s run.stages.[0].steps=100 \\\n"
    "    --grid 'model.ffn={ plugin = \"topk\"; experts = 4; top_k = 2; ffn_dim = 256; },{ plugin = \"dense\"; ffn_dim = 512; }' \\\n"
    "    --grid model.types.lightning.attention.block_size=32,64\n";

typedef struct axis {
    char *key;
    char **vals;
    int n;
} axis;

static void axis_free(axis *a) {
    free(a->key);
    for (int i = 0; i < a->n; i++) free(a->vals[i]);
    free(a->vals);
}

static int parse_axis(const char *spec, axis *a) {
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec || !eq[1]) return m1c_cli_error("ablate: --grid '%s': expected key.path=v1,v2", spec);
    memset(a, 0, sizeof *a);
    a->key = m1c_xasprintf("%.*s", (int)(eq - spec), spec);
    for (const char *p = eq + 1;;) {
        /* Values are separated by commas outside brackets, braces and quotes, so a value can be a
         * whole group or list: model.ffn={ plugin = "dense"; ffn_dim = 512; },{ plugin = "topk"; } */
        const char *c = p;
        int depth = 0, quoted = 0;
        for (; *c && (depth || quoted || *c != ','); c++) {
            if (*c == '"' && (c == p || c[-1] != '\\')) quoted = !quoted;
            else if (!quoted && (*c == '[' || *c == '{' || *c == '(')) depth++;
            else if (!quoted && (*c == ']' || *c == '}' || *c == ')')) depth--;
        }
        if (!*c) c = NULL;
        size_t n = c ? (size_t)(c - p) : strlen(p);
        a->vals = m1c_xrealloc(a->vals, (size_t)(a->n + 1) * sizeof *a->vals);
        a->vals[a->n++] = m1c_xasprintf("%.*s", (int)n, p);
        if (!c) break;
        p = c + 1;
    }
    return 0;
}

/* A file-name-safe run name from the combination, e.g. "ffn.plugin=dense,lr=0.001". */
static char *run_name(const axis *ax, int n_ax, const int *pick) {
    char *s = m1c_xstrdup("");
    for (int i = 0; i < n_ax; i++) {
        const char *k = strrchr(ax[i].key, '.');
        const char *v = ax[i].vals[pick[i]];
        /* A group or list value is named by its position in the axis: "ffn=#1". */
        char idx[16];
        if (strchr("{[(", v[0])) snprintf(idx, sizeof idx, "#%d", pick[i]), v = idx;
        char *t = m1c_xasprintf("%s%s%s=%s", s, i ? "," : "", k ? k + 1 : ax[i].key, v);
        free(s);
        s = t;
    }
    for (char *p = s; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._,=+-#", *p)) *p = '_';
    return s;
}

int m1c_cmd_ablate(int argc, char **argv) {
    const char *config = NULL, *out = NULL;
    m1c_overrides base = {0};
    axis ax[16];
    int n_ax = 0, rc = 0;
    for (int i = 1; i < argc && !rc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            goto done;
        } else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            m1c_overrides_add(&base, argv[++i]);
        } else if (!strcmp(argv[i], "--grid") && i + 1 < argc) {
            if (n_ax == 16) rc = m1c_cli_error("ablate: at most 16 --grid axes");
            else if (!(rc = parse_axis(argv[++i], &ax[n_ax]))) n_ax++;
        } else if (!strcmp(argv[i], "--out") && i + 1 < argc) {
            out = argv[++i];
        } else if (argv[i][0] == '-' || config) {
            rc = m1c_cli_error("ablate: unexpected argument '%s' (see m1c ablate --help)", argv[i]);
        } else {
            config = argv[i];
        }
    }
    if (!rc && (!config || !n_ax)) rc = m1c_cli_error("ablate: need CONFIG and at least one --grid (see m1c ablate --help)");
    if (rc) goto done;

    /* The output folder: --out, else <run.out_dir>/ablate of the base configuration. */
    m1c_err e = {{0}};
    char *dir = NULL;
    if (out) {
        dir = m1c_xstrdup(out);
    } else {
        m1c_session s;
        if (m1c_session_open(&s, config, base.items, base.n, &e)) {
            m1c_session_close(&s);
            rc = m1c_cli_error("%s", e.msg);
            goto done;
        }
        dir = m1c_xasprintf("%s/ablate", s.spec.run.out_dir);
        m1c_session_close(&s);
    }
    m1c_metrics met;
    char *mpath = m1c_xasprintf("%s/ablate.jsonl", dir);
    if (m1c_metrics_open(&met, mpath, &e)) {
        free(mpath), free(dir);
        rc = m1c_cli_error("%s", e.msg);
        goto done;
    }
    free(mpath);

    int total = 1, pick[16] = {0};
    for (int i = 0; i < n_ax; i++) total *= ax[i].n;
    char **names = m1c_xcalloc((size_t)total, sizeof *names);
    m1c_train_result *res = m1c_xcalloc((size_t)total, sizeof *res);
    int *ok = m1c_xcalloc((size_t)total, sizeof *ok);
    for (int r = 0; r < total; r++) {
        for (int i = 0, k = r; i < n_ax; i++) pick[i] = k % ax[i].n, k /= ax[i].n;
        names[r] = run_name(ax, n_ax, pick);
        m1c_overrides ov = {0};
        for (int i = 0; i < base.n; i++) m1c_overrides_add(&ov, base.items[i]);
        char *kv[17];
        for (int i = 0; i < n_ax; i++) m1c_overrides_add(&ov, kv[i] = m1c_xasprintf("%s=%s", ax[i].key, ax[i].vals[pick[i]]));
        kv[n_ax] = m1c_xasprintf("run.out_dir=\"%s/%s\"", dir, names[r]);
        m1c_overrides_add(&ov, kv[n_ax]);
        fprintf(stderr, "== ablate run %d/%d: %s\n", r + 1, total, names[r]);
        m1c_session s;
        m1c_train_opts o = {0};
        int r_rc = m1c_session_open(&s, config, ov.items, ov.n, &e);
        if (!r_rc) r_rc = m1c_train(&s, &o, &res[r], &e);
        m1c_session_close(&s);
        if (r_rc) fprintf(stderr, "m1c: ablate run %s failed: %s\n", names[r], e.msg);
        ok[r] = !r_rc;
        static const char *const keys[] = {"ok", "loss", "val_loss", "tokens_per_s", "steps"};
        double vals[] = {ok[r], res[r].last_loss, res[r].last_val_loss, res[r].tokens_per_s, (double)res[r].steps};
        m1c_metrics_write(&met, names[r], res[r].steps, keys, vals, 5);
        for (int i = 0; i <= n_ax; i++) free(kv[i]);
        m1c_overrides_free(&ov);
    }
    printf("%-48s %10s %10s %10s\n", "run", "loss", "val_loss", "tok/s");
    for (int r = 0; r < total; r++) {
        if (ok[r])
            printf("%-48s %10.4f %10.4f %10.0f\n", names[r], res[r].last_loss, res[r].last_val_loss, res[r].tokens_per_s);
        else
            printf("%-48s %10s\n", names[r], "failed");
        free(names[r]);
    }
    printf("results: %s/ablate.jsonl\n", dir);
    for (int r = 0; r < total; r++) rc |= !ok[r];
    free(names), free(res), free(ok), free(dir);
    m1c_metrics_close(&met);
done:
    for (int i = 0; i < n_ax; i++) axis_free(&ax[i]);
    m1c_overrides_free(&base);
    return rc ? 1 : 0;
}
