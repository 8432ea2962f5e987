// AVX2/FMA kernels over fp32, bf16 and fp16 storage (fp32 compute). This translation unit alone is
// compiled with -mavx2 -mfma -mf16c; cpu_ops.cpp calls into it only when the running CPU reports
// all three (run-time dispatch), so the same build runs on any x86-64. Everything here has internal linkage (no inline function of a shared header is
// instantiated with AVX2 code that the linker could pick for the baseline TUs), and no STL.
#include <immintrin.h>
#include <math.h>

#include "convert_scalar.h"
#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

#include "convert_avx2.inc"

// ---------------------------------------------------------------------------------------------
// Vector math (fp32, 8 lanes).

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lanes [0, n) set, n in [0, 8].
inline __m256 lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
}

// tanh(x): odd/even rational approximation (the one Eigen and XLA use), a few ulp.
inline __m256 tanh256(__m256 x) {
  const __m256 bound = _mm256_set1_ps(7.90531110763549805f);
  const __m256 tiny = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), x),
                                    _mm256_set1_ps(0.0004f), _CMP_LT_OQ);
  const __m256 xc = _mm256_min_ps(bound, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), bound), x));
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(p, xc);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(4.89352518554385e-03f));
  return _mm256_blendv_ps(_mm256_div_ps(p, q), x, tiny);  // NaN survives the clamp: p/q is NaN
}

// erf(x): odd/even rational approximation on [-4, 4] (Eigen/XLA), |error| < 5e-7.
inline __m256 erf256(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(4.f), _mm256_max_ps(_mm256_set1_ps(-4.f), x));
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, xc);
  __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}

inline __m256 gelu256(__m256 x) {
  const __m256 e = erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752440f)));
  const __m256 hx = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
  return _mm256_fmadd_ps(hx, e, hx);
}

// ---------------------------------------------------------------------------------------------
// Set attention: attention_simd.inc over 8-lane vectors.

