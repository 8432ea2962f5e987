"""Loading a Hugging Face BERT checkpoint reproduces transformers.BertModel's hidden states."""
from __future__ import annotations

import json

import pytest
import torch

from dm2s2_fast import DM2S2Config, Modality, SequenceSet, convert
from dm2s2_fast.reference import DM2S2

from helpers import FP32_TOL, rel_err, skip_unless_required

try:
    import transformers
except ImportError as exc:
    transformers = None
    _MISSING = f"{exc} (a test extra: pip install .[test])"


@pytest.fixture(autouse=True)
def _needs_transformers():
    if transformers is None:
        skip_unless_required("transformers", _MISSING)


def make_checkpoint(tmp_path, safe: bool = True, **overrides):
    hf_config = transformers.BertConfig(**{**dict(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=48,
                                                  max_position_embeddings=40, hidden_act="gelu"), **overrides})
    torch.manual_seed(0)
    bert = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    with torch.no_grad():  # move every weight off its init so a missed load shows
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    bert.save_pretrained(tmp_path)
    if not safe:  # transformers 5 writes safetensors whatever safe_serialization says
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    return bert


def our_config(**overrides):
    fields = dict(modalities=(Modality("text", "tokens"), Modality("tags", "categorical", num_embeddings=5),
                              Modality("extra", "dense", input_dim=3)),
                  vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_positions=40)
    fields.update(overrides)
    return DM2S2Config(**fields)


@pytest.mark.parametrize("safe", [True, False])
def test_loaded_model_reproduces_bert_hidden_states(tmp_path, safe):
    bert = make_checkpoint(tmp_path, safe)
    model = DM2S2(our_config()).eval().load_bert(tmp_path)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 17, 9])
    ids = torch.randint(0, 97, (int(lengths.sum()),), generator=g)
    batch = SequenceSet.from_jagged(model.config, {"text": (ids, lengths)})
    with torch.no_grad():
        ours = model(batch).hidden
    fast = convert(model, "torch")(batch).hidden
    mask = batch.to_padded()["text"][1]
    padded_ids = batch.to_padded()["text"][0]
    with torch.no_grad():
        theirs = bert(input_ids=padded_ids, attention_mask=mask.long()).last_hidden_state[mask]
    assert rel_err(ours, theirs) <= FP32_TOL
    assert rel_err(fast, theirs) <= FP32_TOL


def test_type_rows_beyond_bert_are_drawn_as_bert_draws_them(tmp_path):
    """Rows past BERT's two come from N(0, the checkpoint's initializer_range) (docs/model.md)."""
    bert = make_checkpoint(tmp_path, initializer_range=0.5)
    model = DM2S2(our_config(modalities=our_config().modalities + tuple(
        Modality(f"more{i}", "categorical", num_embeddings=3) for i in range(30))))
    model.load_bert(tmp_path)
    types = bert.embeddings.token_type_embeddings.weight
    assert torch.equal(model.embeddings.token_type.weight[:2], types)
    extra = model.embeddings.token_type.weight[2:]
    assert extra.shape == (31, 32) and 0.45 < float(extra.detach().std()) < 0.55  # 992 draws: ±5 % ~ 2 sigma, seeded


def test_mismatched_checkpoint_is_refused(tmp_path):
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=32/64"):
        DM2S2(our_config(hidden_size=64, num_heads=4)).load_bert(tmp_path)
    with pytest.raises(ValueError, match="embedding_layer_norm_eps"):
        DM2S2(our_config(embedding_layer_norm_eps=1e-5)).load_bert(tmp_path)
    original = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"hidden_act": "relu"}, "GELU"), ({"hidden_act": "gelu_new"}, "GELU"),
                            ({"model_type": "roberta"}, "only BERT checkpoints")):
        (tmp_path / "config.json").write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=message):
            DM2S2(our_config()).load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**original, "hidden_act": "gelu_python"}))
    DM2S2(our_config()).load_bert(tmp_path)  # exact erf too


def test_directory_without_weights_is_refused(tmp_path):
    make_checkpoint(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        DM2S2(our_config()).load_bert(tmp_path)
