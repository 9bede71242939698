"""Task prompts (the paper's wording) and the Vicuna v1.1 chat template.

    conv = Conversation.single(describe_prompt(detailed=True))
    tokens = tokenize_conversation(tokenizer, conv, num_regions=1, num_image_tokens=64, tokens=cfg.tokens)
    tokens.input_ids      # g*g image-token ids where <image> was, one region-token id per <regionK>
    tokens.region_order   # mask index (0-based) of each region token, in order of appearance
    tokens.labels         # -100 everywhere but the assistant's answers (and their </s>)

`<regionK>` names the K-th mask (1-based); a bare `<region>` takes the next mask in order.
Every mask must be named at least once, and no placeholder may name a mask that was not given.
Shared by the reference model, the trainer and the runtime: no transformers here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rgpt_rt.config import TokenConfig

IGNORE_INDEX = -100

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER:"
ASSISTANT_ROLE = "ASSISTANT:"
NO_MATCH_ANSWER = "No corresponding options found."

_REGION_PLACEHOLDER = re.compile(r"<region(\d*)>")
_REFER_ANSWER = re.compile(r"Region \[(\d+)\]")


# --- the paper's task prompts ---------------------------------------------------------------


def region_list(count: int) -> str:
    """'<region1>', '<region1> and <region2>', '<region1>, <region2> and <region3>', ..."""
    if count < 1:
        raise ValueError(f"need at least one region; got {count}")
    names = [f"<region{k}>" for k in range(1, count + 1)]
    if count == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def classify_prompt(vocabulary: str = "COCO-80", region: int = 1) -> str:
    return (
        f"What category name best describes the region represented by <region{region}>? "
        f"Answer the question using {vocabulary} category names."
    )


def refer_prompt(expression: str, num_regions: int) -> str:
    return (
        f"From the provided masks denoted by {region_list(num_regions)}, which one fits "
        f'"{expression}"? Answer the question using the template Region [x].'
    )


def describe_prompt(detailed: bool = True, region: int = 1) -> str:
    if detailed:
        return f"Describe in detail the object located at <region{region}> in the image."
    return f"Give a short description of <region{region}>."


def refer_answer(index: int | None) -> str:
    """The answer for the 0-based region `index`, or the no-match answer for None."""
    return NO_MATCH_ANSWER if index is None else f"Region [{index + 1}]"


def parse_refer_answer(text: str, num_regions: int) -> int | None:
    """'Region [2]' -> 1 (0-based); the no-match answer, or a region that was not given -> None."""
    found = _REFER_ANSWER.search(text)
    if found is None:
        return None
    index = int(found.group(1)) - 1
    return index if 0 <= index < num_regions else None


# --- conversations ----------------------------------------------------------------------------


@dataclass
class Conversation:
    """Turns of (user text, assistant answer or None for the turn being asked).
    The first user turn follows the image: `<image>\\n{text}`."""

    turns: list[tuple[str, str | None]] = field(default_factory=list)
    system: str = SYSTEM_PROMPT

    @classmethod
    def single(cls, question: str, answer: str | None = None) -> Conversation:
        return cls(turns=[(question, answer)])

    def add(self, question: str, answer: str | None = None) -> Conversation:
        if self.turns and self.turns[-1][1] is None:
            raise ValueError(
                "the last turn has no answer yet; answer it before adding another question"
            )
        self.turns.append((question, answer))
        return self

    def render(self, tokens: TokenConfig) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans of every answer (each including its </s>).
        A final turn without an answer ends with 'ASSISTANT:' so the model continues from it."""
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")
        text = self.system
        spans: list[tuple[int, int]] = []
        for index, (question, answer) in enumerate(self.turns):
            if index == 0:
                question = f"{tokens.image}\n{question}"
            text += f" {USER_ROLE} {question} {ASSISTANT_ROLE}"
            if answer is None:
                if index != len(self.turns) - 1:
                    raise ValueError(f"turn {index + 1} has no answer but is not the last turn")
                break
            start = len(text)
            text += f" {answer}{tokens.eos}"
            spans.append((start, len(text)))
        return text, spans


