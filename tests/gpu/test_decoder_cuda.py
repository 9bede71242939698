"""The runtime decoder on CUDA: the decode step as CUDA graphs (one per cache, so per batch size,
and per key-length bucket) against eager decoding and against transformers; prefix copies and
batched rows on the device; the INT4 decoder under graphs when rgpt_rt.quant exists. The model
here has head_dim 32, which the fused step's CUDA kernels do not take: these tests run the
unfused step (tests/gpu/test_decode_fused_cuda.py runs the fused one)."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from rgpt_rt.runtime import SamplingParams, decode, generate, generate_batch
from rgpt_rt.runtime.graphs import GRAPH_KV_BUCKET
from rgpt_rt.runtime.loading import load_decoder

VOCAB = 256


def _hf(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "initializer_range": 0.1,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            **overrides,
        }
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = _hf()
    folder = tmp_path_factory.mktemp("llama_cuda")
    model.save_pretrained(str(folder))
    return model, folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _ids(n: int, rows: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def _greedy_logits(decoder, ids, steps, max_len, graphs):
    """Prefill ids [B, T], then `steps` greedy decode steps -> (logits [steps, B, V], cache)."""
    decoder.use_cuda_graphs = graphs
    cache = decoder.new_cache(ids.shape[0], max_len)
    logits = decoder.prefill(cache, input_ids=ids)
    out = []
    for _ in range(steps):
        logits = decoder.decode_step(logits.argmax(-1), cache)
        out.append(logits.float())
    decoder.use_cuda_graphs = True
    return torch.stack(out), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_graph_decode_equals_eager_across_buckets(llama_folder, dtype, rows):
    # the unfused step's graphs, one per key-length bucket (the fused step's single graph per
    # cache: tests/gpu/test_decode_fused_cuda.py)
    decoder = load_decoder(llama_folder[1], dtype=dtype, device="cuda")
    decoder.decode_step_kind = "unfused"
    ids = _ids(GRAPH_KV_BUCKET - 8, rows)  # the decode crosses the first bucket's end
    graphed, cache = _greedy_logits(decoder, ids, 24, 300, graphs=True)
    eager, _ = _greedy_logits(decoder, ids, 24, 300, graphs=False)
    assert sorted(cache.graphs) == [GRAPH_KV_BUCKET, 300]  # the second bucket is capped at max_len
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    # Graph and eager run the same kernels except for the key length (masked slots add exact
    # zeros): fp32 to fp32 precision, fp16 to a few fp16 ulps of the logits' range.
    assert _rel(graphed, eager) <= (1e-5 if dtype == torch.float32 else 5e-3)


def test_graphs_per_batch_size_interleaved(llama_folder):
    decoder = load_decoder(llama_folder[1], device="cuda")
    one, four = decoder.new_cache(1, 64), decoder.new_cache(4, 64)
    ids1, ids4 = _ids(10, 1, seed=2), _ids(10, 4, seed=3)
    l1, l4 = decoder.prefill(one, input_ids=ids1), decoder.prefill(four, input_ids=ids4)
    steps1, steps4 = [], []
    for _ in range(12):  # alternate between the two caches' graphs
        l1 = decoder.decode_step(l1.argmax(-1), one)
        l4 = decoder.decode_step(l4.argmax(-1), four)
        steps1.append(l1)
        steps4.append(l4)
    assert list(one.graphs) == [64] and list(four.graphs) == [64]
    eager1, _ = _greedy_logits(decoder, ids1, 12, 64, graphs=False)
    eager4, _ = _greedy_logits(decoder, ids4, 12, 64, graphs=False)
    assert _rel(torch.stack(steps1), eager1) <= 1e-5
    assert _rel(torch.stack(steps4), eager4) <= 1e-5


def test_graphs_of_a_new_cache_after_the_last_one_was_freed(llama_folder):
    # the decoder benchmark's pattern: a fresh cache per answer, the previous one (and its
    # graphs) gone. A graph pool shared past its last graph tripped torch's allocator here.
    decoder = load_decoder(llama_folder[1], dtype=torch.float16, device="cuda")
    ids = _ids(12, seed=7)
    first, cache = _greedy_logits(decoder, ids, 8, 64, graphs=True)
    assert cache.graphs
    del cache
    gc.collect()
    for _ in range(2):
        again, cache = _greedy_logits(decoder, ids, 8, 64, graphs=True)
        assert cache.graphs and torch.equal(again, first)
        del cache
        gc.collect()


def test_cuda_logits_and_greedy_match_transformers(llama_folder):
    model, folder = llama_folder
    model = model.cuda()
    decoder = load_decoder(folder, device="cuda")
    ids = _ids(40).cuda()
    with torch.no_grad():
        ref = model(ids).logits[0]  # [40, V]
    cache = decoder.new_cache(1, 64)
    prefill = decoder.prefill(cache, input_ids=ids[:, :32], all_logits=True)[0]
    steps = torch.stack([decoder.decode_step(ids[:, t], cache)[0] for t in range(32, 40)])
    assert cache.graphs, "decode_step did not use a CUDA graph"
    assert _rel(prefill, ref[:32]) <= 1e-5 and _rel(steps, ref[32:]) <= 1e-5
    config = GenerationConfig(max_new_tokens=64, do_sample=False)
    with torch.no_grad():
        theirs = model.generate(
            ids[:, :20], attention_mask=torch.ones_like(ids[:, :20]), generation_config=config
        )
    assert generate(decoder, input_ids=ids[0, :20], max_new_tokens=64) == theirs[0, 20:].tolist()
    model.cpu()


def test_prefix_copy_and_batched_regions_on_cuda(llama_folder):
    """describe_many's pattern: one shared prefix, 16 rows that prefill only their suffixes and
    decode as one graphed batch, each equal to its own full run."""
    decoder = load_decoder(llama_folder[1], device="cuda")
    prefix = torch.randn(1, 80, 128, device="cuda")  # system + image embeddings
    first = decoder.new_cache(1, 96)
    decoder.prefill(first, inputs_embeds=prefix)
    snap = first.snapshot()
    suffixes = [_ids(3 + i % 5, seed=20 + i)[0] for i in range(16)]
    cache = decoder.new_cache(16, 140)
    cache.copy_prefix(snap, 0, range(16), 80)
    padded = torch.zeros(16, 7, dtype=torch.int64)
    for b, s in enumerate(suffixes):
        padded[b, : len(s)] = s
    logits = decoder.prefill(cache, input_ids=padded, lengths=[len(s) for s in suffixes])
    rows = decode(decoder, cache, logits, SamplingParams(max_new_tokens=24))
    assert cache.graphs
    for b, s in enumerate(suffixes):
        full = torch.cat([prefix, decoder.embed(s.cuda())[None]], dim=1)
        assert rows[b].ids == generate(decoder, inputs_embeds=full, max_new_tokens=24), b


def test_sampling_on_cuda_is_deterministic(llama_folder):
    decoder = load_decoder(llama_folder[1], dtype=torch.float16, device="cuda")
    rows = [_ids(n, seed=n)[0].tolist() for n in (5, 9)]
    kwargs = dict(max_new_tokens=32, temperature=0.9, top_p=0.9, top_k=50, seed=4)
    assert generate_batch(decoder, input_ids=rows, **kwargs) == generate_batch(
        decoder, input_ids=rows, **kwargs
    )


def test_int4_decoder_graphs_equal_eager(llama_folder):
    decoder = load_decoder(
        llama_folder[1], dtype=torch.float16, quant="int4", group_size=64, device="cuda"
    )
    ids = _ids(20, 2, seed=5)
    graphed, cache = _greedy_logits(decoder, ids, 16, 64, graphs=True)
    eager, _ = _greedy_logits(decoder, ids, 16, 64, graphs=False)
    assert cache.graphs and torch.equal(graphed.argmax(-1), eager.argmax(-1))
    assert _rel(graphed, eager) <= 5e-3


@pytest.mark.parametrize("quant", [None, "int4"])
def test_fused_projections_on_cuda_equal_unfused(llama_folder, quant):
    # what the Session runs: q/k/v and gate/up stacked, under CUDA graphs
    def load():
        return load_decoder(
            llama_folder[1], dtype=torch.float16, quant=quant, group_size=64, device="cuda"
        )

    plain, fused = load(), load()
    assert fused.fuse_projections()
    ids = _ids(20, 2, seed=6)
    a, _ = _greedy_logits(plain, ids, 16, 64, graphs=True)
    b, cache = _greedy_logits(fused, ids, 16, 64, graphs=True)
    assert cache.graphs and torch.equal(a.argmax(-1), b.argmax(-1))
    assert _rel(b, a) <= 5e-3
