"""LayerNorm(x + residual), the BERT post-LN epilogue; the sum and the statistics in fp32.

A program normalises BLOCK_R rows held whole in registers ([BLOCK_R, next_pow2(d)] tile), so each
input element is read once and each output written once; d=384 takes 8 rows per 4-warp program.
"""
import torch
import triton
import triton.language as tl

from ... import dispatch
from ..._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, triton_op, wrap

MAX_DIM = 16384


@triton.jit
def layernorm_rows(e, col_ok, Wt, Bs, offs_d, dim, eps):
    """LayerNorm of the fp32 rows of ``e`` ([R, BLOCK_D], zero outside ``col_ok``)."""
    mean = tl.sum(e, axis=1) / dim
    xc = tl.where(col_ok[None, :], e - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / dim
    rstd = 1.0 / tl.sqrt((var + eps).to(tl.float32))  # inductor passes Python floats as fp64
    w = tl.load(Wt + offs_d, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bs + offs_d, mask=col_ok, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _add_layernorm_kernel(X, RES, Wt, Bs, OUT, n_rows, dim, eps, stride_x, stride_r, stride_o,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = offs_d < dim
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RES + rows64[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    y = layernorm_rows(x + r, col_ok, Wt, Bs, offs_d, dim, eps)
    tl.store(OUT + rows64[:, None] * stride_o + offs_d[None, :], cast_out(y, OUT.dtype.element_ty, INTERP), mask=mask)


def row_config(dim: int):
    """(BLOCK_D, BLOCK_R, num_warps) for row-wise kernels: ~4K elements per program."""
    block_d = next_pow2(max(dim, 1))
    block_r = max(1, min(64, 4096 // block_d))
    warps = 4 if block_d <= 2048 else 8
    return block_d, block_r, warps


def _launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    n, dim = x.shape
    out = torch.empty((n, dim), dtype=x.dtype, device=x.device)
    if n == 0 or dim == 0:
        return out
    block_d, block_r, warps = row_config(dim)
    wrap(_add_layernorm_kernel)[(cdiv(n, block_r),)](
        x, residual, weight, bias, out, n, dim, float(eps), x.stride(0), residual.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, INTERP=INTERPRET, num_warps=warps)
    return out


_op = triton_op("add_layernorm")(_launch)


def row_limits(op: str, dim: int) -> list:
    """The row kernels hold a whole row in registers."""
    return [f"triton {op} holds a row in registers: d <= {MAX_DIM}, got {dim}"] if dim > MAX_DIM else []


@dispatch.register_kernel("add_layernorm", "triton",
                          limits=lambda x, residual, weight, bias, eps: row_limits("add_layernorm", x.shape[1]))
def add_layernorm_triton(x, residual, weight, bias, eps):
    fn = _op if compiling() else _launch
    return fn(x, residual, weight, bias, float(eps))
