/* m1c import-hf HF_DIR OUT_DIR and m1c export-hf CHECKPOINT OUT_DIR: checkpoints to and from the
 * Hugging Face transformers layout (docs/hf.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../hf.h"
#include "cli.h"

static const char import_usage[] =
    "usage: m1c import-hf HF_DIR OUT_DIR\n\n"
    "Reads a Hugging Face MiniMax checkpoint (HF_DIR/config.json with model.safetensors, or shards listed in\n"
    "model.safetensors.index.json; transformers 5.x's fused experts or MiniMax's per-expert w1/w2/w3) and\n"
    "writes an m1c checkpoint to OUT_DIR: model.safetensors, m1c.cfg (the model, no training stages),\n"
    "trainer.json, and hf_config.json (the original, kept for export-hf). Settings m1c cannot compute\n"
    "exactly as transformers does are refused, naming config.json and the key. See docs/hf.md.\n";

static const char export_usage[] =
    "usage: m1c export-hf CHECKPOINT OUT_DIR [options]\n\n"
    "Writes an m1c checkpoint as a Hugging Face transformers MiniMax checkpoint: OUT_DIR/config.json and\n"
    "OUT_DIR/model.safetensors (tensors in name order). Keys of CHECKPOINT/hf_config.json that m1c does not\n"
    "model are kept, so import-hf followed by export-hf gives back the same files. Models transformers\n"
    "cannot compute exactly (other plugins, partial RoPE, m1c's decay formula, ...) are refused.\n\n"
    "  --experts fused|per-expert  expert tensors as transformers 5.x's mlp.experts.gate_up_proj/down_proj\n"
    "                              (default) or MiniMax's block_sparse_moe.experts.N.w1/w2/w3 (transformers 4.x)\n"
    "  --dtype f32|bf16            stored precision (default f32; bf16 rounds to nearest even)\n"
    "  -s key.path=value           override a setting of the checkpoint's configuration first\n";

int m1c_cmd_import_hf(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL};
    int np = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(import_usage, stdout);
            return 0;
        }
        if (argv[i][0] == '-' || np == 2)
            return m1c_cli_error("import-hf: unexpected argument '%s' (see m1c import-hf --help)", argv[i]);
        pos[np++] = argv[i];
    }
    if (np != 2) return m1c_cli_error("import-hf: expected HF_DIR and OUT_DIR (see m1c import-hf --help)");
    m1c_err e = {{0}};
    if (m1c_hf_import(pos[0], pos[1], &e)) return m1c_cli_error("%s", e.msg);
    fprintf(stderr, "imported %s into %s\n", pos[0], pos[1]);
    return 0;
}

int m1c_cmd_export_hf(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL};
    int np = 0, rc = 0;
    m1c_overrides ov = {0};
    m1c_hf_export_opts o = {M1C_HF_FUSED, M1C_F32};
    for (int i = 1; i < argc && !rc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(export_usage, stdout);
            m1c_overrides_free(&ov);
            return 0;
        } else if (!strcmp(a, "--experts") && i + 1 < argc) {
            const char *v = argv[++i];
            if (!strcmp(v, "fused")) o.layout = M1C_HF_FUSED;
            else if (!strcmp(v, "per-expert")) o.layout = M1C_HF_PER_EXPERT;
            else rc = m1c_cli_error("export-hf: --experts: expected fused or per-expert, got '%s'", v);
        } else if (!strcmp(a, "--dtype") && i + 1 < argc) {
            const char *v = argv[++i];
            if (!strcmp(v, "f32")) o.dtype = M1C_F32;
            else if (!strcmp(v, "bf16")) o.dtype = M1C_BF16;
            else rc = m1c_cli_error("export-hf: --dtype: expected f32 or bf16, got '%s'", v);
        } else if (!strcmp(a, "-s") && i + 1 < argc) {
            m1c_overrides_add(&ov, argv[++i]);
        } else if (a[0] == '-' || np == 2) {
            rc = m1c_cli_error("export-hf: unexpected argument '%s' (see m1c export-hf --help)", a);
        } else {
            pos[np++] = a;
        }
    }
    if (!rc && np != 2) rc = m1c_cli_error("export-hf: expected CHECKPOINT and OUT_DIR (see m1c export-hf --help)");
    if (!rc) {
        m1c_err e = {{0}};
        if (m1c_hf_export(pos[0], pos[1], ov.items, ov.n, &o, &e)) rc = m1c_cli_error("%s", e.msg);
        else fprintf(stderr, "exported %s to %s\n", pos[0], pos[1]);
    }
    m1c_overrides_free(&ov);
    return rc;
}
