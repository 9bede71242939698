"""The referring curriculum's samples follow from the scene: an index question's answer is the
asked attribute of the region with that number, refer_text writes each candidate's description
before a question its answer fits, copy asks for the number it states, mixed samples are the
world's own, decisive_share sets how often one attribute decides, twins how often such a
question comes beside its twin and same_row how often a position near miss stays in the
object's row; the world's referring settings (refer_keys, negative_rate) reach the mix."""

import dataclasses

import numpy as np
import pytest

from rgpt_rt.prompts import NO_MATCH_ANSWER, refer_answer, region_list
from rgpt_rt.training.curriculum import KINDS, ReferringMix, full_answer, row_mates
from rgpt_rt.training.data.phrases import matches, object_values
from rgpt_rt.training.data.shapes import ATTRIBUTES, POSITIONS
from rgpt_rt.training.data.tasks import ShapesWorld

NONE = dict.fromkeys(KINDS, 0.0)


def samples(kind, count, world=None, **fields):
    """`count` samples of one kind from a fixed world."""
    mix = ReferringMix(**(NONE | {kind: 1.0} | fields))
    world = world or ShapesWorld(96, seed=5)
    for index in range(count):
        yield mix.sample(world, index)


def written_descriptions(turn):
    """A refer_text question's candidates and the description written for each."""
    objects = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
    return objects, turn.question.split(". ")[0].split("; ")


def test_index_answers_name_the_numbered_regions_attribute():
    seen = set()
    for sample in samples("index", 40):
        turn = sample.turns[0]
        picked, k = turn.truth["objects"], turn.truth["target"]
        assert len(sample.masks) == len(picked) >= 2
        assert f"Region [{k + 1}]" in turn.question
        assert region_list(len(picked)) in turn.question
        attribute = next(a for a in ATTRIBUTES if f" {a} " in turn.question)
        obj = turn.truth["scene"].objects[picked[k]]
        assert turn.answer == object_values(obj)[attribute]
        seen.add(attribute)
    assert seen == set(ATTRIBUTES)


def test_the_worlds_referring_settings_reach_the_mix():
    world = ShapesWorld(96, seed=5, refer_keys=(("shape",),), negative_rate=0.0)
    for sample in samples("refer", 30, world):
        turn = sample.turns[0]
        assert set(turn.truth["values"]) == {"shape"} and turn.answer != NO_MATCH_ANSWER
    nowhere = ShapesWorld(96, seed=5, negative_rate=1.0)
    for sample in samples("refer", 20, nowhere, decisive_share=0.5):
        assert sample.turns[0].answer == NO_MATCH_ANSWER


@pytest.mark.parametrize("attribute", ["position", "shape"])
def test_decisive_questions_turn_on_the_named_attribute(attribute):
    kinds = set()
    for sample in samples("refer", 30, decisive_share=1.0, decisive=(attribute,)):
        turn = sample.turns[0]
        candidates = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
        values, target = turn.truth["values"], turn.truth["target"]
        rest = {key: value for key, value in values.items() if key != attribute}
        assert attribute in values and rest
        fits = [matches(c, values) for c in candidates]
        if target is None:  # a near miss: some candidate differs in `attribute` alone
            assert not any(fits)
            assert any(matches(c, rest) for c in candidates)
        else:  # the target alone fits, and without `attribute` another would too
            assert fits == [k == target for k in range(len(candidates))]
            assert sum(matches(c, rest) for c in candidates) >= 2
        kinds.add(target is None)
    assert kinds == {True, False}


def test_twins_share_regions_and_differ_in_the_deciding_attribute_and_the_answer():
    orders = set()
    for sample in samples("refer", 30, decisive_share=1.0, twins=1.0):
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
        fits = [k for k, c in enumerate(candidates) if matches(c, twin["values"])]
        assert fits == ([] if twin["target"] is None else [twin["target"]])
        orders.add(decisive is first)
    assert orders == {True, False}


