"""The bounded fuzz run of CI (issue #19): ≥ 2,000 cases of tests/reliability/fuzz_harness.py —
valid and malformed batches through every constructor and every available backend against the
fp64 reference, the public ops, the raw CPU ops (in worker subprocesses: a crash is recorded, not
fatal), weight updates and engine misuse — with zero cases in every class but "valid and correct"
and "clean refusal" (docs/reliability.md#the-fuzz-harness).

The seed is fixed (``DM2S2_FUZZ_SEED`` draws another set; ``DM2S2_FUZZ_CASES`` another count), so a
failure replays: ``python bench/fuzz_long.py --seed SEED --case INDEX``. The long run (≥ 20,000
cases) is bench/fuzz_long.py; its table is committed under bench/results/.
"""
from __future__ import annotations

import os

import fuzz_harness

SEED = int(os.environ.get("DM2S2_FUZZ_SEED", "2026"))
CASES = int(os.environ.get("DM2S2_FUZZ_CASES", "2400"))
TRITON_EVERY = 600  # Triton's interpreter takes ~1 s a forward here: a handful of cases


def test_fuzz_bounded_run():
    report = fuzz_harness.run(SEED, range(CASES), workers=2, threads=1, timeout=120.0, triton_every=TRITON_EVERY)
    print("\n" + report.summary(failures=50))
    assert report.cases == CASES
    assert report.counts["valid_correct"] > CASES // 5 and report.counts["clean_refusal"] > CASES // 3
    assert report.bad == 0, report.summary(failures=50)
