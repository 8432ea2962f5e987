"""x @ Wᵀ + b: the engine's plain linear layer (the qkv projection), as an op so that a backend may
own its output buffer (the cpp backend advises it onto huge pages before BLAS first touches it);
the GEMM itself stays with the vendor BLAS (docs/ops.md#linear-layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias``; x [N, k], weight [f, k], bias [f] -> [N, f]."""
    check_backend(backend)
    check_linear(x, weight, bias)
    return dispatch.call("linear", backend, x.device, x, weight, bias)


linear_reference = F.linear


@register_fake("linear")
def linear_fake(x, weight, bias):
    check_fake_devices("linear", x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))
