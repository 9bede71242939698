#!/usr/bin/env python
"""Osprey's stages on the runtime, each next to its baseline, with random weights of the full
shapes (speed does not depend on the values):

    python benchmarks/osprey_stages.py --device cuda --json out.json     # osprey-7b shapes (a GPU)
    python benchmarks/osprey_stages.py --preset osprey-narrow             # a CPU smoke run

| row | ours | baseline |
| vision (ConvNeXt-L at 512 px + projector, batch 1) | TorchConvNeXtVision (fp16, CUDA graph) | the reference trunk, eager fp16 |
| regions, 1 and 16 masks of 1024² | the family encoder (mask_pool_levels "binary" + stacked linears) | Osprey's MaskExtractor, one mask at a time |
| prefill, INT4 7B | Osprey's prompt (1024 image tokens + 60) | RegionGPT's (576 + 60) on the same decoder |

Rows for scripts/gpu_check.sh beside benchmarks/latency.py's RegionGPT rows: Osprey's 1024
image tokens make the prefill ~1.7x RegionGPT's; the Session-level describe row comes once
stages.py runs the osprey family (docs/osprey.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, device: str, runs: int) -> float:
    """Median ms of `runs` calls after 3 warm-up calls, synchronised."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="osprey-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--llm-layers", type=int, help="decoder depth (default: the preset's)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from rgpt_rt.config import RGPTConfig
    from rgpt_rt.export.osprey_source import OspreyVisionSide
    from rgpt_rt.export.synthetic import llama_tensors
    from rgpt_rt.export.synthetic_osprey import osprey_hf_config
    from rgpt_rt.model.osprey import MaskExtractor
    from rgpt_rt.runtime.families import region_family
    from rgpt_rt.runtime.loading import decoder_from_state
    from rgpt_rt.runtime.vision import TorchConvNeXtVision

    torch.manual_seed(0)
    device, half = torch.device(args.device), torch.float16
    config = RGPTConfig.from_preset(args.preset)
    if args.llm_layers:
        config.llm.num_layers = args.llm_layers
    size, rows = config.vision.image_size, {}
    pixels = torch.randn(1, 3, size, size, device=device)

    # vision (the side also carries the MaskExtractor's weights into connector tensors)
    me = config.mask_extractor
    extractor = MaskExtractor(
        config.convnext.dims, me.embed_dim, config.llm.hidden_size, me.mask_size
    ).eval()
    side = OspreyVisionSide(config, extractor.state_dict()).eval()
    side.prepare_for_export()
    tensors = side.bundle_tensors()
    vision = TorchConvNeXtVision(config, device, tensors["vision"])
    dtype = half if device.type == "cuda" else torch.float32
    eager = OspreyVisionSide(config).eval().to(device, dtype)
    rows["vision_ms"] = (
        timed(lambda: vision(pixels), args.device, args.runs),
        timed(lambda: eager(pixels.to(dtype)), args.device, args.runs),
    )
    _, levels = vision(pixels)

    # regions
    family = region_family(config)
    me = config.mask_extractor
    weights = {f"connector.{k}": v.to(device, dtype) for k, v in tensors["connector"].items()}
    extractor = MaskExtractor(
        config.convnext.dims, me.embed_dim, config.llm.hidden_size, me.mask_size
    )
    extractor = extractor.to(device, dtype).eval()
    nchw = [level[0].permute(2, 0, 1) for level in levels]
    for count in (1, 16):
        masks = torch.zeros(count, 1024, 1024, dtype=torch.bool, device=device)
        for n in range(count):
            masks[n, 40 * n : 40 * n + 300, 50 + 30 * n : 400 + 30 * n] = True

        def reference(masks=masks):  # Osprey: one mask per call, as its forward loops
            return [extractor(nchw, masks[n : n + 1].to(dtype)) for n in range(masks.shape[0])]

        rows[f"regions_{count}_ms"] = (
            timed(
                lambda masks=masks: family.encode(levels, masks, weights), args.device, args.runs
            ),
            timed(reference, args.device, args.runs),
        )

    # prefill: Osprey's prompt against RegionGPT's, on one INT4 decoder
    state = {
        name: torch.randn(shape, dtype=half, device=device).mul_(0.02)
        for name, shape in llama_tensors(osprey_hf_config(config))
    }
    decoder = decoder_from_state(
        config.llm, state, dtype=dtype, quant="int4", group_size=128 if config.llm.hidden_size % 128 == 0 else 32,
        device=device,
    )  # fmt: skip
    del state
    decoder.fuse_projections()
    text = 60

    def prefill(length: int):
        embeds = torch.randn(1, length, config.llm.hidden_size, device=device, dtype=dtype)

        def run():
            decoder.prefill(decoder.new_cache(1, length + 1), inputs_embeds=embeds)

        return run

    rows["prefill_ms"] = (
        timed(prefill(config.num_image_tokens + text), args.device, args.runs),
        timed(prefill(576 + text), args.device, args.runs),
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## Osprey stages — {args.preset}, random weights, {name}\n")
    print("| stage | rgpt_rt (ms) | baseline (ms) | baseline |")
    print("|---|---:|---:|---|")
    baselines = {
        "vision_ms": "reference trunk + projector, eager",
        "regions_1_ms": "Osprey's MaskExtractor, per mask",
        "regions_16_ms": "Osprey's MaskExtractor, per mask",
        "prefill_ms": f"RegionGPT's prompt ({576 + text} tokens), same decoder",
    }
    for key, (ours, base) in rows.items():
        print(f"| {key} | {ours:.2f} | {base:.2f} | {baselines[key]} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "preset": args.preset, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
