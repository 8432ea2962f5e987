"""The long fuzz run of issue #19 (docs/reliability.md#the-fuzz-harness): ≥ 20,000 cases of
tests/reliability/fuzz_harness.py — valid and malformed batches through every constructor and every
available backend against the fp64 reference, the public and raw ops, weight updates, engine misuse
— in worker subprocesses (a crash or a hang is recorded, not fatal). Writes the table of cases per
class (overall and per kind of case) with every failing case, to ``OUT/results.md`` and
``OUT/results.json``.

    python bench/fuzz_long.py                           # 24,000 cases of seed 20261207
    python bench/fuzz_long.py --cases 40000 --seed 7 --out /tmp/fuzz
    python bench/fuzz_long.py --seed 20261207 --case 1234   # replay one case here, in this process

A case is a pure function of (seed, index): a failure replays alone with ``--case``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

import fuzz_harness  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "2026-12-07-fuzz"


def _environment() -> dict:
    import torch

    import dm2s2_fast
    from dm2s2_fast import _extension, dispatch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    if not commit:
        commit, dirty = "n/a (not a git checkout)", False
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
        "cores": os.cpu_count(), "library": _extension.library_path() if _extension.load() is None else
        f"not loaded: {_extension.load()}",
        "backends_on_cpu": [b for b in dispatch.BACKENDS if not dispatch.reasons(b, "add_layernorm", "cpu")],
        "package": os.path.dirname(dm2s2_fast.__file__),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--cases", type=int, default=24000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a case may run before it is a hang")
    parser.add_argument("--triton-every", type=int, default=1000,
                        help="every n-th valid batch also runs the triton backend (Triton's interpreter: slow)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--label", default="", help="a note for the table's heading (what was run)")
    parser.add_argument("--case", type=int, default=None, help="run this one case in this process and print it")
    args = parser.parse_args(argv)

    if args.case is not None:
        result = fuzz_harness.run_one(args.seed, args.case, triton_every=args.triton_every)
        print(json.dumps(result, indent=1))
        return 0 if result["cls"] in fuzz_harness.GOOD else 1

    env = _environment()
    last = [time.monotonic()]

    def progress(report):
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"  {report.cases}/{args.cases} cases, {report.bad} bad, {report.seconds or 0:.0f}", file=sys.stderr,
                  flush=True)

    report = fuzz_harness.run(args.seed, range(args.cases), workers=args.workers, threads=args.threads,
                              timeout=args.timeout, triton_every=args.triton_every, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Fuzz run: seed {args.seed}, {report.cases} cases{' — ' + args.label if args.label else ''}", "",
             f"`python bench/fuzz_long.py --seed {args.seed} --cases {args.cases} --workers {args.workers} "
             f"--threads {args.threads} --triton-every {args.triton_every}` — {report.seconds:.0f} s "
             f"({report.cases / max(report.seconds, 1e-9):.0f} cases/s).", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "Cases per class (columns: all, then per kind of case; docs/reliability.md#the-fuzz-harness):", "",
             report.table(), ""]
    if report.failures:
        lines += [f"## Failing cases ({len(report.failures)})", "",
                  "Replay one: `python bench/fuzz_long.py --seed SEED --case INDEX`.", ""]
        lines += [f"- case {i} [{kind}] **{cls}**: {detail[:600]}" for i, kind, cls, detail in report.failures]
    else:
        lines += ["No case in any class but *valid_correct* and *clean_refusal*."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({
        "seed": args.seed, "cases": report.cases, "seconds": round(report.seconds, 1), "label": args.label,
        "environment": env, "counts": {c: report.counts[c] for c in fuzz_harness.CLASSES},
        "by_kind": {k: {c: v[c] for c in fuzz_harness.CLASSES} for k, v in report.by_kind.items()},
        "failures": [{"case": i, "kind": k, "class": c, "detail": d} for i, k, c, d in report.failures],
    }, indent=1) + "\n")
    print(report.summary(failures=30))
    print(f"wrote {args.out / 'results.md'}")
    return 0 if report.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
