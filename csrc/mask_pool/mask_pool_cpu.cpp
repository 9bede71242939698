// Mask pooling on the CPU (how it works: README.md in this folder).
//
// 0. Masks are sorted by image (counting sort) and cut into groups of at most kGroup masks of
//    one image. Each group owns a weight table [cell][slot] (slots rounded up to 4).
// 1. Weights, tasks over (mask, band of cell rows), separably. For cell row i, first down
//    the mask rows it touches, u[q] = sum_p ry(i, p) * m[p, q] (long contiguous loops over
//    each mask row), then across, w[i, j] = sum_q cx(j, q) * u[q] (a span of u per cell).
//    Binary masks count the rows wholly inside the cell row with byte counters, so their
//    weights are exact integers (units of 1/(H*W) pixel) until stored as fp32; float masks
//    accumulate u in fp32. A record per (mask, cell row) keeps the row's weight total.
// 2. Cell lists, tasks over groups: the cells any mask of the group weights.
// 3. Sums, tasks over (group, block of kBlock channels): the listed cells, kPanel at a time,
//    are gathered into fp32 panels (features converted once, weights copied) and accumulated
//    by a register tile of 4 masks x 16 channels.
// Each task writes its own outputs in a fixed order: the result does not depend on the
// number of threads.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "mask_pool/half.h"
#include "mask_pool/mask_pool.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RGPT_X86 1
#endif

