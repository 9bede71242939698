"""The fused decode step's kernels (rgpt_rt/ops/decode.py) beside the torch ops they replace in
the unfused step, per op at the 7B shapes (batch 1 and 8), on a CPU or a GPU. On CUDA each is
also set against its floor: the bytes it must move over the card's copy bandwidth, measured here.

    python benchmarks/decode_ops.py                          # CPU, one thread
    python benchmarks/decode_ops.py --device cuda --json out.json
    python benchmarks/decode_ops.py --sass                   # registers and SASS size per kernel (no GPU)

Times are medians after warm-up: CUDA events around 20 back-to-back calls (kernel time plus the
launch gaps a CUDA graph would also have), thread CPU time on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rgpt_rt.ops import decode as ops

D, INNER, HEADS, HEAD_DIM, CACHE, LENGTH = 4096, 11008, 32, 128, 1024, 700  # Vicuna-7B


def timed_us(fn: Callable[[], object], device: str, runs: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / 20)
        else:
            t0 = time.thread_time()
            for _ in range(20):
                fn()
            samples.append((time.thread_time() - t0) * 1e6 / 20)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timed_us(lambda: dst.copy_(src), "cuda", 5) * 1e-6) / 1e9


def cases(batch: int, dtype: torch.dtype, kv_dtype: torch.dtype, device: str) -> list[tuple]:
    """(op, shape, ours, torch's unfused ops, bytes moved) for one batch size."""
    size, kv_size = torch.finfo(dtype).bits // 8, torch.finfo(kv_dtype).bits // 8
    x, residual = torch.randn(2, batch, D, device=device, dtype=dtype)
    weight = torch.ones(D, device=device, dtype=dtype)

    def norm_torch():
        summed = x + residual
        return F.rms_norm(summed, (D,), weight, 1e-5), summed

    qkv = torch.randn(batch, 3 * HEADS * HEAD_DIM, device=device, dtype=dtype)
    k_cache, v_cache = torch.randn(2, batch, HEADS, CACHE, HEAD_DIM, device=device, dtype=kv_dtype)
    positions = torch.full((batch,), LENGTH - 1, device=device)
    angles = torch.outer(torch.arange(CACHE), 1e4 ** -(torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = torch.cat((angles, angles), dim=-1)  # rotations: the repeated calls keep magnitudes
    sign = torch.cat((-torch.ones(HEAD_DIM // 2), torch.ones(HEAD_DIM // 2)))
    cos, sin = (t.to(device, dtype) for t in (angles.cos(), angles.sin() * sign))
    rope_args = (qkv, k_cache, v_cache, positions, cos, sin, HEADS, HEADS)

    q = qkv.as_strided((batch, HEADS, HEAD_DIM), (qkv.stride(0), HEAD_DIM, 1))
    workspace, splits = ops.attention_workspace(batch, HEADS, HEADS, HEAD_DIM, CACHE, device)
    # the unfused step: CUDA graphs attend over a 256-slot bucket with a mask; a CPU over the
    # exact length without one (rows of one length)
    span = -(-LENGTH // 256) * 256 if device == "cuda" else LENGTH
    mask = (
        (torch.arange(span, device=device) < LENGTH)[None, None, None] if device == "cuda" else None
    )

    def attention_torch():
        keys, values = k_cache[:, :, :span], v_cache[:, :, :span]
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)

    gate_up = torch.randn(batch, 2 * INNER, device=device, dtype=dtype)

    def silu_torch():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    row = batch * D * size
    return [
        ("add_rms_norm", f"{batch}x{D}", lambda: ops.add_rms_norm(x, residual, weight, 1e-5),
         norm_torch, 4 * row + D * size),
        ("rope_kv_append", f"{batch}x{HEADS}x{HEAD_DIM}", lambda: ops.rope_kv_append(*rope_args),
         lambda: ops.rope_kv_append_reference(*rope_args),
         batch * HEADS * HEAD_DIM * (5 * size + 2 * kv_size) + 4 * HEAD_DIM * size),
        ("decode_attention", f"{batch}x{HEADS}x{HEAD_DIM}, {LENGTH} slots",
         lambda: ops.decode_attention(q, k_cache, v_cache, positions, workspace, splits),
         attention_torch, 2 * batch * HEADS * LENGTH * HEAD_DIM * kv_size + 2 * q.numel() * size),
        ("silu_mul", f"{batch}x{INNER}", lambda: ops.silu_mul(gate_up), silu_torch,
         3 * batch * INNER * size),
    ]  # fmt: skip


def sass_counts(archs: list[str]) -> list[dict]:
    """Registers, stack and SASS instructions of each decode kernel in the built rgpt_rt._C."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sass

    rows = []
    for arch in archs:
        text, usage = sass.disassemble(sass.built_extension(), arch)
        kernels, resources = sass.parse_sass(text), sass.parse_resources(usage)
        for mangled, name in sorted(sass.demangle(list(kernels)).items(), key=lambda kv: kv[1]):
            if "rgpt::decode::" not in name:
                continue
            registers, stack = resources.get(mangled, (None, None))
            short = re.sub(r".*::", "", name.split("(")[0]).replace("void ", "")
            rows.append({"arch": arch, "kernel": short, "registers": registers,
                         "stack_bytes": stack, "instructions": len(kernels[mangled])})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--sass", action="store_true", help="static counts instead of timings")
    parser.add_argument("--arch", default="sm_87,sm_90")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if args.sass:
        rows = sass_counts([a.strip() for a in args.arch.split(",")])
        print(
            "| arch | kernel | registers | stack bytes | SASS instructions |\n|---|---|---:|---:|---:|"
        )
        for r in rows:
            print(
                f"| {r['arch']} | {r['kernel']} | {r['registers']} | {r['stack_bytes']} | {r['instructions']} |"
            )
        if args.json:
            args.json.write_text(json.dumps({"sass": rows}, indent=2) + "\n")
        return

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    kv_dtype = torch.float16  # a bundle's INT4 decoder keeps its cache in fp16 on a CPU too
    hardware = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"{platform.machine()} CPU, {args.threads} thread(s)"
    )
    bandwidth = copy_bandwidth() if cuda else None
    rows = []
    for batch in args.batch:
        for name, shape, ours, theirs, nbytes in cases(batch, dtype, kv_dtype, args.device):
            ours_us, theirs_us = (
                timed_us(ours, args.device, args.runs),
                timed_us(theirs, args.device, args.runs),
            )
            row = {"op": name, "shape": shape, "batch": batch, "ours_us": ours_us,
                   "torch_us": theirs_us, "bytes": nbytes}  # fmt: skip
            if bandwidth:
                row["floor_us"] = nbytes / (bandwidth * 1e9) * 1e6
                row["pct_of_floor"] = 100 * row["floor_us"] / ours_us
            rows.append(row)

    print(
        f"\n## decode kernels vs the unfused step's torch ops — {hardware}, activations {dtype}, cache {kv_dtype}\n"
    )
    if bandwidth:
        print(f"copy bandwidth {bandwidth:.0f} GB/s\n")
    head = "| op | shape | ours µs | torch µs | speed-up |" + (
        " floor µs | % of floor |" if bandwidth else ""
    )
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in rows:
        line = f"| {r['op']} | {r['shape']} | {r['ours_us']:.1f} | {r['torch_us']:.1f} | {r['torch_us'] / r['ours_us']:.2f}x |"
        if bandwidth:
            line += f" {r['floor_us']:.2f} | {r['pct_of_floor']:.0f}% |"
        print(line)
    if args.json:
        report = {
            "hardware": hardware,
            "copy_bandwidth_gb_s": bandwidth,
            "torch": torch.__version__,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
