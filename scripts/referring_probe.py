"""The referring probes of 2026-11-27 (rgpt_rt/assets/MODEL_CARD.md), as one script: train a
model a few hundred steps on a phase of chosen questions and print the held-out accuracy.
It patches the shapes world for the run only (nothing in the package changes):

    --colour-only   referring phrases name only the colour ("the red one"), no negatives
    --tasks         the questions of the run's one curriculum phase, e.g. refer,fits,colour
    fits            a per-region match question this script adds:
                    'Is <region1> "the red one"? Answer yes or no.' (half of them true)

What worked, in two runs (about 6 minutes each on 2 cores):

    python scripts/referring_probe.py --out /tmp/p1 --init runs/d/final --colour-only \\
        --tasks fits,colour --steps 1000                  # fits 97-100%, colour 98-100%
    python scripts/referring_probe.py --out /tmp/p2 --init /tmp/p1/final --colour-only \\
        --tasks refer,fits,colour --steps 1000            # refer 72% at 500, 62.5% at 1000

Other arguments go to `python -m rgpt_rt.train` (defaults: vision frozen, lr 5e-4, 2
threads, one data worker, evaluation every half run on 64 samples per task)."""

from __future__ import annotations

import argparse
import sys

import rgpt_rt.data.tasks as tasks
import rgpt_rt.train as train

FITS_RATE = 0.5  # share of per-region questions whose phrase fits the region
FITS_WEIGHT = 0.3  # its sampling weight beside TASK_WEIGHTS' (refer: 0.26)


def fits_turn(scene, regions, rng):
    """'Is <regionK> "the red one"? Answer yes or no.' about one object, by its colour."""
    index = int(rng.integers(len(scene.objects)))
    colour = scene.objects[index].colour
    fits = rng.random() < FITS_RATE
    if not fits:
        others = [c for c in tasks.COLOURS if c != colour]
        colour = others[int(rng.integers(len(others)))]
    phrase = tasks.expression_text({"colour": colour}, rng)
    question = f'Is {regions.name(index)} "{phrase}"? Answer yes or no.'
    return tasks.Turn(question, "yes" if fits else "no", "fits", {"object": index})


def patch_world(colour_only: bool, phase: tuple[str, ...]) -> None:
    """Runs at import in data workers too (they re-import this script), so call it at top level."""
    if colour_only:
        tasks.EXPRESSION_KEYS = (("colour",),)
        tasks.NEGATIVE_RATE = 0.0
    tasks.TASKS = (*tasks.TASKS, "fits")
    tasks.TASK_WEIGHTS["fits"] = FITS_WEIGHT
    plain_turn = tasks._turn
    tasks._turn = lambda task, scene, regions, rng, first: (
        fits_turn(scene, regions, rng)
        if task == "fits"
        else plain_turn(task, scene, regions, rng, first)
    )
    train.CURRICULUM = (*train.CURRICULUM[:4], phase)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="refer,fits,colour")
    parser.add_argument("--colour-only", action="store_true")
    parser.add_argument("--steps", type=int, default=1000)
    return parser.parse_known_args(argv)


ARGS, REST = parse(sys.argv[1:])
patch_world(ARGS.colour_only, tuple(ARGS.tasks.split(",")))

if __name__ == "__main__":
    defaults = {"--freeze-vision": None, "--lr": "5e-4", "--warmup-steps": "50",
                "--eval-per-task": "64", "--threads": "2", "--data-workers": "1"}  # fmt: skip
    command = [*REST, "--steps", str(ARGS.steps), "--curriculum", f"0,0,0,0,{ARGS.steps}"]
    command += ["--eval-every", str(max(1, ARGS.steps // 2)), "--no-progress"]
    if "--train-vision" in REST:
        defaults.pop("--freeze-vision")
    for flag, value in defaults.items():
        if flag not in REST:
            command += [flag] if value is None else [flag, value]
    sys.exit(train.main(command))
