"""What the in-process ``Ranker`` and the Triton / Ray servers share: a request's error in its own
terms, and the packing of validated requests into one ragged batch."""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..config import DM2S2Config
from ..data import SequenceSet


def candidate_message(message: str) -> str:
    """The data layer names a batch's samples; a request's caller calls them candidates."""
    return re.sub(r"\bsample (\d+)", r"candidate \1", message)


def pack(config: DM2S2Config, batches: list[SequenceSet], *,
         dense_dtype: Callable[[str], torch.dtype | None] | None = None,
         cat: Callable[[tuple, list[torch.Tensor]], torch.Tensor] | None = None) -> SequenceSet:
    """One ragged batch of validated requests' candidates, request after request, modality by
    modality: no padding between requests, and no second validation (the concatenation of valid
    batches is valid). ``dense_dtype(name)``: the dtype to cast a dense modality's features to before
    the copy (None: as they are). ``cat(key, parts)``: how to join the parts, ``key`` being
    ``("v" | "l", name)`` (default ``torch.cat``; the ``Ranker`` packs into pinned buffers on CUDA)."""
    def join(key, parts):
        if cat is not None:
            return cat(key, parts)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    values, lengths = {}, {}
    for modality in config.modalities:
        name = modality.name
        parts = [b.values[name] for b in batches]
        dtype = dense_dtype(name) if dense_dtype is not None and modality.kind == "dense" else None
        if dtype is not None:
            parts = [p.to(dtype) for p in parts]
        values[name] = join(("v", name), parts)
        lengths[name] = join(("l", name), [b.lengths[name] for b in batches])
    return SequenceSet(config, values, lengths, _trusted=True)
