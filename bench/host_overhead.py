"""Host time of one mLSTM call: how long Python and the launches take before the GPU has work.

    python bench/host_overhead.py                    # ViL-T's head dim at small batches
    python bench/host_overhead.py --shapes 1,4,196,96 --profile

For each path and shape: ``wall`` (a call, synchronized: what a caller waits) and ``host``
(calls enqueued back to back without synchronizing, divided by their number: the CPU's share).
Where host >= wall the call is host-bound and a faster kernel changes nothing; CUDA graphs
(torch.compile's "reduce-overhead" mode) or a larger batch are what help. --profile prints
cProfile's top functions of the Triton forward and backward.
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vil_kernels  # noqa: E402

SHAPES = [(1, 4, 196, 96), (8, 4, 196, 96), (64, 4, 196, 96), (8, 4, 784, 96),
          (8, 4, 784, 384)]


def paths():
    return {"triton": lambda x: vil_kernels.mlstm(**x, backend="triton"),
            "torch-chunkwise": lambda x: vil_kernels.mlstm(**x, backend="torch"),
            "sdpa-attention": lambda x: F.scaled_dot_product_attention(
                x["q"], x["k"], x["v"], is_causal=True)}


def inputs(shape, grad):
    B, NH, S, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    x = dict(q=mk(B, NH, S, D), k=mk(B, NH, S, D), v=mk(B, NH, S, D), i=mk(B, NH, S),
             f=mk(B, NH, S) + 3.0)
    return {k: t.requires_grad_(grad) for k, t in x.items()}


def call(fn, x, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x)
    fn(x).sum().backward()


def measure(fn, x, mode, n):
    for _ in range(3):
        call(fn, x, mode)
    torch.cuda.synchronize()
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(fn, x, mode)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        call(fn, x, mode)
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return sorted(walls)[n // 2] * 1e6, host * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", action="append", metavar="B,NH,S,D")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (host time is what a GPU waits on)")
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else SHAPES
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bfloat16 | "
          "microseconds a call (median wall, synchronized; mean host, enqueued)")
    print(f"{'path':<16} {'B,NH,S,D':<16} {'fwd wall':>9} {'fwd host':>9} "
          f"{'f+b wall':>9} {'f+b host':>9}")
    for shape in shapes:
        for name, fn in paths().items():
            row = []
            for mode in ("fwd", "fwd+bwd"):
                row += measure(fn, inputs(shape, mode != "fwd"), mode, args.iters)
            print(f"{name:<16} {','.join(map(str, shape)):<16} " +
                  " ".join(f"{v:>9.0f}" for v in row), flush=True)
    if args.profile:
        x = inputs(shapes[0], True)
        fn = paths()["triton"]
        call(fn, x, "fwd+bwd")
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            call(fn, x, "fwd+bwd")
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n# cProfile, Triton forward and backward at {shapes[0]}, {args.iters} calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
