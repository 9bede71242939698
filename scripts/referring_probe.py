"""Referring probes (rgpt_rt/assets/MODEL_CARD.md): train a model a few hundred steps on one
curriculum phase of chosen tasks and print the held-out accuracy. With --colour-only it patches
the shapes world for its run only (nothing in the package changes): referring phrases name only
the colour ("the red one") and none is a no-match negative. With --scaffold it replaces the
run's data with matching one attribute taught through the model's own answer: half the
samples ask e.g. 'What shape is <region1>?' -> "cross" first and then 'Is <region1> the star?
Answer yes or no.' -> "no" about the same region, a quarter the match question alone (what
the evaluation asks), a quarter the first question alone.

    --scaffold     shape, position, size or colour, or several: shape,position,colour
    --tasks        the tasks of the run's one phase, e.g. refer,match_colour,colour
                   (match_colour: 'Is <region1> "the red one"? Answer yes or no.', a task of
                   the package, asked only where a phase names it)

The runs that worked on 2026-11-27 (about 6-7 minutes each on 2 cores):

    python scripts/referring_probe.py --out /tmp/p1 --init runs/d/final \\
        --tasks match_colour,colour --steps 1000              # match_colour 98% at 500, 100%
    python scripts/referring_probe.py --out /tmp/p2 --init /tmp/p1/final --colour-only \\
        --tasks refer,match_colour,colour --steps 1000        # refer (colour only) 62-72%
    (the second was measured with an earlier match question of one wording, not rerun since)

    python scripts/referring_probe.py --out /tmp/p3 --init runs/d/final --scaffold shape \\
        --steps 1000 --data-workers 0                         # match_shape 56% at 500, 81%
    python scripts/referring_probe.py --out /tmp/p4 --init /tmp/p3/final --scaffold shape \\
        --steps 1000 --data-workers 0 --seed 3                # match_shape 86%, 94%
    python scripts/referring_probe.py --out /tmp/p5 --init runs/d/final --scaffold position \\
        --steps 1000 --data-workers 0                         # match_position 73%, 92%

Other arguments go to `python -m rgpt_rt.train` (defaults: vision frozen, seed 2, lr 5e-4,
2 threads, one data worker, evaluation every half run on 64 samples per task)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

import rgpt_rt.data.tasks as tasks
import rgpt_rt.train as train
from rgpt_rt.data.samples import RegionSample, Turn


def patch_world(colour_only: bool) -> None:
    """Runs at import in data workers too (they re-import this script), so call it at top level."""
    if colour_only:
        tasks.EXPRESSION_KEYS = (("colour",),)
        tasks.NEGATIVE_RATE = 0.0


# attribute -> (the question that reads it out, its match task, its wordings, its answer)
SCAFFOLDS = {
    "shape": ("classify", "match_shape", tasks.CLASSIFY_PARAPHRASES, lambda o: o.shape),
    "colour": ("colour", "match_colour", tasks.COLOUR_QUESTIONS, lambda o: o.colour),
    "position": ("position", "match_position", tasks.POSITION_QUESTIONS, lambda o: o.position),
    "size": ("brief", "match_size", tasks.BRIEF_PARAPHRASES, tasks.brief_answer),
}


def scaffold_sample(world: tasks.ShapesWorld, index: int, attribute: str) -> RegionSample:
    """A quarter: the question that reads `attribute` out; a quarter: its match question; a
    half: the first, then the second about the same region."""
    readout, match_task, wordings, answer = SCAFFOLDS[attribute]
    rng = np.random.default_rng([world.seed, 99, index])
    scene, regions = world.scene(rng), tasks._Regions()
    draw = rng.random()
    if draw < 0.25:
        turn = tasks._turn(readout, scene, regions, rng, first=True)
        return world._finish(scene, regions, [turn], rng)
    match = tasks._match_turn(match_task, scene, regions, rng)
    if draw < 0.5:
        return world._finish(scene, regions, [match], rng)
    obj = scene.objects[match.truth["object"]]
    question = tasks._pick(rng, wordings).format(r="<region1>")
    first = Turn(question, answer(obj), readout, {"object": match.truth["object"]})
    return world._finish(scene, regions, [first, match], rng)


def patch_data(attributes: str | None) -> None:
    """Scaffold samples of one attribute, or of several ("shape,position"): one drawn per
    sample from its own stream, so that each attribute's samples stay those of its own run."""
    if not attributes:
        return
    names = attributes.split(",")
    unknown = [name for name in names if name not in SCAFFOLDS]
    if unknown:
        raise SystemExit(f"--scaffold takes some of {sorted(SCAFFOLDS)}; got {unknown}")

    def sample(self, index: int, step: int) -> RegionSample:
        pick = np.random.default_rng([self.world.seed, 98, index]).integers(len(names))
        return scaffold_sample(self.world, index, names[pick])

    train.DataSource.sample = sample


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="refer,match_colour,colour")
    parser.add_argument("--colour-only", action="store_true")
    parser.add_argument(
        "--scaffold", help=f"one or more of {sorted(SCAFFOLDS)}, e.g. shape,position"
    )
    parser.add_argument("--steps", type=int, default=1000)
    return parser.parse_known_args(argv)


ARGS, REST = parse(sys.argv[1:])
patch_world(ARGS.colour_only)
patch_data(ARGS.scaffold)
if ARGS.scaffold:  # what the run's config records of the scaffold's data
    ARGS.tasks = ",".join(t for name in ARGS.scaffold.split(",") for t in SCAFFOLDS[name][:2])

if __name__ == "__main__":
    defaults = {"--freeze-vision": None, "--seed": "2", "--lr": "5e-4", "--warmup-steps": "50",
                "--eval-per-task": "64", "--threads": "2", "--data-workers": "1"}  # fmt: skip
    command = [*REST, "--steps", str(ARGS.steps), "--phases", ARGS.tasks]
    command += ["--curriculum", str(ARGS.steps), "--eval-every", str(max(1, ARGS.steps // 2))]
    command += ["--no-progress"]
    if "--train-vision" in REST:
        defaults.pop("--freeze-vision")
    for flag, value in defaults.items():
        if flag not in REST:
            command += [flag] if value is None else [flag, value]
    sys.exit(train.main(command))
