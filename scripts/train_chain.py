"""A chain of fine-tuning stages toward referring (rgpt_rt/assets/MODEL_CARD.md), each started
from the one before, meant for a GPU lease (18000 steps take about two hours on two CPU cores;
how long on a GPU is not measured yet). Each stage is a `scripts/referring_curriculum.py` run; the chain stops
starting stages when --deadline is near, and a stage that runs out of time ends at its last
checkpoint. At the end the last model is packed for the trip back:

    $OUT/model.tar.part-aa, -ab    the checkpoint (tar, split under 15 MiB a part); unpack with
                                   cat model.tar.part-* | tar -x -C runs/chain
    $OUT/chain.json                every stage: its command, seconds, held-out evaluations

    python3 scripts/train_chain.py --work /tmp/chain --deadline 540     # on a GPU lease
    python scripts/train_chain.py --work /tmp/c --device cpu --scale 0.002   # a smoke run

The stages (steps at --scale 1), from what the CPU probes found: matching is learned through
the model's own answer one attribute at a time (shape, then position, then size, each keeping
the earlier ones), then the four together, then referring with its own scaffold and the
match questions kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # importable without an install (a GPU lease's bare checkout)
sys.path.insert(0, str(ROOT))
NO_REFER = ["--share-refer-scaffold", "0", "--share-refer", "0"]
MATCH_MIX = ["--share-match-scaffold", "0.5", "--share-match", "0.25", "--share-keep", "0.25"]
STAGES = (
    ("shape", 3000, ["--attributes", "shape", *NO_REFER, *MATCH_MIX]),
    ("position", 3000, ["--attributes", "position,position,shape", *NO_REFER, *MATCH_MIX]),
    ("size", 3000, ["--attributes", "size,size,shape,position", *NO_REFER, *MATCH_MIX]),
    ("all", 3000, ["--attributes", "shape,colour,size,position", *NO_REFER, *MATCH_MIX]),
    ("refer", 6000, ["--attributes", "shape,colour,size,position"]),
)
PART_BYTES = 15 * 2**20
EVAL_SECONDS = 60  # what a stage's start and evaluations cost, beside its steps


def stage_command(name, steps, extra, init, work, args) -> list[str]:
    return [
        sys.executable,
        str(HERE / "referring_curriculum.py"),
        "--out", str(work / name),
        "--init", str(init),
        "--steps", str(steps),
        "--device", args.device,
        "--data-workers", str(args.data_workers),
        "--threads", str(args.threads),
        "--checkpoint-every", str(max(1, steps // 6)),
        "--eval-every", str(max(1, steps // 2)),
        "--eval-per-task", str(args.eval_per_task),
        *extra,
    ]  # fmt: skip


def run_until(command: list[str], seconds: float) -> str:
    """Run `command`; past `seconds`, stop it and its data workers (its process group)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        code = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        return "stopped at the deadline"
    if code:
        raise SystemExit(f"stage failed (exit status {code}): {' '.join(command)}")
    return "finished"


def last_model(run: Path) -> Path | None:
    """The run's final model, or its latest complete checkpoint's."""
    if (run / "final" / "rgpt.safetensors").is_file():
        return run / "final"
    checkpoints = sorted((run / "checkpoints").glob("step-*/model/rgpt.safetensors"))
    return checkpoints[-1].parent if checkpoints else None


def evaluations(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if "eval" in r]


def pack(model: Path, out: Path) -> list[str]:
    """`model` as a tar in parts under PART_BYTES, written under temporary names first."""
    tar_path = out / "model.tar.tmp"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(model, arcname="final")
    names = []
    with open(tar_path, "rb") as whole:
        for index in range(26):
            chunk = whole.read(PART_BYTES)
            if not chunk:
                break
            name = f"model.tar.part-a{chr(ord('a') + index)}"
            (out / (name + ".tmp")).write_bytes(chunk)
            os.replace(out / (name + ".tmp"), out / name)
            names.append(name)
    tar_path.unlink()
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a new folder for the stages' runs")
    parser.add_argument("--init", default=None, help="(default: the embedded default model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-per-task", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the chain")
    parser.add_argument("--scale", type=float, default=1.0, help="times each stage's steps")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="(default $OUT)")
    args = parser.parse_args()
    if args.init is None:
        from rgpt_rt import default_checkpoint

        args.init = str(default_checkpoint())
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists; give a new --work folder")
    work.mkdir(parents=True)
    started, init, record = time.monotonic(), Path(args.init), []
    for name, steps, extra in STAGES:
        steps = max(2, round(steps * args.scale))
        left = args.deadline - (time.monotonic() - started)
        if left < 2 * EVAL_SECONDS:
            print(f"{name}: not started, {left:.0f} s left", flush=True)
            break
        command = stage_command(name, steps, extra, init, work, args)
        print(f"{name}: {steps} steps from {init} ({left:.0f} s left)", flush=True)
        begun = time.monotonic()
        ended = run_until(command, left - EVAL_SECONDS / 2)
        model = last_model(work / name)
        record.append(
            {
                "stage": name,
                "command": command[1:],
                "ended": ended,
                "seconds": round(time.monotonic() - begun, 1),
                "model": str(model),
                "evaluations": evaluations(work / name),
            }
        )
        print(f"{name}: {ended}; {record[-1]['evaluations'][-1:]}", flush=True)
        if model is None:
            break
        init = model
    summary = {"device": args.device, "scale": args.scale, "stages": record}
    (work / "chain.json").write_text(json.dumps(summary, indent=1))
    if args.out and record and record[-1]["model"] != "None":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        parts = pack(Path(record[-1]["model"]), out)
        shutil.copy(work / "chain.json", out / "chain.json")
        print(f"packed {record[-1]['model']} into {out}: {', '.join(parts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
