"""rgpt_rt.Session: region understanding at the edge.

    sess = rgpt_rt.Session()                                   # the embedded default model, cuda when available
    sess.describe("photo.png", mask)                           # -> str
    for delta in sess.describe(image, (10, 20, 60, 80), stream=True): print(delta, end="")
    sess.describe_many(image, masks)                           # every region in one batched decode
    sess.classify(image, mask); sess.refer(image, "the red star", masks); sess.ask(image, "Is <region1> above <region2>?", masks)
    chat = sess.chat(image, masks); chat.send("What color is <region1>?")
    sess.info(); sess.stats

Stages: preprocess -> vision (cached per image content) -> mask pooling + connector ->
prompt -> prefill (the system prompt + image prefix is cached per image, so a further question
prefills only its own tokens) -> INT4 decode, streamed.

Thread safety: one Session may be shared by threads. Model calls are serialised by a lock;
each answer in flight (a stream included) owns its KV cache until it finishes, is closed, or
is dropped, so interleaved streams stay correct.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.inputs import ImageLike, MaskLike
from rgpt_rt.ops import add_region_numbers, add_region_positions, mask_pool
from rgpt_rt.prompts import (
    Conversation,
    classify_prompt,
    describe_prompt,
    parse_refer_answer,
    refer_prompt,
    tokenize_conversation,
)
from rgpt_rt.runtime.cache import ByteLRU, image_key, tensor_bytes
from rgpt_rt.runtime.decoder import KVCache, LlamaDecoder
from rgpt_rt.runtime.generate import SamplingParams, decode, decode_steps
from rgpt_rt.runtime.llm_bundle import load_bundle_decoder
from rgpt_rt.runtime.preprocess import Frame, prepare_image, prepare_masks
from rgpt_rt.runtime.vision import connect, select_vision_backend
from rgpt_rt.tokenizer import load_tokenizer

BUNDLE_ENV = "RGPT_RT_BUNDLE"
# The classify vocabulary the embedded tiny model was taught (rgpt_rt/data/tasks.py VOCABULARY);
# pass vocabulary= for models taught others (COCO-80 for RegionGPT).
DEFAULT_VOCABULARY = "shape"


def default_bundle() -> Path:
    """$RGPT_RT_BUNDLE, else the bundle of the embedded default model shipped in the package."""
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-bundle"


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; use 'auto', 'cpu' or 'cuda'")
    return device


class Session:
    def __init__(
        self,
        bundle: str | Path | None = None,
        device: str | torch.device = "auto",
        *,
        vision_backend: str | None = None,
        max_image_side: int = 2048,
        vision_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int = 512 << 20,
        max_batch: int = 16,
        verify: bool = True,
    ):
        """bundle: a folder from export/build_engine.py (None: the embedded default model);
        device: "auto" (cuda when available), "cpu" or "cuda"; vision_backend: force
        "tensorrt", "onnxruntime" or "torch"; verify: check every file's sha256 at load."""
        device = resolve_device(device)
        folder = Path(bundle) if bundle is not None else default_bundle()
        manifest = verify_bundle(folder, hashes=verify)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        connector = load_file(str(folder / "connector.safetensors"))
        self._setup(
            config=manifest.config,
            tokenizer=load_tokenizer(folder),
            vision=select_vision_backend(folder, manifest, device, prefer=vision_backend),
            connector=connector,
            decoder=load_bundle_decoder(folder, manifest.config.llm, dtype, device),
            device=device,
            source={
                "bundle": str(folder),
                "quantization": manifest.quantization,
                "tensorrt": manifest.data.get("tensorrt"),
            },
            max_image_side=max_image_side,
            vision_cache_bytes=vision_cache_bytes,
            prefix_cache_bytes=prefix_cache_bytes,
            max_batch=max_batch,
        )

    @classmethod
    def from_parts(
        cls, *, config, tokenizer, vision, connector, decoder, device, source=None, **options
    ) -> Session:
        """A Session over components already in memory (benchmarks of random-weight models that
        are never written as a bundle). connector: {"fc1.weight", ...} tensors."""
        session = cls.__new__(cls)
        session._setup(
            config=config, tokenizer=tokenizer, vision=vision, connector=connector, decoder=decoder,
            device=torch.device(device), source=source or {"bundle": None}, **options,
        )  # fmt: skip
        return session

    def _setup(
        self,
        *,
        config,
        tokenizer,
        vision,
        connector: dict[str, torch.Tensor],
        decoder: LlamaDecoder,
        device: torch.device,
        source: dict[str, Any],
        max_image_side: int = 2048,
        vision_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int = 512 << 20,
        max_batch: int = 16,
    ) -> None:
        self.device = device
        self.dtype = decoder.dtype
        self.config = config
        self.tokenizer = tokenizer
        self.vision = vision
        self.connector = {f"connector.{k}": v.to(device, self.dtype) for k, v in connector.items()}
        hidden = config.llm.hidden_size
        numbers, frequencies = config.connector.region_numbers, config.connector.region_positions
        self._check_connector_part("region_numbers", numbers, "region_number", (numbers, hidden))
        self._check_connector_part(
            "region_positions", frequencies, "region_position.weight", (hidden, 4 * frequencies)
        )
        self.decoder = decoder
        self.source = source
        names = config.tokens
        self.eos_id = tokenizer.token_to_id(names.eos)
        self.image_id = tokenizer.token_to_id(names.image)
        self.region_id = tokenizer.token_to_id(names.region)
        self.max_image_side = max_image_side
        self.max_batch = max_batch
        self.max_context = config.llm.max_position_embeddings
        self._lock = threading.RLock()
        self._vision_cache = ByteLRU(vision_cache_bytes)
        self._prefix_cache = ByteLRU(prefix_cache_bytes)
        self._free_caches: dict[tuple[int, int], list[KVCache]] = {}
        self.stats: dict[str, Any] = {}
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay one-time costs at load, not in the first answer: the first call of each custom
        op in a process imports torch._dynamo (seconds), and kernels pick their paths."""
        channels = self.config.vision.hidden_size
        hires = torch.zeros(1, 4, 4, channels, dtype=self.dtype, device=self.device)
        mask_pool(
            hires,
            torch.ones(1, 4, 4, dtype=torch.bool, device=self.device),
            mode=self.config.pool_mode,
        )
        cache = self.decoder.new_cache(1, 8)
        self.decoder.prefill(cache, input_ids=torch.tensor([[self.eos_id]], device=self.device))

    # --- the public API ---------------------------------------------------------------------
    def describe(
        self,
        image: ImageLike,
        mask: MaskLike,
        *,
        detailed: bool = True,
        stream: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> str | Iterator[str]:
        """Describe one region (a mask or a box (x0, y0, x1, y1)) of an image."""
        params = self._params(max_new_tokens, temperature)
        return self._answer(image, [mask], describe_prompt(detailed), params, stream)

    def describe_many(
        self,
        image: ImageLike,
        masks: Sequence[MaskLike],
        *,
        detailed: bool = True,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """Every region of one image: one vision pass, one shared prefix, one batched decode."""
        params = self._params(max_new_tokens, temperature)
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        frame, image_embeds, hires = self._see(image, stats)
        region_embeds = self._regions(hires, masks, frame, stats)  # [N, D]
        ids, order = self._tokenize(Conversation.single(describe_prompt(detailed)), 1)
        answers: list[str] = []
        stats["decode_ms"], stats["new_tokens"] = 0.0, 0
        for first in range(0, region_embeds.shape[0], self.max_batch):
            chunk = region_embeds[first : first + self.max_batch]
            # one region per row, each the question's <region1>
            rows = [self._numbered(chunk[i : i + 1])[order] for i in range(chunk.shape[0])]
            with self._lock:
                cache, logits = self._prefill(frame, image_embeds, ids, rows, params, stats)
                stats.setdefault("ttft_ms", _ms(started))
                start = time.perf_counter()
                try:
                    generations = decode(
                        self.decoder, cache, logits, params, tokenizer=self.tokenizer
                    )
                finally:
                    self._release(cache)
                stats["decode_ms"] += _ms(start)
            answers.extend(g.text.strip() for g in generations)
            stats["new_tokens"] += sum(len(g.ids) for g in generations)
        self._finish_stats(stats, started)
        return answers

    def classify(self, image: ImageLike, mask: MaskLike, *, vocabulary: str | None = None) -> str:
        """The category of one region, in `vocabulary` (default: what the model was taught)."""
        prompt = classify_prompt(vocabulary or DEFAULT_VOCABULARY)
        return self._answer(image, [mask], prompt, self._params(32, 0.0), False)

    def ask(
        self,
        image: ImageLike,
        question: str,
        masks: Sequence[MaskLike] | MaskLike,
        *,
        stream: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> str | Iterator[str]:
        """A free question naming regions as <region1>..<regionN> (the masks, in order)."""
        masks = _as_list(masks)
        return self._answer(
            image, masks, question, self._params(max_new_tokens, temperature), stream
        )

    def refer(self, image: ImageLike, expression: str, masks: Sequence[MaskLike]) -> int | None:
        """Which region (0-based) fits the expression; None for "No corresponding options found."."""
        masks = _as_list(masks)
        if not expression.strip():
            raise ValueError(
                "the expression is empty; describe the region to find, e.g. 'the red star'"
            )
        answer = self._answer(
            image, masks, refer_prompt(expression, len(masks)), self._params(16, 0.0), False
        )
        return parse_refer_answer(answer, len(masks))

    def chat(self, image: ImageLike, masks: Sequence[MaskLike] | MaskLike) -> Chat:
        """A multi-turn conversation about regions of one image: chat.send(text, stream=False)."""
        return Chat(self, image, _as_list(masks))

    def clear_caches(self) -> None:
        """Forget every cached vision result and prefix KV (the next question is cold)."""
        with self._lock:
            self._vision_cache.clear()
            self._prefix_cache.clear()

    def info(self) -> dict[str, Any]:
        quant = self.source.get("quantization") or {}
        return {
            "bundle": self.source.get("bundle"),
            "model": self.config.name,
            "device": str(self.device)
            + (
                f" ({torch.cuda.get_device_name(self.device)})"
                if self.device.type == "cuda"
                else ""
            ),
            "vision_backend": self.vision.name,
            "llm": {
                "quantization": quant.get("method", "none"),
                "group_size": quant.get("group_size"),
                "dtype": str(self.dtype).replace("torch.", ""),
            },
            "tensorrt": self.source.get("tensorrt"),
            "image_tokens": self.config.num_image_tokens,
            "caches": {
                "vision": {
                    "entries": len(self._vision_cache),
                    "bytes": self._vision_cache.bytes,
                    "max_bytes": self._vision_cache.max_bytes,
                },
                "prefix": {
                    "entries": len(self._prefix_cache),
                    "bytes": self._prefix_cache.bytes,
                    "max_bytes": self._prefix_cache.max_bytes,
                },
            },
        }

    # --- stages -------------------------------------------------------------------------------
    def _params(self, max_new_tokens: int, temperature: float) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=self.eos_id
        )

    def _see(
        self, image: ImageLike, stats: dict[str, Any]
    ) -> tuple[Frame, torch.Tensor, torch.Tensor]:
        """Preprocess, then the vision stage unless this image's result is cached."""
        start = time.perf_counter()
        frame = prepare_image(image, self.config.vision, self.max_image_side)
        frame.key = image_key(frame.pixels)
        stats["preprocess_ms"] = _ms(start)
        stats["original_size"] = list(frame.original_size)
        stats["image_size"] = list(frame.pixels.shape[:2])
        start = time.perf_counter()
        with self._lock:
            cached = self._vision_cache.get(frame.key)
            stats["vision_cached"] = cached is not None
            if cached is None:
                image_embeds, hires = self.vision(frame.pixel_values)
                cached = (image_embeds.to(self.dtype), hires.to(self.dtype))
                self._vision_cache.put(frame.key, cached, tensor_bytes(*cached))
        _sync(self.device)
        stats["vision_ms"] = _ms(start)
        return frame, cached[0], cached[1]

    def _check_connector_part(self, field: str, size: int, name: str, shape: tuple) -> None:
        """The connector weights hold `name` with `shape` when config.connector.`field` > 0,
        and do not hold it when it is 0."""
        weight = self.connector.get(f"connector.{name}")
        if bool(size) != (weight is not None) or (
            weight is not None and tuple(weight.shape) != shape
        ):
            held = None if weight is None else tuple(weight.shape)
            raise ValueError(
                f"the config sets connector.{field} = {size} but the connector weights hold "
                f"{name} {held}; rebuild the bundle with export/build_engine.py"
            )

    def _regions(
        self, hires: torch.Tensor, masks, frame: Frame, stats: dict[str, Any]
    ) -> torch.Tensor:
        """Mask pooling on the hi-res map, then the connector (plus each mask's centroid
        projection where the model has one): [N, D]."""
        start = time.perf_counter()
        prepared = prepare_masks(_as_list(masks), frame).to(self.device)  # [N, S', S']
        with self._lock:
            pooled = mask_pool(hires, prepared, mode=self.config.pool_mode)  # [N, C]
            embeds = connect(pooled, self.connector)  # [N, D]
            projection = self.connector.get("connector.region_position.weight")
            if projection is not None:
                embeds = add_region_positions(embeds, prepared, projection)
        _sync(self.device)
        stats["regions_ms"] = _ms(start)
        stats["regions"] = int(prepared.shape[0])
        return embeds

    def _numbered(self, embeds: torch.Tensor) -> torch.Tensor:
        """One question's region embeddings [N, D] (mask k is <region{k+1}>), each plus its
        number's vector where the model has them (rgpt_rt/ops/region_numbers.py)."""
        table = self.connector.get("connector.region_number")
        return embeds if table is None else add_region_numbers(embeds, table)

    def _tokenize(self, conversation: Conversation, num_regions: int, require_all: bool = True):
        tokens = tokenize_conversation(
            self.tokenizer,
            conversation,
            num_regions=num_regions,
            num_image_tokens=self.config.num_image_tokens,
            tokens=self.config.tokens,
            require_all=require_all,
        )
        return tokens.input_ids, torch.tensor(tokens.region_order, dtype=torch.int64)

    def _prefix(
        self, frame: Frame, image_embeds: torch.Tensor, ids: list[int]
    ) -> tuple[KVCache, int]:
        """The KV of the shared prefix (BOS + system prompt + user role + image tokens), cached per
        image. Returns a batch-1 cache holding it and its length P."""
        length = max(i for i, t in enumerate(ids) if t == self.image_id) + 1
        key = f"{frame.key}:{hash(tuple(ids[:length]))}"
        cached = self._prefix_cache.get(key)
        if cached is not None:
            return cached, length
        prefix_ids = torch.tensor([ids[:length]], device=self.device)
        embeds = self._splice(prefix_ids, image_embeds, None)  # [1, P, D]
        cache = self.decoder.new_cache(1, length)
        # The text before the first image token (BOS, system prompt, user role) is the same for
        # every image: its KV is computed once and copied, and only the image tokens are prefilled.
        text = ids.index(self.image_id)
        if text > 0:
            cache.copy_prefix(self._text_prefix(ids[:text], embeds[:, :text]), 0, [0], text)
        self.decoder.prefill(cache, inputs_embeds=embeds[:, text:])
        self._prefix_cache.put(key, cache, cache.nbytes)
        return cache, length

    def _extend(self, prefix: KVCache, length: int, ids: list[int]) -> KVCache:
        """A new batch-1 cache: the first `length` positions of `prefix`, then `ids`."""
        longer = self.decoder.new_cache(1, length + len(ids))
        longer.copy_prefix(prefix, 0, [0], length)
        tokens = torch.tensor([ids], device=self.device)
        self.decoder.prefill(longer, inputs_embeds=self._splice(tokens, None, None))
        return longer

    def _text_prefix(self, ids: list[int], embeds: torch.Tensor) -> KVCache:
        key = f"text:{hash(tuple(ids))}"
        cached = self._prefix_cache.get(key)
        if cached is None:
            cached = self.decoder.new_cache(1, len(ids))
            self.decoder.prefill(cached, inputs_embeds=embeds)
            self._prefix_cache.put(key, cached, cached.nbytes)
        return cached

    def _prefill(self, frame, image_embeds, ids, region_rows, params, stats):
        """Prefix from the cache (or computed once), then each row's own suffix: the question with
        its region embeddings. region_rows: one [R, D] tensor per row. Returns (cache, logits [B, V])."""
        start = time.perf_counter()
        prefix, length = self._prefix(frame, image_embeds, ids)
        suffix = torch.tensor([ids[length:]] * len(region_rows), device=self.device)  # [B, Ts]
        needed = length + suffix.shape[1] + params.max_new_tokens
        if needed > self.max_context:
            raise ValueError(
                f"the prompt and answer need {needed} positions but the model holds {self.max_context}; "
                "ask a shorter question or lower max_new_tokens"
            )
        rows = len(region_rows)
        if rows > 1 and self.region_id in ids[length:]:
            # Several regions, one question: the question's tokens before its first region
            # token are the same in every row, so they are prefilled once, into the prefix.
            shared = ids.index(self.region_id, length)
            if shared > length:
                prefix = self._extend(prefix, length, ids[length:shared])
                length, suffix = shared, suffix[:, shared - length :]
        cache = self._acquire(rows, needed)
        cache.copy_prefix(prefix, 0, list(range(rows)), length)
        embeds = self._splice(suffix, None, torch.cat(region_rows))  # [B, Ts, D]
        logits = self.decoder.prefill(cache, inputs_embeds=embeds)
        _sync(self.device)
        stats["prefill_ms"] = stats.get("prefill_ms", 0.0) + _ms(start)
        stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + int(suffix.numel())
        stats["prefix_tokens"] = length
        return cache, logits

    def _splice(
        self,
        ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        region_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with image / region embeddings at their tokens (row-major)."""
        image_slots, region_slots = ids == self.image_id, ids == self.region_id
        safe = ids.masked_fill(image_slots | region_slots, 0)
        embeds = self.decoder.embed(safe).clone()
        if image_embeds is not None and bool(image_slots.any()):
            embeds[image_slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        if region_embeds is not None and bool(region_slots.any()):
            embeds[region_slots] = region_embeds.to(embeds.dtype)
        return embeds

    def _answer(self, image, masks, question: str, params: SamplingParams, streaming: bool):
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        frame, image_embeds, hires = self._see(image, stats)
        region_embeds = self._numbered(self._regions(hires, masks, frame, stats))
        ids, order = self._tokenize(Conversation.single(question), region_embeds.shape[0])
        with self._lock:
            cache, logits = self._prefill(
                frame, image_embeds, ids, [region_embeds[order]], params, stats
            )
        answer = AnswerStream(self, cache, logits, params, stats, started)
        return answer if streaming else answer.text()

    # --- KV caches in flight ------------------------------------------------------------------------
    def _acquire(self, batch: int, positions: int) -> KVCache:
        """A KV cache of `batch` rows holding at least `positions`, reused across answers (its
        CUDA graphs with it). Lengths are rounded up to 256 so a few sizes serve every prompt."""
        max_len = min(self.max_context, -(-positions // 256) * 256)
        free = self._free_caches.get((batch, max_len))
        if free:
            cache = free.pop()
            cache.reset()
            return cache
        return self.decoder.new_cache(batch, max_len)

    def _release(self, cache: KVCache) -> None:
        with self._lock:
            self._free_caches.setdefault((cache.batch_size, cache.max_len), []).append(cache)

    def _finish_stats(self, stats: dict[str, Any], started: float) -> None:
        stats["total_ms"] = _ms(started)
        if stats.get("decode_ms"):
            stats["decode_tok_s"] = stats["new_tokens"] / (stats["decode_ms"] / 1000)
        stats["vision_backend"] = self.vision.name
        self.stats = stats


class AnswerStream:
    """The answer being decoded: iterate for text deltas, or call text() for the whole answer.
    Owns its KV cache until the answer ends, close() is called, or it is dropped."""

    def __init__(self, session: Session, cache: KVCache, logits, params, stats, started):
        self._session, self._cache, self._stats, self._started = session, cache, stats, started
        self._parts: list[str] = []
        self._held = ""  # whitespace not shown yet
        self._first: float | None = None
        # one row: each step yields ([Generation], [text delta])
        self._steps = decode_steps(
            session.decoder, cache, logits, params, session.tokenizer, None, None
        )
        self.generation = None  # the row's Generation: ids, text, finish_reason (set as it goes)
        self._decode_start = time.perf_counter()

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        # Deltas carry no leading or trailing whitespace of the answer (whitespace is held back
        # until text follows it), so they concatenate to exactly what text() returns.
        while True:
            if self._cache is None:
                raise StopIteration
            try:
                with self._session._lock:
                    rows, deltas = next(self._steps)
                self.generation, delta = rows[0], deltas[0]
                if self._first is None:  # the first token, shown as text or not
                    self._first = time.perf_counter()
                    self._stats["ttft_ms"] = (self._first - self._started) * 1000
            except StopIteration:
                self._end()
                raise
            except BaseException:
                self.close()
                raise
            text = self._held + delta
            if not self._parts:
                text = text.lstrip()
            shown = text.rstrip()
            self._held = text[len(shown) :]
            if shown:
                break
        self._parts.append(shown)
        return shown

    def text(self) -> str:
        for _ in self:
            pass
        return "".join(self._parts)

    def close(self) -> None:
        if self._cache is not None:
            self._steps.close()
            self._session._release(self._cache)
            self._cache = None

    def __del__(self) -> None:
        self.close()

    def _end(self) -> None:
        stats = self._stats
        stats["decode_ms"] = _ms(self._decode_start)
        stats.setdefault("ttft_ms", _ms(self._started))  # closed before its first token
        stats["new_tokens"] = len(self.generation.ids) if self.generation else 0
        stats["finish_reason"] = self.generation.finish_reason if self.generation else "length"
        self.close()
        self._session._finish_stats(stats, self._started)


class Chat:
    """A conversation about regions of one image. Each send() prefills only what the cache does
    not hold yet (the new turn), then decodes."""

    def __init__(self, session: Session, image: ImageLike, masks: Sequence[MaskLike]):
        self.session = session
        self._stats: dict[str, Any] = {}
        self.frame, self.image_embeds, hires = session._see(image, self._stats)
        self.region_embeds = session._numbered(
            session._regions(hires, masks, self.frame, self._stats)
        )
        self.conversation = Conversation()
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []

    def send(
        self,
        text: str,
        *,
        stream: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ):
        session = self.session
        params = session._params(max_new_tokens, temperature)
        self.conversation.add(text)
        try:
            ids, order = session._tokenize(
                self.conversation, self.region_embeds.shape[0], require_all=False
            )
        except ValueError:
            self.conversation.turns.pop()
            raise
        started = time.perf_counter()
        stats = dict(self._stats)
        with session._lock:
            logits = self._prefill_new(ids, order, params, stats)
        reply = _ChatReply(self, logits, params, stats, started)
        return reply if stream else reply.text()

    def _prefill_new(
        self, ids: list[int], order: torch.Tensor, params: SamplingParams, stats
    ) -> torch.Tensor:
        session = self.session
        start = time.perf_counter()
        common = 0
        for a, b in zip(self._cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always prefill at least one token for fresh logits
        if len(ids) + params.max_new_tokens > session.max_context:
            raise ValueError(
                f"the conversation needs {len(ids) + params.max_new_tokens} positions but the model holds {session.max_context}; start a new chat"
            )
        self._reserve(len(ids) + params.max_new_tokens, common)
        self._cache.lengths[0] = common
        full = torch.tensor([ids], device=session.device)
        regions = self.region_embeds[order]
        embeds = session._splice(full, self.image_embeds, regions)[:, common:]  # [1, new, D]
        logits = session.decoder.prefill(self._cache, inputs_embeds=embeds)
        self._cached_ids = list(ids)
        stats["prefill_ms"] = _ms(start)
        stats["prefill_tokens"] = len(ids) - common
        return logits

    def _reserve(self, positions: int, keep: int) -> None:
        """A cache holding at least `positions`, grown in steps of 256 as the conversation grows
        (the first `keep` positions carried over), never the model's whole context up front."""
        if self._cache is not None and self._cache.max_len >= positions:
            return
        max_len = min(self.session.max_context, -(-positions // 256) * 256)
        grown = self.session.decoder.new_cache(1, max_len)
        if self._cache is not None and keep > 0:
            grown.copy_prefix(self._cache, 0, [0], keep)
        self._cache = grown


class _ChatReply(AnswerStream):
    def __init__(self, chat: Chat, logits, params, stats, started):
        self._chat = chat
        super().__init__(chat.session, chat._cache, logits, params, stats, started)

    def close(self) -> None:
        if self._cache is not None:
            self._steps.close()
            self._cache = None  # the chat keeps its own cache

    def _end(self) -> None:
        super()._end()
        answer = "".join(self._parts).strip()
        question, _ = self._chat.conversation.turns[-1]
        self._chat.conversation.turns[-1] = (question, answer)


def _as_list(masks) -> list:
    if (
        isinstance(masks, tuple)
        and len(masks) == 4
        and all(isinstance(v, int | float) for v in masks)
    ):
        return [masks]  # one box
    if hasattr(masks, "ndim") and masks.ndim == 2:
        return [masks]  # one mask array
    if isinstance(masks, str | Path) or hasattr(masks, "getpixel"):
        return [masks]  # one PNG path or PIL image
    return list(masks)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
