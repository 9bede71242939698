// fp16 and bf16 <-> fp32 on the CPU, bit exact (round to nearest even; subnormals, inf and nan
// kept) and independent of the FPU's denormal mode. half_to_float is branch-free, so that
// loops over it vectorise.
#pragma once

#include <cstdint>
#include <cstring>

namespace rgpt::mask_pool {

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Branch-free (masks, not conditionals), so that loops over it vectorise.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  const uint32_t normal = ((exponent + 112u) << 23) | (mantissa << 13);
  // zero or subnormal: mantissa * 2^-24, exact in fp32
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(mantissa)) * 0x1p-24f);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(exponent == 0);
  const uint32_t is_special = 0u - static_cast<uint32_t>(exponent == 31);  // inf, nan
  const uint32_t out = (normal & ~is_subnormal) | (subnormal & is_subnormal) |
                       (is_special & 0x7f800000u);  // exponent 143 | 255 = 255
  return float_from_bits(sign | out);
}

inline float bfloat16_to_float(uint16_t h) {
  return float_from_bits(static_cast<uint32_t>(h) << 16);
}

// Round to nearest even; subnormals, overflow to inf, and nan handled.
inline uint16_t float_to_half(float f) {
  const uint32_t x = bits_of(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  const uint32_t exponent = magnitude >> 23;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (exponent >= 143) return static_cast<uint16_t>(sign | 0x7c00u);          // >= 2^16: inf
  if (exponent >= 113) {  // a normal half
    uint32_t h = ((exponent - 112) << 10) | ((magnitude >> 13) & 0x3ffu);
    const uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into inf is right
    return static_cast<uint16_t>(sign | h);
  }
  if (exponent < 102) return static_cast<uint16_t>(sign);  // below half the least subnormal
  // a subnormal half: significand * 2^(exponent - 150), counted in units of 2^-24
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24
  uint32_t h = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // nan
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace rgpt::mask_pool
