"""Backend registry and dispatch (DESIGN §4).

Each backend declares the devices it runs on and, when it cannot run, why not. Kernel modules
register their ops here on import; they are imported lazily, so importing the package never needs
the compiled extension, Triton or a GPU. ``backend="auto"`` takes, per op, the first backend of the
device's preference order that is available and supports the call; an explicit backend that cannot
serve the call raises ``BackendUnavailable`` with the reasons, never falls back silently.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS = ("set_attention", "embed_layernorm", "add_layernorm", "bias_gelu", "linear", "linear_bias_gelu",
       "linear_add_layernorm", "intra_mra", "inter_mra", "mra_pool")
BACKENDS = ("torch", "triton", "cpp", "cuda")

# Where each backend's kernels live; importing the module registers them.
_MODULES = {
    "torch": "dm2s2_fast.ops",
    "triton": "dm2s2_fast.triton",
    "cpp": "dm2s2_fast.cpp",
    "cuda": "dm2s2_fast.cuda",
}

# Auto preference per device. On CUDA the choice is per op (AUTO_CUDA_ORDER overrides
# AUTO_ORDER["cuda"] for the ops it names), the faster of `cuda` and `triton` as the engine runs
# them: eagerly, host launch cost included. Measured on an H200, ads batch, bf16, 2026-11-30
# (bench/results/2026-11-30-h200/): per op (run 2, eager medians, µs, triton / cuda) set_attention
# 68.1 / 77.2, add_layernorm 35.6 / 23.7, bias_gelu 63.6 / 64.0, embed_layernorm 33.4 / 15.1,
# intra_mra 154.9 / 56.5, inter_mra 93.2 / 17.8, mra_pool 176.2 / 72.4. Triton's attention is the
# faster kernel, but each Triton launch costs more host time, and the whole model (run 3) ran in
# 2.43 ms (B=256) and 1.24 ms (B=1) on cuda alone against 2.46 and 1.70 with Triton's attention
# mixed in: so `cuda` for every op. The linear ops (added later) are cuBLAS plus the cuda
# epilogue kernel there, what the engine ran before; the Triton fused forms
# (DM2S2_TRITON_LINEAR=fused|fused-gelu) have not run on a GPU yet (bench/gpu_linear.py times them).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
AUTO_CUDA_ORDER: dict[str, tuple[str, ...]] = {}
# Under CUDA-graph replay (FastDM2S2(cuda_graphs=True)) no launch costs host time, so per op the
# kernel with the shorter GPU time goes first: the replay medians of the same run 2 (µs, triton /
# cuda): set_attention 67.8 / 77.8, add_layernorm 22.7 / 24.4, embed_layernorm 13.4 / 15.0 (tokens)
# and 13.4 / 14.2 (dense). linear_add_layernorm is cuBLAS plus that add_layernorm kernel on either
# backend (Triton's default composed form). bias_gelu (64.3 / 65.0) is a tie and the MRA ops are
# cuda's by 2.5-3x: those keep AUTO_ORDER.
AUTO_CUDA_GRAPH_ORDER: dict[str, tuple[str, ...]] = {
    op: ("triton", "cuda", "torch")
    for op in ("set_attention", "add_layernorm", "linear_add_layernorm", "embed_layernorm")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


# A `supports` check returns None when the backend can run the call, else the reason it cannot.
SupportsFn = Callable[..., "str | None"]


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]
    kernels: dict[str, Callable] = field(default_factory=dict)
    supports: dict[str, SupportsFn] = field(default_factory=dict)
    unavailable_reason: str | None = None  # set when the module failed to import or to load


_registry: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def register_backend(name: str, devices: tuple[str, ...], unavailable_reason: str | None = None) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    backend = _registry.get(name)
    if backend is None:
        backend = _registry[name] = Backend(name, tuple(devices))
    backend.devices = tuple(devices)
    backend.unavailable_reason = unavailable_reason
    return backend


def register_kernel(op: str, backend: str, supports: SupportsFn | None = None):
    """Decorator: ``fn`` implements ``op`` for ``backend`` (``supports`` may refuse some calls)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")

    def wrap(fn: Callable) -> Callable:
        entry = _registry.get(backend)
        if entry is None:
            raise ValueError(f"register_backend({backend!r}, ...) must come before its kernels")
        entry.kernels[op] = fn
        if supports is not None:
            entry.supports[op] = supports
        return fn

    return wrap


