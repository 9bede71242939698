#pragma once
#include <pybind11/pybind11.h>

namespace rgpt {

// The CUDA runtime this module was linked against and the devices it sees
// (only registered when the module was built with CUDA).
pybind11::dict cuda_runtime_info();

}  // namespace rgpt
