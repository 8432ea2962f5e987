"""Kernel tuning: one typed, validated object instead of environment variables.

Every kernel picks its launch configuration from the shapes by default (the measured heuristics in
each backend). A ``Tuning`` forces a choice where one is worth forcing — to time a variant on a GPU,
or to pin a CPU kernel set — and is validated once, when it is made::

    engine = dm.convert(model, tuning=Tuning(cpu_isa="avx2"))
    with Tuning(triton_attention=AttentionTiles(packed=False, block_m=64, block_n=32)).active():
        dm.ops.set_attention(q, k, v, cu, max_len)          # this thread (or task) only

``FastDM2S2`` runs its forward under its own ``tuning``; ``Tuning.active()`` makes one current for a
block (a context variable: per thread and per asyncio task), and ``current()`` is what kernels read.
Environment variables remain only for what precedes import or build (``TRITON_INTERPRET``,
``DM2S2_FAST_LIBRARY``, ``DM2S2_FAST_NO_EXTENSION``) and for the test and CI switches.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _check_launch(name: str, blocks: dict[str, int], num_warps: int, num_stages: int, smallest: int = 16) -> None:
    """Tile sides powers of two >= ``smallest`` (``tl.dot`` needs 16), warps a power of two <= 32,
    at least one stage: a forced config that would not compile fails here, not at launch."""
    bad = [f"{k}={v!r}" for k, v in blocks.items() if not (_pow2(v) and v >= smallest)]
    if bad:
        raise ValueError(f"{name}: {', '.join(bad)}: tile sides must be powers of two >= {smallest}")
    if not (_pow2(num_warps) and num_warps <= 32):
        raise ValueError(f"{name}: num_warps must be a power of two <= 32, got {num_warps!r}")
    if not (isinstance(num_stages, int) and not isinstance(num_stages, bool) and num_stages >= 1):
        raise ValueError(f"{name}: num_stages must be an integer >= 1, got {num_stages!r}")


@dataclass(frozen=True)
class AttentionTiles:
    """Triton ``set_attention``: ``packed`` programs take several short groups at once (else one
    program per group's q-block); BLOCK_M query rows by BLOCK_N key rows."""

    packed: bool
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.packed, bool):
            raise ValueError(f"AttentionTiles.packed must be a bool, got {self.packed!r}")
        _check_launch("AttentionTiles", {"block_m": self.block_m, "block_n": self.block_n},
                      self.num_warps, self.num_stages)


@dataclass(frozen=True)
class ScoreTiles:
    """Triton MRA score GEMM: BLOCK_N rows by BLOCK_A score columns, BLOCK_K deep."""

    block_n: int
    block_a: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_launch("ScoreTiles", {"block_n": self.block_n, "block_a": self.block_a, "block_k": self.block_k},
                      self.num_warps, self.num_stages)


@dataclass(frozen=True)
class PoolRows:
    """Triton MRA pooling: BLOCK_N rows a step of the row loop, software-pipelined ``num_stages`` deep."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_launch("PoolRows", {"block_n": self.block_n}, self.num_warps, self.num_stages, smallest=1)


CPU_ISAS = ("auto", "amx", "avx512_bf16", "avx512", "avx2", "generic")
CUDA_ATTENTION_KERNELS = ("auto", "tile32", "tile64", "group")
CUDA_LAYERNORM_KERNELS = ("auto", "warp", "half")


@dataclass(frozen=True)
class Tuning:
    """Forced kernel choices; every field's default is the backend's own measured choice.

    cpu_isa: the ``cpp`` kernel table ("amx", "avx512_bf16", "avx512", "avx2", "generic"; "auto":
        the fastest the CPU runs). The table is process-wide: while a tuning with another ISA runs,
        it switches it (``python -m dm2s2_fast info`` lists the tables this CPU has).
    cuda_attention: the ``cuda`` set_attention kernel ("tile32", "tile64": the tiled tensor-core
        kernel of that tile; "group": the whole-group kernel, head dims 32/64).
    cuda_layernorm: the ``cuda`` LayerNorm row kernel ("warp" or "half"-warp rows).
    triton_attention, triton_mra_scores, triton_mra_pool: forced Triton launch configs.
    triton_fast_launch: launch compiled Triton kernels through ``FastLaunch``'s cache instead of
        ``JITFunction.run`` (3-6 µs less host time per launch; not yet timed on a GPU).
    """

    cpu_isa: Literal["auto", "amx", "avx512_bf16", "avx512", "avx2", "generic"] = "auto"
    cuda_attention: Literal["auto", "tile32", "tile64", "group"] = "auto"
    cuda_layernorm: Literal["auto", "warp", "half"] = "auto"
    triton_attention: AttentionTiles | None = None
    triton_mra_scores: ScoreTiles | None = None
    triton_mra_pool: PoolRows | None = None
    triton_fast_launch: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("cpu_isa", CPU_ISAS), ("cuda_attention", CUDA_ATTENTION_KERNELS),
                              ("cuda_layernorm", CUDA_LAYERNORM_KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Tuning.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, kind in (("triton_attention", AttentionTiles), ("triton_mra_scores", ScoreTiles),
                           ("triton_mra_pool", PoolRows)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Tuning.{name} must be None or a {kind.__name__}, got {value!r}")
        if not isinstance(self.triton_fast_launch, bool):
            raise ValueError(f"Tuning.triton_fast_launch must be a bool, got {self.triton_fast_launch!r}")

    def replace(self, **changes) -> "Tuning":
        """A copy with ``changes`` (validated like a new one)."""
        return dataclasses.replace(self, **changes)

    @contextlib.contextmanager
    def active(self) -> Iterator["Tuning"]:
        """Make this tuning current for the block (this thread or asyncio task only)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    @contextlib.contextmanager
    def patch(self, **changes) -> Iterator["Tuning"]:
        """``self.replace(**changes)``, current for the block: a benchmark's variant."""
        with self.replace(**changes).active() as tuning:
            yield tuning


DEFAULT = Tuning()
_current: contextvars.ContextVar[Tuning] = contextvars.ContextVar("dm2s2_fast_tuning", default=DEFAULT)


def current() -> Tuning:
    """The tuning in effect here (``DEFAULT`` outside any ``Tuning.active()`` block)."""
    return _current.get()
