// INT4 layout n16k64: the rules every kernel checks, and the GEMV's launch plan (int4_n16k64.h).
#include "int4/int4_n16k64.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "int4/int4.h"

namespace rgpt {

void check_n16k64_params(const N16K64Params& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("int4 n16k64: " + what); };
  if (p.m < 0 || p.n <= 0 || p.k <= 0) fail("sizes must be M >= 0, N > 0, K > 0");
  if (p.group_size <= 0 || p.group_size % 32 != 0) fail("group_size must be a positive multiple of 32");
  if (p.k % p.group_size != 0) fail("K must be a multiple of group_size");
  if (p.qweight == nullptr || p.scales == nullptr || p.zeros == nullptr) fail("a weight pointer is null");
  if (p.m > 0 && (p.x == nullptr || p.out == nullptr)) fail("x or out is null");
  if (p.dtype < kInt4F32 || p.dtype > kInt4BF16) fail("unknown dtype tag");
}

int int4_gemv_n16k64_splits(int64_t n, int64_t k, int multiprocessors) {
  // Enough blocks for 4 per SM (16 warps, each with ~1 KB of weights in flight: 16 KB per SM), every
  // split at least 16 steps (2 stages per warp), and the blocks spread evenly: an SM runs
  // ceil(blocks / SMs) of them, so the smallest split count whose blocks fill that to >= 93% is
  // taken (else the fullest). To be tuned on a GPU (benchmarks/int4.py).
  const int64_t sms = std::max(1, multiprocessors);
  const int64_t tiles = (n + kN16K64TileRows - 1) / kN16K64TileRows;
  const int64_t steps = (k + kN16K64StepInputs - 1) / kN16K64StepInputs;
  const int64_t most = std::clamp<int64_t>(steps / 16, 1, 32);
  int best = static_cast<int>(most);
  double best_fill = 0.0;
  for (int64_t splits = 1; splits <= most; ++splits) {
    const int64_t blocks = tiles * splits;
    if (blocks < 4 * sms && splits < most) continue;
    const double fill = static_cast<double>(blocks) / static_cast<double>((blocks + sms - 1) / sms * sms);
    if (fill >= 0.93) return static_cast<int>(splits);
    if (fill > best_fill) best = static_cast<int>(splits), best_fill = fill;
  }
  return best;
}

int64_t int4_gemv_n16k64_workspace_bytes(int64_t m, int64_t n, int splits) {
  if (splits <= 1) return 0;
  const int64_t tiles = (n + kN16K64TileRows - 1) / kN16K64TileRows;
  return (tiles * 4 + 15) / 16 * 16 + int64_t{4} * splits * m * n;
}

int int4_gemm_n16k64_splits(int64_t m, int64_t n, int64_t k, int64_t group_size, int multiprocessors) {
  if (m > kN16K64GemmBlockRows || m < 1) return 1;
  const int64_t sms = std::max(1, multiprocessors);
  const int64_t tiles = (n + kN16K64TileRows - 1) / kN16K64TileRows;
  const int64_t columns = (tiles + kN16K64GemmWarps - 1) / kN16K64GemmWarps;
  const int64_t steps = (k + kN16K64StepInputs - 1) / kN16K64StepInputs;
  const int64_t steps_per_group = group_size % 64 == 0 ? group_size / 64 : 1;
  // partial sums (written and read: 8 bytes per split, row and output) at most 4× the weight (K/2 per output)
  const int64_t by_traffic = std::max<int64_t>(1, k / (16 * m));
  const int64_t most = std::clamp<int64_t>(std::min(steps / 8, by_traffic), 1, 32);
  int best = 1;
  double best_fill = 0.0;
  for (int64_t splits = 1; splits <= most; ++splits) {
    // the splits the kernel really runs: whole groups per split, none empty
    int64_t per_split = (steps + splits - 1) / splits;
    per_split = (per_split + steps_per_group - 1) / steps_per_group * steps_per_group;
    const int64_t real = (steps + per_split - 1) / per_split;
    const int64_t blocks = columns * real;
    const double fill = static_cast<double>(blocks) / static_cast<double>((blocks + sms - 1) / sms * sms);
    if (fill >= 0.9) return static_cast<int>(real);
    if (fill > best_fill + 1e-9) best = static_cast<int>(real), best_fill = fill;
  }
  return best;
}

int64_t int4_gemm_n16k64_counter_bytes(int64_t n) {
  const int64_t tiles = (n + kN16K64TileRows - 1) / kN16K64TileRows;
  const int64_t columns = (tiles + kN16K64GemmWarps - 1) / kN16K64GemmWarps;
  return (columns * 4 + 15) / 16 * 16;
}

int64_t int4_gemm_n16k64_partial_bytes(int64_t m, int64_t n, int splits) {
  return splits <= 1 ? 0 : int64_t{4} * splits * m * n;
}

}  // namespace rgpt
