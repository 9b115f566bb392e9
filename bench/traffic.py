"""What each Triton kernel of one mLSTM forward and backward moves and computes, counted.

    python bench/traffic.py                                   # ViL-B: B=64, NH=4, S=784, D=384
    python bench/traffic.py --shape 64,4,784,384 --chunk-size 64,1024 --tile 64,128
    python bench/traffic.py --profile bench/results/profile-x.json --row triton-chunk1024

No GPU needed: the kernels run under Triton's interpreter on the CPU, for one head, with the
launch parameters a GPU of --arch would take (the interpreter runs the same programs over the
same grid), and every load, store and tensor-core dot is counted:

- loaded / stored: the bytes of the elements a program's loads and stores touch (masked-off
  lanes excluded), summed over all programs. Every program's own loads count, repeats
  included: that is what the SMs ask of L2 when nothing is served from L1 (the kernels' tiles
  go through shared memory by cp.async, which bypasses L1). HBM traffic is lower where L2
  holds what several programs read.
- uniq: the bytes of the distinct addresses each launch loads and stores: its compulsory
  traffic to HBM (a floor, had L2 kept nothing from the launch before); loaded + stored over
  uniq is how often, on average, each byte a launch touches is asked of L2.
- GFLOP: 2 M N K of every tl.dot (the tensor-core work, the rest is elementwise).
- FLOP/B: GFLOP over the bytes loaded, the arithmetic intensity against L2.

Every head does the same work, so the counts of one head are multiplied by B x NH. With
--bandwidth TB/s each row also gets the time that moving its bytes takes at that bandwidth (a
floor for a kernel bound by it). With --profile (a bench/profile_op.py results file, measured
on a GPU at the same shape and settings) each kernel gets its measured ms and the bandwidth and
TFLOP/s that implies, and uniq/s: the HBM bandwidth its compulsory bytes alone took (a
kernel whose TB/s is near L2's rate while uniq/s is well below HBM's is bound by what it asks
of L2, not by HBM). The counts are the kernels' own, not a model: a change to a kernel or to
the launch table changes them.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import (chunk_words, flash_words, forced_params, launch_overrides,  # noqa: E402
                     tile_words, triton_settings)
from machine import kernel_settings  # noqa: E402
import vil_kernels  # noqa: E402
from vil_kernels.triton import heuristics  # noqa: E402

FIELDS = ("launches", "programs", "loaded", "stored", "flops", "unique")


class Counter:
    """Per-kernel counts of what the interpreter's programs load, store and multiply, while
    active (a context manager: the interpreter's builder is patched inside only). unique:
    the bytes of the distinct addresses a launch loads or stores (its compulsory traffic to
    DRAM, had L2 kept nothing from an earlier launch and lost nothing it fetched)."""

    def __init__(self):
        self.kernels = {}
        self._current = None
        self._addresses = []          # the current launch's (addresses, bytes an element)

    def _row(self):
        return self.kernels.setdefault(self._current or "(outside a kernel)",
                                       dict.fromkeys(FIELDS, 0))

    @contextlib.contextmanager
    def active(self):
        from triton.runtime import interpreter as it
        builder, grid = it.InterpreterBuilder, it.GridExecutor
        saved = (builder.create_masked_load, builder.create_masked_store, builder.create_dot,
                 grid.__call__)
        load, store, dot, call = saved
        counter = self

        def nbytes(ptrs, mask):
            width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            live = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._addresses.append((ptrs.data[live].astype(np.uint64), width))
            return int(np.count_nonzero(live)) * width

        def create_masked_load(self, ptrs, mask, *args):
            counter._row()["loaded"] += nbytes(ptrs, mask)
            return load(self, ptrs, mask, *args)

        def create_masked_store(self, ptrs, value, mask, *args):
            counter._row()["stored"] += nbytes(ptrs, mask)
            return store(self, ptrs, value, mask, *args)

        def create_dot(self, a, b, d, *args):
            *batch, M, K = a.data.shape
            counter._row()["flops"] += 2 * int(np.prod(batch, dtype=np.int64)) * M * K * \
                b.data.shape[-1]
            return dot(self, a, b, d, *args)

        def __call__(self, *args, **kwargs):
            counter._current = self.fn.__name__
            row = counter._row()
            row["launches"] += 1
            grid = self.grid(kwargs) if callable(self.grid) else self.grid
            row["programs"] += int(np.prod(tuple(grid), dtype=np.int64))
            try:
                return call(self, *args, **kwargs)
            finally:
                counter._current = None
                row["unique"] += counter._unique_bytes()

        (builder.create_masked_load, builder.create_masked_store, builder.create_dot,
         grid.__call__) = create_masked_load, create_masked_store, create_dot, __call__
        self._addresses = []
        try:
            yield self
        finally:
            (builder.create_masked_load, builder.create_masked_store, builder.create_dot,
             grid.__call__) = saved

    def _unique_bytes(self):
        """Bytes of the distinct addresses of the launch that just ended (then forgotten)."""
        by_width = {}
        for addresses, width in self._addresses:
            by_width.setdefault(width, []).append(addresses)
        self._addresses = []
        return sum(len(np.unique(np.concatenate(a))) * w for w, a in by_width.items())


@contextlib.contextmanager
def as_arch(arch):
    """The launch parameters of sm_<arch> (90: Hopper, 80: Ampere) for the interpreter's
    launches, which otherwise take the interpreter's own (arch 0: Hopper's table)."""
    saved = heuristics.device_arch
    heuristics.device_arch = lambda device: arch
    heuristics._cache.clear()
    try:
        yield
    finally:
        heuristics.device_arch = saved
        heuristics._cache.clear()


def count(S, DK, DV, dtype=torch.bfloat16, chunk=None, tile=None, flash=None, arch=90,
          backward=True, reverse=False, overrides=None, seed=0):
    """{kernel: {launches, programs, loaded, stored, flops}} of one head's forward (and
    backward: the loss is (h * w).sum() with a fixed w) through the Triton backend;
    overrides: {kernel: {param: value}} over the launch table (heuristics.OVERRIDES)."""
    from vil_kernels._triton_runtime import INTERPRETED
    if not INTERPRETED:
        raise RuntimeError("bench/traffic.py counts under Triton's interpreter: run it as a "
                           "script, or set TRITON_INTERPRET=1 before triton is imported")
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)           # noqa: E731
    x = dict(q=mk(1, 1, S, DK), k=mk(1, 1, S, DK), v=mk(1, 1, S, DV), i=mk(1, 1, S),
             f=(mk(1, 1, S).float() + 3).to(dtype))
    w = mk(1, 1, S, DV)
    for t in x.values():
        t.requires_grad_(backward)
    counter = Counter()
    with (as_arch(arch), triton_settings(tile, flash), forced_params(overrides),
          counter.active()):
        h = vil_kernels.mlstm(**x, chunk_size=chunk, reverse=reverse, backend="triton")
        if backward:
            (h * w).sum().backward()
    return counter.kernels


def table(kernels, heads, bandwidth=None, measured=None):
    """Rows for printing and saving: the counts times heads, in GB and GFLOP; with bandwidth
    (TB/s) the ms its loads and stores take at it; with measured ({kernel: ms}) the ms and the
    TB/s and TFLOP/s they imply."""
    rows = []
    for name, c in kernels.items():
        r = dict(kernel=name, launches=c["launches"], programs=c["programs"] * heads,
                 loaded_gb=c["loaded"] * heads / 1e9, stored_gb=c["stored"] * heads / 1e9,
                 gflop=c["flops"] * heads / 1e9, unique_gb=c["unique"] * heads / 1e9)
        r["flop_per_byte"] = r["gflop"] / r["loaded_gb"] if r["loaded_gb"] else 0.
        moved = r["loaded_gb"] + r["stored_gb"]
        if bandwidth:
            r["floor_ms"] = moved / bandwidth
        if measured is not None and name in measured:
            r["ms"] = measured[name]
            r["tb_per_s"] = moved / r["ms"]
            r["unique_tb_per_s"] = r["unique_gb"] / r["ms"]
            r["tflop_per_s"] = r["gflop"] / r["ms"]
        rows.append(r)
    rows.sort(key=lambda r: -(r["loaded_gb"] + r["stored_gb"]))
    total = dict(kernel="total", launches=sum(r["launches"] for r in rows),
                 programs=sum(r["programs"] for r in rows))
    for f in ("loaded_gb", "stored_gb", "gflop", "unique_gb", "floor_ms", "ms"):
        if any(f in r for r in rows):
            total[f] = sum(r.get(f, 0.) for r in rows)
    total["flop_per_byte"] = total["gflop"] / total["loaded_gb"] if total["loaded_gb"] else 0.
    if "ms" in total and total["ms"]:
        total["tb_per_s"] = (total["loaded_gb"] + total["stored_gb"]) / total["ms"]
        total["unique_tb_per_s"] = total["unique_gb"] / total["ms"]
        total["tflop_per_s"] = total["gflop"] / total["ms"]
    return rows + [total]


COLUMNS = (("kernel", "{:<26}", "kernel"), ("launches", "{:>3}", "n"),
           ("programs", "{:>9,}", "programs"), ("loaded_gb", "{:>9.3f}", "load GB"),
           ("stored_gb", "{:>9.3f}", "store GB"), ("unique_gb", "{:>9.3f}", "uniq GB"),
           ("gflop", "{:>8.1f}", "GFLOP"),
           ("flop_per_byte", "{:>6.1f}", "FLOP/B"), ("floor_ms", "{:>8.3f}", "floor ms"),
           ("ms", "{:>8.3f}", "meas ms"), ("tb_per_s", "{:>6.2f}", "TB/s"),
           ("unique_tb_per_s", "{:>6.2f}", "uniq/s"),
           ("tflop_per_s", "{:>7.1f}", "TFLOP/s"))


def print_table(rows):
    """The rows as a table; bytes in MB where the whole is under a GB (small shapes)."""
    mb = rows[-1]["loaded_gb"] < 1
    scale = {"loaded_gb": 1e3, "stored_gb": 1e3, "unique_gb": 1e3} if mb else {}
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    width = lambda k, fmt: 26 if k == "kernel" else len(fmt.format(0))      # noqa: E731
    head = lambda h: h.replace("GB", "MB") if mb else h                     # noqa: E731
    print("  ".join(f"{head(h):<{width(k, fmt)}}" if k == "kernel"
                    else f"{head(h):>{width(k, fmt)}}" for k, fmt, h in cols))
    for r in rows:
        print("  ".join(fmt.format(r[k] * scale.get(k, 1)) if k in r
                        else " " * width(k, fmt) for k, fmt, _ in cols))


def measured_kernels(path, row_name):
    """{kernel: ms} of one row of a bench/profile_op.py results file."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    names = [r["path"] for r in rows]
    if row_name is None:
        row_name = names[0]
    if row_name not in names:
        raise SystemExit(f"--row {row_name!r} is not in {path}: it has {names}")
    return next(r for r in rows if r["path"] == row_name)["kernels"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="64,4,784,384", help="B,NH,S,D (or B,NH,S,DK,DV)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90),
                    help="whose launch parameters the kernels take (default: Hopper's)")
    ap.add_argument("--chunk-size", default=None, metavar="L[,L...]",
                    help="chunk lengths, a table each (default: the op's own choice)")
    ap.add_argument("--tile", default=None, metavar="N[,N...]",
                    help="tiles of positions in chunks of several tiles (bench/kernels.py's)")
    ap.add_argument("--flash", default=None, metavar="off|fwd|bwd|on|auto[,...]",
                    help="the flash forms (bench/kernels.py --flash)")
    ap.add_argument("--set", action="append", default=[], metavar="KERNEL.PARAM=VALUE",
                    help="a launch parameter over the table's (bench/tune.py's names: "
                         "bwd_dqk.BK=128, bwd_dqk.num_warps=8); repeatable")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=None, metavar="TB/s",
                    help="add each kernel's time to move its bytes at this bandwidth")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="a bench/profile_op.py results file measured at this shape: adds "
                         "each kernel's measured ms, TB/s and TFLOP/s")
    ap.add_argument("--row", default=None, help="the profile's row (default: its first)")
    ap.add_argument("--results-file", default=None)
    args = ap.parse_args(argv)
    dims = [int(s) for s in args.shape.split(",")]
    if len(dims) not in (4, 5):
        ap.error("--shape takes B,NH,S,D or B,NH,S,DK,DV")
    B, NH, S, DK = dims[:4]
    DV = dims[4] if len(dims) == 5 else DK
    chunks = [None] if args.chunk_size is None else chunk_words(ap, args.chunk_size)
    tiles = [None] if args.tile is None else tile_words(ap, args.tile)
    flashes = [None] if args.flash is None else flash_words(ap, args.flash)
    measured = measured_kernels(args.profile, args.row) if args.profile else None
    dtype = getattr(torch, args.dtype)
    overrides = launch_overrides(ap, args.set) if args.set else {}
    settings = kernel_settings()        # (a launch table's sm_90 keys apply here: as_arch)
    out = []
    for chunk in chunks:
        for tile in tiles:
            for flash in flashes:
                kernels = count(S, DK, DV, dtype, chunk, tile, flash, args.arch,
                                backward=not args.forward_only, reverse=args.reverse,
                                overrides=overrides)
                rows = table(kernels, B * NH, args.bandwidth, measured)
                L = heuristics.chunk_len(S, DK, DV, dtype, args.arch, chunk)
                with triton_settings(tile, flash), as_arch(args.arch):
                    BT = heuristics.tile_len(L, dtype, DK, DV, args.arch)
                setting = dict(chunk=L, tile=BT, flash=flash)
                print(f"\nB={B} NH={NH} S={S} DK={DK} DV={DV} {args.dtype} sm_{args.arch}: "
                      f"chunk {L}, tile {BT}" + (f", flash {flash}" if flash else "")
                      + (", forward only" if args.forward_only else ", forward and backward")
                      + "".join(f", {k} {v}" for k, v in overrides.items())
                      + "".join(f", {k}={v}" for k, v in settings["env"].items()))
                print_table(rows)
                out.append(dict(setting, rows=rows))
    if args.results_file:
        meta = dict(shape=dict(B=B, NH=NH, S=S, DK=DK, DV=DV), dtype=args.dtype,
                    arch=args.arch, backward=not args.forward_only, reverse=args.reverse,
                    bandwidth=args.bandwidth, profile=args.profile, row=args.row,
                    overrides=overrides, settings=settings)
        Path(args.results_file).write_text(json.dumps(dict(meta=meta, tables=out), indent=1))
    return out


if __name__ == "__main__":
    main()
