#!/usr/bin/env python3
"""Load test of the two servers — Triton over gRPC, Ray Serve over HTTP — beside the in-process
engine, in one run, on 16-candidate `ads` requests (docs/workloads.md, the default ads config).

Targets, one after the other on this machine (never two at once: they would share the cores):

- ``inprocess``: one direct engine call per request (``engine(batch).logits``, the batch validated
  beforehand), sequentially — the baseline; ``inprocess+validate`` adds ``SequenceSet.from_jagged``
  of the request's arrays, the validation every server does per request.
- ``triton``: the repository of ``python -m dm2s2_fast triton-repo`` (KIND_CPU, the default dynamic
  batcher settings unless given) on the nvidia-pytriton wheel's tritonserver, bound to loopback;
  ``tritonclient.grpc``, one client per thread; the request's InferInputs are built inside the
  timed region (a client pays that serialization).
- ``ray``: ``dm2s2_fast.serving.ray_app`` on a local Ray (``num_cpus`` = this machine's cores,
  one replica holding them all), HTTP through Serve's proxy on loopback, an ``.npz`` body built
  inside the timed region, one keep-alive session per thread.

At concurrency 1 each server is measured *paired*: request i goes to the engine in-process, then to
the server, alternately, so both see the same machine load (this machine may be shared);
``overhead`` = p50(server) − p50(in-process) of those pairs, with the median of the per-pair
differences beside it. Higher concurrencies are closed loops (each client thread sends its next
request when the previous is answered), bounded in requests and in time. Every answer is checked
against the request's in-process scores (relative error ≤ 1e-5): a lost, failed or mis-routed
response is counted, never hidden. Last, each server runs a *transport-only* model (the same
validation and packing, the engine replaced by zeros: ``BatchScorer(transport_only=True)``) at
concurrency 1: its latency is the server's own cost per request, which the paired difference
measures too but inside the engine's run-to-run noise.

    python bench/servers_load.py --out bench/results/2026-12-07-servers-cpu-intel-spr
    python bench/servers_load.py --quick          # a smoke run: few requests, concurrency 1 and 4

Writes ``servers_load.json``, ``results.md`` and ``servers_load.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dm2s2_fast import DM2S2Config, SequenceSet, convert  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402
from dm2s2_fast.serving.triton.checkpoint import model_from_source  # noqa: E402
from dm2s2_fast.serving.triton.packing import host_threads, npz_body, request_arrays  # noqa: E402
from dm2s2_fast.workloads import ads_batch  # noqa: E402

TOL = 1e-5


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(latencies_s: list[float], wall_s: float | None = None) -> dict:
    ms = [x * 1e3 for x in latencies_s]
    out = {"requests": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
           "mean_ms": statistics.fmean(ms) if ms else float("nan"), "max_ms": max(ms) if ms else float("nan")}
    if wall_s:
        out["wall_s"] = wall_s
        out["throughput_rps"] = len(ms) / wall_s
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(np.array(a)).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


class Checker:
    """Counts answers that are missing, failed or not the request's own scores."""

    def __init__(self, expected: list[torch.Tensor]):
        self.expected = expected
        self.lock = threading.Lock()
        self.ok = self.errors = self.mismatched = 0
        self.max_rel = 0.0
        self.first_error = None

    def check(self, index: int, scores) -> None:
        err = rel_err(np.asarray(scores, dtype=np.float32).reshape(self.expected[index].shape), self.expected[index])
        with self.lock:
            self.max_rel = max(self.max_rel, err)
            if err <= TOL:
                self.ok += 1
            else:
                self.mismatched += 1

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors += 1
            self.first_error = self.first_error or f"{type(exc).__name__}: {str(exc)[:300]}"

    def as_dict(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "mismatched": self.mismatched, "max_rel_err": self.max_rel,
                "first_error": self.first_error}


def closed_loop(send, count: int, concurrency: int, budget_s: float, checker: Checker, pool_size: int) -> dict:
    """``concurrency`` threads, each sending its next request when answered, until ``count`` requests
    were issued or ``budget_s`` passed. ``send(i)`` returns request i's scores."""
    issued = iter(range(count))
    lock = threading.Lock()
    latencies: list[float] = []
    deadline = time.monotonic() + budget_s

    def worker():
        while True:
            with lock:
                i = next(issued, None)
            if i is None or time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                scores = send(i % pool_size)
            except Exception as exc:  # noqa: BLE001 — counted and reported
                checker.error(exc)
                continue
            elapsed = time.perf_counter() - start
            checker.check(i % pool_size, scores)
            with lock:
                latencies.append(elapsed)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, time.perf_counter() - start)


