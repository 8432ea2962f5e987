#!/usr/bin/env python3
"""Per-op GPU timings of the torch / triton / cuda backends, and FlexAttention for set_attention.

Shapes: the `ads` workload (docs/workloads.md) at B=256 (``dm2s2_fast.workloads.ads_batch``): ~26k
packed tokens, d=384, 12 heads of 32, FFN 1536, set-attention groups = samples (27..200 tokens),
IntraMRA segments = present modalities.

For each op and backend: a correctness check against the torch kernel run in fp64 (‖out−ref‖/‖ref‖,
with the torch kernel's own error in that dtype beside it), then the median time of
  eager  - the backend's kernel function as the engine calls it (Python + launches), and
  graph  - the same call captured in a CUDA graph and replayed (GPU time without launch gaps;
           '-' when the call cannot be captured, e.g. it syncs),
with triton.testing.do_bench (L2 flushed before each run; CUDA events) or CUDA events when Triton
is missing. `ratio` is graph time (eager where no graph) over the best backend's for that op.
Forced kernel variants (CUDA_VARIANTS, TRITON_VARIANTS: a ``dm2s2_fast.Tuning`` made current with
``with tuning.active():`` around that entry's check, correctness call, timing and graph capture) are
checked and timed beside each backend's default (run under ``Tuning()``), labelled backend[variant].
`floor` = max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s bf16|fp16, 67 TFLOP/s fp32) - the measured
copy bandwidth and bf16 matmul rate of the H200 (docs/performance.md, "Machines"), each input read
once, each output written once.

    python bench/gpu_ops.py --out gpu_ops.json [--dtypes bf16,fp16,fp32] [--batch 256]

A missing backend (or one that fails on an op) is reported and skipped; the run keeps a time
budget (--budget, default 80 s) and drops the optional parts (extra dtypes, flex) past it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.join(HERE, "..") not in sys.path:
    sys.path.insert(0, os.path.join(HERE, ".."))

from dm2s2_fast import AttentionTiles, PoolRows, ScoreTiles, Tuning  # noqa: E402

BW = 4.3e12                      # B/s, measured device-to-device copy (read + write)
PEAK = {"bf16": 790e12, "fp16": 790e12, "fp32": 67e12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("torch", "triton", "cuda")
# Forced cuda kernels, each timed and checked beside the automatic choice ("cuda"): (label, Tuning);
# the tuning is current for that entry only.
CUDA_VARIANTS = {
    "set_attention": [(k, Tuning(cuda_attention=k)) for k in ("tile32", "tile64", "group")],
    "add_layernorm": [(f"ln-{k}", Tuning(cuda_layernorm=k)) for k in ("warp", "half")],
    "embed_layernorm": [(f"ln-{k}", Tuning(cuda_layernorm=k)) for k in ("warp", "half")],
}
# Forced triton launch configs, likewise ("triton" is the backend's own choice from the shapes).
# 64-row MRA score tiles everywhere (BLOCK_N, BLOCK_A, BLOCK_K, num_warps, num_stages).
_MRA_TILE64 = ("tile64", Tuning(triton_mra_scores=ScoreTiles(64, 128, 64, num_warps=4, num_stages=3)))
# The pooling kernel's row loop (BLOCK_N, num_warps, num_stages; half-precision default at d=384
# 32,4,3, measured fastest on the H200 on 2026-11-30; 16,8,1 the earlier default).
_POOL_VARIANTS = [(f"pool{n}-{w}-{st}", Tuning(triton_mra_pool=PoolRows(n, num_warps=w, num_stages=st)))
                  for n, w, st in ((16, 8, 1), (64, 4, 3), (32, 4, 4), (16, 4, 3), (32, 2, 3))]
# set_attention tilings, one program per group's q-block (packed=False; BLOCK_M, BLOCK_N,
# num_warps, num_stages); the ads default is 64,32,4,2 (64,64,4,2 until the H200 timed both on
# 2026-11-30).
_ATTN_VARIANTS = [(f"group-{m}-{n}-{w}-{st}",
                   Tuning(triton_attention=AttentionTiles(packed=False, block_m=m, block_n=n, num_warps=w,
                                                          num_stages=st)))
                  for m, n, w, st in ((64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 2),
                                      (64, 16, 4, 2), (32, 32, 4, 2))]
TRITON_VARIANTS = {
    "set_attention": _ATTN_VARIANTS,
    "intra_mra": [_MRA_TILE64] + _POOL_VARIANTS,
    "mra_pool": [_MRA_TILE64, _POOL_VARIANTS[0]],
}
VARIANTS = {"cuda": CUDA_VARIANTS, "triton": TRITON_VARIANTS}
DEFAULT_TUNING = Tuning()  # the backends' own choices: every default entry runs under it


def tuning_changes(tuning: Tuning) -> dict:
    """The fields ``tuning`` forces (those that differ from ``Tuning()``), JSON-ready."""
    return {f.name: (dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
            for f in dataclasses.fields(tuning)
            if (value := getattr(tuning, f.name)) != getattr(DEFAULT_TUNING, f.name)}
D_MODEL, HEADS, FFN, VOCAB, MAX_POS, MRA_DIM = 384, 12, 1536, 30522, 512, 384

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ workload
def ads_lengths(B: int, seed: int = 0) -> torch.Tensor:
    """[B, 4] lengths (title, description, image, category) of the seeded `ads` batch (docs/workloads.md)."""
    from dm2s2_fast.workloads import ads_batch

    return ads_batch(B, seed=seed).layout.lengths.to(torch.int64)


def offsets(lengths: torch.Tensor, dev) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = lengths.reshape(-1).cumsum(0)
    return cu.to(dev, torch.int32)


class Workload:
    def __init__(self, B: int, dev):
        L = ads_lengths(B)                                   # [B, M]
        self.B, self.M = L.shape
        totals = L.sum(1)
        self.N = int(totals.sum())
        seg = L.reshape(-1)
        seg = seg[seg > 0]
        self.S = int(seg.numel())
        self.cu_set = offsets(totals, dev)
        self.max_set = int(totals.max())
        self.sum_sq = int((totals.double() ** 2).sum())
        self.totals = totals
        self.cu_seg = offsets(seg, dev)
        self.cu_segments_per_sample = offsets((L > 0).sum(1), dev)
        # per modality: packed rows and intra-order positions (sample-major, modalities in order)
        starts = torch.cumsum(totals, 0) - totals
        self.rows, self.positions = [], []
        for m in range(self.M):
            lm = L[:, m]
            owner = torch.arange(self.B).repeat_interleave(lm)
            within = torch.arange(int(lm.sum())) - (torch.cumsum(lm, 0) - lm)[owner]
            before = L[:, :m].sum(1)
            self.rows.append((starts[owner] + before[owner] + within).to(dev))
            self.positions.append(within.to(dev))
        self.lengths = L


# ------------------------------------------------------------------ timing
def _events_bench(fn, warmup_ms=25, rep_ms=100):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, min(1000, int(rep_ms / est)))
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return ms[len(ms) // 2]


def bench_ms(fn) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        return _events_bench(fn)


def graph_ms(fn) -> float | None:
    """Median replay time of fn captured in a CUDA graph, None when it can't be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return bench_ms(graph.replay)
    except Exception:  # noqa: BLE001 - e.g. a host sync inside the call
        torch.cuda.synchronize()
        return None


