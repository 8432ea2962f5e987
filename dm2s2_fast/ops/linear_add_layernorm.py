"""LayerNorm(x @ Wᵀ + b + residual): a BERT sublayer's output linear layer with its post-LN epilogue,
as one op so that a backend may fuse the epilogue into the GEMM (DESIGN §3: only where that
measurably beats the vendor BLAS plus the separate ``add_layernorm`` kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_float, check_linear, check_scalar, check_shape
from .add_layernorm import add_layernorm_torch


def linear_add_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                         ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, *,
                         backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x @ weight.T + bias + residual) over the last dim; x [N, k], weight [d, k],
    bias / ln_weight / ln_bias [d], residual [N, d] -> [N, d]; statistics in fp32."""
    check_linear(x, weight, bias)
    d = weight.shape[0]
    check_float("residual", residual, 2, like=x)
    check_shape("residual", residual, (x.shape[0], d))
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_float(name, p, 1, like=x)
        check_shape(name, p, (d,))
    return backends.call("linear_add_layernorm", backend, x.device, x, weight, bias, residual, ln_weight,
                         ln_bias, check_scalar("eps", eps, nonnegative=True))


def composed(add_layernorm_kernel):
    """The unfused form for a backend: the vendor GEMM (bias included), then its ``add_layernorm``."""
    def linear_add_layernorm_composed(x, weight, bias, residual, ln_weight, ln_bias, eps):
        return add_layernorm_kernel(F.linear(x, weight, bias), residual, ln_weight, ln_bias, eps)
    return linear_add_layernorm_composed


linear_add_layernorm_torch = backends.register_kernel("linear_add_layernorm", "torch")(
    composed(add_layernorm_torch))
