// Mask pooling on CUDA (how it works: README.md in this folder). Three launches on the
// caller's stream for all feature levels together, no allocation (the workspace comes from
// Python), no synchronisation:
//
// 1. weights   grid (level, mask n, cell row i, tile of cell columns). Area: one pass over the
//              mask rows the cell row touches: each thread owns 16 consecutive mask columns,
//              reads them with 16-byte loads and sums them down the rows, weighted by row
//              overlap, in registers (u[q] = sum_p ry(i, p) * m[p, q]). The column sums meet
//              in shared memory, where each cell adds up its span: w[i, j] = sum_q cx(j, q) *
//              u[q]. Bilinear: 4 taps per cell. Binary: 1 where a tap that carries weight is
//              set (integer taps). Writes w [N, H, W] and one total per block, per level.
// 2. pool      grid (level, channel block, slice of cells, group of up to M masks). The
//              group's weights for the slice are staged in shared memory; each thread owns 4
//              channels and accumulates M x 4 sums in registers while streaming the features
//              once (cells no mask of the group weights are skipped). Warps reduce through
//              shuffles and shared memory; each block writes its partial sums [N, C].
// 3. finalize  grid (level, mask, 256 channels): sums the partials and the totals in a fixed
//              order (deterministic), divides, converts to the features' dtype, writes the
//              level's columns of out [N, sum C].
//
// Every kernel reads its per-level arguments from a __grid_constant__ table indexed by the
// block's level (constant-bank loads: no registers held, no local copy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "mask_pool/mask_pool.h"

