/* A stage's data: one data plugin, or a weighted mixture of several sharing one tokenizer. Each row
 * of a batch comes from source i with probability w_i / sum(w), drawn from a seeded RNG whose state
 * is part of the saved position, so a resumed run reads exactly what an uninterrupted one would. */
#ifndef M1C_DATAMIX_H
#define M1C_DATAMIX_H

#include "session.h"

typedef struct m1c_datamix {
    int n;
    m1c_plugin **p; /* [n] */
    void **self;    /* [n] */
    double *cum;    /* [n] cumulative normalised weights */
    m1c_rng rng[2]; /* per split */
    int32_t vocab, bos, eos, pad;
} m1c_datamix;

int m1c_datamix_open(m1c_datamix *d, m1c_session *s, const m1c_stage_spec *st, m1c_err *e);
void m1c_datamix_close(m1c_datamix *d);
/* B rows of T+1 tokens and B x T loss mask, as m1c_data_vtable.next_batch. */
int m1c_datamix_next(m1c_datamix *d, int split, int B, int T, int32_t *tokens, float *mask, m1c_err *e);
/* The position of every source and of the mixing RNGs: malloc'd bytes, length in *n. */
void *m1c_datamix_save(m1c_datamix *d, int64_t *n, m1c_err *e);
int m1c_datamix_load(m1c_datamix *d, const void *buf, int64_t n, m1c_err *e);
/* The first source's plugin and instance (its tokenizer serves the whole mixture). */
#define M1C_DATAMIX_TOKENIZER(d) (M1C_DATA((d)->p[0]))

#endif
