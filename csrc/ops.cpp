// The dm2s2_fast operator library: every schema, declared once. Device kernels register against
// these names with TORCH_LIBRARY_IMPL(dm2s2_fast, CPU|CUDA, m) in csrc/cpu/ and csrc/cuda/; each op's
// fake (meta) implementation sits beside its contract in dm2s2_fast/ops/<op>.py. `variant` forces
// one of a device's kernels where it has several (0 = pick from the shapes; the CUDA values are in
// csrc/cuda/kernels/launchers.h; the CPU has one kernel per op and takes only 0). Ops whose name
// starts with an underscore are private helpers of one backend.
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(dm2s2_fast, m) {
  // q, k, v [N, H, D] (last dim contiguous; may be views of a packed [N, 3, H, D]),
  // cu_seqlens [G+1] int32 -> [N, H, D] contiguous.
  m.def("set_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
        "int variant=0) -> Tensor");
  m.def("add_layernorm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, int variant=0) -> Tensor");
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
        "Tensor(a!) out, Tensor out_rows, int variant=0) -> ()");
  // -> (z [S, d] in h's dtype, alpha [N] fp32)
  m.def("intra_mra(Tensor h, Tensor cu_seqlens_segment, Tensor W, Tensor c, Tensor v) -> (Tensor, Tensor)");
  // -> (r [B, d] in z's dtype, beta [S] fp32)
  m.def("inter_mra(Tensor z, Tensor cu_segments, Tensor U, Tensor g, Tensor u) -> (Tensor, Tensor)");
  // -> (z, r, alpha, beta)
  m.def("mra_pool(Tensor h, Tensor cu_seqlens_segment, Tensor cu_segments, Tensor W, Tensor c, "
        "Tensor v, Tensor U, Tensor g, Tensor u) -> (Tensor, Tensor, Tensor, Tensor)");
  // Which CPU kernel table runs ("amx", "avx512_bf16", "avx512", "avx2" or "generic"); a non-empty
  // request (one of those, or "auto": the best this CPU runs) switches it first. For tests, Tuning
  // and `python -m dm2s2_fast info`.
  m.def("_cpu_isa(str request='') -> str", [](std::string request) -> std::string {
    const char* name = dm2s2_fast::cpu::select_kernels(request.c_str());
    TORCH_CHECK(name != nullptr, "dm2s2_fast: CPU kernels '", request,
                "' are unknown or not supported by this CPU/build (known: auto, amx, avx512_bf16, avx512, avx2, "
                "generic; this CPU: ", dm2s2_fast::cpu::cpu_features(), ")");
    return name;
  });
  // The CPU features found and what the table in use runs per storage dtype, one "key: value" a
  // line (`python -m dm2s2_fast info`).
  m.def("_cpu_info() -> str", []() -> std::string {
    const auto& t = dm2s2_fast::cpu::active_kernels();
    std::string s = std::string("features: ") + dm2s2_fast::cpu::cpu_features() + "\ntable: " + t.name;
    const char* names[dm2s2_fast::cpu::kNumDTypes] = {"float32", "bfloat16", "float16"};
    for (int i = 0; i < dm2s2_fast::cpu::kNumDTypes; ++i)
      s += std::string("\nset_attention.") + names[i] + ": " + t.attention_path[i];
    const int dot = dm2s2_fast::cpu::bf16_dot_faster_probe();
    if (dot >= 0)
      s += std::string("\nbf16_dot_products: vdpbf16ps attention ") + (dot ? "faster" : "slower") +
           " than fp32 FMAs on converted values here (timed once)";
    return s;
  });
  // CPU-only helpers of the cpp backend (no CUDA kernels and no fakes: the backend calls them
  // eagerly). In place on a GEMM's output: x = LayerNorm(x + residual), x = GELU(x + bias).
  m.def("_add_layernorm_(Tensor(a!) x, Tensor residual, Tensor weight, Tensor bias, float eps) -> ()");
  m.def("_bias_gelu_(Tensor(a!) x, Tensor bias) -> ()");
  // A 64-bit fingerprint of `samples` elements spread over t (the packed-weight cache's check for
  // writes its version counter misses).
  m.def("_fingerprint(Tensor t, int samples) -> int");
}
