"""How a batch packs: the host plan, the device layout, and the protocol the engine runs on.

Elements are packed sample-major, modalities in config order inside each sample (docs/data.md).
Offsets follow FlashAttention's varlen contract: ``cu_seqlens_*`` are int32 ``[G+1]`` vectors from 0
to the number of rows, ``max_seqlen_*`` the longest group. Three groupings exist:

* ``cu_seqlens_set`` [B+1]: rows per sample (the groups of set attention);
* ``cu_seqlens_segment`` [S+1]: rows per present (sample, modality) segment (IntraMRA, and
  ``attention="modality"``);
* ``cu_segments_per_sample`` [B+1]: segments per sample (InterMRA pools z over these).

``Layout`` is what ``FastDM2S2`` needs of a batch; ``PackedLayout`` is a batch's own, and the CUDA-graph
runner's ``PaddedLayout`` (``dm2s2_fast/graphs.py``) is a padded one of the same protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Layout(Protocol):
    """The packing the engine's forward reads: offsets, max lengths and, per modality, where each of
    its values goes (``rows``, distinct, below ``embedding_rows``) and its position inside its
    sequence (``positions``). The forward runs on the first ``num_elements`` rows; a padded layout
    sends its pad entries to rows of their own past them."""

    num_elements: int
    embedding_rows: int
    cu_seqlens_set: torch.Tensor
    max_seqlen_set: int
    cu_seqlens_segment: torch.Tensor
    max_seqlen_segment: int
    cu_segments_per_sample: torch.Tensor
    rows: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class HostPlan:
    """The packing of host ``lengths`` [B, M], as host int64 arrays: what ``PackedLayout`` moves to
    the device, and what the CUDA-graph buckets pad. Computed with numpy: a batch's plan is host
    work on every request, and numpy's per-call cost on small arrays is a fraction of torch's."""

    lengths: np.ndarray  # [B, M]
    totals: np.ndarray  # [B] elements per sample
    cu_seqlens_set: np.ndarray  # [B+1]
    cu_seqlens_segment: np.ndarray  # [S+1]
    cu_segments_per_sample: np.ndarray  # [B+1]
    segment_lengths: np.ndarray  # [S]
    segment_sample: np.ndarray  # [S]
    segment_modality: np.ndarray  # [S]
    element_sample: np.ndarray  # [N]
    element_modality: np.ndarray  # [N]
    element_position: np.ndarray  # [N]
    rows: tuple[np.ndarray, ...]  # per modality: packed row of each of its values
    positions: tuple[np.ndarray, ...]  # per modality: intra-order position of each of its values

    @property
    def num_elements(self) -> int:
        return int(self.cu_seqlens_set[-1])

    @property
    def num_segments(self) -> int:
        return int(self.segment_lengths.shape[0])

    @classmethod
    def build(cls, lengths: np.ndarray) -> "HostPlan":
        B, M = lengths.shape
        totals = lengths.sum(1)
        cu_set = _offsets(totals)
        # start row of segment (b, m) = sample start + lengths of the modalities before m.
        seg_start = cu_set[:-1, None] + np.cumsum(lengths, 1) - lengths
        flat_len = lengths.reshape(-1)
        present = flat_len > 0
        seg_len = flat_len[present]
        cu_seg = _offsets(seg_len)
        seg_sample = np.repeat(np.arange(B), M)[present]
        seg_modality = np.tile(np.arange(M), B)[present]
        element_segment = np.repeat(np.arange(seg_len.shape[0]), seg_len)
        rows, positions = [], []
        for m in range(M):
            lm = lengths[:, m]
            owner = np.repeat(np.arange(B), lm)
            within = np.arange(owner.shape[0]) - (np.cumsum(lm) - lm)[owner]
            rows.append(seg_start[owner, m] + within)
            positions.append(within)
        return cls(lengths=lengths, totals=totals, cu_seqlens_set=cu_set, cu_seqlens_segment=cu_seg,
                   cu_segments_per_sample=_offsets(present.reshape(B, M).sum(1)), segment_lengths=seg_len,
                   segment_sample=seg_sample, segment_modality=seg_modality,
                   element_sample=seg_sample[element_segment], element_modality=seg_modality[element_segment],
                   element_position=np.arange(cu_set[-1]) - cu_seg[:-1][element_segment],
                   rows=tuple(rows), positions=tuple(positions))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
_ITEMSIZE = {torch.int64: 8, torch.int32: 4, torch.bool: 1}


def _to_device(arrays: list[tuple[np.ndarray, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """``arrays`` as tensors of the given dtypes on ``device``, through one host→device copy: they
    are packed into one byte buffer (each 8-byte aligned) and viewed back out of its device copy."""
    sizes = [a.shape[0] * _ITEMSIZE[dt] for a, dt in arrays]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 8) * 8)
    host = np.empty(starts[-1], dtype=np.uint8)
    for (a, dt), start, n in zip(arrays, starts, sizes):
        host[start:start + n] = a.astype(_NUMPY[dt], copy=False).view(np.uint8)
    buffer = torch.from_numpy(host).to(device)
    return [buffer[start:start + n].view(dt) for (a, dt), start, n in zip(arrays, starts, sizes)]


@dataclass(frozen=True)
class PackedLayout:
    """A batch's ``Layout``, plus what maps the packed outputs back to (sample, modality, position).

    Offsets are int32; index vectors int64; all on the batch's device except ``lengths`` (host copy,
    [B, M]) and ``host`` (the same plan as host arrays).
    """

    batch_size: int
    num_elements: int
    num_segments: int
    lengths: torch.Tensor
    cu_seqlens_set: torch.Tensor
    max_seqlen_set: int
    cu_seqlens_segment: torch.Tensor
    max_seqlen_segment: int
    cu_segments_per_sample: torch.Tensor
    max_segments_per_sample: int
    segment_sample: torch.Tensor
    segment_modality: torch.Tensor
    element_sample: torch.Tensor
    element_modality: torch.Tensor
    element_position: torch.Tensor
    rows: tuple[torch.Tensor, ...]  # per modality: packed row of each of its values
    positions: tuple[torch.Tensor, ...]  # per modality: intra-order position of each of its values
    empty_samples: torch.Tensor  # [B] bool: samples with no element at all (r = 0)
    host: HostPlan = field(repr=False, compare=False)

    @property
    def embedding_rows(self) -> int:
        """Every value of a batch has a row of its own among the ``num_elements``."""
        return self.num_elements

    @classmethod
    def from_plan(cls, plan: HostPlan, device: torch.device) -> "PackedLayout":
        lengths = torch.from_numpy(plan.lengths)
        B, M = lengths.shape
        i32, i64 = torch.int32, torch.int64
        arrays = [(plan.cu_seqlens_set, i32), (plan.cu_seqlens_segment, i32), (plan.cu_segments_per_sample, i32),
                  (plan.segment_sample, i64), (plan.segment_modality, i64), (plan.element_sample, i64),
                  (plan.element_modality, i64), (plan.element_position, i64), (plan.totals == 0, torch.bool)]
        arrays += [(r, i64) for r in plan.rows] + [(p, i64) for p in plan.positions]
        (cu_set, cu_seg, cu_per_sample, seg_sample, seg_modality, el_sample, el_modality, el_position,
         empty, *rows_positions) = _to_device(arrays, device)
        seg_len, per_sample = plan.segment_lengths, np.diff(plan.cu_segments_per_sample)
        return cls(
            batch_size=B, num_elements=plan.num_elements, num_segments=plan.num_segments, lengths=lengths,
            cu_seqlens_set=cu_set, max_seqlen_set=int(plan.totals.max()) if B else 0,
            cu_seqlens_segment=cu_seg, max_seqlen_segment=int(seg_len.max()) if seg_len.shape[0] else 0,
            cu_segments_per_sample=cu_per_sample, max_segments_per_sample=int(per_sample.max()) if B else 0,
            segment_sample=seg_sample, segment_modality=seg_modality, element_sample=el_sample,
            element_modality=el_modality, element_position=el_position,
            rows=tuple(rows_positions[:M]), positions=tuple(rows_positions[M:]), empty_samples=empty, host=plan,
        )


# ---- pytree node (torch.export, torch.compile, torch.utils._pytree) --------------------------------
# The tensors are the children; the sizes and max lengths are the node's static context (two layouts
# of other sizes are two tree structures). The host plan is not carried: it is host data derived from
# ``lengths``, so unflattening rebuilds it from them (None where they are fake, i.e. while tracing,
# where nothing reads it).
_LAYOUT_TENSORS = ("lengths", "cu_seqlens_set", "cu_seqlens_segment", "cu_segments_per_sample", "segment_sample",
                   "segment_modality", "element_sample", "element_modality", "element_position", "rows",
                   "positions", "empty_samples")
_LAYOUT_SIZES = ("batch_size", "num_elements", "num_segments", "max_seqlen_set", "max_seqlen_segment",
                 "max_segments_per_sample")


def _flatten_layout(layout: PackedLayout):
    return [getattr(layout, name) for name in _LAYOUT_TENSORS], tuple(getattr(layout, n) for n in _LAYOUT_SIZES)


def _flatten_layout_with_keys(layout: PackedLayout):
    from torch.utils._pytree import GetAttrKey

    return [(GetAttrKey(name), getattr(layout, name)) for name in _LAYOUT_TENSORS], \
        tuple(getattr(layout, n) for n in _LAYOUT_SIZES)


def _unflatten_layout(children, sizes) -> PackedLayout:
    fields = dict(zip(_LAYOUT_TENSORS, children))
    fields["rows"], fields["positions"] = tuple(fields["rows"]), tuple(fields["positions"])
    return PackedLayout(**dict(zip(_LAYOUT_SIZES, sizes)), **fields, host=_host_plan_of(fields["lengths"]))


def _host_plan_of(lengths) -> HostPlan | None:
    if not isinstance(lengths, torch.Tensor) or lengths.device.type != "cpu" or lengths.dim() != 2:
        return None
    try:
        return HostPlan.build(lengths.to(torch.int64).numpy())
    except (RuntimeError, TypeError):  # a fake or functional tensor while tracing: no data
        return None


def _register_pytree() -> None:
    from torch.utils import _pytree

    if PackedLayout in _pytree.SUPPORTED_NODES:
        return
    _pytree.register_pytree_node(
        PackedLayout, _flatten_layout, _unflatten_layout, serialized_type_name="dm2s2_fast.data.PackedLayout",
        to_dumpable_context=list, from_dumpable_context=tuple, flatten_with_keys_fn=_flatten_layout_with_keys)


_register_pytree()
