// Helpers shared by our CPU kernels, written so that the compiler vectorises loops
// over them.
//
// float32 <-> storage dtype conversions. c10's BFloat16 conversions are correct but
// written so that gcc keeps loops over them scalar (measured: a LayerNorm writing bf16 rows of 24 ran 3.4x slower than writing
// float32); these are the same bit operations (round to nearest even, NaN kept NaN)
// in a form that vectorises.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// The dtypes our kernels take: float32 and the two 16-bit floats, all computed in
// float32 (float64 would lose precision, so it is refused and callers keep torch's ops).
#define TNTP_HALF_CASES(...) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)
#define TNTP_FLOAT_CASES(...) AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) TNTP_HALF_CASES(__VA_ARGS__)

namespace tntp {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float f) {
  return static_cast<T>(f);
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// exp(x) for x <= 0 to ~2 ulp, written so that the compiler vectorises loops over it
// (std::exp stays scalar without -ffast-math). Cody-Waite range reduction, degree-6
// polynomial on [-ln2/2, ln2/2].
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by the 1.5 * 2^23 trick (std::nearbyint is a library call)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace tntp
