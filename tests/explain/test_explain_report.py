"""The reports: HTML (standard library) and PNG (matplotlib), and ``python -m dm2s2_fast explain``.

A screenshot-level check: the files exist, are what they claim to be (a parseable page, a valid PNG
of the expected size with something drawn in it), show every sample, and carry the values of
``explain`` (the page embeds its data; the CLI's JSON must equal it).
"""
from __future__ import annotations

import json
import re
import struct
import zlib

import pytest
import torch

import dm2s2_fast as dm
from dm2s2_fast.__main__ import main
from dm2s2_fast.explain import explain, render_html, render_png
from dm2s2_fast.explain.html import read_document
from dm2s2_fast.workloads import ads_batch

from conftest import random_batch, random_model, skip_unless_required, small_config

try:
    import matplotlib  # noqa: F401
except ImportError as exc:
    matplotlib = None
    _NO_MATPLOTLIB = f"{exc} (the explain extra: pip install '.[explain]')"


class Tokenizer:
    """Tokens that must be escaped in HTML and survive JSON: markup, quotes, a closing script tag."""

    def convert_ids_to_tokens(self, ids):
        return [["<b>", "&amp;", '"q"', "</script>", "ü", "##ing"][i % 6] + str(i) for i in ids]


@pytest.fixture(scope="module")
def records():
    config = small_config(modalities=small_config().modalities[:3] + (
        dm.Modality("patches", "dense", input_dim=4),))
    model = random_model(config, seed=1)
    lengths = torch.tensor([[5, 3, 2, 49], [0, 0, 0, 0], [12, 1, 0, 49], [1, 0, 7, 5]])
    batch = random_batch(config, 4, lengths=lengths)
    out = dm.convert(model, "torch")(batch)
    return explain(out, batch, Tokenizer())


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def _png_chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, each chunk's CRC checked."""
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + chunk) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0], kind
        kinds.append(kind)
        pos += 12 + length
    return kinds


def test_html_report_has_every_sample_and_its_values(records, tmp_path):
    path = tmp_path / "report.html"
    text = render_html(records, path, title="a <title>", notes=["note & more"])
    assert path.read_text(encoding="utf-8") == text
    doc = read_document(text)
    assert doc["samples"] == records and doc["title"] == "a <title>" and doc["notes"] == ["note & more"]
    assert re.findall(r'<section class="sample" id="sample-(\d+)"', text) == [str(r["sample"]) for r in records]
    assert "<title>a &lt;title&gt;</title>" in text
    # Every label shows, escaped; no raw markup from a token leaks into the page.
    body = text[:text.index('<script type="application/json"')]
    assert "&lt;b&gt;" in body and "&lt;/script&gt;" in body and "<b><b>" not in body
    assert text.count("</script>") == 1
    for record in records:
        section = body[body.index(f'id="sample-{record["sample"]}"'):]
        section = section[:section.index("</section>")]
        if record["empty"]:
            assert "No elements" in section
        for mod in record["modalities"]:
            assert f"{mod['beta']:.3f}" in section
            for e in mod["elements"]:
                assert f"α {e['alpha']:.4f} · importance {e['importance']:.4f}" in section
    # The 49-patch modality draws as a 7×7 grid, the 5-patch one as a strip.
    assert body.count("grid-template-columns:repeat(7,") == 2 and "repeat(5," not in body


def test_png_report_is_a_drawn_png_of_the_expected_size(records, tmp_path):
    if matplotlib is None:
        skip_unless_required("matplotlib", _NO_MATPLOTLIB)
    path = tmp_path / "report.png"
    render_png(records, path, dpi=50)
    data = path.read_bytes()
    width, height = _png_size(data)
    assert width == 14 * 50
    one = tmp_path / "one.png"
    render_png(records[:1], one, dpi=50)
    assert height > _png_size(one.read_bytes())[1] + 100  # four samples stack below the first
    kinds = _png_chunks(data)
    assert kinds[0] == b"IHDR" and b"IDAT" in kinds and kinds[-1] == b"IEND"
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(path))  # [height, width, 4] in [0, 1]
    assert tuple(pixels.shape) == (height, width, 4)
    rgb = pixels[..., :3]
    drawn_rows = (rgb < 0.8).any(-1).any(-1)
    assert int(drawn_rows.sum()) > height // 3, "mostly blank"
    # The heat colours are there: orange cells (more red than blue), and β's blue bars.
    assert bool(((rgb[..., 0] - rgb[..., 2]) > 0.15).any())
    assert bool(((rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.35)).any())


def test_cli_explain_writes_the_report_and_json(tmp_path, capsys):
    out, png, js = tmp_path / "r.html", tmp_path / "r.png", tmp_path / "r.json"
    args = ["explain", "--batch-size", "3", "--samples", "2", "--out", str(out), "--json", str(js)]
    if matplotlib is not None:
        args += ["--png", str(png)]
    assert main(args) == 0
    doc = read_document(out.read_text(encoding="utf-8"))
    assert [r["sample"] for r in doc["samples"]] == [0, 1]
    assert json.loads(js.read_text(encoding="utf-8")) == doc["samples"]
    assert {m["name"] for r in doc["samples"] for m in r["modalities"]} <= {"title", "description", "image", "category"}
    if matplotlib is not None:
        assert _png_size(png.read_bytes())[0] == 14 * 110
    # The same model and batch, explained here: the values match the report's.
    torch.manual_seed(0)
    model = dm.reference.DM2S2(dm.DM2S2Config.default_ads()).eval()
    batch = ads_batch(3, model.config, seed=0)
    with torch.no_grad():
        ours = explain(model(batch), batch, samples=[0, 1])
    for a, b in zip(ours, doc["samples"]):
        for ma, mb in zip(a["modalities"], b["modalities"]):
            assert ma["beta"] == pytest.approx(mb["beta"], abs=1e-5)
            assert [e["importance"] for e in ma["elements"]] == pytest.approx(
                [e["importance"] for e in mb["elements"]], abs=1e-6)
            assert [e["label"] for e in ma["elements"]] == [e["label"] for e in mb["elements"]]
    assert "top modality" in capsys.readouterr().out


def test_cli_text_needs_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--text needs --bert"):
        main(["explain", "--text", "red shoes", "--out", str(tmp_path / "r.html")])


def test_demo_still_runs(capsys):
    assert main(["demo", "--batch-size", "2", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "parity of the engine" in printed and "ad 1: logit" in printed
