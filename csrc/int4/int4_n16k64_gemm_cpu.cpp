// W4A16 GEMM on the CPU, INT4 layout n16k64 (int4_n16k64.h): out[M, N] = x[M, K] @ W^T + bias for
// the prefill's row counts (M from about 8 to a few hundred), float32 x/out/bias. The CPU twin of
// the CUDA GEMM (int4_n16k64_gemm_cuda.cu), with its arithmetic:
//
//   out[m, n] = Σ_groups s[n, γ] · (Σ_{k in γ} (q − z)[n, k] · x[m, k]) + bias[n]     fp32 sums
//
// The GEMV (int4_n16k64_cpu.cpp) dequantizes W again for every 4 rows of x; dequantize-then-BLAS
// (ops/int4.py cpu_gemm) writes all of W as fp32 to memory and reads it back. Here each tile of 16
// output rows is dequantized once per 256 inputs into a 16 KB panel of (q − z) that stays in L1,
// and an outer-product micro-kernel (BLIS style, x the packed operand) runs it against up to 64
// rows of x at a time:
//
//   for each chunk of 64 rows of x
//     for each block of kKc = 256 inputs
//       xp[256][64] = x[rows, inputs]^T            packed once per thread (rows past M are 0)
//       for each tile of the thread's range
//         panel[16][256] = q − z                   exact small integers in fp32 (AVX2: the GEMV's
//                                                  vpshufb table lookup, ~0.6 instructions a weight)
//         for each NB rows of the panel, each 8·MV rows of x          (MV·NB = 12 accumulators)
//           per group: acc[NB][8·MV] = Σ (q − z)·x    per input: MV loads of xp, NB broadcasts of
//                                                     the panel, MV·NB FMAs (FMA-bound)
//                      total += s · acc               (total in L1: 12 loads + stores a group)
//           out[m, n] (+)= total (+ bias on the first block)
//
// Summing each group apart before the scale keeps the fp32 error of the sums at or below that of
// a dense fp32 GEMM (one FMA chain of K products was up to 3.7× worse: tests/ops). The AVX2+FMA+
// F16C path runs where the CPU has it (any G, a multiple of 32); the portable one (the same loops
// in plain C++, which the compiler vectorizes: NEON on Jetson) elsewhere.
#include <algorithm>
#include <stdexcept>

#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "int4/int4_n16k64_cpu_chunk.h"
#include "int4/row_split.h"

