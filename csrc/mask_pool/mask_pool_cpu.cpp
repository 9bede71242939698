// Mask pooling on the CPU (how it works: README.md in this folder). All levels of a call go
// through each phase together, so a phase starts its threads once for every level.
//
// 0. Masks are sorted by image (counting sort) and cut into groups of at most kGroup masks of
//    one image. Each group owns a weight table [cell][slot] per level (slots rounded up to 4).
// 1. Weights, tasks over (level, group, band of cell rows). Area: separably. For cell row i,
//    first down the mask rows it touches, u[q] = sum_p ry(i, p) * m[p, q] (long contiguous
//    loops over each mask row), then across, w[i, j] = sum_q cx(j, q) * u[q] (a span of u per
//    cell). Binary masks count the rows wholly inside the cell row with byte counters, so
//    their weights are exact integers (units of 1/(H*W) pixel) until stored as fp32; float
//    masks accumulate u in fp32. Bilinear: 4 taps per cell in fp64. Binary mode: 1 when a
//    tap that carries weight lands on a set pixel, else 0 (integer taps: exact).
//    A record per (mask, cell row) keeps the row's weight total.
//    Each (group, cell row) also zeroes its padding slots.
// 2. Cell lists, tasks over (level, group): the cells any mask of the group weights.
// 3. Sums, tasks over (level, group, block of kBlock channels): the listed cells, kPanel at a
//    time, are gathered into fp32 panels (features converted once, weights copied) and
//    accumulated by register tiles: 4 masks x 16 channels over the panel's cells where one of
//    the 4 has weight, or, where the 4 overlap little, 1 mask x 64 channels over its own cells.
// Each task writes its own outputs in a fixed order: the result does not depend on the
// number of threads.
//
// The file, top to bottom: constants and element access; the workspace layout and the thread
// pool; phase 1 (cell weights, one cell row of one mask per call); phase 3's register tiles;
// the groups' tables; phase 2 (cell lists); phase 3 (one group's sums); the driver
// (run_typed: phases 0-3 in order, each over its tasks); the entry points.
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
// A quad of masks runs its masks one by one when its (cell, mask) pairs with weight are at
// most 4 / kQuadShare of its 4 x (cells any of them weighs) (phase 3: accumulate_panel).
constexpr int kQuadShare = 2;  // 16 regions at 512 px, 1 thread: faster than 1 (always) or never
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

// One level's part of the workspace (byte offsets).
struct LevelLayout {
  int64_t table, records, row_axis, col_axis, group_cells, cell_lists;
};

struct Layout {
  int64_t groups_bound;  // at most ceil(N / kGroup) + min(B, N) groups
  int64_t order, group_start, group_slots, mask_base, mask_slot, mask_stride, counts;
  LevelLayout level[kMaxLevels];
  int64_t scratch;
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
  const int64_t n = p.num_masks;
  l.groups_bound = ceil_div(n, kGroup) + std::min(p.batch, n);
  // weight tables: sum over groups of 4 * ceil(size / 4) slots <= N + 3 * groups
  const int64_t slots = n + 3 * l.groups_bound;
  constexpr int64_t axis_entry = std::max(
      {sizeof(AxisSpan), sizeof(BilinearTap), sizeof(BinaryTap)});
  l.order = take(n * 8);
  l.group_start = take((l.groups_bound + 1) * 8);
  l.group_slots = take((l.groups_bound + 1) * 8);
  l.mask_base = take(n * 8);
  l.mask_slot = take(n * 8);
  l.mask_stride = take(n * 8);
  l.counts = take((p.batch + 1) * 8);
  int64_t widest = 0;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    const int64_t cells = level.height * level.width;
    LevelLayout& ll = l.level[k];
    ll.table = take(slots * cells * static_cast<int64_t>(sizeof(float)));
    ll.records = take(n * level.height * static_cast<int64_t>(sizeof(RowRecord)));
    ll.row_axis = take(level.height * axis_entry);
    ll.col_axis = take(level.width * axis_entry);
    ll.group_cells = take(l.groups_bound * 8);
    ll.cell_lists = take(l.groups_bound * cells * 8);
    widest = std::max(widest, level.width);
  }
  // per thread: u (4 bytes per mask column), byte counters, one cell row of weights (double)
  l.scratch_u = 0;
  l.scratch_count = align_up(p.mask_width * 4, 64);
  l.scratch_row = l.scratch_count + align_up(p.mask_width, 64);
  const int64_t phase1 = l.scratch_row + align_up(widest * 8, 64);
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

