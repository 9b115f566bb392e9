"""Triton kernels (CUDA): ViL's depthwise 2-D sequence conv, its bias and the SiLU after it,
fused, forward and backward.

    a[b, y*W + x, c] = silu(bias[c] + sum_{i,j} w[c, i, j] * t[b, (y+i-P)*W + (x+j-Q), c])

over the (H, W) token grid (zero padding P = KH // 2, Q = KW // 2), with t read in place: it is
the strided half of the up-projection's output, which cuDNN would first copy into a
channels-last buffer, then convolve, then add the bias in a broadcast pass, then apply the SiLU
in a fourth. Here: one read of t (the taps' overlap hits the cache), one write of a. Backward,
all by the same kernel but the last: dc = da * silu'(c) with the conv recomputed; dt = the
conv of dc with the kernel rotated by 180 degrees; the weight gradient one program a tap,
channel block and image, with one program more for the bias gradient, reduced over images
in a fixed order (deterministic). On the CPU it runs only under TRITON_INTERPRET=1 (tests).
"""

import torch

from vil_kernels._triton_runtime import launch
from vil_kernels.utils import cdiv, first_order_only

from ._triton import SECOND_ORDER, available, tl, triton

__all__ = ["available", "conv_silu_triton"]

# [grid columns, channels] a program (16-byte loads along the channels) and its warps: 16 x 128
# over 2 warps was the fastest of 27 on an H200 at ViL-T/S/B widths (9% ahead of 32 x 64 over
# 4); bwd_BW: the weight-gradient kernel's columns a tile. RB: grid rows a program of the
# conv kernels for 3-row kernels (ViL's 3 x 3): above 1 the rolling form (_conv_rows_kernel),
# which loads each input row once for the three output rows it feeds (KW loads an output row
# instead of 3 KW), at rows_warps warps (at 2 its five [16, 128] float32 tiles spill); not
# timed on a GPU yet, so 1. Module state so that bench/model_kernels.py --sweep can try
# others; python -m vil.triton_check checks for spills. (At 2 warps, 32 values a thread and
# nine taps, the sm_90 builds take 168-255 registers on Triton 3.6 to 3.9 without a spill, at
# the launch's specialization: widths and strides multiples of 16. Built unspecialized, 3.8
# and 3.9 spilled 450-610 bytes, which once made them run 4 warps.)
CONFIG = dict(BW=16, BC=128, num_warps=2, bwd_BW=16, RB=1, rows_warps=4)


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
    def _conv_silu_kernel(t, w, bias, da, a, H, W, C, st_b, st_s, sa_b, sa_s,
                          KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACT: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
        """Grid (H * cdiv(W, BW), cdiv(C, BC), B): BW tokens of one grid row, BC channels.
        c = conv(t) + bias, then by ACT: 0 writes c, 1 silu(c), 2 da * silu'(c) (the backward's
        dc; da contiguous like a)."""
        NWB = tl.cdiv(W, BW)
        i_p, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_y = i_p // NWB
        o_x = (i_p % NWB) * BW + tl.arange(0, BW)                    # [BW] grid columns
        o_c = i_c * BC + tl.arange(0, BC)                            # [BC] channels
        m_x, m_c = o_x < W, o_c < C
        b_acc = _conv_row(t + i_b * st_b, i_y, o_x, o_c, m_c, w, H, W, st_s, KH, KW, BW, BC)
        if HAS_BIAS:
            b_acc += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
        o_a = i_b * sa_b + (i_y * W + o_x)[:, None] * sa_s + o_c[None, :]
        _conv_out(b_acc, da, a, o_a, m_x[:, None] & m_c[None, :], ACT)

    @triton.jit
    def _conv_out(b_acc, da, a, o_a, m_a, ACT: tl.constexpr):
        """Store a [BW, BC] conv c (bias added) at o_a by ACT: 0 c, 1 silu(c), 2 da * silu'(c)."""
        if ACT == 1:
            b_acc = b_acc / (1. + tl.exp(-b_acc))
        elif ACT == 2:
            b_sg = 1. / (1. + tl.exp(-b_acc))
            b_acc = tl.load(da + o_a, mask=m_a, other=0.).to(tl.float32) * b_sg \
                * (1. + b_acc * (1. - b_sg))
        tl.store(a + o_a, b_acc.to(a.dtype.element_ty), mask=m_a)

    @triton.jit
    def _conv_taps_row(p_t, r, o_x, m_c, o_c, w, H, W, st_s, KW: tl.constexpr,
                       BW: tl.constexpr, BC: tl.constexpr):
        """Input grid row r's terms, float32 [BW, BC] each, for the output rows it feeds in a
        3-row kernel: r + 1 (kernel row 0), r (row 1) and r - 1 (row 2); KW loads of it."""
        b_0 = tl.zeros([BW, BC], dtype=tl.float32)
        b_1 = tl.zeros([BW, BC], dtype=tl.float32)
        b_2 = tl.zeros([BW, BC], dtype=tl.float32)
        for j in tl.static_range(KW):
            x = o_x + j - KW // 2
            m = ((x >= 0) & (x < W) & (r >= 0) & (r < H))[:, None] & m_c[None, :]
            b_t = tl.load(p_t + (r * W + x)[:, None] * st_s + o_c[None, :], mask=m,
                          other=0.).to(tl.float32)                  # [BW, BC]
            p_w = w + o_c * (3 * KW) + j
            b_0 += b_t * tl.load(p_w, mask=m_c, other=0.).to(tl.float32)[None, :]
            b_1 += b_t * tl.load(p_w + KW, mask=m_c, other=0.).to(tl.float32)[None, :]
            b_2 += b_t * tl.load(p_w + 2 * KW, mask=m_c, other=0.).to(tl.float32)[None, :]
        return b_0, b_1, b_2

    @triton.jit
    def _conv_rows_kernel(t, w, bias, da, a, H, W, C, st_b, st_s, sa_b, sa_s,
                          KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                          BW: tl.constexpr, BC: tl.constexpr, RB: tl.constexpr):
        """_conv_silu_kernel for kernels of 3 rows, RB grid rows a program: grid
        (cdiv(H, RB) * cdiv(W, BW), cdiv(C, BC), B). It walks the input rows from y0 - 1 to
        y0 + RB, loads each once (KW shifted tiles) and adds its terms to the two output rows
        still open (carried as b_lo, row r - 1, and b_hi, row r), so an output row costs KW
        loads instead of 3 KW; row r - 1 is complete once row r is in and is written then."""
        NWB = tl.cdiv(W, BW)
        i_p, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        y0 = (i_p // NWB) * RB
        o_x = (i_p % NWB) * BW + tl.arange(0, BW)                    # [BW] grid columns
        o_c = i_c * BC + tl.arange(0, BC)                            # [BC] channels
        m_x, m_c = o_x < W, o_c < C
        p_t = t + i_b * st_b
        b_bias = tl.zeros([BC], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)
        # input row y0 - 1 feeds output row y0 (kernel row 0) only
        b_hi = _conv_taps_row(p_t, y0 - 1, o_x, m_c, o_c, w, H, W, st_s, KW, BW, BC)[0]
        b_lo = tl.zeros([BW, BC], dtype=tl.float32)
        for r in range(y0, y0 + RB + 1):
            b_0, b_1, b_2 = _conv_taps_row(p_t, r, o_x, m_c, o_c, w, H, W, st_s, KW, BW, BC)
            # output row r - 1 is complete: its bias, activation, store
            y = r - 1
            o_a = i_b * sa_b + (y * W + o_x)[:, None] * sa_s + o_c[None, :]
            _conv_out(b_lo + b_2 + b_bias[None, :], da, a, o_a,
                      (m_x & (y >= y0) & (y < H))[:, None] & m_c[None, :], ACT)
            b_lo = b_hi + b_1
            b_hi = b_0

    @triton.jit
    def _conv_dw_kernel(t, dc, pw, H, W, C, st_b, st_s,
                        KH: tl.constexpr, KW: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
        """Grid (KH * KW (+ 1), cdiv(C, BC), B): one tap's weight gradient over one image,
        sum_p dc[p] t[p + tap], for BC channels, into pw [B, KH * KW (+ 1), C]. dc contiguous.
        The taps of an image run side by side and share its reads in L2; a [BW, BC]
        accumulator is reduced once at the end. A program past the last tap (the launcher
        adds one where the bias needs a gradient) reads 1 for t: its sum is the image's part
        of the bias gradient (a separate reduction over all of dc ran at a fraction of HBM
        bandwidth; an accumulator of its own in every program spilled)."""
        i_k, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        tap = i_k < KH * KW
        di = tl.where(tap, i_k // KW - KH // 2, 0)
        dj = tl.where(tap, i_k % KW - KW // 2, 0)
        o_c = i_c * BC + tl.arange(0, BC)
        m_c = o_c < C
        p_t, p_dc = t + i_b * st_b, dc + i_b * H * W * C
        acc = tl.zeros([BW, BC], dtype=tl.float32)
        for i_y in range(H):
            y = i_y + di
            for x0 in range(0, W, BW):
                o_x = x0 + tl.arange(0, BW)
                x = o_x + dj
                m_xc = (o_x < W)[:, None] & m_c[None, :]
                m = ((x >= 0) & (x < W) & (y >= 0) & (y < H))[:, None] & m_xc
                b_dc = tl.load(p_dc + (i_y * W + o_x)[:, None] * C + o_c[None, :], mask=m,
                               other=0.).to(tl.float32)
                # (1 where not loaded: dc is 0 there, but in the bias program everywhere)
                b_t = tl.load(p_t + (y * W + x)[:, None] * st_s + o_c[None, :], mask=m & tap,
                              other=1.).to(tl.float32)
                acc += b_dc * b_t
        tl.store(pw + (i_b * tl.num_programs(0) + i_k) * C + o_c, tl.sum(acc, axis=0),
                 mask=m_c)


def _check(t, weight, grid):
    B, S, C = t.shape
    H, W = grid
    KH, KW = weight.shape[-2:]
    if H * W != S or weight.shape[0] != C or KH % 2 == 0 or KW % 2 == 0:
        raise ValueError(f"conv_silu_triton: tokens {tuple(t.shape)}, grid {tuple(grid)} and "
                         f"weight {tuple(weight.shape)} do not fit a depthwise odd-kernel conv")


def _conv(t, w, b, grid, act, da=None):
    """The conv kernel into a new (B, S, C) tensor: silu(conv(t) + b) (act 1), the bare conv
    (0), or da * silu'(conv(t) + b) (2)."""
    B, S, C = t.shape
    H, W = grid
    KH, KW = w.shape[-2:]
    a = torch.empty(B, S, C, device=t.device, dtype=t.dtype)
    BW, BC, RB = CONFIG["BW"], CONFIG["BC"], CONFIG["RB"]
    args = (t, w, b if b is not None else w, da if da is not None else a, a, H, W, C,
            t.stride(0), t.stride(1), a.stride(0), a.stride(1))
    if KH == 3 and RB > 1:
        launch(_conv_rows_kernel, (cdiv(H, RB) * cdiv(W, BW), cdiv(C, BC), B), args,
               KW=KW, HAS_BIAS=b is not None, ACT=act, BW=BW, BC=BC, RB=RB,
               num_warps=CONFIG["rows_warps"])
    else:
        launch(_conv_silu_kernel, (H * cdiv(W, BW), cdiv(C, BC), B), args,
               KH=KH, KW=KW, HAS_BIAS=b is not None, ACT=act, BW=BW, BC=BC,
               num_warps=CONFIG["num_warps"])
    return a


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, w, b, grid):
        ctx.save_for_backward(t, w, b)
        ctx.grid = grid
        return _conv(t, w, b, grid, act=1)

    @staticmethod
    @first_order_only(SECOND_ORDER.format("conv + SiLU"))
    def backward(ctx, da):
        t, w, b = ctx.saved_tensors
        B, S, C = t.shape
        H, W = ctx.grid
        KH, KW = w.shape[-2:]
        dc = _conv(t, w, b, ctx.grid, act=2, da=da.contiguous())   # da * silu'(c), c recomputed
        # the transposed depthwise conv = the conv with the kernel rotated by 180 degrees
        dt = _conv(dc, w.flip(-1, -2).contiguous(), None, ctx.grid, act=0) \
            if ctx.needs_input_grad[0] else None
        dw = db = None
        want_dw, want_db = ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        if want_dw or want_db:
            # the taps' sums (and the bias's, one program more) a channel block and image,
            # then summed over images in a fixed order (a frozen weight's taps run anyway:
            # rare enough to keep one kernel)
            NK = KH * KW + want_db
            pw = torch.empty(B, NK, C, device=t.device, dtype=torch.float32)
            BC = CONFIG["BC"]
            launch(_conv_dw_kernel, (NK, cdiv(C, BC), B),
                   (t, dc, pw, H, W, C, t.stride(0), t.stride(1)),
                   KH=KH, KW=KW, BW=CONFIG["bwd_BW"], BC=BC, num_warps=CONFIG["num_warps"])
            sums = pw.sum(0)
            if want_dw:
                dw = sums[:KH * KW].t().reshape(w.shape).to(w.dtype)
            if want_db:
                db = sums[KH * KW].to(b.dtype)
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
    return _conv(t, w, b, grid, act=1)
