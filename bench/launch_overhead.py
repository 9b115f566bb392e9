"""Host time of launching the package's Triton kernels, and the fast launch path checked, on any
machine: Triton's real JIT (binding, specialization, cache lookup, compilation for sm_90 with
ptxas) runs against a stand-in CUDA driver (bench/fake_driver.py) that records each launch
instead of running it.

    python bench/launch_overhead.py                # host time: Triton's launcher vs fast path
    python bench/launch_overhead.py --check        # the two paths hand the launcher the same
                                                   # grid, function and arguments (exit 1 if not)

Timing, with the fast path off and on: one launch of each mLSTM kernel, then an mLSTM forward,
and forward and backward, through the autograd op (where small shapes wait on the host on a
GPU; here the PyTorch ops around the kernels compute on the CPU, so keep the shapes tiny), and
ViL's fused ops. What is left out: the C launcher's own cuLaunchKernel
(the same in both paths, a few microseconds) and the kernels themselves. The first call
compiles every kernel for sm_90 (about ten seconds; cached on disk after).

--check runs every launch of: the mLSTM forward and backward (both directions, with and without
initial states, with a loss on the last states), and ViL's fused conv + SiLU, output norm +
gating and layer norm, forward and backward; each launch three times (Triton's path; the fast
path's first call, which goes through Triton and keeps its compiled kernel; the fast path from
that cache) after one untimed call through Triton's path (where a build spills, the spill
guard settles on the uncapped one there), and compares the recorded launches, tensors by
identity. It names the kernels the spill guard ran uncapped.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_overhead.py: unset TRITON_INTERPRET (it measures the compiled path)")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_driver import fake_cuda_driver  # noqa: E402

import vil_kernels._triton_runtime as rt  # noqa: E402
from vil_kernels.triton import chunk  # noqa: E402
from vil_kernels.triton.chunk import mlstm_triton  # noqa: E402

SHAPES = [(8, 4, 196, 96), (1, 4, 64, 16)]


def _leaf(*shape, dtype=torch.bfloat16, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def mlstm_inputs(B, NH, S, D, states=False):
    x = [_leaf(B, NH, S, D) for _ in range(3)] + [_leaf(B, NH, S) for _ in range(2)]
    if states:
        x += [_leaf(B, NH, D, D, dtype=torch.float32), _leaf(B, NH, D, dtype=torch.float32),
              _leaf(B, NH, 1, dtype=torch.float32)]
    return x


def mlstm_step(x, backward=True, reverse=False, last=False, chunk=None):
    """One mLSTM call through the autograd op (vil_kernels.mlstm minus its input checks, which
    refuse CPU tensors for the Triton backend); backward with a loss on h (and the last state)."""
    if not backward:
        with torch.no_grad():
            mlstm_triton(*x, reverse=reverse, chunk_size=chunk)
        return
    h, states = mlstm_triton(*x, reverse=reverse, return_last_states=last, chunk_size=chunk)
    loss = h.float().sum()
    if last:
        loss = loss + sum(s.sum() for s in states)
    loss.backward()
    for t in x:
        t.grad = None


def vil_steps():
    """ViL's fused ops around the cell, forward and backward, at ViL-T's head layout."""
    from vil import triton_conv, triton_gating, triton_norm
    from vil.layers import MultiHeadLayerNorm

    B, H, W, NH, DH = 2, 6, 5, 4, 16
    S, C = H * W, NH * DH
    t, wc, bc = _leaf(B, S, C), _leaf(C, 1, 3, 3), _leaf(C)
    h, a, z = _leaf(B, NH, S, DH), _leaf(B, S, C), _leaf(B, S, C)
    norm = MultiHeadLayerNorm(C, bias=True)
    skip = torch.ones(C, requires_grad=True)
    x, wn = _leaf(B, S, C), _leaf(C, dtype=torch.float32)

    def conv():
        triton_conv.conv_silu_triton(t, wc, bc, (H, W)).float().sum().backward()

    def gating():
        triton_gating.gated_outnorm_triton(h, norm, skip, a, z).float().sum().backward()

    def layer_norm():
        triton_norm.layer_norm_triton(x, wn, None, 1e-5).float().sum().backward()

    return {"conv": conv, "gating": gating, "layer_norm": layer_norm}


# ------------------------------------------------------------------------------------- check

def _launch_sites():
    from vil import triton_conv, triton_gating, triton_norm
    return [chunk, triton_conv, triton_gating, triton_norm]


def _same(a, b):
    """Two recorded launches are the same: grid, stream, function handle, packed metadata, and
    every argument (tensors: the same object; others: equal and of the same type)."""
    if a[:4] != b[:4] or len(a[4]) != len(b[4]):
        return False
    for x, y in zip(a[4], b[4]):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y:
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def check():
    """Every launch of the workloads through both paths; returns the list of mismatches."""
    problems, checked = [], {}
    with fake_cuda_driver() as drv:
        def launch_thrice(kernel, grid, args, **meta):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            rt.FAST_LAUNCH = False
            rt.launch(kernel, grid, args, **meta)   # (where its build spills, the spill
            start = len(drv.calls)                  # guard settles on the uncapped one here)
            rt.launch(kernel, grid, args, **meta)
            rt.FAST_LAUNCH = True
            rt.launch(kernel, grid, args, **meta)
            cached = rt._launch_key(kernel, args, meta) in rt._compiled
            rt.launch(kernel, grid, args, **meta)
            calls = drv.calls[start:]
            if len(calls) != 3:
                problems.append(f"{name}: {len(calls)} launches recorded, not 3")
            elif not (_same(calls[0], calls[1]) and _same(calls[0], calls[2])):
                problems.append(f"{name}: the fast path launched differently: "
                                f"{calls[0][:4]} / {calls[2][:4]}")
            if not cached:
                problems.append(f"{name}: not kept for the fast path (constexprs missing "
                                f"from the launch's meta?)")
            checked[name] = checked.get(name, 0) + 1

        sites = _launch_sites()
        saved = [(m, m.launch) for m in sites]
        fast = rt.FAST_LAUNCH
        try:
            for m in sites:
                m.launch = launch_thrice
            for reverse in (False, True):
                for states in (False, True):
                    mlstm_step(mlstm_inputs(2, 2, 40, 32, states), reverse=reverse,
                               last=states)
            # chunks of two tiles: the pair kernels and the matmul kernels' multi-tile loops,
            # the forward's scores in its outputs kernel (one V tile holds D = 32) and not
            from vil_kernels.triton import heuristics
            mlstm_step(mlstm_inputs(1, 1, 130, 32), chunk=128)
            scores, heuristics.SCORES_IN_OUTPUTS = heuristics.SCORES_IN_OUTPUTS, False
            try:
                mlstm_step(mlstm_inputs(1, 1, 130, 32), chunk=128)
            finally:
                heuristics.SCORES_IN_OUTPUTS = scores
            # the flash forms (off by default): one chunk of two tiles without state (the flash
            # kernels), and two chunks (the outputs kernel with every V column, the pair kernel)
            flash = heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD
            heuristics.FLASH_FORWARD = heuristics.FLASH_BACKWARD = True
            try:
                mlstm_step(mlstm_inputs(1, 1, 100, 32), chunk=128)
                mlstm_step(mlstm_inputs(1, 1, 130, 32), chunk=128)
            finally:
                heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD = flash
            heuristics.OVERRIDES.update({k: {"split": True} for k in heuristics.SCANS})
            try:                                 # the scans' split form (off in the table)
                mlstm_step(mlstm_inputs(2, 2, 40, 32, True), last=True)
            finally:
                heuristics.OVERRIDES.clear()
            for step in vil_steps().values():
                step()
            from vil import triton_conv
            rows = triton_conv.CONFIG["RB"]
            triton_conv.CONFIG["RB"] = 2                # the conv's rolling form
            try:
                vil_steps()["conv"]()
            finally:
                triton_conv.CONFIG["RB"] = rows
        finally:
            for m, fn in saved:
                m.launch = fn
            rt.FAST_LAUNCH = fast
    return problems, checked


# ------------------------------------------------------------------------------------ timing

def _best_us(fn, reps=15, inner=10):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e6


def _paths_us(fn, reps, inner):
    """{"triton": us, "fast": us}: best of reps for each path, the two interleaved rep by rep
    (a shared machine's slow spells then hit both alike)."""
    best = {"triton": float("inf"), "fast": float("inf")}
    for path in best:
        rt.FAST_LAUNCH = path == "fast"
        fn()
    for _ in range(reps):
        for path in best:
            rt.FAST_LAUNCH = path == "fast"
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[path] = min(best[path], (time.perf_counter() - t0) / inner * 1e6)
    return best


def _captured_launches(shape):
    """(kernel, grid, args, meta) of every launch of an mLSTM forward and backward."""
    seen = []
    plain = chunk.launch
    chunk.launch = lambda k, g, a, **m: (seen.append((k, g, a, m)), plain(k, g, a, **m))
    try:
        mlstm_step(mlstm_inputs(*shape))
    finally:
        chunk.launch = plain
    return seen


def measure(shapes, reps):
    """Host microseconds a call, Triton's launcher against the fast path (best of reps): each
    mLSTM kernel's launch alone (the first shape's), then whole calls."""
    rows = []
    with fake_cuda_driver() as drv:
        drv.record = False
        fast = rt.FAST_LAUNCH
        try:
            launches = _captured_launches(shapes[0])
            drv.zero_int_buffers = False
            for kernel, grid, args, meta in launches:
                us = _paths_us(lambda: rt.launch(kernel, grid, args, **meta), reps, 100)
                rows.append({"workload": f"launch {kernel.fn.__name__}",
                             "shape": list(shapes[0]), "launches": 1,
                             "triton_us": us["triton"], "fast_us": us["fast"]})
            drv.zero_int_buffers = True
            for shape in shapes:
                x = mlstm_inputs(*shape)
                for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                    us = _paths_us(lambda: mlstm_step(x, backward), reps, 10)
                    rows.append({"workload": f"mlstm {mode}", "shape": list(shape),
                                 "launches": 3 if mode == "fwd" else 8,
                                 "triton_us": us["triton"], "fast_us": us["fast"]})
            for name, step in vil_steps().items():
                us = _paths_us(step, reps, 10)
                rows.append({"workload": f"vil {name} fwd+bwd", "shape": None,
                             "launches": 3 if name == "conv" else 2,
                             "triton_us": us["triton"], "fast_us": us["fast"]})
        finally:
            rt.FAST_LAUNCH = fast
    for r in rows:
        r["saved_us_per_launch"] = (r["triton_us"] - r["fast_us"]) / r["launches"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--shapes", action="append", metavar="B,NH,S,D")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--results-file")
    args = p.parse_args(argv)
    if args.check:
        problems, checked = check()
        print("launches checked:", ", ".join(f"{k} x{v}" for k, v in sorted(checked.items())))
        lifted = sorted(getattr(k, "__name__", None) or k.fn.__name__
                        for k, runs in rt._guarded.items()
                        if any(m.get("maxnreg") == rt.UNCAPPED for m in runs.values()))
        print("uncapped by the spill guard (built for sm_90 by this triton):",
              ", ".join(lifted) or "none")
        for line in problems:
            print("MISMATCH", line)
        return 1 if problems or not checked else 0
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else SHAPES
    rows = measure(shapes, args.reps)
    import platform
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "triton": rt._triton_version(),
            "threads": torch.get_num_threads(), "note": "host time only, fake CUDA driver"}
    print(f"# host microseconds a call, best of {args.reps}; {meta}")
    print(f"{'workload':<34} {'shape':<16} {'launches':>8} {'triton':>9} {'fast':>9} "
          f"{'saved/launch':>12}")
    for r in rows:
        shape = ",".join(map(str, r["shape"])) if r["shape"] else "-"
        print(f"{r['workload']:<34} {shape:<16} {r['launches']:>8} {r['triton_us']:>9.1f} "
              f"{r['fast_us']:>9.1f} {r['saved_us_per_launch']:>12.1f}")
    if args.results_file:
        Path(args.results_file).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
