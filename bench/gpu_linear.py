#!/usr/bin/env python3
"""GEMM + BERT epilogue on the GPU: cuBLAS alone, the composed forms, and the fused Triton kernels.

Shapes: DESIGN §6 `ads` at B=256 (N=26417 packed rows), d=384, FFN 1536:
  ffn_up    linear_bias_gelu      K=384  -> F=1536
  attn_out  linear_add_layernorm  K=384  -> d=384
  ffn_down  linear_add_layernorm  K=1536 -> d=384
Per shape, each entry is first checked against the torch kernel run in fp64 (‖out−ref‖/‖ref‖,
bound as DESIGN §5: 2x the torch kernel's own error in this dtype, <= 2e-2; fp32 1e-5), then timed
with bench/gpu_ops.py's graph_ms (CUDA-graph replay: GPU time, as the engine runs) and bench_ms
(eager: host launch cost included):
  cublas          F.linear as the composed form calls it (the floor for the GEMM; not checked)
  triton          DM2S2_TRITON_LINEAR=composed: F.linear + the Triton epilogue kernel
  cuda            F.linear + the torch.ops.dm2s2_fast CUDA epilogue (when the cuda backend loads)
  fused           DM2S2_TRITON_LINEAR=fused: the fused kernel at its built-in config
  fused[M,N,K,w,s] the fused kernel at an alternative config (linear_add_layernorm ignores N)
The table gives graph µs (eager where a graph could not be captured, marked *), x the cuBLAS-alone
time, eager µs and the parity error; the JSON (--out) adds registers and spills of every fused
kernel compiled (from Triton's cache of compiled kernels, where this Triton exposes them).

    python bench/gpu_linear.py --out gpu_linear.json [--batch 256] [--dtype bf16] [--budget 35]
    python bench/gpu_linear.py --smoke   # no GPU: Triton's interpreter on tiny shapes, CPU wall
                                         # clock; exercises the code paths, times nothing useful

The main entries of every shape run first; alternative configs follow until --budget seconds
have passed (the rest are reported as skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from gpu_ops import DTYPES, ads_lengths, bench_ms, graph_ms, log, rel_err  # noqa: E402

ENV = "DM2S2_TRITON_LINEAR"
D_MODEL, FFN = 384, 1536
# (case, op, K, out width)
CASES = [("ffn_up", "linear_bias_gelu", D_MODEL, FFN), ("attn_out", "linear_add_layernorm", D_MODEL, D_MODEL),
         ("ffn_down", "linear_add_layernorm", FFN, D_MODEL)]
SMOKE_CASES = [("ffn_up", "linear_bias_gelu", 64, 96), ("attn_out", "linear_add_layernorm", 64, 48),
               ("ffn_down", "linear_add_layernorm", 96, 48)]
# Alternatives to the built-in bf16 configs (gelu 128,128,64,8,3; layernorm 32,512,32,8,3). ptxas
# (sm_90) registers / spill bytes with Triton 3.6 (the GPU machine's, pinned by torch 2.11) and
# 3.9: every gelu entry is spill-free under both (109-151 registers); layernorm 64,512,32,16,3:
# 3.6 128/0, 3.9 128/52; 64,512,32,8,3 (the default until 2026-11-30): 3.6 255/48, 3.9 255/0;
# 32,512,64,8,3: 184/0 under both. linear_add_layernorm ignores BLOCK_N.
ALTERNATIVES = {
    "linear_bias_gelu": ["128,128,64,8,4", "128,128,32,8,4", "64,256,64,8,3", "128,64,64,4,3"],
    "linear_add_layernorm": ["64,512,32,16,3", "64,512,32,8,3", "32,512,64,8,3"],
}


@contextlib.contextmanager
def linear_mode(spec: str | None):
    """DM2S2_TRITON_LINEAR=spec for the duration (read at every call, so timing runs inside)."""
    before = os.environ.get(ENV)
    if spec is not None:
        os.environ[ENV] = spec
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def make_args(op: str, n: int, k: int, width: int, dtype: torch.dtype, dev) -> tuple:
    g = torch.Generator(device=dev).manual_seed(1234)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dtype)

    x, w, b = rn(n, k), rn(width, k, scale=k ** -0.5), rn(width, scale=0.5)
    if op == "linear_bias_gelu":
        return x, w, b
    return x, w, b, rn(n, width, scale=2.0), rn(width, scale=0.2) + 1, rn(width, scale=0.2), 1e-12


def to64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def cpu_ms(fn, reps: int = 3) -> float:
    """--smoke's stand-in for bench_ms: median wall time of a few calls."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main_entries(op: str, args: tuple, dev):
    """(label, backend or None for the GEMM alone, DM2S2_TRITON_LINEAR value) of one case's entries."""
    from dm2s2_fast import backends

    out = [("cublas" if dev.type == "cuda" else "F.linear", None, None), ("triton", "triton", "composed")]
    if backends.why_not("cuda", op, dev, args) is None:
        out.append(("cuda", "cuda", None))
    return out + [("fused", "triton", "fused")]


