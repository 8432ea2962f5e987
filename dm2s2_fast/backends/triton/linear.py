"""Linear layers for the ``triton`` backend: the vendor GEMM (``F.linear``, cuBLAS), then this
backend's epilogue kernel. Fused Triton GEMM epilogues lost to that on the H200 and were removed
(docs/performance.md#linear-layers)."""
from ... import dispatch
from ..common import composed_linear_add_layernorm, composed_linear_bias_gelu, linear
from .add_layernorm import add_layernorm_triton, row_limits
from .bias_gelu import bias_gelu_triton

dispatch.register_kernel("linear", "triton")(linear)
dispatch.register_kernel("linear_bias_gelu", "triton")(composed_linear_bias_gelu(bias_gelu_triton))
dispatch.register_kernel(
    "linear_add_layernorm", "triton",
    limits=lambda x, weight, bias, residual, ln_weight, ln_bias, eps: row_limits("add_layernorm", weight.shape[0]),
)(composed_linear_add_layernorm(add_layernorm_triton))
