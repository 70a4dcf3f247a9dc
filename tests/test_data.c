/* Tests of the data plugins `text` and `synth-math`: tokenizer, packing, splits, mixing, positions,
 * errors, and the arithmetic problems checked by an evaluator written here, independent of the plugin. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

#define DATA_DIR M1C_SOURCE_DIR "/tests/data"
enum { BOS = 256, EOS = 257, PAD = 258, VOCAB = 259 };

/* ---- helpers ------------------------------------------------------------------------------- */

typedef struct inst {
    m1c_plugin *p;
    const m1c_data_vtable *vt;
    void *self;
    m1c_config *cfg;
} inst;

static int try_open(inst *x, const char *plugin, const char *body, uint64_t seed, int rank, int world,
                    const char *base_dir) {
    memset(x, 0, sizeof *x);
    x->p = th_plugin(plugin, M1C_KIND_DATA);
    x->vt = M1C_DATA(x->p);
    m1c_settings *s = th_settings(body, &x->cfg);
    m1c_data_info info = {sizeof info, rank, world, seed, base_dir, {0}};
    x->p->error[0] = '\0';
    return x->vt->create(&x->p->host, s, &info, &x->self);
}

static inst open_ok(const char *plugin, const char *body, uint64_t seed, int rank, int world, const char *base_dir) {
    inst x;
    int rc = try_open(&x, plugin, body, seed, rank, world, base_dir);
    cr_assert_eq(rc, M1C_OK, "creating %s with '%s': %s", plugin, body, x.p->error);
    return x;
}

static void close_inst(inst *x) {
    x->vt->destroy(x->self);
    m1c_config_free(x->cfg);
}

static void batch(inst *x, int split, int B, int T, int32_t *tok, float *mask) {
    int rc = x->vt->next_batch(x->self, split, B, T, tok, mask);
    cr_assert_eq(rc, M1C_OK, "next_batch: %s", x->p->error);
}

/* A growable token stream. */
typedef struct stream {
    int32_t *t;
    int64_t n, cap;
} stream;

static void stream_push(stream *s, int32_t v) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 1024;
        s->t = realloc(s->t, (size_t)s->cap * sizeof *s->t);
        cr_assert_not_null(s->t);
    }
    s->t[s->n++] = v;
}

/* Read batches of one single-source split and rebuild the token stream they were cut from, checking
 * that rows are contiguous: each row starts with the token that ended the row before it. */
static stream read_stream(inst *x, int split, int B, int T, int64_t min_tokens) {
    stream s = {0};
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B * (T + 1));
    float *mask = malloc(sizeof(float) * (size_t)B * T);
    while (s.n < min_tokens + 1) {
        batch(x, split, B, T, tok, mask);
        for (int b = 0; b < B; b++) {
            const int32_t *row = tok + (int64_t)b * (T + 1);
            if (s.n == 0) stream_push(&s, row[0]);
            else cr_assert_eq(row[0], s.t[s.n - 1], "row %d does not continue the previous row", b);
            for (int t = 1; t <= T; t++) stream_push(&s, row[t]);
            for (int t = 0; t < T; t++) cr_assert_eq(mask[(int64_t)b * T + t], 1.0f, "pre-training masks are all 1");
        }
    }
    free(tok);
    free(mask);
    return s;
}

/* Documents of a stream that starts at a document: BOS text EOS, repeated. Checks the framing and
 * returns the complete documents (a trailing partial one is dropped). */
typedef struct doclist {
    char **d;
    int n, cap;
} doclist;

static void doclist_push(doclist *l, char *s) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->d = realloc(l->d, (size_t)l->cap * sizeof *l->d);
    }
    l->d[l->n++] = s;
}

static void doclist_free(doclist *l) {
    for (int i = 0; i < l->n; i++) free(l->d[i]);
    free(l->d);
}

static doclist parse_docs(const int32_t *t, int64_t n) {
    doclist l = {0};
    int64_t i = 0;
    while (i < n) {
        cr_assert_eq(t[i], BOS, "token %lld: a document must start with BOS, got %d", (long long)i, t[i]);
        int64_t j = i + 1;
        while (j < n && t[j] != EOS) {
            cr_assert(t[j] >= 0 && t[j] < 256, "token %lld: %d inside a document is not a byte", (long long)j, t[j]);
            j++;
        }
        if (j == n) break;
        cr_assert(j > i + 1, "empty document at token %lld", (long long)i);
        char *s = malloc((size_t)(j - i));
        for (int64_t k = i + 1; k < j; k++) s[k - i - 1] = (char)t[k];
        s[j - i - 1] = '\0';
        doclist_push(&l, s);
        i = j + 1;
    }
    return l;
}

static int cmp_strp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int doclist_find(const doclist *l, const char *s) {
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->d[i], s)) return i;
    return -1;
}

/* The multiset of docs equals exactly the given strings (each once). */
static void assert_same_docs(doclist *got, const char *const *want, int n_want) {
    cr_assert_eq(got->n, n_want, "expected %d documents, got %d", n_want, got->n);
    char **w = malloc(sizeof(char *) * (size_t)n_want);
    for (int i = 0; i < n_want; i++) w[i] = (char *)want[i];
    qsort(w, (size_t)n_want, sizeof *w, cmp_strp);
    qsort(got->d, (size_t)got->n, sizeof *got->d, cmp_strp);
    for (int i = 0; i < n_want; i++) cr_assert_str_eq(got->d[i], w[i], "document %d differs", i);
    free(w);
}

/* A scratch folder for corpora made by a test. */
static char *tmp_dir(void) { return th_mkdtemp("/tmp", "m1c_test_data"); }

static void write_file(const char *dir, const char *name, const void *data, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    th_write_file(path, data, n);
}

static void rm_tree(const char *dir) { cr_assert_eq(th_rm_rf(dir), 0, "cannot remove %s", dir); }

/* The documents of tests/data/fortunes (wisdom and unix; wisdom.u8 is excluded), written out by hand
 * from those files. */
static const char *const fortune_docs[] = {
    "The best way to predict the future is to invent it.\n",
    "Simplicity is prerequisite for reliability.\n        -- Edsger W. Dijkstra\n",
    "It is 100%\ncertain that a line ending in a percent sign is not a separator.\n%%\nNor is a line of two "
    "percent signs.\n",
    " % \nA line with a spaced percent is not a separator either.\n",
    "Premature optimization is the root of all evil.\n",
    "There is no place like 127.0.0.1\n",
    "Unix is user-friendly; it is just selective about who its friends are.\n",
};
#define N_FORTUNES 7
#define FORTUNES_CFG \
    "sources = ( { path = \"fortunes\"; separator = \"%\"; exclude = [\"*.u8\", \"*.dat\"]; } ); valid_fraction = 0.0;"

static int64_t epoch_tokens(const char *const *docs, int n) {
    int64_t e = 0;
    for (int i = 0; i < n; i++) e += (int64_t)strlen(docs[i]) + 2; /* BOS text EOS */
    return e;
}

