"""The ``triton`` backend's kernels vs the torch-backend reference (DESIGN §3, §5).

Each kernel runs on random ragged inputs (length-1 and empty groups, samples without segments, a long
tail, N = 0) and is compared with an fp64 run of the torch-backend reference: fp32 within 1e-5,
fp16/bf16 within 2x the error of the reference itself run in that dtype (and <= 2e-2); outputs that
are fp32 even for half inputs (α, β) keep a 1e-5 floor. NaN never passes: every output must be finite,
and in-place outputs start poisoned with NaN.

Devices: ``cpu`` under Triton's interpreter (``TRITON_INTERPRET=1``, set below when there is no GPU,
before anything imports triton) and ``cuda`` when a GPU is present; the same tests run on both.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first import of dm2s2_fast.triton (its @triton.jit picks interpreted kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from conftest import rel_err, skip_unless_required  # noqa: E402
from dm2s2_fast import backends, ops  # noqa: E402

INTERPRET = backends.triton_interpret()
ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_triton_backend():
    try:
        return importlib.import_module("dm2s2_fast.triton")
    except ImportError:
        return None


TRITON = _load_triton_backend()


def triton_module(name: str):
    """dm2s2_fast.triton.<name>, or a skip that says why the triton backend cannot load here
    (test_backend_loads_where_it_should fails where that is a set-up mistake)."""
    if TRITON is None or TRITON.UNAVAILABLE is not None:
        pytest.skip(f"triton backend unavailable: {TRITON.UNAVAILABLE if TRITON else 'no module'}")
    return importlib.import_module(f"dm2s2_fast.triton.{name}")


def _devices():
    reason = backends.why_not("triton", "add_layernorm", "cuda" if not INTERPRET else "cpu")
    params = []
    if INTERPRET:
        params.append(pytest.param("cpu", marks=pytest.mark.skipif(
            reason is not None, reason=f"triton backend unavailable: {reason}")))
    elif torch.cuda.is_available():
        params.append(pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
            reason is not None, reason=f"triton backend unavailable: {reason}")]))
    if not params:
        params.append(pytest.param("cuda", marks=pytest.mark.skip(
            reason="no CUDA device and TRITON_INTERPRET is off: Triton kernels cannot run here")))
    return params


DEVICES = _devices()
device_param = pytest.mark.parametrize("device", DEVICES)
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])


# ----------------------------------------------------------------------------------------- parity

def check(name: str, out: torch.Tensor, ref64: torch.Tensor, own: torch.Tensor, dtype: torch.dtype) -> float:
    """``out`` vs the fp64 reference; ``own`` is the reference run in ``dtype``. Returns the error."""
    assert torch.isfinite(out).all(), f"{name}: output holds NaN/inf (unwritten or overflowed)"
    err = rel_err(out, ref64)
    if dtype == torch.float32:
        bound = 1e-5
    else:
        bound = min(2e-2, max(2 * rel_err(own, ref64), 1e-5))
    assert err <= bound, f"{name} [{dtype}]: rel err {err:.2e} > bound {bound:.2e}"
    return err


def to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double().cpu()
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return x


def cu_from(lengths, device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def on(device, dtype, *tensors):
    return [t.to(device=device, dtype=dtype) for t in tensors]


# --------------------------------------------------------------------------------- set_attention

ATTN_CASES = {
    # name: (group lengths, heads, head_dim)
    "ragged-d32": ([0, 1, 5, 17, 0, 40, 3, 1, 70, 2], 2, 32),  # mean 14: packed tiles
    "long-d32": ([45, 1, 80, 0, 33, 150], 2, 32),  # mean 52: per-group tiles, several q/kv blocks
    "short-d64": ([3, 1, 12, 4, 0, 7, 2, 9, 30, 1, 5, 6], 2, 64),
    "d128": ([33, 130, 1], 1, 128),
    "d48-odd": ([20, 9, 1, 44], 3, 48),
}


def _attn_inputs(case, device, dtype, seed=0):
    lengths, heads, head_dim = ATTN_CASES[case]
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    # q/k/v are views into one [N, 3, H, D] projection, as the engine passes them (strided rows).
    qkv = torch.randn(n, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    cu = cu_from(lengths, device)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max(lengths)


@device_param
@dtype_param
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_set_attention(device, dtype, case):
    q, k, v, cu, max_len = _attn_inputs(case, device, dtype)
    assert not q.is_contiguous()
    out = ops.set_attention(q, k, v, cu, max_len, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    ref64 = ops.set_attention(*map(to64, (q, k, v, cu)), max_len, backend="torch")
    own = ops.set_attention(*(t.cpu() for t in (q, k, v, cu)), max_len, backend="torch") \
        if dtype != torch.float32 else ref64
    check(f"set_attention/{case}", out, ref64, own, dtype)


@device_param
@pytest.mark.parametrize("mode", ["packed,32,32,4,2", "group,16,16,4,2", "group,64,32,4,1", "packed,16,64,4,2"])
@pytest.mark.parametrize("case", ["ragged-d32", "long-d32"])
def test_set_attention_tilings(device, mode, case, monkeypatch):
    """Both tilings (and other tile shapes) give the same answer on short and long groups."""
    monkeypatch.setenv("DM2S2_TRITON_ATTN", mode)
    q, k, v, cu, max_len = _attn_inputs(case, device, torch.float32, seed=1)
    out = ops.set_attention(q, k, v, cu, max_len, backend="triton")
    ref64 = ops.set_attention(*map(to64, (q, k, v, cu)), max_len, backend="torch")
    check(f"set_attention/{case}/{mode}", out, ref64, ref64, torch.float32)


@device_param
def test_set_attention_scale_and_contiguous(device):
    q, k, v, cu, max_len = _attn_inputs("ragged-d32", device, torch.float32, seed=2)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = ops.set_attention(q, k, v, cu, max_len, scale=0.3, backend="triton")
    ref64 = ops.set_attention(*map(to64, (q, k, v, cu)), max_len, scale=0.3, backend="torch")
    check("set_attention/scale", out, ref64, ref64, torch.float32)


@device_param
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0], [1], [1, 1, 1]], ids=str)
def test_set_attention_degenerate(device, lengths):
    n = sum(lengths)
    q = torch.randn(n, 2, 32, device=device)
    cu = cu_from(lengths, device)
    out = ops.set_attention(q, q, q, cu, max(lengths, default=0), backend="triton")
    assert out.shape == (n, 2, 32)
    if n:  # a group of one: softmax weight 1 on itself, out = v
        torch.testing.assert_close(out, q, rtol=1e-6, atol=1e-6)


@device_param
def test_set_attention_odd_arguments(device):
    """Valid but unusual calls: offsets read through a strided view, a max_seqlen far above the
    longest group (its q-block index once overflowed int32 in the kernel), and a scale whose log2
    form leaves fp32 (declined, so auto falls back)."""
    q, k, v, cu, max_len = _attn_inputs("long-d32", device, torch.float32, seed=2)
    ref64 = ops.set_attention(*map(to64, (q, k, v, cu)), max_len, backend="torch")
    strided_cu = torch.stack([cu, torch.full_like(cu, 7)], 1)[:, 0]
    assert not strided_cu.is_contiguous()
    for offsets, bound in ((strided_cu, max_len), (cu, 2 ** 31 - 1)):
        out = ops.set_attention(q, k, v, offsets, bound, backend="triton")
        check("set_attention odd call", out, ref64, ref64, torch.float32)
    with pytest.raises(backends.BackendUnavailable, match="scale"):
        ops.set_attention(q, k, v, cu, max_len, 3e38, backend="triton")


@device_param
def test_mra_odd_arguments(device):
    """Offsets and score vectors through strided or expanded views are read as their values; score
    widths past the unrolled partial-sum limit are declined with the reason."""
    MP = triton_module("mra_pool")
    h, cu_seg, cu_smp, W, c, v, U, gg, u = _mra_inputs("ragged", device, torch.float32, seed=4)
    z64, a64 = ops.intra_mra(*map(to64, (h, cu_seg, W, c, v)), backend="torch")
    strided = [torch.stack([t, torch.zeros_like(t)], 1)[:, 0] for t in (cu_seg, c, v)]
    z, alpha = ops.intra_mra(h, strided[0], W, strided[1], strided[2], backend="triton")
    check("intra_mra.z strided", z, z64, z64, torch.float32)
    check("intra_mra.alpha strided", alpha, a64, a64, torch.float32)
    const_c = torch.tensor(0.3, device=device).expand(c.shape[0])
    z, alpha = ops.intra_mra(h, cu_seg, W, const_c, v, backend="triton")
    z64, a64 = ops.intra_mra(*map(to64, (h, cu_seg, W, const_c.contiguous(), v)), backend="torch")
    check("intra_mra.z expanded c", z, z64, z64, torch.float32)
    wide = torch.randn(MP.MAX_SCORE_WIDTH + 1, h.shape[1], device=device)
    ones = torch.ones(wide.shape[0], device=device)
    with pytest.raises(backends.BackendUnavailable, match="score widths"):
        ops.intra_mra(h, cu_seg, wide, ones, ones, backend="triton")
    r, beta = ops.inter_mra(z, cu_smp, U, gg, u, backend="triton")
    r64, b64 = ops.inter_mra(*map(to64, (z, cu_smp, U, gg, u)), backend="torch")
    check("inter_mra.r", r, r64, r64, torch.float32)


@pytest.mark.parametrize("name,spec", [
    ("DM2S2_TRITON_ATTN", "group,8,16,4,2"), ("DM2S2_TRITON_ATTN", "group,64,48,4,2"),
    ("DM2S2_TRITON_ATTN", "group,64,64,3,2"), ("DM2S2_TRITON_ATTN", "tiles"),
    ("DM2S2_TRITON_MRA", "tile:64,8,32,4,2"), ("DM2S2_TRITON_MRA", "tile:a,b")])
def test_forced_configs_that_cannot_compile_are_refused(name, spec, monkeypatch):
    SA, MP = triton_module("set_attention"), triton_module("mra_pool")
    monkeypatch.setenv(name, spec)
    with pytest.raises(ValueError, match=name):
        (SA.pick_config(100, 4, 30, 32, torch.float32) if name == "DM2S2_TRITON_ATTN"
         else MP.tile_config(torch.float32, 100, 32, 32))


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv / next_pow2 (Triton 3.6's cost ~2 µs a call on the host)
    give what triton.cdiv / triton.next_power_of_2 give, so no launch config changes."""
    triton_module("add_layernorm")
    import triton

    from dm2s2_fast._intmath import cdiv, next_pow2
    for x in list(range(0, 4200)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 3 * 2 ** 40 + 7]:
        assert next_pow2(x) == triton.next_power_of_2(x), x
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(x, b) == triton.cdiv(x, b), (x, b)
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(-70, 0) for b in (1, 3, 16))


