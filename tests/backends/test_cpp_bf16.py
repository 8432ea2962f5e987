"""The cpp backend in bf16 and fp16 (issue #14): every op and the whole model against the fp64
reference on the same rounded inputs, on every kernel table this CPU runs — the bf16 dot-product
attention (AVX512_BF16) where the CPU has it, and the fp32-compute fallbacks (AVX-512, AVX2, the
portable table) that CPUs without bf16 instructions run.

The bound is docs/numerics.md's: ‖out − ref‖/‖ref‖ ≤ min(2e-2, max(2 × e_ref, 1e-5)), e_ref the error
of the op's reference (or, for the model, the reference model) run in that dtype. fp32 stays ≤ 1e-5.
Uninitialized memory is NaN while a test runs (tests/conftest.py), so an unwritten element fails.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import (FP32_TOL, fp64_reference, random_batch, random_model, rel_err, require_extension,
                      small_config, tuned)

require_extension()

import dm2s2_fast as dm  # noqa: E402
from dm2s2_fast import dispatch  # noqa: E402
from dm2s2_fast.backends import cpp  # noqa: E402
from dm2s2_fast.ops.add_layernorm import add_layernorm_reference  # noqa: E402
from dm2s2_fast.ops.bias_gelu import bias_gelu_reference  # noqa: E402
from dm2s2_fast.ops.embed_layernorm import embed_layernorm_reference  # noqa: E402
from dm2s2_fast.ops.linear_add_layernorm import linear_add_layernorm_reference  # noqa: E402
from dm2s2_fast.ops.linear_bias_gelu import linear_bias_gelu_reference  # noqa: E402
from dm2s2_fast.ops.mra import inter_mra_reference, intra_mra_reference, mra_pool_reference  # noqa: E402
from dm2s2_fast.ops.set_attention import set_attention_reference  # noqa: E402

OPS = torch.ops.dm2s2_fast
HALF = (torch.bfloat16, torch.float16)
FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")


def _tables() -> list[str]:
    have = []
    for name in ("amx", "avx512_bf16", "avx512", "avx2", "generic"):
        try:
            OPS._cpu_isa(name)
            have.append(name)
        except RuntimeError:
            pass
    OPS._cpu_isa("auto")
    return have


TABLES = _tables()


@pytest.fixture(params=TABLES)
def table(request):
    """Every kernel table this CPU runs, switched with the raw op (Tuning names only some of them)."""
    OPS._cpu_isa(request.param)
    yield request.param
    OPS._cpu_isa("auto")


def bound(dtype: torch.dtype, e_ref: float) -> float:
    if dtype not in HALF:
        return FP32_TOL
    return min(2e-2, max(2 * e_ref, FP32_TOL))


def check(out, ref64, own, dtype, what):
    """``out`` (the kernel) and ``own`` (the reference run in ``dtype``) against ``ref64``."""
    e_ref = rel_err(own.float(), ref64) if dtype in HALF else 0.0
    err = rel_err(out.float(), ref64)
    assert err <= bound(dtype, e_ref), f"{what}: {err:.3e} > {bound(dtype, e_ref):.3e} (e_ref {e_ref:.2e})"
    return err


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# Ragged groups: empty, length 1, short, odd, one over the 128-row query block, a long tail.
LENGTHS = [0, 1, 3, 7, 33, 0, 64, 1, 131, 5, 17]


def rounded(*shape, dtype, scale=1.0, gen):
    """Random values already in ``dtype`` (so every implementation sees the same inputs)."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", HALF + (torch.float32,), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [32, 17, 8, 64])
