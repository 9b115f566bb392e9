"""Ahead-of-time compile check of the Triton mLSTM kernels, no GPU needed.

    python -m vil_kernels.compile_check            # every configuration the dispatcher can pick
    python -m vil_kernels.compile_check --quick    # a representative subset (the test suite)

Enumerates what vil_kernels.triton's dispatcher can launch: input dtypes (float32, float16,
bfloat16) x head dims (DQK, DV) in {64, 96, 128, 192, 256, 384, 512}^2 x chunk lengths (16, 32, 64
and the default: one tile a chunk; 128, 256, 1024: 2, 4, 16 tiles) x the matmul kernels (the two
pair kernels at chunks of several tiles only), the gate scan, the backward prologue and gate
epilogue, and the scans' split form at the scans' parameters (chunk_local, chunk_chain: chosen only
by a launch table or the tuner), maps each to its compiled variant (tiles, warps, stages, register
cap, dtypes: head dims are runtime values, so many head dims share one binary), and compiles every
distinct variant for sm_80 and sm_90 with triton's own ptxas. Prints kernel, config, arch,
registers, spill bytes (ptxas -v), shared memory, MMA instructions in the SASS (G: HGMMA, H:
HMMA; "d" where some wgmma runs on both warpgroups, the same products twice: doubled_dots),
programs an SM holds at once (occ, programs_per_sm), and the head dims each binary serves
(flag: HAS_INIT of the state scan, HAS_DLAST of the state-gradient scan, HAS_STATE of the
outputs, dq/dk and dv kernels,
Fs / Ts where the outputs kernel also computes the scores of chunks of several tiles; f/b and S
for the chain's direction and starting state; BV as 256+128 where the outputs kernel takes two V
tiles; BK as 256+128 and BT as 64x32, rows by keys, for the flash kernels; "dk" where the dq/dk
kernel makes dk alone, beside the flash backward). The flash forms (heuristics.FLASH_FORWARD and
FLASH_BACKWARD) are checked off, on and auto; --flash on / off / auto checks only one of those
settings. A build that spills under its register cap is built again without it, as a launch
runs it (the spill guard in vil_kernels._triton_runtime: caps were chosen with Triton 3.6's
ptxas, and other releases' ptxas spill at a few); the row says so. Exits 1 on any spill in
what a launch runs, on shared memory over the arch's limit (sm_80: 163 KB, sm_90:
227 KB), on registers x threads over the 64K register file, when a 16-bit build has no
HMMA/HGMMA instruction, on a pipelined loop whose asynchronous wgmma reads a single-buffered
tile (pipeline_hazards: a race Triton 3.6 creates), or on a compile error. With --tile 128 (or
a launch table naming tiles) chunks of several tiles are checked in the tiles bench/kernels.py
--tile would run.
"""

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

HEAD_DIMS = (64, 96, 128, 192, 256, 384, 512)
# requested chunk lengths: one tile a chunk (16, 32, 64; float32 inputs: 32 at most), and
# 2, 4 and 16 tiles of 64 (float32: 4, 8, 16 and 64 tiles of 16); with the one-chunk rule on
# (heuristics.ONE_CHUNK_UP_TO) every power of two up to it is a default: variants() adds them
CHUNKS = (16, 32, 64, 128, 256, 1024)
QUICK_CHUNKS = (64, 128)
DTYPES = ("float32", "float16", "bfloat16")
ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# the matmul kernels built with and without the carried-state terms (HAS_STATE)
STATE_FLAG_KERNELS = ("fwd_out", "bwd_dqk", "bwd_dv")


