"""Shared fixtures. Tests marked `gpu` are skipped where torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight tiny RGPT saved with save_pretrained."""
    from rgpt_rt.config import RGPTConfig
    from rgpt_rt.model import RGPT

    folder = tmp_path_factory.mktemp("src") / "ckpt"
    torch.manual_seed(3)
    RGPT(RGPTConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """The bundle of tiny_checkpoint, built once per test run through the command line."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    from build_script import run_build_script

    result = run_build_script(
        "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quant", "none", "--trt", "auto"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "[7/7]" in result.stdout and "bundle written" in result.stdout
    assert "TensorRT not installed: ONNX only" in result.stdout
    return out
