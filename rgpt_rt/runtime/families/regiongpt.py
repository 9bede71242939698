"""RegionGPT at run time: a padded square image, one pooled <region> embedding per mask.

What stages.Stages.regions computes today, as a family: the hi-res map [1, 4g, 4g, C] pooled
per mask (config.pool_mode), through the connector, plus each mask's centroid projection where
the model has one. Region numbers (ops/region_numbers.py) are added per question, after this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rgpt_rt.inputs import ImageLike, MaskLike
from rgpt_rt.ops import add_region_positions, mask_pool
from rgpt_rt.runtime.families.base import Features, RegionFamily
from rgpt_rt.runtime.preprocess import Frame, pixel_values, prepare_image, prepare_masks
from rgpt_rt.runtime.vision import connect


class RegionGPTFamily(RegionFamily):
    name = "regiongpt"

    def prepare_image(self, image: ImageLike, max_side: int) -> Frame:
        return prepare_image(image, self.config.vision, max_side, values=False)

    def pixel_values(self, frame: Frame, device: torch.device) -> torch.Tensor:
        return pixel_values(frame, self.config.vision, device)  # padded and resized there

    def prepare_masks(
        self, masks: Sequence[MaskLike], frame: Frame, device: torch.device | None = None
    ) -> torch.Tensor:
        return prepare_masks(list(masks), frame, device)  # [N, S', S'], padded like the image

    def warm_up(self, weights: Mapping[str, torch.Tensor], device, dtype) -> None:
        channels = self.config.vision.hidden_size
        features = torch.zeros(1, 4, 4, channels, dtype=dtype, device=device)
        mask_pool(
            features,
            torch.ones(1, 4, 4, dtype=torch.bool, device=device),
            mode=self.config.pool_mode,
        )

    def encode(
        self, features: Features, masks: torch.Tensor, weights: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        pooled = mask_pool(features, masks, mode=self.config.pool_mode)  # [N, C]
        embeds = connect(pooled, weights)  # [N, D]
        projection = weights.get("connector.region_position.weight_t")  # [4F, D]
        if projection is not None:
            embeds = add_region_positions(embeds, masks, projection.t())
        return embeds[:, None]  # [N, 1, D]
