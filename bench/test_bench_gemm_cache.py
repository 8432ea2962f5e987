"""The cpp GEMM provider's staleness check on a cache hit (identity, address, shape, strides, dtype,
version counter, a 256-element fingerprint): paid by every linear layer of every forward, so its cost
is reported beside the model's (docs/performance.md, "CPU bf16 and the GEMM provider")."""
from __future__ import annotations

import pytest
import torch

from dm2s2_fast import _extension


def test_packed_weight_hit(benchmark):
    reason = _extension.load()
    if reason is not None:
        pytest.skip(f"the compiled extension: {reason}")
    from dm2s2_fast.backends import cpp

    cache = cpp._gemm.cache
    weight = torch.randn(1536, 384)  # the ads FFN-down weight
    cache.get(weight, "bench", torch.clone)
    packs = cache.packs
    benchmark.group = "cpp GEMM provider"
    benchmark.extra_info["what"] = "one cache hit: the per-call staleness check of a packed weight"
    benchmark(cache.get, weight, "bench", torch.clone)
    assert cache.packs == packs  # every call was a hit: nothing repacked
