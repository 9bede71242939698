#pragma once
// W4A16 linear: out[M, N] = x[M, K] @ W^T + bias, W in INT4 layout "nk8i" (see README.md here):
//   qweight int32 [N, K/8]  row n holds the codes of output n; word j holds k = 8j..8j+7 with
//                           nibble position p (bits 4p..4p+3) holding k = 8j + [0,2,4,6,1,3,5,7][p]
//   scales  fp16  [N, K/G]  (passed as raw 16-bit patterns)
//   zeros   uint8 [N, K/G]  0..16
//   W[n, k] = fp16((q - z) * s), the exact fp16 product; every kernel uses exactly that value.
// K % G == 0 and G % 32 == 0. Kernels take raw pointers (as integers from Python), sizes, dtype
// tags and a CUDA stream; they never allocate, synchronize or see a torch Tensor.
#include <cstdint>

namespace rgpt {

// dtype tags shared with rgpt_rt/ops/int4.py
enum Int4DType : int { kInt4F32 = 0, kInt4F16 = 1, kInt4BF16 = 2 };

// The bindings pass tensors as raw addresses; these fill a kernel's parameter struct
// (Int4LinearParams here, N16K64Params in int4_n16k64.h) from them.
template <class Params>
Params weight_params(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t n, int64_t k,
                     int64_t group_size, int dtype) {
  Params p;
  p.qweight = reinterpret_cast<const uint32_t*>(qweight);
  p.scales = reinterpret_cast<const uint16_t*>(scales);
  p.zeros = reinterpret_cast<const uint8_t*>(zeros);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.dtype = dtype;
  return p;
}

template <class Params>
Params linear_params(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                     uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                     int64_t group_size, int dtype) {
  Params p = weight_params<Params>(qweight, scales, zeros, n, k, group_size, dtype);
  p.x = reinterpret_cast<const void*>(x);
  p.bias = reinterpret_cast<const void*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.m = m;
  return p;
}

struct Int4LinearParams {
  const void* x = nullptr;          // [M, K] rows contiguous (dtype)
  const uint32_t* qweight = nullptr;  // [N, K/8] layout nk8i
  const uint16_t* scales = nullptr;   // [N, K/G] fp16 bits
  const uint8_t* zeros = nullptr;     // [N, K/G]
  const void* bias = nullptr;       // [N] (dtype) or null
  void* out = nullptr;              // [M, N] (dtype)
  int64_t m = 0, n = 0, k = 0, group_size = 0;
  int dtype = kInt4F32;
};

// Throws std::invalid_argument when sizes break the layout's rules.
void check_int4_params(const Int4LinearParams& p);

// --- CPU (csrc/int4/int4_cpu.cpp) ---------------------------------------------------------------
// x, bias and out are float32 (the Python wrapper converts fp16/bf16). Threads split the output
// rows; `use_simd` picks the AVX2+FMA+F16C path when the CPU has it (else the portable path).
void int4_linear_cpu(const Int4LinearParams& p, int num_threads, bool use_simd);
bool int4_cpu_has_simd();

// W [N, K] dequantized into out (float32, the exact fp16 values the kernels use), threads
// splitting the rows: the CPU prefill multiplies it with a BLAS GEMM, as the CUDA prefill does.
struct Int4DequantParams {
  const uint32_t* qweight = nullptr;  // [N, K/8] layout nk8i
  const uint16_t* scales = nullptr;   // [N, K/G] fp16 bits
  const uint8_t* zeros = nullptr;     // [N, K/G]
  float* out = nullptr;               // [N, K]
  int64_t n = 0, k = 0, group_size = 0;
};
void int4_dequant_cpu(const Int4DequantParams& p, int num_threads, bool use_simd);

// Python entries: pointers as integers.
void int4_dequant_cpu_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out,
                            int64_t n, int64_t k, int64_t group_size, int num_threads,
                            bool use_simd);
void int4_linear_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                           uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                           int64_t group_size, int num_threads, bool use_simd);

#ifdef RGPT_WITH_CUDA
// --- CUDA (csrc/int4/int4_cuda.cu) --------------------------------------------------------------
constexpr int kInt4GemvMaxRows = 8;

// GEMV for 1 <= M <= 8 on `stream`. splits > 1: split-K, each split writes fp32 partial sums to
// `partial` [splits, M, N] and a second kernel adds them (+ bias) into out; splits == 1 writes
// out directly and `partial` may be 0.
void int4_gemv_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                          uintptr_t bias, uintptr_t out, uintptr_t partial, int64_t m, int64_t n,
                          int64_t k, int64_t group_size, int splits, int dtype, uintptr_t stream);

// Dequantize the whole weight into `out` [N, K] (dtype) on `stream`: fp16 gets the exact fp16
// value, fp32 the same value widened, bf16 that value rounded to bf16 (for the prefill GEMM).
void int4_dequant_cuda_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out,
                             int64_t n, int64_t k, int64_t group_size, int dtype, uintptr_t stream);
#endif

}  // namespace rgpt
