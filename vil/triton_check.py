"""Ahead-of-time build of the ViL model's fused Triton kernels (vil.triton_conv, triton_gating,
triton_norm) at the tiles their launchers pick for ViL-T/S/B widths, for sm_80 and sm_90, with
Triton's own ptxas: registers, spill bytes, shared memory. No GPU needed.

    python -m vil.triton_check            # exits 1 when a kernel spills or fails to build

Widths and strides are specialized as multiples of 16, as the JIT does at ViL's shapes (the
unspecialized builds differ: 3.8's and 3.9's output-norm backward spilled there and not at the
launch's). A build that spills at ptxas's own register choice is checked as a launch runs it:
again, with the register cap lifted (the spill guard in vil_kernels._triton_runtime; Triton
3.6's ptxas spills 8 bytes in the conv's weight-gradient kernel on sm_90 at its own 72).

16-bit activations (bfloat16; float16 builds alike), float32 parameters where the launchers
pass them. The mLSTM kernels have their own check: python -m vil_kernels.compile_check.
"""

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile

WIDTHS = {"ViL-T": 192, "ViL-S": 384, "ViL-B": 768}       # inner = 2x, 4 heads
FP32_PARAMS = {"w", "b", "bias", "skip", "pw", "pb", "ps"}  # float32 pointers (conv: see below)
FLOATS = {"eps"}
WIDE_SIZES = {"C", "DH", "N"}          # channels, head width, norm width: multiples of 16 in ViL


def _pow2(n):
    return 1 << (n - 1).bit_length()


def variants():
    """(kernel module name, kernel, constexprs, warps) at every width the model uses."""
    from . import triton_conv as tc
    from ._triton import tiles
    from . import triton_gating as tg
    from . import triton_norm as tn
    out = []
    c = tc.CONFIG
    for act in (1, 2, 0):                         # forward; backward dc; backward dt
        out.append(("triton_conv", "_conv_silu_kernel",
                    dict(KH=3, KW=3, HAS_BIAS=act > 0, ACT=act, BW=c["BW"], BC=c["BC"]),
                    c["num_warps"]))
        # the rolling form at 4 rows a program (RB > 1: what bench/model_kernels.py --sweep
        # tries; the launcher's default is 1)
        out.append(("triton_conv", "_conv_rows_kernel",
                    dict(KW=3, HAS_BIAS=act > 0, ACT=act, BW=c["BW"], BC=c["BC"],
                         RB=max(c["RB"], 4)), c["rows_warps"]))
    out.append(("triton_conv", "_conv_dw_kernel", dict(KH=3, KW=3, BW=c["bwd_BW"], BC=c["BC"]),
                c["num_warps"]))
    for name, dim in WIDTHS.items():
        DH = 2 * dim // 4
        BS, BD = tiles(DH, tg.CONFIG["tile"])
        out.append(("triton_gating", "_gated_outnorm_kernel", dict(HAS_BIAS=True, BS=BS, BD=BD),
                    tg.CONFIG["num_warps"]))
        BS, BD = tiles(DH, tg.CONFIG["bwd_tile"])
        rows = max(BS, tg.CONFIG["rows"] // BS * BS)
        out.append(("triton_gating", "_gated_outnorm_bwd_kernel",
                    dict(HAS_BIAS=True, BS=BS, BD=BD, ROWS=rows), tg.CONFIG["bwd_warps"]))
        BM, BN = tiles(dim, tn.CONFIG["tile"])
        out.append(("triton_norm", "_layer_norm_kernel",
                    dict(HAS_W=True, HAS_B=True, BM=BM, BN=BN), tn.CONFIG["num_warps"]))
        BM, BN = tiles(dim, tn.CONFIG["bwd_tile"])
        rows = max(BM, tn.CONFIG["rows"] // BM * BM)
        out.append(("triton_norm", "_layer_norm_bwd_kernel",
                    dict(HAS_W=True, BM=BM, BN=BN, ROWS=rows), tn.CONFIG["num_warps"]))
    unique = []
    for v in out:                                 # widths that pick the same tiles build once
        if v not in unique:
            unique.append(v)
    return unique


def build(module, kernel, constexprs, warps, arch):
    """One kernel's row: registers, spill bytes, shared memory (or the build error). A build
    that spills at ptxas's own register choice is checked as a launch runs it
    (compile_check.spill_guarded)."""
    from vil_kernels.compile_check import spill_guarded
    return spill_guarded(lambda cap: _build(module, kernel, constexprs, warps, arch, cap), None)


def _build(module, kernel, constexprs, warps, arch, maxnreg=None):
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vil_kernels._triton_runtime import OPTIONS
    from vil_kernels.compile_check import ptxas_usage
    fn = getattr(importlib.import_module(f"vil.{module}"), kernel)
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in FLOATS:
            sig[a] = "fp32"
        elif a[0].isupper() or re.fullmatch(r"s[a-z]{0,2}(_[a-z])?", a):   # sizes, strides
            sig[a] = "i32"
        elif a in FP32_PARAMS and module != "triton_conv" or a in ("pw", "pb"):
            sig[a] = "*fp32"
        else:
            sig[a] = "*bf16"
    # pointers 16-byte aligned, and the widths and strides multiples of 16, as the JIT
    # specializes on at launch with ViL's shapes (the token grid's sides and lengths are not)
    attrs = {(j,): [["tt.divisibility", 16]] for j, (a, t) in enumerate(sig.items())
             if t.startswith("*") or t == "i32" and (a in WIDE_SIZES or a.startswith("s"))}
    row = dict(kernel=kernel, arch=arch, warps=warps,
               tiles=" ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper()),
               error=None)
    cache = knobs.cache.dir = tempfile.mkdtemp(prefix="vil_tc_")
    try:
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                                target=GPUTarget("cuda", arch, 32),
                                options=dict(OPTIONS, num_warps=warps,
                                             **({"maxnreg": maxnreg} if maxnreg else {})))
        row["regs"], row["spill"] = ptxas_usage(buf.getvalue())
        row["smem"] = int(ck.metadata.shared)
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return row


def main(argv=None):
    from vil_kernels.compile_check import lift_note
    os.environ.pop("TRITON_INTERPRET", None)      # real builds (before triton is imported)
    rows = [build(*v, arch) for arch in (90, 80) for v in variants()]
    bad = [r for r in rows if r["error"] or r["spill"]]
    print(f"{'kernel':28s} {'arch':>4s} {'warps':>5s} {'regs':>4s} {'spill':>5s} {'smem':>6s}  tiles")
    for r in rows:
        if r["error"]:
            print(f"{r['kernel']:28s} {r['arch']:4d} {r['warps']:5d}  FAILED {r['error']}")
        else:
            print(f"{r['kernel']:28s} {r['arch']:4d} {r['warps']:5d} {r['regs']:4d} "
                  f"{r['spill']:5d} {r['smem']:6d}  {r['tiles']}")
            if r.get("lifted"):
                print(lift_note(r["lifted"]))
    print(f"{len(rows)} builds, {len(bad)} with a spill or an error")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
