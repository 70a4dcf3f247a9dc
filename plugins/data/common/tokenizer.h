/* Internal tokenizer interface of the data plugins: a table of functions so that a BPE tokenizer can
 * replace the byte tokenizer later without touching the plugins (compiled into each .so, not shared). */
#ifndef M1C_DATA_TOKENIZER_H
#define M1C_DATA_TOKENIZER_H

#include <stdint.h>
#include "m1c/plugin.h"

typedef struct m1c_tokenizer m1c_tokenizer;
struct m1c_tokenizer {
    const char *name;
    int32_t vocab;         /* specials included */
    int32_t bos, eos, pad; /* -1 if absent */
    /* Text -> ids, no BOS/EOS added. Writes at most max ids; returns the count needed. */
    int64_t (*encode)(const m1c_tokenizer *t, const char *text, int64_t len, int32_t *ids, int64_t max);
    /* Ids -> text, specials skipped. Writes at most max bytes (NUL-terminated when the text is shorter
     * than max); returns the byte count needed (without the NUL), or M1C_ERR for an id out of range. */
    int64_t (*decode)(const m1c_tokenizer *t, const int32_t *ids, int64_t n, char *text, int64_t max);
    void (*destroy)(m1c_tokenizer *t);
    void *ctx; /* the implementation's own state (merge tables, ...) */
};

/* The names `tokenizer = "..."` accepts, NULL-terminated, for h->get_string's choices. */
extern const char *const m1c_tokenizer_names[];

/* Create the tokenizer called `name`; on failure h->error names it and M1C_ERR is returned. */
int m1c_tokenizer_create(const m1c_host *h, const char *name, m1c_tokenizer **out);

#endif
