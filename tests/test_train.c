/* Tests of the stage runner (core/train.c) with checkpoints (core/checkpoint.c) and data mixtures
 * (core/datamix.c), in-process: exact resume (within a stage and across a stage boundary), the loss
 * falling, checkpoint contents and pruning, refusals of bad checkpoints, the LR schedule, metrics.jsonl.
 * Configs: tests/data/train/ (tiny hybrids, synth-math and text data, seconds per test). */
#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/arena.h"
#include "../core/checkpoint.h"
#include "../core/log.h"
#include "../core/safetensors.h"
#include "../core/session.h"
#include "../core/train.h"
#include "harness.h"

#define DATA M1C_SOURCE_DIR "/tests/data/train/"

#include <jansson.h>

/* ---- helpers ---------------------------------------------------------------------------------- */

/* Each test's scratch folder (th_tmpdir): made by the suite's init, removed by its fini (also after a
 * failure). */
static void init(void) {
    th_tmpdir_init("train");
    setenv("M1C_PLUGIN_PATH", M1C_TEST_PLUGIN_DIR, 1);
    m1c_log_set_level(M1C_LOG_WARN); /* no per-checkpoint info lines */
}

TestSuite(train, .init = init, .fini = th_tmpdir_fini);

/* A fresh folder in the scratch folder (malloc'd path). */
static char *make_tmpdir(void) { return th_mkdtemp(th_tmpdir(), "run"); }

/* Count entries under path (recursively) whose name contains `needle`. */
static int count_named(const char *path, const char *needle) {
    DIR *d = opendir(path);
    if (!d) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (strstr(de->d_name, needle)) n++;
        char *p = m1c_path_join(path, de->d_name);
        n += count_named(p, needle);
        free(p);
    }
    closedir(d);
    return n;
}

static void assert_same_file(const char *a, const char *b) {
    long na, nb;
    char *x = th_slurp(a, &na), *y = th_slurp(b, &nb);
    cr_assert_eq(na, nb, "%s (%ld bytes) and %s (%ld bytes) differ in size", a, na, b, nb);
    cr_assert(memcmp(x, y, (size_t)na) == 0, "%s and %s differ", a, b);
    free(x), free(y);
}

/* A session on tests/data/train/<name>, read as text (m1c_session_open_text, with the data folder for
 * relative paths), writing under out_dir, with extra overrides. */
static void open_cfg(m1c_session *s, const char *name, const char *out_dir, const char *const *extra, int n_extra) {
    char *path = m1c_xasprintf("%s%s", DATA, name);
    char *text = th_slurp(path, NULL);
    const char *ov[16];
    char *od = m1c_xasprintf("run.out_dir=\"%s\"", out_dir);
    ov[0] = od;
    for (int i = 0; i < n_extra; i++) ov[1 + i] = extra[i];
    m1c_err e = {{0}};
    int rc = m1c_session_open_text(s, text, path, DATA, ov, 1 + n_extra, &e);
    cr_assert_eq(rc, M1C_OK, "%s", e.msg);
    free(od), free(text), free(path);
}

/* Train tests/data/train/<name> into out_dir; asserts success. */
static void train(const char *name, const char *out_dir, const char *const *extra, int n_extra, const char *resume,
                  int64_t max_steps, m1c_train_result *res) {
    m1c_session s;
    open_cfg(&s, name, out_dir, extra, n_extra);
    m1c_train_opts o = {.resume = resume, .quiet = 1, .max_steps = max_steps};
    m1c_err e = {{0}};
    int rc = m1c_train(&s, &o, res, &e);
    m1c_session_close(&s);
    cr_assert_eq(rc, M1C_OK, "%s", e.msg);
}

