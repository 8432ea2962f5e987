#!/usr/bin/env python3
"""Load test of ``dm2s2_fast.serving.Ranker`` against two baselines, in one run.

Requests are ``ads`` batches (docs/workloads.md) of --candidates (default 8-64) candidates each,
host ``{name: (values, lengths)}`` tensors, from a seeded pool; 1 in --bad-every (20) requests is
malformed (an id out of range, a NaN feature, lengths that do not add up, an unknown modality, a
negative length) and must fail alone with ``ValueError``. Three ways to serve them:

- ``sequential``: one engine call per request, one at a time (``from_jagged`` -> engine -> host);
- ``naive``: every client thread calls the engine itself, concurrently;
- ``ranker``: clients call ``Ranker.score_jagged`` / ``submit``; one worker packs what is queued into
  ragged batches, its queue bounded by --max-queue; ``ranker+admission`` adds a latency objective,
  ``max_latency_ms`` = --admission x the unloaded p50 latency (refuse with ``Overloaded`` a request
  whose estimated wait plus own scoring time exceeds it; ``--admission-kind wait``: ``max_wait_ms``,
  the wait alone).

Closed loop at --concurrency clients (each sends its next request when the last one is answered),
then open loop at --loads x the highest closed-loop throughput measured (Poisson arrivals by
default; latency counted from each request's scheduled arrival, so a late server is charged for
it). The systems compared at one setting take turns, --rounds times, so that a shared machine's
background load falls on all of them alike (each run's end records the load average). Every response is checked against its request's own scores from a direct engine call
(relative error <= --tol); a request lost, answered twice or answered with another's scores is
counted (and must be zero). Writes results.json, results.md (tables) and latency_vs_throughput.png
to --out-dir. Bounded: --requests caps each run, --run-seconds its length, --time-limit the whole.

    python bench/load.py --out-dir bench/results/2026-12-07-load-cpu-intel-spr   # ~10 min, 2-core CPU
    python bench/load.py --quick --out-dir /tmp/load-smoke                        # < 30 s smoke test
    python bench/load.py --device cuda --dtype bf16 --cuda-graphs ...             # GPU stage
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import queue
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dm2s2_fast import DM2S2Config, SequenceSet, convert  # noqa: E402
from dm2s2_fast.reference import DM2S2  # noqa: E402
from dm2s2_fast.serving import Overloaded, Ranker  # noqa: E402
from dm2s2_fast.workloads import ads_batch  # noqa: E402

BAD_KINDS = ("id out of range", "NaN feature", "lengths do not add up", "unknown modality", "negative length")


# ---- requests --------------------------------------------------------------------------------
@dataclass
class Request:
    index: int  # position in the run's sequence
    pool: int  # pool entry (its reference scores), -1 for a malformed one
    payload: dict
    candidates: int
    bad: str | None = None


def make_pool(config, n: int, lo: int, hi: int, seed: int, dtype) -> list[tuple[dict, int]]:
    rng = random.Random(seed)
    pool = []
    for i in range(n):
        count = rng.randint(lo, hi)
        batch = ads_batch(count, config, seed=seed * 100_003 + i)
        payload = {}
        for m in config.modalities:
            values = batch.values[m.name]
            if values.is_floating_point():
                values = values.to(dtype)
            payload[m.name] = (values, batch.lengths[m.name])
        pool.append((payload, count))
    return pool


def malformed(payload: dict, kind: str, rng: random.Random, config) -> dict:
    bad = {k: (v.clone(), l.clone()) for k, (v, l) in payload.items()}
    B = int(next(iter(bad.values()))[1].numel())
    b = rng.randrange(B)
    if kind == "id out of range":
        v, l = bad["title"]
        v[int(l[:b].sum())] = config.vocab_size  # the first token of candidate b
    elif kind == "NaN feature" and int(bad["image"][1].sum()):
        v, l = bad["image"]
        v[rng.randrange(v.shape[0]), 0] = float("nan")
    elif kind == "lengths do not add up":
        bad["description"][1][b] += 1
    elif kind == "negative length":
        bad["category"][1][b] = -1
    else:  # unknown modality (also the NaN case when no candidate has an image)
        bad["audio"] = (torch.zeros(B, dtype=torch.int64), torch.ones(B, dtype=torch.int64))
    return bad


def sequence(pool, n: int, bad_every: int, seed: int, config) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randrange(len(pool))
        payload, count = pool[p]
        if bad_every and i % bad_every == bad_every - 1:
            kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            out.append(Request(i, -1, malformed(payload, kind, rng, config), count, kind))
        else:
            out.append(Request(i, p, payload, count))
    return out


# ---- one run's record ------------------------------------------------------------------------
@dataclass
class Run:
    system: str  # sequential | naive | ranker | ranker+admission
    mode: str  # closed | open
    concurrency: int | None = None
    load: float | None = None  # offered rate / capacity
    rate: float | None = None  # offered requests/s
    offered: int = 0
    malformed: int = 0
    malformed_refused: int = 0  # malformed ones that failed with ValueError
    served: int = 0
    rejected: int = 0  # Overloaded
    errors: list = field(default_factory=list)  # any other failure of a valid request
    mismatched: int = 0
    duplicated: int = 0
    lost: int = 0
    worst_rel_err: float = 0.0
    wall_s: float = 0.0
    throughput: float = 0.0  # served requests / s
    candidates_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    batch_requests: dict | None = None  # ranker: {requests per batch: batches}
    max_queue_depth: int | None = None
    load_average: float | None = None  # the machine's 1-minute load average at the run's end
    slowdown: float | None = None  # the calibration request's time during this run / at the start
    latencies_ms: list = field(default_factory=list, repr=False)


class Recorder:
    """Outcomes of one system's requests at one setting, from whichever threads answer them, over
    one or more episodes (the rounds in which it alternates with the other systems)."""

    def __init__(self, run: Run, refs, tol: float):
        self.run, self.refs, self.tol = run, refs, tol
        self.lock = threading.Lock()
        self.answers: dict[int, int] = {}
        self.candidates = 0
        self.span = 0.0  # seconds of the episodes, first send to last answer, summed
        self.wall = 0.0
        self.first = self.last = None
        self.reqs: list[Request] = []

    def start(self, t: float):
        with self.lock:
            self.first = t if self.first is None else min(self.first, t)

    def end_episode(self, reqs: list[Request], wall: float):
        with self.lock:
            if self.first is not None and self.last is not None:
                self.span += max(0.0, self.last - self.first)
            self.first = self.last = None
            self.reqs += reqs
            self.wall += wall

    def served(self, req: Request, scores: torch.Tensor, t_arrival: float, t_done: float):
        err = _rel_err(scores, self.refs[req.pool]) if req.pool >= 0 else float("inf")
        with self.lock:
            r = self.run
            self.answers[req.index] = self.answers.get(req.index, 0) + 1
            if self.answers[req.index] > 1:
                r.duplicated += 1
                return
            if req.bad is not None:
                return  # counted by finish(): a malformed request must not be answered
            r.served += 1
            self.candidates += req.candidates
            r.worst_rel_err = max(r.worst_rel_err, err)
            if not err <= self.tol:
                r.mismatched += 1
            r.latencies_ms.append((t_done - t_arrival) * 1e3)
            self.last = t_done if self.last is None else max(self.last, t_done)

    def call(self, req: Request, fn, t_arrival: float):
        """Run ``fn(req.payload)`` and record its scores or its exception."""
        try:
            scores = fn(req.payload)
        except Exception as exc:  # noqa: BLE001 - recorded
            self.failed(req, exc)
        else:
            self.served(req, scores, t_arrival, time.perf_counter())

    def failed(self, req: Request, exc: BaseException):
        with self.lock:
            r = self.run
            if req.bad is not None:
                if isinstance(exc, ValueError):
                    r.malformed_refused += 1
                else:
                    r.errors.append(f"malformed ({req.bad}) got {type(exc).__name__}: {exc}")
            elif isinstance(exc, Overloaded):
                r.rejected += 1
            else:
                r.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def finish(self) -> Run:
        r, reqs = self.run, self.reqs
        r.offered = len(reqs)
        r.malformed = sum(q.bad is not None for q in reqs)
        for q in reqs:
            if q.bad is not None and q.index in self.answers:
                r.errors.append(f"malformed ({q.bad}) was answered")
        valid = r.offered - r.malformed
        r.lost = valid - r.served - r.rejected - len([e for e in r.errors if not e.startswith("malformed")])
        r.wall_s = self.wall
        r.load_average = os.getloadavg()[0]
        if self.span > 0:
            r.throughput = r.served / self.span
            r.candidates_per_s = self.candidates / self.span
        if r.latencies_ms:
            lat = np.array(r.latencies_ms)
            r.p50_ms, r.p95_ms, r.p99_ms = (float(np.percentile(lat, q)) for q in (50, 95, 99))
            r.max_ms, r.mean_ms = float(lat.max()), float(lat.mean())
        return r


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return float("inf")
    denom = float(ref.norm())
    return float((out - ref).norm()) / (denom if denom > 0 else 1.0)


# ---- the three ways to serve -----------------------------------------------------------------
def direct(engine, config, device, payload) -> torch.Tensor:
    batch = SequenceSet.from_jagged(config, payload)
    if device.type != "cpu":
        batch = batch.to(device, non_blocking=True)
    return engine(batch).logits.float().cpu()


def closed_loop(system: str, concurrency: int, reqs, call, rec: Recorder, run_seconds: float):
    """``concurrency`` clients, each sending its next request when the last is answered."""
    it = iter(reqs)
    lock = threading.Lock()
    stop_at = time.perf_counter() + run_seconds
    sent = []

    def client():
        while time.perf_counter() < stop_at:
            with lock:
                req = next(it, None)
                if req is None:
                    return
                sent.append(req)
            t0 = time.perf_counter()
            rec.start(t0)
            rec.call(req, call, t0)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sent, time.perf_counter() - t


def open_loop_schedule(n: int, rate: float, arrivals: str, seed: int) -> np.ndarray:
    if arrivals == "uniform":
        return np.arange(n) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps) - gaps[0]


def open_loop(system: str, reqs, offsets, submit, rec: Recorder, drain_timeout: float):
    """Requests sent at their scheduled times whatever the answers; ``submit(req, t_arrival)``
    must not block for the answer (it records through ``rec``); returns a wait() for the rest."""
    start = time.perf_counter() + 0.05
    rec.start(start)
    pending = []
    for req, off in zip(reqs, offsets):
        t_arr = start + off
        delay = t_arr - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pending.append(submit(req, t_arr))
    deadline = time.perf_counter() + drain_timeout
    for wait in pending:
        if wait is not None:
            wait(max(0.0, deadline - time.perf_counter()))
    return time.perf_counter() - start


# ---- main ------------------------------------------------------------------------------------
def cpu_description() -> dict:
    info = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("Model name")
        info["family_model_stepping"] = "/".join(fields.get(k, "?") for k in ("CPU family", "Model", "Stepping"))
        flags = fields.get("Flags", "").split()
        info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                   "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
        info["hypervisor"] = fields.get("Hypervisor vendor")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        from dm2s2_fast.backends.cpp import cpu_isa
        info["cpp_isa_table"] = cpu_isa()
    except Exception as exc:  # noqa: BLE001 - informative only
        info["cpp_isa_table"] = f"unavailable ({type(exc).__name__})"
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test (< 30 s): few, small requests")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--candidates", default=None, help="lo-hi candidates per request (default 8-64; quick 2-8)")
    ap.add_argument("--pool", type=int, default=None, help="distinct valid requests (default 40; quick 6)")
    ap.add_argument("--bad-every", type=int, default=None,
                    help="1 request in this many is malformed (0: none; default 20, quick 4)")
    ap.add_argument("--concurrency", default=None, help="closed-loop client counts (default 1,4,16,64)")
    ap.add_argument("--loads", default=None, help="open-loop rates as fractions of the capacity (default 0.7,1.0,1.5)")
    ap.add_argument("--baseline-loads", default="0.7,1.5", help="open-loop loads at which the baselines also run")
    ap.add_argument("--arrivals", default="poisson", choices=["poisson", "uniform"])
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per closed-loop run at most (default 32; quick 8); at least the client count")
    ap.add_argument("--open-requests", type=int, default=None, help="requests per open-loop run at most (default 80)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="the runs' budget in seconds, after the warm-up (default 480; quick 12): each run gets a share, "
                         "its request count sized from the measured service time")
    ap.add_argument("--max-batch-rows", type=int, default=None)
    ap.add_argument("--max-delay-ms", type=float, default=None)
    ap.add_argument("--max-queue", type=int, default=8, help="the open-loop rankers' queue bound (requests)")
    ap.add_argument("--admission", type=float, default=None,
                    help="ranker+admission: the budget as this x the unloaded p50 latency (default 3.5 for "
                         "--admission-kind latency, 2 for wait)")
    ap.add_argument("--admission-kind", default="latency", choices=["latency", "wait"],
                    help="ranker+admission refuses on the estimated latency (max_latency_ms) or wait (max_wait_ms)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="the systems compared at one setting alternate in this many rounds (background load)")
    ap.add_argument("--tol", type=float, default=None,
                    help="relative error allowed against the request's own scores (default 1e-5 in fp32, 2e-2 in "
                         "bf16/fp16, where a batch's GEMM tiling may differ from the request's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="bench/results/load")
    args = ap.parse_args()

    q = args.quick
    if args.admission is None:
        args.admission = 3.5 if args.admission_kind == "latency" else 2.0
    admission_key = "max_latency_ms" if args.admission_kind == "latency" else "max_wait_ms"
    if args.bad_every is None:
        args.bad_every = 4 if q else 20
    lo, hi = (int(x) for x in (args.candidates or ("2-8" if q else "8-64")).split("-"))
    pool_size = args.pool or (6 if q else 40)
    concurrency = [int(x) for x in (args.concurrency or ("1,4" if q else "1,4,16,64")).split(",")]
    loads = [float(x) for x in (args.loads or "0.7,1.0,1.5").split(",")]
    baseline_loads = {float(x) for x in args.baseline_loads.split(",") if x}
    n_closed = args.requests or (8 if q else 32)
    n_open = args.open_requests or (12 if q else 80)
    time_limit = args.time_limit or (12.0 if q else 480.0)
    t_begin = time.perf_counter()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.tol is None:
        args.tol = 1e-5 if dtype == torch.float32 else 2e-2
    # --quick: the ads modalities on a one-layer, narrow encoder (its GEMM choices are quick to make).
    config = DM2S2Config.default_ads(**(dict(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
                                        if q else {}))
    torch.manual_seed(args.seed)
    model = DM2S2(config).eval().to(device=device, dtype=dtype)
    engine = convert(model, args.backend, cuda_graphs=args.cuda_graphs)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    pool = make_pool(config, pool_size, lo, hi, args.seed, dtype)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    log(f"load.py: {'quick, ' if q else ''}{pool_size} requests of {lo}-{hi} ads candidates, {device} {dtype}, "
        f"backend {args.backend}{' + CUDA graphs' if args.cuda_graphs else ''}, torch threads "
        f"{torch.get_num_threads()}, load average {load_before[0]:.1f}")
    # Warm-up (the cpp backend measures its GEMM choices on first use; graphs capture), then the
    # reference scores: one direct engine call per request.
    for payload, _ in pool[:2]:
        direct(engine, config, device, payload)
    t_refs = time.perf_counter()
    refs = [direct(engine, config, device, payload) for payload, _ in pool]
    if args.cuda_graphs:  # a second pass: every bucket captured before anything is timed
        t_refs = time.perf_counter()
        refs = [direct(engine, config, device, payload) for payload, _ in pool]
    service = (time.perf_counter() - t_refs) / len(pool)  # seconds per request, one at a time
    if args.cuda_graphs:  # the ranker's batches are larger: capture their buckets before timing too
        with Ranker(engine, max_queue=4 * len(pool), max_batch_rows=args.max_batch_rows) as ranker:
            for _ in range(3):
                for f in [ranker.submit(payload) for payload, _ in pool]:
                    f.result()
    log(f"warm-up and references: {time.perf_counter() - t_begin:.1f} s; {1e3 * service:.0f} ms per request alone")

    def run_open(system, reqs, offsets, rec, ranker, drain):
        """One open-loop episode of ``system``; returns its wall time."""
        if ranker is not None:
            def submit(req, t_arr):
                try:
                    fut = ranker.submit(req.payload)
                except Exception as exc:  # noqa: BLE001 - ValueError, Overloaded: recorded
                    rec.failed(req, exc)
                    return None

                def done(f, req=req, t_arr=t_arr):
                    t = time.perf_counter()
                    if f.exception() is not None:
                        rec.failed(req, f.exception())
                    else:
                        rec.served(req, f.result(), t_arr, t)
                fut.add_done_callback(done)
                return lambda timeout, f=fut: concurrent.futures.wait([f], timeout)
            return open_loop(system, reqs, offsets, submit, rec, drain)
        if system == "sequential":  # one server thread, an unbounded FIFO in front of it
            inbox: queue.Queue = queue.Queue()

            def server():
                while True:
                    item = inbox.get()
                    if item is None:
                        return
                    req, t_arr = item
                    rec.call(req, direct_call, t_arr)

            worker = threading.Thread(target=server)
            worker.start()
            wall = open_loop(system, reqs, offsets, lambda req, t: inbox.put((req, t)), rec, drain)
            inbox.put(None)
            worker.join(drain)
            return wall
        # naive: a thread per request, each calling the engine
        threads_ex = concurrent.futures.ThreadPoolExecutor(max_workers=max(8, len(reqs)))

        def submit(req, t_arr):
            fut = threads_ex.submit(rec.call, req, direct_call, t_arr)
            return lambda timeout, f=fut: concurrent.futures.wait([f], timeout)

        wall = open_loop(system, reqs, offsets, submit, rec, drain)
        threads_ex.shutdown(wait=True)
        return wall

    runs: list[Run] = []
    skipped: list[str] = []
    seeds = iter(range(1_000, 10_000))
    # The plan: groups of systems compared at one setting (closed loop: clients; open loop: load).
    # Within a group the systems alternate, round after round (--rounds), so that the background
    # load of a shared machine falls on all of them alike. Closed loop at c > 1, the baseline is
    # "naive" (one client calling the engine is the sequential loop).
    groups = [("closed", 1, ["sequential", "ranker"])]
    groups += [("closed", c, ["naive", "ranker"]) for c in concurrency if c > 1]
    groups += [("open", load, ["ranker", "ranker+admission"] + (["sequential", "naive"] if load in baseline_loads
                                                                 else [])) for load in loads]
    if 1 not in concurrency:
        groups[0] = ("closed", 1, ["sequential"])
    t_runs = time.perf_counter()

    # The open loop at the loads the targets name (70 %, 150 %) gets twice the time of the others.
    weights = [2.0 if mode == "open" and setting in (0.7, 1.5) else 1.0 for mode, setting, _ in groups]

    def share(g: int) -> float:
        """Seconds group ``g`` may take: its weighted share of what is left of the budget."""
        left = time_limit - (time.perf_counter() - t_runs) - 2.0
        return left * weights[g] / sum(weights[g:])

    def report(run: Run):
        runs.append(run)
        hist = "" if run.batch_requests is None else f" batches {run.batch_requests}"
        log(f"  {run.system:17s} {run.mode:6s} c={run.concurrency or '-':>3} load={run.load or 0:4.2f} "
            f"served {run.served:3d}/{run.offered - run.malformed:3d} rejected {run.rejected:2d} "
            f"thr {run.throughput:6.2f}/s p50 {run.p50_ms or 0:8.1f} p99 {run.p99_ms or 0:8.1f} "
            f"max {run.max_ms or 0:8.1f} ms  bad-refused {run.malformed_refused}/{run.malformed} "
            f"lost {run.lost} dup {run.duplicated} mismatched {run.mismatched} errors {len(run.errors)}"
            f"{hist} (load avg {run.load_average:.1f}, slowdown {run.slowdown:.2f})")

    def ranker_options(**extra):
        opts = dict(max_batch_rows=args.max_batch_rows, max_delay_ms=args.max_delay_ms)
        opts.update(extra)
        return opts

    def direct_call(payload):
        return direct(engine, config, device, payload)

    def episodes(reqs: list[Request], rounds: int) -> list[list[Request]]:
        size = -(-len(reqs) // rounds)
        return [reqs[i:i + size] for i in range(0, len(reqs), size)]

    def close_rankers(rankers: dict, group_runs: dict):
        for system, ranker in rankers.items():
            ranker.close()
            stats = ranker.stats()
            group_runs[system].batch_requests = stats["batch_requests"]
            group_runs[system].max_queue_depth = stats["max_queue_depth"]

    # Calibration: one mid-sized request, timed alone before every round. Its time against the
    # first measurement is the background slowdown of the shared machine at that moment: the
    # open loop offers its load against the capacity scaled by it, and each run reports it.
    cal_payload = sorted(pool, key=lambda pc: pc[1])[len(pool) // 2][0]

    def calibrate(reps: int = 2) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            direct_call(cal_payload)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    cal0 = calibrate(3)
    log(f"calibration request ({sorted(pool, key=lambda pc: pc[1])[len(pool) // 2][1]} candidates): "
        f"{1e3 * cal0:.0f} ms")
    unloaded = None
    capacity = None
    budget_ms = None
    for g, (mode, setting, systems) in enumerate(groups):
        budget = share(g)
        if mode == "closed":
            c = setting
            n = min(n_closed, int(budget / len(systems) / service))
            if n < c:  # every client sends at least one request, or the group is skipped
                if c * service * len(systems) > 3 * budget and c > 1:
                    skipped.append(f"closed c={c}")
                    log(f"  skipped closed c={c}: {len(systems)} x {c} requests would take "
                        f"~{len(systems) * c * service:.0f} s, the share left is {budget:.0f} s")
                    continue
                n = c
            n = max(n, 3)
            rounds = max(1, min(args.rounds, n // max(2 * c, 4)))  # each client sends 2+ per round
            log(f"closed loop, {c} clients: {n} requests per system in {rounds} rounds")
        else:
            if unloaded is None:
                raise RuntimeError("the open loop needs the closed-loop runs first")
            if capacity is None:
                capacity = max(r.throughput for r in runs if r.mode == "closed")
                log(f"unloaded p50 {unloaded.p50_ms:.1f} ms (sequential, one request at a time); capacity "
                    f"{capacity:.2f} requests/s (the best closed-loop run); admission {admission_key} {budget_ms:.0f}")
            load = setting
            rate = load * capacity
            # arrivals take n / rate; a server that refuses nothing works n x service
            n = max(8, min(n_open, int(budget / len(systems) / max(1.0 / rate, service))))
            rounds = max(1, min(args.rounds, n // 16))  # episodes of 16+ requests: queues build up
            log(f"open loop at {load:.0%} of capacity ({rate:.2f} requests/s, {args.arrivals} arrivals): "
                f"{n} requests per system in {rounds} rounds")
        group_runs = {sys_: Run(sys_, mode, concurrency=setting if mode == "closed" else None,
                                load=setting if mode == "open" else None,
                                rate=setting * capacity if mode == "open" else None) for sys_ in systems}
        recs = {sys_: Recorder(group_runs[sys_], refs, args.tol) for sys_ in systems}
        group_seed = next(seeds)  # every system of the group gets the same requests, in the same order
        plans = {sys_: episodes(sequence(pool, n, args.bad_every, group_seed, config), rounds) for sys_ in systems}
        rankers = {}
        for sys_ in systems:
            if sys_.startswith("ranker"):
                if mode == "closed":
                    rankers[sys_] = Ranker(engine, max_queue=max(256, 2 * setting), **ranker_options())
                else:
                    extra = {admission_key: budget_ms} if sys_ == "ranker+admission" else {}
                    rankers[sys_] = Ranker(engine, max_queue=args.max_queue, **ranker_options(**extra))
        try:
            slowdowns = []
            for k in range(rounds):
                slowdowns.append(calibrate() / cal0)
                for sys_ in systems:
                    if k >= len(plans[sys_]):
                        continue
                    reqs, rec = plans[sys_][k], recs[sys_]
                    if mode == "closed":
                        cap = max(2 * budget / rounds / len(systems), 2 * len(reqs) * service)
                        call = rankers[sys_].score_jagged if sys_ in rankers else direct_call
                        sent, wall = closed_loop(sys_, setting, reqs, call, rec, cap)
                        rec.end_episode(sent, wall)
                    else:
                        # the load against what the machine can do now
                        offsets = open_loop_schedule(len(reqs), rate / slowdowns[-1], args.arrivals,
                                                     group_seed * 100 + k)  # the same arrivals for each system
                        wall = run_open(sys_, reqs, offsets, rec, rankers.get(sys_), 120.0 + 3 * len(reqs) * service)
                        rec.end_episode(reqs, wall)
        finally:
            close_rankers(rankers, group_runs)
        for sys_ in systems:
            group_runs[sys_].slowdown = float(np.mean(slowdowns))
            if mode == "open":
                group_runs[sys_].rate = float(np.mean([rate / x for x in slowdowns]))
            report(recs[sys_].finish())
        if mode == "closed" and setting == 1:
            unloaded = next(r for r in runs if r.system == "sequential")
            service = unloaded.mean_ms / 1e3
            budget_ms = args.admission * unloaded.p50_ms

    closed = [r for r in runs if r.mode == "closed"]

    # ---- verdicts ----
    total_wall = time.perf_counter() - t_begin
    best_baseline = max((r for r in closed if r.system != "ranker"), key=lambda r: r.throughput)
    best_ranker = max((r for r in closed if r.system == "ranker"), key=lambda r: r.throughput, default=None)

    def at(system, load):
        return next((r for r in runs if r.mode == "open" and r.system == system and r.load == load), None)

    targets = {}
    if best_ranker is not None:
        targets["max throughput >= 0.95x the better baseline"] = dict(
            ranker=best_ranker.throughput, ranker_run=f"c={best_ranker.concurrency}",
            baseline=best_baseline.throughput, baseline_run=f"{best_baseline.system} c={best_baseline.concurrency}",
            ratio=best_ranker.throughput / best_baseline.throughput,
            candidates_per_s=dict(ranker=best_ranker.candidates_per_s, baseline=best_baseline.candidates_per_s),
            met=best_ranker.throughput >= 0.95 * best_baseline.throughput)
    for load, factor, system in ((0.7, 4, "ranker"), (0.7, 4, "ranker+admission"),
                                 (1.5, 5, "ranker+admission"), (1.5, 5, "ranker")):
        r = at(system, load)
        if r is None or r.p99_ms is None:
            continue
        key = f"{system} at {load:.0%} load: p99 <= {factor}x unloaded p50"
        targets[key] = dict(p99_ms=r.p99_ms, bound_ms=factor * unloaded.p50_ms, ratio=r.p99_ms / unloaded.p50_ms,
                            rejected=r.rejected, served=r.served, met=r.p99_ms <= factor * unloaded.p50_ms,
                            baselines_p99_ms={s: getattr(at(s, load), "p99_ms", None) for s in ("sequential", "naive")})
    if device.type == "cuda":  # the GPU targets: c=64 vs the sequential loop
        r64 = next((r for r in closed if r.system == "ranker" and r.concurrency == 64), None)
        if r64 is not None:
            targets["GPU: ranker at c=64 >= 10x the sequential loop's throughput"] = dict(
                ranker=r64.throughput, ranker_run="c=64", baseline=unloaded.throughput, baseline_run="sequential c=1",
                ratio=r64.throughput / unloaded.throughput, met=r64.throughput >= 10 * unloaded.throughput)
            targets["GPU: ranker at c=64 p99 <= 5 ms"] = dict(
                p99_ms=r64.p99_ms, bound_ms=5.0, ratio=r64.p99_ms / unloaded.p50_ms, rejected=r64.rejected,
                served=r64.served, met=r64.p99_ms <= 5.0, baselines_p99_ms={})
    integrity = dict(lost=sum(r.lost for r in runs), duplicated=sum(r.duplicated for r in runs),
                     mismatched=sum(r.mismatched for r in runs), errors=sum(len(r.errors) for r in runs),
                     malformed=sum(r.malformed for r in runs), malformed_refused=sum(r.malformed_refused for r in runs),
                     worst_rel_err=max(r.worst_rel_err for r in runs))
    integrity["met"] = (integrity["lost"] == integrity["duplicated"] == integrity["mismatched"] == integrity["errors"] == 0
                        and integrity["malformed"] == integrity["malformed_refused"])
    env = dict(cpu=cpu_description(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
               python=platform.python_version(), device=str(device), dtype=str(dtype), backend=args.backend,
               cuda_graphs=args.cuda_graphs, cuda_device=torch.cuda.get_device_name() if device.type == "cuda" else None,
               load_average_before=load_before, load_average_after=os.getloadavg(),
               date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), total_wall_s=total_wall)
    settings = dict(candidates=[lo, hi], pool=pool_size, bad_every=args.bad_every, arrivals=args.arrivals,
                    rounds=args.rounds,
                    closed_requests_max=n_closed, open_requests_max=n_open, time_limit_s=time_limit,
                    max_batch_rows=args.max_batch_rows, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
                    admission=admission_key, admission_factor=args.admission, admission_budget_ms=budget_ms,
                    tol=args.tol, seed=args.seed)
    summary = dict(unloaded_p50_ms=unloaded.p50_ms, unloaded_p99_ms=unloaded.p99_ms, capacity_rps=capacity)
    result = dict(env=env, settings=settings, summary=summary, targets=targets, integrity=integrity,
                  skipped=skipped, runs=[asdict(r) for r in runs])
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(result))
    try:
        plot(result, out_dir / "latency_vs_throughput.png")
    except ImportError as exc:
        log(f"no plot: {exc}")
    log(f"\n{markdown(result)}")
    log(f"wrote {out_dir}/results.json, results.md, latency_vs_throughput.png in {total_wall:.0f} s")
    return 0 if integrity["met"] else 1


def markdown(result: dict) -> str:
    env, s, summ = result["env"], result["settings"], result["summary"]
    cpu = env["cpu"]
    lines = [
        f"# Ranker load test ({env['date']})", "",
        f"- machine: {cpu.get('model')} ({cpu.get('cores')} cores, {cpu.get('family_model_stepping')}, "
        f"hypervisor {cpu.get('hypervisor')}), ISA {', '.join(cpu.get('isa', []))}; cpp kernel table "
        f"`{cpu.get('cpp_isa_table')}`; {env['device']} {env['dtype']}, backend `{env['backend']}`"
        f"{' + CUDA graphs on ' + str(env['cuda_device']) if env['cuda_graphs'] else ''}; torch {env['torch']}, "
        f"{env['torch_threads']} threads",
        f"- load average (1, 5, 15 min) before {tuple(round(x, 1) for x in env['load_average_before'])}, after "
        f"{tuple(round(x, 1) for x in env['load_average_after'])} (other jobs share this machine)",
        f"- requests: `ads`, {s['candidates'][0]}-{s['candidates'][1]} candidates, pool of {s['pool']}, 1 in "
        f"{s['bad_every']} malformed; open loop: {s['arrivals']} arrivals; ranker queue {s['max_queue']}, "
        f"ranker+admission: `{s['admission']}` = {s['admission_factor']:g} x unloaded p50 = "
        f"{s['admission_budget_ms']:.0f} ms",
        f"- unloaded latency (sequential, one request at a time): p50 {summ['unloaded_p50_ms']:.1f} ms, "
        f"p99 {summ['unloaded_p99_ms']:.1f} ms; capacity (best closed loop) {summ['capacity_rps']:.2f} requests/s",
        f"- command: `{env['command']}` ({env['total_wall_s']:.0f} s)", "",
        "| system | loop | clients / load | offered req/s | served | rejected | throughput req/s | cand/s "
        "| p50 ms | p95 ms | p99 ms | max ms | requests per batch: batches | load avg | slowdown |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in result["runs"]:
        where = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['load']:.0%}"
        hist = "-" if r["batch_requests"] is None else " ".join(f"{k}:{v}" for k, v in r["batch_requests"].items())
        lines.append(f"| {r['system']} | {r['mode']} | {where} | {f(r['rate'])} | {r['served']}/"
                     f"{r['offered'] - r['malformed']} | {r['rejected']} | {r['throughput']:.2f} | "
                     f"{r['candidates_per_s']:.0f} | {f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p99_ms'])} | "
                     f"{f(r['max_ms'])} | {hist} | {f(r['load_average'])} | {r['slowdown']:.2f} |")
    lines += ["", f"Targets (issue #18, {'GPU and ' if env['device'].startswith('cuda') else ''}CPU):", ""]
    for key, t in result["targets"].items():
        verdict = "**met**" if t["met"] else "**not met**"
        if "ratio" in t and "ranker" in t and "baseline" in t:
            cands = t.get("candidates_per_s")
            extra = "" if not cands else (f"; in candidates/s {cands['ranker']:.0f} vs {cands['baseline']:.0f} "
                                          f"({cands['ranker'] / cands['baseline']:.2f}x)")
            lines.append(f"- {key}: {verdict} — ranker ({t['ranker_run']}) {t['ranker']:.2f} req/s vs {t['baseline_run']} "
                         f"{t['baseline']:.2f} ({t['ratio']:.2f}x){extra}")
        else:
            base = ", ".join(f"{k} {f(v)} ms" for k, v in t["baselines_p99_ms"].items())
            lines.append(f"- {key}: {verdict} — p99 {t['p99_ms']:.0f} ms = {t['ratio']:.2f}x "
                         f"(bound {t['bound_ms']:.0f} ms), {t['served']} served, {t['rejected']} refused "
                         f"(Overloaded); baselines' p99 at this load: {base}")
    i = result["integrity"]
    lines += ["", f"Integrity over every run: {i['lost']} lost, {i['duplicated']} duplicated, {i['mismatched']} "
                  f"mis-routed or wrong (worst relative error {i['worst_rel_err']:.1e}), {i['errors']} other errors; "
                  f"{i['malformed_refused']} of {i['malformed']} malformed requests refused alone with ValueError."]
    if result["skipped"]:
        lines += ["", f"Skipped for time: {', '.join(result['skipped'])}."]
    lines += ["", "p99 is interpolated between the two slowest of each run's requests when a run has under "
                  "100 of them; latency counts from each request's scheduled arrival (open loop) or its send "
                  "(closed loop) to its scores on the host. The systems of one row group took turns in "
                  f"{s.get('rounds', 1)} rounds. *slowdown*: a mid-sized calibration request timed alone before "
                  "each round, against its time at the start (1.00: as quiet as then; other jobs share this "
                  "machine); the open loop's offered rate (column 4) is the load times the capacity divided by "
                  "it. *load avg*: the 1-minute load average at the run's end, this benchmark's own threads "
                  "included (64 of them in a naive c=64 run)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"ranker": ("C0", "o"), "ranker+admission": ("C2", "D"), "sequential": ("C1", "s"), "naive": ("C3", "^")}
    for system, (color, marker) in styles.items():
        for mode, line in (("closed", "-"), ("open", "--")):
            order = (lambda r: r["concurrency"]) if mode == "closed" else (lambda r: r["load"])  # noqa: E731
            pts = [(r["throughput"], r["p99_ms"], r) for r in sorted(
                (r for r in result["runs"] if r["system"] == system and r["mode"] == mode and r["p99_ms"] is not None),
                key=order)]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], line, color=color, marker=marker,
                    label=f"{system} ({mode} loop)")
            for x, y, r in pts:
                tag = f"c={r['concurrency']}" if mode == "closed" else f"{r['load']:.0%}"
                if r["rejected"]:
                    tag += f", {r['rejected']} refused"
                ax.annotate(tag, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    u = result["summary"]["unloaded_p50_ms"]
    for factor, style in ((4, ":"), (5, "-.")):
        ax.axhline(factor * u, color="grey", linestyle=style, linewidth=1, label=f"{factor}x unloaded p50")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (served requests / s)")
    ax.set_ylabel("p99 latency (ms)")
    env = result["env"]
    ax.set_title(f"Ranker vs baselines: ads requests, {env['device']} {env['dtype'].replace('torch.', '')}, "
                 f"{env['cpu'].get('cores')} cores", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
