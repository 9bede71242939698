"""INT4 W4A16 linear: rgpt_rt's int4_linear (layout n16k64) and the previous kernels (layout nk8i,
rgpt_rt/ops/int4_nk8i.py) in the same run, against a dense torch.matmul and torch's own INT4
matmul, on LLaMA-7B shapes, in µs and in % of the memory floor measured in the same run.

    python benchmarks/int4.py --device cpu  [--rows 1,4] [--threads N] [--json FILE]
    python benchmarks/int4.py --device cuda [--rows 1,4,16,128]     [--json FILE]

floor = bytes the op must move (weights + scales + zeros + x + out) / copy bandwidth, where
the copy bandwidth is measured here (a large tensor copy: read + write bytes / time).
% of floor = floor / measured time (100% = at the bandwidth of a plain copy).
CUDA times are of the op replayed from a CUDA graph (as in decoding), so no Python overhead;
CPU times are wall-clock medians, through the same Python wrappers for both layouts. Weights are
random: speed does not depend on their values. On CUDA each timed call reads another copy of the
weights, enough copies to overflow the L2 cache (as decoding does: a layer's weights are not in
L2 when it runs again); torch int4 uses one weight (L2-warm where it fits).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from rgpt_rt.ops import int4_linear
from rgpt_rt.ops.int4_format import Int4Weight
from rgpt_rt.ops.int4_layout import packed_shapes
from rgpt_rt.ops.int4_nk8i import int4_linear_nk8i

SHAPES = {  # name: (K in, N out) of LLaMA-7B's linears
    "q/k/v/o 4096→4096": (4096, 4096),
    "gate/up 4096→11008": (4096, 11008),
    "down 11008→4096": (11008, 4096),
    "lm_head 4096→32000": (4096, 32000),
    "qkv fused 4096→12288": (4096, 12288),
    "gate_up fused 4096→22016": (4096, 22016),
}
GROUP = 128
COLD_BYTES = 512 << 20  # CUDA: weight copies cycled per shape, past the L2 (50-60 MB on H100/H200)


def random_int4(n: int, k: int, device: str) -> Int4Weight:
    """A random weight in layout n16k64 (random 32-bit code words: values do not matter)."""
    shapes = packed_shapes(n, k, GROUP)
    qweight = torch.randint(
        -(2**31), 2**31 - 1, shapes["qweight"], dtype=torch.int32, device=device
    )
    scales = (torch.rand(shapes["scales"], device=device) * 0.01 + 1e-4).half()
    zeros = torch.randint(0, 16, shapes["zeros"], dtype=torch.uint8, device=device)
    return Int4Weight(qweight, scales, zeros, GROUP, (n, k))


def random_nk8i(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tensors of layout nk8i (qweight, scales, zeros), for the previous kernels."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(n, k // GROUP, device=device) * 0.01 + 1e-4).half()
    zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device=device)
    return qweight, scales, zeros


def dense_weight(n: int, k: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, k, device=device).to(dtype)


def copies_past_l2(make, nbytes: int, device: str, most: int = 16) -> list:
    """make() called enough times that the copies together exceed COLD_BYTES (CUDA only)."""
    count = 1 if device != "cuda" else max(1, min(most, -(-COLD_BYTES // nbytes)))
    return [make() for _ in range(count)]


def cycling(fn, items: list):
    """A callable that calls fn(item) for the next item of `items` each time."""
    items = itertools.cycle(items)
    return lambda: fn(next(items))


def time_cpu(fn, min_seconds: float = 0.3, max_reps: int = 50) -> float:
    """Median wall time of fn() in µs, after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_cuda(fn, calls: int = 20, reps: int = 10, graph: bool = True) -> float:
    """µs per call of fn() replayed from a CUDA graph of `calls` calls (an eager loop of them
    when graph is False or capture fails)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)

    def run():
        for _ in range(calls):
            fn()

    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                for _ in range(calls):
                    fn()
            run = captured.replay
        except RuntimeError:
            pass

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (bytes read + bytes written)."""
    size = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device == "cuda":
        # eager copies: replayed from a CUDA graph, 1 GiB copies read 2.76 TB/s on an H200
        # where eager ones (benchmarks/decoder.py, mask_pool.py) read 4.1-4.2 TB/s
        seconds = time_cuda(lambda: dst.copy_(src), calls=5, reps=5, graph=False) / 1e6
    else:
        seconds = time_cpu(lambda: dst.copy_(src), min_seconds=1.0) / 1e6
    return 2 * size / seconds


