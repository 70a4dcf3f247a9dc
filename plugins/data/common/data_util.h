/* Small helpers the data plugins share (static inline, compiled into each .so): hashing for
 * deterministic splits, a little-endian word format for saved reading positions, settings errors. */
#ifndef M1C_DATA_UTIL_H
#define M1C_DATA_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "m1c/plugin.h"

/* splitmix64 finaliser: a good 64-bit mix, used to hash (seed, source, index) tuples. */
static inline uint64_t m1c_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t m1c_hash3(uint64_t a, uint64_t b, uint64_t c) {
    return m1c_mix64(m1c_mix64(m1c_mix64(a) ^ b) ^ c);
}

/* Uniform double in [0, 1) from the top 53 bits. */
static inline double m1c_unit(uint64_t x) { return (double)(x >> 11) * 0x1p-53; }

static inline uint64_t m1c_double_bits(double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* FNV-1a over bytes, folded into h (for fingerprints of names). */
static inline uint64_t m1c_hash_str(uint64_t h, const char *s) {
    h ^= 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return m1c_mix64(h);
}

/* Positions are sequences of 64-bit words, little-endian whatever the machine. */
static inline void m1c_put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline uint64_t m1c_get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Refuse setting `key` of group s through h->settings_error (the message then carries file:line and
 * the key path). A core older than that member (host tables only grow) gets h->error with the key. */
static inline int m1c_setting_error(const m1c_host *h, const m1c_settings *s, const char *key, const char *fmt, ...)
    M1C_PRINTF(4, 5);
static inline int m1c_setting_error(const m1c_host *h, const m1c_settings *s, const char *key, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (h->size >= offsetof(m1c_host, settings_error) + sizeof h->settings_error && h->settings_error)
        return h->settings_error(h, s, key, "%s", msg);
    return h->error(h, "%s: %s", key, msg);
}

#endif
