"""The ``cpp`` backend's GEMM provider: which library runs each linear layer on this CPU, and the
prepacked weights it runs them with (docs/backends.md, docs/performance.md).

Libraries (``LIBRARIES``), each an implementation of the three linear ops:

- ``onednn``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``) on a weight prepacked once
  into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``), the epilogue fused as a post-op
  where oneDNN has it: the exact erf GELU (attr ``"gelu"``, algorithm ``"none"``). fp32, and bf16 /
  fp16 where oneDNN runs them natively (AVX512_BF16 or AMX; AVX512_FP16).
- ``mkl``: MKL's packed-weight sgemm (``mkl::_mkl_linear``, fp32 only), epilogue in place after it.
- ``blas``: the C++ ops: torch's BLAS (``at::addmm_out``) into an output the op allocates and advises
  onto transparent huge pages, epilogue in place. Always available; always the choice for fp32
  outputs of 8 MiB and more (``HUGE_OUTPUT``), whose fresh 4 KB pages would fault on first touch
  elsewhere.

Residual + LayerNorm always runs as the cpp kernel in place on the GEMM's output (oneDNN has no
LayerNorm post-op; its ``.binary(..., "add")`` would only move the residual's read into the GEMM).

The choice (``Plan``) is made once per process per (dtype, op, in, out features): the libraries this
CPU can run (its features and torch's build), timed on random data at two row counts, a small one
(the ``SMALL_ROWS`` class: B≈1 requests, where per-call overhead and weight traffic decide) and a
large one; each class takes the faster. ``prepare(model)`` makes every choice and packs every
weight ahead of the first forward; otherwise the first call of each shape does.

Packed weights are cached weakly, per weight object: an entry dies with its weight, and is rebuilt
when the weight changed — a new tensor object, another address, shape, stride or dtype, a bumped
version counter (``copy_``, ``load_state_dict``, any in-place op on the parameter) or another
fingerprint of 256 sampled elements (an in-place write through ``.data``, which no version counter
sees). A write through ``.data`` to only a few elements may fall between the samples; write through
the parameter under ``torch.no_grad()`` instead, or call ``forget_packed()``.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

LIBRARIES = ("onednn", "mkl", "blas")
SMALL_ROWS = 512            # calls with fewer rows use the small-class choice
HUGE_OUTPUT = 8 << 20       # fp32 outputs this large go to ``blas`` (see ``GemmProvider.library``)
# Rows the two classes are timed at. The large class at 4096: at 2048 rows bf16's fused oneDNN GEMM
# and BLAS + the C++ GELU came within 6 % for the ads FFN-up, so noise could pick BLAS, which is
# 1.5x slower at a B=64 batch's 7121 rows (5.1 against 7.9 ms) — and did, in one benchmark run.
_TIMING_ROWS = (96, 4096)
FINGERPRINT_SAMPLES = 256
_OPS = ("linear", "linear_bias_gelu", "linear_add_layernorm")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


class PackedWeights:
    """Prepacked copies of weights, weakly keyed by the weight object (see the module docstring)."""

    def __init__(self, fingerprint):
        self._fingerprint = fingerprint
        self._entries: dict = {}  # (id(weight), library) -> (weakref, stamp, fingerprint, packed)
        self._lock = threading.Lock()
        self.packs = 0  # weights packed so far (tests read it)

    def get(self, weight: torch.Tensor, library: str, pack):
        key = (id(weight), library)
        stamp = (weight.data_ptr(), _version(weight), weight.shape, weight.stride(), weight.dtype)
        fp = self._fingerprint(weight)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == stamp and entry[2] == fp:
            return entry[3]
        packed = pack(weight)
        entries = self._entries
        ref = weakref.ref(weight, lambda _, k=key, e=entries: e.pop(k, None))
        with self._lock:
            entries[key] = (ref, stamp, fp, packed)
            self.packs += 1
        return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Plan:
    """The library per row class for one (dtype, op, in, out) and what the timing found (ms)."""

    small: str
    large: str
    timings: dict = field(default_factory=dict)  # {(library, rows): ms}

    def library(self, rows: int) -> str:
        return self.small if rows < SMALL_ROWS else self.large


class GemmProvider:
    def __init__(self, ops):
        self._ops = ops
        self.cache = PackedWeights(lambda w: ops._fingerprint(w, FINGERPRINT_SAMPLES))
        self.plans: dict = {}  # (dtype, op, k, n) -> Plan
        self._lock = threading.Lock()
        self.forced: str | None = None  # set_library(): one library for every call (timing studies)
        self._onednn = None
        if torch.backends.mkldnn.is_available():
            try:
                self._onednn = (torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight)
            except (AttributeError, RuntimeError):
                self._onednn = None
        self._onednn_dtypes = set()
        if self._onednn is not None:
            self._onednn_dtypes.add(torch.float32)
            try:
                if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                    self._onednn_dtypes.add(torch.bfloat16)
                if torch.ops.mkldnn._is_mkldnn_fp16_supported():
                    self._onednn_dtypes.add(torch.float16)
            except (AttributeError, RuntimeError):
                pass
        self._mkl = None
        if torch.backends.mkl.is_available():
            try:
                self._mkl = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_reorder_linear_weight)
            except (AttributeError, RuntimeError):
                self._mkl = None

    # ---- which libraries can run ------------------------------------------------------------
    def libraries(self, dtype: torch.dtype) -> list[str]:
        """The libraries that can run linear layers of ``dtype`` here (``blas`` always can)."""
        found = []
        if dtype in self._onednn_dtypes:
            found.append("onednn")
        if self._mkl is not None and dtype == torch.float32:
            found.append("mkl")
        found.append("blas")
        return found

    # ---- the three ops, per library -----------------------------------------------------------
    def _pack_onednn(self, weight):
        return self._onednn[1](weight.detach().contiguous(), None)

    def _pack_mkl(self, weight):
        return self._mkl[1](weight.detach().contiguous(), 1)

    def run(self, library: str, op: str, x, weight, bias, *rest):
        ops = self._ops
        if library == "onednn":
            lin = self._onednn[0]
            packed = self.cache.get(weight, "onednn", self._pack_onednn)
            x = x.contiguous()
            if op == "linear":
                return lin(x, packed, bias, "none", [], "")
            if op == "linear_bias_gelu":
                return lin(x, packed, bias, "gelu", [], "none")  # "none": the exact erf GELU
            y = lin(x, packed, bias, "none", [], "")
            ops._add_layernorm_(y, *rest)
            return y
        if library == "mkl":
            packed = self.cache.get(weight, "mkl", self._pack_mkl)
            x = x.contiguous()
            if op == "linear":
                return self._mkl[0](x, packed, weight, bias, x.shape[0])
            if op == "linear_bias_gelu":
                y = self._mkl[0](x, packed, weight, None, x.shape[0])
                ops._bias_gelu_(y, bias)
                return y
            y = self._mkl[0](x, packed, weight, bias, x.shape[0])
            ops._add_layernorm_(y, *rest)
            return y
        if op == "linear":
            return ops.linear(x, weight, bias)
        if op == "linear_bias_gelu":
            return ops.linear_bias_gelu(x, weight, bias)
        return ops.linear_add_layernorm(x, weight, bias, *rest)

    # ---- the choice ---------------------------------------------------------------------------
    def plan(self, op: str, dtype: torch.dtype, k: int, n: int) -> Plan:
        key = (dtype, op, k, n)
        plan = self.plans.get(key)
        if plan is None:
            with self._lock:
                plan = self.plans.get(key)
                if plan is None:
                    plan = self.plans[key] = self._measure(op, dtype, k, n)
        return plan

    def library(self, op: str, x: torch.Tensor, weight: torch.Tensor) -> str:
        if self.forced in LIBRARIES and self.forced in self.libraries(x.dtype):
            return self.forced
        if x.shape[0] == 0 or weight.numel() == 0:
            return "blas"  # the packing routines reject empty dims; the C++ ops take them
        if x.dtype == torch.float32 and x.shape[0] * weight.shape[0] * 4 >= HUGE_OUTPUT:
            # Big fresh outputs fault on every 4 KB page on first touch (glibc maps blocks over its
            # mmap threshold anew, and gives trimmed heap back): the C++ ops advise theirs onto huge
            # pages before BLAS writes them; oneDNN and MKL allocate their own. In fp32 the libraries'
            # GEMMs run at the same rate (MKL and oneDNN within 5 %, one thread, ads shapes), so the
            # faults decide: ads B=64 fp32, 24k-45k faults and 0.16-0.20 s of system time a forward
            # with oneDNN/MKL outputs, 3.6k and 0.06 s with these. In bf16 oneDNN's packed GEMM is
            # 1.5-1.8x the others', more than the faults cost, so bf16 keeps the measured choice.
            return "blas"
        return self.plan(op, x.dtype, weight.shape[1], weight.shape[0]).library(x.shape[0])

    def _measure(self, op: str, dtype: torch.dtype, k: int, n: int) -> Plan:
        """Time each library at both row counts: the best of 3 samples (each a few calls), the
        libraries interleaved, so that another process's burst moves a sample, not the choice. A
        library must beat the one before it in ``libs`` order (oneDNN, MKL, BLAS: fused epilogues,
        then packed weights first) by 5 %."""
        libs = self.libraries(dtype)
        if len(libs) == 1:
            return Plan(libs[0], libs[0])
        g = torch.Generator().manual_seed(0)
        # Enough distinct weights that each call finds its weight out of the L2 cache, as in a model,
        # where every layer's weights stream in from memory (at B=1 that decides: MKL's packed
        # sgemm led oneDNN by 11 % in the ads forward, one thread, and trailed it on a hot weight).
        esize = torch.finfo(dtype).bits // 8
        copies = max(1, min(4, -(-(8 << 20) // (n * k * esize))))
        weights = [(torch.randn(n, k, generator=g) * k ** -0.5).to(dtype) for _ in range(copies)]
        bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
        ln_w, ln_b = torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)
        timings, best = {}, []
        with torch.inference_mode():
            for rows in _TIMING_ROWS:
                if dtype == torch.float32 and rows >= SMALL_ROWS:  # below the rows that go to blas anyway
                    rows = max(SMALL_ROWS, min(rows, (HUGE_OUTPUT - 1) // (n * 4)))
                x = torch.randn(rows, k, generator=g).to(dtype)
                rest = (torch.randn(rows, n, generator=g).to(dtype), ln_w, ln_b, 1e-12) \
                    if op == "linear_add_layernorm" else ()
                reps = max(1, min(8, int(1e8 / max(1, 2 * rows * k * n))))  # ~0.1 GFLOP a sample, ≤ 8 calls
                calls = max(reps, copies)

                def sample(lib):
                    t0 = time.perf_counter()
                    for i in range(calls):
                        self.run(lib, op, x, weights[i % copies], bias, *rest)
                    return (time.perf_counter() - t0) / calls * 1e3

                for lib in libs:
                    sample(lib)  # packs every copy, warms
                samples = {lib: [] for lib in libs}
                for _ in range(3):  # interleaved, so that another process's burst hits every library alike
                    for lib in libs:
                        samples[lib].append(sample(lib))
                for lib in libs:
                    timings[(lib, rows)] = min(samples[lib])
                choice = libs[0]
                for lib in libs[1:]:
                    if timings[(lib, rows)] < 0.95 * timings[(choice, rows)]:
                        choice = lib
                best.append(choice)
        return Plan(best[0], best[1], timings)

    def forget(self) -> None:
        self.cache.clear()
