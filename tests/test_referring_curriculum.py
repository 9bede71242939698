"""scripts/referring_curriculum.py's samples follow from the scene: an index question's answer is
the asked attribute of the region with that number, refer_text writes each candidate's
description before a question its answer fits, copy asks for the number it states, mixed
samples are the package's own, --refer-keys limits what referring phrases name,
--negative-rate how often none fits, --crowded how often they name all the regions they can
--decisive-share how often one attribute decides, --twins how often such a question comes
beside its twin and --same-row how often a position near miss stays in the object's row."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

import rgpt_rt.data.tasks as tasks
import rgpt_rt.train as train
from rgpt_rt.data import shapes
from rgpt_rt.data.tasks import ShapesWorld

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def load_script(monkeypatch):
    """Imports the script with a command line of its own (it reads argv when imported). What
    it patches, the trainer's data and the referring phrases, is put back afterwards."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(tasks, "EXPRESSION_KEYS", tasks.EXPRESSION_KEYS)
    monkeypatch.setattr(tasks, "NEGATIVE_RATE", tasks.NEGATIVE_RATE)
    monkeypatch.setattr(tasks, "pick_candidates", tasks.pick_candidates)
    monkeypatch.setattr(train.DataSource, "sample", train.DataSource.sample)

    def load(*argv):
        monkeypatch.setattr(sys, "argv", ["referring_curriculum.py", *argv])
        sys.modules.pop("referring_curriculum", None)
        return importlib.import_module("referring_curriculum")

    yield load
    sys.modules.pop("referring_curriculum", None)


def samples(script, kind, count):
    """`count` samples of one kind from a fixed world."""
    world = ShapesWorld(96, seed=5)
    shares = np.zeros(len(script.KINDS))
    shares[script.KINDS.index(kind)] = 1
    for index in range(count):
        yield script.curriculum_sample(world, index, shares, script.ATTRIBUTES)


def written_descriptions(turn):
    """A refer_text question's candidates and the description written for each."""
    objects = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
    return objects, turn.question.split(". ")[0].split("; ")


def test_index_answers_name_the_numbered_regions_attribute(load_script):
    script = load_script()
    seen = set()
    for sample in samples(script, "index", 40):
        turn = sample.turns[0]
        picked, k = turn.truth["objects"], turn.truth["target"]
        assert len(sample.masks) == len(picked) >= 2
        assert f"Region [{k + 1}]" in turn.question
        assert script.tasks.region_list(len(picked)) in turn.question
        attribute = next(a for a in script.READOUTS if f" {a} " in turn.question)
        obj = turn.truth["scene"].objects[picked[k]]
        assert turn.answer == script.READOUTS[attribute][1](obj)
        seen.add(attribute)
    assert seen == set(script.READOUTS)


def test_refer_keys_limit_the_referring_phrases(load_script):
    script = load_script("--refer-keys", "shape")
    for sample in samples(script, "refer", 30):
        assert set(sample.turns[0].truth["values"]) == {"shape"}


def test_negative_rate_sets_how_often_no_region_fits(load_script):
    from rgpt_rt.prompts import NO_MATCH_ANSWER

    script = load_script("--negative-rate", "1")
    assert all(s.turns[0].answer == NO_MATCH_ANSWER for s in samples(script, "refer", 20))
    script = load_script("--negative-rate", "0")
    assert all(s.turns[0].answer != NO_MATCH_ANSWER for s in samples(script, "refer", 20))
    with pytest.raises(SystemExit, match="between 0 and 1"):
        load_script("--negative-rate", "1.5")


def test_crowded_names_as_many_regions_as_the_scene_allows(load_script):
    script = load_script("--crowded", "1")
    for sample in samples(script, "refer", 20):
        turn = sample.turns[0]
        assert len(turn.truth["objects"]) == min(len(turn.truth["scene"].objects), 5)
    with pytest.raises(SystemExit, match="--crowded must be between 0 and 1"):
        load_script("--crowded", "2")


def test_without_crowded_the_package_draws_the_regions(load_script):
    script = load_script()
    fewer = 0
    for sample in samples(script, "refer", 40):
        turn = sample.turns[0]
        fewer += len(turn.truth["objects"]) < min(len(turn.truth["scene"].objects), 5)
    assert fewer >= 10  # 2-5 at random: often fewer than the scene allows


