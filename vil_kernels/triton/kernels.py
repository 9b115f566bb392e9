"""Triton kernels of the chunkwise mLSTM (forward and exact backward).

Conventions: logical position t counts in processing order (t = 0 is the first position the
recurrence sees); physical position p indexes memory, p = t forward and p = S - 1 - t with
REVERSE, so reverse=True walks the sequence from its end without flipped copies. Chunk c holds
logical positions [c * L, (c + 1) * L): the state (C, n, m) is kept at chunk boundaries only.
The matmul kernels work on tiles of BT positions, L = NT * BT (NT tiles a chunk): a program
takes one tile r (in chunk r // NT). With one tile a chunk (NT = 1) it computes the tile's own
causal block itself; with several, every (row tile, key tile up to it) pair of a chunk is
computed once by the pair kernels, and the program loops over its pairs (the earlier tiles and
its own as keys for the outputs and dq, the later ones and its own as rows for dk and dv), so
that a chunk longer than a tile moves fewer states through memory (NC = cdiv(S, L) of them,
DK x DV each) at the price of more intra-chunk products. Positions t >= S are masked (log
forget 0, input gate NEG: they keep the state and contribute nothing). All of m, n, gates,
cumsums and states are in ACC (float32; float64 only under the interpreter); tl.dot operands
are cast to MMA (the input dtype), products accumulate in ACC. Head dims are tiled by BK / BV
with masks; DK, DV, S are runtime values, so one compiled kernel serves every head dim with the
same tiles. q, k, v may have any strides but a unit last one: (s_b, s_h, s_t) per batch, head
and position, shared by q and k (one row offset serves both), (sv_b, sv_h, sv_t) for v; dq and
dk are written with strides (sd_b, sd_h, sd_t), dv with its own (the launcher lays them out
like q, k and v, into the buffer their projection's output would take as its gradient where it
can); everything else the kernels write, and dh, is contiguous.

Per (batch * head) the kernels exchange, besides q, k, v, gates, h:
  b_row         [4, S]         the cumsum b of logsigmoid(f) from the row's chunk start,
                               inclusive, as a coarse part c (multiples of 1/64, summed
                               exactly) and a fine part f, |f| <= L / 128 (_gates), and what
                               the weights take: x = f - m for rows, y = i - f for keys
                               (_cumsum_rows, _weights). b_t - b_j + i_j - m_t = (c_t - c_j)
                               + (x_t + y_j) keeps float32's precision even where resets make
                               |b| large, whatever order a scan sums in
  m_row, n_row  [S]            per-row stabilizer and signed normalizer
  a_row         [S] int32      logical index of the row's argmax key, -1 = the initial state
  (b_row, m_row, a_row from the gate scan; [S] rows are in physical order; the matmul
  kernels read i, f and m through b_row only, where m is not a normalizer's)
  c_in, n_in    [NC, DK(, DV)] state entering each chunk, m_in [NC] its m
  dc_out, dn_out [NC, DK(, DV)] gradient of the state leaving each chunk
  (c_in and dc_out are stored in the MMA dtype: they are only ever tl.dot operands)
  rq, rk        [NK, S]        per K block: q . dq and k . dk per row (for the gate gradients;
                               rq [1, S] from the flash backward, whose dq spans DK)
  gain, decay   [NC, L], [NC]  the state scan's key weights and carried-state factors
  sc, rs        [NC, NP, BT, BT], [NC, NP, BT]   chunks of several tiles, forward: the
                weighted scores of every (row tile, key tile up to it) pair of a chunk and
                their row sums (the pair kernels; NP pairs a chunk, _pair)
  ps, ds        [NC, NP, BT, BT]   the same pairs in the backward: scores over the row
                normalizer (for dv) and the weighted dS (for dq, dk); from the backward pair
                kernel, or in one chunk without state from the flash backward, which also
                makes dq
  wa, wb, decay [NC, L], [NC]  the state-gradient scan's row weights (w / den, w dn) and factors
  ([NC, L] vectors are in logical order: entry t is logical position t)
"""

import triton
import triton.language as tl

_NEG = tl.constexpr(-1e30)
_F_MIN = tl.constexpr(-256.0)   # the floor of forget gate pre-activations (utils.F_MIN)
# The grid of the cumsums' coarse parts: L <= 1024 terms of at least F_MIN each on a grid of
# 1/64 stay within 2^24 grid steps, so every partial sum is exact in float32.
_GRID = tl.constexpr(64.0)
_STEP = tl.constexpr(1 / 64)


