/* Tests of the m1c command as a process (fork/exec of the build tree's binary, stdout and stderr
 * captured separately): help texts, error exits, train -> generate, logits against an in-process
 * forward, ablate, plugins. Configs: tests/data/train/. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/model.h"
#include "../core/npy.h"
#include "../core/session.h"
#include "harness.h"

#define DATA M1C_SOURCE_DIR "/tests/data/train/"

/* ---- helpers ---------------------------------------------------------------------------------- */

typedef struct proc {
    int status; /* exit status, -1 if killed by a signal */
    char *out, *err;
} proc;

/* The test's scratch folder (th_tmpdir): made by the suite's init, removed by its fini. */
static void setup(void) {
    th_tmpdir_init("cli");
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1); /* for the in-process session of the logits test */
}

TestSuite(cli, .init = setup, .fini = th_tmpdir_fini);

/* Run m1c with the given arguments (NULL-terminated), stdout and stderr captured. */
static proc run_argv(const char *const *args) {
    proc p;
    p.status = th_run_m1c(args, &p.out, &p.err);
    return p;
}

#define RUN(...) run_argv((const char *const[]){__VA_ARGS__, NULL})

static void proc_free(proc *p) { free(p->out), free(p->err); }

/* A failure the way every command reports one: exit status 1 and one line "m1c: ..." on stderr. */
static void assert_one_line_error(const proc *p) {
    cr_assert_eq(p->status, 1, "exit status %d; stderr: %s", p->status, p->err);
    cr_assert(!strncmp(p->err, "m1c: ", 5), "stderr does not start with 'm1c: ': %s", p->err);
    const char *nl = strchr(p->err, '\n');
    cr_assert(nl && nl[1] == 0, "stderr is not exactly one line: %s", p->err);
}

/* `m1c train math.cfg` for `steps` steps into <scratch>/<name>; returns the checkpoint directory. */
static char *train(const char *name, int steps) {
    char *out = th_tmpdir_path(name);
    char *od = m1c_xasprintf("run.out_dir=\"%s\"", out);
    char *st = m1c_xasprintf("run.stages.0.steps=%d", steps);
    proc p = RUN("train", DATA "math.cfg", "-s", od, "-s", st, "--quiet");
    cr_assert_eq(p.status, 0, "m1c train failed: %s", p.err);
    char *ck = m1c_xasprintf("%s/pretrain/step-%06d", out, steps);
    char *mp = m1c_path_join(ck, "model.safetensors");
    cr_assert(m1c_file_exists(mp), "no %s; stderr: %s", mp, p.err);
    proc_free(&p);
    free(mp), free(st), free(od), free(out);
    return ck;
}

/* ---- help and errors ----------------------------------------------------------------------------- */

Test(cli, help) {
    proc p = RUN("--help");
    cr_assert_eq(p.status, 0);
    th_assert_has(p.out, "usage");
    proc_free(&p);
    static const char *const cmds[] = {"plugins", "config", "plan", "train", "generate", "logits", "ablate"};
    for (int i = 0; i < 7; i++) {
        p = RUN(cmds[i], "--help");
        cr_assert_eq(p.status, 0, "m1c %s --help: exit %d, stderr %s", cmds[i], p.status, p.err);
        th_assert_has(p.out, "usage");
        char *want = m1c_xasprintf("m1c %s", cmds[i]);
        th_assert_has(p.out, want); /* the usage of that command, not the general one */
        free(want);
        proc_free(&p);
    }
}

