/* `synth-math` data plugin: generated arithmetic problems (+ - * with precedence) with step-by-step
 * solutions and a verifier, for pre-training, SFT and RL without any files. Problem g is a function of
 * (seed, g) only, e.g.  "Q: 12+7*3=?\nA: 7*3=21. 12+21=33. #### 33\n".
 *
 * Settings:
 *   min_digits = 1; max_digits = 3;  digits of each operand (1..6), uniform
 *   max_ops = 2;                     operators per problem, uniform in 1..max_ops (1..4)
 *   mode = "pretrain";               "pretrain": problems packed as BOS text EOS, every target counts;
 *                                    "sft": one problem per row, BOS prompt solution EOS PAD..., only the
 *                                    solution and its EOS count
 *   valid_fraction = 0.05;           share of the problems that form the validation split
 *   tokenizer = "byte";
 *
 * Problems have global ids g = 0, 1, 2, ...; of the first g ids, floor(g * f) belong to the validation
 * split (f = valid_fraction, in steps of 2^-24) and the rest to the training split, so a split's k-th
 * problem has an id computed in O(1) and changing f moves problems between splits without changing
 * any. prompt(split, k, ...) and reward(split, k, ...) take k, the index within the split: the prompt of
 * that problem and the score of a response to it (1 if the number after "####" is the answer, else 0).
 * Data-parallel rank r of W reads the problems k = r, r + W, r + 2W, ... of each split.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "m1c/plugin.h"
#include "../common/data_util.h"
#include "../common/tokenizer.h"

#define SM_MAGIC 0x3248544d4d43314dULL /* "M1CMMTH2" as little-endian bytes */
#define SM_MAX_TEXT 512                /* longest problem: 5 six-digit operands, 4 steps, < 300 bytes */
#define SM_MAX_PRODUCT 1000000000000000LL /* 1e15: keeps every value far inside int64 */
#define SM_FRAC_BITS 24                   /* valid_fraction is kept as P / 2^24 */
#define SM_FRAC_ONE (1LL << SM_FRAC_BITS)
#define SM_MAX_INDEX (1LL << 38)          /* index within a split: keeps id arithmetic inside int64 */

enum { MODE_PRETRAIN = 0, MODE_SFT = 1 };
static const char *const sm_modes[] = {"pretrain", "sft", NULL};

typedef struct sm_problem {
    char text[SM_MAX_TEXT]; /* prompt then solution */
    int prompt_len;         /* bytes of "Q: <expr>=?\nA:" */
    int len;
    int64_t answer;
} sm_problem;

/* The reading position of one split, plus the current problem's tokens (a cache, never saved). */
typedef struct sm_stream {
    int64_t k;   /* current problem: index within the split, k = rank (mod world) */
    int64_t off; /* pretrain: token offset into its BOS text EOS, always < the length */
    int32_t doc[SM_MAX_TEXT + 2];
    int64_t doc_len;
    int64_t doc_k; /* which problem doc holds, -1 none */
} sm_stream;

typedef struct sm_data {
    const m1c_host *h;
    m1c_tokenizer *tok;
    uint64_t seed;
    int rank, world;
    int64_t min_digits, max_digits, max_ops;
    int mode;
    double valid_fraction;
    int64_t valid_p; /* valid_fraction * 2^24, rounded (at least 1 when valid_fraction > 0) */
    sm_stream st[2];
    uint64_t fingerprint;
} sm_data;

/* ---- problems ------------------------------------------------------------------------------ */

/* Validation problems among ids [0, x): floor(x * P / 2^24), split so that nothing overflows. */
static int64_t valid_below(const sm_data *d, int64_t x) {
    uint64_t u = (uint64_t)x, P = (uint64_t)d->valid_p;
    return (int64_t)((u >> SM_FRAC_BITS) * P + (((u & (SM_FRAC_ONE - 1)) * P) >> SM_FRAC_BITS));
}

