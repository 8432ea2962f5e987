// CUDA implementations of the dm2s2_fast operators (schemas in csrc/ops.cpp): argument checks,
// output allocation and the adaptation of tensors to the torch-free launchers in
// csrc/cuda/kernels/ (launchers.h). Every launch goes on the current CUDA stream of the inputs'
// device, under a device guard, and every launcher's cudaError_t is checked.
//
// Only compiled when the installed torch has CUDA (CMakeLists.txt globs csrc/cuda/*.cu and
// csrc/cuda/kernels/*.cu). Includes only c10/cuda headers (not ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS/cuSPARSE/cuSOLVER headers the build does not otherwise need).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

// Weak: when the kernels (csrc/cuda/kernels/*.cu) are not linked in, the launchers resolve to
// null, the library still loads, and no CUDA kernels are registered (the cuda backend then says so).
#define DM2S2_LAUNCHER_DECL __attribute__((weak))
#include "kernels/launchers.h"

namespace {

using dm2s2::DType;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// The set-attention and MRA kernels step int32 row counters up to 4096 past the last row (block
// strides): rows stop that far short of 2^31 (dm2s2_fast/cuda.py's MAX_ROWS, which auto checks).
constexpr int64_t kMaxRows = kInt32Max - 4096;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dm2s2_fast (cuda): ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "dm2s2_fast (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "dm2s2_fast (cuda): ", name, " is on ", t.device(),
              ", expected ", like.device());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dm2s2_fast (cuda): ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
}

// A matrix whose last dim is contiguous (views keep their row stride), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.dim() >= 1 && t.size(-1) > 1 && t.stride(-1) != 1) return t.contiguous();
  if (t.dim() >= 2) {
    for (int64_t i = 0; i < t.dim() - 1; ++i) {
      if (t.stride(i) < 0) return t.contiguous();
    }
  }
  return t;
}

at::Tensor offsets_int32(const at::Tensor& cu, const char* name, const at::Tensor& like) {
  check_cuda(cu, name, like);
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "dm2s2_fast (cuda): ", name, " must be a 1-D tensor of G+1 offsets");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "dm2s2_fast (cuda): ", name, " must be int32, got ", cu.scalar_type());
  return cu.contiguous();
}

at::Tensor index_tensor(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  check_cuda(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "dm2s2_fast (cuda): ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == n, "dm2s2_fast (cuda): ", name, " must have ", n, " entries, got ", t.numel());
  return t.reshape({-1}).contiguous();
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  check_cuda(t, name, like);
  check_same_dtype(t, name, like);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "dm2s2_fast (cuda): ", name, " must have shape [", n, "], got ",
              t.sizes());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// The kernels take their scalars as fp32: NaN, inf or a value beyond fp32's range would be undefined
// there, and a negative LayerNorm eps makes a constant row's variance negative (rsqrt -> NaN).
void check_scalar(double value, const char* name, bool nonnegative) {
  TORCH_CHECK(std::isfinite(value) && std::fabs(value) <= static_cast<double>(std::numeric_limits<float>::max()) &&
                  (!nonnegative || value >= 0.0),
              "dm2s2_fast (cuda): ", name, " must be a finite", nonnegative ? " non-negative" : "",
              " number within fp32's range, got ", value);
}

// An output written in place must share no memory with what the kernel reads while other CTAs
// write it. (Distinct out_rows are not checked here: that needs the indices on the host, a device
// sync on every engine forward; the public op checks them, and a duplicate only races two complete
// rows into one, never writes outside out.)
void check_not_aliased(const at::Tensor& out, const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.numel() == 0 || !out.is_alias_of(t), "dm2s2_fast (cuda): out shares memory with ",
              name, "; give a separate output buffer");
}