namespace rgpt {
namespace {

using namespace n16k64_cpu;

constexpr int64_t kKc = 256;  // inputs per block: whole steps (a multiple of 64); panel 16 KB
constexpr int64_t kMc = 64;   // rows of x per chunk; packed block 64 KB
constexpr int kMV = 3;        // vectors of 8 rows of x per micro-kernel call (at most)
constexpr int kMaxSegments = kKc / 32 + 1;  // groups a block of inputs can touch (G >= 32)

// A tile's block of inputs: the codes as (q − z), and the groups it touches as segments.
struct Panel {
  alignas(64) float w[16][kKc];           // w[r][i] = (q − z)[16 tile + r, k0 + i]
  float scale[kMaxSegments][16];          // s[16 tile + r, segment's group]
  int64_t begin[kMaxSegments + 1] = {};   // segment i is inputs [begin[i], begin[i + 1]) of the block
  int segments = 0;
};

struct Packed {
  alignas(64) float x[kKc][kMc];  // x[i][j] = x[m0 + j, k0 + i], 0 for rows past M
};

// The micro-kernel's shape: MV vectors of 8 rows of x × NB rows of the panel, MV·NB + MV + 1 of
// AVX2's 16 registers; 12 accumulators keep both FMA units busy (latency 4). A tile's 16 rows are
// cut into NB-row blocks: MV = 3: 4, 4, 4, 4;  MV = 2: 6, 6, 4;  MV = 1: 12, 4.
struct Sums {
  alignas(32) float v[12][8 * kMV];  // v[n][j]: output n of the block, row j of x
};

// xp <- x rows [m0, m0 + rows) × inputs [k0, k0 + kc), transposed; the rest of each 8 rows zeroed
void pack(const N16K64Params& p, int64_t m0, int64_t rows, int64_t k0, int64_t kc, Packed& xp) {
  const auto* x = static_cast<const float*>(p.x);
  const int64_t padded = (rows + 7) / 8 * 8;
  for (int64_t i = 0; i < kc; ++i) {
    for (int64_t j = rows; j < padded; ++j) xp.x[i][j] = 0.0f;
  }
  for (int64_t j = 0; j < rows; ++j) {
    const float* row = x + (m0 + j) * p.k + k0;
    for (int64_t i = 0; i < kc; ++i) xp.x[i][j] = row[i];
  }
}

// --- the panel: rows of one tile, inputs [k0, k0 + kc) -------------------------------------------
void segment(const N16K64Params& p, const Shape& shape, int64_t tile, int64_t k0, int64_t kc, Panel& panel) {
  panel.segments = 0;
  for (int64_t k = k0; k < k0 + kc;) {
    const int64_t group = k / shape.group_size;
    for (int g = 0; g < 8; ++g) {
      const int64_t at = shape.meta(tile, group, g);
      panel.scale[panel.segments][g] = half_bits_to_float(p.scales[at]);
      panel.scale[panel.segments][g + 8] = half_bits_to_float(p.scales[at + 1]);
    }
    panel.begin[panel.segments++] = k - k0;
    k = std::min(k0 + kc, (group + 1) * shape.group_size);
  }
  panel.begin[panel.segments] = kc;
}

void fill_portable(const N16K64Params& p, const Shape& shape, int64_t tile, int64_t k0, int64_t kc,
                   Panel& panel) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.qweight);
  for (int64_t step = k0 / 64; step * 64 < k0 + kc; ++step) {
    for (int g = 0; g < 8; ++g) {
      for (int t = 0; t < 4; ++t) {
        uint8_t code[2][16];
        unpack_chunk(bytes + shape.chunk(tile, step, g) + 16 * t, code);
        for (int h = 0; h < 2; ++h) {
          const int64_t k = step * 64 + 32 * h + 8 * t;
          if (k >= p.k) break;  // the padding half of the last step (K % 64 == 32)
          for (int r = 0; r < 2; ++r) {
            const int zero = p.zeros[shape.meta(tile, k / shape.group_size, g) + r];
            float* dst = panel.w[g + 8 * r] + (k - k0);
            for (int i = 0; i < 8; ++i) dst[i] = static_cast<float>(code[r][8 * h + i] - zero);
          }
        }
      }
    }
  }
}

// --- micro-kernel: total[n][j] = Σ_segments s[n] · Σ_i w[n][i] · xp[i][j] ------------------------
// NB outputs (panel rows r0..) × 8·MV rows of x (xp columns j0..)
template <int MV, int NB>
void micro_portable(const float* xp, const Panel& panel, int r0, Sums& total) {
  for (int n = 0; n < NB; ++n) {
    for (int j = 0; j < 8 * MV; ++j) total.v[n][j] = 0.0f;
  }
  for (int seg = 0; seg < panel.segments; ++seg) {
    float acc[NB][8 * MV] = {};
    for (int64_t i = panel.begin[seg]; i < panel.begin[seg + 1]; ++i) {
      const float* xi = xp + i * kMc;
      for (int n = 0; n < NB; ++n) {
        const float b = panel.w[r0 + n][i];
        for (int j = 0; j < 8 * MV; ++j) acc[n][j] += b * xi[j];
      }
    }
    for (int n = 0; n < NB; ++n) {
      const float s = panel.scale[seg][r0 + n];
      for (int j = 0; j < 8 * MV; ++j) total.v[n][j] += s * acc[n][j];
    }
  }
}

