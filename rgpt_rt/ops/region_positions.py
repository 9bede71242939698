"""Region positions: each region embedding plus a learned projection of where its mask lies.

    mask_centroids(masks [N, H, W]) -> [N, 2]                  (x, y) in [0, 1], image-relative
    position_features(centroids [N, 2], frequencies) -> [N, 4F]  sin/cos of 2^k * pi * x and y
    add_region_positions(embeds [N, D], masks [N, H, W], weight [D, 4F]) -> [N, D]

Mask pooling averages features, so a region embedding holds its position only as far as the
vision tower's position embeddings survive the average. With `connector.region_positions` = F
> 0 the embedding also gets weight @ position_features(centroid of its mask): where the region
is, said outright. The masks are the ones pooled (any size, the padded image's field of view).
RegionGPT's checkpoints have no such weight (F = 0).
"""

from __future__ import annotations

import math

import torch


def mask_centroids(masks: torch.Tensor) -> torch.Tensor:
    """masks [N, H, W] (bool or weights >= 0) -> [N, 2]: each mask's centre of mass (x, y) as a
    fraction of the width and height, pixel centres at (j + 0.5) / W. An empty mask gives the
    image centre (0.5, 0.5)."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N, H, W]; got {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        masks = masks.view(torch.uint8)  # summing bytes costs a quarter of a float copy
    height, width = masks.shape[1:]
    cols = masks.sum(dim=1, dtype=torch.float32)  # [N, W]
    rows = masks.sum(dim=2, dtype=torch.float32)  # [N, H]
    xs = torch.linspace(0.5 / width, 1 - 0.5 / width, width, device=masks.device)
    ys = torch.linspace(0.5 / height, 1 - 0.5 / height, height, device=masks.device)
    area = cols.sum(dim=1, keepdim=True)  # [N, 1]
    centre = torch.stack([cols @ xs, rows @ ys], dim=1) / area.clamp(min=1e-6)
    return torch.where(area > 0, centre, torch.full_like(centre, 0.5))


def position_features(centroids: torch.Tensor, frequencies: int) -> torch.Tensor:
    """centroids [N, 2] -> [N, 4F]: for k < F, sin and cos of 2^k * pi * x, then of y."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=centroids.device)  # [F]
    angles = centroids.float().unsqueeze(2) * scales  # [N, 2, F]
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)  # [N, 2 * 2F]


def add_region_positions(
    embeds: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """embeds [N, D] + position_features(mask_centroids(masks)) @ weight.T, weight [D, 4F]."""
    if masks.shape[0] != embeds.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for {embeds.shape[0]} region embeddings")
    if embeds.shape[0] == 0:
        return embeds
    features = position_features(mask_centroids(masks), weight.shape[1] // 4)
    return embeds + (features @ weight.float().T).to(embeds.dtype)
