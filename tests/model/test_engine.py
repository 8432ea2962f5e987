"""FastDM2S2 (the ragged engine) against the padded reference, run in fp64 (docs/numerics.md)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import dm2s2_fast
from dm2s2_fast import BackendUnavailable, DM2S2Config, Modality, SequenceSet, convert
from dm2s2_fast.workloads import ads_batch

from helpers import FP32_TOL, fp64_reference, random_batch, random_model, rel_err, small_config

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")


def assert_matches(out, ref, tol=FP32_TOL):
    for field in FIELDS:
        err = rel_err(getattr(out, field), getattr(ref, field))
        assert err <= tol, f"{field}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("B,seed", [(1, 1), (2, 2), (7, 3), (13, 4)])
def test_engine_matches_fp64_reference(attention, B, seed):
    config = small_config(attention)
    model = random_model(config, seed)
    batch = random_batch(config, B, seed)
    assert_matches(convert(model, "torch")(batch), fp64_reference(model, batch))


@pytest.mark.parametrize("kind", ["tokens", "categorical", "dense"])
def test_each_modality_kind_alone(kind):
    modality = Modality("only", kind, input_dim=5 if kind == "dense" else None,
                        num_embeddings=9 if kind == "categorical" else None)
    config = small_config(modalities=(modality,))
    model = random_model(config, 5)
    batch = random_batch(config, 6, 5)
    assert_matches(convert(model, "torch")(batch), fp64_reference(model, batch))


def test_reference_float32_is_close_to_its_fp64_run():
    """The oracle itself: fp32 reference within tolerance of fp64 (guards the tolerance's meaning)."""
    config = small_config()
    model = random_model(config, 6)
    batch = random_batch(config, 9, 6)
    with torch.no_grad():
        assert_matches(model(batch), fp64_reference(model, batch))


def test_long_tail_and_length_one_segments():
    config = small_config(max_positions=200)
    lengths = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [150, 1, 0, 3], [2, 0, 37, 0], [0, 0, 0, 0]])
    model = random_model(config, 7)
    batch = random_batch(config, 5, 7, lengths=lengths)
    assert_matches(convert(model, "torch")(batch), fp64_reference(model, batch))


def test_all_empty_batch_gives_zero_pooled():
    config = small_config()
    model = random_model(config, 8)
    batch = random_batch(config, 3, 8, lengths=torch.zeros(3, 4, dtype=torch.int64))
    out = convert(model, "torch")(batch)
    ref = fp64_reference(model, batch)
    assert out.hidden.shape == (0, config.hidden_size)
    assert out.intra_weights.shape == (0,) and out.inter_weights.shape == (0,)
    assert torch.equal(out.pooled, torch.zeros_like(out.pooled))
    assert out.empty_samples.all()
    assert rel_err(out.logits, ref.logits) <= FP32_TOL


def test_empty_sample_is_reported_and_zero():
    config = small_config()
    model = random_model(config, 9)
    batch = random_batch(config, 4, 9)  # sample 0 is empty
    out = convert(model, "torch")(batch)
    assert out.empty_samples.tolist() == [True, False, False, False]
    assert torch.equal(out.pooled[0], torch.zeros_like(out.pooled[0]))


def test_weights_sum_to_one_per_sample_and_segment(attention):
    config = small_config(attention)
    model = random_model(config, 10)
    batch = random_batch(config, 11, 10)
    out = convert(model, "torch")(batch)
    layout = out.layout
    seg_sum = torch.zeros(layout.num_segments, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(layout.num_segments),
                                   (layout.cu_seqlens_segment[1:] - layout.cu_seqlens_segment[:-1]).long()),
        out.intra_weights.double())
    torch.testing.assert_close(seg_sum, torch.ones_like(seg_sum))
    beta_sum = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, layout.segment_sample,
                                                                         out.inter_weights.double())
    importance = torch.zeros(len(batch), dtype=torch.float64).index_add_(
        0, layout.element_sample, out.element_importance().double())
    present = ~out.empty_samples
    torch.testing.assert_close(beta_sum[present], torch.ones(int(present.sum()), dtype=torch.float64))
    torch.testing.assert_close(importance[present], torch.ones(int(present.sum()), dtype=torch.float64))
    assert importance[~present].abs().sum() == 0


