// bf16 set attention on AMX tiles (Intel Sapphire Rapids and later): both matrix products of a
// block of 16 query rows run as TDPBF16PS (16 x 16 fp32 accumulator tiles, 32 bf16 products deep,
// fp32 accumulation); the softmax between them runs on AVX-512 in fp32, as in the vdpbf16ps kernel
// (kernels_avx512bf16.cpp), whose packed K and V layouts are exactly the VNNI layout AMX takes.
// Compiled with -mamx-tile -mamx-bf16 and the AVX512_BF16 flags; used only when the running CPU
// reports AMX-TILE and AMX-BF16 and Linux grants the tile state (amx_ready(): arch_prctl). Head
// dims other than 32 and 64 go to the vdpbf16ps kernel.
//
// Per task (group, head, block of query rows):
//  - pack kt2 [Dh, Lp] and vp2 [Lp / 2, D] (pairs; zero past L) as the vdpbf16ps kernel does;
//  - per 16 query rows: S = Q K^T into 16 x 32 fp32 (two C tiles per 32 keys, D / 32 steps of
//    A = 16 q rows x 32 bf16 — read in place from q when 16 rows exist, else staged — and
//    B = 16 d-pairs x 16 keys); softmax rows (scale * log2 e applied in fp32, max-subtracted, exp2,
//    fp32 row sums; P rounded to bf16, zero past L); O = P V over 32-key steps into D / 16 C tiles;
//    O times 1/rowsum in fp32, rounded to bf16 as it is stored.
// The tile configuration (every tile 16 rows x 64 bytes) is loaded at the start of a task and
// released at its end, so no AMX state outlives the call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "convert_scalar.h"
#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

