"""The HTTP API of a Session: task endpoints, OpenAI chat completions, and the page at /.

    limits = ServeLimits()
    app = create_app(rgpt_rt.Session(bundle), limits)
    run_server(app, limits, "127.0.0.1", 8080)                # what `rgpt-rt serve` does
                                                              # (server.py: uvicorn, timed)

    POST /v1/describe  /v1/classify  /v1/refer  /v1/ask      JSON in, JSON out; "stream": true
                                                              answers as server-sent events
    POST /v1/chat/completions                                 OpenAI-compatible (openai.py)
    GET  /v1/info  /v1/models  /healthz  /openapi.json  /     the page: static/index.html

A streamed answer is a series of events, each `event: NAME` + `data: JSON`:
    delta   {"text": " a red"}                                a piece of the answer, in order
    done    {the response the non-streamed call returns}      last, with the stats
    error   {"error": {"message", "type", "param", "code"}}   last, if the answer broke off
Bad input is answered before a stream starts, as a 4xx JSON error. Every request first passes
guard.py (Host allow-list, body size, JSON value count, body time); a client that goes away
cancels its answer, streamed or not, at the next token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

import rgpt_rt
from rgpt_rt.prompts import refer_answer
from rgpt_rt.serve import openai as openai_api
from rgpt_rt.serve.errors import ApiError, install_error_handlers
from rgpt_rt.serve.guard import RequestGuard
from rgpt_rt.serve.limits import ServeLimits
from rgpt_rt.serve.media import check_region_count, decode_image, decode_regions
from rgpt_rt.serve.schemas import (
    AskRequest,
    AskResponse,
    ClassifyRequest,
    ClassifyResponse,
    DescribeRequest,
    DescribeResponse,
    Health,
    ReferRequest,
    ReferResponse,
    TaskRequest,
)
from rgpt_rt.serve.service import (
    ERRORS,
    STREAM_HEADERS,
    STREAMED,
    Service,
    result_of,
    start_stream,
    stream_error,
)
from rgpt_rt.serve.worker import Run

STATIC = Path(__file__).resolve().parent / "static"


async def answer(run: Run, stream: bool, request: Request):
    """The response of a task request: its result, or server-sent events of it."""
    if not stream:
        return await result_of(run, request)
    events, first = await start_stream(run)
    return StreamingResponse(
        task_events(first, events, run), media_type="text/event-stream", headers=STREAM_HEADERS
    )


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def task_events(first, events: AsyncIterator, run: Run) -> AsyncIterator[str]:
    try:
        kind, value = first
        while kind == "delta":
            yield sse("delta", {"text": value})
            kind, value = await anext(events)
        yield sse("done", value.model_dump())
    except Exception as error:
        yield sse("error", stream_error(error))
    finally:
        run.cancel()


def task_inputs(body: TaskRequest, limits: ServeLimits) -> tuple[Any, list]:
    """On the model thread: the decoded image and regions of a task request."""
    return decode_image(body.image, limits), decode_regions(body.region_list(), limits)


def create_app(session, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app serving `session` (an rgpt_rt.Session) within `limits`."""
    service = Service(session, limits or ServeLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.worker.shutdown()

    app = FastAPI(
        title="rgpt_rt",
        version=rgpt_rt.__version__,
        summary="Region understanding at the edge (RegionGPT): describe, classify, refer, ask.",
        description=__doc__,
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN; the schema stays
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limits=service.limits)
    add_task_routes(app, service)
    app.include_router(openai_api.router(service))

    @app.get("/v1/info", tags=["server"])
    def info() -> dict[str, Any]:
        """The model, its backends and caches, this server's limits, and its queue."""
        return {
            "rgpt_rt": rgpt_rt.__version__,
            "session": session.info(),
            "limits": service.limits.as_dict(),
            "queue": service.worker.state(),
        }

    @app.get("/healthz", tags=["server"])
    def healthz() -> Health:
        return Health(queue=service.worker.state())

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def add_task_routes(app: FastAPI, service: Service) -> None:
    session = service.session
    options = {"responses": {**ERRORS, **STREAMED}, "tags": ["tasks"]}

    @app.post("/v1/describe", response_model=DescribeResponse, **options)
    async def describe(body: DescribeRequest, request: Request):
        """Describe a region (detailed or short). Several regions are described in one batched
        decode (not streamed): `answers` holds one description per region."""
        count = body.region_count()
        check_region_count(count, service.limits)
        service.check_tokens(body.max_new_tokens)
        if body.stream and count > 1:
            raise ApiError(
                422,
                f"a streamed describe takes one region; got {count} (stream: false describes "
                "them all in one batch)",
                "stream",
            )

        def work(run: Run) -> DescribeResponse:
            image, regions = task_inputs(body, service.limits)
            sampling = {"max_new_tokens": body.max_new_tokens, "temperature": body.temperature}
            if len(regions) == 1:
                text = run.relay(
                    session.describe(
                        image, regions[0], detailed=body.detailed, stream=True, **sampling
                    )
                )
                answers = [text]
            else:
                answers = session.describe_many(
                    image, regions, detailed=body.detailed, between_steps=run.check, **sampling
                )
            return DescribeResponse(answer=answers[0], answers=answers, stats=service.stats())

        return await answer(service.submit(work), body.stream, request)

    @app.post("/v1/classify", response_model=ClassifyResponse, **options)
    async def classify(body: ClassifyRequest, request: Request):
        """The category name of one region, in `vocabulary` (default: what the model learnt)."""
        check_one_region(body)
        if body.vocabulary is not None:
            service.check_text(len(body.vocabulary), "vocabulary")

        def work(run: Run) -> ClassifyResponse:
            image, regions = task_inputs(body, service.limits)
            text = session.classify(
                image, regions[0], vocabulary=body.vocabulary, between_steps=run.check
            )
            run.emit(text)
            return ClassifyResponse(answer=text, stats=service.stats())

        return await answer(service.submit(work), body.stream, request)

    @app.post("/v1/refer", response_model=ReferResponse, **options)
    async def refer(body: ReferRequest, request: Request):
        """Which of the regions fits the expression: its 0-based index, or null for none."""
        check_region_count(body.region_count(), service.limits)
        service.check_text(len(body.expression), "expression")

        def work(run: Run) -> ReferResponse:
            image, regions = task_inputs(body, service.limits)
            index = session.refer(image, body.expression, regions, between_steps=run.check)
            text = refer_answer(index)
            run.emit(text)
            return ReferResponse(region=index, answer=text, stats=service.stats())

        return await answer(service.submit(work), body.stream, request)

    @app.post("/v1/ask", response_model=AskResponse, **options)
    async def ask(body: AskRequest, request: Request):
        """A free question that names the regions as <region1>, <region2>, ..."""
        check_region_count(body.region_count(), service.limits)
        service.check_text(len(body.question), "question")
        service.check_tokens(body.max_new_tokens)

        def work(run: Run) -> AskResponse:
            image, regions = task_inputs(body, service.limits)
            stream = session.ask(
                image,
                body.question,
                regions,
                stream=True,
                max_new_tokens=body.max_new_tokens,
                temperature=body.temperature,
            )
            return AskResponse(answer=run.relay(stream), stats=service.stats())

        return await answer(service.submit(work), body.stream, request)

    def check_one_region(body: TaskRequest) -> None:
        count = body.region_count()
        if count != 1:
            raise ApiError(422, f"this task takes one region; got {count}", "regions")
