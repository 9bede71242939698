"""The small trainer: stage 1 / stage 2 RegionGPT training on the shapes world or on COCO-format
region data.

    python -m rgpt_rt.training.train --out runs/tiny --preset tiny --steps 3000   # from scratch
    python -m rgpt_rt.training.train --out runs/tiny --resume                      # after a stop
    python -m rgpt_rt.training.train --out runs/coco --clip clip-vit-l-336/ --llm vicuna-7b/ \\
        --coco instances.json --coco-images images/ --stage 1                   # fine-tune on COCO

Stage 1 trains the refinement and the connector (vision tower and LLM frozen); stage 2 trains
the LLM too. A model trained from scratch (a preset) also trains its vision tower, since nothing
in it is pretrained. AdamW with linear warm-up and cosine decay, gradient clipping and
accumulation. Every `checkpoint_every` steps `out/checkpoints/step-N/` is written whole or not
at all (a run killed mid-write resumes from the previous one), with the model, the optimizer
and the step (runs.py). The data of step N depends only on the seed and N, so a resumed run
continues the same curve; --stop-after N ends a run at step N as a stop would. A NaN or infinite
loss stops the run with an error naming the step.

A model from scratch can first learn to see: --vision-pretrain-steps N runs the vision
pretraining stage of vision_pretrain.py (dense per-cell attribute heads on the hi-res map, the
stand-in for CLIP's pretraining) before the language stages, and --vision-pos-init-std 1.0
gives its new vision tower a position embedding that the patch content does not swamp.

A model from scratch needs two things a pretrained LLM brings (config.CURRICULUM and
model_init.centre_connector): a connector whose outputs are not one shared vector, and a first
phase of questions that only the region token can answer. A curriculum is a list of phases,
each asking one question per sample of its tasks, up to the step where it ends (--curriculum),
then every task: --phases names a run's own (default CURRICULUM). After the phases, --mix
referring replaces the world's own mix with the referring curriculum's (curriculum.py):

    python -m rgpt_rt.training.train --out runs/match --init runs/tiny/final --freeze-vision \\
        --phases match_colour,colour --curriculum 1000 --steps 1000

out/ holds: log.jsonl (loss, lr, samples/s; evaluations), checkpoints/, final/ (the model).
The recipe of the shipped model is a chain of such runs: recipe.py, docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rgpt_rt.config import RGPTConfig
from rgpt_rt.training import curriculum
from rgpt_rt.training.config import CURRICULUM, TrainConfig
from rgpt_rt.training.data.samples import Batch, RegionSample, collate
from rgpt_rt.training.data.tasks import task_names
from rgpt_rt.training.model_init import (
    build_model,
    build_optimizer,
    centre_connector,
    read_out_connector,
    set_stage,
)
from rgpt_rt.training.prefetch import prefetched
from rgpt_rt.training.runs import (
    VISION_CHECKPOINT_PREFIX,
    TrainingDiverged,
    append_log,
    checkpoint_dir,
    complete_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    warmup_cosine,
    write_checkpoint,
)


@dataclass
class TrainResult:
    out: Path
    steps: int  # the last update this call reached (cfg.steps, or cfg.stop_after)
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean loss
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: bool = False  # ended before cfg.steps (stop_after or vision_stop_after): no final/
    # the vision pretraining stage, when it ran in this call: loss per step, evaluations
    vision_losses: dict[int, float] = field(default_factory=dict)
    vision_evals: dict[int, dict[str, float]] = field(default_factory=dict)
    vision_heads: Any = None  # the stage's readout (vision_pretrain.DenseHeads), for the connector

    @property
    def model(self) -> Path:
        """The folder of the model this call ended with: final/, or its stop's checkpoint."""
        if not self.stopped:
            return self.out / "final"
        return checkpoint_dir(self.out, self.steps) / "model"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of update `step` (0-based): linear warm-up, then cosine decay to
    min_lr_ratio * lr at the last step."""
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def part_lr(part: str, step: int, cfg: TrainConfig) -> float:
    """The learning rate of one part at update `step`: the schedule, scaled by
    vision_lr_scale for the vision tower."""
    scale = cfg.vision_lr_scale if part == "vision" else 1.0
    return lr_at(step, cfg) * scale


class DataSource:
    """Training samples by index, and held-out samples for evaluation."""

    def __init__(self, cfg: TrainConfig, model):
        self.cfg = cfg
        if cfg.coco:
            from rgpt_rt.training.data.coco import CocoRegions

            self.coco = CocoRegions(cfg.coco, cfg.coco_images, seed=cfg.seed)
            self.world = None
        else:
            self.coco = None
            self.world = cfg.shapes_world(model.config.vision.image_size)

    def sample(self, index: int, step: int) -> RegionSample:
        """The curriculum phase's sample while one lasts, then the mix's (cfg.mix) or the
        world's own."""
        if self.world is None:
            return self.coco.sample(index)
        for end, tasks in zip(self.cfg.curriculum, self.cfg.phases):
            if step < end:
                return self.world.sample(index, tasks=tasks, turns=1)
        if self.cfg.mix is not None:
            return self.cfg.mix.sample(self.world, index)
        return self.world.sample(index)

    def micro_batch(self, step: int, micro: int) -> list[RegionSample]:
        """The samples of micro-batch `micro` of update `step`: a function of the seed and the
        step alone, so a resumed run sees the same data."""
        first = (step * self.cfg.grad_accum + micro) * self.cfg.batch_size
        return [self.sample(first + i, step) for i in range(self.cfg.batch_size)]

    def eval_samples(self, image_size: int) -> list[RegionSample]:
        """The held-out samples of the run's evaluations: those of `python -m
        rgpt_rt.training.eval` (its world, whatever the run's referring settings), or the
        --coco-eval file's."""
        if self.cfg.eval_per_task <= 0:
            return []
        if self.world is not None:
            from rgpt_rt.training.eval import shapes_eval_samples

            return shapes_eval_samples(image_size, self.cfg.eval_per_task)
        if self.cfg.coco_eval:
            from rgpt_rt.training.data.coco import CocoRegions

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


