// The fused decode step's CUDA kernels (decode.h; the C++ twins are in decode_cpu.cpp).
//
// add_rms_norm    one block per row: x + residual rounded to the dtype and stored, its squares
//                 summed in fp32 (warp shuffles, then the block), then the normed row.
// rope_kv_append  one warp per (token, head): q and k heads rotated in place with torch's
//                 roundings (__fmul_rn / __fadd_rn: no FMA contraction), k and v heads stored
//                 into the cache at the token's position (read on the device).
// decode_attention  flash-decoding: a block of 4 warps per (split, kv head, row) scores a tile
//                 of 64 keys at a time for the G query heads sharing the kv head (4 lanes per key,
//                 each 8-element chunks of it; q pre-scaled by scale·log2 e in shared memory),
//                 keeps a running max and sum per head (online softmax, exp2), and adds
//                 p·V with lanes across head dimensions. A row's length (positions[b] + 1) is
//                 read on the device and divided among the `splits` blocks of its kv head, so one
//                 grid serves every length (CUDA-graph capturable, no mask, no padding). With
//                 splits > 1 each block writes its partial sums, max and sum to the workspace and
//                 the last to finish (an atomic counter per (row, kv head)) combines them in
//                 split order and writes the output: one kernel, deterministic.
// silu_mul        grid-stride elementwise, in fp32, rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "decode/decode.h"

namespace rgpt::decode {
namespace {

// --- scalar conversions ----------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

// The sum of v over the block (blockDim.x a multiple of 32), in every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? partial[lane] : 0.0f;
  return warp_sum(v);
}

// --- add + RMSNorm ---------------------------------------------------------------------------------
template <typename T>
__global__ void add_rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                    const T* __restrict__ weight, T* __restrict__ out,
                                    T* __restrict__ residual_out, int dim, float eps) {
  const size_t row = blockIdx.x;
  x += row * dim;
  out += row * dim;
  residual_out += row * dim;
  if (residual != nullptr) residual += row * dim;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float s = to_float(x[i]) + (residual != nullptr ? to_float(residual[i]) : 0.0f);
    const T rounded = from_float<T>(s);
    residual_out[i] = rounded;
    const float v = to_float(rounded);
    squares = fmaf(v, v, squares);
  }
  const float inv = rsqrtf(block_sum(squares) / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {  // this thread's own stores, read back
    out[i] = from_float<T>(to_float(residual_out[i]) * inv * to_float(weight[i]));
  }
}

// --- rope + KV append ------------------------------------------------------------------------------
struct RopeArgs {
  int64_t row_stride, tokens, tokens_per_row, max_len, table_len;
  int heads, kv_heads, head_dim;
};

template <typename T, typename C>
__global__ void rope_kv_append_kernel(T* __restrict__ qkv, C* __restrict__ k_cache,
                                      C* __restrict__ v_cache, const int64_t* __restrict__ positions,
                                      const T* __restrict__ cos, const T* __restrict__ signed_sin,
                                      RopeArgs a) {
  const int lane = threadIdx.x & 31;
  const int slots = a.heads + 2 * a.kv_heads;  // q heads, k heads, v heads of a token
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (item >= a.tokens * slots) return;
  const int64_t n = item / slots;
  const int h = static_cast<int>(item % slots);
  const int64_t pos = positions[n];
  if (pos < 0 || pos >= a.max_len || pos >= a.table_len) return;  // refused on the host
  const int64_t b = n / a.tokens_per_row;
  const int hd = a.head_dim, half = hd >> 1;
  T* x = qkv + n * a.row_stride + static_cast<int64_t>(h) * hd;
  if (h >= a.heads + a.kv_heads) {  // a v head: stored as is
    const int j = h - a.heads - a.kv_heads;
    C* dst = v_cache + ((b * a.kv_heads + j) * a.max_len + pos) * hd;
    for (int i = lane; i < hd; i += 32) dst[i] = from_float<C>(to_float(x[i]));
    return;
  }
  const T* c = cos + pos * hd;
  const T* s = signed_sin + pos * hd;
  C* dst = h >= a.heads ? k_cache + ((b * a.kv_heads + (h - a.heads)) * a.max_len + pos) * hd : nullptr;
  for (int i = lane; i < half; i += 32) {  // each lane owns the pair (i, i + half)
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float a1 = round_to<T>(__fmul_rn(x1, to_float(c[i])));
    const float b1 = round_to<T>(__fmul_rn(x2, to_float(s[i])));
    const float a2 = round_to<T>(__fmul_rn(x2, to_float(c[i + half])));
    const float b2 = round_to<T>(__fmul_rn(x1, to_float(s[i + half])));
    const T r1 = from_float<T>(__fadd_rn(a1, b1)), r2 = from_float<T>(__fadd_rn(a2, b2));
    x[i] = r1;
    x[i + half] = r2;
    if (dst != nullptr) {
      dst[i] = from_float<C>(to_float(r1));
      dst[i + half] = from_float<C>(to_float(r2));
    }
  }
}

