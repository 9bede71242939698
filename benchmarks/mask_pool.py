"""Mask pooling: rgpt_rt.ops.mask_pool against the naive torch way, next to the floor.

    python benchmarks/mask_pool.py --device cpu  [--json FILE]
    python benchmarks/mask_pool.py --device cuda [--json FILE]     (scripts/gpu_check.sh)

Shapes: a 96x96x1024 fp16 map (ViT-L/14-336 refined 4x) and 16 masks of 1024x1024 or
336x336, in both modes, with two mask contents: "regions" (ellipses and boxes covering 1-50%
of the image, as region prompts do) and "full" (every pixel set: nothing can be skipped).

- torch: the naive way. Every mask to fp32, weights by F.interpolate (bilinear) or by the
  fractional-edge overlap matrices (area: rows @ mask @ cols^T), normalised, then one
  matmul with the map in fp32.
- floor: mask bytes + feature bytes, each read once, over the copy bandwidth measured in
  this run (bytes read + bytes written by a large device-to-device copy, per second).
- CUDA times are taken from CUDA-graph replays of 20 calls (device time, no launch gaps) and,
  for the op, also eagerly (its value checks do not synchronise for bool masks and no
  batch_index). CPU times are wall-clock medians; the CPU time of the process (all threads)
  is printed beside them, since on a shared machine wall time measures the neighbours too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rgpt_rt.ops import mask_pool
from rgpt_rt.ops.mask_pool import area_overlap

HEIGHT = WIDTH = 96
CHANNELS = 1024
MASKS = 16


def region_masks(count: int, side: int, seed: int) -> torch.Tensor:
    """[count, side, side] bool: ellipses and boxes of random centre and size."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(side, dtype=torch.float32)
    masks = torch.empty(count, side, side, dtype=torch.bool)
    for n in range(count):
        cy, cx, ry, rx = torch.rand(4, generator=generator).tolist()
        cy, cx = cy * side, cx * side
        ry, rx = (0.05 + 0.4 * ry) * side, (0.05 + 0.4 * rx) * side
        dy = ((coords - cy) / ry)[:, None]
        dx = ((coords - cx) / rx)[None, :]
        masks[n] = (dy.abs() <= 1) & (dx.abs() <= 1) if n % 3 == 1 else dy**2 + dx**2 <= 1
    return masks


def torch_naive(features, masks, rows, cols, mode):
    """The naive torch way (B == 1 here): fp32 weight maps, then one fp32 matmul."""
    values = masks.float()  # [N, Hm, Wm]
    if mode == "bilinear":
        weights = F.interpolate(
            values[:, None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False
        )[:, 0]
    else:
        weights = rows @ values @ cols.T  # [H, Hm] @ [N, Hm, Wm] @ [Wm, W]
    weights = weights.flatten(1)
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
    return (weights @ features[0].flatten(0, 1).float()).to(features.dtype)


def timed_cpu(fn, repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process), medians per call."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def timed_cuda_eager(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def timed_cuda_graph(fn, calls: int = 20, replays: int = 5) -> float:
    """Device time per call: a CUDA graph of `calls` calls, the median of `replays` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up on a side stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved (read + written) by copying a 256 MiB buffer."""
    source = torch.empty(256 << 20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    if device.type == "cuda":
        seconds = timed_cuda_eager(lambda: target.copy_(source), calls=10)
    else:
        seconds = min(timed_cpu(lambda: target.copy_(source), 3)[0] for _ in range(2))
    return 2 * source.numel() / seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"

    bandwidth = copy_bandwidth(device)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, HEIGHT, WIDTH, CHANNELS, generator=generator).half().to(device)
    rows_out = []
    for side in (1024, 336):
        rows = area_overlap(HEIGHT, side).float().to(device)  # [H, Hm]
        cols = area_overlap(WIDTH, side).float().to(device)  # [W, Wm]
        for content in ("regions", "full"):
            if content == "regions":
                masks = region_masks(MASKS, side, seed=side).to(device)
            else:
                masks = torch.ones(MASKS, side, side, dtype=torch.bool, device=device)
            floor_bytes = masks.numel() * masks.element_size() + features.numel() * 2
            for mode in ("area", "bilinear"):

                def op(masks=masks, mode=mode):
                    return mask_pool(features, masks, mode=mode)

                def naive(masks=masks, rows=rows, cols=cols, mode=mode):
                    return torch_naive(features, masks, rows, cols, mode)

                torch_cpu_s = op_cpu_s = op_eager_s = None
                if on_cuda:
                    torch_s, op_s = timed_cuda_graph(naive), timed_cuda_graph(op)
                    op_eager_s = timed_cuda_eager(op)
                else:
                    torch_s, torch_cpu_s = timed_cpu(naive, 3)
                    op_s, op_cpu_s = timed_cpu(op, 5)
                floor_s = floor_bytes / bandwidth
                rows_out.append(
                    dict(
                        masks=f"{MASKS}x{side}x{side}",
                        content=content,
                        mode=mode,
                        torch_s=torch_s,
                        op_s=op_s,
                        op_eager_s=op_eager_s,
                        torch_cpu_s=torch_cpu_s,
                        op_cpu_s=op_cpu_s,
                        speedup=torch_s / op_s,
                        floor_s=floor_s,
                        floor_fraction=floor_s / op_s,
                    )
                )

    unit, scale = ("µs", 1e6) if on_cuda else ("ms", 1e3)
    print(f"mask_pool on {device_name(device)}; map 1x{HEIGHT}x{WIDTH}x{CHANNELS} fp16, masks bool")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    timing = "CUDA-graph replay" if on_cuda else "median of 5 (op) / 3 (torch) calls"
    print(f"times: {timing}\n")
    extra = f" op eager ({unit}) |" if on_cuda else " torch CPU time (ms) | op CPU time (ms) |"
    print(
        f"| masks | content | mode | torch ({unit}) | op ({unit}) |{extra} speedup | "
        f"floor ({unit}) | % of floor |"
    )
    print("|---|---|---|---:|---:|" + ("---:|" if on_cuda else "---:|---:|") + "---:|---:|---:|")
    for r in rows_out:
        if on_cuda:
            extra = f" {r['op_eager_s'] * scale:.1f} |"
        else:
            extra = f" {r['torch_cpu_s'] * 1e3:.1f} | {r['op_cpu_s'] * 1e3:.1f} |"
        print(
            f"| {r['masks']} | {r['content']} | {r['mode']} | {r['torch_s'] * scale:.1f} | "
            f"{r['op_s'] * scale:.1f} |{extra} {r['speedup']:.1f}x | {r['floor_s'] * scale:.1f} | "
            f"{100 * r['floor_fraction']:.0f}% |"
        )
    if args.json:
        result = dict(
            benchmark="mask_pool",
            device=device_name(device),
            torch=torch.__version__,
            copy_bandwidth_bytes_per_s=bandwidth,
            rows=rows_out,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
