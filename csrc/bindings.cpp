// The one binding table of rgpt_rt._C. Each kernel family exposes plain functions over
// raw pointers, sizes and dtype tags (see its header); this file only names them for Python.
// Validation, allocation and the torch.library registration live in rgpt_rt/ops/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"
#include "int4/int4.h"
#include "int4/int4_n16k64.h"
#include "mask_pool/mask_pool_host.h"
#ifdef RGPT_WITH_CUDA
#include "device/device.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rgpt_rt kernels (C++ always, CUDA when built with nvcc)";
  m.def("build_info", &rgpt::build_info_dict,
        "What this build holds: {'cuda': bool, 'cuda_architectures': [...], 'cxx_compiler': str, ...}");
  // INT4 (csrc/int4): pointers are integers (tensor.data_ptr()); see int4.h for the contracts.
  m.def("int4_linear_cpu", &rgpt::int4_linear_cpu_entry, py::call_guard<py::gil_scoped_release>(),
        "out[M,N] = x[M,K] @ W^T + bias (float32), W INT4 layout nk8i",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_dequant_cpu", &rgpt::int4_dequant_cpu_entry, py::call_guard<py::gil_scoped_release>(),
        "Dequantize W [N, K] into `out` (float32), for the CPU prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_cpu_has_simd", &rgpt::int4_cpu_has_simd, "Whether the AVX2+FMA+F16C CPU path runs here");
  // INT4 layout n16k64 (csrc/int4/int4_n16k64.h): W = (q - z)·s exactly; tiles of 16 rows × 64 inputs
  m.def("int4_linear_n16k64_cpu", &rgpt::int4_linear_n16k64_cpu_entry,
        py::call_guard<py::gil_scoped_release>(),
        "out[M,N] = x[M,K] @ W^T + bias (float32), W INT4 layout n16k64",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_dequant_n16k64_cpu", &rgpt::int4_dequant_n16k64_cpu_entry,
        py::call_guard<py::gil_scoped_release>(),
        "Rows [row_begin, row_end) of W (layout n16k64) into `out` float32 [rows, K], exactly",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("row_begin"), py::arg("row_end"),
        py::arg("num_threads"), py::arg("use_simd") = true);
  m.def("int4_gemv_n16k64_splits", &rgpt::int4_gemv_n16k64_splits,
        "Split-K factor for the n16k64 GEMV on a device with this many SMs", py::arg("n"),
        py::arg("k"), py::arg("multiprocessors"));
  m.def("int4_gemv_n16k64_workspace_bytes", &rgpt::int4_gemv_n16k64_workspace_bytes,
        "Workspace bytes of the n16k64 GEMV (0 without split-K); zero it once, reuse it",
        py::arg("m"), py::arg("n"), py::arg("splits"));

  // mask pooling (csrc/mask_pool/, rgpt_rt/ops/mask_pool.py)
  m.def("mask_pool_workspace_bytes", &rgpt::mask_pool::workspace_bytes, py::kw_only(),
        py::arg("features_dtype"), py::arg("features_shape"), py::arg("masks_shape"),
        py::arg("mode"), py::arg("device"), py::arg("device_index"), py::arg("num_threads"),
        "Bytes of scratch memory mask_pool needs for these shapes on this device");
  m.def("mask_pool", &rgpt::mask_pool::run, py::kw_only(), py::arg("features"),
        py::arg("features_dtype"), py::arg("features_shape"), py::arg("masks"),
        py::arg("masks_dtype"), py::arg("masks_shape"), py::arg("batch_index"), py::arg("mode"),
        py::arg("out"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"),
        py::arg("device_index"), py::arg("stream"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "out[N, C] = mask-weighted means of features[B, H, W, C] (pointers as integers)");
#ifdef RGPT_WITH_CUDA
  m.def("int4_gemv_cuda", &rgpt::int4_gemv_cuda_entry,
        "GEMV for 1..8 rows of x on `stream`; split-K when splits > 1 (fp32 workspace [splits, M, N])",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("partial"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_dequant_cuda", &rgpt::int4_dequant_cuda_entry,
        "Dequantize W [N, K] into `out` (dtype) on `stream`, for the prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_gemv_n16k64_cuda", &rgpt::int4_gemv_n16k64_cuda_entry,
        "GEMV for 1..8 rows of x, W INT4 layout n16k64, on `stream`; split-K (splits > 1) in one "
        "kernel through `workspace` (int4_gemv_n16k64_workspace_bytes, zeroed once)",
        py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"),
        py::arg("out"), py::arg("workspace"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
  m.def("int4_dequant_n16k64_cuda", &rgpt::int4_dequant_n16k64_cuda_entry,
        "Dequantize W [N, K] (layout n16k64) into `out` (dtype) on `stream`, for the prefill GEMM",
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("dtype"), py::arg("stream"));
  m.def("cuda_runtime_info", &rgpt::cuda_runtime_info,
        "The linked CUDA runtime version, the driver version, and the visible devices");
#endif
}
