"""A referring curriculum (rgpt_rt/assets/MODEL_CARD.md): fine-tune on a mix in which matching a
phrase to a region is taught through the model's own answers, with the evaluation's questions
asked alone beside them. Every sample is one of:

    refer_scaffold  'Name the size, colour, shape and position of <region1>.' -> 'the large
                    red circle at the top left', the same for each candidate region, then
                    the referring question about them (what the evaluation asks, alone)
    refer           the referring question alone
    match_scaffold  one attribute read out ('What shape is <region1>?' -> "cross"), then a
                    match question of that attribute about the same region
    match           a match question alone (one attribute, or the package's `match`)
    keep            one question of the single-region tasks (classify, colour, brief,
                    detailed), so that they are not forgotten
    index           one region read out by its number among 2-5 ('Of <region1>, <region2>
                    and <region3>, what shape is Region [2]?' -> "star"): the reverse of
                    naming a region's number, which referring needs
    refer_text      the referring question after a written description of each candidate
                    ('Region [1] is the large red circle at the top left; Region [2] is ...'):
                    referring as text, with no region to match
    copy            a number to copy, with nothing to match ('The mask you want is Region [3]
                    of <region1>, <region2> and <region3>. Answer with Region [x].' ->
                    'Region [3]')
    mixed           a sample of the package's own mix: 1-3 questions of any task (what the
                    shipped model's last phase trained on)

The shares are flags (--share-refer-scaffold 0.2 ...; index, refer_text, copy and mixed default
to 0); --negative-rate sets the share of referring phrases that fit no region (the package's
0.2); --crowded sets the share of those questions that name as many regions as the scene allows,
up to 5 (the package draws 2-5); --decisive-share sets the share of referring questions that one
attribute of --decisive (default position) decides: a near miss in that attribute alone, or a
target that the phrase's other attributes do not single out ('the cross at the bottom left'
among three crosses); --refer-keys limits what referring phrases name (shape: 'the star' only;
colour+shape,shape: 'the red star' or 'the star'), and --short-text has refer_text describe each
candidate by those attributes only ('Region [1] is the star; Region [2] is the heart'). The data
is patched for this run only; nothing in the package changes. Other arguments go to `python -m
rgpt_rt.train` (defaults: vision frozen, seed 2, lr 5e-4, 2 threads, evaluation every half run
on 64 samples per task).

The runs of the model card (c1 from the shape scaffold's rs2, c2 from the mixed rm):

    python scripts/referring_curriculum.py --out runs/c1 --init runs/rs2/final --steps 1000
    python scripts/referring_curriculum.py --out runs/c2 --init runs/rm/final --steps 3000 \
        --share-refer-scaffold 0 --share-refer 0 --share-match-scaffold 0.5 --share-match 0.25 \
        --share-keep 0.25 --checkpoint-every 1000
    (c3: the same from runs/c2/final with --seed 3; c4: the default shares from runs/c3/final,
    --steps 2000 --seed 4 --eval-every 1000)

From the input word embeddings x65 (runs/h1init, `init_variants.py scale-words --factor 65`),
one thread each, --eval-every 1000 --checkpoint-every 500 (sR-sU: --eval-every 500 --seed 3),
every share not named 0:

    sI  --init runs/h1init --steps 3000 --share-keep 0.4 --share-index 0.6
    sR  --init runs/sI/checkpoints/step-00001500/model --steps 3000 --share-refer 0.4
        --share-keep 0.3 --share-index 0.3
    sS  --init runs/sI/final --steps 2000 --refer-keys shape --share-refer 0.5 --share-keep 0.3
        --share-index 0.2
    sT  --init runs/h1/checkpoints/step-00002000/model --steps 2000 --refer-keys shape
        --attributes shape --share-refer 0.4 --share-match 0.2 --share-keep 0.2 --share-index 0.2
    sU  --init runs/sI/final --steps 1500 --share-refer-text 0.5 --share-refer 0.2
        --share-keep 0.2 --share-index 0.1
    sV  --init runs/sI/final --steps 2000 --lr 1e-3 --share-refer-text 0.8 --share-keep 0.2
        --seed 4 --eval-every 1000 --checkpoint-every 250
    sW  --init runs/sI/final --steps 1200 --share-copy 0.5 --share-keep 0.5 --seed 5
        --threads 2 --eval-every 1200 --checkpoint-every 200
    sX  --init runs/sI/final --steps 1000 --refer-keys shape --short-text --share-refer-text 0.7
        --share-keep 0.3 --seed 6 --threads 2 --eval-every 1000 --checkpoint-every 200

With region numbers (connector.region_numbers = 9): `python scripts/init_variants.py
number-regions --init I --out I+n` first, then --init I+n; one thread each, --eval-every 500
(nC, nD: 1000) --checkpoint-every 250, every share not named 0:

    nA  --init runs/h1init+n --steps 2000 --share-refer 0.5 --share-keep 0.3 --share-index 0.2
        --seed 7 (stopped at 1000)
    nB  --init runs/h1/checkpoints/step-00002000/model+n --steps 2000 --refer-keys shape
        --attributes shape --share-refer 0.5 --share-match 0.2 --share-keep 0.3 --seed 8
        (stopped at 1000: runs/nB1000)
    nC  --init runs/nB1000 --steps 3000 --share-refer 0.5 --share-match 0.2 --share-keep 0.3
        --seed 9
    nD  --init runs/nB1000 --steps 3000 --share-refer 0.7 --share-keep 0.3 --seed 10
    nE  --init runs/nD2250 (nD's step 2250) --steps 4000 --share-refer 0.7 --share-mixed 0.1
        --share-keep 0.2 --negative-rate 0.3 --seed 11
    nF  as nE, --init runs/nD/final --lr 1e-3 --seed 12 (stopped at 1000)
    nG  as nE, --init runs/nE/final --steps 3000 --seed 13 --checkpoint-every 500
    nH  --init runs/nE/final --steps 2000 --share-refer 0.75 --share-mixed 0.1 --share-keep 0.15
        --negative-rate 0.4 --seed 14 --checkpoint-every 500 (shipped before pB)
    nI  as nH, --init runs/nH/final --steps 1200 --lr 3e-4 --seed 15 --threads 2
        --eval-every 1200 --checkpoint-every 400

Questions that position decides (--decisive), from pB (rgpt_rt/assets/tiny as shipped on
2026-11-28), as nH with --steps 1500 --warmup-steps 30 --eval-every 1500 --eval-per-task 0
--checkpoint-every 300 and:

    qA  --lr 1.5e-4 --decisive-share 0.3 --seed 41
    qB  --lr 1.5e-4 --decisive position,shape --decisive-share 0.4 --seed 42
    rA  --lr 4e-4 --warmup-steps 50 --decisive-share 0.5 --seed 51
    rB  --lr 2.5e-4 --warmup-steps 50 --decisive-share 0.35 --seed 52
    tA  --init runs/rB/final --lr 1e-4 --decisive-share 0.35 --seed 61
    tB  --init runs/rB/final --lr 1.5e-4 --decisive-share 0.5 --negative-rate 0.3 --seed 62
    uA  --init runs/tB/final --steps 2000 --lr 1e-4 --decisive-share 0.5 --seed 71
        --eval-every 2000 --checkpoint-every 500 (stopped at 1500)

Longer, from pB, as nH with --warmup-steps 30 --eval-per-task 0 --checkpoint-every 500
--decisive-share 0.35 --lr 1e-4 and (vB: every decisive question beside its twin, --twins):

    vA  --steps 4500 --eval-every 4500 --keep-checkpoints 9 --seed 81 (stopped at 2000)
    vB  --steps 4000 --eval-every 4000 --keep-checkpoints 8 --twins 1 --seed 82 (stopped at 2000)

With each region's centroid projected into its embedding (connector.region_positions = 4):
`python scripts/init_variants.py position-regions --init rgpt_rt/assets/tiny --out runs/pBpos
--frequencies 4` first, then as vB with --init runs/pBpos and:

    wA  --steps 2500 --eval-every 2500 --keep-checkpoints 5 --seed 91
    wB  --steps 2000 --lr 2e-4 --eval-every 2000 --keep-checkpoints 4 --seed 92

A deeper decoder: `python scripts/init_variants.py grow --init rgpt_rt/assets/tiny --out
runs/pBgrow --order 0,1,N,2,N,3 --kv-heads 2` (6 layers, the 2 new ones adding nothing yet),
then as vB with --init runs/pBgrow and:

    xA  --steps 1800 --lr 2e-4 --eval-every 1800 --checkpoint-every 300 --keep-checkpoints 6
        --seed 101 (stopped at 1200)

On a GPU (g3, benchmarks/RESULTS.md): four variants from pB through scripts/gpu_finetune.py,
batch 64, 1525 steps each. Then here, position moved within its row (--same-row), from g3's
A-lr5 (cA) and B-t1 (cB), as nH with --steps 3000 --batch-size 16 --warmup-steps 30
--eval-every 3000 --eval-per-task 0 --checkpoint-every 500 --keep-checkpoints 10
--decisive-share 0.5 --twins 0.5 --same-row 0.6 and:

    cA  --init runs/g3-A-lr5/final --lr 1.5e-4 --negative-rate 0.5 --seed 101
    cB  --init runs/g3-B-t1/final --lr 2e-4 --negative-rate 0.45 --seed 102
    cC  --init runs/cA/checkpoints/step-00001000/model --steps 2000 --eval-every 2000
        --checkpoint-every 250 --keep-checkpoints 12 --crowded 0.6 --lr 1.5e-4
        --negative-rate 0.5 --seed 103 (shipped: its checkpoint at step 250)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import rgpt_rt.data.tasks as tasks
import rgpt_rt.train as train
from rgpt_rt.data import shapes
from rgpt_rt.data.samples import RegionSample, Turn

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
DEFAULT_SHARES = (0.2, 0.2, 0.25, 0.15, 0.2, 0.0, 0.0, 0.0, 0.0)
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
# attribute -> (its readout questions, its answer)
READOUTS = {
    "shape": (tasks.CLASSIFY_PARAPHRASES, lambda o: o.shape),
    "colour": (tasks.COLOUR_QUESTIONS, lambda o: o.colour),
    "position": (tasks.POSITION_QUESTIONS, lambda o: o.position),
    "size": (SIZE_QUESTIONS, lambda o: o.size),
}


def full_answer(obj) -> str:
    return f"the {obj.size} {obj.colour} {obj.shape} {tasks.POSITION_PHRASE[obj.position]}"


def written(obj, keys, rng) -> str:
    """A candidate's description for refer_text: all of it, or only the attributes in `keys`
    (those the referring phrase names: 'the star', 'the red one')."""
    if keys is None:
        return full_answer(obj)
    attributes = tasks._attributes(obj)
    return tasks.expression_text({key: attributes[key] for key in keys}, rng)


def row_mates(position: str) -> list[str]:
    """The other positions in `position`'s row of the 3x3 grid: "top" -> top left, top right."""
    row = shapes.POSITIONS.index(position) // 3
    return [p for p in shapes.POSITIONS[3 * row : 3 * row + 3] if p != position]


