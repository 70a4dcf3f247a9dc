/* C glue for tests/test_lightning_core_cuda.c: runs the fused lightning-attention core (lightning_core.cuh)
 * on host f32 arrays, so that a C test can compare it with a CPU reference. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lightning_core.cuh"

/* The C API (declared identically in test_lightning_core_cuda.c). */
extern "C" {
/* 1 where a CUDA device can be used. */
int lct_available(void);
/* The output-pass kernels this build runs on this device: 1 (mma.sync) or 2 (also wgmma, sm_90a builds on
 * sm_90); lct_run's kernel picks one, 0 .. lct_kernels() - 1. */
int lct_kernels(void);
/* How lc_run cuts (BH, T, hd) with the given sms_override (see lct_run): returns the output segments per
 * sequence; into *kf (state-only segments per output segment), *nfine (state-only segments per sequence)
 * and *seg_rows (rows per output segment) unless NULL. */
int lct_plan(int BH, int T, int hd, int sms_override, int *kf, int *nfine, int *seg_rows);
/* The core on the GPU: x, y, z [BH][T][hd] host f32, rounded once to bf16 (nearest) on the device; those
 * rounded values come back in xr, yr, zr (host [BH][T][hd], each may be NULL) so that a reference can use
 * exactly what the kernel read. slope host [nh]; init NULL or host [BH][hd][hd]; out host [BH][T][hd];
 * final_state NULL or host [BH][hd][hd]. sms_override: > 0 plans as if the device had that many
 * multiprocessors, with segments as short as 4 blocks (a huge value forces many segments); 0 as the
 * plugin does (lc_slots, LC_SEG_BLOCKS); < 0 with no resident slots to fill (one segment). kernel: 0
 * mma.sync, 1 wgmma (see lct_kernels).
 * Returns 0; 2 when lc_run itself fails (err names the CUDA error); 1 for any other failure. */
int lct_run(int BH, int nh, int T, int hd, const float *x, const float *y, const float *z, const float *slope,
            int reverse, const float *init, float *out, float *final_state, int sms_override, int kernel, float *xr,
            float *yr, float *zr, char *err, size_t errlen);
}

/* Floats of NaN pattern kept on both sides of out, final_state and the workspace: a write outside the
 * arrays changes them. */
enum { LCT_GUARD = 4096 };

