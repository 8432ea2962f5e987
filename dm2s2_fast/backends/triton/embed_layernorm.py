"""Embedding gather (or a projected dense input) + position + type + LayerNorm, fused.

Each program takes BLOCK_R elements: it gathers their content rows (``table[ids]`` or ``dense``),
position rows and type rows, sums them in fp32, normalises, and writes each result straight to its
packed row ``out[out_rows[i]]`` (or row i of a new tensor), so the modality-major inputs land in the
engine's sample-major layout without a second pass.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import dispatch
from ..._intmath import cdiv
from ..common import out_rows_reason
from . import INTERPRET, cast_out, compiling, triton_op, wrap
from .add_layernorm import layernorm_rows, row_config, row_limits


@triton.jit
def _embed_layernorm_kernel(POS, TYP, PT, TT, Wt, Bs, IDS, TABLE, DENSE, OUT, OUT_ROWS,
                            n, dim, eps, stride_pt, stride_tt, stride_table, stride_dense, stride_o,
                            HAS_IDS: tl.constexpr, HAS_ROWS: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = idx < n
    col_ok = offs_d < dim
    mask = row_ok[:, None] & col_ok[None, :]
    idx64 = idx.to(tl.int64)
    pos = tl.load(POS + idx64, mask=row_ok, other=0).to(tl.int64)
    typ = tl.load(TYP + idx64, mask=row_ok, other=0).to(tl.int64)
    if HAS_IDS:
        ids = tl.load(IDS + idx64, mask=row_ok, other=0).to(tl.int64)
        content = tl.load(TABLE + ids[:, None] * stride_table + offs_d[None, :], mask=mask, other=0.0)
    else:
        content = tl.load(DENSE + idx64[:, None] * stride_dense + offs_d[None, :], mask=mask, other=0.0)
    e = content.to(tl.float32)
    e += tl.load(PT + pos[:, None] * stride_pt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    e += tl.load(TT + typ[:, None] * stride_tt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = layernorm_rows(e, col_ok, Wt, Bs, offs_d, dim, eps)
    if HAS_ROWS:
        dst = tl.load(OUT_ROWS + idx64, mask=row_ok, other=0).to(tl.int64)
    else:
        dst = idx64
    tl.store(OUT + dst[:, None] * stride_o + offs_d[None, :], cast_out(y, OUT.dtype.element_ty, INTERP), mask=mask)


def _rowwise(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _run(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense,
         out, out_rows) -> None:
    """Writes LayerNorm rows into ``out`` (at ``out_rows`` when given, else rows 0..n-1)."""
    n = ids.numel() if ids is not None else dense.shape[0]
    dim = position_table.shape[1]
    if n == 0 or dim == 0:
        return
    position_table, type_table, table, dense = map(_rowwise, (position_table, type_table, table, dense))
    weight, bias = weight.contiguous(), bias.contiguous()
    positions, type_ids = positions.contiguous(), type_ids.contiguous()
    ids = ids.contiguous() if ids is not None else None
    out_rows = out_rows.contiguous() if out_rows is not None else None
    has_ids = ids is not None
    dummy = position_table  # never read: its branch is compiled out by HAS_IDS / HAS_ROWS
    block_d, block_r, warps = row_config(dim)
    wrap(_embed_layernorm_kernel)[(cdiv(n, block_r),)](
        positions, type_ids, position_table, type_table, weight, bias,
        ids if has_ids else positions, table if has_ids else dummy, dense if not has_ids else dummy,
        out, out_rows if out_rows is not None else positions,
        n, dim, float(eps), position_table.stride(0), type_table.stride(0),
        table.stride(0) if has_ids else 0, dense.stride(0) if not has_ids else 0, out.stride(0),
        HAS_IDS=has_ids, HAS_ROWS=out_rows is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, INTERP=INTERPRET, num_warps=warps)


def _launch_new(positions: torch.Tensor, type_ids: torch.Tensor, position_table: torch.Tensor,
                type_table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                ids: Optional[torch.Tensor], table: Optional[torch.Tensor],
                dense: Optional[torch.Tensor]) -> torch.Tensor:
    n = ids.numel() if ids is not None else dense.shape[0]
    out = torch.empty((n, position_table.shape[1]), dtype=position_table.dtype, device=position_table.device)
    _run(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense, out, None)
    return out


def _launch_into(positions: torch.Tensor, type_ids: torch.Tensor, position_table: torch.Tensor,
                 type_table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 ids: Optional[torch.Tensor], table: Optional[torch.Tensor], dense: Optional[torch.Tensor],
                 out: torch.Tensor, out_rows: torch.Tensor) -> None:
    _run(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense, out, out_rows)


# Two custom ops: a custom op may not return an alias of an input, so the in-place form returns
# nothing (``out`` is declared mutated) and the backend kernel returns ``out`` itself.
_op_new = triton_op("embed_layernorm")(_launch_new)
_op_into = triton_op("embed_layernorm_into", mutates_args=("out",))(_launch_into)


def _limits(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense,
            out, out_rows) -> list:
    return row_limits("embed_layernorm", position_table.shape[1]) + out_rows_reason(out, "triton")


@dispatch.register_kernel("embed_layernorm", "triton", limits=_limits)
def embed_layernorm_triton(positions, type_ids, position_table, type_table, weight, bias, eps,
                           ids, table, dense, out, out_rows):
    eps = float(eps)
    if out is None:
        fn = _op_new if compiling() else _launch_new
        return fn(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense)
    fn = _op_into if compiling() else _launch_into
    fn(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense, out, out_rows)
    return out
