"""The PyTorch reference model of RegionGPT (uses transformers; the runtime does not)."""

from rgpt_rt.model.rgpt import RGPT, RGPTOutput

__all__ = ["RGPT", "RGPTOutput"]
