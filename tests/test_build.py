"""rgpt_rt._C says what it was built with."""

import pytest

from rgpt_rt import _C


def test_build_info_describes_the_build():
    info = _C.build_info()
    assert set(info) >= {"cuda", "cuda_architectures", "cxx_compiler", "cuda_compiler", "version"}
    assert isinstance(info["cuda"], bool)
    assert info["cxx_compiler"]
    if info["cuda"]:
        assert info["cuda_architectures"], "a CUDA build names its architectures"
        assert info["cuda_compiler"].startswith("NVIDIA")
        assert hasattr(_C, "cuda_runtime_info")
    else:
        assert info["cuda_architectures"] == []
        assert not hasattr(_C, "cuda_runtime_info")


def test_cuda_runtime_info_without_a_device_reports_none():
    if not hasattr(_C, "cuda_runtime_info"):
        pytest.skip("rgpt_rt._C was built without CUDA (nvcc was not found): nothing to report")
    import torch

    runtime = _C.cuda_runtime_info()
    assert runtime["runtime_version"] >= 12000
    if not torch.cuda.is_available():
        assert runtime["devices"] == []
