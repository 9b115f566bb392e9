"""Drop-in replacements for the two mLSTM call signatures that existing code uses.

Swapping `vil_kernels.mlstm` into a model written against either family is one changed import:

* Vision-LSTM (NX-AI/vision-lstm) calls the quadratic cell function
  ``parallel_stabilized_simple(queries, keys, values, igate_preact, fgate_preact, ...)``
  with gates of shape (B, NH, S, 1)::

      # from vision_lstm.vision_lstm_util import parallel_stabilized_simple
      from vil_kernels.compat import parallel_stabilized_simple

* xLSTM / mlstm_kernels code calls a chunkwise kernel
  ``mlstm_chunkwise__xl_chunk(q, k, v, i, f, c_initial, n_initial, m_initial,
  return_last_states, eps, chunk_size, ..., autocast_kernel_dtype)``::

      # from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk as mlstm_chunkwise
      from vil_kernels.compat import mlstm_chunkwise

Both compute the function of ../shared/spec/mlstm.md (the one the originals compute) through
`vil_kernels.mlstm`, so they get its backends: the Triton kernels on CUDA, the chunkwise PyTorch
path (or the parallel form for short sequences) elsewhere.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from .mlstm import BACKENDS, check_flag, mlstm

__all__ = ["parallel_stabilized_simple", "mlstm_chunkwise", "MLSTM_CHUNKWISE_TUNING_KWARGS"]


def parallel_stabilized_simple(queries, keys, values, igate_preact, fgate_preact,
                               lower_triangular_matrix=None, stabilize_rowwise=True, eps=1e-6,
                               backend="auto", **kwargs):
    """The Vision-LSTM cell function, on vil_kernels' chunkwise kernels.

    Same signature, scaling and output as NX-AI's ``parallel_stabilized_simple``: keys are scaled
    by DH ** -0.5, the log-gate matrix is stabilized by its row maximum and the normalizer is
    ``max(|n_t|, exp(-m_t)) + eps``.

    Args:
        queries, keys: (B, NH, S, DH).
        values: (B, NH, S, DHV).
        igate_preact, fgate_preact: (B, NH, S, 1) (or (B, NH, S)) gate pre-activations.
        lower_triangular_matrix: accepted and ignored. The original uses it only as a cache of
            the causal mask of its S x S matrix, which the chunkwise form never builds. (A
            non-causal mask would define a different function; the original also ignores a
            mask smaller than S.)
        stabilize_rowwise: True (default) subtracts each row's maximum log-weight m_t. False
            subtracts one maximum M over the whole (S x S) log-weight matrix of each head, as
            the original does; that changes h only through eps, whose term becomes
            ``eps * exp(M - m_t)``. It is honoured exactly, by a plain quadratic PyTorch
            computation (O(S^2) memory, no kernel speed-up; a warning says so once).
        eps: added to the normalizer's denominator.
        backend: forwarded to `vil_kernels.mlstm` ("auto", "triton", "torch", "parallel",
            "recurrent"); ignored for stabilize_rowwise=False.
        **kwargs: accepted and ignored, like the original.

    Returns:
        h_tilde_state: (B, NH, S, DHV) in the dtype of queries.
    """
    del lower_triangular_matrix, kwargs
    if not check_flag("stabilize_rowwise", stabilize_rowwise, "parallel_stabilized_simple"):
        _warn_once("parallel_stabilized_simple(stabilize_rowwise=False) runs the quadratic "
                   "PyTorch form (exactly the original's global-max stabilization), not the "
                   "chunkwise kernels; use the default stabilize_rowwise=True for speed.")
        return _parallel_global_max(queries, keys, values, igate_preact, fgate_preact, eps)
    return mlstm(queries, keys, values, igate_preact, fgate_preact, eps=eps, backend=backend)


_WARNED = set()


def _warn_once(msg):
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def _parallel_global_max(q, k, v, i, f, eps):
    """The parallel form stabilized by one maximum per (batch, head) instead of per row."""
    if i.dim() == 3:
        i, f = i[..., None], f[..., None]
    S, DH = q.shape[-2], q.shape[-1]
    fcum = F.logsigmoid(f).cumsum(-2)                                   # (B, NH, S, 1)
    log_d = fcum - fcum.transpose(-1, -2) + i.transpose(-1, -2)         # (B, NH, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, -math.inf)
    m_all = log_d.flatten(-2).max(-1).values[..., None, None]           # (B, NH, 1, 1)
    scores = (q @ k.transpose(-1, -2)) * DH ** -0.5 * torch.exp(log_d - m_all)
    den = torch.maximum(scores.sum(-1, keepdim=True).abs(), torch.exp(-m_all)) + eps
    return (scores / den) @ v


# The tuning keywords of mlstm_kernels' chunkwise Triton kernels (mlstm_chunkwise__xl_chunk and
# mlstm_chunkwise__limit_chunk). Our kernels pick their own tiling, so these are accepted and
# ignored; anything else is an error (a typo should not pass silently).
MLSTM_CHUNKWISE_TUNING_KWARGS = frozenset({
    "chunk_size_inter", "chunk_size_intra",
    "siz_b_L_parallel", "siz_b_L_loop", "siz_b_DH_parallel", "siz_b_DH_loop",
    "num_warps_intra", "num_warps_inter", "num_stages_intra", "num_stages_inter",
    "recompute_states_in_bw", "reset_mask",
})

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _valid_chunk_size(chunk_size):
    """Any positive chunk size -> the nearest power of two >= 16 (ties round up)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"mlstm_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    lo = 1 << (chunk_size.bit_length() - 1)
    p = lo if chunk_size - lo < 2 * lo - chunk_size else 2 * lo
    return max(16, p)