/* ---- tokenizer ----------------------------------------------------------------------------- */

Test(data_tokenizer, byte_round_trip) {
    const char *plugins[] = {"text", "synth-math"};
    for (int k = 0; k < 2; k++) {
        inst x = k == 0 ? open_ok("text", FORTUNES_CFG, 1, 0, 1, DATA_DIR) : open_ok("synth-math", "", 1, 0, 1, NULL);
        int32_t v, bos, eos, pad;
        cr_assert_eq(x.vt->vocab(x.self, &v, &bos, &eos, &pad), M1C_OK);
        cr_assert(v == VOCAB && bos == BOS && eos == EOS && pad == PAD, "%s: vocab %d bos %d eos %d pad %d",
                  plugins[k], v, bos, eos, pad);

        const char *text = "h\xc3\xa9llo, \xe4\xb8\x96\xe7\x95\x8c! \xf0\x9f\x99\x82\n\t~"; /* é, 世界, emoji */
        int64_t n = (int64_t)strlen(text);
        int32_t ids[64];
        cr_assert_eq(x.vt->encode(x.self, text, n, ids, 64), n, "byte-level: one id per byte");
        for (int64_t i = 0; i < n; i++)
            cr_assert_eq(ids[i], (unsigned char)text[i], "id %lld is the byte", (long long)i);
        cr_assert_eq(x.vt->encode(x.self, text, n, ids, 3), n, "a short buffer still reports the count needed");

        /* specials interleaved: decode drops them */
        int32_t mixed[80];
        int m = 0;
        mixed[m++] = BOS;
        for (int64_t i = 0; i < n; i++) {
            mixed[m++] = ids[i];
            if (i % 5 == 0) mixed[m++] = i % 2 ? PAD : EOS;
        }
        mixed[m++] = EOS;
        char out[128];
        cr_assert_eq(x.vt->decode(x.self, mixed, m, out, sizeof out), n);
        cr_assert_str_eq(out, text);
        char small[4];
        cr_assert_eq(x.vt->decode(x.self, mixed, m, small, sizeof small), n, "decode reports the bytes needed");
        cr_assert(memcmp(small, text, 4) == 0, "decode writes at most max bytes, the first ones");

        int32_t bad[2] = {65, VOCAB};
        cr_assert_eq(x.vt->decode(x.self, bad, 2, out, sizeof out), M1C_ERR, "ids past the vocabulary are refused");
        close_inst(&x);
    }
}

/* ---- text: layout, separators, files ------------------------------------------------------- */

Test(data_text, fortune_separator_and_packing) {
    inst x = open_ok("text", FORTUNES_CFG, 7, 0, 1, DATA_DIR);
    int64_t E = epoch_tokens(fortune_docs, N_FORTUNES);
    /* rows of odd shape so that rows end mid-document and mid-epoch */
    stream s = read_stream(&x, M1C_SPLIT_TRAIN, 3, 13, 4 * E);
    char *orders[4];
    for (int ep = 0; ep < 4; ep++) {
        /* every epoch is exactly the corpus's documents, each once, framed BOS doc EOS */
        doclist l = parse_docs(s.t + ep * E, E);
        char buf[1024] = "";
        for (int i = 0; i < l.n; i++) {
            int k = -1;
            for (int j = 0; j < N_FORTUNES; j++)
                if (!strcmp(l.d[i], fortune_docs[j])) k = j;
            snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%d", k);
        }
        orders[ep] = strdup(buf);
        assert_same_docs(&l, fortune_docs, N_FORTUNES);
        doclist_free(&l);
    }
    /* shuffled per epoch: four epochs in one identical order would mean no reshuffling (for 7
     * documents, chance 1/5040^3 for a correct shuffle) */
    cr_assert(strcmp(orders[0], orders[1]) || strcmp(orders[0], orders[2]) || strcmp(orders[0], orders[3]),
              "every epoch has the order %s", orders[0]);
    for (int ep = 0; ep < 4; ep++) free(orders[ep]);
    free(s.t);
    close_inst(&x);
}

Test(data_text, whole_files_glob_and_single_file) {
    const char *want[] = {"First whole file.\n%\nThe separator is not used for this source.\n",
                          "Second whole file, no trailing newline."};
    const char *cfgs[] = {
        "sources = ( { path = \"plain/*.txt\"; } ); valid_fraction = 0.0;",
        "sources = ( { path = \"plain\"; exclude = [\"*.md\"]; } ); valid_fraction = 0.0;",
    };
    for (int c = 0; c < 2; c++) {
        inst x = open_ok("text", cfgs[c], 3, 0, 1, DATA_DIR);
        int64_t E = epoch_tokens(want, 2);
        stream s = read_stream(&x, M1C_SPLIT_TRAIN, 2, 7, E);
        doclist l = parse_docs(s.t, E);
        assert_same_docs(&l, want, 2);
        doclist_free(&l);
        free(s.t);
        close_inst(&x);
    }
    /* an absolute path to one file, no base_dir */
    inst x = open_ok("text", "sources = ( { path = \"" DATA_DIR "/plain/two.txt\"; } ); valid_fraction = 0.0;", 3, 0, 1,
                     NULL);
    int64_t E = epoch_tokens(want + 1, 1);
    stream s = read_stream(&x, M1C_SPLIT_TRAIN, 1, 5, E);
    doclist l = parse_docs(s.t, E);
    assert_same_docs(&l, want + 1, 1);
    doclist_free(&l);
    free(s.t);
    close_inst(&x);
}

Test(data_text, skips_invalid_utf8_and_nul) {
    char *dir = tmp_dir();
    write_file(dir, "good.txt", "fine text\n", 10);
    write_file(dir, "latin1.txt", "caf\xe9\n", 5);                 /* Latin-1 é: not UTF-8 */
    write_file(dir, "overlong.txt", "\xc0\xaf\n", 3);              /* overlong '/' */
    write_file(dir, "surrogate.txt", "\xed\xa0\x80\n", 4);         /* U+D800 */
    write_file(dir, "nul.txt", "has a\0NUL\n", 10);
    write_file(dir, "blank.txt", " \n\n\t\n", 5);                   /* no document at all */
    inst x = open_ok("text", "sources = ( { path = \".\"; } ); valid_fraction = 0.0;", 1, 0, 1, dir);
    const char *want[] = {"fine text\n"};
    stream s = read_stream(&x, M1C_SPLIT_TRAIN, 2, 9, 3 * epoch_tokens(want, 1));
    doclist l = parse_docs(s.t, s.n);
    for (int i = 0; i < l.n; i++) cr_assert_str_eq(l.d[i], want[0], "only good.txt is read");
    cr_assert_geq(l.n, 3);
    doclist_free(&l);
    free(s.t);
    close_inst(&x);
    rm_tree(dir);
    free(dir);
}

/* A create error that names file:line of the settings (th_settings parses them as test.cfg, one line)
 * and the key path, as h->settings_error writes them, plus `what`. */
