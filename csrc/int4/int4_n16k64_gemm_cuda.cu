// W4A16 GEMM on CUDA for prefill row counts (9 ≤ M ≤ 64 per block; more rows run as more blocks),
// INT4 layout n16k64 (int4_n16k64.h, README.md): the packed tiles are read straight into
// mma.m16n8k16 A fragments, with no dequantized copy of W in memory.
//
//   out[m, n] = Σ_groups s[n, γ] · (Σ_{k in γ} (q − z)[n, k] · x[m, k]) + bias[n]
//
// (q − z) is exact in fp16/bf16; the MMA multiplies it by x exactly and sums in fp32 per group;
// each group's 16 × M sums are then scaled by the fp16 scales in fp32 and added up (the GEMV's
// arithmetic, int4_n16k64_cuda.cu).
//
// A block (8 warps) owns 8 tiles = 128 output rows, up to 64 rows of x (blockIdx.z takes the next
// 64) and a range of K (blockIdx.y: split-K, for N too small to fill the GPU). A stage is kSteps
// steps of 64 inputs (2 when G % 128 == 0: one group per stage; else 1); a cp.async pipeline of
// kStages stages brings into shared memory, per step:
//   - x: 8·MB rows × 64 inputs (MB = ceil(rows / 8) n8 blocks, rows ≤ 64), 16-byte chunks swizzled
//     so that the B-fragment reads below are free of bank conflicts; rows past M and inputs past
//     K are zeros;
//   - each warp's 512-byte chunk of codes (its tile's step: 32 lanes × 16 bytes).
// The scales and zeros of a lane's row pair (4 + 2 bytes per group) are read into registers one
// stage ahead. Warp w then does the GEMV's dequantization of its chunk (A fragments of four 16×16
// tiles) and, per A fragment, MB MMAs: B fragment of m-block b = x rows 8b + g, inputs 8t..8t+7 of
// the half step (one 16-byte shared load gives the B fragments of two MMAs, since the layout orders
// k that way). So each code is dequantized once per block and used by up to 64 rows of x.
// At each group's end (and at the end of the block's K range) the group sums c are scaled into the
// totals; at the end the totals go through shared memory to coalesced 16-byte row stores of out
// (+ bias), or, with split-K, to fp32 partials [splits, M, N] of which the last block of the tile
// column (an atomic counter, reset after use) adds all in split order: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "int4/int4_n16k64_mma.cuh"

