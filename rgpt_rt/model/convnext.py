"""ConvNeXt, the vision trunk of Osprey (OpenCLIP's `convnext_large`, a timm model), written
here with timm's module names so that OpenCLIP's `visual.trunk.*` tensors load by name.

    trunk = ConvNeXtTrunk(ConvNeXtConfig())               # ConvNeXt-Large: depths 3/3/27/3, dims 192..1536
    levels = trunk(pixel_values)                          # [B, 3, S, S] -> [res2, res3, res4, res5], NCHW
    trunk.load_state_dict(tensors)                        # stem.0.weight, stages.2.blocks.5.mlp.fc1.weight, ...

timm cannot be imported beside this project's CPU build of torch (it needs torchvision), so
the trunk is written out; its names and shapes were checked against
timm.create_model("convnext_large") (docs/osprey.md). The layers Osprey never runs (the
pooling head, `norm_pre` is the identity) are not built.
"""

from __future__ import annotations

import torch
from torch import nn

from rgpt_rt.config import ConvNeXtConfig
from rgpt_rt.model.region import LayerNorm2d


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + gamma * MLP(LayerNorm(depthwise 7x7 conv(x))), the norm and MLP channels last."""

    def __init__(self, channels: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=eps)
        self.mlp = Mlp(channels, mlp_ratio * channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_channels: int, channels: int, depth: int, mlp_ratio: int, eps: float):
        super().__init__()
        if in_channels == channels:
            self.downsample = nn.Identity()
        else:  # LayerNorm2d, then a 2x2 stride-2 convolution
            self.downsample = nn.Sequential(
                LayerNorm2d(in_channels, eps), nn.Conv2d(in_channels, channels, 2, stride=2)
            )
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(channels, mlp_ratio, eps) for _ in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtTrunk(nn.Module):
    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        self.cfg = cfg
        eps, dims = cfg.layer_norm_eps, cfg.dims
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps))
        self.stages = nn.ModuleList(
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], cfg.depths[i], cfg.mlp_ratio, eps)
            for i in range(4)
        )

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [B, 3, S, S] -> the four stage outputs res2..res5, [B, C_l, S/s_l, S/s_l]
        with strides s_l = 4, 8, 16, 32 (Osprey's extract_features)."""
        x = self.stem(pixel_values.to(self.stem[0].weight.dtype))
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels
