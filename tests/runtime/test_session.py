"""rgpt_rt.Session on bundles of a random-weight tiny model: the API, caching, streaming,
batching, threads, and every bad input. (Accuracy on the trained default model is tested in
tests/runtime/test_default_session.py.)"""

import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from prefill_parity import as_the_bundle_stores, reference_logits, session_logits

from rgpt_rt.bundle import BundleError
from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.model import RGPT
from rgpt_rt.prompts import (
    Conversation,
    classify_prompt,
    describe_prompt,
    parse_refer_answer,
    refer_prompt,
)
from rgpt_rt.runtime import SamplingParams, decode
from rgpt_rt.runtime.answer import AnswerStream
from rgpt_rt.runtime.session import Session


@pytest.fixture(scope="module")
def int4_bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "tiny"
    build_bundle(BuildOptions(out=out, checkpoint=tiny_checkpoint, quant="rtn", log=lambda _: None))
    return out


@pytest.fixture(scope="module")
def session(int4_bundle):
    return Session(int4_bundle, device="cpu")


def scene(seed=0, height=90, width=120):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    first = np.zeros((height, width), dtype=bool)
    first[10:40, 15:60] = True
    second = np.zeros((height, width), dtype=np.uint8)
    second[50:85, 70:115] = 255
    return image, [first, second, (5, 5, 30, 30)]


def test_describe_answers_and_reports_its_stages(session):
    image, masks = scene()
    text = session.describe(image, masks[0], max_new_tokens=12)
    assert isinstance(text, str)
    stats = session.stats
    for key in (
        "preprocess_ms",
        "vision_ms",
        "regions_ms",
        "prefill_ms",
        "ttft_ms",
        "decode_ms",
        "total_ms",
    ):
        assert stats[key] >= 0, key
    assert stats["vision_backend"] == "onnxruntime-cpu"
    info = session.info()
    assert info["llm"]["quantization"] == "rtn" and info["device"] == "cpu"


def test_time_to_first_token_is_the_first_tokens_not_the_first_texts(session, monkeypatch):
    # Random weights (the 7B timing runs) answer in tokens that show no text; TTFT is still
    # when the first token was sampled, not the end of the answer.
    from rgpt_rt.runtime.generate import TextStream

    monkeypatch.setattr(TextStream, "push", lambda self, token: "")
    monkeypatch.setattr(TextStream, "finish", lambda self: "")
    image, masks = scene(3)
    assert session.describe(image, masks[0], max_new_tokens=12) == ""
    stats = session.stats
    assert stats["new_tokens"] > 1
    assert stats["ttft_ms"] < stats["total_ms"] - stats["decode_ms"] / 2


def test_streamed_deltas_concatenate_to_the_answer(session):
    image, masks = scene(1)
    whole = session.describe(image, masks[1], max_new_tokens=16)
    parts = list(session.describe(image, masks[1], max_new_tokens=16, stream=True))
    assert "".join(parts) == whole


def test_a_warm_question_prefills_only_its_own_tokens(int4_bundle):
    image, masks = scene(2)
    cold_session = Session(int4_bundle, device="cpu")
    first = cold_session.ask(image, "What color is <region1>?", [masks[0]], max_new_tokens=8)
    assert cold_session.stats["vision_cached"] is False
    question = "Give a short description of <region1>."
    warm = cold_session.ask(image, question, [masks[1]], max_new_tokens=8)
    stats = cold_session.stats
    assert stats["vision_cached"] is True
    suffix = stats["prefill_tokens"]
    assert suffix < 40 and suffix + stats["prefix_tokens"] > cold_session.config.num_image_tokens
    cold = Session(int4_bundle, device="cpu").ask(image, question, [masks[1]], max_new_tokens=8)
    assert warm == cold
    assert isinstance(first, str)


