"""Mask pooling: rgpt_rt.ops.mask_pool against the naive torch way, next to the floor.

    python benchmarks/mask_pool.py --device cpu  [--json FILE] [--suite regiongpt|osprey|all]
    python benchmarks/mask_pool.py --device cuda [--json FILE]     (scripts/gpu_check.sh)

Suite "regiongpt": a 96x96x1024 fp16 map (ViT-L/14-336 refined 4x) and 16 masks of 1024x1024
or 336x336, in every mode, with two mask contents: "regions" (ellipses and boxes covering 1-50%
of the image, as region prompts do) and "full" (every pixel set: nothing can be skipped).

Suite "osprey": Osprey's four ConvNeXt levels of a 512-px image (128x128x192, 64x64x384,
32x32x768, 16x16x1536, fp16) and 1, 4 or 16 "regions" masks of 512x512 or 1024x1024, binary
mode: the four levels in one call (mask_pool_levels) against four mask_pool calls and the
naive torch way. Its floor counts only what binary mode must read: the features of the cells
some mask selects, and the two mask rows per cell row its taps fall on.

- torch: the naive way. Every mask to fp32, weights by F.interpolate (bilinear; binary: > 0,
  Osprey's way) or by the fractional-edge overlap matrices (area: rows @ mask @ cols^T),
  normalised, then one matmul with the map in fp32.
- floor: mask bytes + feature bytes, each read once, over the copy bandwidth measured in
  this run (bytes read + bytes written by a large device-to-device copy, per second). The tap
  modes (bilinear, binary) need only the mask rows their taps touch, so for them this floor
  is a generous one (and "% of floor" can pass 100%); the Osprey suite's is exact.
- --threads N sets torch.get_num_threads() for both sides (default: torch's own). On a
  machine shared with other jobs, 1 thread keeps torch's OpenMP threads from spinning while
  a sibling waits for a core, which inflates the naive side.
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
from rgpt_rt.ops.mask_pool import BINARY_EPSILON, area_overlap, mask_pool_levels

HEIGHT = WIDTH = 96
CHANNELS = 1024
MASKS = 16
MODES = ("area", "bilinear", "binary")
OSPREY_LEVELS = [(128, 192), (64, 384), (32, 768), (16, 1536)]  # (side, channels)


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
    _, height, width, _ = features.shape
    values = masks.float()  # [N, Hm, Wm]
    if mode == "area":
        weights = rows @ values @ cols.T  # [H, Hm] @ [N, Hm, Wm] @ [Wm, W]
    else:
        weights = F.interpolate(
            values[:, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0]
    weights = weights.flatten(1)
    if mode == "binary":  # Osprey's MaskPooling
        weights = (weights > 0).float()
        weights = weights / (weights.sum(1, keepdim=True) + BINARY_EPSILON)
    else:
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


def timed(fn, on_cuda: bool, repeats: int) -> dict:
    """{"s": seconds per call, "cpu_s": CPU seconds (CPU only), "eager_s": (CUDA only)}."""
    if on_cuda:
        return dict(s=timed_cuda_graph(fn), eager_s=timed_cuda_eager(fn), cpu_s=None)
    wall, cpu = timed_cpu(fn, repeats)
    return dict(s=wall, cpu_s=cpu, eager_s=None)


def regiongpt_rows(device, bandwidth) -> list[dict]:
    on_cuda = device.type == "cuda"
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
            for mode in MODES:

                def op(masks=masks, mode=mode):
                    return mask_pool(features, masks, mode=mode)

                def naive(masks=masks, rows=rows, cols=cols, mode=mode):
                    return torch_naive(features, masks, rows, cols, mode)

                torch_t, op_t = timed(naive, on_cuda, 3), timed(op, on_cuda, 5)
                floor_s = floor_bytes / bandwidth
                rows_out.append(
                    dict(
                        masks=f"{MASKS}x{side}x{side}",
                        content=content,
                        mode=mode,
                        torch_s=torch_t["s"],
                        op_s=op_t["s"],
                        op_eager_s=op_t["eager_s"],
                        torch_cpu_s=torch_t["cpu_s"],
                        op_cpu_s=op_t["cpu_s"],
                        speedup=torch_t["s"] / op_t["s"],
                        floor_s=floor_s,
                        floor_fraction=floor_s / op_t["s"],
                    )
                )
    return rows_out


def osprey_floor_bytes(levels, masks) -> int:
    """Bytes binary mode must read: per level, the features of the cells some mask selects
    (F.interpolate(masks.float()) > 0 selects exactly the kernel's cells on these power-of-two
    grids: tests/test_mask_pool_reference.py), and per mask two rows per cell row."""
    total = 0
    for level in levels:
        _, height, width, channels = level.shape
        resized = F.interpolate(
            masks[:, None].float(), size=(height, width), mode="bilinear", align_corners=False
        )
        selected = int((resized > 0).any(dim=0).sum())
        total += selected * channels * level.element_size()
        total += masks.shape[0] * 2 * height * masks.shape[2] * masks.element_size()
    return total


def osprey_rows(device, bandwidth) -> list[dict]:
    """Osprey's four levels, binary mode: one call, four calls, the naive torch way."""
    on_cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(1)
    levels = [
        torch.randn(1, side, side, channels, generator=generator).half().to(device)
        for side, channels in OSPREY_LEVELS
    ]
    rows_out = []
    for side in (512, 1024):
        for count in (1, 4, 16):
            masks = region_masks(count, side, seed=side + count).to(device)

            def one_call(masks=masks):
                return mask_pool_levels(levels, masks, mode="binary")

            def four_calls(masks=masks):
                return [mask_pool(level, masks, mode="binary") for level in levels]

            def naive(masks=masks):
                return torch.cat(
                    [torch_naive(level, masks, None, None, "binary") for level in levels], dim=1
                )

            repeats = 3 if count == 16 and not on_cuda else 5
            torch_t, four_t = timed(naive, on_cuda, 3), timed(four_calls, on_cuda, repeats)
            one_t = timed(one_call, on_cuda, repeats)
            floor_s = osprey_floor_bytes(levels, masks) / bandwidth
            rows_out.append(
                dict(
                    masks=f"{count}x{side}x{side}",
                    torch_s=torch_t["s"],
                    four_calls_s=four_t["s"],
                    one_call_s=one_t["s"],
                    one_call_eager_s=one_t["eager_s"],
                    four_calls_eager_s=four_t["eager_s"],
                    torch_cpu_s=torch_t["cpu_s"],
                    four_calls_cpu_s=four_t["cpu_s"],
                    one_call_cpu_s=one_t["cpu_s"],
                    speedup=torch_t["s"] / one_t["s"],
                    one_vs_four=four_t["s"] / one_t["s"],
                    floor_s=floor_s,
                    floor_fraction=floor_s / one_t["s"],
                )
            )
    return rows_out


