/* Warp-level tensor-core primitives for sm_80 and later (mma.sync m16n8k16 bf16 with f32 accumulation,
 * ldmatrix, cp.async), shared by the core's and the plugins' CUDA kernels (installed as m1c/cuda/ for plugins
 * built out of tree). Fragment layouts (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
 *   A 16x16 (row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
 *   B 16x8 (col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
 *   C 16x8:        c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
 * so two adjacent C tiles (16 x 16) are, packed to bf16, the A fragment of the next product. ldmatrix x4
 * loads four 8x8 tiles whose row addresses come from lanes 0-7, 8-15, 16-23, 24-31; .trans transposes each. */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

__device__ static inline uint32_t mma_smem(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* The ldmatrix loads take a 32-bit shared-memory address (mma_smem of a tile plus byte offsets), so that
 * hot loops add constants to one register instead of converting generic pointers each time. */
__device__ static inline void mma_ldsm4(uint32_t r[4], uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ static inline void mma_ldsm4t(uint32_t r[4], uint32_t a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
/* Byte offset of this lane's row address within a 16 x 16 tile of 2-byte elements, row stride rs bytes,
 * for an ldmatrix x4 whose four 8 x 8 matrices are (rows 0-7, 8-15) x (cols 0-7, 8-15) in the order:
 * mma_lane_rc: rows fastest (A fragments; B from [k][n] with .trans), mma_lane_cr: columns fastest
 * (B fragments from [n][k]; A from [k][m] with .trans). */
__device__ static inline uint32_t mma_lane_rc(int lane, int rs) {
    return (uint32_t)(((lane % 8) + ((lane / 8) & 1) * 8) * rs + (lane / 16) * 16);
}
__device__ static inline uint32_t mma_lane_cr(int lane, int rs) {
    return (uint32_t)(((lane % 8) + (lane / 16) * 8) * rs + ((lane / 8) & 1) * 16);
}
/* c (16x8 f32) += a (16x16 bf16, row) b (16x8 bf16, col) */
__device__ static inline void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ static inline uint32_t mma_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
/* The A fragment (16 x 16, bf16) of the next product from two adjacent C tiles (16 x 8 each, f32): the
 * chaining of the header comment, rounding each value to bf16. */
__device__ static inline void mma_c2a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = mma_pack(c0[0], c0[1]), a[1] = mma_pack(c0[2], c0[3]);
    a[2] = mma_pack(c1[0], c1[1]), a[3] = mma_pack(c1[2], c1[3]);
}
__device__ static inline uint32_t mma_scale2(uint32_t v, float lo, float hi) {
    __nv_bfloat162 b = *reinterpret_cast<__nv_bfloat162 *>(&v);
    const float2 f = __bfloat1622float2(b);
    return mma_pack(f.x * lo, f.y * hi);
}
/* 16 bytes global -> shared, zero-filled when !valid (rows past the sequence's end) */
__device__ static inline void mma_cp16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(mma_smem(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ static inline void mma_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ static inline void mma_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

