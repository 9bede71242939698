"""Configuration of a RegionGPT model: one dataclass per component, and named presets.

    RGPTConfig.from_preset("tiny")      # trains from scratch on 2 CPU cores (the embedded default model)
    RGPTConfig.from_preset("rgpt-7b")   # CLIP ViT-L/14-336 + Vicuna-7B v1.5 shapes

Every config validates itself in __post_init__, so a bad value fails where it is written,
and round-trips through a plain dict (config.json of a checkpoint or a bundle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POOL_MODES = ("area", "bilinear")

# CLIP's normalisation constants (OpenAI CLIP preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class VisionConfig:
    """The CLIP vision tower. Features are taken from `select_layer` (-2: the penultimate
    layer, as LLaVA and RegionGPT do), with the CLS token dropped: a [g, g, C] grid."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024  # C
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        _require(
            self.image_size > 0 and self.patch_size > 0,
            "vision image_size and patch_size must be positive",
        )
        _require(
            self.image_size % self.patch_size == 0,
            f"vision image_size {self.image_size} must be a multiple of patch_size {self.patch_size}",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            f"vision hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}",
        )
        _require(
            -self.num_layers <= self.select_layer <= -1,
            f"vision select_layer {self.select_layer} must be in [-{self.num_layers}, -1]",
        )
        _require(
            len(self.image_mean) == 3 and len(self.image_std) == 3,
            "image_mean and image_std need 3 values",
        )

    @property
    def grid(self) -> int:
        """g: the side of the patch grid (24 for ViT-L/14 at 336)."""
        return self.image_size // self.patch_size

    @property
    def layers_used(self) -> int:
        """How many transformer layers run: the ones after `select_layer` are never needed."""
        return self.num_layers + 1 + self.select_layer


@dataclass
class RefinementConfig:
    """Feature refinement: ConvT(2, s2) - LayerNorm2d - GELU - ConvT(2, s2) - GELU, a 4x
    upsampling that keeps the channels. `upsample` is fixed by that structure."""

    layer_norm_eps: float = 1e-6
    upsample: int = 4

    def __post_init__(self) -> None:
        _require(
            self.upsample == 4, "refinement upsample is 4 (two stride-2 transposed convolutions)"
        )


@dataclass
class ConnectorConfig:
    """The shared connector (LLaVA-1.5 "mlp2x_gelu"): Linear(C, D) - GELU - Linear(D, D).

    region_numbers: M > 0 adds a learned vector to each region embedding by its number K
    (<regionK>, K <= M; rgpt_rt/ops/region_numbers.py), so that the decoder need not count
    region tokens to answer "Region [K]". 0 (RegionGPT): none.
    region_positions: F > 0 adds a learned projection of 4F sin/cos features of each mask's
    centroid to its region embedding (rgpt_rt/ops/region_positions.py). 0 (RegionGPT): none."""

    kind: str = "mlp2x_gelu"
    region_numbers: int = 0
    region_positions: int = 0

    def __post_init__(self) -> None:
        _require(
            self.kind == "mlp2x_gelu", f"connector kind {self.kind!r} is unknown; use 'mlp2x_gelu'"
        )
        _require(
            0 <= self.region_numbers <= 64,
            f"connector region_numbers must be 0-64 (0: none); got {self.region_numbers}",
        )
        _require(
            0 <= self.region_positions <= 16,
            f"connector region_positions must be 0-16 (0: none); got {self.region_positions}",
        )


@dataclass
class LLMConfig:
    """A LLaMA-architecture decoder (HF LlamaConfig field meanings)."""

    vocab_size: int = 32000
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _require(
            self.hidden_size % self.num_heads == 0,
            f"llm hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"llm num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}",
        )
        _require(
            self.vocab_size > 0 and self.num_layers > 0,
            "llm vocab_size and num_layers must be positive",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TokenConfig:
    """The special tokens. `<image>` expands to g*g embeddings, `<region>` to one per mask;
    their ids are read from the tokenizer when a model is built or loaded."""

    image: str = "<image>"
    region: str = "<region>"
    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"
    unk: str = "<unk>"


@dataclass
class RGPTConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    pool_mode: str = "area"
    name: str = "custom"
    # What classify() asks the model to answer in: "Answer the question using {vocabulary}
    # category names." RegionGPT was taught COCO-80; the embedded tiny model, shape names.
    vocabulary: str = "COCO-80"

    def __post_init__(self) -> None:
        _require(
            self.pool_mode in POOL_MODES,
            f"pool_mode {self.pool_mode!r} is unknown; use one of {POOL_MODES}",
        )

    @property
    def num_image_tokens(self) -> int:
        """g*g: how many embeddings one <image> becomes."""
        return self.vision.grid**2

    @property
    def hires_grid(self) -> int:
        """4g: the side of the refined (hi-res) feature map that regions are pooled on."""
        return self.vision.grid * self.refinement.upsample

    # --- presets --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> RGPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    # --- dict round trip ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RGPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"config has unknown keys {sorted(unknown)}; known keys are {sorted(known)}"
            )
        parts = {
            "vision": VisionConfig,
            "refinement": RefinementConfig,
            "connector": ConnectorConfig,
            "llm": LLMConfig,
            "tokens": TokenConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value, key)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(
            f"config section {where!r} has unknown keys {sorted(unknown)}; known keys are {sorted(names)}"
        )
    return kind(**values)


def _tiny() -> RGPTConfig:
    # Trains from scratch on 2 CPU cores (the embedded default model, rgpt_rt/assets/): 96 px
    # images in 16 px patches, a 6x6 patch grid (36 image tokens) and a 24x24 refined map for
    # the regions (4 px cells), and a 4-layer decoder over the shapes world's ~640-token
    # vocabulary. Decoder widths are multiples of 128, the INT4 group size.
    return RGPTConfig(
        vision=VisionConfig(
            image_size=96,
            patch_size=16,
            hidden_size=128,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            hidden_act="gelu",
            select_layer=-1,
        ),
        llm=LLMConfig(
            vocab_size=768,
            hidden_size=256,
            intermediate_size=768,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
        name="tiny",
        vocabulary="shape",
    )


def _rgpt_7b() -> RGPTConfig:
    # CLIP ViT-L/14 at 336 px (24x24 grid, 576 image tokens, C = 1024) + Vicuna-7B v1.5.
    return RGPTConfig(
        vision=VisionConfig(),
        llm=LLMConfig(),
        name="rgpt-7b",
    )


PRESETS = {"tiny": _tiny, "rgpt-7b": _rgpt_7b}