namespace rgpt {
namespace {

using namespace n16k64_cuda;

constexpr int kWarps = kN16K64GemmWarps;  // tiles per block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kN16K64GemmBlockRows;  // rows of x per block (8 n8 blocks)
constexpr int kStages = 3;                   // stages: kStages − 1 in flight + the one consumed

// --- cp.async ------------------------------------------------------------------------------------
__device__ __forceinline__ void copy16(void* shared, const void* global, bool live) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(global),
               "r"(live ? 16 : 0));  // src-size 0: 16 zero bytes, nothing read
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

// the 16 bits of an fp16 / bf16 value
template <typename T>
__device__ __forceinline__ uint16_t bits16(T value) {
  uint16_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}

// --- shared memory of one pipeline stage -----------------------------------------------------------
template <int MB, int kSteps>
struct StageMemory {
  uint4 x[kSteps][MB * 8][8];       // [step][row][16-byte chunk c ^ 4 (row & 1)]: inputs 8c..8c+7
  uint4 codes[kSteps][kWarps][32];  // [step][warp][lane]
};

// The swizzle: chunk c of row r sits at c ^ 4 (r & 1), so that rows 2p and 2p + 1 of a quarter warp's
// 16-byte reads (lanes 8p..8p+7: rows g = 2p, 2p + 1 × chunks t or 4 + t) use opposite bank halves.
__device__ __forceinline__ int swizzle(int row, int chunk) { return chunk ^ ((row & 1) << 2); }

struct GemmArgs {
  const uint4* qweight;     // [T, S, 32] chunks
  const uint32_t* scales;   // [T, groups, 8] fp16 pairs (s_g, s_{g+8})
  const uint16_t* zeros;    // [T, groups, 8] byte pairs z_g | z_{g+8} << 8
  int* counters;            // [gridDim.z × gridDim.x] (split-K only)
  float* partial;           // [splits, M, N] (split-K only)
  int m, n, k, tiles, steps, groups, group_size;
  int steps_per_split;      // a multiple of kSteps
};

// The scales and zeros of a lane's row pair for one group.
struct GroupMeta {
  uint32_t scales;  // fp16 pair
  uint32_t zeros;   // byte pair
};

// kSteps: steps per stage (2: G % 128 == 0, a stage is one group's or part of one; 1: G % 64 == 0,
// one group per step, or kHalves == 2: G % 64 != 0, each half step has its own group).
// Blocks per SM the compiler plans registers for: 2 (≤ 128 registers) while the totals and group
// sums (8 MB registers) fit beside the rest; 1 for MB ≥ 6, which would spill at 128.
template <int MB>
constexpr int min_blocks() { return MB >= 6 ? 1 : 2; }

template <typename T, int MB, int kSteps, int kHalves>
__global__ void __launch_bounds__(kThreads, min_blocks<MB>())
    gemm_n16k64_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                       GemmArgs args) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr int kCopies = (MB * 64 + kThreads - 1) / kThreads;  // x chunks a thread copies per step
  constexpr int kMetas = kHalves == 2 ? 2 : 1;                    // groups per stage
  using Stage = StageMemory<MB, kSteps>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Stage* stages = reinterpret_cast<Stage*>(shared_bytes);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = min(static_cast<int>(blockIdx.x) * kWarps + warp, args.tiles - 1);  // past T: a copy
  const int m0 = blockIdx.z * kRows;  // this block's rows of x
  const int step_begin = blockIdx.y * args.steps_per_split;
  const int count = (min(args.steps, step_begin + args.steps_per_split) - step_begin) / kSteps;  // stages

  // What this thread copies per step: x chunk (row, chunk) = (c / 8, c % 8) for c = threadIdx.x +
  // 256 j (rows 32 j apart: the same chunk and row parity), and its lane's 16 bytes of codes.
  const int row0 = threadIdx.x >> 3, chunk = threadIdx.x & 7;
  const int x_dst = row0 * 8 + swizzle(row0, chunk);  // + 256 j
  int x_k = step_begin * 64 + chunk * 8;
  const T* x_src = x + static_cast<size_t>(min(m0 + row0, args.m - 1)) * args.k + x_k;  // + 32 K j
  const uint4* codes_src = args.qweight + (static_cast<size_t>(tile) * args.steps + step_begin) * 32 + lane;
  auto issue = [&](int slot) {  // the next stage into slot `slot`
    Stage& s = stages[slot];
#pragma unroll
    for (int sub = 0; sub < kSteps; ++sub) {
#pragma unroll
      for (int j = 0; j < kCopies; ++j) {
        if (threadIdx.x + j * kThreads < MB * 64) {
          const bool live = m0 + row0 + 32 * j < args.m && x_k + 64 * sub < args.k;
          const T* src = x_src + 64 * sub + static_cast<size_t>(32 * j) * args.k;
          copy16(&s.x[sub][0][0] + x_dst + 256 * j, live ? src : x, live);
        }
      }
      copy16(&s.codes[sub][warp][lane], codes_src + 32 * sub, true);
    }
    x_src += 64 * kSteps, x_k += 64 * kSteps, codes_src += 32 * kSteps;
  };

  // The groups of the stages to come, read one stage ahead: meta_group is the group of the next
  // half step to read, meta_left its half steps not read yet.
  const int group_halves = args.group_size / 32;
  const size_t meta_tile = static_cast<size_t>(tile) * args.groups * 8 + g;
  int meta_group = (2 * step_begin) / group_halves;
  int meta_left = group_halves - (2 * step_begin) % group_halves;
  auto read_meta = [&](GroupMeta (&meta)[kMetas]) {  // the next stage's group(s)
#pragma unroll
    for (int h = 0; h < 2 * kSteps; ++h) {  // its half steps
      if (h < kMetas) {
        meta[h] = {__ldg(args.scales + meta_tile + meta_group * 8), __ldg(args.zeros + meta_tile + meta_group * 8)};
      }
      if (--meta_left == 0) meta_group = min(meta_group + 1, args.groups - 1), meta_left = group_halves;
    }
  };

  float total[MB][4] = {};  // C fragments: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) of m-block b
  float c[MB][4] = {};      // the current group's sums
  auto flush = [&](uint32_t scales) {  // total += s · c; c = 0
    const float2 s = __half22float2(as_pair<__half2>(scales));
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      total[b][0] = fmaf(s.x, c[b][0], total[b][0]);
      total[b][1] = fmaf(s.x, c[b][1], total[b][1]);
      total[b][2] = fmaf(s.y, c[b][2], total[b][2]);
      total[b][3] = fmaf(s.y, c[b][3], total[b][3]);
      c[b][0] = c[b][1] = c[b][2] = c[b][3] = 0.0f;
    }
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < count) issue(i);
    commit();
  }
  GroupMeta meta[kMetas];
  read_meta(meta);
  int left = group_halves - (2 * step_begin) % group_halves;  // half steps left in the consumed group
  int slot = 0, free_slot = kStages - 1;
  for (int i = 0; i < count; ++i) {
    wait<kStages - 2>();  // stage i has landed (this thread's copies) ...
    __syncthreads();      // ... and everyone's; the slot of stage i − 1 is free again
    if (i + kStages - 1 < count) issue(free_slot);
    commit();
    free_slot = free_slot + 1 == kStages ? 0 : free_slot + 1;
    GroupMeta now[kMetas];
#pragma unroll
    for (int h = 0; h < kMetas; ++h) now[h] = meta[h];
    if (i + 1 < count) read_meta(meta);  // the next stage's, in flight during this one
    const Stage& s = stages[slot];
    slot = slot + 1 == kStages ? 0 : slot + 1;
#pragma unroll
    for (int sub = 0; sub < kSteps; ++sub) {
      const uint4 codes = s.codes[sub][warp][lane];
      const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // half step h: tiles 2h (inputs 8t+0..3) and 2h + 1 (8t+4..7)
        const GroupMeta& group = now[kHalves == 2 ? h : 0];
        const ZeroPair<kBf16> zero(group.zeros);
        uint32_t a0[4], a1[4];
        dequant_word(words[2 * h], zero, a0);
        dequant_word(words[2 * h + 1], zero, a1);
#pragma unroll
        for (int b = 0; b < MB; ++b) {
          const uint4 xb = s.x[sub][8 * b + g][swizzle(g, 4 * h + t)];  // (8b + g) & 1 == g & 1
          mma<kBf16>(c[b], a0, xb.x, xb.y);
          mma<kBf16>(c[b], a1, xb.z, xb.w);
        }
        if (kHalves == 2) {  // G % 64 != 0: a group may end after either half
          if (--left == 0 || (h == 1 && i + 1 == count)) flush(group.scales), left = group_halves;
        }
      }
    }
    if (kHalves == 1) {  // groups end with a stage
      left -= 2 * kSteps;
      if (left == 0 || i + 1 == count) flush(now[0].scales), left = group_halves;
    }
  }
  wait<0>();
  __syncthreads();  // every warp is done with the stages: their memory holds the results now

  // results through shared memory: sums[row of x][output of the block], fp32
  constexpr int kPitch = kWarps * 16 + 4;  // floats per row (+4: rows start in other banks)
  float* sums = reinterpret_cast<float*>(shared_bytes);