// --- decode attention ------------------------------------------------------------------------------
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = kAttentionTile;  // keys per step of a block
constexpr int kMaxGroup = kAttentionMaxGroup;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

// 8 consecutive elements (16-byte aligned) as floats
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <typename H>
__device__ __forceinline__ void load8(const H* p, float (&v)[8]) {  // __half, __nv_bfloat16
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  H h[8];
  memcpy(h, &raw, sizeof raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
}

// kDims consecutive elements as floats: one vector load where the size allows (the caller keeps
// the address a multiple of the size: lane · kDims elements from a 16-byte aligned row)
template <int kDims, typename C>
__device__ __forceinline__ void load_dims(const C* p, float (&v)[kDims]) {
  constexpr int kBytes = kDims * static_cast<int>(sizeof(C));
  C h[kDims];
  if constexpr (kBytes == 32) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p)), b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    memcpy(h, &a, 16);
    memcpy(reinterpret_cast<char*>(h) + 16, &b, 16);
  } else if constexpr (kBytes == 16) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(h, &a, 16);
  } else if constexpr (kBytes == 8) {
    const uint2 a = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(h, &a, 8);
  } else if constexpr (kBytes == 4) {
    const unsigned a = __ldg(reinterpret_cast<const unsigned*>(p));
    memcpy(h, &a, 4);
  } else {
#pragma unroll
    for (int d = 0; d < kDims; ++d) h[d] = p[d];
  }
#pragma unroll
  for (int d = 0; d < kDims; ++d) v[d] = to_float(h[d]);
}

struct AttentionArgs {
  int64_t q_row_stride, max_len;
  int heads, kv_heads, group, splits;
  float scale_log2;  // scale · log2 e: scores in the exp2 domain
  int* counters;     // [B·Hkv]
  float* partial;    // [B·Hkv, splits, G, hd]
  float* stats;      // [B·Hkv, splits, G, 2]: (max, sum)
};

// grid (splits, Hkv, B), kThreads threads; head_dim = 32·kDims
template <typename T, typename C, int kDims>
__global__ void __launch_bounds__(kThreads)
    decode_attention_kernel(const T* __restrict__ q, const C* __restrict__ k_cache,
                            const C* __restrict__ v_cache, const int64_t* __restrict__ positions,
                            T* __restrict__ out, AttentionArgs a) {
  constexpr int kHeadDim = 32 * kDims;
  __shared__ __align__(16) float q_s[kMaxGroup][kHeadDim];  // scaled queries
  __shared__ float p_s[kMaxGroup][kTile];                    // a tile's scores, then weights
  __shared__ float corr_s[kMaxGroup];                        // rescale of the running sums
  __shared__ float stat_s[kMaxGroup][2];                     // this block's (max, sum) per head
  __shared__ float sums_s[kWarps][kMaxGroup][kHeadDim];      // the warps' value sums
  __shared__ float weight_s[kMaxGroup][kMaxSplits];          // combine: each split's weight
  __shared__ float total_s[kMaxGroup];                       // combine: the softmax denominator
  __shared__ bool last_block;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane & 3;
  const int split = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int G = a.group;
  const int64_t pair = static_cast<int64_t>(b) * a.kv_heads + j;  // (row, kv head)
  // this row's slots 0..positions[b] (refused out of range on the host; clamped here)
  const int64_t len = min(max(positions[b] + 1, int64_t{1}), a.max_len);
  const int64_t chunk = (len + a.splits - 1) / a.splits;
  const int64_t start = split * chunk, end = min(len, start + chunk);

  const T* qb = q + b * a.q_row_stride + static_cast<int64_t>(j) * G * kHeadDim;
  for (int i = threadIdx.x; i < G * kHeadDim; i += kThreads) {
    q_s[i / kHeadDim][i % kHeadDim] = to_float(qb[i]) * a.scale_log2;
  }
  const C* keys = k_cache + pair * a.max_len * kHeadDim;
  const C* values = v_cache + pair * a.max_len * kHeadDim;

  float acc[kMaxGroup][kDims];  // lane's dims lane·kDims.. of each head, over this warp's keys
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int d = 0; d < kDims; ++d) acc[g][d] = 0.0f;
  }
  // running max and sum of heads warp and warp + 4 (the warp that updates them)
  float run_max[kMaxGroup / kWarps], run_sum[kMaxGroup / kWarps];
