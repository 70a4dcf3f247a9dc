/* The benchmarks' command lines (C and CUDA C++): flags from a table, each bad one refused with a line that
 * names it and its value, then the usage. The includer defines BENCH_NAME (the program's name) first. */
#pragma once

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "a,b,c" into out (at most max values, each in [1, 2^26]): the count, or -1 for a malformed or too long
 * list. */
static inline int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s) {
        if (n == max) return -1;
        char *end;
        const long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 26)) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

/* A flag: `--name value` with an integer (int or int64_t, the whole value a decimal number in [lo, hi]), a
 * list "a,b,.." (parse_list: its values into out, their count into *n), or one of the NULL-terminated names
 * `choices` (its index into out); or `--name` alone, a switch (1 into out). */
enum { BF_INT, BF_I64, BF_LIST, BF_CHOICE, BF_SWITCH };
typedef struct bench_flag {
    const char *name;
    int kind;
    void *out;
    int64_t lo, hi;             /* BF_INT, BF_I64 */
    const char *const *choices; /* BF_CHOICE */
    int *n, max;                /* BF_LIST */
} bench_flag;

static inline bench_flag bench_flag_of(const char *name, int kind, void *out) {
    bench_flag f;
    memset(&f, 0, sizeof f);
    f.name = name, f.kind = kind, f.out = out;
    return f;
}
static inline bench_flag bf_int(const char *name, int *out, int64_t lo, int64_t hi) {
    bench_flag f = bench_flag_of(name, BF_INT, out);
    f.lo = lo, f.hi = hi;
    return f;
}
static inline bench_flag bf_i64(const char *name, int64_t *out, int64_t lo, int64_t hi) {
    bench_flag f = bench_flag_of(name, BF_I64, out);
    f.lo = lo, f.hi = hi;
    return f;
}
static inline bench_flag bf_list(const char *name, int *out, int *n, int max) {
    bench_flag f = bench_flag_of(name, BF_LIST, out);
    f.n = n, f.max = max;
    return f;
}
static inline bench_flag bf_choice(const char *name, int *out, const char *const *choices) {
    bench_flag f = bench_flag_of(name, BF_CHOICE, out);
    f.choices = choices;
    return f;
}
static inline bench_flag bf_switch(const char *name, int *out) { return bench_flag_of(name, BF_SWITCH, out); }

/* argv against flags[0..nf); arguments not starting with '-' go to pos[0..maxpos) (*npos of them) where pos
 * is given. 0, or 1 after a line naming the argument and what is wrong with it, then usage. */
static inline int bench_flags(int argc, char **argv, const bench_flag *flags, int nf, const char *usage,
                              const char **pos, int *npos, int maxpos) {
    if (npos) *npos = 0;
    for (int i = 1; i < argc; i++) {
        const bench_flag *f = NULL;
        for (int k = 0; k < nf && !f; k++)
            if (!strcmp(argv[i], flags[k].name)) f = &flags[k];
        if (!f && pos && argv[i][0] != '-' && *npos < maxpos) {
            pos[(*npos)++] = argv[i];
            continue;
        }
        const char *v = f && f->kind != BF_SWITCH && i + 1 < argc ? argv[++i] : NULL, *why = NULL;
        if (!f) why = pos && argv[i][0] != '-' ? "too many arguments" : "unknown flag";
        else if (f->kind != BF_SWITCH && !v) why = "needs a value";
        char msg[96];
        if (!why && f->kind == BF_SWITCH) {
            *(int *)f->out = 1;
        } else if (!why && (f->kind == BF_INT || f->kind == BF_I64)) {
            char *end;
            errno = 0;
            const long long x = strtoll(v, &end, 10);
            if (end == v || *end || errno || x < f->lo || x > f->hi) {
                snprintf(msg, sizeof msg, "not an integer in [%lld, %lld]", (long long)f->lo, (long long)f->hi);
                why = msg;
            } else if (f->kind == BF_INT) {
                *(int *)f->out = (int)x;
            } else {
                *(int64_t *)f->out = (int64_t)x;
            }
        } else if (!why && f->kind == BF_LIST) {
            const int n = parse_list(v, (int *)f->out, f->max);
            snprintf(msg, sizeof msg, "not a list a,b,.. of at most %d lengths in [1, 2^26]", f->max);
            if (n < 1) why = msg;
            else *f->n = n;
        } else if (!why) {
            int c = 0;
            while (f->choices[c] && strcmp(f->choices[c], v)) c++;
            if (!f->choices[c]) why = "not one of the choices";
            else *(int *)f->out = c;
        }
        if (why) {
            fprintf(stderr, "%s: %s%s%s%s: %s\n%s\n", BENCH_NAME, f ? f->name : argv[i], v ? " '" : "", v ? v : "",
                    v ? "'" : "", why, usage);
            return 1;
        }
    }
    return 0;
}
