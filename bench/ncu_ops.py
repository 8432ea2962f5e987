#!/usr/bin/env python3
"""The kernels whose H200 times missed their predictions, once each, for Nsight Compute.

Run under ``ncu --profile-from-start off``: every case is warmed up (Triton compiles, cuBLAS picks
its kernels) outside the profiled range, then run once inside ``cudaProfilerStart/Stop``, so the
report holds exactly one launch per kernel of each case. Cases (ads B=256, bf16, shapes of
``bench/gpu_ops.py``): set_attention on triton and on cuda (its default tile and, under
``Tuning(cuda_attention="group")``, the whole-group kernel), intra_mra on triton and cuda, and the
triton linear ops (cuBLAS + the Triton epilogue kernel: two launches each). A case's ``Tuning`` is
current (``with tuning.active():``) for its warm-up and for its profiled call.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python bench/ncu_ops.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ops import Workload, log, make_cases  # noqa: E402 - puts the repository root on sys.path

from dm2s2_fast import Tuning  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("ncu_ops.py: no CUDA device")
        return 1
    from dm2s2_fast import dispatch

    dev, dt = torch.device("cuda"), torch.bfloat16
    w = Workload(256, dev)
    cases = make_cases(w, dt, dev)
    g = torch.Generator(device=dev).manual_seed(7)
    x, x_ffn = (torch.randn(w.N, k, generator=g, device=dev).to(dt) for k in (384, 1536))
    w_up, w_out, w_down = (torch.randn(n, k, generator=g, device=dev).to(dt) * k ** -0.5
                           for n, k in ((1536, 384), (384, 384), (384, 1536)))
    b_up, b_down, res = torch.randn(1536, device=dev).to(dt), torch.randn(384, device=dev).to(dt), x.clone()
    ones, zeros = torch.ones(384, device=dev, dtype=dt), torch.zeros(384, device=dev, dtype=dt)

    default, group = Tuning(), Tuning(cuda_attention="group")
    runs = []  # (label, backend, op, args, tuning)
    for backend, tuning, tag in (("triton", default, ""), ("cuda", default, ""), ("cuda", group, "[group]")):
        runs.append((f"set_attention/{backend}{tag}", backend, "set_attention", cases["set_attention"]["args"], tuning))
    for backend in ("triton", "cuda"):
        runs.append((f"intra_mra/{backend}", backend, "intra_mra", cases["intra_mra"]["args"], default))
    runs.append(("linear_bias_gelu/triton up", "triton", "linear_bias_gelu", (x, w_up, b_up), default))
    runs.append(("linear_add_layernorm/triton 384", "triton", "linear_add_layernorm",
                 (x, w_out, b_down, res, ones, zeros, 1e-12), default))
    runs.append(("linear_add_layernorm/triton 1536", "triton", "linear_add_layernorm",
                 (x_ffn, w_down, b_down, res, ones, zeros, 1e-12), default))

    ready = []
    for label, backend, op, args, tuning in runs:
        try:
            with tuning.active():
                fn = dispatch.resolve(op, backend, dev, args)[1]
                for _ in range(3):
                    fn(*args)
                torch.cuda.synchronize()
            ready.append((label, fn, args, tuning))
        except Exception as exc:  # noqa: BLE001 - report and profile the rest
            log(f"{label}: skipped ({type(exc).__name__}: {exc})")
    for label, fn, args, tuning in ready:
        log(f"profiling {label}")
        with tuning.active():
            torch.cuda.cudart().cudaProfilerStart()
            fn(*args)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
