import pytest

from rgpt_rt.config import TokenConfig
from rgpt_rt.prompts import (
    IGNORE_INDEX,
    NO_MATCH_ANSWER,
    Conversation,
    classify_prompt,
    parse_refer_answer,
    refer_answer,
    refer_prompt,
    region_list,
    tokenize_conversation,
)
from rgpt_rt.tokenizer import default_tokenizer

TOKENS = TokenConfig()


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def test_task_prompts_keep_the_papers_wording():
    assert region_list(3) == "<region1>, <region2> and <region3>"
    assert refer_prompt("the red one", 3) == (
        'From the provided masks denoted by <region1>, <region2> and <region3>, which one fits "the red one"? '
        "Answer the question using the template Region [x]."
    )
    assert classify_prompt("COCO-80").startswith(
        "What category name best describes the region represented by <region1>?"
    )
    assert refer_answer(1) == "Region [2]" and refer_answer(None) == NO_MATCH_ANSWER
    assert parse_refer_answer("Region [2]", 3) == 1
    assert parse_refer_answer(NO_MATCH_ANSWER, 3) is None
    assert parse_refer_answer("Region [7]", 3) is None


def test_vicuna_template_and_answer_spans():
    conv = Conversation.single("Q1", "A1").add("Q2", "A2").add("Q3")
    text, spans = conv.render(TOKENS)
    assert text == (
        f"{conv.system} USER: <image>\nQ1 ASSISTANT: A1</s> USER: Q2 ASSISTANT: A2</s> USER: Q3 ASSISTANT:"
    )
    assert [text[a:b] for a, b in spans] == [" A1</s>", " A2</s>"]


def test_image_expands_and_regions_follow_their_numbers(tokenizer):
    conv = Conversation.single("Is <region2> above <region1>? And <region2>?", "yes")
    out = tokenize_conversation(tokenizer, conv, num_regions=2, num_image_tokens=9, tokens=TOKENS)
    image_id, region_id = tokenizer.token_to_id("<image>"), tokenizer.token_to_id("<region>")
    assert out.input_ids[0] == tokenizer.token_to_id("<s>")
    assert out.input_ids.count(image_id) == 9
    assert out.input_ids.count(region_id) == 3
    assert out.region_order == [1, 0, 1]


def test_labels_cover_the_answers_and_their_eos_only(tokenizer):
    conv = Conversation.single("Give a short description of <region1>.", "a large red circle").add(
        "Again?", "yes"
    )
    out = tokenize_conversation(tokenizer, conv, num_regions=1, num_image_tokens=4, tokens=TOKENS)
    kept = [t for t in out.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept, skip_special_tokens=False).replace("</s>", "|").split("|")[
        :2
    ] == [
        " a large red circle",
        " yes",
    ]
    eos = tokenizer.token_to_id("</s>")
    assert kept.count(eos) == 2
    # labels line up with the inputs they predict from (the LLM shifts them itself)
    for token, label in zip(out.input_ids, out.labels):
        assert label in (IGNORE_INDEX, token)


def test_bare_region_placeholders_take_masks_in_order(tokenizer):
    out = tokenize_conversation(
        tokenizer,
        Conversation.single("<region> and <region>"),
        num_regions=2,
        num_image_tokens=1,
        tokens=TOKENS,
    )
    assert out.region_order == [0, 1]


@pytest.mark.parametrize(
    ("question", "count", "message"),
    [
        ("What is <region3>?", 2, r"names <region3> but 2 mask\(s\) were given"),
        ("What is <region1>?", 2, "never names <region2>"),
        ("<region> <region>", 1, "more <region> placeholders"),
        ("<image> What is <region1>?", 1, "without <image>"),
    ],
)
def test_placeholders_that_do_not_match_the_masks_are_refused(tokenizer, question, count, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(
            tokenizer,
            Conversation.single(question),
            num_regions=count,
            num_image_tokens=1,
            tokens=TOKENS,
        )


def test_an_unanswered_middle_turn_is_refused():
    with pytest.raises(ValueError, match="answer it before"):
        Conversation.single("Q1").add("Q2")
