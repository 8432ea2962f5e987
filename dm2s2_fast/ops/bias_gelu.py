"""Bias + exact (erf) GELU, the BERT FFN epilogue (docs/ops.md#bias_gelu)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_float, check_shape


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """GELU(x + bias) with the exact erf GELU; x [N, f], bias [f]."""
    check_backend(backend)
    check_float("x", x, 2)
    check_float("bias", bias, 1, like=x)
    check_shape("bias", bias, (x.shape[1],))
    return dispatch.call("bias_gelu", backend, x.device, x, bias)


def bias_gelu_reference(x, bias):
    return F.gelu(x + bias)


@register_fake("bias_gelu")
def bias_gelu_fake(x, bias):
    check_fake_devices("bias_gelu", x, bias)
    return x.new_empty(x.shape)
