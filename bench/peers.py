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
# ViL on NX-AI's mlstm_kernels.

def mlstm_kernels_available():
    try:
        import mlstm_kernels  # noqa: F401
        return True
    except ImportError:
        return False


def mlstm_kernels_cell(chunk_size=64):
    """A cell with vil_kernels.mlstm's call convention that runs NX-AI's chunkwise kernel:
    Triton xl_chunk on CUDA, their native PyTorch chunkwise kernel elsewhere.

    Their kernels take gates (B, NH, S), compute in ``autocast_kernel_dtype`` (the input's dtype
    here) and train with a backward that drops the normalizer's gradient (exact only when a
    per-head norm follows, as it does in ViL), so the peer is timed, not checked for gradients.
    """
    from mlstm_kernels.torch import get_mlstm_kernel

    kernels = {}

    def cell(q, k, v, i, f, reverse=False, **ignored):
        name = ("chunkwise--triton_xl_chunk" if q.device.type == "cuda"
                else "chunkwise--native_autograd")
        if name not in kernels:
            kernels[name] = get_mlstm_kernel(name)
        if i.dim() == 4:
            i, f = i[..., 0], f[..., 0]
        if reverse:
            q, k, v, i, f = (t.flip(2) for t in (q, k, v, i, f))
        kw = dict(chunk_size=chunk_size)
        if q.device.type == "cuda":
            kw["autocast_kernel_dtype"] = q.dtype
        h = kernels[name](q=q, k=k, v=v, i=i, f=f, **kw)
        return h.flip(2) if reverse else h

    return cell
