"""torch.func support for the chunkwise backends: grad, vjp, jacrev, vmap and vmap over grad
(per-sample gradients, model ensembles); and where forward-mode AD goes.

The backends' own autograd Functions save what their forward computed and launch kernels on
the tensors they get, neither of which torch.func's wrapped tensors allow. Under a transform the
call goes through two Functions of the form torch.func accepts instead:

- ``_Forward`` runs the backend without autograd and saves only its inputs;
- its backward is ``_Backward``, which runs the backend's forward again with autograd on plain
  tensors and returns that call's input gradients (so a backward under a transform costs one
  more forward).

Both have a vmap rule that folds the mapped dimension into the batch (every tensor of the
call leads with B, and batch elements are independent), so the kernels always see plain
tensors. Neither is differentiable twice (first-order, as outside transforms), nor in forward
mode: for those, and for forward-mode tangents outside torch.func, ``mlstm``'s "auto" takes
the parallel form (beyond_first_order, has_tangents).
"""

import torch
import torch.autograd.forward_ad as fwAD

# what differentiating a chunkwise backend's gradient, or asking for forward mode, raises here
_NOT_SUPPORTED = ("vil_kernels.mlstm: under torch.func the {} backend supports first-order "
                  "reverse mode (grad, vjp, jacrev, vmap of those) only; for {} use "
                  "backend='parallel', plain PyTorch operations")


def transforms_active():
    """Whether a torch.func transform (grad, vmap, jvp, ...) is tracing the current call."""
    return torch._C._are_functorch_transforms_active()


def has_tangents(tensors):
    """Whether a tensor carries a forward-mode tangent (torch.autograd.forward_ad): the Triton
    kernels would drop it, and the chunkwise backends' autograd Functions have no jvp. Free
    outside a dual level."""
    return fwAD._current_level >= 0 and any(
        t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def beyond_first_order():
    """Whether the active torch.func transforms ask for what the chunkwise backends refuse:
    forward mode (jvp, jacfwd, hessian) or a gradient of a gradient (two grad levels)."""
    if not transforms_active():
        return False
    from torch._C._functorch import TransformType, get_interpreter_stack
    kinds = [level.key() for level in get_interpreter_stack() or ()]
    return TransformType.Jvp in kinds or kinds.count(TransformType.Grad) > 1


def mlstm_under_transforms(run, backend, tensors, return_last_states):
    """``run(q, k, v, i, f, c0, n0, m0)`` -> (h, (c, n, m) or None), a chunkwise backend with its
    options bound, called under torch.func transforms: (h, last) like ``run``."""
    out = _Forward.apply(run, backend, return_last_states, *tensors)
    return (out[0], tuple(out[1:])) if return_last_states else (out[0], None)


def _fold(info, in_dims, args):
    """vmap rule: every tensor in args with the mapped dimension folded into its leading batch
    dimension, (V, B, ...) -> (V * B, ...); unmapped tensors are repeated V times."""
    V = info.batch_size
    out = []
    for x, d in zip(args, in_dims):
        if isinstance(x, torch.Tensor):
            x = x.movedim(d, 0) if d is not None else x.expand(V, *x.shape)
            x = x.reshape(V * x.shape[1], *x.shape[2:])
        out.append(x)
    return out


def _unfold(V, outs):
    """The inverse of _fold on a call's outputs, with their out_dims."""
    outs = tuple(None if o is None else o.reshape(V, o.shape[0] // V, *o.shape[1:])
                 for o in outs)
    return outs, tuple(None if o is None else 0 for o in outs)


class _Forward(torch.autograd.Function):
    """The backend's forward, nothing kept but its inputs: (h,) or (h, c, n, m)."""

    @staticmethod
    def forward(run, backend, last, *tensors):
        with torch.no_grad():
            h, states = run(*tensors)
        return (h, *states) if last else (h,)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.run, ctx.backend = inputs[:2]
        ctx.save_for_backward(*inputs[3:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * (3 + len(ctx.saved_tensors))
        dx = _Backward.apply(ctx.run, ctx.backend, *ctx.saved_tensors,
                             *grads, *(None,) * (4 - len(grads)))
        return (None, None, None, *dx)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NOT_SUPPORTED.format(ctx.backend, "forward mode (jvp, jacfwd)"))

    @staticmethod
    def vmap(info, in_dims, run, backend, last, *tensors):
        args = _fold(info, in_dims, (run, backend, last, *tensors))
        return _unfold(info.batch_size, _Forward.apply(*args))


class _Backward(torch.autograd.Function):
    """The input gradients of the backend's forward (run again, with autograd, on plain
    tensors) for the output gradients dh, dc, dn, dm (each may be None)."""

    @staticmethod
    def forward(run, backend, *args):
        tensors, (dh, *dlast) = args[:8], args[8:]
        leaves = tuple(None if x is None else x.detach().requires_grad_() for x in tensors)
        with torch.enable_grad():
            h, last = run(*leaves)
            pairs = [(h, dh)] + ([] if last is None else list(zip(last, dlast)))
            pairs = [(o, g) for o, g in pairs if g is not None]
            wrt = [x for x in leaves if x is not None]
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                        allow_unused=True)
        grads, out = iter(grads), []
        for x in leaves:
            g = None if x is None else next(grads)
            # (an input the outputs do not depend on, e.g. m0 below every row's max: zeros)
            out.append(torch.zeros_like(x) if x is not None and g is None else g)
        return tuple(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NOT_SUPPORTED.format(ctx.backend, "second-order gradients"))

    @staticmethod
    def vmap(info, in_dims, run, backend, *args):
        folded = _fold(info, in_dims, (run, backend, *args))
        return _unfold(info.batch_size, _Backward.apply(*folded))
