"""Tokenizers: train a small byte-level BPE for the `tiny` preset, load tokenizer.json files,
and make sure the special tokens rgpt_rt needs are present.

Everything here uses the `tokenizers` library only (the runtime never needs transformers).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from rgpt_rt.config import TokenConfig
from rgpt_rt.prompts import ASSISTANT_ROLE, USER_ROLE


def special_tokens(tokens: TokenConfig) -> list[AddedToken]:
    """The special tokens, in the order their ids are assigned by `train_tokenizer`
    (pad 0, unk 1, bos 2, eos 3, image 4, region 5, then the chat roles, which also take
    the space before them so that ' USER:' is one token)."""
    plain = [tokens.pad, tokens.unk, tokens.bos, tokens.eos, tokens.image, tokens.region]
    roles = [USER_ROLE, ASSISTANT_ROLE]
    return [AddedToken(t, special=True, normalized=False) for t in plain] + [
        AddedToken(t, special=True, normalized=False, lstrip=True) for t in roles
    ]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, tokens: TokenConfig | None = None
) -> Tokenizer:
    """A byte-level BPE trained on `texts`: any string encodes (no unknown characters) and
    decodes back exactly. Special tokens come first (see `special_tokens`)."""
    tokens = tokens or TokenConfig()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def ensure_special_tokens(tokenizer: Tokenizer, tokens: TokenConfig) -> Tokenizer:
    """Add <image> and the region tokens (<region>; Osprey's <mask> and <pos>) as special
    tokens where the tokenizer lacks them. Used for LLaMA/Vicuna tokenizers, whose
    vocabularies do not hold them; their ids then lie past the LLM's embedding table, which
    is fine: those positions are always spliced. Tokens a checkpoint's tokenizer already has
    (Osprey-7b's <mask>, <pos>) keep their ids."""
    wanted = (tokens.image, *tokens.region_slots)
    missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing]
        )
    for required in (tokens.bos, tokens.eos):
        if tokenizer.token_to_id(required) is None:
            raise ValueError(
                f"the tokenizer has no {required!r} token; the LLM's tokenizer must define bos and eos"
            )
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}; a checkpoint or bundle holds tokenizer.json"
        )
    return Tokenizer.from_file(str(path))


def default_tokenizer(vocab_size: int = 512, tokens: TokenConfig | None = None) -> Tokenizer:
    """A small tokenizer trained on rgpt_rt's own prompt text, for models built without one
    (random test models). Deterministic: the same call gives the same vocabulary."""
    from rgpt_rt import prompts

    texts = [
        prompts.SYSTEM_PROMPT,
        prompts.classify_prompt(),
        prompts.refer_prompt("the object", 3),
        prompts.describe_prompt(detailed=True),
        prompts.describe_prompt(detailed=False),
        prompts.NO_MATCH_ANSWER,
        "Region [1] Region [2] Region [3] yes no a small medium large object",
    ]
    return train_tokenizer(texts * 4, vocab_size, tokens)