/* The global id of problem k of split sp, or M1C_ERR (with a message) for an index outside it. */
static int problem_id(const sm_data *d, int sp, int64_t k, int64_t *g) {
    const m1c_host *h = d->h;
    if (sp != M1C_SPLIT_TRAIN && sp != M1C_SPLIT_VALID) return h->error(h, "unknown split %d", sp);
    if (k < 0 || k >= SM_MAX_INDEX)
        return h->error(h, "problem index %lld outside [0, 2^38)", (long long)k);
    int64_t n = k + 1;
    if (sp == M1C_SPLIT_VALID) {
        if (d->valid_p == 0) return h->error(h, "the validation split is empty (valid_fraction = 0)");
        /* the smallest x with valid_below(x) >= n is ceil(n * 2^24 / P); the id is x - 1 */
        int64_t P = d->valid_p;
        *g = (n / P) * SM_FRAC_ONE + ((n % P) * SM_FRAC_ONE + P - 1) / P - 1;
        return M1C_OK;
    }
    /* the smallest x with x - valid_below(x) >= n: estimate n * 2^24 / (2^24 - P) (within a couple of
     * ids, since the count deviates from x (1 - f) by less than 1), then step to it */
    int64_t R = SM_FRAC_ONE - d->valid_p;
    int64_t x = (n / R) * SM_FRAC_ONE + ((n % R) * SM_FRAC_ONE) / R;
    while (x - valid_below(d, x) < n) x++;
    while (x > 1 && (x - 1) - valid_below(d, x - 1) >= n) x--;
    *g = x - 1;
    return M1C_OK;
}

/* Problem g: operands and operators drawn from an RNG seeded by (seed, g); the solution multiplies
 * first (left to right), then adds and subtracts left to right, one step per operator. */
static void make_problem(const sm_data *d, int64_t g, sm_problem *p) {
    const m1c_host *h = d->h;
    m1c_rng r;
    h->rng_seed(&r, d->seed, m1c_hash3((uint64_t)g, 0x6d617468 /* "math" */, 0));
    int n_ops = 1 + (int)(h->rng_u64(&r) % (uint64_t)d->max_ops);
    int64_t v[5];
    char op[4];
    int64_t chain = 1; /* product of the multiplication run ending at the current operand (<= 1e15) */
    for (int i = 0; i <= n_ops; i++) {
        int digits = (int)d->min_digits + (int)(h->rng_u64(&r) % (uint64_t)(d->max_digits - d->min_digits + 1));
        int64_t lo = 1;
        for (int k = 1; k < digits; k++) lo *= 10;
        v[i] = digits == 1 ? (int64_t)(h->rng_u64(&r) % 10) : lo + (int64_t)(h->rng_u64(&r) % (uint64_t)(9 * lo));
        if (i == n_ops) break;
        op[i] = "+-*"[h->rng_u64(&r) % 3];
        chain = chain * (v[i] ? v[i] : 1);
        /* a product that could pass 1e15 becomes + or -: the next operand is below 1e6 */
        if (op[i] == '*' && chain > SM_MAX_PRODUCT / 1000000) op[i] = "+-"[h->rng_u64(&r) % 2];
        if (op[i] != '*') chain = 1;
    }

    char expr[64];
    int n = 0;
    for (int i = 0; i <= n_ops; i++) {
        n += snprintf(expr + n, sizeof expr - (size_t)n, "%lld", (long long)v[i]);
        if (i < n_ops) expr[n++] = op[i], expr[n] = '\0';
    }
    int k = snprintf(p->text, sizeof p->text, "Q: %s=?\nA:", expr);
    p->prompt_len = k;

    /* multiplications, collapsing v and op in place */
    int m = n_ops;
    for (int i = 0; i < m;) {
        if (op[i] != '*') {
            i++;
            continue;
        }
        int64_t c = v[i] * v[i + 1];
        k += snprintf(p->text + k, sizeof p->text - (size_t)k, " %lld*%lld=%lld.", (long long)v[i],
                      (long long)v[i + 1], (long long)c);
        v[i] = c;
        for (int j = i + 1; j < m; j++) v[j] = v[j + 1];
        for (int j = i; j < m - 1; j++) op[j] = op[j + 1];
        m--;
    }
    int64_t acc = v[0];
    for (int i = 0; i < m; i++) {
        int64_t c = op[i] == '+' ? acc + v[i + 1] : acc - v[i + 1];
        k += snprintf(p->text + k, sizeof p->text - (size_t)k, " %lld%c%lld=%lld.", (long long)acc, op[i],
                      (long long)v[i + 1], (long long)c);
        acc = c;
    }
    k += snprintf(p->text + k, sizeof p->text - (size_t)k, " #### %lld\n", (long long)acc);
    p->len = k;
    p->answer = acc;
}

