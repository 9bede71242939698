"""scripts/gpu_finetune.py run as on a GPU lease, on the CPU with two steps a variant: every
variant runs from the same start, and each comes back as a tar that, with the start's vision
tower, is a checkpoint RGPT loads."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from rgpt_rt import default_checkpoint
from rgpt_rt.model.rgpt import RGPT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "gpu_finetune.py")


def test_every_variant_trains_and_comes_back_loadable(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, SCRIPT, "--work", str(tmp_path / "ft"), "--device", "cpu",
        "--steps", "2", "--data-workers", "0", "--threads", "1", "--out", str(out),
        "--variant", "a:4:3e-4:1:1.0:0.4",
        "--variant", "b:2:1e-4:2:1.0:0.9:twins=0.5:decisive=position,shape",
        "--decisive-share", "0.35", "--twins", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((out / "finetune.json").read_text())
    variants = {v["variant"]: v for v in record["variants"]}
    assert set(variants) == {"a", "b"}
    for name, batch, negative, twins in (("a", "4", "0.4", "1.0"), ("b", "2", "0.9", "0.5")):
        entry = variants[name]
        assert entry["ended"] == "finished" and entry["step"] == 2 and entry["vision_unchanged"]
        assert entry["train_seconds"] > 0
        flags = entry["command"]
        assert flags[flags.index("--batch-size") + 1] == batch
        assert flags[flags.index("--negative-rate") + 1] == negative
        assert flags[flags.index("--decisive-share") + 1] == "0.35"
        assert flags[flags.index("--twins") + 1] == twins
        assert ("--decisive" in flags) == (name == "b")
        assert (out / f"{name}.tar").stat().st_size == entry["packed_bytes"] <= 16 * 2**20
        with tarfile.open(out / f"{name}.tar") as tar:
            assert "final/vision" not in tar.getnames()
            tar.extractall(tmp_path / name, filter="data")
        shutil.copytree(default_checkpoint() / "vision", tmp_path / name / "final" / "vision")
        model = RGPT.from_pretrained(tmp_path / name / "final")
        assert model.config.connector.region_numbers == 9


def test_bad_arguments_are_refused(tmp_path):
    (tmp_path / "ft").mkdir()
    runs = {
        "exists; give a new --work folder": ["--work", str(tmp_path / "ft")],
        "give NAME:BATCH:LR:SEED:SHARE:NEGATIVE_RATE": [
            "--work", str(tmp_path / "new"), "--variant", "a:32:fast:1:1.0:0.4",
        ],
        "negative rate 0-1": ["--work", str(tmp_path / "new"), "--variant", "a:32:1e-4:1:1:1.5"],
        "KEY one of init, decisive": [
            "--work", str(tmp_path / "new"), "--variant", "a:32:1e-4:1:1:0.4:steps=9",
        ],
        "no checkpoint there": [
            "--work", str(tmp_path / "new"), "--variant", f"a:4:1e-4:1:1:0.4:init={tmp_path}",
        ],
        "(shares 0-1)": [
            "--work", str(tmp_path / "new"), "--variant", "a:32:1e-4:1:1:0.4:twins=2",
        ],
        "--decisive-share must be between 0 and 1": [
            "--work", str(tmp_path / "new"), "--decisive-share", "1.5",
        ],
        "--twins must be between 0 and 1": ["--work", str(tmp_path / "new"), "--twins", "-1"],
        "--variant names must differ": [
            "--work", str(tmp_path / "new"), "--variant", "a:4:1e-4:1:1:0.4",
            "--variant", "a:4:1e-4:2:1:0.4",
        ],
    }  # fmt: skip
    for message, flags in runs.items():
        command = [sys.executable, SCRIPT, "--device", "cpu", *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode != 0 and message in done.stderr, (message, done.stderr[-2000:])