// Tasks of several levels counted as one range: level k owns [first[k], first[k + 1]).
struct LevelTasks {
  int64_t first[kMaxLevels + 1] = {};
  int levels = 0;

  int64_t total() const { return first[levels]; }
  // (level, task within the level) of task t < total()
  std::pair<int, int64_t> find(int64_t t) const {
    int k = 0;
    while (t >= first[k + 1]) ++k;
    return {k, t - first[k]};
  }
};

// ---- 1. cell weights ----------------------------------------------------------------------
// The masks' groups, as phase 1 addresses a weight: level table + cells * base[n] + slot[n],
// then + cell * stride[n] for each cell.
struct Slots {
  const int64_t* base;    // [N]: the first slot of mask n's group, over all groups
  const int64_t* slot;    // [N]: mask n's slot in its group
  const int64_t* stride;  // [N]: slots per cell of its group's table
};

struct WeightsJob {
  const Params& p;
  int64_t height, width;        // the level's grid
  const void* row_axis;         // [H]: AxisSpan (area), BilinearTap or BinaryTap
  const void* col_axis;         // [W]
  float* table;                 // the groups' weight tables of this level
  Slots slots;
  RowRecord* records;           // [N, H]

  template <typename Axis>
  const Axis& row(int64_t i) const { return static_cast<const Axis*>(row_axis)[i]; }
  template <typename Axis>
  const Axis& col(int64_t j) const { return static_cast<const Axis*>(col_axis)[j]; }
};

// Stores one cell row of weights (as fp32) in the mask's group table, and its record.
void store_row(const WeightsJob& job, int64_t n, int64_t i, const double* row) {
  const int64_t width = job.width, stride = job.slots.stride[n];
  float* w = job.table + job.slots.base[n] * job.height * width + job.slots.slot[n] +
             i * width * stride;
  double total = 0;
  for (int64_t j = 0; j < width; ++j) {
    const float v = static_cast<float>(row[j]);
    w[j * stride] = v;
    total += v;
  }
  job.records[n * job.height + i] = RowRecord{total};
}

