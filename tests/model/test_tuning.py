"""Tuning (dm2s2_fast.tuning): validated at construction, current per thread and asyncio task, scoped
by ``.active()`` and ``.patch()``; an engine's forward runs under its own ``tuning=...`` or, with
``tuning=None``, under the caller's; and the test suite's fast-launch stage (tests/conftest.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading

import pytest
import torch

import dm2s2_fast
from dm2s2_fast import AttentionTiles, PoolRows, ScoreTiles, Tuning, convert, dispatch, tuning
from helpers import (FP32_TOL, ROOT, env_flag, fp64_reference, random_batch, random_model, rel_err, require_backend,
                     small_config)


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("make,message", [
    (lambda: Tuning(cpu_isa="sse9"), r"Tuning.cpu_isa must be one of \('auto', "),
    (lambda: Tuning(cuda_attention="tile128"), r"Tuning.cuda_attention must be one of \('auto', 'tile32', "),
    (lambda: Tuning(cuda_attention="32"), "Tuning.cuda_attention must be one of"),
    (lambda: Tuning(cuda_layernorm="quarter"), r"Tuning.cuda_layernorm must be one of \('auto', 'warp', 'half'\)"),
    (lambda: Tuning(triton_attention=ScoreTiles(64, 64, 32)),
     "Tuning.triton_attention must be None or an? AttentionTiles"),
    (lambda: Tuning(triton_mra_scores=(64, 64, 32)), "Tuning.triton_mra_scores must be None or an? ScoreTiles"),
    (lambda: Tuning(triton_mra_pool=AttentionTiles(True, 32, 32)),
     "Tuning.triton_mra_pool must be None or an? PoolRows"),
    (lambda: Tuning(triton_fast_launch=1), "Tuning.triton_fast_launch must be a bool"),
    (lambda: Tuning().replace(cpu_isa="fastest"), "Tuning.cpu_isa must be one of"),
])
def test_a_bad_tuning_is_refused_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_tuning_is_frozen_and_replace_makes_a_copy():
    t = Tuning(cuda_layernorm="warp", triton_mra_pool=PoolRows(16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.cpu_isa = "avx2"
    u = t.replace(cpu_isa="generic")
    assert (u.cpu_isa, u.cuda_layernorm, u.triton_mra_pool) == ("generic", "warp", PoolRows(16))
    assert t.cpu_isa == "auto"
    assert Tuning() == tuning.DEFAULT and dm2s2_fast.Tuning is Tuning
    assert Tuning(triton_attention=AttentionTiles(False, 64, 32)).triton_attention.num_warps == 4


# ------------------------------------------------------------------ scoping

def test_active_and_patch_scope_the_current_tuning():
    outer = tuning.current()
    a = Tuning(cuda_attention="group")
    with a.active() as current:
        assert current is a and tuning.current() is a
        with a.patch(cuda_layernorm="half") as patched:
            assert tuning.current() is patched
            assert (patched.cuda_attention, patched.cuda_layernorm) == ("group", "half")
        assert tuning.current() is a
        with Tuning().active():
            assert tuning.current() == Tuning()
        assert tuning.current() is a
    assert tuning.current() is outer


def test_the_block_ends_its_tuning_on_an_exception():
    outer = tuning.current()
    with pytest.raises(RuntimeError, match="inside"):
        with Tuning(cpu_isa="generic").active():
            raise RuntimeError("inside")
    assert tuning.current() is outer


def test_current_is_per_thread_and_per_task():
    """A tuning made current in one thread (or asyncio task) is not another's."""
    seen = {}
    with Tuning(cuda_layernorm="warp").active():
        thread = threading.Thread(target=lambda: seen.setdefault("thread", tuning.current()))
        thread.start()
        thread.join()
    assert seen["thread"] is tuning.DEFAULT  # a new thread starts from the default

    async def task(name, t):
        with t.active():
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            seen[name] = tuning.current()

    async def both():
        await asyncio.gather(task("a", Tuning(cpu_isa="avx2")), task("b", Tuning(cpu_isa="generic")))

    asyncio.run(both())
    assert (seen["a"].cpu_isa, seen["b"].cpu_isa) == ("avx2", "generic")


