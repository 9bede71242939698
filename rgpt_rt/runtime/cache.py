"""A least-recently-used cache bounded in bytes (vision results and prefix KV per image).

cache = ByteLRU(max_bytes=256 << 20)
cache.put(key, value, nbytes)     # evicts the least recently used entries to fit
value = cache.get(key)            # None when absent; marks the entry as recently used
"""

from __future__ import annotations

import hashlib
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


def image_key(image: np.ndarray) -> str:
    """The cache key of an image: a hash of its pixels and shape (its content, not its name)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()
