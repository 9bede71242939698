"""The runtime decoder against transformers' generate on the same weights: prefill ms, decode
tok/s, and on CUDA the bytes a decode step moves as GB/s against the card's copy bandwidth.

    python benchmarks/decoder.py                                   # CPU, the tiny preset's LLM shape
    python benchmarks/decoder.py --device cuda --preset rgpt-7b --random-weights --json out.json

Both sides run greedy decoding of exactly --new-tokens tokens (no eos) from a --prompt-len prompt,
after --warmup runs; every number is the median of --runs runs, and the runs of both sides are
interleaved so that the load of a shared machine falls on both alike. Per-token decode time is
(generate time - prefill time) / (new tokens - 1) on both sides: the first token comes from the
prefill logits. Ours decodes into a cache allocated once (as the Session does); on CUDA its
decode step replays CUDA graphs and the weights are INT4 when rgpt_rt.quant is available
(--quant none for fp16).

Ours runs each of --steps: the fused decode step (rgpt_rt/ops/decode.py) and the unfused one it
replaced, timed in the same run (issue 23). Per step kind it counts what one batch-1 decode step
launches: on CUDA the kernels of the step's body (torch.profiler) and the kernel nodes of its
captured CUDA graph (through cudart), with the per-layer figure (target: <= 9); on a CPU the
torch ops it dispatches.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model.llm import build_llm
from rgpt_rt.runtime import LlamaDecoder, SamplingParams, decode
from rgpt_rt.runtime.loading import decoder_from_state


def _timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _median(fn: Callable[[], object], device: str, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        _timed(fn, device)
    return statistics.median(_timed(fn, device)[0] for _ in range(runs))


def _interleaved(fns: dict, device: str, warmup: int, runs: int) -> dict:
    """Median (wall, CPU) seconds of each function, timed in turns so that a shared machine's
    load falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            _timed(fn, device)
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {
        name: tuple(statistics.median(t[i] for t in ts) for i in (0, 1))
        for name, ts in times.items()
    }


def copy_bandwidth(device: str) -> float | None:
    """The card's measured device-to-device copy bandwidth, GB/s (bytes read + written)."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _median(lambda: dst.copy_(src), "cuda", 3, 10)
    return 2 * src.numel() / seconds / 1e9


def ours(decoder: LlamaDecoder, prompt: torch.Tensor, new_tokens: int, kind: str) -> tuple:
    """prompt [B, T] -> (prefill, generate, bytes a decode step moves) for the runtime decoder
    running decode steps of `kind` ("fused" or "unfused"), on a cache of its own."""
    B, T = prompt.shape
    cache = decoder.new_cache(B, T + new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens)

    def prefill():
        decoder.decode_step_kind = kind
        cache.reset()
        return decoder.prefill(cache, input_ids=prompt)

    def generate():
        rows = decode(decoder, cache, prefill(), params)
        assert all(len(r.ids) == new_tokens for r in rows)

    c = decoder.config
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * cache.k.element_size()
    moved = decoder.weight_bytes() + B * (T + new_tokens / 2) * kv_per_token  # per decode step
    return prefill, generate, moved


def profile_kernels(fn: Callable[[], object], repeats: int) -> dict:
    """The CUDA kernels `fn` launches, from torch.profiler, per call: their summed time, the
    launch count and the largest kernels by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        # kernels only: the host-to-device copies of a step's inputs are not launches
        if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset")):
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time_total / repeats
            entry[1] += 1 / repeats
    top = sorted(kernels.items(), key=lambda item: -item[1][0])
    return {
        "kernel_us": sum(t for t, _ in kernels.values()),
        "launches": sum(n for _, n in kernels.values()),
        "top": [
            {"kernel": k[:90], "us": round(t, 1), "count": round(n, 1)} for k, (t, n) in top[:12]
        ],
    }


