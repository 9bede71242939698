// W4A16 on CUDA, INT4 layout n16k64 (int4_n16k64.h, README.md): a tensor-core GEMV for 1..8 rows
// of x, and a dequantize-to-workspace kernel for the prefill GEMM.
//
// GEMV. A block (4 warps) owns one tile of 16 output rows; its warps take every 4th stage of the
// block's K range (a stage: 2 steps of 64 inputs when G % 128 == 0, else 1). Per step a lane loads
// one 16-byte chunk (32 codes: rows g and g+8 of its tile, 16 inputs each), which is exactly its
// share of the A fragments of four mma.m16n8k16 (16 rows × 16 inputs each); x is the B operand,
// row m of x in column m, so M = 1..8 cost the same. Dequantization gives (q − z) exactly:
//   fp16  (word & 0x000F000F) | 0x64006400 is the pair 1024 + q; minus (1024 + z): q − z.
//         (word & 0x00F000F0) | 0x64006400 is 1024 + 16q; × 1/16 − (64 + z) in one HFMA2: q − z.
//         One shift by 8 per word gives the other two pairs: per 8 codes 1 SHF, 4 LOP3, 4 HADD2/HFMA2.
//   bf16  (word >> 4i & 0x000F000F) | 0x43004300 is 128 + q; minus (128 + z): q − z.
// The MMA multiplies (q − z) by x exactly and sums in fp32; at each group's end (each half step
// when G % 64 != 0) the 16×8 sums are scaled by the group's fp16 scales in fp32 and added up.
// fp32 x is split into three bf16 parts (hi + mid + lo = x exactly for |x| ≥ 2^-100), three MMAs.
// A register pipeline keeps the next stage(s) (chunks, scales, zeros) in flight while one is
// consumed. The 4 warps add their sums through shared memory in a fixed order. With splits > 1
// (small N) several blocks share a tile: each writes its fp32 sums to the workspace, and the last
// to arrive (an atomic counter per tile) adds them in split order and writes out: one kernel,
// deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "int4/int4_n16k64_mma.cuh"

namespace rgpt {
namespace {

constexpr int kWarps = kN16K64GemvWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;

using namespace n16k64_cuda;

// --- operand types: what x becomes in the MMA ---------------------------------------------------
// kBf16: A and B are bf16 (else fp16). kParts: MMAs per 16×16 tile (fp32 x: hi, mid, lo).
// kStages: pipeline depth for 1-step stages (2-step stages use 2).
template <typename T>
struct Operand;
template <>
struct Operand<__half> {
  static constexpr bool kBf16 = false;
  static constexpr int kParts = 1;
  static constexpr int kStages = 3;
};
template <>
struct Operand<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
  static constexpr int kParts = 1;
  static constexpr int kStages = 3;
};
template <>
struct Operand<float> {
  static constexpr bool kBf16 = true;
  static constexpr int kParts = 3;
  static constexpr int kStages = 2;  // room in 64 registers for 2× the x and 3× the B fragments
};

// A lane's 8 activations of a half step (k = 8t .. 8t+7) as B fragments: words 0, 1 for the
// first tile of the half (k 8t+0..3), words 2, 3 for the second (8t+4..7), per part.
template <int kParts>
struct XFrag {
  uint32_t w[kParts][4];
};

__device__ __forceinline__ XFrag<1> load_x(const __half* ptr, bool live) {
  XFrag<1> f;
  const uint4 v = live ? *reinterpret_cast<const uint4*>(ptr) : make_uint4(0, 0, 0, 0);
  f.w[0][0] = v.x, f.w[0][1] = v.y, f.w[0][2] = v.z, f.w[0][3] = v.w;
  return f;
}

__device__ __forceinline__ XFrag<1> load_x(const __nv_bfloat16* ptr, bool live) {
  XFrag<1> f;
  const uint4 v = live ? *reinterpret_cast<const uint4*>(ptr) : make_uint4(0, 0, 0, 0);
  f.w[0][0] = v.x, f.w[0][1] = v.y, f.w[0][2] = v.z, f.w[0][3] = v.w;
  return f;
}

// x = hi + mid + lo, each a bf16: hi = bf16(x), mid = bf16(x − hi), lo = x − hi − mid (at most 8
// significant bits are left, so lo is exact unless it falls below bf16's normal range).
__device__ __forceinline__ XFrag<3> load_x(const float* ptr, bool live) {
  XFrag<3> f;
  float v[8];
  const float4 a = live ? reinterpret_cast<const float4*>(ptr)[0] : make_float4(0, 0, 0, 0);
  const float4 b = live ? reinterpret_cast<const float4*>(ptr)[1] : make_float4(0, 0, 0, 0);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float x0 = v[2 * i], x1 = v[2 * i + 1];
    const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
    const float2 hi_f = __bfloat1622float2(hi);
    const float r0 = x0 - hi_f.x, r1 = x1 - hi_f.y;  // exact
    const __nv_bfloat162 mid = __floats2bfloat162_rn(r0, r1);
    const float2 mid_f = __bfloat1622float2(mid);
    const __nv_bfloat162 lo = __floats2bfloat162_rn(r0 - mid_f.x, r1 - mid_f.y);
    f.w[0][i] = as_bits(hi);
    f.w[1][i] = as_bits(mid);
    f.w[2][i] = as_bits(lo);
  }
  return f;
}

