"""The last position's logits of one question, computed by the reference model and by a
Session's own stages (vision, regions, tokens, prefill): the tests hold the two together."""

import torch

from rgpt_rt.prompts import Conversation
from rgpt_rt.runtime import SamplingParams


@torch.no_grad()
def as_the_bundle_stores(reference):
    """The reference model with its vision side (CLIP, refinement, connector) rounded to fp16,
    as a bundle stores it: the Session's vision then computes the same function."""
    for part in (reference.vision, reference.refinement, reference.connector):
        for parameter in part.parameters():
            parameter.copy_(parameter.half().float())
    return reference


def reference_logits(reference, image, masks, question):
    """[V] from RGPT's stages; also the prepared inputs (their input_ids). Round the reference's
    vision side first (as_the_bundle_stores) to compare it with a Session."""
    prepared = reference.prepare(image, masks, question)
    with torch.no_grad():
        image_embeds, hires = reference.encode_image(prepared.pixel_values)
        regions = reference.encode_regions(hires, prepared.masks)[prepared.region_index]
        embeds = reference.build_inputs_embeds(prepared.input_ids, image_embeds, regions)
        return reference.llm(inputs_embeds=embeds).logits[0, -1], prepared


def session_logits(session, image, masks, question):
    """[V] from the Session's stages, and the token ids it prefilled."""
    stats, stages = {}, session.stages
    seen = stages.see(image, stats)
    region_embeds = stages.numbered(stages.regions(seen, masks, stats))
    ids, order = stages.tokenize(Conversation.single(question), len(masks))
    params = SamplingParams(max_new_tokens=4, eos_token_id=stages.eos_id)
    cache, logits = stages.prefill(seen, ids, [region_embeds[order]], params, stats)
    stages.release(cache)
    return logits[0], ids
