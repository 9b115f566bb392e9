"""vil_kernels.compat: the one-line swap into ViL-style and xLSTM-style code changes nothing.

Each test builds a small model written against one of the two existing call signatures, runs it
with the plain reference ("before") and with the vil_kernels drop-in ("after"), and compares
outputs and every gradient in float64, on the PyTorch backend and on the Triton backend (under
TRITON_INTERPRET=1 without a GPU; see conftest.py).
"""

import functools
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vil_kernels
from vil_kernels import compat, naive

ROOT = Path(__file__).resolve().parents[1]
TRITON_PKG = ROOT / "vil_kernels" / "triton" / "__init__.py"


def _triton_backend_param():
    """The triton backend is tested whenever its package exists; if it exists but fails to
    import, the tests fail (never a silent skip). Before it is written, they are skipped."""
    marks = []
    if not TRITON_PKG.exists():
        marks.append(pytest.mark.skip(reason="vil_kernels/triton is not written yet"))
    elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        marks.append(pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET unset"))
    return pytest.param("triton", marks=marks)


BACKENDS = ["torch", _triton_backend_param()]


def test_triton_package_imports_when_present():
    if not TRITON_PKG.exists():
        pytest.skip("vil_kernels/triton is not written yet")
    importlib.import_module("vil_kernels.triton")


# --------------------------------------------------------------------------------------------
# "Before" for the ViL family: the parallel stabilized cell exactly as the reference computes it
# (written plainly here, gates (B, NH, S, 1)).

def reference_parallel_stabilized_simple(queries, keys, values, igate_preact, fgate_preact,
                                         lower_triangular_matrix=None, stabilize_rowwise=True,
                                         eps=1e-6, **kwargs):
    B, NH, S, DH = queries.shape
    log_f = F.logsigmoid(fgate_preact)                                  # (B, NH, S, 1)
    cum = torch.cat([log_f.new_zeros(B, NH, 1, 1), log_f.cumsum(-2)], dim=-2)  # (B, NH, S+1, 1)
    ltr = torch.ones(S, S, dtype=torch.bool, device=queries.device).tril()
    log_fg = (cum - cum.transpose(-2, -1))[:, :, 1:, 1:]                # F_t - F_j
    log_fg = torch.where(ltr, log_fg, -math.inf)
    log_d = log_fg + igate_preact.transpose(-2, -1)
    if stabilize_rowwise:
        max_log_d = log_d.max(-1, keepdim=True).values
    else:
        max_log_d = log_d.reshape(B, NH, -1).max(-1, keepdim=True).values[..., None]
    d = torch.exp(log_d - max_log_d)
    c = (queries @ (keys / math.sqrt(DH)).transpose(-2, -1)) * d
    normalizer = torch.maximum(c.sum(-1, keepdim=True).abs(), torch.exp(-max_log_d))
    return (c / (normalizer + eps)) @ values


class ViLStyleLayer(nn.Module):
    """A miniature ViL mLSTM layer (up-projection, causal conv, q/k/v, gates, cell, group norm,
    output gate, down-projection) that calls the cell the way the reference code does."""

    def __init__(self, dim=12, num_heads=2, cell=reference_parallel_stabilized_simple,
                 reverse=False):
        super().__init__()
        inner = 2 * dim
        self.nh, self.reverse, self.cell = num_heads, reverse, cell
        self.proj_up = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, 4, padding=3, groups=inner)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(inner, inner) for _ in range(3))
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))
        self.outnorm = nn.GroupNorm(num_heads, inner)
        self.proj_down = nn.Linear(inner, dim)
        self.lower_triangular = torch.ones(256, 256, dtype=torch.bool).tril()

    def forward(self, x):
        if self.reverse:
            x = x.flip(1)
        B, S, _ = x.shape
        xm, z = self.proj_up(x).chunk(2, dim=-1)
        a = F.silu(self.conv(xm.transpose(1, 2))[..., :S].transpose(1, 2))
        q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(xm)
        gate_in = torch.cat([q, k, v], dim=-1)
        ig = self.igate(gate_in).transpose(1, 2)[..., None]             # (B, NH, S, 1)
        fg = self.fgate(gate_in).transpose(1, 2)[..., None]
        heads = lambda t: t.view(B, S, self.nh, -1).transpose(1, 2)     # (B, NH, S, DH)
        h = self.cell(queries=heads(q), keys=heads(k), values=heads(v), igate_preact=ig,
                      fgate_preact=fg, lower_triangular_matrix=self.lower_triangular[:S, :S])
        h = h.transpose(1, 2).reshape(B, S, -1)
        h = self.outnorm(h.transpose(1, 2)).transpose(1, 2)
        out = self.proj_down((h + a) * F.silu(z))
        return out.flip(1) if self.reverse else out


