"""Backend registry and dispatch (docs/backends.md).

A backend (``dm2s2_fast/backends/<name>/``) registers itself with a ``Capability`` — the devices and
dtypes its kernels take, as data — and one kernel per op it implements, each with an optional
``limits`` function for what the capability cannot say (a head dim, a row width). ``reasons`` runs
every check and returns *all* the reasons a backend cannot take a call. Backend modules are imported
lazily, on the first call that could use them, so importing the package never needs the compiled
extension, Triton or a GPU.

``backend="auto"`` takes, per op, the first backend of the device's order (``auto_order.json``: the
measured choices, with the results they come from) that can take the call. An explicit backend
that cannot take it raises ``BackendUnavailable`` with its reasons and the call's shapes and
dtypes, never falls back silently.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS = ("set_attention", "embed_layernorm", "add_layernorm", "bias_gelu", "linear", "linear_bias_gelu",
       "linear_add_layernorm", "intra_mra", "inter_mra", "mra_pool")
BACKENDS = ("torch", "triton", "cpp", "cuda")
DEVICES = ("cpu", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Capability:
    """What a backend's kernels take: devices, floating dtypes (every float tensor argument), and
    whether they can run while a tensor requires grad. ``hint`` follows a dtype refusal."""

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    autograd: bool = False
    hint: str = ""


# limits(*args) -> reasons the kernel cannot take these arguments beyond the capability ([] if none)
Limits = Callable[..., "list[str]"]


@dataclass
class Backend:
    name: str
    capability: Capability
    kernels: dict[str, Callable] = field(default_factory=dict)
    limits: dict[str, Limits] = field(default_factory=dict)
    unavailable: str | None = None  # why the whole backend cannot run here (a library that failed to load)


_registry: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def register_backend(name: str, capability: Capability, unavailable: str | None = None) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    backend = _registry.get(name)
    if backend is None:
        backend = _registry[name] = Backend(name, capability)
    backend.capability = capability
    backend.unavailable = unavailable
    return backend


def register_kernel(op: str, backend: str, limits: Limits | None = None):
    """Decorator: ``fn`` implements ``op`` for ``backend``; ``limits`` may refuse some calls."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")

    def wrap(fn: Callable) -> Callable:
        entry = _registry.get(backend)
        if entry is None:
            raise ValueError(f"register_backend({backend!r}, ...) must come before its kernels")
        entry.kernels[op] = fn
        if limits is not None:
            entry.limits[op] = limits
        return fn

    return wrap


def _load(name: str) -> Backend | None:
    if name not in _registry and name not in _load_errors:
        module = f"dm2s2_fast.backends.{name}"
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional backend's import failure is a reason, not a crash
            _load_errors[name] = f"import {module} failed: {type(exc).__name__}: {exc}"
        if name not in _registry and name not in _load_errors:
            _load_errors[name] = f"{module} registered no backend"
    return _registry.get(name)


def _device_type(device: torch.device | str) -> str:
    # Twice per op call: skip building a torch.device when given one (~2 µs each).
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def reasons(name: str, op: str, device: torch.device | str, args: tuple = ()) -> list[str]:
    """Every reason backend ``name`` cannot run ``op`` on ``device`` with ``args`` ([] when it can)."""
    if name not in BACKENDS:
        return [f"unknown backend {name!r}; known: {BACKENDS}"]
    backend = _load(name)
    if backend is None:
        return [_load_errors[name]]
    if backend.unavailable:
        return [backend.unavailable]
    cap = backend.capability
    found = []
    dev = _device_type(device)
    if dev not in cap.devices:
        hint = " (on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton)" \
            if name == "triton" and dev == "cpu" else ""
        found.append(f"{name} runs on {'/'.join(cap.devices)}, not {dev}{hint}")
    if op not in backend.kernels:
        return found + [f"{name} has no {op} kernel"]
    if args:
        grad = torch.is_grad_enabled()
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args
                         if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype not in cap.dtypes})
        if dtypes:
            takes = "/".join(str(d).replace("torch.", "") for d in cap.dtypes)
            found.append(f"{name} kernels take {takes}, got {', '.join(dtypes)}{cap.hint}")
        if not cap.autograd and grad and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            found.append(f"{name} kernels have no autograd; a tensor requires grad (use torch.no_grad())")
        others = {a.device.type for a in args if isinstance(a, torch.Tensor)} - set(cap.devices) - {dev}
        if others:
            found.append(f"{name} kernels take tensors on {'/'.join(cap.devices)}, got some on {', '.join(sorted(others))}")
        limits = backend.limits.get(op)
        if limits is not None:
            found += limits(*args)
    return found


def describe(args: tuple) -> str:
    """The call's arguments as an error shows them: tensors by dtype and shape, the rest by value."""
    def one(a) -> str:
        if isinstance(a, torch.Tensor):
            return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}@{a.device.type}"
        if isinstance(a, float):
            return f"{a:.4g}"
        return repr(a)
    return ", ".join(one(a) for a in args)


def _load_auto_orders() -> dict:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_order.json")) as f:
        table = json.load(f)
    orders = {}
    for mode, entry in table.items():
        default = tuple(entry["default"])
        per_op = {op: tuple(order) for op, order in entry.get("ops", {}).items()}
        for op, order in per_op.items():
            if op not in OPS or sorted(order) != sorted(default):
                raise ValueError(f"auto_order.json: {mode}.{op} must order the same backends as the default")
        orders[mode] = {op: per_op.get(op, default) for op in OPS}
    return orders


_AUTO = _load_auto_orders()


def auto_order(op: str, device: torch.device | str, graphs: bool = False) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op``, in order; ``graphs``: for a forward replayed as a
    CUDA graph (where GPU time alone counts)."""
    dev = _device_type(device)
    mode = "cuda_graphs" if graphs and dev == "cuda" else dev
    return _AUTO.get(mode, {}).get(op, ("torch",))


def resolve(op: str, backend: str, device: torch.device | str, args: tuple = (),
            graphs: bool = False) -> tuple[str, Callable]:
    """The (backend name, kernel) that runs ``op`` for these arguments (``graphs``: see auto_order)."""
    if backend == "auto":
        tried = []
        for name in auto_order(op, device, graphs):
            found = reasons(name, op, device, args)
            if not found:
                return name, _registry[name].kernels[op]
            tried.append(f"{name}: {'; '.join(found)}")
        raise BackendUnavailable(f"no backend can run {op}({describe(args)}) on {device}:\n  " + "\n  ".join(tried))
    found = reasons(backend, op, device, args)
    if found:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}({describe(args)}) on {device}: "
                                 + "; ".join(found))
    return backend, _registry[backend].kernels[op]


def call(op: str, backend: str, device: torch.device, *args):
    _, fn = resolve(op, backend, device, args)
    return fn(*args)


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise early when an explicit backend cannot run on ``device`` at all."""
    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    per_op = [reasons(backend, op, device) for op in OPS]
    if all(per_op):
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {'; '.join(per_op[0])}")


def availability() -> dict[str, dict[str, str | None]]:
    """{backend: {device: None if available else why not}} for ``python -m dm2s2_fast info``."""
    table = {}
    for name in BACKENDS:
        table[name] = {}
        for dev in DEVICES:
            found = reasons(name, "add_layernorm", dev)
            if not found and dev == "cuda" and not torch.cuda.is_available():
                found = ["no CUDA device (torch.cuda.is_available() is False)"]
            table[name][dev] = "; ".join(found) or None
    return table


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
