// The mask pooling entry points that csrc/bindings.cpp names for Python (rgpt_rt/ops/mask_pool.py
// calls them): one feature level (`run`), or up to kMaxLevels levels in one call
// (`run_levels`). Pointers come as integers, dtypes as torch's names ("float16", "bool", ...).
// Bad arguments throw std::invalid_argument, which Python sees as ValueError.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rgpt::mask_pool {

// Bytes of scratch memory `run` needs for these shapes on this device.
int64_t workspace_bytes(const std::string& features_dtype,
                        const std::vector<int64_t>& features_shape,  // [B, H, W, C]
                        const std::vector<int64_t>& masks_shape,     // [N, Hm, Wm]
                        const std::string& mode, const std::string& device, int64_t device_index,
                        int64_t num_threads);

// Validates, then runs the CPU kernel (device "cpu", on num_threads threads) or launches the
// CUDA kernels (device "cuda", on `stream`, a cudaStream_t as an integer).
void run(std::uintptr_t features, const std::string& features_dtype,
         const std::vector<int64_t>& features_shape, std::uintptr_t masks,
         const std::string& masks_dtype, const std::vector<int64_t>& masks_shape,
         std::uintptr_t batch_index, const std::string& mode, std::uintptr_t out,
         std::uintptr_t workspace, int64_t workspace_size, const std::string& device,
         int64_t device_index, std::uintptr_t stream, int64_t num_threads);

// Several feature levels pooled in one call (Osprey's four): features[k] points at level k,
// [B, H_k, W_k, C_k] with features_shapes[k]; every level has the dtype features_dtype.
// `out` is [N, sum_k C_k], level k in its own block of columns, in order.
int64_t levels_workspace_bytes(const std::string& features_dtype,
                               const std::vector<std::vector<int64_t>>& features_shapes,
                               const std::vector<int64_t>& masks_shape, const std::string& mode,
                               const std::string& device, int64_t device_index,
                               int64_t num_threads);

void run_levels(const std::vector<std::uintptr_t>& features, const std::string& features_dtype,
                const std::vector<std::vector<int64_t>>& features_shapes, std::uintptr_t masks,
                const std::string& masks_dtype, const std::vector<int64_t>& masks_shape,
                std::uintptr_t batch_index, const std::string& mode, std::uintptr_t out,
                std::uintptr_t workspace, int64_t workspace_size, const std::string& device,
                int64_t device_index, std::uintptr_t stream, int64_t num_threads);

}  // namespace rgpt::mask_pool
