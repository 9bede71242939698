// Mask pooling kernels: one vector per region and feature level, the mask-weighted mean of
// each level's feature grid (DESIGN.md §1). The kernels see raw pointers and this params
// struct, never a Tensor; mask_pool_host.cpp validates what Python passes and dispatches to
// the CPU or CUDA path.
//
//   levels[l].features [B, H_l, W_l, C_l] float32/float16/bfloat16 (channels last, contiguous),
//                      every level of one dtype and one batch B
//   masks       [N, Hm, Wm] bool/uint8 (nonzero = inside) or float32/float16/bfloat16/float64
//   batch_index [N] int64, the image of each mask (validated: every value in [0, B))
//   out         [N, sum_l C_l] in the features' dtype: level l in columns
//               [out_column_l, out_column_l + C_l); sum(w * f) / sum(w), accumulated in fp32
//               (binary mode: sum(f) / (count + 1e-8), Osprey's form)
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define RGPT_HOST_DEVICE __host__ __device__
#else
#define RGPT_HOST_DEVICE
#endif

namespace rgpt::mask_pool {

enum class Scalar { kFloat32, kFloat16, kBFloat16, kFloat64, kByte };  // kByte: bool or uint8
enum class Mode { kArea, kBilinear, kBinary };

// Levels pooled in one call: Osprey's four (ConvNeXt strides 4, 8, 16, 32); RegionGPT uses one.
constexpr int kMaxLevels = 4;

// Osprey's denominator: sum / (count + 1e-8). In fp32, count + 1e-8f == count for count >= 1
// (1e-8 is below half an ulp of 1), and an empty mask gives 0 / 1e-8 = 0.
constexpr float kBinaryEpsilon = 1e-8f;

struct Level {
  const void* features = nullptr;  // [B, H, W, C]
  int64_t height = 0, width = 0, channels = 0;
  int64_t out_column = 0;  // where this level's C columns start in a row of out
};

struct Params {
  Scalar features_dtype = Scalar::kFloat32;
  int64_t batch = 0;
  int num_levels = 0;
  Level levels[kMaxLevels];

  const void* masks = nullptr;  // [N, Hm, Wm]
  Scalar masks_dtype = Scalar::kByte;
  int64_t num_masks = 0, mask_height = 0, mask_width = 0;

  const int64_t* batch_index = nullptr;  // [N], on the kernel's device
  Mode mode = Mode::kArea;

  void* out = nullptr;  // [N, out_channels], features_dtype
  int64_t out_channels = 0;  // sum of the levels' C

  // Scratch memory allocated by the caller (the kernels never allocate): *_workspace_bytes.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Per-axis area spans. Along an axis of `cells` cells over `pixels` pixels, measured in units
// of 1/cells of a pixel, pixel p spans [p*cells, (p+1)*cells) and cell i spans
// [i*pixels, (i+1)*pixels): every overlap is an integer. Cell i touches pixels lo..hi
// (inclusive); pixel lo overlaps it by `first`, pixel hi by `last`, and every pixel strictly
// between them lies wholly inside (overlap `cells`). When lo == hi, `first` is the overlap
// (= pixels) and `last` is 0.
struct AxisSpan {
  int64_t lo, hi, first, last;
};

RGPT_HOST_DEVICE inline AxisSpan area_span(int64_t cell, int64_t cells, int64_t pixels) {
  const int64_t begin = cell * pixels, end = begin + pixels;
  AxisSpan s;
  s.lo = begin / cells;
  s.hi = (end - 1) / cells;
  if (s.lo == s.hi) {
    s.first = pixels;
    s.last = 0;
  } else {
    s.first = (s.lo + 1) * cells - begin;
    s.last = end - s.hi * cells;
  }
  return s;
}

// Bilinear taps of output index `cell` (F.interpolate, align_corners=False), in the order
// and precision torch computes them for float64 input.
struct BilinearTap {
  int64_t lo, hi;  // the two source pixels (equal at the far edge)
  double frac;     // weight of `hi`; `lo` gets 1 - frac
};

RGPT_HOST_DEVICE inline BilinearTap bilinear_tap(int64_t cell, int64_t cells, int64_t pixels) {
  const double scale = static_cast<double>(pixels) / static_cast<double>(cells);
#ifdef __CUDA_ARCH__
  // round the product before the subtraction, as the host does (nvcc would fuse them)
  double source = __dmul_rn(scale, static_cast<double>(cell) + 0.5) - 0.5;
#else
  double source = scale * (static_cast<double>(cell) + 0.5) - 0.5;
#endif
  if (source < 0) source = 0;
  BilinearTap t;
  t.lo = static_cast<int64_t>(source);
  t.hi = t.lo < pixels - 1 ? t.lo + 1 : t.lo;
  t.frac = source - static_cast<double>(t.lo);
  return t;
}

// Binary mode (Osprey): cell i is selected when the bilinear resampling of the mask
// (F.interpolate, align_corners=False) is > 0 there. For masks without negative values that
// holds exactly when one of the cell's taps *with nonzero weight* lands on a set pixel (the
// interpolated value is a sum of non-negative terms: no cancellation, no rounding can make a
// positive term vanish). So only the taps are needed, and they are computed here in integer
// arithmetic: the source coordinate of cell i is (pixels * (2i + 1) - cells) / (2 * cells),
// clamped at 0; `lo` is its floor; `hi` = lo + 1 carries weight iff the division leaves a
// remainder (and lo is not the last pixel). Exact for every size: no float is involved.
struct BinaryTap {
  int64_t lo, hi;  // hi == lo when a single pixel carries the cell's weight
};

RGPT_HOST_DEVICE inline BinaryTap binary_tap(int64_t cell, int64_t cells, int64_t pixels) {
  const int64_t numerator = pixels * (2 * cell + 1) - cells, denominator = 2 * cells;
  BinaryTap t;
  if (numerator <= 0) {  // the coordinate is clamped at 0: pixel 0 alone
    t.lo = t.hi = 0;
    return t;
  }
  t.lo = numerator / denominator;  // < pixels: the coordinate is below pixels - 1/2
  t.hi = numerator % denominator != 0 && t.lo < pixels - 1 ? t.lo + 1 : t.lo;
  return t;
}

// CPU: threads over (level, mask, band of cell rows) for the weights, then over (level, masks
// of one image, channel block) for the weighted sums. `num_threads` >= 1 is respected exactly
// (at most that many threads run, fewer for small inputs).
int64_t cpu_workspace_bytes(const Params& p, int num_threads);
void run_cpu(const Params& p, int num_threads);

#ifdef RGPT_WITH_CUDA
// CUDA: three launches on `stream` (a cudaStream_t) for all levels together, no allocation,
// no synchronisation. `device` is the current CUDA device (the caller sets it); it sizes the
// grid.
int64_t cuda_workspace_bytes(const Params& p, int device);
void run_cuda(const Params& p, int device, void* stream);
#endif

}  // namespace rgpt::mask_pool
