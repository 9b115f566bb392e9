"""vil_kernels._triton_runtime: the launcher's options and the interpreter fixes it applies.

The interpreter fixes matter on newer Triton releases (3.8's argmax over a row of NaNs raised,
3.9's loads and stores refused the int32 masks its comparisons produce); here they run on
whatever triton is installed, under the interpreter (conftest sets TRITON_INTERPRET on CPU).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from vil_kernels import _triton_runtime  # noqa: E402
from vil_kernels._triton_runtime import launch  # noqa: E402

from helpers import run_built  # noqa: E402

interpreted = pytest.mark.skipif(not _triton_runtime.interpreting(),
                                 reason="an interpreter test (a CUDA machine runs the kernels)")


@triton.jit
def _masked_copy_kernel(x, y, N, BN: tl.constexpr):
    """y[o] = x[o] for o < N, written by the programs whose second index is 0 only: a block
    mask and a scalar condition, as the state scans write their n blocks."""
    i_v = tl.program_id(1)
    o = tl.arange(0, BN)
    m = (o < N) & (i_v == 0)
    b_x = tl.load(x + o, mask=m, other=-1.)
    tl.store(y + o, b_x, mask=m)


@triton.jit
def _row_max_kernel(x, v, j, BM: tl.constexpr, BN: tl.constexpr):
    o_m, o_n = tl.arange(0, BM), tl.arange(0, BN)
    b_x = tl.load(x + o_m[:, None] * BN + o_n[None, :])
    b_v, b_j = tl.max(b_x, axis=1, return_indices=True)
    tl.store(v + o_m, b_v)
    tl.store(j + o_m, b_j)


@interpreted
def test_mask_of_a_block_and_a_scalar_condition():
    x = torch.arange(16, dtype=torch.float32)
    y = torch.full((16,), 7.0)
    launch(_masked_copy_kernel, (1, 2), (x, y, 10), BN=16)
    assert torch.equal(y[:10], x[:10]) and torch.equal(y[10:], torch.full((6,), 7.0))


@interpreted
def test_argmax_over_a_row_of_nans_gives_nan():
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0], [math.nan] * 4])
    v, j = torch.empty(2), torch.empty(2, dtype=torch.int32)
    launch(_row_max_kernel, (1,), (x, v, j), BM=2, BN=4)
    assert v[0] == 5.0 and j[0] == 1                  # the earliest index on a tie
    assert torch.isnan(v[1]) and 0 <= j[1] < 4


def test_every_launch_asks_for_fp_fusion(monkeypatch):
    monkeypatch.setattr(_triton_runtime, "INTERPRETED", True)     # the plain call, on a GPU too
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(meta)

    launch(Kernel(), (1,), (), BN=16)
    launch(Kernel(), (1,), (), BN=16, enable_fp_fusion=False)
    assert seen == [dict(BN=16, enable_fp_fusion=True), dict(BN=16, enable_fp_fusion=False)]


# The spill guard, through Triton's real JIT and ptxas against bench/fake_driver's stand-in
# CUDA driver (which reads a build's registers and spills from its cubin). In a fresh
# interpreter: this one may have TRITON_INTERPRET set, and the fast path is fixed at import.
SPILL_GUARD = """
import torch, triton, triton.language as tl
from fake_driver import fake_cuda_driver
from vil_kernels import _triton_runtime as rt

@triton.jit
def normalize_rows_kernel(x, y, BM: tl.constexpr, BN: tl.constexpr):
    o = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    b_x = tl.load(x + o)                                  # [BM, BN]: 128 values a thread
    tl.store(y + o, b_x / tl.sum(b_x * b_x, axis=1)[:, None])

x = torch.randn(64, 256)
y = torch.empty_like(x)
with fake_cuda_driver() as drv:
    for cap in (32, 32, 32, 255):
        rt.launch(normalize_rows_kernel, (1,), (x, y), BM=64, BN=256, num_warps=4, maxnreg=cap)
    for _ in range(2):                                    # 32 values a thread: fits
        rt.launch(normalize_rows_kernel, (1,), (x, y), BM=16, BN=256, num_warps=4, maxnreg=128)
    kernels = [k for cache in normalize_rows_kernel.device_caches.values() for k in cache[0].values()]
    usage = {k.function: (k.metadata.maxnreg, k.n_regs, k.n_spills) for k in kernels}
    print("launched", [usage[c[2]] for c in drv.calls])
    print("guarded", sum(len(runs) for runs in rt._guarded.values()))
"""


@pytest.mark.parametrize("fast", ["1", "0"])
def test_spill_guard_lifts_a_cap_that_spills(fast, tmp_path):
    script = tmp_path / "spill_guard.py"               # (Triton reads a kernel's source file)
    script.write_text(SPILL_GUARD)
    out = run_built([str(script)], env={"VIL_KERNELS_FAST_LAUNCH": fast}, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    launched = eval(out.stdout.split("launched ")[1].split("\n")[0])
    (cap, regs, spills), lifted = launched[0], launched[1]
    assert cap == 32 and regs <= 32 and spills > 0           # the capped build spilled, once
    assert lifted[0] == 255 and lifted[1] > 32 and lifted[2] == 0
    assert launched[1:4] == [lifted] * 3     # then the uncapped one, also asked for directly
    assert launched[4] == launched[5] and launched[4][0] == 128 and launched[4][2] == 0
    assert "guarded 1" in out.stdout
