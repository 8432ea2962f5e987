"""Each reproducer of issue #19 as a regression test (docs/reliability.md).

1. stale weights: an engine sees every change of its model's weights, on every backend;
2. huge finite features: refused at the boundary beyond ``FEATURE_LIMIT`` (1e12), naming modality
   and sample; correct against the fp64 reference up to it; a float16 model refuses features beyond
   float16's range at the cast;
3. errors of the wrong type: each listed input raises ``ValueError``/``TypeError`` naming what is
   wrong, and every constructor takes NumPy arrays alike;
4. raw ops: NaN/inf ``scale``, negative ``eps``, duplicate ``out_rows``, ``out`` aliasing an input
   and one meta argument among CPU tensors are refused — run in a subprocess, so that a crash
   fails the test instead of the run.
"""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch

import dm2s2_fast as dm
from conftest import (FP32_TOL, fp64_reference, random_batch, random_model, rel_err, require_backend,
                      require_extension, run_python, skip_unless_cuda, small_config)
from dm2s2_fast import SequenceSet, ops
from dm2s2_fast.data.validation import FEATURE_LIMIT
from dm2s2_fast.reference import DM2S2

FIELDS = ("logits", "pooled", "hidden", "intra_weights", "inter_weights", "segment_pooled")
CPU_BACKENDS = ("torch", "cpp")


def _assert_matches_fp64(model, out, batch, what):
    oracle = fp64_reference(model, batch)
    for f in FIELDS:
        assert rel_err(getattr(out, f), getattr(oracle, f)) <= FP32_TOL, (what, f)


# ============================================================================ 1. stale weights
def _update(model: DM2S2, how: str, g: torch.Generator):
    layer = model.layers[0].intermediate
    new = torch.randn(layer.weight.shape, generator=g)
    with torch.no_grad():
        if how == "data":  # the issue's reproducer: through .data (no version bump)
            layer.weight.data.normal_(generator=g)
        elif how == "inplace":
            layer.weight.mul_(-1.5)
        elif how == "copy":
            layer.weight.copy_(new)
        elif how == "new_parameter":
            layer.weight = torch.nn.Parameter(new)
        elif how == "load_state_dict":
            model.load_state_dict(random_model(model.config, 99).state_dict())


def _gemm_libraries():
    """The cpp backend's GEMM libraries a test can force (each keeps its own prepacked weights);
    None: the measured choice (on small shapes often the unpacked BLAS path)."""
    from dm2s2_fast import dispatch

    if dispatch.reasons("cpp", "linear", "cpu"):
        return [None]
    import dm2s2_fast.backends.cpp as cpp

    return [None] + (["onednn", "mkl", "blas"] if hasattr(cpp, "set_gemm_library") else [])


WEIGHT_CASES = [("torch", None)] + [("cpp", lib) for lib in _gemm_libraries()]


@pytest.mark.parametrize("how", ["data", "inplace", "copy", "new_parameter", "load_state_dict", "reconvert"])
@pytest.mark.parametrize("backend,library", WEIGHT_CASES)
def test_weight_updates_are_seen_by_the_next_call(backend, library, how):
    """Issue #19 item 1: the cpp packed-weight cache kept the weights of before an update through
    ``.data`` (0.00829 vs 0.04080 in the issue), even across a fresh ``convert``. Every GEMM library
    of the cpp backend is forced in turn, so the prepacked paths are exercised on this small model."""
    require_backend(backend, "cpu")
    config = small_config()
    model = random_model(config, 3)
    batch = SequenceSet.from_samples(config, [{"title": [11, 23, 12], "tags": [7]}, {"body": [5, 6], "image": torch.randn(2, 6)}])
    g = torch.Generator().manual_seed(4)
    if library is not None:
        import dm2s2_fast.backends.cpp as cpp

        cpp.set_gemm_library(library)
    try:
        engine = dm.convert(model, backend=backend)
        with torch.no_grad():
            before = engine(batch).logits.clone()
            if how == "reconvert":
                model.layers[0].intermediate.weight.data.normal_(generator=g)
                engine = dm.convert(model, backend=backend)
            else:
                _update(model, how, g)
            out = engine(batch)
    finally:
        if library is not None:
            cpp.set_gemm_library(None)
    assert not torch.allclose(out.logits, before), "the update changed nothing: the test is void"
    _assert_matches_fp64(model, out, batch, f"{backend} ({library}) after {how}")


