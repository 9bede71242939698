"""The referring curriculum: a sample mix (TrainConfig.mix) in which matching a phrase to a region
is taught through the model's own answers, with the evaluation's questions asked alone beside
them. It is how the shipped model learned to refer (docs/training.md; recipe.py). Every sample
is one of these kinds, drawn by its share:

    refer_scaffold  'Name the size, colour, shape and position of <region1>.' -> 'the large
                    red circle at the top left', the same for each candidate region, then
                    the referring question about them (what the evaluation asks, alone)
    refer           the referring question alone
    match_scaffold  one attribute read out ('What shape is <region1>?' -> "cross"), then a
                    match question of that attribute about the same region
    match           a match question alone (one attribute, or the world's `match`)
    keep            one question of the single-region tasks (classify, colour, brief,
                    detailed), so that they are not forgotten
    index           one region read out by its number among 2-5 ('Of <region1>, <region2>
                    and <region3>, what shape is Region [2]?' -> "star"): the reverse of
                    naming a region's number, which referring needs
    refer_text      the referring question after a written description of each candidate
                    ('Region [1] is the large red circle at the top left; Region [2] is ...')
    copy            a number to copy, with nothing to match ('The mask you want is Region [3]
                    of <region1>, <region2> and <region3>. Answer with Region [x].')
    mixed           a sample of the world's own mix: 1-3 questions of any task

`decisive_share` of the referring questions are ones that an attribute of `decisive` decides: a
near miss in that attribute alone, or a target that the phrase's other attributes do not single
out ('the cross at the bottom left' among three crosses); `twins` of those come beside their
twin (the same regions and phrase, the deciding attribute changed so that the answer changes);
`same_row` of the position near misses move the position within its row of the 3x3 grid. The
world's own fields (TrainConfig.negative_rate, crowded, refer_keys) set how often no region
fits, how many regions a question names and what phrases name.

    python -m rgpt_rt.training.train --out runs/ft --init CHECKPOINT --mix referring \\
        --share-refer-scaffold 0 --share-match-scaffold 0 --share-match 0 --share-refer 0.75 \\
        --share-mixed 0.1 --share-keep 0.15 --negative-rate 0.5 --decisive-share 0.5 --twins 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np

from rgpt_rt.prompts import refer_answer, region_list
from rgpt_rt.training.data.phrases import (
    POSITION_PHRASE,
    expression_text,
    fits_without,
    matches,
    near_miss,
    object_values,
)
from rgpt_rt.training.data.samples import RegionSample, Turn
from rgpt_rt.training.data.shapes import ATTRIBUTES, POSITIONS, Scene
from rgpt_rt.training.data.tasks import (
    CLASSIFY_PARAPHRASES,
    COLOUR_QUESTIONS,
    POSITION_QUESTIONS,
    Regions,
    ShapesWorld,
    choose,
    match_turn,
    refer_question,
    task_names,
)

KINDS = (
    "refer_scaffold",
    "refer",
    "match_scaffold",
    "match",
    "keep",
    "index",
    "refer_text",
    "copy",
    "mixed",
)
KEEP_TASKS = ("classify", "colour", "brief", "detailed")
SIZE_QUESTIONS = ("What size is {r}?", "Is {r} small, medium or large?", "How big is {r}?")
FULL_QUESTIONS = (
    "Name the size, colour, shape and position of {r}.",
    "Which object is {r}? Give its size, colour, shape and position.",
)
INDEX_QUESTIONS = (
    "Of {regions}, what {attribute} is Region [{k}]?",
    "Among the masks {regions}, name the {attribute} of Region [{k}].",
)
# attribute -> the questions that read it out of one region
READOUT_QUESTIONS = {
    "shape": CLASSIFY_PARAPHRASES,
    "colour": COLOUR_QUESTIONS,
    "position": POSITION_QUESTIONS,
    "size": SIZE_QUESTIONS,
}
# a sample's draws: numpy's stream [world seed, MIX_STREAM, index] (the world's own samples
# draw from [seed, index])
MIX_STREAM = 97


def full_answer(obj) -> str:
    """'the large red circle at the top left'."""
    return f"the {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASE[obj.position]}"


def row_mates(position: str) -> list[str]:
    """The other positions in `position`'s row of the 3x3 grid: "top" -> top left, top right."""
    row = POSITIONS.index(position) // 3
    return [p for p in POSITIONS[3 * row : 3 * row + 3] if p != position]


