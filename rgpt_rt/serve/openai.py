"""POST /v1/chat/completions, as OpenAI's API has it, so OpenAI clients work unchanged.

    client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(
        model="rgpt",                      # any name: the server has one model
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Describe <region1> in detail."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
        extra_body={"regions": [{"box": [10, 20, 60, 80]}, {"mask": "<base64 PNG or RLE>"}]},
        stream=True, max_tokens=64, temperature=0)

One image per conversation, as a data: URL (the server fetches nothing). The regions are the
extension field `regions`, named in the text as <region1>, <region2>, ...; or, as Describe
Anything's server takes them, the alpha channel of an RGBA image (alpha > 0 is the mask) when
`regions` is absent: that region is <region1>, and a text that names no region has "the masked
region" (or, without that phrase, its start) read as <region1>. Earlier assistant
messages are kept as the answers they were. Honoured: messages (system, user, assistant),
max_tokens / max_completion_tokens (default 128), temperature (default 0: greedy, where
OpenAI's is 1), stream, stream_options.include_usage, n = 1. Other fields are accepted and
ignored. Streams are `data: {chat.completion.chunk}` lines ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from rgpt_rt.prompts import Conversation, chat_template
from rgpt_rt.serve.errors import ApiError
from rgpt_rt.serve.media import (
    check_region_count,
    decode_image,
    decode_image_and_alpha,
    decode_regions,
    has_alpha,
)
from rgpt_rt.serve.schemas import Region
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

DEFAULT_MAX_TOKENS = 128
_PLACEHOLDER = re.compile(r"<region\d*>")
_MASKED_REGION = re.compile(r"the masked region", re.IGNORECASE)
_IMAGE_TAG = re.compile(r"^\s*<image>\s*")  # Describe Anything's prompts open with it


def name_alpha_region(text: str) -> str:
    """A question about the alpha-channel region, with that region named <region1>: "Describe
    the masked region in detail." -> "Describe <region1> in detail."; a text naming no region
    and without that phrase gets "<region1>" before it."""
    text = _IMAGE_TAG.sub("", text)
    if _PLACEHOLDER.search(text):
        return text
    named, count = _MASKED_REGION.subn("<region1>", text, count=1)
    return named if count else f"<region1> {text}"


# --- the request ----------------------------------------------------------------------------
class ImageURL(BaseModel):
    url: str = Field(description="data:image/png;base64,... or data:image/jpeg;base64,...")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields are accepted, not used
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    regions: list[Region] | None = Field(
        None, description="rgpt_rt's extension: the regions, named <region1>, <region2>, ..."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    n: int | None = Field(None, ge=1, le=1, description="one answer per request")


# --- the response ---------------------------------------------------------------------------
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    rgpt_stats: dict[str, Any] = Field(description="rgpt_rt's extension: Session.stats")


# --- messages -> one image, a conversation, and the question ---------------------------------
@dataclass
class Dialogue:
    image: str = ""  # the data URL
    image_param: str = ""
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # answered turns
    question: str = ""


def read_messages(messages: list[Message], special: tuple[str, ...]) -> Dialogue:
    """Raises ApiError (400) naming the message that cannot be used."""
    dialogue = Dialogue()
    turns: list[list[str | None]] = []  # [question, answer]
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if isinstance(message.content, str):
            texts = [message.content]
        else:
            texts = []
            for part_index, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                param = f"{where}.content[{part_index}].image_url"
                if message.role != "user":
                    raise ApiError(400, f"{param}: only user messages may hold the image", param)
                if dialogue.image:
                    raise ApiError(
                        400,
                        f"{param}: a second image; a conversation is about one image "
                        f"(the first is at {dialogue.image_param})",
                        param,
                    )
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                if not url.startswith("data:"):
                    raise ApiError(
                        400,
                        f"{param}: give the image as a data: URL (data:image/png;base64,...); "
                        "this server fetches nothing",
                        param,
                    )
                dialogue.image, dialogue.image_param = url, param
        text = "\n".join(t for t in texts if t)
        if message.role in ("system", "developer"):
            if turns:
                raise ApiError(400, f"{where}: a system message must come first", where)
            if any(token in text for token in special) or _PLACEHOLDER.search(text):
                raise ApiError(
                    400,
                    f"{where}: a system message may not hold the image or region tokens "
                    "(name regions in user messages)",
                    where,
                )
            dialogue.system = text if dialogue.system is None else f"{dialogue.system}\n{text}"
        elif message.role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] = f"{turns[-1][0]}\n{text}"  # consecutive user messages: one turn
            else:
                turns.append([text, None])
        else:  # assistant
            if not turns or turns[-1][1] is not None:
                raise ApiError(
                    400, f"{where}: an assistant message must answer a user message", where
                )
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise ApiError(
            400, "the last message must be the user's: the question to answer", "messages"
        )
    if not dialogue.image:
        raise ApiError(
            400,
            "no image: put one in a user message as an image_url part with a data: URL",
            "messages",
        )
    dialogue.history = [(str(q), str(a)) for q, a in turns[:-1]]
    dialogue.question = str(turns[-1][0])
    if not dialogue.question.strip():
        raise ApiError(400, "the last user message has no text", "messages")
    return dialogue


# --- the endpoint ---------------------------------------------------------------------------
def router(service: Service) -> APIRouter:
    session = service.session
    api = APIRouter(tags=["openai"])
    model_name = session.config.name
    tokens = session.config.tokens
    special = (tokens.image, *tokens.region_slots)  # other special-token strings are plain text

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        """The one model this server runs, as OpenAI lists models."""
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rgpt_rt"}],
        }

    @api.post(
        "/v1/chat/completions", response_model=ChatCompletion, responses={**ERRORS, **STREAMED}
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI's chat completions over the regions in `regions` (see the module doc)."""
        dialogue = read_messages(body.messages, special)
        regions = body.regions or []
        from_alpha = not regions and has_alpha(dialogue.image, service.limits, dialogue.image_param)
        if not regions and not from_alpha:
            raise ApiError(
                400,
                'no regions: give them in the extension field "regions": [{"box": [x0, y0, x1, '
                'y1]} or {"mask": "<base64 PNG or RLE>"}, ...], named <region1>, ... in the text, '
                "or send an RGBA image whose alpha channel (> 0) is the region",
                "regions",
            )
        if from_alpha:
            dialogue.question = name_alpha_region(dialogue.question)
            dialogue.history = [(name_alpha_region(q), a) for q, a in dialogue.history]
        check_region_count(len(regions), service.limits)
        text_chars = len(dialogue.system or "") + len(dialogue.question)
        text_chars += sum(len(q) + len(a) for q, a in dialogue.history)
        service.check_text(text_chars, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        service.check_tokens(max_tokens, param)
        temperature = body.temperature or 0.0

        def work(run: Run) -> dict[str, Any]:
            if from_alpha:
                image, alpha = decode_image_and_alpha(
                    dialogue.image, service.limits, dialogue.image_param
                )
                masks = [alpha]
            else:
                image = decode_image(dialogue.image, service.limits, dialogue.image_param)
                masks = decode_regions(regions, service.limits)
            sampling = {"max_new_tokens": max_tokens, "temperature": temperature}
            if dialogue.history or dialogue.system is not None:
                chat = session.chat(image, masks)
                template = chat_template(session.config.family)
                chat.conversation = Conversation(
                    turns=list(dialogue.history),
                    system=dialogue.system or template.system,
                    template=template,
                )
                answer = chat.send(dialogue.question, stream=True, **sampling)
            else:  # one question: the prefix cache and pooled KV caches of Session.ask
                answer = session.ask(image, dialogue.question, masks, stream=True, **sampling)
            return {"text": run.relay(answer), "stats": service.stats()}

        run = service.submit(work)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            result = await result_of(run, request)
            return ChatCompletion(
                id=completion_id,
                created=created,
                model=model_name,
                choices=[
                    Choice(
                        message=AssistantMessage(content=result["text"]),
                        finish_reason=finish_reason(result["stats"]),
                    )
                ],
                usage=usage(result["stats"]),
                rgpt_stats=result["stats"],
            )
        events, first = await start_stream(run)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = Chunks(completion_id, created, model_name, include_usage)
        return StreamingResponse(
            chunk_events(first, events, run, chunks, max_tokens),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
        )

    return api


def finish_reason(stats: dict[str, Any]) -> Literal["stop", "length"]:
    # the Session says why the answer ended: "eos" or "stop" (a stop string) is OpenAI's "stop"
    return "length" if stats.get("finish_reason", "length") == "length" else "stop"


def usage(stats: dict[str, Any]) -> Usage:
    prompt = int(stats.get("prefix_tokens", 0)) + int(stats.get("prefill_tokens", 0))
    completion = int(stats.get("new_tokens", 0))
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


@dataclass
class Chunks:
    """chat.completion.chunk objects of one completion, as `data: {...}` lines."""

    id: str
    created: int
    model: str
    include_usage: bool

    def line(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:  # null in every chunk but the last, as OpenAI sends them
            body["usage"] = usage.model_dump() if usage is not None else None
        return data_line(body)

    def delta(self, delta: dict[str, str], finish: str | None = None) -> str:
        return self.line([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])


def data_line(body: Any) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def chunk_events(
    first, events: AsyncIterator, run: Run, chunks: Chunks, max_tokens: int
) -> AsyncIterator[str]:
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        kind, value = first
        while kind == "delta":
            yield chunks.delta({"content": value})
            kind, value = await anext(events)
        stats = value["stats"]
        yield chunks.delta({}, finish_reason(stats))
        if chunks.include_usage:
            yield chunks.line([], usage(stats))
        yield "data: [DONE]\n\n"
    except Exception as error:
        yield data_line(stream_error(error))
    finally:
        run.cancel()
