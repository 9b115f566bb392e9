"""How fast is ViL with vil_kernels, against the published formulation and what people pick instead?

    python bench/throughput.py --resolution 448
    python bench/throughput.py --model vil2-small --batch-size 128 --bench train
    python bench/throughput.py --sweep 224,448,768,1024 --results-file bench/results/sweep.json

Measures the machine's device (CUDA if present, else the CPU). Defaults: on a GPU ViL-T, ViL-S and
ViL-B in bfloat16 (autocast), batch 256 (halved on out-of-memory); on a CPU ViL-T in float32,
batch 2, a run of a few minutes. For each model, one row per way of running it:

  ours          ViL on vil_kernels (mlstm_backend="auto": the Triton kernels on CUDA, the
                chunkwise PyTorch path on a CPU)
  parallel      the same model with the published formulation of the cell, the quadratic
                parallel form (mlstm_backend="parallel")
  deit          the DeiT (ViT) of the same size on F.scaled_dot_product_attention
                (timm's when importable, else bench/peers.py)
  mlstm_kernels the same ViL with NX-AI's mlstm_kernels chunkwise kernel as its cell (only when
                that package is installed)

and per row: inference images/s (forward, no grad), training images/s (forward, cross-entropy,
backward, AdamW step), peak memory, tokens, batch, forward GFLOPs per image, and the ratios of
throughput against the "ours" row. Flags follow timm's benchmark.py.

Peak memory, measured on one more step after the timed ones: on CUDA,
torch.cuda.max_memory_allocated() (everything allocated: weights, gradients, optimizer state,
activations, workspaces). On a CPU (Linux), the growth of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs) over the resident set just before that step: activations and
temporaries, without the weights and optimizer state that exist before it. Measuring it makes a
CPU step slower (large blocks come straight from the OS), hence the separate step.

GFLOPs (forward, per image, multiply-add = 2 FLOPs): torch.utils.flop_counter.FlopCounterMode
for every op but the mLSTM cell and attention, plus their analytic counts: attention
4 S^2 D per layer; the mLSTM cell as its chunkwise form computes it (chunks of 64:
causal intra-chunk Q K^T and S V blocks, states in and out), and as the published parallel form
computes it (full S x S: 2 S^2 (2 DH + 1) per head) for the "parallel" row.
"""

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import vil_kernels  # noqa: E402
import peers  # noqa: E402
from machine import (ALLOCATOR_NOTE, PeakMemory, device_name, device_slug,  # noqa: E402,F401
                     kernel_settings, versions)

PATCH = 16
# ViL names (and short aliases) -> (vil name, DeiT peer, short label)
VIL_MODELS = {
    "vil2-tiny": ("vil2-tiny", "deit-tiny", "ViL-T"),
    "vil2-tiny-e400": ("vil2-tiny-e400", "deit-tiny", "ViL-T"),
    "vil2-small": ("vil2-small", "deit-small", "ViL-S"),
    "vil2-base": ("vil2-base", "deit-base", "ViL-B"),
    "vil2-large": ("vil2-large", "vit-large", "ViL-L"),
    # A tiny configuration for the test suite (dim 32, one block pair).
    "vil2-test": ("vil2-test", "deit-test", "ViL-test"),
}
ALIASES = {"vil-t": "vil2-tiny", "vil-s": "vil2-small", "vil-b": "vil2-base", "vil-l": "vil2-large"}
TEST_CONFIG = dict(dim=32, depth=1, patch_size=PATCH)
ROW_KINDS = ("ours", "parallel", "deit", "mlstm_kernels")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Arguments