namespace rgpt::mask_pool {
namespace {

constexpr int kGroup = 16;  // masks pooled together in one pass over the features
constexpr int kBlock = 128;  // channels per phase-2 task
constexpr int kPanel = 32;  // cells gathered per fp32 panel (16 KB: stays in L1)
constexpr int kPrefetch = 24;  // cells ahead whose features are prefetched
// A phase runs on one more thread per this many bytes it touches: starting and joining a
// thread costs tens of microseconds (milliseconds on a busy machine), small inputs less.
constexpr int64_t kBytesPerThread = int64_t{1} << 20;

// ---- element access ------------------------------------------------------------------------
template <Scalar S>
struct Element;
template <>
struct Element<Scalar::kFloat32> {
  using Storage = float;
  static float load(Storage x) { return x; }
  static Storage store(float v) { return v; }
};
template <>
struct Element<Scalar::kFloat16> {
  using Storage = uint16_t;
  static float load(Storage x) { return half_to_float(x); }
  static Storage store(float v) { return float_to_half(v); }
};
template <>
struct Element<Scalar::kBFloat16> {
  using Storage = uint16_t;
  static float load(Storage x) { return bfloat16_to_float(x); }
  static Storage store(float v) { return float_to_bfloat16(v); }
};
template <>
struct Element<Scalar::kFloat64> {
  using Storage = double;
  static float load(Storage x) { return static_cast<float>(x); }
};

// What phase 1 leaves per (mask, cell row): the total of its fp32 weights.
struct RowRecord {
  double total;
};

// ---- workspace layout ---------------------------------------------------------------------
constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Layout {
  int64_t groups_bound;  // at most ceil(N / kGroup) + min(B, N) groups
  int64_t table, records, row_axis, col_axis, order, group_start, group_table, group_cells;
  int64_t cell_lists, mask_table, mask_stride, counts, scratch;
  int64_t scratch_u, scratch_count, scratch_row;       // phase 1, per thread
  int64_t scratch_acc, scratch_panel, scratch_wpanel;  // phase 3, per thread (same memory)
  int64_t scratch_per_thread;
  int64_t bytes;
};

Layout make_layout(const Params& p, int threads) {
  Layout l{};
  int64_t end = 0;
  auto take = [&end](int64_t bytes) {
    const int64_t start = end;
    end = align_up(end + bytes, 64);
    return start;
  };
  const int64_t n = p.num_masks, cells = p.height * p.width;
  l.groups_bound = ceil_div(n, kGroup) + std::min(p.batch, n);
  // weight tables: sum over groups of 4 * ceil(size / 4) slots <= N + 3 * groups
  const int64_t slots = n + 3 * l.groups_bound;
  const int64_t axis_entry = std::max<int64_t>(sizeof(AxisSpan), sizeof(BilinearTap));
  l.table = take(slots * cells * static_cast<int64_t>(sizeof(float)));
  l.records = take(n * p.height * static_cast<int64_t>(sizeof(RowRecord)));
  l.row_axis = take(p.height * axis_entry);
  l.col_axis = take(p.width * axis_entry);
  l.order = take(n * 8);
  l.group_start = take((l.groups_bound + 1) * 8);
  l.group_table = take((l.groups_bound + 1) * 8);
  l.group_cells = take(l.groups_bound * 8);
  l.cell_lists = take(l.groups_bound * cells * 8);
  l.mask_table = take(n * 8);
  l.mask_stride = take(n * 8);
  l.counts = take((p.batch + 1) * 8);
  // per thread: u (4 bytes per mask column), byte counters, one cell row of weights (double)
  l.scratch_u = 0;
  l.scratch_count = align_up(p.mask_width * 4, 64);
  l.scratch_row = l.scratch_count + align_up(p.mask_width, 64);
  const int64_t phase1 = l.scratch_row + align_up(p.width * 8, 64);
  l.scratch_acc = 0;
  l.scratch_panel = l.scratch_acc + kGroup * kBlock * 4;
  l.scratch_wpanel = l.scratch_panel + kPanel * kBlock * 4;
  const int64_t phase3 = l.scratch_wpanel + kPanel * kGroup * 4;
  l.scratch_per_thread = std::max(phase1, phase3);
  l.scratch = take(l.scratch_per_thread * threads);
  l.bytes = end;
  return l;
}

template <typename T>
T* carve(const Params& p, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(p.workspace) + offset);
}

// Runs fn(task, thread) for every task in [0, tasks) on up to `threads` threads, the caller's
// included; tasks are handed out in order from a shared counter.
void parallel_for(int64_t tasks, int threads, const std::function<void(int64_t, int)>& fn) {
  threads = static_cast<int>(std::min<int64_t>(threads, tasks));
  if (threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int thread) {
    for (int64_t t = next++; t < tasks; t = next++) fn(t, thread);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker, i);
  worker(0);
  for (auto& t : pool) t.join();
}

// ---- 1. cell weights ----------------------------------------------------------------------
struct WeightsJob {
  const Params& p;
  const AxisSpan* rows;         // [H] (area)
  const AxisSpan* cols;         // [W] (area)
  const BilinearTap* row_taps;  // [H] (bilinear)
  const BilinearTap* col_taps;  // [W] (bilinear)
  float* table;                 // the groups' weight tables
  const int64_t* mask_table;    // [N]: where mask n's column of its group's table starts
  const int64_t* mask_stride;   // [N]: that table's slots per cell
  RowRecord* records;           // [N, H]
};

// Stores one cell row of weights (as fp32) in the mask's group table, and its record.
void store_row(const WeightsJob& job, int64_t n, int64_t i, const double* row) {
  const int64_t width = job.p.width, stride = job.mask_stride[n];
  float* w = job.table + job.mask_table[n] + i * width * stride;
  double total = 0;
  for (int64_t j = 0; j < width; ++j) {
    const float v = static_cast<float>(row[j]);
    w[j * stride] = v;
    total += v;
  }
  job.records[n * job.p.height + i] = RowRecord{total};
}

// row[j] = sum_q cx(j, q) * u[q] for every cell column j.
template <typename U, typename Sum>
void sum_columns(const WeightsJob& job, const U* u, double* row) {
  const double full = static_cast<double>(job.p.width);  // a pixel wholly inside the cell
  for (int64_t j = 0; j < job.p.width; ++j) {
    const AxisSpan c = job.cols[j];
    double w = static_cast<double>(c.first) * static_cast<double>(u[c.lo]);
    if (c.hi != c.lo) {
      Sum inside = 0;
      for (int64_t q = c.lo + 1; q < c.hi; ++q) inside += u[q];
      w += full * static_cast<double>(inside) + static_cast<double>(c.last) * static_cast<double>(u[c.hi]);
    }
    row[j] = w;
  }
}

// Area weights of one cell row of a bool/uint8 mask; exact integers until stored as fp32.
void area_row_binary(const WeightsJob& job, int64_t n, int64_t i, char* scratch,
                     const Layout& l) {
  const Params& p = job.p;
  const int64_t wm = p.mask_width;
  uint32_t* u = reinterpret_cast<uint32_t*>(scratch + l.scratch_u);
  uint8_t* count = reinterpret_cast<uint8_t*>(scratch + l.scratch_count);
  const uint8_t* mask = static_cast<const uint8_t*>(p.masks) + n * p.mask_height * wm;
  const AxisSpan r = job.rows[i];

  // rows wholly inside the cell row: byte counters, added to u before they can wrap
  std::fill(u, u + wm, 0u);
  std::fill(count, count + wm, uint8_t{0});
  int pending = 0;
  for (int64_t row = r.lo + 1; row < r.hi; ++row) {
    const uint8_t* m = mask + row * wm;
    for (int64_t q = 0; q < wm; ++q) count[q] = static_cast<uint8_t>(count[q] + (m[q] != 0));
    if (++pending == 255) {
      for (int64_t q = 0; q < wm; ++q) u[q] += count[q];
      std::fill(count, count + wm, uint8_t{0});
      pending = 0;
    }
  }
  const uint32_t full = static_cast<uint32_t>(p.height);
  for (int64_t q = 0; q < wm; ++q) u[q] = (u[q] + count[q]) * full;
  // the boundary rows, by their overlaps
  const uint32_t first = static_cast<uint32_t>(r.first);
  const uint8_t* m_first = mask + r.lo * wm;
  for (int64_t q = 0; q < wm; ++q) u[q] += m_first[q] != 0 ? first : 0u;
  if (r.hi != r.lo) {
    const uint32_t last = static_cast<uint32_t>(r.last);
    const uint8_t* m_last = mask + r.hi * wm;
    for (int64_t q = 0; q < wm; ++q) u[q] += m_last[q] != 0 ? last : 0u;
  }
  double* row = reinterpret_cast<double*>(scratch + l.scratch_row);
  sum_columns<uint32_t, uint64_t>(job, u, row);
  store_row(job, n, i, row);
}

// Area weights of one cell row of a float mask: u in fp32, the column sums in fp64.
template <Scalar S>
void area_row_float(const WeightsJob& job, int64_t n, int64_t i, char* scratch, const Layout& l) {
  using Storage = typename Element<S>::Storage;
  const Params& p = job.p;
  const int64_t wm = p.mask_width;
  float* u = reinterpret_cast<float*>(scratch + l.scratch_u);
  const Storage* mask = static_cast<const Storage*>(p.masks) + n * p.mask_height * wm;
  const AxisSpan r = job.rows[i];
  std::fill(u, u + wm, 0.0f);
  for (int64_t row = r.lo; row <= r.hi; ++row) {
    const float weight = static_cast<float>(
        row == r.lo ? r.first : (row == r.hi ? r.last : p.height));  // overlap, units of 1/H
    const Storage* m = mask + row * wm;
    for (int64_t q = 0; q < wm; ++q) u[q] += weight * Element<S>::load(m[q]);
  }
  double* row = reinterpret_cast<double*>(scratch + l.scratch_row);
  sum_columns<float, double>(job, u, row);
  store_row(job, n, i, row);
}

// Bilinear weights of one cell row: F.interpolate(align_corners=False), in fp64.
template <Scalar S>
void bilinear_row(const WeightsJob& job, int64_t n, int64_t i, char* scratch, const Layout& l) {
  const Params& p = job.p;
  const int64_t wm = p.mask_width;
  const BilinearTap ty = job.row_taps[i];
  auto value = [&](int64_t y, int64_t x) -> double {
    const int64_t at = (n * p.mask_height + y) * wm + x;
    if constexpr (S == Scalar::kByte) {
      return static_cast<const uint8_t*>(p.masks)[at] != 0 ? 1.0 : 0.0;
    } else if constexpr (S == Scalar::kFloat64) {
      return static_cast<const double*>(p.masks)[at];
    } else {
      using Storage = typename Element<S>::Storage;
      return Element<S>::load(static_cast<const Storage*>(p.masks)[at]);
    }
  };
  double* row = reinterpret_cast<double*>(scratch + l.scratch_row);
  for (int64_t j = 0; j < p.width; ++j) {
    const BilinearTap tx = job.col_taps[j];
    const double top = (1.0 - tx.frac) * value(ty.lo, tx.lo) + tx.frac * value(ty.lo, tx.hi);
    const double bottom = (1.0 - tx.frac) * value(ty.hi, tx.lo) + tx.frac * value(ty.hi, tx.hi);
    row[j] = (1.0 - ty.frac) * top + ty.frac * bottom;
  }
  store_row(job, n, i, row);
}

template <Scalar S>
void weights_row(const WeightsJob& job, int64_t n, int64_t i, char* scratch, const Layout& l) {
  if (job.p.mode == Mode::kBilinear) {
    bilinear_row<S>(job, n, i, scratch, l);
  } else if constexpr (S == Scalar::kByte) {
    area_row_binary(job, n, i, scratch, l);
  } else {
    area_row_float<S>(job, n, i, scratch, l);
  }
}

// ---- 3. weighted sums ---------------------------------------------------------------------
// x86-64: the hot loops are also compiled for x86-64-v3 (AVX2, FMA) and picked at load time.
#if defined(RGPT_X86) && !defined(__clang__)
#define RGPT_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RGPT_HOT
#endif

typedef float f32x8 __attribute__((vector_size(32)));  // GCC/Clang vectors: AVX, SSE or NEON

// Feature blocks to fp32, one cell at a time (n <= kBlock; the rest of dst is zeroed).
void load_block(const float* src, float* dst, int n, Scalar) {
  std::memcpy(dst, src, sizeof(float) * n);
  std::fill(dst + n, dst + kBlock, 0.0f);
}

#ifdef RGPT_X86
__attribute__((target("avx2,f16c"))) void half_block_f16c(const uint16_t* src, float* dst, int n) {
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c));
    _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(h));
  }
  for (; c < n; ++c) dst[c] = half_to_float(src[c]);
}
const bool kF16c = [] {
  __builtin_cpu_init();  // this runs in a static initialiser
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}();
#endif