def test_same_row_near_misses_move_the_position_within_its_row():
    world = ShapesWorld(96, seed=5, negative_rate=1.0)
    for sample in samples("refer", 30, world, decisive_share=1.0, same_row=1.0):
        turn = sample.turns[0]
        values = turn.truth["values"]
        assert turn.truth["target"] is None and turn.truth["decided_by"] == "position"
        candidates = [turn.truth["scene"].objects[i] for i in turn.truth["objects"]]
        rest = {key: value for key, value in values.items() if key != "position"}
        missed = [c for c in candidates if matches(c, rest)]
        assert missed and not any(matches(c, values) for c in candidates)
        # the phrase's position shares a row with a candidate that it misses by position alone
        row = [POSITIONS.index(p) // 3 for p in (values["position"], *(c.position for c in missed))]
        assert row[0] in row[1:]
    assert row_mates("top") == ["top left", "top right"]
    assert row_mates("bottom right") == ["bottom left", "bottom"]


def test_mixed_samples_are_the_worlds_own():
    world = ShapesWorld(96, seed=5)
    for index, sample in enumerate(samples("mixed", 10)):
        own = world.sample(index)
        assert [(t.question, t.answer) for t in sample.turns] == [
            (t.question, t.answer) for t in own.turns
        ]
        assert np.array_equal(sample.image, own.image)


def test_refer_text_writes_each_candidates_description_in_order():
    for sample in samples("refer_text", 20):
        turn = sample.turns[0]
        objects, written = written_descriptions(turn)
        assert written == [f"Region [{k}] is {full_answer(o)}" for k, o in enumerate(objects, 1)]
        target = turn.truth["target"]
        assert turn.answer == refer_answer(target)
        if target is not None:
            assert matches(objects[target], turn.truth["values"])


def test_copy_asks_for_the_number_it_states():
    for sample in samples("copy", 20):
        turn = sample.turns[0]
        assert turn.task == "copy" and len(sample.masks) == len(turn.truth["objects"])
        assert turn.question.startswith(f"The mask you want is {turn.answer} of <region1>")


def test_short_text_writes_only_what_the_phrase_names():
    world = ShapesWorld(96, seed=5, refer_keys=(("shape",),))
    for sample in samples("refer_text", 20, world, short_text=True):
        objects, written = written_descriptions(sample.turns[0])
        assert written == [f"Region [{k}] is the {o.shape}" for k, o in enumerate(objects, 1)]


def test_scaffolds_read_an_attribute_out_before_the_question_about_it():
    for sample in samples("match_scaffold", 20):
        readout, match = sample.turns
        obj = match.truth["scene"].objects[match.truth["object"]]
        assert readout.answer == object_values(obj)[readout.task]
        assert match.task == f"match_{readout.task}"
    for sample in samples("refer_scaffold", 10):
        *named, refer = sample.turns
        objects = [refer.truth["scene"].objects[i] for i in refer.truth["objects"]]
        assert [turn.answer for turn in named] == [full_answer(o) for o in objects]
        assert refer.task == "refer"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(refer=-1.0), "must be >= 0 with a positive sum"),
        (NONE, "must be >= 0 with a positive sum"),
        (dict(attributes=("shape", "weight")), "attributes takes some of"),
        (dict(decisive=()), "decisive takes some of"),
        (dict(twins=1.5), "twins must be between 0 and 1"),
        (dict(same_row=-0.5), "same_row must be between 0 and 1"),
        (dict(decisive_share=2.0), "decisive_share must be between 0 and 1"),
    ],
)
def test_bad_mixes_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        ReferringMix(**fields)


def test_a_mix_pickles_and_is_a_value():
    import pickle

    mix = ReferringMix(refer=0.75, decisive=["position", "shape"])
    assert mix.decisive == ("position", "shape")
    assert pickle.loads(pickle.dumps(mix)) == mix
    assert dataclasses.replace(mix, twins=0.5) != mix
