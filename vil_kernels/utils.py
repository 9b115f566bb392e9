"""Helpers shared by the chunkwise backends."""

import functools
import math
import weakref

import torch

# "-inf" for log-weights inside the chunkwise paths: finite, so masked lanes never form inf - inf,
# and exp() of it (plus anything a gate can add) is exactly 0 in float32 and float64.
NEG = -1e30

# Infinite gates have a meaning where the limit has one, and every backend computes that limit:
# i = -inf writes nothing (masking a position: its weight is 0, and m never drops below NEG, so
# a row or state that has seen nothing is empty, not NaN), f = -inf forgets everything before
# (a reset). Forget gate pre-activations are taken as max(f, F_MIN), with no gradient below
# it: logsigmoid(-256) = -256 puts exp(-256 + i_j - i_t) < 1e-41 on whatever crosses a reset
# for input gates within +-80, and differences of cumsums of such values keep float32's
# precision (kept in two parts, cumsum_parts: an exact coarse part on a grid of 1/64 and a
# small rest), where -inf would make F_t - F_j NaN and -1e6 would overflow the grid.
F_MIN = -256.0


def log_forget(f):
    """logsigmoid of the floored forget gate pre-activations (F_MIN)."""
    return torch.nn.functional.logsigmoid(f.clamp(min=F_MIN))


def cumsum_parts(fl):
    """Cumsum of log forget gates (>= F_MIN) along the last dim as (coarse, fine) parts, coarse
    + fine = the cumsum: each term rounded to a grid of 2^-k (1/64 for up to 1024 terms, coarser
    beyond) and the rest. Every partial sum of the coarse parts is a multiple of the grid below
    2^24 grid steps, so it is exact in float32 in any order, and differences of cumsums,
    (c_t - c_j) + (f_t - f_j), keep float32's precision where resets make them ~1000 (one
    float32 cumsum there has an ulp of 6e-5; the Triton kernels' gate scan does the same)."""
    n = fl.shape[-1]
    grid = 2.0 ** min(6, 16 - (n - 1).bit_length())
    hi = torch.round(fl * grid) / grid
    return hi.cumsum(-1), (fl - hi).cumsum(-1)


def forget_grad(dfl, f):
    """df from dlogsigmoid(f): sigmoid(-f), none below the floor (autograd's clamp rule)."""
    return torch.where(f < F_MIN, 0.0, dfl * torch.sigmoid(-f))


