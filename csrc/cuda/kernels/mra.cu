// IntraMRA / InterMRA: s_i = v . tanh(W x_i + c), per-group max-subtracted softmax, residual pool
// z_g = sum_i (1 + w_i) x_i / (L_g + 1). Both levels are the same two kernels:
//   1. mra_scores_mma_kernel: a tensor-core GEMM of x [rows, d] by W^T [d, a] whose epilogue
//      applies tanh(. + c) and the dot with v in registers, so the [rows, a] projection never
//      reaches memory; only s (fp32, `nsplit` deterministic partial sums) is written.
//      (fp32 inputs, and half inputs the tensor-core path can't take, use P = x W^T from cuBLAS
//      in the launcher (at::mm, fp32 out) and mra_scores_from_proj: the fp32 contract is 1e-5,
//      which rules out TF32 and bf16-rounded projections.)
//   2. segment_pool_kernel: one block per group: online (max, sum) of the scores, the weights,
//      then the weighted row sum with 16-byte loads (h is usually still in L2 after step 1).
// mra_pool = scores(h) -> pool(h by segments) -> scores(z) -> pool(z by samples): 4 launches.
// Why not one block per sample for the whole of mra_pool: the intra scores are a GEMM
// (N x d x a), and per-sample blocks (B = 256 of them, 20-200 rows each) would leave the tensor
// cores with 2 CTAs per SM and ragged tiles; tiling rows independently of segment boundaries keeps
// full 128-row tiles and spreads the work over every SM; the pool pass is memory-bound and cheap.
//
// Floors, the `ads` workload (docs/workloads.md), B=256 (N = 26417 elements, S = 974 segments, d = a = 384), bf16:
//   intra scores: 2*N*d*a = 7.8 GFLOP -> ~10 us at 790 TFLOP/s; reads h (20 MB) + W (0.3 MB)
//                 -> ~5 us: compute-bound (mma.sync runs well under the wgmma peak: expect
//                 ~15-20 us). tanh: N*a = 10M, 2 SFU ops each -> ~5 us, overlapped with the MMAs.
//                 128x128 tiles, 3 column splits -> 621 CTAs, 2 per SM.
//   intra pool  : read h again (20 MB, L2-resident after the GEMM: the L2 is 60 MB) + write z,
//                 alpha -> <= 5 us.
//   inter       : 2*S*d*a = 0.3 GFLOP + S*d*2 B: latency-bound (a few us for both kernels).
//   floor of mra_pool ~ 10 us (the intra GEMM).
#include "common.cuh"

#include <math.h>

#include <type_traits>

namespace dm2s2 {
namespace {

constexpr int kBK = 64;     // k-step (128-byte smem rows, 8 swizzled 16-byte chunks)
constexpr int kStages = 3;  // cp.async pipeline depth

template <int BM, int BN>
constexpr int score_threads() { return (BM / 32) * (BN / 64) * 32; }

template <int BM, int BN>
size_t score_smem_bytes(int chunks_per_split) {
  return static_cast<size_t>(kStages) * (BM + BN) * kBK * 2 + 2 * static_cast<size_t>(chunks_per_split) * BN * 4;
}

// Block (blockIdx.x, blockIdx.y): rows [BM*x, BM*x + BM), column chunks (BN columns of W each)
// [cpb*y, cpb*y + cpb). Warps form a (BM/32) x (BN/64) grid of 32x64 warp tiles.
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(score_threads<BM, BN>(), 2)
mra_scores_mma_kernel(const T* __restrict__ x, int64_t x_rs, int rows, int d, const T* __restrict__ W, int a,
                      const T* __restrict__ c, const T* __restrict__ v, float* __restrict__ part, int cpb) {
  constexpr int WM = BM / 32, WN = BN / 64, NT = WM * WN * 32;
  constexpr int CH = kBK / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);  // [kStages][BM][kBK]
  T* sB = sA + kStages * BM * kBK;         // [kStages][BN][kBK]
  float* sc = reinterpret_cast<float*>(sB + kStages * BN * kBK);  // [cpb*BN]
  float* sv = sc + cpb * BN;
  __shared__ float red[WN][BM];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, tig = lane & 3;
  const int wm = warp % WM, wn = warp / WM;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int nchunks = (a + BN - 1) / BN;
  const int c_begin = blockIdx.y * cpb;
  const int c_end = c_begin + cpb < nchunks ? c_begin + cpb : nchunks;
  const int nch = c_end > c_begin ? c_end - c_begin : 0;
  const int KT = (d + kBK - 1) / kBK;
  const int total = nch * KT;

