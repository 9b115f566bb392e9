"""Sweep the Triton kernels' launch parameters on a GPU, one kernel at a time.

    python bench/tune.py                                  # ViL-B, then ViL-T, then ViL-S shapes
    python bench/tune.py --dims 384 --results-file tune.json --time-limit 120

For each head dim D (B=64, NH=4, S=784, bfloat16 by default) the fused forward and backward run
once with the table's parameters (vil_kernels/triton/heuristics.py), timed per kernel with CUDA
events; then every candidate configuration of one kernel (head-dim tiles, warps, pipeline
stages, register cap) replaces that kernel's entry while the others keep theirs, and that
kernel's median time is recorded. A configuration whose output differs from the table's by more
than rounding is reported as wrong. Compilation of all candidates runs first, in parallel
processes (Triton's on-disk cache), so the timed part only loads binaries. Results go to a JSON
file after every kernel, so a run cut short by --time-limit keeps what it measured. The best
configuration per kernel is what heuristics.py's table should say on that GPU.
"""

import argparse
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from vil_kernels.triton import chunk as tchunk  # noqa: E402
from vil_kernels.triton import heuristics  # noqa: E402

# (fwd_flash and bwd_flash run, and are swept, where heuristics.flash_applies says: with
# VIL_KERNELS_FLASH_FORWARD=1 and VIL_KERNELS_FLASH_BACKWARD=1, or =auto at head dims whose
# flash builds take 4 warps)
FWD = ("fwd_state", "fwd_out", "fwd_pair", "fwd_flash")
BWD = ("bwd_state", "bwd_dqk", "bwd_dv", "bwd_pair", "bwd_flash")
# chunk lengths the table's parameters are timed at, kernel by kernel, before the sweeps: one
# tile a chunk (32, 64) and chunks of 2, 4 and 16 tiles of 64 (1024: ViL's 784 tokens in one
# chunk, the quadratic form)
BASELINE_CHUNKS = (32, 64, 128, 256, 1024)
CHECK_MAX_S = 2048          # longest sequence of the parity check against float64


def device_arch():
    """The GPU's arch (0 under the interpreter, which runs Hopper's table)."""
    return heuristics.device_arch(torch.device("cuda")) if torch.cuda.is_available() else 0


