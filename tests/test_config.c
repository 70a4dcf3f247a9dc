/* Strict configuration (core/config.c), the model/run schema (core/spec.c) and `m1c config show`:
 * every error names its file and line (or the override), defaults fill in, overrides apply. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "../core/spec.h"

#define DATA M1C_SOURCE_DIR "/tests/data/config/"

/* Parse text as "t.cfg"; asserts it parses. */
static m1c_config *parse(const char *text, const char *const *ov, int n_ov) {
    m1c_config *c = NULL;
    m1c_err e = {{0}};
    if (m1c_config_parse(&c, text, "t.cfg", NULL, ov, n_ov, &e)) cr_assert_fail("parse: %s", e.msg);
    return c;
}

/* The error of parsing text with overrides, which must fail. */
static void parse_fails(const char *text, const char *const *ov, int n_ov, m1c_err *e) {
    m1c_config *c = NULL;
    cr_assert_eq(m1c_config_parse(&c, text, "t.cfg", NULL, ov, n_ov, e), M1C_ERR, "expected a failure");
    cr_assert_null(c);
}

/* The configuration as m1c_config_write prints it (malloc'd). */
static char *written(m1c_config *c) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_not_null(f);
    cr_assert_eq(m1c_config_write(c, f), M1C_OK);
    fclose(f);
    return buf;
}

/* ---- strict getters ------------------------------------------------------------------------- */

Test(config, typo_names_file_and_line) {
    m1c_config *c = NULL;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_config_load(&c, DATA "typo.cfg", NULL, 0, &e), M1C_OK, "%s", e.msg);
    m1c_settings *m = m1c_cfg_group(m1c_config_root(c), "model", M1C_REQUIRED, &e);
    cr_assert_not_null(m, "%s", e.msg);
    int64_t v;
    cr_assert_eq(m1c_cfg_int(m, "layers", M1C_OPTIONAL, 8, 1, 100, &v, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_int(m, "hidden", M1C_OPTIONAL, 256, 1, 65536, &v, &e), M1C_OK);
    cr_assert_eq(v, 256, "absent key takes its default");
    cr_assert_eq(m1c_cfg_done(m, &e), M1C_ERR);
    th_assert_has(e.msg, "typo.cfg:4:"); /* the file and the line of `hiden` */
    th_assert_has(e.msg, "model.hiden: unknown key");
    th_assert_has(e.msg, "did you mean 'hidden'");
    m1c_config_free(c);
}