def profile_decoder(decoder: LlamaDecoder, prompt: torch.Tensor, kind: str) -> dict:
    """Kernels of one eager decode step of `kind` and of one prefill of `prompt`'s first row
    (batch 1). A graphed step runs the same kernels as an eager one, so the graphed step time
    minus the summed kernel time is what remains between kernels."""
    decoder.decode_step_kind = kind
    cache = decoder.new_cache(1, prompt.shape[1] + 32)
    tokens = decoder.prefill(cache, input_ids=prompt[:1]).argmax(-1)
    graphs, decoder.use_cuda_graphs = decoder.use_cuda_graphs, False
    try:
        step = profile_kernels(lambda: decoder.decode_step(tokens, cache), 8)
    finally:
        decoder.use_cuda_graphs = graphs

    def prefill():
        cache.reset()
        decoder.prefill(cache, input_ids=prompt[:1])

    return {"decode_step": step, "prefill": profile_kernels(prefill, 2)}


def _cudart():
    """The CUDA runtime torch loaded (for the graph API torch does not wrap), or None."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def graph_kernel_nodes(fn: Callable[[], object]) -> int | None:
    """The kernel nodes of a CUDA graph captured from fn (after a warm-up on a side stream), or
    None where torch cannot keep the graph or cudart is not found."""
    cudart = _cudart()
    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:  # torch < 2.6
        return None
    if cudart is None:
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    handle = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t(0)
    if cudart.cudaGraphGetNodes(handle, None, ctypes.byref(count)) != 0:
        return None
    nodes = (ctypes.c_void_p * count.value)()
    cudart.cudaGraphGetNodes(handle, nodes, ctypes.byref(count))
    kernels, kind = 0, ctypes.c_int(0)
    for node in nodes:
        cudart.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind))
        kernels += kind.value == 0  # cudaGraphNodeTypeKernel
    return kernels


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_launches(decoder: LlamaDecoder, prompt: torch.Tensor, kind: str) -> dict:
    """What one batch-1 decode step of `kind` launches: on CUDA the kernels of its body
    (profiler) and its graph's kernel nodes; on a CPU the torch ops it dispatches. Per layer too."""
    decoder.decode_step_kind = kind
    cache = decoder.new_cache(1, prompt.shape[1] + 8)
    tokens = decoder.prefill(cache, input_ids=prompt[:1]).argmax(-1)
    positions = cache.lengths.to(decoder.device)
    layers = decoder.config.num_layers
    if decoder.device.type != "cuda":
        with _CountOps() as mode:
            decoder.decode_step(tokens, cache)
        return {"step": kind, "torch_ops": mode.count, "torch_ops_per_layer": mode.count / layers}
    kv_len = cache.max_len
    decoder._attention_workspace(cache)  # as decode_step makes it, before any capture

    def body():
        return decoder.step_logits(tokens, positions, cache, kv_len)

    kernels = profile_kernels(body, 4)["launches"]
    nodes = graph_kernel_nodes(body)
    return {
        "step": kind,
        "fused_kernels": decoder.runs_fused_step(cache),
        "kernels": round(kernels),
        "kernels_per_layer": kernels / layers,
        "graph_kernel_nodes": nodes,
        "graph_kernel_nodes_per_layer": None if nodes is None else nodes / layers,
    }


