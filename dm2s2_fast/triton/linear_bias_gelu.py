"""GELU(x @ Wᵀ + b) for the ``triton`` backend.

Until a fused kernel measurably beats cuBLAS plus the separate epilogue on the device (DESIGN §3),
this is the composed form: the vendor GEMM, then the Triton ``bias_gelu`` kernel.
"""
from typing import Optional

from .. import backends
from ..ops.linear_bias_gelu import composed
from . import dtype_reason
from .bias_gelu import bias_gelu_triton


def _supports(x, weight, bias) -> Optional[str]:
    return dtype_reason(x, weight, bias)


linear_bias_gelu_triton = backends.register_kernel("linear_bias_gelu", "triton", supports=_supports)(
    composed(bias_gelu_triton))
