"""rgpt_rt: an edge runtime for RegionGPT-style region-level vision-language models.

import rgpt_rt
sess = rgpt_rt.Session()                                # the embedded default model
sess.describe("photo.png", (10, 20, 60, 80))            # a region as a box or a mask

from rgpt_rt import RGPTConfig, default_checkpoint
from rgpt_rt.model import RGPT                          # the PyTorch reference model (needs transformers)
model = RGPT.from_pretrained(default_checkpoint())      # the embedded `tiny` model
"""

from pathlib import Path

from rgpt_rt.config import RGPTConfig

__version__ = "0.1.0"
__all__ = ["RGPTConfig", "Session", "__version__", "default_checkpoint"]

_ASSETS = Path(__file__).parent / "assets"


def default_checkpoint() -> Path:
    """The folder of the embedded default model (`tiny`, trained on the shapes world; see
    rgpt_rt/assets/MODEL_CARD.md), loadable with `RGPT.from_pretrained`."""
    folder = _ASSETS / "tiny"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {folder}; reinstall rgpt_rt, or train "
            "one with `python -m rgpt_rt.training.train` and pass its folder instead"
        )
    return folder


def __getattr__(name: str):
    # Session loads torch ops and the runtime: imported on first use, not with the package.
    if name == "Session":
        from rgpt_rt.runtime.session import Session

        return Session
    raise AttributeError(f"module 'rgpt_rt' has no attribute {name!r}")
