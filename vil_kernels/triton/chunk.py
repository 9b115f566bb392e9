"""Launchers, torch.library ops and the autograd Function of the fused chunkwise mLSTM.

The state is kept at the boundaries of chunks of L positions; the matmul kernels work on tiles
of BT = heuristics.tile_len(L, ...) positions, NT = L / BT a chunk (kernels.py).
Forward: mlstm_fwd_gates_kernel (the stabilizer's scan, one program a head: m entering every
chunk, each key's weight and the carried state's factor; per row the chunk-relative log-forget
cumsum, m and argmax), mlstm_fwd_state_kernel (the (C, n) scan, entry state of every chunk)
then mlstm_fwd_out_kernel (outputs per tile; signed normalizer per row). With the scans' split
launch parameter each scan is mlstm_chunk_local_kernel then mlstm_chunk_chain_kernel instead
(same function). Chunks of several tiles add mlstm_fwd_pair_kernel before the outputs kernel
(unless one V tile holds DV: then the outputs kernel computes the pairs' scores itself,
heuristics.SCORES_IN_OUTPUTS) and mlstm_bwd_pair_kernel before dq/dk and dv: each (tile, tile
up to it) pair of a chunk computed once, into buffers the others read (_pair_buffers).
One chunk holding the sequence with no carried state may take the flash forms instead
(heuristics.flash_applies; off by default): mlstm_fwd_flash_kernel for the pair and outputs
kernels, mlstm_bwd_flash_kernel for the backward pair kernel and dq.
Backward: mlstm_bwd_prologue_kernel (den, dn, dm per row from one pass over dh and h, and the
state-gradient scan's row weights and chunk factors), mlstm_bwd_state_kernel (reverse
scan of dC, dn), mlstm_bwd_dqk_kernel (dq, dk and q.dq, k.dk per row), mlstm_bwd_dv_kernel (dv),
then the O(S) gate epilogue of the spec: di = k.dk, dF = q.dq - k.dk + dm, eps term routed to
the recorded argmax (two scatters in PyTorch), reverse cumsum, times sigmoid(-f)
(mlstm_bwd_gates_kernel). No atomics anywhere: two runs give identical bits.
"""

import contextlib
import time

import torch
import triton.language as tl

from ..utils import (F_MIN, NEG, SECOND_ORDER, cdiv, compute_dtype, first_order_only,
                     grads_in_base_layout, route_last_state, route_to_argmax)
from . import heuristics
from .._triton_runtime import INTERPRETED, launch
from .kernels import (mlstm_bwd_dqk_kernel, mlstm_bwd_dv_kernel, mlstm_bwd_flash_kernel,
                      mlstm_bwd_gates_kernel, mlstm_bwd_pair_kernel, mlstm_bwd_prologue_kernel,
                      mlstm_bwd_state_kernel, mlstm_chunk_chain_kernel, mlstm_chunk_local_kernel,
                      mlstm_fwd_gates_kernel, mlstm_fwd_flash_kernel, mlstm_fwd_out_kernel,
                      mlstm_fwd_pair_kernel, mlstm_fwd_state_kernel)

