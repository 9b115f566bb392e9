"""Test-wide setup: without a CUDA device the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: keep intra-op threads from oversubscribing them.
torch.set_num_threads(min(torch.get_num_threads(), 2))
