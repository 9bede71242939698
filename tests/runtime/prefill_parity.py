"""The last position's logits of one question, computed by the reference model and by a
Session's own stages (vision, regions, tokens, prefill): the tests hold the two together."""

import torch

from rgpt_rt.prompts import Conversation


def reference_logits(reference, image, masks, question):
    """[V] from RGPT's stages; also the prepared inputs (their input_ids)."""
    prepared = reference.prepare(image, masks, question)
    with torch.no_grad():
        image_embeds, hires = reference.encode_image(prepared.pixel_values)
        regions = reference.encode_regions(hires, prepared.masks)[prepared.region_index]
        embeds = reference.build_inputs_embeds(prepared.input_ids, image_embeds, regions)
        return reference.llm(inputs_embeds=embeds).logits[0, -1], prepared


def session_logits(session, image, masks, question):
    """[V] from the Session's stages, and the token ids it prefilled."""
    stats = {}
    frame, image_embeds, hires = session._see(image, stats)
    region_embeds = session._numbered(session._regions(hires, masks, frame, stats))
    ids, order = session._tokenize(Conversation.single(question), len(masks))
    cache, logits = session._prefill(
        frame, image_embeds, ids, [region_embeds[order]], session._params(4, 0.0), stats
    )
    session._release(cache)
    return logits[0], ids