def test_a_cpu_answers_the_next_question_inside_the_cached_prefix(int4_bundle, monkeypatch):
    # On a CPU an image's prefix is kept as its first answer's whole cache; the next question
    # about the image is answered in it (no second cache), and it is cut back to the prefix
    # after. A question while it is lent (an open stream) takes a cache of its own.
    image, masks = scene(2)
    session = Session(int4_bundle, device="cpu")
    expected = [
        Session(int4_bundle, device="cpu").describe(image, m, max_new_tokens=8) for m in masks
    ]
    assert session.describe(image, masks[0], max_new_tokens=8) == expected[0]
    acquired = []
    acquire = session.stages.pool.acquire
    monkeypatch.setattr(
        session.stages.pool, "acquire", lambda *a: acquired.append(a) or acquire(*a)
    )
    assert session.describe(image, masks[1], max_new_tokens=8) == expected[1]
    assert acquired == [] and session.stats["prefill_tokens"] < 40
    stream = session.describe(image, masks[0], max_new_tokens=8, stream=True)
    first = next(stream)  # the cached prefix is lent to this stream
    assert session.describe(image, masks[1], max_new_tokens=8) == expected[1]
    assert len(acquired) == 1
    assert first + "".join(stream) == expected[0]  # its end gives the prefix back
    assert session.describe(image, masks[0], max_new_tokens=8) == expected[0]
    assert len(acquired) == 1  # the prefix is back, and lent again


def test_without_a_prefix_cache_a_second_question_prefills_the_image_again(int4_bundle):
    image, masks = scene(2)
    session = Session(int4_bundle, device="cpu", prefix_cache_bytes=0)
    for _ in range(2):
        session.describe(image, masks[0], max_new_tokens=4)
        assert session.stats["prefill_tokens"] > session.config.num_image_tokens


def test_one_prefill_per_new_image_and_the_prefix_kept_for_the_next_question(int4_bundle):
    # The text before the image tokens is the same for every image: its KV is computed once per
    # Session. A new image and its question are then prefilled in one call, and the image
    # prefix is kept from it: a second question about that image prefills only its own tokens.
    fresh = Session(int4_bundle, device="cpu")
    prefilled = []
    prefill = fresh.decoder.prefill

    def counting(cache, **inputs):
        prefilled.append(inputs["inputs_embeds"].shape[1])
        return prefill(cache, **inputs)

    fresh.decoder.prefill = counting
    image, masks = scene(3)
    other, _ = scene(4)
    fresh.describe(image, masks[0], max_new_tokens=6)
    text_tokens, image_and_question = prefilled
    question = image_and_question - fresh.config.num_image_tokens
    assert text_tokens > 10 and question > 5
    prefilled.clear()
    answer = fresh.describe(other, masks[0], max_new_tokens=6)
    assert prefilled == [image_and_question]
    prefilled.clear()
    again = fresh.describe(other, masks[0], max_new_tokens=6)
    assert prefilled == [question] and again == answer
    assert answer == Session(int4_bundle, device="cpu").describe(other, masks[0], max_new_tokens=6)


def test_describe_many_equals_describe_per_region(session):
    image, masks = scene(3)
    many = session.describe_many(image, masks, max_new_tokens=10)
    assert session.stats["regions"] == 3
    per_row = session.stats["prefill_tokens"] / 3
    singles = [session.describe(image, m, max_new_tokens=10) for m in masks]
    assert many == singles
    # the question's tokens before the region token were prefilled once, not once per row
    assert per_row == int(per_row) and per_row < session.stats["prefill_tokens"]


def asked_prompts(session, monkeypatch) -> list[str]:
    """Every prompt the Session's stages tokenize from now on, as text (the template rendered)."""
    prompts, tokenize = [], session.stages.tokenize

    def spy(conversation, *args, **kwargs):
        prompts.append(conversation.render(session.config.tokens)[0])
        return tokenize(conversation, *args, **kwargs)

    monkeypatch.setattr(session.stages, "tokenize", spy)
    return prompts


def fresh_answer(session, image, masks, conversation, max_new_tokens):
    """The greedy answer to a whole conversation prefilled from nothing on a fresh cache: no
    prefix cache, no earlier turn's KV (what a chat turn must equal)."""
    stages = session.stages
    seen = stages.see(image, {})
    regions = stages.numbered(stages.regions(seen, masks, {}))
    ids, order = stages.tokenize(conversation, len(masks), require_all=False)
    embeds = stages.splice(torch.tensor([ids]), seen.image_embeds, regions[order])
    cache = session.decoder.new_cache(1, len(ids) + max_new_tokens)
    logits = session.decoder.prefill(cache, inputs_embeds=embeds)
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=stages.eos_id)
    return decode(session.decoder, cache, logits, params, tokenizer=session.tokenizer)[
        0
    ].text.strip()