RGPT_HOT void load_block(const uint16_t* src, float* dst, int n, Scalar dtype) {
  if (dtype == Scalar::kFloat16) {
#ifdef RGPT_X86
    if (kF16c) {
      half_block_f16c(src, dst, n);
      std::fill(dst + n, dst + kBlock, 0.0f);
      return;
    }
#endif
    for (int c = 0; c < n; ++c) dst[c] = half_to_float(src[c]);
  } else {
    for (int c = 0; c < n; ++c) dst[c] = bfloat16_to_float(src[c]);
  }
  std::fill(dst + n, dst + kBlock, 0.0f);
}

// acc[m][c] += sum_k weights[k][m] * panel[k][c] for m < 4 * quads, c < 16 * strips: a
// register tile of 4 masks x 16 channels stays in registers across the k loop.
RGPT_HOT void accumulate_panel(const float* panel, const float* weights, int cells, int quads,
                               int strips, float* acc) {
  for (int quad = 0; quad < quads; ++quad) {
    for (int strip = 0; strip < 16 * strips; strip += 16) {
      f32x8 tile[4][2] = {};
      for (int k = 0; k < cells; ++k) {
        f32x8 x0, x1;
        std::memcpy(&x0, panel + k * kBlock + strip, sizeof x0);
        std::memcpy(&x1, panel + k * kBlock + strip + 8, sizeof x1);
        const float* w = weights + k * kGroup + 4 * quad;
        for (int r = 0; r < 4; ++r) {
          tile[r][0] += w[r] * x0;
          tile[r][1] += w[r] * x1;
        }
      }
      for (int r = 0; r < 4; ++r) {
        float* a = acc + (4 * quad + r) * kBlock + strip;
        for (int c = 0; c < 8; ++c) {
          a[c] += tile[r][0][c];
          a[8 + c] += tile[r][1][c];
        }
      }
    }
  }
}

