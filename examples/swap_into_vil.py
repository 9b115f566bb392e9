"""Swap vil_kernels into Vision-LSTM code that calls the reference cell function, and time it.

Vision-LSTM's reference code (NX-AI/vision-lstm) computes each mLSTM cell with

    from vision_lstm.vision_lstm_util import parallel_stabilized_simple
    h = parallel_stabilized_simple(queries=q, keys=k, values=v, igate_preact=ig, fgate_preact=fg,
                                   lower_triangular_matrix=causal_mask)

which builds an S x S matrix per head. The swap is one line:

    from vil_kernels.compat import parallel_stabilized_simple

This script builds a ViL-style backbone (patch embedding, pairs of mLSTM blocks walking the
patches forward and backward, each with up-projection, 3x3 depthwise conv, q/k/v, gates, cell,
group norm, output gate, down-projection) whose blocks call the cell through that name, times
inference and a training step before and after the swap on this machine, and checks that the
outputs and gradients agree. It is self-contained: the "before" cell is the reference formula
written out below.

    python examples/swap_into_vil.py                      # ViL-T-sized blocks at 224 px
    python examples/swap_into_vil.py --resolution 448 --depth 2
    python examples/swap_into_vil.py --smoke              # seconds, for CI
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from vil_kernels.compat import parallel_stabilized_simple as fast_cell


def reference_cell(queries, keys, values, igate_preact, fgate_preact, lower_triangular_matrix=None,
                   stabilize_rowwise=True, eps=1e-6, **kwargs):
    """The quadratic cell of the reference code: gates (B, NH, S, 1), rowwise stabilizer."""
    B, NH, S, DH = queries.shape
    log_f = F.logsigmoid(fgate_preact).cumsum(-2)                        # (B, NH, S, 1)
    mask = lower_triangular_matrix
    if mask is None or mask.shape[-1] < S:
        mask = torch.ones(S, S, dtype=torch.bool, device=queries.device).tril()
    log_d = torch.where(mask[:S, :S], log_f - log_f.transpose(-2, -1), -math.inf)
    log_d = log_d + igate_preact.transpose(-2, -1)
    max_log_d = log_d.max(-1, keepdim=True).values
    c = (queries @ keys.transpose(-2, -1)) / math.sqrt(DH) * torch.exp(log_d - max_log_d)
    normalizer = torch.maximum(c.sum(-1, keepdim=True).abs(), torch.exp(-max_log_d))
    return (c / (normalizer + eps)) @ values


# The name the blocks call. "Before": the reference; the swap rebinds it (in real code, the import).
parallel_stabilized_simple = reference_cell


class MLSTMLayer(nn.Module):
    def __init__(self, dim, grid, num_heads=4):
        super().__init__()
        inner = 2 * dim
        self.grid, self.nh = grid, num_heads
        self.proj_up = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(inner, inner) for _ in range(3))
        self.igate, self.fgate = nn.Linear(3 * inner, num_heads), nn.Linear(3 * inner, num_heads)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))
        self.outnorm = nn.GroupNorm(num_heads, inner)
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim)
        S = grid[0] * grid[1]
        self.register_buffer("causal", torch.ones(S, S, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, S, _ = x.shape
        xm, z = self.proj_up(x).chunk(2, dim=-1)
        img = xm.transpose(1, 2).reshape(B, -1, *self.grid)
        a = F.silu(self.conv(img).flatten(2).transpose(1, 2))
        q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(xm)
        gates_in = torch.cat([q, k, v], dim=-1)
        ig = self.igate(gates_in).transpose(1, 2)[..., None]            # (B, NH, S, 1)
        fg = self.fgate(gates_in).transpose(1, 2)[..., None]
        heads = lambda t: t.reshape(B, S, self.nh, -1).transpose(1, 2)
        h = parallel_stabilized_simple(queries=heads(q), keys=heads(k), values=heads(v),
                                       igate_preact=ig, fgate_preact=fg,
                                       lower_triangular_matrix=self.causal)
        h = self.outnorm(h.transpose(1, 2).reshape(B, S, -1).transpose(1, 2)).transpose(1, 2)
        return self.proj_down((h + self.skip * a) * F.silu(z))


class Block(nn.Module):
    def __init__(self, dim, grid, reverse):
        super().__init__()
        self.norm, self.layer, self.reverse = nn.LayerNorm(dim), MLSTMLayer(dim, grid), reverse

    def forward(self, x):
        if self.reverse:      # the reference flips the tokens for every second block
            x = x.flip(1)
        x = x + self.layer(self.norm(x))
        return x.flip(1) if self.reverse else x


class ViLStyleBackbone(nn.Module):
    def __init__(self, dim=192, depth=12, resolution=224, patch_size=16, num_classes=1000):
        super().__init__()
        grid = (resolution // patch_size, resolution // patch_size)
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, grid[0] * grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, grid, reverse=bool(j % 2)) for j in range(2 * depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(torch.cat([x[:, 0], x[:, -1]], dim=-1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(model, x, iters, warmup, train):
    def step():
        if train:
            model.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x)
    for _ in range(warmup):
        step()
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(x.device)
    return (time.perf_counter() - t0) / iters


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return out.detach(), grads


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def main(argv=None):
    global parallel_stabilized_simple
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=192, help="model width (ViL-T: 192)")
    p.add_argument("--depth", type=int, default=1, help="block pairs (ViL-T has 12)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="model and input dtype")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.depth, args.resolution, args.batch_size = 32, 1, 160, 2
        args.iters, args.warmup = 1, 0
    if args.resolution % args.patch_size:
        p.error(f"--resolution {args.resolution} is not divisible by --patch-size {args.patch_size}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = ViLStyleBackbone(args.dim, args.depth, args.resolution, args.patch_size)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device,
                    dtype=dtype)
    S = (args.resolution // args.patch_size) ** 2
    print(f"ViL-style backbone: dim {args.dim}, {2 * args.depth} blocks, {S} tokens, batch "
          f"{args.batch_size}, {args.dtype} on {device}")

    results = {}
    for label, cell in (("before (reference cell)", reference_cell),
                        ("after (vil_kernels.compat)", fast_cell)):
        parallel_stabilized_simple = cell          # <- the one-line swap (an import in real code)
        results[label] = (outputs_and_grads(model, x),
                          time_model(model, x, args.iters, args.warmup, train=False),
                          time_model(model, x, args.iters, args.warmup, train=True))
    parallel_stabilized_simple = reference_cell

    (ref_out, ref_grads), ref_inf, ref_train = results["before (reference cell)"]
    (out, grads), inf, train = results["after (vil_kernels.compat)"]
    print(f"{'':28s} {'inference':>14s} {'train step':>14s}")
    for label, (_, t_inf, t_train) in results.items():
        print(f"{label:28s} {args.batch_size / t_inf:9.1f} img/s {args.batch_size / t_train:9.1f} img/s")
    print(f"speed-up: inference x{ref_inf / inf:.2f}, train step x{ref_train / train:.2f}")
    err_out = rel(out, ref_out)
    err_grad = max(rel(g, r) for g, r in zip(grads, ref_grads))
    tol = {"float64": 1e-9, "float32": 1e-3, "bfloat16": 1e-1}[args.dtype]
    ok = err_out <= tol and err_grad <= tol * 10
    print(f"max relative difference: output {err_out:.2e}, gradients {err_grad:.2e} "
          f"({'outputs agree' if ok else 'MISMATCH'}, tolerance {tol:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
