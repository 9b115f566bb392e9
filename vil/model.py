"""Vision-LSTM (ViL, NX-AI's ``VisionLSTM2``) on ``vil_kernels.mlstm``.

Same constructor keywords, module tree, state_dict names and shapes, initialisation and outputs as
the reference (vision_lstm/vision_lstm2.py); faster layers, both traversal directions through
``mlstm(..., reverse=True)`` (no token flips), any input size divisible by the patch stride, and
a timm-style interface (``forward_features``, ``forward_head``, ``forward_intermediates``).

How a layer runs (``ViLLayer.forward``); ``inner = 2 * dim``, cell heads NH = 4, DH = inner / 4:

1. ``proj_up``: one GEMM -> x_mlstm, z (views, no copies).
2. Depthwise conv over the actual token grid, ``a = silu(conv(x_mlstm))``.
3. q, k and the input/forget gate pre-activations in one batched GEMM over the cell heads: the
   block-diagonal (4 x 4 blocks) q/k projections are applied as dense (DH, DH) matrices per head,
   which also writes q, k directly in the (B, NH, S, DH) layout the cell wants, and the gate
   linear on cat(q, k, v) is folded into 8 extra output columns (gate = Wg_q q + Wg_k k + Wg_v v
   + b, and q, k, v are linear in a and x_mlstm). v and its gate columns likewise from x_mlstm.
   cat(q, k, v) is never built; the folded weights are rebuilt every call (tiny) so gradients
   reach the stored parameters.
4. ``vil_kernels.mlstm`` with ``reverse=True`` for the blocks walking from the bottom right.
5. Output norm (per-head layer norm) + learnable skip + silu(z) gating: one Triton kernel in
   CUDA inference (vil/triton_gating.py), three in-place passes in CPU inference (in the conv
   activation's buffer), plain autograd ops in training.
6. ``proj_down``.
"""

import math
import numbers
import warnings
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import vil_kernels
from vil_kernels.func import has_tangents, transforms_active
from vil_kernels.utils import grad_buffer_of

from . import triton_gating, triton_norm
from .fold import fold_weights
from .layers import (CausalConv1d, DropPath, LayerNorm, LinearHeadwiseExpand, MultiHeadLayerNorm,
                     SequenceConv2d, gated_outnorm, interpolate_pos_embed, to_2tuple)

__all__ = ["VisionLSTM", "ViLBlockPair", "ViLBlock", "ViLLayer", "MatrixLSTMCell",
           "SequenceTraversal", "PatchEmbed", "PosEmbed2d"]


class SequenceTraversal(Enum):
    ROWWISE_FROM_TOP_LEFT = "rowwise_from_top_left"
    ROWWISE_FROM_BOT_RIGHT = "rowwise_from_bot_right"


def _small_init_(param, dim):
    nn.init.normal_(param, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def _wang_init_(param, dim, num_blocks):
    nn.init.normal_(param, mean=0.0, std=2 / num_blocks / math.sqrt(dim))


class MatrixLSTMCell(nn.Module):
    """Holds the gate linears (on the 3 * inner channels of cat(q, k, v)) and the output norm.
    ``forward(q, k, v)`` with (B, S, inner) inputs is the reference's plain path (kept for
    completeness); ViLLayer calls the fused path."""

    def __init__(self, dim, num_heads, norm_bias=True):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.igate = nn.Linear(3 * dim, num_heads)
        self.fgate = nn.Linear(3 * dim, num_heads)
        self.outnorm = MultiHeadLayerNorm(ndim=dim, weight=True, bias=norm_bias)
        self.reset_parameters()

    def reset_parameters(self):
        self.outnorm.reset_parameters()
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)

    def forward(self, q, k, v, reverse=False, backend="auto", chunk_size=None):
        B, S, _ = q.shape
        NH = self.num_heads
        qkv = torch.cat([q, k, v], dim=-1)
        i = self.igate(qkv).transpose(1, 2)
        f = self.fgate(qkv).transpose(1, 2)
        heads = lambda x: x.view(B, S, NH, -1).transpose(1, 2)
        h = vil_kernels.mlstm(heads(q), heads(k), heads(v), i, f, reverse=reverse,
                              backend=backend, chunk_size=chunk_size)
        return self.outnorm(h)