struct Groups {
  const int64_t* order;        // mask indices sorted by image
  const int64_t* start;        // [groups + 1] into order
  const int64_t* table;        // [groups + 1]: offset of each group's weight table
  const int64_t* cell_count;   // [groups]: listed cells
  const int64_t* cell_lists;   // [groups][H * W]: the cells any mask of the group weights
  int64_t count;
};

int group_size(const Groups& g, int64_t group) {
  return static_cast<int>(g.start[group + 1] - g.start[group]);
}
int64_t group_stride(const Groups& g, int64_t group) { return 4 * ceil_div(group_size(g, group), 4); }

// 2. The cells any of the group's masks weights; zeroes the padding slots of its table.
void list_cells(const Params& p, const Groups& g, float* table, int64_t group, int64_t* list,
                int64_t* listed) {
  const int64_t cells = p.height * p.width, size = group_size(g, group);
  const int64_t stride = group_stride(g, group);
  float* w = table + g.table[group];
  int64_t count = 0;
  for (int64_t cell = 0; cell < cells; ++cell, w += stride) {
    bool any = false;
    for (int64_t s = 0; s < size; ++s) any |= w[s] != 0;
    for (int64_t s = size; s < stride; ++s) w[s] = 0;
    if (any) list[count++] = cell;
  }
  *listed = count;
}

