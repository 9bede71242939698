"""The INT4 path of the decoder: quant="int4" swaps exactly q/k/v/o/gate/up/down for
rgpt_rt.quant.Int4Linear.from_linear(linear, group_size); from_state takes already-quantized
weights. The plumbing runs against a stand-in with the agreed interface (RTN, w = (q - z)·s, as
DESIGN.md §2); the accuracy of the real Int4Linear is measured when rgpt_rt.quant exists."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from llama_reference import VOCAB, relative_error
from torch import nn

from rgpt_rt.runtime import LlamaDecoder, generate
from rgpt_rt.runtime.decoder import QUANTIZED_LINEARS, RMSNorm

HAVE_QUANT = importlib.util.find_spec("rgpt_rt.quant") is not None


@dataclass
class StandInWeight:
    q: torch.Tensor  # [N, K] codes 0..15
    scale: torch.Tensor  # [N, K / g]
    zero: torch.Tensor  # [N, K / g]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        return (self.q - self.zero.repeat_interleave(g, 1)) * self.scale.repeat_interleave(g, 1)


class StandInInt4Linear(nn.Module):
    def __init__(self, weight: StandInWeight):
        super().__init__()
        self.weight4 = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> StandInInt4Linear:
        w = linear.weight.detach().float()  # [N, K]
        groups = w.reshape(w.shape[0], -1, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zero = (-lo / scale).round()
        q = (groups / scale[..., None] + zero[..., None]).round().clamp(0, 15).reshape(w.shape)
        return cls(StandInWeight(q, scale, zero, group_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        return x @ self.weight4.dequantize().to(x.dtype).T


@pytest.fixture
def stand_in_quant(monkeypatch):
    module = types.ModuleType("rgpt_rt.quant")
    module.Int4Linear = StandInInt4Linear
    monkeypatch.setitem(sys.modules, "rgpt_rt.quant", module)


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


def test_int4_replaces_exactly_the_seven_linears(hf_llama, stand_in_quant, record_property):
    _, folder = hf_llama("gqa")
    fp = LlamaDecoder.from_pretrained(folder)
    q = LlamaDecoder.from_pretrained(folder, quant="int4", group_size=16)
    for layer in q.layers:
        for name in QUANTIZED_LINEARS:
            part = (
                layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            )
            assert isinstance(getattr(part, name), StandInInt4Linear)
            assert getattr(part, name).weight4.group_size == 16
        assert isinstance(layer.input_layernorm, RMSNorm)
    assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, fp.lm_head.weight)
    assert torch.equal(q.embed_tokens.weight, fp.embed_tokens.weight)
    # 4-bit RTN on random weights moves the logits (~0.2), far less than unrelated weights would
    # (~1.4); trained weights fare better.
    assert 0 < _compare(fp, q, record_property) < 0.5


def test_from_state_takes_already_quantized_weights(hf_llama, stand_in_quant):
    model, folder = hf_llama("gqa")
    quantized = LlamaDecoder.from_pretrained(folder, quant="int4", group_size=16)
    tensors = dict(model.state_dict())
    int4_weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, StandInInt4Linear):
            int4_weights[f"model.{name}"] = module.weight4
            del tensors[f"model.{name}.weight"]  # a bundle holds no fp copy of these
    loaded = LlamaDecoder.from_state(quantized.config, tensors, int4_weights=int4_weights)
    ids = torch.arange(10)[None]
    a = quantized.prefill(quantized.new_cache(1, 10), input_ids=ids)
    assert torch.equal(loaded.prefill(loaded.new_cache(1, 10), input_ids=ids), a)
    del tensors["model.layers.0.input_layernorm.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers.0.input_layernorm.weight'\]"):
        LlamaDecoder.from_state(quantized.config, tensors, int4_weights=int4_weights)


@pytest.mark.skipif(not HAVE_QUANT, reason="rgpt_rt.quant (the INT4 half of issue 5) is not merged")
def test_int4_decoder_equals_fp_decoder_on_dequantized_weights(hf_llama, record_property):
    from rgpt_rt.quant import Int4Linear, dequantize

    model, folder = hf_llama("gqa")
    fp = LlamaDecoder.from_pretrained(folder)
    q = LlamaDecoder.from_pretrained(folder, quant="int4", group_size=32)
    # The same model with each quantized linear's weight replaced by dequantize(its Int4Weight).
    tensors = dict(model.state_dict())
    for name, module in q.named_modules():
        if name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
            assert isinstance(module, Int4Linear), name
            weight = module.weight_int4
            tensors[f"model.{name}.weight"] = dequantize(weight).float()
    dequantized = LlamaDecoder.from_state(q.config, tensors)
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(6))
    ours = q.prefill(q.new_cache(1, 32), input_ids=ids, all_logits=True)
    ref = dequantized.prefill(dequantized.new_cache(1, 32), input_ids=ids, all_logits=True)
    # fp32 activations and accumulation on exactly the dequantized weights: fp32 tolerance.
    assert relative_error(ours, ref) <= 1e-5
    assert 0 < _compare(fp, q, record_property) < 0.5
