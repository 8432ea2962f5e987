// bias_gelu: out = GELU(x + bias) with the exact erf GELU, in fp32, 16-byte accesses.
//
// Floor, the `ads` workload (docs/workloads.md), B=256 (N ~ 26-29k, FFN width f = 1536), bf16: read x + write out =
// 2 * 26.4k*1536*2 B = 162 MB -> ~38 us at 4.3 TB/s. Arithmetic: erff compiles to ~25 SASS
// instructions (1 SFU op) an element; ~40.6M elements * ~28 issued / (132 SM * 128 lanes *
// 1.98 GHz) ~ 34 us: just under the memory floor, so loads must stay in flight while the ALUs
// work (each thread issues 4 rows of 16-byte loads before computing). (An erfc-based form,
// 0.5 x erfc(-x/sqrt2), measured the same instruction count in SASS: no gain, so erff it is.)
//
// Layout: thread = one 16-byte column chunk (its bias chunk stays in registers), blockIdx.y = a
// band of rows; no integer division per element.
#include "common.cuh"

namespace dm2s2 {
namespace {

constexpr int kUnroll = 4;

__device__ __forceinline__ float gelu_erf(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) bias_gelu_kernel(const T* __restrict__ x, int64_t x_rs,
                                                        const T* __restrict__ bias, T* __restrict__ out,
                                                        int64_t out_rs, int64_t rows, int ncv,
                                                        int64_t rows_per_block) {
  const int cv = blockIdx.x * blockDim.x + threadIdx.x;
  if (cv >= ncv) return;
  const int64_t col = static_cast<int64_t>(cv) * VEC;  // cv < 2^30, but cv * VEC may pass 2^31
  float b[VEC];
  load_vec<T, VEC>(bias + col, b);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  for (int64_t r = r0; r < r1; r += kUnroll) {
    float v[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u < r1) load_vec<T, VEC>(x + (r + u) * x_rs + col, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u < r1) {
        float y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = gelu_erf(v[u][j] + b[j]);
        store_vec<T, VEC>(out + (r + u) * out_rs + col, y);
      }
    }
  }
}

template <typename T, int VEC>
cudaError_t launch(const void* x, int64_t x_rs, const void* bias, void* out, int64_t out_rs, int64_t rows,
                   int64_t cols, cudaStream_t stream) {
  const int64_t ncv = cols / VEC;
  if (ncv > (int64_t(1) << 30)) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(ncv >= 256 ? 256 : ((ncv + 31) / 32) * 32);
  const int64_t gx = (ncv + threads - 1) / threads;
  // Rows per block: at least 16 (bias reuse, 4 loads in flight), more when the grid's y would
  // pass its 65535 limit.
  int64_t rpb = 16;
  if ((rows + rpb - 1) / rpb > 65535) rpb = (rows + 65534) / 65535;
  const int64_t gy = (rows + rpb - 1) / rpb;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  bias_gelu_kernel<T, VEC><<<grid, threads, 0, stream>>>(static_cast<const T*>(x), x_rs,
                                                         static_cast<const T*>(bias), static_cast<T*>(out),
                                                         out_rs, rows, static_cast<int>(ncv), rpb);
  DM2S2_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

cudaError_t bias_gelu(DType dt, const void* x, int64_t x_rs, const void* bias, void* out, int64_t out_rs,
                      int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  DM2S2_DISPATCH_DTYPE(dt, T, {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = cols % VEC == 0 && x_rs % VEC == 0 && out_rs % VEC == 0 && aligned_to(x, 16) &&
                        aligned_to(bias, 16) && aligned_to(out, 16);
    if (vec_ok) return launch<T, VEC>(x, x_rs, bias, out, out_rs, rows, cols, stream);
    return launch<T, 1>(x, x_rs, bias, out, out_rs, rows, cols, stream);
  });
  return cudaSuccess;
}

}  // namespace dm2s2
