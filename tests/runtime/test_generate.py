"""Generation: logit processing as transformers does it, seeded sampling, eos and stop strings
with rows that finish independently, and streaming."""

from __future__ import annotations

import pytest
import torch
from llama_reference import build_hf, byte_level_tokenizer, hf_greedy, relative_error
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rgpt_rt.runtime import (
    SamplingParams,
    decode,
    generate,
    generate_batch,
    generate_stream,
)
from rgpt_rt.runtime.generate import process_logits, sample
from rgpt_rt.runtime.loading import load_decoder


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def text_model(tokenizer, tmp_path_factory):
    """(transformers model, our decoder) over the byte-level tokenizer's vocabulary."""
    model = build_hf("gqa", seed=3, vocab_size=tokenizer.get_vocab_size())
    folder = tmp_path_factory.mktemp("llama_text")
    model.save_pretrained(str(folder))
    return model, load_decoder(folder)


def _ids(tokenizer, text="Hello 世界! café"):
    return torch.tensor([tokenizer.encode(text).ids])


@pytest.mark.parametrize(
    "penalty, temperature, top_k, top_p",
    [(1.3, 0.7, 20, 0.9), (1.0, 1.5, 0, 0.5), (0.8, 1.0, 5, 1.0), (1.2, 0.0, 0, 1.0)],
    ids=["all", "top_p", "top_k_reward", "greedy_penalty"],
)
def test_logit_processing_equals_transformers(penalty, temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3
    context = torch.randint(0, 300, (4, 20), generator=gen)
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter(1, context, True)
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty
    )
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)])
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
    expected = processors(context, logits.clone())
    assert torch.equal(process_logits(logits, params, seen), expected)
    assert (expected == float("-inf")).any() == (top_k > 0 or top_p < 1)


def test_samples_stay_in_the_top_k_and_the_nucleus():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)).repeat(2000, 1)
    gen = torch.Generator().manual_seed(2)
    top5 = set(logits[0].topk(5).indices.tolist())
    drawn = set(sample(logits, SamplingParams(temperature=1.0, top_k=5), generator=gen).tolist())
    assert drawn == top5  # 2000 draws reach every one of the 5 and nothing else
    probs, order = logits[0].softmax(-1).sort(descending=True)
    nucleus = set(order[: int((probs.cumsum(0) < 0.6).sum()) + 1].tolist())  # smallest set >= 0.6
    drawn = set(sample(logits, SamplingParams(temperature=1.0, top_p=0.6), generator=gen).tolist())
    assert drawn == nucleus and len(nucleus) > 1


def test_sampling_is_deterministic_given_a_seed_or_generator(text_model, tokenizer):
    _, decoder = text_model
    ids = _ids(tokenizer)
    kwargs = dict(max_new_tokens=32, temperature=1.0, top_p=0.95)
    first = generate(decoder, input_ids=ids, seed=7, **kwargs)
    assert generate(decoder, input_ids=ids, seed=7, **kwargs) == first
    assert generate(decoder, input_ids=ids, seed=8, **kwargs) != first
    generator = torch.Generator().manual_seed(7)
    assert generate(decoder, input_ids=ids, generator=generator, **kwargs) == first
    greedy = generate(decoder, input_ids=ids, max_new_tokens=32)
    assert generate(decoder, input_ids=ids, max_new_tokens=32, temperature=0.8, top_k=1) == greedy


def test_repetition_penalty_greedy_equals_transformers(text_model, tokenizer):
    model, decoder = text_model
    ids = _ids(tokenizer)
    ours = generate(decoder, input_ids=ids, max_new_tokens=32, repetition_penalty=1.5)
    assert ours == hf_greedy(model, ids, 32, repetition_penalty=1.5)
    assert ours != generate(decoder, input_ids=ids, max_new_tokens=32)


