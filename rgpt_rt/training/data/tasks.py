"""Tasks on the shapes world: questions about regions, with answers that follow from the scene.

    world = ShapesWorld(image_size=96, seed=0)
    sample = world.sample(index)             # training: 1-3 turns about one scene
    sample = world.task_sample(index, "refer")   # evaluation: one turn of one task

Tasks (TASKS), each asked with the paper's prompt or a paraphrase:
    classify   the shape name                                    "circle"
    brief      size, colour and shape                            "a large red circle"
    detailed   + position and the nearest neighbour              "A large red circle at the top left, to the left of a small blue star."
    refer      which of 2-5 regions fits a phrase                "Region [2]" / "No corresponding options found."
    colour     What color is <region1>?                          "red"
    above      Is <region1> above <region2>?                     "yes" / "no"
    larger     Which is larger, <region1> or <region2>?          "Region [1]"
    position   Where is <region1> in the image?                  "top right" (curriculum only)
    match      Is <region1> "the red circle"?                    "yes" / "no" (curriculum only)
    match_colour, match_shape, match_size, match_position: the same, the phrase naming one
               attribute: "the red one", "the star", "the large one", "the shape at the top"
Regions are given as masks, and sometimes (BOX_RATE) as boxes: rectangle masks around the
object's visible pixels, used only where the object fills most of the objects in its box. The
world's fields set how referring questions are drawn (how often no region fits, how many
regions they name, which attributes their phrases name); phrases.py writes the answers and
phrases.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rgpt_rt.inputs import box_to_mask
from rgpt_rt.prompts import (
    NO_MATCH_ANSWER,
    SYSTEM_PROMPT,
    classify_prompt,
    describe_prompt,
    refer_answer,
    refer_prompt,
    region_list,
)
from rgpt_rt.training.data.phrases import (
    EXPRESSION_KEYS,
    absent_description,
    brief_answer,
    detailed_answer,
    expression_text,
    near_miss,
    nearest,
    object_values,
    relation,
    unique_description,
)
from rgpt_rt.training.data.samples import RegionSample, Turn
from rgpt_rt.training.data.shapes import (
    ATTRIBUTES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    make_scene,
    sample_object,
)

# the match questions whose phrase names one attribute (match_colour: "the red one")
ONE_ATTRIBUTE_MATCHES = ("match_colour", "match_shape", "match_size", "match_position")
# (new tasks go last: a task's held-out samples are drawn from its index in TASKS)
TASKS = (
    "classify",
    "brief",
    "detailed",
    "refer",
    "colour",
    "above",
    "larger",
    "position",
    "match",
    *ONE_ATTRIBUTE_MATCHES,
)
TASK_WEIGHTS = {
    "classify": 0.14,
    "brief": 0.1,
    "detailed": 0.2,
    "refer": 0.26,
    "colour": 0.1,
    "above": 0.1,
    "larger": 0.1,
    # "Where is <region1>?" -> "top right": asked only where a curriculum phase names it (a
    # weight of 0 leaves the mixed samples of the other tasks exactly as they were)
    "position": 0.0,
    # 'Is <region1> "the red circle"?' -> "yes": one region against a referring phrase, a step
    # toward picking the one of several regions that fits (docs/training.md)
    "match": 0.0,
    # its first steps: phrases of one attribute ("the red one", "the star", "the large one",
    # "the shape at the top")
    **dict.fromkeys(ONE_ATTRIBUTE_MATCHES, 0.0),
}
# a task's weight where a curriculum phase names it
NAMED_TASK_WEIGHTS = {
    "position": 0.2,
    "match": 0.3,
    **dict.fromkeys(ONE_ATTRIBUTE_MATCHES, 0.15),
}
VOCABULARY = "shape"  # classify_prompt: "Answer the question using shape category names."
BOX_RATE = 0.2
NEGATIVE_RATE = 0.2  # referring expressions that fit none of the regions (ShapesWorld's default)
MAX_CANDIDATES = 5  # the most regions a question over several regions names
MATCH_RATE = 0.5  # match questions whose phrase fits the region
ABOVE_MARGIN = 0.12  # `above` is asked only when the centres differ by this much of the image
TURN_COUNTS = (1, 2, 3)
# A scene on which no task of a sample's list can be asked after this many tries is replaced
# (e.g. two objects of one size for `larger`); after this many scenes the list is refused.
TRIES_PER_SCENE = 100
SCENES_PER_SAMPLE = 100
TURN_WEIGHTS = (0.6, 0.3, 0.1)
PAPER_PROMPT_RATE = 0.5  # how often a task is asked with the paper's own wording
SIZE_RANK = {name: rank for rank, name in enumerate(SIZES)}

CLASSIFY_PARAPHRASES = (
    "What shape is {r}?",
    "Which shape does {r} show?",
    "Name the shape in {r}.",
    "What kind of shape is {r}? Answer with one word.",
)
BRIEF_PARAPHRASES = (
    "Briefly describe {r}.",
    "What is {r}? Answer in a few words.",
    "Describe {r} in a few words.",
)
DETAILED_PARAPHRASES = (
    "Describe {r} in detail.",
    "Give a detailed description of {r}.",
    "Tell me about the object at {r}: what it is, what it looks like and where it is.",
)
COLOUR_QUESTIONS = (
    "What color is {r}?",
    "What is the colour of {r}?",
    "Which color does {r} have?",
    "Tell me the color of {r}.",
)
# (template, True when a "yes" means the first region is higher)
ABOVE_QUESTIONS = (
    ("Is {a} above {b}?", True),
    ("Is {a} below {b}?", False),
    ("Is {a} higher in the image than {b}?", True),
    ("Is {a} lower in the image than {b}?", False),
)
POSITION_QUESTIONS = (
    "Where is {r} in the image?",
    "Where is {r}?",
    "In which part of the image is {r}?",
)
# (template, True when the answer is the larger region)
LARGER_QUESTIONS = (
    ("Which is larger, {a} or {b}?", True),
    ("Which is bigger, {a} or {b}?", True),
    ("Which is smaller, {a} or {b}?", False),
    ("Which of {a} and {b} is larger?", True),
)
REFER_PARAPHRASES = (
    'Which of {regions} is "{expression}"? Answer with Region [x].',
    'Among {regions}, find "{expression}". Answer the question using the template Region [x].',
)
MATCH_QUESTIONS = (
    'Is {r} "{expression}"? Answer yes or no.',
    'Does "{expression}" describe {r}? Answer yes or no.',
    "Is {r} {expression}? Answer yes or no.",
)
# The attribute sets of each match task's phrases: a phrase of one attribute first (a model
# learns to match "the red one" long before "the large red circle at the top", docs/training.md).
MATCH_KEYS = {
    "match": EXPRESSION_KEYS,
    **{task: ((task.removeprefix("match_"),),) for task in ONE_ATTRIBUTE_MATCHES},
}
ONE_REGION_TASKS = ("classify", "brief", "detailed", "colour", "position")


# --- questions ---------------------------------------------------------------------------------


def choose(rng: np.random.Generator, options):
    """One of `options`, drawn uniformly."""
    return options[rng.integers(len(options))]


def _paper_or(rng: np.random.Generator, paper: str, paraphrases, name: str) -> str:
    if rng.random() < PAPER_PROMPT_RATE:
        return paper
    return choose(rng, paraphrases).format(r=name)


class Regions:
    """The masks of one sample: objects get mask numbers in order of first mention."""

    def __init__(self) -> None:
        self.objects: list[int] = []

    def name(self, index: int) -> str:
        if index not in self.objects:
            self.objects.append(index)
        return f"<region{self.objects.index(index) + 1}>"

    def number(self, index: int) -> int:
        return self.objects.index(index) + 1


def one_region_turn(task: str, scene: Scene, regions: Regions, rng: np.random.Generator) -> Turn:
    """A question of one of ONE_REGION_TASKS about a random object of `scene`."""
    objects = scene.objects
    index = int(rng.integers(len(objects)))
    obj = objects[index]
    name = regions.name(index)
    number = regions.number(index)
    truth = {"object": index, **object_values(obj)}
    if task == "classify":
        question = _paper_or(rng, classify_prompt(VOCABULARY, number), CLASSIFY_PARAPHRASES, name)
        return Turn(question, obj.shape, task, truth)
    if task == "brief":
        question = _paper_or(
            rng, describe_prompt(detailed=False, region=number), BRIEF_PARAPHRASES, name
        )
        return Turn(question, brief_answer(obj), task, truth)
    if task == "detailed":
        question = _paper_or(
            rng, describe_prompt(detailed=True, region=number), DETAILED_PARAPHRASES, name
        )
        other = nearest(objects, index)
        truth.update(neighbour=objects.index(other), relation=relation(obj, other))
        return Turn(question, detailed_answer(objects, index), task, truth)
    if task == "position":
        question = choose(rng, POSITION_QUESTIONS).format(r=name)
        return Turn(question, obj.position, task, truth)
    return Turn(choose(rng, COLOUR_QUESTIONS).format(r=name), obj.colour, task, truth)


def pair_turn(task: str, scene: Scene, regions: Regions, rng: np.random.Generator) -> Turn | None:
    """An `above` or `larger` question about two objects of `scene`, or None when no pair
    fits (no two objects far enough apart vertically, or of different sizes)."""
    objects = scene.objects
    count = len(objects)
    pairs = [(a, b) for a in range(count) for b in range(count) if a != b]
    if task == "above":
        limit = ABOVE_MARGIN * scene.size
        pairs = [(a, b) for a, b in pairs if abs(objects[a].cy - objects[b].cy) >= limit]
    elif task == "larger":
        pairs = [(a, b) for a, b in pairs if objects[a].size != objects[b].size]
    else:
        raise ValueError(f"task {task!r} is unknown; use one of {TASKS}")
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    first_name, second_name = regions.name(a), regions.name(b)
    truth = {"objects": [a, b], "numbers": [regions.number(a), regions.number(b)]}
    if task == "above":
        template, yes_if_higher = choose(rng, ABOVE_QUESTIONS)
        higher = objects[a].cy < objects[b].cy
        answer = "yes" if higher == yes_if_higher else "no"
        return Turn(template.format(a=first_name, b=second_name), answer, task, truth)
    template, wants_larger = choose(rng, LARGER_QUESTIONS)
    a_larger = SIZE_RANK[objects[a].size] > SIZE_RANK[objects[b].size]
    chosen = a if a_larger == wants_larger else b
    answer = refer_answer(regions.number(chosen) - 1)
    return Turn(template.format(a=first_name, b=second_name), answer, task, truth)


def refer_question(
    picked: list[int],
    target: int | None,
    values: dict[str, str],
    regions: Regions,
    rng: np.random.Generator,
) -> Turn:
    """The referring turn naming the objects `picked` as regions, asking for the one that
    `values` describes: picked[target], or none (target None)."""
    for index in picked:
        regions.name(index)
    expression = expression_text(values, rng)
    if rng.random() < PAPER_PROMPT_RATE:
        question = refer_prompt(expression, len(picked))
    else:
        question = choose(rng, REFER_PARAPHRASES).format(
            regions=region_list(len(picked)), expression=expression
        )
    truth = {"objects": picked, "target": target, "values": values}
    return Turn(question, refer_answer(target), "refer", truth)


def match_turn(task: str, scene: Scene, regions: Regions, rng: np.random.Generator) -> Turn:
    """'Is <region1> "the large red circle"?' about one object: its own description (MATCH_RATE
    of the time) or a near miss of it, naming the attributes of one of MATCH_KEYS[task]."""
    index = int(rng.integers(len(scene.objects)))
    keys = MATCH_KEYS[task][rng.integers(len(MATCH_KEYS[task]))]
    values = {key: object_values(scene.objects[index])[key] for key in keys}
    fits = bool(rng.random() < MATCH_RATE)
    if not fits:
        values = near_miss(values, rng)
    expression = expression_text(values, rng)
    question = choose(rng, MATCH_QUESTIONS).format(r=regions.name(index), expression=expression)
    truth = {"object": index, "values": values}
    return Turn(question, "yes" if fits else "no", task, truth)


def task_names(text: str) -> tuple[str, ...]:
    """'refer, match_shape' -> ("refer", "match_shape"): a comma-separated list of tasks."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


