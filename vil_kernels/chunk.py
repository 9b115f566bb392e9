"""The PyTorch chunkwise path: forward and exact backward without any S x S tensor.

Runs anywhere PyTorch runs (CPU, or CUDA without Triton). The sequence is cut into chunks of L
positions; everything inside a chunk is batched matmuls over all chunks at once, and the (C, n, m)
state entering every chunk is one more small matmul: the scan over chunks is linear in the chunk
states once the stabilizers are known, and those come from an (NC + 1) x (NC + 1) table of
log-weights per head. Memory is O(S * (L + D) + S / L * DK * DV).

Layout. The big tensors (q, k, v, h and their gradients) are only ever read and written in memory
order, as (BH, NC, L, D) views of the caller's storage where the strides allow (no padding, no
flips, no batch-order copies when L divides S). The recurrence's own order ("walk order": back to
front with reverse) only matters for the O(S) gate quantities, which are flipped as needed; inside
a chunk reverse just keeps the other triangle.

The backward follows ../shared/spec/mlstm.md, "Exact gradients": every stabilizer m is held
constant, the normalizer is treated as one more value column, gate gradients come from the
identities  i_j -> k_j . dk_j  and  F_t -> q_t . dq_t - k_t . dk_t,  and the eps term (the only
way h depends on m) is routed back to the argmax recorded for every row in the forward.
"""

import functools
import math

import torch
import torch.nn.functional as F

from .utils import (NEG, SECOND_ORDER, compute_dtype, cumsum_parts, default_chunk_size,
                    first_order_only, forget_grad, log_forget, normalizer_backward,
                    route_last_state, route_to_argmax)

# exp() arguments are floored where exp is still a normal number: on CPUs exp of an underflowing
# argument runs many times slower. A floored weight is at most 1e-26 of the row's largest, and its
# products with ordinary values stay normal numbers too (no denormal slow paths downstream).
_EXP_FLOOR = {torch.float32: -60.0, torch.float64: -700.0}


def _exp(x):
    """exp of log-weights that should be <= 0, in place."""
    return x.clamp_(_EXP_FLOOR[x.dtype], 0.0).exp_()


def _mm(a, b, alpha=1.0):
    """a @ b over one batch dim, scaled inside the GEMM."""
    if alpha == 1.0:
        return torch.bmm(a, b)
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    return torch.baddbmm(out, a, b, beta=0.0, alpha=alpha)


class _Layout:
    """Where the caller's (B, NH, S, .) tensors live and how to view them as (BH, Sp, .): which
    batch dim is outer in memory, how many padding positions (at the end of the walk: at the front
    of memory with reverse) and the walk order."""

    def __init__(self, q, L, reverse):
        B, NH, S = q.shape[:3]
        # Merge (B, NH) in the order q is stored in: a (NH, B, S, D) view then reshapes for free.
        self.swap = NH > 1 and B > 1 and q.stride(0) < q.stride(1)
        self.B, self.NH, self.S, self.L, self.reverse = B, NH, S, L, reverse
        self.Sp = S + (-S % L)
        self.NC = self.Sp // L
        self.pad = self.Sp - S

    def walk(self, x, dim=-1):
        """Memory order <-> walk order of a small tensor (its own inverse)."""
        return x.flip(dim) if self.reverse else x

    def to_flat(self, x, dtype, value=0.0):
        """(B, NH, S, ...) -> (BH, Sp, ...) in dtype, padded with value; a view when possible."""
        if self.swap:
            x = x.transpose(0, 1)
        x = x.reshape(self.B * self.NH, self.S, *x.shape[3:])
        if not self.pad:
            if x.shape[0] > 1 and x.stride(0) != self.S * x.stride(1):
                x = x.contiguous()                     # (BH, S) must split into (BH * NC, L)
            return x.to(dtype)
        out = x.new_empty(x.shape[0], self.Sp, *x.shape[2:], dtype=dtype)
        real = slice(self.pad, None) if self.reverse else slice(None, self.S)
        pad = slice(None, self.pad) if self.reverse else slice(self.S, None)
        out[:, real].copy_(x)
        out[:, pad].fill_(value)
        return out

    def from_flat(self, x, dtype):
        """(BH, Sp, ...) -> (B, NH, S, ...) view (a copy only to change dtype)."""
        x = x[:, self.pad:] if self.reverse else x[:, :self.S]
        outer, inner = (self.NH, self.B) if self.swap else (self.B, self.NH)
        x = x.view(outer, inner, *x.shape[1:])
        return (x.transpose(0, 1) if self.swap else x).to(dtype)

    def states_to_flat(self, x, dtype):
        if x is None:
            return None
        if self.swap:
            x = x.transpose(0, 1)
        return x.reshape(self.B * self.NH, *x.shape[2:]).to(dtype)

    def states_from_flat(self, x, dtype):
        outer, inner = (self.NH, self.B) if self.swap else (self.B, self.NH)
        x = x.view(outer, inner, *x.shape[1:])
        return (x.transpose(0, 1) if self.swap else x).to(dtype)