  // c and v of this block's columns in fp32; zero past `a`, so padded columns add nothing.
  for (int i = tid; i < nch * BN; i += NT) {
    const int col = c_begin * BN + i;
    sc[i] = col < a ? to_float(c[col]) : 0.0f;
    sv[i] = col < a ? to_float(v[col]) : 0.0f;
  }

  auto load_stage = [&](int it) {
    const int stage = it % kStages;
    const int chunk = c_begin + it / KT;
    const int k0 = (it % KT) * kBK;
    T* as = sA + stage * BM * kBK;
    T* bs = sB + stage * BN * kBK;
#pragma unroll
    for (int i = 0; i < (BM * CH) / NT; ++i) {
      const int idx = tid + i * NT;
      const int r = idx / CH, cc = idx % CH;
      const int64_t gr = row0 + r;
      const int kc = k0 + cc * 8;
      const bool ok = gr < rows && kc < d;
      cp_async16(as + r * kBK + swz<CH>(r, cc) * 8, ok ? x + gr * x_rs + kc : x, ok);
    }
#pragma unroll
    for (int i = 0; i < (BN * CH) / NT; ++i) {
      const int idx = tid + i * NT;
      const int r = idx / CH, cc = idx % CH;
      const int wr = chunk * BN + r;
      const int kc = k0 + cc * 8;
      const bool ok = wr < a && kc < d;
      cp_async16(bs + r * kBK + swz<CH>(r, cc) * 8, ok ? W + static_cast<int64_t>(wr) * d + kc : W, ok);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
  float rsum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load_stage(s);
    cp_async_commit();  // always commit: the group count stays in step with `it`
  }

  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage it % kStages landed for all; stage (it-1) % kStages is free
    if (it + kStages - 1 < total) load_stage(it + kStages - 1);
    cp_async_commit();

    const T* as = sA + (it % kStages) * BM * kBK;
    const T* bs = sB + (it % kStages) * BN * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = wm * 32 + mt * 16 + (lane & 15);
        const int chunk = kk * 2 + (lane >> 4);
        ldmatrix_x4(af[mt], as + row * kBK + swz<CH>(row, chunk) * 8);
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        const int row = wn * 64 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int chunk = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(b, bs + row * kBK + swz<CH>(row, chunk) * 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T>(acc[mt][2 * np], af[mt], b[0], b[1]);
          mma16816<T>(acc[mt][2 * np + 1], af[mt], b[2], b[3]);
        }
      }
    }

    if (it % KT == KT - 1) {  // a column chunk is complete: tanh(. + c) . v into the row sums
      const int lc = (it / KT) * BN + wn * 64;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = lc + nt * 8 + 2 * tig + e;
          const float cj = sc[col], vj = sv[col];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            rsum[mt][0] = fmaf(vj, tanh_fast(acc[mt][nt][e] + cj), rsum[mt][0]);
            rsum[mt][1] = fmaf(vj, tanh_fast(acc[mt][nt][2 + e] + cj), rsum[mt][1]);
            acc[mt][nt][e] = 0.0f;
            acc[mt][nt][2 + e] = 0.0f;
          }
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float s = rsum[mt][h];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (tig == 0) red[wn][wm * 32 + mt * 16 + h * 8 + g8] = s;
    }
  }
  __syncthreads();
  for (int r = tid; r < BM; r += NT) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < WN; ++w) s += red[w][r];
    if (row0 + r < rows) part[static_cast<int64_t>(blockIdx.y) * rows + row0 + r] = s;
  }
}