def print_regiongpt(rows_out, on_cuda: bool, unit: str, scale: float) -> None:
    print(f"### RegionGPT: map 1x{HEIGHT}x{WIDTH}x{CHANNELS} fp16, masks bool\n")
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


def print_osprey(rows_out, on_cuda: bool, unit: str, scale: float) -> None:
    levels = ", ".join(f"{side}x{side}x{channels}" for side, channels in OSPREY_LEVELS)
    print(f"\n### Osprey: four levels ({levels}) fp16, masks bool, mode binary\n")
    if on_cuda:
        extra_head, extra_rule = (
            f" one call eager ({unit}) | four calls eager ({unit}) |",
            "---:|---:|",
        )
    else:
        extra_head = " torch CPU (ms) | four calls CPU (ms) | one call CPU (ms) |"
        extra_rule = "---:|---:|---:|"
    print(
        f"| masks | torch ({unit}) | four calls ({unit}) | one call ({unit}) |{extra_head} "
        f"speedup (torch / one call) | four / one | floor ({unit}) | % of floor |"
    )
    print("|---|---:|---:|---:|" + extra_rule + "---:|---:|---:|---:|")
    for r in rows_out:
        if on_cuda:
            extra = (
                f" {r['one_call_eager_s'] * scale:.1f} | {r['four_calls_eager_s'] * scale:.1f} |"
            )
        else:
            extra = (
                f" {r['torch_cpu_s'] * 1e3:.1f} | {r['four_calls_cpu_s'] * 1e3:.2f} | "
                f"{r['one_call_cpu_s'] * 1e3:.2f} |"
            )
        print(
            f"| {r['masks']} | {r['torch_s'] * scale:.1f} | {r['four_calls_s'] * scale:.2f} | "
            f"{r['one_call_s'] * scale:.2f} |{extra} {r['speedup']:.1f}x | "
            f"{r['one_vs_four']:.2f}x | {r['floor_s'] * scale:.1f} | "
            f"{100 * r['floor_fraction']:.0f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--suite", choices=["all", "regiongpt", "osprey"], default="all")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; both sides)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"

    bandwidth = copy_bandwidth(device)
    regiongpt = regiongpt_rows(device, bandwidth) if args.suite in ("all", "regiongpt") else []
    osprey = osprey_rows(device, bandwidth) if args.suite in ("all", "osprey") else []

    unit, scale = ("µs", 1e6) if on_cuda else ("ms", 1e3)
    print(f"mask_pool on {device_name(device)}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    timing = "CUDA-graph replay" if on_cuda else "median of 5 (op) / 3 (torch) calls"
    print(f"times: {timing}\n")
    if regiongpt:
        print_regiongpt(regiongpt, on_cuda, unit, scale)
    if osprey:
        print_osprey(osprey, on_cuda, unit, scale)
    if args.json:
        result = dict(
            benchmark="mask_pool",
            device=device_name(device),
            torch=torch.__version__,
            copy_bandwidth_bytes_per_s=bandwidth,
            rows=regiongpt,
            osprey_rows=osprey,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
