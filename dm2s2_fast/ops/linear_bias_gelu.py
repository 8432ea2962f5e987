"""GELU(x @ Wᵀ + b): the FFN's first linear layer with its epilogue, as one op so that a backend
may fuse the epilogue into the GEMM — only where that measurably beats the vendor BLAS plus the
separate ``bias_gelu`` kernel (docs/ops.md#linear-layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_linear


def linear_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                     backend: str = "auto") -> torch.Tensor:
    """Exact (erf) GELU of ``x @ weight.T + bias``; x [N, k], weight [f, k], bias [f] -> [N, f]."""
    check_backend(backend)
    check_linear(x, weight, bias)
    return dispatch.call("linear_bias_gelu", backend, x.device, x, weight, bias)


def linear_bias_gelu_reference(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


@register_fake("linear_bias_gelu")
def linear_bias_gelu_fake(x, weight, bias):
    check_fake_devices("linear_bias_gelu", x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))
