"""LayerNorm(x @ Wᵀ + b + residual) for the ``triton`` backend: composed (the default) or one fused
GEMM kernel, chosen by ``DM2S2_TRITON_LINEAR`` at every call (see ``linear_bias_gelu``).

* composed: the vendor GEMM (bias included), then the Triton ``add_layernorm`` kernel.
* fused: a program owns BLOCK_M whole rows of the output: it runs the K loop into an fp32
  [BLOCK_M, next_pow2(d)] accumulator (d=384 -> 512 columns, the padding columns read as zero
  weights, so they stay exactly zero), adds bias and residual, and normalises the rows in registers
  (two-pass mean / variance over the valid columns), so the [N, d] GEMM output never reaches memory.
  Holding whole rows caps d (``FUSED_MAX_DIM``); rows past N wrap around for the loads and are
  masked at the store.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backends
from ..ops.linear_add_layernorm import composed
from .._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, dtype_reason, mma, triton_op, wrap
from .add_layernorm import MAX_DIM, add_layernorm_triton, layernorm_rows
from .linear_bias_gelu import linear_mode

FUSED_MAX_DIM = 1024  # BERT-large's d; wider rows would not fit the fused kernel's registers


@triton.jit
def _linear_add_layernorm_kernel(X, W, B, RES, LN_W, LN_B, OUT, n_rows, dim, k_dim, eps,
                                 stride_xn, stride_wn, stride_rn, stride_on,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 EVEN_K: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = (rows % n_rows).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows_in[:, None] * stride_xn + offs_k[None, :]
    # Wᵀ tile [BLOCK_K, BLOCK_N] straight from W [d, K]; padding columns load as 0
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wt = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < k_dim
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(x, wt, acc, INTERP)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    e = acc + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    e += tl.load(RES + rows_in[:, None] * stride_rn + cols[None, :], mask=col_ok[None, :],
                 other=0.0).to(tl.float32)
    y = layernorm_rows(e, col_ok, LN_W, LN_B, cols, dim, eps)
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, cast_out(y, OUT.dtype.element_ty, INTERP), mask=mask)


def layernorm_config(dtype: torch.dtype, n: int, k: int, dim: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused kernel, from shapes only.

    BLOCK_N = next_pow2(d), whole rows. bf16/fp16: BLOCK_M x BLOCK_N <= 16K accumulators (d=384:
    32 rows), 8 warps, so a thread holds 64 fp32 accumulators; BLOCK_K shrinks with BLOCK_N to
    keep 3 stages of x and Wᵀ tiles under 100 KB of smem. fp32 (IEEE dots on the FMA units, whose
    operands also sit in registers): BLOCK_M x BLOCK_N <= 8K, 8 warps from 512 columns, 2 stages
    (1 past 512 columns: pipelined, d=1024 spilled on sm_90).
    BLOCK_M never exceeds next_pow2(N) (tiny N). A forced config gives all but BLOCK_N.
    Checked spill-free on sm_90 (ptxas) with Triton 3.6 (what torch 2.11 pins, the GPU machine's)
    and 3.9. The 32K-accumulator tile (64x512x32) spills under one or the other: 8 warps, 255
    registers, 48 bytes under 3.6; 16 warps, 128 registers, 52 bytes under 3.9;
    bench/gpu_linear.py times both beside this default.
    """
    block_n = next_pow2(max(dim, 16))
    rows_cap = max(16, min(128, next_pow2(max(n, 1))))
    forced = linear_mode()[1]
    if forced is not None:
        bm, _, bk, warps, stages = forced
        return bm, block_n, bk, warps, stages
    bk_cap = 16 if dtype == torch.float32 else max(16, min(64, 16384 // block_n))
    bk = max(16, min(bk_cap, next_pow2(max(k, 1))))
    if dtype == torch.float32:
        bm = max(16, min(rows_cap, 8192 // block_n))
        return bm, block_n, bk, 8 if block_n >= 512 else 4, 1 if block_n > 512 else 2
    bm = max(16, min(rows_cap, 16384 // block_n))
    return bm, block_n, bk, 8 if bm * block_n >= 16384 else 4, 3


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
            ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    bias, ln_weight, ln_bias = bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous()
    n, k = x.shape
    dim = weight.shape[0]
    out = torch.empty((n, dim), dtype=x.dtype, device=x.device)
    if n == 0 or dim == 0:
        return out
    bm, bn, bk, warps, stages = layernorm_config(x.dtype, n, k, dim)
    wrap(_linear_add_layernorm_kernel)[(cdiv(n, bm),)](
        x, weight, bias, residual, ln_weight, ln_bias, out, n, dim, k, float(eps),
        x.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, INTERP=INTERPRET,
        num_warps=warps, num_stages=stages)
    return out


_op = triton_op("linear_add_layernorm")(_launch)
_composed = composed(add_layernorm_triton)


def _supports(x, weight, bias, residual, ln_weight, ln_bias, eps) -> Optional[str]:
    mode = linear_mode()[0]  # a bad DM2S2_TRITON_LINEAR raises here, before anything runs
    reason = dtype_reason(x, weight, bias, residual, ln_weight, ln_bias)
    if reason is not None:
        return reason
    d = weight.shape[0]
    if mode == "fused" and d > FUSED_MAX_DIM:
        return (f"the fused triton linear_add_layernorm holds whole rows of the GEMM tile in "
                f"registers: d <= {FUSED_MAX_DIM}, got {d} (DM2S2_TRITON_LINEAR=composed takes "
                f"d <= {MAX_DIM})")
    if d > MAX_DIM:
        return f"triton add_layernorm holds a row in registers: d <= {MAX_DIM}, got {d}"
    return None


@backends.register_kernel("linear_add_layernorm", "triton", supports=_supports)
def linear_add_layernorm_triton(x, weight, bias, residual, ln_weight, ln_bias, eps):
    if linear_mode()[0] != "fused":  # composed, or fused-gelu: only the GELU layer fused
        return _composed(x, weight, bias, residual, ln_weight, ln_bias, eps)
    fn = _op if compiling() else _launch
    return fn(x, weight, bias, residual, ln_weight, ln_bias, float(eps))


__all__ = ["linear_add_layernorm_triton", "layernorm_config", "FUSED_MAX_DIM"]
