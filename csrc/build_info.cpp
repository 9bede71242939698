#include "build_info.h"

#include <sstream>
#include <string>
#include <thread>

namespace py = pybind11;

namespace rgpt {

#ifdef RGPT_WITH_CUDA
namespace {
// "80-real,87-real" -> ["80-real", "87-real"]
py::list split_commas(const std::string& text) {
  py::list out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) out.append(item);
  }
  return out;
}
}  // namespace
#endif

py::dict build_info_dict() {
  py::dict info;
  info["version"] = RGPT_VERSION;
  info["cxx_compiler"] = RGPT_CXX_COMPILER;
  info["hardware_threads"] = std::thread::hardware_concurrency();
#ifdef RGPT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_compiler"] = RGPT_CUDA_COMPILER;
  info["cuda_architectures"] = split_commas(RGPT_CUDA_ARCHITECTURES);
#else
  info["cuda"] = false;
  info["cuda_compiler"] = py::none();
  info["cuda_architectures"] = py::list();
#endif
  return info;
}

}  // namespace rgpt
