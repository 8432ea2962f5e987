"""The cpp backend's GEMM provider (issue #14 item 2, issue #19 item 1): every library (oneDNN with
prepacked weights and fused GELU, MKL's packed sgemm, the BLAS behind the C++ ops) in every dtype it
runs, the measured choice, and prepacked weights that follow every change of the weights.
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_TOL, fp64_reference, random_model, rel_err, require_extension, small_config

require_extension()

import dm2s2_fast as dm  # noqa: E402
from dm2s2_fast import SequenceSet  # noqa: E402
from dm2s2_fast.backends import cpp  # noqa: E402
from dm2s2_fast.ops.linear_add_layernorm import linear_add_layernorm_reference  # noqa: E402
from dm2s2_fast.ops.linear_bias_gelu import linear_bias_gelu_reference  # noqa: E402

GEMM = cpp._gemm
CASES = [(lib, dt) for dt in cpp.DTYPES for lib in GEMM.libraries(dt)]


def _id(case):
    return f"{case[0]}-{str(case[1])[6:]}"


@pytest.fixture(params=CASES, ids=_id)
def library(request):
    lib, dtype = request.param
    cpp.set_gemm_library(lib)
    yield lib, dtype
    cpp.set_gemm_library(None)


@pytest.fixture(params=[case for case in CASES if case[0] != "blas"], ids=_id)
def packing_library(request):
    """The libraries that prepack weights (the C++ ops' BLAS packs nothing)."""
    lib, dtype = request.param
    cpp.set_gemm_library(lib)
    yield lib, dtype
    cpp.set_gemm_library(None)


def _bound(dtype, e_ref):
    return FP32_TOL if dtype == torch.float32 else min(2e-2, max(2 * e_ref, FP32_TOL))


@pytest.mark.parametrize("rows", [0, 1, 95, 700])
def test_every_library_matches_the_reference(library, rows):
    lib, dtype = library
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = (torch.randn(160, 96, generator=g) * 0.15).to(dtype)
    b = (torch.randn(160, generator=g) * 0.1).to(dtype)
    res = torch.randn(rows, 160, generator=g).to(dtype)
    lw = (1 + 0.2 * torch.randn(160, generator=g)).to(dtype)
    lb = (0.1 * torch.randn(160, generator=g)).to(dtype)
    d = {t: (x.to(t), w.to(t), b.to(t), res.to(t), lw.to(t), lb.to(t)) for t in (torch.float64, dtype)}
    with torch.inference_mode():
        cases = {
            "linear": (lambda a: dm.ops.linear(*a[:3], backend="cpp"), lambda a: F.linear(*a[:3])),
            "linear_bias_gelu": (lambda a: dm.ops.linear_bias_gelu(*a[:3], backend="cpp"),
                                 lambda a: linear_bias_gelu_reference(*a[:3])),
            "linear_add_layernorm": (lambda a: dm.ops.linear_add_layernorm(*a, 0.1, backend="cpp"),
                                     lambda a: linear_add_layernorm_reference(*a, 0.1)),
        }
        for name, (ours, ref) in cases.items():
            out = ours(d[dtype])
            assert out.shape == (rows, 160) and out.dtype == dtype, name
            if rows == 0:
                continue
            r64 = ref(d[torch.float64])
            e_ref = rel_err(ref(d[dtype]).float(), r64) if dtype != torch.float32 else 0.0
            err = rel_err(out.float(), r64)
            assert err <= _bound(dtype, e_ref), f"{lib}/{dtype} {name} rows={rows}: {err:.2e} (e_ref {e_ref:.1e})"


def test_onednn_gelu_post_op_is_the_exact_erf_gelu():
    """attr "gelu" with algorithm "none" is erf GELU (the "tanh" algorithm would miss by ~2e-4)."""
    if "onednn" not in GEMM.libraries(torch.float32):
        pytest.skip("oneDNN is not available in this torch")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(300, 64, generator=g), torch.randn(128, 64, generator=g) * 0.3, torch.randn(128, generator=g)
    with torch.inference_mode():
        out = GEMM.run("onednn", "linear_bias_gelu", x, w, b)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()))
    assert rel_err(out, ref) <= FP32_TOL
    tanh = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
    assert rel_err(tanh, ref) > 1e-4  # the check above tells the two apart


def test_plan_is_measured_once_per_shape_and_dtype():
    plan = GEMM.plan("linear_bias_gelu", torch.float32, 40, 72)
    assert plan.small in GEMM.libraries(torch.float32) and plan.large in GEMM.libraries(torch.float32)
    assert GEMM.plan("linear_bias_gelu", torch.float32, 40, 72) is plan
    assert {lib for lib, _ in plan.timings} == set(GEMM.libraries(torch.float32))
    info = cpp.cpu_info()
    assert info["gemm"][("float32", "linear_bias_gelu", 40, 72)] == {"small": plan.small, "large": plan.large}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "onednn" in info["gemm_libraries"]["bfloat16"]


# ------------------------------------------------------------------------------ stale weights

def _model_and_batch(dtype=torch.float32):
    cfg = small_config("set")
    model = random_model(cfg, 0).to(dtype)
    batch = SequenceSet.from_samples(cfg, [{"title": [101 % cfg.vocab_size, 23, 10], "tags": [7]},
                                           {"body": [5, 6, 7, 8], "image": torch.randn(2, 6)}])
    return model, batch


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    return rel_err(a.float(), b.float()) <= tol


