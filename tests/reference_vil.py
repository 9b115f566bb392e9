"""A deliberately plain, independent forward of NX-AI's VisionLSTM2, driven by a state_dict.

Written from shared/spec/vil.md in the reference's op order: token flips for the blocks that walk
from the bottom right, a gate linear on cat(q, k, v), headwise projections as einsums, the parallel
stabilized cell (vil_kernels.naive.mlstm_parallel) and a group norm. No code is shared with vil/.
"""


import torch
import torch.nn.functional as F

from vil_kernels.naive import mlstm_parallel


def _ln(x, sd, prefix, eps=1e-5, residual=True):
    w = sd[prefix + "weight"]
    return F.layer_norm(x, (x.shape[-1],), (1 + w) if residual else w, sd.get(prefix + "bias"), eps)


def _headwise(x, w, b):
    nb, o, d = w.shape
    y = torch.einsum("...hd,hod->...ho", x.unflatten(-1, (nb, d)), w).flatten(-2)
    return y + b if b is not None else y


def _layer(x, sd, p, reverse, grid, conv_kind, kernel):
    if reverse:
        x = x.flip(1)
    B, S, D = x.shape
    up = F.linear(x, sd[p + "proj_up.weight"], sd.get(p + "proj_up.bias"))
    inner = up.shape[-1] // 2
    xm, z = up[..., :inner], up[..., inner:]
    if conv_kind == "2d":
        H, W = grid
        img = xm.transpose(1, 2).reshape(B, inner, H, W)
        c = F.conv2d(img, sd[p + "conv.weight"], sd.get(p + "conv.bias"), padding=kernel // 2,
                     groups=inner)
        c = c.reshape(B, inner, S).transpose(1, 2)
    else:
        c = F.conv1d(F.pad(xm.transpose(1, 2), (kernel - 1, 0)), sd[p + "conv.conv.weight"],
                     sd.get(p + "conv.conv.bias"), groups=inner).transpose(1, 2)
    a = F.silu(c)
    q = _headwise(a, sd[p + "q_proj.weight"], sd.get(p + "q_proj.bias"))
    k = _headwise(a, sd[p + "k_proj.weight"], sd.get(p + "k_proj.bias"))
    v = _headwise(xm, sd[p + "v_proj.weight"], sd.get(p + "v_proj.bias"))
    qkv = torch.cat([q, k, v], -1)
    cp = p + "mlstm_cell."
    i = F.linear(qkv, sd[cp + "igate.weight"], sd[cp + "igate.bias"])    # (B, S, NH)
    f = F.linear(qkv, sd[cp + "fgate.weight"], sd[cp + "fgate.bias"])
    NH = i.shape[-1]
    heads = lambda t: t.view(B, S, NH, -1).transpose(1, 2)
    h = mlstm_parallel(heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2))
    h = h.transpose(1, 2).reshape(B * S, inner)
    h = F.group_norm(h, NH, 1 + sd[cp + "outnorm.weight"], sd.get(cp + "outnorm.bias"), 1e-5)
    h = h.view(B, S, inner)
    out = F.linear((h + sd[p + "learnable_skip"] * a) * F.silu(z), sd[p + "proj_down.weight"],
                   sd.get(p + "proj_down.bias"))
    return out.flip(1) if reverse else out


def reference_forward(sd, x, depth, patch_size=16, stride=None, pooling="bilateral_flatten",
                      legacy_norm=True, conv_kind="2d", conv_kernel_size=3, return_blocks=False):
    """Logits (or pooled features when there is no head) of VisionLSTM2 with state_dict ``sd``."""
    stride = stride or patch_size
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    B, D, H, W = t.shape
    t = t.permute(0, 2, 3, 1)
    pe = sd["pos_embed.embed"]
    if pe.shape[1:3] != (H, W):
        pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(H, W), mode="bicubic").permute(0, 2, 3, 1)
    t = (t + pe).reshape(B, H * W, D)
    outs = []
    for pidx in range(depth):
        for name, rev in (("rowwise_from_top_left", False), ("rowwise_from_bot_right", True)):
            p = f"blocks.{pidx}.{name}."
            t = t + _layer(_ln(t, sd, p + "norm."), sd, p + "layer.", rev, (H, W), conv_kind,
                           conv_kernel_size)
            outs.append(t)
    t = _ln(t, sd, "norm.", eps=1e-6)
    if pooling == "bilateral_flatten":
        t = torch.cat([t[:, 0], t[:, -1]], 1)
    elif pooling == "bilateral_avg":
        t = (t[:, 0] + t[:, -1]) / 2
    if legacy_norm:
        t = F.layer_norm(t, (t.shape[-1],), sd["legacy_norm.weight"], sd["legacy_norm.bias"])
    if "head.weight" in sd:
        t = F.linear(t, sd["head.weight"], sd["head.bias"])
    return (t, outs) if return_blocks else t
