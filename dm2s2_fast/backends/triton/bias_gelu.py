"""GELU(x + bias) with the exact erf GELU (BERT's FFN epilogue), computed in fp32.

Elementwise over [N, f] in [BLOCK_R, BLOCK_F] tiles (a 2-D grid, so the bias is loaded once per tile
and no per-element modulo is needed); rows may be strided (last dim contiguous).
"""
import torch
import triton
import triton.language as tl

from ... import dispatch
from ..._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, triton_op, wrap


@triton.jit
def _bias_gelu_kernel(X, B, OUT, n_rows, width, stride_x, stride_o,
                      BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < width
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = x + b[None, :]
    y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(OUT + rows64[:, None] * stride_o + cols[None, :], cast_out(y, OUT.dtype.element_ty, INTERP), mask=mask)


def _launch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    bias = bias.contiguous()
    n, width = x.shape
    out = torch.empty((n, width), dtype=x.dtype, device=x.device)
    if n == 0 or width == 0:
        return out
    block_f = min(512, next_pow2(width))
    block_r = max(1, 4096 // block_f)
    grid = (cdiv(n, block_r), cdiv(width, block_f))
    wrap(_bias_gelu_kernel)[grid](x, bias, out, n, width, x.stride(0), out.stride(0),
                                  BLOCK_R=block_r, BLOCK_F=block_f, INTERP=INTERPRET, num_warps=4)
    return out


_op = triton_op("bias_gelu")(_launch)


def _limits(x, bias) -> list:
    if cdiv(x.shape[1], 512) > 65535:
        return [f"triton bias_gelu supports widths up to {512 * 65535}, got {x.shape[1]}"]
    return []


@dispatch.register_kernel("bias_gelu", "triton", limits=_limits)
def bias_gelu_triton(x, bias):
    fn = _op if compiling() else _launch
    return fn(x, bias)