static void assert_setting_error(const char *body, const char *key_path, const char *what, const char *base_dir) {
    inst x;
    cr_assert_eq(try_open(&x, "text", body, 1, 0, 1, base_dir), M1C_ERR, "'%s' is accepted", body);
    cr_assert(strstr(x.p->error, "test.cfg:1") && strstr(x.p->error, key_path) && strstr(x.p->error, what),
              "'%s': the message should name test.cfg:1, %s and '%s': %s", body, key_path, what, x.p->error);
    cr_assert(strncmp(x.p->error, "text:", 5), "no plugin-name prefix of our own: %s", x.p->error);
    m1c_config_free(x.cfg);
}

Test(data_text, errors_name_the_path) {
    inst x;
    assert_setting_error("sources = ( { path = \"no/such/file.txt\"; } );", "sources.[0].path", "no/such/file.txt",
                         DATA_DIR);
    assert_setting_error("sources = ( { path = \"plain/*.none\"; } );", "sources.[0].path", "plain/*.none", DATA_DIR);
    /* the second source is the bad one */
    assert_setting_error("sources = ( { path = \"plain\"; }, { path = \"missing-dir\"; } );", "sources.[1].path",
                         "missing-dir", DATA_DIR);
    assert_setting_error("sources = ( { path = \"plain\"; exclude = [\"*\"]; } );", "sources.[0].exclude",
                         "every file", DATA_DIR);
    assert_setting_error("sources = ( { path = \"\"; } );", "sources.[0].path", "empty", DATA_DIR);
    assert_setting_error("sources = ( { path = \"plain\"; separator = \"a\\nb\"; } );", "sources.[0].separator",
                         "one line", DATA_DIR);
    assert_setting_error("sources = ( { path = \"plain\"; weight = 0.0; } );", "sources", "weight 0", DATA_DIR);
    assert_setting_error("sources = ();", "sources", "at least one source", DATA_DIR);

    /* no sources, unknown keys, bad values: refused with the key */
    cr_assert_eq(try_open(&x, "text", "valid_fraction = 0.1;", 1, 0, 1, DATA_DIR), M1C_ERR);
    cr_assert(strstr(x.p->error, "sources"), "%s", x.p->error);
    m1c_config_free(x.cfg);
    cr_assert_eq(try_open(&x, "text", "sources = ( { path = \"plain\"; wieght = 2.0; } );", 1, 0, 1, DATA_DIR),
                 M1C_ERR);
    cr_assert(strstr(x.p->error, "wieght"), "%s", x.p->error);
    m1c_config_free(x.cfg);
    cr_assert_eq(try_open(&x, "text", "sources = ( { path = \"plain\"; } ); tokenizer = \"bpe\";", 1, 0, 1, DATA_DIR),
                 M1C_ERR);
    cr_assert(strstr(x.p->error, "tokenizer"), "%s", x.p->error);
    m1c_config_free(x.cfg);
}

/* The corpus is read on first use: create looks at paths only, and reading errors come from the call
 * that reads. */
Test(data_text, reads_the_corpus_lazily) {
    char *dir = tmp_dir();
    write_file(dir, "a.txt", "written before create\n", strlen("written before create\n"));
    const char *cfg = "sources = ( { path = \"a.txt\"; } ); valid_fraction = 0.0;";
    inst x = open_ok("text", cfg, 1, 0, 1, dir);
    write_file(dir, "a.txt", "written after create\n", strlen("written after create\n"));
    const char *want[] = {"written after create\n"};
    stream s = read_stream(&x, M1C_SPLIT_TRAIN, 1, 8, 2 * epoch_tokens(want, 1));
    doclist l = parse_docs(s.t, s.n);
    cr_assert_geq(l.n, 2);
    for (int i = 0; i < l.n; i++) cr_assert_str_eq(l.d[i], want[0], "the batches hold the file as first read");
    doclist_free(&l);
    free(s.t);
    close_inst(&x);

    /* an empty corpus: files exist but hold no document. Create succeeds; every call that needs the
     * documents fails, naming the source; once the file holds a document, reading works. */
    write_file(dir, "a.txt", "%\n%\n", 4);
    write_file(dir, "empty.txt", "", 0);
    x = open_ok("text", "sources = ( { path = \".\"; separator = \"%\"; } ); valid_fraction = 0.0;", 1, 0, 1, dir);
    int32_t tok[2 * 5];
    float mask[2 * 4];
    cr_assert_eq(x.vt->next_batch(x.self, M1C_SPLIT_TRAIN, 2, 4, tok, mask), M1C_ERR);
    cr_assert(strstr(x.p->error, "no documents") && strstr(x.p->error, "sources[0]"), "%s", x.p->error);
    int64_t n = x.vt->save_position(x.self, NULL, 0);
    cr_assert_gt(n, 0, "the size of a position is known without the corpus");
    unsigned char *pos = calloc(1, (size_t)n);
    x.p->error[0] = '\0';
    cr_assert_eq(x.vt->save_position(x.self, pos, n), M1C_ERR);
    cr_assert(strstr(x.p->error, "no documents"), "%s", x.p->error);
    x.p->error[0] = '\0';
    cr_assert_eq(x.vt->load_position(x.self, pos, n), M1C_ERR);
    cr_assert(strstr(x.p->error, "no documents"), "%s", x.p->error);
    write_file(dir, "a.txt", "%\nnow a document\n%\n", strlen("%\nnow a document\n%\n"));
    batch(&x, M1C_SPLIT_TRAIN, 2, 4, tok, mask);
    const int32_t first[5] = {BOS, 'n', 'o', 'w', ' '};
    cr_assert(!memcmp(tok, first, sizeof first), "a failed read leaves nothing behind: the next one starts afresh");
    free(pos);
    close_inst(&x);

    /* a file that goes away between create and the first batch: the batch's error names it */
    x = open_ok("text", cfg, 1, 0, 1, dir);
    char path[600];
    snprintf(path, sizeof path, "%s/a.txt", dir);
    cr_assert_eq(unlink(path), 0);
    cr_assert_eq(x.vt->next_batch(x.self, M1C_SPLIT_TRAIN, 2, 4, tok, mask), M1C_ERR);
    cr_assert(strstr(x.p->error, "a.txt"), "%s", x.p->error);
    close_inst(&x);
    rm_tree(dir);
    free(dir);
}

/* ---- text: determinism, positions, splits, mixing ----------------------------------------- */

/* A corpus of n numbered one-line documents in a fresh folder, '%'-separated in one file. */
static char *numbered_corpus(const char *name, const char *prefix, int n) {
    char *dir = tmp_dir();
    size_t cap = (size_t)n * 64, k = 0;
    char *buf = malloc(cap);
    for (int i = 0; i < n; i++) k += (size_t)snprintf(buf + k, cap - k, "%s %d\n%%\n", prefix, i);
    write_file(dir, name, buf, k);
    free(buf);
    return dir;
}

