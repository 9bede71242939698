// The one binding table of rgpt_rt._C. Each kernel family exposes plain functions over
// raw pointers, sizes and dtype tags (see its header); this file only names them for Python.
// Validation, allocation and the torch.library registration live in rgpt_rt/ops.py.
#include <pybind11/pybind11.h>

#include "build_info.h"
#ifdef RGPT_WITH_CUDA
#include "device/device.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rgpt_rt kernels (C++ always, CUDA when built with nvcc)";
  m.def("build_info", &rgpt::build_info_dict,
        "What this build holds: {'cuda': bool, 'cuda_architectures': [...], 'cxx_compiler': str, ...}");
#ifdef RGPT_WITH_CUDA
  m.def("cuda_runtime_info", &rgpt::cuda_runtime_info,
        "The linked CUDA runtime version, the driver version, and the visible devices");
#endif
}
