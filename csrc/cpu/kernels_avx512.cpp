// AVX-512 set attention (16 lanes, 6 query rows per tile): the one compute-bound CPU op, so the
// one that gains from doubling the vector width; every other entry of the table is the AVX2 one.
// fp32 compute for every storage type. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c;
// used only when
// the running CPU reports AVX-512F/BW/VL, AVX2, FMA and F16C (run-time dispatch in cpu_ops.cpp). Internal linkage throughout, as in kernels_avx2.cpp.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h hands an undefined vector to the masked builtins behind unmasked
// intrinsics (_mm512_max_ps, _mm512_roundscale_ps, ...), which -Wall then reports as
// uninitialized at every inlined use: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <math.h>

#include "convert_scalar.h"
#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

#include "convert_avx2.inc"

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

// ---- bias + GELU on 16 lanes: compute-bound in half precision (the erf rational is ~20 vector ops
// an element group), so it gains from the width the memory-bound ops do not; the division of the
// AVX2 version becomes rcp14 + one Newton step (relative error ~1e-7, as the division's).

template <class T>
struct IsBF16 {
  static constexpr bool value = false;
};
template <>
struct IsBF16<bf16_t> {
  static constexpr bool value = true;
};

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
inline void store16(f16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __m512 gelu512(__m512 x) {
  const __m512 xs = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f));
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(4.f), _mm512_max_ps(_mm512_set1_ps(-4.f), xs));
  const __m512 x2 = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(-2.72614225801306e-10f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(p, xc);
  __m512 q = _mm512_set1_ps(-1.45660718464996e-05f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(-1.42647390514189e-02f));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.f)));
  const __m512 e = _mm512_mul_ps(p, r);
  const __m512 hx = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(hx, e, hx);
}

template <class T>
void bias_gelu(const void* x_, int64_t x_row, const float* b, void* y_, int64_t y_row, int64_t f, int64_t begin,
               int64_t end) {
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const __mmask16 all = 0xFFFF;
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * x_row;
    T* yi = y + i * y_row;
    int64_t c = 0;
    for (; c + 16 <= f; c += 16)
      store16(yi + c, gelu512(_mm512_add_ps(load16(xi + c, all), _mm512_loadu_ps(b + c))), all);
    if (c < f) {
      const __mmask16 m = first_lanes(f - c);
      store16(yi + c, gelu512(_mm512_add_ps(load16(xi + c, m), _mm512_maskz_loadu_ps(m, b + c))), m);
    }
  }
}

// ---- LayerNorm family on 16 lanes: the row's LayerNorm input (the sum of 2 or 3 rows, converted
// from the storage type once) goes to a row buffer on the stack, then mean, centred sum of squares
// and the normalised row come from it (L1). Rows wider than kMaxRow use the AVX2 kernels.

constexpr int64_t kMaxRow = 2048;

template <class T, bool Three>
inline void sum_layernorm_row16(const T* a, const T* b, const T* c3, const float* w, const float* bias, T* y,
                                int64_t d, float eps, float* buf) {
  const __mmask16 all = 0xFFFF;
  const int64_t d16 = d & ~int64_t{15};
  const __mmask16 tail = first_lanes(d - d16);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t c = 0;
  for (; c + 32 <= d16; c += 32) {
    __m512 t0 = _mm512_add_ps(load16(a + c, all), load16(b + c, all));
    __m512 t1 = _mm512_add_ps(load16(a + c + 16, all), load16(b + c + 16, all));
    if (Three) {
      t0 = _mm512_add_ps(t0, load16(c3 + c, all));
      t1 = _mm512_add_ps(t1, load16(c3 + c + 16, all));
    }
    _mm512_store_ps(buf + c, t0);
    _mm512_store_ps(buf + c + 16, t1);
    s0 = _mm512_add_ps(s0, t0);
    s1 = _mm512_add_ps(s1, t1);
  }
  for (; c < d16; c += 16) {
    __m512 t = _mm512_add_ps(load16(a + c, all), load16(b + c, all));
    if (Three) t = _mm512_add_ps(t, load16(c3 + c, all));
    _mm512_store_ps(buf + c, t);
    s0 = _mm512_add_ps(s0, t);
  }
  if (tail) {
    __m512 t = _mm512_add_ps(load16(a + c, tail), load16(b + c, tail));
    if (Three) t = _mm512_add_ps(t, load16(c3 + c, tail));
    _mm512_store_ps(buf + c, t);  // zero in the lanes past d
    s0 = _mm512_add_ps(s0, t);
  }
  const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(d);
  const __m512 vmean = _mm512_set1_ps(mean);
  __m512 q0 = _mm512_setzero_ps(), q1 = q0;
  for (c = 0; c + 32 <= d16; c += 32) {
    const __m512 t0 = _mm512_sub_ps(_mm512_load_ps(buf + c), vmean);
    const __m512 t1 = _mm512_sub_ps(_mm512_load_ps(buf + c + 16), vmean);
    q0 = _mm512_fmadd_ps(t0, t0, q0);
    q1 = _mm512_fmadd_ps(t1, t1, q1);
  }
  for (; c < d16; c += 16) {
    const __m512 t = _mm512_sub_ps(_mm512_load_ps(buf + c), vmean);
    q0 = _mm512_fmadd_ps(t, t, q0);
  }
  if (tail) {
    const __m512 t = _mm512_maskz_sub_ps(tail, _mm512_load_ps(buf + c), vmean);
    q0 = _mm512_fmadd_ps(t, t, q0);
  }
  const float rstd = 1.f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / static_cast<float>(d) + eps);
  const __m512 vr = _mm512_set1_ps(rstd);
  for (c = 0; c < d16; c += 16) {
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(buf + c), vmean), vr);
    store16(y + c, _mm512_fmadd_ps(t, _mm512_loadu_ps(w + c), _mm512_loadu_ps(bias + c)), all);
  }
  if (tail) {
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(buf + c), vmean), vr);
    store16(y + c, _mm512_fmadd_ps(t, _mm512_maskz_loadu_ps(tail, w + c), _mm512_maskz_loadu_ps(tail, bias + c)), tail);
  }
}