class ViLLayer(nn.Module):
    def __init__(self, dim, direction, expansion=2, qkv_block_size=4, proj_bias=True,
                 norm_bias=True, conv_bias=True, conv_kernel_size=3, conv_kind="2d",
                 init_weights="original", seqlens=None, num_blocks=None, mlstm_backend="auto",
                 mlstm_chunk_size=None, mlstm_recompute_states=False):
        super().__init__()
        if dim % qkv_block_size:
            raise ValueError(f"dim {dim} must be divisible by qkv_block_size {qkv_block_size}")
        self.dim = dim
        self.direction = direction
        self.expansion = expansion
        self.qkv_block_size = qkv_block_size
        self.proj_bias = proj_bias
        self.conv_bias = conv_bias
        self.conv_kernel_size = conv_kernel_size
        self.conv_kind = conv_kind
        self.init_weights = init_weights
        self.num_blocks = num_blocks
        self.mlstm_backend = mlstm_backend
        self.mlstm_chunk_size = mlstm_chunk_size
        self.mlstm_recompute_states = mlstm_recompute_states
        self.reverse = direction == SequenceTraversal.ROWWISE_FROM_BOT_RIGHT

        inner = expansion * dim
        self.inner_dim = inner
        nb = inner // qkv_block_size
        self.proj_up = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.q_proj = LinearHeadwiseExpand(inner, nb, bias=proj_bias)
        self.k_proj = LinearHeadwiseExpand(inner, nb, bias=proj_bias)
        self.v_proj = LinearHeadwiseExpand(inner, nb, bias=proj_bias)
        if conv_kind == "causal1d":
            if conv_kernel_size < 1:
                raise ValueError(f"conv_kind='causal1d' needs a positive conv_kernel_size, "
                                 f"got {conv_kernel_size}")
            self.conv = CausalConv1d(inner, kernel_size=conv_kernel_size, bias=conv_bias)
        elif conv_kind == "2d":
            if conv_kernel_size % 2 != 1 or conv_kernel_size < 1:
                raise ValueError(f"conv_kind='2d' needs an odd positive conv_kernel_size, "
                                 f"got {conv_kernel_size}")
            self.conv = SequenceConv2d(inner, inner, kernel_size=conv_kernel_size,
                                       padding=conv_kernel_size // 2, groups=inner, bias=conv_bias)
        else:
            raise ValueError(f"conv_kind must be '2d' or 'causal1d', got {conv_kind!r}")
        self.mlstm_cell = MatrixLSTMCell(inner, num_heads=qkv_block_size, norm_bias=norm_bias)
        if (inner // self.mlstm_cell.num_heads) % qkv_block_size:
            raise ValueError("the cell's head dim must be a multiple of qkv_block_size")
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=proj_bias)
        self.reset_parameters()

    def reset_parameters(self):
        _small_init_(self.proj_up.weight, dim=self.dim)
        if self.proj_up.bias is not None:
            nn.init.zeros_(self.proj_up.bias)
        if self.init_weights == "original":
            _wang_init_(self.proj_down.weight, dim=self.dim, num_blocks=1)
        elif self.init_weights == "original-fixed":
            _wang_init_(self.proj_down.weight, dim=self.dim, num_blocks=self.num_blocks)
        else:
            raise ValueError(f"init_weights must be 'original' or 'original-fixed', "
                             f"got {self.init_weights!r}")
        if self.proj_down.bias is not None:
            nn.init.zeros_(self.proj_down.bias)
        nn.init.ones_(self.learnable_skip)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _small_init_(proj.weight, dim=self.dim)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.mlstm_cell.reset_parameters()

    def _fused_weights(self):
        """Per cell head: [Wq | Wk | gate cols] (NH, DH, 2 DH + 8) applied to a, [Wv | gate cols]
        (NH, DH, DH + 8) applied to x_mlstm, their biases, and the gates' constant (8,), as one
        autograd node (vil/fold.py). On CUDA the column counts are padded with zeros to
        multiples of 16: the Triton kernels then read q, k, v in place from the projection
        output with 16-byte vector loads (no copies)."""
        cell = self.mlstm_cell
        pad = 16 if _pad_projection_columns(self.proj_up.weight.device) else 1
        return fold_weights(self.q_proj, self.k_proj, self.v_proj, cell.igate, cell.fgate,
                            cell.num_heads, pad)

    def _cached_fused_weights(self):
        """``_fused_weights`` rebuilt only when a parameter changed, while no gradient is
        needed (inference); with autograd or under torch.compile they are rebuilt every call."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._fused_weights()
        cell = self.mlstm_cell
        params = [cell.igate.weight, cell.igate.bias, cell.fgate.weight, cell.fgate.bias]
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            params += [proj.weight] + ([proj.bias] if proj.bias is not None else [])
        key = (torch.is_inference_mode_enabled(),) + tuple((p._version, p.data_ptr(), p.dtype)
                                                           for p in params)
        cache = self.__dict__.get("_fused_cache")
        if cache is None or cache[0] != key:
            cache = (key, self._fused_weights())
            self.__dict__["_fused_cache"] = cache
        return cache[1]

    def forward(self, x, grid=None):
        B, S, _ = x.shape
        inner = self.inner_dim
        NH = self.mlstm_cell.num_heads
        DH = inner // NH
        G = 2 * NH
        # a split, not slices (every slice's backward would zero-fill a full-size gradient and
        # autograd would add them up); its backward takes over the buffer the fused gating's
        # backward wrote dz into (see _SplitColumns)
        x_m, z = _split_columns(self.proj_up(x), [inner, inner])
        if _use_triton_fused(x) and isinstance(self.conv, SequenceConv2d) and self.conv.fusable():
            a = self.conv.forward_silu_fused(x_m, grid, reverse=self.reverse)   # one pass
        else:
            c = self.conv(x_m, grid, reverse=self.reverse)
            a = F.silu(c, inplace=not torch.is_grad_enabled())
        w_a, w_x, b_a, b_x, const = self._cached_fused_weights()
        qkg, vg = _per_head_linear(a, w_a, b_a), _per_head_linear(x_m, w_x, b_x)  # (NH, B*S, .)
        q, k, g_a, _ = _split_columns(qkg, [DH, DH, G, qkg.shape[-1] - 2 * DH - G])
        v, g_x, _ = _split_columns(vg, [DH, G, vg.shape[-1] - DH - G])
        # (B, NH, S) each, contiguous as the kernels read them (one copy for both; split views
        # of a (B, 2 NH, S) tensor would each be copied again inside the cell)
        gates = (g_a.sum(0) + g_x.sum(0) + const).view(B, S, 2, NH).permute(2, 0, 3, 1)
        i, f = gates.contiguous().unbind(0)
        heads = lambda t: t.view(NH, B, S, -1).transpose(0, 1)         # (B, NH, S, .) view
        q, k, v = heads(q), heads(k), heads(v)         # views: every backend reads them in place
        h = vil_kernels.mlstm(q, k, v, i, f, reverse=self.reverse,
                              backend=self.mlstm_backend, chunk_size=self.mlstm_chunk_size,
                              recompute_states=self.mlstm_recompute_states)
        if _use_triton_fused(x):
            out = triton_gating.gated_outnorm_triton(h, self.mlstm_cell.outnorm,
                                                     self.learnable_skip, a, z)
        else:
            out = gated_outnorm(h, self.mlstm_cell.outnorm, self.learnable_skip, a, z)
        return self.proj_down(out)

    def forward_reference(self, x, grid=None):
        """The reference's op order (cat(q, k, v) gate linear, headwise einsums), for checks."""
        inner = self.inner_dim
        xz = self.proj_up(x)
        x_m, z = xz[..., :inner], xz[..., inner:]
        a = F.silu(self.conv(x_m, grid, reverse=self.reverse))
        q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(x_m)
        h = self.mlstm_cell(q, k, v, reverse=self.reverse, backend=self.mlstm_backend,
                            chunk_size=self.mlstm_chunk_size)
        return self.proj_down((h + self.learnable_skip * a) * F.silu(z))


def _split_columns(t, sizes):
    """``t.split(sizes, -1)``; in eager mode with a backward that takes over a gradient buffer
    the cell laid out like t instead of concatenating (_SplitColumns). The plain split under
    torch.compile (inductor plans the copies itself) and torch.func transforms."""
    if (torch.compiler.is_compiling() or transforms_active()
            or not (torch.is_grad_enabled() and t.requires_grad)):
        return t.split(sizes, dim=-1)
    return _SplitColumns.apply(t, sizes)


class _SplitColumns(torch.autograd.Function):
    """Column views of t whose backward returns, without a cat, the buffer laid out like t that
    the backward before it wrote into (vil_kernels.utils.grad_buffer_of): the Triton cell's dq,
    dk or dv for the per-head projections, the fused gating's dz for the up-projection. Pieces
    that arrived as views of it at their columns stay; the others (the gate columns' gradient,
    zeros for the padding, the conv input's gradient) are written into it. Otherwise the plain
    cat. At 448 px these cats were most of the 14.8 ms of copies left in a ViL-T training step
    on an H200 (bench/results/nvidia-h200-profile-model-vil2-tiny-train-s7.json)."""

    @staticmethod
    def forward(ctx, t, sizes):
        ctx.sizes = list(sizes)
        ctx.layout = (t.shape, t.stride(), t.dtype, t.is_contiguous())
        return t.split(ctx.sizes, dim=-1)

    @staticmethod
    def jvp(ctx, t_dot, _):
        # (forward-mode AD: the tangent splits as t does; as views, like the outputs)
        return t_dot.split(ctx.sizes, dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        shape, stride, dtype, contiguous = ctx.layout
        starts = [sum(ctx.sizes[:j]) for j in range(len(ctx.sizes))]

        def at_column(g, buf, c0):
            return (g._base is buf and g.stride() == stride
                    and g.storage_offset() - buf.storage_offset() == c0)

        buf = None
        for g, c0 in zip(grads, starts):
            b = None if g is None or not contiguous else grad_buffer_of(g)
            # (a buffer mirrors the tensor t is a view of, e.g. a linear's 2-D output)
            if (b is not None and b.is_contiguous() and b.numel() == shape.numel()
                    and b.dtype == dtype and at_column(g, b, c0)):
                buf = b
                break
        if buf is None:
            like = next(g for g in grads if g is not None)
            return torch.cat([like.new_zeros(*shape[:-1], n, dtype=dtype) if g is None
                              else g.to(dtype) for g, n in zip(grads, ctx.sizes)], dim=-1), None
        out = buf.view(shape)
        for g, c0, n in zip(grads, starts, ctx.sizes):
            if g is None:
                out[..., c0:c0 + n].zero_()
            elif not at_column(g, buf, c0):
                out[..., c0:c0 + n].copy_(g)
        return out, None


def _pad_projection_columns(device):
    """Pad the fused projections' columns to multiples of 16 (on CUDA, for the Triton kernels;
    on CPU it would only cost GEMM work)."""
    return device.type == "cuda"


# The conv and gating kernels put the batch along a CUDA grid's z axis, which holds at most
# 65535 programs: larger batches take the PyTorch path (vil_kernels' mLSTM runs them in slices).
MAX_FUSED_BATCH = 65535
# Set False for the PyTorch path around the cell everywhere: what second-order gradients need
# (the fused kernels' backward is first-order only and says so when differentiated).
FUSED_KERNELS = True


def _use_triton_fused(x):
    """The fused Triton kernels around the cell (the pre-norm under autocast, conv + SiLU,
    output norm + gating; forward and backward): on CUDA, except under torch.compile (inductor
    fuses the PyTorch path itself), torch.func transforms (their autograd Functions keep what
    torch.func cannot track) and forward-mode AD (the kernels would drop x's tangent), for
    batches over MAX_FUSED_BATCH and with FUSED_KERNELS off."""
    return (FUSED_KERNELS and x.is_cuda and x.shape[0] <= MAX_FUSED_BATCH
            and triton_gating.available() and not torch.compiler.is_compiling()
            and not transforms_active() and not has_tangents((x,)))


def _autocast_dtype(x, other_dtype):
    """The dtype autocast computes a GEMM of x in, or, without autocast, x's promoted with
    other_dtype (for ops that bypass autocast: out= variants, copies into a buffer)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, other_dtype)


def _per_head_linear(t, w, b):
    """(B, S, NH * DH) -> (NH, B * S, P): ``t_h @ w[h] + b[h]`` for each head h, reading ``t`` in
    place (its (B, S) dims must merge: contiguous rows, any row stride), bias fused: one batched
    GEMM on the CPU and under torch.compile, a GEMM a head on CUDA (_per_head_addmm,
    _PerHeadLinear). The (NH, B*S, .) result viewed as (B, NH, S, .) is what the cell takes."""
    B, S, C = t.shape
    NH, DH, P = w.shape
    A = t.reshape(B * S, NH, DH).transpose(0, 1)                      # (NH, B*S, DH) view
    if b is None:
        return torch.bmm(A, w)
    if (t.is_cuda and not torch.compiler.is_compiling() and not transforms_active()
            and not has_tangents((t, w, b))):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (A, w, b)):
            return _PerHeadLinear.apply(A, w, b)
        return _per_head_addmm(A, w, b)
    return torch.baddbmm(b, A, w)


def _per_head_addmm(A, w, b):
    """CUDA inference: one GEMM a head into its slice of the result, the bias added in cuBLASLt's
    epilogue. baddbmm first copies the broadcast bias into the whole (NH, B*S, P) result for the
    GEMM to read back: at 448 px that copy cost more than the GEMMs (an H200 profile of ViL-B:
    46 ms of copies a step against 39 ms of these GEMMs). out= bypasses autocast, so the
    operands are cast here, to what autocast would have made of them."""
    dt = _autocast_dtype(A, w.dtype)
    A, w, b = A.to(dt), w.to(dt), b.to(dt)
    out = A.new_empty(w.shape[0], A.shape[1], w.shape[2])
    for h in range(w.shape[0]):
        torch.addmm(b[h, 0], A[h], w[h], out=out[h])
    return out


class _PerHeadLinear(torch.autograd.Function):
    """``_per_head_addmm`` with its backward (CUDA training): dA a GEMM a head written into the
    columns of one (B*S, NH*DH) buffer, which is the layout of the tensor A is a view of (the
    transposed gradient baddbmm's backward produces took a full copy to get there); dw a GEMM
    a head; db a float32-accumulated sum."""

    @staticmethod
    def forward(ctx, A, w, b):
        out = _per_head_addmm(A, w, b)
        ctx.save_for_backward(A, w)
        ctx.dtypes = (A.dtype, w.dtype, b.dtype, out.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        A, w = ctx.saved_tensors
        a_dt, w_dt, b_dt, dt = ctx.dtypes
        NH, M, DH = A.shape
        dout = dout.to(dt)
        wd = w.to(dt)
        acc = torch.promote_types(dt, torch.float32)         # the bias sum's accumulation
        if torch.is_grad_enabled():
            # create_graph: the same products without out= (which autograd cannot record),
            # so that second-order gradients flow through them
            return (torch.bmm(dout, wd.transpose(1, 2)).to(a_dt)
                    if ctx.needs_input_grad[0] else None,
                    torch.bmm(A.to(dt).transpose(1, 2), dout).to(w_dt)
                    if ctx.needs_input_grad[1] else None,
                    dout.to(acc).sum(1, keepdim=True).to(b_dt)
                    if ctx.needs_input_grad[2] else None)
        dA = dw = db = None
        if ctx.needs_input_grad[0]:
            buf = dout.new_empty(M, NH * DH)
            for h in range(NH):
                torch.mm(dout[h], wd[h].t(), out=buf[:, h * DH:(h + 1) * DH])
            dA = buf.view(M, NH, DH).transpose(0, 1).to(a_dt)           # A's own strides
        if ctx.needs_input_grad[1]:
            # a GEMM a head (K = B*S: cuBLAS splits it); the batched form over the transposed
            # view ran on 32 x 64 tiles at 0.8 ms a call for ViL-T on an H200
            Ad = A.to(dt)
            dw = dout.new_empty(NH, DH, dout.shape[-1])
            for h in range(NH):
                torch.mm(Ad[h].t(), dout[h], out=dw[h])
            dw = dw.to(w_dt)
        if ctx.needs_input_grad[2]:
            db = torch.sum(dout, dim=1, keepdim=True, dtype=acc).to(b_dt)
        return dA, dw, db


class ViLBlock(nn.Module):
    def __init__(self, dim, direction, drop_path=0.0, conv_kind="2d", conv_kernel_size=3,
                 proj_bias=True, norm_bias=True, seqlens=None, num_blocks=None,
                 init_weights="original", mlstm_backend="auto", mlstm_chunk_size=None,
                 mlstm_recompute_states=False):
        super().__init__()
        self.dim = dim
        self.direction = direction
        self.drop_path = DropPath(drop_prob=drop_path)
        self.norm = LayerNorm(dim, weight=True, bias=norm_bias)
        self.layer = ViLLayer(dim, direction, conv_kind=conv_kind,
                              conv_kernel_size=conv_kernel_size, seqlens=seqlens,
                              norm_bias=norm_bias, proj_bias=proj_bias, num_blocks=num_blocks,
                              init_weights=init_weights, mlstm_backend=mlstm_backend,
                              mlstm_chunk_size=mlstm_chunk_size,
                              mlstm_recompute_states=mlstm_recompute_states)

    def reset_parameters(self):
        self.layer.reset_parameters()
        self.norm.reset_parameters()

    def _forward_path(self, x, grid=None):
        return self.layer(self._pre_norm(x), grid)

    def _pre_norm(self, x):
        """The norm before the layer. On CUDA under autocast, in the tokens' 16-bit dtype in one
        pass (vil.triton_norm; the same values the up-projection would get)."""
        if (x.dtype in (torch.float16, torch.bfloat16) and _use_triton_fused(x)
                and torch.is_autocast_enabled(x.device.type)):
            n = self.norm
            return triton_norm.layer_norm_triton(x, n.weight_proxy, n.bias, n.eps)
        return self.norm(x)

    def forward(self, x, grid=None):
        return self.drop_path(x, self._forward_path, grid=grid)


class ViLBlockPair(nn.Module):
    def __init__(self, dim, drop_path=0.0, **kwargs):
        super().__init__()
        self.rowwise_from_top_left = ViLBlock(
            dim, SequenceTraversal.ROWWISE_FROM_TOP_LEFT, drop_path=drop_path, **kwargs)
        self.rowwise_from_bot_right = ViLBlock(
            dim, SequenceTraversal.ROWWISE_FROM_BOT_RIGHT, drop_path=drop_path, **kwargs)

    def forward(self, x, grid=None):
        return self.rowwise_from_bot_right(self.rowwise_from_top_left(x, grid), grid)


class PatchEmbed(nn.Module):
    """Conv patch embedding (key ``patch_embed.proj``); any input whose size minus the patch is a
    multiple of the stride (for stride == patch: a multiple of the patch)."""

    def __init__(self, dim, num_channels, resolution, patch_size, stride=None):
        super().__init__()
        self.resolution = to_2tuple(resolution)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride) if stride is not None else self.patch_size
        for name, pair in (("patch size", self.patch_size), ("stride", self.stride),
                           ("resolution", self.resolution)):
            if min(pair) < 1:
                raise ValueError(f"{name} must be positive, got {pair}")
        for r, p in zip(self.resolution, self.patch_size):
            if r % p:
                raise ValueError(f"resolution {self.resolution} is not divisible by the patch "
                                 f"size {self.patch_size}")
        # The position embedding's stored grid (the reference's `seqlens`): resolution / patch.
        self.seqlens = [r // p for r, p in zip(self.resolution, self.patch_size)]
        self.grid = self.grid_size(self.resolution)                   # tokens at `resolution`
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(num_channels, dim, kernel_size=self.patch_size, stride=self.stride)
        self.reset_parameters()

    def grid_size(self, hw):
        out = []
        for n, p, s in zip(hw, self.patch_size, self.stride):
            if n < p or (n - p) % s:
                raise ValueError(
                    f"input size {tuple(hw)} does not fit patch size {self.patch_size} and stride "
                    f"{self.stride}: each side must be >= the patch and (side - patch) a multiple "
                    f"of the stride")
            out.append((n - p) // s + 1)
        return tuple(out)

    def reset_parameters(self):
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def check_images(self, x):
        """A clear error for what the conv or the patch GEMM would reject cryptically, or take
        silently (uint8 pixels cast to float, a batch without its batch dim)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}"
                             + (" (add the batch dim: x[None])" if x.dim() == 3 else ""))
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalized pixels), got "
                            f"{x.dtype}; convert and normalize them first "
                            f"(vil.data.build_transform)")
        weight = self.proj.weight.dtype
        if x.dtype.itemsize > weight.itemsize and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"images are {x.dtype} but the model's weights are {weight}: cast "
                            f"the images (x.to({weight})) or the model")
        if x.shape[1] != self.proj.in_channels:
            raise ValueError(f"images have {x.shape[1]} channels, the model takes "
                             f"{self.proj.in_channels} (shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise ValueError(f"an empty batch of images: shape {tuple(x.shape)}")

    def forward(self, x):
        self.check_images(x)
        self.grid_size(x.shape[-2:])
        return self.proj(x)                                            # (B, dim, H', W')

    def tokens(self, x):
        """``forward`` as row-major tokens (B, H' * W', dim), and the grid (H', W'). Patches
        that do not overlap (stride == patch) go through one GEMM: the pixels are gathered into
        patch rows by one copy (cast to autocast's dtype on the way) and multiplied by the conv
        weight with the bias in the GEMM's epilogue; cuDNN ran this conv as a generic implicit
        GEMM, 3.2 ms of a 54 ms ViL-T step at 448 px on an H200."""
        self.check_images(x)
        H, W = self.grid_size(x.shape[-2:])
        if self.stride != self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2), (H, W)
        B, C = x.shape[:2]
        ph, pw = self.patch_size
        dtype = _autocast_dtype(x, self.proj.weight.dtype)
        rows = x.view(B, C, H, ph, W, pw).permute(0, 2, 4, 1, 3, 5)
        if transforms_active():        # (torch.func refuses a copy into an untracked tensor)
            patches = rows.to(dtype).contiguous()
        else:
            patches = torch.empty(B, H, W, C, ph, pw, device=x.device, dtype=dtype)
            patches.copy_(rows)
        w = self.proj.weight.reshape(self.proj.out_channels, C * ph * pw)
        y = F.linear(patches.view(B * H * W, C * ph * pw), w, self.proj.bias)
        return y.view(B, H * W, -1), (H, W)


