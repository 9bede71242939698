// The fused decode step: the one host file. Turns what Python passes (integers, dtype tags) into
// a params struct, checks everything a kernel relies on, and runs the C++ twin or launches the
// CUDA kernel. A kernel never sees an argument this file has not checked.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "decode/decode.h"

namespace rgpt::decode {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

DType dtype_arg(int tag, const char* name) {
  if (tag < 0 || tag > 2) fail(std::string(name) + " dtype tag must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  return static_cast<DType>(tag);
}

int64_t element_size(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

void check_pointer(uintptr_t address, int64_t alignment, const std::string& name) {
  if (address == 0) fail(name + " is a null pointer");
  if (address % static_cast<uintptr_t>(alignment) != 0) {
    fail(name + " is not aligned to " + std::to_string(alignment) + " bytes");
  }
}

void check_cuda_build(bool cuda, const char* what) {
#ifndef RGPT_WITH_CUDA
  if (cuda) {
    fail(std::string(what) + ": rgpt_rt._C was built without CUDA; rebuild with nvcc on PATH");
  }
#endif
}

// The CPU twins read positions on the host: refuse any outside [0, limit).
void check_positions(const int64_t* positions, int64_t count, int64_t limit, const char* what) {
  for (int64_t i = 0; i < count; ++i) {
    if (positions[i] < 0 || positions[i] >= limit) {
      fail(std::string(what) + ": position " + std::to_string(positions[i]) + " of token " +
           std::to_string(i) + " is outside the cache's slots 0.." + std::to_string(limit - 1));
    }
  }
}

}  // namespace

int decode_attention_splits(int64_t batch_heads, int64_t max_len, int multiprocessors) {
  const int64_t sms = std::max(1, multiprocessors);
  const int64_t tiles = (max_len + kAttentionTile - 1) / kAttentionTile;
  const int64_t wanted = (2 * sms + std::max<int64_t>(batch_heads, 1) - 1) / std::max<int64_t>(batch_heads, 1);
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, tiles), 1, 64));
}

int64_t decode_attention_workspace_bytes(int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                                         int64_t head_dim, int splits) {
  if (splits <= 1) return 0;
  if (num_kv_heads < 1) fail("decode_attention_workspace_bytes: num_kv_heads must be >= 1");
  const int64_t pairs = batch * num_kv_heads, group = num_heads / num_kv_heads;
  return (pairs * 4 + 15) / 16 * 16 + int64_t{4} * pairs * splits * group * (head_dim + 2);
}

bool decode_attention_cuda_supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int dtype, int cache_dtype) {
  if (num_kv_heads < 1 || num_heads % num_kv_heads != 0) return false;
  if (num_heads / num_kv_heads > kAttentionMaxGroup) return false;
  if (head_dim != 64 && head_dim != 96 && head_dim != 128 && head_dim != 256) return false;
  return dtype == cache_dtype || (dtype == 0 && cache_dtype == 1);
}

