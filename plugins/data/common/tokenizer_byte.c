/* Byte-level tokenizer: ids 0..255 are the bytes of UTF-8 text, then BOS=256, EOS=257, PAD=258.
 * Also the factory behind m1c_tokenizer_create (the only tokenizer for now). */
#include <stdlib.h>
#include <string.h>
#include "tokenizer.h"

enum { BYTE_BOS = 256, BYTE_EOS = 257, BYTE_PAD = 258, BYTE_VOCAB = 259 };

const char *const m1c_tokenizer_names[] = {"byte", NULL};

static int64_t byte_encode(const m1c_tokenizer *t, const char *text, int64_t len, int32_t *ids, int64_t max) {
    (void)t;
    int64_t n = len < max ? len : max;
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(unsigned char)text[i];
    return len;
}

static int64_t byte_decode(const m1c_tokenizer *t, const int32_t *ids, int64_t n, char *text, int64_t max) {
    (void)t;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= BYTE_VOCAB) return M1C_ERR;
        if (id >= 256) continue; /* specials carry no text */
        if (k < max) text[k] = (char)(unsigned char)id;
        k++;
    }
    if (k < max) text[k] = '\0';
    return k;
}

static void byte_destroy(m1c_tokenizer *t) { free(t); }

int m1c_tokenizer_create(const m1c_host *h, const char *name, m1c_tokenizer **out) {
    *out = NULL;
    if (strcmp(name, "byte") != 0) return h->error(h, "unknown tokenizer '%s' (known: byte)", name);
    m1c_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return h->error(h, "out of memory");
    t->name = "byte";
    t->vocab = BYTE_VOCAB;
    t->bos = BYTE_BOS;
    t->eos = BYTE_EOS;
    t->pad = BYTE_PAD;
    t->encode = byte_encode;
    t->decode = byte_decode;
    t->destroy = byte_destroy;
    *out = t;
    return M1C_OK;
}
