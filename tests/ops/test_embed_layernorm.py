"""embed_layernorm on every backend against ``embed_layernorm_reference`` in fp64 (tests/ops/harness.py),
both into a new tensor and scattered into rows of a NaN-filled ``out`` (the other rows must stay
NaN), plus outputs whose rows are not contiguous, opcheck, and the op's argument errors.

Sample inputs: token ids into a table or dense (projected) rows, contiguous or strided, int32 and
int64 indices (positions and type ids of different index dtypes), widths 3 to 384, n = 0, 1 and a
few hundred elements.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness
from dm2s2_fast import BackendUnavailable, ops
from dm2s2_fast.ops.embed_layernorm import embed_layernorm_reference
from harness import Case, gen, rand
from helpers import FP32_TOL, rel_err, require_backend, require_extension, skip_unless_cuda

OP = "embed_layernorm"
P, T, R = 64, 4, 50  # position, type and table rows


def case(n, d, source="ids", index_dtype=torch.int64, extra=7, seed=0, **flags):
    """``source``: "ids" (rows of a table), "dense", or "dense-strided" (a slice of wider rows, as a
    projection's output); ``extra``: rows of ``out`` the call must leave alone."""
    other = torch.int32 if index_dtype == torch.int64 else torch.int64

    def build(device, dtype):
        g = gen(seed * 1000 + n * 5 + d + len(source))
        pos_table, type_table = rand(g, P, d, device=device, dtype=dtype), rand(g, T, d, device=device, dtype=dtype)
        weight = rand(g, d, device=device, dtype=dtype, scale=0.5, shift=1.0)
        bias = rand(g, d, device=device, dtype=dtype)
        positions = torch.randint(0, P, (n,), generator=g).to(device, index_dtype)
        type_ids = torch.randint(0, T, (n,), generator=g).to(device, other)
        ids = table = dense = None
        if source == "ids":
            ids = torch.randint(0, R, (n,), generator=g).to(device, index_dtype)
            table = rand(g, R, d, device=device, dtype=dtype, scale=2.0)
        elif source == "dense":
            dense = rand(g, n, d, device=device, dtype=dtype, scale=2.0)
        else:
            dense = rand(g, n, 2 * d, device=device, dtype=dtype, scale=2.0)[:, d:]
        out_rows = torch.randperm(n + extra, generator=g)[:n].to(device, index_dtype)
        return (positions, type_ids, pos_table, type_table, weight, bias, ids, table, dense), out_rows, n + extra
    return Case(build, **flags)


CASES = {
    # Small enough for Triton's interpreter.
    "ids-d32-i64": case(29, 32),
    "ids-d48-i32": case(29, 48, index_dtype=torch.int32),
    "dense-strided-d32-i32": case(29, 32, "dense-strided", torch.int32),
    "dense-strided-d48-i64": case(29, 48, "dense-strided"),
    "dense-d40": case(17, 40, "dense", torch.int32),
    "ids-d10-one": case(1, 10),
    "dense-d3": case(7, 3, "dense"),
    "ids-empty": case(0, 32, index_dtype=torch.int32),
    "dense-empty": case(0, 32, "dense"),
    # Larger: on the compiled backends and torch.
    **{f"{src}-n300-d{d}-{str(idx)[-5:]}": case(300, d, src, idx, seed=1, interp=False)
       for src in ("ids", "dense") for d in (384, 40, 10, 3) for idx in (torch.int32, torch.int64)},
}


def check(name: str, backend: str, device: str, dtype: torch.dtype) -> None:
    args, out_rows, total = CASES[name](device, dtype)
    positions, type_ids, pos_table, type_table, weight, bias, ids, table, dense = args
    n, d = positions.shape[0], pos_table.shape[1]

    def call(*a):
        p, t, pt, tt, w, b, ids, table, dense = a
        return ops.embed_layernorm(p, t, pt, tt, w, b, 1e-12, ids=ids, table=table, dense=dense, backend=backend)

    def reference(*a, out=None, out_rows=None):
        return embed_layernorm_reference(*a[:6], 1e-12, *a[6:], out, out_rows)

    # 1) a new [n, d] output
    (fresh,) = harness.parity(f"embed_layernorm/{name}", call, reference, args, device, dtype)
    assert fresh.shape == (n, d) and fresh.dtype == dtype
    # 2) scattered into a larger NaN-filled out at permuted rows: exactly those rows are written
    out = torch.full((total, d), float("nan"), dtype=dtype, device=device)
    ret = ops.embed_layernorm(positions, type_ids, pos_table, type_table, weight, bias, 1e-12, ids=ids, table=table,
                              dense=dense, out=out, out_rows=out_rows, backend=backend)
    assert ret is out
    rows = out_rows.long()
    ref64 = reference(*map(harness.to64, args))
    own = reference(*args) if dtype in harness.HALF else None
    harness.compare(f"embed_layernorm/{name} into out", out[rows], ref64, own, dtype)
    untouched = torch.ones(total, dtype=torch.bool, device=out.device)
    untouched[rows] = False
    assert bool(out[untouched].isnan().all()), "embed_layernorm wrote rows outside out_rows"


@harness.over_cases(CASES)
def test_parity(backend, device, dtype, case):
    harness.require(backend, device, OP)
    check(case, backend, device, dtype)


def test_reference_scatters_into_rows():
    """The reference against the formula: rows it was given are written, the others stay as they were."""
    g = gen(3)
    table, pos, typ = torch.randn(11, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    ids, positions, types = torch.tensor([4, 0, 10]), torch.tensor([0, 1, 2]), torch.tensor([2, 2, 2])
    out = torch.full((5, 8), float("nan"))
    rows = torch.tensor([4, 0, 2])
    ops.embed_layernorm(positions, types, pos, typ, w, b, 1e-12, ids=ids, table=table, out=out, out_rows=rows,
                        backend="torch")
    ref = F.layer_norm((table[ids] + pos[positions] + typ[types]).double(), (8,), w.double(), b.double(), 1e-12)
    assert rel_err(out[rows], ref) <= FP32_TOL
    assert out[[1, 3]].isnan().all()  # rows it was not given stay as they were
    dense = torch.randn(3, 8, generator=g)
    fresh = ops.embed_layernorm(positions, types, pos, typ, w, b, 1e-12, dense=dense, backend="torch")
    ref = F.layer_norm((dense + pos[positions] + typ[types]).double(), (8,), w.double(), b.double(), 1e-12)
    assert rel_err(fresh, ref) <= FP32_TOL


@harness.over_backends(fp32_only=True)
def test_out_whose_rows_are_not_contiguous(backend, device, dtype):
    """A transposed or column-strided ``out`` is valid: the compiled kernels (which store unit-stride
    rows) decline it with the reason, so ``auto`` takes the torch kernel."""
    harness.require(backend, device, OP)
    g = gen(9)
    d, n = 8, 10
    args = (torch.randint(0, 16, (n,), generator=g), torch.randint(0, 2, (n,), generator=g),
            torch.randn(16, d, generator=g), torch.randn(2, d, generator=g), torch.rand(d, generator=g) + 0.5,
            torch.randn(d, generator=g), 1e-12)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    dense, rows = torch.randn(n, d, generator=g).to(device), torch.randperm(n, generator=g).to(device)
    expected = torch.empty(n, d, device=device)
    expected[rows] = ops.embed_layernorm(*args, dense=dense, backend="torch")
    for out in (torch.full((d, n), float("nan"), device=device).t(),
                torch.full((n, 2 * d), float("nan"), device=device)[:, ::2]):
        if backend == "torch":
            got = ops.embed_layernorm(*args, dense=dense, out=out, out_rows=rows, backend=backend)
        else:
            with pytest.raises(BackendUnavailable, match="out's last dim must be contiguous"):
                ops.embed_layernorm(*args, dense=dense, out=out, out_rows=rows, backend=backend)
            got = ops.embed_layernorm(*args, dense=dense, out=out, out_rows=rows, backend="auto")
        assert got is out and torch.allclose(out, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ opcheck

def _opcheck_cases(device):
    g = gen(0)
    N, d = 13, 16
    x = rand(g, N, d, device=device, dtype=torch.float32)
    w, b = rand(g, d, device=device, dtype=torch.float32), rand(g, d, device=device, dtype=torch.float32)
    pos, typ = rand(g, 20, d, device=device, dtype=torch.float32), rand(g, 3, d, device=device, dtype=torch.float32)
    positions = torch.randint(0, 20, (N,), generator=g).to(device)
    type_ids = torch.randint(0, 3, (N,), generator=g).to(device, torch.int32)
    ids, table = torch.randint(0, 30, (N,), generator=g).to(device), rand(g, 30, d, device=device, dtype=torch.float32)
    out = torch.full((N + 2, d), float("nan"), device=device)
    out_rows = torch.randperm(N + 2, generator=g)[:N].to(device)
    return {"ids": (positions, type_ids, pos, typ, w, b, 1e-12, ids, table, None, out, out_rows),
            "dense": (positions, type_ids, pos, typ, w, b, 1e-12, None, None, x, out.clone(), out_rows)}


@pytest.mark.parametrize("source", ["ids", "dense"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device, source):
    if device == "cuda":
        skip_unless_cuda()
        require_backend("cuda", "cuda", OP)
    require_extension()
    torch.library.opcheck(torch.ops.dm2s2_fast.embed_layernorm.default, _opcheck_cases(device)[source])


# ------------------------------------------------------------------ argument errors

def _tables(d=4):
    return torch.randn(8, d), torch.randn(2, d), torch.ones(d), torch.zeros(d), 1e-12


@pytest.mark.parametrize("call,message", [
    (lambda: ops.embed_layernorm(torch.tensor([0, 99]), torch.tensor([0, 0]), *_tables(), ids=torch.tensor([1, 2]),
                                 table=torch.randn(5, 4)), r"positions has entries outside \[0, 8\)"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables(), ids=torch.tensor([5]),
                                 table=torch.randn(5, 4)), r"ids has entries outside \[0, 5\)"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables(), dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([3])), r"out_rows has entries"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables()), "either ids and table, or dense"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables(), ids=torch.tensor([1])),
     "either ids and table, or dense"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), torch.randn(8, 4), torch.randn(2, 1),
                                 torch.ones(4), torch.zeros(4), 1e-12, dense=torch.randn(1, 4)),
     r"type_table must have shape \(2, 4\)"),
    # Outputs written in place must not alias themselves: an expanded or overlapping view.
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), *_tables(), dense=torch.randn(2, 4),
                                 out=torch.zeros(1, 4).expand(2, 4), out_rows=torch.tensor([0, 1])),
     "out has overlapping elements"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), *_tables(), dense=torch.randn(2, 4),
                                 out=torch.zeros(16).as_strided((2, 4), (2, 1)), out_rows=torch.tensor([0, 1])),
     "out has overlapping elements"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0, 0]), *_tables(), dense=torch.randn(2, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([1, 1])), "out_rows must be distinct"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables(), dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4)), "out and out_rows go together"),
    (lambda: ops.embed_layernorm(torch.tensor([0, 1]), torch.tensor([0]), *_tables(), dense=torch.randn(2, 4)),
     "type_ids must have 2 entries, got 1"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables(), dense=torch.randn(1, 4),
                                 out=torch.empty(3, 4), out_rows=torch.tensor([0], device="meta")),
     "out_rows is on meta, expected cpu"),
    (lambda: (lambda out: ops.embed_layernorm(
        torch.tensor([0, 1]), torch.tensor([0, 0]), *_tables(), dense=out[:2], out=out,
        out_rows=torch.tensor([1, 0])))(torch.randn(3, 4)), "out shares memory with dense"),
    (lambda: ops.embed_layernorm(torch.tensor([0.0]), torch.tensor([0]), *_tables(), dense=torch.randn(1, 4)),
     "positions must be a 1-D int32/int64 tensor"),
    (lambda: ops.embed_layernorm(torch.tensor([0]), torch.tensor([0]), *_tables()[:4], float("inf"),
                                 dense=torch.randn(1, 4)), "eps must be a finite non-negative number"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
