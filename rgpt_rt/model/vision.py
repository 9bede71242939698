"""The CLIP vision tower: pixels -> the patch grid of the selected layer, CLS dropped.

    tower = VisionTower(cfg.vision)        # or VisionTower.from_clip_folder(cfg.vision, "clip-vit-large-patch14-336/")
    grid = tower(pixel_values)             # [B, 3, S, S] -> [B, g, g, C]

Layers after `select_layer` are never run, so they are not kept: the tower holds
`cfg.layers_used` transformer layers and their output is the selected layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from rgpt_rt.config import VisionConfig
from rgpt_rt.model.llm import hf_from_pretrained


def clip_vision_config(cfg: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers_used,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def read_clip_vision_config(folder: Path) -> VisionConfig:
    """The VisionConfig of a local CLIP folder (a CLIPModel or a CLIPVisionModel save)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; give the folder of a CLIP model saved by transformers"
        )
    raw = json.loads(config_path.read_text())
    model_type = raw.get("model_type")
    if model_type == "clip":
        raw = raw.get("vision_config", {})
    elif model_type != "clip_vision_model":
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not CLIP; give a CLIP (ViT) folder such as clip-vit-large-patch14-336"
        )
    defaults = CLIPVisionConfig()
    kwargs = dict(
        image_size=raw.get("image_size", defaults.image_size),
        patch_size=raw.get("patch_size", defaults.patch_size),
        hidden_size=raw.get("hidden_size", defaults.hidden_size),
        intermediate_size=raw.get("intermediate_size", defaults.intermediate_size),
        num_layers=raw.get("num_hidden_layers", defaults.num_hidden_layers),
        num_heads=raw.get("num_attention_heads", defaults.num_attention_heads),
        layer_norm_eps=raw.get("layer_norm_eps", defaults.layer_norm_eps),
        hidden_act=raw.get("hidden_act", defaults.hidden_act),
    )
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        if "image_mean" in pre and "image_std" in pre:
            kwargs["image_mean"] = tuple(pre["image_mean"])
            kwargs["image_std"] = tuple(pre["image_std"])
    return VisionConfig(**kwargs)


def transformer_root(model: CLIPVisionModel) -> nn.Module:
    # transformers 4.x nests the transformer under .vision_model; 5.x does not.
    return getattr(model, "vision_model", model)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, clip: CLIPVisionModel | None = None):
        super().__init__()
        self.cfg = cfg
        if clip is None:
            clip = CLIPVisionModel(clip_vision_config(cfg))
        root = transformer_root(clip)
        layers = root.encoder.layers
        if len(layers) < cfg.layers_used:
            raise ValueError(
                f"the CLIP model has {len(layers)} layers but {cfg.layers_used} are needed"
            )
        root.encoder.layers = nn.ModuleList(list(layers)[: cfg.layers_used])
        clip.config.num_hidden_layers = cfg.layers_used
        self.clip = clip

    @classmethod
    def from_clip_folder(
        cls, cfg: VisionConfig, folder: str | Path, dtype: torch.dtype | None = None
    ) -> VisionTower:
        clip = hf_from_pretrained(CLIPVisionModel, folder, dtype)
        return cls(cfg, clip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, 3, S, S] -> [B, g, g, C]
        batch = pixel_values.shape[0]
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state  # [B, 1 + g*g, C]
        grid = self.cfg.grid
        return hidden[:, 1:].reshape(batch, grid, grid, hidden.shape[-1])