def test_pick_config():
    pick_config = triton_module("set_attention").pick_config

    # ads set attention: ~113-row samples -> per-group tiles of 64
    packed, bm, bn, warps, _ = pick_config(29000, 256, 230, 32, torch.bfloat16)
    assert not packed and (bm, bn) == (64, 32)  # 32-wide key tiles at D = 32 (the H200's fastest)
    assert pick_config(29000, 256, 230, 64, torch.bfloat16)[1:3] == (64, 64)
    # ads modality attention: ~30-row segments (4-12 categories, up to 118 descriptions) -> packed
    packed, bm, bn, _, _ = pick_config(29000, 985, 118, 32, torch.bfloat16)
    assert packed and bm <= 32
    # short groups only: tiles follow max_seqlen down to 16
    packed, bm, bn, _, _ = pick_config(600, 100, 9, 64, torch.float16)
    assert not packed and (bm, bn) == (16, 16)
    # the test cases above cover both modes
    assert pick_config(137, 8, 70, 32, torch.float32)[0]  # "ragged-d32"
    assert not pick_config(309, 5, 150, 32, torch.float32)[0]  # "long-d32"


# ---------------------------------------------------------------------------------------- MRA

MRA_CASES = {
    # name: (segment lengths per sample, d, a)
    "ragged": ([[3, 1, 5], [], [0, 2], [7], [1, 1, 1, 1], [12, 0, 30]], 32, 24),
    "many-segments": ([[2] * 18 + [1, 5], [4, 3], []], 48, 40),  # > 16 segments: several tiles
    "wide": ([[25, 3], [1], [9, 9, 9]], 96, 80),
    "all-empty": ([[0, 0], [], [0]], 32, 16),  # N = 0 with segments: z = 0, β uniform
}


