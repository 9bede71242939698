"""Incremental detokenisation: deltas hold only final text (never part of a character, never a
possible start of a stop string) and concatenate to the full decode."""

from __future__ import annotations

import re

import pytest
import torch
from llama_reference import MULTIBYTE_TEXT, byte_fallback_tokenizer, byte_level_tokenizer

from rgpt_rt.runtime import TextStream

TOKENIZERS = {"byte_level_bpe": byte_level_tokenizer, "byte_fallback": byte_fallback_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _stream(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    deltas, texts = [], []
    for token in ids:
        deltas.append(stream.push(token))
        texts.append(stream.text)
    deltas.append(stream.finish())
    return stream, deltas, texts


def test_characters_spanning_tokens_are_never_split(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXT).ids
    assert tokenizer.decode(ids) == MULTIBYTE_TEXT
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert split, "the test needs characters that span tokens"
    stream, deltas, texts = _stream(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == stream.text == MULTIBYTE_TEXT
    # Each step emits exactly the text that is final: all but a trailing incomplete character
    # (and, with byte fallback, all but a trailing run of byte tokens).
    for n, text in enumerate(texts, start=1):
        closed = n
        while closed and re.fullmatch(r"<0x..>", tokenizer.id_to_token(ids[closed - 1])):
            closed -= 1
        assert text == tokenizer.decode(ids[:closed]).rstrip("\ufffd")


def test_random_ids_concatenate_to_the_full_decode(tokenizer):
    # Random ids make invalid byte sequences too; the deltas must still add up exactly.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (40,), generator=gen).tolist()
        _, deltas, _ = _stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)


def test_stop_string_is_held_back_then_cut():
    tokenizer = byte_level_tokenizer()
    text = "Hi 世界\nENA is no stop\nEND: this is cut"
    ids = tokenizer.encode(text).ids
    stream, deltas, texts = _stream(tokenizer, ids, stop=["\nEND:", "never"])
    assert stream.stopped and "".join(deltas) == stream.text == "Hi 世界\nENA is no stop"
    # "\nEN" is held while it may begin "\nEND:", and released once "\nENA" rules that out.
    assert "Hi 世界" in texts and not any(t.endswith(("\n", "\nE", "\nEN")) for t in texts)
    assert stream.push(tokenizer.encode("more").ids[0]) == ""  # nothing after a stop


def test_stop_string_at_the_start_and_unfinished_prefix_at_the_end():
    tokenizer = byte_level_tokenizer()
    stream, deltas, _ = _stream(tokenizer, tokenizer.encode("</b>rest").ids, stop=["</b>"])
    assert stream.stopped and "".join(deltas) == ""
    # A text that ends inside a possible stop string: the held part comes out at finish.
    stream, deltas, texts = _stream(tokenizer, tokenizer.encode("tail </").ids, stop=["</b>"])
    assert not stream.stopped and texts[-1] == "tail " and "".join(deltas) == "tail </"
