"""The whole FastDM2S2 on every backend available here vs the fp64 reference (docs/numerics.md).

CPU: torch, cpp (fp32, and the half types its kernels declare), and triton under TRITON_INTERPRET=1
(fp32: tests/ops/ check the interpreter's half paths op by op). CUDA (when present): torch, triton,
cuda in fp32, fp16 and bf16 — the half types within 2× the reference model's own error in that
dtype, ≤ 2e-2 (tests/ops/harness.py ``tolerance``).
"""
from __future__ import annotations

import copy

import pytest
import torch

import harness
from dm2s2_fast import convert
from helpers import fp64_reference, random_batch, random_model, rel_err, require_backend, small_config

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")


def cases():
    for backend, device, dtype in harness.combos():
        if backend == "triton" and device == "cpu" and dtype != torch.float32:
            continue  # minutes in the interpreter; tests/ops/ check its half paths op by op
        marks = [pytest.mark.cuda] if device == "cuda" else []
        yield pytest.param(device, backend, dtype, marks=marks, id=f"{device}-{backend}-{harness.dtype_name(dtype)}")


@pytest.mark.parametrize("device,backend,dtype", list(cases()))
@pytest.mark.parametrize("attention", ["set", "modality"])
def test_engine_backend_matches_reference(device, backend, dtype, attention):
    require_backend(backend, device, "set_attention")
    config = small_config(attention)
    model = random_model(config, 21)
    batch = random_batch(config, 6, 21, max_len=24)
    oracle = fp64_reference(model, batch)
    moved = copy.deepcopy(model).to(device=device, dtype=dtype)
    engine = convert(moved, backend)
    out = engine(batch.to(device))
    assert set(engine.last_backends.values()) == {backend}, engine.last_backends
    if dtype == torch.float32:
        own = None
    else:
        with torch.no_grad():
            own = moved(batch.to(device))  # the reference model itself in this dtype
    for field in FIELDS:
        e_ref = rel_err(getattr(own, field).float().cpu(), getattr(oracle, field)) if own is not None else 0.0
        bound = harness.tolerance(dtype, e_ref)
        err = rel_err(getattr(out, field).float().cpu(), getattr(oracle, field))
        assert err <= bound, f"{backend}/{dtype} {field}: {err:.2e} > {bound:.1e}"
