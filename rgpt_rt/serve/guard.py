"""What every HTTP request goes through before the app sees it, cheapest check first:

    Host header not allowed (--allow-host)           400, before any of the body is read
    Content-Length over --max-body-bytes             413, before any of the body is read
    body bytes over --max-body-bytes as they come    413, reading stops
    body JSON values over --max-json-values          413, once the body is in (the rest is
                                                     read and dropped, not kept or parsed)
    body not in within --body-timeout                408

Refusals that leave the body unread close the connection. The body is counted chunk by chunk
(bytes.count, a few ms for 64 MB), so a 42 MB body of 3 million boxes is refused having kept
3 MB of it and parsed none.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rgpt_rt.serve.errors import ApiError, error_response
from rgpt_rt.serve.limits import LOCAL_HOSTS, ServeLimits


def json_values(chunk: bytes) -> int:
    """An upper bound on the JSON values a piece of a body adds: every value but the first of
    a list or object follows a comma, and every list and object opens with a bracket."""
    return chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")


class RequestGuard:
    """ASGI middleware: the Host allow-list, then the body read here within its limits and
    handed to the app whole."""

    def __init__(self, app: ASGIApp, limits: ServeLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refusal = self.check_head(headers)
        if refusal is not None:
            await self.refuse(refusal, scope, receive, send, close=True)
            return
        body, refusal, close = await self.read_body(receive)
        if refusal is not None:
            await self.refuse(refusal, scope, receive, send, close=close)
            return
        if body is None:
            return  # the client went away
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def check_head(self, headers: dict[bytes, bytes]) -> ApiError | None:
        host = headers.get(b"host")
        if host is None:
            return ApiError(400, "the request has no Host header", "host", "host_not_allowed")
        name = host.decode("latin-1")
        if not self.limits.allows_host(name):
            extra = [h for h in self.limits.allowed_hosts if h not in LOCAL_HOSTS]
            return ApiError(
                400,
                f"this server does not answer to the host {name!r} (it answers to "
                f"{', '.join([*LOCAL_HOSTS, *extra])}); to reach it by that name, start it "
                "with --allow-host NAME. The check keeps web pages from reaching a local server "
                "through DNS rebinding",
                "host",
                "host_not_allowed",
            )
        declared = headers.get(b"content-length")
        # The ASGI server delivers no more than a Content-Length declares.
        if declared is not None and (
            not declared.isdigit() or int(declared) > self.limits.max_body_bytes
        ):
            return self.too_large()
        return None

    async def read_body(self, receive: Receive) -> tuple[bytearray | None, ApiError | None, bool]:
        """(the body, None, _), or (None, the refusal, whether to close the connection), or
        (None, None, _) when the client went away."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout_s
        body: bytearray | None = bytearray()
        size = values = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                timeout = ApiError(
                    408,
                    f"the request body did not arrive within {limits.body_timeout_s:g} s "
                    "(--body-timeout)",
                    "body",
                    "timeout",
                )
                return None, timeout, True
            if message["type"] != "http.request":
                return None, None, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                return None, self.too_large(), True
            if body is not None:
                values += json_values(chunk)
                if values > limits.max_json_values:
                    body = None  # refused: the rest is read and dropped
                else:
                    body += chunk
            if not message.get("more_body", False):
                break
        if body is None:
            too_many = ApiError(
                413,
                f"the request body holds over {limits.max_json_values:,} JSON values "
                "(--max-json-values); send at most --max-regions regions, and big masks as a "
                "PNG or a compressed RLE rather than a list of runs",
                "body",
            )
            return None, too_many, False
        return body, None, False

    def too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is over the {self.limits.max_body_bytes:,}-byte limit "
            "(--max-body-bytes)",
            "body",
        )

    @staticmethod
    async def refuse(error: ApiError, scope: Scope, receive: Receive, send: Send, close: bool):
        response = error_response(error)
        if close:  # the body is left unread: this connection cannot carry another request
            response.headers["connection"] = "close"
        await response(scope, receive, send)
