"""The op parity harness: every op's sample inputs, through every backend, against the op's reference.

One rule (docs/numerics.md), ``tolerance(dtype, e_ref)``: the error ``‖out − ref‖ / ‖ref‖`` against the
op's reference (``dm2s2_fast.ops.<op>.<op>_reference``) run in float64 on the same (rounded) inputs is
  fp32        ≤ 1e-5;
  fp16/bf16   ≤ min(2e-2, max(2 × e_ref, 1e-5)), e_ref = the reference's own error run in that dtype
              (the 1e-5 floor: outputs the reference computes in fp32 from half inputs, such as the
              MRA weights α/β, have e_ref ~1e-7, below any fp32 kernel's reach);
and NaN never passes: every output must be finite (``rel_err`` asserts it), uninitialized memory is
NaN while a test runs (CPU: tests/conftest.py; CUDA: ``poison`` before each call).

The parametrization is backend × device × dtype (× the op's sample case): torch on cpu and cuda, cpp on
cpu, triton on cuda and on cpu where Triton's interpreter is on (TRITON_INTERPRET=1, set by
tests/conftest.py when there is no GPU), cuda on cuda; fp32, fp16 and bf16 on CUDA and in Triton's
interpreter, fp32 on the CPU otherwise (and the half types a CPU backend's ``Capability`` declares).
Pairs that can never run are not generated (cpp on cuda, cuda on cpu, and a case marked
``interp=False`` — too large for the interpreter, minutes there — on Triton's interpreter); a pair
that cannot run here skips through ``helpers.require_backend``, which fails instead under the
``DM2S2_FAST_REQUIRE_*`` switches (only "no CUDA device" is a plain skip, and a failure under
``DM2S2_FAST_REQUIRE_CUDA=1``).

An op's test module (tests/ops/test_<op>.py) holds its sample inputs (``CASES``: name -> ``Case``)
and a ``check(case, backend, device, dtype)`` that runs one through ``parity``; tests/backends/ reuse
those under a forced ``Tuning`` (a CPU kernel table, a CUDA or Triton kernel variant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dm2s2_fast import dispatch
from helpers import FP32_TOL, rel_err, require_backend

HALF_CAP = 2e-2
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF
INTERPRET = dispatch.triton_interpret()


def tolerance(dtype: torch.dtype, e_ref: float) -> float:
    """The bound on the relative error of an output computed from ``dtype`` inputs; ``e_ref`` is the
    reference's own error in that dtype (unused for fp32/fp64)."""
    if dtype not in HALF:
        return FP32_TOL
    return min(HALF_CAP, max(2 * e_ref, FP32_TOL))


def devices_of(backend: str) -> tuple[str, ...]:
    """Where ``backend`` can ever run (on this kind of machine: Triton on CPU only interpreted)."""
    return {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",),
            "triton": ("cpu", "cuda") if INTERPRET else ("cuda",)}[backend]


