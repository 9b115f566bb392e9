"""Triton's runtime around the package's kernels (the mLSTM kernels and ViL's fused ones):
interpreter detection, fixes to the interpreter, and one launcher. Imports no Triton at module
level, so that ``vil`` (whose fused-kernel modules import this) loads on machines without
Triton.

Interpreter (TRITON_INTERPRET=1): three fixes while kernels run under it; nothing changes on
a GPU. Triton's interpreter (3.2 to 3.6) turns a tensor into a Python int (``range(n)`` over a
runtime loop bound) with ``int(array_of_shape_(1,))``, which numpy >= 2.4 rejects: that one
conversion is re-registered with ``.reshape(-1)[0]``. From 3.8 it reduces ``tl.max(x,
return_indices=True)`` with numpy's nanargmax, which raises on a row of NaNs (a GPU returns
NaN and an index): such rows get NaN and index 0. Its comparisons tag their boolean results
with the operands' type, so a mask such as ``m_k & (i_v == 0)`` (a block and a scalar
condition) is splat to int32; 3.9's loads and stores refuse a mask that is not bool: masks
are made bool (nonzero: true) before they reach them.

FP fusion: every launch asks for it (``enable_fp_fusion=True``, a*b+c as one FMA), the
default the kernels were written, checked and timed with. Triton 3.9 warns when a launch
leaves it to the default, whose value changes in 3.10.

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

Spill guard: where a build spills under its register cap (a cap tuned with another release's
ptxas, or ptxas's own choice), later launches of it take the cap off if that spills less
(UNCAPPED, below).
"""

import functools
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
    builder = interpreter.InterpreterBuilder
    builder.create_masked_load = _bool_mask(builder.create_masked_load, 1)
    builder.create_masked_store = _bool_mask(builder.create_masked_store, 2)
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    if reduce_ops is not None and hasattr(reduce_ops, "min_max"):
        reduce_ops.min_max = _nan_rows_safe(reduce_ops.min_max)
    interpreter._vil_kernels_patched = True


def _bool_mask(create, at):
    """A builder's masked load or store whose mask (argument ``at`` after self) is made bool."""
    from triton.runtime.interpreter import TensorHandle

    def wrapped(self, *args):
        mask = args[at]
        if mask.data.dtype != bool:
            args = (*args[:at], TensorHandle(mask.data != 0, mask.dtype), *args[at + 1:])
        return create(self, *args)
    return wrapped


def _nan_rows_safe(min_max):
    """ReduceOps.min_max whose nanargmax/nanargmin give index 0 on a row of NaNs (numpy
    raises there); the value reduction (nanmax: NaN there) is left as it is."""
    import warnings

    import numpy as np

    def safe(op):
        def arg(a, axis=None, keepdims=False):
            rows = np.isnan(a).all(axis=axis, keepdims=True)
            return op(np.where(rows, 0, a), axis=axis, keepdims=keepdims)
        return arg

    def wrapped(self, input, val_reduce_op, idx_reduce_op=None):
        if idx_reduce_op not in (np.nanargmax, np.nanargmin):
            return min_max(self, input, val_reduce_op, idx_reduce_op)
        with warnings.catch_warnings():             # nanmax's "All-NaN slice" warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return min_max(self, input, val_reduce_op, safe(idx_reduce_op))
    return wrapped


# Triton releases the fast path was checked against (it calls a compiled kernel the way their
# JIT does; the check reads their driver internals): 3.6 in CI, 3.8 and 3.9 by hand
# (2026-11-28; their JIT specializes tensors and ints as 3.6's does, by the same backend
# rules). Others take Triton's own path.
FAST_LAUNCH_TRITON = ("3.6.", "3.8.", "3.9.")


@functools.cache
def _triton_version():
    """The installed triton's version without importing it ("" when it is not installed)."""
    from importlib import metadata
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


# Options every launch asks for unless it says otherwise, and every ahead-of-time build
# (compile_check, vil.triton_check) with it: FP fusion, see above.
OPTIONS = {"enable_fp_fusion": True}

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
    the constexprs and launch options in ``meta`` (FP fusion on unless it says otherwise)."""
    if INTERPRETED:
        patch_interpreter()            # here, so that no launch site can run without it
        kernel[grid](*args, **{**OPTIONS, **meta})
        return
    if FAST_LAUNCH:
        key = _launch_key(kernel, args, meta)   # the caller's meta: OPTIONS are the same
        hit = _compiled.get(key)
        if hit is not None:
            compiled, consts = hit
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *consts)
            return
    meta = {**OPTIONS, **meta}
    guarded = _guarded.get(kernel)
    run_meta = guarded.get(_spill_key(args, meta), meta) if guarded else meta
    compiled = kernel[grid](*args, **run_meta)
    if run_meta is meta and spilled(compiled, meta):
        guarded = _guarded.setdefault(kernel, {})
        key_s = _spill_key(args, meta)
        if key_s not in guarded:
            run_meta, compiled = _spill_free(kernel, grid, args, meta, compiled)
            guarded[key_s] = run_meta
    if FAST_LAUNCH:
        names = kernel.arg_names[len(args):]            # the constexprs, after the runtime args
        if compiled is not None and all(n in meta for n in names):
            if len(_compiled) >= MAX_KEYS:
                _compiled.clear()
            _compiled[key] = (compiled, tuple(meta[n] for n in names))


# Spill guard: a register cap (``maxnreg``, or none: ptxas's own choice) is a tuning choice
# checked with one ptxas (compile_check); another release's ptxas can meet it only by spilling
# (3.9's spilled 8-44 bytes in 25 of 1660 default-path builds at caps chosen on 3.6). A build
# that has run with local memory under a cap below UNCAPPED is built again at UNCAPPED. Where
# that one uses less, every later launch of the same kernel, device, options and tensor dtypes
# runs it (fewer programs an SM instead of local-memory traffic); otherwise the capped build
# (local memory can also be a stack frame that no cap removes). compile_check and
# vil.triton_check report the same lifts.
UNCAPPED = 255                      # the most registers a thread can have
_guarded = {}                       # kernel -> {_spill_key: the meta its launches run with}


def _spill_key(args, meta):
    # (the device: GPUs of two architectures build differently)
    return (args[0].device.index, *meta.items(),
            *(a.dtype for a in args if isinstance(a, _Tensor)))


def _spill_free(kernel, grid, args, meta, compiled):
    """(meta, compiled kernel) that launches of a build that spilled (``compiled``, built from
    ``meta``) run from now on: uncapped where that build has less local memory."""
    lifted = {**meta, "maxnreg": UNCAPPED}
    uncapped = kernel.warmup(*args, grid=grid, **lifted)       # built, not run
    uncapped._init_handles()                                    # (the driver's spill count)
    if uncapped.n_spills < compiled.n_spills:
        return lifted, uncapped
    return meta, compiled


def spilled(compiled, meta):
    """Whether a build that has run (``kernel[grid](...)``'s result, whose ``n_spills`` the
    driver sets: local memory a thread / 4) has local memory under a cap that can be lifted."""
    return bool(getattr(compiled, "n_spills", 0)) and meta.get("maxnreg") != UNCAPPED
