"""Operator micro-benchmarks: time and peak memory of each mLSTM path at ViL shapes.

    python bench/kernels.py                      # this machine's device, default shapes
    python bench/kernels.py --shapes 8,4,784,96  # B,NH,S,D (repeatable)
    python bench/kernels.py --paths triton --chunk-size 64,256   # chunks of 64, then 256
    python bench/kernels.py --paths triton --chunk-size 1024 --tile 64,128   # tiles of 64, 128
    python bench/kernels.py --paths triton --chunk-size 1024 --flash off,fwd,bwd,on  # flash forms
    python bench/kernels.py --paths triton --set bwd_dqk.BK=128 --set bwd_dqk.num_warps=8
    python bench/kernels.py --paths triton --table builtin,vil-b-wide-sm90   # launch tables
    python bench/kernels.py --results-file bench/results/kernels-cpu.json

On CPU it compares the PyTorch chunkwise path against the parallel form (the published
formulation); on CUDA the Triton kernels against both, PyTorch SDPA attention at the same shape
and NX-AI's mlstm_kernels when it is installed, in bfloat16, with TFLOP/s and fractions of the
roofline (see roofline_fields: on the function's own I/O, and with a chunkwise kernel's state
traffic). Peak memory on CPU is the growth of the process's peak resident set over the
inputs (Linux: /proc/self/clear_refs); on CUDA, torch.cuda.max_memory_allocated over the inputs.
"""

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import vil_kernels  # noqa: E402
from machine import PeakMemory, device_name, kernel_settings  # noqa: E402

CPU_SHAPES = [(8, 4, 196, 96), (8, 4, 784, 96), (8, 4, 196, 192), (8, 4, 784, 192),
              (1, 4, 16384, 96)]
GPU_SHAPES = [(64, 4, S, D) for S in (196, 784, 3136) for D in (96, 192, 384)] + [(1, 4, 16384, 384),
                                                                                  (8, 4, 16384, 96)]
# Datasheet peaks of the roofline: dense bf16 tensor-core TFLOP/s and HBM TB/s, by the first
# key found in torch.cuda.get_device_name (more specific names first).
PEAKS = {"H100 PCIe": (756.0, 2.0), "H100 NVL": (835.0, 3.9), "H100": (989.0, 3.35),
         "H200": (989.0, 4.8), "A100-SXM4-40GB": (312.0, 1.555), "A100": (312.0, 2.039)}
ROOF_CHUNK = 64   # the chunk length of the FLOP count and of the chunkwise traffic floor
# what a triton row may vary (a row holds each that was asked for): its settings
SETTINGS = ("chunk_size", "tile", "flash", "table")
TABLES_DIR = Path(__file__).resolve().parent / "tables"     # candidate launch tables
BUILTIN = "builtin"             # --table's word for the built-in table (no table file)


def device_peaks(name):
    """(TFLOP/s, TB/s) of a CUDA device name, or None when it is not in PEAKS."""
    return next((v for k, v in PEAKS.items() if k in name), None)


# A timed call longer than this runs fewer repetitions (the parallel form at S=3136 takes
# ~0.4 s a forward and backward): the whole GPU list then fits a short device loan.
SLOW_CALL_S = 0.05


# Timed calls run in up to ROUNDS rounds of back-to-back calls (time_call)
ROUNDS = 5


def _clock(device):
    """(start, stop): stop(start()) is the seconds between them, of the device's work on CUDA
    (events on the current stream), of the host's elsewhere."""
    if device.type != "cuda":
        return time.perf_counter, lambda t0: time.perf_counter() - t0

    def start():
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(ev):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return ev.elapsed_time(end) / 1e3
    return start, stop