# ------------------------------------------------------------------ correctness
def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        out = []
        for y in x:
            out += _flat(y)
        return out
    return []


def rel_err(outs, refs) -> float:
    worst = 0.0
    for o, r in zip(_flat(outs), _flat(refs)):
        if o.numel() == 0:
            continue
        o, r = o.double(), r.double()
        if not bool(torch.isfinite(o).all()):
            return float("nan")
        d = r.norm().item()
        e = (o - r).norm().item() / (d if d > 0 else 1.0)
        worst = max(worst, e)
    return worst


def to64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# ------------------------------------------------------------------ ops
def make_cases(w: Workload, dt: torch.dtype, dev):
    g = torch.Generator(device=dev).manual_seed(1234)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

    es = torch.finfo(dt).bits // 8
    N, S, B, d = w.N, w.S, w.B, D_MODEL
    D = d // HEADS
    cases = {}

    qkv = rn(N, 3, HEADS, D)
    q, k, v = qkv.unbind(1)
    cases["set_attention"] = dict(
        args=(q, k, v, w.cu_set, w.max_set, 1.0 / math.sqrt(D)),
        bytes=4 * N * d * es, flops=4 * w.sum_sq * HEADS * D)

    x, res = rn(N, d), rn(N, d)
    ln_w, ln_b = rn(d, scale=0.2) + 1, rn(d, scale=0.2)
    cases["add_layernorm"] = dict(args=(x, res, ln_w, ln_b, 1e-12), bytes=3 * N * d * es, flops=8 * N * d)

    xf, bf = rn(N, FFN), rn(FFN)
    cases["bias_gelu"] = dict(args=(xf, bf), bytes=2 * N * FFN * es, flops=20 * N * FFN)

    pos_t, typ_t = rn(MAX_POS, d), rn(4, d)
    word = rn(VOCAB, d)
    out = torch.empty(N, d, device=dev, dtype=dt)
    n_desc = int(w.rows[1].numel())
    ids = torch.randint(1, VOCAB, (n_desc,), generator=g, device=dev)
    typ1 = torch.full((n_desc,), 1, dtype=torch.int64, device=dev)
    cases["embed_layernorm[tokens]"] = dict(
        op="embed_layernorm",
        args=(w.positions[1], typ1, pos_t, typ_t, ln_w, ln_b, 1e-12, ids, word, None, out, w.rows[1]),
        bytes=2 * n_desc * d * es + 3 * n_desc * 8, flops=10 * n_desc * d, writes_out=True)
    n_img = int(w.rows[2].numel())
    dense = rn(n_img, d)
    typ2 = torch.full((n_img,), 2, dtype=torch.int64, device=dev)
    cases["embed_layernorm[dense]"] = dict(
        op="embed_layernorm",
        args=(w.positions[2], typ2, pos_t, typ_t, ln_w, ln_b, 1e-12, None, None, dense, out, w.rows[2]),
        bytes=2 * n_img * d * es + 3 * n_img * 8, flops=10 * n_img * d, writes_out=True)

    h = rn(N, d)
    W, c, vv = rn(MRA_DIM, d, scale=1 / math.sqrt(d)), rn(MRA_DIM, scale=0.3), rn(MRA_DIM, scale=0.5)
    U, gg, u = rn(MRA_DIM, d, scale=1 / math.sqrt(d)), rn(MRA_DIM, scale=0.3), rn(MRA_DIM, scale=0.5)
    z = rn(S, d)
    cases["intra_mra"] = dict(args=(h, w.cu_seg, W, c, vv),
                              bytes=N * d * es + MRA_DIM * d * es + S * d * es + 4 * N,
                              flops=2 * N * d * MRA_DIM)
    cases["inter_mra"] = dict(args=(z, w.cu_segments_per_sample, U, gg, u),
                              bytes=S * d * es + MRA_DIM * d * es + B * d * es + 4 * S,
                              flops=2 * S * d * MRA_DIM)
    cases["mra_pool"] = dict(args=(h, w.cu_seg, w.cu_segments_per_sample, W, c, vv, U, gg, u),
                             bytes=N * d * es + 2 * MRA_DIM * d * es + S * d * es + B * d * es + 4 * (N + S),
                             flops=2 * (N + S) * d * MRA_DIM)
    for name, case in cases.items():
        case.setdefault("op", name)
    return cases


