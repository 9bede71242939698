// W4A16 linear on the CPU, INT4 layout n16k64 (int4_n16k64.h): out[M, N] = x[M, K] @ W^T + bias,
// float32 x/out/bias, W[n, k] = (q − z)·s exactly.
//
// The unit of work is a row pair (rows g and g+8 of a tile): the 64 bytes of lanes 4g..4g+3 of a
// step (one cache line) hold both rows' codes for the step's 64 inputs. Threads take contiguous
// ranges of tiles.
//   AVX2 path (G % 64 == 0)  a step lies in one group. 16 bytes of codes are split into the two
//     rows' nibbles, put in k order by one vpshufb, and looked up in a table of the 16 values
//     (q − z) as fp16 (exact integers; one table per zero, built once), widened by F16C: 32 codes
//     in ~16 instructions. Products with x sum in fp32 per group and are scaled by the group's
//     scale at the group's end (the CUDA kernel's arithmetic); a one-hot x reads (q − z)·s back
//     exactly.
//   portable (other CPUs, and G % 64 != 0)  a table of the 16 exact weights (q − z)·s in fp32 per
//     row and group; codes are looked up one by one.
#include <algorithm>
#include <stdexcept>

#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "int4/int4_n16k64_cpu_chunk.h"
#include "int4/row_split.h"

namespace rgpt {
namespace {

using namespace n16k64_cpu;  // Shape, unpack_chunk, and the AVX2 chunk dequantization

constexpr int kM = 4;  // rows of x per pass over the weight

// --- portable path ----------------------------------------------------------------------------------
// Row r (0: g, 1: g + 8) of input i (0..7) of a half step sits in word 2h + (i >> 2) of the lane's
// chunk, at nibble position kPosition[r][i & 3].
constexpr int kPosition[2][4] = {{0, 4, 2, 6}, {1, 5, 3, 7}};

template <int MB>
void pair_portable(const N16K64Params& p, const Shape& shape, int64_t tile, int g, int64_t m0) {
  const auto* x = static_cast<const float*>(p.x) + m0 * p.k;
  float acc[MB][2][8] = {};
  float table[2][16];
  int64_t table_group = -1;
  for (int64_t step = 0; step < shape.steps; ++step) {
    for (int t = 0; t < 4; ++t) {
      const uint32_t* words = p.qweight + (shape.chunk(tile, step, g) + 16 * t) / 4;
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = step * 64 + 32 * h + 8 * t;
        if (k0 >= p.k) break;  // the padding half of the last step (K % 64 == 32)
        const int64_t group = k0 / shape.group_size;
        if (group != table_group) {  // the 16 exact weights of each row for this group
          for (int r = 0; r < 2; ++r) {
            const int64_t at = shape.meta(tile, group, g) + r;
            const float scale = half_bits_to_float(p.scales[at]);
            for (int q = 0; q < 16; ++q) table[r][q] = static_cast<float>(q - p.zeros[at]) * scale;
          }
          table_group = group;
        }
        float w[2][8];
        for (int r = 0; r < 2; ++r) {
          for (int i = 0; i < 8; ++i) w[r][i] = table[r][(words[2 * h + (i >> 2)] >> (4 * kPosition[r][i & 3])) & 0xFu];
        }
        for (int mi = 0; mi < MB; ++mi) {
          const float* xr = x + mi * p.k + k0;
          for (int i = 0; i < 8; ++i) {
            acc[mi][0][i] += xr[i] * w[0][i];
            acc[mi][1][i] += xr[i] * w[1][i];
          }
        }
      }
    }
  }
  const auto* bias = static_cast<const float*>(p.bias);
  auto* out = static_cast<float*>(p.out);
  for (int r = 0; r < 2; ++r) {
    const int64_t n = tile * 16 + g + 8 * r;
    if (n >= p.n) continue;
    for (int mi = 0; mi < MB; ++mi) {
      const float* a = acc[mi][r];
      const float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      out[(m0 + mi) * p.n + n] = sum + (bias ? bias[n] : 0.0f);
    }
  }
}

void dequant_portable(const N16K64Params& p, const Shape& shape, int64_t row_begin, int64_t row_end,
                      float* out) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.qweight);
  for (int64_t tile = row_begin / 16; tile * 16 < row_end; ++tile) {
    for (int g = 0; g < 8; ++g) {
      const int64_t rows[2] = {tile * 16 + g, tile * 16 + g + 8};
      if ((rows[0] < row_begin || rows[0] >= row_end) && (rows[1] < row_begin || rows[1] >= row_end)) continue;
      for (int64_t step = 0; step < shape.steps; ++step) {
        for (int t = 0; t < 4; ++t) {
          uint8_t code[2][16];
          unpack_chunk(bytes + shape.chunk(tile, step, g) + 16 * t, code);
          for (int h = 0; h < 2; ++h) {
            const int64_t k0 = step * 64 + 32 * h + 8 * t;
            if (k0 >= p.k) break;
            for (int r = 0; r < 2; ++r) {
              if (rows[r] < row_begin || rows[r] >= row_end) continue;
              const int64_t at = shape.meta(tile, k0 / shape.group_size, g) + r;
              const float scale = half_bits_to_float(p.scales[at]);
              float* dst = out + (rows[r] - row_begin) * p.k + k0;
              for (int i = 0; i < 8; ++i) dst[i] = static_cast<float>(code[r][8 * h + i] - p.zeros[at]) * scale;
            }
          }
        }
      }
    }
  }
}