@pytest.mark.parametrize("attribute", ["position", "shape"])
def test_decisive_questions_turn_on_the_named_attribute(load_script, attribute):
    script = load_script("--decisive-share", "1", "--decisive", attribute)
    kinds = set()
    for sample in samples(script, "refer", 30):
        turn = sample.turns[0]
        candidates = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
        values, target = turn.truth["values"], turn.truth["target"]
        rest = {key: value for key, value in values.items() if key != attribute}
        assert attribute in values and rest
        fits = [tasks.matches(c, values) for c in candidates]
        if target is None:  # a near miss: some candidate differs in `attribute` alone
            assert not any(fits)
            assert any(tasks.matches(c, rest) for c in candidates)
        else:  # the target alone fits, and without `attribute` another would too
            assert fits == [k == target for k in range(len(candidates))]
            assert sum(tasks.matches(c, rest) for c in candidates) >= 2
        kinds.add(target is None)
    assert kinds == {True, False}
    with pytest.raises(SystemExit, match="--decisive some of"):
        load_script("--decisive-share", "0.5", "--decisive", "weight")


def test_twins_share_regions_and_differ_in_the_deciding_attribute_and_the_answer(load_script):
    script = load_script("--decisive-share", "1", "--twins", "1")
    orders = set()
    for sample in samples(script, "refer", 30):
        assert len(sample.turns) == 2
        first, second = (turn.truth for turn in sample.turns)
        assert first["objects"] == second["objects"]
        assert first["scene"] is second["scene"]
        decisive, twin = (first, second) if "decided_by" in first else (second, first)
        attribute = decisive["decided_by"]
        changed = {k for k in decisive["values"] if decisive["values"][k] != twin["values"][k]}
        assert changed == {attribute} and set(twin["values"]) == set(decisive["values"])
        assert twin["target"] != decisive["target"]
        candidates = [decisive["scene"].objects[i] for i in twin["objects"]]
        fits = [k for k, c in enumerate(candidates) if tasks.matches(c, twin["values"])]
        assert fits == ([] if twin["target"] is None else [twin["target"]])
        orders.add(decisive is first)
    assert orders == {True, False}
    with pytest.raises(SystemExit, match="--twins"):
        load_script("--twins", "1.5")


def test_same_row_near_misses_move_the_position_within_its_row(load_script):
    script = load_script("--decisive-share", "1", "--negative-rate", "1", "--same-row", "1")
    for sample in samples(script, "refer", 30):
        turn = sample.turns[0]
        values = turn.truth["values"]
        assert turn.truth["target"] is None and turn.truth["decided_by"] == "position"
        candidates = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
        rest = {key: value for key, value in values.items() if key != "position"}
        missed = [c for c in candidates if tasks.matches(c, rest)]
        assert missed and not any(tasks.matches(c, values) for c in candidates)
        # the phrase's position shares a row with a candidate that it misses by position alone
        row = [
            shapes.POSITIONS.index(p) // 3
            for p in (values["position"], *(c.position for c in missed))
        ]
        assert row[0] in row[1:]
    assert script.row_mates("top") == ["top left", "top right"]
    assert script.row_mates("bottom right") == ["bottom left", "bottom"]
    with pytest.raises(SystemExit, match="--same-row"):
        load_script("--same-row", "2")


def test_mixed_samples_are_the_packages_own(load_script):
    script = load_script()
    world = ShapesWorld(96, seed=5)
    for index, sample in enumerate(samples(script, "mixed", 10)):
        own = world.sample(index)
        assert [(t.question, t.answer) for t in sample.turns] == [
            (t.question, t.answer) for t in own.turns
        ]
        assert np.array_equal(sample.image, own.image)


def test_unknown_refer_keys_are_refused(load_script):
    with pytest.raises(SystemExit, match="--refer-keys takes sets of"):
        load_script("--refer-keys", "shape+weight")


def test_refer_text_writes_each_candidates_description_in_order(load_script):
    script = load_script()
    for sample in samples(script, "refer_text", 20):
        turn = sample.turns[0]
        objects, written = written_descriptions(turn)
        assert written == [
            f"Region [{k}] is {script.full_answer(o)}" for k, o in enumerate(objects, 1)
        ]
        target = turn.truth["target"]
        assert turn.answer == script.tasks.refer_answer(target)
        if target is not None:
            assert script.tasks.matches(objects[target], turn.truth["values"])


def test_copy_asks_for_the_number_it_states(load_script):
    script = load_script()
    for sample in samples(script, "copy", 20):
        turn = sample.turns[0]
        assert turn.task == "copy" and len(sample.masks) == len(turn.truth["objects"])
        assert turn.question.startswith(f"The mask you want is {turn.answer} of <region1>")


def test_short_text_writes_only_what_the_phrase_names(load_script):
    script = load_script("--refer-keys", "shape", "--short-text")
    for sample in samples(script, "refer_text", 20):
        objects, written = written_descriptions(sample.turns[0])
        assert written == [f"Region [{k}] is the {o.shape}" for k, o in enumerate(objects, 1)]