def test_permuting_samples_permutes_outputs():
    config = small_config()
    model = random_model(config, 11)
    batch = random_batch(config, 8, 11)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    padded = batch.to_padded()
    permuted = dm2s2_fast.SequenceSet.from_padded(
        config, {k: (v[perm], m[perm]) for k, (v, m) in padded.items()})
    engine = convert(model, "torch")
    a, b = engine(batch), engine(permuted)
    assert rel_err(b.logits, a.logits[perm]) <= FP32_TOL
    assert rel_err(b.pooled, a.pooled[perm]) <= FP32_TOL
    # Per-element outputs move with their sample.
    for new_b, old_b in enumerate(perm.tolist()):
        sel_a, sel_b = a.element_sample == old_b, b.element_sample == new_b
        assert rel_err(b.hidden[sel_b], a.hidden[sel_a]) <= FP32_TOL
        assert rel_err(b.intra_weights[sel_b], a.intra_weights[sel_a]) <= FP32_TOL


def test_sample_output_does_not_depend_on_its_batch(attention):
    config = small_config(attention)
    model = random_model(config, 12)
    batch = random_batch(config, 6, 12)
    engine = convert(model, "torch")
    together = engine(batch)
    padded = batch.to_padded()
    for b in range(6):
        alone = engine(dm2s2_fast.SequenceSet.from_padded(
            config, {k: (v[b:b + 1], m[b:b + 1]) for k, (v, m) in padded.items()}))
        # Equal up to fp32 rounding: GEMM blocking may differ with the batch's size.
        assert rel_err(alone.logits[0], together.logits[b]) <= FP32_TOL
        assert rel_err(alone.hidden, together.hidden[together.element_sample == b]) <= FP32_TOL


def test_output_indexing_maps_back_to_sample_modality_position():
    config = small_config()
    model = random_model(config, 13)
    batch = random_batch(config, 5, 13)
    out = convert(model, "torch")(batch)
    for m, modality in enumerate(config.modalities):
        sel = out.element_modality == m
        lengths = batch.lengths[modality.name]
        assert torch.equal(out.element_sample[sel], torch.repeat_interleave(torch.arange(5), lengths))
        starts = torch.cumsum(lengths, 0) - lengths
        expect = torch.arange(int(lengths.sum())) - starts.repeat_interleave(lengths)
        assert torch.equal(out.element_position[sel], expect)
    present = torch.stack([batch.lengths[m.name] > 0 for m in config.modalities], 1)
    assert torch.equal(out.segment_sample, present.nonzero()[:, 0])
    assert torch.equal(out.segment_modality, present.nonzero()[:, 1])


def test_convert_shares_parameters_without_copy():
    config = small_config()
    model = random_model(config, 14)
    engine = convert(model)
    ref_ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in engine.parameters()} == ref_ptrs
    batch = random_batch(config, 3, 14)
    before = engine(batch).logits
    with torch.no_grad():
        model.head.out.bias.add_(1.0)  # a change to the reference shows in the engine
    torch.testing.assert_close(engine(batch).logits, before + 1.0)


def test_engine_is_inference_only():
    config = small_config()
    model = random_model(config, 15)
    engine = convert(model)
    with pytest.raises(RuntimeError, match="inference-only"):
        engine.train()
    batch = random_batch(config, 3, 15)
    out = engine(batch)
    assert not out.logits.requires_grad and out.logits.is_inference()
    batch.values["image"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        engine(batch)


def test_unknown_or_unavailable_backend_raises_with_reason():
    model = random_model(small_config(), 16)
    with pytest.raises(ValueError, match="unknown backend"):
        convert(model, "fastest")
    # The model lives on the CPU: the cuda backend cannot serve it, whatever the machine has.
    with pytest.raises(BackendUnavailable, match="cuda"):
        convert(model, "cuda")


def test_batch_for_another_config_is_rejected():
    model = random_model(small_config(), 17)
    other = DM2S2Config.default_ads(num_layers=1)
    with pytest.raises(ValueError, match="other modalities"):
        convert(model)(ads_batch(2, other))
    # Same modalities, but ids and lengths validated against a larger vocabulary / position table:
    # they would reach the embedding kernels out of range.
    for field, value, jagged in (("vocab_size", 1000, {"title": (torch.tensor([5, 999]), torch.tensor([2]))}),
                                 ("max_positions", 128, {"title": (torch.arange(100), torch.tensor([100]))})):
        batch = SequenceSet.from_jagged(dataclasses.replace(model.config, **{field: value}), jagged)
        for runner in (model, convert(model, "torch"), convert(model)):
            with pytest.raises(ValueError, match=f"other {field}"):
                runner(batch)


def test_default_ads_workload_runs_and_matches():
    config = DM2S2Config.default_ads(num_layers=1)
    model = random_model(config, 18)
    batch = ads_batch(3, config, seed=1)
    assert_matches(convert(model, "torch")(batch), fp64_reference(model, batch))