def candidates(kernel, D, L, arch=None, state=None):
    """Configurations to try for one kernel besides the table's: head-dim tiles (for the scans
    both tiles own a program; elsewhere the tile a program owns in 32 / 64 / 128, the one it
    loops over in 32 / 64), 4 warps (and 8 before Hopper: on the H200 8 lost everywhere by
    1.5-2x; 8 also for wide tiles: the dq/dk kernel's K tiles of 128 and 256, the outputs
    and dv kernels' V tiles of 256, the pair kernels' programs of 2 and 4 key tiles, KT), 1 or
    2 pipeline stages (3 for the scans, whose loops run every chunk), and
    register caps of 128 / 168 / none (255) for every kernel (caps at which 4 / 3 / 2
    programs of 4 warps share an SM's registers); for the scans also their
    split form (heuristics.launch_params), timed as the sum of its two launches. The flash
    kernels: their key tile (16, 32, 64), warps (4, 8) and stages (2, 3). state: whether a state
    passes between chunks (heuristics.launch_params; the table's caps depend on it)."""
    arch = device_arch() if arch is None else arch
    base = heuristics.launch_params(kernel, D, D, L, torch.bfloat16, arch, state)
    if kernel in heuristics.FLASH_KERNELS:  # their head-dim tiles are the whole head dims
        return _new_configs([dict(base, BS=bs, num_warps=w, num_stages=st)
                             for bs, w, st in itertools.product((16, 32, 64), (4, 8), (2, 3))],
                            base)
    if kernel in heuristics.SCANS:
        tiles = [(32, 32), (32, 64), (64, 32), (64, 64), (32, 128), (64, 128), (128, 64)]
        caps = (128, 168, 255)
    elif kernel == "bwd_dqk":                                # grid over K tiles, loop over V
        tiles = [(k, 64) for k in (32, 64, 128)] + [(base["BK"], 32)]
        caps = (128, 168, heuristics.MAXNREG)
    elif kernel in heuristics.PAIR_KERNELS:     # a program a tile pair, loops over DK (and DV)
        vs = (base["BV"],) if kernel == "fwd_pair" else (32, 64, 128)
        tiles = [(k, v) for k in (32, 64, 128) for v in vs]
        caps = (128, 168, heuristics.MAXNREG)
    else:                                                    # fwd_out, bwd_dv: grid over V
        tiles = [(64, v) for v in (32, 64, 128)] + [(32, base["BV"])]
        caps = (128, 168, heuristics.MAXNREG)
    warps = (4,) if arch >= 90 or arch == 0 else (4, 8)
    if heuristics.tile_len(L, torch.bfloat16, D, D, arch) >= 128:
        warps = (8,)                        # (tiles of 128 positions: a warpgroup per 64 rows)
    out = [dict(base, BK=BK, BV=BV, num_warps=w, num_stages=st, maxnreg=cap)
           for (BK, BV), w, st, cap in itertools.product(tiles, warps, (1, 2), caps)]
    if 8 not in warps and kernel in ("bwd_dqk", "fwd_out", "bwd_dv"):
        # wide head-dim tiles at 8 warps too (two warpgroups share the columns): a program
        # then loads each pair tile (dS, the scores) for more columns. At ViL-B's shape in one
        # chunk (bench/traffic.py) the dq/dk kernel's K tiles of 128 reload dS 3 times
        # instead of 6 (4.8 -> 3.6 GB); at 4 warps they take 252 registers, at 8 116
        # (compile_check, sm_90, no state). V tiles of 256: 0.2 GB less in each of the
        # outputs and dv kernels, 115-124 registers at 8 warps
        wide = [(BK, 64) for BK in (128, 256)] if kernel == "bwd_dqk" else [(64, 256)]
        out += [dict(base, BK=BK, BV=BV, num_warps=8, num_stages=st, maxnreg=cap)
                for (BK, BV), st, cap in itertools.product(wide, (1, 2),
                                                           (168, heuristics.MAXNREG))]
    if kernel in heuristics.PAIR_KERNELS and 8 not in warps:
        # two and four key tiles a program at 8 warps (the two warpgroups share them): the
        # row tile's q (and dh) loaded once for that many pairs (bench/traffic.py at ViL-B's
        # shape in one chunk: the two pair kernels 7.1 -> 5.7 GB at two, 5.0 GB at four). At
        # two 116-128 registers, two programs an SM (compile_check, sm_90, D=96 and 384); at
        # four the forward's 247-255 (one), the backward's spill at a cap of 128
        out += [dict(base, KT=kt, num_warps=8, num_stages=st, maxnreg=cap)
                for kt, st, cap in itertools.product((2, 4), (1, 2), caps)]
    if kernel in heuristics.SCANS:
        out += [dict(base, num_stages=3, maxnreg=cap) for cap in caps]
        # the split form: its parallel pass's tiles (no loop there to pipeline; the chain's
        # launch is fixed)
        out += [dict(base, BK=BK, BV=BV, num_stages=1, split=True) for BK, BV in tiles]
    return _new_configs(out, base)


def _new_configs(configs, base):
    """configs without repeats and without the table's own (base), in order."""
    return [c for i, c in enumerate(configs) if c not in configs[:i] and c != base]


