#!/usr/bin/env python3
"""Where one forward's time goes: torch.profiler over the engine on an `ads` batch (docs/workloads.md).

For each backend and batch size: the host time of a forward (wall, after warm-up, synchronized),
the summed device time of its kernels and the launches per forward, then the profiler's table of
the ops and kernels by self device time (CUDA) or self CPU time. The benchmarks say how fast; this
says which kernel or which host step to work on next (e.g. Triton eager: host-bound at every B?).

    python bench/profile_model.py --device cuda --backends triton,cuda,auto+graphs --sizes 1,256 --out profile.json

A backend named ``<name>+graphs`` runs with ``cuda_graphs=True`` and ``graph_max_rows=None`` (every
size replays), to see what a replay costs beyond its kernels; ``<name>+fastlaunch`` with
``tuning=Tuning(triton_fast_launch=True)`` (Triton launches through ``FastLaunch``'s cache).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dm2s2_fast import DM2S2Config, Tuning, convert  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402
from dm2s2_fast.workloads import ads_batch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_one(engine, batch, device: torch.device, iters: int, rows: int) -> dict:
    for _ in range(3):  # compiles, autotuning, allocator warm-up
        engine(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        engine(batch)
    _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            engine(batch)
        _sync(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    kernels = [e for e in events if on_device and e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in kernels) / iters
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]
    sort_by = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    return {
        "wall_ms": round(wall_ms, 4),
        "device_ms": round(device_us / 1e3, 4) if on_device else None,
        "launches": sum(e.count for e in kernels) / iters if on_device else None,
        "kernels": [{"name": e.key[:120], "calls": e.count / iters,
                     "us_per_forward": round(e.self_device_time_total / iters, 2)} for e in top],
        "table": events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=70),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--backends", default="triton,cuda", help="comma list of engine backends, each may end in +graphs")
    ap.add_argument("--sizes", default="1,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25, help="rows of each table")
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = DM2S2Config.default_ads()
    torch.manual_seed(0)
    model = DM2S2(config).eval().to(device=device, dtype=dtype)
    results = []
    for B in (int(x) for x in args.sizes.split(",")):
        batch = ads_batch(B, config, seed=B).to(device)  # fp32 features: the engine casts them
        for name in args.backends.split(","):
            backend, *flags = name.split("+")
            unknown = sorted(set(flags) - {"graphs", "fastlaunch"})
            if unknown:
                ap.error(f"backend {name!r}: unknown flags {unknown} (known: +graphs, +fastlaunch)")
            options = {"cuda_graphs": True, "graph_max_rows": None} if "graphs" in flags else {}
            if "fastlaunch" in flags:
                options["tuning"] = Tuning(triton_fast_launch=True)
            result = profile_one(convert(model, backend, **options), batch, device, args.iters, args.rows)
            print(f"\n## backend {name}, B={B} ({batch.num_elements} rows): host {result['wall_ms']:.3f} ms a "
                  f"forward, kernels {result['device_ms']} ms, launches {result['launches']}")
            print(result.pop("table"))
            results.append({"backend": name, "B": B, "rows": batch.num_elements, **result})
    Path(args.out).write_text(json.dumps({"device": str(device), "dtype": str(dtype), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