def dtypes_of(backend: str, device: str) -> tuple[torch.dtype, ...]:
    """fp32, fp16 and bf16 on CUDA and in Triton's interpreter (which checks Triton's half paths on
    the CPU); on the CPU otherwise the half types a compiled backend declares (its ``Capability``),
    and fp32 alone for torch (its kernels are the references)."""
    if device == "cuda" or backend == "triton":
        return DTYPES
    if backend == "torch":
        return (torch.float32,)
    entry = dispatch._load(backend)
    if entry is None or entry.unavailable:
        return (torch.float32,)
    return tuple(t for t in DTYPES if t in entry.capability.dtypes) or (torch.float32,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    """One sample input of an op: ``build(device, dtype)`` makes its arguments (seeded: the same
    values on every backend). ``interp=False``: too large for Triton's interpreter; ``cuda=False``:
    not generated on CUDA."""

    build: Callable
    interp: bool = True
    cuda: bool = True

    def __call__(self, device, dtype):
        return self.build(torch.device(device), dtype)


def combos(interp: bool = True, cuda: bool = True, backends=dispatch.BACKENDS):
    """(backend, device, dtype) triples that can ever run (see the module docstring)."""
    for backend in backends:
        for device in devices_of(backend):
            if (device == "cuda" and not cuda) or (backend == "triton" and device == "cpu" and not interp):
                continue
            for dtype in dtypes_of(backend, device):
                yield backend, device, dtype


def _param(backend, device, dtype, *rest, fp32_only=False):
    if fp32_only and dtype != torch.float32:
        return None
    marks = [pytest.mark.cuda] if device == "cuda" else []
    ident = "-".join([backend, device, dtype_name(dtype), *map(str, rest)])
    return pytest.param(backend, device, dtype, *rest, marks=marks, id=ident)


def over_backends(fp32_only: bool = False, backends=dispatch.BACKENDS):
    """``@over_backends()``: parametrize ``backend, device, dtype``."""
    params = [_param(b, d, t, fp32_only=fp32_only) for b, d, t in combos(backends=backends)]
    return pytest.mark.parametrize("backend,device,dtype", [p for p in params if p is not None])


def over_cases(cases: dict, fp32_only: bool = False, backends=dispatch.BACKENDS):
    """``@over_cases(CASES)``: parametrize ``backend, device, dtype, case`` (a key of ``cases``)."""
    params = []
    for name, case in cases.items():
        for b, d, t in combos(interp=case.interp, cuda=case.cuda, backends=backends):
            p = _param(b, d, t, name, fp32_only=fp32_only)
            if p is not None:
                params.append(p)
    return pytest.mark.parametrize("backend,device,dtype,case", params)


def to64(x):
    """A float tensor as float64 on the CPU (the oracle's inputs); other tensors on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu() if x.is_floating_point() else x.cpu()
    return x


def poison(device, *specs) -> None:
    """CUDA: fill the caching allocator with NaN blocks of these (shape, dtype) sizes, then free them:
    the op's next allocations of those sizes get NaN memory, so an output element a kernel never
    writes shows. (On the CPU tests/conftest.py's deterministic fill does this for every allocation.)"""
    if torch.device(device).type != "cuda":
        return
    keep = []
    for shape, dtype in specs:
        for _ in range(3):
            t = torch.empty(shape, dtype=dtype, device=device)
            if t.is_floating_point():
                t.fill_(float("nan"))
            keep.append(t)
    del keep


def compare(what: str, out: torch.Tensor, ref64: torch.Tensor, own: torch.Tensor | None,
            dtype: torch.dtype) -> float:
    """``out`` against the fp64 reference ``ref64``, within ``tolerance(dtype, e_ref)``; ``own`` is
    the reference run in ``dtype`` (None for fp32). Returns the error."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: output holds NaN/inf (unwritten or overflowed)"
    if out.numel() == 0:
        return 0.0
    err = rel_err(out, ref64)
    e_ref = rel_err(own, ref64) if dtype in HALF else 0.0
    bound = tolerance(dtype, e_ref)
    assert err <= bound, (f"{what} [{dtype_name(dtype)}]: relative error {err:.3e} > {bound:.3e}"
                          + (f" (2x the reference's own {e_ref:.2e})" if dtype in HALF else ""))  # NaN fails too
    return err


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def parity(what: str, call: Callable, reference: Callable, args: tuple, device, dtype: torch.dtype,
           names: tuple[str, ...] = ("out",)) -> tuple:
    """Run ``call(*args)`` (the op on one backend) and hold each output to the fp64 ``reference``
    (the op's ``<op>_reference`` on ``to64(args)``), within ``tolerance``. Returns the outputs."""
    ref64 = _tuple(reference(*map(to64, args)))
    # The reference in the op's own dtype, on dense copies: torch 2.13's CPU bf16 matmul reads a
    # row-strided operand past each row's end (NaN there gives NaN), which is not this op's error.
    dense = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    own = _tuple(reference(*dense)) if dtype in HALF else (None,) * len(ref64)
    poison(device, *[(r.shape, t) for r in ref64 for t in {dtype, torch.float32}])
    out = _tuple(call(*args))
    assert len(out) == len(ref64) == len(names), (what, len(out), len(ref64))
    for name, o, r, w in zip(names, out, ref64, own):
        assert o.device.type == torch.device(device).type, f"{what}.{name}: output on {o.device}"
        compare(f"{what}.{name}" if len(names) > 1 else what, o, r, None if w is None else w.to(o.device), dtype)
    return out


def require(backend: str, device: str, op: str) -> None:
    """The pair can run ``op`` here, or the test skips (fails under the require switches)."""
    require_backend(backend, device, op)


# ------------------------------------------------------------------ input makers

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(g: torch.Generator, *shape, device, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Seeded normal values made in fp64 on the CPU, then rounded to ``dtype`` on ``device``."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def offsets(lengths, device) -> torch.Tensor:
    """int32 offsets [0, l0, l0 + l1, ...] on ``device``."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` [n, d] as a view with row stride d + 5 (rows of a wider buffer, last dim contiguous)."""
    n, d = t.shape
    wide = torch.full((n, d + 5), float("nan"), dtype=t.dtype, device=t.device)
    view = wide[:, 2:2 + d]
    view.copy_(t)
    return view


def every_other(t: torch.Tensor) -> torch.Tensor:
    """``t`` (1-D) as a view with stride 2."""
    wide = torch.zeros(t.shape[0], 2, dtype=t.dtype, device=t.device)
    wide[:, 0] = t
    return wide[:, 0]
