// Portable scalar kernels (baseline ISA): the fallback when the CPU lacks AVX2/FMA, and a second
// implementation the tests compare against. Same math and accumulation order as kernels_avx2.cpp
// up to vectorisation (fp32 throughout, max-subtracted softmax, two-pass LayerNorm statistics).
#include <math.h>
#include <string.h>

#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {
namespace {

void attention(const AttnParams& p, int64_t g_begin, int64_t g_end, int64_t q_begin, int64_t q_end,
               int64_t head, float* scratch) {
  const int64_t L = g_end - g_begin, D = p.D;
  float* s = scratch;  // one row of scores
  for (int64_t i = q_begin; i < q_end; ++i) {
    const float* qi = p.q + i * p.q_row + head * p.q_head;
    float m = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = p.k + (g_begin + j) * p.k_row + head * p.k_head;
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += qi[d] * kj[d];
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
    float* oi = p.out + i * p.o_row + head * p.o_head;
    for (int64_t d = 0; d < D; ++d) oi[d] = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      const float* vj = p.v + (g_begin + j) * p.v_row + head * p.v_head;
      const float w = s[j];
      for (int64_t d = 0; d < D; ++d) oi[d] += w * vj[d];
    }
    for (int64_t d = 0; d < D; ++d) oi[d] *= inv;
  }
}

// y = (y - mean) / sqrt(var + eps) * w + b over one row already holding the LayerNorm input.
inline void layernorm_row(float* y, const float* w, const float* b, int64_t d, float eps) {
  float sum = 0.f;
  for (int64_t c = 0; c < d; ++c) sum += y[c];
  const float mean = sum / static_cast<float>(d);
  float sq = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float t = y[c] - mean;
    sq += t * t;
  }
  const float rstd = 1.f / sqrtf(sq / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d; ++c) y[c] = (y[c] - mean) * rstd * w[c] + b[c];
}

void add_layernorm(const float* x, int64_t x_row, const float* r, int64_t r_row, const float* w,
                   const float* b, float* y, int64_t y_row, int64_t d, float eps, int64_t begin,
                   int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * x_row;
    const float* ri = r + i * r_row;
    float* yi = y + i * y_row;
    for (int64_t c = 0; c < d; ++c) yi[c] = xi[c] + ri[c];
    layernorm_row(yi, w, b, d, eps);
  }
}

void bias_gelu(const float* x, int64_t x_row, const float* b, float* y, int64_t y_row, int64_t f,
               int64_t begin, int64_t end) {
  const float k = 0.70710678118654752440f;
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * x_row;
    float* yi = y + i * y_row;
    for (int64_t c = 0; c < f; ++c) {
      const float t = xi[c] + b[c];
      yi[c] = 0.5f * t * (1.f + erff(t * k));
    }
  }
}

int64_t embed_layernorm(const EmbedParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t pos = p.positions[i], typ = p.type_ids[i], row = p.out_rows[i];
    const float* content;
    if (p.table) {
      const int64_t id = p.ids[i];
      if (id < 0 || id >= p.table_rows) return i;
      content = p.table + id * p.table_row;
    } else {
      content = p.dense + i * p.dense_row;
    }
    if (pos < 0 || pos >= p.pos_rows || typ < 0 || typ >= p.type_rows || row < 0 ||
        row >= p.out_rows_total)
      return i;
    const float* pe = p.pos_table + pos * p.pos_row;
    const float* te = p.type_table + typ * p.type_row;
    float* y = p.out + row * p.out_row;
    for (int64_t c = 0; c < d; ++c) y[c] = content[c] + pe[c] + te[c];
    layernorm_row(y, p.weight, p.bias, d, p.eps);
  }
  return -1;
}

void mra_pool(const float* x, int64_t x_row, const float* pre, int64_t pre_row, const float* v,
              int64_t a, const int32_t* cu, float* weights, float* pooled, int64_t pooled_row,
              int64_t d, int64_t g_begin, int64_t g_end) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t s0 = cu[g], s1 = cu[g + 1], L = s1 - s0;
    float* z = pooled + g * pooled_row;
    for (int64_t c = 0; c < d; ++c) z[c] = 0.f;
    if (L <= 0) continue;
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
    for (int64_t i = s0; i < s1; ++i) {
      weights[i] *= inv;
      const float rw = (1.f + weights[i]) * invl;
      const float* xi = x + i * x_row;
      for (int64_t c = 0; c < d; ++c) z[c] += rw * xi[c];
    }
  }
}

const KernelTable kTable = {"generic", attention, add_layernorm, bias_gelu, embed_layernorm, mra_pool};

}  // namespace

const KernelTable& generic_kernels() { return kTable; }

}  // namespace cpu
}  // namespace dm2s2_fast