def _load(name: str) -> Backend | None:
    if name not in _registry and name not in _load_errors:
        try:
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # an optional backend's import failure is a reason, not a crash
            _load_errors[name] = f"import {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
        if name not in _registry and name not in _load_errors:
            _load_errors[name] = f"{_MODULES[name]} registered no backend"
    return _registry.get(name)


def _device_type(device: torch.device | str) -> str:
    # Twice per op call: skip building a torch.device when given one (~2 µs each).
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def why_not(name: str, op: str, device: torch.device | str, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """None when backend ``name`` can run ``op`` on ``device`` for these arguments, else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known: {BACKENDS}"
    backend = _load(name)
    if backend is None:
        return _load_errors[name]
    if backend.unavailable_reason:
        return backend.unavailable_reason
    dev = _device_type(device)
    if dev not in backend.devices:
        hint = " (on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton)" \
            if name == "triton" and dev == "cpu" else ""
        return f"{name} runs on {'/'.join(backend.devices)}, not {dev}{hint}"
    if op not in backend.kernels:
        return f"{name} has no {op} kernel"
    check = backend.supports.get(op)
    if check is not None and args:
        return check(*args, **(kwargs or {}))
    return None


def auto_order(op: str, device: torch.device | str, graphs: bool = False) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op``, in order; ``graphs``: for a forward that is replayed
    as a CUDA graph (GPU time alone counts)."""
    dev = _device_type(device)
    if dev == "cuda":
        if graphs and op in AUTO_CUDA_GRAPH_ORDER:
            return AUTO_CUDA_GRAPH_ORDER[op]
        if op in AUTO_CUDA_ORDER:
            return AUTO_CUDA_ORDER[op]
    return AUTO_ORDER.get(dev, ("torch",))


def resolve(op: str, backend: str, device: torch.device | str, args: tuple = (), kwargs: dict | None = None,
            graphs: bool = False) -> tuple[str, Callable]:
    """The (backend name, kernel) that runs ``op`` for these arguments (``graphs``: see auto_order)."""
    if backend == "auto":
        reasons = []
        for name in auto_order(op, device, graphs):
            reason = why_not(name, op, device, args, kwargs)
            if reason is None:
                return name, _registry[name].kernels[op]
            reasons.append(f"{name}: {reason}")
        raise BackendUnavailable(f"no backend can run {op} on {device}: " + "; ".join(reasons))
    reason = why_not(backend, op, device, args, kwargs)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op} on {device}: {reason}")
    return backend, _registry[backend].kernels[op]


def call(op: str, backend: str, device: torch.device, *args, **kwargs):
    _, fn = resolve(op, backend, device, args, kwargs)
    return fn(*args, **kwargs)


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise early when an explicit backend cannot run on ``device`` at all."""
    if backend == "auto":
        return
    reasons = [r for op in OPS if (r := why_not(backend, op, device)) is not None]
    if len(reasons) == len(OPS):
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {reasons[0]}")


def availability() -> dict[str, dict[str, str | None]]:
    """{backend: {device: None if available else why not}} for ``python -m dm2s2_fast info``."""
    table = {}
    for name in BACKENDS:
        table[name] = {}
        for dev in ("cpu", "cuda"):
            reason = why_not(name, "add_layernorm", dev)
            if reason is None and dev == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device (torch.cuda.is_available() is False)"
            table[name][dev] = reason
    return table


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
