"""Triton kernel (CUDA inference): ViL's depthwise 2-D sequence conv, its bias and the SiLU after
it, fused.

    a[b, y*W + x, c] = silu(bias[c] + sum_{i,j} w[c, i, j] * t[b, (y+i-P)*W + (x+j-Q), c])

over the (H, W) token grid (zero padding P = KH // 2, Q = KW // 2), with t read in place: it is
the strided half of the up-projection's output, which cuDNN would first copy into a
channels-last buffer, then convolve, then add the bias in a broadcast pass, then apply the SiLU
in a fourth. Here: one read of t (the taps' overlap hits the cache), one write of a. Forward
only (ViLLayer uses it when no gradient is needed). On the CPU it runs only under
TRITON_INTERPRET=1 (tests).
"""

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the PyTorch path is used
    triton = None

__all__ = ["available", "conv_silu_triton"]

# [grid columns, channels] a program (16-byte loads along the channels) and its warps; module
# state so that bench/model_kernels.py --sweep can try others
CONFIG = dict(BW=32, BC=64, num_warps=4)


def available():
    return triton is not None


if triton is not None:
    @triton.jit
    def _conv_silu_kernel(t, w, bias, a, H, W, C, st_b, st_s, sa_b, sa_s,
                          KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BW: tl.constexpr, BC: tl.constexpr):
        """Grid (H * cdiv(W, BW), cdiv(C, BC), B): BW tokens of one grid row, BC channels."""
        NWB = tl.cdiv(W, BW)
        i_p, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        i_y = i_p // NWB
        o_x = (i_p % NWB) * BW + tl.arange(0, BW)                    # [BW] grid columns
        o_c = i_c * BC + tl.arange(0, BC)                            # [BC] channels
        m_x, m_c = o_x < W, o_c < C
        p_t = t + i_b * st_b
        b_acc = tl.zeros([BW, BC], dtype=tl.float32)
        for i in tl.static_range(KH):
            y = i_y + i - KH // 2
            for j in tl.static_range(KW):
                x = o_x + j - KW // 2
                m = ((x >= 0) & (x < W) & (y >= 0) & (y < H))[:, None] & m_c[None, :]
                b_t = tl.load(p_t + (y * W + x)[:, None] * st_s + o_c[None, :], mask=m, other=0.)
                b_w = tl.load(w + o_c * (KH * KW) + i * KW + j, mask=m_c, other=0.)   # [BC]
                b_acc += b_t.to(tl.float32) * b_w.to(tl.float32)[None, :]
        if HAS_BIAS:
            b_acc += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
        b_a = b_acc / (1. + tl.exp(-b_acc))                          # silu
        tl.store(a + i_b * sa_b + (i_y * W + o_x)[:, None] * sa_s + o_c[None, :],
                 b_a.to(a.dtype.element_ty), mask=m_x[:, None] & m_c[None, :])


def conv_silu_triton(t, weight, bias, grid):
    """silu(depthwise conv2d(t) + bias) of tokens t (B, H * W, C), any row strides with unit
    channel stride, on the (H, W) grid: weight (C, 1, KH, KW) with odd sides, stride 1,
    dilation 1, zero padding (KH // 2, KW // 2) (the caller checks the conv is of that kind and
    flips the weight for reverse traversal). Weight and bias are rounded to t's dtype first, as
    autocast would for the conv. Returns a new contiguous (B, H * W, C) tensor in t's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    B, S, C = t.shape
    H, W = grid
    KH, KW = weight.shape[-2:]
    if H * W != S or weight.shape[0] != C or KH % 2 == 0 or KW % 2 == 0:
        raise ValueError(f"conv_silu_triton: tokens {tuple(t.shape)}, grid {tuple(grid)} and "
                         f"weight {tuple(weight.shape)} do not fit a depthwise odd-kernel conv")
    if t.stride(-1) != 1:
        t = t.contiguous()
    w = weight.to(t.dtype).contiguous()
    b = bias.to(t.dtype).contiguous() if bias is not None else w
    a = torch.empty(B, S, C, device=t.device, dtype=t.dtype)
    BW, BC = CONFIG["BW"], CONFIG["BC"]
    _conv_silu_kernel[(H * triton.cdiv(W, BW), triton.cdiv(C, BC), B)](
        t, w, b, a, H, W, C, t.stride(0), t.stride(1), a.stride(0), a.stride(1),
        KH=KH, KW=KW, HAS_BIAS=bias is not None, BW=BW, BC=BC, num_warps=CONFIG["num_warps"])
    return a
