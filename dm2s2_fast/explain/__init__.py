"""Explanations of DM²S² scores as plain data, and reports a person can read (docs/explain.md).

``explain(out, batch, tokenizer)`` turns one batch's ``DM2S2Output`` into one JSON-ready record per
sample: the InterMRA weight β of each present modality, and each element's IntraMRA weight α and
importance (its share of the pooled vector r, docs/model.md#element-importance), with token ids
decoded when a tokenizer is given. ``render_html`` writes the records as a self-contained HTML page
(no dependency beyond the standard library), ``render_png`` as an image (needs matplotlib: the
``explain`` extra). Nothing here is imported by ``import dm2s2_fast``; transformers and matplotlib
are imported only when used.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..data import SequenceSet
from ..output import DM2S2Output

SCHEMA = "dm2s2_fast.explain/1"

# What ``tokenizer`` and ``labels`` values may be: a Hugging Face tokenizer (anything with
# ``convert_ids_to_tokens``), a callable ids -> strings, a sequence indexed by id, or a mapping id -> string.
Labeler = Any


def explain(out: DM2S2Output, batch: SequenceSet, tokenizer: Labeler = None, *,
            labels: Mapping[str, Labeler] | None = None,
            samples: Iterable[int] | None = None) -> list[dict]:
    """One record per sample (all of them, or those in ``samples``), in batch order::

        {"sample": b, "logits": [...], "empty": bool, "missing": [names of absent modalities],
         "modalities": [  # the present ones, in config order
            {"name", "kind", "length": L, "beta": β, "share": (1+β)/(K+1),
             "elements": [{"position", "id" (tokens, categorical), "label", "alpha": α, "importance"}]}]}

    ``tokenizer`` decodes the ids of every ``tokens`` modality (a Hugging Face tokenizer, or any
    object with ``convert_ids_to_tokens``, or a callable list[int] -> list[str]); ``labels`` names
    the ids of given modalities (``{"category": names}``: a sequence indexed by id, a mapping or a
    callable). Undecoded ids are labelled by their number, dense elements (image patches) by their
    position. Every number is a Python float/int taken from the output tensors, so the records
    survive ``json.dumps``/``json.loads`` exactly.
    """
    layout = out.layout
    if layout.batch_size != batch.batch_size or layout.num_elements != batch.num_elements:
        raise ValueError(f"the output is of a batch of {layout.batch_size} samples and {layout.num_elements} "
                         f"elements; this batch has {batch.batch_size} and {batch.num_elements}")
    config = batch.config
    labels = dict(labels or {})
    unknown = set(labels) - {m.name for m in config.modalities}
    if unknown:
        raise ValueError(f"labels for unknown modality {sorted(unknown)[0]!r}; "
                         f"the config has {[m.name for m in config.modalities]}")
    B = batch.batch_size
    chosen = range(B) if samples is None else [int(b) for b in samples]
    for b in chosen:
        if not 0 <= b < B:
            raise ValueError(f"sample {b} is out of range for a batch of {B}")

    plan = layout.host
    alpha = out.intra_weights.detach().float().cpu().tolist()
    importance = out.element_importance().detach().float().cpu().tolist()
    beta = out.inter_weights.detach().float().cpu().tolist()
    logits = out.logits.detach().float().cpu().tolist()
    cu_seg = plan.cu_seqlens_segment.tolist()
    cu_per_sample = plan.cu_segments_per_sample.tolist()
    seg_modality = plan.segment_modality.tolist()
    lengths = plan.lengths  # [B, M]

    # Per modality: the first value of each sample in its packed ``values`` (ids are read from there).
    starts, ids = [], []
    for m, modality in enumerate(config.modalities):
        lm = lengths[:, m]
        starts.append([0] + lm.cumsum().tolist())
        ids.append(batch.values[modality.name].detach().cpu().tolist() if modality.kind != "dense" else None)

    decoders = [_decoder(modality, labels.get(modality.name, tokenizer if modality.kind == "tokens" else None))
                for modality in config.modalities]

    records = []
    for b in chosen:
        first, last = cu_per_sample[b], cu_per_sample[b + 1]
        K = last - first
        modalities = []
        for s in range(first, last):
            m = seg_modality[s]
            modality = config.modalities[m]
            row0, row1 = cu_seg[s], cu_seg[s + 1]
            L = row1 - row0
            values = ids[m][starts[m][b]: starts[m][b] + L] if ids[m] is not None else None
            names = decoders[m](values, L)
            elements = []
            for p in range(L):
                element = {"position": p}
                if values is not None:
                    element["id"] = int(values[p])
                element.update(label=names[p], alpha=alpha[row0 + p], importance=importance[row0 + p])
                elements.append(element)
            modalities.append({"name": modality.name, "kind": modality.kind, "length": L, "beta": beta[s],
                               "share": (1 + beta[s]) / (K + 1), "elements": elements})
        records.append({"sample": b, "logits": logits[b], "empty": K == 0,
                        "missing": [m.name for i, m in enumerate(config.modalities) if lengths[b, i] == 0],
                        "modalities": modalities})
    return records


def top_elements(record: dict, k: int = 3) -> list[dict]:
    """The ``k`` elements of a sample record with the largest importance, each with its modality's
    name added (``{"modality", "position", "label", "alpha", "importance", ...}``), largest first;
    ties keep packed order."""
    flat = [{"modality": mod["name"], **element} for mod in record["modalities"] for element in mod["elements"]]
    return sorted(flat, key=lambda e: -e["importance"])[:k]


def top_modality(record: dict) -> str | None:
    """The name of the sample's modality with the largest β (None for an empty sample)."""
    if not record["modalities"]:
        return None
    return max(record["modalities"], key=lambda mod: mod["beta"])["name"]


