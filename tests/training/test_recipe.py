"""The shipped model's recipe: its runs draw the very samples that trained the shipped model,
every stage starts from an earlier one, the commands it prints make its configs, and the one
command runs the whole chain (shortened) and skips what is done when run again."""

import hashlib
import shlex
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model import RGPT
from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.recipe import SHIPPED, Chain, Change, Run, command
from rgpt_rt.training.train import DataSource, build_parser, config_from_args

# Digests of the first 24 training samples of each stage's data (after its curriculum
# phases), drawn by the code that trained the shipped model: scripts/referring_curriculum.py
# and rgpt_rt/data/ at commit ad89e41, the curriculum's globals patched as each stage's command
# line set them (d: the world's own mix; h1: its one phase).
TRAINED_ON = {
    "d": "24536bac32eb03d9",
    "h1": "3b1a67d5ffd37eb9",
    "nB": "6e43ecdeed92413d",
    "nD": "02785ce2bb7c37c7",
    "nE": "2b195adbe0291996",
    "nH": "ceffdc975748b924",
    "g1": "f84e040c11d27952",
    "g2": "ca7d5b5be50e8481",
    "pB": "5d16809202e1d8b2",
    "g3": "dc20362aa3bf45ab",
    "cA": "fb8eb2aa56b5ee5e",
    "cC": "eaf4bd72cd5393c3",
}


def digest(samples) -> str:
    found = hashlib.sha256()
    for sample in samples:
        found.update(sample.image.tobytes())
        for mask in sample.masks:
            found.update(np.packbits(mask).tobytes())
        found.update(repr([(t.question, t.answer) for t in sample.turns]).encode())
    return found.hexdigest()[:16]


def stage_config(name: str, tmp_path) -> TrainConfig:
    return Chain(tmp_path).config(next(s for s in SHIPPED if s.name == name))


@pytest.mark.parametrize("name", sorted(TRAINED_ON))
def test_each_stage_draws_the_samples_that_trained_the_shipped_model(name, tmp_path):
    cfg = stage_config(name, tmp_path)
    data = DataSource(cfg, SimpleNamespace(config=RGPTConfig.from_preset("tiny")))
    last_phase = max(cfg.curriculum, default=0) if name != "h1" else 0
    samples = [data.sample(index, last_phase) for index in range(24)]
    assert digest(samples) == TRAINED_ON[name]


def test_every_stage_starts_from_an_earlier_one_and_the_chain_ends_at_cC_step_250():
    names = [stage.name for stage in SHIPPED]
    assert len(set(names)) == len(names)
    folders = set()
    for position, stage in enumerate(SHIPPED):
        if stage.start is not None:
            assert stage.start in names[:position], stage.name
        if isinstance(stage, Run):  # a later stage in a run's folder continues that run
            folder = stage.folder or stage.name
            assert bool(stage.settings.get("resume")) == (folder in folders), stage.name
            assert (stage.start is None) == (folder in folders or stage.name == "d-vision-3500")
            folders.add(folder)
    assert isinstance(SHIPPED[-1], Run) and SHIPPED[-1].name == "cC"
    assert SHIPPED[-1].settings["stop_after"] == 250 and SHIPPED[-1].start == "cA"
    assert [s.change for s in SHIPPED if isinstance(s, Change)] == [
        "scale_words",
        "number_regions",
    ]


def test_the_printed_commands_make_the_recipes_configs(tmp_path):
    chain = Chain(tmp_path)
    for stage in SHIPPED:
        if isinstance(stage, Run):
            cfg = chain.config(stage)
            words = shlex.split(command(cfg))
            assert words[:3] == ["python", "-m", "rgpt_rt.training.train"]
            assert config_from_args(build_parser().parse_args(words[3:])) == cfg, stage.name


@pytest.mark.slow
def test_the_recipe_command_runs_the_chain_shortened_and_skips_what_is_done(tmp_path):
    out = tmp_path / "recipe"
    run = [sys.executable, "-m", "rgpt_rt.training.recipe", "--out", str(out), "--smoke"]
    run += ["--no-progress", "--gpu-device", "cpu"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    started = [s.name for s in SHIPPED if f"[{s.name}] starting" in first.stdout]
    assert started == [s.name for s in SHIPPED]
    model = out / "cC" / "checkpoints" / "step-00000001" / "model"
    assert f"the chain's model: {model}" in first.stdout
    assert RGPT.from_pretrained(model).config.connector.region_numbers == 9
    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stdout and again.stdout.count("] done: ") == len(SHIPPED)
