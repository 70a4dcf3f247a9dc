/* The topk router's per-token step: softmax of the logits, top-k, combine weights. One copy for the
 * CPU reference (topk.c) and the CUDA router kernel (topk.cu), so that both route identically. */
#ifndef M1C_MOE_TOPK_ROUTE_H
#define M1C_MOE_TOPK_ROUTE_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define TOPK_ROUTE_FN __host__ __device__ static inline
#else
#define TOPK_ROUTE_FN static inline
#endif

/* One token: p[0..E) holds the router logits and becomes their softmax (in place); id[0..k) gets the
 * k experts of highest probability (ties: the lower index wins) and w[0..k) their combine weights,
 * renormalised to sum 1 over the k when normalize. The j-th pick is the best expert below the
 * (j-1)-th in the order (p descending, index ascending): O(E) per pick, no list of taken experts.
 * Probabilities are either all finite or all NaN (one NaN or inf logit makes the sum NaN); with NaN
 * no expert is below the previous pick, and the j-th pick is j, the lowest index not yet taken.
 * p is indexed only by the loops' own e (the picks' probabilities ride along in pp, pb and w): with E a
 * constant the GPU keeps p in registers (route_token in topk.cu). */
TOPK_ROUTE_FN void topk_route_token(float *p, int32_t *id, float *w, int E, int k, int normalize) {
    float mx = p[0];
    for (int e = 1; e < E; e++) mx = p[e] > mx ? p[e] : mx;
    double sum = 0.0;
    for (int e = 0; e < E; e++) {
        p[e] = expf(p[e] - mx);
        sum += p[e];
    }
    const float inv = (float)(1.0 / sum);
    for (int e = 0; e < E; e++) p[e] *= inv;
    double ssel = 0.0;
    int prev = -1;
    float pp = 0.0f; /* p[prev] */
    for (int j = 0; j < k; j++) {
        int best = -1;
        float pb = 0.0f; /* p[best] */
        for (int e = 0; e < E; e++) {
            if (prev >= 0 && !(p[e] < pp || (p[e] == pp && e > prev))) continue; /* not below prev */
            if (best < 0 || p[e] > pb) best = e, pb = p[e];
        }
        if (best < 0) { /* all NaN: the lowest index not yet taken (j < k <= E) */
            best = j;
            for (int e = 0; e < E; e++)
                if (e == j) pb = p[e];
        }
        id[j] = best;
        w[j] = pb;
        ssel += pb;
        prev = best, pp = pb;
    }
    for (int j = 0; j < k; j++) w[j] = normalize ? (float)(w[j] / ssel) : w[j];
}

#endif
