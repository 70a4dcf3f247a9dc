/* `text` data plugin: pre-training batches from text files (files, directories, globs), split into
 * documents, assigned to train/valid by hash, shuffled per epoch, packed as BOS doc EOS and mixed by weight.
 *
 * Settings:
 *   sources = ( { path = "fortunes/";    a file, a directory (its regular files, sorted) or a glob(3)
 *                                        pattern; relative paths resolve against the config's folder
 *                 weight = 1.0;          share of the rows drawn from this source (normalised)
 *                 separator = "%";       a line of exactly this text ends a document; "" (default): one
 *                                        document per file
 *                 exclude = ["*.dat"]; } globs on the file name to skip
 *             , ... );
 *   valid_fraction = 0.05;               documents (not bytes) that go to the validation split
 *   tokenizer = "byte";
 *
 * Create checks the settings and that every source names at least one readable file; the files are
 * read and split into documents on the first call that needs them (next_batch, save_position,
 * load_position), so commands that only need the tokenizer (generate, logits) start at once.
 *
 * Reading: each split keeps, per source, a stream (epoch, place in that epoch's document order, token
 * offset in the current document) and one mixing RNG. A batch row draws its source from the RNG by
 * weight and takes the next T+1 tokens of that source's stream; the stream then advances by T, so the
 * last token of a row is the first of the next row drawn from that source and every token is a target
 * once. Data-parallel rank r of W reads places r, r+W, ... of each epoch's order.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "m1c/plugin.h"
#include "../common/data_util.h"
#include "../common/tokenizer.h"

#define TEXT_MAGIC 0x315458455443314DULL /* "M1CTEXT1" as little-endian bytes */

typedef struct strlist {
    char **s;
    int n, cap;
} strlist;

typedef struct text_source {
    char *path;        /* as configured */
    double weight;
    char *sep;         /* separator line, "" for one document per file */
    strlist files;     /* the files to read (exclusions applied), sorted */
    /* the corpus, filled in by load_corpus */
    char *bytes;       /* every document's text, back to back */
    int64_t *doc_off;  /* [n_docs + 1]: document j is bytes[doc_off[j] .. doc_off[j+1]) */
    int64_t n_docs, cap_docs, n_bytes, cap_bytes;
    int64_t *split_docs[2]; /* document indices of each split, in corpus order */
    int64_t n_split[2];
} text_source;

/* The reading position in one (split, source), plus caches derived from it. */
typedef struct text_stream {
    uint64_t epoch;
    int64_t k;   /* place in the epoch's order (k < n, and k = start (mod stride)) */
    int64_t off; /* token offset into the current document, always < its length */
    /* caches, rebuilt on demand; never saved */
    int64_t *order;       /* [n]: this epoch's permutation of the split's documents */
    uint64_t order_epoch;
    int order_valid;
    int32_t *doc;         /* BOS text EOS of the current document */
    int64_t doc_len, doc_cap;
    int64_t doc_id;       /* which document doc holds (index into the source), -1 none */
} text_stream;

typedef struct text_split {
    m1c_rng rng;          /* draws each row's source */
    text_stream *streams; /* [n_sources] */
    double *cum;          /* [n_sources] cumulative normalised weights over sources with documents */
    double total;         /* sum of the weights of sources with documents in this split */
    int64_t n_docs;       /* over every source */
} text_split;

typedef struct text_data {
    const m1c_host *h;
    m1c_tokenizer *tok;
    uint64_t seed;
    int rank, world;
    double valid_fraction;
    int n_sources;
    text_source *src;
    text_split split[2];
    uint64_t fingerprint; /* of everything a saved position depends on */
    int loaded;           /* the corpus is read and split */
} text_data;

/* ---- corpus loading ------------------------------------------------------------------------ */

static int strlist_push(strlist *l, const char *s) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        char **p = realloc(l->s, (size_t)cap * sizeof *p);
        if (!p) return M1C_ERR;
        l->s = p;
        l->cap = cap;
    }
    if (!(l->s[l->n] = strdup(s))) return M1C_ERR;
    l->n++;
    return M1C_OK;
}

