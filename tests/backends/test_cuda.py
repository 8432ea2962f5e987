"""What is particular to the ``cuda`` backend (csrc/cuda/, dm2s2_fast/backends/cuda/); its op parity
(the kernels ``auto`` picks, every op in fp32/fp16/bf16 on the ragged sample inputs) runs in
tests/ops/ like every backend's, with the same bounds (tests/ops/harness.py ``tolerance``).

Here: every kernel variant a ``Tuning`` selects — ``cuda_attention`` ("tile32", "tile64": the tiled
tensor-core kernels; "group": the whole-group kernel) and ``cuda_layernorm`` ("warp", "half" rows) —
against the fp64 reference, underestimated ``max_seqlen`` (the raw op does not sync to check it),
launches on the current stream, CUDA graph capture, determinism, shared memory across sizes, a bad
index that must never read out of bounds, and dispatch's refusals. Outputs must be finite; each op
runs right after the caching allocator was filled with NaN blocks of the outputs' sizes
(``harness.poison``), so an unwritten element shows as NaN.

Skipped, with the reason, when there is no CUDA device (a failure under DM2S2_FAST_REQUIRE_CUDA=1)
or the cuda backend is unavailable (a failure under DM2S2_FAST_REQUIRE_EXTENSION=1 or
DM2S2_FAST_REQUIRE_CUDA=1: a build without the CUDA kernels must not pass as skipped).
"""
from __future__ import annotations

import math

import pytest
import torch

import harness
import test_add_layernorm
import test_embed_layernorm
from dm2s2_fast import BackendUnavailable, dispatch
from dm2s2_fast.ops.bias_gelu import bias_gelu_reference
from dm2s2_fast.ops.embed_layernorm import embed_layernorm_reference
from dm2s2_fast.ops.mra import inter_mra_reference, intra_mra_reference
from dm2s2_fast.ops.set_attention import set_attention_reference
from helpers import rel_err, require_backend, tuned

pytestmark = pytest.mark.cuda

