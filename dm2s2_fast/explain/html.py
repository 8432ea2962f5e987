"""The explanation records as one self-contained HTML page (standard library only).

The page embeds its data: ``<script type="application/json" id="dm2s2-explain">`` holds the
document (``dm2s2_fast.explain.document``), so a reader — or a test — can parse back exactly what
was drawn.
"""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from . import heat

DATA_ID = "dm2s2-explain"
HEAT = (217, 72, 1)  # α heat: this colour at the opacity ``heat(α, L)`` (0 at uniform α, 1 at all of it)
BAR = "#3b6fb6"  # β bars
MAX_RANKED = 15  # categorical ids listed per segment (the rest counted)

HOW_TO_READ = (
    "β (InterMRA) is how much a sample's pooled vector leans on each present modality (the β of a "
    "sample sum to 1). α (IntraMRA) is how much attention each element gets inside its modality (the α "
    "of a modality sum to 1; 1/L is uniform). Importance is an element's share of the pooled vector, "
    "(1+α)/(L+1) · (1+β)/(K+1): the importances of a sample sum to 1. The colour of a token, patch or id "
    "shows how much of its modality's attention it holds, on a log scale: none at uniform α (1/L) or "
    "below, darkest when α is 1; the small number under a token is its α, and hovering an element shows "
    "its exact α and importance. The weights of an untrained model mean nothing.")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em auto;max-width:72em;
     color:#222;line-height:1.35;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin:0 0 .3em} h3{font-size:.95em;margin:.6em 0 .25em}
