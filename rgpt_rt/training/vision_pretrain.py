"""Vision pretraining on the shapes world: the stand-in for the CLIP pretraining that a model
trained from scratch lacks. It runs before the language stages when asked:

    python -m rgpt_rt.training.train --out runs/tiny --preset tiny --vision-pretrain-steps 3000 \\
        --vision-pos-init-std 1.0 --steps 3000

The vision tower and the refinement learn to tell, at every cell of the hi-res map
[B, 4g, 4g, C], the shape, colour, size and position of the object covering it, or background
(`dense_labels`): one linear head per attribute. The loss of an attribute is the cross-entropy
over the foreground cells + BACKGROUND_WEIGHT x the cross-entropy over all cells (background
class included); the stage's loss is their sum. Why per cell: on the tiny preset a linear head
on the pooled region embeddings (region-level supervision) left shape at chance for 1500 steps,
at any patch size and lr 1e-3..3e-3; per-cell supervision learns it.

The heads are thrown away after the stage: they are not part of the model, and the model
folders (a checkpoint's model/, final/) never hold them. Only the stage's own checkpoints,
out/checkpoints/vision-step-N/ (model/ and trainer.pt: optimizer, heads, step, losses), keep
them, so that a stopped stage continues exactly with --resume; the language stage then starts
from the pretrained model. Step N trains on scenes N*B .. N*B + B - 1 of the seed's stream.

Every eval_every steps, on vision_eval_scenes held-out scenes, per attribute: the accuracy over
foreground cells (argmax over all classes, background included) and over regions (the head on
the mask-pooled hi-res features of each object's visible mask, argmax over the attribute's
values: the vector the connector reads).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import preprocess_image
from rgpt_rt.ops import mask_pool_reference
from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.data.samples import region_coverage
from rgpt_rt.training.data.shapes import ATTRIBUTES, Scene, dense_labels, make_scene
from rgpt_rt.training.prefetch import prefetched
from rgpt_rt.training.runs import (
    VISION_CHECKPOINT_PREFIX,
    TrainingDiverged,
    append_log,
    complete_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    warmup_cosine,
    write_checkpoint,
)

BACKGROUND_WEIGHT = 0.1  # weight of the all-cells term (background included) of each attribute
# scene streams: scene `index` of a stream is make_scene(default_rng([seed, stream, index]))
TRAIN_STREAM, HELD_OUT_STREAM = 101, 102


class DenseHeads(nn.Module):
    """One linear classifier per attribute on every hi-res cell: its values + background."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = nn.ModuleDict(
            {name: nn.Linear(channels, len(values) + 1) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        # features: [..., C] -> {name: [..., len(values) + 1]}
        return {name: head(features) for name, head in self.heads.items()}


@dataclass
class SceneBatch:
    pixel_values: torch.Tensor  # [B, 3, S, S]
    labels: dict[str, torch.Tensor]  # name -> [B, G, G] int64; len(values) on background
    # with regions=True: every object's visible mask as hi-res cell weights, and its values
    masks: torch.Tensor | None = None  # [N, G, G] float32
    batch_index: torch.Tensor | None = None  # [N]
    region_labels: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]


def scene_batch(scenes: list[Scene], config: RGPTConfig, regions: bool = False) -> SceneBatch:
    grid = config.hires_grid
    maps = [dense_labels(scene, grid) for scene in scenes]
    batch = SceneBatch(
        pixel_values=torch.stack([preprocess_image(s.image, config.vision) for s in scenes]),
        labels={name: torch.from_numpy(np.stack([m[name] for m in maps])) for name in ATTRIBUTES},
    )
    if regions:
        masks, index = [], []
        for number, scene in enumerate(scenes):
            masks += [region_coverage(m, grid, config.pool_mode) for m in scene.masks()]
            index += [number] * len(scene.objects)
        objects = [obj for scene in scenes for obj in scene.objects]
        batch.masks = torch.stack(masks)
        batch.batch_index = torch.tensor(index, dtype=torch.int64)
        batch.region_labels = {
            name: torch.tensor([values.index(getattr(o, name)) for o in objects])
            for name, values in ATTRIBUTES.items()
        }
    return batch


@dataclass
class SceneStream:
    """The stage's scenes by index: each a function of (seed, stream, index) alone."""

    image_size: int
    seed: int
    stream: int

    def scenes(self, first: int, count: int) -> list[Scene]:
        return [
            make_scene(np.random.default_rng([self.seed, self.stream, i]), self.image_size)
            for i in range(first, first + count)
        ]


@dataclass
class TrainingBatches:
    """Step N's batch: scenes N*B .. N*B + B - 1 of the stream (picklable, for prefetched)."""

    stream: SceneStream
    config: RGPTConfig
    batch_size: int

    def __call__(self, step: int) -> SceneBatch:
        return scene_batch(self.stream.scenes(step * self.batch_size, self.batch_size), self.config)


def hires_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [B, 3, S, S] -> the refined hi-res map [B, 4g, 4g, C] (no connector)."""
    grid = model.vision(pixel_values.to(model._vision_dtype()))  # [B, g, g, C]
    return model.refinement(grid.to(model._refinement_dtype()))


def dense_loss(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage's loss (see the module docstring) and each attribute's part of it."""
    total, parts = 0.0, {}
    for name, values in ATTRIBUTES.items():
        flat = logits[name].reshape(-1, len(values) + 1)  # [B*G*G, K + 1]
        target = labels[name].reshape(-1)  # [B*G*G]
        foreground = target != len(values)
        loss = BACKGROUND_WEIGHT * F.cross_entropy(flat, target)
        if foreground.any():
            loss = loss + F.cross_entropy(flat[foreground], target[foreground])
        parts[name] = loss.item()
        total = total + loss
    return total, parts


