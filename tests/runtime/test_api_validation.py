"""The Python API checks its arguments at the door: a wrong type is a TypeError naming the
argument, a bad value a ValueError naming the limit, before anything reaches the model; a
failed chat turn is rolled back and the chat stays usable."""

import math

import numpy as np
import pytest

from rgpt_rt.runtime.session import Session

IMAGE = "examples/shapes.png"
BOX = (200, 20, 270, 90)


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": None}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be in 1..512"),
        ({"max_new_tokens": 10**9}, ValueError, "max_new_tokens must be in 1..512"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
        ({"temperature": math.inf}, ValueError, "temperature must be a finite number"),
        ({"temperature": -0.5}, ValueError, r"temperature must be in \[0.0, 100.0\]"),
        ({"temperature": "0.5"}, TypeError, "temperature must be a number"),
        ({"detailed": "yes"}, TypeError, "detailed must be True or False"),
        ({"stream": 1}, TypeError, "stream must be True or False"),
    ],
)
def test_describe_checks_its_options(session, kwargs, error, match):
    with pytest.raises(error, match=match):
        session.describe(IMAGE, BOX, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda s: s.ask(IMAGE, 12345, [BOX]), TypeError, "question must be a str"),
        (lambda s: s.ask(IMAGE, "  ", [BOX]), ValueError, "question is empty"),
        (lambda s: s.ask(IMAGE, "What is \ud800 <region1>?", [BOX]), ValueError, "lone surrogate"),
        (lambda s: s.refer(IMAGE, None, [BOX]), TypeError, "expression must be a str"),
        (lambda s: s.classify(IMAGE, BOX, vocabulary=3), TypeError, "vocabulary must be a str"),
        (
            lambda s: s.describe_many(IMAGE, {"a": BOX}),
            TypeError,
            "masks must be a region or a list",
        ),
        (lambda s: s.describe(IMAGE, (10**400, 0, 5, 5)), ValueError, "box"),
        (lambda s: s.describe(IMAGE, (0, 0, "5", 5)), TypeError, "box"),
    ],
)
def test_questions_expressions_and_regions_are_checked(session, call, error, match):
    with pytest.raises(error, match=match):
        call(session)


def test_a_huge_array_is_refused_before_it_is_processed(session):
    huge = np.broadcast_to(np.zeros(3, dtype=np.uint8), (20000, 20000, 3))  # no memory behind it
    with pytest.raises(ValueError, match="pixels"):
        session.describe(huge, BOX)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"device": "tpu"}, ValueError, "device 'tpu'"),
        ({"device": 3}, TypeError, "device must be a str"),
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1"),
        ({"max_context": 10**6}, ValueError, "max_context must be in 16..512"),
        ({"bundle": 42}, TypeError, "bundle must be a folder path"),
        ({"sha256": 7}, TypeError, "sha256 must be a hex digest str"),
    ],
)
def test_session_options_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        Session(**{"device": "cpu", **kwargs})


def test_a_failed_chat_turn_is_rolled_back(session):
    chat = session.chat(IMAGE, [BOX])
    first = chat.send("What color is <region1>?", max_new_tokens=8)
    for bad in (
        {"max_new_tokens": 10**9},  # past the context
        {"temperature": float("nan")},
    ):
        with pytest.raises(ValueError):
            chat.send("And its shape?", **bad)
    with pytest.raises(ValueError, match="the conversation: .* positions are needed"):
        chat.send("Describe <region1> " + "in great detail " * 200, max_new_tokens=8)
    stream = chat.send("And its shape?", stream=True, max_new_tokens=8)
    next(stream, None)
    stream.close()  # closed before its end: that turn is forgotten
    assert chat.conversation.turns == [("What color is <region1>?", first)]
    second = chat.send("Give a short description of <region1>.", max_new_tokens=12)
    assert second and len(chat.conversation.turns) == 2
    fresh = session.chat(IMAGE, [BOX])
    fresh.send("What color is <region1>?", max_new_tokens=8)
    assert fresh.send("Give a short description of <region1>.", max_new_tokens=12) == second
