"""What the tests of the connector's optional parts (region numbers, region positions) share:
a tiny config with one connector field changed, a random model of it whose new part is large
enough to change every answer, saved and built into an fp32 bundle, and a scene of 3 boxes."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.model import RGPT


def variant_config(**connector) -> RGPTConfig:
    config = RGPTConfig.from_preset("tiny")
    return dataclasses.replace(config, connector=dataclasses.replace(config.connector, **connector))


def saved_variant(config: RGPTConfig, part: str, seed: int, tmp_path_factory):
    """A random model of `config` with connector parameter `part` drawn at std 30, saved."""
    torch.manual_seed(seed)
    model = RGPT(config)
    with torch.no_grad():  # large enough to change every answer
        model.connector.get_parameter(part).normal_(std=30.0)
    folder = tmp_path_factory.mktemp(part.split(".")[0]) / "ckpt"
    model.save_pretrained(folder)
    return folder


def bundle_of(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_bundle(BuildOptions(out=out, checkpoint=checkpoint, quant="none", log=lambda _: None))
    return out


def with_connector_field(bundle: Path, copy: Path, field: str, value) -> Path:
    """A copy of `bundle` whose config.json sets connector.`field` to `value`, its size and
    sha256 updated in the manifest: every file checks out, but config and weights disagree."""
    shutil.copytree(bundle, copy)
    config = json.loads((copy / "config.json").read_text())
    config["connector"][field] = value
    raw = json.dumps(config).encode()
    (copy / "config.json").write_bytes(raw)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["config.json"] = {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def scene(seed=0, size=96):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image, [(5, 5, 40, 40), (50, 10, 90, 45), (20, 55, 70, 90)]
