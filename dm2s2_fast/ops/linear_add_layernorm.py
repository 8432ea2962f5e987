"""LayerNorm(x @ Wᵀ + b + residual): a BERT sublayer's output linear layer with its post-LN epilogue,
as one op so that a backend may fuse the epilogue into the GEMM — only where that measurably beats
the vendor BLAS plus the separate ``add_layernorm`` kernel (docs/ops.md#linear-layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_float, check_linear, check_scalar, check_shape


def linear_add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                         ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, *,
                         backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x @ weight.T + bias + residual) over the last dim; x [N, k], weight [d, k],
    bias / ln_weight / ln_bias [d], residual [N, d] -> [N, d]; statistics in fp32."""
    check_backend(backend)
    check_linear(x, weight, bias)
    d = weight.shape[0]
    check_float("residual", residual, 2, like=x)
    check_shape("residual", residual, (x.shape[0], d))
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_float(name, p, 1, like=x)
        check_shape(name, p, (d,))
    return dispatch.call("linear_add_layernorm", backend, x.device, x, weight, bias, residual, ln_weight,
                         ln_bias, check_scalar("eps", eps, nonnegative=True))


def linear_add_layernorm_reference(x, weight, bias, residual, ln_weight, ln_bias, eps):
    return F.layer_norm(F.linear(x, weight, bias) + residual, (weight.shape[0],), ln_weight, ln_bias, eps)


@register_fake("linear_add_layernorm")
def linear_add_layernorm_fake(x, weight, bias, residual, ln_weight, ln_bias, eps):
    check_fake_devices("linear_add_layernorm", x, weight, bias, residual, ln_weight, ln_bias)
    return x.new_empty((x.shape[0], weight.shape[0]))