#include "bf16_attention.inc"

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles: 0, 1, 5, 6: C (fp32 accumulators); 2, 7: A; 3, 4: B. Every one 16 rows x 64 bytes.
inline void load_tile_config() {
  TileConfig cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

constexpr int kBlock = 16;  // query rows per tile block

// S [16, Lp] = Q (16 rows, A tiles read with byte stride qs) K^T for all Lp keys. The A tiles (q)
// are loaded once per block (tile 2, and tile 7 for the second 32 of D = 64).
template <int KSTEPS>
inline void qk_tiles(const uint16_t* q, int64_t qs, const uint32_t* kt2, int64_t Lp, float* S) {
  _tile_loadd(2, q, qs);
  if (KSTEPS == 2) _tile_loadd(7, q + 32, qs);
  for (int64_t j = 0; j < Lp; j += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(3, kt2 + j, Lp * 4);
    _tile_loadd(4, kt2 + j + 16, Lp * 4);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
    if (KSTEPS == 2) {
      _tile_loadd(3, kt2 + 16 * Lp + j, Lp * 4);
      _tile_loadd(4, kt2 + 16 * Lp + j + 16, Lp * 4);
      _tile_dpbf16ps(0, 7, 3);
      _tile_dpbf16ps(1, 7, 4);
    }
    _tile_stored(0, S + j, Lp * 4);
    _tile_stored(1, S + j + 16, Lp * 4);
  }
}

// O [16, 16 NC] = P [16, Lp] (bf16) V (vp2 [Lp / 2, 16 NC] pairs).
template <int NC>
inline void pv_tiles(const uint16_t* P, int64_t Lp, const uint32_t* vp2, float* O) {
  constexpr int64_t D = 16 * NC;
  _tile_zero(0);
  _tile_zero(1);
  if (NC == 4) {
    _tile_zero(5);
    _tile_zero(6);
  }
  for (int64_t j = 0; j < Lp; j += 32) {
    _tile_loadd(2, P + j, Lp * 2);
    const uint32_t* vb = vp2 + (j / 2) * D;
    _tile_loadd(3, vb, D * 4);
    _tile_loadd(4, vb + 16, D * 4);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
    if (NC == 4) {
      _tile_loadd(3, vb + 32, D * 4);
      _tile_loadd(4, vb + 48, D * 4);
      _tile_dpbf16ps(5, 2, 3);
      _tile_dpbf16ps(6, 2, 4);
    }
  }
  _tile_stored(0, O, D * 4);
  _tile_stored(1, O + 16, D * 4);
  if (NC == 4) {
    _tile_stored(5, O + 32, D * 4);
    _tile_stored(6, O + 48, D * 4);
  }
}

template <int NC>
void attention_amx_d(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
                     int64_t h_begin, int64_t h_end, float* scratch) {
  constexpr int64_t D = 16 * NC, Dh = D / 2;
  const int64_t L = g_end - g_begin, Lp = (L + 31) / 32 * 32, nh = h_end - h_begin;
  if (L <= 0 || q_end <= q_begin || nh <= 0) return;
  // Scratch (64-byte aligned; attn_scratch_floats(L, D, nh) covers it): per head kt2 [Dh, Lp] |
  // per head vp2 [Lp / 2, D] | S [16, Lp] fp32 | P [16, Lp] bf16 | O [16, D] fp32 | staged q [16, D].
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(scratch);
  uint32_t* vp2 = kt2 + nh * Dh * Lp;
  float* S = reinterpret_cast<float*>(vp2 + nh * (Lp / 2) * D);
  uint16_t* P = reinterpret_cast<uint16_t*>(S + kBlock * Lp);
  float* O = reinterpret_cast<float*>(P + kBlock * Lp);
  uint16_t* qstage = reinterpret_cast<uint16_t*>(O + kBlock * D);
  const uint16_t* q = &static_cast<const bf16_t*>(p.q)->bits;
  const uint16_t* k = &static_cast<const bf16_t*>(p.k)->bits;
  const uint16_t* v = &static_cast<const bf16_t*>(p.v)->bits;
  uint16_t* out = &static_cast<bf16_t*>(p.out)->bits;
  const uint16_t* kg = k + g_begin * p.k_row + h_begin * p.k_head;
  const bool k_fast = (p.k_row % 2 == 0) && (p.k_head % 2 == 0) && (reinterpret_cast<uintptr_t>(kg) % 4 == 0);
  // The q rows' lines of these heads, wanted right after the packing: ask for them now.
  if (p.q_head == D) {
    for (int64_t r = q_begin; r < q_end; ++r) {
      const char* line = reinterpret_cast<const char*>(q + r * p.q_row + h_begin * p.q_head);
      for (int64_t off = 0; off < nh * D * 2; off += 64) _mm_prefetch(line + off, _MM_HINT_T1);
    }
  }
  pack_k_pairs_heads(kg, p.k_row, p.k_head, nh, L, D, Lp, k_fast, kt2);
  pack_v_pairs_heads(v + g_begin * p.v_row + h_begin * p.v_head, p.v_row, p.v_head, nh, L, D, D, vp2, Lp / 2);
  const float mult = p.scale * 1.44269504088896341f;
  load_tile_config();
  for (int64_t h = h_begin; h < h_end; ++h) {
    const uint32_t* kth = kt2 + (h - h_begin) * Dh * Lp;
    const uint32_t* vph = vp2 + (h - h_begin) * (Lp / 2) * D;
    const uint16_t* qbase = q + h * p.q_head;
    uint16_t* obase = out + h * p.o_head;
    for (int64_t i0 = q_begin; i0 < q_end; i0 += kBlock) {
      const int64_t R = q_end - i0 < kBlock ? q_end - i0 : kBlock;
      const uint16_t* qa;
      int64_t qs;
      if (R == kBlock) {
        qa = qbase + i0 * p.q_row;
        qs = p.q_row * 2;
      } else {  // stage the last rows (a tile reads 16), zero the rest
        for (int64_t r = 0; r < kBlock; ++r) {
          if (r < R)
            memcpy(qstage + r * D, qbase + (i0 + r) * p.q_row, D * 2);
          else
            memset(qstage + r * D, 0, D * 2);
        }
        qa = qstage;
        qs = D * 2;
      }
      qk_tiles<D / 32>(qa, qs, kth, Lp, S);
      float inv[kBlock];
      for (int64_t r = 0; r < R; ++r) inv[r] = softmax_row(S + r * Lp, P + r * Lp, Lp, L, mult);
      for (int64_t r = R; r < kBlock; ++r) memset(P + r * Lp, 0, Lp * 2);
      pv_tiles<NC>(P, Lp, vph, O);
      for (int64_t r = 0; r < R; ++r) {
        const __m512 iv = _mm512_set1_ps(inv[r]);
        uint16_t* orow = obase + (i0 + r) * p.o_row;
#pragma GCC unroll 4
        for (int64_t c = 0; c < D; c += 16) {
          const __m256bh hb = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(O + r * D + c), iv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + c), reinterpret_cast<const __m256i&>(hb));
        }
      }
    }
  }
  _tile_release();
}

void attention_amx_heads(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
                         int64_t h_begin, int64_t h_end, float* scratch) {
  if (p.D == 32) {
    attention_amx_d<2>(p, g_begin, g_end, q_begin, q_end, h_begin, h_end, scratch);
  } else if (p.D == 64) {
    attention_amx_d<4>(p, g_begin, g_end, q_begin, q_end, h_begin, h_end, scratch);
  } else {
    const AttentionFn one = avx512bf16_kernels().attention[kBF16];
    for (int64_t h = h_begin; h < h_end; ++h) one(p, g_begin, g_end, q_begin, q_end, h, scratch);
  }
}

void attention_amx(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
                   int64_t head, float* scratch) {
  attention_amx_heads(p, g_begin, g_end, q_begin, q_end, head, head + 1, scratch);
}

}  // namespace

bool amx_ready() {
  static const bool ok = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
    return (bitmask & (1ul << kXfeatureXtiledata)) != 0;
#else
    return false;
#endif
  }();
  return ok;
}

const KernelTable& amx_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx512bf16_kernels();
    t.name = "amx";
    t.attention[kBF16] = attention_amx;
    t.attention_heads[kBF16] = attention_amx_heads;
    t.attention_path[kBF16] =
        "amx tiles for head dims 32 and 64 (bf16 products, fp32 accumulation and softmax), vdpbf16ps otherwise";
    return t;
  }();
  return table;
}

}  // namespace cpu
}  // namespace dm2s2_fast