/* Resume from `resume`, expecting a refusal; the message goes to msg. */
static void train_fails(const char *name, const char *out_dir, const char *resume, char *msg) {
    m1c_session s;
    open_cfg(&s, name, out_dir, NULL, 0);
    m1c_train_opts o = {.resume = resume, .quiet = 1};
    m1c_train_result res;
    m1c_err e = {{0}};
    int rc = m1c_train(&s, &o, &res, &e);
    m1c_session_close(&s);
    cr_assert_eq(rc, M1C_ERR, "resuming from %s should fail", resume);
    cr_assert(e.msg[0], "no message");
    strcpy(msg, e.msg);
}

/* metrics.jsonl as a JSON array of its records (every line must parse). */
static json_t *read_metrics(const char *out_dir) {
    char *p = m1c_xasprintf("%s/metrics.jsonl", out_dir);
    char *text = th_slurp(p, NULL);
    json_t *a = json_array();
    int line = 0;
    for (char *s = text, *nl; *s; s = nl + 1) {
        nl = strchr(s, '\n');
        cr_assert_not_null(nl, "%s: last line has no newline", p);
        *nl = 0;
        line++;
        json_error_t je;
        json_t *o = json_loads(s, 0, &je);
        cr_assert_not_null(o, "%s:%d: not JSON (%s): %s", p, line, je.text, s);
        cr_assert(json_is_object(o), "%s:%d: not an object", p, line);
        json_array_append_new(a, o);
    }
    free(text), free(p);
    return a;
}

/* The records of `stage` with step > after, timing keys removed (they measure the machine, not the
 * arithmetic). */
static json_t *records_after(json_t *all, const char *stage, int64_t after) {
    json_t *out = json_array();
    size_t i;
    json_t *o;
    json_array_foreach(all, i, o) {
        if (strcmp(json_string_value(json_object_get(o, "stage")), stage)) continue;
        if (json_integer_value(json_object_get(o, "step")) <= after) continue;
        json_t *c = json_deep_copy(o);
        json_object_del(c, "tokens_per_s");
        json_object_del(c, "step_s");
        json_array_append_new(out, c);
    }
    return out;
}

static void assert_same_records(json_t *a, json_t *b) {
    cr_assert_eq(json_array_size(a), json_array_size(b), "%zu records vs %zu", json_array_size(a),
                 json_array_size(b));
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *x = json_array_get(a, i), *y = json_array_get(b, i);
        if (!json_equal(x, y)) {
            char *sx = json_dumps(x, JSON_COMPACT), *sy = json_dumps(y, JSON_COMPACT);
            cr_assert_fail("record %zu differs:\n  uninterrupted %s\n  resumed       %s", i, sx, sy);
        }
    }
}

static void assert_same_checkpoint(const char *a, const char *b) {
    static const char *const files[] = {"model.safetensors", "optimizer.safetensors", "trainer.json"};
    for (int i = 0; i < 3; i++) {
        char *x = m1c_path_join(a, files[i]), *y = m1c_path_join(b, files[i]);
        assert_same_file(x, y);
        free(x), free(y);
    }
}

static int dir_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* ---- exact resume ------------------------------------------------------------------------------ */

/* Why bitwise: the resumed run performs the same float operations in the same order as the
 * uninterrupted one (same parameters and optimizer state from the checkpoint, same data rows from the
 * restored source positions and mixing RNG, same router-jitter noise from the per-step seed, same
 * thread count from run.threads, so every reduction keeps its partition). Any difference, even in the
 * last bit, means some state was not saved or restored. */
