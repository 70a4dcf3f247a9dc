/* Deterministic RNG: xoshiro256** seeded through splitmix64; same numbers on every machine. */
#ifndef M1C_RNG_H
#define M1C_RNG_H

#include "m1c/plugin.h"

void m1c_rng_seed(m1c_rng *r, uint64_t seed, uint64_t stream);
uint64_t m1c_rng_u64(m1c_rng *r);
float m1c_rng_uniform(m1c_rng *r); /* [0, 1), 24 bits */
float m1c_rng_normal(m1c_rng *r);  /* Box-Muller, one value per call */
void m1c_rng_fill_normal(m1c_rng *r, float *x, int64_t n, float std);

#endif
