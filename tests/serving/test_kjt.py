"""TorchRec interop (dm2s2_fast.data.kjt): SequenceSet <-> KeyedJaggedTensor, and a Ranker fed KJTs.

Runs where torchrec imports (the optional extra); elsewhere skipped, or failed under
DM2S2_FAST_REQUIRE_TEST_EXTRAS=1, through conftest.skip_unless_required. The missing-torchrec
error is tested everywhere.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

import dm2s2_fast as dm
from dm2s2_fast.data import kjt as kjt_module
from dm2s2_fast.data.kjt import dense_jagged, from_kjt, to_kjt
from dm2s2_fast.serving import Ranker

from conftest import FP32_TOL, random_batch, random_model, rel_err, skip_unless_required, small_config


@pytest.fixture(scope="module")
def torchrec():
    try:
        with warnings.catch_warnings():  # fbgemm's import warns about its own module layout
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchrec.sparse import jagged_tensor
    except ImportError as exc:
        skip_unless_required("torchrec", f"{type(exc).__name__}: {exc} ({kjt_module.INSTALL_HINT})")
    return jagged_tensor


def test_round_trip(torchrec):
    config = small_config()
    batch = random_batch(config, 9, seed=4)
    kjt = to_kjt(batch)
    assert isinstance(kjt, torchrec.KeyedJaggedTensor)
    assert kjt.keys() == ["title", "tags", "body"]  # the id modalities, in config order
    assert kjt.stride() == 9
    for name, jt in kjt.to_dict().items():
        assert torch.equal(jt.values(), batch.values[name]) and torch.equal(jt.lengths(), batch.lengths[name])
    back = dm.SequenceSet.from_kjt(config, batch.to_kjt(), dense=dense_jagged(batch))
    assert back.batch_size == batch.batch_size
    for name in batch.values:
        assert torch.equal(back.values[name], batch.values[name]), name
        assert torch.equal(back.lengths[name], batch.lengths[name]), name
    # Dense modalities may also come as torchrec JaggedTensors.
    image = torchrec.JaggedTensor(values=batch.values["image"], lengths=batch.lengths["image"])
    again = from_kjt(config, kjt, dense={"image": image})
    assert torch.equal(again.values["image"], batch.values["image"])


def test_any_key_order_int32_and_missing_keys(torchrec):
    config = small_config()
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=["body", "title"], values=torch.tensor([5, 6, 7, 1, 2], dtype=torch.int32),
        lengths=torch.tensor([2, 0, 1, 0, 1, 1], dtype=torch.int32))
    batch = from_kjt(config, kjt)
    assert batch.batch_size == 3
    assert batch.values["body"].tolist() == [5, 6, 7] and batch.lengths["body"].tolist() == [2, 0, 1]
    assert batch.values["title"].tolist() == [1, 2] and batch.lengths["title"].tolist() == [0, 1, 1]
    assert batch.lengths["tags"].tolist() == [0, 0, 0] and batch.values["image"].shape == (0, 6)
    assert batch.values["body"].dtype == torch.int64


def test_refusals_name_what_is_wrong(torchrec):
    config = small_config()
    KJT = torchrec.KeyedJaggedTensor

    def kjt(keys, values, lengths, **kw):
        return KJT.from_lengths_sync(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths), **kw)

    cases = [
        (lambda: from_kjt(config, {"title": 1}), "KeyedJaggedTensor"),
        (lambda: from_kjt(config, kjt(["audio"], [1], [1])), "'audio'"),
        (lambda: from_kjt(config, kjt(["image"], [1], [1])), "dense"),
        (lambda: from_kjt(config, kjt(["title"], [1, 2], [1, 1], weights=torch.ones(2))), "weighted"),
        (lambda: from_kjt(config, kjt(["title"], [1, 200], [1, 1])), "modality 'title', sample 1"),
        (lambda: from_kjt(config, kjt(["title"], [1], [1]), dense={"title": (torch.zeros(1, 6), torch.ones(1))}),
         "both"),
        (lambda: from_kjt(config, kjt(["title"], [1], [1]), dense={"tags": (torch.zeros(1), torch.ones(1))}),
         "ids"),
        (lambda: from_kjt(config, kjt(["title"], [1, 2], [1, 1]),
                          dense={"image": (torch.zeros(3, 6), torch.tensor([1, 1, 1]))}), "'image'"),
        (lambda: to_kjt("batch"), "SequenceSet"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()


def test_a_ranker_scores_a_kjt_as_its_sequence_set(torchrec):
    config = small_config()
    engine = dm.convert(random_model(config))
    batch = random_batch(config, 6, seed=9)
    ids_only = from_kjt(config, to_kjt(batch))  # the KJT carries no image features
    with Ranker(engine) as ranker:
        from_kjt_scores = ranker.score(to_kjt(batch))
        with_dense = ranker.score(from_kjt(config, to_kjt(batch), dense=dense_jagged(batch)))
    assert rel_err(from_kjt_scores, engine(ids_only).logits) <= FP32_TOL
    assert rel_err(with_dense, engine(batch).logits) <= FP32_TOL


def test_without_torchrec_the_error_says_how_to_install(monkeypatch):
    for name in ("torchrec", "torchrec.sparse", "torchrec.sparse.jagged_tensor"):
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    config = small_config()
    with pytest.raises(ImportError, match="pip install"):
        from_kjt(config, object())
    with pytest.raises(ImportError, match="torchrec"):
        to_kjt(random_batch(config, 2))
