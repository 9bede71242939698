"""Task prompts (the paper's wording) and the Vicuna v1.1 chat template, per model family.

    template = chat_template(config.family)   # RegionGPT's, or Osprey's (system prompt, image line, prompts)
    conv = Conversation.single(template.describe(detailed=True), template=template)

    conv = Conversation.single(describe_prompt(detailed=True))
    tokens = tokenize_conversation(tokenizer, conv, num_regions=1, num_image_tokens=64, tokens=cfg.tokens)
    tokens.input_ids      # g*g image-token ids where <image> was, one region-token id per <regionK>
    tokens.region_order   # mask index (0-based) of each region token, in order of appearance
    tokens.labels         # -100 everywhere but the assistant's answers (and their </s>)

`<regionK>` names the K-th mask (1-based); a bare `<region>` takes the next mask in order.
Every mask must be named at least once, and no placeholder may name a mask that was not given.
Special tokens come only from the template and the placeholders: user text ('</s>', 'USER:'
typed in a question) is encoded as the plain characters it is.
Shared by the reference model, the trainer and the runtime: no transformers here.
"""

from __future__ import annotations

import functools
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

# Osprey (osprey/conversation.py, template "osprey_v1", the one its demo uses): Vicuna v1.1's
# layout with "human" for "user" in the system prompt; the demo's first turn opens with a line
# after the image, and asks its two description questions (demo/osprey_inference.py).
OSPREY_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
OSPREY_IMAGE_LINE = "\n\nThis provides an overview of the picture.\n"

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


def osprey_describe_prompt(detailed: bool = True, region: int = 1) -> str:
    """Osprey's demo questions, with <regionK> where its demo writes <mask><pos>."""
    if detailed:
        return f"Can you give me a detailed description of <region{region}>?"
    return f"Please give me a short description of <region{region}>. Using a short phrase."


@dataclass(frozen=True)
class ChatTemplate:
    """What differs between families in a prompt: the system prompt, the text written after
    the image in the first turn (`<image>` + image_line + question), and the description
    questions. The layout (Vicuna v1.1: "{system} USER: ... ASSISTANT: {answer}</s>") is shared."""

    family: str
    system: str
    image_line: str
    describe_questions: tuple[str, str]  # (short, detailed), with <region1>

    def describe(self, detailed: bool = True, region: int = 1) -> str:
        text = self.describe_questions[1 if detailed else 0]
        return text.replace("<region1>", f"<region{region}>")


REGIONGPT_TEMPLATE = ChatTemplate(
    family="regiongpt",
    system=SYSTEM_PROMPT,
    image_line="\n",
    describe_questions=(describe_prompt(False), describe_prompt(True)),
)
OSPREY_TEMPLATE = ChatTemplate(
    family="osprey",
    system=OSPREY_SYSTEM_PROMPT,
    image_line=OSPREY_IMAGE_LINE,
    describe_questions=(osprey_describe_prompt(False), osprey_describe_prompt(True)),
)
TEMPLATES = {t.family: t for t in (REGIONGPT_TEMPLATE, OSPREY_TEMPLATE)}


