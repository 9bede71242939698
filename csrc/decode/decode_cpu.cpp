// The fused decode step's C++ twins (decode.h): the same functions as the CUDA kernels, for the
// CPU Session and as the plain reference beside them. Compiled with -ffp-contract=off
// (CMakeLists.txt), so a product followed by a sum is rounded twice, as torch's separate ops
// round it: rope_kv_append is bit for bit torch's rotate-half, add_rms_norm's add is torch's add.
//
//   portable   every dtype pair, any head_dim; fp16/bf16 converted exactly on bit patterns
//   AVX2 paths (use_simd, where the CPU has AVX2 + FMA + F16C), fp32 activations:
//              decode_attention (fp32 or fp16 cache, head_dim % 8 == 0): 8-wide FMA dot products
//              and value sums, fp16 widened by F16C; rope_kv_append: fp16 cache rows rounded by
//              F16C (to nearest even, as the portable code: the same bits); silu_mul: an 8-wide
//              exp (Cody-Waite reduction and Cephes' polynomial, within 2 ulp of expf)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "decode/decode.h"
#include "int4/fp16_bits.h"
#include "int4/row_split.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RGPT_DECODE_X86 1
#define RGPT_DECODE_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace rgpt::decode {
namespace {

#ifdef RGPT_DECODE_X86
// dst[i] = fp16(src[i]), rounded to nearest even (as float_to_half_bits)
RGPT_DECODE_AVX2 void store_half_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_half_bits(src[i]);
}
#endif

