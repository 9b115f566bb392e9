"""ViLLayer's folded projection weights: built in one autograd node, with a hand-written backward.

Per cell head h (NH heads of DH channels; G = 2 NH gate rows, input gates then forget gates)::

    w_a[h] = [Wq_h | Wk_h | Wq_h Gq_h^T + Wk_h Gk_h^T]     (DH, 2 DH + G), applied to a
    w_x[h] = [Wv_h | Wv_h Gv_h^T]                           (DH, DH + G), applied to x_mlstm
    b_a[h] = [bq_h | bk_h | 0],   b_x[h] = [bv_h | 0]
    const  = bg + sum_h (Gq_h bq_h + Gk_h bk_h + Gv_h bv_h)

W*_h: the block-diagonal (d x d blocks, d = 4 in ViL) q/k/v maps of head h as dense (DH, DH)
matrices in ``x @ W`` form; G*_h: the (G, DH) columns of the gate linears (on cat(q, k, v)) that
read head h's q, k or v channels. Zero columns pad the widths to a multiple of ``pad``.

Built with autograd ops this took 99 aten ops forward and 128 backward a layer (27 and 37 of
them kernels, the rest views), every training step (the weights change every step): host time
and tiny kernels on a GPU. Here it is 16 kernel ops each way, computed in the parameters' dtype
(autocast off: the products were bfloat16 under autocast before; the folded weights are cast
once where they are used).
"""

import torch

from vil_kernels.func import transforms_active


def fold_weights(q_proj, k_proj, v_proj, igate, fgate, num_heads, pad=1):
    """(w_a, w_x, b_a, b_x, const) of a ViLLayer's projections (biases None without proj_bias):
    one autograd node when a gradient is wanted, plain ops otherwise."""
    args = (q_proj.weight, k_proj.weight, v_proj.weight, q_proj.bias, k_proj.bias,
            v_proj.bias, igate.weight, fgate.weight, igate.bias, fgate.bias)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        return _FoldedWeights.apply(*args, num_heads, pad)[:5]
    with torch.no_grad():
        return _fold(*args, num_heads, pad)[:5]


def _bmm_into(dst, a, b):
    """dst = a @ b, batched, into a strided view: with out= in eager mode; a product and a copy
    under torch.compile (which refuses a non-contiguous out=; inductor fuses the copy anyway)
    and under torch.func transforms (which refuse out= on tensors they track)."""
    if torch.compiler.is_compiling() or transforms_active():
        dst.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=dst)


def _diag_blocks(M, d):
    """The diagonal d x d blocks of (NH, DH, DH) matrices (any strides) as a (NH, d_in, d_out,
    DH // d) view: [h, i, o, b] = M[h, b d + i, b d + o]."""
    per = M.shape[1] // d
    return torch.diagonal(M.unflatten(1, (per, d)).unflatten(3, (per, d)), dim1=1, dim2=3)


