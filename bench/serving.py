#!/usr/bin/env python3
"""Request latency as a ranking service sees it: host tensors in, scores on the host out.

Each request is a different `ads` batch (docs/workloads.md; a pool of seeded batches per size, taken in
turn): ``SequenceSet.from_jagged`` (validation) -> ``.to(device)`` (the packing plan and its copy) ->
the engine -> ``logits.cpu()``. The pytest-benchmark suite times the forward on one prepared batch;
this adds what every real request also pays, and on CUDA it shows what ``cuda_graphs=True`` buys
once the batch shapes vary: the first batch of each bucket is a capture, the rest replays.

Providers: ``eager`` (FastDM2S2 backend auto) and, on CUDA, ``graphs/<k>`` (the same with
cuda_graphs=True, bucket_steps=k: row buckets k per octave) — plus ``--backends`` to time others. Warm-up: every batch of the pool runs once
(captures happen there), then ``--requests`` timed requests.

    python bench/serving.py --device cuda --out serving.json [--sizes 1,16,64,256] [--requests 60]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dm2s2_fast import DM2S2Config, SequenceSet, convert  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402
from dm2s2_fast.workloads import ads_batch  # noqa: E402


def host_requests(config: DM2S2Config, B: int, pool: int, dtype: torch.dtype) -> list[dict]:
    """``pool`` different batches of size B as ``{name: (values, lengths)}`` host tensors."""
    requests = []
    for seed in range(pool):
        batch = ads_batch(B, config, seed=1000 * B + seed)
        jagged = {}
        for modality in config.modalities:
            values = batch.values[modality.name]
            if values.is_floating_point():
                values = values.to(dtype)
            jagged[modality.name] = (values, batch.lengths[modality.name])
        requests.append(jagged)
    return requests


def serve(engine, config: DM2S2Config, jagged: dict, device: torch.device) -> torch.Tensor:
    batch = SequenceSet.from_jagged(config, jagged).to(device, non_blocking=True)
    return engine(batch).logits.cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--sizes", default="1,16,64,256")
    ap.add_argument("--pool", type=int, default=8, help="different batches per size")
    ap.add_argument("--requests", type=int, default=60, help="timed requests per size and provider")
    ap.add_argument("--backends", default="auto", help="comma list of engine backends, each eager (+graphs on CUDA)")
    ap.add_argument("--bucket-steps", default="4,8", help="comma list: one graphs provider per bucket_steps")
    ap.add_argument("--out", default="serving.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("serving.py: no CUDA device")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = DM2S2Config.default_ads()
    torch.manual_seed(0)
    model = DM2S2(config).eval().to(device=device, dtype=dtype)
    providers = {}
    for name in args.backends.split(","):
        providers[f"{name} eager"] = convert(model, name)
        if device.type == "cuda":
            for steps in (int(x) for x in args.bucket_steps.split(",")):
                providers[f"{name} graphs/{steps}"] = convert(model, name, cuda_graphs=True, bucket_steps=steps)
    results = []
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"pool {args.pool} batches per size, {args.requests} timed requests")
    print("| B | provider | median ms | p90 ms | graph captures / replays |\n|---:|---|---:|---:|---|")
    for B in (int(s) for s in args.sizes.split(",")):
        requests = host_requests(config, B, args.pool, dtype)
        reference = None
        for label, engine in providers.items():
            for jagged in requests:  # warm-up: Triton compiles, every bucket captured
                serve(engine, config, jagged, device)
            first = serve(engine, config, requests[0], device).float()
            if reference is None:
                reference = first
            err = float((first - reference).norm() / reference.norm().clamp_min(1e-30))
            times = []
            for i in range(args.requests):
                start = time.perf_counter()
                serve(engine, config, requests[i % len(requests)], device)
                times.append((time.perf_counter() - start) * 1e3)
            times.sort()
            stats = dict(engine.graphs.stats) if engine.graphs is not None else None
            row = dict(B=B, provider=label, median_ms=statistics.median(times),
                       p90_ms=times[int(0.9 * (len(times) - 1))], logits_rel_diff=err, graphs=stats)
            results.append(row)
            graph_counts = "-" if stats is None else f"{stats['captures']} / {stats['replays']}"
            print(f"| {B} | {label} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} | {graph_counts} |", flush=True)
            if err > 2e-2:
                print(f"  WARNING: {label} logits differ from the first provider's by {err:.2e}")
    with open(args.out, "w") as f:
        json.dump(dict(device=str(device), dtype=str(dtype), torch=torch.__version__, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
