// Host-side entry points of the dm2s2_fast CUDA kernels: raw pointers, element strides, sizes, a
// stream and a dtype tag. No torch here; csrc/cuda/ops_cuda.cu adapts tensors to these calls.
//
// Every function launches on `stream`, skips the launch when there is nothing to do, checks
// cudaGetLastError() after each launch and returns the first error (cudaSuccess otherwise).
// Strides are in elements; the last dimension of every matrix is contiguous. Offsets (cu_*) are
// int32 device arrays, non-decreasing from 0 to the row count (the ops validate them).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

// The torch glue (ops_cuda.cu) declares these weak, so that a build which compiled the glue but
// not csrc/cuda/kernels/*.cu still loads (CPU ops intact) and just registers no CUDA kernels.
#ifndef DM2S2_LAUNCHER_DECL
#define DM2S2_LAUNCHER_DECL
#endif

namespace dm2s2 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------- add_layernorm
// out[i] = LayerNorm(x[i] + residual[i]) * weight + bias over d columns; statistics in fp32.
// variant: which row kernel (kLayerNormAuto: half-warp rows when they fit, else warp rows).
constexpr int kLayerNormAuto = 0, kLayerNormWarp = 1, kLayerNormHalf = 2;
DM2S2_LAUNCHER_DECL cudaError_t add_layernorm(DType dt, const void* x, int64_t x_rs, const void* residual, int64_t res_rs,
                          const void* weight, const void* bias, void* out, int64_t out_rs, int64_t rows,
                          int64_t d, float eps, cudaStream_t stream, int variant);

// ---------------------------------------------------------------- bias_gelu
// out[i, j] = GELU_erf(x[i, j] + bias[j]), computed in fp32.
DM2S2_LAUNCHER_DECL cudaError_t bias_gelu(DType dt, const void* x, int64_t x_rs, const void* bias, void* out, int64_t out_rs,
                      int64_t rows, int64_t cols, cudaStream_t stream);

// ---------------------------------------------------------------- embed_layernorm
// row i: e = content_i + position_table[positions[i]] + type_table[type_ids[i]],
// out[out_rows[i]] = LayerNorm(e) * weight + bias; content_i = table[ids[i]] or dense[i].
// Index arrays are int32 or int64 (the *_64 flags). An index out of range never reads out of
// bounds: that row is written as NaN (or skipped when out_rows[i] itself is out of range).
struct EmbedArgs {
  DType dt = DType::kFloat32;
  int64_t n = 0;  // elements (rows of this call)
  int64_t d = 0;  // hidden size
  const void* positions = nullptr;
  bool positions_64 = false;
  const void* type_ids = nullptr;
  bool type_ids_64 = false;
  const void* position_table = nullptr;
  int64_t position_rows = 0, position_rs = 0;
  const void* type_table = nullptr;
  int64_t type_rows = 0, type_rs = 0;
  const void* weight = nullptr;
  const void* bias = nullptr;
  float eps = 1e-12f;
  const void* ids = nullptr;  // nullptr: dense content
  bool ids_64 = false;
  const void* table = nullptr;
  int64_t table_rows = 0, table_rs = 0;
  const void* dense = nullptr;
  int64_t dense_rs = 0;
  void* out = nullptr;
  int64_t out_total_rows = 0, out_rs = 0;
  const void* out_rows = nullptr;  // nullptr: row i goes to out[i]
  bool out_rows_64 = false;
  int ln_variant = 0;  // kLayerNormAuto / kLayerNormWarp / kLayerNormHalf, as for add_layernorm
};
DM2S2_LAUNCHER_DECL cudaError_t embed_layernorm(const EmbedArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------- set_attention
// out[n, h, :] = softmax(scale * q[n, h, :] . k[m, h, :]^T over m in n's group) @ v[m, h, :].
struct AttnArgs {
  DType dt = DType::kFloat32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_rs = 0, q_hs = 0, k_rs = 0, k_hs = 0, v_rs = 0, v_hs = 0, o_rs = 0, o_hs = 0;
  const int* cu_seqlens = nullptr;
  int64_t groups = 0, total = 0, heads = 0, head_dim = 0, max_seqlen = 0;
  float scale = 1.0f;
  // Tensor-core kernel: 0 = pick from the group lengths, 64 or 32 = force that tiled kernel,
  // kAttnTileGroup = force the whole-group kernel (head_dim 32/64; else the 64 tile).
  int tile = 0;
};
constexpr int kAttnTileGroup = 1;
DM2S2_LAUNCHER_DECL cudaError_t set_attention(const AttnArgs& args, cudaStream_t stream);
// Which kernel set_attention would run: 64 / 32 = tiled tensor-core kernel, kAttnTileGroup (1) =
// whole-group tensor-core kernel, 0 = the SIMT kernel, -1 = none (head_dim over 256).
DM2S2_LAUNCHER_DECL int set_attention_path(const AttnArgs& args);

// ---------------------------------------------------------------- IntraMRA / InterMRA
// Scores s_i = v . tanh(W x_i + c) (W [a, d]), as `nsplit` partial sums part[p * rows + i] over
// column blocks of W (summed in a fixed order by mra_segment_pool: deterministic).
struct ScorePlan {
  bool tensor_cores = false;  // false: the caller supplies P = x W^T in fp32 (mra_scores_from_proj)
  int bm = 128, bn = 128;     // tile of the tensor-core kernel
  int nsplit = 1;             // partial sums per row
  int chunks_per_split = 1;
};
DM2S2_LAUNCHER_DECL ScorePlan mra_score_plan(DType dt, const void* x, int64_t x_rs, int64_t rows, int64_t d, const void* W,
                         int64_t a);
// Tensor-core path (fp16/bf16, d % 8 == 0, 16-byte aligned rows): part has plan.nsplit * rows floats.
DM2S2_LAUNCHER_DECL cudaError_t mra_scores_mma(const ScorePlan& plan, DType dt, const void* x, int64_t x_rs, int64_t rows,
                           int64_t d, const void* W, int64_t a, const void* c, const void* v, float* part,
                           cudaStream_t stream);
// From a precomputed projection P [rows, a] fp32 (contiguous): part[i] = v . tanh(P[i] + c).
// c, v are in dtype dt.
DM2S2_LAUNCHER_DECL cudaError_t mra_scores_from_proj(DType dt, const float* P, int64_t rows, int64_t a, const void* c,
                                 const void* v, float* part, cudaStream_t stream);
// Per group g of rows [cu[g], cu[g+1]): w = softmax(s) (max-subtracted, fp32) written to
// weights[i]; pooled[g] = sum_i (1 + w_i) x_i / (L + 1) in dtype dt (0 for an empty group).
DM2S2_LAUNCHER_DECL cudaError_t mra_segment_pool(DType dt, const void* x, int64_t x_rs, int64_t rows, int64_t d, const int* cu,
                             int64_t groups, const float* part, int nsplit, float* weights, void* pooled,
                             int64_t pooled_rs, cudaStream_t stream);

}  // namespace dm2s2
