"""intra_mra, inter_mra and mra_pool on every backend against their references in fp64
(tests/ops/harness.py), the reference against a per-segment loop, the weights summing to one,
mra_pool as intra_mra then inter_mra, opcheck, and the ops' argument errors.

Sample inputs (segments per sample): empty segments and samples without any, no segments or no
samples at all, length-1 segments, more segments than a tile, a long tail (118-300-row segments),
the ads workload's segments; widths d and score widths a from 8 to 384, none of them tile multiples
among the small ones; offsets and score vectors read through strided or expanded views.
"""
from __future__ import annotations

import math

import pytest
import torch

import harness
from dm2s2_fast import ops
from dm2s2_fast.ops.mra import inter_mra_reference, intra_mra_reference, mra_pool_reference
from harness import Case, every_other, gen, offsets, rand
from helpers import FP32_TOL, rel_err, require_backend, require_extension, skip_unless_cuda

OPS = ("intra_mra", "inter_mra", "mra_pool")
NAMES = {"intra_mra": ("z", "alpha"), "inter_mra": ("r", "beta"), "mra_pool": ("z", "r", "alpha", "beta")}
REFERENCES = {"intra_mra": intra_mra_reference, "inter_mra": inter_mra_reference, "mra_pool": mra_pool_reference}


def case(samples, d, a, a2=None, sharp=True, views="", seed=0, **flags):
    """``samples``: per sample, its segments' lengths. ``a2``: InterMRA's score width (default a).
    ``sharp``: scorer weights that make the softmax weights far from uniform. ``views``: "strided"
    (offsets and score vectors through stride-2 views) or "expanded" (c an expanded scalar).
    Builds {op: args}."""
    seg_lengths = [n for s in samples for n in s]
    a2 = a2 or a

    def build(device, dtype):
        g = gen(seed * 1000 + len(seg_lengths) * 3 + d + a)

        def scorer(width):
            if sharp:
                return (rand(g, width, d, device=device, dtype=dtype, scale=0.4),
                        rand(g, width, device=device, dtype=dtype, scale=0.2),
                        rand(g, width, device=device, dtype=dtype, scale=1.5))
            return (rand(g, width, d, device=device, dtype=dtype, scale=1.0 / math.sqrt(d)),
                    rand(g, width, device=device, dtype=dtype, scale=0.3),
                    rand(g, width, device=device, dtype=dtype, scale=0.5))

        h = rand(g, sum(seg_lengths), d, device=device, dtype=dtype)
        z = rand(g, len(seg_lengths), d, device=device, dtype=dtype)
        cu_seg, cu_smp = offsets(seg_lengths, device), offsets([len(s) for s in samples], device)
        W, c, v = scorer(a)
        U, gg, u = scorer(a2)
        if views == "strided":
            cu_seg, cu_smp, c, v, gg = map(every_other, (cu_seg, cu_smp, c, v, gg))
        elif views == "expanded":
            c = torch.tensor(0.3, device=device, dtype=dtype).expand(a)
        return {"intra_mra": (h, cu_seg, W, c, v), "inter_mra": (z, cu_smp, U, gg, u),
                "mra_pool": (h, cu_seg, cu_smp, W, c, v, U, gg, u)}
    return Case(build, **flags)


def ads_like(B, seed=0):
    """The ads workload's segments (docs/workloads.md): title 6-24, description 8-118, image 49
    (missing 15 %), category 4-12; sample 0 has no segment at all, sample 1 one length-1 segment."""
    g = gen(seed)
    samples = [[], [1]]
    for _ in range(B - 2):
        sample = []
        for lo, hi, p_missing in ((6, 24, 0.0), (8, 118, 0.0), (49, 49, 0.15), (4, 12, 0.0)):
            if torch.rand(1, generator=g).item() >= p_missing:
                sample.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
        samples.append(sample)
    return samples


