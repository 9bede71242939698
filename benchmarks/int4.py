"""INT4 W4A16 linear: rgpt_rt's int4_linear (layout n16k64) on every path it has, the previous
kernels (layout nk8i, rgpt_rt/ops/int4_nk8i.py), a dense torch.matmul and torch's own INT4 matmul,
in the same run, on LLaMA-7B shapes, in µs and against the memory floor measured in the same run.

    python benchmarks/int4.py --device cpu  [--rows 1,4,16,64] [--threads N] [--json FILE]
    python benchmarks/int4.py --device cuda [--rows 1,4,16,32,64,128,640] [--splits 1,2,4,8]

Columns, per shape and row count M:
  int4_linear   what int4_linear runs for M (the path in brackets), with % of the memory floor and
                TFLOP/s (GFLOP/s on the CPU)
  GEMM          the n16k64 GEMM forced for this M (CUDA: the tensor-core kernel, which takes any M
                in blocks of 64 rows; CPU: int4_gemm_n16k64_cpu), M > 8
  dequant+GEMM  W dequantized into x's dtype, then cuBLAS / torch's GEMM: the prefill path before
                issue 24 (RGPT_INT4_KERNEL=n16k64-dequant), M > 8
  nk8i          the previous kernels (M ≤ 16 only: they dequantize for more rows too)
  dense, torch int4 (M ≤ 128)
Where GEMM beats dequant+GEMM decides ops/int4.GEMM_MAX_ROWS (CUDA) and the CPU bounds.
--splits also times the CUDA GEMM at each given split-K factor (M ≤ 64), to tune its plan.

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

from rgpt_rt.ops import int4 as int4_ops
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


def run_path(x: torch.Tensor, w: Int4Weight, path: str, splits: int | None = None):
    """int4_linear's body on one path ("gemm", "dequant"), whatever M is."""
    n = w.shape[0]
    if x.is_cuda:
        return int4_ops.linear_cuda(
            x, w.qweight, w.scales, w.zeros, None, n, w.group_size, splits=splits, path=path
        )
    return int4_ops.linear_cpu(x, w.qweight, w.scales, w.zeros, None, n, w.group_size, 0, path=path)


