"""A stand-in CUDA driver for Triton: the real launch path on a machine without a GPU.

Installed with ``with fake_cuda_driver() as drv:``, Triton's JIT binds, specializes, caches and
compiles (for sm_90 by default, ptxas included) exactly as on a GPU; only the last step is
replaced: loading the cubin (its registers and spills are read with cuobjdump, as the driver
would report them) and ``cuLaunchKernel``. Every launch is recorded instead, as
``drv.calls``: (grid, stream, function handle, packed metadata, the argument list handed to the
launcher). Tensors are CPU tensors; the kernels never run, so outputs are whatever the buffers
held (integer buffers are zeroed, so index tensors stay in range for the host code after them).

Uses: the host time of Triton's launcher next to vil_kernels' fast path on any machine
(bench/launch_overhead.py), and a check that both paths hand the launcher the same arguments
(tests/test_fast_launch.py).
"""

import contextlib
import itertools

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


def cubin_usage(cubin):
    """(registers, local memory bytes a thread) of a cubin's kernel, from cuobjdump
    -res-usage: what the CUDA driver reports for a loaded function (local memory: the spill
    stack, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)."""
    import re
    import subprocess
    import tempfile

    from vil_kernels.compile_check import triton_tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton_tool("cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])


class _Utils:
    def __init__(self):
        self._handles = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads a block); spills as Triton's
        # driver gives them: local bytes a thread / 4
        regs, local = cubin_usage(kernel)
        return next(self._handles), next(self._handles), regs, local // 4, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}


class FakeCudaDriver:
    """The parts of triton.backends.nvidia.driver.CudaDriver that the JIT and CompiledKernel
    use, for one device of compute capability ``arch`` (90: Hopper)."""

    STREAM = 0x5EED

    def __init__(self, arch=90, zero_int_buffers=True):
        self.arch = arch
        self.zero_int_buffers = zero_int_buffers
        self.calls = []
        self.record = True
        self.utils = _Utils()
        self.launcher_cls = self._launcher

    # device and stream
    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return self.STREAM

    def get_device_capability(self, device=None):
        return divmod(self.arch, 10)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("the fake CUDA driver cannot time kernels")

    @staticmethod
    def is_active():
        return False

    # the launcher: what CompiledKernel.run is
    def _launcher(self, src, metadata):
        owner = self
        int_args = None                 # positions of the integer tensors, found once

        def run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
                exit_hook, *args):
            nonlocal int_args
            if owner.zero_int_buffers:
                if int_args is None:
                    int_args = [i for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor) and not a.is_floating_point()]
                for i in int_args:
                    args[i].zero_()
            if owner.record:
                owner.calls.append(((gx, gy, gz), stream, function, packed_metadata, args))

        return run


@contextlib.contextmanager
def fake_cuda_driver(arch=90, zero_int_buffers=True):
    """Make a FakeCudaDriver Triton's active driver for the block (the previous one after)."""
    previous = driver._active
    fake = FakeCudaDriver(arch, zero_int_buffers)
    driver.set_active(fake)
    try:
        yield fake
    finally:
        driver._active = previous