// 3. One group of masks (one image) over one channel block.
template <Scalar F>
void pool_group(const Params& p, const Groups& g, const float* table, const RowRecord* records,
                int64_t group, int64_t block, char* scratch, const Layout& l) {
  using Storage = typename Element<F>::Storage;
  const int64_t height = p.height, width = p.width, channels = p.channels;
  const int64_t* members = g.order + g.start[group];
  const int size = group_size(g, group);
  const int stride = static_cast<int>(group_stride(g, group));
  const int quads = stride / 4;
  const int64_t image = p.batch_index[members[0]];
  const int64_t c0 = block * kBlock;
  const int block_width = static_cast<int>(std::min<int64_t>(kBlock, channels - c0));
  const int strips = (block_width + 15) / 16;  // of 16 channels (the panel is zero-padded)

  float* acc = reinterpret_cast<float*>(scratch + l.scratch_acc);        // [kGroup][kBlock]
  float* panel = reinterpret_cast<float*>(scratch + l.scratch_panel);    // [kPanel][kBlock]
  float* wpanel = reinterpret_cast<float*>(scratch + l.scratch_wpanel);  // [kPanel][kGroup]
  std::fill(acc, acc + kGroup * kBlock, 0.0f);
  const Storage* grid =
      static_cast<const Storage*>(p.features) + image * height * width * channels + c0;
  const float* weights = table + g.table[group];
  const int64_t* list = g.cell_lists + group * height * width;
  const int64_t listed = g.cell_count[group];
  for (int64_t k0 = 0; k0 < listed; k0 += kPanel) {
    const int cells = static_cast<int>(std::min<int64_t>(kPanel, listed - k0));
    for (int k = 0; k < cells; ++k) {
      // the features of a cell further on: each task walks the grid with a stride of C
      // elements, which the hardware prefetchers follow too late
      const int64_t ahead = list[std::min(k0 + k + kPrefetch, listed - 1)];
      for (int b = 0; b < kBlock * static_cast<int>(sizeof(Storage)); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(grid + ahead * channels) + b);
      }
      const int64_t cell = list[k0 + k];
      load_block(grid + cell * channels, panel + k * kBlock, block_width, F);
      std::memcpy(wpanel + k * kGroup, weights + cell * stride, sizeof(float) * stride);
    }
    accumulate_panel(panel, wpanel, cells, quads, strips, acc);
  }

  Storage* out = static_cast<Storage*>(p.out);
  for (int m = 0; m < size; ++m) {
    const int64_t n = members[m];
    double total = 0;
    for (int64_t i = 0; i < height; ++i) total += records[n * height + i].total;
    Storage* o = out + n * channels + c0;
    for (int c = 0; c < block_width; ++c) {
      const double mean = total > 0 ? static_cast<double>(acc[m * kBlock + c]) / total : 0.0;
      o[c] = Element<F>::store(static_cast<float>(mean));
    }
  }
}

int64_t element_bytes(Scalar s) {
  switch (s) {
    case Scalar::kFloat32: return 4;
    case Scalar::kFloat64: return 8;
    case Scalar::kByte: return 1;
    default: return 2;
  }
}

