"""float32 on CUDA, test_gates.test_float32_resets_within_the_bound's inputs (four resets in
80 positions): each backend's error against float64, Triton in chunks of 16 to 128 and the
float32 parallel form (session 19: bench/results/gpu-diag-nvidia-h200-2026-11-27-s19.log).
`python bench/diag/gates32.py`."""
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import test_gates as T  # noqa: E402
from helpers import make_inputs, rel_err  # noqa: E402
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = make_inputs(NH=2, S=T.S, DK=16, DV=24, seed=8, i_range=(-10, 10), f_range=(-5, 8))
x["f"][..., [3, 30, 31, 50]] = -math.inf
w_h, w_last = T._weights(x)
ref = T._grads(x, "parallel", None, False, w_h, w_last, dev="cpu", dt=torch.float64)
for be, ch in (("triton", 16), ("triton", 32), ("triton", 64), ("triton", 128), ("parallel", None),
               ("torch", 128)):
    got = T._grads(x, be, ch, False, w_h, w_last, dev=dev, dt=torch.float32)
    print(be, ch, {n: f"{rel_err(got[n], ref[n]):.1e}" for n in ref}, flush=True)
