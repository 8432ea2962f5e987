"""Shared test helpers: small configs, random ragged batches, the fp64 oracle, the parity metric, and
the skips (each one routed through a ``DM2S2_FAST_REQUIRE_*`` switch).

Test modules import these from here (``from helpers import ...``); ``tests/conftest.py`` re-exports
them, so ``from conftest import ...`` works too. ``tests/`` and ``tests/ops/`` are on ``sys.path``
(``tests/conftest.py`` puts them there), whatever folder a test module sits in.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run only in its interpreter; set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dm2s2_fast import DM2S2Config, Modality, SequenceSet, tuning  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# docs/numerics.md: ‖out − ref‖ / ‖ref‖ against an fp64 run of the reference.
FP32_TOL = 1e-5

REQUIRE_EXTRAS = "DM2S2_FAST_REQUIRE_TEST_EXTRAS"  # Triton, transformers, Triton's sm_90 compiler
REQUIRE_EXTENSION = "DM2S2_FAST_REQUIRE_EXTENSION"  # the compiled library (cpp, and cuda's kernels)
REQUIRE_CUDA = "DM2S2_FAST_REQUIRE_CUDA"  # a CUDA device (the GPU machine's check)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def skip_unless_required(what: str, reason: str, *flags: str) -> None:
    """Skip a test whose optional dependency is missing — or fail it where one of ``flags`` (default:
    ``DM2S2_FAST_REQUIRE_TEST_EXTRAS``; the compiled extension: ``DM2S2_FAST_REQUIRE_EXTENSION``) says
    it is installed (CI), so that a broken install shows as failures, not as a suite of skips. Also
    callable at a module's top level (it then skips or fails the whole module)."""
    for flag in flags or (REQUIRE_EXTRAS,):
        if env_flag(flag):
            pytest.fail(f"{flag} is set but {what} is unavailable: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}", allow_module_level=True)


def skip_unless_cuda() -> None:
    """The one plain skip: no CUDA device here (a failure where ``DM2S2_FAST_REQUIRE_CUDA=1``)."""
    if torch.cuda.is_available():
        return
    if env_flag(REQUIRE_CUDA):
        pytest.fail(f"{REQUIRE_CUDA} is set but there is no CUDA device", pytrace=False)
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)


def require_extension() -> None:
    """The compiled library (``torch.ops.dm2s2_fast``) is loaded, or the test skips (fails under
    ``DM2S2_FAST_REQUIRE_EXTENSION=1``)."""
    from dm2s2_fast import _extension

    reason = _extension.load()
    if reason is not None:
        skip_unless_required("the compiled extension", reason, REQUIRE_EXTENSION)


def require_backend(backend: str, device: str, op: str = "add_layernorm") -> None:
    """``backend`` can run ``op`` on ``device`` here, or the test skips through the switch that
    covers why not: no CUDA device, the compiled extension (cpp; cuda's kernels), Triton."""
    from dm2s2_fast import dispatch

    if device == "cuda":
        skip_unless_cuda()
    found = dispatch.reasons(backend, op, device)
    if not found:
        return
    reason = "; ".join(found)
    if backend == "triton":
        skip_unless_required("the triton backend", reason)
    elif backend == "cpp":
        skip_unless_required("the cpp backend", reason, REQUIRE_EXTENSION)
    elif backend == "cuda":
        skip_unless_required("the cuda backend", reason, REQUIRE_EXTENSION, REQUIRE_CUDA)
    else:
        pytest.fail(f"backend {backend!r} cannot run {op} on {device}: {reason}")


def tuned(**changes):
    """``with tuned(cpu_isa="avx2"): ...``: the current tuning with ``changes``, current for the block
    (so that what a test forces composes with the fast-launch stage's tuning, tests/conftest.py)."""
    return tuning.current().patch(**changes)


def run_python(code: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """``python -c code`` in the repository root with ``tests/`` and ``tests/backends/`` importable."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(TESTS), str(TESTS / "backends"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=str(ROOT), timeout=timeout)


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
