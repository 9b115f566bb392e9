"""The PyTorch chunkwise path: forward and exact backward without any S x S tensor.

Runs anywhere PyTorch runs (CPU, or CUDA without Triton). The sequence is cut into chunks of L
positions; the (C, n, m) state is carried between chunks by a short scan and everything inside a
chunk is batched matmuls over all chunks at once. Memory is O(S * (L + D) + S / L * DK * DV).

The backward follows ../shared/spec/mlstm.md, "Exact gradients": every stabilizer m is held
constant, the normalizer is treated as one more value column, gate gradients come from the
identities  i_j -> k_j . dk_j  and  F_t -> q_t . dq_t - k_t . dk_t,  and the eps term (the only
way h depends on m) is routed back to the argmax recorded for every row in the forward.
"""

import functools
import math

import torch
import torch.nn.functional as F

from .utils import (NEG, compute_dtype, default_chunk_size, normalizer_backward, pad_seq,
                    reverse_seq, route_last_state, route_to_argmax)

_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _chunk_gates(fl, i, NC, L):
    """Per-chunk cumulative log-forget b, its total g and the log-weight a of each key in its chunk."""
    B, NH = fl.shape[:2]
    b = fl.view(B, NH, NC, L).cumsum(-1)                               # [B, NH, NC, L]
    g = b[..., -1]                                                     # [B, NH, NC]
    a = g[..., None] - b + i.view(B, NH, NC, L)                        # [B, NH, NC, L]
    return b, g, a


@functools.lru_cache(maxsize=16)
def _future_mask(L, device):
    """True above the diagonal of an L x L chunk: the keys a row must not see. Built outside
    inference mode: the cache serves training calls too."""
    with torch.inference_mode(False):
        return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def _intra_logits(b, i_c):
    """log D inside each chunk, NEG above the diagonal."""
    log_d = b[..., :, None] - b[..., None, :] + i_c[..., None, :]      # [B, NH, NC, L, L]
    return log_d.masked_fill_(_future_mask(b.shape[-1], b.device), NEG)


def _exp(x, future=None):
    """exp of log-weights that are <= 0, in place on x. Arguments are floored where exp is still a
    normal number: on CPUs exp of an underflowing argument (every masked lane) runs many times
    slower, and a floored weight is at most 1e-35 of the row's largest, which is exactly 1.
    Lanes in `future` are set to exactly 0."""
    x = x.clamp_(min=_EXP_FLOOR[x.dtype]).exp_()
    return x if future is None else x.masked_fill_(future, 0.0)


def _forward(q, k, v, i, fl, c0, n0, m0, eps, L, need_last):
    """All inputs padded to NC * L positions and in the compute dtype. Returns h, the last state
    (c, n, m, argmax) when need_last, and what the backward needs: per-row m, signed normalizer
    and argmax, and the entry state of every chunk."""
    B, NH, Sp, DK = q.shape
    DV = v.shape[-1]
    NC = Sp // L
    scale = DK ** -0.5
    has_init = c0 is not None
    qc, kc, vc = (x.view(B, NH, NC, L, -1) for x in (q, k, v))
    b, g, a = _chunk_gates(fl, i, NC, L)
    chunk_start = torch.arange(NC, device=q.device) * L                # [NC]

    # Inter-chunk scan. Chunk c's keys are needed in a state only if a later chunk or the
    # returned last state reads it.
    c_in = q.new_zeros(B, NH, NC, DK, DV)
    n_in = q.new_zeros(B, NH, NC, DK)
    m_in = q.new_full((B, NH, NC), NEG)
    arg_in = torch.full((B, NH, NC), -1, dtype=torch.long, device=q.device)  # -1: initial state
    if has_init:
        c_in[:, :, 0], n_in[:, :, 0], m_in[:, :, 0] = c0, n0, m0[..., 0]
    NS = NC if need_last else NC - 1
    last = None
    if NS > 0:
        m_loc, j_loc = a[:, :, :NS].max(-1)                            # [B, NH, NS]
        j_loc += chunk_start[:NS]
        kw = kc[:, :, :NS] * _exp(a[:, :, :NS] - m_loc[..., None])[..., None]
        c_loc = kw.transpose(-1, -2) @ vc[:, :, :NS]                   # [B, NH, NS, DK, DV]
        n_loc = kw.sum(-2)                                             # [B, NH, NS, DK]
        c_s, n_s, m_s, arg_s = c_in[:, :, 0], n_in[:, :, 0], m_in[:, :, 0], arg_in[:, :, 0]
        for c in range(NS):
            carried = g[..., c] + m_s
            m_new = torch.maximum(carried, m_loc[..., c])
            arg_s = torch.where(carried >= m_loc[..., c], arg_s, j_loc[..., c])
            decay, gain = torch.exp(carried - m_new), torch.exp(m_loc[..., c] - m_new)
            c_s = torch.addcmul(gain[..., None, None] * c_loc[:, :, c], decay[..., None, None], c_s)
            n_s = torch.addcmul(gain[..., None] * n_loc[:, :, c], decay[..., None], n_s)
            m_s = m_new
            if c + 1 < NC:
                c_in[:, :, c + 1], n_in[:, :, c + 1] = c_s, n_s
                m_in[:, :, c + 1], arg_in[:, :, c + 1] = m_s, arg_s
        if need_last:
            last = (c_s, n_s, m_s[..., None], arg_s)

    # Outputs inside the chunks, the row max taken over the carried state and the chunk's keys.
    log_d = _intra_logits(b, i.view(B, NH, NC, L))
    m_intra, j_intra = log_d.max(-1)                                   # [B, NH, NC, L]
    carried = b + m_in[..., None]                                      # [B, NH, NC, L]
    m_row = torch.maximum(carried, m_intra)
    arg_row = torch.where(carried >= m_intra, arg_in[..., None], j_intra + chunk_start[:, None])
    qs = qc * scale
    future = _future_mask(L, q.device)
    scores = (qs @ kc.transpose(-1, -2)).mul_(_exp(log_d.sub_(m_row[..., None]), future))
    num = scores @ vc                                                  # [B, NH, NC, L, DV]
    n_row = scores.sum(-1)                                             # [B, NH, NC, L]
    first = 0 if has_init else 1                                       # chunk 0 starts empty
    if first < NC:
        w_carried = _exp(carried[:, :, first:] - m_row[:, :, first:])
        qs_i = qs[:, :, first:]
        num[:, :, first:] += w_carried[..., None] * (qs_i @ c_in[:, :, first:])
        n_row[:, :, first:] += w_carried * (qs_i * n_in[:, :, first:, None, :]).sum(-1)
    den = torch.maximum(n_row.abs(), torch.exp(-m_row)) + eps
    h = num / den[..., None]
    rows = lambda x: x.reshape(B, NH, Sp)
    saved = (rows(m_row), rows(n_row), rows(arg_row), c_in, n_in, m_in)
    return h.view(B, NH, Sp, DV), last, saved