def _mra_inputs(case, device, dtype, seed=0):
    samples, d, a = MRA_CASES[case]
    g = torch.Generator().manual_seed(seed)
    seg_lengths = [n for s in samples for n in s]
    n = sum(seg_lengths)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h = rnd(n, d)
    W, c, v = rnd(a, d, scale=0.4), rnd(a, scale=0.2), rnd(a, scale=1.5)
    U, gg, u = rnd(a, d, scale=0.4), rnd(a, scale=0.2), rnd(a, scale=1.5)
    return h, cu_from(seg_lengths, device), cu_from([len(s) for s in samples], device), W, c, v, U, gg, u


MRA_FIELDS = ("z", "r", "alpha", "beta")


@device_param
@dtype_param
@pytest.mark.parametrize("case", list(MRA_CASES))
def test_mra_pool(device, dtype, case):
    args = _mra_inputs(case, device, dtype)
    out = ops.mra_pool(*args, backend="triton")
    ref64 = ops.mra_pool(*map(to64, args), backend="torch")
    own = ops.mra_pool(*(t.cpu() for t in args), backend="torch") if dtype != torch.float32 else ref64
    for name, o, r, w in zip(MRA_FIELDS, out, ref64, own):
        want = torch.float32 if name in ("alpha", "beta") else dtype
        assert o.dtype == want and o.device.type == device, (name, o.dtype, o.device)
        check(f"mra_pool.{name}/{case}", o, r, w, dtype)


