"""Where a ViL step spends its time, by kind of GPU kernel: the mLSTM kernels against the GEMMs,
convs, norms and elementwise work around them.

    python bench/profile_model.py                              # ViL-T, 448 px, batch 256
    python bench/profile_model.py --model vil2-base --mode train --results-file prof.json

Runs the model as the main job does (autocast bfloat16, inference mode or one AdamW training
step) under torch.profiler after a warm-up, and prints the GPU time per step of every kernel
and of each group (groups are matched on the kernel's name; ``other`` holds the rest). On the CPU
it is a dry run at a tiny size (operators' self time instead of kernels).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import device_name  # noqa: E402
from profile_op import kernel_table  # noqa: E402
from throughput import Runner, create_vil  # noqa: E402

# (group, pattern on the kernel name), first match wins
GROUPS = [
    ("mlstm", r"mlstm_"),
    ("gating", r"gated_outnorm|_gating"),
    ("gemm", r"gemm|sm90_xmma|sm80_xmma|cutlass|ampere_|hopper_|nvjet|bmm|matmul|addmm|aten::mm$"),
    ("conv", r"conv|depthwise|implicit"),
    ("norm", r"layer_norm|LayerNorm|norm_kernel|welford"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy", r"copy|cat_|CatArray|transpose|flip|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|silu|sigmoid|reduce|unrolled"),
]


def group_of(name):
    return next((g for g, pat in GROUPS if re.search(pat, name)), "other")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vil2-tiny")
    ap.add_argument("--resolution", type=int, default=None, help="default 448 (CUDA), 64 (CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (CUDA), 2 (CPU)")
    ap.add_argument("--mode", choices=("inference", "train"), default="inference")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results-file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    res = args.resolution or (448 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 2)
    model = create_vil(args.model, res, "auto")
    runner = Runner(model, dev, torch.bfloat16 if cuda else torch.float32, amp=cuda,
                    compile_=None)
    runner.res = res
    x, y = runner.inputs(batch)
    step = (lambda: runner.infer_step(x, y)) if args.mode == "inference" else \
        (lambda: runner.train_step(x, y))
    for _ in range(2):
        step()
    per = kernel_table(step, args.reps, dev)
    groups = {}
    for name, ms in per.items():
        g = group_of(name)
        groups[g] = groups.get(g, 0.) + ms
    total = sum(per.values())
    print(f"{args.model} {res} px batch {batch} {args.mode}: {total:.2f} ms of kernels a step "
          f"({device_name(dev)})")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:9.3f} ms  {100 * ms / total:5.1f}%  {g}")
    print("top kernels:")
    for name, ms in list(per.items())[:25]:
        print(f"  {ms:9.3f} ms  [{group_of(name)}] {name[:120]}")
    if args.results_file:
        meta = dict(device=device_name(dev), torch=torch.__version__, model=args.model,
                    resolution=res, batch_size=batch, mode=args.mode, dtype="bfloat16 autocast"
                    if cuda else "float32")
        Path(args.results_file).write_text(json.dumps(
            dict(meta=meta, total_ms=total, groups=groups, kernels=per), indent=1))
    return groups


if __name__ == "__main__":
    main()
