"""Triton's runtime around the package's kernels (the mLSTM kernels and ViL's fused ones):
interpreter detection, one interpreter fix, and one launcher. Imports no Triton at module level,
so that ``vil`` (whose fused-kernel modules import this) loads on machines without Triton.

Interpreter (TRITON_INTERPRET=1): triton's interpreter (3.2 to 3.6) turns a tensor into a
Python int (``range(n)`` over a runtime loop bound) with ``int(array_of_shape_(1,))``, which
numpy >= 2.4 rejects. We re-register that one conversion with ``.reshape(-1)[0]`` while
kernels run under the interpreter; nothing changes on a GPU.

Launcher: ``launch(kernel, grid, args, **meta)`` is ``kernel[grid](*args, **meta)``, except that
a repeat launch goes straight to the compiled kernel of an earlier launch with the same
_launch_key (the fast path, on the triton releases it was checked against, FAST_LAUNCH_TRITON;
VIL_KERNELS_FAST_LAUNCH=0 turns it off), skipping Triton's per-launch binding, specialization
and cache key. Both paths hand Triton's launcher the same grid, function and arguments:
``python bench/launch_overhead.py --check`` runs every kernel of the package through Triton's
real JIT against a stand-in CUDA driver that records the launches, and compares them
(tests/test_fast_launch.py). On a 2-core AMD EPYC host (same tool) an mLSTM
kernel's launch took 13-27 us through Triton 3.6's path and 8-20 us through this one. Under
the interpreter it is always the plain call.
"""

import os

import torch


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def patch_interpreter():
    if not interpreting():
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_vil_kernels_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, *scope):
        # (tensor, scope) in triton 3.6; (tensor) in 3.2 and 3.4, which set the attribute directly
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.reshape(-1)[0])   # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._vil_kernels_patched = True


# Triton releases the fast path was checked against (it calls a compiled kernel the way their
# JIT does; the check reads their driver internals). Others take Triton's own path.
FAST_LAUNCH_TRITON = ("3.6.",)


def _triton_version():
    """The installed triton's version without importing it ("" when it is not installed)."""
    from importlib import metadata
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


FAST_LAUNCH = (os.environ.get("VIL_KERNELS_FAST_LAUNCH", "1") != "0"
               and _triton_version().startswith(FAST_LAUNCH_TRITON))
# Fixed at import, as Triton fixes it when the kernels are decorated (reading the environment
# costs ~1.5 us, and it was read about twenty times a forward and backward).
INTERPRETED = interpreting()
_compiled = {}                              # _launch_key -> (compiled kernel, constexpr values)
# Distinct keys kept before the cache starts over (a key holds exact scalars: shapes that keep
# changing would otherwise grow it without bound).
MAX_KEYS = 4096
_Tensor = torch.Tensor


def _launch_key(kernel, args, meta):
    """What decides which compiled variant of a kernel a launch runs: tensors by dtype and by
    16-byte alignment (Triton's only tensor specialization on NVIDIA), every other argument and
    the launch options by value (stricter than Triton's key, which keeps only an int's
    divisibility by 16 and whether it is 1: a new shape just takes the normal path once).
    One flat tuple built in one pass: this runs every launch (~10 us for 30 arguments)."""
    key = [kernel, args[0].device.index]
    add = key.append
    for a in args:
        if isinstance(a, _Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        else:
            add(a)
    key.extend(meta.items())
    return tuple(key)


def launch(kernel, grid, args, **meta):
    """Launch ``kernel`` on ``grid`` (a tuple) with runtime ``args`` (positional, in order) and
    the constexprs and launch options in ``meta``."""
    if INTERPRETED:
        patch_interpreter()            # here, so that no launch site can run without it
        kernel[grid](*args, **meta)
        return
    if not FAST_LAUNCH:
        kernel[grid](*args, **meta)
        return
    key = _launch_key(kernel, args, meta)
    hit = _compiled.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        names = kernel.arg_names[len(args):]            # the constexprs, after the runtime args
        if compiled is not None and all(n in meta for n in names):
            if len(_compiled) >= MAX_KEYS:
                _compiled.clear()
            _compiled[key] = (compiled, tuple(meta[n] for n in names))
        return
    compiled, consts = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *consts)
