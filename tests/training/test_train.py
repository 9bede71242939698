"""The trainer on `tiny`: the loss falls, a run stopped at a step (stop_after) and resumed
continues the same curve, a run killed while writing a checkpoint resumes from the previous
complete one, a NaN stops the run, and the curriculum phases and the sample mix draw the data."""

import itertools
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.model.rgpt import RGPT
from rgpt_rt.training.config import CURRICULUM, TrainConfig
from rgpt_rt.training.curriculum import ReferringMix
from rgpt_rt.training.runs import TrainingDiverged, complete_checkpoints
from rgpt_rt.training.train import (
    DataSource,
    build_parser,
    config_from_args,
    lr_at,
    main,
    train,
)

SMALL = dict(batch_size=2, lr=2e-3, warmup_steps=5, eval_per_task=0, progress=False, threads=1)


@pytest.mark.slow
def test_the_loss_falls_and_a_stopped_run_resumes_on_the_same_curve(tmp_path):
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=30, checkpoint_every=15, **SMALL))
    losses = [straight.losses[s] for s in range(1, 31)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert [p.name for p in complete_checkpoints(tmp_path / "a")] == [
        "step-00000015",
        "step-00000030",
    ]
    assert (tmp_path / "a" / "final" / "rgpt.safetensors").is_file()

    # a second run stops after step 15 (with a checkpoint there, no final/) and picks up there
    settings = dict(out=str(tmp_path / "b"), steps=30, checkpoint_every=10, **SMALL)
    stopped = train(TrainConfig(stop_after=15, **settings))
    assert stopped.stopped and stopped.steps == 15 and not (tmp_path / "b" / "final").exists()
    assert stopped.model == tmp_path / "b" / "checkpoints" / "step-00000015" / "model"
    assert [p.name for p in complete_checkpoints(tmp_path / "b")][-1] == "step-00000015"
    for step in range(1, 16):  # the same schedule as the run of 30 steps: the same numbers
        assert stopped.losses[step] == pytest.approx(straight.losses[step], rel=1e-5), step
    resumed = train(TrainConfig(resume=True, **settings))
    assert not resumed.stopped and resumed.model == tmp_path / "b" / "final"
    for step in range(16, 31):
        # same data, same weights, same optimizer state: the same numbers, up to the order
        # in which a CPU matmul may sum (a few float32 ulps)
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-5), step
    a = RGPT.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = RGPT.from_pretrained(tmp_path / "b" / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    # the child runs the command line and is killed (SIGKILL, no clean-up) half-way through
    # writing the step-6 checkpoint: the model is written, the trainer state is not
    script = textwrap.dedent(
        f"""
        import os, signal
        import rgpt_rt.training.runs as runs
        from rgpt_rt.training.train import main
        real = runs.write_trainer_state
        def dying(path, optimizer, state):
            if state["step"] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, optimizer, state)
        runs.write_trainer_state = dying
        main(["--out", {str(out)!r}, "--steps", "8", "--checkpoint-every", "3",
                "--batch-size", "2", "--warmup-steps", "2", "--eval-per-task", "0",
                "--threads", "1", "--no-progress"])
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003"]
    partial = list((out / "checkpoints").glob(".step-00000006.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "model").is_dir()
    assert not (partial[0] / "trainer.pt").exists()

    with pytest.raises(FileExistsError, match="pass --resume"):
        main(["--out", str(out), "--steps", "8", "--no-progress", "--eval-per-task", "0"])

    main(
        [
            *("--out", str(out), "--steps", "8", "--checkpoint-every", "3", "--batch-size", "2"),
            *("--warmup-steps", "2", "--eval-per-task", "0", "--threads", "1", "--no-progress"),
            "--resume",
        ]
    )
    state = torch.load(out / "checkpoints" / "step-00000008" / "trainer.pt", weights_only=False)
    assert sorted(state["losses"]) == list(range(1, 9))
    assert not list((out / "checkpoints").glob(".step-*")), "the unfinished write is cleaned up"
    assert (out / "final" / "config.json").is_file()


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    real = RGPT.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RGPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        train(TrainConfig(out=str(tmp_path / "nan"), steps=5, checkpoint_every=100, **SMALL))


def test_warm_up_then_cosine_down_to_the_floor():
    cfg = TrainConfig(out="x", steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    rates = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stage=3), "stage must be 1 or 2"),
        (dict(clip="c"), "give --clip and --llm together"),
        (dict(coco="x.json"), "give --coco and --coco-images together"),
        (dict(init="ckpt", clip="c", llm="l"), "either --init"),
        (dict(steps=0), "steps must be positive"),
        (dict(phases=(("colour",), ("refer", "rhyme"))), r"unknown tasks \['rhyme'\]"),
        (dict(phases=(("colour",), ())), "every phase needs at least one task"),
        (dict(phases=(("colour",),), curriculum=(2, 4)), "curriculum takes up to 1 increasing"),
        (dict(device="tpu"), "device must be cpu, cuda or cuda:N; got 'tpu'"),
        (dict(device="cuda:x"), "device must be cpu, cuda or cuda:N; got 'cuda:x'"),
        (dict(device="cuda:99"), r"device 'cuda:99' is not usable here: torch .* sees \d+ CUDA"),
        (dict(stop_after=31, steps=30), r"stop_after must be between 1 and steps \(30\)"),
        (dict(vision_stop_after=5), r"vision_stop_after must be between 1 and vision_pretrain"),
        (dict(negative_rate=1.5), "negative_rate must be between 0 and 1"),
        (dict(crowded=-0.1), "crowded must be between 0 and 1"),
        (dict(refer_keys=(("shape", "weight"),)), "refer_keys takes sets of"),
        (dict(mix=ReferringMix(), coco="a.json", coco_images="i/"), "drop it with --coco"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="device 'cuda' is not usable here.*--device cpu"):
        TrainConfig(out="x", device="cuda")


def test_the_curriculum_asks_about_one_region_first():
    cfg = TrainConfig(out="x", curriculum=(2, 4), batch_size=12)
    model = SimpleNamespace(config=RGPTConfig.from_preset("tiny"))  # DataSource reads its config
    data = DataSource(cfg, model)
    for step, allowed in ((0, CURRICULUM[0]), (1, CURRICULUM[0]), (3, CURRICULUM[1])):
        batch = data.micro_batch(step, 0)
        assert all(len(s.turns) == 1 and s.task in allowed for s in batch), step
    later = [t.task for s in data.micro_batch(4, 0) + data.micro_batch(5, 0) for t in s.turns]
    assert not set(later) <= set(CURRICULUM[1]), "after the curriculum, every task"
    positions = DataSource(TrainConfig(out="x", curriculum=(0, 0, 0, 4), batch_size=12), model)
    assert "position" in {s.task for step in range(2) for s in positions.micro_batch(step, 0)}
    compare = DataSource(TrainConfig(out="x", curriculum=(0, 0, 0, 0, 4), batch_size=12), model)
    batch = compare.micro_batch(0, 0) + compare.micro_batch(3, 0)
    assert all(len(s.turns) == 1 and len(s.masks) >= 2 for s in batch)
    assert {s.task for s in batch} == set(CURRICULUM[4])
    with pytest.raises(
        ValueError, match=f"curriculum takes up to {len(CURRICULUM)} increasing steps"
    ):
        TrainConfig(out="x", curriculum=(5, 3))


def test_a_run_can_name_its_own_phases():
    """A fine-tune's curriculum: `--phases match,colour/refer,match --curriculum 2,4`."""
    args = build_parser().parse_args(
        ["--out", "x", "--phases", "match, colour/refer,match", "--curriculum", "2,4"]
    )
    cfg = config_from_args(args)
    assert cfg.phases == (("match", "colour"), ("refer", "match"))
    model = SimpleNamespace(config=RGPTConfig.from_preset("tiny"))
    data = DataSource(cfg, model)
    first = {s.task for step in range(2) for s in data.micro_batch(step, 0)}
    second = {s.task for step in range(2, 4) for s in data.micro_batch(step, 0)}
    assert first == {"match", "colour"} and second == {"refer", "match"}
    assert config_from_args(build_parser().parse_args(["--out", "x"])).phases == CURRICULUM


def test_after_the_phases_the_mix_draws_the_samples_from_the_runs_world():
    """`--mix referring`: the curriculum's phases first, then the mix's samples, drawn from the
    run's world (its seed and referring settings)."""
    args = ["--out", "x", "--phases", "colour", "--curriculum", "1", "--batch-size", "4"]
    args += ["--mix", "referring", "--share-refer", "1", "--share-refer-scaffold", "0"]
    args += ["--share-match-scaffold", "0", "--share-match", "0", "--share-keep", "0"]
    args += ["--negative-rate", "1", "--seed", "3"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert cfg.mix == ReferringMix(refer_scaffold=0, refer=1, match_scaffold=0, match=0, keep=0)
    data = DataSource(cfg, SimpleNamespace(config=RGPTConfig.from_preset("tiny")))
    assert {s.task for s in data.micro_batch(0, 0)} == {"colour"}
    later = data.micro_batch(1, 0)
    world = cfg.shapes_world(96)
    assert all(s.task == "refer" and s.turns[0].truth["target"] is None for s in later)
    assert [s.turns[0].question for s in later] == [
        cfg.mix.sample(world, index).turns[0].question for index in range(4, 8)
    ]
    with pytest.raises(ValueError, match="--share-refer set a sample mix's fields; add --mix"):
        config_from_args(build_parser().parse_args(["--out", "x", "--share-refer", "1"]))