#pragma unroll
  for (int u = 0; u < kMaxGroup / kWarps; ++u) run_max[u] = -INFINITY, run_sum[u] = 0.0f;
  __syncthreads();

  for (int64_t t0 = start; t0 < end; t0 += kTile) {
    // 1. scores: a warp takes 16 keys of the tile, 8 at a time, 4 lanes per key
#pragma unroll
    for (int round = 0; round < kTile / (8 * kWarps); ++round) {
      const int local = warp * (kTile / kWarps) + round * 8 + (lane >> 2);
      const int64_t key = t0 + local;
      float dot[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) dot[g] = 0.0f;
      if (key < end) {
#pragma unroll
        for (int c = 0; c < kDims; ++c) {
          const int e0 = (c * 4 + sub) * 8;  // the 4 lanes of a key read 128 consecutive bytes
          float k8[8];
          load8(keys + key * kHeadDim + e0, k8);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g < G) {
              const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][e0]);
              const float4 qb4 = *reinterpret_cast<const float4*>(&q_s[g][e0 + 4]);
              float d = dot[g];
              d = fmaf(qa.x, k8[0], d), d = fmaf(qa.y, k8[1], d), d = fmaf(qa.z, k8[2], d);
              d = fmaf(qa.w, k8[3], d), d = fmaf(qb4.x, k8[4], d), d = fmaf(qb4.y, k8[5], d);
              d = fmaf(qb4.z, k8[6], d), d = fmaf(qb4.w, k8[7], d);
              dot[g] = d;
            }
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < G) {
          float d = dot[g];
          d += __shfl_xor_sync(0xFFFFFFFFu, d, 1);
          d += __shfl_xor_sync(0xFFFFFFFFu, d, 2);
          if (sub == 0) p_s[g][local] = key < end ? d : -INFINITY;
        }
      }
    }
    __syncthreads();
    // 2. online softmax: warp w updates heads w and w + 4 over the tile's 64 scores
#pragma unroll
    for (int u = 0; u < kMaxGroup / kWarps; ++u) {
      const int g = warp + u * kWarps;
      if (g < G) {
        const float s0 = p_s[g][lane], s1 = p_s[g][lane + 32];
        const float top = fmaxf(run_max[u], warp_max(fmaxf(s0, s1)));  // finite: a key is live
        const float corr = exp2f(run_max[u] - top);                   // 0 on the first tile
        const float p0 = exp2f(s0 - top), p1 = exp2f(s1 - top);       // 0 for dead keys
        run_sum[u] = run_sum[u] * corr + warp_sum(p0 + p1);
        run_max[u] = top;
        p_s[g][lane] = p0;
        p_s[g][lane + 32] = p1;
        if (lane == 0) corr_s[g] = corr;
      }
    }
    __syncthreads();
    // 3. values: warp w takes keys w, w + 4, ... of the tile; lane holds dims lane·kDims..
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < G) {
        const float corr = corr_s[g];
#pragma unroll
        for (int d = 0; d < kDims; ++d) acc[g][d] *= corr;
      }
    }
    const int live = static_cast<int>(min(static_cast<int64_t>(kTile), end - t0));