def test_issue_reproducer_stale_cpp_weights():
    """The issue's exact reproducer (ads config, one update through ``.data``)."""
    require_backend("cpp", "cpu")
    cfg = dm.DM2S2Config.default_ads(num_layers=2)
    torch.manual_seed(0)
    model = DM2S2(cfg).eval()
    eng = dm.convert(model, backend="cpp")
    b = SequenceSet.from_samples(cfg, [{"title": [101, 2023, 102], "category": [7]}])
    with torch.no_grad():
        eng(b)
        model.layers[0].intermediate.weight.data.normal_()
        expected, got = model(b).logits, eng(b).logits
    assert rel_err(got, expected) <= 1e-4, (got, expected)


# ============================================================================ 2. huge finite features
def test_issue_reproducer_huge_features_are_refused():
    cfg = dm.DM2S2Config.default_ads(num_layers=1)
    with pytest.raises(ValueError, match=r"modality 'image', sample 0: features must lie within ±1e\+12, got 1e\+30"):
        SequenceSet.from_samples(cfg, [{"image": torch.full((2, 512), 1e30)}, {"title": [5, 6]}])


@pytest.mark.parametrize("value", [1.0001e12, -3e12, 1e19, 1e30, 3.4e38])
@pytest.mark.parametrize("ctor", ["samples", "jagged", "padded"])
def test_features_beyond_the_bound_are_refused_naming_modality_and_sample(ctor, value):
    config = small_config()
    x = torch.randn(3, 6, dtype=torch.float64)
    x[2, 4] = value
    with pytest.raises(ValueError, match=r"modality 'image', sample 1: features must lie within ±1e\+12"):
        if ctor == "samples":
            SequenceSet.from_samples(config, [{"image": x[:1]}, {"image": x[1:]}])
        elif ctor == "jagged":
            SequenceSet.from_jagged(config, {"image": (x, [1, 2])})
        else:
            padded = torch.zeros(2, 2, 6, dtype=torch.float64)
            padded[0, 1], padded[1] = x[0], x[1:]
            SequenceSet.from_padded(config, {"image": (padded, torch.tensor([[False, True], [True, True]]))})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_features_up_to_the_bound_match_the_fp64_reference(backend, dtype):
    """The near side of the bound: rows of features at ±1e12 (and 1e11, 1e6) through the fp32
    reference and every backend match the fp64 reference within 1e-5 (the failure point, where a
    LayerNorm's squared deviations overflow fp32, is near 1e19 for these models)."""
    require_backend(backend, "cpu")
    config = small_config()
    model = random_model(config, 5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x[0] *= 1e6
    x[1] *= 1e11
    x[2] = torch.sign(x[2]) * FEATURE_LIMIT  # on the bound
    x[3, 0] = -FEATURE_LIMIT
    x = x.to(dtype)
    assert float(x.abs().max()) <= FEATURE_LIMIT
    batch = SequenceSet.from_samples(config, [{"image": x[:3], "title": [1, 2]}, {"body": [4]}, {"image": x[3:]}])
    with torch.no_grad():
        _assert_matches_fp64(model, model(batch), batch, "the fp32 reference")
        _assert_matches_fp64(model, dm.convert(model, backend=backend)(batch), batch, backend)


def test_float16_model_refuses_features_beyond_float16():
    """A float16 model computes the projection in float16: beyond ±65504 the cast makes inf (item 2's
    "fp16 overflows far earlier"). The engine refuses them before the forward; within range it runs."""
    config = small_config()
    model = copy.deepcopy(random_model(config, 7)).half()
    engine = dm.convert(model, backend="torch")
    bad = SequenceSet.from_samples(config, [{"title": [3]}, {"image": torch.tensor([[1.0] * 5 + [7e4]])}])
    with pytest.raises(ValueError, match=r"modality 'image', sample 1: features must lie within ±65504 for a float16 model"):
        engine(bad)
    ok = SequenceSet.from_samples(config, [{"title": [3]}, {"image": torch.tensor([[0.5] * 5 + [-65504.0]])}])
    with torch.no_grad():
        assert torch.isfinite(engine(ok).hidden).all()
    fp32_engine = dm.convert(random_model(config, 7), backend="torch")  # the same batch is fine in fp32
    with torch.no_grad():
        fp32_engine(bad)


# ============================================================================ 3. errors of the wrong type
CFG = small_config()


def _refuses(call, pattern, exc=ValueError):
    with pytest.raises(exc, match=pattern):
        call()


def test_non_string_modality_key_is_a_value_error_naming_it():
    """Was ``TypeError: '<' not supported between instances of 'str' and 'int'`` (sorting the keys)."""
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"title": [1], 1: [2], "colour": [3]}]),
             r"sample 0: unknown modality (1|'colour')")
    _refuses(lambda: SequenceSet.from_samples(CFG, [{1: [2]}]), r"sample 0: unknown modality 1 \(modality names are strings")
    _refuses(lambda: SequenceSet.from_jagged(CFG, {("title",): ([1], [1])}), r"unknown modality \('title',\)")
    _refuses(lambda: SequenceSet.from_padded(CFG, {None: (torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))}),
             r"unknown modality None")
    _refuses(lambda: SequenceSet(CFG, {b"title": torch.tensor([1])}, {b"title": [1]}), r"unknown modality b'title'")


