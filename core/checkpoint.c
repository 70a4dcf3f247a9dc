/* Checkpoint directories: safetensors for tensors, a JSON sidecar for the trainer's state. */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "host.h"
#include "metrics.h"
#include "safetensors.h"

#define CKPT_FORMAT 1

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *base64_encode(const unsigned char *p, int64_t n) {
    char *s = m1c_xmalloc((size_t)(n + 2) / 3 * 4 + 1), *o = s;
    for (int64_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        *o++ = b64[v >> 18 & 63];
        *o++ = b64[v >> 12 & 63];
        *o++ = i + 1 < n ? b64[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? b64[v & 63] : '=';
    }
    *o = 0;
    return s;
}

static int64_t base64_decode(const char *s, unsigned char **out) {
    size_t n = strlen(s);
    if (n % 4) return -1;
    unsigned char *p = m1c_xmalloc(n / 4 * 3 + 1);
    int64_t k = 0;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t v = 0;
        int pad = 0;
        for (int j = 0; j < 4; j++) {
            char c = s[i + j];
            const char *q = c == '=' ? NULL : strchr(b64, c);
            if (c == '=') pad++;
            else if (!q || !c || pad) {
                free(p);
                return -1;
            }
            v = v << 6 | (q ? (uint32_t)(q - b64) : 0);
        }
        p[k++] = (unsigned char)(v >> 16);
        if (pad < 2) p[k++] = (unsigned char)(v >> 8);
        if (pad < 1) p[k++] = (unsigned char)v;
    }
    *out = p;
    return k;
}

int m1c_remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) return unlink(path);
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char *p = m1c_path_join(path, de->d_name);
        m1c_remove_tree(p);
        free(p);
    }
    closedir(d);
    return rmdir(path);
}

static int write_text(const char *path, const char *text, m1c_err *e) {
    FILE *f = fopen(path, "w");
    if (!f) return m1c_fail(e, "%s: cannot write: %s", path, strerror(errno));
    int ok = fputs(text, f) >= 0;
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;
    ok = fclose(f) == 0 && ok;
    return ok ? M1C_OK : m1c_fail(e, "%s: write failed: %s", path, strerror(errno));
}

/* A CPU arena with the tensors of `a` (copied when `copy`): the staging area of device arenas. */
static int host_mirror(m1c_arena *h, const m1c_arena *a, int copy, m1c_err *e) {
    if (m1c_arena_like(h, a, M1C_DEVICE_CPU, "", e)) return M1C_ERR;
    if (copy) m1c_dev_copy(M1C_DEVICE_CPU, h->base, a->device, a->base, a->bytes);
    return M1C_OK;
}

static int write_arena(const char *path, const m1c_arena *a, const char *const *mk, const char *const *mv, int n_meta,
                       m1c_err *e) {
    if (a->device == M1C_DEVICE_CPU) return m1c_st_write(path, a->t, a->n, mk, mv, n_meta, e);
    m1c_arena h;
    int rc = host_mirror(&h, a, 1, e);
    if (!rc) rc = m1c_st_write(path, h.t, h.n, mk, mv, n_meta, e);
    m1c_arena_free(&h);
    return rc;
}

int m1c_ckpt_save(const char *dir, m1c_model *m, const m1c_arena *opt, const m1c_ckpt_state *st, m1c_config *cfg,
                  m1c_err *e) {
    char *tmp = m1c_xasprintf("%s.tmp.%ld", dir, (long)getpid());
    char *p = NULL;
    m1c_remove_tree(tmp);
    int rc = m1c_mkdirs(tmp, e);
    if (rc) goto out;

    static const char *const mk[] = {"format", "producer"};
    static const char *const mv[] = {"pt", "m1c"};
    p = m1c_path_join(tmp, "model.safetensors");
    /* A tied head is stored once, as the embedding (HF's tie_word_embeddings). */
    if ((rc = write_arena(p, &m->params, mk, mv, 2, e))) goto out;
    free(p), p = NULL;
    if (opt && opt->n) {
        p = m1c_path_join(tmp, "optimizer.safetensors");
        if ((rc = write_arena(p, opt, mk, mv, 2, e))) goto out;
        free(p), p = NULL;
    }

    json_t *o = json_object();
    json_object_set_new(o, "format", json_integer(CKPT_FORMAT));
    json_object_set_new(o, "m1c_version", json_string(M1C_VERSION));
    json_object_set_new(o, "stage", json_integer(st->stage));
    json_object_set_new(o, "stage_name", json_string(st->stage_name ? st->stage_name : ""));
    json_object_set_new(o, "step", json_integer(st->step));
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)st->seed);
    json_object_set_new(o, "seed", json_string(seed)); /* a string: JSON numbers lose 64-bit integers */
    char *pos = base64_encode(st->data_position, st->data_position_len);
    json_object_set_new(o, "data_position", json_string(pos));
    free(pos);
    json_object_set_new(o, "loss", json_real(st->last_loss));
    json_object_set_new(o, "parameters", json_integer(m1c_model_param_count(m)));
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(o);
    p = m1c_path_join(tmp, "trainer.json");
    rc = write_text(p, text, e);
    free(text);
    if (rc) goto out;
    free(p);

    p = m1c_path_join(tmp, "m1c.cfg");
    FILE *f = fopen(p, "w");
    if (!f) {
        rc = m1c_fail(e, "%s: cannot write: %s", p, strerror(errno));
        goto out;
    }
    rc = m1c_config_write(cfg, f);
    if (fclose(f) && !rc) rc = m1c_fail(e, "%s: write failed", p);
    if (rc) goto out;

    /* Replace an older checkpoint of the same name only once the new one is complete. */
    m1c_remove_tree(dir);
    if (rename(tmp, dir)) rc = m1c_fail(e, "%s: cannot rename into place: %s", dir, strerror(errno));