// row[j] = sum_q cx(j, q) * u[q] for every cell column j.
template <typename U, typename Sum>
void sum_columns(const WeightsJob& job, const U* u, double* row) {
  const double full = static_cast<double>(job.width);  // a pixel wholly inside the cell
  for (int64_t j = 0; j < job.width; ++j) {
    const AxisSpan& c = job.col<AxisSpan>(j);
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
  const AxisSpan& r = job.row<AxisSpan>(i);

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
  const uint32_t full = static_cast<uint32_t>(job.height);
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
  const AxisSpan& r = job.row<AxisSpan>(i);
  std::fill(u, u + wm, 0.0f);
  for (int64_t row = r.lo; row <= r.hi; ++row) {
    const float weight = static_cast<float>(
        row == r.lo ? r.first : (row == r.hi ? r.last : job.height));  // overlap, units of 1/H
    const Storage* m = mask + row * wm;
    for (int64_t q = 0; q < wm; ++q) u[q] += weight * Element<S>::load(m[q]);
  }
  double* row = reinterpret_cast<double*>(scratch + l.scratch_row);
  sum_columns<float, double>(job, u, row);
  store_row(job, n, i, row);
}

// Mask element (y, x) of mask n: its value (fp64), and whether it is set (binary mode: > 0
// in its own precision; bool/uint8: nonzero).
template <Scalar S>
struct MaskReader {
  const void* masks;
  int64_t offset;  // n * Hm * Wm
  int64_t width;

  int64_t at(int64_t y, int64_t x) const { return offset + y * width + x; }
  double value(int64_t y, int64_t x) const {
    if constexpr (S == Scalar::kByte) {
      return static_cast<const uint8_t*>(masks)[at(y, x)] != 0 ? 1.0 : 0.0;
    } else if constexpr (S == Scalar::kFloat64) {
      return static_cast<const double*>(masks)[at(y, x)];
    } else {
      using Storage = typename Element<S>::Storage;
      return Element<S>::load(static_cast<const Storage*>(masks)[at(y, x)]);
    }
  }
  bool set(int64_t y, int64_t x) const {
    if constexpr (S == Scalar::kByte) return static_cast<const uint8_t*>(masks)[at(y, x)] != 0;
    return value(y, x) > 0;  // fp16/bf16 -> fp32 and fp64 as is: exact, so the sign is kept
  }
};

// Bilinear weights of one cell row: F.interpolate(align_corners=False), in fp64.
template <Scalar S>
void bilinear_row(const WeightsJob& job, int64_t n, int64_t i, char* scratch, const Layout& l) {
  const Params& p = job.p;
  const MaskReader<S> mask{p.masks, n * p.mask_height * p.mask_width, p.mask_width};
  const BilinearTap& ty = job.row<BilinearTap>(i);
  double* row = reinterpret_cast<double*>(scratch + l.scratch_row);
  for (int64_t j = 0; j < job.width; ++j) {
    const BilinearTap& tx = job.col<BilinearTap>(j);
    const double top =
        (1.0 - tx.frac) * mask.value(ty.lo, tx.lo) + tx.frac * mask.value(ty.lo, tx.hi);
    const double bottom =
        (1.0 - tx.frac) * mask.value(ty.hi, tx.lo) + tx.frac * mask.value(ty.hi, tx.hi);
    row[j] = (1.0 - ty.frac) * top + ty.frac * bottom;
  }
  store_row(job, n, i, row);
}

// Binary weights of one cell row (Osprey): 1 where a tap that carries weight is set, else 0.
// The two mask rows of the cell row's taps are read at the cells' tap columns; bool/uint8
// masks OR their four bytes, float masks compare each with 0. No branch on the result:
// region edges would mispredict.
template <Scalar S>
void binary_row(const WeightsJob& job, int64_t n, int64_t i) {
  const Params& p = job.p;
  const BinaryTap& ty = job.row<BinaryTap>(i);
  const BinaryTap* cols = &job.col<BinaryTap>(0);
  const int64_t width = job.width, stride = job.slots.stride[n];
  float* w = job.table + job.slots.base[n] * job.height * width + job.slots.slot[n] +
             i * width * stride;
  int64_t count = 0;
  if constexpr (S == Scalar::kByte) {
    const uint8_t* mask = static_cast<const uint8_t*>(p.masks) + n * p.mask_height * p.mask_width;
    const uint8_t* top = mask + ty.lo * p.mask_width;
    const uint8_t* bottom = mask + ty.hi * p.mask_width;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t lo = cols[j].lo, hi = cols[j].hi;
      const bool set = (top[lo] | top[hi] | bottom[lo] | bottom[hi]) != 0;
      w[j * stride] = static_cast<float>(set);
      count += set;
    }
  } else {
    const MaskReader<S> mask{p.masks, n * p.mask_height * p.mask_width, p.mask_width};
    for (int64_t j = 0; j < width; ++j) {
      const int64_t lo = cols[j].lo, hi = cols[j].hi;
      const bool set = mask.set(ty.lo, lo) | mask.set(ty.lo, hi) | mask.set(ty.hi, lo) |
                       mask.set(ty.hi, hi);
      w[j * stride] = static_cast<float>(set);
      count += set;
    }
  }
  job.records[n * job.height + i] = RowRecord{static_cast<double>(count)};
}

