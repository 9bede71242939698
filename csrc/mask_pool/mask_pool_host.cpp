// Mask pooling: the one host file. Turns what Python passes (integers, torch dtype names,
// shapes; one feature level or several) into a Params, checks everything a kernel relies on,
// and dispatches to the CPU kernel or the CUDA launcher. A kernel never sees an argument this
// file has not checked.
#include "mask_pool/mask_pool_host.h"

#include <stdexcept>
#include <string>

#include "mask_pool/mask_pool.h"

namespace rgpt::mask_pool {
namespace {

constexpr int64_t kMaxSide = int64_t{1} << 30;  // keeps every index product inside int64
constexpr int64_t kMaxElements = int64_t{1} << 50;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

Scalar parse_features_dtype(const std::string& name) {
  if (name == "float32") return Scalar::kFloat32;
  if (name == "float16") return Scalar::kFloat16;
  if (name == "bfloat16") return Scalar::kBFloat16;
  fail("features dtype " + name + " is not supported; use float32, float16 or bfloat16");
}

Scalar parse_masks_dtype(const std::string& name) {
  if (name == "bool" || name == "uint8") return Scalar::kByte;
  if (name == "float32") return Scalar::kFloat32;
  if (name == "float16") return Scalar::kFloat16;
  if (name == "bfloat16") return Scalar::kBFloat16;
  if (name == "float64") return Scalar::kFloat64;
  fail("masks dtype " + name + " is not supported; use bool, uint8 or a float dtype");
}

int64_t element_size(Scalar s) {
  switch (s) {
    case Scalar::kFloat32: return 4;
    case Scalar::kFloat16:
    case Scalar::kBFloat16: return 2;
    case Scalar::kFloat64: return 8;
    case Scalar::kByte: return 1;
  }
  return 1;
}

Mode parse_mode(const std::string& name) {
  if (name == "area") return Mode::kArea;
  if (name == "bilinear") return Mode::kBilinear;
  if (name == "binary") return Mode::kBinary;
  fail("mode '" + name + "' is unknown; use 'area', 'bilinear' or 'binary'");
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t k = 0; k < shape.size(); ++k) text += (k ? ", " : "") + std::to_string(shape[k]);
  return text + "]";
}

// The product of `sides`, refused past kMaxElements.
int64_t checked_product(std::initializer_list<int64_t> sides, const char* what) {
  int64_t product = 1;
  for (int64_t side : sides) {
    if (side != 0 && product > kMaxElements / side) {
      fail(std::string(what) + " is too large (more than 2^50 elements)");
    }
    product *= side;
  }
  return product;
}

// Shapes, dtypes and mode (no pointers): enough to size the workspace.
Params shape_params(const std::string& features_dtype,
                    const std::vector<std::vector<int64_t>>& features_shapes,
                    const std::vector<int64_t>& masks_shape, const std::string& mode) {
  Params p;
  p.features_dtype = parse_features_dtype(features_dtype);
  if (features_shapes.empty() || features_shapes.size() > static_cast<size_t>(kMaxLevels)) {
    fail("give 1 to " + std::to_string(kMaxLevels) + " feature levels; got " +
         std::to_string(features_shapes.size()) + " (pool more levels in several calls)");
  }
  if (masks_shape.size() != 3) fail("masks must be [N, Hm, Wm]; got shape " + shape_text(masks_shape));
  p.num_masks = masks_shape[0];
  p.mask_height = masks_shape[1];
  p.mask_width = masks_shape[2];
  p.mode = parse_mode(mode);
  if (p.num_masks < 0 || p.mask_height < 1 || p.mask_width < 1 || p.mask_height >= kMaxSide ||
      p.mask_width >= kMaxSide) {
    fail("masks shape " + shape_text(masks_shape) +
         " is not usable: Hm and Wm must be in [1, 2^30), N non-negative");
  }
  checked_product({p.num_masks, p.mask_height, p.mask_width}, "masks");
  p.num_levels = static_cast<int>(features_shapes.size());
  for (int k = 0; k < p.num_levels; ++k) {
    const std::vector<int64_t>& shape = features_shapes[k];
    const std::string name = p.num_levels == 1 ? "features" : "features[" + std::to_string(k) + "]";
    if (shape.size() != 4) fail(name + " must be [B, H, W, C]; got shape " + shape_text(shape));
    Level& level = p.levels[k];
    level.height = shape[1];
    level.width = shape[2];
    level.channels = shape[3];
    if (shape[0] < 0 || level.channels < 0 || level.height < 1 || level.width < 1 ||
        level.height >= kMaxSide || level.width >= kMaxSide) {
      fail(name + " shape " + shape_text(shape) +
           " is not usable: H and W must be in [1, 2^30), B and C non-negative");
    }
    if (k == 0) p.batch = shape[0];
    if (shape[0] != p.batch) {
      fail(name + " holds " + std::to_string(shape[0]) + " images but features[0] holds " +
           std::to_string(p.batch) + "; every level must come from the same images");
    }
    checked_product({p.batch, level.height, level.width, level.channels}, name.c_str());
    checked_product({p.num_masks, level.height, level.width}, "the cell weights (N * H * W)");
    level.out_column = p.out_channels;
    p.out_channels += level.channels;
    checked_product({p.num_masks, p.out_channels}, "the output (N * C)");
  }
  return p;
}

void check_pointer(std::uintptr_t address, int64_t alignment, bool needed, const char* name) {
  if (needed && address == 0) fail(std::string(name) + " is a null pointer");
  if (address % static_cast<std::uintptr_t>(alignment) != 0) {
    fail(std::string(name) + " is not aligned to " + std::to_string(alignment) + " bytes");
  }
}

int threads_arg(int64_t num_threads) {
  if (num_threads < 1 || num_threads > 1024) {
    fail("num_threads must be in [1, 1024]; got " + std::to_string(num_threads));
  }
  return static_cast<int>(num_threads);
}

bool is_cuda(const std::string& device) {
  if (device == "cpu") return false;
  if (device == "cuda") {
#ifdef RGPT_WITH_CUDA
    return true;
#else
    fail("rgpt_rt._C was built without CUDA; rebuild with nvcc on PATH to pool CUDA tensors");
#endif
  }
  fail("device '" + device + "' is unknown; use 'cpu' or 'cuda'");
}

[[maybe_unused]] int device_arg(int64_t device_index) {
  if (device_index < 0 || device_index > 1024) {
    fail("device_index must be a CUDA device ordinal; got " + std::to_string(device_index));
  }
  return static_cast<int>(device_index);
}

}  // namespace

