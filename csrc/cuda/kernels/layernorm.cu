// add_layernorm and embed_layernorm: two rows per warp (a half-warp per row; d up to 96 16-byte
// chunks) or one warp per row (d up to 256 chunks), 16-byte accesses, the row kept in registers,
// two-pass mean/variance in fp32; a block-per-row kernel for wide or unaligned rows.
// Variant (Tuning(cuda_layernorm="warp"|"half"), for comparing on a GPU): kLayerNormAuto picks the half-warp
// kernel whenever the row fits it.
//
// Floors, the `ads` workload (docs/workloads.md), B=256 (N ~ 29k packed elements, d = 384), bf16, against the measured
// ~4.3 TB/s copy bandwidth of the H200 (bytes read + written):
//   add_layernorm  : read x, residual (2 * N*d*2 B) + write out (N*d*2 B) = 3 * 29k*384*2 = 67 MB
//                    -> 15.5 us; ~8 flop/element (negligible).
//   embed_layernorm: per modality call of n rows: content gather (n*d*2 B; tables of ids are
//                    cache-resident only when small), position/type rows (L2-resident tables),
//                    write n*d*2 B. Whole batch (4 calls, N rows): ~2 * 29k*384*2 = 45 MB -> ~10 us,
//                    plus 4 launches.
#include "common.cuh"

namespace dm2s2 {
namespace {

constexpr int kWarpRowsThreads = 256;  // 8 rows per block in the warp-per-row kernel
constexpr int kBlockRowThreads = 256;

// ------------------------------------------------------------------ row sources
template <typename T>
struct AddSource {
  const T* __restrict__ x;
  int64_t x_rs;
  const T* __restrict__ res;
  int64_t res_rs;

  struct Row {
    const T* x;
    const T* res;
    int64_t out_row;  // < 0: write nothing
    bool valid;       // false: write NaN (an index out of range)
    template <int VEC>
    __device__ __forceinline__ void load(int col, float (&v)[VEC]) const {
      float a[VEC], b[VEC];
      load_vec<T, VEC>(x + col, a);
      load_vec<T, VEC>(res + col, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = a[j] + b[j];
    }
  };
  __device__ __forceinline__ Row row(int64_t r) const { return Row{x + r * x_rs, res + r * res_rs, r, true}; }
};

template <typename T>
struct EmbedSource {
  const void* positions;
  const void* type_ids;
  const void* ids;
  const void* out_rows;
  bool positions_64, type_ids_64, ids_64, out_rows_64;
  const T* __restrict__ position_table;
  int64_t position_rows, position_rs;
  const T* __restrict__ type_table;
  int64_t type_rows, type_rs;
  const T* __restrict__ table;
  int64_t table_rows, table_rs;
  const T* __restrict__ dense;
  int64_t dense_rs;
  int64_t out_total_rows;

  struct Row {
    const T* c;
    const T* p;
    const T* t;
    int64_t out_row;
    bool valid;
    template <int VEC>
    __device__ __forceinline__ void load(int col, float (&v)[VEC]) const {
      if (!valid) {  // never dereference a row an out-of-range index named
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = 0.0f;
        return;
      }
      float a[VEC], b[VEC], e[VEC];
      load_vec<T, VEC>(c + col, a);
      load_vec<T, VEC>(p + col, b);
      load_vec<T, VEC>(t + col, e);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = a[j] + b[j] + e[j];
    }
  };