def mlstm_chunkwise(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                    return_last_states=False, eps=1e-6, chunk_size=64,
                    autocast_kernel_dtype=torch.float32, backend="auto", **tuning_kwargs):
    """The chunkwise mLSTM with the keyword set of NX-AI mlstm_kernels' chunkwise kernels.

    Args:
        q, k: (B, NH, S, DHQK). v: (B, NH, S, DHV).
        i, f: (B, NH, S) gate pre-activations ((B, NH, S, 1) is accepted too).
        c_initial, n_initial, m_initial: optional initial state (B, NH, DHQK, DHV), (B, NH, DHQK),
            (B, NH, 1), all three or none; same stabilizer convention as mlstm_kernels.
        return_last_states: also return ``(c, n, m)`` after the last position (float32, or
            float64 for float64 inputs).
        eps: added to the normalizer's denominator.
        chunk_size: mapped to the nearest power of two >= 16 (our kernels need one); S need
            not be a multiple of it. Only the result's speed depends on it.
        autocast_kernel_dtype: the precision the Triton kernels take q, k, v in; float32 by default,
            as in mlstm_kernels (pass torch.bfloat16 for tensor-core speed with float32 inputs).
            Float32 q, k, v on a CUDA device going to the Triton backend are cast to it (gates, cumulative sums, stabilizers, normalizer and states always stay
            float32, and accumulation is float32). Half-precision inputs are used as they are,
            float64 inputs are never lowered, and the PyTorch backends (CPU, the interpreter)
            compute in the input's precision. h is returned in the dtype of q, as given.
            Accepts a torch dtype, its name ("bfloat16", ...), or None for "never cast".
        backend: forwarded to `vil_kernels.mlstm`.
        **tuning_kwargs: mlstm_kernels' tiling knobs (MLSTM_CHUNKWISE_TUNING_KWARGS), accepted
            and ignored; an unknown keyword raises TypeError.

    Returns:
        h (B, NH, S, DHV), or ``(h, (c, n, m))`` with return_last_states=True.
    """
    unknown = set(tuning_kwargs) - MLSTM_CHUNKWISE_TUNING_KWARGS
    if unknown:
        raise TypeError(f"mlstm_chunkwise: unexpected keyword argument(s) {sorted(unknown)}; "
                        f"accepted tuning keywords: {sorted(MLSTM_CHUNKWISE_TUNING_KWARGS)}")
    if tuning_kwargs.get("reset_mask") is not None:
        raise ValueError("mlstm_chunkwise: reset_mask (document boundaries) is not supported; "
                         "set the forget gate pre-activation f to -inf at the first position of "
                         "each document instead (an exact reset in every backend), or split "
                         "the sequence")
    kdt = _DTYPE_NAMES.get(autocast_kernel_dtype, autocast_kernel_dtype)
    if kdt is not None and kdt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"mlstm_chunkwise: autocast_kernel_dtype must be float32, float16 or "
                         f"bfloat16 (or None), got {autocast_kernel_dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"mlstm_chunkwise: unknown backend {backend!r}; choose one of {BACKENDS}")
    out_dtype = q.dtype
    on_triton = q.device.type == "cuda" and backend in ("auto", "triton")
    if kdt is not None and on_triton and q.dtype == torch.float32 and kdt != torch.float32:
        q, k, v = q.to(kdt), k.to(kdt), v.to(kdt)
    out = mlstm(q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial,
                return_last_states=return_last_states, eps=eps,
                chunk_size=_valid_chunk_size(chunk_size), backend=backend)
    if return_last_states:
        h, states = out
        return h.to(out_dtype), states
    return out.to(out_dtype)
