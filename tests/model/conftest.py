import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return RGPT(RGPTConfig.from_preset("tiny")).eval()