static void strlist_free(strlist *l) {
    for (int i = 0; i < l->n; i++) free(l->s[i]);
    free(l->s);
    l->s = NULL;
    l->n = l->cap = 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static char *join_path(const char *dir, const char *rel) {
    if (rel[0] == '/' || !dir || !dir[0]) return strdup(rel);
    size_t a = strlen(dir), b = strlen(rel);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, rel, b + 1);
    return p;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static int is_regular(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The files a configured path names (source group grp), sorted by byte order (so the corpus order never
 * depends on the locale). An empty result is the caller's error. */
static int list_files(const m1c_host *h, const m1c_settings *grp, const char *shown, const char *full, strlist *out) {
    struct stat st;
    if (stat(full, &st) == 0) {
        if (S_ISREG(st.st_mode)) return strlist_push(out, full) ? h->error(h, "out of memory") : M1C_OK;
        if (!S_ISDIR(st.st_mode)) return m1c_setting_error(h, grp, "path", "'%s' is neither a file nor a directory", shown);
        DIR *dir = opendir(full);
        if (!dir) return m1c_setting_error(h, grp, "path", "cannot open directory '%s': %s", shown, strerror(errno));
        struct dirent *e;
        int rc = M1C_OK;
        while (rc == M1C_OK && (e = readdir(dir))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            char *f = join_path(full, e->d_name);
            if (!f || (is_regular(f) && strlist_push(out, f))) rc = h->error(h, "out of memory");
            free(f);
        }
        closedir(dir);
        if (rc != M1C_OK) return rc;
    } else if (strpbrk(full, "*?[")) {
        glob_t g;
        int r = glob(full, 0, NULL, &g);
        if (r != 0 && r != GLOB_NOMATCH) {
            globfree(&g);
            return m1c_setting_error(h, grp, "path", "cannot expand '%s'", shown);
        }
        int rc = M1C_OK;
        for (size_t k = 0; r == 0 && k < g.gl_pathc && rc == M1C_OK; k++)
            if (is_regular(g.gl_pathv[k]) && strlist_push(out, g.gl_pathv[k])) rc = h->error(h, "out of memory");
        globfree(&g);
        if (rc != M1C_OK) return rc;
    } else {
        return m1c_setting_error(h, grp, "path", "'%s' (%s): %s", shown, full, strerror(errno));
    }
    if (out->n > 1) qsort(out->s, (size_t)out->n, sizeof *out->s, cmp_str);
    return M1C_OK;
}

/* Whole file into memory (NUL-terminated for convenience); M1C_ERR with a message on failure. */
static int read_file(text_data *d, const char *path, char **buf, int64_t *len) {
    const m1c_host *h = d->h;
    FILE *f = fopen(path, "rb");
    if (!f) return h->error(h, "cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        if (n + 1 >= cap) {
            char *nb = realloc(b, cap * 2);
            if (!nb) break;
            b = nb;
            cap *= 2;
        }
        size_t r = fread(b + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (!b || n + 1 >= cap) {
        free(b);
        return h->error(h, "out of memory reading '%s'", path);
    }
    if (err) {
        free(b);
        return h->error(h, "error reading '%s'", path);
    }
    b[n] = '\0';
    *buf = b;
    *len = (int64_t)n;
    return M1C_OK;
}

/* Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF) and no NUL byte.
 * Returns the offset of the first bad byte, or -1 if the text is fine. */
static int64_t bad_utf8(const unsigned char *s, int64_t n) {
    int64_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c == 0) return i;
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        unsigned lo = 0x80, hi = 0xBF; /* range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else
            return i;
        if (i + len > n) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (int k = 2; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += len;
    }
    return -1;
}

static int add_doc(text_data *d, text_source *s, const char *text, int64_t len) {
    int blank = 1;
    for (int64_t i = 0; i < len && blank; i++)
        if (!strchr(" \t\r\n\f\v", text[i])) blank = 0;
    if (blank) return M1C_OK; /* empty pieces (e.g. after a file's last separator) are not documents */
    if (s->n_docs + 2 > s->cap_docs) {
        int64_t cap = s->cap_docs ? 2 * s->cap_docs : 256;
        int64_t *p = realloc(s->doc_off, (size_t)cap * sizeof *p);
        if (!p) return d->h->error(d->h, "out of memory");
        s->doc_off = p;
        s->cap_docs = cap;
    }
    if (s->n_bytes + len > s->cap_bytes) {
        int64_t cap = s->cap_bytes ? s->cap_bytes : 1 << 16;
        while (cap < s->n_bytes + len) cap *= 2;
        char *p = realloc(s->bytes, (size_t)cap);
        if (!p) return d->h->error(d->h, "out of memory");
        s->bytes = p;
        s->cap_bytes = cap;
    }
    memcpy(s->bytes + s->n_bytes, text, (size_t)len);
    s->doc_off[s->n_docs] = s->n_bytes;
    s->n_bytes += len;
    s->n_docs++;
    s->doc_off[s->n_docs] = s->n_bytes;
    return M1C_OK;
}

/* Split a file's text into documents at lines equal to sep ("" = the whole file is one document).
 * A document keeps the newline of its last line; a trailing '\r' is ignored when matching sep. */
static int split_docs(text_data *d, text_source *s, const char *buf, int64_t n, const char *sep) {
    if (!sep[0]) return add_doc(d, s, buf, n);
    size_t sl = strlen(sep);
    int64_t start = 0, p = 0;
    while (p < n) {
        const char *nl = memchr(buf + p, '\n', (size_t)(n - p));
        int64_t end = nl ? nl - buf : n; /* the line is buf[p .. end) */
        int64_t ll = end - p;
        if (ll > 0 && buf[end - 1] == '\r') ll--;
        if ((size_t)ll == sl && memcmp(buf + p, sep, sl) == 0) {
            if (add_doc(d, s, buf + start, p - start)) return M1C_ERR;
            start = nl ? end + 1 : n;
        }
        p = nl ? end + 1 : n;
    }
    return add_doc(d, s, buf + start, n - start);
}

/* Read the files of source i and split them into documents. */
static int load_source(text_data *d, int i) {
    const m1c_host *h = d->h;
    text_source *s = &d->src[i];
    int rc = M1C_OK;
    for (int f = 0; rc == M1C_OK && f < s->files.n; f++) {
        char *buf = NULL;
        int64_t len = 0;
        if ((rc = read_file(d, s->files.s[f], &buf, &len))) break;
        int64_t bad = bad_utf8((const unsigned char *)buf, len);
        if (bad >= 0)
            h->log(h, M1C_LOG_WARN, "skipping '%s': %s at byte %lld", s->files.s[f],
                   buf[bad] ? "not valid UTF-8" : "NUL byte", (long long)bad);
        else
            rc = split_docs(d, s, buf, len, s->sep);
        free(buf);
    }
    if (rc == M1C_OK && s->n_docs == 0)
        rc = h->error(h, "sources[%d]: '%s' holds no documents (empty, blank or not UTF-8)", i, s->path);
    return rc;
}

/* ---- splits and settings ------------------------------------------------------------------- */

static void text_destroy(void *self);

/* Where this rank starts in an epoch's order of n documents, and its step. */
static void shard(const text_data *d, int64_t n, int64_t *start, int64_t *stride) {
    *stride = n < d->world ? n : d->world;
    *start = d->rank % *stride;
}

/* Assign documents to splits and prepare the mixing tables. */
static int build_splits(text_data *d) {
    const m1c_host *h = d->h;
    for (int i = 0; i < d->n_sources; i++) {
        text_source *s = &d->src[i];
        for (int sp = 0; sp < 2; sp++) {
            s->split_docs[sp] = malloc((size_t)(s->n_docs ? s->n_docs : 1) * sizeof(int64_t));
            if (!s->split_docs[sp]) return h->error(h, "out of memory");
        }
        for (int64_t j = 0; j < s->n_docs; j++) {
            int sp = m1c_unit(m1c_hash3(d->seed, (uint64_t)i, (uint64_t)j)) < d->valid_fraction;
            s->split_docs[sp][s->n_split[sp]++] = j;
        }
    }
    for (int sp = 0; sp < 2; sp++) {
        text_split *x = &d->split[sp];
        x->streams = calloc((size_t)d->n_sources, sizeof *x->streams);
        x->cum = calloc((size_t)d->n_sources, sizeof *x->cum);
        if (!x->streams || !x->cum) return h->error(h, "out of memory");
        double total = 0;
        int last = -1; /* the last source a row can draw */
        for (int i = 0; i < d->n_sources; i++) {
            x->n_docs += d->src[i].n_split[sp];
            if (d->src[i].n_split[sp] && d->src[i].weight > 0) total += d->src[i].weight, last = i;
        }
        double c = 0;
        for (int i = 0; i < d->n_sources; i++) {
            if (d->src[i].n_split[sp] && total > 0) c += d->src[i].weight / total;
            x->cum[i] = i >= last && last >= 0 ? 1.0 : c; /* no draw may fall past `last` by rounding */
            x->streams[i].doc_id = -1;
            if (d->src[i].n_split[sp]) { /* this rank's first place in epoch 0 */
                int64_t start, stride;
                shard(d, d->src[i].n_split[sp], &start, &stride);
                x->streams[i].k = start;
            }
        }
        x->total = total;
        h->rng_seed(&x->rng, d->seed, m1c_hash3(0x74657874 /* "text" */, (uint64_t)sp, (uint64_t)d->rank));
        if (sp == M1C_SPLIT_TRAIN && total <= 0)
            return h->error(h, "sources: every source with training documents has weight 0");
    }
    if (d->split[M1C_SPLIT_TRAIN].n_docs == 0) return h->error(h, "empty corpus: no training documents");
    for (int i = 0; i < d->n_sources; i++)
        if (d->src[i].n_split[M1C_SPLIT_TRAIN] == 0)
            h->log(h, M1C_LOG_WARN, "'%s': all %lld documents fell into the validation split", d->src[i].path,
                   (long long)d->src[i].n_docs);
    if (d->valid_fraction > 0 && d->split[M1C_SPLIT_VALID].n_docs == 0)
        h->log(h, M1C_LOG_WARN, "no document fell into the validation split (valid_fraction = %g)",
               d->valid_fraction);

    uint64_t fp = m1c_hash3(TEXT_MAGIC, d->seed, ((uint64_t)d->rank << 32) | (uint32_t)d->world);
    fp = m1c_hash3(fp, m1c_double_bits(d->valid_fraction), (uint64_t)d->n_sources);
    fp = m1c_hash_str(fp, d->tok->name);
    for (int i = 0; i < d->n_sources; i++) {
        fp = m1c_hash3(fp, (uint64_t)d->src[i].n_docs, (uint64_t)d->src[i].n_bytes);
        fp = m1c_hash3(fp, m1c_double_bits(d->src[i].weight), (uint64_t)d->src[i].n_split[0]);
    }
    d->fingerprint = fp;
    return M1C_OK;
}

/* Free the corpus and everything derived from it, back to the state create left. */
static void corpus_free(text_data *d) {
    for (int sp = 0; sp < 2; sp++) {
        for (int i = 0; d->split[sp].streams && i < d->n_sources; i++) {
            free(d->split[sp].streams[i].order);
            free(d->split[sp].streams[i].doc);
        }
        free(d->split[sp].streams);
        free(d->split[sp].cum);
        memset(&d->split[sp], 0, sizeof d->split[sp]);
    }
    for (int i = 0; d->src && i < d->n_sources; i++) {
        text_source *s = &d->src[i];
        free(s->bytes);
        free(s->doc_off);
        free(s->split_docs[0]);
        free(s->split_docs[1]);
        s->bytes = NULL;
        s->doc_off = s->split_docs[0] = s->split_docs[1] = NULL;
        s->n_docs = s->cap_docs = s->n_bytes = s->cap_bytes = 0;
        s->n_split[0] = s->n_split[1] = 0;
    }
    d->fingerprint = 0;
    d->loaded = 0;
}

/* Read and split the corpus, once (a failure leaves nothing behind, so a later call tries again). */
static int load_corpus(text_data *d) {
    if (d->loaded) return M1C_OK;
    int rc = M1C_OK;
    for (int i = 0; rc == M1C_OK && i < d->n_sources; i++) rc = load_source(d, i);
    if (rc == M1C_OK) rc = build_splits(d);
    if (rc != M1C_OK) {
        corpus_free(d);
        return M1C_ERR;
    }
    d->loaded = 1;
    int64_t docs = 0, bytes = 0;
    for (int i = 0; i < d->n_sources; i++) docs += d->src[i].n_docs, bytes += d->src[i].n_bytes;
    d->h->log(d->h, M1C_LOG_INFO, "%d source%s, %lld documents (%lld train, %lld valid), %lld bytes", d->n_sources,
              d->n_sources == 1 ? "" : "s", (long long)docs, (long long)d->split[0].n_docs,
              (long long)d->split[1].n_docs, (long long)bytes);
    return M1C_OK;
}

/* The files of source i (settings group g), exclusions applied; refuses a path that names no readable
 * file. Reads no file. */
static int find_source_files(text_data *d, int i, const m1c_settings *g, const char *base_dir) {
    const m1c_host *h = d->h;
    text_source *x = &d->src[i];
    int n_exclude = 0;
    if (h->get_list_len(h, g, "exclude", &n_exclude)) return M1C_ERR;
    char *full = join_path(base_dir, x->path);
    if (!full) return h->error(h, "out of memory");
    strlist all = {0};
    int rc = list_files(h, g, x->path, full, &all);
    for (int f = 0; rc == M1C_OK && f < all.n; f++) {
        const char *b = base_name(all.s[f]);
        int skip = 0;
        for (int k = 0; rc == M1C_OK && !skip && k < n_exclude; k++) {
            const char *pat;
            if (h->get_list_string(h, g, "exclude", k, &pat)) rc = M1C_ERR;
            else skip = fnmatch(pat, b, 0) == 0;
        }
        if (rc == M1C_OK && !skip && strlist_push(&x->files, all.s[f])) rc = h->error(h, "out of memory");
    }
    int readable = 0, err = 0; /* one is enough here: any other that cannot be read is reported when loading */
    for (int f = 0; rc == M1C_OK && !readable && f < x->files.n; f++) {
        FILE *fp = fopen(x->files.s[f], "rb");
        if (fp) readable = 1, fclose(fp);
        else if (!err) err = errno;
    }
    if (rc == M1C_OK && all.n == 0)
        rc = m1c_setting_error(h, g, "path", "no files match '%s' (%s)", x->path, full);
    else if (rc == M1C_OK && x->files.n == 0)
        rc = m1c_setting_error(h, g, "exclude", "excludes every file of '%s'", x->path);
    else if (rc == M1C_OK && !readable)
        rc = m1c_setting_error(h, g, "path", "none of the %d files of '%s' can be read (first: %s: %s)", x->files.n,
                               x->path, x->files.s[0], strerror(err));
    strlist_free(&all);
    free(full);
    return rc;
}

static int text_create(const m1c_host *h, const m1c_settings *s, const m1c_data_info *info, void **self) {
    *self = NULL;
    text_data *d = calloc(1, sizeof *d);
    if (!d) return h->error(h, "out of memory");
    d->h = h;
    d->seed = info->seed;
    d->rank = info->rank;
    d->world = info->world > 0 ? info->world : 1;
    if (d->rank < 0 || d->rank >= d->world) {
        free(d);
        return h->error(h, "data-parallel rank %d outside world %d", info->rank, info->world);
    }

    int n = 0;
    const char *tok_name = NULL;
    const m1c_settings **groups = NULL;
    int rc = M1C_OK;
    if (h->get_list_len(h, s, "sources", &n)) rc = M1C_ERR;
    else if (n <= 0)
        rc = m1c_setting_error(h, s, "sources", "give at least one source, e.g. sources = ( { path = \"a.txt\"; } )");
    if (rc == M1C_OK) {
        d->n_sources = n;
        d->src = calloc((size_t)n, sizeof *d->src);
        groups = calloc((size_t)n, sizeof *groups);
        if (!d->src || !groups) rc = h->error(h, "out of memory");
    }
    double total_weight = 0;
    for (int i = 0; rc == M1C_OK && i < n; i++) {
        text_source *x = &d->src[i];
        const m1c_settings *g;
        const char *path, *sep;
        int n_exclude;
        if (h->get_list_group(h, s, "sources", i, &g) || h->get_string(h, g, "path", NULL, NULL, &path) ||
            h->get_float(h, g, "weight", 1.0, 0.0, 1e9, &x->weight) ||
            h->get_string(h, g, "separator", "", NULL, &sep) || h->get_list_len(h, g, "exclude", &n_exclude)) {
            rc = M1C_ERR;
            break;
        }
        groups[i] = g;
        total_weight += x->weight;
        if (!path[0]) rc = m1c_setting_error(h, g, "path", "empty path");
        else if (strchr(sep, '\n')) rc = m1c_setting_error(h, g, "separator", "must be one line");
        else if (!(x->path = strdup(path)) || !(x->sep = strdup(sep))) rc = h->error(h, "out of memory");
        for (int k = 0; rc == M1C_OK && k < n_exclude; k++) {
            const char *pat;
            if (h->get_list_string(h, g, "exclude", k, &pat)) rc = M1C_ERR;
        }
        if (rc == M1C_OK && h->settings_done(h, g)) rc = M1C_ERR;
    }
    if (rc == M1C_OK && total_weight <= 0) rc = m1c_setting_error(h, s, "sources", "every source has weight 0");
    if (rc == M1C_OK && h->get_float(h, s, "valid_fraction", 0.05, 0.0, 0.5, &d->valid_fraction)) rc = M1C_ERR;
    if (rc == M1C_OK && h->get_string(h, s, "tokenizer", "byte", m1c_tokenizer_names, &tok_name)) rc = M1C_ERR;
    if (rc == M1C_OK && h->settings_done(h, s)) rc = M1C_ERR;
    if (rc == M1C_OK) rc = m1c_tokenizer_create(h, tok_name, &d->tok);
    /* paths are looked at only once every setting has been checked; files are read later */
    for (int i = 0; rc == M1C_OK && i < d->n_sources; i++) rc = find_source_files(d, i, groups[i], info->base_dir);
    free(groups);
    if (rc != M1C_OK) {
        text_destroy(d);
        return M1C_ERR;
    }
    *self = d;
    return M1C_OK;
}

static void text_destroy(void *self) {
    text_data *d = self;
    if (!d) return;
    corpus_free(d);
    for (int i = 0; d->src && i < d->n_sources; i++) {
        free(d->src[i].path);
        free(d->src[i].sep);
        strlist_free(&d->src[i].files);
    }
    free(d->src);
    if (d->tok) d->tok->destroy(d->tok);
    free(d);
}

/* ---- reading ------------------------------------------------------------------------------- */

/* The current document of a stream, as BOS text EOS in st->doc (encoded on first use). */
static int stream_doc(text_data *d, int sp, int i, text_stream *st) {
    const m1c_host *h = d->h;
    text_source *s = &d->src[i];
    int64_t n = s->n_split[sp];
    if (!st->order_valid || st->order_epoch != st->epoch) {
        if (!st->order && !(st->order = malloc((size_t)n * sizeof *st->order))) return h->error(h, "out of memory");
        memcpy(st->order, s->split_docs[sp], (size_t)n * sizeof *st->order);
        m1c_rng r; /* Fisher-Yates from (seed, split, source, epoch): the same on every rank */
        h->rng_seed(&r, d->seed, m1c_hash3(((uint64_t)sp << 32) | (uint32_t)i, st->epoch, 0x73687566 /* "shuf" */));
        for (int64_t j = n - 1; j > 0; j--) {
            int64_t k = (int64_t)(h->rng_u64(&r) % (uint64_t)(j + 1));
            int64_t t = st->order[j];
            st->order[j] = st->order[k];
            st->order[k] = t;
        }
        st->order_epoch = st->epoch;
        st->order_valid = 1;
    }
    int64_t id = st->order[st->k];
    if (st->doc_id == id) return M1C_OK;
    const char *text = s->bytes + s->doc_off[id];
    int64_t len = s->doc_off[id + 1] - s->doc_off[id];
    int64_t need = d->tok->encode(d->tok, text, len, NULL, 0) + 2;
    if (need > st->doc_cap) {
        int32_t *p = realloc(st->doc, (size_t)need * sizeof *p);
        if (!p) return h->error(h, "out of memory");
        st->doc = p;
        st->doc_cap = need;
    }
    st->doc[0] = d->tok->bos;
    d->tok->encode(d->tok, text, len, st->doc + 1, need - 2);
    st->doc[need - 1] = d->tok->eos;
    st->doc_len = need;
    st->doc_id = id;
    return M1C_OK;
}

/* Copy the next n tokens of stream (sp, i) into out and advance past them. */
static int stream_read(text_data *d, int sp, int i, int32_t *out, int64_t n) {
    text_stream *st = &d->split[sp].streams[i];
    int64_t nd = d->src[i].n_split[sp], start, stride;
    shard(d, nd, &start, &stride);
    while (n > 0) {
        if (stream_doc(d, sp, i, st)) return M1C_ERR;
        int64_t c = st->doc_len - st->off;
        if (c > n) c = n;
        memcpy(out, st->doc + st->off, (size_t)c * sizeof *out);
        out += c;
        n -= c;
        st->off += c;
        if (st->off == st->doc_len) { /* keep the position on a real token: move to the next document */
            st->off = 0;
            st->k += stride;
            if (st->k >= nd) {
                st->epoch++;
                st->k = start;
            }
        }
    }
    return M1C_OK;
}

static int text_next_batch(void *self, int split, int B, int T, int32_t *tokens, float *mask) {
    text_data *d = self;
    const m1c_host *h = d->h;
    if (split != M1C_SPLIT_TRAIN && split != M1C_SPLIT_VALID) return h->error(h, "unknown split %d", split);
    if (B <= 0 || T <= 0) return h->error(h, "batch shape B=%d T=%d must be positive", B, T);
    if (load_corpus(d)) return M1C_ERR;
    text_split *x = &d->split[split];
    if (x->total <= 0)
        return h->error(h, "the validation split has no documents of a source with weight > 0 "
                           "(valid_fraction = %g)", d->valid_fraction);
    for (int b = 0; b < B; b++) {
        /* the first source whose cumulative weight exceeds u: never one without documents or weight,
         * since those add nothing to the cumulative sum */
        double u = m1c_unit(h->rng_u64(&x->rng));
        int i = 0;
        while (u >= x->cum[i]) i++;
        int32_t *row = tokens + (int64_t)b * (T + 1);
        if (stream_read(d, split, i, row, T)) return M1C_ERR;
        /* the (T+1)-th token is the next one of the stream, read again by this source's next row */
        text_stream *st = &x->streams[i];
        if (stream_doc(d, split, i, st)) return M1C_ERR;
        row[T] = st->doc[st->off];
        for (int t = 0; t < T; t++) mask[(int64_t)b * T + t] = 1.0f;
    }
    return M1C_OK;
}

/* ---- positions ----------------------------------------------------------------------------- */

/* words: magic, fingerprint, then per split: rng s[4], then per source: epoch, k, off */
static int64_t position_bytes(const text_data *d) { return 8 * (2 + 2 * (4 + 3 * (int64_t)d->n_sources)); }

static int64_t text_save_position(void *self, void *buf, int64_t max) {
    text_data *d = self;
    int64_t n = position_bytes(d);
    if (!buf) return n; /* the size does not depend on the corpus: no need to read it */
    if (max < n) return d->h->error(d->h, "position needs %lld bytes, buffer holds %lld", (long long)n, (long long)max);
    if (load_corpus(d)) return M1C_ERR;
    unsigned char *p = buf;
    m1c_put_u64(p, TEXT_MAGIC), p += 8;
    m1c_put_u64(p, d->fingerprint), p += 8;
    for (int sp = 0; sp < 2; sp++) {
        for (int k = 0; k < 4; k++) m1c_put_u64(p, d->split[sp].rng.s[k]), p += 8;
        for (int i = 0; i < d->n_sources; i++) {
            const text_stream *st = &d->split[sp].streams[i];
            m1c_put_u64(p, st->epoch), p += 8;
            m1c_put_u64(p, (uint64_t)st->k), p += 8;
            m1c_put_u64(p, (uint64_t)st->off), p += 8;
        }
    }
    return n;
}

static int text_load_position(void *self, const void *buf, int64_t n) {
    text_data *d = self;
    const m1c_host *h = d->h;
    const unsigned char *p = buf;
    if (load_corpus(d)) return M1C_ERR;
    if (n != position_bytes(d) || m1c_get_u64(p) != TEXT_MAGIC)
        return h->error(h, "saved position is not one of this corpus (%lld bytes)", (long long)n);
    if (m1c_get_u64(p + 8) != d->fingerprint)
        return h->error(h, "saved position was made with another corpus, seed, weights, valid_fraction or rank");
    p += 16;
    m1c_rng saved_rng[2] = {d->split[0].rng, d->split[1].rng};
    text_stream *saved[2] = {NULL, NULL};
    int rc = M1C_OK;
    for (int sp = 0; sp < 2 && rc == M1C_OK; sp++) {
        if (!(saved[sp] = malloc((size_t)d->n_sources * sizeof **saved))) rc = h->error(h, "out of memory");
        else memcpy(saved[sp], d->split[sp].streams, (size_t)d->n_sources * sizeof **saved);
    }
    for (int sp = 0; sp < 2 && rc == M1C_OK; sp++) {
        text_split *x = &d->split[sp];
        for (int k = 0; k < 4; k++) x->rng.s[k] = m1c_get_u64(p), p += 8;
        for (int i = 0; i < d->n_sources && rc == M1C_OK; i++) {
            text_stream *st = &x->streams[i];
            st->epoch = m1c_get_u64(p), p += 8;
            st->k = (int64_t)m1c_get_u64(p), p += 8;
            st->off = (int64_t)m1c_get_u64(p), p += 8;
            int64_t nd = d->src[i].n_split[sp], start, stride;
            if (nd == 0) {
                if (st->k || st->off || st->epoch) rc = h->error(h, "saved position is corrupt");
                continue;
            }
            shard(d, nd, &start, &stride);
            if (st->k < 0 || st->k >= nd || st->k % stride != start || st->off < 0)
                rc = h->error(h, "saved position is corrupt");
            else if ((rc = stream_doc(d, sp, i, st)) == M1C_OK && st->off >= st->doc_len)
                rc = h->error(h, "saved position is corrupt");
        }
    }
    if (rc != M1C_OK) { /* leave the reader as it was */
        for (int sp = 0; sp < 2; sp++) {
            if (!saved[sp]) continue;
            d->split[sp].rng = saved_rng[sp];
            for (int i = 0; i < d->n_sources; i++) {
                text_stream *st = &d->split[sp].streams[i];
                st->epoch = saved[sp][i].epoch;
                st->k = saved[sp][i].k;
                st->off = saved[sp][i].off;
            }
        }
    }
    free(saved[0]);
    free(saved[1]);
    return rc;
}

/* ---- tokenizer ----------------------------------------------------------------------------- */

static int text_vocab(void *self, int32_t *vocab_size, int32_t *bos, int32_t *eos, int32_t *pad) {
    text_data *d = self;
    *vocab_size = d->tok->vocab;
    *bos = d->tok->bos;
    *eos = d->tok->eos;
    *pad = d->tok->pad;
    return M1C_OK;
}

static int64_t text_encode(void *self, const char *text, int64_t len, int32_t *ids, int64_t max) {
    text_data *d = self;
    return d->tok->encode(d->tok, text, len, ids, max);
}

static int64_t text_decode(void *self, const int32_t *ids, int64_t n, char *text, int64_t max) {
    text_data *d = self;
    int64_t r = d->tok->decode(d->tok, ids, n, text, max);
    if (r < 0) return d->h->error(d->h, "decode: token id out of range [0, %d)", d->tok->vocab);
    return r;
}

static const m1c_data_vtable text_vtable = {
    .size = sizeof(m1c_data_vtable),
    .create = text_create,
    .destroy = text_destroy,
    .vocab = text_vocab,
    .next_batch = text_next_batch,
    .save_position = text_save_position,
    .load_position = text_load_position,
    .encode = text_encode,
    .decode = text_decode,
    .prompt = NULL,
    .reward = NULL,
};

M1C_PLUGIN(DATA, data, text_vtable, "text", "0.1.0",
           "text corpora: files, directories, globs; documents split, shuffled, packed, mixed by weight", "MIT")
