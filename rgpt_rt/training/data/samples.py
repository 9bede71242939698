"""Region samples (an image, its region masks, a conversation) and the batches the model trains on.

    sample = RegionSample(image, masks, [Turn("What color is <region1>?", "red", "colour")])
    batch = collate([sample, ...], model.config, model.tokenizer)
    out = model(**batch.model_inputs())

Shared by the shapes world, the COCO loader, the trainer and the evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import pad_mask, preprocess_image
from rgpt_rt.ops import mask_cell_weights
from rgpt_rt.prompts import IGNORE_INDEX, Conversation, tokenize_conversation


@dataclass
class Turn:
    question: str  # with <regionK> placeholders naming the sample's masks (1-based)
    answer: str
    task: str
    truth: dict[str, Any] = field(default_factory=dict)  # what the answer was made from


@dataclass
class RegionSample:
    image: np.ndarray  # [H, W, 3] uint8
    masks: list[np.ndarray]  # each [H, W] bool; <regionK> names masks[K - 1]
    turns: list[Turn]
    boxes: list[bool] = field(default_factory=list)  # whether each region is given as a box

    def conversation(self, answered: bool = True) -> Conversation:
        """All turns with their answers, or (answered=False) the first question alone, as
        asked at evaluation time."""
        if answered:
            return Conversation(turns=[(t.question, t.answer) for t in self.turns])
        return Conversation.single(self.turns[0].question)

    @property
    def task(self) -> str:
        """The task of the first turn."""
        return self.turns[0].task


@dataclass
class Batch:
    pixel_values: torch.Tensor  # [B, 3, S, S]
    input_ids: torch.Tensor  # [B, T], right-padded with the pad id
    attention_mask: torch.Tensor  # [B, T], 0 on padding
    labels: torch.Tensor  # [B, T], IGNORE_INDEX except on answer tokens
    masks: torch.Tensor  # [N, 4g, 4g] float32: each region's coverage of the hi-res cells
    batch_index: torch.Tensor  # [N] the sample of each mask
    region_index: torch.Tensor  # [R] the mask of each region token, row-major over the batch

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixel_values,
            "input_ids": self.input_ids,
            "masks": self.masks,
            "batch_index": self.batch_index,
            "region_index": self.region_index,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
        }

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})


def region_coverage(mask: np.ndarray, grid: int, mode: str = "area") -> torch.Tensor:
    """[H, W] bool mask of an image -> [grid, grid] float32 weights of the hi-res cells.

    The mask is padded to a square like its image, then reduced to the cells exactly as mask
    pooling weighs them (DESIGN.md §1): in "area" mode each value is the covered fraction of
    its cell; in "bilinear" mode the bilinearly resized mask. Pooling these weights on a
    grid x grid map gives the same vector as pooling the full mask (within float32 rounding),
    and masks of images of any size then batch together."""
    square = torch.from_numpy(pad_mask(mask))[None]  # [1, S', S']
    weights = mask_cell_weights(square, grid, grid, mode)[0]  # [grid, grid] float64
    if mode == "area":
        cell_area = (square.shape[1] / grid) * (square.shape[2] / grid)
        weights = weights / cell_area
    return weights.to(torch.float32)


def collate(
    samples: Sequence[RegionSample],
    config: RGPTConfig,
    tokenizer,
    pad_token_id: int,
    answered: bool = True,
) -> Batch:
    """Samples -> one padded batch. answered=False keeps only the first question, without its
    answer (evaluation prompts; labels are then all IGNORE_INDEX)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    grid = config.hires_grid
    pixels, rows, coverages, batch_index, region_index = [], [], [], [], []
    for number, sample in enumerate(samples):
        if not sample.masks:
            raise ValueError(f"sample {number} has no region masks; every sample needs one")
        tokens = tokenize_conversation(
            tokenizer,
            sample.conversation(answered),
            num_regions=len(sample.masks),
            num_image_tokens=config.num_image_tokens,
            tokens=config.tokens,
        )
        offset = len(coverages)
        region_index.extend(offset + k for k in tokens.region_order)
        coverages.extend(region_coverage(m, grid, config.pool_mode) for m in sample.masks)
        batch_index.extend([number] * len(sample.masks))
        pixels.append(preprocess_image(sample.image, config.vision))
        rows.append(tokens)

    limit = config.llm.max_position_embeddings
    length = max(len(row.input_ids) for row in rows)
    if length > limit:
        raise ValueError(
            f"a sample is {length} tokens long but the LLM takes at most {limit}; "
            "use fewer turns or regions per sample"
        )
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    attention = torch.zeros((len(rows), length), dtype=torch.int64)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        attention[b, :n] = 1
    return Batch(
        pixel_values=torch.stack(pixels),
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        masks=torch.stack(coverages),
        batch_index=torch.tensor(batch_index, dtype=torch.int64),
        region_index=torch.tensor(region_index, dtype=torch.int64),
    )
