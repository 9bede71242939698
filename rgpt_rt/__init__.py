"""rgpt_rt: an edge runtime for RegionGPT-style region-level vision-language models.

import rgpt_rt
sess = rgpt_rt.Session()                         # the embedded default model
sess.describe("photo.png", (10, 20, 60, 80))      # a region as a box or a mask

from rgpt_rt import RGPTConfig
from rgpt_rt.model import RGPT                    # the PyTorch reference model (needs transformers)
"""

from rgpt_rt.config import RGPTConfig

__version__ = "0.1.0"
__all__ = ["RGPTConfig", "Session", "__version__"]


def __getattr__(name: str):
    # Session loads torch ops and the runtime: imported on first use, not with the package.
    if name == "Session":
        from rgpt_rt.runtime.session import Session

        return Session
    raise AttributeError(f"module 'rgpt_rt' has no attribute {name!r}")