/* Tokens of problem g into out (room for SM_MAX_TEXT + 2): BOS prompt solution EOS. *prompt_end is the
 * index of the first solution token. Returns the count. */
static int64_t problem_tokens(const sm_data *d, int64_t g, int32_t *out, int64_t *prompt_end, int64_t *answer) {
    sm_problem p;
    make_problem(d, g, &p);
    int64_t n = 0, room = SM_MAX_TEXT;
    out[n++] = d->tok->bos;
    n += d->tok->encode(d->tok, p.text, p.prompt_len, out + n, room);
    if (prompt_end) *prompt_end = n;
    n += d->tok->encode(d->tok, p.text + p.prompt_len, p.len - p.prompt_len, out + n, room - (n - 1));
    out[n++] = d->tok->eos;
    if (answer) *answer = p.answer;
    return n;
}

/* ---- create / destroy ---------------------------------------------------------------------- */

static void sm_destroy(void *self) {
    sm_data *d = self;
    if (!d) return;
    if (d->tok) d->tok->destroy(d->tok);
    free(d);
}

static int sm_create(const m1c_host *h, const m1c_settings *s, const m1c_data_info *info, void **self) {
    *self = NULL;
    sm_data *d = calloc(1, sizeof *d);
    if (!d) return h->error(h, "out of memory");
    d->h = h;
    d->seed = info->seed;
    d->rank = info->rank;
    d->world = info->world > 0 ? info->world : 1;
    const char *mode = NULL, *tok = NULL;
    int rc = M1C_OK;
    if (d->rank < 0 || d->rank >= d->world)
        rc = h->error(h, "data-parallel rank %d outside world %d", info->rank, info->world);
    if (rc == M1C_OK && h->get_int(h, s, "min_digits", 1, 1, 6, &d->min_digits)) rc = M1C_ERR;
    if (rc == M1C_OK && h->get_int(h, s, "max_digits", 3, 1, 6, &d->max_digits)) rc = M1C_ERR;
    if (rc == M1C_OK && d->max_digits < d->min_digits)
        rc = m1c_setting_error(h, s, "max_digits", "%lld is below min_digits (%lld)", (long long)d->max_digits,
                               (long long)d->min_digits);
    if (rc == M1C_OK && h->get_int(h, s, "max_ops", 2, 1, 4, &d->max_ops)) rc = M1C_ERR;
    if (rc == M1C_OK && h->get_string(h, s, "mode", "pretrain", sm_modes, &mode)) rc = M1C_ERR;
    if (rc == M1C_OK && h->get_float(h, s, "valid_fraction", 0.05, 0.0, 0.5, &d->valid_fraction)) rc = M1C_ERR;
    if (rc == M1C_OK && h->get_string(h, s, "tokenizer", "byte", m1c_tokenizer_names, &tok)) rc = M1C_ERR;
    if (rc == M1C_OK && h->settings_done(h, s)) rc = M1C_ERR;
    if (rc == M1C_OK) rc = m1c_tokenizer_create(h, tok, &d->tok);
    if (rc != M1C_OK) {
        sm_destroy(d);
        return M1C_ERR;
    }
    d->mode = strcmp(mode, "sft") == 0 ? MODE_SFT : MODE_PRETRAIN;
    d->valid_p = (int64_t)(d->valid_fraction * (double)SM_FRAC_ONE + 0.5);
    if (d->valid_fraction > 0 && d->valid_p == 0) d->valid_p = 1;
    for (int sp = 0; sp < 2; sp++) {
        d->st[sp].doc_k = -1;
        d->st[sp].k = d->rank;
    }
    uint64_t fp = m1c_hash3(SM_MAGIC, d->seed, ((uint64_t)d->rank << 32) | (uint32_t)d->world);
    fp = m1c_hash3(fp, m1c_double_bits(d->valid_fraction), (uint64_t)d->mode);
    d->fingerprint = m1c_hash_str(fp, d->tok->name);
    *self = d;
    return M1C_OK;
}

/* ---- batches ------------------------------------------------------------------------------- */

/* The current problem of stream sp as tokens in st->doc. */
static int stream_load(sm_data *d, int sp) {
    sm_stream *st = &d->st[sp];
    if (st->doc_k != st->k) {
        int64_t g;
        if (problem_id(d, sp, st->k, &g)) return M1C_ERR;
        st->doc_len = problem_tokens(d, g, st->doc, NULL, NULL);
        st->doc_k = st->k;
    }
    return M1C_OK;
}

