"""Fidelity, measured: a model trained on ads with a planted label (examples/planted_signal.py) is
explained, through the engine, by the elements and the modality that were planted.

The label depends only on the word ``clearance`` in the title or a deal category among the ids (the
word in the description is a decoy). Over the held-out positive ads, the planted modality must have
the largest β and the planted element be among the 3 most important elements in ≥ 90 % of them,
at an accuracy ≥ 95 % (docs/explain.md#fidelity). Seeded; ~15 s of CPU.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "planted_signal.py"


@pytest.fixture(scope="module")
def planted():
    spec = importlib.util.spec_from_file_location("planted_signal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(scope="module")
def result(planted):
    return planted.run(seed=0)


def test_explanations_find_the_planted_signal(result):
    m = result["metrics"]
    print("\nplanted-signal fidelity:", {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()})
    assert m["positives"] > 400
    assert m["accuracy"] >= 0.95
    assert m["accuracy_decoy_negatives"] >= 0.95  # the word in the description is not taken for the title's
    assert m["planted_modality_top_beta"] >= 0.9
    assert m["planted_element_top3"] >= 0.9
    for kind in ("word", "category"):  # each half on its own, not one carrying the other
        assert m[f"{kind}_planted_modality_top_beta"] >= 0.9
        assert m[f"{kind}_planted_element_top3"] >= 0.9
    assert m["engine_vs_reference_logits"] <= 1e-5  # the engine explains the model that was trained


def test_a_planted_word_tops_its_report(result, planted, tmp_path):
    from dm2s2_fast.explain import render_html
    from dm2s2_fast.explain.html import read_document

    test, records = result["test"], result["records"]
    chosen = planted.report_samples(test)
    assert [test.kind[b] for b in chosen].count("word") == 2
    doc = read_document(render_html([records[b] for b in chosen], tmp_path / "r.html"))
    for record in doc["samples"]:
        b = record["sample"]
        if test.kind[b] == "word":
            title = next(m for m in record["modalities"] if m["name"] == "title")
            best = max(title["elements"], key=lambda e: e["alpha"])
            assert best["label"] == planted.PLANTED_WORD and best["position"] == test.planted[b][1]


def test_the_task_is_seeded(planted):
    config = planted.make_config()
    a, b = planted.make_ads(config, 32, seed=7), planted.make_ads(config, 32, seed=7)
    assert a.kind == b.kind and a.planted == b.planted and torch.equal(a.labels, b.labels)
    for name in a.batch.values:
        assert torch.equal(a.batch.values[name], b.batch.values[name])
    # The planted word is where the record says, and only there in the title.
    for i, (kind, where) in enumerate(zip(a.kind, a.planted)):
        start = int(a.batch.lengths["title"][:i].sum())
        title = a.batch.values["title"][start:start + int(a.batch.lengths["title"][i])]
        assert (title == 0).nonzero().flatten().tolist() == ([where[1]] if kind == "word" else [])
