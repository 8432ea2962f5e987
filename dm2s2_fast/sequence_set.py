"""SequenceSet: the ragged batch of DESIGN §2 (per-modality packed values + lengths, no padding)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .config import DM2S2Config, Modality

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _sample_of(lengths: torch.Tensor, flat_index: int) -> int:
    """The sample that packed value ``flat_index`` belongs to, given per-sample lengths."""
    ends = torch.cumsum(lengths.cpu(), 0)
    return int(torch.searchsorted(ends, torch.tensor(flat_index), right=True))


@dataclass(frozen=True)
class HostPlan:
    """The packing of host ``lengths`` [B, M], as host int64 arrays: what ``PackedLayout`` moves to
    the device, and what the CUDA-graph buckets pad. Computed with numpy: a batch's plan is host
    work on every request, and numpy's per-call cost on small arrays is a fraction of torch's."""

    lengths: np.ndarray  # [B, M]
    totals: np.ndarray  # [B] elements per sample
    cu_seqlens_set: np.ndarray  # [B+1]
    cu_seqlens_segment: np.ndarray  # [S+1]
    cu_segments: np.ndarray  # [B+1] segment offsets per sample
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
                   cu_segments=_offsets(present.reshape(B, M).sum(1)), segment_lengths=seg_len,
                   segment_sample=seg_sample, segment_modality=seg_modality,
                   element_sample=seg_sample[element_segment], element_modality=seg_modality[element_segment],
                   element_position=np.arange(cu_set[-1]) - cu_seg[:-1][element_segment],
                   rows=tuple(rows), positions=tuple(positions))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


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


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
_ITEMSIZE = {torch.int64: 8, torch.int32: 4, torch.bool: 1}


@dataclass(frozen=True)
class PackedLayout:
    """How a batch packs: sample-major elements, modalities in config order inside each sample.

    Offsets are int32 (the varlen contract); index vectors int64; all on the batch's device except
    ``lengths`` (host copy, [B, M]) and ``host`` (the same plan as host arrays).
    """

    batch_size: int
    num_elements: int
    num_segments: int
    lengths: torch.Tensor
    cu_seqlens_set: torch.Tensor
    max_seqlen_set: int
    cu_seqlens_segment: torch.Tensor
    max_seqlen_segment: int
    cu_segments: torch.Tensor
    max_segments: int
    segment_sample: torch.Tensor
    segment_modality: torch.Tensor
    element_sample: torch.Tensor
    element_modality: torch.Tensor
    element_position: torch.Tensor
    rows: tuple[torch.Tensor, ...]  # per modality: packed row of each of its values
    positions: tuple[torch.Tensor, ...]  # per modality: intra-order position of each of its values
    empty_samples: torch.Tensor  # [B] bool: samples with no element at all (r = 0)
    host: HostPlan = field(repr=False, compare=False)

    @classmethod
    def from_plan(cls, plan: HostPlan, device: torch.device) -> "PackedLayout":
        lengths = torch.from_numpy(plan.lengths)
        B, M = lengths.shape
        i32, i64 = torch.int32, torch.int64
        arrays = [(plan.cu_seqlens_set, i32), (plan.cu_seqlens_segment, i32), (plan.cu_segments, i32),
                  (plan.segment_sample, i64), (plan.segment_modality, i64), (plan.element_sample, i64),
                  (plan.element_modality, i64), (plan.element_position, i64), (plan.totals == 0, torch.bool)]
        arrays += [(r, i64) for r in plan.rows] + [(p, i64) for p in plan.positions]
        (cu_set, cu_seg, cu_segments, seg_sample, seg_modality, el_sample, el_modality, el_position,
         empty, *rows_positions) = _to_device(arrays, device)
        seg_len, per_sample = plan.segment_lengths, np.diff(plan.cu_segments)
        return cls(
            batch_size=B, num_elements=plan.num_elements, num_segments=plan.num_segments, lengths=lengths,
            cu_seqlens_set=cu_set, max_seqlen_set=int(plan.totals.max()) if B else 0,
            cu_seqlens_segment=cu_seg, max_seqlen_segment=int(seg_len.max()) if seg_len.shape[0] else 0,
            cu_segments=cu_segments, max_segments=int(per_sample.max()) if B else 0,
            segment_sample=seg_sample, segment_modality=seg_modality, element_sample=el_sample,
            element_modality=el_modality, element_position=el_position,
            rows=tuple(rows_positions[:M]), positions=tuple(rows_positions[M:]), empty_samples=empty, host=plan,
        )


class SequenceSet:
    """A batch of B samples, each a set of sequences (one per modality, any of them missing).

    Per modality: ``values[name]`` packed over samples (ids ``[total]`` int64, or features
    ``[total, input_dim]`` float) and ``lengths[name]`` ``[B]`` int64 — TorchRec's KeyedJaggedTensor
    layout. Every constructor validates (DESIGN §2); a bad batch raises one ``ValueError`` naming the
    modality and the sample.
    """

    def __init__(self, config: DM2S2Config, values: dict[str, torch.Tensor],
                 lengths: dict[str, torch.Tensor], *, truncate: bool = False, _trusted: bool = False):
        self.config = config
        if _trusted:
            self.values, self.lengths = dict(values), dict(lengths)
            self.batch_size = int(next(iter(self.lengths.values())).numel())
            return
        self.values, self.lengths, self.batch_size = _validate(config, values, lengths, truncate)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_jagged(cls, config: DM2S2Config, jagged: dict[str, tuple], *,
                    truncate: bool = False) -> "SequenceSet":
        """From ``{name: (values, lengths)}``; a modality left out is missing in every sample."""
        if not isinstance(jagged, dict):
            raise ValueError("from_jagged takes a dict {modality name: (values, lengths)}")
        values, lengths = {}, {}
        for name, pair in jagged.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"modality {name!r}: expected a (values, lengths) pair")
            values[name], lengths[name] = pair
        return cls(config, values, lengths, truncate=truncate)

    @classmethod
    def from_samples(cls, config: DM2S2Config, samples: list[dict], *, truncate: bool = False,
                     device: torch.device | str | None = None) -> "SequenceSet":
        """From one dict per sample: modality name → ids (list or 1-D tensor) or features (2-D).

        A missing key or an empty sequence is a missing modality.
        """
        if not isinstance(samples, (list, tuple)):
            raise ValueError("from_samples takes a list of dicts, one per sample")
        known = {m.name for m in config.modalities}
        per_modality: dict[str, list[torch.Tensor]] = {m.name: [] for m in config.modalities}
        for b, sample in enumerate(samples):
            if not isinstance(sample, dict):
                raise ValueError(f"sample {b}: expected a dict of modality name -> sequence")
            unknown = set(sample) - known
            if unknown:
                raise ValueError(f"sample {b}: unknown modality {sorted(unknown)[0]!r}; "
                                 f"the config has {sorted(known)}")
            for modality in config.modalities:
                per_modality[modality.name].append(
                    _as_sequence(modality, sample.get(modality.name), b, device))
        values, lengths = {}, {}
        for modality in config.modalities:
            seqs = per_modality[modality.name]
            lengths[modality.name] = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64)
            values[modality.name] = (torch.cat(seqs) if seqs else _empty(modality, device))
            lengths[modality.name] = lengths[modality.name].to(values[modality.name].device)
        return cls(config, values, lengths, truncate=truncate)

    @classmethod
    def from_padded(cls, config: DM2S2Config, padded: dict[str, tuple], *,
                    truncate: bool = False) -> "SequenceSet":
        """From ``{name: (padded [B, L] or [B, L, input_dim], mask [B, L] bool)}``.

        Elements whose mask is True are taken in order (the mask need not be left-aligned).
        """
        if not isinstance(padded, dict):
            raise ValueError("from_padded takes a dict {modality name: (padded, mask)}")
        values, lengths = {}, {}
        for name, pair in padded.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"modality {name!r}: expected a (padded, mask) pair")
            data, mask = pair
            if not isinstance(data, torch.Tensor) or not isinstance(mask, torch.Tensor):
                raise ValueError(f"modality {name!r}: padded values and mask must be tensors")
            if mask.dtype != torch.bool or mask.dim() != 2 or tuple(data.shape[:2]) != tuple(mask.shape):
                raise ValueError(f"modality {name!r}: mask must be bool [B, L] matching the padded "
                                 f"values' first two dims, got {tuple(mask.shape)} and {tuple(data.shape)}")
            values[name], lengths[name] = data[mask], mask.sum(1)
        return cls.from_jagged(config, {n: (values[n], lengths[n]) for n in values}, truncate=truncate)

    # ---- views and moves ----------------------------------------------------------------------
    def to_padded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (padded, mask)}``, left-aligned, zero-filled; the inverse of ``from_padded``."""
        out = {}
        for modality in self.config.modalities:
            values, lengths = self.values[modality.name], self.lengths[modality.name]
            width = int(lengths.max()) if lengths.numel() else 0
            mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
            padded = values.new_zeros((self.batch_size, width) + tuple(values.shape[1:]))
            padded[mask] = values
            out[modality.name] = (padded, mask)
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceSet":
        moved = SequenceSet(self.config,
                            {k: v.to(device, non_blocking=non_blocking) for k, v in self.values.items()},
                            {k: v.to(device, non_blocking=non_blocking) for k, v in self.lengths.items()},
                            _trusted=True)
        if "layout" in self.__dict__ or self.device.type == "cpu":
            # The plan comes from host lengths: derive it here, before they are on the device
            # (read back from there, they would cost a device sync per batch).
            moved.__dict__["layout"] = PackedLayout.from_plan(self._host_plan(), torch.device(device))
        return moved

    def pin_memory(self) -> "SequenceSet":
        return SequenceSet(self.config, {k: v.pin_memory() for k, v in self.values.items()},
                           {k: v.pin_memory() for k, v in self.lengths.items()}, _trusted=True)

    @property
    def device(self) -> torch.device:
        return next(iter(self.lengths.values())).device

    def __len__(self) -> int:
        return self.batch_size

    @cached_property
    def layout(self) -> PackedLayout:
        """Packing plan, derived once per batch (one host read of the lengths)."""
        return PackedLayout.from_plan(self._host_plan(), self.device)

    def _host_plan(self) -> HostPlan:
        if "layout" in self.__dict__:
            return self.layout.host
        lengths = torch.stack([self.lengths[m.name] for m in self.config.modalities], 1) \
            if self.batch_size else torch.zeros(0, self.config.num_modalities, dtype=torch.int64)
        return HostPlan.build(lengths.to("cpu", torch.int64).numpy())

    @property
    def num_elements(self) -> int:
        return sum(int(v.shape[0]) for v in self.values.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.name}: {int(self.values[m.name].shape[0])}" for m in self.config.modalities)
        return f"SequenceSet(batch_size={self.batch_size}, elements={{{parts}}}, device={self.device})"


