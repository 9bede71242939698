// The fused decode step's kernels (csrc/decode/README.md): what a LLaMA layer runs between its
// INT4 GEMVs, for one token per row.
//
//   add_rms_norm     residual_out = x + residual;  out = rms_norm(residual_out) · weight
//   rope_kv_append   q, k of each token rotated in place inside the qkv projection's output;
//                    k and v written into the cache at the token's position
//   decode_attention each row's query heads over that row's own slots 0..positions[b]
//                    (split-KV on CUDA: no mask, no padding; GQA; fp32 accumulation)
//   silu_mul         out = silu(gate) · up from the gate_up projection's output
//
// Every kernel has a C++ twin (decode_cpu.cpp) and a CUDA kernel (decode_cuda.cu) computing the
// same function; decode_host.cpp validates what Python passes and dispatches on the device.
// Kernels see raw pointers and these params structs, never a Tensor; they never allocate or
// synchronize.
#pragma once

#include <cstdint>

namespace rgpt::decode {

// torch dtypes by tag (rgpt_rt/ops/decode.py DTYPE_TAGS)
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// residual_out[r] = x[r] + residual[r] (rounded to dtype; residual null: a copy of x)
// out[r] = (residual_out[r] · rsqrt(mean(residual_out[r]²) + eps)) · weight, in fp32, rounded once
struct AddRmsNormParams {
  const void* x = nullptr;         // [rows, dim]
  const void* residual = nullptr;  // [rows, dim] or null
  const void* weight = nullptr;    // [dim]
  void* out = nullptr;             // [rows, dim]
  void* residual_out = nullptr;    // [rows, dim]
  int64_t rows = 0, dim = 0;
  float eps = 0.0f;
  DType dtype = DType::kF32;  // of all five
};

// Token n (row n / tokens_per_row) sits at slot positions[n]. Its q heads (columns [0, H·hd)) and
// k heads ([H·hd, (H+Hkv)·hd)) of qkv are rotated in place, as HF LLaMA's rotate-half with the
// tables of that position, x·cos + cat(x2, x1)·signed_sin, with torch's roundings (each product
// and the sum rounded to dtype: bit for bit what the unfused step computes); then the rotated k
// and the v heads ([(H+Hkv)·hd, (H+2Hkv)·hd)) are written, rounded to cache_dtype, at
// k_cache[row, head, positions[n]] and v_cache[...].
struct RopeKvParams {
  void* qkv = nullptr;  // [tokens, row_stride] (dtype), row n = token n
  int64_t row_stride = 0;
  void* k_cache = nullptr;  // [batch, Hkv, max_len, hd] contiguous (cache_dtype)
  void* v_cache = nullptr;
  const int64_t* positions = nullptr;  // [tokens]
  const void* cos = nullptr;           // [table_len, hd] (dtype)
  const void* signed_sin = nullptr;    // [table_len, hd]: −sin in the first half, +sin in the second
  int64_t tokens = 0, tokens_per_row = 1, batch = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, max_len = 0, table_len = 0;
  DType dtype = DType::kF32, cache_dtype = DType::kF32;
};

// out[b, h] = softmax(q[b, h] · K[b, j]ᵀ · scale) · V[b, j] over slots 0..positions[b] of row b,
// j = h / (H / Hkv) (grouped-query attention). Scores, softmax and sums in fp32; out rounded once.
struct DecodeAttentionParams {
  const void* q = nullptr;  // [batch, H, hd]: row b at q + b·q_row_stride, heads contiguous (dtype)
  int64_t q_row_stride = 0;
  const void* k_cache = nullptr;  // [batch, Hkv, max_len, hd] contiguous (cache_dtype)
  const void* v_cache = nullptr;
  const int64_t* positions = nullptr;  // [batch]: the last slot row b attends (its new token)
  void* out = nullptr;                 // [batch, H·hd] (dtype)
  int64_t batch = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, max_len = 0;
  float scale = 1.0f;
  DType dtype = DType::kF32, cache_dtype = DType::kF32;
  // CUDA: blocks per (row, kv head); > 1 needs the workspace (decode_attention_workspace_bytes)
  int splits = 1;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// out[r, i] = silu(gate_up[r, i]) · gate_up[r, inner + i], in fp32, rounded once
struct SiluMulParams {
  const void* gate_up = nullptr;  // [rows, 2·inner]
  void* out = nullptr;            // [rows, inner]
  int64_t rows = 0, inner = 0;
  DType dtype = DType::kF32;
};

// --- CUDA plan (pure arithmetic: decode_host.cpp, built without CUDA too) ----------------------
constexpr int kAttentionMaxGroup = 8;  // query heads per kv head the CUDA kernel takes
constexpr int kAttentionTile = 64;     // keys a CUDA block scores per step

// Blocks per (row, kv head) for `batch_heads` = B·Hkv of them on `multiprocessors` SMs, for a
// cache of max_len slots: enough for ~2 blocks per SM, each split at least one tile of the
// longest row; a row's own length is divided among the splits on the device at run time.
int decode_attention_splits(int64_t batch_heads, int64_t max_len, int multiprocessors);

// int32 counters [B·Hkv] (16-byte padded), then fp32 partial outputs [B·Hkv, splits, G, hd] and
// (max, sum) pairs [B·Hkv, splits, G, 2]; 0 when splits == 1. Zero it once: every launch leaves
// its counters zero again (one launch at a time per workspace).
int64_t decode_attention_workspace_bytes(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                         int64_t head_dim, int splits);

// --- C++ twins (decode_cpu.cpp) -----------------------------------------------------------------
// use_simd: the AVX2 + FMA + F16C paths where the CPU has them (decode_cpu_has_simd)
bool decode_cpu_has_simd();
void add_rms_norm_cpu(const AddRmsNormParams& p);
void rope_kv_append_cpu(const RopeKvParams& p, bool use_simd);
void decode_attention_cpu(const DecodeAttentionParams& p, int num_threads, bool use_simd);
void silu_mul_cpu(const SiluMulParams& p, bool use_simd);

#ifdef RGPT_WITH_CUDA
// --- CUDA (decode_cuda.cu): launch on `stream` ----------------------------------------------------
void add_rms_norm_cuda(const AddRmsNormParams& p, void* stream);
void rope_kv_append_cuda(const RopeKvParams& p, void* stream);
void decode_attention_cuda(const DecodeAttentionParams& p, void* stream);
void silu_mul_cuda(const SiluMulParams& p, void* stream);
#endif

// --- Python entries (decode_host.cpp): pointers as integers, dtypes as tags; `cuda` picks the
// device (stream: a cudaStream_t as an integer). Bad arguments throw std::invalid_argument.
void add_rms_norm_entry(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out,
                        uintptr_t residual_out, int64_t rows, int64_t dim, double eps, int dtype,
                        bool cuda, uintptr_t stream);
void rope_kv_append_entry(uintptr_t qkv, int64_t row_stride, uintptr_t k_cache, uintptr_t v_cache,
                          uintptr_t positions, uintptr_t cos, uintptr_t signed_sin, int64_t tokens,
                          int64_t tokens_per_row, int64_t batch, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t max_len,
                          int64_t table_len, int dtype, int cache_dtype, bool cuda,
                          uintptr_t stream, bool use_simd);
void decode_attention_entry(uintptr_t q, int64_t q_row_stride, uintptr_t k_cache,
                            uintptr_t v_cache, uintptr_t positions, uintptr_t out, int64_t batch,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t max_len, double scale, int dtype, int cache_dtype, int splits,
                            uintptr_t workspace, int64_t workspace_bytes, bool cuda,
                            uintptr_t stream, int num_threads, bool use_simd);
void silu_mul_entry(uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t inner, int dtype,
                    bool cuda, uintptr_t stream, bool use_simd);
// Whether the CUDA attention kernel takes these shapes (head_dim 64, 96, 128 or 256; at most
// kAttentionMaxGroup query heads per kv head; cache dtype = dtype, or fp16 under fp32).
bool decode_attention_cuda_supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int dtype, int cache_dtype);

}  // namespace rgpt::decode
