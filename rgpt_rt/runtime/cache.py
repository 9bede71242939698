"""A least-recently-used cache bounded in bytes (vision results and prefix KV per image).

cache = ByteLRU(max_bytes=256 << 20)
cache.put(key, value, nbytes)     # evicts the least recently used entries to fit
value = cache.get(key)            # None when absent; marks the entry as recently used
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


class ByteLRU:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes; got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        """Keep `value` unless it alone is larger than the whole cache."""
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of nbytes would be kept (put drops what is larger than the cache)."""
        return nbytes <= self.max_bytes

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# The image cache key (vision results and prefix KV are cached under it):
#   "sampled" (default): the shape, zlib.crc32 over every byte and blake2b-128 over the pixels of
#     every 8th row and column: 0.27 ms for a 640×480 image on one core (0.03 ms at 192×192).
#     Two different images of one size share it only if they are equal on that grid (1/64 of the
#     pixels) AND their CRC-32s agree. A change of at most 4 consecutive bytes (a pixel and a bit)
#     always changes the CRC; any other change off the grid collides with probability 2^-32 per
#     pair of images compared (a Session compares a new image with the few it caches). CRC-32 is
#     not cryptographic: someone who can send images can craft one that collides with an image
#     they know, and gets that image's cached vision result - answers about an image they have.
#   "exact": blake2b-128 over every byte (1.0 ms at 640×480): collisions only by a 2^-128
#     accident, even for crafted images. RGPT_RT_IMAGE_KEY=exact, for a service that must rule
#     collisions out entirely.
IMAGE_KEY_ENV = "RGPT_RT_IMAGE_KEY"
IMAGE_KEYS = ("sampled", "exact")
KEY_STRIDE = 8  # rows and columns between the pixels hashed by blake2b in the sampled key


def image_key(image: np.ndarray, kind: str | None = None) -> str:
    """The cache key of an image: a hash of its pixels and shape (its content, not its name).
    kind: "sampled" or "exact" (above); default $RGPT_RT_IMAGE_KEY, else "sampled"."""
    kind = kind or os.environ.get(IMAGE_KEY_ENV) or IMAGE_KEYS[0]
    if kind not in IMAGE_KEYS:
        raise ValueError(f"image key {kind!r} is unknown; use one of {IMAGE_KEYS}")
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    if kind == "exact":
        digest.update(image.data)
        return "x" + digest.hexdigest()
    digest.update(np.ascontiguousarray(image[::KEY_STRIDE, ::KEY_STRIDE]).data)
    return f"s{digest.hexdigest()}{zlib.crc32(image.data):08x}"