CPP_MIXED = [[3, 1], [0, 118, 49], [12, 0], [0, 1, 7]]
CUDA_MIXED = [[3, 0, 1], [], [9], [130, 1, 0, 47, 300, 2]]
CASES = {
    # Small enough for Triton's interpreter.
    "ragged": case([[3, 1, 5], [], [0, 2], [7], [1, 1, 1, 1], [12, 0, 30]], 32, 24),
    "many-segments": case([[2] * 18 + [1, 5], [4, 3], []], 48, 40),  # > 16 segments: several tiles
    "wide": case([[25, 3], [1], [9, 9, 9]], 96, 80),
    "ones": case([[1, 1], [1, 1]], 64, 13, sharp=False),
    "empty-sample": case([[3, 1], [], [5]], 96, 96, a2=32, sharp=False),
    "all-empty": case([[0, 0], [], [0]], 32, 16),  # N = 0 with segments: z = 0, β uniform
    "no-segments": case([[], []], 32, 16),  # samples without any segment: r = 0
    "no-samples": case([], 32, 16),
    "strided-views": case([[3, 1, 5], [], [0, 2], [7], [12, 0, 30]], 32, 24, views="strided", seed=4),
    "expanded-c": case([[3, 1, 5], [], [0, 2], [7], [12, 0, 30]], 32, 24, views="expanded", seed=4),
    # Larger: on the compiled backends and torch.
    **{f"cpp-mixed-d{d}-a{a}": case(CPP_MIXED, d, a, sharp=False, interp=False) for d, a in ((384, 384), (64, 13),
                                                                                             (20, 40))},
    **{f"long-tail-d{d}-a{a}": case(CUDA_MIXED, d, a, sharp=False, interp=False)
       for d, a in ((384, 384), (32, 24), (40, 17), (36, 20), (8, 200))},
    "ads-b40": case(ads_like(40), 384, 384, a2=192, sharp=False, interp=False),
    "ads-b40-d96": case(ads_like(40, seed=1), 96, 96, a2=32, interp=False),
    "many-samples": case([[1] * 4] * 300, 64, 48, sharp=False, interp=False),
}
PARAMS = [(op, name) for op in OPS for name in CASES]


def check(op: str, name: str, backend: str, device: str, dtype: torch.dtype) -> tuple:
    args = CASES[name](device, dtype)[op]
    fn = getattr(ops, op)
    out = harness.parity(f"{op}/{name}", lambda *a: fn(*a, backend=backend), REFERENCES[op], args, device, dtype,
                         NAMES[op])
    for field, o in zip(NAMES[op], out):
        assert o.dtype == (torch.float32 if field in ("alpha", "beta") else dtype), (field, o.dtype)
    fields = dict(zip(NAMES[op], out))
    if "z" in fields:  # an empty segment pools to exactly 0
        cu = args[1]
        empty = (cu[1:] - cu[:-1]) == 0
        assert bool((fields["z"][empty] == 0).all()), "an empty segment must pool to z = 0"
    if "r" in fields:  # a sample with no segment has r = 0
        cu = args[1] if op == "inter_mra" else args[2]
        empty = (cu[1:] - cu[:-1]) == 0
        assert bool((fields["r"][empty] == 0).all()), "a sample with no segment must pool to r = 0"
    return out


def _over_ops_and_cases():
    params = []
    for op in OPS:
        for name, c in CASES.items():
            for b, d, t in harness.combos(interp=c.interp, cuda=c.cuda):
                params.append(pytest.param(op, b, d, t, name, marks=[pytest.mark.cuda] if d == "cuda" else [],
                                           id=f"{op}-{b}-{d}-{harness.dtype_name(t)}-{name}"))
    return pytest.mark.parametrize("op,backend,device,dtype,case", params)


@_over_ops_and_cases()
def test_parity(op, backend, device, dtype, case):
    harness.require(backend, device, op)
    check(op, case, backend, device, dtype)


