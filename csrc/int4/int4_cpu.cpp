// W4A16 linear on the CPU: out[M, N] = x[M, K] @ W^T + bias, float32 x/out/bias, W in layout nk8i.
//
// Blocked: a block is kN output rows × kM rows of x; its weights are dequantized once in
// registers and feed kM FMAs each. Threads take contiguous ranges of output rows (the weight is
// read once in total, each thread its share). Dequantization gives the exact fp16 value
// fp16((q - z) * s), from a table of the 16 values of each (row, group):
//   AVX2 path  the table is computed in fp32 (exact: a 5-bit integer times an fp16) and rounded
//              by F16C; 32 codes (16 bytes) at a time are looked up with vpshufb (low and high
//              bytes of the fp16 values) and widened to fp32 with F16C;
//   portable   the table is rounded by float_to_half_bits; codes are looked up one by one.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "int4/fp16_bits.h"
#include "int4/int4.h"
#include "int4/row_split.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RGPT_INT4_X86 1
#define RGPT_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace rgpt {

void check_int4_params(const Int4LinearParams& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("int4_linear: " + what); };
  if (p.m < 0 || p.n <= 0 || p.k <= 0) fail("sizes must be M >= 0, N > 0, K > 0");
  if (p.group_size <= 0 || p.group_size % 32 != 0) fail("group_size must be a positive multiple of 32");
  if (p.k % p.group_size != 0) fail("K must be a multiple of group_size");
  if (p.qweight == nullptr || p.scales == nullptr || p.zeros == nullptr) fail("a weight pointer is null");
  if (p.m > 0 && (p.x == nullptr || p.out == nullptr)) fail("x or out is null");
  if (p.dtype < kInt4F32 || p.dtype > kInt4BF16) fail("unknown dtype tag");
}

namespace {

constexpr int kM = 4;  // rows of x per block
constexpr int kN = 2;  // output rows per block
// lane i of a word (k offset i) sits at nibble position [0,4,1,5,2,6,3,7][i]: shift by 4× that
constexpr int kShift[8] = {0, 16, 4, 20, 8, 24, 12, 28};

// --- portable path: one output row at a time, kM rows of x ------------------------------------
template <int MB>
void block_portable(const Int4LinearParams& p, int64_t n, int64_t m0) {
  const auto* x = static_cast<const float*>(p.x);
  const int64_t words = p.k / 8, groups = p.k / p.group_size, words_per_group = p.group_size / 8;
  const uint32_t* row = p.qweight + n * words;
  float acc[MB][8] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = half_bits_to_float(p.scales[n * groups + g]);
    const int zero = p.zeros[n * groups + g];
    float table[16];
    for (int q = 0; q < 16; ++q) {
      table[q] = half_bits_to_float(float_to_half_bits(static_cast<float>(q - zero) * scale));
    }
    for (int64_t j = g * words_per_group; j < (g + 1) * words_per_group; ++j) {
      const uint32_t word = row[j];
      float w[8];
      for (int i = 0; i < 8; ++i) w[i] = table[(word >> kShift[i]) & 0xFu];
      for (int mi = 0; mi < MB; ++mi) {
        const float* xr = x + (m0 + mi) * p.k + j * 8;
        for (int i = 0; i < 8; ++i) acc[mi][i] += xr[i] * w[i];
      }
    }
  }
  const auto* bias = static_cast<const float*>(p.bias);
  auto* out = static_cast<float*>(p.out);
  for (int mi = 0; mi < MB; ++mi) {
    const float* a = acc[mi];
    const float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    out[(m0 + mi) * p.n + n] = sum + (bias ? bias[n] : 0.0f);
  }
}

void rows_portable(const Int4LinearParams& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m0 = 0; m0 < p.m; m0 += kM) {
      switch (std::min<int64_t>(kM, p.m - m0)) {
        case 1: block_portable<1>(p, n, m0); break;
        case 2: block_portable<2>(p, n, m0); break;
        case 3: block_portable<3>(p, n, m0); break;
        default: block_portable<4>(p, n, m0); break;
      }
    }
  }
}

// Dequantize output rows [n_begin, n_end) of W into out [N, K] float32 (the exact fp16 values).
void dequant_rows_portable(const Int4DequantParams& p, int64_t n_begin, int64_t n_end) {
  const int64_t words = p.k / 8, groups = p.k / p.group_size, words_per_group = p.group_size / 8;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint32_t* row = p.qweight + n * words;
    float* dst = p.out + n * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = half_bits_to_float(p.scales[n * groups + g]);
      const int zero = p.zeros[n * groups + g];
      float table[16];
      for (int q = 0; q < 16; ++q) {
        table[q] = half_bits_to_float(float_to_half_bits(static_cast<float>(q - zero) * scale));
      }
      for (int64_t j = g * words_per_group; j < (g + 1) * words_per_group; ++j) {
        for (int i = 0; i < 8; ++i) dst[j * 8 + i] = table[(row[j] >> kShift[i]) & 0xFu];
      }
    }
  }
}