def compute_dtype(x):
    """float64 stays float64 (ground truth); everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalizer_backward(dh, h, n_row, m_row, eps):
    """The O(S * DV) start of every backward (spec, "Exact gradients"): with every m held constant
    the normalizer is one more value column. Returns den, dden (the gradient of the
    denominator), dn_row (of the signed normalizer) and dm_row (the eps term, for the argmax)."""
    den = torch.maximum(n_row.abs(), torch.exp(-m_row)) + eps          # [B, NH, S]
    dden = -(dh * h).sum(-1) / den
    dn_row = torch.where(n_row.abs() >= torch.exp(-m_row), dden * torch.sign(n_row), 0.0)
    return den, dden, dn_row, eps * dden


def route_to_argmax(dm, arg, di, dF, dm0):
    """Add dm to the log-weight F_t - F_j + i_j of the argmax key j (or to m0 where arg is -1),
    in place. The F_t part is the caller's; here: di_j += dm and dF_j -= dm. dF may be None
    (the caller takes -di's additions for it: the same values, negated exactly), and dm0
    (no initial state to route to)."""
    to_key = arg >= 0
    val = torch.where(to_key, dm, 0.0)
    idx = arg.clamp(min=0).long()
    di.scatter_add_(-1, idx, val)
    if dF is not None:
        dF.scatter_add_(-1, idx, -val)
    if dm0 is not None:
        dm0 += (dm - val).sum(-1)


def route_last_state(di, dF, dm0, last_pos, arg_last, c_last, n_last, dc_last, dn_last, dm_last):
    """The returned last state's stabilizer m_last: F at the last position enters it with weight
    one; what is left of dm_last after the m-constant part goes to the key that set m_last."""
    dm_last = dm_last[..., 0]
    dF[..., last_pos] += dm_last
    dm_eff = dm_last - (dc_last * c_last).sum((-2, -1)) - (dn_last * n_last).sum(-1)
    route_to_argmax(dm_eff[..., None], arg_last[..., None], di, dF, dm0)


# Gradient buffers a backward laid out like the tensor its inputs are views of (id -> weakref):
# the split that made those views can then return the buffer as its gradient without a copy.
_GRAD_BUFFERS = {}


def new_grad_buffer(like):
    """A fresh contiguous tensor shaped like ``like``, registered as such a buffer."""
    buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    key = id(buf)
    _GRAD_BUFFERS[key] = weakref.ref(buf, lambda _, key=key: _GRAD_BUFFERS.pop(key, None))
    return buf


def overlaps_itself(x):
    """Whether two indices of x can address one element (an expand's zero stride, an as_strided
    overlap): the sufficient test, each stride (in increasing order, sizes over 1) past the
    extent of the dims below it."""
    extent = 0
    for st, sz in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if st <= extent:
            return True
        extent += st * (sz - 1)
    return False


def grads_in_base_layout(xs, max_ratio=2):
    """Empty gradients for the views xs of one contiguous tensor, themselves the same views of a
    fresh buffer laid out like it (new_grad_buffer); None unless the views share their dtype and
    strides, are column ranges of its rows that do not overlap, each other or themselves (q and
    k may be one tensor, a view may be an expand: their gradients must not share memory then),
    and it is at most max_ratio times their total size."""
    base, stride = xs[0]._base, xs[0].stride()
    if (base is None or not base.is_contiguous()
            or any(x._base is not base or x.dtype != base.dtype or x.stride() != stride
                   for x in xs)
            or stride[-1] != 1 or base.numel() > max_ratio * sum(x.numel() for x in xs)
            or overlaps_itself(xs[0])):
        return None
    starts = [x.storage_offset() - base.storage_offset() for x in xs]
    spans = sorted((c, c + x.shape[-1]) for c, x in zip(starts, xs))
    if max(starts) >= stride[-2] or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None
    buf = new_grad_buffer(base)
    return [buf.as_strided(x.shape, stride, c) for c, x in zip(starts, xs)]


def grad_buffer_of(g):
    """The registered buffer (new_grad_buffer) that tensor ``g`` is a view of, else None."""
    base = g._base
    ref = _GRAD_BUFFERS.get(id(base)) if base is not None else None
    return base if ref is not None and ref() is base else None


def cdiv(a, b):
    """Ceiling division of ints, for launch grids on the host: triton.cdiv is a constexpr
    function whose call costs microseconds of host time (a dozen calls a forward and
    backward)."""
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def default_chunk_size(S, DK, DV, device):
    """Chunk length for the PyTorch path: about 64, or 128 for head dims over 256 whose per-chunk
    state dominates (measured on CPU, bench/kernels.py). A divisor of S within a factor of two of
    that is preferred (784 = 14 x 56): no padded copies of q, k, v. Never longer than S."""
    target = 128 if max(DK, DV) > 256 else 64
    if S <= target:
        return max(S, 1)
    near = [d for d in range(target // 2, 2 * target + 1) if S % d == 0]
    if near:
        return min(near, key=lambda d: abs(math.log(d / target)))
    return target


# what differentiating the chunkwise backends' gradients raises (first_order_only)
SECOND_ORDER = ("vil_kernels.mlstm: the {} backward computes first-order gradients only; for "
                "second-order ones (a gradient penalty, Hessian-vector products) use "
                "backend='parallel', plain autograd")


class _NoSecondOrder(torch.autograd.Function):
    """The identity on a backward's results (copies), with a backward that raises ``message``:
    put between a first-order-only backward and a graph that autograd records
    (create_graph=True), it turns differentiating those gradients into an error."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:n])       # (the rest: anchors, see below)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(message):
    """Decorator for a custom autograd Function's backward that computes gradients the graph
    does not see (kernels, values the forward made without autograd). With create_graph=True
    such gradients would be constants to autograd, and any higher derivative through them
    (a gradient penalty, a Hessian-vector product) silently wrong or missing. So the backward
    runs without recording, and where autograd records, its results come back attached to a
    node that raises ``message`` when a derivative reaches it. The node hangs off the tensors
    the gradients depend on: the incoming gradients, the saved tensors and ``ctx.anchors``
    (the forward's inputs, where the saved tensors are copies) that require grad, so that a
    derivative of the gradients with respect to any of them reaches it. Under torch.compile
    the backward is traced as is."""
    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return backward(ctx, *grads)
            with torch.no_grad():
                out = backward(ctx, *grads)
            outs = out if isinstance(out, tuple) else (out,)
            at = [j for j, g in enumerate(outs) if isinstance(g, torch.Tensor)]
            if not at:
                return out
            anchors = [t for t in (*grads, *ctx.saved_tensors, *getattr(ctx, "anchors", ()))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors:
                return out
            marked = _NoSecondOrder.apply(message, len(at), *(outs[j] for j in at), *anchors)
            outs = list(outs)
            for j, g in zip(at, marked):
                outs[j] = g
            return tuple(outs) if isinstance(out, tuple) else outs[0]
        return wrapper
    return wrap