template <class T>
void add_layernorm(const void* x_, int64_t x_row, const void* r_, int64_t r_row, const float* w, const float* b,
                   void* y_, int64_t y_row, int64_t d, float eps, int64_t begin, int64_t end) {
  if (d > kMaxRow) {
    avx2_kernels().add_layernorm[sizeof(T) == 4 ? kF32 : (sizeof(T) == 2 && IsBF16<T>::value ? kBF16 : kF16)](
        x_, x_row, r_, r_row, w, b, y_, y_row, d, eps, begin, end);
    return;
  }
  alignas(64) float buf[kMaxRow];
  const T* x = static_cast<const T*>(x_);
  const T* r = static_cast<const T*>(r_);
  T* y = static_cast<T*>(y_);
  for (int64_t i = begin; i < end; ++i)
    sum_layernorm_row16<T, false>(x + i * x_row, r + i * r_row, nullptr, w, b, y + i * y_row, d, eps, buf);
}

template <class T>
int64_t embed_layernorm(const EmbedParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  if (d > kMaxRow)
    return avx2_kernels().embed_layernorm[sizeof(T) == 4 ? kF32 : (IsBF16<T>::value ? kBF16 : kF16)](p, begin, end);
  alignas(64) float buf[kMaxRow];
  EmbedRow<T> r;
  for (int64_t i = begin; i < end; ++i) {
    if (!embed_row(p, i, r)) return i;
    sum_layernorm_row16<T, true>(r.content, r.position, r.type, p.weight, p.bias, r.out, d, p.eps, buf);
  }
  return -1;
}

template <class S>
void attention(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
               int64_t head, float* scratch) {
  attention_simd<Simd16, S>(p, g_begin, g_end, q_begin, q_end, head, scratch);
}

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable table = [] {
    KernelTable t = avx2_kernels();
    t.name = "avx512";
    t.attention[kF32] = attention<float>;
    t.attention[kBF16] = attention<bf16_t>;
    t.attention[kF16] = attention<f16_t>;
    t.attention_path[kF32] = "avx512 fp32 (16 lanes)";
    t.attention_path[kBF16] = "avx512, fp32 compute (bf16 converted as K, V and Q are staged)";
    t.attention_path[kF16] = "avx512, fp32 compute (fp16 converted by F16C as K, V and Q are staged)";
    t.bias_gelu[kF32] = bias_gelu<float>;
    t.bias_gelu[kBF16] = bias_gelu<bf16_t>;
    t.bias_gelu[kF16] = bias_gelu<f16_t>;
    t.add_layernorm[kF32] = add_layernorm<float>;
    t.add_layernorm[kBF16] = add_layernorm<bf16_t>;
    t.add_layernorm[kF16] = add_layernorm<f16_t>;
    t.embed_layernorm[kF32] = embed_layernorm<float>;
    t.embed_layernorm[kBF16] = embed_layernorm<bf16_t>;
    t.embed_layernorm[kF16] = embed_layernorm<f16_t>;
    return t;
  }();
  return table;
}

}  // namespace cpu
}  // namespace dm2s2_fast