def in_row(attribute: str, rng) -> bool:
    """Whether this question's position, when position decides, moves within its row alone
    (--same-row); draws nothing while --same-row is 0, so earlier commands sample the same."""
    return attribute == "position" and ARGS.same_row > 0 and rng.random() < ARGS.same_row


def decisive_values(candidates, target, attribute: str, rng) -> dict[str, str] | None:
    """A referring phrase's attribute values in which `attribute` decides: for a target, the
    other values it names fit more than one candidate; for none (target None), a candidate's
    values with `attribute` changed. None when the candidates allow neither."""
    key_sets = [keys for keys in tasks.EXPRESSION_KEYS if attribute in keys and len(keys) > 1]
    for k in rng.permutation(len(key_sets)):
        keys = key_sets[k]
        if target is None:
            base = tasks._attributes(candidates[rng.integers(len(candidates))])
            values = {key: base[key] for key in keys}
            if in_row(attribute, rng):
                mates = row_mates(values["position"])
                values["position"] = mates[rng.integers(len(mates))]
            else:
                values = tasks.near_miss(values, rng, changed=attribute)
            if not any(tasks.matches(c, values) for c in candidates):
                return values
            continue
        values = {key: tasks._attributes(candidates[target])[key] for key in keys}
        fits = sum(tasks.matches(c, values) for c in candidates)
        if fits == 1 and tasks.fits_without(candidates, values, attribute) > 1:
            return values
    return None


