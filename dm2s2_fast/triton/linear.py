"""x @ Wᵀ + b for the ``triton`` backend: the vendor GEMM (``F.linear``), as DESIGN §3 asks where
no fused epilogue is there to win."""
from typing import Optional

import torch.nn.functional as F

from .. import backends
from . import dtype_reason


def _supports(x, weight, bias) -> Optional[str]:
    return dtype_reason(x, weight, bias)


linear_triton = backends.register_kernel("linear", "triton", supports=_supports)(F.linear)
