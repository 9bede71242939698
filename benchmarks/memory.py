#!/usr/bin/env python
"""The full-size path in bounded memory: 7B-shaped random folders -> build -> --check -> a
Session's load and one describe (then a second region of the same image, whose prefix is
cached), each step in its own process, timed, with its peak RSS.

    python benchmarks/memory.py --work /big/disk              # writes ~14.5 GB of folders once
    python benchmarks/memory.py --work DIR --llm-layers 2 --clip-layers 2   # real widths, shallow
    python benchmarks/memory.py --work DIR --device cuda      # load + describe on a GPU too
    python benchmarks/memory.py --work DIR --osprey           # Osprey-7b's layout: .bin shards + the OpenCLIP file
    python benchmarks/memory.py --bundle B                    # only load + one describe of a built bundle

Folders: lmsys/vicuna-7b-v1.5's config with random fp16 weights in two HF-named shards, and
openai/clip-vit-large-patch14-336's (rgpt_rt/export/synthetic.py). Targets (issue 22): build
<= 6 GB peak RSS and <= 10 minutes on 2 cores; bundle <= 4.8 GB; load + one describe <= 5.5 GB
(CPU: peak RSS; CUDA: host peak RSS + torch.cuda.max_memory_allocated()).

Peak RSS is getrusage's ru_maxrss, with /proc/self/status VmHWM beside it; both count KiB
(/proc writes "kB"), and they agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

LOAD_AND_DESCRIBE = """
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
import rgpt_rt
start = time.perf_counter()
session = rgpt_rt.Session(sys.argv[1], device=sys.argv[2])
loaded = time.perf_counter() - start
rng = np.random.default_rng(0)
image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
def peak():
    device = torch.cuda.max_memory_allocated() if sys.argv[2] == "cuda" else 0
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "vm_hwm_gb": int(status["VmHWM"].split()[0]) * 1024 / 1e9,
        "cuda_max_allocated_gb": device / 1e9,
    }}
start = time.perf_counter()
text = session.describe(image, (100, 80, 300, 260), max_new_tokens=8)
described = time.perf_counter() - start
result = {{"load_s": round(loaded, 1), "describe_s": round(described, 2), **peak()}}
result |= {{"stats": session.stats, "answer": text}}
start = time.perf_counter()  # another region of the same image: its prefix is cached
session.describe(image, (320, 200, 500, 400), max_new_tokens=8)
second = {{"describe_s": round(time.perf_counter() - start, 2), **peak()}}
result["second_region"] = second | {{"prefill_tokens": session.stats["prefill_tokens"]}}
print(json.dumps(result))
"""


def make_folders(work: Path, llm_layers: int | None, clip_layers: int | None) -> tuple[Path, Path]:
    from rgpt_rt.export.synthetic import write_clip_folder, write_llama_folder

    tag = f"L{llm_layers or 32}-C{clip_layers or 24}"
    clip, llm = work / f"clip-{tag}", work / f"llm-{tag}"
    if not (clip / "model.safetensors").is_file():
        write_clip_folder(clip, layers=clip_layers)
    if not (llm / "model.safetensors.index.json").is_file():
        write_llama_folder(llm, layers=llm_layers)
    return clip, llm


def make_osprey_folders(work: Path, llm_layers: int | None) -> tuple[Path, Path]:
    """Osprey-7b's folder (bf16 .bin shards, 4 of them so that writing holds ~3.4 GB at a
    time) and OpenCLIP's ConvNeXt-L file (fp32, 1.4 GB), random weights."""
    from rgpt_rt.export.synthetic_osprey import write_convnext_file, write_osprey_folder

    folder = work / f"osprey-L{llm_layers or 32}"
    convnext = work / "open_clip_pytorch_model.bin"
    if not (folder / "pytorch_model.bin.index.json").is_file():
        write_osprey_folder(folder, layers=llm_layers, shards=4)
    if not convnext.is_file():
        write_convnext_file(convnext)
    return folder, convnext


def run(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - start


def load_and_describe(code: str, bundle: Path, device: str) -> tuple[dict, float]:
    result, seconds = run([sys.executable, "-c", code, str(bundle), device])
    return json.loads(result.stdout.strip().splitlines()[-1]), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="a folder with ~15 GB free")
    parser.add_argument("--bundle", type=Path, help="only load + one describe of this bundle")
    parser.add_argument("--llm-layers", type=int, help="decoder layers (default: 32, the real 7B)")
    parser.add_argument("--clip-layers", type=int, help="CLIP layers (default: 24)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--osprey", action="store_true", help="Osprey-7b's files instead")
    args = parser.parse_args(argv)
    if (args.work is None) == (args.bundle is None):
        parser.error("give --work (write, build, check, load) or --bundle (load only)")
    code = LOAD_AND_DESCRIBE.format(threads=args.threads)
    if args.bundle is not None:
        session = load_and_describe(code, args.bundle, args.device)[0]
        print(json.dumps(session, indent=2))
        return 0

    start = time.perf_counter()
    if args.osprey:
        folder, convnext = make_osprey_folders(args.work, args.llm_layers)
        name, sources = folder.name, ["--osprey", str(folder), "--convnext", str(convnext)]
    else:
        clip, llm = make_folders(args.work, args.llm_layers, args.clip_layers)
        name, sources = llm.name, ["--clip", str(clip), "--llm", str(llm)]
    rows = [("write the random folders", time.perf_counter() - start, None)]
    bundle, summary = args.work / f"bundle-{name}", args.work / f"build-{name}.json"
    build = [sys.executable, "export/build_engine.py", *sources, "--out", str(bundle)]
    _, seconds = run([*build, "--trt", "off", "--json", str(summary)])
    manifest = json.loads(summary.read_text())
    rows.append(("build (export/build_engine.py)", seconds, manifest["peak_rss_mb"] * 1e6 / GB))
    _, seconds = run([sys.executable, "export/build_engine.py", "--check", str(bundle)])
    rows.append(("--check (hashes, shapes, vision parity)", seconds, None))
    session, seconds = load_and_describe(code, bundle, args.device)
    memory = session["peak_rss_gb"] + session["cuda_max_allocated_gb"]
    rows.append((f"Session load + one describe ({args.device})", seconds, memory))

    size = sum(entry["bytes"] for entry in manifest["files"].values()) / GB
    files = ", ".join(f"{k} {v['bytes'] / GB:.2f} GB" for k, v in manifest["files"].items())
    print(f"## full-size path, {name}, {args.device}\n")
    print("| step | seconds | peak memory (GB) |\n|---|---:|---:|")
    for step, secs, peak in rows:
        print(f"| {step} | {secs:.1f} | {'' if peak is None else f'{peak:.2f}'} |")
    print(f"\nbundle: {size:.2f} GB ({files})")
    print(f"load {session['load_s']} s, describe {session['describe_s']} s")
    print(
        f"load + describe: ru_maxrss {session['peak_rss_gb']:.2f} GB, VmHWM {session['vm_hwm_gb']:.2f} GB"
    )
    second = session["second_region"]
    print(
        f"then another region of the same image: {second['describe_s']} s, "
        f"{second['prefill_tokens']} tokens prefilled, ru_maxrss {second['peak_rss_gb']:.2f} GB"
    )
    steps = manifest["build_seconds"].items()
    print("build steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in steps))
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "bundle_gb": size, "session": session}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