def _csv_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser():
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Throughput of ViL on vil_kernels against the published formulation, a DeiT "
                    "peer and mlstm_kernels, on this machine's device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models: " + ", ".join(list(VIL_MODELS)[:-1] + list(ALIASES)))
    p.add_argument("--model", "-m", action="append", default=None, metavar="NAME",
                   help="ViL model(s), repeatable or comma-separated (default: vil2-tiny on CPU; "
                        "vil2-tiny,vil2-small,vil2-base on GPU)")
    p.add_argument("--resolution", "--img-size", type=int, default=224, dest="resolution",
                   help="image side in pixels, a multiple of the patch size 16 (default 224)")
    p.add_argument("--sweep", type=str, default=None, metavar="R1,R2,...",
                   help="run every resolution in the list (e.g. 224,448,768,1024) and plot "
                        "images/s and memory against resolution (PNG next to --results-file)")
    p.add_argument("--batch-size", "-b", type=int, default=None,
                   help="images per step (default: 256 on GPU, 2 on CPU); halved on out-of-memory")
    p.add_argument("--dtype", "--precision", type=str, default=None, dest="dtype",
                   choices=sorted(DTYPES),
                   help="compute precision (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="half precision through torch.autocast with float32 weights (default); "
                        "--no-amp casts the model and inputs to --dtype instead")
    p.add_argument("--bench", choices=("inference", "train", "both"), default="both")
    p.add_argument("--recompute-states", action="store_true",
                   help="our ViL rows with mlstm_recompute_states=True (the cells recompute "
                        "their chunk states in the backward: training memory for time)")
    p.add_argument("--mlstm-chunk-size", type=int, default=None, metavar="N",
                   help="our ViL rows with mlstm_chunk_size=N (a power of two >= 16: the state "
                        "kept every N positions; default: the operator's choice)")
    p.add_argument("--rows", type=str, default=",".join(ROW_KINDS),
                   help=f"which rows per model, comma-separated from {','.join(ROW_KINDS)}")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile every model (with BACKEND, default inductor; e.g. "
                        "aot_eager to check tracing without code generation)")
    from vil.train import COMPILE_MODES
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="CPU only. tuned (default): while timing, glibc malloc keeps the memory "
                        "it frees, as jemalloc or tcmalloc do, and peak memory is measured; "
                        "default: glibc's defaults untouched, so large temporaries page-fault "
                        "in every step as in an untuned process (memory not measured)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the rows of a model round-robin, one step each in turn, and report "
                        "medians, so that load from other processes hits every row alike "
                        "(default: on for CPU, off for GPU, where rows run one after the other "
                        "with out-of-memory retries)")
    p.add_argument("--device", type=str, default=None,
                   help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--num-warm-iter", type=int, default=None,
                   help="warm-up steps per measurement (default: 10 on GPU, 1 on CPU)")
    p.add_argument("--num-bench-iter", type=int, default=None,
                   help="timed steps per measurement (default: 40 on GPU, 2 on CPU)")
    p.add_argument("--results-file", type=str, default=None,
                   help="write the results: .json (header and rows) or .csv (rows)")
    p.add_argument("--plot-file", type=str, default=None,
                   help="PNG of a --sweep (default: --results-file with .png, or "
                        "bench/results/sweep-<device>.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    # device
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine "
                     f"(torch {torch.__version__}); use --device cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are supported")
    args.device = device
    gpu = device.type == "cuda"
    n = args.mlstm_chunk_size
    if n is not None and (n < 16 or n & (n - 1)):
        parser.error(f"--mlstm-chunk-size takes a power of two >= 16, got {n}")

    # models
    names = []
    for entry in args.model or (["vil2-tiny,vil2-small,vil2-base"] if gpu else ["vil2-tiny"]):
        for name in _csv_list(entry):
            key = ALIASES.get(name.lower(), name.lower())
            if key not in VIL_MODELS:
                parser.error(f"unknown model {name!r}; choose from "
                             f"{', '.join(list(VIL_MODELS)[:-1] + list(ALIASES))}")
            if key not in names:
                names.append(key)
    args.models = names

    # resolutions
    if args.sweep:
        try:
            args.resolutions = [int(r) for r in _csv_list(args.sweep)]
        except ValueError:
            parser.error(f"--sweep {args.sweep!r}: expected comma-separated integers")
    else:
        args.resolutions = [args.resolution]
    for r in args.resolutions:
        if r <= 0 or r % PATCH:
            parser.error(f"resolution {r} is not a positive multiple of the patch size {PATCH} "
                         f"(try {max(PATCH, round(r / PATCH) * PATCH)})")

    # rows
    args.row_kinds = _csv_list(args.rows)
    bad = [r for r in args.row_kinds if r not in ROW_KINDS]
    if bad or not args.row_kinds:
        parser.error(f"--rows: unknown {bad}; choose from {','.join(ROW_KINDS)}")

    # precision
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.dtype == torch.float32:
        args.amp = False
    _check_dtype(parser, device, args.dtype, args.amp)

    # sizes
    if args.batch_size is None:
        args.batch_size = 256 if gpu else 2
    if args.interleave is None:
        args.interleave = not gpu
    if args.num_warm_iter is None:
        args.num_warm_iter = 10 if gpu else 1
    if args.num_bench_iter is None:
        args.num_bench_iter = 40 if gpu else 2
    if args.batch_size < 1 or args.num_bench_iter < 1 or args.num_warm_iter < 0:
        parser.error("--batch-size and --num-bench-iter must be >= 1, --num-warm-iter >= 0")
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    if args.results_file and Path(args.results_file).suffix.lower() not in (".json", ".csv"):
        parser.error(f"--results-file {args.results_file}: the extension must be .json or .csv")
    return args