def test_set_attention(table, dtype, D):
    g = torch.Generator().manual_seed(D)
    cu = offsets(LENGTHS)
    N, H = int(cu[-1]), 3
    qkv = rounded(N, 3, H, D, dtype=dtype, scale=1.5, gen=g)  # strided views of a packed projection
    q, k, v = qkv.unbind(1)
    scale = D ** -0.5
    out = OPS.set_attention(q, k, v, cu, max(LENGTHS), scale)
    assert out.dtype == dtype
    ref = set_attention_reference(q.double(), k.double(), v.double(), cu, max(LENGTHS), scale)
    own = set_attention_reference(q, k, v, cu, max(LENGTHS), scale)
    check(out, ref, own, dtype, f"set_attention {table} D={D}")


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
def test_set_attention_empty_and_single(table, dtype):
    g = torch.Generator().manual_seed(1)
    for lengths in ([0], [1], [0, 0, 1, 0]):
        cu = offsets(lengths)
        N = int(cu[-1])
        q, k, v = (rounded(N, 2, 32, dtype=dtype, gen=g) for _ in range(3))
        out = OPS.set_attention(q, k, v, cu, max(lengths), 0.2)
        assert out.shape == (N, 2, 32) and out.dtype == dtype
        if N:
            assert torch.equal(out.float(), v.float()), "one row attends only to itself"


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("d", [384, 37, 8])
def test_add_layernorm_and_bias_gelu(table, dtype, d):
    g = torch.Generator().manual_seed(d)
    x = rounded(57, d, dtype=dtype, scale=3, gen=g)
    r = rounded(57, d, dtype=dtype, gen=g)
    w = (1 + rounded(d, dtype=torch.float32, scale=0.3, gen=g)).to(dtype)
    b = rounded(d, dtype=dtype, scale=0.2, gen=g)
    for eps in (1e-12, 0.1):
        out = OPS.add_layernorm(x, r, w, b, eps)
        assert out.dtype == dtype
        ref = add_layernorm_reference(x.double(), r.double(), w.double(), b.double(), eps)
        check(out, ref, add_layernorm_reference(x, r, w, b, eps), dtype, f"add_layernorm {table} eps={eps}")
        y = x.clone()
        OPS._add_layernorm_(y, r, w, b, eps)  # in place on a GEMM's output
        check(y, ref, add_layernorm_reference(x, r, w, b, eps), dtype, f"_add_layernorm_ {table}")
    out = OPS.bias_gelu(x, b)
    ref = bias_gelu_reference(x.double(), b.double())
    check(out, ref, bias_gelu_reference(x, b), dtype, f"bias_gelu {table}")
    y = x.clone()
    OPS._bias_gelu_(y, b)
    check(y, ref, bias_gelu_reference(x, b), dtype, f"_bias_gelu_ {table}")
    # strided rows (a column slice of a wider tensor) read correctly
    wide = rounded(57, d + 5, dtype=dtype, gen=g)
    out = OPS.bias_gelu(wide[:, :d], b)
    check(out, bias_gelu_reference(wide[:, :d].double(), b.double()), bias_gelu_reference(wide[:, :d], b), dtype,
          "bias_gelu strided")


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("content", ["ids", "dense"])
def test_embed_layernorm(table, dtype, content):
    g = torch.Generator().manual_seed(7)
    n, d, N = 41, 48, 60
    pos, typ = rounded(20, d, dtype=dtype, gen=g), rounded(3, d, dtype=dtype, gen=g)
    w = (1 + rounded(d, dtype=torch.float32, scale=0.3, gen=g)).to(dtype)
    b = rounded(d, dtype=dtype, scale=0.2, gen=g)
    positions = torch.randint(0, 20, (n,), generator=g)
    type_ids = torch.randint(0, 3, (n,), generator=g).int()
    rows = torch.randperm(N, generator=g)[:n]
    if content == "ids":
        tab, ids, dense = rounded(30, d, dtype=dtype, gen=g), torch.randint(0, 30, (n,), generator=g), None
    else:
        tab, ids, dense = None, None, rounded(n, d, dtype=dtype, gen=g)
    out = torch.full((N, d), 7.0, dtype=dtype)
    OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, ids, tab, dense, out, rows)

    def ref(t):
        cast = (lambda a: None if a is None else a.to(t))
        base = torch.full((N, d), 7.0, dtype=t)
        return embed_layernorm_reference(positions, type_ids, cast(pos), cast(typ), cast(w), cast(b), 1e-12, ids,
                                         cast(tab), cast(dense), base, rows)
    check(out[rows], ref(torch.float64)[rows], ref(dtype)[rows], dtype, f"embed_layernorm {table} {content}")
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[rows] = False
    assert bool((out[untouched] == 7.0).all()), "rows outside out_rows were written"


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
def test_mra(table, dtype):
    g = torch.Generator().manual_seed(3)
    seg = [0, 1, 4, 0, 9, 23, 2, 1, 0, 40]
    per_sample = [0, 3, 1, 4, 0, 2]
    cu_seg, cu_b = offsets(seg), offsets(per_sample)
    N, d, a = int(cu_seg[-1]), 40, 24
    h = rounded(N, d, dtype=dtype, gen=g)
    W, U = rounded(a, d, dtype=dtype, scale=0.4, gen=g), rounded(a, d, dtype=dtype, scale=0.4, gen=g)
    c, gg = rounded(a, dtype=dtype, scale=0.1, gen=g), rounded(a, dtype=dtype, scale=0.1, gen=g)
    v, u = rounded(a, dtype=dtype, gen=g), rounded(a, dtype=dtype, gen=g)
    z, r, alpha, beta = OPS.mra_pool(h, cu_seg, cu_b, W, c, v, U, gg, u)
    assert z.dtype == r.dtype == dtype and alpha.dtype == beta.dtype == torch.float32
    ref = mra_pool_reference(h.double(), cu_seg, cu_b, W.double(), c.double(), v.double(), U.double(),
                             gg.double(), u.double())
    own = mra_pool_reference(h, cu_seg, cu_b, W, c, v, U, gg, u)
    check(z, ref[0], own[0], dtype, f"mra_pool z {table}")
    check(alpha, ref[2], own[2], dtype, f"mra_pool alpha {table}")
    # r and beta on the kernel's own z (the levels are tested separately: a rounded z feeds them)
    r_ref = inter_mra_reference(z.double(), cu_b, U.double(), gg.double(), u.double())
    r_own = inter_mra_reference(z, cu_b, U, gg, u)
    check(r, r_ref[0], r_own[0], dtype, f"mra_pool r {table}")
    check(beta, r_ref[1], r_own[1], dtype, f"mra_pool beta {table}")
    z1, alpha1 = OPS.intra_mra(h, cu_seg, W, c, v)
    z_ref = intra_mra_reference(h.double(), cu_seg, W.double(), c.double(), v.double())
    z_own = intra_mra_reference(h, cu_seg, W, c, v)
    check(z1, z_ref[0], z_own[0], dtype, "intra_mra z")
    check(alpha1, z_ref[1], z_own[1], dtype, "intra_mra alpha")
    r1, beta1 = OPS.inter_mra(z, cu_b, U, gg, u)
    check(r1, r_ref[0], r_own[0], dtype, "inter_mra r")
    check(beta1, r_ref[1], r_own[1], dtype, "inter_mra beta")


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
def test_linear_ops_through_the_backend(dtype):
    if dtype not in cpp.DTYPES:
        pytest.skip(f"the cpp backend does not declare {dtype} on this CPU")
    g = torch.Generator().manual_seed(5)
    for rows in (0, 1, 95, 700):
        x = rounded(rows, 48, dtype=dtype, gen=g)
        w, b = rounded(80, 48, dtype=dtype, scale=0.2, gen=g), rounded(80, dtype=dtype, scale=0.1, gen=g)
        res = rounded(rows, 80, dtype=dtype, gen=g)
        lw, lb = (1 + rounded(80, dtype=torch.float32, scale=0.2, gen=g)).to(dtype), rounded(80, dtype=dtype, gen=g)
        with torch.inference_mode():
            out = dm.ops.linear_bias_gelu(x, w, b, backend="cpp")
            if rows:
                check(out, linear_bias_gelu_reference(x.double(), w.double(), b.double()),
                      linear_bias_gelu_reference(x, w, b), dtype, f"linear_bias_gelu rows={rows}")
            out = dm.ops.linear_add_layernorm(x, w, b, res, lw, lb, 0.1, backend="cpp")
            if rows:
                check(out, linear_add_layernorm_reference(x.double(), w.double(), b.double(), res.double(),
                                                          lw.double(), lb.double(), 0.1),
                      linear_add_layernorm_reference(x, w, b, res, lw, lb, 0.1), dtype,
                      f"linear_add_layernorm rows={rows}")
            assert out.shape == (rows, 80) and out.dtype == dtype


