"""Configuration of a region VLM: one dataclass per component, and named presets.

    RGPTConfig.from_preset("tiny")           # trains from scratch on 2 CPU cores (the embedded default model)
    RGPTConfig.from_preset("rgpt-7b")        # CLIP ViT-L/14-336 + Vicuna-7B v1.5 shapes
    RGPTConfig.from_preset("osprey-7b")      # Osprey-7b: ConvNeXt-L (OpenCLIP) + Vicuna-7B v1.5
    RGPTConfig.from_preset("osprey-narrow")  # Osprey's structure at narrow widths (CI)

`family` says which model a checkpoint is: "regiongpt" (one pooled <region> embedding per
mask, CLIP ViT + refinement) or "osprey" (a <mask><pos> pair per mask from four ConvNeXt
levels; docs/osprey.md).

Every config validates itself in __post_init__, so a bad value fails where it is written,
and round-trips through a plain dict (config.json of a checkpoint or a bundle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# mask pooling modes; "binary" is Osprey's (rgpt_rt/ops/mask_pool.py)
POOL_MODES = ("area", "bilinear", "binary")
FAMILIES = ("regiongpt", "osprey")

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
    """The special tokens. `<image>` expands to g*g embeddings, each region placeholder to the
    region token followed by `region_extra` (RegionGPT: `<region>` alone, one embedding per
    mask; Osprey: `<mask><pos>`, two embeddings per mask); their ids are read from the
    tokenizer when a model is built or loaded."""

    image: str = "<image>"
    region: str = "<region>"
    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"
    unk: str = "<unk>"
    region_extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.region_extra = tuple(self.region_extra)
        _require(
            self.region not in self.region_extra and self.image not in self.region_extra,
            f"region_extra {self.region_extra} repeats the image or region token",
        )

    @property
    def region_slots(self) -> tuple[str, ...]:
        """The tokens one region becomes, in order: each takes one region embedding."""
        return (self.region, *self.region_extra)

    @property
    def region_text(self) -> str:
        """What a `<regionK>` placeholder is written as in the prompt."""
        return "".join(self.region_slots)


@dataclass
class ConvNeXtConfig:
    """A ConvNeXt trunk (timm's ConvNeXt, as OpenCLIP's `convnext_large` wraps it): a 4x4
    stride-4 stem, then four stages, each (but the first) opening with a 2x2 stride-2
    downsampling; their outputs are the feature levels res2..res5 (strides 4, 8, 16, 32)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    layer_norm_eps: float = 1e-6
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        self.depths, self.dims = tuple(self.depths), tuple(self.dims)
        _require(
            len(self.depths) == 4 and len(self.dims) == 4,
            f"convnext depths and dims need 4 stages each; got {self.depths} and {self.dims}",
        )
        _require(
            all(d > 0 for d in self.depths + self.dims), "convnext depths and dims are positive"
        )

    @staticmethod
    def stride(level: int) -> int:
        """The stride of stage `level` (0-based): 4, 8, 16, 32."""
        return 4 * 2**level