def _check_dtype(parser, device, dtype, amp):
    name = str(dtype).replace("torch.", "")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        parser.error(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support "
                     "bfloat16; use --dtype float16 or float32")
    if dtype == torch.float32:
        return
    try:                                   # can this device run this precision at all?
        a = torch.randn(8, 8, device=device)
        if amp:
            with torch.autocast(device.type, dtype=dtype):
                out = a @ a
            if out.dtype != dtype:
                raise RuntimeError(f"autocast on {device.type} produced {out.dtype}")
        else:
            (a.to(dtype) @ a.to(dtype)).sum().item()
    except (RuntimeError, TypeError, AssertionError) as e:
        mode = "autocast" if amp else "tensors"
        parser.error(f"--dtype {name}: {device.type} cannot run {name} {mode} with torch "
                     f"{torch.__version__} ({str(e).splitlines()[0]}); use --dtype float32")


# ----------------------------------------------------------------------------------------------
# Out of memory

def is_oom(e):
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "failed to allocate" in msg)


# ----------------------------------------------------------------------------------------------
# Models, rows and FLOPs

@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def create_vil(name, resolution, backend):
    try:
        import vil
    except Exception as e:  # noqa: BLE001 - any failure to import the package is reported
        raise SystemExit(f"bench/throughput.py: cannot import the ViL model package vil/ "
                         f"({type(e).__name__}: {e}); ViL rows cannot run") from e
    if name == "vil2-test":
        return vil.VisionLSTM(img_size=resolution, num_classes=1000, mlstm_backend=backend,
                              **TEST_CONFIG)
    return vil.create_model(name, img_size=resolution, num_classes=1000, mlstm_backend=backend)


def chunkwise_cell_flops(B, NH, S, DK, DV, L=64):
    """Forward matmul FLOPs of the chunkwise mLSTM: causal halves of the intra-chunk Q K^T and
    S [V, 1] blocks, K^T [V, 1] into the chunk states and Q [C, n] out of them."""
    L = min(L, S)
    intra = 2 * S * L * (DK + DV + 1) / 2
    states = 2 * 2 * S * DK * (DV + 1)
    return B * NH * (intra + states)


def parallel_cell_flops(B, NH, S, DK, DV):
    """Forward matmul FLOPs of the published parallel form: full S x S products Q K^T, C V and
    the row sums."""
    return B * NH * 2 * S * S * (DK + DV + 1)


def _vil_layer_class():
    try:
        from vil.model import ViLLayer
        return ViLLayer
    except Exception:  # noqa: BLE001 - no ViL package: nothing to patch
        return None


