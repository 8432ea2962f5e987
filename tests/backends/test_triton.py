"""What is particular to the ``triton`` backend (dm2s2_fast/backends/triton/); its op parity runs in
tests/ops/ like every backend's.

- where it runs: ``cpu`` only under Triton's interpreter (``TRITON_INTERPRET=1``, set by
  tests/conftest.py when there is no GPU, before anything imports triton), ``cuda`` when a GPU is
  present; unavailable, with the reason, without the interpreter or without triton;
- the launch configurations it picks from the shapes, and the ones a ``Tuning`` forces
  (``AttentionTiles``, ``ScoreTiles``, ``PoolRows``): tiles that cannot compile are refused at
  construction with ValueError, and forced ones give the reference's answer;
- the calls its kernels decline (fp64, head dims past 256, score widths past the unrolled limit, a
  scale whose log2 form leaves fp32) and odd but valid ones (strided offsets, a huge max_seqlen);
- without a GPU: the compiled (sm_90) build of every kernel with Triton's ptxas (no spills), and
  ``Tuning(triton_fast_launch=True)``'s launch cache against Triton's own launches, with a stand-in
  driver; on a GPU: torch.compile through the ``dm2s2_triton`` custom ops.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import harness
import test_mra
import test_set_attention
from dm2s2_fast import AttentionTiles, BackendUnavailable, PoolRows, ScoreTiles, dispatch, ops
from dm2s2_fast.backends import common
from helpers import require_backend, run_python, skip_unless_cuda, skip_unless_required, tuned

INTERPRET = dispatch.triton_interpret()
DEVICES = [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [], id=d)
           for d in harness.devices_of("triton")]
device_param = pytest.mark.parametrize("device", DEVICES)


def backend_module(name: str = ""):
    """dm2s2_fast.backends.triton(.<name>), or a skip (a failure under DM2S2_FAST_REQUIRE_TEST_EXTRAS)
    that says why the backend cannot load here."""
    T = importlib.import_module("dm2s2_fast.backends.triton")
    if T.UNAVAILABLE is not None:
        skip_unless_required("the triton backend", T.UNAVAILABLE)
    return importlib.import_module(f"dm2s2_fast.backends.triton.{name}") if name else T


def _needs(device: str, op: str = "add_layernorm") -> None:
    require_backend("triton", device, op)


# ------------------------------------------------------------------ where it runs

def test_backend_loads_where_it_should():
    """Under the interpreter (CI without a GPU) or on a GPU, the backend must load: the kernel tests
    must not all be skipped for a set-up mistake such as importing triton before setting
    TRITON_INTERPRET=1 (only a missing triton may skip, under the test-extras switch)."""
    if not INTERPRET:
        skip_unless_cuda()
    found = dispatch.reasons("triton", "add_layernorm", "cpu" if INTERPRET else "cuda")
    if found and "not importable" in found[0]:
        skip_unless_required("triton", found[0])
    assert found == [], found


def test_unavailable_on_cpu_without_interpreter():
    code = (
        "import torch\n"
        "from dm2s2_fast import dispatch, ops\n"
        "try:\n"
        "    dispatch.resolve('add_layernorm', 'triton', 'cpu')\n"
        "except dispatch.BackendUnavailable as e:\n"
        "    print('RAISED', e)\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "try:\n"
        "    ops.add_layernorm(x, x, w, w, 1e-5, backend='triton')\n"
        "except dispatch.BackendUnavailable as e:\n"
        "    print('RAISED-OP', e)\n"
    )
    proc = run_python(code, TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stderr
    if "triton is not importable" in proc.stdout:
        skip_unless_required("triton", proc.stdout)
    assert "RAISED backend 'triton' cannot run add_layernorm() on cpu: triton runs on cuda, not cpu" in proc.stdout, \
        proc.stdout
    assert "TRITON_INTERPRET=1" in proc.stdout, proc.stdout
    assert "RAISED-OP backend 'triton' cannot run add_layernorm(float32[2, 8]@cpu" in proc.stdout, proc.stdout


def test_unavailable_without_triton():
    """With triton not importable, dm2s2_fast still imports and the backend says why it cannot run."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton -> ImportError\n"
        "import dm2s2_fast\n"
        "from dm2s2_fast import dispatch\n"
        "print('REASON', dispatch.reasons('triton', 'set_attention', 'cuda'))\n"
        "print('TABLE', dispatch.availability()['triton'])\n"
    )
    proc = run_python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr
    assert "REASON ['triton is not importable" in proc.stdout, proc.stdout
    assert "install triton to use this backend" in proc.stdout, proc.stdout


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv / next_pow2 (Triton 3.6's cost ~2 µs a call on the host)
    give what triton.cdiv / triton.next_power_of_2 give, so no launch config changes."""
    backend_module()
    import triton

    from dm2s2_fast._intmath import cdiv, next_pow2
    for x in list(range(0, 4200)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 3 * 2 ** 40 + 7]:
        assert next_pow2(x) == triton.next_power_of_2(x), x
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(x, b) == triton.cdiv(x, b), (x, b)
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(-70, 0) for b in (1, 3, 16))


# ------------------------------------------------------------------ launch configurations

def test_pick_config():
    pick_config = backend_module("set_attention").pick_config
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
    # the parity cases of tests/ops/test_set_attention.py cover both modes
    assert pick_config(137, 8, 70, 32, torch.float32)[0]  # "ragged-d32"
    assert not pick_config(309, 5, 150, 32, torch.float32)[0]  # "long-d32"
    # a Tuning forces the mode and tiles, in its block only
    with tuned(triton_attention=AttentionTiles(packed=True, block_m=16, block_n=64, num_warps=8, num_stages=3)):
        assert pick_config(29000, 256, 230, 32, torch.bfloat16) == (True, 16, 64, 8, 3)
    assert pick_config(29000, 256, 230, 32, torch.bfloat16)[:3] == (False, 64, 32)


def test_mra_tile_config():
    tile_config = backend_module("mra_pool").tile_config
    # ads IntraMRA (26k rows): 128x128x64 bf16 tiles, 8 warps, 3 stages (621 programs)
    assert tile_config(torch.bfloat16, 26417, 384, 384) == (128, 128, 64, 8, 3)
    # ads InterMRA (~1k segments): 128-row tiles would make 24 programs for 132 SMs -> 64 rows
    assert tile_config(torch.bfloat16, 974, 384, 384) == (64, 128, 64, 4, 3)
    assert tile_config(torch.float32, 26417, 384, 384) == (64, 64, 32, 4, 2)
    # tiny problems: tiles follow n down to 16
    assert tile_config(torch.float16, 5, 32, 24)[:3] == (16, 32, 32)
    with tuned(triton_mra_scores=ScoreTiles(64, 64, 32, num_warps=4, num_stages=2)):
        assert tile_config(torch.bfloat16, 26417, 384, 384) == (64, 64, 32, 4, 2)
    assert tile_config(torch.bfloat16, 26417, 384, 384) == (128, 128, 64, 8, 3)


def test_mra_pool_launch_config():
    MP = backend_module("mra_pool")
    # defaults: half precision 32 KB pipelined row blocks (the H200's fastest), fp32 unpipelined
    assert MP._pool_launch_config(384, torch.bfloat16) == (512, 32, 4, 3)
    assert MP._pool_launch_config(768, torch.float16) == (1024, 16, 4, 3)
    assert MP._pool_launch_config(16, torch.float16) == (16, 64, 4, 3)
    assert MP._pool_launch_config(384, torch.float32) == (512, 16, 8, 1)
    with tuned(triton_mra_pool=PoolRows(16, num_warps=8, num_stages=2)):
        assert MP._pool_launch_config(384, torch.bfloat16) == (512, 16, 8, 2)
    assert MP._pool_launch_config(384, torch.bfloat16) == (512, 32, 4, 3)


@pytest.mark.parametrize("make,message", [
    (lambda: AttentionTiles(False, 8, 16), "block_m=8: tile sides must be powers of two >= 16"),
    (lambda: AttentionTiles(False, 64, 48), "block_n=48"),
    (lambda: AttentionTiles(False, 64, 64, num_warps=3), "num_warps must be a power of two <= 32"),
    (lambda: AttentionTiles(False, 64, 64, num_warps=64), "num_warps must be a power of two <= 32"),
    (lambda: AttentionTiles(False, 64, 64, num_stages=0), "num_stages must be an integer >= 1"),
    (lambda: AttentionTiles("group", 64, 64), "packed must be a bool"),
    (lambda: ScoreTiles(64, 8, 32), "block_a=8"),
    (lambda: ScoreTiles("a", 16, 16), "block_n='a'"),
    (lambda: ScoreTiles(64, 64, 32, num_stages=1.5), "num_stages must be an integer"),
    (lambda: PoolRows(3, 4, 2), "block_n=3: tile sides must be powers of two >= 1"),
    (lambda: PoolRows(16, 3, 2), "num_warps"),
    (lambda: PoolRows("x"), "block_n='x'"),
])
def test_tiles_that_cannot_compile_are_refused(make, message):
    """A forced config that would not compile (tl.dot needs tile sides >= 16, powers of two) is
    refused when it is made, not at launch."""
    with pytest.raises(ValueError, match=message):
        make()


# AttentionTiles: both tilings (and other tile shapes) on short and long groups.
ATTENTION_TILES = {"packed-32x32": AttentionTiles(True, 32, 32), "group-16x16": AttentionTiles(False, 16, 16),
                   "group-64x32-1stage": AttentionTiles(False, 64, 32, num_stages=1),
                   "packed-16x64": AttentionTiles(True, 16, 64)}


@device_param
@pytest.mark.parametrize("tiles", list(ATTENTION_TILES))
@pytest.mark.parametrize("case", ["ragged-d32", "long-d32"])
def test_forced_attention_tiles(device, tiles, case):
    _needs(device, "set_attention")
    with tuned(triton_attention=ATTENTION_TILES[tiles]):
        test_set_attention.check(case, "triton", device, torch.float32)


# ScoreTiles: several partial-score blocks, ragged last a/k blocks; mra_pool stays intra + inter.
SCORE_TILES = [(None, torch.float32), (None, torch.bfloat16), (ScoreTiles(16, 32, 32, 4, 2), torch.float32),
               (ScoreTiles(32, 16, 64, 4, 3), torch.bfloat16)]


@device_param
@pytest.mark.parametrize("tiles,dtype", SCORE_TILES, ids=lambda x: harness.dtype_name(x)
                         if isinstance(x, torch.dtype) else ("default" if x is None else
                                                             f"{x.block_n}x{x.block_a}x{x.block_k}"))
@pytest.mark.parametrize("case", ["many-segments", "wide"])
def test_forced_score_tiles(device, tiles, dtype, case):
    """Forced score tiles give the reference's answer, and mra_pool is intra_mra then inter_mra:
    the same launches, bitwise the same answer."""
    _needs(device, "mra_pool")
    with tuned(triton_mra_scores=tiles):
        out = test_mra.check("mra_pool", case, "triton", device, dtype)
        h, cu_seg, cu_smp, W, c, v, U, gg, u = test_mra.CASES[case](device, dtype)["mra_pool"]
        z, alpha = ops.intra_mra(h, cu_seg, W, c, v, backend="triton")
        r, beta = ops.inter_mra(z, cu_smp, U, gg, u, backend="triton")
    for name, a, b in zip(("z", "r", "alpha", "beta"), out, (z, r, alpha, beta)):
        assert torch.equal(a, b), f"{name}/{case}: intra+inter differs from mra_pool"


@device_param
@pytest.mark.parametrize("rows,dtype", [(PoolRows(16, 8, 3), torch.bfloat16), (PoolRows(2, 1, 2), torch.float32)],
                         ids=["16rows-bfloat16", "2rows-float32"])
def test_forced_pool_rows(device, rows, dtype):
    """PoolRows' pooling-loop variants (2 rows a step: many steps per segment) agree."""
    _needs(device, "intra_mra")
    with tuned(triton_mra_pool=rows):
        test_mra.check("intra_mra", "many-segments", "triton", device, dtype)
        test_mra.check("mra_pool", "ragged", "triton", device, dtype)


# ------------------------------------------------------------------ what the kernels decline

@device_param
def test_declines_with_the_reason(device):
    """fp64, head dims past 256, d past MAX_DIM, score widths past the unrolled partial-sum limit:
    BackendUnavailable with the reason (and auto falls back)."""
    _needs(device)
    MP = backend_module("mra_pool")
    x = torch.randn(4, 32, device=device, dtype=torch.float64)
    w = torch.ones(32, device=device, dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="triton kernels take float32/float16/bfloat16, got float64"):
        ops.add_layernorm(x, x, w, w, 1e-5, backend="triton")
    q = torch.randn(3, 1, 512, device=device)
    cu = harness.offsets([3], device)
    with pytest.raises(BackendUnavailable, match="head dim <= 256, got 512"):
        ops.set_attention(q, q, q, cu, 3, backend="triton")
    h, W = torch.randn(3, 8, device=device), torch.randn(MP.MAX_SCORE_WIDTH + 1, 8, device=device)
    ones = torch.ones(W.shape[0], device=device)
    with pytest.raises(BackendUnavailable, match="score widths"):
        ops.intra_mra(h, cu, W, ones, ones, backend="triton")
    wide = torch.randn(3, MP.MAX_DIM + 1, device=device)
    with pytest.raises(BackendUnavailable, match=f"d <= {MP.MAX_DIM}"):
        ops.intra_mra(wide, cu, torch.randn(4, MP.MAX_DIM + 1, device=device), ones[:4], ones[:4], backend="triton")
    assert ops.intra_mra(h, cu, W[:4], ones[:4], ones[:4])[0].shape == (1, 8)  # auto takes another backend
    # The composed linear_add_layernorm: the GEMM takes any width, its LayerNorm kernel a row in registers.
    AL = backend_module("add_layernorm")
    d = AL.MAX_DIM + 1
    args = tuple(torch.empty(*shape, device=device) for shape in ((2, 8), (d, 8), (d,), (2, d), (d,), (d,))) + (1e-12,)
    assert dispatch.reasons("triton", "linear_add_layernorm", device, args) == \
        [f"triton add_layernorm holds a row in registers: d <= {AL.MAX_DIM}, got {d}"]
    assert dispatch.reasons("triton", "linear_bias_gelu", device, args[:3]) == []


@device_param
def test_set_attention_odd_arguments(device):
    """Valid but unusual calls: offsets read through a strided view, a max_seqlen far above the
    longest group (its q-block index once overflowed int32 in the kernel), and a scale whose log2
    form leaves fp32 (declined, so auto falls back)."""
    _needs(device, "set_attention")
    q, k, v, cu, max_len, _ = test_set_attention.CASES["long-d32"](device, torch.float32)
    ref64 = test_set_attention.set_attention_reference(*map(harness.to64, (q, k, v, cu)), max_len, 32 ** -0.5)
    strided_cu = harness.every_other(cu)
    assert not strided_cu.is_contiguous()
    for offsets, bound in ((strided_cu, max_len), (cu, 2 ** 31 - 1)):
        out = ops.set_attention(q, k, v, offsets, bound, backend="triton")
        harness.compare("set_attention odd call", out, ref64, None, torch.float32)
    with pytest.raises(BackendUnavailable, match="scale"):
        ops.set_attention(q, k, v, cu, max_len, 3e38, backend="triton")
    assert dispatch.resolve("set_attention", "auto", device, (q, k, v, cu, max_len, 3e38))[0] != "triton"


# ------------------------------------------------------------------ dispatch to the kernels

KERNELS = {
    "set_attention": ("set_attention", "set_attention_triton"),
    "embed_layernorm": ("embed_layernorm", "embed_layernorm_triton"),
    "add_layernorm": ("add_layernorm", "add_layernorm_triton"), "bias_gelu": ("bias_gelu", "bias_gelu_triton"),
    "intra_mra": ("mra_pool", "intra_mra_triton"), "inter_mra": ("mra_pool", "inter_mra_triton"),
    "mra_pool": ("mra_pool", "mra_pool_triton"),
}


@device_param
@pytest.mark.parametrize("op", dispatch.OPS)
def test_resolve_gives_triton_kernel(device, op):
    _needs(device, op)
    name, fn = dispatch.resolve(op, "triton", device)
    assert name == "triton"
    if op in KERNELS:
        module, kernel = KERNELS[op]
        assert fn is getattr(backend_module(module), kernel)
    elif op == "linear":  # the linear layers: the vendor GEMM, then this backend's epilogue kernel
        assert fn is common.linear


@device_param
def test_dispatch_runs_triton_kernel(device, monkeypatch):
    """ops.*(backend="triton") goes through the registry to this backend's kernel and its launch;
    the composed linear layers launch this backend's epilogue."""
    _needs(device)
    launches = []
    for module in ("add_layernorm", "bias_gelu"):
        mod = backend_module(module)
        real = mod._launch
        monkeypatch.setattr(mod, "_launch", lambda *a, _real=real, _m=module: launches.append(_m) or _real(*a))
    x = torch.randn(4, 32, device=device)
    w, b = torch.ones(32, device=device), torch.zeros(32, device=device)
    ops.add_layernorm(x, x, w, b, 1e-5, backend="triton")
    assert launches == ["add_layernorm"]
    W = torch.randn(32, 32, device=device)
    ops.linear_add_layernorm(x, W, b, x, w, b, 1e-5, backend="triton")
    ops.linear_bias_gelu(x, W, b, backend="triton")
    assert launches == ["add_layernorm", "add_layernorm", "bias_gelu"]


# ------------------------------------------------------- GPU code path compiles (ptxas, no GPU needed)

_AOT_SCRIPT = r"""
import torch
import dm2s2_fast.backends.triton as T
assert not T.INTERPRET and T.UNAVAILABLE is None, T.UNAVAILABLE
from dm2s2_fast.backends.triton import add_layernorm as AL, bias_gelu as BG, embed_layernorm as EL, mra_pool as MP
from dm2s2_fast.backends.triton import set_attention as SA
from sm90_build import build

# The ads batch at B=256: N packed rows, 256 sets (longest 200), 974 segments (longest 118); q, k, v
# are views of the [N, 3, H, D] qkv projection.
N, d, f, H, D = 26417, 384, 1536, 12, 32
f32 = torch.float32
for dt in (torch.bfloat16, torch.float32):
    for G, ms in ((256, 200), (974, 118)):
        packed, bm, bn, w, st = SA.pick_config(N, G, ms, D, dt)
        build(SA._set_attention_kernel, dict(Q=dt, K=dt, V=dt, O=dt, CU=torch.int32, stride_qn=3 * d,
              stride_qh=D, stride_kn=3 * d, stride_kh=D, stride_vn=3 * d, stride_vh=D, stride_on=d, stride_oh=D,
              n_rows=N, n_groups=G, n_mblocks=-(-ms // bm), search_iters=G.bit_length(), qk_scale=0.25),
              dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn, PACKED=packed, INTERP=False), w, st)
    for n in (26417, 974):
        bn, ba, bk, w, st = MP.tile_config(dt, n, d, d)
        build(MP._score_tile_kernel, dict(X=dt, W=dt, C=dt, V=dt, P=f32, n_rows=n, dim=d, width=d,
              stride_xn=d, stride_wa=d),
              dict(BLOCK_N=bn, BLOCK_A=ba, BLOCK_K=bk, EVEN_K=True, EVEN_A=True, INTERP=False), w, st)
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


def _aot_api() -> None:
    backend_module()
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        skip_unless_required("Triton's ahead-of-time compile API", str(exc))


def _ptxas_missing(proc) -> None:
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        skip_unless_required("Triton's ptxas", proc.stderr[-500:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile these kernels for real")
def test_gpu_kernels_compile_for_sm90(tmp_path):
    """Without a GPU, the compiled (non-interpreted) kernels are still built for sm_90 (H100/H200)
    with Triton's bundled ptxas at the configs the launchers pick for the ads workload at B=256
    (bf16, fp32) and the pooling variants PoolRows offers, specialised as a launch would be
    (tests/backends/sm90_build.py), so the CUDA code path cannot rot where only the interpreter runs,
    and ptxas reports no spills. Run with -s to see the registers."""
    _aot_api()
    from sm90_build import spilling
    proc = run_python(_AOT_SCRIPT, timeout=600, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                      TRITON_CACHE_DIR=str(tmp_path))  # a fresh cache, so ptxas runs and logs
    _ptxas_missing(proc)
    assert proc.returncode == 0 and "ALL-COMPILED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    kernels = [line for line in proc.stdout.splitlines() if line.startswith("KERNEL")]
    print("\n" + "\n".join(kernels))
    assert len(kernels) >= 19, kernels
    assert not spilling(proc.stdout), spilling(proc.stdout)


# ------------------------------------------------------------------ fast launch (stand-in driver)

_FAST_LAUNCH_SCRIPT = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver

CALLS = []

class Utils:
    def load_binary(self, name, kernel, shared, device):
        return (0, name, 0, 0, 1024)  # module, function (the name, to compare), regs, spills, threads
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

class Launcher:
    def __init__(self, src, metadata):
        pass
    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        norm = tuple((str(a.dtype), a.data_ptr(), tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
                     else (type(a).__name__, a) for a in args)
        CALLS.append(((gx, gy, gz), stream, function, id(packed_metadata), launch_metadata, enter, exit_, norm))

class Driver(CudaDriver):
    def __init__(self):
        self.utils, self.launcher_cls = Utils(), Launcher
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 7
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("cpu")
    def get_device_capability(self, device=0):
        return (9, 0)

driver.set_active(Driver())
from triton.runtime.jit import JITFunction
RUNS = []
_run = JITFunction.run
def counted_run(self, *args, **kwargs):
    RUNS.append(self)
    return _run(self, *args, **kwargs)
JITFunction.run = counted_run
from dm2s2_fast import Tuning
from dm2s2_fast.backends.triton import add_layernorm as AL, bias_gelu as BG, embed_layernorm as EL, mra_pool as MP
from dm2s2_fast.backends.triton import set_attention as SA
import dm2s2_fast.backends.triton as T
assert not T.INTERPRET and T.UNAVAILABLE is None, T.UNAVAILABLE

g = torch.Generator().manual_seed(0)
def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g).to(dtype)

def comparable(calls):
    # The launches' own outputs are new allocations each call: no addresses. Launch metadata is
    # built only for the hooks to read, and no hook is registered: not compared.
    for grid, stream, function, kernel, _, enter, exit_, args in calls:
        assert getattr(enter, "calls", []) == [] and getattr(exit_, "calls", []) == []
        yield grid, stream, function, kernel, enter, exit_, tuple(
            a[:1] + a[2:] if a[0].startswith("torch.") else a for a in args)

FAST = Tuning(triton_fast_launch=True)

def check(label, fn):
    CALLS.clear(); fn(); slow = list(CALLS)
    with FAST.active():
        CALLS.clear(); fn(); miss = list(CALLS)
        CALLS.clear(); RUNS.clear(); fn(); hit = list(CALLS)
    assert not RUNS, (label, "the second fast call went through JITFunction.run", RUNS)
    assert slow, label
    for name, got in (("miss", miss), ("hit", hit)):
        assert list(comparable(got)) == list(comparable(slow)), (label, name, got, slow)
    print("SAME", label, len(slow), "launches")
    return slow

d, n = 384, 100
x, r, w, b = rnd(n, d), rnd(n, d), rnd(d), rnd(d)
check("add_layernorm", lambda: AL._launch(x, r, w, b, 1e-12))
xs = torch.empty(n * d + 1, dtype=torch.bfloat16)[1:].view(n, d).copy_(x)  # 2-byte offset: not 16-byte aligned
aligned = check("add_layernorm aligned again", lambda: AL._launch(x, r, w, b, 1e-12))
odd = check("add_layernorm misaligned", lambda: AL._launch(xs, r, w, b, 1e-12))
assert aligned[0][3] != odd[0][3], "a misaligned input got the aligned input's kernel"
check("add_layernorm n=96", lambda: AL._launch(x[:96], r[:96], w, b, 1e-12))
check("add_layernorm n=1", lambda: AL._launch(x[:1], r[:1], w, b, 1e-12))
h = rnd(n, 1536)
check("bias_gelu", lambda: BG._launch(h, rnd(1536)))
qkv = rnd(n, 3, 12, 32)
cu = torch.tensor([0, 1, 40, 100], dtype=torch.int32)
check("set_attention group", lambda: SA._launch(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 60, 32 ** -0.5))
cu_short = torch.arange(0, n + 1, 4, dtype=torch.int32)
check("set_attention packed", lambda: SA._launch(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_short, 20, 32 ** -0.5))
Wm, c, v = rnd(d, d), rnd(d), rnd(d)
cu_seg = torch.tensor([0, 3, 50, 100], dtype=torch.int32)
check("intra_mra", lambda: MP._intra_launch(x, cu_seg, Wm, c, v))
pos = torch.randint(0, 64, (n,), generator=g); typ = torch.zeros(n, dtype=torch.int64)
ids = torch.randint(0, 500, (n,), generator=g)
pt, tt, table = rnd(64, d), rnd(4, d), rnd(500, d)
check("embed_layernorm", lambda: EL._launch_new(pos, typ, pt, tt, w, b, 1e-12, ids, table, None))
print("ALL-SAME")
'''


def test_fast_launch_hands_the_launcher_what_triton_does():
    """``Tuning(triton_fast_launch=True)`` (backends/triton/fast_launch.py), checked without a GPU: a
    subprocess compiles the real kernels for sm_90 behind a stand-in CUDA driver whose launcher
    records what it is handed instead of launching. Each launcher runs with the fast path off, then
    on: a cache hit must hand the launcher exactly what Triton's own ``JITFunction.run`` hands it
    (grid, compiled kernel, every argument), and inputs that Triton specializes differently (a
    misaligned tensor, a size not divisible by 16, a size of 1) must not hit another input's kernel."""
    backend_module()
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.driver import CudaDriver  # noqa: F401
    except ImportError as exc:
        skip_unless_required("a Triton CUDA backend to compile with", str(exc))
    fast_launch = backend_module("fast_launch")
    if fast_launch.UNSUPPORTED is not None:
        skip_unless_required("Triton's launch knobs (FastLaunch)", fast_launch.UNSUPPORTED)
    proc = run_python(_FAST_LAUNCH_SCRIPT, timeout=600, TRITON_INTERPRET="0")
    _ptxas_missing(proc)
    assert proc.returncode == 0 and "ALL-SAME" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("SAME ") >= 10, proc.stdout


# ----------------------------------------------------------------------------- torch.compile (GPU)

@pytest.mark.cuda
def test_triton_ops_compile():
    """torch.compile traces the Triton kernels through their ``dm2s2_triton`` custom ops (a GPU:
    interpreted kernels are not traceable)."""
    skip_unless_cuda()
    _needs("cuda", "set_attention")
    T = backend_module()
    assert not INTERPRET, "TRITON_INTERPRET is set on a GPU machine: the kernels would be interpreted"
    assert T.COMPILE_UNAVAILABLE is None, T.COMPILE_UNAVAILABLE
    q, k, v, cu, max_len, _ = test_set_attention.CASES["long-d32"]("cuda", torch.bfloat16)
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
    g = torch.compile(lambda x, b: T.bias_gelu.bias_gelu_triton(x, b), fullgraph=True)
    # compare with the op itself: (gelu + 1) - 1 in bf16 would lose the low bits
    torch.testing.assert_close(g(x, bias), torch.ops.dm2s2_triton.bias_gelu(x, bias))
