"""What machine a benchmark runs on, and how much memory a block of steps takes there.

Shared by bench/throughput.py and bench/kernels.py.
"""

import ctypes
import os
import platform
from pathlib import Path

import torch

import vil_kernels


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_slug(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    slug = "-".join(filter(None, slug.split("-")))
    return ("cuda-" if device.type == "cuda" else "cpu-") + slug


def versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return {"torch": torch.__version__, "triton": tv, "vil_kernels": vil_kernels.__version__,
            "python": platform.python_version()}


_M_MMAP_THRESHOLD = -3                 # glibc mallopt parameter
_MMAP_WHILE_MEASURING = 1 << 16        # large blocks straight from and back to the OS
_MMAP_OTHERWISE = 32 << 20             # glibc's own upper bound: large blocks reused, fast


class PeakMemory:
    """Peak memory of a block of steps in bytes (None where it cannot be measured).

    On CPU it is the growth of the peak resident set between start() and stop(). Only inside
    that window are large allocations served by mmap (so a step's peak is not hidden by memory
    malloc kept from the step before); that costs page faults, so time steps outside it."""

    def __init__(self, device):
        self.device = device
        self.cpu_ok = False
        self._libc = None
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._libc = ctypes.CDLL("libc.so.6")
                self.cpu_ok = True
            except (OSError, AttributeError):
                pass
        self.kind = ("cuda max_memory_allocated (all allocations)" if device.type == "cuda" else
                     "cpu peak RSS growth over one untimed step (activations and temporaries)"
                     if self.cpu_ok else "not measured")

    @staticmethod
    def _status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            self._libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_WHILE_MEASURING)
            self._libc.malloc_trim(0)          # hand back free blocks malloc kept, or the step
            Path("/proc/self/clear_refs").write_text("5")   # reuses them without RSS growth
            self._base = self._status("VmRSS")

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.cpu_ok:
            peak = max(self._status("VmHWM") - self._base, 0)
            self._libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_OTHERWISE)
            return peak
        return None
