"""The explanation records drawn with matplotlib into one PNG (the ``explain`` extra).

One block per sample, laid out in inches so that text never overlaps: β per modality as bars on the
left; in the middle each text modality as highlighted text (token over α, the colour α relative to
the modality's largest); on the right the image's patch grid as a heat map (a strip if the patch
count is not a square) above the category ids ranked by α.
"""
from __future__ import annotations

import math
import textwrap
import warnings

from . import heat as _heat

WIDTH = 14.0  # inches
MONO_PT = 8.5  # token font size; DejaVu Sans Mono advances 0.602 em per character
CHAR_IN = 0.602 * MONO_PT / 72
TEXT_X0, TEXT_X1 = 3.45, 10.35  # the middle column, inches
TOKEN_ROW_IN, HEADER_IN, TEXT_GAP_IN = 0.43, 0.26, 0.1
RIGHT_X0, RIGHT_W = 10.75, 3.0  # the right column, inches
GRID_CELL_IN, STRIP_IN, CAT_ROW_IN, CAT_LABEL_IN, BLOCK_GAP_IN = 0.3, 0.3, 0.2, 0.9, 0.22
HEAT_CMAP = "Oranges"
BAR_COLOR = "#3b6fb6"
MAX_RANKED = 12
NOTE_CHARS = 235  # legend and notes wrap at this many characters (8.5 pt across 13.4 in)


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"the PNG report needs matplotlib ({exc}): pip install 'dm2s2_fast[explain]'") from exc
    return matplotlib, Figure, FigureCanvasAgg


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _short(a: float) -> str:
    """α in three characters: .07, .25, 1"""
    return "1" if a >= 0.995 else f"{a:.2f}"[1:]


def _grid_side(L: int) -> int:
    """The side of the square patch grid of L patches (7 for the ads images), 0 if not a square."""
    side = math.isqrt(L)
    return side if side * side == L and 1 < side <= 10 else 0


def _wrap(elements: list[dict], chars: int) -> list[list[tuple[float, dict, float]]]:
    """Token cells (x, element, width) in character units, wrapped into rows of ``chars``."""
    rows, row, x = [], [], 0.0
    for e in elements:
        w = max(len(e["label"]), 4) + 1.2
        if row and x + w > chars:
            rows.append(row)
            row, x = [], 0.0
        row.append((x, e, w))
        x += w
    if row:
        rows.append(row)
    return rows


def _layout(record: dict, chars: int) -> dict:
    """What one sample's block holds and its height in inches."""
    texts = [(mod, _wrap(mod["elements"], chars)) for mod in record["modalities"] if mod["kind"] == "tokens"]
    text_h = sum(HEADER_IN + len(rows) * TOKEN_ROW_IN + TEXT_GAP_IN for _, rows in texts)
    dense = [mod for mod in record["modalities"] if mod["kind"] == "dense"]
    cats = [mod for mod in record["modalities"] if mod["kind"] == "categorical"]
    right_h = 0.0
    for mod in dense:
        side = _grid_side(mod["length"])
        right_h += HEADER_IN + (side * GRID_CELL_IN if side else STRIP_IN + 0.2) + BLOCK_GAP_IN
    for mod in cats:
        right_h += HEADER_IN + CAT_ROW_IN * min(mod["length"], MAX_RANKED) + BLOCK_GAP_IN
    beta_h = 0.28 * len(record["modalities"]) + 0.45
    body = max(text_h, right_h, beta_h, 0.6)
    return {"texts": texts, "dense": dense, "cats": cats, "body": body, "height": body + 0.5}


