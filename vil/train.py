"""Train or fine-tune a Vision-LSTM on an image folder, in one process or under torchrun.

    python -m vil.train --data DIR --model vil2-tiny --img-size 224 --epochs 300
    torchrun --nproc_per_node 8 -m vil.train --data DIR --model vil2-small ...
    python -m vil.train --data DIR --model vil2-tiny --img-size 448 \\
        --checkpoint vil2_tiny16_e800_in1k.th --epochs 20 --lr 5e-5 --layer-decay 0.65

DIR holds train/<class>/*.jpg and val/<class>/*.jpg. Under torchrun the model is wrapped in
DistributedDataParallel (``--fsdp``: FSDP2 ``fully_shard`` per block), each rank reads its shard of
every epoch, only rank 0 logs and writes checkpoints; NCCL on GPU, gloo on CPU. ``--batch-size`` is
per rank and per micro-batch: the global batch is batch-size x ranks x accum-steps; ``--lr`` is
used as given (no scaling by batch size).

Output directory: ``checkpoint.pt`` (everything needed to resume, rewritten atomically every epoch,
every ``--save-every`` steps, on SIGUSR1, and on SIGTERM/SIGINT before exiting), ``model_best.pt``
and ``model_final.pt`` (model state_dicts, loadable with ``vil.load_checkpoint``) and ``log.jsonl``.
``--resume OUT/checkpoint.pt`` (or ``--resume auto``) continues exactly where the run stopped.
"""

import argparse
import ast
import json
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import vil_kernels

from .data import HAS_TORCHVISION, ImageFolder, ShardedSampler, build_transform
from .hub import MODEL_CONFIGS, create_model, load_checkpoint

try:                                                                   # optional
    from tqdm import tqdm
except Exception:                                                      # pragma: no cover
    tqdm = None

log = logging.getLogger("vil.train")

__all__ = ["main", "parse_args", "build_param_groups", "apply_activation_checkpointing",
           "lr_factor", "loss_fn"]


