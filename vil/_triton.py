"""Triton for the model's fused kernels (triton_conv, triton_gating, triton_norm): imported once,
``triton`` and ``tl`` None where it cannot be imported (the PyTorch paths are used then)."""

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any failure to import means no Triton
    triton = tl = None


# what differentiating the fused kernels' gradients raises (vil_kernels.utils.first_order_only)
SECOND_ORDER = ("ViL's fused {} kernel computes first-order gradients only; for second-order "
                "ones (a gradient penalty, Hessian-vector products) set "
                "vil.model.FUSED_KERNELS = False (the PyTorch path around the cell) and build "
                "the model with mlstm_backend='parallel'")


def available():
    return triton is not None


def tiles(n, tile):
    """(rows, n padded to a power of two) of a program's [rows, n] tile of about ``tile``
    elements (1 to 64 rows): the row-tiled kernels' (norms, gating) block shape."""
    padded = 1 << (n - 1).bit_length()
    return max(1, min(64, tile // padded)), padded
