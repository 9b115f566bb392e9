"""bench/kernels.py: its roofline arithmetic and a run on this CPU at a tiny shape; a dry run of
bench/profile_op.py; bench/traffic.py's counts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import kernels  # noqa: E402


def test_device_peaks_pick_the_specific_name_first():
    assert kernels.device_peaks("NVIDIA H100 PCIe") == (756.0, 2.0)
    assert kernels.device_peaks("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert kernels.device_peaks("NVIDIA H200") == (989.0, 4.8)
    assert kernels.device_peaks("NVIDIA GeForce RTX 4090") is None


def test_roofline_fractions():
    # one head, S = 128 = 2 chunks, D = 64, 2-byte inputs
    io, states = kernels.mlstm_bytes(1, 1, 128, 64, 64, 64, 2, backward=False)
    assert io == (4 * 128 * 64 + 2 * 128) * 2 and states == 2 * 2 * 64 * 64 * 2
    io_b, states_b = kernels.mlstm_bytes(1, 1, 128, 64, 64, 64, 2, backward=True)
    assert io_b == io + (4 * 128 * 64 + 2 * 128) * 2 + 2 * 128 * 4
    assert states_b == 3 * states
    flops = kernels.mlstm_flops(1, 1, 128, 64, 64, 64)
    # a compute-bound device: every fraction is the FLOP-time over the measured time
    r = kernels.roofline_fields("fwd", 1.0, 1, 1, 128, 64, 2, (1.0, 1e9))
    assert r["fwd_tflops"] == pytest.approx(flops / 1e9)
    assert r["fwd_roofline"] == r["fwd_chunkwise_roofline"] == r["fwd_compute_peak"] \
        == pytest.approx(flops / 1e12 * 1e3)
    # a bandwidth-starved one: the memory roof binds, the state traffic adds to it
    r = kernels.roofline_fields("fwd+bwd", 1.0, 1, 1, 128, 64, 2, (1e9, 1e-6))
    assert r["fwd+bwd_roofline"] == pytest.approx(io_b / 1e6 * 1e3)
    assert r["fwd+bwd_chunkwise_roofline"] == pytest.approx((io_b + states_b) / 1e6 * 1e3)
    assert "fwd_roofline" not in kernels.roofline_fields("fwd", 1.0, 1, 1, 128, 64, 2, None)


def test_goal_report(capsys):
    """Issue 3's goals read off the rows at ViL-B's shape. Session 14's 3.84 ms (an H200's)
    would be over half the chunkwise roofline on an H100 (4.25 ms is the line there) and 12%
    of the classic one; on the H200 (more bandwidth, so a shorter chunkwise bound) it is 39%."""
    B, NH, S, D = kernels.GOAL_SHAPE

    def row(path, ms, peaks, **setting):
        r = dict(path=path, B=B, NH=NH, S=S, D=D, dtype="bfloat16", **setting)
        r["fwd+bwd_ms"] = ms
        r.update(kernels.roofline_fields("fwd+bwd", ms, B, NH, S, D, 2, peaks))
        return r

    h100, h200 = kernels.PEAKS["H100"], kernels.PEAKS["H200"]
    rows = [row("triton", 3.84, h100), row("triton", 4.4, h100, tile=128),
            row("mlstm_kernels-xl_chunk", 11.77, h100), row("sdpa-attention", 10.0, h100),
            dict(row("triton", 1.0, h100), S=196)]
    goals = kernels.goal_report(rows, "NVIDIA H100 80GB HBM3")
    assert [g.get("tile") for g in goals] == [None, 128]
    fast, slow = goals
    assert fast["speedup"] == pytest.approx(11.77 / 3.84) and fast["speedup_met"]
    assert fast["chunkwise_roofline"] == pytest.approx(0.554, abs=1e-3)
    assert fast["chunkwise_roofline_met"] and not fast["roofline_met"]
    assert fast["roofline"] == pytest.approx(0.118, abs=1e-3)
    assert not slow["chunkwise_roofline_met"] and slow["speedup_met"]
    kernels.print_goals(goals)
    out = capsys.readouterr().out
    assert "fwd+bwd 3.840 ms" in out and "3.07x mlstm_kernels (goal 1.3x: met)" in out
    assert "55% of the chunkwise roofline (goal 50%: met), 12% of the classic one (not met)" in out
    assert "triton (tile 128)" in out
    # without the peer: no speed-up; on an H200 the same time is under half its roofline
    (g,) = kernels.goal_report([row("triton", 3.84, h200)], "NVIDIA H200")
    assert "speedup" not in g and not g["chunkwise_roofline_met"]
    assert g["chunkwise_roofline"] == pytest.approx(0.387, abs=1e-3)
    # no rows at the shape, or no roofline (CPU): nothing to report, nothing printed
    assert kernels.goal_report([dict(row("triton", 1.0, None))], "cpu") == []
    kernels.print_goals([])
    assert capsys.readouterr().out == ""


def test_kernel_settings_of_the_process(tmp_path, monkeypatch):
    """What a results file records of $VIL_KERNELS_*: the variables, and a launch table's
    entries (or why it could not be read)."""
    import machine
    for k in [k for k in os.environ if k.startswith("VIL_KERNELS_")]:
        monkeypatch.delenv(k)
    assert machine.kernel_settings() == {"env": {}}
    monkeypatch.setenv("VIL_KERNELS_FLASH_FORWARD", "auto")
    table = tmp_path / "t.json"
    table.write_text('{"entries": {"fwd_out/96/96/64/bfloat16/sm90": {"BV": 64}}}')
    monkeypatch.setenv("VIL_KERNELS_LAUNCH_TABLE", str(table))
    got = machine.kernel_settings()
    assert got["env"] == {"VIL_KERNELS_FLASH_FORWARD": "auto",
                          "VIL_KERNELS_LAUNCH_TABLE": str(table)}
    assert got["launch_table"] == {"fwd_out/96/96/64/bfloat16/sm90": {"BV": 64}}
    table.write_text("not json")
    assert machine.kernel_settings()["launch_table"] == "unreadable: JSONDecodeError"


def test_cpu_run(tmp_path):
    out = tmp_path / "k.json"
    rows = kernels.main(["--device", "cpu", "--shapes", "1,2,40,16", "--num-bench-iter", "1",
                         "--results-file", str(out)])
    assert {r["path"] for r in rows} == {"torch-chunkwise", "parallel"}
    assert all(r["fwd_ms"] > 0 and r["fwd+bwd_ms"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["meta"]["settings"]["env"] == {k: v for k, v in sorted(os.environ.items())
                                                if k.startswith("VIL_KERNELS_")}


def test_chunk_size_option():
    """--chunk-size sets the chunkwise paths' chunk (recorded per row); a bad one is an error."""
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,40,16", "--num-bench-iter", "1",
                         "--chunk-size", "32"])
    assert {r["path"]: r.get("chunk_size") for r in rows} == {"torch-chunkwise": 32,
                                                             "parallel": None}
    # several: a row for each chunk length, the other paths once
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,40,16", "--num-bench-iter", "1",
                         "--chunk-size", "16,64"])
    assert [(r["path"], r.get("chunk_size")) for r in rows] == [
        ("torch-chunkwise", 16), ("parallel", None), ("torch-chunkwise", 64)]
    assert all(r["fwd+bwd_ms"] > 0 for r in rows)
    choice = kernels.chunk_choice(rows)
    assert [(c["path"], c["mode"]) for c in choice] == [("torch-chunkwise", "fwd"),
                                                         ("torch-chunkwise", "fwd+bwd")]
    for c in choice:
        runs = {r["chunk_size"]: r[f"{c['mode']}_ms"] for r in rows if "chunk_size" in r}
        assert c["best_ms"] == min(runs.values()) == runs[c["best_chunk"]]
        assert c["first_chunk"] == 16 and c["speedup"] == runs[16] / c["best_ms"] >= 1
    for bad in ("48", "16,x", "64,8"):
        with pytest.raises(SystemExit):
            kernels.parse_args(["--chunk-size", bad])


