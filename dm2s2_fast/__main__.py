"""``python -m dm2s2_fast demo | explain | info | bench``."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import dispatch
from .config import DM2S2Config
from .data import SequenceSet
from .engine import convert
from .reference import DM2S2
from .workloads import ads_batch, padded_tokens


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and library loads stay out of the numbers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def _check_text_options(args) -> None:
    if args.text and not args.bert:
        raise SystemExit("--text needs --bert PATH: the text is tokenized with that checkpoint's tokenizer")
    if args.description and not args.text:
        raise SystemExit("--description goes with --text (one sample per --text)")
    if len(args.description) > len(args.text):
        raise SystemExit(f"{len(args.description)} --description for {len(args.text)} --text samples")


def _model(args) -> tuple[DM2S2, object]:
    """The demo's model: the ads config with seeded random weights, the encoder (and the tokenizer)
    from ``--bert`` where given."""
    _check_text_options(args)
    torch.manual_seed(args.seed)
    model = DM2S2(DM2S2Config.default_ads()).eval()
    tokenizer = None
    if args.bert:
        from .explain import load_tokenizer

        model.load_bert(args.bert)
        tokenizer = load_tokenizer(args.bert)
    return model, tokenizer


def _batch(args, config: DM2S2Config, tokenizer) -> tuple[SequenceSet, str]:
    """``--text`` samples (titles, with ``--description``s in the same order) tokenized with the
    checkpoint's tokenizer, else the seeded ads batch; and a description of it."""
    if not args.text:
        return (ads_batch(args.batch_size, config, seed=args.seed),
                f"ads workload (docs/workloads.md), B={args.batch_size}, seed {args.seed}")

    def ids(text):
        return tokenizer(text, truncation=True, max_length=config.max_positions)["input_ids"]

    samples = [{"title": ids(text)} for text in args.text]
    for sample, text in zip(samples, args.description):
        sample["description"] = ids(text)
    return SequenceSet.from_samples(config, samples), f"{len(samples)} --text sample(s), B={len(samples)}"


def _what_weighted(records: list[dict]) -> list[str]:
    from .explain import top_elements, top_modality

    lines = []
    for record in records:
        b = record["sample"]
        if record["empty"]:
            lines.append(f"  ad {b}: no elements")
            continue
        best = next(mod for mod in record["modalities"] if mod["name"] == top_modality(record))
        described = ", ".join(f"{e['modality']}[{e['position']}] {e['label']!r} ({e['importance']:.4f})"
                              for e in top_elements(record, 3))
        lines.append(f"  ad {b}: logit {record['logits'][0]:+.4f}; top modality {best['name']} "
                     f"(β={best['beta']:.3f} of {len(record['modalities'])}); top elements {described}")
    return lines


def demo(args) -> int:
    model, tokenizer = _model(args)
    config = model.config
    batch, described = _batch(args, config, tokenizer)
    args.batch_size = batch.batch_size
    layout = batch.layout
    engine = convert(model, args.backend)
    packed, padded = layout.num_elements, padded_tokens(batch)
    encoder = f"encoder from {args.bert}" if args.bert else "random weights"
    print(f"DM²S² demo — {described}; "
          f"d={config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, {encoder}, "
          f"{torch.get_num_threads()} threads")
    print(f"tokens: {packed} packed, {padded} padded to the longest sample "
          f"({padded / max(packed, 1):.2f}x); {layout.num_segments} segments, "
          f"{int(layout.empty_samples.sum())} empty samples\n")

    out = engine(batch)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(batch)
    used = sorted(set(engine.last_backends.values()))
    print(f"parity of the engine (backends used: {', '.join(used)}) vs the fp64 reference, "
          f"‖out−ref‖/‖ref‖, fp32 bound 1e-5:")
    for field in ("logits", "pooled", "hidden", "intra_weights", "inter_weights"):
        print(f"  {field:14s} {_rel(getattr(out, field), getattr(oracle, field)):.2e}")

    rows = []
    with torch.no_grad():  # the padded reference is the slow one: fewer repeats keep the demo short
        rows.append(("reference (padded)", _median_ms(lambda: model(batch), min(3, args.repeats))))
    rows.append((f"engine, backend={args.backend} ({'+'.join(used)})",
                 _median_ms(lambda: engine(batch), args.repeats)))
    if used != ["torch"]:
        fallback = convert(model, "torch")
        rows.append(("engine, backend=torch", _median_ms(lambda: fallback(batch), args.repeats)))
    print(f"\nlatency, median of repeats (reference {min(3, args.repeats)}, engine {args.repeats}) "
          f"after one warm-up:")
    print("| provider | median ms | packed tokens/s | speed-up vs reference |")
    print("|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {packed / ms * 1e3:,.0f} | {rows[0][1] / ms:.2f}x |")

    from .explain import explain

    print("\nwhat InterMRA (β, per modality) and IntraMRA (α, per element) weighted most "
          "(untrained MRA weights: the mechanics, not evidence; docs/explain.md):")
    records = explain(out, batch, tokenizer, samples=range(min(3, args.batch_size)))
    print("\n".join(_what_weighted(records)))
    return 0