namespace rgpt::mask_pool {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// weights kernels
constexpr int kChunk = 16;                          // mask columns per thread
constexpr int kPassColumns = kThreads * kChunk;     // mask columns per pass over the rows
constexpr int kMaxTileCells = 2048;                 // cell columns per block
constexpr int kMinTileColumns = 256;                // narrower tiles are not worth a block

// pool kernel
constexpr int kVec = 4;                                 // channels per thread
constexpr int kPoolChannels = 64;                       // channels per block
constexpr int kThreadsPerCell = kPoolChannels / kVec;   // 16
constexpr int kCellLanes = kThreads / kThreadsPerCell;  // cells in flight per block step
constexpr int kStageFloats = 8192;                      // staged weights (32 KB)
constexpr int kInFlight = 4;                            // feature loads in flight per thread
constexpr int kMinSliceCells = 64;

// finalize kernel
constexpr int kFinalizeChannels = kThreads;

// ---- elements ------------------------------------------------------------------------------
// value: the mask element as a weight; set: binary mode's "inside" (> 0 in the element's own
// precision; bool/uint8 nonzero); nan: whether it poisons its cell (binary mode, see finalize).
template <Scalar S>
struct MaskElement;
template <>
struct MaskElement<Scalar::kByte> {
  using T = uint8_t;
  __device__ static float value(T x) { return x != 0 ? 1.0f : 0.0f; }
  __device__ static bool set(T x) { return x != 0; }
  __device__ static bool nan(T) { return false; }
};
template <>
struct MaskElement<Scalar::kFloat32> {
  using T = float;
  __device__ static float value(T x) { return x; }
  __device__ static bool set(T x) { return x > 0.0f; }
  __device__ static bool nan(T x) { return isnan(x); }
};
template <>
struct MaskElement<Scalar::kFloat16> {
  using T = __half;
  __device__ static float value(T x) { return __half2float(x); }
  __device__ static bool set(T x) { return __half2float(x) > 0.0f; }  // exact conversion
  __device__ static bool nan(T x) { return isnan(__half2float(x)); }
};
template <>
struct MaskElement<Scalar::kBFloat16> {
  using T = __nv_bfloat16;
  __device__ static float value(T x) { return __bfloat162float(x); }
  __device__ static bool set(T x) { return __bfloat162float(x) > 0.0f; }  // exact conversion
  __device__ static bool nan(T x) { return isnan(__bfloat162float(x)); }
};
template <>
struct MaskElement<Scalar::kFloat64> {
  using T = double;
  __device__ static float value(T x) { return static_cast<float>(x); }
  __device__ static bool set(T x) { return x > 0.0; }  // in fp64: a tiny positive value counts
  __device__ static bool nan(T x) { return isnan(x); }
};

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ inline T from_float(float x);
template <>
__device__ inline float from_float<float>(float x) { return x; }
template <>
__device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The sum of v over the block, the same value in every thread, added in a fixed order.
// Every thread of the block must call it.
__device__ float block_sum(float v, float* scratch /* [kWarps] */) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// The level of `block` in a grid whose levels own consecutive ranges of blocks, level k
// starting at levels[k].first_block (levels[0].first_block == 0).
template <typename Level>
__device__ inline int level_of(const Level (&levels)[kMaxLevels], int num_levels, int64_t block) {
  int k = 0;
#pragma unroll
  for (int next = 1; next < kMaxLevels; ++next) {
    if (next < num_levels && block >= levels[next].first_block) k = next;
  }
  return k;
}

// ---- 1. weights ----------------------------------------------------------------------------
struct WeightsLevel {
  int64_t height, width;
  int64_t tiles, tile_cells;  // cell columns cut into `tiles` tiles of `tile_cells`
  float* weights;             // [N, H, W]
  float* row_totals;          // [N, H, tiles]
  int64_t first_block;
};

struct WeightsArgs {
  const void* masks;  // [N, Hm, Wm]
  int64_t num_masks, mask_height, mask_width;
  int num_levels;
  WeightsLevel level[kMaxLevels];
};

struct WeightsBlock {
  int k;                 // level
  int64_t n, i, j0, j1;  // mask, cell row, cell columns [j0, j1)
};

__device__ inline WeightsBlock weights_block(const WeightsArgs& a) {
  WeightsBlock b;
  b.k = level_of(a.level, a.num_levels, blockIdx.x);
  const WeightsLevel& level = a.level[b.k];
  const int64_t block = blockIdx.x - level.first_block;
  const int64_t tile = block % level.tiles;
  b.i = (block / level.tiles) % level.height;
  b.n = block / (level.tiles * level.height);
  b.j0 = tile * level.tile_cells;
  b.j1 = min(level.width, b.j0 + level.tile_cells);
  return b;
}

// Elements [q, q + kChunk) of a mask row as floats; those at or past `end` read as 0 (and are
// not read). 16-byte loads when the chunk is whole and aligned; single elements otherwise.
template <Scalar S>
__device__ inline void load_chunk(const typename MaskElement<S>::T* row, int64_t q, int64_t end,
                                  float (&v)[kChunk]) {
  using T = typename MaskElement<S>::T;
  constexpr int kLoads = kChunk * static_cast<int>(sizeof(T)) / 16;
  const T* src = row + q;
  if (q + kChunk <= end && reinterpret_cast<std::uintptr_t>(src) % 16 == 0) {
    alignas(16) T raw[kChunk];
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      reinterpret_cast<uint4*>(raw)[k] = __ldg(reinterpret_cast<const uint4*>(src) + k);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) v[k] = MaskElement<S>::value(raw[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) v[k] = q + k < end ? MaskElement<S>::value(src[k]) : 0.0f;
  }
}

template <Scalar S>
__global__ void __launch_bounds__(kThreads)
    area_weights_kernel(const __grid_constant__ WeightsArgs a) {
  using T = typename MaskElement<S>::T;
  __shared__ float column_sums[kPassColumns];  // [groups][pass columns]
  __shared__ float cell_sums[kMaxTileCells];
  __shared__ float warp_scratch[kWarps];
  const int tid = threadIdx.x;
  const WeightsBlock b = weights_block(a);
  const WeightsLevel& level = a.level[b.k];
  const int cells = static_cast<int>(b.j1 - b.j0);
  const AxisSpan rows = area_span(b.i, level.height, a.mask_height);
  // the mask columns the tile touches, from a 16-element boundary of the row
  const int64_t q_first = area_span(b.j0, level.width, a.mask_width).lo;
  const int64_t q_end = area_span(b.j1 - 1, level.width, a.mask_width).hi + 1;
  const int64_t q_begin = q_first - q_first % kChunk;
  const T* mask = static_cast<const T*>(a.masks) + b.n * a.mask_height * a.mask_width;

  for (int c = tid; c < cells; c += kThreads) cell_sums[c] = 0.0f;
  for (int64_t pass = q_begin; pass < q_end; pass += kPassColumns) {
    const int64_t pass_end = min(q_end, pass + kPassColumns);
    const int chunks = static_cast<int>((pass_end - pass + kChunk - 1) / kChunk);
    const int groups = kThreads / chunks;  // thread groups splitting the rows: >= 1
    const int chunk = tid % chunks, group = tid / chunks;
    const int64_t q = pass + static_cast<int64_t>(chunk) * kChunk;
    // down the rows: u[k] = sum_p ry(i, p) * m[p, q + k], ry in units of 1/H of a pixel
    float u[kChunk] = {};
    if (group < groups) {
#pragma unroll 4
      for (int64_t p = rows.lo + group; p <= rows.hi; p += groups) {  // 4 rows' loads in flight
        const float ry = static_cast<float>(
            p == rows.lo ? rows.first : (p == rows.hi ? rows.last : level.height));
        float v[kChunk];
        load_chunk<S>(mask + p * a.mask_width, q, pass_end, v);
#pragma unroll
        for (int k = 0; k < kChunk; ++k) u[k] = fmaf(ry, v[k], u[k]);
      }
    }
    __syncthreads();  // every cell has read the previous pass's column sums
    if (group < groups) {
#pragma unroll
      for (int k = 0; k < kChunk; ++k) column_sums[(group * chunks + chunk) * kChunk + k] = u[k];
    }
    __syncthreads();
    // across: each cell adds the columns of this pass it overlaps, cx in units of 1/W
    const int span = chunks * kChunk;
    for (int c = tid; c < cells; c += kThreads) {
      const AxisSpan cols = area_span(b.j0 + c, level.width, a.mask_width);
      const int64_t lo = max(cols.lo, pass), hi = min(cols.hi, pass_end - 1);
      float sum = 0.0f;
      for (int64_t col = lo; col <= hi; ++col) {
        const float cx = static_cast<float>(
            col == cols.lo ? cols.first : (col == cols.hi ? cols.last : level.width));
        const int local = static_cast<int>(col - pass);
        float down = 0.0f;
        for (int g = 0; g < groups; ++g) down += column_sums[g * span + local];
        sum = fmaf(cx, down, sum);
      }
      cell_sums[c] += sum;  // cell c always belongs to this thread: no race across passes
    }
  }
  __syncthreads();
  float total = 0.0f;
  float* out = level.weights + (b.n * level.height + b.i) * level.width + b.j0;
  for (int c = tid; c < cells; c += kThreads) {
    out[c] = cell_sums[c];
    total += cell_sums[c];
  }
  total = block_sum(total, warp_scratch);
  if (tid == 0) {
    level.row_totals[(b.n * level.height + b.i) * level.tiles + b.j0 / level.tile_cells] = total;
  }
}

// F.interpolate(bilinear, align_corners=False): 4 taps per cell, computed in fp64 like torch.
template <Scalar S>
__global__ void __launch_bounds__(kThreads)
    bilinear_weights_kernel(const __grid_constant__ WeightsArgs a) {
  using T = typename MaskElement<S>::T;
  __shared__ float warp_scratch[kWarps];
  const WeightsBlock b = weights_block(a);
  const WeightsLevel& level = a.level[b.k];
  const T* mask = static_cast<const T*>(a.masks) + b.n * a.mask_height * a.mask_width;
  const BilinearTap ty = bilinear_tap(b.i, level.height, a.mask_height);
  const T* top = mask + ty.lo * a.mask_width;
  const T* bottom = mask + ty.hi * a.mask_width;
  float* out = level.weights + (b.n * level.height + b.i) * level.width;
  float total = 0.0f;
  for (int64_t j = b.j0 + threadIdx.x; j < b.j1; j += kThreads) {
    const BilinearTap tx = bilinear_tap(j, level.width, a.mask_width);
    auto at = [&](const T* row, int64_t x) -> double {
      return static_cast<double>(MaskElement<S>::value(row[x]));
    };
    const double upper = (1.0 - tx.frac) * at(top, tx.lo) + tx.frac * at(top, tx.hi);
    const double lower = (1.0 - tx.frac) * at(bottom, tx.lo) + tx.frac * at(bottom, tx.hi);
    const float w = static_cast<float>((1.0 - ty.frac) * upper + ty.frac * lower);
    out[j] = w;
    total += w;
  }
  total = block_sum(total, warp_scratch);
  if (threadIdx.x == 0) {
    level.row_totals[(b.n * level.height + b.i) * level.tiles + b.j0 / level.tile_cells] = total;
  }
}

// Osprey's binary weights: 1 where one of the cell's taps that carries weight (binary_tap,
// integer arithmetic, exactly the CPU's and the reference's) is set, else 0. A nan among the
// taps makes the weight nan: a nan mask poisons its row, as in the other modes.
template <Scalar S>
__global__ void __launch_bounds__(kThreads)
    binary_weights_kernel(const __grid_constant__ WeightsArgs a) {
  using E = MaskElement<S>;
  using T = typename E::T;
  __shared__ float warp_scratch[kWarps];
  const WeightsBlock b = weights_block(a);
  const WeightsLevel& level = a.level[b.k];
  const T* mask = static_cast<const T*>(a.masks) + b.n * a.mask_height * a.mask_width;
  const BinaryTap ty = binary_tap(b.i, level.height, a.mask_height);
  const T* top = mask + ty.lo * a.mask_width;
  const T* bottom = mask + ty.hi * a.mask_width;
  float* out = level.weights + (b.n * level.height + b.i) * level.width;
  float total = 0.0f;
  for (int64_t j = b.j0 + threadIdx.x; j < b.j1; j += kThreads) {
    const BinaryTap tx = binary_tap(j, level.width, a.mask_width);
    const T taps[4] = {__ldg(top + tx.lo), __ldg(top + tx.hi), __ldg(bottom + tx.lo),
                       __ldg(bottom + tx.hi)};
    bool set = false, poisoned = false;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      set |= E::set(taps[t]);
      poisoned |= E::nan(taps[t]);
    }
    const float w = poisoned ? __int_as_float(0x7fc00000) : (set ? 1.0f : 0.0f);
    out[j] = w;
    total += w;
  }
  total = block_sum(total, warp_scratch);
  if (threadIdx.x == 0) {
    level.row_totals[(b.n * level.height + b.i) * level.tiles + b.j0 / level.tile_cells] = total;
  }
}

