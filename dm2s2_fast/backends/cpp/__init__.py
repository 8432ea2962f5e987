"""The ``cpp`` backend: CPU kernels from ``csrc/cpu/`` over fp32, bf16 and fp16 activations (fp32
compute: accumulators, softmax and LayerNorm statistics), picked at run time by what the CPU has —
AVX512_BF16 dot products for bf16 attention, AVX-512, AVX2/FMA/F16C, or portable code (OpenMP).

Importing this module loads the compiled library (``_extension.load``) and registers the backend;
when the library is absent or fails to load, the backend is registered as unavailable with the
reason, and nothing else happens. The kernels are the ``torch.ops.dm2s2_fast`` operators; the linear
layers go through ``gemm.GemmProvider`` (oneDNN, MKL or the BLAS behind ``at::addmm``, chosen per
CPU by a short measurement; prepacked weights that follow every change of the weights).
"""
from __future__ import annotations

import torch

from ... import _extension, dispatch, tuning
from ..common import new_embedding_rows, out_rows_reason

_reason = _extension.load()


def _fp16_native() -> bool:
    """fp16 models run where the CPU has fp16 arithmetic for the GEMMs (AVX512_FP16 / AMX-FP16)."""
    if _reason is not None:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


DTYPES = (torch.float32, torch.bfloat16) + ((torch.float16,) if _fp16_native() else ())
dispatch.register_backend("cpp", dispatch.Capability(
    devices=("cpu",), dtypes=DTYPES,
    hint=" (the cpp kernels take fp32 and bf16, and fp16 on CPUs with AVX512_FP16; backend='torch' takes any)"),
    _reason)

_applied_isa = ["auto"]
_gemm = None


def cpu_isa() -> str:
    """The CPU kernel table in use ("avx512_bf16", "avx512", "avx2" or "generic"; "amx" where built)."""
    _check()
    return torch.ops.dm2s2_fast._cpu_isa("")


def cpu_info() -> dict:
    """What this CPU runs: ``features`` (the ISA extensions found), ``table`` (the kernel table in
    use), ``set_attention`` ({dtype: how the kernel computes}), ``gemm`` ({(dtype, op, in, out):
    {"small": library, "large": library}} for every linear shape chosen so far) and ``gemm_libraries``
    ({dtype: the libraries that can run it here})."""
    _check()
    info: dict = {"set_attention": {}}
    for line in torch.ops.dm2s2_fast._cpu_info().splitlines():
        key, _, value = line.partition(": ")
        if key.startswith("set_attention."):
            info["set_attention"][key.split(".", 1)[1]] = value
        else:
            info[key] = value
    info["gemm_libraries"] = {str(dt).replace("torch.", ""): _gemm.libraries(dt) for dt in DTYPES}
    info["gemm"] = {(str(k[0]).replace("torch.", ""), k[1], k[2], k[3]): {"small": p.small, "large": p.large}
                    for k, p in sorted(_gemm.plans.items(), key=str)}
    return info


def describe(shapes: tuple = ()) -> list[str]:
    """Lines for ``python -m dm2s2_fast info``: the ISA found, the kernel table, and per op and dtype
    what runs. ``shapes`` ((op, in, out), ...) are linear layers whose GEMM library to decide now
    (timed once per process; otherwise each is decided at its first call)."""
    _check()
    info = cpu_info()
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    lines = [f"cpp: CPU features {info['features']}; kernel table '{info['table']}' (Tuning(cpu_isa=...) "
             f"or torch.ops.dm2s2_fast._cpu_isa picks a lower one); dtypes "
             + ", ".join(names[d] for d in DTYPES)]
    for dt, path in info["set_attention"].items():
        lines.append(f"  set_attention {dt}: {path}")
    if "bf16_dot_products" in info:
        lines.append(f"  AVX512_BF16: {info['bf16_dot_products']}")
    table = info["table"]
    wide = "16-lane AVX-512" if table in ("avx512", "avx512_bf16", "amx") else table
    lines.append(f"  add_layernorm, embed_layernorm, bias_gelu: {wide} (fp32 compute; half precision converted "
                 f"on load, rounded once on store); intra_mra/inter_mra/mra_pool: {table} kernels, the score GEMM "
                 f"in fp32 (bf16: torch's brgemm where it packs bf16, else widened to fp32)")
    lines.append("  linear layers: " + "; ".join(f"{dt}: {'/'.join(libs)}" for dt, libs in info["gemm_libraries"].items())
                 + f" (fp32 outputs >= {gemm_module.HUGE_OUTPUT >> 20} MiB: blas, huge pages; else timed per shape: "
                 f"rows < {gemm_module.SMALL_ROWS} and the rest)")
    for op, k, n in shapes:
        for dt in DTYPES:
            _gemm.plan(op, dt, k, n)
    for (dt, op, k, n), plan in cpu_info()["gemm"].items():
        lines.append(f"    {op} {k}->{n} {dt}: small {plan['small']}, large {plan['large']}")
    return lines


def set_gemm_library(name: str | None) -> None:
    """Run every linear layer with one library ("onednn", "mkl", "blas"), or None: the measured
    choice. For timing studies; a library this CPU cannot run for a call's dtype is ignored."""
    _check()
    if name is not None and name not in ("onednn", "mkl", "blas"):
        raise ValueError(f"unknown GEMM library {name!r}; known: onednn, mkl, blas")
    _gemm.forced = name


