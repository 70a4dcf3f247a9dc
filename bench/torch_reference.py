#!/usr/bin/python3
"""PyTorch reference for m1c_bench_train: the same fixed model (MODEL.md) and training step (forward +
backward + AdamW on random tokens), to compare m1c's CPU tokens/s with plain PyTorch on the same machine.

    /usr/bin/python3 bench/torch_reference.py [--threads 2] [--steps 5] [--check]

Written for Debian 12's python3-torch (1.13, OpenBLAS); runs on newer PyTorch as well.
"""
import argparse
import math
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--foreach", choices=("auto", "on", "off"), default="auto",
                help="AdamW's multi-tensor path (auto: PyTorch's default)")
ap.add_argument("--check", action="store_true",
                help="compare block-wise lightning attention with the O(T^2) definition, then exit")
ap.add_argument("--blas", choices=("openmp", "system"), default="openmp",
                help="openmp: Debian's OpenMP build of OpenBLAS (the one m1c links), loaded ahead of the "
                     "libblas.so.3 alternative; system: whatever the alternative points to (pthread OpenBLAS "
                     "by default, whose spinning pool fights PyTorch's OpenMP pool for the cores)")
args = ap.parse_args()
OPENMP_BLAS = "/usr/lib/x86_64-linux-gnu/openblas-openmp"
if args.blas == "openmp" and os.environ.get("M1C_TORCH_BLAS") != "openmp" and os.path.isdir(OPENMP_BLAS):
    # The dynamic loader reads LD_LIBRARY_PATH only at start-up: re-run this script with it set.
    os.environ["LD_LIBRARY_PATH"] = OPENMP_BLAS + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    os.environ["M1C_TORCH_BLAS"] = "openmp"
    os.execv(sys.executable, [sys.executable] + sys.argv)
# Thread pools read these when torch is imported, so set them first: OpenBLAS (Debian's default is the
# pthread build, with its own pool) and OpenMP (PyTorch's intra-op pool) both get --threads.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The fixed shape of m1c_bench_train (bench/bench_train.c) and m1c's defaults for everything it leaves out.
V, H, L = 256, 256, 8
LIN_HEADS, LIN_HD, LIN_BLOCK = 8, 32, 64
SM_HEADS, SM_KV, SM_HD, ROPE_THETA = 8, 4, 32, 1e6  # softmax plugin: rotary_dim = head_dim, theta 1e6
E, TOPK, FFN = 4, 2, 512
AUX_COEF = 0.001
NORM_EPS, LIN_NORM_EPS = 1e-5, 1e-6
ALPHA, BETA = 1.0, 1.0  # DeepNorm factors: 1 in the benchmark config
B, T = 8, 256


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.w, self.eps)


def linear(n_in, n_out):
    lin = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