static int same_batches(inst *a, inst *b, int split, int B, int T, int n) {
    int32_t *ta = malloc(sizeof(int32_t) * (size_t)B * (T + 1)), *tb = malloc(sizeof(int32_t) * (size_t)B * (T + 1));
    float *ma = malloc(sizeof(float) * (size_t)B * T), *mb = malloc(sizeof(float) * (size_t)B * T);
    int same = 1;
    for (int i = 0; i < n; i++) {
        batch(a, split, B, T, ta, ma);
        batch(b, split, B, T, tb, mb);
        same &= !memcmp(ta, tb, sizeof(int32_t) * (size_t)B * (T + 1)) &&
                !memcmp(ma, mb, sizeof(float) * (size_t)B * T);
    }
    free(ta), free(tb), free(ma), free(mb);
    return same;
}

#define TWO_SOURCES "sources = ( { path = \"a\"; separator = \"%\"; weight = 1.0; }, " \
                    "{ path = \"b\"; separator = \"%\"; weight = 2.0; } ); valid_fraction = 0.2;"

static char *two_source_corpus(void) {
    char *dir = numbered_corpus("a", "alpha document", 40);
    char sub[512];
    snprintf(sub, sizeof sub, "%s/b", dir);
    char *other = numbered_corpus("b", "beta document", 60);
    char path[600];
    snprintf(path, sizeof path, "%s/b", other);
    cr_assert_eq(rename(path, sub), 0);
    rm_tree(other);
    free(other);
    return dir;
}

Test(data_text, deterministic_in_seed) {
    char *dir = two_source_corpus();
    inst a = open_ok("text", TWO_SOURCES, 11, 0, 1, dir), b = open_ok("text", TWO_SOURCES, 11, 0, 1, dir);
    inst c = open_ok("text", TWO_SOURCES, 12, 0, 1, dir);
    cr_assert(same_batches(&a, &b, M1C_SPLIT_TRAIN, 4, 16, 20), "same seed: same training batches");
    cr_assert(same_batches(&a, &b, M1C_SPLIT_VALID, 4, 16, 5), "same seed: same validation batches");
    inst a2 = open_ok("text", TWO_SOURCES, 11, 0, 1, dir);
    cr_assert(!same_batches(&a2, &c, M1C_SPLIT_TRAIN, 4, 16, 5), "another seed: other batches");
    close_inst(&a), close_inst(&b), close_inst(&c), close_inst(&a2);
    rm_tree(dir);
    free(dir);
}

Test(data_text, position_resumes_exactly) {
    char *dir = two_source_corpus();
    inst a = open_ok("text", TWO_SOURCES, 5, 0, 1, dir);
    enum { B = 3, T = 11 };
    int32_t tok[B * (T + 1)];
    float mask[B * T];
    for (int i = 0; i < 100; i++) batch(&a, M1C_SPLIT_TRAIN, B, T, tok, mask); /* past an epoch of each source */
    for (int i = 0; i < 4; i++) batch(&a, M1C_SPLIT_VALID, B, T, tok, mask);
    int64_t n = a.vt->save_position(a.self, NULL, 0);
    cr_assert_gt(n, 0);
    unsigned char *pos = malloc((size_t)n);
    cr_assert_eq(a.vt->save_position(a.self, pos, n), n, "%s", a.p->error);

    /* the uninterrupted run: 10 more training and 6 more validation batches */
    int32_t ref_tr[10][B * (T + 1)], ref_va[6][B * (T + 1)];
    for (int i = 0; i < 10; i++) batch(&a, M1C_SPLIT_TRAIN, B, T, ref_tr[i], mask);
    for (int i = 0; i < 6; i++) batch(&a, M1C_SPLIT_VALID, B, T, ref_va[i], mask);

    /* a fresh instance restored from the position, reading the splits in the other order: the
     * splits' positions are independent */
    inst b = open_ok("text", TWO_SOURCES, 5, 0, 1, dir);
    cr_assert_eq(b.vt->load_position(b.self, pos, n), M1C_OK, "%s", b.p->error);
    for (int i = 0; i < 6; i++) {
        batch(&b, M1C_SPLIT_VALID, B, T, tok, mask);
        cr_assert(!memcmp(tok, ref_va[i], sizeof tok), "validation batch %d after load differs", i);
    }
    for (int i = 0; i < 10; i++) {
        batch(&b, M1C_SPLIT_TRAIN, B, T, tok, mask);
        cr_assert(!memcmp(tok, ref_tr[i], sizeof tok), "training batch %d after load differs", i);
    }

    /* positions of another seed, or damaged ones, are refused and leave the reader untouched */
    inst c = open_ok("text", TWO_SOURCES, 6, 0, 1, dir);
    cr_assert_eq(c.vt->load_position(c.self, pos, n), M1C_ERR);
    cr_assert_eq(b.vt->load_position(b.self, pos, n - 8), M1C_ERR);
    unsigned char *bad = malloc((size_t)n);
    memcpy(bad, pos, (size_t)n);
    memset(bad + n - 8, 0x7f, 8); /* last word: a document offset far past any document */
    cr_assert_eq(b.vt->load_position(b.self, bad, n), M1C_ERR);
    cr_assert_eq(b.vt->save_position(b.self, pos, n - 1), M1C_ERR, "too small a buffer is refused");
    cr_assert(same_batches(&a, &b, M1C_SPLIT_TRAIN, B, T, 5) && same_batches(&a, &b, M1C_SPLIT_VALID, B, T, 5),
              "refused positions leave the reader where it was");
    free(bad);
    free(pos);
    close_inst(&a), close_inst(&b), close_inst(&c);
    rm_tree(dir);
    free(dir);
}

/* Every document of a split, from reading several epochs of a single-source corpus. */
static doclist split_docs(const char *dir, uint64_t seed, int split, int B, int T, int64_t tokens) {
    inst x = open_ok("text", "sources = ( { path = \"docs\"; separator = \"%\"; } ); valid_fraction = 0.3;", seed, 0,
                     1, dir);
    stream s = read_stream(&x, split, B, T, tokens);
    doclist l = parse_docs(s.t, s.n);
    doclist u = {0}; /* distinct */
    for (int i = 0; i < l.n; i++)
        if (doclist_find(&u, l.d[i]) < 0) doclist_push(&u, strdup(l.d[i]));
    doclist_free(&l);
    free(s.t);
    close_inst(&x);
    return u;
}