def test_classify_and_refer_ask_the_papers_prompts_and_read_the_answer(session, monkeypatch):
    image, masks = scene(4)
    prompts = asked_prompts(session, monkeypatch)
    label = session.classify(image, masks[0], vocabulary="COCO-80")
    assert prompts[-1].endswith(
        "USER: <image>\nWhat category name best describes the region represented by "
        "<region1>? Answer the question using COCO-80 category names. ASSISTANT:"
    )
    assert label == session.ask(image, classify_prompt("COCO-80"), masks[:1], max_new_tokens=32)
    choice = session.refer(image, "the bright one", masks)
    assert prompts[-1].endswith(
        "From the provided masks denoted by <region1>, <region2> and <region3>, which one fits "
        '"the bright one"? Answer the question using the template Region [x]. ASSISTANT:'
    )
    raw = session.ask(image, refer_prompt("the bright one", 3), masks, max_new_tokens=16)
    assert choice == parse_refer_answer(raw, 3)
    session.classify(image, masks[0])  # the model's own vocabulary by default
    assert f"using {session.config.vocabulary} category names" in prompts[-1]


def test_a_chat_turn_answers_what_the_whole_conversation_asks(session):
    image, masks = scene(4)
    chat = session.chat(image, masks[:2])
    first = chat.send("What is <region1>?", max_new_tokens=6)
    second = chat.send("And <region2>?", max_new_tokens=6)
    assert chat.conversation.turns == [("What is <region1>?", first), ("And <region2>?", second)]
    # Each turn prefilled only its new tokens on the chat's cache; the answers are those of the
    # whole conversation prefilled afresh.
    assert first == fresh_answer(
        session, image, masks[:2], Conversation.single("What is <region1>?"), 6
    )
    whole = Conversation([("What is <region1>?", first), ("And <region2>?", None)])
    assert second == fresh_answer(session, image, masks[:2], whole, 6)


def test_session_prefill_matches_the_reference_model(tiny_checkpoint, tiny_bundle):
    """The unquantized bundle through the Session computes the reference model's logits."""
    reference = as_the_bundle_stores(RGPT.from_pretrained(tiny_checkpoint).eval())
    session = Session(tiny_bundle, device="cpu")
    image, masks = scene(5)
    question = describe_prompt(True)
    expected, prepared = reference_logits(reference, image, masks[:1], question)
    logits, ids = session_logits(session, image, masks[:1], question)
    assert ids == prepared.input_ids[0].tolist()
    # fp32 on both sides; the paths differ in kernel order (ONNX Runtime, mask-pool kernel, our decoder)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_threads_share_a_session_correctly(session):
    image, masks = scene(6)
    expected = [session.describe(image, m, max_new_tokens=8) for m in masks]
    results = {}

    def work(index):
        results[index] = session.describe(image, masks[index % 3], max_new_tokens=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(6)] == [expected[i % 3] for i in range(6)]


def test_an_abandoned_stream_returns_its_cache(session):
    image, masks = scene(7)
    stages = session.stages
    cached = len(stages.prefix_cache)
    answer = session.describe(image, masks[0], stream=True, max_new_tokens=20)
    next(answer, None)
    del answer  # a new image: its cache becomes the image's prefix, no copy made
    assert len(stages.prefix_cache) == cached + 1
    before = stages.pool.free_caches
    answer = session.describe(image, masks[1], stream=True, max_new_tokens=20)
    assert isinstance(answer, AnswerStream)
    next(answer, None)
    del answer  # the prefix is cached now: the cache goes back to the pool
    assert stages.pool.free_caches == max(before, 1)