def count_gflops(model, resolution, device, cell_form="chunkwise"):
    """Forward GFLOPs of one image; the mLSTM cell (in the form its backend computes, "chunkwise"
    or "parallel") and attention are counted analytically."""
    from torch.utils.flop_counter import FlopCounterMode

    calls = []

    def fake_mlstm(q, k, v, *a, **kw):
        calls.append(("mlstm",) + tuple(q.shape) + (v.shape[-1],))
        return torch.zeros_like(v)

    def fake_sdpa(q, k, v, *a, **kw):
        calls.append(("attn",) + tuple(q.shape))
        return torch.zeros_like(q[..., :v.shape[-1]]).expand(*q.shape[:-1], v.shape[-1])

    x = torch.zeros(1, 3, resolution, resolution, device=device)
    was_training = model.training
    model.eval()
    # ViL's fast forward multiplies the block-diagonal q/k/v projections as dense per-head
    # matrices (more FLOPs, faster GEMMs); count the model's own FLOPs in the reference op order.
    layer_cls = _vil_layer_class()
    reference_order = (patched(layer_cls, "forward", layer_cls.forward_reference)
                       if layer_cls is not None and hasattr(layer_cls, "forward_reference")
                       else contextlib.nullcontext())
    try:
        with patched(vil_kernels, "mlstm", fake_mlstm), reference_order, \
                patched(F, "scaled_dot_product_attention", fake_sdpa), \
                FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    for call in calls:
        if call[0] == "attn":
            _, B, H, S, D = call
            total += peers.attention_flops(B, H, S, D)
        else:
            _, B, NH, S, DK, DV = call
            total += (parallel_cell_flops(B, NH, S, DK, DV) if cell_form == "parallel"
                      else chunkwise_cell_flops(B, NH, S, DK, DV))
    return total / 1e9


def row_specs(model_key, kinds):
    """(kind, label, factory(resolution) -> (model, impl, backend label) or None, skip note)."""
    vil_name, peer_name, short = VIL_MODELS[model_key]
    specs = []
    for kind in kinds:
        if kind == "ours":
            specs.append((kind, f"{short} vil_kernels",
                          lambda r: (create_vil(vil_name, r, "auto"), "vil/ + vil_kernels",
                                     "auto"), None))
        elif kind == "parallel":
            specs.append((kind, f"{short} published (parallel)",
                          lambda r: (create_vil(vil_name, r, "parallel"), "vil/ + vil_kernels",
                                     "parallel"), None))
        elif kind == "deit":
            label = {"deit-tiny": "DeiT-T", "deit-small": "DeiT-S", "deit-base": "DeiT-B",
                     "vit-large": "ViT-L", "deit-test": "DeiT-test"}[peer_name]
            specs.append((kind, f"{label} SDPA",
                          lambda r: peers.create_deit(peer_name, r) + ("sdpa",), None))
        elif kind == "mlstm_kernels":
            note = None if peers.mlstm_kernels_available() else \
                "skipped: mlstm_kernels is not installed (pip install mlstm_kernels)"
            specs.append((kind, f"{short} mlstm_kernels",
                          lambda r: (create_vil(vil_name, r, "auto"), "vil/ + NX-AI mlstm_kernels",
                                     "mlstm_kernels"), note))
    return specs


def describe_backend(backend, device, tokens):
    if backend == "auto":
        if device.type == "cuda":
            return "auto -> triton"
        return "auto -> parallel" if tokens <= 64 else "auto -> torch chunkwise"
    return backend