#ifdef RGPT_INT4_X86
// --- AVX2 + FMA + F16C path ---------------------------------------------------------------------
// Per (row, group): the 16 exact values fp16((q - z) * s), q = 0..15, computed in fp32 (exact)
// and rounded by F16C (nearest even), split into a low-byte and a high-byte table for vpshufb.
struct GroupTable {
  __m256i low, high;  // byte q of each 128-bit lane: low / high byte of value q
};

RGPT_AVX2 inline GroupTable group_table(uint16_t scale_bits, int zero) {
  const __m256 scale = _mm256_set1_ps(_cvtsh_ss(scale_bits));
  const __m256 z = _mm256_set1_ps(static_cast<float>(zero));
  const __m256 q0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 q1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m128i h0 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_sub_ps(q0, z), scale), kNearest);
  const __m128i h1 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_sub_ps(q1, z), scale), kNearest);
  const __m128i byte = _mm_set1_epi16(0x00FF);
  const __m128i low = _mm_packus_epi16(_mm_and_si128(h0, byte), _mm_and_si128(h1, byte));
  const __m128i high = _mm_packus_epi16(_mm_srli_epi16(h0, 8), _mm_srli_epi16(h1, 8));
  return {_mm256_broadcastsi128_si256(low), _mm256_broadcastsi128_si256(high)};
}

// 32 codes (4 words, k = 0..31 of a chunk) -> w[i] = the 8 weights of k = 8i..8i+7, as fp32.
RGPT_AVX2 inline void dequant32(const uint32_t* words, const GroupTable& table, __m256 (&w)[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i even = _mm_and_si128(packed, nibble);                     // positions 0,2,4,6
  const __m128i odd = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);  // positions 1,3,5,7
  // byte b of a word holds positions 2b and 2b + 1: interleaving gives each word's positions 0..7
  const __m128i words01 = _mm_unpacklo_epi8(even, odd);
  const __m128i words23 = _mm_unpackhi_epi8(even, odd);
  // positions -> k order: k offset i sits at position [0,4,1,5,2,6,3,7][i]
  const __m256i to_k = _mm256_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,  //
                                        0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  const __m256i codes = _mm256_shuffle_epi8(_mm256_set_m128i(words23, words01), to_k);
  // lane 0 holds k 0..15, lane 1 k 16..31; look the fp16 values up byte by byte
  const __m256i low = _mm256_shuffle_epi8(table.low, codes);
  const __m256i high = _mm256_shuffle_epi8(table.high, codes);
  const __m256i first = _mm256_unpacklo_epi8(low, high);   // fp16: lane 0 k 0..7, lane 1 k 16..23
  const __m256i second = _mm256_unpackhi_epi8(low, high);  // lane 0 k 8..15, lane 1 k 24..31
  w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(first));
  w[1] = _mm256_cvtph_ps(_mm256_castsi256_si128(second));
  w[2] = _mm256_cvtph_ps(_mm256_extracti128_si256(first, 1));
  w[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(second, 1));
}

RGPT_AVX2 inline float sum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

RGPT_AVX2 void dequant_rows_avx2(const Int4DequantParams& p, int64_t n_begin, int64_t n_end) {
  const int64_t words = p.k / 8, groups = p.k / p.group_size, chunks_per_group = p.group_size / 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    float* dst = p.out + n * p.k;
    for (int64_t g = 0; g < groups; ++g) {
      const GroupTable table = group_table(p.scales[n * groups + g], p.zeros[n * groups + g]);
      for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
        __m256 w[4];
        dequant32(p.qweight + n * words + c * 4, table, w);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + c * 32 + 8 * i, w[i]);
      }
    }
  }
}

