/* Hopper's tensor memory accelerator (TMA) and the shared-memory barriers that track it, for the core's and
 * the plugins' sm_90a kernels: tensor maps encoded on the host (the driver's cuTensorMapEncodeTiled, reached
 * through the runtime, so nothing links against libcuda), bulk tensor copies global -> shared that complete on an
 * mbarrier, the barrier's arrive / expect / wait, and bulk tensor stores shared -> global. Like
 * wgmma.cuh, the device side assembles only in an sm_90a build (WG_DEVICE) and is empty elsewhere.
 *
 * A barrier here is a 64-bit word in shared memory, addressed by its 32-bit shared address. Its phases
 * alternate parity 0, 1, 0, ...: a phase completes when its expected arrivals have arrived and the bytes
 * announced with tma_expect have landed. Waiting for parity p returns once the phase of that parity has
 * completed; on a fresh barrier (phase 0 in progress) waiting for parity 1 returns at once, which is how a
 * producer finds every stage of a ring free the first time round. */
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wgmma.cuh"

/* ---- host: tensor maps ---- */

/* cuTensorMapEncodeTiled's signature (CUDA 12.0 and later). */
typedef CUresult (*tma_encode_fn)(CUtensorMap *map, CUtensorMapDataType dtype, cuuint32_t rank, void *addr,
                                  const cuuint64_t *dims, const cuuint64_t *strides, const cuuint32_t *box,
                                  const cuuint32_t *elem_strides, CUtensorMapInterleave il,
                                  CUtensorMapSwizzle sw, CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob);

/* The driver's encoder, or NULL where the driver lacks it. Look it up once and keep it (its owner's state). */
static inline tma_encode_fn tma_encoder(void) {
    void *fn = NULL;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return (tma_encode_fn)fn;
}

/* A map of a tensor of `rank` dimensions of dtype (dims[0] contiguous; strides[i] bytes between
 * consecutive indices of dimension i + 1, multiples of 16), moved in boxes of box[] elements (128 bytes
 * wide at most) in the 128-byte swizzle of wgmma.cuh; reads outside the tensor fill zeros, writes there
 * are dropped. 0 on success. */
static inline int tma_map(tma_encode_fn enc, CUtensorMap *map, CUtensorMapDataType dtype, const void *base, int rank,
                          const uint64_t *dims, const uint64_t *strides, const uint32_t *box) {
    cuuint64_t d[5], s[4];
    cuuint32_t b[5], e[5];
    for (int i = 0; i < rank; i++) d[i] = dims[i], b[i] = box[i], e[i] = 1;
    for (int i = 0; i + 1 < rank; i++) s[i] = strides[i];
    return enc(map, dtype, (cuuint32_t)rank, (void *)base, d, s, b, e, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS
               ? 0
               : -1;
}
static inline int tma_map_bf16(tma_encode_fn enc, CUtensorMap *map, const void *base, int rank, const uint64_t *dims,
                               const uint64_t *strides, const uint32_t *box) {
    return tma_map(enc, map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, rank, dims, strides, box);
}

/* ---- device: barriers and copies ---- */

__device__ static inline void tma_bar_init(uint32_t bar, uint32_t arrivals) {
#if WG_DEVICE
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#endif
}
/* After the initialisations, before the barrier that publishes them to the block. */
__device__ static inline void tma_bar_init_fence() {
#if WG_DEVICE
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
/* One arrival that also announces `bytes` of copies to land in this phase. */
__device__ static inline void tma_expect(uint32_t bar, uint32_t bytes) {
#if WG_DEVICE
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ static inline void tma_arrive(uint32_t bar) {
#if WG_DEVICE
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
/* Returns once the phase of parity `parity` has completed. */
__device__ static inline void tma_wait(uint32_t bar, uint32_t parity) {
#if WG_DEVICE
    uint32_t done = 0;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
#endif
}
/* The box of `map` at coordinates (c0, c1[, c2]) (elements, innermost first) into shared memory at dst
 * (1024-byte aligned for the 128-byte swizzle), completing on bar. map: the address of a __grid_constant__
 * kernel parameter. */
__device__ static inline void tma_load_2d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1) {
#if WG_DEVICE
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
                     dst),
                 "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
#endif
}
__device__ static inline void tma_load_3d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1, int c2) {
#if WG_DEVICE
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(
                     dst),
                 "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
                 : "memory");
#endif
}

/* ---- device: bulk stores shared -> global ---- */

/* The box of `map` at (c0, c1) from shared memory at src (1024-byte aligned, in the map's swizzle): writes
 * outside the tensor are dropped. Issued by one thread; its stores form groups (tma_store_commit). The
 * writing threads' shared-memory stores must be ordered before it (wg_fence_smem, then a barrier). */
__device__ static inline void tma_store_2d(const CUtensorMap *map, uint32_t src, int c0, int c1) {
#if WG_DEVICE
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"((uint64_t)map),
                 "r"(src), "r"(c0), "r"(c1)
                 : "memory");
#endif
}
__device__ static inline void tma_store_3d(const CUtensorMap *map, uint32_t src, int c0, int c1, int c2) {
#if WG_DEVICE
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"((uint64_t)map),
                 "r"(src), "r"(c0), "r"(c1), "r"(c2)
                 : "memory");
#endif
}
/* The same, adding the f32 box into the tensor (each element one f32 addition, done at L2). */
__device__ static inline void tma_add_3d(const CUtensorMap *map, uint32_t src, int c0, int c1, int c2) {
#if WG_DEVICE
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                     (uint64_t)map),
                 "r"(src), "r"(c0), "r"(c1), "r"(c2)
                 : "memory");
#endif
}
__device__ static inline void tma_store_commit() {
#if WG_DEVICE
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
/* Until at most N of this thread's store groups still read their shared memory (which may then be
 * rewritten); tma_store_drain: until all have completed. */
template <int N> __device__ static inline void tma_store_wait_read() {
#if WG_DEVICE
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ static inline void tma_store_drain() {
#if WG_DEVICE
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}
/* Named barrier `id` (1..15; 0 is __syncthreads's) of `threads` threads (a multiple of 32). */
__device__ static inline void tma_bar_sync(int id, int threads) {
#if WG_DEVICE
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}