Test(data_text, train_valid_disjoint_and_shape_independent) {
    enum { N = 200 };
    char *dir = numbered_corpus("docs", "document number", N);
    /* 200 documents of <= 22 bytes: 6 corpus-lengths of tokens cover every epoch of either split */
    int64_t tokens = 6 * N * 24;
    doclist tr = split_docs(dir, 9, M1C_SPLIT_TRAIN, 4, 32, tokens);
    doclist va = split_docs(dir, 9, M1C_SPLIT_VALID, 4, 32, tokens);
    cr_assert_eq(tr.n + va.n, N, "every document is in exactly one split (%d + %d)", tr.n, va.n);
    for (int i = 0; i < va.n; i++) cr_assert_lt(doclist_find(&tr, va.d[i]), 0, "'%s' is in both splits", va.d[i]);
    /* valid_fraction 0.3 of 200 documents: binomial sd = sqrt(200*0.3*0.7) = 6.5; 5 sd = 32 */
    cr_assert(va.n >= 60 - 32 && va.n <= 60 + 32, "validation documents %d, expected 60 +- 32", va.n);
    /* the assignment is by document, so another batch shape gives the same sets */
    doclist tr2 = split_docs(dir, 9, M1C_SPLIT_TRAIN, 1, 7, tokens);
    doclist va2 = split_docs(dir, 9, M1C_SPLIT_VALID, 7, 50, tokens);
    cr_assert_eq(tr2.n, tr.n);
    cr_assert_eq(va2.n, va.n);
    for (int i = 0; i < va2.n; i++) cr_assert_geq(doclist_find(&va, va2.d[i]), 0);
    for (int i = 0; i < tr2.n; i++) cr_assert_geq(doclist_find(&tr, tr2.d[i]), 0);
    doclist_free(&tr), doclist_free(&va), doclist_free(&tr2), doclist_free(&va2);
    rm_tree(dir);
    free(dir);
}

Test(data_text, ranks_read_disjoint_documents) {
    enum { N = 30 };
    char *dir = numbered_corpus("docs", "doc", N);
    const char *cfg = "sources = ( { path = \"docs\"; separator = \"%\"; } ); valid_fraction = 0.0;";
    doclist first[2];
    for (int r = 0; r < 2; r++) {
        inst x = open_ok("text", cfg, 4, r, 2, dir);
        stream s = read_stream(&x, M1C_SPLIT_TRAIN, 2, 10, N * 12);
        doclist l = parse_docs(s.t, s.n);
        cr_assert_geq(l.n, N / 2);
        first[r] = (doclist){0};
        for (int i = 0; i < N / 2; i++) doclist_push(&first[r], strdup(l.d[i])); /* rank r's first epoch */
        doclist_free(&l);
        free(s.t);
        close_inst(&x);
    }
    for (int i = 0; i < N / 2; i++) {
        cr_assert_lt(doclist_find(&first[1], first[0].d[i]), 0, "'%s' read by both ranks in epoch 0", first[0].d[i]);
        for (int j = 0; j < i; j++) cr_assert_str_neq(first[0].d[i], first[0].d[j], "rank 0 repeats a document");
    }
    doclist_free(&first[0]), doclist_free(&first[1]);
    rm_tree(dir);
    free(dir);
}

Test(data_text, mixture_follows_weights) {
    /* three sources with disjoint alphabets, so a row's bytes tell its source */
    char *dir = tmp_dir();
    write_file(dir, "x", "xxxx xxx\n%\nxx x\n%\nxxxxxx\n", 25);
    write_file(dir, "y", "yyy\n%\nyyyyyyy yy\n", 17);
    write_file(dir, "z", "zzzzz\n", 6);
    write_file(dir, "w", "wwww\n", 5);
    inst x = open_ok("text",
                     "sources = ( { path = \"x\"; separator = \"%\"; weight = 1.0; },"
                     " { path = \"y\"; separator = \"%\"; weight = 3.0; },"
                     " { path = \"w\"; weight = 0.0; },"
                     " { path = \"z\"; weight = 4.0; } ); valid_fraction = 0.0;",
                     21, 0, 1, dir);
    enum { B = 50, T = 6, NB = 80 };
    int32_t tok[B * (T + 1)];
    float mask[B * T];
    int count[4] = {0}; /* x, y, z, w */
    for (int i = 0; i < NB; i++) {
        batch(&x, M1C_SPLIT_TRAIN, B, T, tok, mask);
        for (int b = 0; b < B; b++) {
            int src = -1;
            for (int t = 0; t <= T; t++) {
                int32_t v = tok[b * (T + 1) + t];
                int s = v == 'x' ? 0 : v == 'y' ? 1 : v == 'z' ? 2 : v == 'w' ? 3 : -1;
                if (s < 0) continue;
                cr_assert(src < 0 || src == s, "row mixes two sources");
                src = s;
            }
            cr_assert_geq(src, 0, "a row of 7 tokens holds at least one document byte");
            count[src]++;
        }
    }
    int n = B * NB;
    cr_assert_eq(count[3], 0, "a source of weight 0 is never drawn");
    /* each count is binomial(n = 4000, p): 5 standard deviations, sqrt(n p (1-p)) <= 31.6, is the
     * tolerance: a correct sampler falls outside with probability < 1e-6, while a sampler that
     * ignored the weights (p = 1/3) would miss x (p = 1/8) by ~ 830 rows */
    const double p[3] = {1.0 / 8, 3.0 / 8, 4.0 / 8};
    for (int s = 0; s < 3; s++) {
        double sd = sqrt(n * p[s] * (1 - p[s]));
        cr_assert(fabs(count[s] - n * p[s]) <= 5 * sd, "source %d: %d rows of %d, expected %.0f +- %.0f", s,
                  count[s], n, n * p[s], 5 * sd);
    }
    close_inst(&x);
    rm_tree(dir);
    free(dir);
}

/* ---- synth-math: an independent evaluator -------------------------------------------------- */

/* expr := term (('+' | '-') term)*; term := number ('*' number)*; numbers are non-negative decimals
 * with no leading zero. Returns 0 on a syntax error or overflow. */
typedef struct ev {
    const char *s;
    int ops, min_digits, max_digits;
} ev;

static int ev_number(ev *e, long long *v) {
    const char *st = e->s;
    *v = 0;
    while (*e->s >= '0' && *e->s <= '9') {
        if (__builtin_mul_overflow(*v, 10, v) || __builtin_add_overflow(*v, *e->s - '0', v)) return 0;
        e->s++;
    }
    int d = (int)(e->s - st);
    if (d == 0 || (d > 1 && st[0] == '0')) return 0;
    if (d < e->min_digits) e->min_digits = d;
    if (d > e->max_digits) e->max_digits = d;
    return 1;
}

static int ev_term(ev *e, long long *v) {
    if (!ev_number(e, v)) return 0;
    while (*e->s == '*') {
        e->s++, e->ops++;
        long long r;
        if (!ev_number(e, &r) || __builtin_mul_overflow(*v, r, v)) return 0;
    }
    return 1;
}

static int ev_expr(ev *e, long long *v) {
    if (!ev_term(e, v)) return 0;
    while (*e->s == '+' || *e->s == '-') {
        char op = *e->s++;
        e->ops++;
        long long r;
        if (!ev_term(e, &r)) return 0;
        if (op == '+' ? __builtin_add_overflow(*v, r, v) : __builtin_sub_overflow(*v, r, v)) return 0;
    }
    return 1;
}

/* Check one problem text "Q: <expr>=?\nA: <steps> #### <answer>\n": the expression's value by the
 * evaluator above, each step's arithmetic, and the answer. Returns the answer; fills ops/digits. */
