/* xoshiro256** (Blackman & Vigna) seeded through splitmix64: fast, and the same on every machine. */
#include "rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void m1c_rng_seed(m1c_rng *r, uint64_t seed, uint64_t stream) {
    /* Streams are independent seeds mixed through splitmix64, so (seed, stream) pairs differ. */
    uint64_t x = seed ^ (stream * 0xd1342543de82ef95ull + 0x2545f4914f6cdd1dull);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

uint64_t m1c_rng_u64(m1c_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float m1c_rng_uniform(m1c_rng *r) { return (float)(m1c_rng_u64(r) >> 40) * (1.0f / 16777216.0f); }

float m1c_rng_normal(m1c_rng *r) {
    /* Box-Muller from two 53-bit uniforms; u1 in (0, 1] so the log is finite. */
    double u1 = ((double)(m1c_rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(m1c_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void m1c_rng_fill_normal(m1c_rng *r, float *x, int64_t n, float std) {
    for (int64_t i = 0; i < n; i++) x[i] = std * m1c_rng_normal(r);
}
