// Torch-free CPU kernel interface. Activations and weights are stored in fp32, bf16 or fp16 (the
// model's dtype); every kernel computes in fp32 (fp32 accumulators, softmax and LayerNorm
// statistics) and rounds to the storage dtype once, when it stores. Tables of the same kernels
// (cpu_ops.cpp picks one at load time from what the running CPU supports):
//   generic      portable scalar code, baseline ISA (kernels_generic.cpp)
//   avx2         AVX2/FMA/F16C (kernels_avx2.cpp, compiled with -mavx2 -mfma -mf16c)
//   avx512       the avx2 table with an AVX-512 set_attention (kernels_avx512.cpp)
//   avx512_bf16  the avx512 table with a bf16 set_attention on AVX512_BF16 dot products
//                (vdpbf16ps, fp32 accumulation; kernels_avx512bf16.cpp)
//   amx          the avx512_bf16 table with a bf16 set_attention on AMX tiles (kernels_amx.cpp)
// Each entry is an array indexed by DType. Where a table has no bf16/fp16 instructions, the
// half-precision entries convert to fp32 as they load (bf16: a shift; fp16: F16C or scalar).
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

// Storage dtype of a kernel's activations (compute is fp32 whatever it is).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
constexpr int kNumDTypes = 3;

// Half-precision storage as raw bits (types only: each kernel file converts with its own code).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Query rows of one attention task: at most this many (the glue splits longer groups, so that
// one long group still spreads over the threads).
constexpr int64_t kAttnQBlock = 128;

// Scratch floats one worker needs for attention tasks of groups up to L long with head dim D and up
// to `heads` heads a task, for any kernel of any table: per head K^T [Dp, Lp] and V [Lp, Dp] packed
// (fp32, or pairs of half values), 16 score rows [16, Lp] (fp32 scores and their half-precision
// copies), 16 fp32 q rows and 16 fp32 output rows [16, Dp], row statistics; a 64-byte aligned base.
// Lp, Dp: L and D rounded up to 32.
inline int64_t attn_scratch_floats(int64_t L, int64_t D, int64_t heads = 1) {
  const int64_t Lp = (L + 31) / 32 * 32, Dp = (D + 31) / 32 * 32;
  return heads * (Dp * Lp + Lp * Dp) + 16 * Lp + 32 * Dp + 256;
}

struct AttnParams {
  const void* q;  // [N, H, D] of the table entry's dtype
  const void* k;
  const void* v;
  void* out;
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
  // content: table[ids[i]] (table != nullptr) or dense[i]; tables, dense and out in the entry's
  // dtype, the LayerNorm weight and bias in fp32.
  const void* table;
  int64_t table_rows, table_row;
  Index ids;
  const void* dense;
  int64_t dense_row;
  const void* pos_table;
  int64_t pos_rows, pos_row;
  Index positions;
  const void* type_table;
  int64_t type_rows, type_row;
  Index type_ids;
  const float* weight;
  const float* bias;
  void* out;
  int64_t out_rows_total, out_row;
  Index out_rows;
  int64_t d;
  float eps;
};

// Row i's inputs with every index checked against its table: false if one is out of range (the
// kernel then stops and reports i; it never reads or writes out of bounds). Every ISA's
// embed_layernorm resolves its rows through this one check.
template <class T>
struct EmbedRow {
  const T* content;
  const T* position;
  const T* type;
  T* out;
};

template <class T>
inline bool embed_row(const EmbedParams& p, int64_t i, EmbedRow<T>& r) {
  const int64_t pos = p.positions[i], typ = p.type_ids[i], row = p.out_rows[i];
  if (p.table) {
    const int64_t id = p.ids[i];
    if (id < 0 || id >= p.table_rows) return false;
    r.content = static_cast<const T*>(p.table) + id * p.table_row;
  } else {
    r.content = static_cast<const T*>(p.dense) + i * p.dense_row;
  }
  if (pos < 0 || pos >= p.pos_rows || typ < 0 || typ >= p.type_rows || row < 0 || row >= p.out_rows_total)
    return false;
  r.position = static_cast<const T*>(p.pos_table) + pos * p.pos_row;
  r.type = static_cast<const T*>(p.type_table) + typ * p.type_row;
  r.out = static_cast<T*>(p.out) + row * p.out_row;
  return true;
}