def paired(send, inprocess, count: int, budget_s: float, checker: Checker, pool_size: int) -> dict:
    """Concurrency 1: request i in-process, then through the server, alternately."""
    ins, srv = [], []
    deadline = time.monotonic() + budget_s
    start = time.perf_counter()
    for i in range(count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        inprocess(i % pool_size)
        ins.append(time.perf_counter() - t)
        t = time.perf_counter()
        try:
            scores = send(i % pool_size)
        except Exception as exc:  # noqa: BLE001
            checker.error(exc)
            ins.pop()
            continue
        srv.append(time.perf_counter() - t)
        checker.check(i % pool_size, scores)
    wall = time.perf_counter() - start
    server = summary(srv, sum(srv) or None)
    baseline = summary(ins)
    server["inprocess_p50_ms"] = baseline["p50_ms"]
    server["inprocess_p99_ms"] = baseline["p99_ms"]
    server["overhead_p50_ms"] = server["p50_ms"] - baseline["p50_ms"]
    server["overhead_median_pair_ms"] = percentile([(s - i) * 1e3 for s, i in zip(srv, ins)], 50)
    server["pairs_wall_s"] = wall
    return server


def levels(name: str, send, inprocess, args, checker_for, pool_size: int) -> dict:
    """One row per client count: paired with the in-process engine at 1, a closed loop above."""
    rows = {}
    for c in args.concurrency:
        checker = checker_for()
        if c == 1:
            row = paired(send, inprocess, args.pairs, args.level_budget_s, checker, pool_size)
        else:
            row = closed_loop(send, max(args.requests, 2 * c), c, args.level_budget_s, checker, pool_size)
        row["check"] = checker.as_dict()
        rows[str(c)] = row
        print(f"{name} c={c}: {json.dumps(row)}", flush=True)
    return rows


def tree_cpu_seconds() -> float:
    """CPU time (user + system) of this process and every descendant (the servers, Triton's backend
    stub, Ray's processes), from /proc: unlike wall time, what a request costs regardless of how long
    a loaded machine makes it wait for a core."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


def transport(send, args, pool_size: int) -> dict:
    """Concurrency 1 against the server's transport-only model (validation and packing, no engine):
    the server's own cost per request, free of the engine's time and of its noise. ``cpu_ms`` is the
    CPU time the whole process tree (client, server, stub) spent per request: near the latency such a
    request has on an idle machine, where nothing waits for a core."""
    latencies, errors = [], 0
    for i in range(3):
        send(i % pool_size)
    cpu0 = tree_cpu_seconds()
    for i in range(args.transport_requests):
        t = time.perf_counter()
        try:
            send(i % pool_size)
        except Exception:  # noqa: BLE001
            errors += 1
            continue
        latencies.append(time.perf_counter() - t)
    cpu = tree_cpu_seconds() - cpu0
    return {**summary(latencies), "errors": errors, "cpu_ms": cpu * 1e3 / max(1, len(latencies))}


# ---- targets ----------------------------------------------------------------------------------------------
def triton_target(model, arrays, small, args, checker_for, inprocess, results):
    import tritonclient.grpc as grpcclient

    from dm2s2_fast.serving.triton import TritonServer, write_repository

    work = Path(tempfile.mkdtemp(prefix="dm2s2_bench_triton_"))
    fields = dict(backend=args.backend, max_queue_delay_us=args.triton_delay_us, max_batch_size=args.triton_max_batch,
                  queue_timeout_us=0, num_threads=args.threads)
    if args.triton_preferred is not None:
        fields["preferred_batch_sizes"] = args.triton_preferred
    write_repository(work / "repo", model, **fields)
    write_repository(work / "repo", model, name="dm2s2_transport", extra_parameters={"transport_only": "true"},
                     **fields)
    server = TritonServer(work / "repo", workdir=str(work / "server"))
    t = time.perf_counter()
    server.start(timeout=600)
    results["triton_start_s"] = time.perf_counter() - t
    local = threading.local()
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}

    def send(i, model_name="dm2s2", pool=arrays):
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for name, array in pool[i].items():
            x = grpcclient.InferInput(name, list(array.shape), dtypes[array.dtype])
            x.set_data_from_numpy(array)
            inputs.append(x)
        return client.infer(model_name, inputs).as_numpy("scores")[0]

    try:
        send(0)  # warm: the connection, the first batch of the instance
        rows = levels("triton", send, inprocess, args, checker_for, len(arrays))
        results["triton_transport"] = transport(lambda i: send(i, "dm2s2_transport"), args, len(arrays))
        print(f"triton transport-only c=1: {json.dumps(results['triton_transport'])}", flush=True)
        results["triton_transport_small"] = transport(lambda i: send(i, "dm2s2_transport", small), args, len(small))
        print(f"triton transport-only, no image features, c=1: {json.dumps(results['triton_transport_small'])}",
              flush=True)
        stats_client = grpcclient.InferenceServerClient(server.grpc_url)
        stats = stats_client.get_inference_statistics("dm2s2", as_json=True)
        batches = stats["model_stats"][0].get("batch_stats", [])
        results["triton_batch_sizes"] = {b["batch_size"]: int(b["compute_infer"]["count"]) for b in batches}
        results["triton"] = rows
    finally:
        server.stop()
        results["triton_log_tail"] = server.log(3000)
        server.cleanup()


def ray_target(model, arrays, small, args, checker_for, inprocess, results):
    import ray
    import requests
    from ray import serve

    from dm2s2_fast.serving.ray_app import app
    from dm2s2_fast.serving.triton.server import free_ports

    cores = os.cpu_count() or 1
    port = free_ports(1)[0]
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(model, num_cpus=cores, backend=args.backend, num_threads=args.threads or cores,
                      batch_wait_timeout_s=args.ray_wait_s, max_batch_rows=args.ray_max_rows),
                  name="dm2s2", route_prefix="/dm2s2")
        results["ray_start_s"] = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/dm2s2"
        local = threading.local()

        def send(i, target=url, pool=arrays):
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            r = session.post(target, data=npz_body(pool[i]), headers={"Content-Type": "application/x-npz"},
                             timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            return r.json()["scores"]

        send(0)
        rows = levels("ray", send, inprocess, args, checker_for, len(arrays))
        results["ray_stats"] = requests.get(url + "/stats", timeout=60).json()
        results["ray"] = rows
        serve.delete("dm2s2")
        serve.run(app(model, num_cpus=cores, backend=args.backend, num_threads=args.threads or cores,
                      batch_wait_timeout_s=args.ray_wait_s, max_batch_rows=args.ray_max_rows, transport_only=True),
                  name="dm2s2_transport", route_prefix="/dm2s2_transport")
        transport_url = f"http://127.0.0.1:{port}/dm2s2_transport"
        send(0, transport_url)
        results["ray_transport"] = transport(lambda i: send(i, transport_url), args, len(arrays))
        print(f"ray transport-only c=1: {json.dumps(results['ray_transport'])}", flush=True)
        results["ray_transport_small"] = transport(lambda i: send(i, transport_url, small), args, len(small))
        print(f"ray transport-only, no image features, c=1: {json.dumps(results['ray_transport_small'])}", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ---- report -----------------------------------------------------------------------------------------------
def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "servers_load.json").write_text(json.dumps(results, indent=1) + "\n")
    base = results["inprocess"]
    lines = [f"# Servers under load — {results['machine']}", "",
             f"{results['when']}; `python bench/servers_load.py {results['argv']}`; torch {results['torch']}, "
             f"{results['threads']} engine threads; backend `{results['backend']}` "
             f"({results['backends_used']}); load average at start {results['loadavg_start']}, at end "
             f"{results.get('loadavg_end')}.", "",
             f"Requests: {results['candidates']}-candidate `ads` requests (default ads config, fp32), a pool of "
             f"{results['pool']} seeded ones ({results['rows_per_request']:.0f} packed rows each on average). "
             "Concurrency 1 is measured in pairs (in-process, then the server, alternately); higher "
             "concurrencies are closed loops. Every answer was checked against the request's in-process "
             "scores (relative error ≤ 1e-5).", "",
             "| target | concurrency | requests | p50 ms | p99 ms | throughput req/s | overhead p50 ms (paired) | "
             "failed / mis-routed | max rel err |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| in-process (engine call) | 1 | {base['requests']} | {base['p50_ms']:.1f} | {base['p99_ms']:.1f} | "
             f"{1e3 / base['mean_ms']:.2f} | — | — | — |"]
    v = results.get("inprocess_validate")
    if v:
        lines.append(f"| in-process + validation | 1 | {v['requests']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{1e3 / v['mean_ms']:.2f} | — | — | — |")
    for target, label in (("triton", "Triton, gRPC"), ("ray", "Ray Serve, HTTP")):
        for c, row in (results.get(target) or {}).items():
            overhead = (f"{row['overhead_p50_ms']:+.2f} (pair median {row['overhead_median_pair_ms']:+.2f}; "
                        f"in-process p50 {row['inprocess_p50_ms']:.1f})" if "overhead_p50_ms" in row else "—")
            check = row["check"]
            lines.append(f"| {label} | {c} | {row['requests']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row.get('throughput_rps', float('nan')):.2f} | {overhead} | "
                         f"{check['errors']} / {check['mismatched']} | {check['max_rel_err']:.1e} |")
        for key, what in (("transport", "engine removed (transport-only model)"),
                          ("transport_small", "engine removed, requests without their image features")):
            t = results.get(f"{target}_{key}")
            if t:
                lines.append(f"| {label}, {what} | 1 | {t['requests']} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
                             f"{1e3 / t['mean_ms']:.1f} | {t['p50_ms']:+.2f} (all of it; CPU time "
                             f"{t['cpu_ms']:.2f} ms a request) | {t['errors']} / — | — |")
        if results.get(f"{target}_error"):
            lines.append(f"| {label} | — | — | — | — | — | — | failed: {results[f'{target}_error']} | — |")
    lines += ["", "Reading it: the rows with the engine run minutes apart, and this machine may be shared (see the "
              "load averages): each concurrency-1 row carries the in-process p50 measured in the same pairs, "
              "which shows how fast the machine was during that phase — compare a server's rows with that, not "
              "with another phase's. The transport-only rows (the same requests, validated and packed, the "
              "engine replaced by zeros) are the servers' own cost per request; their CPU time is the sum over "
              "client, server and backend processes."]
    lines += ["", f"Triton's executions per batch size (requests per `execute()`): {results.get('triton_batch_sizes')}; "
              f"Ray replica's engine calls per batch size: {(results.get('ray_stats') or {}).get('batch_requests')}.",
              "", "Target (issue #15): Triton's p50 overhead ≤ 1 ms over in-process for 16-candidate requests on "
              f"CPU. {results.get('verdict', '')}", "", "![latency](servers_load.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target, label, color in (("triton", "Triton gRPC", "tab:green"), ("ray", "Ray Serve HTTP", "tab:blue")):
        rows = results.get(target) or {}
        if not rows:
            continue
        cs = sorted(rows, key=int)
        axes[0].plot([int(c) for c in cs], [rows[c]["p50_ms"] for c in cs], "o-", color=color, label=f"{label} p50")
        axes[0].plot([int(c) for c in cs], [rows[c]["p99_ms"] for c in cs], "o--", color=color, label=f"{label} p99")
        axes[1].plot([rows[c].get("throughput_rps", np.nan) for c in cs], [rows[c]["p99_ms"] for c in cs], "o-",
                     color=color, label=label)
        for c in cs:
            axes[1].annotate(f"c={c}", (rows[c].get("throughput_rps", np.nan), rows[c]["p99_ms"]), fontsize=7)
    axes[0].axhline(base["p50_ms"], color="k", lw=1, label="in-process p50")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("concurrency (client threads)")
    axes[0].set_ylabel("latency ms")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("throughput (requests/s)")
    axes[1].set_ylabel("p99 latency ms")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{results['candidates']}-candidate ads requests, {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "servers_load.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/2026-12-07-servers-cpu-intel-spr")
    ap.add_argument("--checkpoint", help="a dm2s2_fast checkpoint (default: a seeded random ads model)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (default: torch's)")
    ap.add_argument("--targets", default="triton,ray")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--pool", type=int, default=8, help="distinct requests, sent in turn")
    ap.add_argument("--pairs", type=int, default=30, help="paired requests at concurrency 1")
    ap.add_argument("--requests", type=int, default=48, help="requests per closed-loop level (at least 2 x c)")
    ap.add_argument("--baseline", type=int, default=30, help="in-process requests of the baseline rows")
    ap.add_argument("--transport-requests", type=int, default=200, help="requests to the transport-only models")
    ap.add_argument("--level-budget-s", type=float, default=120.0, help="stop issuing a level's requests after this")
    ap.add_argument("--triton-delay-us", type=int, default=500)
    ap.add_argument("--triton-max-batch", type=int, default=32)
    ap.add_argument("--triton-preferred", default=None, help="comma-separated, or 'none' (default: on the buckets)")
    ap.add_argument("--ray-wait-s", type=float, default=0.002)
    ap.add_argument("--ray-max-rows", type=int, default=16384)
    ap.add_argument("--transport-only", action="store_true",
                    help="only the servers' transport-only models (their own cost; the engine is not timed)")
    ap.add_argument("--report", metavar="JSON", help="only rewrite results.md and the PNG from a servers_load.json")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: pool 2, 4 pairs, concurrency 1,4, 8 requests, 20 transport-only")
    args = ap.parse_args(argv)
    if args.report:
        write_report(json.loads(Path(args.report).read_text()), Path(args.out))
        return 0
    if args.quick:
        args.pool, args.pairs, args.requests, args.baseline, args.concurrency = 2, 4, 8, 4, "1,4"
        args.transport_requests = 20
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.transport_only:
        args.concurrency, args.baseline = [], 4
    if args.triton_preferred is not None:
        args.triton_preferred = ([] if args.triton_preferred == "none"
                                 else [int(x) for x in args.triton_preferred.split(",")])
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = model_from_source(args.checkpoint) if args.checkpoint else DM2S2(DM2S2Config.default_ads()).eval()
    config = model.config
    engine = convert(model, args.backend)
    batches = [ads_batch(args.candidates, config, seed=5000 + i) for i in range(args.pool)]
    triton_arrays = [request_arrays(b, batch_dim=True) for b in batches]
    ray_arrays = [request_arrays(b) for b in batches]

    def without_image(arrays: dict, batch_dim: bool) -> dict:  # the same requests minus 1.3 MB of features
        lead = (1,) if batch_dim else ()
        return {**arrays, "image__values": np.zeros(lead + (0, arrays["image__values"].shape[-1]), np.float32),
                "image__lengths": np.zeros_like(arrays["image__lengths"])}

    triton_small = [without_image(a, True) for a in triton_arrays]
    ray_small = [without_image(a, False) for a in ray_arrays]
    engine(batches[0])  # warm-up: library loads, first-call allocations
    expected = [engine(b).logits.float() for b in batches]  # each request alone, in-process

    def inprocess(i):
        return engine(batches[i]).logits

    jagged = [{m.name: (b.values[m.name], b.lengths[m.name]) for m in config.modalities} for b in batches]

    def inprocess_validate(i):
        with host_threads(1):  # as the servers validate (packing.host_threads)
            batch = SequenceSet.from_jagged(config, jagged[i])
        return engine(batch).logits

    results = {"machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
               "when": time.strftime("%Y-%m-%d %H:%M"), "argv": " ".join(sys.argv[1:] if argv is None else argv),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "backend": args.backend,
               "backends_used": "+".join(sorted(set(engine.last_backends.values()))),
               "loadavg_start": [round(x, 2) for x in os.getloadavg()], "candidates": args.candidates,
               "pool": args.pool, "rows_per_request": statistics.fmean(b.num_elements for b in batches),
               "concurrency": args.concurrency}
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        results["machine"] = f"{cpu}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass

    def timed(fn, n):
        out = []
        for i in range(n):
            t = time.perf_counter()
            fn(i % args.pool)
            out.append(time.perf_counter() - t)
        return summary(out)

    results["inprocess"] = timed(inprocess, args.baseline)
    results["inprocess_validate"] = timed(inprocess_validate, max(4, args.baseline // 2))
    print(f"in-process: {json.dumps(results['inprocess'])}", flush=True)

    def checker_for():
        return Checker(expected)

    targets = [t for t in args.targets.split(",") if t]
    for target, run, arrays, small in (("triton", triton_target, triton_arrays, triton_small),
                                       ("ray", ray_target, ray_arrays, ray_small)):
        if target not in targets:
            continue
        try:
            run(model, arrays, small, args, checker_for, inprocess, results)
        except Exception as exc:  # noqa: BLE001 — a target that cannot run is reported, the others still run
            results[f"{target}_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            print(f"{target} failed: {results[f'{target}_error']}", file=sys.stderr, flush=True)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    one, t = (results.get("triton") or {}).get("1"), results.get("triton_transport")
    if one and t:
        met = t["p50_ms"] <= 1.0
        results["verdict"] = (f"Measured: with the engine removed, a Triton request takes {t['p50_ms']:.2f} ms at "
                              f"p50 — {'met' if met else 'NOT met'} — and {t['cpu_ms']:.2f} ms of CPU time (client, "
                              f"server and stub together; the latency it would have with a core always free); "
                              f"paired with the real engine, "
                              f"{one['overhead_p50_ms']:+.2f} ms (median of pair differences "
                              f"{one['overhead_median_pair_ms']:+.2f} ms) against an in-process p50 of "
                              f"{one['inprocess_p50_ms']:.1f} ms, i.e. within this machine's noise.")
    write_report(results, Path(args.out))
    print(f"wrote {args.out}/results.md, servers_load.json, servers_load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
