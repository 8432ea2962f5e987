"""pytest-benchmark suite for dm2s2_fast: options, the (B, provider) grid and the session state.

    pytest bench/                        # default grid for this machine's device (bench/tests: not collected)
    pytest bench/ --quick                # B in {1, 64}, shorter timing
    pytest bench/ --sizes 64 --providers floor,torch,hf
    pytest bench/ --bench-device cuda --bench-dtype bfloat16

``python bench/report.py`` runs this and writes the JSON, the markdown table and the plot.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import peers  # noqa: E402
from peers import percentile  # noqa: E402

# bench/tests (the scripts' own tests, run with the test suite: pyproject's testpaths) are not part
# of the benchmark: `pytest bench/` runs the suite alone; `pytest bench/tests` runs them.
collect_ignore = ["tests"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# On CUDA the run is time-boxed (--bench-deadline): B=64, the headline size, goes first and B=1 last.
SIZES = {"cpu": (1, 16, 64), "cuda": (64, 256, 16, 1)}
QUICK_SIZES = (1, 64)
LOW_TOL_MIN = 2e-2  # bf16/fp16: max(this, 3× the reference's own error in that dtype)
FLEX_COMPILE_BUDGET_S = 120.0


def _add(group, *args, **kwargs):
    try:
        group.addoption(*args, **kwargs)
    except ValueError:  # already added by another conftest (pytest tests bench/)
        pass


def pytest_addoption(parser):
    g = parser.getgroup("dm2s2_fast bench")
    _add(g, "--quick", action="store_true", default=False,
         help="B in {1, 64} and shorter timing (the CPU smoke run)")
    _add(g, "--sizes", default=None, help="comma-separated batch sizes, run in this order (default: cpu 1,16,64; cuda 64,256,16,1)")
    _add(g, "--providers", default=None,
         help=f"comma-separated subset of {','.join(peers.PROVIDERS)} (default: all)")
    _add(g, "--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    _add(g, "--bench-dtype", default=None, help="float32, bfloat16 or float16 (default: cpu float32, cuda bfloat16)")
    _add(g, "--bench-budget", type=float, default=None,
         help="seconds of timed rounds per test (default: cpu 6 / quick 3, cuda 0.5)")
    _add(g, "--bench-quiet-wait", type=float, default=None,
         help="seconds, over the whole run, the suite may wait for other processes to leave the CPUs "
              "before timing a row (at most 10 s a row; default: cpu 60, cuda 0)")
    _add(g, "--bench-deadline", type=float, default=None,
         help="skip the tests that would start after this many seconds (default: none on cpu, 150 on cuda)")


def _options(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = device.lower()
    if device not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--bench-device must be cpu or cuda, got {device!r}")
    quick = bool(config.getoption("--quick"))
    sizes = config.getoption("--sizes")
    if sizes:
        sizes = tuple(int(s) for s in str(sizes).replace(" ", "").split(",") if s)
    else:
        sizes = QUICK_SIZES if quick else SIZES[device]
    providers = config.getoption("--providers")
    if providers:
        providers = tuple(p.strip() for p in providers.split(",") if p.strip())
        unknown = [p for p in providers if p not in peers.PROVIDERS]
        if unknown:
            raise pytest.UsageError(f"unknown providers {unknown}; known: {peers.PROVIDERS}")
        providers = tuple(p for p in peers.PROVIDERS if p in providers)  # table order
    else:
        providers = peers.PROVIDERS
    dtype_name = config.getoption("--bench-dtype") or ("float32" if device == "cpu" else "bfloat16")
    if dtype_name not in DTYPES:
        raise pytest.UsageError(f"--bench-dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    budget = config.getoption("--bench-budget")
    if budget is None:
        budget = (3.0 if quick else 6.0) if device == "cpu" else 0.5
    deadline = config.getoption("--bench-deadline")
    if deadline is None and device == "cuda":
        deadline = 150.0
    quiet = config.getoption("--bench-quiet-wait")
    if quiet is None:
        quiet = 60.0 if device == "cpu" else 0.0
    return dict(device=device, quick=quick, sizes=sizes, providers=providers, dtype=DTYPES[dtype_name],
                budget=float(budget), deadline=deadline, quiet_wait=float(quiet))


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        opts = _options(metafunc.config)
        cases = [(B, p) for B in opts["sizes"] for p in opts["providers"]]
        metafunc.parametrize("bench_case", cases, ids=[f"B{B}-{p}" for B, p in cases])


# ---------------------------------------------------------------------------------------------
# Environment and telemetry
# ---------------------------------------------------------------------------------------------

class NVML:
    """nvidia-ml-py telemetry; every call defensive (a missing field is None, never an error)."""

    def __init__(self, index: int):
        self.handle, self.nv, self.error = None, None, None
        try:
            import pynvml as nv

            nv.nvmlInit()
            self.nv = nv
            # NVML counts physical devices; honour CUDA_VISIBLE_DEVICES when it names one.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            if ids and ids[index].isdigit():
                index = int(ids[index])
            self.handle = nv.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001 - optional
            self.error = f"{type(exc).__name__}: {exc}"

    def _get(self, fn, *args):
        try:
            value = getattr(self.nv, fn)(self.handle, *args)
            return value.decode() if isinstance(value, bytes) else value
        except Exception:  # noqa: BLE001
            return None

    def static(self) -> dict:
        if self.handle is None:
            return {"nvml_error": self.error}
        nv = self.nv
        try:
            driver = nv.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # noqa: BLE001
            driver = None
        return {"nvml_name": self._get("nvmlDeviceGetName"), "driver": driver,
                "max_sm_clock_mhz": self._get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_SM),
                "max_mem_clock_mhz": self._get("nvmlDeviceGetMaxClockInfo", nv.NVML_CLOCK_MEM),
                "power_limit_w": _div(self._get("nvmlDeviceGetEnforcedPowerLimit"), 1000)}

    def sample(self) -> dict:
        if self.handle is None:
            return {}
        nv = self.nv
        mem = self._get("nvmlDeviceGetMemoryInfo")
        return {"sm_clock_mhz": self._get("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_SM),
                "mem_clock_mhz": self._get("nvmlDeviceGetClockInfo", nv.NVML_CLOCK_MEM),
                "temperature_c": self._get("nvmlDeviceGetTemperature", nv.NVML_TEMPERATURE_GPU),
                "power_w": _div(self._get("nvmlDeviceGetPowerUsage"), 1000),
                "memory_used_mib": _div(getattr(mem, "used", None), 2 ** 20),
                "utilization_pct": getattr(self._get("nvmlDeviceGetUtilizationRates"), "gpu", None)}


def _div(x, d):
    return None if x is None else round(x / d, 1)


# ---------------------------------------------------------------------------------------------
# Session state: one model, one workload at a time, the peers built once
# ---------------------------------------------------------------------------------------------

class BenchState:
    def __init__(self, opts: dict):
        self.__dict__.update(opts)
        self.t0 = time.perf_counter()
        self.torch_device = torch.device(self.device)
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise pytest.UsageError("--bench-device cuda but torch.cuda.is_available() is False")
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
            torch.backends.cudnn.allow_tf32 = False
        self.model32 = peers.make_model(self.torch_device)
        self.model_t = peers.cast_model(self.model32, self.dtype)
        self._B = None
        self._work = {}
        self._truth = {}
        self._floor = {}
        self._shared = {}  # peer objects reused across B; a Skip instance when they cannot be built
        self.flex_compile_s = 0.0
        self.broken: dict[str, str] = {}  # peer -> where it raised; skipped at later sizes
        self.env = self._environment()

    def _environment(self) -> dict:
        env = {"device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
               "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "cpu_model": peers.cpu_model(), "cpu_count": os.cpu_count()}
        if self.device == "cuda":
            idx = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            env.update({"gpu": torch.cuda.get_device_name(idx), "cuda": torch.version.cuda,
                        "capability": "%d.%d" % torch.cuda.get_device_capability(idx),
                        "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1)})
            self.nvml = NVML(idx)
            env.update(self.nvml.static())
        else:
            self.nvml = None
        return env

    # ---- per-B data (only the current B is kept) -----------------------------------------------
    def workload(self, B: int) -> peers.Workload:
        if self._B != B:
            self._work.clear()
            self._truth.clear()
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self._B = B
        if B not in self._work:
            self._work[B] = peers.make_workload(self.model32, B, self.dtype)
        return self._work[B]

    def truth(self, B: int) -> dict:
        """The fp32 reference's hidden states, and the reference's own error in the bench dtype."""
        if B not in self._truth:
            work = self.workload(B)
            with torch.inference_mode():
                ref = self.model32(work.batch).hidden
                t = {"hidden": ref, "ref_low_err": 0.0}
                if self.model_t is not self.model32:
                    t["ref_low_err"] = peers.relative_error(self.model_t(work.batch).hidden, ref)
            self._truth[B] = t
        return self._truth[B]

    def low_tol(self, B: int) -> float:
        err = self.truth(B)["ref_low_err"]
        return max(LOW_TOL_MIN, 3 * err) if math.isfinite(err) else LOW_TOL_MIN

    # ---- shared peers --------------------------------------------------------------------------
    def shared(self, key: str, build):
        if key not in self._shared:
            try:
                self._shared[key] = build()
            except peers.Skip as exc:
                self._shared[key] = exc
        value = self._shared[key]
        if isinstance(value, peers.Skip):
            raise value
        return value

    def runner(self, provider: str, work: peers.Workload) -> peers.Runner:
        m32, mt = self.model32, self.model_t
        if provider == "floor":
            return peers.FloorRunner(mt, work, self.dtype)
        if provider == "reference":
            return peers.ReferenceRunner(mt, m32, work)
        if provider in peers.ENGINE_BACKENDS:
            return peers.EngineRunner(provider, mt, m32, work)
        if provider == "pool":
            return peers.PoolRunner(mt, work, self.truth(work.B)["hidden"].to(self.dtype))
        if provider == "hf":
            def build():
                bert32, attn = peers.make_hf_bert(m32)
                bert_t = bert32 if mt is m32 else peers.copy.deepcopy(bert32).to(self.dtype).eval()
                return bert32, bert_t, attn
            bert32, bert_t, attn = self.shared("hf", build)
            return peers.HFRunner(bert32, bert_t, attn, work)
        if provider == "nested":
            def build():
                enc32 = peers.NestedEncoder(m32)
                return enc32, (enc32 if mt is m32 else peers.NestedEncoder(mt))
            enc32, enc_t = self.shared("nested", build)
            return peers.NestedRunner(enc32, enc_t, work)
        if provider == "onnxruntime":
            if self.device != "cpu":
                raise peers.Skip("ONNX Runtime is benchmarked on CPU only (CPU execution provider)")
            if self.dtype != torch.float32:
                raise peers.Skip("ONNX Runtime peer is exported in fp32 only")
            sess = self.shared("onnxruntime", lambda: peers.OnnxSession(m32, work))
            return peers.OnnxRunner(sess, work)
        if provider == "flex":
            if self.device != "cuda" and os.environ.get("DM2S2_BENCH_FLEX_CPU", "0") in ("", "0"):
                raise peers.Skip("flex_attention is benchmarked on CUDA only "
                                 "(DM2S2_BENCH_FLEX_CPU=1 runs it here, for testing the peer)")
            if self.flex_compile_s > FLEX_COMPILE_BUDGET_S:
                raise peers.Skip(f"flex_attention compiles took {self.flex_compile_s:.0f} s so far, over "
                                 f"the {FLEX_COMPILE_BUDGET_S:.0f} s budget of this run")
            return peers.FlexRunner(mt, m32, work)
        raise peers.Skip(f"unknown provider {provider!r}")

    # ---- timing --------------------------------------------------------------------------------
    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed_once(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def warmup(self, fn, already: int) -> float:
        """Warm up (``already`` calls were made by the parity check); the last call's seconds."""
        if self.device == "cuda":
            n, spent, t = 0, 0.0, 0.0
            while n < 3 or (n < 20 and spent < 0.5):
                t = self.timed_once(fn)
                spent += t
                n += 1
            return t
        t = self.timed_once(fn)
        if already == 0 or t < 0.5:  # small calls: one more, so caches and allocator settle
            t = self.timed_once(fn)
        return t

    def rounds(self, seconds_per_call: float) -> int:
        lo, hi = (3, 100) if self.device == "cpu" else (10, 200)
        return int(min(hi, max(lo, self.budget / max(seconds_per_call, 1e-6))))

    def timer(self, fn):
        """A function for pytest-benchmark's pedantic mode, recording each call's milliseconds
        (CUDA events on the current stream on CUDA; perf_counter on CPU)."""
        samples: list[float] = []
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def timed():
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            def timed():
                t0 = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - t0))
        return timed, samples

    def floor_runner(self, B: int) -> peers.FloorRunner:
        """The floor of this B, warmed up; timed between the rounds of every other provider."""
        key = ("floor", B)
        if key not in self._work:
            runner = peers.FloorRunner(self.model_t, self.workload(B), self.dtype)
            with torch.inference_mode():
                self.warmup(runner.call, 0)
            self._work[key] = runner
        return self._work[key]

    def record_floor(self, B: int, samples: list[float]) -> None:
        self._floor[B] = percentile(samples, 50)

    def session_floor_ms(self, B: int):
        return self._floor.get(B)

    def wait_quiet(self, busy_pct: float = 15.0, per_test_s: float = 10.0) -> float:
        """Wait (within the run's --bench-quiet-wait budget) while other processes use more than
        ``busy_pct`` % of the CPUs; the seconds waited."""
        waited = 0.0
        while self.quiet_wait > 0 and waited < per_test_s:
            probe = peers.CpuContention()
            time.sleep(0.5)
            busy = probe.stop()
            if busy is None or busy <= busy_pct:
                break
            waited += 0.5
            self.quiet_wait -= 0.5
        return waited

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


