"""Residual add + LayerNorm, the BERT post-LN epilogue (docs/ops.md#add_layernorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_float, check_scalar, check_shape


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float, *, backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim; x, residual [N, d]; statistics in fp32."""
    check_backend(backend)
    check_float("x", x, 2)
    check_float("residual", residual, 2, like=x)
    check_shape("residual", residual, x.shape)
    for name, p in (("weight", weight), ("bias", bias)):
        check_float(name, p, 1, like=x)
        check_shape(name, p, (x.shape[1],))
    return dispatch.call("add_layernorm", backend, x.device, x, residual, weight, bias,
                         check_scalar("eps", eps, nonnegative=True))


def add_layernorm_reference(x, residual, weight, bias, eps):
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


@register_fake("add_layernorm")
def add_layernorm_fake(x, residual, weight, bias, eps, variant=0):
    check_fake_devices("add_layernorm", x, residual, weight, bias)
    return x.new_empty(x.shape)
