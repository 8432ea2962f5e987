"""x @ Wᵀ + b: the engine's plain linear layer (the qkv projection), as an op so that a backend may
own its output buffer (the cpp backend advises it onto huge pages before BLAS first touches it);
the GEMM itself stays with the vendor BLAS everywhere (DESIGN §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T + bias``; x [N, k], weight [f, k], bias [f] -> [N, f]."""
    check_linear(x, weight, bias)
    return backends.call("linear", backend, x.device, x, weight, bias)


linear_torch = backends.register_kernel("linear", "torch")(F.linear)
