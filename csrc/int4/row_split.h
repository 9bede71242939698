#pragma once
// Running a CPU kernel over output rows on several threads: contiguous ranges of whole blocks.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace rgpt {

// rows(begin, end) over rows [0, n), split among `threads` (at most one per block of `unit`
// rows) into contiguous ranges of whole blocks; the calling thread takes the first.
template <typename Rows>
void split_rows(int64_t n, int64_t unit, int64_t threads, const Rows& rows) {
  const int64_t blocks = (n + unit - 1) / unit;
  threads = std::clamp<int64_t>(threads, 1, std::max<int64_t>(blocks, 1));
  if (threads == 1) {
    rows(0, n);
    return;
  }
  auto range = [&](int64_t t) {
    const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
    return std::make_pair(b0 * unit, std::min(n, b1 * unit));
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t t = 1; t < threads; ++t) {
    const auto [begin, end] = range(t);
    pool.emplace_back(rows, begin, end);
  }
  const auto [begin, end] = range(0);
  rows(begin, end);
  for (auto& thread : pool) thread.join();
}

}  // namespace rgpt
