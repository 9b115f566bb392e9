"""Triton kernel (CUDA inference under autocast): a block's pre-norm in the residual stream's own
16-bit dtype.

Under autocast, F.layer_norm runs on a float32 copy of the 16-bit tokens and returns float32,
which the up-projection (a 16-bit GEMM) rounds straight back: three passes, two of them at twice
the width. This kernel reads the 16-bit rows, normalises in float32 with the float32 parameters
and writes the rounded result once: the values the GEMM would have received. Forward only
(ViLBlock uses it when no gradient is needed). On the CPU it runs only under TRITON_INTERPRET=1
(tests).
"""

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the PyTorch path is used
    triton = None

__all__ = ["available", "layer_norm_triton"]

# Elements of a program's [rows, N] tile and its warps (module state: bench/model_kernels.py
# --sweep tries others).
CONFIG = dict(tile=4096, num_warps=4)


def available():
    return triton is not None


if triton is not None:
    @triton.jit
    def _layer_norm_kernel(x, w, b, y, M, N, sx, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
        """Grid (cdiv(M, BM),): BM rows of N a program."""
        o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        m_n = o_n < N
        m = (o_m < M)[:, None] & m_n[None, :]
        b_x = tl.load(x + o_m[:, None] * sx + o_n[None, :], mask=m, other=0.).to(tl.float32)
        b_mean = tl.sum(b_x, axis=1) / N
        b_xc = tl.where(m, b_x - b_mean[:, None], 0.)
        b_var = tl.sum(b_xc * b_xc, axis=1) / N
        b_y = b_xc * (1. / tl.sqrt(b_var + eps))[:, None]                 # [BM, BN]
        if HAS_W:
            b_y = b_y * tl.load(w + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        if HAS_B:
            b_y = b_y + tl.load(b + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
        tl.store(y + o_m[:, None] * N + o_n[None, :], b_y.to(y.dtype.element_ty), mask=m)


def layer_norm_triton(x, weight, bias, eps):
    """F.layer_norm over the last dim of x (..., N), in x's dtype: float32 statistics and
    parameters, one rounding at the end. Returns a new contiguous tensor."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    BN = triton.next_power_of_2(N)
    BM = max(1, min(64, CONFIG["tile"] // BN))
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    _layer_norm_kernel[(triton.cdiv(M, BM),)](
        x2, w, b, y, M, N, x2.stride(0), float(eps), HAS_W=weight is not None,
        HAS_B=bias is not None, BM=BM, BN=BN, num_warps=CONFIG["num_warps"])
    return y
