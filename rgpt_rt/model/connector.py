"""The connector shared by image and region tokens (LLaVA-1.5 "mlp2x_gelu")."""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Linear(C, D) - GELU - Linear(D, D): vision channels into the LLM's embedding space."""

    def __init__(
        self,
        vision_channels: int,
        llm_hidden: int,
        region_numbers: int = 0,
        region_positions: int = 0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(vision_channels, llm_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)
        if region_numbers:
            # row k is added to the embedding of <region{k+1}> (rgpt_rt/ops/region_numbers.py)
            self.region_number = nn.Parameter(torch.zeros(region_numbers, llm_hidden))
        if region_positions:
            # the region's centroid features -> its embedding (rgpt_rt/ops/region_positions.py)
            self.region_position = nn.Linear(4 * region_positions, llm_hidden, bias=False)
            nn.init.zeros_(self.region_position.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: [..., C] -> [..., D]
        return self.fc2(self.act(self.fc1(features)))
