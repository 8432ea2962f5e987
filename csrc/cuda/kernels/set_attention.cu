// set_attention: bidirectional softmax attention inside each packed group (FlashAttention's varlen
// contract), online softmax in fp32, never across groups, no padding in memory.
//
// Floors, the `ads` workload (docs/workloads.md), B=256 (dm2s2_fast.workloads seed 0: N = 26417, groups = samples of
// 27..200 elements, mean 103, sum L^2 = 3.12M), H = 12, D = 32, bf16:
//   bytes : read q, k, v + write out = 4 * N*H*D*2 = 81 MB -> ~19 us at 4.3 TB/s.
//   flops : 4 * sum_g L_g^2 * H * D = 4.8 GFLOP -> ~6 us at 790 TFLOP/s (bf16).
//   exp   : sum_g L_g^2 * H = 37M exp2 on the SFU (16/clk/SM) -> ~9 us, the real compute limit at
//           D = 32; padding is kept to 16-row / 16-key granularity (warps past a group's end and
//           16-key sub-blocks past it skip their MMAs and exps), ~15% at these lengths.
// So the floor is the memory term (~19 us); the kernel has to overlap loads with the SFU work.
//
// Tensor-core path (fp16/bf16, D in {32, 64, 128}, 16-byte aligned rows): one CTA per
// (query tile, head, group); NW warps, each owning 16 query rows (BM = 16*NW); K/V blocks of BN
// keys stream through a 2-stage cp.async double buffer; S = Q K^T and O += P V on
// mma.sync.m16n8k16 (fp32 accumulators), P re-packed from the S accumulators in registers
// (FlashAttention-2 layout), softmax statistics in the exp2 domain with scale*log2(e) folded in.
// Tiles: 64 query rows x 64 keys (4 warps; 32 keys at D = 128) for groups averaging over 48
// elements, 32 x 32 (2 warps) for short groups (modality attention) - chosen from N / G without a
// device sync.
// Grid: x = q-tiles * heads (q-tiles of one (group, head) adjacent, sharing K/V in L2),
// y = groups (grid-stride past 65535); tiles past a group's end exit at once.
//
// Whole-group path (fp16/bf16, D in {32, 64}; the default when the mean group exceeds 48 rows and
// the longest fits 48 KB of shared memory for Q, K and V - ads sets: 200 rows x 64 B x 3 = 39 KB):
// one CTA per (head, group) stages the group once and loops its warps over 16-row query tiles, see
// attn_group_kernel. Tuning(cuda_attention="tile32"|"tile64"|"group") forces a path, for tuning.
//
// SIMT path (fp32, other head dims up to 256, unaligned views): one warp per (row, head), keys in
// chunks of 32 (one per lane), online softmax, exact fp32 arithmetic (the fp32 contract is 1e-5).
#include "common.cuh"

#include <math.h>

namespace dm2s2 {
namespace {

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_rs, q_hs, k_rs, k_hs, v_rs, v_hs, o_rs, o_hs;
  const int* cu;
  int64_t groups, total, heads;
  int head_dim;
  int ntiles;
  float scale_log2;
};

// Group g's rows [start, start + L), clamped into [0, total): offsets that break the contract
// (the public op validates them; the raw op does not sync to) never cause an out-of-bounds access.
__device__ __forceinline__ void group_bounds(const int* cu, int64_t g, int64_t total, int& start, int& L) {
  const int64_t s = min(max(static_cast<int64_t>(cu[g]), int64_t(0)), total);
  const int64_t e = min(max(static_cast<int64_t>(cu[g + 1]), s), total);
  start = static_cast<int>(s);
  L = static_cast<int>(e - s);
}

// Copy ROWS rows of a [*, D] tile (16-byte chunks, swizzled) starting at row0 of the group;
// rows at or past L are zero-filled (never read).
template <int ROWS, int CH, int NT, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t rs, int row0, int L) {
  constexpr int kIters = (ROWS * CH + NT - 1) / NT;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = threadIdx.x + it * NT;
    if (ROWS * CH % NT != 0 && c >= ROWS * CH) break;
    const int r = c / CH, ch = c % CH;
    const int gr = row0 + r;
    const bool ok = gr < L;
    const T* src = ok ? g + static_cast<int64_t>(gr) * rs + ch * 8 : g;
    cp_async16(s + r * (CH * 8) + swz<CH>(r, ch) * 8, src, ok);
  }
}

