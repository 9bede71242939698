"""Feature refinement, patch merge and region pooling (RegionGPT's additions to a VLM).

hires = Refinement(C)(grid)         # [B, g, g, C] -> [B, 4g, 4g, C]
tokens = patch_merge(hires, g)      # [B, 4g, 4g, C] -> [B, g*g, C]   (the global image tokens)
pooled = mask_pool_reference(hires, masks, batch_index, mode="area")   # [N, C], one per region
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Refinement(nn.Module):
    """ConvT(C, C, 2, s2) - LayerNorm2d - GELU - ConvT(C, C, 2, s2) - GELU: a 4x upsampling
    of the patch grid that keeps the channels, learned so that small regions get their own
    features instead of sharing a patch with their neighbours."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.norm = LayerNorm2d(channels, eps)
        self.up2 = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        # grid: [B, g, g, C] -> [B, 4g, 4g, C] (channels last, as mask pooling wants)
        x = grid.permute(0, 3, 1, 2)
        x = F.gelu(self.norm(self.up1(x)))
        x = F.gelu(self.up2(x))
        return x.permute(0, 2, 3, 1).contiguous()


def patch_merge(hires: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 4g, 4g, C] -> [B, g*g, C]: average pooling back to the native grid."""
    batch, _, _, channels = hires.shape
    pooled = F.adaptive_avg_pool2d(hires.permute(0, 3, 1, 2), grid)  # [B, C, g, g]
    return pooled.flatten(2).transpose(1, 2).reshape(batch, grid * grid, channels)
