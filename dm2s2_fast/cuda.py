"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda/`` (DESIGN §4), fp32/fp16/bf16 on CUDA tensors.

Importing this module registers the backend. It is unavailable, with the reason, when torch has no
CUDA, when there is no CUDA device, when the compiled library (``dm2s2_fast/_C.so``) is missing or
fails to load, or when the library was built without its CUDA kernels (a CPU-only build). The
kernels are the ``torch.ops.dm2s2_fast`` operators (their CUDA dispatch key); ``embed_layernorm``
allocates its output when the caller gave none. The fake (meta) implementations for
``torch.compile`` are shared with the cpp backend (``dm2s2_fast/cpp.py``), imported here.

Which of ``cuda`` and ``triton`` ``backend="auto"`` picks per op on CUDA is recorded in
``backends.AUTO_CUDA_ORDER`` from device measurements (``bench/gpu_ops.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension, backends
from .ops.embed_layernorm import out_layout_reason
from .ops.linear_add_layernorm import composed as composed_linear_add_layernorm
from .ops.linear_bias_gelu import composed as composed_linear_bias_gelu

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_ROWS = 2 ** 31 - 4097  # set attention and MRA: int32 row counters step up to 4096 past the end
MAX_WIDTH = 2 ** 30  # LayerNorm and GELU rows: int32 column indices


def _extent_reason(op: str, rows: int = 0, width: int = 0) -> str | None:
    """Why the cuda kernel cannot take this many rows or this row width (None when it can)."""
    if rows > MAX_ROWS:
        return f"the cuda {op} takes up to {MAX_ROWS} rows, got {rows}"
    if width > MAX_WIDTH:
        return f"the cuda {op} takes rows of up to {MAX_WIDTH} elements, got {width}"
    return None


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
backends.register_backend("cuda", ("cuda",), UNAVAILABLE)

if UNAVAILABLE is None:
    try:  # the shared fake (meta) registrations, for torch.compile / torch.export
        from . import cpp as _cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - eager use does not need them
        pass


def _why_not(*tensors: torch.Tensor | None) -> str | None:
    """None if the CUDA kernels take these tensors (fp32/fp16/bf16 CUDA, no autograd), else why not."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"the cuda kernels take CUDA tensors, got one on {t.device}"
        if t.dtype not in _FLOATS:
            return f"the cuda kernels take fp32/fp16/bf16, got {t.dtype} (use backend='torch' for fp64)"
        if grad and t.requires_grad:
            return "the cuda kernels have no autograd; a tensor requires grad (use torch.no_grad())"
    return None


def _ops():
    return torch.ops.dm2s2_fast


# ------------------------------------------------------------------ set_attention
def _set_attention_supports(q, k, v, cu_seqlens, max_seqlen, scale):
    reason = _why_not(q, k, v) or _extent_reason("set_attention", rows=q.shape[0])
    if reason is None and q.dim() == 3 and q.shape[-1] > MAX_HEAD_DIM:
        reason = f"the cuda set_attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return reason


@backends.register_kernel("set_attention", "cuda", supports=_set_attention_supports)
def set_attention_cuda(q, k, v, cu_seqlens, max_seqlen, scale):
    return _ops().set_attention(q, k, v, cu_seqlens, int(max_seqlen), float(scale))


# ------------------------------------------------------------------ epilogues
@backends.register_kernel("add_layernorm", "cuda",
                          supports=lambda x, residual, weight, bias, eps:
                              _why_not(x, residual, weight, bias) or _extent_reason("add_layernorm", width=x.shape[-1]))
def add_layernorm_cuda(x, residual, weight, bias, eps):
    return _ops().add_layernorm(x, residual, weight, bias, float(eps))


@backends.register_kernel("bias_gelu", "cuda",
                          supports=lambda x, bias: _why_not(x, bias) or _extent_reason("bias_gelu", width=x.shape[-1]))
def bias_gelu_cuda(x, bias):
    return _ops().bias_gelu(x, bias)


# The GEMM stays with cuBLAS; these run it, then the cuda epilogue kernel.
backends.register_kernel("linear", "cuda", supports=lambda x, weight, bias: _why_not(x, weight, bias))(F.linear)
backends.register_kernel(
    "linear_bias_gelu", "cuda", supports=lambda x, weight, bias: _why_not(x, weight, bias),
)(composed_linear_bias_gelu(bias_gelu_cuda))
backends.register_kernel(
    "linear_add_layernorm", "cuda",
    supports=lambda x, weight, bias, residual, ln_weight, ln_bias, eps:
        _why_not(x, weight, bias, residual, ln_weight, ln_bias),
)(composed_linear_add_layernorm(add_layernorm_cuda))


def _embed_supports(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense,
                    out, out_rows):
    return (_why_not(position_table, type_table, weight, bias, table, dense, out) or out_layout_reason(out, "cuda")
            or _extent_reason("embed_layernorm", width=position_table.shape[-1]))


@backends.register_kernel("embed_layernorm", "cuda", supports=_embed_supports)
def embed_layernorm_cuda(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                         dense, out, out_rows):
    if out is None:
        n = positions.shape[0]
        out = position_table.new_empty((n, position_table.shape[1]))
        out_rows = torch.arange(n, dtype=torch.int64, device=position_table.device)  # int32 wraps past 2^31
    _ops().embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, float(eps), ids,
                           table, dense, out, out_rows)
    return out


# ------------------------------------------------------------------ IntraMRA / InterMRA
@backends.register_kernel("intra_mra", "cuda", supports=lambda h, cu, W, c, v:
                          _why_not(h, W, c, v) or _extent_reason("intra_mra", rows=h.shape[0]))
def intra_mra_cuda(h, cu_seqlens_segment, W, c, v):
    z, alpha = _ops().intra_mra(h, cu_seqlens_segment, W, c, v)
    return z, alpha


@backends.register_kernel("inter_mra", "cuda", supports=lambda z, cu, U, g, u:
                          _why_not(z, U, g, u) or _extent_reason("inter_mra", rows=z.shape[0]))
def inter_mra_cuda(z, cu_segments, U, g, u):
    r, beta = _ops().inter_mra(z, cu_segments, U, g, u)
    return r, beta


@backends.register_kernel("mra_pool", "cuda",
                          supports=lambda h, cu1, cu2, W, c, v, U, g, u:
                              _why_not(h, W, c, v, U, g, u) or _extent_reason("mra_pool", rows=h.shape[0]))
def mra_pool_cuda(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u):
    z, r, alpha, beta = _ops().mra_pool(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u)
    return z, r, alpha, beta