// Binary mode reads two mask rows per cell row, a few hundred bytes each: too short for the
// hardware prefetchers. The next mask's rows are requested while this one's are read.
template <Scalar S>
void prefetch_binary_rows(const WeightsJob& job, int64_t n, int64_t i) {
  const Params& p = job.p;
  const BinaryTap& ty = job.row<BinaryTap>(i);
  constexpr int64_t element =
      S == Scalar::kByte ? 1 : (S == Scalar::kFloat64 ? 8 : (S == Scalar::kFloat32 ? 4 : 2));
  const int64_t first = job.col<BinaryTap>(0).lo * element;
  const int64_t last = job.col<BinaryTap>(job.width - 1).hi * element;
  const char* mask = static_cast<const char*>(p.masks) + n * p.mask_height * p.mask_width * element;
  for (const int64_t row : {ty.lo, ty.hi}) {
    const char* at = mask + row * p.mask_width * element;
    for (int64_t b = first; b <= last; b += 64) __builtin_prefetch(at + b);
  }
}

template <Scalar S>
void weights_row(const WeightsJob& job, int64_t n, int64_t i, char* scratch, const Layout& l) {
  if (job.p.mode == Mode::kBinary) {
    binary_row<S>(job, n, i);
  } else if (job.p.mode == Mode::kBilinear) {
    bilinear_row<S>(job, n, i, scratch, l);
  } else if constexpr (S == Scalar::kByte) {
    area_row_binary(job, n, i, scratch, l);
  } else {
    area_row_float<S>(job, n, i, scratch, l);
  }
}

// ---- 3. weighted sums: the register tiles -------------------------------------------------
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

// acc[m][c] += sum_k weights[k][m] * panel[k][c] for the tile's R masks and 16 * S channels
// from `strip`, over the panel cells k whose bit is set in `cells` (the others weigh 0 for all
// R masks): R x 2S vectors of 8 sums stay in registers across the k loop (every loop over the
// tile is unrolled, so that the compiler keeps it there).
template <int R, int S>
inline __attribute__((always_inline)) void accumulate_tile(const float* panel,
                                                           const float* weights, uint32_t cells,
                                                           int strip, float* acc) {
  f32x8 tile[R][2 * S];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < 2 * S; ++v) tile[r][v] = f32x8{};
  }
  for (; cells != 0; cells &= cells - 1) {
    const int k = __builtin_ctz(cells);
    f32x8 x[2 * S];
#pragma GCC unroll 8
    for (int v = 0; v < 2 * S; ++v) {
      std::memcpy(&x[v], panel + k * kBlock + strip + 8 * v, sizeof x[v]);
    }
    const float* w = weights + k * kGroup;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < 2 * S; ++v) tile[r][v] += w[r] * x[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* a = acc + r * kBlock + strip;
#pragma GCC unroll 8
    for (int v = 0; v < 2 * S; ++v) {
      f32x8 sum;
      std::memcpy(&sum, a + 8 * v, sizeof sum);
      sum += tile[r][v];
      std::memcpy(a + 8 * v, &sum, sizeof sum);
    }
  }
}

// acc[m][c] += sum_k weights[k][m] * panel[k][c] for one mask (weights: its column) over
// c < 16 * strips, only at the panel cells where it has weight (`cells`): tiles of 1 x 64
// channels (8 independent sums hide the latency of the multiply-adds), then 1 x 16.
RGPT_HOT void accumulate_mask(const float* panel, const float* weights, uint32_t cells,
                              int strips, float* acc) {
  const int channels = 16 * strips;
  int strip = 0;
  for (; strip + 64 <= channels; strip += 64) {
    accumulate_tile<1, 4>(panel, weights, cells, strip, acc);
  }
  for (; strip < channels; strip += 16) accumulate_tile<1, 1>(panel, weights, cells, strip, acc);
}

