"""bench/gpu_check.sh's control flow, on CPU, with stand-ins for python, ncu, nvidia-smi and nvcc.

The script runs only on a lent GPU machine, for minutes a session can rarely get; a mistake in its
stage order, its deadline logic or its summary costs that time. Here each stand-in records its call
and writes what the real step would, so the script's own logic is what is tested.
"""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# The test paths the script's stages run (its defaults).
TESTS_DEFAULT = ("tests/ops", "tests/backends", "tests/model/test_model_backends.py", "tests/graphs", "tests/data",
                 "tests/export/test_compile.py", "tests/serving/test_ranker.py")
FASTLAUNCH_PATHS = ("tests/ops", "tests/model/test_model_backends.py", "tests/graphs")
FUZZ_PATH = "tests/model/test_fuzz_configs.py"

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "${DM2S2_TEST_TRITON_FAST_LAUNCH:+DM2S2_TEST_TRITON_FAST_LAUNCH=$DM2S2_TEST_TRITON_FAST_LAUNCH }$*" >> "$CALLS"
case "$*" in
  *"pip install"*) [ -n "$FAIL_BUILD" ] && { echo "build error"; exit 1; }; touch "$BUILT"; echo "CUDA kernels: on";;
  -c*) [ -e "$BUILT" ] || exit 1;;
  *"dm2s2_fast info"*) echo "backend table";;
  *"-m pytest"*) for a in "$@"; do case $a in --junitxml=*) touch "${a#--junitxml=}";; esac; done
                 echo "FAILED tests/test_x.py::test_y - boom"; echo "1 failed, 9 passed"; exit 1;;
  *gpu_ops.py*) echo "[ 1.0s] ads B=256: N=1"; echo "ads B=256 N=1 S=1 on fake"; echo "set_attention row"
                out=${@: -1}; echo '{}' > "$out";;
  *report.py*) d=${@: -1}; mkdir -p "$d"; echo "## Median latency (ms)"; echo "| triton | 2.0 |";
               echo "## B = 1: ..."; echo "wrote results";;
  *serving.py*) echo '{}' > "${@: -1}";;
  *load.py*) mkdir -p "${@: -1}"; echo '{}' > "${@: -1}/results.json"; echo "Targets (issue #18, GPU):";
             echo "- throughput met"; echo "Integrity over every run: 0 lost";;
  *profile_model.py*) echo "## backend triton, B=1 (95 rows): host 2.6 ms"; echo '{}' > "${@: -1}";;
  *ncu_ops.py*) ;;
