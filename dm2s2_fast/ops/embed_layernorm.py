"""Embedding gather (or projected dense input) + position + modality type + LayerNorm, fused
(docs/ops.md#embed_layernorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._extension import register_fake
from ._checks import (check_backend, check_fake_devices, check_float, check_index, check_no_overlap, check_scalar,
                      check_shape)


def embed_layernorm(positions: torch.Tensor, type_ids: torch.Tensor, position_table: torch.Tensor,
                    type_table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                    ids: torch.Tensor | None = None, table: torch.Tensor | None = None,
                    dense: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    out_rows: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``LayerNorm(content_i + position_table[positions_i] + type_table[type_ids_i])`` for n elements.

    content is ``table[ids]`` (ids [n] into table [R, d]) or ``dense`` [n, d] (a projected input):
    exactly one of the two. With ``out`` [N, d] and ``out_rows`` [n] (distinct rows), row i is
    written to ``out[out_rows[i]]`` in place and ``out`` is returned — how the engine packs each
    modality into the sample-major layout without a second pass; else a new [n, d] is returned.
    """
    check_backend(backend)
    check_float("position_table", position_table, 2)
    d = position_table.shape[1]
    like = position_table
    check_float("type_table", type_table, 2, like=like)
    check_shape("type_table", type_table, (type_table.shape[0], d))
    for name, p in (("weight", weight), ("bias", bias)):
        check_float(name, p, 1, like=like)
        check_shape(name, p, (d,))
    if (ids is None) == (dense is None) or (ids is None) != (table is None):
        raise ValueError("give either ids and table, or dense")
    if ids is not None:
        check_float("table", table, 2, like=like)
        check_shape("table", table, (table.shape[0], d))
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a 1-D int32/int64 tensor, got {type(ids).__name__}")
        n = ids.numel()
        check_index("ids", ids, n, like, 0, table.shape[0])
    else:
        check_float("dense", dense, 2, like=like)
        n = dense.shape[0]
        check_shape("dense", dense, (n, d))
    check_index("positions", positions, n, like, 0, position_table.shape[0])
    check_index("type_ids", type_ids, n, like, 0, type_table.shape[0])
    if (out is None) != (out_rows is None):
        raise ValueError("out and out_rows go together")
    if out is not None:
        check_float("out", out, 2, like=like)
        check_shape("out", out, (out.shape[0], d))
        check_no_overlap("out", out)
        check_index("out_rows", out_rows, n, like, 0, out.shape[0])
        if n and torch.unique(out_rows).numel() != n:
            raise ValueError("out_rows must be distinct")
        # The kernels read inputs while other threads write rows of out: no input may live there.
        out_storage = out.untyped_storage().data_ptr()
        for name, t in (("dense", dense), ("table", table), ("position_table", position_table),
                        ("type_table", type_table), ("weight", weight), ("bias", bias), ("ids", ids),
                        ("positions", positions), ("type_ids", type_ids), ("out_rows", out_rows)):
            if t is not None and t.numel() and t.untyped_storage().data_ptr() == out_storage:
                raise ValueError(f"out shares memory with {name}; give a separate output buffer")
    return dispatch.call("embed_layernorm", backend, like.device, positions, type_ids, position_table,
                         type_table, weight, bias, check_scalar("eps", eps, nonnegative=True), ids, table, dense, out, out_rows)


def embed_layernorm_reference(positions, type_ids, position_table, type_table, weight, bias, eps,
                              ids, table, dense, out, out_rows):
    content = table[ids] if ids is not None else dense
    e = content + position_table[positions] + type_table[type_ids]
    y = F.layer_norm(e, (e.shape[-1],), weight, bias, eps)
    if out is None:
        return y
    out[out_rows] = y
    return out


@register_fake("embed_layernorm")
def embed_layernorm_fake(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                         dense, out, out_rows, variant=0):
    check_fake_devices("embed_layernorm", positions, type_ids, position_table, type_table, weight, bias, ids, table,
                       dense, out, out_rows)
    return None  # writes rows of ``out`` in place
