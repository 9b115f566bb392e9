"""Fused chunkwise mLSTM kernels (xLSTM) and the operator the Vision-LSTM builds on."""

from .mlstm import BACKENDS, mlstm
from .naive import mlstm_parallel, mlstm_recurrent

__all__ = ["mlstm", "mlstm_parallel", "mlstm_recurrent", "BACKENDS"]
__version__ = "0.1.0"