Test(train, resume_with_mixture_is_bitwise_exact) {
    char *root = make_tmpdir();
    char *a = m1c_path_join(root, "a"), *b = m1c_path_join(root, "b");
    m1c_train_result ra, rb1, rb2;
    train("mix.cfg", a, NULL, 0, NULL, 0, &ra); /* 12 steps straight */
    cr_assert_eq(ra.steps, 12);

    train("mix.cfg", b, NULL, 0, NULL, 5, &rb1); /* 5 steps, checkpoint, stop */
    cr_assert_eq(rb1.steps, 5);
    char *ck5 = m1c_xasprintf("%s/pretrain/step-000005", b);
    cr_assert_str_eq(rb1.last_checkpoint, ck5);
    char *ck12b = m1c_xasprintf("%s/pretrain/step-000012", b);
    cr_assert(!dir_exists(ck12b), "max_steps = 5 should stop before step 12");

    train("mix.cfg", b, NULL, 0, ck5, 0, &rb2); /* steps 6..12 */
    cr_assert_eq(rb2.steps, 12);
    cr_assert(memcmp(&ra.last_loss, &rb2.last_loss, sizeof(double)) == 0, "last loss %.17g vs %.17g", ra.last_loss,
              rb2.last_loss);
    cr_assert(memcmp(&ra.last_val_loss, &rb2.last_val_loss, sizeof(double)) == 0, "last val loss %.17g vs %.17g",
              ra.last_val_loss, rb2.last_val_loss);

    /* metrics.jsonl of b holds steps 0..5 of the first invocation, then 6..12 of the resumed one. */
    json_t *ma = read_metrics(a), *mb = read_metrics(b);
    json_t *xa = records_after(ma, "pretrain", 5), *xb = records_after(mb, "pretrain", 5);
    cr_assert_eq(json_array_size(xa), 7 + 2, "7 step records and evaluations at 8 and 12");
    assert_same_records(xa, xb);
    json_decref(xa), json_decref(xb);
    /* The first five steps of b are those of a too (same seed, nothing restored yet). */
    xa = records_after(ma, "pretrain", 0), xb = records_after(mb, "pretrain", 0);
    json_t *a5 = json_array(), *b5 = json_array();
    for (size_t i = 0; i < json_array_size(xa); i++) {
        json_t *o = json_array_get(xa, i);
        if (json_integer_value(json_object_get(o, "step")) <= 5) json_array_append(a5, o);
    }
    for (size_t i = 0; i < json_array_size(xb); i++) {
        json_t *o = json_array_get(xb, i);
        if (json_integer_value(json_object_get(o, "step")) <= 5) json_array_append(b5, o);
    }
    assert_same_records(a5, b5);
    json_decref(a5), json_decref(b5), json_decref(xa), json_decref(xb);
    json_decref(ma), json_decref(mb);

    /* Parameters, optimizer state and sidecar (loss to 17 digits, data position) byte for byte. */
    char *ck12a = m1c_xasprintf("%s/pretrain/step-000012", a);
    assert_same_checkpoint(ck12a, ck12b);

    free(ck5), free(ck12a), free(ck12b);
    m1c_remove_tree(root);
    free(a), free(b), free(root);
}

/* Stage 1 ends with a checkpoint; the resumed run starts stage 2 from it (fresh optimizer and data of
 * stage 2, parameters of stage 1) exactly as the uninterrupted run does. */
Test(train, resume_across_stage_boundary) {
    char *root = make_tmpdir();
    char *a = m1c_path_join(root, "a"), *b = m1c_path_join(root, "b");
    m1c_train_result ra, rb1, rb2;
    train("two_stage.cfg", a, NULL, 0, NULL, 0, &ra);
    train("two_stage.cfg", b, NULL, 0, NULL, 5, &rb1); /* exactly the 5 steps of stage "warm" */
    char *ck = m1c_xasprintf("%s/warm/step-000005", b);
    cr_assert_str_eq(rb1.last_checkpoint, ck);
    char *sft_b = m1c_xasprintf("%s/sft", b);
    cr_assert(!dir_exists(sft_b), "the first invocation should stop before stage 'sft'");
    train("two_stage.cfg", b, NULL, 0, ck, 0, &rb2);
    cr_assert(memcmp(&ra.last_loss, &rb2.last_loss, sizeof(double)) == 0, "last loss %.17g vs %.17g", ra.last_loss,
              rb2.last_loss);

    json_t *ma = read_metrics(a), *mb = read_metrics(b);
    json_t *xa = records_after(ma, "sft", -1), *xb = records_after(mb, "sft", -1);
    cr_assert_eq(json_array_size(xa), 1 + 6 + 2, "unigram record, 6 steps, evaluations at 3 and 6");
    assert_same_records(xa, xb);
    json_decref(xa), json_decref(xb), json_decref(ma), json_decref(mb);

    char *fa = m1c_xasprintf("%s/sft/step-000006", a), *fb = m1c_xasprintf("%s/sft/step-000006", b);
    assert_same_checkpoint(fa, fb);
    free(fa), free(fb), free(ck), free(sft_b);
    m1c_remove_tree(root);
    free(a), free(b), free(root);
}

