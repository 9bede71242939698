"""Model families at run time: what differs between RegionGPT and Osprey after the vision stage.

    family = region_family(config)           # RegionGPTFamily or OspreyFamily
    frame = family.prepare_image(image, max_side)             # pixels in the family's geometry
    masks = family.prepare_masks(masks, frame)                # [N, h, w] in that geometry
    features = family.features_to(vision_features, dtype)     # a map, or Osprey's four levels
    embeds = family.encode(features, masks, weights)          # [N, k, D]: k embeddings per region
    family.slot_ids(tokenizer)                                # the k prompt tokens each region is
    family.template                                           # system prompt, image line, describe prompts

Every region is `tokens_per_region` consecutive prompt tokens (RegionGPT: `<region>`; Osprey:
`<mask><pos>`), and its k embeddings go in at them, in order: splicing region r is
`embeds[ids ∈ slot_ids] = region_embeds[order].reshape(-1, D)` (row-major).
"""

from __future__ import annotations

from rgpt_rt.config import RGPTConfig
from rgpt_rt.runtime.families.base import Features, RegionFamily, splice_embeddings
from rgpt_rt.runtime.families.osprey import OspreyFamily
from rgpt_rt.runtime.families.regiongpt import RegionGPTFamily

FAMILIES = {"regiongpt": RegionGPTFamily, "osprey": OspreyFamily}


def region_family(config: RGPTConfig) -> RegionFamily:
    """The family object of a config (RGPTConfig.family)."""
    return FAMILIES[config.family](config)


__all__ = [
    "FAMILIES",
    "Features",
    "OspreyFamily",
    "RegionFamily",
    "RegionGPTFamily",
    "region_family",
    "splice_embeddings",
]
