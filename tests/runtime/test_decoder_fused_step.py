"""The fused decode step (LlamaDecoder.fused_step_logits, rgpt_rt/ops/decode.py) against the
unfused one and against transformers, on the CPU: fp32 logits within 1e-5, the same greedy
tokens, rows of different lengths in one batch, INT4 with an fp16 cache (a bundle on a CPU),
and the small torch ops it no longer runs."""

from __future__ import annotations

import pytest
import torch
from llama_reference import VOCAB, hf_greedy, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

from rgpt_rt.runtime import generate
from rgpt_rt.runtime.loading import load_decoder
from rgpt_rt.runtime.model import DECODE_STEP_ENV, LlamaDecoder

FP32_TOL = 1e-5  # test_decoder.py's bound: fp32 against fp32 in another order


def _prompt(length: int, rows: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _steps(decoder: LlamaDecoder, kind: str, ids: torch.Tensor, lengths, steps: int, kv=None):
    """Prefill the right-padded rows, then `steps` teacher-forced decode steps of `kind` ->
    (logits [steps, B, V], cache)."""
    decoder.decode_step_kind = kind
    cache = decoder.new_cache(ids.shape[0], ids.shape[1] + steps, dtype=kv)
    decoder.prefill(cache, input_ids=ids, lengths=lengths)
    out = [decoder.decode_step(ids[:, (7 * t) % ids.shape[1]], cache) for t in range(steps)]
    return torch.stack(out), cache


@pytest.mark.parametrize("variant", ["mha", "gqa", "llama3", "tied"])
def test_fused_step_matches_transformers(hf_llama, variant):
    model, folder = hf_llama(variant)
    decoder = load_decoder(folder)
    assert decoder.decode_step_kind == "fused"
    ids = _prompt(40)
    with torch.no_grad():
        ref = model(ids).logits[0]  # [40, V]
    for kind in ("fused", "unfused"):  # the previous step stays selectable, and right
        decoder.decode_step_kind = kind
        cache = decoder.new_cache(1, 64)
        decoder.prefill(cache, input_ids=ids[:, :32])
        steps = torch.stack([decoder.decode_step(ids[:, t], cache)[0] for t in range(32, 40)])
        assert relative_error(steps, ref[32:]) <= FP32_TOL, kind


def test_fused_greedy_tokens_equal_transformers(hf_llama):
    model, folder = hf_llama("gqa")
    ids = _prompt(20, seed=2)
    assert generate(load_decoder(folder), input_ids=ids, max_new_tokens=64) == hf_greedy(
        model, ids, 64
    )


@pytest.mark.parametrize("quant", [None, "int4"])
@pytest.mark.parametrize("fused_projections", [True, False], ids=["qkv-fused", "q-k-v"])
def test_fused_step_equals_unfused_on_rows_of_different_lengths(hf_llama, quant, fused_projections):
    decoder = load_decoder(hf_llama("gqa")[1], quant=quant, group_size=32)
    if fused_projections:
        assert decoder.fuse_projections()
    ids, lengths = _prompt(17, rows=3, seed=4), [5, 17, 11]
    # an INT4 bundle on a CPU keeps its cache in fp16 under fp32 activations
    kv = torch.float16 if quant else None
    fused, cache_f = _steps(decoder, "fused", ids, lengths, 12, kv)
    unfused, cache_u = _steps(decoder, "unfused", ids, lengths, 12, kv)
    assert relative_error(fused, unfused) <= FP32_TOL
    assert torch.equal(cache_f.lengths, cache_u.lengths)
    # the cache holds the same K/V up to the last bits of the norms feeding the projections
    for i in range(len(decoder.layers)):
        for a, b in zip(cache_f.layer(i), cache_u.layer(i)):
            tol = 2e-3 if kv == torch.float16 else 1e-5
            assert relative_error(a, b) <= tol


def test_each_row_attends_only_its_own_slots(hf_llama):
    decoder = load_decoder(hf_llama("gqa")[1])
    ids, lengths = _prompt(12, rows=2, seed=5), [12, 4]
    cache = decoder.new_cache(2, 30)
    logits = decoder.prefill(cache, input_ids=ids, lengths=lengths)
    for layer in range(len(decoder.layers)):  # the future of row 1: garbage, never read
        for t in cache.layer(layer):
            t[1, :, 5:] = float("nan")
    step = decoder.decode_step(logits.argmax(-1), cache)
    alone = decoder.new_cache(1, 30)
    decoder.prefill(alone, input_ids=ids[1:, :4])
    assert torch.isfinite(step).all()
    assert relative_error(step[1], decoder.decode_step(logits[1:].argmax(-1), alone)[0]) <= FP32_TOL


def test_the_step_kind_comes_from_the_environment(hf_llama, monkeypatch):
    folder = hf_llama("gqa")[1]
    monkeypatch.setenv(DECODE_STEP_ENV, "unfused")
    assert load_decoder(folder).decode_step_kind == "unfused"
    monkeypatch.setenv(DECODE_STEP_ENV, "fast")
    with pytest.raises(ValueError, match="RGPT_DECODE_STEP='fast' is unknown"):
        load_decoder(folder)
    monkeypatch.delenv(DECODE_STEP_ENV)
    decoder = load_decoder(folder)
    decoder.decode_step_kind = "fastest"
    cache = decoder.new_cache(1, 8)
    decoder.prefill(cache, input_ids=_prompt(3))
    with pytest.raises(ValueError, match="decode_step_kind 'fastest' is unknown"):
        decoder.decode_step(torch.tensor([1]), cache)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_the_fused_step_sheds_the_small_torch_ops(hf_llama, record_property):
    """The torch ops a CPU decode step dispatches (the INT4 linears' own included): the fused
    step keeps the linears, the embedding and allocations, and none of the norms', rope's,
    cache writes', attention's or SiLU's small ops."""
    decoder = load_decoder(hf_llama("gqa")[1], quant="int4", group_size=32)
    decoder.fuse_projections()
    counts = {}
    for kind in ("unfused", "fused"):
        decoder.decode_step_kind = kind
        cache = decoder.new_cache(1, 16, dtype=torch.float16)
        decoder.prefill(cache, input_ids=_prompt(5))
        with _CountOps() as mode:
            decoder.decode_step(torch.tensor([3]), cache)
        counts[kind] = mode.ops
    per_layer = {k: len(v) / len(decoder.layers) for k, v in counts.items()}
    record_property("aten_ops_per_layer", per_layer)
    print(f"aten ops per layer of a CPU decode step: {per_layer}")
    for small in (
        "cat",
        "mul",
        "index_put_",
        "_scaled_dot_product_flash_attention_for_cpu",
        "silu",
    ):
        assert small in counts["unfused"] and small not in counts["fused"], small
    assert per_layer["fused"] <= per_layer["unfused"] / 2