_TL = {"fp64": tl.float64, "fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
assert NEG == -1e30 and F_MIN == -256.0  # the kernels' _NEG and _F_MIN
assert heuristics.MAX_CHUNK * -F_MIN * 64 <= 2 ** 24   # exact coarse cumsums (kernels._GRID)


def _dot_args(dtype):
    mma, acc, prec = heuristics.dot_config(dtype)
    return dict(MMA=_TL[mma], ACC=_TL[acc], PREC=prec, INTERP=INTERPRETED)


def _device(x):
    """Launch on x's GPU (not the current one) in multi-GPU processes."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# bench/tune.py sets this to a list to receive (kernel name, _Stopwatch) for every launch.
KERNEL_EVENTS = None


class _Stopwatch:
    """Time of one launch: CUDA events on a GPU, the wall clock under the interpreter."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()
        return self

    def ms(self):
        """After a synchronize on a GPU."""
        return self.start.elapsed_time(self.end) if self.cuda else 1e3 * (self.t1 - self.t0)


def hi_lo(x, dtype):
    """x as pairs (hi, lo) in ``dtype`` (an MMA operand dtype: state_dtype), hi + lo = x to
    about 16 bits for 16-bit types (lo = 0 when dtype is x's): [..., 2]."""
    hi = x.to(dtype)
    return torch.stack((hi, (x - hi.to(x.dtype)).to(dtype)), dim=-1)


def _launch(kernel, name, grid, args, DK, DV, L, dtype, arch, **extra):
    """Launch one of the matmul kernels (heuristics.KERNELS) in chunks of L (tiles of
    tile_len(L)) with the table's parameters."""
    p = heuristics.launch_params(name, DK, DV, L, dtype, arch, extra.get("HAS_STATE"))
    BT = heuristics.tile_len(L, dtype, DK, DV, arch)
    meta = dict(BT=BT, NT=L // BT, **_dot_args(dtype), **extra)
    # the tiles a kernel takes (the forward pair kernel no BV, the flash kernel no NT)
    meta.update({t: p[t] for t in ("BK", "BV", "BK2", "BV2", "BS", "KT")
                 if t in kernel.arg_names})
    if "NT" not in kernel.arg_names:
        del meta["NT"]
    # (grids that depend on the parameters take them)
    grid = grid(p) if callable(grid) else grid
    opts = dict(num_warps=p["num_warps"], num_stages=p["num_stages"])
    if not INTERPRETED and p["maxnreg"]:
        opts["maxnreg"] = p["maxnreg"]
    _run(kernel, name, grid, args, **meta, **opts)


def _run(kernel, name, grid, args, **meta):
    """Launch one kernel; timed into KERNEL_EVENTS when bench/tune.py asks for it."""
    watch = _Stopwatch(args[0].device) if KERNEL_EVENTS is not None else None
    launch(kernel, grid, args, **meta)
    if watch is not None:
        KERNEL_EVENTS.append((name, watch.stop()))


# Elements of a state one program of mlstm_chunk_chain_kernel carries.
CHAIN_BLOCK = 1024


def _split_scan(name, x, y, x_strides, y_strides, wc, wn, decay, c, n, start, end, has_start,
                backward, S, NC, DK, DV, rev, NH, L, dtype, arch):
    """A state scan as mlstm_chunk_local_kernel (every chunk's own term, in parallel) then
    mlstm_chunk_chain_kernel (linking them, in place in c and n): the split launch parameter.
    Both launches are timed under the scan's name."""
    BH = c.shape[0] * c.shape[1]
    _launch(mlstm_chunk_local_kernel, name,
            lambda p: (NC * BH * cdiv(DK, p["BK"]) * cdiv(DV, p["BV"]),),
            (x, y, wc, wn, c, n, S, NC, DK, DV, rev, NH, *x_strides, *y_strides),
            DK, DV, L, dtype, arch)
    _run(mlstm_chunk_chain_kernel, name,
         (cdiv(DK * DV, CHAIN_BLOCK) + cdiv(DK, CHAIN_BLOCK), BH),
         (c, n, decay, *start, *end, NC, DK, DV), BLOCK=CHAIN_BLOCK, BACKWARD=backward,
         HAS_START=has_start, ACC=_dot_args(dtype)["ACC"], num_warps=4)


def state_dtype(x):
    """Storage dtype of the per-chunk states (C entering each chunk, dC leaving it) kept between
    kernels: the MMA operand dtype, since every kernel rounds them to it before its tl.dot
    anyway. For 16-bit inputs that halves the largest memory traffic of the pass (13 x 384 x 384
    states a head at ViL-B's shape) and changes no bit of the result."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else compute_dtype(x)


def _in_place_ok(x):
    """A unit last stride, other strides and the storage offset in multiples of 16 elements:
    what the kernels are compiled for (Triton specializes on it; without it loads go scalar and
    registers spill). No data_ptr(): this runs under torch.compile's fake tensors too."""
    return (x.stride(-1) == 1 and all(st % 16 == 0 for st in x.stride()[:3])
            and x.storage_offset() % 16 == 0)


def _kernel_layout(q, k, v):
    """q, k, v are read in place (ViL's are (NH, B)-ordered views of its projection output) when
    their layout lets the kernels load 16-byte vectors; otherwise, and when q and k differ in
    layout (the kernels take one for both), they are copied. Inside the custom ops: the layout
    checks need real tensors."""
    q, k, v = (x if _in_place_ok(x) else x.contiguous() for x in (q, k, v))
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    return q, k, v


def _grad_like(x, D):
    """An empty (B, NH, S, D) gradient stored in x's (B, NH) order, rows contiguous: ViL's q, k,
    v are (NH, B)-ordered views of its projections, and a gradient in that order reaches them
    as a view (a (B, NH)-contiguous one took a transposing copy a tensor in autograd)."""
    B, NH, S = x.shape[:3]
    if x.stride(1) > x.stride(0):
        return x.new_empty(NH, B, S, D).transpose(0, 1)
    return x.new_empty(B, NH, S, D)


def _grad_buffers(q, k, v, share_bases):
    """dq, dk, dv for the kernels: _grad_like (q's order for dq and dk, v's for dv; rows
    contiguous), or with share_bases, where q and k (with v, or v alone) are views of one
    contiguous tensor (ViL's per-head projection outputs, which also hold the gate columns),
    views of a fresh buffer laid out like it (utils.grads_in_base_layout): the split that made
    them then takes the buffer as its gradient without a copy (vil/model.py)."""
    dq = dk = dv = None
    if share_bases:
        if v._base is not None and v._base is q._base:
            dq, dk, dv = grads_in_base_layout([q, k, v]) or (None,) * 3
        else:
            dq, dk = grads_in_base_layout([q, k]) or (None, None)
            dv = (grads_in_base_layout([v]) or [None])[0]
    if dq is None:
        dq, dk = _grad_like(q, q.shape[-1]), _grad_like(q, q.shape[-1])
    if dv is None:
        dv = _grad_like(v, v.shape[-1])
    return dq, dk, dv


def _strides(x):
    """(batch, head, position) strides of a (B, NH, S, D) tensor read in place by the kernels
    (q and k share theirs: _kernel_layout makes sure)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _dims(q, v, L):
    """(B, NH, S, DK, DV, chunks, tile, tiles a chunk, accumulation dtype, arch) of a pass over
    laid-out q and v in chunks of L positions."""
    B, NH, S, DK = q.shape
    arch = heuristics.device_arch(q.device)
    BT = heuristics.tile_len(L, q.dtype, DK, v.shape[-1], arch)
    return B, NH, S, DK, v.shape[-1], cdiv(S, L), BT, L // BT, compute_dtype(q), arch


def _pair_buffers(q, S, NC, BT, NT, dtypes):
    """Chunks of several tiles: one (B, NH, NC, NP, BT, BT) buffer (or (..., NP, BT) where
    shaped is false) per (dtype, shaped) in dtypes for the (row tile, key tile up to it) pairs
    of every chunk (kernels._pair), and the pair kernels' grid (of their launch parameters: a
    program a row tile and KT key tiles, kernels._pair_program); with one tile a chunk,
    (None, ...) and no grid (the matmul kernels compute the tile's own block themselves)."""
    if NT == 1:
        return (None,) * len(dtypes), None
    NTE = min(NT, cdiv(S, BT))
    NP = NTE * (NTE + 1) // 2
    B, NH = q.shape[:2]
    bufs = tuple(q.new_empty(B, NH, NC, NP, BT, *((BT,) if shaped else ()), dtype=dt)
                 for dt, shaped in dtypes)
    return bufs, lambda p: (B * NH * NC * pair_programs(NTE, p["KT"]),)


def pair_programs(NTE, KT):
    """Programs of a pair kernel a chunk of NTE tiles at KT key tiles a program: a row tile's
    key tiles up to it in groups of KT (kernels._pair_groups)."""
    return sum(cdiv(a + 1, KT) for a in range(NTE))


def _fwd_states(q, k, v, i, f, c0, n0, m0, L, reverse, states=True):
    """The forward's two scans (stabilizer, then states) on laid-out q, k, v: returns c_in,
    n_in, m_in (entering every chunk), c_last, n_last, m_last, a_last, and per row b_row,
    m_row, a_row. states=False (the caller's promise: one chunk, no initial state, the last
    state unused) runs the stabilizer scan only: c_in, n_in, c_last, n_last are not written."""
    B, NH, S, DK, DV, NC, _, _, ad, arch = _dims(q, v, L)
    has_init = c0 is not None
    kw = dict(device=q.device)
    c_in = torch.empty(B, NH, NC, DK, DV, dtype=state_dtype(q), **kw)
    n_in = torch.empty(B, NH, NC, DK, dtype=ad, **kw)
    m_in = torch.empty(B, NH, NC, dtype=ad, **kw)
    c_last = torch.empty(B, NH, DK, DV, dtype=ad, **kw)
    n_last = torch.empty(B, NH, DK, dtype=ad, **kw)
    m_last = torch.empty(B, NH, 1, dtype=ad, **kw)
    a_last = torch.empty(B, NH, dtype=torch.int32, **kw)
    gain = torch.empty(B, NH, NC, L, dtype=ad, **kw)
    decay = torch.empty(B, NH, NC, dtype=ad, **kw)
    b_row = torch.empty(B, NH, 4, S, dtype=ad, **kw)      # gate cumsum parts (kernels.py)
    m_row = torch.empty(B, NH, S, dtype=ad, **kw)
    a_row = torch.empty(B, NH, S, dtype=torch.int32, **kw)
    c_init, n_init, m_init = (c0, n0, m0) if has_init else (c_last, n_last, m_last)  # unread
    rev = int(bool(reverse))
    _run(mlstm_fwd_gates_kernel, "fwd_gates", (B * NH,),
         (i, f, m_init, m_in, m_last, a_last, gain, decay, b_row, m_row, a_row, S, NC, rev),
         L=L, BC=heuristics.gates_chunks(L), HAS_INIT=has_init, ACC=_dot_args(q.dtype)["ACC"],
         num_warps=heuristics.GATES_WARPS)
    split = heuristics.launch_params("fwd_state", DK, DV, L, q.dtype, arch)["split"]
    if states and split:
        _split_scan("fwd_state", k, v, _strides(k), _strides(v), gain, gain, decay, c_in, n_in,
                    (c_init, n_init), (c_last, n_last), has_init, False,
                    S, NC, DK, DV, rev, NH, L, q.dtype, arch)
    elif states:
        _launch(mlstm_fwd_state_kernel, "fwd_state",
                lambda p: (cdiv(DK, p["BK"]), cdiv(DV, p["BV"]), B * NH),
                (k, v, gain, decay, c_init, n_init, c_in, n_in, c_last, n_last,
                 S, NC, DK, DV, rev, NH, *_strides(k), *_strides(v)), DK, DV, L, q.dtype, arch,
                HAS_INIT=has_init)
    return c_in, n_in, m_in, c_last, n_last, m_last, a_last, b_row, m_row, a_row


def mlstm_states(q, k, v, i, f, c0, n0, m0, L, reverse):
    """The states entering every chunk, (c_in, n_in), as mlstm_fwd computes them: the backward
    recomputes them with this when the forward did not keep them (recompute_states)."""
    q, k, v = _kernel_layout(q, k, v)
    return _fwd_states(q, k, v, i, f, c0, n0, m0, L, reverse)[:2]


def needs_states(S, L, has_init, last_states):
    """Whether a forward needs the state scan and the outputs' carried-state term: not for one
    chunk holding the whole sequence with no initial state (the state it would carry is zero)
    whose last state nobody uses (inference without return_last_states)."""
    return cdiv(S, L) > 1 or has_init or last_states


def mlstm_fwd(q, k, v, i, f, c0, n0, m0, eps, L, reverse, last_states=True):
    """(B, NH, S, D) inputs of any layout, contiguous (B, NH, S) gates, chunks of L positions.
    Returns h and the saved tensors. last_states=False: the caller does not use the last state;
    where needs_states then says so, c_in, n_in, c_last and n_last are not written."""
    q, k, v = _kernel_layout(q, k, v)
    B, NH, S, DK, DV, NC, BT, NT, ad, arch = _dims(q, v, L)
    states = needs_states(S, L, c0 is not None, last_states)
    rev = int(bool(reverse))
    c_in, n_in, m_in, c_last, n_last, m_last, a_last, b_row, m_row, a_row = _fwd_states(
        q, k, v, i, f, c0, n0, m0, L, reverse, states)
    h = torch.empty(B, NH, S, DV, dtype=q.dtype, device=q.device)
    n_row = torch.empty(B, NH, S, dtype=ad, device=q.device)
    scale = DK ** -0.5
    if not states and heuristics.flash_applies(DK, DV, BT, NT, q.dtype, arch):
        # one chunk, no carried state: FlashAttention's form, one kernel (heuristics)
        _launch(mlstm_fwd_flash_kernel, "fwd_flash", (cdiv(S, BT), B * NH),
                (q, k, v, b_row, m_row, h, n_row, S, DK, DV, rev, NH, *_strides(q),
                 *_strides(v), scale, eps), DK, DV, L, q.dtype, arch)
        return h, c_last, n_last, m_last, a_last, m_row, n_row, a_row, c_in, n_in, m_in, b_row
    p = heuristics.launch_params("fwd_out", DK, DV, L, q.dtype, arch)
    # chunks of several tiles: every pair's weighted scores (MMA dtype) and row sums, once;
    # where one V block holds DV the outputs kernel computes them itself (SCORES): once too
    scores = heuristics.scores_in_outputs(DV, p["BV"] + p["BV2"], BT, NT)
    (sc, rs), grid = _pair_buffers(q, S, NC, BT, 1 if scores else NT,
                                   ((state_dtype(q), True), (ad, False)))
    if grid is not None:
        _launch(mlstm_fwd_pair_kernel, "fwd_pair", grid,
                (q, k, b_row, sc, rs, S, NC, DK, rev, NH, *_strides(q), scale),
                DK, DV, L, q.dtype, arch)
    else:
        sc, rs = h, n_row                                                # unread
    # pipelined, the outputs kernel takes n as (hi, lo) MMA-dtype pairs (see the kernel)
    qn_mma = p["num_stages"] > 1
    _launch(mlstm_fwd_out_kernel, "fwd_out",
            lambda p: (cdiv(DV, p["BV"] + p["BV2"]), cdiv(S, BT), B * NH),
            (q, k, v, c_in, hi_lo(n_in, c_in.dtype) if qn_mma else n_in, m_in, b_row, m_row,
             h, n_row, sc, rs, S, NC, DK, DV, rev, NH, *_strides(q), *_strides(v), scale, eps),
            DK, DV, L, q.dtype, arch, QN_MMA=qn_mma, HAS_STATE=states, SCORES=scores)
    return h, c_last, n_last, m_last, a_last, m_row, n_row, a_row, c_in, n_in, m_in, b_row


def mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, dh, dc_last, dn_last, dm_last,
              c_last, n_last, m_last, a_last, m_row, n_row, a_row, c_in, n_in, m_in, b_row,
              eps, L, reverse, share_bases=False):
    """Gradients (dq, dk, dv, di, df, dc0, dn0, dm0); the state gradients are those of the
    initial state (zeros-free placeholders when there is none). dc_last, dn_last, dm_last: all
    three, or all None when the last state was not used (no zero tensors then; c_last and
    n_last may then be None too). Where needs_states says no state is carried (one chunk, no
    initial state, the last state unused: the entry state and the exit state's gradient are
    zero), c_in and n_in may be None: no state-gradient scan runs, and the dq/dk and dv
    kernels skip the state terms. share_bases: see _grad_buffers (eager mode only: the custom
    op's fake gives _grad_like's layout)."""
    # laid out after the caller's q, k, v, before any aligning copy
    dq, dk, dv = _grad_buffers(q, k, v, share_bases)
    q, k, v = _kernel_layout(q, k, v)
    B, NH, S, DK, DV, NC, BT, NT, ad, arch = _dims(q, v, L)
    NTS = cdiv(S, BT)
    rev = int(bool(reverse))
    scale = DK ** -0.5
    kw = dict(device=q.device)
    # Prologue, O(S * DV): the normalizer as one more value column, dm from the eps term
    # (utils.normalizer_backward in one pass, without float32 copies of dh and h), and the
    # state-gradient scan's row weights and chunk factors.
    den, dn, dm_row = (torch.empty(B, NH, S, dtype=ad, **kw) for _ in range(3))
    wa, wb = (torch.empty(B, NH, NC, L, dtype=ad, **kw) for _ in range(2))
    decay = torch.empty(B, NH, NC, dtype=ad, **kw)
    p = heuristics.prologue_params(DV, BT, q.dtype, arch)
    _run(mlstm_bwd_prologue_kernel, "bwd_prologue", (NTS, B * NH),
         (dh, h, b_row, m_row, n_row, m_in, m_last, den, dn, dm_row, wa, wb, decay,
          S, NC, DV, rev, scale, eps),
         BT=BT, NT=NT, BV=p["BV"], ACC=_dot_args(q.dtype)["ACC"], num_warps=p["num_warps"])

    dc0 = torch.empty(B, NH, DK, DV, dtype=ad, **kw)
    dn0 = torch.empty(B, NH, DK, dtype=ad, **kw)
    has_dlast = dc_last is not None
    carried = needs_states(S, L, c0 is not None, has_dlast)
    dlast = (dc_last, dn_last) if has_dlast else (dc0, dn0)         # unread placeholders
    if not carried:             # zero entry state and exit-state gradient: no scan, no terms
        c_in, n_in, dc_out, dn_out = q, den, q, den                   # unread placeholders
    else:
        dc_out = torch.empty(B, NH, NC, DK, DV, dtype=state_dtype(q), **kw)
        dn_out = torch.empty(B, NH, NC, DK, dtype=ad, **kw)
        if heuristics.launch_params("bwd_state", DK, DV, L, q.dtype, arch)["split"]:
            _split_scan("bwd_state", q, dh, _strides(q), _strides(dh), wa, wb, decay, dc_out,
                        dn_out, dlast, (dc0, dn0), has_dlast, True, S, NC, DK, DV, rev, NH, L,
                        q.dtype, arch)
        else:
            _launch(mlstm_bwd_state_kernel, "bwd_state",
                    lambda p: (cdiv(DK, p["BK"]), cdiv(DV, p["BV"]), B * NH),
                    (q, dh, wa, wb, decay, *dlast, dc_out, dn_out, dc0, dn0,
                     S, NC, DK, DV, rev, NH, *_strides(q)), DK, DV, L, q.dtype, arch,
                    HAS_DLAST=has_dlast)
    # chunks of several tiles: every pair's scores over the normalizer and weighted dS once;
    # in one chunk without state, where the flash form applies, along with dq (heuristics)
    (ps, ds), grid = _pair_buffers(q, S, NC, BT, NT, ((state_dtype(q), True),) * 2)
    flash = not carried and heuristics.flash_applies(DK, DV, BT, NT, q.dtype, arch, True)
    p = heuristics.launch_params("bwd_dqk", DK, DV, L, q.dtype, arch)
    NK = cdiv(DK, p["BK"])
    rq = torch.empty(1 if flash else NK, B, NH, S, dtype=ad, **kw)
    rk = torch.empty(NK, B, NH, S, dtype=ad, **kw)
    if flash:
        _launch(mlstm_bwd_flash_kernel, "bwd_flash", (NTS, B * NH),
                (q, k, v, dh, b_row, den, dn, ps, ds, dq, rq, S, DK, DV, rev, NH,
                 *_strides(q), *_strides(v), *_strides(dq), scale), DK, DV, L, q.dtype, arch)
    elif grid is not None:
        _launch(mlstm_bwd_pair_kernel, "bwd_pair", grid,
                (q, k, v, dh, b_row, den, dn, ps, ds, S, NC, DK, DV, rev, NH,
                 *_strides(q), *_strides(v), scale), DK, DV, L, q.dtype, arch)
    else:
        ps = ds = dh                                                     # unread
    _launch(mlstm_bwd_dqk_kernel, "bwd_dqk", (NK, NTS, B * NH),
            (q, k, v, dh, b_row, den, dn, c_in, n_in, m_in, m_last, dc_out, dn_out, ds,
             dq, dk, rq, rk, S, NC, DK, DV, rev, NH, *_strides(q), *_strides(v),
             *_strides(dq), scale),
            DK, DV, L, q.dtype, arch, HAS_STATE=carried, DQ=not flash)
    _launch(mlstm_bwd_dv_kernel, "bwd_dv",
            lambda p: (cdiv(DV, p["BV"]), NTS, B * NH),
            (q, k, dh, b_row, den, m_in, m_last, dc_out, ps, dv,
             S, NC, DK, DV, rev, NH, *_strides(q), *_strides(dv), scale),
            DK, DV, L, q.dtype, arch, HAS_STATE=carried)
    # Gate epilogue, O(S), in physical order (p = t forward, p = S - 1 - t reverse): the m
    # gradients go to the keys that set each m (argmax indices are logical positions, so they
    # are mapped first), as additions u to di and -u to dF (one scatter; the last state's
    # routing adds to dF alone, so it gets w of its own); then one kernel sums the row sums'
    # head-dim blocks, adds them, and takes the suffix sum and the sigmoid. What reaches m0
    # is summed only where there is an initial state (every op here is host time at ViL-T's
    # small shapes).
    physical = (lambda a: torch.where(a >= 0, S - 1 - a, a)) if reverse else (lambda a: a)
    u = torch.zeros_like(dm_row)
    w = torch.zeros_like(dm_row) if has_dlast else None
    dm0 = torch.zeros(B, NH, dtype=ad, **kw)
    to_m0 = dm0 if c0 is not None else None
    route_to_argmax(dm_row, physical(a_row), u, w, to_m0)
    if has_dlast:                                                  # else it adds zeros
        route_last_state(u, w, to_m0, 0 if reverse else S - 1, physical(a_last), c_last,
                         n_last, dc_last.to(ad), dn_last.to(ad), dm_last.to(ad))
    di, df = torch.empty_like(i), torch.empty_like(f)
    _run(mlstm_bwd_gates_kernel, "bwd_gates", (B * NH,),
         (rq, rk, dm_row, u, u if w is None else w, f, di, df, S, rq.shape[0], NK, B * NH,
          rev),
         BS=heuristics.GATES_BLOCK, HAS_W=w is not None, ACC=_dot_args(q.dtype)["ACC"],
         num_warps=4)
    if c0 is not None:
        dm0 = dm0 + (dc0 * c0.to(ad)).sum((-2, -1)) + (dn0 * n0.to(ad)).sum(-1)
    return dq, dk, dv, di, df, dc0, dn0, dm0[..., None]


# ---------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd.

_T = torch.Tensor
_T8 = tuple[_T, _T, _T, _T, _T, _T, _T, _T]
_T12 = tuple[_T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T]

@torch.library.custom_op("vil_kernels::mlstm_chunk_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
            c0: torch.Tensor | None, n0: torch.Tensor | None, m0: torch.Tensor | None,
            eps: float, chunk: int, reverse: bool, last_states: bool = True) -> _T12:
    with _device(q):
        return mlstm_fwd(q, k, v, i, f, c0, n0, m0, eps, chunk, reverse, last_states)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, i, f, c0, n0, m0, eps, chunk, reverse, last_states=True):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    NC = -(-S // chunk)
    ad, i32 = compute_dtype(q), torch.int32
    e = lambda *shape, dtype=ad: q.new_empty(shape, dtype=dtype)
    return (e(B, NH, S, DV, dtype=q.dtype), e(B, NH, DK, DV), e(B, NH, DK), e(B, NH, 1),
            e(B, NH, dtype=i32), e(B, NH, S), e(B, NH, S), e(B, NH, S, dtype=i32),
            e(B, NH, NC, DK, DV, dtype=state_dtype(q)), e(B, NH, NC, DK), e(B, NH, NC),
            e(B, NH, S))


@torch.library.custom_op("vil_kernels::mlstm_chunk_states", mutates_args=())
def _states_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
               f: torch.Tensor, c0: torch.Tensor | None, n0: torch.Tensor | None,
               m0: torch.Tensor | None, chunk: int, reverse: bool) -> tuple[_T, _T]:
    with _device(q):
        return mlstm_states(q, k, v, i, f, c0, n0, m0, chunk, reverse)


