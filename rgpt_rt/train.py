"""The small trainer: stage 1 / stage 2 RegionGPT training on the shapes world or on COCO-format
region data.

    python -m rgpt_rt.train --out runs/tiny --preset tiny --steps 3000        # from scratch
    python -m rgpt_rt.train --out runs/tiny --resume                           # continue after a stop
    python -m rgpt_rt.train --out runs/coco --clip clip-vit-l-336/ --llm vicuna-7b/ \\
        --coco instances.json --coco-images images/ --stage 1                   # fine-tune on COCO

Stage 1 trains the refinement and the connector (vision tower and LLM frozen); stage 2 trains
the LLM too. A model trained from scratch (a preset) also trains its vision tower, since nothing
in it is pretrained. AdamW with linear warm-up and cosine decay, gradient clipping and
accumulation. Every `checkpoint_every` steps `out/checkpoints/step-N/` is written whole or not
at all (a run killed mid-write resumes from the previous one), with the model, the optimizer
and the step. The data of step N depends only on the seed and N, so a resumed run continues the
same curve. A NaN or infinite loss stops the run with an error naming the step.

A model from scratch can first learn to see: --vision-pretrain-steps N runs the vision
pretraining stage of vision_pretrain.py (dense per-cell attribute heads on the hi-res map, the
stand-in for CLIP's pretraining) before the language stages, and --vision-pos-init-std 1.0
gives its new vision tower a position embedding that the patch content does not swamp.

A model from scratch needs two things a pretrained LLM brings (both measured on the shapes
world, see CURRICULUM and centre_connector): a connector whose outputs are not one shared
vector, and a first phase of questions that only the region token can answer. A curriculum is
a list of phases, each asking one question per sample of its tasks, up to the step where it
ends (--curriculum), then every task: --phases names a run's own (default CURRICULUM), e.g. a
fine-tune from a checkpoint on matching a region's colour against a phrase (MODEL_CARD.md):

    python -m rgpt_rt.train --out runs/match --init runs/tiny/final --freeze-vision \
        --phases match_colour,colour --curriculum 1000 --steps 1000

out/ holds: log.jsonl (loss, lr, samples/s; evaluations), checkpoints/, final/ (the model).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rgpt_rt.atomic import atomic_directory
from rgpt_rt.config import RGPTConfig
from rgpt_rt.data.samples import Batch, RegionSample, collate
from rgpt_rt.data.tasks import TASKS, ShapesWorld, task_names, tokenizer_corpus
from rgpt_rt.prefetch import prefetched
from rgpt_rt.tokenizer import train_tokenizer

CHECKPOINT_PREFIX = "step-"
VISION_CHECKPOINT_PREFIX = "vision-step-"  # the vision pretraining stage's (vision_pretrain.py)
# The curriculum of a model trained from scratch on the shapes world: phase k (up to the k-th
# step of TrainConfig.curriculum; a phase may be empty) asks one question per sample, of the
# tasks in CURRICULUM[k]; then all tasks. The first four phases ask about one region, the
# fifth compares regions. A new LLM first has to learn where the region token is: on the full
# task mix it stayed at its text prior (always "white", "ring") for 800 steps, while on colour
# questions alone it read the region token within ~250. It then names only what it is drilled
# on: a phase of shape names alone (the third) taught shapes to a model that read colours, but
# right after the first phase it made the model stop reading colours, which the fourth phase
# did not bring back. The tasks over several regions stayed at chance in the full mix of a
# model trained without the fifth phase (rgpt_rt/assets/MODEL_CARD.md).
CURRICULUM = (
    ("colour",),
    ("colour", "classify", "brief", "detailed"),
    ("classify",),
    ("position", "colour", "classify", "brief", "detailed"),
    ("refer", "above", "larger"),
)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""


@dataclass
class TrainConfig:
    out: str
    # the model: a preset trained from scratch, a checkpoint (init), or CLIP + LLM folders
    preset: str = "tiny"
    init: str | None = None
    clip: str | None = None
    llm: str | None = None
    # the data: the shapes world, or a COCO-format file (+ its image folder)
    coco: str | None = None
    coco_images: str | None = None
    coco_eval: str | None = None  # a held-out COCO-format file to evaluate on
    # what trains
    stage: int = 2
    train_vision: bool | None = None  # default: only when the model starts from scratch
    # optimisation
    steps: int = 3000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    vision_lr_scale: float = 1.0
    curriculum: tuple[int, ...] = ()  # where each phase ends (shapes world only)
    phases: tuple[tuple[str, ...], ...] = CURRICULUM  # the tasks of each curriculum phase
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    # bookkeeping
    eval_every: int = 500
    eval_per_task: int = 32
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    # where the model trains: "cpu", "cuda" or "cuda:1" (the vision pretraining stage and the
    # data stay on the CPU)
    device: str = "cpu"
    # worker processes that draw the next batches while the model trains (prefetch.py);
    # the batches are the same with any number
    data_workers: int = 0
    resume: bool = False
    progress: bool = True
    # vision pretraining before the language stages (shapes world only; vision_pretrain.py):
    # steps of batch_size scenes at peak vision_pretrain_lr, same warm-up and floor as above
    vision_pretrain_steps: int = 0
    vision_pretrain_lr: float = 1e-3
    vision_batch_size: int | None = None  # scenes per vision pretraining step (default batch_size)
    vision_eval_scenes: int = 64  # held-out scenes of the stage's evaluations
    # re-initialise the position embedding of a new vision tower with this std (CLIP's own
    # init, 0.02, is swamped by the patch content: position stays at chance; 1.0 learns it)
    vision_pos_init_std: float | None = None

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        need(self.stage in (1, 2), f"stage must be 1 or 2; got {self.stage}")
        need(self.steps > 0, f"steps must be positive; got {self.steps}")
        need(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be > 0")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0, min_lr_ratio in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.data_workers >= 0, f"data_workers must be >= 0; got {self.data_workers}")
        need(self.checkpoint_every > 0, "checkpoint_every must be > 0")
        problem = device_problem(self.device)
        need(problem is None, problem or "")
        need(self.keep_checkpoints > 0, "keep_checkpoints must be > 0")
        self.curriculum = tuple(self.curriculum)
        self.phases = tuple(tuple(phase) for phase in self.phases)
        need(
            len(self.curriculum) <= len(self.phases)
            and list(self.curriculum) == sorted(self.curriculum),
            f"curriculum takes up to {len(self.phases)} increasing steps (one per phase); "
            f"got {self.curriculum}",
        )
        unknown = sorted({t for phase in self.phases for t in phase if t not in TASKS})
        need(not unknown, f"phases name unknown tasks {unknown}; use some of {TASKS}")
        need(all(self.phases), "every phase needs at least one task")
        need(
            (self.clip is None) == (self.llm is None),
            "give --clip and --llm together (the two folders RGPT.from_components reads)",
        )
        need(
            not (self.init and self.clip),
            "give either --init (a checkpoint) or --clip/--llm, not both",
        )
        need(
            (self.coco is None) == (self.coco_images is None),
            "give --coco and --coco-images together (the annotation file and its image folder)",
        )
        need(self.vision_pretrain_steps >= 0, "vision_pretrain_steps must be >= 0")
        need(self.vision_pretrain_lr > 0, "vision_pretrain_lr must be > 0")
        need(
            self.vision_batch_size is None or self.vision_batch_size > 0,
            f"vision_batch_size must be > 0; got {self.vision_batch_size}",
        )
        need(
            not self.vision_pretrain_steps or (self.coco is None and self.clip is None),
            "vision pretraining learns from the shapes world's label maps and stands in for "
            "CLIP's pretraining; drop --vision-pretrain-steps with --coco or --clip",
        )
        need(
            self.vision_pos_init_std is None
            or (self.from_scratch and self.vision_pos_init_std > 0),
            "--vision-pos-init-std re-initialises a new vision tower; a loaded one (--clip or "
            "--init) keeps its position embedding, so drop the option (or give a std > 0)",
        )

    @property
    def from_scratch(self) -> bool:
        return self.init is None and self.clip is None


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean loss
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    # the vision pretraining stage, when it ran in this call: loss per step, evaluations
    vision_losses: dict[int, float] = field(default_factory=dict)
    vision_evals: dict[int, dict[str, float]] = field(default_factory=dict)
    vision_heads: Any = None  # the stage's readout (vision_pretrain.DenseHeads), for the connector


# --- pieces ------------------------------------------------------------------------------------


def device_problem(name: str) -> str | None:
    """Why torch cannot train on device `name` here, or None when it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"device must be cpu, cuda or cuda:N; got {name!r}"
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cpu" or (seen and (device.index or 0) < seen):
        return None
    return (
        f"device {name!r} is not usable here: torch {torch.__version__} sees {seen} CUDA "
        f"device(s); train with --device cpu, or on a machine with a GPU and a CUDA build of torch"
    )


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


