/* `m1c config show`: read a config strictly (overrides applied, every plugin slot validated by its
 * plugin) and print the resolved configuration, every default filled in, in libconfig syntax. */
#include <stdio.h>
#include <string.h>

#include "../config.h"
#include "../loader.h"
#include "../spec.h"
#include "cli.h"

static const char usage[] =
    "usage: m1c config show CONFIG [-s key.path=value ...] [--no-plugins]\n"
    "\n"
    "Reads CONFIG as training would: applies the overrides, checks every key of the model and run\n"
    "(unknown keys, types, ranges, choices), loads each plugin named in the config and lets it check\n"
    "its own settings, then prints the configuration with every default filled in. The output is\n"
    "itself a valid config (docs/config.md describes the keys).\n"
    "\n"
    "  -s key.path=value  override a setting (repeatable): -s model.hidden=512,\n"
    "                     -s run.stages.0.steps=100 (list element 0; also 'run.stages.[0].steps=100', quoted\n"
    "                     since [] is a shell pattern), -s 'model.pattern=[\"softmax\"]'\n"
    "  --no-plugins       do not load plugins: plugin groups are printed as written, unchecked\n";

int m1c_cmd_config(int argc, char **argv) {
    const char *path = NULL;
    int no_plugins = 0, rc = 1;
    m1c_overrides ov = {0};
    int i = 1;
    if (i < argc && (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))) {
        fputs(usage, stdout);
        return 0;
    }
    if (i >= argc || strcmp(argv[i], "show")) {
        fputs(usage, stderr);
        return m1c_cli_error("config: expected the subcommand 'show'%s%s", i < argc ? ", got " : "",
                             i < argc ? argv[i] : "");
    }
    for (i++; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (!strcmp(a, "-s") || !strcmp(a, "--set")) {
            if (i + 1 >= argc) {
                m1c_overrides_free(&ov);
                return m1c_cli_error("config show: %s needs key=value", a);
            }
            m1c_overrides_add(&ov, argv[++i]);
        } else if (!strncmp(a, "-s", 2) && a[2]) {
            m1c_overrides_add(&ov, a + 2); /* -skey=value */
        } else if (!strcmp(a, "--no-plugins")) {
            no_plugins = 1;
        } else if (a[0] == '-') {
            m1c_overrides_free(&ov);
            return m1c_cli_error("config show: unknown option '%s' (see m1c config show --help)", a);
        } else if (!path) {
            path = a;
        } else {
            m1c_overrides_free(&ov);
            return m1c_cli_error("config show: one CONFIG only, got '%s' and '%s'", path, a);
        }
    }
    if (!path) {
        m1c_overrides_free(&ov);
        fputs(usage, stderr);
        return m1c_cli_error("config show: no CONFIG given");
    }

    m1c_err e;
    m1c_config *c = NULL;
    m1c_spec spec;
    m1c_registry reg;
    int have_spec = 0, have_reg = 0;
    if (m1c_config_load(&c, path, ov.items, ov.n, &e)) goto done;
    if (m1c_spec_read(&spec, c, &e)) goto done;
    have_spec = 1;
    if (!no_plugins) {
        m1c_registry_init(&reg);
        have_reg = 1;
        if (m1c_spec_check_plugins(&spec, &reg, &e)) goto done;
    }
    printf("# m1c config show %s: the resolved configuration, defaults filled in\n", path);
    if (no_plugins)
        printf("# plugin groups as written (--no-plugins): their defaults are not shown\n");
    else if (spec.model.vocab_size)
        printf("# model.vocab_size resolves to %lld\n", (long long)spec.model.vocab_size);
    if (m1c_config_write(c, stdout) || fflush(stdout)) {
        m1c_fail(&e, "config show: cannot write the output");
        goto done;
    }
    rc = 0;
done:
    if (rc) m1c_cli_error("%s", e.msg);
    if (have_spec) m1c_spec_free(&spec);
    if (have_reg) m1c_registry_free(&reg);
    m1c_config_free(c);
    m1c_overrides_free(&ov);
    return rc;
}