template <int MB, int NB>
RGPT_AVX2 void block_avx2(const Int4LinearParams& p, int64_t n0, int64_t m0) {
  // independent partial sums per (row of x, output row): enough FMA chains in flight
  constexpr int kPartial = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const auto* x = static_cast<const float*>(p.x);
  const int64_t words = p.k / 8, groups = p.k / p.group_size, chunks_per_group = p.group_size / 32;
  __m256 acc[MB][NB][kPartial];
  for (int mi = 0; mi < MB; ++mi) {
    for (int r = 0; r < NB; ++r) {
      for (int a = 0; a < kPartial; ++a) acc[mi][r][a] = _mm256_setzero_ps();
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    GroupTable table[NB];
    for (int r = 0; r < NB; ++r) {
      table[r] = group_table(p.scales[(n0 + r) * groups + g], p.zeros[(n0 + r) * groups + g]);
    }
    for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
      for (int r = 0; r < NB; ++r) {
        __m256 w[4];
        dequant32(p.qweight + (n0 + r) * words + c * 4, table[r], w);
        for (int mi = 0; mi < MB; ++mi) {
          const float* xr = x + (m0 + mi) * p.k + c * 32;
          for (int i = 0; i < 4; ++i) {
            __m256& sum = acc[mi][r][i % kPartial];
            sum = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * i), w[i], sum);
          }
        }
      }
    }
  }
  const auto* bias = static_cast<const float*>(p.bias);
  auto* out = static_cast<float*>(p.out);
  for (int mi = 0; mi < MB; ++mi) {
    for (int r = 0; r < NB; ++r) {
      __m256 total = acc[mi][r][0];
      for (int a = 1; a < kPartial; ++a) total = _mm256_add_ps(total, acc[mi][r][a]);
      out[(m0 + mi) * p.n + n0 + r] = sum8(total) + (bias ? bias[n0 + r] : 0.0f);
    }
  }
}

template <int NB>
RGPT_AVX2 void rows_avx2_nb(const Int4LinearParams& p, int64_t n0) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kM) {
    switch (std::min<int64_t>(kM, p.m - m0)) {
      case 1: block_avx2<1, NB>(p, n0, m0); break;
      case 2: block_avx2<2, NB>(p, n0, m0); break;
      case 3: block_avx2<3, NB>(p, n0, m0); break;
      default: block_avx2<4, NB>(p, n0, m0); break;
    }
  }
}

RGPT_AVX2 void rows_avx2(const Int4LinearParams& p, int64_t n_begin, int64_t n_end) {
  int64_t n0 = n_begin;
  for (; n0 + kN <= n_end; n0 += kN) rows_avx2_nb<kN>(p, n0);
  for (; n0 < n_end; ++n0) rows_avx2_nb<1>(p, n0);
}
#endif

}  // namespace

bool int4_cpu_has_simd() {
#ifdef RGPT_INT4_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

void int4_linear_cpu(const Int4LinearParams& p, int num_threads, bool use_simd) {
  check_int4_params(p);
  if (p.dtype != kInt4F32) {
    throw std::invalid_argument("int4_linear_cpu: x, bias and out must be float32 (dtype tag 0)");
  }
  if (p.m == 0) return;
  const bool simd = use_simd && int4_cpu_has_simd();
  auto rows = [&p, simd](int64_t n_begin, int64_t n_end) {
#ifdef RGPT_INT4_X86
    if (simd) {
      rows_avx2(p, n_begin, n_end);
      return;
    }
#endif
    rows_portable(p, n_begin, n_end);
  };
  // threads take contiguous ranges of kN-row blocks; tiny problems stay on the calling thread
  const int64_t work = p.m * p.n * p.k;
  split_rows(p.n, kN, work < (int64_t{1} << 18) ? 1 : num_threads, rows);
}

void int4_dequant_cpu(const Int4DequantParams& p, int num_threads, bool use_simd) {
  Int4LinearParams check;
  check.qweight = p.qweight;
  check.scales = p.scales;
  check.zeros = p.zeros;
  check.n = p.n;
  check.k = p.k;
  check.group_size = p.group_size;
  check_int4_params(check);
  if (p.out == nullptr) throw std::invalid_argument("int4_dequant_cpu: out is null");
  const bool simd = use_simd && int4_cpu_has_simd();
  auto rows = [&p, simd](int64_t n_begin, int64_t n_end) {
#ifdef RGPT_INT4_X86
    if (simd) {
      dequant_rows_avx2(p, n_begin, n_end);
      return;
    }
#endif
    dequant_rows_portable(p, n_begin, n_end);
  };
  split_rows(p.n, 1, p.n * p.k < (int64_t{1} << 20) ? 1 : num_threads, rows);
}

void int4_dequant_cpu_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out,
                            int64_t n, int64_t k, int64_t group_size, int num_threads,
                            bool use_simd) {
  Int4DequantParams p;
  p.qweight = reinterpret_cast<const uint32_t*>(qweight);
  p.scales = reinterpret_cast<const uint16_t*>(scales);
  p.zeros = reinterpret_cast<const uint8_t*>(zeros);
  p.out = reinterpret_cast<float*>(out);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  int4_dequant_cpu(p, num_threads, use_simd);
}

void int4_linear_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                           uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                           int64_t group_size, int num_threads, bool use_simd) {
  const Int4LinearParams p =
      linear_params<Int4LinearParams>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, kInt4F32);
  int4_linear_cpu(p, num_threads, use_simd);
}

}  // namespace rgpt