# --- tokenization -----------------------------------------------------------------------------


@dataclass
class PromptTokens:
    input_ids: list[int]
    labels: list[int]
    region_order: list[int]  # 0-based mask index of each region token, in order


class RegionNamer:
    """Rewrites `<regionK>` / `<region>` placeholders to the plain region token, across all
    turns of a conversation, remembering which 0-based mask each placeholder names."""

    def __init__(self, num_regions: int, region_token: str):
        self.num_regions = num_regions
        self.region_token = region_token
        self.order: list[int] = []
        self._next_bare = 0

    def __call__(self, text: str) -> str:
        return _REGION_PLACEHOLDER.sub(self._substitute, text)

    def _substitute(self, match: re.Match[str]) -> str:
        digits = match.group(1)
        if digits:
            index = int(digits) - 1
            if index < 0 or index >= self.num_regions:
                raise ValueError(
                    f"the prompt names <region{digits}> but {self.num_regions} mask(s) were given; "
                    f"use <region1>..<region{max(self.num_regions, 1)}> or give more masks"
                )
        else:
            index = self._next_bare
            if index >= self.num_regions:
                raise ValueError(
                    f"the prompt has more <region> placeholders than the {self.num_regions} mask(s) given"
                )
            self._next_bare += 1
        self.order.append(index)
        return self.region_token

    def check_all_named(self) -> None:
        missing = sorted(set(range(self.num_regions)) - set(self.order))
        if missing:
            names = ", ".join(f"<region{k + 1}>" for k in missing)
            raise ValueError(
                f"{self.num_regions} mask(s) were given but the prompt never names {names}; "
                "name every mask or give fewer masks"
            )


def tokenize_conversation(
    tokenizer,
    conversation: Conversation,
    *,
    num_regions: int,
    num_image_tokens: int,
    tokens: TokenConfig,
    require_all: bool = True,
) -> PromptTokens:
    """Tokenize a conversation with a `tokenizers.Tokenizer` whose special tokens include
    tokens.image, tokens.region, tokens.bos and tokens.eos.

    Returns BOS + the prompt, where <image> is repeated num_image_tokens times and each
    region placeholder is one region token; labels keep only answer tokens. require_all: every
    mask must be named (a chat may name some masks only in later turns: False)."""
    if tokens.image in conversation.system or _REGION_PLACEHOLDER.search(conversation.system):
        raise ValueError(
            f"the system prompt may not hold {tokens.image} or region placeholders; put regions in the turns"
        )
    namer = RegionNamer(num_regions, tokens.region)
    turns = []
    for question, answer in conversation.turns:
        if tokens.image in question or (answer is not None and tokens.image in answer):
            raise ValueError(
                f"write turns without {tokens.image}: the template places the image itself"
            )
        if answer is not None and _REGION_PLACEHOLDER.search(answer):
            raise ValueError(
                "answers may not hold region placeholders; refer to regions as 'Region [k]'"
            )
        turns.append((namer(question), answer))
    if require_all:
        namer.check_all_named()
    text, spans = Conversation(turns=turns, system=conversation.system).render(tokens)

    encoding = tokenizer.encode(text, add_special_tokens=False)
    image_id = _token_id(tokenizer, tokens.image)
    bos_id = _token_id(tokenizer, tokens.bos)
    input_ids = [bos_id]
    labels = [IGNORE_INDEX]
    for token_id, (start, _end) in zip(encoding.ids, encoding.offsets):
        if token_id == image_id:
            input_ids.extend([image_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            continue
        in_answer = any(a <= start < b for a, b in spans)
        input_ids.append(token_id)
        labels.append(token_id if in_answer else IGNORE_INDEX)
    return PromptTokens(input_ids=input_ids, labels=labels, region_order=namer.order)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token!r} token; add it as a special token")
    return token_id


def count_region_placeholders(text: str) -> int:
    return len(_REGION_PLACEHOLDER.findall(text))


def stop_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The ids before the first eos."""
    out = []
    for token_id in ids:
        if token_id == eos_id:
            break
        out.append(token_id)
    return out
