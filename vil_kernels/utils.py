"""Helpers shared by the chunkwise backends."""

import torch
import torch.nn.functional as F

# "-inf" for log-weights inside the chunkwise paths: finite, so masked lanes never form inf - inf,
# and exp() of it (plus anything a gate can add) is exactly 0 in float32 and float64.
NEG = -1e30


def compute_dtype(x):
    """float64 stays float64 (ground truth); everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pad_seq(x, L, value=0.0):
    """Pad dim 2 (the sequence) of a (B, NH, S[, D]) tensor up to a multiple of L."""
    pad = -x.shape[2] % L
    if not pad:
        return x
    widths = (0, 0, 0, pad) if x.dim() == 4 else (0, pad)
    return F.pad(x, widths, value=value)


def next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def default_chunk_size(S, DK, DV, device):
    """Chunk length for the PyTorch path: 64, or 128 for head dims over 256 whose per-chunk state
    dominates (measured on CPU, bench/kernels.py); never longer than S needs."""
    L = 128 if max(DK, DV) > 256 else 64
    return max(16, min(L, next_power_of_2(S)))
