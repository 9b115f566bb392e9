"""What machine a benchmark runs on, and how much memory a block of steps takes there.

Shared by bench/throughput.py and bench/kernels.py.
"""

import ctypes
import json
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


def kernel_settings():
    """The $VIL_KERNELS_* settings of this process, for a results file: the same code runs other
    kernels or launch parameters under them (a launch table, the flash forms, ...). A launch
    table's entries are copied in, so that the file says what ran even if the table is gone."""
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VIL_KERNELS_")}
    out = {"env": env}
    path = env.get("VIL_KERNELS_LAUNCH_TABLE")
    if path:
        try:
            out["launch_table"] = json.loads(Path(path).read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            out["launch_table"] = f"unreadable: {type(e).__name__}"
    return out


def versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return {"torch": torch.__version__, "triton": tv, "vil_kernels": vil_kernels.__version__,
            "python": platform.python_version()}


_M_TRIM_THRESHOLD = -1                 # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
_MMAP_WHILE_MEASURING = 1 << 16        # large blocks straight from and back to the OS
_TRIM_WHILE_MEASURING = 128 << 10      # glibc's default
_MMAP_OTHERWISE = 32 << 20             # glibc's own upper bound: large blocks reused...
_TRIM_OTHERWISE = 1 << 30              # ...and freed memory kept, not handed back to the OS
ALLOCATOR_NOTE = ("glibc malloc with mmap threshold 32 MiB and trim threshold 1 GiB while timing "
                  "(what jemalloc/tcmalloc or MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ give "
                  "any PyTorch CPU job): freed temporaries are reused instead of page-faulted in "
                  "again every step")


class PeakMemory:
    """Peak memory of a block of steps in bytes (None where it cannot be measured).

    On CPU it is the growth of the peak resident set between start() and stop(). Only inside
    that window are large allocations served by mmap and freed memory handed back (so a step's
    peak is not hidden by memory malloc kept from the step before); that costs page faults on
    every allocation, so time steps outside it. Outside it, from construction on, malloc keeps
    what it frees: with glibc's defaults a step of a model with many large temporaries spends a
    large part of its time in page faults (the ViL-T mLSTM cell on CPU: 3,000 faults and 9 ms
    of system time a call), which measures the allocator, not the model."""

    def __init__(self, device, tune_malloc=True):
        self.device = device
        self.cpu_ok = False
        self._libc = None
        if device.type == "cpu" and tune_malloc and Path("/proc/self/clear_refs").exists():
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._libc = ctypes.CDLL("libc.so.6")
                self.cpu_ok = True
            except (OSError, AttributeError):
                pass
        if self.cpu_ok:
            self._malloc(_MMAP_OTHERWISE, _TRIM_OTHERWISE)
        self.kind = ("cuda max_memory_allocated (all allocations)" if device.type == "cuda" else
                     "cpu peak RSS growth over one untimed step (activations and temporaries)"
                     if self.cpu_ok else "not measured" + ("" if tune_malloc else
                                                          " (glibc malloc left at its defaults)"))

    def _malloc(self, mmap_threshold, trim_threshold):
        self._libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        self._libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)

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
            self._malloc(_MMAP_WHILE_MEASURING, _TRIM_WHILE_MEASURING)
            self._libc.malloc_trim(0)          # hand back free blocks malloc kept, or the step
            Path("/proc/self/clear_refs").write_text("5")   # reuses them without RSS growth
            self._base = self._status("VmRSS")

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.cpu_ok:
            peak = max(self._status("VmHWM") - self._base, 0)
            self._malloc(_MMAP_OTHERWISE, _TRIM_OTHERWISE)
            return peak
        return None
