"""bench/throughput.py: a smoke run with tiny models, the result files, argument errors, and the
out-of-memory retry."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import throughput  # noqa: E402

ROW_FIELDS = {"model", "row", "label", "resolution", "tokens", "batch_size", "gflops", "params_m",
              "infer_img_s", "train_img_s", "infer_peak_mib", "train_peak_mib", "infer_vs_ours",
              "train_vs_ours", "backend", "dtype"}


def test_compile_flag_runs_compiled_models(tmp_path):
    """--compile wraps every model in torch.compile; aot_eager traces without C++ code generation
    (inductor's build takes minutes on a CI CPU)."""
    results = tmp_path / "c.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", "vil2-test",
         "--resolution", "32", "--batch-size", "2", "--num-warm-iter", "1", "--num-bench-iter", "1",
         "--device", "cpu", "--rows", "ours,deit", "--compile", "aot_eager",
         "--compile-mode", "default", "--results-file", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(results.read_text())
    assert data["header"]["compile"] == "aot_eager" and data["header"]["compile_mode"] == "default"
    assert all(row["infer_img_s"] > 0 and row["train_img_s"] > 0 for row in data["results"])


@pytest.mark.parametrize("malloc", ["tuned", "default"])
def test_malloc_modes(tmp_path, malloc):
    """--malloc tuned (default) keeps freed memory in glibc while timing and measures peak memory;
    --malloc default leaves glibc alone and says memory was not measured."""
    results = tmp_path / "m.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", "vil2-test",
         "--resolution", "32", "--batch-size", "2", "--num-warm-iter", "0", "--num-bench-iter", "1",
         "--device", "cpu", "--rows", "ours", "--bench", "inference", "--malloc", malloc,
         "--results-file", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(results.read_text())
    header, row = data["header"], data["results"][0]
    assert row["infer_img_s"] > 0
    if malloc == "tuned":
        assert "trim threshold 1 GiB" in header["allocator"] and "trim threshold" in r.stdout
        assert row["infer_peak_mib"] is not None
    else:
        assert header["allocator"] == "glibc defaults" and "glibc defaults" in r.stdout
        assert row["infer_peak_mib"] is None and "not measured" in header["memory"]


def test_smoke_sweep_json_and_plot(tmp_path):
    results = tmp_path / "r.json"
    # (a launch table's settings go into the header: its sm90 keys change nothing on a CPU)
    table = ROOT / "bench" / "tables" / "vil-b-wide-sm90.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), VIL_KERNELS_LAUNCH_TABLE=str(table))
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", "vil2-test",
         "--sweep", "32,64", "--batch-size", "2", "--num-warm-iter", "0", "--num-bench-iter", "1",
         "--device", "cpu", "--results-file", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "device:" in out and "torch" in out and "triton" in out
    assert "ViL-test vil_kernels" in out and "DeiT-test SDPA" in out
    data = json.loads(results.read_text())
    header, rows = data["header"], data["results"]
    assert header["device_type"] == "cpu" and header["versions"]["torch"] == torch.__version__
    assert header["dtype"] == "float32" and header["interleave"] is True   # CPU default
    settings = header["kernel_settings"]
    assert settings["env"]["VIL_KERNELS_LAUNCH_TABLE"] == str(table)
    assert settings["launch_table"] == json.loads(table.read_text())["entries"]
    assert f"vil_kernels settings: VIL_KERNELS_LAUNCH_TABLE={table}" in out
    assert [(x["row"], x["resolution"]) for x in rows] == [
        (k, res) for res in (32, 64) for k in ("ours", "parallel", "deit", "mlstm_kernels")]
    for row in rows:
        if row["row"] == "mlstm_kernels" and "note" in row:
            assert "not installed" in row["note"]
            continue
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
        assert row["gflops"] > 0 and row["batch_size"] == 2
        assert len(row["infer_ms_per_step_all"]) == len(row["train_ms_per_step_all"]) == 1
        assert row["tokens"] == (row["resolution"] // 16) ** 2 + (row["row"] == "deit")
    ours = [x for x in rows if x["row"] == "ours"]
    assert all(x["infer_vs_ours"] == pytest.approx(1.0) for x in ours)
    # The published parallel cell does more FLOPs than the chunkwise count at the same size.
    par = {x["resolution"]: x for x in rows if x["row"] == "parallel"}
    assert all(par[x["resolution"]]["gflops"] >= x["gflops"] for x in ours)
    assert results.with_suffix(".png").stat().st_size > 1000


def test_csv_results(tmp_path):
    rows = [{"model": "m", "row": "ours", "label": "a", "resolution": 32, "infer_img_s": 1.0},
            {"model": "m", "row": "deit", "label": "b", "resolution": 32, "infer_img_s": 2.0,
             "note": "x"}]
    throughput.add_ratios(rows)
    assert rows[1]["infer_vs_ours"] == 2.0
    header = {"device": "cpu", "versions": {"torch": torch.__version__}}
    path = tmp_path / "r.csv"
    throughput.write_results(path, header, rows)
    text = path.read_text().splitlines()
    assert text[0].startswith("model,row,label,resolution,infer_img_s")
    assert len(text) == 3 and "device" in text[0]
    table = throughput.format_table(rows)
    assert "x2.00" in table and "- b @32: x" in table


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "100"], "not a positive multiple of the patch size 16"),
    (["--sweep", "224,250"], "resolution 250 is not a positive multiple"),
    (["--sweep", "224,big"], "comma-separated integers"),
    (["--model", "resnet50"], "unknown model 'resnet50'"),
    (["--rows", "ours,vit"], "--rows: unknown"),
    (["--results-file", "out.txt"], "must be .json or .csv"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "int8"], "invalid choice"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        throughput.resolve_args(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit):
        throughput.resolve_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_unsupported_dtype_is_an_argument_error(monkeypatch, capsys):
    def broken_autocast(*a, **kw):
        raise RuntimeError("autocast for this dtype is not supported")
    monkeypatch.setattr(torch, "autocast", broken_autocast)
    with pytest.raises(SystemExit):
        throughput.resolve_args(["--device", "cpu", "--dtype", "float16"])
    assert "cannot run float16 autocast" in capsys.readouterr().err


