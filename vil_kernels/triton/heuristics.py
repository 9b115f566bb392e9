"""Launch parameters of the chunkwise mLSTM kernels, keyed on (head dims, dtype, arch).

Without a GPU to autotune on, the table encodes the constraints we can check ahead of time
(``python -m vil_kernels.compile_check``: no spills, shared memory under the arch's limit, tensor
cores used for 16-bit inputs): head dims are tiled by the largest of 64 / 32 / 16 that divides
them (96 -> 3 x 32, 192 -> 3 x 64, 384 -> 6 x 64: no padding of 96 up to 128), one chunk of 64
positions by default (fewer for short sequences), at most 128 (float32 inputs: 32), 4 warps below
64 positions, 8 from 64, head-dim tiles of at most 32 at 128 positions (V tiles of 16 in the
outputs kernel).
On a GPU, entries can be refined per arch from bench/kernels.py measurements.
"""

import torch

from ..utils import next_power_of_2

# Largest chunk the fused kernels run: at BT = 128 the [BT, BT] float32 tiles (q k^T, scores,
# dS) take 64 registers a thread each at 8 warps, so the head-dim tiles shrink to 32; a requested
# chunk_size of 256 runs as 128, which computes the same function (the chunk length only changes
# the rounding).
MAX_BT = 128
DEFAULT_BT = 64
# ptxas otherwise sometimes settles on 128 registers and spills a few bytes (compile_check
# caught 8-byte spills at exactly 128 registers in four variants): let it use up to 255.
MAXNREG = 255
KERNELS = ("fwd_state", "fwd_out", "bwd_state", "bwd_dqk", "bwd_dv")


def device_arch(device):
    """sm version as an int (80, 90, ...) for CUDA devices; 0 for the interpreter on the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def head_block(D):
    """Tile of a head dim: 64, 32 or 16 if it divides D (no masked lanes), else <= 64, masked."""
    for blk in (64, 32, 16):
        if D % blk == 0:
            return blk
    return min(64, max(16, next_power_of_2(D)))


def max_chunk(dtype):
    """Largest chunk the kernels run without register spills for an input dtype: float32 operands
    (tf32x3: every tile split in two) need twice the registers of 16-bit ones."""
    return 32 if dtype == torch.float32 else MAX_BT


def chunk_len(S, DK, DV, dtype, arch, requested=None):
    """Positions per chunk BT: the requested power of two (capped at max_chunk(dtype)), else the
    default, shortened for sequences that fit one smaller chunk. The chunk length only changes
    the rounding, never the function."""
    cap = max_chunk(dtype)
    if requested is not None:
        return min(int(requested), cap)
    return max(16, min(DEFAULT_BT, cap, next_power_of_2(S)))


def launch_params(kernel, DK, DV, BT, dtype, arch):
    """BK, BV, num_warps, num_stages, maxnreg for one kernel. dtype: the inputs' torch dtype."""
    assert kernel in KERNELS, kernel
    BK, BV = head_block(DK), head_block(DV)
    if dtype == torch.float32:
        # tf32x3 splits every fp32 operand into two tf32 tiles: half-size head-dim tiles
        BK, BV = min(BK, 32), min(BV, 32)
    if BT >= 128:
        BK, BV = min(BK, 32), min(BV, 32 if kernel != "fwd_out" else 16)
    num_warps = 8 if BT >= 64 else 4
    num_stages = 1
    return dict(BK=BK, BV=BV, num_warps=num_warps, num_stages=num_stages, maxnreg=MAXNREG)


def dot_config(dtype):
    """(MMA operand dtype, accumulator dtype, tl.dot input_precision) names for an input dtype.
    float32 inputs use tf32x3 (three TF32 tensor-core products, float32-level accuracy; plain
    TF32 would miss the 2e-4 contract)."""
    if dtype == torch.float64:
        return "fp64", "fp64", "ieee"
    if dtype == torch.float32:
        return "fp32", "fp32", "tf32x3"
    if dtype == torch.float16:
        return "fp16", "fp32", "ieee"
    return "bf16", "fp32", "ieee"