esac
"""


def _stub(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).write_text("#!/bin/sh\necho fake\n")
    # ncu: drop its options, run the profiled command
    (bin_dir / "ncu").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do\n'
                                 '  case $1 in --clock-control|--profile-from-start|--section) shift 2;; *) shift;; esac\n'
                                 'done\n"$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    outer = {k: v for k, v in os.environ.items()
             if k not in ("DM2S2_TEST_TRITON_FAST_LAUNCH", "STAGES", "TESTS", "DEADLINE")}
    return {**outer, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(bin_dir / "python"),
            "NCU": str(bin_dir / "ncu"), "OUT": str(out), "CALLS": str(tmp_path / "calls"),
            "BUILT": str(tmp_path / "built")}


def _run(env: dict, **extra) -> tuple[str, list[str]]:
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env={**env, **extra}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = Path(env["CALLS"]).read_text().splitlines() if Path(env["CALLS"]).exists() else []
    return (Path(env["OUT"]) / "summary.txt").read_text(), calls


def _stage_lines(summary: str) -> list[str]:
    return [line.split(":")[0][3:] for line in summary.splitlines() if line.startswith("== ")]


@pytest.fixture
def env(tmp_path):
    if os.name != "posix":
        pytest.skip("bash script")
    return _stub(tmp_path)


def test_all_stages_in_order_with_results_packed(env):
    summary, calls = _run(env)
    assert _stage_lines(summary) == ["build", "info", "tests", "fastlaunch", "gpu_ops", "bench",
                                     "ncu", "serving", "load", "profile"], summary
    assert "## backend triton, B=1 (95 rows): host 2.6 ms" in summary
    assert "== build: rc=0" in summary and "== tests: rc=1" in summary
    assert "FAILED tests/test_x.py::test_y" in summary  # the failure is named, not only counted
    assert "ads B=256 N=1 S=1 on fake" in summary and "set_attention row" in summary  # the whole op table
    assert "| triton | 2.0 |" in summary  # the model's latency table
    with tarfile.open(Path(env["OUT"]) / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"junit.xml", "gpu_ops.json", "serving.json", "profile.json", "bench", "load/results.json"} <= names, names
    assert "- throughput met" in summary  # the load test's target lines
    assert any("-rfEs" in c for c in calls)
    assert not any("gpu_linear" in c for c in calls)


def test_test_stages_run_the_reorganized_test_paths(env):
    _, calls = _run(env)
    (tests,) = [c for c in calls if "--junitxml=" in c]
    assert tests.split("--junitxml=")[1].split(" ", 1)[1] == " ".join(TESTS_DEFAULT), tests
    assert not tests.startswith("DM2S2_TEST_TRITON_FAST_LAUNCH")
    (fast,) = [c for c in calls if c.startswith("DM2S2_TEST_TRITON_FAST_LAUNCH=1 ")]
    assert fast.endswith(" ".join(FASTLAUNCH_PATHS) + " -k triton"), fast
    Path(env["CALLS"]).unlink()
    _, calls = _run(env, STAGES="fuzz")
    (fuzz,) = [c for c in calls if "-m pytest" in c]
    assert fuzz.endswith("tests/model/test_fuzz_configs.py -k cuda"), fuzz
    Path(env["CALLS"]).unlink()
    _, calls = _run(env, STAGES="tests", TESTS="tests/ops/test_x.py -x")
    (tests,) = [c for c in calls if "--junitxml=" in c]
    assert tests.endswith("tests/ops/test_x.py -x"), tests  # TESTS replaces the list


def test_the_named_test_paths_exist():
    """A wrong path costs a device session its test stage."""
    missing = [p for p in (*TESTS_DEFAULT, *FASTLAUNCH_PATHS, FUZZ_PATH) if not (ROOT / p).exists()]
    assert not missing, f"bench/gpu_check.sh names test paths that do not exist: {missing}"


def test_failed_build_stops_the_run(env):
    summary, calls = _run(env, FAIL_BUILD="1")
    assert "the other stages are not run" in summary
    for name in ("tests", "fastlaunch", "gpu_ops", "bench", "ncu", "serving", "load", "profile"):
        assert f"== {name}: not run (no working build)" in summary
    assert not any(word in " ".join(calls) for word in ("pytest", "gpu_ops.py", "report.py"))


def test_second_call_builds_first_on_a_fresh_machine(env):
    summary, calls = _run(env, STAGES="ncu serving profile")
    assert "preflight: the CUDA extension does not load here; building it first" in summary
    assert _stage_lines(summary)[:3] == ["preflight", "build", "info"]
    assert "== serving: rc=0" in summary
    Path(env["CALLS"]).unlink()
    summary, calls = _run(env, STAGES="serving")  # built now: straight to the stage
    assert _stage_lines(summary) == ["serving"] and not any("pip install" in c for c in calls)


def test_deadline_skips_stages_that_cannot_finish(env):
    summary, _ = _run(env, DEADLINE="100")  # the stand-ins take ~0 s: 100 s left for each stage
    assert "== gpu_ops: rc=0" in summary
    summary, _ = _run(env, DEADLINE="100", MIN_ncu="101", MIN_bench="500")
    assert "== bench: not run" in summary and "it needs 500" in summary
    assert "== ncu: not run" in summary and "== serving: rc=0" in summary
    summary, _ = _run(env, STAGES="build nonsense")
    assert "== nonsense: unknown stage" in summary
