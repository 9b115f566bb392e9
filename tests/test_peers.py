"""bench/peers.py's wrapper of NX-AI's mlstm_kernels, without mlstm_kernels: a stand-in kernel
with its constraints (S a multiple of the chunk size, gates (B, NH, S)) checks the padding and
direction handling, and fake LLVM objects check the compile workaround's targeting."""

import sys
import types
from pathlib import Path

import pytest
import torch

import vil_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # noqa: E402


@pytest.fixture
def fake_mlstm_kernels(monkeypatch):
    """mlstm_kernels.torch.get_mlstm_kernel returning a kernel that insists on whole chunks."""
    calls = []

    def get_mlstm_kernel(name):
        def kernel(q, k, v, i, f, chunk_size, **kw):
            S = q.shape[2]
            assert S % chunk_size == 0, "S must be a multiple of the chunk size"
            assert i.shape == f.shape == q.shape[:3]
            calls.append((name, S, kw))
            return vil_kernels.mlstm(q, k, v, i, f, backend="parallel")
        return kernel

    pkg = types.ModuleType("mlstm_kernels")
    sub = types.ModuleType("mlstm_kernels.torch")
    sub.get_mlstm_kernel = get_mlstm_kernel
    pkg.torch = sub
    monkeypatch.setitem(sys.modules, "mlstm_kernels", pkg)
    monkeypatch.setitem(sys.modules, "mlstm_kernels.torch", sub)
    return calls


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gate_dims", [3, 4])
def test_peer_wrapper_pads_to_whole_chunks_exactly(fake_mlstm_kernels, reverse, gate_dims):
    g = torch.Generator().manual_seed(0)
    B, NH, S, D = 2, 3, 50, 8
    q, k, v = (torch.randn(B, NH, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    i, f = (torch.randn(B, NH, S, generator=g, dtype=torch.float64) for _ in range(2))
    peer = peers.mlstm_kernels_chunkwise(16, avoid_abort=False)
    gi, gf = (i[..., None], f[..., None]) if gate_dims == 4 else (i, f)
    h = peer(q, k, v, gi, gf, reverse=reverse)
    want = vil_kernels.mlstm(q, k, v, i, f, reverse=reverse, backend="parallel")
    assert h.shape == want.shape
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    name, padded, kw = fake_mlstm_kernels[-1]
    assert (name, padded, kw) == ("chunkwise--triton_xl_chunk", 64,
                                  {"autocast_kernel_dtype": torch.float64})
    assert peer.workaround is None


def test_peer_cell_uses_the_native_kernel_on_cpu(fake_mlstm_kernels):
    x = [torch.randn(1, 2, 20, 4, dtype=torch.float64) for _ in range(3)]
    gates = [torch.randn(1, 2, 20, 1, dtype=torch.float64) for _ in range(2)]
    h = peers.mlstm_kernels_cell(chunk_size=8)(*x, *gates, reverse=True)
    assert h.shape == (1, 2, 20, 4)
    assert fake_mlstm_kernels[-1] == ("chunkwise--native_autograd", 24, {})


def test_peer_absent_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlstm_kernels", None)   # import raises ImportError
    monkeypatch.setitem(sys.modules, "mlstm_kernels.torch", None)
    assert peers.mlstm_kernels_chunkwise() is None
    assert not peers.mlstm_kernels_available()


class _FakeFunction:
    def __init__(self, name):
        self.name = name


class _FakeModule:
    def __init__(self, *names):
        self.names = names

    def get_functions(self):
        return [_FakeFunction(n) for n in self.names]


class _FakeLLVM:
    OPTIMIZE_O0, OPTIMIZE_O3 = "O0", "O3"

    def __init__(self):
        self.levels = []

    def optimize_module(self, module, level):
        self.levels.append(level)

    def context(self):
        return "ctx"


def test_llvm_workaround_only_touches_the_named_kernels_on_hopper():
    llvm = _FakeLLVM()
    shim = peers._SkipIROptimiserFor(llvm, {"bad_kernel"}, 90)
    assert shim.context() == "ctx"   # everything else is the real module's
    for capability in (80, 90):
        shim.capability = capability
        shim.optimize_module(_FakeModule("bad_kernel", "helper"), llvm.OPTIMIZE_O3)
        shim.optimize_module(_FakeModule("good_kernel"), llvm.OPTIMIZE_O3)
    assert llvm.levels == ["O3", "O3", "O0", "O3"]


def test_avoid_llvm_abort_installs_once_and_notes_the_capability(monkeypatch):
    import triton
    from triton.backends.nvidia import compiler
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(compiler, "llvm", _FakeLLVM())
    seen = []
    monkeypatch.setattr(compiler.CUDABackend, "make_llir",
                        lambda self, src, metadata, options, capability: seen.append(capability))
    note = peers.avoid_llvm_abort()
    assert "mlstm_chunkwise__parallel_fw_Hintra_kernel" in note and "3.6.0" in note
    shim = compiler.llvm
    assert isinstance(shim, peers._SkipIROptimiserFor)
    peers.avoid_llvm_abort()
    assert compiler.llvm is shim   # not wrapped twice
    compiler.CUDABackend.make_llir(None, "src", {}, None, 90)
    assert seen == [90] and shim.capability == 90
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    assert peers.avoid_llvm_abort() is None   # versions not known to abort are left alone