@dataclass(frozen=True)
class ReferringMix:
    """The share of each of KINDS (any scale: they are normalised), and how its questions are
    drawn (the module docstring). Defaults: the mix of the first referring probes."""

    refer_scaffold: float = 0.2
    refer: float = 0.2
    match_scaffold: float = 0.25
    match: float = 0.15
    keep: float = 0.2
    index: float = 0.0
    refer_text: float = 0.0
    copy: float = 0.0
    mixed: float = 0.0
    # the attributes that match, index and copy questions read out
    attributes: tuple[str, ...] = ("shape", "colour", "size", "position")
    short_text: bool = False  # refer_text names only the attributes the phrase names
    decisive: tuple[str, ...] = ("position",)
    decisive_share: float = 0.0
    twins: float = 0.0
    same_row: float = 0.0

    def __post_init__(self) -> None:
        shares = self.shares_array()
        if shares.min() < 0 or shares.sum() <= 0:
            raise ValueError(
                f"the shares of {', '.join(KINDS)} must be >= 0 with a positive sum; "
                f"got {dict(zip(KINDS, shares.tolist()))}"
            )
        for name in ("attributes", "decisive"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values or set(values) - set(ATTRIBUTES):
                raise ValueError(f"{name} takes some of {sorted(ATTRIBUTES)}; got {values}")
        for name in ("decisive_share", "twins", "same_row"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1; got {getattr(self, name)}")

    def shares_array(self) -> np.ndarray:
        return np.array([getattr(self, kind) for kind in KINDS], dtype=np.float64)

    def sample(self, world: ShapesWorld, index: int) -> RegionSample:
        """Sample `index` of the mix: a function of the world (its seed and fields) and index."""
        rng = np.random.default_rng([world.seed, MIX_STREAM, index])
        shares = self.shares_array()
        kind = KINDS[rng.choice(len(KINDS), p=shares / shares.sum())]
        if kind == "keep":
            return world.sample(index, tasks=KEEP_TASKS, turns=1)
        if kind == "mixed":
            return world.sample(index)
        scene, regions = world.scene(rng), Regions()
        if kind in ("index", "copy"):
            turn = self._index_turn(world, scene, regions, rng)
            if kind == "copy":
                count, k = len(turn.truth["objects"]), turn.truth["target"]
                turn.question = (
                    f"The mask you want is Region [{k + 1}] of {region_list(count)}. "
                    "Answer with Region [x]."
                )
                turn.answer, turn.task = refer_answer(k), "copy"
            return world.finish(scene, regions, [turn], rng)
        if kind in ("refer", "refer_scaffold", "refer_text"):
            return self._referring_sample(kind, world, scene, regions, rng)
        attribute = self.attributes[rng.integers(len(self.attributes))]
        task = "match" if kind == "match" and rng.random() < 0.3 else f"match_{attribute}"
        match = match_turn(task, scene, regions, rng)
        if kind == "match":
            return world.finish(scene, regions, [match], rng)
        obj = scene.objects[match.truth["object"]]
        question = choose(rng, READOUT_QUESTIONS[attribute]).format(r="<region1>")
        first = Turn(question, object_values(obj)[attribute], attribute, {})
        return world.finish(scene, regions, [first, match], rng)

    # --- referring ---------------------------------------------------------------------------

    def _referring_sample(self, kind, world, scene, regions, rng) -> RegionSample:
        twins = self.twins if kind == "refer" else 0.0
        scene, regions, refers = self._refer_turns(world, scene, regions, rng, twins)
        if kind == "refer":
            return world.finish(scene, regions, refers, rng)
        refer = refers[0]
        if kind == "refer_text":
            objects = [scene.objects[i] for i in refer.truth["objects"]]
            keys = refer.truth["values"] if self.short_text else None
            text = "; ".join(
                f"Region [{k}] is {self._written(o, keys, rng)}" for k, o in enumerate(objects, 1)
            )
            refer.question = f"{text}. {refer.question}"
            return world.finish(scene, regions, [refer], rng)
        turns = []
        for number, object_index in enumerate(refer.truth["objects"], start=1):
            question = choose(rng, FULL_QUESTIONS).format(r=f"<region{number}>")
            turns.append(Turn(question, full_answer(scene.objects[object_index]), "full", {}))
        return world.finish(scene, regions, [*turns, refer], rng)

    def _refer_turns(self, world, scene, regions, rng, twins: float):
        """A referring question about `scene`, or about another scene where it has none;
        decisive_share of them decided by one attribute, and a share `twins` of those asked
        beside their twin, in random order. -> (scene, regions, turns)."""
        decisive = self.decisive_share > 0 and rng.random() < self.decisive_share
        # drawn once: a positive question that an attribute decides needs more tries of a scene
        negative = decisive and rng.random() < world.negative_rate
        paired = decisive and twins > 0 and rng.random() < twins
        while True:
            if decisive:
                turn = self._decisive_turn(world, scene, regions, negative, rng)
            else:
                turn = world.refer_turn(scene, regions, rng)
            twin = turn and paired and self._twin_turn(scene, turn, regions, rng)
            if turn is not None and (twin or not paired):
                turns = [turn, twin] if twin else [turn]
                return scene, regions, [turns[i] for i in rng.permutation(len(turns))]
            scene, regions = world.scene(rng), Regions()

    def _in_row(self, attribute: str, rng) -> bool:
        """Whether this question's position, when position decides, moves within its row
        alone; draws nothing while same_row is 0, so that mixes without it sample the same."""
        return attribute == "position" and self.same_row > 0 and rng.random() < self.same_row

    def _decisive_values(self, world, candidates, target, attribute: str, rng):
        """A referring phrase's attribute values in which `attribute` decides: for a target,
        the other values it names fit more than one candidate; for none (target None), a
        candidate's values with `attribute` changed. None when the candidates allow neither."""
        key_sets = [keys for keys in world.refer_keys if attribute in keys and len(keys) > 1]
        for k in rng.permutation(len(key_sets)):
            keys = key_sets[k]
            if target is None:
                base = object_values(candidates[rng.integers(len(candidates))])
                values = {key: base[key] for key in keys}
                if self._in_row(attribute, rng):
                    mates = row_mates(values["position"])
                    values["position"] = mates[rng.integers(len(mates))]
                else:
                    values = near_miss(values, rng, changed=attribute)
                if not any(matches(c, values) for c in candidates):
                    return values
                continue
            values = {key: object_values(candidates[target])[key] for key in keys}
            fits = sum(matches(c, values) for c in candidates)
            if fits == 1 and fits_without(candidates, values, attribute) > 1:
                return values
        return None

    def _decisive_turn(self, world, scene: Scene, regions, negative: bool, rng) -> Turn | None:
        """A referring question that one of `decisive`'s attributes decides."""
        attribute = self.decisive[rng.integers(len(self.decisive))]
        picked = world.pick_candidates(scene, rng)
        target = None if negative else int(rng.integers(len(picked)))
        candidates = [scene.objects[i] for i in picked]
        values = self._decisive_values(world, candidates, target, attribute, rng)
        if values is None:
            return None
        turn = refer_question(picked, target, values, regions, rng)
        turn.truth["decided_by"] = attribute
        return turn

    def _twin_turn(self, scene: Scene, decisive: Turn, regions, rng) -> Turn | None:
        """The decisive question's twin: the same regions and phrase with the deciding
        attribute changed so that the answer changes (a near miss's twin fits one region; a
        target's fits another region or none). None when no value of that attribute does so."""
        truth = decisive.truth
        picked, target, values = truth["objects"], truth["target"], truth["values"]
        candidates = [scene.objects[i] for i in picked]
        attribute = truth["decided_by"]
        options = [v for v in ATTRIBUTES[attribute] if v != values[attribute]]
        options = [options[k] for k in rng.permutation(len(options))]
        if self._in_row(attribute, rng):  # the same row's positions first
            mates = row_mates(values[attribute])
            options.sort(key=lambda v: v not in mates)
        for option in options:
            twin = {**values, attribute: option}
            fits = [i for i, c in enumerate(candidates) if matches(c, twin)]
            if len(fits) == 1 and fits[0] != target:
                return refer_question(picked, fits[0], twin, regions, rng)
            if not fits and target is not None:
                return refer_question(picked, None, twin, regions, rng)
        return None

    def _written(self, obj, keys, rng) -> str:
        """A candidate's description for refer_text: all of it, or only the attributes in
        `keys` (those the referring phrase names: 'the star', 'the red one')."""
        if keys is None:
            return full_answer(obj)
        values = object_values(obj)
        return expression_text({key: values[key] for key in keys}, rng)

    def _index_turn(self, world, scene: Scene, regions, rng) -> Turn:
        """'Of <region1>, <region2> and <region3>, what shape is Region [2]?' -> "star"."""
        attribute = self.attributes[rng.integers(len(self.attributes))]
        picked = world.pick_candidates(scene, rng)
        for object_index in picked:
            regions.name(object_index)
        k = int(rng.integers(len(picked)))
        question = choose(rng, INDEX_QUESTIONS).format(
            regions=region_list(len(picked)), attribute=attribute, k=k + 1
        )
        answer = object_values(scene.objects[picked[k]])[attribute]
        return Turn(question, answer, "index", {"objects": picked, "target": k})


# --- command line (the trainer's --mix options) ------------------------------------------------

MIXES = {"referring": ReferringMix}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's --mix option and the referring mix's fields (each needs --mix referring)."""
    group = parser.add_argument_group(
        "sample mix (after the curriculum phases; default: the world's own mix)"
    )
    group.add_argument("--mix", choices=sorted(MIXES), help="referring: curriculum.ReferringMix")
    defaults = ReferringMix()
    for kind in KINDS:
        group.add_argument(
            f"--share-{kind.replace('_', '-')}",
            type=float,
            help=f"the share of {kind} samples (default {getattr(defaults, kind)})",
        )
    group.add_argument(
        "--attributes",
        type=task_names,  # a comma-separated list, as task lists are
        help="what match and index questions read out (default all)",
    )
    group.add_argument(
        "--short-text",
        action="store_true",
        default=None,
        help="refer_text describes each candidate by the attributes the phrase names only",
    )
    group.add_argument("--decisive", type=task_names, help="e.g. position or position,shape")
    help_texts = {
        "decisive_share": "the share of referring questions that one attribute of --decisive "
        "decides",
        "twins": "the share of those asked beside their twin",
        "same_row": "the share of position near misses that stay within their row",
    }
    for name, text in help_texts.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{text} (default 0)")


def mix_from_args(args: argparse.Namespace) -> ReferringMix | None:
    """The mix the options name, or None; a mix field given without --mix is refused."""
    dests = {
        f.name: ("share_" if f.name in KINDS else "") + f.name
        for f in dataclasses.fields(ReferringMix)
    }
    given = {name: getattr(args, dest) for name, dest in dests.items()}
    given = {name: value for name, value in given.items() if value is not None}
    if args.mix is None:
        if given:
            flags = ", ".join("--" + dests[name].replace("_", "-") for name in given)
            raise ValueError(f"{flags} set a sample mix's fields; add --mix referring")
        return None
    return MIXES[args.mix](**given)