def chat_template(family: str) -> ChatTemplate:
    """The template of a model family (RGPTConfig.family)."""
    if family not in TEMPLATES:
        raise ValueError(f"no chat template for family {family!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[family]


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
    The first user turn follows the image: `<image>` + the template's image line + text
    (RegionGPT: `<image>\\n{text}`). `system` defaults to the template's."""

    turns: list[tuple[str, str | None]] = field(default_factory=list)
    system: str | None = None
    template: ChatTemplate = REGIONGPT_TEMPLATE

    def __post_init__(self) -> None:
        if self.system is None:
            self.system = self.template.system

    @classmethod
    def single(
        cls, question: str, answer: str | None = None, template: ChatTemplate = REGIONGPT_TEMPLATE
    ) -> Conversation:
        return cls(turns=[(question, answer)], template=template)

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
        prompt = self.layout(tokens)
        return prompt.text, prompt.answers

    def layout(self, tokens: TokenConfig, namer: RegionNamer | None = None) -> PromptText:
        """The prompt as the template writes it, knowing which characters are the user's
        (the system prompt, the questions, the answers). With a `namer`, each region
        placeholder in a question becomes the region token."""
        if not self.turns:
            raise ValueError("a conversation needs at least one turn")
        prompt = PromptText()
        prompt.user(self.system)
        for index, (question, answer) in enumerate(self.turns):
            prompt.template(f" {USER_ROLE} ")
            if index == 0:
                prompt.template(tokens.image + self.template.image_line)
            if namer is None:
                prompt.user(question)
            else:
                namer.write(prompt, question)
            prompt.template(f" {ASSISTANT_ROLE}")
            if answer is None:
                if index != len(self.turns) - 1:
                    raise ValueError(f"turn {index + 1} has no answer but is not the last turn")
                break
            start = prompt.length
            prompt.template(" ")
            prompt.user(answer)
            prompt.template(tokens.eos)
            prompt.answers.append((start, prompt.length))
        return prompt


class PromptText:
    """A prompt being written: its text, the spans of user text in it (which the tokenizer
    reads as plain characters, never as special tokens), and the spans of the answers."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.plain: list[tuple[int, int]] = []
        self.answers: list[tuple[int, int]] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def template(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def user(self, text: str) -> None:
        if text:
            self.plain.append((self.length, self.length + len(text)))
            self.template(text)


# --- tokenization -----------------------------------------------------------------------------


@dataclass
class PromptTokens:
    input_ids: list[int]
    labels: list[int]
    region_order: list[int]  # 0-based mask index of each region token, in order


class RegionNamer:
    """Writes a question's `<regionK>` / `<region>` placeholders as the region's tokens (one
    `<region>`, or Osprey's `<mask><pos>`), across all turns of a conversation, remembering
    which 0-based mask each placeholder names."""

    def __init__(self, num_regions: int, region_token: str):
        self.num_regions = num_regions
        self.region_token = region_token
        self.order: list[int] = []
        self._next_bare = 0

    def write(self, prompt: PromptText, question: str) -> None:
        """Append `question` to `prompt`: its text as user text, its placeholders as tokens."""
        start = 0
        for match in _REGION_PLACEHOLDER.finditer(question):
            prompt.user(question[start : match.start()])
            self.order.append(self._index(match.group(1)))
            prompt.template(self.region_token)
            start = match.end()
        prompt.user(question[start:])

    def _index(self, digits: str) -> int:
        if digits:
            index = int(digits) - 1
            if index < 0 or index >= self.num_regions:
                raise ValueError(
                    f"the prompt names <region{digits}> but {self.num_regions} mask(s) were given; "
                    f"use <region1>..<region{max(self.num_regions, 1)}> or give more masks"
                )
            return index
        index = self._next_bare
        if index >= self.num_regions:
            raise ValueError(
                f"the prompt has more <region> placeholders than the {self.num_regions} mask(s) given"
            )
        self._next_bare += 1
        return index

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
    mask must be named (a chat may name some masks only in later turns: False).

    Special tokens come only from the template and the placeholders: user text (the system
    prompt, questions, answers) is read as the characters it is, so a '</s>' or 'USER:' typed
    by a user is plain text, never the end-of-sequence or role token."""
    check_text("the system prompt", conversation.system)
    if tokens.image in conversation.system or _REGION_PLACEHOLDER.search(conversation.system):
        raise ValueError(
            f"the system prompt may not hold {tokens.image} or region placeholders; put regions in the turns"
        )
    for number, (question, answer) in enumerate(conversation.turns, start=1):
        check_text(f"question {number}", question)
        if answer is not None:
            check_text(f"answer {number}", answer)
        if tokens.image in question or (answer is not None and tokens.image in answer):
            raise ValueError(
                f"write turns without {tokens.image}: the template places the image itself"
            )
        if answer is not None and _REGION_PLACEHOLDER.search(answer):
            raise ValueError(
                "answers may not hold region placeholders; refer to regions as 'Region [k]'"
            )
    namer = RegionNamer(num_regions, tokens.region_text)
    prompt = conversation.layout(tokens, namer)
    if require_all:
        namer.check_all_named()

    ids, offsets = encode_prompt(tokenizer, prompt)
    image_id = _token_id(tokenizer, tokens.image)
    bos_id = _token_id(tokenizer, tokens.bos)
    for slot in tokens.region_slots:
        if ids.count(_token_id(tokenizer, slot)) != len(namer.order):
            raise ValueError(
                f"the prompt's {len(namer.order)} region placeholder(s) did not each become "
                f"one {slot} token; write text around placeholders without special-token strings"
            )
    input_ids = [bos_id]
    labels = [IGNORE_INDEX]
    for token_id, (start, _end) in zip(ids, offsets):
        if token_id == image_id:
            input_ids.extend([image_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            continue
        in_answer = any(a <= start < b for a, b in prompt.answers)
        input_ids.append(token_id)
        labels.append(token_id if in_answer else IGNORE_INDEX)
    return PromptTokens(input_ids=input_ids, labels=labels, region_order=namer.order)


def check_text(name: str, text: str) -> str:
    """`text`, if it is a str of valid Unicode: TypeError naming `name` if it is not a str,
    ValueError if it holds a lone surrogate ('\\ud800', which JSON can carry and no tokenizer
    can read)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str; got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} holds {text[error.start]!r} at character {error.start}, a lone surrogate "
            "that is not valid Unicode text; send the text as UTF-8"
        ) from None
    return text


def encode_prompt(tokenizer, prompt: PromptText) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of prompt.text and their character spans, with special tokens only where the
    template put them. The whole text is encoded at once (so ordinary text tokenizes exactly
    as it always has); a special token matched inside user text is taken back, and the text
    between the template's special tokens around it is encoded again as plain characters."""
    text = prompt.text
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    users = bytearray(len(text))  # 1 where a character is the user's
    for start, end in prompt.plain:
        users[start:end] = b"\x01" * (end - start)

    def matched_in_user_text(index: int) -> bool:
        """A special token matched on its string (not, say, <unk> for an unknown character),
        where a character of that string is the user's."""
        start, end = offsets[index]
        return text[start:end].strip() == special[ids[index]] and any(
            users[i] and not text[i].isspace() for i in range(start, end)
        )

    forged = [token in special and matched_in_user_text(i) for i, token in enumerate(ids)]
    if not any(forged):
        return ids, offsets
    plain = _plain_tokenizer(tokenizer, tokenizer.get_vocab_size(with_added_tokens=True))
    kept = [i for i, token in enumerate(ids) if token in special and not forged[i]]
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    for left, right in zip([-1, *kept], [*kept, len(ids)]):
        if left >= 0:  # a special token of the template
            out_ids.append(ids[left])
            out_offsets.append(offsets[left])
        if not any(forged[left + 1 : right]):
            out_ids.extend(ids[left + 1 : right])
            out_offsets.extend(offsets[left + 1 : right])
            continue
        start = offsets[left][1] if left >= 0 else 0
        end = offsets[right][0] if right < len(ids) else len(text)
        again = plain.encode(text[start:end], add_special_tokens=False)
        out_ids.extend(again.ids)
        out_offsets.extend((a + start, b + start) for a, b in again.offsets)
    return out_ids, out_offsets


@functools.lru_cache(maxsize=4)
def _plain_tokenizer(tokenizer, vocab_size: int):
    """A copy of `tokenizer` that reads special-token strings as plain text (per vocabulary
    size, so a tokenizer given more tokens later gets a new copy)."""
    plain = type(tokenizer).from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return plain


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