def gemm_alone(op: str, args: tuple):
    x, w, b = args[:3]
    if op == "linear_bias_gelu":
        return lambda: F.linear(x, w)  # the composed form's GEMM: the bias goes to the epilogue
    return lambda: F.linear(x, w, b)


def prepare(case, op, k, width, n, dtype, dev) -> dict:
    """A case's inputs, its fp64 reference and the parity bound."""
    from dm2s2_fast import backends

    args = make_args(op, n, k, width, dtype, dev)
    torch_fn = backends.resolve(op, "torch", dev, args)[1]
    ref64 = torch_fn(*to64(args))
    own_err = rel_err(torch_fn(*args), ref64) if dtype != torch.float32 else 0.0
    tol = 1e-5 if dtype == torch.float32 else min(2e-2, max(2 * own_err, 1e-5))
    return dict(case=case, op=op, N=n, K=k, out=width, dtype=str(dtype)[6:], args=args, ref64=ref64, tol=tol,
                torch_dtype_err=own_err)


def run_entry(ctx: dict, label: str, backend, spec, dev, smoke: bool) -> dict:
    """Check one entry against the fp64 reference, then time it."""
    from dm2s2_fast import backends

    entry = {key: ctx[key] for key in ("case", "op", "N", "K", "out", "dtype", "tol", "torch_dtype_err")}
    entry.update(label=label, env=spec)
    args = ctx["args"]
    try:
        with linear_mode(spec):
            if backend is None:
                fn = gemm_alone(ctx["op"], args)
                entry["gemm_alone"] = True
            else:
                kernel = backends.resolve(ctx["op"], backend, dev, args)[1]
                fn = (lambda: kernel(*args))
                entry["rel_err"] = rel_err(fn(), ctx["ref64"])
                entry["ok"] = bool(entry["rel_err"] <= ctx["tol"])  # NaN -> False
            if smoke:
                entry["eager_us"], graph = cpu_ms(fn) * 1e3, None
            else:
                torch.cuda.synchronize()
                entry["eager_us"], graph = bench_ms(fn) * 1e3, graph_ms(fn)
            entry["graph_us"] = None if graph is None else graph * 1e3
            entry["time_us"] = entry["eager_us"] if graph is None else entry["graph_us"]
    except Exception as exc:  # noqa: BLE001 - a config that fails to build or run is reported, not fatal
        entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    log(f"{ctx['case']:8s} {label:22s} " + (
        f"{entry['time_us']:9.1f} us  err {entry.get('rel_err', float('nan')):.2e}" if "time_us" in entry
        else entry["error"]))
    return entry


def compiled_kernels() -> list:
    """Registers / spills / smem of every fused kernel Triton compiled in this process (best effort:
    the cache layout is Triton-internal; interpreted kernels compile nothing)."""
    from dm2s2_fast.triton import linear_add_layernorm as LL, linear_bias_gelu as LG

    found = []
    for jit_fn in (LG._linear_bias_gelu_kernel, LL._linear_add_layernorm_kernel):
        try:
            for cache in getattr(jit_fn, "device_caches", {}).values():
                for kern in cache[0].values():
                    meta = kern.metadata
                    consts = {jit_fn.arg_names[key[0]]: v for key, v in getattr(kern.src, "constants", {}).items()
                              if jit_fn.arg_names[key[0]].startswith("BLOCK")}
                    found.append(dict(kernel=jit_fn.__name__, **consts, num_warps=meta.num_warps,
                                      num_stages=meta.num_stages, smem=meta.shared,
                                      n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None)))
        except Exception as exc:  # noqa: BLE001
            found.append(dict(kernel=jit_fn.__name__, error=f"{type(exc).__name__}: {exc}"))
    return found


