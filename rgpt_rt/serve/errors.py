"""Every error the server answers, as JSON in OpenAI's shape, never a traceback:

    {"error": {"message": "mask 1 is empty (no pixel set); ...", "type": "invalid_request_error",
               "param": "masks", "code": "bad_input"}}

400 input that cannot be used (not an image, an empty mask, a box outside the image, text
that is not valid Unicode, a Host the server does not answer to, ...), 408 a body that did not
arrive in time, 413 too large, 422 not what the schema asks for or over a count limit, 503
queue full or waited too long, 504 answer ran past its time; 500 only for a fault of the server
itself, whose details go to the server's log. (A client that went away is sent nothing; its
request ends as 499 in the server's own accounts.)
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rgpt_rt.serve.worker import Cancelled, QueueFull, TimedOut

log = logging.getLogger("rgpt_rt.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "request_too_large",
    422: "invalid_request_error",
    503: "server_busy",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {413: "too_large", 422: "over_limit"}.get(status, "bad_input")

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {
            "message": utf8(message),
            "type": kind,
            "param": param and utf8(param),
            "code": code,
        }
    }


def utf8(text: str) -> str:
    """`text` with any lone surrogate ('\\ud800', which JSON can carry into a request and no
    UTF-8 response can carry out) written as the escape it came as."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def as_api_error(error: Exception) -> ApiError | None:
    """The ApiError that answers `error`, or None for a fault of the server."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, QueueFull):
        return ApiError(503, str(error), code="queue_full")
    if isinstance(error, TimedOut):
        return ApiError(503 if error.queued else 504, str(error), code="timeout")
    if isinstance(error, Cancelled):  # nobody reads this answer
        return ApiError(499, str(error), code="client_closed_request")
    if isinstance(error, ValueError | FileNotFoundError):  # the Session's word on bad input
        return ApiError(400, str(error))
    return None


def error_response(error: Exception) -> JSONResponse:
    api = as_api_error(error)
    if api is None:
        log.error("internal error", exc_info=error)
        return JSONResponse(
            error_body(500, "internal server error; the server log has the details"), 500
        )
    headers = {"Retry-After": "1"} if api.status == 503 else None
    return JSONResponse(api.body(), api.status, headers=headers)


# Parts of a pydantic error location that name a member of a union, not a field:
# "str", "list[...]", "function-after[...]", "RLE".
_UNION_MEMBER = re.compile(r"[\[(]|^[A-Z]|^(str|int|float|bool|list|dict|none)$")


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """'messages.0.content.0: Input tag 'input_audio' ... does not match' for the most specific
    problem (and a count of the rest), and the top-level field it is in."""
    problems = error.errors()
    if not problems:
        return "the request does not match its schema", None
    # A value that fits no member of a union fails once per member: the deepest says most.
    first = max(problems, key=lambda problem: len(problem.get("loc", ())))
    parts = [
        str(part)
        for part in first.get("loc", ())
        if part != "body" and not (isinstance(part, str) and _UNION_MEMBER.search(part))
    ]
    text = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{'.'.join(parts)}: {text}" if parts else text
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return message, (parts[0] if parts else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return JSONResponse(error_body(422, message, param, "invalid_schema"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(error.status_code, str(error.detail)),
            error.status_code,
            headers=getattr(error, "headers", None),
        )

    async def known(request: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    for kind in (ApiError, QueueFull, TimedOut, Cancelled, ValueError, FileNotFoundError):
        app.add_exception_handler(kind, known)
    # Anything else is a fault of the server: Starlette answers it with this handler (a JSON
    # 500 without details) and re-raises it to the ASGI server, which logs it.
    app.add_exception_handler(Exception, known)