/* opts.max_steps counts the steps of the invocation (m1c_train_opts: "stop after this many steps in
 * this invocation"), across stages: 7 steps = the 5 of "warm" and 2 of "sft". */
Test(train, max_steps_counts_across_stages) {
    char *root = make_tmpdir();
    m1c_train_result r;
    train("two_stage.cfg", root, NULL, 0, NULL, 7, &r);
    char *ck2 = m1c_xasprintf("%s/sft/step-000002", root), *ck6 = m1c_xasprintf("%s/sft/step-000006", root);
    cr_assert(!dir_exists(ck6), "max_steps = 7 ran stage 'sft' to its end (step 6)");
    cr_assert(dir_exists(ck2), "max_steps = 7 should stop with a checkpoint at sft step 2");
    cr_assert_str_eq(r.last_checkpoint, ck2);
    free(ck2), free(ck6);
    m1c_remove_tree(root);
    free(root);
}

/* ---- learning --------------------------------------------------------------------------------- */

/* 40 steps on synth-math bring the validation loss well below the unigram entropy of the data (the
 * loss of the best context-free model): the network uses context. Measured over seeds 1-6: val loss
 * 1.49-1.58 nats against an entropy of 3.02, so a margin of 1 nat is reliable and still demands
 * context (a unigram model cannot go below the entropy at all). */
Test(train, loss_falls_below_unigram_entropy) {
    char *root = make_tmpdir();
    m1c_train_result r;
    train("math.cfg", root, NULL, 0, NULL, 0, &r);
    json_t *m = read_metrics(root);
    json_t *first = json_array_get(m, 0);
    cr_assert_eq(json_integer_value(json_object_get(first, "step")), 0);
    double h = json_real_value(json_object_get(first, "unigram_entropy"));
    cr_assert(h > 2.0 && h < 5.6, "unigram entropy %g: expected between 2 nats and log(259)", h);
    double val = NAN;
    size_t i;
    json_t *o;
    json_array_foreach(m, i, o) {
        if (json_object_get(o, "val_loss") && json_integer_value(json_object_get(o, "step")) == 40)
            val = json_real_value(json_object_get(o, "val_loss"));
    }
    cr_assert(isfinite(val), "no validation loss at step 40");
    cr_assert(fabs(val - r.last_val_loss) < 1e-6 * val, "metrics %g vs result %g (7 digits in the file)", val,
              r.last_val_loss);
    cr_assert(val < h - 1.0, "validation loss %g not clearly below the unigram entropy %g", val, h);
    json_decref(m);
    m1c_remove_tree(root);
    free(root);
}

/* ---- checkpoints --------------------------------------------------------------------------------- */