// ---- 2. pool -------------------------------------------------------------------------------
struct PoolLevel {
  const void* features;                 // [B, cells, C]
  int64_t cells, channels;
  const float* weights;                 // [N, cells]
  int64_t slices, slice_cells;          // the level's cells cut into slices
  float* partial;                       // [slices, N, C]
  int64_t first_block;
};

struct PoolArgs {
  int64_t batch;
  const int64_t* batch_index;  // [N]
  int64_t num_masks;
  int64_t groups;  // per level: grid (channel block, slice, group), group fastest
  int num_levels;
  PoolLevel level[kMaxLevels];
};

// Four consecutive elements in one load: 16 bytes of fp32, 8 of fp16/bf16.
template <typename T>
struct Four;
template <>
struct Four<float> {
  using Raw = float4;
};
template <>
struct Four<__half> {
  using Raw = uint2;
};
template <>
struct Four<__nv_bfloat16> {
  using Raw = uint2;
};

template <typename T, bool kVectorLoads>
__device__ inline void load_four(const T* src, int64_t left, T (&raw)[kVec]) {
  if constexpr (kVectorLoads) {  // aligned, and all four inside the row (C % 4 == 0)
    *reinterpret_cast<typename Four<T>::Raw*>(raw) =
        __ldg(reinterpret_cast<const typename Four<T>::Raw*>(src));
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) raw[v] = v < left ? src[v] : from_float<T>(0.0f);
  }
}