// part[i] = v . tanh(P[i] + c), one warp per row (fp32 projection from cuBLAS).
template <typename T>
__global__ void __launch_bounds__(256) mra_scores_proj_kernel(const float* __restrict__ P, int64_t rows, int a,
                                                              const T* __restrict__ c, const T* __restrict__ v,
                                                              float* __restrict__ part) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp0; r < rows; r += nwarps) {
    const float* pr = P + r * a;
    float s = 0.0f;
    for (int j = lane; j < a; j += 32) s = fmaf(to_float(v[j]), tanh_fast(pr[j] + to_float(c[j])), s);
    s = warp_sum(s);
    if (lane == 0) part[r] = s;
  }
}

constexpr int kPoolThreads = 256;
constexpr int kPoolRows = 256;  // rows whose weights are staged in shared memory at a time

// Combine two online-softmax states (m, l): l is the sum of exp(s - m).
__device__ __forceinline__ void combine_ml(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  l = (m == -INFINITY ? 0.0f : l * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mn));
  m = mn;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kPoolThreads) segment_pool_kernel(
    const T* __restrict__ x, int64_t x_rs, int64_t rows, int d, const int* __restrict__ cu, int64_t groups,
    const float* __restrict__ part, int nsplit, float* __restrict__ weights, T* __restrict__ pooled,
    int64_t pooled_rs) {
  __shared__ float sw[kPoolRows];
  __shared__ float sm[32], sl[32];
  __shared__ float sacc[kPoolThreads][VEC];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ncv = d / VEC;
  const int cpp = ncv < kPoolThreads ? ncv : kPoolThreads;  // column chunks per pass
  const int rp = cpp > 0 ? kPoolThreads / cpp : 1;          // rows in parallel
  const int cvi = cpp > 0 ? tid % cpp : 0, rg = cpp > 0 ? tid / cpp : 0;

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    // Clamped into [0, rows): offsets that break the contract never cause an out-of-bounds access.
    const int64_t s0 = min(max(static_cast<int64_t>(cu[g]), int64_t(0)), rows);
    const int start = static_cast<int>(s0);
    const int end = static_cast<int>(min(max(static_cast<int64_t>(cu[g + 1]), s0), rows));
    const int L = end - start;
    auto score = [&](int i) {
      float s = 0.0f;
      for (int p = 0; p < nsplit; ++p) s += part[static_cast<int64_t>(p) * rows + i];
      return s;
    };
    // Phase 1: max and sum of exp over the group.
    float m = -INFINITY, l = 0.0f;
    for (int i = start + tid; i < end; i += kPoolThreads) {
      const float s = score(i);
      if (s > m) {
        l = (m == -INFINITY ? 0.0f : l * expf(m - s)) + 1.0f;
        m = s;
      } else {
        l += expf(s - m);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
      combine_ml(m, l, m2, l2);
    }
    __syncthreads();  // sm/sl/sw/sacc free from the previous group
    if (lane == 0) {
      sm[warp] = m;
      sl[warp] = l;
    }
    __syncthreads();
    m = -INFINITY;
    l = 0.0f;
    for (int w = 0; w < kPoolThreads / 32; ++w) combine_ml(m, l, sm[w], sl[w]);
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    const float inv_len1 = 1.0f / static_cast<float>(L + 1);

    // Phase 2: weights, and the weighted sum of the rows.
    for (int cv0 = 0; cv0 < ncv; cv0 += cpp) {
      const int cv = cv0 + cvi;
      const bool active = rg < rp && cv < ncv;
      float acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
      for (int r0 = start; r0 < end; r0 += kPoolRows) {
        const int nr = end - r0 < kPoolRows ? end - r0 : kPoolRows;
        __syncthreads();  // sw of the previous chunk fully used
        for (int i = tid; i < nr; i += kPoolThreads) {
          const float w = expf(score(r0 + i) - m) * inv_l;
          if (cv0 == 0) weights[r0 + i] = w;
          sw[i] = (1.0f + w) * inv_len1;
        }
        __syncthreads();
        if (active) {
#pragma unroll 4
          for (int i = rg; i < nr; i += rp) {
            float xv[VEC];
            load_vec<T, VEC>(x + static_cast<int64_t>(r0 + i) * x_rs + static_cast<int64_t>(cv) * VEC, xv);
            const float w = sw[i];
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] = fmaf(w, xv[j], acc[j]);
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < VEC; ++j) sacc[tid][j] = acc[j];
      __syncthreads();
      if (rg == 0 && cv < ncv) {
        float y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = sacc[tid][j];
        for (int q = 1; q < rp; ++q) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) y[j] += sacc[q * cpp + cvi][j];
        }
        store_vec<T, VEC>(pooled + g * pooled_rs + static_cast<int64_t>(cv) * VEC, y);
      }
    }
    if (ncv == 0 && L > 0) {  // d == 0: only the weights
      for (int i = tid; i < L; i += kPoolThreads) weights[start + i] = expf(score(start + i) - m) * inv_l;
    }
  }
}

}  // namespace

