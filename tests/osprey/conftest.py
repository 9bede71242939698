"""Narrow-twin Osprey folders in the public files' layouts, and a bundle built from them
(once per test session: ~15 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.export.synthetic_osprey import write_convnext_file, write_osprey_folder


@pytest.fixture(scope="session")
def osprey_files(tmp_path_factory):
    """(Osprey folder with .bin shards, OpenCLIP ConvNeXt .bin) at the narrow twin's widths."""
    root = tmp_path_factory.mktemp("osprey")
    folder = write_osprey_folder(root / "Osprey-narrow", preset="osprey-narrow", shards=2)
    convnext = write_convnext_file(root / "open_clip_pytorch_model.bin", preset="osprey-narrow")
    return folder, convnext


@pytest.fixture(scope="session")
def osprey_bundle(osprey_files, tmp_path_factory):
    """A bundle with the LLM unquantized (--quant none), for fp32 parity with the reference."""
    folder, convnext = osprey_files
    out = tmp_path_factory.mktemp("bundles") / "osprey-none"
    build_bundle(
        BuildOptions(
            out=out, osprey=folder, convnext=convnext, quant="none", trt="off", log=lambda _: None
        )
    )
    return out


@pytest.fixture(scope="session")
def reference(osprey_files):
    """The reference model on the same files, its weights rounded to fp16 as the bundle
    stores them (so that runtime and reference compute the same function)."""
    from rgpt_rt.model.osprey import Osprey

    model = Osprey.from_files(*osprey_files).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("llm."):  # the LLM goes to the bundle as stored (bf16)
                parameter.copy_(parameter.half().float())
    return model