def test_tile_option(monkeypatch):
    """--tile: a triton row a tile, heuristics.TILE set through the forward and the backward
    (the backward's kernels must take the forward's tiles to time them), reset after; the
    other paths once; a bad tile is an error."""
    from vil_kernels.triton import heuristics
    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            seen.append(("fwd", heuristics.TILE))
            return q.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", heuristics.TILE))
            return g

    fake = lambda device, dtype, chunk=None: [("triton", lambda x: Record.apply(x["q"])),
                                              ("parallel", lambda x: x["q"] * 1)]
    monkeypatch.setattr(kernels, "candidates", fake)
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,20,16", "--num-bench-iter", "1",
                         "--num-warm-iter", "0", "--tile", "64,128"])
    assert [(r["path"], r.get("tile")) for r in rows] == [
        ("triton", 64), ("triton", 128), ("parallel", None)]
    assert {t for _, t in seen} == {64, 128} and ("bwd", 128) in seen
    assert heuristics.TILE is None
    choice = kernels.chunk_choice(rows)
    assert {c["first_tile"] for c in choice} == {64} and len(choice) == 2
    for bad in ("96", "64,x", "256"):
        with pytest.raises(SystemExit):
            kernels.parse_args(["--tile", bad])


def test_flash_option(monkeypatch):
    """--flash off,fwd,bwd,on,auto: a triton row per setting, heuristics.FLASH_FORWARD and
    FLASH_BACKWARD set as the word says while it runs and restored after; with --tile, a row
    per tile and setting; a bad word is an error."""
    from vil_kernels.triton import heuristics
    seen = []
    record = lambda x: seen.append((heuristics.TILE, heuristics.FLASH_FORWARD,
                                    heuristics.FLASH_BACKWARD)) or x["q"] * 1
    fake = lambda device, dtype, chunk=None: [("triton", record), ("parallel", lambda x: x["q"])]
    monkeypatch.setattr(kernels, "candidates", fake)
    before = heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,20,16", "--num-bench-iter", "1",
                         "--num-warm-iter", "0", "--flash", "off,on", "--tile", "64,128"])
    assert [(r["path"], r.get("tile"), r.get("flash")) for r in rows] == [
        ("triton", 64, "off"), ("triton", 64, "on"), ("triton", 128, "off"),
        ("triton", 128, "on"), ("parallel", None, None)]
    assert set(seen) == {(64, False, False), (64, True, True), (128, False, False),
                         (128, True, True)}
    assert (heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD) == before
    assert heuristics.TILE is None
    choice = kernels.chunk_choice(rows)
    assert {(c["first_tile"], c["first_flash"]) for c in choice} == {(64, "off")}
    seen.clear()
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,20,16", "--num-bench-iter", "1",
                         "--num-warm-iter", "0", "--flash", "fwd,bwd,auto", "--paths", "triton"])
    assert [r["flash"] for r in rows] == ["fwd", "bwd", "auto"]
    assert set(seen) == {(None, True, False), (None, False, True), (None, None, None)}
    assert kernels.parse_args(["--flash", "on"]).flash == ["on"]
    for bad in ("yes", "off,1", "", "True"):
        with pytest.raises(SystemExit):
            kernels.parse_args(["--flash", bad])