__global__ static void lct_to_bf16(const float *in, __nv_bfloat16 *out, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

/* The resident-slot count lc_run plans with: the device's (as the plugin), that of sms_override
 * multiprocessors, or none. */
static int lct_slots(int sms_override, int hd) {
    if (sms_override < 0) { /* no slots; set up for lc_run (whose launch reports a failed setup) */
        (void)lc_setup(hd);
        return 0;
    }
    return sms_override > 0 ? lc_occupancy(hd) * sms_override : lc_slots(hd);
}

/* The shortest segment lc_run may cut, in blocks: the plugin's default where it plans for the device, the
 * planner's floor of 4 where sms_override forces cuts (so that sequences of a few hundred rows exercise the
 * segmented path). */
static int lct_seg_blocks(int sms_override) { return sms_override > 0 ? 4 : 0; }

int lct_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

int lct_kernels(void) { return wg_available() ? 2 : 1; }

/* The plan lc_run_t makes (the same call). */
int lct_plan(int BH, int T, int hd, int sms_override, int *kf, int *nfine, int *seg_rows) {
    const int slots = lct_slots(sms_override, hd);
    const lc_plan pl = lc_plan_for(BH, T, hd, slots, lct_seg_blocks(sms_override));
    if (kf) *kf = pl.kf;
    if (nfine) *nfine = pl.nfine;
    if (seg_rows) *seg_rows = pl.seg_rows;
    return pl.nseg;
}

/* bf16 -> f32 is exact: the bf16 bits are the f32's upper half. */
static void lct_widen(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}

/* Every 32-bit word of a guard still the 0xffffffff that cudaMemset(0xff) wrote. */
static int lct_guard_ok(const float *dev, char *err, size_t errlen, const char *what) {
    uint32_t h[LCT_GUARD];
    const cudaError_t e = cudaMemcpy(h, dev, sizeof h, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cudaMemcpy of the %s guard: %s", what, cudaGetErrorString(e));
        return 0;
    }
    for (int i = 0; i < LCT_GUARD; i++)
        if (h[i] != 0xffffffffu) {
            snprintf(err, errlen, "lc_run wrote outside %s (guard word %d is 0x%08x)", what, i, h[i]);
            return 0;
        }
    return 1;
}

#define CK(call)                                                                                                   \
    do {                                                                                                           \
        const cudaError_t e_ = (call);                                                                             \
        if (e_ != cudaSuccess) {                                                                                   \
            snprintf(err, errlen, "%s: %s", #call, cudaGetErrorString(e_));                                        \
            goto done;                                                                                             \
        }                                                                                                          \
    } while (0)

int lct_run(int BH, int nh, int T, int hd, const float *x, const float *y, const float *z, const float *slope,
            int reverse, const float *init, float *out, float *final_state, int sms_override, int kernel, float *xr,
            float *yr, float *zr, char *err, size_t errlen) {
    /* every declaration before the first goto (C++ forbids jumping over initialisations) */
    int rc = 1;
    const int64_t n = (int64_t)BH * T * hd, n2 = (int64_t)BH * hd * hd, G = LCT_GUARD;
    const float *host_in[3] = {x, y, z};
    float *host_rounded[3] = {xr, yr, zr};
    float *d_f32 = NULL, *d_out = NULL, *d_fin = NULL, *d_init = NULL, *d_slope = NULL, *d_ws = NULL;
    __nv_bfloat16 *d_in[3] = {NULL, NULL, NULL};
    uint16_t *h_bits = NULL;
    int slots = 0;
    int64_t ws_n = 0;
    lc_problem p;
    cudaError_t e = cudaSuccess;

    snprintf(err, errlen, "ok");
    if (BH < 1 || nh < 1 || T < 1 || !lc_supported(hd)) {
        snprintf(err, errlen, "lct_run: bad shape BH %d nh %d T %d hd %d", BH, nh, T, hd);
        return 1;
    }
    slots = lct_slots(sms_override, hd);
    ws_n = lc_workspace_floats(BH, T, hd, slots, lct_seg_blocks(sms_override));

    CK(cudaMalloc(&d_f32, (size_t)n * sizeof(float)));
    for (int i = 0; i < 3; i++) {
        CK(cudaMalloc(&d_in[i], (size_t)n * sizeof(__nv_bfloat16)));
        CK(cudaMemcpy(d_f32, host_in[i], (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
        lct_to_bf16<<<(int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096), 256>>>(d_f32, d_in[i], n);
        CK(cudaGetLastError());
    }
    CK(cudaDeviceSynchronize());
    /* the rounded inputs, read back from what the kernel will read */
    if (xr || yr || zr) {
        h_bits = (uint16_t *)malloc((size_t)n * sizeof(uint16_t));
        if (!h_bits) {
            snprintf(err, errlen, "lct_run: out of host memory");
            goto done;
        }
        for (int i = 0; i < 3; i++)
            if (host_rounded[i]) {
                CK(cudaMemcpy(h_bits, d_in[i], (size_t)n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
                lct_widen(host_rounded[i], h_bits, n);
            }
    }

    CK(cudaMalloc(&d_slope, (size_t)nh * sizeof(float)));
    CK(cudaMemcpy(d_slope, slope, (size_t)nh * sizeof(float), cudaMemcpyHostToDevice));
    if (init) {
        CK(cudaMalloc(&d_init, (size_t)n2 * sizeof(float)));
        CK(cudaMemcpy(d_init, init, (size_t)n2 * sizeof(float), cudaMemcpyHostToDevice));
    }
    /* out, final state and workspace between guards, all NaN (0xff bytes): an element lc_run forgets to
     * write stays NaN, one it writes outside changes a guard */
    CK(cudaMalloc(&d_out, (size_t)(n + 2 * G) * sizeof(float)));
    CK(cudaMemset(d_out, 0xff, (size_t)(n + 2 * G) * sizeof(float)));
    if (final_state) {
        CK(cudaMalloc(&d_fin, (size_t)(n2 + 2 * G) * sizeof(float)));
        CK(cudaMemset(d_fin, 0xff, (size_t)(n2 + 2 * G) * sizeof(float)));
    }
    if (ws_n > 0) {
        CK(cudaMalloc(&d_ws, (size_t)(ws_n + 2 * G) * sizeof(float)));
        CK(cudaMemset(d_ws, 0xff, (size_t)(ws_n + 2 * G) * sizeof(float)));
    }
    CK(cudaDeviceSynchronize());

    memset(&p, 0, sizeof p);
    p.x = d_in[0], p.y = d_in[1], p.z = d_in[2];
    p.out = d_out + G, p.out_f32 = 1;
    p.sbh = (int64_t)T * hd;
    p.BH = BH, p.nh = nh, p.T = T, p.hd = hd;
    p.slope = d_slope, p.reverse = reverse, p.init = d_init;
    p.final_state = d_fin ? d_fin + G : NULL;
    p.ws = d_ws ? d_ws + G : NULL;
    p.ws_floats = ws_n;
    p.slots = slots;
    p.kernel = kernel == 1 ? LC_WGMMA : LC_MMA;
    p.seg_blocks = lct_seg_blocks(sms_override);
    e = lc_run(&p, 0);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "lc_run: %s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
        rc = 2;
        goto done;
    }
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());

    CK(cudaMemcpy(out, d_out + G, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    if (!lct_guard_ok(d_out, err, errlen, "out (before)") || !lct_guard_ok(d_out + G + n, err, errlen, "out (after)"))
        goto done;
    if (final_state) {
        CK(cudaMemcpy(final_state, d_fin + G, (size_t)n2 * sizeof(float), cudaMemcpyDeviceToHost));
        if (!lct_guard_ok(d_fin, err, errlen, "final_state (before)") ||
            !lct_guard_ok(d_fin + G + n2, err, errlen, "final_state (after)"))
            goto done;
    }
    if (d_ws && (!lct_guard_ok(d_ws, err, errlen, "the workspace (before)") ||
                 !lct_guard_ok(d_ws + G + ws_n, err, errlen, "the workspace (after)")))
        goto done;
    rc = 0;

done:
    /* frees after an error too; a sticky error (a kernel fault) makes them fail, which changes nothing */
    cudaFree(d_f32);
    for (int i = 0; i < 3; i++) cudaFree(d_in[i]);
    cudaFree(d_out);
    cudaFree(d_fin);
    cudaFree(d_init);
    cudaFree(d_slope);
    cudaFree(d_ws);
    free(h_bits);
    return rc;
}