static int sm_next_batch(void *self, int split, int B, int T, int32_t *tokens, float *mask) {
    sm_data *d = self;
    const m1c_host *h = d->h;
    if (split != M1C_SPLIT_TRAIN && split != M1C_SPLIT_VALID) return h->error(h, "unknown split %d", split);
    if (B <= 0 || T <= 0) return h->error(h, "batch shape B=%d T=%d must be positive", B, T);
    sm_stream *st = &d->st[split];
    for (int b = 0; b < B; b++) {
        int32_t *row = tokens + (int64_t)b * (T + 1);
        float *m = mask + (int64_t)b * T;
        if (d->mode == MODE_PRETRAIN) {
            /* T tokens of the packed stream, then the next one (read again by the next row) */
            for (int t = 0; t <= T; t++) {
                if (stream_load(d, split)) return M1C_ERR;
                row[t] = st->doc[st->off];
                if (t == T) break;
                if (++st->off == st->doc_len) {
                    st->off = 0;
                    st->k += d->world;
                }
            }
            for (int t = 0; t < T; t++) m[t] = 1.0f;
        } else {
            int64_t prompt_end, g;
            int32_t doc[SM_MAX_TEXT + 2];
            if (problem_id(d, split, st->k, &g)) return M1C_ERR;
            int64_t n = problem_tokens(d, g, doc, &prompt_end, NULL);
            if (n > (int64_t)T + 1)
                return h->error(h, "sft row of T+1 = %d tokens cannot hold problem %lld of the split (%lld tokens); "
                                   "raise T or lower max_digits/max_ops", T + 1, (long long)st->k, (long long)n);
            for (int t = 0; t <= T; t++) row[t] = t < n ? doc[t] : d->tok->pad;
            /* the target at t is row[t+1]: it counts iff it is a solution token or the closing EOS */
            for (int t = 0; t < T; t++) m[t] = (t + 1 >= prompt_end && t + 1 < n) ? 1.0f : 0.0f;
            st->k += d->world;
        }
    }
    return M1C_OK;
}

/* ---- positions ----------------------------------------------------------------------------- */

enum { SM_POS_BYTES = 8 * (2 + 2 * 2) }; /* magic, fingerprint, then per split: k, off */

static int64_t sm_save_position(void *self, void *buf, int64_t max) {
    sm_data *d = self;
    if (!buf) return SM_POS_BYTES;
    if (max < SM_POS_BYTES)
        return d->h->error(d->h, "position needs %d bytes, buffer holds %lld", SM_POS_BYTES, (long long)max);
    unsigned char *p = buf;
    m1c_put_u64(p, SM_MAGIC);
    m1c_put_u64(p + 8, d->fingerprint);
    for (int sp = 0; sp < 2; sp++) {
        m1c_put_u64(p + 16 + 16 * sp, (uint64_t)d->st[sp].k);
        m1c_put_u64(p + 24 + 16 * sp, (uint64_t)d->st[sp].off);
    }
    return SM_POS_BYTES;
}

static int sm_load_position(void *self, const void *buf, int64_t n) {
    sm_data *d = self;
    const m1c_host *h = d->h;
    const unsigned char *p = buf;
    if (n != SM_POS_BYTES || m1c_get_u64(p) != SM_MAGIC)
        return h->error(h, "saved position is not one of this plugin (%lld bytes)", (long long)n);
    if (m1c_get_u64(p + 8) != d->fingerprint)
        return h->error(h, "saved position was made with another seed, mode, valid_fraction or rank");
    int64_t k[2], off[2];
    for (int sp = 0; sp < 2; sp++) {
        k[sp] = (int64_t)m1c_get_u64(p + 16 + 16 * sp);
        off[sp] = (int64_t)m1c_get_u64(p + 24 + 16 * sp);
        int bad = k[sp] < 0 || k[sp] >= SM_MAX_INDEX || k[sp] % d->world != d->rank || off[sp] < 0 ||
                  (d->mode == MODE_SFT && off[sp]);
        if (!bad && off[sp] > 0) { /* the offset lies inside the problem (an empty split has none) */
            int64_t g;
            int32_t doc[SM_MAX_TEXT + 2];
            bad = (sp == M1C_SPLIT_VALID && d->valid_p == 0) || problem_id(d, sp, k[sp], &g) ||
                  off[sp] >= problem_tokens(d, g, doc, NULL, NULL);
        }
        if (bad) return h->error(h, "saved position is corrupt");
    }
    for (int sp = 0; sp < 2; sp++) {
        d->st[sp].k = k[sp];
        d->st[sp].off = off[sp];
    }
    return M1C_OK;
}