def test_defaults_on_cpu():
    args = throughput.resolve_args(["--device", "cpu", "--model", "vil-t"])
    assert args.models == ["vil2-tiny"] and args.dtype == torch.float32 and not args.amp
    assert args.batch_size >= 1 and args.num_bench_iter >= 1


def test_out_of_memory_halves_the_batch(monkeypatch):
    real = throughput.measure

    def measure(runner, mode, batch, *a):
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(runner, mode, batch, *a)

    monkeypatch.setattr(throughput, "measure", measure)
    args = throughput.resolve_args(["--device", "cpu", "--model", "vil2-test", "--rows", "deit",
                                    "--batch-size", "8", "--num-warm-iter", "0",
                                    "--num-bench-iter", "1", "--resolution", "32"])
    progress = throughput.Progress(4, enabled=False)
    spec = throughput.row_specs("vil2-test", ["deit"])[0]
    row = throughput.run_row(spec, "vil2-test", 32, args, throughput.PeakMemory(args.device),
                             progress)
    assert row["batch_size"] == 2
    assert "out of memory at batch 8, halved" in row["note"]
    assert row["infer_img_s"] > 0 and row["train_img_s"] > 0


@pytest.mark.parametrize("interleave", ["--interleave", "--no-interleave"])
def test_failing_peer_is_reported_not_fatal(monkeypatch, interleave):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise RuntimeError("peer exploded")

    monkeypatch.setattr(throughput.peers, "create_deit", lambda name, r: (Broken(), "broken"))
    rows = throughput.main(["--device", "cpu", "--model", "vil2-test", "--rows", "ours,deit",
                            "--resolution", "32", "--batch-size", "1", "--num-warm-iter", "0",
                            "--num-bench-iter", "1", "--no-progress", interleave])
    assert rows[0]["infer_img_s"] > 0
    assert "peer exploded" in rows[1]["note"] and rows[1].get("infer_img_s") is None


def test_recompute_states_flag(tmp_path):
    """--recompute-states runs our rows with the cells recomputing their chunk states, and says
    so in the row."""
    results = tmp_path / "r.json"
    throughput.main(["--model", "vil2-test", "--resolution", "32", "--batch-size", "2",
                     "--num-warm-iter", "0", "--num-bench-iter", "1", "--device", "cpu",
                     "--rows", "ours", "--bench", "train", "--recompute-states", "--no-progress",
                     "--results-file", str(results)])
    (row,) = json.loads(results.read_text())["results"]
    assert row["impl"].endswith("(recompute_states)") and row["train_img_s"] > 0


def test_mlstm_chunk_size_flag(tmp_path, monkeypatch):
    """--mlstm-chunk-size runs our rows' cells in chunks of N (the operator sees it) and says so
    in the row; a chunk that is not a power of two >= 16 is an error."""
    import vil_kernels
    seen = []
    real = vil_kernels.mlstm

    def spy(*a, **kw):
        seen.append(kw.get("chunk_size"))
        return real(*a, **kw)

    monkeypatch.setattr(vil_kernels, "mlstm", spy)
    results = tmp_path / "r.json"
    throughput.main(["--model", "vil2-test", "--resolution", "32", "--batch-size", "2",
                     "--num-warm-iter", "0", "--num-bench-iter", "1", "--device", "cpu",
                     "--rows", "ours", "--bench", "inference", "--mlstm-chunk-size", "32",
                     "--no-progress", "--results-file", str(results)])
    (row,) = json.loads(results.read_text())["results"]
    assert row["impl"].endswith("(chunk 32)") and row["infer_img_s"] > 0
    assert seen and set(seen) == {32}
    with pytest.raises(SystemExit):
        throughput.resolve_args(["--mlstm-chunk-size", "40"])
