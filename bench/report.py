"""Run the dm2s2_fast benchmark suite and write its report (``python -m dm2s2_fast bench`` runs this).

    python bench/report.py                      # this machine's default grid
    python bench/report.py --quick              # B in {1, 64}, shorter timing
    python bench/report.py --device cuda --sizes 1,16,64,256 --dtype bfloat16
    python bench/report.py --providers floor,torch,cpp,hf --sizes 64
    python bench/report.py --render bench/results/<dir>/benchmark.json   # re-render, no run
    python bench/report.py -- -x                # anything after -- goes to pytest

Writes, under ``bench/results/<YYYY-MM-DD>-<device>/`` (or ``--out-dir``):
``benchmark.json`` (pytest-benchmark, with ``extra_info`` per result and a ``dm2s2_fast`` section
holding the environment and the skipped/failed providers with their reasons), ``results.md``
(provider × B: median, p90, ratio to the floor, speed-up vs Hugging Face), ``latency.png``
(median latency vs batch size per provider) and ``pytest.log``. Killed by an outer time limit
(SIGTERM), it stops pytest and renders the rows already finished (``partial.jsonl``). Prints the markdown at the end.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from providers import LABELS, PROVIDERS as ORDER  # noqa: E402

SCOPES = {"model": "full model", "encoder": "encoder", "floor": "linears", "pool": "pool+head"}


def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$|processor", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"


def device_slug(device: str) -> str:
    import torch

    if device == "cuda":
        return _slug(torch.cuda.get_device_name(torch.cuda.current_device()))
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1] for ln in f if ln.lower().startswith("model name")), "")
    except OSError:
        pass
    return f"cpu-{_slug(model or 'cpu')}-{os.cpu_count()}c"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dm2s2_fast bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B in {1, 64}, shorter timing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes, run in this order (default cpu 1,16,64; cuda 64,256,16,1)")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                        help="default: cpu float32, cuda bfloat16")
    parser.add_argument("--out-dir", default=None, help="default: bench/results/<YYYY-MM-DD>-<device>/")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per test")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="seconds the run may wait, in all, for other processes to leave the CPUs "
                             "before timing a row (default: cpu 60, cuda 0)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="skip the tests that would start after this many seconds (default: cuda 150)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only render results.md and latency.png from an existing benchmark.json")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser.parse_args(argv)


def run_suite(args, out_dir: str) -> int:
    json_path = os.path.join(out_dir, "benchmark.json")
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench_model.py"), "-p", "no:cacheprovider",
           "-q", "-rsfE",
           "-W", "ignore::UserWarning", "-W", "ignore::FutureWarning",
           f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,min,max,rounds",
           "--benchmark-sort=name", "--bench-device", args.device]
    if args.quick:
        cmd.append("--quick")
    for flag, value in (("--sizes", args.sizes), ("--providers", args.providers), ("--bench-dtype", args.dtype),
                        ("--bench-budget", args.budget), ("--bench-deadline", args.deadline),
                        ("--bench-quiet-wait", args.quiet_wait)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += list(args.pytest_args)
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    partial = os.path.join(out_dir, "partial.jsonl")
    open(partial, "w").close()
    env["DM2S2_BENCH_PARTIAL"] = partial
    for stale in ("benchmark.json",):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))

    def on_term(signum, frame):  # an outer `timeout`: stop pytest, keep what was measured
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals the whole group, maybe twice
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(out_dir, "pytest.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        except (_Terminated, KeyboardInterrupt):
            msg = "\nreport.py: interrupted — stopping pytest, rendering what was measured\n"
            sys.stdout.write(msg)
            log.write(msg)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 124
        finally:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(Exception):
    pass


def _valid_json(path: str) -> bool:
    try:
        with open(path) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def synthesize(partial: str, json_path: str) -> bool:
    """A benchmark.json from the rows pytest finished, when it did not get to write its own."""
    benchmarks, outcomes = [], []
    try:
        with open(partial) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "benchmark" in record:
                    benchmarks.append(record["benchmark"])
                elif "outcome" in record:
                    outcomes.append(record["outcome"])
    except OSError:
        return False
    if not benchmarks and not outcomes:
        return False
    env = next((b["extra_info"].get("env") for b in benchmarks if b.get("extra_info", {}).get("env")), {})
    data = {"datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(), "benchmarks": benchmarks,
            "partial": True, "dm2s2_fast": {"env": env, "outcomes": outcomes}}
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    return True


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def load(json_path: str) -> tuple[dict, dict, list]:
    with open(json_path) as f:
        data = json.load(f)
    rows = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        provider, B = info.get("provider"), info.get("B")
        if provider is None or B is None:
            continue
        stats = bench.get("stats", {})
        median = info.get("median_ms", 1e3 * stats.get("median", math.nan))
        rows[(provider, B)] = dict(info, median_ms=median, p90_ms=info.get("p90_ms", math.nan))
    meta = data.get("dm2s2_fast", {})
    return data, rows, meta.get("outcomes", [])


def _fmt_ms(x) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    return f"{x:.3g}" if x < 10 else f"{x:.0f}" if x >= 1000 else f"{x:.1f}"


def _fmt_x(x) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def render(json_path: str, out_dir: str, command: str | None = None, wall_s: float | None = None) -> str:
    data, rows, outcomes = load(json_path)
    meta = data.get("dm2s2_fast", {})
    command = command or meta.get("command")
    wall_s = wall_s or meta.get("wall_s")
    env = meta.get("env") or next((r.get("env") for r in rows.values() if r.get("env")), {})
    sizes = sorted({B for (_, B) in rows} | {o["B"] for o in outcomes if isinstance(o.get("B"), int)})
    # Providers of today's table order first, then any a recorded run has that the suite no longer
    # times (a re-rendered old benchmark.json keeps its rows).
    providers = [p for p in ORDER if any((p, B) in rows for B in sizes)]
    providers += sorted({p for (p, _) in rows} - set(providers))
    missing = {}
    for o in outcomes:
        missing.setdefault(o["provider"], []).append(o)

    lines = ["# dm2s2_fast benchmark — `ads` workload (docs/workloads.md)", ""]
    when = data.get("datetime", "")[:19].replace("T", " ")
    device = env.get("gpu") or env.get("cpu_model", "?")
    lines.append(f"- **date** {when} UTC · **device** {env.get('device', '?')}: {device}"
                 + (f" (driver {env.get('driver')}, CUDA {env.get('cuda')})" if env.get("gpu") else
                    f" · **threads** {env.get('threads')} of {env.get('cpu_count')} CPUs"))
    lines.append(f"- **torch** {env.get('torch')} · **dtype** {env.get('dtype')} · "
                 f"model: DM²S² all-MiniLM-L6 shape (d=384, 12 heads, 6 layers, FFN 1536), seeded weights and batches")
    if command:
        lines.append(f"- **command** `{command}`" + (f" · **wall** {wall_s:.0f} s" if wall_s else ""))
    if data.get("partial"):
        lines.append("- **partial run**: stopped before the end (outer time limit); these are the rows it finished")
    noisy = sorted(((r["other_cpu_pct"], p, B) for (p, B), r in rows.items()
                    if (r.get("other_cpu_pct") or 0) > 10), reverse=True)
    if noisy:
        where = ", ".join(f"{LABELS.get(p, p)} B={B} ({pct:.0f} %)" for pct, p, B in noisy[:6])
        lines.append(f"- **noisy rows**: other processes used > 10 % of this machine's CPUs while these were "
                     f"timed: {where}{' …' if len(noisy) > 6 else ''} (column *others' CPU %*); their absolute "
                     f"numbers are unreliable, rerun on a quiet machine")
    lines += ["- latency: per call, after warm-up, "
              + ("CUDA events" if env.get("device") == "cuda" else "wall clock (perf_counter)")
              + "; **× floor** = median / the median of the floor timed between this row's rounds "
              "(floor and provider alternate, so machine noise hits both alike; on CPU each timed call follows an "
              "untimed call of its own, so neither is timed in the other's allocator state); "
              "**vs HF** = HF median / median (> 1: faster than Hugging Face); GFLOP/s counts the useful "
              "(packed-token) FLOPs of the row's scope, so padding shows up as lost GFLOP/s.", ""]

    # ---- overview
    lines += ["## Median latency (ms) and ratio to the floor", "",
              "| provider | scope | " + " | ".join(f"B={B}" for B in sizes) + " |",
              "|---|---|" + "---:|" * len(sizes)]
    for p in providers:
        scope = next((rows[(p, B)].get("scope") for B in sizes if (p, B) in rows), "")
        cells = []
        for B in sizes:
            r = rows.get((p, B))
            cells.append("skipped" if r is None else f"{_fmt_ms(r['median_ms'])} ({_fmt_x(r.get('ratio_to_floor'))})")
        lines.append(f"| {LABELS.get(p, p)} | {SCOPES.get(scope, scope)} | " + " | ".join(cells) + " |")
    lines.append("")

    # ---- one table per B
    for B in sizes:
        any_row = next((rows[(p, B)] for p in providers if (p, B) in rows), None)
        if any_row is None:
            continue
        hf = rows.get(("hf", B), {}).get("median_ms")
        lines += [f"## B = {B}: {any_row.get('packed_tokens')} packed tokens, {any_row.get('padded_tokens')} padded "
                  f"({any_row.get('padding_factor')}×, longest sample {any_row.get('max_len')}); "
                  f"floor {_fmt_ms(rows.get(('floor', B), any_row).get('floor_ms'))} ms", "",
                  "| provider | scope | median ms | p90 ms | floor ms | × floor | vs HF | GFLOP/s | rounds "
                  "| parity (rel. err) | others' CPU % |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in providers:
            r = rows.get((p, B))
            if r is None:
                continue
            speedup = hf / r["median_ms"] if hf and r["median_ms"] and r.get("scope") in ("model", "encoder") else None
            err = r.get("parity_rel_err_timed", r.get("parity_rel_err"))
            err = "oracle" if p == "reference" and not err else "—" if err is None else f"{err:.1e}"
            busy = r.get("other_cpu_pct")
            lines.append(f"| {LABELS.get(p, p)} | {SCOPES.get(r.get('scope'), r.get('scope'))} | "
                         f"{_fmt_ms(r['median_ms'])} | {_fmt_ms(r['p90_ms'])} | {_fmt_ms(r.get('floor_ms'))} | "
                         f"{_fmt_x(r.get('ratio_to_floor'))} | "
                         f"{_fmt_x(speedup)} | {r.get('gflops_per_s', '—')} | {r.get('rounds', '—')} | "
                         f"{err} | {'—' if busy is None else busy} |")
        lines.append("")

    if missing:
        lines += ["## Skipped and failed", ""]
        for p in list(ORDER) + sorted(set(missing) - set(ORDER)):
            for o in _dedupe(missing.get(p, [])):
                lines.append(f"- **{LABELS.get(p, p)}** ({o['outcome']}, B={o['B']}): {o['reason']}")
        lines.append("")

    lines += ["## What each row runs", ""]
    for p in providers + [p for p in missing if p not in providers]:
        desc = meta.get("descriptions", {}).get(p)
        if desc:
            lines.append(f"- **{LABELS.get(p, p)}**: {desc}")
    lines += ["", "Scopes: *full model* = embeddings + encoder + IntraMRA + InterMRA + head on the `SequenceSet`; "
              "*encoder* = the peers: embedding epilogue (content + position + modality → LayerNorm) and the 6 "
              "layers, from per-element content computed once outside the timing; the pooling on top is the "
              "separate *pool+head* row. See bench/README.md.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    try:
        plot(rows, providers, sizes, env, os.path.join(out_dir, "latency.png"))
    except Exception as exc:  # noqa: BLE001 - the table matters more than the plot
        print(f"latency.png not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    return text


def _dedupe(outcomes: list[dict]) -> list[dict]:
    """One line per distinct reason, listing the sizes it applied to."""
    by_reason = {}
    for o in outcomes:
        key = (o["outcome"], o["reason"])
        by_reason.setdefault(key, []).append(o["B"])
    return [{"outcome": k[0], "reason": k[1], "B": ",".join(str(b) for b in sorted(set(v), key=str))}
            for k, v in by_reason.items()]


def plot(rows, providers, sizes, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for p in providers:
        xs = [B for B in sizes if (p, B) in rows]
        ys = [rows[(p, B)]["median_ms"] for B in xs]
        if not xs:
            continue
        style = dict(linestyle="--", color="black") if p == "floor" else dict(marker="o")
        if p == "pool":
            style = dict(linestyle=":", marker=".", color="grey")
        ax.plot(xs, ys, label=LABELS.get(p, p), **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(B) for B in sizes])
    ax.set_xlabel("batch size B (ads workload)")
    ax.set_ylabel("median latency per batch (ms)")
    device = env.get("gpu") or env.get("cpu_model", "")
    ax.set_title(f"DM²S² inference latency — {env.get('device', '')} {device}, {env.get('dtype', '')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.render))
        os.makedirs(out_dir, exist_ok=True)
        print(render(args.render, out_dir))
        return 0
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    date = _dt.date.today().isoformat()
    out_dir = args.out_dir or os.path.join(HERE, "results", f"{date}-{device_slug(args.device)}")
    os.makedirs(out_dir, exist_ok=True)
    command = "python bench/report.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    rc = run_suite(args, out_dir)
    wall = time.perf_counter() - t0
    json_path = os.path.join(out_dir, "benchmark.json")
    partial = os.path.join(out_dir, "partial.jsonl")
    if not _valid_json(json_path):  # pytest-benchmark opens it at start, writes it at the end
        if not synthesize(partial, json_path):
            print(f"pytest exited {rc} without writing {json_path}", file=sys.stderr)
            return rc or 1
        print(f"pytest exited {rc} before writing its JSON: {json_path} rebuilt from the finished rows",
              file=sys.stderr)
        rc = rc or 124
    elif os.path.exists(partial):
        os.remove(partial)
    try:  # keep the command line and wall time with the data, for --render later
        with open(json_path) as f:
            data = json.load(f)
        data.setdefault("dm2s2_fast", {}).update(command=command.strip(), wall_s=round(wall, 1))
        with open(json_path, "w") as f:
            json.dump(data, f, indent=4, default=str)
    except (OSError, ValueError):
        pass
    text = render(json_path, out_dir, command=command.strip(), wall_s=wall)
    print("\n" + text)
    print(f"\nwrote {out_dir}/{{benchmark.json,results.md,latency.png,pytest.log}} in {wall:.0f} s "
          f"(pytest exit {rc})")
    return 0 if rc in (0, 5) else rc


if __name__ == "__main__":
    sys.exit(main())
