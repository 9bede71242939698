"""Generation on the runtime decoder: greedy and sampled decoding (temperature, top-k, top-p,
repetition penalty), eos and stop strings, batches whose rows finish independently, and
streaming text deltas that never split a character.

    ids = generate(decoder, input_ids=prompt, max_new_tokens=64)                  # greedy
    rows = generate_batch(decoder, inputs_embeds=[e1, e2], eos_token_id=2)         # one list per row
    for delta in generate_stream(decoder, tokenizer, input_ids=prompt, stop=["\\n"]): print(delta, end="")

The Session prefills its own cache (shared prefixes, see KVCache.copy_prefix) and calls the
cache-level `decode` / `stream` with the logits prefill returned.
Logit processing follows transformers' processors (same order, same arithmetic).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

from rgpt_rt.runtime.kv_cache import KVCache
from rgpt_rt.runtime.model import LlamaDecoder


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 is greedy (top_k / top_p then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the context
    eos_token_id: int | Sequence[int] | None = None
    stop: Sequence[str] = ()  # stop strings (need a tokenizer); the text ends before them
    seed: int | None = None  # for sampling, when no torch.Generator is given

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off); got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1: off); got {self.repetition_penalty}"
            )
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def eos_ids(self) -> set[int]:
        if self.eos_token_id is None:
            return set()
        return {self.eos_token_id} if isinstance(self.eos_token_id, int) else set(self.eos_token_id)


@dataclass
class Generation:
    """One row's result: its new tokens (without the eos that ended it; with the token that
    completed a stop string), its text (None without a tokenizer) and why it ended."""

    ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"  # "eos" | "stop" | "length"


# --- logits -> tokens -----------------------------------------------------------------------


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """logits [B, V] (fp32); seen [B, V] bool: tokens already in each row's context -> the
    processed logits [B, V], filtered tokens at -inf. Order and arithmetic as transformers:
    repetition penalty, temperature, top-k, top-p."""
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalized, logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0:
        top = torch.topk(logits, min(params.top_k, logits.shape[-1])).values  # [B, k]
        kth = top[..., -1, None]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)  # [B, V] ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)  # the low tail holding at most 1 - top_p
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def sample(
    logits: Tensor,
    params: SamplingParams,
    seen: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> tokens [B] int64: argmax when temperature is 0, else a draw from the
    processed distribution (deterministic for a given generator state)."""
    logits = process_logits(logits.float(), params, seen)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# --- text: incremental detokenisation and stop strings -----------------------------------------