@torch.no_grad()
def evaluate_dense(model, heads: DenseHeads, batch: SceneBatch) -> dict[str, float]:
    """{"shape_cells": ..., "shape_regions": ..., ...}: accuracies on a batch built with
    regions=True (see the module docstring)."""
    was_training = model.training
    model.eval()
    hires = hires_features(model, batch.pixel_values)  # [B, G, G, C]
    logits = heads(hires)
    pooled = mask_pool_reference(
        hires, batch.masks, batch.batch_index, mode=model.config.pool_mode
    )  # [N, C]
    regions = heads(pooled)  # name -> [N, K + 1]
    metrics = {}
    for name, values in ATTRIBUTES.items():
        target = batch.labels[name]
        foreground = target != len(values)
        hits = logits[name].argmax(-1)[foreground] == target[foreground]
        metrics[f"{name}_cells"] = hits.float().mean().item()
        guess = regions[name][:, : len(values)].argmax(-1)
        metrics[f"{name}_regions"] = (guess == batch.region_labels[name]).float().mean().item()
    model.train(was_training)
    return metrics


@dataclass
class StageResult:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> loss
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    heads: DenseHeads | None = None  # the trained readout (model_init.read_out_connector)
    stopped: bool = False  # ended at cfg.vision_stop_after: no language step follows


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as the language stages use it: weight decay on matrices only."""
    decay = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.vision_pretrain_lr, betas=(0.9, 0.95), eps=1e-8)


def pretrain_vision(model, cfg: TrainConfig, out: Path) -> StageResult:
    """Run (or, with cfg.resume, continue) the stage on `model` in place: its vision tower and
    refinement change; nothing else does."""
    from rgpt_rt.model import RGPT

    config, steps = model.config, cfg.vision_pretrain_steps
    batch_size = cfg.vision_batch_size or cfg.batch_size
    heads = DenseHeads(config.vision.hidden_size)
    model.vision.requires_grad_(True)
    model.refinement.requires_grad_(True)
    params = [*model.vision.parameters(), *model.refinement.parameters(), *heads.parameters()]
    optimizer = _optimizer(params, cfg)
    step, result = 0, StageResult()
    found = complete_checkpoints(out, VISION_CHECKPOINT_PREFIX) if cfg.resume else []
    if found:
        latest = found[-1]
        for partial in remove_partial_checkpoints(out, VISION_CHECKPOINT_PREFIX):
            print(f"removed an unfinished checkpoint write: {partial.name}", file=sys.stderr)
        model.load_state_dict(RGPT.from_pretrained(latest / "model").state_dict())
        state = torch.load(latest / "trainer.pt", weights_only=False)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, result.losses = state["step"], dict(state["losses"])
        print(f"resuming vision pretraining from {latest} (step {step})", file=sys.stderr)

    size = config.vision.image_size
    make_batch = TrainingBatches(SceneStream(size, cfg.seed, TRAIN_STREAM), config, batch_size)
    end = cfg.vision_stop_after or steps  # where this call stops (cfg.vision_stop_after)
    batches = prefetched(make_batch, [(n,) for n in range(step, end)], cfg.data_workers)
    held_out = None
    if cfg.vision_eval_scenes > 0 and step < end:
        scenes = SceneStream(size, cfg.seed, HELD_OUT_STREAM).scenes(0, cfg.vision_eval_scenes)
        held_out = scene_batch(scenes, config, regions=True)

    model.train()
    bar = tqdm(total=steps, initial=step, disable=not cfg.progress, unit="step", desc="vision")
    started = time.perf_counter()
    window_start, window_samples = started, 0
    while step < end:
        lr = warmup_cosine(step, steps, cfg.vision_pretrain_lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        loss, parts = dense_loss(heads(hires_features(model, batch.pixel_values)), batch.labels)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the vision pretraining loss is {loss.item()} at step {step + 1}; lower "
                f"--vision-pretrain-lr or raise --warmup-steps, then continue with --resume "
                f"from the last checkpoint in {out / 'checkpoints'}"
            )
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(norm):
            raise TrainingDiverged(
                f"the vision pretraining gradient norm is {norm.item()} at step {step + 1}; "
                f"lower --vision-pretrain-lr, then continue with --resume"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.losses[step] = loss.item()
        window_samples += batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")

        now = time.perf_counter()
        if step % cfg.log_every == 0 or step == steps:
            record = {"stage": "vision", "step": step, "loss": loss.item(), "lr": lr}
            record |= {f"loss_{name}": value for name, value in parts.items()}
            record |= {"grad_norm": float(norm), "elapsed_s": now - started}
            record["samples_per_s"] = window_samples / max(now - window_start, 1e-9)
            append_log(out, record)
            window_start, window_samples = now, 0
        if step % cfg.checkpoint_every == 0 or step in (steps, end):
            state = {"step": step, "losses": result.losses, "config": asdict(cfg)}
            state["heads"] = heads.state_dict()
            write_checkpoint(out, step, model, optimizer, state, VISION_CHECKPOINT_PREFIX)
            prune_checkpoints(out, cfg.keep_checkpoints, VISION_CHECKPOINT_PREFIX)
        if held_out is not None and (step % cfg.eval_every == 0 or step == steps):
            metrics = evaluate_dense(model, heads, held_out)
            result.evals[step] = metrics
            append_log(
                out,
                {"stage": "vision", "step": step, "eval": metrics, "elapsed_s": now - started},
            )
            bar.write(
                f"vision step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
            )
    bar.close()
    batches.close()
    result.heads = heads
    result.stopped = cfg.vision_stop_after is not None  # the run ends with this stage
    return result
