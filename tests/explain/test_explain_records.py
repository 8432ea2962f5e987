"""``dm2s2_fast.explain.explain``: per-sample records of β, α and importance (docs/explain.md).

The records must hold exactly the output tensors' values, in the right sample/modality/position, and
survive a JSON round trip unchanged.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import dm2s2_fast as dm
from dm2s2_fast.explain import explain, heat, top_elements, top_modality

from conftest import random_batch, random_model, small_config


@pytest.fixture(scope="module")
def case():
    config = small_config()
    model = random_model(config, seed=3)
    batch = random_batch(config, 9, seed=5)  # sample 0 empty; missing, length-1 and long segments
    out = dm.convert(model, "torch")(batch)
    return config, model, batch, out


def test_records_hold_the_output_tensors_exactly(case):
    config, _, batch, out = case
    records = explain(out, batch)
    assert [r["sample"] for r in records] == list(range(batch.batch_size))
    alpha, importance = out.intra_weights.tolist(), out.element_importance().tolist()
    beta = out.inter_weights.tolist()
    lengths = batch.layout.lengths
    row = segment = 0
    seen = {m.name: 0 for m in config.modalities}  # values consumed per modality (packed over samples)
    for b, record in enumerate(records):
        assert record["logits"] == out.logits[b].tolist()
        present = [m for i, m in enumerate(config.modalities) if lengths[b, i] > 0]
        assert [mod["name"] for mod in record["modalities"]] == [m.name for m in present]
        assert record["missing"] == [m.name for i, m in enumerate(config.modalities) if lengths[b, i] == 0]
        assert record["empty"] == (not present) == bool(out.empty_samples[b])
        K = len(present)
        for mod, modality in zip(record["modalities"], present):
            L = int(lengths[b, config.modality_index(modality.name)])
            assert (mod["kind"], mod["length"], len(mod["elements"])) == (modality.kind, L, L)
            assert mod["beta"] == beta[segment]
            assert int(out.segment_sample[segment]) == b
            assert mod["share"] == (1 + beta[segment]) / (K + 1)
            values = batch.values[modality.name][seen[modality.name]: seen[modality.name] + L]
            for p, element in enumerate(mod["elements"]):
                assert element["position"] == p == int(out.element_position[row])
                assert int(out.element_sample[row]) == b
                assert element["alpha"] == alpha[row] and element["importance"] == importance[row]
                if modality.kind == "dense":
                    assert "id" not in element and element["label"] == str(p)
                else:
                    assert element["id"] == int(values[p]) and element["label"] == str(int(values[p]))
                row += 1
            seen[modality.name] += L
            segment += 1
            assert sum(e["alpha"] for e in mod["elements"]) == pytest.approx(1, abs=1e-5)
        if K:
            assert sum(mod["beta"] for mod in record["modalities"]) == pytest.approx(1, abs=1e-5)
            total = sum(e["importance"] for mod in record["modalities"] for e in mod["elements"])
            assert total == pytest.approx(1, abs=1e-5)
    assert row == out.layout.num_elements and segment == out.layout.num_segments


def test_records_round_trip_through_json(case):
    _, _, batch, out = case
    records = explain(out, batch)
    text = json.dumps(records, allow_nan=False)
    assert json.loads(text) == records
    # The floats are the fp32 values themselves: back in fp32 they equal the tensors bit for bit.
    back = json.loads(text)
    alphas = [e["alpha"] for r in back for mod in r["modalities"] for e in mod["elements"]]
    assert torch.equal(torch.tensor(alphas, dtype=torch.float32), out.intra_weights)
    betas = [mod["beta"] for r in back for mod in r["modalities"]]
    assert torch.equal(torch.tensor(betas, dtype=torch.float32), out.inter_weights)


def test_tokenizer_and_labels_decode_ids(case):
    config, _, batch, out = case

    class Tokenizer:  # the part of a Hugging Face tokenizer that explain uses
        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    names = [f"tag-{i}" for i in range(17)]
    records = explain(out, batch, Tokenizer(), labels={"tags": names, "image": lambda p: f"patch {p}"})
    callable_records = explain(out, batch, lambda ids: [f"w{i}" for i in ids], labels={"tags": dict(enumerate(names))})
    for record, other in zip(records, callable_records):
        for mod, mod2 in zip(record["modalities"], other["modalities"]):
            for e, e2 in zip(mod["elements"], mod2["elements"]):
                if mod["kind"] == "tokens":
                    assert e["label"] == e2["label"] == f"w{e['id']}"
                elif mod["kind"] == "categorical":
                    assert e["label"] == e2["label"] == names[e["id"]]
                else:
                    assert e["label"] == f"patch {e['position']}" and e2["label"] == str(e["position"])
    # The method on the output delegates.
    assert out.explain(batch, Tokenizer()) == explain(out, batch, Tokenizer())


def test_samples_subset_and_bad_arguments(case):
    config, _, batch, out = case
    full = explain(out, batch)
    assert explain(out, batch, samples=[7, 2]) == [full[7], full[2]]
    with pytest.raises(ValueError, match="sample 9 is out of range"):
        explain(out, batch, samples=[9])
    with pytest.raises(ValueError, match="unknown modality 'nope'"):
        explain(out, batch, labels={"nope": []})
    other = random_batch(config, 4, seed=1)
    with pytest.raises(ValueError, match="batch of 9 samples"):
        explain(out, other)
    with pytest.raises(ValueError, match="returned"):
        explain(out, batch, lambda ids: ["only one"])


def test_reference_and_engine_explain_alike(case):
    _, model, batch, out = case
    with torch.no_grad():
        ref = explain(model(batch), batch)
    ours = explain(out, batch)
    for a, b in zip(ref, ours):
        assert [m["name"] for m in a["modalities"]] == [m["name"] for m in b["modalities"]]
        for ma, mb in zip(a["modalities"], b["modalities"]):
            assert ma["beta"] == pytest.approx(mb["beta"], abs=1e-5)
            assert [e["alpha"] for e in ma["elements"]] == pytest.approx([e["alpha"] for e in mb["elements"]], abs=1e-5)


def test_top_elements_and_modality(case):
    _, _, batch, out = case
    records = explain(out, batch)
    assert top_modality(records[0]) is None and top_elements(records[0]) == []
    for record in records[1:]:
        flat = [(e["importance"], mod["name"], e["position"]) for mod in record["modalities"] for e in mod["elements"]]
        best = top_elements(record, 3)
        assert [e["importance"] for e in best] == sorted((f[0] for f in flat), reverse=True)[:3]
        assert top_modality(record) == max(record["modalities"], key=lambda m: m["beta"])["name"]


def test_heat_scale():
    assert heat(1.0, 1) == 0 and heat(0.1, 10) == 0 and heat(0.01, 10) == 0
    assert heat(1.0, 10) == 1 and heat(0.5, 4) == pytest.approx(math.log(2) / math.log(4))


def test_import_needs_neither_matplotlib_nor_transformers():
    code = ("import sys, dm2s2_fast, dm2s2_fast.explain, dm2s2_fast.explain.html\n"
            "bad = [m for m in ('matplotlib', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