def explain_command(args) -> int:
    from .explain import explain, render_html, render_png

    model, tokenizer = _model(args)
    batch, described = _batch(args, model.config, tokenizer)
    engine = convert(model, args.backend)
    out = engine(batch)
    count = batch.batch_size if args.text else min(args.samples, batch.batch_size)
    records = explain(out, batch, tokenizer, samples=range(count))
    encoder = f"the encoder of {args.bert}" if args.bert else "a random encoder"
    notes = [f"{described}; {count} sample(s) shown. Model: the ads config with {encoder}; "
             f"IntraMRA, InterMRA and head untrained (seed {args.seed}), so these weights show the "
             f"mechanics, not learned evidence. Backend {args.backend} "
             f"({'+'.join(sorted(set(engine.last_backends.values())))})."]
    title = f"DM²S² explanations — {described}"
    render_html(records, args.out, title=title, notes=notes)
    print(f"wrote {args.out} ({count} samples)")
    if args.png:
        try:
            render_png(records, args.png, title=title, notes=notes)
        except ImportError as exc:
            print(f"no PNG: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    print("\n".join(_what_weighted(records)))
    return 0


def info(_args) -> int:
    print(f"dm2s2_fast on Python {platform.python_version()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}\n")
    print("| backend | cpu | cuda |")
    print("|---|---|---|")
    for name, per_device in dispatch.availability().items():
        cells = ["available" if r is None else f"no: {r}" for r in per_device.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nauto picks, per op:")
    for device, graphs, label in (("cpu", False, "cpu"), ("cuda", False, "cuda"),
                                  ("cuda", True, "cuda, cuda_graphs=True")):
        picks = []
        for op in dispatch.OPS:
            try:
                picks.append(f"{op}={dispatch.resolve(op, 'auto', device, graphs=graphs)[0]}")
            except dispatch.BackendUnavailable:
                picks.append(f"{op}=none")
        if device == "cuda" and not torch.cuda.is_available():
            picks = ["(no CUDA device)"]
        print(f"  {label}: " + ", ".join(picks))
    if dispatch.availability()["cpp"]["cpu"] is None:  # the ISA found and the cpp kernel per op
        from .backends import cpp as cpp_backend

        ads = DM2S2Config.default_ads()
        d, inner, mra, head = ads.hidden_size, ads.intermediate_size, ads.mra_dim, ads.classifier_dim
        print("\n" + "\n".join(cpp_backend.describe(shapes=(
            ("linear", d, 3 * d), ("linear_add_layernorm", d, d), ("linear_bias_gelu", d, inner),
            ("linear_add_layernorm", inner, d), ("linear_bias_gelu", d, head)))))
        print(f"  (GEMM libraries above: timed now for the ads model's linear layers; mra score width {mra})")
    return 0


def bench(args) -> int:
    report = Path(__file__).resolve().parent.parent / "bench" / "report.py"
    if not report.exists():
        print("the benchmark suite lives in the source tree (bench/report.py); run from a clone",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(report), *args.rest], cwd=report.parent.parent)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dm2s2_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p, batch_size: int) -> None:
        p.add_argument("--bert", metavar="PATH", help="load the encoder (and tokenizer) from this Hugging Face "
                       "BERT checkpoint directory (the all-MiniLM-L6 shape: hidden 384, 6 layers, 12 heads)")
        p.add_argument("--text", action="append", default=[], metavar="TEXT",
                       help="a sample's title, tokenized with --bert's tokenizer (repeat for more samples; "
                            "replaces the seeded ads batch)")
        p.add_argument("--description", action="append", default=[], metavar="TEXT",
                       help="the description of the n-th --text sample (optional, repeatable)")
        p.add_argument("--batch-size", type=int, default=batch_size, help="ads batch size (without --text)")
        p.add_argument("--backend", default="auto")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="parity, latency and MRA weights on the seeded ads batch (or --text)")
    model_options(p, 64)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(fn=demo)
    p = sub.add_parser("explain", help="α/β report of a batch: HTML (and --png, --json)")
    model_options(p, 16)
    p.add_argument("--samples", type=int, default=4, help="ads samples shown (every --text sample is)")
    p.add_argument("--out", default="dm2s2_explain.html", help="the HTML report (default %(default)s)")
    p.add_argument("--png", metavar="PATH", help="also draw the report as a PNG (needs matplotlib)")
    p.add_argument("--json", metavar="PATH", help="also write the explanation records as JSON")
    p.set_defaults(fn=explain_command)
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository (--serve: run it)")
    from .serving.triton import cli as triton_cli  # argparse only: the servers import lazily
    triton_cli.build_parser(p)
    p.set_defaults(fn=triton_cli.run)
    p = sub.add_parser("info", help="backends, available or not and why")
    p.set_defaults(fn=info)
    p = sub.add_parser("bench", help="run the benchmark suite (bench/report.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
