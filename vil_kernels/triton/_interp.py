"""TRITON_INTERPRET=1 support: detection, and one compatibility fix for the interpreter.

triton 3.6's interpreter turns a tensor into a Python int (``range(n)`` over a runtime loop
bound) with ``int(array_of_shape_(1,))``, which numpy >= 2.4 rejects. We re-register that one
conversion with ``.reshape(-1)[0]`` while kernels run under the interpreter; nothing changes on
a GPU.
"""

import os


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