Test(cli, errors_are_one_line) {
    proc p = RUN("frobnicate");
    assert_one_line_error(&p);
    th_assert_has(p.err, "frobnicate");
    proc_free(&p);

    p = RUN("--frobnicate");
    assert_one_line_error(&p);
    th_assert_has(p.err, "--frobnicate");
    proc_free(&p);

    p = RUN("train", DATA "math.cfg", "--frobnicate");
    assert_one_line_error(&p);
    th_assert_has(p.err, "--frobnicate");
    proc_free(&p);

    p = RUN("train", "/nonexistent/m1c.cfg");
    assert_one_line_error(&p);
    th_assert_has(p.err, "/nonexistent/m1c.cfg");
    proc_free(&p);

    p = RUN("train");
    assert_one_line_error(&p);
    proc_free(&p);

    p = RUN("plan", "/nonexistent/m1c.cfg");
    assert_one_line_error(&p);
    th_assert_has(p.err, "/nonexistent/m1c.cfg");
    proc_free(&p);

    p = RUN("generate", "--checkpoint", "/nonexistent/ck", "--prompt", "x");
    assert_one_line_error(&p);
    th_assert_has(p.err, "/nonexistent/ck");
    proc_free(&p);

    p = RUN("logits", "--checkpoint", "/nonexistent/ck", "--input", "a.npy", "--output", "b.npy");
    assert_one_line_error(&p);
    th_assert_has(p.err, "/nonexistent/ck");
    proc_free(&p);
}

Test(cli, config_show_typo) {
    proc p = RUN("config", "show", DATA "typo.cfg");
    assert_one_line_error(&p);
    th_assert_has(p.err, "typo.cfg:5:"); /* file:line of `hiden = 32;` */
    th_assert_has(p.err, "model.hiden");
    cr_assert_eq(p.out[0], 0, "nothing on stdout: %s", p.out);
    proc_free(&p);
}

/* ---- train, generate, logits ----------------------------------------------------------------------- */

Test(cli, train_then_generate) {
    char *ck = train("run", 3);
    const char *prompt = "Q: 1+1=?";
    proc g1 = RUN("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new", "10", "--greedy");
    cr_assert_eq(g1.status, 0, "stderr: %s", g1.err);
    cr_assert(!strncmp(g1.out, prompt, strlen(prompt)), "output does not start with the prompt: %s", g1.out);
    /* 3 steps leave the model close to uniform over 259 tokens: end-of-text first is unlikely, and
     * greedy decoding is deterministic, so this either always holds or never. */
    cr_assert_gt(strlen(g1.out), strlen(prompt) + 1, "no generated text: '%s'", g1.out);
    proc g2 = RUN("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new", "10", "--greedy");
    cr_assert_eq(g2.status, 0);
    cr_assert_str_eq(g1.out, g2.out, "greedy decoding differs between runs");

    /* Sampling reproduces with a seed and (almost surely) changes with another: 10 tokens from a
     * near-uniform distribution over 259 tokens coincide with probability ~259^-10. */
    proc s1 = RUN("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new", "10", "--temperature", "0.9",
                  "--seed", "5");
    proc s2 = RUN("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new", "10", "--temperature", "0.9",
                  "--seed", "5");
    proc s3 = RUN("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new", "10", "--temperature", "0.9",
                  "--seed", "6");
    cr_assert_eq(s1.status, 0, "stderr: %s", s1.err);
    cr_assert_str_eq(s1.out, s2.out, "the same seed gave different samples");
    cr_assert_str_neq(s1.out, s3.out, "seeds 5 and 6 gave the same sample");
    proc_free(&g1), proc_free(&g2), proc_free(&s1), proc_free(&s2), proc_free(&s3);
    free(ck);
}

/* `m1c logits` equals an in-process forward of the same checkpoint. Tolerance 1e-5 absolute: the
 * same code on the same parameters; only the thread partition of reductions could differ between
 * the two processes (logits here are O(1)), which moves results by float rounding, ~1e-7. */
