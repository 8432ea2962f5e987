"""The ``cpp`` backend: fp32 CPU kernels from ``csrc/cpu/`` (AVX2/FMA picked at run time, OpenMP).

Importing this module loads the compiled library (``_extension.load``) and registers the backend;
when the library is absent or fails to load, the backend is registered as unavailable with the
reason, and nothing else happens. The kernels are the ``torch.ops.dm2s2_fast`` operators
themselves wherever their schema matches the call (no Python in between); ``embed_layernorm``
allocates its output when the caller gave none. Each op also gets a fake (meta) implementation so
``torch.compile`` / ``torch.export`` can trace it.
"""
from __future__ import annotations

import weakref

import torch

from . import _extension, backends
from .ops.embed_layernorm import out_layout_reason

_reason = _extension.load()
backends.register_backend("cpp", ("cpu",), _reason)

_FP32 = torch.float32


def _why_not(*tensors: torch.Tensor | None) -> str | None:
    """None if the cpp kernels can take these tensors (fp32, no autograd needed), else why not."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype is not _FP32:
            return f"the cpp kernels are fp32 only, got {t.dtype}"
        if grad and t.requires_grad:
            return "the cpp kernels have no autograd; a tensor requires grad (use torch.no_grad())"
    return None


def _mkl_packed_gemm():
    """``x @ W.T + b`` through MKL's packed-weight GEMM (torch's ``mkl::_mkl_linear``, which
    inductor uses for frozen CPU linears), each weight packed once and repacked when it changes
    (in place: its version counter; moved: its address); None where this torch has no such op."""
    try:
        reorder, mkl_linear = torch.ops.mkl._mkl_reorder_linear_weight, torch.ops.mkl._mkl_linear
    except (AttributeError, RuntimeError):
        return None
    if not torch.backends.mkl.is_available():
        return None
    packed: dict = {}  # id(weight) -> (weakref to it, (address, version, shape), packed copy)

    def gemm(x, weight, bias):
        key = (weight.data_ptr(), weight._version, weight.shape)
        entry = packed.get(id(weight))
        if entry is None or entry[0]() is not weight or entry[1] != key:
            ref = weakref.ref(weight, lambda _, i=id(weight): packed.pop(i, None))  # freed with it
            entry = packed[id(weight)] = (ref, key, reorder(weight.detach().contiguous(), max(x.shape[0], 1)))
        return mkl_linear(x.contiguous(), entry[2], weight, bias, x.shape[0])

    return gemm


_packed_gemm = _mkl_packed_gemm() if _reason is None else None


def cpu_isa(request: str = "") -> str:
    """The CPU kernel set in use ("avx2" or "generic"); ``request`` ("auto"/"avx2"/"generic") switches it."""
    if _reason is not None:
        raise backends.BackendUnavailable(f"backend 'cpp' is unavailable: {_reason}")
    return torch.ops.dm2s2_fast._cpu_isa(request)


if _reason is None:
    _ops = torch.ops.dm2s2_fast
    _embed_layernorm = _ops.embed_layernorm.default

    backends.register_kernel(
        "set_attention", "cpp",
        supports=lambda q, k, v, cu_seqlens, max_seqlen, scale: _why_not(q, k, v),
    )(_ops.set_attention.default)
    backends.register_kernel(
        "add_layernorm", "cpp",
        supports=lambda x, residual, weight, bias, eps: _why_not(x, residual, weight, bias),
    )(_ops.add_layernorm.default)
    backends.register_kernel(
        "bias_gelu", "cpp", supports=lambda x, bias: _why_not(x, bias),
    )(_ops.bias_gelu.default)
    # Linear layers: the GEMM stays with MKL. Outputs of 8 MB and more (where the C++ ops advise
    # them onto huge pages) go to the C++ ops, which also run the epilogue in place; smaller ones
    # (few rows) to MKL's packed-weight GEMM, 10-15 % faster there (ads B=1, 95 rows: the FFN-up
    # GEMM 438 -> 373 µs), then the epilogue kernel.
    _HUGE_OUTPUT = 8 << 20

    def _small(x, weight):  # MKL's packing rejects empty dims (the C++ ops handle them)
        return (_packed_gemm is not None and x.numel() > 0 and weight.numel() > 0
                and x.shape[0] * weight.shape[0] * 4 < _HUGE_OUTPUT)

    @backends.register_kernel("linear", "cpp", supports=lambda x, weight, bias: _why_not(x, weight, bias))
    def linear_cpp(x, weight, bias):
        return _packed_gemm(x, weight, bias) if _small(x, weight) else _ops.linear(x, weight, bias)

    @backends.register_kernel("linear_bias_gelu", "cpp",
                              supports=lambda x, weight, bias: _why_not(x, weight, bias))
    def linear_bias_gelu_cpp(x, weight, bias):
        if _small(x, weight):
            return _ops.bias_gelu(_packed_gemm(x, weight, None), bias)
        return _ops.linear_bias_gelu(x, weight, bias)

    @backends.register_kernel("linear_add_layernorm", "cpp",
                              supports=lambda x, weight, bias, residual, ln_weight, ln_bias, eps:
                                  _why_not(x, weight, bias, residual, ln_weight, ln_bias))
    def linear_add_layernorm_cpp(x, weight, bias, residual, ln_weight, ln_bias, eps):
        if _small(x, weight):
            return _ops.add_layernorm(_packed_gemm(x, weight, bias), residual, ln_weight, ln_bias, eps)
        return _ops.linear_add_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps)
    backends.register_kernel(
        "intra_mra", "cpp", supports=lambda h, cu, W, c, v: _why_not(h, W, c, v),
    )(_ops.intra_mra.default)
    backends.register_kernel(
        "inter_mra", "cpp", supports=lambda z, cu, U, g, u: _why_not(z, U, g, u),
    )(_ops.inter_mra.default)
    backends.register_kernel(
        "mra_pool", "cpp",
        supports=lambda h, cu1, cu2, W, c, v, U, g, u: _why_not(h, W, c, v, U, g, u),
    )(_ops.mra_pool.default)

    def _embed_supports(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                        dense, out, out_rows):
        return _why_not(position_table, type_table, weight, bias, table, dense, out) or out_layout_reason(out, "cpp")

    @backends.register_kernel("embed_layernorm", "cpp", supports=_embed_supports)
    def embed_layernorm_cpp(positions, type_ids, position_table, type_table, weight, bias, eps, ids,
                            table, dense, out, out_rows):
        if out is None:
            n = positions.shape[0]
            out = position_table.new_empty((n, position_table.shape[1]))
            out_rows = torch.arange(n, dtype=torch.int64)
        _embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                         dense, out, out_rows)
        return out

    # ---- fake (meta) implementations: shapes and dtypes only.
    @torch.library.register_fake("dm2s2_fast::set_attention")
    def _set_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("dm2s2_fast::add_layernorm")
    def _add_layernorm_fake(x, residual, weight, bias, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dm2s2_fast::bias_gelu")
    def _bias_gelu_fake(x, bias):
        return x.new_empty(x.shape)

    def _linear_fake(x, weight, *rest):
        return x.new_empty((x.shape[0], weight.shape[0]))

    for _name in ("linear", "linear_bias_gelu", "linear_add_layernorm"):
        torch.library.register_fake(f"dm2s2_fast::{_name}")(_linear_fake)

    @torch.library.register_fake("dm2s2_fast::embed_layernorm")
    def _embed_layernorm_fake(positions, type_ids, position_table, type_table, weight, bias, eps, ids,
                              table, dense, out, out_rows):
        return None

    def _pool_fake(x, cu):
        return x.new_empty((cu.shape[0] - 1, x.shape[1])), x.new_empty((x.shape[0],), dtype=_FP32)

    @torch.library.register_fake("dm2s2_fast::intra_mra")
    def _intra_mra_fake(h, cu_seqlens_segment, W, c, v):
        return _pool_fake(h, cu_seqlens_segment)

    @torch.library.register_fake("dm2s2_fast::inter_mra")
    def _inter_mra_fake(z, cu_segments, U, g, u):
        return _pool_fake(z, cu_segments)

    @torch.library.register_fake("dm2s2_fast::mra_pool")
    def _mra_pool_fake(h, cu_seqlens_segment, cu_segments, W, c, v, U, g, u):
        z, alpha = _pool_fake(h, cu_seqlens_segment)
        r, beta = _pool_fake(z, cu_segments)
        return z, r, alpha, beta