// CTAs per SM the register budget is sized for (short groups are latency-bound: occupancy pays).
template <int D, int NW>
constexpr int attn_min_ctas() {
  return (D == 32 ? 16 : D == 64 ? 12 : 8) / NW;
}

template <typename T, int D, int NW, int BN>
__global__ void __launch_bounds__(32 * NW, attn_min_ctas<D, NW>()) attn_mma_kernel(const AttnParams p) {
  constexpr int BM = 16 * NW;   // query rows per CTA
  constexpr int NT = 32 * NW;   // threads
  constexpr int CH = D / 8;     // 16-byte chunks per row (2-byte types)
  constexpr int KD = D / 16;    // k16 steps of Q K^T
  constexpr int ND = D / 8;     // n8 tiles of O
  constexpr int NS = BN / 8;    // n8 tiles of S
  constexpr int KB = BN / 16;   // k16 steps of P V
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shape");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sK = sQ + BM * D;                     // [2][BN][D]
  T* sV = sK + 2 * BN * D;                 // [2][BN][D]

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g8 = lane >> 2, tig = lane & 3;
  const int tile = blockIdx.x % p.ntiles;
  const int64_t head = blockIdx.x / p.ntiles;

  for (int64_t grp = blockIdx.y; grp < p.groups; grp += gridDim.y) {
    int start, L;
    group_bounds(p.cu, grp, p.total, start, L);
    // Tiles past ntiles (a max_seqlen under the longest group) are taken by the same CTA: the
    // result never depends on max_seqlen, only the grid size does.
    for (int q0 = tile * BM; q0 < L; q0 += p.ntiles * BM) {  // CTA-uniform
      const int nkb = (L + BN - 1) / BN;
      const T* qb = q + static_cast<int64_t>(start) * p.q_rs + head * p.q_hs;
      const T* kb = k + static_cast<int64_t>(start) * p.k_rs + head * p.k_hs;
      const T* vb = v + static_cast<int64_t>(start) * p.v_rs + head * p.v_hs;

      load_tile<BM, CH, NT>(sQ, qb, p.q_rs, q0, L);
      load_tile<BN, CH, NT>(sK, kb, p.k_rs, 0, L);
      load_tile<BN, CH, NT>(sV, vb, p.v_rs, 0, L);
      cp_async_commit();

      uint32_t qf[KD][4];
      float o[ND][4];
#pragma unroll
      for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
      float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
      const bool warp_active = q0 + warp * 16 < L;  // warp-uniform

      for (int j = 0; j < nkb; ++j) {
        const int st = j & 1;
        if (j + 1 < nkb) {  // prefetch the next K/V block into the other stage
          load_tile<BN, CH, NT>(sK + (st ^ 1) * BN * D, kb, p.k_rs, (j + 1) * BN, L);
          load_tile<BN, CH, NT>(sV + (st ^ 1) * BN * D, vb, p.v_rs, (j + 1) * BN, L);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        // Warps whose 16 query rows all lie past the group's end only help load and sync.
        if (warp_active) {
          if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
              const int row = warp * 16 + (lane & 15);
              const int chunk = kk * 2 + (lane >> 4);
              ldmatrix_x4(qf[kk], sQ + row * D + swz<CH>(row, chunk) * 8);
            }
          }
          const T* cK = sK + st * BN * D;
          const T* cV = sV + st * BN * D;
          const int kbase = j * BN;
          const int kvalid = L - kbase < BN ? L - kbase : BN;  // >= 1
          const int nsub = (kvalid + 15) >> 4;  // 16-key sub-blocks holding a valid key

          // S = Q K^T (16 x BN per warp); sub-blocks wholly past the end are skipped.
          float s[NS][4];
#pragma unroll
          for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
          for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int np = 0; np < NS / 2; ++np) {
              if (np < nsub) {
                uint32_t b[4];
                const int row = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = kk * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(b, cK + row * D + swz<CH>(row, chunk) * 8);
                mma16816<T>(s[2 * np], qf[kk], b[0], b[1]);
                mma16816<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
              }
            }
          }

          // Online softmax (rows g8 and g8 + 8 of the warp's 16), exp2 domain; only the group's
          // last block has keys to mask (after scaling, so any sign of scale works).
          const bool need_mask = kvalid < BN;
          float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              s[nt][e] *= p.scale_log2;
              s[nt][2 + e] *= p.scale_log2;
              if (need_mask && nt * 8 + 2 * tig + e >= kvalid) s[nt][e] = s[nt][2 + e] = -INFINITY;
              mx0 = fmaxf(mx0, s[nt][e]);
              mx1 = fmaxf(mx1, s[nt][2 + e]);
            }
          }
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
          // Every block holds at least one valid key, so the new maxima are finite.
          const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
          const float a0 = fast_exp2(m0 - mn0), a1 = fast_exp2(m1 - mn1);  // 0 on the first block
          m0 = mn0;
          m1 = mn1;
          float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
            if ((nt >> 1) < nsub) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                s[nt][e] = fast_exp2(s[nt][e] - mn0);
                s[nt][2 + e] = fast_exp2(s[nt][2 + e] - mn1);
                rs0 += s[nt][e];
                rs1 += s[nt][2 + e];
              }
            }
          }
          l0 = l0 * a0 + rs0;  // per-thread partial row sums; reduced over the quad at the end
          l1 = l1 * a1 + rs1;