void add_rms_norm_entry(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out,
                        uintptr_t residual_out, int64_t rows, int64_t dim, double eps, int dtype,
                        bool cuda, uintptr_t stream) {
  check_cuda_build(cuda, "add_rms_norm");
  AddRmsNormParams p;
  p.dtype = dtype_arg(dtype, "add_rms_norm");
  if (rows < 0 || dim < 1 || dim >= (int64_t{1} << 31)) {
    fail("add_rms_norm: rows must be >= 0 and dim in 1..2^31-1; got " + std::to_string(rows) +
         ", " + std::to_string(dim));
  }
  if (!(eps >= 0.0)) fail("add_rms_norm: eps must be >= 0");
  if (cuda && rows >= (int64_t{1} << 31)) fail("add_rms_norm: at most 2^31-1 rows on CUDA");
  p.rows = rows;
  p.dim = dim;
  p.eps = static_cast<float>(eps);
  if (rows > 0) {
    const int64_t size = element_size(p.dtype);
    check_pointer(x, size, "add_rms_norm: x");
    check_pointer(weight, size, "add_rms_norm: weight");
    check_pointer(out, size, "add_rms_norm: out");
    check_pointer(residual_out, size, "add_rms_norm: residual_out");
    if (residual != 0) check_pointer(residual, size, "add_rms_norm: residual");
  }
  p.x = reinterpret_cast<const void*>(x);
  p.residual = reinterpret_cast<const void*>(residual);
  p.weight = reinterpret_cast<const void*>(weight);
  p.out = reinterpret_cast<void*>(out);
  p.residual_out = reinterpret_cast<void*>(residual_out);
  if (cuda) {
#ifdef RGPT_WITH_CUDA
    add_rms_norm_cuda(p, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  add_rms_norm_cpu(p);
}

void rope_kv_append_entry(uintptr_t qkv, int64_t row_stride, uintptr_t k_cache, uintptr_t v_cache,
                          uintptr_t positions, uintptr_t cos, uintptr_t signed_sin, int64_t tokens,
                          int64_t tokens_per_row, int64_t batch, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t max_len,
                          int64_t table_len, int dtype, int cache_dtype, bool cuda,
                          uintptr_t stream, bool use_simd) {
  check_cuda_build(cuda, "rope_kv_append");
  RopeKvParams p;
  p.dtype = dtype_arg(dtype, "rope_kv_append: qkv");
  p.cache_dtype = dtype_arg(cache_dtype, "rope_kv_append: cache");
  if (num_heads < 1 || num_kv_heads < 1 || num_heads % num_kv_heads != 0) {
    fail("rope_kv_append: num_heads must be a positive multiple of num_kv_heads");
  }
  if (head_dim < 2 || head_dim % 2 != 0) fail("rope_kv_append: head_dim must be even and >= 2");
  if (tokens < 0 || tokens_per_row < 1 || tokens % tokens_per_row != 0 ||
      tokens / tokens_per_row > batch) {
    fail("rope_kv_append: tokens must be whole rows of tokens_per_row, at most batch rows; got " +
         std::to_string(tokens) + " tokens of " + std::to_string(tokens_per_row) + " per row, batch " +
         std::to_string(batch));
  }
  if (row_stride < (num_heads + 2 * num_kv_heads) * head_dim) {
    fail("rope_kv_append: a row of qkv holds (num_heads + 2 num_kv_heads) head_dim = " +
         std::to_string((num_heads + 2 * num_kv_heads) * head_dim) + " values; row_stride is " +
         std::to_string(row_stride));
  }
  if (max_len < 1 || table_len < 1) fail("rope_kv_append: max_len and table_len must be >= 1");
  if (cuda && p.dtype != p.cache_dtype && !(p.dtype == DType::kF32 && p.cache_dtype == DType::kF16)) {
    fail("rope_kv_append (CUDA): the cache's dtype must be qkv's, or fp16 under fp32");
  }
  if (cuda && (num_heads + 2 * num_kv_heads) * head_dim >= (int64_t{1} << 31)) {
    fail("rope_kv_append (CUDA): a row must hold fewer than 2^31 values");
  }
  p.qkv = reinterpret_cast<void*>(qkv);
  p.row_stride = row_stride;
  p.k_cache = reinterpret_cast<void*>(k_cache);
  p.v_cache = reinterpret_cast<void*>(v_cache);
  p.positions = reinterpret_cast<const int64_t*>(positions);
  p.cos = reinterpret_cast<const void*>(cos);
  p.signed_sin = reinterpret_cast<const void*>(signed_sin);
  p.tokens = tokens;
  p.tokens_per_row = tokens_per_row;
  p.batch = batch;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.max_len = max_len;
  p.table_len = table_len;
  if (tokens == 0) return;
  const int64_t size = element_size(p.dtype), cache_size = element_size(p.cache_dtype);
  check_pointer(qkv, size, "rope_kv_append: qkv");
  check_pointer(cos, size, "rope_kv_append: cos");
  check_pointer(signed_sin, size, "rope_kv_append: signed_sin");
  check_pointer(k_cache, cache_size, "rope_kv_append: k_cache");
  check_pointer(v_cache, cache_size, "rope_kv_append: v_cache");
  check_pointer(positions, 8, "rope_kv_append: positions");
  if (cuda) {
#ifdef RGPT_WITH_CUDA
    rope_kv_append_cuda(p, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  check_positions(p.positions, tokens, std::min(max_len, table_len), "rope_kv_append");
  rope_kv_append_cpu(p, use_simd);
}

void decode_attention_entry(uintptr_t q, int64_t q_row_stride, uintptr_t k_cache,
                            uintptr_t v_cache, uintptr_t positions, uintptr_t out, int64_t batch,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t max_len, double scale, int dtype, int cache_dtype, int splits,
                            uintptr_t workspace, int64_t workspace_bytes, bool cuda,
                            uintptr_t stream, int num_threads, bool use_simd) {
  check_cuda_build(cuda, "decode_attention");
  DecodeAttentionParams p;
  p.dtype = dtype_arg(dtype, "decode_attention: q");
  p.cache_dtype = dtype_arg(cache_dtype, "decode_attention: cache");
  if (num_heads < 1 || num_kv_heads < 1 || num_heads % num_kv_heads != 0) {
    fail("decode_attention: num_heads must be a positive multiple of num_kv_heads");
  }
  if (batch < 0 || head_dim < 1 || max_len < 1) {
    fail("decode_attention: batch must be >= 0, head_dim and max_len >= 1");
  }
  if (q_row_stride < num_heads * head_dim) {
    fail("decode_attention: q_row_stride " + std::to_string(q_row_stride) + " is less than a row's " +
         std::to_string(num_heads * head_dim) + " values");
  }
  if (!(scale > 0.0)) fail("decode_attention: scale must be > 0");
  p.q = reinterpret_cast<const void*>(q);
  p.q_row_stride = q_row_stride;
  p.k_cache = reinterpret_cast<const void*>(k_cache);
  p.v_cache = reinterpret_cast<const void*>(v_cache);
  p.positions = reinterpret_cast<const int64_t*>(positions);
  p.out = reinterpret_cast<void*>(out);
  p.batch = batch;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.max_len = max_len;
  p.scale = static_cast<float>(scale);
  if (batch == 0) return;
  const int64_t size = element_size(p.dtype);
  check_pointer(q, size, "decode_attention: q");
  check_pointer(out, size, "decode_attention: out");
  check_pointer(positions, 8, "decode_attention: positions");
  if (cuda) {
#ifdef RGPT_WITH_CUDA
    if (!decode_attention_cuda_supports(num_heads, num_kv_heads, head_dim, dtype, cache_dtype)) {
      fail("decode_attention (CUDA) takes head_dim 64, 96, 128 or 256, at most " +
           std::to_string(kAttentionMaxGroup) +
           " query heads per kv head, and a cache in q's dtype (or fp16 under fp32); got head_dim " +
           std::to_string(head_dim) + ", " + std::to_string(num_heads) + " heads over " +
           std::to_string(num_kv_heads));
    }
    if (splits < 1 || splits > 64) fail("decode_attention: splits must be in 1..64");
    check_pointer(k_cache, 16, "decode_attention: k_cache");
    check_pointer(v_cache, 16, "decode_attention: v_cache");
    if (batch >= 65536 || num_kv_heads >= 65536) fail("decode_attention (CUDA): batch and num_kv_heads must be below 65536");
    const int64_t needed = decode_attention_workspace_bytes(batch, num_heads, num_kv_heads, head_dim, splits);
    if (needed > 0) {
      check_pointer(workspace, 16, "decode_attention: workspace");
      if (workspace_bytes < needed) {
        fail("decode_attention: the workspace holds " + std::to_string(workspace_bytes) + " bytes; " +
             std::to_string(needed) + " are needed (decode_attention_workspace_bytes)");
      }
    }
    p.splits = splits;
    p.workspace = reinterpret_cast<void*>(workspace);
    p.workspace_bytes = workspace_bytes;
    decode_attention_cuda(p, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  const int64_t cache_size = element_size(p.cache_dtype);
  check_pointer(k_cache, cache_size, "decode_attention: k_cache");
  check_pointer(v_cache, cache_size, "decode_attention: v_cache");
  if (num_threads < 1) fail("decode_attention: num_threads must be >= 1");
  check_positions(p.positions, batch, max_len, "decode_attention");
  decode_attention_cpu(p, num_threads, use_simd);
}

void silu_mul_entry(uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t inner, int dtype,
                    bool cuda, uintptr_t stream, bool use_simd) {
  check_cuda_build(cuda, "silu_mul");
  SiluMulParams p;
  p.dtype = dtype_arg(dtype, "silu_mul");
  if (rows < 0 || inner < 1) fail("silu_mul: rows must be >= 0 and inner >= 1");
  p.gate_up = reinterpret_cast<const void*>(gate_up);
  p.out = reinterpret_cast<void*>(out);
  p.rows = rows;
  p.inner = inner;
  if (rows == 0) return;
  check_pointer(gate_up, element_size(p.dtype), "silu_mul: gate_up");
  check_pointer(out, element_size(p.dtype), "silu_mul: out");
  if (cuda) {
#ifdef RGPT_WITH_CUDA
    silu_mul_cuda(p, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  silu_mul_cpu(p, use_simd);
}

}  // namespace rgpt::decode
