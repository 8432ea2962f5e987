"""The linear layers — linear, linear_bias_gelu and linear_add_layernorm (a GEMM with its BERT
epilogue) — on every backend against their references in fp64 (tests/ops/harness.py), outputs past
the cpp backend's huge-page threshold, and the ops' argument errors.

Sample inputs (rows N, inputs K, outputs F): no rows, no inputs (the bias alone), one row, sizes no
tile divides, several row and column tiles, the ads widths (d = 384, FFN 1536); x and the residual as
rows of wider buffers.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness
from dm2s2_fast import ops
from dm2s2_fast.ops.linear import linear_reference
from dm2s2_fast.ops.linear_add_layernorm import linear_add_layernorm_reference
from dm2s2_fast.ops.linear_bias_gelu import linear_bias_gelu_reference
from harness import Case, gen, rand, strided
from helpers import FP32_TOL, rel_err, require_backend, require_extension

OPS = ("linear", "linear_bias_gelu", "linear_add_layernorm")
EPS = 1e-12


def case(op, N, K, Fo, strided_x=False, seed=0, **flags):
    def build(device, dtype):
        g = gen(seed * 1000 + N + K * 3 + Fo * 7)
        x = rand(g, N, K, device=device, dtype=dtype)
        w = rand(g, Fo, K, device=device, dtype=dtype, scale=max(K, 1) ** -0.5)
        b = rand(g, Fo, device=device, dtype=dtype)
        x = strided(x) if strided_x else x
        if op != "linear_add_layernorm":
            return x, w, b
        res = rand(g, N, Fo, device=device, dtype=dtype, scale=2.0, shift=1.0)
        lw = (torch.rand(Fo, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
        lb = rand(g, Fo, device=device, dtype=dtype, scale=0.1)
        return x, w, b, (strided(res) if strided_x else res), lw, lb
    return Case(build, **flags)


# (N, K, F, strided rows): empty, no inputs (the bias alone), one row, odd sizes that are no tile
# multiple, several row and column tiles, strided x (and residual).
SHAPES = [(0, 8, 12, False), (5, 0, 12, False), (1, 16, 24, False), (37, 24, 40, False), (130, 96, 160, False),
          (0, 32, 48, False), (1, 40, 24, False), (37, 100, 50, True), (130, 192, 160, False), (1, 40, 48, False),
          (37, 100, 48, True), (70, 192, 384, False)]
CASES = {f"{op}-{N}x{K}x{Fo}{'-strided' if s else ''}": case(op, N, K, Fo, s) for op in OPS for N, K, Fo, s in SHAPES}
# The ads layer widths (d = 384, FFN 1536): on the compiled backends and torch.
CASES.update({
    "linear-200x384x1152": case("linear", 200, 384, 1152, interp=False),
    "linear_bias_gelu-200x384x1536-strided": case("linear_bias_gelu", 200, 384, 1536, True, interp=False),
    "linear_add_layernorm-200x1536x384": case("linear_add_layernorm", 200, 1536, 384, interp=False),
})

REFERENCES = {"linear": linear_reference, "linear_bias_gelu": linear_bias_gelu_reference,
              "linear_add_layernorm": lambda *a: linear_add_layernorm_reference(*a, EPS)}


def check(name: str, backend: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    op = name.split("-")[0]
    args = CASES[name](device, dtype)
    fn = getattr(ops, op)
    extra = (EPS,) if op == "linear_add_layernorm" else ()
    (out,) = harness.parity(f"{name}", lambda *a: fn(*a, *extra, backend=backend), REFERENCES[op], args, device,
                            dtype)
    assert out.dtype == dtype and out.shape == (args[0].shape[0], args[1].shape[0])
    return out


@harness.over_cases(CASES)
def test_parity(backend, device, dtype, case):
    harness.require(backend, device, case.split("-")[0])
    check(case, backend, device, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_outputs_on_huge_page_buffers(backend):
    """Outputs past the cpp backend's huge-page threshold (8 MB) and epilogues run in place there."""
    require_backend(backend, "cpu", "linear")
    g = gen(9)
    x, w, b = torch.randn(1500, 96, generator=g), torch.randn(1536, 96, generator=g) / 10, torch.randn(1536, generator=g)
    y = x.double() @ w.double().T
    assert rel_err(ops.linear(x, w, b, backend=backend), y + b.double()) <= FP32_TOL
    assert rel_err(ops.linear_bias_gelu(x, w, b, backend=backend), F.gelu(y + b.double())) <= FP32_TOL
    res, lw, lb = torch.randn(1500, 1536, generator=g), torch.rand(1536, generator=g) + 0.5, torch.randn(1536, generator=g)
    ref = F.layer_norm(y + b.double() + res.double(), (1536,), lw.double(), lb.double(), 1e-12)
    assert rel_err(ops.linear_add_layernorm(x, w, b, res, lw, lb, 1e-12, backend=backend), ref) <= FP32_TOL


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    """The compiled library's linear ops (CPU only: on CUDA the GEMM is cuBLAS's, then an epilogue op)."""
    require_extension()
    g = gen(0)
    x, res = torch.randn(13, 16, generator=g), torch.randn(13, 10, generator=g)
    w, b, lw, lb = torch.randn(10, 16, generator=g), torch.randn(10, generator=g), torch.randn(10, generator=g), \
        torch.randn(10, generator=g)
    args = (x, w, b, res, lw, lb, 1e-12) if op == "linear_add_layernorm" else (x, w, b)
    torch.library.opcheck(getattr(torch.ops.dm2s2_fast, op).default, args)


@pytest.mark.parametrize("call,message", [
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 6), torch.randn(5)), r"weight must have shape \(5, 4\)"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(6)), r"bias must have shape \(5,\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 6), torch.randn(5)),
     r"weight must have shape \(5, 4\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)),
     r"bias must have shape \(5,\)"),
    (lambda: ops.linear_bias_gelu(torch.randn(3, 4), torch.randn(5, 4).double(), torch.randn(5)),
     "weight has dtype"),
    (lambda: ops.linear_bias_gelu(torch.randn(3), torch.randn(5, 3), torch.randn(5)), "x must have 2 dims"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(3, 4),
                                      torch.ones(5), torch.zeros(5), 1e-12), r"residual must have shape \(3, 5\)"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(3, 5),
                                      torch.ones(4), torch.zeros(5), 1e-12), r"ln_weight must have shape \(5,\)"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5).half(),
                                      torch.randn(3, 5), torch.ones(5), torch.zeros(5), 1e-12), "bias has dtype"),
    (lambda: ops.linear_add_layernorm(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(3, 5),
                                      torch.ones(5), torch.zeros(5), float("nan")), "eps must be a finite"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
