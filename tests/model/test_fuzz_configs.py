"""The whole engine on random model configs and batches, every backend vs the fp64 reference.

The other tests fix a few configs; here a seeded generator draws the config space: head dims
8-64 (24 and 48 included), 1-4 heads, 1-5 modalities of every kind (dense widths from 1,
categorical tables from 1 entry), MRA and head widths from 1, 1-3 outputs, one or two layers, set
or modality attention, and ragged batches of 1-16 samples (empty samples, missing modalities,
length-1 segments). fp32 only (docs/numerics.md; the GPU runs them in fp32 too). On CPU the same
draws also go through the padded forward a CUDA graph replays.

Bound per output: ``max(1e-5, 2 × the error of the reference itself run in fp32)``, and for the
logits also ``64 · κ · 2⁻²⁴``. The fp32 bound is 1e-5 (docs/numerics.md); these random models are sharp
(weights of std 0.3, as ``random_model`` makes them, so attention and MRA weights are far from
uniform), and on some draws the fp32 reference itself misses 1e-5. There a backend is held to the
accuracy fp32 arithmetic allows on that draw, the rule docs/numerics.md sets for fp16/bf16. The logits of
a small batch are a few numbers that the classifier head can get by cancellation (case 7: a logit
of -0.058 from terms ~100× larger); κ, the head's condition number (‖|W₂| |gelu(W₁ r + b₁)| + |b₂|‖
over ‖logits‖, in fp64), scales fp32's unit roundoff to the rounding floor of that head. Kernel bugs
(a wrong mask, offset or index) give errors of 1e-2 and more, far above every bound here.
"""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
import torch.nn.functional as F

import harness
from dm2s2_fast import DM2S2Config, Modality, convert
from dm2s2_fast.graphs import run_padded
from helpers import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, require_backend

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
CASES = 60  # configs drawn; the slow paths (Triton's interpreter, the GPU) take the first few
FEW = 12


@functools.lru_cache(maxsize=None)
def draw(case: int):
    """Config, reference model, batch and the fp64 / fp32 reference outputs of case ``case``."""
    rng = random.Random(case)
    head_dim, heads = rng.choice([8, 16, 24, 32, 48, 64]), rng.choice([1, 2, 3, 4])
    d = head_dim * heads
    modalities = []
    for i in range(rng.randint(1, 5)):
        kind = rng.choice(["tokens", "categorical", "dense"])
        if kind == "tokens":
            modalities.append(Modality(f"m{i}", "tokens"))
        elif kind == "categorical":
            modalities.append(Modality(f"m{i}", "categorical", num_embeddings=rng.randint(1, 30)))
        else:
            modalities.append(Modality(f"m{i}", "dense", input_dim=rng.randint(1, 20)))
    config = DM2S2Config(
        modalities=tuple(modalities), vocab_size=rng.randint(2, 200), hidden_size=d,
        num_layers=rng.randint(1, 2), num_heads=heads, intermediate_size=rng.choice([8, 40, 4 * d]),
        max_positions=rng.choice([8, 64, 128]), attention=rng.choice(["set", "modality"]),
        mra_hidden_size=rng.choice([None, 1, 7, 24]), head_hidden_size=rng.choice([None, 1, 5]),
        num_outputs=rng.randint(1, 3))
    B = rng.choice([1, 2, 3, 5, 9, 16])
    seed = rng.randint(0, 10**6)
    model = random_model(config, seed)
    batch = random_batch(config, B, seed, max_len=min(config.max_positions, rng.choice([8, 20, 60])))
    oracle = fp64_reference(model, batch)
    with torch.no_grad():
        own = model(batch)
        head = copy.deepcopy(model.head).double()
        activation = F.gelu(F.linear(oracle.pooled, head.hidden.weight, head.hidden.bias))
        magnitude = activation.abs() @ head.out.weight.abs().T + head.out.bias.abs()
        kappa = float(magnitude.norm() / oracle.logits.norm().clamp_min(1e-300))
    bounds = {f: max(FP32_TOL, 2 * rel_err(getattr(own, f), getattr(oracle, f))) for f in FIELDS}
    bounds["logits"] = max(bounds["logits"], 64 * kappa * 2.0 ** -24)
    return config, model, batch, oracle, bounds


def cases():
    for device in ("cpu", "cuda"):
        for backend in ("torch", "cpp", "triton", "cuda"):
            if device not in harness.devices_of(backend):
                continue  # never possible here (cpp on cuda, cuda on cpu, triton on cpu uninterpreted)
            slow = device == "cuda" or backend == "triton"
            marks = [pytest.mark.cuda] if device == "cuda" else []
            for case in range(FEW if slow else CASES):
                yield pytest.param(device, backend, case, marks=marks, id=f"{device}-{backend}-{case}")


@pytest.mark.parametrize("device,backend,case", list(cases()))
def test_random_config_matches_reference(device, backend, case):
    require_backend(backend, device, "set_attention")
    config, model, batch, oracle, bounds = draw(case)
    engine = convert(copy.deepcopy(model).to(device), backend)
    out = engine(batch.to(device))
    assert set(engine.last_backends.values()) == {backend}, engine.last_backends
    for field in FIELDS:
        err = rel_err(getattr(out, field).cpu(), getattr(oracle, field))
        assert err <= bounds[field], f"{field}: {err:.2e} > {bounds[field]:.1e} on {config}, B={batch.batch_size}"


def padded_cases():
    for backend in ("torch", "cpp", "triton"):
        if "cpu" not in harness.devices_of(backend):
            continue
        for case in range(FEW if backend == "triton" else CASES):
            yield pytest.param(backend, case, id=f"cpu-{backend}-{case}")


@pytest.mark.parametrize("backend,case", list(padded_cases()))
def test_random_config_padded_forward(backend, case):
    """The forward a CUDA graph replays (the batch padded into its shape bucket, dm2s2_fast.graphs),
    run eagerly on CPU, on the same draws and to the same bounds."""
    require_backend(backend, "cpu", "set_attention")
    config, model, batch, oracle, bounds = draw(case)
    out = run_padded(convert(model, backend), batch)
    for field in FIELDS:
        err = rel_err(getattr(out, field), getattr(oracle, field))
        assert err <= bounds[field], f"{field}: {err:.2e} > {bounds[field]:.1e} on {config}, B={batch.batch_size}"