/* ---- tokenizer, prompts, verifier ---------------------------------------------------------- */

static int sm_vocab(void *self, int32_t *vocab_size, int32_t *bos, int32_t *eos, int32_t *pad) {
    sm_data *d = self;
    *vocab_size = d->tok->vocab;
    *bos = d->tok->bos;
    *eos = d->tok->eos;
    *pad = d->tok->pad;
    return M1C_OK;
}

static int64_t sm_encode(void *self, const char *text, int64_t len, int32_t *ids, int64_t max) {
    sm_data *d = self;
    return d->tok->encode(d->tok, text, len, ids, max);
}

static int64_t sm_decode(void *self, const int32_t *ids, int64_t n, char *text, int64_t max) {
    sm_data *d = self;
    int64_t r = d->tok->decode(d->tok, ids, n, text, max);
    if (r < 0) return d->h->error(d->h, "decode: token id out of range [0, %d)", d->tok->vocab);
    return r;
}

/* BOS "Q: <expr>=?\nA:" of problem `index` of `split`; *len = its length. With ids NULL only *len
 * is set. */
static int sm_prompt(void *self, int split, int64_t index, int32_t *ids, int64_t max, int64_t *len) {
    sm_data *d = self;
    const m1c_host *h = d->h;
    int64_t g;
    if (problem_id(d, split, index, &g)) return M1C_ERR;
    int32_t doc[SM_MAX_TEXT + 2];
    int64_t prompt_end;
    problem_tokens(d, g, doc, &prompt_end, NULL);
    *len = prompt_end;
    if (!ids) return M1C_OK;
    if (max < prompt_end)
        return h->error(h, "prompt %lld needs %lld tokens, room for %lld", (long long)index,
                        (long long)prompt_end, (long long)max);
    memcpy(ids, doc, (size_t)prompt_end * sizeof *ids);
    return M1C_OK;
}

/* 1 if the first "####" of the response is followed (after spaces) by exactly the answer as a
 * decimal integer, ending the text or followed by whitespace; 0 otherwise. */
static int sm_reward(void *self, int split, int64_t index, const int32_t *response, int64_t len, float *reward) {
    sm_data *d = self;
    const m1c_host *h = d->h;
    int64_t g;
    if (problem_id(d, split, index, &g)) return M1C_ERR;
    if (len < 0) return h->error(h, "reward: negative response length %lld", (long long)len);
    int64_t n = d->tok->decode(d->tok, response, len, NULL, 0);
    if (n < 0) return h->error(h, "reward: token id out of range [0, %d)", d->tok->vocab);
    char *text = malloc((size_t)n + 1);
    if (!text) return h->error(h, "out of memory");
    d->tok->decode(d->tok, response, len, text, n + 1);
    sm_problem p;
    make_problem(d, g, &p);
    *reward = 0.0f;
    const char *s = strstr(text, "####");
    if (s) {
        s += 4;
        while (*s == ' ' || *s == '\t') s++;
        int neg = *s == '-';
        if (neg) s++;
        int64_t v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 19) v = 10 * v + (*s++ - '0'), digits++;
        int ends = *s == '\0' || *s == ' ' || *s == '\t' || *s == '\n' || *s == '\r';
        if (digits > 0 && ends && (neg ? -v : v) == p.answer) *reward = 1.0f;
    }
    free(text);
    return M1C_OK;
}

static const m1c_data_vtable sm_vtable = {
    .size = sizeof(m1c_data_vtable),
    .create = sm_create,
    .destroy = sm_destroy,
    .vocab = sm_vocab,
    .next_batch = sm_next_batch,
    .save_position = sm_save_position,
    .load_position = sm_load_position,
    .encode = sm_encode,
    .decode = sm_decode,
    .prompt = sm_prompt,
    .reward = sm_reward,
};

M1C_PLUGIN(DATA, data, sm_vtable, "synth-math", "0.1.0",
           "generated arithmetic problems with step-by-step solutions and a verifier (pretrain, sft, RL)", "MIT")
