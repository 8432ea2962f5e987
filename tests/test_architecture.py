"""The package's layering, held by parsing its imports (docs/backends.md#layout).

data (config + the batch) < ops (contracts) < backends (kernels) < engine; the reference model
defines the math and needs no backend; a backend needs no other backend and no reference model;
``import dm2s2_fast`` loads neither Triton nor the compiled library.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dm2s2_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dm2s2_fast module ``path`` imports (relative imports resolved; ``from x import y``
    counted as x.y too, since y may be a module)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "dm2s2_fast" or name.startswith("dm2s2_fast.")}


def _sources() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _backend_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 3 and parts[1] == "backends" and parts[2] != "common":
        return parts[2]
    return None


def _violations() -> list[str]:
    found = []
    for module, imports in _sources().items():
        for target in imports:
            if _under(module, "dm2s2_fast.reference") and _under(target, "dm2s2_fast.backends"):
                found.append(f"the reference model {module} imports the backend {target}")
            own = _backend_of(module)
            if own is not None:
                other = _backend_of(target)
                if other is not None and other != own:
                    found.append(f"backend {module} imports another backend, {target}")
                if any(_under(target, f"dm2s2_fast.{up}") for up in ("reference", "engine", "graphs")):
                    found.append(f"backend {module} imports {target}, above the backends")
            if _under(module, "dm2s2_fast.data") and not (
                    target == "dm2s2_fast" or _under(target, "dm2s2_fast.data") or _under(target, "dm2s2_fast.config")):
                found.append(f"the data layer's {module} imports {target}, above it")
            if _under(module, "dm2s2_fast.ops") and _under(target, "dm2s2_fast.backends"):
                found.append(f"the op contract {module} imports the backend {target}")
    return sorted(found)


def test_layers_hold():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    # The rules above can fail: a backend that imports another one, and a data module that imports
    # the engine, are both reported.
    fake = tmp_path / "dm2s2_fast"
    for rel, text in {"__init__.py": "", "config.py": "", "backends/__init__.py": "",
                      "backends/cpp/__init__.py": "from ..cuda import kernels\n",
                      "backends/cuda/__init__.py": "", "data/__init__.py": "from ..engine import convert\n",
                      "engine.py": ""}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = _violations()
    assert any("backend dm2s2_fast.backends.cpp imports another backend" in f for f in found), found
    assert any("the data layer's dm2s2_fast.data imports dm2s2_fast.engine" in f for f in found), found


def test_import_loads_neither_triton_nor_the_library():
    code = ("import sys, torch, dm2s2_fast\n"
            "from dm2s2_fast import _extension\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert not _extension._state['done'], 'the compiled library was loaded'\n"
            "assert not any(n.startswith('dm2s2_fast::') for n in torch._C._dispatch_get_all_op_names()), 'ops defined'\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda", "triton"])
def test_each_backend_is_a_package(backend):
    assert (PACKAGE / "backends" / backend / "__init__.py").is_file()