class ViLStyleModel(nn.Module):
    def __init__(self, depth=1, dim=12, cell=reference_parallel_stabilized_simple):
        super().__init__()
        self.layers = nn.ModuleList(ViLStyleLayer(dim, cell=cell, reverse=bool(j % 2))
                                    for j in range(2 * depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))

    def set_cell(self, cell):
        for layer in self.layers:
            layer.cell = cell

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return x


def _outputs_and_grads(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x] + params)
    names = ["out", "dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    return dict(zip(names, [out.detach()] + [g.detach() for g in grads]))


def _assert_same(before, after, tol):
    assert before.keys() == after.keys()
    for name in before:
        ref, got = before[name], after[name]
        err = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vil_block_swap_same_outputs_and_grads(backend):
    torch.manual_seed(0)
    model = ViLStyleModel(depth=1, dim=12).double()
    x = torch.randn(2, 70, 12, dtype=torch.float64)         # S = 70: more than one chunk
    before = _outputs_and_grads(model, x)
    # The swap: in real code, `from vil_kernels.compat import parallel_stabilized_simple`.
    model.set_cell(functools.partial(compat.parallel_stabilized_simple, backend=backend))
    after = _outputs_and_grads(model, x)
    _assert_same(before, after, 1e-9)


def test_vil_cell_auto_backend_matches_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 90, 8, generator=g, dtype=torch.float64) for _ in range(3))
    i = torch.randn(2, 3, 90, 1, generator=g, dtype=torch.float64)
    f = torch.randn(2, 3, 90, 1, generator=g, dtype=torch.float64) + 3
    ref = reference_parallel_stabilized_simple(q, k, v, i, f)
    got = compat.parallel_stabilized_simple(q, k, v, i, f, torch.ones(90, 90).tril().bool())
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_vil_cell_stabilize_rowwise_false_is_honoured():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    i = (torch.randn(1, 2, 40, 1, generator=g, dtype=torch.float64) * 3).requires_grad_()
    f = (torch.randn(1, 2, 40, 1, generator=g, dtype=torch.float64) + 1).requires_grad_()
    ref = reference_parallel_stabilized_simple(q, k, v, i, f, stabilize_rowwise=False)
    with pytest.warns(UserWarning, match="stabilize_rowwise=False"):
        compat._WARNED.clear()
        got = compat.parallel_stabilized_simple(q, k, v, i, f, stabilize_rowwise=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    gr = torch.autograd.grad(ref.sum(), [q, k, v, i, f])
    gg = torch.autograd.grad(got.sum(), [q, k, v, i, f])
    for a, b in zip(gg, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # It is a genuinely different function (through eps) from the rowwise default ...
    rowwise = compat.parallel_stabilized_simple(q, k, v, i, f)
    assert not torch.allclose(rowwise, got, rtol=0, atol=1e-12)
    # ... and the same one without eps.
    torch.testing.assert_close(
        compat.parallel_stabilized_simple(q, k, v, i, f, stabilize_rowwise=False, eps=0.0),
        compat.parallel_stabilized_simple(q, k, v, i, f, eps=0.0), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="stabilize_rowwise"):
        compat.parallel_stabilized_simple(q, k, v, i, f, stabilize_rowwise="no")


# --------------------------------------------------------------------------------------------
# "Before" for the xLSTM family: the recurrent form behind mlstm_kernels' chunkwise signature.

def reference_mlstm_chunkwise(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None,
                              return_last_states=False, eps=1e-6, chunk_size=64,
                              autocast_kernel_dtype=torch.float32, **tuning_kwargs):
    return naive.mlstm_recurrent(q, k, v, i, f, c_initial, n_initial, m_initial,
                                 return_last_states=return_last_states, eps=eps)


class XLSTMStyleLayer(nn.Module):
    """An xLSTM-style mLSTM layer that runs a sequence in segments, carrying the (c, n, m) state
    from one call of the chunkwise kernel to the next, as generation/long-context code does."""

    def __init__(self, dim=16, num_heads=2, kernel=reference_mlstm_chunkwise):
        super().__init__()
        self.nh, self.kernel = num_heads, kernel
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gates = nn.Linear(dim, 2 * num_heads)
        with torch.no_grad():
            self.gates.bias[num_heads:] = 3.0
        self.out = nn.Linear(dim, dim)

    def forward(self, x, state=None, segment=37):
        B, S, D = x.shape
        heads = lambda t: t.view(B, -1, self.nh, D // self.nh).transpose(1, 2)
        hs = []
        for start in range(0, S, segment):
            xs = x[:, start:start + segment]
            q, k, v = (heads(t) for t in self.qkv(xs).chunk(3, -1))
            i, f = self.gates(xs).transpose(1, 2).chunk(2, 1)            # (B, NH, s) each
            c0, n0, m0 = state if state is not None else (None, None, None)
            h, state = self.kernel(q=q, k=k, v=v, i=i, f=f, c_initial=c0, n_initial=n0,
                                   m_initial=m0, return_last_states=True, eps=1e-6,
                                   chunk_size=32, chunk_size_inter=32, chunk_size_intra=16,
                                   siz_b_L_parallel=16, siz_b_L_loop=16, num_warps_intra=4,
                                   num_stages_inter=1, autocast_kernel_dtype=torch.float32)
            hs.append(h.transpose(1, 2).reshape(B, -1, D))
        return self.out(torch.cat(hs, 1)), state


@pytest.mark.parametrize("backend", BACKENDS)
def test_xlstm_block_swap_same_outputs_states_and_grads(backend):
    torch.manual_seed(0)
    layer = XLSTMStyleLayer().double()
    x = torch.randn(2, 90, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    init = (torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 2, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 2, 1, generator=g, dtype=torch.float64))

    def run():
        xs = x.clone().requires_grad_()
        st = tuple(t.clone().requires_grad_() for t in init)
        out, (c, n, m) = layer(xs, st)
        # States are defined up to the stabilizer: compare them normalised to m = 0.
        c_n, n_n = c * torch.exp(m)[..., None], n * torch.exp(m)
        w = torch.Generator().manual_seed(9)
        loss = sum((t * torch.randn(t.shape, generator=w, dtype=t.dtype)).sum()
                   for t in (out, c_n, n_n))
        grads = torch.autograd.grad(loss, [xs, *st, *layer.parameters()])
        res = {"out": out, "c": c_n, "n": n_n, "dx": grads[0], "dc0": grads[1], "dn0": grads[2],
               "dm0": grads[3]}
        res.update({f"d{name}": gr for (name, _), gr in zip(layer.named_parameters(), grads[4:])})
        return {k_: t.detach() for k_, t in res.items()}

    before = run()
    # The swap: in real code, `from vil_kernels.compat import mlstm_chunkwise`.
    layer.kernel = functools.partial(compat.mlstm_chunkwise, backend=backend)
    after = run()
    _assert_same(before, after, 1e-9)


def test_mlstm_chunkwise_conventions():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g) for _ in range(3))
    i, f = torch.randn(1, 2, 50, generator=g), torch.randn(1, 2, 50, generator=g) + 3
    h = compat.mlstm_chunkwise(q, k, v, i, f)
    assert isinstance(h, torch.Tensor) and h.shape == v.shape and h.dtype == torch.float32
    h2, (c, n, m) = compat.mlstm_chunkwise(q, k, v, i, f, return_last_states=True,
                                           chunk_size=100)   # -> 128
    assert (c.shape, n.shape, m.shape) == ((1, 2, 8, 8), (1, 2, 8), (1, 2, 1))
    torch.testing.assert_close(h2, h)
    # On the CPU, autocast_kernel_dtype does not lower the precision (documented).
    torch.testing.assert_close(
        compat.mlstm_chunkwise(q.double(), k.double(), v.double(), i.double(), f.double(),
                               autocast_kernel_dtype="bfloat16"),
        vil_kernels.mlstm_parallel(q.double(), k.double(), v.double(), i.double(), f.double()),
        rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="unexpected keyword"):
        compat.mlstm_chunkwise(q, k, v, i, f, chunk_size_intre=16)
    with pytest.raises(ValueError, match="autocast_kernel_dtype"):
        compat.mlstm_chunkwise(q, k, v, i, f, autocast_kernel_dtype=torch.int8)
    with pytest.raises(ValueError, match="reset_mask.*f to -inf at the first position"):
        compat.mlstm_chunkwise(q, k, v, i, f, reset_mask=torch.zeros(1, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        compat.mlstm_chunkwise(q, k, v, i, f, chunk_size=0)


@pytest.mark.parametrize("size, expected", [(1, 16), (16, 16), (20, 16), (24, 32), (64, 64),
                                            (100, 128), (128, 128), (200, 256)])
def test_chunk_size_mapping(size, expected):
    assert compat._valid_chunk_size(size) == expected


# --------------------------------------------------------------------------------------------
# The examples run (smoke test, small sizes).

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in (["--help"], ["--smoke"]):
        r = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{script.name} {argv}: {r.stdout}\n{r.stderr}"
        if argv == ["--smoke"]:
            assert "outputs agree" in r.stdout, r.stdout


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"swap_into_vil.py", "swap_into_xlstm.py"} <= names