def _backward(q, k, v, i, fl, c0, n0, m0, eps, L, h, dh, saved, last, dlast):
    """Gradients of (q, k, v, i, fl, c0, n0, m0) with every input padded to NC * L positions.
    `last` and `dlast` are None when the last state was not returned."""
    B, NH, Sp, DK = q.shape
    NC = Sp // L
    scale = DK ** -0.5
    has_init = c0 is not None
    m_row, n_row, arg_row, c_in, n_in, m_in = saved

    den, _, dn_row, dm_row = normalizer_backward(dh, h, n_row, m_row, eps)
    dnum = dh / den[..., None]                                          # [B, NH, Sp, DV]

    qc, kc, vc, dnum_c = (x.view(B, NH, NC, L, -1) for x in (q, k, v, dnum))
    dn_c = dn_row.view(B, NH, NC, L)
    b, g, a = _chunk_gates(fl, i, NC, L)
    log_d = _intra_logits(b, i.view(B, NH, NC, L))
    m_c = m_row.view(B, NH, NC, L)
    weights = _exp(log_d.sub_(m_c[..., None]), _future_mask(L, q.device))  # [B, NH, NC, L, L]
    del log_d
    qs = qc * scale

    # Inside the chunks: gated linear attention with values [v, 1].
    dscores = (dnum_c @ vc.transpose(-1, -2)).add_(dn_c[..., None]).mul_(weights)
    dq = (dscores @ kc).mul_(scale)
    dk = (dscores.transpose(-1, -2) @ qc).mul_(scale)
    del dscores
    scores = (qs @ kc.transpose(-1, -2)).mul_(weights)
    dv = scores.transpose(-1, -2) @ dnum_c
    del scores, weights

    # Through the entry state of each chunk (chunk 0's is empty without an initial state).
    first = 0 if has_init else 1
    dc_direct = q.new_zeros(B, NH, NC, *c_in.shape[-2:])               # [B, NH, NC, DK, DV]
    dn_direct = q.new_zeros(B, NH, NC, DK)
    if first < NC:
        sl = slice(first, None)
        w_carried = _exp(b[:, :, sl] + m_in[:, :, sl, None] - m_c[:, :, sl])
        dq[:, :, sl] += scale * w_carried[..., None] * (
            dnum_c[:, :, sl] @ c_in[:, :, sl].transpose(-1, -2)
            + dn_c[:, :, sl, :, None] * n_in[:, :, sl, None, :])
        dc_direct[:, :, sl] = qs[:, :, sl].transpose(-1, -2) @ (w_carried[..., None] * dnum_c[:, :, sl])
        dn_direct[:, :, sl] = (qs[:, :, sl] * (w_carried * dn_c[:, :, sl])[..., None]).sum(-2)

    # Reverse scan: the gradient of the state leaving chunk c, then of the state entering it.
    if last is None:
        m_last = torch.maximum(g[..., -1] + m_in[..., -1], a[:, :, -1].amax(-1))[..., None]
        dc_s, dn_s = torch.zeros_like(c_in[:, :, 0]), torch.zeros_like(n_in[:, :, 0])
    else:
        m_last = last[2]
        dc_s, dn_s = dlast[0], dlast[1]
    m_out = torch.cat([m_in[..., 1:], m_last], dim=-1)                 # [B, NH, NC]
    decay = _exp(g + m_in - m_out)
    dc_out = torch.empty_like(c_in)
    dn_out = torch.empty_like(n_in)
    for c in reversed(range(NC)):
        dc_out[:, :, c], dn_out[:, :, c] = dc_s, dn_s
        dc_s = torch.addcmul(dc_direct[:, :, c], decay[..., c, None, None], dc_s)
        dn_s = torch.addcmul(dn_direct[:, :, c], decay[..., c, None], dn_s)
    gain = _exp(a - m_out[..., None])[..., None]                       # [B, NH, NC, L, 1]
    dk += gain * (vc @ dc_out.transpose(-1, -2) + dn_out[..., None, :])
    dv += gain * (kc @ dc_out)

    dq, dk, dv = (x.reshape(B, NH, Sp, -1) for x in (dq, dk, dv))
    di = (k * dk).sum(-1)                                              # [B, NH, Sp]
    dF = (q * dq).sum(-1) - di + dm_row
    dm0 = (dc_s * c0).sum((-2, -1)) + (dn_s * n0).sum(-1) if has_init else None   # [B, NH]
    route_to_argmax(dm_row, arg_row, di, dF, dm0)
    if last is not None:
        c_last, n_last, _, arg_last = last
        route_last_state(di, dF, dm0, -1, arg_last, c_last, n_last, *dlast)
    dfl = dF.flip(-1).cumsum(-1).flip(-1)
    return dq, dk, dv, di, dfl, (dc_s, dn_s, None if dm0 is None else dm0[..., None])


