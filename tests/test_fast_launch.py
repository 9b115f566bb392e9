"""The fast launch path (vil_kernels._triton_runtime.launch, on by default) hands Triton's launcher
exactly what Triton's own path does, for every kernel of the package.

Runs bench/launch_overhead.py --check in a subprocess: Triton's real JIT compiles the kernels for
sm_90 and launches them against a stand-in CUDA driver that records each launch (this process
may have TRITON_INTERPRET=1 set by test_triton.py, under which the kernels are interpreted, so
the check needs a fresh interpreter without it).
"""

from pathlib import Path

from helpers import run_built

BENCH = Path(__file__).resolve().parents[1] / "bench"

SABOTAGE = """
from triton.compiler.compiler import CompiledKernel
_getitem = CompiledKernel.__getitem__
def _bad(self, grid):                       # the cached path drops its last argument
    run = _getitem(self, grid)
    return lambda *a, **k: run(*a[:-1], None, **k)
CompiledKernel.__getitem__ = _bad
"""


def _check(prelude=""):
    code = prelude + "\nimport sys, launch_overhead\nsys.exit(launch_overhead.main(['--check']))\n"
    return run_built(["-c", code], cwd=BENCH)


def test_fast_launch_matches_triton_launches():
    out = _check()
    assert out.returncode == 0, out.stdout + out.stderr
    checked = out.stdout.split("launches checked:")[1].split("\n")[0]
    for kernel in ("mlstm_fwd_gates_kernel", "mlstm_fwd_state_kernel", "mlstm_fwd_out_kernel",
                   "mlstm_bwd_prologue_kernel", "mlstm_bwd_state_kernel", "mlstm_bwd_dqk_kernel",
                   "mlstm_bwd_dv_kernel", "mlstm_bwd_gates_kernel", "mlstm_chunk_local_kernel",
                   "mlstm_chunk_chain_kernel", "mlstm_fwd_pair_kernel",
                   "mlstm_bwd_pair_kernel", "mlstm_fwd_flash_kernel", "mlstm_bwd_flash_kernel",
                   "_conv_silu_kernel", "_conv_rows_kernel",
                   "_conv_dw_kernel",
                   "_gated_outnorm_kernel", "_gated_outnorm_bwd_kernel", "_layer_norm_kernel",
                   "_layer_norm_bwd_kernel"):
        assert kernel + " x" in checked, kernel
    assert "MISMATCH" not in out.stdout


def test_fast_launch_check_catches_a_wrong_argument():
    out = _check(SABOTAGE)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MISMATCH" in out.stdout and "the fast path launched differently" in out.stdout