// --- GEMV ---------------------------------------------------------------------------------------
// A pipeline stage is kSteps consecutive steps of one group (one set of scales and zeros), or, when
// G % 64 != 0, one step whose two 32-input halves may lie in two groups (kHalves = 2 sets):
//   G % 128 == 0: kSteps 2, kHalves 1;   G % 64 == 0: 1, 1;   else: 1, 2.
template <int kSteps, int kHalves>
struct Stage {
  uint4 codes[kSteps];
  uint32_t scales[kHalves];  // fp16 pair (s_g, s_{g+8})
  uint32_t zeros[kHalves];   // z_g | z_{g+8} << 8
};

struct GemvArgs {
  const uint4* qweight;      // [T, S, 32] chunks
  const uint32_t* scales;    // [T, groups, 8] fp16 pairs
  const uint16_t* zeros;     // [T, groups, 8] byte pairs
  int* counters;             // [T] (split-K only)
  float* partial;            // [splits, M, N] (split-K only)
  int m, n, k, groups;
  int stages_per_split;      // in stages of kSteps steps
  uint32_t group_magic;      // divides a stage (kHalves 1) or half-step (2) index into its group
};

template <typename T, bool kOneRow, int kSteps, int kHalves>
__global__ void __launch_bounds__(kThreads, 8)
    gemv_n16k64_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                       GemvArgs args) {
  using Op = Operand<T>;
  constexpr int kStages = kSteps == 2 ? 2 : Op::kStages;
  constexpr int kStride = kWarps;  // a warp takes every kStride-th stage
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int steps = (args.k + 63) >> 6;
  const int stages_total = steps / kSteps;  // kSteps divides the step count (G % 128 == 0)
  const int first = blockIdx.y * args.stages_per_split + warp;  // this warp's first stage
  const int end = min(stages_total, static_cast<int>(blockIdx.y + 1) * args.stages_per_split);
  const int mine = first < end ? (end - first + kStride - 1) / kStride : 0;

  // where the warp's first stage starts: lane's chunk, its scales/zeros row pair, its 8 inputs
  const uint4* codes = args.qweight + (static_cast<size_t>(tile) * steps + first * kSteps) * 32 + lane;
  const uint32_t meta = static_cast<uint32_t>(tile * args.groups * 8 + g);  // + group * 8
  const int x_row = kOneRow ? 0 : min(g, args.m - 1);  // B column g: row g of x (extras repeat)
  const T* xs = x + static_cast<size_t>(x_row) * args.k + static_cast<size_t>(first) * kSteps * 64 + 8 * t;

  // stage <- the warp's stage whose first chunk is `chunk`; `twice_stage` is 2 × its index
  auto load = [&](Stage<kSteps, kHalves>& stage, const uint4* chunk, uint32_t twice_stage) {
#pragma unroll
    for (int sub = 0; sub < kSteps; ++sub) stage.codes[sub] = load_streaming(chunk + sub * 32);
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      const uint32_t group = kHalves == 1
                                 ? divide(twice_stage, args.group_magic)
                                 : min(divide(2 * (twice_stage + h), args.group_magic), args.groups - 1u);
      stage.scales[h] = args.scales[meta + group * 8];
      stage.zeros[h] = args.zeros[meta + group * 8];
    }
  };

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // C fragment: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
  // one stage: kSteps × 4 tiles of 16 rows × 16 inputs; x at xp (input 8t of the first half)
  auto consume = [&](const Stage<kSteps, kHalves>& stage, const T* xp, bool second_half) {
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int sub = 0; sub < kSteps; ++sub) {
      const XFrag<Op::kParts> xf[2] = {load_x(xp + 64 * sub, true),
                                       load_x(xp + 64 * sub + 32, second_half)};
      const uint32_t words[4] = {stage.codes[sub].x, stage.codes[sub].y, stage.codes[sub].z,
                                 stage.codes[sub].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // tile j: half j / 2, inputs 8t + 4 (j % 2) + 0..3 of the half
        const int h = j >> 1, e = j & 1;
        const ZeroPair<Op::kBf16> zero(stage.zeros[kHalves == 1 ? 0 : h]);
        uint32_t a[4];
        dequant_word(words[j], zero, a);
#pragma unroll
        for (int part = 0; part < Op::kParts; ++part) {
          mma<Op::kBf16>(c, a, xf[h].w[part][2 * e], xf[h].w[part][2 * e + 1]);
        }
        if (kHalves == 2 ? e == 1 : (j == 3 && sub == kSteps - 1)) {  // a group's end: scale, add
          const float2 s = __half22float2(as_pair<__half2>(stage.scales[kHalves == 1 ? 0 : h]));
          acc[0] = fmaf(s.x, c[0], acc[0]);
          acc[1] = fmaf(s.x, c[1], acc[1]);
          acc[2] = fmaf(s.y, c[2], acc[2]);
          acc[3] = fmaf(s.y, c[3], acc[3]);
          c[0] = c[1] = c[2] = c[3] = 0.0f;
        }
      }
    }
  };
  // the second half of the warp's stage i exists (only the last step of K % 64 == 32 lacks it)
  auto has_second_half = [&](int i) {
    return kHalves == 1 || (first + kStride * i) * 64 + 32 < args.k;
  };

  // a software pipeline: stage u holds the warp's stage i + u; consuming it frees its registers
  // for stage i + u + kStages, so kStages − 1 stages are in flight while one is consumed
  constexpr int kChunkStride = kStride * kSteps * 32;  // chunks between the warp's stages
  constexpr int kInputStride = kStride * kSteps * 64;
  Stage<kSteps, kHalves> stages[kStages];
  const uint32_t twice_first = 2 * first;
