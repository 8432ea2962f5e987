// Portable scalar kernels (baseline ISA): the fallback when the CPU lacks AVX2/FMA, and a second
// implementation the tests compare against. Same math and accumulation order as kernels_avx2.cpp
// up to vectorisation (fp32 throughout, max-subtracted softmax, two-pass LayerNorm statistics);
// bf16/fp16 storage is converted as it is loaded and rounded once as it is stored.
#include <math.h>
#include <string.h>

#include "convert_scalar.h"
#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

template <class T>
void attention(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
               int64_t head, float* scratch) {
  const int64_t L = g_end - g_begin, D = p.D;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  float* s = scratch;      // one row of scores [L]
  float* o = scratch + L;  // one output row [D], fp32
  for (int64_t i = q_begin; i < q_end; ++i) {
    const T* qi = q + i * p.q_row + head * p.q_head;
    float m = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      const T* kj = k + (g_begin + j) * p.k_row + head * p.k_head;
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += ld(qi, d) * ld(kj, d);
      acc *= p.scale;
      s[j] = acc;
      m = acc > m ? acc : m;
    }
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      s[j] = expf(s[j] - m);
      sum += s[j];
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      const T* vj = v + (g_begin + j) * p.v_row + head * p.v_head;
      const float w = s[j];
      for (int64_t d = 0; d < D; ++d) o[d] += w * ld(vj, d);
    }
    T* oi = out + i * p.o_row + head * p.o_head;
    for (int64_t d = 0; d < D; ++d) st(oi, d, o[d] * inv);
  }
}

// y = LayerNorm(a + b (+ c)) * w + bias over one row, the sum recomputed from the inputs in each
// pass (no scratch; y may alias a).
template <class T, bool Three>
inline void sum_layernorm_row(const T* a, const T* b, const T* c3, const float* w, const float* bias, T* y,
                              int64_t d, float eps) {
  float sum = 0.f;
  for (int64_t c = 0; c < d; ++c) sum += ld(a, c) + ld(b, c) + (Three ? ld(c3, c) : 0.f);
  const float mean = sum / static_cast<float>(d);
  float sq = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float t = ld(a, c) + ld(b, c) + (Three ? ld(c3, c) : 0.f) - mean;
    sq += t * t;
  }
  const float rstd = 1.f / sqrtf(sq / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d; ++c) {
    const float t = ld(a, c) + ld(b, c) + (Three ? ld(c3, c) : 0.f);
    st(y, c, (t - mean) * rstd * w[c] + bias[c]);
  }
}

template <class T>
void add_layernorm(const void* x_, int64_t x_row, const void* r_, int64_t r_row, const float* w, const float* b,
                   void* y_, int64_t y_row, int64_t d, float eps, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(x_);
  const T* r = static_cast<const T*>(r_);
  T* y = static_cast<T*>(y_);
  for (int64_t i = begin; i < end; ++i)
    sum_layernorm_row<T, false>(x + i * x_row, r + i * r_row, nullptr, w, b, y + i * y_row, d, eps);
}

template <class T>
void bias_gelu(const void* x_, int64_t x_row, const float* b, void* y_, int64_t y_row, int64_t f, int64_t begin,
               int64_t end) {
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const float k = 0.70710678118654752440f;
  for (int64_t i = begin; i < end; ++i) {
    const T* xi = x + i * x_row;
    T* yi = y + i * y_row;
    for (int64_t c = 0; c < f; ++c) {
      const float t = ld(xi, c) + b[c];
      st(yi, c, 0.5f * t * (1.f + erff(t * k)));
    }
  }
}

template <class T>
int64_t embed_layernorm(const EmbedParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  EmbedRow<T> r;
  for (int64_t i = begin; i < end; ++i) {
    if (!embed_row(p, i, r)) return i;
    sum_layernorm_row<T, true>(r.content, r.position, r.type, p.weight, p.bias, r.out, d, p.eps);
  }
  return -1;
}

template <class T>
void mra_pool(const void* x_, int64_t x_row, const float* pre, int64_t pre_row, const float* v, int64_t a,
              const int32_t* cu, float* weights, void* pooled_, int64_t pooled_row, int64_t d, int64_t g_begin,
              int64_t g_end) {
  const T* x = static_cast<const T*>(x_);
  T* pooled = static_cast<T*>(pooled_);
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
      float s = 0.f;
      for (int64_t t = 0; t < a; ++t) s += v[t] * tanhf(pi[t]);
      weights[i] = s;
      m = s > m ? s : m;
    }
    float sum = 0.f;
    for (int64_t i = s0; i < s1; ++i) {
      weights[i] = expf(weights[i] - m);
      sum += weights[i];
    }
    const float inv = 1.f / sum, invl = 1.f / static_cast<float>(L + 1);
    for (int64_t i = s0; i < s1; ++i) weights[i] *= inv;
    for (int64_t c = 0; c < d; ++c) {
      float acc = 0.f;
      for (int64_t i = s0; i < s1; ++i) acc += (1.f + weights[i]) * invl * ld(x + i * x_row, c);
      st(z, c, acc);
    }
  }
}

const KernelTable kTable = {
    "generic",
    {attention<float>, attention<bf16_t>, attention<f16_t>},
    {"generic fp32", "generic, fp32 compute (bf16 converted on load)", "generic, fp32 compute (fp16 converted on load)"},
    {add_layernorm<float>, add_layernorm<bf16_t>, add_layernorm<f16_t>},
    {bias_gelu<float>, bias_gelu<bf16_t>, bias_gelu<f16_t>},
    {embed_layernorm<float>, embed_layernorm<bf16_t>, embed_layernorm<f16_t>},
    {mra_pool<float>, mra_pool<bf16_t>, mra_pool<f16_t>},
    {nullptr, nullptr, nullptr},
};

}  // namespace

const KernelTable& generic_kernels() { return kTable; }

}  // namespace cpu
}  // namespace dm2s2_fast