def render(doc: dict, path, dpi: int = 110) -> None:
    matplotlib, Figure, FigureCanvasAgg = _import_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    cmap = matplotlib.colormaps[HEAT_CMAP]
    chars = int((TEXT_X1 - TEXT_X0) / CHAR_IN)
    blocks = [_layout(r, chars) for r in doc["samples"]]
    legend = ("β: a modality's weight in the sample (sums to 1).  α: an element's weight in its modality (sums to 1; "
              "the small numbers).  Colour: the share of its modality's attention an element holds, on a log scale: "
              "white at uniform α = 1/L or less, darkest at α = 1.  Importance = (1+α)/(L+1)·(1+β)/(K+1).")
    lines = [line for text in [legend, *doc.get("notes", [])] for line in textwrap.wrap(text, NOTE_CHARS)]
    title_h = 0.55 + 0.19 * len(lines) + 0.1
    blocks_h = sum(b["height"] for b in blocks)
    height = title_h + blocks_h + 0.2
    fig = Figure(figsize=(WIDTH, height), dpi=dpi)
    FigureCanvasAgg(fig)

    def axes(x0, top, w, h):
        """An axes placed in inches, ``top`` measured down from the figure's top edge."""
        return fig.add_axes((x0 / WIDTH, 1 - (top + h) / height, w / WIDTH, h / height))

    def heat(alpha, L):
        """The cell colour of an α in a modality of L elements, and whether its text should be white."""
        level = _heat(alpha, L)
        return cmap(0.04 + 0.84 * level), level > 0.62

    fig.text(0.3 / WIDTH, 1 - 0.3 / height, doc["title"], fontsize=14, weight="bold", va="center")
    for i, line in enumerate(lines):
        fig.text(0.3 / WIDTH, 1 - (0.6 + 0.19 * i) / height, line, fontsize=8.5, color="#444", va="center")
    top = title_h
    for record, block in zip(doc["samples"], blocks):
        logits = ", ".join(f"{x:+.3f}" for x in record["logits"])
        head = f"sample {record['sample']}  ·  logit {logits}"
        if record["missing"]:
            head += f"  ·  missing: {', '.join(record['missing'])}"
        fig.text(0.3 / WIDTH, 1 - (top + 0.18) / height, head, fontsize=10.5, weight="bold", va="center")
        fig.add_artist(Line2D([0.3 / WIDTH, 1 - 0.3 / WIDTH], [1 - (top + 0.02) / height] * 2,
                                               color="#bbb", lw=0.8))
        body_top = top + 0.4
        if record["empty"]:
            fig.text(0.3 / WIDTH, 1 - (body_top + 0.15) / height, "no elements: every modality is missing",
                     fontsize=9, color="#666", va="center")
            top += block["height"]
            continue

        # β per modality.
        mods = record["modalities"]
        ax = axes(1.35, body_top + 0.2, 1.75, 0.28 * len(mods))
        ax.barh(range(len(mods)), [m["beta"] for m in mods], color=BAR_COLOR, height=0.65)
        ax.set_yticks(range(len(mods)), [m["name"] for m in mods], fontsize=8.5)
        ax.set_ylim(len(mods) - 0.5, -0.5)
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"], fontsize=7)
        for i, m in enumerate(mods):
            ax.text(min(m["beta"], 1) + 0.03 if m["beta"] < 0.72 else m["beta"] - 0.03, i, f"{m['beta']:.2f}",
                    va="center", ha="left" if m["beta"] < 0.72 else "right", fontsize=7.5,
                    color="black" if m["beta"] < 0.72 else "white")
        ax.set_title("β per modality", fontsize=9, loc="left")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

        # Text modalities: highlighted tokens.
        y = body_top
        for mod, rows in block["texts"]:
            L = mod["length"]
            peak = max(e["alpha"] for e in mod["elements"])
            fig.text(TEXT_X0 / WIDTH, 1 - (y + 0.1) / height,
                     f"{mod['name']}  (β {mod['beta']:.2f}; {_count(L, 'token')}; largest α {peak:.2f}, "
                     f"uniform {1 / L:.2f})", fontsize=8.5, weight="bold", va="center")
            y += HEADER_IN
            ax = axes(TEXT_X0, y, TEXT_X1 - TEXT_X0, len(rows) * TOKEN_ROW_IN)
            ax.set_xlim(0, chars)
            ax.set_ylim(len(rows), 0)
            ax.axis("off")
            for r, row in enumerate(rows):
                for x, e, w in row:
                    color, white = heat(e["alpha"], L)
                    ink = "white" if white else "black"
                    ax.add_patch(Rectangle((x, r + 0.06), w - 0.25, 0.88, facecolor=color, edgecolor="#ccc", lw=0.5))
                    ax.text(x + (w - 0.25) / 2, r + 0.38, e["label"], ha="center", va="center", fontsize=MONO_PT,
                            family="monospace", color=ink)
                    ax.text(x + (w - 0.25) / 2, r + 0.77, f"{e['alpha']:.2f}", ha="center", va="center",
                            fontsize=6.3, color=ink)
            y += len(rows) * TOKEN_ROW_IN + TEXT_GAP_IN

        # Right column: image patch grid(s), then category ids ranked by α.
        y = body_top
        for mod in block["dense"]:
            L = mod["length"]
            side = _grid_side(L)
            fig.text(RIGHT_X0 / WIDTH, 1 - (y + 0.1) / height,
                     f"{mod['name']}  (β {mod['beta']:.2f}; {_count(L, 'patch', 'patches')}, α)",
                     fontsize=8.5, weight="bold", va="center")
            y += HEADER_IN
            if side:
                size = side * GRID_CELL_IN
                ax = axes(RIGHT_X0, y, size, size)
                for i, e in enumerate(mod["elements"]):
                    r, c = divmod(i, side)
                    color, white = heat(e["alpha"], L)
                    ax.add_patch(Rectangle((c, r), 1, 1, facecolor=color, edgecolor="#ccc", lw=0.5))
                    ax.text(c + 0.5, r + 0.5, _short(e["alpha"]), ha="center", va="center", fontsize=5.8,
                            color="white" if white else "black")
                ax.set_xlim(0, side)
                ax.set_ylim(side, 0)
                ax.axis("off")
                y += size + BLOCK_GAP_IN
            else:
                ax = axes(RIGHT_X0, y, RIGHT_W, STRIP_IN)
                for i, e in enumerate(mod["elements"]):
                    ax.add_patch(Rectangle((i, 0), 1, 1, facecolor=heat(e["alpha"], L)[0], edgecolor="#ccc", lw=0.3))
                ax.set_xlim(0, L)
                ax.set_ylim(1, 0)
                ax.set_yticks([])
                ticks = sorted({0, L - 1, *range(0, L, max(1, L // 5))})
                ax.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks], fontsize=6.5)
                y += STRIP_IN + 0.2 + BLOCK_GAP_IN
        for mod in block["cats"]:
            L = mod["length"]
            ranked = sorted(mod["elements"], key=lambda e: -e["alpha"])[:MAX_RANKED]
            more = f", top {MAX_RANKED}" if L > MAX_RANKED else ""
            fig.text(RIGHT_X0 / WIDTH, 1 - (y + 0.1) / height,
                     f"{mod['name']}  (β {mod['beta']:.2f}; {_count(L, 'id')} ranked by α{more})",
                     fontsize=8.5, weight="bold", va="center")
            y += HEADER_IN
            n = len(ranked)
            ax = axes(RIGHT_X0 + CAT_LABEL_IN, y, RIGHT_W - CAT_LABEL_IN - 0.35, CAT_ROW_IN * n)
            peak = ranked[0]["alpha"]
            ax.barh(range(n), [e["alpha"] for e in ranked], height=0.72,
                    color=[heat(e["alpha"], L)[0] for e in ranked], edgecolor="#999", lw=0.4)
            ax.set_yticks(range(n), [e["label"] for e in ranked], fontsize=7.5)
            ax.tick_params(axis="y", length=0, pad=3)
            ax.set_ylim(n - 0.5, -0.5)
            ax.set_xlim(0, peak * 1.3)
            ax.set_xticks([])
            for i, e in enumerate(ranked):
                ax.text(e["alpha"] + 0.02 * peak, i, f"{e['alpha']:.2f}", va="center", fontsize=6.5)
            for side_name in ("top", "right", "bottom"):
                ax.spines[side_name].set_visible(False)
            y += CAT_ROW_IN * n + BLOCK_GAP_IN
        top += block["height"]
    with warnings.catch_warnings():  # a token the font lacks (CJK, Tamil...) draws as a box: say so once, not per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=dpi, format="png")
