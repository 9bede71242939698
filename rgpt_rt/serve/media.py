"""Images and regions out of JSON: base64 PNG/JPEG (or data: URLs), PNG masks, COCO RLE, boxes.

    image = decode_image(body.image, limits)                  # [H, W, 3] uint8, EXIF-upright
    regions = decode_regions(body.region_list(), limits)      # arrays and box tuples for Session
    image, alpha = decode_image_and_alpha(url, limits)        # RGBA: the alpha channel as a mask (alpha > 0)

Every limit is checked before the memory for it is taken: the base64 length before decoding, an
image's width x height from its header before its pixels, an RLE's size before its runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rgpt_rt.rle import RLEError, decode_rle
from rgpt_rt.serve.errors import ApiError
from rgpt_rt.serve.limits import ServeLimits
from rgpt_rt.serve.schemas import RLE, Region

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)


def base64_payload(data: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or a data: URL; 413 past max_bytes, 400 when not base64."""
    if data.startswith("data:"):
        header = _DATA_URL.match(data)
        if header is None:
            raise ApiError(400, f"{param}: a data URL must be data:<type>;base64,<data>", param)
        data = data[header.end() :]
    if len(data) // 4 * 3 > max_bytes + 3:
        raise ApiError(
            413,
            f"{param} is about {len(data) // 4 * 3:,} bytes, over the {max_bytes:,}-byte limit "
            "(--max-image-bytes)",
            param,
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # MIME-style base64 wraps its lines
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param) from None


def open_checked(
    raw: bytes, formats: tuple[str, ...], param: str, max_pixels: int, upright: bool
) -> Image.Image:
    """Decode an image file whose width x height is within max_pixels (read from its header
    first), turned upright by its EXIF orientation when `upright` (as browsers show it)."""
    kinds = " or ".join(formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=list(formats)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ApiError(
                        413,
                        f"{param} is {width}x{height} = {width * height:,} pixels, over the "
                        f"{max_pixels:,}-pixel limit (--max-image-pixels)",
                        param,
                    )
                opened.load()
                return ImageOps.exif_transpose(opened) if upright else opened.copy()
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError(400, f"{param} is not a {kinds} file", param) from None
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"{param} is too large to decode ({error})", param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ApiError(400, f"{param} could not be decoded as {kinds} ({error})", param) from None


def decode_image(data: str, limits: ServeLimits, param: str = "image") -> np.ndarray:
    """base64 PNG/JPEG -> [H, W, 3] uint8 RGB, upright by its EXIF orientation."""
    raw = base64_payload(data, param, limits.max_image_bytes)
    image = open_checked(raw, ("PNG", "JPEG"), param, limits.max_image_pixels, upright=True)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def has_alpha(data: str, limits: ServeLimits, param: str = "image") -> bool:
    """Whether a base64 PNG/JPEG carries transparency (RGBA, LA, or a palette with a
    transparent colour), read from its header only."""
    raw = base64_payload(data, param, limits.max_image_bytes)
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"]) as opened:
            return _transparent(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return False  # decode_image says what is wrong with it


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def decode_image_and_alpha(
    data: str, limits: ServeLimits, param: str = "image"
) -> tuple[np.ndarray, np.ndarray | None]:
    """base64 PNG/JPEG -> ([H, W, 3] uint8 RGB, [H, W] bool alpha > 0, or None when the image
    has no transparency), as Describe Anything's server takes a region: the alpha channel of an
    RGBA image is the mask. An alpha channel with no pixel above 0 is a 400."""
    raw = base64_payload(data, param, limits.max_image_bytes)
    image = open_checked(raw, ("PNG", "JPEG"), param, limits.max_image_pixels, upright=True)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not _transparent(image):
        return rgb, None
    alpha = np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, 3] > 0
    if not alpha.any():
        raise ApiError(
            400,
            f"{param}: the image's alpha channel is 0 everywhere; as a region, alpha > 0 marks "
            "the pixels inside it",
            param,
        )
    return rgb, alpha


def decode_mask(mask: str | RLE, limits: ServeLimits, param: str) -> np.ndarray:
    """A base64 PNG or a COCO RLE -> [H, W] bool."""
    if isinstance(mask, RLE):
        try:
            return decode_rle(mask.model_dump(), max_pixels=limits.max_image_pixels)
        except RLEError as error:
            status = 413 if "pixel limit" in str(error) else 400
            raise ApiError(status, f"{param}: {error}", param) from None
    raw = base64_payload(mask, param, limits.max_image_bytes)
    image = open_checked(raw, ("PNG",), param, limits.max_image_pixels, upright=False)
    if image.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        image = image.convert("L")  # colour and palette masks: nonzero luminance is inside
    return np.asarray(image) != 0


def decode_regions(
    regions: list[Region], limits: ServeLimits, param: str = "regions"
) -> list[np.ndarray | tuple[float, float, float, float]]:
    """Regions -> what Session takes: [H, W] bool masks and (x0, y0, x1, y1) boxes, in order."""
    out: list[np.ndarray | tuple[float, float, float, float]] = []
    for index, region in enumerate(regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            out.append((x0, y0, x1, y1))
        else:
            assert region.mask is not None
            out.append(decode_mask(region.mask, limits, f"{param}[{index}]"))
    return out


def check_region_count(count: int, limits: ServeLimits) -> None:
    if count > limits.max_regions:
        raise ApiError(
            422,
            f"{count} regions were given; this server takes at most {limits.max_regions} "
            "per request (--max-regions)",
            "regions",
        )
