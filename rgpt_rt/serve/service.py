"""What the endpoints share: the Session, the limits, the model thread, and how a run's events
become a response.

    service = Service(session, limits)
    run = service.submit(work)                 # work(run) runs on the model thread
    result = await result_of(run, request)     # not streamed; cancelled if the client leaves
    events, first = await start_stream(run)    # streamed: bad input raises before any byte
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from rgpt_rt.serve.errors import ApiError, as_api_error, error_body, log
from rgpt_rt.serve.limits import ServeLimits
from rgpt_rt.serve.schemas import ErrorResponse
from rgpt_rt.serve.worker import ModelWorker, Run

# How the OpenAPI schema documents the errors and the streamed form of every model endpoint.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "input that cannot be used: not an image, an empty mask, a box outside the image, "
        "text that is not valid Unicode; or a Host header this server does not answer to",
        408: "the body did not arrive within the body time limit",
        413: "the body (its bytes or its JSON values), an image or a mask is over a size limit",
        422: "not what the schema asks for, or over a count limit (regions, tokens, text)",
        503: "the queue is full, or the request waited in it past its time limit",
        504: "the answer ran past the request time limit",
    }.items()
}
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {"type": "string"},
                "description": "with stream: true, server-sent events",
            }
        }
    }
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Service:
    def __init__(self, session, limits: ServeLimits):
        self.session = session
        self.limits = limits
        self.worker = ModelWorker(limits.queue_depth)

    def submit(self, work: Callable[[Run], Any]) -> Run:
        """Queue `work` for the model thread with this request's deadline (QueueFull: 503)."""
        limit = self.limits.request_timeout_s
        return self.worker.submit(work, time.monotonic() + limit, limit)

    def check_tokens(self, max_new_tokens: int, param: str = "max_new_tokens") -> None:
        if max_new_tokens > self.limits.max_new_tokens:
            raise ApiError(
                422,
                f"{param} is {max_new_tokens}; this server answers at most "
                f"{self.limits.max_new_tokens} tokens (--max-new-tokens)",
                param,
            )

    def check_text(self, length: int, param: str) -> None:
        if length > self.limits.max_text_chars:
            raise ApiError(
                422,
                f"{param} holds {length:,} characters; this server takes at most "
                f"{self.limits.max_text_chars:,} (--max-text-chars)",
                param,
            )

    def stats(self) -> dict[str, Any]:
        """The Session's stats of the call that just finished (on the model thread, where
        calls run one at a time, so they are this call's)."""
        return dict(self.session.stats)


async def result_of(run: Run, request: Request) -> Any:
    """The work's result, its deltas skipped. The run is cancelled (the model stops at its next
    token, or skips it if still queued) when the client goes away or this is abandoned."""
    watch = asyncio.create_task(cancel_on_disconnect(run, request))
    try:
        async for kind, value in run.events():
            if kind == "result":
                return value
    finally:
        watch.cancel()
        run.cancel()
    raise RuntimeError("the model thread ended a run without a result")


async def cancel_on_disconnect(run: Run, request: Request) -> None:
    """Cancel `run` once the client has gone (the body was read before: what the ASGI server
    sends next is the disconnect, when it comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.cancel()


async def start_stream(run: Run) -> tuple[AsyncIterator[tuple[str, Any]], tuple[str, Any]]:
    """The run's events and the first of them. Bad input raises here, so it is answered as a
    JSON 4xx before any byte of a stream is sent."""
    events = run.events()
    try:
        first = await anext(events)
    except BaseException:
        run.cancel()
        raise
    return events, first


def stream_error(error: Exception) -> dict[str, Any]:
    """The body of the error event that ends a stream which broke off."""
    api = as_api_error(error)
    if api is None:
        log.error("internal error during a stream", exc_info=error)
        return error_body(500, "internal server error; the server log has the details")
    return api.body()