def decisive_turn(scene, regions, negative: bool, rng) -> Turn | None:
    """A referring question that one of DECISIVE's attributes decides (decisive_values)."""
    attribute = DECISIVE[rng.integers(len(DECISIVE))]
    picked = tasks.pick_candidates(scene, rng)
    target = None if negative else int(rng.integers(len(picked)))
    values = decisive_values([scene.objects[i] for i in picked], target, attribute, rng)
    if values is None:
        return None
    turn = tasks.refer_question(picked, target, values, regions, rng)
    turn.truth["decided_by"] = attribute
    return turn


def twin_turn(scene, decisive: Turn, regions, rng) -> Turn | None:
    """The decisive question's twin: the same regions and phrase with the deciding attribute
    changed so that the answer changes (a near miss's twin fits one region; a target's fits
    another region or none). None when no value of that attribute does so."""
    truth = decisive.truth
    picked, target, values = truth["objects"], truth["target"], truth["values"]
    candidates = [scene.objects[i] for i in picked]
    attribute = truth["decided_by"]
    options = [v for v in tasks.ATTRIBUTES[attribute] if v != values[attribute]]
    options = [options[k] for k in rng.permutation(len(options))]
    if in_row(attribute, rng):  # the same row's positions first
        mates = row_mates(values[attribute])
        options.sort(key=lambda v: v not in mates)
    for option in options:
        twin = {**values, attribute: option}
        fits = [i for i, c in enumerate(candidates) if tasks.matches(c, twin)]
        if len(fits) == 1 and fits[0] != target:
            return tasks.refer_question(picked, fits[0], twin, regions, rng)
        if not fits and target is not None:
            return tasks.refer_question(picked, None, twin, regions, rng)
    return None