Test(train, checkpoint_contents_and_keep) {
    char *root = make_tmpdir();
    const char *ov[] = {"run.stages.0.steps=6", "run.stages.0.checkpoint.every=2", "run.stages.0.checkpoint.keep=2"};
    m1c_train_result r;
    train("math.cfg", root, ov, 3, NULL, 0, &r);
    char *dir = m1c_xasprintf("%s/pretrain/step-000006", root);
    cr_assert_str_eq(r.last_checkpoint, dir);
    /* keep = 2: steps 4 and 6 remain, step 2 was pruned. */
    char *d2 = m1c_xasprintf("%s/pretrain/step-000002", root), *d4 = m1c_xasprintf("%s/pretrain/step-000004", root);
    cr_assert(!dir_exists(d2), "step 2 should have been pruned (keep = 2)");
    cr_assert(dir_exists(d4));
    cr_assert_eq(count_named(root, ".tmp."), 0, "temporary files left under %s", root);

    static const char *const files[] = {"model.safetensors", "optimizer.safetensors", "trainer.json", "m1c.cfg"};
    for (int i = 0; i < 4; i++) {
        char *p = m1c_path_join(dir, files[i]);
        cr_assert(m1c_file_exists(p), "%s missing", p);
        free(p);
    }

    /* Hugging Face MiniMax names. */
    m1c_st_file f;
    m1c_err e = {{0}};
    char *mp = m1c_path_join(dir, "model.safetensors");
    cr_assert_eq(m1c_st_open(&f, mp, &e), M1C_OK, "%s", e.msg);
    static const char *const names[] = {"model.embed_tokens.weight",
                                        "model.layers.0.input_layernorm.weight",
                                        "model.layers.0.self_attn.qkv_proj.weight",
                                        "model.layers.0.post_attention_layernorm.weight",
                                        "model.layers.0.mlp.gate.weight",
                                        "model.layers.1.self_attn.q_proj.weight",
                                        "model.layers.1.mlp.gate.weight",
                                        "model.norm.weight",
                                        "lm_head.weight"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        cr_assert_not_null(m1c_st_find(&f, names[i]), "%s: no tensor %s", mp, names[i]);
    const m1c_st_tensor *emb = m1c_st_find(&f, "model.embed_tokens.weight");
    cr_assert_eq(emb->ndim, 2);
    cr_assert_eq(emb->shape[1], 32, "hidden = 32");
    int n_model = m1c_st_count(&f);
    m1c_st_close(&f);

    /* Optimizer state: "<parameter>.<state>", two AdamW moments per parameter. */
    char *op = m1c_path_join(dir, "optimizer.safetensors");
    cr_assert_eq(m1c_st_open(&f, op, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_count(&f), 2 * n_model);
    cr_assert_not_null(m1c_st_find(&f, "model.embed_tokens.weight.exp_avg"));
    cr_assert_not_null(m1c_st_find(&f, "lm_head.weight.exp_avg_sq"));
    m1c_st_close(&f);

    /* The sidecar. */
    m1c_ckpt_info info;
    cr_assert_eq(m1c_ckpt_read_info(dir, &info, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(info.stage, 0);
    cr_assert_str_eq(info.stage_name, "pretrain");
    cr_assert_eq(info.step, 6);
    cr_assert_eq(info.seed, 3, "run.seed of math.cfg");
    cr_assert_gt(info.data_position_len, 8);
    m1c_ckpt_info_free(&info);

    /* m1c.cfg rebuilds the model, and the loaded parameters are the saved ones. */
    m1c_session s;
    cr_assert_eq(m1c_session_open_checkpoint(&s, dir, NULL, 0, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_st_open(&f, mp, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(s.model.params.n, n_model);
    for (int i = 0; i < s.model.params.n; i++) {
        const m1c_tensor *t = &s.model.params.t[i];
        const m1c_st_tensor *st = m1c_st_find(&f, t->name);
        cr_assert_not_null(st, "%s", t->name);
        cr_assert_eq(st->nbytes, (uint64_t)m1c_numel(t) * sizeof(float));
        cr_assert(memcmp(st->data, t->data, st->nbytes) == 0, "%s differs after loading", t->name);
    }
    m1c_st_close(&f);
    m1c_session_close(&s);

    free(mp), free(op), free(d2), free(d4), free(dir);
    m1c_remove_tree(root);
    free(root);
}

/* A tied head is stored once, as the embedding. */
Test(train, checkpoint_tied_head_stored_once) {
    char *root = make_tmpdir();
    const char *ov[] = {"run.stages.0.steps=1", "model.tie_embeddings=true"};
    m1c_train_result r;
    train("math.cfg", root, ov, 2, NULL, 0, &r);
    char *mp = m1c_path_join(r.last_checkpoint, "model.safetensors");
    m1c_st_file f;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_st_open(&f, mp, &e), M1C_OK, "%s", e.msg);
    cr_assert_not_null(m1c_st_find(&f, "model.embed_tokens.weight"));
    cr_assert_null(m1c_st_find(&f, "lm_head.weight"));
    m1c_st_close(&f);
    free(mp);
    m1c_remove_tree(root);
    free(root);
}

/* keep = 2 keeps the newest two checkpoints also when the last step is not a multiple of `every`:
 * steps 2, 4, 6 and the final 7 are written, 6 and 7 must remain. */
Test(train, checkpoint_keep_with_final_off_grid) {
    char *root = make_tmpdir();
    const char *ov[] = {"run.stages.0.steps=7", "run.stages.0.checkpoint.every=2", "run.stages.0.checkpoint.keep=2"};
    m1c_train_result r;
    train("math.cfg", root, ov, 3, NULL, 0, &r);
    char *pre = m1c_xasprintf("%s/pretrain", root);
    int n = count_named(pre, "step-");
    cr_assert_eq(n, 2, "keep = 2 but %d checkpoints remain under %s", n, pre);
    free(pre);
    m1c_remove_tree(root);
    free(root);
}

/* ---- bad checkpoints ------------------------------------------------------------------------------ */

/* One good 2-step checkpoint of math.cfg to damage; returns its directory. */
static char *good_checkpoint(const char *root) {
    const char *ov[] = {"run.stages.0.steps=2"};
    m1c_train_result r;
    train("math.cfg", root, ov, 1, NULL, 0, &r);
    return m1c_xstrdup(r.last_checkpoint);
}

static void rewrite_sidecar(const char *dir, const char *key, json_t *value) {
    char *p = m1c_path_join(dir, "trainer.json");
    json_error_t je;
    json_t *o = json_load_file(p, 0, &je);
    cr_assert_not_null(o, "%s", je.text);
    json_object_set_new(o, key, value);
    cr_assert_eq(json_dump_file(o, p, JSON_INDENT(2)), 0);
    json_decref(o);
    free(p);
}

Test(train, resume_without_sidecar) {
    char *root = make_tmpdir();
    char *empty = m1c_path_join(root, "empty");
    cr_assert_eq(mkdir(empty, 0755), 0);
    char msg[1024];
    train_fails("math.cfg", root, empty, msg);
    char *want = m1c_path_join(empty, "trainer.json");
    th_assert_has(msg, want);
    free(want), free(empty);
    m1c_remove_tree(root);
    free(root);
}

Test(train, resume_truncated_model) {
    char *root = make_tmpdir();
    char *ck = good_checkpoint(root);
    char *mp = m1c_path_join(ck, "model.safetensors");
    struct stat st;
    cr_assert_eq(stat(mp, &st), 0);
    cr_assert_eq(truncate(mp, st.st_size / 2), 0);
    char msg[1024];
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, mp);
    free(mp), free(ck);
    m1c_remove_tree(root);
    free(root);
}

Test(train, resume_truncated_optimizer) {
    char *root = make_tmpdir();
    char *ck = good_checkpoint(root);
    char *op = m1c_path_join(ck, "optimizer.safetensors");
    struct stat st;
    cr_assert_eq(stat(op, &st), 0);
    cr_assert_eq(truncate(op, st.st_size - 4), 0);
    char msg[1024];
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, op);
    free(op), free(ck);
    m1c_remove_tree(root);
    free(root);
}

Test(train, resume_unknown_stage) {
    char *root = make_tmpdir();
    char *ck = good_checkpoint(root);
    char msg[1024];
    rewrite_sidecar(ck, "stage_name", json_string("no-such-stage"));
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, ck); /* the checkpoint ... */
    th_assert_has(msg, "no-such-stage");
    th_assert_has(msg, "math.cfg"); /* ... and the config that lacks the stage */
    /* The right name at an index past the config's stages. */
    rewrite_sidecar(ck, "stage_name", json_string("pretrain"));
    rewrite_sidecar(ck, "stage", json_integer(3));
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, ck);
    th_assert_has(msg, "pretrain");
    free(ck);
    m1c_remove_tree(root);
    free(root);
}

Test(train, resume_corrupt_sidecar) {
    char *root = make_tmpdir();
    char *ck = good_checkpoint(root);
    char *tj = m1c_path_join(ck, "trainer.json");
    char msg[1024];
    rewrite_sidecar(ck, "data_position", json_string("not*base64"));
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, tj);
    th_assert_has(msg, "data_position");
    rewrite_sidecar(ck, "data_position", json_string("AAAA")); /* valid base64, not a mixture position */
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, "data position");
    FILE *f = fopen(tj, "w");
    fputs("{ \"format\": 1, \"stage\": ", f); /* cut short */
    fclose(f);
    train_fails("math.cfg", root, ck, msg);
    th_assert_has(msg, tj);
    free(tj), free(ck);
    m1c_remove_tree(root);
    free(root);
}