#ifdef RGPT_N16K64_X86
// --- AVX2 + FMA + F16C path (G % 64 == 0) -----------------------------------------------------------
RGPT_AVX2 inline float sum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

template <int MB>
RGPT_AVX2 void pair_avx2(const N16K64Params& p, const Shape& shape, int64_t tile, int g, int64_t m0) {
  // independent partial sums per (row of x, output row): enough FMA chains in flight
  constexpr int kPartial = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  const auto& tables = zero_tables();
  const auto* x = static_cast<const float*>(p.x) + m0 * p.k;
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.qweight);
  const int64_t steps_per_group = shape.group_size / 64;
  __m256 total[MB][2];  // Σ over groups of scale × group sum
  for (int mi = 0; mi < MB; ++mi) total[mi][0] = total[mi][1] = _mm256_setzero_ps();
  for (int64_t group = 0; group < shape.groups; ++group) {
    const int64_t at = shape.meta(tile, group, g);
    const PairTable table = pair_table(tables, p.zeros[at], p.zeros[at + 1]);
    __m256 acc[MB][2][kPartial];
    for (int mi = 0; mi < MB; ++mi) {
      for (int r = 0; r < 2; ++r) {
        for (int a = 0; a < kPartial; ++a) acc[mi][r][a] = _mm256_setzero_ps();
      }
    }
    for (int64_t step = group * steps_per_group; step < (group + 1) * steps_per_group; ++step) {
      const uint8_t* line = bytes + shape.chunk(tile, step, g);
      for (int t = 0; t < 4; ++t) {
        __m256 w[4];
        dequant_chunk(line + 16 * t, table, w);
        for (int mi = 0; mi < MB; ++mi) {
          const float* xr = x + mi * p.k + step * 64 + 8 * t;
          const __m256 first = _mm256_loadu_ps(xr), second = _mm256_loadu_ps(xr + 32);
          __m256* a0 = acc[mi][0];
          __m256* a1 = acc[mi][1];
          a0[t % kPartial] = _mm256_fmadd_ps(first, w[0], a0[t % kPartial]);
          a1[t % kPartial] = _mm256_fmadd_ps(first, w[1], a1[t % kPartial]);
          a0[(t + 1) % kPartial] = _mm256_fmadd_ps(second, w[2], a0[(t + 1) % kPartial]);
          a1[(t + 1) % kPartial] = _mm256_fmadd_ps(second, w[3], a1[(t + 1) % kPartial]);
        }
      }
    }
    const __m256 scale0 = _mm256_set1_ps(_cvtsh_ss(p.scales[at]));
    const __m256 scale1 = _mm256_set1_ps(_cvtsh_ss(p.scales[at + 1]));
    for (int mi = 0; mi < MB; ++mi) {
      __m256 sum0 = acc[mi][0][0], sum1 = acc[mi][1][0];
      for (int a = 1; a < kPartial; ++a) {
        sum0 = _mm256_add_ps(sum0, acc[mi][0][a]);
        sum1 = _mm256_add_ps(sum1, acc[mi][1][a]);
      }
      total[mi][0] = _mm256_fmadd_ps(sum0, scale0, total[mi][0]);
      total[mi][1] = _mm256_fmadd_ps(sum1, scale1, total[mi][1]);
    }
  }
  const auto* bias = static_cast<const float*>(p.bias);
  auto* out = static_cast<float*>(p.out);
  for (int r = 0; r < 2; ++r) {
    const int64_t n = tile * 16 + g + 8 * r;
    if (n >= p.n) continue;
    for (int mi = 0; mi < MB; ++mi) out[(m0 + mi) * p.n + n] = sum8(total[mi][r]) + (bias ? bias[n] : 0.0f);
  }
}

RGPT_AVX2 void dequant_avx2(const N16K64Params& p, const Shape& shape, int64_t row_begin,
                            int64_t row_end, float* out) {
  const auto& tables = zero_tables();
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.qweight);
  const int64_t steps_per_group = shape.group_size / 64;
  for (int64_t tile = row_begin / 16; tile * 16 < row_end; ++tile) {
    for (int g = 0; g < 8; ++g) {
      const int64_t rows[2] = {tile * 16 + g, tile * 16 + g + 8};
      const bool keep[2] = {rows[0] >= row_begin && rows[0] < row_end, rows[1] >= row_begin && rows[1] < row_end};
      if (!keep[0] && !keep[1]) continue;
      for (int64_t group = 0; group < shape.groups; ++group) {
        const int64_t at = shape.meta(tile, group, g);
        const PairTable table = pair_table(tables, p.zeros[at], p.zeros[at + 1]);
        const __m256 scale[2] = {_mm256_set1_ps(_cvtsh_ss(p.scales[at])),
                                 _mm256_set1_ps(_cvtsh_ss(p.scales[at + 1]))};
        for (int64_t step = group * steps_per_group; step < (group + 1) * steps_per_group; ++step) {
          for (int t = 0; t < 4; ++t) {
            __m256 w[4];
            dequant_chunk(bytes + shape.chunk(tile, step, g) + 16 * t, table, w);
            for (int r = 0; r < 2; ++r) {
              if (!keep[r]) continue;
              float* dst = out + (rows[r] - row_begin) * p.k + step * 64 + 8 * t;
              _mm256_storeu_ps(dst, _mm256_mul_ps(w[r], scale[r]));  // exact
              _mm256_storeu_ps(dst + 32, _mm256_mul_ps(w[2 + r], scale[r]));
            }
          }
        }
      }
    }
  }
}
#endif

