"""What every stage of a training run shares (train.py's language stages, vision_pretrain.py's
vision stage): the run folder's checkpoints and log, the learning-rate schedule, and the error a
diverged loss raises.

    out/checkpoints/step-00000250/         model/ (save_pretrained) and trainer.pt (optimizer,
                                           step, losses, config), written whole or not at all
    out/checkpoints/vision-step-00000500/  the same for the vision stage (+ its heads)
    out/log.jsonl                          one JSON record per logged step or evaluation
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from rgpt_rt.atomic import atomic_directory

CHECKPOINT_PREFIX = "step-"
VISION_CHECKPOINT_PREFIX = "vision-step-"  # the vision pretraining stage's (vision_pretrain.py)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""


def warmup_cosine(step: int, steps: int, peak: float, warmup: int, floor_ratio: float) -> float:
    """Update `step` (0-based) of `steps`: linear warm-up to `peak` over `warmup` updates, then
    cosine decay to floor_ratio * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = peak * floor_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def append_log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int, prefix: str = CHECKPOINT_PREFIX) -> Path:
    return out / "checkpoints" / f"{prefix}{step:08d}"


def complete_checkpoints(out: Path, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Complete checkpoints named `prefix` + step, oldest first. A write that was killed
    leaves only a hidden temporary folder (atomic_directory), which is never listed here."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(prefix) and (p / "trainer.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(prefix) :]))


def latest_step(out: Path, prefix: str = CHECKPOINT_PREFIX) -> int:
    """The step of the latest complete checkpoint named `prefix` in `out`, 0 when none."""
    found = complete_checkpoints(out, prefix)
    return int(found[-1].name[len(prefix) :]) if found else 0


def write_checkpoint(
    out: Path, step: int, model, optimizer, state: dict, prefix: str = CHECKPOINT_PREFIX
) -> Path:
    target = checkpoint_dir(out, step, prefix)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp / "model")
        write_trainer_state(tmp / "trainer.pt", optimizer, state)
    return target


def write_trainer_state(path: Path, optimizer, state: dict) -> None:
    torch.save({"optimizer": optimizer.state_dict(), **state}, path)


def prune_checkpoints(out: Path, keep: int, prefix: str = CHECKPOINT_PREFIX) -> None:
    for old in complete_checkpoints(out, prefix)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_checkpoints(out: Path, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that never finished."""
    folder = out / "checkpoints"
    partial = [p for p in folder.glob(f".{prefix}*")] if folder.is_dir() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial
