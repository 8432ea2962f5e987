"""The packed layout of a batch (dm2s2_fast.data.layout): its offsets and maps, the host plan it is
built from, and the ``Layout`` protocol the engine runs on (docs/data.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dm2s2_fast.data import HostPlan, Layout, PackedLayout
from helpers import random_batch, skip_unless_cuda, small_config


def test_layout_offsets():
    config = small_config()
    lengths = torch.tensor([[2, 0, 1, 0], [0, 0, 0, 0], [1, 3, 0, 2]])
    layout = random_batch(config, 3, 3, lengths=lengths).layout
    assert layout.cu_seqlens_set.tolist() == [0, 3, 3, 9]
    assert layout.cu_seqlens_segment.tolist() == [0, 2, 3, 4, 7, 9]
    assert layout.cu_segments_per_sample.tolist() == [0, 2, 2, 5]
    assert layout.cu_seqlens_set.dtype == torch.int32
    assert (layout.max_seqlen_set, layout.max_seqlen_segment, layout.max_segments_per_sample) == (6, 3, 3)
    assert layout.segment_modality.tolist() == [0, 2, 0, 1, 3]
    assert layout.rows[1].tolist() == [4, 5, 6] and layout.positions[1].tolist() == [0, 1, 2]
    assert layout.empty_samples.tolist() == [False, True, False]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_to_builds_the_layout_from_host_lengths(device):
    """A host batch moved to a device gets its layout at .to(), from the host lengths (no read-back)."""
    if device == "cuda":
        skip_unless_cuda()
    config = small_config()
    fresh = random_batch(config, 6, 5)
    moved = fresh.to(device)
    assert "layout" in moved.__dict__
    expected = random_batch(config, 6, 5).layout  # built lazily, on the host
    layout = moved.layout
    for name in ("cu_seqlens_set", "cu_seqlens_segment", "cu_segments_per_sample", "segment_sample", "segment_modality",
                 "element_sample", "element_modality", "element_position", "empty_samples"):
        got, want = getattr(layout, name), getattr(expected, name)
        assert got.device.type == device and got.dtype == want.dtype and torch.equal(got.cpu(), want), name
    for got, want in zip(layout.rows + layout.positions, expected.rows + expected.positions):
        assert torch.equal(got.cpu(), want)
    assert (layout.max_seqlen_set, layout.num_elements) == (expected.max_seqlen_set, expected.num_elements)


def test_host_plan_is_the_layouts_plan():
    """``host_plan()`` gives the plan ``layout`` moves to the device: the same arrays, computed on the
    host (no device read-back) before the layout exists, and the layout's own plan after."""
    config = small_config()
    batch = random_batch(config, 7, 6)
    plan = batch.host_plan()
    assert isinstance(plan, HostPlan) and "layout" not in batch.__dict__
    layout = batch.layout
    assert isinstance(layout, PackedLayout) and isinstance(layout, Layout)
    assert batch.host_plan() is layout.host
    for name in ("cu_seqlens_set", "cu_seqlens_segment", "cu_segments_per_sample", "segment_sample",
                 "segment_modality", "element_sample", "element_modality", "element_position"):
        assert np.array_equal(getattr(plan, name), getattr(layout, name).cpu().numpy()), name
    for a, b in zip(plan.rows + plan.positions, layout.rows + layout.positions):
        assert np.array_equal(a, b.cpu().numpy())
    assert (plan.num_elements, plan.num_segments) == (layout.num_elements, layout.num_segments)


def test_layout_of_no_samples_and_of_empty_samples():
    config = small_config()
    empty = random_batch(config, 3, 1, lengths=torch.zeros(3, config.num_modalities, dtype=torch.int64)).layout
    assert empty.num_elements == 0 and empty.num_segments == 0 and empty.batch_size == 3
    assert empty.cu_seqlens_set.tolist() == [0, 0, 0, 0] and empty.cu_segments_per_sample.tolist() == [0, 0, 0, 0]
    assert empty.cu_seqlens_segment.tolist() == [0]
    assert (empty.max_seqlen_set, empty.max_seqlen_segment, empty.max_segments_per_sample) == (0, 0, 0)
    assert empty.empty_samples.tolist() == [True, True, True]
    plan = HostPlan.build(np.zeros((0, 4), dtype=np.int64))
    assert plan.num_elements == 0 and plan.num_segments == 0 and plan.cu_seqlens_set.tolist() == [0]
    none = PackedLayout.from_plan(plan, torch.device("cpu"))
    assert none.batch_size == 0 and none.max_seqlen_set == 0 and none.rows[0].numel() == 0
