#include <cuda_runtime.h>

#include "device/device.h"

namespace py = pybind11;

namespace rgpt {

py::dict cuda_runtime_info() {
  py::dict info;
  int runtime_version = 0;
  cudaRuntimeGetVersion(&runtime_version);
  info["runtime_version"] = runtime_version;
  int driver_version = 0;
  cudaDriverGetVersion(&driver_version);  // 0 when no driver is installed
  info["driver_version"] = driver_version;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    count = 0;
  }
  py::list devices;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    py::dict d;
    d["name"] = std::string(prop.name);
    d["capability"] = py::make_tuple(prop.major, prop.minor);
    d["multiprocessors"] = prop.multiProcessorCount;
    d["memory_bytes"] = static_cast<unsigned long long>(prop.totalGlobalMem);
    devices.append(d);
  }
  info["devices"] = devices;
  return info;
}

}  // namespace rgpt