// acc[m][c] += sum_k weights[k][m] * panel[k][c] for m < masks, c < 16 * strips, k < kPanel.
// quad_cells[q]: the panel's cells where a mask of quad q (masks 4q..4q+3) has weight;
// mask_cells[m]: those where mask m has. A quad whose masks mostly weigh the same cells runs
// tiles of 4 masks x 16 channels (a feature load serves 4 masks); a quad of masks that mostly
// weigh different cells (regions overlap little) runs each mask over its own cells, so that
// no multiply-add has weight 0. Every tile shape adds in the same order (k, then into acc):
// the result does not depend on the choice, and skipping a cell only leaves out a product
// with weight 0.
RGPT_HOT void accumulate_panel(const float* panel, const float* weights,
                               const uint32_t* quad_cells, const uint32_t* mask_cells, int masks,
                               int strips, float* acc) {
  const int channels = 16 * strips;
  int m = 0;
  for (; m + 4 <= masks; m += 4) {
    int pairs = 0;
    for (int r = 0; r < 4; ++r) pairs += __builtin_popcount(mask_cells[m + r]);
    if (pairs * kQuadShare <= 4 * __builtin_popcount(quad_cells[m / 4])) {
      for (int r = m; r < m + 4; ++r) {
        accumulate_mask(panel, weights + r, mask_cells[r], strips, acc + r * kBlock);
      }
      continue;
    }
    for (int strip = 0; strip < channels; strip += 16) {
      accumulate_tile<4, 1>(panel, weights + m, quad_cells[m / 4], strip, acc + m * kBlock);
    }
  }
  const float* w = weights + m;
  float* a = acc + m * kBlock;
  const uint32_t cells = m < masks ? quad_cells[m / 4] : 0;
  int strip = 0;
  switch (masks - m) {
    case 1:
      accumulate_mask(panel, w, mask_cells[m], strips, a);
      break;
    case 2:
      for (; strip + 32 <= channels; strip += 32) accumulate_tile<2, 2>(panel, w, cells, strip, a);
      for (; strip < channels; strip += 16) accumulate_tile<2, 1>(panel, w, cells, strip, a);
      break;
    case 3:
      for (; strip < channels; strip += 16) accumulate_tile<3, 1>(panel, w, cells, strip, a);
      break;
    default:
      break;
  }
}

// ---- the groups' tables, as phases 2 and 3 read them --------------------------------------
struct Groups {
  const int64_t* order;  // mask indices sorted by image
  const int64_t* start;  // [groups + 1] into order
  const int64_t* slots;  // [groups + 1]: the first slot of each group, over all groups
  int64_t count;
};

int group_size(const Groups& g, int64_t group) {
  return static_cast<int>(g.start[group + 1] - g.start[group]);
}
int64_t group_stride(const Groups& g, int64_t group) { return 4 * ceil_div(group_size(g, group), 4); }

// One level's tables, as phases 2 and 3 read them.
struct LevelTables {
  const Level* level;
  float* table;               // the groups' weight tables: group g at cells * slots[g]
  const RowRecord* records;   // [N, H]
  int64_t* cell_count;        // [groups]: listed cells
  int64_t* cell_lists;        // [groups][H * W]: the cells any mask of the group weights
  int64_t cells;
};

// ---- 2. cell lists -------------------------------------------------------------------------
// The cells any of the group's masks weights (phase 1 zeroed the padding slots, so every
//    slot of a cell can be tested: Q quads, a fixed count the compiler vectorises).
template <int Q>
int64_t list_weighted_cells(const float* w, int64_t cells, int64_t* list) {
  int64_t count = 0;
  for (int64_t cell = 0; cell < cells; ++cell, w += 4 * Q) {
    bool any = false;
    for (int s = 0; s < 4 * Q; ++s) any |= w[s] != 0;  // nan counts: it must poison its row
    list[count] = cell;  // kept when `any` (no branch: region edges would mispredict)
    count += any;
  }
  return count;
}