// --- scalar types: storage and exact conversions -------------------------------------------------
struct F32 {
  using Storage = float;
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static float to_float(uint16_t bits) { return half_bits_to_float(bits); }
  static uint16_t from_float(float v) { return float_to_half_bits(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static float to_float(uint16_t bits) {
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &word, sizeof v);
    return v;
  }
  static uint16_t from_float(float v) {  // round to nearest even, as torch's c10::BFloat16
    uint32_t word;
    std::memcpy(&word, &v, sizeof word);
    if ((word & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // nan
    word += 0x7FFFu + ((word >> 16) & 1u);
    return static_cast<uint16_t>(word >> 16);
  }
};

// v rounded to T, as a float
template <class T>
float round_to(float v) {
  return T::to_float(T::from_float(v));
}

// f(T{}) for the dtype tag
template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: f(F32{}); return;
    case DType::kF16: f(F16{}); return;
    case DType::kBF16: f(BF16{}); return;
  }
  throw std::invalid_argument("decode: unknown dtype tag");
}

// --- add + RMSNorm -------------------------------------------------------------------------------
template <class T>
void add_rms_norm_rows(const AddRmsNormParams& p) {
  using S = typename T::Storage;
  const int64_t dim = p.dim;
  const auto* w = static_cast<const S*>(p.weight);
  for (int64_t r = 0; r < p.rows; ++r) {
    const auto* x = static_cast<const S*>(p.x) + r * dim;
    const auto* res = p.residual ? static_cast<const S*>(p.residual) + r * dim : nullptr;
    auto* sum = static_cast<S*>(p.residual_out) + r * dim;
    auto* out = static_cast<S*>(p.out) + r * dim;
    float squares[8] = {};  // eight chains: the compiler keeps them in one vector register
    for (int64_t i = 0; i < dim; ++i) {
      const float s = T::to_float(x[i]) + (res ? T::to_float(res[i]) : 0.0f);
      sum[i] = T::from_float(s);
      const float v = T::to_float(sum[i]);
      squares[i & 7] += v * v;
    }
    const float total = ((squares[0] + squares[1]) + (squares[2] + squares[3])) +
                        ((squares[4] + squares[5]) + (squares[6] + squares[7]));
    const float inv = 1.0f / std::sqrt(total / static_cast<float>(dim) + p.eps);
    for (int64_t i = 0; i < dim; ++i) {
      out[i] = T::from_float(T::to_float(sum[i]) * inv * T::to_float(w[i]));
    }
  }
}

// --- rope + KV append ----------------------------------------------------------------------------
// dst[i] = C(src[i]) for a row of n values of T
template <class T, class C>
void store_row(const typename T::Storage* src, typename C::Storage* dst, int64_t n, bool simd) {
#ifdef RGPT_DECODE_X86
  if constexpr (std::is_same_v<T, F32> && std::is_same_v<C, F16>) {
    if (simd) {
      store_half_row(src, dst, n);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = C::from_float(T::to_float(src[i]));
}

template <class T, class C>
void rope_kv_rows(const RopeKvParams& p, bool simd) {
  using S = typename T::Storage;
  using SC = typename C::Storage;
  const int64_t H = p.num_heads, Hkv = p.num_kv_heads, hd = p.head_dim, half = hd / 2;
  for (int64_t n = 0; n < p.tokens; ++n) {
    const int64_t b = n / p.tokens_per_row, pos = p.positions[n];
    auto* row = static_cast<S*>(p.qkv) + n * p.row_stride;
    const auto* cos = static_cast<const S*>(p.cos) + pos * hd;
    const auto* sin = static_cast<const S*>(p.signed_sin) + pos * hd;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      S* x = row + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = T::to_float(x[i]), x2 = T::to_float(x[i + half]);
        // x·cos + cat(x2, x1)·signed_sin: each product and the sum rounded to T, as torch does
        const float a1 = round_to<T>(x1 * T::to_float(cos[i]));
        const float b1 = round_to<T>(x2 * T::to_float(sin[i]));
        const float a2 = round_to<T>(x2 * T::to_float(cos[i + half]));
        const float b2 = round_to<T>(x1 * T::to_float(sin[i + half]));
        x[i] = T::from_float(a1 + b1);
        x[i + half] = T::from_float(a2 + b2);
      }
    }
    for (int64_t j = 0; j < Hkv; ++j) {
      const int64_t slot = ((b * Hkv + j) * p.max_len + pos) * hd;
      const S* k = row + (H + j) * hd;
      const S* v = row + (H + Hkv + j) * hd;
      store_row<T, C>(k, static_cast<SC*>(p.k_cache) + slot, hd, simd);
      store_row<T, C>(v, static_cast<SC*>(p.v_cache) + slot, hd, simd);
    }
  }
}

// --- decode attention ----------------------------------------------------------------------------
int64_t row_length(const DecodeAttentionParams& p, int64_t b) {
  return p.positions[b] + 1;  // positions were checked: 0 <= positions[b] < max_len
}

// Σ a[d]·b[d] in eight chains, added pairwise (as accurate as torch's blocked sums; the
// compiler keeps the chains in one vector register)
float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {};
  for (int64_t d = 0; d < n; ++d) part[d & 7] += a[d] * b[d];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// One (row, kv head) pair per iteration of [begin, end): scores of its G query heads over the
// row's slots, a softmax per head, then the value sums; two passes over the keys, in fp32.
template <class T, class C>
void attention_portable(const DecodeAttentionParams& p, int64_t begin, int64_t end) {
  using S = typename T::Storage;
  using SC = typename C::Storage;
  const int64_t Hkv = p.num_kv_heads, G = p.num_heads / Hkv, hd = p.head_dim;
  std::vector<float> q(G * hd), acc(G * hd), row(hd), scores, sums(G);
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / Hkv, j = bj % Hkv, len = row_length(p, b);
    const auto* qb = static_cast<const S*>(p.q) + b * p.q_row_stride + j * G * hd;
    for (int64_t i = 0; i < G * hd; ++i) q[i] = T::to_float(qb[i]) * p.scale;
    const auto* keys = static_cast<const SC*>(p.k_cache) + bj * p.max_len * hd;
    const auto* values = static_cast<const SC*>(p.v_cache) + bj * p.max_len * hd;
    scores.resize(G * len);
    for (int64_t s = 0; s < len; ++s) {
      for (int64_t d = 0; d < hd; ++d) row[d] = C::to_float(keys[s * hd + d]);
      for (int64_t g = 0; g < G; ++g) scores[g * len + s] = dot(q.data() + g * hd, row.data(), hd);
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores.data() + g * len;
      const float top = *std::max_element(sc, sc + len);
      float total = 0.0f;
      for (int64_t s = 0; s < len; ++s) total += (sc[s] = std::exp(sc[s] - top));
      sums[g] = total;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < len; ++s) {
      for (int64_t d = 0; d < hd; ++d) row[d] = C::to_float(values[s * hd + d]);
      for (int64_t g = 0; g < G; ++g) {
        const float weight = scores[g * len + s];
        for (int64_t d = 0; d < hd; ++d) acc[g * hd + d] += weight * row[d];
      }
    }
    auto* out = static_cast<S*>(p.out) + (b * p.num_heads + j * G) * hd;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < hd; ++d) out[g * hd + d] = T::from_float(acc[g * hd + d] / sums[g]);
    }
  }
}