def refer_turns(world, scene, regions, rng, twins: float = 0.0):
    """A referring question about `scene`, or about another scene where it has none;
    --decisive-share of them decided by one attribute (decisive_turn), and a share `twins` of
    those asked beside their twin (twin_turn), in random order."""
    decisive = ARGS.decisive_share > 0 and rng.random() < ARGS.decisive_share
    # drawn once: a positive question that an attribute decides needs more tries of a scene
    negative = decisive and rng.random() < tasks.NEGATIVE_RATE
    paired = decisive and twins > 0 and rng.random() < twins
    while True:
        if decisive:
            turn = decisive_turn(scene, regions, negative, rng)
        else:
            turn = tasks._refer_turn(scene, regions, rng)
        twin = turn and paired and twin_turn(scene, turn, regions, rng)
        if turn is not None and (twin or not paired):
            turns = [turn, twin] if twin else [turn]
            return scene, regions, [turns[i] for i in rng.permutation(len(turns))]
        scene, regions = world.scene(rng), tasks._Regions()


def index_turn(scene, regions, attribute: str, rng) -> Turn:
    """'Of <region1>, <region2> and <region3>, what shape is Region [2]?' -> "star"."""
    picked = tasks.pick_candidates(scene, rng)
    for object_index in picked:
        regions.name(object_index)
    k = int(rng.integers(len(picked)))
    question = tasks._pick(rng, INDEX_QUESTIONS).format(
        regions=tasks.region_list(len(picked)), attribute=attribute, k=k + 1
    )
    answer = READOUTS[attribute][1](scene.objects[picked[k]])
    return Turn(question, answer, "index", {"objects": picked, "target": k})


