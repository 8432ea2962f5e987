"""IntraMRA and InterMRA: score, segment softmax (max-subtracted), residual pooling
(docs/model.md#intramra, docs/ops.md#intra_mra-inter_mra-mra_pool).

intra_mra: per segment of h, ``α = softmax(vᵀ tanh(W h + c))``, ``z = Σ (1 + α_i) h_i / (L + 1)``.
inter_mra: per sample over its segments' z, ``β = softmax(uᵀ tanh(U z + g))``,
``r = Σ (1 + β_m) z_m / (K + 1)``; a sample with no segment has r = 0.
mra_pool: both in one call (backends fuse them into one pass over h).
Weights α, β are returned in fp32 (fp64 for fp64 inputs); z, r in h's dtype.
"""
from __future__ import annotations

import torch

from .. import dispatch
from .._extension import register_fake
from ._checks import check_backend, check_fake_devices, check_float, check_offsets, check_shape


def _check_scorer(names: str, W, c, v, x: torch.Tensor) -> None:
    """A scorer's projection [a, d], its bias [a] and score vector [a]; ``names`` as the op's
    parameters call them ("Wcv" for IntraMRA, "Ugu" for InterMRA)."""
    nw, nc, nv = names
    check_float(nw, W, 2, like=x)
    a = W.shape[0]
    check_shape(nw, W, (a, x.shape[1]))
    check_float(nc, c, 1, like=x)
    check_shape(nc, c, (a,))
    check_float(nv, v, 1, like=x)
    check_shape(nv, v, (a,))


def intra_mra(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, W: torch.Tensor, c: torch.Tensor,
              v: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, d], cu_seqlens_segment [S+1] int32 → z [S, d], α [N] (fp32)."""
    check_backend(backend)
    check_float("h", h, 2)
    check_offsets("cu_seqlens_segment", cu_seqlens_segment, h.shape[0], h)
    _check_scorer("Wcv", W, c, v, h)
    return dispatch.call("intra_mra", backend, h.device, h, cu_seqlens_segment, W, c, v)


def inter_mra(z: torch.Tensor, cu_segments_per_sample: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
              u: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """z [S, d], cu_segments_per_sample [B+1] int32 → r [B, d], β [S] (fp32)."""
    check_backend(backend)
    check_float("z", z, 2)
    check_offsets("cu_segments_per_sample", cu_segments_per_sample, z.shape[0], z)
    _check_scorer("Ugu", U, g, u, z)
    return dispatch.call("inter_mra", backend, z.device, z, cu_segments_per_sample, U, g, u)


def mra_pool(h: torch.Tensor, cu_seqlens_segment: torch.Tensor, cu_segments_per_sample: torch.Tensor,
             W: torch.Tensor, c: torch.Tensor, v: torch.Tensor, U: torch.Tensor, g: torch.Tensor,
             u: torch.Tensor, *, backend: str = "auto"):
    """IntraMRA then InterMRA in one call → (z [S, d], r [B, d], α [N], β [S])."""
    check_backend(backend)
    check_float("h", h, 2)
    num_segments = check_offsets("cu_seqlens_segment", cu_seqlens_segment, h.shape[0], h)
    check_offsets("cu_segments_per_sample", cu_segments_per_sample, num_segments, h)
    _check_scorer("Wcv", W, c, v, h)
    _check_scorer("Ugu", U, g, u, h)
    return dispatch.call("mra_pool", backend, h.device, h, cu_seqlens_segment, cu_segments_per_sample,
                         W, c, v, U, g, u)


def _group_ids(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = (cu[1:] - cu[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths,
                                  output_size=total)
    return ids, lengths


def _residual_softmax_pool(x: torch.Tensor, cu: torch.Tensor, W, c, v):
    """Shared by both levels: scores, group softmax, (1 + w)/(L + 1)-weighted sums per group."""
    groups = cu.numel() - 1
    ids, lengths = _group_ids(cu, x.shape[0])
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for half inputs
    xa = x.to(acc)
    scores = torch.tanh(xa @ W.to(acc).t() + c.to(acc)) @ v.to(acc)
    group_max = torch.full((groups,), float("-inf"), dtype=acc, device=x.device).scatter_reduce(
        0, ids, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - group_max[ids])
    denom = torch.zeros(groups, dtype=acc, device=x.device).index_add_(0, ids, e)
    weights = e / denom[ids]
    residual = (1.0 + weights) / (lengths.to(acc) + 1.0)[ids]
    pooled = torch.zeros(groups, x.shape[1], dtype=acc, device=x.device).index_add_(
        0, ids, residual[:, None] * xa)
    return pooled.to(x.dtype), weights.to(torch.promote_types(acc, torch.float32))


def intra_mra_reference(h, cu_seqlens_segment, W, c, v):
    return _residual_softmax_pool(h, cu_seqlens_segment, W, c, v)


def inter_mra_reference(z, cu_segments_per_sample, U, g, u):
    return _residual_softmax_pool(z, cu_segments_per_sample, U, g, u)


def mra_pool_reference(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    z, alpha = _residual_softmax_pool(h, cu_seqlens_segment, W, c, v)
    r, beta = _residual_softmax_pool(z, cu_segments_per_sample, U, g, u)
    return z, r, alpha, beta


def _pooled_fake(x, cu):
    return x.new_empty((cu.shape[0] - 1, x.shape[1])), x.new_empty((x.shape[0],), dtype=torch.float32)


@register_fake("intra_mra")
def intra_mra_fake(h, cu_seqlens_segment, W, c, v):
    check_fake_devices("intra_mra", h, cu_seqlens_segment, W, c, v)
    return _pooled_fake(h, cu_seqlens_segment)


@register_fake("inter_mra")
def inter_mra_fake(z, cu_segments_per_sample, U, g, u):
    check_fake_devices("inter_mra", z, cu_segments_per_sample, U, g, u)
    return _pooled_fake(z, cu_segments_per_sample)


@register_fake("mra_pool")
def mra_pool_fake(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    check_fake_devices("mra_pool", h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u)
    z, alpha = _pooled_fake(h, cu_seqlens_segment)
    r, beta = _pooled_fake(z, cu_segments_per_sample)
    return z, r, alpha, beta
