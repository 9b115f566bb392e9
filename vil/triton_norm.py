"""Triton kernels (CUDA, under autocast): a block's pre-norm in the residual stream's own 16-bit
dtype, forward and backward.

Under autocast, F.layer_norm runs on a float32 copy of the 16-bit tokens and returns float32,
which the up-projection (a 16-bit GEMM) rounds straight back: three passes, two of them at twice
the width, and a float32 gradient path in the backward. This kernel reads the 16-bit rows,
normalises in float32 with the float32 parameters and writes the rounded result once: the values
the GEMM would have received. Backward: one pass over x and dy (statistics recomputed) writing
dx, and per-program partial sums of the parameter gradients reduced in a fixed order
(deterministic). On the CPU it runs only under TRITON_INTERPRET=1 (tests).
"""

import torch

from vil_kernels._triton_runtime import launch
from vil_kernels.utils import cdiv, first_order_only

from ._triton import SECOND_ORDER, available, tiles, tl, triton

__all__ = ["available", "layer_norm_triton"]

# Elements of a program's [rows, N] tile and its warps (the backward's smaller: it spills at
# 4096); ``rows``: rows a backward program walks (its parameter-gradient partial sums are one
# row of N a program). Module state: bench/model_kernels.py --sweep tries others; python -m
# vil.triton_check checks for spills.
CONFIG = dict(tile=4096, num_warps=4, bwd_tile=2048, rows=256)


if triton is not None:
    @triton.jit
    def _normalized(x, o_m, o_n, m, N, sx, eps):
        """[BM, BN] rows of x normalised (float32), zero where masked, and their 1 / std."""
        b_x = tl.load(x + o_m[:, None] * sx + o_n[None, :], mask=m, other=0.).to(tl.float32)
        b_mean = tl.sum(b_x, axis=1) / N
        b_xc = tl.where(m, b_x - b_mean[:, None], 0.)
        b_rstd = 1. / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / N + eps)
        return b_xc * b_rstd[:, None], b_rstd

    @triton.jit
    def _layer_norm_kernel(x, w, b, y, M, N, sx, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
        """Grid (cdiv(M, BM),): BM rows of N a program."""
        o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        m_n = o_n < N
        m = (o_m < M)[:, None] & m_n[None, :]
        b_y, _ = _normalized(x, o_m, o_n, m, N, sx, eps)                # [BM, BN]
        if HAS_W:
            b_y = b_y * tl.load(w + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        if HAS_B:
            b_y = b_y + tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        tl.store(y + o_m[:, None] * N + o_n[None, :], b_y.to(y.dtype.element_ty), mask=m)

    @triton.jit
    def _layer_norm_bwd_kernel(x, w, dy, dx, pw, pb, M, N, sx, eps, HAS_W: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr):
        """Grid (cdiv(M, ROWS),): ROWS rows in [BM, BN] tiles; dy, dx contiguous. Partial sums
        of dy xhat and dy over the program's rows go to row pid of pw, pb [., N]."""
        i_p = tl.program_id(0).to(tl.int64)
        o_n = tl.arange(0, BN)
        m_n = o_n < N
        b_w = tl.full([BN], 1., tl.float32)
        if HAS_W:
            b_w = tl.load(w + o_n, mask=m_n, other=0.).to(tl.float32)
        # [BM, BN] accumulators, reduced over rows once at the end (not a cross-warp reduction
        # a tile)
        acc_w = tl.zeros([BM, BN], dtype=tl.float32)
        acc_b = tl.zeros([BM, BN], dtype=tl.float32)
        for i_r in range(0, ROWS, BM):
            o_m = i_p * ROWS + i_r + tl.arange(0, BM)
            m = (o_m < M)[:, None] & m_n[None, :]
            b_xh, b_rstd = _normalized(x, o_m, o_n, m, N, sx, eps)
            b_dy = tl.load(dy + o_m[:, None] * N + o_n[None, :], mask=m, other=0.).to(tl.float32)
            acc_w += b_dy * b_xh
            acc_b += b_dy
            b_dxh = b_dy * b_w[None, :]
            b_c1 = tl.sum(b_dxh, axis=1) / N
            b_c2 = tl.sum(b_dxh * b_xh, axis=1) / N
            b_dx = b_rstd[:, None] * (b_dxh - b_c1[:, None] - b_xh * b_c2[:, None])
            tl.store(dx + o_m[:, None] * N + o_n[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        tl.store(pw + i_p * N + o_n, tl.sum(acc_w, axis=0), mask=m_n)
        tl.store(pb + i_p * N + o_n, tl.sum(acc_b, axis=0), mask=m_n)


def _forward(x2, weight, bias, eps, shape):
    M, N = x2.shape
    y = torch.empty(shape, device=x2.device, dtype=x2.dtype)
    BM, BN = tiles(N, CONFIG["tile"])
    launch(_layer_norm_kernel, (cdiv(M, BM),),
           (x2, weight if weight is not None else x2, bias if bias is not None else x2, y, M, N,
            x2.stride(0), eps),
           HAS_W=weight is not None, HAS_B=bias is not None, BM=BM, BN=BN,
           num_warps=CONFIG["num_warps"])
    return y


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, eps, shape):
        ctx.save_for_backward(x2, weight)
        ctx.anchors = (bias,)                       # (first_order_only)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        return _forward(x2, weight, bias, eps, shape)

    @staticmethod
    @first_order_only(SECOND_ORDER.format("pre-norm"))
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        M, N = x2.shape
        dy = dy.reshape(M, N).contiguous()
        dx = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        BM, BN = tiles(N, CONFIG["bwd_tile"])
        rows = max(BM, CONFIG["rows"] // BM * BM)
        NP = cdiv(M, rows)
        pw, pb = (torch.empty(NP, N, device=x2.device, dtype=torch.float32) for _ in range(2))
        launch(_layer_norm_bwd_kernel, (NP,),
               (x2, weight if weight is not None else x2, dy, dx, pw, pb, M, N, x2.stride(0),
                ctx.eps),
               HAS_W=weight is not None, BM=BM, BN=BN, ROWS=rows, num_warps=CONFIG["num_warps"])
        dw = pw.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] \
            else None
        db = pb.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None \
            and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def layer_norm_triton(x, weight, bias, eps):
    """F.layer_norm over the last dim of x (..., N), in x's dtype: float32 statistics and
    parameters, one rounding at the end. Returns a new contiguous tensor, differentiable in x,
    weight and bias."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    args = (x2, w, b, float(eps), x.shape)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, w, b)):
        return _LayerNorm.apply(*args)
    return _forward(*args)
