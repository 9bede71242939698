"""POST /v1/chat/completions: OpenAI's response and chunk formats, read the way OpenAI's client
reads them (and by that client itself, against the live server), and its errors."""

import json

import numpy as np
import pytest
from payloads import CIRCLE, EXAMPLE_DATA_URL, SQUARE, chat_body
from PIL import Image

from rgpt_rt.prompts import Conversation
from rgpt_rt.serve.example import example_path
from rgpt_rt.serve.openai import finish_reason

EXAMPLE = np.asarray(Image.open(example_path()).convert("RGB"))
QUESTION = "Is <region1> left of <region2>?"
REGIONS = [{"box": CIRCLE}, {"box": SQUARE}]


def read_chunks(text: str) -> list[dict]:
    """The chunks of an OpenAI stream: `data: {...}` lines up to `data: [DONE]`, which must end
    it (what openai-python's SSE decoder requires)."""
    payloads = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(p) for p in payloads[:-1]]


def test_a_completion_is_openais_shape_with_the_sessions_answer(client, serve_session):
    response = client.post("/v1/chat/completions", json=chat_body(QUESTION, REGIONS, max_tokens=10))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"  # the serve model never ends early (conftest)
    expected = serve_session.ask(
        EXAMPLE, QUESTION, [tuple(CIRCLE), tuple(SQUARE)], max_new_tokens=10
    )
    assert choice["message"]["content"] == expected
    usage = body["usage"]
    assert usage["completion_tokens"] == 10
    assert usage["prompt_tokens"] > serve_session.config.num_image_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["rgpt_stats"]["regions"] == 2


def test_a_streamed_completion_is_openais_chunks_and_the_same_answer(client):
    plain = client.post("/v1/chat/completions", json=chat_body(QUESTION, REGIONS, max_tokens=10))
    streamed = client.post(
        "/v1/chat/completions",
        json=chat_body(
            QUESTION, REGIONS, max_tokens=10, stream=True, stream_options={"include_usage": True}
        ),
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = read_chunks(streamed.text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *deltas, last, usage = chunks
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert all(c["usage"] is None for c in deltas)
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"] == plain.json()["usage"]
    assert content.strip() == plain.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("session_reason", "openai_reason"), [("eos", "stop"), ("stop", "stop"), ("length", "length")]
)
def test_the_sessions_finish_reason_maps_to_openais(session_reason, openai_reason):
    assert finish_reason({"finish_reason": session_reason, "new_tokens": 3}) == openai_reason


def test_history_and_a_system_message_make_a_conversation(client, serve_session):
    body = chat_body("What is <region1>?", REGIONS, max_tokens=6)
    body["messages"] = [
        {"role": "system", "content": "You name shapes."},
        body["messages"][0],
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": [{"type": "text", "text": "And <region2>?"}]},
    ]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    chat = serve_session.chat(EXAMPLE, [tuple(CIRCLE), tuple(SQUARE)])
    chat.conversation = Conversation(
        turns=[("What is <region1>?", "A circle.")], system="You name shapes."
    )
    expected = chat.send("And <region2>?", max_new_tokens=6)
    assert response.json()["choices"][0]["message"]["content"] == expected


def message(*parts, role="user"):
    return {"role": role, "content": list(parts)}


TEXT = {"type": "text", "text": "What is <region1>?"}
IMAGE = {"type": "image_url", "image_url": {"url": EXAMPLE_DATA_URL}}
BAD = {
    "no-image": ({"messages": [message(TEXT)]}, 400, "no image"),
    "http-url": ({"messages": [message(TEXT, {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}})]}, 400, "this server fetches nothing"),
    "two-images": ({"messages": [message(TEXT, IMAGE, IMAGE)]}, 400, "a second image"),
    "ends-with-assistant": ({"messages": [message(TEXT, IMAGE), message(TEXT, role="assistant")]}, 400, "the last message must be the user's"),
    "assistant-first": ({"messages": [message(TEXT, role="assistant"), message(TEXT, IMAGE)]}, 400, "must answer a user message"),
    "system-image-token": ({"messages": [{"role": "system", "content": "<image>"}, message(TEXT, IMAGE)]}, 400, "may not hold the image or region tokens"),
    "no-regions": ({"regions": None}, 400, "no regions"),
    "too-many-regions": ({"regions": [{"box": CIRCLE}] * 17}, 422, "at most 16"),
    "n-2": ({"n": 2}, 422, "n"),
    "tool-role": ({"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    "audio-part": ({"messages": [message({"type": "input_audio", "input_audio": {}})]}, 422, "input_audio"),
    "tokens-over": ({"max_tokens": 257}, 422, "max_tokens is 257"),
    "region-unnamed": ({"messages": [message({"type": "text", "text": "What is this?"}, IMAGE)]}, 400, "never names <region1>"),
    "bad-image": ({"messages": [message(TEXT, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})]}, 400, "is not a PNG or JPEG"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_chat_requests_are_4xx_in_openais_error_shape(client, case):
    changes, status, text = BAD[case]
    body = {**chat_body("What is <region1>?", [{"box": CIRCLE}], max_tokens=4), **changes}
    response = client.post(
        "/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert text in error["message"] and error["type"]


def test_models_lists_the_one_model(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_the_openai_client_works_unchanged(live_server):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=60)
    request = {
        "model": "tiny",
        "messages": chat_body(QUESTION, REGIONS)["messages"],
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"regions": REGIONS},
    }
    completion = api.chat.completions.create(**request)
    answer = completion.choices[0].message.content
    assert completion.usage.total_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in api.chat.completions.create(**request, stream=True)
        if chunk.choices
    ]
    assert "".join(pieces).strip() == answer
    with pytest.raises(openai.BadRequestError, match="this server fetches nothing"):
        api.chat.completions.create(
            **{
                **request,
                "messages": [
                    message(TEXT, {"type": "image_url", "image_url": {"url": "https://x/y.png"}})
                ],
            }
        )
