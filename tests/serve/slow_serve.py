"""`rgpt-rt serve` whose answers come slowly: python slow_serve.py serve ARGS... (as
`rgpt-rt serve`). Each streamed describe or ask waits SLOW_SERVE_DELAY_S seconds (default 0.05)
before each text delta, so that a test has time to leave in the middle of an answer."""

from __future__ import annotations

import os
import sys
import time

from rgpt_rt import cli

DELAY_S = float(os.environ.get("SLOW_SERVE_DELAY_S", "0.05"))


class SlowStream:
    def __init__(self, answer):
        self.answer = answer

    def __iter__(self):
        return self

    def __next__(self) -> str:
        time.sleep(DELAY_S)
        return next(self.answer)

    def close(self) -> None:
        self.answer.close()


class SlowSession:
    """The Session, with its streamed describe and ask slowed down."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def describe(self, *args, **kwargs):
        answer = self._session.describe(*args, **kwargs)
        return SlowStream(answer) if kwargs.get("stream") else answer

    def ask(self, *args, **kwargs):
        answer = self._session.ask(*args, **kwargs)
        return SlowStream(answer) if kwargs.get("stream") else answer


if __name__ == "__main__":
    open_session = cli.open_session
    cli.open_session = lambda args: SlowSession(open_session(args))
    sys.exit(cli.main(sys.argv[1:]))