#pragma unroll 4
    for (int i = warp; i < live; i += kWarps) {
      float v[kDims];
      load_dims<kDims>(values + (t0 + i) * kHeadDim + lane * kDims, v);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < G) {
          const float w = p_s[g][i];
#pragma unroll
          for (int d = 0; d < kDims; ++d) acc[g][d] = fmaf(w, v[d], acc[g][d]);
        }
      }
    }
    __syncthreads();  // p_s and corr_s are rewritten by the next tile
  }

  // the block's sums: the 4 warps' partial value sums added in warp order
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < G) {
#pragma unroll
      for (int d = 0; d < kDims; ++d) sums_s[warp][g][lane * kDims + d] = acc[g][d];
    }
  }
#pragma unroll
  for (int u = 0; u < kMaxGroup / kWarps; ++u) {
    const int g = warp + u * kWarps;
    if (g < G && lane == 0) stat_s[g][0] = run_max[u], stat_s[g][1] = run_sum[u];
  }
  __syncthreads();
  T* ob = out + (static_cast<int64_t>(b) * a.heads + static_cast<int64_t>(j) * G) * kHeadDim;
  if (a.splits == 1) {
    for (int i = threadIdx.x; i < G * kHeadDim; i += kThreads) {
      const int g = i / kHeadDim, d = i % kHeadDim;
      const float o = ((sums_s[0][g][d] + sums_s[1][g][d]) + sums_s[2][g][d]) + sums_s[3][g][d];
      ob[i] = from_float<T>(o / stat_s[g][1]);  // split 0 holds slot 0: the sum is >= 1
    }
    return;
  }

  // split-KV: publish this block's sums and (max, sum); the last block of the pair combines
  float* part = a.partial + (pair * a.splits + split) * G * kHeadDim;
  for (int i = threadIdx.x; i < G * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    part[i] = ((sums_s[0][g][d] + sums_s[1][g][d]) + sums_s[2][g][d]) + sums_s[3][g][d];
  }
  if (threadIdx.x < G) {
    float* stat = a.stats + ((pair * a.splits + split) * G + threadIdx.x) * 2;
    stat[0] = stat_s[threadIdx.x][0];  // -inf and 0 for a split past the row's end
    stat[1] = stat_s[threadIdx.x][1];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&a.counters[pair], 1) == a.splits - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (threadIdx.x < G) {  // per head: the largest max, each split's weight, the total sum
    const int g = threadIdx.x;
    const float* stats = a.stats + pair * a.splits * G * 2;
    float top = -INFINITY;
    for (int s = 0; s < a.splits; ++s) top = fmaxf(top, __ldcg(stats + (s * G + g) * 2));
    float total = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float sum = __ldcg(stats + (s * G + g) * 2 + 1);
      const float w = sum > 0.0f ? exp2f(__ldcg(stats + (s * G + g) * 2) - top) : 0.0f;
      weight_s[g][s] = w;
      total = fmaf(w, sum, total);
    }
    total_s[g] = total;
  }
  __syncthreads();
  const float* parts = a.partial + pair * a.splits * G * kHeadDim;
  for (int i = threadIdx.x; i < G * kHeadDim; i += kThreads) {
    const int g = i / kHeadDim;
    float o = 0.0f;
    for (int s = 0; s < a.splits; ++s) {
      const float w = weight_s[g][s];
      if (w != 0.0f) o = fmaf(w, __ldcg(parts + s * G * kHeadDim + i), o);
    }
    ob[i] = from_float<T>(o / total_s[g]);
  }
  if (threadIdx.x == 0) a.counters[pair] = 0;  // ready for the next launch
}

// --- SiLU · mul ------------------------------------------------------------------------------------
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t rows,
                                int64_t inner) {
  const int64_t total = rows * inner;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inner, c = i - r * inner;
    const float g = to_float(gate_up[r * 2 * inner + c]);
    const float u = to_float(gate_up[r * 2 * inner + inner + c]);
    out[i] = from_float<T>(g / (1.0f + __expf(-g)) * u);
  }
}

// --- launchers -------------------------------------------------------------------------------------
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
  }
}

template <typename F>
void with_cuda_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: f(float{}); return;
    case DType::kF16: f(__half{}); return;
    case DType::kBF16: f(__nv_bfloat16{}); return;
  }
}

template <typename T, typename C, int kDims>
void launch_attention(const DecodeAttentionParams& p, const AttentionArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.batch));
  decode_attention_kernel<T, C, kDims><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.q), static_cast<const C*>(p.k_cache), static_cast<const C*>(p.v_cache),
      p.positions, static_cast<T*>(p.out), args);
  check_launch("decode_attention_kernel");
}

