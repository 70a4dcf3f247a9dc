#!/usr/bin/env python3
"""Causal softmax attention, forward and forward + backward, with torch's scaled_dot_product_attention in bf16:
the speed m1c's softmax attention kernels are measured against (issue goal: >= 0.8x at T = 2K-8K).

    python3 bench/sdpa_reference.py [--T 2048 8192 ...] [--tokens 65536] [--backends flash,cudnn]

Shapes of the issue: 16 query heads x 128, 65,536 tokens per batch (B = 65536 / T), once with 16 KV heads
and once with 4 (GQA through enable_gqa, PyTorch 2.5+). Tensors are laid out (B, T, heads, 128) and viewed
as (B, heads, T, 128), as a model's projections give them. One line per case:
"sdpa <backend> q16 kv<n> T <T> B <B>  fwd <ms> ms  fwd+bwd <ms> ms  <M tokens/s> M tokens/s  <TFLOP/s> TFLOP/s"
(M tokens/s and TFLOP/s of forward + backward; causal FLOPs: forward 2*B*H*T^2*D, backward 2.5x that).
"""
import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768, 65536],
                help="sequence lengths (the softmax goal is at 2K-8K; 32K and 64K are the lightning shapes)")
ap.add_argument("--tokens", type=int, default=65536, help="tokens per batch: B = tokens / T")
ap.add_argument("--heads", type=int, default=16)
ap.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4])
ap.add_argument("--head-dim", type=int, default=128)
ap.add_argument("--backends", default="flash,cudnn",
                help="comma-separated: flash (FlashAttention-2 in PyTorch), cudnn, efficient, default (no pin)")
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("--warmup", type=int, default=3)
args = ap.parse_args()

if not torch.cuda.is_available():
    print("sdpa  FAILED: no CUDA device visible to PyTorch")
    sys.exit(1)
print(f"sdpa-info torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0)}",
      flush=True)

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel  # PyTorch 2.3+
except ImportError:
    SDPBackend = sdpa_kernel = None
NAMES = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def pinned(backend):
    # A context that allows only this backend: a case it cannot run raises instead of falling back.
    if backend == "default":
        return contextlib.nullcontext()  # PyTorch's own choice, falling back as it likes
    if backend not in NAMES or sdpa_kernel is None or not hasattr(SDPBackend, NAMES[backend]):
        raise RuntimeError(f"no SDPA backend {backend!r} in this PyTorch")
    return sdpa_kernel(getattr(SDPBackend, NAMES[backend]))


def timed(fn, iters):
    # Milliseconds per call, from CUDA events around `iters` back-to-back calls.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def case(backend, hkv, T):
    B, H, D = args.tokens // T, args.heads, args.head_dim
    gqa = {"enable_gqa": True} if hkv != H else {}

    def make(h):
        return torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = make(H), make(hkv), make(hkv)
    dout = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # output's layout

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        torch.autograd.grad(o, (q, k, v), dout)  # gradients returned, not accumulated into .grad

    with pinned(backend):
        for _ in range(args.warmup):
            fwd()
            fwd_bwd()
        t_fwd, t_all = timed(fwd, args.iters), timed(fwd_bwd, args.iters)
    flops = 3.5 * 2 * B * H * T * T * D
    print(f"sdpa {backend:<9} q{H} kv{hkv:<2} T {T:6d} B {B:3d}  fwd {t_fwd:8.3f} ms  fwd+bwd {t_all:8.3f} ms  "
          f"{B * T / t_all * 1e-3:8.3f} M tokens/s  {flops / t_all * 1e-9:6.1f} TFLOP/s", flush=True)


failed = 0
for backend in args.backends.split(","):
    for hkv in args.kv_heads:
        for T in args.T:
            try:
                case(backend, hkv, T)
            except Exception as ex:  # noqa: BLE001 -- an unsupported case is reported and skipped
                lines = str(ex).strip().splitlines()
                print(f"sdpa {backend:<9} q{args.heads} kv{hkv:<2} T {T:6d}  unsupported: {type(ex).__name__}: "
                      f"{lines[0][:200] if lines else ''}", flush=True)
                failed += backend == "flash"  # the reference itself; other backends are extra information
            torch.cuda.empty_cache()
sys.exit(1 if failed else 0)
