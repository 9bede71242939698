#pragma once
// Device helpers shared by the n16k64 CUDA kernels (the GEMV in int4_n16k64_cuda.cu, the GEMM in
// int4_n16k64_gemm_cuda.cu): bit casts, streaming loads, one LOP3, the mma.m16n8k16 wrapper, and
// the dequantization of one 32-bit word of codes into the A fragment of one 16×16 tile, (q − z)
// exactly (int4_n16k64.h, README.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace rgpt {
namespace n16k64_cuda {

// --- bit-level helpers ----------------------------------------------------------------------------
template <typename H2>
__device__ __forceinline__ H2 as_pair(uint32_t bits) {
  H2 value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename H2>
__device__ __forceinline__ uint32_t as_bits(H2 value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}

// A chunk of the weight stream: read once, so it does not displace x, scales and zeros in L1.
__device__ __forceinline__ uint4 load_streaming(const uint4* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// (a & b) | c in one LOP3 (the compiler, left alone, emits an AND and an OR)
template <uint32_t kMask>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(kMask), "r"(c));
  return d;
}

// floor(i / d) from twice_i = 2i, for i * d < 2^31, with magic = ceil(2^31 / d) (group_magic on
// the host; ceil(2^32 / d) would not fit 32 bits for d = 1).
__device__ __forceinline__ uint32_t divide(uint32_t twice_i, uint32_t magic) {
  return __umulhi(twice_i, magic);
}

template <bool kBf16>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// --- dequantization: one word (8 codes) -> the A fragment of one 16×16 tile, (q − z) exactly --------
// a[0] row g (k +0, +1), a[1] row g+8 (k +0, +1), a[2] row g (k +2, +3), a[3] row g+8 (k +2, +3).
// `zeros` packs z_g (bits 0..7) and z_{g+8} (bits 8..15); ZeroPair holds what the dequant needs.
template <bool kBf16>
struct ZeroPair;

template <>
struct ZeroPair<false> {
  uint32_t low, high;  // fp16 pairs: 1024 + z_g; −(64 + z_{g+8})
  __device__ __forceinline__ explicit ZeroPair(uint32_t zeros)
      : low((zeros & 0xFFu) * 0x00010001u + 0x64006400u),
        high((zeros >> 8) * 0x00100010u + 0xD400D400u) {}
};

template <>
struct ZeroPair<true> {
  uint32_t low, high;  // bf16 pairs: 128 + z_g; 128 + z_{g+8}
  __device__ __forceinline__ explicit ZeroPair(uint32_t zeros)
      : low((zeros & 0xFFu) * 0x00010001u + 0x43004300u),
        high((zeros >> 8) * 0x00010001u + 0x43004300u) {}
};

__device__ __forceinline__ void dequant_word(uint32_t word, const ZeroPair<false>& z, uint32_t (&a)[4]) {
  const __half2 sixteenth = as_pair<__half2>(0x2C002C00u);  // 1/16
  const __half2 low = as_pair<__half2>(z.low), high = as_pair<__half2>(z.high);
  const uint32_t magic = 0x64006400u, shifted = word >> 8;
  a[0] = as_bits(__hsub2(as_pair<__half2>(and_or<0x000F000Fu>(word, magic)), low));
  a[1] = as_bits(__hfma2(as_pair<__half2>(and_or<0x00F000F0u>(word, magic)), sixteenth, high));
  a[2] = as_bits(__hsub2(as_pair<__half2>(and_or<0x000F000Fu>(shifted, magic)), low));
  a[3] = as_bits(__hfma2(as_pair<__half2>(and_or<0x00F000F0u>(shifted, magic)), sixteenth, high));
}

__device__ __forceinline__ void dequant_word(uint32_t word, const ZeroPair<true>& z, uint32_t (&a)[4]) {
  using B2 = __nv_bfloat162;
  const B2 low = as_pair<B2>(z.low), high = as_pair<B2>(z.high);
  const uint32_t magic = 0x43004300u;
  a[0] = as_bits(__hsub2(as_pair<B2>(and_or<0x000F000Fu>(word, magic)), low));
  a[1] = as_bits(__hsub2(as_pair<B2>(and_or<0x000F000Fu>(word >> 4, magic)), high));
  a[2] = as_bits(__hsub2(as_pair<B2>(and_or<0x000F000Fu>(word >> 8, magic)), low));
  a[3] = as_bits(__hsub2(as_pair<B2>(and_or<0x000F000Fu>(word >> 12, magic)), high));
}

}  // namespace n16k64_cuda
}  // namespace rgpt
