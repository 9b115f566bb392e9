"""Triton for the model's fused kernels (triton_conv, triton_gating, triton_norm): imported once,
``triton`` and ``tl`` None where it cannot be imported (the PyTorch paths are used then)."""

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any failure to import means no Triton
    triton = tl = None


def available():
    return triton is not None
