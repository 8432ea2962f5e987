"""set_attention on every backend against ``set_attention_reference`` in fp64 (tests/ops/harness.py),
the reference against the obviously-right dense block-diagonal form, opcheck, and the op's
argument errors.

Sample inputs: empty groups, length-1 groups, a long tail past the kernels' 64/128-row tiles, N = 0
and no groups at all, head dims 5 to 128 (odd ones included), q/k/v as views of one [N, 3, H, D]
projection (as the engine passes them), separate, or off 16-byte alignment, scores of several
hundred (the max subtraction), the default and an explicit scale.
"""
from __future__ import annotations

import math

import pytest
import torch

import harness
from dm2s2_fast import ops
from dm2s2_fast.ops.set_attention import set_attention_reference
from harness import Case, gen, offsets, rand
from helpers import FP32_TOL, rel_err, require_backend, require_extension, skip_unless_cuda

OP = "set_attention"


def _qkv(g, N, H, D, device, dtype, layout, scale=1.0):
    if layout == "packed":  # views of one [N, 3, H, D] projection, as the engine makes them
        return rand(g, N, 3, H, D, device=device, dtype=dtype, scale=scale).unbind(1)
    if layout == "unaligned":  # rows off 16-byte alignment: the kernels' fallback path
        return tuple(rand(g, N * H * D + 1, device=device, dtype=dtype, scale=scale)[1:].view(N, H, D)
                     for _ in range(3))
    return tuple(rand(g, N, H, D, device=device, dtype=dtype, scale=scale) for _ in range(3))


def case(lengths, H, D, layout="packed", scale=None, scale_mul=1.0, max_seqlen=None, seed=0, **flags):
    """``scale=None``: the op's default (1/sqrt(D)); ``scale_mul`` scales the inputs (large scores)."""
    def build(device, dtype):
        g = gen(seed * 1000 + sum(lengths) + H * 7 + D)
        q, k, v = _qkv(g, sum(lengths), H, D, device, dtype, layout, scale_mul)
        return q, k, v, offsets(lengths, device), max_seqlen or max(lengths, default=0), scale
    return Case(build, **flags)


# Ragged group lengths: empty groups, length 1, a long tail past the 64/128-row tiles.
GROUPS = {
    "mixed": [0, 1, 5, 0, 17, 130, 1, 64, 0, 33, 7],
    "long": [300, 2, 129],
    "ads_like": [23, 115, 203, 18, 96, 140, 61, 180, 44, 117],
}
SHAPES = {  # heads, head dim, q/k/v layout
    "h12d32": (12, 32, "packed"), "h3d20": (3, 20, "separate"), "h4d64": (4, 64, "separate"),
    "h2d128": (2, 128, "packed"), "h3d48": (3, 48, "separate"), "h1d64": (1, 64, "packed"),
    "h2d5": (2, 5, "separate"),
}

CASES = {
    # Small enough for Triton's interpreter.
    "ragged-d32": case([0, 1, 5, 17, 0, 40, 3, 1, 70, 2], 2, 32),  # mean 14: Triton's packed tiles
    "long-d32": case([45, 1, 80, 0, 33, 150], 2, 32),  # mean 52: per-group tiles, several q/kv blocks
    "short-d64": case([3, 1, 12, 4, 0, 7, 2, 9, 30, 1, 5, 6], 2, 64),
    "d128": case([33, 130, 1], 1, 128),
    "d48-odd": case([20, 9, 1, 44], 3, 48, layout="separate"),
    "d5-odd": case([2, 7, 0, 1, 3], 2, 5, layout="separate"),
    "scale-contiguous": case([0, 1, 5, 17, 0, 40, 3, 1, 70, 2], 2, 32, layout="separate", scale=0.3, seed=2),
    "scale-above-default": case([9, 0, 30, 2], 3, 16, scale=1.7 / math.sqrt(16), seed=3),
    "max-seqlen-above-longest": case([0, 1, 0, 7, 30, 2, 1, 0], 2, 16, max_seqlen=45, seed=4),
    "unaligned": case([0, 1, 5, 17, 3], 2, 32, layout="unaligned", seed=5),
    "large-scores": case([70, 3, 27, 1], 2, 32, layout="separate", scale_mul=8.0, seed=6),
    "no-groups": case([], 2, 32),
    "empty-groups": case([0, 0, 0], 2, 32),
    "one-group-of-one": case([1], 2, 32),
    "groups-of-one": case([1, 1, 1], 2, 32),
    # Head dim 0: the default scale must not divide by it (the CPU backends; none has a use for it).
    "head-dim-0": case([3], 2, 0, cuda=False),
    # Larger: each group set with several head shapes (every shape with one set at least), on the
    # compiled backends and torch.
    "large-scores-long": case([200, 3, 77, 1], 4, 32, layout="separate", scale_mul=6.0, scale=0.5, interp=False),
    **{f"{g}-{s}": case(GROUPS[g], *SHAPES[s], seed=i, interp=False)
       for i, (g, s) in enumerate([("mixed", "h12d32"), ("mixed", "h3d20"), ("mixed", "h2d5"), ("mixed", "h3d48"),
                                   ("long", "h3d20"), ("long", "h1d64"), ("long", "h2d128"),
                                   ("ads_like", "h12d32"), ("ads_like", "h4d64")])},
}


