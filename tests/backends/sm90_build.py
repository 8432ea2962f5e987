"""Ahead-of-time sm_90 (H100/H200) builds of the Triton kernels, for the tests that run without a GPU.

``build`` compiles one kernel with Triton's bundled ptxas, specialised as a launch would specialise
it (pointers 16-byte aligned, as torch allocates them; integer arguments divisible by 16 marked so):
without that there is no cp.async pipelining and no register pressure to speak of. It prints and
returns one ``KERNEL`` line with the registers, shared memory and spill bytes ptxas reported.
Run it in a process with ``TRITON_INTERPRET=0`` and ``TRITON_DUMP_PTXAS_LOG=1`` (ptxas -v goes
to stdout) and a fresh ``TRITON_CACHE_DIR`` (a cached kernel skips ptxas and logs nothing).
"""
from __future__ import annotations

import contextlib
import io
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
           torch.int64: "*i64"}
_built: set = set()


def build(fn, args: dict, consts: dict, warps: int, stages: int) -> str | None:
    """Compile ``fn`` for sm_90: ``args`` maps each runtime argument to a torch dtype (a pointer to
    it), a float or an int (a value); ``consts`` the constexprs. None when this exact build was
    already made in this process."""
    pointers = tuple(sorted((name, str(v)) for name, v in args.items() if isinstance(v, torch.dtype)))
    key = (fn.__name__, pointers, tuple(sorted(consts.items())), warps, stages)
    floats = [v for v in args.values() if v in (torch.float32, torch.float16, torch.bfloat16)]
    dtype = max(set(floats), key=floats.count) if floats else None  # the kernel's data dtype, for the label
    if key in _built:
        return None
    _built.add(key)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args.get(name)
        sig[name] = "constexpr" if name in consts else POINTER[v] if isinstance(v, torch.dtype) else \
            "fp32" if isinstance(v, float) else "i32"
        if name not in consts and (isinstance(v, torch.dtype) or (type(v) is int and v % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, signature=sig, constexprs=dict(consts), attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    assert regs and spill, f"no ptxas -v log for {fn.__name__}: " + log.getvalue()[-2000:]
    tiles = " ".join(f"{c}={v}" for c, v in consts.items() if c.startswith("BLOCK"))
    line = (f"KERNEL {fn.__name__} {dtype} {tiles} warps={warps} stages={stages} "
            f"smem={k.metadata.shared} regs={regs.group(1)} spill_stores={spill.group(1)} "
            f"spill_loads={spill.group(2)}")
    print(line, flush=True)
    return line


def spilling(stdout: str) -> list[str]:
    """The KERNEL lines of a build run whose kernels spill."""
    return [line for line in stdout.splitlines()
            if line.startswith("KERNEL") and not re.search(r"spill_stores=0 spill_loads=0", line)]
