"""Helpers the backends share, below every backend (a backend never imports another)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gemm_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a GEMM operand: torch 2.13's CPU half-precision matmul (oneDNN) reads each row of a
    row-strided ``x`` past its end (the values there, times zero, still turn NaN into NaN), so there
    such an ``x`` is copied to dense rows first."""
    if x.device.type == "cpu" and x.dtype != torch.float32 and x.dim() == 2 and x.shape[0] > 1 \
            and x.stride(0) != x.shape[1]:
        return x.contiguous()
    return x


def linear(x, weight, bias):
    """The vendor GEMM, ``x @ weight.T + bias``."""
    return F.linear(gemm_rows(x), weight, bias)


def composed_linear_bias_gelu(bias_gelu_kernel):
    """The unfused form for a backend: the vendor GEMM, then that backend's ``bias_gelu`` kernel."""
    def linear_bias_gelu_composed(x, weight, bias):
        return bias_gelu_kernel(F.linear(gemm_rows(x), weight), bias)
    return linear_bias_gelu_composed


def composed_linear_add_layernorm(add_layernorm_kernel):
    """The unfused form for a backend: the vendor GEMM (bias included), then its ``add_layernorm``."""
    def linear_add_layernorm_composed(x, weight, bias, residual, ln_weight, ln_bias, eps):
        return add_layernorm_kernel(F.linear(gemm_rows(x), weight, bias), residual, ln_weight, ln_bias, eps)
    return linear_add_layernorm_composed


def out_rows_reason(out: torch.Tensor | None, backend: str) -> list[str]:
    """Why a compiled ``embed_layernorm`` cannot write rows of ``out`` in place: it stores each row
    with unit stride."""
    if out is not None and out.shape[1] > 1 and out.stride(1) != 1:
        return [f"{backend} embed_layernorm writes rows of out in place: out's last dim must be contiguous, "
                f"got strides {tuple(out.stride())}"]
    return []


def new_embedding_rows(position_table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, out_rows)`` for an ``embed_layernorm`` call that gave no ``out``: n fresh rows, in
    order (int64 rows: int32 wraps past 2^31)."""
    out = position_table.new_empty((n, position_table.shape[1]))
    return out, torch.arange(n, dtype=torch.int64, device=position_table.device)


def extent_reasons(backend: str, op: str, *, rows: int = 0, max_rows: int = 0, width: int = 0,
                   max_width: int = 0) -> list[str]:
    """Why a kernel with int32 row counters or column indices cannot take this many rows or this row
    width ([] when it can; a limit of 0 is no limit)."""
    found = []
    if max_rows and rows > max_rows:
        found.append(f"the {backend} {op} takes up to {max_rows} rows, got {rows}")
    if max_width and width > max_width:
        found.append(f"the {backend} {op} takes rows of up to {max_width} elements, got {width}")
    return found
