"""The runtime decoder against transformers.LlamaForCausalLM (fp32: logits within 1e-5, greedy
tokens identical), and its cache: batches of different lengths, prefix copies, snapshots."""

from __future__ import annotations

import json

import pytest
import torch
from llama_reference import VOCAB, build_hf, hf_greedy, relative_error

from rgpt_rt.model.llm import read_llama_config
from rgpt_rt.runtime import (
    SamplingParams,
    decode,
    generate,
    generate_batch,
    llm_config_from_hf,
)
from rgpt_rt.runtime.loading import load_decoder

# fp32 against fp32: the same arithmetic in a different order. 1e-5 is the bound; the
# measured error is ~1e-7.
FP32_TOL = 1e-5


def _prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["mha", "gqa", "linear", "dynamic", "llama3", "tied"])
def test_config_parser_agrees_with_reference(hf_llama, variant):
    _, folder = hf_llama(variant)
    raw = json.loads((folder / "config.json").read_text())
    assert llm_config_from_hf(raw) == read_llama_config(folder)


def test_config_parser_reads_transformers_4_layout(tmp_path):
    raw = json.loads(build_hf("linear").config.to_json_string())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = llm_config_from_hf(raw)
    assert ours == read_llama_config(tmp_path)
    assert ours.rope_theta == 500.0 and ours.rope_scaling == {"type": "linear", "factor": 4.0}


@pytest.mark.parametrize("variant", ["mha", "gqa", "linear", "dynamic", "llama3", "tied"])
def test_logits_match_transformers(hf_llama, variant):
    model, folder = hf_llama(variant)
    decoder = load_decoder(folder)
    ids = _prompt(40)
    with torch.no_grad():
        ref = model(ids).logits[0]  # [40, V]
    cache = decoder.new_cache(1, 64)
    prefill = decoder.prefill(cache, input_ids=ids[:, :32], all_logits=True)[0]  # [32, V]
    steps = [decoder.decode_step(ids[:, t], cache)[0] for t in range(32, 40)]  # 8 x [V]
    assert relative_error(prefill, ref[:32]) <= FP32_TOL
    assert relative_error(torch.stack(steps), ref[32:]) <= FP32_TOL


@pytest.mark.parametrize("variant", ["gqa", "linear", "llama3"])
def test_64_greedy_tokens_match_transformers(hf_llama, variant):
    model, folder = hf_llama(variant)
    decoder = load_decoder(folder)
    ids = _prompt(20, seed=2)
    ours = generate(decoder, input_ids=ids, max_new_tokens=64)
    assert ours == hf_greedy(model, ids, 64)
    assert len(set(ours)) > 4  # a real continuation, not one token repeated


def test_prefill_from_embeddings_equals_prefill_from_ids(hf_llama):
    decoder = load_decoder(hf_llama("gqa")[1])
    ids = _prompt(24)
    by_ids = decoder.prefill(decoder.new_cache(1, 32), input_ids=ids, all_logits=True)
    by_embeds = decoder.prefill(
        decoder.new_cache(1, 32), inputs_embeds=decoder.embed(ids), all_logits=True
    )
    assert torch.equal(by_ids, by_embeds)
    assert generate(decoder, input_ids=ids[0], max_new_tokens=16) == generate(
        decoder, inputs_embeds=decoder.embed(ids), max_new_tokens=16
    )


def test_batched_rows_of_different_lengths_equal_one_at_a_time(hf_llama):
    decoder = load_decoder(hf_llama("gqa")[1])
    rows = [_prompt(n, seed=n)[0] for n in (5, 17, 11)]
    cache = decoder.new_cache(3, 40)
    padded = torch.zeros(3, 17, dtype=torch.int64)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = row
    batched = decoder.prefill(cache, input_ids=padded, lengths=[5, 17, 11])  # [3, V]
    assert cache.lengths.tolist() == [5, 17, 11]
    for b, row in enumerate(rows):
        alone = decoder.prefill(decoder.new_cache(1, 40), input_ids=row[None])  # [1, V]
        assert relative_error(batched[b], alone[0]) <= FP32_TOL
    together = generate_batch(decoder, input_ids=[r.tolist() for r in rows], max_new_tokens=20)
    assert together == [generate(decoder, input_ids=r, max_new_tokens=20) for r in rows]


