"""Limits, the bounded queue (503 when full), request time (504, or an error event once a
stream has started), and what a cancelled answer frees."""

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
from payloads import CIRCLE, EXAMPLE_PNG, SQUARE, STAR, parse_sse, png_base64
from PIL import Image

from rgpt_rt.serve import ServeLimits, create_app, worker
from rgpt_rt.serve.example import example_path


class GatedSession:
    """The real Session, but describe() first waits for `gate`: it holds the model thread, so
    what queues behind it is up to the test."""

    def __init__(self, session, delay_per_delta: float = 0.0):
        self._session = session
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.delay = delay_per_delta

    def __getattr__(self, name):
        return getattr(self._session, name)

    def describe(self, *args, **kwargs):
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        answer = self._session.describe(*args, **kwargs)
        return SlowStream(answer, self.delay) if kwargs.get("stream") else answer


class SlowStream:
    """A Session answer stream that waits `delay` s before each delta, and counts them."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.count = inner, delay, 0

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        delta = next(self.inner)
        self.count += 1
        return delta

    def close(self):
        self.inner.close()


def post_describe(client, **body):
    body = {"image": EXAMPLE_PNG, "box": CIRCLE, "max_new_tokens": 4, **body}
    return client.post("/v1/describe", json=body)


async def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        await asyncio.sleep(0.01)


def run_async(app, scenario):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await scenario(client)

    return asyncio.run(main())


def test_a_full_queue_answers_503_at_once_and_the_rest_still_run(serve_session):
    gated = GatedSession(serve_session)
    app = create_app(gated, ServeLimits(queue_depth=1))
    state = app.state.service.worker.state

    async def scenario(client):
        running = asyncio.create_task(post_describe(client))
        await until(gated.entered.is_set)
        waiting = asyncio.create_task(post_describe(client, box=SQUARE))
        await until(lambda: state()["waiting"] == 1)
        started = time.monotonic()
        refused = await post_describe(client, box=STAR)
        refused_in = time.monotonic() - started
        health = await client.get("/healthz")
        gated.gate.set()
        return refused, refused_in, health, await running, await waiting

    refused, refused_in, health, running, waiting = run_async(app, scenario)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "--queue-depth" in error["message"]
    assert refused_in < 5, "a refusal does not wait for the model"
    assert health.json()["queue"] == {"running": 1, "waiting": 1, "queue_depth": 1}
    assert running.status_code == 200 and waiting.status_code == 200
    assert state() == {"running": 0, "waiting": 0, "queue_depth": 1}


def test_past_the_time_limit_running_is_504_and_waiting_is_503(serve_session, monkeypatch):
    monkeypatch.setattr(worker, "GRACE_S", 0.1)
    gated = GatedSession(serve_session)
    app = create_app(gated, ServeLimits(request_timeout_s=0.5, queue_depth=2))
    state = app.state.service.worker.state

    async def scenario(client):
        running = asyncio.create_task(post_describe(client))
        await until(gated.entered.is_set)
        waiting = asyncio.create_task(post_describe(client, box=SQUARE))
        results = await running, await waiting
        gated.gate.set()  # the stuck call ends; the queued one was cancelled and is skipped
        await until(lambda: state()["running"] == 0 and state()["waiting"] == 0)
        gated.entered.clear()
        return (*results, await post_describe(client, max_new_tokens=2))

    running, waiting, after = run_async(app, scenario)
    assert running.status_code == 504, running.text
    assert "ran past the request time limit of 0.5 s" in running.json()["error"]["message"]
    assert waiting.status_code == 503, waiting.text
    assert "waited in the queue past the time limit" in waiting.json()["error"]["message"]
    assert after.status_code == 200, "the server recovers"


def test_a_stream_past_the_time_limit_ends_with_an_error_event(serve_session):
    gated = GatedSession(serve_session, delay_per_delta=0.2)
    gated.gate.set()
    app = create_app(gated, ServeLimits(request_timeout_s=1.0))

    async def scenario(client):
        return await post_describe(client, stream=True, max_new_tokens=40)

    response = run_async(app, scenario)
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[-1][0] == "error", events
    error = json.loads(events[-1][1])["error"]
    assert error["code"] == "timeout" and "request time limit of 1 s" in error["message"]
    assert all(name == "delta" for name, _ in events[:-1]) and len(events) < 40


def test_a_cancelled_answer_stops_and_frees_its_kv_cache(serve_session):
    """What happens when a client goes away: the model thread stops at the next token and the
    answer's KV cache goes back to the Session's pool."""
    image = np.asarray(Image.open(example_path()).convert("RGB"))
    model = worker.ModelWorker(queue_depth=1)
    seen = {}

    def free_caches() -> int:
        return serve_session.stages.pool.free_caches

    def work(run):
        answer = serve_session.describe(image, tuple(CIRCLE), stream=True, max_new_tokens=200)
        answer = SlowStream(answer, 0.05)
        seen["free_while_streaming"] = free_caches()
        try:
            return run.relay(answer)
        finally:
            seen["deltas"] = answer.count

    async def main():
        run = model.submit(work, time.monotonic() + 60, 60)
        events = run.events()
        assert (await anext(events))[0] == "delta"
        run.cancel()
        with pytest.raises(worker.Cancelled):
            async for _ in events:
                pass

    try:
        asyncio.run(main())
    finally:
        model.shutdown()
    assert 1 <= seen["deltas"] <= 5, seen
    assert free_caches() == seen["free_while_streaming"] + 1


LIMITED = ServeLimits(
    max_body_bytes=200_000,
    max_image_bytes=20_000,
    max_image_pixels=320 * 240,
    max_text_chars=40,
    max_regions=2,
    max_new_tokens=8,
)


def huge_png_header() -> str:
    """A PNG that claims to be 50000 x 50000 pixels: refused by its header, never decoded."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return base64.b64encode(raw + chunk(b"IEND", b"")).decode()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"image": "A" * 40_000}, 413, "over the 20,000-byte limit (--max-image-bytes)"),
        ({"image": png_base64(np.zeros((300, 300, 3), np.uint8))}, 413, "over the 76,800-pixel limit"),
        ({"image": huge_png_header()}, 413, "pixel"),
        ({"box": None, "mask": {"size": [1000, 1000], "counts": [1_000_000]}}, 413, "over the 76,800-pixel limit"),
        ({"box": None, "boxes": [CIRCLE, SQUARE, STAR]}, 422, "3 regions were given; this server takes at most 2"),
        ({"max_new_tokens": 9}, 422, "answers at most 8 tokens (--max-new-tokens)"),
        ({"path": "ask", "question": "<region1> " + "x" * 40}, 422, "at most 40 (--max-text-chars)"),
        ({"box": None, "boxes": [CIRCLE] * 20000}, 413, "body is over the 200,000-byte limit"),
    ],
    ids=["image-bytes", "image-pixels", "png-header", "rle-pixels", "regions", "tokens", "text", "body"],
)  # fmt: skip
def test_each_limit_is_a_4xx_that_names_it(make_client, body, status, message):
    client = make_client(LIMITED)
    body = {"image": EXAMPLE_PNG, "box": CIRCLE, "max_new_tokens": 4, **body}
    path = body.pop("path", "describe")
    if path == "ask":
        body.pop("max_new_tokens")
    response = client.post(f"/v1/{path}", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_json_values_are_counted_as_the_body_arrives(make_client):
    """A body of more values than --max-json-values is refused before it is parsed, whether
    it declares its length or comes in chunks; one value fewer is parsed as usual."""
    client = make_client(ServeLimits(max_json_values=1000))
    boxes = [CIRCLE] * 199  # 5 values each, 4 more in the rest of the body: 999
    body = json.dumps({"image": EXAMPLE_PNG, "boxes": boxes}).encode()
    assert client.post("/v1/describe", content=body).status_code == 422  # over --max-regions
    body = json.dumps({"image": EXAMPLE_PNG, "boxes": [*boxes, CIRCLE]}).encode()
    chunks = (body[i : i + 100] for i in range(0, len(body), 100))
    for content in (body, chunks):
        response = client.post("/v1/describe", content=content)
        assert response.status_code == 413, response.text
        assert "over 1,000 JSON values (--max-json-values)" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413(make_client):
    client = make_client(LIMITED)
    piece = json.dumps({"image": EXAMPLE_PNG, "box": CIRCLE, "pad": "x" * 250_000}).encode()
    chunks = (piece[i : i + 8192] for i in range(0, len(piece), 8192))  # no Content-Length
    response = client.post(
        "/v1/describe", content=chunks, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "--max-body-bytes" in response.json()["error"]["message"]


def test_the_model_context_is_a_400_that_says_what_to_do(make_client):
    client = make_client(ServeLimits(max_new_tokens=1000))
    response = client.post(
        "/v1/ask",
        json={
            "image": EXAMPLE_PNG,
            "box": CIRCLE,
            "question": "Is <region1> red?",
            "max_new_tokens": 600,
        },
    )
    assert response.status_code == 400
    # the Session's word: the range max_new_tokens may take, or what to lower to fit the context
    assert "max_new_tokens" in response.json()["error"]["message"]


def test_serve_options_make_the_limits():
    from rgpt_rt.cli import build_parser, serve_limits

    args = build_parser().parse_args(
        ["serve", "--host", "0.0.0.0", "--allow-host", "Edge.Local", "--allow-host", "::1",
         "--header-timeout", "2.5", "--body-timeout", "4", "--idle-timeout", "1",
         "--max-json-values", "5000"]
    )  # fmt: skip
    limits = serve_limits(args)
    assert limits.allowed_hosts == ("localhost", "127.0.0.1", "[::1]", "edge.local", "0.0.0.0")
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.idle_timeout_s) == (2.5, 4, 1)
    assert limits.max_json_values == 5000
    default = serve_limits(build_parser().parse_args(["serve"]))
    assert default.allowed_hosts == ("localhost", "127.0.0.1", "[::1]")
    assert default == ServeLimits(), "the command's defaults are ServeLimits'"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True), ("LOCALHOST:8080", True), ("localhost.", True), ("127.0.0.1:1", True),
        ("[::1]:8080", True), ("[::1]", True), ("evil.example", False), ("localhost.evil", False),
        ("127.0.0.2", False), ("[::2]:80", False), ("", False),
    ],
)  # fmt: skip
def test_the_host_allow_list_reads_host_headers(host, allowed):
    assert ServeLimits().allows_host(host) is allowed
    assert ServeLimits(allowed_hosts=("*",)).allows_host(host)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_regions must be positive"):
        ServeLimits(max_regions=0)
    with pytest.raises(ValueError, match="queue_depth must be 0 or more"):
        ServeLimits(queue_depth=-1)
    with pytest.raises(ValueError, match="body_timeout_s must be positive"):
        ServeLimits(body_timeout_s=0)
    with pytest.raises(ValueError, match="allowed_hosts must be a tuple of host names"):
        ServeLimits(allowed_hosts="localhost")
    assert ServeLimits(queue_depth=0).queue_depth == 0