def test_eos_ends_each_row_independently(text_model, tokenizer):
    _, decoder = text_model
    rows = [tokenizer.encode(t).ids for t in ("Hello 世界!", "café — naïve", "🙂")]
    free = generate_batch(decoder, input_ids=rows, max_new_tokens=24)
    k = next(k for k in range(3, 24) if free[0][k] not in free[0][:k])
    eos = free[0][k]  # row 0 ends after k tokens; the others when (if) they meet that token
    ended = generate_batch(decoder, input_ids=rows, max_new_tokens=24, eos_token_id=[eos, -1])
    expected = [r[: r.index(eos)] if eos in r else r for r in free]
    assert ended == expected and len(ended[0]) == k
    assert any(len(r) == 24 for r in ended), "the test needs a row that outlives row 0"


def test_stop_strings_cut_the_text_and_stream_the_same(text_model, tokenizer):
    _, decoder = text_model
    ids = _ids(tokenizer)
    free = _decode(decoder, tokenizer, ids, max_new_tokens=40)
    text = free.text
    assert text == tokenizer.decode(free.ids)
    # A random model writes mostly invalid bytes; stop at the text of its first clean token.
    stop = next(t for t in map(tokenizer.decode, ([i] for i in free.ids[3:])) if "\ufffd" not in t)
    cut = text[: text.find(stop)]
    stopped = _decode(decoder, tokenizer, ids, max_new_tokens=40, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == cut
    assert stopped.ids == free.ids[: len(stopped.ids)] and stop in tokenizer.decode(stopped.ids)
    deltas = list(
        generate_stream(decoder, tokenizer, input_ids=ids, max_new_tokens=40, stop=[stop])
    )
    assert "".join(deltas) == cut and all(deltas)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(decoder, input_ids=ids, stop=["x"])


def test_stream_concatenates_to_the_decoded_ids(text_model, tokenizer):
    _, decoder = text_model
    ids = _ids(tokenizer, "🙂🎉 日本語")
    kwargs = dict(max_new_tokens=48, temperature=1.0, seed=3)
    deltas = list(generate_stream(decoder, tokenizer, input_ids=ids, **kwargs))
    assert "".join(deltas) == tokenizer.decode(generate(decoder, input_ids=ids, **kwargs))
    assert len(deltas) > 1


def _decode(decoder, tokenizer, ids, **sampling):
    cache = decoder.new_cache(1, ids.shape[1] + sampling["max_new_tokens"])
    logits = decoder.prefill(cache, input_ids=ids)
    return decode(decoder, cache, logits, SamplingParams(**sampling), tokenizer=tokenizer)[0]


def test_a_chat_continues_in_the_same_cache(hf_llama):
    """After decode each row's cache holds its context and its tokens but the last sampled one;
    prefilling that token and a next turn equals prefilling the whole conversation afresh."""
    decoder = load_decoder(hf_llama("gqa")[1])
    prompts = [list(range(10, 16)), list(range(40, 50))]
    free = generate_batch(decoder, input_ids=prompts, max_new_tokens=12)
    k = next(k for k in range(3, 12) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    cache = decoder.new_cache(2, 64)
    padded = torch.zeros(2, 10, dtype=torch.int64)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p)
    logits = decoder.prefill(cache, input_ids=padded, lengths=[6, 10])
    rows = decode(decoder, cache, logits, SamplingParams(max_new_tokens=12, eos_token_id=eos))
    assert rows[0].finish_reason == "eos"
    fed, pending = [], []
    for b, row in enumerate(rows):
        if row.finish_reason == "eos":  # all its tokens are in; the eos is not
            fed.append(prompts[b] + row.ids)
            pending.append([eos, 7, 8, 9])  # the token never fed, then the next turn
        else:
            fed.append(prompts[b] + row.ids[:-1])
            pending.append([row.ids[-1], 7, 8, 9])
    assert cache.lengths.tolist() == [len(f) for f in fed]
    turn = torch.tensor(pending)  # [2, 4]
    continued = decoder.prefill(cache, input_ids=turn)
    for b in range(2):
        whole = torch.tensor([fed[b] + pending[b]])
        fresh = decoder.prefill(decoder.new_cache(1, 64), input_ids=whole)
        assert relative_error(continued[b], fresh[0]) <= 1e-5
