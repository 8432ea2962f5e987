"""SequenceSet (dm2s2_fast.data): constructors round-trip, moves, truncation, and every validation
error names the modality and the sample (its packed layout: test_layout.py)."""
from __future__ import annotations

import pytest
import torch

from dm2s2_fast import SequenceSet

from helpers import random_batch, small_config


def same_batch(a: SequenceSet, b: SequenceSet) -> None:
    assert len(a) == len(b)
    for name in a.values:
        assert torch.equal(a.lengths[name], b.lengths[name]), name
        assert torch.equal(a.values[name], b.values[name]), name


def test_padded_round_trip():
    config = small_config()
    batch = random_batch(config, 9, 1)
    same_batch(SequenceSet.from_padded(config, batch.to_padded()), batch)


def test_samples_round_trip():
    config = small_config()
    batch = random_batch(config, 6, 2)
    padded = batch.to_padded()
    samples = []
    for b in range(6):
        sample = {}
        for name, (values, mask) in padded.items():
            seq = values[b][mask[b]]
            if seq.shape[0]:
                sample[name] = seq.tolist() if seq.dim() == 1 and b % 2 else seq
        samples.append(sample)
    same_batch(SequenceSet.from_samples(config, samples), batch)


def test_jagged_with_modality_left_out_is_missing_everywhere():
    config = small_config()
    batch = SequenceSet.from_jagged(config, {"title": (torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1]))})
    assert len(batch) == 3
    assert batch.lengths["image"].tolist() == [0, 0, 0]
    assert batch.values["image"].shape == (0, 6)
    assert batch.layout.num_segments == 2


def test_from_padded_takes_masked_elements_in_order():
    config = small_config()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    batch = SequenceSet.from_padded(config, {"title": (ids, mask)})
    assert batch.values["title"].tolist() == [5, 7] and batch.lengths["title"].tolist() == [2, 0]


def test_to_and_pin_memory_keep_the_batch():
    config = small_config()
    batch = random_batch(config, 4, 4)
    _ = batch.layout
    moved = batch.to("cpu")
    same_batch(moved, batch)
    assert torch.equal(moved.layout.cu_seqlens_set, batch.layout.cu_seqlens_set)
    if torch.cuda.is_available():
        same_batch(batch.pin_memory(), batch)


def test_truncate_cuts_to_max_positions():
    config = small_config(max_positions=4)
    ids, lengths = torch.arange(9), torch.tensor([6, 3])
    with pytest.raises(ValueError, match=r"'title', sample 0: length 6 exceeds max_positions 4"):
        SequenceSet.from_jagged(config, {"title": (ids, lengths)})
    batch = SequenceSet.from_jagged(config, {"title": (ids, lengths)}, truncate=True)
    assert batch.lengths["title"].tolist() == [4, 3]
    assert batch.values["title"].tolist() == [0, 1, 2, 3, 6, 7, 8]


BAD = [
    ({"title": (torch.tensor([1, 2]), torch.tensor([1, -1, 2]))}, r"'title', sample 1: negative length"),
    ({"title": (torch.tensor([1, 2]), torch.tensor([1, 2]))}, r"'title': lengths sum to 3 but there are 2"),
    ({"title": (torch.tensor([1, 500, 2]), torch.tensor([1, 2]))}, r"'title', sample 1: id 500 is out of range"),
    ({"tags": (torch.tensor([1, 2, 17]), torch.tensor([2, 1]))}, r"'tags', sample 1: id 17 is out of range \[0, 17\)"),
    ({"tags": (torch.tensor([-1]), torch.tensor([0, 1]))}, r"'tags', sample 1: id -1"),
    ({"title": (torch.tensor([1.0]), torch.tensor([1]))}, r"'title': ids must be integers"),
    ({"image": (torch.randn(3, 5), torch.tensor([1, 2]))},
     r"'image': dense features must be 2-D \[total, 6\], got shape \(3, 5\)"),
    ({"image": (torch.tensor([[0.0] * 6, [float("nan")] + [0.0] * 5]), torch.tensor([1, 0, 1]))},
     r"'image', sample 2: features are not finite"),
    ({"image": (torch.tensor([[0.0] * 6, [0.0] * 5 + [float("inf")]]), torch.tensor([2, 0]))},
     r"'image', sample 0: features are not finite"),
    ({"image": (torch.tensor([[-float("inf")] + [0.0] * 5, [0.0] * 6]), torch.tensor([0, 1, 1]))},
     r"'image', sample 1: features are not finite"),
    ({"image": (torch.tensor([[1e38] * 6, [3e38] * 6]).half(), torch.tensor([0, 2]))},
     r"'image', sample 1: features are not finite"),
    ({"image": (torch.ones(2, 6, dtype=torch.int64), torch.tensor([2]))}, r"'image': dense features must be floating"),
    ({"title": (torch.tensor([1]), torch.tensor([1])), "tags": (torch.tensor([1]), torch.tensor([1, 0]))},
     r"'tags': lengths has 2 samples"),
    ({"nope": (torch.tensor([1]), torch.tensor([1]))}, r"unknown modality 'nope'"),
    ({"title": (torch.tensor([1]), torch.tensor([[1]]))}, r"'title': lengths must be a 1-D integer"),
    ({"title": (torch.tensor([1]), None)}, r"'title': cannot make lengths of NoneType"),
    ({"title": (torch.tensor([1]), ["a"])}, r"'title': cannot make lengths of list"),
    ({"title": (torch.tensor([1], device="meta"), torch.tensor([1], device="meta"))},
     r"'title': lengths are on the meta"),
    ({"title": (torch.tensor(1), torch.tensor([1]))}, r"'title': values must be 1-D ids or 2-D features"),
    # Lengths whose int64 sum wraps around to the number of values.
    ({"title": (torch.tensor([1, 2, 3]), torch.tensor([2 ** 62] * 4 + [3]))},
     r"'title', sample 0: length 4611686018427387904 but there are only 3 values"),
    # Finite in fp64, infinite in the fp32 the model computes in.
    ({"image": (torch.full((3, 6), 1e300, dtype=torch.float64), torch.tensor([1, 2]))},
     r"'image', sample 0: features are not finite in float32"),
]


