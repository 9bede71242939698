"""scripts/position_probe.py: every question's expected answer follows from the regions'
objects, and the table counts an answer by the phrase's position and the pick's true one."""

import importlib
import sys
from pathlib import Path

from rgpt_rt.data import shapes, tasks
from rgpt_rt.data.tasks import ShapesWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
position_probe = importlib.import_module("position_probe")


def test_questions_expect_the_region_of_that_shape_and_position_or_none():
    items = position_probe.questions(ShapesWorld(96, seed=9), scenes=4)
    assert {position for _, _, position, _ in items} == set(shapes.POSITIONS)
    for sample, expected, position, objects in items:
        phrase = sample.turns[0].question.split('"')[1]
        shape = phrase.split()[1]
        fits = [k for k, o in enumerate(objects) if (o.shape, o.position) == (shape, position)]
        assert phrase.endswith(tasks.POSITION_PHRASE[position])
        assert expected == (f"Region [{fits[0] + 1}]" if fits else position_probe.NONE)


def test_the_table_counts_each_answer_by_the_pick_s_true_position(monkeypatch):
    items = position_probe.questions(ShapesWorld(96, seed=9), scenes=3)
    monkeypatch.setattr(
        position_probe, "answer_batch", lambda model, batch: ["Region [1]"] * len(batch)
    )
    table = position_probe.confusion(model=None, items=items)
    for position, ((t_right, t_all), (n_right, n_all), wrong) in table.items():
        mine = [(e, objects) for _, e, p, objects in items if p == position]
        assert t_all == sum(e != position_probe.NONE for e, _ in mine) and n_right == 0
        assert n_all == len(mine) - t_all and t_right == sum(e == "Region [1]" for e, _ in mine)
        assert sum(wrong.values()) == len(mine) - t_right
        assert set(wrong) <= {objects[0].position for _, objects in mine}