static long long check_problem(const char *text, int *ops, int *min_d, int *max_d) {
    cr_assert(!strncmp(text, "Q: ", 3), "problem starts with 'Q: ': %s", text);
    ev e = {text + 3, 0, 99, 0};
    long long want;
    cr_assert(ev_expr(&e, &want), "expression does not parse: %s", text);
    cr_assert(!strncmp(e.s, "=?\nA:", 5), "expression ends with '=?\\nA:': %s", text);
    const char *p = e.s + 5;
    long long last = 0;
    int steps = 0;
    while (!strncmp(p, " ", 1) && strncmp(p, " ####", 5)) {
        long long a, b, c;
        char op;
        int n = 0;
        cr_assert_eq(sscanf(p, " %lld%c%lld=%lld.%n", &a, &op, &b, &c, &n), 4, "step %d does not parse: %s", steps,
                     text);
        cr_assert(n > 0);
        long long r = op == '+' ? a + b : op == '-' ? a - b : a * b;
        cr_assert(op == '+' || op == '-' || op == '*', "step operator '%c': %s", op, text);
        cr_assert_eq(r, c, "step %lld%c%lld=%lld is wrong: %s", a, op, b, c, text);
        last = c;
        steps++;
        p += n;
    }
    cr_assert_eq(steps, e.ops, "one step per operator: %s", text);
    long long ans;
    int n = 0;
    cr_assert_eq(sscanf(p, " #### %lld\n%n", &ans, &n), 1, "no answer: %s", text);
    cr_assert(n > 0 && p[n] == '\0', "text after the answer: %s", text);
    cr_assert_eq(ans, want, "answer %lld, the expression is %lld: %s", ans, want, text);
    cr_assert_eq(ans, last, "the last step gives the answer: %s", text);
    *ops = e.ops, *min_d = e.min_digits, *max_d = e.max_digits;
    return ans;
}

static char *decode_alloc(inst *x, const int32_t *ids, int64_t n) {
    int64_t k = x->vt->decode(x->self, ids, n, NULL, 0);
    cr_assert_geq(k, 0);
    char *s = malloc((size_t)k + 1);
    cr_assert_eq(x->vt->decode(x->self, ids, n, s, k + 1), k);
    return s;
}

Test(data_math, problems_are_correct) {
    struct {
        int lo, hi, ops;
    } cases[] = {{1, 1, 1}, {1, 3, 2}, {2, 4, 3}, {6, 6, 4}, {1, 6, 4}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char cfg[160];
        snprintf(cfg, sizeof cfg, "min_digits = %d; max_digits = %d; max_ops = %d; mode = \"pretrain\";", cases[c].lo,
                 cases[c].hi, cases[c].ops);
        inst x = open_ok("synth-math", cfg, 1234 + c, 0, 1, NULL);
        stream s = read_stream(&x, M1C_SPLIT_TRAIN, 8, 64, 60000); /* >= 200 problems of <= 300 tokens */
        doclist l = parse_docs(s.t, s.n);
        cr_assert_geq(l.n, 100);
        int seen_ops[5] = {0}, seen_digits[7] = {0}, opchar[3] = {0};
        for (int i = 0; i < l.n; i++) {
            int ops, lo, hi;
            check_problem(l.d[i], &ops, &lo, &hi);
            cr_assert(ops >= 1 && ops <= cases[c].ops, "%d operators: %s", ops, l.d[i]);
            cr_assert(lo >= cases[c].lo && hi <= cases[c].hi, "operand digits %d..%d: %s", lo, hi, l.d[i]);
            seen_ops[ops]++, seen_digits[lo]++, seen_digits[hi]++;
            const char *q = strchr(l.d[i], '=');
            for (const char *t = l.d[i] + 3; t < q; t++)
                opchar[0] += *t == '+', opchar[1] += *t == '-', opchar[2] += *t == '*';
        }
        /* >= 100 problems drawn uniformly: each operator count, each operator and both digit bounds
         * appear (the chance that one of them does not is < 1e-6 for every case here) */
        for (int k = 1; k <= cases[c].ops; k++) cr_assert_gt(seen_ops[k], 0, "case %zu: no problem with %d ops", c, k);
        cr_assert(seen_digits[cases[c].lo] && seen_digits[cases[c].hi], "case %zu: digit range not covered", c);
        cr_assert(opchar[0] && opchar[1] && opchar[2], "case %zu: an operator never appears", c);
        doclist_free(&l);
        free(s.t);
        close_inst(&x);
    }
}

static float reward_of(inst *x, int split, int64_t k, const char *text) {
    int32_t ids[256];
    int64_t n = x->vt->encode(x->self, text, (int64_t)strlen(text), ids, 256);
    cr_assert_leq(n, 256);
    float r = -1;
    cr_assert_eq(x->vt->reward(x->self, split, k, ids, n, &r), M1C_OK, "%s", x->p->error);
    return r;
}

/* Prompt k of a split: its tokens into ids (room for 256), returning the count. */
static int64_t prompt_of(inst *x, int split, int64_t k, int32_t *ids) {
    int64_t len = -1;
    cr_assert_eq(x->vt->prompt(x->self, split, k, ids, 256, &len), M1C_OK, "prompt %d/%lld: %s", split, (long long)k,
                 x->p->error);
    cr_assert(len > 1 && len <= 256);
    return len;
}

