"""SequenceSet: the ragged batch (per-modality packed values + lengths, no padding; docs/data.md)."""
from __future__ import annotations

import dataclasses
from functools import cached_property

import torch

from ..config import DM2S2Config, Modality
from .layout import HostPlan, PackedLayout
from .validation import pack_samples, split_jagged, unpad, validate


class SequenceSet:
    """A batch of B samples, each a set of sequences (one per modality, any of them missing).

    Per modality: ``values[name]`` packed over samples (ids ``[total]`` int64, or features
    ``[total, input_dim]`` float) and ``lengths[name]`` ``[B]`` int64 — TorchRec's KeyedJaggedTensor
    layout. Every constructor validates (``validation.validate``); a bad batch raises one ``ValueError`` naming the
    modality and the sample.
    """

    def __init__(self, config: DM2S2Config, values: dict[str, torch.Tensor],
                 lengths: dict[str, torch.Tensor], *, truncate: bool = False, _trusted: bool = False):
        self.config = config
        if _trusted:
            self.values, self.lengths = dict(values), dict(lengths)
            self.batch_size = int(next(iter(self.lengths.values())).numel())
            return
        self.values, self.lengths, self.batch_size = validate(config, values, lengths, truncate)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_jagged(cls, config: DM2S2Config, jagged: dict[str, tuple], *,
                    truncate: bool = False) -> "SequenceSet":
        """From ``{name: (values, lengths)}``; a modality left out is missing in every sample."""
        values, lengths = split_jagged(config, jagged)
        return cls(config, values, lengths, truncate=truncate)

    @classmethod
    def from_samples(cls, config: DM2S2Config, samples: list[dict], *, truncate: bool = False,
                     device: torch.device | str | None = None) -> "SequenceSet":
        """From one dict per sample: modality name → ids (list or 1-D tensor) or features (2-D).

        A missing key or an empty sequence is a missing modality.
        """
        values, lengths = pack_samples(config, samples, device)
        return cls(config, values, lengths, truncate=truncate)

    @classmethod
    def from_padded(cls, config: DM2S2Config, padded: dict[str, tuple], *,
                    truncate: bool = False) -> "SequenceSet":
        """From ``{name: (padded [B, L] or [B, L, input_dim], mask [B, L] bool)}``.

        Elements whose mask is True are taken in order (the mask need not be left-aligned).
        """
        return cls.from_jagged(config, unpad(config, padded), truncate=truncate)

    @classmethod
    def from_kjt(cls, config: DM2S2Config, kjt, dense: dict | None = None, *,
                 truncate: bool = False) -> "SequenceSet":
        """From a TorchRec ``KeyedJaggedTensor`` of id modalities, dense ones in ``dense``
        (``{name: (values, lengths)}``); see ``data.kjt.from_kjt``. Needs the ``torchrec`` extra."""
        from .kjt import from_kjt
        return from_kjt(config, kjt, dense, truncate=truncate)

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

    def to_kjt(self):
        """The id modalities as a TorchRec ``KeyedJaggedTensor`` (``data.kjt.to_kjt``); the dense
        ones are ``data.kjt.dense_jagged(self)``."""
        from .kjt import to_kjt
        return to_kjt(self)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceSet":
        moved = SequenceSet(self.config,
                            {k: v.to(device, non_blocking=non_blocking) for k, v in self.values.items()},
                            {k: v.to(device, non_blocking=non_blocking) for k, v in self.lengths.items()},
                            _trusted=True)
        if "layout" in self.__dict__ or self.device.type == "cpu":
            # The plan comes from host lengths: derive it here, before they are on the device
            # (read back from there, they would cost a device sync per batch).
            moved.__dict__["layout"] = PackedLayout.from_plan(self.host_plan(), torch.device(device))
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
        return PackedLayout.from_plan(self.host_plan(), self.device)

    def host_plan(self) -> HostPlan:
        """The packing as host arrays (what ``layout`` moves to the device, and the graph buckets pad)."""
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




# ---- pytree node (torch.export, torch.compile, torch.utils._pytree) --------------------------------
# Children: the values and lengths dicts, and the layout (a PackedLayout node) once it is built: a
# batch whose layout is built carries it across, so that a traced forward never builds it (host work
# with numpy). The config is the node's static context.
_SEQUENCE_SET_CHILDREN = ("values", "lengths", "layout")


def _flatten_sequence_set(batch: SequenceSet):
    layout = batch.__dict__.get("layout")
    children = [batch.values, batch.lengths] + ([layout] if layout is not None else [])
    return children, batch.config


def _flatten_sequence_set_with_keys(batch: SequenceSet):
    from torch.utils._pytree import GetAttrKey

    children, config = _flatten_sequence_set(batch)
    return [(GetAttrKey(name), c) for name, c in zip(_SEQUENCE_SET_CHILDREN, children)], config


def _unflatten_sequence_set(children, config: DM2S2Config) -> SequenceSet:
    values, lengths, *layout = children
    batch = SequenceSet(config, values, lengths, _trusted=True)
    if layout:
        batch.__dict__["layout"] = layout[0]
    return batch


def config_to_dict(config: DM2S2Config) -> dict:
    """``config`` as plain JSON-able data (``config_from_dict`` inverts it)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> DM2S2Config:
    fields = dict(data)
    fields["modalities"] = tuple(Modality(**m) for m in fields["modalities"])
    return DM2S2Config(**fields)


def _register_pytree() -> None:
    from torch.utils import _pytree

    if SequenceSet in _pytree.SUPPORTED_NODES:
        return
    _pytree.register_pytree_node(
        SequenceSet, _flatten_sequence_set, _unflatten_sequence_set,
        serialized_type_name="dm2s2_fast.data.SequenceSet", to_dumpable_context=config_to_dict,
        from_dumpable_context=config_from_dict, flatten_with_keys_fn=_flatten_sequence_set_with_keys)


_register_pytree()