class TextStream:
    """Text deltas of one growing sequence of token ids.

    A delta holds only text that later tokens cannot change: no trailing U+FFFD (a character
    whose bytes are still arriving), nothing from a trailing run of byte-fallback tokens
    (<0xE4>...: LLaMA's decoder turns a whole run into U+FFFDs if any of it is invalid UTF-8, so
    the run is final only when a non-byte token closes it), and nothing that may begin a stop
    string. Without stop strings, the deltas of push... finish concatenate to tokenizer.decode(ids).

    Each push decodes a window of the recent tokens only, so the cost per token stays flat: the
    window starts at the last point where all text was final, and decoding starts one window
    earlier (`_context`) and subtracts that text, so a decoder that strips the first token's
    leading space (SentencePiece) strips it only where the full decode does (as vLLM does).
    """

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was completed; no more text will come
        self._context = 0  # decoding starts here ...
        self._start = 0  # ... and the text of ids[_context:_start] is already out
        self._taken = 0  # characters of the window's text (after _start) already taken
        self._held = ""  # taken text kept back because it may begin a stop string
        self._byte_token: dict[int, bool] = {}

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        end = len(self.ids)
        while end > self._start and self._is_byte_token(self.ids[end - 1]):
            end -= 1  # an open run of byte-fallback tokens is not final yet
        window = self._window_text(end)
        final = window.rstrip("\ufffd")  # an incomplete character at the end is not final yet
        delta, self._taken = final[self._taken :], max(self._taken, len(final))
        if end == len(self.ids) and final == window:  # all text is final: move the window on
            self._context, self._start, self._taken = self._start, len(self.ids), 0
        return self._emit(delta, last=False)

    def finish(self) -> str:
        """What is left at the end (an incomplete character decodes as U+FFFD here)."""
        delta = self._window_text(len(self.ids))[self._taken :]
        self._context = self._start = len(self.ids)
        self._taken = 0
        return self._emit(delta, last=True)

    def _window_text(self, end: int) -> str:
        """The text of ids[_start:end], decoded in the context of ids[_context:_start]."""
        context = self._decode(self.ids[self._context : self._start])
        return self._decode(self.ids[self._context : end])[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _is_byte_token(self, token_id: int) -> bool:
        if token_id not in self._byte_token:
            piece = self.tokenizer.id_to_token(token_id) or ""
            self._byte_token[token_id] = _BYTE_PIECE.fullmatch(piece) is not None
        return self._byte_token[token_id]

    def _emit(self, delta: str, last: bool) -> str:
        if self.stopped:
            return ""
        pending = self._held + delta
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = pending[: min(hits)], "", True
        elif last or not self.stop:
            out, self._held = pending, ""
        else:
            keep = _stop_prefix_length(pending, self.stop)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    for n in range(min(len(text), max(len(s) for s in stop) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


# --- the decode loop on a prefilled cache ------------------------------------------------------


def decode_steps(
    decoder: LlamaDecoder,
    cache: KVCache,
    logits: Tensor,
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    generator: torch.Generator | None,
    context_ids: Sequence[Sequence[int]] | None,
) -> Iterator[tuple[list[Generation], list[str]]]:
    """Yields after every step the rows so far and each row's new text delta. Rows that ended
    (eos, stop string) keep being stepped with the batch until every row has ended; what they
    sample then is ignored, and at the end (or when the caller stops iterating) each row's cache
    length is set back to its context plus the tokens it sampled except the last (the eos, or
    the final token), which were never fed to the model."""
    B = cache.batch_size
    if logits.shape[0] != B:
        raise ValueError(f"logits hold {logits.shape[0]} rows but the cache has {B}")
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to read the text")
    steps_needed = int(cache.lengths.max()) + params.max_new_tokens - 1
    if steps_needed > cache.max_len:
        raise ValueError(
            f"the cache holds up to {int(cache.lengths.max())} positions; {params.max_new_tokens} new tokens "
            f"need max_len >= {steps_needed} but it is {cache.max_len}"
        )
    if generator is None and params.temperature > 0 and params.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=logits.device)
        for row, ids in enumerate(context_ids or ()):
            seen[row, torch.as_tensor(list(ids), dtype=torch.int64, device=logits.device)] = True
    eos = params.eos_ids
    rows = [Generation(text="" if tokenizer else None) for _ in range(B)]
    streams = [TextStream(tokenizer, params.stop) for _ in range(B)] if tokenizer else None
    start = cache.lengths.clone()  # [B] host
    sampled = [0] * B  # tokens each row sampled while it was running (its eos included)
    done = [False] * B
    try:
        for step in range(params.max_new_tokens):
            tokens = sample(logits, params, seen, generator)  # [B]
            if seen is not None:
                seen[torch.arange(B, device=seen.device), tokens] = True
            deltas = [""] * B
            for b, token in enumerate(tokens.tolist()):
                if done[b]:
                    continue
                sampled[b] += 1
                if token in eos:
                    done[b], rows[b].finish_reason = True, "eos"
                else:
                    rows[b].ids.append(token)
                    if streams:
                        deltas[b] = streams[b].push(token)
                        if streams[b].stopped:
                            done[b], rows[b].finish_reason = True, "stop"
                if streams:
                    if done[b] or step == params.max_new_tokens - 1:
                        deltas[b] += streams[b].finish()
                    rows[b].text += deltas[b]
            yield rows, deltas
            if all(done) or step == params.max_new_tokens - 1:
                return
            logits = decoder.decode_step(tokens, cache)  # [B, V]
    finally:
        cache.lengths.copy_(start + torch.tensor(sampled).clamp_min(1) - 1)


def decode(
    decoder: LlamaDecoder,
    cache: KVCache,
    logits: Tensor,
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None = None,
    generator: torch.Generator | None = None,
    context_ids: Sequence[Sequence[int]] | None = None,
) -> list[Generation]:
    """Generate from a prefilled cache: logits [B, V] are what prefill returned. One Generation per
    row; rows finish independently. Afterwards row b's cache holds its context and its tokens but
    the last one sampled (the eos, or the final token): a chat continues by prefilling that token
    and the next turn. context_ids: each row's prompt ids, for the repetition penalty
    (transformers counts the prompt too; with embeddings only there are none)."""
    steps = decode_steps(decoder, cache, logits, params, tokenizer, generator, context_ids)
    rows: list[Generation] = []
    for rows_so_far, _ in steps:
        rows = rows_so_far
    return rows


def stream(
    decoder: LlamaDecoder,
    cache: KVCache,
    logits: Tensor,
    tokenizer: Tokenizer,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    context_ids: Sequence[int] | None = None,
) -> Iterator[str]:
    """Text deltas of one row (cache batch size 1) as they become final; they concatenate to the
    text `decode` returns."""
    if cache.batch_size != 1:
        raise ValueError(f"stream decodes one row; the cache has {cache.batch_size}")
    context = [context_ids] if context_ids is not None else None
    for _, deltas in decode_steps(decoder, cache, logits, params, tokenizer, generator, context):
        if deltas[0]:
            yield deltas[0]


# --- from prompts: prefill, then decode ----------------------------------------------------------


def generate(
    decoder: LlamaDecoder,
    input_ids: Tensor | Sequence[int] | None = None,
    inputs_embeds: Tensor | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    generator: torch.Generator | None = None,
    **sampling,
) -> list[int]:
    """The new token ids of one sequence: input_ids [T] (or [1, T]) or inputs_embeds [T, D] (or
    [1, T, D]). Keyword arguments are SamplingParams fields (max_new_tokens, temperature, top_k,
    top_p, repetition_penalty, eos_token_id, stop, seed); stop strings need the tokenizer."""
    ids = None if input_ids is None else [_flat_ids(input_ids)]
    embeds = None if inputs_embeds is None else [_one_row(inputs_embeds)]
    return generate_batch(
        decoder, ids, embeds, tokenizer=tokenizer, generator=generator, **sampling
    )[0]


def generate_batch(
    decoder: LlamaDecoder,
    input_ids: Sequence[Sequence[int]] | None = None,
    inputs_embeds: Sequence[Tensor] | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    generator: torch.Generator | None = None,
    **sampling,
) -> list[list[int]]:
    """The new token ids of each of several sequences of any lengths, decoded as one batch:
    input_ids, a list of id lists, or inputs_embeds, a list of [T_i, D]. Rows finish independently."""
    params = SamplingParams(**sampling)
    cache, logits = _prefill_rows(decoder, input_ids, inputs_embeds, params.max_new_tokens)
    rows = decode(
        decoder,
        cache,
        logits,
        params,
        tokenizer=tokenizer,
        generator=generator,
        context_ids=input_ids,
    )
    return [row.ids for row in rows]


def generate_stream(
    decoder: LlamaDecoder,
    tokenizer: Tokenizer,
    input_ids: Tensor | Sequence[int] | None = None,
    inputs_embeds: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    **sampling,
) -> Iterator[str]:
    """Text deltas of one sequence (see `generate`) as soon as they are final."""
    params = SamplingParams(**sampling)
    ids = None if input_ids is None else [_flat_ids(input_ids)]
    embeds = None if inputs_embeds is None else [_one_row(inputs_embeds)]
    cache, logits = _prefill_rows(decoder, ids, embeds, params.max_new_tokens)
    context = ids[0] if ids else None
    yield from stream(
        decoder, cache, logits, tokenizer, params, generator=generator, context_ids=context
    )


def _prefill_rows(
    decoder: LlamaDecoder,
    input_ids: Sequence[Sequence[int]] | None,
    inputs_embeds: Sequence[Tensor] | None,
    max_new_tokens: int,
) -> tuple[KVCache, Tensor]:
    """Right-pad the rows, allocate a cache just large enough, prefill -> (cache, logits [B, V])."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    rows = list(input_ids if input_ids is not None else inputs_embeds)
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one input token")
    lengths = [len(r) for r in rows]
    B, T = len(rows), max(lengths)
    cache = decoder.new_cache(B, T + max_new_tokens - 1)
    if input_ids is not None:
        padded = torch.zeros(B, T, dtype=torch.int64)
        for b, r in enumerate(rows):
            padded[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
        return cache, decoder.prefill(cache, input_ids=padded, lengths=lengths)
    D = rows[0].shape[-1]
    padded = torch.zeros(B, T, D, dtype=decoder.dtype, device=decoder.device)  # [B, T, D]
    for b, r in enumerate(rows):
        padded[b, : len(r)] = r
    return cache, decoder.prefill(cache, inputs_embeds=padded, lengths=lengths)


def _flat_ids(input_ids: Tensor | Sequence[int]) -> list[int]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(
            f"generate takes one sequence: input_ids [T] or [1, T]; got {tuple(ids.shape)}"
        )
    return ids.tolist()


def _one_row(inputs_embeds: Tensor) -> Tensor:
    if inputs_embeds.dim() == 3 and inputs_embeds.shape[0] == 1:
        inputs_embeds = inputs_embeds[0]
    if inputs_embeds.dim() != 2:
        raise ValueError(
            f"generate takes one sequence: inputs_embeds [T, D] or [1, T, D]; got {tuple(inputs_embeds.shape)}"
        )
    return inputs_embeds
