#pragma once
// IEEE binary16 <-> float32 on bit patterns, for CPUs without F16C (and for the tables the F16C
// paths build): exact in the float direction, round to nearest even in the half direction.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rgpt {

// float -> binary16 bits, round to nearest even (overflow to inf, nan kept nan).
inline uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7C00u | (magnitude > 0x7F800000u ? 0x200u : 0u));
  }
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half (units of 2^-24) or zero
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof absolute);
    // |value| * 2^24 < 1024 is exact; nearbyint rounds half to even in the default mode
    const auto units = static_cast<uint32_t>(std::nearbyint(absolute * 16777216.0f));
    return static_cast<uint16_t>(sign | units);  // 1024 units is the smallest normal: still right
  }
  const uint32_t exponent = (magnitude >> 23) - 127 + 15;
  const uint32_t mantissa = magnitude & 0x7FFFFFu;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;  // a carry moves the exponent
  return static_cast<uint16_t>(sign | half);
}

inline float half_bits_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1Fu;
  const uint32_t mantissa = half & 0x3FFu;
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // × 2^-24, exact
    return sign ? -value : value;
  }
  uint32_t bits;
  if (exponent == 31) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace rgpt