@dataclass
class MaskExtractorConfig:
    """Osprey's MaskExtractor: each level's pooled feature through its own Linear(C_l,
    embed_dim), summed, then Linear(embed_dim, D) for the <mask> embedding; the mask resized to
    mask_size x mask_size through a 3-layer ReLU MLP (mask_size^2 -> embed_dim -> embed_dim -> D)
    for the <pos> embedding. image_level: the ConvNeXt stage whose map becomes the image tokens
    (2: res4, stride 16), through the projector ("mlp2x_gelu")."""

    mask_size: int = 112
    embed_dim: int = 1024
    image_level: int = 2
    projector: str = "mlp2x_gelu"

    def __post_init__(self) -> None:
        _require(self.mask_size > 0 and self.embed_dim > 0, "mask_size and embed_dim are positive")
        _require(0 <= self.image_level <= 3, f"image_level {self.image_level} must be 0-3")
        _require(
            self.projector == "mlp2x_gelu",
            f"projector {self.projector!r} is unknown; Osprey uses 'mlp2x_gelu'",
        )


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
    family: str = "regiongpt"
    # The osprey family only: its trunk and its region encoder. For it, `vision` holds the
    # input geometry only (image_size, mean/std) with patch_size = the image level's stride
    # and hidden_size = its channels, so that grid and num_image_tokens keep their meaning.
    convnext: ConvNeXtConfig | None = None
    mask_extractor: MaskExtractorConfig | None = None

    def __post_init__(self) -> None:
        _require(
            self.family in FAMILIES, f"family {self.family!r} is unknown; use one of {FAMILIES}"
        )
        if self.family == "osprey":
            self._check_osprey()
            return
        _require(
            self.convnext is None and self.mask_extractor is None,
            f"convnext and mask_extractor belong to the osprey family, not {self.family!r}",
        )
        _require(
            self.pool_mode in POOL_MODES,
            f"pool_mode {self.pool_mode!r} is unknown; use one of {POOL_MODES}",
        )

    def _check_osprey(self) -> None:
        _require(
            self.convnext is not None and self.mask_extractor is not None,
            "the osprey family needs the convnext and mask_extractor sections",
        )
        level = self.mask_extractor.image_level
        _require(
            self.vision.patch_size == ConvNeXtConfig.stride(level)
            and self.vision.hidden_size == self.convnext.dims[level],
            f"osprey: vision.patch_size and vision.hidden_size must be the image level's stride "
            f"{ConvNeXtConfig.stride(level)} and channels {self.convnext.dims[level]}; got "
            f"{self.vision.patch_size} and {self.vision.hidden_size}",
        )
        _require(
            self.vision.image_size % ConvNeXtConfig.stride(3) == 0,
            f"osprey: vision.image_size {self.vision.image_size} must be a multiple of 32",
        )
        _require(
            self.pool_mode == "binary",
            f"osprey pools each level over the cells its resized mask covers (pool_mode "
            f"'binary'); got {self.pool_mode!r}",
        )
        _require(
            len(self.tokens.region_slots) == 2,
            f"osprey regions are two tokens (<mask><pos>); tokens give {self.tokens.region_slots}",
        )

    @property
    def tokens_per_region(self) -> int:
        """How many embeddings (and prompt tokens) one region takes: 1, or 2 for Osprey."""
        return len(self.tokens.region_slots)

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
            "convnext": ConvNeXtConfig,
            "mask_extractor": MaskExtractorConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts and value is not None:
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


# Osprey's input: 512x512 pixels, CLIP's mean and std (osprey/model/multimodal_encoder/clip_encoder.py).
OSPREY_IMAGE_SIZE = 512


def osprey_config(
    llm: LLMConfig,
    convnext: ConvNeXtConfig | None = None,
    mask_extractor: MaskExtractorConfig | None = None,
    image_size: int = OSPREY_IMAGE_SIZE,
    name: str = "osprey",
) -> RGPTConfig:
    """An osprey-family config: its vision geometry follows from the trunk and the image level
    (res4 of ConvNeXt-L at 512 px: stride 16, 768 channels, 32x32 = 1024 image tokens)."""
    convnext = convnext or ConvNeXtConfig()
    mask_extractor = mask_extractor or MaskExtractorConfig()
    level = mask_extractor.image_level
    return RGPTConfig(
        vision=VisionConfig(
            image_size=image_size,
            patch_size=ConvNeXtConfig.stride(level),
            hidden_size=convnext.dims[level],
            intermediate_size=4 * convnext.dims[level],
            num_layers=1,
            num_heads=1,
            layer_norm_eps=convnext.layer_norm_eps,
            hidden_act="gelu",
            select_layer=-1,
        ),
        llm=llm,
        tokens=TokenConfig(region="<mask>", region_extra=("<pos>",), pad="<unk>"),
        pool_mode="binary",
        name=name,
        family="osprey",
        convnext=convnext,
        mask_extractor=mask_extractor,
    )


def _osprey_7b() -> RGPTConfig:
    # OpenCLIP ConvNeXt-Large (laion/CLIP-convnext_large_d_320...) at 512 px + Vicuna-7B v1.5.
    return osprey_config(LLMConfig(), name="osprey-7b")


def _osprey_narrow() -> RGPTConfig:
    # Osprey's structure and geometry (512 px, four ConvNeXt levels 128/64/32/16 cells wide,
    # 1024 image tokens, the MaskExtractor, <mask><pos>) at widths that run in seconds on 2
    # cores; a 2-layer decoder whose widths are multiples of the INT4 group size.
    return osprey_config(
        LLMConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=2048,
        ),
        convnext=ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
        mask_extractor=MaskExtractorConfig(mask_size=16, embed_dim=64),
        name="osprey-narrow",
    )


PRESETS = {
    "tiny": _tiny,
    "rgpt-7b": _rgpt_7b,
    "osprey-7b": _osprey_7b,
    "osprey-narrow": _osprey_narrow,
}
