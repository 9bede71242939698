#pragma once
#include <pybind11/pybind11.h>

namespace rgpt {

// A dict describing this build: whether the CUDA kernels are in it, for which
// architectures, and with which compilers.
pybind11::dict build_info_dict();

}  // namespace rgpt
