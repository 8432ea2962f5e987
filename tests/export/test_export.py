"""``dm2s2_fast.export``: torch.export with dynamic ragged shapes (docs/export.md).

One program per backend (module-scoped: a trace costs seconds), traced on a 3-sample example, then
run on batches it did not see — other B and N, an empty sample, modalities missing from whole
batches, B=1, groups longer than the example's — against the eager engine.
"""
from __future__ import annotations

import pytest
import torch

import dm2s2_fast as dm
from conftest import FP32_TOL, random_batch, random_model, rel_err, require_backend, small_config
from dm2s2_fast.export import OUTPUTS, ExportedEngine, input_names, packed_inputs, program_ranges

# (B, seed, lengths): lengths None = random_lengths (sample 0 empty, missing and length-1 sequences)
BATCHES = {
    "B=1": (1, 11, None),
    "B=2": (2, 12, None),
    "B=9": (9, 13, None),
    "B=33": (33, 14, None),
    "missing-modalities": (3, 15, torch.tensor([[3, 0, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]])),
    "one-row": (1, 16, torch.tensor([[0, 0, 1, 0]])),
    "long-groups": (4, 17, torch.tensor([[60, 50, 40, 64], [1, 0, 0, 0], [0, 0, 0, 0], [64, 64, 64, 64]])),
}


def _check(out, ref, tol=FP32_TOL):
    for name in OUTPUTS:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.fixture(scope="module", params=["cpp", "torch"])
def exported(request):
    backend = request.param
    if backend == "cpp":
        require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), backend)
    program = dm.export(engine, random_batch(config, 3, seed=1))
    return engine, program


def test_custom_ops_in_the_graph(exported):
    engine, program = exported
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    ours = {t for t in targets if t.startswith("dm2s2_fast.")}
    if engine.backend == "cpp":
        assert {"dm2s2_fast.set_attention.default", "dm2s2_fast.linear.default", "dm2s2_fast.mra_pool.default",
                "dm2s2_fast.embed_layernorm.default", "dm2s2_fast.linear_add_layernorm.default",
                "dm2s2_fast.linear_bias_gelu.default"} <= ours
        assert not any(t.startswith("mkl.") for t in targets)  # the eager small-GEMM path stays out
    else:
        assert not ours  # plain ATen
    assert len(program.graph_signature.user_inputs) == len(input_names(engine.config))


def test_ranges_are_the_declared_ones(exported):
    engine, program = exported
    config = engine.config
    ranges = program_ranges(program, config)
    rows = 1024 * config.num_modalities * config.max_positions
    assert ranges["batch_size"] == (1, 1024)
    assert ranges["segments"] == (0, 1024 * config.num_modalities)
    assert ranges["max_seqlen"] == (0, config.num_modalities * config.max_positions)
    assert all(ranges[f"rows[{m.name}]"] == (0, rows) for m in config.modalities)


@pytest.mark.parametrize("case", list(BATCHES))
def test_matches_the_eager_engine(exported, case):
    engine, program = exported
    B, seed, lengths = BATCHES[case]
    batch = random_batch(engine.config, B, seed=seed, lengths=lengths)
    run = ExportedEngine.from_program(program, engine.config)
    _check(run(batch), engine(batch))


def test_dense_features_are_cast_as_the_engine_casts_them(exported):
    engine, program = exported
    batch = random_batch(engine.config, 5, seed=23)
    values = dict(batch.values)
    values["image"] = values["image"].double()
    wide = dm.SequenceSet(engine.config, values, batch.lengths)
    _check(ExportedEngine.from_program(program, engine.config)(wide), engine(wide))


def test_the_program_module_runs_on_packed_inputs(exported):
    engine, program = exported
    batch = random_batch(engine.config, 6, seed=21)
    with torch.no_grad():
        outputs = program.module()(*packed_inputs(batch))
    ref = engine(batch)
    for name, got in zip(OUTPUTS, outputs):
        assert rel_err(got, getattr(ref, name)) <= FP32_TOL, name


def test_save_and_load(exported, tmp_path):
    engine, program = exported
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    batch = random_batch(engine.config, 5, seed=22)
    _check(ExportedEngine.from_program(loaded, engine.config)(batch), engine(batch))


def test_modality_attention_and_an_example_export_cannot_trace_on():
    """``attention="modality"`` (the longest group is a segment) and a B=1 example: the trace runs on
    a batch of sizes >= 2 of the example's device and dtypes instead."""
    require_backend("cpp", "cpu")
    config = small_config(attention="modality")
    engine = dm.convert(random_model(config, seed=3), "cpp")
    program = dm.export(engine, random_batch(config, 1, seed=2), max_batch_size=64, max_rows=512)
    run = ExportedEngine.from_program(program, config)
    assert run.ranges["max_seqlen"] == (0, config.max_positions)
    for B, seed, lengths in (BATCHES["B=9"], BATCHES["missing-modalities"], BATCHES["long-groups"], (1, 5, None)):
        batch = random_batch(config, B, seed=seed, lengths=lengths)
        _check(run(batch), engine(batch))


def test_a_batch_past_the_ranges_is_refused():
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    program = dm.export(engine, max_batch_size=8, max_rows=100)
    run = ExportedEngine.from_program(program, config)
    assert run.ranges["batch_size"] == (1, 8) and run.ranges["rows[title]"] == (0, 100)
    _check(run(random_batch(config, 8, seed=31)), engine(random_batch(config, 8, seed=31)))
    with pytest.raises(ValueError, match=r"batch_size 9 is outside the range the program was exported for, \[1, 8\]"):
        run(random_batch(config, 9, seed=32))
    lengths = torch.tensor([[60, 0, 0, 0], [50, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"rows\[title\] 110 is outside .* \[0, 100\]"):
        run(random_batch(config, 2, seed=33, lengths=lengths))
    empty = random_batch(config, 0, seed=34, lengths=torch.zeros(0, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"batch_size 0 is outside .* \[1, 8\]"):
        run(empty)


def test_wrong_inputs_are_refused():
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    with pytest.raises(ValueError, match="max_batch_size"):
        dm.export(engine, max_batch_size=1)
    with pytest.raises(ValueError, match="max_rows"):
        dm.export(engine, max_rows=2**31)
    with pytest.raises(TypeError, match="FastDM2S2"):
        dm.export(engine.model)
    with pytest.raises(ValueError, match="other modalities"):
        dm.export(engine, random_batch(small_config(modalities=config.modalities[:2]), 3))