template <typename T, int M, bool kVectorLoads>
__global__ void __launch_bounds__(kThreads, 2) pool_kernel(const __grid_constant__ PoolArgs a) {
  constexpr int kStage = kStageFloats / M;  // cells staged at once
  static_assert(kWarps * M * kPoolChannels <= kStageFloats, "the reduction reuses the stage");
  __shared__ __align__(16) float stage_weights[kStageFloats];  // [kStage][M], then reduction
  __shared__ uint8_t any_weight[kStage];
  __shared__ int64_t image[M];

  const int tid = threadIdx.x;
  const PoolLevel& level = a.level[level_of(a.level, a.num_levels, blockIdx.x)];
  int64_t block = blockIdx.x - level.first_block;
  const int64_t group = block % a.groups;
  block /= a.groups;
  const int64_t slice = block % level.slices;
  const int64_t channel_block = block / level.slices;
  const int64_t n0 = group * M;
  const int count = static_cast<int>(min(static_cast<int64_t>(M), a.num_masks - n0));
  if (tid < M) {
    int64_t b = -1;  // no mask, or an image index outside [0, B): pools nothing
    if (tid < count) {
      b = a.batch_index[n0 + tid];
      if (b < 0 || b >= a.batch) b = -1;
    }
    image[tid] = b;
  }
  __syncthreads();

  const int lane = tid / kThreadsPerCell, part = tid % kThreadsPerCell;
  const int64_t channels = level.channels;
  const int64_t c = channel_block * kPoolChannels + part * kVec;
  const bool active = c < channels;
  const int64_t cell_begin = slice * level.slice_cells;
  const int64_t cell_end = min(level.cells, cell_begin + level.slice_cells);
  float acc[M][kVec] = {};

  // one sweep per distinct image among the group's masks (usually one)
  for (int first = 0; first < M; ++first) {
    const int64_t b = image[first];
    bool seen = b < 0;
    for (int m = 0; m < first; ++m) seen |= image[m] == b;
    if (seen) continue;
    const T* grid = static_cast<const T*>(level.features) + b * level.cells * channels;
    for (int64_t stage = cell_begin; stage < cell_end; stage += kStage) {
      const int staged = static_cast<int>(min(static_cast<int64_t>(kStage), cell_end - stage));
      // the weights of the masks on image b (0 for the others); which cells any mask weights
      for (int k = tid; k < staged; k += kThreads) {
        bool any = false;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float w = image[m] == b ? level.weights[(n0 + m) * level.cells + stage + k] : 0.0f;
          stage_weights[k * M + m] = w;
          any |= w != 0.0f;  // nan counts: a nan mask must poison its row
        }
        any_weight[k] = any;
      }
      __syncthreads();
      if (active) {
        for (int k0 = lane; k0 < staged; k0 += kCellLanes * kInFlight) {
          alignas(16) T raw[kInFlight][kVec];  // each row 8 or 16 bytes: aligned for load_four
          bool use[kInFlight];
#pragma unroll
          for (int f = 0; f < kInFlight; ++f) {
            const int k = k0 + f * kCellLanes;
            use[f] = k < staged && any_weight[k];
            if (use[f]) {
              load_four<T, kVectorLoads>(grid + (stage + k) * channels + c, channels - c, raw[f]);
            }
          }
#pragma unroll
          for (int f = 0; f < kInFlight; ++f) {
            if (!use[f]) continue;
            const float* w = stage_weights + (k0 + f * kCellLanes) * M;
            float x[kVec];
#pragma unroll
            for (int v = 0; v < kVec; ++v) x[v] = to_float(raw[f][v]);
#pragma unroll
            for (int m = 0; m < M; ++m) {
              const float wm = w[m];
#pragma unroll
              for (int v = 0; v < kVec; ++v) acc[m][v] = fmaf(wm, x[v], acc[m][v]);
            }
          }
        }
      }
      __syncthreads();
    }
  }

  // lanes of a warp holding the same channels are kThreadsPerCell apart
