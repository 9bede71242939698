"""An Osprey bundle behind the same surface as RegionGPT's: Session.describe / describe_many /
ask / chat / streaming, the CLI and `--check`, answering what the reference model answers
(the narrow twin, fp32 on both sides)."""

from __future__ import annotations

import numpy as np
import pytest
from build_script import run_build_script

from rgpt_rt.cli import main as cli
from rgpt_rt.runtime.session import Session

# the narrow Osprey bundle these use takes ~10 s to build on 2 cores
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(osprey_bundle):
    return Session(osprey_bundle, device="cpu")


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (260, 380, 3), dtype=np.uint8)
    first = np.zeros((260, 380), bool)
    first[30:150, 40:200] = True
    return image, [first, (250, 120, 370, 250)]


def test_describe_answers_what_the_reference_answers(session, reference, scene):
    image, masks = scene
    session.clear_caches()
    for detailed in (True, False):
        question = session.stages.family.describe_prompt(detailed)
        expected = reference.answer(image, masks[:1], question, max_new_tokens=12)
        assert session.describe(image, masks[0], detailed=detailed, max_new_tokens=12) == expected
        if detailed:  # a new image: its 1024 image tokens and the question, in one prefill
            assert session.stats["prefill_tokens"] > session.config.num_image_tokens
    assert session.stats["prefill_tokens"] < 40  # the second question: its own tokens only


def test_a_question_about_two_regions_and_the_batched_describe(session, reference, scene):
    image, masks = scene
    question = "What is <region2> next to <region1>?"
    expected = reference.answer(image, masks, question, max_new_tokens=12)
    assert session.ask(image, question, masks, max_new_tokens=12) == expected
    single = [session.describe(image, m, max_new_tokens=10) for m in masks]
    assert session.describe_many(image, masks, max_new_tokens=10) == single
    streamed = "".join(session.describe(image, masks[0], stream=True, max_new_tokens=10))
    assert streamed == single[0]


def test_a_chat_keeps_its_turns(session, scene):
    image, masks = scene
    chat = session.chat(image, masks)
    first = chat.send("What is <region1>?", max_new_tokens=6)
    second = chat.send("And <region2>?", max_new_tokens=6)
    assert chat.conversation.turns == [("What is <region1>?", first), ("And <region2>?", second)]
    assert chat.conversation.system.startswith("A chat between a curious human")


def test_the_cli_and_check_run_on_an_osprey_bundle(osprey_bundle, capsys):
    code = cli(["describe", "examples/shapes.png", "--box", "20,20,120,120", "--bundle",
                str(osprey_bundle), "--device", "cpu"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.strip()
    result = run_build_script("--check", str(osprey_bundle))
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"hashes": "ok"' in result.stdout and "max_abs" in result.stdout
