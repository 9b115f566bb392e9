"""Triton's runtime around the package's kernels (the mLSTM kernels and ViL's fused ones):
interpreter detection, one interpreter fix, and one launcher. Imports no Triton at module level,
so that ``vil`` (whose fused-kernel modules import this) loads on machines without Triton.

Interpreter (TRITON_INTERPRET=1): triton 3.6's interpreter turns a tensor into a Python int
(``range(n)`` over a runtime loop bound) with ``int(array_of_shape_(1,))``, which numpy >= 2.4
rejects. We re-register that one conversion with ``.reshape(-1)[0]`` while kernels run under the
interpreter; nothing changes on a GPU.

Launcher: ``launch(kernel, grid, args, **meta)`` is ``kernel[grid](*args, **meta)``. With
VIL_KERNELS_FAST_LAUNCH=1 (experimental, off by default until a GPU run checks it) a repeat
launch goes straight to the compiled kernel of an earlier launch with the same _launch_key,
skipping Triton's per-launch binding, cache key (it formats the options as a string every
launch) and checks: at small shapes an mLSTM forward and backward took ~1.8 ms of an H200
machine's host time, about a quarter of it in Triton's launcher (cProfile: ~85 us a launch,
seven launches), and a ViL block launches about ten more. Under the interpreter it is always
the plain call.
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

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._vil_kernels_patched = True


FAST_LAUNCH = os.environ.get("VIL_KERNELS_FAST_LAUNCH", "") == "1"
# Fixed at import, as Triton fixes it when the kernels are decorated (reading the environment
# costs ~1.5 us, and it was read about twenty times a forward and backward).
INTERPRETED = interpreting()
_compiled = {}                              # _launch_key -> (compiled kernel, constexpr values)


def _launch_key(kernel, args, meta):
    """What decides which compiled variant of a kernel a launch runs: tensors by dtype and by
    16-byte alignment (Triton's only tensor specialization on NVIDIA), every other argument and
    the launch options by value (stricter than Triton's key, which keeps only an int's
    divisibility by 16 and whether it is 1: a new shape just takes the normal path once)."""
    spec = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                 for a in args)
    return kernel, args[0].device.index, spec, tuple(meta.items())


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
        if all(n in meta for n in names):
            _compiled[key] = (compiled, tuple(meta[n] for n in names))
        return
    compiled, consts = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *consts)
