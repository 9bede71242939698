"""The recipe of the shipped model (rgpt_rt/assets/tiny, "cC at step 250"): the chain of runs
that made it, each a TrainConfig, run in order by one command.

    python -m rgpt_rt.training.recipe --out runs/recipe             # the whole chain
    python -m rgpt_rt.training.recipe --out runs/recipe --print     # its commands, one a line
    python -m rgpt_rt.training.recipe --out runs/recipe --until nH  # up to a stage

A stage is a training run (`Run`: a TrainConfig and the stage it starts from) or a checkpoint
changed in one way (`Change`: model_init.scale_words or number_regions). Stages that continue
one run share its folder, as the runs that were stopped and resumed with other settings did.
The command skips a stage whose output is there and resumes one that was interrupted, so it
can be stopped and run again. Where the chain ran on a GPU (stages g1, g2, g3) it uses one
when torch sees one (--gpu-device). docs/training.md has the chain as a table and what holds it
to the runs that were made, docs/model-notebook.md what each run measured; --smoke runs every
stage a few steps on small batches (the tests do).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.curriculum import KINDS, ReferringMix
from rgpt_rt.training.runs import VISION_CHECKPOINT_PREFIX, checkpoint_dir, latest_step


@dataclass(frozen=True)
class Run:
    """A training run: TrainConfig's fields but `out` and `init`. `start` names the stage whose
    model it starts from; `folder` (default: the name) is shared by the stages of one run."""

    name: str
    settings: dict
    start: str | None = None
    folder: str | None = None
    gpu: bool = False  # ran on a GPU

    def config(self, out: Path, init: Path | None) -> TrainConfig:
        return TrainConfig(
            out=str(out / (self.folder or self.name)),
            init=str(init) if init else None,
            **self.settings,
        )

    def model(self, out: Path) -> Path:
        """Where the run leaves the model the next stage starts from."""
        folder = out / (self.folder or self.name)
        stop = self.settings.get("stop_after")
        return checkpoint_dir(folder, stop) / "model" if stop else folder / "final"

    def done(self, out: Path) -> bool:
        folder = out / (self.folder or self.name)
        if (folder / "final" / "config.json").is_file():
            return True
        if self.settings.get("vision_stop_after"):
            vision = latest_step(folder, VISION_CHECKPOINT_PREFIX)
            return latest_step(folder) > 0 or vision >= self.settings["vision_stop_after"]
        return bool(self.settings.get("stop_after")) and (
            latest_step(folder) >= self.settings["stop_after"]
        )


@dataclass(frozen=True)
class Change:
    """A checkpoint changed in one way: model_init.<change>(model, value), to a new folder."""

    name: str
    start: str
    change: str  # "scale_words" or "number_regions"
    value: float

    def model(self, out: Path) -> Path:
        return out / self.name

    def done(self, out: Path) -> bool:
        return (self.model(out) / "config.json").is_file()

    def make(self, source: Path, target: Path) -> None:
        from rgpt_rt.model import RGPT
        from rgpt_rt.training import model_init

        changed = getattr(model_init, self.change)(RGPT.from_pretrained(source), self.value)
        changed.save_pretrained(target)


# The referring fine-tunes' settings before the GPU rounds (the old curriculum script's
# defaults): vision frozen, lr 5e-4 after 50 warm-up steps, 64 held-out samples per task.
FINE_TUNE = dict(train_vision=False, lr=5e-4, warmup_steps=50, eval_per_task=64, threads=1)
# nH's mix, which every later stage keeps: referring 75%, the world's own samples 10%,
# single-region questions 15%
NH_MIX = ReferringMix(refer_scaffold=0, refer=0.75, match_scaffold=0, match=0, keep=0.15, mixed=0.1)
POSITION_MIX = dataclasses.replace(NH_MIX, decisive_share=0.5, twins=0.5)  # g3
SAME_ROW_MIX = dataclasses.replace(POSITION_MIX, same_row=0.6)  # cA, cC
# steps 1-2: the vision stage, then the language stage with its curriculum (one folder)
VISION_STAGE = dict(
    preset="tiny",
    vision_pretrain_lr=2e-3,
    vision_pos_init_std=1.0,
    vision_eval_scenes=128,
    vision_batch_size=32,
    warmup_steps=100,
    min_lr_ratio=0.05,
    eval_every=500,
    checkpoint_every=500,
    data_workers=1,
    seed=0,
    batch_size=16,
    lr=5e-4,
    train_vision=False,
    eval_per_task=16,
)
FIRST_SCHEDULE = dict(steps=6000, curriculum=(300, 300, 300, 1800, 2800))
CPU_LATE = dict(batch_size=16, warmup_steps=30, eval_per_task=0, train_vision=False, threads=1)
GPU = dict(train_vision=False, warmup_steps=50, eval_per_task=0, keep_checkpoints=1, threads=1)

# one stage, one paragraph (ruff would give every setting a line of its own)
# fmt: off
SHIPPED = (
    # 1. the vision stage (9000 steps planned, extended to 12500 at step 3500)
    Run("d-vision-3500", VISION_STAGE | FIRST_SCHEDULE | dict(vision_pretrain_steps=9000,
        vision_stop_after=3500, threads=1), folder="d"),
    Run("d-vision", VISION_STAGE | FIRST_SCHEDULE | dict(vision_pretrain_steps=12500,
        vision_stop_after=12500, threads=1, resume=True), folder="d"),
    # 2. the language stage: the first curriculum to step 1500, then the second to 5000
    Run("d-1500", VISION_STAGE | FIRST_SCHEDULE | dict(vision_pretrain_steps=12500,
        threads=2, resume=True, stop_after=1500), folder="d"),
    Run("d", VISION_STAGE | dict(vision_pretrain_steps=12500, threads=2, resume=True,
        steps=5000, curriculum=(300, 1500, 1800, 2600, 3200))),
    # 3. referring: larger input word embeddings, shape matching, region numbers, the mix
    Change("h1init", start="d", change="scale_words", value=65.0),
    Run("h1", dict(train_vision=False, steps=3000, curriculum=(3000,),
        phases=(("match_shape", "classify"),), seed=2, eval_every=500, eval_per_task=64,
        checkpoint_every=500, threads=2, data_workers=1, stop_after=2000), start="h1init"),
    Change("h1n", start="h1", change="number_regions", value=9),
    Run("nB", FINE_TUNE | dict(mix=ReferringMix(refer_scaffold=0, refer=0.5, match_scaffold=0,
        match=0.2, keep=0.3, attributes=("shape",)), refer_keys=(("shape",),), steps=2000,
        seed=8, eval_every=500, checkpoint_every=250, stop_after=1000), start="h1n"),
    Run("nD", FINE_TUNE | dict(mix=ReferringMix(refer_scaffold=0, refer=0.7, match_scaffold=0,
        match=0, keep=0.3), steps=3000, seed=10, eval_every=1000, checkpoint_every=250,
        stop_after=2250), start="nB"),
    Run("nE", FINE_TUNE | dict(mix=ReferringMix(refer_scaffold=0, refer=0.7, match_scaffold=0,
        match=0, keep=0.2, mixed=0.1), negative_rate=0.3, steps=4000, seed=11, eval_every=1000,
        checkpoint_every=250), start="nD"),
    Run("nH", FINE_TUNE | dict(mix=NH_MIX, negative_rate=0.4, steps=2000, seed=14,
        eval_every=1000, checkpoint_every=500), start="nE"),
    # 4. on a GPU (the best of three variants each round), then on the CPU
    Run("g1", GPU | dict(mix=NH_MIX, negative_rate=0.4, steps=4349, batch_size=32, lr=5e-4,
        seed=17, data_workers=4, checkpoint_every=869, eval_every=4349), start="nH", gpu=True),
    Run("g2", GPU | dict(mix=NH_MIX, negative_rate=0.5, steps=2074, batch_size=64, lr=3e-4,
        seed=23, data_workers=4, checkpoint_every=414, eval_every=2074), start="g1", gpu=True),
    Run("pB", CPU_LATE | dict(mix=NH_MIX, negative_rate=0.4, steps=1500, lr=1e-4, seed=32,
        eval_every=1500, checkpoint_every=300), start="g2"),
    # 5. questions that position decides: on a GPU, then on the CPU with near misses in the
    # same row and (cC) more questions naming five regions; shipped: cC at step 250
    Run("g3", GPU | dict(mix=POSITION_MIX, negative_rate=0.5, steps=1525, batch_size=64,
        lr=5e-4, seed=81, data_workers=3, checkpoint_every=305, eval_every=1525), start="pB",
        gpu=True),
    Run("cA", CPU_LATE | dict(mix=SAME_ROW_MIX, negative_rate=0.5, steps=3000, lr=1.5e-4,
        seed=101, eval_every=3000, checkpoint_every=500, keep_checkpoints=10, stop_after=1000),
        start="g3"),
    Run("cC", CPU_LATE | dict(mix=SAME_ROW_MIX, negative_rate=0.5, crowded=0.6, steps=2000,
        lr=1.5e-4, seed=103, eval_every=2000, checkpoint_every=250, keep_checkpoints=12,
        stop_after=250), start="cA"),
)
# fmt: on


def stage_named(stages, name: str):
    found = [stage for stage in stages if stage.name == name]
    if not found:
        raise ValueError(f"no stage {name!r}; the stages are {[s.name for s in stages]}")
    return found[0]


# --- running -----------------------------------------------------------------------------------


SMOKE_STEPS = 2000  # --smoke divides every step count by this (rounding up)


def smoke(settings: dict) -> dict:
    """`settings` run for a few steps on small batches: every step count divided by
    SMOKE_STEPS (rounded up, so that each stop stays within its run), batches of 2, no
    held-out evaluation, no data workers."""
    steps = ("steps", "stop_after", "vision_pretrain_steps", "vision_stop_after")
    steps += ("checkpoint_every", "eval_every", "warmup_steps", "log_every")
    small = dict(settings)
    for name in steps:
        if small.get(name):
            small[name] = math.ceil(small[name] / SMOKE_STEPS)
    if "curriculum" in small:
        small["curriculum"] = tuple(math.ceil(n / SMOKE_STEPS) for n in small["curriculum"])
    if small.get("vision_pretrain_steps"):
        small |= dict(vision_batch_size=2, vision_eval_scenes=2)
    return small | dict(batch_size=2, eval_per_task=0, data_workers=0, threads=1)


@dataclass
class Chain:
    """The stages, where they run, and how."""

    out: Path
    stages: tuple = SHIPPED
    gpu_device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    progress: bool = True
    smoke: bool = False
    models: dict[str, Path] = field(default_factory=dict)

    def config(self, run: Run) -> TrainConfig:
        start = self.stage(run.start).model(self.out) if run.start else None
        cfg = run.config(self.out, start)
        device = self.gpu_device if run.gpu else "cpu"
        return dataclasses.replace(cfg, device=device, progress=self.progress)

    def stage(self, name: str):
        """The stage `name` as this chain runs it (with --smoke, shortened)."""
        stage = stage_named(self.stages, name)
        if self.smoke and isinstance(stage, Run):
            return dataclasses.replace(stage, settings=smoke(stage.settings))
        return stage

    def run(self, until: str | None = None) -> Path:
        """Run every stage not yet done, up to `until` (default: all); the last one's model."""
        from rgpt_rt.training.train import train

        names = [stage.name for stage in self.stages]
        last = names.index(stage_named(self.stages, until).name) if until else len(names) - 1
        for stage in (self.stage(name) for name in names[: last + 1]):
            if stage.done(self.out):
                print(f"[{stage.name}] done: {stage.model(self.out)}", flush=True)
                continue
            print(f"[{stage.name}] starting", flush=True)
            if isinstance(stage, Change):
                stage.make(self.stage(stage.start).model(self.out), stage.model(self.out))
            else:
                cfg = self.config(stage)
                if (Path(cfg.out) / "checkpoints").is_dir():  # continue an interrupted stage
                    cfg = dataclasses.replace(cfg, resume=True)
                train(cfg)
        return self.stage(names[last]).model(self.out)