def curriculum_sample(world, index: int, shares, attributes) -> RegionSample:
    rng = np.random.default_rng([world.seed, 97, index])
    kind = KINDS[rng.choice(len(KINDS), p=shares)]
    if kind == "keep":
        return world.sample(index, tasks=KEEP_TASKS, turns=1)
    if kind == "mixed":
        return world.sample(index)
    scene, regions = world.scene(rng), tasks._Regions()
    if kind in ("index", "copy"):
        attribute = attributes[rng.integers(len(attributes))]
        turn = index_turn(scene, regions, attribute, rng)
        if kind == "copy":
            count, k = len(turn.truth["objects"]), turn.truth["target"]
            turn.question = (
                f"The mask you want is Region [{k + 1}] of {tasks.region_list(count)}. "
                "Answer with Region [x]."
            )
            turn.answer, turn.task = tasks.refer_answer(k), "copy"
        return world._finish(scene, regions, [turn], rng)
    if kind in ("refer", "refer_scaffold", "refer_text"):
        twins = ARGS.twins if kind == "refer" else 0.0
        scene, regions, refers = refer_turns(world, scene, regions, rng, twins)
        if kind == "refer":
            return world._finish(scene, regions, refers, rng)
        refer = refers[0]
        if kind == "refer_text":
            objects = [scene.objects[i] for i in refer.truth["objects"]]
            keys = refer.truth["values"] if ARGS.short_text else None
            text = "; ".join(
                f"Region [{k}] is {written(o, keys, rng)}" for k, o in enumerate(objects, 1)
            )
            refer.question = f"{text}. {refer.question}"
            return world._finish(scene, regions, [refer], rng)
        turns = []
        for number, index_ in enumerate(refer.truth["objects"], start=1):
            question = tasks._pick(rng, FULL_QUESTIONS).format(r=f"<region{number}>")
            turns.append(Turn(question, full_answer(scene.objects[index_]), "full", {}))
        return world._finish(scene, regions, [*turns, refer], rng)
    attribute = attributes[rng.integers(len(attributes))]
    task = "match" if kind == "match" and rng.random() < 0.3 else f"match_{attribute}"
    match = tasks._match_turn(task, scene, regions, rng)
    if kind == "match":
        return world._finish(scene, regions, [match], rng)
    wordings, answer = READOUTS[attribute]
    obj = scene.objects[match.truth["object"]]
    first = Turn(tasks._pick(rng, wordings).format(r="<region1>"), answer(obj), attribute, {})
    return world._finish(scene, regions, [first, match], rng)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for kind, share in zip(KINDS, DEFAULT_SHARES):
        parser.add_argument(f"--share-{kind.replace('_', '-')}", type=float, default=share)
    parser.add_argument("--attributes", default="shape,colour,size,position")
    parser.add_argument(
        "--refer-keys",
        help="the attribute sets of referring phrases, e.g. shape or shape,colour+shape "
        "(default: the package's EXPRESSION_KEYS)",
    )
    parser.add_argument(
        "--short-text",
        action="store_true",
        help="refer_text describes each candidate by the attributes the phrase names only",
    )
    parser.add_argument(
        "--negative-rate",
        type=float,
        help="the share of referring phrases that fit none of the regions (package: 0.2)",
    )
    parser.add_argument(
        "--crowded",
        type=float,
        default=0.0,
        help="the share of questions over several regions that name as many as the scene "
        "allows (up to 5) rather than 2-5 at random",
    )
    parser.add_argument(
        "--decisive-share",
        type=float,
        default=0.0,
        help="the share of referring questions that one attribute of --decisive decides: a "
        "near miss in it, or a target the other named attributes do not single out",
    )
    parser.add_argument("--decisive", default="position", help="e.g. position or position,shape")
    parser.add_argument(
        "--twins",
        type=float,
        default=0.0,
        help="the share of decisive questions (referring alone) asked beside their twin: the "
        "same regions and phrase with the deciding attribute changed so that the answer does",
    )
    parser.add_argument(
        "--same-row",
        type=float,
        default=0.0,
        help="the share of near misses in position whose phrase moves the position within its "
        "row of the grid ('on the left' for an object on the right), and of twins that try "
        "the row's other positions first",
    )
    parser.add_argument("--steps", type=int, default=1000)
    return parser.parse_known_args(argv)


