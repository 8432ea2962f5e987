"""Shared test fixtures for every folder of ``tests/`` (which mirrors the package: ops/, backends/,
model/, data/, graphs/).

The helpers (small configs, random ragged batches, the fp64 oracle, the parity metric, the skips)
live in ``tests/helpers.py`` and are re-exported here, so both ``from helpers import ...`` and
``from conftest import ...`` work from any sub-folder. This module puts ``tests/``, ``tests/ops/``
(the op parity harness, ``harness.py``, and the ops' sample inputs that tests/backends/ reuse) and
``tests/backends/`` (``sm90_build.py``) on ``sys.path``, whatever pytest's import mode.

Autouse fixtures:
- ``poison_uninitialized_memory``: without a GPU, uninitialized tensors are NaN while a test runs;
- ``triton_fast_launch``: with ``DM2S2_TEST_TRITON_FAST_LAUNCH=1`` (bench/gpu_check.sh's fast-launch
  stage), every test runs under ``Tuning(triton_fast_launch=True)``; engines built with
  ``tuning=None`` and the ops pick it up.
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE / "backends", _HERE / "ops", _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pytest  # noqa: E402
import torch  # noqa: E402

# helpers sets TRITON_INTERPRET=1 where there is no GPU before anything imports triton.
from helpers import *  # noqa: E402,F401,F403 - re-exported: ``from conftest import small_config`` etc.
from helpers import env_flag  # noqa: E402

FAST_LAUNCH_ENV = "DM2S2_TEST_TRITON_FAST_LAUNCH"


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """While a test runs, every new tensor that torch leaves uninitialized — ``torch.empty`` in the
    Triton launchers, ``at::empty`` in the C++ ops — is filled with NaN (integers with their
    largest value): an output element a kernel never writes fails the parity checks (which reject
    NaN) instead of passing with whatever the allocator handed back. (torch's deterministic mode;
    ``warn_only`` so that a nondeterministic op only warns.)

    Only where there is no GPU: on CUDA, deterministic mode swaps in other kernels for some torch
    ops (index_put_, scatter), which could break graph capture and the no-sync test; there the op
    parity harness poisons the caching allocator explicitly (tests/ops/harness.py ``poison``)."""
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


@pytest.fixture(autouse=True)
def triton_fast_launch():
    """``DM2S2_TEST_TRITON_FAST_LAUNCH=1``: the test runs under ``Tuning(triton_fast_launch=True)``,
    so every compiled Triton launch goes through ``FastLaunch``'s cache (tests that force a tuning
    use ``helpers.tuned``, which keeps it)."""
    if not env_flag(FAST_LAUNCH_ENV):
        yield
        return
    import dm2s2_fast

    with dm2s2_fast.Tuning(triton_fast_launch=True).active():
        yield


@pytest.fixture(params=["set", "modality"])
def attention(request):
    return request.param