h3 small,.muted{color:#666;font-weight:normal}
.how{color:#444;font-size:.9em;max-width:60em}
.sample{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
.row{display:flex;gap:2em;flex-wrap:wrap} .beta{flex:0 0 19em} .detail{flex:1 1 30em;min-width:0}
.beta table{border-collapse:collapse;width:100%} .beta td{padding:.15em .3em;font-size:.9em;white-space:nowrap}
.bar{background:#e8edf5;width:9em;height:.9em;position:relative}
.bar span{position:absolute;left:0;top:0;bottom:0;background:""" + BAR + """}
.strip{display:flex;flex-wrap:wrap;gap:2px}
.el{display:inline-flex;flex-direction:column;align-items:center;padding:.1em .3em;border:1px solid #eee;
    border-radius:3px;min-width:1.6em}
.el b{font-weight:500;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
.el i{font-style:normal;font-size:.7em;color:#333} .el.dark,.el.dark i{color:#fff}
.grid{display:grid;gap:2px} .grid .el{min-width:0;padding:.25em 0}
.ranked{border-collapse:collapse;font-size:.9em} .ranked td,.ranked th{padding:.1em .5em;text-align:left}
.ranked th{font-weight:500;color:#555;border-bottom:1px solid #ddd}
.top{font-size:.9em;margin:.2em 0 .6em}
"""


def render(doc: dict, path=None) -> str:
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(doc['title'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(doc['title'])}</h1>", f'<p class="how">{escape(HOW_TO_READ)}</p>']
    for note in doc.get("notes", []):
        parts.append(f'<p class="how">{escape(note)}</p>')
    for record in doc["samples"]:
        parts.append(_sample(record))
    data = json.dumps(doc, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="{DATA_ID}">{data}</script>')
    parts.append("</body></html>")
    text = "\n".join(parts) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def read_document(text: str) -> dict:
    """The document embedded in a page written by ``render`` (its inverse, for readers and tests)."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = text.index(start_tag) + len(start_tag)
    return json.loads(text[start:text.index("</script>", start)])


def _sample(record: dict) -> str:
    b = record["sample"]
    logits = ", ".join(f"{x:+.3f}" for x in record["logits"])
    out = [f'<section class="sample" id="sample-{b}" data-sample="{b}">',
           f'<h2>Sample {b} <span class="muted">· logit{"s" if len(record["logits"]) > 1 else ""} {logits}</span></h2>']
    if record["empty"]:
        out.append('<p class="muted">No elements: every modality is missing, so there is nothing to weigh.</p>')
        return "\n".join(out + ["</section>"])
    flat = sorted(((e["importance"], mod["name"], e) for mod in record["modalities"] for e in mod["elements"]),
                  key=lambda t: -t[0])[:3]
    top = "; ".join(f"{escape(name)} <b>{escape(e['label'])}</b> {imp:.3f}" for imp, name, e in flat)
    out.append(f'<p class="top">Most important elements: {top}</p>')
    out.append('<div class="row"><div class="beta"><h3>β per modality</h3><table>')
    for mod in record["modalities"]:
        out.append(f'<tr><td>{escape(mod["name"])}</td><td><div class="bar"><span style="width:{100 * mod["beta"]:.1f}%">'
                   f'</span></div></td><td>{mod["beta"]:.3f}</td></tr>')
    out.append("</table>")
    if record["missing"]:
        out.append(f'<p class="muted">missing: {escape(", ".join(record["missing"]))}</p>')
    out.append('</div><div class="detail">')
    for mod in record["modalities"]:
        out.append(_modality(mod))
    out.append("</div></div></section>")
    return "\n".join(out)


def _background(alpha: float, L: int) -> str:
    return f"background:rgba({HEAT[0]},{HEAT[1]},{HEAT[2]},{0.9 * heat(alpha, L):.3f})"


def _tip(element: dict) -> str:
    tip = f'α {element["alpha"]:.4f} · importance {element["importance"]:.4f} · position {element["position"]}'
    if "id" in element:
        tip += f' · id {element["id"]}'
    return escape(tip)


def _cell(element: dict, L: int, text: str | None = None) -> str:
    alpha = element["alpha"]
    label = escape(element["label"] if text is None else text)
    white = heat(alpha, L) > 0.6
    return (f'<span class="el{" dark" if white else ""}" style="{_background(alpha, L)}" title="{_tip(element)}">'
            f'<b>{label}</b><i>{alpha:.2f}</i></span>')


def _modality(mod: dict) -> str:
    elements, L = mod["elements"], mod["length"]
    peak = max(e["alpha"] for e in elements)
    head = (f'<h3>{escape(mod["name"])} <small>· {mod["kind"]} · β {mod["beta"]:.3f} · {L} element'
            f'{"s" if L != 1 else ""} · largest α {peak:.3f} (uniform {1 / L:.3f})</small></h3>')
    if mod["kind"] == "categorical":
        ranked = sorted(elements, key=lambda e: -e["alpha"])
        named = any(e["label"] != str(e["id"]) for e in elements)
        rows = ['<table class="ranked"><tr><th>rank</th>' + ("<th>id</th><th>label</th>" if named else "<th>id</th>")
                + "<th>α</th><th>importance</th></tr>"]
        for rank, e in enumerate(ranked[:MAX_RANKED], 1):
            cells = (f'<td>{e["id"]}</td><td style="{_background(e["alpha"], L)}">{escape(e["label"])}</td>' if named
                     else f'<td style="{_background(e["alpha"], L)}">{e["id"]}</td>')
            rows.append(f'<tr title="{_tip(e)}"><td>{rank}</td>{cells}<td>{e["alpha"]:.3f}</td><td>{e["importance"]:.4f}</td></tr>')
        rows.append("</table>")
        if L > MAX_RANKED:
            rows.append(f'<p class="muted">… and {L - MAX_RANKED} more</p>')
        return head + "\n" + "\n".join(rows)
    if mod["kind"] == "dense":
        side = math.isqrt(L)
        if side * side == L and side > 1:  # a square patch grid (7×7 for the ads images), row-major
            cells = "".join(_cell(e, L, text="") for e in elements)
            return (head + f'\n<div class="grid" style="grid-template-columns:repeat({side},2.4em)">{cells}</div>'
                    f'<p class="muted">{side}×{side} patches, row-major; the number is α</p>')
        return head + '\n<div class="strip">' + "".join(_cell(e, L) for e in elements) + "</div>"
    return head + '\n<div class="strip">' + "".join(_cell(e, L) for e in elements) + "</div>"