#ifdef RGPT_N16K64_X86
RGPT_AVX2 void fill_avx2(const N16K64Params& p, const Shape& shape, int64_t tile, int64_t k0,
                         int64_t kc, Panel& panel) {
  const auto& tables = zero_tables();
  const auto* bytes = reinterpret_cast<const uint8_t*>(p.qweight);
  for (int64_t step = k0 / 64; step * 64 < k0 + kc; ++step) {
    const int64_t k = step * 64;
    // the groups of the step's two halves (the same one when G % 64 == 0)
    const int64_t group0 = k / shape.group_size;
    const int64_t group1 = std::min(shape.groups - 1, (k + 32) / shape.group_size);
    for (int g = 0; g < 8; ++g) {
      const int64_t at0 = shape.meta(tile, group0, g), at1 = shape.meta(tile, group1, g);
      const PairTable table0 = pair_table(tables, p.zeros[at0], p.zeros[at0 + 1]);
      const uint8_t* line = bytes + shape.chunk(tile, step, g);
      float* row0 = panel.w[g] + (k - k0);
      float* row1 = panel.w[g + 8] + (k - k0);
      for (int t = 0; t < 4; ++t) {
        __m256 w[4];
        dequant_chunk(line + 16 * t, table0, w);
        if (group1 != group0) {
          __m256 second[4];
          dequant_chunk(line + 16 * t, pair_table(tables, p.zeros[at1], p.zeros[at1 + 1]), second);
          w[2] = second[2], w[3] = second[3];
        }
        _mm256_store_ps(row0 + 8 * t, w[0]);
        _mm256_store_ps(row1 + 8 * t, w[1]);
        _mm256_store_ps(row0 + 32 + 8 * t, w[2]);  // past K (K % 64 == 32): written, never read
        _mm256_store_ps(row1 + 32 + 8 * t, w[3]);
      }
    }
  }
}

// (the loops over n and v are unrolled before registers are assigned: GCC otherwise keeps a copy
// of the accumulator array on the stack and stores it on every input)
template <int MV, int NB>
RGPT_AVX2 void micro_avx2(const float* xp, const Panel& panel, int r0, Sums& total) {
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n) {
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm256_store_ps(total.v[n] + 8 * v, _mm256_setzero_ps());
  }
  for (int seg = 0; seg < panel.segments; ++seg) {
    __m256 acc[NB][MV];
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n) {
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[n][v] = _mm256_setzero_ps();
    }
    for (int64_t i = panel.begin[seg]; i < panel.begin[seg + 1]; ++i) {
      __m256 xv[MV];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) xv[v] = _mm256_load_ps(xp + i * kMc + 8 * v);
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n) {
        const __m256 b = _mm256_broadcast_ss(&panel.w[r0 + n][i]);
#pragma GCC unroll 4
        for (int v = 0; v < MV; ++v) acc[n][v] = _mm256_fmadd_ps(b, xv[v], acc[n][v]);
      }
    }
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n) {
      const __m256 s = _mm256_broadcast_ss(&panel.scale[seg][r0 + n]);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) {
        float* t = total.v[n] + 8 * v;
        _mm256_store_ps(t, _mm256_fmadd_ps(s, acc[n][v], _mm256_load_ps(t)));
      }
    }
  }
}
#endif

template <int MV, int NB>
void micro(const float* xp, const Panel& panel, int r0, Sums& total, bool simd) {
#ifdef RGPT_N16K64_X86
  if (simd) {
    micro_avx2<MV, NB>(xp, panel, r0, total);
    return;
  }
#endif
  micro_portable<MV, NB>(xp, panel, r0, total);
}

// out[m0 + j, n0 + n] for j < rows, n < nb, n0 + n < N: = total + bias on the first block of
// inputs, += total after it
void store(const N16K64Params& p, int64_t m0, int64_t rows, int64_t n0, int nb, const Sums& total,
           bool first) {
  const auto* bias = static_cast<const float*>(p.bias);
  auto* out = static_cast<float*>(p.out);
  const int64_t columns = std::min<int64_t>(nb, p.n - n0);
  for (int64_t j = 0; j < rows; ++j) {
    float* dst = out + (m0 + j) * p.n + n0;
    for (int64_t n = 0; n < columns; ++n) {
      dst[n] = first ? total.v[n][j] + (bias ? bias[n0 + n] : 0.0f) : dst[n] + total.v[n][j];
    }
  }
}

