"""LlamaDecoder.fuse_projections: q/k/v -> qkv_proj and gate/up -> gate_up_proj give the same
logits and the same greedy tokens as the unfused decoder, in fp32 and INT4, and the bundle's
decoder (what the Session runs) is fused."""

from __future__ import annotations

import pytest
import torch
from llama_reference import VOCAB

from rgpt_rt.runtime import LlamaDecoder, generate
from rgpt_rt.runtime.int4_linear import Int4Linear
from rgpt_rt.runtime.loading import load_decoder


def logits_of(decoder: LlamaDecoder, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill logits of every token, then the logits of 4 decode steps."""
    cache = decoder.new_cache(ids.shape[0], 64)
    prefill = decoder.prefill(cache, input_ids=ids, all_logits=True)
    steps, token = [], prefill[:, -1].argmax(-1)
    for _ in range(4):
        steps.append(decoder.decode_step(token, cache))
        token = steps[-1].argmax(-1)
    return prefill, steps


@pytest.mark.parametrize("variant", ["gqa", "mha"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_fused_decoder_computes_what_the_unfused_one_does(hf_llama, variant, quant):
    _, folder = hf_llama(variant)
    plain = load_decoder(folder, quant=quant, group_size=32)
    fused = load_decoder(folder, quant=quant, group_size=32)
    assert fused.fuse_projections()
    assert fused.fuse_projections()  # a second call changes nothing
    for layer in fused.layers:
        names = (
            {name for name, _ in layer.named_children()}
            | {f"self_attn.{n}" for n, _ in layer.self_attn.named_children()}
            | {f"mlp.{n}" for n, _ in layer.mlp.named_children()}
        )
        assert {
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        } <= names
        assert not {"self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"} & names
        kind = Int4Linear if quant else torch.nn.Linear
        assert type(layer.self_attn.qkv_proj) is kind and type(layer.mlp.gate_up_proj) is kind
    assert fused.weight_bytes() == plain.weight_bytes()

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    (prefill_a, steps_a), (prefill_b, steps_b) = logits_of(plain, ids), logits_of(fused, ids)
    # the same products, summed in another blocking at most
    torch.testing.assert_close(prefill_b, prefill_a, rtol=0, atol=1e-5)
    for a, b in zip(steps_a, steps_b):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    prompt = ids[0].tolist()
    assert generate(fused, input_ids=prompt, max_new_tokens=12) == generate(
        plain, input_ids=prompt, max_new_tokens=12
    )


def test_int4_concat_is_the_outputs_side_by_side():
    torch.manual_seed(0)
    parts = [torch.nn.Linear(256, n, bias=b) for n, b in ((96, False), (32, True), (160, False))]
    layers = [Int4Linear.from_linear(p, group_size=64) for p in parts]
    fused = Int4Linear.concat(layers)
    assert (fused.out_features, fused.in_features, fused.group_size) == (288, 256, 64)
    x = torch.randn(3, 5, 256)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    assert torch.equal(fused(x), expected)  # rows are independent: bit for bit
    with pytest.raises(ValueError, match="same K and group size"):
        Int4Linear.concat([layers[0], Int4Linear.from_linear(torch.nn.Linear(256, 8), 128)])


def test_the_sessions_decoder_is_fused(tiny_bundle):
    from rgpt_rt.runtime.session import Session

    decoder = Session(tiny_bundle, device="cpu").decoder
    assert all(layer.self_attn.qkv_proj is not None for layer in decoder.layers)
    assert all(layer.mlp.gate_up_proj is not None for layer in decoder.layers)
