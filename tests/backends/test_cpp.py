"""What is particular to the ``cpp`` backend (csrc/cpu/, dm2s2_fast/backends/cpp/); its op parity
(the kernel table ``auto`` picks) runs in tests/ops/ like every backend's.

- the kernel tables: ``Tuning(cpu_isa=...)`` switches the process-wide table for its block, every
  table this CPU runs gives every op's sample inputs the reference's answer (fp32), and a table the
  CPU cannot run is refused with the reason;
- determinism across thread counts; the checks the raw ``torch.ops.dm2s2_fast`` ops make on their
  own (offsets, dtypes, shapes, indices, the ``kernel`` argument); the packed-weight GEMM following
  its weight; the package without the extension.

Skipped when the extension is not built, unless DM2S2_FAST_REQUIRE_EXTENSION=1 (then it fails).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import FP32_TOL, ROOT, rel_err, require_backend, tuned

require_backend("cpp", "cpu")  # the whole module: skips (or fails) without the extension

import harness  # noqa: E402
import test_add_layernorm  # noqa: E402
import test_bias_gelu  # noqa: E402
import test_embed_layernorm  # noqa: E402
import test_mra  # noqa: E402
import test_set_attention  # noqa: E402
from dm2s2_fast import BackendUnavailable, ops  # noqa: E402
from dm2s2_fast.backends import cpp  # noqa: E402
from dm2s2_fast.tuning import CPU_ISAS  # noqa: E402

OPS = torch.ops.dm2s2_fast


def _tables() -> tuple[list[str], str]:
    """The ``Tuning.cpu_isa`` tables this CPU runs, and the one ``auto`` picks (read with the raw
    op, before any test has switched anything)."""
    have = []
    for isa in CPU_ISAS[1:]:
        try:
            OPS._cpu_isa(isa)
            have.append(isa)
        except RuntimeError:
            pass
    return have, OPS._cpu_isa("auto")


ISAS, AUTO = _tables()


# ------------------------------------------------------------------ kernel tables

def _call(x=None):
    """One cpp op call: it switches the table to the current tuning's."""
    x = torch.randn(2, 8) if x is None else x
    return ops.bias_gelu(x, torch.zeros(x.shape[1]), backend="cpp")


@pytest.fixture(autouse=True)
def _auto_table_after():
    """Leave auto's table in use (the table is process-wide; a test that forced one ends in it)."""
    yield
    _call()
    assert cpp.cpu_isa() == AUTO


@pytest.mark.parametrize("isa", ISAS)
def test_tuning_switches_the_table_for_its_block(isa):
    with tuned(cpu_isa=isa):
        _call()
        assert cpp.cpu_isa() == isa
    _call()
    assert cpp.cpu_isa() == AUTO  # the default tuning runs auto's table again


def test_raw_table_switch():
    assert cpp.cpu_isa() in CPU_ISAS[1:] + (AUTO,)
    with pytest.raises(RuntimeError, match="unknown or not supported"):
        OPS._cpu_isa("sse9")
    assert OPS._cpu_isa("") == cpp.cpu_isa()  # an empty request only reads


def test_a_table_the_cpu_cannot_run_is_refused(monkeypatch):
    """Tuning(cpu_isa=...) naming a table this CPU (or build) lacks: BackendUnavailable with the
    library's reason, at the first cpp call under it (the table is not switched)."""
    real = OPS._cpu_isa

    def without_avx512(request=""):
        if request == "avx512":
            raise RuntimeError("dm2s2_fast: CPU kernels 'avx512' are unknown or not supported by this CPU/build")
        return real(request)

    monkeypatch.setattr(OPS, "_cpu_isa", without_avx512)
    before = cpp.cpu_isa()
    with tuned(cpu_isa="avx512"):
        with pytest.raises(BackendUnavailable, match=r"Tuning\(cpu_isa='avx512'\): .*not supported by this CPU"):
            _call()
    assert cpp.cpu_isa() == before


# The linear layers' GEMMs are the GEMM library's (the table only runs their epilogues: bias_gelu,
# add_layernorm above); tests/ops/test_linear_layers.py runs them on auto's table.
OP_MODULES = {"set_attention": test_set_attention, "embed_layernorm": test_embed_layernorm,
              "add_layernorm": test_add_layernorm, "bias_gelu": test_bias_gelu}
PER_ISA = [(isa, op) for isa in ISAS if isa != AUTO for op in list(OP_MODULES) + list(test_mra.OPS)]