void list_cells(const Groups& g, const LevelTables& t, int64_t group) {
  const float* w = t.table + t.cells * g.slots[group];
  int64_t* list = t.cell_lists + group * t.cells;
  int64_t count = 0;
  switch (group_stride(g, group) / 4) {
    case 1: count = list_weighted_cells<1>(w, t.cells, list); break;
    case 2: count = list_weighted_cells<2>(w, t.cells, list); break;
    case 3: count = list_weighted_cells<3>(w, t.cells, list); break;
    default: count = list_weighted_cells<4>(w, t.cells, list); break;
  }
  t.cell_count[group] = count;
}

// ---- 3. weighted sums: one group ----------------------------------------------------------
// One group of masks (one image) over one channel block of one level.
template <Scalar F>
void pool_group(const Params& p, const Groups& g, const LevelTables& t, int64_t group,
                int64_t block, char* scratch, const Layout& l) {
  using Storage = typename Element<F>::Storage;
  const Level& level = *t.level;
  const int64_t channels = level.channels;
  const int64_t* members = g.order + g.start[group];
  const int size = group_size(g, group);
  const int stride = static_cast<int>(group_stride(g, group));
  const int64_t image = p.batch_index[members[0]];
  const int64_t c0 = block * kBlock;
  const int block_width = static_cast<int>(std::min<int64_t>(kBlock, channels - c0));
  const int strips = (block_width + 15) / 16;  // of 16 channels (the panel is zero-padded)

  float* acc = reinterpret_cast<float*>(scratch + l.scratch_acc);        // [kGroup][kBlock]
  float* panel = reinterpret_cast<float*>(scratch + l.scratch_panel);    // [kPanel][kBlock]
  float* wpanel = reinterpret_cast<float*>(scratch + l.scratch_wpanel);  // [kPanel][kGroup]
  std::fill(acc, acc + kGroup * kBlock, 0.0f);
  const Storage* grid =
      static_cast<const Storage*>(level.features) + image * t.cells * channels + c0;
  const float* weights = t.table + t.cells * g.slots[group];
  const int64_t* list = t.cell_lists + group * t.cells;
  const int64_t listed = t.cell_count[group];
  static_assert(kPanel <= 32, "a panel's cells are the bits of a uint32_t");
  for (int64_t k0 = 0; k0 < listed; k0 += kPanel) {
    const int cells = static_cast<int>(std::min<int64_t>(kPanel, listed - k0));
    uint32_t quad_cells[kGroup / 4] = {};
    uint32_t mask_cells[kGroup] = {};
    for (int k = 0; k < cells; ++k) {
      // the features of a cell further on: each task walks the grid with a stride of C
      // elements, which the hardware prefetchers follow too late
      const int64_t ahead = list[std::min(k0 + k + kPrefetch, listed - 1)];
      for (int b = 0; b < kBlock * static_cast<int>(sizeof(Storage)); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(grid + ahead * channels) + b);
      }
      const int64_t cell = list[k0 + k];
      load_block(grid + cell * channels, panel + k * kBlock, block_width, F);
      const float* w = weights + cell * stride;
      std::memcpy(wpanel + k * kGroup, w, sizeof(float) * stride);
      for (int s = 0; s < stride; ++s) {  // nan counts: it must poison its mask's row
        mask_cells[s] |= static_cast<uint32_t>(w[s] != 0) << k;
      }
    }
    for (int q = 0; q < stride / 4; ++q) {
      quad_cells[q] = mask_cells[4 * q] | mask_cells[4 * q + 1] | mask_cells[4 * q + 2] |
                      mask_cells[4 * q + 3];
    }
    accumulate_panel(panel, wpanel, quad_cells, mask_cells, size, strips, acc);
  }

  Storage* out = static_cast<Storage*>(p.out);
  for (int m = 0; m < size; ++m) {
    const int64_t n = members[m];
    double total = 0;
    for (int64_t i = 0; i < level.height; ++i) total += t.records[n * level.height + i].total;
    Storage* o = out + n * p.out_channels + level.out_column + c0;
    for (int c = 0; c < block_width; ++c) {
      const float sum = acc[m * kBlock + c];
      float mean;
      if (p.mode == Mode::kBinary) {
        // Osprey's sum / (count + 1e-8), in fp32 as the CUDA path divides (count is exact)
        mean = sum / (static_cast<float>(total) + kBinaryEpsilon);
      } else {
        mean = static_cast<float>(total > 0 ? static_cast<double>(sum) / total : 0.0);
      }
      o[c] = Element<F>::store(mean);
    }
  }
}