#pragma unroll
          for (int i = 0; i < ND; ++i) {
            o[i][0] *= a0;
            o[i][1] *= a0;
            o[i][2] *= a1;
            o[i][3] *= a1;
          }

          // O += P V: the S accumulators are the A fragments of P (16 x BN, k = key).
#pragma unroll
          for (int kk = 0; kk < KB; ++kk) {
            if (kk < nsub) {
              uint32_t pa[4];
              pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
              pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
              pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
              pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
              for (int dp = 0; dp < ND / 2; ++dp) {
                uint32_t b[4];
                const int row = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int chunk = dp * 2 + (lane >> 4);
                ldmatrix_x4_trans(b, cV + row * D + swz<CH>(row, chunk) * 8);
                mma16816<T>(o[2 * dp], pa, b[0], b[1]);
                mma16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
              }
            }
          }
        }
        __syncthreads();  // stage st is refilled by the next iteration's prefetch
      }

      if (warp_active) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float i0 = 1.0f / l0, i1 = 1.0f / l1;  // l >= 1: the row maximum contributes exp2(0)

        // Stage the warp's 16 output rows in its own Q rows (only this warp ever read them), then
        // write 16-byte chunks.
        T* sO = sQ + warp * 16 * D;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
          const int r0 = g8, r1 = g8 + 8;
          *reinterpret_cast<uint32_t*>(sO + r0 * D + swz<CH>(r0, i) * 8 + 2 * tig) =
              pack2<T>(o[i][0] * i0, o[i][1] * i0);
          *reinterpret_cast<uint32_t*>(sO + r1 * D + swz<CH>(r1, i) * 8 + 2 * tig) =
              pack2<T>(o[i][2] * i1, o[i][3] * i1);
        }
        __syncwarp();
        T* ob = out + static_cast<int64_t>(start) * p.o_rs + head * p.o_hs;
#pragma unroll
        for (int it = 0; it < (16 * CH) / 32; ++it) {
          const int c = lane + it * 32;
          const int r = c / CH, ch = c % CH;
          const int qrow = q0 + warp * 16 + r;
          if (qrow < L) {
            *reinterpret_cast<uint4*>(ob + static_cast<int64_t>(qrow) * p.o_rs + ch * 8) =
                *reinterpret_cast<const uint4*>(sO + r * D + swz<CH>(r, ch) * 8);
          }
        }
      }  // warp_active
      __syncthreads();  // shared memory is reused by the next tile or group of this CTA
    }
  }
}

// ------------------------------------------------------------------ whole-group kernel
// One CTA per (head, group), NW warps. The group's Q, K and V rows (up to `cap` rows, cap >= 64,
// a multiple of 16, sized from max_seqlen) are copied into shared memory once, in two cp.async
// groups (rows [0, 64) first, so the first key block starts while the rest is in flight); then
// each warp takes 16-row query tiles t = warp, warp + NW, ... and sweeps all keys in 64-key blocks
// with an online softmax, reading K/V only from shared memory. Versus the tiled kernel: K/V are
// read from L2 once per (group, head) instead of once per 64-row query tile, no CTA of the grid is
// idle (the tiled grid is sized by max_seqlen), and a CTA syncs twice per group instead of twice
// per key block. A group longer than cap (max_seqlen below the longest group: the raw op does not
// sync to check it) takes a slow but correct path: 64-row query rounds x cap-row K/V chunks.
constexpr int kGroupBN = 64;  // keys per online-softmax block