UPDATES = {
    # the issue's reproducer: an in-place write through .data (no version counter sees it)
    "data_normal_": lambda m: m.layers[0].intermediate.weight.data.normal_(),
    "data_mul_": lambda m: m.layers[0].attention_output.weight.data.mul_(-1.5),
    "copy_no_grad": lambda m: m.layers[0].qkv.weight.copy_(torch.randn_like(m.layers[0].qkv.weight)),
    "load_state_dict": lambda m: m.load_state_dict({k: v + 0.05 * torch.randn_like(v)
                                                    for k, v in m.state_dict().items()}),
    "new_parameter": lambda m: setattr(m.layers[1].output, "weight",
                                       torch.nn.Parameter(torch.randn_like(m.layers[1].output.weight))),
    "data_assigned": lambda m: setattr(m.layers[1].intermediate.weight, "data",
                                       torch.randn_like(m.layers[1].intermediate.weight)),
    "head": lambda m: m.head.hidden.weight.data.normal_(),
}


@pytest.mark.parametrize("update", list(UPDATES))
def test_weight_updates_are_seen_by_the_next_call(library, update):
    """After the update, the engine's next call equals a cold start (every packed weight dropped and
    repacked) bit for bit, and matches the updated model (fp32: ≤ 1e-5 against fp64; half precision:
    loosely, a 2-sample batch's logits carry large rounding noise); before it, it did not."""
    lib, dtype = library
    model, batch = _model_and_batch(dtype)
    engine = dm.convert(model, backend="cpp")
    with torch.no_grad():
        before = engine(batch).logits
        UPDATES[update](model)
        after = engine(batch).logits
        fresh = dm.convert(model, backend="cpp")(batch).logits  # a fresh convert of the same model
        cpp.forget_packed()
        cold = engine(batch).logits
    oracle = fp64_reference(model, batch).logits
    tol = FP32_TOL if dtype == torch.float32 else 5e-2
    assert rel_err(before.float(), oracle) > 0.1, "the update did not change the model enough to tell"
    assert torch.equal(after, cold), f"{lib}/{dtype}: stale weights after {update}"
    assert torch.equal(fresh, cold), f"{lib}/{dtype}: a fresh convert after {update}"
    assert rel_err(after.float(), oracle) <= tol


def test_issue_19_reproducer_with_the_measured_choice():
    """Exactly issue #19's reproducer, with the library the provider picks (no forcing)."""
    cfg = small_config("set")
    model = dm.reference.DM2S2(cfg).eval()
    eng = dm.convert(model, backend="cpp")
    b = SequenceSet.from_samples(cfg, [{"title": [100, 23, 100], "tags": [7]}])
    with torch.no_grad():
        eng(b)
        model.layers[0].intermediate.weight.data.normal_()
        assert rel_err(eng(b).logits, model(b).logits) <= 1e-5


def test_model_cast_after_convert_is_seen():
    model, batch = _model_and_batch(torch.float32)
    engine = dm.convert(model, backend="cpp")
    with torch.no_grad():
        engine(batch)
        model.to(torch.bfloat16)  # the parameters' data is replaced in place
        out = engine(batch)
        assert out.logits.dtype == torch.bfloat16
        assert _close(out.logits, model(batch).logits, torch.bfloat16)


def test_packed_weights_die_with_their_weights(packing_library):
    lib, dtype = packing_library
    gc.collect()
    before = len(GEMM.cache)
    w = torch.randn(64, 32).to(dtype)
    b = torch.zeros(64, dtype=dtype)
    with torch.inference_mode():
        GEMM.run(lib, "linear", torch.randn(5, 32).to(dtype), w, b)
    assert len(GEMM.cache) == before + 1
    del w
    gc.collect()
    assert len(GEMM.cache) == before


def test_unchanged_weights_are_packed_once(packing_library):
    lib, dtype = packing_library
    w = torch.randn(64, 32).to(dtype)
    b = torch.zeros(64, dtype=dtype)
    x = torch.randn(9, 32).to(dtype)
    with torch.inference_mode():
        GEMM.run(lib, "linear", x, w, b)
        packs = GEMM.cache.packs
        for _ in range(5):
            GEMM.run(lib, "linear", x, w, b)
        assert GEMM.cache.packs == packs
        w.data[3].zero_()  # a whole row through .data: caught when a sample falls in it...
        w.data.mul_(2)     # ...and a whole-tensor write always
        GEMM.run(lib, "linear", x, w, b)
        assert GEMM.cache.packs == packs + 1


def test_forget_packed_repacks():
    w = torch.randn(16, 8)
    GEMM.cache.get(w, "test", lambda t: t.clone())
    cpp.forget_packed()
    packs = GEMM.cache.packs
    GEMM.cache.get(w, "test", lambda t: t.clone())
    assert GEMM.cache.packs == packs + 1


def test_prepare_packs_ahead():
    cfg = small_config("set")
    model = dm.reference.DM2S2(cfg).eval()
    cpp.prepare(model)
    for layer in model.layers:
        plan = GEMM.plan("linear_bias_gelu", torch.float32, cfg.hidden_size, cfg.intermediate_size)
        libs = {plan.small, plan.large} - {"blas"}
        for lib in libs:
            assert (id(layer.intermediate.weight), lib) in GEMM.cache._entries
    copy.deepcopy(model)  # the cache holds no reference that deepcopy or pickling would follow