def table(results, title: str) -> str:
    lines = [title, "", "| case | entry | time µs | × cuBLAS | eager µs | rel err | ok |",
             "|---|---|---:|---:|---:|---:|---|"]
    for e in results:
        if "time_us" not in e:
            lines.append(f"| {e['case']} | {e['label']} | — | — | — | — | {e.get('error', '')[:80]} |")
            continue
        star = "" if e.get("graph_us") is not None else "*"
        x = f"{e['x_cublas']:.2f}" if "x_cublas" in e else "—"
        err = f"{e['rel_err']:.1e}" if "rel_err" in e else "—"
        ok = ("ok" if e["ok"] else "BAD") if "ok" in e else "—"
        lines.append(f"| {e['case']} | {e['label']} | {e['time_us']:.1f}{star} | {x} | {e['eager_us']:.1f} "
                     f"| {err} | {ok} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_linear.json")
    ap.add_argument("--batch", type=int, default=256, help="ads batch size B (N = its packed rows)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--budget", type=float, default=35.0,
                    help="seconds; no alternative config starts past it (each costs a compile, ~2-5 s)")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: Triton's interpreter on tiny shapes (checks the code paths, not speed)")
    args = ap.parse_args()
    t0 = time.time()

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (nothing has yet)
        dev, cases, n = torch.device("cpu"), SMOKE_CASES, 37
    elif not torch.cuda.is_available():
        print("gpu_linear.py: no CUDA device; nothing to time (--smoke checks the code paths on CPU)")
        with open(args.out, "w") as f:
            json.dump({"error": "no CUDA device"}, f)
        return 0
    else:
        dev, cases = torch.device("cuda"), CASES
        n = int(ads_lengths(args.batch).sum())
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity assumes IEEE fp32 GEMMs
    dtype = DTYPES[args.dtype]

    import dm2s2_fast.ops  # noqa: F401 - registers the torch backend
    from dm2s2_fast import backends

    for name in ("triton", "cuda"):
        reason = backends.why_not(name, "linear_bias_gelu", dev)
        log(f"backend {name}: {'available' if reason is None else 'UNAVAILABLE: ' + reason}")
    if backends.why_not("triton", "linear_bias_gelu", dev) is not None:
        print("gpu_linear.py: the triton backend is unavailable; nothing to compare")
        return 1

    # the main entries of every case first, then the alternative configs while the budget lasts
    contexts = [prepare(case, op, k, width, n, dtype, dev) for case, op, k, width in cases]
    per_case = {ctx["case"]: [run_entry(ctx, *e, dev, args.smoke) for e in main_entries(ctx["op"], ctx["args"], dev)]
                for ctx in contexts}
    for ctx in contexts:
        for cfg in ALTERNATIVES[ctx["op"]]:
            label = f"fused[{cfg}]"
            if time.time() - t0 > args.budget:
                per_case[ctx["case"]].append(dict(case=ctx["case"], op=ctx["op"], label=label, env=f"fused,{cfg}",
                                                  error=f"skipped: past the {args.budget:.0f} s budget"))
                continue
            per_case[ctx["case"]].append(run_entry(ctx, label, "triton", f"fused,{cfg}", dev, args.smoke))
    results = []
    for entries in per_case.values():
        floor = next((e["time_us"] for e in entries if e.get("gemm_alone") and "time_us" in e), None)
        for e in entries:
            if floor and "time_us" in e:
                e["x_cublas"] = e["time_us"] / floor
        results += entries

    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter smoke run)",
                torch=torch.__version__, cuda=torch.version.cuda, N=n, batch=args.batch, dtype=args.dtype,
                wall_s=time.time() - t0)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    kernels = compiled_kernels()
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results, compiled=kernels), f, indent=1)

    print()
    title = (f"smoke run, N={n} {args.dtype}, Triton interpreter on CPU: wall clock, meaningless as speed"
             if args.smoke else f"ads B={args.batch} N={n} {args.dtype} on {meta['device']}: time = CUDA-graph "
                                f"replay (* eager), median; × cuBLAS = over F.linear alone")
    print(table(results, title))
    for kern in kernels:
        print("compiled:", kern)
    bad = [e["label"] for e in results if e.get("ok") is False]
    print(f"wrote {args.out} in {meta['wall_s']:.0f} s" + (f"; PARITY FAILED: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