def test_capability_declares_bf16():
    assert torch.bfloat16 in cpp.DTYPES
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    w = torch.zeros(8, dtype=torch.bfloat16)
    assert dispatch.reasons("cpp", "add_layernorm", "cpu", (x, x, w, w, 1e-5)) == []
    found = dispatch.reasons("cpp", "add_layernorm", "cpu", (x.double(), x.double(), w.double(), w.double(), 1e-5))
    assert found and "float64" in found[0]


def test_info_says_which_attention_path_runs():
    info = cpp.cpu_info()
    assert info["table"] == cpp.cpu_isa()
    paths = info["set_attention"]
    assert set(paths) == {"float32", "bfloat16", "float16"}
    if "avx512_bf16" in TABLES:
        assert "vdpbf16ps" in paths["bfloat16"] or "amx" in paths["bfloat16"].lower()
    with tuned(cpu_isa="avx2"):
        cpp._use_tuned_isa()
        assert "fp32 compute" in cpp.cpu_info()["set_attention"]["bfloat16"]
    cpp._use_tuned_isa()
    assert cpp.cpu_isa() == OPS._cpu_isa("auto")


# ------------------------------------------------------------------------------------ whole model

def _model_bounds(moved, batch, oracle):
    with torch.no_grad():
        own = moved(batch)  # the reference itself in this dtype
    return {f: bound(moved.embeddings.word.weight.dtype, rel_err(getattr(own, f).float(), getattr(oracle, f)))
            for f in FIELDS}