#pragma unroll
  for (int b = 0; b < MB; ++b) {
    const int row = 8 * b + 2 * t, col = warp * 16 + g;
    sums[row * kPitch + col] = total[b][0];
    sums[(row + 1) * kPitch + col] = total[b][1];
    sums[row * kPitch + col + 8] = total[b][2];
    sums[(row + 1) * kPitch + col + 8] = total[b][3];
  }
  __syncthreads();
  const int rows = min(MB * 8, args.m - m0);
  const int n0 = blockIdx.x * kWarps * 16;
  // 8 outputs per thread and pass: (row, 8 consecutive outputs)
  auto each_run = [&](auto&& body) {
    for (int r = threadIdx.x; r < rows * kWarps * 2; r += kThreads) {
      const int row = r / (kWarps * 2), col = (r % (kWarps * 2)) * 8;
      if (n0 + col < args.n) body(row, col);
    }
  };
  auto write = [&](int row, int col, const float (&v)[8]) {  // out[m0 + row, n0 + col ..] (+ bias)
    T* dst = out + static_cast<size_t>(m0 + row) * args.n + n0 + col;
    const int live = min(8, args.n - n0 - col);
    uint32_t pairs[4];  // the 8 values in T, two per word
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      const float b0 = bias != nullptr && j < live ? static_cast<float>(bias[n0 + col + j]) : 0.0f;
      const float b1 = bias != nullptr && j + 1 < live ? static_cast<float>(bias[n0 + col + j + 1]) : 0.0f;
      const T a = static_cast<T>(v[j] + b0), c = static_cast<T>(v[j + 1] + b1);
      pairs[j / 2] = static_cast<uint32_t>(bits16(a)) | static_cast<uint32_t>(bits16(c)) << 16;
    }
    if (live == 8 && args.n % 8 == 0) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    } else {
      for (int j = 0; j < live; ++j) dst[j] = static_cast<T>(v[j] + (bias != nullptr ? static_cast<float>(bias[n0 + col + j]) : 0.0f));
    }
  };
  auto read = [&](int row, int col, float (&v)[8]) {  // 8 sums: two 16-byte shared loads
    const float4* src = reinterpret_cast<const float4*>(sums + row * kPitch + col);
    const float4 a = src[0], b = src[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  };
  if (gridDim.y == 1) {
    each_run([&](int row, int col) {
      float v[8];
      read(row, col, v);
      write(row, col, v);
    });
    return;
  }
  // split-K: publish this split's sums; the last block of the column adds all splits in order
  each_run([&](int row, int col) {
    float v[8];
    read(row, col, v);
    float* dst = args.partial + (static_cast<size_t>(blockIdx.y) * args.m + m0 + row) * args.n + n0 + col;
    if (n0 + col + 8 <= args.n && args.n % 4 == 0) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      for (int j = 0; j < 8 && n0 + col + j < args.n; ++j) dst[j] = v[j];
    }
  });
  __threadfence();
  __syncthreads();
  __shared__ bool last_block;
  int* counter = args.counters + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) last_block = atomicAdd(counter, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  each_run([&](int row, int col) {
    float v[8] = {};
    for (int split = 0; split < static_cast<int>(gridDim.y); ++split) {
      const float* src = args.partial + (static_cast<size_t>(split) * args.m + m0 + row) * args.n + n0 + col;
      for (int j = 0; j < 8 && n0 + col + j < args.n; ++j) v[j] += __ldcg(src + j);
    }
    write(row, col, v);
  });
  if (threadIdx.x == 0) *counter = 0;  // ready for the next launch
}