def test_batched_embeddings_of_different_lengths(hf_llama):
    decoder = load_decoder(hf_llama("llama3")[1])
    embeds = [torch.randn(n, 64) for n in (9, 3)]  # e.g. image + region embeddings
    together = generate_batch(decoder, inputs_embeds=embeds, max_new_tokens=12)
    assert together == [generate(decoder, inputs_embeds=e, max_new_tokens=12) for e in embeds]


def test_prefix_copy_then_suffix_prefill_equals_full_prefill(hf_llama):
    decoder = load_decoder(hf_llama("gqa")[1])
    prefix = torch.randn(1, 12, 64)  # a shared prefix given as embeddings (system + image)
    suffixes = [_prompt(n, seed=10 + n)[0] for n in (4, 7, 2)]
    # The prefix once, kept as a snapshot; then three rows that each prefill only their suffix.
    first = decoder.new_cache(1, 16)
    decoder.prefill(first, inputs_embeds=prefix)
    snap = first.snapshot()
    assert snap.max_len == 12 and snap.lengths.tolist() == [12]
    assert torch.equal(first.snapshot(5).k[:, 0], first.k[:, 0, :, :5])  # a shorter prefix
    cache = decoder.new_cache(3, 40)
    cache.copy_prefix(snap, 0, [0, 1, 2], 12)
    padded = torch.zeros(3, 7, dtype=torch.int64)
    for b, s in enumerate(suffixes):
        padded[b, : len(s)] = s
    logits = decoder.prefill(cache, input_ids=padded, lengths=[4, 7, 2])  # [3, V]
    assert cache.lengths.tolist() == [16, 19, 14]
    continued = decode(decoder, cache, logits, SamplingParams(max_new_tokens=10))
    for b, s in enumerate(suffixes):
        full = torch.cat([prefix, decoder.embed(s)[None]], dim=1)  # [1, 12 + n, D]
        alone = decoder.prefill(decoder.new_cache(1, 40), inputs_embeds=full)
        assert relative_error(logits[b], alone[0]) <= FP32_TOL
        # and greedy decoding from the copied prefix continues as a full run does
        assert continued[b].ids == generate(decoder, inputs_embeds=full, max_new_tokens=10)


def test_copy_prefix_within_one_cache(hf_llama):
    decoder = load_decoder(hf_llama("mha")[1])
    ids = _prompt(20)
    cache = decoder.new_cache(2, 24)
    padded = torch.zeros(2, 20, dtype=torch.int64)
    padded[0], padded[1, :3] = ids[0], ids[0, :3]
    decoder.prefill(cache, input_ids=padded, lengths=[20, 3])
    cache.copy_prefix(cache, 0, 1, 15)  # row 1 drops its own tokens and takes row 0's first 15
    logits = decoder.prefill(cache, input_ids=ids[:, 15:18].repeat(2, 1), lengths=[1, 3])
    expected = decoder.prefill(decoder.new_cache(1, 24), input_ids=ids[:, :18])
    assert relative_error(logits[1], expected[0]) <= FP32_TOL
    assert cache.lengths.tolist() == [21, 18]


def test_decode_step_over_a_padded_key_length_equals_the_exact_one(hf_llama):
    """CUDA graphs of the unfused step replay it over a key length rounded up to a bucket; the
    masked slots past each row's position must not change the result (checked here on the CPU).
    (The fused step attends over each row's own length: tests/runtime/test_decoder_fused_step.py.)"""
    decoder = load_decoder(hf_llama("gqa")[1])
    decoder.decode_step_kind = "unfused"
    cache = decoder.new_cache(2, 300)
    padded = torch.cat([_prompt(30), _prompt(30, seed=3)]).clone()
    logits = decoder.prefill(cache, input_ids=padded, lengths=[30, 21])
    tokens, pos = logits.argmax(-1), cache.lengths.clone()
    exact = decoder.decode_step(tokens, cache)
    cache.lengths -= 1  # the same step again, attending over all 300 slots
    padded_len = decoder.step_logits(tokens, pos, cache, kv_len=300)
    assert relative_error(padded_len, exact) <= FP32_TOL


