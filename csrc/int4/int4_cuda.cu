// W4A16 on CUDA: a GEMV for 1..8 rows of x, and a dequantize-to-workspace kernel for prefill
// (the Python side then calls cuBLAS through torch). Layout nk8i: see int4.h and README.md.
//
// GEMV: a warp owns kRowsPerWarp output rows; lane l reads 16-byte chunks l, l+32, ... of each
// row (32 codes per load, one group per chunk since G % 32 == 0), dequantizes them in registers
// to the exact fp16 values, widens to fp32 and accumulates x·w in fp32; the warp then reduces
// with shuffles. With few output rows (small N) the K range is split over blockIdx.y (split-K):
// each split writes fp32 partials and a second kernel sums them (deterministic, no atomics).
//
// Dequantization ("magic number"): (word >> 4i) & 0x000F000F puts the codes of k = 2i and
// 2i+1 in the low mantissa bits of two fp16 lanes; OR 0x6400 (1024.0) makes them 1024 + q;
// subtracting 1024 + z (exact: integers below 2048) gives q - z, and __hmul2 by the scale rounds
// once to fp16 — the same value as fp16((q - z) * s) everywhere else.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "int4/int4.h"

namespace rgpt {
namespace {

constexpr int kWarps = 4;        // warps per GEMV block
constexpr int kRowsPerWarp = 2;  // output rows per warp: each x load feeds this many rows
constexpr int kChunk = 32;       // codes per 16-byte load

__device__ __forceinline__ __half2 bits_to_half2(uint32_t bits) {
  __half2 value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

// One 16-byte chunk (32 codes, k = 0..31 of the chunk) -> 16 fp16 pairs (k = 2p, 2p+1).
__device__ __forceinline__ void dequant_chunk(const uint4& q, __half scale, int zero, __half2 (&w)[16]) {
  const __half2 scale2 = __half2half2(scale);
  const __half2 zero2 = bits_to_half2(0x64006400u | (static_cast<uint32_t>(zero) * 0x00010001u));
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __half2 biased = bits_to_half2(((words[i] >> (4 * j)) & 0x000F000Fu) | 0x64006400u);
      w[i * 4 + j] = __hmul2(__hsub2(biased, zero2), scale2);
    }
  }
}

// 32 activations (k = 0..31 of a chunk) as 16 fp32 pairs. `ptr` is 16-byte aligned.
__device__ __forceinline__ void load_x_chunk(const float* ptr, float2 (&xv)[16]) {
  const float4* v = reinterpret_cast<const float4*>(ptr);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 f = v[i];
    xv[2 * i] = make_float2(f.x, f.y);
    xv[2 * i + 1] = make_float2(f.z, f.w);
  }
}

__device__ __forceinline__ void load_x_chunk(const __half* ptr, float2 (&xv)[16]) {
  const uint4* v = reinterpret_cast<const uint4*>(ptr);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 u = v[i];
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) xv[4 * i + j] = __half22float2(bits_to_half2(words[j]));
  }
}

__device__ __forceinline__ void load_x_chunk(const __nv_bfloat16* ptr, float2 (&xv)[16]) {
  const uint4* v = reinterpret_cast<const uint4*>(ptr);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 u = v[i];
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __nv_bfloat162 pair;
      memcpy(&pair, &words[j], sizeof pair);
      xv[4 * i + j] = __bfloat1622float2(pair);
    }
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float(float v) { return v; }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32)
    int4_gemv_kernel(const T* __restrict__ x, const uint4* __restrict__ qweight,
                     const __half* __restrict__ scales, const uint8_t* __restrict__ zeros,
                     const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ partial,
                     int n, int k, int group_size, int chunks_per_split) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kRowsPerWarp;
  if (row0 >= n) return;  // the whole warp leaves together; no block-level sync follows
  const int chunks = k / kChunk;
  const int groups = k / group_size;
  const int chunks_per_group = group_size / kChunk;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(chunks, c_begin + chunks_per_split);

  float acc[M][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.0f;
  }

  for (int c = c_begin + lane; c < c_end; c += 32) {
    const int g = c / chunks_per_group;
    float2 w[kRowsPerWarp][16];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + r;
      if (row < n) {
        __half2 wh[16];
        dequant_chunk(qweight[static_cast<size_t>(row) * chunks + c],
                      scales[static_cast<size_t>(row) * groups + g],
                      zeros[static_cast<size_t>(row) * groups + g], wh);
#pragma unroll
        for (int i = 0; i < 16; ++i) w[r][i] = __half22float2(wh[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) w[r][i] = make_float2(0.0f, 0.0f);
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float2 xv[16];
      load_x_chunk(x + static_cast<size_t>(m) * k + static_cast<size_t>(c) * kChunk, xv);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          acc[m][r] = fmaf(xv[i].x, w[r][i].x, acc[m][r]);
          acc[m][r] = fmaf(xv[i].y, w[r][i].y, acc[m][r]);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
      }
    }
  }
  // every lane holds every sum now; lane m * kRowsPerWarp + r writes (m, r)
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = row0 + r;
      if (lane == m * kRowsPerWarp + r && row < n) {
        if (partial != nullptr) {
          partial[(static_cast<size_t>(blockIdx.y) * M + m) * n + row] = acc[m][r];
        } else {
          const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
          out[static_cast<size_t>(m) * n + row] = from_float<T>(acc[m][r] + b);
        }
      }
    }
  }
}