def command(cfg: TrainConfig) -> str:
    """The `python -m rgpt_rt.training.train` command line that makes `cfg`."""
    defaults = TrainConfig(out="")
    words = ["python -m rgpt_rt.training.train"]
    for item in dataclasses.fields(TrainConfig):
        name, value = item.name, getattr(cfg, item.name)
        if name == "out" or (name != "mix" and value == getattr(defaults, name)):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "train_vision":
            words.append("--train-vision" if value else "--freeze-vision")
        elif name in ("resume", "progress"):
            words.append("--resume" if name == "resume" else "--no-progress")
        elif name == "mix":
            words += _mix_flags(value)
        elif name == "phases":
            words += [flag, "/".join(",".join(phase) for phase in value)]
        elif name == "refer_keys":
            words += [flag, ",".join("+".join(keys) for keys in value)]
        elif name == "curriculum":
            words += [flag, ",".join(str(n) for n in value)]
        else:
            words += [flag, str(value)]
    return " ".join([*words[:1], "--out", cfg.out, *words[1:]])


def _mix_flags(mix: ReferringMix | None) -> list[str]:
    """The trainer's --mix options that make `mix` (curriculum.add_arguments)."""
    if mix is None:
        return []
    words, defaults = ["--mix", "referring"], ReferringMix()
    for item in dataclasses.fields(ReferringMix):
        value = getattr(mix, item.name)
        if value == getattr(defaults, item.name):
            continue
        flag = "--" + item.name.replace("_", "-")
        if item.name in KINDS:
            words += ["--share-" + flag[2:], str(value)]
        elif isinstance(value, tuple):
            words += [flag, ",".join(value)]
        elif isinstance(value, bool):
            words.append(flag)
        else:
            words += [flag, str(value)]
    return words


