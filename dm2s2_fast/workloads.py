"""The workloads (docs/workloads.md), seeded so that tests, the demo and the benchmarks see the same
batches."""
from __future__ import annotations

import torch

from .config import DM2S2Config
from .data import SequenceSet

ADS_BATCH_SIZES = (1, 16, 64, 256)


def ads_batch(batch_size: int, config: DM2S2Config | None = None, seed: int = 0) -> SequenceSet:
    """B ads: title 6–24 tokens, description 8–118 (long-tailed), image 49 patches of 512 features
    (missing for 15%), category 4–12 ids. ``config`` defaults to ``DM2S2Config.default_ads()``."""
    config = config or DM2S2Config.default_ads()
    names = {m.name: m for m in config.modalities}
    for name in ("title", "description", "image", "category"):
        if name not in names:
            raise ValueError(f"the ads workload needs a {name!r} modality")
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    title = torch.randint(6, 25, (B,), generator=g)
    # Long tail: most descriptions are short, a few run to the cap.
    description = (8 - 30.0 * torch.rand(B, generator=g).log()).long().clamp(8, 118)  # exponential, mean 38
    description = torch.where(torch.rand(B, generator=g) < 0.08,
                              torch.randint(90, 119, (B,), generator=g), description)
    image = torch.where(torch.rand(B, generator=g) < 0.15, 0, 49)
    category = torch.randint(4, 13, (B,), generator=g)
    vocab = config.vocab_size
    jagged = {
        "title": (torch.randint(1, vocab, (int(title.sum()),), generator=g), title),
        "description": (torch.randint(1, vocab, (int(description.sum()),), generator=g), description),
        "image": (torch.randn(int(image.sum()), names["image"].input_dim, generator=g), image),
        "category": (torch.randint(0, names["category"].num_embeddings, (int(category.sum()),),
                                   generator=g), category),
    }
    return SequenceSet.from_jagged(config, jagged)


def padded_tokens(batch: SequenceSet) -> int:
    """Tokens a padded encoder processes: B × the longest sample."""
    return batch.batch_size * batch.layout.max_seqlen_set