template <typename T, typename C>
void dispatch_head_dim(const DecodeAttentionParams& p, const AttentionArgs& args, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: launch_attention<T, C, 2>(p, args, stream); return;
    case 96: launch_attention<T, C, 3>(p, args, stream); return;
    case 128: launch_attention<T, C, 4>(p, args, stream); return;
    case 256: launch_attention<T, C, 8>(p, args, stream); return;
  }
  throw std::invalid_argument("decode_attention (CUDA): head_dim must be 64, 96, 128 or 256");
}

}  // namespace

void add_rms_norm_cuda(const AddRmsNormParams& p, void* stream) {
  if (p.rows == 0) return;
  // enough threads for ~8 elements each, in whole warps, 32..1024
  const int threads = static_cast<int>(std::clamp<int64_t>((p.dim / 8 + 31) / 32 * 32, 32, 1024));
  auto s = static_cast<cudaStream_t>(stream);
  with_cuda_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    add_rms_norm_kernel<T><<<static_cast<unsigned>(p.rows), threads, 0, s>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.residual), static_cast<const T*>(p.weight),
        static_cast<T*>(p.out), static_cast<T*>(p.residual_out), static_cast<int>(p.dim), p.eps);
  });
  check_launch("add_rms_norm_kernel");
}

void rope_kv_append_cuda(const RopeKvParams& p, void* stream) {
  const int64_t items = p.tokens * (p.num_heads + 2 * p.num_kv_heads);
  if (items == 0) return;
  RopeArgs args{p.row_stride, p.tokens, p.tokens_per_row, p.max_len, p.table_len,
                static_cast<int>(p.num_heads), static_cast<int>(p.num_kv_heads),
                static_cast<int>(p.head_dim)};
  constexpr int kRopeWarps = 4;
  const auto blocks = static_cast<unsigned>((items + kRopeWarps - 1) / kRopeWarps);
  auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto t, auto c) {
    using T = decltype(t);
    using C = decltype(c);
    rope_kv_append_kernel<T, C><<<blocks, 32 * kRopeWarps, 0, s>>>(
        static_cast<T*>(p.qkv), static_cast<C*>(p.k_cache), static_cast<C*>(p.v_cache), p.positions,
        static_cast<const T*>(p.cos), static_cast<const T*>(p.signed_sin), args);
  };
  if (p.dtype == p.cache_dtype) {
    with_cuda_dtype(p.dtype, [&](auto t) { launch(t, t); });
  } else {  // fp16 cache under fp32 activations (decode_host.cpp allows no other pair)
    launch(float{}, __half{});
  }
  check_launch("rope_kv_append_kernel");
}

void decode_attention_cuda(const DecodeAttentionParams& p, void* stream) {
  if (p.batch == 0) return;
  AttentionArgs args;
  args.q_row_stride = p.q_row_stride;
  args.max_len = p.max_len;
  args.heads = static_cast<int>(p.num_heads);
  args.kv_heads = static_cast<int>(p.num_kv_heads);
  args.group = static_cast<int>(p.num_heads / p.num_kv_heads);
  args.splits = p.splits;
  args.scale_log2 = p.scale * kLog2e;
  const int64_t pairs = p.batch * p.num_kv_heads;
  auto* base = static_cast<char*>(p.workspace);
  args.counters = reinterpret_cast<int*>(base);
  args.partial = base ? reinterpret_cast<float*>(base + (pairs * 4 + 15) / 16 * 16) : nullptr;
  args.stats = base ? args.partial + pairs * p.splits * args.group * p.head_dim : nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == p.cache_dtype) {
    with_cuda_dtype(p.dtype, [&](auto t) {
      using T = decltype(t);
      dispatch_head_dim<T, T>(p, args, s);
    });
  } else {
    dispatch_head_dim<float, __half>(p, args, s);
  }
}

void silu_mul_cuda(const SiluMulParams& p, void* stream) {
  const int64_t total = p.rows * p.inner;
  if (total == 0) return;
  const int threads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  auto s = static_cast<cudaStream_t>(stream);
  with_cuda_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    silu_mul_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(p.gate_up), static_cast<T*>(p.out),
                                                  p.rows, p.inner);
  });
  check_launch("silu_mul_kernel");
}

}  // namespace rgpt::decode