def test_sharded_folder_loads_like_one_file(hf_llama, tmp_path):
    model, folder = hf_llama("gqa")
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    one, sharded = load_decoder(folder), load_decoder(tmp_path)
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_error_within_2x_of_transformers(hf_llama, dtype):
    model, folder = hf_llama("gqa")
    ids = _prompt(32)
    with torch.no_grad():
        ref = model(ids).logits[0]
        theirs = build_hf("gqa").to(dtype)(ids).logits[0]
    decoder = load_decoder(folder, dtype=dtype)
    assert decoder.dtype == dtype and decoder.new_cache(1, 8).k.dtype == dtype
    ours = decoder.prefill(decoder.new_cache(1, 32), input_ids=ids, all_logits=True)[0]
    # Same-precision baseline: transformers in this dtype against fp32 (flash-attention's rule).
    assert relative_error(ours, ref) <= 2 * relative_error(theirs, ref)


def test_bad_inputs_say_what_is_wrong(hf_llama, tmp_path):
    decoder = load_decoder(hf_llama("gqa")[1])
    cache = decoder.new_cache(2, 8)
    with pytest.raises(ValueError, match="rows but the cache has 2"):
        decoder.prefill(cache, input_ids=_prompt(4))
    with pytest.raises(ValueError, match="max_len 8"):
        decoder.prefill(cache, input_ids=_prompt(9).repeat(2, 1))
    with pytest.raises(ValueError, match="lengths must be"):
        decoder.prefill(cache, input_ids=_prompt(4).repeat(2, 1), lengths=[0, 4])
    with pytest.raises(ValueError, match="token ids must be in 0..255"):
        decoder.prefill(cache, input_ids=torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="prefilled before decode_step"):
        decoder.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="exactly one of"):
        decoder.prefill(cache)
    decoder.prefill(cache, input_ids=_prompt(8).repeat(2, 1))
    with pytest.raises(ValueError, match="cache is full"):
        decoder.decode_step(torch.zeros(2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="prefix length 9"):
        decoder.new_cache(1, 16).copy_prefix(cache, 0, 0, 9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(decoder, input_ids=[1, 2], max_new_tokens=0)
    raw = json.loads(build_hf("gqa").config.to_json_string())
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        llm_config_from_hf({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="'mistral' model"):
        llm_config_from_hf({**raw, "model_type": "mistral"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_decoder(tmp_path)
    dynamic = load_decoder(hf_llama("dynamic")[1])
    with pytest.raises(ValueError, match="dynamic NTK rope"):
        dynamic.new_cache(1, 257)


def test_a_prefill_in_chunks_computes_the_whole_prefill(hf_llama):
    decoder = load_decoder(hf_llama("gqa")[1])
    rows = torch.cat([_prompt(30), _prompt(30, seed=4)])  # [2, 30]
    lengths = [30, 23]  # the second row right-padded
    whole, chunked = decoder.new_cache(2, 40), decoder.new_cache(2, 40)
    decoder.prefill_chunk = None
    expected = decoder.prefill(whole, input_ids=rows, lengths=lengths, all_logits=True)
    decoder.prefill_chunk = 7  # 7, 7, 7, 7, 2 tokens
    got = decoder.prefill(chunked, input_ids=rows, lengths=lengths, all_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 summation order
    assert chunked.lengths.tolist() == whole.lengths.tolist() == lengths
    torch.testing.assert_close(chunked.k[:, :, :, :30], whole.k[:, :, :, :30], rtol=1e-5, atol=1e-5)


def test_a_chunked_prefill_returns_each_rows_last_logits_from_its_own_chunk(hf_llama):
    """Without all_logits a chunked prefill keeps only each row's last token of the chunk that
    holds it (rows 29 and 22 of 30 here end in different chunks of 7)."""
    decoder = load_decoder(hf_llama("gqa")[1])
    rows = torch.cat([_prompt(30), _prompt(30, seed=4)])  # [2, 30]
    lengths = [30, 23]
    decoder.prefill_chunk = None
    every = decoder.prefill(
        decoder.new_cache(2, 40), input_ids=rows, lengths=lengths, all_logits=True
    )
    decoder.prefill_chunk = 7
    last = decoder.prefill(decoder.new_cache(2, 40), input_ids=rows, lengths=lengths)
    torch.testing.assert_close(last, every[[0, 1], [29, 22]], rtol=1e-5, atol=1e-5)