@pytest.mark.parametrize("jagged,message", BAD)
def test_bad_jagged_batch_raises_naming_modality_and_sample(jagged, message):
    with pytest.raises(ValueError, match=message):
        SequenceSet.from_jagged(small_config(), jagged)


@pytest.mark.parametrize("samples,message", [
    ([{"title": [1, 2]}, {"title": [3, 101]}], r"'title', sample 1: id 101 is out of range"),
    ([{"title": [1]}, {"colour": [1]}], r"sample 1: unknown modality 'colour'"),
    ([{"image": torch.randn(6)}], r"'image', sample 0: dense features must be 2-D"),
    ([{"title": [[1, 2]]}], r"'title', sample 0: ids must be 1-D"),
    ([{}, "not a dict"], r"sample 1: expected a dict"),
    ([{"title": ["a"]}], r"'title', sample 0: cannot make a tensor"),
    # Checked per sample: concatenating would promote these into a batch that passes.
    ([{"title": [True, False]}, {}], r"'title', sample 0: ids must be integers, got torch.bool"),
    ([{"title": [4]}, {"title": [True, True]}], r"'title', sample 1: ids must be integers"),
    ([{"title": [1.5]}, {}], r"'title', sample 0: ids must be integers"),
    ([{"image": torch.ones(2, 6, dtype=torch.long)}, {}], r"'image', sample 0: dense features must be floating"),
    ([{"image": torch.randn(2, 6)}, {"image": torch.randn(2, 5)}], r"'image', sample 1: dense features must be 2-D"),
])
def test_bad_samples_raise_naming_modality_and_sample(samples, message):
    with pytest.raises(ValueError, match=message):
        SequenceSet.from_samples(small_config(), samples)


def test_bad_padded_raises():
    with pytest.raises(ValueError, match=r"'title': mask must be bool"):
        SequenceSet.from_padded(small_config(), {"title": (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))})
    with pytest.raises(ValueError, match="from_padded takes a dict"):
        SequenceSet.from_padded(small_config(), [1])


def test_lengths_given_as_lists_including_no_samples():
    batch = SequenceSet.from_jagged(small_config(), {"title": (torch.tensor([5, 6, 7]), [2, 0, 1])})
    assert batch.lengths["title"].tolist() == [2, 0, 1] and len(batch) == 3
    empty = SequenceSet.from_jagged(small_config(), {"title": (torch.zeros(0, dtype=torch.long), [])})
    assert len(empty) == 0 and empty.num_elements == 0


def test_failed_construction_leaves_inputs_untouched():
    ids, lengths = torch.tensor([1, 500]), torch.tensor([1, 1])
    with pytest.raises(ValueError):
        SequenceSet.from_jagged(small_config(), {"title": (ids, lengths)})
    assert ids.tolist() == [1, 500] and lengths.tolist() == [1, 1]
    given = {"title": [2]}
    SequenceSet(small_config(), {"title": torch.tensor([1, 2])}, given)
    assert given == {"title": [2]}  # the caller's dict keeps its list
