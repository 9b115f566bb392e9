"""Diagnosis of test_flash_forward_bfloat16[96] on an H200 (session 19): the outputs kernel
with two V tiles of 64 + 32 at 4 warps gave wrong columns 64-95, or an out-of-range shared
address (compute-sanitizer), where 8 warps or one tile were right. `python
bench/diag/fwd96.py N` runs config N alone (a fault poisons the CUDA context); no argument
prints the number of configs. Results: bench/results/gpu-diag-nvidia-h200-2026-11-27-s19.log.
The outputs kernel no longer takes two V tiles at 4 warps (heuristics.launch_params), so the
64 + 32 configs now run at 8 warps."""
import os
import sys
from pathlib import Path

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from helpers import make_inputs, run  # noqa: E402
import vil_kernels  # noqa: E402
from vil_kernels.triton import heuristics as H, chunk  # noqa: E402

TRACE = []
_run = chunk._run


SHOWN = ("BT", "NT", "BK", "BV", "BV2", "BK2", "BS", "num_warps", "num_stages", "SCORES",
         "HAS_STATE", "QN_MMA")


def traced(kernel, name, grid, args, **meta):
    TRACE.append((name, {k: v for k, v in meta.items() if k in SHOWN}))
    _run(kernel, name, grid, args, **meta)
    if DEV == "cuda":
        torch.cuda.synchronize()


chunk._run = traced


def err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def report(tag, D, L, reverse, init, S=150, over=None, flash=True, scores=True, bf16=False):
    TRACE.clear()
    H.FLASH_FORWARD = flash
    H.SCORES_IN_OUTPUTS = scores
    H.OVERRIDES.clear()
    H._cache.clear()
    if over:
        H.OVERRIDES.update(over)
    x = make_inputs(NH=1, S=S, DK=D, DV=D, init=True, seed=D)
    x = {n: t for n, t in x.items() if init or "initial" not in n}
    xs = {n: t.to(DEV, torch.bfloat16 if n in "qkv" or bf16 else torch.float32)
          for n, t in x.items()}
    head = f"{tag:32s} D={D} L={L} rev={reverse} init={init} bf16={bf16}"
    try:
        h = vil_kernels.mlstm(**xs, reverse=reverse, chunk_size=L, backend="triton").double()
    except Exception as e:
        print(f"{head}: ERROR {type(e).__name__} {str(e)[:80]!r} launches {TRACE}", flush=True)
        return
    ref = vil_kernels.mlstm(**{n: t.double() for n, t in xs.items()}, reverse=reverse,
                            backend="parallel")
    col = [f"{err(h[..., a:b], ref[..., a:b]):.1e}" for a, b in ((0, 64), (64, D))]
    rows = [f"{err(h[..., a:a + 64, :], ref[..., a:a + 64, :]):.1e}" for a in range(0, S, 64)]
    print(f"{head}: h {err(h, ref):.2e} cols {col} rows {rows} {[n for n, _ in TRACE]}",
          flush=True)
    if err(h, ref) > 0.05:
        print("   launches", TRACE)


def grads(D, fw, bw):
    H.FLASH_FORWARD, H.FLASH_BACKWARD = fw, bw
    x = make_inputs(NH=2, S=150, DK=D, DV=D, seed=D)
    xc = {n: t.to(torch.bfloat16).double().to(DEV) for n, t in x.items()}
    got = run(xc, "triton", reverse=True, chunk_size=1024, compute=torch.bfloat16,
              last_states=False)
    ref = run(xc, "parallel", reverse=True, last_states=False)
    errs = " ".join(f"{n} {err(got[n], ref[n]):.1e}" for n in ref)
    print(f"grads fwd={fw} bwd={bw} D={D}: {errs}", flush=True)


CONFIGS = [lambda D=D: report("flash fwd_out", D, 128, True, True) for D in (96, 192, 384, 64)] + [
    lambda: report("flash fwd_out", 96, 128, True, True, bf16=True),
    lambda: report("flash, forward", 96, 128, False, True),
    lambda: report("flash, no init", 96, 128, True, False),
    lambda: report("flash off", 96, 128, True, True, flash=False),
    lambda: report("flash off", 96, 128, True, True, flash=False, bf16=True),
    lambda: report("flash, stages 1", 96, 128, True, True, over={"fwd_out": {"num_stages": 1}}),
    lambda: report("flash, 8 warps", 96, 128, True, True, over={"fwd_out": {"num_warps": 8}}),
    lambda: report("flash, BV 64+64", 96, 128, True, True, over={"fwd_out": {"BV": 64, "BV2": 64}}),
    lambda: report("flash, BV 128+0", 96, 128, True, True, over={"fwd_out": {"BV": 128, "BV2": 0}}),
    lambda: report("flash, BK 64", 96, 128, True, True, over={"fwd_out": {"BK": 64}}),
    lambda: report("flash, scores off", 96, 128, True, True, scores=False),
    lambda: report("flash, S=256", 96, 128, True, True, S=256),
    lambda: report("off, BV 64+32", 96, 128, True, True, flash=False,
                   over={"fwd_out": {"BV": 64, "BV2": 32}}),
] + [lambda D=D, r=r: report("flash kernel", D, 1024, r, False)
     for D in (96, 192, 384) for r in (True, False)] + [
    lambda D=D, fw=fw: grads(D, fw, True) for D in (96, 192, 384) for fw in (False, True)]

if __name__ == "__main__":
    if len(sys.argv) == 1:
        print(len(CONFIGS))
    else:
        for a in sys.argv[1:]:
            CONFIGS[int(a)]()
