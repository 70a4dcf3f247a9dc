#!/usr/bin/env python3
"""transformers' MiniMaxForCausalLM on the GPU reference shape of m1c_bench_train --device cuda: tokens/s of
one training step (forward + loss + backward + fused AdamW) on random tokens, to compare in the same run.

    python3 bench/hf_train_reference.py [--steps 10] [--precision bf16|amp] [--compile] [--experts NAME]

Shape (bench/bench_train.c, gpu_reference_cfg): vocabulary 32000, H 768, 8 layers (7 lightning : 1 softmax),
12 heads x 64 (softmax: 4 KV heads), lightning block 256, 8 experts top-2 with F 1024, B 8, T 2048, untied
head (~220M parameters). The loss includes the router's load-balancing term (coefficient 0.001), as m1c's.
Last line: "hf  <tokens/s> tokens/s  <ms> ms/step  (...)", read by bench/gpu_bench.sh. Written against
transformers 5.x and PyTorch 2.x; options a given version lacks are reported and skipped.
"""
import argparse
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=2048)
ap.add_argument("--precision", choices=("bf16", "amp"), default="bf16",
                help="bf16: parameters, gradients and AdamW state in bf16 (model.to(bfloat16)); amp: fp32 "
                     "parameters with bf16 autocast (fp32 master weights, as m1c's --precision bf16 keeps)")
ap.add_argument("--attn", default="sdpa", help="attn_implementation of the softmax layer (sdpa, eager, ...)")
ap.add_argument("--experts", default="default",
                help="experts backend (eager, grouped_mm, batched_mm; default: what transformers picks)")
ap.add_argument("--no-aux", action="store_true", help="leave the router's load-balancing loss out")
ap.add_argument("--compile", action="store_true", help="torch.compile the model (compilation in the warm-up)")
ap.add_argument("--budget", type=float, default=120.0,
                help="seconds for the timed steps at most: fewer steps if the warm-up shows slow steps")
args = ap.parse_args()


def first_line(ex):
    lines = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {lines[0][:300] if lines else ''}"


def fail(what, ex):
    # One line that gpu_bench.sh shows in its summary instead of a number.
    print(f"hf  FAILED in {what}: {first_line(ex)}", flush=True)
    sys.exit(1)


try:
    import torch
    import transformers
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
except Exception as ex:  # noqa: BLE001 -- any import problem is reported the same way
    fail("import", ex)

if not torch.cuda.is_available():
    fail("setup", RuntimeError("no CUDA device visible to PyTorch"))
dev = torch.device("cuda")
print(f"hf-info torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0)}", flush=True)

B, T = args.batch, args.seq
try:
    cfg = MiniMaxConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64,
        layer_types=["linear_attention"] * 7 + ["full_attention"], block_size=256,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
        output_router_logits=not args.no_aux, max_position_embeddings=max(4096, T),
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = MiniMaxForCausalLM(cfg)
    if args.precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
except Exception as ex:  # noqa: BLE001
    fail("model construction", ex)

# The softmax layer's attention kernel and the experts backend: set where this version can, then report.
try:
    model.set_attn_implementation(args.attn)
except Exception as ex:  # noqa: BLE001
    print(f"hf-info set_attn_implementation({args.attn!r}) not applied: {first_line(ex)}")
if args.experts != "default":
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(args.experts)
        except Exception as ex:  # noqa: BLE001
            fail(f"set_experts_implementation({args.experts!r})", ex)
    else:
        print("hf-info this transformers has no set_experts_implementation: --experts ignored")
attn_impl = getattr(model.config, "_attn_implementation", "?")
experts_impl = (model.get_experts_implementation() if hasattr(model, "get_experts_implementation")
                else getattr(model.config, "_experts_implementation", None))
if isinstance(experts_impl, dict):  # {sub-config name: backend}; this model has one config
    experts_impl = ",".join(sorted(set(map(str, experts_impl.values()))))
experts_impl = experts_impl or "n/a"
nparams = sum(p.numel() for p in model.parameters())
print(f"hf-info {nparams / 1e6:.1f}M parameters, {args.precision}, attention {attn_impl}, experts {experts_impl}",
      flush=True)

# fused=True: one multi-tensor CUDA kernel for the whole update (bf16 parameters are supported).
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
fwd = model
if args.compile:
    fwd = torch.compile(model)  # default mode: no CUDA graphs (the grouped_mm experts backend refuses them)


def step():
    # labels = input_ids: the model shifts them inside its loss (T - 1 predicted positions per sequence).
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "amp"):
        loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


# Warm-up, each step timed on its own so that a slow path (the Python loop over lightning blocks, the
# eager experts loop, a compilation) shows up before the timed run. A failed compilation falls back to
# the uncompiled model, which then gets its own warm-up.
warm = []
while len(warm) < max(args.warmup, 1):
    t0 = time.perf_counter()
    try:
        loss = step()
        torch.cuda.synchronize()
    except Exception as ex:  # noqa: BLE001
        if fwd is model:
            fail(f"warm-up step {len(warm) + 1}", ex)
        print(f"hf-info torch.compile failed ({first_line(ex)}); "
              "timing the model uncompiled", flush=True)
        torch._dynamo.reset()
        fwd, args.compile, warm = model, False, []
        opt.zero_grad(set_to_none=True)
        continue
    warm.append(time.perf_counter() - t0)
    print(f"hf-info warm-up step {len(warm)}: {warm[-1] * 1e3:.1f} ms, loss {loss.item():.3f}", flush=True)

steps = args.steps
if warm and warm[-1] * steps > args.budget:
    steps = max(1, int(args.budget / warm[-1]))
    print(f"hf-info a step takes {warm[-1]:.2f} s: timing {steps} steps instead of {args.steps}")
torch.cuda.synchronize()
t0 = time.perf_counter()
try:
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
except Exception as ex:  # noqa: BLE001
    fail("timed steps", ex)
dt = (time.perf_counter() - t0) / steps
print(f"hf-info loss {loss.item():.3f} (ln 32000 = 10.37 at random init), peak memory "
      f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
print(f"hf  {B * T / dt:.0f} tokens/s  {dt * 1e3:.1f} ms/step  ({args.precision}, attention {attn_impl}, "
      f"experts {experts_impl}, {'torch.compile' if args.compile else 'not compiled'}, B {B} T {T}, {steps} steps)")
