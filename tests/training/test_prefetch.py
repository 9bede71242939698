"""prefetched: the same batches, in the same order, with worker processes as without."""

import functools
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.training.config import TrainConfig
from rgpt_rt.training.data.shapes import ATTRIBUTES
from rgpt_rt.training.model_init import world_tokenizer
from rgpt_rt.training.prefetch import prefetched
from rgpt_rt.training.train import CollatedBatches, DataSource
from rgpt_rt.training.vision_pretrain import TRAIN_STREAM, SceneStream, TrainingBatches


def test_in_process_is_a_plain_map():
    keys = [(n, 2) for n in range(5)]
    assert list(prefetched(pow, keys)) == [n**2 for n in range(5)]


@pytest.mark.slow  # worker processes: 2-3 s on 2 cores
def test_workers_keep_the_order_and_the_values():
    keys = [(n,) for n in range(7)]
    square = functools.partial(pow, exp=2)
    assert list(prefetched(square, keys, workers=2, ahead=3)) == [n**2 for n in range(7)]


def test_a_worker_error_reaches_the_caller():
    with pytest.raises(ZeroDivisionError):
        list(prefetched(divmod, [(1, 1), (1, 0)], workers=1))


def test_bad_worker_count():
    with pytest.raises(ValueError, match="workers"):
        list(prefetched(pow, [(1, 1)], workers=-1))


@pytest.mark.slow  # worker processes: 2-3 s on 2 cores
def test_vision_batches_from_a_worker_equal_in_process():
    config = RGPTConfig.from_preset("tiny")
    make = TrainingBatches(SceneStream(config.vision.image_size, 0, TRAIN_STREAM), config, 2)
    keys = [(n,) for n in range(3)]
    for here, there in zip(prefetched(make, keys), prefetched(make, keys, workers=1)):
        assert torch.equal(here.pixel_values, there.pixel_values)
        for name in ATTRIBUTES:
            assert torch.equal(here.labels[name], there.labels[name])


@pytest.mark.slow  # worker processes: 2-3 s on 2 cores
def test_language_batches_from_a_worker_equal_in_process(tmp_path):
    config = RGPTConfig.from_preset("tiny")
    cfg = TrainConfig(out=str(tmp_path), batch_size=3, grad_accum=2, curriculum=(1,))
    tokenizer = world_tokenizer(config)
    make = CollatedBatches(DataSource(cfg, SimpleNamespace(config=config)), config, tokenizer, 0)
    keys = [(step, micro) for step in range(2) for micro in range(2)]
    for here, there in zip(prefetched(make, keys), prefetched(make, keys, workers=1)):
        inputs, remote = here.model_inputs(), there.model_inputs()
        assert inputs.keys() == remote.keys()
        for name, value in inputs.items():
            assert torch.equal(value, remote[name]), name


@pytest.mark.slow  # worker processes: 2-3 s on 2 cores
def test_a_killed_run_leaves_no_worker_behind(tmp_path):
    # a parent process starts a worker, reports the worker's pid, and is killed
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        "from rgpt_rt.training.prefetch import prefetched\n"
        "if __name__ == '__main__':\n"
        "    for pid in prefetched(os.getpid, [()] * 1000, workers=1):\n"
        "        print(pid, flush=True)\n"
        "        sys.stdin.readline()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone too
        return stat.read().split(")")[-1].split()[0] != "Z"
