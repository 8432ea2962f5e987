"""Shared test fixtures: small configs, random ragged batches, the fp64 oracle, the parity metric."""
from __future__ import annotations

import copy
import os

import pytest
import torch

# Without a GPU, Triton kernels run only in its interpreter; set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dm2s2_fast import DM2S2Config, Modality, SequenceSet
from dm2s2_fast.reference import DM2S2

@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """While a test runs, every new tensor that torch leaves uninitialized — ``torch.empty`` in the
    Triton launchers, ``at::empty`` in the C++ ops — is filled with NaN (integers with their
    largest value): an output element a kernel never writes fails the parity checks (which reject
    NaN) instead of passing with whatever the allocator handed back. (torch's deterministic mode;
    ``warn_only`` so that a nondeterministic op only warns.)

    Only where there is no GPU: on CUDA, deterministic mode swaps in other kernels for some torch
    ops (index_put_, scatter), which could break graph capture and the no-sync test; there the CUDA
    tests poison their outputs explicitly, and the Triton kernels are the ones CI checks here."""
    if torch.cuda.is_available():
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]


def skip_unless_required(what: str, reason: str) -> None:
    """Skip a test whose optional dependency (Triton, transformers) is missing — or fail it where
    ``DM2S2_FAST_REQUIRE_TEST_EXTRAS=1`` says the test extras are installed (CI), so that a broken
    install shows as failures, not as a suite of skips."""
    if os.environ.get("DM2S2_FAST_REQUIRE_TEST_EXTRAS", "0") not in ("", "0"):
        pytest.fail(f"DM2S2_FAST_REQUIRE_TEST_EXTRAS is set but {what} is unavailable: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")


# DESIGN §5: ‖out − ref‖ / ‖ref‖ against an fp64 run of the reference.
FP32_TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "output holds NaN/inf"
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def small_config(attention: str = "set", **overrides) -> DM2S2Config:
    fields = dict(
        modalities=(Modality("title", "tokens"), Modality("tags", "categorical", num_embeddings=17),
                    Modality("image", "dense", input_dim=6), Modality("body", "tokens")),
        vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_positions=64, attention=attention, mra_hidden_size=24, head_hidden_size=16, num_outputs=2)
    fields.update(overrides)
    return DM2S2Config(**fields)


def random_model(config: DM2S2Config, seed: int = 0) -> DM2S2:
    """A reference model with weights large enough that attention and MRA weights are far from uniform."""
    torch.manual_seed(seed)
    model = DM2S2(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    return model


def random_lengths(B: int, M: int, g: torch.Generator, max_len: int = 40) -> torch.Tensor:
    """[B, M] lengths mixing missing (0), length-1, short and long-tail sequences; sample 0 is empty."""
    kind = torch.randint(0, 4, (B, M), generator=g)
    short = torch.randint(2, 8, (B, M), generator=g)
    long = torch.randint(8, max_len + 1, (B, M), generator=g)
    lengths = torch.where(kind == 0, 0, torch.where(kind == 1, 1, torch.where(kind == 2, short, long)))
    if B > 1:
        lengths[0] = 0
    return lengths


def random_batch(config: DM2S2Config, B: int, seed: int = 0, max_len: int = 40,
                 lengths: torch.Tensor | None = None) -> SequenceSet:
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = random_lengths(B, config.num_modalities, g, max_len)
    jagged = {}
    for m, modality in enumerate(config.modalities):
        lm = lengths[:, m]
        total = int(lm.sum())
        if modality.kind == "dense":
            values = torch.randn(total, modality.input_dim, generator=g)
        else:
            high = config.vocab_size if modality.kind == "tokens" else modality.num_embeddings
            values = torch.randint(0, high, (total,), generator=g)
        jagged[modality.name] = (values, lm)
    return SequenceSet.from_jagged(config, jagged)


def fp64_reference(model: DM2S2, batch: SequenceSet):
    """The oracle: the reference model run in float64 on the same batch."""
    oracle = copy.deepcopy(model).double()
    with torch.no_grad():
        return oracle(batch)


@pytest.fixture(params=["set", "modality"])
def attention(request):
    return request.param
