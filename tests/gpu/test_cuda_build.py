"""The CUDA part of rgpt_rt._C is there and sees the device torch sees."""

import torch

from rgpt_rt import _C


def test_cuda_build_sees_the_device():
    info = _C.build_info()
    assert info["cuda"], "rgpt_rt._C was built without CUDA on a CUDA machine"
    runtime = _C.cuda_runtime_info()
    assert len(runtime["devices"]) == torch.cuda.device_count()
    assert runtime["devices"][0]["name"] == torch.cuda.get_device_name(0)