# -------------------------------------------------------------------------------- arguments
# torch.compile's modes, offered by --compile-mode here and in bench/throughput.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _kv(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        pass                                                           # a plain string
    return k.replace("-", "_"), v


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Meaningful defaults shown after each option; description and examples keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text
                and action.default not in (None, False, [], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m vil.train",
        description="Train or fine-tune a Vision-LSTM (ViL) on an image folder\n"
                    "(DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg), in one process or under\n"
                    "torchrun (DistributedDataParallel; FullyShardedDataParallel with --fsdp).",
        formatter_class=_HelpFormatter,
        epilog="examples:\n"
               "  # train from scratch, one process (one GPU)\n"
               "  python -m vil.train --data DIR --model vil2-tiny --img-size 224 --out runs/t\n"
               "  # 8 GPUs, DDP; --batch-size is per GPU\n"
               "  torchrun --nproc_per_node 8 -m vil.train --data DIR --model vil2-small \\\n"
               "      --batch-size 128 --out runs/s\n"
               "  # fine-tune a published 224 px checkpoint at 448 px\n"
               "  torchrun --nproc_per_node 8 -m vil.train --data DIR --model vil2-tiny \\\n"
               "      --img-size 448 --checkpoint vil2_tiny16_e800_in1k.th --epochs 20 \\\n"
               "      --lr 5e-5 --warmup-epochs 1 --layer-decay 0.65 --drop-path 0.1 \\\n"
               "      --batch-size 32 --grad-checkpointing --out runs/t448\n"
               "  # continue a stopped or killed run\n"
               "  python -m vil.train ...same flags... --resume auto\n"
               "\n"
               "signals: SIGUSR1 writes a checkpoint; SIGTERM / Ctrl-C writes one and stops.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="DIR",
                   help="image folder with train/ and val/ (one sub-folder per class)")
    g.add_argument("--img-size", type=int, default=224, metavar="PX",
                   help="training and evaluation resolution")
    g.add_argument("--crop-pct", type=float, default=0.875, metavar="F",
                   help="evaluation: resize the shorter side to img-size / crop-pct, then "
                        "center-crop img-size")
    g.add_argument("--min-scale", type=float, default=0.08, metavar="F",
                   help="smallest area fraction of the random resized crop")
    g.add_argument("--no-augment", action="store_true",
                   help="train on the deterministic evaluation transform (no crop/flip)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data loader processes per rank (default: min(8, cpus per rank - 1))")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vil2-tiny", choices=sorted(MODEL_CONFIGS),
                   help="named configuration")
    g.add_argument("--model-kwargs", nargs="*", type=_kv, default=[], metavar="KEY=VALUE",
                   help="VisionLSTM keyword overrides, e.g. dim=32 depth=1 patch_size=8")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="initial weights (published .th or a state_dict) for fine-tuning; the "
                        "position embedding is resized to --img-size, a head of another class "
                        "count is re-initialised")
    g.add_argument("--drop-path", type=float, default=0.0, metavar="P",
                   help="drop path (stochastic depth) rate")
    g.add_argument("--mlstm-backend", default="auto", choices=list(vil_kernels.BACKENDS),
                   help="mLSTM backend (auto: Triton on GPU, the PyTorch paths on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (BACKEND: default inductor, e.g. aot_eager); "
                        "the mLSTM cell stays one opaque op, inductor fuses the work around it")
    g.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (reduce-overhead: CUDA graphs, for steps that wait "
                        "on the host, e.g. small batches at 224 px)")
    g.add_argument("--recompute-states", action="store_true",
                   help="the mLSTM cells recompute their chunk states in the backward instead "
                        "of keeping them (less memory, one more state scan a block; same "
                        "gradients)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, metavar="N",
                   help="length of the run and of the lr schedule")
    g.add_argument("--batch-size", type=int, default=128, metavar="N",
                   help="images per rank per micro-batch")
    g.add_argument("--accum-steps", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=float, default=1e-3, metavar="LR",
                   help="peak learning rate (AdamW), used as given for the global batch")
    g.add_argument("--min-lr", type=float, default=1e-6, metavar="LR",
                   help="end of the cosine decay")
    g.add_argument("--warmup-epochs", type=float, default=5.0, metavar="E",
                   help="linear warm-up length (fractions allowed)")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR",
                   help="learning rate at step 0")
    g.add_argument("--weight-decay", type=float, default=0.05, metavar="WD",
                   help="AdamW weight decay (not on biases, norms, position embedding)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="AdamW betas")
    g.add_argument("--layer-decay", type=float, default=None, metavar="F",
                   help="layer-wise lr decay: block pair i gets lr * decay^(depth - i), the "
                        "embeddings decay^(depth + 1), norm and head the full lr")
    g.add_argument("--label-smoothing", type=float, default=0.1, metavar="F",
                   help="label smoothing of the cross entropy")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: off)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU); fp16 uses a grad scaler")
    g.add_argument("--seed", type=int, default=0,
                   help="initialisation, data order and augmentation (per rank where it matters)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/vil", metavar="DIR",
                   help="checkpoints and log.jsonl")
    g.add_argument("--resume", metavar="FILE",
                   help="continue a run from its checkpoint.pt ('auto': OUT/checkpoint.pt if it "
                        "exists)")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every this many optimizer steps (0: off)")
    g.add_argument("--save-minutes", type=float, default=30.0, metavar="MIN",
                   help="also checkpoint when this long has passed since the last one (0: off); "
                        "a killed run loses at most this much work")
    g.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop (and checkpoint) after this many optimizer steps in total; the "
                        "schedule still spans --epochs")
    g.add_argument("--eval-only", action="store_true", help="evaluate the model and exit")
    g.add_argument("--log-every", type=int, default=20, metavar="STEPS",
                   help="JSON log (and plain log line without a progress bar) interval")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none without tqdm or a terminal: log lines "
                        "every --log-every steps instead)")
    g.add_argument("--fsdp", action="store_true",
                   help="FullyShardedDataParallel (FSDP2, one unit per block) instead of DDP")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op CPU threads per process (default: torch's choice; "
                        "torchrun sets OMP_NUM_THREADS=1)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.model_kwargs = dict(args.model_kwargs)
    if args.accum_steps < 1 or args.batch_size < 1:
        raise SystemExit("--batch-size and --accum-steps must be >= 1")
    if args.compile_mode and not args.compile:
        raise SystemExit("--compile-mode needs --compile")
    if args.epochs < 0 or args.lr < 0:
        raise SystemExit("--epochs and --lr must be >= 0")
    return args


# ------------------------------------------------------------------------------ distributed
def setup_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True                   # fp32 leftovers of autocast
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, local_rank, device


def _all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------- logging
class RunLog:
    """Rank 0: INFO lines to stderr and JSON lines to OUT/log.jsonl; other ranks: warnings only."""

    def __init__(self, out, rank):
        self.rank = rank
        self.file = None
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(levelname)s %(message)s",
            "%H:%M:%S"))
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            self.file = open(os.path.join(out, "log.jsonl"), "a", buffering=1)

    def record(self, event, **fields):
        if self.file is not None:
            self.file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields},
                                       default=str) + "\n")

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


