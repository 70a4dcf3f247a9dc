/* Programmatic dependent launch (sm_90) for the core's and the plugins' kernels: a kernel launched with
 * pdl_launch may be scheduled before the kernel ahead of it in the stream has finished, so that its launch
 * and its blocks' arrival on the multiprocessors overlap that kernel's last blocks instead of following
 * them (about 1.5 us between two dependent kernels otherwise). The contract, kept by every kernel
 * launched this way: pdl_start() is its first statement. It lets the next such kernel launch once every
 * block of this one has started (so none of this kernel's blocks waits for room behind it), then waits
 * until the kernel ahead has finished and its writes are visible: nothing before it reads or writes
 * memory. Kernels launched otherwise (cuBLAS, a plain <<<>>>) wait for everything ahead as usual, and
 * pdl_start() in them costs nothing. Before sm_90 pdl_start() is empty and pdl_launch an ordinary launch.
 *
 * For kernels of many small blocks. A waiting block holds its multiprocessor's registers, shared memory
 * and warp slots, which work on other streams (the optimizer beside the backward) could have used: with
 * the persistent expert products (a 208 KiB block per multiprocessor) and the lightning core launched this
 * way as well, the training step took 25.5 ms instead of 24.5 (H200). */
#pragma once

#include <cuda_runtime.h>

__device__ static inline void pdl_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* kernel<<<grid, block, smem, stream>>>(args...), allowed to start early as above. */
template <typename... Params, typename... Args>
static inline cudaError_t pdl_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                     cudaStream_t stream, Args &&...args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
    cfg.attrs = attr, cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args &&>(args)...);
}
