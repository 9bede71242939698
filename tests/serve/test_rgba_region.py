"""Describe Anything's way of giving a region: the alpha channel of an RGBA image_url
(alpha > 0 is the mask), when the request has no `regions`."""

import base64
import io

import numpy as np
from payloads import CIRCLE, chat_body
from PIL import Image

from rgpt_rt.serve.example import example_path
from rgpt_rt.serve.openai import name_alpha_region

EXAMPLE = np.asarray(Image.open(example_path()).convert("RGB"))


def rgba_url(alpha: np.ndarray) -> str:
    rgba = np.dstack([EXAMPLE, alpha.astype(np.uint8)])
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body_with_image(text: str, url: str, **extra) -> dict:
    body = chat_body(text, None, **extra)
    body["messages"][0]["content"][1]["image_url"]["url"] = url
    del body["regions"]
    return body


def test_the_alpha_channel_is_the_region(client, serve_session):
    x0, y0, x1, y1 = CIRCLE
    alpha = np.zeros(EXAMPLE.shape[:2], np.uint8)
    alpha[y0:y1, x0:x1] = 200
    text = "<image>\nDescribe the masked region in detail."
    response = client.post(
        "/v1/chat/completions", json=body_with_image(text, rgba_url(alpha), max_tokens=8)
    )
    assert response.status_code == 200, response.text
    expected = serve_session.ask(
        EXAMPLE, "Describe <region1> in detail.", [alpha > 0], max_new_tokens=8
    )
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert response.json()["rgpt_stats"]["regions"] == 1


def test_an_empty_alpha_channel_and_a_plain_image_are_refused(client):
    empty = np.zeros(EXAMPLE.shape[:2], np.uint8)
    response = client.post("/v1/chat/completions", json=body_with_image("Hi", rgba_url(empty)))
    assert response.status_code == 400 and "alpha channel is 0 everywhere" in response.text
    plain = chat_body("Describe <region1>.", None)
    del plain["regions"]
    response = client.post("/v1/chat/completions", json=plain)
    assert response.status_code == 400 and "RGBA image" in response.text


def test_questions_name_the_alpha_region():
    assert name_alpha_region("<image>\nDescribe the masked region in detail.") == (
        "Describe <region1> in detail."
    )
    assert name_alpha_region("What color is it?") == "<region1> What color is it?"
    assert name_alpha_region("Is <region1> red?") == "Is <region1> red?"
