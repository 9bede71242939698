"""How a run's model starts: built from a preset (with the shapes world's tokenizer), loaded from
a checkpoint or from CLIP + LLM folders; a new connector initialised from the data; the parts
that train and their optimizer; and the changes the shipped model's recipe makes to a checkpoint
between two fine-tunes (`scale_words`, `number_regions`; recipe.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from rgpt_rt.config import RGPTConfig
from rgpt_rt.tokenizer import train_tokenizer
from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.data.tasks import tokenizer_corpus

READOUT_GAIN = 3.0
MAX_REGION_NUMBERS = 9  # row K-1 of the region-number table starts at the digit K


def world_tokenizer(config: RGPTConfig):
    """The tokenizer of a model trained on the shapes world: byte-level BPE on the world's text."""
    return train_tokenizer(tokenizer_corpus(), config.llm.vocab_size, config.tokens)


def build_model(cfg: TrainConfig):
    from rgpt_rt.model import RGPT

    if cfg.init:
        return RGPT.from_pretrained(cfg.init)
    if cfg.clip:
        return RGPT.from_components(cfg.clip, cfg.llm)
    config = RGPTConfig.from_preset(cfg.preset)
    model = RGPT(config, tokenizer=world_tokenizer(config))
    if cfg.vision_pos_init_std is not None:
        init_position_embedding(model, cfg.vision_pos_init_std)
    return model


@torch.no_grad()
def init_position_embedding(model, std: float) -> None:
    """Draw the vision tower's position embedding (CLS position included) from N(0, std^2).
    Only for a tower trained from scratch (TrainConfig refuses it for a loaded one)."""
    from rgpt_rt.model.vision import transformer_root

    table = transformer_root(model.vision.clip).embeddings.position_embedding.weight
    torch.nn.init.normal_(table, mean=0.0, std=std)


@torch.no_grad()
def centre_connector(model, batch) -> None:
    """Data-dependent init of a new connector: zero fc1's bias and set fc2's so that image and
    region embeddings average to zero over `batch`.

    With nn.Linear's default init most of every image and region embedding is one shared
    vector (the biases, and GELU's positive mean), so the region token looks like the 64 image
    tokens around it and the LLM learns to ignore all of them before it learns to read them;
    on the shapes world the region embeddings then lost the colour they started with."""
    model.connector.fc1.bias.zero_()
    model.connector.fc2.bias.zero_()
    batch = batch.to(model._device())
    image_embeds, hires = model.encode_image(batch.pixel_values)  # [B, g*g, D]
    regions = model.encode_regions(hires, batch.masks, batch.batch_index)  # [N, D]
    mean = torch.cat([image_embeds.reshape(-1, image_embeds.shape[-1]), regions]).mean(dim=0)
    model.connector.fc2.bias.copy_(-mean.to(model.connector.fc2.bias.dtype))


@torch.no_grad()
def read_out_connector(model, heads, batch) -> None:
    """Start a new connector from the vision stage's readout, so that every attribute is as
    easy to read from an embedding as every other: fc1's first K units are the stage's linear
    heads (K = one per attribute value + background, 32 on the shapes world; without their
    biases), scaled to unit std on `batch`'s regions, and fc2 passes them through to its first
    K outputs alone, READOUT_GAIN times as spread as each of its other outputs.

    With a random connector the LLM read what varies most first (colour) and then ignored the
    rest: a new LLM named colours right and every shape "hexagon" after 700 steps of mixed
    single-region questions; a phase of shape names alone taught shapes and lost colours."""
    weight = torch.cat([head.weight for head in heads.heads.values()])  # [K, C]
    fc1, fc2 = model.connector.fc1, model.connector.fc2
    count = weight.shape[0]
    if count > min(fc1.out_features, fc2.out_features):
        raise ValueError(f"the readout has {count} classes, more than the connector's width")
    batch = batch.to(model._device())
    _, hires = model.encode_image(batch.pixel_values)
    pooled = model.pool_regions(hires, batch.masks, batch.batch_index)  # [N, C]
    scale = 1.0 / (pooled.float() @ weight.T.float()).std().clamp_min(1e-6)
    fc1.weight[:count] = (weight * scale).to(fc1.weight.dtype)
    fc1.bias[:count] = 0.0
    fc2.weight[:count] = 0.0
    fc2.weight[:, :count] = 0.0
    units = F.gelu(pooled.float() @ fc1.weight[:count].T.float())  # [N, K]
    others = model.connector(pooled)[:, count:].float()  # [N, D - K]
    gain = READOUT_GAIN * others.std(dim=0).mean() / units.std(dim=0).mean().clamp_min(1e-6)
    eye = torch.eye(count, device=fc2.weight.device, dtype=fc2.weight.dtype)
    fc2.weight[:count, :count] = eye * gain.to(fc2.weight.dtype)


def set_stage(model, cfg: TrainConfig) -> None:
    vision = cfg.from_scratch if cfg.train_vision is None else cfg.train_vision
    model.set_trainable(vision=vision, llm=cfg.stage == 2)


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per part (vision tower, refinement + connector, LLM) and
    weight decay on matrices only (not on norms and biases)."""
    parts = {
        "vision": list(model.vision.parameters()),
        "adapter": list(model.refinement.parameters()) + list(model.connector.parameters()),
        "llm": list(model.llm.parameters()),
    }
    groups = []
    for part, params in parts.items():
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        plain = [p for p in params if p.dim() < 2]
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "part": part})
        groups.append({"params": plain, "weight_decay": 0.0, "part": part})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# --- a checkpoint changed in one way, between two fine-tunes -----------------------------------


@torch.no_grad()
def scale_words(model, factor: float):
    """`model` with its input word embeddings times `factor`, in place (their norms are ~0.3
    against ~27 for the region embeddings; x65 let a fine-tune learn to match phrases)."""
    model.llm.get_input_embeddings().weight.mul_(factor)
    return model


@torch.no_grad()
def number_regions(model, numbers: int = MAX_REGION_NUMBERS):
    """A copy of `model` with a table of `numbers` region-number vectors in its connector
    (connector.region_numbers), row K-1 started at the input word embedding of the digit K:
    <regionK>'s embedding says "K" as well as what it shows. Every other weight is kept
    (shared with `model`)."""
    from rgpt_rt.model import RGPT

    if not 1 <= numbers <= MAX_REGION_NUMBERS:
        raise ValueError(
            f"numbers must be 1-{MAX_REGION_NUMBERS} (row K-1 starts at the digit K's "
            f"embedding); got {numbers}"
        )
    if model.config.connector.region_numbers:
        raise ValueError("the model already numbers its regions (connector.region_numbers)")
    connector = dataclasses.replace(model.config.connector, region_numbers=numbers)
    config = dataclasses.replace(model.config, connector=connector)
    numbered = RGPT(config, model.tokenizer, vision=model.vision, llm=model.llm)
    numbered.refinement.load_state_dict(model.refinement.state_dict())
    numbered.connector.load_state_dict(model.connector.state_dict(), strict=False)
    digits = [model.tokenizer.token_to_id(str(k)) for k in range(1, numbers + 1)]
    numbered.connector.region_number.copy_(model.llm.get_input_embeddings().weight[digits])
    return numbered
