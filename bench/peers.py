"""What bench/throughput.py compares ViL against: DeiT/ViT peers on PyTorch's fused attention,
and ViL running on NX-AI's mlstm_kernels (when installed).

DeiT (Touvron et al. 2021) is the plain ViT recipe at ViL's sizes: patch 16, class token, learned
position embedding, pre-norm blocks with multi-head self-attention and a 4x GELU MLP. Attention
goes through ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on
CUDA). timm's implementation is used when timm is importable (it is what people pick), otherwise
the small one below, which has the same parameter count and FLOPs.
"""


import torch
import torch.nn.functional as F
from torch import nn

# name -> (dim, depth, heads). "deit-test" is a tiny config for the test suite.
DEIT_CONFIGS = {
    "deit-tiny": (192, 12, 3),
    "deit-small": (384, 12, 6),
    "deit-base": (768, 12, 12),
    "vit-large": (1024, 24, 16),
    "deit-test": (32, 1, 2),
}
_TIMM_NAMES = {"deit-tiny": "deit_tiny_patch16_224", "deit-small": "deit_small_patch16_224",
               "deit-base": "deit_base_patch16_224", "vit-large": "vit_large_patch16_224"}


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)                     # (B, H, S, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiT(nn.Module):
    """A DeiT/ViT classifier (class token, no distillation token) at a fixed image size."""

    def __init__(self, dim=192, depth=12, num_heads=3, img_size=224, patch_size=16,
                 num_classes=1000):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def create_deit(name, img_size, num_classes=1000, prefer_timm=True):
    """Returns (model, implementation label). timm when importable (not for "deit-test")."""
    if name not in DEIT_CONFIGS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(DEIT_CONFIGS)}")
    if prefer_timm and name in _TIMM_NAMES:
        try:
            import timm
            model = timm.create_model(_TIMM_NAMES[name], pretrained=False, img_size=img_size,
                                      num_classes=num_classes)
            return model, f"timm {timm.__version__}"
        except ImportError:
            pass
    dim, depth, heads = DEIT_CONFIGS[name]
    return DeiT(dim, depth, heads, img_size=img_size, num_classes=num_classes), "bench/peers.py"


