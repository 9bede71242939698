"""rgpt_rt: an edge runtime for RegionGPT-style region-level vision-language models.

from rgpt_rt import RGPTConfig, default_checkpoint
from rgpt_rt.model import RGPT          # the PyTorch reference model (needs transformers)
model = RGPT.from_pretrained(default_checkpoint())   # the embedded `tiny` model
"""

from pathlib import Path

from rgpt_rt.config import RGPTConfig

__version__ = "0.1.0"
__all__ = ["RGPTConfig", "__version__", "default_checkpoint"]

_ASSETS = Path(__file__).parent / "assets"


def default_checkpoint() -> Path:
    """The folder of the embedded default model (`tiny`, trained on the shapes world; see
    rgpt_rt/assets/MODEL_CARD.md), loadable with `RGPT.from_pretrained`."""
    folder = _ASSETS / "tiny"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {folder}; reinstall rgpt_rt, or train "
            "one with `python -m rgpt_rt.train` and pass its folder instead"
        )
    return folder
