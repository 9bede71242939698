"""The static KV cache of the runtime decoder.

    cache = KVCache(num_layers, batch_size, num_kv_heads, max_len, head_dim, dtype, device)
    cache.copy_prefix(src, src_row, dst_rows, length)     # share a prompt prefix between rows
    prefix = cache.snapshot(length)                        # keep a prefix while the cache moves on
    k, v = cache.layer(i)                                  # layer i's [B, Hkv, T_max, hd] views

Positions are slots: row b holds positions 0..lengths[b]-1 and its next token goes at slot
lengths[b]. Attention is causal by position, so rows of different lengths share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rgpt_rt.runtime.graphs import DecodeGraph
    from rgpt_rt.runtime.model import LlamaDecoder


class KVCache:
    """Pre-allocated keys and values of every layer, and how many positions each row holds.

    k, v: [L, B, Hkv, T_max, hd] on the decoder's device; lengths: [B] int64 on the host (the
    decoder computes positions from it without a device sync). Row b holds positions
    0..lengths[b]-1; its next token is written at slot lengths[b].
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(
                f"a KV cache needs batch_size >= 1 and max_len >= 1; got {batch_size}, {max_len}"
            )
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = [(self.k[i], self.v[i]) for i in range(num_layers)]  # made once per cache
        self.lengths = torch.zeros(batch_size, dtype=torch.int64)
        self.graphs: dict[int, DecodeGraph] = {}  # CUDA graphs of the decode step, by key length
        # (decoder, its decode_step_kind) that captured the graphs
        self.graph_owner: tuple[LlamaDecoder, str] | None = None
        # the fused decode attention's (workspace, splits) for this cache's shape, made on first
        # use by the decoder (ops/decode.attention_workspace; CUDA graphs keep its address)
        self.attention_workspace: tuple[torch.Tensor | None, int] | None = None
        # The memory pool this cache's graphs share; it lives and dies with them. (A pool kept by
        # the decoder and reused after every graph in it was freed trips an internal assert in
        # torch's caching allocator: seen on an H200, torch 2.11.)
        self.graph_pool = None
        # (prefix cache key, length) when this cache holds an image prefix the Session will keep
        # once the answer using it is done (stages.Stages.release)
        self.prefix_of: tuple[str, int] | None = None
        # the prefix length, while this cache is a cached image prefix lent to an answer (a CPU
        # answers a next question inside it: stages.Stages.prefill); None otherwise
        self.lent_at: int | None = None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values [B, Hkv, T_max, hd] (views of k and v)."""
        return self._layers[i]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget the tokens of `rows` (all rows by default); the memory is reused as is."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[list(rows)] = 0

    def copy_prefix(
        self, src: KVCache, src_row: int, dst_rows: Sequence[int] | int, length: int
    ) -> None:
        """Copy the first `length` positions of `src` row `src_row` into each of `dst_rows` of this
        cache, whose lengths become `length` (what they held before is dropped). `src` may be this
        cache. Prefill each row's own suffix afterwards: it goes at positions length.."""
        rows = [dst_rows] if isinstance(dst_rows, int) else list(dst_rows)
        if [src.k.shape[i] for i in (0, 2, 4)] != [self.k.shape[i] for i in (0, 2, 4)]:
            raise ValueError(
                f"cannot copy between caches of different models: {tuple(src.k.shape)} vs {tuple(self.k.shape)}"
            )
        if not 0 <= src_row < src.batch_size or any(not 0 <= r < self.batch_size for r in rows):
            raise ValueError(
                f"rows out of range: src_row {src_row} of {src.batch_size}, dst_rows {rows} of {self.batch_size}"
            )
        if not 0 < length <= int(src.lengths[src_row]):
            raise ValueError(
                f"prefix length {length} is not in 1..{int(src.lengths[src_row])} (the tokens row {src_row} of the source holds)"
            )
        if length > self.max_len:
            raise ValueError(
                f"prefix length {length} does not fit this cache (max_len {self.max_len})"
            )
        index = torch.tensor(rows, device=self.device)
        for mine, theirs in ((self.k, src.k), (self.v, src.v)):
            # [L, Hkv, P, hd] from the source row, broadcast into [L, R, Hkv, P, hd]
            prefix = theirs[:, src_row, :, :length].to(device=self.device, dtype=mine.dtype)
            mine[:, index, :, :length] = prefix[:, None]
        self.lengths[rows] = length

    def snapshot(self, length: int | None = None, row: int = 0) -> KVCache:
        """A new batch-1 cache holding exactly the first `length` positions of `row` (default: all
        it holds), to keep a prefix for later `copy_prefix` calls while this cache moves on."""
        length = int(self.lengths[row]) if length is None else length
        L, _, Hkv, _, hd = self.k.shape
        copy = KVCache(L, 1, Hkv, length, hd, dtype=self.k.dtype, device=self.device)
        copy.copy_prefix(self, row, [0], length)
        return copy