template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, const T* __restrict__ bias,
                                     T* __restrict__ out, int m, int n, int splits) {
  const int64_t total = static_cast<int64_t>(m) * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[s * total + i];
    if (bias != nullptr) sum += to_float(bias[i % n]);
    out[i] = from_float<T>(sum);
  }
}

// --- dequantize to a workspace ----------------------------------------------------------------
__device__ __forceinline__ void store_chunk(float* dst, const __half2 (&w)[16]) {
  float4* v = reinterpret_cast<float4*>(dst);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 a = __half22float2(w[2 * i]), b = __half22float2(w[2 * i + 1]);
    v[i] = make_float4(a.x, a.y, b.x, b.y);
  }
}

__device__ __forceinline__ void store_chunk(__half* dst, const __half2 (&w)[16]) {
  uint4* v = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u;
    memcpy(&u.x, &w[4 * i], 4);
    memcpy(&u.y, &w[4 * i + 1], 4);
    memcpy(&u.z, &w[4 * i + 2], 4);
    memcpy(&u.w, &w[4 * i + 3], 4);
    v[i] = u;
  }
}

__device__ __forceinline__ void store_chunk(__nv_bfloat16* dst, const __half2 (&w)[16]) {
  uint4* v = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_bfloat162 pair = __float22bfloat162_rn(__half22float2(w[4 * i + j]));
      memcpy(&words[j], &pair, 4);
    }
    v[i] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

template <typename T>
__global__ void int4_dequant_kernel(const uint4* __restrict__ qweight,
                                    const __half* __restrict__ scales,
                                    const uint8_t* __restrict__ zeros, T* __restrict__ out, int n,
                                    int k, int group_size) {
  const int chunks = k / kChunk;
  const int groups = k / group_size;
  const int chunks_per_group = group_size / kChunk;
  const int64_t total = static_cast<int64_t>(n) * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks;
    const int c = static_cast<int>(i % chunks);
    const int64_t group = row * groups + c / chunks_per_group;
    __half2 w[16];
    dequant_chunk(qweight[i], scales[group], zeros[group], w);
    store_chunk(out + i * kChunk, w);
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
  }
}

int grid_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T, int M>
void launch_gemv(const Int4LinearParams& p, float* partial, int splits, cudaStream_t stream) {
  const int chunks = static_cast<int>(p.k / kChunk);
  const int chunks_per_split = (chunks + splits - 1) / splits;
  const int used_splits = (chunks + chunks_per_split - 1) / chunks_per_split;
  const int rows_per_block = kWarps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((p.n + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(used_splits));
  const bool split = used_splits > 1;
  int4_gemv_kernel<T, M><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const T*>(p.x), reinterpret_cast<const uint4*>(p.qweight),
      reinterpret_cast<const __half*>(p.scales), p.zeros, static_cast<const T*>(p.bias),
      static_cast<T*>(p.out), split ? partial : nullptr, static_cast<int>(p.n),
      static_cast<int>(p.k), static_cast<int>(p.group_size), chunks_per_split);
  check_launch("int4_gemv_kernel");
  if (split) {
    splitk_reduce_kernel<T><<<grid_for(p.m * p.n, 256), 256, 0, stream>>>(
        partial, static_cast<const T*>(p.bias), static_cast<T*>(p.out), static_cast<int>(p.m),
        static_cast<int>(p.n), used_splits);
    check_launch("splitk_reduce_kernel");
  }
}

