"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda/``, fp32/fp16/bf16 on CUDA tensors, launched on
the current stream.

Importing this module registers the backend. It is unavailable, with the reason, when torch has no
CUDA, when there is no CUDA device, when the compiled library (``dm2s2_fast/_C.so``) is missing or
fails to load, or when the library was built without its CUDA kernels (a CPU-only build). The
kernels are the ``torch.ops.dm2s2_fast`` operators (their CUDA dispatch key); GEMMs are cuBLAS's
(``F.linear``) followed by this backend's epilogue kernel. ``Tuning.cuda_attention`` and
``Tuning.cuda_layernorm`` force a kernel (the ops' ``kernel`` argument).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _extension, dispatch, tuning
from ..common import (composed_linear_add_layernorm, composed_linear_bias_gelu, extent_reasons, new_embedding_rows,
                      out_rows_reason)

MAX_HEAD_DIM = 256
MAX_ROWS = 2 ** 31 - 4097  # set attention and MRA: int32 row counters step up to 4096 past the end
MAX_WIDTH = 2 ** 30  # LayerNorm and GELU rows: int32 column indices
# The ops' `kernel` argument (csrc/cuda/kernels/launchers.h: kAttnTileGroup = 1; kLayerNorm*).
ATTENTION_KERNELS = {"auto": 0, "tile32": 32, "tile64": 64, "group": 1}
LAYERNORM_KERNELS = {"auto": 0, "warp": 1, "half": 2}


def _unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} was built without CUDA; the cuda backend needs a CUDA build "
                "of torch")
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    reason = _extension.load()
    if reason is not None:
        return reason
    if not _extension.has_kernel("add_layernorm", "CUDA"):
        return ("the compiled extension has no CUDA kernels (built without CUDA, or without "
                "csrc/cuda/kernels/*.cu: rebuild with a CUDA torch and nvcc present, "
                "`pip install --no-build-isolation -e .`)")
    return None


UNAVAILABLE = _unavailable_reason()
dispatch.register_backend("cuda", dispatch.Capability(
    devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16), hint=" (use backend='torch' for fp64)"),
    UNAVAILABLE)


def _ops():
    return torch.ops.dm2s2_fast


def _layernorm_kernel() -> int:
    return LAYERNORM_KERNELS[tuning.current().cuda_layernorm]


def _rows(op: str, rows: int) -> list[str]:
    return extent_reasons("cuda", op, rows=rows, max_rows=MAX_ROWS)


def _width(op: str, width: int) -> list[str]:
    return extent_reasons("cuda", op, width=width, max_width=MAX_WIDTH)


# ------------------------------------------------------------------ set_attention
def _set_attention_limits(q, k, v, cu_seqlens, max_seqlen, scale):
    found = _rows("set_attention", q.shape[0])
    if q.dim() == 3 and q.shape[-1] > MAX_HEAD_DIM:
        found.append(f"the cuda set_attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    return found


@dispatch.register_kernel("set_attention", "cuda", limits=_set_attention_limits)
def set_attention_cuda(q, k, v, cu_seqlens, max_seqlen, scale):
    return _ops().set_attention(q, k, v, cu_seqlens, int(max_seqlen), float(scale),
                                ATTENTION_KERNELS[tuning.current().cuda_attention])


# ------------------------------------------------------------------ epilogues
@dispatch.register_kernel("add_layernorm", "cuda",
                          limits=lambda x, residual, weight, bias, eps: _width("add_layernorm", x.shape[-1]))
def add_layernorm_cuda(x, residual, weight, bias, eps):
    return _ops().add_layernorm(x, residual, weight, bias, float(eps), _layernorm_kernel())


@dispatch.register_kernel("bias_gelu", "cuda", limits=lambda x, bias: _width("bias_gelu", x.shape[-1]))
def bias_gelu_cuda(x, bias):
    return _ops().bias_gelu(x, bias)


dispatch.register_kernel("linear", "cuda")(F.linear)
dispatch.register_kernel("linear_bias_gelu", "cuda")(composed_linear_bias_gelu(bias_gelu_cuda))
dispatch.register_kernel("linear_add_layernorm", "cuda")(composed_linear_add_layernorm(add_layernorm_cuda))


def _embed_limits(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense, out,
                  out_rows):
    return out_rows_reason(out, "cuda") + _width("embed_layernorm", position_table.shape[-1])


@dispatch.register_kernel("embed_layernorm", "cuda", limits=_embed_limits)
def embed_layernorm_cuda(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                         dense, out, out_rows):
    if out is None:
        out, out_rows = new_embedding_rows(position_table, positions.shape[0])
    _ops().embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, float(eps), ids,
                           table, dense, out, out_rows, _layernorm_kernel())
    return out


# ------------------------------------------------------------------ IntraMRA / InterMRA
@dispatch.register_kernel("intra_mra", "cuda", limits=lambda h, cu, W, c, v: _rows("intra_mra", h.shape[0]))
def intra_mra_cuda(h, cu_seqlens_segment, W, c, v):
    return tuple(_ops().intra_mra(h, cu_seqlens_segment, W, c, v))


@dispatch.register_kernel("inter_mra", "cuda", limits=lambda z, cu, U, g, u: _rows("inter_mra", z.shape[0]))
def inter_mra_cuda(z, cu_segments_per_sample, U, g, u):
    return tuple(_ops().inter_mra(z, cu_segments_per_sample, U, g, u))


@dispatch.register_kernel("mra_pool", "cuda",
                          limits=lambda h, cu1, cu2, W, c, v, U, g, u: _rows("mra_pool", h.shape[0]))
def mra_pool_cuda(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
    return tuple(_ops().mra_pool(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u))
