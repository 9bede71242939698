"""Osprey at run time: its image geometry, and its region encoder (two embeddings per mask).

    family = OspreyFamily(config)
    frame = family.prepare_image(image, max_side=2048)      # short side to 512 (bicubic), then 512x512 (bilinear)
    masks = family.prepare_masks([mask], frame)             # [N, h, w]: the image's own geometry, never padded
    embeds = family.encode(levels, masks, weights)          # levels: res2..res5 [1, H_l, W_l, C_l] -> [N, 2, D]

The encoder is Osprey's MaskExtractor (osprey/model/layer.py) over the bundle's
connector.safetensors (mask_extractor.*, linears as weight_t [in, out]):
  <mask>: per level, the mask resampled bilinearly to the level's grid, cells > 0 averaged
          (mask pooling mode "binary", the four levels in one mask_pool_levels call), each
          level through its Linear(C_l, E), summed (one matmul over the levels side by side),
          then feat_linear (E -> D);
  <pos>:  the mask resampled bilinearly to mask_size x mask_size, flattened, through three
          linears with ReLU between them.
No transformers, no timm; tests hold it to rgpt_rt/model/osprey.py and to a transcription of
Osprey's formulas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rgpt_rt.config import POOL_MODES
from rgpt_rt.inputs import ImageLike, MaskLike, box_to_mask, load_mask
from rgpt_rt.runtime.families.base import Features, RegionFamily
from rgpt_rt.runtime.preprocess import Frame, open_image

LEVELS = 4
BINARY_EPSILON = 1e-8  # Osprey's MaskPooling: sum / (count + 1e-8)


class OspreyFamily(RegionFamily):
    name = "osprey"

    def __init__(self, config):
        super().__init__(config)
        self._prepared: tuple[int, dict[str, torch.Tensor]] | None = None

    # --- input geometry -------------------------------------------------------------------
    def prepare_image(self, image: ImageLike, max_side: int) -> Frame:
        pixels, original = open_image(image, max_side)
        vision = self.config.vision
        values = osprey_pixels(pixels, vision.image_size, vision.image_mean, vision.image_std)
        return Frame(pixels=pixels, original_size=original, pixel_values=values)

    def prepare_masks(
        self, masks: Sequence[MaskLike], frame: Frame, device: torch.device | None = None
    ) -> torch.Tensor:
        """[N, h, w] at the working image's size, unpadded (Osprey resizes masks straight to
        each level): bool, or float area coverage where the image was downscaled."""
        if isinstance(masks, np.ndarray | torch.Tensor) and masks.ndim == 2:
            masks = [masks]
        if len(masks) == 0:
            raise ValueError("give at least one mask (or box)")
        height, width = frame.pixels.shape[:2]
        out = []
        for index, mask in enumerate(masks):
            if isinstance(mask, tuple | list) and frame.scaled:
                mask = box_to_mask(mask, frame.original_size)
            full = load_mask(mask, frame.original_size, index)  # checked non-empty
            if frame.scaled:
                coverage = Image.fromarray(full.astype(np.float32)).resize(
                    (width, height), Image.Resampling.BOX
                )
                full = np.asarray(coverage, dtype=np.float32).clip(0.0, 1.0)
            out.append(full)
        return torch.from_numpy(np.stack(out)).to(device)

    def warm_up(self, weights: Mapping[str, torch.Tensor], device, dtype) -> None:
        levels = tuple(
            torch.zeros(1, 2, 2, width, dtype=dtype, device=device)
            for width in self.config.convnext.dims
        )
        self.encode(levels, torch.ones(1, 8, 8, dtype=torch.bool, device=device), weights)

    # --- the region encoder -----------------------------------------------------------------
    def encode(
        self, features: Features, masks: torch.Tensor, weights: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """levels: res2..res5 of one image, each [1, H_l, W_l, C_l]; masks [N, h, w] ->
        [N, 2, D] (<mask>, <pos>), in the weights' dtype."""
        if isinstance(features, torch.Tensor) or len(features) != LEVELS:
            raise ValueError("the osprey region encoder takes the four levels res2..res5")
        prepared = self._weights(weights)
        dtype = getattr(weights, "dtype", prepared["feat_linear.weight_t"].dtype)
        w = lambda name: prepared[name].to(dtype)  # noqa: E731  (a CPU widens one at a time)
        pooled = binary_pool_levels(list(features), masks)  # [N, C_2 + ... + C_5] fp32
        summed = pooled.to(dtype) @ w("levels.weight_t") + w("levels.bias")  # [N, E]
        mask_embeds = summed @ w("feat_linear.weight_t") + w("feat_linear.bias")  # [N, D]
        size = self.config.mask_extractor.mask_size
        small = F.interpolate(
            masks[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
        )  # [N, 1, size, size]
        x = small.flatten(1).to(dtype)
        for i in range(3):
            x = x @ w(f"mask_linear.layers.{i}.weight_t") + w(f"mask_linear.layers.{i}.bias")
            if i < 2:
                x = F.relu(x)
        return torch.stack([mask_embeds, x], dim=1)  # [N, 2, D]

    def _weights(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The MaskExtractor's tensors (read once per weights object) in their stored dtype (a
        CPU's fp32 copies would add ~0.1 GB at rest for Osprey-7b), the four level linears
        stacked along their inputs: sum_l (p_l @ W_l + b_l) = [p_2 .. p_5] @ [W_2; ..; W_5] + sum_l b_l."""
        if self._prepared is not None and self._prepared[0] == id(weights):
            return self._prepared[1]
        prefix = (
            "connector.mask_extractor."
            if "connector.mask_extractor.feat_linear.bias" in weights
            else "mask_extractor."
        )
        stored = getattr(weights, "stored", weights)  # a Widened mapping: its stored tensors
        compute = getattr(weights, "dtype", stored[prefix + "feat_linear.bias"].dtype)
        get = lambda name: stored[prefix + name]  # noqa: E731
        w = {
            "levels.weight_t": torch.cat([get(f"res{k + 2}.weight_t") for k in range(LEVELS)]),
            # summed in the compute dtype (1,024 values), as the four biases were added before
            "levels.bias": sum(get(f"res{k + 2}.bias").to(compute) for k in range(LEVELS)),
            "feat_linear.weight_t": get("feat_linear.weight_t"),
            "feat_linear.bias": get("feat_linear.bias"),
        }
        for i in range(3):
            for part in ("weight_t", "bias"):
                w[f"mask_linear.layers.{i}.{part}"] = get(f"mask_linear.layers.{i}.{part}")
        self._prepared = (id(weights), w)
        return w


def binary_pool_levels(levels: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Osprey's mask pooling on each level: [N, C_2 + ... + C_5], fp32. The project's op
    (mode "binary", all levels in one call) where it is built; else plain torch."""
    if "binary" in POOL_MODES:
        from rgpt_rt.ops.mask_pool import mask_pool_levels

        return mask_pool_levels(levels, masks, mode="binary").float()
    return torch.cat([binary_pool_torch(level, masks) for level in levels], dim=1)


def binary_pool_torch(level: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """level [1, H, W, C], masks [N, h, w] -> [N, C]: the mask resampled bilinearly
    (align_corners=False) to H x W unless it has that size, cells > 0 averaged."""
    height, width = level.shape[1:3]
    m = masks[:, None].float()
    if tuple(m.shape[-2:]) != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    cells = (m[:, 0] > 0).float()  # [N, H, W]
    total = torch.einsum("nhw,hwc->nc", cells, level[0].float())
    return total / (cells.sum(dim=(1, 2))[:, None] + BINARY_EPSILON)


def osprey_pixels(pixels: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """[h, w, 3] uint8 -> [1, 3, size, size] float32, Osprey's preprocessing (its demo and its
    training data): bicubic resize (PIL, on the uint8 image) to a short side of `size`, no
    centre crop, /255, normalised, then a bilinear resize (align_corners=False) to size x size."""
    height, width = pixels.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    target = (size, new_long) if width <= height else (new_long, size)  # PIL: (width, height)
    resized = np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized.astype(np.float32) * (1 / 255)).permute(2, 0, 1)  # [3, h, w]
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)