def fresh_args(case):
    """Arguments with a NaN-filled copy of `out` (embed_layernorm writes in place)."""
    args = list(case["args"])
    if case.get("writes_out"):
        args[10] = torch.full_like(args[10], float("nan"))
    return tuple(args)


def select_out(case, result, args):
    if case.get("writes_out"):
        return args[10][args[11].long()]
    return result


# ------------------------------------------------------------------ FlexAttention
def flex_entry(w: Workload, case, dt, dev, ref64, budget_left):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        return dict(backend="flex", error=f"flex_attention unavailable: {exc}")
    if budget_left < 25:
        return dict(backend="flex", error="skipped: time budget")
    q, k, v, cu, max_seqlen, scale = case["args"]
    N, H, D = q.shape
    Np = ((N + 127) // 128) * 128
    doc = torch.repeat_interleave(torch.arange(w.B, device=dev), w.totals.to(dev))
    doc = torch.cat([doc, torch.arange(Np - N, device=dev) + w.B])  # padding rows: their own docs

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def to_bhsd(t):
        p = torch.zeros(Np, H, D, device=dev, dtype=dt)
        p[:N] = t
        return p.permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, H, Np, D], flex's layout

    qf, kf, vf = to_bhsd(q), to_bhsd(k), to_bhsd(v)
    t = time.time()
    block_mask = create_block_mask(mask_mod, None, None, Np, Np, device=dev)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run():
        return compiled(qf, kf, vf, block_mask=block_mask, scale=scale)

    out = run()
    torch.cuda.synchronize()
    compile_s = time.time() - t
    got = out[0].permute(1, 0, 2)[:N]
    err = rel_err(got, ref64)
    eager = bench_ms(run)
    graph = graph_ms(run)
    mask_ms = bench_ms(lambda: create_block_mask(mask_mod, None, None, Np, Np, device=dev))
    return dict(backend="flex", eager_us=eager * 1e3, graph_us=None if graph is None else graph * 1e3,
                rel_err=err, note=f"document mask over {Np} packed rows; compile {compile_s:.0f}s; "
                                  f"create_block_mask {mask_ms * 1e3:.0f}us (not in the time)")


