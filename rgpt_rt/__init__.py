"""rgpt_rt: an edge runtime for RegionGPT-style region-level vision-language models.

from rgpt_rt import RGPTConfig
from rgpt_rt.model import RGPT          # the PyTorch reference model (needs transformers)
"""

from rgpt_rt.config import RGPTConfig

__version__ = "0.1.0"
__all__ = ["RGPTConfig", "__version__"]
