"""The ops of DESIGN §3: one public function each, validated here, run by the chosen backend.

This package is also the ``torch`` backend: each op module registers its plain-PyTorch kernel.
"""
from .. import backends

backends.register_backend("torch", ("cpu", "cuda"))

from .add_layernorm import add_layernorm  # noqa: E402
from .bias_gelu import bias_gelu  # noqa: E402
from .embed_layernorm import embed_layernorm  # noqa: E402
from .linear import linear  # noqa: E402
from .linear_add_layernorm import linear_add_layernorm  # noqa: E402
from .linear_bias_gelu import linear_bias_gelu  # noqa: E402
from .mra import inter_mra, intra_mra, mra_pool  # noqa: E402
from .set_attention import set_attention  # noqa: E402

__all__ = ["add_layernorm", "bias_gelu", "embed_layernorm", "inter_mra", "intra_mra", "linear",
           "linear_add_layernorm", "linear_bias_gelu", "mra_pool", "set_attention"]