// Copy rows [r0, r1) (group-relative) of a [*, D] operand into shared rows dst0 + (r - r0);
// rows at or past L are zero-filled (V rows past the end meet P = 0: zeros, never NaN garbage).
template <int CH, int NT, typename T>
__device__ __forceinline__ void load_rows(T* s, const T* g, int64_t rs, int r0, int r1, int dst0, int L) {
  const int n = (r1 - r0) * CH;
  for (int c = threadIdx.x; c < n; c += NT) {
    const int r = c / CH, ch = c - (c / CH) * CH;
    const int gr = r0 + r;
    const int sr = dst0 + r;
    const bool ok = gr < L;
    const T* src = ok ? g + static_cast<int64_t>(gr) * rs + ch * 8 : g;
    cp_async16(s + sr * (CH * 8) + swz<CH>(sr, ch) * 8, src, ok);
  }
}

// The warp's 16 query rows (A fragments) from shared rows row0 .. row0 + 15.
template <typename T, int D>
__device__ __forceinline__ void load_q_frag(uint32_t (&qf)[D / 16][4], const T* sQ, int row0, int lane) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int row = row0 + (lane & 15);
    const int chunk = kk * 2 + (lane >> 4);
    ldmatrix_x4(qf[kk], sQ + row * D + swz<CH>(row, chunk) * 8);
  }
}

// Online-softmax state of one warp's 16 query rows (rows g8 and g8 + 8 of this thread).
template <int D>
struct RowState {
  float o[D / 8][4];
  float m0, m1, l0, l1;
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    m0 = m1 = -INFINITY;
    l0 = l1 = 0.0f;
  }
};

// One 64-key block (shared rows krow0 .. krow0 + 63 of sK / sV, of which the first kvalid >= 1
// are keys of the group): S = Q K^T, online softmax, O += P V. Same math as attn_mma_kernel.
template <typename T, int D>
__device__ __forceinline__ void attend_block(RowState<D>& st, const uint32_t (&qf)[D / 16][4], const T* sK,
                                             const T* sV, int krow0, int kvalid, float scale_log2, int lane) {
  constexpr int BN = kGroupBN;
  constexpr int CH = D / 8, KD = D / 16, ND = D / 8, NS = BN / 8, KB = BN / 16;
  const int tig = lane & 3;
  const int nsub = (kvalid + 15) >> 4;
  float s[NS][4];
#pragma unroll
  for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
    for (int np = 0; np < NS / 2; ++np) {
      if (np < nsub) {
        uint32_t b[4];
        const int row = krow0 + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int chunk = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(b, sK + row * D + swz<CH>(row, chunk) * 8);
        mma16816<T>(s[2 * np], qf[kk], b[0], b[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
  }
  const bool need_mask = kvalid < BN;
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[nt][e] *= scale_log2;
      s[nt][2 + e] *= scale_log2;
      if (need_mask && nt * 8 + 2 * tig + e >= kvalid) s[nt][e] = s[nt][2 + e] = -INFINITY;
      mx0 = fmaxf(mx0, s[nt][e]);
      mx1 = fmaxf(mx1, s[nt][2 + e]);
    }
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float mn0 = fmaxf(st.m0, mx0), mn1 = fmaxf(st.m1, mx1);  // finite: key krow0 is valid
  const float a0 = fast_exp2(st.m0 - mn0), a1 = fast_exp2(st.m1 - mn1);
  st.m0 = mn0;
  st.m1 = mn1;
  float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
  for (int nt = 0; nt < NS; ++nt) {
    if ((nt >> 1) < nsub) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[nt][e] = fast_exp2(s[nt][e] - mn0);
        s[nt][2 + e] = fast_exp2(s[nt][2 + e] - mn1);
        rs0 += s[nt][e];
        rs1 += s[nt][2 + e];
      }
    }
  }
  st.l0 = st.l0 * a0 + rs0;
  st.l1 = st.l1 * a1 + rs1;
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    st.o[i][0] *= a0;
    st.o[i][1] *= a0;
    st.o[i][2] *= a1;
    st.o[i][3] *= a1;
  }
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    if (kk < nsub) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < ND / 2; ++dp) {
        uint32_t b[4];
        const int row = krow0 + kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int chunk = dp * 2 + (lane >> 4);
        ldmatrix_x4_trans(b, sV + row * D + swz<CH>(row, chunk) * 8);
        mma16816<T>(st.o[2 * dp], pa, b[0], b[1]);
        mma16816<T>(st.o[2 * dp + 1], pa, b[2], b[3]);
      }
    }
  }
}

