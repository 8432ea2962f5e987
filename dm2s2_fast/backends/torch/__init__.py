"""The ``torch`` backend: the ops' reference implementations, in plain PyTorch, on any device and
dtype, with autograd. The fallback that always runs; only ``set_attention`` on CPU differs from the
reference (one sdpa call per group: ads B=64, 30 ms against 52 padded)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import dispatch
from ...ops.add_layernorm import add_layernorm_reference
from ...ops.bias_gelu import bias_gelu_reference
from ...ops.embed_layernorm import embed_layernorm_reference
from ...ops.linear import linear_reference
from ...ops.linear_add_layernorm import linear_add_layernorm_reference
from ...ops.linear_bias_gelu import linear_bias_gelu_reference
from ...ops.mra import inter_mra_reference, intra_mra_reference, mra_pool_reference
from ...ops.set_attention import set_attention_reference

dispatch.register_backend("torch", dispatch.Capability(
    devices=dispatch.DEVICES, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), autograd=True))


def set_attention_per_group(q, k, v, cu_seqlens, max_seqlen, scale):
    """One sdpa call per group (reads the offsets on the host: not for CUDA, where that stalls the
    stream and cannot be captured in a graph)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [L, H, D] -> [H, L, D]: one group, every row sees every row of its group.
        qg, kg, vg = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).transpose(0, 1)
    return out


@dispatch.register_kernel("set_attention", "torch")
def set_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale):
    if q.is_cuda:
        return set_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale)
    return set_attention_per_group(q, k, v, cu_seqlens, max_seqlen, scale)


for _op, _fn in (("embed_layernorm", embed_layernorm_reference), ("add_layernorm", add_layernorm_reference),
                 ("bias_gelu", bias_gelu_reference), ("linear", linear_reference),
                 ("linear_bias_gelu", linear_bias_gelu_reference),
                 ("linear_add_layernorm", linear_add_layernorm_reference),
                 ("intra_mra", intra_mra_reference), ("inter_mra", inter_mra_reference),
                 ("mra_pool", mra_pool_reference)):
    dispatch.register_kernel(_op, "torch")(_fn)