class MLSTMChunkwise(torch.autograd.Function):
    """Chunkwise mLSTM, gates (B, NH, S). With reverse the inputs are read back to front into the
    padded buffers the computation needs anyway (no separate flips). Returns h, and the last
    state c, n, m when need_last."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, eps, L, need_last, reverse):
        S = q.shape[2]
        ct = compute_dtype(q)
        has_init = c0 is not None
        seq = lambda x, value=0.0: pad_seq(x, L, value, dtype=ct, reverse=reverse)
        qp, kp, vp = seq(q), seq(k), seq(v)
        ip = seq(i, NEG)
        flp = F.logsigmoid(seq(f, math.inf))                           # padding keeps the state
        states = tuple(x.to(ct) for x in (c0, n0, m0)) if has_init else (None,) * 3
        h, last, saved = _forward(qp, kp, vp, ip, flp, *states, eps, L, need_last)
        h = h[:, :, :S]
        out = (reverse_seq(h) if reverse else h).to(q.dtype)
        ctx.save_for_backward(q, k, v, i, f, *states, h, *(last or (None,) * 4), *saved)
        ctx.meta = (eps, L, ct, reverse)
        if not need_last:
            return out
        ctx.mark_non_differentiable(last[3])
        return out, *last[:3]

    @staticmethod
    def backward(ctx, dh, *dlast):
        eps, L, ct, reverse = ctx.meta
        q, k, v, i, f, c0, n0, m0, h, *rest = ctx.saved_tensors
        last, saved = rest[:4], tuple(rest[4:])
        last = None if last[0] is None else tuple(last)
        S = q.shape[2]
        seq = lambda x, value=0.0: pad_seq(x, L, value, dtype=ct, reverse=reverse)
        qp, kp, vp = seq(q), seq(k), seq(v)
        ip = seq(i, NEG)
        fp = seq(f, math.inf)
        flp = F.logsigmoid(fp)
        hp = pad_seq(h, L)
        dhp = seq(dh) if dh is not None else torch.zeros_like(hp)
        if last is not None:
            dlast = tuple(torch.zeros_like(x) if d is None else d.to(ct)
                          for d, x in zip(dlast, last[:3]))
        dq, dk, dv, di, dfl, dstates = _backward(qp, kp, vp, ip, flp, c0, n0, m0, eps, L, hp, dhp,
                                                 saved, last, dlast if last else None)
        df = dfl[..., :S] * torch.sigmoid(-fp[..., :S])
        back = lambda g, like: (reverse_seq(g[:, :, :S]) if reverse else g[:, :, :S]).to(like.dtype)
        grads = [back(dq, q), back(dk, k), back(dv, v), back(di, i), back(df, f)]
        if c0 is not None:
            grads += [g.to(x.dtype) for g, x in zip(dstates, (c0, n0, m0))]
        else:
            grads += [None] * 3
        return (*grads, None, None, None, None)


def mlstm_chunkwise_torch(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, eps=1e-6,
                          chunk_size=None, reverse=False, return_last_states=False):
    """Validated inputs, gates (B, NH, S). Returns (h, (c, n, m) or None)."""
    S = q.shape[2]
    L = chunk_size or default_chunk_size(S, q.shape[-1], v.shape[-1], q.device)
    out = MLSTMChunkwise.apply(q, k, v, i, f, c_initial, n_initial, m_initial, eps, L,
                               return_last_states, reverse)
    if return_last_states:
        return out[0], tuple(out[1:])
    return out, None