@harness.over_backends()
@pytest.mark.parametrize("name", ["ragged", "many-segments"])
def test_mra_pool_is_intra_then_inter(backend, device, dtype, name):
    """The fused op is IntraMRA then InterMRA on its z: bit for bit where a backend runs it as the two
    levels' kernels (torch, triton, cuda), within fp32 rounding on cpp (one fused pass)."""
    harness.require(backend, device, "mra_pool")
    h, cu_seg, cu_smp, W, c, v, U, gg, u = CASES[name](device, dtype)["mra_pool"]
    fused = ops.mra_pool(h, cu_seg, cu_smp, W, c, v, U, gg, u, backend=backend)
    z, alpha = ops.intra_mra(h, cu_seg, W, c, v, backend=backend)
    r, beta = ops.inter_mra(z, cu_smp, U, gg, u, backend=backend)
    for field, one, two in zip(("z", "r", "alpha", "beta"), fused, (z, r, alpha, beta)):
        if backend == "cpp":
            assert rel_err(one, two) <= FP32_TOL, field
        else:
            assert torch.equal(one, two), f"{field}: mra_pool differs from intra_mra then inter_mra"


@harness.over_backends()
def test_weights_sum_to_one(backend, device, dtype):
    """α sums to 1 over each non-empty segment, β over each sample's segments; a sample with no
    segment pools to r = 0 (docs/model.md#intramra)."""
    harness.require(backend, device, "mra_pool")
    h, cu_seg, cu_smp, W, c, v, U, gg, u = CASES["ragged"](device, dtype)["mra_pool"]
    z, r, alpha, beta = ops.mra_pool(h, cu_seg, cu_smp, W, c, v, U, gg, u, backend=backend)
    for weights, cu in ((alpha, cu_seg), (beta, cu_smp)):
        lengths = (cu[1:] - cu[:-1]).long().cpu()
        sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(
            0, torch.repeat_interleave(torch.arange(len(lengths)), lengths), weights.double().cpu())
        torch.testing.assert_close(sums[lengths > 0], torch.ones(int((lengths > 0).sum()), dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    n_seg = (cu_smp[1:] - cu_smp[:-1]).cpu()
    assert torch.all(r.cpu()[n_seg == 0] == 0)


def test_reference_matches_a_per_segment_loop():
    """The reference (and the torch backend) against the definition written as loops."""
    g = gen(2)
    seg_lengths, segs_per_sample = [3, 1, 5, 2, 4], [2, 0, 3]
    h = torch.randn(sum(seg_lengths), 6, generator=g)
    W, U = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    c, v, gb, u = (torch.randn(5, generator=g) for _ in range(4))
    cu_seg, cu_smp = offsets(seg_lengths, "cpu"), offsets(segs_per_sample, "cpu")
    z, r, alpha, beta = ops.mra_pool(h, cu_seg, cu_smp, W, c, v, U, gb, u, backend="torch")
    hd = h.double()
    zs, alphas = [], []
    for seg in hd.split(seg_lengths):
        a = (torch.tanh(seg @ W.double().t() + c.double()) @ v.double()).softmax(0)
        alphas.append(a)
        zs.append(((1 + a)[:, None] * seg).sum(0) / (len(seg) + 1))
    zr = torch.stack(zs)
    rs, betas = [], []
    for zb in zr.split(segs_per_sample):
        if len(zb) == 0:
            rs.append(torch.zeros(6, dtype=torch.float64))
            continue
        b = (torch.tanh(zb @ U.double().t() + gb.double()) @ u.double()).softmax(0)
        betas.append(b)
        rs.append(((1 + b)[:, None] * zb).sum(0) / (len(zb) + 1))
    assert rel_err(z, zr) <= FP32_TOL
    assert rel_err(alpha, torch.cat(alphas)) <= FP32_TOL
    assert rel_err(r, torch.stack(rs)) <= FP32_TOL
    assert rel_err(beta, torch.cat(betas)) <= FP32_TOL
    z64, r64, alpha64, beta64 = mra_pool_reference(hd, cu_seg, cu_smp, W.double(), c.double(), v.double(),
                                                   U.double(), gb.double(), u.double())
    assert rel_err(z64, zr) <= 1e-12 and rel_err(r64, torch.stack(rs)) <= 1e-12
    assert rel_err(alpha64, torch.cat(alphas)) <= 1e-12 and rel_err(beta64, torch.cat(betas)) <= 1e-12


@harness.over_backends()
def test_zero_sized_inputs(backend, device, dtype):
    """No rows, no segments, no samples; and samples without segments (r = 0)."""
    harness.require(backend, device, "mra_pool")
    d, a = 4, 3
    W = torch.randn(a, d).to(device, dtype)
    c, v = torch.randn(a).to(device, dtype), torch.randn(a).to(device, dtype)
    none = torch.zeros(1, dtype=torch.int32, device=device)
    z, r, alpha, beta = ops.mra_pool(torch.zeros(0, d, device=device, dtype=dtype), none, none, W, c, v, W, c, v,
                                     backend=backend)
    assert z.shape == (0, d) and r.shape == (0, d) and alpha.shape == (0,) and beta.shape == (0,)
    z, r, alpha, beta = ops.mra_pool(torch.zeros(0, d, device=device, dtype=dtype), none,
                                     torch.zeros(3, dtype=torch.int32, device=device), W, c, v, W, c, v,
                                     backend=backend)
    assert z.shape == (0, d) and alpha.shape == (0,) and beta.shape == (0,)
    assert torch.equal(r.cpu(), torch.zeros(2, d, dtype=dtype))


# ------------------------------------------------------------------ opcheck

def _opcheck_args(device):
    g = gen(0)
    lengths = [3, 0, 1, 9]
    d = 16
    x = rand(g, sum(lengths), d, device=device, dtype=torch.float32)
    W = rand(g, 10, d, device=device, dtype=torch.float32)
    c, v = rand(g, 10, device=device, dtype=torch.float32), rand(g, 10, device=device, dtype=torch.float32)
    cu = offsets(lengths, device)
    return {"intra_mra": (x, cu, W, c, v), "inter_mra": (x[:4], offsets([2, 0, 2], device), W, c, v),
            "mra_pool": (x, cu, offsets([1, 3], device), W, c, v, W, c, v)}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device, op):
    if device == "cuda":
        skip_unless_cuda()
        require_backend("cuda", "cuda", op)
    require_extension()
    torch.library.opcheck(getattr(torch.ops.dm2s2_fast, op).default, _opcheck_args(device)[op])


# ------------------------------------------------------------------ argument errors

@pytest.mark.parametrize("call,message", [
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 2, 2], dtype=torch.int32), torch.randn(5, 4),
                           torch.randn(5), torch.randn(5)), "cu_segments_per_sample must run from 0 to 3"),
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 3, 1, 3], dtype=torch.int32), torch.randn(5, 4),
                           torch.randn(5), torch.randn(5)), "non-decreasing"),
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 3]), torch.randn(5, 4), torch.randn(5),
                           torch.randn(5)), "int32"),
    (lambda: ops.intra_mra(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32), torch.randn(3, 5),
                           torch.randn(3), torch.randn(3)), r"W must have shape \(3, 4\)"),
    (lambda: ops.intra_mra(torch.randn(5, 4), torch.tensor([0, 2, 4], dtype=torch.int32), torch.randn(3, 4),
                           torch.randn(3), torch.randn(3)), "cu_seqlens_segment must run from 0 to 5"),
    (lambda: ops.intra_mra(torch.randn(5, 4), torch.tensor([0, 5], dtype=torch.int32), torch.randn(3, 4),
                           torch.randn(2), torch.randn(3)), r"c must have shape \(3,\)"),
    (lambda: ops.mra_pool(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32),
                          torch.tensor([0, 3], dtype=torch.int32), torch.randn(3, 4), torch.randn(3), torch.randn(3),
                          torch.randn(3, 4), torch.randn(3), torch.randn(3)),
     "cu_segments_per_sample must run from 0 to 2"),
    (lambda: ops.mra_pool(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32),
                          torch.tensor([0, 2], dtype=torch.int32), torch.randn(3, 4), torch.randn(3), torch.randn(3),
                          torch.randn(3, 5), torch.randn(3), torch.randn(3)),
     r"U must have shape \(3, 4\), got \(3, 5\)"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
