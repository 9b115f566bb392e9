"""bench/tune.py, the GPU launch-parameter sweep, dry-run under Triton's interpreter on tiny
shapes: it compiles in worker processes, checks the table against the float64 reference, times
every kernel, sweeps one kernel's candidates with their outputs checked, and writes its JSON
and a launch table; and the dispatcher's use of such a table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import tune  # noqa: E402
from vil_kernels.triton import heuristics  # noqa: E402


def test_candidates_vary_one_kernel_and_never_repeat_the_table():
    for kernel in tune.FWD + tune.BWD:
        table = heuristics.launch_params(kernel, 384, 384, 64, torch.bfloat16, 90)
        cands = tune.candidates(kernel, 384, 64, arch=90)
        assert table not in cands and len(cands) == len({tuple(sorted(c.items())) for c in cands})
        assert all(c.keys() == table.keys() for c in cands)
    scans = tune.candidates("fwd_state", 384, 64, arch=90)
    assert {c["maxnreg"] for c in scans} == {128, 168, 255}
    assert {c["num_warps"] for c in scans} == {4}                # 8 lost everywhere on Hopper
    assert {c["num_warps"] for c in tune.candidates("fwd_state", 384, 64, arch=80)} == {4, 8}
    assert 168 in {c["maxnreg"] for c in tune.candidates("bwd_dqk", 96, 64, arch=90)}
    # wide head-dim tiles also at 8 warps on Hopper (4-warp BK=128 needs 252 registers in the
    # dq/dk kernel at D=384); the other tiles and the pair kernels at 4
    dqk = tune.candidates("bwd_dqk", 384, 1024, arch=90, state=False)
    assert {c["BK"] for c in dqk if c["num_warps"] == 8} == {128, 256}
    for k in ("fwd_out", "bwd_dv"):
        assert {c["BV"] for c in tune.candidates(k, 384, 1024, arch=90)
                if c["num_warps"] == 8} == {256}
    # the pair kernels: one key tile a program at 4 warps, two and four at 8
    for k in heuristics.PAIR_KERNELS:
        cands = tune.candidates(k, 384, 1024, arch=90)
        assert {(c["KT"], c["num_warps"]) for c in cands} == {(1, 4), (2, 8), (4, 8)}
        assert heuristics.launch_params(k, 384, 384, 1024, torch.bfloat16, 90)["KT"] == 1


def test_scan_register_caps():
    """The state scans on Hopper: capped so that 3 programs (168 registers) or, for tiles of at
    most 32 x 32 of 16-bit inputs, 4 (128) share an SM, except where that spills (the
    state-gradient scan at 64 x 128 tiles); compile_check proves the table spill-free. The
    outputs and dv kernels are not capped (they spill at 168); the backward pair and dq/dk
    kernels are, below."""
    lp = heuristics.launch_params
    for kernel in ("fwd_state", "bwd_state"):
        assert lp(kernel, 384, 384, 64, torch.bfloat16, 90)["maxnreg"] == (
            168 if kernel == "fwd_state" else heuristics.MAXNREG)             # 64 x 128 tiles
        assert lp(kernel, 96, 96, 64, torch.bfloat16, 90)["maxnreg"] == 168   # 32 x 128 tiles
        assert lp(kernel, 96, 32, 64, torch.bfloat16, 90)["maxnreg"] == 128   # 32 x 32 tiles
        assert lp(kernel, 96, 96, 32, torch.float32, 90)["maxnreg"] == 168
        assert lp(kernel, 384, 384, 64, torch.bfloat16, 80)["maxnreg"] == heuristics.MAXNREG
    assert lp("bwd_dqk", 384, 384, 64, torch.bfloat16, 90)["maxnreg"] == heuristics.MAXNREG
    for kernel in ("fwd_out", "bwd_dv"):
        assert lp(kernel, 384, 384, 64, torch.bfloat16, 90)["maxnreg"] == heuristics.MAXNREG


def test_backward_register_caps():
    """The backward pair kernel at 128 registers, the dq/dk kernel at 168, or 128 in chunks of
    several tiles without a state (what compile_check builds without a spill), uncapped where
    168 spills (one tile a chunk, K and V tiles of 64); by HAS_STATE where the caller knows
    it, else the cap that fits both; Hopper with 16-bit inputs only."""
    lp, bf16 = heuristics.launch_params, torch.bfloat16
    assert lp("bwd_pair", 384, 384, 1024, bf16, 90)["maxnreg"] == 128
    assert lp("bwd_dqk", 384, 384, 1024, bf16, 90, False)["maxnreg"] == 128   # ViL-B's cells
    assert lp("bwd_dqk", 384, 384, 1024, bf16, 90, True)["maxnreg"] == 168
    assert lp("bwd_dqk", 384, 384, 1024, bf16, 90)["maxnreg"] == 168
    assert lp("bwd_dqk", 96, 96, 64, bf16, 90, True)["maxnreg"] == 168        # ViL-T's: 32 x 32
    assert lp("bwd_dqk", 192, 192, 64, bf16, 90, True)["maxnreg"] == heuristics.MAXNREG
    assert lp("bwd_dqk", 384, 384, 1024, torch.float16, 90, False)["maxnreg"] == 128
    for dtype, arch in ((torch.float32, 90), (bf16, 80)):
        for kernel in ("bwd_pair", "bwd_dqk"):
            assert lp(kernel, 384, 384, 1024, dtype, arch, False)["maxnreg"] == heuristics.MAXNREG
    from vil_kernels import compile_check
    caps = {(v.flag, v.dq): v.maxnreg for v in compile_check.variants(
        dims=[384], chunks=[1024], dtypes=["bfloat16"], flash="off") if v.kernel == "bwd_dqk"
        and v.arch == 90}
    assert caps == {(False, True): 128, (True, True): 168}


@pytest.mark.parametrize("chunk, carried", [(128, False), (64, True)])
def test_launches_say_whether_a_state_is_carried(monkeypatch, chunk, carried):
    """The dq/dk kernel's cap depends on HAS_STATE: each launch asks launch_params with the
    flag it runs (one chunk of two tiles and no state: False; two chunks: True)."""
    import vil_kernels
    from vil_kernels.triton import chunk as tchunk
    seen = []
    real = heuristics.launch_params

    def spy(kernel, *a, **kw):
        p = real(kernel, *a, **kw)
        seen.append((kernel, a[5] if len(a) > 5 else kw.get("state"), p["maxnreg"]))
        return p

    monkeypatch.setattr(tchunk.heuristics, "launch_params", spy)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 1, 100, 16, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    gates = [torch.randn(1, 1, 100, generator=g).requires_grad_() for _ in range(2)]
    vil_kernels.mlstm(*x, *gates, chunk_size=chunk, backend="triton").float().sum().backward()
    dqk = {(state, cap) for kernel, state, cap in seen if kernel == "bwd_dqk" and state is not None}
    # (the interpreter runs Hopper's table)
    assert dqk == {(carried, 168 if carried else 128)}
    assert all(x_.grad is not None and x_.grad.isfinite().all() for x_ in x)


def test_multi_tile_chunks_parameters():
    """Chunks of several tiles: tiles of 64 (float32: 16), keyed on the chunk; the same
    parameters as one tile except where compile_check found spills (the scans uncapped),
    and the two pair kernels, only launched there."""
    lp, bf16 = heuristics.launch_params, torch.bfloat16
    assert [heuristics.tile_len(L, bf16) for L in (16, 64, 128, 1024)] == [16, 64, 64, 64]
    assert [heuristics.tile_len(L, torch.float32) for L in (32, 64)] == [32, 16]
    assert heuristics.chunk_len(784, 192, 192, bf16, 90) == 64                 # the default
    assert heuristics.chunk_len(784, 384, 384, bf16, 90) == 1024    # (the one-chunk rule)
    assert heuristics.chunk_len(784, 384, 384, bf16, 90, 4096) == 1024
    assert heuristics.chunk_len(100, 384, 384, bf16, 90, 1024) == 128          # one chunk
    for kernel in heuristics.SCANS:
        assert lp(kernel, 384, 384, 128, bf16, 90)["maxnreg"] == heuristics.MAXNREG
    # dq/dk: 4 warps at any chunk on Hopper; K tiles of 32 against a spill at one tile a chunk
    assert lp("bwd_dqk", 384, 384, 128, bf16, 90)["num_warps"] == 4
    assert lp("bwd_dqk", 384, 96, 64, bf16, 90)["BK"] == 32      # (64 x 32 spilled 264 bytes)
    assert lp("bwd_dqk", 384, 96, 128, bf16, 90)["BK"] == 64
    assert lp("bwd_dqk", 384, 384, 256, bf16, 80)["BK"] == 64
    for kernel in ("fwd_out", "bwd_dv"):
        assert lp(kernel, 384, 384, 1024, bf16, 90) == lp(kernel, 384, 384, 64, bf16, 90)
    # the pair kernels: head-dim tiles of 64 (96: 32), 4 warps, two stages on Hopper
    for kernel in heuristics.PAIR_KERNELS:
        assert lp(kernel, 384, 96, 256, bf16, 90) == dict(
            BK=64, BV=32, num_warps=4, num_stages=2, KT=1,
            maxnreg=128 if kernel == "bwd_pair" else heuristics.MAXNREG)
        assert tune.candidates(kernel, 384, 256)
    # a measured table's entry for chunks of 128 is not one for chunks of 64
    assert heuristics.table_key("fwd_out", 384, 384, 128, bf16, 90) == \
        "fwd_out/384/384/128/bfloat16/sm90"


def test_dry_run_on_the_interpreter(tmp_path):
    out = tmp_path / "tune.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tune.py"), "--dims", "16", "--S", "40", "--B", "1",
         "--NH", "1", "--reps", "1", "--jobs", "1", "--kernels", "bwd_dv", "fwd_state",
         "--chunks", "32", "--results-file", str(out),
         "--write-table", str(tmp_path / "table.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["errors"]
    assert all(err < 5e-2 for d in res["checks"]["16"].values() for err in d.values()), \
        res["checks"]
    kernels = {"fwd_gates", "fwd_out", "bwd_prologue", "bwd_dqk", "bwd_dv", "bwd_gates"}
    scans, pairs = set(heuristics.SCANS), set(heuristics.PAIR_KERNELS)
    # chunks of one tile, and of 2, 4 and 16 tiles of 64; as ViL runs the op (no initial state,
    # the last state unused) only the chunks of 32 (two in S = 40) run the state scans, and
    # chunks of several tiles the backward's pair kernel (the forward's scores come from its
    # outputs kernel: one V tile holds D = 16, heuristics.scores_in_outputs)
    assert [b["chunk"] for b in res["baselines"]] == [32, 64, 128, 256, 1024]
    assert [b["BT"] for b in res["baselines"]] == [32, 64, 64, 64, 64]
    assert pairs == {"fwd_pair", "bwd_pair"}
    assert [set(b["ms"]) for b in res["baselines"]] == [
        kernels | scans, kernels, kernels | {"bwd_pair"}, kernels | {"bwd_pair"},
        kernels | {"bwd_pair"}]
    sweep, scan = res["sweeps"]
    assert sweep["kernel"] == "bwd_dv" and scan["kernel"] == "fwd_state"
    assert len(sweep["rows"]) == len(tune.candidates("bwd_dv", 16, 32))
    # every tile choice, and the scan's split form (two launches timed as one), is the same
    # function
    assert all(row["ok"] for row in sweep["rows"] + scan["rows"]), [
        row for row in sweep["rows"] + scan["rows"] if not row.get("ok")]
    assert sum(bool(row.get("split")) for row in scan["rows"]) == 7      # one per tile shape
    (full,) = res["full"]
    assert full["table_ms"] > 0 and full["tuned_ms"] > 0
    # the winners, if any beat the table, form a launch table the dispatcher reads
    entries = heuristics.read_table(str(tmp_path / "table.json"))
    assert all(k.split("/", 1)[1].startswith("16/16/32/bfloat16/sm") for k in entries), entries


def test_launch_table_file(tmp_path, monkeypatch):
    """$VIL_KERNELS_LAUNCH_TABLE names a measured table used over the built-in one for the
    entries it has; a malformed file is a ValueError naming the file and the entry."""
    key = heuristics.table_key("fwd_out", 96, 96, 64, torch.bfloat16, 90)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": {key: {"BV": 32, "num_warps": 8}}}))
    monkeypatch.setenv(heuristics.TABLE_ENV, str(path))
    heuristics.tuned_table(reload=True)
    try:
        p = heuristics.launch_params("fwd_out", 96, 96, 64, torch.bfloat16, 90)
        assert (p["BV"], p["num_warps"], p["num_stages"]) == (32, 8, 2)   # stages: the table's
        other = heuristics.launch_params("fwd_out", 96, 96, 64, torch.bfloat16, 80)
        assert other == heuristics._table_params("fwd_out", 96, 96, 64, 1, torch.bfloat16, 80)
        scan = heuristics.table_key("bwd_state", 96, 96, 64, torch.bfloat16, 90)
        path.write_text(json.dumps({"entries": {scan: {"split": True}}}))
        heuristics.tuned_table(reload=True)
        assert heuristics.launch_params("bwd_state", 96, 96, 64, torch.bfloat16, 90)["split"]
        pair = heuristics.table_key("bwd_pair", 96, 96, 256, torch.bfloat16, 90)
        path.write_text(json.dumps({"entries": {pair: {"KT": 4, "num_warps": 8}}}))
        heuristics.tuned_table(reload=True)
        assert heuristics.launch_params("bwd_pair", 96, 96, 256, torch.bfloat16, 90)["KT"] == 4
        # (in tiles of 128 one key tile a program, whatever the table: two spill)
        monkeypatch.setattr(heuristics, "TILE", 128)
        assert heuristics.launch_params("bwd_pair", 96, 96, 256, torch.bfloat16, 90)["KT"] == 1
        monkeypatch.setattr(heuristics, "TILE", None)
        for bad in ({"fwd_out/96": {}}, {key: {"BV": 48}}, {key: {"warps": 4}},
                    {key: {"split": True}}, {scan: {"split": 1}}, {key: {"KT": 2}},
                    {pair: {"KT": 3}}):
            path.write_text(json.dumps({"entries": bad}))
            with pytest.raises(ValueError, match="t.json"):
                heuristics.tuned_table(reload=True)
        path.write_text("not json")
        with pytest.raises(ValueError, match="not a launch table"):
            heuristics.tuned_table(reload=True)
    finally:
        monkeypatch.delenv(heuristics.TABLE_ENV)
        heuristics.tuned_table(reload=True)


def test_one_chunk_rule(monkeypatch):
    """ONE_CHUNK_UP_TO and ONE_CHUNK_HEAD_DIM (timed on an H200 at S=784): 16-bit sequences up
    to 1024 positions at head dims of 384 or more run as one chunk by default; smaller head
    dims, longer sequences, float32 and requested chunks keep their chunk."""
    bf16 = torch.bfloat16
    assert (heuristics.ONE_CHUNK_UP_TO, heuristics.ONE_CHUNK_HEAD_DIM) == (1024, 384)
    assert heuristics.chunk_len(784, 384, 384, bf16, 90) == 1024
    assert heuristics.chunk_len(196, 96, 384, torch.float16, 90) == 256
    assert heuristics.chunk_len(784, 192, 192, bf16, 90) == 64
    assert heuristics.chunk_len(196, 96, 96, torch.float16, 90) == 64
    monkeypatch.setattr(heuristics, "ONE_CHUNK_HEAD_DIM", 96)
    assert heuristics.chunk_len(196, 96, 96, torch.float16, 90) == 256
    assert heuristics.chunk_len(1025, 384, 384, bf16, 90) == 64
    assert heuristics.chunk_len(784, 384, 384, torch.float32, 90) == 32
    assert heuristics.chunk_len(784, 384, 384, bf16, 90, 128) == 128
    monkeypatch.setattr(heuristics, "ONE_CHUNK_UP_TO", 4096)                 # capped
    assert heuristics.chunk_len(3136, 96, 96, bf16, 90) == 64


def test_tile_sweep_writes_its_tile(tmp_path, monkeypatch):
    """tune.py --tile 128: 8-warp candidates where the tile applies, and the launch table it
    writes names the tile beside the kernels' entries swept in it (not for chunks of one such
    tile, which keep theirs)."""
    monkeypatch.setattr(heuristics, "TILE", 128)
    assert {c["num_warps"] for c in tune.candidates("fwd_pair", 384, 1024, arch=90)} == {8}
    # (chunks of one tile keep 4 warps, but for the wide V tiles of 256)
    assert {(c["num_warps"], c["BV"] == 256) for c in tune.candidates(
        "fwd_out", 384, 64, arch=90)} == {(4, False), (8, True)}
    monkeypatch.setattr(tune, "device_arch", lambda: 90)
    best = dict(BK=64, BV=64, num_warps=8, num_stages=2, maxnreg=255, ms=0.5)
    sweeps = [dict(D=384, chunk=L, kernel="fwd_out", table={k: best[k] for k in best if k != "ms"},
                   table_ms=1.0, best=best) for L in (1024, 128)]
    path = tmp_path / "table.json"
    assert tune.write_table(str(path), dict(meta=dict(device="x", tile=128), sweeps=sweeps)) == 3
    entries = heuristics.read_table(str(path))
    assert entries["tile/384/384/1024/bfloat16/sm90"] == {"BT": 128}
    assert "tile/384/384/128/bfloat16/sm90" not in entries
    assert entries["fwd_out/384/384/1024/bfloat16/sm90"]["num_warps"] == 8