#ifdef RGPT_DECODE_X86
RGPT_DECODE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
RGPT_DECODE_AVX2 inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
RGPT_DECODE_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// The portable pass structure with fp32 q (T = F32) and 8-wide FMAs; head_dim % 8 == 0.
template <class C>
RGPT_DECODE_AVX2 void attention_avx2(const DecodeAttentionParams& p, int64_t begin, int64_t end) {
  using SC = typename C::Storage;
  constexpr int64_t kHeads = 4;  // query heads scored per pass over a key row
  const int64_t Hkv = p.num_kv_heads, G = p.num_heads / Hkv, hd = p.head_dim;
  std::vector<float> q(G * hd), acc(G * hd), scores, sums(G);
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / Hkv, j = bj % Hkv, len = row_length(p, b);
    const float* qb = static_cast<const float*>(p.q) + b * p.q_row_stride + j * G * hd;
    for (int64_t i = 0; i < G * hd; ++i) q[i] = qb[i] * p.scale;
    const auto* keys = static_cast<const SC*>(p.k_cache) + bj * p.max_len * hd;
    const auto* values = static_cast<const SC*>(p.v_cache) + bj * p.max_len * hd;
    scores.resize(G * len);
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int64_t heads = std::min(kHeads, G - g0);
      for (int64_t s = 0; s < len; ++s) {
        __m256 dot[kHeads] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                              _mm256_setzero_ps()};
        for (int64_t c = 0; c < hd; c += 8) {
          const __m256 k8 = load8(keys + s * hd + c);
          for (int64_t g = 0; g < heads; ++g) {
            dot[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q.data() + (g0 + g) * hd + c), k8, dot[g]);
          }
        }
        for (int64_t g = 0; g < heads; ++g) scores[(g0 + g) * len + s] = horizontal_sum(dot[g]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sc = scores.data() + g * len;
      const float top = *std::max_element(sc, sc + len);
      float total = 0.0f;
      for (int64_t s = 0; s < len; ++s) total += (sc[s] = std::exp(sc[s] - top));
      sums[g] = total;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < len; ++s) {
      for (int64_t c = 0; c < hd; c += 8) {
        const __m256 v8 = load8(values + s * hd + c);
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc.data() + g * hd + c;
          const __m256 w = _mm256_set1_ps(scores[g * len + s]);
          _mm256_storeu_ps(a, _mm256_fmadd_ps(w, v8, _mm256_loadu_ps(a)));
        }
      }
    }
    float* out = static_cast<float*>(p.out) + (b * p.num_heads + j * G) * hd;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 total = _mm256_set1_ps(sums[g]);
      for (int64_t c = 0; c < hd; c += 8) {
        _mm256_storeu_ps(out + g * hd + c, _mm256_div_ps(_mm256_loadu_ps(acc.data() + g * hd + c), total));
      }
    }
  }
}
#endif

