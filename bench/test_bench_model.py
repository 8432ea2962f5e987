"""DM²S² on the ``ads`` workload (docs/workloads.md): every provider × every batch size, one pytest-benchmark
result each. See bench/README.md for what each provider runs and how to read the numbers."""
from __future__ import annotations

import math
import time

import pytest
import torch

import peers
from dm2s2_fast import dispatch

ORT_IDLE_S = 0.1
FLOPS_OF_SCOPE = {"model": "model", "encoder": "encoder", "floor": "linear", "pool": "pool"}


def test_model(benchmark, bench_state, bench_case):
    st = bench_state
    B, provider = bench_case
    if st.deadline is not None and st.elapsed() > st.deadline:
        pytest.skip(f"run deadline: {st.elapsed():.0f} s elapsed, over --bench-deadline {st.deadline:.0f} s")
    if provider in st.broken:
        pytest.skip(f"{provider} raised at {st.broken[provider]} — not retried at other sizes")
    try:
        _run(benchmark, st, B, provider)
    except (peers.Skip, dispatch.BackendUnavailable) as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if provider in peers.PEERS:  # a broken peer (import, export, compile) stays broken: save the time
            st.broken[provider] = f"B={B} ({type(exc).__name__}: {str(exc)[:200]})"
        raise


def _run(benchmark, st, B: int, provider: str) -> None:
    work = st.workload(B)
    benchmark.group = f"ads B={B}"
    runner = st.runner(provider, work)

    extra = benchmark.extra_info
    extra.update(provider=provider, B=B, scope=runner.scope, description=peers.DESCRIPTIONS.get(provider),
                 packed_tokens=work.N, padded_tokens=work.padded, max_len=work.T,
                 padding_factor=round(work.padded / max(work.N, 1), 3),
                 dtype=str(st.dtype).replace("torch.", ""), device=st.device)
    calls = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        if runner.check:
            truth = st.truth(B)["hidden"]
            fp32_check = runner.fp32_check
            if fp32_check and st.dtype != torch.float32:
                try:  # a backend may serve only the low-precision dtype: check that one then
                    fp32_hidden = runner.hidden(False)
                except dispatch.BackendUnavailable as exc:
                    fp32_check = False
                    extra["parity_fp32_skipped"] = str(exc)[:300]
            elif fp32_check:
                fp32_hidden = runner.hidden(False)
            if fp32_check:
                err = peers.relative_error(fp32_hidden, truth)
                del fp32_hidden
                extra["parity_rel_err"] = err
                if not err <= peers.FP32_TOL:
                    pytest.fail(f"{provider} B={B}: fp32 hidden states differ from the reference by "
                                f"{err:.3g} (relative, valid tokens; tolerance {peers.FP32_TOL:g}) — not timed")
                calls += st.dtype == torch.float32
            if st.dtype != torch.float32:
                err = peers.relative_error(runner.hidden(True), truth)
                tol = st.low_tol(B)
                extra.update(parity_rel_err_timed=err, parity_tol_timed=tol,
                             reference_low_precision_err=st.truth(B)["ref_low_err"])
                if not err <= tol:
                    pytest.fail(f"{provider} B={B}: {extra['dtype']} hidden states differ from the fp32 "
                                f"reference by {err:.3g} (tolerance {tol:.3g}) — not timed")
                calls += 1
        first = time.perf_counter() - t0
        if provider == "flex":
            st.flex_compile_s += first
            extra["first_call_s"] = round(first, 2)

        t = st.warmup(runner.call, calls)
        # The floor runs before every round, untimed by pytest-benchmark but timed by its own
        # timer: provider and floor rounds alternate, so a noisy machine slows both alike.
        setup, floor_samples = None, None
        if provider != "floor":
            floor_timed, floor_samples = st.timer(st.floor_runner(B).call)
            setup = floor_timed
            if provider == "onnxruntime" and st.device == "cpu":
                # ORT's intra-op pool keeps spinning for a while after a run and would steal
                # the floor's cores (measured: +10–30 % on the floor): let it go idle first.
                def setup():
                    time.sleep(ORT_IDLE_S)
                    floor_timed()

                t += ORT_IDLE_S
            if st.device == "cpu":
                # On CPU a call timed right after the other one inherits its allocator state:
                # glibc unmaps freed blocks over its mmap threshold, so the first call after a
                # switch re-faults its big buffers (measured: the cpp engine at B=64, 714 ms
                # back-to-back, 811 ms right after a floor call). Each side gets one untimed
                # call before its timed one, so both are timed in their steady state.
                timed_floor, floor_call, settle_timed = setup, st.floor_runner(B).call, runner.call

                def setup():
                    floor_call()
                    timed_floor()
                    settle_timed()

                t *= 2
                t += st.timed_once(st.floor_runner(B).call)
            t += st.timed_once(st.floor_runner(B).call)
        rounds = st.rounds(t)
        timed, samples = st.timer(runner.call)
        if st.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            extra["nvml_before"] = st.nvml.sample()
        if st.device == "cpu":
            extra["waited_for_quiet_s"] = st.wait_quiet()
        contention = peers.CpuContention()
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        extra["other_cpu_pct"] = contention.stop()
        if st.device == "cuda":
            torch.cuda.synchronize()
            extra["nvml_after"] = st.nvml.sample()
            extra["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)

    if provider == "floor":
        st.record_floor(B, samples)
        floor_samples = samples
    median, p90 = peers.percentile(samples, 50), peers.percentile(samples, 90)
    floor = peers.percentile(floor_samples, 50)
    flops = work.flops[FLOPS_OF_SCOPE[runner.scope]]
    extra.update(
        timer="cuda_events" if st.device == "cuda" else "perf_counter", rounds=len(samples),
        median_ms=round(median, 4), p90_ms=round(p90, 4), min_ms=round(min(samples), 4),
        mean_ms=round(sum(samples) / len(samples), 4),
        floor_ms=round(floor, 4), floor_p90_ms=round(peers.percentile(floor_samples, 90), 4),
        floor_session_ms=st.session_floor_ms(B),
        ratio_to_floor=round(median / floor, 3) if floor > 0 else None,
        flops=flops, model_flops=work.flops["model"], encoder_flops=work.flops["encoder"],
        linear_flops=work.flops["linear"], padded_encoder_flops=work.flops["padded_encoder"],
        gflops_per_s=round(flops / (median * 1e-3) / 1e9, 2) if median > 0 else None,
        info=runner.info, env=st.env)
    peers.append_partial({"benchmark": {"name": f"test_model[B{B}-{provider}]", "group": benchmark.group,
                                  "extra_info": dict(extra),
                                  "stats": {"median": median / 1e3, "rounds": len(samples)}}})
    assert math.isfinite(median)
