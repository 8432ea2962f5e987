"""What both server tests send and check: ragged ranking requests of the small test config, their
fp64 reference scores, and a malformed request (an id out of its table) among them."""
from __future__ import annotations

import numpy as np
import torch

from conftest import FP32_TOL, fp64_reference, random_batch, rel_err

CONCURRENCY = 16


def make_requests(model, count: int, seed: int = 100):
    """``count`` requests of 1..12 candidates (ragged sequences, missing modalities, an empty
    candidate each), with their reference scores ``[K, num_outputs]`` (fp64, each request alone).
    One request has a modality missing in every candidate (zero lengths, no values)."""
    requests = []
    for i in range(count):
        batch = random_batch(model.config, B=1 + i % 12, seed=seed + i, max_len=12)
        if i == 3:
            name = model.config.modalities[0].name
            jagged = {m.name: (batch.values[m.name], batch.lengths[m.name]) for m in model.config.modalities}
            jagged[name] = (batch.values[name][:0], torch.zeros_like(batch.lengths[name]))
            batch = type(batch).from_jagged(model.config, jagged)
        requests.append((batch, fp64_reference(model, batch).logits))
    return requests


def malformed_arrays(arrays: dict, config) -> dict:
    """``arrays`` with one categorical id beyond its table (its candidate is named in the error)."""
    bad = dict(arrays)
    modality = next(m for m in config.modalities if m.kind == "categorical")
    values = bad[modality.name + "__values"].copy()
    assert values.size, "the malformed request needs a categorical id to break"
    values.reshape(-1)[-1] = modality.num_embeddings + 5
    bad[modality.name + "__values"] = values
    return bad


def check_scores(scores, reference, what: str) -> None:
    scores = torch.as_tensor(np.array(scores))
    assert scores.shape == reference.shape, (what, scores.shape, reference.shape)
    assert scores.dtype == torch.float32, (what, scores.dtype)
    assert rel_err(scores, reference) <= FP32_TOL, (what, rel_err(scores, reference))