out:
    if (rc) m1c_remove_tree(tmp);
    free(p);
    free(tmp);
    return rc;
}

static int load_arena_cpu(const char *path, m1c_arena *a, m1c_err *e);

/* Load into an arena on any device (through a host mirror for a GPU). */
static int load_arena(const char *path, m1c_arena *a, m1c_err *e) {
    if (a->device == M1C_DEVICE_CPU) return load_arena_cpu(path, a, e);
    m1c_arena h;
    int rc = host_mirror(&h, a, 0, e);
    if (!rc) rc = load_arena_cpu(path, &h, e);
    if (!rc) m1c_dev_copy(a->device, a->base, M1C_DEVICE_CPU, h.base, a->bytes);
    m1c_arena_free(&h);
    return rc;
}

static int load_arena_cpu(const char *path, m1c_arena *a, m1c_err *e) {
    m1c_st_file f;
    if (m1c_st_open(&f, path, e)) return M1C_ERR;
    int rc = M1C_OK;
    for (int i = 0; i < a->n && !rc; i++) {
        const m1c_st_tensor *t = m1c_st_find(&f, a->t[i].name);
        if (!t) {
            rc = m1c_fail(e, "%s: tensor '%s' missing", path, a->t[i].name);
            break;
        }
        rc = m1c_st_load(t, path, &a->t[i], e);
    }
    m1c_st_close(&f);
    return rc;
}

int m1c_ckpt_load_params(const char *dir, m1c_model *m, m1c_err *e) {
    char *p = m1c_path_join(dir, "model.safetensors");
    int rc = load_arena(p, &m->params, e);
    free(p);
    if (!rc) m1c_model_sync_lp(m);
    return rc;
}

int m1c_ckpt_load_optimizer(const char *dir, m1c_arena *opt, m1c_err *e) {
    if (!opt->n) return M1C_OK;
    char *p = m1c_path_join(dir, "optimizer.safetensors");
    int rc = load_arena(p, opt, e);
    free(p);
    return rc;
}

int m1c_ckpt_read_info(const char *dir, m1c_ckpt_info *info, m1c_err *e) {
    memset(info, 0, sizeof *info);
    char *p = m1c_path_join(dir, "trainer.json");
    json_error_t je;
    json_t *o = json_load_file(p, 0, &je);
    int rc = M1C_OK;
    if (!o) {
        rc = m1c_fail(e, "%s:%d: %s", p, je.line, je.text);
        goto out;
    }
    json_t *fmt = json_object_get(o, "format"), *stage = json_object_get(o, "stage"),
           *name = json_object_get(o, "stage_name"), *step = json_object_get(o, "step"),
           *seed = json_object_get(o, "seed"), *pos = json_object_get(o, "data_position");
    if (!json_is_integer(fmt) || json_integer_value(fmt) != CKPT_FORMAT) {
        rc = m1c_fail(e, "%s: key 'format': expected %d", p, CKPT_FORMAT);
    } else if (!json_is_integer(stage) || json_integer_value(stage) < 0) {
        rc = m1c_fail(e, "%s: key 'stage': expected a non-negative integer", p);
    } else if (!json_is_integer(step) || json_integer_value(step) < 0) {
        rc = m1c_fail(e, "%s: key 'step': expected a non-negative integer", p);
    } else if (!json_is_string(seed) || !json_is_string(name) || !json_is_string(pos)) {
        rc = m1c_fail(e, "%s: keys 'seed', 'stage_name', 'data_position': expected strings", p);
    } else {
        info->stage = (int)json_integer_value(stage);
        info->step = json_integer_value(step);
        info->stage_name = m1c_xstrdup(json_string_value(name));
        info->seed = strtoull(json_string_value(seed), NULL, 10);
        unsigned char *bytes = NULL;
        info->data_position_len = base64_decode(json_string_value(pos), &bytes);
        info->data_position = bytes;
        if (info->data_position_len < 0) rc = m1c_fail(e, "%s: key 'data_position': not base64", p);
    }
    json_decref(o);
out:
    free(p);
    if (rc) m1c_ckpt_info_free(info);
    return rc;
}

void m1c_ckpt_info_free(m1c_ckpt_info *info) {
    free(info->stage_name);
    free(info->data_position);
    memset(info, 0, sizeof *info);
}

char *m1c_ckpt_config_text(const char *dir, m1c_err *e) {
    char *p = m1c_path_join(dir, "m1c.cfg");
    FILE *f = fopen(p, "rb");
    if (!f) {
        m1c_fail(e, "%s: cannot open: %s (not a checkpoint directory?)", p, strerror(errno));
        free(p);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = m1c_xmalloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, f);
    s[got] = 0;
    fclose(f);
    free(p);
    return s;
}
