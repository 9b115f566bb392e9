"""Fused Triton kernels of the chunkwise mLSTM: ``mlstm_triton`` (called by
``vil_kernels.mlstm(..., backend="triton")``), the autograd Function and the torch.library ops
``vil_kernels::mlstm_chunk_fwd`` / ``vil_kernels::mlstm_chunk_bwd``."""

from .chunk import MLSTMTritonFunction, mlstm_bwd, mlstm_fwd, mlstm_triton

__all__ = ["mlstm_triton", "MLSTMTritonFunction", "mlstm_fwd", "mlstm_bwd"]