Test(config, wrong_type) {
    m1c_config *c = parse("a = \"x\";\nb = 2.5;\nc = 3;\nd = 1;\ne = { f = 1; };\n", NULL, 0);
    m1c_settings *r = m1c_config_root(c);
    m1c_err e = {{0}};
    int64_t i;
    double f;
    int b;
    const char *s;
    cr_assert_eq(m1c_cfg_int(r, "a", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:1: a: expected an integer in [0, 10], got \"x\"");
    cr_assert_eq(m1c_cfg_int(r, "b", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_ERR, "a float is not an integer");
    th_assert_has(e.msg, "t.cfg:2: b: expected an integer");
    th_assert_has(e.msg, "got 2.5");
    cr_assert_eq(m1c_cfg_float(r, "c", M1C_REQUIRED, 0, 0, 10, &f, &e), M1C_OK, "an integer is a number");
    cr_assert_eq(f, 3.0);
    cr_assert_eq(m1c_cfg_bool(r, "d", M1C_REQUIRED, 0, &b, &e), M1C_ERR, "1 is not a boolean");
    th_assert_has(e.msg, "t.cfg:4: d: expected true or false, got 1");
    cr_assert_eq(m1c_cfg_string(r, "c", M1C_REQUIRED, NULL, NULL, &s, &e), M1C_ERR);
    th_assert_has(e.msg, "expected a string, got 3");
    cr_assert_eq(m1c_cfg_int(r, "e", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_ERR);
    th_assert_has(e.msg, "got a group");
    cr_assert_null(m1c_cfg_group(r, "c", M1C_OPTIONAL, &e), "a scalar is not a group");
    th_assert_has(e.msg, "t.cfg:3: c: expected a group");
    cr_assert_eq(m1c_cfg_int(r, "zz", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_ERR);
    th_assert_has(e.msg, "zz: required key is missing");
    m1c_config_free(c);
}

Test(config, out_of_range) {
    m1c_config *c = parse("m = {\n hidden = 0;\n lr = 2.0;\n big = 5000000000L;\n};\n", NULL, 0);
    m1c_err e = {{0}};
    m1c_settings *m = m1c_cfg_group(m1c_config_root(c), "m", M1C_REQUIRED, &e);
    int64_t i;
    double f;
    cr_assert_eq(m1c_cfg_int(m, "hidden", M1C_REQUIRED, 0, 1, 65536, &i, &e), M1C_ERR);
    cr_assert_str_eq(e.msg, "t.cfg:2: m.hidden: expected an integer in [1, 65536], got 0");
    cr_assert_eq(m1c_cfg_float(m, "lr", M1C_REQUIRED, 0, 0.0, 1.0, &f, &e), M1C_ERR);
    cr_assert_str_eq(e.msg, "t.cfg:3: m.lr: expected a number in [0.0, 1.0], got 2.0");
    cr_assert_eq(m1c_cfg_int(m, "big", M1C_REQUIRED, 0, 0, INT64_MAX, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, INT64_C(5000000000));
    cr_assert_eq(m1c_cfg_int(m, "big", M1C_REQUIRED, 0, 0, INT32_MAX, &i, &e), M1C_ERR);
    th_assert_has(e.msg, "got 5000000000");
    m1c_config_free(c);
}

Test(config, big_integer_needs_L) {
    /* libconfig 1.5 would read it modulo 2^32 (705032704) without a word */
    m1c_err e = {{0}};
    parse_fails("a = 1;\nseed = 5000000000;\n", NULL, 0, &e);
    th_assert_has(e.msg, "t.cfg:2: integer 5000000000 does not fit 32 bits");
    m1c_config *c = parse("s = \"5000000000\"; # 5000000000\nseed = 5000000000L;\n", NULL, 0);
    int64_t i;
    cr_assert_eq(m1c_cfg_int(m1c_config_root(c), "seed", M1C_REQUIRED, 0, 0, INT64_MAX, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, INT64_C(5000000000));
    m1c_config_free(c);
}

Test(config, choices) {
    m1c_config *c = parse("decay = \"cosin\";\nok = \"linear\";\n", NULL, 0);
    m1c_settings *r = m1c_config_root(c);
    static const char *const ch[] = {"cosine", "constant", "linear", NULL};
    m1c_err e = {{0}};
    const char *s;
    cr_assert_eq(m1c_cfg_string(r, "decay", M1C_OPTIONAL, "cosine", ch, &s, &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:1: decay: expected one of \"cosine\", \"constant\", \"linear\", got \"cosin\"");
    th_assert_has(e.msg, "did you mean \"cosine\"");
    cr_assert_eq(m1c_cfg_string(r, "ok", M1C_OPTIONAL, "cosine", ch, &s, &e), M1C_OK);
    cr_assert_str_eq(s, "linear");
    cr_assert_eq(m1c_cfg_string(r, "absent", M1C_OPTIONAL, "constant", ch, &s, &e), M1C_OK);
    cr_assert_str_eq(s, "constant");
    m1c_config_free(c);
}

Test(config, include_fragment_names_its_file) {
    m1c_config *c = NULL;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_config_load(&c, DATA "with_include.cfg", NULL, 0, &e), M1C_OK, "%s", e.msg);
    m1c_settings *r = m1c_config_root(c);
    int64_t v;
    cr_assert_eq(m1c_cfg_int(r, "top", M1C_REQUIRED, 0, 0, 10, &v, &e), M1C_OK);
    m1c_settings *p = m1c_cfg_group(r, "part", M1C_REQUIRED, &e);
    cr_assert_not_null(p, "%s", e.msg);
    cr_assert_eq(m1c_cfg_int(p, "known", M1C_REQUIRED, 0, 0, 10, &v, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(v, 3);
    cr_assert_eq(m1c_cfg_done(r, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_cfg_done(p, &e), M1C_ERR);
    /* the fragment's own path (joined with the including file's folder) and its line */
    th_assert_has(e.msg, "tests/data/config/fragments/part.cfg:2: part.unknwn: unknown key");
    cr_assert_eq(m1c_cfg_int(p, "known", M1C_REQUIRED, 0, 5, 10, &v, &e), M1C_ERR);
    th_assert_has(e.msg, "fragments/part.cfg:1: part.known:");
    m1c_config_free(c);
}

Test(config, syntax_error_names_line) {
    m1c_err e = {{0}};
    parse_fails("a = 1;\nb = ;\n", NULL, 0, &e);
    th_assert_has(e.msg, "t.cfg:2:");
    m1c_config *c = NULL;
    cr_assert_eq(m1c_config_load(&c, DATA "no-such-file.cfg", NULL, 0, &e), M1C_ERR);
    th_assert_has(e.msg, "no-such-file.cfg");
}

/* ---- overrides ------------------------------------------------------------------------------ */

Test(config, overrides) {
    static const char *const ov[] = {
        "m.i=42",          "m.f = 0.5",     "m.s=\"quoted text\"", "m.w=bare",         "m.b=true",
        "m.f2=3",          "new.deep.k=7",  "l.[1].n=5",           "l.0.n=4",          "m.list=[1, 2, 3]",
        "m.big=6000000000", "l[1].name=x",    "m.dec=010",        "m.hex=0x10",
    };
    m1c_config *c = parse("m = { i = 1; f = 1.5; s = \"a\"; w = \"b\"; b = false; f2 = 2.5; };\n"
                          "l = ( { n = 1; }, { n = 2; } );\n",
                          ov, (int)(sizeof ov / sizeof ov[0]));
    m1c_settings *r = m1c_config_root(c);
    m1c_err e = {{0}};
    m1c_settings *m = m1c_cfg_group(r, "m", M1C_REQUIRED, &e);
    int64_t i;
    double f;
    int b;
    const char *s;
    cr_assert_eq(m1c_cfg_int(m, "i", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 42);
    cr_assert_eq(m1c_cfg_float(m, "f", M1C_REQUIRED, 0, 0, 100, &f, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(f, 0.5);
    cr_assert_eq(m1c_cfg_float(m, "f2", M1C_REQUIRED, 0, 0, 100, &f, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(f, 3.0, "an integer override of a float stays a number");
    cr_assert_eq(m1c_cfg_string(m, "s", M1C_REQUIRED, NULL, NULL, &s, &e), M1C_OK, "%s", e.msg);
    cr_assert_str_eq(s, "quoted text");
    cr_assert_eq(m1c_cfg_string(m, "w", M1C_REQUIRED, NULL, NULL, &s, &e), M1C_OK, "%s", e.msg);
    cr_assert_str_eq(s, "bare", "a bare word is a string");
    cr_assert_eq(m1c_cfg_bool(m, "b", M1C_REQUIRED, 0, &b, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(b, 1);
    cr_assert_eq(m1c_cfg_int(m, "big", M1C_REQUIRED, 0, 0, INT64_MAX, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, INT64_C(6000000000), "integers past 32 bits need no L suffix in overrides");
    cr_assert_eq(m1c_cfg_int(m, "dec", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 10, "a leading 0 is not octal (libconfig reads 010 as 10 too)");
    cr_assert_eq(m1c_cfg_int(m, "hex", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 16);
    cr_assert_eq(m1c_cfg_len(m, "list"), 3);
    cr_assert_eq(m1c_cfg_list_int(m, "list", 2, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 3);
    /* a missing key and its groups are created */
    m1c_settings *deep = m1c_cfg_group(m1c_cfg_group(r, "new", M1C_REQUIRED, &e), "deep", M1C_REQUIRED, &e);
    cr_assert_not_null(deep, "%s", e.msg);
    cr_assert_eq(m1c_cfg_int(deep, "k", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 7);
    /* list elements, in each index form */
    cr_assert_eq(m1c_cfg_len(r, "l"), 2);
    m1c_settings *l0 = m1c_cfg_elem(r, "l", 0), *l1 = m1c_cfg_elem(r, "l", 1);
    cr_assert(l0 && l1);
    cr_assert_str_eq(m1c_cfg_path(l1), "l.[1]");
    cr_assert_eq(m1c_cfg_int(l0, "n", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 4);
    cr_assert_eq(m1c_cfg_int(l1, "n", M1C_REQUIRED, 0, 0, 100, &i, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(i, 5);
    cr_assert_eq(m1c_cfg_string(l1, "name", M1C_REQUIRED, NULL, NULL, &s, &e), M1C_OK, "%s", e.msg);
    cr_assert_str_eq(s, "x");
    /* a value an override set is blamed on the override */
    cr_assert_eq(m1c_cfg_int(m, "i", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_ERR);
    cr_assert_str_eq(e.msg, "override 'm.i=42': m.i: expected an integer in [0, 10], got 42");
    m1c_config_free(c);
}

Test(config, override_refusals) {
    const char *text = "m = { i = 1; s = \"a\"; g = { x = 1; }; };\nl = ( { n = 1; } );\n";
    m1c_err e = {{0}};
    const char *ov1[] = {"m.i=\"text\""};
    parse_fails(text, ov1, 1, &e);
    th_assert_has(e.msg, "override 'm.i=\"text\"'");
    th_assert_has(e.msg, "m.i is an integer (t.cfg:1)");
    const char *ov2[] = {"m.s=3"};
    parse_fails(text, ov2, 1, &e);
    th_assert_has(e.msg, "override 'm.s=3': m.s is a string");
    const char *ov3[] = {"m.g=1"};
    parse_fails(text, ov3, 1, &e);
    th_assert_has(e.msg, "m.g is a group");
    const char *ov4[] = {"m.i.x=1"};
    parse_fails(text, ov4, 1, &e);
    th_assert_has(e.msg, "'m.i' is an integer, not a group");
    const char *ov5[] = {"l.[3].n=1"};
    parse_fails(text, ov5, 1, &e);
    th_assert_has(e.msg, "index 3 is past the end of 'l'");
    const char *ov6[] = {"m.i"};
    parse_fails(text, ov6, 1, &e);
    th_assert_has(e.msg, "override 'm.i': expected key=value");
    const char *ov7[] = {"m.v=[1, 2"};
    parse_fails(text, ov7, 1, &e);
    th_assert_has(e.msg, "override 'm.v=[1, 2': cannot parse the value");
}

/* ---- writing -------------------------------------------------------------------------------- */

Test(config, write_shows_defaults_and_reads_back) {
    m1c_config *c = parse("model = { hidden = 64; };\n", NULL, 0);
    m1c_err e = {{0}};
    m1c_settings *m = m1c_cfg_group(m1c_config_root(c), "model", M1C_REQUIRED, &e);
    int64_t i;
    double f;
    const char *s;
    int b;
    cr_assert_eq(m1c_cfg_int(m, "hidden", M1C_OPTIONAL, 256, 1, 65536, &i, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_int(m, "layers", M1C_OPTIONAL, 8, 1, 100, &i, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_float(m, "alpha", M1C_OPTIONAL, 3.5565588200778455, 0, 10, &f, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_string(m, "name", M1C_OPTIONAL, "a \"quoted\" name", NULL, &s, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_bool(m, "tie", M1C_OPTIONAL, 1, &b, &e), M1C_OK);
    m1c_settings *sub = m1c_cfg_group(m, "sub", M1C_OPTIONAL, &e);
    cr_assert_eq(m1c_cfg_int(sub, "k", M1C_OPTIONAL, 7, 0, 10, &i, &e), M1C_OK);
    char *out = written(c);
    th_assert_has(out, "hidden = 64;");
    th_assert_has(out, "layers = 8;");
    th_assert_has(out, "alpha = 3.5565588200778455;");
    th_assert_has(out, "tie = true;");
    th_assert_has(out, "k = 7;");
    m1c_config_free(c);

    /* the output is a config: read back, every value is the same (floats exactly) */
    c = parse(out, NULL, 0);
    m = m1c_cfg_group(m1c_config_root(c), "model", M1C_REQUIRED, &e);
    cr_assert_eq(m1c_cfg_float(m, "alpha", M1C_REQUIRED, 0, 0, 10, &f, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(f, 3.5565588200778455, "written with enough digits to round-trip exactly");
    cr_assert_eq(m1c_cfg_string(m, "name", M1C_REQUIRED, NULL, NULL, &s, &e), M1C_OK, "%s", e.msg);
    cr_assert_str_eq(s, "a \"quoted\" name");
    cr_assert_eq(m1c_cfg_int(m1c_cfg_group(m, "sub", M1C_REQUIRED, &e), "k", M1C_REQUIRED, 0, 0, 10, &i, &e), M1C_OK);
    cr_assert_eq(i, 7);
    free(out);
    m1c_config_free(c);
}

Test(config, done_all_and_lists) {
    m1c_config *c = parse("g = { a = 1; h = { b = 2; }; l = ( { c = 3; } ); files = \"one.txt\"; };\n", NULL, 0);
    m1c_err e = {{0}};
    m1c_settings *g = m1c_cfg_group(m1c_config_root(c), "g", M1C_REQUIRED, &e);
    int64_t i;
    const char *s;
    cr_assert_eq(m1c_cfg_int(g, "a", M1C_REQUIRED, 0, 0, 9, &i, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_len(g, "files"), 1, "a single value is a list of one");
    cr_assert_eq(m1c_cfg_list_string(g, "files", 0, &s, &e), M1C_OK, "%s", e.msg);
    cr_assert_str_eq(s, "one.txt");
    cr_assert_eq(m1c_cfg_list_string(g, "files", 1, &s, &e), M1C_ERR);
    m1c_settings *h = m1c_cfg_group(g, "h", M1C_REQUIRED, &e);
    cr_assert_eq(m1c_cfg_len(g, "l"), 1);
    cr_assert_not_null(m1c_cfg_elem(g, "l", 0));
    cr_assert_eq(m1c_cfg_done(g, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_cfg_done_all(g, &e), M1C_ERR, "h.b and l.[0].c were never read");
    th_assert_has(e.msg, "g.h.b: unknown key");
    cr_assert_eq(m1c_cfg_int(h, "b", M1C_REQUIRED, 0, 0, 9, &i, &e), M1C_OK);
    cr_assert_eq(m1c_cfg_done_all(g, &e), M1C_ERR);
    th_assert_has(e.msg, "g.l.[0].c: unknown key");
    m1c_config_free(c);
}

/* ---- the model/run schema ------------------------------------------------------------------- */

#define TYPES                                                                                                     \
    "  types = {\n"                                                                                               \
    "    lightning = { attention = { plugin = \"lightning\"; heads = 2; head_dim = 8; block_size = 8; }; };\n"       \
    "    softmax = { attention = { plugin = \"softmax\"; heads = 2; head_dim = 8; }; alpha = 2.0; };\n"           \
    "  };\n"                                                                                                      \
    "  ffn = { plugin = \"topk\"; experts = 2; top_k = 1; ffn_dim = 16; };\n"

#define RUN "run = { stages = ( { data = { plugin = \"synth-math\"; }; steps = 5; batch = 2; seq_len = 16; } ); };\n"

/* Read a spec from a model body (between `model = {` and `};`) and the run above. */
static int read_spec(const char *model_body, const char *run, m1c_config **c, m1c_spec *spec, m1c_err *e) {
    char *text = m1c_xasprintf("model = {\n%s};\n%s", model_body, run);
    *c = parse(text, NULL, 0);
    free(text);
    return m1c_spec_read(spec, *c, e);
}

Test(spec, pattern_repeats_7_to_1) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    const char *body = "  hidden = 16; layers = 16;\n"
                       "  pattern = [\"lightning\", \"lightning\", \"lightning\", \"lightning\", \"lightning\","
                       " \"lightning\", \"lightning\", \"softmax\"];\n" TYPES;
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(spec.model.n_layers, 16);
    cr_assert_eq(spec.model.n_types, 2);
    for (int l = 0; l < 16; l++) {
        const char *t = spec.model.types[spec.model.layer_type[l]].name;
        cr_assert_str_eq(t, l % 8 == 7 ? "softmax" : "lightning", "layer %d", l);
    }
    cr_assert_eq(spec.model.types[1].alpha, 2.0);
    cr_assert_eq(spec.model.types[1].first_layer, 7);
    cr_assert_eq(spec.model.types[1].n_used, 2);
    cr_assert_str_eq(spec.model.ffn.plugin, "topk");
    /* defaults of the run */
    cr_assert_eq(spec.run.n_stages, 1);
    m1c_stage_spec *st = &spec.run.stages[0];
    cr_assert_str_eq(st->name, "pretrain");
    cr_assert_eq(st->kind, M1C_STAGE_PRETRAIN);
    cr_assert_str_eq(st->objective.plugin, "xent");
    cr_assert_str_eq(st->optimizer.plugin, "adamw");
    cr_assert_eq(st->seed, spec.run.seed, "a stage's seed defaults to the run's");
    cr_assert_str_eq(spec.run.out_dir, "runs/t");
    char *out = written(c);
    th_assert_has(out, "min_lr = ");
    th_assert_has(out, "head_precision = \"fp32\";");
    free(out);
    m1c_spec_free(&spec);
    m1c_config_free(c);
}

Test(spec, stack_of_wrong_length_refused) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    const char *body = "  layers = 3;\n  stack = [\"softmax\", \"lightning\"];\n" TYPES;
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:3: model.stack: 2 types for 3 layers");
    m1c_config_free(c);
}

Test(spec, stack_gives_each_layer) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    const char *body = "  layers = 3;\n  stack = [\"softmax\", \"lightning\", \"softmax\"];\n" TYPES;
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(spec.model.layer_type[0], 1);
    cr_assert_eq(spec.model.layer_type[1], 0);
    cr_assert_eq(spec.model.layer_type[2], 1);
    m1c_spec_free(&spec);
    m1c_config_free(c);
}

Test(spec, undefined_type_refused) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    const char *body = "  layers = 2;\n  pattern = [\"lightning\",\n \"sofmax\"];\n" TYPES;
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:4: model.pattern.[1]: expected one of \"lightning\", \"softmax\", got \"sofmax\"");
    m1c_config_free(c);
}

Test(spec, structural_errors) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    cr_assert_eq(read_spec("  layers = 2;\n" TYPES, RUN, &c, &spec, &e), M1C_ERR, "neither pattern nor stack");
    th_assert_has(e.msg, "give the layer types");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n  stack = [\"softmax\"];\n" TYPES, RUN, &c, &spec, &e), M1C_ERR);
    th_assert_has(e.msg, "not both");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n  ffn = { plugin = \"topk\"; };\n"
                           "  types = { softmax = { attention = { heads = 2; }; }; };\n",
                           RUN, &c, &spec, &e),
                 M1C_ERR, "an attention slot without a plugin");
    th_assert_has(e.msg, "t.cfg:4: model.types.softmax.attention.plugin: required key is missing");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n" TYPES,
                           "run = { stages = ( { data = { plugin = \"x\"; }; steps = 5; bacth = 2; } ); };\n", &c,
                           &spec, &e),
                 M1C_ERR);
    th_assert_has(e.msg, "run.stages.[0].bacth: unknown key (did you mean 'batch'?)");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n" TYPES,
                           "run = { stages = ( { kind = \"rl\"; data = { plugin = \"x\"; }; steps = 5; batch = 6; "
                           "rollout = { group = 4; }; } ); };\n",
                           &c, &spec, &e),
                 M1C_ERR, "RL batch not a multiple of the group");
    th_assert_has(e.msg, "run.stages.[0].batch: 6 sequences is not a whole number of groups of 4");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n" TYPES,
                           "run = { stages = ( { data = { plugin = \"x\"; }; steps = 5; },"
                           " { data = { plugin = \"x\"; }; steps = 5; } ); };\n",
                           &c, &spec, &e),
                 M1C_ERR, "two stages named pretrain");
    th_assert_has(e.msg, "stage name \"pretrain\" is also the name of stage 0");
    m1c_config_free(c);
    cr_assert_eq(read_spec("  pattern = [\"softmax\"];\n" TYPES, RUN "extra = 1;\n", &c, &spec, &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:");
    th_assert_has(e.msg, "extra: unknown key");
    m1c_config_free(c);
}

Test(spec, plugins_validate_their_keys) {
    m1c_config *c;
    m1c_spec spec;
    m1c_err e = {{0}};
    const char *body = "  hidden = 16; layers = 2;\n  pattern = [\"lightning\", \"softmax\"];\n" TYPES;
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_OK, "%s", e.msg);
    int ffn_keys = m1c_cfg_n_keys(spec.model.ffn.settings);
    cr_assert_eq(m1c_spec_check_plugins(&spec, th_registry(), &e), M1C_OK, "%s", e.msg);
    cr_assert_gt(m1c_cfg_n_keys(spec.model.ffn.settings), ffn_keys, "the MoE plugin's defaults fill in");
    cr_assert_gt(spec.model.vocab_size, 0, "vocab_size 0 resolves from the data's tokenizer");
    m1c_spec_free(&spec);
    m1c_config_free(c);

    /* a typo inside a plugin's group: refused by the plugin, with the file and line */
    body = "  hidden = 16; layers = 1;\n  pattern = [\"softmax\"];\n"
           "  types = { softmax = { attention = { plugin = \"softmax\";\n heads = 2; head_dimm = 8; }; }; };\n"
           "  ffn = { plugin = \"topk\"; };\n";
    cr_assert_eq(read_spec(body, RUN, &c, &spec, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_spec_check_plugins(&spec, th_registry(), &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:5: model.types.softmax.attention.head_dimm: unknown key");
    m1c_spec_free(&spec);
    m1c_config_free(c);

    /* a plugin that does not exist: the slot's line */
    body = "  layers = 1;\n  pattern = [\"softmax\"];\n" TYPES;
    char *text = m1c_xasprintf("model = {\n%s};\nrun = { stages = ( { data = { plugin = \"no-such-data\"; };\n"
                               "steps = 5; } ); };\n",
                               body);
    c = parse(text, NULL, 0);
    free(text);
    cr_assert_eq(m1c_spec_read(&spec, c, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(m1c_spec_check_plugins(&spec, th_registry(), &e), M1C_ERR);
    th_assert_has(e.msg, "t.cfg:10: run.stages.[0].data.plugin:");
    th_assert_has(e.msg, "no-such-data");
    m1c_spec_free(&spec);
    m1c_config_free(c);
}

/* ---- `m1c config show` as a process --------------------------------------------------------- */

/* Each command runs through the shell with stdout and stderr together (2>&1) into one text. */

Test(cli, config_show_prints_resolved) {
    int rc;
    char *out = th_shell(M1C_BINARY_DIR "/m1c config show " DATA "cli.cfg -s run.stages.[0].steps=12 2>&1", &rc);
    cr_assert_eq(rc, 0, "output: %s", out);
    th_assert_has(out, "hidden = 32;");        /* as written */
    th_assert_has(out, "steps = 12;");         /* the override */
    th_assert_has(out, "min_lr = 0.0001;");    /* a core default: 0.1 * the default lr 1e-3 */
    th_assert_has(out, "head_precision = \"fp32\";");
    th_assert_has(out, "plugin = \"adamw\";"); /* the default optimizer slot */

    /* the output reads back as a valid config */
    m1c_config *c = parse(out, NULL, 0);
    m1c_spec spec;
    m1c_err e = {{0}};
    cr_assert_eq(m1c_spec_read(&spec, c, &e), M1C_OK, "%s", e.msg);
    cr_assert_eq(spec.run.stages[0].steps, 12);
    m1c_spec_free(&spec);
    m1c_config_free(c);
    free(out);
}

Test(cli, config_show_typo_exits_1) {
    int rc;
    char *out = th_shell(M1C_BINARY_DIR "/m1c config show " DATA "cli_typo.cfg 2>&1", &rc);
    cr_assert_eq(rc, 1, "output: %s", out);
    th_assert_has(out, "cli_typo.cfg:12: run.stages.[0].stesp: unknown key");
    free(out);
    out = th_shell(M1C_BINARY_DIR "/m1c config show " DATA "cli.cfg -s model.hidden=abc 2>&1", &rc);
    cr_assert_eq(rc, 1, "output: %s", out);
    th_assert_has(out, "override 'model.hidden=abc'");
    free(out);
    out = th_shell(M1C_BINARY_DIR "/m1c config show --help 2>&1", &rc);
    cr_assert_eq(rc, 0);
    th_assert_has(out, "usage: m1c config show");
    free(out);
}
