"""Starting points for the referring probes (rgpt_rt/assets/MODEL_CARD.md): a checkpoint changed
in one way, written to a new folder for `python -m rgpt_rt.train --init`. Each tests one
guess at why a phrase is not matched to a region:

    scale-words      the input word embeddings times --factor (their norms are ~0.3 against
                     ~27 for region embeddings)
    align-words      each attribute word's input embedding set to the centred mean region
                     embedding of the regions with that value, at norm --norm ("star" points
                     where star regions do)
    scale-connector  the connector's output (image and region embeddings) times --factor, so
                     that what the layers add at a region token is not drowned by it
    grow             the decoder grown without changing what it computes: its KV heads copied
                     (--kv-heads) and new layers (N in --order) whose output projections are
                     zero; e.g. --order 0,1,N,2,N,3
    number-regions   a table of --numbers region-number vectors in the connector
                     (connector.region_numbers), row K-1 started at the input word embedding
                     of the digit K: <regionK>'s embedding says "K" as well as what it shows
    position-regions a projection of each mask's centroid (connector.region_positions =
                     --frequencies), started at --factor times the least-squares map from the
                     centroid features to the centred region embeddings: at first it adds
                     that much again of what the embedding says about where the region is

    python scripts/init_variants.py grow --init runs/d/final --out runs/g6init --order 0,1,N,2,N,3
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import torch

from rgpt_rt.data.samples import collate
from rgpt_rt.data.shapes import ATTRIBUTES
from rgpt_rt.data.tasks import ShapesWorld
from rgpt_rt.model.rgpt import RGPT
from rgpt_rt.ops.region_positions import mask_centroids, position_features

ALIGN_SEED = 7  # neither training's seed (0) nor the held-out one (1)
ALIGN_REGIONS = 1500


def scale_words(model: RGPT, args) -> RGPT:
    with torch.no_grad():
        model.llm.get_input_embeddings().weight.mul_(args.factor)
    return model


def region_embeddings(model: RGPT, count: int) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Region embeddings of `count` one-region samples and each region's attribute values."""
    world = ShapesWorld(model.config.vision.image_size, seed=ALIGN_SEED)
    samples = [world.task_sample(i, "brief") for i in range(count)]
    found, values = [], []
    with torch.no_grad():
        for start in range(0, count, 100):
            chunk = samples[start : start + 100]
            batch = collate(chunk, model.config, model.tokenizer, model.pad_token_id)
            _, hires = model.encode_image(batch.pixel_values)
            found.append(model.encode_regions(hires, batch.masks, batch.batch_index))
            values += [{key: s.turns[0].truth[key] for key in ATTRIBUTES} for s in chunk]
    return torch.cat(found), values


def align_words(model: RGPT, args) -> RGPT:
    embeds, values = region_embeddings(model.eval(), ALIGN_REGIONS)
    rows = defaultdict(list)  # word -> the regions it describes ("top left": top and left)
    for row, value in enumerate(values):
        for key, text in value.items():
            for word in text.split() if key == "position" else [text]:
                rows[word].append(row)
    centred = embeds - embeds.mean(dim=0)
    weight = model.llm.get_input_embeddings().weight
    with torch.no_grad():
        for word, picked in sorted(rows.items()):
            token = model.tokenizer.token_to_id("Ġ" + word)  # the word after a space
            if token is None:
                raise SystemExit(f"the tokenizer has no token for {word!r}")
            direction = centred[picked].mean(dim=0)
            weight[token] = direction / direction.norm() * args.norm
    return model


def scale_connector(model: RGPT, args) -> RGPT:
    with torch.no_grad():
        model.connector.fc2.weight.mul_(args.factor)
        model.connector.fc2.bias.mul_(args.factor)
    return model


