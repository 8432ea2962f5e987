"""The ``triton`` backend's fused GEMM + epilogue kernels (``DM2S2_TRITON_LINEAR=fused``) for
linear_bias_gelu and linear_add_layernorm, against an fp64 torch run (DESIGN §5), the mode switch,
the config choice, and the sm_90 build of the kernels (registers, spills) where there is no GPU.

Devices, parity bounds and helpers are those of ``test_triton_ops`` (interpreter on CPU, CUDA when
present). A freshly allocated output cannot be poisoned beforehand, so every element is checked
finite and whole tensors are compared.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_triton_ops import (INTERPRET, ROOT, _run_python, check, device_param, dtype_param, to64,
                             triton_module)
from dm2s2_fast import backends, ops

ENV = "DM2S2_TRITON_LINEAR"


def _lbg():
    return triton_module("linear_bias_gelu")


def _lal():
    return triton_module("linear_add_layernorm")


def _rand(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _gelu_inputs(device, dtype, n, k, f, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, n, k + 5)[:, 3:3 + k] if strided else _rand(g, n, k)
    w, b = _rand(g, f, k, scale=k ** -0.5), _rand(g, f)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def _ln_inputs(device, dtype, n, k, d, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, n, k + 5)[:, 3:3 + k] if strided else _rand(g, n, k)
    res = _rand(g, n, d + 2, scale=2, shift=1)[:, 1:1 + d] if strided else _rand(g, n, d, scale=2, shift=1)
    w, b = _rand(g, d, k, scale=k ** -0.5), _rand(g, d, scale=0.5)
    lw, lb = torch.rand(d, generator=g) + 0.5, _rand(g, d, scale=0.1)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, res, lw, lb)]


def _check_gelu(args, dtype, name):
    out = ops.linear_bias_gelu(*args, backend="triton")
    x, w = args[0], args[1]
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == dtype and out.device == x.device
    if x.shape[0] == 0:
        return
    ref64 = ops.linear_bias_gelu(*map(to64, args), backend="torch")
    own = ops.linear_bias_gelu(*(t.cpu() for t in args), backend="torch") if dtype != torch.float32 else ref64
    check(name, out, ref64, own, dtype)


def _check_ln(args, dtype, name):
    out = ops.linear_add_layernorm(*args, 1e-12, backend="triton")
    x, w = args[0], args[1]
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == dtype and out.device == x.device
    if x.shape[0] == 0:
        return
    ref64 = ops.linear_add_layernorm(*map(to64, args), 1e-12, backend="torch")
    own = ops.linear_add_layernorm(*(t.cpu() for t in args), 1e-12, backend="torch") \
        if dtype != torch.float32 else ref64
    check(name, out, ref64, own, dtype)


# (N, K, out, strided rows): empty, one row, no dim a tile multiple (K spans 2 BLOCK_K steps with a
# ragged last one), several row/column tiles with K a multiple of BLOCK_K over 3 steps, strided x.
GELU_SHAPES = [(0, 32, 48, False), (1, 40, 24, False), (37, 100, 50, True), (130, 192, 160, False)]
# d=48 (no power of two), d=384 (the ads width: 512-column tiles, 128 masked), strided x/residual.
LN_SHAPES = [(0, 32, 48, False), (1, 40, 48, False), (37, 100, 48, True), (70, 192, 384, False)]


@device_param
@dtype_param
@pytest.mark.parametrize("n,k,f,strided", GELU_SHAPES, ids=lambda v: str(v))
def test_fused_linear_bias_gelu(device, dtype, n, k, f, strided, monkeypatch):
    monkeypatch.setenv(ENV, "fused")
    _check_gelu(_gelu_inputs(device, dtype, n, k, f, strided), dtype, f"linear_bias_gelu/{n}x{k}x{f}")


@device_param
@dtype_param
@pytest.mark.parametrize("n,k,d,strided", LN_SHAPES, ids=lambda v: str(v))
def test_fused_linear_add_layernorm(device, dtype, n, k, d, strided, monkeypatch):
    monkeypatch.setenv(ENV, "fused")
    _check_ln(_ln_inputs(device, dtype, n, k, d, strided), dtype, f"linear_add_layernorm/{n}x{k}x{d}")


# Small tiles: 150 rows of 16 -> 10 row blocks, two groups of the grouped order (8 + 2); K=72 in
# BLOCK_K=16 steps with a ragged last one; 100 columns of 32 -> 4 column blocks, the last partial.
@device_param
@dtype_param
@pytest.mark.parametrize("spec", ["fused,16,32,16,4,2", "fused,32,16,32,2,1"])
def test_fused_forced_configs(device, dtype, spec, monkeypatch):
    monkeypatch.setenv(ENV, spec)
    _check_gelu(_gelu_inputs(device, dtype, 150, 72, 100, strided=True, seed=1), dtype, f"linear_bias_gelu/{spec}")
    _check_ln(_ln_inputs(device, dtype, 150, 72, 48, strided=True, seed=2), dtype, f"linear_add_layernorm/{spec}")


# ------------------------------------------------------------------------------ mode selection

@pytest.mark.parametrize("spec,want", [
    ("", ("composed", None)), ("composed", ("composed", None)), (" fused ", ("fused", None)),
    ("fused,64,128,32,4,3", ("fused", (64, 128, 32, 4, 3))), ("fused, 16,16,16,1,1", ("fused", (16, 16, 16, 1, 1))),
    ("fused-gelu", ("fused-gelu", None)), ("fused-gelu,64,64,32,4,3", ("fused-gelu", (64, 64, 32, 4, 3)))])
def test_linear_mode_parse(spec, want, monkeypatch):
    monkeypatch.setenv(ENV, spec)
    assert _lbg().linear_mode() == want


@pytest.mark.parametrize("spec", [
    "fuse", "cuBLAS", "composed,64,64,32,4,3", "fused,64,64,32,4", "fused,64,64,32,4,3,1", "fused,a,64,32,4,3",
    "fused,48,64,32,4,3", "fused,8,64,32,4,3", "fused,64,64,32,3,3", "fused,64,64,32,64,3", "fused,64,64,32,4,0"])
def test_linear_mode_rejects(spec, monkeypatch):
    monkeypatch.setenv(ENV, spec)
    with pytest.raises(ValueError, match=ENV):
        _lbg().linear_mode()


@device_param
def test_bad_mode_raises_from_the_ops(device, monkeypatch):
    monkeypatch.setenv(ENV, "fused,64")
    with pytest.raises(ValueError, match=ENV):
        ops.linear_bias_gelu(*_gelu_inputs(device, torch.float32, 3, 16, 8), backend="triton")
    with pytest.raises(ValueError, match=ENV):
        ops.linear_add_layernorm(*_ln_inputs(device, torch.float32, 3, 16, 8), 1e-12, backend="triton")


@device_param
@pytest.mark.parametrize("spec,fused", [(None, (False, False)), ("composed", (False, False)), ("fused", (True, True)),
                                        ("fused,16,16,16,4,1", (True, True)), ("fused-gelu", (True, False))])
def test_mode_picks_the_path(device, spec, fused, monkeypatch):
    """Unset and ``composed`` run the composed forms, ``fused`` both fused launchers, ``fused-gelu``
    the fused GELU layer and the composed LayerNorm one, and nothing else."""
    if spec is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, spec)
    calls = []
    for mod, label in ((_lbg(), "gelu"), (_lal(), "ln")):
        for attr in ("_launch", "_composed"):
            real = getattr(mod, attr)
            monkeypatch.setattr(mod, attr, lambda *a, _r=real, _t=(label, attr): calls.append(_t) or _r(*a))
    ops.linear_bias_gelu(*_gelu_inputs(device, torch.float32, 5, 16, 24), backend="triton")
    ops.linear_add_layernorm(*_ln_inputs(device, torch.float32, 5, 16, 24), 1e-12, backend="triton")
    paths = ["_launch" if f else "_composed" for f in fused]
    assert calls == [("gelu", paths[0]), ("ln", paths[1])]


def test_supports_fused_layernorm_width(monkeypatch):
    """The fused LayerNorm kernel holds whole rows: it refuses d > FUSED_MAX_DIM, with the reason;
    the composed form takes them."""
    lal = _lal()
    d = lal.FUSED_MAX_DIM + 1
    args = (torch.empty(2, 8), torch.empty(d, 8), torch.empty(d), torch.empty(2, d), torch.empty(d),
            torch.empty(d), 1e-12)
    device = "cpu" if INTERPRET else "cuda"
    monkeypatch.setenv(ENV, "fused")
    if backends.why_not("triton", "linear_add_layernorm", device) is not None:
        pytest.skip("triton backend unavailable here")
    reason = backends.why_not("triton", "linear_add_layernorm", device, args)
    assert reason is not None and f"d <= {lal.FUSED_MAX_DIM}, got {d}" in reason, reason
    monkeypatch.setenv(ENV, "composed")
    assert backends.why_not("triton", "linear_add_layernorm", device, args) is None


def test_configs(monkeypatch):
    """The built-in choices for the ads shapes (N=26417, d=384, FFN 1536) and tiny N; a forced
    config overrides them (linear_add_layernorm keeps whole rows)."""
    if backends.why_not("triton", "linear_bias_gelu", "cpu" if INTERPRET else "cuda") is not None:
        pytest.skip("triton backend unavailable here")
    monkeypatch.delenv(ENV, raising=False)
    gelu, ln = _lbg().gelu_config, _lal().layernorm_config
    bf16, f32 = torch.bfloat16, torch.float32
    assert gelu(bf16, 26417, 384, 1536) == (128, 128, 64, 8, 3)  # 2484 programs of wgmma tiles
    assert gelu(bf16, 200, 384, 1536) == (64, 64, 64, 4, 3)  # 96 programs
    assert gelu(bf16, 1, 384, 1536) == (16, 64, 64, 4, 3)
    assert gelu(f32, 26417, 384, 1536) == (64, 64, 32, 4, 2)
    assert ln(bf16, 26417, 384, 384) == ln(bf16, 26417, 1536, 384) == (32, 512, 32, 8, 3)
    assert ln(bf16, 1, 384, 384) == (16, 512, 32, 4, 3)
    assert ln(f32, 26417, 1536, 384) == (16, 512, 16, 8, 2)
    monkeypatch.setenv(ENV, "fused,32,64,16,4,2")
    assert gelu(bf16, 26417, 384, 1536) == (32, 64, 16, 4, 2)
    assert ln(bf16, 26417, 384, 384) == (32, 512, 16, 4, 2)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                    reason="torch.compile of Triton kernels needs a GPU (interpreted kernels are not traceable)")
def test_fused_ops_compile(monkeypatch):
    """With ``fused`` selected, torch.compile traces the backend kernels through their custom ops."""
    monkeypatch.setenv(ENV, "fused")
    lbg, lal = _lbg(), _lal()
    gelu_args = _gelu_inputs("cuda", torch.bfloat16, 70, 96, 128)
    ln_args = _ln_inputs("cuda", torch.bfloat16, 70, 96, 48)
    compiled = torch.compile(lambda *a: lbg.linear_bias_gelu_triton(*a), fullgraph=True)
    torch.testing.assert_close(compiled(*gelu_args), lbg.linear_bias_gelu_triton(*gelu_args))
    compiled = torch.compile(lambda *a: lal.linear_add_layernorm_triton(*a, 1e-12), fullgraph=True)
    torch.testing.assert_close(compiled(*ln_args), lal.linear_add_layernorm_triton(*ln_args, 1e-12))


# --------------------------------------------- sm_90 build: registers and spills (ptxas, no GPU)

_AOT_SCRIPT = r"""
import torch
import dm2s2_fast.triton as T
assert not T.INTERPRET and T.UNAVAILABLE is None, T.UNAVAILABLE
from dm2s2_fast.triton import linear_add_layernorm as LL, linear_bias_gelu as LG
from sm90_build import build