# --- samples -----------------------------------------------------------------------------------


def _region_masks(
    scene: Scene, objects: list[int], rng: np.random.Generator, box_rate: float
) -> tuple[list[np.ndarray], list[bool]]:
    masks, boxes = [], []
    for index in objects:
        mask = scene.mask(index)
        as_box = False
        if rng.random() < box_rate:
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            inside = scene.labels[box[1] : box[3], box[0] : box[2]]
            others = int(((inside >= 0) & (inside != index)).sum())
            if int((inside == index).sum()) >= 2 * others:
                mask = box_to_mask(box, mask.shape)
                as_box = True
        masks.append(mask)
        boxes.append(as_box)
    return masks, boxes


def _rate(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be between 0 and 1; got {value}")


@dataclass
class ShapesWorld:
    """Samples of the shapes world. Sample `index` depends only on (seed, index) and the
    fields, so a training run can resume at any step and a held-out split is another seed."""

    image_size: int
    seed: int = 0
    box_rate: float = BOX_RATE
    # referring questions: the share whose phrase fits none of the regions, the share of
    # questions over several regions that name as many as the scene has (up to
    # MAX_CANDIDATES; the others draw 2 to that many), and the attribute sets their phrases
    # name ((("shape",),): 'the star' only)
    negative_rate: float = NEGATIVE_RATE
    crowded: float = 0.0
    refer_keys: tuple[tuple[str, ...], ...] = EXPRESSION_KEYS

    def __post_init__(self) -> None:
        for name in ("box_rate", "negative_rate", "crowded"):
            _rate(name, getattr(self, name))
        self.refer_keys = tuple(tuple(keys) for keys in self.refer_keys)
        unknown = {name for keys in self.refer_keys for name in keys} - set(ATTRIBUTES)
        if not self.refer_keys or not all(self.refer_keys) or unknown:
            raise ValueError(
                f"refer_keys takes sets of {sorted(ATTRIBUTES)}, e.g. (('shape',), "
                f"('colour', 'shape')); got {self.refer_keys}"
            )

    def scene(self, rng: np.random.Generator) -> Scene:
        return make_scene(rng, self.image_size)

    def pick_candidates(self, scene: Scene, rng: np.random.Generator) -> list[int]:
        """The objects a question about several regions names, in random order: as many as
        the scene has up to MAX_CANDIDATES (a share `crowded` of the time), else 2 to that
        many. Draws nothing for `crowded` while it is 0."""
        count = len(scene.objects)
        if self.crowded and rng.random() < self.crowded:
            return [int(i) for i in rng.permutation(count)[:MAX_CANDIDATES]]
        most = min(count, MAX_CANDIDATES)
        return [int(i) for i in rng.permutation(count)[: int(rng.integers(2, most + 1))]]

    def refer_turn(self, scene: Scene, regions: Regions, rng: np.random.Generator) -> Turn | None:
        """A referring question about `scene`, or None when no phrase fits the drawn case."""
        picked = self.pick_candidates(scene, rng)
        candidates = [scene.objects[i] for i in picked]
        negative = rng.random() < self.negative_rate
        target = None if negative else int(rng.integers(len(picked)))
        if target is None:
            values = absent_description(candidates, rng, self.refer_keys)
        else:
            values = unique_description(candidates, target, rng, self.refer_keys)
        if values is None:
            return None
        return refer_question(picked, target, values, regions, rng)

    def turn(
        self, task: str, scene: Scene, regions: Regions, rng: np.random.Generator, first: bool
    ) -> Turn | None:
        """One question and answer of `task` about `scene`, or None when the scene cannot pose
        it (e.g. no two objects far enough apart vertically; refer only as the first)."""
        if task == "refer":
            return self.refer_turn(scene, regions, rng) if first else None
        if task in MATCH_KEYS:
            return match_turn(task, scene, regions, rng)
        if task in ONE_REGION_TASKS:
            return one_region_turn(task, scene, regions, rng)
        return pair_turn(task, scene, regions, rng)

    def _ask(
        self,
        scene: Scene,
        names: list[str],
        weights: np.ndarray,
        count: int,
        rng: np.random.Generator,
    ) -> tuple[Regions, list[Turn]] | None:
        """`count` turns about `scene`, each of a task drawn from `names` by `weights`; None
        once TRIES_PER_SCENE draws could not be asked."""
        regions, turns, failures = Regions(), [], 0
        while len(turns) < count:
            if failures == TRIES_PER_SCENE:
                return None
            task = names[rng.choice(len(names), p=weights)]
            turn = self.turn(task, scene, regions, rng, first=not turns)
            if turn is None:
                failures += 1
            else:
                turns.append(turn)
        return regions, turns

    def sample(
        self, index: int, tasks: tuple[str, ...] | None = None, turns: int | None = None
    ) -> RegionSample:
        """A training sample: 1 to 3 turns about one scene, of any task; or, for a curriculum,
        `turns` turns of the given `tasks` only."""
        names = list(tasks or TASK_WEIGHTS)
        unknown = [name for name in names if name not in TASKS]
        if unknown:
            raise ValueError(f"tasks {unknown} are unknown; use some of {TASKS}")
        if turns is not None and turns > 1 and names == ["refer"]:
            raise ValueError(
                "refer is asked only as a sample's first question; "
                "give other tasks for the later turns, or turns=1"
            )
        rng = np.random.default_rng([self.seed, index])
        scene = self.scene(rng)
        turns_wanted = int(rng.choice(TURN_COUNTS, p=TURN_WEIGHTS)) if turns is None else turns
        named = NAMED_TASK_WEIGHTS if tasks else {}
        weights = np.array([named.get(name, TASK_WEIGHTS[name]) for name in names])
        for scenes in range(1, SCENES_PER_SAMPLE + 1):
            asked = self._ask(scene, names, weights / weights.sum(), turns_wanted, rng)
            if asked is not None:
                return self.finish(scene, *asked, rng)
            if scenes < SCENES_PER_SAMPLE:  # none of `names` fits this scene: another one
                scene = self.scene(rng)
        raise RuntimeError(f"no scene of {scenes} could be asked {turns_wanted} turn(s) of {names}")

    def task_sample(self, index: int, task: str) -> RegionSample:
        """One turn of `task` (evaluation)."""
        if task not in TASKS:
            raise ValueError(f"task {task!r} is unknown; use one of {TASKS}")
        rng = np.random.default_rng([self.seed, TASKS.index(task) + 1, index])
        while True:
            scene = self.scene(rng)
            regions = Regions()
            turn = self.turn(task, scene, regions, rng, first=True)
            if turn is not None:
                return self.finish(scene, regions, [turn], rng)

    def finish(
        self, scene: Scene, regions: Regions, turns: list[Turn], rng: np.random.Generator
    ) -> RegionSample:
        """The sample of `turns` about `scene`: the masks (or boxes) of the regions they name."""
        masks, boxes = _region_masks(scene, regions.objects, rng, self.box_rate)
        for turn in turns:
            turn.truth["scene"] = scene  # the ground truth the answers were made from
            turn.truth["region_objects"] = list(regions.objects)  # object of each mask
        return RegionSample(image=scene.image, masks=masks, turns=turns, boxes=boxes)


def tokenizer_corpus(count: int = 4000, seed: int = 0) -> Iterator[str]:
    """Text of the world for training its tokenizer: the system prompt and every question
    template (repeated, so that BPE merges their words as it merges the answers'), and the
    answers and phrases of `count` random objects (no drawing needed)."""
    rng = np.random.default_rng([seed, 7])
    fixed = [SYSTEM_PROMPT, NO_MATCH_ANSWER, classify_prompt(VOCABULARY)]
    fixed += [describe_prompt(detailed=True), describe_prompt(detailed=False)]
    fixed += [refer_prompt("the red star", n) + " " + refer_answer(n - 1) for n in range(1, 6)]
    fixed += CLASSIFY_PARAPHRASES + BRIEF_PARAPHRASES + DETAILED_PARAPHRASES + COLOUR_QUESTIONS
    fixed += [t for t, _ in ABOVE_QUESTIONS + LARGER_QUESTIONS] + list(REFER_PARAPHRASES)
    fixed.append(" ".join(SHAPES + COLOURS + SIZES + POSITIONS + ("yes", "no")))
    for _ in range(20):
        yield from fixed
    for _ in range(count):
        objects = [sample_object(rng, 96) for _ in range(3)]
        yield detailed_answer(objects, 0)
        yield brief_answer(objects[1])
        values = {k: v for k, v in object_values(objects[2]).items() if rng.random() < 0.5}
        yield expression_text(values or {"shape": objects[2].shape}, rng)
