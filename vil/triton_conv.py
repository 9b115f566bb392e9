"""Triton kernels (CUDA): ViL's depthwise 2-D sequence conv, its bias and the SiLU after it,
fused, forward and backward.

    a[b, y*W + x, c] = silu(bias[c] + sum_{i,j} w[c, i, j] * t[b, (y+i-P)*W + (x+j-Q), c])

over the (H, W) token grid (zero padding P = KH // 2, Q = KW // 2), with t read in place: it is
the strided half of the up-projection's output, which cuDNN would first copy into a
channels-last buffer, then convolve, then add the bias in a broadcast pass, then apply the SiLU
in a fourth. Here: one read of t (the taps' overlap hits the cache), one write of a. Backward:
one pass recomputes the conv, forms dc = da * silu'(c) and the per-program partial sums of the
weight and bias gradients (reduced in a fixed order: deterministic); dt is then the same conv
kernel on dc with the kernel rotated by 180 degrees, without bias and SiLU. On the CPU it runs
only under TRITON_INTERPRET=1 (tests).
"""

import torch

from vil_kernels.triton._interp import patch_interpreter

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the PyTorch path is used
    triton = None

__all__ = ["available", "conv_silu_triton"]

# [grid columns, channels] a program (16-byte loads along the channels) and its warps; the
# backward's strips are narrower (bwd_BW: 32 columns spilled). Module state so that
# bench/model_kernels.py --sweep can try others; python -m vil.triton_check checks for spills.
CONFIG = dict(BW=32, BC=64, num_warps=4, bwd_BW=16)


def available():
    return triton is not None


