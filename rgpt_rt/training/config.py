"""What a training run is told: TrainConfig, validated when it is made, and the curriculum a
model trained from scratch starts with.

    cfg = TrainConfig(out="runs/tiny", preset="tiny", steps=3000)           # from scratch
    cfg = TrainConfig(out="runs/ft", init="runs/tiny/final", mix=ReferringMix(refer=0.75, ...))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rgpt_rt.training.data.phrases import EXPRESSION_KEYS
from rgpt_rt.training.data.samples import RegionSample
from rgpt_rt.training.data.tasks import NEGATIVE_RATE, TASKS, ShapesWorld

# The curriculum of a model trained from scratch on the shapes world: phase k (up to the k-th
# step of TrainConfig.curriculum; a phase may be empty) asks one question per sample, of the
# tasks in CURRICULUM[k]; then all tasks. The first four phases ask about one region, the
# fifth compares regions. A new LLM first has to learn where the region token is: on the full
# task mix it stayed at its text prior (always "white", "ring") for 800 steps, while on colour
# questions alone it read the region token within ~250. It then names only what it is drilled
# on: a phase of shape names alone (the third) taught shapes to a model that read colours, but
# right after the first phase it made the model stop reading colours, which the fourth phase
# did not bring back. The tasks over several regions stayed at chance in the full mix of a
# model trained without the fifth phase (docs/training.md).
CURRICULUM = (
    ("colour",),
    ("colour", "classify", "brief", "detailed"),
    ("classify",),
    ("position", "colour", "classify", "brief", "detailed"),
    ("refer", "above", "larger"),
)


class SampleMix(Protocol):
    """The samples of a run after its curriculum phases, in place of the world's own mix
    (curriculum.ReferringMix is one). Sample `index` must depend on the world's seed and
    `index` alone, and the object must pickle (data workers get a copy)."""

    def sample(self, world: ShapesWorld, index: int) -> RegionSample: ...


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
    # the shapes world's referring questions (ShapesWorld): the share whose phrase fits no
    # region, the share naming as many regions as the scene has, the attribute sets phrases name
    negative_rate: float = NEGATIVE_RATE
    crowded: float = 0.0
    refer_keys: tuple[tuple[str, ...], ...] = EXPRESSION_KEYS
    # the samples after the curriculum phases (shapes world only; default: the world's own mix)
    mix: SampleMix | None = None
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
    # end the run after this update, with a checkpoint there and no final/, as a run stopped
    # there would (the schedule stays that of `steps`; --resume continues it)
    stop_after: int | None = None
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
    vision_stop_after: int | None = None  # as stop_after, for the vision stage (no language step)
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
        self.refer_keys = self.shapes_world(image_size=1).refer_keys  # validated by the world
        need(
            self.mix is None or self.coco is None,
            "a sample mix (--mix) draws from the shapes world; drop it with --coco",
        )
        need(
            self.stop_after is None or 0 < self.stop_after <= self.steps,
            f"stop_after must be between 1 and steps ({self.steps}); got {self.stop_after}",
        )
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
            self.vision_stop_after is None
            or 0 < self.vision_stop_after <= self.vision_pretrain_steps,
            f"vision_stop_after must be between 1 and vision_pretrain_steps "
            f"({self.vision_pretrain_steps}); got {self.vision_stop_after}",
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

    def shapes_world(self, image_size: int) -> ShapesWorld:
        """The run's training world: its seed and referring settings."""
        return ShapesWorld(
            image_size=image_size,
            seed=self.seed,
            negative_rate=self.negative_rate,
            crowded=self.crowded,
            refer_keys=self.refer_keys,
        )


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
