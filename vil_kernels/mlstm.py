"""The public operator: argument checks, backend choice, dispatch."""

import functools
import os

import torch

from . import naive
from .chunk import mlstm_chunkwise_torch
from .func import (beyond_first_order, has_tangents, mlstm_under_transforms,
                   transforms_active)

BACKENDS = ("auto", "triton", "torch", "parallel", "recurrent")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_gate(name, g, B, NH, S):
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"mlstm: {name} must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"mlstm: {name} must be a floating-point tensor, got {g.dtype}")
    if g.dim() == 4 and g.shape[-1] == 1:
        g = g[..., 0]
    if tuple(g.shape) != (B, NH, S):
        raise ValueError(
            f"mlstm: {name} must have shape (B, NH, S) = {(B, NH, S)} or (B, NH, S, 1), "
            f"got {tuple(g.shape)}")
    return g


def _check_states(c, n, m, B, NH, DK, DV):
    given = [x is not None for x in (c, n, m)]
    if not any(given):
        return None
    if not all(given):
        missing = [name for name, g in zip(("c_initial", "n_initial", "m_initial"), given) if not g]
        raise ValueError(
            "mlstm: initial states must be given together (c_initial, n_initial, m_initial); "
            f"missing {', '.join(missing)}")
    expected = {"c_initial": (B, NH, DK, DV), "n_initial": (B, NH, DK), "m_initial": (B, NH, 1)}
    for (name, shape), x in zip(expected.items(), (c, n, m)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mlstm: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"mlstm: {name} must be a floating-point tensor, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"mlstm: {name} must have shape {shape}, got {tuple(x.shape)}")
    return c, n, m


def _check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial, eps, chunk_size, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mlstm: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"mlstm: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"mlstm: {name} must have 4 dims (B, NH, S, D), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"mlstm: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, NH, S, DK = q.shape
    if tuple(k.shape) != (B, NH, S, DK):
        raise ValueError(f"mlstm: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, NH, S):
        raise ValueError(
            f"mlstm: v must have shape (B, NH, S, DHV) with (B, NH, S) = {(B, NH, S)}, got {tuple(v.shape)}")
    DV = v.shape[-1]
    if S < 1 or DK < 1 or DV < 1 or B < 1 or NH < 1:
        raise ValueError(f"mlstm: empty dimension in q {tuple(q.shape)} / v {tuple(v.shape)}")
    devices = {x.device for x in (q, k, v, i, f) if isinstance(x, torch.Tensor)}
    i = _check_gate("i", i, B, NH, S)
    f = _check_gate("f", f, B, NH, S)
    states = _check_states(c_initial, n_initial, m_initial, B, NH, DK, DV)
    if states is not None:
        devices |= {x.device for x in states}
    if len(devices) > 1:
        raise ValueError(f"mlstm: all tensors must be on one device, got {sorted(map(str, devices))}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"mlstm: eps must be a non-negative number, got {eps!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"mlstm: chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(f"mlstm: chunk_size must be a power of two >= 16, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"mlstm: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not _triton_available():
        raise ValueError("mlstm: backend='triton' needs the triton package, which does not import "
                         "here; install triton, or use backend='torch'")
    if backend == "triton" and q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"mlstm: backend='triton' needs CUDA tensors (got {q.device.type}); set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on the CPU, or use backend='torch'")
    return i, f, states


def check_flag(name, x, caller="mlstm"):
    """A bool: a string such as "no" or a tensor would otherwise be taken by its truth value,
    silently."""
    if isinstance(x, bool):
        return x
    shown = repr(x) if isinstance(x, (str, int, float)) else type(x).__name__
    raise TypeError(f"{caller}: {name} must be a bool, got {shown}")


def _triton_available():
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def _choose_backend(q, k, v):
    """Triton on CUDA (the torch path where triton is missing). On a CPU the quadratic form does
    less work than chunking until S passes about twice the head dim: its S x S cost against the
    chunkwise form's DHQK x DHV state per chunk (bench/kernels.py; README table)."""
    if q.device.type == "cuda":
        return "triton" if _triton_available() else "torch"
    S, D = q.shape[2], max(k.shape[-1], v.shape[-1])
    return "parallel" if S <= 2 * D else "torch"


def mlstm(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
          eps=1e-6, chunk_size=None, reverse=False, backend="auto", recompute_states=False):
    """The mLSTM with exponential gating and stabilizer (xLSTM), chunkwise-parallel.

    Computes, per batch element and head, with s = DHQK ** -0.5, fl = logsigmoid(f),
    F_t = fl_1 + ... + fl_t and log-weights logD_tj = F_t - F_j + i_j (j <= t)::

        m_t = max_j logD_tj
        h_t = sum_j s (q_t . k_j) exp(logD_tj - m_t) v_j / (max(|n_t|, exp(-m_t)) + eps)
        n_t = sum_j s (q_t . k_j) exp(logD_tj - m_t)

    the function of NX-AI's ``parallel_stabilized_simple`` (Vision-LSTM) and ``mlstm_chunkwise``
    (mlstm_kernels), with the same keyword names and state convention.

    Args:
        q, k: (B, NH, S, DHQK) queries and keys; float16, bfloat16, float32 or float64.
        v: (B, NH, S, DHV) values, same dtype as q.
        i, f: (B, NH, S) or (B, NH, S, 1) input and forget gate pre-activations. Infinite
            values mean their limits: i = -inf writes nothing at that position (padding,
            masking), f = -inf forgets everything before it (a reset: f is floored at -256,
            past which nothing crosses), f = +inf keeps everything. NaN, and i = +inf, give NaN.
        c_initial, n_initial, m_initial: optional state to start from, all three or none:
            (B, NH, DHQK, DHV), (B, NH, DHQK), (B, NH, 1). Gradients flow into them.
        return_last_states: also return the state ``(c, n, m)`` after the last position
            (float32; float64 for float64 inputs). Feeding it back as the initial state of the
            next segment reproduces the whole sequence.
        eps: added to the normalizer's denominator.
        chunk_size: positions per chunk of the chunkwise backends, a power of two >= 16;
            None picks one by head dims and sequence length (on the torch backend a divisor
            of S near 64 where there is one, so that nothing is padded). The state is kept at
            chunk boundaries only: a longer chunk moves fewer (DHQK, DHV) states for more
            intra-chunk products. The triton backend runs chunks of up to 1024 positions (a
            longer request runs as 1024, or as one chunk for the whole sequence) in tiles of
            at most 64; one chunk for the whole sequence, without initial states or
            return_last_states, does no state work at all (the attention-like quadratic
            form). Any chunk size computes the same function up to rounding.
        reverse: traverse the sequence from its end (ViL's odd blocks); equals flipping
            every input and the output along S, without materialising the flips in the kernels.
        backend: "triton" (fused kernels, CUDA or TRITON_INTERPRET=1), "torch" (chunkwise
            PyTorch), "parallel" and "recurrent" (the references), or "auto": triton on CUDA
            tensors, otherwise the faster PyTorch path for the sequence length and head dims;
            "parallel" under forward-mode AD and torch.func's gradients of gradients, which
            the chunkwise backends do not support.
        recompute_states: training memory for time, in the chunkwise backends: the forward
            keeps O(S) statistics only, not the state entering every chunk (S / chunk_size x
            DHQK x DHV a head, most of what a ViL block keeps for its backward), and the
            backward recomputes those states (triton: the two state scans again; torch: its
            forward again). Gradients are the same bits. The references ignore it.

    Returns:
        h of shape (B, NH, S, DHV) in q's dtype, or ``(h, (c, n, m))`` with return_last_states.
        The torch backend lays h out like q (for a (NH, B)-ordered q, h is a transposed view);
        call ``.contiguous()`` where a contiguous tensor is needed.

    Raises:
        TypeError, ValueError: for inputs of the wrong type, dtype, rank or shape, a partial
        initial state, a bad chunk size, a flag that is not a bool or an unknown or
        unavailable backend.
    """
    i, f, states = _check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial, eps, chunk_size,
                                 backend)
    reverse = check_flag("reverse", reverse)
    return_last_states = check_flag("return_last_states", return_last_states)
    recompute_states = check_flag("recompute_states", recompute_states)
    c_initial, n_initial, m_initial = states if states is not None else (None, None, None)
    tensors = (q, k, v, i, f, c_initial, n_initial, m_initial)
    if backend == "auto":
        # forward-mode AD (forward_ad tangents, torch.func.jvp) and torch.func's gradients of
        # gradients: the reference form, plain PyTorch, supports them
        plain = has_tangents(tensors) or beyond_first_order()
        backend = "parallel" if plain else _choose_backend(q, k, v)
    elif backend in ("triton", "torch") and not transforms_active() and has_tangents(tensors):
        _refuse_tangents(backend, tensors)        # (under torch.func: func._Forward.jvp says so)
    if backend in ("triton", "torch"):
        if backend == "triton":
            from .triton import mlstm_triton as chunkwise
        else:
            chunkwise = mlstm_chunkwise_torch
        run = functools.partial(chunkwise, eps=float(eps), chunk_size=chunk_size,
                                reverse=reverse, return_last_states=return_last_states,
                                recompute_states=recompute_states)
        if transforms_active():
            h, last = mlstm_under_transforms(run, backend, tensors, return_last_states)
        else:
            h, last = run(*tensors)
    else:
        h, last = _reference(backend, q, k, v, i, f, states, float(eps), reverse,
                             return_last_states)
    if return_last_states:
        return h, last
    return h


def _refuse_tangents(backend, tensors):
    """Forward-mode AD (torch.autograd.forward_ad) into a chunkwise backend: the Triton kernels
    would drop the tangents, and the PyTorch backend's autograd Function has no jvp (its forward
    without autograd is plain operations, which carry them)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "triton" or grad:
        raise RuntimeError(
            f"mlstm: backend={backend!r} does not carry forward-mode AD tangents"
            f"{' with autograd on' if backend == 'torch' else ''}; use backend='parallel' (or "
            "'auto', which picks it for inputs with tangents)")


def _reference(backend, q, k, v, i, f, states, eps, reverse, return_last_states):
    """Run a reference in float32 (float64 for float64 inputs); h back in q's dtype."""
    fn = naive.mlstm_parallel if backend == "parallel" else naive.mlstm_recurrent
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    args = [x.to(ct) for x in (q, k, v, i, f)]
    kw = {}
    if states is not None:
        kw = dict(zip(("c_initial", "n_initial", "m_initial"), (x.to(ct) for x in states)))
    out = fn(*args, **kw, return_last_states=return_last_states, eps=eps, reverse=reverse)
    h, last = out if return_last_states else (out, None)
    return h.to(q.dtype), last