ScorePlan mra_score_plan(DType dt, const void* x, int64_t x_rs, int64_t rows, int64_t d, const void* W,
                         int64_t a) {
  ScorePlan plan;
  plan.tensor_cores = (dt == DType::kFloat16 || dt == DType::kBFloat16) && d > 0 && d % 8 == 0 &&
                      x_rs % 8 == 0 && aligned_to(x, 16) && aligned_to(W, 16) && rows < (int64_t(1) << 31) &&
                      d < (int64_t(1) << 30) && a < (int64_t(1) << 30);
  if (!plan.tensor_cores || rows <= 0) return plan;
  const int sms = device_sm_count();
  const int64_t big_tiles = (rows + 127) / 128;
  plan.bm = plan.bn = big_tiles >= sms ? 128 : 64;
  const int64_t row_tiles = (rows + plan.bm - 1) / plan.bm;
  const int64_t nchunks = (a + plan.bn - 1) / plan.bn;
  if (nchunks <= 0) {
    plan.nsplit = 1;
    plan.chunks_per_split = 0;
    return plan;
  }
  int64_t want = (2 * sms + row_tiles - 1) / row_tiles;  // about 2 CTAs per SM
  if (want < 1) want = 1;
  if (want > nchunks) want = nchunks;
  // Prefer a split that divides the chunks evenly (equal work per CTA), e.g. 3 chunks -> 3, not 2.
  for (int64_t ns = want; ns <= nchunks && ns <= 8 * want; ++ns) {
    if (nchunks % ns == 0) {
      want = ns;
      break;
    }
  }
  if (want > 65535) want = 65535;
  // A split's c and v sit in shared memory (2 floats per column): at most kMaxChunksPerSplit chunks
  // keep the block inside the 227 KB opt-in limit (128-row tiles: 96 KB + 64 KB). Wider W (a >
  // 8192) takes more splits; past grid.y's 65535 the caller's cuBLAS path does it.
  constexpr int64_t kMaxChunksPerSplit = 64;
  int64_t cpb = (nchunks + want - 1) / want;
  if (cpb > kMaxChunksPerSplit) cpb = kMaxChunksPerSplit;
  const int64_t nsplit = (nchunks + cpb - 1) / cpb;
  if (nsplit > 65535) {
    plan.tensor_cores = false;
    return plan;
  }
  plan.chunks_per_split = static_cast<int>(cpb);
  plan.nsplit = static_cast<int>(nsplit);
  return plan;
}

