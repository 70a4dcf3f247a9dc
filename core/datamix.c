/* Weighted mixtures of data plugins, with positions that save and restore exactly. */
#include "datamix.h"

#include <stdlib.h>
#include <string.h>

#include "rng.h"

int m1c_datamix_open(m1c_datamix *d, m1c_session *s, const m1c_stage_spec *st, m1c_err *e) {
    memset(d, 0, sizeof *d);
    d->n = st->n_data;
    d->p = m1c_xcalloc((size_t)d->n, sizeof *d->p);
    d->self = m1c_xcalloc((size_t)d->n, sizeof *d->self);
    d->cum = m1c_xcalloc((size_t)d->n, sizeof *d->cum);
    const char *base = m1c_config_dir(s->cfg);
    double total = 0, c = 0;
    for (int i = 0; i < d->n; i++) total += st->data_weight[i];
    for (int i = 0; i < d->n; i++) {
        d->cum[i] = (c += st->data_weight[i]) / total;
        if (m1c_registry_load(&s->reg, st->data[i].plugin, base, M1C_KIND_DATA, &d->p[i], e)) return M1C_ERR;
        m1c_data_info di = {sizeof di, 0, 1, st->seed, base, {0}};
        if (M1C_DATA(d->p[i])->create(&d->p[i]->host, st->data[i].settings, &di, &d->self[i]))
            return m1c_plugin_fail(d->p[i], e, "create");
    }
    d->cum[d->n - 1] = 1.0;
    M1C_DATA(d->p[0])->vocab(d->self[0], &d->vocab, &d->bos, &d->eos, &d->pad);
    for (int k = 0; k < 2; k++) m1c_rng_seed(&d->rng[k], st->seed, 0x6d697800ull + (uint64_t)k);
    return M1C_OK;
}

void m1c_datamix_close(m1c_datamix *d) {
    for (int i = 0; i < d->n; i++)
        if (d->self && d->self[i]) M1C_DATA(d->p[i])->destroy(d->self[i]);
    free(d->p), free(d->self), free(d->cum);
    memset(d, 0, sizeof *d);
}

int m1c_datamix_next(m1c_datamix *d, int split, int B, int T, int32_t *tokens, float *mask, m1c_err *e) {
    if (d->n == 1) {
        if (M1C_DATA(d->p[0])->next_batch(d->self[0], split, B, T, tokens, mask))
            return m1c_plugin_fail(d->p[0], e, "next_batch");
        return M1C_OK;
    }
    for (int b = 0; b < B; b++) {
        float u = m1c_rng_uniform(&d->rng[split != 0]);
        int i = 0;
        while (i < d->n - 1 && u >= d->cum[i]) i++;
        if (M1C_DATA(d->p[i])->next_batch(d->self[i], split, 1, T, tokens + (int64_t)b * (T + 1), mask + (int64_t)b * T))
            return m1c_plugin_fail(d->p[i], e, "next_batch");
    }
    return M1C_OK;
}

/* Layout: "MIX1", int32 n, the two RNG states, then per source an int64 length and its bytes. */
void *m1c_datamix_save(m1c_datamix *d, int64_t *n, m1c_err *e) {
    int64_t total = 8 + (int64_t)sizeof d->rng;
    int64_t *len = m1c_xcalloc((size_t)d->n, sizeof *len);
    for (int i = 0; i < d->n; i++) {
        len[i] = M1C_DATA(d->p[i])->save_position(d->self[i], NULL, 0);
        if (len[i] < 0) {
            free(len);
            m1c_plugin_fail(d->p[i], e, "save_position");
            return NULL;
        }
        total += 8 + len[i];
    }
    char *buf = m1c_xmalloc((size_t)total), *o = buf;
    memcpy(o, "MIX1", 4), o += 4;
    int32_t k = d->n;
    memcpy(o, &k, 4), o += 4;
    memcpy(o, d->rng, sizeof d->rng), o += sizeof d->rng;
    for (int i = 0; i < d->n; i++) {
        memcpy(o, &len[i], 8), o += 8;
        if (M1C_DATA(d->p[i])->save_position(d->self[i], o, len[i]) != len[i]) {
            free(len), free(buf);
            m1c_plugin_fail(d->p[i], e, "save_position");
            return NULL;
        }
        o += len[i];
    }
    free(len);
    *n = total;
    return buf;
}

int m1c_datamix_load(m1c_datamix *d, const void *buf, int64_t n, m1c_err *e) {
    const char *p = buf, *end = p + n;
    int32_t k;
    if (n < 8 + (int64_t)sizeof d->rng || memcmp(p, "MIX1", 4))
        return m1c_fail(e, "data position: not a data-mixture position");
    memcpy(&k, p + 4, 4);
    if (k != d->n) return m1c_fail(e, "data position: saved for %d data sources, the stage has %d", k, d->n);
    m1c_rng rng[2];
    memcpy(rng, p + 8, sizeof rng);
    p += 8 + sizeof rng;
    for (int i = 0; i < d->n; i++) {
        int64_t len;
        if (end - p < 8) return m1c_fail(e, "data position: truncated");
        memcpy(&len, p, 8), p += 8;
        if (len < 0 || len > end - p) return m1c_fail(e, "data position: truncated");
        if (M1C_DATA(d->p[i])->load_position(d->self[i], p, len)) return m1c_plugin_fail(d->p[i], e, "load_position");
        p += len;
    }
    memcpy(d->rng, rng, sizeof rng);
    return M1C_OK;
}