// Normalise and write the warp's 16 rows: staged in shared rows srow0 .. srow0 + 15 (the warp's
// own Q rows, already in registers), then 16-byte stores of the rows below L.
template <typename T, int D>
__device__ __forceinline__ void store_rows(RowState<D>& st, T* sQ, int srow0, T* ob, int64_t o_rs, int qrow0, int L,
                                           int lane) {
  constexpr int CH = D / 8, ND = D / 8;
  const int g8 = lane >> 2, tig = lane & 3;
  float l0 = st.l0, l1 = st.l1;
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.0f / l0, i1 = 1.0f / l1;  // l >= 1
  __syncwarp();  // every lane's ldmatrix of these Q rows is done before they are overwritten
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int r0 = srow0 + g8, r1 = srow0 + g8 + 8;
    *reinterpret_cast<uint32_t*>(sQ + r0 * D + swz<CH>(r0, i) * 8 + 2 * tig) =
        pack2<T>(st.o[i][0] * i0, st.o[i][1] * i0);
    *reinterpret_cast<uint32_t*>(sQ + r1 * D + swz<CH>(r1, i) * 8 + 2 * tig) =
        pack2<T>(st.o[i][2] * i1, st.o[i][3] * i1);
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < (16 * CH) / 32; ++it) {
    const int c = lane + it * 32;
    const int r = c / CH, ch = c % CH;
    const int qrow = qrow0 + r;
    const int sr = srow0 + r;
    if (qrow < L) {
      *reinterpret_cast<uint4*>(ob + static_cast<int64_t>(qrow) * o_rs + ch * 8) =
          *reinterpret_cast<const uint4*>(sQ + sr * D + swz<CH>(sr, ch) * 8);
    }
  }
  __syncwarp();
}

