"""DM2S2Config and Modality: a bad config raises ValueError naming the field, before any model is built."""
from __future__ import annotations

import pytest

from dm2s2_fast import DM2S2Config, Modality

TITLE = (Modality("title", "tokens"),)


@pytest.mark.parametrize("make,message", [
    (lambda: Modality("", "tokens"), "non-empty string"),
    (lambda: Modality("x", "audio"), "kind must be one of"),
    (lambda: Modality("x", "dense"), "input_dim > 0"),
    (lambda: Modality("x", "dense", input_dim=0), "input_dim > 0"),
    (lambda: Modality("x", "categorical", num_embeddings=0), "num_embeddings > 0"),
    (lambda: DM2S2Config(modalities=()), "at least one modality"),
    (lambda: DM2S2Config(modalities=TITLE * 2), "names must be unique"),
    (lambda: DM2S2Config(modalities=TITLE, attention="cross"), "attention must be"),
    (lambda: DM2S2Config(modalities=TITLE, num_heads=5), "not a multiple of num_heads"),
    (lambda: DM2S2Config(modalities=TITLE, vocab_size=0), "vocab_size must be an integer >= 1"),
    (lambda: DM2S2Config(modalities=TITLE, num_layers=-1), "num_layers must be an integer >= 0"),
    (lambda: DM2S2Config(modalities=TITLE, max_positions=2.5), "max_positions must be an integer"),
    (lambda: DM2S2Config(modalities=TITLE, mra_hidden_size=0), "mra_hidden_size must be None"),
    (lambda: DM2S2Config(modalities=TITLE, head_hidden_size=-3), "head_hidden_size must be None"),
    # eps 0 makes LayerNorm of a constant row 0/0 (the CUDA-graph buckets pad with zero rows).
    (lambda: DM2S2Config(modalities=TITLE, layer_norm_eps=0.0), "layer_norm_eps must be a positive"),
    (lambda: DM2S2Config(modalities=TITLE, embedding_layer_norm_eps=float("nan")),
     "embedding_layer_norm_eps must be a positive"),
    (lambda: DM2S2Config(modalities=TITLE, layer_norm_eps=float("inf")), "layer_norm_eps must be a positive"),
])
def test_bad_config_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_defaults_and_optional_widths():
    config = DM2S2Config(modalities=TITLE, mra_hidden_size=None, head_hidden_size=7, num_layers=0)
    assert config.mra_dim == config.hidden_size and config.classifier_dim == 7
    assert DM2S2Config.default_ads().head_dim == 32
