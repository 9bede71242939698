"""AWQ's calibration inputs: what the LLM sees at run time, built without the LLM.

    samples = calibration_embeds(side, tokenizer, embed_table, calib=None, count=16)   # [1, T, D] each

Smooth random images go through the vision side, a box region through mask pooling and the
connector, and a task prompt (or a line of --calib) through the chat template; the embeddings
are spliced as the Session splices them. Only the embedding table of the LLM is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rgpt_rt.inputs import box_to_mask, pad_mask, preprocess_image
from rgpt_rt.ops import add_region_numbers, add_region_positions, mask_pool_reference
from rgpt_rt.prompts import (
    Conversation,
    classify_prompt,
    describe_prompt,
    refer_prompt,
    tokenize_conversation,
)

CALIBRATION_SAMPLES = 16


def calibration_questions(calib: Path | None, vocabulary: str) -> list[str]:
    """The lines of `calib` (each given a region when it names none), else the task prompts."""
    if calib is None:
        return [
            describe_prompt(True),
            describe_prompt(False),
            classify_prompt(vocabulary),
            refer_prompt("the object", 1),
        ]
    questions = [line.strip() for line in calib.read_text().splitlines() if line.strip()]
    if not questions:
        raise ValueError(f"--calib {calib} holds no prompts (one per line)")
    return [q if "<region" in q else f"{q} <region1>" for q in questions]


@torch.no_grad()
def calibration_embeds(
    side,
    tokenizer,
    embed_table: torch.Tensor,
    calib: Path | None = None,
    count: int = CALIBRATION_SAMPLES,
) -> list[torch.Tensor]:
    """`count` input embeddings [1, T, D] (fp32) for a VisionSide `side` and the LLM's
    embed_tokens weight [V, D]."""
    config = side.config
    questions = calibration_questions(calib, config.vocabulary)
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    names = config.tokens
    image_id, region_id = tokenizer.token_to_id(names.image), tokenizer.token_to_id(names.region)
    samples = []
    for index in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((size // 4, size // 4, 1), dtype=np.uint8))
        x0, y0 = rng.integers(0, size // 2, 2)
        box = (int(x0), int(y0), int(x0) + size // 3, int(y0) + size // 3)
        masks = torch.from_numpy(pad_mask(box_to_mask(box, image.shape[:2])))[None]  # [1, S, S]
        tokens = tokenize_conversation(
            tokenizer,
            Conversation.single(questions[index % len(questions)]),
            num_regions=1,
            num_image_tokens=config.num_image_tokens,
            tokens=names,
        )
        image_embeds, hires = side(preprocess_image(image, config.vision)[None])
        regions = side.connector(mask_pool_reference(hires, masks, mode=config.pool_mode))
        if config.connector.region_positions:
            weight = side.connector.region_position.weight_t.t()
            regions = add_region_positions(regions, masks, weight)
        if config.connector.region_numbers:
            regions = add_region_numbers(regions, side.connector.region_number)
        ids = torch.tensor(tokens.input_ids)
        embeds = embed_table[ids.clamp(max=embed_table.shape[0] - 1)].to(torch.float32)
        embeds[ids == image_id] = image_embeds[0]
        embeds[ids == region_id] = regions[torch.tensor(tokens.region_order)]
        samples.append(embeds[None])
    return samples
