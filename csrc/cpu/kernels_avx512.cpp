// AVX-512 set attention (16 lanes, 6 query rows per tile): the one compute-bound CPU op, so the
// one that gains from doubling the vector width; every other entry of the table is the AVX2 one.
// Compiled with -mavx512f -mavx2 -mfma; used only when the running CPU reports AVX-512F, AVX2 and
// FMA (run-time dispatch in cpu_ops.cpp). Internal linkage throughout, as in kernels_avx2.cpp.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h hands an undefined vector to the masked builtins behind unmasked
// intrinsics (_mm512_max_ps, _mm512_roundscale_ps, ...), which -Wall then reports as
// uninitialized at every inlined use: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <math.h>

#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// 2^x for x <= 0, as exp2_neg256 in kernels_avx2.cpp (same polynomial); scalef applies 2^n.
inline __m512 exp2_neg512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-126.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.534580983e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339993120e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618488965e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328777e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264689e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472057e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 lanes; 6 query rows per tile (12 accumulators + 2 K/V vectors + 1 broadcast + 6 row maxima).
// With 8 rows (27 of 32 registers live) GCC spilled the K vectors to the stack: 8.8 ms -> 11.4 ms
// for the ads B=64 layer.
struct Simd16 {
  using T = __m512;
  static constexpr int W = 16, kRows = 6;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, T v) { _mm512_store_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static float hmax(T v) { return _mm512_reduce_max_ps(v); }
  static T exp2_neg(T x) { return exp2_neg512(x); }
  static T keep_first(T v, int64_t n, T fill) { return _mm512_mask_blend_ps(first_lanes(n), fill, v); }
  static void store_first(float* dst, T v, int64_t n) {
    if (n >= 16) {
      _mm512_storeu_ps(dst, v);
    } else if (n > 0) {
      _mm512_mask_storeu_ps(dst, first_lanes(n), v);
    }
  }
};

#include "attention_simd.inc"

void attention(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
               int64_t head, float* scratch) {
  attention_simd<Simd16>(p, g_begin, g_end, q_begin, q_end, head, scratch);
}

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx2_kernels();
    t.name = "avx512";
    t.attention = attention;
    return t;
  }();
  return table;
}

}  // namespace cpu
}  // namespace dm2s2_fast
