"""bench/profile_model.py (run by bench/gpu_check.sh on a GPU) runs here on CPU, so the device
session does not spend its minutes on a broken script (its +fastlaunch rows included: the engine
under Tuning(triton_fast_launch=True))."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profile_script_runs_on_cpu(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_model.py"), "--device", "cpu",
                           "--backends", "torch,torch+fastlaunch", "--sizes", "1", "--iters", "1", "--rows", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "## backend torch, B=1" in proc.stdout and "Self CPU" in proc.stdout
    assert "## backend torch+fastlaunch, B=1" in proc.stdout  # the engine under Tuning(triton_fast_launch=True)
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["torch", "torch+fastlaunch"]
    for result in results:
        assert result["B"] == 1 and result["rows"] > 0 and result["wall_ms"] > 0
        assert result["device_ms"] is None  # no device kernels on CPU
