"""The interface a model family gives the Session's stages (runtime/families/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import ImageLike, MaskLike
from rgpt_rt.prompts import ChatTemplate, chat_template
from rgpt_rt.runtime.preprocess import Frame

Features = torch.Tensor | tuple[torch.Tensor, ...]  # a hi-res map, or several levels


class RegionFamily:
    """What a family decides: input geometry, region embeddings, region tokens, prompts."""

    name = "abstract"

    def __init__(self, config: RGPTConfig):
        self.config = config
        self.template: ChatTemplate = chat_template(config.family)

    @property
    def tokens_per_region(self) -> int:
        return self.config.tokens_per_region

    def slot_ids(self, tokenizer) -> list[int]:
        """The token ids one region is written as, in order (each takes one embedding)."""
        ids = [tokenizer.token_to_id(token) for token in self.config.tokens.region_slots]
        missing = [t for t, i in zip(self.config.tokens.region_slots, ids) if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {missing} token(s); rebuild the bundle")
        return ids

    def describe_prompt(self, detailed: bool = True, region: int = 1) -> str:
        return self.template.describe(detailed, region)

    # --- input geometry -------------------------------------------------------------------
    def prepare_image(self, image: ImageLike, max_side: int) -> Frame:
        """The image loaded, checked and bounded (its pixel values may wait for pixel_values:
        an image whose vision result is cached needs none)."""
        raise NotImplementedError

    def pixel_values(self, frame: Frame, device: torch.device) -> torch.Tensor:
        """[1, 3, S, S] float32 on `device`: the vision stage's input."""
        return frame.pixel_values.to(device)

    def prepare_masks(
        self, masks: Sequence[MaskLike], frame: Frame, device: torch.device | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def warm_up(self, weights: Mapping[str, torch.Tensor], device, dtype) -> None:
        """Run the region encoder once on dummy inputs (a custom op's first call in a process
        costs seconds: paid at load, not in the first answer)."""

    # --- after the vision stage --------------------------------------------------------------
    @staticmethod
    def features_to(features: Features, dtype: torch.dtype) -> Features:
        """The vision stage's region features in `dtype` (for the Session's vision cache)."""
        if isinstance(features, torch.Tensor):
            return features.to(dtype)
        return tuple(level.to(dtype) for level in features)

    @staticmethod
    def features_list(features: Features) -> list[torch.Tensor]:
        """The tensors of `features` (for byte counts: cache.tensor_bytes(*...))."""
        return [features] if isinstance(features, torch.Tensor) else list(features)

    def encode(
        self, features: Features, masks: torch.Tensor, weights: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """One image's features and its masks [N, h, w] (from prepare_masks, on the features'
        device) -> region embeddings [N, tokens_per_region, D]. `weights`: the bundle's
        connector.safetensors tensors, named connector.* (stages.Stages.connector)."""
        raise NotImplementedError


def splice_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    image_id: int,
    image_embeds: torch.Tensor | None,
    slot_ids: Sequence[int],
    region_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """Token embeddings [B, T, D] of `ids` [B, T] (`embed`: ids -> new embeddings, given 0 at
    the placeholders) with the image embeddings [.., g², D] at the image tokens and the region
    embeddings [R, k, D] (R regions in prompt order, k = len(slot_ids)) at the region slot
    tokens, both row-major: a region's k slots are consecutive tokens, so slot j of region r is
    row r*k + j."""
    image_slots = ids == image_id
    region_slots = torch.isin(ids, torch.tensor(list(slot_ids), device=ids.device))
    out = embed(ids.masked_fill(image_slots | region_slots, 0))
    if image_embeds is not None and bool(image_slots.any()):
        out[image_slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(out.dtype)
    if region_embeds is not None and bool(region_slots.any()):
        flat = region_embeds.reshape(-1, region_embeds.shape[-1])  # [R*k, D]
        if flat.shape[0] != int(region_slots.sum()):
            raise ValueError(
                f"the prompt holds {int(region_slots.sum())} region slot tokens but "
                f"{flat.shape[0]} region embeddings were given"
            )
        out[region_slots] = flat.to(out.dtype)
    return out
