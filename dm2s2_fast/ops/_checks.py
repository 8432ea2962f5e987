"""Argument checks shared by the public ops: a bad call raises ValueError before any kernel runs.

Also the one check every fake (meta) implementation makes: its tensors share one device. The
dispatcher sends a call with one meta tensor among real ones to the fake (the Meta key wins), which
would otherwise return uninitialised real memory — or, for ``embed_layernorm``, leave ``out``
unwritten (docs/reliability.md#raw-ops).
"""
from __future__ import annotations

import operator

import torch

from .. import dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_float(name: str, t: torch.Tensor, ndim: int, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_scalar(name: str, value, nonnegative: bool = False) -> float:
    """A finite real within fp32's range (the kernels take their scalars as fp32), as a float."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not abs(f) <= _FLOAT32_MAX or (nonnegative and f < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if nonnegative else ''} number within fp32's "
                         f"range, got {value!r}")
    return f


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """No two elements of ``t`` share memory (an output written in place; an expanded or
    overlapping view would take racing writes). Each dim's stride, in increasing order, must step
    past everything the smaller dims span."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            raise ValueError(f"{name} has overlapping elements (shape {tuple(t.shape)}, strides {tuple(t.stride())})")
        span = stride * (size - 1) + span
    return None


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """x [N, k], weight [f, k] and bias [f] of one float dtype and device (a linear layer's operands)."""
    check_float("x", x, 2)
    check_float("weight", weight, 2, like=x)
    check_float("bias", bias, 1, like=x)
    check_shape("weight", weight, (weight.shape[0], x.shape[1]))
    check_shape("bias", bias, (weight.shape[0],))


def _check_has_data(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":  # offsets and indices are checked by value
        raise ValueError(f"{name} is on the meta device: its values cannot be checked")


def check_index(name: str, t: torch.Tensor, n: int, like: torch.Tensor, low: int, high: int) -> None:
    """``t`` is a 1-D integer tensor of ``n`` entries on ``like``'s device, every entry in [low, high)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor")
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")
    _check_has_data(name, t)
    if n and (int(t.min()) < low or int(t.max()) >= high):
        raise ValueError(f"{name} has entries outside [{low}, {high}): min {int(t.min())}, max {int(t.max())}")


def check_offsets(name: str, cu: torch.Tensor, total: int, like: torch.Tensor) -> int:
    """``cu`` is a non-decreasing int32 offset vector from 0 to ``total``; returns its group count."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of G+1 offsets")
    if cu.device != like.device:
        raise ValueError(f"{name} is on {cu.device}, expected {like.device}")
    _check_has_data(name, cu)
    host = cu.cpu()
    if int(host[0]) != 0 or int(host[-1]) != total:
        raise ValueError(f"{name} must run from 0 to {total}, got {int(host[0])}..{int(host[-1])}")
    if cu.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    return cu.numel() - 1


def max_group(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def check_backend(backend) -> None:
    """``backend`` names a backend (an unknown name is a bad argument, not an unavailable backend)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in dispatch.BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {dispatch.BACKENDS}, got {backend!r}")


def check_int(name: str, value) -> int:
    """An integer argument (Python or NumPy int, or a one-element integer tensor), as an int."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_fake_devices(op: str, *args) -> None:
    """A fake implementation's guard: every tensor argument on one device (see the module docstring)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"dm2s2_fast::{op}: every tensor must be on one device, got "
                         f"{', '.join(sorted(str(d) for d in devices))}")
