"""Session inputs: an image and its regions, checked, bounded in size, in the model's geometry.

    frame = prepare_image(image, vision_cfg, max_side=2048)       # loads, downscales huge images
    masks = prepare_masks([mask, (x0, y0, x1, y1)], frame)        # [N, S', S'] bool or float coverage

Masks and boxes are given in the original image's pixels; when the image was downscaled, each
mask becomes its area coverage at the working size (a float mask), which area pooling weighs
exactly like the original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rgpt_rt.config import VisionConfig
from rgpt_rt.inputs import (
    ImageLike,
    MaskLike,
    box_to_mask,
    load_image,
    load_mask,
    pad_mask,
    preprocess_image,
)

MAX_IMAGE_PIXELS = 200_000_000  # larger files are refused before they are decoded


@dataclass
class Frame:
    """One image ready for the model."""

    pixels: np.ndarray  # [h, w, 3] uint8 at the working size
    original_size: tuple[int, int]  # (H, W) as given: masks and boxes use these pixels
    pixel_values: torch.Tensor  # [1, 3, S, S] float32
    key: str = ""  # the content hash the Session caches this image's results under

    @property
    def scaled(self) -> bool:
        return self.pixels.shape[:2] != self.original_size


def open_image(image: ImageLike, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Load an image, downscaled so that its longer side is at most max_side.
    Returns the pixels and the original (H, W)."""
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        try:
            with Image.open(path) as opened:
                width, height = opened.size
                if _rotated(opened):
                    width, height = height, width
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"image {path} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit; downscale it first"
                    )
                opened.draft("RGB", (max_side, max_side))  # JPEG decodes smaller when it can
                image = ImageOps.exif_transpose(opened).convert(
                    "RGB"
                )  # upright, as viewers show it
                image.load()
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            Image.DecompressionBombError,
        ) as error:
            raise ValueError(
                f"image file {path} could not be read as an image ({error}); give a PNG or JPEG"
            ) from None
        original = (height, width)
    else:
        array = load_image(image)
        original = array.shape[:2]
        image = Image.fromarray(array)
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8), original


def _rotated(image: Image.Image) -> bool:
    """Whether the file's EXIF orientation turns it by 90 or 270 degrees (width and height swap)."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def prepare_image(image: ImageLike, vision: VisionConfig, max_side: int = 2048) -> Frame:
    pixels, original = open_image(image, max_side)
    return Frame(
        pixels=pixels, original_size=original, pixel_values=preprocess_image(pixels, vision)[None]
    )


def prepare_masks(masks: Sequence[MaskLike], frame: Frame) -> torch.Tensor:
    """[N, S', S'] masks in the padded square geometry of the working image: bool when the image
    kept its size, float area coverage when it was downscaled. Errors name the mask (1-based)."""
    if isinstance(masks, np.ndarray | torch.Tensor) and masks.ndim == 2:
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("give at least one mask (or box)")
    height, width = frame.pixels.shape[:2]
    out = []
    for index, mask in enumerate(masks):
        if isinstance(mask, tuple | list) and frame.scaled:
            mask = box_to_mask(mask, frame.original_size)  # validated in original pixels
        full = load_mask(mask, frame.original_size, index)  # [H, W] bool, checked non-empty
        if frame.scaled:
            coverage = Image.fromarray(full.astype(np.float32)).resize(
                (width, height), Image.Resampling.BOX
            )
            full = np.asarray(coverage, dtype=np.float32).clip(0.0, 1.0)
        out.append(pad_mask(full))
    stacked = np.stack(out)
    return torch.from_numpy(stacked)
