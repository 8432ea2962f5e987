"""Find and load the compiled operator library (``dm2s2_fast/_C.so``, built from ``csrc/``).

``load()`` runs once per process and returns None when ``torch.ops.dm2s2_fast`` is ready, else the
reason it is not (no library built, a load error, disabled by the environment). The cpp and cuda
backends report that reason through ``dispatch.availability()``; importing the package never needs
the library. ``register_fake`` lets each op's contract (``dm2s2_fast/ops/<op>.py``) declare its fake
(meta) implementation at import; it is registered with torch once the library defines the op.

Where it looks, first hit wins:
1. ``$DM2S2_FAST_LIBRARY`` (a path to the .so), if set;
2. every directory of the package's ``__path__`` and the package's own directory: a regular
   install puts ``_C.so`` beside ``__init__.py``; scikit-build-core's editable (redirect) install
   puts it in site-packages/dm2s2_fast/, which its import hook adds to ``__path__``;
3. the ``dm2s2_fast._C`` module spec the import system resolves (the editable hook maps it);
4. the files the installed distribution's RECORD lists (covers running from a source checkout
   whose package dir shadows the editable hook, e.g. ``python -m pytest`` in the repo root).
``DM2S2_FAST_NO_EXTENSION=1`` skips loading (to exercise the pure-PyTorch path).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading

import torch

_PATTERNS = ("_C.so", "_C.*.so", "_C.pyd", "_C.dylib")
_lock = threading.Lock()
_state: dict = {"done": False, "path": None, "reason": None}
_pending_fakes: dict = {}  # op name -> fake implementation, until the library defines the op


def register_fake(op: str):
    """Decorator: ``fn`` is the fake (meta) implementation of ``dm2s2_fast::<op>``, for
    torch.compile / torch.export. Registered now if the library is loaded, else when it loads."""
    def deco(fn):
        with _lock:
            if _has_op(op):
                torch.library.register_fake(f"dm2s2_fast::{op}")(fn)
            else:
                _pending_fakes[op] = fn
        return fn
    return deco


def _package_dirs() -> list[str]:
    dirs = []
    pkg = sys.modules.get(__package__ or "dm2s2_fast")
    for d in list(getattr(pkg, "__path__", []) or []) + [os.path.dirname(os.path.abspath(__file__))]:
        d = os.path.abspath(str(d))
        if d not in dirs:
            dirs.append(d)
    return dirs


def candidates() -> list[str]:
    """Existing library files, in the order ``load`` tries them."""
    found: list[str] = []

    def add(path: str | None) -> None:
        if path and os.path.isfile(path):
            path = os.path.realpath(path)
            if path not in found:
                found.append(path)

    add(os.environ.get("DM2S2_FAST_LIBRARY") or None)
    for d in _package_dirs():
        for pattern in _PATTERNS:
            for path in sorted(glob.glob(os.path.join(d, pattern))):
                add(path)
    try:
        spec = importlib.util.find_spec("dm2s2_fast._C")
        add(getattr(spec, "origin", None))
    except (ImportError, ValueError, AttributeError):
        pass
    try:
        from importlib import metadata

        dist = metadata.distribution("dm2s2_fast")
        for f in dist.files or ():
            name = os.path.basename(str(f))
            if name.startswith("_C.") and name.endswith((".so", ".pyd", ".dylib")):
                add(str(dist.locate_file(f)))
    except Exception:  # no installed distribution: fine
        pass
    return found


def load() -> str | None:
    """Load the library once; None when its ops are registered, else why not."""
    if _state["done"]:
        return _state["reason"]
    with _lock:
        if _state["done"]:
            return _state["reason"]
        _state["reason"] = _load()
        _state["done"] = True
        if _state["reason"] is None:
            for op, fn in _pending_fakes.items():
                torch.library.register_fake(f"dm2s2_fast::{op}")(fn)
            _pending_fakes.clear()
        return _state["reason"]


def _load() -> str | None:
    if os.environ.get("DM2S2_FAST_NO_EXTENSION", "0") not in ("", "0"):
        return "the compiled extension is disabled (DM2S2_FAST_NO_EXTENSION is set)"
    if _has_op("set_attention"):
        return None  # already loaded (e.g. by a second copy of this module)
    paths = candidates()
    if not paths:
        return ("the compiled extension dm2s2_fast/_C.so is not built: run "
                "`pip install --no-build-isolation -e .` (needs cmake, ninja and a C++ compiler)")
    errors = []
    for path in paths:
        try:
            torch.ops.load_library(path)
        except Exception as exc:  # e.g. built against another torch: undefined symbols
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        _state["path"] = path
        if _has_op("set_attention"):
            return None
        errors.append(f"{path}: loaded but registered no dm2s2_fast ops")
    return "loading the compiled extension failed: " + "; ".join(errors)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.dm2s2_fast, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def library_path() -> str | None:
    """The file that was loaded (None before ``load`` or if it failed)."""
    return _state["path"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded library registered ``op`` for ``dispatch_key`` ("CPU", "CUDA")."""
    if load() is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dm2s2_fast::{op}", dispatch_key)
    except Exception:
        return False