class Lightning(nn.Module):
    """Lightning attention, block-wise as MODEL.md: intra-block ((QK^T)*D)V, inter-block via the FP32 state."""

    def __init__(self, layer):
        super().__init__()
        nh, hd = LIN_HEADS, LIN_HD
        self.qkv = linear(H, 3 * nh * hd)  # output columns [q_h | k_h | v_h] per head
        self.gate = linear(H, nh * hd)
        self.norm = RMSNorm(nh * hd, LIN_NORM_EPS)
        self.out = linear(nh * hd, H)
        factor = 1.0 - (layer / (L - 1.0) if L > 1 else 0.0) + 1e-5
        s = torch.tensor([2.0 ** (-8.0 * (h + 1) / nh) * factor for h in range(nh)], dtype=torch.float64)
        bs = LIN_BLOCK
        i = torch.arange(1, bs + 1, dtype=torch.float64)
        diff = i[:, None] - i[None, :]
        # Decay constants for one block, per head (all in double, then FP32).
        mask = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        self.register_buffer("d_intra", mask.float()[None, :, None])                             # (1,nh,1,bs,bs)
        self.register_buffer("d_q", torch.exp(-s[:, None] * i).float()[None, :, None, :, None])  # exp(-s i)
        self.register_buffer("d_k", torch.exp(-s[:, None] * (bs - i)).float()[None, :, None, :, None])
        self.register_buffer("d_blk", torch.exp(-s * bs).float()[None, :, None, None])           # exp(-s m)

    def mix(self, q, k, v):
        """q, k, v: (B, nh, T, hd) -> o (B, nh, T, hd); T a multiple of the block size."""
        Bn, nh, Tn, hd = q.shape
        bs = LIN_BLOCK
        nb = Tn // bs
        q, k, v = (t.reshape(Bn, nh, nb, bs, hd) for t in (q, k, v))
        intra = ((q @ k.transpose(-1, -2)) * self.d_intra) @ v
        kv_blk = (k * self.d_k).transpose(-1, -2) @ v  # (B, nh, nb, hd, hd): each block's own contribution
        states = []  # state entering each block
        kv = torch.zeros_like(kv_blk[:, :, 0])
        for b in range(nb):
            states.append(kv)
            kv = self.d_blk * kv + kv_blk[:, :, b]
        inter = (q * self.d_q) @ torch.stack(states, 2)
        return (intra + inter).reshape(Bn, nh, Tn, hd)

    def forward(self, x):
        Bn, Tn, _ = x.shape
        nh, hd = LIN_HEADS, LIN_HD
        qkv = F.silu(self.qkv(x)).view(Bn, Tn, nh, 3, hd).permute(3, 0, 2, 1, 4)
        o = self.mix(qkv[0], qkv[1], qkv[2])
        o = o.transpose(1, 2).reshape(Bn, Tn, nh * hd)
        return self.out(self.norm(o) * torch.sigmoid(self.gate(x)))


class Softmax(nn.Module):
    """Causal GQA softmax attention with RoPE over the full head dim (rotate_half pairing)."""

    def __init__(self):
        super().__init__()
        self.q = linear(H, SM_HEADS * SM_HD)
        self.k = linear(H, SM_KV * SM_HD)
        self.v = linear(H, SM_KV * SM_HD)
        self.o = linear(SM_HEADS * SM_HD, H)
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, SM_HD, 2, dtype=torch.float64) / SM_HD)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).triu(1))

    def rope(self, x):
        Tn = x.shape[-2]
        x1, x2 = x[..., : SM_HD // 2], x[..., SM_HD // 2:]
        return x * self.cos[:Tn] + torch.cat([-x2, x1], -1) * self.sin[:Tn]

    def forward(self, x):
        Bn, Tn, _ = x.shape
        g = SM_HEADS // SM_KV
        q = self.rope(self.q(x).view(Bn, Tn, SM_HEADS, SM_HD).transpose(1, 2))
        k = self.rope(self.k(x).view(Bn, Tn, SM_KV, SM_HD).transpose(1, 2))
        v = self.v(x).view(Bn, Tn, SM_KV, SM_HD).transpose(1, 2)
        if hasattr(F, "scaled_dot_product_attention"):  # PyTorch >= 2.0
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # 1.13: query heads h*g..h*g+g-1 share KV head h, as a broadcast batch dimension
            q = q.view(Bn, SM_KV, g, Tn, SM_HD)
            k, v = k[:, :, None], v[:, :, None]
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(SM_HD))
            att = att.masked_fill(self.causal[:Tn, :Tn], float("-inf")).softmax(-1)
            o = (att @ v).view(Bn, SM_HEADS, Tn, SM_HD)
        return self.o(o.transpose(1, 2).reshape(Bn, Tn, SM_HEADS * SM_HD))


