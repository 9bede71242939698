"""The runtime's Osprey pieces (vision backends, region encoder, prompt, splicing, the bundle's
decoder) against the reference model on the narrow twin: fp32 logits within 1e-4, greedy
tokens equal. Until stages.py calls the family interface, the pipeline is assembled here
from the same pieces a Session uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.prompts import Conversation, tokenize_conversation
from rgpt_rt.runtime.families import region_family, splice_embeddings
from rgpt_rt.runtime.families.osprey import binary_pool_levels, binary_pool_torch
from rgpt_rt.runtime.generate import generate
from rgpt_rt.runtime.loading import load_bundle_decoder
from rgpt_rt.runtime.vision import select_vision_backend
from rgpt_rt.safetensors_io import read_tensors
from rgpt_rt.tokenizer import load_tokenizer

# the narrow Osprey bundle these use takes ~10 s to build on 2 cores
pytestmark = pytest.mark.slow

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


def test_prompt_is_ospreys_demo_prompt(osprey_bundle):
    # osprey_v1 (SeparatorStyle.TWO, sep " "): system + " USER: " + message + " ASSISTANT:",
    # the message being the demo's begin_str + question with <mask><pos>
    config = verify_bundle(osprey_bundle).config
    family = region_family(config)
    question = family.describe_prompt(detailed=False)
    text = Conversation.single(question, template=family.template).render(config.tokens)[0]
    assert text == (
        f"{SYSTEM} USER: <image>\n\nThis provides an overview of the picture.\n"
        "Please give me a short description of <mask><pos>. Using a short phrase. ASSISTANT:"
    ).replace("<mask><pos>", "<region1>")
    assert family.describe_prompt(True) == "Can you give me a detailed description of <region1>?"


def test_binary_pooling_op_matches_plain_torch():
    levels = [torch.randn(1, s, s, c) for s, c in ((128, 16), (64, 32), (32, 64), (16, 128))]
    masks = torch.zeros(3, 300, 450, dtype=torch.bool)
    masks[0, 10:200, 30:90] = True
    masks[1, :, 225] = True
    masks[2, 299, 449] = True
    torch_side = torch.cat([binary_pool_torch(level, masks) for level in levels], dim=1)
    torch.testing.assert_close(binary_pool_levels(levels, masks), torch_side, rtol=1e-5, atol=1e-6)


def runtime_inputs(bundle, backend, image, masks, question):
    manifest = verify_bundle(bundle)
    config, device = manifest.config, torch.device("cpu")
    family = region_family(config)
    tokenizer = load_tokenizer(bundle)
    vision = select_vision_backend(bundle, manifest, device, prefer=backend)
    decoder = load_bundle_decoder(bundle, config.llm, torch.float32, device)
    frame = family.prepare_image(image, max_side=2048)
    image_embeds, levels = vision(frame.pixel_values)
    weights = {
        f"connector.{k}": v.float()
        for k, v in read_tensors(bundle / "connector.safetensors", "cpu").items()
    }
    regions = family.encode(levels, family.prepare_masks(masks, frame), weights)  # [N, 2, D]
    tokens = tokenize_conversation(
        tokenizer,
        Conversation.single(question, template=family.template),
        num_regions=len(masks),
        num_image_tokens=config.num_image_tokens,
        tokens=config.tokens,
    )
    ids = torch.tensor([tokens.input_ids])
    embeds = splice_embeddings(
        decoder.embed, ids, tokenizer.token_to_id("<image>"), image_embeds,
        family.slot_ids(tokenizer), regions[torch.tensor(tokens.region_order)],
    )  # fmt: skip
    return decoder, ids, embeds, tokenizer


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_logits_and_greedy_tokens_match_the_reference(osprey_bundle, reference, backend):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    first = np.zeros((300, 420), bool)
    first[40:200, 50:180] = True
    second = np.zeros((300, 420), bool)
    second[250:290, 300:410] = True
    question = "What is <region2> next to <region1>? And <region2>?"
    decoder, ids, embeds, tokenizer = runtime_inputs(
        osprey_bundle, backend, image, [first, second], question
    )
    prepared = reference.prepare(image, [first, second], question)
    assert ids.tolist() == prepared.input_ids.tolist()
    cache = decoder.new_cache(1, ids.shape[1] + 16)
    logits = decoder.prefill(cache, inputs_embeds=embeds)  # [1, V] at the last token
    with torch.no_grad():
        expected = reference(
            prepared.pixel_values, prepared.input_ids, prepared.masks, prepared.region_index
        )[:, -1]
    # fp32 on both sides, the same bf16 LLM weights and fp16-rounded vision weights: what is
    # left is summation order (ONNX Runtime's convolutions, the decoder's fused projections)
    assert (logits - expected).abs().max().item() <= 1e-4
    eos = tokenizer.token_to_id("</s>")
    ours = generate(decoder, inputs_embeds=embeds, max_new_tokens=12, eos_token_id=eos)
    theirs = reference.answer_ids(prepared, max_new_tokens=12)
    assert ours[: len(theirs)] == theirs and len(theirs) > 0