class PosEmbed2d(nn.Module):
    """Learnable (1, H, W, dim) position embedding (key ``pos_embed.embed``), bicubically resized
    to the token grid of the input; the resized copy is cached per grid while it needs no grad."""

    def __init__(self, seqlens, dim):
        super().__init__()
        self.seqlens = list(seqlens)
        self.dim = dim
        self.embed = nn.Parameter(torch.zeros(1, *seqlens, dim))
        self._cache = {}
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.embed, std=0.02)
        self._cache = {}

    def get(self, grid, dtype=None):
        """The embedding at ``grid`` as (1, H, W, dim)."""
        grid = tuple(int(g) for g in grid)
        if grid == tuple(self.embed.shape[1:3]):
            e = self.embed
        elif torch.compiler.is_compiling() or (torch.is_grad_enabled() and self.embed.requires_grad):
            e = interpolate_pos_embed(self.embed, grid)
        else:
            key = (grid, self.embed.device, self.embed.dtype, torch.is_inference_mode_enabled())
            hit = self._cache.get(key)
            if hit is None or hit[0] != self.embed._version or hit[1] != self.embed.data_ptr():
                with torch.no_grad():
                    e = interpolate_pos_embed(self.embed, grid)
                self._cache[key] = (self.embed._version, self.embed.data_ptr(), e)
            else:
                e = hit[2]
        return e if dtype is None else e.to(dtype)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)


