"""The example image the page offers and the browser test draws on: coloured shapes on a plain
ground, drawn the same way every time.

    python -m rgpt_rt.serve.example      # rewrites rgpt_rt/serve/static/example.png
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (320, 240)  # (width, height)
# Where each shape lies, as a box (x0, y0, x1, y1) in pixels, x1/y1 exclusive.
SHAPES = {
    "red circle": (30, 30, 130, 130),
    "blue square": (180, 40, 280, 140),
    "green triangle": (40, 150, 160, 230),
    "yellow star": (200, 150, 290, 235),
}


def draw_example() -> Image.Image:
    image = Image.new("RGB", SIZE, (236, 233, 222))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = SHAPES["red circle"]
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=(210, 40, 40))
    x0, y0, x1, y1 = SHAPES["blue square"]
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(40, 80, 200))
    x0, y0, x1, y1 = SHAPES["green triangle"]
    draw.polygon([(x0, y1 - 1), ((x0 + x1) // 2, y0), (x1 - 1, y1 - 1)], fill=(40, 160, 70))
    x0, y0, x1, y1 = SHAPES["yellow star"]
    cx, cy, outer, inner = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (x1 - x0) / 5
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.pi * (k / 5 - 0.5)  # the first point straight up
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    draw.polygon(points, fill=(235, 190, 30))
    return image


def example_path() -> Path:
    return Path(__file__).resolve().parent / "static" / "example.png"


if __name__ == "__main__":
    draw_example().save(example_path(), optimize=True)
    print(f"wrote {example_path()}")