/* ---- learning-rate schedule ------------------------------------------------------------------------ */

/* Values computed by hand from docs/config.md's definition: linear warmup 0 -> lr over `warmup` steps,
 * then decay from lr to min_lr over the remaining steps (p = (step - warmup) / (steps - warmup)). The
 * tolerance 1e-15 relative covers double rounding of these few operations, nothing more. */
static void assert_lr(const m1c_schedule_spec *sc, int64_t step, int64_t steps, double want) {
    double got = m1c_schedule_lr(sc, step, steps);
    cr_assert(fabs(got - want) <= 1e-15 * fabs(want) + 1e-20, "step %lld of %lld: lr %.17g, want %.17g",
              (long long)step, (long long)steps, got, want);
}

Test(train, schedule_values) {
    m1c_schedule_spec sc = {1e-3, 1e-4, 10, M1C_DECAY_COSINE, 1.0};
    /* warmup: step/10 of the peak */
    assert_lr(&sc, 1, 110, 1e-4);
    assert_lr(&sc, 5, 110, 5e-4);
    assert_lr(&sc, 10, 110, 1e-3);
    /* cosine over steps 10..110: p = 1/4, 1/2, 1 */
    assert_lr(&sc, 35, 110, 1e-4 + 9e-4 * 0.5 * (1.0 + 0.70710678118654752));
    assert_lr(&sc, 60, 110, 5.5e-4);
    assert_lr(&sc, 110, 110, 1e-4);
    /* linear: lr - (lr - min_lr) p */
    sc.decay = M1C_DECAY_LINEAR;
    assert_lr(&sc, 35, 110, 7.75e-4);
    assert_lr(&sc, 85, 110, 3.25e-4);
    assert_lr(&sc, 110, 110, 1e-4);
    /* constant after warmup; warmup unchanged */
    sc.decay = M1C_DECAY_CONSTANT;
    assert_lr(&sc, 3, 110, 3e-4);
    assert_lr(&sc, 11, 110, 1e-3);
    assert_lr(&sc, 110, 110, 1e-3);
    /* no warmup: cosine from step 0, p = step / steps */
    m1c_schedule_spec nw = {2e-3, 0, 0, M1C_DECAY_COSINE, 0};
    assert_lr(&nw, 50, 100, 1e-3);
    assert_lr(&nw, 100, 100, 0);
    /* warmup longer than the stage: the peak is never reached */
    m1c_schedule_spec lw = {1e-3, 1e-4, 20, M1C_DECAY_COSINE, 0};
    assert_lr(&lw, 10, 10, 5e-4);
}