  __device__ __forceinline__ Row row(int64_t r) const {
    Row out;
    const int64_t pos = load_index(positions, positions_64, r);
    const int64_t typ = load_index(type_ids, type_ids_64, r);
    bool ok = pos >= 0 && pos < position_rows && typ >= 0 && typ < type_rows;
    const T* content;
    if (ids != nullptr) {
      const int64_t id = load_index(ids, ids_64, r);
      ok = ok && id >= 0 && id < table_rows;
      content = table + (ok ? id : 0) * table_rs;
    } else {
      content = dense + r * dense_rs;
    }
    out.c = content;
    out.p = position_table + (ok ? pos : 0) * position_rs;
    out.t = type_table + (ok ? typ : 0) * type_rs;
    out.valid = ok;
    int64_t o = out_rows != nullptr ? load_index(out_rows, out_rows_64, r) : r;
    out.out_row = (o >= 0 && o < out_total_rows) ? o : -1;
    return out;
  }
};

// ------------------------------------------------------------------ kernels
// One warp per row; lane l owns the VEC-wide column chunks l, l+32, ... (MAXV of them).
template <typename T, int VEC, int MAXV, typename Src>
__global__ void __launch_bounds__(kWarpRowsThreads) layernorm_warp_kernel(
    Src src, const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out, int64_t out_rs,
    int64_t rows, int d, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t r = warp0; r < rows; r += nwarps) {
    const typename Src::Row row = src.row(r);
    if (row.out_row < 0) continue;  // warp-uniform
    float vals[MAXV][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 32 + lane) * VEC;
      if (col < d) {
        row.template load<VEC>(col, vals[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += vals[i][j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) vals[i][j] = 0.0f;
      }
    }
    const float mean = warp_sum(sum) * inv_d;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 32 + lane) * VEC;
      if (col < d) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float t = vals[i][j] - mean;
          sq += t * t;
        }
      }
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_d + eps);
    T* orow = out + row.out_row * out_rs;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 32 + lane) * VEC;
      if (col < d) {
        float w[VEC], b[VEC], y[VEC];
        load_vec<T, VEC>(weight + col, w);
        load_vec<T, VEC>(bias + col, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = row.valid ? (vals[i][j] - mean) * rstd * w[j] + b[j] : __int_as_float(0x7fc00000);
        store_vec<T, VEC>(orow + col, y);
      }
    }
  }
}

// Two rows per warp, one per half-warp (16 lanes): for d = 384 bf16 each lane owns exactly 3
// 16-byte chunks (no idle lanes, unlike 32 lanes x 1.5 chunks) and a warp has twice the bytes in
// flight. Reductions stay inside each half (xor 8, 4, 2, 1); both halves always run the shuffles.
__device__ __forceinline__ float half_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int VEC, int MAXV, typename Src>
__global__ void __launch_bounds__(kWarpRowsThreads, 2) layernorm_half_kernel(
    Src src, const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out, int64_t out_rs,
    int64_t rows, int d, float eps) {
  const int lane = threadIdx.x & 31;
  const int hl = lane & 15;
  const int64_t half = lane >> 4;
  const int64_t warp0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t pairs = (rows + 1) >> 1;
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t pr = warp0; pr < pairs; pr += nwarps) {  // warp-uniform
    const int64_t r = 2 * pr + half;
    // A half past the last row (odd row count) reads row rows-1's indices and writes nothing.
    const typename Src::Row row = src.row(r < rows ? r : rows - 1);
    const bool write = r < rows && row.out_row >= 0;
    float vals[MAXV][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 16 + hl) * VEC;
      if (write && col < d) {
        row.template load<VEC>(col, vals[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += vals[i][j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) vals[i][j] = 0.0f;
      }
    }
    const float mean = half_sum(sum) * inv_d;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 16 + hl) * VEC;
      if (col < d) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float t = vals[i][j] - mean;
          sq += t * t;
        }
      }
    }
    const float rstd = rsqrtf(half_sum(sq) * inv_d + eps);
    T* orow = out + (write ? row.out_row : 0) * out_rs;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int col = (i * 16 + hl) * VEC;
      if (write && col < d) {
        float w[VEC], b[VEC], y[VEC];
        load_vec<T, VEC>(weight + col, w);
        load_vec<T, VEC>(bias + col, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = row.valid ? (vals[i][j] - mean) * rstd * w[j] + b[j] : __int_as_float(0x7fc00000);
        store_vec<T, VEC>(orow + col, y);
      }
    }
  }
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.0f;
  return warp_sum(t);
}

