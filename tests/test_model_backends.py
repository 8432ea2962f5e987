"""The whole FastDM2S2 on every backend available here vs the fp64 reference (DESIGN §5).

CPU: torch, cpp, and triton under TRITON_INTERPRET=1. CUDA (when present): torch, triton, cuda in
fp32, fp16 and bf16 — the half types within 2× the reference's own error in that dtype, ≤ 2e-2.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dm2s2_fast import backends, convert

from conftest import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, small_config

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases():
    for device in ("cpu", "cuda"):
        for backend in ("torch", "cpp", "triton", "cuda"):
            if (device, backend) in (("cpu", "cuda"), ("cuda", "cpp")):
                continue  # never possible: cuda kernels need a GPU, cpp ones a CPU
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                if device == "cpu" and dtype != torch.float32:
                    continue  # DESIGN §5: fp32 everywhere on CPU
                marks = [pytest.mark.cuda] if device == "cuda" else []
                yield pytest.param(device, backend, dtype, marks=marks,
                                   id=f"{device}-{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("device,backend,dtype", list(cases()))
@pytest.mark.parametrize("attention", ["set", "modality"])
def test_engine_backend_matches_reference(device, backend, dtype, attention):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = backends.why_not(backend, "set_attention", device)
    if reason:
        pytest.skip(f"{backend} unavailable on {device}: {reason}")
    config = small_config(attention)
    model = random_model(config, 21)
    batch = random_batch(config, 6, 21, max_len=24)
    oracle = fp64_reference(model, batch)
    moved = copy.deepcopy(model).to(device=device, dtype=dtype)
    engine = convert(moved, backend)
    out = engine(batch.to(device))
    assert set(engine.last_backends.values()) == {backend}, engine.last_backends
    if dtype == torch.float32:
        bounds = {f: FP32_TOL for f in FIELDS}
    else:
        with torch.no_grad():
            own = moved(batch.to(device))  # the reference itself in this dtype
        bounds = {f: min(2e-2, max(2 * rel_err(getattr(own, f).float().cpu(), getattr(oracle, f)), FP32_TOL))
                  for f in FIELDS}
    for field in FIELDS:
        err = rel_err(getattr(out, field).float().cpu(), getattr(oracle, field))
        assert err <= bounds[field], f"{backend}/{dtype} {field}: {err:.2e} > {bounds[field]:.1e}"