ARGS, REST = parse(sys.argv[1:])
SHARES = np.array([getattr(ARGS, f"share_{kind}") for kind in KINDS])
ATTRIBUTES = ARGS.attributes.split(",")
if SHARES.min() < 0 or SHARES.sum() <= 0 or set(ATTRIBUTES) - set(READOUTS):
    raise SystemExit(f"shares must be >= 0 with a positive sum; attributes some of {READOUTS}")
if ARGS.negative_rate is not None:
    if not 0 <= ARGS.negative_rate <= 1:
        raise SystemExit("--negative-rate must be between 0 and 1")
    tasks.NEGATIVE_RATE = ARGS.negative_rate
if not 0 <= ARGS.crowded <= 1:
    raise SystemExit("--crowded must be between 0 and 1")
if ARGS.crowded:
    _package_candidates = tasks.pick_candidates

    def _crowded_candidates(scene, rng: np.random.Generator) -> list[int]:
        if rng.random() < ARGS.crowded:
            return [int(i) for i in rng.permutation(len(scene.objects))[: tasks.MAX_CANDIDATES]]
        return _package_candidates(scene, rng)

    tasks.pick_candidates = _crowded_candidates
DECISIVE = ARGS.decisive.split(",")
if not 0 <= ARGS.decisive_share <= 1 or set(DECISIVE) - set(READOUTS):
    raise SystemExit(f"--decisive-share must be between 0 and 1; --decisive some of {READOUTS}")
for name in ("twins", "same_row"):
    if not 0 <= getattr(ARGS, name) <= 1:
        raise SystemExit(f"--{name.replace('_', '-')} must be between 0 and 1")
if ARGS.refer_keys:
    REFER_KEYS = tuple(tuple(key.split("+")) for key in ARGS.refer_keys.split(","))
    if {name for key in REFER_KEYS for name in key} - set(READOUTS):
        raise SystemExit(f"--refer-keys takes sets of {sorted(READOUTS)} joined by '+'")
    tasks.EXPRESSION_KEYS = REFER_KEYS


def _sample(self, index: int, step: int) -> RegionSample:
    return curriculum_sample(self.world, index, SHARES / SHARES.sum(), ATTRIBUTES)


train.DataSource.sample = _sample

if __name__ == "__main__":
    defaults = {"--freeze-vision": None, "--seed": "2", "--lr": "5e-4", "--warmup-steps": "50",
                "--eval-per-task": "64", "--threads": "2", "--data-workers": "0"}  # fmt: skip
    phases = "refer,match," + ",".join(f"match_{a}" for a in ATTRIBUTES) + ",classify,colour"
    command = [*REST, "--steps", str(ARGS.steps), "--phases", phases]
    command += ["--curriculum", str(ARGS.steps), "--no-progress"]
    defaults["--eval-every"] = str(max(1, ARGS.steps // 2))
    for flag, value in defaults.items():
        if flag not in REST:
            command += [flag] if value is None else [flag, value]
    sys.exit(train.main(command))
