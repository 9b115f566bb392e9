"""Can this machine's Triton build NX-AI's mlstm_kernels? Ahead of time, no GPU needed.

    python bench/peer_compile.py [--head-dims 96 192 384] [--arch 90]

Runs the peer's chunkwise--triton_xl_chunk forward and backward (``peers.mlstm_kernels_chunkwise``,
bfloat16, S=784 padded to chunks of 128) on CPU tensors with every Triton launch replaced by an
ahead-of-time build for the given arch: nothing runs and the outputs mean nothing, but the builds
are the ones a GPU would get. Each head dim is tried twice, each time in a child process (an LLVM
assertion aborts the process that compiles): as Triton builds it, and with
``peers.avoid_llvm_abort``. Prints each kernel's registers and spill bytes, or how the child died.
Needs mlstm_kernels installed; tells the next GPU session whether the peer will build there.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(D, arch, workaround):
    """Builds the peer's kernels for head dim D; one JSON line per kernel on stdout."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import peers
    from vil_kernels.compile_check import ptxas_usage

    target = GPUTarget("cuda", arch, 32)

    class CompileOnly:  # what JITFunction.run asks the active driver for
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    built = set()

    def build_instead_of_launch(fn, key, signature, device, constexprs, options, attrs, warmup):
        if (fn, key) in built:   # the backward recomputes with a kernel the forward built
            return None
        built.add((fn, key))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(fn.ASTSource(fn, signature, constexprs, attrs),
                                    target=target, options=options.__dict__)
        regs, spill = ptxas_usage(log.getvalue())
        print(json.dumps({"kernel": fn.fn.__name__, "warps": options.num_warps, "regs": regs,
                          "spill": spill, "smem": kernel.metadata.shared}), flush=True)
        return None  # no kernel: JITFunction.run returns without launching

    driver.set_active(CompileOnly())
    JITFunction._do_compile = build_instead_of_launch
    knobs.nvidia.dump_ptxas_log = True
    knobs.cache.dir = tempfile.mkdtemp(prefix="vil_peer_cc_")  # fresh: ptxas must run

    peer = peers.mlstm_kernels_chunkwise(128, avoid_abort=workaround)
    if peer is None:
        print(json.dumps({"error": "mlstm_kernels is not installed"}), flush=True)
        return
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 4, 784, D, generator=g, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]
    gates = [torch.randn(1, 4, 784, generator=g, dtype=torch.bfloat16, requires_grad=True)
             for _ in range(2)]
    peer(*qkv, *gates).float().sum().backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[96, 192, 384])
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90))
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    failed = False
    for D in args.head_dims:
        for workaround in (0, 1):
            proc = subprocess.run([sys.executable, __file__, "--child", str(D), str(args.arch),
                                   str(workaround)], capture_output=True, text=True, env=env)
            label = f"D={D} sm_{args.arch} {'with' if workaround else 'without'} workaround"
            rows = [json.loads(line) for line in proc.stdout.splitlines()
                    if line.startswith("{")]
            for row in rows:
                if "error" in row:
                    print(f"{label}: {row['error']}")
                    return 1
                print(f"{label}: {row['kernel']:<48} {row['warps']} warps {row['regs']} regs "
                      f"{row['spill']} B spilled {row['smem']} B smem")
            if proc.returncode:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{label}: FAILED (exit {proc.returncode}) after {len(rows)} kernels: "
                      f"{tail[:300]}")
                failed |= bool(workaround)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
