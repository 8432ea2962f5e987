"""The cpp backend's CPU kernels (csrc/cpu/) against the torch kernels run in fp64 (DESIGN §5).

Every op, every kernel set this CPU can run (AVX-512 attention, AVX2/FMA, the portable one), ragged shapes with empty and length-1
groups, a long tail and N = 0; outputs are checked finite and within ‖out − ref‖/‖ref‖ ≤ 1e-5;
`torch.library.opcheck` for each op; the errors the C++ side raises on its own.
Skipped when the extension is not built, unless DM2S2_FAST_REQUIRE_EXTENSION=1 (then it fails).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import dm2s2_fast.ops as ops
from dm2s2_fast import backends
from dm2s2_fast.ops.embed_layernorm import embed_layernorm_torch
from dm2s2_fast.ops.mra import inter_mra_torch, intra_mra_torch, mra_pool_torch
from dm2s2_fast.ops.set_attention import set_attention_torch

cpp = pytest.importorskip("dm2s2_fast.cpp")
if cpp._reason is not None:
    if os.environ.get("DM2S2_FAST_REQUIRE_EXTENSION", "0") not in ("", "0"):
        raise RuntimeError(f"DM2S2_FAST_REQUIRE_EXTENSION is set but the extension is unavailable: {cpp._reason}")
    pytest.skip(f"cpp backend unavailable: {cpp._reason}", allow_module_level=True)

OPS = torch.ops.dm2s2_fast
TOL = 1e-5


def _isas():
    have = []
    original = cpp.cpu_isa()
    for isa in ("avx512", "avx2", "generic"):
        try:
            cpp.cpu_isa(isa)
            have.append(isa)
        except RuntimeError:
            pass
    cpp.cpu_isa(original)
    return have


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    original = cpp.cpu_isa()
    cpp.cpu_isa(request.param)
    yield request.param
    cpp.cpu_isa(original)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL, what: str = ""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"
    if out.numel() == 0:
        return
    diff = (out.double() - ref.double()).norm().item()
    norm = ref.double().norm().item()
    rel = diff / norm if norm > 0 else diff
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e}"  # NaN fails this too


def offsets(lengths) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Ragged group lengths: empty groups, length 1, a long tail, groups past the 128-row query block.
GROUPS = {
    "mixed": [0, 1, 5, 0, 17, 130, 1, 64, 0, 33, 7],
    "long": [300, 2, 129],
    "ones": [1, 1, 1],
    "single": [1],
    "empty_groups": [0, 0],
    "none": [],
}


# ------------------------------------------------------------------------------------ attention


def _qkv(N, H, D, g, packed):
    if packed:  # views of one [N, 3, H, D] projection, as the engine makes them
        q, k, v = torch.randn(N, 3, H, D, generator=g).unbind(1)
    else:
        q, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("H,D", [(12, 32), (3, 20), (2, 5), (1, 64)])
def test_set_attention(isa, groups, H, D):
    lengths = GROUPS[groups]
    N = sum(lengths)
    g = gen(N * 31 + H * 7 + D)
    q, k, v = _qkv(N, H, D, g, packed=(H == 12))
    cu = offsets(lengths)
    scale = 1.0 / math.sqrt(D) * 1.7  # a scale other than the default
    out = ops.set_attention(q, k, v, cu, max(lengths, default=0), scale, backend="cpp")
    assert out.dtype == torch.float32 and out.is_contiguous()
    ref = set_attention_torch(q.double(), k.double(), v.double(), cu, max(lengths, default=0), scale)
    assert_close(out, ref, what=f"set_attention[{isa}]")


def test_set_attention_large_scores(isa):
    # Scores of a few hundred: needs the max subtraction; long groups exercise the K^T tiles.
    g = gen(5)
    lengths = [200, 3, 77]
    q, k, v = (t * 6 for t in _qkv(sum(lengths), 4, 32, g, packed=False))
    cu = offsets(lengths)
    out = ops.set_attention(q, k, v, cu, 200, 0.5, backend="cpp")
    ref = set_attention_torch(q.double(), k.double(), v.double(), cu, 200, 0.5)
    assert_close(out, ref, what="set_attention large scores")


def test_set_attention_deterministic_across_threads():
    g = gen(9)
    lengths = [50, 1, 0, 200, 17] * 3
    q, k, v = _qkv(sum(lengths), 12, 32, g, packed=True)
    cu = offsets(lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.set_attention(q, k, v, cu, 200, 0.2)
        torch.set_num_threads(max(2, threads))
        many = OPS.set_attention(q, k, v, cu, 200, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------------------------ LayerNorm family


@pytest.mark.parametrize("N,d", [(0, 384), (1, 384), (257, 384), (33, 13), (5, 1)])
@pytest.mark.parametrize("strided", [False, True])
def test_add_layernorm(isa, N, d, strided):
    g = gen(N + d)
    if strided:  # rows of a wider buffer: a row stride other than d
        x = torch.randn(N, d + 5, generator=g)[:, 2:2 + d]
    else:
        x = torch.randn(N, d, generator=g) * 3 + 1
    residual = torch.randn(N, d, generator=g)
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    for eps in (1e-12, 1e-5):
        out = ops.add_layernorm(x, residual, weight, bias, eps, backend="cpp")
        ref = torch.nn.functional.layer_norm((x + residual).double(), (d,), weight.double(), bias.double(), eps)
        assert_close(out, ref, what=f"add_layernorm[{isa}]")


@pytest.mark.parametrize("N,f", [(0, 1536), (1, 1536), (129, 1536), (17, 7), (3, 1)])
def test_bias_gelu(isa, N, f):
    g = gen(N * 3 + f)
    x = torch.randn(N, f, generator=g) * 4  # covers both tails of erf
    bias = torch.randn(f, generator=g)
    out = ops.bias_gelu(x, bias, backend="cpp")
    ref = torch.nn.functional.gelu(x.double() + bias.double())
    assert_close(out, ref, what=f"bias_gelu[{isa}]")


def test_bias_gelu_extremes(isa):
    x = torch.tensor([[-1e4, -40.0, -8.0, -5.5, -1e-7, 0.0, 1e-7, 5.5, 8.0, 40.0, 1e4, 3.0]])
    out = OPS.bias_gelu(x, torch.zeros(12))
    ref = torch.nn.functional.gelu(x.double())
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def _embed_inputs(n, d, g, idx_dtype, dense):
    R, P, T = 50, 40, 4
    pos_table, type_table = torch.randn(P, d, generator=g), torch.randn(T, d, generator=g)
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    positions = torch.randint(0, P, (n,), generator=g).to(idx_dtype)
    type_ids = torch.randint(0, T, (n,), generator=g).to(idx_dtype)
    if dense:
        content = dict(dense=torch.randn(n, d, generator=g))
    else:
        content = dict(ids=torch.randint(0, R, (n,), generator=g).to(idx_dtype), table=torch.randn(R, d, generator=g))
    return positions, type_ids, pos_table, type_table, weight, bias, content


@pytest.mark.parametrize("n", [0, 1, 300])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("d", [384, 10])
def test_embed_layernorm(isa, n, idx_dtype, dense, d):
    g = gen(n + d + int(dense))
    positions, type_ids, pos_table, type_table, weight, bias, content = _embed_inputs(n, d, g, idx_dtype, dense)
    eps = 1e-12
    ref = embed_layernorm_torch(positions, type_ids, pos_table.double(), type_table.double(), weight.double(),
                                bias.double(), eps, content.get("ids"),
                                content["table"].double() if "table" in content else None,
                                content["dense"].double() if "dense" in content else None, None, None)
    # Without out: a new [n, d].
    out = ops.embed_layernorm(positions, type_ids, pos_table, type_table, weight, bias, eps, backend="cpp", **content)
    assert_close(out, ref, what=f"embed_layernorm[{isa}]")
    # Scattered into a larger NaN-poisoned buffer: exactly the out_rows rows are written.
    M = n + 7
    buf = torch.full((M, d), float("nan"))
    out_rows = torch.randperm(M, generator=g)[:n].to(idx_dtype)
    res = ops.embed_layernorm(positions, type_ids, pos_table, type_table, weight, bias, eps, out=buf,
                              out_rows=out_rows, backend="cpp", **content)
    assert res.data_ptr() == buf.data_ptr()
    written = torch.zeros(M, dtype=torch.bool)
    written[out_rows.long()] = True
    assert bool(torch.isnan(buf[~written]).all()), "rows outside out_rows were touched"
    assert_close(buf[out_rows.long()], ref, what=f"embed_layernorm out_rows[{isa}]")


# ------------------------------------------------------------------------------------ MRA


def _scorer(a, d, g):
    return torch.randn(a, d, generator=g) / math.sqrt(d), torch.randn(a, generator=g), torch.randn(a, generator=g)


SEGMENTS = {
    "mixed": [3, 1, 0, 118, 49, 12, 0, 0, 1, 7],
    "ones": [1, 1, 1, 1],
    "empty": [0, 0, 0],
    "none": [],
}


@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("d,a", [(384, 384), (64, 13), (20, 40)])
def test_intra_mra(isa, segments, d, a):
    lengths = SEGMENTS[segments]
    g = gen(sum(lengths) + d + a)
    h = torch.randn(sum(lengths), d, generator=g)
    W, c, v = _scorer(a, d, g)
    cu = offsets(lengths)
    z, alpha = ops.intra_mra(h, cu, W, c, v, backend="cpp")
    assert z.dtype == torch.float32 and alpha.dtype == torch.float32
    rz, ralpha = intra_mra_torch(h.double(), cu, W.double(), c.double(), v.double())
    assert_close(z, rz, what=f"intra_mra z[{isa}]")
    assert_close(alpha, ralpha, what=f"intra_mra alpha[{isa}]")
    for i, L in enumerate(lengths):  # empty segments pool to exactly 0
        if L == 0:
            assert bool((z[i] == 0).all())


@pytest.mark.parametrize("samples", [[2, 0, 4, 1, 0], [1], [0, 0], []])
def test_inter_mra(isa, samples):
    d, a = 384, 384
    g = gen(len(samples) + sum(samples))
    z = torch.randn(sum(samples), d, generator=g)
    U, gg, u = _scorer(a, d, g)
    cu = offsets(samples)
    r, beta = ops.inter_mra(z, cu, U, gg, u, backend="cpp")
    rr, rbeta = inter_mra_torch(z.double(), cu, U.double(), gg.double(), u.double())
    assert_close(r, rr, what=f"inter_mra r[{isa}]")
    assert_close(beta, rbeta, what=f"inter_mra beta[{isa}]")
    for b, K in enumerate(samples):  # a sample with no segment has r = 0
        if K == 0:
            assert bool((r[b] == 0).all())


@pytest.mark.parametrize("case", ["ads", "empty_sample", "nothing"])
def test_mra_pool(isa, case):
    d = 96
    if case == "ads":
        seg = [[12, 40, 49, 6], [7, 118, 5], [24, 8, 49, 12], [1]]
    elif case == "empty_sample":
        seg = [[3, 1], [], [5]]
    else:
        seg = [[], []]
    lengths = [L for s in seg for L in s]
    g = gen(len(lengths) + d)
    h = torch.randn(sum(lengths), d, generator=g)
    W, c, v = _scorer(d, d, g)
    U, gg, u = _scorer(32, d, g)
    cu_seg, cu_b = offsets(lengths), offsets([len(s) for s in seg])
    got = ops.mra_pool(h, cu_seg, cu_b, W, c, v, U, gg, u, backend="cpp")
    ref = mra_pool_torch(h.double(), cu_seg, cu_b, W.double(), c.double(), v.double(), U.double(), gg.double(),
                         u.double())
    for name, o, r in zip(("z", "r", "alpha", "beta"), got, ref):
        assert_close(o, r, what=f"mra_pool {name}[{isa}]")
    if case == "ads":  # importances over a sample sum to 1 (DESIGN §1)
        alpha, beta = got[2], got[3]
        assert torch.allclose(alpha[: 12].sum(), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose(beta[:4].sum(), torch.tensor(1.0), atol=1e-5)


# ------------------------------------------------------------------------------------ opcheck


def _opcheck_cases():
    g = gen(0)
    lengths = [3, 0, 1, 9]
    N, H, D, d = sum(lengths), 2, 8, 16
    cu = offsets(lengths)
    q, k, v = torch.randn(N, 3, H, D, generator=g).unbind(1)
    x, res = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    W, c, vv = _scorer(10, d, g)
    W_out = torch.randn(d, d, generator=g)
    cu_b = offsets([2, 0, 2])
    pos, typ = torch.randn(20, d, generator=g), torch.randn(3, d, generator=g)
    positions = torch.randint(0, 20, (N,), generator=g)
    type_ids = torch.randint(0, 3, (N,), generator=g, dtype=torch.int64).int()
    ids, table = torch.randint(0, 30, (N,), generator=g), torch.randn(30, d, generator=g)
    out, out_rows = torch.full((N + 2, d), float("nan")), torch.randperm(N + 2, generator=g)[:N]
    return {
        "set_attention": (OPS.set_attention.default, (q, k, v, cu, 9, 0.3)),
        "add_layernorm": (OPS.add_layernorm.default, (x, res, w, b, 1e-12)),
        "bias_gelu": (OPS.bias_gelu.default, (x, b)),
        "linear": (OPS.linear.default, (x, W, c)),
        "linear_bias_gelu": (OPS.linear_bias_gelu.default, (x, W, c)),
        "linear_add_layernorm": (OPS.linear_add_layernorm.default, (x, W_out, b, res, w, b, 1e-12)),
        "embed_layernorm_ids": (OPS.embed_layernorm.default,
                                (positions, type_ids, pos, typ, w, b, 1e-12, ids, table, None, out, out_rows)),
        "embed_layernorm_dense": (OPS.embed_layernorm.default,
                                  (positions, type_ids, pos, typ, w, b, 1e-12, None, None, x, out.clone(), out_rows)),
        "intra_mra": (OPS.intra_mra.default, (x, cu, W, c, vv)),
        "inter_mra": (OPS.inter_mra.default, (x[:4], cu_b, W, c, vv)),
        "mra_pool": (OPS.mra_pool.default, (x, cu, offsets([1, 3]), W, c, vv, W, c, vv)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------ dispatch, errors


def test_auto_picks_cpp_for_fp32_and_torch_otherwise():
    x, b = torch.randn(4, 8), torch.randn(8)
    assert backends.resolve("bias_gelu", "auto", "cpu", (x, b))[0] == "cpp"
    assert backends.resolve("bias_gelu", "auto", "cpu", (x.double(), b.double()))[0] == "torch"
    with pytest.raises(backends.BackendUnavailable, match="fp32 only"):
        ops.bias_gelu(x.double(), b.double(), backend="cpp")
    # Autograd: the cpp kernels have none, so a graph-building call goes to torch (or raises).
    xg = x.clone().requires_grad_()
    assert backends.resolve("bias_gelu", "auto", "cpu", (xg, b))[0] == "torch"
    with pytest.raises(backends.BackendUnavailable, match="autograd"):
        ops.bias_gelu(xg, b, backend="cpp")
    with torch.no_grad():
        assert backends.resolve("bias_gelu", "auto", "cpu", (xg, b))[0] == "cpp"
    assert backends.availability()["cpp"]["cpu"] is None


def test_cpu_isa_switch():
    original = cpp.cpu_isa()
    assert original in ("avx512", "avx2", "generic")
    try:
        assert cpp.cpu_isa("generic") == "generic"
        with pytest.raises(RuntimeError, match="unknown or not supported"):
            cpp.cpu_isa("sse9")
    finally:
        cpp.cpu_isa(original)


def test_kernel_checks_offsets():
    q = k = v = torch.randn(5, 2, 4)
    with pytest.raises(RuntimeError, match="must run from 0 to 5"):
        OPS.set_attention(q, k, v, offsets([2, 2]), 5, 1.0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        OPS.set_attention(q, k, v, torch.tensor([0, 4, 2, 5], dtype=torch.int32), 5, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        OPS.set_attention(q, k, v, torch.tensor([0, 5]), 5, 1.0)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        OPS.set_attention(q, k, v, offsets([5]), 3, 1.0)
    with pytest.raises(RuntimeError, match="share a shape"):
        OPS.set_attention(q, k[:4], v, offsets([5]), 5, 1.0)
    h = torch.randn(5, 8)
    W, c, vv = _scorer(3, 8, gen(1))
    with pytest.raises(RuntimeError, match="must run from 0 to 5"):
        OPS.intra_mra(h, offsets([1, 1]), W, c, vv)
    with pytest.raises(RuntimeError, match="must run from 0 to 2"):  # 2 segments, cu_segments ends at 3
        OPS.mra_pool(h, offsets([3, 2]), offsets([3]), W, c, vv, W, c, vv)
    with pytest.raises(RuntimeError, match="W must have shape"):
        OPS.intra_mra(h, offsets([5]), W[:, :4], c, vv)


def test_kernel_checks_dtypes_and_shapes():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="fp32 only"):
        OPS.bias_gelu(x.double(), torch.randn(8).double())
    with pytest.raises(RuntimeError, match="bias must have 8 entries"):
        OPS.bias_gelu(x, torch.randn(7))
    with pytest.raises(RuntimeError, match="residual must have shape"):
        OPS.add_layernorm(x, x[:3], torch.randn(8), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="must have 2 dims"):
        OPS.add_layernorm(x[0], x[0], torch.randn(8), torch.randn(8), 1e-5)


def test_embed_layernorm_checks_indices():
    g = gen(3)
    positions, type_ids, pos, typ, w, b, content = _embed_inputs(6, 8, g, torch.int64, dense=False)
    out, rows = torch.zeros(6, 8), torch.arange(6)
    bad_ids = content["ids"].clone()
    bad_ids[4] = 50  # table has 50 rows
    with pytest.raises(RuntimeError, match="element 4 has an index out of range"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, bad_ids, content["table"], None, out, rows)
    bad_pos = positions.clone()
    bad_pos[2] = -1
    with pytest.raises(RuntimeError, match="element 2 has an index out of range"):
        OPS.embed_layernorm(bad_pos, type_ids, pos, typ, w, b, 1e-12, content["ids"], content["table"], None, out,
                            rows)
    with pytest.raises(RuntimeError, match="element 5 has an index out of range"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, content["ids"], content["table"], None, out,
                            torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(RuntimeError, match="either ids and table, or dense"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, content["ids"], None, None, out, rows)
    with pytest.raises(RuntimeError, match="int32/int64"):
        OPS.embed_layernorm(positions.float(), type_ids, pos, typ, w, b, 1e-12, content["ids"], content["table"],
                            None, out, rows)


def test_without_extension_torch_still_runs():
    code = (
        "import torch, dm2s2_fast\n"
        "from dm2s2_fast import backends, ops\n"
        "reason = backends.availability()['cpp']['cpu']\n"
        "assert reason and 'DM2S2_FAST_NO_EXTENSION' in reason, reason\n"
        "x, b = torch.randn(3, 4), torch.randn(4)\n"
        "assert backends.resolve('bias_gelu', 'auto', 'cpu', (x, b))[0] == 'torch'\n"
        "ops.bias_gelu(x, b)\n"
        "try:\n"
        "    ops.bias_gelu(x, b, backend='cpp')\n"
        "except backends.BackendUnavailable as e:\n"
        "    assert 'DM2S2_FAST_NO_EXTENSION' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpp ran without its extension')\n"
    )
    env = dict(os.environ, DM2S2_FAST_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