/* ---- metrics.jsonl ------------------------------------------------------------------------------------ */

Test(train, metrics_lines) {
    char *root = make_tmpdir();
    const char *ov[] = {"run.stages.0.steps=4", "run.stages.0.eval.every=2"};
    m1c_train_result r;
    train("math.cfg", root, ov, 2, NULL, 0, &r);
    json_t *m = read_metrics(root);
    int n_step = 0, n_eval = 0, n_unigram = 0;
    size_t i;
    json_t *o;
    json_array_foreach(m, i, o) {
        cr_assert_str_eq(json_string_value(json_object_get(o, "stage")), "pretrain");
        cr_assert(json_is_integer(json_object_get(o, "step")));
        int64_t step = json_integer_value(json_object_get(o, "step"));
        if (json_object_get(o, "unigram_entropy")) {
            cr_assert_eq(step, 0);
            n_unigram++;
        } else if (json_object_get(o, "val_loss")) {
            cr_assert(json_is_number(json_object_get(o, "val_loss")));
            cr_assert(step == 2 || step == 4, "evaluation at step %lld", (long long)step);
            n_eval++;
        } else {
            static const char *const keys[] = {"loss", "lr", "grad_norm", "tokens_per_s"};
            for (int k = 0; k < 4; k++)
                cr_assert(json_is_number(json_object_get(o, keys[k])), "step %lld: no number '%s'", (long long)step,
                          keys[k]);
            cr_assert_eq(step, ++n_step, "step records in order");
            cr_assert(json_number_value(json_object_get(o, "loss")) > 0);
            cr_assert(json_number_value(json_object_get(o, "tokens_per_s")) > 0);
        }
    }
    cr_assert_eq(n_unigram, 1);
    cr_assert_eq(n_step, 4);
    cr_assert_eq(n_eval, 2);
    json_decref(m);
    m1c_remove_tree(root);
    free(root);
}

