"""Triton kernels (CUDA): per-head output norm + learnable skip + silu(z) gating, fused, forward
and backward.

    out[b, s, hd*DH + d] = (LN_d(h[b, hd, s, :]) * w[c] + bias[c] + skip[c] * a[b, s, c]) * silu(z[b, s, c])

with c = hd*DH + d and LN the mean/variance normalisation over the DH channels of one head (the
reference's group norm). Forward: one program per block of tokens and head, one read of h, a, z,
one write of out, where the PyTorch path (vil.layers.gated_outnorm) takes five passes (and under
autocast keeps float32 intermediates for its backward). Backward: one pass over dout, h, a, z
(the norm's statistics recomputed) writing dh, da, dz, and per-program partial sums of the
parameter gradients (w, bias, skip) reduced in a fixed order: deterministic. On the CPU it runs
only under TRITON_INTERPRET=1 (tests).
"""

import torch

from vil_kernels._triton_runtime import launch
from vil_kernels.utils import cdiv, first_order_only, grads_in_base_layout

from ._triton import SECOND_ORDER, available, tiles, tl, triton

__all__ = ["available", "gated_outnorm_triton"]

# Elements of a program's [BS, DH] tiles (BS tokens) and its warps: enough work a program (a
# token a program ran at a sixth of HBM bandwidth), few enough registers (32 x 512 tiles of
# ViL-B's heads spilled 2 KB and ran slower than a token a program; the backward, with twice
# the live tiles, spreads 1024 over 8 warps: 2048, or 4 warps, spilled). ``rows``: tokens a
# backward program walks (its parameter-gradient partial sums are one row of C a program).
# Module state so that bench/model_kernels.py --sweep can try others; python -m
# vil.triton_check checks for spills.
CONFIG = dict(tile=4096, num_warps=4, bwd_tile=1024, bwd_warps=8, rows=64)