// One block per row, scalar accesses, three passes over the row (any d, any alignment).
template <typename T, typename Src>
__global__ void __launch_bounds__(kBlockRowThreads) layernorm_block_kernel(
    Src src, const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ out, int64_t out_rs,
    int64_t rows, int d, float eps) {
  __shared__ float red[32];
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename Src::Row row = src.row(r);
    if (row.out_row < 0) continue;  // block-uniform
    float sum = 0.0f;
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      float v[1];
      row.template load<1>(col, v);
      sum += v[0];
    }
    const float mean = block_sum(sum, red) * inv_d;
    float sq = 0.0f;
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      float v[1];
      row.template load<1>(col, v);
      const float t = v[0] - mean;
      sq += t * t;
    }
    const float rstd = rsqrtf(block_sum(sq, red) * inv_d + eps);
    T* orow = out + row.out_row * out_rs;
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      float v[1];
      row.template load<1>(col, v);
      const float y = row.valid ? (v[0] - mean) * rstd * to_float(weight[col]) + to_float(bias[col])
                                : __int_as_float(0x7fc00000);
      orow[col] = from_float<T>(y);
    }
  }
}

template <typename T, typename Src>
cudaError_t launch_layernorm(const Src& src, bool vec_ok, const void* weight, const void* bias, void* out,
                             int64_t out_rs, int64_t rows, int64_t d, float eps, int variant,
                             cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (d <= 0 || d > (int64_t(1) << 30)) return cudaErrorInvalidValue;
  const T* w = static_cast<const T*>(weight);
  const T* b = static_cast<const T*>(bias);
  T* o = static_cast<T*>(out);
  constexpr int VEC = 16 / sizeof(T);
  const int64_t hchunks = (d + 16 * VEC - 1) / (16 * VEC);
  if (vec_ok && variant != kLayerNormWarp && hchunks <= 6) {
    const int64_t pairs = (rows + 1) / 2;
    const int64_t want = (pairs + (kWarpRowsThreads / 32) - 1) / (kWarpRowsThreads / 32);
    const unsigned grid = static_cast<unsigned>(want < (1 << 20) ? want : (1 << 20));
    const int di = static_cast<int>(d);
#define DM2S2_LN_HALF(MAXV)                                                                        \
  layernorm_half_kernel<T, VEC, MAXV, Src><<<grid, kWarpRowsThreads, 0, stream>>>(src, w, b, o, out_rs, \
                                                                                   rows, di, eps)
    if (hchunks <= 1) {
      DM2S2_LN_HALF(1);
    } else if (hchunks <= 2) {
      DM2S2_LN_HALF(2);
    } else if (hchunks <= 3) {
      DM2S2_LN_HALF(3);
    } else if (hchunks <= 4) {
      DM2S2_LN_HALF(4);
    } else {
      DM2S2_LN_HALF(6);
    }
#undef DM2S2_LN_HALF
    DM2S2_CHECK_LAUNCH();
    return cudaSuccess;
  }
  const int64_t chunks = (d + 32 * VEC - 1) / (32 * VEC);
  if (vec_ok && chunks <= 8) {
    const int64_t want = (rows + (kWarpRowsThreads / 32) - 1) / (kWarpRowsThreads / 32);
    const unsigned grid = static_cast<unsigned>(want < (1 << 20) ? want : (1 << 20));
    const int di = static_cast<int>(d);
#define DM2S2_LN_WARP(MAXV)                                                                        \
  layernorm_warp_kernel<T, VEC, MAXV, Src><<<grid, kWarpRowsThreads, 0, stream>>>(src, w, b, o, out_rs, \
                                                                                   rows, di, eps)
    if (chunks <= 1) {
      DM2S2_LN_WARP(1);
    } else if (chunks <= 2) {
      DM2S2_LN_WARP(2);
    } else if (chunks <= 4) {
      DM2S2_LN_WARP(4);
    } else {
      DM2S2_LN_WARP(8);
    }
#undef DM2S2_LN_WARP
    DM2S2_CHECK_LAUNCH();
    return cudaSuccess;
  }
  const unsigned grid = static_cast<unsigned>(rows < (1 << 20) ? rows : (1 << 20));
  layernorm_block_kernel<T, Src><<<grid, kBlockRowThreads, 0, stream>>>(src, w, b, o, out_rs, rows,
                                                                        static_cast<int>(d), eps);
  DM2S2_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

cudaError_t add_layernorm(DType dt, const void* x, int64_t x_rs, const void* residual, int64_t res_rs,
                          const void* weight, const void* bias, void* out, int64_t out_rs, int64_t rows,
                          int64_t d, float eps, cudaStream_t stream, int variant) {
  if (rows <= 0 || d <= 0) return cudaSuccess;
  DM2S2_DISPATCH_DTYPE(dt, T, {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = d % VEC == 0 && x_rs % VEC == 0 && res_rs % VEC == 0 && out_rs % VEC == 0 &&
                        aligned_to(x, 16) && aligned_to(residual, 16) && aligned_to(weight, 16) &&
                        aligned_to(bias, 16) && aligned_to(out, 16);
    AddSource<T> src{static_cast<const T*>(x), x_rs, static_cast<const T*>(residual), res_rs};
    return launch_layernorm<T>(src, vec_ok, weight, bias, out, out_rs, rows, d, eps, variant, stream);
  });
  return cudaSuccess;
}

cudaError_t embed_layernorm(const EmbedArgs& a, cudaStream_t stream) {
  if (a.n <= 0 || a.d <= 0) return cudaSuccess;
  if (a.positions == nullptr || a.type_ids == nullptr || a.out == nullptr ||
      (a.ids == nullptr && a.dense == nullptr) || (a.ids != nullptr && a.table == nullptr)) {
    return cudaErrorInvalidValue;
  }
  DM2S2_DISPATCH_DTYPE(a.dt, T, {
    constexpr int VEC = 16 / sizeof(T);
    bool vec_ok = a.d % VEC == 0 && a.position_rs % VEC == 0 && a.type_rs % VEC == 0 && a.out_rs % VEC == 0 &&
                  aligned_to(a.position_table, 16) && aligned_to(a.type_table, 16) && aligned_to(a.weight, 16) &&
                  aligned_to(a.bias, 16) && aligned_to(a.out, 16);
    if (a.ids != nullptr) {
      vec_ok = vec_ok && a.table_rs % VEC == 0 && aligned_to(a.table, 16);
    } else {
      vec_ok = vec_ok && a.dense_rs % VEC == 0 && aligned_to(a.dense, 16);
    }
    EmbedSource<T> src;
    src.positions = a.positions;
    src.type_ids = a.type_ids;
    src.ids = a.ids;
    src.out_rows = a.out_rows;
    src.positions_64 = a.positions_64;
    src.type_ids_64 = a.type_ids_64;
    src.ids_64 = a.ids_64;
    src.out_rows_64 = a.out_rows_64;
    src.position_table = static_cast<const T*>(a.position_table);
    src.position_rows = a.position_rows;
    src.position_rs = a.position_rs;
    src.type_table = static_cast<const T*>(a.type_table);
    src.type_rows = a.type_rows;
    src.type_rs = a.type_rs;
    src.table = static_cast<const T*>(a.table);
    src.table_rows = a.table_rows;
    src.table_rs = a.table_rs;
    src.dense = static_cast<const T*>(a.dense);
    src.dense_rs = a.dense_rs;
    src.out_total_rows = a.out_total_rows;
    return launch_layernorm<T>(src, vec_ok, a.weight, a.bias, a.out, a.out_rs, a.n, a.d, a.eps, a.ln_variant,
                                stream);
  });
  return cudaSuccess;
}

}  // namespace dm2s2
