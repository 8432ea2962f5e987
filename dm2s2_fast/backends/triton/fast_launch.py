"""Launching compiled Triton kernels without ``JITFunction.run``'s per-call binding (opt-in).

``kernel[grid](*args, **constexprs)`` binds every argument, derives Triton's specialization key,
looks the compiled kernel up and launches it: ~9.5 µs of Python per launch under Triton 3.6 on
this project's CPU machine, where the launch itself (``CompiledKernel[grid](...)``) takes ~1.7 µs.
The eager Triton forward makes ~33 launches and is host-bound on the H200 (2.6-3.1 ms of host time
against 2.04 ms of kernels at ads B=256, docs/performance.md#host-cost).

``FastLaunch(kernel)[grid](...)`` keys its own cache on a *finer* key than Triton's: per tensor its
dtype and whether its address is 16-byte aligned; per int its width class (i32 / i64 / u64),
whether it is 1 and whether it is divisible by 16; bools and None by value, floats by type; every
keyword (constexprs, num_warps, num_stages) by value; and the device. Those are all the properties
Triton's specialization reads (3.6 and 3.9), so two calls with one key have one compiled kernel.
A miss, an argument of another type or an active launch hook (a profiler's) goes through
``kernel[grid]`` itself, which compiles if needed and returns the compiled kernel that later hits
reuse. What a hit skips: Triton's check that the kernel's global constants did not change (ours
never do) and re-reading ``TRITON_DEBUG``-style knobs (set them before the first launch).

Opt-in with ``Tuning(triton_fast_launch=True)`` until a GPU session has timed it (bench/gpu_check.sh);
tests/backends/test_triton.py checks, with a stand-in driver on CPU, that a hit hands the
launcher exactly the arguments Triton's own path hands it.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.runtime.driver import driver

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4: no knobs; the fast path is not offered
    _knobs = None

UNSUPPORTED = None if _knobs is not None else f"Triton {triton.__version__} has no triton.knobs (3.4+ needed)"
_I32_MIN, _I32_END, _I64_MIN, _I64_END = -2 ** 31, 2 ** 31, -2 ** 63, 2 ** 63


def _key(args) -> tuple:
    """The properties of the arguments that Triton's specialization reads (finer is safe), flat: a
    tensor gives its dtype then its 16-byte alignment; an int a code for (is 1, divisible by 16,
    i32 / i64 / u64); a float, a bool or None a marker. Dtypes only come from tensors, so the flat
    tuple decodes one way. Raises TypeError for any other argument."""
    key = []
    add = key.append
    for a in args:
        kind = type(a)
        if kind is int:
            if a == 1:
                add(-1)
            else:
                add((a & 15 == 0) + (0 if _I32_MIN <= a < _I32_END else 2 if _I64_MIN <= a < _I64_END else 4))
        elif kind is float:
            add("f")
        elif kind is bool:
            add("T" if a else "F")
        elif a is None:
            add("N")
        elif isinstance(a, torch.Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        else:
            raise TypeError(f"no launch-cache key for {kind.__name__}")
    return tuple(key)


def _idle(hook) -> bool:
    """No launch hook to call: None (Triton 3.6) or an empty ``knobs.HookChain`` (3.9)."""
    return hook is None or getattr(hook, "calls", None) == []


class FastLaunch:
    """``FastLaunch(jit_kernel)[grid](*args, **kwargs)``: what ``jit_kernel[grid](...)`` does."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}
        self._names = [p.name for p in kernel.params]
        self._defaults = {p.name: p.default for p in kernel.params if p.has_default}

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        device = driver.active.get_current_device()
        try:
            key = (device, _key(args), tuple(kwargs.items()))
            compiled = self._compiled.get(key)
        except TypeError:  # an argument we do not key (or an unhashable keyword): Triton's own path
            return self.kernel[grid](*args, **kwargs)
        enter, exit_ = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if compiled is None or not (_idle(enter) and _idle(exit_)):
            compiled = self.kernel[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # an asynchronous compile (Triton's AsyncCompileMode)
                compiled = compiled.result()
            self._compiled[key] = compiled
            return compiled
        bound = list(args)
        for name in self._names[len(args):]:
            bound.append(kwargs[name] if name in kwargs else self._defaults[name])
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        # No launch metadata: it is built only for a hook to read, and the hooks are idle.
        compiled.run(grid3[0], grid3[1], grid3[2], driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, enter, exit_, *bound)
        return compiled
