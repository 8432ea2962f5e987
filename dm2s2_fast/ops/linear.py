"""x @ Wᵀ + b: the engine's plain linear layer (the qkv projection), as an op so that a backend may
own its output buffer (the cpp backend advises it onto huge pages before BLAS first touches it);
the GEMM itself stays with the vendor BLAS everywhere (DESIGN §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_float, check_shape


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias``; x [N, k], weight [f, k], bias [f] -> [N, f]."""
    check_float("x", x, 2)
    check_float("weight", weight, 2, like=x)
    check_float("bias", bias, 1, like=x)
    check_shape("weight", weight, (weight.shape[0], x.shape[1]))
    check_shape("bias", bias, (weight.shape[0],))
    return backends.call("linear", backend, x.device, x, weight, bias)


linear_torch = backends.register_kernel("linear", "torch")(F.linear)
