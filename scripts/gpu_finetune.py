"""Fine-tune the embedded default model toward referring on a GPU lease: a few variants of
`scripts/referring_curriculum.py` run at once on the one GPU, each sized by a short
calibration run so that it ends (its learning rate decayed) before --deadline. A variant still
running at the deadline is stopped and ends at its last checkpoint. What comes back:

    $OUT/<variant>.tar     the variant's model without its vision tower, which stays frozen
                           (each under 16 MiB); unpack with
                           mkdir runs/V && tar -x -C runs/V -f V.tar && cp -r INIT/vision runs/V/final/
    $OUT/finetune.json     the calibration, and per variant its command, steps, seconds, end

    python3 scripts/gpu_finetune.py --work /tmp/ft --deadline 450        # on a GPU lease
    python scripts/gpu_finetune.py --work /tmp/ft --device cpu --steps 2  # a smoke run

Every variant trains what nH and nI trained (rgpt_rt/assets/MODEL_CARD.md): referring 75% (40%
of its phrases fit no region), the package's own samples 10%, one-region questions 15%;
--decisive-share makes that share of the referring questions ones that position decides (near
misses in position, and targets only their position singles out), for every variant, and
--twins asks that share of those beside their twin (the answer changed by the position). A
--variant may set its own start, --decisive, --decisive-share, --twins or --same-row with
KEY=VALUE fields:

    --variant p:64:3e-4:44:1.0:0.5:init=runs/pBpos:decisive-share=0.5:twins=0.5
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # importable without an install (a GPU lease's bare checkout)
sys.path.insert(0, str(ROOT))
from rgpt_rt.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402

MIX = [
    "--share-refer-scaffold", "0", "--share-match-scaffold", "0", "--share-match", "0",
    "--share-refer", "0.75", "--share-mixed", "0.1", "--share-keep", "0.15",
]  # fmt: skip
# name, batch size, learning rate, seed, steps as a share of the calibrated, negative rate
VARIANTS = (
    ("b16-lr3", 16, "3e-4", 16, 1.3, 0.4, {}),  # half the samples a step: faster
    ("b32-lr5", 32, "5e-4", 17, 1.0, 0.4, {}),
    ("b32-lr3", 32, "3e-4", 18, 1.0, 0.4, {}),
)
CALIBRATION_STEPS = 40
SHARED_GPU = 0.75  # each variant's speed beside two others (0.77 on an H200 with 4 workers)
START_SECONDS = 45  # a variant's start, last checkpoint and final save, beside its steps
PACK_SECONDS = 20
PART_LIMIT = 16 * 2**20  # a device call brings back files of at most 16 MiB


EXTRAS = ("init", "decisive", "decisive-share", "twins", "same-row")  # a variant's own flags


def parse_variant(text: str) -> tuple:
    """'b32-n5:32:3e-4:21:1.0:0.5' -> ("b32-n5", 32, "3e-4", 21, 1.0, 0.5, {}); fields after
    the sixth are KEY=VALUE, KEY one of EXTRAS, and set that flag for this variant alone:
    'p:64:3e-4:44:1.0:0.5:init=runs/pBpos:twins=0.5' -> (..., {"init": "runs/pBpos", ...})."""
    fields = text.split(":")
    try:
        name, batch, lr, seed, share, negative = fields[:6]
        extras = dict(field.split("=", 1) for field in fields[6:])
        variant = name, int(batch), str(float(lr)), int(seed), float(share), float(negative)
        for key in ("decisive-share", "twins", "same-row"):
            if key in extras and not 0 <= float(extras[key]) <= 1:
                variant = None
    except ValueError:
        variant = None
    if (
        variant is None
        or not (variant[1] >= 1 and variant[4] > 0 and 0 <= variant[5] <= 1)
        or not set(extras) <= set(EXTRAS)
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME:BATCH:LR:SEED:SHARE:NEGATIVE_RATE (batch >= 1, share > 0, "
            "negative rate 0-1), e.g. b32:32:3e-4:21:1.0:0.4, then optionally KEY=VALUE "
            f"fields, KEY one of {', '.join(EXTRAS)} (shares 0-1)"
        )
    return (*variant, extras)


def variant_command(variant, steps, work, args) -> list[str]:
    """The variant's referring_curriculum.py command; its extras hold its start ("init")."""
    name, batch, lr, seed, _, negative, extras = variant
    flags = {"decisive-share": str(args.decisive_share), "twins": str(args.twins), **extras}
    return [
        sys.executable, str(HERE / "referring_curriculum.py"), *MIX,
        "--negative-rate", str(negative),
        "--out", str(work / name), "--steps", str(steps),
        "--batch-size", str(batch), "--lr", lr, "--seed", str(seed),
        "--device", args.device, "--data-workers", str(args.data_workers),
        "--threads", str(args.threads), "--log-every", "10",
        "--checkpoint-every", str(max(1, steps // 5)), "--keep-checkpoints", "1",
        "--eval-every", str(steps), "--eval-per-task", "0",
        *(item for key, value in flags.items() for item in (f"--{key}", value)),
    ]  # fmt: skip


def start(command: list[str], log: Path) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, start_new_session=True, env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def wait_until(processes: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """How each process ended; those still running at `deadline` (monotonic) are stopped with
    their data workers (their process groups)."""
    ended = {}
    for name, process in processes.items():
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            ended[name] = "finished" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            ended[name] = "stopped at the deadline"
    return ended


def log_records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def steps_per_second(run: Path) -> float:
    """The calibration run's speed between its first and last logged step (start-up left out)."""
    steps = [r for r in log_records(run) if "elapsed_s" in r]
    if len(steps) < 2 or steps[-1]["elapsed_s"] <= steps[0]["elapsed_s"]:
        tail = run.with_name(run.name + ".log").read_text()[-3000:]
        raise SystemExit(f"the calibration run logged too little to time; its log ends:\n{tail}")
    return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])


def last_model(run: Path, records: list[dict]) -> tuple[Path, int] | None:
    """The run's final model or its latest complete checkpoint's, with its step (the final
    model's from the run's log `records`)."""
    if (run / "final" / "rgpt.safetensors").is_file():
        steps = [r["step"] for r in records if "step" in r]
        return run / "final", steps[-1] if steps else -1
    checkpoints = sorted((run / "checkpoints").glob("step-*/model/rgpt.safetensors"))
    if not checkpoints:
        return None
    model = checkpoints[-1].parent
    return model, int(model.parent.name.removeprefix("step-"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pack(model: Path, target: Path) -> int:
    """`model` less its vision tower as one tar at `target`, written whole or not at all."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for item in sorted(model.iterdir()):
            if item.name != "vision":
                tar.add(item, arcname=f"final/{item.name}")
    size = buffer.getbuffer().nbytes
    if size > PART_LIMIT:
        raise SystemExit(f"{model} packs to {size} bytes, over the {PART_LIMIT} a file may be")
    atomic_write_bytes(target, buffer.getvalue())
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a new folder for the runs")
    parser.add_argument("--init", default=None, help="(default: the embedded default model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-workers", type=int, default=4, help="per variant")
    parser.add_argument("--threads", type=int, default=1, help="per variant")
    parser.add_argument("--deadline", type=float, default=450, help="seconds for everything")
    parser.add_argument("--steps", type=int, help="every variant's steps (default: calibrated)")
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument(
        "--shared",
        type=float,
        default=SHARED_GPU,
        help="each variant's speed beside the others, as a share of the calibration's alone "
        f"(default {SHARED_GPU}, for three variants)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        help="NAME:BATCH:LR:SEED:SHARE:NEGATIVE_RATE, repeated (default: VARIANTS)",
    )
    parser.add_argument(
        "--decisive-share",
        type=float,
        default=0.0,
        help="every variant's share of referring questions that position decides "
        "(referring_curriculum.py --decisive-share; default 0)",
    )
    parser.add_argument(
        "--twins",
        type=float,
        default=0.0,
        help="the share of those asked beside their twin (referring_curriculum.py --twins)",
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="(default $OUT)")
    args = parser.parse_args()
    for name in ("decisive_share", "twins"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be between 0 and 1")
    args.variant = args.variant or list(VARIANTS)
    if len({v[0] for v in args.variant}) < len(args.variant):
        raise SystemExit("--variant names must differ")
    began = time.monotonic()
    if args.init is None:
        from rgpt_rt import default_checkpoint

        args.init = str(default_checkpoint())
    init, work = Path(args.init), Path(args.work)
    # each variant's start, resolved once: its own init= or --init
    args.variant = [(*v[:-1], {"init": str(init), **v[-1]}) for v in args.variant]
    starts = {Path(extras["init"]) for *_, extras in args.variant}
    for start_from in starts:
        if not (start_from / "config.json").is_file():
            raise SystemExit(f"{start_from}: no checkpoint there (no config.json); check --init")
    if work.exists():
        raise SystemExit(f"{work} exists; give a new --work folder")
    work.mkdir(parents=True)
    record: dict = {"device": args.device, "init": str(init), "deadline": args.deadline}

    steps = args.steps
    if steps is None:
        command = variant_command(args.variant[-1], CALIBRATION_STEPS, work, args)
        command[command.index("--out") + 1] = str(work / "calibration")
        process = start(command, work / "calibration.log")
        ended = wait_until({"calibration": process}, began + args.deadline / 4)
        rate = steps_per_second(work / "calibration")
        left = args.deadline - (time.monotonic() - began) - START_SECONDS - PACK_SECONDS
        steps = int(min(args.max_steps, max(10, rate * args.shared * left)))
        record["calibration"] = {"steps_per_s": round(rate, 2), "ended": ended["calibration"]}
        print(f"calibration: {rate:.1f} steps/s alone; {steps} steps a variant", flush=True)

    processes, commands = {}, {}
    for variant in args.variant:
        name, share = variant[0], variant[4]
        mine = steps if args.steps else max(10, round(steps * share))
        commands[name] = variant_command(variant, mine, work, args)
        processes[name] = start(commands[name], work / f"{name}.log")
    started = time.monotonic()
    ended = wait_until(processes, began + args.deadline - PACK_SECONDS)
    record["seconds"] = round(time.monotonic() - started, 1)  # the variants side by side

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    towers = {folder: digest(folder / "vision" / "model.safetensors") for folder in starts}
    record["variants"] = []
    for name, *_, extras in args.variant:
        start_from = Path(extras["init"])
        records = log_records(work / name)
        found = last_model(work / name, records)
        steps_logged = [r for r in records if "loss_smooth" in r]
        entry = {
            "variant": name,
            "command": commands[name][1:],
            "ended": ended[name],
            "train_seconds": round(steps_logged[-1]["elapsed_s"], 1) if steps_logged else None,
            "losses_every_10": [round(r["loss_smooth"], 4) for r in steps_logged],
        }
        if found:
            model, step = found
            entry |= {"model": str(model), "step": step, "init": str(start_from)}
            tower = digest(model / "vision" / "model.safetensors")
            entry["vision_unchanged"] = tower == towers[start_from]
            if out:
                entry["packed_bytes"] = pack(model, out / f"{name}.tar")
        else:
            tail = (work / f"{name}.log").read_text()[-2000:]
            entry["log_tail"] = tail
        record["variants"].append(entry)
        print(f"{name}: {ended[name]}, {entry.get('step', 'no model')}", flush=True)
    text = json.dumps(record, indent=1)
    for folder in filter(None, (work, out)):
        atomic_write_text(folder / "finetune.json", text)
    return 0 if all("model" in v for v in record["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
