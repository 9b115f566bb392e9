"""Triton kernel (CUDA inference): per-head output norm + learnable skip + silu(z) gating, fused.

    out[b, s, hd*DH + d] = (LN_d(h[b, hd, s, :]) * w[c] + bias[c] + skip[c] * a[b, s, c]) * silu(z[b, s, c])

with c = hd*DH + d and LN the mean/variance normalisation over the DH channels of one head (the
reference's group norm). One program per block of tokens and head: one read of h, a, z, one
write of out, where the PyTorch path (vil.layers.gated_outnorm) takes five passes. Forward only:
ViLLayer uses it when no gradient is needed; training keeps the autograd PyTorch path. On the
CPU it runs only under TRITON_INTERPRET=1 (tests).
"""

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the PyTorch path is used
    triton = None

__all__ = ["available", "gated_outnorm_triton"]

# Elements of a program's [BS, DH] tiles (BS tokens) and its warps: enough work a program (a
# token a program ran at a sixth of HBM bandwidth), few enough registers (32 x 512 tiles of
# ViL-B's heads spilled 2 KB and ran slower than a token a program). Module state so that
# bench/model_kernels.py --sweep can try others.
CONFIG = dict(tile=4096, num_warps=4)


def available():
    return triton is not None


if triton is not None:
    @triton.jit
    def _gated_outnorm_kernel(h, a, z, w, bias, skip, out, S, DH, eps,
                              sh_b, sh_h, sh_s, sa_b, sa_s, sz_b, sz_s, so_b, so_s,
                              HAS_BIAS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        o_s = i_s * BS + tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        m_d = o_d < DH
        m = (o_s < S)[:, None] & m_d[None, :]
        o_c = i_h * DH + o_d                                         # [BD] channels
        b_h = tl.load(h + i_b * sh_b + i_h * sh_h + o_s[:, None] * sh_s + o_d[None, :], mask=m,
                      other=0.).to(tl.float32)                       # [BS, BD]
        b_mean = tl.sum(b_h, axis=1) / DH
        b_hc = tl.where(m, b_h - b_mean[:, None], 0.)
        b_var = tl.sum(b_hc * b_hc, axis=1) / DH
        b_hn = b_hc * (1. / tl.sqrt(b_var + eps))[:, None]
        b_w = tl.load(w + o_c, mask=m_d, other=0.).to(tl.float32)
        b_skip = tl.load(skip + o_c, mask=m_d, other=0.).to(tl.float32)
        b_a = tl.load(a + i_b * sa_b + o_s[:, None] * sa_s + o_c[None, :], mask=m,
                      other=0.).to(tl.float32)
        b_z = tl.load(z + i_b * sz_b + o_s[:, None] * sz_s + o_c[None, :], mask=m,
                      other=0.).to(tl.float32)
        b_y = b_hn * b_w[None, :] + b_skip[None, :] * b_a
        if HAS_BIAS:
            b_y += tl.load(bias + o_c, mask=m_d, other=0.).to(tl.float32)[None, :]
        b_y = b_y * (b_z / (1. + tl.exp(-b_z)))
        tl.store(out + i_b * so_b + o_s[:, None] * so_s + o_c[None, :],
                 b_y.to(out.dtype.element_ty), mask=m)


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def gated_outnorm_triton(h, norm, skip, a, z):
    """Same contract as ``vil.layers.gated_outnorm`` (h: (B, NH, S, DH); a, z: (B, S, NH * DH),
    any strides); returns a new contiguous (B, S, NH * DH) tensor in a's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    B, NH, S, DH = h.shape
    C = NH * DH
    h, a, z = _unit_last(h), _unit_last(a), _unit_last(z)
    out = torch.empty(B, S, C, device=a.device, dtype=a.dtype)
    w = norm.weight_proxy
    w = (w if w is not None else torch.ones(C, device=a.device)).contiguous()
    bias = norm.bias.contiguous() if norm.bias is not None else w
    skip = skip.contiguous()
    BD = triton.next_power_of_2(DH)
    BS = max(1, min(64, CONFIG["tile"] // BD))
    _gated_outnorm_kernel[(triton.cdiv(S, BS), NH, B)](
        h, a, z, w, bias, skip, out, S, DH, float(norm.eps),
        h.stride(0), h.stride(1), h.stride(2), a.stride(0), a.stride(1),
        z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=norm.bias is not None, BS=BS, BD=BD, num_warps=CONFIG["num_warps"])
    return out
