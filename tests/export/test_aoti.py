"""``dm2s2_fast.aoti_package`` / ``load_package``: an AOTInductor ``.pt2`` of the cpp engine, run on
batches of sizes its example did not have, in this process and in a fresh one (docs/export.md).

The package is compiled once for the module (small config: ~30 s on two cores, most of it the C++
compiler), with narrow ranges so that the out-of-range checks need no second compile.
"""
from __future__ import annotations

import json

import pytest
import torch

import dm2s2_fast as dm
from conftest import FP32_TOL, random_batch, random_model, rel_err, require_backend, run_python, small_config
from dm2s2_fast.export import OUTPUTS, input_names, packed_inputs

MAX_BATCH, MAX_ROWS = 64, 1024


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    path = tmp_path_factory.mktemp("aoti") / "small.pt2"
    returned = dm.aoti_package(engine, random_batch(config, 4, seed=1), path, max_batch_size=MAX_BATCH,
                               max_rows=MAX_ROWS)
    assert returned == str(path) and path.is_file()
    return engine, str(path)


@pytest.fixture(scope="module")
def loaded(package):
    engine, path = package
    return engine, dm.load_package(path)


@pytest.mark.parametrize("B, seed, lengths", [
    (1, 11, None), (2, 12, None), (17, 13, None), (64, 14, None),
    (3, 15, torch.tensor([[3, 0, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]])),  # whole modalities missing
    (1, 16, torch.tensor([[0, 0, 1, 0]])),  # one row
    (4, 17, torch.tensor([[60, 50, 40, 64], [1, 0, 0, 0], [0, 0, 0, 0], [64, 64, 64, 64]])),  # long groups
], ids=["B=1", "B=2", "B=17", "B=64", "missing-modalities", "one-row", "long-groups"])
def test_matches_the_eager_engine(loaded, B, seed, lengths):
    engine, run = loaded
    batch = random_batch(engine.config, B, seed=seed, lengths=lengths)
    out, ref = run(batch), engine(batch)
    assert out.layout is batch.layout
    for name in OUTPUTS:
        assert rel_err(getattr(out, name), getattr(ref, name)) <= FP32_TOL, name


def test_metadata_and_ranges(loaded):
    engine, run = loaded
    config = engine.config
    assert run.config == config and run.device == torch.device("cpu")
    assert run.ranges["batch_size"] == (1, MAX_BATCH)
    assert run.ranges["segments"] == (0, MAX_BATCH * config.num_modalities)
    assert run.ranges["max_seqlen"] == (0, config.num_modalities * config.max_positions)
    assert all(run.ranges[f"rows[{m.name}]"] == (0, MAX_ROWS) for m in config.modalities)
    meta = json.loads(run.program.get_metadata()["dm2s2_fast"])
    assert meta["inputs"] == input_names(config) and meta["outputs"] == list(OUTPUTS)
    assert meta["backend"] == "cpp"


def test_out_of_range_and_wrong_batches_are_refused(package, loaded):
    engine, run = loaded
    config = engine.config
    with pytest.raises(ValueError, match=r"batch_size 65 is outside the range the program was exported for, "
                                         r"\[1, 64\]"):
        run(random_batch(config, MAX_BATCH + 1, seed=21))
    lengths = torch.tensor([[64, 0, 0, 0]] * 17)
    with pytest.raises(ValueError, match=r"rows\[title\] 1088 is outside .* \[0, 1024\]"):
        run(random_batch(config, 17, seed=22, lengths=lengths))
    other = small_config(vocab_size=50)
    with pytest.raises(ValueError, match="vocab_size"):
        run(random_batch(other, 3, seed=23))
    with pytest.raises(ValueError, match="another config"):
        dm.load_package(package[1], other)


def test_a_fresh_process_needs_the_library(package, tmp_path):
    """In a new process the package's ``torch.ops.dm2s2_fast`` calls need the compiled library:
    ``aoti_load_package`` alone fails to find the ops; after ``torch.ops.load_library`` it runs;
    ``dm2s2_fast.load_package`` loads the library itself."""
    engine, path = package
    batch = random_batch(engine.config, 7, seed=31)
    inputs = tmp_path / "inputs.pt"
    torch.save(torch.utils._pytree.tree_map(torch.clone, packed_inputs(batch)), inputs)
    code = f"""
import torch
inputs = torch.load({str(inputs)!r})
try:
    torch._inductor.aoti_load_package({path!r})
except RuntimeError as exc:
    print("without the library:", "dm2s2_fast::" in str(exc))
from dm2s2_fast import _extension
torch.ops.load_library(_extension.candidates()[0])
logits = torch._inductor.aoti_load_package({path!r})(*inputs)[0]
torch.save(logits, {str(tmp_path / "raw.pt")!r})
import dm2s2_fast, sys
sys.path.insert(0, "tests")
from helpers import random_batch, small_config
out = dm2s2_fast.load_package({path!r})(random_batch(small_config(), 7, seed=31))
torch.save(out.logits, {str(tmp_path / "engine.pt")!r})
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["without", "the", "library:", "True", "ok"], result.stdout
    ref = engine(batch).logits
    for name in ("raw.pt", "engine.pt"):
        assert rel_err(torch.load(tmp_path / name), ref) <= FP32_TOL, name