#pragma unroll
  for (int offset = kThreadsPerCell; offset < 32; offset *= 2) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[m][v] += __shfl_xor_sync(0xffffffffu, acc[m][v], offset);
    }
  }
  float* reduce = stage_weights;  // [kWarps][M][kPoolChannels]; the stage is no longer read
  const int warp = tid / 32;
  if (tid % 32 < kThreadsPerCell) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) reduce[(warp * M + m) * kPoolChannels + part * kVec + v] = acc[m][v];
    }
  }
  __syncthreads();
  for (int o = tid; o < M * kPoolChannels; o += kThreads) {
    const int m = o / kPoolChannels, local = o % kPoolChannels;
    const int64_t channel = channel_block * kPoolChannels + local;
    if (m >= count || channel >= channels) continue;
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += reduce[(w * M + m) * kPoolChannels + local];
    level.partial[(slice * a.num_masks + n0 + m) * channels + channel] = sum;
  }
}

// ---- 3. finalize ---------------------------------------------------------------------------
struct FinalizeLevel {
  const float* partial;     // [slices, N, C]
  const float* row_totals;  // [N, totals_per_mask]
  int64_t channels, slices, totals_per_mask, channel_blocks, out_column;
  int64_t first_block;
};

struct FinalizeArgs {
  const int64_t* batch_index;
  int64_t num_masks, batch, out_channels;
  bool binary;  // Osprey's sum / (count + 1e-8), else sum / total (0 when total is 0)
  void* out;    // [N, out_channels]
  int num_levels;
  FinalizeLevel level[kMaxLevels];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const __grid_constant__ FinalizeArgs a) {
  __shared__ float warp_scratch[kWarps];
  const FinalizeLevel& level = a.level[level_of(a.level, a.num_levels, blockIdx.x)];
  const int64_t block = blockIdx.x - level.first_block;
  const int64_t n = block / level.channel_blocks;
  const int64_t channel_block = block % level.channel_blocks;
  float partial_total = 0.0f;
  for (int64_t k = threadIdx.x; k < level.totals_per_mask; k += kThreads) {
    partial_total += level.row_totals[n * level.totals_per_mask + k];
  }
  const float total = block_sum(partial_total, warp_scratch);
  const int64_t c = channel_block * kFinalizeChannels + threadIdx.x;
  if (c >= level.channels) return;
  float sum = 0.0f;
  for (int64_t s = 0; s < level.slices; ++s) {
    sum += level.partial[(s * a.num_masks + n) * level.channels + c];
  }
  const int64_t b = a.batch_index[n];
  float mean;
  if (b < 0 || b >= a.batch || isnan(total)) {
    mean = __int_as_float(0x7fc00000);  // nan: what the checks skipped in graph capture caught
  } else if (a.binary) {
    // count + 1e-8f == count for count >= 1; an empty mask gives 0 / 1e-8 = 0
    mean = __fdiv_rn(sum, total + kBinaryEpsilon);
  } else {
    mean = total > 0.0f ? __fdiv_rn(sum, total) : 0.0f;  // an empty mask gives zeros
  }
  static_cast<T*>(a.out)[n * a.out_channels + level.out_column + c] = from_float<T>(mean);
}