def print_launches(rows: list[dict]) -> None:
    if "kernels" in rows[0]:
        print("\none decode step, batch 1 (target: <= 9 kernels per layer)")
        print("| step | kernels (profiler) | per layer | CUDA graph kernel nodes | per layer |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            nodes = r["graph_kernel_nodes"]
            cells = (
                ("–", "–") if nodes is None else (nodes, f"{r['graph_kernel_nodes_per_layer']:.2f}")
            )
            print(
                f"| {r['step']} | {r['kernels']} | {r['kernels_per_layer']:.2f} | {cells[0]} | {cells[1]} |"
            )
    else:
        print("\none decode step, batch 1: torch ops dispatched")
        print("| step | torch ops | per layer |\n|---|---:|---:|")
        for r in rows:
            print(f"| {r['step']} | {r['torch_ops']} | {r['torch_ops_per_layer']:.1f} |")


def print_profile(profiles: dict) -> None:
    for name, profile in profiles.items():
        print(
            f"\n{name} (eager, batch 1): {profile['kernel_us']:.0f} µs in kernels, "
            f"{profile['launches']:.0f} launches"
        )
        print("| kernel | µs | launches |\n|---|---:|---:|")
        for row in profile["top"]:
            print(f"| {row['kernel']} | {row['us']:.1f} | {row['count']:.0f} |")


def transformers_side(model, prompt: torch.Tensor, new_tokens: int) -> tuple:
    """The same for transformers: a forward with use_cache as prefill, generate as generate."""
    B, T = prompt.shape
    mask = torch.ones_like(prompt)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )

    @torch.no_grad()
    def prefill():
        return model(prompt, attention_mask=mask, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def generate():
        out = model.generate(prompt, attention_mask=mask, generation_config=config)
        assert out.shape[1] == T + new_tokens

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    kv_per_token = (
        2 * model.config.num_hidden_layers * model.config.num_key_value_heads
        * (model.config.hidden_size // model.config.num_attention_heads) * embed.element_size()
    )  # fmt: skip
    moved = params - embed.numel() * embed.element_size() + B * (T + new_tokens / 2) * kv_per_token
    return prefill, generate, moved


def _result(t_prefill: float, t_generate: float, new_tokens: int, batch: int, moved: float) -> dict:
    step = (t_generate - t_prefill) / (new_tokens - 1)
    return {
        "prefill_ms": 1e3 * t_prefill,
        "generate_ms": 1e3 * t_generate,
        "decode_step_ms": 1e3 * step,
        "decode_tok_s": batch / step,
        "decode_gb_s": moved / step / 1e9,
    }


def build(args) -> tuple[torch.nn.Module, LlamaDecoder, str]:
    """transformers' LlamaForCausalLM with random weights in the preset's LLM shape, and the
    runtime decoder on the same tensors (shared, not copied, where dtype and device agree)."""
    cfg = RGPTConfig.from_preset(args.preset).llm
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = build_llm(cfg).eval()
    torch.set_default_dtype(previous)
    quant = None
    if args.quant == "int4" or (args.quant == "auto" and args.device == "cuda"):
        try:
            import rgpt_rt.quant  # noqa: F401
        except ImportError:
            if args.quant == "int4":
                raise
        else:
            quant = "int4"
    decoder = decoder_from_state(
        cfg, model.state_dict(), dtype=dtype, device=args.device, quant=quant,
        group_size=args.group_size,
    )  # fmt: skip
    decoder.fuse_projections()  # q/k/v and gate/up stacked, as a bundle's decoder is
    label = f"rgpt_rt {'INT4' if quant else str(dtype).removeprefix('torch.')}"
    if args.device == "cuda":
        label += " + CUDA graphs"
    return model, decoder, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "rgpt-7b"])
    parser.add_argument(
        "--random-weights", action="store_true", help="(always: speed does not depend on values)"
    )
    parser.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "none", "int4"],
        help="auto: INT4 on CUDA when rgpt_rt.quant exists",
    )
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="default: 1 on CPU, 1 and 8 on CUDA"
    )
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="default: 128 (tiny), 640 (7B: system + 576 image tokens + question)",
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: list the kernels of one decode step and of one prefill",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["fused", "unfused"],
        choices=["fused", "unfused"],
        help="the decode steps of ours to time (default: both, old beside new)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batch or ([1] if args.device == "cpu" else [1, 8])
    prompt_len = args.prompt_len or (128 if args.preset == "tiny" else 640)

    model, decoder, label = build(args)
    if args.device == "cuda":
        hardware = torch.cuda.get_device_name(0)
    else:
        hardware = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    bandwidth = copy_bandwidth(args.device)
    results = {
        "hardware": hardware,
        "copy_bandwidth_gb_s": bandwidth,
        "preset": args.preset,
        "prompt_len": prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "torch": torch.__version__,
        "rows": [],
        "launches": [
            step_launches(
                decoder,
                torch.randint(0, decoder.config.vocab_size, (1, 32), device=args.device),
                kind,
            )
            for kind in args.steps
        ],
    }
    for batch in batches:
        prompt = torch.randint(
            0, decoder.config.vocab_size, (batch, prompt_len), device=args.device
        )
        sides = {
            f"{label}, {kind} step": ours(decoder, prompt, args.new_tokens, kind)
            for kind in args.steps
        }
        sides["transformers generate"] = transformers_side(model, prompt, args.new_tokens)
        fns = {}
        for name, (prefill, generate, _) in sides.items():
            fns[(name, "prefill")], fns[(name, "generate")] = prefill, generate
        times = _interleaved(fns, args.device, args.warmup, args.runs)
        for name, (_, _, moved) in sides.items():
            (t_prefill, cpu_prefill), (t_generate, cpu_generate) = (
                times[(name, "prefill")],
                times[(name, "generate")],
            )
            row = {
                "impl": name,
                "batch": batch,
                **_result(t_prefill, t_generate, args.new_tokens, batch, moved),
            }
            if args.device == "cpu":  # CPU time: what the work costs, whatever the machine's load
                row["prefill_cpu_ms"] = 1e3 * cpu_prefill
                row["decode_step_cpu_ms"] = (
                    1e3 * (cpu_generate - cpu_prefill) / (args.new_tokens - 1)
                )
            if bandwidth:
                row["pct_of_copy_bandwidth"] = 100 * row["decode_gb_s"] / bandwidth
            results["rows"].append(row)

    print(
        f"\n{args.preset} LLM shape on {hardware}; prompt {prompt_len}, {args.new_tokens} new tokens, median of {args.runs}"
    )
    if bandwidth:
        print(f"copy bandwidth {bandwidth:.0f} GB/s")
    cpu = args.device == "cpu"
    head = "| impl | batch | prefill ms | decode ms/step | decode tok/s | GB/s | decode speed-up |"
    if cpu:
        head += " prefill CPU ms | decode CPU ms/step | CPU-time speed-up |"
    print("\n" + head + "\n" + "|---" * (head.count(" | ") + 1) + "|")
    rows = results["rows"]
    for row in rows:
        ref = next(
            r for r in rows if r["batch"] == row["batch"] and r["impl"] == "transformers generate"
        )
        line = (
            f"| {row['impl']} | {row['batch']} | {row['prefill_ms']:.2f} | {row['decode_step_ms']:.3f} | "
            f"{row['decode_tok_s']:.0f} | {row['decode_gb_s']:.2f} | {ref['decode_step_ms'] / row['decode_step_ms']:.2f}x |"
        )
        if cpu:
            line += (
                f" {row['prefill_cpu_ms']:.2f} | {row['decode_step_cpu_ms']:.3f} | "
                f"{ref['decode_step_cpu_ms'] / row['decode_step_cpu_ms']:.2f}x |"
            )
        print(line)
    for batch in batches:
        by_step = {
            r["impl"].rsplit(", ", 1)[-1]: r
            for r in rows
            if r["batch"] == batch and ", " in r["impl"]
        }
        if {"fused step", "unfused step"} <= set(by_step):
            fused, unfused = by_step["fused step"], by_step["unfused step"]
            print(
                f"\nbatch {batch}: the fused step decodes {fused['decode_tok_s'] / unfused['decode_tok_s']:.2f}x "
                f"the unfused step's tok/s ({fused['decode_tok_s']:.0f} vs {unfused['decode_tok_s']:.0f})"
            )
    print_launches(results["launches"])
    if args.profile and args.device == "cuda":
        results["profile"] = {}
        for kind in args.steps:
            try:
                results["profile"][kind] = profile_decoder(decoder, prompt, kind)
            except Exception as error:  # the timings above still stand and are written
                results["profile"][kind] = {"error": repr(error)}
                print(f"\nprofile of the {kind} step failed: {error!r}")
            else:
                print(f"\n### {kind} step")
                print_profile(results["profile"][kind])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
