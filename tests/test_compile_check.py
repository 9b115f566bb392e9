"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed).

Runs `python -m vil_kernels.compile_check --quick` (the ViL-S configuration: head dim 192, chunks
of 64 and 128, one and two tiles, bfloat16, every kernel incl. the split scans' two, the pair
kernels of multi-tile chunks and the opt-in flash forward's, both archs) in a subprocess without TRITON_INTERPRET: it fails on a
compile error, a register spill, shared memory over the arch limit or a bfloat16 build without
tensor-core MMA. The full matrix is `python -m vil_kernels.compile_check`.
"""

from helpers import run_built


def test_variants_cover_every_kernel_and_head_dim():
    from vil_kernels import compile_check
    from vil_kernels.triton import heuristics, kernels

    for name in heuristics.KERNELS:
        assert hasattr(kernels, f"mlstm_{name}_kernel")
    todo = compile_check.variants()
    served = set().union(*todo.values())
    dims = compile_check.HEAD_DIMS
    assert served == {(a, b) for a in dims for b in dims}
    assert {k[0] for k in todo} == set(heuristics.KERNELS) | {
        "fwd_gates", "bwd_prologue", "bwd_gates", "chunk_local", "chunk_chain"}
    assert {k[2] for k in todo} == {80, 90}
    from vil_kernels.triton.chunk import CHAIN_BLOCK
    assert {k[5] for k in todo if k[0] == "chunk_chain"} == {CHAIN_BLOCK}
    # chunks of one tile, and of 2, 4, 8 (the one-chunk rule's 512) and 16 tiles of 64
    # (float32: 4, 8, 16, 32, 64 of 16)
    assert {k[10] for k in todo if k[0] == "fwd_out"} == {1, 2, 4, 8, 16, 32, 64}
    assert {k[10] for k in compile_check.variants(quick=True) if k[0] == "bwd_dqk"} == {1, 2}
    # the pair kernels exist for chunks of several tiles only
    for name in heuristics.PAIR_KERNELS:
        assert {k[10] for k in todo if k[0] == name} == {2, 4, 8, 16, 32, 64}


def test_wide_value_blocks_run_eight_warps():
    """An outputs-kernel V block of more than 128 columns (the forced flash forward's, with
    carried states) runs 8 warps: at 4, DV=256 and 512 as one tile spilled 64 B to 8 KB, in
    builds the quick check (D=192) never makes (found by session 20's full check)."""
    from vil_kernels import compile_check
    wide = [k for k in compile_check.variants() if k.kernel == "fwd_out" and k.BV + k.BV2 > 128]
    assert {k.BV + k.BV2 for k in wide} >= {256, 384, 512}
    assert all(k.warps == 8 for k in wide), [k for k in wide if k.warps != 8]


def test_compile_check_quick():
    res = run_built(["-m", "vil_kernels.compile_check", "--quick"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    rows = [line for line in out.splitlines() if line.endswith(" ok")]
    kernels = {line.split()[0] for line in rows}
    assert kernels == {"fwd_gates", "fwd_state", "fwd_out", "bwd_prologue", "bwd_state",
                       "bwd_dqk", "bwd_dv", "bwd_gates", "chunk_local", "chunk_chain",
                       "fwd_pair", "bwd_pair", "fwd_flash", "bwd_flash"}, out
    assert {line.split()[2] for line in rows} == {"sm80", "sm90"}, out
    assert "0 failed" in out


def test_pipeline_hazard_detected():
    """The outputs kernel at two stages: summing products of q (the form it runs at one stage)
    makes Triton 3.6 single-buffer q under its async wgmma, a race that gave wrong outputs on
    an H200; pipeline_hazards finds it, and the QN_MMA form the launcher uses from two stages
    on has none."""
    code = (
        "from vil_kernels.compile_check import compile_one\n"
        "key = ('fwd_out', 'bfloat16', 90, 64, 64, 128, 4, 2, True, 255, 1)\n"
        "print(compile_one(key, {'QN_MMA': False})['hazards'])\n"
        "print(compile_one(key)['hazards'])\n")
    res = run_built(["-c", code], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    racy, fixed = res.stdout.strip().splitlines()[-2:]
    assert racy.startswith("['%b_q") and fixed == "[]", res.stdout


def test_a_cap_that_spills_is_checked_uncapped():
    """The spill guard as compile_check applies it: the outputs kernel (ViL-B's V tiles of 128)
    capped at 96 registers spills; its row is the uncapped build's, which does not, and says
    which cap spilled how much."""
    code = (
        "from vil_kernels.compile_check import compile_one\n"
        "row = compile_one(('fwd_out', 'bfloat16', 90, 64, 64, 128, 4, 2, True, 96, 1))\n"
        "print(row['maxnreg'], row['regs'], row['spill'], row['lifted'])\n")
    res = run_built(["-c", code], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    cap, regs, spill, lifted = res.stdout.strip().splitlines()[-1].split(" ", 3)
    assert (cap, spill) == ("255", "0") and int(regs) > 96, res.stdout
    assert lifted.startswith("(96, ") and int(lifted[5:-1]) > 0, res.stdout


def test_programs_per_sm():
    from vil_kernels.compile_check import programs_per_sm
    # the scans on sm_90 at 4 warps: uncapped (181 registers), capped at 168 (159), at 128
    assert [programs_per_sm(r, 4, 16384, 90) for r in (181, 159, 128)] == [2, 3, 4]
    assert programs_per_sm(255, 8, 24576, 80) == 1
    assert programs_per_sm(32, 4, 100 * 1024, 90) == 2        # shared memory binds
    assert programs_per_sm(16, 1, 0, 90) == 32                # the CTA limit


def test_model_fused_kernels_build_without_spills():
    """`python -m vil.triton_check`: the ViL model's fused kernels (conv + SiLU, gating,
    pre-norm; forward and backward) at the tiles their launchers pick for ViL-T/S/B, for sm_80
    and sm_90, without a spill."""
    res = run_built(["-m", "vil.triton_check"], timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "38 builds, 0 with a spill or an error" in out, out[-3000:]


def test_one_chunk_rule_defaults_are_checked(monkeypatch):
    """With heuristics.ONE_CHUNK_UP_TO on, every power of two up to it is a default chunk: the
    full check builds those chunk lengths too (512: eight tiles of 64)."""
    from vil_kernels import compile_check
    from vil_kernels.triton import heuristics
    tiles = lambda: {key.NT for key in compile_check.variants(dims=(64,),  # noqa: E731
                                                              dtypes=("bfloat16",))}
    assert 8 in tiles()
    monkeypatch.setattr(heuristics, "ONE_CHUNK_UP_TO", 0)
    assert 8 not in tiles()


def test_tiles_of_128_build_without_spills():
    """`compile_check --tile 128` (what bench/kernels.py --tile 128 runs, opt-in until timed on
    a GPU): ViL-B's one chunk in tiles of 128 at 8 warps on sm_90 (two warpgroups of 64 rows),
    every kernel the one-chunk pass launches, without a spill; sm_80 keeps tiles of 64 (its
    backward pair kernel spills at 128)."""
    cmd = ["-m", "vil_kernels.compile_check", "--tile", "128", "--dims", "384",
           "--chunks", "1024", "--dtype", "bfloat16"]
    for name in ("fwd_pair", "fwd_out", "bwd_pair", "bwd_dqk", "bwd_dv"):
        cmd += ["--kernel", name]
    res = run_built(cmd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.endswith(" ok")]
    assert {(r[0], r[2], r[3], r[7]) for r in rows if r[0] == "bwd_pair"} == {
        ("bwd_pair", "sm90", "128", "8"), ("bwd_pair", "sm80", "64", "8")}, out
    assert len({r[0] for r in rows}) == 5 and "0 failed" in out, out


def test_two_key_tiles_a_pair_program_build_without_spills():
    """`compile_check --key-tiles 2` (what bench/tune.py sweeps, opt-in until timed): the pair
    kernels at 8 warps with two key tiles a program, ViL-B's and ViL-T's head dims in one chunk
    on sm_90, without a spill and at two programs an SM (the 16 warps the 4-warp builds have)."""
    cmd = ["-m", "vil_kernels.compile_check", "--key-tiles", "2", "--dims",
           "384", "96", "--chunks", "1024", "--dtype", "bfloat16", "--arch", "90",
           "--kernel", "fwd_pair", "--kernel", "bwd_pair"]
    res = run_built(cmd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.endswith(" ok")]
    assert {r[0] for r in rows} == {"fwd_pair", "bwd_pair"} and "0 failed" in out, out
    # (columns: kernel dtype arch BT NT BK BV w st regs spill smem mma occ DK{} DV{} ok)
    assert all(r[3] == "64x128" and r[7] == "8" and r[-4] == "2" for r in rows), out


def test_outputs_kernel_computing_the_scores_builds_without_spills():
    """Chunks of several tiles at head dim 96 (one V tile of 128 holds it on sm_90): the
    outputs kernel that computes the pairs' scores itself (flags Fs / Ts) in tiles of 64,
    without a spill; in tiles of 128, and on sm_80 (V tiles of 32), the forward pair kernel
    runs."""
    rows = []
    for tile in ([], ["--tile", "128"]):
        cmd = ["-m", "vil_kernels.compile_check", "--dims", "96", "--chunks",
               "1024", "--dtype", "bfloat16", "--kernel", "fwd_out", "--kernel", "fwd_pair",
               *tile]
        res = run_built(cmd)
        out = res.stdout + res.stderr
        assert res.returncode == 0 and "0 failed" in out, out[-3000:]
        rows += [line.split() for line in out.splitlines() if line.endswith(" ok")]
    scores = {(r[2], r[3], r[9]) for r in rows if r[0] == "fwd_out" and r[9].endswith("s")}
    assert scores == {("sm90", "64", "Fs"), ("sm90", "64", "Ts")}, rows
    # (sm_80; and tiles of 128, where the scores' builds spill)
    assert {(r[2], r[3]) for r in rows if r[0] == "fwd_pair"} == {("sm80", "64"),
                                                                  ("sm90", "128")}, rows


def test_flash_forms_build_without_spills():
    """`compile_check --flash on` (what VIL_KERNELS_FLASH_FORWARD=1 and
    VIL_KERNELS_FLASH_BACKWARD=1 run; auto: each where it takes 4 warps) at
    ViL-B's, ViL-S's and ViL-T's head dims, on sm_90, without a spill: the flash forward (one
    chunk, no carried state; q held over 256 + 128 columns against key tiles of 16 at 8 warps,
    128 + 64 against 32 at 4, 64 + 32 against 64 at 4), the outputs kernel with
    every V column in one program (256 + 128, 128 + 64 at 8 warps, 96 in one tile of 128 at
    4), computing the pairs' scores, with and without the carried state; the flash backward (q
    and dh held, key tiles of 16 at D=192 and 8 warps, of 32 at 96 and 4; none at 384, where
    it spilled) and the dq/dk kernel making dk alone beside it. sm_80 runs none of them. The
    full check covers off, on and auto."""
    from vil_kernels import compile_check
    todo = compile_check.variants(dims=(96, 384), chunks=(1024,), dtypes=("bfloat16",))
    flash = {(k.BV, k.BV2) for k in todo if k.kernel == "fwd_out" and k.BV2}
    assert flash == {(256, 128)}, flash
    assert {k.arch for k in todo if k.kernel == "fwd_flash"} == {90}
    assert not any(k.BV2 or k.kernel == "fwd_flash" for k in compile_check.variants(
        dims=(96, 384), chunks=(1024,), dtypes=("bfloat16",), flash="off"))
    auto = compile_check.variants(dims=(96, 384), chunks=(1024,), dtypes=("bfloat16",),
                                  flash="auto")
    served = lambda D: {k.kernel for k, dims in auto.items() if (D, D) in dims}
    assert {"fwd_flash", "bwd_flash"} <= served(96), served(96)       # D=96's, not D=384's
    assert not {"fwd_flash", "bwd_flash"} & served(384), served(384)
    assert not any(k.BV2 for k in auto if k.kernel == "fwd_out")
    cmd = ["-m", "vil_kernels.compile_check", "--flash", "on", "--dims", "96",
           "192", "384", "--chunks", "1024", "--dtype", "bfloat16", "--kernel", "fwd_out",
           "--kernel", "fwd_flash", "--kernel", "bwd_flash", "--kernel", "bwd_dqk"]
    res = run_built(cmd)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "0 failed" in out, out[-3000:]
    rows = [line.split() for line in out.splitlines() if line.endswith(" ok")]
    outputs = {(r[2], r[6], r[7], r[9]) for r in rows if r[0] == "fwd_out"}
    flash = {(r[2], r[3], r[5], r[6], r[7]) for r in rows if r[0] == "fwd_flash"}
    for cols, tile, warps, out_cols, out_warps in (("256+128", "64x16", "8", "256+128", "8"),
                                                   ("128+64", "64x32", "4", "128+64", "8"),
                                                   ("64+32", "64x64", "4", "128", "4")):
        assert {("sm90", out_cols, out_warps, "Fs"), ("sm90", out_cols, out_warps, "Ts")} <= \
            outputs, out
        assert ("sm90", tile, cols, cols, warps) in flash, out
    # (the scores' wgmma of a 64-row tile at 8 warps span both warpgroups: "d", doubled_dots)
    backward = {(r[2], r[3], r[5], r[6], r[7], r[12][-1]) for r in rows if r[0] == "bwd_flash"}
    assert ("sm90", "64x16", "128+64", "128+64", "8", "d") in backward, out
    assert not any(b[2] == "256+128" for b in backward), out
    assert any(b[:5] == ("sm90", "64x32", "64+32", "64+32", "4") and b[5] != "d"
               for b in backward), out
    assert not any(r[0] == "bwd_flash" and r[2] == "sm80" for r in rows), out
    dk_alone = {(r[2], r[5]) for r in rows if r[0] == "bwd_dqk" and r[9] == "Fdk"}
    assert dk_alone == {("sm90", "64"), ("sm90", "32")}, out
    assert not any("+" in r[6] for r in rows if r[2] == "sm80"), out