def test_meta_tensor_beside_cpu_ones_in_from_samples():
    """Was a RuntimeError from ``torch.cat``; and a meta tensor alone blamed "lengths"."""
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"title": [1, 2]}, {"title": torch.tensor([1], device="meta")}]),
             r"modality 'title', sample 1: the sequence is on the meta device")
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"image": torch.zeros(2, 6, device="meta")}]),
             r"modality 'image', sample 0: the sequence is on the meta device")
    with pytest.raises(ValueError) as info:
        SequenceSet.from_samples(CFG, [{"title": torch.tensor([1], device="meta")}])
    assert "lengths" not in str(info.value)


def test_from_padded_with_a_meta_mask_or_values():
    """Was NotImplementedError from ``torch.nonzero``."""
    _refuses(lambda: SequenceSet.from_padded(CFG, {"title": (torch.ones(1, 2, dtype=torch.long),
                                                            torch.ones(1, 2, dtype=torch.bool, device="meta"))}),
             r"modality 'title': the mask is on the meta device")
    _refuses(lambda: SequenceSet.from_padded(CFG, {"title": (torch.ones(1, 2, dtype=torch.long, device="meta"),
                                                            torch.ones(1, 2, dtype=torch.bool))}),
             r"modality 'title': the padded values are on the meta device")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_features_are_refused_naming_the_dtype(dtype):
    """Was NotImplementedError from ``aminmax``."""
    x = torch.randn(2, 6).to(dtype)
    pattern = r"modality 'image'(, sample 0)?: dense features must be float32, float64, float16 or bfloat16, got float8"
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"image": x}]), pattern)
    _refuses(lambda: SequenceSet.from_jagged(CFG, {"image": (x, [2])}), pattern)
    _refuses(lambda: SequenceSet.from_padded(CFG, {"image": (x[None], torch.ones(1, 2, dtype=torch.bool))}), pattern)


def test_zero_width_image_is_refused_by_every_constructor_alike():
    """``from_samples`` took a (5, 0) image as "missing", ``from_jagged`` refused it: five rows of
    zero features is a wrong shape in both. A sequence with no rows is missing in both."""
    pattern = r"modality 'image'(, sample 0)?: dense features must be 2-D \[(length|total), 6\], got shape \(5, 0\)"
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"image": torch.zeros(5, 0)}]), pattern)
    _refuses(lambda: SequenceSet.from_jagged(CFG, {"image": (torch.zeros(5, 0), [5])}), pattern)
    _refuses(lambda: SequenceSet.from_jagged(CFG, {"image": (torch.zeros(5, 0), [0])}), r"modality 'image'")
    for empty in (torch.zeros(0, 6), torch.zeros(0), [], np.zeros((0, 6), np.float32)):
        a = SequenceSet.from_samples(CFG, [{"image": empty, "title": [1]}])
        b = SequenceSet.from_jagged(CFG, {"image": (empty, [0]), "title": ([1], [1])})
        assert a.lengths["image"].tolist() == b.lengths["image"].tolist() == [0]


