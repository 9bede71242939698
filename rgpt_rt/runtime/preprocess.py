"""Session inputs: an image and its regions, checked, bounded in size, in the model's geometry.

    frame = prepare_image(image, vision_cfg, max_side=2048, device="cuda")   # loads, downscales huge images
    frame.pixel_values                                              # [1, 3, S, S] float32 on the device
    masks = prepare_masks([mask, (x0, y0, x1, y1)], frame, device)  # [N, S', S'] bool or float coverage

Decoding (PIL) and the checks stay on the CPU; the padding to a square, the resize and the
normalisation run as torch ops on the session's device (inputs.preprocess_pixels: within 1 level
of PIL's resize, which the reference uses), and so does the masks' padding. prepare_image(...,
values=False) leaves pixel_values for later (pixel_values(frame, ...)): a Session skips them for an
image whose vision result it has cached.

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
    pad_masks,
    preprocess_pixels,
)

MAX_IMAGE_PIXELS = 200_000_000  # larger files are refused before they are decoded


@dataclass
class Frame:
    """One image ready for the model."""

    pixels: np.ndarray  # [h, w, 3] uint8 at the working size
    original_size: tuple[int, int]  # (H, W) as given: masks and boxes use these pixels
    pixel_values: torch.Tensor | None = None  # [1, 3, S, S] float32 (None: not made yet)
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
        height, width = (
            image.shape[:2] if isinstance(image, np.ndarray)
            else image.size[::-1] if isinstance(image, Image.Image)
            else (0, 0)  # not an image: load_image says what to give
        )  # fmt: skip
        if height * width > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"the image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                "limit; downscale it first"
            )
        array = load_image(image)
        original = array.shape[:2]
        if max(original) <= max_side:  # used as it is: no round trip through PIL
            return array, original
        image = Image.fromarray(array)
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8), original


def _rotated(image: Image.Image) -> bool:
    """Whether the file's EXIF orientation turns it by 90 or 270 degrees (width and height swap)."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def prepare_image(
    image: ImageLike,
    vision: VisionConfig,
    max_side: int = 2048,
    device: torch.device | str | None = None,
    values: bool = True,
) -> Frame:
    """Load and check `image` (downscaled to max_side); with `values`, its pixel values on
    `device` (default CPU) too."""
    pixels, original = open_image(image, max_side)
    frame = Frame(pixels=pixels, original_size=original)
    if values:
        frame.pixel_values = pixel_values(frame, vision, device)
    return frame


def pixel_values(
    frame: Frame, vision: VisionConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """The frame's pixels padded, resized and normalised on `device`: [1, 3, S, S] float32 (one
    upload of the uint8 pixels, then torch ops there)."""
    array = frame.pixels
    if not (array.flags.writeable and array.flags.c_contiguous):  # (PIL's arrays are read-only)
        array = np.array(array, order="C")
    pixels = torch.from_numpy(array)
    if device is not None and torch.device(device).type != "cpu":
        pixels = pixels.to(device)
    return preprocess_pixels(pixels, vision)[None]


def prepare_masks(
    masks: Sequence[MaskLike], frame: Frame, device: torch.device | str | None = None
) -> torch.Tensor:
    """[N, S', S'] masks in the padded square geometry of the working image, on `device`
    (default CPU): bool when the image kept its size, float area coverage when it was
    downscaled. Checked on the CPU (errors name the mask, 1-based), padded on the device."""
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
        out.append(full)
    stacked = torch.from_numpy(np.stack(out))  # [N, h, w]
    if device is not None:
        stacked = stacked.to(device)
    return pad_masks(stacked)
