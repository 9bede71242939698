#pragma once
// W4A16 linear on INT4 layout "n16k64" (version 1; README.md here has the full definition):
// the weight in tiles of 16 output rows × 64 inputs, each tile stored as 32 16-byte chunks, chunk
// l holding exactly the codes lane l of a warp needs for four mma.m16n8k16 A fragments.
//
//   T = ceil(N / 16) tiles, S = ceil(K / 64) steps, groups of G inputs (G % 32 == 0, K % G == 0)
//   qweight int32 [T, S * 128]   word (tile, step s, lane l = 4g + t, j) at s * 128 + 4l + j;
//                                its nibble p (bits 4p..4p+3) holds q[n, k] with
//                                  n = 16 tile + g + 8 (p & 1)
//                                  k = 64 s + 32 (j >> 1) + 8 t + 4 (j & 1) + [0, 2, 1, 3][p >> 1]
//                                codes past N or K are 0
//   scales  fp16  [T, K/G, 16]   [tile, group, 2g + r] = s[16 tile + g + 8r, group] (0 past N)
//   zeros   uint8 [T, K/G, 16]   same order; 0..16
//
//   W[n, k] = (q − z) · s, exactly: (q − z) is an integer in [−16, 15] and s an fp16, so the
//   product has at most 16 significant bits and every path computes it without rounding.
//   out[m, n] = Σ_groups s · Σ_{k in group} (q − z) · x[m, k] + bias[n], accumulated in fp32.
//
// Kernels take raw pointers, sizes, a dtype tag (int4.h) and, on CUDA, a stream; they never
// allocate, synchronize or see a torch Tensor.
#include <cstdint>

namespace rgpt {

constexpr int64_t kN16K64TileRows = 16;    // output rows per tile
constexpr int64_t kN16K64StepInputs = 64;  // inputs per step (one 16-byte chunk per lane)
constexpr int kN16K64GemvWarps = 4;        // GEMV warps per block, all on one tile
constexpr int kN16K64GemmWarps = 8;        // GEMM warps per block, one tile each (128 output rows)
constexpr int kN16K64GemmBlockRows = 64;   // GEMM rows of x per block (more rows: more blocks)

struct N16K64Params {
  const void* x = nullptr;          // [M, K] rows contiguous (dtype)
  const uint32_t* qweight = nullptr;  // [T, S * 128]
  const uint16_t* scales = nullptr;   // [T, K/G, 16] fp16 bits
  const uint8_t* zeros = nullptr;     // [T, K/G, 16]
  const void* bias = nullptr;       // [N] (dtype) or null
  void* out = nullptr;              // [M, N] (dtype)
  int64_t m = 0, n = 0, k = 0, group_size = 0;
  int dtype = 0;  // Int4DType (int4.h)
};

// Throws std::invalid_argument when the sizes break the layout's rules.
void check_n16k64_params(const N16K64Params& p);

// --- CPU (csrc/int4/int4_n16k64_cpu.cpp) --------------------------------------------------------
// x, bias and out are float32. Threads take contiguous ranges of tiles. `use_simd` picks the
// AVX2+FMA+F16C path where the CPU has it (int4_cpu_has_simd), else the portable one.
void int4_linear_n16k64_cpu(const N16K64Params& p, int num_threads, bool use_simd);

// Rows [row_begin, row_end) of W as float32 into out [row_end − row_begin, K]: (q − z)·s exactly.
void int4_dequant_n16k64_cpu(const N16K64Params& p, int64_t row_begin, int64_t row_end, float* out,
                             int num_threads, bool use_simd);

// Python entries: pointers as integers.
void int4_linear_n16k64_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                  uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                                  int64_t group_size, int num_threads, bool use_simd);
void int4_dequant_n16k64_cpu_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                   uintptr_t out, int64_t n, int64_t k, int64_t group_size,
                                   int64_t row_begin, int64_t row_end, int num_threads,
                                   bool use_simd);