template <typename T, int D, int NW>
__global__ void __launch_bounds__(32 * NW, (D == 32 ? 4 : 3)) attn_group_kernel(const AttnParams p, int cap) {
  constexpr int NT = 32 * NW;
  constexpr int CH = D / 8;
  constexpr int KD = D / 16;
  constexpr int BN = kGroupBN;
  static_assert(NW * 16 <= BN, "the slow path stages NW*16 query rows in the first 64 shared rows");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [cap][D]
  T* sK = sQ + cap * D;                    // [cap][D]
  T* sV = sK + cap * D;                    // [cap][D]

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t head = blockIdx.x;

  for (int64_t grp = blockIdx.y; grp < p.groups; grp += gridDim.y) {
    int start, L;
    group_bounds(p.cu, grp, p.total, start, L);
    if (L == 0) continue;  // CTA-uniform; nothing of the shared memory was touched
    const T* qb = q + static_cast<int64_t>(start) * p.q_rs + head * p.q_hs;
    const T* kb = k + static_cast<int64_t>(start) * p.k_rs + head * p.k_hs;
    const T* vb = v + static_cast<int64_t>(start) * p.v_rs + head * p.v_hs;
    T* ob = out + static_cast<int64_t>(start) * p.o_rs + head * p.o_hs;
    const int L16 = (L + 15) & ~15;
    uint32_t qf[KD][4];
    RowState<D> st;

    if (L16 <= cap) {
      // ---- fast path: the whole group in shared memory
      const int nkb = (L + BN - 1) / BN;
      const int first = L16 < BN ? L16 : BN;
      load_rows<CH, NT>(sQ, qb, p.q_rs, 0, first, 0, L);
      load_rows<CH, NT>(sK, kb, p.k_rs, 0, first, 0, L);
      load_rows<CH, NT>(sV, vb, p.v_rs, 0, first, 0, L);
      cp_async_commit();
      load_rows<CH, NT>(sQ, qb, p.q_rs, first, L16, first, L);
      load_rows<CH, NT>(sK, kb, p.k_rs, first, L16, first, L);
      load_rows<CH, NT>(sV, vb, p.v_rs, first, L16, first, L);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      // Round 0: tile `warp` (rows < 64) against key block 0 while the rest lands.
      const bool active = warp * 16 < L;  // warp-uniform
      if (active) {
        load_q_frag<T, D>(qf, sQ, warp * 16, lane);
        st.init();
        attend_block<T, D>(st, qf, sK, sV, 0, L < BN ? L : BN, p.scale_log2, lane);
      }
      cp_async_wait<0>();
      __syncthreads();
      if (active) {
        for (int j = 1; j < nkb; ++j) {
          const int kv = L - j * BN;
          attend_block<T, D>(st, qf, sK, sV, j * BN, kv < BN ? kv : BN, p.scale_log2, lane);
        }
        store_rows<T, D>(st, sQ, warp * 16, ob, p.o_rs, warp * 16, L, lane);
      }
      // Later rounds: no barrier, everything is in shared memory.
      for (int t = warp + NW; t * 16 < L; t += NW) {
        load_q_frag<T, D>(qf, sQ, t * 16, lane);
        st.init();
        for (int j = 0; j < nkb; ++j) {
          const int kv = L - j * BN;
          attend_block<T, D>(st, qf, sK, sV, j * BN, kv < BN ? kv : BN, p.scale_log2, lane);
        }
        store_rows<T, D>(st, sQ, t * 16, ob, p.o_rs, t * 16, L, lane);
      }
    } else {
      // ---- slow path (group longer than cap): NW*16 query rows x cap-row K/V chunks
      for (int q0 = 0; q0 < L; q0 += NW * 16) {  // CTA-uniform
        const int qe = q0 + NW * 16 < L16 ? q0 + NW * 16 : L16;
        load_rows<CH, NT>(sQ, qb, p.q_rs, q0, qe, 0, L);
        cp_async_commit();
        const bool active = q0 + warp * 16 < L;
        if (active) st.init();
        for (int kv0 = 0; kv0 < L; kv0 += cap) {
          const int ke = kv0 + cap < L16 ? kv0 + cap : L16;
          load_rows<CH, NT>(sK, kb, p.k_rs, kv0, ke, 0, L);
          load_rows<CH, NT>(sV, vb, p.v_rs, kv0, ke, 0, L);
          cp_async_commit();
          cp_async_wait<0>();
          __syncthreads();
          if (active) {
            if (kv0 == 0) load_q_frag<T, D>(qf, sQ, warp * 16, lane);
            const int n = L - kv0 < cap ? L - kv0 : cap;  // valid keys in this chunk
            for (int j = 0; j * BN < n; ++j) {
              const int kv = n - j * BN;
              attend_block<T, D>(st, qf, sK, sV, j * BN, kv < BN ? kv : BN, p.scale_log2, lane);
            }
          }
          __syncthreads();  // the chunk is refilled next
        }
        if (active) store_rows<T, D>(st, sQ, warp * 16, ob, p.o_rs, q0 + warp * 16, L, lane);
        __syncthreads();  // sQ is refilled by the next round
      }
    }
    __syncthreads();  // shared memory is reused by this CTA's next group
  }
}

// One warp per (row, head): exact fp32 softmax attention over the row's group.
constexpr int kSimtWarps = 4;

template <typename T, int DPL>
__global__ void __launch_bounds__(32 * kSimtWarps) attn_simt_kernel(const AttnParams p) {
  __shared__ float sq[kSimtWarps][32 * DPL];
  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = p.head_dim;
  const int64_t work = p.total * p.heads;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp; w < work;
       w += static_cast<int64_t>(gridDim.x) * kSimtWarps) {
    const int64_t n = w / p.heads;
    const int64_t h = w - n * p.heads;
    // The group of row n: the last g with cu[g] <= n (then cu[g + 1] > n, empty groups skipped).
    int64_t lo = 0, hi = p.groups;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) >> 1;
      if (p.cu[mid] <= n) lo = mid; else hi = mid;
    }
    int start, len;
    group_bounds(p.cu, lo, p.total, start, len);
    int end = start + len;
    if (n < start || n >= end) {  // offsets broke the contract: attend to the row itself only
      start = static_cast<int>(n);
      end = start + 1;
    }
    const T* qr = q + n * p.q_rs + h * p.q_hs;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      sq[warp][d] = d < D ? to_float(qr[d]) * p.scale_log2 : 0.0f;
    }
    __syncwarp();
    float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
    for (int c = start; c < end; c += 32) {
      const int key = c + lane;
      const bool ok = key < end;
      float s = -INFINITY;
      if (ok) {
        const T* kr = k + static_cast<int64_t>(key) * p.k_rs + h * p.k_hs;
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot = fmaf(sq[warp][d], to_float(kr[d]), dot);
        s = dot;
      }
      const float mn = fmaxf(m, warp_max(s));  // finite: key c is valid
      const float alpha = fast_exp2(m - mn);
      const float pj = ok ? fast_exp2(s - mn) : 0.0f;
      l = l * alpha + warp_sum(pj);
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[i] *= alpha;
      const int cnt = end - c < 32 ? end - c : 32;
      for (int jj = 0; jj < cnt; ++jj) {
        const float pjj = __shfl_sync(0xffffffffu, pj, jj);
        const T* vr = v + static_cast<int64_t>(c + jj) * p.v_rs + h * p.v_hs;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const int d = lane + 32 * i;
          if (d < D) acc[i] = fmaf(pjj, to_float(vr[d]), acc[i]);
        }
      }
      m = mn;
    }
    T* orow = out + n * p.o_rs + h * p.o_hs;
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) orow[d] = from_float<T>(acc[i] * inv);
    }
    __syncwarp();  // sq is rewritten for the warp's next row
  }
}

