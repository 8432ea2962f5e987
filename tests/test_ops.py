"""The public ops: argument validation, and the torch backend against naive fp64 formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dm2s2_fast import backends, ops

from conftest import FP32_TOL, rel_err


def offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def naive_attention(q, k, v, lengths, scale):
    """Dense [N, N] block-diagonal mask: the obviously-right (and O(N²)) form."""
    group = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = group[:, None] == group[None, :]
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v)


def test_set_attention_torch_matches_block_diagonal():
    lengths = [1, 0, 7, 30, 2, 1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 3, 8, generator=g) * 2 for _ in range(3))
    out = ops.set_attention(q, k, v, offsets(lengths), 30, backend="torch")
    ref = naive_attention(q.double(), k.double(), v.double(), lengths, 1 / math.sqrt(8))
    assert rel_err(out, ref) <= FP32_TOL


@pytest.mark.parametrize("max_seqlen", [30, 45])
def test_set_attention_torch_padded_form(max_seqlen):
    """The torch backend's form for CUDA (padded, no host sync) on the same cases, here on CPU:
    empty and length-1 groups, a max_seqlen above the longest group, qkv views, leading/trailing empties."""
    from dm2s2_fast.ops.set_attention import set_attention_padded

    lengths = [0, 1, 0, 7, 30, 2, 1, 0]
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(sum(lengths), 3, 4, 8, generator=g) * 2
    q, k, v = qkv.unbind(1)
    out = set_attention_padded(q, k, v, offsets(lengths), max_seqlen, 1 / math.sqrt(8))
    ref = naive_attention(q.double(), k.double(), v.double(), lengths, 1 / math.sqrt(8))
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) <= FP32_TOL


def test_set_attention_accepts_qkv_views():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(12, 3, 2, 4, generator=g)
    cu = offsets([5, 7])
    out = ops.set_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, 7, backend="torch")
    ref = naive_attention(*(qkv[:, i].double() for i in range(3)), [5, 7], 0.5)
    assert rel_err(out, ref) <= FP32_TOL


def test_mra_torch_matches_per_segment_loop():
    g = torch.Generator().manual_seed(2)
    seg_lengths, segs_per_sample = [3, 1, 5, 2, 4], [2, 0, 3]
    h = torch.randn(sum(seg_lengths), 6, generator=g)
    W, U = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    c, v, gb, u = (torch.randn(5, generator=g) for _ in range(4))
    z, r, alpha, beta = ops.mra_pool(h, offsets(seg_lengths), offsets(segs_per_sample), W, c, v, U, gb, u,
                                     backend="torch")
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
    z2, alpha2 = ops.intra_mra(h, offsets(seg_lengths), W, c, v, backend="torch")
    r2, beta2 = ops.inter_mra(z2, offsets(segs_per_sample), U, gb, u, backend="torch")
    assert torch.equal(z2, z) and torch.equal(r2, r) and torch.equal(alpha2, alpha) and torch.equal(beta2, beta)


def test_embed_layernorm_torch_scatters_into_rows():
    g = torch.Generator().manual_seed(3)
    table, P, T = torch.randn(11, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    ids, pos = torch.tensor([4, 0, 10]), torch.tensor([0, 1, 2])
    types = torch.tensor([2, 2, 2])
    out = torch.full((5, 8), float("nan"))
    rows = torch.tensor([4, 0, 2])
    ops.embed_layernorm(pos, types, P, T, w, b, 1e-12, ids=ids, table=table, out=out, out_rows=rows,
                        backend="torch")
    ref = F.layer_norm((table[ids] + P[pos] + T[types]).double(), (8,), w.double(), b.double(), 1e-12)
    assert rel_err(out[rows], ref) <= FP32_TOL
    assert out[[1, 3]].isnan().all()  # rows it was not given stay as they were
    dense = torch.randn(3, 8, generator=g)
    fresh = ops.embed_layernorm(pos, types, P, T, w, b, 1e-12, dense=dense, backend="torch")
    ref = F.layer_norm((dense + P[pos] + T[types]).double(), (8,), w.double(), b.double(), 1e-12)
    assert rel_err(fresh, ref) <= FP32_TOL


def test_epilogues_torch():
    g = torch.Generator().manual_seed(4)
    x, res = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    w, b = torch.rand(16, generator=g), torch.randn(16, generator=g)
    xd = (x + res).double()
    ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5) * w.double() + b.double()
    assert rel_err(ops.add_layernorm(x, res, w, b, 1e-5, backend="torch"), ref) <= FP32_TOL
    y = (x + b).double()
    assert rel_err(ops.bias_gelu(x, b, backend="torch"), 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))) <= FP32_TOL


@pytest.mark.parametrize("call,message", [
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                               torch.tensor([0, 5], dtype=torch.int32), 5), "must run from 0 to 4"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                               torch.tensor([0, 3, 2, 4], dtype=torch.int32), 4), "non-decreasing"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                               torch.tensor([0, 4]), 4), "int32"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                               torch.tensor([0, 4], dtype=torch.int32), 3), "max_seqlen 3 is shorter"),
    (lambda: ops.set_attention(torch.randn(4, 2, 8), torch.randn(4, 2, 4), torch.randn(4, 2, 8),
                               torch.tensor([0, 4], dtype=torch.int32), 4), "share a shape"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4).double(), torch.ones(4), torch.zeros(4), 1e-5),
     "residual has dtype"),
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(5)), r"bias must have shape \(4,\)"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 99]), torch.tensor([0, 0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, ids=torch.tensor([1, 2]),
                                 table=torch.randn(5, 4)), r"positions has entries outside \[0, 8\)"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, ids=torch.tensor([5]),
                                 table=torch.randn(5, 4)), r"ids has entries outside \[0, 5\)"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([3])), r"out_rows has entries"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12), "either ids and table, or dense"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 1),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(1, 4)),
     r"type_table must have shape \(2, 4\)"),
    # Outputs written in place must not alias themselves: an expanded or overlapping view.
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(2, 4),
                                 out=torch.zeros(1, 4).expand(2, 4), out_rows=torch.tensor([0, 1])),
     "out has overlapping elements"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(2, 4),
                                 out=torch.zeros(16).as_strided((2, 4), (2, 1)), out_rows=torch.tensor([0, 1])),
     "out has overlapping elements"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(2, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([1, 1])), "out_rows must be distinct"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4)), "out and out_rows go together"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(2, 4)),
     "type_ids must have 2 entries, got 1"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 4),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([0], device="meta")),
     "out_rows is on meta, expected cpu"),
    (lambda: (lambda out: ops.embed_layernorm(
        torch.tensor([0, 1]), torch.tensor([0, 0]), torch.randn(8, 4), torch.randn(2, 4), torch.ones(4),
        torch.zeros(4), 1e-12, dense=out[:2], out=out, out_rows=torch.tensor([1, 0])))(torch.randn(3, 4)),
     "out shares memory with dense"),
    (lambda: ops.bias_gelu(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64)),
     "x must be a float tensor"),
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 2, 2], dtype=torch.int32), torch.randn(5, 4),
                           torch.randn(5), torch.randn(5)), "must run from 0 to 3"),
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 3, 1, 3], dtype=torch.int32), torch.randn(5, 4),
                           torch.randn(5), torch.randn(5)), "non-decreasing"),
    (lambda: ops.inter_mra(torch.randn(3, 4), torch.tensor([0, 3]), torch.randn(5, 4), torch.randn(5),
                           torch.randn(5)), "int32"),
    # The kernels take eps and scale as fp32: out-of-range values would be undefined behaviour there.
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), 1e300),
     "eps must be a finite non-negative number"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), -1e-5),
     "eps must be a finite non-negative number"),
    (lambda: ops.add_layernorm(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4), "tiny"),
     "eps must be a real number"),
    (lambda: ops.set_attention(*(torch.randn(4, 2, 8),) * 3, torch.tensor([0, 4], dtype=torch.int32), 4,
                               float("nan")), "scale must be a finite number"),
    (lambda: ops.set_attention(*(torch.randn(4, 2, 8, device="meta"),) * 3,
                               torch.tensor([0, 4], dtype=torch.int32, device="meta"), 4), "meta device"),
    (lambda: ops.intra_mra(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32), torch.randn(3, 5),
                           torch.randn(3), torch.randn(3)), r"W must have shape \(3, 4\)"),
    (lambda: ops.mra_pool(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32),
                          torch.tensor([0, 3], dtype=torch.int32), torch.randn(3, 4), torch.randn(3), torch.randn(3),
                          torch.randn(3, 4), torch.randn(3), torch.randn(3)), "cu_segments must run from 0 to 2"),
])
def test_bad_op_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_zero_sized_inputs():
    empty = torch.zeros(0, 2, 4)
    cu = torch.zeros(1, dtype=torch.int32)
    assert ops.set_attention(empty, empty, empty, cu, 0, backend="torch").shape == (0, 2, 4)
    W, c, v = torch.randn(3, 4), torch.randn(3), torch.randn(3)
    z, r, alpha, beta = ops.mra_pool(torch.zeros(0, 4), cu, torch.zeros(3, dtype=torch.int32), W, c, v, W, c, v,
                                     backend="torch")
    assert z.shape == (0, 4) and alpha.shape == (0,) and beta.shape == (0,)
    assert torch.equal(r, torch.zeros(2, 4))
    no_dim = torch.zeros(3, 2, 0)  # head dim 0: the default scale must not divide by it
    assert ops.set_attention(no_dim, no_dim, no_dim, torch.tensor([0, 3], dtype=torch.int32), 3).shape == (3, 2, 0)


def test_embed_into_an_out_whose_rows_are_not_contiguous():
    """A transposed or column-strided ``out`` is valid: the compiled kernels decline it with a reason
    (they store unit-stride rows), so ``auto`` takes the torch kernel."""
    g = torch.Generator().manual_seed(9)
    d, n = 8, 10
    args = (torch.randint(0, 16, (n,), generator=g), torch.randint(0, 2, (n,), generator=g),
            torch.randn(16, d, generator=g), torch.randn(2, d, generator=g), torch.rand(d, generator=g) + 0.5,
            torch.randn(d, generator=g), 1e-12)
    dense, rows = torch.randn(n, d, generator=g), torch.randperm(n, generator=g)
    expected = torch.empty(n, d)
    expected[rows] = ops.embed_layernorm(*args, dense=dense, backend="torch")
    for out in (torch.full((d, n), float("nan")).t(), torch.full((n, 2 * d), float("nan"))[:, ::2]):
        got = ops.embed_layernorm(*args, dense=dense, out=out, out_rows=rows, backend="auto")
        assert got is out and torch.allclose(out, expected, rtol=0, atol=1e-6)
    if backends.availability()["cpp"]["cpu"] is None:
        with pytest.raises(backends.BackendUnavailable, match="out's last dim must be contiguous"):
            ops.embed_layernorm(*args, dense=dense, out=torch.zeros(d, n).t(), out_rows=rows, backend="cpp")


def test_explicit_backend_never_falls_back():
    x = torch.randn(3, 4)
    with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' cannot run bias_gelu on cpu"):
        ops.bias_gelu(x, torch.randn(4), backend="cuda")
    with pytest.raises(backends.BackendUnavailable, match="unknown backend"):
        ops.bias_gelu(x, torch.randn(4), backend="numpy")


def test_auto_picks_an_available_backend_and_info_has_reasons():
    name, _ = backends.resolve("bias_gelu", "auto", "cpu", (torch.randn(2, 3), torch.randn(3)))
    assert name in ("cpp", "torch")
    table = backends.availability()
    assert table["torch"]["cpu"] is None
    for name in backends.BACKENDS:
        for device, reason in table[name].items():
            assert reason is None or isinstance(reason, str) and reason
    if not torch.cuda.is_available():
        assert table["cuda"]["cuda"]


def test_auto_under_cuda_graphs_reorders_the_same_backends():
    """With cuda_graphs the engine asks for the kernels of least GPU time: the same candidates per
    op, Triton first where its kernel measured faster, and nothing changes off CUDA."""
    for op in backends.OPS:
        eager, graphed = backends.auto_order(op, "cuda"), backends.auto_order(op, "cuda", graphs=True)
        assert sorted(eager) == sorted(graphed), op
        assert backends.auto_order(op, "cpu", graphs=True) == backends.auto_order(op, "cpu"), op
    assert backends.auto_order("set_attention", "cuda", graphs=True)[0] == "triton"
    assert backends.auto_order("mra_pool", "cuda", graphs=True)[0] == "cuda"
