/* The m1c command: dispatches to one function per subcommand. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../log.h"
#include "../util.h"
#include "cli.h"

typedef struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    {"plugins", m1c_cmd_plugins, "list the plugins found: kind, name, version, path"},
    {"config", m1c_cmd_config, "config show CONFIG: print the resolved configuration, defaults filled in"},
    {"plan", m1c_cmd_plan, "parameters, FLOPs per token and memory of a model, without allocating it"},
    {"train", m1c_cmd_train, "run the stages of a config (pre-training, SFT)"},
    {"generate", m1c_cmd_generate, "sample text (or token ids) from a checkpoint or a Hugging Face model"},
    {"logits", m1c_cmd_logits, "write the logits of a checkpoint or a Hugging Face model for token ids (.npy)"},
    {"ablate", m1c_cmd_ablate, "train every combination of settings and tabulate the results"},
    {"import-hf", m1c_cmd_import_hf, "convert a Hugging Face MiniMax checkpoint into an m1c checkpoint"},
    {"export-hf", m1c_cmd_export_hf, "write an m1c checkpoint as a Hugging Face MiniMax checkpoint"},
};

static void usage(FILE *f) {
    fprintf(f,
            "m1c %s: build, train and study MiniMax-M1-style hybrid attention MoE models\n\n"
            "usage: m1c [--log LEVEL] COMMAND [ARGS...]\n\ncommands:\n",
            M1C_VERSION);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n'm1c COMMAND --help' describes a command. Options common to commands that read a config:\n"
               "  -s key.path=value   override any setting (repeatable), e.g. -s model.hidden=512\n"
               "--log LEVEL: error, warn, info (default) or debug (also the M1C_LOG variable).\n"
               "Plugins are searched in the config's folder, M1C_PLUGIN_PATH, then the install's plugin folder.\n");
}

int m1c_cli_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("m1c: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

void m1c_overrides_add(m1c_overrides *o, const char *kv) {
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 8;
        o->items = m1c_xrealloc(o->items, (size_t)o->cap * sizeof *o->items);
    }
    o->items[o->n++] = kv;
}

void m1c_overrides_free(m1c_overrides *o) {
    free(o->items);
    memset(o, 0, sizeof *o);
}

int main(int argc, char **argv) {
    int i = 1;
    while (i < argc && argv[i][0] == '-') {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--version")) {
            printf("m1c %s (plugin ABI %d.%d)\n", M1C_VERSION, M1C_ABI_MAJOR, M1C_ABI_MINOR);
            return 0;
        } else if (!strcmp(argv[i], "--log") && i + 1 < argc) {
            static const char *const levels[] = {"error", "warn", "info", "debug"};
            int level = -1;
            for (int l = 0; l < 4; l++)
                if (!strcmp(argv[i + 1], levels[l])) level = l;
            if (level < 0) return m1c_cli_error("--log: expected error, warn, info or debug, got '%s'", argv[i + 1]);
            m1c_log_set_level(level);
            i += 2;
        } else {
            return m1c_cli_error("unknown option '%s' (see m1c --help)", argv[i]);
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 1;
    }
    for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++)
        if (!strcmp(argv[i], commands[c].name)) return commands[c].run(argc - i, argv + i);
    return m1c_cli_error("unknown command '%s' (see m1c --help)", argv[i]);
}