if triton is not None:
    @triton.jit
    def _norm_rows(h, i_b, i_h, o_s, o_d, m, DH, eps, sh_b, sh_h, sh_s):
        """[BS, BD] tile of h, normalised over the head dim (float32); zero where masked."""
        b_h = tl.load(h + i_b * sh_b + i_h * sh_h + o_s[:, None] * sh_s + o_d[None, :], mask=m,
                      other=0.).to(tl.float32)
        b_mean = tl.sum(b_h, axis=1) / DH
        b_hc = tl.where(m, b_h - b_mean[:, None], 0.)
        b_rstd = 1. / tl.sqrt(tl.sum(b_hc * b_hc, axis=1) / DH + eps)
        return b_hc * b_rstd[:, None], b_rstd

    @triton.jit
    def _gated_outnorm_kernel(h, a, z, w, bias, skip, out, S, DH, eps,
                              sh_b, sh_h, sh_s, sa_b, sa_s, sz_b, sz_s, so_b, so_s,
                              HAS_BIAS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """Grid (cdiv(S, BS), NH, B)."""
        i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        o_s = i_s * BS + tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        m_d = o_d < DH
        m = (o_s < S)[:, None] & m_d[None, :]
        o_c = i_h * DH + o_d                                         # [BD] channels
        b_hn, _ = _norm_rows(h, i_b, i_h, o_s, o_d, m, DH, eps, sh_b, sh_h, sh_s)   # [BS, BD]
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

    @triton.jit
    def _gated_outnorm_bwd_kernel(dout, h, a, z, w, bias, skip, dh, da, dz, pw, pb, ps,
                                  S, DH, C, eps, sh_b, sh_h, sh_s, sa_b, sa_s, sz_b, sz_s,
                                  sdz_b, sdz_s,
                                  HAS_BIAS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                                  ROWS: tl.constexpr):
        """Grid (cdiv(S, ROWS), NH, B): ROWS tokens of one head in [BS, BD] tiles. dout, dh, da
        are contiguous ((B, S, C); dh (B, NH, S, DH)), dz has batch and token strides (sdz_b,
        sdz_s: the launcher lays it out like z's up-projection output where it can); the partial
        sums of dw, dbias, dskip over the program's tokens go to row i_b * cdiv(S, ROWS) + i_t
        of pw, pb, ps [., C]."""
        i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        NH = tl.num_programs(1)
        o_d = tl.arange(0, BD)
        m_d = o_d < DH
        o_c = i_h * DH + o_d
        b_w = tl.load(w + o_c, mask=m_d, other=0.).to(tl.float32)
        b_skip = tl.load(skip + o_c, mask=m_d, other=0.).to(tl.float32)
        b_bias = tl.zeros([BD], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(bias + o_c, mask=m_d, other=0.).to(tl.float32)
        # [BS, BD] accumulators, reduced over tokens once at the end: a cross-warp reduction
        # per tile made the loop latency-bound (18x slower than the forward on an H200)
        acc_w = tl.zeros([BS, BD], dtype=tl.float32)
        acc_b = tl.zeros([BS, BD], dtype=tl.float32)
        acc_s = tl.zeros([BS, BD], dtype=tl.float32)
        # one image's pointers (int64), then int32 offsets inside it: with int64 offsets for
        # every tile (dz strided too) ptxas settled on 128 registers and spilled on sm_90
        p_a, p_z, p_dz = a + i_b * sa_b, z + i_b * sz_b, dz + i_b * sdz_b
        p_do, p_da = dout + i_b * S * C, da + i_b * S * C
        for i_r in range(0, ROWS, BS):
            o_s = i_t * ROWS + i_r + tl.arange(0, BS)
            m = (o_s < S)[:, None] & m_d[None, :]
            b_hn, b_rstd = _norm_rows(h, i_b, i_h, o_s, o_d, m, DH, eps, sh_b, sh_h, sh_s)
            b_a = tl.load(p_a + o_s[:, None] * sa_s + o_c[None, :], mask=m,
                          other=0.).to(tl.float32)
            b_z = tl.load(p_z + o_s[:, None] * sz_s + o_c[None, :], mask=m,
                          other=0.).to(tl.float32)
            o_sc = o_s[:, None] * C + o_c[None, :]
            b_do = tl.load(p_do + o_sc, mask=m, other=0.).to(tl.float32)          # [BS, BD]
            b_y = b_hn * b_w[None, :] + b_skip[None, :] * b_a + b_bias[None, :]
            b_sg = 1. / (1. + tl.exp(-b_z))
            b_dy = b_do * b_z * b_sg                                   # dout * silu(z)
            b_dz = b_do * b_y * b_sg * (1. + b_z * (1. - b_sg))        # dout * y * silu'(z)
            acc_w += b_dy * b_hn
            acc_b += b_dy
            acc_s += b_dy * b_a
            # through the norm: dh = rstd (dhn - mean(dhn) - hn mean(dhn hn)), dhn = dy w
            b_dhn = b_dy * b_w[None, :]
            b_c1 = tl.sum(b_dhn, axis=1) / DH
            b_c2 = tl.sum(b_dhn * b_hn, axis=1) / DH
            b_dh = b_rstd[:, None] * (b_dhn - b_c1[:, None] - b_hn * b_c2[:, None])
            tl.store(dh + ((i_b * NH + i_h) * S + o_s[:, None]) * DH + o_d[None, :],
                     b_dh.to(dh.dtype.element_ty), mask=m)
            tl.store(p_da + o_sc, (b_dy * b_skip[None, :]).to(da.dtype.element_ty), mask=m)
            tl.store(p_dz + o_s[:, None] * sdz_s + o_c[None, :], b_dz.to(dz.dtype.element_ty),
                     mask=m)
        o_p = (i_b * tl.cdiv(S, ROWS) + i_t) * C + o_c
        tl.store(pw + o_p, tl.sum(acc_w, axis=0), mask=m_d)
        tl.store(pb + o_p, tl.sum(acc_b, axis=0), mask=m_d)
        tl.store(ps + o_p, tl.sum(acc_s, axis=0), mask=m_d)


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(h, a, z, w, bias, skip, eps):
    B, NH, S, DH = h.shape
    out = torch.empty(B, S, NH * DH, device=a.device, dtype=a.dtype)
    BS, BD = tiles(DH, CONFIG["tile"])
    launch(_gated_outnorm_kernel, (cdiv(S, BS), NH, B),
           (h, a, z, w, bias if bias is not None else w, skip, out, S, DH, eps,
            h.stride(0), h.stride(1), h.stride(2), a.stride(0), a.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1)),
           HAS_BIAS=bias is not None, BS=BS, BD=BD, num_warps=CONFIG["num_warps"])
    return out


class _GatedOutnorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a, z, w, bias, skip, eps):
        ctx.save_for_backward(h, a, z, w, bias, skip)
        ctx.eps = eps
        return _forward(h, a, z, w, bias, skip, eps)

    @staticmethod
    @first_order_only(SECOND_ORDER.format("output norm + gating"))
    def backward(ctx, dout):
        h, a, z, w, bias, skip = ctx.saved_tensors
        B, NH, S, DH = h.shape
        C = NH * DH
        dout = dout.contiguous()
        dh = torch.empty(B, NH, S, DH, device=h.device, dtype=h.dtype)
        da = torch.empty(B, S, C, device=a.device, dtype=a.dtype)
        # dz in the layout of the up-projection output z is a view of, where it can: ViL's
        # split of that output then takes it as its gradient without a cat (vil/model.py)
        dz = (grads_in_base_layout([z]) or [None])[0]
        if dz is None:
            dz = torch.empty(B, S, C, device=z.device, dtype=z.dtype)
        BS, BD = tiles(DH, CONFIG["bwd_tile"])
        rows = max(BS, CONFIG["rows"] // BS * BS)
        NT = cdiv(S, rows)
        pw, pb, ps = (torch.empty(B * NT, C, device=h.device, dtype=torch.float32)
                      for _ in range(3))
        launch(_gated_outnorm_bwd_kernel, (NT, NH, B),
               (dout, h, a, z, w, bias if bias is not None else w, skip, dh, da, dz, pw, pb, ps,
                S, DH, C, ctx.eps, h.stride(0), h.stride(1), h.stride(2), a.stride(0),
                a.stride(1), z.stride(0), z.stride(1), dz.stride(0), dz.stride(1)),
               HAS_BIAS=bias is not None, BS=BS, BD=BD, ROWS=rows, num_warps=CONFIG["bwd_warps"])
        dw = pw.sum(0).to(w.dtype) if ctx.needs_input_grad[3] else None
        dbias = pb.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
        dskip = ps.sum(0).to(skip.dtype) if ctx.needs_input_grad[5] else None
        return dh, da, dz, dw, dbias, dskip, None


def gated_outnorm_triton(h, norm, skip, a, z):
    """Same contract as ``vil.layers.gated_outnorm`` (h: (B, NH, S, DH); a, z: (B, S, NH * DH),
    any strides); returns a new contiguous (B, S, NH * DH) tensor in a's dtype, differentiable
    in h, a, z, the norm's parameters and skip (a is not overwritten)."""
    if triton is None:
        raise RuntimeError("Triton is not available")
    B, NH, S, DH = h.shape
    h, a, z = _unit_last(h), _unit_last(a), _unit_last(z)
    w = norm.weight_proxy
    w = w if w is not None else torch.ones(NH * DH, device=a.device)
    bias = norm.bias
    args = (h, a, z, w.contiguous(), None if bias is None else bias.contiguous(),
            skip.contiguous(), float(norm.eps))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
        return _GatedOutnorm.apply(*args)
    return _forward(*args)