def time_call(fn, device, warmup, iters):
    """Median seconds a call after ``warmup`` calls (the first compiles). The ``iters`` timed
    calls run as up to ROUNDS rounds of back-to-back calls, a round timed as a whole (on CUDA
    by events: the host enqueues ahead, as in a training loop, so its jitter does not add to a
    GPU-bound call; timed one by one with a sync each, repeats of one configuration moved by
    up to 1.7x on an H200, bench/results/kernels-nvidia-h200-bf16-chunk64-repeat-*-s19.json);
    the median round, per call. Calls over SLOW_CALL_S (after the first): one more warm-up
    and two timed calls."""
    slow = False
    for j in range(warmup):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if j > 0 and time.perf_counter() - t0 > SLOW_CALL_S:    # (the first call compiles)
            slow = True
            break
    rounds, per = (2, 1) if slow else (max(1, min(ROUNDS, iters)), max(1, iters // ROUNDS))
    start, stop = _clock(device)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = start()
        for _ in range(per):
            fn()
        times.append(stop(t0) / per)
    return statistics.median(times)


def mlstm_flops(B, NH, S, DK, DV, L):
    """Matmul FLOPs of the chunkwise forward (intra-chunk causal blocks, chunk states, inter
    outputs); the backward is counted as 2.5 times this, as for attention."""
    intra = 2 * S * L * (DK + DV + 1) / 2          # causal half of QK^T and of SV (plus n)
    states = 2 * S * DK * (DV + 1) * 2             # K^T V into the states, Q C out of them
    return B * NH * (intra + states)


def mlstm_bytes(B, NH, S, DK, DV, L, elem, backward):
    """HBM bytes (io, states) of one pass in ``elem``-byte inputs. io: what any implementation
    reads and writes once (q, k, v, gates, h; with backward also dh in, dq, dk, dv and the gate
    gradients out, and two float32 rows of statistics kept for it). states: the extra traffic
    of a chunkwise kernel that materialises a (DK, DV) state at every chunk boundary, in the
    input dtype: written once and read once in the forward, and with backward the state
    gradients too, each read twice (by the dq/dk and the dv kernels) as is the state."""
    NC = -(-S // L)
    io = (3 * S * DK + S * DV) * elem + 2 * S * elem       # q, k, v, h, i, f
    state = NC * DK * DV * elem
    states = 2 * state
    if backward:
        io += (2 * S * DK + 2 * S * DV) * elem + 2 * S * elem + 2 * S * 4
        states = 6 * state
    return B * NH * io, B * NH * states


def roofline_fields(mode, ms, B, NH, S, D, elem, peaks):
    """TFLOP/s and the fractions of the roofline (attainable time / measured time) of a pass:
    ``roofline`` on the function's own I/O (the classic bound: the compute peak unless memory
    binds first), ``chunkwise_roofline`` with a chunkwise kernel's state traffic added (the
    design of this library and of mlstm_kernels; what a kernel that keeps states on chip
    avoids), and ``compute_peak`` (FLOP/s over the dense peak, often called MFU)."""
    backward = mode != "fwd"
    flops = mlstm_flops(B, NH, S, D, D, ROOF_CHUNK) * (3.5 if backward else 1)
    out = {f"{mode}_tflops": flops / ms / 1e9}
    if peaks:
        tflops, tbs = peaks
        io, states = mlstm_bytes(B, NH, S, D, D, ROOF_CHUNK, elem, backward)
        t_flop = flops / (tflops * 1e12)
        out[f"{mode}_roofline"] = max(t_flop, io / (tbs * 1e12)) * 1e3 / ms
        out[f"{mode}_chunkwise_roofline"] = max(t_flop, (io + states) / (tbs * 1e12)) * 1e3 / ms
        out[f"{mode}_compute_peak"] = t_flop * 1e3 / ms
    return out


def make_inputs(B, NH, S, D, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    x = dict(q=mk(B, NH, S, D), k=mk(B, NH, S, D), v=mk(B, NH, S, D),
             i=mk(B, NH, S), f=mk(B, NH, S) + 3.0)
    for t in x.values():
        t.requires_grad_(requires_grad)
    return x


def parallel_fits(B, NH, S, device):
    """The parallel form holds about eight S x S float32 matrices per head in fwd+bwd."""
    need = 8 * B * NH * S * S * 4
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.8 * avail, need


PATHS = ("triton", "torch-chunkwise", "parallel", "sdpa-attention", "mlstm_kernels-xl_chunk")
CHUNKED = ("triton", "torch-chunkwise")     # the paths --chunk-size sets the chunk of


def candidates(device, dtype, chunk=None):
    """(name, callable(x) -> output) for every path that runs here; chunk: the chunkwise
    paths' chunk_size (None: their default)."""
    paths = []
    if device.type == "cuda":
        paths.append(("triton", lambda x: vil_kernels.mlstm(**x, backend="triton",
                                                            chunk_size=chunk)))
    paths.append(("torch-chunkwise", lambda x: vil_kernels.mlstm(**x, backend="torch",
                                                                 chunk_size=chunk)))
    paths.append(("parallel", lambda x: vil_kernels.mlstm(**x, backend="parallel")))
    if device.type == "cuda":
        paths.append(("sdpa-attention", lambda x: F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], is_causal=True)))
        peer = peers.mlstm_kernels_chunkwise(128)  # optional: when installed
        if peer is not None:
            paths.append(("mlstm_kernels-xl_chunk", lambda x: peer(**x)))
    return paths


def bench_shape(shape, device, dtype, warmup, iters, mem, paths=None, chunks=(None,),
                tiles=(None,), flashes=(None,), tables=(None,)):
    """Rows of one shape: every path, the chunkwise ones once per chunk length in ``chunks``
    (None: their default), the Triton one once per tile of positions in ``tiles`` (None: the
    default; else heuristics.TILE, set for the forward and the backward alike), per setting
    of the flash forms in ``flashes`` (None: the default; else FLASH_SETTINGS' words: which of
    heuristics.FLASH_FORWARD and FLASH_BACKWARD are on) and per launch table in ``tables``
    (None: the process's; else table_words' (name, path, entries): one after the other, so that
    candidate tables and the peer are timed side by side)."""
    B, NH, S, D = shape
    rows = []
    peaks = device_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    runs = [(name, chunk, tile, flash, table, fn) for n, chunk in enumerate(chunks)
            for name, fn in candidates(device, dtype, chunk) if n == 0 or name in CHUNKED
            for tile in (tiles if name == "triton" else (None,))
            for flash in (flashes if name == "triton" else (None,))
            for table in (tables if name == "triton" else (None,))]
    for name, chunk, tile, flash, table, fn in runs:
        if paths and name not in paths:
            continue
        row = dict(path=name, B=B, NH=NH, S=S, D=D, dtype=str(dtype).replace("torch.", ""))
        if chunk and name in CHUNKED:
            row["chunk_size"] = chunk
        if tile:
            row["tile"] = tile
        if flash is not None:
            row["flash"] = flash
        if table is not None:
            row["table"] = table[0]
        with triton_settings(tile, flash), launch_table(table):
            _time_row(row, fn, device, dtype, warmup, iters, mem, peaks)
        rows.append(row)
    return rows


# --flash's words: which flash forms are on, (forward, backward); auto: each where its build
# takes 4 warps (heuristics.flash_wanted)
FLASH_SETTINGS = {"off": (False, False), "fwd": (True, False), "bwd": (False, True),
                  "on": (True, True), "auto": (None, None)}


def flash_words(parser, text):
    """--flash's comma-separated FLASH_SETTINGS words, or the parser's usage error."""
    words = text.split(",")
    if any(w not in FLASH_SETTINGS for w in words):
        parser.error(f"--flash takes words of {', '.join(FLASH_SETTINGS)} (e.g. off,on), got "
                     f"{text!r}")
    return words


def _int_words(parser, text, flag, ok, what):
    """A flag's comma-separated integers, each passing ok, or the parser's usage error."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        parser.error(f"{flag} takes {what}, got {text!r}")
    bad = [v for v in values if not ok(v)]
    if bad:
        parser.error(f"{flag} takes {what}, got {bad[0]}")
    return values


def chunk_words(parser, text):
    """--chunk-size's comma-separated chunk lengths (powers of two >= 16)."""
    return _int_words(parser, text, "--chunk-size", lambda c: c >= 16 and not c & (c - 1),
                      "powers of two >= 16")


def tile_words(parser, text):
    """--tile's comma-separated tiles of positions (heuristics.TUNABLE_TILES: 16, 32, 64, 128)."""
    tiles = _heuristics(parser, "--tile").TUNABLE_TILES
    return _int_words(parser, text, "--tile", lambda t: t in tiles,
                      ", ".join(map(str, tiles[:-1])) + f" or {tiles[-1]}")


@contextlib.contextmanager
def triton_settings(tile, flash):
    """The Triton kernels' tile of positions forced to ``tile`` and their flash forms to
    ``flash`` (a FLASH_SETTINGS word; None: nothing changed; the Triton package is imported only
    otherwise, so this runs where it is not installed)."""
    if tile is None and flash is None:
        yield
        return
    from vil_kernels.triton import heuristics
    was = heuristics.TILE, heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD
    heuristics.TILE = tile
    if flash is not None:
        heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD = FLASH_SETTINGS[flash]
    try:
        yield
    finally:
        heuristics.TILE, heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD = was


def _heuristics(parser, flag):
    """The Triton path's launch heuristics for a flag that sets them, or the parser's usage
    error where the triton package is missing."""
    try:
        from vil_kernels.triton import heuristics
    except ImportError as e:
        parser.error(f"{flag} sets the Triton kernels' launches and needs triton ({e})")
    return heuristics


def table_words(parser, text):
    """--table's comma-separated launch tables as [(name, path, entries)]: BUILTIN (path None,
    no entries: no table file), a file's stem in bench/tables/ or a file's path (name: its
    stem), each read and checked here (heuristics.read_table); or the parser's usage error."""
    heuristics = _heuristics(parser, "--table")
    out = []
    for word in text.split(","):
        if word == BUILTIN:
            out.append((BUILTIN, None, {}))
            continue
        path = Path(word) if Path(word).is_file() else TABLES_DIR / f"{word}.json"
        if not word or not path.is_file():
            stems = ", ".join(sorted(t.stem for t in TABLES_DIR.glob("*.json")))
            parser.error(f"--table takes {BUILTIN}, a launch table file or a stem of "
                         f"bench/tables/ ({stems}), got {word!r}")
        try:
            entries = heuristics.read_table(path)
        except ValueError as e:
            parser.error(f"--table: {e}")
        out.append((path.stem, str(path), entries))
    names = [name for name, _, _ in out]
    if len(set(names)) < len(names):
        parser.error(f"--table names a table twice: {text!r}")
    return out


@contextlib.contextmanager
def launch_table(table):
    """$VIL_KERNELS_LAUNCH_TABLE at ``table``'s path for the block (BUILTIN: unset) and the
    table read again (heuristics.tuned_table), the process's own restored after; None: nothing
    changed (nor the Triton package imported)."""
    if table is None:
        yield
        return
    from vil_kernels.triton import heuristics

    def use(path):
        if path is None:
            os.environ.pop(heuristics.TABLE_ENV, None)
        else:
            os.environ[heuristics.TABLE_ENV] = path
        heuristics.tuned_table(reload=True)

    was = os.environ.get(heuristics.TABLE_ENV)
    use(table[1])
    try:
        yield
    finally:
        use(was)


def launch_overrides(parser, texts):
    """--set's KERNEL.PARAM=VALUE words (bwd_dqk.BK=128, bwd_dqk.maxnreg=None) as
    {kernel: {param: value}} for heuristics.OVERRIDES, or the parser's usage error."""
    heuristics = _heuristics(parser, "--set")
    out = {}
    for text in texts:
        m = re.fullmatch(r"(\w+)\.(\w+)=(\w+)", text)
        if not m or m[1] not in heuristics.KERNELS or m[2] not in heuristics._PARAMS:
            parser.error(f"--set takes KERNEL.PARAM=VALUE, a kernel of "
                         f"{', '.join(sorted(heuristics.KERNELS))} and a parameter of "
                         f"{', '.join(sorted(heuristics._PARAMS))}, got {text!r}")
        value = {"None": None, "True": True, "False": False}.get(m[3], m[3])
        if isinstance(value, str):
            if not value.isdigit():
                parser.error(f"--set {text!r}: the value is an integer, None, True or False")
            value = int(value)
        out.setdefault(m[1], {})[m[2]] = value
    return out


@contextlib.contextmanager
def forced_params(overrides):
    """Launch parameters forced over the table's for the block (heuristics.OVERRIDES, as
    bench/tune.py forces its candidates); nothing imported or changed when there are none."""
    if not overrides:
        yield
        return
    from vil_kernels.triton import heuristics
    was = {k: dict(v) for k, v in heuristics.OVERRIDES.items()}
    for kernel, params in overrides.items():
        heuristics.OVERRIDES.setdefault(kernel, {}).update(params)
    try:
        yield
    finally:
        heuristics.OVERRIDES.clear()
        heuristics.OVERRIDES.update(was)


def _time_row(row, fn, device, dtype, warmup, iters, mem, peaks):
    """Forward and forward+backward time and peak memory of one path into row."""
    B, NH, S, D, name = row["B"], row["NH"], row["S"], row["D"], row["path"]
    if name == "parallel":
        fits, need = parallel_fits(B, NH, S, device)
        if not fits:
            row["note"] = f"cannot run: needs ~{need / 2**30:.0f} GiB of S x S matrices"
            return
    for mode in ("fwd", "fwd+bwd"):
        x = make_inputs(B, NH, S, D, dtype, device, requires_grad=mode != "fwd")

        def call():
            if mode == "fwd":
                with torch.no_grad():
                    fn(x)
            else:
                fn(x).float().sum().backward()

        try:
            t = time_call(call, device, warmup, iters)
            row[f"{mode}_ms"] = t * 1e3
            mem.start()
            call()
            row[f"{mode}_peak_mib"] = (mem.stop() or 0) / 2**20
            if device.type == "cuda":
                row.update(roofline_fields(mode, t * 1e3, B, NH, S, D, dtype.itemsize, peaks))
        except (RuntimeError, MemoryError) as e:
            row["note"] = f"failed: {str(e).splitlines()[0][:80]}"


def print_table(rows, cols=None):
    cols = cols or ["path", "chunk_size", "tile", "flash", "table", "B", "NH", "S", "D", "fwd_ms",
                    "fwd+bwd_ms", "fwd_peak_mib", "fwd+bwd_peak_mib", "fwd+bwd_tflops",
                    "fwd+bwd_roofline", "fwd+bwd_chunkwise_roofline", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: (f"{v:.1f}" if v >= 0.95 else f"{v:.3f}") if isinstance(v, float) else str(v)
    table = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[j]) for t in table)) for j, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def chunk_choice(rows):
    """With several chunk lengths (or tiles, flash settings or launch tables): per shape and
    path, each pass's fastest chunk length (and tile, flash setting and table) and its time
    against the first given (rows of bench_shape; [] with one of each)."""
    out = []
    varied = [r for r in rows if any(k in r for k in SETTINGS)]
    shape = lambda r: (r["path"], r["B"], r["NH"], r["S"], r["D"])  # noqa: E731
    for key in sorted({shape(r) for r in varied}, key=lambda k: (k[0], k[3], k[4], k[1])):
        runs = [r for r in varied if shape(r) == key]
        if len(runs) < 2:
            continue
        for mode in ("fwd", "fwd+bwd"):
            timed = [r for r in runs if f"{mode}_ms" in r]
            if not timed:
                continue
            best = min(timed, key=lambda r: r[f"{mode}_ms"])
            first = runs[0].get(f"{mode}_ms")
            row = dict(path=key[0], B=key[1], NH=key[2], S=key[3], D=key[4], mode=mode,
                       best_chunk=best.get("chunk_size"), best_ms=best[f"{mode}_ms"],
                       first_chunk=runs[0].get("chunk_size"), first_ms=first,
                       speedup=first / best[f"{mode}_ms"] if first else None)
            for setting in SETTINGS[1:]:
                if any(setting in r for r in runs):
                    row.update({f"first_{setting}": runs[0].get(setting),
                                f"best_{setting}": best.get(setting)})
            out.append(row)
    return out