// ---- host: plan and launch -----------------------------------------------------------------
[[noreturn]] void cuda_fail(cudaError_t error, const char* what) {
  throw std::runtime_error(std::string("mask_pool: ") + what + ": " + cudaGetErrorString(error));
}

int multiprocessors(int device) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int count = 0;
  const cudaError_t error = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) cuda_fail(error, "reading the multiprocessor count");
  cache[device] = count;
  return count;
}

// Resident blocks per multiprocessor of a kernel on the current device.
int resident_blocks(int device, const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  const cudaError_t error =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0);
  if (error != cudaSuccess) cuda_fail(error, "reading the occupancy");
  cache[key] = std::max(blocks, 1);
  return cache[key];
}

using PoolKernel = void (*)(PoolArgs);

template <typename T>
PoolKernel pool_kernel_for(int masks_per_group, bool vector_loads) {
  switch (masks_per_group) {
    case 1: return vector_loads ? pool_kernel<T, 1, true> : pool_kernel<T, 1, false>;
    case 4: return vector_loads ? pool_kernel<T, 4, true> : pool_kernel<T, 4, false>;
    default: return vector_loads ? pool_kernel<T, 16, true> : pool_kernel<T, 16, false>;
  }
}

PoolKernel pool_kernel_for(Scalar dtype, int masks_per_group, bool vector_loads) {
  switch (dtype) {
    case Scalar::kFloat16: return pool_kernel_for<__half>(masks_per_group, vector_loads);
    case Scalar::kBFloat16: return pool_kernel_for<__nv_bfloat16>(masks_per_group, vector_loads);
    default: return pool_kernel_for<float>(masks_per_group, vector_loads);
  }
}

using WeightsKernel = void (*)(WeightsArgs);

template <Scalar S>
WeightsKernel weights_kernel_for(Mode mode) {
  switch (mode) {
    case Mode::kArea: return area_weights_kernel<S>;
    case Mode::kBilinear: return bilinear_weights_kernel<S>;
    default: return binary_weights_kernel<S>;
  }
}

