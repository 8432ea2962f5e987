"""GELU(x @ Wᵀ + b) for the ``triton`` backend: composed (the default) or one fused GEMM kernel.

``DM2S2_TRITON_LINEAR`` (read at every call) picks the form of this op and of
``linear_add_layernorm``:

* unset or ``composed`` (default): the vendor GEMM (``F.linear``), then the Triton ``bias_gelu``
  epilogue. DESIGN §3 keeps GEMMs with the vendor BLAS until a fused kernel measurably beats it;
  ``bench/gpu_linear.py`` is the measurement.
* ``fused``: ``_linear_bias_gelu_kernel`` at the config ``gelu_config`` picks from the shapes.
* ``fused-gelu``: this op fused, ``linear_add_layernorm`` composed (where the GELU fusion wins
  and the whole-row LayerNorm tile does not).
* ``fused,BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages``: that config, for tuning on a GPU
  (``linear_add_layernorm`` ignores BLOCK_N: its tile is always whole rows).

The fused kernel tiles the output [N, F] in [BLOCK_M, BLOCK_N] tiles, one per program, in grouped
order (GROUP_M row blocks share a run of programs, so their x rows stay in L2 while every column
block of W passes). Each program runs the whole K loop with ``tl.dot`` into an fp32 accumulator
(bf16/fp16 on the tensor cores: wgmma on sm_90 for 64-row multiples; fp32 as IEEE dots on the FMA
units), then adds the bias, applies the exact erf GELU in fp32 and stores in x's dtype. Wᵀ tiles
are read from the nn.Linear layout [F, K] by pointer arithmetic (no transposed copy). Row and
column indices past the ends wrap around for the loads (so the hot loop loads without masks when
BLOCK_K divides K) and are masked at the store.
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from ..ops.linear_bias_gelu import composed
from .._intmath import cdiv, next_pow2
from . import INTERPRET, cast_out, compiling, dtype_reason, mma, sm_count, triton_op, valid_tiles, wrap
from .bias_gelu import bias_gelu_triton

LINEAR_ENV = "DM2S2_TRITON_LINEAR"
GROUP_M = 8  # row blocks per program group of the grouped order
_MODE_CACHE: dict = {}
_MODE_HELP = (f"{LINEAR_ENV} must be 'composed', 'fused', 'fused-gelu' or 'fused[-gelu],BLOCK_M,BLOCK_N,"
              "BLOCK_K,num_warps,num_stages' (BLOCK_* powers of two >= 16, num_warps a power of two <= 32, "
              "num_stages >= 1)")


def linear_mode() -> Tuple[str, Optional[Tuple[int, int, int, int, int]]]:
    """``(mode, forced config or None)`` from ``DM2S2_TRITON_LINEAR``; mode is composed, fused or
    fused-gelu."""
    spec = os.environ.get(LINEAR_ENV, "").strip()
    if spec not in _MODE_CACHE:
        mode, *fields = (s.strip() for s in spec.split(","))
        mode = mode or "composed"
        forced = None
        if mode not in ("composed", "fused", "fused-gelu") or (mode == "composed" and fields):
            raise ValueError(f"{_MODE_HELP}, got {spec!r}")
        if fields:
            try:
                forced = tuple(int(s) for s in fields)
            except ValueError:
                raise ValueError(f"{_MODE_HELP}, got {spec!r}") from None
            if len(forced) != 5 or not valid_tiles(*forced[:3], warps=forced[3], stages=forced[4]):
                raise ValueError(f"{_MODE_HELP}, got {spec!r}")
        _MODE_CACHE[spec] = (mode, forced)
    return _MODE_CACHE[spec]


@triton.jit
def _linear_bias_gelu_kernel(X, W, B, OUT, n_rows, n_out, k_dim, stride_xn, stride_wn, stride_on,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(n_rows, BLOCK_M)
    grid_n = tl.cdiv(n_out, BLOCK_N)
    per_group = GROUP * grid_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rows % n_rows).to(tl.int64)[:, None] * stride_xn + offs_k[None, :]
    # Wᵀ tile [BLOCK_K, BLOCK_N] straight from W [F, K]
    w_ptrs = W + (cols % n_out).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < k_dim
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = mma(x, wt, acc, INTERP)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    col_ok = cols < n_out
    y = acc + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * stride_on + cols[None, :]
    tl.store(out_ptrs, cast_out(y, OUT.dtype.element_ty, INTERP), mask=mask)


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(int(x), 1))))


def gelu_config(dtype: torch.dtype, n: int, k: int, f: int, sms: int = 132):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the fused kernel, from shapes only.

    bf16/fp16: 128x128x64 tiles, 8 warps (two wgmma warpgroups), 3 stages (96 KB of smem) when
    that fills the SMs (ads FFN-up: 207 x 12 = 2484 programs); else 64-row tiles at 4 warps, and
    64 columns when even those are fewer than the SMs (tiny N at batch size 1, where reading W
    dominates). fp32 (IEEE dots on the FMA units): 64x64x32, 4 warps. No tile dimension exceeds
    the next power of two of the problem's (tiny N; the interpreter's speed). Checked spill-free
    on sm_90 (ptxas: bf16 128x128x64 112 registers, 16x64x64 56; fp32 64x64x32 128).
    """
    forced = linear_mode()[1]
    if forced is not None:
        return forced
    rows_cap = _pow2_clamp(n, 16, 128)
    bk = _pow2_clamp(k, 16, 64 if dtype != torch.float32 else 32)
    if dtype == torch.float32:
        return min(64, rows_cap), _pow2_clamp(f, 16, 64), bk, 4, 2
    bn = _pow2_clamp(f, 16, 128)
    if cdiv(n, 128) * cdiv(f, bn) >= sms:
        bm = 128
    else:
        bm = 64
        if cdiv(n, bm) * cdiv(f, bn) < sms:
            bn = min(bn, 64)
    bm = min(bm, rows_cap)
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous()
    n, k = x.shape
    f = weight.shape[0]
    out = torch.empty((n, f), dtype=x.dtype, device=x.device)
    if n == 0 or f == 0:
        return out
    bm, bn, bk, warps, stages = gelu_config(x.dtype, n, k, f, sm_count(x.device))
    grid = (cdiv(n, bm) * cdiv(f, bn),)
    wrap(_linear_bias_gelu_kernel)[grid](
        x, weight, bias, out, n, f, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, EVEN_K=k % bk == 0, INTERP=INTERPRET,
        num_warps=warps, num_stages=stages)
    return out


_op = triton_op("linear_bias_gelu")(_launch)
_composed = composed(bias_gelu_triton)


def _supports(x, weight, bias) -> Optional[str]:
    linear_mode()  # a bad DM2S2_TRITON_LINEAR raises here, before anything runs
    return dtype_reason(x, weight, bias)


@backends.register_kernel("linear_bias_gelu", "triton", supports=_supports)
def linear_bias_gelu_triton(x, weight, bias):
    if linear_mode()[0] == "composed":
        return _composed(x, weight, bias)
    fn = _op if compiling() else _launch
    return fn(x, weight, bias)


__all__ = ["linear_bias_gelu_triton", "gelu_config", "linear_mode", "LINEAR_ENV"]
