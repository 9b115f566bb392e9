"""bench/tune.py, the GPU launch-parameter sweep, dry-run under Triton's interpreter on tiny
shapes: it compiles in worker processes, checks the table against the float64 reference, times
every kernel, sweeps one kernel's candidates with their outputs checked, and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import tune  # noqa: E402
from vil_kernels.triton import heuristics  # noqa: E402


def test_candidates_vary_one_kernel_and_never_repeat_the_table():
    for kernel in tune.FWD + tune.BWD:
        table = heuristics.launch_params(kernel, 384, 384, 64, torch.bfloat16, 90)
        cands = tune.candidates(kernel, 384, 64)
        assert table not in cands and len(cands) == len({tuple(sorted(c.items())) for c in cands})
        assert all(c.keys() == table.keys() for c in cands)
    assert any(c["maxnreg"] == 128 for c in tune.candidates("fwd_state", 384, 64))


def test_dry_run_on_the_interpreter(tmp_path):
    out = tmp_path / "tune.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune.py"), "--dims", "16", "--S", "20", "--B", "1",
         "--NH", "1", "--reps", "1", "--jobs", "1", "--kernels", "bwd_dv",
         "--results-file", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["errors"]
    assert all(err < 5e-2 for d in res["checks"]["16"].values() for err in d.values())
    kernels = {"fwd_gates", "fwd_state", "fwd_out", "bwd_prologue", "bwd_state", "bwd_dqk",
               "bwd_dv"}
    assert [b["BT"] for b in res["baselines"]] == [32, 64, 128]
    assert all(set(b["ms"]) == kernels for b in res["baselines"])
    (sweep,) = res["sweeps"]
    assert sweep["kernel"] == "bwd_dv"
    assert len(sweep["rows"]) == len(tune.candidates("bwd_dv", 16, 64))
    assert all(row["ok"] for row in sweep["rows"])          # every tile choice is the same function
    (full,) = res["full"]
    assert full["table_ms"] > 0 and full["tuned_ms"] > 0