class Variant(NamedTuple):
    """One compiled variant. flag: HAS_INIT of the state scan, HAS_DLAST of the
    state-gradient scan, HAS_STATE of the outputs, dq/dk and dv kernels, HAS_W of the gate
    epilogue (None where a kernel has none; a string for the split scans' chain: "f"/"b" its
    direction, "S" a starting state). The gate scan has its chunk length in the BT slot and
    its chunks a block in the BV slot, the gate epilogue its block in the BV slot. BV2: the
    outputs kernel's (and the flash kernels') second V tile; scores: the outputs kernel
    computes the pairs' scores; BK2, BS: the flash kernels' second K tile and key tile; dq:
    the dq/dk kernel makes dq too (DQ; not beside the flash backward); KT: the pair kernels'
    key tiles a program."""
    kernel: str
    dtype: str
    arch: int
    BT: int
    BK: int
    BV: int
    warps: int
    stages: int
    flag: object
    maxnreg: object
    NT: int
    BV2: int = 0
    scores: bool = False
    BK2: int = 0
    BS: int = 0
    dq: bool = True
    KT: int = 1


def _signature(name, dt, qn_mma=False):
    """Argument types of each kernel (pointer dtypes for an input dtype dt; accumulators fp32).
    Scalars: S, NC, DK, DV, REVERSE, then NH and the (batch, head, position) strides of q and k
    (shared) and of v where the kernel reads v, then the float scalars."""
    # x: an input's dtype, which is also the per-chunk states' (C in, dC out) storage dtype
    x, a, i32 = f"*{_PTR[dt]}", "*fp32", "*i32"
    if name == "fwd_gates":    # i, f, m0, m_in, m_last, a_last, gain, decay, b_row, m_row, a_row;
        ptrs = [x, x, a, a, a, i32, a, a, a, a, i32]            # S, NC, REVERSE
        scalars = ["i32"] * 3
    elif name == "fwd_state":  # k, v, gain, decay, c0, n0, c_in, n_in, c_last, n_last
        ptrs = [x, x, a, a, a, a, x, a, a, a]
        scalars = ["i32"] * (5 + 7)
    elif name == "fwd_out":    # q, k, v, c_in, n_in, m_in, b_row, m_row, h, n_row, sc, rs;
        ptrs = [x] * 3 + [x, x if qn_mma else a, a, a, a, x, a, x, a]    # n_in: (hi, lo) pairs
        scalars = ["i32"] * (5 + 7) + ["fp32", "fp32"]                # in x at QN_MMA
    elif name == "fwd_flash":  # q, k, v, b_row, m_row, h, n_row; S, DK, DV, REVERSE, NH,
        ptrs = [x] * 3 + [a, a, x, a]                      # strides of q/k and of v
        scalars = ["i32"] * 11 + ["fp32", "fp32"]
    elif name == "bwd_flash":  # q, k, v, dh, b_row, den, dn, ps, ds, dq, rq; S, DK,
        ptrs = [x] * 4 + [a] * 3 + [x, x, x, a]      # DV, REVERSE, NH, strides of q/k, v, dq
        scalars = ["i32"] * 14 + ["fp32"]
    elif name == "fwd_pair":   # q, k, b_row, sc, rs; S, NC, DK, REVERSE, NH, strides
        ptrs = [x, x, a, x, a]
        scalars = ["i32"] * 8 + ["fp32"]
    elif name == "bwd_pair":   # q, k, v, dh, b_row, den, dn, ps, ds
        ptrs = [x] * 4 + [a] * 3 + [x, x]
        scalars = ["i32"] * (5 + 7) + ["fp32"]
    elif name == "bwd_state":  # q, dh, wa, wb, decay, dc_last, dn_last, dc_out, dn_out, dc0, dn0
        ptrs = [x, x] + [a] * 5 + [x, a, a, a]
        scalars = ["i32"] * (5 + 4)
    elif name == "bwd_dqk":    # q, k, v, dh, b_row, den, dn, c_in, n_in, m_in, m_last, dc_out,
        # dn_out, ds, dq, dk, rq, rk; strides of q/k, of v, then of dq/dk (batch, head, position)
        ptrs = [x] * 4 + [a] * 3 + [x, a, a, a, x, a, x] + [x, x, a, a]
        scalars = ["i32"] * (5 + 10) + ["fp32"]
    elif name == "bwd_dv":     # q, k, dh, b_row, den, m_in, m_last, dc_out, ps, dv; strides
        ptrs = [x, x, x] + [a] * 4 + [x, x, x]            # of q/k, then of dv (b, h, position)
        scalars = ["i32"] * (5 + 7) + ["fp32"]
    elif name == "chunk_local":  # x, y, wc, wn, c, n
        ptrs = [x, x, a, a, x, a]
        scalars = ["i32"] * (6 + 6)
    elif name == "chunk_chain":  # c, n, decay, c0, n0, c_end, n_end; NC, DK, DV
        ptrs = [x] + [a] * 6
        scalars = ["i32"] * 3
    elif name == "bwd_gates":  # rq, rk, dm_row, u, w, then f, di, df; S, NQ, NK, BH, REVERSE
        ptrs = [a] * 5 + [x] * 3
        scalars = ["i32"] * 5
    else:  # bwd_prologue: dh, h, then 11 float32 rows; S, NC, DV, REVERSE; scale, eps
        ptrs = [x] * 2 + [a] * 11
        scalars = ["i32"] * 4 + ["fp32", "fp32"]
    return ptrs, scalars