@triton.jit
def _dot(a, b, MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with operands rounded to MMA (tensor cores for 16-bit types), accumulated in ACC.
    The interpreter's tl.dot is wrong for 16-bit operands: there the rounded operands are widened
    to ACC first, which is exact (products of 16-bit floats are exact in float32)."""
    a = a.to(MMA)
    b = b.to(MMA)
    if INTERP:
        a = a.to(ACC)
        b = b.to(ACC)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _physical(o_t, S, REVERSE):
    """Physical positions of logical positions o_t (any shape; 0 where masked), and the
    in-sequence mask."""
    m_t = o_t < S
    o_p = tl.where(REVERSE != 0, S - 1 - o_t, o_t)
    return tl.where(m_t, o_p, 0), m_t


@triton.jit
def _rows(i_r, S, REVERSE, BT: tl.constexpr):
    """Logical positions of tile i_r, their physical positions and the in-sequence mask."""
    o_t = i_r * BT + tl.arange(0, BT)
    o_p, m_t = _physical(o_t, S, REVERSE)
    return o_t, o_p, m_t


@triton.jit
def _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC: tl.constexpr):
    """A tile's gates as the weights take them (b_row): the cumsum's coarse part c, x = f - m
    as rows, y = i - f as keys (0, 0, NEG where masked: such keys weigh nothing). Loads that a
    kernel leaves unused are dropped."""
    p_b = b_row + 4 * i_bh * S + o_p
    b_bc = tl.load(p_b, mask=m_t, other=0.).to(ACC)
    b_bx = tl.load(p_b + 2 * S, mask=m_t, other=0.).to(ACC)
    b_by = tl.load(p_b + 3 * S, mask=m_t, other=_NEG).to(ACC)
    return b_bc, b_bx, b_by


@triton.jit
def _chunk_total(b_row, i_bh, i_c, S, REVERSE, L: tl.constexpr, ACC: tl.constexpr):
    """g of chunk i_c, the sum of its log forget gates, as (coarse, fine) parts: b at its last
    position in the sequence."""
    o_t = tl.minimum(i_c * L + L - 1, S - 1)
    o_p = tl.where(REVERSE != 0, S - 1 - o_t, o_t)
    p_b = b_row + 4 * i_bh * S + o_p
    return tl.load(p_b).to(ACC), tl.load(p_b + S).to(ACC)


@triton.jit
def _weights(b_ca, b_xa, b_cb, b_yb, see):
    """exp(log D - m) of a tile of rows a and a tile of keys b of the same chunk, up to a:
    exp(b_t - b_j + i_j - m_t) where row t sees key j (see [BT, BT]: every key of an earlier
    tile, its own tile's causal half), else 0. [BT, BT] From the rows' (c, x = f - m) and the
    keys' (c, y = i - f) (_cumsum_rows): the coarse parts' difference is exact, and where the
    weight is not negligible every partial sum after it is moderate, so the weight keeps
    float32's precision however large |b|. Three additions an element, as b_t - b_j + i_j -
    m_t took, in the same order: ((c_t - c_j) + y_j) + x_t (ptxas spilled the flash backward
    at D=384 with (c_t - c_j) + (x_t + y_j))."""
    return tl.exp(tl.where(see, b_ca[:, None] - b_cb[None, :] + b_yb[None, :] + b_xa[:, None],
                           _NEG))


@triton.jit
def _entry_weight(b_bc, b_bx, b_min, m_t):
    """exp(b_t + m_in - m_t), the weight of the state entering the chunk in each row (0 where
    masked). [BT]"""
    return tl.where(m_t, tl.exp(b_bc + (b_bx + b_min)), 0.)


@triton.jit
def _exit_weight(b_gc, b_gf, b_bc, b_by, b_mout):
    """exp(g - b_j + i_j - m_out), each key's weight in the state leaving its chunk (0 where
    masked), from the chunk total's parts (_chunk_total). [BT]"""
    return tl.exp((b_gc - b_bc) + ((b_gf - b_mout) + b_by))


@triton.jit
def _pair_tiles(S, BT: tl.constexpr, NT: tl.constexpr):
    """Tiles a chunk of several holds in the sequence (NTE: fewer than NT where one chunk holds
    the whole sequence) and pairs of a row tile and a key tile up to it a chunk (NP)."""
    NTE = tl.minimum(NT, tl.cdiv(S, BT))
    return NTE, NTE * (NTE + 1) // 2


@triton.jit
def _pair(i_bh, i_c, NC, S, a, j, BT: tl.constexpr, NT: tl.constexpr):
    """Offset of the [BT, BT] slot of chunk i_c's pair (row tile a, key tile j), tiles counted
    from the chunk's start (0 <= j <= a), in a (B * NH, NC, NP, BT, BT) pair buffer: a chunk's
    pairs in row-major triangular order (a row tile's pairs adjacent)."""
    NP = _pair_tiles(S, BT, NT)[1]
    return ((i_bh * NC + i_c) * NP + a * (a + 1) // 2 + j) * (BT * BT)


@triton.jit
def _row_stats(b_row, den, dn, i_bh, o_p, m_t, S, ACC: tl.constexpr):
    """A tile's rows as the backward weighs them: (c, x) for _weights (_cumsum_rows), the
    normalizer den and its gradient dn (masked rows: 0, 0, 1, 0)."""
    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    b_den = tl.load(den + i_bh * S + o_p, mask=m_t, other=1.).to(ACC)
    b_dn = tl.load(dn + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    return b_bc, b_bx, b_den, b_dn


@triton.jit
def _seq(x, i_bh, NH, s_b, s_h):
    """Start of batch-head i_bh's sequence in a (B, NH, S, D) tensor of strides (s_b, s_h, ., 1):
    q, k, v are read in the caller's layout (ViL hands over (NH, B)-ordered, row-strided views)."""
    return x + (i_bh // NH) * s_b + (i_bh % NH) * s_h


@triton.jit
def _state_tile(i_k, i_v, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and masks of a scan program's [BK, BV] tile of a (DK, DV) state."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    return o_k, o_v, m_k, m_v, m_k[:, None] & m_v[None, :], o_k[:, None] * DV + o_v[None, :]


@triton.jit
def _state_or_zero(c, n, i_bh, o_k, m_k, o_kv, m_kv, DK, DV, PRESENT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    """A scan's starting (C, n) tile: loaded from (B * NH, DK, DV) / (B * NH, DK) tensors, or
    zero when the caller has none (PRESENT false: c and n are never read)."""
    if PRESENT:
        b_c = tl.load(c + i_bh * DK * DV + o_kv, mask=m_kv, other=0.).to(ACC)    # [BK, BV]
        b_n = tl.load(n + i_bh * DK + o_k, mask=m_k, other=0.).to(ACC)          # [BK]
    else:
        b_c = tl.zeros([BK, BV], dtype=ACC)
        b_n = tl.zeros([BK], dtype=ACC)
    return b_c, b_n


@triton.jit
def _m_out(m_in, m_last, o_s, i_c, NC, i_bh, ACC: tl.constexpr):
    """m of the state leaving chunk i_c: the next chunk's entry m, or the last one."""
    b_next = tl.load(m_in + o_s + 1, mask=i_c + 1 < NC, other=0.).to(ACC)
    return tl.where(i_c + 1 < NC, b_next, tl.load(m_last + i_bh).to(ACC))


@triton.jit
def _gates(p_i, p_f, o_p, m_t, L: tl.constexpr, ACC: tl.constexpr):
    """The chunk-local inclusive cumsum b of logsigmoid(f) (f floored at F_MIN; NaN stays NaN)
    of a [chunks, L] tile of positions as its coarse and fine parts c, f, the chunks' totals
    g as (g_c, g_f), and y = i - f (NEG where masked).
    Each log forget gate is split into its value rounded to a multiple of 1/64 and the rest
    (|rest| <= 1/128): the coarse parts' partial sums are multiples of 1/64 below 2^18 in
    magnitude (L <= 1024 terms >= F_MIN), exact in float32 in any order of summation, and the
    fine parts' are small. A single float32 cumsum reaches |b| ~ 1000 after four resets in a
    chunk (ulp 6e-5), and a GPU's parallel scan rounds b_t and b_j on different paths, so
    that b_t - b_j, the log of every weight, lost ~5e-4 (an H200 in session 19; a log-step
    scan order under the interpreter reproduces it)."""
    b_f = tl.load(p_f + o_p, mask=m_t, other=0.).to(ACC)
    b_f = tl.where(b_f < _F_MIN, _F_MIN, b_f)
    b_i = tl.load(p_i + o_p, mask=m_t, other=0.).to(ACC)
    # logsigmoid(f) = min(f, 0) - log1p(exp(-|f|)), log1p by Goldberg's trick (accurate to ulps)
    b_x = tl.exp(-tl.abs(b_f))
    b_u = 1. + b_x
    b_d = tl.where(b_u == 1., 1., b_u - 1.)
    b_l1p = tl.where(b_u == 1., b_x, tl.log(b_u) * (b_x / b_d))
    b_fl = tl.where(m_t, tl.minimum(b_f, 0.) - b_l1p, 0.)
    b_hi = tl.floor(b_fl * _GRID + 0.5) * _STEP                    # exact: a power of two
    b_bc = tl.cumsum(b_hi, axis=1)                                  # [chunks, L] exact
    b_bf = tl.cumsum(b_fl - b_hi, axis=1)                           # [chunks, L]
    last = tl.arange(0, L)[None, :] == L - 1
    b_gc = tl.sum(tl.where(last, b_bc, 0.), axis=1)
    b_gf = tl.sum(tl.where(last, b_bf, 0.), axis=1)
    return tl.where(m_t, b_i - b_bf, _NEG), b_bc, b_bf, b_gc, b_gf


@triton.jit
def _key_max_combine(c1, y1, j1, c2, y2, j2):
    """Running max and argmax of keys' u = y - c (i - b, from _gates' parts): the later key
    wins if y2 - y1 > c2 - c1 (the coarse difference exact, so that u, ~1000 after resets,
    is never rounded); the earlier index on ties."""
    take = y2 - y1 > c2 - c1
    return tl.where(take, c2, c1), tl.where(take, y2, y1), tl.where(take, j2, j1)


@triton.jit
def _m_compose(g1, m1, j1, g2, m2, j2):
    """Two chunks' stabilizer steps, x -> max(g + x, m) with the argmax j where the chunk's own
    keys win, composed (the first, then the second): an associative scan's combine. The
    earlier index on ties, as the step by step recurrence."""
    b_c = g2 + m1
    keep = b_c >= m2
    return g1 + g2, tl.where(keep, b_c, m2), tl.where(keep, j1, j2)


@triton.jit
def mlstm_fwd_gates_kernel(
    i, f, m0, m_in, m_last, a_last, gain, decay, b_row, m_row, a_row, S, NC, REVERSE,
    L: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr,
):
    """The stabilizer's scan over chunks of L positions, once per (batch, head): grid (B * NH,).
    Writes every chunk's entry m, the last m and argmax, what the state scan needs per chunk
    (each key's weight into the new state, gain [NC, L] in logical order, and the carried
    state's factor, decay [NC]) and per row what the matmul kernels need (b_row, m_row,
    a_row): the state scan's programs (one per head-dim tile pair) then do no gate arithmetic,
    their serial chain is a load, a scale and a dot per tile. BC chunks at a time, as a [BC, L]
    tile: their gates in parallel, then an associative scan of their steps (_m_compose) from
    the carried m; a chunk at a time, the loads' latency made the scan ~0.9 us a chunk (0.23
    ms at S=16384 on an H200). A row's m and argmax: the larger of the carried state's
    (b + m_in, its argmax; it wins ties) and the chunk's keys up to the row (b + prefix max of
    i - b, the earliest index on ties), as the references' earliest-key rule. Every log-weight
    here is formed from the cumsum's coarse and fine parts as _weights forms them, and b_row
    gets the parts the matmul kernels' weights take (_cumsum_rows)."""
    i_bh = tl.program_id(0).to(tl.int64)
    p_i, p_f = i + i_bh * S, f + i_bh * S
    if HAS_INIT:
        b_m = tl.load(m0 + i_bh).to(ACC)
    else:
        b_m = tl.full([], _NEG, ACC)
    b_a = tl.full([], -1, tl.int32)
    o_b, o_j = tl.arange(0, BC), tl.arange(0, L)
    for i_cb in range(tl.cdiv(NC, BC)):
        o_c = i_cb * BC + o_b                                       # [BC] chunks
        m_c = o_c < NC
        o_p, m_t = _physical(o_c[:, None] * L + o_j[None, :], S, REVERSE)      # [BC, L]
        b_by, b_bc, b_bf, b_gc, b_gf = _gates(p_i, p_f, o_p, m_t, L, ACC)  # [BC, L], [BC]
        b_g = b_gc + b_gf
        b_lw = (b_gc[:, None] - b_bc) + (b_gf[:, None] + b_by)      # key log-weights
        b_mloc, b_jloc = tl.max(b_lw, axis=1, return_indices=True)  # [BC]
        b_jloc = (b_jloc + o_c * L).to(tl.int32)
        # every chunk's step from the block's start, then from the carried (m, argmax); chunks
        # past NC are identities (g = 0, own max NEG) that keep the last chunk's result
        b_G, b_M, b_J = tl.associative_scan((b_g, b_mloc, b_jloc), axis=0, combine_fn=_m_compose)
        keep = b_G + b_m >= b_M
        b_mout = tl.where(keep, b_G + b_m, b_M)                     # [BC] m leaving chunk
        b_aout = tl.where(keep, b_a, b_J)
        # entering chunk c = leaving chunk c - 1 (a one-element select, exact)
        prev = o_b[:, None] == o_b[None, :] + 1                     # [BC, BC]
        b_min = tl.where(o_b == 0, b_m, tl.sum(tl.where(prev, b_mout[None, :], 0.), axis=1))
        b_ain = tl.where(o_b == 0, b_a, tl.sum(tl.where(prev, b_aout[None, :], 0), axis=1))
        o_s = i_bh * NC + o_c
        tl.store(m_in + o_s, b_min.to(m_in.dtype.element_ty), mask=m_c)
        tl.store(decay + o_s, tl.exp(b_gc + (b_gf + b_min - b_mout)).to(decay.dtype.element_ty),
                 mask=m_c)
        tl.store(gain + o_s[:, None] * L + o_j[None, :],
                 tl.exp(b_lw - b_mout[:, None]).to(gain.dtype.element_ty),
                 mask=m_c[:, None])                                 # 0 where masked
        # rows: the chunk's keys up to each row (a prefix max along the chunk) or the carry
        b_pc, b_py, b_pj = tl.associative_scan(
            (b_bc, b_by, tl.broadcast_to(o_j[None, :], (BC, L))), axis=1,
            combine_fn=_key_max_combine)
        b_carry = b_bc + (b_bf + b_min[:, None])
        b_mintra = (b_bc - b_pc) + (b_bf + b_py)
        b_mrow = tl.maximum(b_carry, b_mintra)                      # [BC, L]
        b_arow = tl.where(b_carry >= b_mintra, b_ain[:, None], b_pj + (o_c * L)[:, None])
        o_x = i_bh * S + o_p
        p_b = b_row + 4 * i_bh * S + o_p                            # b_row [4, S] a head
        tl.store(p_b, b_bc.to(b_row.dtype.element_ty), mask=m_t)
        tl.store(p_b + S, b_bf.to(b_row.dtype.element_ty), mask=m_t)
        tl.store(p_b + 2 * S, (b_bf - b_mrow).to(b_row.dtype.element_ty), mask=m_t)
        tl.store(p_b + 3 * S, b_by.to(b_row.dtype.element_ty), mask=m_t)
        tl.store(m_row + o_x, b_mrow.to(m_row.dtype.element_ty), mask=m_t)
        tl.store(a_row + o_x, b_arow.to(tl.int32), mask=m_t)
        last = o_b == BC - 1
        b_m = tl.sum(tl.where(last, b_mout, 0.), axis=0)
        b_a = tl.sum(tl.where(last, b_aout, 0), axis=0)
    tl.store(m_last + i_bh, b_m.to(m_last.dtype.element_ty))
    tl.store(a_last + i_bh, b_a)


@triton.jit
def mlstm_fwd_state_kernel(
    k, v, gain, decay, c0, n0, c_in, n_in, c_last, n_last,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Inter-chunk scan of (C, n): grid (cdiv(DK, BK), cdiv(DV, BV), B * NH), a tile of BT
    positions a step. At every chunk's first tile it writes the chunk's entry state (C block, n
    block from the i_v == 0 programs) and applies the chunk's decay; at the end the last state.
    The gates' part (gain, decay) comes from mlstm_fwd_gates_kernel."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_k, o_v, m_k, m_v, m_kv, o_kv = _state_tile(i_k, i_v, DK, DV, BK, BV)
    first_v = i_v == 0
    p_k, p_v = _seq(k, i_bh, NH, s_b, s_h), _seq(v, i_bh, NH, sv_b, sv_h)
    p_g = gain + i_bh * NC * (BT * NT)
    b_c, b_n = _state_or_zero(c0, n0, i_bh, o_k, m_k, o_kv, m_kv, DK, DV, HAS_INIT, BK, BV, ACC)
    for i_r in range(tl.cdiv(S, BT)):
        if i_r % NT == 0:                                   # (always, and folded, at NT = 1)
            o_s = i_bh * NC + i_r // NT
            tl.store(c_in + o_s * DK * DV + o_kv, b_c.to(c_in.dtype.element_ty), mask=m_kv)
            tl.store(n_in + o_s * DK + o_k, b_n.to(n_in.dtype.element_ty), mask=m_k & first_v)
            b_decay = tl.load(decay + o_s)
            b_c = b_c * b_decay
            b_n = b_n * b_decay
        o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
        b_gain = tl.load(p_g + o_t)                                 # [BT]
        b_kt = tl.load(p_k + o_p[:, None] * s_t + o_k[None, :],
                       mask=m_t[:, None] & m_k[None, :], other=0.)  # [BT, BK]
        b_vt = tl.load(p_v + o_p[:, None] * sv_t + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)  # [BT, BV]
        b_kg = b_kt.to(ACC) * b_gain[:, None]                       # [BT, BK]
        b_c = b_c + _dot(tl.trans(b_kg), b_vt, MMA, ACC, PREC, INTERP)
        b_n = b_n + tl.sum(b_kg, axis=0)
    tl.store(c_last + i_bh * DK * DV + o_kv, b_c.to(c_last.dtype.element_ty), mask=m_kv)
    tl.store(n_last + i_bh * DK + o_k, b_n.to(n_last.dtype.element_ty), mask=m_k & first_v)


@triton.jit
def mlstm_chunk_local_kernel(
    x, y, wc, wn, c, n, S, NC, DK, DV, REVERSE, NH, sx_b, sx_h, sx_t, sy_b, sy_h, sy_t,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Every chunk's own term of a state scan, all chunks at once: grid (NC * B * NH *
    cdiv(DK, BK) * cdiv(DV, BV),), a chunk's tiles adjacent (its x and y tiles are each read by
    several of them: from L2). Into each chunk's slot of c [NC, DK, DV] and n [NC, DK]:
        c = (wc x)^T y,   n = (wn x)^T 1      (per-row weights wc, wn [NC, L], logical order)
    for the state scan (x, y, wc, wn) = (k, v, gain, gain), for the state-gradient scan
    (q, dh, wa, wb). mlstm_chunk_chain_kernel then links the slots into states. The two replace
    a serial scan (a load, a dot and an FMA per tile, one program per tile pair) by one fully
    parallel pass of dots and an elementwise chain: the split launch parameter of the scans."""
    NK, NV = tl.cdiv(DK, BK), tl.cdiv(DV, BV)
    i_p = tl.program_id(0).to(tl.int64)
    i_cbh = i_p // (NK * NV)
    i_k, i_v = ((i_p // NV) % NK).to(tl.int32), (i_p % NV).to(tl.int32)
    i_bh, i_c = i_cbh // NC, i_cbh % NC
    o_k, o_v, m_k, m_v, m_kv, o_kv = _state_tile(i_k, i_v, DK, DV, BK, BV)
    p_x, p_y = _seq(x, i_bh, NH, sx_b, sx_h), _seq(y, i_bh, NH, sy_b, sy_h)
    b_c = tl.zeros([BK, BV], dtype=ACC)
    b_n = tl.zeros([BK], dtype=ACC)
    for i_s in range(NT):
        o_t, o_p, m_t = _rows(i_c * NT + i_s, S, REVERSE, BT)
        o_w = i_bh * NC * (BT * NT) + o_t                  # [NC, L] slots: logical positions
        b_x = tl.load(p_x + o_p[:, None] * sx_t + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.).to(ACC)   # [BT, BK]
        b_y = tl.load(p_y + o_p[:, None] * sy_t + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)           # [BT, BV]
        # (the weights of tiles past the sequence's end may be unwritten: masked)
        b_wc = tl.load(wc + o_w, mask=m_t, other=0.)
        b_wn = tl.load(wn + o_w, mask=m_t, other=0.)
        b_c += _dot(tl.trans(b_x * b_wc[:, None]), b_y, MMA, ACC, PREC, INTERP)
        b_n += tl.sum(b_x * b_wn[:, None], axis=0)                         # [BK]
    tl.store(c + i_cbh * DK * DV + o_kv, b_c.to(c.dtype.element_ty), mask=m_kv)
    tl.store(n + i_cbh * DK + o_k, b_n.to(n.dtype.element_ty), mask=m_k & (i_v == 0))


@triton.jit
def _chain(x, x0, x_end, decay, i_bh, o_e, NC, SIZE, BACKWARD: tl.constexpr,
           HAS_START: tl.constexpr, ACC: tl.constexpr):
    """One head's slots [NC, SIZE] of x, elements o_e: each chunk's own term becomes the state
    carried into it, walking the chunks forwards or backwards; the end state goes to x_end."""
    m_e = o_e < SIZE
    if HAS_START:
        b_x = tl.load(x0 + i_bh * SIZE + o_e, mask=m_e, other=0.).to(ACC)
    else:
        b_x = tl.zeros(o_e.shape, ACC)
    for i_r in range(NC):
        if BACKWARD:
            i_c = NC - 1 - i_r
        else:
            i_c = i_r
        o_s = i_bh * NC + i_c
        p_x = x + o_s * SIZE + o_e
        b_own = tl.load(p_x, mask=m_e, other=0.).to(ACC)   # same addresses, same threads as
        tl.store(p_x, b_x.to(x.dtype.element_ty), mask=m_e)  # the store: read before written
        b_x = b_x * tl.load(decay + o_s) + b_own
    tl.store(x_end + i_bh * SIZE + o_e, b_x.to(x_end.dtype.element_ty), mask=m_e)


@triton.jit
def mlstm_chunk_chain_kernel(
    c, n, decay, c0, n0, c_end, n_end, NC, DK, DV,
    BLOCK: tl.constexpr, BACKWARD: tl.constexpr, HAS_START: tl.constexpr, ACC: tl.constexpr,
):
    """Links mlstm_chunk_local_kernel's slots into states, in place: grid
    (cdiv(DK * DV, BLOCK) + cdiv(DK, BLOCK), B * NH), BLOCK elements of C a program, then of n.
        slot <- carry,   carry <- decay * carry + slot's own term
    chunk by chunk (backwards for the state gradients) from the starting state (c0, n0, or
    zero), then the end state (the last state, or the initial state's gradient)."""
    i_e, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    NCB = tl.cdiv(DK * DV, BLOCK)
    if i_e >= NCB:
        _chain(n, n0, n_end, decay, i_bh, (i_e - NCB) * BLOCK + tl.arange(0, BLOCK), NC, DK,
               BACKWARD, HAS_START, ACC)
    else:
        _chain(c, c0, c_end, decay, i_bh, i_e * BLOCK + tl.arange(0, BLOCK), NC, DK * DV,
               BACKWARD, HAS_START, ACC)


@triton.jit
def _tile_dot(p_a, p_b, o_pa, m_a, o_pb, m_b, sa_t, sb_t, D, BT: tl.constexpr, BD: tl.constexpr,
              MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
              BJ: tl.constexpr = 0):
    """a b^T of a tile of rows of a (physical positions o_pa, row stride sa_t) and a block of
    BJ rows of b (o_pb, sb_t; 0: BT) over a head dim D in blocks of BD: q k^T, or dh v^T.
    [BT, BJ]"""
    BB: tl.constexpr = BT if BJ == 0 else BJ
    b_ab = tl.zeros([BT, BB], dtype=ACC)
    for i_d in range(tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        b_a = tl.load(p_a + o_pa[:, None] * sa_t + o_d[None, :], mask=m_a[:, None] & m_d[None, :],
                      other=0.)                                     # [BT, BD]
        b_b = tl.load(p_b + o_pb[:, None] * sb_t + o_d[None, :], mask=m_b[:, None] & m_d[None, :],
                      other=0.)                                     # [BB, BD]
        b_ab += _dot(b_a, tl.trans(b_b), MMA, ACC, PREC, INTERP)
    return b_ab


@triton.jit
def _pair_groups(a, KT: tl.constexpr):
    """Programs of a pair kernel before row tile a of a chunk when a program takes KT key tiles
    (a row tile's keys up to it in groups of KT: sum over m = 1..a of cdiv(m, KT))."""
    g, r = a // KT, a % KT
    return KT * g * (g + 1) // 2 + r * (g + 1)


@triton.jit
def _pair_program(S, NC, BT: tl.constexpr, NT: tl.constexpr, KT: tl.constexpr):
    """A pair kernel's program: grid (B * NH * NC * _pair_groups(NTE, KT),) (_pair_tiles), a
    program a row tile a and KT key tiles j .. j + KT - 1 of its chunk from j <= a (KT = 1: a
    pair), in the pair buffer's triangular order (_pair: one chunk's pairs adjacent, their
    tiles read by several from L2). Returns batch-head, chunk, the row tile and first key tile
    in the chunk (a, j), their tile indices in the sequence, and whether the row tile is inside
    the sequence (in the last of several chunks it may not be; those programs exit)."""
    NTE = _pair_tiles(S, BT, NT)[0]
    NG = _pair_groups(NTE, KT)
    i_p = tl.program_id(0).to(tl.int64)
    i_bc, t = i_p // NG, (i_p % NG).to(tl.int32)
    # a from t >= _pair_groups(a), about (a + 1)^2 / 2KT: the float32 root, then corrected
    # (by one either way for KT = 1, at most two for KT <= 4; checked for every t below
    # 200,000). KT = 1 keeps its own, shorter form: with the general one the backward pair
    # kernel spilled 8 bytes at its 128-register cap (sm_90, compile_check)
    if KT == 1:
        a = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.) * 0.5).to(tl.int32)
        a = tl.where((a + 1) * (a + 2) // 2 <= t, a + 1, a)
        a = tl.where(a * (a + 1) // 2 > t, a - 1, a)
    else:
        a = tl.sqrt((2 * KT * t + 1).to(tl.float32)).to(tl.int32)
        for _ in tl.static_range(3):
            a = tl.where(_pair_groups(a + 1, KT) <= t, a + 1, a)
            a = tl.where(_pair_groups(a, KT) > t, a - 1, a)
    j = (t - _pair_groups(a, KT)) * KT
    i_bh, i_c = i_bc // NC, (i_bc % NC).to(tl.int32)
    i_r, i_u = i_c * NT + a, i_c * NT + j
    return i_bh, i_c, a, j, i_r, i_u, i_r * BT < S


@triton.jit
def _sees(m_t, a, j, BT: tl.constexpr, KT: tl.constexpr = 1):
    """Which keys of tiles j .. j + KT - 1 each row of tile a of the same chunk (j <= a) sees:
    every key of an earlier tile, its own tile's causal half, none of a later one; no masked
    row. [BT, KT * BT]"""
    o_i = tl.arange(0, BT)
    if KT == 1:
        return m_t[:, None] & ((o_i[:, None] >= o_i[None, :]) | (j < a))
    o_j = tl.arange(0, KT * BT)
    jt = j + o_j // BT
    return m_t[:, None] & (((o_i[:, None] >= (o_j % BT)[None, :]) & (jt == a)[None, :])
                           | (jt < a)[None, :])


@triton.jit
def _pair_rows(i_r, i_u, a, j, S, REVERSE, BT: tl.constexpr, KT: tl.constexpr = 1):
    """A program's row tile and its KT key tiles (physical positions and masks; keys past the
    row tile masked: not loaded) and which keys each row sees (_sees). [BT, KT * BT]"""
    o_p, m_t = _rows(i_r, S, REVERSE, BT)[1:]
    # (i_u is a multiple of KT: the KT tiles are one tile of KT * BT positions)
    o_pj, m_tj = _rows(i_u // KT, S, REVERSE, KT * BT)[1:]
    if KT > 1:
        m_tj = m_tj & (j + tl.arange(0, KT * BT) // BT <= a)
    return o_p, m_t, o_pj, m_tj, _sees(m_t, a, j, BT, KT)


@triton.jit
def _pair_slots(i_bh, i_c, NC, S, a, j, BT: tl.constexpr, NT: tl.constexpr,
                KT: tl.constexpr):
    """Offsets of a program's [BT, KT * BT] block in the pair buffer: the slots of pairs
    (a, j) .. (a, j + KT - 1), adjacent (_store_slots leaves out those past a)."""
    o_i, o_j = tl.arange(0, BT), tl.arange(0, KT * BT)
    return (_pair(i_bh, i_c, NC, S, a, j, BT, NT) + (o_j // BT * (BT * BT))[None, :]
            + o_i[:, None] * BT + (o_j % BT)[None, :])


@triton.jit
def _store_slots(p_x, o_x, b_x, a, j, BT: tl.constexpr, KT: tl.constexpr):
    """Store a program's block b_x at its slots o_x (_pair_slots), in p_x's dtype; columns of
    key tiles past a (no slot) left out."""
    if KT == 1:
        tl.store(p_x + o_x, b_x.to(p_x.dtype.element_ty))
    else:
        o_j = tl.arange(0, KT * BT)
        tl.store(p_x + o_x, b_x.to(p_x.dtype.element_ty), mask=(j + o_j // BT <= a)[None, :])


@triton.jit
def _pair_scores(p_q, p_k, b_row, i_bh, o_p, m_t, b_bc, b_bx, o_pj, m_tj, see, S, DK, s_t,
                 scale, BT: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                 KT: tl.constexpr = 1):
    """A pair's weighted scores s q_a k_j^T * exp(log D - m) [BT, KT * BT] (KT key tiles from
    j), rows (c, x) of tile a (_cumsum_rows): one expression for the forward pair kernel and
    the outputs kernel's SCORES, so that both give the same bits."""
    b_bcj, b_bxj, b_byj = _cumsum_rows(b_row, i_bh, o_pj, m_tj, S, ACC)
    return _tile_dot(p_q, p_k, o_p, m_t, o_pj, m_tj, s_t, s_t, DK, BT, BK, MMA, ACC, PREC,
                     INTERP, KT * BT) * scale * _weights(b_bc, b_bx, b_bcj, b_byj, see)


@triton.jit
def mlstm_fwd_pair_kernel(
    q, k, b_row, sc, rs, S, NC, DK, REVERSE, NH, s_b, s_h, s_t, scale,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Chunks of several tiles, forward: the weighted scores of a tile of rows and KT tiles of
    keys of its chunk up to it (its own: the causal half), once (grid _pair_program's):
        sc = s q_a k_j^T * exp(log D - m)   (in the MMA dtype: what the outputs' dot takes)
        rs = its row sums (ACC, for the normalizer)
    so that the outputs kernel, a program per V tile, loads them instead of recomputing q k^T
    over the whole of DK per V tile and pair. KT key tiles a program load q_a once for KT
    pairs (the pair buffer's slots are the same)."""
    i_bh, i_c, a, j, i_r, i_u, live = _pair_program(S, NC, BT, NT, KT)
    if live:
        o_i = tl.arange(0, BT)
        o_p, m_t, o_pj, m_tj, see = _pair_rows(i_r, i_u, a, j, S, REVERSE, BT, KT)
        b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
        p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
        b_s = _pair_scores(p_q, p_k, b_row, i_bh, o_p, m_t, b_bc, b_bx, o_pj, m_tj, see, S,
                           DK, s_t, scale, BT, BK, MMA, ACC, PREC, INTERP, KT)
        o_x = _pair_slots(i_bh, i_c, NC, S, a, j, BT, NT, KT)
        _store_slots(sc, o_x, b_s, a, j, BT, KT)
        o_r = _pair(i_bh, i_c, NC, S, a, j, BT, NT) // BT + o_i
        if KT == 1:
            tl.store(rs + o_r, tl.sum(b_s, axis=1).to(rs.dtype.element_ty))
        else:
            o_j = tl.arange(0, KT * BT)
            for u in tl.static_range(KT):
                b_su = tl.sum(tl.where((o_j // BT == u)[None, :], b_s, 0.), axis=1)
                tl.store(rs + o_r + u * BT, b_su.to(rs.dtype.element_ty),
                         mask=(j + u <= a) & (o_i >= 0))       # (the scalar as a [BT] mask)


@triton.jit
def mlstm_bwd_pair_kernel(
    q, k, v, dh, b_row, den, dn, ps, ds,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t, scale,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KT: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Chunks of several tiles, backward: the two products of a row tile a and KT key tiles
    from j <= a (KT pairs), once (grid _pair_program's), in the MMA dtype:
        ps = s q_a k_j^T * W / den_a           (dv_j += ps^T dh_a)
        ds = (dh_a v_j^T / den_a + dn_a) * W   (dq_a += ds k_j s, dk_j += ds^T q_a s)
    with W = exp(log D - m); the dq/dk and dv kernels, a program per head-dim tile, load them
    instead of recomputing dh v^T over all of DV per K tile (or q k^T over DK per V tile).
    KT key tiles a program load q_a and dh_a once for KT pairs."""
    i_bh, i_c, a, j, i_r, i_u, live = _pair_program(S, NC, BT, NT, KT)
    if live:
        o_p, m_t, o_pj, m_tj, see = _pair_rows(i_r, i_u, a, j, S, REVERSE, BT, KT)
        b_bc, b_bx, b_den, b_dn = _row_stats(b_row, den, dn, i_bh, o_p, m_t, S, ACC)
        b_bcj, b_bxj, b_byj = _cumsum_rows(b_row, i_bh, o_pj, m_tj, S, ACC)
        b_w = _weights(b_bc, b_bx, b_bcj, b_byj, see)               # [BT, KT * BT]
        p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
        p_v, p_dh = _seq(v, i_bh, NH, sv_b, sv_h), dh + i_bh * S * DV
        b_qk = _tile_dot(p_q, p_k, o_p, m_t, o_pj, m_tj, s_t, s_t, DK, BT, BK,
                         MMA, ACC, PREC, INTERP, KT * BT)
        b_dhv = _tile_dot(p_dh, p_v, o_p, m_t, o_pj, m_tj, DV, sv_t, DV, BT, BV,
                          MMA, ACC, PREC, INTERP, KT * BT)
        o_x = _pair_slots(i_bh, i_c, NC, S, a, j, BT, NT, KT)
        _store_slots(ps, o_x, b_qk * scale * b_w / b_den[:, None], a, j, BT, KT)
        _store_slots(ds, o_x, (b_dhv / b_den[:, None] + b_dn[:, None]) * b_w, a, j, BT, KT)


@triton.jit
def mlstm_bwd_flash_kernel(
    q, k, v, dh, b_row, den, dn, ps, ds, dq, rq,
    S, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t, scale,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr,
    BV: tl.constexpr, BV2: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """One chunk holding the whole sequence and no carried state (ViL's cells), backward in
    FlashAttention's form for the rows: grid (cdiv(S, BT), B * NH). A program holds a tile of
    BT rows of q (BK + BK2 columns) and dh (BV + BV2) and walks the key tiles of BS positions
    up to its last row in one pipelined loop: for each, the products mlstm_bwd_pair_kernel
    makes (ps = s q k^T W / den, ds = (dh v^T / den + dn) W), stored into the pair slots for
    the dk and dv kernels, and dq += ds k s accumulated over all of DK, with q . dq per row
    into rq [1, B * NH, S]. Key tiles run to the row tile's last pair slot's end, past S where
    the sequence ends inside it (zeros there), so that every slot is written whole."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
    p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
    p_v, p_dh = _seq(v, i_bh, NH, sv_b, sv_h), dh + i_bh * S * DV
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    b_q = _load_tile(p_q, o_p, m_t, s_t, o_k, m_k)                     # [BT, BK]
    b_dh = _load_tile(p_dh, o_p, m_t, DV, o_v, m_v)                    # [BT, BV]
    b_dq = tl.zeros([BT, BK], dtype=ACC)
    if BK2 > 0:                                   # the second K tile, right after the first
        o_k2 = BK + tl.arange(0, BK2)
        m_k2 = o_k2 < DK
        b_q2 = _load_tile(p_q, o_p, m_t, s_t, o_k2, m_k2)              # [BT, BK2]
        b_dq2 = tl.zeros([BT, BK2], dtype=ACC)
    if BV2 > 0:
        o_v2 = BV + tl.arange(0, BV2)
        m_v2 = o_v2 < DV
        b_dh2 = _load_tile(p_dh, o_p, m_t, DV, o_v2, m_v2)             # [BT, BV2]
    b_bc, b_bx, b_den, b_dn = _row_stats(b_row, den, dn, i_bh, o_p, m_t, S, ACC)
    # this row tile's first pair slot (key tile 0), row by row: _pair's, in the one chunk of
    # cdiv(S, BT) tiles (so that the chunk's length is not compiled in); its slots hold the
    # keys before (i_r + 1) * BT
    NTE = tl.cdiv(S, BT)
    p_x = ((i_bh * (NTE * (NTE + 1) // 2) + i_r * (i_r + 1) // 2) * (BT * BT)
           + tl.arange(0, BT)[:, None] * BT)
    end = (i_r + 1) * BT
    for j in range(0, tl.cdiv(end, BS)):
        o_tj, o_pj, m_tj = _rows(j, S, REVERSE, BS)
        b_bcj, b_bxj, b_byj = _cumsum_rows(b_row, i_bh, o_pj, m_tj, S, ACC)
        b_k = _load_tile(p_k, o_pj, m_tj, s_t, o_k, m_k)                # [BS, BK]
        b_s = _dot(b_q, tl.trans(b_k), MMA, ACC, PREC, INTERP)          # [BT, BS]
        b_dhv = _dot(b_dh, tl.trans(_load_tile(p_v, o_pj, m_tj, sv_t, o_v, m_v)), MMA, ACC,
                     PREC, INTERP)                                      # [BT, BS]
        if BK2 > 0:
            b_k2 = _load_tile(p_k, o_pj, m_tj, s_t, o_k2, m_k2)         # [BS, BK2]
            b_s += _dot(b_q2, tl.trans(b_k2), MMA, ACC, PREC, INTERP)
        if BV2 > 0:
            b_dhv += _dot(b_dh2, tl.trans(_load_tile(p_v, o_pj, m_tj, sv_t, o_v2, m_v2)), MMA,
                          ACC, PREC, INTERP)
        b_w = _weights(b_bc, b_bx, b_bcj, b_byj, m_t[:, None] & (o_t[:, None] >= o_tj[None, :]))
        b_ds = (b_dhv / b_den[:, None] + b_dn[:, None]) * b_w            # [BT, BS]
        # (a key tile may span several slots, or, longer than a row tile, pass the last)
        o_x = p_x + ((o_tj // BT) * (BT * BT) + o_tj % BT)[None, :]
        m_x = (o_tj < end)[None, :]
        tl.store(ps + o_x, (b_s * scale * b_w / b_den[:, None]).to(ps.dtype.element_ty), mask=m_x)
        tl.store(ds + o_x, b_ds.to(ds.dtype.element_ty), mask=m_x)
        b_dq += _dot(b_ds, b_k, MMA, ACC, PREC, INTERP)
        if BK2 > 0:
            b_dq2 += _dot(b_ds, b_k2, MMA, ACC, PREC, INTERP)
    # q . dq from q loaded again (from L2): q's registers would otherwise stay live through
    # the loop beside its shared-memory copy (at D=384, 48 a thread: the build spilled)
    b_dq = b_dq * scale
    p_dq = _seq(dq, i_bh, NH, sd_b, sd_h)
    tl.store(p_dq + o_p[:, None] * sd_t + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])
    b_rq = tl.sum(_load_tile(p_q, o_p, m_t, s_t, o_k, m_k).to(ACC) * b_dq, axis=1)
    if BK2 > 0:
        b_dq2 = b_dq2 * scale
        tl.store(p_dq + o_p[:, None] * sd_t + o_k2[None, :], b_dq2.to(dq.dtype.element_ty),
                 mask=m_t[:, None] & m_k2[None, :])
        b_rq += tl.sum(_load_tile(p_q, o_p, m_t, s_t, o_k2, m_k2).to(ACC) * b_dq2, axis=1)
    tl.store(rq + i_bh * S + o_p, b_rq.to(rq.dtype.element_ty), mask=m_t)


@triton.jit
def _normalized(b_num, b_nrow, b_m, eps):
    """h of a tile of rows: numerator / (max(|n|, exp(-m)) + eps), row by row."""
    return b_num / (tl.maximum(tl.abs(b_nrow), tl.exp(-b_m)) + eps)[:, None]


@triton.jit
def _store_tile(x, i_bh, S, D, o_p, m_t, b_x, o_d, m_d):
    """A tile of rows (o_p, m_t) and columns (o_d, m_d) into a (B * NH, S, D) tensor."""
    tl.store(x + i_bh * S * D + o_p[:, None] * D + o_d[None, :], b_x.to(x.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _load_tile(p_x, o_p, m_t, s_t, o_d, m_d):
    """A tile of positions (o_p, m_t) of a sequence (p_x, row stride s_t) in the columns o_d
    (m_d): of q, k or v. [len(o_p), len(o_d)]"""
    return tl.load(p_x + o_p[:, None] * s_t + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                   other=0.)


@triton.jit
def mlstm_fwd_out_kernel(
    q, k, v, c_in, n_in, m_in, b_row, m_row, h, n_row, sc, rs,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t, scale, eps,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BV2: tl.constexpr,
    QN_MMA: tl.constexpr, HAS_STATE: tl.constexpr, SCORES: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Outputs of one tile of rows and V block: grid (cdiv(DV, BV + BV2), cdiv(S, BT), B * NH).
    A V block is one tile of BV columns, or with BV2 > 0 two tiles side by side, BV + BV2
    columns (DV = 384 as 256 + 128, 192 as 128 + 64: powers of two with no masked lanes, where
    one tile of 512 or 256 would waste a quarter of its products; at 8 warps, as
    heuristics.launch_params enforces: 64 + 32 at 4 warps gave wrong outputs on an H200): with
    SCORES and one block holding DV, each pair's scores feed every value column at once,
    FlashAttention's forward (heuristics.FLASH_FORWARD forced on). The
    rows' m (the gate scan's m_row) is the max over the carried state and the chunk's keys up
    to each row; the signed normalizer of every row is stored by the i_v == 0 programs. The
    tile's own keys (one tile a chunk) and the carried state in one pass over DK; with several
    tiles a chunk, the chunk's tiles up to this one (its own included) take their scores from
    mlstm_fwd_pair_kernel instead, or with SCORES (set where one V block holds DV, so that no
    pair's q k^T would be computed twice) compute them here, as that kernel would (the same
    bits), and it does not run: no [BT, BT] scores through memory. Without HAS_STATE (one
    chunk for the whole sequence, no initial state: the carried state is zero) c_in and n_in
    are not read and the state's products not computed (with several tiles a chunk and no
    SCORES, q and k are not read at all).
    QN_MMA (set when the loop is software-pipelined) computes q . n_in on the tensor cores
    instead of as a sum of products, so that q only feeds dots: with a sum too, Triton 3.6
    gives q's pipelined loads one shared-memory buffer instead of two and the next iteration's
    copy overwrites it while the async wgmma still read it (wrong outputs on an H200 at
    num_stages=2; triton-lang/triton#6691). n_in is then [NC, DK, 2] in the MMA dtype, each n
    as hi + lo (chunk.hi_lo), loaded as the first two columns of a [BK, 16] operand: as
    accurate as the float32 sum, and a plain pipelined load."""
    i_v, i_r, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_c = i_r // NT
    o_v = i_v * (BV + BV2) + tl.arange(0, BV)
    m_v = o_v < DV
    if BV2 > 0:                                   # the second V tile, right after the first
        o_v2 = i_v * (BV + BV2) + BV + tl.arange(0, BV2)
        m_v2 = o_v2 < DV
    o_i = tl.arange(0, BT)
    o_s = i_bh * NC + i_c
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)

    p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
    b_qk = tl.zeros([BT, BT], dtype=ACC)
    b_qc = tl.zeros([BT, BV], dtype=ACC)
    if BV2 > 0:
        b_qc2 = tl.zeros([BT, BV2], dtype=ACC)
    b_qn = tl.zeros([BT], dtype=ACC)
    b_qn16 = tl.zeros([BT, 16], dtype=ACC)                          # QN_MMA: q @ (n hi, lo)
    if (NT == 1) or HAS_STATE:
        for i_k in range(tl.cdiv(DK, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < DK
            b_q = _load_tile(p_q, o_p, m_t, s_t, o_k, m_k)                  # [BT, BK]
            if NT == 1:
                b_k = _load_tile(p_k, o_p, m_t, s_t, o_k, m_k)
                b_qk += _dot(b_q, tl.trans(b_k), MMA, ACC, PREC, INTERP)        # [BT, BT]
            if HAS_STATE:
                p_c = c_in + o_s * DK * DV + o_k[:, None] * DV
                b_c = tl.load(p_c + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                              other=0.)                                       # [BK, BV]
                b_qc += _dot(b_q, b_c, MMA, ACC, PREC, INTERP)
                if BV2 > 0:
                    b_c2 = tl.load(p_c + o_v2[None, :], mask=m_k[:, None] & m_v2[None, :],
                                   other=0.)                                  # [BK, BV2]
                    b_qc2 += _dot(b_q, b_c2, MMA, ACC, PREC, INTERP)
                if QN_MMA:
                    o_j = tl.arange(0, 16)
                    b_n = tl.load(n_in + (o_s * DK + o_k[:, None]) * 2 + o_j[None, :],
                                  mask=m_k[:, None] & (o_j[None, :] < 2), other=0.)  # [BK, 16]
                    b_qn16 += _dot(b_q, b_n, MMA, ACC, PREC, INTERP)
                else:
                    b_n = tl.load(n_in + o_s * DK + o_k, mask=m_k, other=0.).to(ACC)  # [BK]
                    b_qn += tl.sum(b_q.to(ACC) * b_n[None, :], axis=1)
    if QN_MMA and HAS_STATE:
        b_qn = tl.sum(b_qn16, axis=1)
    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    # (m, only for the normalizer, loaded here: loaded at the store, DV=512 spilled 8 B)
    b_m = tl.load(m_row + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    p_v = _seq(v, i_bh, NH, sv_b, sv_h)
    if NT == 1:
        causal = o_i[:, None] >= o_i[None, :]
        b_s = b_qk * scale * _weights(b_bc, b_bx, b_bc, b_by, causal)  # [BT, BT]
        b_num = _dot(b_s, _load_tile(p_v, o_p, m_t, sv_t, o_v, m_v), MMA, ACC, PREC, INTERP)
        if BV2 > 0:
            b_num2 = _dot(b_s, _load_tile(p_v, o_p, m_t, sv_t, o_v2, m_v2), MMA, ACC, PREC, INTERP)
        b_nrow = tl.sum(b_s, axis=1)
    else:
        b_num = tl.zeros([BT, BV], dtype=ACC)
        if BV2 > 0:
            b_num2 = tl.zeros([BT, BV2], dtype=ACC)
        b_nrow = tl.zeros([BT], dtype=ACC)
    if HAS_STATE:
        b_min = tl.load(m_in + o_s).to(ACC)
        b_w = _entry_weight(b_bc, b_bx, b_min, m_t) * scale        # [BT] carried state's weight
        b_num += b_w[:, None] * b_qc
        if BV2 > 0:
            b_num2 += b_w[:, None] * b_qc2
        b_nrow += b_w * b_qn
    if NT > 1:
        # the chunk's tiles of keys up to this one: their weighted scores (mlstm_fwd_pair_kernel's,
        # or with SCORES computed here the same way)
        a = i_r - i_c * NT
        o_ss = o_i[:, None] * BT + o_i[None, :]
        for j in range(0, a + 1):
            o_pj, m_tj = _rows(i_c * NT + j, S, REVERSE, BT)[1:]
            if SCORES:
                b_sj = _pair_scores(p_q, p_k, b_row, i_bh, o_p, m_t, b_bc, b_bx, o_pj, m_tj,
                                    _sees(m_t, a, j, BT), S, DK, s_t, scale, BT, BK, MMA, ACC,
                                    PREC, INTERP)
                b_nrow += tl.sum(b_sj, axis=1)
            else:
                o_x = _pair(i_bh, i_c, NC, S, a, j, BT, NT)
                b_sj = tl.load(sc + o_x + o_ss)                             # [BT, BT]
                b_nrow += tl.load(rs + o_x // BT + o_i).to(ACC)
            b_num += _dot(b_sj, _load_tile(p_v, o_pj, m_tj, sv_t, o_v, m_v), MMA, ACC, PREC, INTERP)
            if BV2 > 0:
                b_num2 += _dot(b_sj, _load_tile(p_v, o_pj, m_tj, sv_t, o_v2, m_v2), MMA, ACC, PREC,
                               INTERP)
    _store_tile(h, i_bh, S, DV, o_p, m_t, _normalized(b_num, b_nrow, b_m, eps), o_v, m_v)
    if BV2 > 0:
        _store_tile(h, i_bh, S, DV, o_p, m_t, _normalized(b_num2, b_nrow, b_m, eps), o_v2, m_v2)
    tl.store(n_row + i_bh * S + o_p, b_nrow.to(n_row.dtype.element_ty), mask=m_t & (i_v == 0))


@triton.jit
def mlstm_fwd_flash_kernel(
    q, k, v, b_row, m_row, h, n_row,
    S, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t, scale, eps,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr,
    BV: tl.constexpr, BV2: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """One chunk holding the whole sequence and no carried state (no initial state, the last
    state unused: ViL's cells), outputs in FlashAttention's form: grid (cdiv(S, BT), B * NH).
    A program holds a tile of BT rows of q over the whole of DK (BK + BK2 columns) and walks
    the key tiles of BS positions up to its last row in one loop, the loop Triton pipelines:
    each key tile's k and v (BV + BV2 columns) are loaded, its scores computed and weighted
    and their products with v accumulated, with nothing stored but h and the signed normalizer.
    (The outputs kernel nests a loop over DK in its loop over key tiles; only that inner loop
    is pipelined there, and the value tiles' loads wait.)"""
    i_r, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
    p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
    p_v = _seq(v, i_bh, NH, sv_b, sv_h)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    b_q = _load_tile(p_q, o_p, m_t, s_t, o_k, m_k)                     # [BT, BK]
    if BK2 > 0:                                   # the second K tile, right after the first
        o_k2 = BK + tl.arange(0, BK2)
        m_k2 = o_k2 < DK
        b_q2 = _load_tile(p_q, o_p, m_t, s_t, o_k2, m_k2)              # [BT, BK2]
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    b_num = tl.zeros([BT, BV], dtype=ACC)
    if BV2 > 0:
        o_v2 = BV + tl.arange(0, BV2)
        m_v2 = o_v2 < DV
        b_num2 = tl.zeros([BT, BV2], dtype=ACC)
    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    b_nrow = tl.zeros([BT], dtype=ACC)
    for j in range(0, tl.cdiv(tl.minimum(i_r * BT + BT, S), BS)):
        o_tj, o_pj, m_tj = _rows(j, S, REVERSE, BS)
        b_bcj, b_bxj, b_byj = _cumsum_rows(b_row, i_bh, o_pj, m_tj, S, ACC)
        b_s = _dot(b_q, tl.trans(_load_tile(p_k, o_pj, m_tj, s_t, o_k, m_k)), MMA, ACC, PREC,
                   INTERP)                                          # [BT, BS]
        if BK2 > 0:
            b_s += _dot(b_q2, tl.trans(_load_tile(p_k, o_pj, m_tj, s_t, o_k2, m_k2)), MMA, ACC,
                        PREC, INTERP)
        see = m_t[:, None] & (o_t[:, None] >= o_tj[None, :])
        b_s = b_s * scale * _weights(b_bc, b_bx, b_bcj, b_byj, see)
        b_nrow += tl.sum(b_s, axis=1)
        b_num += _dot(b_s, _load_tile(p_v, o_pj, m_tj, sv_t, o_v, m_v), MMA, ACC, PREC, INTERP)
        if BV2 > 0:
            b_num2 += _dot(b_s, _load_tile(p_v, o_pj, m_tj, sv_t, o_v2, m_v2), MMA, ACC, PREC,
                           INTERP)
    b_m = tl.load(m_row + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    _store_tile(h, i_bh, S, DV, o_p, m_t, _normalized(b_num, b_nrow, b_m, eps), o_v, m_v)
    if BV2 > 0:
        _store_tile(h, i_bh, S, DV, o_p, m_t, _normalized(b_num2, b_nrow, b_m, eps), o_v2, m_v2)
    tl.store(n_row + i_bh * S + o_p, b_nrow.to(n_row.dtype.element_ty), mask=m_t)


@triton.jit
def mlstm_bwd_gates_kernel(
    rq, rk, dm_row, u, w, f, di, df, S, NQ, NK, BH, REVERSE,
    BS: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
):
    """The gate gradients from the row sums, once per (batch, head): grid (B * NH,), the
    sequence in blocks of BS, physical order. With the argmax routing's additions u (to di) and
    w (to dF; without HAS_W, -u) done beforehand (scatters, in PyTorch):
        di = sum_k rk[k] + u,   dF = sum_k rq[k] - sum_k rk[k] + dm + w  (k: head-dim blocks,
                                                   NQ of them in rq, NK in rk)
        df = sigmoid(-f) * (sum of dF over the positions the recurrence sees at or after p)
    (0 where f is below its floor F_MIN)
    The NK partial sums are added in a fixed order (deterministic). The suffix sum in logical
    order is one in physical order backwards (forward direction) or forwards (REVERSE), block
    by block with a carry."""
    i_bh = tl.program_id(0).to(tl.int64)
    NB = tl.cdiv(S, BS)
    b_carry = tl.zeros([], dtype=ACC)
    for i_r in range(NB):
        if REVERSE != 0:
            i_b = i_r
        else:
            i_b = NB - 1 - i_r
        o_p = i_b * BS + tl.arange(0, BS)
        m_p = o_p < S
        o_x = i_bh * S + o_p
        b_rq = tl.zeros([BS], dtype=ACC)
        b_rk = tl.zeros([BS], dtype=ACC)
        for i_k in range(NK):                          # (i_k * BH + i_bh: int64, no overflow)
            o_k = (i_k * BH + i_bh) * S + o_p
            b_rk += tl.load(rk + o_k, mask=m_p, other=0.).to(ACC)
            if i_k < NQ:
                b_rq += tl.load(rq + o_k, mask=m_p, other=0.).to(ACC)
        b_u = tl.load(u + o_x, mask=m_p, other=0.).to(ACC)
        if HAS_W:
            b_w = tl.load(w + o_x, mask=m_p, other=0.).to(ACC)
        else:
            b_w = -b_u
        b_dF = b_rq - b_rk + tl.load(dm_row + o_x, mask=m_p, other=0.).to(ACC) + b_w   # [BS]
        if REVERSE != 0:
            b_cs = tl.cumsum(b_dF, axis=0) + b_carry
        else:
            b_cs = tl.cumsum(b_dF, axis=0, reverse=True) + b_carry
        b_carry += tl.sum(b_dF, axis=0)
        b_f = tl.load(f + o_x, mask=m_p, other=0.).to(ACC)
        tl.store(di + o_x, (b_rk + b_u).to(di.dtype.element_ty), mask=m_p)
        b_df = tl.where(b_f < _F_MIN, 0., b_cs / (1. + tl.exp(b_f)))
        tl.store(df + o_x, b_df.to(df.dtype.element_ty), mask=m_p)


@triton.jit
def mlstm_bwd_prologue_kernel(
    dh, h, b_row, m_row, n_row, m_in, m_last, den, dn, dm, wa, wb, decay,
    S, NC, DV, REVERSE, scale, eps,
    BT: tl.constexpr, NT: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
):
    """The backward's O(S * DV) start, one tile of BT rows per program: grid (cdiv(S, BT),
    B * NH). With every m held constant the normalizer is one more value column (spec):
        den = max(|n|, exp(-m)) + eps,  dden = -(dh . h) / den,
        dn = dden * sign(n) where |n| wins the max (else 0),  dm = eps * dden (for the argmax),
    stored per row (physical order). For the state-gradient scan, per row (logical [NC, L]):
    w = s exp(b + m_in - m) (the entry state's weight in the row), wa = w / den, wb = w dn,
    and per chunk (by its first tile's program) the factor of the gradient carried across it,
    exp(g + m_in - m_out)."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_c = i_r // NT
    o_s = i_bh * NC + i_c
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
    p_dh, p_h = dh + i_bh * S * DV, h + i_bh * S * DV
    b_dot = tl.zeros([BT], dtype=ACC)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        b_dh = tl.load(p_dh + o_p[:, None] * DV + o_v[None, :], mask=m_tv, other=0.).to(ACC)
        b_h = tl.load(p_h + o_p[:, None] * DV + o_v[None, :], mask=m_tv, other=0.).to(ACC)
        b_dot += tl.sum(b_dh * b_h, axis=1)                         # [BT]
    b_m = tl.load(m_row + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    b_n = tl.load(n_row + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    b_floor = tl.exp(-b_m)
    b_den = tl.maximum(tl.abs(b_n), b_floor) + eps
    b_dden = -b_dot / b_den
    b_sign = tl.where(b_n > 0, 1., tl.where(b_n < 0, -1., 0.))
    b_dn = tl.where(tl.abs(b_n) >= b_floor, b_dden * b_sign, 0.)
    tl.store(den + i_bh * S + o_p, b_den.to(den.dtype.element_ty), mask=m_t)
    tl.store(dn + i_bh * S + o_p, b_dn.to(dn.dtype.element_ty), mask=m_t)
    tl.store(dm + i_bh * S + o_p, (eps * b_dden).to(dm.dtype.element_ty), mask=m_t)

    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    b_min = tl.load(m_in + o_s).to(ACC)
    b_w = _entry_weight(b_bc, b_bx, b_min, m_t) * scale             # [BT]
    o_w = i_bh * NC * (BT * NT) + o_t                               # [NC, L]: logical positions
    tl.store(wa + o_w, (b_w / b_den).to(wa.dtype.element_ty))
    tl.store(wb + o_w, (b_w * b_dn).to(wb.dtype.element_ty))
    if i_r % NT == 0:
        b_gc, b_gf = _chunk_total(b_row, i_bh, i_c, S, REVERSE, BT * NT, ACC)
        b_mout = _m_out(m_in, m_last, o_s, i_c, NC, i_bh, ACC)
        tl.store(decay + o_s, tl.exp(b_gc + (b_gf + b_min - b_mout)).to(decay.dtype.element_ty))


@triton.jit
def mlstm_bwd_state_kernel(
    q, dh, wa, wb, decay, dc_last, dn_last, dc_out, dn_out, dc0, dn0,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """Reverse scan of the state gradients: grid (cdiv(DK, BK), cdiv(DV, BV), B * NH), a tile
    of BT positions a step from the end. At every chunk's last tile it stores the gradient of
    the state leaving the chunk and applies the chunk's factor; at the end that of the
    initial state:
        dC <- decay dC + (wa q)^T dh,   dn <- decay dn + (wb q)^T 1
    with the per-row weights and per-chunk factors of mlstm_bwd_prologue_kernel, starting from
    the last state's gradient (HAS_DLAST) or zero (a caller that did not use the last state)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_k, o_v, m_k, m_v, m_kv, o_kv = _state_tile(i_k, i_v, DK, DV, BK, BV)
    first_v = i_v == 0
    p_q, p_dh = _seq(q, i_bh, NH, s_b, s_h), dh + i_bh * S * DV
    p_wa, p_wb = wa + i_bh * NC * (BT * NT), wb + i_bh * NC * (BT * NT)
    b_dc, b_dn = _state_or_zero(dc_last, dn_last, i_bh, o_k, m_k, o_kv, m_kv, DK, DV, HAS_DLAST,
                                BK, BV, ACC)
    NTS = tl.cdiv(S, BT)
    for i_rr in range(NTS):
        i_r = NTS - 1 - i_rr
        if (i_r % NT == NT - 1) | (i_r == NTS - 1):         # (always, and folded, at NT = 1)
            o_s = i_bh * NC + i_r // NT
            tl.store(dc_out + o_s * DK * DV + o_kv, b_dc.to(dc_out.dtype.element_ty), mask=m_kv)
            tl.store(dn_out + o_s * DK + o_k, b_dn.to(dn_out.dtype.element_ty),
                     mask=m_k & first_v)
            b_decay = tl.load(decay + o_s)
            b_dc = b_dc * b_decay
            b_dn = b_dn * b_decay
        o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
        b_wa = tl.load(p_wa + o_t)                                   # [BT], 0 where masked
        b_wb = tl.load(p_wb + o_t)
        b_q = tl.load(p_q + o_p[:, None] * s_t + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.).to(ACC)   # [BT, BK]
        b_dh = tl.load(p_dh + o_p[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.)                                     # [BT, BV]
        b_dc = b_dc + _dot(tl.trans(b_q * b_wa[:, None]), b_dh, MMA, ACC, PREC, INTERP)
        b_dn = b_dn + tl.sum(b_q * b_wb[:, None], axis=0)
    tl.store(dc0 + i_bh * DK * DV + o_kv, b_dc.to(dc0.dtype.element_ty), mask=m_kv)
    tl.store(dn0 + i_bh * DK + o_k, b_dn.to(dn0.dtype.element_ty), mask=m_k & first_v)


@triton.jit
def mlstm_bwd_dqk_kernel(
    q, k, v, dh, b_row, den, dn, c_in, n_in, m_in, m_last, dc_out, dn_out, ds,
    dq, dk, rq, rk,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t, scale,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_STATE: tl.constexpr, DQ: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """dq, dk of one tile of positions and K block: grid (cdiv(DK, BK), cdiv(S, BT), B * NH),
    no atomics.
        dq = (dS * W) k s + wc (dnum C_in^T + dn n_in)
        dk = (dS * W)^T q s + gain (v dC_out^T + dn_out),   dS = dnum v^T + dn
    (gated linear attention with values [v, 1], plus the paths through the chunk's entry and
    exit states): with one tile a chunk, the tile's own block of dS computed here; with
    several, the chunk's dS blocks from mlstm_bwd_pair_kernel, the tiles up to this one as keys
    for dq and from this one on as rows for dk. Also stores this K block's part of q . dq and
    k . dk per row in rq / rk [NK, B * NH, S] (summed over blocks by the caller). Without
    HAS_STATE (one chunk for the whole sequence, no initial state, the last state unused: the
    entry and exit states and their gradients are zero) the state terms are not loaded or
    computed. Without DQ (chunks of several tiles with no state only, where
    mlstm_bwd_flash_kernel made dq and rq along with the pair slots) dk and rk alone."""
    i_k, i_r, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_c = i_r // NT
    o_i = tl.arange(0, BT)
    o_s = i_bh * NC + i_c
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < DK
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
    m_tk = m_t[:, None] & m_k[None, :]
    p_dh, p_v = dh + i_bh * S * DV, _seq(v, i_bh, NH, sv_b, sv_h)
    p_c, p_dc = c_in + o_s * DK * DV, dc_out + o_s * DK * DV
    b_den = tl.load(den + i_bh * S + o_p, mask=m_t, other=1.).to(ACC)
    b_ds = tl.zeros([BT, BT], dtype=ACC)
    b_dqc = tl.zeros([BT, BK], dtype=ACC)
    b_dkc = tl.zeros([BT, BK], dtype=ACC)
    if (NT == 1) or HAS_STATE:
        for i_v in range(tl.cdiv(DV, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < DV
            m_tv = m_t[:, None] & m_v[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            # 16-bit dh straight from memory into the MMA: dnum = dh / den is a row scaling,
            # applied to the products after the loop (no per-tile conversion, no rounding of
            # dh / den). float32 (tf32x3) divides here: scaling after the loop spilled there.
            b_dh = tl.load(p_dh + o_p[:, None] * DV + o_v[None, :], mask=m_tv, other=0.)
            if MMA == tl.float32:
                b_dh = b_dh.to(ACC) / b_den[:, None]
            b_v = tl.load(p_v + o_p[:, None] * sv_t + o_v[None, :], mask=m_tv, other=0.)
            if NT == 1:
                b_ds += _dot(b_dh, tl.trans(b_v), MMA, ACC, PREC, INTERP)     # [BT, BT]
            if HAS_STATE:
                b_c = tl.load(p_c + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.)
                b_dco = tl.load(p_dc + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.)
                b_dqc += _dot(b_dh, tl.trans(b_c), MMA, ACC, PREC, INTERP)    # [BT, BK]
                b_dkc += _dot(b_v, tl.trans(b_dco), MMA, ACC, PREC, INTERP)
    if MMA != tl.float32:
        b_ds = b_ds / b_den[:, None]                                   # [BT, BT] dnum v^T
        b_dqc = b_dqc / b_den[:, None]                                 # [BT, BK] dnum C_in^T
    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    b_dnr = tl.load(dn + i_bh * S + o_p, mask=m_t, other=0.).to(ACC)
    p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
    o_d = o_p[:, None] * sd_t + o_k[None, :]
    o_r = (i_k * tl.num_programs(2) + i_bh) * S + o_p
    # dq is made and stored before dk, and the tile's own q and k are loaded where they are
    # first needed (with several tiles a chunk: for the row sums, after the loops): no
    # accumulator, state product or tile is held through the other half's work (bf16, sm_90:
    # in one chunk at D=384 141 registers a thread instead of 188, 3 programs an SM; with
    # states at one tile a chunk 10-20 fewer).
    if NT == 1:
        b_k = _load_tile(p_k, o_p, m_t, s_t, o_k, m_k)                 # [BT, BK]
        causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
        b_ds = (b_ds + b_dnr[:, None]) * _weights(b_bc, b_bx, b_bc, b_by, causal)  # dS * W
        b_dq = _dot(b_ds, b_k, MMA, ACC, PREC, INTERP) * scale
    else:
        b_dq = tl.zeros([BT, BK], dtype=ACC)
    if HAS_STATE:
        b_min = tl.load(m_in + o_s).to(ACC)
        b_wc = _entry_weight(b_bc, b_bx, b_min, m_t) * scale         # [BT] entry-state weight
        b_nin = tl.load(n_in + o_s * DK + o_k, mask=m_k, other=0.).to(ACC)
        b_dq += b_wc[:, None] * (b_dqc + b_dnr[:, None] * b_nin[None, :])
    # with several tiles a chunk, the chunk's dS blocks (mlstm_bwd_pair_kernel): the tiles up
    # to this one as keys for dq, from this one on (up to the sequence's last) as rows for dk
    a = i_r - i_c * NT
    o_ss = o_i[:, None] * BT + o_i[None, :]
    if DQ:
        if NT > 1:
            for j in range(0, a + 1):
                b_dsj = tl.load(ds + _pair(i_bh, i_c, NC, S, a, j, BT, NT) + o_ss)  # [BT, BT]
                o_pj, m_tj = _rows(i_c * NT + j, S, REVERSE, BT)[1:]
                b_kj = _load_tile(p_k, o_pj, m_tj, s_t, o_k, m_k)              # [BT, BK]
                b_dq += _dot(b_dsj, b_kj, MMA, ACC, PREC, INTERP) * scale
        b_q = _load_tile(p_q, o_p, m_t, s_t, o_k, m_k)
        tl.store(_seq(dq, i_bh, NH, sd_b, sd_h) + o_d, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(rq + o_r, tl.sum(b_q.to(ACC) * b_dq, axis=1).to(rq.dtype.element_ty),
                 mask=m_t)
    if NT == 1:
        b_dk = _dot(tl.trans(b_ds), b_q, MMA, ACC, PREC, INTERP) * scale
    else:
        b_dk = tl.zeros([BT, BK], dtype=ACC)
    if HAS_STATE:
        b_gc, b_gf = _chunk_total(b_row, i_bh, i_c, S, REVERSE, BT * NT, ACC)
        b_mout = _m_out(m_in, m_last, o_s, i_c, NC, i_bh, ACC)
        b_gain = _exit_weight(b_gc, b_gf, b_bc, b_by, b_mout)        # [BT] exit-state weight
        b_dno = tl.load(dn_out + o_s * DK + o_k, mask=m_k, other=0.).to(ACC)
        b_dk += b_gain[:, None] * (b_dkc + b_dno[None, :])
    if NT > 1:
        for u in range(a, tl.minimum(NT, tl.cdiv(S, BT) - i_c * NT)):
            b_dsu = tl.load(ds + _pair(i_bh, i_c, NC, S, u, a, BT, NT) + o_ss)    # rows u
            o_pu, m_tu = _rows(i_c * NT + u, S, REVERSE, BT)[1:]
            b_qu = _load_tile(p_q, o_pu, m_tu, s_t, o_k, m_k)                  # [BT, BK]
            b_dk += _dot(tl.trans(b_dsu), b_qu, MMA, ACC, PREC, INTERP) * scale
        b_k = _load_tile(p_k, o_p, m_t, s_t, o_k, m_k)
    tl.store(_seq(dk, i_bh, NH, sd_b, sd_h) + o_d, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(rk + o_r, tl.sum(b_k.to(ACC) * b_dk, axis=1).to(rk.dtype.element_ty), mask=m_t)


@triton.jit
def mlstm_bwd_dv_kernel(
    q, k, dh, b_row, den, m_in, m_last, dc_out, ps, dv,
    S, NC, DK, DV, REVERSE, NH, s_b, s_h, s_t, sd_b, sd_h, sd_t, scale,
    BT: tl.constexpr, NT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_STATE: tl.constexpr,
    MMA: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """dv of one tile of positions and V block: grid (cdiv(DV, BV), cdiv(S, BT), B * NH), no
    atomics.
        dv = (s q k^T * W)^T dnum + gain (k dC_out)
    with one tile a chunk the tile's own rows computed here; with several, the scores of the
    chunk's rows from this tile on from mlstm_bwd_pair_kernel. Without HAS_STATE (dC_out zero:
    mlstm_bwd_dqk_kernel) no exit-state term."""
    i_v, i_r, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_c = i_r // NT
    o_i = tl.arange(0, BT)
    o_s = i_bh * NC + i_c
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_t, o_p, m_t = _rows(i_r, S, REVERSE, BT)
    m_tv = m_t[:, None] & m_v[None, :]
    p_q, p_k = _seq(q, i_bh, NH, s_b, s_h), _seq(k, i_bh, NH, s_b, s_h)
    p_dh = dh + i_bh * S * DV
    p_dc = dc_out + o_s * DK * DV
    b_qk = tl.zeros([BT, BT], dtype=ACC)
    b_kdc = tl.zeros([BT, BV], dtype=ACC)
    if (NT == 1) or HAS_STATE:
        for i_k in range(tl.cdiv(DK, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < DK
            if NT == 1:
                b_q = _load_tile(p_q, o_p, m_t, s_t, o_k, m_k)              # [BT, BK]
            b_k = _load_tile(p_k, o_p, m_t, s_t, o_k, m_k)
            if NT == 1:
                b_qk += _dot(b_q, tl.trans(b_k), MMA, ACC, PREC, INTERP)        # [BT, BT]
            if HAS_STATE:
                b_dco = tl.load(p_dc + o_k[:, None] * DV + o_v[None, :],
                                mask=m_k[:, None] & m_v[None, :], other=0.)          # [BK, BV]
                b_kdc += _dot(b_k, b_dco, MMA, ACC, PREC, INTERP)
    b_bc, b_bx, b_by = _cumsum_rows(b_row, i_bh, o_p, m_t, S, ACC)
    b_den = tl.load(den + i_bh * S + o_p, mask=m_t, other=1.).to(ACC)
    if NT == 1:
        causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
        # scores over the row normalizer, so that dh enters the MMA as loaded (dnum = dh / den)
        b_s = b_qk * scale * _weights(b_bc, b_bx, b_bc, b_by, causal) / b_den[:, None]  # [BT, BT]
        b_dh = tl.load(p_dh + o_p[:, None] * DV + o_v[None, :], mask=m_tv, other=0.)
        b_dv = _dot(tl.trans(b_s), b_dh, MMA, ACC, PREC, INTERP)
    else:
        b_dv = tl.zeros([BT, BV], dtype=ACC)
    if HAS_STATE:
        b_gc, b_gf = _chunk_total(b_row, i_bh, i_c, S, REVERSE, BT * NT, ACC)
        b_mout = _m_out(m_in, m_last, o_s, i_c, NC, i_bh, ACC)
        b_dv += _exit_weight(b_gc, b_gf, b_bc, b_by, b_mout)[:, None] * b_kdc  # exit weight
    if NT > 1:
        # the chunk's rows from this tile on, their scores over the normalizer from
        # mlstm_bwd_pair_kernel
        a = i_r - i_c * NT
        o_ss = o_i[:, None] * BT + o_i[None, :]
        for u in range(a, tl.minimum(NT, tl.cdiv(S, BT) - i_c * NT)):
            b_ps = tl.load(ps + _pair(i_bh, i_c, NC, S, u, a, BT, NT) + o_ss)     # [BT, BT]
            o_pu, m_tu = _rows(i_c * NT + u, S, REVERSE, BT)[1:]
            b_dhu = tl.load(p_dh + o_pu[:, None] * DV + o_v[None, :],
                            mask=m_tu[:, None] & m_v[None, :], other=0.)           # [BT, BV]
            b_dv += _dot(tl.trans(b_ps), b_dhu, MMA, ACC, PREC, INTERP)
    tl.store(_seq(dv, i_bh, NH, sd_b, sd_h) + o_p[:, None] * sd_t + o_v[None, :],
             b_dv.to(dv.dtype.element_ty),
             mask=m_tv)