// ---- the driver: phases 0-3 in order, each over its tasks ----------------------------------
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
  const int64_t n = p.num_masks;
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
  int64_t* group_slots = carve<int64_t>(p, l.group_slots);
  int64_t* mask_base = carve<int64_t>(p, l.mask_base);
  int64_t* mask_slot = carve<int64_t>(p, l.mask_slot);
  int64_t* mask_stride = carve<int64_t>(p, l.mask_stride);
  const Groups g{order, start, group_slots, groups};
  group_slots[0] = 0;
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t stride = group_stride(g, group);
    group_slots[group + 1] = group_slots[group] + stride;
    for (int64_t k = start[group]; k < start[group + 1]; ++k) {
      mask_base[order[k]] = group_slots[group];
      mask_slot[order[k]] = k - start[group];
      mask_stride[order[k]] = stride;
    }
  }
  const Slots slots{mask_base, mask_slot, mask_stride};

  // axis tables and each level's tables
  std::vector<WeightsJob> jobs;
  std::vector<LevelTables> tables;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    const LevelLayout& ll = l.level[k];
    char* row_axis = carve<char>(p, ll.row_axis);
    char* col_axis = carve<char>(p, ll.col_axis);
    auto fill_axis = [&p](char* axis, int64_t cells, int64_t pixels) {
      for (int64_t i = 0; i < cells; ++i) {
        if (p.mode == Mode::kArea) {
          reinterpret_cast<AxisSpan*>(axis)[i] = area_span(i, cells, pixels);
        } else if (p.mode == Mode::kBilinear) {
          reinterpret_cast<BilinearTap*>(axis)[i] = bilinear_tap(i, cells, pixels);
        } else {
          reinterpret_cast<BinaryTap*>(axis)[i] = binary_tap(i, cells, pixels);
        }
      }
    };
    fill_axis(row_axis, level.height, p.mask_height);
    fill_axis(col_axis, level.width, p.mask_width);
    float* table = carve<float>(p, ll.table);
    RowRecord* records = carve<RowRecord>(p, ll.records);
    jobs.push_back(WeightsJob{p, level.height, level.width, row_axis, col_axis, table, slots,
                              records});
    tables.push_back(LevelTables{&level, table, records, carve<int64_t>(p, ll.group_cells),
                                 carve<int64_t>(p, ll.cell_lists), level.height * level.width});
  }
  char* scratch = carve<char>(p, l.scratch);

  // 1. weights: tasks over (level, group, band of cell rows), enough bands per level to keep
  //    every thread busy; a task fills its rows of the group's table mask after mask, while
  //    they are in cache
  LevelTasks weight_tasks;
  weight_tasks.levels = p.num_levels;
  int64_t bands[kMaxLevels], band_rows[kMaxLevels];
  int64_t read = 0;  // mask bytes phase 1 reads
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    bands[k] = std::clamp<int64_t>(ceil_div(4 * threads, groups), 1, level.height);
    band_rows[k] = ceil_div(level.height, bands[k]);
    weight_tasks.first[k + 1] = weight_tasks.first[k] + groups * bands[k];
    read += p.mode == Mode::kArea ? p.mask_height * p.mask_width : 4 * level.height * level.width;
  }
  parallel_for(weight_tasks.total(), threads_for(n * read * element_bytes(M)),
               [&](int64_t task, int thread) {
                 const auto [k, local] = weight_tasks.find(task);
                 const int64_t group = local / bands[k], band = local % bands[k];
                 char* mine = scratch + thread * l.scratch_per_thread;
                 const int64_t end = std::min(p.levels[k].height, (band + 1) * band_rows[k]);
                 const int64_t size = start[group + 1] - start[group];
                 const int64_t stride = group_stride(g, group), width = p.levels[k].width;
                 float* table = jobs[k].table + jobs[k].height * width * group_slots[group];
                 for (int64_t i = band * band_rows[k]; i < end; ++i) {
                   for (int64_t member = start[group]; member < start[group + 1]; ++member) {
                     if (p.mode == Mode::kBinary && member + 1 < start[group + 1]) {
                       prefetch_binary_rows<M>(jobs[k], order[member + 1], i);
                     }
                     weights_row<M>(jobs[k], order[member], i, mine, l);
                   }
                   if (size < stride) {  // the padding slots (in the last quad): 0
                     float* last = table + i * width * stride + stride - 4;
                     for (int64_t j = 0; j < width; ++j) {
                       for (int s = 0; s < 4; ++s) {
                         if (stride - 4 + s >= size) last[j * stride + s] = 0.0f;
                       }
                     }
                   }
                 }
               });

  // 2. cell lists, per (level, group)
  LevelTasks list_tasks;
  list_tasks.levels = p.num_levels;
  int64_t table_bytes = 0;
  for (int k = 0; k < p.num_levels; ++k) {
    list_tasks.first[k + 1] = list_tasks.first[k] + groups;
    table_bytes += group_slots[groups] * tables[k].cells * 4;
  }
  parallel_for(list_tasks.total(), threads_for(table_bytes), [&](int64_t task, int) {
    const auto [k, group] = list_tasks.find(task);
    list_cells(g, tables[k], group);
  });

  // 3. sums: tasks over (level, group, channel block)
  LevelTasks sum_tasks;
  sum_tasks.levels = p.num_levels;
  int64_t blocks[kMaxLevels];
  int64_t features = 0;  // feature bytes phase 3 reads
  for (int k = 0; k < p.num_levels; ++k) {
    blocks[k] = ceil_div(p.levels[k].channels, kBlock);
    sum_tasks.first[k + 1] = sum_tasks.first[k] + groups * blocks[k];
    for (int64_t group = 0; group < groups; ++group) {
      features += tables[k].cell_count[group] * p.levels[k].channels * element_bytes(F);
    }
  }
  parallel_for(sum_tasks.total(), threads_for(features), [&](int64_t task, int thread) {
    const auto [k, local] = sum_tasks.find(task);
    pool_group<F>(p, g, tables[k], local / blocks[k], local % blocks[k],
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

// ---- the entry points (mask_pool.h) --------------------------------------------------------
int64_t cpu_workspace_bytes(const Params& p, int num_threads) {
  return make_layout(p, num_threads).bytes;
}

void run_cpu(const Params& p, int num_threads) {
  if (p.num_masks == 0 || p.out_channels == 0) return;
  switch (p.features_dtype) {
    case Scalar::kFloat32: return run_features<Scalar::kFloat32>(p, num_threads);
    case Scalar::kFloat16: return run_features<Scalar::kFloat16>(p, num_threads);
    case Scalar::kBFloat16: return run_features<Scalar::kBFloat16>(p, num_threads);
    default: return;  // refused by the host (mask_pool_host.cpp)
  }
}

}  // namespace rgpt::mask_pool