@device_param
@dtype_param
@pytest.mark.parametrize("case", ["ragged", "many-segments", "all-empty"])
def test_intra_inter_mra(device, dtype, case):
    h, cu_seg, cu_smp, W, c, v, U, gg, u = _mra_inputs(case, device, dtype, seed=3)
    z, alpha = ops.intra_mra(h, cu_seg, W, c, v, backend="triton")
    z64, a64 = ops.intra_mra(*map(to64, (h, cu_seg, W, c, v)), backend="torch")
    zo, ao = ops.intra_mra(*(t.cpu() for t in (h, cu_seg, W, c, v)), backend="torch")
    check(f"intra_mra.z/{case}", z, z64, zo, dtype)
    check(f"intra_mra.alpha/{case}", alpha, a64, ao, dtype)
    # InterMRA on the reference's own z (so the comparison is of this op alone)
    zin = zo.to(device)
    r, beta = ops.inter_mra(zin, cu_smp, U, gg, u, backend="triton")
    r64, b64 = ops.inter_mra(*map(to64, (zin, cu_smp, U, gg, u)), backend="torch")
    ro, bo = ops.inter_mra(*(t.cpu() for t in (zin, cu_smp, U, gg, u)), backend="torch")
    check(f"inter_mra.r/{case}", r, r64, ro, dtype)
    check(f"inter_mra.beta/{case}", beta, b64, bo, dtype)
    assert alpha.dtype == beta.dtype == torch.float32 and z.dtype == r.dtype == dtype


MRA_MODES = [  # (DM2S2_TRITON_MRA, dtype)
    ("tile", torch.float32), ("tile", torch.bfloat16), ("tile-fused", torch.bfloat16),
    ("rows", torch.float32), ("rows", torch.bfloat16),
    ("tile:16,32,32,4,2", torch.float32), ("tile:32,16,64,4,3", torch.bfloat16)]


@device_param
@pytest.mark.parametrize("mode,dtype", MRA_MODES, ids=lambda x: x if isinstance(x, str) else str(x)[6:])
@pytest.mark.parametrize("case", ["many-segments", "wide"])
def test_mra_modes(device, dtype, mode, case, monkeypatch):
    """Every DM2S2_TRITON_MRA variant (and tile shapes giving several partial-score blocks, ragged
    last a/k blocks) gives the same answer, for mra_pool and for intra_mra / inter_mra."""
    monkeypatch.setenv("DM2S2_TRITON_MRA", mode)
    args = _mra_inputs(case, device, dtype, seed=5)
    out = ops.mra_pool(*args, backend="triton")
    ref64 = ops.mra_pool(*map(to64, args), backend="torch")
    own = ops.mra_pool(*(t.cpu() for t in args), backend="torch") if dtype != torch.float32 else ref64
    for name, o, r, w in zip(MRA_FIELDS, out, ref64, own):
        check(f"mra_pool.{name}/{case}/{mode}", o, r, w, dtype)
    h, cu_seg, cu_smp, W, c, v = args[:6]
    z, alpha = ops.intra_mra(h, cu_seg, W, c, v, backend="triton")
    r, beta = ops.inter_mra(z, cu_smp, *args[6:], backend="triton")
    if mode == "tile" or mode.startswith("tile:"):
        # mra_pool is intra_mra then inter_mra here: the same launches, bitwise the same answer
        for name, a, b in zip(MRA_FIELDS, (z, r, alpha, beta), out):
            assert torch.equal(a, b), f"{name}/{case}/{mode}: intra+inter differs from mra_pool"
    else:
        z64, a64 = ops.intra_mra(*map(to64, (h, cu_seg, W, c, v)), backend="torch")
        check(f"intra_mra.z/{case}/{mode}", z, z64, own[0], dtype)
        check(f"intra_mra.alpha/{case}/{mode}", alpha, a64, own[2], dtype)


@device_param
@pytest.mark.parametrize("spec,dtype", [("16,8,3", torch.bfloat16), ("2,1,2", torch.float32)], ids=str)
def test_mra_pool_pipelined_variants(device, spec, dtype, monkeypatch):
    """DM2S2_TRITON_MRA_POOL's pooling-loop variants (2 rows a step: many steps per segment) agree."""
    monkeypatch.setenv("DM2S2_TRITON_MRA_POOL", spec)
    h, cu_seg, _, W, c, v = _mra_inputs("many-segments", device, dtype, seed=6)[:6]
    z, alpha = ops.intra_mra(h, cu_seg, W, c, v, backend="triton")
    z64, a64 = ops.intra_mra(*map(to64, (h, cu_seg, W, c, v)), backend="torch")
    own = (z64, a64) if dtype == torch.float32 else \
        ops.intra_mra(*(t.cpu() for t in (h, cu_seg, W, c, v)), backend="torch")
    check(f"intra_mra.z/pool {spec}", z, z64, own[0], dtype)
    check(f"intra_mra.alpha/pool {spec}", alpha, a64, own[1], dtype)


