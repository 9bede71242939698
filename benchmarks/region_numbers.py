"""What region numbers and region positions add to a question: `add_region_numbers` and
`add_region_positions` (F = 4, a random projection: the shipped model has none) on one
question's region embeddings and prepared masks, beside the regions stage they join (mask
pooling + connector) and the whole `Session.refer`, on the embedded default model (CPU).

    python benchmarks/region_numbers.py [--threads 1] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

from rgpt_rt.ops import add_region_positions
from rgpt_rt.runtime.preprocess import prepare_masks
from rgpt_rt.runtime.session import Session
from rgpt_rt.training.data.tasks import ShapesWorld

POSITION_FREQUENCIES = 4  # what runs wA and wB used (MODEL_CARD.md)


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    session = Session(device="cpu")
    world = ShapesWorld(image_size=96, seed=20261127)
    sample = next(s for i in range(50) if len((s := world.task_sample(i, "refer")).masks) == 5)
    stats: dict = {}
    stages = session.stages
    seen = stages.see(sample.image, stats)
    embeds = stages.regions(seen, sample.masks, stats)  # [5, 1, D]
    regions = median_us(lambda: stages.regions(seen, sample.masks, {}), args.repeats)
    numbers = median_us(lambda: stages.numbered(embeds), args.repeats)
    prepared = prepare_masks(list(sample.masks), seen.frame)  # what the regions stage pools
    embeds = embeds[:, 0]  # [5, D]
    projection = torch.randn(embeds.shape[1], 4 * POSITION_FREQUENCIES)
    positions = median_us(lambda: add_region_positions(embeds, prepared, projection), args.repeats)
    expression = "the red star"
    refer = median_us(lambda: session.refer(sample.image, expression, sample.masks), 50)
    print(f"5 regions, {args.threads} thread(s), median of {args.repeats}:")
    print("| step | µs |\n|---|---:|")
    print(f"| add_region_numbers ([5, 256]) | {numbers:.1f} |")
    side = "x".join(map(str, prepared.shape[1:]))
    print(f"| add_region_positions ([5, 256], {side} masks, F=4) | {positions:.1f} |")
    print(f"| regions stage (mask pooling + connector) | {regions:.1f} |")
    print(f"| Session.refer, whole (vision cached; median of 50) | {refer:.1f} |")


if __name__ == "__main__":
    main()
