"""The references: the mLSTM written as plainly as possible, differentiated by autograd.

These two functions *define* what every backend computes (../shared/spec/mlstm.md). They favour
obviousness over speed and memory: the parallel form builds an S x S matrix, the recurrent form
loops over time steps. Both run in the dtype they are given (use float64 for ground truth) and take
gates of shape (B, NH, S). `reverse=True` is defined here by flipping the sequence. Infinite
gates are taken as their limits (utils.F_MIN): forget gate pre-activations floored at F_MIN,
no initial state taken as the state (0, 0, NEG) (so a row or state that has seen nothing, every
input gate -inf, has weights 0 and m = NEG, not NaN), and the floor exp(-m) capped below
overflow.
"""

import math

import torch

from .utils import NEG, log_forget


def _flip_call(fn, q, k, v, i, f, **kw):
    out = fn(q.flip(2), k.flip(2), v.flip(2), i.flip(2), f.flip(2), **kw)
    if isinstance(out, tuple):
        return out[0].flip(2), out[1]
    return out.flip(2)


def _floor(m):
    """exp(-m), capped where it would overflow (rows that have seen no key: m = NEG): the same h
    (0 to the dtype's precision), and a finite gradient instead of 0 * inf."""
    return torch.exp((-m).clamp(max=math.log(torch.finfo(m.dtype).max) - 1.0))


def mlstm_parallel(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                   return_last_states=False, eps=1e-6, reverse=False):
    """Parallel stabilized form. The initial state acts as a position 0 with log-weight m_initial."""
    kw = dict(c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
              return_last_states=return_last_states, eps=eps)
    if reverse:
        return _flip_call(mlstm_parallel, q, k, v, i, f, **kw)
    S, DK = q.shape[-2], q.shape[-1]
    scale = DK ** -0.5
    fl = log_forget(f)                                                 # [B, NH, S]
    fcum = fl.cumsum(-1)                                               # F_t
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = fcum[..., :, None] - fcum[..., None, :] + i[..., None, :]  # [B, NH, S, S]
    log_d = log_d.masked_fill(~causal, -math.inf)
    has_init = c_initial is not None
    # no initial state is the state (0, 0, NEG): a finite "-inf", as in the kernels, so that
    # m stays finite where every key so far is masked (i = -inf), and a max over it keeps F's
    # gradient as theirs does
    log_d0 = fcum + (m_initial.clamp(min=NEG) if has_init else NEG)   # [B, NH, S]
    m = torch.maximum(log_d.max(-1).values, log_d0)                    # [B, NH, S]
    scores = (q @ k.transpose(-1, -2)) * scale * torch.exp(log_d - m[..., None])
    num = scores @ v                                                   # [B, NH, S, DV]
    n_sum = scores.sum(-1)                                             # [B, NH, S]
    if has_init:
        w0 = torch.exp(log_d0 - m)[..., None]                          # [B, NH, S, 1]
        qs = q * scale
        num = num + w0 * (qs @ c_initial)
        n_sum = n_sum + w0[..., 0] * (qs * n_initial[..., None, :]).sum(-1)
    den = torch.maximum(n_sum.abs(), _floor(m)) + eps
    h = num / den[..., None]
    if not return_last_states:
        return h
    # The last state is the whole sequence taken as one chunk.
    a = fcum[..., -1:] - fcum + i                                      # [B, NH, S]
    m_last = torch.maximum(a.max(-1, keepdim=True).values, log_d0[..., -1:])   # [B, NH, 1]
    wk = k * torch.exp(a - m_last)[..., None]
    c_last = wk.transpose(-1, -2) @ v
    n_last = wk.sum(-2)
    if has_init:
        w0 = torch.exp(fcum[..., -1:] + m_initial - m_last)            # [B, NH, 1]
        c_last = c_last + w0[..., None] * c_initial
        n_last = n_last + w0 * n_initial
    return h, (c_last, n_last, m_last)


def mlstm_recurrent(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                    return_last_states=False, eps=1e-6, reverse=False):
    """Recurrent form, one time step at a time (the state convention of mlstm_kernels)."""
    kw = dict(c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
              return_last_states=return_last_states, eps=eps)
    if reverse:
        return _flip_call(mlstm_recurrent, q, k, v, i, f, **kw)
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    scale = DK ** -0.5
    fl = log_forget(f)
    if c_initial is None:
        c = q.new_zeros(B, NH, DK, DV)
        n = q.new_zeros(B, NH, DK)
        m = q.new_full((B, NH, 1), NEG)                  # (0, 0, NEG): see mlstm_parallel
    else:
        c, n, m = c_initial, n_initial, m_initial.clamp(min=NEG)
    hs = []
    for t in range(S):
        fl_t, i_t = fl[..., t, None], i[..., t, None]                  # [B, NH, 1]
        m_new = torch.maximum(fl_t + m, i_t)
        decay = torch.exp(fl_t + m - m_new)
        gain = torch.exp(i_t - m_new)
        k_t, v_t, q_t = k[..., t, :], v[..., t, :], q[..., t, :] * scale
        c = decay[..., None] * c + gain[..., None] * k_t[..., :, None] * v_t[..., None, :]
        n = decay * n + gain * k_t
        m = m_new
        num = (q_t[..., None, :] @ c)[..., 0, :]                       # [B, NH, DV]
        qn = (q_t * n).sum(-1, keepdim=True)
        den = torch.maximum(qn.abs(), _floor(m)) + eps
        hs.append(num / den)
    h = torch.stack(hs, dim=2) if S else q.new_zeros(B, NH, 0, DV)
    if return_last_states:
        return h, (c, n, m)
    return h