# ---- validation -------------------------------------------------------------------------------
def _empty(modality: Modality, device) -> torch.Tensor:
    if modality.kind == "dense":
        return torch.zeros(0, modality.input_dim, device=device)
    return torch.zeros(0, dtype=torch.int64, device=device)


def _as_sequence(modality: Modality, seq, b: int, device) -> torch.Tensor:
    where = f"modality {modality.name!r}, sample {b}"
    if seq is None:
        return _empty(modality, device)
    try:
        t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: cannot make a tensor of {type(seq).__name__}: {exc}") from None
    if device is not None:
        t = t.to(device)
    if t.numel() == 0:
        return _empty(modality, t.device)
    # Checked per sample, before torch.cat promotes mixed dtypes (bool ids beside int ones, int
    # features beside float ones) into a batch that would then pass.
    if modality.kind == "dense":
        if not t.is_floating_point():
            raise ValueError(f"{where}: dense features must be floating point, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != modality.input_dim:
            raise ValueError(f"{where}: dense features must be 2-D [length, {modality.input_dim}], "
                             f"got shape {tuple(t.shape)}")
    else:
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"{where}: ids must be integers, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{where}: ids must be 1-D, got shape {tuple(t.shape)}")
    return t


def _validate(config: DM2S2Config, values: dict, lengths: dict, truncate: bool):
    known = [m.name for m in config.modalities]
    for name in list(values) + list(lengths):
        if name not in known:
            raise ValueError(f"unknown modality {name!r}; the config has {known}")
    if set(values) != set(lengths):
        raise ValueError(f"values and lengths must name the same modalities, got {sorted(values)} "
                         f"and {sorted(lengths)}")
    if not values:
        raise ValueError("a SequenceSet needs at least one modality's (values, lengths)")
    batch_size, device = None, None
    lengths = dict(lengths)  # the caller's dict stays as given
    for name in values:
        l = lengths[name]
        if not isinstance(l, torch.Tensor):
            try:
                l = torch.as_tensor(l)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"modality {name!r}: cannot make lengths of {type(l).__name__}: {exc}") from None
            if l.numel() == 0:  # [] (no samples) is float32 to torch
                l = l.to(torch.int64)
        if l.device.type == "meta":
            raise ValueError(f"modality {name!r}: lengths are on the meta device (no data to check)")
        if l.dim() != 1 or (l.dtype not in _INT_DTYPES):
            raise ValueError(f"modality {name!r}: lengths must be a 1-D integer tensor, got "
                             f"{l.dtype} of shape {tuple(l.shape)}")
        if batch_size is None:
            batch_size, device = l.numel(), l.device
        elif l.numel() != batch_size:
            raise ValueError(f"modality {name!r}: lengths has {l.numel()} samples, another modality "
                             f"has {batch_size}")
        lengths[name] = l
    out_values, out_lengths = {}, {}
    for modality in config.modalities:
        name = modality.name
        if name not in values:
            out_values[name] = _empty(modality, device)
            out_lengths[name] = torch.zeros(batch_size, dtype=torch.int64, device=device)
            continue
        v, l = values[name], lengths[name].to(torch.int64)
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"modality {name!r}: values must be a tensor, got {type(v).__name__}")
        if v.dim() == 0:
            raise ValueError(f"modality {name!r}: values must be 1-D ids or 2-D features, got a scalar")
        if v.device != device or l.device != device:
            raise ValueError(f"modality {name!r}: values on {v.device} and lengths on {l.device}; "
                             f"the batch is on {device}")
        host_l = l.cpu()
        if batch_size and int(host_l.min()) < 0:
            b = int(torch.nonzero(host_l < 0)[0])
            raise ValueError(f"modality {name!r}, sample {b}: negative length {int(host_l[b])}")
        # Before the sum: no length may exceed the values (so the int64 sum cannot wrap around).
        if batch_size and int(host_l.max()) > v.shape[0]:
            b = int(torch.argmax(host_l))
            raise ValueError(f"modality {name!r}, sample {b}: length {int(host_l[b])} but there are only "
                             f"{v.shape[0]} values")
        total = int(host_l.sum())
        if modality.kind == "dense":
            if v.numel() == 0 and total == 0:
                v = _empty(modality, device)
            if not v.is_floating_point():
                raise ValueError(f"modality {name!r}: dense features must be floating point, got {v.dtype}")
            if v.dim() != 2 or v.shape[1] != modality.input_dim:
                raise ValueError(f"modality {name!r}: dense features must be [total, {modality.input_dim}], "
                                 f"got shape {tuple(v.shape)}")
        else:
            if v.numel() == 0 and total == 0:
                v = _empty(modality, device)
            if v.dtype not in _INT_DTYPES:
                raise ValueError(f"modality {name!r}: ids must be integers, got {v.dtype}")
            if v.dim() != 1:
                raise ValueError(f"modality {name!r}: ids must be 1-D, got shape {tuple(v.shape)}")
            v = v.to(torch.int64)
        if v.shape[0] != total:
            raise ValueError(f"modality {name!r}: lengths sum to {total} but there are {v.shape[0]} "
                             f"values")
        # One min/max pass decides (NaN and inf reach the min or the max); only a bad batch pays
        # for finding the sample. (isfinite().all() took 8.3 ms on 10.7k image rows, aminmax 0.7.)
        # The bound is fp32's largest value: the model computes in fp32 at the widest, so fp64
        # features beyond it would become inf there.
        if modality.kind == "dense":
            if v.numel() and not all(abs(float(t)) <= _FLOAT32_MAX for t in torch.aminmax(v)):
                ok = torch.isfinite(v)
                if v.dtype == torch.float64:  # narrower dtypes hold nothing beyond fp32's range
                    ok &= v.abs() <= _FLOAT32_MAX
                bad = ~ok.all(1)
                b = _sample_of(host_l, int(torch.nonzero(bad)[0]))
                raise ValueError(f"modality {name!r}, sample {b}: features are not finite in float32 "
                                 f"(NaN, inf, or beyond ±{_FLOAT32_MAX:.3g})")
        elif total:
            high = config.vocab_size if modality.kind == "tokens" else modality.num_embeddings
            lo, hi = (int(t) for t in torch.aminmax(v))
            if lo < 0 or hi >= high:
                i = int(torch.nonzero((v < 0) | (v >= high))[0])
                raise ValueError(f"modality {name!r}, sample {_sample_of(host_l, i)}: id {int(v[i])} "
                                 f"is out of range [0, {high})")
        too_long = host_l > config.max_positions
        if bool(too_long.any()):
            if not truncate:
                b = int(torch.nonzero(too_long)[0])
                raise ValueError(f"modality {name!r}, sample {b}: length {int(host_l[b])} exceeds "
                                 f"max_positions {config.max_positions} (pass truncate=True to cut)")
            v, l = _truncate(v, host_l, config.max_positions, device)
        out_values[name], out_lengths[name] = v, l.to(device)
    return out_values, out_lengths, batch_size


def _truncate(values: torch.Tensor, host_lengths: torch.Tensor, limit: int, device):
    starts = torch.cumsum(host_lengths, 0) - host_lengths
    kept = host_lengths.clamp(max=limit)
    owner = torch.arange(host_lengths.numel()).repeat_interleave(kept)
    within = torch.arange(int(kept.sum())) - (torch.cumsum(kept, 0) - kept)[owner]
    return values[(starts[owner] + within).to(device)], kept