def test_paths_filter():
    """--paths runs only the named paths; an unknown name is an error naming it."""
    rows = kernels.main(["--device", "cpu", "--shapes", "1,1,20,16", "--num-bench-iter", "1",
                         "--paths", "parallel"])
    assert [r["path"] for r in rows] == ["parallel"] and rows[0]["fwd+bwd_ms"] > 0
    with pytest.raises(SystemExit):
        kernels.parse_args(["--paths", "triton,flash"])
    # the names --paths accepts are the names the benchmark gives its paths
    names = {n for n, _ in kernels.candidates(torch.device("cpu"), torch.float32)}
    assert names and names <= set(kernels.PATHS)


def test_profile_op_dry_run_on_cpu(tmp_path):
    """bench/profile_op.py on CPU tensors (the kernels under the interpreter here): one row per
    path with its wall time and per-operator times, written to the results file."""
    import profile_op
    out = tmp_path / "p.json"
    rows = profile_op.main(["--device", "cpu", "--shape", "1,1,20,16", "--reps", "1",
                            "--peer-chunks", "--results-file", str(out)])
    (row,) = rows
    assert row["wall_ms"] > 0 and row["kernels"] and row["kernels_ms"] > 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["shape"] == {"B": 1, "NH": 1, "S": 20, "D": 16}
    assert "env" in saved["meta"]["settings"]
    assert saved["rows"][0]["path"] == row["path"]


