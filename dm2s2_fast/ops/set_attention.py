"""Masked set attention over packed groups: FlashAttention's varlen contract, bidirectional
(docs/ops.md#set_attention)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_float, check_int, check_offsets, check_scalar, max_group


def set_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, scale: float | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of each row of q over the k/v rows of its own group, none across groups.

    q, k, v: [N, H, D] (last dim contiguous); cu_seqlens: [G+1] int32 group offsets from 0 to N;
    max_seqlen: the longest group. Returns [N, H, D] in q's dtype. Inputs are assumed finite (not
    checked: a pass over them would cost as much as the op); a NaN or inf in one group may reach
    other groups' outputs on backends that tile several groups together (Triton's packed mode).
    """
    check_backend(backend)
    max_seqlen = check_int("max_seqlen", max_seqlen)
    check_float("q", q, 3)
    check_float("k", k, 3, like=q)
    check_float("v", v, 3, like=q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_offsets("cu_seqlens", cu_seqlens, q.shape[0], q)
    longest = max_group(cu_seqlens.cpu())
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest group ({longest})")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0  # D = 0: nothing to scale
    scale = check_scalar("scale", scale)
    return dispatch.call("set_attention", backend, q.device, q, k, v, cu_seqlens, max_seqlen, scale)


def set_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale):
    """Groups padded to ``max_seqlen`` with a key mask, one sdpa call; no host sync (so a CUDA
    graph can capture it)."""
    n, heads, dim = q.shape
    groups = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    rows = torch.arange(n, device=q.device)
    group = torch.searchsorted(cu[1:], rows, right=True)
    position = rows - cu[group]
    width = max(int(max_seqlen), 1)

    def pad(t):
        padded = t.new_zeros(groups, width, heads, dim)
        padded[group, position] = t
        return padded.transpose(1, 2)

    # Padding query rows of a group see its keys; an empty group's rows are all masked (NaN), but
    # no real row is gathered from them.
    keep = torch.arange(width, device=q.device)[None, :] < (cu[1:] - cu[:-1])[:, None]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[group, position]


@register_fake("set_attention")
def set_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale, variant=0):
    check_fake_devices("set_attention", q, k, v, cu_seqlens)
    return q.new_empty(q.shape)