// How many vectors of 8 rows the next micro-kernel call takes when `vectors` are left: 3, except
// that 4 go as 2 + 2 (not 3 + 1: one vector alone keeps fewer FMAs per load).
int64_t micro_vectors(int64_t vectors) {
  return vectors == 4 || vectors == 2 ? 2 : std::min<int64_t>(vectors, kMV);
}

// One tile × one block of inputs × rows [m0, m0 + rows) of x (rows <= kMc, packed in xp).
void tile_block(const N16K64Params& p, const Panel& panel, const Packed& xp, int64_t tile, int64_t k0,
                int64_t m0, int64_t rows, bool simd) {
  Sums total;
  int64_t j = 0;
  for (int64_t left = (rows + 7) / 8; left > 0;) {
    const int64_t mv = micro_vectors(left);
    const float* x = &xp.x[0][j];
    const int64_t count = std::min<int64_t>(8 * mv, rows - j);
    auto run = [&](auto kernel, int r0, int nb) {  // panel rows [r0, r0 + nb), if any is below N
      if (tile * 16 + r0 >= p.n) return;
      kernel(x, panel, r0, total, simd);
      store(p, m0 + j, count, tile * 16 + r0, nb, total, k0 == 0);
    };
    if (mv == 3) {
      for (int r0 = 0; r0 < 16; r0 += 4) run(micro<3, 4>, r0, 4);
    } else if (mv == 2) {
      run(micro<2, 6>, 0, 6), run(micro<2, 6>, 6, 6), run(micro<2, 4>, 12, 4);
    } else {
      run(micro<1, 12>, 0, 12), run(micro<1, 4>, 12, 4);
    }
    j += 8 * mv;
    left -= mv;
  }
}

void tiles_gemm(const N16K64Params& p, const Shape& shape, int64_t tile_begin, int64_t tile_end, bool simd) {
  Panel panel;
  Packed xp;
  for (int64_t m0 = 0; m0 < p.m; m0 += kMc) {
    const int64_t rows = std::min(kMc, p.m - m0);
    for (int64_t k0 = 0; k0 < p.k; k0 += kKc) {
      const int64_t kc = std::min(kKc, p.k - k0);  // a multiple of 32 (G is)
      pack(p, m0, rows, k0, kc, xp);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        segment(p, shape, tile, k0, kc, panel);
#ifdef RGPT_N16K64_X86
        simd ? fill_avx2(p, shape, tile, k0, kc, panel) : fill_portable(p, shape, tile, k0, kc, panel);
#else
        fill_portable(p, shape, tile, k0, kc, panel);
#endif
        tile_block(p, panel, xp, tile, k0, m0, rows, simd);
      }
    }
  }
}

}  // namespace

void int4_gemm_n16k64_cpu(const N16K64Params& p, int num_threads, bool use_simd) {
  check_n16k64_params(p);
  if (p.dtype != kInt4F32) {
    throw std::invalid_argument("int4_gemm_n16k64_cpu: x, bias and out must be float32 (dtype tag 0)");
  }
  if (p.m == 0) return;
  const Shape shape(p.n, p.k, p.group_size);
  const bool simd = use_simd && int4_cpu_has_simd();
  const int64_t work = p.m * p.n * p.k;  // tiny problems stay on the calling thread
  split_rows(shape.tiles, 1, work < (int64_t{1} << 20) ? 1 : num_threads,
             [&](int64_t begin, int64_t end) { tiles_gemm(p, shape, begin, end, simd); });
}

void int4_gemm_n16k64_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                                int64_t group_size, int num_threads, bool use_simd) {
  const N16K64Params p =
      linear_params<N16K64Params>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, kInt4F32);
  int4_gemm_n16k64_cpu(p, num_threads, use_simd);
}

}  // namespace rgpt