# --- the loop ----------------------------------------------------------------------------------


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
    and records it in `result` (result.stopped when it ended at cfg.vision_stop_after)."""
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
        from rgpt_rt.training.vision_pretrain import pretrain_vision

        stage = pretrain_vision(model, cfg, out)  # continues from its checkpoints on --resume
        result.vision_losses, result.vision_evals = stage.losses, stage.evals
        result.vision_heads, result.stopped = stage.heads, stage.stopped
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
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=repr))
    result = TrainResult(out=out, steps=0)
    model, optimizer, step, result.losses = _start(cfg, out, result)
    if result.stopped:  # the vision stage ended at cfg.vision_stop_after
        return result
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
    end = cfg.stop_after or cfg.steps  # where this call stops
    make_batch = CollatedBatches(data, model.config, model.tokenizer, model.pad_token_id)
    keys = [(n, micro) for n in range(step, end) for micro in range(cfg.grad_accum)]
    batches = prefetched(make_batch, keys, cfg.data_workers)

    bar = tqdm(total=end, initial=step, disable=not cfg.progress, unit="step")
    started = time.perf_counter()
    window_start, window_samples, smooth = started, 0, None
    while step < end:
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
            record = {"step": step, "loss": total, "loss_smooth": smooth, "lr": lr}
            record |= {"grad_norm": float(norm), "samples_per_s": rate}
            append_log(out, record | {"elapsed_s": now - started})
            window_start, window_samples = now, 0
        if step % cfg.checkpoint_every == 0 or step in (cfg.steps, end):
            state = {"step": step, "losses": losses, "config": asdict(cfg)}
            write_checkpoint(out, step, model, optimizer, state)
            prune_checkpoints(out, cfg.keep_checkpoints)
        if eval_samples and (step % cfg.eval_every == 0 or step == cfg.steps):
            result.evals[step] = _evaluate(model, eval_samples, out, step, bar)
    bar.close()
    batches.close()
    result.steps, result.stopped = step, step < cfg.steps
    if not result.stopped:
        model.save_pretrained(out / "final")
    result.seconds = time.perf_counter() - started
    return result


def _evaluate(model, samples: list[RegionSample], out: Path, step: int, bar) -> dict[str, float]:
    from rgpt_rt.training.eval import evaluate_samples, summary

    start = time.perf_counter()
    metrics = summary(evaluate_samples(model, samples))
    append_log(out, {"step": step, "eval": metrics, "eval_s": time.perf_counter() - start})
    text = " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
    bar.write(f"step {step} eval: {text}")
    model.train()
    return metrics


# --- command line ------------------------------------------------------------------------------


def parse_phases(text: str) -> tuple[tuple[str, ...], ...]:
    """'match,colour/refer,match' -> (("match", "colour"), ("refer", "match"))."""
    return tuple(task_names(phase) for phase in text.split("/"))


def parse_refer_keys(text: str) -> tuple[tuple[str, ...], ...]:
    """'shape,colour+shape' -> (("shape",), ("colour", "shape"))."""
    return tuple(tuple(keys.split("+")) for keys in text.split(","))


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


# TrainConfig fields given as --name VALUE of the type of their default
PLAIN_OPTIONS = (
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
    "negative_rate",
    "crowded",
)


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
    data.add_argument(
        "--refer-keys",
        type=parse_refer_keys,
        default=defaults.refer_keys,
        help="the attribute sets referring phrases name, e.g. shape or shape,colour+shape "
        "(default: phrases.EXPRESSION_KEYS)",
    )
    run = parser.add_argument_group("training")
    run.add_argument("--stage", type=int, default=defaults.stage, choices=(1, 2))
    vision = run.add_mutually_exclusive_group()
    vision.add_argument("--train-vision", dest="train_vision", action="store_true", default=None)
    vision.add_argument("--freeze-vision", dest="train_vision", action="store_false")
    for name in PLAIN_OPTIONS:
        value = getattr(defaults, name)
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"(default {value})",
        )
    run.add_argument(
        "--curriculum",
        type=_int_list,
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
    run.add_argument("--stop-after", type=int, help="end after this step, as a stop would")
    run.add_argument("--vision-stop-after", type=int, help="the same, in the vision stage")
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
    curriculum.add_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values | {"mix": curriculum.mix_from_args(args)})


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = train(cfg)
    if result.stopped and result.steps == 0:  # in the vision stage
        print(f"vision stage stopped after step {cfg.vision_stop_after}; continue with --resume")
        return 0
    last = result.losses.get(result.steps)
    ended = f"stopped after step {result.steps} of {cfg.steps}" if result.stopped else "trained"
    print(
        f"{ended} ({result.seconds:.0f} s); last loss {last:.4f}; model in {result.model}"
        + (" (continue with --resume)" if result.stopped else "")
    )
    if result.evals:
        final = result.evals[max(result.evals)]
        print("held-out: " + " ".join(f"{k}={v:.3f}" for k, v in final.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rgpt_rt.training.train", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