#pragma unroll
  for (int u = 0; u < kStages; ++u) {
    if (u < mine) load(stages[u], codes + u * kChunkStride, twice_first + 2 * u * kStride);
  }
  int i = 0;
  for (; i + 2 * kStages <= mine; i += kStages) {  // every refill in range: no branch
#pragma unroll
    for (int u = 0; u < kStages; ++u) {
      consume(stages[u], xs + u * kInputStride, has_second_half(i + u));
      load(stages[u], codes + (u + kStages) * kChunkStride, twice_first + 2 * (i + u + kStages) * kStride);
    }
    codes += kStages * kChunkStride;
    xs += kStages * kInputStride;
  }
#pragma unroll
  for (int u = 0; u < 2 * kStages - 1; ++u) {  // the last mine − i < 2 kStages stages
    if (i + u < mine) {
      consume(stages[u % kStages], xs + u * kInputStride, has_second_half(i + u));
      if (i + u + kStages < mine) {
        load(stages[u % kStages], codes + (u + kStages) * kChunkStride,
             twice_first + 2 * (i + u + kStages) * kStride);
      }
    }
  }

  // the 4 warps' sums, added in warp order: sums[w][row][m]
  __shared__ float sums[kWarps][kTileRows][8];
  __shared__ bool last_block;
  const int m_rows = kOneRow ? 1 : args.m;
  if (2 * t < m_rows) {
    sums[warp][g][2 * t] = acc[0];
    sums[warp][g + 8][2 * t] = acc[2];
  }
  if (2 * t + 1 < m_rows) {
    sums[warp][g][2 * t + 1] = acc[1];
    sums[warp][g + 8][2 * t + 1] = acc[3];
  }
  __syncthreads();
  const int row = threadIdx.x & 15, m = threadIdx.x >> 4;  // 128 threads: 16 rows × 8 rows of x
  const int n_out = tile * kTileRows + row;
  const bool live = m < m_rows && n_out < args.n;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += live ? sums[w][row][m] : 0.0f;
  const float b = live && bias != nullptr ? static_cast<float>(bias[n_out]) : 0.0f;
  if (gridDim.y == 1) {
    if (live) out[static_cast<size_t>(m) * args.n + n_out] = static_cast<T>(sum + b);
    return;
  }
  // split-K: publish this block's sums; the last block of the tile adds all splits in order
  if (live) args.partial[(static_cast<size_t>(blockIdx.y) * args.m + m) * args.n + n_out] = sum;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&args.counters[tile], 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (live) {
    float total = 0.0f;
    for (int split = 0; split < static_cast<int>(gridDim.y); ++split) {
      total += __ldcg(&args.partial[(static_cast<size_t>(split) * args.m + m) * args.n + n_out]);
    }
    out[static_cast<size_t>(m) * args.n + n_out] = static_cast<T>(total + b);
  }
  if (threadIdx.x == 0) args.counters[tile] = 0;  // ready for the next launch
}

