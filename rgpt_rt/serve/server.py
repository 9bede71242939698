"""The HTTP server under the app: uvicorn on HTTP/1.1, with time limits on slow clients.

    run_server(create_app(session, limits), limits, host="127.0.0.1", port=8080)

    a connection that sends nothing               closed after --idle-timeout (as between
                                                  kept-alive requests)
    a request line and headers that trickle in    closed after --header-timeout, with a 408
    a body that trickles in                       408 after --body-timeout (guard.py)

uvicorn times out only idle kept-alive connections; the request head is timed here, by a
subclass of its h11 protocol (uvicorn>=0.29 keeps the hooks used: on_response_complete,
timeout_keep_alive_task).
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rgpt_rt.serve.errors import error_body, log
from rgpt_rt.serve.limits import ServeLimits


def _timeout_response(message: str) -> bytes:
    body = json.dumps(error_body(408, message, "headers", "timeout")).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection is timed out while idle from the start (not
    only between requests), and a request's head must arrive within header_timeout_s of its
    first byte."""

    header_timeout_s = 10.0  # set per server by timed_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        # Idle until the first byte, which cancels this timer as it cancels uvicorn's own.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._time_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._time_head()  # a pipelined request may have begun

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _time_head(self) -> None:
        """A head timer runs while part of a request head is in and the rest is not."""
        reading_head = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if not reading_head:
            self._stop_head_timer()
        elif self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        message = (
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s "
            "(--header-timeout)"
        )
        log.info("closing a connection from %s: %s", self.client, message)
        self.transport.write(_timeout_response(message))
        self.transport.close()


def timed_protocol(header_timeout_s: float) -> type[TimedH11Protocol]:
    """TimedH11Protocol with its head time limit (uvicorn makes one per connection)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": header_timeout_s})


def run_server(app, limits: ServeLimits, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` until interrupted, with the connection time limits of `limits`."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=timed_protocol(limits.header_timeout_s),
        timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]  (a float works)
    )
    uvicorn.Server(config).run()
