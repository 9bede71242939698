"""The INT4 path of the decoder: quant="int4" swaps exactly q/k/v/o/gate/up/down for
Int4Linear.from_linear(linear, group_size) (RTN); decoder_from_state takes already-quantized
weights; on the dequantized weights the INT4 decoder computes what the fp32 one does."""

from __future__ import annotations

import pytest
import torch
from llama_reference import VOCAB, relative_error
from torch import nn

from rgpt_rt.ops.int4_format import dequantize
from rgpt_rt.runtime import LlamaDecoder, generate
from rgpt_rt.runtime.int4_linear import Int4Linear
from rgpt_rt.runtime.layers import RMSNorm
from rgpt_rt.runtime.loading import decoder_from_state, load_decoder
from rgpt_rt.runtime.model import QUANTIZED_LINEARS


def _compare(fp: LlamaDecoder, q: LlamaDecoder, record_property) -> float:
    """Report the INT4 decoder against the fp32 one: logits relative error, top-1 agreement of
    the next token at 64 teacher-forced positions, and how many of 32 greedy tokens agree before
    the first difference. Returns the logits error."""
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    ref = fp.prefill(fp.new_cache(1, 64), input_ids=ids, all_logits=True)[0]  # [64, V]
    ours = q.prefill(q.new_cache(1, 64), input_ids=ids, all_logits=True)[0]
    error = relative_error(ours, ref)
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    a, b = (
        generate(q, input_ids=ids[0, :8], max_new_tokens=32),
        generate(fp, input_ids=ids[0, :8], max_new_tokens=32),
    )
    greedy = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 32)
    for key, value in (
        ("logits_rel_error", error),
        ("top1_agreement", top1),
        ("greedy_prefix", greedy),
    ):
        record_property(f"int4_{key}", value)
    print(
        f"INT4 vs fp32: logits relative error {error:.4f}, top-1 agreement {top1:.0%}, greedy {greedy}/32 equal"
    )
    return error


def test_int4_replaces_exactly_the_seven_linears(hf_llama, record_property):
    _, folder = hf_llama("gqa")
    fp = load_decoder(folder)
    q = load_decoder(folder, quant="int4", group_size=32)
    for layer in q.layers:
        for name in QUANTIZED_LINEARS:
            part = (
                layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            )
            assert isinstance(getattr(part, name), Int4Linear)
            assert getattr(part, name).group_size == 32
        assert isinstance(layer.input_layernorm, RMSNorm)
    assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, fp.lm_head.weight)
    assert torch.equal(q.embed_tokens.weight, fp.embed_tokens.weight)
    # 4-bit RTN on random weights moves the logits (~0.2), far less than unrelated weights would
    # (~1.4); trained weights fare better.
    assert 0 < _compare(fp, q, record_property) < 0.5


def test_from_state_takes_already_quantized_weights(hf_llama):
    model, folder = hf_llama("gqa")
    quantized = load_decoder(folder, quant="int4", group_size=32)
    tensors = dict(model.state_dict())
    int4_weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, Int4Linear):
            int4_weights[f"model.{name}"] = module.weight_int4
            del tensors[f"model.{name}.weight"]  # a bundle holds no fp copy of these
    loaded = decoder_from_state(quantized.config, tensors, int4_weights=int4_weights)
    ids = torch.arange(10)[None]
    a = quantized.prefill(quantized.new_cache(1, 10), input_ids=ids)
    assert torch.equal(loaded.prefill(loaded.new_cache(1, 10), input_ids=ids), a)
    del tensors["model.layers.0.input_layernorm.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers.0.input_layernorm.weight'\]"):
        decoder_from_state(quantized.config, tensors, int4_weights=int4_weights)


def test_int4_decoder_equals_fp_decoder_on_dequantized_weights(hf_llama, record_property):
    model, folder = hf_llama("gqa")
    fp = load_decoder(folder)
    q = load_decoder(folder, quant="int4", group_size=32)
    # The same model with each quantized linear's weight replaced by dequantize(its Int4Weight).
    tensors = dict(model.state_dict())
    for name, module in q.named_modules():
        if name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
            assert isinstance(module, Int4Linear), name
            weight = module.weight_int4
            tensors[f"model.{name}.weight"] = dequantize(weight).float()
    dequantized = decoder_from_state(q.config, tensors)
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(6))
    ours = q.prefill(q.new_cache(1, 32), input_ids=ids, all_logits=True)
    ref = dequantized.prefill(dequantized.new_cache(1, 32), input_ids=ids, all_logits=True)
    # fp32 activations and accumulation on exactly the dequantized weights: fp32 tolerance.
    assert relative_error(ours, ref) <= 1e-5
    assert 0 < _compare(fp, q, record_property) < 0.5