Test(cli, logits_match_in_process_forward) {
    char *ck = train("run", 2);
    enum { B = 2, T = 12 };
    int32_t ids[B * T];
    for (int i = 0; i < B * T; i++) ids[i] = (int32_t)((i * 37 + 11) % 256); /* byte tokens */
    char *in = th_tmpdir_path("ids.npy"), *out = th_tmpdir_path("logits.npy");
    m1c_err e = {{0}};
    cr_assert_eq(m1c_npy_write_i32(in, ids, 2, (int64_t[]){B, T}, &e), M1C_OK, "%s", e.msg);
    proc p = RUN("logits", "--checkpoint", ck, "--input", in, "--output", out);
    cr_assert_eq(p.status, 0, "stderr: %s", p.err);
    proc_free(&p);

    m1c_npy a;
    cr_assert_eq(m1c_npy_read(out, &a, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(a.dtype, M1C_NPY_F32);
    cr_assert_eq(a.ndim, 3);

    m1c_session s;
    cr_assert_eq(m1c_session_open_checkpoint(&s, ck, NULL, 0, &e), M1C_OK, "%s", e.msg);
    int V = s.model.V;
    cr_assert_eq(a.shape[0], B);
    cr_assert_eq(a.shape[1], T);
    cr_assert_eq(a.shape[2], V);
    int32_t tokens[B * (T + 1)];
    for (int b = 0; b < B; b++) {
        memcpy(tokens + b * (T + 1), ids + b * T, T * sizeof *ids);
        tokens[b * (T + 1) + T] = -1; /* no target after the last position */
    }
    m1c_run r;
    cr_assert_eq(m1c_run_init(&r, &s.model, B, T, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_model_forward(&s.model, &r, tokens, &e), M1C_OK, "%s", e.msg);
    const float *got = a.data;
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < (int64_t)B * T * V; i++) {
        double d = fabs((double)got[i] - r.logits[i]);
        if (d > worst) worst = d;
        if (fabs(r.logits[i]) > scale) scale = fabs(r.logits[i]);
    }
    cr_assert_gt(scale, 0, "logits all zero");
    cr_assert_leq(worst, 1e-5, "max |m1c logits - in-process forward| = %g", worst);
    m1c_run_free(&r, &s.model);
    m1c_session_close(&s);
    m1c_npy_free(&a);
    free(in), free(out), free(ck);
}

/* ---- ablate, plugins -------------------------------------------------------------------------------- */

Test(cli, ablate_two_runs) {
    char *dir = th_tmpdir_path("ablate");
    proc p = RUN("ablate", DATA "math.cfg", "--grid", "model.ffn.plugin=topk,dense", "-s", "run.stages.0.steps=2",
                 "--out", dir);
    cr_assert_eq(p.status, 0, "stderr: %s", p.err);
    /* A header and one row per run, with numbers (a failed run prints "failed"). */
    th_assert_has(p.out, "val_loss");
    static const char *const rows[] = {"plugin=topk ", "plugin=dense "};
    for (int i = 0; i < 2; i++) {
        const char *row = strstr(p.out, rows[i]);
        cr_assert_not_null(row, "no row %s in: %s", rows[i], p.out);
        double loss = 0;
        cr_assert_eq(sscanf(row + strlen(rows[i]), "%lf", &loss), 1, "row %s has no loss: %s", rows[i], p.out);
        cr_assert(loss > 0 && isfinite(loss), "row %s: loss %g", rows[i], loss);
    }
    proc_free(&p);
    char *jl = m1c_path_join(dir, "ablate.jsonl");
    char *text = th_slurp(jl, NULL);
    int lines = 0;
    for (char *s = text; (s = strchr(s, '\n')); s++) lines++;
    cr_assert_eq(lines, 2, "%s: %s", jl, text);
    th_assert_has(text, "\"stage\":\"plugin=topk\"");
    th_assert_has(text, "\"stage\":\"plugin=dense\"");
    th_assert_has(text, "\"ok\":1");
    cr_assert_null(strstr(text, "\"ok\":0"), "a run failed: %s", text);
    free(text), free(jl), free(dir);
}

Test(cli, plugins_lists_every_kind) {
    proc p = RUN("plugins");
    cr_assert_eq(p.status, 0, "stderr: %s", p.err);
    static const char *const want[][2] = {{"attention", "lightning"}, {"attention", "softmax"}, {"moe", "topk"},
                                          {"moe", "dense"},           {"optimizer", "adamw"},   {"objective", "xent"},
                                          {"objective", "cispo"},     {"data", "text"},         {"data", "synth-math"}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int found = 0;
        for (char *line = p.out; line && *line && !found;) {
            char kind[64], name[64];
            if (sscanf(line, "%63s %63s", kind, name) == 2 && !strcmp(kind, want[i][0]) && !strcmp(name, want[i][1]))
                found = 1;
            line = strchr(line, '\n');
            if (line) line++;
        }
        cr_assert(found, "no line '%s %s' in: %s", want[i][0], want[i][1], p.out);
    }
    proc_free(&p);
}