def _walk_gates(lay, i, fl):
    """In walk order, per chunk: the cumulative log-forget b as its coarse and fine parts c, f
    (utils.cumsum_parts; every log-weight below is formed as (c_t - c_j) + (small terms), so
    that resets, which make |b| ~ 1000, cost no precision), y = i - f for the keys, the total g
    and the log-weight a of each key at its chunk's end."""
    BH = i.shape[0]
    iw = lay.walk(i).view(BH, lay.NC, lay.L)
    c, f = cumsum_parts(lay.walk(fl).view(BH, lay.NC, lay.L))          # [BH, NC, L]
    y = iw - f
    a = (c[..., -1:] - c) + (f[..., -1:] + y)
    return c, f, y, c[..., -1] + f[..., -1], a


def _strictly_after(R, device):
    """[k, e] = e > k for R sources: built once per size in eager mode, traced under compile."""
    if torch.compiler.is_compiling():
        return torch.ones(R, R, dtype=torch.bool, device=device).triu(1)
    return _strictly_after_cached(R, device)


@functools.lru_cache(maxsize=16)
def _strictly_after_cached(R, device):
    with torch.inference_mode(False):                  # the cache serves training calls too
        return torch.ones(R, R, dtype=torch.bool, device=device).triu(1)


def _chunk_table(g, m_loc, m0):
    """The inter-chunk recurrence in closed form, walk order. Sources k: 0 the initial state,
    1 + c the keys of chunk c (weighted relative to the chunk's end by m_loc); rows c: the state
    entering chunk c, row NC the last state. Returns W [BH, NC+1, NC+1] with the stabilized weight
    of every source in every row, m_in [BH, NC+1] and the winning source of every row.

    The log-weight of source k in row c is the sum of the chunk totals g strictly between them
    plus the source's own m; each such sum is taken over its own segment (a masked cumsum), never
    as a difference of long prefix sums, so float32 keeps its precision on long sequences."""
    BH, NC = g.shape
    between = _strictly_after(NC + 1, g.device)                        # [k, e]: e > k
    g_ext = F.pad(g, (1, 0))                                            # [BH, R]: g of source e
    seg = torch.where(between, g_ext[:, None, :], 0.0).cumsum(-1)       # [BH, k, c]
    m_src = torch.cat([m0 if m0 is not None else g.new_full((BH, 1), NEG), m_loc], dim=-1)
    log_w = seg.transpose(1, 2) + m_src[:, None, :]                     # [BH, c, k]
    seen = ~between                                                     # [c, k]: k <= c
    log_w = log_w.masked_fill_(~seen, NEG)
    m_in, src = log_w.max(-1)                                           # oldest source on ties
    W = _exp(log_w.sub_(m_in[..., None])).mul_(seen)
    return W, m_in, src