int64_t levels_workspace_bytes(const std::string& features_dtype,
                               const std::vector<std::vector<int64_t>>& features_shapes,
                               const std::vector<int64_t>& masks_shape, const std::string& mode,
                               const std::string& device, int64_t device_index,
                               int64_t num_threads) {
  const Params p = shape_params(features_dtype, features_shapes, masks_shape, mode);
  if (is_cuda(device)) {
#ifdef RGPT_WITH_CUDA
    return cuda_workspace_bytes(p, device_arg(device_index));
#endif
  }
  return cpu_workspace_bytes(p, threads_arg(num_threads));
}

void run_levels(const std::vector<std::uintptr_t>& features, const std::string& features_dtype,
                const std::vector<std::vector<int64_t>>& features_shapes, std::uintptr_t masks,
                const std::string& masks_dtype, const std::vector<int64_t>& masks_shape,
                std::uintptr_t batch_index, const std::string& mode, std::uintptr_t out,
                std::uintptr_t workspace, int64_t workspace_size, const std::string& device,
                int64_t device_index, std::uintptr_t stream, int64_t num_threads) {
  Params p = shape_params(features_dtype, features_shapes, masks_shape, mode);
  p.masks_dtype = parse_masks_dtype(masks_dtype);
  if (features.size() != features_shapes.size()) {
    fail(std::to_string(features.size()) + " feature pointers for " +
         std::to_string(features_shapes.size()) + " feature shapes; give one per level");
  }
  const bool cuda = is_cuda(device);
  const bool work = p.num_masks > 0 && p.out_channels > 0;
  for (int k = 0; k < p.num_levels; ++k) {
    const Level& level = p.levels[k];
    const int64_t numel = p.batch * level.height * level.width * level.channels;
    check_pointer(features[k], element_size(p.features_dtype), work && numel > 0, "features");
    p.levels[k].features = reinterpret_cast<const void*>(features[k]);
  }
  check_pointer(masks, element_size(p.masks_dtype), work, "masks");
  check_pointer(batch_index, 8, work, "batch_index");
  check_pointer(out, element_size(p.features_dtype), work, "out");
  check_pointer(workspace, 64, false, "workspace");
  if (work && p.batch == 0) fail("features hold no image (B = 0) but there are masks to pool");
  p.masks = reinterpret_cast<const void*>(masks);
  p.batch_index = reinterpret_cast<const int64_t*>(batch_index);
  p.out = reinterpret_cast<void*>(out);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_bytes = workspace_size;

  if (cuda) {
#ifdef RGPT_WITH_CUDA
    const int dev = device_arg(device_index);
    const int64_t needed = cuda_workspace_bytes(p, dev);
    if (workspace_size < needed || (needed > 0 && workspace == 0)) {
      fail("workspace holds " + std::to_string(workspace_size) + " bytes; " +
           std::to_string(needed) + " are needed (ask mask_pool_workspace_bytes)");
    }
    // batch_index values are on the device: reading them here would synchronise. The kernels
    // read them guarded (a value outside [0, B) pools nothing and yields nan); Python checks
    // them before the launch wherever that costs no synchronisation it cares about.
    run_cuda(p, dev, reinterpret_cast<void*>(stream));
    return;
#endif
  }
  const int threads = threads_arg(num_threads);
  const int64_t needed = cpu_workspace_bytes(p, threads);
  if (workspace_size < needed || (needed > 0 && workspace == 0)) {
    fail("workspace holds " + std::to_string(workspace_size) + " bytes; " +
         std::to_string(needed) + " are needed (ask mask_pool_workspace_bytes)");
  }
  if (!work) return;
  for (int64_t m = 0; m < p.num_masks; ++m) {
    const int64_t b = p.batch_index[m];
    if (b < 0 || b >= p.batch) {
      fail("batch_index[" + std::to_string(m) + "] = " + std::to_string(b) +
           " is outside [0, " + std::to_string(p.batch) + ")");
    }
  }
  run_cpu(p, threads);
}

int64_t workspace_bytes(const std::string& features_dtype,
                        const std::vector<int64_t>& features_shape,
                        const std::vector<int64_t>& masks_shape, const std::string& mode,
                        const std::string& device, int64_t device_index, int64_t num_threads) {
  return levels_workspace_bytes(features_dtype, {features_shape}, masks_shape, mode, device,
                                device_index, num_threads);
}

void run(std::uintptr_t features, const std::string& features_dtype,
         const std::vector<int64_t>& features_shape, std::uintptr_t masks,
         const std::string& masks_dtype, const std::vector<int64_t>& masks_shape,
         std::uintptr_t batch_index, const std::string& mode, std::uintptr_t out,
         std::uintptr_t workspace, int64_t workspace_size, const std::string& device,
         int64_t device_index, std::uintptr_t stream, int64_t num_threads) {
  run_levels({features}, features_dtype, {features_shape}, masks, masks_dtype, masks_shape,
             batch_index, mode, out, workspace, workspace_size, device, device_index, stream,
             num_threads);
}

}  // namespace rgpt::mask_pool