AttnParams make_params(const AttnArgs& a) {
  AttnParams p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.out = a.out;
  p.q_rs = a.q_rs;
  p.q_hs = a.q_hs;
  p.k_rs = a.k_rs;
  p.k_hs = a.k_hs;
  p.v_rs = a.v_rs;
  p.v_hs = a.v_hs;
  p.o_rs = a.o_rs;
  p.o_hs = a.o_hs;
  p.cu = a.cu_seqlens;
  p.groups = a.groups;
  p.total = a.total;
  p.heads = a.heads;
  p.head_dim = static_cast<int>(a.head_dim);
  p.ntiles = 0;
  p.scale_log2 = a.scale * 1.4426950408889634f;
  return p;
}

template <typename T, int D, int NW, int BN>
cudaError_t launch_mma(AttnParams p, int64_t max_seqlen, cudaStream_t stream) {
  constexpr int BM = 16 * NW;
  int64_t ntiles = (max_seqlen + BM - 1) / BM;
  if (ntiles < 1) ntiles = 1;  // correctness never depends on max_seqlen (see the kernel)
  if (ntiles * p.heads > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  p.ntiles = static_cast<int>(ntiles);
  const size_t smem = static_cast<size_t>(BM + 4 * BN) * D * sizeof(T);
  auto kernel = attn_mma_kernel<T, D, NW, BN>;
  DM2S2_RETURN_IF_ERROR(allow_dynamic_smem(kernel, smem));
  const dim3 grid(static_cast<unsigned>(ntiles * p.heads),
                  static_cast<unsigned>(p.groups < 65535 ? p.groups : 65535));
  kernel<<<grid, 32 * NW, smem, stream>>>(p);
  DM2S2_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_mma_tile(AttnParams p, int64_t max_seqlen, int tile, cudaStream_t stream) {
  if (tile == 32) return launch_mma<T, D, 2, 32>(p, max_seqlen, stream);
  // D = 128: 32-key blocks keep S at 16 registers a thread next to O's 64 and Q's 32.
  return launch_mma<T, D, 4, (D == 128 ? 32 : 64)>(p, max_seqlen, stream);
}

// Shared rows of each operand the whole-group kernel may stage: auto mode keeps the three
// operands within 48 KB (D = 32: 256 rows; several CTAs per SM), a forced "group" within 96 KB.
constexpr int kGroupNW = 4;
inline int64_t group_cap_limit(int64_t head_dim, bool forced) {
  const int64_t budget = forced ? 96 * 1024 : 48 * 1024;
  return (budget / (3 * head_dim * 2)) & ~int64_t(15);
}
inline int64_t group_cap(int64_t max_seqlen, int64_t head_dim, bool forced) {
  int64_t cap = (max_seqlen + 15) & ~int64_t(15);
  if (cap < kGroupBN) cap = kGroupBN;
  const int64_t lim = group_cap_limit(head_dim, forced);
  return cap < lim ? cap : lim;
}

template <typename T, int D>
cudaError_t launch_group(AttnParams p, int64_t max_seqlen, bool forced, cudaStream_t stream) {
  if (p.heads > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const int cap = static_cast<int>(group_cap(max_seqlen, D, forced));
  const size_t smem = static_cast<size_t>(3) * cap * D * sizeof(T);
  auto kernel = attn_group_kernel<T, D, kGroupNW>;
  DM2S2_RETURN_IF_ERROR(allow_dynamic_smem(kernel, smem));
  const dim3 grid(static_cast<unsigned>(p.heads), static_cast<unsigned>(p.groups < 65535 ? p.groups : 65535));
  kernel<<<grid, 32 * kGroupNW, smem, stream>>>(p, cap);
  DM2S2_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename T, int DPL>
cudaError_t launch_simt(const AttnParams& p, cudaStream_t stream) {
  const int64_t warps = p.total * p.heads;
  const int64_t blocks = (warps + kSimtWarps - 1) / kSimtWarps;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  attn_simt_kernel<T, DPL><<<grid, 32 * kSimtWarps, 0, stream>>>(p);
  DM2S2_CHECK_LAUNCH();
  return cudaSuccess;
}

bool mma_aligned(const AttnArgs& a) {
  auto ok = [](const void* ptr, int64_t rs, int64_t hs) {
    return aligned_to(ptr, 16) && rs % 8 == 0 && hs % 8 == 0;
  };
  return ok(a.q, a.q_rs, a.q_hs) && ok(a.k, a.k_rs, a.k_hs) && ok(a.v, a.v_rs, a.v_hs) &&
         ok(a.out, a.o_rs, a.o_hs);
}

}  // namespace

int set_attention_path(const AttnArgs& a) {
  if (a.head_dim <= 0 || a.head_dim > 256) return -1;
  const bool half = a.dt == DType::kFloat16 || a.dt == DType::kBFloat16;
  const bool dim_ok = a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128;
  if (half && dim_ok && mma_aligned(a)) {
    const bool group_ok = a.head_dim == 32 || a.head_dim == 64;
    if (a.tile == kAttnTileGroup) return group_ok ? kAttnTileGroup : 64;
    if (a.tile == 32 || a.tile == 64) return a.tile;
    // Short groups (modality attention, ~30 elements) waste less with 32-row tiles.
    const int64_t mean = a.groups > 0 ? a.total / a.groups : 0;
    if (mean <= 48) return 32;
    // Whole groups in shared memory when the longest fits the auto budget (ads sets: 200 rows).
    const int64_t ms = a.max_seqlen < a.total ? a.max_seqlen : a.total;
    if (group_ok && ((ms + 15) & ~int64_t(15)) <= group_cap_limit(a.head_dim, false)) return kAttnTileGroup;
    return 64;
  }
  return 0;
}

cudaError_t set_attention(const AttnArgs& a, cudaStream_t stream) {
  if (a.total <= 0 || a.heads <= 0 || a.groups <= 0) return cudaSuccess;
  if (a.cu_seqlens == nullptr || a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int path = set_attention_path(a);
  if (path < 0) return cudaErrorInvalidValue;
  AttnParams p = make_params(a);
  const int64_t max_seqlen = a.max_seqlen < a.total ? a.max_seqlen : a.total;
  if (path == kAttnTileGroup) {
    const bool forced = a.tile == kAttnTileGroup;
    if (a.dt == DType::kBFloat16) {
      using T = __nv_bfloat16;
      if (a.head_dim == 32) return launch_group<T, 32>(p, max_seqlen, forced, stream);
      return launch_group<T, 64>(p, max_seqlen, forced, stream);
    }
    using T = __half;
    if (a.head_dim == 32) return launch_group<T, 32>(p, max_seqlen, forced, stream);
    return launch_group<T, 64>(p, max_seqlen, forced, stream);
  }
  if (path > 0) {
    if (a.dt == DType::kBFloat16) {
      using T = __nv_bfloat16;
      if (a.head_dim == 32) return launch_mma_tile<T, 32>(p, max_seqlen, path, stream);
      if (a.head_dim == 64) return launch_mma_tile<T, 64>(p, max_seqlen, path, stream);
      return launch_mma_tile<T, 128>(p, max_seqlen, path, stream);
    }
    using T = __half;
    if (a.head_dim == 32) return launch_mma_tile<T, 32>(p, max_seqlen, path, stream);
    if (a.head_dim == 64) return launch_mma_tile<T, 64>(p, max_seqlen, path, stream);
    return launch_mma_tile<T, 128>(p, max_seqlen, path, stream);
  }
  DM2S2_DISPATCH_DTYPE(a.dt, T, {
    if (a.head_dim <= 32) return launch_simt<T, 1>(p, stream);
    if (a.head_dim <= 64) return launch_simt<T, 2>(p, stream);
    if (a.head_dim <= 128) return launch_simt<T, 4>(p, stream);
    return launch_simt<T, 8>(p, stream);
  });
  return cudaSuccess;
}

}  // namespace dm2s2
