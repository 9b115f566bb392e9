"""Swap vil_kernels into xLSTM code written against mlstm_kernels' chunkwise kernel, and time it.

Code built on NX-AI's mlstm_kernels calls a chunkwise kernel such as

    from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk as mlstm_chunkwise
    h, (c, n, m) = mlstm_chunkwise(q=q, k=k, v=v, i=i, f=f, c_initial=c0, n_initial=n0,
                                   m_initial=m0, return_last_states=True, chunk_size=128)

The swap is one line (same keywords, same state convention; tuning keywords are accepted):

    from vil_kernels.compat import mlstm_chunkwise

This script builds a small xLSTM-style stack whose layers call the kernel through that name and
carry the (c, n, m) state from one segment of a long sequence to the next, then times it before
and after the swap and checks that outputs and gradients agree. "Before" is mlstm_kernels'
native PyTorch chunkwise kernel when that package is installed, else the plain recurrent
reference (vil_kernels.naive.mlstm_recurrent, the definition of the state convention).

    python examples/swap_into_xlstm.py
    python examples/swap_into_xlstm.py --smoke        # seconds, for CI
"""

import argparse
import time

import torch
from torch import nn

from vil_kernels import naive
from vil_kernels.compat import mlstm_chunkwise as fast_kernel


def _before_kernel():
    try:
        from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__native_autograd as kernel
        return "mlstm_kernels native_autograd", kernel
    except ImportError:
        def recurrent(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                      return_last_states=False, eps=1e-6, **ignored):
            return naive.mlstm_recurrent(q, k, v, i, f, c_initial, n_initial, m_initial,
                                         return_last_states=return_last_states, eps=eps)
        return "recurrent reference (mlstm_kernels not installed)", recurrent


BEFORE_LABEL, before_kernel = _before_kernel()
mlstm_chunkwise = before_kernel        # the name the layers call; the swap rebinds it


class MLSTMLayer(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.nh = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gates = nn.Linear(dim, 2 * num_heads)
        with torch.no_grad():
            self.gates.bias[num_heads:] = 3.0
        self.out = nn.Linear(dim, dim)

    def forward(self, x, state):
        B, S, D = x.shape
        heads = lambda t: t.reshape(B, S, self.nh, -1).transpose(1, 2)
        q, k, v = (heads(t) for t in self.qkv(self.norm(x)).chunk(3, -1))
        i, f = self.gates(x).transpose(1, 2).chunk(2, 1)
        c0, n0, m0 = state if state is not None else (None, None, None)
        h, state = mlstm_chunkwise(q=q, k=k, v=v, i=i, f=f, c_initial=c0, n_initial=n0,
                                   m_initial=m0, return_last_states=True, chunk_size=64)
        return x + self.out(h.transpose(1, 2).reshape(B, S, D)), state


class XLSTMStack(nn.Module):
    def __init__(self, dim, depth, num_heads):
        super().__init__()
        self.layers = nn.ModuleList(MLSTMLayer(dim, num_heads) for _ in range(depth))

    def forward(self, x, segment):
        states = [None] * len(self.layers)
        outs = []
        for start in range(0, x.shape[1], segment):
            y = x[:, start:start + segment]
            for j, layer in enumerate(self.layers):
                y, states[j] = layer(y, states[j])
            outs.append(y)
        return torch.cat(outs, 1)


def main(argv=None):
    global mlstm_chunkwise
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--segment", type=int, default=128, help="positions per kernel call")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.dim, args.depth, args.seq_len, args.segment, args.iters = 32, 1, 80, 40, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = XLSTMStack(args.dim, args.depth, args.heads).to(device)
    x = torch.randn(args.batch_size, args.seq_len, args.dim, device=device)
    print(f"xLSTM-style stack: dim {args.dim}, {args.depth} layers, {args.seq_len} positions in "
          f"segments of {args.segment}, batch {args.batch_size}, float32 on {device}")

    results = {}
    for label, kernel in ((f"before ({BEFORE_LABEL})", before_kernel),
                          ("after (vil_kernels.compat)", fast_kernel)):
        mlstm_chunkwise = kernel                  # <- the one-line swap (an import in real code)
        model.zero_grad(set_to_none=True)
        out = model(x, args.segment)
        out.square().mean().backward()
        grads = [p_.grad.clone() for p_ in model.parameters()]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            model.zero_grad(set_to_none=True)
            model(x, args.segment).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[label] = (out.detach(), grads, (time.perf_counter() - t0) / args.iters)
    mlstm_chunkwise = before_kernel

    (ref, ref_g, t_ref), (out, g, t_new) = results.values()
    for label, (_, _, t) in results.items():
        print(f"{label:55s} fwd+bwd {t * 1e3:9.1f} ms")
    print(f"speed-up x{t_ref / t_new:.2f}")
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
    err_out, err_grad = rel(out, ref), max(rel(a, b) for a, b in zip(g, ref_g))
    ok = err_out <= 1e-3 and err_grad <= 1e-2
    print(f"max relative difference: output {err_out:.2e}, gradients {err_grad:.2e} "
          f"({'outputs agree' if ok else 'MISMATCH'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