template <typename T>
void dispatch_rows(const Int4LinearParams& p, float* partial, int splits, cudaStream_t stream) {
  switch (p.m) {
    case 1: launch_gemv<T, 1>(p, partial, splits, stream); break;
    case 2: launch_gemv<T, 2>(p, partial, splits, stream); break;
    case 3: launch_gemv<T, 3>(p, partial, splits, stream); break;
    case 4: launch_gemv<T, 4>(p, partial, splits, stream); break;
    case 5: launch_gemv<T, 5>(p, partial, splits, stream); break;
    case 6: launch_gemv<T, 6>(p, partial, splits, stream); break;
    case 7: launch_gemv<T, 7>(p, partial, splits, stream); break;
    default: launch_gemv<T, 8>(p, partial, splits, stream); break;
  }
}

void check_alignment(uintptr_t ptr, const char* name) {
  if (ptr % 16 != 0) {
    throw std::invalid_argument(std::string("int4 CUDA kernel: ") + name + " must be 16-byte aligned");
  }
}

}  // namespace

void int4_gemv_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                          uintptr_t bias, uintptr_t out, uintptr_t partial, int64_t m, int64_t n,
                          int64_t k, int64_t group_size, int splits, int dtype, uintptr_t stream) {
  const Int4LinearParams p =
      linear_params<Int4LinearParams>(x, qweight, scales, zeros, bias, out, m, n, k, group_size, dtype);
  check_int4_params(p);
  if (m < 1 || m > kInt4GemvMaxRows) throw std::invalid_argument("int4_gemv: M must be in 1..8");
  if (n >= (int64_t{1} << 31) || k >= (int64_t{1} << 31)) {
    throw std::invalid_argument("int4_gemv: N and K must fit the kernel's 32-bit indices");
  }
  if (splits < 1) throw std::invalid_argument("int4_gemv: splits must be >= 1");
  if (splits > 1 && partial == 0) throw std::invalid_argument("int4_gemv: split-K needs a workspace");
  check_alignment(x, "x");
  check_alignment(qweight, "qweight");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* ws = reinterpret_cast<float*>(partial);
  switch (dtype) {
    case kInt4F32: dispatch_rows<float>(p, ws, splits, s); break;
    case kInt4F16: dispatch_rows<__half>(p, ws, splits, s); break;
    default: dispatch_rows<__nv_bfloat16>(p, ws, splits, s); break;
  }
}

void int4_dequant_cuda_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out,
                             int64_t n, int64_t k, int64_t group_size, int dtype, uintptr_t stream) {
  const auto p = weight_params<Int4LinearParams>(qweight, scales, zeros, n, k, group_size, dtype);
  check_int4_params(p);
  if (out == 0) throw std::invalid_argument("int4_dequant: out is null");
  check_alignment(qweight, "qweight");
  check_alignment(out, "out");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* q = reinterpret_cast<const uint4*>(qweight);
  const auto* sc = reinterpret_cast<const __half*>(scales);
  const auto* z = reinterpret_cast<const uint8_t*>(zeros);
  const int grid = grid_for(n * (k / kChunk), 256);
  const int ni = static_cast<int>(n), ki = static_cast<int>(k), gi = static_cast<int>(group_size);
  switch (dtype) {
    case kInt4F32:
      int4_dequant_kernel<float><<<grid, 256, 0, s>>>(q, sc, z, reinterpret_cast<float*>(out), ni, ki, gi);
      break;
    case kInt4F16:
      int4_dequant_kernel<__half><<<grid, 256, 0, s>>>(q, sc, z, reinterpret_cast<__half*>(out), ni, ki, gi);
      break;
    default:
      int4_dequant_kernel<__nv_bfloat16>
          <<<grid, 256, 0, s>>>(q, sc, z, reinterpret_cast<__nv_bfloat16*>(out), ni, ki, gi);
      break;
  }
  check_launch("int4_dequant_kernel");
}

}  // namespace rgpt