def test_mra_pool_variant_parse(monkeypatch):
    MP = triton_module("mra_pool")

    monkeypatch.setenv("DM2S2_TRITON_MRA_POOL", "16,8,2")
    assert MP._pool_launch_config(384, torch.bfloat16) == (512, 16, 8, 2)
    monkeypatch.delenv("DM2S2_TRITON_MRA_POOL")
    # defaults: half precision 32 KB pipelined row blocks (the H200's fastest), fp32 unpipelined
    assert MP._pool_launch_config(384, torch.bfloat16) == (512, 32, 4, 3)
    assert MP._pool_launch_config(768, torch.float16) == (1024, 16, 4, 3)
    assert MP._pool_launch_config(16, torch.float16) == (16, 64, 4, 3)
    assert MP._pool_launch_config(384, torch.float32) == (512, 16, 8, 1)
    for bad in ("3,4,2", "16,3,2", "16,4", "x"):
        monkeypatch.setenv("DM2S2_TRITON_MRA_POOL", bad)
        with pytest.raises(ValueError, match="DM2S2_TRITON_MRA_POOL"):
            MP._pool_launch_config(384, torch.bfloat16)


def test_mra_tile_config():
    tile_config = triton_module("mra_pool").tile_config

    # ads IntraMRA (26k rows): 128x128x64 bf16 tiles, 8 warps, 3 stages (621 programs)
    assert tile_config(torch.bfloat16, 26417, 384, 384) == (128, 128, 64, 8, 3)
    # ads InterMRA (~1k segments): 128-row tiles would make 24 programs for 132 SMs -> 64 rows
    assert tile_config(torch.bfloat16, 974, 384, 384) == (64, 128, 64, 4, 3)
    assert tile_config(torch.float32, 26417, 384, 384) == (64, 64, 32, 4, 2)
    # tiny problems: tiles follow n down to 16
    assert tile_config(torch.float16, 5, 32, 24)[:3] == (16, 32, 32)


def test_mra_mode_parse(monkeypatch):
    MP = triton_module("mra_pool")

    monkeypatch.setenv("DM2S2_TRITON_MRA", "tile:64,64,32,4,2")
    assert MP._mode() == ("tile", (64, 64, 32, 4, 2))
    assert MP.tile_config(torch.bfloat16, 26417, 384, 384) == (64, 64, 32, 4, 2)
    monkeypatch.setenv("DM2S2_TRITON_MRA", "bogus")
    with pytest.raises(ValueError, match="DM2S2_TRITON_MRA"):
        MP._mode()


@device_param
def test_mra_pool_weights_sum_to_one(device):
    h, cu_seg, cu_smp, W, c, v, U, gg, u = _mra_inputs("ragged", device, torch.float32, seed=4)
    z, r, alpha, beta = ops.mra_pool(h, cu_seg, cu_smp, W, c, v, U, gg, u, backend="triton")
    seg_len = (cu_seg[1:] - cu_seg[:-1]).long().cpu()
    sums = torch.zeros(len(seg_len), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(len(seg_len)), seg_len), alpha.double().cpu())
    torch.testing.assert_close(sums[seg_len > 0], torch.ones(int((seg_len > 0).sum()), dtype=torch.float64))
    n_seg = (cu_smp[1:] - cu_smp[:-1]).long().cpu()
    assert torch.all(r.cpu()[n_seg == 0] == 0), "a sample with no segments must pool to r = 0"


@device_param
def test_mra_degenerate(device):
    d, a = 32, 16
    W = torch.randn(a, d, device=device)
    c, v = torch.randn(a, device=device), torch.randn(a, device=device)
    empty_i = torch.zeros(1, dtype=torch.int32, device=device)
    z, r, alpha, beta = ops.mra_pool(torch.empty(0, d, device=device), empty_i, empty_i, W, c, v, W, c, v,
                                     backend="triton")
    assert z.shape == (0, d) and r.shape == (0, d) and alpha.shape == (0,) and beta.shape == (0,)
    # samples without any segment at all
    cu_smp = torch.zeros(4, dtype=torch.int32, device=device)
    z, r, alpha, beta = ops.mra_pool(torch.empty(0, d, device=device), empty_i, cu_smp, W, c, v, W, c, v,
                                     backend="triton")
    assert r.shape == (3, d) and torch.all(r == 0)


# ------------------------------------------------------------------ embed / add_layernorm / gelu

