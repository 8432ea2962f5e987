"""Bias + exact (erf) GELU, the BERT FFN epilogue."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_float, check_shape


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """GELU(x + bias) with the exact erf GELU; x [N, f], bias [f]."""
    check_float("x", x, 2)
    check_float("bias", bias, 1, like=x)
    check_shape("bias", bias, (x.shape[1],))
    return backends.call("bias_gelu", backend, x.device, x, bias)


@backends.register_kernel("bias_gelu", "torch")
def bias_gelu_torch(x, bias):
    return F.gelu(x + bias)