def print_chain(chain: Chain) -> None:
    for stage in (chain.stage(s.name) for s in chain.stages):
        if isinstance(stage, Change):
            source = chain.stage(stage.start).model(chain.out)
            print(
                f"# {stage.name}: model_init.{stage.change}(RGPT.from_pretrained('{source}'), "
                f"{stage.value}).save_pretrained('{stage.model(chain.out)}')"
            )
        else:
            print(f"# {stage.name}" + (" (on a GPU)" if stage.gpu else ""))
            print(command(chain.config(stage)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rgpt_rt.training.recipe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="the folder of the chain's runs")
    parser.add_argument("--until", help="stop after this stage (default: run the whole chain)")
    parser.add_argument(
        "--gpu-device",
        help="where the stages that ran on a GPU run (default: cuda when torch sees one, else cpu)",
    )
    parser.add_argument("--print", action="store_true", help="print the chain's commands only")
    parser.add_argument("--smoke", action="store_true", help="every stage a few steps (a test)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    chain = Chain(Path(args.out), progress=args.progress, smoke=args.smoke)
    if args.gpu_device:
        chain.gpu_device = args.gpu_device
    if args.print:
        print_chain(chain)
        return 0
    model = chain.run(args.until)
    print(f"the chain's model: {model}")
    print(f"evaluate it: python -m rgpt_rt.training.eval --checkpoint {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
