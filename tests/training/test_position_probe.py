"""The position probe: every question's expected answer follows from the regions'
objects, and the tables count an answer by the phrase's position, the pick's true one, and the
place in the list of the region the phrase's shape singles out."""

from rgpt_rt.prompts import NO_MATCH_ANSWER
from rgpt_rt.training import position_probe
from rgpt_rt.training.data.phrases import POSITION_PHRASE
from rgpt_rt.training.data.shapes import POSITIONS
from rgpt_rt.training.data.tasks import ShapesWorld


def test_questions_expect_the_region_of_that_shape_and_position_or_none():
    items = position_probe.questions(ShapesWorld(96, seed=9), scenes=4)
    assert {position for _, _, position, _, _ in items} == set(POSITIONS)
    for sample, expected, position, objects, place in items:
        phrase = sample.turns[0].question.split('"')[1]
        shape = phrase.split()[1]
        fits = [k for k, o in enumerate(objects) if (o.shape, o.position) == (shape, position)]
        having = [k + 1 for k, o in enumerate(objects) if o.shape == shape]
        assert phrase.endswith(POSITION_PHRASE[position])
        assert expected == (f"Region [{fits[0] + 1}]" if fits else NO_MATCH_ANSWER)
        assert place == (having[0] if len(having) == 1 else None)


def test_the_tables_count_each_answer_by_position_and_by_place():
    items = position_probe.questions(ShapesWorld(96, seed=9), scenes=3)
    answers = ["Region [1]"] * len(items)
    table = position_probe.confusion(items, answers)
    for position, ((t_right, t_all), (n_right, n_all), wrong) in table.items():
        mine = [(e, objects) for _, e, p, objects, _ in items if p == position]
        assert t_all == sum(e != NO_MATCH_ANSWER for e, _ in mine) and n_right == 0
        assert n_all == len(mine) - t_all and t_right == sum(e == "Region [1]" for e, _ in mine)
        assert sum(wrong.values()) == len(mine) - t_right
        assert set(wrong) <= {objects[0].position for _, objects in mine}
    places = position_probe.by_place(items, answers)
    assert sum(n for _, n in places.values()) == sum(item[4] is not None for item in items)
    for place, (right, _) in places.items():  # only place 1 can be "Region [1]"
        assert place == 1 or right == 0
    assert places[1][0] == sum(e == "Region [1]" for _, e, _, _, k in items if k == 1)