def dequantize_alone(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` through the CUDA prefill's dequantization kernel."""
    from rgpt_rt import _C

    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    _C.int4_dequant_n16k64_cuda(
        w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), out.data_ptr(), n, k,
        w.group_size, int4_ops.DTYPE_TAGS[dtype], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    return out


def chosen_path(m: int, device: str, dtype: torch.dtype) -> str:
    if device == "cuda":
        return int4_ops.prefill_path(m, dtype)
    if m <= int4_ops.CPU_GEMV_MAX_ROWS:
        return "gemv"
    return "gemm" if m < int4_ops.CPU_GEMM_MIN_ROWS else "dequant"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated M values (default: cpu 1,4,16,64; cuda 1,4,16,32,64,128,640)",
    )
    parser.add_argument(
        "--shapes", default=None, help="comma-separated indices into the shape list (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU: torch threads (default: torch's)"
    )
    parser.add_argument(
        "--splits", default="", help="CUDA: also time the GEMM at these split-K factors (M ≤ 64)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    default_rows = "1,4,16,64" if device == "cpu" else "1,4,16,32,64,128,640"
    rows = [int(m) for m in (args.rows or default_rows).split(",")]
    split_list = [int(s) for s in args.splits.split(",") if s]
    shapes = list(SHAPES.items())
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    dense_dtype = torch.float32 if device == "cpu" else torch.float16
    act_dtype = torch.float32 if device == "cpu" else torch.float16
    timer = time_cpu if device == "cpu" else time_cuda
    per_second, unit = (1e12, "TFLOP/s") if device == "cuda" else (1e9, "GFLOP/s")

    bandwidth = copy_bandwidth(device)
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    print(
        f"# INT4 linear on {hardware}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}"
    )
    print(
        f"int4_linear: rgpt_rt n16k64 ({act_dtype} x, INT4 g{GROUP}; GEMV ≤ {int4_ops.GEMV_MAX_ROWS if device == 'cuda' else int4_ops.CPU_GEMV_MAX_ROWS} rows, "
        f"GEMM ≤ {int4_ops.GEMM_MAX_ROWS if device == 'cuda' else int4_ops.CPU_GEMM_MIN_ROWS - 1}); nk8i: the previous kernels "
        f"(int4_linear_nk8i); dense: torch.matmul {dense_dtype}; torch int4: "
        "aten._weight_int4pack_mm" + ("_for_cpu" if device == "cpu" else "") + "\n"
    )
    header = (
        f"| shape (K→N) | M | int4_linear µs [path] | % floor | {unit} | GEMM µs | dequant+GEMM µs "
        "| nk8i µs | dense µs | torch int4 µs |"
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
            flops = 2 * m * n * k
            ours = timer(cycling(lambda w, x=x: int4_linear(x, w), weights))
            prefill = m > int4_ops.GEMV_MAX_ROWS
            gemm = (
                timer(cycling(lambda w, x=x: run_path(x, w, "gemm"), weights)) if prefill else None
            )
            dequant = (
                timer(cycling(lambda w, x=x: run_path(x, w, "dequant"), weights))
                if prefill
                else None
            )
            by_splits = {}
            if device == "cuda" and prefill and m <= int4_ops.GEMM_MAX_ROWS:
                for splits in split_list:
                    fn = cycling(lambda w, x=x, s=splits: run_path(x, w, "gemm", s), weights)
                    by_splits[splits] = timer(fn)
            old = (
                timer(cycling(lambda p, x=x: int4_linear_nk8i(x, *p, GROUP), olds))
                if m <= 16
                else None
            )
            dense_us = timer(cycling(lambda d, x=x: x.to(dense_dtype) @ d.T, denses))
            fn, reason = torch_int4(x, n, k) if m <= 128 else (None, "M > 128: not timed")
            theirs = timer(fn) if fn is not None else None
            path = chosen_path(m, device, act_dtype)
            plan = (
                int4_ops.gemm_splits(m, n, k, GROUP, torch.cuda.current_device())
                if device == "cuda" and path == "gemm"
                else None
            )
            row = {
                "shape": name, "K": k, "N": n, "M": m, "path": path, "gemm_splits": plan,
                "n16k64_us": ours, "int4_floor_us": int4_floor, "gemm_us": gemm,
                "dequant_gemm_us": dequant, "gemm_us_by_splits": by_splits, "nk8i_us": old,
                "dense_us": dense_us, "dense_floor_us": dense_size / bandwidth * 1e6,
                "torch_int4_us": theirs, "torch_int4_note": reason, "weight_copies": len(weights),
            }  # fmt: skip
            results.append(row)

            def cell(us):
                return "–" if us is None else f"{us:.1f}"

            t4 = f"{theirs:.0f}" if theirs else reason
            splits_note = "".join(f" s{s}={t:.1f}" for s, t in by_splits.items())
            print(f"| {name} | {m} | {ours:.1f} [{path}{f' s{plan}' if plan else ''}] | "
                  f"{100 * int4_floor / ours:.0f}% | {flops / (ours * 1e-6) / per_second:.1f} | "
                  f"{cell(gemm)}{splits_note} | {cell(dequant)} | {cell(old)} | {dense_us:.0f} | {t4} |",
                  flush=True)  # fmt: skip
    # CUDA: the dequantization alone (the first half of dequant+GEMM), bytes read + written
    # against the copy bandwidth; issue 24 asks >= 80%
    dequant_rows = []
    if device == "cuda":
        print(f"\n| shape (K→N) | dequantize to {act_dtype} µs | GB/s | % of copy bandwidth |")
        print("|---|---|---|---|")
    for name, (k, n) in shapes if device == "cuda" else []:
        weights = copies_past_l2(partial(random_int4, n, k, device), n * k // 2, device)
        size = weights[0].nbytes + n * k * torch.tensor([], dtype=act_dtype).element_size()
        us = timer(cycling(partial(dequantize_alone, dtype=act_dtype), weights))
        rate = size / (us * 1e-6)
        dequant_rows.append({"shape": name, "K": k, "N": n, "us": us, "GBps": rate / 1e9})
        print(
            f"| {name} | {us:.1f} | {rate / 1e9:.0f} | {100 * rate / bandwidth:.0f}% |", flush=True
        )
    report = {
        "device": hardware, "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
        "group_size": GROUP, "act_dtype": str(act_dtype), "dense_dtype": str(dense_dtype),
        "gemv_max_rows": int4_ops.GEMV_MAX_ROWS, "gemm_max_rows": int4_ops.GEMM_MAX_ROWS,
        "cpu_gemv_max_rows": int4_ops.CPU_GEMV_MAX_ROWS, "cpu_gemm_min_rows": int4_ops.CPU_GEMM_MIN_ROWS,
        "results": results, "dequantize": dequant_rows,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
