"""Region numbers: each region embedding plus a learned vector for its number K (<regionK>).

    add_region_numbers(embeds [N, D], table [M, D], batch_index=None) -> [N, D]

A region token is one embedding (DESIGN.md §1) and holds no text, so a decoder that must answer
"Region [2]" has to count the region tokens before it to know which is the second. With
`connector.region_numbers` = M > 0 the k-th mask of a question (0-based, in the order the masks
are given, which is the K - 1 of <regionK>) gets table[k] added: the embedding says its own
number, as if "Region [K]" were written beside it. RegionGPT's checkpoints have no table (M = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def places_in_sample(num_masks: int, batch_index: torch.Tensor | None, device) -> torch.Tensor:
    """[N] each mask's 0-based place among its own sample's masks (all one sample for None)."""
    if batch_index is None:
        return torch.arange(num_masks, device=device)
    onehot = F.one_hot(batch_index.to(device))  # [N, B]
    return (onehot.cumsum(0) * onehot).sum(dim=1) - 1


def add_region_numbers(
    embeds: torch.Tensor, table: torch.Tensor, batch_index: torch.Tensor | None = None
) -> torch.Tensor:
    """embeds [N, D] (the masks of each sample in order) + table[k] for the k-th mask of its
    sample. batch_index [N]: the sample of each mask (None: one sample)."""
    if embeds.shape[0] == 0:
        return embeds
    order = places_in_sample(embeds.shape[0], batch_index, embeds.device)
    most = int(order.max()) + 1
    if most > table.shape[0]:
        raise ValueError(
            f"this model numbers at most {table.shape[0]} regions in one question "
            f"(connector.region_numbers) but {most} were given; ask about at most "
            f"{table.shape[0]} regions at a time"
        )
    return embeds + table[order].to(embeds.dtype)