@pytest.mark.parametrize("isa,op", PER_ISA, ids=[f"{i}-{o}" for i, o in PER_ISA])
def test_every_op_on_every_table(isa, op):
    """Every op's sample inputs (tests/ops/) through the cpp kernels of each table this CPU runs
    (``auto``'s table runs them in tests/ops/), against the fp64 reference, in fp32."""
    with tuned(cpu_isa=isa):
        if op in OP_MODULES:
            for case in OP_MODULES[op].CASES:
                OP_MODULES[op].check(case, "cpp", "cpu", torch.float32)
        else:
            for case in test_mra.CASES:
                test_mra.check(op, case, "cpp", "cpu", torch.float32)
        assert cpp.cpu_isa() == isa


@pytest.mark.parametrize("isa", ISAS)
def test_bias_gelu_extremes(isa):
    """Elementwise (not only in norm) at both tails of erf, and past them."""
    x = torch.tensor([[-1e4, -40.0, -8.0, -5.5, -1e-7, 0.0, 1e-7, 5.5, 8.0, 40.0, 1e4, 3.0]])
    with tuned(cpu_isa=isa):
        out = _call(x)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), F.gelu(x.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_set_attention_large_scores(isa):
    """Scores of a few hundred need the max subtraction; long groups exercise the K^T tiles."""
    g = harness.gen(5)
    lengths = [200, 3, 77]
    q, k, v = (torch.randn(sum(lengths), 4, 32, generator=g) * 6 for _ in range(3))
    cu = harness.offsets(lengths, "cpu")
    with tuned(cpu_isa=isa):
        out = ops.set_attention(q, k, v, cu, 200, 0.5, backend="cpp")
    ref = test_set_attention.set_attention_reference(q.double(), k.double(), v.double(), cu, 200, 0.5)
    assert rel_err(out, ref) <= FP32_TOL


def test_mra_pool_weights_sum_to_one_on_the_ads_segments():
    """Importances over a sample sum to 1 (docs/model.md#intramra): the ads-like segments of one
    sample, every table."""
    seg = [[12, 40, 49, 6], [7, 118, 5], [24, 8, 49, 12], [1]]
    lengths = [n for s in seg for n in s]
    g = harness.gen(len(lengths) + 96)
    h = torch.randn(sum(lengths), 96, generator=g)
    W = torch.randn(96, 96, generator=g) / math.sqrt(96)
    c, v = torch.randn(96, generator=g), torch.randn(96, generator=g)
    for isa in ISAS:
        with tuned(cpu_isa=isa):
            z, r, alpha, beta = ops.mra_pool(h, harness.offsets(lengths, "cpu"),
                                             harness.offsets([len(s) for s in seg], "cpu"), W, c, v, W, c, v,
                                             backend="cpp")
        assert torch.allclose(alpha[:12].sum(), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose(beta[:4].sum(), torch.tensor(1.0), atol=1e-5)


# ------------------------------------------------------------------ threads

def test_set_attention_deterministic_across_threads():
    g = harness.gen(9)
    lengths = [50, 1, 0, 200, 17] * 3
    q, k, v = torch.randn(sum(lengths), 3, 12, 32, generator=g).unbind(1)
    cu = harness.offsets(lengths, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.set_attention(q, k, v, cu, 200, 0.2)
        torch.set_num_threads(max(2, threads))
        many = OPS.set_attention(q, k, v, cu, 200, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------ the raw ops' own checks

def _scorer(a, d, g):
    return torch.randn(a, d, generator=g) / math.sqrt(d), torch.randn(a, generator=g), torch.randn(a, generator=g)


def test_kernel_checks_offsets():
    q = k = v = torch.randn(5, 2, 4)
    offsets = lambda lengths: harness.offsets(lengths, "cpu")  # noqa: E731
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
    W, c, vv = _scorer(3, 8, harness.gen(1))
    with pytest.raises(RuntimeError, match="must run from 0 to 5"):
        OPS.intra_mra(h, offsets([1, 1]), W, c, vv)
    with pytest.raises(RuntimeError, match="must run from 0 to 2"):  # 2 segments, the sample offsets end at 3
        OPS.mra_pool(h, offsets([3, 2]), offsets([3]), W, c, vv, W, c, vv)
    with pytest.raises(RuntimeError, match="W must have shape"):
        OPS.intra_mra(h, offsets([5]), W[:, :4], c, vv)


def test_kernel_checks_dtypes_shapes_and_the_kernel_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="the cpp kernels take .*; x is Double"):
        OPS.bias_gelu(x.double(), torch.randn(8).double())
    with pytest.raises(RuntimeError, match="bias must have 8 entries"):
        OPS.bias_gelu(x, torch.randn(7))
    with pytest.raises(RuntimeError, match="residual must have shape"):
        OPS.add_layernorm(x, x[:3], torch.randn(8), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="must have 2 dims"):
        OPS.add_layernorm(x[0], x[0], torch.randn(8), torch.randn(8), 1e-5)
    # `variant` picks one of a device's kernels (CUDA); the CPU has one per op and takes only 0.
    q = torch.randn(5, 2, 4)
    with pytest.raises(RuntimeError, match="the CPU has one kernel, variant must be 0, got 1"):
        OPS.add_layernorm(x, x, torch.randn(8), torch.randn(8), 1e-5, 1)
    with pytest.raises(RuntimeError, match="the CPU has one kernel, variant must be 0, got 32"):
        OPS.set_attention(q, q, q, harness.offsets([5], "cpu"), 5, 1.0, 32)
    out = torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="the CPU has one kernel, variant must be 0, got 2"):
        OPS.embed_layernorm(torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.randn(4, 8), torch.randn(1, 8),
                            torch.ones(8), torch.zeros(8), 1e-12, None, None, torch.randn(3, 8), out, torch.arange(3),
                            2)
    assert torch.equal(OPS.add_layernorm(x, x, torch.ones(8), torch.zeros(8), 1e-5, 0),
                       OPS.add_layernorm(x, x, torch.ones(8), torch.zeros(8), 1e-5))


def test_embed_layernorm_checks_indices():
    g = harness.gen(3)
    n, d, R = 6, 8, 50
    positions, type_ids = torch.randint(0, 40, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    pos, typ = torch.randn(40, d, generator=g), torch.randn(4, d, generator=g)
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ids, table = torch.randint(0, R, (n,), generator=g), torch.randn(R, d, generator=g)
    out, rows = torch.zeros(n, d), torch.arange(n)
    bad_ids = ids.clone()
    bad_ids[4] = R  # table has R rows
    with pytest.raises(RuntimeError, match="element 4 has an index out of range"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, bad_ids, table, None, out, rows)
    bad_pos = positions.clone()
    bad_pos[2] = -1
    with pytest.raises(RuntimeError, match="element 2 has an index out of range"):
        OPS.embed_layernorm(bad_pos, type_ids, pos, typ, w, b, 1e-12, ids, table, None, out, rows)
    with pytest.raises(RuntimeError, match="element 5 has an index out of range"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, ids, table, None, out,
                            torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(RuntimeError, match="either ids and table, or dense"):
        OPS.embed_layernorm(positions, type_ids, pos, typ, w, b, 1e-12, ids, None, None, out, rows)
    with pytest.raises(RuntimeError, match="int32/int64"):
        OPS.embed_layernorm(positions.float(), type_ids, pos, typ, w, b, 1e-12, ids, table, None, out, rows)


# ------------------------------------------------------------------ linear layers

def test_packed_weights_follow_the_weight():
    """The cpp backend's prepacked-weight GEMM (small outputs) sees in-place updates and new weights."""
    g = harness.gen(11)
    x, w, b = torch.randn(20, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for _ in range(2):
        assert rel_err(ops.linear(x, w, b, backend="cpp"), x.double() @ w.double().T + b.double()) <= FP32_TOL
        with torch.no_grad():
            w.mul_(-0.5)  # in place: same address, new version
    w = torch.randn(48, 32, generator=g)  # a new tensor (possibly at a freed one's address)
    assert rel_err(ops.linear_bias_gelu(x, w, b, backend="cpp"), F.gelu(x.double() @ w.double().T + b.double())) \
        <= FP32_TOL


# ------------------------------------------------------------------ without the extension

def test_without_extension_torch_still_runs():
    code = (
        "import torch, dm2s2_fast\n"
        "from dm2s2_fast import dispatch, ops\n"
        "reason = dispatch.availability()['cpp']['cpu']\n"
        "assert reason and 'DM2S2_FAST_NO_EXTENSION' in reason, reason\n"
        "x, b = torch.randn(3, 4), torch.randn(4)\n"
        "assert dispatch.resolve('bias_gelu', 'auto', 'cpu', (x, b))[0] == 'torch'\n"
        "ops.bias_gelu(x, b)\n"
        "try:\n"
        "    ops.bias_gelu(x, b, backend='cpp')\n"
        "except dispatch.BackendUnavailable as e:\n"
        "    assert 'DM2S2_FAST_NO_EXTENSION' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpp ran without its extension')\n"
    )
    env = dict(os.environ, DM2S2_FAST_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
