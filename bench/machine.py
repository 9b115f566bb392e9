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


class PeakMemory:
    """Peak memory of a block of steps in bytes (None where it cannot be measured)."""

    def __init__(self, device):
        self.device = device
        self.cpu_ok = False
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")
                # Return large frees to the OS at once so that one step's peak is not hidden by
                # memory malloc kept from the previous one.
                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)          # M_MMAP_THRESHOLD
                self.cpu_ok = True
            except OSError:
                pass
        self.kind = ("cuda max_memory_allocated (all allocations)" if device.type == "cuda" else
                     "cpu peak RSS growth over the timed steps (activations and temporaries)"
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
            Path("/proc/self/clear_refs").write_text("5")
            self._base = self._status("VmRSS")

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.cpu_ok:
            return max(self._status("VmHWM") - self._base, 0)
        return None
