"""COCO run-length encoding (RLE) of masks, both forms, without pycocotools.

    mask = decode_rle({"size": [h, w], "counts": [3, 5, 2, ...]})    # uncompressed
    mask = decode_rle({"size": [h, w], "counts": "52203"})            # compressed string
    rle = encode_rle(mask)                                            # {"size", "counts": str}

Runs alternate 0s and 1s, starting with 0s (a mask that starts inside begins with a 0-length
run), over the mask read in column-major (Fortran) order, as pycocotools stores them.
The compressed string is pycocotools' `rleToString`: each count, from the fourth on, is stored
as its difference from the count two before it; every value is cut into 5-bit groups, low group
first, each written as chr(48 + group), with 0x20 set on every group but the last and 0x10 of
the last group carrying the sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class RLEError(ValueError):
    """An RLE that does not describe a mask of its own size."""


def decode_counts(text: str) -> list[int]:
    """pycocotools' compressed counts string -> the list of run lengths."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise RLEError(
                    "the RLE counts string ends in the middle of a number; it is truncated"
                )
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise RLEError(
                    f"the RLE counts string holds {text[position]!r} at {position}; "
                    "compressed counts use the characters '0' to 'o'"
                )
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_counts(counts: Sequence[int]) -> str:
    """The list of run lengths -> pycocotools' compressed counts string."""
    out: list[str] = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative value ends at -1
            more = value != -1 if group & 0x10 else value != 0
            out.append(chr(48 + (group | (0x20 if more else 0))))
    return "".join(out)


def decode_rle(rle: dict[str, Any], max_pixels: int | None = None) -> np.ndarray:
    """{"size": [h, w], "counts": list[int] | str} -> [h, w] bool mask.
    Raises RLEError naming what is wrong (bad size, negative runs, counts that do not cover
    the mask exactly); max_pixels refuses a size before any memory is taken for it."""
    size = rle.get("size")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise RLEError(f"an RLE's size is [height, width] in pixels; got {size!r}")
    height, width = size
    if height < 1 or width < 1:
        raise RLEError(f"an RLE's size must be positive; got {height}x{width} (height x width)")
    if max_pixels is not None and height * width > max_pixels:
        raise RLEError(f"the RLE is {width}x{height} pixels, over the {max_pixels:,}-pixel limit")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = decode_counts(counts)
    elif isinstance(counts, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in counts
    ):
        runs = list(counts)
    else:
        raise RLEError(
            "an RLE's counts are a list of run lengths or pycocotools' compressed string"
        )
    if any(run < 0 for run in runs):
        raise RLEError("an RLE holds a negative run length")
    total = sum(runs)
    if total != height * width:
        raise RLEError(
            f"the RLE's runs cover {total} pixels but its size {height}x{width} "
            f"(height x width) has {height * width}"
        )
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)  # [h * w], column-major
    return np.ascontiguousarray(flat.reshape(width, height).T)


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """[h, w] mask (nonzero = inside) -> {"size": [h, w], "counts": compressed str}, or the
    list of run lengths when not `compressed`."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is [H, W]; got shape {mask.shape}")
    flat = (np.asarray(mask) != 0).T.reshape(-1)  # column-major
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # the first run counts 0s
    counts = encode_counts(runs) if compressed else runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