_POOLINGS = ("bilateral_flatten", "bilateral_avg", "to_image", None)


class VisionLSTM(nn.Module):
    """Vision-LSTM (ViL) = NX-AI's ``VisionLSTM2``, on ``vil_kernels.mlstm``.

    Every constructor keyword of the reference, with its default, plus:

    Args:
        mlstm_backend: passed to ``vil_kernels.mlstm`` ("auto", "triton", "torch", "parallel",
            "recurrent").
        mlstm_chunk_size: chunk length for the chunkwise backends (None: the operator picks).
        mlstm_recompute_states: the cells recompute their chunk states in the backward instead
            of keeping them (``vil_kernels.mlstm(recompute_states=True)``): less training
            memory, one more state scan a block.
        img_size, num_classes, in_chans: timm-style aliases overriding ``input_shape[1:]``,
            ``output_shape`` and ``input_shape[0]``.
        out_indices: single-block indices (0 .. 2 * depth - 1) whose outputs
            ``forward_intermediates`` returns by default (e.g. (7, 11, 15, 23) for ViL-T/S/B).

    ``depth`` counts block *pairs* (ViL-T/S/B: 12 pairs = 24 blocks). Inputs of any size whose
    sides fit the patch stride run without rebuilding the model.
    """

    def __init__(self, dim=192, input_shape=(3, 224, 224), patch_size=16, depth=12,
                 output_shape=(1000,), mode="classifier", pooling="bilateral_flatten",
                 drop_path_rate=0.0, drop_path_decay=False, stride=None, legacy_norm=False,
                 conv_kind="2d", conv_kernel_size=3, proj_bias=True, norm_bias=True,
                 init_weights="original", mlstm_backend="auto", mlstm_chunk_size=None,
                 mlstm_recompute_states=False, img_size=None, num_classes=None, in_chans=None,
                 out_indices=None):
        if depth == 24 and dim < 1024:
            warnings.warn("VisionLSTM depth counts block pairs: ViL-T/S/B use depth=12 (24 blocks); "
                          "are you sure you want depth=24?")
        super().__init__()
        input_shape = tuple(input_shape)
        if in_chans is not None:
            input_shape = (in_chans,) + input_shape[1:]
        if img_size is not None:
            input_shape = (input_shape[0],) + to_2tuple(img_size)
        if num_classes is not None:
            output_shape = (num_classes,)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
        for name, value in (("dim", dim), ("depth", depth), ("channels", input_shape[0])):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if output_shape is not None and min(tuple(output_shape), default=0) < 0:
            raise ValueError(f"the number of classes must be >= 0, got {tuple(output_shape)}")
        if mode not in ("classifier", "features"):
            raise ValueError(f"mode must be 'classifier' or 'features', got {mode!r}")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if mlstm_backend not in vil_kernels.BACKENDS:
            raise ValueError(f"mlstm_backend must be one of {vil_kernels.BACKENDS}, got {mlstm_backend!r}")
        self.input_shape = input_shape
        self.output_shape = tuple(output_shape) if output_shape is not None else None
        self.patch_size = to_2tuple(patch_size)
        self.dim = dim
        self.depth = depth
        self.stride = stride
        self.mode = mode
        self.pooling = pooling
        self.drop_path_rate = drop_path_rate
        self.drop_path_decay = drop_path_decay
        self.legacy_norm_enabled = legacy_norm
        self.conv_kind = conv_kind
        self.conv_kernel_size = conv_kernel_size
        self.proj_bias = proj_bias
        self.norm_bias = norm_bias
        self.init_weights = init_weights
        self.mlstm_backend = mlstm_backend
        self.mlstm_chunk_size = mlstm_chunk_size
        self.mlstm_recompute_states = mlstm_recompute_states
        self.num_blocks = 2 * depth
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.grad_checkpointing = False                     # set_grad_checkpointing
        self.num_features = self.embed_dim = dim

        self.patch_embed = PatchEmbed(dim, input_shape[0], input_shape[1:], self.patch_size,
                                      stride=stride)
        self.pos_embed = PosEmbed2d(self.patch_embed.seqlens, dim)
        if drop_path_decay and drop_path_rate > 0.0:
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        else:
            dpr = [drop_path_rate] * depth
        self.blocks = nn.ModuleList([
            ViLBlockPair(dim, drop_path=dpr[p], conv_kind=conv_kind,
                         conv_kernel_size=conv_kernel_size, seqlens=self.patch_embed.grid,
                         proj_bias=proj_bias, norm_bias=norm_bias, num_blocks=2 * depth,
                         init_weights=init_weights, mlstm_backend=mlstm_backend,
                         mlstm_chunk_size=mlstm_chunk_size,
                         mlstm_recompute_states=mlstm_recompute_states)
            for p in range(depth)])
        head_dim = 2 * dim if (pooling == "bilateral_flatten" and mode == "classifier") else dim
        self.head_dim = head_dim
        self.norm = LayerNorm(dim, bias=norm_bias, eps=1e-6)
        self.legacy_norm = nn.LayerNorm(head_dim) if legacy_norm else nn.Identity()
        if mode == "features":
            self.head = None
            if pooling not in ("to_image", None):
                warnings.warn(f"mode='features' supports pooling None or 'to_image'; "
                              f"ignoring pooling={pooling!r}")
                self.pooling = None
            g = self.patch_embed.grid
            self.output_shape = ((g[0] * g[1], dim) if self.pooling is None else (dim, *g))
        else:
            if self.output_shape is None or len(self.output_shape) != 1:
                raise ValueError("mode='classifier' needs output_shape=(num_classes,)")
            self.head = nn.Linear(head_dim, self.output_shape[0])
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.num_classes = self.output_shape[0] if mode == "classifier" else 0
        if self.out_indices is not None:
            self._resolve_indices(self.out_indices)         # fail here, not at the first forward

    # ----------------------------------------------------------------------------------- utils
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed.embed"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        """timm-style: a fresh head for ``num_classes`` classes (0: no head, pooled features)."""
        if self.mode != "classifier":
            raise ValueError("reset_classifier needs mode='classifier'")
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.head_dim, num_classes).to(self.norm.weight)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
            self.output_shape = (num_classes,)
        else:
            self.head = None
            self.output_shape = (self.head_dim,)

    def set_mlstm_backend(self, backend, chunk_size=None):
        """Switch every block's cell backend (and chunk size) in place."""
        if backend not in vil_kernels.BACKENDS:
            raise ValueError(f"backend must be one of {vil_kernels.BACKENDS}, got {backend!r}")
        self.mlstm_backend, self.mlstm_chunk_size = backend, chunk_size
        for m in self.modules():
            if isinstance(m, ViLLayer):
                m.mlstm_backend, m.mlstm_chunk_size = backend, chunk_size
        return self

    def grid_size(self, img_hw):
        """Token grid (H', W') for an input of spatial size ``img_hw``."""
        return self.patch_embed.grid_size(img_hw)

    def set_grad_checkpointing(self, enable=True):
        """timm's switch: with it on, every single block's activations are recomputed in the
        backward instead of kept (``torch.utils.checkpoint``, non-reentrant, the RNG state
        preserved for drop path; the same gradients), while autograd records. Parameter
        names and state_dicts are unchanged."""
        self.grad_checkpointing = bool(enable)

    def iter_blocks(self):
        """The 2 * depth single blocks in execution order."""
        for pair in self.blocks:
            yield pair.rowwise_from_top_left
            yield pair.rowwise_from_bot_right

    # --------------------------------------------------------------------------------- forward
    def _embed(self, x):
        tokens, (H, W) = self.patch_embed.tokens(x)                    # (B, H' * W', dim)
        B, S, D = tokens.shape
        pe = self.pos_embed.get((H, W), tokens.dtype).reshape(1, S, D)
        if torch.is_grad_enabled():
            return (tokens + pe).contiguous(), (H, W)
        if tokens.is_contiguous():                                     # the GEMM's own output
            return tokens.add_(pe), (H, W)
        return torch.add(tokens, pe, out=tokens.new_empty(B, S, D)), (H, W)

    def _resolve_indices(self, indices):
        n = self.num_blocks
        if indices is None:
            indices = self.out_indices if self.out_indices is not None else (n - 1,)
        if isinstance(indices, int):                                   # timm: the last n blocks
            indices = tuple(range(n - indices, n))
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"block index {i} out of range for {n} blocks")
            out.append(j)
        return sorted(set(out))

    def forward_features(self, x, return_intermediates=False, out_indices=None,
                         output_fmt="NCHW", norm=False):
        """Tokens after the final norm, (B, S, dim), row-major over the token grid.

        With ``return_intermediates=True``, returns ``(tokens, intermediates)``, the outputs of
        the single blocks ``out_indices`` (default: the constructor's ``out_indices``, else the
        last block) as (B, dim, H', W') maps (``output_fmt="NCHW"``) or (B, S, dim) tokens
        (``"NLC"``); ``norm=True`` applies the final norm to them.
        """
        grid_hw = None
        x, grid_hw = self._embed(x)
        want = set(self._resolve_indices(out_indices)) if return_intermediates else ()
        inter = []
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for idx, block in enumerate(self.iter_blocks()):
            if checkpointed:
                x = checkpoint(block, x, grid_hw, use_reentrant=False)
            else:
                x = block(x, grid_hw)
            if idx in want:
                inter.append(self._format(self.norm(x) if norm else x, grid_hw, output_fmt))
        x = self.norm(x)
        return (x, inter) if return_intermediates else x

    def _format(self, x, grid_hw, output_fmt):
        if output_fmt == "NLC":
            return x
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        B, S, D = x.shape
        return x.transpose(1, 2).reshape(B, D, *grid_hw)

    def forward_intermediates(self, x, indices=None, norm=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm-style: ``(final, intermediates)`` or only the intermediates. ``indices``: list of
        single-block indices (negative from the end) or an int n for the last n blocks."""
        grid_hw = self.grid_size(x.shape[-2:])
        feats, inter = self.forward_features(x, True, indices, output_fmt, norm)
        if intermediates_only:
            return inter
        return self.forward_head(feats, grid=grid_hw), inter

    def forward_head(self, x, pre_logits=False, grid=None):
        """Pooling, legacy norm and head on (B, S, dim) tokens from ``forward_features``."""
        if self.pooling is None:
            x = self.legacy_norm(x)
        elif self.pooling == "to_image":
            x = self.legacy_norm(x)
            B, S, D = x.shape
            H, W = grid if grid is not None else _square(S)
            x = x.transpose(1, 2).reshape(B, D, H, W)
        elif self.pooling == "bilateral_avg":
            x = self.legacy_norm((x[:, 0] + x[:, -1]) / 2)
        else:  # bilateral_flatten
            x = self.legacy_norm(torch.cat([x[:, 0], x[:, -1]], dim=1))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x):
        grid_hw = self.grid_size(x.shape[-2:])
        return self.forward_head(self.forward_features(x), grid=grid_hw)

    # --------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict, strict=True, assign=False):
        """``nn.Module.load_state_dict`` after adapting a ViL state_dict to this model: the
        position embedding is resized to this model's grid; in ``mode="features"`` the
        classifier's head and legacy norm are dropped (with or without ``legacy_norm``). The
        caller's dict is not modified."""
        return super().load_state_dict(self.adapt_state_dict(state_dict), strict=strict,
                                       assign=assign)

    def adapt_state_dict(self, state_dict):
        sd = dict(state_dict)
        key = "pos_embed.embed"
        if key in sd and tuple(sd[key].shape) != tuple(self.pos_embed.embed.shape):
            old = sd[key]
            if old.dim() != 4 or old.shape[0] != 1 or old.shape[-1] != self.dim:
                raise ValueError(f"{key} of shape {tuple(old.shape)} cannot be resized to "
                                 f"{tuple(self.pos_embed.embed.shape)}")
            with torch.no_grad():
                sd[key] = interpolate_pos_embed(old.float(), self.pos_embed.seqlens).to(old.dtype)
        if self.mode == "features":
            sd.pop("head.weight", None)
            sd.pop("head.bias", None)
            own = self.state_dict()
            for k in ("legacy_norm.weight", "legacy_norm.bias"):
                # The classifier's legacy norm acts on the pooled features (2 * dim wide for
                # bilateral_flatten): features use this model's own, as in the reference; and a
                # model without legacy_norm simply drops it (the reference fails there).
                if k in own:
                    sd[k] = own[k]
                else:
                    sd.pop(k, None)
        return sd


def _square(S):
    H = math.isqrt(S)
    if H * H != S:
        raise ValueError(f"{S} tokens are not a square grid; pass grid=(H, W)")
    return H, H
