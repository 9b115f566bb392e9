"""Triton kernel (CUDA inference): per-head output norm + learnable skip + silu(z) gating, fused.

    out[b, s, hd*DH + d] = (LN_d(h[b, hd, s, :]) * w[c] + bias[c] + skip[c] * a[b, s, c]) * silu(z[b, s, c])

with c = hd*DH + d and LN the mean/variance normalisation over the DH channels of one head (the
reference's group norm). One program per (token, head): one read of h, a, z, one write of out,
where the PyTorch path (vil.layers.gated_outnorm) takes five passes. Forward only: ViLLayer uses
it when no gradient is needed; training keeps the autograd PyTorch path. On the CPU it runs only
under TRITON_INTERPRET=1 (tests).
"""

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - no Triton: the PyTorch path is used
    triton = None

__all__ = ["available", "gated_outnorm_triton"]


def available():
    return triton is not None


if triton is not None:
    @triton.jit
    def _gated_outnorm_kernel(h_ptr, a_ptr, z_ptr, w_ptr, b_ptr, skip_ptr, out_ptr,
                              S, DH, eps,
                              sh_b, sh_h, sh_s, sh_d,
                              sa_b, sa_s, sa_c, sz_b, sz_s, sz_c, so_b, so_s,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        tok = tl.program_id(0)
        hd = tl.program_id(1)
        bi = tok // S
        si = tok % S
        d = tl.arange(0, BLOCK)
        mask = d < DH
        c = hd * DH + d
        h = tl.load(h_ptr + bi * sh_b + hd * sh_h + si * sh_s + d * sh_d, mask=mask,
                    other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / DH
        hc = tl.where(mask, h - mean, 0.0)
        var = tl.sum(hc * hc, axis=0) / DH
        hn = hc * (1.0 / tl.sqrt(var + eps))
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        skip = tl.load(skip_ptr + c, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + bi * sa_b + si * sa_s + c * sa_c, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + bi * sz_b + si * sz_s + c * sz_c, mask=mask, other=0.0).to(tl.float32)
        y = hn * w + skip * a
        if HAS_BIAS:
            y += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(out_ptr + bi * so_b + si * so_s + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def gated_outnorm_triton(h, norm, skip, a, z):
    """Same contract as ``vil.layers.gated_outnorm`` (h: (B, NH, S, DH); a, z: (B, S, NH * DH),
    any strides); returns a new contiguous (B, S, NH * DH) tensor in a's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    B, NH, S, DH = h.shape
    C = NH * DH
    out = torch.empty(B, S, C, device=a.device, dtype=a.dtype)
    w = norm.weight_proxy
    w = (w if w is not None else torch.ones(C, device=a.device)).contiguous()
    bias = norm.bias.contiguous() if norm.bias is not None else w
    skip = skip.contiguous()
    block = triton.next_power_of_2(DH)
    _gated_outnorm_kernel[(B * S, NH)](
        h, a, z, w, bias, skip, out, S, DH, float(norm.eps),
        *h.stride(), *a.stride(), *z.stride(),
        out.stride(0), out.stride(1),
        HAS_BIAS=norm.bias is not None, BLOCK=block)
    return out
