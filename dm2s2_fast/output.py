"""DM2S2Output: what every backend returns (docs/model.md#outputs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import PackedLayout


@dataclass
class DM2S2Output:
    """Scores, embeddings and the interpretable weights of one batch.

    ``hidden`` [N, d], ``intra_weights`` α [N] are packed sample-major (modalities in config order);
    ``segment_pooled`` z and ``inter_weights`` β [S] are per present (sample, modality) segment;
    ``layout`` maps both back: ``element_sample/modality/position``, ``segment_sample/modality``.
    """

    logits: torch.Tensor  # [B, num_outputs]
    pooled: torch.Tensor  # r [B, d]
    hidden: torch.Tensor  # [N, d]
    intra_weights: torch.Tensor  # α [N]
    inter_weights: torch.Tensor  # β [S]
    segment_pooled: torch.Tensor  # z [S, d]
    layout: PackedLayout

    @property
    def element_sample(self) -> torch.Tensor:
        return self.layout.element_sample

    @property
    def element_modality(self) -> torch.Tensor:
        return self.layout.element_modality

    @property
    def element_position(self) -> torch.Tensor:
        return self.layout.element_position

    @property
    def segment_sample(self) -> torch.Tensor:
        return self.layout.segment_sample

    @property
    def segment_modality(self) -> torch.Tensor:
        return self.layout.segment_modality

    @property
    def empty_samples(self) -> torch.Tensor:
        """[B] bool: samples with no element; their pooled r is 0 and their logits the head's bias path."""
        return self.layout.empty_samples

    def explain(self, batch, tokenizer=None, **options) -> list[dict]:
        """One JSON-ready record per sample: β per present modality, each element's α and importance,
        ids decoded by ``tokenizer`` (``dm2s2_fast.explain.explain``; docs/explain.md)."""
        from .explain import explain

        return explain(self, batch, tokenizer, **options)

    def element_importance(self) -> torch.Tensor:
        """[N]: ``(1+α_i)/(L+1) · (1+β_m)/(K_b+1)``, the element's share of r; sums to 1 per sample."""
        layout = self.layout
        seg_len = (layout.cu_seqlens_segment[1:] - layout.cu_seqlens_segment[:-1]).to(self.intra_weights)
        per_sample = (layout.cu_segments_per_sample[1:] - layout.cu_segments_per_sample[:-1]).to(self.inter_weights)
        segment_share = (1 + self.inter_weights) / (per_sample[layout.segment_sample] + 1)
        element_segment = torch.repeat_interleave(
            torch.arange(layout.num_segments, device=seg_len.device), seg_len.long(),
            output_size=layout.num_elements)
        element_share = (1 + self.intra_weights) / (seg_len[element_segment] + 1)
        return element_share * segment_share[element_segment]


# ---- pytree node (torch.export, torch.compile, torch.utils._pytree) --------------------------------
# Every field is a child (the layout a PackedLayout node); no context.
_FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled", "layout")


def _flatten_output(out: DM2S2Output):
    return [getattr(out, name) for name in _FIELDS], None


def _flatten_output_with_keys(out: DM2S2Output):
    from torch.utils._pytree import GetAttrKey

    return [(GetAttrKey(name), getattr(out, name)) for name in _FIELDS], None


def _unflatten_output(children, context) -> DM2S2Output:
    return DM2S2Output(**dict(zip(_FIELDS, children)))


def _register_pytree() -> None:
    from torch.utils import _pytree

    if DM2S2Output in _pytree.SUPPORTED_NODES:
        return
    _pytree.register_pytree_node(
        DM2S2Output, _flatten_output, _unflatten_output, serialized_type_name="dm2s2_fast.DM2S2Output",
        flatten_with_keys_fn=_flatten_output_with_keys)


_register_pytree()
