"""Request bodies the server tests send: images and masks as base64, on the example image."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from rgpt_rt.serve.example import SHAPES, example_path

EXAMPLE_PNG = base64.b64encode(example_path().read_bytes()).decode()
EXAMPLE_DATA_URL = f"data:image/png;base64,{EXAMPLE_PNG}"
CIRCLE = list(SHAPES["red circle"])
SQUARE = list(SHAPES["blue square"])
STAR = list(SHAPES["yellow star"])


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def jpeg_base64(array: np.ndarray, **options) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **options)
    return base64.b64encode(buffer.getvalue()).decode()


def box_mask(box, size=(240, 320)) -> np.ndarray:
    """The [H, W] bool mask of a box (x0, y0, x1, y1) on an image of `size` (H, W)."""
    mask = np.zeros(size, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def chat_body(text: str, regions, **extra) -> dict:
    """An OpenAI chat completion request about the example image."""
    return {
        "model": "rgpt",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": EXAMPLE_DATA_URL}},
                ],
            }
        ],
        "regions": regions,
        **extra,
    }


def parse_sse(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream, as an EventSource reads them."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events
