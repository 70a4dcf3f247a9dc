/* Warpgroup tensor-core primitives for sm_90a (wgmma), shared by the core's and the plugins' CUDA kernels:
 * shared-memory matrix descriptors, the fences and groups of the asynchronous products, the m64n64k16 bf16
 * product with f32 accumulation (A from shared memory or from registers) and the m64n256k16 one (both operands from
 * shared memory). Only an sm_90a build (the nvcc target
 * compute_90a, which defines __CUDA_ARCH_FEAT_SM90_ALL) assembles them; elsewhere they compile to nothing,
 * and the host must not launch a kernel that uses them (the build defines M1C_SM90A where it has them).
 *
 * A warpgroup is 4 consecutive warps starting at a multiple of 4; every instruction here is issued by all
 * of its 128 threads. Register layouts (PTX ISA, "wgmma.mma_async.m64nNk16"): warp w of the group holds
 * rows 16 w .. 16 w + 15 of A (from registers) and of the accumulator, each in the layout of mma.sync
 * m16n8k16 (mma.cuh): A as a0..a3; the accumulator of N columns as N / 8 tiles of 4 values,
 * d[4 t + e] at row g + 8 (e / 2), column 8 t + 2 (lane % 4) + e % 2 (g = lane / 4 within the warp).
 *
 * Shared-memory operands are tiles in the 128-byte swizzle (wg_sw_off below; unswizzled core-matrix
 * tiles made the lightning pass 1.35-1.7x slower, docs/perf.md), read as K-major (K contiguous) or MN-major
 * (M or N contiguous, the "transposed" operand: B in the attention kernels, A and B in topk's weight
 * gradients): SBO = bytes between 8-row groups (1024); LBO is unused for K-major operands, and for MN-major
 * ones the bytes between 64-column panels (unused where the product is one panel wide). */
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_DEVICE 1
#else
#define WG_DEVICE 0
#endif

/* 1 where this translation unit has its sm_90a kernels (its target built for sm_90a defines M1C_SM90A) and
 * the current device runs them (compute capability 9.0). */
static inline int wg_available(void) {
#ifdef M1C_SM90A
    int dev = 0, major = 0, minor = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
           minor == 0;
#else
    return 0;
#endif
}

/* Descriptor of a 128-byte-swizzled shared-memory operand at 32-bit shared address a (16-byte aligned; the
 * swizzle pattern anchored at 1024-byte boundaries); the layout field's 1 is that swizzle. */
__device__ static inline uint64_t wg_desc(uint32_t a, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((a & 0x3FFFF) >> 4) | (uint64_t)((lbo & 0x3FFFF) >> 4) << 16 |
           (uint64_t)((sbo & 0x3FFFF) >> 4) << 32 | (uint64_t)1 << 62;
}

/* The 128-byte swizzle, the layout of the shared-memory tiles that the kernels here feed to the products: a
 * tile of R rows (a multiple of 8) by a multiple of 64 bf16 columns is column panels of 64, each R rows of
 * 128 bytes with row r's 16-byte chunk c at (c ^ r % 8) 16; tiles 1024-byte aligned. The byte offset of
 * element (r, c): */
__device__ static inline uint32_t wg_sw_off(int r, int c, int R) {
    return (uint32_t)((c / 64) * R * 128 + r * 128 + ((c % 64 / 8) ^ (r % 8)) * 16 + (c % 8) * 2);
}
/* Descriptors of such a tile at shared address a: as a K-major operand (its rows are M or N; k-step k, 16
 * columns, at a + wg_kstep(k, R) 16 bytes) and as an MN-major one (its rows are K; k-step k, 16 rows, at a
 * + 2048 k; one 64-column panel per product). A descriptor plus n is that of the address 16 n bytes on
 * (shared addresses stay below 2^18). */
__device__ static inline uint64_t wg_kdesc(uint32_t a) { return wg_desc(a, 16, 1024); }
__device__ static inline uint64_t wg_mndesc(uint32_t a) { return wg_desc(a, 1024, 1024); }
__device__ static inline uint32_t wg_kstep(int k, int R) { return (uint32_t)((k / 4) * R * 128 + (k % 4) * 32) >> 4; }
/* ROWS rows of W bf16 at src (row stride ld elements) into the swizzled tile at dst by cp.async, from the
 * block's NT threads (a multiple of 64): thread t copies chunk t % 8 of rows t / 8 + NT / 8 i of every
 * panel (consecutive threads fill a row's 128 bytes); rows >= n zero. */
