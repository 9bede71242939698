"""An answer being decoded, and a conversation of several.

    answer = AnswerStream(stages, cache, logits, params, stats, started, report)
    for delta in answer: ...             # text deltas as they become final
    answer.text()                        # or the whole answer
    chat = Chat(stages, seen, region_embeds, stats, params, report); chat.send("What color is <region1>?")

A stream owns its KV cache until the answer ends, close() is called, or it is dropped; then the
cache goes back to the pool. `report(stats, started)` is called once when an answer ends (the
Session keeps it as `session.stats`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from rgpt_rt.prompts import Conversation
from rgpt_rt.runtime.arguments import check_text
from rgpt_rt.runtime.generate import SamplingParams, decode_steps
from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.stages import Seen, Stages, elapsed_ms

Report = Callable[[dict[str, Any], float], None]


class AnswerStream:
    """The answer being decoded: iterate for text deltas, or call text() for the whole answer.
    Deltas carry no leading or trailing whitespace of the answer (whitespace is held back until
    text follows it), so they concatenate to exactly what text() returns."""

    def __init__(
        self,
        stages: Stages,
        cache: KVCache,
        logits: torch.Tensor,
        params: SamplingParams,
        stats: dict[str, Any],
        started: float,
        report: Report,
    ):
        self._stages, self._cache, self._stats = stages, cache, stats
        self._started, self._report = started, report
        self._parts: list[str] = []
        self._held = ""  # whitespace not shown yet
        self._first: float | None = None
        # one row: each step yields ([Generation], [text delta])
        self._steps = decode_steps(
            stages.decoder, cache, logits, params, stages.tokenizer, None, None
        )
        self.generation = None  # the row's Generation: ids, text, finish_reason (set as it goes)
        self._decode_start = time.perf_counter()

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        while True:
            if self._cache is None:
                raise StopIteration
            try:
                with self._stages.lock:
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

    @property
    def closed(self) -> bool:
        return self._cache is None

    def close(self) -> None:
        """Stop decoding (the answer so far stays in text()) and give the KV cache back."""
        if self._cache is not None:
            self._steps.close()
            self._stages.release(self._cache)
            self._cache = None

    def __del__(self) -> None:
        self.close()

    def _end(self) -> None:
        stats = self._stats
        stats["decode_ms"] = elapsed_ms(self._decode_start)
        stats.setdefault("ttft_ms", elapsed_ms(self._started))  # closed before its first token
        stats["new_tokens"] = len(self.generation.ids) if self.generation else 0
        stats["finish_reason"] = self.generation.finish_reason if self.generation else "length"
        self._finish()
        self._report(stats, self._started)

    def _finish(self) -> None:
        """The answer reached its end."""
        self.close()


class Chat:
    """A conversation about regions of one image (Session.chat): chat.send(text, stream=False).
    Turns keep their KV cache, so each send() prefills only the new turn, then decodes. A turn
    that fails (a bad question, a context overflow, a stream closed before its end) is rolled
    back: the chat stays usable and forgets that turn."""

    def __init__(
        self,
        stages: Stages,
        seen: Seen,
        region_embeds: torch.Tensor,
        stats: dict[str, Any],
        params: Callable[[int, float], SamplingParams],
        report: Report,
    ):
        self._stages, self._seen, self._params, self._report = stages, seen, params, report
        self.region_embeds = region_embeds  # [N, D], numbered: mask k is <region{k+1}>
        self._stats = stats  # what seeing the image and its regions took
        self.conversation = Conversation(template=stages.family.template)
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []

    @property
    def kv_slots(self) -> int:
        """The positions the chat's KV cache has room for (0 before the first turn); it grows
        by buckets as the conversation does."""
        return 0 if self._cache is None else self._cache.max_len

    def send(
        self,
        text: str,
        *,
        stream: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> str | ChatReply:
        """Ask the next question; the answer (or a ChatReply stream of it)."""
        text = check_text("text", text)
        params = self._params(max_new_tokens, temperature)
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False; got {type(stream).__name__}")
        stages = self._stages
        started = time.perf_counter()
        self.conversation.add(text)  # refuses while the last reply is still being read
        kept = self._cached_ids
        try:
            ids, order = stages.tokenize(
                self.conversation, self.region_embeds.shape[0], require_all=False
            )
            kept = ids[: _common_length(self._cached_ids, ids)]
            stats = dict(self._stats)
            with stages.lock:
                self._cache, logits = stages.prefill_turn(
                    self._cache, len(kept), self._seen, ids,
                    self.region_embeds[order], params, stats,
                )  # fmt: skip
        except BaseException:
            self._rollback(kept)
            raise
        self._cached_ids = ids
        reply = ChatReply(self, logits, params, stats, started)
        return reply if stream else reply.text()

    def _rollback(self, cached_ids: list[int]) -> None:
        """Forget the last turn; `cached_ids`: what the cache still holds for certain."""
        if self.conversation.turns and self.conversation.turns[-1][1] is None:
            self.conversation.turns.pop()
        self._cached_ids = cached_ids


class ChatReply(AnswerStream):
    """A chat turn's answer: when it ends, it becomes the turn's answer; when it is closed before
    its end, the turn is rolled back (the chat keeps its cache either way)."""

    def __init__(self, chat: Chat, logits, params, stats, started):
        self._chat = chat
        super().__init__(chat._stages, chat._cache, logits, params, stats, started, chat._report)

    def close(self) -> None:
        if self._cache is not None:
            self._steps.close()
            self._cache = None
            self._chat._rollback(self._chat._cached_ids)  # the question's KV is still right

    def _finish(self) -> None:
        self._steps.close()
        self._cache = None
        question, _ = self._chat.conversation.turns[-1]
        self._chat.conversation.turns[-1] = (question, "".join(self._parts).strip())


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