// --- dequantize to a workspace (prefill) ----------------------------------------------------------
// One thread per 16-byte chunk: rows g and g+8 of a tile × inputs 8t..8t+7 of both half steps,
// written as four runs of 8 consecutive values (16-byte stores for fp16/bf16, 2 × 16 for fp32);
// a warp's stores cover whole 32-byte sectors.
__device__ __forceinline__ void store_run(__half* dst, const uint32_t (&q)[4], float scale) {
  const __half2 s = __float2half2_rn(scale);  // exact: scale is an fp16
  uint4 v;
  v.x = as_bits(__hmul2(as_pair<__half2>(q[0]), s));  // (q − z)·s rounded once
  v.y = as_bits(__hmul2(as_pair<__half2>(q[1]), s));
  v.z = as_bits(__hmul2(as_pair<__half2>(q[2]), s));
  v.w = as_bits(__hmul2(as_pair<__half2>(q[3]), s));
  *reinterpret_cast<uint4*>(dst) = v;
}

__device__ __forceinline__ void store_run(__nv_bfloat16* dst, const uint32_t (&q)[4], float scale) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(as_pair<__half2>(q[i]));
    w[i] = as_bits(__floats2bfloat162_rn(f.x * scale, f.y * scale));  // exact product, one rounding
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void store_run(float* dst, const uint32_t (&q)[4], float scale) {
  float f[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(as_pair<__half2>(q[i]));
    f[2 * i] = v.x * scale;  // exact
    f[2 * i + 1] = v.y * scale;
  }
  reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

template <typename T>
__global__ void dequant_n16k64_kernel(const uint4* __restrict__ qweight,
                                      const uint32_t* __restrict__ scales,
                                      const uint16_t* __restrict__ zeros, T* __restrict__ out, int n,
                                      int k, int groups, int group_size) {
  const int steps = (k + 63) >> 6;
  const int64_t chunks = static_cast<int64_t>((n + kTileRows - 1) / kTileRows) * steps * 32;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(c & 31);
    const int64_t tile_step = c >> 5;
    const int tile = static_cast<int>(tile_step / steps), step = static_cast<int>(tile_step % steps);
    const int g = lane >> 2, t = lane & 3;
    const uint4 codes = load_streaming(qweight + c);
    const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k0 = step * 64 + h * 32;
      if (k0 >= k) break;
      const int64_t meta = (static_cast<int64_t>(tile) * groups + k0 / group_size) * 8 + g;
      const ZeroPair<false> zero(zeros[meta]);
      const float2 scale = __half22float2(as_pair<__half2>(scales[meta]));
      uint32_t first[4], second[4];  // tiles 2h and 2h + 1
      dequant_word(words[2 * h], zero, first);
      dequant_word(words[2 * h + 1], zero, second);
      const int row = tile * kTileRows + g;
      const int64_t column = k0 + 8 * t;
      if (row < n) {  // row g: k +0,+1 | +2,+3 of each tile
        const uint32_t run[4] = {first[0], first[2], second[0], second[2]};
        store_run(out + static_cast<int64_t>(row) * k + column, run, scale.x);
      }
      if (row + 8 < n) {
        const uint32_t run[4] = {first[1], first[3], second[1], second[3]};
        store_run(out + static_cast<int64_t>(row + 8) * k + column, run, scale.y);
      }
    }
  }
}

