"""Eager engine vs torch.compile vs an AOTInductor package, on the `ads` workload, in one run.

    python bench/export.py [--out-dir DIR] [--sizes 1,16,64] [--backend auto] [--rounds 40,12,6]

Per batch size: the same seeded `ads` batch (dm2s2_fast.workloads.ads_batch) and the same seeded
weights for the three; each batch's layout is built once, before timing (host work the three share;
docs/export.md). The three variants alternate call by call (round-robin, a fresh order each round) so
that machine noise hits them alike; after warm-up calls, the median and p90 of the rounds are reported.
Writes results.md and results.json under --out-dir (default: bench/results/<date>-export-cpu).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import dm2s2_fast as dm
from dm2s2_fast.export import aoti_package
from dm2s2_fast.config import DM2S2Config
from dm2s2_fast.reference import DM2S2
from dm2s2_fast.workloads import ads_batch

OUTPUTS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")


def cpu_description() -> dict:
    """Model name, flags of interest and core counts from lscpu (Linux), else platform's."""
    info = {"model": platform.processor() or platform.machine(), "isa": "", "cpus": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["model"] = fields.get("Model name", info["model"])
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8"]
    info["isa"] = " ".join(f for f in wanted if f in flags)
    for key in ("Thread(s) per core", "Core(s) per socket", "Socket(s)", "L2 cache", "L3 cache"):
        if key in fields:
            info[key] = fields[key]
    return info


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class OthersCPU:
    """The share of the machine's CPU time that other processes took while the block ran: the
    machine's busy time (/proc/stat) minus this process's (os.times), over wall time × CPUs."""

    def __enter__(self):
        self.start, self.own, self.wall = _cpu_jiffies(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end, own, wall = _cpu_jiffies(), os.times(), time.perf_counter()
        self.percent = None
        if self.start is not None and end is not None:
            hz = os.sysconf("SC_CLK_TCK")
            busy = (end[0] - self.start[0]) / hz
            mine = (own.user - self.own.user) + (own.system - self.own.system)
            self.percent = max(0.0, 100.0 * (busy - mine) / ((wall - self.wall) * (os.cpu_count() or 1)))
        return False


def wait_for_quiet(percent: float, timeout: float, probe: float = 3.0) -> tuple[float, float]:
    """Wait (at most ``timeout`` s) until other processes take less than ``percent`` of the CPUs over
    a ``probe``-second window; returns (seconds waited, the last probe's percent)."""
    start = time.perf_counter()
    while True:
        with OthersCPU() as others:
            time.sleep(probe)
        last = others.percent if others.percent is not None else 0.0
        if last < percent or time.perf_counter() - start >= timeout:
            return time.perf_counter() - start, last


def timed(fn, batch) -> float:
    start = time.perf_counter()
    fn(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--sizes", default="1,16,64")
    parser.add_argument("--rounds", default="40,12,6", help="timed rounds per size (one per size, or one for all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--package-batch", type=int, default=16, help="B of the example batch given to aoti_package")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before timing, wait up to this many seconds for other processes to go quiet")
    parser.add_argument("--quiet-percent", type=float, default=10.0, help="'quiet': others take < this % of the CPUs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = rounds * len(sizes) if len(rounds) == 1 else rounds
    if len(rounds) != len(sizes):
        parser.error("--rounds takes one count, or one per size")
    date = datetime.date.today().isoformat()
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{date}-export-cpu")
    os.makedirs(out_dir, exist_ok=True)
    wall = time.perf_counter()
    load_before = os.getloadavg()

    torch.manual_seed(0)
    config = DM2S2Config.default_ads()
    model = DM2S2(config).eval()
    engine = dm.convert(model, args.backend)

    compile_seconds: dict[int, float] = {}
    compiled_engine = torch.compile(engine, fullgraph=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = aoti_package(engine, ads_batch(args.package_batch, config), os.path.join(tmp, "ads.pt2"))
        package_seconds = time.perf_counter() - start
        package_bytes = os.path.getsize(path)
        packaged = dm.load_package(path)

    variants = {"eager": engine, "compiled": compiled_engine, "package": packaged}
    prepared = []
    for B in sizes:  # compile (and check) everything first, so that the timing phase compiles nothing
        batch = ads_batch(B, config)
        batch.layout  # host work, shared: built before any timing
        eager_out = engine(batch)
        backends = dict(engine.last_backends)
        start = time.perf_counter()
        compiled_out = compiled_engine(batch)  # compiles (or recompiles) for this shape
        compile_seconds[B] = time.perf_counter() - start
        parity = {}
        for name, out in (("compiled", compiled_out), ("package", packaged(batch))):
            parity[name] = max(rel_err(getattr(out, k), getattr(eager_out, k)) for k in OUTPUTS)
        prepared.append((B, batch, backends, parity))
        print(f"B={B}: first compiled call {compile_seconds[B]:.1f} s; parity {parity}", flush=True)

    waited, quiet = wait_for_quiet(args.quiet_percent, args.wait_quiet)
    print(f"waited {waited:.0f} s for others' CPU < {args.quiet_percent}% (last probe {quiet:.0f}%)", flush=True)
    rows = []
    for (B, batch, backends, parity), n_rounds in zip(prepared, rounds):
        for _ in range(args.warmup):
            for fn in variants.values():
                fn(batch)
        times = {name: [] for name in variants}
        order = list(variants)
        rng = random.Random(B)
        with OthersCPU() as others:
            for _ in range(n_rounds):
                rng.shuffle(order)
                for name in order:
                    times[name].append(timed(variants[name], batch))
        row = {"B": B, "rows": batch.num_elements, "rounds": n_rounds, "compile_s": compile_seconds[B],
               "parity": parity, "backends": backends, "others_cpu_percent": others.percent}
        for name, ts in times.items():
            ts = sorted(ts)
            row[name] = {"median_ms": 1e3 * statistics.median(ts), "p90_ms": 1e3 * ts[int(0.9 * (len(ts) - 1))],
                         "min_ms": 1e3 * ts[0]}
        rows.append(row)
        print(f"B={B}: " + ", ".join(f"{n} {row[n]['median_ms']:.2f} ms" for n in variants)
              + f"; others' CPU {_pct(others.percent)} %", flush=True)

    cpu = cpu_description()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "backend": args.backend,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
              "inductor_caches": "off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)"
              if os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "0") not in ("", "0") else "on",
              "package_seconds": package_seconds, "package_bytes": package_bytes,
              "package_batch": args.package_batch, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "waited_for_quiet_s": waited, "wall_seconds": time.perf_counter() - wall,
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "rows": rows}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(report(result))
    print(f"wrote {out_dir}/results.md", flush=True)


def report(r: dict) -> str:
    cpu = r["cpu"]
    backends = sorted({b for row in r["rows"] for b in row["backends"].values()})
    lines = [
        "# Eager vs torch.compile vs AOTInductor package — `ads` workload, CPU",
        "",
        f"- **date** {r['date']} · **cpu** {cpu['model']} ({cpu.get('Core(s) per socket', '?')} cores × "
        f"{cpu.get('Thread(s) per core', '?')} threads/core, {cpu['cpus']} CPUs) · **threads** {r['threads']}",
        f"- **ISA** {cpu['isa'] or 'unknown'}",
        f"- **torch** {r['torch']} · **python** {r['python']} · fp32 · model: DM²S² `ads` shape (d=384, 12 heads, "
        "6 layers, FFN 1536), seeded weights, seeded `ads_batch(B)`",
        f"- **engine** `dm2s2_fast.convert(model, {r['backend']!r})` (kernels: {', '.join(backends)}); **compiled** "
        "`torch.compile(engine, fullgraph=True)`; **package** `dm2s2_fast.aoti_package(engine, ads_batch("
        f"{r['package_batch']}), path)` then `dm2s2_fast.load_package(path)`: built in {r['package_seconds']:.0f} s, "
        f"{r['package_bytes'] / 2**20:.1f} MiB",
        f"- **command** `{r['command']}` · **wall** {r['wall_seconds']:.0f} s (of which {r['waited_for_quiet_s']:.0f} s "
        f"waiting for a quiet machine before timing) · load average before / after "
        f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f}",
        "- per call, wall clock (perf_counter), after warm-up; the three variants alternate call by call in a "
        "shuffled order each round; each batch's layout is built once before timing (the three share that "
        "host work); **parity** = the largest relative error of the six outputs against the eager engine; "
        "**others' CPU %** = the share of the machine's CPU time other processes took during the timed rounds "
        "(/proc/stat less this process)",
        f"- OMP_WAIT_POLICY={r['omp_wait_policy']} · Inductor caches {r.get('inductor_caches', '?')} (with them on, "
        "the compile times below are those of a cache hit)",
        "",
        "| B | packed rows | eager ms | compiled ms | package ms | compiled / eager | package / eager | "
        "first compiled call s | rounds | parity compiled | parity package | others' CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        e, c, p = (row[n]["median_ms"] for n in ("eager", "compiled", "package"))
        lines.append(f"| {row['B']} | {row['rows']} | {_ms(e)} | {_ms(c)} | {_ms(p)} | {c / e:.3f} | {p / e:.3f} | "
                     f"{row['compile_s']:.1f} | {row['rounds']} | {row['parity']['compiled']:.1e} | "
                     f"{row['parity']['package']:.1e} | {_pct(row['others_cpu_percent'])} |")
    lines += ["", "p90 (ms):", "",
              "| B | eager | compiled | package |", "|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['B']} | " + " | ".join(_ms(row[n]["p90_ms"]) for n in ("eager", "compiled", "package"))
                     + " |")
    lines.append("")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:  # re-render results.md from a results.json
        with open(sys.argv[2]) as f:
            print(report(json.load(f)), end="")
    else:
        main()