template <int MB>
void pair_block(const N16K64Params& p, const Shape& shape, int64_t tile, int g, int64_t m0, bool simd) {
#ifdef RGPT_N16K64_X86
  if (simd) {
    pair_avx2<MB>(p, shape, tile, g, m0);
    return;
  }
#endif
  pair_portable<MB>(p, shape, tile, g, m0);
}

void tiles_linear(const N16K64Params& p, const Shape& shape, int64_t tile_begin, int64_t tile_end, bool simd) {
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    for (int g = 0; g < 8 && tile * 16 + g < p.n; ++g) {
      for (int64_t m0 = 0; m0 < p.m; m0 += kM) {
        switch (std::min<int64_t>(kM, p.m - m0)) {
          case 1: pair_block<1>(p, shape, tile, g, m0, simd); break;
          case 2: pair_block<2>(p, shape, tile, g, m0, simd); break;
          case 3: pair_block<3>(p, shape, tile, g, m0, simd); break;
          default: pair_block<4>(p, shape, tile, g, m0, simd); break;
        }
      }
    }
  }
}

}  // namespace

void int4_linear_n16k64_cpu(const N16K64Params& p, int num_threads, bool use_simd) {
  check_n16k64_params(p);
  if (p.dtype != kInt4F32) {
    throw std::invalid_argument("int4_linear_n16k64_cpu: x, bias and out must be float32 (dtype tag 0)");
  }
  if (p.m == 0) return;
  const Shape shape(p.n, p.k, p.group_size);
  const bool simd = use_simd && int4_cpu_has_simd() && p.group_size % 64 == 0;
  // tiny problems stay on the calling thread
  const int64_t work = p.m * p.n * p.k;
  split_rows(shape.tiles, 1, work < (int64_t{1} << 18) ? 1 : num_threads,
             [&](int64_t begin, int64_t end) { tiles_linear(p, shape, begin, end, simd); });
}

void int4_dequant_n16k64_cpu(const N16K64Params& p, int64_t row_begin, int64_t row_end, float* out,
                             int num_threads, bool use_simd) {
  N16K64Params check = p;
  check.m = 0;
  check_n16k64_params(check);
  if (row_begin < 0 || row_end > p.n || row_begin > row_end) {
    throw std::invalid_argument("int4_dequant_n16k64_cpu: rows must satisfy 0 <= begin <= end <= N");
  }
  if (row_begin == row_end) return;
  if (out == nullptr) throw std::invalid_argument("int4_dequant_n16k64_cpu: out is null");
  const Shape shape(p.n, p.k, p.group_size);
  [[maybe_unused]] const bool simd = use_simd && int4_cpu_has_simd() && p.group_size % 64 == 0;
  const int64_t rows = row_end - row_begin;
  // threads take ranges of 16 rows (aligned to the tiles, so no two write one tile's rows)
  const int64_t first_tile = row_begin / 16, tiles = (row_end + 15) / 16 - first_tile;
  auto run = [&](int64_t begin, int64_t end) {
    const int64_t r0 = std::max(row_begin, (first_tile + begin) * 16);
    const int64_t r1 = std::min(row_end, (first_tile + end) * 16);
    if (r0 >= r1) return;
    float* dst = out + (r0 - row_begin) * p.k;
#ifdef RGPT_N16K64_X86
    if (simd) {
      dequant_avx2(p, shape, r0, r1, dst);
      return;
    }
#endif
    dequant_portable(p, shape, r0, r1, dst);
  };
  split_rows(tiles, 1, rows * p.k < (int64_t{1} << 20) ? 1 : num_threads, run);
}

void int4_linear_n16k64_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                  uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                                  int64_t group_size, int num_threads, bool use_simd) {
  const N16K64Params p =
      linear_params<N16K64Params>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, kInt4F32);
  int4_linear_n16k64_cpu(p, num_threads, use_simd);
}

void int4_dequant_n16k64_cpu_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                   uintptr_t out, int64_t n, int64_t k, int64_t group_size,
                                   int64_t row_begin, int64_t row_end, int num_threads,
                                   bool use_simd) {
  const auto p = weight_params<N16K64Params>(qweight, scales, zeros, n, k, group_size, kInt4F32);
  int4_dequant_n16k64_cpu(p, row_begin, row_end, reinterpret_cast<float*>(out), num_threads, use_simd);
}

}  // namespace rgpt