# ------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_ops.json")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32 (first is the main one)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--ops", default="", help="comma list to restrict the ops")
    ap.add_argument("--budget", type=float, default=80.0, help="seconds; optional parts are dropped past it")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("gpu_ops.py: no CUDA device; nothing to time")
        with open(args.out, "w") as f:
            json.dump({"error": "no CUDA device"}, f)
        return 0
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity assumes IEEE fp32 GEMMs

    from dm2s2_fast import dispatch

    avail = {}
    for name in args.backends.split(","):
        reason = "; ".join(dispatch.reasons(name, "add_layernorm", "cuda")) or None
        avail[name] = reason
        log(f"backend {name}: {'available' if reason is None else 'UNAVAILABLE: ' + reason}")

    w = Workload(args.batch, dev)
    log(f"ads B={w.B}: N={w.N} tokens, S={w.S} segments, max set {w.max_set}, sum L^2 {w.sum_sq}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                batch=w.B, N=w.N, S=w.S, max_seqlen_set=w.max_set, sum_sq=w.sum_sq,
                backends={k: v for k, v in avail.items()}, bandwidth=BW, peak=PEAK)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None

    results = []
    dtype_names = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    only = {s.strip() for s in args.ops.split(",") if s.strip()}
    for di, dname in enumerate(dtype_names):
        if di > 0 and time.time() - T0 > args.budget * 0.6:
            log(f"skip dtype {dname}: time budget")
            continue
        dt = DTYPES[dname]
        cases = make_cases(w, dt, dev)
        for name, case in cases.items():
            if only and name not in only and case["op"] not in only:
                continue
            op = case["op"]
            floor_s = max(case["bytes"] / BW, case["flops"] / PEAK[dname])
            torch_fn = dispatch.resolve(op, "torch", dev)[1]
            a64 = fresh_args(case)
            a64 = to64(a64)
            ref64 = select_out(case, torch_fn(*a64), a64)
            a_dt = fresh_args(case)
            ref_dt = select_out(case, torch_fn(*a_dt), a_dt)
            torch_err = rel_err(ref_dt, ref64) if dt != torch.float32 else 0.0
            tol = 1e-5 if dt == torch.float32 else min(2e-2, max(2 * torch_err, 1e-5))
            entries = []
            names = [b for b in args.backends.split(",") if b]
            variants = [(b, None) for b in names]
            for bname in ("triton", "cuda"):  # every forced kernel variant, for tuning: (label, Tuning)
                if bname in names:
                    variants += [(bname, v) for v in VARIANTS[bname].get(op, [])]
            for bname, variant in variants:
                label = bname if variant is None else f"{bname}[{variant[0]}]"
                tuning = DEFAULT_TUNING if variant is None else variant[1]
                entry = dict(op=name, dtype=dname, backend=label, floor_us=floor_s * 1e6)
                if variant is not None:
                    entry["tuning"] = tuning_changes(tuning)
                try:
                    # Kernels read the current tuning at call time: the check, the correctness
                    # call, the eager timing and the graph capture all run under this entry's.
                    with tuning.active():
                        found = dispatch.reasons(bname, op, dev, case["args"])
                        if found:
                            entry["error"] = f"unavailable: {'; '.join(found)}"
                            entries.append(entry)
                            continue
                        fn = dispatch.resolve(op, bname, dev, case["args"])[1]
                        a = fresh_args(case)
                        got = select_out(case, fn(*a), a)
                        torch.cuda.synchronize()
                        entry["rel_err"] = rel_err(got, ref64)
                        entry["ok"] = bool(entry["rel_err"] <= tol)  # NaN -> False
                        call_args = case["args"]
                        entry["eager_us"] = bench_ms(lambda: fn(*call_args)) * 1e3
                        gm = graph_ms(lambda: fn(*call_args))
                        entry["graph_us"] = None if gm is None else gm * 1e3
                except Exception as exc:  # noqa: BLE001 - report and go on
                    entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    traceback.print_exc()
                    torch.cuda.synchronize()
                entries.append(entry)
                log(f"{name:24s} {dname} {label:18s} " + (
                    f"eager {entry['eager_us']:9.1f} us  graph "
                    f"{'-' if entry.get('graph_us') is None else format(entry['graph_us'], '.1f')} us  "
                    f"err {entry['rel_err']:.2e}" if "eager_us" in entry else entry.get("error", "")))
            if op == "set_attention" and not args.no_flex:
                fe = flex_entry(w, case, dt, dev, ref64, args.budget - (time.time() - T0))
                fe.update(op=name, dtype=dname, floor_us=floor_s * 1e6)
                if "rel_err" in fe:
                    fe["ok"] = bool(fe["rel_err"] <= tol)
                entries.append(fe)
                log(f"{name:24s} {dname} flex           " + (
                    f"eager {fe['eager_us']:9.1f} us  err {fe['rel_err']:.2e}" if "eager_us" in fe
                    else fe.get("error", "")))
            timed = [e for e in entries if "eager_us" in e]
            for e in timed:
                e["time_us"] = e["graph_us"] if e.get("graph_us") is not None else e["eager_us"]
            if timed:
                best = min(e["time_us"] for e in timed)
                for e in timed:
                    e["ratio_to_best"] = e["time_us"] / best
            for e in entries:
                e["torch_dtype_err"] = torch_err
                e["tol"] = tol
            results += entries

    meta["wall_s"] = time.time() - T0
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)

    # ---- the table (last, so the tail of the log carries it)
    print()
    print(f"ads B={w.B} N={w.N} S={w.S} on {meta['device']}; time = graph replay (eager where '*'), "
          f"median; floor = max(bytes/4.3TB/s, flops/peak)")
    hdr = f"{'op':24s} {'dtype':5s} {'backend':18s} {'time us':>9s} {'eager us':>9s} {'ratio':>6s} " \
          f"{'floor us':>8s} {'x floor':>7s} {'rel err':>8s} ok"
    print(hdr)
    print("-" * len(hdr))
    for e in results:
        if "time_us" in e:
            star = "" if e.get("graph_us") is not None else "*"
            print(f"{e['op']:24s} {e['dtype']:5s} {e['backend']:18s} {e['time_us']:8.1f}{star:1s} "
                  f"{e['eager_us']:9.1f} {e['ratio_to_best']:6.2f} {e['floor_us']:8.1f} "
                  f"{e['time_us'] / e['floor_us']:7.1f} {e['rel_err']:8.1e} {'ok' if e.get('ok') else 'BAD'}")
        else:
            print(f"{e['op']:24s} {e['dtype']:5s} {e['backend']:18s} -- {e.get('error', '')[:90]}")
    print(f"wrote {args.out} in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
