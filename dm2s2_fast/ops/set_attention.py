"""Masked set attention over packed groups (FlashAttention's varlen contract, bidirectional)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_float, check_offsets, max_group


def set_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, scale: float | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of each row of q over the k/v rows of its own group, none across groups.

    q, k, v: [N, H, D] (last dim contiguous); cu_seqlens: [G+1] int32 group offsets from 0 to N;
    max_seqlen: the longest group. Returns [N, H, D] in q's dtype.
    """
    check_float("q", q, 3)
    check_float("k", k, 3, like=q)
    check_float("v", v, 3, like=q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_offsets("cu_seqlens", cu_seqlens, q.shape[0], q)
    longest = max_group(cu_seqlens.cpu())
    if int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest group ({longest})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return backends.call("set_attention", backend, q.device, q, k, v, cu_seqlens, int(max_seqlen), scale)


@backends.register_kernel("set_attention", "torch")
def set_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale):
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [L, H, D] -> [H, L, D]: one group, every row sees every row of its group.
        qg, kg, vg = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).transpose(0, 1)
    return out