// Attention of query rows [q_begin, q_end) (absolute row numbers, inside the group, at most
// kAttnQBlock of them) over the group's rows [g_begin, g_end), for one head.
using AttentionFn = void (*)(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin,
                             int64_t q_end, int64_t head, float* scratch);
// The same for heads [h_begin, h_end) in one call (a kernel that packs every head's K and V in one
// pass over the group's rows, which reads them in memory order).
using AttentionHeadsFn = void (*)(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin,
                                  int64_t q_end, int64_t h_begin, int64_t h_end, float* scratch);
// y[i] = LayerNorm(x[i] + r[i]) * w + b for rows [begin, end); y may be x (in place).
using AddLayerNormFn = void (*)(const void* x, int64_t x_row, const void* r, int64_t r_row, const float* w,
                                const float* b, void* y, int64_t y_row, int64_t d, float eps, int64_t begin,
                                int64_t end);
// y[i] = GELU(x[i] + b) (exact erf form) for rows [begin, end); y may be x.
using BiasGeluFn = void (*)(const void* x, int64_t x_row, const float* b, void* y, int64_t y_row, int64_t f,
                            int64_t begin, int64_t end);
// Elements [begin, end); returns the first bad element (an index out of range) or -1.
using EmbedFn = int64_t (*)(const EmbedParams& p, int64_t begin, int64_t end);
// Residual-attention pooling of groups [g_begin, g_end): pre [n, a] (fp32) holds W x + c; scores
// s_i = v . tanh(pre_i), weights = softmax over the group (written to `weights`, fp32),
// pooled[g] = sum_i (1 + w_i) / (L + 1) x_i (zero for an empty group), stored in x's dtype.
using MraPoolFn = void (*)(const void* x, int64_t x_row, const float* pre, int64_t pre_row, const float* v,
                           int64_t a, const int32_t* cu, float* weights, void* pooled, int64_t pooled_row,
                           int64_t d, int64_t g_begin, int64_t g_end);

struct KernelTable {
  const char* name;
  AttentionFn attention[kNumDTypes];
  // How each attention entry computes (for `python -m dm2s2_fast info`).
  const char* attention_path[kNumDTypes];
  AddLayerNormFn add_layernorm[kNumDTypes];
  BiasGeluFn bias_gelu[kNumDTypes];
  EmbedFn embed_layernorm[kNumDTypes];
  MraPoolFn mra_pool[kNumDTypes];
  // Optional (nullptr: the glue calls `attention` once per head).
  AttentionHeadsFn attention_heads[kNumDTypes];
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
#if defined(DM2S2_FAST_HAVE_AVX512BF16)
// The AVX-512 table with a bf16 set_attention on vdpbf16ps.
const KernelTable& avx512bf16_kernels();
#endif
#if defined(DM2S2_FAST_HAVE_AMX)
// The avx512_bf16 table with a bf16 set_attention on AMX tiles; amx_ready() asks the OS for the
// tile state once (Linux arch_prctl) and says whether the tiles may be used.
const KernelTable& amx_kernels();
bool amx_ready();
#endif

// The table in use, and its selection ("" keeps it; "auto", "generic", "avx2", "avx512",
// "avx512_bf16", "amx"). Returns the name of the table in use, or nullptr when the request is
// unknown or unsupported here.
const KernelTable& active_kernels();
const char* select_kernels(const char* request);
// The CPU features the tables depend on, as the running CPU and OS report them
// (e.g. "avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 avx512_fp16 amx_tile amx_bf16").
const char* cpu_features();
// Where the CPU has AVX512_BF16: whether its vdpbf16ps attention beat the avx512 table's fp32 one on
// bf16 (timed once per process; "auto" without AMX takes the faster); -1 where it does not apply.
int bf16_dot_faster_probe();

}  // namespace cpu
}  // namespace dm2s2_fast