// --- CPU GEMM (csrc/int4/int4_n16k64_gemm_cpu.cpp) -------------------------------------------------
// The same product for prefill row counts: each tile of W dequantized once per 256 inputs into a
// panel in L1, then a register-blocked micro-kernel over every row of x (float32 x, bias, out).
void int4_gemm_n16k64_cpu(const N16K64Params& p, int num_threads, bool use_simd);
void int4_gemm_n16k64_cpu_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                uintptr_t bias, uintptr_t out, int64_t m, int64_t n, int64_t k,
                                int64_t group_size, int num_threads, bool use_simd);

// --- GEMV launch plan (csrc/int4/int4_n16k64.cpp; pure arithmetic, built without CUDA too) ----
// Split-K plan for the GEMV: how many blocks share a tile's K range (1 = none), for a device with
// `multiprocessors` SMs.
int int4_gemv_n16k64_splits(int64_t n, int64_t k, int multiprocessors);

// Bytes of workspace the GEMV needs with `splits` > 1 (0 for 1): int32 counters [T] (padded to
// 16 bytes) then fp32 partial sums [splits, M, N]. The counters must be zero before the first
// launch; every launch leaves them zero again, so a workspace is zeroed once and reused (by one
// launch at a time: two GEMVs running concurrently need two workspaces).
int64_t int4_gemv_n16k64_workspace_bytes(int64_t m, int64_t n, int splits);

// --- GEMM launch plan (csrc/int4/int4_n16k64.cpp) -------------------------------------------------
// Split-K factor for the CUDA GEMM (M rows of x): 1 for M > 64 (blocks in z fill the GPU), else the
// fewest splits whose blocks (ceil(N / 128) per split) fill one block per SM to >= 90%, with at
// least 8 steps (512 inputs) and whole groups per split and partial sums at most 4× the weight's
// bytes. To be tuned on a GPU (benchmarks/int4.py --splits).
int int4_gemm_n16k64_splits(int64_t m, int64_t n, int64_t k, int64_t group_size, int multiprocessors);
// Bytes of the GEMM's split-K counters (int32, one per block column, padded to 16; zero them once,
// every launch leaves them zero) and of its fp32 partial sums [splits, M, N] (0 for 1 split).
int64_t int4_gemm_n16k64_counter_bytes(int64_t n);
int64_t int4_gemm_n16k64_partial_bytes(int64_t m, int64_t n, int splits);

#ifdef RGPT_WITH_CUDA
// --- CUDA (csrc/int4/int4_n16k64_cuda.cu) -------------------------------------------------------
constexpr int kN16K64GemvMaxRows = 8;

// GEMV for 1 <= M <= 8 rows of x (fp32, fp16 or bf16) on `stream`. With splits > 1 the blocks of
// a tile write fp32 partials to the workspace and the last of them to finish adds them up in a
// fixed order (+ bias) and writes out: one kernel, deterministic.
void int4_gemv_n16k64_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales,
                                 uintptr_t zeros, uintptr_t bias, uintptr_t out,
                                 uintptr_t workspace, int64_t m, int64_t n, int64_t k,
                                 int64_t group_size, int splits, int dtype, uintptr_t stream);

// W [N, K] into `out` (dtype) on `stream`, for the prefill GEMM: fp32 gets (q − z)·s exactly,
// fp16 and bf16 that value rounded once (to nearest even).
void int4_dequant_n16k64_cuda_entry(uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                    uintptr_t out, int64_t n, int64_t k, int64_t group_size,
                                    int dtype, uintptr_t stream);

// --- CUDA GEMM (csrc/int4/int4_n16k64_gemm_cuda.cu) ----------------------------------------------
// out[M, N] = x[M, K] @ W^T + bias for x fp16 or bf16 (any M >= 1; meant for 9..64, the prefill of a
// question), the packed tiles read straight into tensor-core fragments. x, qweight, scales and
// zeros 16-byte aligned. splits > 1 (M <= 64): fp32 partials through `partial`, added by the last
// block of each column (counters: int4_gemm_n16k64_counter_bytes, zeroed once): deterministic.
void int4_gemm_n16k64_cuda_entry(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                                 uintptr_t bias, uintptr_t out, uintptr_t counters, uintptr_t partial,
                                 int64_t m, int64_t n, int64_t k, int64_t group_size, int splits,
                                 int dtype, uintptr_t stream);
#endif

}  // namespace rgpt
