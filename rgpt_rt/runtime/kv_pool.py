"""KV caches in flight: allocated for what a call needs, reused across answers (with the CUDA
graphs they hold), capped by the context the Session allows.

    pool = KVPool(decoder, max_context=4096)
    cache = pool.acquire(batch=2, positions=700)   # a cache of >= 700 slots for 2 rows
    pool.release(cache)                            # back to the pool, for the next answer
    cache = pool.grow(cache, positions=1500, keep=900)   # a chat that outgrew its cache

Lengths are rounded up to a bucket, so a few sizes serve every prompt and the pool stays small:
KV_BUCKET positions on CUDA (each size has its CUDA graphs), CPU_KV_BUCKET on a CPU (no graphs:
less rounding, less memory).
"""

from __future__ import annotations

import threading

import torch

from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.model import LlamaDecoder

KV_BUCKET = 256
CPU_KV_BUCKET = 64


class KVPool:
    """The caches waiting in the pool hold at most what one answer of max_context positions and
    one batch of max_batch rows of one bucket need; a cache given back past that is freed."""

    def __init__(self, decoder: LlamaDecoder, max_context: int, max_batch: int = 16):
        self.decoder = decoder
        self.max_context = max_context
        c = decoder.config
        element = torch.empty(0, dtype=decoder.kv_dtype or decoder.dtype).element_size()
        self.bytes_per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * element
        self.bucket = KV_BUCKET if decoder.device.type == "cuda" else CPU_KV_BUCKET
        self.max_free_bytes = self.bytes_per_position * (max_context + max_batch * self.bucket)
        self._free: dict[tuple[int, int], list[KVCache]] = {}
        self._lock = threading.Lock()

    def slots_for(self, positions: int) -> int:
        """The cache length that holds `positions`: rounded up to the bucket, at most max_context."""
        return min(self.max_context, -(-positions // self.bucket) * self.bucket)

    def acquire(self, batch: int, positions: int) -> KVCache:
        """An empty KV cache of `batch` rows holding at least `positions` (a free one when the
        pool has one of that size)."""
        max_len = self.slots_for(positions)
        with self._lock:
            free = self._free.get((batch, max_len))
            cache = free.pop() if free else None
        if cache is None:
            return self.decoder.new_cache(batch, max_len)
        cache.reset()
        return cache

    def release(self, cache: KVCache) -> None:
        with self._lock:
            held = sum(c.nbytes for caches in self._free.values() for c in caches)
            if held + cache.nbytes <= self.max_free_bytes:
                self._free.setdefault((cache.batch_size, cache.max_len), []).append(cache)

    def grow(self, cache: KVCache | None, positions: int, keep: int) -> KVCache:
        """`cache` when it holds `positions` already; else a new batch-1 cache that does, holding
        the first `keep` positions of the old one (not pooled: its owner keeps it)."""
        if cache is not None and cache.max_len >= positions:
            return cache
        grown = self.decoder.new_cache(1, self.slots_for(positions))
        if cache is not None and keep > 0:
            grown.copy_prefix(cache, 0, [0], keep)
        return grown

    @property
    def free_caches(self) -> int:
        """How many caches wait in the pool (a stream that ended gave its cache back)."""
        with self._lock:
            return sum(len(caches) for caches in self._free.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for caches in self._free.values() for c in caches)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
