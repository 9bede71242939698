"""The task endpoints in process: answers (the Session's own), streaming, every region form,
bad input answered 4xx in JSON, the static page and the schema."""

import base64
import io
import json
import re

import numpy as np
import pytest
from payloads import (
    CIRCLE,
    EXAMPLE_DATA_URL,
    EXAMPLE_PNG,
    SQUARE,
    STAR,
    box_mask,
    jpeg_base64,
    parse_sse,
    png_base64,
)
from PIL import Image

from rgpt_rt.rle import decode_counts, encode_rle
from rgpt_rt.serve.example import example_path

EXAMPLE = np.asarray(Image.open(example_path()).convert("RGB"))
TOKENS = 12


def describe(client, **body):
    body = {"image": EXAMPLE_PNG, "max_new_tokens": TOKENS, **body}
    return client.post("/v1/describe", json=body)


def test_each_task_answers_what_the_session_answers(client, serve_session):
    boxes = [CIRCLE, SQUARE, STAR]
    response = describe(client, box=CIRCLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "describe"
    assert body["answer"] == serve_session.describe(EXAMPLE, tuple(CIRCLE), max_new_tokens=TOKENS)
    assert body["answers"] == [body["answer"]]
    for key in ("preprocess_ms", "vision_ms", "regions_ms", "prefill_ms", "ttft_ms", "total_ms"):
        assert body["stats"][key] >= 0, key

    classify = client.post("/v1/classify", json={"image": EXAMPLE_PNG, "box": SQUARE}).json()
    assert classify["answer"] == serve_session.classify(EXAMPLE, tuple(SQUARE))

    refer = client.post(
        "/v1/refer", json={"image": EXAMPLE_PNG, "boxes": boxes, "expression": "the red circle"}
    ).json()
    expected = serve_session.refer(EXAMPLE, "the red circle", [tuple(b) for b in boxes])
    assert refer["region"] == expected
    assert refer["answer"] == (
        "No corresponding options found." if expected is None else f"Region [{expected + 1}]"
    )

    question = "Is <region1> left of <region2>?"
    ask = client.post(
        "/v1/ask",
        json={"image": EXAMPLE_PNG, "boxes": boxes[:2], "question": question, "max_new_tokens": 8},
    ).json()
    assert ask["answer"] == serve_session.ask(
        EXAMPLE, question, [tuple(b) for b in boxes[:2]], max_new_tokens=8
    )


@pytest.mark.parametrize("task", ["describe", "ask", "classify", "refer"])
def test_a_streamed_answer_reassembles_to_the_plain_one(client, task):
    body = {
        "describe": {"box": STAR, "max_new_tokens": TOKENS},
        "ask": {
            "boxes": [STAR, CIRCLE],
            "question": "Is <region2> above <region1>?",
            "max_new_tokens": 10,
        },
        "classify": {"box": STAR},
        "refer": {"boxes": [STAR, CIRCLE], "expression": "the star"},
    }[task]
    body["image"] = EXAMPLE_PNG
    plain = client.post(f"/v1/{task}", json=body)
    assert plain.status_code == 200, plain.text
    plain = plain.json()
    response = client.post(f"/v1/{task}", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) <= {"delta"}, names
    deltas = [json.loads(data)["text"] for name, data in events if name == "delta"]
    done = json.loads(events[-1][1])
    assert "".join(deltas).strip() == plain["answer"] == done["answer"]
    assert {k: v for k, v in done.items() if k != "stats"} == {
        k: v for k, v in plain.items() if k != "stats"
    }
    if task in ("describe", "ask"):
        assert len(deltas) > 1, "a generated answer arrives in pieces"


def test_every_region_form_names_the_same_region(client):
    """A box, its rectangle as a PNG mask, as RLE (both forms), and in `regions`: one answer."""
    mask = box_mask(SQUARE)
    rle = encode_rle(mask)
    forms = {
        "box": {"box": SQUARE},
        "boxes": {"boxes": [SQUARE]},
        "mask-png": {"mask": png_base64(mask.astype(np.uint8) * 255)},
        "mask-png-data-url": {"mask": "data:image/png;base64," + png_base64(mask)},
        "rle-compressed": {"mask": rle},
        "rle-runs": {"masks": [{"size": rle["size"], "counts": decode_counts(rle["counts"])}]},
        "regions": {"regions": [{"mask": rle}]},
    }
    answers = {name: describe(client, **form).json()["answer"] for name, form in forms.items()}
    assert len(set(answers.values())) == 1, answers
    images = {
        "png": EXAMPLE_PNG,
        "data-url": EXAMPLE_DATA_URL,
        "jpeg": jpeg_base64(EXAMPLE, quality=95),
        "jpeg-data-url": "data:image/jpeg;base64," + jpeg_base64(EXAMPLE, quality=95),
    }
    responses = {name: describe(client, box=SQUARE, image=image) for name, image in images.items()}
    assert all(r.status_code == 200 for r in responses.values()), responses
    answers = {name: r.json()["answer"] for name, r in responses.items()}
    assert answers["png"] == answers["data-url"] and answers["jpeg"] == answers["jpeg-data-url"]


def test_several_regions_are_described_in_one_batch(client, serve_session):
    body = describe(client, boxes=[CIRCLE, SQUARE, STAR]).json()
    singles = [
        serve_session.describe(EXAMPLE, tuple(b), max_new_tokens=TOKENS)
        for b in (CIRCLE, SQUARE, STAR)
    ]
    assert body["answers"] == singles
    assert body["answer"] == singles[0]
    assert body["stats"]["regions"] == 3


def test_a_jpeg_is_turned_upright_by_its_exif_orientation(client):
    """Browsers show a JPEG upright; regions are drawn on what they show."""
    tall = np.zeros((60, 40, 3), dtype=np.uint8)
    tall[:10] = 255  # a white band at the top of the upright picture
    sideways = Image.fromarray(tall).transpose(Image.Transpose.ROTATE_90)  # stored 40 x 60
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to show
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", exif=exif, quality=95)
    image = base64.b64encode(buffer.getvalue()).decode()
    body = describe(client, image=image, box=[0, 0, 40, 10], max_new_tokens=2).json()
    assert body["stats"]["original_size"] == [60, 40]  # (H, W) upright


def gif_base64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(EXAMPLE).save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode()


def truncated_png() -> str:
    raw = example_path().read_bytes()
    return base64.b64encode(raw[: len(raw) // 2]).decode()


BAD = {
    # name: (path, body changes, status, what the message says)
    "not-base64": ("describe", {"image": "%%%"}, 400, "image is not valid base64"),
    "not-an-image": ("describe", {"image": base64.b64encode(b"hello").decode()}, 400, "is not a PNG or JPEG"),
    "gif": ("describe", {"image": gif_base64()}, 400, "is not a PNG or JPEG"),
    "truncated-png": ("describe", {"image": truncated_png()}, 400, "could not be decoded"),
    "bad-data-url": ("describe", {"image": "data:image/png,abc"}, 400, "data:<type>;base64"),
    "no-image": ("describe", {"image": None}, 422, "image"),
    "no-region": ("describe", {"box": None}, 422, "exactly one of mask, masks, box, boxes or regions"),
    "two-region-fields": ("describe", {"mask": "abc"}, 422, "got mask, box"),
    "three-number-box": ("describe", {"box": [1, 2, 3]}, 422, "box"),
    "box-outside": ("describe", {"box": [400, 300, 500, 400]}, 400, "lies outside the 320x240 image"),
    "box-inverted": ("describe", {"box": [50, 10, 40, 30]}, 400, "needs x1 > x0"),
    "empty-mask": ("describe", {"box": None, "mask": png_base64(np.zeros((240, 320), np.uint8))}, 400, "mask 1 is empty"),
    "mask-size": ("describe", {"box": None, "mask": png_base64(np.ones((10, 10), np.uint8))}, 400, "mask 1 is 10x10 but the image is 320x240"),
    "mask-jpeg": ("describe", {"box": None, "mask": jpeg_base64(np.ones((240, 320), np.uint8))}, 400, "regions[0] is not a PNG"),
    "rle-short": ("describe", {"box": None, "mask": {"size": [240, 320], "counts": [5, 5]}}, 400, "cover 10 pixels"),
    "rle-bad-string": ("describe", {"box": None, "mask": {"size": [240, 320], "counts": "~~"}}, 400, "holds '~'"),
    "region-both": ("describe", {"box": None, "regions": [{"box": CIRCLE, "mask": "x"}]}, 422, "not both"),
    "tokens-zero": ("describe", {"max_new_tokens": 0}, 422, "max_new_tokens"),
    "temperature-high": ("describe", {"temperature": 5}, 422, "temperature"),
    "stream-many": ("describe", {"box": None, "boxes": [CIRCLE, SQUARE], "stream": True}, 422, "a streamed describe takes one region"),
    "classify-two": ("classify", {"box": None, "boxes": [CIRCLE, SQUARE]}, 422, "takes one region; got 2"),
    "refer-blank": ("refer", {"box": None, "boxes": [CIRCLE, SQUARE], "expression": "   "}, 400, "expression is empty"),
    "refer-missing": ("refer", {"box": None, "boxes": [CIRCLE]}, 422, "expression"),
    "ask-region3": ("ask", {"box": None, "boxes": [CIRCLE, SQUARE], "question": "Is <region3> red?"}, 400, "names <region3> but 2 mask"),
    "ask-unnamed": ("ask", {"question": "What is it?"}, 400, "never names <region1>"),
    "ask-image-token": ("ask", {"question": "<image> What is <region1>?"}, 400, "without <image>"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_are_4xx_json_that_name_the_problem(client, case):
    path, changes, status, message = BAD[case]
    body = {"image": EXAMPLE_PNG, "box": CIRCLE, "max_new_tokens": 4, **changes}
    body = {key: value for key, value in body.items() if value is not None}
    if path in ("classify", "refer"):
        body.pop("max_new_tokens")
    response = client.post(f"/v1/{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"], error
    assert error["type"] and "Traceback" not in response.text


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/describe", b"{not json", 422),
        ("POST", "/v1/describe", b"[1, 2]", 422),
        ("POST", "/v1/describe", b"[" * 100_000, 400),
        ("POST", "/v1/describe", b'{"image": "\xff\xfe"}', 400),
        ("GET", "/v1/describe", None, 405),
        ("GET", "/v1/nothing", None, 404),
    ],
    ids=[
        "malformed-json",
        "json-array",
        "deep-nesting",
        "not-utf8",
        "wrong-method",
        "unknown-path",
    ],
)
def test_malformed_requests_are_json_errors(client, method, path, content, status):
    response = client.request(
        method, path, content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    "text", ["</s>", "<s>", "<pad>", "<unk>", "<region>", "<region0>", "<image>"]
)
def test_special_tokens_in_text_never_break_the_server(client, text):
    bodies = {
        "ask": {"box": CIRCLE, "question": f"What is <region1>? {text}", "max_new_tokens": 4},
        "refer": {"boxes": [CIRCLE, SQUARE], "expression": text},
        "classify": {"box": CIRCLE, "vocabulary": text},
    }
    for path, body in bodies.items():
        response = client.post(f"/v1/{path}", json={"image": EXAMPLE_PNG, **body})
        assert response.status_code in (200, 400), (path, response.text)


def test_info_health_schema_and_page(client):
    info = client.get("/v1/info").json()
    assert info["session"]["model"] == "tiny" and info["session"]["device"] == "cpu"
    assert info["limits"]["max_regions"] == 16 and info["queue"]["queue_depth"] == 8
    assert client.get("/healthz").json() == {
        "status": "ok",
        "queue": {"running": 0, "waiting": 0, "queue_depth": 8},
    }
    schema = client.get("/openapi.json").json()
    for path in ("/v1/describe", "/v1/classify", "/v1/refer", "/v1/ask", "/v1/chat/completions"):
        assert "post" in schema["paths"][path], path
        assert "text/event-stream" in schema["paths"][path]["post"]["responses"]["200"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    for asset in [*assets, "/static/example.png"]:
        response = client.get(asset)
        assert response.status_code == 200, asset
    for text in (
        page.text,
        client.get("/static/app.js").text,
        client.get("/static/style.css").text,
    ):
        assert "http://" not in text and "https://" not in text, "every asset is served here"


def test_the_example_image_is_what_example_py_draws():
    from rgpt_rt.serve.example import draw_example

    np.testing.assert_array_equal(EXAMPLE, np.asarray(draw_example()))


def test_every_region_form_decodes_to_the_same_mask():
    from rgpt_rt.serve.limits import ServeLimits
    from rgpt_rt.serve.media import decode_regions
    from rgpt_rt.serve.schemas import Region

    mask = box_mask(STAR)
    rle = encode_rle(mask)
    regions = [
        Region(mask=png_base64(mask.astype(np.uint8) * 255)),
        Region(mask="data:image/png;base64," + png_base64(mask)),
        Region(mask=rle),
        Region(mask={"size": rle["size"], "counts": decode_counts(rle["counts"])}),
        Region(mask=png_base64(np.stack([mask * 200] * 3, axis=-1).astype(np.uint8))),  # RGB
    ]
    for decoded in decode_regions(regions, ServeLimits()):
        np.testing.assert_array_equal(decoded, mask)
    assert decode_regions([Region(box=STAR)], ServeLimits()) == [tuple(float(v) for v in STAR)]
