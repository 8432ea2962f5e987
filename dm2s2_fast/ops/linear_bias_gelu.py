"""GELU(x @ Wᵀ + b): the FFN's first linear layer with its epilogue, as one op so that a backend
may fuse the epilogue into the GEMM (DESIGN §3: only where that measurably beats the vendor BLAS
plus the separate ``bias_gelu`` kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_linear
from .bias_gelu import bias_gelu_torch


def linear_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                     backend: str = "auto") -> torch.Tensor:
    """Exact (erf) GELU of ``x @ weight.T + bias``; x [N, k], weight [f, k], bias [f] -> [N, f]."""
    check_linear(x, weight, bias)
    return backends.call("linear_bias_gelu", backend, x.device, x, weight, bias)


def composed(bias_gelu_kernel):
    """The unfused form for a backend: the vendor GEMM, then that backend's ``bias_gelu`` kernel."""
    def linear_bias_gelu_composed(x, weight, bias):
        return bias_gelu_kernel(F.linear(x, weight), bias)
    return linear_bias_gelu_composed


linear_bias_gelu_torch = backends.register_kernel("linear_bias_gelu", "torch")(composed(bias_gelu_torch))