Test(data_math, sft_mask_prompt_and_reward) {
    inst x = open_ok("synth-math", "min_digits = 1; max_digits = 3; max_ops = 3; mode = \"sft\";", 77, 0, 1, NULL);
    enum { B = 6, T = 160 }; /* the longest problem of these settings has ~110 tokens */
    int32_t tok[B * (T + 1)];
    float mask[B * T];
    batch(&x, M1C_SPLIT_TRAIN, B, T, tok, mask);
    for (int b = 0; b < B; b++) {
        const int32_t *row = tok + b * (T + 1);
        const float *m = mask + b * T;
        int64_t g = b; /* rows hold the split's problems in order */
        cr_assert_eq(row[0], BOS);
        /* the solution starts after "\nA:" and ends with EOS; PAD follows */
        int a = -1, e = -1;
        for (int t = 3; t <= T && a < 0; t++)
            if (row[t - 2] == '\n' && row[t - 1] == 'A' && row[t] == ':') a = t + 1;
        for (int t = 0; t <= T && e < 0; t++)
            if (row[t] == EOS) e = t;
        cr_assert(a > 0 && e > a, "row %d: no prompt/solution/EOS", b);
        for (int t = e + 1; t <= T; t++) cr_assert_eq(row[t], PAD, "row %d: PAD after EOS", b);
        /* the mask covers exactly the targets row[a..e]: the solution and its EOS */
        for (int t = 0; t < T; t++)
            cr_assert_eq(m[t], (t + 1 >= a && t + 1 <= e) ? 1.0f : 0.0f, "row %d: mask at %d (solution %d..%d)", b, t,
                         a, e);

        char *text = decode_alloc(&x, row, e + 1);
        int ops, lo, hi;
        long long ans = check_problem(text, &ops, &lo, &hi);

        /* prompt(g) is this row's prefix */
        int32_t prompt[256];
        int64_t len;
        cr_assert_eq(x.vt->prompt(x.self, M1C_SPLIT_TRAIN, g, prompt, 256, &len), M1C_OK, "%s", x.p->error);
        cr_assert_eq(len, a, "prompt of problem %lld is the row up to the solution", (long long)g);
        cr_assert(!memcmp(prompt, row, sizeof(int32_t) * (size_t)a));
        cr_assert_eq(x.vt->prompt(x.self, M1C_SPLIT_TRAIN, g, prompt, a - 1, &len), M1C_ERR, "short buffer refused");

        /* the verifier: the row's own solution (with EOS) scores 1 */
        float r = -1;
        cr_assert_eq(x.vt->reward(x.self, M1C_SPLIT_TRAIN, g, row + a, e + 1 - a, &r), M1C_OK, "%s", x.p->error);
        cr_assert_eq(r, 1.0f, "row %d: its own solution scores %f", b, r);
        char buf[64];
        snprintf(buf, sizeof buf, "#### %lld", ans);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 1.0f, "the bare answer scores 1");
        snprintf(buf, sizeof buf, "some steps. ####   %lld\nmore", ans);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 1.0f, "spaces and text after the answer line are fine");
        snprintf(buf, sizeof buf, "#### %lld", ans + 1);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "a wrong answer scores 0");
        snprintf(buf, sizeof buf, "#### %lld7", ans);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "a longer number scores 0");
        snprintf(buf, sizeof buf, "#### %lld.5", ans);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "a non-integer scores 0");
        snprintf(buf, sizeof buf, "the answer is %lld", ans);
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "no #### scores 0");
        if (ans != 0) {
            snprintf(buf, sizeof buf, "#### %lld", -ans);
            cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "the wrong sign scores 0");
        }
        cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, ""), 0.0f, "an empty response scores 0");
        free(text);
    }
    /* indices outside a split and unknown splits are refused */
    int64_t len;
    int32_t ids[256];
    float r = -1;
    cr_assert_eq(x.vt->prompt(x.self, M1C_SPLIT_TRAIN, -1, ids, 256, &len), M1C_ERR);
    cr_assert_eq(x.vt->prompt(x.self, 2, 0, ids, 256, &len), M1C_ERR);
    cr_assert_eq(x.vt->reward(x.self, M1C_SPLIT_VALID, -1, ids, 0, &r), M1C_ERR);
    cr_assert_eq(x.vt->reward(x.self, 2, 0, ids, 0, &r), M1C_ERR);
    /* too short a row for a problem is an error that says so */
    int32_t small[2 * 9];
    float smask[2 * 8];
    cr_assert_eq(x.vt->next_batch(x.self, M1C_SPLIT_TRAIN, 2, 8, small, smask), M1C_ERR);
    cr_assert(strstr(x.p->error, "T+1"), "%s", x.p->error);
    close_inst(&x);
}

Test(data_math, negative_answers_verify) {
    /* subtraction makes negative results; the verifier must read the sign */
    inst x = open_ok("synth-math", "min_digits = 1; max_digits = 2; max_ops = 1; mode = \"sft\";", 5, 0, 1, NULL);
    enum { B = 64, T = 48 };
    int32_t tok[B * (T + 1)];
    float mask[B * T];
    batch(&x, M1C_SPLIT_TRAIN, B, T, tok, mask);
    int found = 0;
    for (int b = 0; b < B; b++) {
        int64_t g = b;
        int e = 0;
        while (tok[b * (T + 1) + e] != EOS) e++;
        char *text = decode_alloc(&x, tok + b * (T + 1), e);
        int ops, lo, hi;
        long long ans = check_problem(text, &ops, &lo, &hi);
        if (ans < 0) {
            char buf[64];
            snprintf(buf, sizeof buf, "#### %lld", ans);
            cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 1.0f, "%s", text);
            snprintf(buf, sizeof buf, "#### %lld", -ans);
            cr_assert_eq(reward_of(&x, M1C_SPLIT_TRAIN, g, buf), 0.0f, "%s", text);
            found++;
        }
        free(text);
    }
    /* one operator, - with probability 1/3 and then negative about half the time: among 64 problems
     * none negative has probability (5/6)^64 < 1e-5 */
    cr_assert_gt(found, 0);
    close_inst(&x);
}

Test(data_math, splits_determinism_positions) {
    const char *cfgs[] = {"min_digits = 3; max_digits = 6; max_ops = 4; mode = \"sft\";",
                          "min_digits = 3; max_digits = 6; max_ops = 4; mode = \"pretrain\";"};
    for (int c = 0; c < 2; c++) {
        inst a = open_ok("synth-math", cfgs[c], 3, 0, 1, NULL), b = open_ok("synth-math", cfgs[c], 3, 0, 1, NULL);
        inst o = open_ok("synth-math", cfgs[c], 4, 0, 1, NULL);
        /* sft rows must hold the longest problem of 6 digits and 4 operators (under 300 tokens) */
        cr_assert(same_batches(&a, &b, M1C_SPLIT_TRAIN, 4, 320, 3), "same seed, same batches");
        cr_assert(same_batches(&a, &b, M1C_SPLIT_VALID, 4, 320, 3), "same seed, same validation batches");
        inst a2 = open_ok("synth-math", cfgs[c], 3, 0, 1, NULL);
        cr_assert(!same_batches(&a2, &o, M1C_SPLIT_TRAIN, 4, 320, 1), "another seed, other batches");

        /* resume: a continuation after load equals the uninterrupted one, for both splits */
        int64_t n = a.vt->save_position(a.self, NULL, 0);
        unsigned char pos[256];
        cr_assert_leq(n, 256);
        cr_assert_eq(a.vt->save_position(a.self, pos, n), n);
        inst r = open_ok("synth-math", cfgs[c], 3, 0, 1, NULL);
        cr_assert_eq(r.vt->load_position(r.self, pos, n), M1C_OK, "%s", r.p->error);
        cr_assert(same_batches(&a, &r, M1C_SPLIT_VALID, 3, 333, 4), "validation continues identically");
        cr_assert(same_batches(&a, &r, M1C_SPLIT_TRAIN, 3, 321, 4), "training continues identically");
        cr_assert_eq(o.vt->load_position(o.self, pos, n), M1C_ERR, "another seed's position is refused");
        close_inst(&a), close_inst(&b), close_inst(&o), close_inst(&a2), close_inst(&r);
    }

    /* the validation rows are exactly the validation prompts 0, 1, 2, ... in order */
    inst x = open_ok("synth-math", cfgs[0], 3, 0, 1, NULL);
    enum { B = 5, T = 320 };
    int32_t tok[B * (T + 1)];
    float mask[B * T];
    batch(&x, M1C_SPLIT_VALID, B, T, tok, mask);
    for (int k = 0; k < B; k++) {
        int32_t prompt[256];
        int64_t len = prompt_of(&x, M1C_SPLIT_VALID, k, prompt);
        cr_assert(!memcmp(prompt, tok + k * (T + 1), sizeof(int32_t) * (size_t)len), "validation row %d", k);
    }
    close_inst(&x);
}

