"""The ops: one contract each (docs/ops.md).

``ops/<op>.py`` holds the op's public function (signature, docstring, validation), its reference
implementation in plain PyTorch (``<op>_reference``: the definition every backend is tested
against, and the ``torch`` backend's kernel) and its fake (meta) implementation for torch.compile
and torch.export. The kernels live in ``dm2s2_fast/backends/<name>/``; a call is validated here,
then ``dispatch`` picks the backend.
"""
from .add_layernorm import add_layernorm
from .bias_gelu import bias_gelu
from .embed_layernorm import embed_layernorm
from .linear import linear
from .linear_add_layernorm import linear_add_layernorm
from .linear_bias_gelu import linear_bias_gelu
from .mra import inter_mra, intra_mra, mra_pool
from .set_attention import set_attention

__all__ = ["add_layernorm", "bias_gelu", "embed_layernorm", "inter_mra", "intra_mra", "linear",
           "linear_add_layernorm", "linear_bias_gelu", "mra_pool", "set_attention"]