def torch_int4(x: torch.Tensor, n: int, k: int):
    """torch's INT4 matmul (tinygemm layout) as a callable, or (None, reason) where unavailable."""
    aten = torch.ops.aten
    try:
        if x.is_cuda:
            if not hasattr(aten, "_weight_int4pack_mm"):
                return None, "no aten._weight_int4pack_mm"
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=x.device)
            packed = aten._convert_weight_to_int4pack(codes, 8)
            act = x.to(torch.bfloat16)
            sz = torch.rand(k // GROUP, n, 2, device=x.device).to(torch.bfloat16)
            fn = lambda: aten._weight_int4pack_mm(act, packed, GROUP, sz)  # noqa: E731
        else:
            if not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
                return None, "no aten._weight_int4pack_mm_for_cpu"
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            sz = torch.rand(k // GROUP, n, 2).to(x.dtype)
            fn = lambda: aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)  # noqa: E731
        fn()
        return fn, None
    except (RuntimeError, NotImplementedError) as error:
        return None, f"unavailable: {str(error).splitlines()[0][:80]}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--rows", default=None, help="comma-separated M values (default: cpu 1,4; cuda 1,4,16,128)"
    )
    parser.add_argument(
        "--shapes", default=None, help="comma-separated indices into the shape list (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU: torch threads (default: torch's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    rows = [int(m) for m in (args.rows or ("1,4" if device == "cpu" else "1,4,16,128")).split(",")]
    shapes = list(SHAPES.items())
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    dense_dtype = torch.float32 if device == "cpu" else torch.float16
    act_dtype = torch.float32 if device == "cpu" else torch.float16
    timer = time_cpu if device == "cpu" else time_cuda

    bandwidth = copy_bandwidth(device)
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    print(
        f"# INT4 linear on {hardware}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}"
    )
    print(
        f"n16k64: rgpt_rt int4_linear ({act_dtype} x, INT4 g{GROUP}); nk8i: the previous kernels "
        f"(int4_linear_nk8i); dense: torch.matmul {dense_dtype}; torch int4: "
        "aten._weight_int4pack_mm" + ("_for_cpu" if device == "cpu" else "") + "\n"
    )
    header = (
        "| shape (K→N) | M | n16k64 µs | % floor | nk8i (old) µs | % floor | dense µs | % floor "
        "| torch int4 µs | % floor |"
    )
    print(header)
    print("|" + "---|" * 10)
    results = []
    for name, (k, n) in shapes:
        weights = copies_past_l2(partial(random_int4, n, k, device), n * k // 2, device)
        olds = copies_past_l2(partial(random_nk8i, n, k, device), n * k // 2, device)
        dense_size = n * k * torch.tensor([], dtype=dense_dtype).element_size()
        make_dense = partial(dense_weight, n, k, device, dense_dtype)
        denses = copies_past_l2(make_dense, dense_size, device, most=6)
        w = weights[0]
        for m in rows:
            x = torch.randn(m, k, device=device).to(act_dtype)
            act_bytes = x.element_size() * (m * k + m * n)
            int4_floor = (w.nbytes + act_bytes) / bandwidth * 1e6
            dense_floor = (dense_size + act_bytes) / bandwidth * 1e6
            ours = timer(cycling(lambda w, x=x: int4_linear(x, w), weights))
            old = timer(cycling(lambda p, x=x: int4_linear_nk8i(x, *p, GROUP), olds))
            dense_us = timer(cycling(lambda d, x=x: x.to(dense_dtype) @ d.T, denses))
            fn, reason = torch_int4(x, n, k)
            theirs = timer(fn) if fn is not None else None
            row = {
                "shape": name, "K": k, "N": n, "M": m, "n16k64_us": ours, "int4_floor_us": int4_floor,
                "nk8i_us": old, "dense_us": dense_us, "dense_floor_us": dense_floor,
                "torch_int4_us": theirs, "torch_int4_note": reason, "weight_copies": len(weights),
            }  # fmt: skip
            results.append(row)
            t4 = f"{theirs:.0f} | {100 * int4_floor / theirs:.0f}%" if theirs else f"{reason} | –"
            print(f"| {name} | {m} | {ours:.1f} | {100 * int4_floor / ours:.0f}% | {old:.1f} | "
                  f"{100 * int4_floor / old:.0f}% | {dense_us:.0f} | {100 * dense_floor / dense_us:.0f}% "
                  f"| {t4} |", flush=True)  # fmt: skip
    report = {
        "device": hardware, "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
        "group_size": GROUP, "act_dtype": str(act_dtype), "dense_dtype": str(dense_dtype), "results": results,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