cudaError_t mra_scores_mma(const ScorePlan& plan, DType dt, const void* x, int64_t x_rs, int64_t rows, int64_t d,
                           const void* W, int64_t a, const void* c, const void* v, float* part,
                           cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (!plan.tensor_cores || plan.nsplit < 1) return cudaErrorInvalidValue;
  const int64_t row_tiles = (rows + plan.bm - 1) / plan.bm;
  if (row_tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(plan.nsplit));
  const int cpb = plan.chunks_per_split;
  auto run = [&](auto kernel, int threads, size_t smem, auto tptr) -> cudaError_t {
    using T = typename std::remove_pointer<decltype(tptr)>::type;
    DM2S2_RETURN_IF_ERROR(allow_dynamic_smem(kernel, smem));
    kernel<<<grid, threads, smem, stream>>>(static_cast<const T*>(x), x_rs, static_cast<int>(rows),
                                            static_cast<int>(d), static_cast<const T*>(W), static_cast<int>(a),
                                            static_cast<const T*>(c), static_cast<const T*>(v), part, cpb);
    DM2S2_CHECK_LAUNCH();
    return cudaSuccess;
  };
  if (dt == DType::kBFloat16) {
    using T = __nv_bfloat16;
    if (plan.bm == 128) {
      return run(mra_scores_mma_kernel<T, 128, 128>, score_threads<128, 128>(), score_smem_bytes<128, 128>(cpb),
                 static_cast<T*>(nullptr));
    }
    return run(mra_scores_mma_kernel<T, 64, 64>, score_threads<64, 64>(), score_smem_bytes<64, 64>(cpb),
               static_cast<T*>(nullptr));
  }
  if (dt == DType::kFloat16) {
    using T = __half;
    if (plan.bm == 128) {
      return run(mra_scores_mma_kernel<T, 128, 128>, score_threads<128, 128>(), score_smem_bytes<128, 128>(cpb),
                 static_cast<T*>(nullptr));
    }
    return run(mra_scores_mma_kernel<T, 64, 64>, score_threads<64, 64>(), score_smem_bytes<64, 64>(cpb),
               static_cast<T*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

cudaError_t mra_scores_from_proj(DType dt, const float* P, int64_t rows, int64_t a, const void* c, const void* v,
                                 float* part, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (a > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t blocks = (rows + 7) / 8;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  DM2S2_DISPATCH_DTYPE(dt, T, {
    mra_scores_proj_kernel<T><<<grid, 256, 0, stream>>>(P, rows, static_cast<int>(a), static_cast<const T*>(c),
                                                        static_cast<const T*>(v), part);
    DM2S2_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

cudaError_t mra_segment_pool(DType dt, const void* x, int64_t x_rs, int64_t rows, int64_t d, const int* cu,
                             int64_t groups, const float* part, int nsplit, float* weights, void* pooled,
                             int64_t pooled_rs, cudaStream_t stream) {
  if (groups <= 0) return cudaSuccess;
  if (d > (int64_t(1) << 30) || rows > 0x7fffffffLL || nsplit < 1) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(groups < (1 << 20) ? groups : (1 << 20));
  DM2S2_DISPATCH_DTYPE(dt, T, {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec_ok = d % VEC == 0 && x_rs % VEC == 0 && pooled_rs % VEC == 0 && aligned_to(x, 16) &&
                        aligned_to(pooled, 16);
    if (vec_ok) {
      segment_pool_kernel<T, VEC><<<grid, kPoolThreads, 0, stream>>>(
          static_cast<const T*>(x), x_rs, rows, static_cast<int>(d), cu, groups, part, nsplit, weights,
          static_cast<T*>(pooled), pooled_rs);
    } else {
      segment_pool_kernel<T, 1><<<grid, kPoolThreads, 0, stream>>>(
          static_cast<const T*>(x), x_rs, rows, static_cast<int>(d), cu, groups, part, nsplit, weights,
          static_cast<T*>(pooled), pooled_rs);
    }
    DM2S2_CHECK_LAUNCH();
  });
  return cudaSuccess;
}

}  // namespace dm2s2
