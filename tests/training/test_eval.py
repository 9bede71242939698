"""The evaluator: the embedded default model keeps its measured held-out accuracy with a stated
margin, the quick subset reports every task, batched answers are the reference pipeline's
answers, scoring reads what it should, and referring is reported by what decides each question."""

import json

import pytest

from rgpt_rt import default_checkpoint
from rgpt_rt.model import RGPT
from rgpt_rt.training.data.phrases import refer_decider
from rgpt_rt.training.data.samples import Turn
from rgpt_rt.training.data.shapes import ShapeObject
from rgpt_rt.training.eval import (
    FULL_PER_TASK,
    QUICK_PER_TASK,
    THRESHOLDS,
    answer_batch,
    evaluate_shapes,
    main,
    parse_description,
    score,
    shapes_eval_samples,
)


@pytest.fixture(scope="module")
def shipped():
    return RGPT.from_pretrained(default_checkpoint()).eval()


def test_the_default_checkpoint_is_the_embedded_tiny_model():
    folder = default_checkpoint()
    assert folder.name == "tiny" and (folder / "rgpt.safetensors").is_file()
    assert (folder.parent / "MODEL_CARD.md").is_file()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 25 * 2**20


@pytest.fixture(scope="module")
def quick_eval(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "metrics.json"
    status = main(["--quick", "--threads", "1", "--json", str(path)])
    return status, json.loads(path.read_text())


@pytest.mark.slow
def test_quick_eval_reports_every_task_of_the_shipped_model(quick_eval):
    status, metrics = quick_eval
    assert metrics["per_task"] == QUICK_PER_TASK
    assert set(THRESHOLDS) <= set(metrics["metrics"])
    assert status == (0 if metrics["passed"] else 1)


@pytest.mark.slow
def test_quick_eval_reports_referring_by_what_decides_it(quick_eval):
    _, metrics = quick_eval
    breakdown = metrics["refer_by_decider"]
    assert sum(counts["total"] for counts in breakdown.values()) == QUICK_PER_TASK
    right = sum(counts["correct"] for counts in breakdown.values())
    assert right == round(metrics["metrics"]["refer"] * QUICK_PER_TASK)


def test_referring_questions_are_told_apart_by_what_decides_them():
    def obj(shape, colour, size, position):
        return ShapeObject(shape, colour, size, position, 0.0, 0.0, 10.0, 0.0, (0, 0, 0))

    candidates = [
        obj("circle", "red", "small", "top left"),
        obj("circle", "red", "small", "bottom"),
        obj("star", "blue", "large", "center"),
    ]
    cases = [
        ({"shape": "circle", "position": "top left"}, 0, "position decides"),
        ({"shape": "circle", "position": "center"}, None, "near miss in position"),
        ({"colour": "blue"}, 2, "colour decides"),
        ({"shape": "star", "colour": "blue"}, 2, "any attribute"),
        ({"shape": "hexagon"}, None, "near miss in shape"),
        ({"shape": "hexagon", "colour": "green"}, None, "far miss"),
    ]
    for values, target, expected in cases:
        assert refer_decider(candidates, values, target) == expected, values


def test_an_evaluation_of_chosen_tasks_reports_those_only(tmp_path):
    path = tmp_path / "metrics.json"
    main(
        ["--tasks", "colour,match_shape", "--per-task", "2", "--threads", "1", "--json", str(path)]
    )
    assert set(json.loads(path.read_text())["metrics"]) == {"colour", "match_shape"}
    with pytest.raises(SystemExit, match=r"--tasks: \['rhyme'\] unknown"):
        main(["--tasks", "colour,rhyme"])


# What the shipped model answers right of the held-out split's 200 per task (seed 1; measured
# on the CPU, torch 2.13, one thread): classify 192, colour 199, refer 192, detailed 185. The
# quick subset's 24 sit right at THRESHOLDS (refer 22 and colour 23 of 24 where 22 and 23 are
# needed), so a test on it flips with any one answer; the whole split is asserted instead. With
# every weight of the model times (1 + 0.01 N(0, 1)), three draws, at most 1 of these 800
# answers changed; each floor is the measured count less 4 answers (2 points), four times that,
# so a change in numerics leaves the test alone while a loss of 2 points in a task fails it.
# (Whether the model meets THRESHOLDS, classify by 2 answers, is `python -m
# rgpt_rt.training.eval`'s exit status; a new shipped model needs these counts measured again.)
MEASURED = {"classify": 192, "colour": 199, "refer": 192, "detailed": 185}
MARGIN = 4


@pytest.mark.slow
def test_the_shipped_model_keeps_its_held_out_accuracy_on_the_whole_split(shipped):
    results = evaluate_shapes(shipped, FULL_PER_TASK, tasks=list(MEASURED))
    right = {task: results[task].correct for task in MEASURED}
    assert all(results[task].total == FULL_PER_TASK for task in MEASURED)
    floors = {task: count - MARGIN for task, count in MEASURED.items()}
    assert all(right[task] >= floors[task] for task in MEASURED), (right, floors)


def test_batched_answers_are_the_reference_answers(shipped):
    samples = shapes_eval_samples(shipped.config.vision.image_size, per_task=2, seed=5)
    batched = answer_batch(shipped, samples)
    for sample, text in zip(samples, batched):
        question = sample.turns[0].question
        assert text == shipped.answer(sample.image, sample.masks, question, max_new_tokens=40)


def test_descriptions_are_read_clause_by_clause():
    said = parse_description(
        "A large red circle at the top left, to the left of a small blue star."
    )
    assert said == {"colour": "red", "shape": "circle", "position": "top left"}
    assert parse_description("a blue star at the top")["position"] == "top"
    truth = {"colour": "red", "shape": "circle", "position": "top left"}
    turn = Turn("q", "A large red circle at the top left, above a white ring.", "detailed", truth)
    assert score(turn, "A small red circle at the top left, above a black star.") == {
        "correct": True,
        "exact": False,
    }
    assert not score(turn, "A large red circle at the top, above a white ring.")["correct"]
    assert score(Turn("q", "Region [2]", "refer"), " Region [2]. ")["correct"]
    assert not score(Turn("q", "Region [2]", "refer"), "Region [1]")["correct"]


def test_rgpt_rt_eval_hands_every_argument_to_the_evaluator(tmp_path):
    from rgpt_rt.cli import main as rgpt_rt

    path = tmp_path / "metrics.json"
    args = ["eval", "--tasks", "colour", "--per-task", "1", "--threads", "1", "--json", str(path)]
    assert rgpt_rt(args) == 0
    assert set(json.loads(path.read_text())["metrics"]) == {"colour"}
