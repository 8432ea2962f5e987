"""SequenceSet, PackedLayout and DM2S2Output as pytree nodes (docs/export.md#pytree-nodes): they
flatten to their tensors and come back whole, their tree specs serialize, and they cross a
torch.export boundary (no compiler run here: these tests are fast)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils import _pytree as pytree

import dm2s2_fast as dm
from conftest import random_batch, random_model, rel_err, require_backend, small_config
from dm2s2_fast import DM2S2Output, PackedLayout, SequenceSet


def _same_plan(a, b) -> bool:
    names = ("lengths", "totals", "cu_seqlens_set", "cu_seqlens_segment", "cu_segments_per_sample",
             "element_sample", "element_modality", "element_position")
    return (all(np.array_equal(getattr(a, n), getattr(b, n)) for n in names)
            and all(np.array_equal(x, y) for x, y in zip(a.rows + a.positions, b.rows + b.positions)))


def test_layout_round_trip_rebuilds_the_host_plan():
    batch = random_batch(small_config(), 6, seed=3)
    layout = batch.layout
    leaves, spec = pytree.tree_flatten(layout)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    # the sizes and max lengths are the static context: two layouts of other sizes differ in structure
    assert spec.context == (layout.batch_size, layout.num_elements, layout.num_segments, layout.max_seqlen_set,
                            layout.max_seqlen_segment, layout.max_segments_per_sample)
    back = pytree.tree_unflatten([t.clone() for t in leaves], spec)
    assert isinstance(back, PackedLayout)
    assert all(torch.equal(x, y) for x, y in zip(pytree.tree_leaves(back), leaves))
    assert back.host is not layout.host and _same_plan(back.host, layout.host)


def test_sequence_set_carries_its_layout_once_built():
    config = small_config()
    batch = random_batch(config, 5, seed=1)
    leaves, spec = pytree.tree_flatten(batch)
    assert len(leaves) == 2 * config.num_modalities  # values and lengths; no layout yet
    moved = pytree.tree_map(lambda t: t.clone(), batch)
    assert isinstance(moved, SequenceSet) and moved.batch_size == 5 and "layout" not in moved.__dict__
    batch.layout
    leaves, spec = pytree.tree_flatten(batch)
    assert len(leaves) > 2 * config.num_modalities
    moved = pytree.tree_map(lambda t: t.clone(), batch)
    assert "layout" in moved.__dict__ and moved.layout is not batch.layout
    assert torch.equal(moved.layout.cu_seqlens_set, batch.layout.cu_seqlens_set)
    for name in batch.values:
        assert torch.equal(moved.values[name], batch.values[name])


def test_tree_specs_serialize():
    config = small_config()
    batch = random_batch(config, 4, seed=2)
    batch.layout
    spec = pytree.tree_structure(batch)
    again = pytree.treespec_loads(pytree.treespec_dumps(spec))
    assert again == spec
    # the config travels in the spec (as JSON), so the loaded spec rebuilds a batch of that config
    rebuilt = pytree.tree_unflatten(pytree.tree_leaves(batch), again)
    assert rebuilt.config == config and rebuilt.batch_size == 4


def test_output_round_trip():
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    out = engine(random_batch(config, 5, seed=4))
    back = pytree.tree_map(lambda t: t.clone(), out)
    assert isinstance(back, DM2S2Output)
    for name in ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled"):
        assert torch.equal(getattr(back, name), getattr(out, name))
    assert torch.allclose(back.element_importance(), out.element_importance())


class _Summary(torch.nn.Module):
    """Takes a SequenceSet and returns a DM2S2Output-free summary: values and offsets cross export."""

    def forward(self, batch: SequenceSet):
        layout = batch.layout
        return batch.values["image"].sum(0), layout.cu_seqlens_set * 2, layout.rows[0] + 1


def test_a_sequence_set_crosses_torch_export():
    config = small_config()
    batch = random_batch(config, 4, seed=5)
    batch.layout  # a traced forward never builds the layout: it comes in with the batch
    program = torch.export.export(_Summary(), (batch,), strict=False)
    expect = _Summary()(batch)
    got = program.module()(batch)
    assert all(torch.equal(a, b) for a, b in zip(got, expect))


def test_torch_export_of_the_engine_itself_is_static_and_exact():
    """``torch.export.export(engine, (batch,))``, the issue's first failure, now traces; the program
    is specialized to the example's sizes (``dm2s2_fast.export`` is the dynamic one)."""
    require_backend("cpp", "cpu")
    config = small_config()
    engine = dm.convert(random_model(config), "cpp")
    batch = random_batch(config, 4, seed=6)
    batch.layout
    with torch.no_grad():
        program = torch.export.export(engine, (batch,), strict=False)
    assert any(str(n.target).startswith("dm2s2_fast.") for n in program.graph.nodes)
    with torch.inference_mode():
        out = program.module()(batch)
    ref = engine(batch)
    assert isinstance(out, DM2S2Output)
    assert rel_err(out.logits, ref.logits) <= 1e-5 and rel_err(out.hidden, ref.hidden) <= 1e-5
    assert _same_plan(out.layout.host, ref.layout.host)
