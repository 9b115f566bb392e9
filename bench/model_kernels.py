"""Micro-benchmarks of the ViL layer's work around the mLSTM cell, fused Triton kernel against the
PyTorch path it replaces on CUDA (autocast bfloat16, as the main job runs; inference, or forward
and backward with --mode train):

    conv      depthwise 3x3 conv + bias + SiLU on the up-projection's strided half (cuDNN:
              channels-last copy, conv, broadcast bias add, SiLU)
    gating    per-head output norm + skip + silu(z) gate (PyTorch: vil.layers.gated_outnorm)
    prenorm   the block's pre-norm as the up-projection receives it (autocast: float32 norm of a
              float32 copy, rounded back)
    headwise  the per-head q/k/gate projection, baddbmm against a GEMM a head with the bias in
              cuBLASLt's epilogue (training: vil.model._PerHeadLinear)
    patch     the 16x16 patch embedding of 3-channel images, the conv against one GEMM over
              gathered pixels (PatchEmbed.tokens)

    python bench/model_kernels.py                        # ViL-T/S/B shapes, 448 px, batch 256
    python bench/model_kernels.py --sweep                # and the Triton kernels' launch configs
    python bench/model_kernels.py --mode train           # forward + backward of each op
    python bench/model_kernels.py --device cpu           # a dry run (TRITON_INTERPRET=1), tiny

Times are CUDA-event medians in ms a call; a ViL step makes 24 calls of each.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if "--device" in sys.argv and "cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")        # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import device_name  # noqa: E402
from vil import triton_conv, triton_gating, triton_norm  # noqa: E402
from vil.layers import LayerNorm, MultiHeadLayerNorm, SequenceConv2d, gated_outnorm  # noqa: E402
from vil.model import PatchEmbed, _per_head_addmm, _PerHeadLinear  # noqa: E402

MODELS = {"T": 192, "S": 384, "B": 768}                   # ViL width; inner = 2x, 4 heads
SWEEPS = {
    # (and the rolling form: RB grid rows a program at rows_warps; num_warps stays the
    # weight-gradient kernel's default there)
    "conv": (triton_conv.CONFIG, [dict(BW=bw, BC=bc, num_warps=w, RB=1) for bw, bc, w in
                                  itertools.product((16, 32, 64), (32, 64, 128), (2, 4, 8))]
             + [dict(BW=bw, BC=bc, num_warps=2, RB=rb, rows_warps=w) for (bw, bc), rb, w in
                itertools.product(((16, 128), (32, 64), (16, 64)), (2, 4, 8), (4, 8))]),
    "gating": (triton_gating.CONFIG, [dict(tile=t, num_warps=w) for t, w in
                                      itertools.product((1024, 2048, 4096, 8192), (2, 4, 8))]),
    "prenorm": (triton_norm.CONFIG, [dict(tile=t, num_warps=w) for t, w in
                                     itertools.product((1024, 2048, 4096, 8192), (2, 4, 8))]),
}


def time_ms(fn, device, reps):
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cases(dim, B, grid, device, train):
    """{op: (pytorch_fn, fused_fn)} at one model width; with ``train`` each fn runs forward and
    backward (the inputs and parameters requiring gradients)."""
    inner, NH = 2 * dim, 4
    DH, S = inner // NH, grid[0] * grid[1]
    bf = dict(device=device, dtype=torch.bfloat16, requires_grad=train)
    xz = torch.randn(B, S, 2 * inner, **bf)
    x_m, z = xz.split(inner, dim=-1)                      # strided halves, as in the model
    conv = SequenceConv2d(inner, inner, kernel_size=3, padding=1, groups=inner).to(device)
    h = torch.randn(B, NH, S, DH, **bf)
    a = torch.randn(B, S, inner, **bf)
    norm = MultiHeadLayerNorm(inner, weight=True, bias=True).to(device)
    skip = torch.ones(inner, device=device, requires_grad=train)
    x = torch.randn(B, S, dim, **bf)
    pre = LayerNorm(dim, weight=True, bias=True).to(device)
    leaves = [xz, h, a, skip, x] + list(conv.parameters()) + list(norm.parameters()) + \
        list(pre.parameters())
    P = 2 * DH + 16                                       # q, k and the gate columns, padded
    A = x_m.reshape(B * S, NH, DH).transpose(0, 1)
    w = torch.randn(NH, DH, P, device=device, requires_grad=train)
    b = torch.randn(NH, 1, P, device=device, requires_grad=train)
    patch = PatchEmbed(dim, 3, (16 * grid[0], 16 * grid[1]), 16).to(device)
    img = torch.randn(B, 3, 16 * grid[0], 16 * grid[1], device=device)
    leaves += [w, b] + list(patch.parameters())
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16)   # noqa: E731

    def conv_torch():
        with ac():
            return torch.nn.functional.silu(conv(x_m, grid), inplace=True)

    def gating_torch():
        return gated_outnorm(h, norm, skip, a, z)        # inference: in place in a

    def prenorm_torch():
        with ac():
            return pre(x).to(torch.bfloat16)

    def headwise_torch():
        with ac():
            return torch.baddbmm(b, A, w)

    def headwise_fused():
        with ac():
            return _PerHeadLinear.apply(A, w, b) if train else _per_head_addmm(A, w, b)

    def patch_torch():
        with ac():
            return patch(img).flatten(2).transpose(1, 2)

    def patch_fused():
        with ac():
            return patch.tokens(img)[0]

    ops = {
        "conv": (conv_torch, lambda: conv.forward_silu_fused(x_m, grid)),
        "gating": (gating_torch, lambda: triton_gating.gated_outnorm_triton(h, norm, skip, a, z)),
        "prenorm": (prenorm_torch,
                    lambda: triton_norm.layer_norm_triton(x, pre.weight_proxy, pre.bias, pre.eps)),
        "headwise": (headwise_torch, headwise_fused),
        "patch": (patch_torch, patch_fused),
    }
    if not train:
        return ops

    def fwd_bwd(fn):
        def run():
            for t in leaves:
                t.grad = None
            out = fn()
            out.backward(torch.ones_like(out))
        return run

    return {op: (fwd_bwd(ref), fwd_bwd(fused)) for op, (ref, fused) in ops.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="T,S,B")
    ap.add_argument("--resolution", type=int, default=None, help="default 448 (CUDA), 64 (CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (CUDA), 1 (CPU)")
    ap.add_argument("--reps", type=int, default=None, help="default 20 (CUDA), 1 (CPU)")
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernels' configs")
    ap.add_argument("--mode", choices=("inference", "train"), default="inference",
                    help="train: forward and backward of each op")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results-file")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    res = args.resolution or (448 if cuda else 64)
    B = args.batch_size or (256 if cuda else 1)
    reps = args.reps or (20 if cuda else 1)
    grid = (res // 16, res // 16)
    rows, sweeps = [], {}
    torch.manual_seed(0)
    with torch.set_grad_enabled(args.mode == "train"):
        for m in args.models.split(","):
            ops = cases(MODELS[m], B, grid, dev, args.mode == "train")
            for op, (ref, fused) in ops.items():
                t_ref, t_fused = time_ms(ref, dev, reps), time_ms(fused, dev, reps)
                rows.append(dict(model=f"ViL-{m}", op=op, mode=args.mode, pytorch_ms=t_ref,
                                 fused_ms=t_fused, speedup=t_ref / t_fused))
                print(f"ViL-{m} {args.mode} {op:9s} pytorch {t_ref:8.3f} ms  fused {t_fused:8.3f} ms  "
                      f"{t_ref / t_fused:5.2f}x", flush=True)
                if args.sweep and op in SWEEPS:
                    config, grid_ = SWEEPS[op]
                    keep = dict(config)
                    for c in grid_:
                        config.update(c)
                        try:
                            t = time_ms(fused, dev, reps)
                        except Exception as e:  # noqa: BLE001 - e.g. out of resources
                            t = float("nan")
                            print(f"  {c}: {type(e).__name__}", flush=True)
                        sweeps.setdefault(op, {}).setdefault(json.dumps(c), {})[m] = t
                    config.clear()
                    config.update(keep)
    for op, table in sweeps.items():
        # the config with the least total time over the models, against the current one (the
        # module's config in the keys of the sweep's first entry)
        best = min(table.items(), key=lambda kv: sum(kv[1].values()))
        config, grid_ = SWEEPS[op]
        current = json.dumps({k: config[k] for k in grid_[0]})
        print(f"sweep {op}: best {best[0]} {best[1]} (current {current}: "
              f"{table.get(current, 'not in grid')})")
    if args.results_file:
        meta = dict(device=device_name(dev), torch=torch.__version__, resolution=res,
                    batch_size=B, reps=reps, mode=args.mode, dtype="bfloat16 autocast")
        Path(args.results_file).write_text(json.dumps(dict(meta=meta, rows=rows, sweeps=sweeps),
                                                      indent=1))
    return rows


if __name__ == "__main__":
    main()
