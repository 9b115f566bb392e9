"""Fused chunkwise mLSTM kernels (xLSTM) and the operator the Vision-LSTM builds on."""

from .mlstm import BACKENDS, mlstm
from .naive import mlstm_parallel, mlstm_recurrent
from . import compat  # noqa: E402  (vil_kernels.compat.parallel_stabilized_simple, ...)

__all__ = ["mlstm", "mlstm_parallel", "mlstm_recurrent", "BACKENDS", "compat"]
__version__ = "0.1.0"