_STATE: dict = {}


@pytest.fixture(scope="session")
def bench_state(request):
    state = BenchState(_options(request.config))
    _STATE["state"] = state
    yield state
    _STATE.clear()


# ---------------------------------------------------------------------------------------------
# Skips and failures go into the JSON too (pytest-benchmark records only what it timed)
# ---------------------------------------------------------------------------------------------

_OUTCOMES: list[dict] = []
_ENV: dict = {}


def pytest_runtest_logreport(report):
    if "test_model[B" not in report.nodeid:
        return
    case = report.nodeid.rsplit("[", 1)[-1].rstrip("]")
    B, _, provider = case.partition("-")
    entry = {"B": int(B[1:]) if B[1:].isdigit() else B, "provider": provider, "when": report.when}
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        entry.update(outcome="skipped", reason=reason.replace("Skipped: ", "", 1))
        _OUTCOMES.append(entry)
        peers.append_partial({"outcome": entry})
    elif report.failed:
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-3:]
        entry.update(outcome="failed", reason=" ".join(ln[1:].strip() for ln in lines[:4])[:600])
        _OUTCOMES.append(entry)
        peers.append_partial({"outcome": entry})
    state = _STATE.get("state")
    if state is not None and not _ENV:
        _ENV.update(state.env)


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook: bench/tests run without the plugin too
def pytest_benchmark_update_json(config, benchmarks, output_json):
    opts = _options(config)
    output_json["dm2s2_fast"] = {
        "suite": "ads", "sizes": list(opts["sizes"]), "providers": list(opts["providers"]),
        "quick": opts["quick"], "budget_s": opts["budget"], "env": dict(_ENV),
        "outcomes": list(_OUTCOMES), "descriptions": peers.DESCRIPTIONS,
    }
