"""The stages a question goes through, shared by every Session method and by Chat:

    seen = stages.see(image, stats)                                  # preprocess + vision (cached per image)
    embeds = stages.numbered(stages.regions(seen, masks, stats))     # the region encoder: [N, k, D]
    ids, order = stages.tokenize(stages.conversation(question), N)   # template + tokenizer
    cache, logits = stages.prefill(seen, ids, [embeds[order]], params, stats)   # prefix KV cached per image

`stats` collects what each stage took (ms) and what it saw; the Session reports it as
`session.stats`. Every stage that touches the model runs under `lock` (one Session may be
shared by threads; see session.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import ImageLike, MaskLike
from rgpt_rt.ops import add_region_numbers
from rgpt_rt.prompts import Conversation, tokenize_conversation
from rgpt_rt.runtime.cache import ByteLRU, image_key, tensor_bytes
from rgpt_rt.runtime.families import Features, region_family, splice_embeddings
from rgpt_rt.runtime.generate import SamplingParams
from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.kv_pool import KVPool
from rgpt_rt.runtime.memory import default_prefix_cache_bytes
from rgpt_rt.runtime.model import LlamaDecoder
from rgpt_rt.runtime.preprocess import Frame
from rgpt_rt.runtime.vision import VisionBackend, Widened


@dataclass
class Seen:
    """An image after the vision stage."""

    frame: Frame
    image_embeds: torch.Tensor  # [1, g*g, D] in the decoder's dtype
    features: Features  # what regions are pooled from: RegionGPT's hi-res map [1, 4g, 4g, C],
    # or Osprey's four levels (runtime/families/)


class Stages:
    def __init__(
        self,
        *,
        config: RGPTConfig,
        tokenizer: Tokenizer,
        vision: VisionBackend,
        connector: dict[str, torch.Tensor],
        decoder: LlamaDecoder,
        max_context: int,
        max_batch: int = 16,
        max_image_side: int = 2048,
        vision_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.vision = vision
        self.decoder = decoder
        self.device, self.dtype = decoder.device, decoder.dtype
        # connector: {"connector.fc1.weight_t", ...} on the decoder's device, read in its dtype
        # (a CPU keeps the bundle's fp16 and widens each weight when it is used)
        stored = self.dtype if self.device.type == "cuda" else None
        self.connector = Widened(
            {f"connector.{k}": v.to(self.device, stored) for k, v in connector.items()}, self.dtype
        )
        self._check_connector_parts()
        names = config.tokens
        self.eos_id = tokenizer.token_to_id(names.eos)
        self.image_id = tokenizer.token_to_id(names.image)
        self.family = region_family(config)  # what differs between RegionGPT and Osprey
        self.slot_ids = self.family.slot_ids(tokenizer)  # the tokens a region is written as
        self.max_context = max_context
        self.max_image_side = max_image_side
        self.lock = threading.RLock()
        self.vision_cache = ByteLRU(vision_cache_bytes)
        self.pool = KVPool(decoder, max_context, max_batch)
        if prefix_cache_bytes is None:  # room for one image prefix at least (memory.py)
            per_position = self.pool.bytes_per_position
            prefix_cache_bytes = default_prefix_cache_bytes(config.num_image_tokens, per_position)
        self.prefix_cache = ByteLRU(prefix_cache_bytes)

    # --- image and regions ----------------------------------------------------------------------
    def see(self, image: ImageLike, stats: dict[str, Any]) -> Seen:
        """Preprocess, then the vision stage unless this image's result is cached. Decoding and
        the checks run on the CPU, the padding, resize and normalisation on the Session's device
        (runtime/preprocess.py), and only for an image whose vision result is not cached."""
        start = time.perf_counter()
        family = self.family
        frame = family.prepare_image(image, self.max_image_side)
        frame.key = image_key(frame.pixels)
        with self.lock:
            cached = self.vision_cache.get(frame.key)
        if cached is None:
            frame.pixel_values = family.pixel_values(frame, self.device)
            self.sync()
        stats["preprocess_ms"] = elapsed_ms(start)
        stats["original_size"] = list(frame.original_size)
        stats["image_size"] = list(frame.pixels.shape[:2])
        stats["vision_cached"] = cached is not None
        start = time.perf_counter()
        if cached is None:
            with self.lock:
                image_embeds, features = self.vision(frame.pixel_values)
                cached = (image_embeds.to(self.dtype), family.features_to(features, self.dtype))
                nbytes = tensor_bytes(cached[0], *family.features_list(cached[1]))
                self.vision_cache.put(frame.key, cached, nbytes)
        self.sync()
        stats["vision_ms"] = elapsed_ms(start)
        return Seen(frame, cached[0], cached[1])

    def regions(self, seen: Seen, masks: Sequence[MaskLike], stats: dict[str, Any]) -> torch.Tensor:
        """The family's region encoder (RegionGPT: mask pooling on the hi-res map, the
        connector, each mask's centroid projection where the model has one; Osprey: its mask
        extractor): [N, k, D], k embeddings per region."""
        start = time.perf_counter()
        prepared = self.family.prepare_masks(list(masks), seen.frame, self.device)  # [N, h, w]
        with self.lock:
            embeds = self.family.encode(seen.features, prepared, self.connector)
        self.sync()
        stats["regions_ms"] = elapsed_ms(start)
        stats["regions"] = int(prepared.shape[0])
        return embeds

    def numbered(self, embeds: torch.Tensor) -> torch.Tensor:
        """One question's region embeddings [N, k, D] (mask i is <region{i+1}>), each region's
        first embedding plus its number's vector where the model has them
        (rgpt_rt/ops/region_numbers.py)."""
        table = self.connector.get("connector.region_number")
        if table is None:
            return embeds
        first = add_region_numbers(embeds[:, 0], table)  # [N, D]
        return torch.cat([first[:, None], embeds[:, 1:]], dim=1)

    def conversation(self, question: str) -> Conversation:
        """A one-turn conversation in the model's chat template."""
        return Conversation.single(question, template=self.family.template)

    # --- the prompt -----------------------------------------------------------------------------
    def tokenize(
        self, conversation: Conversation, num_regions: int, require_all: bool = True
    ) -> tuple[list[int], torch.Tensor]:
        """(input ids, order): the region embeddings go in at the region tokens as embeds[order]."""
        tokens = tokenize_conversation(
            self.tokenizer,
            conversation,
            num_regions=num_regions,
            num_image_tokens=self.config.num_image_tokens,
            tokens=self.config.tokens,
            require_all=require_all,
        )
        return tokens.input_ids, torch.tensor(tokens.region_order, dtype=torch.int64)

    def splice(
        self,
        ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        region_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """ids [B, T] -> token embeddings [B, T, D] with the image embeddings at the image tokens
        and the region embeddings [R, k, D] at the regions' slot tokens (row-major)."""
        return splice_embeddings(
            self.decoder.embed, ids, self.image_id, image_embeds, self.slot_ids, region_embeds
        )

    def check_room(self, needed: int, what: str = "the prompt and answer", fix: str = "") -> None:
        if needed > self.max_context:
            raise ValueError(
                f"{what}: {needed} positions are needed but this Session holds "
                f"{self.max_context}; " + (fix or "ask a shorter question or lower max_new_tokens")
            )

    # --- prefill --------------------------------------------------------------------------------
    def prefill(
        self,
        seen: Seen,
        ids: list[int],
        region_rows: Sequence[torch.Tensor],
        params: SamplingParams,
        stats: dict[str, Any],
    ) -> tuple[KVCache, torch.Tensor]:
        """The prefix from the cache (or computed once), then each row's own suffix: the question
        with its region embeddings. region_rows: one [R, D] tensor per row. Returns a cache (give
        it back with `release`) and the logits [B, V] at each row's last token."""
        start = time.perf_counter()
        rows = len(region_rows)
        length = self._prefix_length(ids)
        needed = len(ids) + params.max_new_tokens
        self.check_room(needed)
        key = self._prefix_key(seen, ids, length)
        if rows == 1 and key not in self.prefix_cache:
            # A new image: one prefill of the image and the question together (after the
            # system prompt's KV, computed once per Session); the image prefix is kept from it
            # for the next question about this image.
            cache = self.pool.acquire(1, needed)
            text = self._copy_text_prefix(cache, ids)
            tokens = torch.tensor([ids[text:]], device=self.device)
            embeds = self.splice(tokens, seen.image_embeds, region_rows[0])  # [1, T - text, D]
            logits = self.decoder.prefill(cache, inputs_embeds=embeds)
            cache.prefix_of = (key, length)  # kept as this image's prefix when released
            prefilled = len(ids) - text
        else:
            prefix = self._prefix(seen, ids, key, length)
            suffix = torch.tensor([ids[length:]] * rows, device=self.device)  # [B, Ts]
            first_slot = self.slot_ids[0]
            if rows > 1 and first_slot in ids[length:]:
                # Several regions, one question: the question's tokens before its first region
                # token are the same in every row, so they are prefilled once, into the prefix.
                shared = ids.index(first_slot, length)
                if shared > length:
                    prefix = self._extend(prefix, length, ids[length:shared])
                    length, suffix = shared, suffix[:, shared - length :]
            if rows == 1 and self._lendable(prefix, length, needed):
                # A CPU keeps an image's prefix as its first answer's whole cache: the next
                # question about the image is answered in it, after the prefix (no second
                # cache, no copy); release() cuts it back to the prefix.
                cache, prefix.lent_at = prefix, length
            else:
                cache = self.pool.acquire(rows, needed)
                cache.copy_prefix(prefix, 0, list(range(rows)), length)
            embeds = self.splice(suffix, None, torch.cat(list(region_rows)))  # [B, Ts, D]
            logits = self.decoder.prefill(cache, inputs_embeds=embeds)
            prefilled = int(suffix.numel())
        self.sync()
        stats["prefill_ms"] = stats.get("prefill_ms", 0.0) + elapsed_ms(start)
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + prefilled
        stats["prefix_tokens"] = length
        return cache, logits

    def release(self, cache: KVCache) -> None:
        """An answer's cache is done. When it holds an image prefix that is not cached yet, the
        prefix is kept: on a CPU the cache itself becomes the cached prefix (cut back to it, no
        copy: memory); on CUDA the prefix is copied out (a fraction of a millisecond) and the
        cache, with the CUDA graphs it carries, goes back to the pool. A cached prefix lent to
        an answer is cut back to the prefix."""
        if cache.lent_at is not None:
            with self.lock:
                cache.lengths.fill_(cache.lent_at)
                cache.lent_at = None
            return
        parked, cache.prefix_of = cache.prefix_of, None
        if parked is not None:
            key, length = parked
            with self.lock:
                if key not in self.prefix_cache:
                    if self.device.type == "cuda":
                        prefix = cache.snapshot(length)
                        self.prefix_cache.put(key, prefix, prefix.nbytes)
                    elif self.prefix_cache.fits(cache.nbytes):
                        cache.lengths.fill_(length)
                        self.prefix_cache.put(key, cache, cache.nbytes)
                        return
        self.pool.release(cache)

    def prefill_turn(
        self,
        cache: KVCache | None,
        keep: int,
        seen: Seen,
        ids: list[int],
        region_embeds: torch.Tensor,
        params: SamplingParams,
        stats: dict[str, Any],
    ) -> tuple[KVCache, torch.Tensor]:
        """A conversation's next turn on its own batch-1 cache (None: the first turn, which starts
        from this image's cached prefix): the cache's first `keep` positions hold ids[:keep], and
        only the tokens after them are prefilled. Returns the cache (grown when the conversation
        outgrew it) and the logits [1, V]."""
        start = time.perf_counter()
        self.check_room(len(ids) + params.max_new_tokens, "the conversation", "start a new chat")
        keep = min(keep, len(ids) - 1)  # always prefill at least one token, for fresh logits
        if cache is None:
            keep = self._prefix_length(ids)
            prefix = self._prefix(seen, ids, self._prefix_key(seen, ids, keep), keep)
            cache = self.pool.grow(None, len(ids) + params.max_new_tokens, 0)
            cache.copy_prefix(prefix, 0, [0], keep)
        else:
            cache = self.pool.grow(cache, len(ids) + params.max_new_tokens, keep)
            cache.lengths[0] = keep
        full = torch.tensor([ids], device=self.device)
        embeds = self.splice(full, seen.image_embeds, region_embeds)[:, keep:]  # [1, new, D]
        logits = self.decoder.prefill(cache, inputs_embeds=embeds)
        self.sync()
        stats["prefill_ms"] = elapsed_ms(start)
        stats["prefill_tokens"] = len(ids) - keep
        return cache, logits

    def _lendable(self, prefix: KVCache, length: int, needed: int) -> bool:
        """Whether an answer of `needed` positions may run inside the cached prefix itself: a
        CPU's (CUDA's prefixes are exact copies, and its caches carry CUDA graphs), not lent to
        another answer, holding just the prefix, with room for the answer."""
        return (
            self.device.type == "cpu"
            and prefix.lent_at is None
            and int(prefix.lengths[0]) == length
            and prefix.max_len >= needed
        )

    def _prefix_length(self, ids: list[int]) -> int:
        """P: the shared prefix is BOS + system prompt + user role + image tokens."""
        return max(i for i, t in enumerate(ids) if t == self.image_id) + 1

    def _prefix_key(self, seen: Seen, ids: list[int], length: int) -> str:
        return f"{seen.frame.key}:{hash(tuple(ids[:length]))}"

    def _prefix(self, seen: Seen, ids: list[int], key: str, length: int) -> KVCache:
        """A batch-1 cache holding the image prefix's KV (length P), from the prefix cache or
        computed (and kept there when it fits)."""
        cached = self.prefix_cache.get(key)
        if cached is not None:
            return cached
        cache = self.decoder.new_cache(1, length)
        text = self._copy_text_prefix(cache, ids)
        tokens = torch.tensor([ids[text:length]], device=self.device)
        self.decoder.prefill(cache, inputs_embeds=self.splice(tokens, seen.image_embeds, None))
        self.prefix_cache.put(key, cache, cache.nbytes)
        return cache

    def _copy_text_prefix(self, cache: KVCache, ids: list[int]) -> int:
        """Put the KV of the text before the first image token (BOS, system prompt, user role:
        the same for every image, computed once) into row 0 of `cache`; returns its length."""
        text = ids.index(self.image_id)
        if text > 0:
            key = f"text:{hash(tuple(ids[:text]))}"
            cached = self.prefix_cache.get(key)
            if cached is None:
                cached = self.decoder.new_cache(1, text)
                tokens = torch.tensor([ids[:text]], device=self.device)
                self.decoder.prefill(cached, inputs_embeds=self.splice(tokens, None, None))
                self.prefix_cache.put(key, cached, cached.nbytes)
            cache.copy_prefix(cached, 0, [0], text)
        return text

    def _extend(self, prefix: KVCache, length: int, ids: list[int]) -> KVCache:
        """A new batch-1 cache: the first `length` positions of `prefix`, then `ids`."""
        longer = self.decoder.new_cache(1, length + len(ids))
        longer.copy_prefix(prefix, 0, [0], length)
        tokens = torch.tensor([ids], device=self.device)
        self.decoder.prefill(longer, inputs_embeds=self.splice(tokens, None, None))
        return longer

    # --- housekeeping ---------------------------------------------------------------------------
    def _check_connector_parts(self) -> None:
        """The connector holds the optional parts the config names, with their shapes, and no
        other: a region-number table [numbers, D] and a centroid projection [4F, D]."""
        hidden = self.config.llm.hidden_size
        numbers = self.config.connector.region_numbers
        frequencies = self.config.connector.region_positions
        parts = (
            ("region_numbers", numbers, "region_number", (numbers, hidden)),
            (
                "region_positions",
                frequencies,
                "region_position.weight_t",
                (4 * frequencies, hidden),
            ),
        )
        for field, size, name, shape in parts:
            weight = self.connector.get(f"connector.{name}")
            if bool(size) != (weight is not None) or (
                weight is not None and tuple(weight.shape) != shape
            ):
                held = None if weight is None else tuple(weight.shape)
                raise ValueError(
                    f"the config sets connector.{field} = {size} but the connector weights hold "
                    f"{name} {held}; rebuild the bundle with export/build_engine.py"
                )

    def warm_up(self) -> None:
        """Pay one-time costs at load, not in the first answer: the first call of each custom
        op in a process imports torch._dynamo (seconds), and kernels pick their paths."""
        self.family.warm_up(self.connector, self.device, self.dtype)
        cache = self.decoder.new_cache(1, 8)
        self.decoder.prefill(cache, input_ids=torch.tensor([[self.eos_id]], device=self.device))

    def clear_caches(self) -> None:
        with self.lock:
            self.vision_cache.clear()
            self.prefix_cache.clear()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