// --- host side --------------------------------------------------------------------------------------
template <int MB, int kSteps>
constexpr size_t shared_bytes() {
  const size_t pipeline = kStages * sizeof(StageMemory<MB, kSteps>);
  const size_t results = sizeof(float) * MB * 8 * (kWarps * 16 + 4);
  return std::max(pipeline, results);
}

template <typename T, int MB, int kSteps, int kHalves>
void launch(const T* x, const T* bias, T* out, const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = shared_bytes<MB, kSteps>();
  auto kernel = gemm_n16k64_kernel<T, MB, kSteps, kHalves>;
  static std::atomic<uint64_t> opted{0};  // devices (bit per index < 64) where the kernel may use `bytes`
  if (bytes > 48 * 1024) {
    int device = 0;
    cudaGetDevice(&device);
    const uint64_t bit = uint64_t{1} << (device & 63);
    if (!(opted.load() & bit)) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(bytes));
      if (err != cudaSuccess) {
        throw std::runtime_error("gemm_n16k64_kernel: " + std::to_string(bytes) +
                                 " bytes of shared memory refused: " + cudaGetErrorString(err));
      }
      opted.fetch_or(bit);
    }
  }
  kernel<<<grid, kThreads, bytes, stream>>>(x, bias, out, args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("gemm_n16k64_kernel launch failed: ") + cudaGetErrorString(err));
}