OPS = torch.ops.dm2s2_fast
DEV = torch.device("cuda")
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + HALF


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Every test here needs a CUDA device and the cuda backend; fp32 parity (1e-5) assumes IEEE
    fp32 matmuls (the fp32 MRA projection is a cuBLAS GEMM)."""
    require_backend("cuda", "cuda", "set_attention")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _kernel(op: str):
    """The cuda backend's kernel for ``op`` (no argument checks: underestimated max_seqlen, bad
    indices); it reads the current tuning, as the public op does."""
    return dispatch.resolve(op, "cuda", DEV)[1]


def check(out, ref64, ref_in_dtype, dtype, what):
    assert out.device.type == "cuda", f"{what}: output on {out.device}"
    return harness.compare(what, out, ref64, ref_in_dtype, dtype)


def offsets(lengths) -> torch.Tensor:
    return harness.offsets(lengths, DEV)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


# Ragged group lengths: empty groups, length 1, a long tail past the 64/32-row tiles.
GROUPS = {
    "mixed": [0, 1, 5, 0, 17, 130, 1, 64, 0, 33, 7],
    "ads_like": [23, 115, 203, 18, 96, 140, 61, 180, 44, 117],
    "long": [300, 2, 129],
}


# ------------------------------------------------------------------ set_attention kernel variants
def _qkv(N, H, D, g, dtype, layout="packed"):
    if layout == "packed":  # views of one [N, 3, H, D] projection, as the engine makes them
        return randn(N, 3, H, D, g=g, dtype=dtype).unbind(1)
    return tuple(randn(N, H, D, g=g, dtype=dtype) for _ in range(3))


def _attention_case(lengths, H, D, dtype, seed, max_seqlen=None, scale=None):
    """The cuda set_attention kernel (the current tuning's variant) against the fp64 reference;
    ``max_seqlen`` may underestimate the longest group."""
    g = gen(seed)
    N = sum(lengths)
    q, k, v = _qkv(N, H, D, g, dtype)
    cu = offsets(lengths)
    scale = scale or 1.0 / math.sqrt(D)
    longest = max(lengths, default=0)
    harness.poison(DEV, ((N, H, D), dtype))
    out = _kernel("set_attention")(q, k, v, cu, longest if max_seqlen is None else max_seqlen, scale)
    assert out.dtype == dtype and out.is_contiguous()
    ref64 = set_attention_reference(q.double(), k.double(), v.double(), cu, longest, scale)
    ref_dt = None if dtype == torch.float32 else set_attention_reference(q, k, v, cu, longest, scale)
    check(out, ref64, ref_dt, dtype, f"set_attention {lengths[:8]} H={H} D={D} {dtype} max_seqlen={max_seqlen}")
    return out


# Every selectable tensor-core kernel: the 32- and 64-row tiled kernels and the whole-group kernel
# ("group"; head dims 32/64, 128 falls back to the 64 tile).
ATTN_VARIANTS = ["tile32", "tile64", "group"]


@pytest.mark.parametrize("variant", ATTN_VARIANTS)
@pytest.mark.parametrize("dtype", HALF, ids=harness.dtype_name)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_set_attention_variants(variant, dtype, D):
    seed = D + ATTN_VARIANTS.index(variant)
    with tuned(cuda_attention=variant):
        _attention_case(GROUPS["mixed"] + GROUPS["long"], 3, D, dtype, seed=seed)
        _attention_case(GROUPS["ads_like"] + [1, 0, 16, 64, 65, 208], 12, D, dtype, seed=seed + 100)


@pytest.mark.parametrize("variant", ["auto"] + ATTN_VARIANTS)
@pytest.mark.parametrize("max_seqlen", [0, 10, 64, 100])
def test_set_attention_variants_short_max_seqlen(variant, max_seqlen):
    """max_seqlen only sizes the grid: an underestimate (groups longer than the whole-group kernel's
    shared-memory rows: its slow path) must still be right, for every variant; D = 64 and a 600-row
    group also pass the forced group kernel's 256-row cap."""
    with tuned(cuda_attention=variant):
        for D, lengths in ((32, [150, 3, 70, 64, 65, 1]), (64, [600, 17, 129])):
            _attention_case(lengths, 2, D, torch.bfloat16, seed=max_seqlen + D, max_seqlen=max_seqlen, scale=0.2)


@pytest.mark.parametrize("variant", ["auto"] + ATTN_VARIANTS)
def test_set_attention_deterministic(variant):
    g = gen(9)
    lengths = [50, 1, 0, 200, 17] * 3
    q, k, v = _qkv(sum(lengths), 12, 32, g, torch.bfloat16)
    cu = offsets(lengths)
    with tuned(cuda_attention=variant):
        a = _kernel("set_attention")(q, k, v, cu, 200, 0.2)
        b = _kernel("set_attention")(q, k, v, cu, 200, 0.2)
    assert torch.equal(a, b)


def test_set_attention_variants_agree():
    """The variants compute the same function: on the ads-like batch their outputs agree to bf16
    rounding of the same fp32 statistics (each is also checked against fp64 above)."""
    g = gen(21)
    lengths = GROUPS["ads_like"] * 3
    q, k, v = _qkv(sum(lengths), 12, 32, g, torch.bfloat16)
    cu = offsets(lengths)
    outs = {}
    for variant in ATTN_VARIANTS:
        with tuned(cuda_attention=variant):
            outs[variant] = _kernel("set_attention")(q, k, v, cu, max(lengths), 0.2).float()
    for variant in ATTN_VARIANTS[1:]:
        rel = ((outs[variant] - outs["tile32"]).norm() / outs["tile32"].norm()).item()
        assert rel < 1e-2, (variant, rel)


def test_tuning_picks_the_raw_kernel_argument():
    """Tuning(cuda_attention=...) is the raw op's ``kernel`` argument (32, 64, 1 for the group
    kernel): the backend kernel under a tuning gives what the raw op gives with that argument."""
    from dm2s2_fast.backends.cuda import ATTENTION_KERNELS, LAYERNORM_KERNELS

    g = gen(3)
    lengths = [40, 1, 0, 90]
    q, k, v = _qkv(sum(lengths), 4, 32, g, torch.bfloat16)
    cu = offsets(lengths)
    x, res = randn(20, 384, g=g, dtype=torch.bfloat16), randn(20, 384, g=g, dtype=torch.bfloat16)
    w, b = randn(384, g=g, dtype=torch.bfloat16), randn(384, g=g, dtype=torch.bfloat16)
    for variant, number in ATTENTION_KERNELS.items():
        with tuned(cuda_attention=variant):
            got = _kernel("set_attention")(q, k, v, cu, 90, 0.2)
        assert torch.equal(got, OPS.set_attention(q, k, v, cu, 90, 0.2, number)), variant
    for variant, number in LAYERNORM_KERNELS.items():
        with tuned(cuda_layernorm=variant):
            got = _kernel("add_layernorm")(x, res, w, b, 1e-12)
        assert torch.equal(got, OPS.add_layernorm(x, res, w, b, 1e-12, number)), variant


@pytest.mark.parametrize("dtype", DTYPES, ids=harness.dtype_name)
def test_set_attention_large_scores(dtype):
    """Scores of several hundred need the max subtraction (the scale multiplies them)."""
    _attention_case([200, 3, 77, 1], 4, 32, dtype, seed=5, scale=8.0 / math.sqrt(32))


# ------------------------------------------------------------------ LayerNorm kernel variants
# "warp" (a warp per row) and "half" (a half warp per row; auto = half when the row fits): the
# op's sample inputs (tests/ops/) under each forced kernel.
LN_CASES = ["5x384", "1x384-eps1e-5", "33x13-strided-eps1e-5", "9x3", "5x1", "257x384-strided", "1000x384",
            "33x768-strided", "7x64-strided", "7x100", "5x4096-strided"]
EMBED_CASES = ["ids-d32-i64", "dense-strided-d48-i64", "dense-d3", "ids-n300-d384-int32", "dense-n300-d384-int64",
               "ids-n300-d40-int64", "dense-n300-d3-int32"]


@pytest.mark.parametrize("variant", ["warp", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=harness.dtype_name)
@pytest.mark.parametrize("case", LN_CASES)
def test_add_layernorm_variants(variant, dtype, case):
    with tuned(cuda_layernorm=variant):
        test_add_layernorm.check(case, "cuda", "cuda", dtype)


@pytest.mark.parametrize("variant", ["warp", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=harness.dtype_name)
@pytest.mark.parametrize("case", EMBED_CASES)
def test_embed_layernorm_variants(variant, dtype, case):
    with tuned(cuda_layernorm=variant):
        test_embed_layernorm.check(case, "cuda", "cuda", dtype)


# ------------------------------------------------------------------ bias_gelu, embed_layernorm
def test_bias_gelu_extremes():
    x = torch.tensor([[-30.0, -8.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 8.0, 30.0, 3e4]], device=DEV)
    b = torch.zeros(x.shape[1], device=DEV)
    out = _kernel("bias_gelu")(x, b)
    check(out, bias_gelu_reference(x.double(), b.double()), None, torch.float32, "bias_gelu extremes")


def test_embed_layernorm_bad_index_never_reads_out_of_bounds():
    """The raw op does not sync to validate indices (the public op does): a bad index must give a
    NaN row (or skip the write for a bad out_row), never a fault."""
    g = gen(4)
    n, d = 6, 16
    positions = torch.randint(0, 64, (n,), generator=g).to(DEV)
    type_ids = torch.randint(0, 4, (n,), generator=g).to(DEV)
    pos, typ = randn(64, d, g=g), randn(4, d, g=g)
    w, b = randn(d, g=g) * 0.5 + 1, randn(d, g=g)
    ids, table = torch.randint(0, 50, (n,), generator=g).to(DEV), randn(50, d, g=g)
    ids[2] = 10**9
    out = torch.zeros(7, d, device=DEV)
    out_rows = torch.tensor([0, 1, 2, 3, 4, 99], device=DEV)
    OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, ids, table, None, out, out_rows)
    torch.cuda.synchronize()
    assert bool(out[2].isnan().all())
    assert bool(torch.isfinite(out[[0, 1, 3, 4]]).all())
    assert bool((out[5:] == 0).all())
    ref = embed_layernorm_reference(positions[[0, 1, 3, 4]], type_ids[[0, 1, 3, 4]], pos, typ, w, b, 1e-12,
                                    ids[[0, 1, 3, 4]], table, None, None, None)
    assert rel_err(out[[0, 1, 3, 4]], ref) <= 1e-5


# ------------------------------------------------------------------ IntraMRA / InterMRA / mra_pool
def _scorer(a, d, g, dtype):
    return (randn(a, d, g=g, scale=1.0 / math.sqrt(d), dtype=dtype), randn(a, g=g, scale=0.3, dtype=dtype),
            randn(a, g=g, scale=0.5, dtype=dtype))


def test_intra_mra_shared_memory_across_sizes():
    """The score kernel's shared memory depends on the row count (its column split); the limit set
    for a larger call must survive a smaller one in between (10000 rows: 50688 B, 5000: 49664 B),
    and a wide W (a = 17792: 139 chunks, prime, so one split would hold them all) must stay inside
    the 227 KB block limit."""
    dtype = torch.bfloat16
    for N, d, a in ((10000, 384, 384), (5000, 384, 384), (10000, 384, 384), (40000, 64, 17792)):
        g = gen(N + a)
        h = randn(N, d, g=g, dtype=dtype)
        cu = offsets([N // 2, N - N // 2])
        W, c, v = _scorer(a, d, g, dtype)
        z, alpha = _kernel("intra_mra")(h, cu, W, c, v)
        z64, a64 = intra_mra_reference(h.double(), cu, W.double(), c.double(), v.double())
        zr, ar = intra_mra_reference(h, cu, W, c, v)
        check(z, z64, zr, dtype, f"intra_mra z N={N} a={a}")
        check(alpha, a64, ar, dtype, f"intra_mra alpha N={N} a={a}")


def test_mra_deterministic_and_weights_sum_to_one():
    import test_mra

    h, cu_seg, cu_smp, W, c, v, U, gg, u = test_mra.CASES["ads-b40"](DEV, torch.bfloat16)["mra_pool"]
    z1, a1 = OPS.intra_mra(h, cu_seg, W, c, v)
    z2, a2 = OPS.intra_mra(h, cu_seg, W, c, v)
    assert torch.equal(z1, z2) and torch.equal(a1, a2)
    r1, b1 = OPS.inter_mra(z1, cu_smp, U, gg, u)
    r2, b2 = OPS.inter_mra(z1, cu_smp, U, gg, u)
    assert torch.equal(r1, r2) and torch.equal(b1, b2)
    lengths = (cu_seg[1:] - cu_seg[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=DEV), lengths)
    sums = torch.zeros(lengths.numel(), dtype=torch.float64, device=DEV).index_add_(0, ids, a1.double())
    present = lengths > 0
    assert torch.allclose(sums[present], torch.ones_like(sums[present]), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=harness.dtype_name)
@pytest.mark.parametrize("samples", [[2, 0, 3, 1, 4], [1], [0, 0], [], [4] * 300], ids=lambda s: f"B{len(s)}")
def test_inter_mra_on_segment_counts(dtype, samples):
    g = gen(len(samples) + 17)
    S, d, a = sum(samples), 64, 48
    z = randn(S, d, g=g, dtype=dtype)
    cu = offsets(samples)
    U, gg, u = _scorer(a, d, g, dtype)
    harness.poison(DEV, ((len(samples), d), dtype), ((S,), torch.float32))
    r, beta = _kernel("inter_mra")(z, cu, U, gg, u)
    r64, b64 = inter_mra_reference(z.double(), cu, U.double(), gg.double(), u.double())
    rr, br = (None, None) if dtype == torch.float32 else inter_mra_reference(z, cu, U, gg, u)
    check(r, r64, rr, dtype, f"inter_mra r {samples[:6]} {dtype}")
    check(beta, b64, br, dtype, f"inter_mra beta {samples[:6]} {dtype}")
    if 0 in samples:
        empty = torch.tensor([s == 0 for s in samples], device=DEV)
        assert bool((r[empty] == 0).all()), "a sample with no segment must pool to 0"


# ------------------------------------------------------------------ streams, graphs
def test_ops_run_on_the_current_stream():
    """Inputs finished on a side stream only after a long sleep: an op launched on another stream
    would read them early and differ from the reference."""
    g = gen(2)
    lengths = [40, 1, 90]
    N, H, D, d = sum(lengths), 4, 32, 64
    cu = offsets(lengths)
    base = randn(N, 3, H, D, g=g, dtype=torch.bfloat16)
    x0, r0 = randn(N, d, g=g, dtype=torch.bfloat16), randn(N, d, g=g, dtype=torch.bfloat16)
    w, b = randn(d, g=g, dtype=torch.bfloat16), randn(d, g=g, dtype=torch.bfloat16)
    W, c, v = _scorer(d, d, g, torch.bfloat16)
    expect_attn = OPS.set_attention(*(base * 2).unbind(1), cu, 90, 0.3)
    expect_ln = OPS.add_layernorm(x0 * 2, r0, w, b, 1e-12)
    expect_z, expect_a = OPS.intra_mra(x0 * 2, cu, W, c, v)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        qkv, x = base.clone(), x0.clone()
        torch.cuda._sleep(50_000_000)
        qkv.mul_(2)
        x.mul_(2)
        attn = OPS.set_attention(*qkv.unbind(1), cu, 90, 0.3)
        ln = OPS.add_layernorm(x, r0, w, b, 1e-12)
        z, alpha = OPS.intra_mra(x, cu, W, c, v)
    side.synchronize()
    assert torch.equal(attn, expect_attn)
    assert torch.equal(ln, expect_ln)
    assert torch.equal(z, expect_z) and torch.equal(alpha, expect_a)


@pytest.mark.parametrize("variant", ["auto", "group"])
def test_cuda_graph_capture(variant):
    g = gen(8)
    lengths = [23, 115, 1, 0, 60]
    N, H, D, d = sum(lengths), 12, 32, 384
    cu = offsets(lengths)
    cu_smp = offsets([2, 0, 3])
    qkv = randn(N, 3, H, D, g=g, dtype=torch.bfloat16)
    res = randn(N, d, g=g, dtype=torch.bfloat16)
    w, b = randn(d, g=g, dtype=torch.bfloat16), randn(d, g=g, dtype=torch.bfloat16)
    W, c, v = _scorer(d, d, g, torch.bfloat16)
    attention, layernorm, mra_pool = _kernel("set_attention"), _kernel("add_layernorm"), _kernel("mra_pool")

    def step():
        attn = attention(*qkv.unbind(1), cu, 115, 0.2)
        ln = layernorm(attn.view(N, d), res, w, b, 1e-12)
        return (attn, ln) + tuple(mra_pool(ln, cu, cu_smp, W, c, v, W, c, v))

    with tuned(cuda_attention=variant):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (one-time attribute settings) outside the capture
            eager = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    for e, o in zip(eager, captured):
        assert torch.equal(e, o)


# ------------------------------------------------------------------ dispatch
def test_dispatch_refusals():
    x, b = torch.randn(4, 8, device=DEV), torch.randn(8, device=DEV)
    assert dispatch.resolve("bias_gelu", "cuda", DEV, (x, b))[0] == "cuda"
    with pytest.raises(BackendUnavailable, match="cuda kernels take float32/float16/bfloat16, got float64 "
                                                 r"\(use backend='torch' for fp64\)"):
        dispatch.resolve("bias_gelu", "cuda", DEV, (x.double(), b.double()))
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        with pytest.raises(BackendUnavailable, match="autograd"):
            dispatch.resolve("bias_gelu", "cuda", DEV, (xg, b))
    q = torch.randn(3, 1, 300, device=DEV)
    with pytest.raises(BackendUnavailable, match="head_dim <= 256, got 300"):
        dispatch.resolve("set_attention", "cuda", DEV, (q, q, q, offsets([3]), 3, 0.1))
    with pytest.raises(BackendUnavailable, match="cuda runs on cuda, not cpu"):
        dispatch.resolve("bias_gelu", "cuda", "cpu", (x.cpu(), b.cpu()))
    # the linear layers: cuBLAS's GEMM, then this backend's epilogue kernel
    assert dispatch.resolve("linear", "cuda", DEV)[1] is torch.nn.functional.linear
