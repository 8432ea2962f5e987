// bf16 set attention on AVX512_BF16 dot products (vdpbf16ps: 16 lanes, each the fp32 sum of two
// bf16 products added to an fp32 accumulator), for CPUs that have them (Intel Cooper Lake, Sapphire
// Rapids and later; AMD Zen 4 and later). Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16 -mavx2 -mfma -mf16c; used only when the running CPU reports all of them (run-time
// dispatch in cpu_ops.cpp). Every other entry of the table is the AVX-512 one.
//
// Per task (group, head, block of query rows), as the fp32 kernel (attention_simd.inc) but on
// pairs of bf16 values:
//  - pack K as pairs along d: kt2[dp][j] = (k[j][2dp], k[j][2dp+1]) [Dh, Lp] (32-bit entries, the
//    8x8 transposes of the fp32 kernel), and V as pairs along the rows: vp2[jp][c] =
//    (v[2jp][c], v[2jp+1][c]) [Lh, Dp16]; both zero-padded;
//  - S = Q K^T in 6 x 32 register tiles: each vdpbf16ps takes a broadcast q pair against 16 keys'
//    pairs, products exact, sums in fp32; S is scaled by scale * log2 e in fp32 (not folded into
//    the bf16 K: that would round it);
//  - P = 2^(S - max) in fp32, summed in fp32, rounded to bf16 for the second product (as
//    FlashAttention does), zero past L;
//  - O = P V in 6 x 32 tiles of vdpbf16ps on P pairs against V pairs, times 1/rowsum in fp32,
//    rounded to bf16 once as it is stored.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h hands an undefined vector to the masked builtins behind unmasked
// intrinsics, which -Wall then reports as uninitialized at every inlined use: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "convert_scalar.h"
#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

constexpr int kRows = 6;

#include "bf16_attention.inc"

// S[r][j] = sum_d q_r[d] k_j[d] for R query rows (their pairs qp[r][0, Dh)), keys [0, Lp) (raw dot
// products: the softmax scales them and ignores the columns past L).
template <int R>
inline void qk_tile_rows(const uint32_t* const* qp, const uint32_t* kt2, int64_t Lp, int64_t Dh, float* S) {
  for (int64_t j = 0; j < Lp; j += 32) {
    __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    const uint32_t* kp = kt2 + j;
    for (int64_t dp = 0; dp < Dh; ++dp, kp += Lp) {
      const __m512bh k0 = as_bh(_mm512_load_si512(kp)), k1 = as_bh(_mm512_load_si512(kp + 16));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512bh qb = as_bh(_mm512_set1_epi32(static_cast<int>(qp[r][dp])));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], qb, k0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], qb, k1);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(S + r * Lp + j, acc0[r]);
      _mm512_store_ps(S + r * Lp + j + 16, acc1[r]);
    }
  }
}

// O[r][c0 : c0 + 16 NV] = inv[r] * sum_j P[r][j] V[j][c0 : ...], stored as bf16 (columns < D).
template <int R, int NV>
inline void pv_tile_rows(const uint16_t* P, int64_t Lp, const uint32_t* vp2, int64_t Dp16, int64_t Lh,
                         const float* inv, uint16_t* const* orow, int64_t c0, int64_t D) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const uint32_t* vj = vp2 + c0;
  for (int64_t jp = 0; jp < Lh; ++jp, vj += Dp16) {
    const __m512bh v0 = as_bh(_mm512_load_si512(vj));
    const __m512bh v1 = NV == 2 ? as_bh(_mm512_load_si512(vj + 16)) : v0;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = as_bh(_mm512_set1_epi32(*reinterpret_cast<const int*>(P + r * Lp + 2 * jp)));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], pb, v0);
      if (NV == 2) acc1[r] = _mm512_dpbf16_ps(acc1[r], pb, v1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    const __m256bh h0 = _mm512_cvtneps_pbh(_mm512_mul_ps(acc0[r], iv));
    _mm256_mask_storeu_epi16(orow[r] + c0, first_lanes(D - c0), reinterpret_cast<const __m256i&>(h0));
    if (NV == 2) {
      const __m256bh h1 = _mm512_cvtneps_pbh(_mm512_mul_ps(acc1[r], iv));
      _mm256_mask_storeu_epi16(orow[r] + c0 + 16, first_lanes(D - c0 - 16), reinterpret_cast<const __m256i&>(h1));
    }
  }
}