def heat(alpha: float, length: int) -> float:
    """How concentrated an element's α is, in [0, 1], for the reports' colours: ``ln(α·L) / ln(L)``,
    0 where α is uniform (1/L) or less, 1 where all of the modality's attention is on the element
    (a single element has nothing to choose from: 0)."""
    if length <= 1 or alpha * length <= 1:
        return 0.0
    return min(1.0, math.log(alpha * length) / math.log(length))


def document(records: list[dict], title: str = "DM²S² explanations", notes: Sequence[str] = ()) -> dict:
    """The JSON document the reports embed: ``{"schema", "title", "notes", "samples": records}``."""
    return {"schema": SCHEMA, "title": title, "notes": list(notes), "samples": records}


def render_html(records: list[dict], path=None, *, title: str = "DM²S² explanations",
                notes: Sequence[str] = ()) -> str:
    """The records as one self-contained HTML page (returned, and written to ``path`` if given)."""
    from .html import render

    return render(document(records, title, notes), path)


def render_png(records: list[dict], path, *, title: str = "DM²S² explanations", notes: Sequence[str] = (),
               dpi: int = 110) -> None:
    """The records drawn with matplotlib into a PNG at ``path`` (``pip install 'dm2s2_fast[explain]'``)."""
    from .png import render

    render(document(records, title, notes), path, dpi=dpi)


def load_tokenizer(path):
    """The Hugging Face tokenizer saved in a checkpoint directory, loaded offline (needs transformers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"decoding tokens needs transformers ({exc}); pip install transformers") from exc
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _decoder(modality, source: Labeler) -> Callable[[list[int] | None, int], list[str]]:
    """A function (ids or None, length) -> one label per element."""
    if modality.kind == "dense":
        if source is None:
            return lambda _values, L: [str(p) for p in range(L)]
        if callable(source):
            return lambda _values, L: [str(source(p)) for p in range(L)]
        return lambda _values, L: [str(source[p]) for p in range(L)]
    if source is None:
        return lambda values, L: [str(v) for v in values]
    convert = getattr(source, "convert_ids_to_tokens", None)
    if convert is not None:
        return lambda values, L: [str(t) for t in convert(list(values))]
    if callable(source):
        def call(values, L):
            names = source(list(values))
            if isinstance(names, str) or len(names) != L:
                raise ValueError(f"modality {modality.name!r}: the labeler returned {names!r} for {L} ids")
            return [str(t) for t in names]
        return call
    if isinstance(source, (Mapping, Sequence)):
        def look_up(values, L):
            out = []
            for v in values:
                try:
                    out.append(str(source[v]))
                except (KeyError, IndexError):
                    out.append(str(v))
            return out
        return look_up
    raise TypeError(f"modality {modality.name!r}: labels must be a tokenizer, a callable, a sequence or a "
                    f"mapping, got {type(source).__name__}")


__all__ = ["SCHEMA", "document", "explain", "heat", "load_tokenizer", "render_html", "render_png", "top_elements",
           "top_modality"]