# Issue 3's goals at ViL-B's shape in 16-bit inputs, set on an H100: fwd+bwd at least
# GOAL_SPEEDUP times faster than mlstm_kernels' xl_chunk, and at least GOAL_ROOFLINE of the roofline
GOAL_SHAPE = (64, 4, 784, 384)
GOAL_SPEEDUP, GOAL_ROOFLINE = 1.3, 0.5


def goal_report(rows, device):
    """Issue 3's goals against the triton rows at GOAL_SHAPE (each chunk, tile, flash setting
    and launch table timed): fwd+bwd ms, the speed-up over mlstm_kernels' xl_chunk when it
    ran, and both fractions of the roofline; one dict a row, each goal's verdict beside it
    ([] without such a row, e.g. on CPU, where there is no roofline)."""
    at_goal = [r for r in rows if (r["B"], r["NH"], r["S"], r["D"]) == GOAL_SHAPE
               and r["dtype"] in ("bfloat16", "float16") and "fwd+bwd_roofline" in r]
    peer = next((r.get("fwd+bwd_ms") for r in at_goal if r["path"] == "mlstm_kernels-xl_chunk"),
                None)
    out = []
    for r in at_goal:
        if r["path"] != "triton" or "fwd+bwd_ms" not in r:
            continue
        g = dict(device=device, **{k: r[k] for k in SETTINGS if k in r},
                 fwd_bwd_ms=r["fwd+bwd_ms"], roofline=r["fwd+bwd_roofline"],
                 chunkwise_roofline=r["fwd+bwd_chunkwise_roofline"],
                 chunkwise_roofline_met=r["fwd+bwd_chunkwise_roofline"] >= GOAL_ROOFLINE,
                 roofline_met=r["fwd+bwd_roofline"] >= GOAL_ROOFLINE)
        if peer:
            speedup = peer / r["fwd+bwd_ms"]
            g.update(speedup=speedup, speedup_met=speedup >= GOAL_SPEEDUP)
        out.append(g)
    return out


