"""torch.func transforms of the chunkwise backends (vil_kernels/func.py): grad, vmap, vmap over
grad (per-sample gradients), jacrev; second-order and forward mode refused by name."""

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import vil_kernels
from helpers import make_inputs, rel_err

CHUNKWISE = ["torch", "triton"]
NAMES = ("q", "k", "v", "i", "f", "c_initial", "n_initial", "m_initial")
# The Triton backend runs on CUDA where there is one (float32: float64 is for the interpreter),
# else under the interpreter in float64; the PyTorch backend on the CPU in float64. TOL: one
# backend against itself (a transform's batch against a call a map), and against the float64
# parallel form.
ON_CUDA = torch.cuda.is_available()
SETTING = {"torch": ("cpu", torch.float64), "triton": ("cuda", torch.float32) if ON_CUDA
           else ("cpu", torch.float64)}
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 2e-4)}


def _cell(backend, reverse=False, last=True):
    """The op as a function of the eight tensors: h, or (h, c, n, m)."""
    def cell(*xs):
        out = vil_kernels.mlstm(*xs, backend=backend, chunk_size=16, reverse=reverse,
                                return_last_states=last)
        return (out[0], *out[1]) if last else out
    return cell


def _loss(backend, reverse=False):
    """A fixed random linear loss of h and the last states (each state has its own weight)."""
    def loss(*xs):
        outs = _cell(backend, reverse)(*xs)
        g = torch.Generator().manual_seed(7)
        return sum((o * torch.randn(o.shape[-3:], generator=g, dtype=torch.float64).to(o)).sum()
                   for o in outs)
    return loss


def _inputs(backend, B=2, S=40, seed=0):
    """The eight inputs in the backend's setting."""
    device, dtype = SETTING[backend]
    x = make_inputs(B=B, NH=2, S=S, DK=16, DV=24, init=True, seed=seed)
    return tuple(x[n].to(device, dtype) for n in NAMES)


def _f64(xs):
    return tuple(x.detach().cpu().double() for x in xs)


@pytest.mark.parametrize("backend", CHUNKWISE)
@pytest.mark.parametrize("reverse", [False, True])
def test_grad_equals_autograd(backend, reverse):
    """torch.func.grad with respect to every input, initial states included, with the last
    states in the loss: autograd's gradients on the same backend, bit for bit, and the
    parallel form's in float64."""
    xs = _inputs(backend)
    got = grad(_loss(backend, reverse), argnums=tuple(range(8)))(*xs)
    leaves = [x.clone().requires_grad_() for x in xs]
    want = torch.autograd.grad(_loss(backend, reverse)(*leaves), leaves)
    ref = grad(_loss("parallel", reverse), argnums=tuple(range(8)))(*_f64(xs))
    tol = TOL[xs[0].dtype][1]
    for name, a, b, r in zip(NAMES, got, want, ref):
        assert torch.equal(a, b), name
        # (m_initial's gradient: one number a head from many cancelling terms; float32 is
        # held relative to q's gradient there, as in test_triton.py)
        scale = r.abs().max() if xs[0].dtype == torch.float64 or name != "m_initial" \
            else ref[0].abs().max()
        assert (a.cpu().double() - r).abs().max() / scale < tol, name


@pytest.mark.parametrize("backend", CHUNKWISE)
def test_vmap_over_a_leading_dim(backend):
    """vmap over a dim in front of B (k shared by every map, i mapped along its last dim):
    each map's h and last states, as a loop of calls gives them."""
    V = 3
    per = [_inputs(backend, seed=s) for s in range(V)]
    stacked = [torch.stack([p[j] for p in per]) for j in range(8)]
    stacked[1] = per[0][1]                                           # k: one for all
    stacked[3] = stacked[3].movedim(0, -1)                           # i: mapped along dim -1
    in_dims = (0, None, 0, -1, 0, 0, 0, 0)
    got = vmap(_cell(backend), in_dims=in_dims)(*stacked)
    for s in range(V):
        xs = list(per[s])
        xs[1] = per[0][1]
        want = _cell(backend)(*xs)
        for a, b in zip(got, want):
            assert rel_err(a[s], b) < TOL[b.dtype][0]