def _as_blocks(w, NH):
    """LinearHeadwiseExpand weights (NH * per, d_out, d_in) as [h, i, o, b] (a view)."""
    nb, d, _ = w.shape
    return w.view(NH, nb // NH, d, d).permute(0, 3, 2, 1)


def _fold(wq, wk, wv, bq, bk, bv, wi, wf, bi, bf, NH, pad):
    nb, d, _ = wq.shape
    inner = nb * d
    DH = inner // NH
    G = 2 * NH
    width = lambda n: n + (-n % pad)                                    # noqa: E731
    with torch.autocast(wq.device.type, enabled=False):
        wg = torch.cat([wi, wf], 0)                                      # (G, 3 inner)
        # the gate columns by the head they read: [h, g, j DH + c] = wg[g, j inner + h DH + c]
        g_qk = wg[:, :2 * inner].view(G, 2, NH, DH).permute(2, 0, 1, 3).reshape(NH, G, 2 * DH)
        g_v = wg[:, 2 * inner:].view(G, NH, DH).transpose(0, 1)          # (NH, G, DH) view
        w_a = wq.new_zeros(NH, DH, width(2 * DH + G))
        w_x = wq.new_zeros(NH, DH, width(DH + G))
        _diag_blocks(w_a[..., :DH], d).copy_(_as_blocks(wq, NH))
        _diag_blocks(w_a[..., DH:2 * DH], d).copy_(_as_blocks(wk, NH))
        _diag_blocks(w_x[..., :DH], d).copy_(_as_blocks(wv, NH))
        _bmm_into(w_a[..., 2 * DH:2 * DH + G], w_a[..., :2 * DH], g_qk.transpose(1, 2))
        _bmm_into(w_x[..., DH:DH + G], w_x[..., :DH], g_v.transpose(1, 2))
        if bq is None:
            return w_a, w_x, None, None, torch.cat([bi, bf], 0), wg, g_qk, None
        b_qkv = torch.cat([bq, bk, bv], 0)                               # wg's column order
        b_a = wq.new_zeros(NH, 1, w_a.shape[-1])
        b_x = wq.new_zeros(NH, 1, w_x.shape[-1])
        b_a[:, 0, :2 * DH].view(NH, 2, DH).copy_(b_qkv[:2 * inner].view(2, NH, DH).transpose(0, 1))
        b_x[:, 0, :DH] = bv.view(NH, DH)
        const = torch.addmv(torch.cat([bi, bf], 0), wg, b_qkv)          # bg + sum_h G*_h b*_h
    return w_a, w_x, b_a, b_x, const, wg, g_qk, b_qkv


class _FoldedWeights(torch.autograd.Function):
    """_fold as one node. Backward, per head (dA, dX: the gradients of w_a, w_x; dc: of const):
    dWq|dWk = dA[:, :2 DH] + dA_g G_qk, dG_qk = dA_g^T [Wq|Wk] + dc [bq|bk]^T (dA_g the gate
    columns of dA), likewise for v; db = the bias columns + G^T dc; the q/k/v weights take the
    diagonal blocks of their dense gradients."""

    generate_vmap_rule = True        # (torch.func: vmap runs its forward's and backward's ops)

    @staticmethod
    def forward(wq, wk, wv, bq, bk, bv, wi, wf, bi, bf, NH, pad):
        # (the setup_context form: torch.func transforms such as grad accept the node)
        return _fold(wq, wk, wv, bq, bk, bv, wi, wf, bi, bf, NH, pad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w_a, w_x, _, _, _, wg, g_qk, b_qkv = output
        ctx.mark_non_differentiable(*(t for t in (wg, g_qk, b_qkv) if t is not None))
        ctx.save_for_backward(w_a, w_x, wg, g_qk, b_qkv)
        ctx.meta = (inputs[10], inputs[0].shape)

    @staticmethod
    def backward(ctx, dw_a, dw_x, db_a, db_x, dconst, *_):
        w_a, w_x, wg, g_qk, b_qkv = ctx.saved_tensors
        NH, (nb, d, _) = ctx.meta
        inner = nb * d
        DH = inner // NH
        G = 2 * NH
        g_v = wg[:, 2 * inner:].view(G, NH, DH).transpose(0, 1)
        grad = lambda g, like: torch.zeros_like(like) if g is None else g.to(like.dtype)  # noqa
        dw_a, dw_x, dconst = grad(dw_a, w_a), grad(dw_x, w_x), grad(dconst, wg[:, 0])
        with torch.autocast(w_a.device.type, enabled=False):
            dA_g, dX_g = dw_a[..., 2 * DH:2 * DH + G], dw_x[..., DH:DH + G]
            dW_qk = torch.baddbmm(dw_a[..., :2 * DH], dA_g, g_qk)          # (NH, DH, 2 DH)
            dW_v = torch.baddbmm(dw_x[..., :DH], dX_g, g_v)                # (NH, DH, DH)
            # the gate weights' gradient in their (G, 3 inner) column order
            products = ((dA_g, w_a[..., :DH]), (dA_g, w_a[..., DH:2 * DH]), (dX_g, w_x[..., :DH]))
            if transforms_active():     # (vmap over grad: dA_g batched, a fresh buffer not)
                dwg = torch.cat([torch.bmm(dg.transpose(1, 2), w).transpose(0, 1).reshape(G, -1)
                                 for dg, w in products], dim=1)
            else:
                dwg = wg.new_empty(wg.shape)
                for j, (dg, w) in enumerate(products):
                    _bmm_into(dwg[:, j * inner:(j + 1) * inner].view(G, NH, DH).transpose(0, 1),
                              dg.transpose(1, 2), w)
            dbq = dbk = dbv = None
            if b_qkv is not None:
                dwg = torch.addr(dwg, dconst, b_qkv)                        # + dc b^T
                db = torch.mv(wg.t(), dconst).view(3, NH, DH)               # G^T dc
                if db_a is not None:
                    db[:2] += db_a[:, 0, :2 * DH].view(NH, 2, DH).transpose(0, 1)
                if db_x is not None:
                    db[2] += db_x[:, 0, :DH]
                dbq, dbk, dbv = db.view(3, inner).unbind(0)
            blocks = lambda M: _diag_blocks(M, d).permute(0, 3, 2, 1).reshape(nb, d, d)  # noqa
            dwq, dwk, dwv = blocks(dW_qk[..., :DH]), blocks(dW_qk[..., DH:]), blocks(dW_v)
        return (dwq, dwk, dwv, dbq, dbk, dbv, dwg[:NH], dwg[NH:], dconst[:NH], dconst[NH:],
                None, None)
