#!/usr/bin/env python3
"""Reference fixtures for m1c's Hugging Face parity tests (tests/test_hf.c), made with transformers.

Builds tiny random MiniMaxForCausalLM models (transformers 5.x; 4.x's per-expert models work too) and
writes one folder per model under --out:

    config.json          the model's configuration, every key (config.to_dict())
    model.safetensors    its parameters in FP32 (no buffers), either in transformers 5.x's fused expert
                         layout (mlp.experts.gate_up_proj / down_proj) or in MiniMax's own per-expert
                         layout (block_sparse_moe.gate, block_sparse_moe.experts.N.w1/w2/w3)
    input_ids.npy        int64 [B, T]
    logits.npy           float32 [B, T, V]: model(input_ids).logits
    greedy.npy           int64 [B, T + N]: model.generate(input_ids, do_sample=False, max_new_tokens=N)
    labels.npy           int64 [B, T], -100 where ignored
    loss.json            {"loss": model(input_ids, labels=labels).loss, "tokens": scored positions}
    grads.safetensors    FP32 gradients of that loss for a few parameters, transformers 5.x names
    meta.json            versions, seed, sizes, and the smallest top-1/top-2 logit gap of the greedy steps

The models are made so that the details of MiniMax matter: 16 layers (the lightning decay depends on
the layer index), 7:1 lightning/softmax hybrid, grouped-query attention, more than two experts,
attention width nh*hd different from the hidden size, non-default DeepNorm alpha/beta, a sequence
length that is not a multiple of block_size (a partial last block), randomised norm weights and
weights scaled so that logits are O(1) (greedy choices are not near-ties; the script checks the gap).

Everything runs on the CPU in FP32 with one thread and fixed seeds, so the output repeats.

Regenerate (needs torch, transformers >= 4.53 and safetensors; numpy):

    python3 tools/hf_reference.py --out tests/fixtures

Each fixture folder stays under 2 MB (checked).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch


def fixtures():
    """The models: name -> (config kwargs, layout, B, T, new tokens)."""
    L = 16
    hybrid = ["full_attention" if l % 8 == 7 else "linear_attention" for l in range(L)]
    a = dict(
        vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,  # nh*hd = 48 != 32; GQA 4:2
        num_local_experts=4, num_experts_per_tok=2, block_size=8,
        layer_types=hybrid, rms_norm_eps=1e-5, tie_word_embeddings=False,
        linear_attn_alpha_factor=1.7, linear_attn_beta_factor=0.8,
        full_attn_alpha_factor=1.3, full_attn_beta_factor=0.9,
        mlp_alpha_factor=1.5, mlp_beta_factor=0.7,
        rope_theta=10000.0,
    )
    # A second shape: 3 heads (not a power of two), one KV head (MQA), 5 experts top-3, tied
    # embeddings, block 5, another hybrid, the per-expert weight layout.
    hybrid_b = ["full_attention" if l in (0, 7, 15) else "linear_attention" for l in range(L)]
    b = dict(
        vocab_size=96, hidden_size=24, intermediate_size=20, num_hidden_layers=L,
        num_attention_heads=3, num_key_value_heads=1, head_dim=10,  # nh*hd = 30 != 24
        num_local_experts=5, num_experts_per_tok=3, block_size=5,
        layer_types=hybrid_b, rms_norm_eps=1e-6, tie_word_embeddings=True,
        linear_attn_alpha_factor=2.2, linear_attn_beta_factor=1.1,
        full_attn_alpha_factor=0.6, full_attn_beta_factor=1.4,
        mlp_alpha_factor=1.2, mlp_beta_factor=0.5,
        rope_theta=1000000.0,
    )
    return {
        "minimax_fused": (a, "fused", 2, 21, 6),   # T = 21: blocks of 8, 8 and 5
        "minimax_w123": (b, "per_expert", 2, 17, 6),  # T = 17: blocks of 5, 5, 5 and 2
    }


def make_config(kw):
    from transformers import MiniMaxConfig
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    common = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None, router_jitter_noise=0.0,
                  output_router_logits=False, attention_dropout=0.0, sliding_window=None, hidden_act="silu")
    kw.update(common)
    try:  # transformers 5.x
        cfg = MiniMaxConfig(rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)
    except TypeError:  # 4.x
        cfg = MiniMaxConfig(rope_theta=theta, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomise(model, gen):
    """O(1) activations: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm gains 1 + N(0, 0.2^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm gains (layer norms, the lightning output norm, the final norm)
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def fused_state(model, cfg):
    """Parameters under transformers 5.x names (fused experts), whatever the installed version uses."""
    sd = {n: p.detach().float().contiguous().clone() for n, p in model.named_parameters()}
    E = cfg.num_local_experts
    out = {}
    for n, t in sd.items():
        if ".block_sparse_moe.experts." in n:
            continue
        out[n.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for l in range(cfg.num_hidden_layers):
        pre = f"model.layers.{l}.block_sparse_moe.experts."
        if pre + "0.w1.weight" in sd:  # 4.x: stack the experts
            w1 = [sd[f"{pre}{e}.w1.weight"] for e in range(E)]
            w3 = [sd[f"{pre}{e}.w3.weight"] for e in range(E)]
            w2 = [sd[f"{pre}{e}.w2.weight"] for e in range(E)]
            out[f"model.layers.{l}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([w1[e], w3[e]], 0) for e in range(E)]).contiguous()
            out[f"model.layers.{l}.mlp.experts.down_proj"] = torch.stack(w2).contiguous()
    return out


def per_expert_state(fused, cfg):
    """MiniMax's own layout: block_sparse_moe.gate and experts.N.w1 (gate), w3 (up), w2 (down)."""
    F, E = cfg.intermediate_size, cfg.num_local_experts
    out = {}
    for n, t in fused.items():
        if n.endswith(".mlp.gate.weight"):
            out[n.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        elif n.endswith(".mlp.experts.gate_up_proj"):
            pre = n[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(E):
                out[f"{pre}{e}.w1.weight"] = t[e, :F].contiguous()
                out[f"{pre}{e}.w3.weight"] = t[e, F:].contiguous()
        elif n.endswith(".mlp.experts.down_proj"):
            pre = n[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(E):
                out[f"{pre}{e}.w2.weight"] = t[e].contiguous()
        else:
            out[n] = t
    return out


def fused_grad_names(cfg):
    L = cfg.num_hidden_layers
    types = cfg.layer_types
    lin = [l for l in range(L) if types[l] == "linear_attention"]
    full = [l for l in range(L) if types[l] == "full_attention"]
    names = [
        "model.embed_tokens.weight",
        f"model.layers.{lin[0]}.self_attn.qkv_proj.weight",
        f"model.layers.{lin[-1]}.self_attn.output_gate.weight",
        f"model.layers.{lin[-1]}.self_attn.norm.weight",
        f"model.layers.{full[0]}.self_attn.q_proj.weight",
        f"model.layers.{full[-1]}.self_attn.k_proj.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.3.mlp.experts.down_proj",
        "model.layers.12.mlp.experts.gate_up_proj",
        "model.layers.5.input_layernorm.weight",
        "model.norm.weight",
    ]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def grads_fused(model, cfg, names):
    """The gradients of the named 5.x parameters (4.x per-expert gradients stacked into that layout)."""
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out = {}
    E = cfg.num_local_experts
    for n in names:
        if n in g:
            out[n] = g[n].detach().float().contiguous().clone()
            continue
        l = n.split(".")[2]
        pre = f"model.layers.{l}.block_sparse_moe."
        if n.endswith("mlp.gate.weight"):
            out[n] = g[pre + "gate.weight"].detach().float().contiguous().clone()
        elif n.endswith("gate_up_proj"):
            out[n] = torch.stack([torch.cat([g[f"{pre}experts.{e}.w1.weight"], g[f"{pre}experts.{e}.w3.weight"]], 0)
                                  for e in range(E)]).contiguous()
        elif n.endswith("down_proj"):
            out[n] = torch.stack([g[f"{pre}experts.{e}.w2.weight"] for e in range(E)]).contiguous()
        else:
            raise KeyError(f"no gradient for {n}")
    return out


def build(name, kw, layout, B, T, N, seed, out_dir):
    import transformers
    from safetensors.torch import save_file
    from transformers import MiniMaxForCausalLM

    cfg = make_config(kw)
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    randomise(model, gen)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tying failed"

    # Inputs whose greedy continuation has no near-tie (top-1 minus top-2 logit >= min_gap at every
    # step), so that a last-bit difference between implementations cannot flip a token.
    min_gap = 2e-3
    for attempt in range(100):
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                                 min_new_tokens=N, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=None, eos_token_id=None)
        gaps = [float((s.topk(2, dim=-1).values[:, 0] - s.topk(2, dim=-1).values[:, 1]).min()) for s in out.scores]
        if min(gaps) >= min_gap:
            break
    else:
        sys.exit(f"{name}: no input without a near-tie in 100 tries")
    greedy = out.sequences
    assert greedy.shape == (B, T + N), greedy.shape

    with torch.no_grad():
        logits = model(ids).logits.float()
    # The first generated token is the argmax of the last prompt position of the plain forward.
    assert torch.equal(logits[:, -1].argmax(-1), greedy[:, T]), "generate and forward disagree"

    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    labels[0, 4] = -100
    labels[1, :3] = -100
    labels[1, T - 2] = -100
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).loss
    loss.backward()
    n_scored = int((labels[:, 1:] != -100).sum())

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    fused = fused_state(model, cfg)
    state = fused if layout == "fused" else per_expert_state(fused, cfg)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    np.save(os.path.join(out_dir, "input_ids.npy"), ids.numpy().astype(np.int64))
    np.save(os.path.join(out_dir, "logits.npy"), logits.numpy().astype(np.float32))
    np.save(os.path.join(out_dir, "greedy.npy"), greedy.numpy().astype(np.int64))
    np.save(os.path.join(out_dir, "labels.npy"), labels.numpy().astype(np.int64))
    with open(os.path.join(out_dir, "loss.json"), "w") as f:
        json.dump({"loss": float(loss.detach()), "tokens": n_scored}, f, indent=2)
        f.write("\n")
    save_file(grads_fused(model, cfg, fused_grad_names(cfg)), os.path.join(out_dir, "grads.safetensors"),
              metadata={"format": "pt"})

    # The weights file must load back into transformers and give the same logits (fused layout; the
    # per-expert layout loads only where this transformers converts it).
    reload = "not tried"
    try:
        m2 = MiniMaxForCausalLM.from_pretrained(out_dir, attn_implementation="eager").float().eval()
        with torch.no_grad():
            d = float((m2(ids).logits.float() - logits).abs().max())
        reload = f"max abs logit difference {d:.3g}"
        if layout == "fused":
            assert d == 0.0, f"{name}: reloaded model differs by {d}"
    except Exception as ex:  # noqa: BLE001 - informative only for the per-expert layout
        if layout == "fused":
            raise
        reload = f"failed: {type(ex).__name__}: {str(ex)[:200]}"

    meta = {
        "name": name, "layout": layout, "seed": seed, "batch": B, "seq_len": T, "new_tokens": N,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "min_greedy_gap": min(gaps), "input_attempts": attempt + 1, "reload": reload,
        "command": "python3 tools/hf_reference.py --out tests/fixtures",
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out_dir, x)) for x in os.listdir(out_dir))
    assert size < 2 * 1024 * 1024, f"{name}: {size} bytes, over 2 MB"
    print(f"{name}: {size / 1024:.0f} KiB, loss {float(loss.detach()):.6f}, min greedy gap {min(gaps):.4f}, reload {reload}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="folder for the fixture folders")
    ap.add_argument("--seed", type=int, default=20250601)
    ap.add_argument("--only", default=None, help="build only this fixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    for i, (name, (kw, layout, B, T, N)) in enumerate(fixtures().items()):
        if args.only and name != args.only:
            continue
        build(name, kw, layout, B, T, N, args.seed + i, os.path.join(args.out, name))


if __name__ == "__main__":
    main()
