/* A layer's output given as weighted rows (plugin.h: m1c_out_rows, ABI 1.4), summed where it is read:
 * by topk's combine when it writes its output, and by the core's residual norm when the layer hands the
 * rows over instead. The same operations in both, so that either way gives the same bits. */
#pragma once

#include <stdint.h>

#include "vec.cuh"

/* o[0 .. V) = the sum over j < k, in order, of weight[j] * rows[idx[j] ld + c .. + V) (idx[j] < 0: no term),
 * each term added by a fused multiply-add, the sum starting at 0. TY: float or __nv_bfloat16 (vec_ld's
 * alignments). */
template <int V, typename TY>
static __device__ __forceinline__ void m1c_rows_sum(float (&o)[V], const TY *rows, const int32_t *idx,
                                                    const float *weight, int k, int64_t ld, int64_t c) {
#pragma unroll
    for (int v = 0; v < V; v++) o[v] = 0.0f;
    for (int j = 0; j < k; j++) {
        const int32_t r = idx[j];
        if (r < 0) continue;
        const float wj = weight[j];
        float y[V];
        vec_ld<V>(y, rows + (int64_t)r * ld + c);
#pragma unroll
        for (int v = 0; v < V; v++) o[v] = __fmaf_rn(wj, y[v], o[v]);
    }
}