// --- host side --------------------------------------------------------------------------------------
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
  }
}

void check_alignment(uintptr_t ptr, const char* name) {
  if (ptr % 16 != 0) {
    throw std::invalid_argument(std::string("int4 n16k64 CUDA kernel: ") + name +
                                " must be 16-byte aligned");
  }
}

uint32_t group_magic(int64_t divisor) {  // ceil(2^31 / divisor): see divide()
  return static_cast<uint32_t>(((int64_t{1} << 31) + divisor - 1) / divisor);
}

template <typename T, bool kOneRow, int kSteps, int kHalves>
void launch_gemv(const N16K64Params& p, GemvArgs args, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kTileRows - 1) / kTileRows), static_cast<unsigned>(splits));
  gemv_n16k64_kernel<T, kOneRow, kSteps, kHalves><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.out), args);
  check_launch("gemv_n16k64_kernel");
}

// the stage shape for a group size: (steps per stage, scale sets per stage)
int stage_steps(int64_t group_size) { return group_size % 128 == 0 ? 2 : 1; }

template <typename T, bool kOneRow>
void dispatch_stage(const N16K64Params& p, const GemvArgs& args, int splits, cudaStream_t stream) {
  if (p.group_size % 128 == 0) {
    launch_gemv<T, kOneRow, 2, 1>(p, args, splits, stream);
  } else if (p.group_size % 64 == 0) {
    launch_gemv<T, kOneRow, 1, 1>(p, args, splits, stream);
  } else {
    launch_gemv<T, kOneRow, 1, 2>(p, args, splits, stream);
  }
}

template <typename T>
void dispatch_gemv(const N16K64Params& p, const GemvArgs& args, int splits, cudaStream_t stream) {
  p.m == 1 ? dispatch_stage<T, true>(p, args, splits, stream) : dispatch_stage<T, false>(p, args, splits, stream);
}

}  // namespace

