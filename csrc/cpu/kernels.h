// Torch-free CPU kernel interface (fp32). Implementations of the same table: a portable one
// (kernels_generic.cpp, baseline ISA), an AVX2/FMA one (kernels_avx2.cpp, compiled with
// -mavx2 -mfma) and an AVX-512 one for set_attention (kernels_avx512.cpp); cpu_ops.cpp picks one
// at load time from what the running CPU supports.
//
// Every kernel works on a range [begin, end) of independent rows / groups / tasks, so the torch
// glue can split the work over threads with at::parallel_for. Kernels never allocate: scratch is
// handed in. Strides are in elements; the last dim of every tensor is contiguous.
// Kernels read only indices the caller has validated, except the embedding gathers, which check
// every index themselves and report a bad row (they are the only data-dependent reads).
#pragma once

#include <cstdint>

namespace dm2s2_fast {
namespace cpu {

// Query rows of one attention task: at most this many (the glue splits longer groups, so that
// one long group still spreads over the threads).
constexpr int64_t kAttnQBlock = 128;

// Scratch floats one worker needs for tasks of groups up to L long with head dim D
// (K^T [D, Lp], V [Lp, Dp], 8 score rows [8, Lp], row statistics; 64-byte aligned base), for
// kernels whose tiles are up to 32 columns (Lp) and 16 lanes (Dp) wide.
inline int64_t attn_scratch_floats(int64_t L, int64_t D) {
  const int64_t Lp = (L + 31) / 32 * 32, Dp = (D + 15) / 16 * 16;
  return D * Lp + Lp * Dp + 8 * Lp + 64;
}

struct AttnParams {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head;  // strides (elements)
  int64_t D;
  float scale;
};

// Index vector that may be int32 or int64.
struct Index {
  const void* ptr = nullptr;
  bool is64 = false;
  inline int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

struct EmbedParams {
  // content: table[ids[i]] (table != nullptr) or dense[i]
  const float* table;
  int64_t table_rows, table_row;
  Index ids;
  const float* dense;
  int64_t dense_row;
  const float* pos_table;
  int64_t pos_rows, pos_row;
  Index positions;
  const float* type_table;
  int64_t type_rows, type_row;
  Index type_ids;
  const float* weight;
  const float* bias;
  float* out;
  int64_t out_rows_total, out_row;
  Index out_rows;
  int64_t d;
  float eps;
};

struct KernelTable {
  const char* name;
  // Attention of query rows [q_begin, q_end) (absolute row numbers, inside the group, at most
  // kAttnQBlock of them) over the group's rows [g_begin, g_end), for one head.
  void (*attention)(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin,
                    int64_t q_end, int64_t head, float* scratch);
  // y[i] = LayerNorm(x[i] + r[i]) * w + b for rows [begin, end).
  void (*add_layernorm)(const float* x, int64_t x_row, const float* r, int64_t r_row,
                        const float* w, const float* b, float* y, int64_t y_row, int64_t d,
                        float eps, int64_t begin, int64_t end);
  // y[i] = GELU(x[i] + b) (exact erf form) for rows [begin, end).
  void (*bias_gelu)(const float* x, int64_t x_row, const float* b, float* y, int64_t y_row,
                    int64_t f, int64_t begin, int64_t end);
  // Elements [begin, end); returns the first bad element (an index out of range) or -1.
  int64_t (*embed_layernorm)(const EmbedParams& p, int64_t begin, int64_t end);
  // Residual-attention pooling of groups [g_begin, g_end): pre [n, a] holds W x + c; scores
  // s_i = v . tanh(pre_i), weights = softmax over the group (written to `weights`),
  // pooled[g] = sum_i (1 + w_i) / (L + 1) x_i (zero for an empty group).
  void (*mra_pool)(const float* x, int64_t x_row, const float* pre, int64_t pre_row,
                   const float* v, int64_t a, const int32_t* cu, float* weights, float* pooled,
                   int64_t pooled_row, int64_t d, int64_t g_begin, int64_t g_end);
};

const KernelTable& generic_kernels();
#if defined(DM2S2_FAST_HAVE_AVX2)
const KernelTable& avx2_kernels();
#endif
#if defined(DM2S2_FAST_HAVE_AVX512)
// The AVX2 table with an AVX-512 set_attention (the one compute-bound op; the others are
// memory-bound and gain nothing from wider vectors).
const KernelTable& avx512_kernels();
#endif

// The table in use, and its selection ("" keeps it; "auto", "generic", "avx2", "avx512"). Returns
// the name of the table in use, or nullptr when the request is unknown or unsupported here.
const KernelTable& active_kernels();
const char* select_kernels(const char* request);

}  // namespace cpu
}  // namespace dm2s2_fast