FLASH_CHOICES = {"off": False, "on": True, "auto": None}     # heuristics.FLASH_* settings


def variants(quick=False, dims=None, chunks=None, dtypes=None, flash=None):
    """Distinct compiled variants (Variant) the dispatcher can choose, each with the head dims
    it serves; with the flash forms (heuristics.FLASH_FORWARD and FLASH_BACKWARD, together)
    off, on and auto where flash is None, else at the FLASH_CHOICES word it names."""
    from .triton import heuristics
    if flash is None:
        out = {}
        for word in FLASH_CHOICES:
            for key, dims_served in variants(quick, dims, chunks, dtypes, flash=word).items():
                out.setdefault(key, set()).update(dims_served)
        return out
    was = heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD
    heuristics.FLASH_FORWARD = heuristics.FLASH_BACKWARD = FLASH_CHOICES[flash]
    try:
        return _variants(quick, dims, chunks, dtypes)
    finally:
        heuristics.FLASH_FORWARD, heuristics.FLASH_BACKWARD = was


def _variants(quick, dims, chunks, dtypes):
    import torch

    from .triton import heuristics
    from .triton.chunk import CHAIN_BLOCK
    out = {}
    dims = dims or ((192,) if quick else HEAD_DIMS)
    if not chunks and not quick:          # the one-chunk rule's defaults (heuristics)
        up_to = min(heuristics.ONE_CHUNK_UP_TO, heuristics.MAX_CHUNK)
        chunks = CHUNKS + tuple(1 << j for j in range(7, up_to.bit_length())
                                if 1 << j not in CHUNKS and 1 << j <= up_to)
    chunks = chunks or (QUICK_CHUNKS if quick else CHUNKS)
    dtypes = dtypes or (("bfloat16",) if quick else DTYPES)
    for dt in dtypes:
        dtype = getattr(torch, dt)
        for DK in dims:
            for DV in dims:
                for requested in chunks:
                    L = heuristics.chunk_len(4096, DK, DV, dtype, 90, requested)
                    tiles = {arch: heuristics.tile_len(L, dtype, DK, DV, arch) for arch in ARCHS}
                    # (where the outputs kernel computes the pair scores the forward pair
                    # kernel does not run)
                    out_p = {arch: heuristics.launch_params("fwd_out", DK, DV, L, dtype, arch)
                             for arch in ARCHS}
                    scores = {arch: heuristics.scores_in_outputs(
                        DV, out_p[arch]["BV"] + out_p[arch]["BV2"], tiles[arch],
                        L // tiles[arch]) for arch in ARCHS}
                    for name in heuristics.KERNELS:
                        for arch in ARCHS:
                            BT = tiles[arch]
                            NT = L // BT
                            if name in heuristics.PAIR_KERNELS and NT == 1:
                                continue
                            if name == "fwd_pair" and scores[arch]:
                                continue
                            p = heuristics.launch_params(name, DK, DV, L, dtype, arch)
                            backward = name == "bwd_flash"
                            if name in heuristics.FLASH_KERNELS:  # (one build, any chunk)
                                if heuristics.flash_applies(DK, DV, BT, NT, dtype, arch,
                                                            backward):
                                    key = Variant(name, dt, arch, BT, p["BK"], p["BV"],
                                                  p["num_warps"], p["num_stages"], None,
                                                  p["maxnreg"], 1, BV2=p["BV2"], BK2=p["BK2"],
                                                  BS=p["BS"])
                                    out.setdefault(key, set()).add((DK, DV))
                                continue
                            flags = (False, True) if name in heuristics.SCANS + (
                                STATE_FLAG_KERNELS) else (None,)
                            BV = 0 if name == "fwd_pair" else p["BV"]     # (reads no v)
                            for has_init in flags:      # HAS_INIT, HAS_DLAST, HAS_STATE
                                extra = {}
                                if name == "fwd_out":
                                    extra = dict(BV2=p["BV2"], scores=scores[arch])
                                cap = p["maxnreg"]
                                if name in STATE_FLAG_KERNELS:    # (by HAS_STATE, where given)
                                    cap = heuristics.launch_params(name, DK, DV, L, dtype, arch,
                                                                   has_init)["maxnreg"]
                                if name in heuristics.PAIR_KERNELS:
                                    extra = dict(KT=p["KT"])
                                key = Variant(name, dt, arch, BT, p["BK"], BV, p["num_warps"],
                                              p["num_stages"], has_init, cap, NT, **extra)
                                out.setdefault(key, set()).add((DK, DV))
                            if name == "bwd_dqk" and heuristics.flash_applies(
                                    DK, DV, BT, NT, dtype, arch, True):   # dk alone, no state
                                cap = heuristics.launch_params(name, DK, DV, L, dtype, arch,
                                                               False)["maxnreg"]
                                key = Variant(name, dt, arch, BT, p["BK"], BV, p["num_warps"],
                                              p["num_stages"], False, cap, NT, dq=False)
                                out.setdefault(key, set()).add((DK, DV))
                            if name in heuristics.SCANS:  # their split form, same parameters
                                key = Variant("chunk_local", dt, arch, BT, p["BK"], p["BV"],
                                              p["num_warps"], p["num_stages"], None,
                                              p["maxnreg"], NT)
                                out.setdefault(key, set()).add((DK, DV))
                    for arch in ARCHS:                      # the split scans' chain
                        for flag in ("f", "fS", "b", "bS"):
                            key = Variant("chunk_chain", dt, arch, 0, 0, CHAIN_BLOCK, 4, 1, flag,
                                          None, 1)
                            out.setdefault(key, set()).add((DK, DV))
                    for arch in ARCHS:                      # the gate scan and the prologue
                        BT = tiles[arch]
                        NT = L // BT
                        p = heuristics.prologue_params(DV, BT, dtype, arch)
                        key = Variant("bwd_prologue", dt, arch, BT, 0, p["BV"],
                                      p["num_warps"], 1, None, None, NT)
                        out.setdefault(key, set()).add((DK, DV))
                        for has_init in (False, True):
                            key = Variant("fwd_gates", dt, arch, L, 0, heuristics.gates_chunks(L),
                                          heuristics.GATES_WARPS, 1, has_init, None, 1)
                            out.setdefault(key, set()).add((DK, DV))
                        for has_w in (False, True):           # (w: the last state's)
                            key = Variant("bwd_gates", dt, arch, 0, 0, heuristics.GATES_BLOCK,
                                          4, 1, has_w, None, 1)
                            out.setdefault(key, set()).add((DK, DV))
    return out


def triton_tool(tool):
    """The path of one of the CUDA tools bundled with triton (ptxas, cuobjdump, nvdisasm)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def ptxas_usage(log):
    """(registers, spill bytes stored + loaded) of the last kernel in a ``ptxas -v`` log
    (Triton prints it with knobs.nvidia.dump_ptxas_log); registers -1 when absent."""
    regs = re.findall(r"Used (\d+) registers", log)
    spill_st = re.findall(r"(\d+) bytes spill stores", log)
    spill_ld = re.findall(r"(\d+) bytes spill loads", log)
    return (int(regs[-1]) if regs else -1,
            (int(spill_st[-1]) if spill_st else 0) + (int(spill_ld[-1]) if spill_ld else 0))


def spill_guarded(build, maxnreg):
    """The row (a dict with error and spill) of ``build(maxnreg)``, the build at a register
    cap (None: ptxas's own choice), as a launch runs it (_triton_runtime's spill guard): where
    it spills under a cap below UNCAPPED, ``build(UNCAPPED)``'s row if that spills less, with
    lifted = (the cap, its spill bytes). Also vil.triton_check's."""
    from ._triton_runtime import UNCAPPED
    row = build(maxnreg)
    if not row["error"] and row["spill"] and maxnreg != UNCAPPED:
        uncapped = build(UNCAPPED)
        if not uncapped["error"] and uncapped["spill"] < row["spill"]:
            uncapped["lifted"] = (maxnreg, row["spill"])
            return uncapped
    return row


def lift_note(lifted):
    """What a row's lifted = (cap, spill bytes) says, on a line under the row."""
    cap, spill = lifted
    at = f"a cap of {cap} registers" if cap else "ptxas's own register count"
    return f"  ^ uncapped: at {at} it spilled {spill} B"


def compile_one(key, constexprs=None):
    """Compile one variant (a Variant, or a tuple of its fields); returns a result row (dict).
    constexprs: overrides (tests). Spill-guarded (spill_guarded)."""
    key = Variant(*key)
    return spill_guarded(lambda cap: _build(key._replace(maxnreg=cap), constexprs),
                         key.maxnreg)


def _build(key, constexprs=None):
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import knobs

    from ._triton_runtime import OPTIONS
    from .triton import kernels
    from .triton.heuristics import FLASH_KERNELS, dot_config

    key = Variant(*key)
    name, dt, arch, BT, BK, BV, warps, stages, has_init, maxnreg, NT = key[:11]
    fn = getattr(kernels, f"mlstm_{name}_kernel")
    import torch
    mma, acc, prec = dot_config(getattr(torch, dt))
    tl_of = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    qn_mma = (constexprs or {}).get("QN_MMA", stages > 1)     # fwd_out, as mlstm_fwd sets it
    ptrs, scalars = _signature(name, dt, qn_mma)
    if name == "bwd_prologue":
        const_names, const_vals = ["BT", "NT", "BV", "ACC"], [BT, NT, BV, tl_of[acc]]
    elif name == "chunk_chain":
        const_names = ["BLOCK", "BACKWARD", "HAS_START", "ACC"]
        const_vals = [BV, has_init[0] == "b", "S" in has_init, tl_of[acc]]
    elif name == "fwd_gates":
        # its chunk length in the BT slot, its chunks a block in the BV slot
        const_names, const_vals = ["L", "BC", "HAS_INIT", "ACC"], [BT, BV, bool(has_init),
                                                                    tl_of[acc]]
    elif name == "bwd_gates":       # its block of positions in the BV slot, HAS_W the flag's
        const_names, const_vals = ["BS", "HAS_W", "ACC"], [BV, bool(has_init), tl_of[acc]]
    else:
        # the flag: HAS_INIT, HAS_DLAST of the scans, HAS_STATE of the outputs, dq/dk and dv
        # kernels
        flags = {"fwd_state": {"HAS_INIT": bool(has_init)},
                 "bwd_state": {"HAS_DLAST": bool(has_init)},
                 "fwd_out": {"QN_MMA": qn_mma}}.get(name, {})
        if name in STATE_FLAG_KERNELS:
            flags["HAS_STATE"] = bool(has_init)
        if name == "fwd_out":
            flags["SCORES"] = key.scores
        if name == "bwd_dqk":
            flags["DQ"] = key.dq
        tiles = {"BT": BT, "NT": NT, "BK": BK, "BV": BV}
        if name == "fwd_out":
            tiles["BV2"] = key.BV2
        if name in FLASH_KERNELS:
            tiles = {"BT": BT, "BS": key.BS, "BK": BK, "BK2": key.BK2, "BV": BV, "BV2": key.BV2}
        if name == "fwd_pair":                  # (no V tiles: it never reads v)
            del tiles["BV"]
        if name in ("fwd_pair", "bwd_pair"):
            tiles["KT"] = key.KT
        const_names = list(tiles) + list(flags) + ["MMA", "ACC", "PREC", "INTERP"]
        const_vals = list(tiles.values()) + list(flags.values()) + \
            [tl_of[mma], tl_of[acc], prec, False]
    arg_names = fn.arg_names
    n_rt = len(arg_names) - len(const_names)
    assert n_rt == len(ptrs) + len(scalars), (name, n_rt, len(ptrs), len(scalars))
    sig = dict(zip(arg_names[:n_rt], ptrs + scalars))
    sig.update({c: "constexpr" for c in const_names})
    consts = dict(zip(const_names, const_vals), **(constexprs or {}))
    # pointers are 16-byte aligned; DK and DV (scalars 2 and 3) and the q, k, v strides
    # (scalars 6 on, before the floats) are multiples of 16, which the JIT specializes on at
    # launch as well (the launcher copies inputs whose strides are not)
    n_int = sum(t == "i32" for t in scalars)
    attrs = {(j,): [["tt.divisibility", 16]] for j in range(len(ptrs))}
    # DV for the prologue; DK, DV and the strides for the matmul kernels; none for the gate scan
    divisible = {"bwd_prologue": (2,), "fwd_gates": (), "bwd_gates": (),
                 "chunk_chain": (1, 2), "fwd_pair": (2, 5, 6, 7),
                 **dict.fromkeys(FLASH_KERNELS, (1, 2, *range(5, n_int)))}.get(
        name, (2, 3, *range(6, n_int)))
    attrs.update({(len(ptrs) + j,): [["tt.divisibility", 16]] for j in divisible})
    src = ASTSource(fn, sig, consts, attrs)
    row = dict(kernel=name, dtype=dt, arch=arch, BT=BT, NT=NT, BK=BK, BV=BV, BV2=key.BV2,
               BK2=key.BK2, BS=key.BS, dq=key.dq, KT=key.KT,
               warps=warps, stages=stages, has_init=has_init, scores=key.scores,
               maxnreg=maxnreg, error=None)
    t0 = time.time()
    # a fresh cache, so that ptxas runs and logs registers and spills
    cache = knobs.cache.dir = tempfile.mkdtemp(prefix="vil_cc_")
    try:
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            opts = dict(OPTIONS, num_warps=warps, num_stages=stages)    # as launches ask
            if maxnreg:
                opts["maxnreg"] = maxnreg
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        log = buf.getvalue()
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(e).__name__}: {str(e)[-600:]}"
        return row
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    row["regs"], row["spill"] = ptxas_usage(log)
    row["smem"] = int(ck.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(ck.asm["cubin"])
        path = fh.name
    try:
        sass = subprocess.run([triton_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.remove(path)
    row["hmma"] = len(re.findall(r"\bHMMA\b", sass))
    row["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    row["hazards"] = pipeline_hazards(ck.asm["ttgir"])
    row["doubled"] = doubled_dots(ck.asm["ttgir"])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def doubled_dots(ttgir):
    """Result shapes ("64x32") of the wgmma whose layout spans more rows than the tile:
    Triton 3.6 gives a dot whose result feeds another dot (the scores before P V) all warps
    along the rows (warpsPerCTA [num_warps, 1], FlashAttention's 128-row tiles at 8 warps), so
    at 8 warps a 64-row tile is computed by both warpgroups, the same products twice. Not a
    failure: the flash kernels at 8 warps pay it for their accumulators' registers."""
    layouts = {m: int(w) for m, w in re.findall(
        r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 3,[^}]*warpsPerCTA = \[(\d+),", ttgir,
        flags=re.M)}
    shapes = re.findall(r"ttng\.warp_group_dot .*-> tensor<(\d+)x(\d+)xf\d+, (#mma\d*)>", ttgir)
    return sorted({f"{m}x{n}" for m, n, lay in shapes if layouts.get(lay, 0) * 16 > int(m)})


def pipeline_hazards(ttgir):
    """Shared-memory buffers of a software-pipelined loop that Triton gave a single slot although
    an asynchronous wgmma reads them: the next iteration's copy into the slot can overwrite the
    tile the MMA is still reading. Triton 3.6 does this to a loaded tile that also feeds an
    elementwise reduction in the loop (wrong outputs on an H200; triton-lang/triton#6691).
    Returns the buffers' names in the TTGIR (empty when there is no such hazard)."""
    name = r"%[\w.]+"
    single = set(re.findall(rf"({name}) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<1x", ttgir))
    views = {b: b for b in single}                 # a view of a single-slot buffer -> buffer
    grown = True
    while grown:
        grown = False
        for view, src in re.findall(rf"({name}) = ttg\.memdesc_\w+ ({name})", ttgir):
            if src in views and view not in views:
                views[view] = views[src]
                grown = True
    hazards = set()
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line and "isAsync = true" in line:
            operands = line.split("warp_group_dot", 1)[1].split("{", 1)[0]
            hazards.update(views[v] for v in re.findall(name, operands) if v in views)
    return sorted(hazards)


def problems(row):
    bad = []
    if row["error"]:
        return [row["error"]]
    if row["spill"] > 0:
        bad.append(f"spills {row['spill']} B")
    if row.get("hazards"):
        bad.append(f"single-buffered async MMA operand {', '.join(row['hazards'])} (races)")
    if row["regs"] * row["warps"] * 32 > 65536:
        bad.append(f"{row['regs']} registers x {row['warps'] * 32} threads > 64K register file")
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        bad.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]}")
    if (row["dtype"] in ("bfloat16", "float16") and row["hmma"] + row["hgmma"] == 0
            and row["kernel"] not in ("bwd_prologue", "fwd_gates", "bwd_gates",
                                      "chunk_chain")):                 # no dot
        bad.append("no tensor-core MMA in SASS")
    return bad


def programs_per_sm(regs, warps, smem, arch):
    """Programs (CTAs) of one kernel an SM holds at once, from its registers (allocated per warp
    in units of 256), its shared memory (plus 1 KB the driver reserves per CTA; 228 KB per SM
    on sm_90, 164 KB on sm_80) and the 2048-thread and 32-CTA limits. Latency-bound kernels such
    as the state scans get faster with every extra one (see heuristics.scan_maxnreg)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = ({80: 164, 90: 228}[arch] * 1024) // (smem + 1024)
    return max(0, min(by_regs, by_smem, 2048 // (32 * warps), 32))


def _dims_str(dims):
    ks = sorted({d[0] for d in dims})
    vs = sorted({d[1] for d in dims})
    return f"DK{{{','.join(map(str, ks))}}} DV{{{','.join(map(str, vs))}}}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="head dim 192 (3 x 64 tiles), chunks 64 and 128 (one and two tiles), "
                         "bfloat16, both archs: the "
                         "ViL-S configuration, a representative subset for the test suite")
    ap.add_argument("--dims", type=int, nargs="+", help="head dims (DQK and DV from these)")
    ap.add_argument("--chunks", type=int, nargs="+", help="requested chunk sizes")
    ap.add_argument("--arch", type=int, choices=ARCHS, action="append",
                    help="only this arch (repeatable)")
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--dtype", action="append", choices=DTYPES, help="only this dtype (repeatable)")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--tile", type=int, default=None,
                    help="positions a tile in chunks of several tiles, as bench/kernels.py "
                         "--tile forces it (heuristics.TILE: one of 16, 32, 64, 128); a launch "
                         "table's tiles are checked where $VIL_KERNELS_LAUNCH_TABLE names it")
    ap.add_argument("--key-tiles", type=int, default=None,
                    help="the pair kernels' key tiles a program (heuristics.PAIR_KEY_TILES: "
                         "1, 2 or 4; above 1 at 8 warps, two warpgroups sharing the key "
                         "tiles), as bench/tune.py sweeps them; default: the table's, 1")
    ap.add_argument("--flash", choices=tuple(FLASH_CHOICES), default=None,
                    help="only with the flash forms on (what VIL_KERNELS_FLASH_FORWARD=1 "
                         "and VIL_KERNELS_FLASH_BACKWARD=1 run), off (the default), or auto "
                         "(each where it builds at 4 warps); default: all three")
    args = ap.parse_args(argv)
    from .triton import heuristics
    if args.tile is not None:
        if args.tile not in heuristics.TUNABLE_TILES:
            ap.error(f"--tile takes one of {heuristics.TUNABLE_TILES}, got {args.tile}")
        heuristics.TILE = args.tile
    if args.key_tiles is not None:
        if args.key_tiles not in heuristics.PAIR_KEY_TILES:
            ap.error(f"--key-tiles takes one of {heuristics.PAIR_KEY_TILES}, got "
                     f"{args.key_tiles}")
        wide = dict(KT=args.key_tiles, **({"num_warps": 8} if args.key_tiles > 1 else {}))
        heuristics.OVERRIDES.update({k: dict(wide) for k in heuristics.PAIR_KERNELS})
    t0 = time.time()
    todo = variants(args.quick, args.dims, args.chunks, args.dtype,
                    flash=args.flash)
    todo = {k: v for k, v in todo.items()
            if (not args.arch or k[2] in args.arch) and (not args.kernel or k[0] in args.kernel)
            and (not args.dtype or k[1] in args.dtype)}
    keys = sorted(todo, key=lambda k: (k.kernel, k.dtype, k.arch, k.BT, k.NT, k.BK, k.BV, k.BV2,
                                       k.scores, k.dq, k.KT, str(k.flag)))
    env_had = os.environ.pop("TRITON_INTERPRET", None)
    try:
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                rows = list(pool.map(compile_one, keys))
        else:
            rows = [compile_one(k) for k in keys]
    finally:
        if env_had is not None:
            os.environ["TRITON_INTERPRET"] = env_had
    hdr = (f"{'kernel':<12} {'dtype':<8} {'arch':<5} {'BT':>5} {'NT':>2} {'BK':>7} {'BV':>7} "
           f"{'w':>2} {'st':>2} {'flag':<5} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':>6} "
           f"{'occ':>3}  head dims / status")
    print(hdr)
    print("-" * len(hdr))
    failed = lifted = 0
    for key, row in zip(keys, rows):
        bad = problems(row)
        failed += bool(bad)
        flag = row["has_init"]
        init = "" if flag is None else flag if isinstance(flag, str) else str(flag)[0]
        init += "s" if row["scores"] else ""
        init += "" if row["dq"] else "dk"
        bv = f"{row['BV']}+{row['BV2']}" if row["BV2"] else str(row["BV"])
        bk = f"{row['BK']}+{row['BK2']}" if row["BK2"] else str(row["BK"])
        # (rows x keys: the flash kernels' key tiles, the pair kernels' KT key tiles)
        bt = (f"{row['BT']}x{row['BS']}" if row["BS"] else
              f"{row['BT']}x{row['BT'] * row['KT']}" if row.get("KT", 1) > 1 else str(row["BT"]))
        config = (f"{row['kernel']:<12} {row['dtype']:<8} sm{row['arch']:<3} {bt:>5} "
                  f"{row['NT']:>2} {bk:>7} {bv:>7} {row['warps']:>2} "
                  f"{row['stages']:>2} {init:<5}")
        if row["error"]:
            print(f"{config} FAIL {row['error']}")
            continue
        mma = f"G{row['hgmma']}" if row["hgmma"] else (f"H{row['hmma']}" if row["hmma"] else "-")
        mma += "d" if row.get("doubled") else ""              # (doubled_dots)
        status = "FAIL " + "; ".join(bad) if bad else "ok"
        print(f"{config} {row['regs']:>4} {row['spill']:>5} {row['smem']:>7} {mma:>6} "
              f"{programs_per_sm(row['regs'], row['warps'], row['smem'], row['arch']):>3}  "
              f"{_dims_str(todo[key])} {status}")
        if row.get("lifted"):               # (a line of its own: the row's columns stay)
            lifted += 1
            print(lift_note(row["lifted"]))
    print(f"\n{len(rows)} variants compiled in {time.time() - t0:.0f} s with {args.jobs} "
          f"process(es); {failed} failed; {lifted} uncapped where their register cap "
          f"spilled (the spill guard, vil_kernels._triton_runtime)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
