"""scripts/train_chain.py run as on a GPU lease, on the CPU with two steps a stage: every
stage runs from the one before, and the last model comes back in parts that unpack to a
checkpoint RGPT loads."""

import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from rgpt_rt.model.rgpt import RGPT

ROOT = Path(__file__).resolve().parents[1]


def test_the_chain_runs_every_stage_and_packs_its_last_model(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "scripts" / "train_chain.py"),
        "--work", str(tmp_path / "chain"), "--device", "cpu", "--scale", "0.0001",
        "--data-workers", "0", "--threads", "1", "--eval-per-task", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((out / "chain.json").read_text())
    stages = record["stages"]
    assert [s["stage"] for s in stages] == ["shape", "position", "size", "all", "refer"]
    assert all(s["ended"] == "finished" and s["evaluations"] for s in stages)
    for before, after in itertools.pairwise(stages):
        assert after["command"][after["command"].index("--init") + 1] == before["model"]

    parts = sorted(out.glob("model.tar.part-*"))
    assert len(parts) == 2 and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    whole = tmp_path / "model.tar"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(whole) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    model = RGPT.from_pretrained(tmp_path / "back" / "final")
    assert model.config.name == "tiny"


def test_an_existing_work_folder_is_refused(tmp_path):
    (tmp_path / "chain").mkdir()
    command = [sys.executable, str(ROOT / "scripts" / "train_chain.py"), "--work",
               str(tmp_path / "chain"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "exists; give a new --work folder" in done.stderr