def test_gray_rgba_and_huge_images_are_converted(session, tmp_path):
    image, masks = scene(8)
    gray = Image.fromarray(image).convert("L")
    rgba = Image.fromarray(image).convert("RGBA")
    assert isinstance(session.describe(gray, masks[0], max_new_tokens=4), str)
    assert isinstance(session.describe(rgba, masks[0], max_new_tokens=4), str)
    huge = np.zeros((6000, 4500, 3), dtype=np.uint8)
    assert isinstance(session.describe(huge, (100, 200, 1500, 2500), max_new_tokens=4), str)
    assert session.stats["original_size"] == [6000, 4500]
    assert max(session.stats["image_size"]) == 2048, (
        "a huge image is downscaled before the model sees it"
    )
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    mask_path = tmp_path / "mask.png"
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(mask_path)
    assert isinstance(session.describe(str(path), str(mask_path), max_new_tokens=4), str)


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("empty-mask", ValueError, "mask 1 is empty"),
        ("mask-size", ValueError, "mask 1 is 10x10 but the image is 120x90"),
        ("more-regions", ValueError, r"names <region3> but 2 mask\(s\)"),
        ("box-outside", ValueError, "lies outside the 120x90 image"),
        ("box-inverted", ValueError, "needs x1 > x0"),
        ("missing-file", FileNotFoundError, "does not exist"),
        ("corrupt-file", ValueError, "could not be read as an image"),
    ],
)
def test_bad_input_says_what_is_wrong(session, tmp_path, case, error, message):
    image, masks = scene(9)
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    calls = {
        "empty-mask": lambda: session.describe(image, np.zeros((90, 120), dtype=bool)),
        "mask-size": lambda: session.describe(image, np.ones((10, 10), dtype=bool)),
        "more-regions": lambda: session.ask(image, "Is <region3> left of <region1>?", masks[:2]),
        "box-outside": lambda: session.describe(image, (200, 200, 300, 300)),
        "box-inverted": lambda: session.describe(image, (50, 10, 40, 30)),
        "missing-file": lambda: session.describe(tmp_path / "none.png", masks[0]),
        "corrupt-file": lambda: session.describe(corrupt, masks[0]),
    }
    with pytest.raises(error, match=message):
        calls[case]()


def test_a_bundle_that_fails_verification_is_refused(int4_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(int4_bundle, copy)
    data = bytearray((copy / "llm.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "llm.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="llm.safetensors does not match its sha256"):
        Session(copy, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Session(tmp_path / "nowhere", device="cpu")


def test_exif_orientation_is_applied_before_masks_are_checked(session, tmp_path):
    image, _ = scene(10)  # 90 x 120 as stored
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(image).save(path, exif=exif)
    upright_mask = np.zeros((120, 90), dtype=bool)  # drawn on the upright (portrait) image
    upright_mask[10:50, 20:70] = True
    assert isinstance(session.describe(str(path), upright_mask, max_new_tokens=3), str)
    assert session.stats["original_size"] == [120, 90]


def test_stats_count_the_decoded_tokens_and_why_the_answer_ended(session):
    image, masks = scene(11)
    session.describe(image, masks[0], max_new_tokens=5)
    stats = session.stats
    assert 0 <= stats["new_tokens"] <= 5
    assert stats["finish_reason"] in ("eos", "length")
    assert (stats["finish_reason"] == "length") == (stats["new_tokens"] == 5)


def test_a_chat_cache_grows_with_the_conversation(session):
    image, masks = scene(12)
    chat = session.chat(image, masks[:1])
    bucket = session.stages.pool.bucket
    chat.send("What is <region1>?", max_new_tokens=4)
    first = chat.kv_slots  # the first turn's prompt and answer, rounded up to a bucket
    assert first % bucket == 0 and first < session.max_context
    long_question = "Tell me about <region1>, " + "and its colour, " * 15 + "please."
    for _ in range(5):
        chat.send(long_question, max_new_tokens=4)
        if chat.kv_slots > first:
            break
    grown = chat.kv_slots  # grown by whole buckets when the turns outgrew the first
    assert grown > first and (grown - first) % bucket == 0
    assert grown - bucket < len(chat._cached_ids) + 4 <= grown, "never more than a bucket spare"


def test_a_system_prompt_may_not_hold_placeholders(session):
    from rgpt_rt.prompts import tokenize_conversation

    with pytest.raises(ValueError, match="system prompt may not hold"):
        tokenize_conversation(
            session.tokenizer,
            Conversation([("hi <region1>", None)], system="look: <image>"),
            num_regions=1,
            num_image_tokens=4,
            tokens=session.config.tokens,
        )