# Chunks per closed-form table. A table's GEMM costs O(T) per chunk, so longer sequences chain
# tables of T chunks (the state leaving one is source 0 of the next) and stay linear in S.
_TABLE_CHUNKS = 32


def _tables(g, m_loc, m0):
    """[(lo, hi, W, m_in, src)] for blocks of at most _TABLE_CHUNKS chunks in walk order; each
    block's source 0 is the state leaving the block before (the initial state for the first)."""
    NC = g.shape[1]
    out, m_prev = [], m0
    for lo in range(0, NC, _TABLE_CHUNKS):
        hi = min(lo + _TABLE_CHUNKS, NC)
        W, m_in, src = _chunk_table(g[:, lo:hi], m_loc[:, lo:hi], m_prev)
        out.append((lo, hi, W, m_in, src))
        m_prev = m_in[:, -1:]
    return out


def _table_m_in(tables):
    """m of the state entering every chunk and of the last state, walk order [BH, NC + 1]."""
    return torch.cat([t[3][:, :-1] for t in tables] + [tables[-1][3][:, -1:]], dim=-1)


def _table_positions(tables, j_loc, L):
    """Walk-order position of the key that set every row's stabilizer (-1: the initial state),
    [BH, NC + 1]."""
    arg_prev = torch.full_like(j_loc[:, 0], -1)
    rows = []
    for lo, hi, W, m_in, src in tables:
        chunk = (src - 1).clamp(min=0) + lo
        pos = torch.where(src > 0, j_loc.gather(-1, chunk) + chunk * L, arg_prev[:, None])
        rows.append(pos[:, :-1])
        arg_prev = pos[:, -1]
    return torch.cat(rows + [arg_prev[:, None]], dim=-1)


def _block_slice(lay, lo, hi):
    """Memory-order chunks of walk-order chunks lo..hi."""
    NC = lay.NC
    return slice(NC - hi, NC - lo) if lay.reverse else slice(lo, hi)


def _entry_states(lay, tables, c_loc, n_loc, c0, n0, need_last):
    """The state entering every chunk, memory order ([BH, NC, DK * DV], [BH, NC, DK]), and the
    state leaving the last one (None unless need_last). c_loc, n_loc: each chunk's own keys."""
    single = len(tables) == 1
    c_in = n_in = None
    if not single:
        c_in, n_in = torch.empty_like(c_loc), torch.empty_like(n_loc)
    c_prev, n_prev = c0, n0                                            # [BH, DK * DV], [BH, DK]
    for blk, (lo, hi, W, _, _) in enumerate(tables):
        mem = _block_slice(lay, lo, hi)
        W_mem = lay.walk(lay.walk(W[:, :-1, 1:], 1), 2)                # [BH, n, n] memory order
        c_blk, n_blk = W_mem @ c_loc[:, mem], W_mem @ n_loc[:, mem]
        leaving = blk + 1 < len(tables) or need_last
        if leaving:
            w_out = lay.walk(W[:, -1, 1:])[:, None, :]                 # [BH, 1, n]
            c_next, n_next = (w_out @ c_loc[:, mem])[:, 0], (w_out @ n_loc[:, mem])[:, 0]
        if c_prev is not None:
            w0 = lay.walk(W[:, :-1, 0])[..., None]                     # [BH, n, 1]
            c_blk += w0 * c_prev[:, None]
            n_blk += w0 * n_prev[:, None]
            if leaving:
                c_next += W[:, -1, 0, None] * c_prev
                n_next += W[:, -1, 0, None] * n_prev
        if single:
            c_in, n_in = c_blk, n_blk
        else:
            c_in[:, mem], n_in[:, mem] = c_blk, n_blk
        c_prev, n_prev = (c_next, n_next) if leaving else (None, None)
    return c_in, n_in, c_prev, n_prev