@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2", "generic"])
@pytest.mark.parametrize("attention", ["set", "modality"])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
def test_model_in_half_precision(dtype, attention, isa):
    """``dm.convert(model.to(dtype))`` is all it takes; dense features stay fp32 in the batch and are cast
    once at the boundary. Forcing a table without bf16 instructions still runs bf16 (fp32 compute)."""
    if dtype not in cpp.DTYPES:
        pytest.skip(f"the cpp backend does not declare {dtype} on this CPU")
    if isa not in ("auto",) + tuple(TABLES):
        pytest.skip(f"this CPU cannot run the {isa} table")
    config = small_config(attention, layer_norm_eps=1e-3, embedding_layer_norm_eps=0.1)
    model = random_model(config, 21)
    batch = random_batch(config, 7, 21, max_len=30)
    assert batch.values["image"].dtype == torch.float32
    oracle = fp64_reference(model, batch)
    moved = copy.deepcopy(model).to(dtype)
    engine = dm.convert(moved, "cpp", tuning=dm.Tuning(cpu_isa=isa))
    out = engine(batch)
    assert set(engine.last_backends.values()) == {"cpp"}, engine.last_backends
    bounds = _model_bounds(moved, batch, oracle)
    for field in FIELDS:
        err = rel_err(getattr(out, field).float(), getattr(oracle, field))
        assert err <= bounds[field], f"{dtype}/{attention}/{isa} {field}: {err:.2e} > {bounds[field]:.1e}"
    assert out.hidden.dtype == dtype and out.intra_weights.dtype == torch.float32


def test_ads_workload_in_bf16():
    """The ads model (6 layers, d=384, 12 heads) on an ads batch, bf16, against the fp64 reference."""
    from dm2s2_fast.workloads import ads_batch

    torch.manual_seed(0)
    model = dm.reference.DM2S2(dm.DM2S2Config.default_ads()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # BERT init leaves zero biases and unit norms: perturb
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    batch = ads_batch(6, model.config, seed=1)
    oracle = fp64_reference(model, batch)
    moved = copy.deepcopy(model).to(torch.bfloat16)
    out = dm.convert(moved, "cpp")(batch)
    bounds = _model_bounds(moved, batch, oracle)
    for field in FIELDS:
        err = rel_err(getattr(out, field).float(), getattr(oracle, field))
        assert err <= bounds[field], f"ads bf16 {field}: {err:.2e} > {bounds[field]:.1e}"


def test_fp32_model_unchanged():
    config = small_config("set")
    model = random_model(config, 3)
    batch = random_batch(config, 5, 3, max_len=20)
    oracle = fp64_reference(model, batch)
    out = dm.convert(model, "cpp")(batch)
    for field in FIELDS:
        assert rel_err(getattr(out, field), getattr(oracle, field)) <= FP32_TOL, field


def test_math_sanity():
    assert math.isclose(bound(torch.bfloat16, 1e-3), 2e-3) and bound(torch.bfloat16, 0.5) == 2e-2


def test_describe_lists_the_isa_and_the_kernels():
    lines = cpp.describe()
    text = "\n".join(lines)
    assert cpp.cpu_info()["features"] in lines[0] and cpp.cpu_isa() in lines[0]
    for dt in ("float32", "bfloat16"):
        assert f"set_attention {dt}:" in text
    assert "linear layers:" in text


def test_auto_table_is_the_best_this_cpu_runs():
    """auto takes AMX where the CPU and OS allow it; else AVX512_BF16 only where its dot products beat
    the fp32 AVX-512 kernel (timed once); else AVX-512, AVX2, the portable table."""
    auto = OPS._cpu_isa("auto")
    if "amx" in TABLES:
        assert auto == "amx"
    elif "avx512" in TABLES:
        assert auto in ("avx512_bf16", "avx512")
    elif "avx2" in TABLES:
        assert auto == "avx2"
    else:
        assert auto == "generic"