def grow(model: RGPT, args) -> RGPT:
    old = model.config.llm
    order = [None if item == "N" else int(item) for item in args.order.split(",")]
    if args.kv_heads % old.num_kv_heads:
        raise SystemExit(f"--kv-heads must be a multiple of {old.num_kv_heads}")
    llm = dataclasses.replace(old, num_layers=len(order), num_kv_heads=args.kv_heads)
    config = dataclasses.replace(model.config, llm=llm)
    torch.manual_seed(0)
    grown = RGPT(config, model.tokenizer)
    for part in ("vision", "refinement", "connector"):
        getattr(grown, part).load_state_dict(getattr(model, part).state_dict())
    source, target = model.llm.model, grown.llm.model
    target.embed_tokens.load_state_dict(source.embed_tokens.state_dict())
    target.norm.load_state_dict(source.norm.state_dict())
    grown.llm.lm_head.load_state_dict(model.llm.lm_head.state_dict())
    copies = args.kv_heads // old.num_kv_heads

    def repeat_heads(weight: torch.Tensor) -> torch.Tensor:  # each KV head `copies` times in a row
        heads = weight.view(old.num_kv_heads, 1, old.head_dim, -1)
        return heads.expand(-1, copies, -1, -1).reshape(args.kv_heads * old.head_dim, -1)

    with torch.no_grad():
        for layer, picked in zip(target.layers, order):
            if picked is None:  # a new layer adds nothing until it is trained
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            old_layer = source.layers[picked]
            for name in ("q_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.copy_(
                    getattr(old_layer.self_attn, name).weight
                )
            for name in ("k_proj", "v_proj"):
                weight = getattr(old_layer.self_attn, name).weight
                getattr(layer.self_attn, name).weight.copy_(repeat_heads(weight))
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).load_state_dict(getattr(old_layer, name).state_dict())
    return grown


def with_connector_part(model: RGPT, part: str, refusal: str, **connector) -> RGPT:
    """`model` with the connector fields `connector` changed, which add the parameter `part`
    (every other weight kept, shared with `model`); refused with `refusal` when it has `part`."""
    config = dataclasses.replace(
        model.config, connector=dataclasses.replace(model.config.connector, **connector)
    )
    changed = RGPT(config, model.tokenizer, vision=model.vision, llm=model.llm)
    changed.refinement.load_state_dict(model.refinement.state_dict())
    missing, _ = changed.connector.load_state_dict(model.connector.state_dict(), strict=False)
    if missing != [part]:
        raise SystemExit(refusal)
    return changed


def number_regions(model: RGPT, args) -> RGPT:
    if not 1 <= args.numbers <= 9:
        raise SystemExit("--numbers must be 1-9: row K-1 starts at the digit K's embedding")
    refusal = f"{args.init} already numbers its regions"
    numbered = with_connector_part(model, "region_number", refusal, region_numbers=args.numbers)
    digits = [model.tokenizer.token_to_id(str(k)) for k in range(1, args.numbers + 1)]
    with torch.no_grad():
        numbered.connector.region_number.copy_(model.llm.get_input_embeddings().weight[digits])
    return numbered


def position_regions(model: RGPT, args) -> RGPT:
    if not 1 <= args.frequencies <= 16:
        raise SystemExit("--frequencies must be 1-16")
    refusal = f"{args.init} already projects its regions' positions"
    placed = with_connector_part(
        model, "region_position.weight", refusal, region_positions=args.frequencies
    )
    world = ShapesWorld(model.config.vision.image_size, seed=ALIGN_SEED)
    samples = [world.task_sample(i, "brief") for i in range(ALIGN_REGIONS)]
    embeds, features = [], []
    with torch.no_grad():
        for start in range(0, len(samples), 100):
            chunk = samples[start : start + 100]
            batch = collate(chunk, model.config, model.tokenizer, model.pad_token_id)
            _, hires = model.encode_image(batch.pixel_values)
            embeds.append(model.encode_regions(hires, batch.masks, batch.batch_index))
            centroids = mask_centroids(batch.masks)
            features.append(position_features(centroids, args.frequencies))
        embeds, features = torch.cat(embeds), torch.cat(features)
        fit = torch.linalg.lstsq(features, embeds - embeds.mean(dim=0)).solution  # [4F, D]
        placed.connector.region_position.weight.copy_(args.factor * fit.T)
    return placed


VARIANTS = {
    "scale-words": scale_words,
    "align-words": align_words,
    "scale-connector": scale_connector,
    "grow": grow,
    "number-regions": number_regions,
    "position-regions": position_regions,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--init", required=True, help="the checkpoint to start from")
    parser.add_argument("--out", required=True, help="a new folder for the changed checkpoint")
    parser.add_argument("--factor", type=float, default=1.0)
    parser.add_argument("--norm", type=float, default=4.0)
    parser.add_argument("--order", default="0,1,N,2,N,3")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--numbers", type=int, default=9)
    parser.add_argument("--frequencies", type=int, default=4)
    args = parser.parse_args()
    model = VARIANTS[args.variant](RGPT.from_pretrained(args.init), args)
    model.save_pretrained(args.out)
    print(f"{args.variant}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
