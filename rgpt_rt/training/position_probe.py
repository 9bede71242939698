"""Which positions a checkpoint confuses when position alone decides a referring question: the
measure of the shipped model's weak spot (docs/training.md). For each referring sample of a world, every shape among its
regions is asked at each of the 9 positions over the same regions ("the star on the right"),
skipping phrases that fit more than one region; the answer is the region whose object has that
shape and position, or none. Printed per phrase position: targets found, "none" said where no
region fits, and the true positions of the regions picked wrongly; then, for shapes that one
region alone has, accuracy by that region's place in the list (<region1> is place 1).

    python -m rgpt_rt.training.position_probe rgpt_rt/assets/tiny runs/cA/final --scenes 60
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import torch

from rgpt_rt.model import RGPT
from rgpt_rt.prompts import NO_MATCH_ANSWER, parse_refer_answer, refer_answer
from rgpt_rt.training.data.phrases import POSITION_PHRASE
from rgpt_rt.training.data.shapes import POSITIONS
from rgpt_rt.training.data.tasks import ShapesWorld
from rgpt_rt.training.eval import answer_samples


def questions(world: ShapesWorld, scenes: int) -> list[tuple]:
    """(sample, expected answer, phrase position, the regions' objects, place) for every shape
    among each sample's regions at each position; place is the 1-based place in the list of
    the one region with that shape (None when several have it)."""
    items = []
    for index in range(scenes):
        sample = world.task_sample(index, "refer")
        turn = sample.turns[0]
        objects = [turn.truth["scene"].objects[i] for i in turn.truth["region_objects"]]
        start = turn.question.index('"') + 1
        end = turn.question.index('"', start)
        for shape in sorted({o.shape for o in objects}):
            having = [k for k, o in enumerate(objects) if o.shape == shape]
            place = having[0] + 1 if len(having) == 1 else None
            for position in POSITIONS:
                fits = [
                    k for k, o in enumerate(objects) if (o.shape, o.position) == (shape, position)
                ]
                if len(fits) > 1:
                    continue
                phrase = f"the {shape} {POSITION_PHRASE[position]}"
                asked = turn.question[:start] + phrase + turn.question[end:]
                asked_turn = dataclasses.replace(turn, question=asked)
                expected = refer_answer(fits[0] if fits else None)
                asked_sample = dataclasses.replace(sample, turns=[asked_turn])
                items.append((asked_sample, expected, position, objects, place))
    return items


def confusion(items: list[tuple], answers: list[str]) -> dict:
    """Per phrase position: [targets right, targets], [none right, none asked], and a Counter of
    the wrong picks' true positions ("none" where a target was missed)."""
    table = {p: ([0, 0], [0, 0], collections.Counter()) for p in POSITIONS}
    for (_, expected, position, objects, _), answer in zip(items, answers):
        targets, nones, wrong = table[position]
        counts = nones if expected == NO_MATCH_ANSWER else targets
        counts[0] += answer == expected
        counts[1] += 1
        if answer != expected:
            picked = parse_refer_answer(answer, len(objects))
            wrong["none" if picked is None else objects[picked].position] += 1
    return table


def by_place(items: list[tuple], answers: list[str]) -> dict[int, list[int]]:
    """Per place in the list of the region the phrase's shape singles out: [right, asked]."""
    table = collections.defaultdict(lambda: [0, 0])
    for (_, expected, _, _, place), answer in zip(items, answers):
        if place is not None:
            table[place][0] += answer == expected
            table[place][1] += 1
    return dict(sorted(table.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rgpt_rt.training.position_probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=9, help="the world's (default 9: unseen)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = None
    for checkpoint in args.checkpoints:
        model = RGPT.from_pretrained(checkpoint).eval()
        if items is None:
            world = ShapesWorld(model.config.vision.image_size, seed=args.seed)
            items = questions(world, args.scenes)
        found = answer_samples(model, [item[0] for item in items], batch_size=64)
        table = confusion(items, found)
        right = sum(t[0] + n[0] for t, n, _ in table.values())
        print(f"{checkpoint}: {right} / {len(items)} right")
        for position, ((t_right, t_all), (n_right, n_all), wrong) in table.items():
            picks = ", ".join(f"{p} {c}" for p, c in wrong.most_common())
            print(
                f"  {position:13s} targets {t_right}/{t_all}  none {n_right}/{n_all}  wrong: {picks}"
            )
        places = by_place(items, found)
        print("  by place: " + ", ".join(f"{k}: {r}/{n}" for k, (r, n) in places.items()))


if __name__ == "__main__":
    main()