// --- SiLU · mul ----------------------------------------------------------------------------------
template <class T>
void silu_mul_rows(const SiluMulParams& p) {
  using S = typename T::Storage;
  for (int64_t r = 0; r < p.rows; ++r) {
    const auto* gate = static_cast<const S*>(p.gate_up) + r * 2 * p.inner;
    const auto* up = gate + p.inner;
    auto* out = static_cast<S*>(p.out) + r * p.inner;
    for (int64_t i = 0; i < p.inner; ++i) {
      const float g = T::to_float(gate[i]);
      out[i] = T::from_float(g / (1.0f + std::exp(-g)) * T::to_float(up[i]));
    }
  }
}

#ifdef RGPT_DECODE_X86
// e^x, 8 at a time: x = n ln2 + r (Cody-Waite, two constants), e^r by Cephes' expf polynomial,
// times 2^n; x clamped to [-87.3, 88] (finite, normal results). Within 2 ulp of expf.
RGPT_DECODE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(scale));
}

RGPT_DECODE_AVX2 void silu_mul_avx2(const SiluMulParams& p) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* gate = static_cast<const float*>(p.gate_up) + r * 2 * p.inner;
    const float* up = gate + p.inner;
    float* out = static_cast<float*>(p.out) + r * p.inner;
    int64_t i = 0;
    for (; i + 8 <= p.inner; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < p.inner; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}
#endif

}  // namespace

bool decode_cpu_has_simd() {
#ifdef RGPT_DECODE_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

void add_rms_norm_cpu(const AddRmsNormParams& p) {
  with_dtype(p.dtype, [&](auto t) { add_rms_norm_rows<decltype(t)>(p); });
}

void rope_kv_append_cpu(const RopeKvParams& p, bool use_simd) {
  const bool simd = use_simd && decode_cpu_has_simd();
  with_dtype(p.dtype, [&](auto t) {
    with_dtype(p.cache_dtype, [&](auto c) { rope_kv_rows<decltype(t), decltype(c)>(p, simd); });
  });
}

void decode_attention_cpu(const DecodeAttentionParams& p, int num_threads, bool use_simd) {
  // threads take contiguous ranges of (row, kv head) pairs; small problems stay on this thread
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = std::max(longest, row_length(p, b));
  const int64_t work = p.batch * p.num_heads * longest * p.head_dim;
  const int threads = work < (int64_t{1} << 20) ? 1 : num_threads;
  const int64_t pairs = p.batch * p.num_kv_heads;
#ifdef RGPT_DECODE_X86
  const bool simd = use_simd && decode_cpu_has_simd() && p.dtype == DType::kF32 &&
                    p.head_dim % 8 == 0 && p.cache_dtype != DType::kBF16;
  if (simd) {
    split_rows(pairs, 1, threads, [&](int64_t begin, int64_t end) {
      if (p.cache_dtype == DType::kF16) {
        attention_avx2<F16>(p, begin, end);
      } else {
        attention_avx2<F32>(p, begin, end);
      }
    });
    return;
  }
#endif
  with_dtype(p.dtype, [&](auto t) {
    with_dtype(p.cache_dtype, [&](auto c) {
      split_rows(pairs, 1, threads, [&](int64_t begin, int64_t end) {
        attention_portable<decltype(t), decltype(c)>(p, begin, end);
      });
    });
  });
}

void silu_mul_cpu(const SiluMulParams& p, bool use_simd) {
#ifdef RGPT_DECODE_X86
  if (use_simd && p.dtype == DType::kF32 && decode_cpu_has_simd()) {
    silu_mul_avx2(p);
    return;
  }
#endif
  with_dtype(p.dtype, [&](auto t) { silu_mul_rows<decltype(t)>(p); });
}

}  // namespace rgpt::decode