@_states_op.register_fake
def _states_fake(q, k, v, i, f, c0, n0, m0, chunk, reverse):
    B, NH, S, DK = q.shape
    NC = -(-S // chunk)
    return (q.new_empty(B, NH, NC, DK, v.shape[-1], dtype=state_dtype(q)),
            q.new_empty(B, NH, NC, DK, dtype=compute_dtype(q)))


@torch.library.custom_op("vil_kernels::mlstm_chunk_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
            c0: torch.Tensor | None, n0: torch.Tensor | None, m0: torch.Tensor | None,
            h: torch.Tensor, dh: torch.Tensor, dc_last: torch.Tensor | None,
            dn_last: torch.Tensor | None, dm_last: torch.Tensor | None,
            c_last: torch.Tensor | None, n_last: torch.Tensor | None,
            m_last: torch.Tensor, a_last: torch.Tensor, m_row: torch.Tensor, n_row: torch.Tensor,
            a_row: torch.Tensor, c_in: torch.Tensor | None, n_in: torch.Tensor | None,
            m_in: torch.Tensor,
            b_row: torch.Tensor, eps: float, chunk: int, reverse: bool) -> _T8:
    with _device(q):
        return mlstm_bwd(q, k, v, i, f, c0, n0, m0, h, dh, dc_last, dn_last, dm_last, c_last,
                         n_last, m_last, a_last, m_row, n_row, a_row, c_in, n_in, m_in, b_row, eps,
                         chunk, reverse)


@_bwd_op.register_fake
def _bwd_fake(q, k, v, i, f, c0, n0, m0, h, dh, *rest):
    B, NH, S, DK = q.shape
    ad = compute_dtype(q)
    DV = v.shape[-1]
    return (_grad_like(q, DK), _grad_like(q, DK), _grad_like(v, DV),
            torch.empty_like(i), torch.empty_like(f), q.new_empty(B, NH, DK, DV, dtype=ad),
            q.new_empty(B, NH, DK, dtype=ad), q.new_empty(B, NH, 1, dtype=ad))


def _mlstm_bwd_eager(*args):
    """mlstm_bwd outside torch.compile: gradients into their projection's layout where it can."""
    return mlstm_bwd(*args, share_bases=True)


def _call(op, impl, q, *args):
    """The custom op where torch.compile traces (its fake implementation gives the shapes); the
    implementation itself in eager mode, without the dispatcher's round trip (custom-op
    dispatch and its torch.compile guard cost ~0.1 ms of host time a call)."""
    if torch.compiler.is_compiling():
        return op(q, *args)
    with _device(q):
        return impl(q, *args)


def _contiguous_gates_and_states(i, f, c0, n0, m0):
    """The gates and initial states as the kernels read them (q, k, v: see _kernel_layout)."""
    if c0 is not None:
        c0, n0, m0 = (x.contiguous() for x in (c0, n0, m0))
    return i.contiguous(), f.contiguous(), c0, n0, m0


class MLSTMTritonFunction(torch.autograd.Function):
    """Forward-order or reverse mLSTM on (B, NH, S) gates; returns h, c_last, n_last, m_last."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, i, f, c0, n0, m0, eps, chunk, reverse, recompute=False,
                last_states=True):
        ctx.anchors = (i, f, c0, n0, m0)     # (first_order_only: the saved ones may be copies)
        i, f, c0, n0, m0 = _contiguous_gates_and_states(i, f, c0, n0, m0)
        has_init = c0 is not None
        out = _call(_fwd_op, mlstm_fwd, q, k, v, i, f, c0, n0, m0, eps, chunk, reverse,
                    last_states)
        h, c_last, n_last, m_last = out[:4]
        kept = list(out)
        # the chunk states (out[8:10]: NC x DK x DV a head) are not kept with recompute (the
        # backward reruns the two scans that made them) nor where none is carried (zero)
        if recompute or not needs_states(q.shape[2], chunk, has_init, last_states):
            kept[8:10] = None, None
        if not last_states:                 # (read only to route the last state's gradient)
            kept[1:3] = None, None
        ctx.save_for_backward(q, k, v, i, f, *((c0, n0, m0) if has_init else ()), *kept)
        ctx.meta = (eps, chunk, reverse, has_init, last_states)
        ctx.set_materialize_grads(False)     # unused last states: None, not zero tensors
        return h, c_last, n_last, m_last

    @staticmethod
    @first_order_only(SECOND_ORDER.format("Triton"))
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dh, dc_last, dn_last, dm_last):
        eps, chunk, reverse, has_init, last_states = ctx.meta
        if not last_states:
            # the last state was not returned (mlstm_triton dropped it): no gradient, whatever
            # torch.compile's AOT autograd materialises for the unused outputs (zeros)
            dc_last = dn_last = dm_last = None
        saved = list(ctx.saved_tensors)
        q, k, v, i, f = saved[:5]
        init = tuple(saved[5:8]) if has_init else (None, None, None)
        out = saved[8:] if has_init else saved[5:]
        h, c_last, n_last, m_last = out[:4]
        carried = needs_states(q.shape[2], chunk, has_init, dc_last is not None)
        if out[8] is None and carried:                  # recompute_states
            out = list(out)
            out[8:10] = _call(_states_op, mlstm_states, q, k, v, i, f, *init, chunk, reverse)
        dh = torch.zeros_like(h) if dh is None else dh.to(h.dtype).contiguous()
        if dc_last is not None or dn_last is not None or dm_last is not None:
            dc_last, dn_last, dm_last = (torch.zeros_like(x) if g is None else g.contiguous()
                                         for g, x in zip((dc_last, dn_last, dm_last),
                                                         (c_last, n_last, m_last)))
        dq, dk, dv, di, df, dc0, dn0, dm0 = _call(_bwd_op, _mlstm_bwd_eager, q, k, v, i, f,
                                                  *init, h, dh, dc_last, dn_last, dm_last,
                                                  *out[1:], eps, chunk, reverse)
        if has_init:
            dstates = tuple(g.to(x.dtype) for g, x in zip((dc0, dn0, dm0), init))
        else:
            dstates = (None, None, None)
        return dq, dk, dv, di, df, *dstates, None, None, None, None, None


# A CUDA grid holds at most 65535 programs along its y and z axes, where the matmul kernels
# and the backward prologue put batch x heads (the sequence's and head dims' tiles go along x,
# where the limit is 2^31 - 1): more heads than that run in slices of whole batch elements.
MAX_GRID_HEADS = 65535


def _in_batch_slices(q, k, v, i, f, c0, n0, m0, return_last_states, **kw):
    """mlstm_triton over slices of the batch of at most MAX_GRID_HEADS heads each, outputs
    concatenated (every batch element's heads are independent: the same bits as one call)."""
    B, NH = q.shape[:2]
    if NH > MAX_GRID_HEADS:
        raise ValueError(f"mlstm: the Triton backend takes at most {MAX_GRID_HEADS} heads, got "
                         f"{NH}")
    step = MAX_GRID_HEADS // NH
    outs = [mlstm_triton(*(x if x is None else x[b:b + step] for x in (q, k, v, i, f, c0, n0, m0)),
                         return_last_states=return_last_states, **kw)
            for b in range(0, B, step)]
    h = torch.cat([h for h, _ in outs])
    if not return_last_states:
        return h, None
    return h, tuple(torch.cat([last[j] for _, last in outs]) for j in range(3))


def mlstm_triton(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, eps=1e-6,
                 chunk_size=None, reverse=False, return_last_states=False,
                 recompute_states=False):
    """Fused chunkwise mLSTM. Validated inputs (vil_kernels.mlstm checks them), gates (B, NH, S).
    Returns (h, (c, n, m)) with return_last_states, else (h, None); states float32 (float64 for
    float64 inputs, supported under the interpreter only). recompute_states: the backward
    reruns the state scans instead of the forward keeping every chunk's state. More than
    MAX_GRID_HEADS batch x heads run in batch slices."""
    B, NH, S, DK = q.shape
    if B * NH > MAX_GRID_HEADS:
        return _in_batch_slices(q, k, v, i, f, c_initial, n_initial, m_initial,
                                return_last_states, eps=eps, chunk_size=chunk_size,
                                reverse=reverse, recompute_states=recompute_states)
    DV = v.shape[-1]
    arch = heuristics.device_arch(q.device)
    L = heuristics.chunk_len(S, DK, DV, q.dtype, arch, chunk_size)
    inputs = (q, k, v, i, f, c_initial, n_initial, m_initial)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        h, c, n, m = MLSTMTritonFunction.apply(*inputs, float(eps), L, bool(reverse),
                                               bool(recompute_states), bool(return_last_states))
    else:
        # nothing to differentiate (inference): the forward alone, without the autograd
        # Function's bookkeeping (~50 us of host time a call)
        i, f, c0, n0, m0 = _contiguous_gates_and_states(i, f, c_initial, n_initial, m_initial)
        # (no state work at all for one chunk without initial or last state: needs_states)
        h, c, n, m = _call(_fwd_op, mlstm_fwd, q, k, v, i, f, c0, n0, m0, float(eps), L,
                           bool(reverse), bool(return_last_states))[:4]
    return h, ((c, n, m) if return_last_states else None)