if triton is not None:
    @triton.jit
    def _conv_row(p_t, i_y, o_x, o_c, m_c, w, H, W, st_s,
                  KH: tl.constexpr, KW: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
        """[BW, BC] conv of grid row i_y (float32, no bias)."""
        b_acc = tl.zeros([BW, BC], dtype=tl.float32)
        for i in tl.static_range(KH):
            y = i_y + i - KH // 2
            for j in tl.static_range(KW):
                x = o_x + j - KW // 2
                m = ((x >= 0) & (x < W) & (y >= 0) & (y < H))[:, None] & m_c[None, :]
                b_t = tl.load(p_t + (y * W + x)[:, None] * st_s + o_c[None, :], mask=m, other=0.)
                b_w = tl.load(w + o_c * (KH * KW) + i * KW + j, mask=m_c, other=0.)   # [BC]
                b_acc += b_t.to(tl.float32) * b_w.to(tl.float32)[None, :]
        return b_acc

    @triton.jit
    def _conv_silu_kernel(t, w, bias, a, H, W, C, st_b, st_s, sa_b, sa_s,
                          KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SILU: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
        """Grid (H * cdiv(W, BW), cdiv(C, BC), B): BW tokens of one grid row, BC channels."""
        NWB = tl.cdiv(W, BW)
        i_p, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_y = i_p // NWB
        o_x = (i_p % NWB) * BW + tl.arange(0, BW)                    # [BW] grid columns
        o_c = i_c * BC + tl.arange(0, BC)                            # [BC] channels
        m_x, m_c = o_x < W, o_c < C
        b_acc = _conv_row(t + i_b * st_b, i_y, o_x, o_c, m_c, w, H, W, st_s, KH, KW, BW, BC)
        if HAS_BIAS:
            b_acc += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
        if SILU:
            b_acc = b_acc / (1. + tl.exp(-b_acc))
        tl.store(a + i_b * sa_b + (i_y * W + o_x)[:, None] * sa_s + o_c[None, :],
                 b_acc.to(a.dtype.element_ty), mask=m_x[:, None] & m_c[None, :])

    @triton.jit
    def _conv_silu_bwd_kernel(t, w, bias, da, dc, pw, pb, H, W, C, st_b, st_s,
                              KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BW: tl.constexpr, BC: tl.constexpr, BKK: tl.constexpr):
        """Grid (cdiv(W, BW), cdiv(C, BC), B): a strip of BW grid columns and BC channels over
        every grid row. dc = da * silu'(c) (c recomputed); da, dc contiguous (B, H * W, C). The
        strip's sums of dc t (per tap) and dc go to row i_b * cdiv(W, BW) + i_w of pw
        [., KH * KW, C] and pb [., C]."""
        i_w, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        o_x = i_w * BW + tl.arange(0, BW)
        o_c = i_c * BC + tl.arange(0, BC)
        m_x, m_c = o_x < W, o_c < C
        o_kk = tl.arange(0, BKK)
        p_t = t + i_b * st_b
        b_bias = tl.zeros([BC], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)
        acc_w = tl.zeros([BKK, BC], dtype=tl.float32)
        acc_b = tl.zeros([BC], dtype=tl.float32)
        for i_y in range(H):
            b_c = _conv_row(p_t, i_y, o_x, o_c, m_c, w, H, W, st_s, KH, KW, BW, BC) \
                + b_bias[None, :]
            o_xc = i_b * H * W * C + (i_y * W + o_x)[:, None] * C + o_c[None, :]
            m_xc = m_x[:, None] & m_c[None, :]
            b_da = tl.load(da + o_xc, mask=m_xc, other=0.).to(tl.float32)
            b_sg = 1. / (1. + tl.exp(-b_c))
            b_dc = b_da * b_sg * (1. + b_c * (1. - b_sg))            # [BW, BC], 0 off the grid
            tl.store(dc + o_xc, b_dc.to(dc.dtype.element_ty), mask=m_xc)
            acc_b += tl.sum(b_dc, axis=0)
            for i in tl.static_range(KH):
                y = i_y + i - KH // 2
                for j in tl.static_range(KW):
                    x = o_x + j - KW // 2
                    m = ((x >= 0) & (x < W) & (y >= 0) & (y < H))[:, None] & m_c[None, :]
                    b_t = tl.load(p_t + (y * W + x)[:, None] * st_s + o_c[None, :], mask=m,
                                  other=0.).to(tl.float32)
                    b_tap = tl.sum(b_dc * b_t, axis=0)                # [BC]
                    acc_w += tl.where(o_kk[:, None] == i * KW + j, b_tap[None, :], 0.)
        o_r = i_b * tl.num_programs(0) + i_w
        tl.store(pw + (o_r * (KH * KW) + o_kk[:, None]) * C + o_c[None, :], acc_w,
                 mask=(o_kk < KH * KW)[:, None] & m_c[None, :])
        tl.store(pb + o_r * C + o_c, acc_b, mask=m_c)


def _check(t, weight, grid):
    B, S, C = t.shape
    H, W = grid
    KH, KW = weight.shape[-2:]
    if H * W != S or weight.shape[0] != C or KH % 2 == 0 or KW % 2 == 0:
        raise ValueError(f"conv_silu_triton: tokens {tuple(t.shape)}, grid {tuple(grid)} and "
                         f"weight {tuple(weight.shape)} do not fit a depthwise odd-kernel conv")


def _conv(t, w, b, grid, silu):
    """The forward kernel: silu(conv(t) + b) (or the bare conv) into a new (B, S, C) tensor."""
    B, S, C = t.shape
    H, W = grid
    KH, KW = w.shape[-2:]
    a = torch.empty(B, S, C, device=t.device, dtype=t.dtype)
    BW, BC = CONFIG["BW"], CONFIG["BC"]
    _conv_silu_kernel[(H * triton.cdiv(W, BW), triton.cdiv(C, BC), B)](
        t, w, b if b is not None else w, a, H, W, C, t.stride(0), t.stride(1), a.stride(0),
        a.stride(1), KH=KH, KW=KW, HAS_BIAS=b is not None, SILU=silu, BW=BW, BC=BC,
        num_warps=CONFIG["num_warps"])
    return a


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, w, b, grid):
        ctx.save_for_backward(t, w, b)
        ctx.grid = grid
        return _conv(t, w, b, grid, silu=True)

    @staticmethod
    def backward(ctx, da):
        t, w, b = ctx.saved_tensors
        B, S, C = t.shape
        H, W = ctx.grid
        KH, KW = w.shape[-2:]
        da = da.contiguous()
        dc = torch.empty(B, S, C, device=t.device, dtype=t.dtype)
        BW, BC = CONFIG["bwd_BW"], CONFIG["BC"]
        NWB = triton.cdiv(W, BW)
        pw = torch.empty(B * NWB, KH * KW, C, device=t.device, dtype=torch.float32)
        pb = torch.empty(B * NWB, C, device=t.device, dtype=torch.float32)
        patch_interpreter()                                # a loop over H under the interpreter
        _conv_silu_bwd_kernel[(NWB, triton.cdiv(C, BC), B)](
            t, w, b if b is not None else w, da, dc, pw, pb, H, W, C, t.stride(0), t.stride(1),
            KH=KH, KW=KW, HAS_BIAS=b is not None, BW=BW, BC=BC,
            BKK=triton.next_power_of_2(KH * KW), num_warps=CONFIG["num_warps"])
        # the transposed depthwise conv = the conv with the kernel rotated by 180 degrees
        dt = _conv(dc, w.flip(-1, -2).contiguous(), None, ctx.grid, silu=False) \
            if ctx.needs_input_grad[0] else None
        dw = pw.sum(0).t().reshape(w.shape).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = pb.sum(0).to(b.dtype) if b is not None and ctx.needs_input_grad[2] else None
        return dt, dw, db, None


def conv_silu_triton(t, weight, bias, grid):
    """silu(depthwise conv2d(t) + bias) of tokens t (B, H * W, C), any row strides with unit
    channel stride, on the (H, W) grid: weight (C, 1, KH, KW) with odd sides, stride 1,
    dilation 1, zero padding (KH // 2, KW // 2) (the caller checks the conv is of that kind and
    flips the weight for reverse traversal). Weight and bias are rounded to t's dtype first, as
    autocast would for the conv. Returns a new contiguous (B, H * W, C) tensor in t's dtype,
    differentiable in t, weight and bias."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    _check(t, weight, grid)
    if t.stride(-1) != 1:
        t = t.contiguous()
    w = weight.to(t.dtype).contiguous()
    b = bias.to(t.dtype).contiguous() if bias is not None else None
    grid = tuple(grid)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (t, w, b)):
        return _ConvSilu.apply(t, w, b, grid)
    return _conv(t, w, b, grid, silu=True)
