"""The vision side of a model, without its LLM: CLIP + refinement + patch merge + connector, the
part of a 7B model (~0.3 B parameters) that the exporter materialises.

    side = VisionSide.from_checkpoint("ckpt/")                          # an RGPT.save_pretrained folder
    side = VisionSide.from_components(config, "clip-vit-large-patch14-336/", rgpt_weights=None)
    image_embeds, hires = side(pixel_values)     # [B, 3, S, S] -> [B, g², D], [B, 4g, 4g, C]
    side.prepare_for_export()                    # fp16-exact weights, linears stored [in, out]
    weights = side.bundle_tensors()              # {"vision": {...}, "connector": {...}}, fp16

`prepare_for_export` rounds every weight to its fp16 value (the bundle stores fp16) and stores
each linear's weight transposed (`weight_t`, [in, out]), so that the exported graph's MatMul
reads the parameter itself: the graph's initializers are then exactly the bundle's tensors,
and vision.onnx points at vision.safetensors instead of holding a second copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model.connector import Connector
from rgpt_rt.model.region import Refinement, patch_merge
from rgpt_rt.model.vision import VisionTower, transformer_root

# Names in the bundle: clip.* (the transformer, as transformers names it without its root),
# refinement.* and connector.*; a linear's weight is stored as weight_t [in, out].
PARTS = ("clip", "refinement", "connector")


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias: an nn.Linear whose weight is kept as [in, out]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)  # [..., in] @ [in, out]
        return y if self.bias is None else y + self.bias


class VisionSide(nn.Module):
    """RGPT.encode_image without the LLM."""

    def __init__(
        self, config: RGPTConfig, vision: VisionTower, refinement: Refinement, connector: Connector
    ):
        super().__init__()
        self.config = config
        self.vision, self.refinement, self.connector = vision, refinement, connector

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pixel_values [B, 3, S, S] -> image_embeds [B, g*g, D], hires [B, 4g, 4g, C]
        grid = self.vision(pixel_values)  # [B, g, g, C]
        hires = self.refinement(grid)  # [B, 4g, 4g, C]
        return self.connector(patch_merge(hires, self.config.vision.grid)), hires

    # --- sources ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> VisionSide:
        """The vision side of an RGPT.save_pretrained folder; its llm/ is never read."""
        from transformers import CLIPVisionModel

        from rgpt_rt.model.llm import hf_from_pretrained

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        config = RGPTConfig.from_dict(meta["config"])
        clip = hf_from_pretrained(CLIPVisionModel, folder / "vision", torch.float32)
        side = cls._assemble(config, VisionTower(config.vision, clip))
        side.load_own(load_file(str(folder / "rgpt.safetensors")))
        return side

    @classmethod
    def from_components(
        cls, config: RGPTConfig, clip_dir: str | Path, rgpt_weights: Path | None = None, seed=0
    ) -> VisionSide:
        """CLIP from a local folder; refinement and connector from `rgpt_weights` (an
        rgpt.safetensors), else new (seeded random initialisation)."""
        from transformers import CLIPVisionModel

        from rgpt_rt.model.llm import hf_from_pretrained

        torch.manual_seed(seed)
        clip = hf_from_pretrained(CLIPVisionModel, clip_dir, torch.float32)
        side = cls._assemble(config, VisionTower(config.vision, clip))
        if rgpt_weights is not None:
            side.load_own(load_file(str(rgpt_weights)))
        return side

    @classmethod
    def _assemble(cls, config: RGPTConfig, tower: VisionTower) -> VisionSide:
        channels, hidden = config.vision.hidden_size, config.llm.hidden_size
        connector = Connector(
            channels, hidden, config.connector.region_numbers, config.connector.region_positions
        )
        refinement = Refinement(channels, config.refinement.layer_norm_eps)
        return cls(config, tower, refinement, connector).float().eval()

    def load_own(self, own: dict[str, torch.Tensor]) -> None:
        """Refinement and connector weights from an rgpt.safetensors state dict."""
        for name, module in (("refinement", self.refinement), ("connector", self.connector)):
            part = {k[len(name) + 1 :]: v for k, v in own.items() if k.startswith(name + ".")}
            module.load_state_dict(part)

    # --- what the bundle holds ----------------------------------------------------------------
    @torch.no_grad()
    def prepare_for_export(self) -> None:
        """Round every floating weight to fp16 (what the bundle stores) and store linears as
        weight_t [in, out]. The module computes the same function on the rounded weights."""
        for parameter in self.parameters():
            parameter.copy_(parameter.half().float())
        for root in (self.vision, self.refinement, self.connector):
            for name, module in list(root.named_modules()):
                if type(module) is nn.Linear:
                    parent, _, child = name.rpartition(".")
                    holder = root.get_submodule(parent) if parent else root
                    setattr(holder, child, TransposedLinear(module))

    def bundle_name(self, parameter_name: str) -> str | None:
        """This module's parameter name -> its name in the bundle (None: not stored)."""
        prefixes = {
            "vision.clip.": "clip.",
            "refinement.": "refinement.",
            "connector.": "connector.",
        }
        for prefix, part in prefixes.items():
            if parameter_name.startswith(prefix):
                rest = parameter_name[len(prefix) :]
                if part == "clip.":
                    rest = rest.removeprefix("vision_model.")  # transformers 4.x nests the root
                    if rest.startswith("post_layernorm."):
                        return None  # the pooled-output norm never runs
                return part + rest
        return None

    def bundle_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"vision": {clip.*, refinement.*}, "connector": {fc1.weight_t, ...}}: fp16, contiguous,
        the names the runtime's torch backend reads (after prepare_for_export)."""
        out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "connector": {}}
        for name, tensor in self.named_parameters():
            bundle = self.bundle_name(name)
            if bundle is None:
                continue
            value = tensor.detach().half().contiguous()
            if bundle.startswith("connector."):
                out["connector"][bundle.removeprefix("connector.")] = value
            else:
                out["vision"][bundle] = value
        return out


def clip_root(side: VisionSide) -> nn.Module:
    return transformer_root(side.vision.clip)