READOUT_GAIN = 3.0


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


def part_lr(part: str, step: int, cfg: TrainConfig) -> float:
    """The learning rate of one part at update `step`: the schedule, scaled by
    vision_lr_scale for the vision tower."""
    scale = cfg.vision_lr_scale if part == "vision" else 1.0
    return lr_at(step, cfg) * scale


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of update `step` (0-based): linear warm-up, then cosine decay to
    min_lr_ratio * lr at the last step."""
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def warmup_cosine(step: int, steps: int, peak: float, warmup: int, floor_ratio: float) -> float:
    """Update `step` (0-based) of `steps`: linear warm-up to `peak` over `warmup` updates, then
    cosine decay to floor_ratio * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = peak * floor_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class DataSource:
    """Training samples by index, and held-out samples for evaluation."""

    def __init__(self, cfg: TrainConfig, model):
        self.cfg = cfg
        if cfg.coco:
            from rgpt_rt.data.coco import CocoRegions

            self.coco = CocoRegions(cfg.coco, cfg.coco_images, seed=cfg.seed)
            self.world = None
        else:
            self.coco = None
            self.world = ShapesWorld(image_size=model.config.vision.image_size, seed=cfg.seed)

    def sample(self, index: int, step: int) -> RegionSample:
        if self.world is None:
            return self.coco.sample(index)
        for end, tasks in zip(self.cfg.curriculum, self.cfg.phases):
            if step < end:
                return self.world.sample(index, tasks=tasks, turns=1)
        return self.world.sample(index)

    def micro_batch(self, step: int, micro: int) -> list[RegionSample]:
        """The samples of micro-batch `micro` of update `step`: a function of the seed and the
        step alone, so a resumed run sees the same data."""
        first = (step * self.cfg.grad_accum + micro) * self.cfg.batch_size
        return [self.sample(first + i, step) for i in range(self.cfg.batch_size)]

    def eval_samples(self, image_size: int) -> list[RegionSample]:
        if self.cfg.eval_per_task <= 0:
            return []
        if self.world is not None:
            from rgpt_rt.eval import shapes_eval_samples

            return shapes_eval_samples(image_size, self.cfg.eval_per_task)
        if self.cfg.coco_eval:
            from rgpt_rt.data.coco import CocoRegions

            held_out = CocoRegions(self.cfg.coco_eval, self.cfg.coco_images, seed=self.cfg.seed + 1)
            return held_out.task_samples(self.cfg.eval_per_task)
        return []