template <int R>
inline void attention_rows(const uint32_t* const* qp, uint16_t* const* orow, const uint32_t* kt2,
                           const uint32_t* vp2, int64_t Lp, int64_t L, int64_t D, int64_t Dp16, float mult,
                           float* S, uint16_t* P, float* stats) {
  const int64_t Dh = (D + 1) / 2, Lh = (L + 1) / 2;
  qk_tile_rows<R>(qp, kt2, Lp, Dh, S);
  for (int r = 0; r < R; ++r) stats[r] = softmax_row(S + r * Lp, P + r * Lp, Lp, L, mult);
  int64_t c = 0;
  for (; c + 32 <= Dp16; c += 32) pv_tile_rows<R, 2>(P, Lp, vp2, Dp16, Lh, stats, orow, c, D);
  if (c < Dp16) pv_tile_rows<R, 1>(P, Lp, vp2, Dp16, Lh, stats, orow, c, D);
}

template <int R>
inline void attention_rows_upto(int rows, const uint32_t* const* qp, uint16_t* const* orow, const uint32_t* kt2,
                                const uint32_t* vp2, int64_t Lp, int64_t L, int64_t D, int64_t Dp16, float mult,
                                float* S, uint16_t* P, float* stats) {
  if constexpr (R > 1) {
    if (rows < R) {
      attention_rows_upto<R - 1>(rows, qp, orow, kt2, vp2, Lp, L, D, Dp16, mult, S, P, stats);
      return;
    }
  }
  attention_rows<R>(qp, orow, kt2, vp2, Lp, L, D, Dp16, mult, S, P, stats);
}

void attention_bf16(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
                    int64_t head, float* scratch) {
  const int64_t L = g_end - g_begin, Lp = (L + 31) / 32 * 32, D = p.D, Dh = (D + 1) / 2;
  const int64_t Dp16 = (D + 15) / 16 * 16, Lh = (L + 1) / 2, Q = q_end - q_begin;
  if (L <= 0 || Q <= 0) return;
  // Scratch (64-byte aligned; attn_scratch_floats covers it): kt2 [Dh, Lp] | vp2 [Lh (even), Dp16] |
  // S [kRows, Lp] fp32 | P [kRows, Lp] bf16 | stats [16] | staged q pairs [kRows, Dh (to 16)].
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(scratch);
  uint32_t* vp2 = kt2 + Dh * Lp;
  float* S = reinterpret_cast<float*>(vp2 + (Lh + 1) / 2 * 2 * Dp16);
  uint16_t* P = reinterpret_cast<uint16_t*>(S + kRows * Lp);
  float* stats = reinterpret_cast<float*>(P + kRows * Lp);
  uint32_t* qbuf = reinterpret_cast<uint32_t*>(stats + 16);
  const int64_t qstride = (Dh + 15) / 16 * 16;
  const uint16_t* q = &static_cast<const bf16_t*>(p.q)->bits;
  const uint16_t* k = &static_cast<const bf16_t*>(p.k)->bits;
  const uint16_t* v = &static_cast<const bf16_t*>(p.v)->bits;
  uint16_t* out = &static_cast<bf16_t*>(p.out)->bits;
  const uint16_t* kg = k + g_begin * p.k_row + head * p.k_head;
  const bool k_fast = (D % 2 == 0) && (p.k_row % 2 == 0) && (reinterpret_cast<uintptr_t>(kg) % 4 == 0);
  pack_k_pairs(kg, p.k_row, L, D, Lp, k_fast, kt2);
  pack_v_pairs(v + g_begin * p.v_row + head * p.v_head, p.v_row, L, D, Dp16, vp2);
  const uint16_t* qbase = q + head * p.q_head;
  uint16_t* obase = out + head * p.o_head;
  const bool q_direct = (D % 2 == 0) && (p.q_row % 2 == 0) && (reinterpret_cast<uintptr_t>(qbase) % 4 == 0);
  const float mult = p.scale * 1.44269504088896341f;
  for (int64_t i0 = 0; i0 < Q; i0 += kRows) {
    const int R = static_cast<int>(Q - i0 < kRows ? Q - i0 : kRows);
    const uint32_t* qp[kRows];
    uint16_t* orow[kRows];
    for (int r = 0; r < R; ++r) {
      const uint16_t* qs = qbase + (q_begin + i0 + r) * p.q_row;
      if (q_direct) {
        qp[r] = reinterpret_cast<const uint32_t*>(qs);
      } else {
        for (int64_t dp = 0; dp < Dh; ++dp) qbuf[r * qstride + dp] = pair_at(qs, dp, D);
        qp[r] = qbuf + r * qstride;
      }
      orow[r] = obase + (q_begin + i0 + r) * p.o_row;
    }
    attention_rows_upto<kRows>(R, qp, orow, kt2, vp2, Lp, L, D, Dp16, mult, S, P, stats);
  }
}

}  // namespace

const KernelTable& avx512bf16_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx512_kernels();
    t.name = "avx512_bf16";
    t.attention[kBF16] = attention_bf16;
    t.attention_path[kBF16] = "avx512_bf16 vdpbf16ps (bf16 products, fp32 accumulation and softmax)";
    return t;
  }();
  return table;
}

}  // namespace cpu
}  // namespace dm2s2_fast
