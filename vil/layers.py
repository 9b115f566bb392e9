"""Building blocks of the Vision-LSTM: norms, headwise projections, sequence convs, drop path and
the fused output gating.

Parameter names and shapes are those of NX-AI's reference (vision_lstm2.py) so that its state_dicts
load unchanged; the forward passes are rewritten for speed (see ``ViLLayer`` in model.py for how
they are combined).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "MultiHeadLayerNorm", "LinearHeadwiseExpand", "SequenceConv2d",
           "CausalConv1d", "DropPath", "gated_outnorm", "interpolate_pos_embed", "to_2tuple"]


def to_2tuple(x):
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return tuple(int(v) for v in x)
    return (int(x), int(x))


def interpolate_pos_embed(embed, grid, mode="bicubic"):
    """Resample a (1, H, W, dim) position embedding to (1, *grid, dim), as the reference does
    (``F.interpolate(..., mode="bicubic")``, align_corners False)."""
    grid = tuple(int(g) for g in grid)
    if tuple(embed.shape[1:3]) == grid:
        return embed
    out = F.interpolate(embed.permute(0, 3, 1, 2), size=grid, mode=mode)
    return out.permute(0, 2, 3, 1)


class LayerNorm(nn.Module):
    """LayerNorm with optional bias whose weight is stored as an offset from one (``1 + weight``,
    initialised at zero), as in the reference."""

    def __init__(self, ndim, weight=True, bias=False, eps=1e-5, residual_weight=True):
        super().__init__()
        self.ndim = ndim
        self.eps = eps
        self.residual_weight = residual_weight
        self.weight = nn.Parameter(torch.zeros(ndim)) if weight else None
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.reset_parameters()

    @property
    def weight_proxy(self):
        if self.weight is None:
            return None
        return 1.0 + self.weight if self.residual_weight else self.weight

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.zeros_(self.weight) if self.residual_weight else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return F.layer_norm(x, (self.ndim,), self.weight_proxy, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.ndim}, eps={self.eps}, bias={self.bias is not None}"


def _layer_norm_heads(h, eps):
    """Parameter-free layer norm over the head dim of h (B, NH, S, DH), run in whichever (B, NH)
    order h is stored in (F.layer_norm would copy a transposed view first)."""
    if not h.is_contiguous() and h.transpose(0, 1).is_contiguous():
        return F.layer_norm(h.transpose(0, 1), h.shape[-1:], eps=eps).transpose(0, 1)
    return F.layer_norm(h, h.shape[-1:], eps=eps)


class MultiHeadLayerNorm(LayerNorm):
    """Per-head normalisation of the cell output (the reference's group norm with one group per
    head). Takes (B, NH, S, DH) and returns (B, S, NH * DH); ``gated_outnorm`` fuses it with the
    skip connection and output gate."""

    def forward(self, x):
        B, NH, S, DH = x.shape
        y = _layer_norm_heads(x, self.eps)
        w = self.weight_proxy
        if w is not None:
            y = y * w.view(NH, 1, DH)
        if self.bias is not None:
            y = y + self.bias.view(NH, 1, DH)
        return y.transpose(1, 2).reshape(B, S, NH * DH)


def gated_outnorm(h, norm, skip, a, z):
    """``(outnorm(h) + skip * a) * silu(z)`` in few memory passes.

    h: (B, NH, S, DH) cell output; a: (B, S, inner) the conv activation (overwritten: it is the
    buffer the result is built in); z: (B, S, inner) gate branch (may be a strided view).
    Returns a (B, S, inner) tensor (``a``'s storage).
    """
    B, NH, S, DH = h.shape
    hn_t = _layer_norm_heads(h, norm.eps).transpose(1, 2)              # (B, S, NH, DH) view
    w = norm.weight_proxy
    if torch.is_grad_enabled():
        out = a * skip
        if norm.bias is not None:
            out = out + norm.bias
        out = out.view(B, S, NH, DH) + (hn_t * w.view(NH, DH) if w is not None else hn_t)
        return out.view(B, S, NH * DH) * F.silu(z)
    # Inference: build the result in a's buffer (a is dead after this), three passes.
    if norm.bias is not None:
        out = torch.addcmul(norm.bias, a, skip, out=a)
    else:
        out = a.mul_(skip)
    out4 = out.view(B, S, NH, DH)
    if w is not None:
        out4.addcmul_(hn_t, w.view(NH, DH))
    else:
        out4.add_(hn_t)
    return out.mul_(F.silu(z))


class LinearHeadwiseExpand(nn.Module):
    """Block-diagonal linear map with blocks of ``dim // num_heads`` channels (4 in ViL): weight
    (num_heads, out_per_block, in_per_block), bias (dim). ``forward`` is the plain definition;
    ViLLayer applies the weights headwise-densely for speed (see model.py)."""

    def __init__(self, dim, num_heads, bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        d = dim // num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, d, d))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=math.sqrt(2 / 5 / self.weight.shape[-1]))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def dense_per_group(self, group_size):
        """The map as dense (G, group_size, group_size) matrices over groups of ``group_size``
        consecutive channels (block-diagonal inside each group), transposed for ``x @ W``."""
        nb, d, _ = self.weight.shape
        per = group_size // d
        G = self.dim // group_size
        w = self.weight.view(G, per, d, d)                             # [G, blk, out, in]
        eye = torch.eye(per, dtype=w.dtype, device=w.device)
        # dense[g, blk_in*d + i, blk_out*d + o] = w[g, blk, o, i] when blk_in == blk_out == blk
        dense = torch.einsum("gboi,bc->gbico", w, eye)                # [G, blk, in, blk', out]
        return dense.reshape(G, group_size, group_size)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.num_heads, self.dim // self.num_heads)
        y = torch.einsum("nhd,hod->nho", x, self.weight).reshape(shape)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, bias={self.bias is not None}"


class SequenceConv2d(nn.Conv2d):
    """Depthwise 2-D conv over a token sequence laid out row-major on a (H, W) grid. The grid is
    passed at call time (the reference fixes it at construction, which breaks ``stride=8`` and
    any other resolution).

    ``reverse=True`` is what the reference computes for a block that walks the tokens from the
    bottom right: it flips the sequence, i.e. rotates the grid by 180 degrees, before the conv and
    back after; that equals a conv of the unflipped grid with the kernel rotated by 180 degrees
    (odd kernel, symmetric padding), which is what runs here, without moving any tokens.
    """

    def forward(self, x, grid=None, reverse=False):
        B, S, C = x.shape
        H, W = _grid_or_square(S, grid)
        y = x.transpose(1, 2).unflatten(2, (H, W))                     # (B, C, H, W) view
        y = F.conv2d(y, self._oriented_weight(reverse), self.bias, self.stride, self.padding,
                     self.dilation, self.groups)
        return y.flatten(2).transpose(1, 2)                            # (B, S, C) view

    def _oriented_weight(self, reverse):
        return self.weight.flip(-1, -2) if reverse else self.weight

    def fusable(self):
        """Whether ``forward_silu_fused`` computes this conv: depthwise, stride 1, dilation 1,
        odd kernel sides, zero 'same' padding (ViL's 3x3)."""
        KH, KW = self.kernel_size
        return (self.groups == self.in_channels == self.out_channels and self.stride == (1, 1)
                and self.dilation == (1, 1) and KH % 2 == 1 and KW % 2 == 1
                and self.padding == (KH // 2, KW // 2) and self.padding_mode == "zeros")

    def forward_silu_fused(self, x, grid=None, reverse=False):
        """``silu(self(x, grid, reverse))`` as one Triton kernel reading x in place
        (vil.triton_conv, with its backward; only for a ``fusable`` conv). Contiguous out."""
        from . import triton_conv
        return triton_conv.conv_silu_triton(x, self._oriented_weight(reverse), self.bias,
                                            _grid_or_square(x.shape[1], grid))


class CausalConv1d(nn.Module):
    """Causal depthwise conv over the sequence (``conv_kind="causal1d"``), key ``conv.conv``.
    ``reverse=True``: causal in the reversed order (anti-causal, kernel flipped), as the
    reference's flip-conv-flip."""

    def __init__(self, dim, kernel_size=4, bias=True):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(dim, dim, kernel_size=kernel_size, padding=0, groups=dim, bias=bias)

    def reset_parameters(self):
        self.conv.reset_parameters()

    def forward(self, x, grid=None, reverse=False):
        c = self.conv
        pad = (0, self.pad) if reverse else (self.pad, 0)
        w = c.weight.flip(-1) if reverse else c.weight
        y = F.conv1d(F.pad(x.transpose(1, 2), pad), w, c.bias, groups=c.groups)
        return y.transpose(1, 2)


def _grid_or_square(S, grid):
    if grid is not None:
        H, W = grid
        if H * W != S:
            raise ValueError(f"grid {tuple(grid)} does not match the sequence length {S}")
        return H, W
    H = math.isqrt(S)
    if H * H != S:
        raise ValueError(f"sequence of {S} tokens is not square; pass the grid")
    return H, H


class DropPath(nn.Module):
    """Stochastic depth for a residual branch, as the reference's (kappamodules) DropPath: in
    training, the branch runs only on the kept samples of the batch (``keep_count =
    max(int(B * keep_prob), 1)``), scaled by B / keep_count; when that would move the drop rate
    by more than ``drop_prob_tolerance``, a per-sample Bernoulli mask instead."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True, stochastic_drop_prob=False,
                 drop_prob_tolerance=0.01):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.stochastic_drop_prob = stochastic_drop_prob
        self.drop_prob_tolerance = drop_prob_tolerance

    @property
    def keep_prob(self):
        return 1.0 - self.drop_prob

    def forward(self, x, residual_path, **kwargs):
        if self.drop_prob == 0.0 or not self.training:
            return x + residual_path(x, **kwargs)
        bs = len(x)
        keep_count = max(int(bs * self.keep_prob), 1)
        if self.stochastic_drop_prob or self.keep_prob - keep_count / bs > self.drop_prob_tolerance:
            mask = x.new_empty((bs,) + (1,) * (x.ndim - 1)).bernoulli_(self.keep_prob)
            if self.scale_by_keep:
                mask.div_(self.keep_prob)
            return x + residual_path(x, **kwargs) * mask
        perm = torch.randperm(bs, device=x.device)[:keep_count]
        alpha = bs / keep_count if self.scale_by_keep else 1.0
        residual = residual_path(x[perm], **kwargs)
        return torch.index_add(x.flatten(1), 0, perm, residual.to(x.dtype).flatten(1),
                               alpha=alpha).view_as(x)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
