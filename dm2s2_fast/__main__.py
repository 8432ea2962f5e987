"""``python -m dm2s2_fast demo | info | bench``."""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import backends
from .config import DM2S2Config
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


def demo(args) -> int:
    torch.manual_seed(args.seed)
    config = DM2S2Config.default_ads()
    model = DM2S2(config).eval()
    batch = ads_batch(args.batch_size, config, seed=args.seed)
    layout = batch.layout
    engine = convert(model, args.backend)
    packed, padded = layout.num_elements, padded_tokens(batch)
    print(f"DM²S² demo — ads workload (DESIGN §6), B={args.batch_size}, seed {args.seed}; "
          f"d={config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, "
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

    importance = out.element_importance()
    names = [m.name for m in config.modalities]
    print("\nwhat InterMRA (β, per modality) and IntraMRA (α, per element) weighted most:")
    for b in range(min(3, args.batch_size)):
        segs = (out.segment_sample == b).nonzero().flatten()
        if segs.numel() == 0:
            print(f"  ad {b}: no elements")
            continue
        top_seg = segs[out.inter_weights[segs].argmax()]
        elements = (out.element_sample == b).nonzero().flatten()
        best = elements[importance[elements].topk(min(3, elements.numel())).indices]
        described = ", ".join(
            f"{names[int(out.element_modality[i])]}[{int(out.element_position[i])}] "
            f"({float(importance[i]):.4f})" for i in best)
        print(f"  ad {b}: logit {float(out.logits[b, 0]):+.4f}; top modality "
              f"{names[int(out.segment_modality[top_seg])]} (β={float(out.inter_weights[top_seg]):.3f} "
              f"of {segs.numel()}); top elements {described}")
    return 0


def info(_args) -> int:
    print(f"dm2s2_fast on Python {platform.python_version()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}\n")
    print("| backend | cpu | cuda |")
    print("|---|---|---|")
    for name, per_device in backends.availability().items():
        cells = ["available" if r is None else f"no: {r}" for r in per_device.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nauto picks, per op:")
    for device, graphs, label in (("cpu", False, "cpu"), ("cuda", False, "cuda"),
                                  ("cuda", True, "cuda, cuda_graphs=True")):
        picks = []
        for op in backends.OPS:
            try:
                picks.append(f"{op}={backends.resolve(op, 'auto', device, graphs=graphs)[0]}")
            except backends.BackendUnavailable:
                picks.append(f"{op}=none")
        if device == "cuda" and not torch.cuda.is_available():
            picks = ["(no CUDA device)"]
        print(f"  {label}: " + ", ".join(picks))
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
    p = sub.add_parser("demo", help="parity, latency and MRA weights on the seeded ads batch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    p = sub.add_parser("info", help="backends, available or not and why")
    p.set_defaults(fn=info)
    p = sub.add_parser("bench", help="run the benchmark suite (bench/report.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
