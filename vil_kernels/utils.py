"""Helpers shared by the chunkwise backends."""

import functools

import torch

# "-inf" for log-weights inside the chunkwise paths: finite, so masked lanes never form inf - inf,
# and exp() of it (plus anything a gate can add) is exactly 0 in float32 and float64.
NEG = -1e30


def compute_dtype(x):
    """float64 stays float64 (ground truth); everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _reversed_index(S, device):
    with torch.inference_mode(False):                  # the cache serves training calls too
        return torch.arange(S - 1, -1, -1, device=device)


def reverse_seq(x):
    """x with dim 2 (the sequence) reversed: index_select, several times faster than flip on CPU."""
    return x.index_select(2, _reversed_index(x.shape[2], x.device))


def pad_seq(x, L, value=0.0, dtype=None, reverse=False):
    """Dim 2 (the sequence) of a (B, NH, S[, D]) tensor reversed if asked, cast to dtype and padded
    with value up to a multiple of L, in one copy into a fresh buffer (no copy when nothing
    changes)."""
    S = x.shape[2]
    Sp = S + (-S % L)
    dtype = dtype or x.dtype
    if reverse:
        x = reverse_seq(x)
    if Sp == S:
        return x.to(dtype)
    out = torch.empty(*x.shape[:2], Sp, *x.shape[3:], dtype=dtype, device=x.device)
    out[:, :, :S].copy_(x)
    out[:, :, S:].fill_(value)
    return out


def next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def default_chunk_size(S, DK, DV, device):
    """Chunk length for the PyTorch path: 64, or 128 for head dims over 256 whose per-chunk state
    dominates (measured on CPU, bench/kernels.py); never longer than S needs."""
    L = 128 if max(DK, DV) > 256 else 64
    return max(16, min(L, next_power_of_2(S)))
