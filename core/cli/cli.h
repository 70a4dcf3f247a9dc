/* The m1c command: one function per subcommand, each taking its own argv (argv[0] = subcommand). */
#ifndef M1C_CLI_H
#define M1C_CLI_H

int m1c_cmd_plugins(int argc, char **argv); /* core/cli/cmd_plugins.c */
int m1c_cmd_config(int argc, char **argv);  /* core/cli/cmd_config.c: `config show` */
int m1c_cmd_plan(int argc, char **argv);    /* core/cli/cmd_plan.c */
int m1c_cmd_train(int argc, char **argv);   /* core/cli/cmd_train.c */
int m1c_cmd_generate(int argc, char **argv);
int m1c_cmd_logits(int argc, char **argv);
int m1c_cmd_ablate(int argc, char **argv);
int m1c_cmd_import_hf(int argc, char **argv); /* core/cli/cmd_hf.c */
int m1c_cmd_export_hf(int argc, char **argv);

/* Shared option handling: `-s key=value` overrides collected into a list. */
typedef struct m1c_overrides {
    const char **items;
    int n, cap;
} m1c_overrides;
void m1c_overrides_add(m1c_overrides *o, const char *kv);
void m1c_overrides_free(m1c_overrides *o);

/* Print "m1c: <msg>" to stderr and return the exit status 1. */
int m1c_cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