/* --init starts a run from a checkpoint's parameters: with a learning rate of 0, AdamW changes
 * nothing (its update and its decoupled decay are both multiplied by lr), so the new run's
 * checkpoint holds exactly the parameters it started from. */
Test(train, init_starts_from_checkpoint_parameters) {
    char *root = make_tmpdir();
    char *a = m1c_path_join(root, "a"), *b = m1c_path_join(root, "b");
    m1c_train_result ra, rb;
    const char *short_run[] = {"run.stages.[0].steps=3", "run.stages.[0].schedule.warmup=0"};
    train("math.cfg", a, short_run, 2, NULL, 0, &ra);
    const char *frozen[] = {"run.stages.[0].steps=2", "run.stages.[0].schedule.warmup=0",
                            "run.stages.[0].schedule.lr=0.0", "run.stages.[0].schedule.min_lr=0.0"};
    m1c_session s;
    open_cfg(&s, "math.cfg", b, frozen, 4);
    m1c_train_opts o = {.init = ra.last_checkpoint, .quiet = 1};
    m1c_err e = {{0}};
    cr_assert_eq(m1c_train(&s, &o, &rb, &e), M1C_OK, "%s", e.msg);
    m1c_session_close(&s);
    char *pa = m1c_path_join(ra.last_checkpoint, "model.safetensors");
    char *pb = m1c_path_join(rb.last_checkpoint, "model.safetensors");
    assert_same_file(pa, pb);
    free(pa), free(pb), free(a), free(b);
    m1c_remove_tree(root);
    free(root);
}

/* A configuration without stages (an imported inference checkpoint) has nothing to train. */
Test(train, no_stages_refused) {
    char *root = make_tmpdir();
    m1c_session s;
    const char *none[] = {"run.stages=()"};
    open_cfg(&s, "math.cfg", root, none, 1);
    m1c_train_opts o = {.quiet = 1};
    m1c_train_result r;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_train(&s, &o, &r, &e), M1C_ERR);
    cr_assert(strstr(e.msg, "run.stages is empty"), "%s", e.msg);
    m1c_session_close(&s);
    m1c_remove_tree(root);
    free(root);
}
