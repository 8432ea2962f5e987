"""Dispatch (dm2s2_fast.dispatch): ``auto``'s order and choices, explicit backends that never fall
back, ``reasons`` listing every failure, error messages that show the call's shapes and dtypes, and
the availability table ``python -m dm2s2_fast info`` prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dm2s2_fast import BackendUnavailable, dispatch, ops
from helpers import ROOT, require_backend


def _have_cpp() -> None:
    require_backend("cpp", "cpu", "bias_gelu")


# ------------------------------------------------------------------ explicit backends

def test_explicit_backend_never_falls_back():
    x = torch.randn(3, 4)
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' cannot run bias_gelu\(float32\[3, 4\]@cpu, "
                                                 r"float32\[4\]@cpu\) on cpu: "):
        ops.bias_gelu(x, torch.randn(4), backend="cuda")
    # An unknown name is a bad argument of the op; dispatch itself reports it as unavailable.
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('torch', 'triton', 'cpp', 'cuda'\), "
                                         r"got 'numpy'"):
        ops.bias_gelu(x, torch.randn(4), backend="numpy")
    with pytest.raises(BackendUnavailable, match="unknown backend 'numpy'"):
        dispatch.resolve("bias_gelu", "numpy", "cpu", (x, torch.randn(4)))


def test_error_names_the_call_and_every_reason():
    """An explicit backend's refusal shows the call (dtypes, shapes, devices, scalars) and all of
    its reasons at once: here a dtype the cpp kernels do not take and a tensor that requires grad."""
    _have_cpp()
    q = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    message = (r"backend 'cpp' cannot run set_attention\(float64\[5, 2, 4\]@cpu, float64\[5, 2, 4\]@cpu, "
               r"float64\[5, 2, 4\]@cpu, int32\[2\]@cpu, 5, 0\.5\) on cpu: cpp kernels take [a-z0-9/]+, got float64"
               r"( \(.*backend='torch' takes any\))?; cpp kernels have no autograd")
    with pytest.raises(BackendUnavailable, match=message):
        ops.set_attention(q, q, q, cu, 5, 0.5, backend="cpp")
    found = dispatch.reasons("cpp", "set_attention", "cpu", (q, q, q, cu, 5, 0.5))
    assert len(found) == 2 and "float64" in found[0] and "autograd" in found[1], found
    with torch.no_grad():
        assert len(dispatch.reasons("cpp", "set_attention", "cpu", (q, q, q, cu, 5, 0.5))) == 1


def test_reasons_include_the_kernels_limits():
    """Capability reasons and the kernel's own limits are listed together (Triton: fp64 and a head
    dim past its 256)."""
    require_backend("triton", "cpu" if dispatch.triton_interpret() else "cuda", "set_attention")
    device = "cpu" if dispatch.triton_interpret() else "cuda"
    q = torch.randn(3, 1, 512, dtype=torch.float64, device=device)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=device)
    found = dispatch.reasons("triton", "set_attention", device, (q, q, q, cu, 3, 0.1))
    assert any("float64" in r for r in found) and any("head dim <= 256" in r for r in found), found
    assert dispatch.reasons("triton", "set_attention", device, (q.float(),) * 3 + (cu, 3, 0.1)) != []
    assert dispatch.reasons("triton", "set_attention", device, (q.float()[..., :32],) * 3 + (cu, 3, 0.1)) == []


def test_reasons_for_what_cannot_run_anywhere():
    assert dispatch.reasons("numpy", "bias_gelu", "cpu") == [f"unknown backend 'numpy'; known: {dispatch.BACKENDS}"]
    assert dispatch.reasons("torch", "bias_gelu", "cpu") == []
    assert any("not meta" in r for r in dispatch.reasons("torch", "bias_gelu", "meta"))
    if not dispatch.triton_interpret():
        assert any("TRITON_INTERPRET=1" in r for r in dispatch.reasons("triton", "bias_gelu", "cpu"))


def test_auto_failure_lists_every_backend_it_tried():
    x = torch.randn(3, 4, device="meta")
    with pytest.raises(BackendUnavailable, match=r"no backend can run bias_gelu\(float32\[3, 4\]@meta, "
                                                 r"float32\[4\]@meta\) on meta:\n  torch: torch runs on cpu/cuda"):
        dispatch.resolve("bias_gelu", "auto", "meta", (x, torch.randn(4, device="meta")))


def test_check_backend_refuses_early():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        dispatch.check_backend("fastest", "cpu")
    dispatch.check_backend("auto", "cpu")
    dispatch.check_backend("torch", "cpu")
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run on cpu"):
        dispatch.check_backend("cuda", "cpu")


def test_registry_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        dispatch.register_backend("numpy", dispatch.Capability(("cpu",), (torch.float32,)))
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        dispatch.register_kernel("softmax", "torch")


def test_describe_shows_dtypes_shapes_devices_and_values():
    assert dispatch.describe((torch.zeros(2, 3, dtype=torch.float16), 7, 0.123456, None)) == \
        "float16[2, 3]@cpu, 7, 0.1235, None"


# ------------------------------------------------------------------ auto

def test_auto_picks_an_available_backend_and_info_has_reasons():
    name, _ = dispatch.resolve("bias_gelu", "auto", "cpu", (torch.randn(2, 3), torch.randn(3)))
    assert name in ("cpp", "torch")
    table = dispatch.availability()
    assert set(table) == set(dispatch.BACKENDS) and all(set(t) == set(dispatch.DEVICES) for t in table.values())
    assert table["torch"]["cpu"] is None
    for name in dispatch.BACKENDS:
        for device, reason in table[name].items():
            assert reason is None or isinstance(reason, str) and reason
    assert table["cpp"]["cuda"] and table["cuda"]["cpu"]  # never possible
    if not torch.cuda.is_available():
        assert table["cuda"]["cuda"] and table["torch"]["cuda"]


def test_auto_picks_cpp_for_fp32_and_torch_otherwise():
    _have_cpp()
    x, b = torch.randn(4, 8), torch.randn(8)
    assert dispatch.resolve("bias_gelu", "auto", "cpu", (x, b))[0] == "cpp"
    assert dispatch.resolve("bias_gelu", "auto", "cpu", (x.double(), b.double()))[0] == "torch"
    with pytest.raises(BackendUnavailable, match="cpp kernels take .*, got float64"):
        ops.bias_gelu(x.double(), b.double(), backend="cpp")
    # Autograd: the cpp kernels have none, so a graph-building call goes to torch (or raises).
    xg = x.clone().requires_grad_()
    assert dispatch.resolve("bias_gelu", "auto", "cpu", (xg, b))[0] == "torch"
    with pytest.raises(BackendUnavailable, match="autograd"):
        ops.bias_gelu(xg, b, backend="cpp")
    with torch.no_grad():
        assert dispatch.resolve("bias_gelu", "auto", "cpu", (xg, b))[0] == "cpp"
    assert dispatch.availability()["cpp"]["cpu"] is None


def test_auto_orders_come_from_the_measurements():
    """auto_order.json: per device (and for CUDA-graph replay) every op orders the same backends as
    its mode's default; the CPU takes cpp first, CUDA cuda first, and under graphs Triton first
    where its kernel measured faster. Off CUDA ``graphs`` changes nothing."""
    with open(ROOT / "dm2s2_fast" / "auto_order.json") as f:
        table = json.load(f)
    assert set(table) == {"cpu", "cuda", "cuda_graphs"}
    for mode, entry in table.items():
        assert entry["evidence"], mode
        for op in dispatch.OPS:
            device, graphs = ("cpu", False) if mode == "cpu" else ("cuda", mode == "cuda_graphs")
            order = dispatch.auto_order(op, device, graphs)
            assert order == tuple(entry.get("ops", {}).get(op, entry["default"])), (mode, op)
            assert sorted(order) == sorted(entry["default"]), (mode, op)
    for op in dispatch.OPS:
        eager, graphed = dispatch.auto_order(op, "cuda"), dispatch.auto_order(op, "cuda", graphs=True)
        assert sorted(eager) == sorted(graphed), op
        assert dispatch.auto_order(op, "cpu", graphs=True) == dispatch.auto_order(op, "cpu") == ("cpp", "torch")
        assert eager[0] == "cuda", op
        assert dispatch.auto_order(op, "meta") == ("torch",)
    assert dispatch.auto_order("set_attention", "cuda", graphs=True)[0] == "triton"
    assert dispatch.auto_order("mra_pool", "cuda", graphs=True)[0] == "cuda"


def test_auto_takes_the_first_backend_that_can_run_the_call(monkeypatch):
    monkeypatch.setitem(dispatch._AUTO["cpu"], "bias_gelu", ("cuda", "torch"))
    assert dispatch.resolve("bias_gelu", "auto", "cpu", (torch.randn(2, 3), torch.randn(3)))[0] == "torch"


# ------------------------------------------------------------------ the info command

def test_info_prints_the_availability_table():
    result = subprocess.run([sys.executable, "-m", "dm2s2_fast", "info"], capture_output=True, text=True,
                            cwd=str(ROOT), timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in dispatch.BACKENDS:
        assert f"| {name} |" in result.stdout, result.stdout
    assert "auto picks, per op:" in result.stdout
    if dispatch.availability()["cpp"]["cpu"] is None:
        assert "| cpp | available |" in result.stdout, result.stdout
