// The dm2s2_fast operator library: every schema, declared once. Device kernels register against
// these names with TORCH_LIBRARY_IMPL(dm2s2_fast, CPU|CUDA, m) in csrc/cpu/ and csrc/cuda/; the
// fake (meta) implementations live in dm2s2_fast/cpp.py (torch.library.register_fake).
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(dm2s2_fast, m) {
  // q, k, v [N, H, D] (last dim contiguous; may be views of a packed [N, 3, H, D]),
  // cu_seqlens [G+1] int32 -> [N, H, D] contiguous.
  m.def("set_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale) -> Tensor");
  m.def("add_layernorm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("bias_gelu(Tensor x, Tensor bias) -> Tensor");
  // Linear layers x [N, k] @ weight [out, k]^T (+ bias): the GEMM stays with torch's BLAS; the
  // output buffer and the epilogue done in it are ours. -> [N, out]
  m.def("linear(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("linear_bias_gelu(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("linear_add_layernorm(Tensor x, Tensor weight, Tensor bias, Tensor residual, Tensor ln_weight, "
        "Tensor ln_bias, float eps) -> Tensor");
  // Writes LayerNorm(content + position + type) of element i into out[out_rows[i]]; returns nothing.
  m.def("embed_layernorm(Tensor positions, Tensor type_ids, Tensor position_table, Tensor type_table, "
        "Tensor weight, Tensor bias, float eps, Tensor? ids, Tensor? table, Tensor? dense, "
        "Tensor(a!) out, Tensor out_rows) -> ()");
  // -> (z [S, d] in h's dtype, alpha [N] fp32)
  m.def("intra_mra(Tensor h, Tensor cu_seqlens_segment, Tensor W, Tensor c, Tensor v) -> (Tensor, Tensor)");
  // -> (r [B, d] in z's dtype, beta [S] fp32)
  m.def("inter_mra(Tensor z, Tensor cu_segments, Tensor U, Tensor g, Tensor u) -> (Tensor, Tensor)");
  // -> (z, r, alpha, beta)
  m.def("mra_pool(Tensor h, Tensor cu_seqlens_segment, Tensor cu_segments, Tensor W, Tensor c, "
        "Tensor v, Tensor U, Tensor g, Tensor u) -> (Tensor, Tensor, Tensor, Tensor)");
  // Which CPU kernel table runs ("avx512", "avx2" or "generic"); a non-empty request ("auto",
  // "avx512", "avx2", "generic") switches it first. For tests and `python -m dm2s2_fast info`.
  m.def("_cpu_isa(str request='') -> str", [](std::string request) -> std::string {
    const char* name = dm2s2_fast::cpu::select_kernels(request.c_str());
    TORCH_CHECK(name != nullptr, "dm2s2_fast: CPU kernels '", request,
                "' are unknown or not supported by this CPU/build (known: auto, avx512, avx2, generic)");
    return name;
  });
}
