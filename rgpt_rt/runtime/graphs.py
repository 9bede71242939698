"""CUDA graphs of the decode step: one per cache (so per batch size), and for the unfused step
one per key-length bucket.

    logits = decode_graph(decoder, cache, kv_len, tokens, input_pos)(tokens, input_pos)

The fused step (model.py) attends over each row's own length, read on the device: one graph
serves every step of a cache (kv_len = cache.max_len). The unfused step attends over a key length
rounded up to GRAPH_KV_BUCKET slots, so one graph serves 256 decode steps and a 1k-slot cache
needs at most 4 graphs per batch size. The graphs live in the cache (`cache.graphs`), with the
memory pool they share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rgpt_rt.runtime.kv_cache import KVCache
    from rgpt_rt.runtime.model import LlamaDecoder

GRAPH_KV_BUCKET = 256


def graph_kv_len(cache: KVCache) -> int:
    """The key length the next decode step's graph attends over: the longest row plus the new
    token, rounded up to the bucket (at most the cache's length)."""
    longest = int(cache.lengths.max()) + 1
    return min(cache.max_len, -(-longest // GRAPH_KV_BUCKET) * GRAPH_KV_BUCKET)


def decode_graph(
    decoder: LlamaDecoder, cache: KVCache, kv_len: int, tokens: Tensor, input_pos: Tensor
) -> DecodeGraph:
    """The graph of this cache at kv_len, captured on first use (a cache last stepped by another
    decoder, or by another kind of step, drops the graphs it holds)."""
    owner = cache.graph_owner
    if owner is None or owner[0] is not decoder or owner[1] != decoder.decode_step_kind:
        cache.graphs, cache.graph_owner = {}, (decoder, decoder.decode_step_kind)
        cache.graph_pool = torch.cuda.graph_pool_handle()
    if kv_len not in cache.graphs:
        cache.graphs[kv_len] = DecodeGraph(
            decoder, cache, kv_len, tokens, input_pos, cache.graph_pool
        )
    return cache.graphs[kv_len]


class DecodeGraph:
    """The decode step of one cache (so one batch size) at one key length, captured as a CUDA graph.
    Static buffers: tokens [B], input_pos [B] in; logits [B, V] out."""

    def __init__(
        self,
        decoder: LlamaDecoder,
        cache: KVCache,
        kv_len: int,
        tokens: Tensor,
        input_pos: Tensor,
        pool,
    ):
        self.tokens, self.input_pos = tokens.clone(), input_pos.clone()
        # Warm up on a side stream with the real inputs: it writes the same K/V the replay will.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decoder.step_logits(self.tokens, self.input_pos, cache, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = decoder.step_logits(self.tokens, self.input_pos, cache, kv_len)  # [B, V]
        self.rope = (decoder.rope_cos, decoder.rope_signed_sin)  # keep the captured tables alive

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.input_pos.copy_(input_pos)
        self.graph.replay()
        return self.logits.clone()  # the static output is overwritten by the next replay
