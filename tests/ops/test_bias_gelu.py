"""bias_gelu on every backend against ``bias_gelu_reference`` in fp64 (tests/ops/harness.py), the
reference against the erf formula, opcheck, and the op's argument errors.

Sample inputs: N = 0, one row and many (70000 narrow rows), widths 1 to 1536 (a multiple of no
column tile among the small ones), rows of wider buffers, values over both tails of erf and the
extremes (±1e4, ±40, ±1e-7, 0).
"""
from __future__ import annotations

import math

import pytest
import torch

import harness
from dm2s2_fast import ops
from dm2s2_fast.ops.bias_gelu import bias_gelu_reference
from harness import Case, gen, rand, strided
from helpers import FP32_TOL, rel_err, require_backend, require_extension, skip_unless_cuda

OP = "bias_gelu"


def case(N, f, strided_x=False, seed=0, **flags):
    def build(device, dtype):
        g = gen(seed * 1000 + N * 7 + f)
        x = rand(g, N, f, device=device, dtype=dtype, scale=3.0)  # both tails of erf
        b = rand(g, f, device=device, dtype=dtype)
        return (strided(x) if strided_x else x), b
    return Case(build, **flags)


def extremes(device, dtype):
    x = torch.tensor([[-1e4, -40.0, -8.0, -5.5, -1e-7, 0.0, 1e-7, 5.5, 8.0, 40.0, 1e4, 3.0],
                      [-30.0, -8.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 8.0, 30.0, 3e4, -3e4, 0.5]])
    return x.to(device, dtype), torch.zeros(12, device=device, dtype=dtype)


CASES = {
    # Small enough for Triton's interpreter.
    "37x128-strided": case(37, 128, strided_x=True),
    "5x1536-strided": case(5, 1536, strided_x=True),
    "1x1536": case(1, 1536),
    "3x100-strided": case(3, 100, strided_x=True),
    "11x100": case(11, 100),
    "17x7": case(17, 7),
    "4x7-strided": case(4, 7, strided_x=True),
    "3x1": case(3, 1),
    "empty": case(0, 64, strided_x=True),
    "empty-1536": case(0, 1536),
    "extremes": Case(extremes),
    # Larger: on the compiled backends and torch.
    "129x1536": case(129, 1536, interp=False),
    "513x1536-strided": case(513, 1536, strided_x=True, interp=False),
    "3x1536-strided": case(3, 1536, strided_x=True, interp=False),
    "70000x16": case(70000, 16, interp=False),
}


def check(name: str, backend: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    x, b = CASES[name](device, dtype)
    (out,) = harness.parity(f"bias_gelu/{name}", lambda x, b: ops.bias_gelu(x, b, backend=backend),
                            bias_gelu_reference, (x, b), device, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    return out


@harness.over_cases(CASES)
def test_parity(backend, device, dtype, case):
    harness.require(backend, device, OP)
    check(case, backend, device, dtype)


def test_reference_is_the_erf_formula():
    g = gen(4)
    x, b = torch.randn(7, 16, generator=g) * 3, torch.randn(16, generator=g)
    y = (x + b).double()
    expect = 0.5 * y * torch.erfc(-y / math.sqrt(2))  # 1 + erf(y / √2), without its cancellation at y << 0
    assert rel_err(ops.bias_gelu(x, b, backend="torch"), expect) <= FP32_TOL
    # torch's fp64 GELU is 1 + erf, whose negative tail cancels: ~1e-8, far below the fp32 bound
    assert rel_err(bias_gelu_reference(x.double(), b.double()), expect) <= 1e-7


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    if device == "cuda":
        skip_unless_cuda()
        require_backend("cuda", "cuda", OP)
    require_extension()
    g = gen(0)
    x, b = rand(g, 13, 16, device=device, dtype=torch.float32), rand(g, 16, device=device, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dm2s2_fast.bias_gelu.default, (x, b))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(5)), r"bias must have shape \(4,\)"),
    (lambda: ops.bias_gelu(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64)),
     "x must be a float tensor"),
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(4).half()), "bias has dtype"),
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(1, 4)), "bias must have 1 dims"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