def _entry_states_backward(lay, tables, dc_in, dn_in, dc_last, dn_last):
    """Transpose of _entry_states: gradients of every chunk's own state (memory order) and of
    the initial state, from those of the entry states and (or None) of the last state."""
    single = len(tables) == 1
    dc_loc = dn_loc = None
    if not single:
        dc_loc, dn_loc = torch.empty_like(dc_in), torch.empty_like(dn_in)
    dc_next, dn_next = dc_last, dn_last
    for lo, hi, W, _, _ in reversed(tables):
        mem = _block_slice(lay, lo, hi)
        W_mem_t = lay.walk(lay.walk(W[:, :-1, 1:], 1), 2).transpose(1, 2)
        dc_blk, dn_blk = W_mem_t @ dc_in[:, mem], W_mem_t @ dn_in[:, mem]
        w0 = lay.walk(W[:, :-1, 0])[:, None, :]                        # [BH, 1, n]
        dc_prev, dn_prev = (w0 @ dc_in[:, mem])[:, 0], (w0 @ dn_in[:, mem])[:, 0]
        if dc_next is not None:
            w_out = lay.walk(W[:, -1, 1:])[..., None]                  # [BH, n, 1]
            dc_blk += w_out * dc_next[:, None]
            dn_blk += w_out * dn_next[:, None]
            dc_prev += W[:, -1, 0, None] * dc_next
            dn_prev += W[:, -1, 0, None] * dn_next
        if single:
            dc_loc, dn_loc = dc_blk, dn_blk
        else:
            dc_loc[:, mem], dn_loc[:, mem] = dc_blk, dn_blk
        dc_next, dn_next = dc_prev, dn_prev
    return dc_loc, dn_loc, dc_next, dn_next


def _intra_weights(lay, c, x, y):
    """exp(log D - m_row) inside every chunk, memory order [BH * NC, L, L], from walk-order
    [BH, NC, L] parts: (c_t - c_j) + x_t + y_j with the cumsum's coarse part c, x = f - m_row
    (rows) and y = i - f (keys) (_walk_gates); keys later in the walk are exactly 0."""
    BH, L = c.shape[0], lay.L
    c, x, y = (lay.walk(t.reshape(BH, -1)).reshape(-1, L) for t in (c, x, y))
    E = (c[:, :, None] - c[:, None, :]).add_(x[:, :, None]).add_(y[:, None, :])
    E = _exp(E)
    return E.triu_() if lay.reverse else E.tril_()