# ------------------------------------------------------------------------------------ model
def apply_activation_checkpointing(model):
    """Recompute every single block's activations in backward (the model's
    ``set_grad_checkpointing``); returns the number of blocks it applies to."""
    model.set_grad_checkpointing(True)
    return model.num_blocks


def build_model(args, num_classes):
    kwargs = dict(args.model_kwargs)
    for k, flag in (("img_size", "--img-size"), ("num_classes", "the class folders"),
                    ("input_shape", "--img-size"), ("output_shape", "the class folders")):
        if k in kwargs:
            raise SystemExit(f"--model-kwargs {k}: set by {flag}")
    kwargs.setdefault("drop_path_rate", args.drop_path)
    kwargs.setdefault("mlstm_backend", args.mlstm_backend)
    kwargs.setdefault("mlstm_recompute_states", args.recompute_states)
    return create_model(args.model, img_size=args.img_size, num_classes=num_classes, **kwargs)


def _layer_id(name, depth):
    if name.startswith(("patch_embed.", "pos_embed.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1                                                   # norm, legacy norm, head


def build_param_groups(model, weight_decay, layer_decay=None, lr=None):
    """AdamW groups: no weight decay on 1-D tensors (biases, norms, skips) and the position
    embedding; with ``layer_decay``, an ``lr_scale`` per block pair (timm-style). Each group's
    ``lr`` is ``lr * lr_scale``. Names may carry DDP/compile prefixes."""
    base = getattr(model, "module", model)                             # DDP
    base = getattr(base, "_orig_mod", base)                            # torch.compile
    depth = getattr(base, "depth", None)
    no_wd = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = name
        for prefix in ("module.", "_orig_mod."):
            clean = clean.replace(prefix, "")
        decay = not (param.ndim <= 1 or clean in no_wd or clean.endswith(".bias"))
        if layer_decay is not None and depth is not None:
            lid = _layer_id(clean, depth)
            scale = layer_decay ** (depth + 1 - lid)
        else:
            lid, scale = 0, 1.0
        key = (lid, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
            if lr is not None:
                groups[key]["lr"] = lr * scale
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def lr_factor(step, total_steps, warmup_steps, lr, warmup_lr, min_lr):
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up from ``warmup_lr``
    over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        w = warmup_lr / lr if lr > 0 else 0.0
        return w + (1 - w) * step / warmup_steps
    m = min_lr / lr if lr > 0 else 0.0
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def loss_fn(logits, target, label_smoothing=0.0):
    """Mean label-smoothed cross entropy over the samples with target >= 0 (skipped images
    and evaluation padding carry -1)."""
    valid = target >= 0
    losses = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none",
                             label_smoothing=label_smoothing)
    return (losses * valid).sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------ checkpoints
def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _full_state_dicts(model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts with plain parameter names, for
    DDP, FSDP and unwrapped models alike (collective under FSDP: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:                                                               # make the rename durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(path, model, optimizer, scheduler, scaler, state, args, rank, runlog):
    state["saved_at"] = time.monotonic()
    model_sd, optim_sd = _full_state_dicts(model, optimizer)
    rng = _gather_objects(_rng_state())                                # every rank's RNG
    if rank == 0:
        _atomic_save({"model": model_sd, "optimizer": optim_sd,
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                      "epoch": state["epoch"], "step": state["step"],
                      "batch_in_epoch": state["batch_in_epoch"], "best_top1": state["best_top1"],
                      "rng": rng, "world_size": len(rng), "args": vars(args)}, path)
        log.info(f"checkpoint {path} (epoch {state['epoch']}, step {state['step']}, "
                 f"batch {state['batch_in_epoch']})")
        runlog.record("checkpoint", path=path, epoch=state["epoch"], step=state["step"],
                      batch_in_epoch=state["batch_in_epoch"])
    if dist.is_initialized():
        dist.barrier()


def save_model(path, model, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if rank == 0:
        _atomic_save({"model": sd}, path)
    if dist.is_initialized():
        dist.barrier()


def load_resume(path, model, optimizer, scheduler, scaler, rank, world, args):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    # Full (unsharded) tensors on every rank; FSDP re-shards them.
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                   optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    old = ckpt.get("args") or {}
    changed = [k for k in ("batch_size", "accum_steps", "epochs", "seed")
               if k in old and old[k] != vars(args)[k]]
    if ckpt.get("world_size", world) != world:
        changed.append("world size")
    if changed and ckpt.get("batch_in_epoch"):
        log.warning(f"resuming mid-epoch with another {', '.join(changed)} than {path}: the data "
                    f"order and schedule of the rest of the run differ from an uninterrupted one")
    rng = ckpt.get("rng") or []
    if len(rng) == world:
        _set_rng_state(rng[rank])
    else:
        log.warning(f"{path} was written by {len(rng)} ranks, this run has {world}: RNG states "
                    f"are not restored (the continuation is not bit-exact)")
    return {k: ckpt[k] for k in ("epoch", "step", "batch_in_epoch", "best_top1")}


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, loader, device, autocast, num_classes):
    model.eval()
    k5 = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)          # loss, top1, top5, count
    skipped = []
    for x, y, bad in loader:
        skipped += [b for b in bad if b]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        valid = y >= 0
        logits, y = logits[valid].float(), y[valid]
        top = logits.topk(k5, dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             valid.sum().double()])
    sums = _all_reduce(sums).cpu()
    skipped = sum(_gather_objects(skipped), [])                       # every rank's
    model.train()
    n = max(sums[3].item(), 1)
    return {"val_loss": sums[0].item() / n, "val_top1": 100 * sums[1].item() / n,
            f"val_top{k5}": 100 * sums[2].item() / n, "val_images": int(sums[3].item())}, skipped


# ------------------------------------------------------------------------------------- main
class _Signals:
    """SIGUSR1: checkpoint at the next step; SIGTERM/SIGINT: checkpoint and stop (within 10
    steps under torchrun, where the ranks agree on it)."""

    def __init__(self):
        self.save = False
        self.stop = False
        self._old = {}

    def install(self):
        for sig, attr in ((getattr(signal, "SIGUSR1", None), "save"),
                          (signal.SIGTERM, "stop"), (signal.SIGINT, "stop")):
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, partial(self._handle, attr))
            except ValueError:                                         # not the main thread
                pass

    def _handle(self, attr, signum, frame):
        if attr == "stop" and self.stop:                               # second ^C: stop now
            raise KeyboardInterrupt
        setattr(self, attr, True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def poll(self, device):
        """The flags agreed over all ranks (a signal may reach only some)."""
        t = torch.tensor([int(self.save), int(self.stop)],
                         device=device if dist.is_initialized() and device.type == "cuda" else "cpu")
        _all_reduce(t, dist.ReduceOp.MAX if dist.is_initialized() else None)
        self.save = False
        return bool(t[0]), bool(t[1])


def _log_skipped(paths, runlog, epoch, rank):
    for p in paths:
        log.warning(f"skipped unreadable image {p}")
    if rank == 0:
        for p in paths:
            runlog.record("skipped_image", path=p, epoch=epoch)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_group = not dist.is_initialized()
    if not os.path.isdir(os.path.join(args.data, "train")):   # before the run folder is made
        raise SystemExit(f"--data {args.data}: no train/ folder (the layout is "
                         f"DIR/train/<class>/<image>, and DIR/val/... for evaluation)")
    rank, world, local_rank, device = setup_distributed(args)
    runlog = RunLog(args.out, rank)
    signals = _Signals()
    try:
        with warnings.catch_warnings():
            # The dataset warns about unreadable images; the loop logs them by name (per rank).
            warnings.filterwarnings("ignore", message="skipping unreadable image")
            return _run(args, rank, world, device, runlog, signals)
    finally:
        signals.restore()
        runlog.close()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank, world, device, runlog, signals):
    if args.resume == "auto":
        auto = os.path.join(args.out, "checkpoint.pt")
        args.resume = auto if os.path.exists(auto) else None
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext)

    # Data
    train_dir, val_dir = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    train_tf = build_transform(True, args.img_size, augment=not args.no_augment,
                               crop_pct=args.crop_pct, scale=(args.min_scale, 1.0))
    eval_tf = build_transform(False, args.img_size, crop_pct=args.crop_pct)
    try:                               # an empty folder: a one-line message, not a traceback
        train_set = ImageFolder(train_dir, train_tf, seed=args.seed)
        val_set = (ImageFolder(val_dir, eval_tf, seed=args.seed, classes=train_set.classes)
                   if os.path.isdir(val_dir) else None)
    except FileNotFoundError as e:
        raise SystemExit(f"--data {args.data}: {e}") from None
    num_classes = len(train_set.classes)
    if val_set is None:
        log.warning(f"no {val_dir}: no evaluation")
    workers = args.workers
    if workers is None:
        per_rank = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", world)), 1)
        workers = max(min(8, per_rank - 1), 0)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda",
                     generator=torch.Generator())                      # leaves the global RNG alone
    if workers > 0:
        loader_kw["prefetch_factor"] = 4
    train_sampler = ShardedSampler(len(train_set), world, rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler,
                              drop_last=True, **loader_kw)
    val_loader = None
    if val_set is not None:
        val_sampler = ShardedSampler(len(val_set), world, rank, shuffle=False, pad="blank")
        val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler,
                                **loader_kw)
    micro_per_epoch = train_sampler.per_rank // args.batch_size
    steps_per_epoch = micro_per_epoch // args.accum_steps
    if steps_per_epoch == 0:
        raise SystemExit(f"{train_sampler.per_rank} training images per rank do not fill one "
                         f"step of {args.batch_size} x {args.accum_steps}")
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    # Model: the same initialisation on every rank, then per-rank RNG (drop path).
    torch.manual_seed(args.seed)
    model = build_model(args, num_classes)
    if args.checkpoint:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = load_checkpoint(model, args.checkpoint, strict=False)
        notes = [str(w.message) for w in caught]
        for note in notes:
            log.warning(f"{args.checkpoint}: {note}")
        log.info(f"loaded {args.checkpoint} (missing: {list(res.missing_keys)}, "
                 f"unexpected: {list(res.unexpected_keys)}); position embedding at "
                 f"{tuple(model.pos_embed.embed.shape[1:3])}")
        runlog.record("load_checkpoint", path=args.checkpoint, missing=list(res.missing_keys),
                      unexpected=list(res.unexpected_keys), warnings=notes,
                      pos_embed_grid=list(model.pos_embed.embed.shape[1:3]))
    if args.grad_checkpointing:
        apply_activation_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if world > 1 and args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.iter_blocks():
            fully_shard(block)
        fully_shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        # in place (state_dict names unchanged); after DDP, so that its optimizer splits the
        # graph at the gradient buckets
        model.compile(backend=args.compile, mode=args.compile_mode)
    torch.manual_seed(args.seed + 1000 * rank + 1)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    groups = build_param_groups(model, args.weight_decay, args.layer_decay, lr=args.lr)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas),
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps,
                           lr=args.lr, warmup_lr=args.warmup_lr, min_lr=args.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "best_top1": None,
             "saved_at": time.monotonic()}
    if args.resume:
        state.update(load_resume(args.resume, model, optimizer, scheduler, scaler, rank, world,
                                 args))
        log.info(f"resumed {args.resume} at epoch {state['epoch']}, step {state['step']}, "
                 f"batch {state['batch_in_epoch']}")

    global_batch = args.batch_size * world * args.accum_steps
    config = {k: v for k, v in vars(args).items()}
    config.update(world_size=world, device=str(device), precision=precision, params=n_params,
                  num_classes=num_classes, train_images=len(train_set),
                  val_images=len(val_set) if val_set is not None else 0,
                  global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, torchvision=HAS_TORCHVISION,
                  resumed_at=({k: v for k, v in state.items() if k != "saved_at"}
                              if args.resume else None))
    runlog.record("config", **config)
    log.info(f"{args.model} {n_params / 1e6:.2f}M params, {num_classes} classes, "
             f"{len(train_set)} train / {config['val_images']} val images, {world} rank(s) "
             f"on {device}, {precision}, global batch {global_batch}, {steps_per_epoch} "
             f"steps/epoch, {total_steps} steps")

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    save = partial(save_checkpoint, ckpt_path, model, optimizer, scheduler, scaler, state, args,
                   rank, runlog)

    if args.eval_only:
        if val_loader is None:
            raise SystemExit(f"--eval-only needs {val_dir}")
        metrics, skipped = evaluate(model, val_loader, device, autocast, num_classes)
        _log_skipped(skipped if rank == 0 else [], runlog, state["epoch"], rank)
        runlog.record("eval", **metrics)
        log.info("eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    signals.install()
    is_ddp = hasattr(model, "no_sync")
    stopped = False
    result = {}
    model.train()
    if args.max_steps is not None and state["step"] >= args.max_steps:
        log.info(f"--max-steps {args.max_steps} already reached (step {state['step']})")
        stopped = True
    while state["epoch"] < args.epochs and not stopped:
        epoch = state["epoch"]
        train_set.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        start_micro = state["batch_in_epoch"]
        train_sampler.set_start(start_micro * args.batch_size)
        bar = None
        if rank == 0 and tqdm is not None and not args.no_progress and sys.stderr.isatty():
            bar = tqdm(total=steps_per_epoch, initial=start_micro // args.accum_steps,
                       desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # this epoch, this rank
        skipped = []
        t_step = time.perf_counter()
        ips = None
        micro = start_micro
        end_micro = steps_per_epoch * args.accum_steps                # drops a partial last step
        it = iter(train_loader)
        while micro < end_micro:
            x, y, bad = next(it)
            if any(bad):
                new = [b for b in bad if b]
                skipped += new
                _log_skipped(new, runlog, epoch, rank)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last_micro = (micro + 1) % args.accum_steps == 0
            if is_ddp and not last_micro:
                sync = model.no_sync()
            else:
                sync = nullcontext()
                if args.fsdp and world > 1:
                    model.set_requires_gradient_sync(last_micro)
            with sync:
                with autocast():
                    logits = model(x)
                loss = loss_fn(logits, y, args.label_smoothing)
                scaler.scale(loss / args.accum_steps).backward()
            loss_sum[0] += loss.detach().double()
            loss_sum[1] += 1
            micro += 1
            if not last_micro:
                continue
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] = micro
            now = time.perf_counter()
            rate = global_batch / max(now - t_step, 1e-9)
            ips = rate if ips is None else 0.9 * ips + 0.1 * rate      # smoothed images/s
            t_step = now
            lr = optimizer.param_groups[-1]["lr"]
            if bar is not None:
                if state["step"] % max(min(args.log_every, 10), 1) == 0 or bar.n == 0:
                    bar.set_postfix({"img/s": f"{ips:.0f}", "loss": f"{loss.item():.4f}",
                                     "lr": f"{lr:.2e}"}, refresh=False)
                bar.update(1)
            if state["step"] % args.log_every == 0:
                runlog.record("train", epoch=epoch, step=state["step"], loss=loss.item(), lr=lr,
                              images_per_s=ips)
                if bar is None:
                    log.info(f"epoch {epoch + 1} step {state['step']} "
                             f"({micro // args.accum_steps}/{steps_per_epoch}) loss "
                             f"{loss.item():.4f} lr {lr:.3e} {ips:.0f} img/s")
            if (rank == 0 and args.save_minutes
                    and time.monotonic() - state["saved_at"] > 60 * args.save_minutes):
                signals.save = True                                    # rank 0's clock decides
            want_save = want_stop = False
            if world == 1 or state["step"] % 10 == 0:                  # a collective: not every step
                want_save, want_stop = signals.poll(device)
            if args.max_steps is not None and state["step"] >= args.max_steps:
                want_stop = True
            if args.save_every and state["step"] % args.save_every == 0:
                want_save = True
            if want_stop or want_save:
                if micro == end_micro:                                 # epoch end: saved below
                    stopped = want_stop
                    break
                save()
            if want_stop:
                stopped = True
                break
        if bar is not None:
            bar.close()
        del it
        epoch_done = micro >= end_micro
        sums = _all_reduce(loss_sum.clone()).cpu()
        all_skipped = sum(_gather_objects(skipped), [])
        record = {"epoch": epoch, "step": state["step"],
                  "train_loss": sums[0].item() / max(sums[1].item(), 1),
                  "lr": optimizer.param_groups[-1]["lr"], "skipped_images": all_skipped,
                  "complete": epoch_done}
        if epoch_done:
            state["epoch"] = epoch + 1
            state["batch_in_epoch"] = 0
            if val_loader is not None:
                metrics, vskipped = evaluate(model, val_loader, device, autocast, num_classes)
                _log_skipped(vskipped if rank == 0 else [], runlog, epoch, rank)
                record.update(metrics, skipped_val_images=vskipped)
                top1 = metrics["val_top1"]
                if state["best_top1"] is None or top1 > state["best_top1"]:
                    state["best_top1"] = top1
                    save_model(os.path.join(args.out, "model_best.pt"), model, rank)
            save()
        runlog.record("epoch", **record)
        shown = {k: v for k, v in record.items()
                 if k in ("train_loss", "lr", "val_loss", "val_images") or k.startswith("val_top")}
        log.info(f"epoch {epoch + 1}/{args.epochs} {'done' if epoch_done else 'stopped'} at step "
                 f"{state['step']}: " + ", ".join(
                     f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in shown.items())
                 + (f", {len(all_skipped)} unreadable training image(s) skipped"
                    if all_skipped else ""))
        result = record
    if not stopped:
        save_model(os.path.join(args.out, "model_final.pt"), model, rank)
        log.info(f"done: {state['step']} steps, best val top-1 {state['best_top1']}")
    runlog.record("end", step=state["step"], epoch=state["epoch"], stopped=stopped,
                  best_top1=state["best_top1"])
    return result


def _exit_without_finalizing():
    """End a torchrun worker without Python's interpreter finalization. FSDP's device mesh keeps
    the gloo process group alive past destroy_process_group(); its worker threads may still be
    releasing a finished collective's tensors when the interpreter tears down, and that release
    aborts the process ("terminate called without an active exception", about one exit in 20 on
    a 2-core machine; pytorch/pytorch#179291 describes the race). Everything is written and
    flushed by then: checkpoints and logs are closed by main()."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_finalizing()