/* The splits partition one sequence of problems: with valid_fraction = 0 the training split is that
 * whole sequence, and with f > 0 its first N problems are the first problems of the training and
 * validation splits, interleaved in order, floor(N f) of them in validation. */
Test(data_math, splits_partition_the_problems) {
    enum { N = 2000 };
    inst all = open_ok("synth-math", "min_digits = 3; max_digits = 6; max_ops = 4; valid_fraction = 0.0;", 8, 0, 1,
                       NULL);
    static int32_t want[N][256];
    static int64_t want_len[N];
    for (int i = 0; i < N; i++) want_len[i] = prompt_of(&all, M1C_SPLIT_TRAIN, i, want[i]);
    int64_t len;
    int32_t ids[256];
    cr_assert_eq(all.vt->prompt(all.self, M1C_SPLIT_VALID, 0, ids, 256, &len), M1C_ERR);
    cr_assert(strstr(all.p->error, "empty"), "valid_fraction = 0: %s", all.p->error);
    int32_t tok[2 * 9];
    float mask[2 * 8];
    cr_assert_eq(all.vt->next_batch(all.self, M1C_SPLIT_VALID, 2, 8, tok, mask), M1C_ERR);
    close_inst(&all);

    /* f = 0.125 is exact in binary: floor(2000 f) = 250. f = 0.05 is kept to 2^-24, which may move the
     * count from floor(2000 f) = 100 by one. */
    const char *cfgs[] = {"valid_fraction = 0.125;", "valid_fraction = 0.05;"};
    const int expect[] = {250, 100}, slack[] = {0, 1};
    for (int c = 0; c < 2; c++) {
        char cfg[160];
        snprintf(cfg, sizeof cfg, "min_digits = 3; max_digits = 6; max_ops = 4; %s", cfgs[c]);
        inst x = open_ok("synth-math", cfg, 8, 0, 1, NULL);
        int64_t t = 0, v = 0;
        int32_t pt[256], pv[256];
        int64_t nt = prompt_of(&x, M1C_SPLIT_TRAIN, t, pt), nv = prompt_of(&x, M1C_SPLIT_VALID, v, pv);
        for (int i = 0; i < N; i++) {
            size_t bytes = sizeof(int32_t) * (size_t)want_len[i];
            /* operands of 3 to 6 digits: two distinct problems with the same text have probability
             * < 1e-9 here, so a match names the problem */
            if (nt == want_len[i] && !memcmp(pt, want[i], bytes)) nt = prompt_of(&x, M1C_SPLIT_TRAIN, ++t, pt);
            else if (nv == want_len[i] && !memcmp(pv, want[i], bytes)) nv = prompt_of(&x, M1C_SPLIT_VALID, ++v, pv);
            else cr_assert_fail("%s: problem %d of the sequence is not next in either split", cfgs[c], i);
        }
        cr_assert_eq(t + v, N);
        cr_assert(llabs(v - expect[c]) <= slack[c], "%s: %lld of %d problems in validation, expected %d", cfgs[c],
                  (long long)v, N, expect[c]);
        close_inst(&x);
    }

    /* the last index of a split works at either end of the fraction's range (the id arithmetic stays
     * inside int64: UBSan would report an overflow) and the next one is refused */
    const char *ends[] = {"valid_fraction = 1e-7;", "valid_fraction = 0.5;"};
    for (int c = 0; c < 2; c++) {
        inst x = open_ok("synth-math", ends[c], 8, 0, 1, NULL);
        int32_t p[256];
        for (int sp = 0; sp < 2; sp++) {
            prompt_of(&x, sp, (1LL << 38) - 1, p);
            cr_assert_eq(x.vt->prompt(x.self, sp, 1LL << 38, p, 256, &len), M1C_ERR, "%s split %d", ends[c], sp);
        }
        close_inst(&x);
    }
}

/* Data-parallel rank r of W reads problems r, r + W, ... of each split, in sft rows and pretraining
 * streams alike. */
Test(data_math, ranks_read_their_problems) {
    for (int r = 0; r < 3; r++) {
        inst x = open_ok("synth-math", "max_ops = 3; mode = \"sft\";", 6, r, 3, NULL);
        enum { B = 4, T = 160 };
        int32_t tok[B * (T + 1)];
        float mask[B * T];
        for (int sp = 0; sp < 2; sp++) {
            batch(&x, sp, B, T, tok, mask);
            for (int b = 0; b < B; b++) {
                int32_t prompt[256];
                int64_t len = prompt_of(&x, sp, r + 3 * b, prompt);
                cr_assert(!memcmp(prompt, tok + b * (T + 1), sizeof(int32_t) * (size_t)len),
                          "rank %d split %d row %d is not problem %d", r, sp, b, r + 3 * b);
            }
        }
        close_inst(&x);

        x = open_ok("synth-math", "max_ops = 3; mode = \"pretrain\";", 6, r, 3, NULL);
        stream s = read_stream(&x, M1C_SPLIT_TRAIN, 2, 50, 2000);
        doclist l = parse_docs(s.t, s.n);
        cr_assert_geq(l.n, 5);
        for (int j = 0; j < 5; j++) {
            int32_t prompt[256];
            int64_t len = prompt_of(&x, M1C_SPLIT_TRAIN, r + 3 * j, prompt);
            char *text = decode_alloc(&x, prompt, len);
            cr_assert(!strncmp(l.d[j], text, strlen(text)), "rank %d document %d: %s is not problem %d (%s)", r, j,
                      l.d[j], r + 3 * j, text);
            free(text);
        }
        doclist_free(&l);
        free(s.t);
        close_inst(&x);
    }
}

Test(data_math, settings_are_checked) {
    inst x;
    cr_assert_eq(try_open(&x, "synth-math", "min_digits = 4; max_digits = 2;", 1, 0, 1, NULL), M1C_ERR);
    /* a relation between keys: refused through settings_error, so it names test.cfg:1 and the key */
    cr_assert(strstr(x.p->error, "test.cfg:1") && strstr(x.p->error, "max_digits") &&
                  strstr(x.p->error, "min_digits"),
              "%s", x.p->error);
    m1c_config_free(x.cfg);
    cr_assert_eq(try_open(&x, "synth-math", "max_ops = 5;", 1, 0, 1, NULL), M1C_ERR);
    cr_assert(strstr(x.p->error, "max_ops"), "%s", x.p->error);
    m1c_config_free(x.cfg);
    cr_assert_eq(try_open(&x, "synth-math", "mode = \"rl\";", 1, 0, 1, NULL), M1C_ERR);
    cr_assert(strstr(x.p->error, "mode"), "%s", x.p->error);
    m1c_config_free(x.cfg);
}