// ------------------------------------------------------------------ set_attention
at::Tensor set_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                              const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, int64_t variant) {
  TORCH_CHECK(q_in.is_cuda(), "dm2s2_fast (cuda): q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q_in.device());
  check_cuda(k_in, "k", q_in);
  check_cuda(v_in, "v", q_in);
  const DType dt = dtype_of(q_in, "q");
  check_same_dtype(k_in, "k", q_in);
  check_same_dtype(v_in, "v", q_in);
  TORCH_CHECK(q_in.dim() == 3, "dm2s2_fast (cuda): q must be [N, H, D], got ", q_in.sizes());
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "dm2s2_fast (cuda): q, k, v must share a shape, got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes());
  TORCH_CHECK(max_seqlen >= 0, "dm2s2_fast (cuda): max_seqlen must be >= 0, got ", max_seqlen);
  check_scalar(scale, "scale", false);
  const at::Tensor cu = offsets_int32(cu_seqlens, "cu_seqlens", q_in);
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  at::Tensor out = at::empty({N, H, D}, q.options());
  if (N == 0 || H == 0 || D == 0) return out;
  TORCH_CHECK(N <= kMaxRows, "dm2s2_fast (cuda): set_attention takes up to 2^31-4097 rows, got ", N);
  TORCH_CHECK(D <= 256, "dm2s2_fast (cuda): set_attention supports head_dim <= 256, got ", D);

  dm2s2::AttnArgs a;
  a.dt = dt;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.q_rs = q.stride(0);
  a.q_hs = q.stride(1);
  a.k_rs = k.stride(0);
  a.k_hs = k.stride(1);
  a.v_rs = v.stride(0);
  a.v_hs = v.stride(1);
  a.o_rs = out.stride(0);
  a.o_hs = out.stride(1);
  a.cu_seqlens = cu.data_ptr<int>();
  a.groups = cu.numel() - 1;
  a.total = N;
  a.heads = H;
  a.head_dim = D;
  a.max_seqlen = max_seqlen;
  a.scale = static_cast<float>(scale);
  // variant: 0 picks from the group lengths; 32 / 64 force the tiled tensor-core kernel of that tile,
  // kAttnTileGroup the whole-group kernel (Tuning.cuda_attention).
  TORCH_CHECK(variant == 0 || variant == 32 || variant == 64 || variant == dm2s2::kAttnTileGroup,
              "dm2s2_fast (cuda): set_attention variant must be 0, 32, 64 or ", dm2s2::kAttnTileGroup, ", got ", variant);
  a.tile = static_cast<int>(variant);
  C10_CUDA_CHECK(dm2s2::set_attention(a, current_stream()));
  return out;
}

// ------------------------------------------------------------------ add_layernorm / bias_gelu
// variant: the LayerNorm row kernel, kLayerNormAuto / kLayerNormWarp / kLayerNormHalf
// (Tuning.cuda_layernorm).
int layernorm_variant(int64_t variant) {
  TORCH_CHECK(variant == dm2s2::kLayerNormAuto || variant == dm2s2::kLayerNormWarp || variant == dm2s2::kLayerNormHalf,
              "dm2s2_fast (cuda): the LayerNorm variant must be 0 (auto), 1 (warp) or 2 (half), got ", variant);
  return static_cast<int>(variant);
}

at::Tensor add_layernorm_cuda(const at::Tensor& x_in, const at::Tensor& residual_in, const at::Tensor& weight_in,
                              const at::Tensor& bias_in, double eps, int64_t variant) {
  TORCH_CHECK(x_in.is_cuda(), "dm2s2_fast (cuda): x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const DType dt = dtype_of(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "dm2s2_fast (cuda): x must be [N, d], got ", x_in.sizes());
  check_cuda(residual_in, "residual", x_in);
  check_same_dtype(residual_in, "residual", x_in);
  TORCH_CHECK(residual_in.sizes() == x_in.sizes(), "dm2s2_fast (cuda): residual must have shape ", x_in.sizes(),
              ", got ", residual_in.sizes());
  const int64_t N = x_in.size(0), d = x_in.size(1);
  check_vector(weight_in, "weight", d, x_in);
  check_vector(bias_in, "bias", d, x_in);
  check_scalar(eps, "eps", true);
  const at::Tensor x = rows_contiguous(x_in), residual = rows_contiguous(residual_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor out = at::empty({N, d}, x.options());
  if (N == 0 || d == 0) return out;
  C10_CUDA_CHECK(dm2s2::add_layernorm(dt, x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                                      weight.data_ptr(), bias.data_ptr(), out.data_ptr(), out.stride(0), N, d,
                                      static_cast<float>(eps), current_stream(), layernorm_variant(variant)));
  return out;
}

at::Tensor bias_gelu_cuda(const at::Tensor& x_in, const at::Tensor& bias_in) {
  TORCH_CHECK(x_in.is_cuda(), "dm2s2_fast (cuda): x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const DType dt = dtype_of(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "dm2s2_fast (cuda): x must be [N, f], got ", x_in.sizes());
  const int64_t N = x_in.size(0), f = x_in.size(1);
  check_vector(bias_in, "bias", f, x_in);
  const at::Tensor x = rows_contiguous(x_in), bias = bias_in.contiguous();
  at::Tensor out = at::empty({N, f}, x.options());
  if (N == 0 || f == 0) return out;
  C10_CUDA_CHECK(dm2s2::bias_gelu(dt, x.data_ptr(), x.stride(0), bias.data_ptr(), out.data_ptr(), out.stride(0),
                                  N, f, current_stream()));
  return out;
}

// ------------------------------------------------------------------ embed_layernorm
void embed_layernorm_cuda(const at::Tensor& positions_in, const at::Tensor& type_ids_in,
                          const at::Tensor& position_table_in, const at::Tensor& type_table_in,
                          const at::Tensor& weight_in, const at::Tensor& bias_in, double eps,
                          const std::optional<at::Tensor>& ids_in, const std::optional<at::Tensor>& table_in,
                          const std::optional<at::Tensor>& dense_in, at::Tensor& out,
                          const at::Tensor& out_rows_in, int64_t variant) {
  const at::Tensor& like = position_table_in;
  TORCH_CHECK(like.is_cuda(), "dm2s2_fast (cuda): position_table must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(like.device());
  const DType dt = dtype_of(like, "position_table");
  TORCH_CHECK(like.dim() == 2, "dm2s2_fast (cuda): position_table must be [P, d], got ", like.sizes());
  const int64_t d = like.size(1);
  check_cuda(type_table_in, "type_table", like);
  check_same_dtype(type_table_in, "type_table", like);
  TORCH_CHECK(type_table_in.dim() == 2 && type_table_in.size(1) == d,
              "dm2s2_fast (cuda): type_table must be [T, ", d, "], got ", type_table_in.sizes());
  check_vector(weight_in, "weight", d, like);
  check_vector(bias_in, "bias", d, like);
  const bool has_ids = ids_in.has_value() && ids_in->defined();
  const bool has_table = table_in.has_value() && table_in->defined();
  const bool has_dense = dense_in.has_value() && dense_in->defined();
  TORCH_CHECK(has_ids == has_table && has_ids != has_dense,
              "dm2s2_fast (cuda): embed_layernorm takes either ids and table, or dense");
  const int64_t n = positions_in.numel();
  check_cuda(out, "out", like);
  check_same_dtype(out, "out", like);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == d, "dm2s2_fast (cuda): out must be [N, ", d, "], got ",
              out.sizes());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, "dm2s2_fast (cuda): out must have a contiguous last dim");
  TORCH_CHECK(out.size(0) <= 1 || out.stride(0) >= d, "dm2s2_fast (cuda): out rows overlap (row stride ",
              out.stride(0), " < ", d, ")");
  check_scalar(eps, "eps", true);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&position_table_in, "position_table"},
                                {&type_table_in, "type_table"}, {&weight_in, "weight"}, {&bias_in, "bias"},
                                {&positions_in, "positions"}, {&type_ids_in, "type_ids"}, {&out_rows_in, "out_rows"}}) {
    check_not_aliased(out, *t, name);
  }
  if (has_ids) {
    check_not_aliased(out, *ids_in, "ids");
    check_not_aliased(out, *table_in, "table");
  } else {
    check_not_aliased(out, *dense_in, "dense");
  }
  const at::Tensor positions = index_tensor(positions_in, "positions", n, like);
  const at::Tensor type_ids = index_tensor(type_ids_in, "type_ids", n, like);
  const at::Tensor out_rows = index_tensor(out_rows_in, "out_rows", n, like);
  const at::Tensor position_table = rows_contiguous(position_table_in);
  const at::Tensor type_table = rows_contiguous(type_table_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor ids, table, dense;
  if (has_ids) {
    ids = index_tensor(*ids_in, "ids", n, like);
    check_cuda(*table_in, "table", like);
    check_same_dtype(*table_in, "table", like);
    TORCH_CHECK(table_in->dim() == 2 && table_in->size(1) == d, "dm2s2_fast (cuda): table must be [R, ", d,
                "], got ", table_in->sizes());
    table = rows_contiguous(*table_in);
  } else {
    check_cuda(*dense_in, "dense", like);
    check_same_dtype(*dense_in, "dense", like);
    TORCH_CHECK(dense_in->dim() == 2 && dense_in->size(0) == n && dense_in->size(1) == d,
                "dm2s2_fast (cuda): dense must be [", n, ", ", d, "], got ", dense_in->sizes());
    dense = rows_contiguous(*dense_in);
  }
  if (n == 0 || d == 0) return;

  dm2s2::EmbedArgs a;
  a.dt = dt;
  a.n = n;
  a.d = d;
  a.positions = positions.data_ptr();
  a.positions_64 = positions.scalar_type() == at::kLong;
  a.type_ids = type_ids.data_ptr();
  a.type_ids_64 = type_ids.scalar_type() == at::kLong;
  a.position_table = position_table.data_ptr();
  a.position_rows = position_table.size(0);
  a.position_rs = position_table.stride(0);
  a.type_table = type_table.data_ptr();
  a.type_rows = type_table.size(0);
  a.type_rs = type_table.stride(0);
  a.weight = weight.data_ptr();
  a.bias = bias.data_ptr();
  a.eps = static_cast<float>(eps);
  if (has_ids) {
    a.ids = ids.data_ptr();
    a.ids_64 = ids.scalar_type() == at::kLong;
    a.table = table.data_ptr();
    a.table_rows = table.size(0);
    a.table_rs = table.stride(0);
  } else {
    a.dense = dense.data_ptr();
    a.dense_rs = dense.stride(0);
  }
  a.out = out.data_ptr();
  a.out_total_rows = out.size(0);
  a.out_rs = out.stride(0);
  a.out_rows = out_rows.data_ptr();
  a.out_rows_64 = out_rows.scalar_type() == at::kLong;
  a.ln_variant = layernorm_variant(variant);
  C10_CUDA_CHECK(dm2s2::embed_layernorm(a, current_stream()));
}

// ------------------------------------------------------------------ IntraMRA / InterMRA
// One level: scores of x's rows (tensor cores, or cuBLAS fp32 projection + epilogue), then the
// per-group softmax and residual pool. Returns (pooled [G, d] in x's dtype, weights [rows] fp32).
std::tuple<at::Tensor, at::Tensor> score_and_pool(const at::Tensor& x_in, const at::Tensor& cu_in,
                                                  const at::Tensor& W_in, const at::Tensor& c_in,
                                                  const at::Tensor& v_in, const char* x_name, const char* cu_name) {
  const DType dt = dtype_of(x_in, x_name);
  TORCH_CHECK(x_in.dim() == 2, "dm2s2_fast (cuda): ", x_name, " must be 2-D, got ", x_in.sizes());
  const int64_t rows = x_in.size(0), d = x_in.size(1);
  TORCH_CHECK(rows <= kMaxRows, "dm2s2_fast (cuda): up to 2^31-4097 rows, got ", rows);
  const at::Tensor cu = offsets_int32(cu_in, cu_name, x_in);
  check_cuda(W_in, "W", x_in);
  check_same_dtype(W_in, "W", x_in);
  TORCH_CHECK(W_in.dim() == 2 && W_in.size(1) == d, "dm2s2_fast (cuda): W must be [a, ", d, "], got ",
              W_in.sizes());
  const int64_t a = W_in.size(0);
  check_vector(c_in, "c", a, x_in);
  check_vector(v_in, "v", a, x_in);
  const at::Tensor x = rows_contiguous(x_in);
  const at::Tensor W = W_in.contiguous(), c = c_in.contiguous(), v = v_in.contiguous();
  const int64_t groups = cu.numel() - 1;
  at::Tensor pooled = at::empty({groups, d}, x.options());
  at::Tensor weights = at::empty({rows}, x.options().dtype(at::kFloat));
  if (groups == 0 || (d == 0 && rows == 0)) return {pooled, weights};
  const cudaStream_t stream = current_stream();

  const dm2s2::ScorePlan plan = dm2s2::mra_score_plan(dt, x.data_ptr(), x.stride(0), rows, d, W.data_ptr(), a);
  at::Tensor part;
  int nsplit = 1;
  if (rows > 0 && plan.tensor_cores) {
    nsplit = plan.nsplit;
    part = at::empty({static_cast<int64_t>(nsplit) * rows}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(dm2s2::mra_scores_mma(plan, dt, x.data_ptr(), x.stride(0), rows, d, W.data_ptr(), a,
                                         c.data_ptr(), v.data_ptr(), part.data_ptr<float>(), stream));
  } else {
    // fp32 (the 1e-5 contract rules out TF32 and bf16 projections) or a layout the tensor-core
    // kernel does not take: P = x W^T in fp32 by cuBLAS, then the tanh/v epilogue.
    part = at::empty({rows}, x.options().dtype(at::kFloat));
    if (rows > 0) {
      const at::Tensor P = at::mm(x.to(at::kFloat), W.to(at::kFloat).t()).contiguous();
      C10_CUDA_CHECK(dm2s2::mra_scores_from_proj(dt, P.data_ptr<float>(), rows, a, c.data_ptr(), v.data_ptr(),
                                                 part.data_ptr<float>(), stream));
    }
  }
  C10_CUDA_CHECK(dm2s2::mra_segment_pool(dt, x.data_ptr(), x.stride(0), rows, d, cu.data_ptr<int>(), groups,
                                         rows > 0 ? part.data_ptr<float>() : nullptr, nsplit,
                                         rows > 0 ? weights.data_ptr<float>() : nullptr, pooled.data_ptr(),
                                         pooled.stride(0), stream));
  return {pooled, weights};
}

std::tuple<at::Tensor, at::Tensor> intra_mra_cuda(const at::Tensor& h, const at::Tensor& cu_seqlens_segment,
                                                  const at::Tensor& W, const at::Tensor& c, const at::Tensor& v) {
  TORCH_CHECK(h.is_cuda(), "dm2s2_fast (cuda): h must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  return score_and_pool(h, cu_seqlens_segment, W, c, v, "h", "cu_seqlens_segment");
}

std::tuple<at::Tensor, at::Tensor> inter_mra_cuda(const at::Tensor& z, const at::Tensor& cu_segments,
                                                  const at::Tensor& U, const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(z.is_cuda(), "dm2s2_fast (cuda): z must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(z.device());
  return score_and_pool(z, cu_segments, U, g, u, "z", "cu_segments");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mra_pool_cuda(
    const at::Tensor& h, const at::Tensor& cu_seqlens_segment, const at::Tensor& cu_segments, const at::Tensor& W,
    const at::Tensor& c, const at::Tensor& v, const at::Tensor& U, const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(h.is_cuda(), "dm2s2_fast (cuda): h must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  TORCH_CHECK(cu_segments.dim() == 1 && cu_segments.numel() >= 1,
              "dm2s2_fast (cuda): cu_segments must be a 1-D tensor of B+1 offsets");
  auto [z, alpha] = score_and_pool(h, cu_seqlens_segment, W, c, v, "h", "cu_seqlens_segment");
  // InterMRA reads z as the op returns it (h's dtype), so mra_pool == inter_mra(intra_mra(...)).
  auto [r, beta] = score_and_pool(z, cu_segments, U, g, u, "z", "cu_segments");
  return {z, r, alpha, beta};
}

bool kernels_linked() {
  return &dm2s2::add_layernorm != nullptr && &dm2s2::bias_gelu != nullptr && &dm2s2::embed_layernorm != nullptr &&
         &dm2s2::set_attention != nullptr && &dm2s2::set_attention_path != nullptr &&
         &dm2s2::mra_score_plan != nullptr && &dm2s2::mra_scores_mma != nullptr &&
         &dm2s2::mra_scores_from_proj != nullptr && &dm2s2::mra_segment_pool != nullptr;
}

}  // namespace

TORCH_LIBRARY_IMPL(dm2s2_fast, CUDA, m) {
  if (!kernels_linked()) return;  // see DM2S2_LAUNCHER_DECL above
  m.impl("set_attention", &set_attention_cuda);
  m.impl("add_layernorm", &add_layernorm_cuda);
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("embed_layernorm", &embed_layernorm_cuda);
  m.impl("intra_mra", &intra_mra_cuda);
  m.impl("inter_mra", &inter_mra_cuda);
  m.impl("mra_pool", &mra_pool_cuda);
}