def test_profile_op_rows_per_chunk_and_flash(monkeypatch):
    """--chunk-size and --flash: a row of the op per chunk length and flash setting, each run
    with that chunk and with heuristics' flash flags as the word says (restored after); a bad
    word is an error."""
    import profile_op
    from vil_kernels.triton import heuristics
    seen = []
    real = profile_op.vil_kernels.mlstm

    def spy(**kw):
        seen.append((kw["chunk_size"], heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD))
        return real(**kw)

    monkeypatch.setattr(profile_op.vil_kernels, "mlstm", spy)
    before = heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD
    rows = profile_op.main(["--device", "cpu", "--shape", "1,1,20,16", "--reps", "1",
                            "--peer-chunks", "--chunk-size", "16,32", "--flash", "off,on"])
    assert [r["path"].split("-", 1)[1] for r in rows] == [
        "chunk16-off", "chunk16-on", "chunk32-off", "chunk32-on"]
    assert set(seen) == {(16, False, False), (16, True, True), (32, False, False),
                         (32, True, True)}
    assert (heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD) == before
    with pytest.raises(SystemExit):
        profile_op.main(["--device", "cpu", "--flash", "yes"])


def test_model_kernels_dry_run_with_sweep(tmp_path, monkeypatch):
    """bench/model_kernels.py on the CPU (the Triton kernels under the interpreter) at a 2 x 2
    token grid, with a one-entry sweep a kernel: every op timed, the sweep recorded and the
    kernels' configs restored afterwards."""
    import model_kernels
    before = {op: dict(cfg) for op, (cfg, _) in model_kernels.SWEEPS.items()}
    trimmed = {op: (cfg, [dict(cfg, num_warps=2)]) for op, (cfg, _) in model_kernels.SWEEPS.items()}
    trimmed["conv"][1].append(dict(trimmed["conv"][0], RB=2))      # the conv's rolling form
    monkeypatch.setattr(model_kernels, "SWEEPS", trimmed)
    out = tmp_path / "mk.json"
    rows = model_kernels.main(["--device", "cpu", "--models", "T", "--resolution", "32",
                               "--sweep", "--results-file", str(out)])
    assert [r["op"] for r in rows] == ["conv", "gating", "prenorm", "headwise", "patch"]
    assert all(r["pytorch_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert set(saved["sweeps"]) == {"conv", "gating", "prenorm"}
    assert {op: len(t) for op, t in saved["sweeps"].items()} == dict(conv=2, gating=1, prenorm=1)
    assert all(v["T"] > 0 for t in saved["sweeps"].values() for v in t.values())
    assert {op: dict(cfg) for op, (cfg, _) in model_kernels.SWEEPS.items()} == before
    rows = model_kernels.main(["--device", "cpu", "--models", "T", "--resolution", "32",
                               "--mode", "train"])
    assert [r["op"] for r in rows] == ["conv", "gating", "prenorm", "headwise", "patch"]
    assert all(r["mode"] == "train" and r["fused_ms"] > 0 for r in rows)


def test_time_call_cuts_repetitions_of_slow_calls(monkeypatch):
    """Calls over SLOW_CALL_S (after the first, which compiles) get one warm-up and two timed
    repetitions, so that the whole GPU list fits a short loan; fast ones get all of them."""
    import torch
    calls = []
    monkeypatch.setattr(kernels, "SLOW_CALL_S", 0.01)
    slow = lambda: (calls.append(1), time.sleep(0.02))  # noqa: E731
    t = kernels.time_call(slow, torch.device("cpu"), warmup=3, iters=10)
    assert len(calls) == 4 and t >= 0.02
    calls.clear()
    kernels.time_call(lambda: calls.append(1), torch.device("cpu"), warmup=3, iters=10)
    assert len(calls) == 13


def test_host_overhead_needs_cuda(capsys, monkeypatch):
    """bench/host_overhead.py times the host's share of a CUDA call: without CUDA it says so
    (exit 2, argparse's error) instead of timing the CPU."""
    import torch
    import host_overhead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--shapes", "1,4,196,96"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_traffic_counts_the_kernels_own_loads_stores_and_products(tmp_path):
    """bench/traffic.py (its own process: the interpreter must be on before triton is
    imported): one head's counts times B x NH. The backward pair kernel in one chunk of two
    tiles of 64 (S=128, D=32) runs three (row tile, key tile <= it) pairs: two products of
    64 x 64 x 32 each, two 64 x 64 bf16 tiles stored each, and at least q, k, dh and v's
    64 x 32 bf16 tiles loaded each."""
    out = tmp_path / "t.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(BENCH / "traffic.py"), "--shape", "2,3,128,32",
                    "--chunk-size", "128", "--set", "bwd_dqk.BK=16", "--bandwidth", "2",
                    "--results-file", str(out)], check=True, env=env, capture_output=True)
    saved = json.loads(out.read_text())
    assert saved["meta"]["overrides"] == {"bwd_dqk": {"BK": 16}}
    (setting,) = saved["tables"]
    assert (setting["chunk"], setting["tile"]) == (128, 64)
    rows = {r["kernel"]: r for r in setting["rows"]}
    pair, heads = rows["mlstm_bwd_pair_kernel"], 6
    assert pair["gflop"] * 1e9 == pytest.approx(heads * 3 * 2 * (2 * 64 * 64 * 32))
    assert pair["stored_gb"] * 1e9 == pytest.approx(heads * 3 * 2 * 64 * 64 * 2)
    assert heads * 3 * 4 * 64 * 32 * 2 <= pair["loaded_gb"] * 1e9 < heads * 3 * 5 * 64 * 32 * 2
    # the forced K tile: two programs a row tile (DK = 32), each loading its 16 columns
    assert rows["mlstm_bwd_dqk_kernel"]["programs"] == heads * 2 * 2
    moved = pair["loaded_gb"] + pair["stored_gb"]
    assert pair["floor_ms"] == pytest.approx(moved / 2)
    assert rows["total"]["gflop"] == pytest.approx(sum(
        r["gflop"] for k, r in rows.items() if k != "total"))
    # distinct bytes: the pair kernel reads q, k, dh and v once each (64 x 32 bf16 tiles of
    # two row tiles; plus its rows' statistics) and writes its six slots once
    tiles = heads * 4 * 128 * 32 * 2
    assert tiles + pair["stored_gb"] * 1e9 <= pair["unique_gb"] * 1e9 < (
        1.1 * tiles + pair["stored_gb"] * 1e9)
    assert all(r["unique_gb"] <= r["loaded_gb"] + r["stored_gb"] for r in rows.values())