# ----------------------------------------------------------------------------------------------
# Timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    def __init__(self, model, device, dtype, amp, compile_, compile_mode=None):
        self.device, self.dtype, self.amp = device, dtype, amp
        model = model.to(device)
        if not amp and dtype != torch.float32:
            model = model.to(dtype)
        self.model = model
        self.fn = torch.compile(model, backend=compile_, mode=compile_mode) if compile_ \
            else model
        self.opt = None

    def _ctx(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def inputs(self, batch):
        x = torch.randn(batch, 3, self.res, self.res, device=self.device)
        if not self.amp:
            x = x.to(self.dtype)
        y = torch.randint(0, 1000, (batch,), device=self.device)
        return x, y

    def infer_step(self, x, y):
        with torch.inference_mode(), self._ctx():
            self.fn(x)

    def train_step(self, x, y):
        if self.opt is None:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        with self._ctx():
            loss = F.cross_entropy(self.fn(x).float(), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(runner, mode, batch, warm, iters, mem, tick):
    """Returns (seconds per step, peak bytes)."""
    step = runner.infer_step if mode == "inference" else runner.train_step
    runner.model.train(mode == "train")
    x, y = runner.inputs(batch)
    for _ in range(warm):
        step(x, y)
        tick()
    _sync(runner.device)
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(iters):
        step(x, y)
        tick()
    _sync(runner.device)
    elapsed = time.perf_counter() - t0
    return elapsed / iters, peak_of_step(step, x, y, runner.device, mem)


def peak_of_step(step, x, y, device, mem):
    """Peak memory of one more, untimed step (measuring it slows a CPU step down)."""
    gc.collect()
    mem.start()
    step(x, y)
    _sync(device)
    return mem.stop()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Progress:
    def __init__(self, total, enabled):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass
        self.total, self.done, self.desc = total, 0, ""
        self.t0 = time.perf_counter()

    def set(self, desc):
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def tick(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and n == 1:
            print(f"[{self.done}/{self.total}] {self.desc}: step done "
                  f"({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def prepare_row(spec, model_key, resolution, args, progress):
    """The row's description and a Runner for it (None for a skipped row)."""
    kind, label, factory, skip = spec
    row = {"model": model_key, "row": kind, "label": label, "resolution": resolution,
           "batch_size": None, "dtype": str(args.dtype).replace("torch.", ""),
           "amp": args.amp, "compile": args.compile, "compile_mode": args.compile_mode}
    if skip:
        row["note"] = skip
        return row, None
    torch.manual_seed(args.seed)
    progress.set(f"{label} @{resolution}: building")
    model, impl, backend = factory(resolution)
    if args.recompute_states and kind == "ours":
        for m in model.modules():
            if hasattr(m, "mlstm_recompute_states"):
                m.mlstm_recompute_states = True
        impl += " (recompute_states)"
    if args.mlstm_chunk_size and kind == "ours":
        for m in model.modules():
            if hasattr(m, "mlstm_chunk_size"):
                m.mlstm_chunk_size = args.mlstm_chunk_size
        impl += f" (chunk {args.mlstm_chunk_size})"
    row["impl"] = impl
    tokens = peers.deit_tokens(resolution) if kind == "deit" else (resolution // PATCH) ** 2
    row["tokens"] = tokens
    row["backend"] = describe_backend(backend, args.device, tokens) if kind != "deit" else "sdpa"
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    try:
        cell_form = "parallel" if row["backend"].endswith("parallel") else "chunkwise"
        row["gflops"] = count_gflops(model, resolution, torch.device("cpu"), cell_form)
    except Exception as e:  # noqa: BLE001 - a FLOP count is optional
        row["gflops"] = None
        progress.write(f"note: FLOP count failed for {label}: {e}")
    runner = Runner(model, args.device, args.dtype, args.amp, args.compile, args.compile_mode)
    runner.res = resolution
    runner.ctx = contextlib.nullcontext
    if backend == "mlstm_kernels":
        cell = peers.mlstm_kernels_cell()
        runner.ctx = lambda: patched(vil_kernels, "mlstm", lambda q, k, v, i, f, reverse=False,
                                     **kw: cell(q, k, v, i, f, reverse=reverse))
    return row, runner


def run_row(spec, model_key, resolution, args, mem, progress):
    """Measure one row on its own: warm-up, then the timed steps (with out-of-memory retries)."""
    steps = (args.num_warm_iter + args.num_bench_iter) * (2 if args.bench == "both" else 1)
    row, runner = prepare_row(spec, model_key, resolution, args, progress)
    if runner is None:
        progress.tick(steps)
        return row
    label = row["label"]
    ctx = runner.ctx()
    modes = ["inference", "train"] if args.bench == "both" else [args.bench]
    batch = args.batch_size
    notes = []
    with ctx:
        for mode in modes:
            progress.set(f"{label} @{resolution}: {mode}, batch {batch}")
            while True:
                oom = False
                try:
                    t, peak = measure(runner, mode, batch, args.num_warm_iter,
                                      args.num_bench_iter, mem, progress.tick)
                    break
                except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
                    if not is_oom(e):
                        raise
                    oom = True
                if oom:   # outside the except clause, so the traceback's tensors are freed
                    runner.opt = None
                    runner.model.zero_grad(set_to_none=True)
                    _free(args.device)
                    if batch == 1:
                        notes.append(f"{mode}: out of memory at batch 1")
                        progress.write(f"{label} @{resolution}: {mode} out of memory at batch 1")
                        t = peak = None
                        break
                    progress.write(f"{label} @{resolution}: out of memory in {mode} at batch "
                                   f"{batch}, retrying with batch {batch // 2}")
                    notes.append(f"out of memory at batch {batch}, halved")
                    batch //= 2
            row["batch_size"] = batch
            key = "infer" if mode == "inference" else "train"
            row[f"{key}_batch_size"] = batch
            row[f"{key}_ms_per_step"] = None if t is None else t * 1e3
            row[f"{key}_img_s"] = None if t is None else batch / t
            row[f"{key}_peak_mib"] = None if peak is None else peak / 2**20
    if notes:
        row["note"] = "; ".join(notes)
    del runner
    _free(args.device)
    return row


def run_group_interleaved(group, resolution, args, mem, progress):
    """Measure the rows of one model round-robin, one timed step of each row in turn, so that
    other processes competing for a shared CPU slow every row alike and the ratios hold.
    Per row: median seconds per step, and the largest peak of its steps."""
    prepared = [prepare_row(spec, model_key, resolution, args, progress)
                for model_key, spec in group]
    active = [(row, runner) for row, runner in prepared if runner is not None]
    steps = (args.num_warm_iter + args.num_bench_iter) * (2 if args.bench == "both" else 1)
    progress.tick(steps * (len(prepared) - len(active)))
    modes = ["inference", "train"] if args.bench == "both" else [args.bench]
    batch = args.batch_size
    for mode in modes:
        key = "infer" if mode == "inference" else "train"
        times = {id(r): [] for r, _ in active}
        peaks = {id(r): [] for r, _ in active}
        data = {}
        for row, runner in active:
            runner.model.train(mode == "train")
            data[id(row)] = runner.inputs(batch)
        for it in range(args.num_warm_iter + args.num_bench_iter):
            timed = it >= args.num_warm_iter
            for row, runner in list(active):
                progress.set(f"{row['label']} @{resolution}: {mode}, batch {batch}"
                             f"{'' if timed else ' (warm-up)'}")
                step = runner.infer_step if mode == "inference" else runner.train_step
                try:
                    with runner.ctx():
                        _sync(runner.device)
                        gc.collect()
                        t0 = time.perf_counter()
                        step(*data[id(row)])
                        _sync(runner.device)
                        dt = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                    if is_oom(e) or row["row"] == "ours":
                        raise
                    row["note"] = f"failed in {mode}: {type(e).__name__}: {str(e)[:120]}"
                    progress.write(f"{row['label']} @{resolution}: {row['note']}")
                    active.remove((row, runner))
                    continue
                if timed:
                    times[id(row)].append(dt)
                progress.tick()
        for row, runner in active:
            step = runner.infer_step if mode == "inference" else runner.train_step
            with runner.ctx():
                peak = peak_of_step(step, *data[id(row)], runner.device, mem)
            if peak is not None:
                peaks[id(row)].append(peak)
        for row, _ in active:
            t = statistics.median(times[id(row)])
            row["batch_size"] = batch
            row[f"{key}_batch_size"] = batch
            row[f"{key}_ms_per_step"] = t * 1e3
            row[f"{key}_ms_per_step_all"] = [x * 1e3 for x in times[id(row)]]
            row[f"{key}_img_s"] = batch / t
            row[f"{key}_peak_mib"] = max(peaks[id(row)]) / 2**20 if peaks[id(row)] else None
        del data
    rows = [row for row, _ in prepared]
    del prepared, active
    _free(args.device)
    return rows


def add_ratios(rows):
    """Throughput of each row relative to the "ours" row of its model and resolution."""
    ours = {(r["model"], r["resolution"]): r for r in rows if r["row"] == "ours"}
    for r in rows:
        base = ours.get((r["model"], r["resolution"]))
        for key in ("infer_img_s", "train_img_s"):
            val, ref = r.get(key), base.get(key) if base else None
            r[key.replace("_img_s", "_vs_ours")] = (val / ref) if (val and ref) else None


# ----------------------------------------------------------------------------------------------
# Output

def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def format_table(rows):
    cols = [("row", "label", 0), ("backend", "backend", 0), ("res", "resolution", 0),
            ("tokens", "tokens", 0), ("batch", "batch_size", 0), ("GFLOPs", "gflops", 3),
            ("infer img/s", "infer_img_s", 2), ("infer vs ours", "infer_vs_ours", 2),
            ("train img/s", "train_img_s", 2), ("train vs ours", "train_vs_ours", 2),
            ("infer MiB", "infer_peak_mib", 0), ("train MiB", "train_peak_mib", 0)]
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows) or c[1] == "label"]
    header = [c[0] for c in cols]
    body = []
    for r in rows:
        cells = []
        for _, key, d in cols:
            v = r.get(key)
            if key.endswith("_vs_ours") and v is not None:
                cells.append(f"x{v:.2f}")
            elif key.endswith("_img_s") and v is not None:
                cells.append(f"{v:.3g}" if v < 100 else f"{v:,.1f}")
            elif key == "gflops" and v is not None:
                cells.append(f"{v:.4g}")
            elif key == "batch_size" and r.get("infer_batch_size", v) != r.get("train_batch_size", v):
                cells.append(f"{r['infer_batch_size']}/{r['train_batch_size']}")
            else:
                cells.append(_fmt(v, d))
        body.append(cells)
    widths = [max(len(h), *(len(b[j]) for b in body)) for j, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(
        c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(header), "|" + "|".join(("-" * (w + 2)) if j < 2 else ("-" * (w + 1) + ":")
                                      for j, w in enumerate(widths)) + "|"]
    out += [line(b) for b in body]
    notes = [f"- {r['label']} @{r['resolution']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + ([""] + notes if notes else []))


def write_results(path, header, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"header": header, "results": rows}, indent=2) + "\n")
    else:
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        extra = {"device": header["device"], "torch": header["versions"]["torch"]}
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys + list(extra))
            w.writeheader()
            for r in rows:
                w.writerow({**r, **extra})


def plot_sweep(path, header, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = []
    for r in rows:
        if r["label"] not in labels:
            labels.append(r["label"])
    for label in labels:
        pts = sorted((r for r in rows if r["label"] == label), key=lambda r: r["resolution"])
        for key, style, ax, mem_key in (("infer_img_s", "-o", axes[0], "infer_peak_mib"),
                                        ("train_img_s", "--s", axes[0], "train_peak_mib")):
            xs = [r["resolution"] for r in pts if r.get(key)]
            ys = [r[key] for r in pts if r.get(key)]
            tag = "inference" if key.startswith("infer") else "train"
            if xs:
                ax.plot(xs, ys, style, label=f"{label} ({tag})")
            mx = [r["resolution"] for r in pts if r.get(mem_key)]
            my = [r[mem_key] for r in pts if r.get(mem_key)]
            if mx:
                axes[1].plot(mx, my, style, label=f"{label} ({tag})")
    axes[0].set(xlabel="resolution (px)", ylabel="images / s", yscale="log",
                title="throughput (ViL: linear in tokens, DeiT: quadratic)")
    axes[1].set(xlabel="resolution (px)", ylabel="peak memory (MiB)", yscale="log",
                title=f"peak memory ({header['memory']})")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{header['device']} | {header['dtype']}"
                 f"{' autocast' if header['amp'] else ''} | torch {header['versions']['torch']}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None):
    args = resolve_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    mem = PeakMemory(device, tune_malloc=args.malloc == "tuned")
    header = {
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type,
        "versions": versions(), "dtype": str(args.dtype).replace("torch.", ""),
        "amp": args.amp, "compile": args.compile, "compile_mode": args.compile_mode,
        "bench": args.bench,
        "num_warm_iter": args.num_warm_iter, "num_bench_iter": args.num_bench_iter,
        "interleave": args.interleave,
        "timing": ("median seconds per step over the timed steps, rows of a model interleaved "
                   "step by step" if args.interleave else
                   "total time of the timed steps / their number, rows one after another"),
        "memory": mem.kind,
        "allocator": (ALLOCATOR_NOTE if mem.cpu_ok else "glibc defaults" if device.type == "cpu"
                      else "torch caching allocator"),
        "gflops": "forward per image; FlopCounterMode + analytic mLSTM cell / attention",
        "load_avg_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "kernel_settings": kernel_settings(),
    }
    v = header["versions"]
    print(f"device: {header['device']}")
    print(f"torch {v['torch']} | triton {v['triton']} | vil_kernels {v['vil_kernels']} | "
          f"python {v['python']}")
    print(f"precision: {header['dtype']}{' (autocast)' if args.amp else ''} | bench: {args.bench}"
          f" | warm-up {args.num_warm_iter}, timed {args.num_bench_iter} steps"
          f"{' | torch.compile' if args.compile else ''}")
    if header["kernel_settings"]["env"]:
        print("vil_kernels settings: " + " ".join(
            f"{k}={v}" for k, v in header["kernel_settings"]["env"].items()))
    if header["load_avg_before"] and device.type == "cpu" and \
            header["load_avg_before"][0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {header['load_avg_before'][0]:.1f} on "
              f"{os.cpu_count()} cores: other processes compete for the CPU, numbers are low")

    specs = [(m, s) for m in args.models for s in row_specs(m, args.row_kinds)]
    per_row = (args.num_warm_iter + args.num_bench_iter) * (2 if args.bench == "both" else 1)
    progress = Progress(len(specs) * len(args.resolutions) * per_row, not args.no_progress)
    rows = []
    try:
        for resolution in args.resolutions:
            if args.interleave:
                for model_key in args.models:
                    group = [(m, spec) for m, spec in specs if m == model_key]
                    oom = False
                    try:
                        rows += run_group_interleaved(group, resolution, args, mem, progress)
                    except Exception as e:  # noqa: BLE001 - only out-of-memory falls back
                        if not is_oom(e):
                            raise
                        oom = True
                    if oom:
                        _free(device)
                        progress.write(f"out of memory with the rows of {model_key} interleaved "
                                       f"at batch {args.batch_size}: measuring them one after "
                                       "another, halving the batch as needed")
                        for model_key_, spec in group:
                            row = run_row(spec, model_key_, resolution, args, mem, progress)
                            row["note"] = "; ".join(filter(None, [
                                "not interleaved (out of memory)", row.get("note")]))
                            rows.append(row)
            else:
                for model_key, spec in specs:
                    try:
                        rows.append(run_row(spec, model_key, resolution, args, mem, progress))
                    except Exception as e:  # noqa: BLE001 - a failing peer is reported
                        if spec[0] == "ours" or is_oom(e):
                            raise
                        note = f"failed: {type(e).__name__}: {str(e)[:120]}"
                        progress.write(f"{spec[1]} @{resolution}: {note}")
                        rows.append({"model": model_key, "row": spec[0], "label": spec[1],
                                     "resolution": resolution, "note": note})
    finally:
        progress.close()
    add_ratios(rows)
    header["load_avg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(format_table(rows))
    print(f"\nmemory: {mem.kind}. GFLOPs: {header['gflops']}.")
    if device.type == "cpu":
        print(f"allocator: {header['allocator']}.")
    if header["load_avg_after"] and device.type == "cpu":
        print(f"load average (1 min) before/after: {header['load_avg_before'][0]:.1f} / "
              f"{header['load_avg_after'][0]:.1f} on {os.cpu_count()} cores")
    if args.results_file:
        write_results(args.results_file, header, rows)
        print(f"results written to {args.results_file}")
    if args.sweep:
        plot = args.plot_file or (str(Path(args.results_file).with_suffix(".png"))
                                  if args.results_file else
                                  str(ROOT / "bench" / "results" / f"sweep-{device_slug(device)}.png"))
        err = plot_sweep(plot, header, rows)
        print(err if err else f"plot written to {plot}")
    return rows


if __name__ == "__main__":
    main()
