"""Referring with its attention told (rgpt_rt/assets/MODEL_CARD.md): train as
`python -m rgpt_rt.train` does, plus a loss that makes head --head of the decoder layers
--layers, at the position that predicts a referring answer, attend to the target region's
token (-log of its attention weight, times --weight; no-match questions add nothing). If the
model cannot pick the region with the phrase even when told where to look, no curriculum of
answers alone will teach it. `--measure CHECKPOINT` prints, per layer, how often head --head
attends most to the target among the region tokens of held-out referring questions.

    python scripts/attention_probe.py --out runs/at --init runs/d/final --freeze-vision \\
        --seed 2 --lr 5e-4 --warmup-steps 50 --steps 1000 --phases refer,colour,classify,brief \\
        --curriculum 1000 --eval-every 250 --eval-per-task 64
    python scripts/attention_probe.py --measure runs/at/final
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import rgpt_rt.train as train
from rgpt_rt.data.samples import Batch, collate
from rgpt_rt.data.tasks import ShapesWorld
from rgpt_rt.eval import EVAL_SEED
from rgpt_rt.model.rgpt import RGPT, RGPTOutput


def attention_targets(samples, batch: Batch, region_token_id: int) -> torch.Tensor:
    """[B, 2]: (the position that predicts the answer, the target region's token) of each
    referring question with a target; (-1, -1) for every other sample."""
    targets = torch.full((len(samples), 2), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        turn = sample.turns[0]
        if turn.task != "refer" or turn.truth["target"] is None:
            continue
        regions = (batch.input_ids[row] == region_token_id).nonzero().flatten()
        first_answer = (batch.labels[row] != -100).nonzero().flatten()[0]
        targets[row, 0] = first_answer - 1
        targets[row, 1] = regions[turn.truth["target"]]
    return targets


def attentions(model: RGPT, batch: Batch, labels: bool):
    """The decoder's output with every layer's attention weights (eager attention)."""
    model.llm.config._attn_implementation = "eager"
    embeds = model.inputs_embeds(
        batch.pixel_values, batch.input_ids, batch.masks, batch.batch_index, batch.region_index
    )
    return model.llm(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        labels=batch.labels if labels else None,
        use_cache=False,
        output_attentions=True,
    )


def patch_trainer(layers: list[int], head: int, weight: float) -> None:
    """The trainer's batches carry the targets; its loss gains the attention term."""

    class TrainingBatch:  # what the loop calls: model(**batch.to(device).model_inputs())
        def __init__(self, batch: Batch, targets: torch.Tensor):
            self.batch, self.targets = batch, targets

        def to(self, device) -> TrainingBatch:
            return TrainingBatch(self.batch.to(device), self.targets.to(device))

        def model_inputs(self) -> dict:
            return {"batch": self.batch, "targets": self.targets}

    def batch_with_targets(self, step: int, micro: int) -> TrainingBatch:
        samples = self.data.micro_batch(step, micro)
        batch = collate(samples, self.config, self.tokenizer, self.pad_token_id)
        region_id = self.tokenizer.token_to_id(self.config.tokens.region)
        return TrainingBatch(batch, attention_targets(samples, batch, region_id))

    def loss(model: RGPT, batch: Batch, targets: torch.Tensor) -> RGPTOutput:
        out = attentions(model, batch, labels=True)
        rows = (targets[:, 0] >= 0).nonzero().flatten()
        total = out.loss
        if len(rows):
            query, key = targets[rows].unbind(dim=1)
            for layer in layers:
                told = out.attentions[layer][rows, head, query, key]
                total = total - weight * torch.log(told + 1e-6).mean() / len(layers)
        return RGPTOutput(logits=out.logits, loss=total)

    forward = RGPT.forward

    def forward_or_loss(model, *args, batch: Batch | None = None, targets=None, **kwargs):
        if batch is None:  # evaluation
            return forward(model, *args, **kwargs)
        return loss(model, batch, targets)

    train.CollatedBatches.__call__ = batch_with_targets
    RGPT.forward = forward_or_loss


@torch.no_grad()
def measure(checkpoint: str, head: int, count: int = 128) -> None:
    model = RGPT.from_pretrained(checkpoint).eval()
    world = ShapesWorld(model.config.vision.image_size, seed=EVAL_SEED)
    samples = [world.task_sample(i, "refer") for i in range(2 * count)]
    samples = [s for s in samples if s.turns[0].truth["target"] is not None][:count]
    region_id = model.tokenizer.token_to_id(model.config.tokens.region)
    picked = np.zeros((model.config.llm.num_layers, len(samples)), dtype=bool)
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        batch = collate(chunk, model.config, model.tokenizer, model.pad_token_id)
        out = attentions(model, batch, labels=False)
        targets = attention_targets(chunk, batch, region_id)
        for row, (query, _) in enumerate(targets.tolist()):
            regions = (batch.input_ids[row] == region_id).nonzero().flatten()
            for layer, weights in enumerate(out.attentions):
                best = int(weights[row, head, query, regions].argmax())
                picked[layer, start + row] = best == chunk[row].turns[0].truth["target"]
    print(f"head {head}: how often the target gets the most attention among the region tokens")
    for layer, right in enumerate(picked):
        print(f"  layer {layer}: {right.mean():.0%} of {len(samples)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,3")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--measure", metavar="CHECKPOINT")
    args, rest = parser.parse_known_args(argv)
    if args.measure:
        measure(args.measure, args.head)
        return 0
    patch_trainer([int(x) for x in args.layers.split(",")], args.head, args.weight)
    return train.main([*rest, "--data-workers", "0"])  # the patch lives in this process only


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
