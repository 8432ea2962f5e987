// Scalar conversions between fp32 and the half-precision storage types (bf16_t, f16_t), and
// the typed element access the kernels are written over: ld(p, i) -> float, st(p, i, float).
// Everything here is `static inline` (internal linkage): each kernel file, whatever ISA it is
// compiled for, gets its own copy, so the linker can never hand an AVX2 copy to baseline code.
// Rounding is to nearest even; NaN stays NaN (quiet); fp16 overflows to inf as a cast does.
#pragma once

#include <stdint.h>
#include <string.h>

#include "kernels.h"

namespace dm2s2_fast {
namespace cpu {

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

static inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN: quiet
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE half <-> single without F16C (the algorithm of the FP16 library, exact for every input).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return bits_f32(result);
}

static inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const bf16_t* p, int64_t i) { return bf16_to_f32(p[i].bits); }
static inline float ld(const f16_t* p, int64_t i) { return f16_to_f32(p[i].bits); }
static inline void st(float* p, int64_t i, float x) { p[i] = x; }
static inline void st(bf16_t* p, int64_t i, float x) { p[i].bits = f32_to_bf16(x); }
static inline void st(f16_t* p, int64_t i, float x) { p[i].bits = f32_to_f16(x); }

}  // namespace cpu
}  // namespace dm2s2_fast
