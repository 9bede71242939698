"""The trainer on a GPU (`--device cuda`): the loss falls as on the CPU, the checkpoints it
writes resume on the CPU, and its held-out evaluation runs on the device."""

import math
import shutil

import pytest
import torch

from rgpt_rt.model.rgpt import RGPT
from rgpt_rt.training.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMALL = dict(batch_size=4, lr=2e-3, warmup_steps=5, progress=False, threads=1)


def small_run(out, steps: int, **kwargs):
    return train(TrainConfig(out=str(out), steps=steps, **SMALL, **kwargs))


def test_training_on_cuda_learns_and_resumes_on_the_cpu(tmp_path):
    run = small_run(
        tmp_path / "gpu", 30, checkpoint_every=15, eval_every=30, eval_per_task=2, device="cuda"
    )
    losses = [run.losses[s] for s in range(1, 31)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert set(run.evals[30]) >= {"classify", "refer"}
    final = RGPT.from_pretrained(tmp_path / "gpu" / "final")
    assert final._device().type == "cpu"

    (tmp_path / "cpu" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "gpu" / "checkpoints" / "step-00000015",
        tmp_path / "cpu" / "checkpoints" / "step-00000015",
    )
    resumed = small_run(tmp_path / "cpu", 20, checkpoint_every=100, eval_per_task=0, resume=True)
    assert all(math.isfinite(resumed.losses[s]) for s in range(16, 21))