// 2^x for x <= 0 (a max-subtracted score), |rel err| < 1e-7: degree-6 near-minimax polynomial
// for 2^f, f in [-0.5, 0.5]. x is clamped at -126 (-inf included): a weight of 2^-126 next to
// the row max's 1 is nothing. NaN propagates (MAXPS returns its second operand on NaN).
inline __m256 exp2_neg256(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-126.f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.534580983e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339993120e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618488965e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328777e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264689e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472057e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 lanes; 6 query rows per tile (12 accumulators + 2 K/V vectors + 1 broadcast of 16 registers).
struct Simd8 {
  using T = __m256;
  static constexpr int W = 8, kRows = 6;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, T v) { _mm256_store_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static float hsum(T v) { return dm2s2_fast::cpu::hsum(v); }
  static float hmax(T v) { return dm2s2_fast::cpu::hmax(v); }
  static T exp2_neg(T x) { return exp2_neg256(x); }
  // Lanes [0, n) of v, the rest `fill`.
  static T keep_first(T v, int64_t n, T fill) { return _mm256_blendv_ps(fill, v, lane_mask(n)); }
  // Store lanes [0, min(n, 8)) (nothing when n <= 0).
  static void store_first(float* dst, T v, int64_t n) {
    if (n >= 8) {
      _mm256_storeu_ps(dst, v);
    } else if (n > 0) {
      _mm256_maskstore_ps(dst, _mm256_castps_si256(lane_mask(n)), v);
    }
  }
};

#include "attention_simd.inc"

template <class S>
void attention(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
               int64_t head, float* scratch) {
  attention_simd<Simd8, S>(p, g_begin, g_end, q_begin, q_end, head, scratch);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm family. A row's LayerNorm input is the sum of two (residual) or three (embedding)
// rows; it is recomputed from the inputs in each of the three passes (sum, centred sum of squares,
// normalise) instead of being stored: no scratch, any storage type, and y may alias an input.

// Sum of four independent accumulators (one chain of 48 dependent adds for d = 384 would be
// latency-bound).
inline __m256 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

template <class T, bool Three>
struct RowSum {
  const T* a;
  const T* b;
  const T* c3;
  __m256 at(int64_t c) const {
    const __m256 t = _mm256_add_ps(load8(a + c), load8(b + c));
    return Three ? _mm256_add_ps(t, load8(c3 + c)) : t;
  }
  float scalar(int64_t c) const { return ld(a, c) + ld(b, c) + (Three ? ld(c3, c) : 0.f); }
};

template <class T, bool Three>
inline void sum_layernorm_row(const RowSum<T, Three>& in, const float* w, const float* b, T* y, int64_t d,
                              float eps) {
  const int64_t d8 = d & ~int64_t{7}, d32 = d & ~int64_t{31};
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t c = 0;
  for (; c < d32; c += 32) {
    s0 = _mm256_add_ps(s0, in.at(c));
    s1 = _mm256_add_ps(s1, in.at(c + 8));
    s2 = _mm256_add_ps(s2, in.at(c + 16));
    s3 = _mm256_add_ps(s3, in.at(c + 24));
  }
  for (; c < d8; c += 8) s0 = _mm256_add_ps(s0, in.at(c));
  float sum = hsum(sum4(s0, s1, s2, s3));
  for (; c < d; ++c) sum += in.scalar(c);
  const float mean = sum / static_cast<float>(d);
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256 q0 = _mm256_setzero_ps(), q1 = q0, q2 = q0, q3 = q0;
  for (c = 0; c < d32; c += 32) {
    const __m256 t0 = _mm256_sub_ps(in.at(c), vmean), t1 = _mm256_sub_ps(in.at(c + 8), vmean);
    const __m256 t2 = _mm256_sub_ps(in.at(c + 16), vmean), t3 = _mm256_sub_ps(in.at(c + 24), vmean);
    q0 = _mm256_fmadd_ps(t0, t0, q0);
    q1 = _mm256_fmadd_ps(t1, t1, q1);
    q2 = _mm256_fmadd_ps(t2, t2, q2);
    q3 = _mm256_fmadd_ps(t3, t3, q3);
  }
  for (; c < d8; c += 8) {
    const __m256 t = _mm256_sub_ps(in.at(c), vmean);
    q0 = _mm256_fmadd_ps(t, t, q0);
  }
  float sq = hsum(sum4(q0, q1, q2, q3));
  for (; c < d; ++c) {
    const float t = in.scalar(c) - mean;
    sq += t * t;
  }
  const float rstd = 1.f / sqrtf(sq / static_cast<float>(d) + eps);
  const __m256 vr = _mm256_set1_ps(rstd);
  for (c = 0; c < d8; c += 8) {
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(in.at(c), vmean), vr);
    store8(y + c, _mm256_fmadd_ps(t, _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
  }
  for (; c < d; ++c) st(y, c, (in.scalar(c) - mean) * rstd * w[c] + b[c]);
}

template <class T>
void add_layernorm(const void* x_, int64_t x_row, const void* r_, int64_t r_row, const float* w, const float* b,
                   void* y_, int64_t y_row, int64_t d, float eps, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(x_);
  const T* r = static_cast<const T*>(r_);
  T* y = static_cast<T*>(y_);
  for (int64_t i = begin; i < end; ++i)
    sum_layernorm_row(RowSum<T, false>{x + i * x_row, r + i * r_row, nullptr}, w, b, y + i * y_row, d, eps);
}

template <class T>
void bias_gelu(const void* x_, int64_t x_row, const float* b, void* y_, int64_t y_row, int64_t f, int64_t begin,
               int64_t end) {
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const int64_t f8 = f & ~int64_t{7};
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * x_row;
    T* yi = y + i * y_row;
    for (int64_t c = 0; c < f8; c += 8)
      store8(yi + c, gelu256(_mm256_add_ps(load8(xi + c), _mm256_loadu_ps(b + c))));
    for (int64_t c = f8; c < f; ++c) {
      const float t = ld(xi, c) + b[c];
      st(yi, c, 0.5f * t * (1.f + erff(t * 0.70710678118654752440f)));
    }
  }
}

template <class T>
int64_t embed_layernorm(const EmbedParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  EmbedRow<T> r;
  for (int64_t i = begin; i < end; ++i) {
    if (!embed_row(p, i, r)) return i;
    sum_layernorm_row(RowSum<T, true>{r.content, r.position, r.type}, p.weight, p.bias, r.out, d, p.eps);
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// MRA pooling.

template <class T>
void mra_pool(const void* x_, int64_t x_row, const float* pre, int64_t pre_row, const float* v, int64_t a,
              const int32_t* cu, float* weights, void* pooled_, int64_t pooled_row, int64_t d, int64_t g_begin,
              int64_t g_end) {
  const T* x = static_cast<const T*>(x_);
  T* pooled = static_cast<T*>(pooled_);
  const int64_t a8 = a & ~int64_t{7};
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t s0 = cu[g], s1 = cu[g + 1], L = s1 - s0;
    T* z = pooled + g * pooled_row;
    if (L <= 0) {
      for (int64_t c = 0; c < d; ++c) st(z, c, 0.f);
      continue;
    }
    float m = -INFINITY;
    for (int64_t i = s0; i < s1; ++i) {
      const float* pi = pre + i * pre_row;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t t = 0; t < a8; t += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(v + t), tanh256(_mm256_loadu_ps(pi + t)), acc);
      float s = hsum(acc);
      for (int64_t t = a8; t < a; ++t) s += v[t] * tanhf(pi[t]);
      weights[i] = s;
      m = s > m ? s : m;
    }
    float sum = 0.f;
    for (int64_t i = s0; i < s1; ++i) {
      weights[i] = expf(weights[i] - m);
      sum += weights[i];
    }
    const float inv = 1.f / sum, invl = 1.f / static_cast<float>(L + 1);
    // Accumulate the pooled row in registers, 64 columns at a time (fits d = 384 in 6 passes).
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) {
      __m256 acc[8];
      for (int n = 0; n < 8; ++n) acc[n] = _mm256_setzero_ps();
      const T* xi = x + s0 * x_row + c;
      for (int64_t i = s0; i < s1; ++i, xi += x_row) {
        const __m256 rw = _mm256_set1_ps((1.f + weights[i] * inv) * invl);
        for (int n = 0; n < 8; ++n) acc[n] = _mm256_fmadd_ps(rw, load8(xi + 8 * n), acc[n]);
      }
      for (int n = 0; n < 8; ++n) store8(z + c + 8 * n, acc[n]);
    }
    for (; c + 8 <= d; c += 8) {
      __m256 acc = _mm256_setzero_ps();
      const T* xi = x + s0 * x_row + c;
      for (int64_t i = s0; i < s1; ++i, xi += x_row)
        acc = _mm256_fmadd_ps(_mm256_set1_ps((1.f + weights[i] * inv) * invl), load8(xi), acc);
      store8(z + c, acc);
    }
    for (; c < d; ++c) {
      float acc = 0.f;
      const T* xi = x + s0 * x_row + c;
      for (int64_t i = s0; i < s1; ++i, xi += x_row) acc += (1.f + weights[i] * inv) * invl * ld(xi, 0);
      st(z, c, acc);
    }
    for (int64_t i = s0; i < s1; ++i) weights[i] *= inv;
  }
}

const KernelTable kTable = {
    "avx2",
    {attention<float>, attention<bf16_t>, attention<f16_t>},
    {"avx2 fp32 (8 lanes)", "avx2, fp32 compute (bf16 converted as K, V and Q are staged)",
     "avx2, fp32 compute (fp16 converted by F16C as K, V and Q are staged)"},
    {add_layernorm<float>, add_layernorm<bf16_t>, add_layernorm<f16_t>},
    {bias_gelu<float>, bias_gelu<bf16_t>, bias_gelu<f16_t>},
    {embed_layernorm<float>, embed_layernorm<bf16_t>, embed_layernorm<f16_t>},
    {mra_pool<float>, mra_pool<bf16_t>, mra_pool<f16_t>},
    {nullptr, nullptr, nullptr},
};

}  // namespace

const KernelTable& avx2_kernels() { return kTable; }

}  // namespace cpu
}  // namespace dm2s2_fast
