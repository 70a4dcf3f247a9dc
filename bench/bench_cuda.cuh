/* What the CUDA kernel benchmarks (bench_experts.cu, bench_gemm.cu, bench_lightning.cu, bench_softmax.cu)
 * share: a CUDA-call check that exits with the program's name, normal random inputs from a counter hash,
 * their command-line flags, and the median time of a piece of GPU work. The includer defines BENCH_NAME first. */
#pragma once

#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(call)                                                                                                   \
    do {                                                                                                           \
        cudaError_t e_ = (call);                                                                                   \
        if (e_ != cudaSuccess) {                                                                                   \
            fprintf(stderr, "%s: %s: %s\n", BENCH_NAME, #call, cudaGetErrorString(e_));                            \
            exit(1);                                                                                               \
        }                                                                                                          \
    } while (0)

/* The i-th normal value of stream `seed`: a counter hash and Box-Muller. */
__device__ static inline float bench_normal(int64_t i, uint64_t seed) {
    uint64_t h = (uint64_t)i * 0x9E3779B97F4A7C15ull + seed;
    h ^= h >> 33, h *= 0xff51afd7ed558ccdull, h ^= h >> 33, h *= 0xc4ceb9fe1a85ec53ull, h ^= h >> 33;
    const float u1 = ((h >> 40) + 1) * (1.0f / 16777217.0f), u2 = ((h >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

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

/* A benchmark's command-line flag: `--name value` with an integer (int or int64_t, the whole value a
 * decimal number in [lo, hi]), a list "a,b,.." (parse_list: its values into out, their count into *n), or
 * one of the NULL-terminated names `choices` (its index into out); or `--name` alone, a switch (1 into
 * out). */
enum { BF_INT, BF_I64, BF_LIST, BF_CHOICE, BF_SWITCH };
struct bench_flag {
    const char *name;
    int kind;
    void *out;
    int64_t lo, hi;             /* BF_INT, BF_I64 */
    const char *const *choices; /* BF_CHOICE */
    int *n, max;                /* BF_LIST */
};
static inline bench_flag bf_int(const char *name, int *out, int64_t lo, int64_t hi) {
    return bench_flag{name, BF_INT, out, lo, hi, NULL, NULL, 0};
}
static inline bench_flag bf_i64(const char *name, int64_t *out, int64_t lo, int64_t hi) {
    return bench_flag{name, BF_I64, out, lo, hi, NULL, NULL, 0};
}
static inline bench_flag bf_list(const char *name, int *out, int *n, int max) {
    return bench_flag{name, BF_LIST, out, 0, 0, NULL, n, max};
}
static inline bench_flag bf_choice(const char *name, int *out, const char *const *choices) {
    return bench_flag{name, BF_CHOICE, out, 0, 0, choices, NULL, 0};
}
static inline bench_flag bf_switch(const char *name, int *out) {
    return bench_flag{name, BF_SWITCH, out, 0, 0, NULL, NULL, 0};
}

/* argv against flags[0..nf): 0, or 1 after a line naming the flag and what is wrong with it, then usage. */
static inline int bench_flags(int argc, char **argv, const bench_flag *flags, int nf, const char *usage) {
    for (int i = 1; i < argc; i++) {
        const bench_flag *f = NULL;
        for (int k = 0; k < nf && !f; k++)
            if (!strcmp(argv[i], flags[k].name)) f = &flags[k];
        const char *v = f && f->kind != BF_SWITCH && i + 1 < argc ? argv[++i] : NULL;
        const char *why = !f ? "unknown flag" : f->kind != BF_SWITCH && !v ? "needs a value" : NULL;
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

static inline int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median over iters of the GPU time (ms, events on the default stream) of run(), after two warm-up runs. */
template <typename F> static float bench_median_ms(int iters, F run) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *ms = (float *)malloc(sizeof(float) * (size_t)(iters > 0 ? iters : 1));
    if (!ms) {
        fprintf(stderr, "%s: out of memory\n", BENCH_NAME);
        exit(1);
    }
    for (int it = -2; it < iters; it++) {
        CK(cudaEventRecord(e0));
        run();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        if (it >= 0) CK(cudaEventElapsedTime(&ms[it], e0, e1));
    }
    qsort(ms, (size_t)iters, sizeof(float), cmp_float);
    const float med = ms[iters / 2];
    free(ms);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return med;
}