@dataclass
class CollatedBatches:
    """Micro-batch `micro` of update `step`, collated (picklable, for prefetched)."""

    data: DataSource
    config: RGPTConfig
    tokenizer: Any
    pad_token_id: int

    def __call__(self, step: int, micro: int) -> Batch:
        samples = self.data.micro_batch(step, micro)
        return collate(samples, self.config, self.tokenizer, self.pad_token_id)


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


def write_checkpoint(
    out: Path, step: int, model, optimizer, state: dict, prefix: str = CHECKPOINT_PREFIX
) -> Path:
    target = checkpoint_dir(out, step, prefix)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp / "model")
        _write_trainer_state(tmp / "trainer.pt", optimizer, state)
    return target


def _write_trainer_state(path: Path, optimizer, state: dict) -> None:
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


# --- the loop ----------------------------------------------------------------------------------


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _refuse_overwrite(cfg: TrainConfig, out: Path) -> None:
    earlier = complete_checkpoints(out) or complete_checkpoints(out, VISION_CHECKPOINT_PREFIX)
    if earlier and not cfg.resume:
        raise FileExistsError(
            f"{out} already holds checkpoints (latest {earlier[-1].name}); pass --resume to "
            "continue that run, or choose another --out"
        )


def _start(cfg: TrainConfig, out: Path, result: TrainResult):
    """(model, optimizer, first step, earlier losses) for a new or a resumed run. A new run
    of a model from scratch first runs (or continues) the vision pretraining stage, if asked,
    and records it in `result`."""
    from rgpt_rt.model import RGPT

    found = complete_checkpoints(out)
    earlier = found or complete_checkpoints(out, VISION_CHECKPOINT_PREFIX)
    if cfg.resume and found:
        latest = found[-1]
        for partial in remove_partial_checkpoints(out):
            print(f"removed an unfinished checkpoint write: {partial.name}", file=sys.stderr)
        model = RGPT.from_pretrained(latest / "model").to(cfg.device)
        set_stage(model, cfg)
        optimizer = build_optimizer(model, cfg)
        # saved from any device; load_state_dict moves the state to the parameters' device
        state = torch.load(latest / "trainer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        print(f"resuming from {latest} (step {state['step']})", file=sys.stderr)
        return model, optimizer, state["step"], dict(state["losses"])
    if cfg.resume and not earlier:
        print(f"no checkpoint in {out} yet; starting a new run", file=sys.stderr)
    model = build_model(cfg)
    if cfg.vision_pretrain_steps:
        from rgpt_rt.vision_pretrain import pretrain_vision

        stage = pretrain_vision(model, cfg, out)  # continues from its checkpoints on --resume
        result.vision_losses, result.vision_evals = stage.losses, stage.evals
        result.vision_heads = stage.heads
    model.to(cfg.device)
    if result.vision_heads is not None:
        result.vision_heads.to(cfg.device)
    set_stage(model, cfg)
    return model, build_optimizer(model, cfg), 0, {}


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training `cfg` describes; returns the losses and evaluations."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> TrainResult:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_overwrite(cfg, out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    result = TrainResult(out=out, steps=cfg.steps)
    model, optimizer, step, result.losses = _start(cfg, out, result)
    losses = result.losses
    model.train()
    data = DataSource(cfg, model)
    if step == 0 and not cfg.init:
        first = collate(data.micro_batch(0, 0), model.config, model.tokenizer, model.pad_token_id)
        if result.vision_heads is not None:
            read_out_connector(model, result.vision_heads, first)
        centre_connector(model, first)
    eval_samples = data.eval_samples(model.config.vision.image_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_step = cfg.batch_size * cfg.grad_accum
    make_batch = CollatedBatches(data, model.config, model.tokenizer, model.pad_token_id)
    keys = [(n, micro) for n in range(step, cfg.steps) for micro in range(cfg.grad_accum)]
    batches = prefetched(make_batch, keys, cfg.data_workers)

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, unit="step")
    started = time.perf_counter()
    window_start, window_samples, smooth = started, 0, None
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = part_lr(group["part"], step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(cfg.device)
            loss = model(**batch.model_inputs()).loss
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss is {loss.item()} at step {step + 1} (micro-batch {micro + 1}); "
                    f"lower --lr or raise --warmup-steps, then continue with --resume from the "
                    f"last checkpoint in {out / 'checkpoints'}"
                )
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if not torch.isfinite(norm):
            raise TrainingDiverged(
                f"the gradient norm is {norm.item()} at step {step + 1}; lower --lr, then "
                f"continue with --resume from the last checkpoint in {out / 'checkpoints'}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses[step] = total
        window_samples += per_step
        smooth = total if smooth is None else 0.95 * smooth + 0.05 * total

        now = time.perf_counter()
        rate = window_samples / max(now - window_start, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.3f}", samples_s=f"{rate:.1f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            _log(
                out,
                {
                    "step": step,
                    "loss": total,
                    "loss_smooth": smooth,
                    "lr": lr,
                    "grad_norm": float(norm),
                    "samples_per_s": rate,
                    "elapsed_s": now - started,
                },
            )
            window_start, window_samples = now, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"step": step, "losses": losses, "config": asdict(cfg)}
            write_checkpoint(out, step, model, optimizer, state)
            prune_checkpoints(out, cfg.keep_checkpoints)
        if eval_samples and (step % cfg.eval_every == 0 or step == cfg.steps):
            result.evals[step] = _evaluate(model, eval_samples, out, step, bar)
    bar.close()
    batches.close()
    model.save_pretrained(out / "final")
    result.seconds = time.perf_counter() - started
    return result


def _evaluate(model, samples: list[RegionSample], out: Path, step: int, bar) -> dict[str, float]:
    from rgpt_rt.eval import evaluate_samples, summary

    start = time.perf_counter()
    metrics = summary(evaluate_samples(model, samples))
    _log(out, {"step": step, "eval": metrics, "eval_s": time.perf_counter() - start})
    text = " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
    bar.write(f"step {step} eval: {text}")
    model.train()
    return metrics


# --- command line ------------------------------------------------------------------------------


def parse_phases(text: str) -> tuple[tuple[str, ...], ...]:
    """'match,colour/refer,match' -> (("match", "colour"), ("refer", "match"))."""
    return tuple(task_names(phase) for phase in text.split("/"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(out="")
    parser.add_argument("--out", required=True, help="the run's folder (checkpoints, log, final)")
    model = parser.add_argument_group("model (default: the preset, from scratch)")
    model.add_argument("--preset", default=defaults.preset)
    model.add_argument("--init", help="start from this save_pretrained folder")
    model.add_argument("--clip", help="a local CLIP folder (with --llm): RGPT.from_components")
    model.add_argument("--llm", help="a local LLaMA/Vicuna folder (with --clip)")
    data = parser.add_argument_group("data (default: the shapes world)")
    data.add_argument("--coco", help="a COCO-format annotation file (RLE, polygon or box)")
    data.add_argument("--coco-images", help="the folder of the COCO file's images")
    data.add_argument("--coco-eval", help="a held-out COCO-format file to evaluate on")
    run = parser.add_argument_group("training")
    run.add_argument("--stage", type=int, default=defaults.stage, choices=(1, 2))
    vision = run.add_mutually_exclusive_group()
    vision.add_argument("--train-vision", dest="train_vision", action="store_true", default=None)
    vision.add_argument("--freeze-vision", dest="train_vision", action="store_false")
    for name in (
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "vision_lr_scale",
        "min_lr_ratio",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "eval_every",
        "eval_per_task",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "data_workers",
        "vision_pretrain_steps",
        "vision_pretrain_lr",
        "vision_eval_scenes",
    ):
        value = getattr(defaults, name)
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"(default {value})",
        )
    run.add_argument(
        "--curriculum",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=(),
        help="steps where the curriculum phases end, e.g. 500,1000 (see CURRICULUM)",
    )
    run.add_argument(
        "--phases",
        type=parse_phases,
        default=CURRICULUM,
        help="the tasks of each phase, phases split by '/': e.g. match,colour/refer,match "
        "(default: CURRICULUM, for a model trained from scratch)",
    )
    run.add_argument(
        "--vision-pos-init-std",
        type=float,
        help="re-initialise a new vision tower's position embedding with this std (e.g. 1.0)",
    )
    run.add_argument(
        "--vision-batch-size",
        type=int,
        help="scenes per vision pretraining step (default: --batch-size)",
    )
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument(
        "--device",
        default=defaults.device,
        help="cpu, cuda or cuda:N (default cpu; vision pretraining and the data stay on the CPU)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    run.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = train(cfg)
    last = result.losses.get(result.steps)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s; last loss {last:.4f}; "
        f"model in {result.out / 'final'}"
    )
    if result.evals:
        final = result.evals[max(result.evals)]
        print("held-out: " + " ".join(f"{k}={v:.3f}" for k, v in final.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rgpt_rt.train", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
