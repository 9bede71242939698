"""Images and masks in: loading, checking, and the model's geometry.

    image = load_image("photo.jpg")                       # [H, W, 3] uint8 RGB
    mask = load_mask((10, 20, 50, 60), image.shape[:2])    # [H, W] bool, from a box, array, PIL image or PNG
    pixels = preprocess_image(image, cfg.vision)           # [3, S, S] float32: padded square, resized, normalised
    square = pad_mask(mask)                                # [S', S'] bool with the image's padding
    pixels = preprocess_pixels(torch.from_numpy(image).cuda(), cfg.vision)   # the same in torch ops, on any device
    squares = pad_masks(masks_tensor)                      # [N, S', S'], any device

Images are padded to a square with the mean colour (centred, as LLaVA does) and resized to the
vision tower's input size; masks get the same padding and keep their resolution, since mask
pooling takes masks of any size. Shared by the reference model and the runtime: the reference
(and training) resize with PIL (bicubic, antialiased); the runtime with torch ops on the session's
device (preprocess_pixels), which give PIL's uint8 image within 1 level (tests/runtime).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import partial
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rgpt_rt.config import VisionConfig

ImageLike = str | Path | Image.Image | np.ndarray
MaskLike = str | Path | Image.Image | np.ndarray | Sequence[float]


def load_image(image: ImageLike) -> np.ndarray:
    """A path, PIL image or [H, W, 3] uint8 array -> [H, W, 3] uint8 RGB array.
    Grayscale and RGBA are converted to RGB; a file's EXIF orientation is applied (masks are
    given on the upright image, as viewers and browsers show it)."""
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened).convert(
                    "RGB"
                )  # upright, as viewers show it
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(
                f"image file {path} could not be read as an image ({error}); give a PNG or JPEG"
            ) from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"image array must be [H, W, 3] RGB (or [H, W] gray, [H, W, 4] RGBA); got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (0..255); got {image.dtype}")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        if image.shape[2] == 4:
            image = image[:, :, :3]
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image is empty (shape {image.shape})")
        return np.ascontiguousarray(image)
    raise ValueError(
        f"image must be a path, a PIL image or an [H, W, 3] uint8 array; got {type(image).__name__}"
    )


def box_to_mask(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """(x0, y0, x1, y1) in pixels, x1/y1 exclusive -> [H, W] bool rectangle mask."""
    height, width = size
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1); got {len(box)} values")
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in box):
        kinds = [type(v).__name__ for v in box]
        raise TypeError(f"a box's coordinates must be numbers (x0, y0, x1, y1); got {kinds}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except OverflowError:
        raise ValueError(f"box {tuple(box)} holds a coordinate too large for a float") from None
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"box {tuple(box)} holds a non-finite value")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} is empty: it needs x1 > x0 and y1 > y0")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image")
    left, top = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    right, bottom = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def load_mask(mask: MaskLike, size: tuple[int, int], index: int = 0) -> np.ndarray:
    """A mask ([H, W] bool/uint8 array, PIL image, PNG path) or a box (x0, y0, x1, y1)
    -> [H, W] bool array of the image's size. Nonzero means inside. `index` names the mask
    in error messages."""
    name = f"mask {index + 1}"
    if isinstance(mask, str | Path):
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: file {path} does not exist")
        try:
            with Image.open(path) as opened:
                mask = np.asarray(opened.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{name}: {path} could not be read as an image ({error})") from None
    elif isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    elif isinstance(mask, tuple | list):
        mask = box_to_mask(mask, size)
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(
            f"{name} must be an [H, W] array, a PIL image, a PNG path or a box (x0, y0, x1, y1)"
        )
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must be 2-D [H, W]; got shape {mask.shape}")
    if mask.dtype != bool and mask.dtype != np.uint8:
        raise ValueError(f"{name} must be bool or uint8 (nonzero = inside); got {mask.dtype}")
    if tuple(mask.shape) != tuple(size):
        raise ValueError(
            f"{name} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}; "
            "a mask must have the image's size"
        )
    mask = mask != 0
    if not mask.any():
        raise ValueError(f"{name} is empty (no pixel set); give a mask with at least one pixel")
    return mask


def square_padding(height: int, width: int) -> tuple[int, int]:
    """(top, left) offsets that centre an H x W image in a max(H, W) square."""
    side = max(height, width)
    return (side - height) // 2, (side - width) // 2


def pad_image(image: np.ndarray, fill: Sequence[float]) -> np.ndarray:
    """[H, W, 3] uint8 -> [S', S', 3] uint8, centred on a square of colour `fill` (0..1 RGB);
    a square image is returned as it is. Only the bands around the image are filled (filling
    the whole square first took 2.3 ms of a 672x672 image's 11 ms of preprocessing)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    top, left = square_padding(height, width)
    colour = np.array([round(255 * f) for f in fill], dtype=np.uint8)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[top : top + height, left : left + width] = image
    out[:top], out[top + height :] = colour, colour
    out[top : top + height, :left], out[top : top + height, left + width :] = colour, colour
    return out


def pad_mask(mask: np.ndarray) -> np.ndarray:
    """[H, W] -> [S', S'] with the image's padding (outside the image is outside the mask)."""
    height, width = mask.shape
    side = max(height, width)
    top, left = square_padding(height, width)
    out = np.zeros((side, side), dtype=mask.dtype)
    out[top : top + height, left : left + width] = mask
    return out


def pad_masks(masks: torch.Tensor) -> torch.Tensor:
    """[N, H, W] (any dtype and device) -> [N, S', S'] with the image's padding, like pad_mask."""
    count, height, width = masks.shape
    side = max(height, width)
    if height == width:
        return masks
    top, left = square_padding(height, width)
    out = masks.new_zeros(count, side, side)
    out[:, top : top + height, left : left + width] = masks
    return out


def preprocess_image(image: np.ndarray, vision: VisionConfig) -> torch.Tensor:
    """[H, W, 3] uint8 RGB -> [3, S, S] float32: pad to a square with the mean colour,
    resize (bicubic) to the vision tower's input size, normalise with its mean and std."""
    square = pad_image(image, vision.image_mean)
    size = vision.image_size
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(square.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(vision.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(vision.image_std, dtype=torch.float32)[:, None, None]
    return ((pixels - mean) / std).contiguous()


# --- the same in torch ops, on any device (the runtime's path) ------------------------------------
# PIL resizes an 8-bit image in two passes, widths then heights, each rounded to uint8, with a
# bicubic kernel (a = -0.5) stretched by the downscale factor (antialiasing) and 22-bit fixed-point
# weights. torch's antialiased bicubic has the same kernel and support: on uint8 CPU tensors one
# call (its AVX2 kernel, which also rounds between its width and height passes: 5-10× faster than
# PIL here) gives PIL's image within 1 level in 0.5% of the pixels of a 640×640 → 336 downscale
# (within 2 when upscaling); on other devices (float only) two calls, widths then heights, rounded
# to uint8 between them as PIL does, give it within 1 level in 0.05% of them, either way. Without
# the rounding between the passes 16% of the pixels differ, by up to 7 levels.
RESIZE_METHODS = ("uint8", "float")


def resize_square(square: torch.Tensor, size: int, method: str | None = None) -> torch.Tensor:
    """[B, C, S', S'] uint8 -> [B, C, size, size] uint8, bicubic with antialiasing like PIL's
    resize. method "uint8" (torch's uint8 kernel: CPU only) or "float" (two passes rounded to
    uint8 between them, any device); default: "uint8" for a downscale on the CPU, else "float"."""
    resized = _resize(square, size, method)
    return resized if resized.dtype == torch.uint8 else resized.to(torch.uint8)


def _resize(square: torch.Tensor, size: int, method: str | None) -> torch.Tensor:
    """resize_square, but the float method's result stays float (integer values 0..255)."""
    if method is None:
        downscale = square.shape[-1] >= size
        method = "uint8" if square.device.type == "cpu" and downscale else "float"
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is unknown; use one of {RESIZE_METHODS}")
    interpolate = partial(
        torch.nn.functional.interpolate, mode="bicubic", antialias=True, align_corners=False
    )
    if method == "uint8":
        return interpolate(square, size=(size, size))
    wide = interpolate(square.float(), size=(square.shape[2], size)).round_().clamp_(0, 255)
    return interpolate(wide, size=(size, size)).round_().clamp_(0, 255)


@functools.lru_cache(maxsize=16)
def _constants(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padding colour (uint8 [3]), mean and std (float32 [3, 1, 1]) on `device`, made once
    (each a copy to the device otherwise)."""
    colour = torch.tensor([round(255 * f) for f in mean], dtype=torch.uint8, device=device)
    as_column = partial(torch.tensor, dtype=torch.float32, device=device)
    return colour, as_column(mean)[:, None, None], as_column(std)[:, None, None]


def preprocess_pixels(
    pixels: torch.Tensor, vision: VisionConfig, method: str | None = None
) -> torch.Tensor:
    """[H, W, 3] uint8 on any device -> [3, S, S] float32 on that device: preprocess_image's
    padding (mean colour, centred), resize (resize_square, within 1 level of PIL's) and
    normalisation, in torch ops."""
    if pixels.dim() != 3 or pixels.shape[2] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be [H, W, 3] uint8; got {pixels.dtype} {list(pixels.shape)}")
    colour, mean, std = _constants(pixels.device, tuple(vision.image_mean), tuple(vision.image_std))
    height, width = pixels.shape[:2]
    side, size = max(height, width), vision.image_size
    if height != width:  # only the bands around the image are filled (a whole-square fill of
        # the colour, broadcast from [3], took 0.9 ms of 2.6 at 640×480 on one CPU core)
        top, left = square_padding(height, width)
        square = torch.empty(side, side, 3, dtype=torch.uint8, device=pixels.device)
        row = colour.repeat(side).view(side, 3)  # a padded row: contiguous runs to copy
        square[:top], square[top + height :] = row, row
        square[:, :left], square[:, left + width :] = row[:left], row[: side - left - width]
        square[top : top + height, left : left + width] = pixels
    else:
        square = pixels
    image = square.permute(2, 0, 1)[None]  # [1, 3, S', S'] (channels-last memory)
    if side != size:
        image = _resize(image, size, method)
    values = image[0].float() / 255.0  # [3, S, S]
    return ((values - mean) / std).contiguous()
