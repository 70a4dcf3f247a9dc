/* Long-context prefill: feeds up to 1,048,576 tokens of one sequence through a small hybrid model in
 * chunks (m1c_decoder: the lightning layers carry a constant-size recurrent state, the softmax layer a KV
 * cache), and prints the time of each segment by component, so the linear cost of lightning attention
 * and the growing cost of softmax attention show side by side.
 *
 *   m1c_bench_prefill [--device cuda|cpu] [--tokens N] [--chunk N] [--segments N]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/host.h"
#include "../core/rng.h"
#include "../core/session.h"
#include "../core/timer.h"

#define BENCH_NAME "m1c_bench_prefill"
#include "bench_flags.h"

/* H 512, 8 layers 7:1, lightning 8 x 64 (block 256), softmax 8 query + 2 KV heads x 64, 4 experts
 * top-2 with F 1024, byte vocabulary. */
static const char model_cfg[] =
    "model = { vocab_size = 259; hidden = 512; layers = 8;\n"
    "  pattern = [\"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"lin\", \"sm\"];\n"
    "  types = { lin = { attention = { plugin = \"lightning\"; heads = 8; head_dim = 64; block_size = 256; }; };\n"
    "            sm = { attention = { plugin = \"softmax\"; heads = 8; kv_heads = 2; head_dim = 64; }; }; };\n"
    "  ffn = { plugin = \"topk\"; experts = 4; top_k = 2; ffn_dim = 1024; }; };\n"
    "run = { stages = (); };\n";

int main(int argc, char **argv) {
    int cpu = 0, precision = 1;
    int64_t tokens = 1 << 20, chunk = 16384;
    int segments = 16;
    static const char *const devices[] = {"cuda", "cpu", NULL};
    const bench_flag flags[] = {bf_choice("--device", &cpu, devices), bf_i64("--tokens", &tokens, 1, 1LL << 32),
                                bf_i64("--chunk", &chunk, 1, 1 << 30), bf_int("--segments", &segments, 1, 4096)};
    if (bench_flags(argc, argv, flags, sizeof flags / sizeof flags[0],
                    "usage: m1c_bench_prefill [--device cuda|cpu] [--tokens N] [--chunk N] [--segments N]", NULL,
                    NULL, 0))
        return 1;
    const int device = cpu ? M1C_DEVICE_CPU : M1C_DEVICE_CUDA;
    if (device == M1C_DEVICE_CPU) precision = 0;
    if (!m1c_dev_available(device)) {
        fprintf(stderr, "m1c_bench_prefill: device not available in this build or on this machine\n");
        return 1;
    }
    if (chunk < 1 || tokens < chunk || segments < 1) {
        fprintf(stderr, "m1c_bench_prefill: need 1 <= chunk <= tokens and segments >= 1\n");
        return 1;
    }
    m1c_session s;
    m1c_err e = {{0}};
    const char *ov[2] = {device == M1C_DEVICE_CUDA ? "run.device=\"cuda\"" : "run.device=\"cpu\"",
                         precision ? "run.precision=\"bf16\"" : "run.precision=\"fp32\""};
    int rc = m1c_session_open_text(&s, model_cfg, "prefill-bench", ".", ov, 2, &e);
    if (!rc) rc = m1c_session_build_model(&s, 1, &e);
    m1c_model *m = &s.model;
    m1c_decoder d;
    memset(&d, 0, sizeof d);
    if (!rc) rc = m1c_decoder_init(&d, m, 1, tokens, (int)chunk, &e);
    if (rc) {
        fprintf(stderr, "m1c_bench_prefill: %s\n", e.msg);
        m1c_session_close(&s);
        return 1;
    }
    /* Decoding state per layer type: lightning's is fixed, softmax's grows with the context. */
    double lin_bytes = 0, sm_bytes = 0;
    for (int l = 0; l < m->L; l++) {
        int first = (int)(d.layer_state[l] - d.state.t), last = l + 1 < m->L ? (int)(d.layer_state[l + 1] - d.state.t)
                                                                            : d.state.n;
        for (int i = first; i < last; i++) {
            double b = (double)m1c_numel(&d.state.t[i]) * (d.state.t[i].dtype == M1C_BF16 ? 2 : 4);
            if (!strcmp(m->layer[l].attn.plugin->desc->name, "lightning")) lin_bytes += b;
            else sm_bytes += b;
        }
    }
    printf("prefill of %lld tokens in chunks of %lld, %s; decoding state: lightning %.2f MiB (7 layers, any "
           "length), softmax KV cache %.1f MiB (1 layer, for this length)\n",
           (long long)tokens, (long long)chunk, device == M1C_DEVICE_CUDA ? "GPU, bf16" : "CPU, fp32",
           lin_bytes / 1048576.0, sm_bytes / 1048576.0);
    int32_t *ids = malloc((size_t)chunk * sizeof *ids);
    float *logits = malloc((size_t)m->V * sizeof *logits);
    m1c_rng g;
    m1c_rng_seed(&g, 9, 0);
    d.run.profile = 1;
    int64_t per_seg = (tokens / chunk + segments - 1) / segments * chunk;
    printf("%12s %12s %12s %12s %12s %12s\n", "tokens", "segment ms", "ms/1K tok", "lightning", "softmax", "moe+rest");
    double t0 = m1c_now(), ts = t0, lin0 = 0, sm0 = 0, all0 = 0;
    for (int64_t pos = 0; pos < tokens && !rc; pos += chunk) {
        int n = (int)(tokens - pos < chunk ? tokens - pos : chunk);
        for (int i = 0; i < n; i++) ids[i] = (int32_t)(m1c_rng_u64(&g) % (uint64_t)m->V);
        rc = m1c_decoder_feed(m, &d, ids, n, logits, &e);
        if (rc || ((pos + n) % per_seg && pos + n < tokens)) continue;
        m1c_dev_sync(device);
        double now = m1c_now(), lin = 0, sm = 0, all = 0;
        for (int i = 0; i < d.run.prof_n; i++) {
            all += d.run.prof_fwd[i];
            if (!strcmp(d.run.prof_name[i], "lightning")) lin += d.run.prof_fwd[i];
            if (!strcmp(d.run.prof_name[i], "softmax")) sm += d.run.prof_fwd[i];
        }
        double seg = now - ts, seg_tok = (double)per_seg;
        printf("%12lld %12.1f %12.3f %12.1f %12.1f %12.1f\n", (long long)(pos + n), seg * 1e3, seg * 1e6 / seg_tok,
               (lin - lin0) * 1e3, (sm - sm0) * 1e3, ((all - all0) - (lin - lin0) - (sm - sm0)) * 1e3);
        ts = now, lin0 = lin, sm0 = sm, all0 = all;
    }
    if (rc) fprintf(stderr, "m1c_bench_prefill: %s\n", e.msg);
    else printf("total %.2f s for %lld tokens\n", m1c_now() - t0, (long long)tokens);
    free(ids), free(logits);
    m1c_decoder_free(&d, m);
    m1c_session_close(&s);
    return rc ? 1 : 0;
}