@device_param
@dtype_param
@pytest.mark.parametrize("source", ["ids", "dense"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("d", [32, 48])
def test_embed_layernorm(device, dtype, source, index_dtype, d):
    g = torch.Generator().manual_seed(d)
    n, P, T, R = 29, 40, 3, 50

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    pt, tt, weight, bias = rnd(P, d), rnd(T, d, scale=0.5), rnd(d, scale=0.3) + 1, rnd(d, scale=0.1)
    idx = dict(device=device, dtype=index_dtype)
    positions = torch.randint(0, P, (n,), generator=g).to(**idx)
    type_ids = torch.randint(0, T, (n,), generator=g).to(**idx)
    if source == "ids":
        content = dict(ids=torch.randint(0, R, (n,), generator=g).to(**idx), table=rnd(R, d))
    else:
        content = dict(dense=rnd(n, 2 * d)[:, d:])  # strided rows, as a projection slice
    args = (positions, type_ids, pt, tt, weight, bias, 1e-12)
    args64 = tuple(map(to64, args))
    content64 = {k: to64(t) for k, t in content.items()}
    ref64 = ops.embed_layernorm(*args64, **content64, backend="torch")
    own = ops.embed_layernorm(*(to64(a) if not isinstance(a, torch.Tensor) else a.cpu() for a in args),
                              **{k: t.cpu() for k, t in content.items()}, backend="torch")

    new = ops.embed_layernorm(*args, **content, backend="triton")
    assert new.shape == (n, d) and new.dtype == dtype
    check(f"embed_layernorm/{source}", new, ref64, own, dtype)

    # in place, scattered to distinct rows of a NaN-poisoned packed buffer
    total = n + 11
    out = torch.full((total, d), float("nan"), device=device, dtype=dtype)
    out_rows = torch.randperm(total, generator=g)[:n].to(**idx)
    res = ops.embed_layernorm(*args, **content, out=out, out_rows=out_rows, backend="triton")
    assert res is out
    rows = out_rows.long().cpu()
    check(f"embed_layernorm/{source}/out", out.cpu()[rows], ref64, own, dtype)
    untouched = torch.ones(total, dtype=torch.bool)
    untouched[rows] = False
    assert torch.isnan(out.cpu()[untouched]).all(), "rows outside out_rows were written"


@device_param
def test_embed_layernorm_empty(device):
    d = 32
    pt, tt = torch.randn(8, d, device=device), torch.randn(2, d, device=device)
    w, b = torch.ones(d, device=device), torch.zeros(d, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    y = ops.embed_layernorm(none, none, pt, tt, w, b, 1e-12, ids=none, table=pt, backend="triton")
    assert y.shape == (0, d)
    out = torch.full((3, d), float("nan"), device=device)
    ops.embed_layernorm(none, none, pt, tt, w, b, 1e-12, dense=torch.zeros(0, d, device=device),
                        out=out, out_rows=none, backend="triton")
    assert torch.isnan(out).all()


@device_param
@dtype_param
@pytest.mark.parametrize("shape", [(37, 32), (5, 384), (3, 48), (0, 32)], ids=str)
def test_add_layernorm(device, dtype, shape):
    g = torch.Generator().manual_seed(shape[1])
    n, d = shape
    big = torch.randn(n, d + 8, generator=g).to(device=device, dtype=dtype)
    x = big[:, 4:4 + d]  # strided rows
    res = (torch.randn(n, d, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(device=device, dtype=dtype)
    out = ops.add_layernorm(x, res, w, b, 1e-12, backend="triton")
    assert out.shape == (n, d) and out.dtype == dtype
    if n == 0:
        return
    ref64 = ops.add_layernorm(*map(to64, (x, res, w, b)), 1e-12, backend="torch")
    own = ops.add_layernorm(*(t.cpu() for t in (x, res, w, b)), 1e-12, backend="torch")
    check("add_layernorm", out, ref64, own, dtype)


@device_param
@dtype_param
@pytest.mark.parametrize("shape", [(37, 128), (5, 1536), (3, 100), (0, 64)], ids=str)
def test_bias_gelu(device, dtype, shape):
    g = torch.Generator().manual_seed(shape[1])
    n, f = shape
    big = (torch.randn(n, f + 3, generator=g) * 3).to(device=device, dtype=dtype)
    x = big[:, :f]  # strided rows
    bias = torch.randn(f, generator=g).to(device=device, dtype=dtype)
    out = ops.bias_gelu(x, bias, backend="triton")
    assert out.shape == (n, f) and out.dtype == dtype
    if n == 0:
        return
    ref64 = ops.bias_gelu(to64(x), to64(bias), backend="torch")
    own = ops.bias_gelu(x.cpu(), bias.cpu(), backend="torch")
    check("bias_gelu", out, ref64, own, dtype)


# ------------------------------------------------------------------------ registry and dispatch

def test_backend_loads_where_it_should():
    """Under the interpreter (CI without a GPU) or on a GPU, the backend must load: the kernel tests
    above must not all be skipped for a set-up mistake such as importing triton before setting
    TRITON_INTERPRET=1."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is off")
    reason = backends.why_not("triton", "add_layernorm", "cpu" if INTERPRET else "cuda")
    if reason and "not importable" in reason:
        skip_unless_required("triton", reason)
    assert reason is None, reason


KERNELS = {
    "set_attention": "set_attention_triton", "embed_layernorm": "embed_layernorm_triton",
    "add_layernorm": "add_layernorm_triton", "bias_gelu": "bias_gelu_triton",
    "intra_mra": "intra_mra_triton", "inter_mra": "inter_mra_triton", "mra_pool": "mra_pool_triton",
}
MODULES = {"set_attention": "set_attention", "embed_layernorm": "embed_layernorm",
           "add_layernorm": "add_layernorm", "bias_gelu": "bias_gelu", "intra_mra": "mra_pool",
           "inter_mra": "mra_pool", "mra_pool": "mra_pool"}


@device_param
@pytest.mark.parametrize("op", list(KERNELS))
def test_resolve_gives_triton_kernel(device, op):
    name, fn = backends.resolve(op, "triton", device)
    module = importlib.import_module(f"dm2s2_fast.triton.{MODULES[op]}")
    assert name == "triton" and fn is getattr(module, KERNELS[op])


@device_param
def test_dispatch_runs_triton_kernel(device, monkeypatch):
    """ops.*(backend="triton") goes through the registry to this backend's kernel and its launch."""
    import dm2s2_fast.triton.add_layernorm as mod

    launches = []
    real = mod._launch
    monkeypatch.setattr(mod, "_launch", lambda *a: launches.append(1) or real(*a))
    x = torch.randn(4, 32, device=device)
    w, b = torch.ones(32, device=device), torch.zeros(32, device=device)
    ops.add_layernorm(x, x, w, b, 1e-5, backend="triton")
    assert launches == [1]


@device_param
def test_supports_refuses_fp64(device):
    x = torch.randn(4, 32, device=device, dtype=torch.float64)
    w = torch.ones(32, device=device, dtype=torch.float64)
    with pytest.raises(backends.BackendUnavailable, match="float64"):
        ops.add_layernorm(x, x, w, w, 1e-5, backend="triton")
    q = torch.randn(3, 1, 512, device=device)
    with pytest.raises(backends.BackendUnavailable, match="head dim"):
        ops.set_attention(q, q, q, cu_from([3], device), 3, backend="triton")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=str(ROOT), timeout=300)


def test_unavailable_on_cpu_without_interpreter():
    code = (
        "import torch\n"
        "from dm2s2_fast import backends, ops\n"
        "try:\n"
        "    backends.resolve('add_layernorm', 'triton', 'cpu')\n"
        "except backends.BackendUnavailable as e:\n"
        "    print('RAISED', e)\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "try:\n"
        "    ops.add_layernorm(x, x, w, w, 1e-5, backend='triton')\n"
        "except backends.BackendUnavailable as e:\n"
        "    print('RAISED-OP', e)\n"
    )
    proc = _run_python(code, TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stderr
    assert "RAISED backend 'triton' cannot run add_layernorm on cpu" in proc.stdout, proc.stdout
    assert "cuda" in proc.stdout and "RAISED-OP" in proc.stdout, proc.stdout


def test_unavailable_without_triton():
    """With triton not importable, dm2s2_fast still imports and the backend says why it cannot run."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton -> ImportError\n"
        "import dm2s2_fast\n"
        "from dm2s2_fast import backends\n"
        "print('REASON', backends.why_not('triton', 'set_attention', 'cuda'))\n"
    )
    proc = _run_python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr
    assert "REASON triton is not importable" in proc.stdout, proc.stdout


# ------------------------------------------------------- GPU code path compiles (ptxas, no GPU needed)

_AOT_SCRIPT = r"""
import torch
import dm2s2_fast.triton as T
assert not T.INTERPRET and T.UNAVAILABLE is None, T.UNAVAILABLE
from dm2s2_fast.triton import add_layernorm as AL, bias_gelu as BG, embed_layernorm as EL, mra_pool as MP
from dm2s2_fast.triton import set_attention as SA
from sm90_build import build

# The ads batch at B=256: N packed rows, 256 sets (longest 200), 974 segments (longest 118); q, k, v
# are views of the [N, 3, H, D] qkv projection.
N, d, f, H, D = 26417, 384, 1536, 12, 32
for dt in (torch.bfloat16, torch.float32):
    for G, ms in ((256, 200), (974, 118)):
        packed, bm, bn, w, st = SA.pick_config(N, G, ms, D, dt)
        build(SA._set_attention_kernel, dict(Q=dt, K=dt, V=dt, O=dt, CU=torch.int32, stride_qn=3 * d,
              stride_qh=D, stride_kn=3 * d, stride_kh=D, stride_vn=3 * d, stride_vh=D, stride_on=d, stride_oh=D,
              n_rows=N, n_groups=G, n_mblocks=-(-ms // bm), search_iters=G.bit_length(), qk_scale=0.25),
              dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn, PACKED=packed, INTERP=False), w, st)
    for n in (26417, 974):
        bn, ba, bk, w, st = MP.tile_config(dt, n, d, d)
        build(MP._score_tile_kernel, dict(X=dt, W=dt, C=dt, V=dt, P=torch.float32, n_rows=n, dim=d, width=d,
              stride_xn=d, stride_wa=d),
              dict(BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, EVEN_K=True, EVEN_A=True, INTERP=False), w, st)
    bn, ba, bk, w, st = MP._score_config(dt, d, d)
    build(MP._score_kernel, dict(X=dt, W=dt, C=dt, V=dt, S=torch.float32, n_rows=974, dim=d, width=d,
          stride_xn=d, stride_wa=d), dict(BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, INTERP=False), w, st)
    bd, bn, ba, bk, w = MP._fused_config(dt, d, d)
    f32 = torch.float32
    build(MP._mra_fused_kernel, dict(H=dt, SC=f32, CU_SEG=torch.int32, CU_SMP=torch.int32, U=dt, G=dt, UV=dt,
          Z=dt, R=dt, ALPHA=f32, BETA=f32, TSCR=f32, dim=d, width=d, stride_hn=d, stride_ua=d, stride_zn=d,
          stride_rn=d, part_stride=d), dict(BLOCK_N=bn, BLOCK_D=bd, BLOCK_A=ba, BLOCK_K=bk, BLOCK_S=16, N_PART=3,
          INTERP=False), w, 1)
    for bn, w, st in (MP._pool_launch_config(d, dt)[1:], (16, 8, 3), (32, 8, 2)):  # the default, variants
        bd = MP._pool_launch_config(d, dt)[0]
        build(MP._group_pool_kernel, dict(X=dt, SC=f32, CU=torch.int32, OUT=dt, WT=f32, dim=d, stride_xn=d,
              stride_on=d, part_stride=d), dict(BLOCK_N=bn, BLOCK_D=bd, N_PART=3, INTERP=False), w, st)
    bd, br, w = AL.row_config(d)
    build(AL._add_layernorm_kernel, dict(X=dt, RES=dt, Wt=dt, Bs=dt, OUT=dt, n_rows=N, dim=d, eps=1e-12,
          stride_x=d, stride_r=d, stride_o=d), dict(BLOCK_R=br, BLOCK_D=bd, INTERP=False), w, 2)
    build(EL._embed_layernorm_kernel, dict(POS=torch.int64, TYP=torch.int64, PT=dt, TT=dt, Wt=dt, Bs=dt,
          IDS=torch.int64, TABLE=dt, DENSE=dt, OUT=dt, OUT_ROWS=torch.int64, n=N, dim=d, eps=1e-12,
          stride_pt=d, stride_tt=d, stride_table=d, stride_dense=d, stride_o=d),
          dict(HAS_IDS=True, HAS_ROWS=True, BLOCK_R=br, BLOCK_D=bd, INTERP=False), w, 2)
    build(BG._bias_gelu_kernel, dict(X=dt, B=dt, OUT=dt, n_rows=N, width=f, stride_x=f, stride_o=f),
          dict(BLOCK_R=8, BLOCK_F=512, INTERP=False), 4, 2)
print("ALL-COMPILED")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile these kernels for real")
def test_gpu_kernels_compile_for_sm90(tmp_path):
    """Without a GPU, the compiled (non-interpreted) kernels are still built for sm_90 (H100/H200)
    with Triton's bundled ptxas at the configs the launchers pick for the ads workload at B=256
    (bf16, fp32), specialised as a launch would be (tests/sm90_build.py), so the CUDA code path
    cannot rot where only the interpreter runs, and ptxas reports no spills. Run with -s to see
    the registers."""
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
    assert len(kernels) >= 20, kernels
    assert not spilling(proc.stdout), spilling(proc.stdout)


# ----------------------------------------------------------------------------- torch.compile (GPU)

@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                    reason="torch.compile of Triton kernels needs a GPU (interpreted kernels are not traceable)")
def test_triton_ops_compile():
    assert TRITON.COMPILE_UNAVAILABLE is None, TRITON.COMPILE_UNAVAILABLE
    q, k, v, cu, max_len = _attn_inputs("long-d32", "cuda", torch.bfloat16)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16)

    def f(q, k, v, cu, x, bias):
        a = torch.ops.dm2s2_triton.set_attention(q, k, v, cu, max_len, 0.25)
        return a * 2, torch.ops.dm2s2_triton.bias_gelu(x, bias) + 1

    eager = f(q, k, v, cu, x, bias)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, cu, x, bias)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    # the backend kernels route through the custom ops while compiling
    g = torch.compile(lambda x, b: TRITON.bias_gelu.bias_gelu_triton(x, b), fullgraph=True)
    # compare with the op itself: (gelu + 1) - 1 in bf16 would lose the low bits
    torch.testing.assert_close(g(x, bias), torch.ops.dm2s2_triton.bias_gelu(x, bias))