template <Scalar F, Scalar M>
void run_typed(const Params& p, int threads) {
  const Layout l = make_layout(p, threads);
  const int64_t n = p.num_masks, height = p.height, width = p.width, cells = height * width;
  auto threads_for = [threads](int64_t bytes) {
    return static_cast<int>(std::clamp<int64_t>(bytes / kBytesPerThread, 1, threads));
  };

  // 0. masks sorted by image (counting sort, stable), cut into groups of at most kGroup
  int64_t* order = carve<int64_t>(p, l.order);
  int64_t* start = carve<int64_t>(p, l.group_start);
  int64_t* counts = carve<int64_t>(p, l.counts);
  std::fill(counts, counts + p.batch + 1, int64_t{0});
  for (int64_t m = 0; m < n; ++m) ++counts[p.batch_index[m] + 1];
  for (int64_t b = 0; b < p.batch; ++b) counts[b + 1] += counts[b];
  for (int64_t m = 0; m < n; ++m) order[counts[p.batch_index[m]]++] = m;
  int64_t groups = 0;
  for (int64_t k = 0; k < n; ++k) {
    const bool same_image = k > 0 && p.batch_index[order[k]] == p.batch_index[order[k - 1]];
    if (!same_image || k - start[groups - 1] == kGroup) start[groups++] = k;
  }
  start[groups] = n;
  int64_t* group_table = carve<int64_t>(p, l.group_table);
  int64_t* mask_table = carve<int64_t>(p, l.mask_table);
  int64_t* mask_stride = carve<int64_t>(p, l.mask_stride);
  Groups g{order, start, group_table, carve<int64_t>(p, l.group_cells),
           carve<int64_t>(p, l.cell_lists), groups};
  group_table[0] = 0;
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t stride = group_stride(g, group);
    group_table[group + 1] = group_table[group] + cells * stride;
    for (int64_t k = start[group]; k < start[group + 1]; ++k) {
      mask_table[order[k]] = group_table[group] + (k - start[group]);
      mask_stride[order[k]] = stride;
    }
  }

  // axis tables
  AxisSpan* rows = carve<AxisSpan>(p, l.row_axis);
  AxisSpan* cols = carve<AxisSpan>(p, l.col_axis);
  BilinearTap* row_taps = carve<BilinearTap>(p, l.row_axis);
  BilinearTap* col_taps = carve<BilinearTap>(p, l.col_axis);
  for (int64_t i = 0; i < height; ++i) {
    if (p.mode == Mode::kArea) rows[i] = area_span(i, height, p.mask_height);
    else row_taps[i] = bilinear_tap(i, height, p.mask_height);
  }
  for (int64_t j = 0; j < width; ++j) {
    if (p.mode == Mode::kArea) cols[j] = area_span(j, width, p.mask_width);
    else col_taps[j] = bilinear_tap(j, width, p.mask_width);
  }

  // 1. weights: tasks over (mask, band of cell rows); enough bands to keep every thread busy
  float* table = carve<float>(p, l.table);
  RowRecord* records = carve<RowRecord>(p, l.records);
  const WeightsJob job{p, rows, cols, row_taps, col_taps, table, mask_table, mask_stride, records};
  const int64_t bands = std::clamp<int64_t>(ceil_div(4 * threads, n), 1, height);
  const int64_t band_rows = ceil_div(height, bands);
  char* scratch = carve<char>(p, l.scratch);
  const int64_t read = p.mode == Mode::kArea ? p.mask_height * p.mask_width : 4 * cells;
  parallel_for(n * bands, threads_for(n * read * element_bytes(M)), [&](int64_t task, int thread) {
    const int64_t mask = task / bands, band = task % bands;
    char* mine = scratch + thread * l.scratch_per_thread;
    const int64_t end = std::min(height, (band + 1) * band_rows);
    for (int64_t i = band * band_rows; i < end; ++i) weights_row<M>(job, mask, i, mine, l);
  });

  // 2. cell lists, per group
  int64_t* cell_count = carve<int64_t>(p, l.group_cells);
  int64_t* cell_lists = carve<int64_t>(p, l.cell_lists);
  parallel_for(groups, threads_for((n + 3 * groups) * cells * 4), [&](int64_t group, int) {
    list_cells(p, g, table, group, cell_lists + group * cells, cell_count + group);
  });

  // 3. sums: tasks over (group, channel block)
  const int64_t blocks = ceil_div(p.channels, kBlock);
  int64_t listed = 0;
  for (int64_t group = 0; group < groups; ++group) listed += cell_count[group];
  const int64_t features = listed * p.channels * element_bytes(F);
  parallel_for(groups * blocks, threads_for(features), [&](int64_t task, int thread) {
    pool_group<F>(p, g, table, records, task / blocks, task % blocks,
                  scratch + thread * l.scratch_per_thread, l);
  });
}

template <Scalar F>
void run_features(const Params& p, int threads) {
  switch (p.masks_dtype) {
    case Scalar::kByte: return run_typed<F, Scalar::kByte>(p, threads);
    case Scalar::kFloat32: return run_typed<F, Scalar::kFloat32>(p, threads);
    case Scalar::kFloat16: return run_typed<F, Scalar::kFloat16>(p, threads);
    case Scalar::kBFloat16: return run_typed<F, Scalar::kBFloat16>(p, threads);
    case Scalar::kFloat64: return run_typed<F, Scalar::kFloat64>(p, threads);
  }
}

}  // namespace

int64_t cpu_workspace_bytes(const Params& p, int num_threads) {
  return make_layout(p, num_threads).bytes;
}

void run_cpu(const Params& p, int num_threads) {
  if (p.num_masks == 0 || p.channels == 0) return;
  switch (p.features_dtype) {
    case Scalar::kFloat32: return run_features<Scalar::kFloat32>(p, num_threads);
    case Scalar::kFloat16: return run_features<Scalar::kFloat16>(p, num_threads);
    case Scalar::kBFloat16: return run_features<Scalar::kBFloat16>(p, num_threads);
    default: return;  // refused by the host (mask_pool_host.cpp)
  }
}

}  // namespace rgpt::mask_pool