WeightsKernel weights_kernel_for(Scalar dtype, Mode mode) {
  switch (dtype) {
    case Scalar::kByte: return weights_kernel_for<Scalar::kByte>(mode);
    case Scalar::kFloat16: return weights_kernel_for<Scalar::kFloat16>(mode);
    case Scalar::kBFloat16: return weights_kernel_for<Scalar::kBFloat16>(mode);
    case Scalar::kFloat64: return weights_kernel_for<Scalar::kFloat64>(mode);
    default: return weights_kernel_for<Scalar::kFloat32>(mode);
  }
}

using FinalizeKernel = void (*)(FinalizeArgs);

FinalizeKernel finalize_kernel_for(Scalar dtype) {
  switch (dtype) {
    case Scalar::kFloat16: return finalize_kernel<__half>;
    case Scalar::kBFloat16: return finalize_kernel<__nv_bfloat16>;
    default: return finalize_kernel<float>;
  }
}

constexpr int64_t kMaxGrid = 0x7fffffff;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align_up(int64_t x) { return ceil_div(x, 256) * 256; }

struct LevelPlan {
  int64_t tiles = 1, tile_cells = 1;                          // weights grid
  int64_t slices = 1, slice_cells = 1, channel_blocks = 0;    // pool grid
  int64_t finalize_blocks = 0;                                // finalize grid: per mask
  int64_t weights = 0, totals = 0, partial = 0;               // workspace offsets
};

struct Plan {
  int masks_per_group = 1;
  int64_t groups = 0;
  LevelPlan level[kMaxLevels];
  int64_t weight_blocks = 0, pool_blocks = 0, finalize_blocks = 0;  // over all levels
  int64_t bytes = 0;
};

bool vector_loads_for(const Params& p) {
  const int64_t element = p.features_dtype == Scalar::kFloat32 ? 4 : 2;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    if (level.channels % kVec != 0 ||
        reinterpret_cast<std::uintptr_t>(level.features) % (kVec * element) != 0) {
      return false;
    }
  }
  return true;
}

Plan make_plan(const Params& p, int device) {
  Plan plan;
  const int64_t n = p.num_masks;
  if (n == 0 || p.out_channels == 0) return plan;
  const int sms = multiprocessors(device);

  // pool: one wave of blocks over (level, channel block, slice, group) where the work allows,
  // the wave shared among the levels in proportion to their feature elements
  plan.masks_per_group = n <= 1 ? 1 : (n <= 4 ? 4 : 16);
  plan.groups = ceil_div(n, plan.masks_per_group);
  const PoolKernel pool = pool_kernel_for(p.features_dtype, plan.masks_per_group, true);
  const int slots = sms * resident_blocks(device, reinterpret_cast<const void*>(pool));
  auto elements_of = [](const Level& level) {  // feature elements of one image
    return static_cast<double>(level.height * level.width) * static_cast<double>(level.channels);
  };
  double elements = 0;
  for (int k = 0; k < p.num_levels; ++k) elements += elements_of(p.levels[k]);

  int64_t end = 0;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    LevelPlan& lp = plan.level[k];
    const int64_t cells = level.height * level.width;
    // weights: enough blocks to fill the device, tiles no narrower than kMinTileColumns columns
    lp.tiles = ceil_div(level.width, kMaxTileCells);
    while (n * level.height * lp.tiles < 4 * sms && lp.tiles * 2 <= level.width &&
           ceil_div(level.width, lp.tiles * 2) * p.mask_width >= kMinTileColumns * level.width) {
      lp.tiles *= 2;
    }
    lp.tile_cells = ceil_div(level.width, lp.tiles);
    lp.tiles = ceil_div(level.width, lp.tile_cells);

    lp.channel_blocks = ceil_div(level.channels, kPoolChannels);
    const int64_t base = plan.groups * lp.channel_blocks;
    const double share = elements > 0 ? elements_of(level) / elements : 0.0;
    const int64_t level_slots = static_cast<int64_t>(slots * share);
    lp.slices = std::max<int64_t>(1, base > 0 ? level_slots / base : 1);
    lp.slices = std::min(lp.slices, ceil_div(cells, kMinSliceCells));
    lp.slice_cells = ceil_div(cells, lp.slices);
    lp.slices = ceil_div(cells, lp.slice_cells);
    lp.finalize_blocks = ceil_div(level.channels, kFinalizeChannels);

    // a level without channels still gets its (empty) grids: nothing is written for it
    plan.weight_blocks += n * level.height * lp.tiles;
    plan.pool_blocks += base * lp.slices;
    plan.finalize_blocks += n * lp.finalize_blocks;
    if (plan.weight_blocks > kMaxGrid || plan.pool_blocks > kMaxGrid ||
        plan.finalize_blocks > kMaxGrid) {
      throw std::invalid_argument("mask_pool: too many masks for one launch; pool them in parts");
    }
    lp.weights = end;
    lp.totals = align_up(lp.weights + n * cells * 4);
    lp.partial = align_up(lp.totals + n * level.height * lp.tiles * 4);
    end = align_up(lp.partial + lp.slices * n * level.channels * 4);
  }
  plan.bytes = end;
  return plan;
}

}  // namespace

