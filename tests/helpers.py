"""Shared test utilities: random inputs, one forward+backward through any backend, error metric."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import vil_kernels

ROOT = Path(__file__).resolve().parents[1]

STATE_NAMES = ("c", "n", "m")


def make_inputs(B=1, NH=2, S=65, DK=16, DV=24, dtype=torch.float64, init=False, seed=0,
                i_range=None, f_range=None, gate_shape4=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    uni = lambda lo, hi, *s: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)
    q, k, v = rnd(B, NH, S, DK), rnd(B, NH, S, DK), rnd(B, NH, S, DV)
    i = uni(*i_range, B, NH, S) if i_range else rnd(B, NH, S)
    f = uni(*f_range, B, NH, S) if f_range else rnd(B, NH, S) + 3.0
    if gate_shape4:
        i, f = i[..., None], f[..., None]
    x = {"q": q, "k": k, "v": v, "i": i, "f": f}
    if init:
        x.update(c_initial=rnd(B, NH, DK, DV), n_initial=rnd(B, NH, DK), m_initial=rnd(B, NH, 1))
    return {name: t.to(dtype) for name, t in x.items()}


# where (B, NH, S, D) tensors may live in memory: the operator's own order, a projection's
# (B, S, NH, D) and a head-major (NH, B, S, D); each a view with the operator's shape
LAYOUTS = {"contiguous": (0, 1, 2, 3), "bsnd": (0, 2, 1, 3), "nbsd": (1, 0, 2, 3)}


def in_layout(t, layout):
    """``t`` (B, NH, S, D) as a view of a tensor stored in ``layout``'s dimension order."""
    order = LAYOUTS[layout]
    return t.permute(order).contiguous().permute(order)  # each order is its own inverse


def run(inputs, backend, reverse=False, chunk_size=None, eps=1e-6, compute=torch.float64,
        last_states=True, weights=None, layout="contiguous", grad_of=None, **kw):
    """Forward and backward of a fixed random loss over h (and the last states, if asked for).

    Inputs are cast to `compute` first; returns {name: tensor} of outputs and gradients in float64.
    ``weights``: the loss's weights of h, c, n, m instead of seeded random ones (None for an
    output: no term). ``layout``: q, k, v as views of tensors stored in that order (LAYOUTS).
    ``grad_of``: the names of the inputs that require a gradient (default: all); only their
    gradients are returned. ``kw``: more keywords of vil_kernels.mlstm (recompute_states).
    """
    grad_of = set(inputs if grad_of is None else grad_of)
    leaves = {n: (in_layout(t.detach().to(compute), layout) if n in ("q", "k", "v") else
                  t.detach().to(compute)).requires_grad_(n in grad_of)
              for n, t in inputs.items()}
    res = vil_kernels.mlstm(**leaves, return_last_states=last_states, eps=eps, reverse=reverse,
                            chunk_size=chunk_size, backend=backend, **kw)
    out = {"h": res[0], "c": res[1][0], "n": res[1][1], "m": res[1][2]} if last_states else {"h": res}
    if weights is None:
        g = torch.Generator().manual_seed(123)
        weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in out.values()]
    loss = sum((t.double() * w.to(t.device)).sum() for t, w in zip(out.values(), weights)
               if w is not None)
    wanted = [n for n in leaves if n in grad_of]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wanted])
    out.update({"d" + name: gr for name, gr in zip(wanted, grads)})
    return {name: t.detach().double() for name, t in out.items()}


def rel_err(a, b, floor=1e-6):
    """max |a - b| / max |b| (the spec's metric); a reference below ``floor`` (an all-zero one:
    df at S = 1) is compared absolutely, against ``floor``."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=floor)).item()


def assert_close(got, ref, tol, what=""):
    for name in ref:
        err = rel_err(got[name], ref[name])
        assert err <= tol, f"{what}{name}: error {err:.3e} > {tol:.1e}"


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward while ``fn()`` runs its forward
    (views of one storage counted once per view; what matters here is the difference)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def recompute_saved_bytes(x, backend, reverse, chunk_size=16):
    """Bytes an mLSTM call on fresh leaves of the inputs ``x`` keeps for its backward, with
    recompute_states False and True: (kept, recomputed)."""
    import vil_kernels
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    return tuple(saved_bytes(lambda: vil_kernels.mlstm(**leaves, backend=backend,
                                                       chunk_size=chunk_size, reverse=reverse,
                                                       recompute_states=r))[1]
                 for r in (False, True))


LAUNCHING_MODULES = ("vil_kernels.triton.chunk", "vil.triton_conv", "vil.triton_gating",
                     "vil.triton_norm")


def launch_log(monkeypatch):
    """A list that gets, for every Triton launch of the package and of ViL's fused kernels,
    what it was given besides tensor addresses: kernel, grid, scalar arguments, tensors' dtypes
    and shapes, constexprs and launch options."""
    import importlib
    log = []
    for name in LAUNCHING_MODULES:
        module = importlib.import_module(name)

        def record(kernel, grid, args, _plain=module.launch, **meta):
            log.append((getattr(getattr(kernel, "fn", None), "__name__", str(kernel)),
                        tuple(grid),
                        tuple((a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else a
                              for a in args), tuple(sorted(meta.items()))))
            return _plain(kernel, grid, args, **meta)

        monkeypatch.setattr(module, "launch", record)
    return log


def replay_in_cuda_graph(fn, static, inputs):
    """Capture fn() in a CUDA graph, warmed up on a side stream first (where Triton compiles),
    then for each of ``inputs``: copy it into ``static`` (a tensor, or a dict of tensors by
    name), replay, and yield what the graph computed (fn's result, its tensors rewritten)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    for x in inputs:
        if isinstance(static, dict):
            for n, t in static.items():
                t.copy_(x[n])
        else:
            static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        yield outs


def check_first_order_only(backend, device="cpu", chunk_size=16):
    """A backend whose backward is first-order only: with create_graph=True its gradients have
    the first-order values, and differentiating them raises a RuntimeError that says so (by
    torch.autograd.grad, or by .backward() of a loss that mixes them with other terms: never a
    silently missing or wrong second-order term)."""
    import pytest
    x = make_inputs(B=1, NH=2, S=21, DK=8, DV=8, init=True, seed=5, dtype=torch.float32)
    x = {n: t.to(device) for n, t in x.items()}

    def first(create_graph):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        h = vil_kernels.mlstm(**leaves, backend=backend, chunk_size=chunk_size)
        grads = torch.autograd.grad(h.square().sum(), list(leaves.values()),
                                    create_graph=create_graph)
        return leaves, grads

    _, plain = first(False)
    leaves, graphed = first(True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='parallel'"):
        torch.autograd.grad(graphed[0].sum(), leaves["k"])
    leaves, graphed = first(True)
    penalty = sum(g.square().sum() for g in graphed) + leaves["q"].sum()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        penalty.backward()


def run_built(args, cwd=ROOT, env=None, timeout=900):
    """``python *args`` in a fresh process without TRITON_INTERPRET, so that Triton builds for
    real (this one may interpret, and Triton reads the variable once, at import), with the
    repository and bench/ on PYTHONPATH and ``env`` added."""
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "bench")] + ([run_env["PYTHONPATH"]]
                                            if run_env.get("PYTHONPATH") else []))
    run_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=run_env, capture_output=True,
                          text=True, timeout=timeout)
