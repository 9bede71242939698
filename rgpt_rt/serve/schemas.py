"""Request and response bodies of the task endpoints (/v1/describe, /classify, /refer, /ask).

An image is base64 PNG or JPEG (a `data:image/...;base64,` URL works too). Regions come as
exactly one of:
    "mask": M, "masks": [M, ...]       M: a base64 PNG (nonzero = inside) or a COCO RLE
                                        {"size": [h, w], "counts": [runs...] | "compressed"}
    "box": B, "boxes": [B, ...]        B: [x0, y0, x1, y1] in pixels, x1 and y1 exclusive
    "regions": [{"mask": M} | {"box": B}, ...]   when masks and boxes mix
Regions are numbered in the order given: <region1>, <region2>, ... Masks and boxes use the
image's pixels (after its EXIF orientation is applied), and a mask has the image's size.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

REGION_FIELDS = ("mask", "masks", "box", "boxes", "regions")


class RLE(BaseModel):
    """COCO run-length encoding: runs of 0s and 1s (0s first) in column-major order."""

    model_config = ConfigDict(extra="forbid")
    size: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)] = Field(
        description="[height, width] in pixels"
    )
    counts: list[Annotated[int, Field(ge=0)]] | str = Field(
        description="run lengths, or pycocotools' compressed string of them"
    )


Mask = Annotated[
    str | RLE, Field(description="a base64 PNG (nonzero = inside, the image's size) or a COCO RLE")
]
Box = Annotated[
    list[FiniteFloat],
    Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels"),
]


class Region(BaseModel):
    """One region: a mask or a box."""

    model_config = ConfigDict(extra="forbid")
    mask: Mask | None = None
    box: Box | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Region:
        if (self.mask is None) == (self.box is None):
            raise ValueError('a region is {"mask": ...} or {"box": [x0, y0, x1, y1]}, not both')
        return self


class TaskRequest(BaseModel):
    image: str = Field(description="base64 PNG or JPEG, or a data: URL of one")
    mask: Mask | None = None
    masks: Annotated[list[Mask], Field(min_length=1)] | None = None
    box: Box | None = None
    boxes: Annotated[list[Box], Field(min_length=1)] | None = None
    regions: Annotated[list[Region], Field(min_length=1)] | None = None
    stream: bool = Field(False, description="answer as server-sent events")

    @model_validator(mode="after")
    def _one_region_field(self) -> TaskRequest:
        given = [name for name in REGION_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give the regions as exactly one of mask, masks, box, boxes or regions; "
                + (f"got {', '.join(given)}" if given else "got none")
            )
        return self

    def region_count(self) -> int:
        """How many regions were given (checked against --max-regions before any is used)."""
        if self.mask is not None or self.box is not None:
            return 1
        return len(self.masks or self.boxes or self.regions or [])

    def region_list(self) -> list[Region]:
        """The regions in order, whichever field held them."""
        if self.mask is not None:
            return [Region(mask=self.mask)]
        if self.masks is not None:
            return [Region(mask=m) for m in self.masks]
        if self.box is not None:
            return [Region(box=self.box)]
        if self.boxes is not None:
            return [Region(box=b) for b in self.boxes]
        return list(self.regions or [])


class Sampling(BaseModel):
    max_new_tokens: int = Field(128, ge=1, description="at most this many answer tokens")
    temperature: FiniteFloat = Field(0.0, ge=0.0, le=2.0, description="0: greedy")


class DescribeRequest(TaskRequest, Sampling):
    detailed: bool = Field(True, description="a detailed description; false: a short one")


class ClassifyRequest(TaskRequest):
    vocabulary: str | None = Field(
        None, min_length=1, description="the category names to answer in (default: the model's)"
    )


class ReferRequest(TaskRequest):
    expression: str = Field(min_length=1, description='what to find, e.g. "the red star"')


class AskRequest(TaskRequest, Sampling):
    question: str = Field(
        min_length=1, description="a question naming the regions as <region1>, <region2>, ..."
    )


Stats = Annotated[
    dict[str, Any],
    Field(description="per-stage timings (ms) and counts of this call, as Session.stats"),
]


class DescribeResponse(BaseModel):
    task: Literal["describe"] = "describe"
    answer: str = Field(description="the description of the first (or only) region")
    answers: list[str] = Field(description="one description per region, in order")
    stats: Stats


class ClassifyResponse(BaseModel):
    task: Literal["classify"] = "classify"
    answer: str = Field(description="the category name")
    stats: Stats


class ReferResponse(BaseModel):
    task: Literal["refer"] = "refer"
    region: int | None = Field(
        description="the 0-based index of the region that fits, or null for none"
    )
    answer: str = Field(description='"Region [k]" (1-based) or "No corresponding options found."')
    stats: Stats


class AskResponse(BaseModel):
    task: Literal["ask"] = "ask"
    answer: str
    stats: Stats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    queue: dict[str, int]