template <int ROWS, int W, int NT>
__device__ static inline void wg_load_tile(void *dst, const __nv_bfloat16 *src, int64_t ld, int n) {
    static_assert(NT % 64 == 0 && ROWS % (NT / 8) == 0, "a thread's rows share their swizzle (row % 8)");
    constexpr int RS = NT / 8;
    const int r0 = (int)threadIdx.x / 8, c = (int)threadIdx.x % 8;
    unsigned char *d = static_cast<unsigned char *>(dst) + r0 * 128 + ((c ^ (r0 % 8)) * 16);
    const __nv_bfloat16 *s = src + (int64_t)r0 * ld + c * 8;
#pragma unroll
    for (int pn = 0; pn < W / 64; pn++)
#pragma unroll
        for (int i = 0; i < ROWS / RS; i++) {
            const bool ok = r0 + i * RS < n;
            mma_cp16(d + (pn * ROWS + i * RS) * 128, ok ? s + (int64_t)i * RS * ld + pn * 64 : src, ok);
        }
}
/* The kernels' dynamic shared memory, raw, as a layout S aligned to 1024 bytes (launch with
 * wg_smem_bytes<S>()). */
template <typename S> __device__ static inline S &wg_smem(unsigned char *raw) {
    return *reinterpret_cast<S *>(raw + ((1024 - (mma_smem(raw) & 1023)) & 1023));
}
template <typename S> static constexpr size_t wg_smem_bytes() { return sizeof(S) + 1024; }

/* Before the first product of a sequence, and whenever registers it reads (A, the accumulator) were
 * written by ordinary instructions since the last one. */
__device__ static inline void wg_fence() {
#if WG_DEVICE
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ static inline void wg_commit() {
#if WG_DEVICE
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
/* Waits until at most N committed groups are pending. */
template <int N> __device__ static inline void wg_wait() {
#if WG_DEVICE
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* Orders this thread's ordinary (and cp.async) shared-memory writes before later reads by the tensor cores'
 * asynchronous proxy: each writing thread, before the barrier that publishes the writes. */
__device__ static inline void wg_fence_smem() {
#if WG_DEVICE
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* A register fence for the compiler, which does not know that the products are asynchronous: after
 * wg_wait, so that reads of an accumulator stay below the wait; before wg_fence, on the accumulators and A
 * fragments written since the last products, so that those writes stay above it (else the products are
 * serialised, or the compiler inserts its own fence). */
template <int N> __device__ static inline void wg_hold(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i]));
}
template <int N> __device__ static inline void wg_hold(uint32_t (&a)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(a[i]));
}

/* Four 8 x 8 bf16 matrices to shared memory (stmatrix, sm_90): lanes 8 q .. 8 q + 7 give the row
 * addresses of matrix q, whose fragment r_q this lane holds as ldmatrix would load it (row lane / 4,
 * columns 2 (lane % 4) ..). */
__device__ static inline void wg_stsm4(uint32_t a, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if WG_DEVICE
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(r0), "r"(r1), "r"(r2),
                 "r"(r3)
                 : "memory");
#endif
}
/* Two bf16 products, each rounded once: (v.lo f.lo, v.hi f.hi). */
__device__ static inline uint32_t wg_hmul2(uint32_t v, uint32_t f) {
    uint32_t r = 0;
#if WG_DEVICE
    asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(v), "r"(f));
#endif
    return r;
}

/* The 32 accumulator registers of an m64n64 product as asm operands %0 .. %31, and their list. */
#define WG_D32_LIST                                                                                             \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                  \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_D32_OPERANDS(d)                                                                                      \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

/* d (64 x 64, f32) = (acc ? d : 0) + A B, A (64 x 16) and B (16 x 64) from shared memory (descriptors da,
 * db); TA / TB: 0 K-major, 1 MN-major. */
template <int TA, int TB> __device__ static inline void wg_64x64_ss(float (&d)[32], uint64_t da, uint64_t db, int acc) {
#if WG_DEVICE
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32_LIST ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WG_D32_OPERANDS(d)
                 : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
#endif
}
/* The same with A from registers (a[4], the layout above). */
template <int TB> __device__ static inline void wg_64x64_rs(float (&d)[32], const uint32_t a[4], uint64_t db, int acc) {
#if WG_DEVICE
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32_LIST ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : WG_D32_OPERANDS(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc), "n"(TB));
#endif
}

/* The 128 accumulator registers of an m64n256 product as asm operands %0 .. %127, and their list. */
#define WG_D128_LIST \
    "{" \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
    "}"
#define WG_D128_OPERANDS(d) \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

/* d (64 x 256, f32) = (acc ? d : 0) + A B, A (64 x 16) and B (16 x 256) from shared memory (descriptors
 * da, db); TA / TB: 0 K-major, 1 MN-major (M or N contiguous: 64-element panels LBO bytes apart). */
template <int TA, int TB>
__device__ static inline void wg_64x256_ss(float (&d)[128], uint64_t da, uint64_t db, int acc) {
#if WG_DEVICE
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WG_D128_LIST ", %128, %129, p, 1, 1, %131, %132;\n}\n"
                 : WG_D128_OPERANDS(d)
                 : "l"(da), "l"(db), "r"(acc), "n"(TA), "n"(TB));
#endif
}
