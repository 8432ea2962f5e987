"""add_layernorm on every backend against ``add_layernorm_reference`` in fp64 (tests/ops/harness.py),
the reference against the LayerNorm formula, opcheck, and the op's argument errors.

Sample inputs: N = 0, one row and many, widths 1 to 4096 (none a multiple of the row tiles among
them), x and the residual as rows of wider buffers, inputs with a mean and a spread to normalise
away, eps 1e-12 and 1e-5.
"""
from __future__ import annotations

import pytest
import torch

import harness
from dm2s2_fast import ops
from dm2s2_fast.ops.add_layernorm import add_layernorm_reference
from harness import Case, gen, rand, strided
from helpers import FP32_TOL, rel_err, require_backend, require_extension, skip_unless_cuda

OP = "add_layernorm"


def case(N, d, strided_x=False, strided_res=False, eps=1e-12, seed=0, **flags):
    def build(device, dtype):
        g = gen(seed * 1000 + N * 13 + d)
        x = rand(g, N, d, device=device, dtype=dtype, scale=3.0, shift=1.0)  # a mean and a spread
        res = rand(g, N, d, device=device, dtype=dtype)
        w = rand(g, d, device=device, dtype=dtype, scale=0.5, shift=1.0)
        b = rand(g, d, device=device, dtype=dtype)
        return (strided(x) if strided_x else x), (strided(res) if strided_res else res), w, b, eps
    return Case(build, **flags)


CASES = {
    # Small enough for Triton's interpreter.
    "37x32-strided": case(37, 32, strided_x=True),
    "5x384": case(5, 384),
    "3x48-strided": case(3, 48, strided_x=True, strided_res=True),
    "1x384-eps1e-5": case(1, 384, eps=1e-5),
    "33x13-strided-eps1e-5": case(33, 13, strided_x=True, eps=1e-5),
    "9x3": case(9, 3),
    "5x1": case(5, 1),
    "empty": case(0, 32),
    "empty-d384-strided": case(0, 384, strided_x=True),
    # Larger: on the compiled backends and torch.
    "257x384-strided": case(257, 384, strided_x=True, strided_res=True, interp=False),
    "257x384-eps1e-5": case(257, 384, eps=1e-5, interp=False),
    "1000x384": case(1000, 384, interp=False),
    "33x768-strided": case(33, 768, strided_x=True, strided_res=True, interp=False),
    "7x100": case(7, 100, interp=False),
    "7x64-strided": case(7, 64, strided_x=True, interp=False),
    "5x4096-strided": case(5, 4096, strided_x=True, interp=False),
}


def check(name: str, backend: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    x, res, w, b, eps = CASES[name](device, dtype)
    (out,) = harness.parity(f"add_layernorm/{name}",
                            lambda x, res, w, b: ops.add_layernorm(x, res, w, b, eps, backend=backend),
                            lambda x, res, w, b: add_layernorm_reference(x, res, w, b, eps),
                            (x, res, w, b), device, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    return out


@harness.over_cases(CASES)
def test_parity(backend, device, dtype, case):
    harness.require(backend, device, OP)
    check(case, backend, device, dtype)


def test_reference_is_the_formula():
    g = gen(4)
    x, res = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    w, b = torch.rand(16, generator=g), torch.randn(16, generator=g)
    xd = x.double() + res.double()
    ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * w.double() + b.double()
    assert rel_err(ops.add_layernorm(x, res, w, b, 1e-5, backend="torch"), ref) <= FP32_TOL
    assert rel_err(add_layernorm_reference(x.double(), res.double(), w.double(), b.double(), 1e-5), ref) <= 1e-12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    if device == "cuda":
        skip_unless_cuda()
        require_backend("cuda", "cuda", OP)
    require_extension()
    g = gen(0)
    x, res = rand(g, 13, 16, device=device, dtype=torch.float32), rand(g, 13, 16, device=device, dtype=torch.float32)
    w, b = rand(g, 16, device=device, dtype=torch.float32), rand(g, 16, device=device, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dm2s2_fast.add_layernorm.default, (x, res, w, b, 1e-12))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4).double(), torch.ones(4), torch.zeros(4), 1e-5),
     "residual has dtype"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(2, 4), torch.ones(4), torch.zeros(4), 1e-5),
     r"residual must have shape \(3, 4\)"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(5), torch.zeros(4), 1e-5),
     r"weight must have shape \(4,\)"),
    (lambda: ops.add_layernorm(torch.randn(4), torch.randn(4), torch.ones(4), torch.zeros(4), 1e-5),
     "x must have 2 dims"),
    # The kernels take eps as fp32: out-of-range values would be undefined behaviour there.
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), 1e300),
     "eps must be a finite non-negative number"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), -1e-5),
     "eps must be a finite non-negative number"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), "tiny"),
     "eps must be a real number"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