def _no_autocast(fn):
    """The chunkwise math runs in its compute dtype: autocast would turn its GEMMs into bf16."""
    @functools.wraps(fn)
    def wrapped(lay, q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(lay, q, *args, **kwargs)
    return wrapped


@_no_autocast
def _forward(lay, q, k, v, i, fl, c0, n0, m0, eps, need_last, track):
    """Flat inputs (BH, Sp, .) in the compute dtype. Returns h (BH, Sp, DV), the last state
    (c, n, m, argmax) when need_last, and, when track, what the backward needs."""
    BH, Sp, DK = q.shape
    DV = v.shape[-1]
    NC, L = lay.NC, lay.L
    scale = DK ** -0.5
    qc, kc, vc = (x.view(BH * NC, L, -1) for x in (q, k, v))
    c, f, y, g, a = _walk_gates(lay, i, fl)

    # Every chunk's own contribution, relative to its end, then the state entering every chunk.
    m_loc, j_loc = a.max(-1)                                           # [BH, NC]
    m_loc.clamp_(min=NEG)                  # a chunk of masked keys alone (i = -inf): no NaN
    gain = _exp(a - m_loc[..., None])                                  # [BH, NC, L] walk order
    kw = kc * lay.walk(gain.view(BH, Sp)).view(BH * NC, L, 1)
    c_loc = (kw.transpose(1, 2) @ vc).view(BH, NC, DK * DV)
    n_loc = kw.sum(1).view(BH, NC, DK)
    tables = _tables(g, m_loc, m0)
    m_in = _table_m_in(tables)                                         # [BH, NC + 1] walk order
    c_in, n_in, c_last, n_last = _entry_states(lay, tables, c_loc, n_loc,
                                               None if c0 is None else c0.reshape(BH, DK * DV),
                                               n0, need_last)

    # Row maxima from a running max over keys of i - b (no L x L pass; its argmax, then the
    # max formed from the parts), then the outputs.
    j_intra = (y - c).cummax(-1)[1]                                    # [BH, NC, L]
    m_intra = (c - c.gather(-1, j_intra)) + (f + y.gather(-1, j_intra))
    carried = c + (f + m_in[:, :NC, None])                             # [BH, NC, L]
    m_row = torch.maximum(carried, m_intra)
    x = f - m_row
    E = _intra_weights(lay, c, x, y)
    scores = _mm(qc, kc.transpose(1, 2), scale).mul_(E)                # [BH * NC, L, L]
    del E
    w_carried = _exp(c + (x + m_in[:, :NC, None])).view(BH, Sp)
    qw = qc * lay.walk(w_carried).view(BH * NC, L, 1)
    num = _mm(qw, c_in.view(BH * NC, DK, DV), scale).baddbmm_(scores, vc)  # [BH * NC, L, DV]
    n_row = scores.sum(-1).view(BH, Sp)
    n_row.add_((qw * n_in.view(BH * NC, 1, DK)).sum(-1).view(BH, Sp), alpha=scale)
    m_row_mem = lay.walk(m_row.view(BH, Sp))
    den = torch.maximum(n_row.abs(), torch.exp(-m_row_mem)).add_(eps)
    h = num.view(BH, Sp, DV).div_(den[..., None])

    last = None
    if need_last or track:
        arg_in = _table_positions(tables, j_loc, L)                    # [BH, NC + 1] walk order
    if need_last:
        last = (c_last.view(BH, DK, DV), n_last, m_in[:, NC:], arg_in[:, NC])
    if not track:
        return h, last, None
    chunk_start = torch.arange(NC, device=q.device) * L
    arg_row = torch.where(carried >= m_intra, arg_in[:, :NC, None],
                          j_intra + chunk_start[:, None])
    saved = (m_row.view(BH, Sp), n_row, arg_row.view(BH, Sp), c_in, n_in)
    return h, last, saved


@_no_autocast
def _backward(lay, q, k, v, i, fl, c0, n0, m0, eps, h, dh, saved, last, dlast):
    """Gradients of (q, k, v, i, fl, c0, n0, m0), flat (BH, Sp, .) in memory order.
    `last` and `dlast` are None when the last state was not returned."""
    BH, Sp, DK = q.shape
    DV = v.shape[-1]
    NC, L = lay.NC, lay.L
    scale = DK ** -0.5
    m_row, n_row, arg_row, c_in, n_in = saved                # m_row, arg_row: walk order
    m_row_mem = lay.walk(m_row)
    den, _, dn_row, dm_row = normalizer_backward(dh, h, n_row, m_row_mem, eps)
    dnum = dh / den[..., None]                                         # [BH, Sp, DV]

    qc, kc, vc, dnum_c = (x.view(BH * NC, L, -1) for x in (q, k, v, dnum))
    dn_c = dn_row.view(BH * NC, L, 1)
    c, f, y, g, a = _walk_gates(lay, i, fl)
    m_loc = a.amax(-1).clamp_(min=NEG)                                 # as in the forward
    tables = _tables(g, m_loc, m0)
    m_in = _table_m_in(tables)
    x = f - m_row.view(BH, NC, L)
    E = _intra_weights(lay, c, x, y)

    # Inside the chunks: gated linear attention with values [v, 1].
    dscores = torch.baddbmm(dn_c, dnum_c, vc.transpose(1, 2)).mul_(E)  # [BH * NC, L, L]
    dq = _mm(dscores, kc, scale)
    dk = _mm(dscores.transpose(1, 2), qc, scale)
    del dscores
    scores = _mm(qc, kc.transpose(1, 2), scale).mul_(E)
    dv = scores.transpose(1, 2) @ dnum_c
    del scores, E

    # Through the state entering each chunk.
    w_carried = lay.walk(_exp(c + (x + m_in[:, :NC, None])).view(BH, Sp)).view(BH * NC, L, 1)
    dnum_w = dnum_c * w_carried
    dn_w = dn_c * w_carried
    c_in_c = c_in.view(BH * NC, DK, DV)
    dq.baddbmm_(dnum_w, c_in_c.transpose(1, 2), alpha=scale)
    dq.baddbmm_(dn_w, n_in.view(BH * NC, 1, DK), alpha=scale)
    dc_direct = _mm(qc.transpose(1, 2), dnum_w, scale).view(BH, NC, DK * DV)
    dn_direct = _mm(qc.transpose(1, 2), dn_w, scale).view(BH, NC, DK)

    # Back through the closed-form scan: each chunk's own state, and the initial state.
    dc_last, dn_last = (None, None) if last is None else (dlast[0].reshape(BH, DK * DV), dlast[1])
    dc_loc, dn_loc, dc0, dn0 = _entry_states_backward(lay, tables, dc_direct, dn_direct,
                                                      dc_last, dn_last)
    dc0 = dc0.view(BH, DK, DV)
    gain = lay.walk(_exp(a - m_loc[..., None]).view(BH, Sp)).view(BH * NC, L, 1)
    dk.baddbmm_(vc * gain, dc_loc.view(BH * NC, DK, DV).transpose(1, 2))
    dk.baddbmm_(gain, dn_loc.view(BH * NC, 1, DK))
    dv.baddbmm_(kc * gain, dc_loc.view(BH * NC, DK, DV))

    dq, dk, dv = (x.view(BH, Sp, -1) for x in (dq, dk, dv))
    di = lay.walk((k * dk).sum(-1))                                    # walk order from here
    dF = lay.walk((q * dq).sum(-1) + dm_row) - di
    has_init = c0 is not None
    dm0 = (dc0 * c0).sum((-2, -1)) + (dn0 * n0).sum(-1) if has_init else None   # [BH]
    route_to_argmax(lay.walk(dm_row), arg_row, di, dF, dm0)
    if last is not None:
        c_last, n_last, _, arg_last = last
        route_last_state(di, dF, dm0, -1, arg_last, c_last, n_last, *dlast)
    dfl = dF.flip(-1).cumsum(-1).flip(-1)
    states = (dc0, dn0, dm0[..., None]) if has_init else None
    return dq, dk, dv, lay.walk(di), lay.walk(dfl), states


def _flat_inputs(q, k, v, i, f, c0, n0, m0, L, reverse):
    """The layout, compute dtype and flat inputs of both entry points: q, k, v, i, f (padding
    keeps the state: input gate NEG, forget gate +inf) and the initial states (None if absent)."""
    ct = compute_dtype(q)
    lay = _Layout(q, L, reverse)
    flat = lambda x, value=0.0: lay.to_flat(x, ct, value)
    states = tuple(lay.states_to_flat(x, ct) for x in (c0, n0, m0))
    return lay, ct, (flat(q), flat(k), flat(v), flat(i, NEG), flat(f, math.inf)), states


def _outputs(lay, h, last, dtype):
    """h in the caller's layout and dtype, and the last state's (c, n, m) when there is one."""
    h = lay.from_flat(h, dtype)
    if last is None:
        return h, None
    return h, tuple(lay.states_from_flat(x, x.dtype) for x in last[:3])


class MLSTMChunkwise(torch.autograd.Function):
    """Chunkwise mLSTM on (B, NH, S, D) tensors, gates (B, NH, S). Returns h, and the last state
    c, n, m when need_last."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, eps, L, need_last, reverse, recompute=False):
        lay, ct, (qf, kf, vf, i_f, f_f), states = _flat_inputs(q, k, v, i, f, c0, n0, m0, L,
                                                               reverse)
        h, last, saved = _forward(lay, qf, kf, vf, i_f, log_forget(f_f), *states, eps,
                                  need_last, track=True)
        if recompute:                      # the chunk states (saved[3:]) come back in backward
            saved = (*saved[:3], None, None)
        ctx.save_for_backward(qf, kf, vf, i_f, f_f, *states, h, *(last or (None,) * 4), *saved)
        ctx.meta = (lay, eps, ct, [x.dtype for x in (q, k, v, i, f, c0, n0, m0) if x is not None])
        ctx.anchors = (q, k, v, i, f, c0, n0, m0)         # (first_order_only; saved: views)
        out, last_state = _outputs(lay, h, last, q.dtype)
        if torch.compiler.is_compiling():
            # Fresh outputs, not views of h and of the states: on torch 2.11 dynamo traced this
            # backward with None for the gradient of a view output (zeros here), and every
            # input's gradient came out zero (2.13 traces the gradient)
            out = out.clone()
            last_state = None if last_state is None else tuple(x.clone() for x in last_state)
        return out if last_state is None else (out, *last_state)

    @staticmethod
    @first_order_only(SECOND_ORDER.format("PyTorch chunkwise"))
    def backward(ctx, dh, *dlast):
        lay, eps, ct, dtypes = ctx.meta
        qf, kf, vf, i_f, f_f, c0, n0, m0, h, *rest = ctx.saved_tensors
        last, saved = rest[:4], tuple(rest[4:])
        last = None if last[0] is None else tuple(last)
        if saved[3] is None:                                     # recompute_states
            _, _, again = _forward(lay, qf, kf, vf, i_f, log_forget(f_f), c0, n0, m0, eps,
                                   False, track=True)
            saved = (*saved[:3], *again[3:])
        dhf = lay.to_flat(dh, ct) if dh is not None else torch.zeros_like(h)
        if last is not None:
            dlast = tuple(torch.zeros_like(x) if d is None else lay.states_to_flat(d, ct)
                          for d, x in zip(dlast, last[:3]))
        dq, dk, dv, di, dfl, dstates = _backward(lay, qf, kf, vf, i_f, log_forget(f_f), c0, n0,
                                                 m0, eps, h, dhf, saved, last,
                                                 dlast if last else None)
        df = forget_grad(dfl, f_f)
        grads = [lay.from_flat(gr, dt) for gr, dt in zip((dq, dk, dv, di, df), dtypes)]
        if dstates is not None:
            grads += [lay.states_from_flat(gr, dt) for gr, dt in zip(dstates, dtypes[5:])]
        else:
            grads += [None] * 3
        return (*grads, None, None, None, None, None)


def mlstm_chunkwise_torch(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, eps=1e-6,
                          chunk_size=None, reverse=False, return_last_states=False,
                          recompute_states=False):
    """Validated inputs, gates (B, NH, S). Returns (h, (c, n, m) or None). Without autograd the
    forward runs directly and keeps nothing for a backward."""
    S = q.shape[2]
    L = chunk_size or default_chunk_size(S, q.shape[-1], v.shape[-1], q.device)
    tensors = (q, k, v, i, f, c_initial, n_initial, m_initial)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = MLSTMChunkwise.apply(*tensors, eps, L, return_last_states, reverse,
                                   recompute_states)
        if return_last_states:
            return out[0], tuple(out[1:])
        return out, None
    lay, _, (qf, kf, vf, i_f, f_f), states = _flat_inputs(*tensors, L, reverse)
    h, last, _ = _forward(lay, qf, kf, vf, i_f, log_forget(f_f), *states, eps,
                          return_last_states, track=False)
    return _outputs(lay, h, last, q.dtype)