void int4_gemv_n16k64_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales,
                                 uintptr_t zeros, uintptr_t bias, uintptr_t out,
                                 uintptr_t workspace, int64_t m, int64_t n, int64_t k,
                                 int64_t group_size, int splits, int dtype, uintptr_t stream) {
  const N16K64Params p =
      linear_params<N16K64Params>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, dtype);
  check_n16k64_params(p);
  if (m < 1 || m > kN16K64GemvMaxRows) throw std::invalid_argument("int4_gemv_n16k64: M must be in 1..8");
  if (k >= (int64_t{1} << 21) || n >= (int64_t{1} << 30)) {
    throw std::invalid_argument("int4_gemv_n16k64: K must be below 2^21 and N below 2^30");
  }
  if (splits < 1) throw std::invalid_argument("int4_gemv_n16k64: splits must be >= 1");
  const int stages = static_cast<int>((k + 63) / 64) / stage_steps(group_size);
  const int stages_per_split = (stages + splits - 1) / splits;
  splits = (stages + stages_per_split - 1) / stages_per_split;  // no empty split
  if (splits > 1 && workspace == 0) {
    throw std::invalid_argument("int4_gemv_n16k64: split-K needs a workspace (int4_gemv_n16k64_workspace_bytes)");
  }
  check_alignment(x, "x");
  check_alignment(qweight, "qweight");
  check_alignment(workspace, "workspace");
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  if (tiles * (k / group_size) * 16 >= (int64_t{1} << 31)) {
    throw std::invalid_argument("int4_gemv_n16k64: scales/zeros must have fewer than 2^31 entries");
  }
  GemvArgs args;
  args.qweight = reinterpret_cast<const uint4*>(qweight);
  args.scales = reinterpret_cast<const uint32_t*>(scales);
  args.zeros = reinterpret_cast<const uint16_t*>(zeros);
  args.counters = reinterpret_cast<int*>(workspace);
  args.partial = reinterpret_cast<float*>(workspace + ((tiles * 4 + 15) / 16) * 16);
  args.m = static_cast<int>(m);
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.groups = static_cast<int>(k / group_size);
  args.stages_per_split = stages_per_split;
  args.group_magic = group_magic(group_size % 64 == 0 ? group_size / (64 * stage_steps(group_size)) : group_size / 32);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kInt4F32: dispatch_gemv<float>(p, args, splits, s); break;
    case kInt4F16: dispatch_gemv<__half>(p, args, splits, s); break;
    default: dispatch_gemv<__nv_bfloat16>(p, args, splits, s); break;
  }
}

void int4_dequant_n16k64_cuda_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                    uintptr_t out, int64_t n, int64_t k, int64_t group_size,
                                    int dtype, uintptr_t stream) {
  const auto p = weight_params<N16K64Params>(qweight, scales, zeros, n, k, group_size, dtype);
  check_n16k64_params(p);
  if (out == 0) throw std::invalid_argument("int4_dequant_n16k64: out is null");
  if (k >= (int64_t{1} << 31) || n >= (int64_t{1} << 31)) {
    throw std::invalid_argument("int4_dequant_n16k64: N and K must be below 2^31");
  }
  check_alignment(qweight, "qweight");
  check_alignment(out, "out");
  const int64_t chunks = (n + kTileRows - 1) / kTileRows * ((k + 63) / 64) * 32;
  const int threads = 256;
  const int grid = static_cast<int>(std::min<int64_t>((chunks + threads - 1) / threads, 65535 * 8));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* q = reinterpret_cast<const uint4*>(qweight);
  const auto* sc = reinterpret_cast<const uint32_t*>(scales);
  const auto* z = reinterpret_cast<const uint16_t*>(zeros);
  const int ni = static_cast<int>(n), ki = static_cast<int>(k), gi = static_cast<int>(group_size);
  const int groups = static_cast<int>(k / group_size);
  switch (dtype) {
    case kInt4F32:
      dequant_n16k64_kernel<float><<<grid, threads, 0, s>>>(q, sc, z, reinterpret_cast<float*>(out), ni, ki, groups, gi);
      break;
    case kInt4F16:
      dequant_n16k64_kernel<__half><<<grid, threads, 0, s>>>(q, sc, z, reinterpret_cast<__half*>(out), ni, ki, groups, gi);
      break;
    default:
      dequant_n16k64_kernel<__nv_bfloat16>
          <<<grid, threads, 0, s>>>(q, sc, z, reinterpret_cast<__nv_bfloat16*>(out), ni, ki, groups, gi);
      break;
  }
  check_launch("dequant_n16k64_kernel");
}

}  // namespace rgpt