def deit_tokens(img_size, patch_size=16):
    return (img_size // patch_size) ** 2 + 1


def attention_flops(batch, heads, seq, head_dim):
    """Forward FLOPs of softmax(QK^T)V without masking: two S x S x Dh matmuls per head."""
    return 4 * batch * heads * seq * seq * head_dim


# ---------------------------------------------------------------------------------------------
# NX-AI's mlstm_kernels: its chunkwise Triton kernel, and ViL running on it.

# Triton versions whose LLVM aborts the whole process (an SLPVectorizer assertion, "trying to
# erase instruction with users") while optimising these kernels of mlstm_kernels 2.0.6 for
# Hopper, at every head dim and chunk size tried (bench/peer_compile.py reproduces it without a
# GPU; found on an H200 on 2026-11-26). For sm_80 they build. Only those kernels skip LLVM's IR
# optimiser (-O0 for that pass list; code generation and ptxas still optimise fully): at head
# dim 384 that kernel then stores 32 bytes of spills, against 140 with Triton's own switch
# for all of LLVM (DISABLE_LLVM_OPT=1, which also turns off code generation's optimiser).
SLP_ABORT_TRITON_VERSIONS = ("3.6.",)
SLP_ABORT_MIN_CAPABILITY = 90
SLP_ABORT_KERNELS = frozenset({"mlstm_chunkwise__parallel_fw_Hintra_kernel"})


def mlstm_kernels_available():
    try:
        import mlstm_kernels  # noqa: F401
        return True
    except ImportError:
        return False


class _SkipIROptimiserFor:
    """Stands in for the ``llvm`` module seen by Triton's NVIDIA backend: ``optimize_module``
    runs at O0 for modules that define one of ``kernels`` when built for ``capability`` (set by
    the backend's make_llir, see avoid_llvm_abort) at least ``min_capability``."""

    def __init__(self, llvm, kernels, min_capability):
        self._llvm, self._kernels, self._min_capability = llvm, kernels, min_capability
        self.capability = 0

    def __getattr__(self, name):
        return getattr(self._llvm, name)

    def optimize_module(self, module, level, *args, **kwargs):
        if (self.capability >= self._min_capability
                and any(fn.name in self._kernels for fn in module.get_functions())):
            level = self._llvm.OPTIMIZE_O0
        return self._llvm.optimize_module(module, level, *args, **kwargs)


def avoid_llvm_abort(kernels=SLP_ABORT_KERNELS):
    """Lets the peer compile where its Triton would abort (see SLP_ABORT_TRITON_VERSIONS).
    Returns a description of what was changed, or None where nothing needed to be."""
    import triton
    if not triton.__version__.startswith(SLP_ABORT_TRITON_VERSIONS):
        return None
    from triton.backends.nvidia import compiler
    if not isinstance(compiler.llvm, _SkipIROptimiserFor):
        shim = compiler.llvm = _SkipIROptimiserFor(compiler.llvm, kernels,
                                                   SLP_ABORT_MIN_CAPABILITY)
        make_llir = compiler.CUDABackend.make_llir

        def make_llir_noting_capability(self, src, metadata, options, capability):
            shim.capability = capability
            return make_llir(self, src, metadata, options, capability)

        compiler.CUDABackend.make_llir = make_llir_noting_capability
    return (f"Triton {triton.__version__}: LLVM IR optimiser off for "
            f"{', '.join(sorted(kernels))} on sm_{SLP_ABORT_MIN_CAPABILITY}+ (its SLP "
            f"vectorizer aborts there)")


def mlstm_kernels_chunkwise(chunk_size=128, name="chunkwise--triton_xl_chunk", avoid_abort=True):
    """NX-AI's chunkwise kernel ``name`` with vil_kernels.mlstm's call convention (q, k, v:
    (B, NH, S, D); i, f: (B, NH, S) or (B, NH, S, 1); reverse), or None when mlstm_kernels is
    not installed.

    Its kernels need S to be a multiple of ``chunk_size``: the inputs are padded at the end of
    the traversal (exact for a causal recurrence; the copy is part of the peer's time). The
    Triton kernels compute in the inputs' dtype (``autocast_kernel_dtype``; its default would
    run float32). They train with a backward that drops the normalizer's gradient (exact only
    when a per-head norm follows, as in ViL), so the peer is timed, not checked for gradients.
    With ``avoid_abort``, Triton kernels build through ``avoid_llvm_abort``; the returned
    callable's ``workaround`` says what that changed, if anything.
    """
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
        kernel = get_mlstm_kernel(name)
    except Exception:  # noqa: BLE001 - absent or incompatible
        return None
    on_triton = "triton" in name

    def run(q, k, v, i, f, reverse=False, **ignored):
        if i.dim() == 4:
            i, f = i[..., 0], f[..., 0]
        if reverse:
            q, k, v, i, f = (t.flip(2) for t in (q, k, v, i, f))
        S = q.shape[2]
        extra = -S % chunk_size
        if extra:
            q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
            i, f = (F.pad(t, (0, extra)) for t in (i, f))
        kw = {"autocast_kernel_dtype": q.dtype} if on_triton else {}
        h = kernel(q=q, k=k, v=v, i=i, f=f, chunk_size=chunk_size, **kw)[:, :, :S]
        return h.flip(2) if reverse else h

    run.workaround = avoid_llvm_abort() if on_triton and avoid_abort else None
    return run


def mlstm_kernels_cell(chunk_size=64):
    """A cell with vil_kernels.mlstm's call convention that runs NX-AI's chunkwise kernel:
    Triton xl_chunk on CUDA, their native PyTorch chunkwise kernel elsewhere."""
    kernels = {}

    def cell(q, k, v, i, f, reverse=False, **ignored):
        name = ("chunkwise--triton_xl_chunk" if q.device.type == "cuda"
                else "chunkwise--native_autograd")
        if name not in kernels:
            kernels[name] = mlstm_kernels_chunkwise(chunk_size, name)
        return kernels[name](q, k, v, i, f, reverse=reverse)

    return cell