class MoE(nn.Module):
    """Top-k MoE: FP32 router softmax, renormalised top-k, SwiGLU experts, Switch load-balancing loss."""

    def __init__(self):
        super().__init__()
        self.router = linear(H, E)
        self.w13 = nn.Parameter(torch.randn(E, H, 2 * FFN) * 0.02)  # gate then up, fused per expert
        self.w2 = nn.Parameter(torch.randn(E, FFN, H) * 0.02)

    def forward(self, x):
        shp = x.shape
        x = x.reshape(-1, H)
        N = x.shape[0]
        p = self.router(x).float().softmax(-1)
        w, idx = p.topk(TOPK, -1)
        w = w / w.sum(-1, keepdim=True)
        f = torch.bincount(idx.flatten(), minlength=E).float() / (N * TOPK)  # no gradient (argmax)
        aux = AUX_COEF * E * (f * p.mean(0)).sum()
        out = torch.zeros_like(x)
        flat_idx, flat_w = idx.flatten(), w.flatten()
        for e in range(E):
            sel = (flat_idx == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            tok = torch.div(sel, TOPK, rounding_mode="floor")
            xe = x.index_select(0, tok)
            gu = xe @ self.w13[e]
            y = (F.silu(gu[:, :FFN]) * gu[:, FFN:]) @ self.w2[e]
            out.index_add_(0, tok, y * flat_w.index_select(0, sel)[:, None])
        return out.view(shp), aux


class Layer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm_in = RMSNorm(H, NORM_EPS)
        self.mixer = Softmax() if layer % 8 == 7 else Lightning(layer)
        self.norm_post = RMSNorm(H, NORM_EPS)
        self.moe = MoE()

    def forward(self, x):
        h = self.norm_in(x)
        x = ALPHA * h + BETA * self.mixer(h)  # post-norm: the residual is taken after the norm
        h = self.norm_post(x)
        y, aux = self.moe(h)
        return ALPHA * h + BETA * y, aux


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.layers = nn.ModuleList(Layer(l) for l in range(L))
        self.norm = RMSNorm(H, NORM_EPS)
        self.head = linear(H, V)  # untied, FP32

    def forward(self, tok, tgt):
        x = self.emb(tok)
        aux = 0.0
        for layer in self.layers:
            x, a = layer(x)
            aux = aux + a
        logits = self.head(self.norm(x).float())
        return F.cross_entropy(logits.view(-1, V), tgt.reshape(-1)) + aux


def check():
    """Block-wise lightning attention against o_t = sum_{j<=t} exp(-s(t-j)) (q_t.k_j) v_j, in double."""
    torch.manual_seed(0)
    for layer in (0, 3, 6):
        m = Lightning(layer).double()
        q, k, v = (torch.randn(2, LIN_HEADS, 3 * LIN_BLOCK, LIN_HD, dtype=torch.float64) for _ in range(3))
        got = m.mix(q, k, v)
        factor = 1.0 - layer / (L - 1.0) + 1e-5
        s = torch.tensor([2.0 ** (-8.0 * (h + 1) / LIN_HEADS) * factor for h in range(LIN_HEADS)], dtype=torch.float64)
        t = torch.arange(q.shape[2], dtype=torch.float64)
        diff = t[:, None] - t[None, :]
        D = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        want = ((q @ k.transpose(-1, -2)) * D) @ v
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"lightning layer {layer}: max relative error {err:.2e}")
        # 1e-5: the decay tables are built in double then rounded to FP32 (~6e-8 each), and sums of
        # hundreds of terms of both signs can lose a few more digits relative to the largest output.
        if not err < 1e-5:
            sys.exit("lightning block-wise result differs from the definition")


def blas_loaded():
    """The OpenBLAS shared object actually mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.split()[-1]}
    except OSError:
        return "?"
    for lib in sorted(libs):
        if "openblas-openmp" in lib or "openblas-pthread" in lib:
            return os.path.basename(os.path.dirname(lib))
    return ",".join(sorted(os.path.basename(x) for x in libs)) or "?"


def main():
    torch.set_num_threads(args.threads)
    if args.check:
        check()
        return
    torch.manual_seed(0)
    model = Model()
    opt_kw = {} if args.foreach == "auto" else {"foreach": args.foreach == "on"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **opt_kw)
    data = torch.randint(0, V, (B, T + 1))
    tok, tgt = data[:, :T], data[:, 1:]
    nparam = sum(p.numel() for p in model.parameters())
    t0 = 0.0
    for it in range(args.warmup + args.steps):
        if it == args.warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(tok, tgt)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / args.steps
    print(f"torch {torch.__version__}: {B * T / dt:.0f} tokens/s, {dt * 1e3:.1f} ms/step, "
          f"{torch.get_num_threads()} threads, BLAS {blas_loaded()}, {args.steps} steps, B {B} T {T}, {nparam} params, loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
