"""rgpt_rt.Session: region understanding at the edge.

    sess = rgpt_rt.Session()                                   # the embedded default model, cuda when available
    sess.describe("photo.png", mask)                           # -> str
    for delta in sess.describe(image, (10, 20, 60, 80), stream=True): print(delta, end="")
    sess.describe_many(image, masks)                           # every region in one batched decode
    sess.classify(image, mask); sess.refer(image, "the red star", masks); sess.ask(image, "Is <region1> above <region2>?", masks)
    chat = sess.chat(image, masks); chat.send("What color is <region1>?")
    sess.info(); sess.stats

Each call runs the stages of stages.py: preprocess -> vision (cached per image content) -> mask
pooling + connector -> prompt -> prefill (the system prompt + image prefix is cached per image,
so a further question prefills only its own tokens) -> INT4 decode, streamed (answer.py).

Thread safety: one Session may be shared by threads. Model calls are serialised by a lock;
each answer in flight (a stream included) owns its KV cache until it finishes, is closed, or
is dropped, so interleaved streams stay correct.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.inputs import ImageLike, MaskLike
from rgpt_rt.prompts import (
    classify_prompt,
    parse_refer_answer,
    refer_prompt,
)
from rgpt_rt.runtime.answer import AnswerStream, Chat
from rgpt_rt.runtime.arguments import check_int, check_number, check_optional_text, check_text
from rgpt_rt.runtime.generate import SamplingParams, decode_steps
from rgpt_rt.runtime.loading import load_bundle_decoder
from rgpt_rt.runtime.memory import MemoryPlan, parse_bytes
from rgpt_rt.runtime.model import LlamaDecoder
from rgpt_rt.runtime.stages import Stages, elapsed_ms
from rgpt_rt.runtime.vision import select_vision_backend
from rgpt_rt.safetensors_io import read_tensors
from rgpt_rt.tokenizer import load_tokenizer

BUNDLE_ENV = "RGPT_RT_BUNDLE"
DEVICES = ("auto", "cpu", "cuda")


def default_bundle() -> Path:
    """$RGPT_RT_BUNDLE, else the bundle of the embedded default model shipped in the package."""
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-bundle"


def resolve_device(device: str | torch.device) -> torch.device:
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or torch.device; got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device; use one of {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use one of {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'"
        )
    return device


class Session:
    def __init__(
        self,
        bundle: str | Path | None = None,
        device: str | torch.device = "auto",
        *,
        vision_backend: str | None = None,
        max_context: int | None = None,
        max_image_side: int = 2048,
        vision_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int | None = None,
        max_batch: int = 16,
        verify: bool = True,
        sha256: str | None = None,
        memory_budget: str | int | None = None,
    ):
        """bundle: a folder from export/build_engine.py (None: the embedded default model);
        device: "auto" (cuda when available), "cpu" or "cuda"; vision_backend: force
        "tensorrt", "onnxruntime" or "torch"; max_context: the longest prompt + answer a call
        may use (default: the model's); verify: check every file's sha256 at load; sha256:
        pin the bundle by the manifest digest its build printed; memory_budget: bytes or
        "8GiB": refuse, before loading anything, a configuration that cannot fit (memory.py).
        vision_cache_bytes, prefix_cache_bytes: the budgets of the per-image caches (vision
        results; the image prefix's KV, by default room for one of this model's, at least 512
        MiB: 0 turns a cache off)."""
        if bundle is not None and not isinstance(bundle, str | Path):
            raise TypeError(f"bundle must be a folder path; got {type(bundle).__name__}")
        if sha256 is not None and not isinstance(sha256, str):
            raise TypeError(f"sha256 must be a hex digest str; got {type(sha256).__name__}")
        device = resolve_device(device)
        folder = Path(bundle) if bundle is not None else default_bundle()
        manifest = verify_bundle(folder, hashes=verify, sha256=sha256)
        config = manifest.config
        if memory_budget is not None:
            plan = MemoryPlan.of_bundle(
                manifest, device.type, max_context=max_context, max_batch=max_batch,
                vision_cache_bytes=vision_cache_bytes, prefix_cache_bytes=prefix_cache_bytes,
            )  # fmt: skip
            plan.check(parse_bytes(memory_budget))
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self._setup(
            config=config,
            tokenizer=load_tokenizer(folder),
            vision=select_vision_backend(folder, manifest, device, prefer=vision_backend),
            connector=read_tensors(folder / "connector.safetensors", device),
            decoder=load_bundle_decoder(folder, config.llm, dtype, device),
            source={
                "bundle": str(folder),
                "sha256": manifest.sha256,
                "quantization": manifest.quantization,
                "tensorrt": manifest.data.get("tensorrt"),
            },
            max_context=max_context,
            max_image_side=max_image_side,
            vision_cache_bytes=vision_cache_bytes,
            prefix_cache_bytes=prefix_cache_bytes,
            max_batch=max_batch,
        )

    @classmethod
    def from_parts(
        cls, *, config, tokenizer, vision, connector, decoder, source=None, **options
    ) -> Session:
        """A Session over components already in memory (benchmarks of random-weight models that
        are never written as a bundle). connector: {"fc1.weight", ...} tensors."""
        session = cls.__new__(cls)
        session._setup(
            config=config, tokenizer=tokenizer, vision=vision, connector=connector,
            decoder=decoder, source=source or {"bundle": None}, **options,
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
        source: dict[str, Any],
        max_context: int | None = None,
        max_image_side: int = 2048,
        vision_cache_bytes: int = 256 << 20,
        prefix_cache_bytes: int | None = None,
        max_batch: int = 16,
    ) -> None:
        model_context = config.llm.max_position_embeddings
        if max_context is not None:
            check_int("max_context", max_context, low=16, high=model_context)
        self.max_batch = check_int("max_batch", max_batch, low=1)
        self.stages = Stages(
            config=config,
            tokenizer=tokenizer,
            vision=vision,
            connector=connector,
            decoder=decoder,
            max_context=max_context or model_context,
            max_batch=self.max_batch,
            max_image_side=check_int("max_image_side", max_image_side, low=16),
            vision_cache_bytes=check_int("vision_cache_bytes", vision_cache_bytes, low=0),
            prefix_cache_bytes=None
            if prefix_cache_bytes is None
            else check_int("prefix_cache_bytes", prefix_cache_bytes, low=0),
        )
        self.config, self.tokenizer, self.vision, self.decoder = config, tokenizer, vision, decoder
        self.device, self.dtype = decoder.device, decoder.dtype
        self.source = source
        self.stats: dict[str, Any] = {}
        self.stages.warm_up()

    @property
    def max_context(self) -> int:
        return self.stages.max_context

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
        question = self.stages.family.describe_prompt(_flag("detailed", detailed))
        return self._answer(image, [mask], question, params, _flag("stream", stream))

    def describe_many(
        self,
        image: ImageLike,
        masks: Sequence[MaskLike],
        *,
        detailed: bool = True,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        between_steps: Callable[[], None] | None = None,
    ) -> list[str]:
        """Every region of one image: one vision pass, one shared prefix, one batched decode.
        between_steps: called after every decode step; what it raises stops the answer (a
        server passes a check that raises when its client went away)."""
        params = self._params(max_new_tokens, temperature)
        question = self.stages.family.describe_prompt(_flag("detailed", detailed))
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        stages = self.stages
        seen = stages.see(image, stats)
        region_embeds = stages.regions(seen, _masks(masks), stats)  # [N, D]
        ids, order = stages.tokenize(stages.conversation(question), 1)
        answers: list[str] = []
        stats["decode_ms"], stats["new_tokens"] = 0.0, 0
        for first in range(0, region_embeds.shape[0], self.max_batch):
            chunk = region_embeds[first : first + self.max_batch]
            # one region per row, each the question's <region1>
            rows = [stages.numbered(chunk[i : i + 1])[order] for i in range(chunk.shape[0])]
            with stages.lock:
                cache, logits = stages.prefill(seen, ids, rows, params, stats)
                stats.setdefault("ttft_ms", elapsed_ms(started))
                start = time.perf_counter()
                steps = decode_steps(
                    self.decoder, cache, logits, params, self.tokenizer, None, None
                )
                generations = []
                try:
                    for rows, _ in steps:
                        generations = rows
                        if between_steps is not None:
                            between_steps()
                finally:
                    steps.close()
                    stages.release(cache)
                stats["decode_ms"] += elapsed_ms(start)
            answers.extend(g.text.strip() for g in generations)
            stats["new_tokens"] += sum(len(g.ids) for g in generations)
        self._report(stats, started)
        return answers

    def classify(
        self,
        image: ImageLike,
        mask: MaskLike,
        *,
        vocabulary: str | None = None,
        between_steps: Callable[[], None] | None = None,
    ) -> str:
        """The category of one region, in `vocabulary` (default: the model's, config.vocabulary)."""
        vocabulary = check_optional_text("vocabulary", vocabulary) or self.config.vocabulary
        prompt, params = classify_prompt(vocabulary), self._params(32, 0.0)
        return self._answer(image, [mask], prompt, params, between_steps=between_steps)

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
        question = check_text("question", question)
        params = self._params(max_new_tokens, temperature)
        return self._answer(image, _masks(masks), question, params, _flag("stream", stream))

    def refer(
        self,
        image: ImageLike,
        expression: str,
        masks: Sequence[MaskLike],
        *,
        between_steps: Callable[[], None] | None = None,
    ) -> int | None:
        """Which region (0-based) fits the expression; None for "No corresponding options found."."""
        masks = _masks(masks)
        try:
            expression = check_text("expression", expression)
        except ValueError:
            raise ValueError(
                "the expression is empty; describe the region to find, e.g. 'the red star'"
            ) from None
        prompt, params = refer_prompt(expression, len(masks)), self._params(16, 0.0)
        text = self._answer(image, masks, prompt, params, between_steps=between_steps)
        return parse_refer_answer(text, len(masks))

    def chat(self, image: ImageLike, masks: Sequence[MaskLike] | MaskLike) -> Chat:
        """A multi-turn conversation about regions of one image: chat.send(text, stream=False)."""
        stats: dict[str, Any] = {}
        seen = self.stages.see(image, stats)
        embeds = self.stages.numbered(self.stages.regions(seen, _masks(masks), stats))
        return Chat(self.stages, seen, embeds, stats, self._params, self._report)

    def clear_caches(self) -> None:
        """Forget every cached vision result and prefix KV (the next question is cold)."""
        self.stages.clear_caches()

    def info(self) -> dict[str, Any]:
        quant = self.source.get("quantization") or {}
        stages = self.stages
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "bundle": self.source.get("bundle"),
            "model": self.config.name,
            "device": device,
            "vision_backend": self.vision.name,
            "llm": {
                "quantization": quant.get("method", "none"),
                "group_size": quant.get("group_size"),
                "dtype": str(self.dtype).replace("torch.", ""),
            },
            "tensorrt": self.source.get("tensorrt"),
            "image_tokens": self.config.num_image_tokens,
            "max_context": self.max_context,
            "caches": {
                "vision": _cache_info(stages.vision_cache),
                "prefix": _cache_info(stages.prefix_cache),
                "kv_pool": {"free": stages.pool.free_caches, "bytes": stages.pool.nbytes},
            },
        }

    # --- shared by the methods above ---------------------------------------------------------
    def _params(self, max_new_tokens: int, temperature: float) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=check_int(
                "max_new_tokens", max_new_tokens, low=1, high=self.max_context
            ),
            temperature=check_number("temperature", temperature, low=0.0, high=100.0),
            eos_token_id=self.stages.eos_id,
        )

    def _answer(
        self, image, masks, question: str, params: SamplingParams, streaming=False,
        between_steps: Callable[[], None] | None = None,
    ):  # fmt: skip
        started = time.perf_counter()
        stats: dict[str, Any] = {}
        stages = self.stages
        seen = stages.see(image, stats)
        region_embeds = stages.numbered(stages.regions(seen, masks, stats))
        ids, order = stages.tokenize(stages.conversation(question), region_embeds.shape[0])
        with stages.lock:
            cache, logits = stages.prefill(seen, ids, [region_embeds[order]], params, stats)
        stream = AnswerStream(stages, cache, logits, params, stats, started, self._report)
        if streaming:
            return stream
        try:
            for _ in stream:
                if between_steps is not None:
                    between_steps()
        finally:
            stream.close()
        return stream.text()

    def _report(self, stats: dict[str, Any], started: float) -> None:
        stats["total_ms"] = elapsed_ms(started)
        if stats.get("decode_ms"):
            stats["decode_tok_s"] = stats["new_tokens"] / (stats["decode_ms"] / 1000)
        stats["vision_backend"] = self.vision.name
        self.stats = stats


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def _masks(masks: Any) -> list:
    """One region (a box, a mask array, a PNG path, a PIL image) or a sequence of them -> a list."""
    if isinstance(masks, tuple) and len(masks) == 4 and all(_is_number(v) for v in masks):
        return [masks]  # one box
    if hasattr(masks, "ndim") and masks.ndim == 2:
        return [masks]  # one mask array
    if isinstance(masks, str | Path) or hasattr(masks, "getpixel"):
        return [masks]  # one PNG path or PIL image
    if isinstance(masks, dict) or not hasattr(masks, "__iter__"):
        raise TypeError(
            f"masks must be a region or a list of regions (boxes, mask arrays, PNG paths, PIL "
            f"images); got {type(masks).__name__}"
        )
    return list(masks)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cache_info(cache) -> dict[str, int]:
    return {"entries": len(cache), "bytes": cache.bytes, "max_bytes": cache.max_bytes}