template <typename T, int kSteps, int kHalves>
void dispatch_rows(const void* x, const void* bias, void* out, const GemmArgs& args, dim3 grid, cudaStream_t s) {
  const auto* xt = static_cast<const T*>(x);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
  const int rows = std::min(args.m, kRows);  // per block (blocks in z take 64 each)
  if (rows <= 16) {
    launch<T, 2, kSteps, kHalves>(xt, bt, ot, args, grid, s);
  } else if (rows <= 32) {
    launch<T, 4, kSteps, kHalves>(xt, bt, ot, args, grid, s);
  } else if (rows <= 48) {
    launch<T, 6, kSteps, kHalves>(xt, bt, ot, args, grid, s);
  } else {
    launch<T, 8, kSteps, kHalves>(xt, bt, ot, args, grid, s);
  }
}

// the stage shape for a group size: (steps per stage, groups per step)
template <typename T>
void dispatch_groups(const void* x, const void* bias, void* out, const GemmArgs& args, dim3 grid, cudaStream_t s) {
  if (args.group_size % 128 == 0) {
    dispatch_rows<T, 2, 1>(x, bias, out, args, grid, s);
  } else if (args.group_size % 64 == 0) {
    dispatch_rows<T, 1, 1>(x, bias, out, args, grid, s);
  } else {
    dispatch_rows<T, 1, 2>(x, bias, out, args, grid, s);
  }
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("int4_gemm_n16k64: " + what);
}

}  // namespace

void int4_gemm_n16k64_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                 uintptr_t bias, uintptr_t out, uintptr_t counters, uintptr_t partial,
                                 int64_t m, int64_t n, int64_t k, int64_t group_size, int splits,
                                 int dtype, uintptr_t stream) {
  const N16K64Params p =
      linear_params<N16K64Params>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, dtype);
  check_n16k64_params(p);
  require(dtype == kInt4F16 || dtype == kInt4BF16,
          "x must be float16 or bfloat16 (float32 x goes through dequantize + GEMM)");
  require(m >= 1, "M must be at least 1");
  require(k < (int64_t{1} << 24) && n < (int64_t{1} << 30) && m <= int64_t{65535} * kRows,
          "K must be below 2^24, N below 2^30 and M at most 65535 × 64");
  const int64_t tiles = (n + 15) / 16, steps = (k + 63) / 64;
  require(m * n < (int64_t{1} << 31) && tiles * (k / group_size) * 16 < (int64_t{1} << 31),
          "out and the scales must have fewer than 2^31 entries");
  require(x % 16 == 0 && qweight % 16 == 0, "x and qweight must be 16-byte aligned");
  require(scales % 4 == 0 && zeros % 2 == 0, "scales must be 4-byte and zeros 2-byte aligned");
  require(splits >= 1, "splits must be >= 1");
  const int64_t steps_per_group = group_size % 64 == 0 ? group_size / 64 : 1;
  // whole groups per split (G % 64 == 0), no empty split
  int64_t per_split = (steps + splits - 1) / splits;
  per_split = (per_split + steps_per_group - 1) / steps_per_group * steps_per_group;
  splits = static_cast<int>((steps + per_split - 1) / per_split);
  require(splits == 1 || m <= kRows, "split-K takes at most 64 rows of x (more rows fill the GPU anyway)");
  require(splits == 1 || (counters != 0 && partial != 0),
          "split-K needs counters and partials (int4_gemm_n16k64_workspace_bytes)");
  require(partial % 16 == 0, "partial must be 16-byte aligned");

  GemmArgs args;
  args.qweight = reinterpret_cast<const uint4*>(qweight);
  args.scales = reinterpret_cast<const uint32_t*>(scales);
  args.zeros = reinterpret_cast<const uint16_t*>(zeros);
  args.counters = reinterpret_cast<int*>(counters);
  args.partial = reinterpret_cast<float*>(partial);
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.tiles = static_cast<int>(tiles);
  args.steps = static_cast<int>(steps);
  args.groups = static_cast<int>(k / group_size);
  args.group_size = static_cast<int>(group_size);
  args.steps_per_split = static_cast<int>(per_split);
  const dim3 grid(static_cast<unsigned>((tiles + kWarps - 1) / kWarps), static_cast<unsigned>(splits),
                  static_cast<unsigned>((m + kRows - 1) / kRows));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kInt4F16) {
    dispatch_groups<__half>(p.x, p.bias, p.out, args, grid, s);
  } else {
    dispatch_groups<__nv_bfloat16>(p.x, p.bias, p.out, args, grid, s);
  }
}

}  // namespace rgpt
