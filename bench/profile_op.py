"""Where the time of one fwd+bwd goes: the GPU kernels of the Triton op and of the peer.

    python bench/profile_op.py                       # ViL-B's shape: B=64, NH=4, S=784, D=384
    python bench/profile_op.py --shape 64,4,784,96 --results-file prof.json
    python bench/profile_op.py --chunk-size 64,1024 --flash off,on --peer-chunks   # a row each
    python bench/profile_op.py --chunk-size 1024 --tile 64,128 --set bwd_dqk.BK=128 --peer-chunks

Runs the op (and NX-AI's mlstm_kernels chunkwise--triton_xl_chunk when installed) forward and
backward under torch.profiler after a warm-up, and prints every GPU kernel's time per pass
(device time, summed over its launches in a pass), the sum of the kernels and the wall time of a
pass (CUDA events, outside the profiler). The loss is ``(h * w).sum()`` with a fixed bfloat16
``w``, so no float32 copy of h and no expanded gradient enters the numbers. --chunk-size,
--tile and --flash (bench/kernels.py's words) give the op a row per chunk length, tile and
flash setting, and --set forces launch parameters in all of them: device time per kernel,
which host-timed medians at these sizes blur (repeats of one configuration moved by up to 1.7x
on an H200, bench/results/kernels-nvidia-h200-bf16-chunk64-repeat-*). bench/traffic.py
--profile turns a results file into each kernel's achieved bandwidth and TFLOP/s.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import vil_kernels  # noqa: E402
from kernels import (chunk_words, flash_words, forced_params, launch_overrides,  # noqa: E402
                     make_inputs, tile_words, triton_settings)
from machine import device_name, kernel_settings  # noqa: E402
from vil_kernels.triton import chunk as tchunk  # noqa: E402


def wall_ms(step, reps, device):
    times = []
    for _ in range(reps):
        watch = tchunk._Stopwatch(device)
        step()
        watch.stop()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(watch.ms())
    return statistics.median(times)


def kernel_table(step, reps, device):
    """{kernel name: ms per pass} from the profiler, summed over each kernel's launches (on the
    CPU, a dry run of this script: the top-level operators' self time)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
        if cuda:
            torch.cuda.synchronize()
    per = {}
    for ev in prof.key_averages():
        if cuda:
            t = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        else:
            t = ev.self_cpu_time_total
        if t and ev.key:
            per[ev.key] = per.get(ev.key, 0.) + t / 1e3 / reps
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def profile_path(name, fn, x, w, reps, settings=(None, None)):
    """One path's row; settings: (tile, flash word) for the Triton op (triton_settings)."""
    def step():
        for t in x.values():
            t.grad = None
        (fn(x) * w).sum().backward()

    device = w.device
    with triton_settings(*settings):
        for _ in range(3):
            step()
        row = dict(path=name, wall_ms=wall_ms(step, reps, device),
                   kernels=kernel_table(step, reps, device))
    row["kernels_ms"] = sum(row["kernels"].values())
    print(f"\n{name}: fwd+bwd {row['wall_ms']:.3f} ms wall, {row['kernels_ms']:.3f} ms in "
          f"{len(row['kernels'])} kernels", flush=True)
    for k, ms in list(row["kernels"].items())[:30]:
        print(f"  {ms:8.3f} ms  {k[:110]}")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="64,4,784,384", help="B,NH,S,D")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu: a dry run (the torch path; Triton under TRITON_INTERPRET=1)")
    ap.add_argument("--peer-chunks", type=int, nargs="*", default=[64, 128],
                    help="chunk sizes to run the peer at (none: no peer)")
    ap.add_argument("--chunk-size", default=None, metavar="L[,L...]",
                    help="the op's chunk lengths, a row each (default: its own choice)")
    ap.add_argument("--flash", default=None, metavar="off|fwd|bwd|on|auto[,...]",
                    help="the op's flash settings, a row each (bench/kernels.py --flash)")
    ap.add_argument("--tile", default=None, metavar="N[,N...]",
                    help="the op's tiles of positions in chunks of several tiles, a row each "
                         "(bench/kernels.py --tile)")
    ap.add_argument("--set", action="append", default=[], metavar="KERNEL.PARAM=VALUE",
                    help="a launch parameter forced over the table's for the op's rows "
                         "(bench/kernels.py --set); repeatable")
    ap.add_argument("--results-file")
    args = ap.parse_args(argv)
    chunks = [None] if args.chunk_size is None else chunk_words(ap, args.chunk_size)
    tiles = [None] if args.tile is None else tile_words(ap, args.tile)
    flashes = [None] if args.flash is None else flash_words(ap, args.flash)
    overrides = launch_overrides(ap, args.set) if args.set else {}
    B, NH, S, D = (int(s) for s in args.shape.split(","))
    dev = torch.device(args.device)
    x = make_inputs(B, NH, S, D, torch.bfloat16, dev, requires_grad=True)
    w = torch.randn(B, NH, S, D, device=dev, dtype=torch.bfloat16)
    backend = "triton" if dev.type == "cuda" or tchunk.INTERPRETED else "torch"
    paths = []
    for chunk in chunks:
        for tile in tiles:
            for flash in flashes:
                name = (backend + (f"-chunk{chunk}" if chunk else "")
                        + (f"-tile{tile}" if tile else "") + (f"-{flash}" if flash else ""))
                paths.append((name, lambda x, chunk=chunk: vil_kernels.mlstm(
                    **x, backend=backend, chunk_size=chunk), (tile, flash)))
    for chunk in args.peer_chunks:
        peer = peers.mlstm_kernels_chunkwise(chunk)
        if peer is not None:
            paths.append((f"mlstm_kernels-xl_chunk-{chunk}", lambda x, peer=peer: peer(**x),
                          (None, None)))
    rows = []
    for name, fn, settings in paths:
        try:
            with forced_params(overrides if name.startswith(backend) else None):
                rows.append(profile_path(name, fn, x, w, args.reps, settings))
        except Exception as e:  # noqa: BLE001 - the peer may fail to build; report, go on
            rows.append(dict(path=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"\n{name}: {rows[-1]['error']}", flush=True)
    if args.results_file:
        meta = dict(device=device_name(dev), torch=torch.__version__,
                    shape=dict(B=B, NH=NH, S=S, D=D), dtype="bfloat16",
                    launch_overrides=overrides, settings=kernel_settings())
        Path(args.results_file).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
