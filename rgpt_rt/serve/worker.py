"""The one thread that runs model calls, with a bounded queue in front of it.

    worker = ModelWorker(queue_depth=8)
    run = worker.submit(work, deadline)        # QueueFull when 1 + queue_depth are already in
    async for kind, value in run.events():     # ("delta", text) ..., then ("result", value)
        ...

`work(run)` runs on the model thread: it decodes the request, calls the Session, hands each
text delta to `run.emit` and calls `run.check()` between them, which raises once the request
is past its deadline or its client has gone. The Session serialises model calls anyway; running
them on one thread, in arrival order, also keeps `session.stats` belonging to the call that has
just finished, and keeps one decoded request in memory at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# How long past its deadline the event loop waits for a model call that cannot be interrupted
# (one vision pass, a classify) before it answers 504 itself.
GRACE_S = 2.0


class QueueFull(Exception):
    """1 + queue_depth requests are already running or waiting."""


class TimedOut(Exception):
    """The request ran past its time limit; `queued` when it never reached the model."""

    def __init__(self, message: str, queued: bool):
        super().__init__(message)
        self.queued = queued


class Cancelled(Exception):
    """The client went away: nobody reads the answer any more."""


class Run:
    """One request's model work: its deadline, its events, and its cancellation."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float, limit_s: float):
        self.deadline = deadline  # time.monotonic() seconds
        self.started = False  # set by the model thread when this run leaves the queue
        self._limit_s = limit_s
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()

    # --- the model thread's side ----------------------------------------------------------
    def emit(self, delta: str) -> None:
        """Hand one text delta to the request."""
        self._post(("delta", delta))

    def check(self) -> None:
        """Raise Cancelled or TimedOut when this request should stop."""
        if self._cancelled.is_set():
            raise Cancelled("the client went away")
        if time.monotonic() > self.deadline:
            raise self._timed_out()

    def relay(self, answer) -> str:
        """Pass on the deltas of a Session answer stream, checking between them; returns the
        whole answer. The stream is closed (its KV cache freed) however this ends."""
        parts: list[str] = []
        try:
            for delta in answer:
                parts.append(delta)
                self.emit(delta)
                self.check()
        finally:
            answer.close()
        return "".join(parts).strip()

    def _post(self, event: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: shutting down
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    # --- the event loop's side ------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("delta", text) events, then one ("result", value); raises what the work raised."""
        while True:
            remaining = self.deadline + GRACE_S - time.monotonic()
            try:
                kind, value = await asyncio.wait_for(self._events.get(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                self.cancel()
                raise self._timed_out() from None
            if kind == "error":
                raise value
            yield kind, value
            if kind == "result":
                return

    def _timed_out(self) -> TimedOut:
        if self.started:
            return TimedOut(
                f"the answer ran past the request time limit of {self._limit_s:g} s; "
                "ask for fewer tokens (max_new_tokens) or raise --request-timeout",
                queued=False,
            )
        return TimedOut(
            f"the request waited in the queue past the time limit of {self._limit_s:g} s; "
            "the server is busy, try again later",
            queued=True,
        )


class ModelWorker:
    def __init__(self, queue_depth: int):
        self.queue_depth = queue_depth
        self._executor: ThreadPoolExecutor | None = None  # started by the first request
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0

    def state(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self._running,
                "waiting": self._admitted - self._running,
                "queue_depth": self.queue_depth,
            }

    def submit(self, work: Callable[[Run], Any], deadline: float, limit_s: float) -> Run:
        """Queue `work` for the model thread; QueueFull at once when there is no room.
        Call from the event loop."""
        with self._lock:
            if self._admitted >= 1 + self.queue_depth:
                raise QueueFull(
                    f"the server is busy: one request is running and {self.queue_depth} are "
                    "waiting (--queue-depth); try again shortly"
                )
            self._admitted += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rgpt-model")
            executor = self._executor
        run = Run(asyncio.get_running_loop(), deadline, limit_s)
        executor.submit(self._execute, work, run)
        return run

    def shutdown(self) -> None:
        """Let the model thread end once what it was given has run. A later
        request starts a new one (an app's lifespan may run more than once in tests)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def _execute(self, work: Callable[[Run], Any], run: Run) -> None:
        with self._lock:
            self._running += 1
        try:
            event = self._outcome(work, run)
        finally:
            with self._lock:
                self._running -= 1
                self._admitted -= 1
        run._post(event)  # after the slot is free: a client that has its answer sees room

    @staticmethod
    def _outcome(work: Callable[[Run], Any], run: Run) -> tuple[str, Any]:
        try:
            run.check()  # left before its turn came, or waited past its deadline
            run.started = True
            return ("result", work(run))
        except Exception as error:
            return ("error", error)