# ------------------------------------------------------------------ engines

def _recording(monkeypatch):
    """Record tuning.current() at every op the engine resolves."""
    seen = []
    resolve = dispatch.resolve

    def recording(*args, **kwargs):
        seen.append(tuning.current())
        return resolve(*args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve", recording)
    return seen


def test_engine_runs_under_its_tuning(monkeypatch):
    config = small_config()
    model, batch = random_model(config, 1), random_batch(config, 4, 1)
    forced = Tuning(cuda_layernorm="half", triton_mra_pool=PoolRows(8))
    engine = convert(model, "torch", tuning=forced)
    assert engine.tuning is forced
    seen = _recording(monkeypatch)
    outer = tuning.current()
    with Tuning(cuda_layernorm="warp").active():
        engine(batch)
    assert seen and all(t is forced for t in seen)  # its own, whatever the caller's
    assert tuning.current() is outer


def test_engine_without_tuning_runs_under_the_callers(monkeypatch):
    config = small_config()
    model, batch = random_model(config, 2), random_batch(config, 4, 2)
    engine = convert(model, "torch")
    assert engine.tuning is None
    seen = _recording(monkeypatch)
    callers = Tuning(cuda_attention="tile64")
    with callers.active():
        engine(batch)
    assert seen and all(t is callers for t in seen)
    seen.clear()
    engine(batch)
    assert seen and all(t == tuning.current() for t in seen)


def test_engine_refuses_what_is_not_a_tuning():
    with pytest.raises(TypeError, match="tuning must be a dm2s2_fast.Tuning"):
        convert(random_model(small_config(), 3), "torch", tuning={"cpu_isa": "avx2"})


def test_engine_tuning_switches_the_cpu_kernels():
    """``tuning=Tuning(cpu_isa=...)``: the cpp forward runs that kernel table (process-wide while it
    runs), gives the reference's answer, and a later call under the default tuning switches back."""
    require_backend("cpp", "cpu", "set_attention")
    from dm2s2_fast.backends import cpp

    config = small_config()
    model, batch = random_model(config, 4), random_batch(config, 5, 4)
    oracle = fp64_reference(model, batch)
    out = convert(model, "cpp", tuning=Tuning(cpu_isa="generic"))(batch)
    assert cpp.cpu_isa() == "generic"
    for field in ("logits", "pooled", "hidden"):
        assert rel_err(getattr(out, field), getattr(oracle, field)) <= FP32_TOL, field
    default = convert(model, "cpp")(batch)
    assert cpp.cpu_isa() == torch.ops.dm2s2_fast._cpu_isa("auto")
    assert rel_err(default.logits, oracle.logits) <= FP32_TOL


# ------------------------------------------------------------------ the fast-launch test stage

FAST_LAUNCH_ENV = "DM2S2_TEST_TRITON_FAST_LAUNCH"


def test_fast_launch_stage_probe(monkeypatch):
    """Under DM2S2_TEST_TRITON_FAST_LAUNCH=1 every test (and an engine built with tuning=None) runs
    with Triton's fast launch on; otherwise with the default tuning."""
    on = env_flag(FAST_LAUNCH_ENV)
    assert tuning.current().triton_fast_launch is on
    config = small_config()
    seen = _recording(monkeypatch)
    convert(random_model(config, 5), "torch")(random_batch(config, 2, 5))
    assert seen and all(t.triton_fast_launch is on for t in seen)


def test_fast_launch_stage_turns_it_on():
    """bench/gpu_check.sh's fast-launch stage: the probe above, run with the variable set."""
    env = {**os.environ, FAST_LAUNCH_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_fast_launch_stage_probe"], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