def forget_packed() -> None:
    """Drop every prepacked weight (each is repacked on its next use)."""
    _check()
    _gemm.forget()


@torch.no_grad()
def prepare(model) -> None:
    """Choose the GEMM library for each linear layer of ``model`` (a ``reference.DM2S2`` on the CPU)
    and pack its weights now, instead of in its first forward."""
    _check()
    layers = []
    for layer in model.layers:
        layers += [(layer.qkv, "linear"), (layer.attention_output, "linear_add_layernorm"),
                   (layer.intermediate, "linear_bias_gelu"), (layer.output, "linear_add_layernorm")]
    layers.append((model.head.hidden, "linear_bias_gelu"))
    for module, op in layers:
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in DTYPES or w.numel() == 0:
            continue
        plan = _gemm.plan(op, w.dtype, w.shape[1], w.shape[0])
        for library in {plan.small, plan.large}:
            if library in ("onednn", "mkl"):
                _gemm.cache.get(w, library, _gemm._pack_onednn if library == "onednn" else _gemm._pack_mkl)


def _check() -> None:
    if _reason is not None:
        raise dispatch.BackendUnavailable(f"backend 'cpp' is unavailable: {_reason}")


def _use_tuned_isa() -> None:
    """Make the process-wide kernel table the current ``Tuning.cpu_isa``'s. A forced ISA is set at
    every call (the raw ``_cpu_isa`` op may have switched the table since); ``auto`` restores the
    automatic table once after a forced one and otherwise leaves the table as it is."""
    want = tuning.current().cpu_isa
    if want == "auto" and _applied_isa[0] == "auto":
        return
    try:
        torch.ops.dm2s2_fast._cpu_isa(want)
    except RuntimeError as exc:
        raise dispatch.BackendUnavailable(f"Tuning(cpu_isa={want!r}): {exc}") from None
    _applied_isa[0] = want


if _reason is None:
    from . import gemm as gemm_module
    from .gemm import GemmProvider

    _ops = torch.ops.dm2s2_fast
    _gemm = GemmProvider(_ops)

    @dispatch.register_kernel("set_attention", "cpp")
    def set_attention_cpp(q, k, v, cu_seqlens, max_seqlen, scale):
        _use_tuned_isa()
        return _ops.set_attention(q, k, v, cu_seqlens, max_seqlen, scale)

    @dispatch.register_kernel("add_layernorm", "cpp")
    def add_layernorm_cpp(x, residual, weight, bias, eps):
        _use_tuned_isa()
        return _ops.add_layernorm(x, residual, weight, bias, eps)

    @dispatch.register_kernel("bias_gelu", "cpp")
    def bias_gelu_cpp(x, bias):
        _use_tuned_isa()
        return _ops.bias_gelu(x, bias)

    @dispatch.register_kernel("linear", "cpp")
    def linear_cpp(x, weight, bias):
        return _gemm.run(_gemm.library("linear", x, weight), "linear", x, weight, bias)

    @dispatch.register_kernel("linear_bias_gelu", "cpp")
    def linear_bias_gelu_cpp(x, weight, bias):
        _use_tuned_isa()
        return _gemm.run(_gemm.library("linear_bias_gelu", x, weight), "linear_bias_gelu", x, weight, bias)

    @dispatch.register_kernel("linear_add_layernorm", "cpp")
    def linear_add_layernorm_cpp(x, weight, bias, residual, ln_weight, ln_bias, eps):
        _use_tuned_isa()
        return _gemm.run(_gemm.library("linear_add_layernorm", x, weight), "linear_add_layernorm", x, weight,
                         bias, residual, ln_weight, ln_bias, eps)

    @dispatch.register_kernel("intra_mra", "cpp")
    def intra_mra_cpp(h, cu_seqlens_segment, W, c, v):
        _use_tuned_isa()
        return _ops.intra_mra(h, cu_seqlens_segment, W, c, v)

    @dispatch.register_kernel("inter_mra", "cpp")
    def inter_mra_cpp(z, cu_segments_per_sample, U, g, u):
        _use_tuned_isa()
        return _ops.inter_mra(z, cu_segments_per_sample, U, g, u)

    @dispatch.register_kernel("mra_pool", "cpp")
    def mra_pool_cpp(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u):
        _use_tuned_isa()
        return _ops.mra_pool(h, cu_seqlens_segment, cu_segments_per_sample, W, c, v, U, g, u)

    @dispatch.register_kernel(
        "embed_layernorm", "cpp",
        limits=lambda positions, type_ids, position_table, type_table, weight, bias, eps, ids, table, dense, out,
        out_rows: out_rows_reason(out, "cpp"))
    def embed_layernorm_cpp(positions, type_ids, position_table, type_table, weight, bias, eps, ids,
                            table, dense, out, out_rows):
        _use_tuned_isa()
        if out is None:
            out, out_rows = new_embedding_rows(position_table, positions.shape[0])
        _ops.embed_layernorm(positions, type_ids, position_table, type_table, weight, bias, eps, ids, table,
                             dense, out, out_rows)
        return out