int64_t cuda_workspace_bytes(const Params& p, int device) { return make_plan(p, device).bytes; }

void run_cuda(const Params& p, int device, void* stream_handle) {
  const Plan plan = make_plan(p, device);
  if (plan.bytes == 0) return;  // no mask or no channel: nothing to write
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  char* workspace = static_cast<char*>(p.workspace);

  WeightsArgs w{};
  PoolArgs pool{};
  FinalizeArgs fin{};
  w.masks = p.masks;
  w.num_masks = p.num_masks;
  w.mask_height = p.mask_height;
  w.mask_width = p.mask_width;
  pool.batch = p.batch;
  pool.batch_index = p.batch_index;
  pool.num_masks = p.num_masks;
  pool.groups = plan.groups;
  fin.batch_index = p.batch_index;
  fin.num_masks = p.num_masks;
  fin.batch = p.batch;
  fin.out_channels = p.out_channels;
  fin.binary = p.mode == Mode::kBinary;
  fin.out = p.out;
  w.num_levels = pool.num_levels = fin.num_levels = p.num_levels;
  int64_t weight_block = 0, pool_block = 0, finalize_block = 0;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    const LevelPlan& lp = plan.level[k];
    float* weights = reinterpret_cast<float*>(workspace + lp.weights);
    float* totals = reinterpret_cast<float*>(workspace + lp.totals);
    float* partial = reinterpret_cast<float*>(workspace + lp.partial);
    const int64_t cells = level.height * level.width;
    w.level[k] = WeightsLevel{level.height, level.width, lp.tiles, lp.tile_cells, weights, totals,
                              weight_block};
    pool.level[k] = PoolLevel{level.features, cells, level.channels, weights, lp.slices,
                              lp.slice_cells, partial, pool_block};
    fin.level[k] = FinalizeLevel{partial,        totals,     level.channels, lp.slices,
                                 level.height * lp.tiles, lp.finalize_blocks, level.out_column,
                                 finalize_block};
    weight_block += p.num_masks * level.height * lp.tiles;
    pool_block += plan.groups * lp.channel_blocks * lp.slices;
    finalize_block += p.num_masks * lp.finalize_blocks;
  }

  weights_kernel_for(p.masks_dtype, p.mode)<<<static_cast<unsigned>(plan.weight_blocks), kThreads,
                                              0, stream>>>(w);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) cuda_fail(error, "launching the weights kernel");

  if (plan.pool_blocks > 0) {  // 0 when no level has a channel
    pool_kernel_for(p.features_dtype, plan.masks_per_group, vector_loads_for(p))<<<
        static_cast<unsigned>(plan.pool_blocks), kThreads, 0, stream>>>(pool);
    error = cudaGetLastError();
    if (error != cudaSuccess) cuda_fail(error, "launching the pool kernel");
  }

  if (plan.finalize_blocks > 0) {
    finalize_kernel_for(p.features_dtype)<<<static_cast<unsigned>(plan.finalize_blocks), kThreads,
                                            0, stream>>>(fin);
    error = cudaGetLastError();
    if (error != cudaSuccess) cuda_fail(error, "launching the finalize kernel");
  }
}

}  // namespace rgpt::mask_pool