def test_mask_dtype_is_named():
    """The message never mentioned the dtype of a uint8 mask."""
    _refuses(lambda: SequenceSet.from_padded(CFG, {"title": (torch.ones(1, 2, dtype=torch.long),
                                                            torch.ones(1, 2, dtype=torch.uint8))}),
             r"modality 'title': mask must be bool, got torch.uint8")


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_ids_are_named_by_dtype(dtype):
    """uint32 ids were called "not integers"."""
    ids = torch.tensor([1, 2]).to(dtype)
    _refuses(lambda: SequenceSet.from_jagged(CFG, {"title": (ids, [2])}),
             rf"modality 'title': ids of dtype {str(dtype)[6:]} are not supported")
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"title": ids}]),
             rf"modality 'title', sample 0: ids of dtype {str(dtype)[6:]} are not supported")
    _refuses(lambda: SequenceSet.from_padded(CFG, {"title": (ids[None], torch.ones(1, 2, dtype=torch.bool))}),
             rf"modality 'title': ids of dtype {str(dtype)[6:]} are not supported")


def test_mra_pool_names_its_inter_parameters_U_g_u():
    """``mra_pool`` called its InterMRA parameters "inter W/c/v"."""
    h, cu = torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32)
    per = torch.tensor([0, 2], dtype=torch.int32)
    W, c, v = torch.randn(3, 4), torch.randn(3), torch.randn(3)
    _refuses(lambda: ops.mra_pool(h, cu, per, W, c, v, torch.randn(3, 5), c, v), r"^U must have shape \(3, 4\)")
    _refuses(lambda: ops.mra_pool(h, cu, per, W, c, v, W, torch.randn(2), v), r"^g must have shape \(3,\)")
    _refuses(lambda: ops.mra_pool(h, cu, per, W, c, v, W, c, torch.randn(3).double()), r"^u has dtype")
    _refuses(lambda: ops.inter_mra(torch.randn(2, 4), per, torch.randn(3, 5), c, v), r"^U must have shape")


def _same(a: SequenceSet, b: SequenceSet) -> None:
    assert len(a) == len(b)
    for name in a.values:
        assert torch.equal(a.lengths[name], b.lengths[name]), name
        assert torch.equal(a.values[name].double(), b.values[name].double()), name


def test_numpy_is_accepted_by_every_constructor():
    """NumPy arrays were taken by ``from_samples`` and refused by the others."""
    g = np.random.default_rng(0)
    ids, feats = np.array([3, 4, 5], dtype=np.int64), g.standard_normal((3, 6)).astype(np.float32)
    reference = SequenceSet.from_jagged(CFG, {"title": (torch.from_numpy(ids), torch.tensor([2, 1])),
                                              "image": (torch.from_numpy(feats), torch.tensor([1, 2]))})
    _same(reference, SequenceSet.from_samples(CFG, [{"title": ids[:2], "image": feats[:1]},
                                                    {"title": ids[2:], "image": feats[1:]}]))
    _same(reference, SequenceSet.from_jagged(CFG, {"title": (ids, np.array([2, 1])), "image": (feats, np.array([1, 2]))}))
    _same(reference, SequenceSet(CFG, {"title": ids, "image": feats}, {"title": np.array([2, 1]), "image": [1, 2]}))
    padded_ids = np.array([[3, 4], [5, 0]])
    padded_feats = np.zeros((2, 2, 6), np.float32)
    padded_feats[0, 0], padded_feats[1] = feats[0], feats[1:]
    _same(reference, SequenceSet.from_padded(CFG, {
        "title": (padded_ids, np.array([[True, True], [True, False]])),
        "image": (padded_feats, np.array([[True, False], [True, True]]))}))
    # a reversed view (negative strides, which torch cannot wrap) too
    _same(reference, SequenceSet.from_jagged(CFG, {"title": (ids[::-1][::-1], [2, 1]), "image": (feats, [1, 2])}))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: SequenceSet.from_samples(None, [{}]), TypeError, "DM2S2Config"),
    (lambda: SequenceSet.from_jagged({"modalities": ()}, {}), TypeError, "DM2S2Config"),
    (lambda: SequenceSet.from_samples(CFG, [{}], device="nope"), ValueError, "device='nope'"),
    (lambda: SequenceSet.from_samples(CFG, [{}], device="meta"), ValueError, "device='meta'"),
    (lambda: SequenceSet(CFG, [torch.tensor([1])], {"title": [1]}), ValueError, "two dicts"),
    (lambda: SequenceSet.from_jagged(CFG, {"title": (object(), [1])}), ValueError, "'title': cannot make a tensor of the values"),
    (lambda: SequenceSet.from_padded(CFG, {"title": ([[1, 2]], "mask")}), ValueError, "'title': cannot make a tensor of the mask"),
    (lambda: SequenceSet.from_jagged(CFG, {"title": (torch.tensor([1, 2]), torch.tensor([1, 1], dtype=torch.uint32))}),
     ValueError, r"'title': lengths must be a 1-D integer tensor .* got uint32"),
])
def test_other_malformed_inputs_raise_value_or_type_errors(call, exc, pattern):
    _refuses(call, pattern, exc)