def _sync(t):
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def make_inputs(B, NH, S, D, dtype, seed=0):
    """Inputs on the GPU (on the CPU under TRITON_INTERPRET=1, for a dry run of this script)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    mk = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    return dict(q=mk(B, NH, S, D), k=mk(B, NH, S, D), v=mk(B, NH, S, D), i=mk(B, NH, S),
                f=(mk(B, NH, S).float() + 3.0).to(dtype))


def run_pass(x, dh, L, backward):
    """The forward kernels in chunks of L, and with backward=True the backward kernels on its
    saved tensors, as ViL runs them: no initial state, the last state unused (so a single
    chunk runs no state scans)."""
    out = tchunk.mlstm_fwd(x["q"], x["k"], x["v"], x["i"], x["f"], None, None, None, 1e-6, L,
                           False, last_states=False)
    if not backward:
        return out[0]
    h = out[0]
    g = tchunk.mlstm_bwd(x["q"], x["k"], x["v"], x["i"], x["f"], None, None, None, h, dh,
                         None, None, None, *out[1:], 1e-6, L, False)    # ViL's: h used alone
    return h, *g[:5]


def kernel_times(x, dh, L, backward, reps):
    """Median ms per kernel over reps passes in chunks of L (CUDA events around each launch)."""
    per = {}
    for _ in range(reps):
        tchunk.KERNEL_EVENTS = []
        run_pass(x, dh, L, backward)
        _sync(x["q"])
        this = {}                                # a split scan launches twice under its name
        for name, watch in tchunk.KERNEL_EVENTS:
            this[name] = this.get(name, 0.) + watch.ms()
        for name, ms in this.items():
            per.setdefault(name, []).append(ms)
    tchunk.KERNEL_EVENTS = None
    return {k: statistics.median(v) for k, v in per.items()}


def _close(a, b):
    """Outputs of two configurations agree up to bfloat16 rounding of differently ordered sums."""
    return all(((u.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
               .item() < 2e-2 for u, w in zip(a, b))


def _warm(job):
    """Compile (into Triton's disk cache) what one configuration of one kernel launches."""
    kernel, cfg, D, L, NH, S, tile = job
    heuristics.TILE = tile
    heuristics.OVERRIDES.clear()
    if kernel:
        heuristics.OVERRIDES[kernel] = cfg
    try:
        x = make_inputs(1, NH, S, D, torch.bfloat16)
        run_pass(x, torch.randn_like(x["v"]), L, kernel in BWD or kernel is None)
        if kernel is None:                                     # what check() runs
            xs = {k: v.requires_grad_() for k, v in x.items()}
            for rev in (False, True):
                _mlstm(xs, reverse=rev).float().sum().backward()
        _sync(x["q"])
        return None
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        return f"{kernel} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _mlstm(x, **kw):
    import vil_kernels
    return vil_kernels.mlstm(**x, backend="triton", **kw)


def check(D, NH, S):
    """The table's kernels against the float64 parallel reference on this GPU (both directions,
    output and every input's gradient): max error relative to the reference's largest entry."""
    import vil_kernels
    heuristics.OVERRIDES.clear()
    x = make_inputs(2, NH, S, D, torch.bfloat16, seed=1)
    w = torch.randn(2, NH, S, D, device=x["q"].device)
    out = {}
    for rev in (False, True):
        grads = []
        for ref in (False, True):
            xs = {k: v.detach().double().requires_grad_() if ref else
                  v.detach().clone().requires_grad_() for k, v in x.items()}
            h = (vil_kernels.mlstm(**xs, backend="parallel", reverse=rev) if ref
                 else _mlstm(xs, reverse=rev))
            (h.double() * w).sum().backward()
            grads.append([h.detach().double()] + [xs[k].grad.double() for k in "qkvif"])
        out["reverse" if rev else "forward"] = {
            n: ((a - b).abs().max() / b.abs().max()).item()
            for n, a, b in zip(("h", "dq", "dk", "dv", "di", "df"), *grads)}
    return out


def full_ms(x, reps, fn=None, chunk=None):
    """Median ms of fwd+bwd through the autograd op (prologue and epilogue included), in chunks
    of `chunk` (the default's where None)."""
    fn = fn or (lambda xs: _mlstm(xs, chunk_size=chunk))
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    times = []
    for r in range(reps + 2):
        watch = tchunk._Stopwatch(x["q"].device)
        fn(xs).float().sum().backward()
        watch.stop()
        _sync(x["q"])
        if r >= 2:
            times.append(watch.ms())
    return statistics.median(times)


def _peer_ms(job):
    """fwd+bwd ms of NX-AI's mlstm_kernels chunkwise--triton_xl_chunk (chunks of 128, padded
    to them) on this sweep's inputs; {} when it is not installed."""
    B, NH, S, D, reps = job
    peer = peers.mlstm_kernels_chunkwise(128)
    if peer is None:
        return {}
    x = make_inputs(B, NH, S, D, torch.bfloat16)
    row = {"mlstm_kernels_workaround": peer.workaround}
    try:
        row["mlstm_kernels_xl_chunk_ms"] = full_ms(x, reps, lambda x: peer(**x))
    except Exception as e:  # noqa: BLE001
        row["mlstm_kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def _peer_in_child(job):
    """The peer runs in a process of its own: on the H200 of 2026-11-26 compiling it aborted
    the process (an LLVM assertion under Triton 3.6), which must not end the sweep."""
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as one:
            return one.submit(_peer_ms, job).result()
    except Exception as e:  # noqa: BLE001 - a crashed child: BrokenProcessPool
        return {"mlstm_kernels_error": f"{type(e).__name__}: {str(e)[:200]}"}


def sweep(D, args, result, save, t0, pool):
    tile = lambda L: heuristics.tile_len(L, torch.bfloat16, D, D, device_arch())
    jobs = [(None, None, D, L, args.NH, args.S, args.tile) for L in BASELINE_CHUNKS]
    jobs += [(k, c, D, L, args.NH, args.S, args.tile) for L in args.chunks for k in args.kernels
             for c in candidates(k, D, L, state=L < args.S)]
    t1 = time.time()
    errs = [e for e in pool.map(_warm, jobs) if e]
    result["errors"] += errs
    print(f"D={D}: compiled {len(jobs)} configurations in {time.time() - t1:.0f} s, "
          f"{len(errs)} failed", flush=True)
    for e in errs:
        print("  " + e, flush=True)
    # (the float64 parallel reference holds S x S matrices: long sequences check at 2048)
    result["checks"][D] = check(D, args.NH, min(args.S, CHECK_MAX_S))
    print(f"D={D} parity vs float64 (max err / max |ref|): {result['checks'][D]}", flush=True)
    x = make_inputs(args.B, args.NH, args.S, D, torch.bfloat16)
    dh = torch.randn_like(x["v"])
    heuristics.OVERRIDES.clear()
    for L in BASELINE_CHUNKS:
        t = kernel_times(x, dh, L, True, args.reps)
        result["baselines"].append(dict(D=D, chunk=L, BT=tile(L), ms=t,
                                        kernels_ms=sum(t.values())))
        print(f"D={D} chunk={L} table: " + " ".join(f"{k} {v:.3f}" for k, v in t.items())
              + f" | kernels {sum(t.values()):.3f} ms", flush=True)
    save()
    best_all = {}
    for L in args.chunks:
        BT = tile(L)
        ref = run_pass(x, dh, L, True)
        base = kernel_times(x, dh, L, True, args.reps)
        for kernel in args.kernels:
            if kernel not in base:      # not launched here (pair kernels at one tile a chunk,
                continue                # the scans where one chunk holds the sequence)
            if time.time() - t0 > args.time_limit:
                print("time limit reached", flush=True)
                return False
            rows = []
            for cfg in candidates(kernel, D, L, state=L < args.S):
                heuristics.OVERRIDES.clear()
                heuristics.OVERRIDES[kernel] = cfg
                try:
                    ok = _close(run_pass(x, dh, L, True), ref)
                    ms = kernel_times(x, dh, L, kernel in BWD, args.reps)[kernel]
                    rows.append(dict(cfg, ms=ms, ok=ok))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            heuristics.OVERRIDES.clear()
            good = [r for r in rows if r.get("ok")]
            best = min(good, key=lambda r: r["ms"]) if good else None
            # (ViL's pass: a state between chunks where there are several)
            table = heuristics.launch_params(kernel, D, D, L, torch.bfloat16, device_arch(),
                                             L < args.S)
            result["sweeps"].append(dict(D=D, chunk=L, BT=BT, kernel=kernel, table=table,
                                         table_ms=base[kernel], best=best, rows=rows))
            if best and best["ms"] < base[kernel]:
                best_all[kernel] = {k: best[k] for k in table}
            if best:
                print(f"D={D} chunk={L} {kernel}: table {base[kernel]:.3f} ms -> best "
                      f"{best['ms']:.3f} ms with BK={best['BK']} BV={best['BV']} "
                      f"w={best['num_warps']} st={best['num_stages']} maxnreg={best['maxnreg']}"
                      + (" split" if best.get("split") else "")
                      + (f"; {len(rows) - len(good)} wrong/failed" if len(good) < len(rows)
                         else ""), flush=True)
            save()
        # the whole op (autograd, prologue and epilogue) with the table and with the best
        # configuration of every kernel, and the peer, on the same inputs
        heuristics.OVERRIDES.clear()
        row = dict(D=D, chunk=L, BT=BT, table_ms=full_ms(x, args.reps, chunk=L),
                   tuned=best_all)
        heuristics.OVERRIDES.update(best_all)
        row["tuned_ms"] = full_ms(x, args.reps, chunk=L)
        heuristics.OVERRIDES.clear()
        row.update(_peer_in_child((args.B, args.NH, args.S, D, args.reps)))
        result["full"].append(row)
        print(f"D={D} chunk={L} fwd+bwd op: " + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms")), flush=True)
        save()
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 96, 192])
    ap.add_argument("--chunks", type=int, nargs="+", default=[64],
                    help="chunk lengths to sweep at (table parameters are also timed at "
                         f"{', '.join(map(str, BASELINE_CHUNKS))})")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--NH", type=int, default=4)
    ap.add_argument("--S", type=int, default=784)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kernels", nargs="+", choices=FWD + BWD, default=list(FWD + BWD),
                    help="kernels to sweep (default: all; the pair kernels only at chunks "
                         "of several tiles)")
    ap.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="stop starting new kernels after this many seconds")
    ap.add_argument("--tile", type=int, default=None, choices=heuristics.TUNABLE_TILES,
                    help="positions a tile in chunks of several tiles, for the whole sweep "
                         "(heuristics.TILE; compare tiles first with bench/kernels.py --tile); "
                         "--write-table then records it for the chunks swept")
    ap.add_argument("--results-file", default="tune.json")
    ap.add_argument("--write-table", metavar="FILE",
                    help="also write (or update) a launch table with every configuration that "
                         "beat the built-in one; use it with VIL_KERNELS_LAUNCH_TABLE=FILE")
    args = ap.parse_args(argv)
    heuristics.TILE = args.tile
    t0 = time.time()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (interpreter)"
    result = dict(meta=dict(device=dev, torch=torch.__version__, B=args.B, NH=args.NH,
                            S=args.S, dtype="bfloat16", tile=args.tile),
                  checks={}, baselines=[], sweeps=[], full=[], errors=[])

    def save():
        Path(args.results_file).write_text(json.dumps(result, indent=1))

    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for D in args.dims:
            if time.time() - t0 > 0.7 * args.time_limit:           # no time for another head dim
                print(f"time limit: D={D} not swept", flush=True)
                break
            if not sweep(D, args, result, save, t0, pool):
                break
    save()
    if args.write_table:
        n = write_table(args.write_table, result)
        print(f"{n} entries in {args.write_table}: export {heuristics.TABLE_ENV}="
              f"{args.write_table}", flush=True)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return result


def write_table(path, result):
    """Merge the sweep's winners (faster than the built-in table, outputs checked) into the
    launch-table file at path; returns its number of entries."""
    arch = device_arch()
    entries = heuristics.read_table(path) if os.path.exists(path) else {}
    tile = result["meta"].get("tile")
    for sw in result["sweeps"]:
        if tile and heuristics.tile_applies(tile, sw["chunk"], torch.bfloat16, arch):
            # (the kernels' entries below were swept in these tiles)
            key = heuristics.table_key(heuristics.TILE_ENTRY, sw["D"], sw["D"], sw["chunk"],
                                       torch.bfloat16, arch)
            entries[key] = {"BT": tile}
        best = sw["best"]
        if best and best["ms"] < sw["table_ms"]:
            key = heuristics.table_key(sw["kernel"], sw["D"], sw["D"], sw["chunk"],
                                       torch.bfloat16, arch)
            entries[key] = {k: best[k] for k in sw["table"]}
    Path(path).write_text(json.dumps(dict(device=result["meta"]["device"], entries=entries),
                                      indent=1))
    return len(entries)


if __name__ == "__main__":
    main()
