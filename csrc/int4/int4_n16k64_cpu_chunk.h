#pragma once
// Reading layout n16k64 on the CPU, shared by the GEMV (int4_n16k64_cpu.cpp) and the GEMM
// (int4_n16k64_gemm_cpu.cpp): sizes and offsets, a chunk's codes in k order, and (x86) the AVX2
// dequantization of one 16-byte chunk into (q − z) as fp32.
//
// The unit is a row pair (rows g and g+8 of a tile): the 64 bytes of lanes 4g..4g+3 of a step (one
// cache line) hold both rows' codes for the step's 64 inputs; lane 4g + t's 16 bytes hold inputs
// 8t..8t+7 of each 32-input half.
#include <algorithm>
#include <array>
#include <cstdint>

#include "int4/fp16_bits.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RGPT_N16K64_X86 1
#define RGPT_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace rgpt {
namespace n16k64_cpu {

// Sizes of the layout for an [n, k] weight grouped by g.
struct Shape {
  int64_t tiles, steps, groups, group_size, k;
  Shape(int64_t n, int64_t k_in, int64_t g)
      : tiles((n + 15) / 16), steps((k_in + 63) / 64), groups(k_in / g), group_size(g), k(k_in) {}
  // byte offset of lane 4g's chunk (the row pair's cache line) of `step` in tile `tile`
  int64_t chunk(int64_t tile, int64_t step, int g) const { return (tile * steps + step) * 512 + g * 64; }
  // index of (tile, group, row pair g) in scales/zeros: row g there, row g+8 one further
  int64_t meta(int64_t tile, int64_t group, int g) const { return (tile * groups + group) * 16 + 2 * g; }
};

// The codes of one 16-byte chunk (lane t of a row pair): code[r][i] is row g + 8r at input
// 32 (i / 8) + 8t + i % 8 of the step. Nibble p of word j holds row p & 1 at
// 32 (j >> 1) + 8t + 4 (j & 1) + [0, 2, 1, 3][p >> 1].
inline void unpack_chunk(const uint8_t* chunk, uint8_t (&code)[2][16]) {
  constexpr int kOffset[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    for (int b = 0; b < 4; ++b) {  // byte b of word j holds nibble positions 2b and 2b + 1
      const uint8_t byte = chunk[4 * j + b];
      const int i = 8 * (j >> 1) + 4 * (j & 1) + kOffset[b];
      code[0][i] = byte & 0xF;
      code[1][i] = byte >> 4;
    }
  }
}

#ifdef RGPT_N16K64_X86
// For each zero z = 0..16, the 16 fp16 values (q − z), split into low and high bytes for vpshufb.
struct ZeroTable {
  __m128i low, high;
};

RGPT_AVX2 inline const std::array<ZeroTable, 17>& zero_tables() {
  static const std::array<ZeroTable, 17> tables = [] {
    std::array<ZeroTable, 17> t{};
    for (int z = 0; z <= 16; ++z) {
      alignas(16) uint8_t low[16], high[16];
      for (int q = 0; q < 16; ++q) {
        const uint16_t h = float_to_half_bits(static_cast<float>(q - z));  // exact integers
        low[q] = static_cast<uint8_t>(h & 0xFF);
        high[q] = static_cast<uint8_t>(h >> 8);
      }
      t[z] = {_mm_load_si128(reinterpret_cast<const __m128i*>(low)),
              _mm_load_si128(reinterpret_cast<const __m128i*>(high))};
    }
    return t;
  }();
  return tables;
}

// The row pair's table: lane 0 row g (zero z0), lane 1 row g + 8 (zero z1).
struct PairTable {
  __m256i low, high;
};

RGPT_AVX2 inline PairTable pair_table(const std::array<ZeroTable, 17>& tables, uint8_t z0, uint8_t z1) {
  const ZeroTable& a = tables[std::min<int>(z0, 16)];
  const ZeroTable& b = tables[std::min<int>(z1, 16)];
  return {_mm256_set_m128i(b.low, a.low), _mm256_set_m128i(b.high, a.high)};
}

// One chunk -> (q − z) as fp32: w[0] row g inputs 8t..8t+7 of the first half, w[1] row g + 8 of
// the same inputs, w[2] and w[3] the same for the second half.
RGPT_AVX2 inline void dequant_chunk(const uint8_t* chunk, const PairTable& table, __m256 (&w)[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i row0 = _mm_and_si128(packed, nibble);                     // low nibbles: row g
  const __m128i row1 = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);  // high: row g + 8
  // byte 4j + b holds inputs 8 (j >> 1) + 4 (j & 1) + [0, 2, 1, 3][b] (of the lane's 16)
  const __m256i to_k = _mm256_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15,  //
                                        0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
  const __m256i codes = _mm256_shuffle_epi8(_mm256_set_m128i(row1, row0), to_k);
  const __m256i low = _mm256_shuffle_epi8(table.low, codes);
  const __m256i high = _mm256_shuffle_epi8(table.high, codes);
  const __m256i first = _mm256_unpacklo_epi8(low, high);   // fp16: lane 0 row g half 0, lane 1 row g+8
  const __m256i second = _mm256_unpackhi_epi8(low, high);  // half 1
  w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(first));
  w[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(first, 1));
  w[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(second));
  w[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(second, 1));
}
#endif

}  // namespace n16k64_cpu
}  // namespace rgpt