ADS, FFN = 26417, 1536
for dt in (torch.bfloat16, torch.float32):
    for n in (ADS, 1):
        bm, bn, bk, w, st = LG.gelu_config(dt, n, 384, FFN)
        build(LG._linear_bias_gelu_kernel, dict(X=dt, W=dt, B=dt, OUT=dt, n_rows=n, n_out=FFN, k_dim=384,
              stride_xn=384, stride_wn=384, stride_on=FFN),
              dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=LG.GROUP_M, EVEN_K=True, INTERP=False), w, st)
    # K=384 and K=1536 (attention output, FFN down) differ only in the runtime k_dim: one build
    for n, d in ((ADS, 384), (1, 384), (ADS, LL.FUSED_MAX_DIM)):
        bm, bn, bk, w, st = LL.layernorm_config(dt, n, 1536, d)
        build(LL._linear_add_layernorm_kernel, dict(X=dt, W=dt, B=dt, RES=dt, LN_W=dt, LN_B=dt, OUT=dt,
              n_rows=n, dim=d, k_dim=1536, eps=1e-12, stride_xn=1536, stride_wn=1536, stride_rn=d, stride_on=d),
              dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=True, INTERP=False), w, st)
print("ALL-COMPILED")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile these kernels for real")
def test_fused_kernels_compile_for_sm90_without_spills(tmp_path):
    """The fused kernels build for sm_90 (H100/H200) with Triton's bundled ptxas, at the configs the
    launchers pick for the ads shapes and for tiny N (bf16 and fp32, and the widest d the fused
    LayerNorm takes), specialised as a launch would be (aligned pointers, strides divisible by 16:
    without that there is no cp.async pipelining and no register pressure to speak of), and
    ptxas reports no spills. Run with -s to see the registers."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    from sm90_build import spilling
    proc = _run_python(_AOT_SCRIPT, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                       TRITON_CACHE_DIR=str(tmp_path))  # a fresh cache, so ptxas runs and logs
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("triton's ptxas is not available")
    assert proc.returncode == 0 and "ALL-COMPILED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    kernels = [line for line in proc.stdout.splitlines() if line.startswith("KERNEL")]
    print("\n" + "\n".join(kernels))
    assert len(kernels) == 9, kernels
    assert not spilling(proc.stdout), spilling(proc.stdout)


# ------------------------------------------------------------------------- the GPU benchmark

def test_gpu_linear_bench_smoke(tmp_path):
    """bench/gpu_linear.py (for a GPU session) runs its parity and timing paths here in --smoke
    mode (interpreter, tiny shapes), every entry within its bound, so it does not rot unseen."""
    _lbg()  # skips when the triton backend cannot load here
    if torch.cuda.is_available():
        # The subprocess would need Triton's interpreter, which the GPU machine's Triton 3.6 cannot
        # run under its NumPy 2.5; gpu_check.sh's gpu_linear stage runs the script for real there.
        pytest.skip("on a GPU machine bench/gpu_linear.py runs in full (gpu_check.sh), not in --smoke")
    out = tmp_path / "gpu_linear.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_linear.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    labels = {(r["case"], r["label"]) for r in results}
    for case in ("ffn_up", "attn_out", "ffn_down"):
        assert {(case, "F.linear"), (case, "triton"), (case, "fused")} <= labels, labels
    checked = [r for r in results if "rel_err" in r]
    assert checked and all(r["ok"] and r["time_us"] > 0 for r in checked), checked
    assert "| ffn_up | fused |" in proc.stdout