def test_cuda_device_without_cuda_is_a_value_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _refuses(lambda: SequenceSet.from_samples(CFG, [{"title": [1]}], device="cuda"), r"device='cuda' cannot be used here")


# ============================================================================ 4. raw ops
def _embed_args(**changes):
    n, d = 3, 4
    args = dict(positions=torch.tensor([0, 1, 2]), type_ids=torch.tensor([0, 0, 1]), position_table=torch.randn(8, d),
                type_table=torch.randn(2, d), weight=torch.ones(d), bias=torch.zeros(d), eps=1e-5, ids=None,
                table=None, dense=torch.randn(n, d), out=torch.zeros(5, d), out_rows=torch.tensor([4, 0, 2]))
    args.update(changes)
    return args


# name -> code (run in the subprocess, after the common prelude) whose call must raise naming `expect`
RAW_CASES = {
    "scale_nan": ("dm.set_attention(q, q, q, cu, 5, float('nan'))", "scale"),
    "scale_inf": ("dm.set_attention(q, q, q, cu, 5, float('-inf'))", "scale"),
    "scale_beyond_fp32": ("dm.set_attention(q, q, q, cu, 5, 1e39)", "scale"),
    "eps_negative_add_layernorm": ("dm.add_layernorm(x, x, w, b, -1e-3)", "eps"),
    "eps_nan_add_layernorm": ("dm.add_layernorm(x, x, w, b, float('nan'))", "eps"),
    "eps_negative_linear_add_layernorm": ("dm.linear_add_layernorm(x, W, b, x, w, b, -0.5)", "eps"),
    "eps_negative_embed_layernorm": ("embed(eps=-1.0)", "eps"),
    "duplicate_out_rows": ("embed(out_rows=torch.tensor([4, 0, 4]))", "out_rows"),
    "out_aliases_dense": ("embed(dense=OUT[:3])", "dense"),
    "out_aliases_position_table": ("embed(position_table=OUT[:5])", "position_table"),
    "out_aliases_weight": ("embed(weight=OUT[1])", "weight"),
    "meta_residual_among_cpu": ("dm.add_layernorm(x, x.to('meta'), w, b, 1e-5)", "device"),
    "meta_out_among_cpu": ("embed(out=torch.zeros(5, 4, device='meta'))", "device"),
    "meta_cu_among_cpu": ("dm.set_attention(q, q, q, cu.to('meta'), 5, 0.5)", "device"),
    "meta_bias_bias_gelu": ("dm.bias_gelu(x, b.to('meta'))", "device"),
    "meta_U_mra_pool": ("dm.mra_pool(h, cu2, per, W2, c2, c2, W2.to('meta'), c2, c2)", "device"),
}

