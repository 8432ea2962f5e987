"""``torch.compile(engine)`` (docs/export.md#torchcompile): one graph (``fullgraph=True``) once the
batch's layout is built outside it; the same outputs as the eager engine on ragged batches of other
sizes; a graph break, not a failure, where the layout is built inside.

The cpp backend compiles with Inductor (its graph is mostly the library's operators: seconds). The
torch backend's graph is ~40 generated C++ kernels (a minute of compiler time per graph on two
cores), so the whole model is checked with ``aot_eager`` (Dynamo's capture and AOTAutograd, what
Inductor is given), and the one kernel Inductor once failed to compile, at B=1, with Inductor.
"""
from __future__ import annotations

import pytest
import torch

import dm2s2_fast as dm
from conftest import FP32_TOL, random_batch, random_model, rel_err, require_backend, small_config
from dm2s2_fast import DM2S2Output
from dm2s2_fast.export import OUTPUTS

BATCHES = [(5, 1, None), (9, 2, None), (1, 3, None),
           (3, 4, torch.tensor([[3, 0, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]])),
           (6, 5, None)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _check(out, ref):
    assert isinstance(out, DM2S2Output)
    assert out.layout is ref.layout or torch.equal(out.layout.cu_seqlens_set, ref.layout.cu_seqlens_set)
    for name in OUTPUTS:
        assert rel_err(getattr(out, name), getattr(ref, name)) <= FP32_TOL, name


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend, compiler", [("cpp", "inductor"), ("torch", "aot_eager")])
def test_fullgraph_matches_the_eager_engine(backend, compiler):
    """Batches of other B and N, an empty sample (sample 0 of each), B=1, modalities missing from a
    whole batch."""
    if backend == "cpp":
        require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), backend)
    compiled = torch.compile(engine, fullgraph=True, backend=compiler)
    for B, seed, lengths in BATCHES:
        batch = random_batch(config, B, seed=seed, lengths=lengths)
        batch.layout  # host work, outside the graph
        _check(compiled(batch), engine(batch))
    # a static graph, then a dynamic one, then the specializations of B=1 and of a missing modality;
    # the last batch reuses the dynamic graph
    assert _graphs() <= 4
    assert engine.last_backends["set_attention"] == backend


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fullgraph_on_the_gpu_matches_the_eager_engine(backend):
    """The GPU backends' kernels are operators too (run by bench/gpu_check.sh's tests stage)."""
    require_backend(backend, "cuda", "set_attention")
    config = small_config()
    engine = dm.convert(random_model(config).cuda(), backend)
    compiled = torch.compile(engine, fullgraph=True)
    for B, seed, lengths in BATCHES:
        batch = random_batch(config, B, seed=seed, lengths=lengths).to("cuda")  # builds the layout
        _check(compiled(batch), engine(batch))
    assert engine.last_backends["set_attention"] == backend


def test_a_layout_built_inside_is_a_graph_break():
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    compiled = torch.compile(engine)
    for B, seed, lengths in BATCHES[:2]:
        batch = random_batch(config, B, seed=seed, lengths=lengths)  # no layout yet
        _check(compiled(batch), engine(batch))
        assert "layout" in batch.__dict__  # built (outside the graph) and kept
    with pytest.raises(Exception, match="layout"):
        torch.compile(engine, fullgraph=True)(random_batch(config, 4, seed=9))


def test_the_torch_pooling_compiles_at_one_group():
    """Inductor's CPU code for an ``index_add_`` into a one-row result (InterMRA at B=1) failed to
    compile (a vectorized atomic add of a scalar index); the traced torch kernel sums with
    ``scatter_reduce``, which Inductor leaves to ATen there."""
    from dm2s2_fast.export import _group_pool
    from dm2s2_fast.ops.mra import inter_mra_reference

    g = torch.Generator().manual_seed(0)
    d, a = 32, 24
    z = torch.randn(3, d, generator=g)
    cu_segments_per_sample = torch.tensor([0, 3], dtype=torch.int32)  # B = 1
    params = [torch.randn(*s, generator=g) * 0.3 for s in ((a, d), (a,), (a,))]
    torch.use_deterministic_algorithms(False)  # the test-wide deterministic mode would hide it
    got = torch.compile(_group_pool, fullgraph=True)(z, cu_segments_per_sample, *params)
    for x, y in zip(got, inter_mra_reference(z, cu_segments_per_sample, *params)):
        assert rel_err(x, y) <= FP32_TOL