def print_goals(goals):
    if not goals:
        return
    B, NH, S, D = GOAL_SHAPE
    yes = lambda ok: "met" if ok else "not met"  # noqa: E731
    print(f"\n# issue 3's goals at ViL-B's shape (B={B}, NH={NH}, S={S}, D={D}), set on an H100"
          f"; this is {goals[0]['device']}")
    for g in goals:
        setting = ", ".join(f"{k} {g[k]}" for k in SETTINGS if k in g)
        speed = (f"{g['speedup']:.2f}x mlstm_kernels (goal {GOAL_SPEEDUP}x: "
                 f"{yes(g['speedup_met'])})" if "speedup" in g else "mlstm_kernels not timed")
        print(f"triton{' (' + setting + ')' if setting else ''}: fwd+bwd {g['fwd_bwd_ms']:.3f} ms"
              f", {speed}, {g['chunkwise_roofline']:.0%} of the chunkwise roofline (goal "
              f"{GOAL_ROOFLINE:.0%}: {yes(g['chunkwise_roofline_met'])}), {g['roofline']:.0%} "
              f"of the classic one ({yes(g['roofline_met'])})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="input dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--shapes", action="append", default=None, metavar="B,NH,S,D")
    p.add_argument("--num-warm-iter", type=int, default=None,
                   help="untimed calls first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--num-bench-iter", type=int, default=None,
                   help="timed calls, median taken (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--paths", default=None, metavar="NAME,...",
                   help="only these paths (default: every one that runs here), e.g. "
                        "triton,mlstm_kernels-xl_chunk")
    p.add_argument("--chunk-size", default=None, metavar="N[,N...]",
                   help="chunk length of the triton and torch-chunkwise paths (powers of two "
                        ">= 16; several: a row for each; default: theirs). The state is kept "
                        "every N positions: longer chunks move fewer states for more "
                        "intra-chunk products")
    p.add_argument("--tile", default=None, metavar="N[,N...]",
                   help="positions a tile of the triton path's kernels in chunks of several "
                        "tiles (16, 32, 64 or 128; several: a row for each; default: the "
                        "table's, 64), where it applies: chunks of two such tiles or more, "
                        "16-bit inputs, Hopper (heuristics.tuned_tile). Tiles of 128 run 8 "
                        "warps; not a default until timed")
    p.add_argument("--flash", default=None, metavar="off|fwd|bwd|on|auto[,...]",
                   help="the triton path's flash forms, FlashAttention's one pipelined loop "
                        "over key tiles a row tile (one chunk without a carried state): "
                        "fwd the forward's (heuristics.FLASH_FORWARD; with states, every V "
                        "column of a row tile in one outputs program), bwd the backward's "
                        "(FLASH_BACKWARD: the pair products and dq in one kernel), on both, "
                        "off neither, auto each where its build takes 4 warps; several: a "
                        "row for each; default: the environment's setting (off unless set)")
    p.add_argument("--table", default=None, metavar="builtin|STEM|FILE[,...]",
                   help="the triton path's launch table: builtin (none), a stem of bench/tables/ "
                        "(e.g. vil-b-wide-sm90) or a table file; several: a row for each, "
                        "timed one after the other in this process, the other paths after "
                        "them (so every table's speed-up over the peer is read off one run); "
                        "default: $VIL_KERNELS_LAUNCH_TABLE as set")
    p.add_argument("--set", action="append", default=[], metavar="KERNEL.PARAM=VALUE",
                   help="a Triton kernel's launch parameter forced over the table's for every "
                        "row (bench/tune.py's names, e.g. bwd_dqk.BK=128 bwd_dqk.num_warps=8 "
                        "bwd_dqk.maxnreg=None); repeatable")
    p.add_argument("--results-file", default=None)
    args = p.parse_args(argv)
    args.set = launch_overrides(p, args.set) if args.set else {}
    if args.flash is not None:
        args.flash = flash_words(p, args.flash)
    if args.tile is not None:
        args.tile = tile_words(p, args.tile)
    if args.table is not None:
        args.table = table_words(p, args.table)
    if args.chunk_size is not None:
        args.chunk_size = chunk_words(p, args.chunk_size)
    args.paths = set(args.paths.split(",")) if args.paths else None
    if args.paths and args.paths - set(PATHS):
        p.error(f"--paths: unknown {sorted(args.paths - set(PATHS))}; known: {', '.join(PATHS)}")
    try:
        args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else None
    except ValueError:
        p.error("--shapes takes B,NH,S,D as four integers")
    if args.shapes and any(len(s) != 4 for s in args.shapes):
        p.error("--shapes takes B,NH,S,D as four integers")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    cuda = device.type == "cuda"
    warm = args.num_warm_iter if args.num_warm_iter is not None else (3 if cuda else 1)
    iters = args.num_bench_iter if args.num_bench_iter is not None else (10 if cuda else 3)
    mem = PeakMemory(device)
    settings = kernel_settings()
    print(f"# device: {device_name(device)} | torch {torch.__version__} | dtype {dtype}"
          + "".join(f" | {k}={v}" for k, v in settings["env"].items()), flush=True)
    meta = dict(device=device_name(device), torch=torch.__version__, dtype=str(dtype),
                warmup=warm, iters=iters, chunk_size=args.chunk_size, tile=args.tile,
                flash=args.flash, launch_overrides=args.set, settings=settings,
                tables=args.table and {name: entries for name, _, entries in args.table})
    rows = []
    for shape in shapes:
        with forced_params(args.set):
            rows += bench_shape(shape, device, dtype, warm, iters, mem, args.paths,
                                args.chunk_size or (None,), args.tile or (None,),
                                args.flash or (None,), args.table or (None,))
        print(f"  done {shape}", file=sys.stderr, flush=True)
        if args.results_file:                  # after every shape: a run cut short keeps them
            Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_file).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_table(rows)
    choice = chunk_choice(rows)
    if choice:
        print("\n# fastest chunk length (and tile, flash form, table) a shape and pass (speed-up "
              "over the first one given)")
        print_table(choice, ["path", "B", "NH", "S", "D", "mode", "first_chunk", "first_tile",
                             "first_flash", "first_table", "first_ms", "best_chunk",
                             "best_tile", "best_flash", "best_table", "best_ms", "speedup"])
    goals = goal_report(rows, meta["device"])
    print_goals(goals)
    if args.results_file and (choice or goals):
        extra = {k: v for k, v in (("chunk_choice", choice), ("goals", goals)) if v}
        Path(args.results_file).write_text(json.dumps(dict(meta=meta, rows=rows, **extra),
                                                      indent=1))
    return rows


if __name__ == "__main__":
    main()