@pytest.mark.parametrize("backend", CHUNKWISE)
def test_per_sample_gradients(backend):
    """vmap(grad(loss of one sample)): every sample's gradients with respect to q, k, v, i, f,
    as one backward a sample gives them; and jacrev of a slice of h."""
    q, k, v, i, f = _inputs(backend, B=3)[:5]
    same, to_ref = TOL[q.dtype]

    def one(q, k, v, i, f):                              # a single sample, batch of one
        h = vil_kernels.mlstm(q[None], k[None], v[None], i[None], f[None], backend=backend,
                              chunk_size=16)
        return h.square().sum()
    got = vmap(grad(one, argnums=(0, 1, 2, 3, 4)))(q, k, v, i, f)
    for b in range(3):
        leaves = [x[b].clone().requires_grad_() for x in (q, k, v, i, f)]
        want = torch.autograd.grad(one(*leaves), leaves)
        for a, w in zip(got, want):
            assert rel_err(a[b], w) < same

    cell = lambda i: vil_kernels.mlstm(q, k, v, i, f, backend=backend, chunk_size=16)[0, 1, 30, :2]
    q64, k64, v64, f64 = _f64((q, k, v, f))
    ref = lambda i: vil_kernels.mlstm(q64, k64, v64, i, f64, backend="parallel")[0, 1, 30, :2]
    J = jacrev(cell)(i)                                               # (2, B, NH, S)
    assert J.shape == (2, 3, 2, 40)
    assert rel_err(J.cpu().double(), jacrev(ref)(*_f64((i,)))) < to_ref
    assert J[..., 31:].abs().max() == 0 and J[:, 1:].abs().max() == 0   # causal, per sample


@pytest.mark.parametrize("backend", CHUNKWISE)
def test_second_order_and_forward_mode_refused_by_name(backend):
    q, k, v, i, f = _inputs(backend)[:5]
    h = lambda q: vil_kernels.mlstm(q, k, v, i, f, backend=backend)
    with pytest.raises(RuntimeError, match=rf"{backend} backend .*second-order.*'parallel'"):
        grad(lambda q: grad(lambda q: h(q).square().sum())(q).square().sum())(q)
    with pytest.raises(RuntimeError, match=rf"{backend} backend .*forward mode.*'parallel'"):
        jvp(h, (q,), (torch.ones_like(q),))
    # the references are plain PyTorch: every transform goes through them
    hp = lambda q: vil_kernels.mlstm(q, k, v, i, f, backend="parallel")
    second = grad(lambda q: grad(lambda q: hp(q).square().sum())(q).square().sum())(q)
    assert second.shape == q.shape and second.abs().max() > 0


def test_auto_takes_the_parallel_form_beyond_first_order():
    """backend="auto" (here at S > 2 x head dim, where it picks the PyTorch chunkwise cell)
    under torch.func's jvp, jacfwd or a gradient of a gradient: the parallel form, which
    supports them, with its results."""
    q, k, v, i, f = _inputs("torch")[:5]
    h = lambda be: (lambda i: vil_kernels.mlstm(q, k, v, i, f, backend=be))  # noqa: E731
    tangent = torch.ones_like(i)
    assert torch.equal(jvp(h("auto"), (i,), (tangent,))[1], jvp(h("parallel"), (i,), (tangent,))[1])
    row = lambda be: (lambda i: h(be)(i)[0, 1, 7, :2])  # noqa: E731
    assert torch.equal(jacfwd(row("auto"))(i), jacfwd(row("parallel"))(i))
    second = lambda be: grad(lambda q: grad(  # noqa: E731
        lambda q: vil_kernels.mlstm(q, k, v, i, f, backend=be).square().sum())(q).sum())(q)
    assert torch.equal(second("auto"), second("parallel"))


@pytest.mark.parametrize("reverse", [False, True])
def test_forward_ad_tangents(reverse):
    """torch.autograd.forward_ad: the Triton backend refuses tangents (its kernels would drop
    them: h came back without one), the PyTorch backend carries them without autograd (plain
    operations: the parallel form's tangent) and refuses them with it, "auto" takes the
    parallel form."""
    import torch.autograd.forward_ad as fwAD

    def tangent(backend, grad=False):
        xs = _inputs("triton" if backend == "triton" else "torch")
        g = torch.Generator().manual_seed(3)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x.clone().requires_grad_(grad),
                                    torch.randn(x.shape, generator=g, dtype=x.dtype).to(x))
                     for x in xs]
            h = vil_kernels.mlstm(*duals, backend=backend, chunk_size=16, reverse=reverse)
            return fwAD.unpack_dual(h).tangent

    want = tangent("parallel")
    assert want is not None and want.abs().max() > 0
    assert rel_err(tangent("torch"), want) < 1e-10
    assert torch.equal(tangent("auto"), want)
    with pytest.raises(RuntimeError, match=r"'torch' does not carry forward-mode .* autograd on"):
        tangent("torch", grad=True)
    with pytest.raises(RuntimeError, match=r"'triton' does not carry forward-mode.*'parallel'"):
        tangent("triton")