_PRELUDE = """
import json, sys, torch
import dm2s2_fast.ops  # registers the fakes
from dm2s2_fast import _extension
assert _extension.load() is None, _extension.load()
dm = torch.ops.dm2s2_fast
torch.manual_seed(0)
q = torch.randn(5, 2, 8); cu = torch.tensor([0, 2, 5], dtype=torch.int32)
x = torch.randn(3, 4); w = torch.ones(4); b = torch.zeros(4); W = torch.randn(4, 4)
h = torch.randn(5, 4); cu2 = torch.tensor([0, 2, 5], dtype=torch.int32); per = torch.tensor([0, 2], dtype=torch.int32)
W2 = torch.randn(3, 4); c2 = torch.randn(3)
OUT = torch.zeros(5, 4)
def embed(**changes):
    a = dict(positions=torch.tensor([0, 1, 2]), type_ids=torch.tensor([0, 0, 1]), position_table=torch.randn(8, 4),
             type_table=torch.randn(2, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5, ids=None, table=None,
             dense=torch.randn(3, 4), out=OUT, out_rows=torch.tensor([4, 0, 2]))
    a.update(changes)
    return dm.embed_layernorm(*a.values())
for name, code in json.loads(sys.argv[1]).items():
    print(json.dumps({"start": name}), flush=True)
    try:
        eval(code)
        result = {"name": name, "raised": None}
    except Exception as exc:
        result = {"name": name, "raised": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def raw_results():
    """Every raw call of RAW_CASES, in one subprocess (a crash ends it: the calls it did not reach
    run again in a fresh one, so each call's crash is its own)."""
    require_extension()
    import subprocess

    results, todo = {}, dict(RAW_CASES)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _PRELUDE, json.dumps({k: v[0] for k, v in todo.items()})],
                              capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["name"]] = record
                todo.pop(record["name"])
                started = None
        if started is not None:  # the process died inside this call
            results[started] = {"name": started, "crash": proc.returncode, "stderr": proc.stderr[-2000:]}
            todo.pop(started)
        elif todo and proc.returncode != 0:
            raise RuntimeError(f"raw-op subprocess failed before its calls: {proc.stderr[-2000:]}")
    return results


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_op_refuses_what_its_kernel_relies_on(raw_results, name):
    result = raw_results[name]
    assert "crash" not in result, f"the process crashed (exit {result.get('crash')}): {result.get('stderr')}"
    assert result["raised"] is not None, f"{RAW_CASES[name][0]} was accepted"
    assert RAW_CASES[name][1] in result["message"], result["message"]


def test_fakes_give_meta_outputs_for_meta_inputs():
    """The fakes still do their job (shapes for torch.compile / torch.export) when every tensor is
    on meta; mixed with real tensors they refuse (above) instead of returning uninitialised memory."""
    require_extension()
    m = torch.randn(3, 4, device="meta")
    y = torch.ops.dm2s2_fast.add_layernorm(m, m, torch.ones(4, device="meta"), torch.zeros(4, device="meta"), 1e-5)
    assert y.device.type == "meta" and y.shape == (3, 4)
    with pytest.raises(ValueError, match="every tensor must be on one device, got cpu, meta"):
        torch.ops.dm2s2_fast.linear(torch.randn(2, 4), m, torch.zeros(3))


@pytest.mark.parametrize("call,pattern", [
    (lambda o, t: o.set_attention(t(5, 2, 8), t(5, 2, 8), t(5, 2, 8), torch.tensor([0, 5], dtype=torch.int32,
                                                                                       device="cuda"), 5, float("nan")), "scale"),
    (lambda o, t: o.add_layernorm(t(3, 4), t(3, 4), t(4), t(4), -1.0), "eps"),
    (lambda o, t: (lambda out: o.embed_layernorm(torch.tensor([0, 1], device="cuda"), torch.tensor([0, 0], device="cuda"),
                                                 t(8, 4), t(2, 4), t(4), t(4), 1e-5, None, None, out[:2], out,
                                                 torch.tensor([1, 0], device="cuda")))(t(3, 4)), "dense"),
])
def test_cuda_raw_ops_refuse_bad_scalars_and_aliasing(call, pattern):
    skip_unless_cuda()
    require_backend("cuda", "cuda")

    def t(*shape):
        return torch.randn(*shape, device="cuda")

    with pytest.raises(RuntimeError, match=pattern):
        call(torch.ops.dm2s2_fast, t)