def check(name: str, backend: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Case ``name`` through ``backend`` on ``device`` in ``dtype``, held to the fp64 reference."""
    q, k, v, cu, max_seqlen, scale = CASES[name](device, dtype)
    D = q.shape[-1]
    ref_scale = scale if scale is not None else (1.0 / math.sqrt(D) if D else 1.0)
    (out,) = harness.parity(
        f"set_attention/{name}",
        lambda q, k, v, cu: ops.set_attention(q, k, v, cu, max_seqlen, scale, backend=backend),
        lambda q, k, v, cu: set_attention_reference(q, k, v, cu, max_seqlen, ref_scale),
        (q, k, v, cu), device, dtype)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    lengths = (cu[1:] - cu[:-1]).tolist()
    if lengths and set(lengths) == {1}:  # a group of one: softmax weight 1 on itself, out = v
        torch.testing.assert_close(out, v, **({"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}))
    return out


@harness.over_cases(CASES)
def test_parity(backend, device, dtype, case):
    harness.require(backend, device, OP)
    check(case, backend, device, dtype)


# ------------------------------------------------------------------ the reference itself

def naive_attention(q, k, v, lengths, scale):
    """Dense [N, N] block-diagonal mask: the obviously-right (and O(N²)) form."""
    group = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    allowed = group[:, None] == group[None, :]
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v)


@pytest.mark.parametrize("lengths,max_seqlen", [([1, 0, 7, 30, 2, 1], 30), ([0, 1, 0, 7, 30, 2, 1, 0], 30),
                                                ([0, 1, 0, 7, 30, 2, 1, 0], 45)], ids=str)
def test_reference_matches_block_diagonal(lengths, max_seqlen):
    """The padded sdpa form (graph-capturable) and the torch backend (per group on CPU) against the
    dense block-diagonal form: empty and length-1 groups, leading/trailing empty groups, a max_seqlen
    above the longest group, q/k/v as views of one projection."""
    g = gen(2)
    qkv = torch.randn(sum(lengths), 3, 4, 8, generator=g) * 2
    q, k, v = qkv.unbind(1)
    cu = offsets(lengths, "cpu")
    expect = naive_attention(q.double(), k.double(), v.double(), lengths, 1 / math.sqrt(8))
    padded = set_attention_reference(q, k, v, cu, max_seqlen, 1 / math.sqrt(8))
    assert padded.shape == q.shape and torch.isfinite(padded).all()
    assert rel_err(padded, expect) <= FP32_TOL
    assert rel_err(ops.set_attention(q, k, v, cu, max_seqlen, backend="torch"), expect) <= FP32_TOL
    assert rel_err(set_attention_reference(q.double(), k.double(), v.double(), cu, max_seqlen, 1 / math.sqrt(8)),
                   expect) <= 1e-12


@harness.over_backends()
def test_zero_sized_inputs(backend, device, dtype):
    """N = 0 rows with one (empty) group: an empty output, no launch needed."""
    harness.require(backend, device, OP)
    empty = torch.zeros(0, 2, 4, device=device, dtype=dtype)
    cu = torch.zeros(2, dtype=torch.int32, device=device)
    out = ops.set_attention(empty, empty, empty, cu, 0, backend=backend)
    assert out.shape == (0, 2, 4) and out.dtype == dtype


# ------------------------------------------------------------------ opcheck

def _opcheck_args(device):
    g = gen(0)
    lengths = [3, 0, 1, 9]
    dtype, D = (torch.float32, 8) if device == "cpu" else (torch.bfloat16, 32)
    q, k, v = rand(g, sum(lengths), 3, 2, D, device=device, dtype=dtype).unbind(1)
    return q, k, v, offsets(lengths, device), 9, 0.3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    """The compiled op's schema, fake (meta) implementation and dispatch agree (torch.library.opcheck)."""
    if device == "cuda":
        skip_unless_cuda()
        require_backend("cuda", "cuda", OP)
    require_extension()
    torch.library.opcheck(torch.ops.dm2s2_fast.set_attention.default, _opcheck_args(device))


# ------------------------------------------------------------------ argument errors

def _qkv4(dim=8):
    return torch.randn(4, 2, dim), torch.randn(4, 2, dim), torch.randn(4, 2, dim)


@pytest.mark.parametrize("call,message", [
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 5], dtype=torch.int32), 5), "must run from 0 to 4"),
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 3, 2, 4], dtype=torch.int32), 4), "non-decreasing"),
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 4]), 4), "int32"),
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 4], dtype=torch.int32), 3), "max_seqlen 3 is shorter"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 4), torch.randn(4, 2, 8),
                               torch.tensor([0, 4], dtype=torch.int32), 4), "share a shape"),
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 4], dtype=torch.int32), 4.5),
     "max_seqlen must be an integer"),
    (lambda: ops.set_attention(*_qkv4(), torch.tensor([0, 4], dtype=torch.int32), 4, float("nan")),
     "scale must be a finite number"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8).double(), torch.randn(4, 2, 8),
                               torch.tensor([0, 4], dtype=torch.int32), 4), "k has dtype"),
    (lambda: ops.set_attention(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8),
                               torch.tensor([0, 4], dtype=torch.int32), 4), "q must have 3 dims"),
    (lambda: ops.set_attention(*(torch.randn(4, 2, 8, device="meta"),) * 3,
                               torch.tensor([0, 4], dtype=torch.int32, device="meta"), 4), "meta device"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
