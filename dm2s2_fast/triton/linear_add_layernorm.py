"""LayerNorm(x @ Wᵀ + b + residual) for the ``triton`` backend.

Until a fused kernel measurably beats cuBLAS plus the separate epilogue on the device (DESIGN §3),
this is the composed form: the vendor GEMM, then the Triton ``add_layernorm`` kernel.
"""
from typing import Optional

from .. import backends
from ..ops.linear_add_layernorm import composed
from . import dtype_reason
from .add_layernorm import MAX_DIM, add_layernorm_triton


def _supports(x, weight, bias, residual, ln_weight, ln_bias, eps) -> Optional[str]:
    reason = dtype_reason(x, weight, bias, residual, ln_weight, ln_bias)
    if reason is None and weight.shape[0] > MAX_DIM:
        reason = f"triton add_layernorm holds a row in registers: d <= {MAX_DIM}, got {weight.shape[0]}"
    return reason


linear_add_layernorm_triton = backends.register_kernel("linear_add_layernorm", "triton", supports=_supports)(
    composed(add_layernorm_triton))