def test_traffic_takes_a_launch_table(tmp_path):
    """bench/traffic.py under $VIL_KERNELS_LAUNCH_TABLE counts the kernels as the table launches
    them (its sm_90 keys: traffic.py runs sm_90's parameters) and records the table: ViL-B's
    wide candidate at S=200 (one chunk of four tiles of 64) runs pair programs of two key
    tiles (1 + 1 + 2 + 2 for the four row tiles, against ten pairs) and dq/dk K tiles of 128
    (three a row tile, against six)."""
    out = tmp_path / "t.json"
    table = BENCH / "tables" / "vil-b-wide-sm90.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               VIL_KERNELS_LAUNCH_TABLE=str(table))
    r = subprocess.run([sys.executable, str(BENCH / "traffic.py"), "--shape", "1,1,200,384",
                        "--chunk-size", "1024", "--results-file", str(out)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"VIL_KERNELS_LAUNCH_TABLE={table}" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["meta"]["settings"]["launch_table"] == json.loads(table.read_text())["entries"]
    rows = {x["kernel"]: x for x in saved["tables"][0]["rows"]}
    assert rows["mlstm_fwd_pair_kernel"]["programs"] == rows["mlstm_bwd_pair_kernel"][
        "programs"] == 6
    assert rows["mlstm_bwd_dqk_kernel"]["programs"] == 3 * 4


def test_traffic_with_a_profile_gives_achieved_rates(tmp_path):
    """traffic.table with measured ms (bench/profile_op.py's kernels): achieved TB/s and
    TFLOP/s per kernel and in total; kernels the profile lacks get none."""
    import traffic
    counts = {"a": dict(launches=1, programs=4, loaded=3e6, stored=1e6, flops=8e9, unique=2e6),
              "b": dict(launches=2, programs=2, loaded=1e6, stored=0, flops=0, unique=1e6)}
    rows = {r["kernel"]: r for r in traffic.table(counts, heads=2, measured={"a": 0.5})}
    assert rows["a"]["tb_per_s"] == pytest.approx(2 * 4e6 / 1e9 / 0.5)
    assert rows["a"]["unique_tb_per_s"] == pytest.approx(2 * 2e6 / 1e9 / 0.5)
    assert rows["total"]["unique_gb"] == pytest.approx(2 * 3e6 / 1e9)
    assert rows["a"]["tflop_per_s"] == pytest.approx(2 * 8e9 / 1e9 / 0.5)
    assert rows["a"]["flop_per_byte"] == pytest.approx(8e9 / 3e6)
    assert "ms" not in rows["b"] and rows["b"]["programs"] == 4
    assert rows["total"]["loaded_gb"] == pytest.approx(2 * 4e6 / 1e9)
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(dict(rows=[dict(path="triton", kernels={"a": 0.5})])))
    assert traffic.measured_kernels(profile, None) == {"a": 0.5}
    with pytest.raises(SystemExit, match="not in"):
        traffic.measured_kernels(profile, "torch")


def test_set_forces_launch_parameters_for_the_run_only(monkeypatch):
    """--set KERNEL.PARAM=VALUE: heuristics.OVERRIDES holds them while the benchmark runs and
    what it held before afterwards; bad words are usage errors."""
    import argparse
    from vil_kernels.triton import heuristics
    seen = []
    monkeypatch.setattr(kernels, "bench_shape",
                        lambda *a, **k: seen.append({n: dict(p) for n, p in
                                                     heuristics.OVERRIDES.items()}) or [])
    before = dict(heuristics.OVERRIDES)
    kernels.main(["--device", "cpu", "--shapes", "1,1,16,16", "--set", "bwd_dqk.BK=128",
                  "--set", "bwd_dqk.maxnreg=None", "--set", "fwd_state.split=True"])
    assert seen == [{"bwd_dqk": {"BK": 128, "maxnreg": None}, "fwd_state": {"split": True}}]
    assert heuristics.OVERRIDES == before
    p = argparse.ArgumentParser()
    for bad in ("bwd_dqk.BK", "nope.BK=1", "bwd_dqk.tile=1", "bwd_dqk.BK=x"):
        with pytest.raises(SystemExit):
            kernels.launch_overrides(p, [bad])


def test_profile_op_rows_per_tile_with_forced_parameters(monkeypatch):
    """profile_op --tile and --set: a row per tile, run with heuristics.TILE at it and the
    forced parameters in OVERRIDES, both restored after."""
    import profile_op
    from vil_kernels.triton import heuristics
    seen = []
    real = profile_op.vil_kernels.mlstm

    def spy(**kw):
        seen.append((heuristics.TILE, dict(heuristics.OVERRIDES.get("bwd_dqk", {}))))
        return real(**kw)

    monkeypatch.setattr(profile_op.vil_kernels, "mlstm", spy)
    rows = profile_op.main(["--device", "cpu", "--shape", "1,1,40,16", "--reps", "1",
                            "--peer-chunks", "--chunk-size", "64", "--tile", "16,32",
                            "--set", "bwd_dqk.BK=16"])
    assert [r["path"].split("-", 1)[1] for r in rows] == ["chunk64-tile16", "chunk64-tile32"]
    assert {t for t, _ in seen} == {16, 32} and all(o == {"BK": 16} for _, o in seen)
    assert heuristics.TILE is None and "bwd_dqk" not in heuristics.OVERRIDES


def test_table_option(monkeypatch, tmp_path):
    """--table builtin,STEM,FILE: a triton row a launch table, each timed with
    $VIL_KERNELS_LAUNCH_TABLE at it and the table read again (the candidate's parameters are
    what launch_params gives while it runs), the process's own table restored after; the other
    paths once; the tables' entries in the results file; bad words are usage errors."""
    from vil_kernels.triton import heuristics
    own = tmp_path / "own.json"
    own.write_text('{"entries": {"bwd_dqk/384/384/1024/bfloat16/sm90": {"BK": 32}}}')
    monkeypatch.setenv(heuristics.TABLE_ENV, str(own))
    heuristics.tuned_table(reload=True)
    seen = []
    dqk_bk = lambda: heuristics.launch_params("bwd_dqk", 384, 384, 1024, torch.bfloat16, 90,
                                              state=False)["BK"]
    record = lambda x: seen.append((os.environ.get(heuristics.TABLE_ENV), dqk_bk())) or x["q"] * 1
    fake = lambda device, dtype, chunk=None: [("triton", record), ("parallel", lambda x: x["q"])]
    monkeypatch.setattr(kernels, "candidates", fake)
    out = tmp_path / "k.json"
    try:
        rows = kernels.main(["--device", "cpu", "--shapes", "1,1,20,16", "--num-bench-iter", "1",
                             "--num-warm-iter", "0", "--table", f"builtin,vil-b-wide-sm90,{own}",
                             "--results-file", str(out)])
        assert [(r["path"], r.get("table")) for r in rows] == [
            ("triton", "builtin"), ("triton", "vil-b-wide-sm90"), ("triton", "own"),
            ("parallel", None)]
        wide = str(kernels.TABLES_DIR / "vil-b-wide-sm90.json")
        assert set(seen) == {(None, 64), (wide, 128), (str(own), 32)}
        assert os.environ[heuristics.TABLE_ENV] == str(own) and dqk_bk() == 32
        choice = kernels.chunk_choice(rows)
        assert {c["first_table"] for c in choice} == {"builtin"} and len(choice) == 2
        tables = json.loads(out.read_text())["meta"]["tables"]
        assert tables["builtin"] == {} and tables["own"] == {
            "bwd_dqk/384/384/1024/bfloat16/sm90": {"BK": 32}}
        assert tables["vil-b-wide-sm90"]["bwd_dqk/384/384/1024/bfloat16/sm90"]["BK"] == 128
        bad = tmp_path / "bad.json"
        bad.write_text('{"entries": {"bwd_dqk/384/384/1024/bfloat16/sm90": {"BK": 48}}}')
        for words in ("nope", "builtin,", "builtin,builtin", str(bad), str(tmp_path / "x.json")):
            with pytest.raises(SystemExit):
                kernels.parse_args(["--table", words])
    finally:
        monkeypatch.delenv(heuristics.TABLE_ENV)
        heuristics.tuned_table(reload=True)


def test_launch_flags_without_triton(monkeypatch, capsys):
    """--table and --set need the Triton package: without it, a usage error that says so."""
    monkeypatch.setitem(sys.modules, "vil_kernels.triton", None)       # (import fails)
    for flags in (["--table", "builtin"], ["--set", "bwd_dqk.BK=128"]):
        with pytest.raises(SystemExit):
            kernels.parse_args(flags)
        assert "needs triton" in capsys.readouterr().err
