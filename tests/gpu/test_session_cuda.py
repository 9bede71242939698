"""The Session on CUDA (the embedded default model): right answers on fresh scenes, the prefix
of an image kept for its next question without new CUDA graphs, streaming, describe_many,
the vision backends, and the memory a call takes."""

import pytest
import torch

import rgpt_rt
from rgpt_rt.runtime.session import Session
from rgpt_rt.training.data.tasks import ShapesWorld
from rgpt_rt.training.eval import score

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def session():
    return Session(device="cuda")


@pytest.fixture(scope="module")
def world():
    size = rgpt_rt.RGPTConfig.from_preset("tiny").vision.image_size
    return ShapesWorld(image_size=size, seed=20261207)


def graphs(session) -> int:
    caches = [c for caches in session.stages.pool._free.values() for c in caches]
    return sum(len(c.graphs) for c in caches)


def test_answers_on_cuda_are_right(session, world):
    for task, floor in (("classify", 6), ("colour", 7), ("refer", 6)):
        right = 0
        for index in range(8):
            sample = world.task_sample(index, task)
            turn = sample.turns[0]
            right += score(turn, session.ask(sample.image, turn.question, sample.masks))["correct"]
        assert right >= floor, (task, right)


def test_a_second_question_prefills_its_own_tokens_and_reuses_the_graphs(session, world):
    sample = world.task_sample(3, "detailed")
    session.describe(sample.image, sample.masks[0], max_new_tokens=8)
    first = dict(session.stats)
    assert first["prefill_tokens"] > session.config.num_image_tokens  # image + question, one call
    captured = graphs(session)
    session.describe(sample.image, sample.masks[0], detailed=False, max_new_tokens=8)
    second = session.stats
    assert second["vision_cached"] and second["prefill_tokens"] < 32
    assert graphs(session) == captured, "the pooled cache and its graphs were reused"


def test_streams_and_batches_agree_with_single_answers(session, world):
    sample = world.task_sample(5, "detailed")
    masks = sample.masks[:3]
    single = [session.describe(sample.image, m, max_new_tokens=24) for m in masks]
    assert session.describe_many(sample.image, masks, max_new_tokens=24) == single
    streamed = "".join(session.describe(sample.image, masks[0], stream=True, max_new_tokens=24))
    assert streamed == single[0]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_vision_backends_on_cuda(backend, world):
    try:
        sess = Session(device="cuda", vision_backend=backend)
    except RuntimeError as error:  # onnxruntime-gpu is optional
        pytest.skip(str(error))
    sample = world.task_sample(0, "classify")
    assert sess.classify(sample.image, sample.masks[0])
    assert sess.info()["vision_backend"].startswith(backend)


def test_one_describe_allocates_little_beyond_the_weights(session, world):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sample = world.task_sample(7, "detailed")
    session.clear_caches()
    session.describe(sample.image, sample.masks[0], max_new_tokens=16)
    extra = torch.cuda.max_memory_allocated() - base
    # the tiny model: a 256-position fp16 cache is ~1 MB; activations and the vision stage a
    # few MB more. 64 MB would mean a leak or a cache sized to the whole context per call.
    assert extra < 64 << 20, extra
